"""QLoRA: the LLM loads 4-bit (bitsandbytes, on the CPU), vision tower and projector stay in full
precision, LoRA trains on top (loss falls), and the adapter loads on the unquantized base with plain
PEFT; merging into quantized weights and fully training a quantized component are refused."""

import json

import pytest
import torch
from bitsandbytes.nn import Linear4bit
from conftest import make_image, write_jsonl
from peft import PeftModel
from transformers import AutoModelForImageTextToText

from families import tiny
from vlmtune.checkpoints.load import load_model
from vlmtune.config import ConfigError, load_config
from vlmtune.models.family import LoadOptions
from vlmtune.training.run import train


@pytest.fixture(scope="module")
def wide_llava(tmp_path_factory):
    """bitsandbytes quantizes in blocks of 64: the LLM needs hidden sizes of at least that."""
    saved = dict(tiny.LLAMA)
    tiny.LLAMA.update(hidden_size=128, intermediate_size=256)
    try:
        return tiny.build("llava", tmp_path_factory.mktemp("qlora") / "model", "bytelevel")
    finally:
        tiny.LLAMA.clear()
        tiny.LLAMA.update(saved)


def tree(model, data, out, **extra):
    return {"model": {"path": str(model)}, "data": {"train": str(data), "max_length": 128},
            "tune": {"vision": "frozen", "projector": "full", "llm": "lora", "quantize": "4bit"},
            "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "logging_steps": 1, "save_steps": 0,
                      "warmup_ratio": 0.0},
            "output": {"dir": str(out)}, **extra}


def data_file(folder):
    records = []
    for i, color in enumerate(["red", "green", "blue"] * 3):
        make_image(folder / f"{i}.png", color)
        records.append({"id": i, "messages": [{"role": "user", "content": "<image>What color?"},
                                              {"role": "assistant", "content": color}], "images": [f"{i}.png"]})
    return write_jsonl(folder / "train.jsonl", records)


def test_qlora_trains_and_the_adapter_loads_on_the_unquantized_base(wide_llava, tmp_path):
    cfg = load_config(tree=tree(wide_llava, data_file(tmp_path), tmp_path / "out"))
    quantized = load_model(wide_llava, options=LoadOptions(quantize=(4, "nf4", True, "auto", ("llm",))))
    assert isinstance(quantized.model.model.language_model.layers[0].self_attn.q_proj, Linear4bit)
    assert type(quantized.model.model.vision_tower.encoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(quantized.model.model.multi_modal_projector.linear_1) is torch.nn.Linear

    result = train(cfg)
    assert result.final_loss < result.first_loss
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(wide_llava.resolve())
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["config"]["tune"]["quantize"] == "4bit"
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(wide_llava), out)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(plain(input_ids=ids).logits).all()


@pytest.mark.parametrize("extra,message", [
    ({"output": {"merge": True}}, "merging LoRA into quantized weights would round them again"),
    ({"tune": {"llm": "full", "quantize": "4bit"}}, "a quantized component cannot be fully trained (llm)"),
])
def test_qlora_refusals(tmp_path, extra, message):
    base = tree("m", "t.jsonl", tmp_path / "out")
    for key, value in extra.items():
        base[key] = {**base[key], **value}
    with pytest.raises(ConfigError) as err:
        load_config(tree=base)
    assert message in str(err.value)
