"""`vlmtune merge`: a base (one LLaVA folder, or a separate LLM and vision encoder) plus any of an LLM
LoRA adapter, a vision LoRA adapter and a projector, into one complete model folder.

`--from DIR` finds the parts of an XTuner `pth_to_hf` folder itself: `llm_adapter/` (or a fully
trained LLM in the folder root), `visual_encoder_adapter/` (or `visual_encoder/`), `projector/`, and
the LLM and vision encoder named in `xtuner_config.py` (read as text, never executed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vlmtune.checkpoints.load import LoadedModel, load_model
from vlmtune.convert.parts import apply_projector, apply_state_dict, merge_adapter, projector_weights
from vlmtune.convert.weights import ConversionError
from vlmtune.models.llava import LLAVA, build_from_parts, load_vision


@dataclass
class Parts:
    base: Path | None = None
    llm: Path | None = None
    vision: Path | None = None
    llm_adapter: Path | None = None
    vision_adapter: Path | None = None
    projector: Path | None = None
    weights: Path | None = None  # a state dict (transformers or XTuner naming) loaded over the base
    notes: list[str] = field(default_factory=list)  # where each part was found


def xtuner_config_paths(folder: Path) -> dict[str, str]:
    """`llm_name_or_path` and `visual_encoder_name_or_path` assigned as string literals in xtuner_config.py."""
    config = folder / "xtuner_config.py"
    if not config.is_file():
        return {}
    text = config.read_text()
    found = {}
    for key in ("llm_name_or_path", "visual_encoder_name_or_path"):
        match = re.search(rf"^{key}\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if match:
            found[key] = match.group(1)
    return found


def is_xtuner_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "projector").is_dir() and any(
        (folder / name).exists() for name in ("llm_adapter", "visual_encoder_adapter", "visual_encoder", "xtuner_config.py"))


def xtuner_parts(folder: Path, parts: Parts) -> Parts:
    """Fill `parts` from an XTuner folder; explicit `--llm` / `--vision` win over xtuner_config.py."""
    if not is_xtuner_folder(folder):
        raise ConversionError(f"--from {folder}: not an XTuner folder (expected projector/ and llm_adapter/, "
                              "visual_encoder_adapter/, visual_encoder/ or xtuner_config.py)")
    parts.projector = parts.projector or folder / "projector"
    if (folder / "llm_adapter").is_dir():
        parts.llm_adapter = parts.llm_adapter or folder / "llm_adapter"
    if (folder / "visual_encoder_adapter").is_dir():
        parts.vision_adapter = parts.vision_adapter or folder / "visual_encoder_adapter"
    named = xtuner_config_paths(folder)
    if parts.llm is None and (folder / "config.json").is_file():
        parts.llm = folder
        parts.notes.append(f"llm: fully trained LLM in {folder}")
    if parts.vision is None and (folder / "visual_encoder").is_dir():
        parts.vision = folder / "visual_encoder"
        parts.notes.append(f"vision: fully trained encoder in {parts.vision}")
    for attr, key in (("llm", "llm_name_or_path"), ("vision", "visual_encoder_name_or_path")):
        if getattr(parts, attr) is None and key in named:
            setattr(parts, attr, Path(named[key]))
            parts.notes.append(f"{attr}: {named[key]} (from xtuner_config.py `{key}`)")
        elif getattr(parts, attr) is not None and not any(n.startswith(attr + ":") for n in parts.notes):
            parts.notes.append(f"{attr}: {getattr(parts, attr)} (given on the command line)")
    return parts


def llm_key(key: str) -> str:
    """An LLM adapter's module path inside a LLaVA model (adapters on the bare LLM or on the VLM)."""
    key = LLAVA.canonical_key(key)
    if key.startswith(("model.language_model.", "lm_head.")):
        return key
    return "model.language_model." + key.removeprefix("model.")


def vision_key(key: str) -> str:
    key = LLAVA.canonical_key(key)
    return key if key.startswith("model.vision_tower.") else "model.vision_tower." + key


def assemble(parts: Parts) -> LoadedModel:
    """The merged model, in memory; raises `ConversionError` naming what does not fit."""
    if parts.base and (parts.llm or parts.vision):
        raise ConversionError("give either --base (a LLaVA folder) or --llm and --vision, not both")
    sources = {}
    if parts.base:
        loaded = load_model(parts.base)
        sources = {c: str(parts.base) for c in LLAVA.components}
    else:
        missing = [name for name in ("llm", "vision") if getattr(parts, name) is None]
        if missing:
            raise ConversionError(f"no base: give --base, or --llm and --vision (missing: {', '.join('--' + m for m in missing)})")
        for name in ("llm", "vision"):
            if not (getattr(parts, name) / "config.json").is_file():
                raise ConversionError(f"--{name} {getattr(parts, name)} is not a model folder here (no config.json)")
        projector_kind = "mlp2x_gelu"
        if parts.projector is not None:
            projector_kind = "linear" if "linear.weight" in projector_weights(parts.projector) else "mlp2x_gelu"
        model, processor = build_from_parts(
            load_vision(str(parts.vision), trust_remote_code=False),
            AutoImageProcessor.from_pretrained(parts.vision, trust_remote_code=False),
            AutoModelForCausalLM.from_pretrained(parts.llm, trust_remote_code=False),
            AutoTokenizer.from_pretrained(parts.llm, trust_remote_code=False), projector_kind)
        loaded = LoadedModel(model, processor, LLAVA, parts.llm, "built")
        sources = {"vision": str(parts.vision), "llm": str(parts.llm), "projector": "NEWLY INITIALISED (no --projector)"}
    if parts.projector is not None:
        apply_projector(loaded.model, projector_weights(parts.projector), str(parts.projector))
        sources["projector"] = str(parts.projector)
    if parts.weights is not None:
        for component in apply_state_dict(loaded.model, LLAVA, parts.weights):
            sources[component] = f"{parts.weights} (state dict)"
    if parts.llm_adapter is not None:
        loaded.model = merge_adapter(loaded.model, parts.llm_adapter, rename=llm_key)
        sources["llm"] += f" + LoRA {parts.llm_adapter} (merged)"
    if parts.vision_adapter is not None:
        loaded.model = merge_adapter(loaded.model, parts.vision_adapter, rename=vision_key)
        sources["vision"] += f" + LoRA {parts.vision_adapter} (merged)"
    loaded.sources = sources
    loaded.notes = parts.notes
    return loaded
