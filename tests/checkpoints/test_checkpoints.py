"""Checkpoints that always load: exact file sets, manifests, verify, delta bases, continue training."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.checkpoints.inspect import describe
from vlmtune.checkpoints.load import ModelLoadError, load_model
from vlmtune.checkpoints.manifest import MANIFEST, sha256_file
from vlmtune.checkpoints.verify import verify
from vlmtune.cli import main
from vlmtune.config import load_config
from vlmtune.training.run import train

PROCESSOR_FILES = {"processor_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json", MANIFEST}
TRAINER_STATE = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}
WEIGHTS = {"full": {"config.json", "model.safetensors"}, "lora": {"adapter_config.json", "adapter_model.safetensors", "README.md"},
           "delta": {"config.json", "delta.safetensors"}}


def run(model, data, out, save="full", steps=4, **tune):
    cfg = load_config(tree={"model": {"path": str(model)}, "data": {"train": str(data)}, "tune": tune,
                            "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-3, "save_steps": 2, "logging_steps": 1},
                            "output": {"dir": str(out), "save": save}})
    return train(cfg)


MODES = [  # (vision, projector, llm) -> kind of folder
    (("full", "frozen", "frozen"), "full"),
    (("frozen", "full", "frozen"), "full"),
    (("frozen", "full", "lora"), "lora"),
    (("lora", "frozen", "frozen"), "lora"),
]


@pytest.mark.parametrize("modes,kind", MODES, ids=["vision-only", "projector-only", "llm-lora", "vision-lora"])
def test_every_checkpoint_is_complete_verified_and_continues(tiny_vlm, color_data, tmp_path, modes, kind):
    out = tmp_path / "run"
    run(tiny_vlm, color_data, out, **dict(zip(("vision", "projector", "llm"), modes)))
    files = {p.name for p in out.iterdir()}
    assert files == WEIGHTS[kind] | PROCESSOR_FILES | {"checkpoint-2", "checkpoint-4", "trainer_log.jsonl", "loss.png"}
    for step in (2, 4):
        checkpoint = out / f"checkpoint-{step}"
        assert {p.name for p in checkpoint.iterdir()} == WEIGHTS[kind] | PROCESSOR_FILES | TRAINER_STATE
        manifest = json.loads((checkpoint / MANIFEST).read_text())
        assert manifest["state"]["step"] == step and manifest["kind"] == kind
        assert manifest["files"]["trainer_state.json"] == sha256_file(checkpoint / "trainer_state.json")
        assert {c: v["mode"] for c, v in manifest["components"].items()} == dict(zip(("vision", "projector", "llm"), modes))
        assert verify(checkpoint).ok
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["base"]["fingerprint"] and manifest["data"]["fingerprint"] and manifest["versions"]["peft"]
    assert set(manifest["files"]) == WEIGHTS[kind] | PROCESSOR_FILES - {MANIFEST}
    # continue: a new run whose model is this output
    again = run(out, color_data, tmp_path / "continued", llm="full", projector="full")
    assert again.steps == 4 and load_model(tmp_path / "continued").kind == "full"


def test_corrupted_byte_fails_verify_naming_the_file(tiny_vlm, color_data, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_vlm, color_data, out, vision="full", projector="full", llm="full")
    assert main(["verify", str(out)]) == 0
    weights = out / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-10] ^= 0xFF
    weights.write_bytes(bytes(blob))
    assert main(["verify", str(out)]) == 1
    printed = capsys.readouterr().out
    assert f"{weights}: sha256 differs" in printed and "FAILED" in printed


def test_delta_holds_only_tuned_components_and_checks_its_base(tiny_vlm, color_data, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_vlm, base)
    out = tmp_path / "delta"
    run(base, color_data, out, save="delta", vision="full", projector="frozen", llm="frozen")
    delta = load_file(str(out / "delta.safetensors"))
    assert delta and all(k.startswith("model.vision_tower.") for k in delta)
    full = run(tiny_vlm, color_data, tmp_path / "full", vision="full", projector="frozen", llm="frozen")
    assert full.steps == 4
    loaded = load_model(out)
    assert loaded.kind == "delta" and loaded.sources["vision"].endswith("(delta)")
    reference = load_model(tmp_path / "full").model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())  # same seed, same run
    assert verify(out).ok and describe(out)["needs_base"] == {"path": str(base.resolve()), "present": True}

    (base / "config.json").write_text((base / "config.json").read_text().replace('"projector_hidden_act": "gelu"',
                                                                                   '"projector_hidden_act": "relu"'))
    with pytest.raises(ModelLoadError, match="not the base it was trained from"):
        load_model(out)
    shutil.rmtree(base)
    with pytest.raises(ModelLoadError, match=f"needs its base model {base.resolve()}"):
        load_model(out)


def test_continue_report_names_sources(tiny_vlm, color_data, tmp_path, capsys):
    out = tmp_path / "lora"
    run(tiny_vlm, color_data, out, vision="frozen", projector="full", llm="lora")
    capsys.readouterr()
    run(out, color_data, tmp_path / "next", llm="full")
    printed = capsys.readouterr().out
    assert f"loaded {out} (lora, base {tiny_vlm.resolve()})" in printed
    assert f"projector  {out} (fully trained, saved with the adapter)" in printed
    assert f"llm        {tiny_vlm.resolve()} + LoRA from {out}" in printed
    assert f"vision     {tiny_vlm.resolve()}" in printed


def test_inspect_json(tiny_vlm, color_data, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_vlm, color_data, out, vision="lora", projector="full", llm="frozen")
    capsys.readouterr()
    assert main(["inspect", str(out / "checkpoint-2"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("PEFT LoRA adapter") and info["family"] == "llava"
    assert info["tuned"] == {"vision": "lora", "projector": "full", "llm": "frozen"}
    assert info["trainer_state"]["step"] == 2 and info["needs_base"]["present"]
    assert set(info["components"]) == {"vision", "projector"}  # LoRA on vision + the saved projector
    assert main(["inspect", str(tiny_vlm / "model.safetensors"), "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)["components"]) == {"vision", "projector", "llm"}


def test_lora_run_writes_a_merged_model_with_the_same_logits(tiny_vlm, color_data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data)},
                            "tune": {"vision": "lora", "projector": "full", "llm": "lora"},
                            "train": {"max_steps": 4, "batch_size": 4, "lr": 5e-3, "save_steps": 0},
                            "output": {"dir": str(out), "merge": True}})
    train(cfg)
    merged = AutoModelForImageTextToText.from_pretrained(out / "merged").eval()
    composed = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm), out).eval()
    ids = torch.tensor([[1, *[merged.config.image_token_id] * 4, 10, 11, 12]])
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = composed(input_ids=ids, pixel_values=pixels).logits
        got = merged(input_ids=ids, pixel_values=pixels).logits
    assert torch.allclose(expected, got, atol=1e-5) and not torch.allclose(expected, torch.zeros_like(expected))
    assert json.loads((out / "merged" / MANIFEST).read_text())["merged_from"] == str(out)
    assert verify(out / "merged").ok


def test_load_report_explains_missing_weights(tiny_vlm, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "no-projector"
    shutil.copytree(tiny_vlm, folder)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if "multi_modal_projector" not in k}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / MANIFEST).unlink()  # changed by hand: no longer what a manifest describes
    loaded = load_model(folder)
    assert loaded.sources["projector"].startswith("NEWLY INITIALISED (4 tensor(s) not in")
    assert loaded.sources["vision"] == str(folder)


def test_overwriting_a_folder_leaves_no_weights_of_the_old_kind(tiny_vlm, color_data, tmp_path):
    out = tmp_path / "run"
    run(tiny_vlm, color_data, out, vision="full", projector="full", llm="full")
    assert (out / "model.safetensors").is_file()
    cfg = load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data)}, "tune": {"llm": "lora"},
                            "train": {"max_steps": 2, "batch_size": 4, "save_steps": 0},
                            "output": {"dir": str(out), "overwrite": True}})
    train(cfg)
    assert not (out / "model.safetensors").exists() and (out / "adapter_model.safetensors").is_file()
    assert load_model(out).kind == "lora" and verify(out).ok
