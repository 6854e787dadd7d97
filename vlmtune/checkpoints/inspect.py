"""`vlmtune inspect`: what a folder or weight file is, without loading the model.

Reads safetensors headers (or a weights-only `torch.load` for .bin/.pth), configs, the manifest and
the trainer state; groups tensors by component through the model family's key names. Foreign
layouts are described by the family that registered them.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig

from vlmtune.checkpoints.load import ModelLoadError
from vlmtune.checkpoints.manifest import check_on_load, read_manifest
from vlmtune.checkpoints.save import DELTA_WEIGHTS
from vlmtune.models.registry import Family, families, family_for, layout_for
from vlmtune.models.weights import group_components, tensor_shapes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def _best_family(tensors: dict) -> Family | None:
    """The family whose component names cover most of a bare weight file's keys (at least half)."""
    def covered(family: Family) -> int:
        return sum(1 for k in tensors if family.component_of(family.canonical_key(k.removeprefix("base_model.model."))))
    best = max(families(), key=covered, default=None)
    return best if best and 2 * covered(best) >= len(tensors) > 0 else None


def _foreign(path: Path) -> dict | None:
    """A layout a family registered (original LLaVA, XTuner, ...): what it is and what it needs."""
    found = layout_for(path)
    if found is None:
        return None
    family, layout = found
    info = {"layout": f"{layout.name} ({layout.hint})" if layout.hint else layout.name, "family": family.name}
    return {**info, **(layout.describe(path) if layout.describe else {"components": {}})}


def describe(path: str | Path, trust_remote_code: bool = False) -> dict:
    """A plain-data description of `path` (see the module docstring)."""
    path = Path(path)
    foreign = _foreign(path)
    if foreign:
        return {"path": str(path), **foreign}
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise ModelLoadError(f"{path}: not a weight file (expected one of {', '.join(WEIGHT_SUFFIXES)})")
        tensors = tensor_shapes(path)
        family = _best_family(tensors)
        info = {"path": str(path), "layout": f"weight file ({path.suffix})", "family": family.name if family else None,
                "components": group_components(tensors, family)}
        prefixes = {k.split(".")[0] for k in tensors}
        if all("mm_projector" in k or k.startswith("model.vlm_uni") for k in tensors):
            info["layout"] += ": a stage-1 projector (mm_projector.bin); needs --vision and --llm (vlmtune convert)"
        elif prefixes <= {"projector", "llm", "visual_encoder"} and "projector" in prefixes:
            info["layout"] += ": an XTuner LLaVAModel state dict (pretrained_pth)"
        return info
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist")
    check_on_load(path)
    info: dict = {"path": str(path)}
    manifest = read_manifest(path)
    family = None
    if (path / "config.json").is_file():
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        info["architecture"] = (config.architectures or [config.model_type])[0]
        try:
            family = family_for(config)
            info["family"] = family.name
        except ValueError:
            pass
    if (path / "adapter_config.json").is_file():
        adapter = json.loads((path / "adapter_config.json").read_text())
        base = adapter.get("base_model_name_or_path")
        info["layout"] = "PEFT LoRA adapter"
        info["adapter"] = {"r": adapter.get("r"), "alpha": adapter.get("lora_alpha"), "targets": adapter.get("target_modules"),
                           "modules_to_save": adapter.get("modules_to_save")}
        info["needs_base"] = {"path": base, "present": bool(base) and (Path(base) / "config.json").is_file()}
        if family is None and info["needs_base"]["present"]:
            base_config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
            try:
                family = family_for(base_config)
                info["family"] = family.name
            except ValueError:
                info["needs"] = (f"its base is a {base_config.model_type} model, not a vision-language family vlmtune "
                                 f"knows (a text-only LLM: merge the adapter into a VLM with vlmtune merge "
                                 f"--llm-adapter {path})")
    elif (path / DELTA_WEIGHTS).is_file():
        base = (manifest or {}).get("base", {}).get("path")
        info["layout"] = "vlmtune delta (tuned components only)"
        info["needs_base"] = {"path": base, "present": bool(base) and (Path(base) / "config.json").is_file()}
    else:
        info["layout"] = "full model folder" if (path / "config.json").is_file() else "unknown folder"
    if manifest:
        info["layout"] += f", vlmtune {manifest.get('kind')} checkpoint"
        info["tuned"] = {c: v.get("mode") for c, v in manifest.get("components", {}).items()}
        info["state"] = manifest.get("state")
    tensors = {}
    for file in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        if file.name != "training_args.bin":
            tensors.update(tensor_shapes(file))
    info["components"] = group_components(tensors, family)
    if (path / "trainer_state.json").is_file():
        state = json.loads((path / "trainer_state.json").read_text())
        info["trainer_state"] = {"step": state.get("global_step"), "epoch": state.get("epoch"),
                                 "max_steps": state.get("max_steps")}
    info["files"] = sorted(p.name for p in path.iterdir())
    return info
