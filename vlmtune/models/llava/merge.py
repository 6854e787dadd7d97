"""`vlmtune merge` for LLaVA: a base (a LLaVA model in any layout, or a separate LLM and vision
encoder) plus any of an LLM LoRA adapter, a vision LoRA adapter, a projector and a state dict.

XTuner's `pth_to_hf` folder names its parts itself: `llm_adapter/` (or a fully trained LLM in the
folder root), `visual_encoder_adapter/` (or `visual_encoder/`), `projector/`, and in `xtuner_config.py`
(read as text, never executed) the LLM, the vision encoder, the vision layer and the prompt template.
"""

from __future__ import annotations

import re
from pathlib import Path

from transformers import AutoImageProcessor, AutoModelForCausalLM

from vlmtune.data.templates import resolve_template
from vlmtune.models.family import ConversionError, LoadOptions
from vlmtune.models.llava.build import build_from_parts, load_vision
from vlmtune.models.llava.convert import (XTUNER_TEMPLATES, apply_projector, llm_key, load_tokenizer,
                                          parts_options, projector_kind, projector_weights, vision_key)

XTUNER_PARTS = ("llm_adapter", "visual_encoder_adapter", "visual_encoder", "xtuner_config.py")


def xtuner_config_values(folder: Path) -> dict[str, str]:
    """Plain assignments in xtuner_config.py: the LLM and vision encoder paths (string literals), the
    vision layer (`visual_select_layer`) and the prompt template's name (`PROMPT_TEMPLATE.NAME`)."""
    config = folder / "xtuner_config.py"
    if not config.is_file():
        return {}
    text = config.read_text()
    found = {}
    for key in ("llm_name_or_path", "visual_encoder_name_or_path"):
        match = re.search(rf"^{key}\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if match:
            found[key] = match.group(1)
    match = re.search(r"\bvisual_select_layer\s*=\s*(-?\d+)", text)
    if match:
        found["visual_select_layer"] = match.group(1)
    match = re.search(r"^prompt_template\s*=\s*PROMPT_TEMPLATE\.(\w+)", text, re.MULTILINE)
    if match:
        found["prompt_template"] = match.group(1)
    return found


def is_xtuner_folder(folder: Path) -> bool:
    return folder.is_dir() and (folder / "projector").is_dir() and any((folder / name).exists() for name in XTUNER_PARTS)


def xtuner_parts(folder: Path, parts):
    """Fill `parts` from an XTuner folder; explicit `--llm` / `--vision` win over xtuner_config.py."""
    if not is_xtuner_folder(folder):
        raise ConversionError(f"--from {folder}: not an XTuner folder (expected projector/ and llm_adapter/, "
                              "visual_encoder_adapter/, visual_encoder/ or xtuner_config.py)")
    parts.projector = parts.projector or folder / "projector"
    if (folder / "llm_adapter").is_dir():
        parts.llm_adapter = parts.llm_adapter or folder / "llm_adapter"
    if (folder / "visual_encoder_adapter").is_dir():
        parts.vision_adapter = parts.vision_adapter or folder / "visual_encoder_adapter"
    named = xtuner_config_values(folder)
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
    if parts.feature_layer is None:
        parts.feature_layer = int(named.get("visual_select_layer", -2))
    if parts.chat_template is None and named.get("prompt_template") in XTUNER_TEMPLATES:
        parts.chat_template = XTUNER_TEMPLATES[named["prompt_template"]]
        parts.notes.append(f"chat template: {parts.chat_template}, the built-in closest to XTuner's "
                           f"PROMPT_TEMPLATE.{named['prompt_template']} (xtuner_config.py)")
    return parts


def merge_parts(parts, base=None, options: LoadOptions = LoadOptions()):
    """The merged model, in memory; `base` is the loaded `--base` (any layout), else the model is built
    from `parts.llm` + `parts.vision`. Raises `ConversionError` naming what does not fit."""
    from vlmtune.models.loaded import LoadedModel
    from vlmtune.models.parts import apply_state_dict, merge_adapter
    from vlmtune.models.llava.family import LLAVA

    if base is not None:
        loaded = base
        sources = dict(base.sources) or {c: str(parts.base) for c in LLAVA.components}
    else:
        missing = [name for name in ("llm", "vision") if getattr(parts, name) is None]
        if missing:
            raise ConversionError("no base: give --base, or --llm and --vision "
                                  f"(missing: {', '.join('--' + m for m in missing)})")
        for name in ("llm", "vision"):
            if not (getattr(parts, name) / "config.json").is_file():
                raise ConversionError(f"--{name} {getattr(parts, name)} is not a model folder here (no config.json)")
        kind = projector_kind(projector_weights(parts.projector)) if parts.projector is not None else "mlp2x_gelu"
        template = resolve_template(parts.chat_template) if parts.chat_template else None
        loading = parts_options(options)
        model, processor = build_from_parts(
            load_vision(str(parts.vision), loading),
            AutoImageProcessor.from_pretrained(parts.vision, trust_remote_code=options.trust_remote_code),
            AutoModelForCausalLM.from_pretrained(parts.llm, **loading.kwargs()), load_tokenizer(parts.llm, options),
            kind, vision_feature_layer=parts.feature_layer if parts.feature_layer is not None else -2,
            chat_template=template)
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
    loaded.notes = list(loaded.notes) + parts.notes
    return loaded
