"""Checkpoints as the original tools write them (tests/fixtures/originals.py): `inspect` names each,
`convert` / `merge` give a model whose logits equal the source composition computed without vlmtune,
and training continues from each."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from fixtures import originals as o
from vlmtune.cli import main

PIXELS = torch.rand(1, 3, o.IMAGE, o.IMAGE, generator=torch.Generator().manual_seed(0))
BEFORE, AFTER = [1, 40, 41], [50, 51, 52, 2]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """What users download: a Vicuna-style LLM (slow tokenizer only) and a transformers-4 CLIP folder."""
    root = tmp_path_factory.mktemp("hub")
    llm_state = o.vicuna(root / "vicuna-7b-v1.5")
    o.clip(root / "clip-vit-large-patch14-336")
    return {"llm": root / "vicuna-7b-v1.5", "vision": root / "clip-vit-large-patch14-336", "llm_state": llm_state}


def originals(kind, d, root):
    args = (root, d["llm"], d["vision"], d["llm_state"])
    return {"stage2": o.llava_stage2, "lora": o.llava_lora, "stage1": o.llava_stage1, "xtuner": o.xtuner_pth_to_hf}[kind](*args)


def converted_logits(folder, original):
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    image_tokens = (o.IMAGE // o.PATCH) ** 2 + (0 if original.drop_cls else 1)
    ids = torch.tensor([BEFORE + [model.config.image_token_id] * image_tokens + AFTER])
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=PIXELS).logits[..., :o.VOCAB]


def assert_same_logits(folder, original, atol):
    got, expected = converted_logits(folder, original), o.reference_logits(original, BEFORE, AFTER, PIXELS)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=atol), (got - expected).abs().max()


@pytest.mark.parametrize("kind, command, atol", [("stage2", "convert", 1e-4), ("lora", "convert", 1e-4),
                                                 ("stage1", "convert", 1e-4), ("xtuner", "merge", 1e-3)])
def test_each_original_converts_to_its_logits(downloads, tmp_path, capsys, kind, command, atol):
    original = originals(kind, downloads, tmp_path)
    assert main(["inspect", str(original.folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    expected = {"stage2": "original LLaVA repository folder", "lora": "original LLaVA LoRA output",
                "stage1": "original LLaVA stage-1 output", "xtuner": "XTuner pth_to_hf folder"}[kind]
    assert info["layout"].startswith(expected) and info["family"] == "llava"
    args = ["convert", str(original.folder)] if command == "convert" else ["merge", "--from", str(original.folder)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "wrote and verified" in printed
    assert_same_logits(tmp_path / "out", original, atol)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vision_feature_layer"] == original.layer
    assert config["vision_feature_select_strategy"] == ("default" if original.drop_cls else "full")
    processor = AutoProcessor.from_pretrained(tmp_path / "out")  # the slow tokenizer, converted
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi?"}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}], tokenize=False)
    assert "USER: <image>\nHi? ASSISTANT: red</s>" in text  # Vicuna v1, as LLaVA-1.5 / XTuner's vicuna trained
    if kind == "stage2":
        assert info["needs_base"]["vision_tower"]["in_checkpoint"] and set(info["components"]) == {"llm", "projector", "vision"}
        assert "float16" in info["components"]["vision"]["dtypes"]
    if kind == "lora":  # also a base to merge onto
        assert main(["merge", "--base", str(original.folder), "--out", str(tmp_path / "merged")]) == 0
        assert_same_logits(tmp_path / "merged", original, 1e-4)


def test_model_path_leftovers_name_the_convert_command(downloads, tmp_path):
    from vlmtune.convert.layouts import load_any
    from vlmtune.models.weights import ConversionError

    original = o.llava_stage2(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"], with_tower=False)
    add_tensor(original, "model.mm_resampler.weight", torch.zeros(2))
    with pytest.raises(ConversionError) as err:
        load_any(original.folder)
    assert "1 source tensor(s) not used: model.mm_resampler.weight" in str(err.value)
    assert f"convert it once with `vlmtune convert {original.folder} --allow-unused --out OUT` and use OUT" in str(err.value)


def test_lora_output_names_missing_parts_and_takes_overrides(downloads, tmp_path, capsys):
    original = o.llava_lora(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"])
    adapter = json.loads((original.folder / "adapter_config.json").read_text())
    (original.folder / "adapter_config.json").write_text(json.dumps({**adapter, "base_model_name_or_path": "lmsys/vicuna-7b-v1.5"}))
    config = json.loads((original.folder / "config.json").read_text())
    (original.folder / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    out = tmp_path / "out"
    assert main(["convert", str(original.folder), "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "base LLM (adapter_config.json base_model_name_or_path) 'lmsys/vicuna-7b-v1.5' is not a model folder" in printed
    assert "--llm DIR" in printed and not out.exists()
    assert main(["convert", str(original.folder), "--llm", str(downloads["llm"]), "--vision", str(downloads["vision"]),
                 "--chat-template", "llama_2", "--out", str(out)]) == 0
    assert_same_logits(out, original, 1e-4)
    assert "[INST]" in AutoProcessor.from_pretrained(out).chat_template
    # its checkpoint-N/ holds only the adapter (the projector is written at the end): said, not a traceback
    checkpoint = tmp_path / "checkpoint-10"
    checkpoint.mkdir()
    for name in ("adapter_model.bin", "adapter_config.json"):
        shutil.copy(original.folder / name, checkpoint / name)
    (checkpoint / "adapter_config.json").write_text(json.dumps(adapter))
    capsys.readouterr()
    assert main(["inspect", str(checkpoint), "--json"]) == 0
    assert "a text-only LLM: merge the adapter into a VLM" in json.loads(capsys.readouterr().out)["needs"]
    from vlmtune.checkpoints.load import ModelLoadError
    from vlmtune.convert.layouts import load_any

    with pytest.raises(ModelLoadError, match="a text-only LLM .llama., not on a vision-language model; merge it"):
        load_any(checkpoint)


def test_xtuner_training_checkpoints_load_without_running_anything(downloads, tmp_path, capsys):
    pth, projector = o.xtuner_iter_pth(tmp_path / "pretrain")
    deepspeed, tuned_llm, ds_projector = o.xtuner_deepspeed_dir(tmp_path / "finetune", downloads["llm_state"])
    assert main(["inspect", str(pth), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("XTuner training checkpoint") and set(info["components"]) == {"projector"}
    assert main(["inspect", str(deepspeed), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["deepspeed"] and set(info["components"]) == {"projector", "llm"}
    assert info["components"]["llm"]["dtypes"] == ["bfloat16"]
    clip_tower = o.clip_tower(downloads["vision"])
    for source, original in ((pth, o.Original(pth, llm=downloads["llm_state"], tower=clip_tower, projector=projector)),
                             (deepspeed, o.Original(deepspeed, llm=tuned_llm, tower=clip_tower, projector=ds_projector))):
        out = tmp_path / f"merged-{source.name}"
        assert main(["merge", "--llm", str(downloads["llm"]), "--vision", str(downloads["vision"]),
                     "--weights", str(source), "--out", str(out)]) == 0
        assert_same_logits(out, original, 1e-4)
    assert main(["convert", str(pth), "--out", str(tmp_path / "x")]) == 2
    assert "XTuner's training checkpoint" in capsys.readouterr().out


def test_a_pickle_that_runs_code_is_refused(tiny_vlm, tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"meta": {}, "message_hub": {}, "state_dict": {"projector.model.0.bias": torch.zeros(2)}, "x": Payload()},
               tmp_path / "iter_1.pth")
    assert main(["merge", "--base", str(tiny_vlm), "--weights", str(tmp_path / "iter_1.pth"), "--out", str(tmp_path / "o")]) == 2
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'iter_1.pth'}: refused: the pickle asks to call builtins.exec" in printed
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_mini_gemini_goes_to_the_mgm_family_never_converted_with_modules_dropped(downloads, tmp_path, capsys):
    folder = o.mini_gemini(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"])
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # the mgm family's layout comes before llava's refusal
    assert info["layout"].startswith("original Mini-Gemini folder") and info["family"] == "mgm"
    assert {"vision_aux", "mining"} <= set(info["components"])
    out = tmp_path / "out"  # this fixture's ConvNeXt has no norms or biases: refused, naming them and the flag
    assert main(["convert", str(folder), "--allow-unused", "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "not filled" in printed and "dwconv.bias" in printed and "--allow-missing" in printed and not out.exists()
    assert main(["convert", str(folder), "--allow-unused", "--allow-missing", "--out", str(out)]) == 0  # accepted, said
    printed = capsys.readouterr().out
    assert "not filled" in printed and "dwconv.bias" in printed and out.is_dir()
    shutil.rmtree(out)
    # a LLaVA folder that carries the mining modules is refused the same way, whatever the flags
    plain = o.llava_stage2(tmp_path / "p", downloads["llm"], downloads["vision"], downloads["llm_state"], with_tower=False)
    add_tensor(plain, "model.vlm_uni_query_projector.1.weight", torch.zeros(2, 2))
    assert main(["convert", str(plain.folder), "--allow-unused", "--out", str(out)]) == 2
    assert "use the mgm family" in capsys.readouterr().out and not out.exists()


def add_tensor(original, name, tensor):
    """One more tensor in a sharded original-LLaVA folder (its shard and the index)."""
    shard = original.folder / "pytorch_model-00002-of-00002.bin"
    torch.save({**torch.load(shard, weights_only=True), name: tensor}, shard)
    index = json.loads((original.folder / "pytorch_model.bin.index.json").read_text())
    index["weight_map"][name] = shard.name
    (original.folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def test_original_llava_16_is_named_never_converted_as_15(downloads, tmp_path, capsys):
    original = o.llava_stage2(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"], with_tower=False)
    add_tensor(original, "model.image_newline", torch.zeros(o.HIDDEN))
    out = tmp_path / "out"
    assert main(["convert", str(original.folder), "--allow-unused", "--out", str(out)]) == 2
    assert "LLaVA-1.6 (LLaVA-NeXT) checkpoint" in capsys.readouterr().out and not out.exists()
    config = json.loads((original.folder / "config.json").read_text())
    config.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad",
                  image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]])
    (original.folder / "config.json").write_text(json.dumps(config))
    assert main(["inspect", str(original.folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("original-repository LLaVA-1.6") and "image_newline (LLaVA-1.6)" in info["components"]
    assert main(["convert", str(original.folder), "--allow-unused", "--allow-missing", "--out", str(out)]) == 2
    assert "llava_next family" in capsys.readouterr().out and not out.exists()


def test_xtuner_transformers_export_and_remote_code(downloads, tmp_path, capsys):
    original = o.xtuner_pth_to_hf(tmp_path / "x", downloads["llm"], downloads["vision"], downloads["llm_state"])
    folder = o.xtuner_hf_llava(tmp_path, original)
    assert main(["convert", str(folder), "--chat-template", "vicuna_v1", "--out", str(tmp_path / "out")]) == 0
    assert_same_logits(tmp_path / "out", o.Original(folder, llm={k: v.half().float() for k, v in original.llm.items()},
                                                    tower={k: v.half().float() for k, v in original.tower.items()},
                                                    projector={k: v.half().float() for k, v in original.projector.items()},
                                                    layer=original.layer), 1e-4)
    remote = o.remote_code_folder(tmp_path)
    capsys.readouterr()
    for command in (["inspect", str(remote)], ["convert", str(remote), "--out", str(tmp_path / "r")]):
        assert main(command) == 2
        assert f"{remote} holds its own model code" in capsys.readouterr().out
    assert not (remote / "CODE_RAN").exists()


def test_training_continues_from_each_original(downloads, tmp_path, color_data, capsys):
    from vlmtune.config import load_config
    from vlmtune.training.run import train

    pth, _ = o.xtuner_iter_pth(tmp_path / "pretrain")
    xtuner = o.xtuner_pth_to_hf(tmp_path / "x", downloads["llm"], downloads["vision"], downloads["llm_state"])
    models = {kind: {"path": str(originals(kind, downloads, tmp_path / kind).folder)} for kind in ("stage2", "lora", "stage1")}
    models["xtuner"] = {"path": str(xtuner.folder)}
    models["xtuner-hf"] = {"path": str(o.xtuner_hf_llava(tmp_path / "hf", xtuner))}
    deepspeed, _, _ = o.xtuner_deepspeed_dir(tmp_path / "finetune", downloads["llm_state"])
    for name, weights in (("iter_pth", pth), ("deepspeed", deepspeed)):
        models[name] = {"vision": str(downloads["vision"]), "llm": str(downloads["llm"]), "weights": str(weights)}
    for name, model in models.items():
        capsys.readouterr()
        cfg = load_config(tree={"model": model, "data": {"train": str(color_data)},
                                "tune": {"vision": "frozen", "projector": "full", "llm": "lora"},
                                "train": {"max_steps": 8, "batch_size": 4, "lr": 5e-3, "logging_steps": 2, "save_steps": 0,
                                          "warmup_ratio": 0.0}, "output": {"dir": str(tmp_path / f"run-{name}")}})
        result = train(cfg)
        assert result.final_loss < result.first_loss, name
        printed = capsys.readouterr().out
        if name == "xtuner-hf":
            assert "no chat template" in printed and "data.chat_template" in printed
        if name == "stage2":
            assert "chat template: vicuna_v1" in printed
    shutil.rmtree(tmp_path / "run-stage2")


def test_a_slow_tokenizer_without_sentencepiece_says_what_to_install(downloads, tmp_path, capsys, monkeypatch):
    original = o.llava_stage2(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"], with_tower=False)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)
    monkeypatch.setitem(sys.modules, "google.protobuf", None)
    assert main(["convert", str(original.folder), "--out", str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().out
    assert f"{original.folder / 'tokenizer.model'}: a SentencePiece tokenizer" in printed
    assert "pip install sentencepiece protobuf" in printed


def test_converted_vicuna_model_encodes_exactly_as_its_processor(downloads, tmp_path):
    """The slow SentencePiece tokenizer, converted, with the Vicuna v1 template: the training ids are the
    processor's own ids for the whole conversation, and only the answers (with their </s>) are trained."""
    from conftest import make_image
    from PIL import Image

    from vlmtune.data.encode import IGNORE, SampleEncoder
    from vlmtune.data.records import Message, Sample
    from vlmtune.models.registry import family_named

    original = o.llava_stage2(tmp_path, downloads["llm"], downloads["vision"], downloads["llm_state"], with_tower=False)
    assert main(["convert", str(original.folder), "--out", str(tmp_path / "out")]) == 0
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    text = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    sample = Sample("x", "t.jsonl line 1", [
        Message("user", [{"type": "image"}] + text("What color is the image?")), Message("assistant", text("red")),
        Message("user", text("Describe the picture.")), Message("assistant", text("It is a plain square."))],
        [make_image(tmp_path / "a.png", "red")])
    encoded = SampleEncoder(processor, family_named("llava"), max_length=4096).encode(sample)
    chat = [m.chat_dict() for m in sample.messages]
    expected = processor.apply_chat_template(chat, tokenize=True, return_dict=True,
                                             images=[Image.open(sample.images[0]).convert("RGB")], return_tensors="pt")
    assert encoded.input_ids == expected["input_ids"][0].tolist()
    trained = [t for t, label in zip(encoded.input_ids, encoded.labels) if label != IGNORE]
    decoded = processor.tokenizer.decode(trained)  # "▁It" keeps its word-start space when decoded alone
    assert decoded.replace("</s> ", "</s>") == "red</s>It is a plain square.</s>"
    assert trained.count(processor.tokenizer.eos_token_id) == 2
