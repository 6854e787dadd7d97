"""Foreign layouts built from tiny random models with their real file and key names: merged and
converted models must give the logits of the source composition (adapters applied at run time)."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, CLIPVisionModel, LlamaForCausalLM

from vlmtune.cli import main
from vlmtune.models import llava

HIDDEN = 32  # the tiny LLM's and vision encoder's width (tests/conftest.py)


def lora(model, targets, seed):
    torch.manual_seed(seed)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))


def projector_state(vision_width=HIDDEN, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {"model.0.weight": torch.randn(HIDDEN, vision_width, generator=g) * 0.1, "model.0.bias": torch.randn(HIDDEN, generator=g) * 0.1,
            "model.2.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.1, "model.2.bias": torch.randn(HIDDEN, generator=g) * 0.1}


@pytest.fixture(scope="module")
def xtuner(parts, tmp_path_factory):
    """An XTuner pth_to_hf folder: llm_adapter/, visual_encoder_adapter/, projector/ (fp16 .bin), xtuner_config.py."""
    root = tmp_path_factory.mktemp("xtuner") / "llava-tiny-xtuner"
    lora(LlamaForCausalLM.from_pretrained(parts["llm"]), ["q_proj", "v_proj", "down_proj"], 1).save_pretrained(root / "llm_adapter")
    lora(CLIPVisionModel.from_pretrained(parts["vision"]), ["q_proj", "v_proj", "fc1"], 2).save_pretrained(root / "visual_encoder_adapter")
    (root / "projector").mkdir()
    (root / "projector" / "config.json").write_text(json.dumps({
        "architectures": ["ProjectorModel"], "model_type": "projector", "auto_map": {"AutoModel": "modeling_projector.ProjectorModel"},
        "visual_hidden_size": HIDDEN, "llm_hidden_size": HIDDEN, "depth": 2, "hidden_act": "gelu", "bias": True}))
    torch.save({k: v.half() for k, v in projector_state().items()}, root / "projector" / "pytorch_model.bin")
    (root / "xtuner_config.py").write_text(
        f"llm_name_or_path = '{parts['llm']}'\nvisual_encoder_name_or_path = '{parts['vision']}'\n"
        "model = dict(type='LLaVAModel', freeze_llm=True, freeze_visual_encoder=True)\n")
    return root


def inputs(model):
    ids = torch.tensor([[1, *[model.config.image_token_id] * 4, 10, 11, 12, 13]])
    return {"input_ids": ids, "pixel_values": torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))}


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(**batch).logits


def composition(parts, base=None, llm_adapter=None, vision_adapter=None, projector=None):
    """The unmerged source: a LLaVA shell whose LLM / vision tower are PEFT-wrapped modules."""
    model = AutoModelForImageTextToText.from_pretrained(base) if base else llava.build(str(parts["vision"]), str(parts["llm"]))[0]
    if projector is not None:
        p = model.model.multi_modal_projector
        with torch.no_grad():
            for ours, theirs in (("linear_1", "model.0"), ("linear_2", "model.2")):
                getattr(p, ours).weight.copy_(projector[f"{theirs}.weight"].float())
                getattr(p, ours).bias.copy_(projector[f"{theirs}.bias"].float())
    if llm_adapter:
        peft_llm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(parts["llm"]), llm_adapter)
        model.model.language_model = peft_llm.base_model.model.model
        model.lm_head = peft_llm.base_model.model.lm_head
    if vision_adapter:
        model.model.vision_tower = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(parts["vision"]), vision_adapter).base_model.model
    return model


def test_merge_xtuner_folder_matches_the_unmerged_composition(parts, xtuner, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", "--from", str(xtuner), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "(from xtuner_config.py `llm_name_or_path`)" in printed and "wrote and verified" in printed
    merged = AutoModelForImageTextToText.from_pretrained(out)
    reference = composition(parts, llm_adapter=xtuner / "llm_adapter", vision_adapter=xtuner / "visual_encoder_adapter",
                            projector=torch.load(xtuner / "projector" / "pytorch_model.bin", weights_only=True))
    batch = inputs(merged)
    assert torch.allclose(logits(merged, batch), logits(reference, batch), atol=1e-4)
    plain = llava.build(str(parts["vision"]), str(parts["llm"]))[0]
    assert not torch.allclose(logits(merged, batch), logits(plain, batch), atol=1e-3)  # the parts did change it
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["merged_from"]["llm_adapter"] == str(xtuner / "llm_adapter")


@pytest.mark.parametrize("which", ["llm", "vision", "both"])
def test_merge_adapters_onto_a_base(parts, xtuner, tiny_vlm, tmp_path, which):
    args = ["merge", "--base", str(tiny_vlm), "--out", str(tmp_path / "out")]
    llm_adapter = xtuner / "llm_adapter" if which in ("llm", "both") else None
    vision_adapter = xtuner / "visual_encoder_adapter" if which in ("vision", "both") else None
    args += ["--llm-adapter", str(llm_adapter)] if llm_adapter else []
    args += ["--vision-adapter", str(vision_adapter)] if vision_adapter else []
    assert main(args) == 0
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    reference = composition(parts, base=tiny_vlm, llm_adapter=llm_adapter, vision_adapter=vision_adapter)
    batch = inputs(merged)
    assert torch.allclose(logits(merged, batch), logits(reference, batch), atol=1e-4)


def test_mismatched_parts_are_refused_and_nothing_is_written(parts, tiny_vlm, tmp_path, capsys):
    wide = LlamaForCausalLM(LlamaForCausalLM.from_pretrained(parts["llm"]).config.__class__(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, vocab_size=200))
    lora(wide, ["q_proj"], 4).save_pretrained(tmp_path / "wide_adapter")
    out = tmp_path / "out"
    assert main(["merge", "--base", str(tiny_vlm), "--llm-adapter", str(tmp_path / "wide_adapter"), "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "self_attn.q_proj.lora_A.weight has shape (4, 48)" in printed and "needs (4, 32)" in printed
    assert "trained on a different base" in printed and not out.exists()
    torch.save(projector_state(vision_width=48), tmp_path / "mm_projector.bin")
    assert main(["merge", "--base", str(tiny_vlm), "--projector", str(tmp_path / "mm_projector.bin"), "--out", str(out)]) == 2
    printed = capsys.readouterr().out
    assert "projector tensor linear_1.weight has shape (32, 48) but the model needs (32, 32)" in printed
    assert "another vision encoder" in printed and not out.exists()


def original_llava_folder(parts, root, with_tower: bool, extra: dict | None = None):
    """The original LLaVA repository's layout: Llama keys + model.mm_projector.0/2 (+ the tower)."""
    root.mkdir(parents=True)
    llm = LlamaForCausalLM.from_pretrained(parts["llm"])
    config = {**llm.config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
              "mm_vision_tower": str(parts["vision"]), "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
              "mm_vision_select_feature": "patch", "mm_hidden_size": HIDDEN, "image_aspect_ratio": "pad",
              "tune_mm_mlp_adapter": False}
    (root / "config.json").write_text(json.dumps(config))
    state = dict(llm.state_dict())
    state.update({f"model.mm_projector.{k.removeprefix('model.')}": v for k, v in projector_state().items()})
    tower = None
    if with_tower:
        tower = {k: v + 0.01 for k, v in CLIPVisionModel.from_pretrained(parts["vision"]).state_dict().items()}
        state.update({f"model.vision_tower.vision_tower.{k}": v for k, v in tower.items()})
    state.update(extra or {})
    torch.save(state, root / "pytorch_model.bin")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(parts["llm"] / name, root / name)
    return root, tower


