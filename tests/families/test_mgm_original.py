"""Original Mini-Gemini folders (stage 1: config + mm_projector.bin; stage 2: sharded MGMLlamaForCausalLM)
are recognised by `inspect`, read by `convert` and `model.path` with a per-component load report,
give the logits of an independent MGM forward on MGM's own key names, and continue training."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from families.mgm_original import RELEASED_TOWERS, VIT, original_state, write_stage1, write_stage2
from families.mgm_reference import hd_views, original_logits
from families.test_mgm import CODE, color_data, plain_logits, run, timm_convnext_state, vlmtune_inputs
from vlmtune.checkpoints.load import load_model
from vlmtune.checkpoints.inspect import describe
from vlmtune.convert.foreign import convert
from vlmtune.convert.layouts import load_any
from vlmtune.models.weights import ConversionError
from vlmtune.models.family import ConvertOptions
from vlmtune.models.registry import layout_for
from vlmtune.models import images as mm


@pytest.fixture(scope="module")
def original(parts, tmp_path_factory):
    root = tmp_path_factory.mktemp("mgm-original")
    state = original_state(parts["llm"], timm_convnext_state())
    return {"state": state, "stage2": write_stage2(root / "MGM-tiny", parts["llm"], state),
            "stage1": write_stage1(root / "MGM-tiny-pretrain", parts["llm"], state), "llm": parts["llm"],
            # MGM-HD as its config says it (MGM-7B-HD: image_size_aux 1536, image_grid 2, image_global true)
            "hd": write_stage2(root / "MGM-tiny-HD", parts["llm"], state, image_size_aux=64, image_grid=2, image_global=True)}


def original_config_tower(key: str) -> str:
    return RELEASED_TOWERS[key]


def logits_pair(loaded, state, llm_dir):
    """vlmtune's logits and the independent forward's, on one padded image between two text pieces."""
    processor = loaded.processor
    tok = processor.tokenizer
    before, after = tok("USER: ", add_special_tokens=True).input_ids, tok(" What color? ASSISTANT:", add_special_tokens=False).input_ids
    pixels = mm.image_inputs(processor, [Image.new("RGB", (40, 24), (0, 0, 255))])
    ids = before + [processor.image_token_id] * processor.num_image_tokens + after
    with torch.no_grad():
        ours = loaded.model.eval()(input_ids=torch.tensor([ids]), **pixels).logits
    config = loaded.model.config
    views = hd_views(pixels["pixel_values_aux"], VIT["image_size"], config.image_grid, config.image_global)
    assert torch.allclose(pixels["pixel_values"], views, atol=1e-6)  # the processor cuts the views as MGM does
    theirs = original_logits(state, llm_dir, VIT, views, pixels["pixel_values_aux"], before, after,
                             grid=config.image_grid, global_view=config.image_global)
    return ours[..., : theirs.shape[-1]], theirs


@pytest.mark.parametrize("stage", ["stage2", "stage1", "hd"])
def test_original_folder_loads_with_mgm_logits_and_a_load_report(original, stage):
    folder = original[stage]
    family, layout = layout_for(folder)
    assert family.name == "mgm" and layout.name.startswith("original Mini-Gemini")
    loaded = load_any(folder)
    assert loaded.family.name == "mgm" and loaded.kind == "converted"
    ours, theirs = logits_pair(loaded, original["state"], original["llm"])
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    src = loaded.sources
    assert set(src) == {"vision", "vision_aux", "mining", "projector", "llm"}
    checkpoint_file = "mm_projector.bin" if stage == "stage1" else folder.name
    assert "model.vision_tower.vision_tower.vision_model.*" in src["vision"] and checkpoint_file in src["vision"]
    assert "vision_stem|vision_stages" in src["vision_aux"] and "float16 -> float32" in src["vision_aux"]
    assert "vlm_uni_" in src["mining"] and "mm_projector" in src["projector"]
    assert src["llm"].startswith(str(original["llm"]) if stage == "stage1" else str(folder))


def test_inspect_names_the_layout_components_and_missing_towers(original, capsys):
    from vlmtune.cli import main

    info = describe(original["stage1"])
    assert info["family"] == "mgm" and info["stage"] == 1 and "mm_projector.bin" in info["layout"]
    assert set(info["components"]) == {"vision", "vision_aux", "mining", "projector"}
    assert info["components"]["vision_aux"]["dtypes"] == ["float16"]
    assert info["needs_base"]["mm_vision_tower_aux"] == {"path": original_config_tower("mm_vision_tower_aux"),
                                                         "present": False, "in_checkpoint": True}
    assert info["needs_base"]["_name_or_path"]["present"] is True
    info = describe(original["stage2"])
    assert info["architecture"] == "MGMLlamaForCausalLM" and set(info["components"]) == {
        "vision", "vision_aux", "mining", "projector", "llm"}
    assert main(["inspect", str(original["stage2"])]) == 0
    assert "original Mini-Gemini folder" in capsys.readouterr().out


def test_convert_writes_a_folder_plain_transformers_loads(original, tmp_path):
    from vlmtune.convert.export import save_converted

    loaded = convert(original["stage2"])
    out = save_converted(loaded, tmp_path / "converted", {"converted_from": str(original["stage2"])})
    assert CODE <= {p.name for p in out.iterdir()}
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["family"] == "mgm" and "vlm_uni_" in manifest["base"]["sources"]["mining"]
    from vlmtune.cli import main  # the command: convert, then verify (load, hashes, a forward pass)

    assert main(["convert", str(original["stage1"]), "--out", str(tmp_path / "cli")]) == 0
    assert CODE <= {p.name for p in (tmp_path / "cli").iterdir()}


def test_missing_llm_and_towers_are_errors_that_say_what_to_do(original, parts, tmp_path):
    state = {k: v for k, v in original["state"].items() if not k.startswith("model.vision_tower_aux")}
    write_stage2(tmp_path / "no-aux", parts["llm"], state)
    with pytest.raises(ConversionError, match="no ConvNeXt weights in the checkpoint and its mm_vision_tower_aux"):
        load_any(tmp_path / "no-aux")
    stage1 = write_stage1(tmp_path / "stage1", parts["llm"], original["state"])
    raw = json.loads((stage1 / "config.json").read_text())
    (stage1 / "config.json").write_text(json.dumps({**raw, "_name_or_path": "lmsys/vicuna-7b-v1.5"}))
    with pytest.raises(ConversionError, match="its LLM 'lmsys/vicuna-7b-v1.5' is not a folder here: give it with --llm"):
        load_any(stage1)
    assert convert(stage1, ConvertOptions(llm=parts["llm"])).sources["llm"].startswith(str(parts["llm"]))


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_original_folders_continue_training(original, stage, tmp_path):
    data = color_data(tmp_path / "data")
    tune = dict(vision="frozen", vision_aux="frozen", mining="full", projector="full",
                llm="frozen" if stage == "stage1" else "lora")
    manifest = run({"path": str(original[stage])}, tune, data, tmp_path / "out")
    assert manifest["family"] == "mgm"
    assert "vlm_uni_" in manifest["base"]["sources"]["mining"]


def test_hd_views_tokens_and_a_wrong_view_count(original):
    """MGM-HD: 2x2 crops + a global view = 5 ViT inputs per image and 5 x 4 placeholders, global first."""
    loaded = load_any(original["hd"])
    config, processor = loaded.model.config, loaded.processor
    assert (config.image_grid, config.image_global, config.image_views) == (2, True, 5)
    assert processor.num_image_tokens == 5 * (VIT["image_size"] // VIT["patch_size"]) ** 2
    pixels = mm.image_inputs(processor, [Image.new("RGB", (40, 24), (0, 0, 255))] * 2)
    assert pixels["pixel_values"].shape == (10, 3, 16, 16) and pixels["pixel_values_aux"].shape == (2, 3, 64, 64)
    features = loaded.model.get_image_features(**pixels)
    assert features.shape[:2] == (2, processor.num_image_tokens)
    with pytest.raises(ValueError, match="8 low-resolution views for 2 high-resolution image.*needs 5 per image"):
        loaded.model.get_image_features(pixel_values=pixels["pixel_values"][:8], pixel_values_aux=pixels["pixel_values_aux"])


def test_hd_folder_continues_training_and_loads_in_plain_transformers(original, tmp_path):
    data = color_data(tmp_path / "data")
    tune = dict(vision="frozen", vision_aux="frozen", mining="full", projector="full", llm="full")
    manifest = run({"path": str(original["hd"])}, tune, data, tmp_path / "out")
    assert manifest["family"] == "mgm"
    loaded = load_model(tmp_path / "out")
    assert (loaded.model.config.image_grid, loaded.model.config.image_global) == (2, True)
    inputs = vlmtune_inputs(loaded)
    assert inputs["pixel_values"].shape[0] == 5
    with torch.no_grad():
        ours = loaded.model.eval()(**inputs).logits
    assert torch.allclose(plain_logits(tmp_path / "out", inputs, tmp_path), ours, atol=1e-4)


def test_mgm_loader_quirks_are_absorbed(original, tmp_path):
    """MGM's own loader needs "mgm" in the folder name, finds `vlm_uni_*` only through a shard index and
    needs the original tower paths on disk; a renamed, single-file folder with no towers here loads."""
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "my-finetune"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (original["stage2"] / name).is_file():
            shutil.copy(original["stage2"] / name, folder / name)
    save_file({k: v.contiguous() for k, v in original["state"].items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    assert "mgm" not in folder.name.lower() and not list(folder.glob("*.index.json"))
    loaded = load_any(folder)
    assert "not in the checkpoint" not in " ".join(loaded.sources.values())  # towers from the weights, not the paths
    ours, theirs = logits_pair(loaded, original["state"], original["llm"])
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_leftover_and_missing_tensors_need_the_allow_flags(original, parts, tmp_path):
    """A tensor of no component, or a component's tensor the checkpoint lacks, stops the load with the
    flag that accepts it; with the flag it loads and the load report says what was left."""
    state = {k: v for k, v in original["state"].items() if k != "model.vlm_uni_query_projector.1.bias"}
    state["model.vision_resampler.weight"] = torch.zeros(3)
    folder = write_stage2(tmp_path / "MGM-odd", parts["llm"], state)
    with pytest.raises(ConversionError, match=r"1 source tensor\(s\) not used: model.vision_resampler.weight; .*"
                                              r"mining.query.proj.bias .*--allow-unused --allow-missing"):
        load_any(folder)
    with pytest.raises(ConversionError, match=r"1 model parameter\(s\) not filled .*mining.query.proj.bias.*--allow-missing"):
        convert(folder, ConvertOptions(allow_unused=True, command="convert"))
    loaded = convert(folder, ConvertOptions(allow_unused=True, allow_missing=True, command="convert"))
    assert any("model.vision_resampler.weight" in n for n in loaded.notes)
    assert any("model.mining.query.proj.bias" in n for n in loaded.notes)
