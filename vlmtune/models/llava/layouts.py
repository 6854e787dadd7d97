"""The foreign layouts the llava family reads, as registry entries (first match wins): how each is
recognised, loaded (converted in memory) and described for `vlmtune inspect`."""

from __future__ import annotations

import zipfile
from collections import defaultdict
from pathlib import Path

from vlmtune.models.family import ConversionError, ConvertOptions, Layout, LoadOptions
from vlmtune.models.llava import convert as original
from vlmtune.models.llava.merge import is_xtuner_folder, merge_parts, xtuner_config_values, xtuner_parts

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pth", "*.pt")
NOT_WEIGHTS = ("training_args.bin",)


def tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of a weight file or folder, without reading the tensors' data."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, "pt") as fh:
            return {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    state = _read(path, map_location="meta")
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()}


def _read(path, map_location="cpu"):
    from vlmtune.models.weights import read_state_dict

    return read_state_dict(path, map_location)


def _folder_shapes(folder: Path, skip=()) -> dict:
    tensors = {}
    for pattern in WEIGHT_GLOBS:
        for file in sorted(folder.glob(pattern)):
            if file.name not in NOT_WEIGHTS and file.name not in skip:
                tensors.update(tensor_shapes(file))
    return tensors


def group(tensors: dict, component_of) -> dict[str, dict]:
    groups: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "params": 0, "dtypes": set()})
    for key, (shape, dtype) in tensors.items():
        entry = groups[component_of(key)]
        entry["tensors"] += 1
        count = 1
        for size in shape:
            count *= size
        entry["params"] += count
        entry["dtypes"].add(dtype)
    return {c: {**g, "dtypes": sorted(g["dtypes"])} for c, g in groups.items()}


def _original_component(key: str) -> str:
    key = key.removeprefix("base_model.model.")
    if "mm_projector" in key:
        return "projector"
    if key.startswith(original.MGM_MODULES):
        return "mgm (auxiliary tower, mining)"
    if key.startswith(original.NEXT_MODULES):
        return "image_newline (LLaVA-1.6)"
    if "vision_tower" in key:
        return "vision"
    return "llm (LoRA)" if "lora_" in key else "llm"


def _present(name) -> dict:
    return {"path": name, "present": bool(name) and (Path(str(name)) / "config.json").is_file()}


# ---------------------------------------------------------------- detection

def _original_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and original.is_original_config(original.read_config(path))


def has_model_weights(folder: Path) -> bool:
    return any(f.name not in NOT_WEIGHTS and f.name not in ("mm_projector.bin", "non_lora_trainables.bin")
               and not f.name.startswith("adapter_model") for p in WEIGHT_GLOBS for f in folder.glob(p))


def is_lora_output(path: Path) -> bool:
    return _original_folder(path) and (path / "adapter_config.json").is_file()


def is_stage1_output(path: Path) -> bool:
    return _original_folder(path) and (path / "mm_projector.bin").is_file() and not has_model_weights(path)


def is_full_original(path: Path) -> bool:
    return _original_folder(path) and not is_lora_output(path) and not is_stage1_output(path) and not original.is_mgm(path)


def is_next_folder(path: Path) -> bool:
    return _original_folder(path) and original.is_original_next(original.read_config(path))


def is_mgm_folder(path: Path) -> bool:
    return path.is_dir() and original.is_mgm(path)