@pytest.mark.parametrize("with_tower", [False, True])
def test_convert_original_llava_layout(parts, tmp_path, with_tower):
    source, tower = original_llava_folder(parts, tmp_path / "llava-v1.5-tiny", with_tower)
    assert main(["convert", str(source), "--out", str(tmp_path / "hf")]) == 0
    converted = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    reference = composition(parts, projector=projector_state())
    if tower:
        reference.model.vision_tower.load_state_dict(tower)
    batch = inputs(converted)
    assert torch.allclose(logits(converted, batch), logits(reference, batch), atol=1e-5)


def test_convert_lists_unused_keys_as_an_error(parts, tmp_path, capsys):
    source, _ = original_llava_folder(parts, tmp_path / "src", False, extra={"model.mm_resampler.weight": torch.zeros(2)})
    assert main(["convert", str(source), "--out", str(tmp_path / "hf")]) == 2
    assert "1 source tensor(s) not used: model.mm_resampler.weight" in capsys.readouterr().out
    assert not (tmp_path / "hf").exists()
    assert main(["convert", str(source), "--allow-unused", "--out", str(tmp_path / "hf")]) == 0


def test_convert_stage1_projector_file(parts, tmp_path):
    torch.save({f"model.mm_projector.{k.removeprefix('model.')}": v for k, v in projector_state().items()},
               tmp_path / "mm_projector.bin")
    assert main(["convert", str(tmp_path / "mm_projector.bin"), "--vision", str(parts["vision"]), "--llm", str(parts["llm"]),
                 "--out", str(tmp_path / "hf")]) == 0
    converted = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf")
    batch = inputs(converted)
    assert torch.allclose(logits(converted, batch), logits(composition(parts, projector=projector_state()), batch), atol=1e-5)


