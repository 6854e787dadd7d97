"""Every family trains in every tuning mode of every component (each component frozen, full and LoRA
once across three runs), saves a complete verified folder that plain transformers / PEFT load with
vlmtune's logits, merges LoRA with equal logits, generates, and keeps the chat template it trained with."""

import json

import pytest
import torch
from conftest import make_image, write_jsonl
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from families.conftest import FAMILIES
from vlmtune.checkpoints.load import load_model
from vlmtune.config import load_config
from vlmtune.data.encode import SampleEncoder
from vlmtune.inference.generate import generate_predictions
from vlmtune.models import images as mm
from vlmtune.training.run import train
from vlmtune.tuning.plan import PlanError

# a Latin square: across the three runs each component is frozen once, full once and LoRA once
RUNS = {"lora-llm": dict(vision="frozen", projector="full", llm="lora"),
        "lora-vision": dict(vision="lora", projector="frozen", llm="full"),
        "lora-projector": dict(vision="full", projector="lora", llm="frozen")}
# families with more components extend the square
EXTRA = {"mgm": {"lora-llm": dict(vision_aux="lora", mining="frozen"), "lora-vision": dict(vision_aux="frozen", mining="full"),
                 "lora-projector": dict(vision_aux="full", mining="lora")}}


def color_data(folder):
    records = []
    for i, (color, size) in enumerate([("red", 16), ("blue", 40), ("green", 24), ("red", 40)] * 2):
        make_image(folder / f"{i}.png", color, size=size)
        records.append({"id": f"s{i}", "messages": [
            {"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": color}],
            "images": [f"{i}.png"]})
    records.append({"id": "text", "messages": [{"role": "user", "content": "Hello there"},
                                               {"role": "assistant", "content": "yes"}]})
    return write_jsonl(folder / "train.jsonl", records)


def inputs_for(processor, family, chat, image):
    encoder = SampleEncoder(processor, family, 1 << 20)
    ids, blocks = encoder.generation_ids(chat, [image])
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            **{k: torch.tensor([v]) for k, v in encoder.extra_inputs(ids).items()},
            **mm.image_inputs(processor, [image], blocks)}


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("family_name", FAMILIES)
def test_train_save_reload_merge_generate(family_model, family_name, run, tmp_path):
    model_dir = family_model(family_name, "bytelevel")
    data = color_data(tmp_path / "data")
    out = tmp_path / "out"
    tune = RUNS[run] | EXTRA.get(family_name, {}).get(run, {})
    cfg = load_config(tree={"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_length": 512},
                            "tune": tune,
                            "train": {"max_steps": 8, "batch_size": 3, "lr": 1e-2, "logging_steps": 1,
                                      "save_steps": 0, "warmup_ratio": 0.0},
                            "output": {"dir": str(out)}})
    if family_name == "gemma3" and run == "lora-projector":  # Gemma 3's projector is a bare weight, no Linear
        with pytest.raises(PlanError, match="tune.projector=lora, but the projector has no linear layers"):
            train(cfg)
        return
    result = train(cfg)  # ends with `verify` on the saved folder
    assert result.final_loss < result.first_loss
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["family"] == family_name
    assert {c: v["mode"] for c, v in manifest["components"].items()} == tune

    loaded = load_model(out)  # vlmtune's view: adapter merged onto its base
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == AutoProcessor.from_pretrained(model_dir).chat_template
    image = Image.new("RGB", (30, 20), (0, 0, 255))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]}]
    inputs = inputs_for(processor, loaded.family, chat, image)
    with torch.inference_mode():
        ours = loaded.model.eval()(**inputs).logits
        if (out / "adapter_config.json").is_file():  # plain PEFT on plain transformers
            base = AutoModelForImageTextToText.from_pretrained(json.loads(
                (out / "adapter_config.json").read_text())["base_model_name_or_path"])
            plain = PeftModel.from_pretrained(base, out).eval()
            assert torch.allclose(plain(**inputs).logits, ours, atol=1e-5)
            merged = plain.merge_and_unload()
            assert torch.allclose(merged(**inputs).logits, ours, atol=1e-4)
        else:
            plain = AutoModelForImageTextToText.from_pretrained(out).eval()
            assert torch.allclose(plain(**inputs).logits, ours, atol=1e-5)
    predictions, problems = generate_predictions(out, data, max_new_tokens=3, batch_size=4)
    assert len(predictions) == 9 and not problems