def is_transformers4_llava(path: Path) -> bool:
    """A transformers LLaVA folder whose processor does not say how many tokens an image takes, or that
    has no chat template (transformers 4 before 4.47; XTuner's `--save-format huggingface`)."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    config = original.read_config(path)
    return config.get("model_type") == "llava" and (not original.processor_complete(path)
                                                     or not original.chat_template_saved(path))


def is_xtuner_checkpoint(path: Path) -> bool:
    """XTuner's training checkpoint: an mmengine `iter_N.pth` (a torch zip whose pickle names the
    runner's `meta` and `message_hub`), or the DeepSpeed folder `iter_N.pth/` of the same name."""
    if path.is_dir():
        from vlmtune.models.weights import deepspeed_states

        return path.suffix == ".pth" and deepspeed_states(path) is not None
    if not (path.is_file() and path.suffix == ".pth" and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if not pickles:
            return False
        data = archive.read(pickles[0])
    return b"message_hub" in data and b"state_dict" in data


# ---------------------------------------------------------------- loading

def _load_xtuner(path: Path, options: LoadOptions, convert: ConvertOptions = ConvertOptions()):
    from vlmtune.models.parts import Parts

    parts = xtuner_parts(path, Parts(llm=convert.llm, vision=convert.vision, chat_template=convert.chat_template))
    return merge_parts(parts, None, options)


def _refuse_checkpoint(path: Path, *args, **kwargs):
    raise ConversionError(
        f"{path} is XTuner's training checkpoint: a state dict of the trained parts only, not a model. Train from "
        "its base with `model.path: BASE` + `model.weights: " + str(path) + "`, or write one model with "
        f"`vlmtune merge --base BASE --weights {path} --out OUT` (or --llm LLM --vision VISION instead of --base)")


# ---------------------------------------------------------------- descriptions

def _describe_original(path: Path) -> dict:
    config = original.read_config(path)
    tensors = _folder_shapes(path)
    tower = config.get("mm_vision_tower")
    layer, drop_cls = original.feature_choice(config)
    template, why = original.conversation_template(config, path, None)
    info = {"architecture": (config.get("architectures") or ["?"])[0], "projector_type": config.get("mm_projector_type"),
            "vision_feature_layer": layer, "cls_token": "dropped" if drop_cls else "kept",
            "chat_template": f"{template} ({why})",
            "needs_base": {"vision_tower": {**_present(tower), "in_checkpoint": any("vision_tower" in k for k in tensors)}},
            "components": group(tensors, _original_component), "files": sorted(p.name for p in path.iterdir())}
    if (path / "adapter_config.json").is_file():
        import json

        adapter = json.loads((path / "adapter_config.json").read_text())
        info["needs_base"]["llm"] = _present(adapter.get("base_model_name_or_path"))
        info["adapter"] = {"r": adapter.get("r"), "alpha": adapter.get("lora_alpha"), "targets": adapter.get("target_modules")}
    elif is_stage1_output(path):
        info["needs_base"]["llm"] = _present(config.get("_name_or_path"))
    return info


def _describe_refused(path: Path) -> dict:
    """Mini-Gemini and LLaVA-1.6 folders: what they hold, for a refusal that says why."""
    config = original.read_config(path)
    return {"family": None,  # recognised by the llava family, but not one it reads
            "architecture": (config.get("architectures") or ["?"])[0], "aux_tower": config.get("mm_vision_tower_aux"),
            "image_aspect_ratio": config.get("image_aspect_ratio"), "mm_patch_merge_type": config.get("mm_patch_merge_type"),
            "components": group(_folder_shapes(path), _original_component), "files": sorted(p.name for p in path.iterdir())}


def _describe_xtuner(path: Path) -> dict:
    named = xtuner_config_values(path)
    return {"parts": {name: (path / name).exists() for name in ("llm_adapter", "visual_encoder_adapter", "visual_encoder",
                                                                "projector", "config.json")},
            "needs_base": {key: _present(named[key]) for key in ("llm_name_or_path", "visual_encoder_name_or_path")
                           if key in named},
            "components": {}, "files": sorted(p.name for p in path.iterdir())}


def _describe_transformers4(path: Path) -> dict:
    from vlmtune.models.llava.family import LLAVA

    config = original.read_config(path)
    return {"architecture": (config.get("architectures") or ["?"])[0],
            "transformers_version": config.get("transformers_version"),
            "chat_template": "saved" if original.chat_template_saved(path) else "none (give --chat-template)",
            "components": group(_folder_shapes(path), lambda k: LLAVA.component_of(LLAVA.canonical_key(k)) or "other"),
            "files": sorted(p.name for p in path.iterdir())}


def _describe_checkpoint(path: Path) -> dict:
    from vlmtune.models.llava.family import LLAVA

    tensors = tensor_shapes(path) if path.is_file() else {k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
                                                          for k, v in _read(path, "meta").items()}
    return {"components": group(tensors, lambda k: LLAVA.component_of(LLAVA.canonical_key(k))
                                or ("lora" if "lora_" in k else k.split(".")[0])),
            "deepspeed": path.is_dir()}


LAYOUTS = (
    Layout("Mini-Gemini checkpoint", is_mgm_folder, original.refuse_mgm, _describe_refused,
           hint="not convertible to LLaVA: it has modules LLaVA lacks; use the mgm family"),
    Layout("original-repository LLaVA-1.6 folder (anyres)", is_next_folder, original.refuse_next, _describe_refused,
           hint="not convertible to LLaVA-1.5: anyres tiling and image_newline; see the llava_next family"),
    Layout("original LLaVA LoRA output (adapter + non_lora_trainables.bin)", is_lora_output, original.convert_lora_output,
           _describe_original, hint="vlmtune convert DIR --out OUT, or model.path: DIR"),
    Layout("original LLaVA stage-1 output (config.json + mm_projector.bin)", is_stage1_output, original.convert_stage1,
           _describe_original, hint="vlmtune convert DIR --out OUT, or model.path: DIR"),
    Layout("original LLaVA repository folder", is_full_original, original.convert_original, _describe_original,
           hint="vlmtune convert DIR --out OUT, or model.path: DIR"),
    Layout("XTuner pth_to_hf folder", is_xtuner_folder, _load_xtuner, _describe_xtuner,
           hint="vlmtune merge --from DIR --out OUT, or model.path: DIR", parts=xtuner_parts),
    Layout("transformers 4 LLaVA folder without a complete processor or chat template", is_transformers4_llava,
           original.convert_transformers4, _describe_transformers4,
           hint="vlmtune convert DIR [--chat-template NAME] --out OUT, or model.path: DIR"),
    Layout("XTuner training checkpoint (iter_N.pth)", is_xtuner_checkpoint, _refuse_checkpoint, _describe_checkpoint,
           hint="a state dict: vlmtune merge --base BASE --weights FILE, or model.weights: FILE"),
)