def test_convert_both_transformers_key_namings(tiny_vlm, tmp_path):
    source = tmp_path / "new-naming"
    shutil.copytree(tiny_vlm, source)
    original = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    save_file({k: v.contiguous() for k, v in original.state_dict().items()}, str(source / "model.safetensors"),
              metadata={"format": "pt"})
    assert all(k.startswith(("model.", "lm_head.")) for k in load_file(str(source / "model.safetensors")))
    for folder in (tiny_vlm, source):
        out = tmp_path / f"hf-{folder.name}"
        assert main(["convert", str(folder), "--out", str(out)]) == 0
        converted = AutoModelForImageTextToText.from_pretrained(out)
        batch = inputs(converted)
        assert torch.equal(logits(converted, batch), logits(original, batch))


def test_export_formats_round_trip(tiny_vlm, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    expected = model.state_dict()
    assert main(["export", str(tiny_vlm), "--format", "pth", "--out", str(tmp_path / "model.pth")]) == 0
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert main(["export", str(tiny_vlm), "--format", "safetensors", "--dtype", "bf16", "--out", str(tmp_path / "m.safetensors")]) == 0
    half = load_file(str(tmp_path / "m.safetensors"))
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k].bfloat16()) for k, v in half.items())
    assert main(["export", str(tiny_vlm), "--format", "hf", "--dtype", "fp16", "--out", str(tmp_path / "hf16")]) == 0
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf16", dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.float16


def test_train_continues_from_foreign_layouts(parts, xtuner, tmp_path, color_data, capsys):
    from vlmtune.config import load_config
    from vlmtune.training.run import train

    original, _ = original_llava_folder(parts, tmp_path / "llava-original", with_tower=False)
    for source in (xtuner, original):
        capsys.readouterr()
        cfg = load_config(tree={"model": {"path": str(source)}, "data": {"train": str(color_data)},
                                "tune": {"vision": "frozen", "projector": "full", "llm": "lora"},
                                "train": {"max_steps": 12, "batch_size": 4, "lr": 5e-3, "logging_steps": 2, "save_steps": 0,
                                          "warmup_ratio": 0.0},
                                "output": {"dir": str(tmp_path / f"run-{source.name}")}})
        result = train(cfg)
        assert result.final_loss < result.first_loss
        printed = capsys.readouterr().out
        assert f"LoRA {xtuner / 'llm_adapter'} (merged)" in printed if source == xtuner else "model.mm_projector" in printed
        assert (tmp_path / f"run-{source.name}" / "base" / "model.safetensors").is_file()  # the converted base, kept


def test_inspect_recognises_foreign_layouts(parts, xtuner, tmp_path, capsys):
    assert main(["inspect", str(xtuner), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("XTuner") and info["parts"]["llm_adapter"] and info["needs_base"]["llm_name_or_path"]["present"]
    original, _ = original_llava_folder(parts, tmp_path / "orig", with_tower=True)
    assert main(["inspect", str(original), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"].startswith("original LLaVA") and info["needs_base"]["vision_tower"]["in_checkpoint"]
    assert set(info["components"]) == {"llm", "projector", "vision"}
    torch.save({f"model.mm_projector.{k.removeprefix('model.')}": v for k, v in projector_state().items()}, tmp_path / "mm_projector.bin")
    assert main(["inspect", str(tmp_path / "mm_projector.bin"), "--json"]) == 0
    assert "stage-1 projector" in json.loads(capsys.readouterr().out)["layout"]


def test_state_dict_files_round_trip_through_merge(tiny_vlm, parts, tmp_path, capsys):
    trained = tmp_path / "trained"
    shutil.copytree(tiny_vlm, trained)
    model = AutoModelForImageTextToText.from_pretrained(trained)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(trained)
    (trained / "vlmtune.json").unlink()  # changed by hand: no longer what a manifest describes
    for fmt in ("pth", "xtuner-pth"):
        exported = tmp_path / f"model-{fmt}.pth"
        assert main(["export", str(trained), "--format", fmt, "--out", str(exported)]) == 0
        keys = torch.load(exported, weights_only=True).keys()
        assert any(k.startswith("projector.model.0.") for k in keys) == (fmt == "xtuner-pth")
        out = tmp_path / f"merged-{fmt}"
        assert main(["merge", "--base", str(tiny_vlm), "--weights", str(exported), "--out", str(out)]) == 0
        merged = AutoModelForImageTextToText.from_pretrained(out)
        batch = inputs(merged)
        assert torch.equal(logits(merged, batch), logits(model, batch))
    partial = {k: v for k, v in torch.load(tmp_path / "model-xtuner-pth.pth", weights_only=True).items()
               if k.startswith("projector.")}  # XTuner iter_N.pth: only the trained projector
    torch.save({"state_dict": partial}, tmp_path / "iter_500.pth")
    capsys.readouterr()
    assert main(["merge", "--base", str(tiny_vlm), "--weights", str(tmp_path / "iter_500.pth"), "--out", str(tmp_path / "p")]) == 0
    assert f"projector  {tmp_path / 'iter_500.pth'} (state dict)" in capsys.readouterr().out
    torch.save({"llm.model.layers.0.self_attn.q_proj.lora_A.default.weight": torch.zeros(4, 32)}, tmp_path / "lora.pth")
    assert main(["merge", "--base", str(tiny_vlm), "--weights", str(tmp_path / "lora.pth"), "--out", str(tmp_path / "q")]) == 2
    assert "holds LoRA tensors" in capsys.readouterr().out and not (tmp_path / "q").exists()


def test_train_from_a_stage1_projector_file_and_a_state_dict(parts, tiny_vlm, tmp_path, color_data, capsys):
    from vlmtune.config import load_config
    from vlmtune.training.run import train

    torch.save({f"model.mm_projector.{k.removeprefix('model.')}": v for k, v in projector_state().items()},
               tmp_path / "mm_projector.bin")
    torch.save({k: v for k, v in AutoModelForImageTextToText.from_pretrained(tiny_vlm).state_dict().items()
                if "multi_modal_projector" in k}, tmp_path / "projector_only.pth")
    for name, model in (("stage1", {"vision": str(parts["vision"]), "llm": str(parts["llm"]),
                                    "projector_weights": str(tmp_path / "mm_projector.bin")}),
                        ("weights", {"path": str(tiny_vlm), "weights": str(tmp_path / "projector_only.pth")})):
        capsys.readouterr()
        cfg = load_config(tree={"model": model, "data": {"train": str(color_data)}, "tune": {"llm": "lora"},
                                "train": {"max_steps": 10, "batch_size": 4, "lr": 5e-3, "logging_steps": 2,
                                          "save_steps": 0, "warmup_ratio": 0.0},
                                "output": {"dir": str(tmp_path / name)}})
        result = train(cfg)
        assert result.final_loss < result.first_loss
        printed = capsys.readouterr().out
        expected = str(tmp_path / "mm_projector.bin") if name == "stage1" else f"{tmp_path / 'projector_only.pth'} (state dict)"
        assert f"projector  {expected}" in printed
        assert (tmp_path / name / "base" / "model.safetensors").is_file()


def test_convert_lists_unfilled_parameters(parts, tmp_path, capsys):
    source, _ = original_llava_folder(parts, tmp_path / "src", False)
    state = torch.load(source / "pytorch_model.bin", weights_only=True)
    del state["model.layers.1.mlp.up_proj.weight"]
    torch.save(state, source / "pytorch_model.bin")
    assert main(["convert", str(source), "--out", str(tmp_path / "hf")]) == 2
    assert "1 model parameter(s) not filled (they would keep a new random init): model.layers.1.mlp.up_proj.weight" in capsys.readouterr().out
    assert not (tmp_path / "hf").exists()


def test_merge_applies_modules_to_save_of_vlmtunes_own_lora_output(tiny_vlm, color_data, tmp_path, capsys):
    """examples/stage2_lora.yaml: LoRA on the LLM, the projector fully trained and saved as `modules_to_save`."""
    from vlmtune.config import load_config
    from vlmtune.training.run import train

    run = tmp_path / "lora"
    train(load_config(tree={"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data)},
                            "tune": {"llm": "lora", "projector": "full"},
                            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "save_steps": 0},
                            "output": {"dir": str(run)}}))
    capsys.readouterr()
    out = tmp_path / "merged"
    assert main(["merge", "--base", str(tiny_vlm), "--llm-adapter", str(run), "--out", str(out)]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    reference = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(tiny_vlm), run)
    trained = load_file(str(run / "adapter_model.safetensors"))
    projector = merged.model.multi_modal_projector.linear_1.weight
    assert torch.equal(projector, trained["base_model.model.model.multi_modal_projector.linear_1.weight"])
    assert not torch.equal(projector, base.model.multi_modal_projector.linear_1.weight)
    batch = inputs(merged)
    assert torch.allclose(logits(merged, batch), logits(reference, batch), atol=1e-5)

    state = load_file(str(run / "adapter_model.safetensors"))
    key = next(k for k in state if "q_proj.lora_A" in k)
    state[key.replace("q_proj", "qq_proj")] = state.pop(key)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    save_file(state, str(broken / "adapter_model.safetensors"))
    assert main(["merge", "--base", str(tiny_vlm), "--llm-adapter", str(broken), "--out", str(tmp_path / "x")]) == 2
    layer = key.removeprefix("base_model.model.").replace("q_proj", "qq_proj").rpartition(".lora_")[0]
    assert f"targets layer {layer}, which the base does not have as a linear layer" in capsys.readouterr().out


def test_out_of_the_wrong_kind_is_refused_before_loading(tiny_vlm, tmp_path, capsys):
    existing = tmp_path / "model.pth"
    existing.write_text("keep me")
    for argv in (["export", str(tiny_vlm), "--format", "hf", "--out", str(existing)],
                 ["merge", "--base", str(tiny_vlm), "--out", str(existing)],
                 ["convert", str(tiny_vlm), "--out", str(existing)]):
        assert main(argv) == 2
        assert f"--out {existing} is an existing file, and this writes a model folder; choose a new folder path" \
            in capsys.readouterr().out
    assert main(["export", str(tiny_vlm), "--format", "pth", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder, and this format writes one file; give a file path" in capsys.readouterr().out
    assert existing.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]
