"""Every layout `model.path` accepts, first match wins: the foreign layouts families register
(`models/registry.layouts()`), then the generic ones below, then anything `checkpoints.load` reads
(full, LoRA adapter, delta)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.checkpoints.load import LoadedModel, ModelLoadError, load_model
from vlmtune.convert.foreign import convert_original, is_original_llava
from vlmtune.convert.merge import Parts, assemble, is_xtuner_folder, xtuner_parts
from vlmtune.models.family import LoadOptions
from vlmtune.models.registry import layout_for


def detect(path: Path) -> str:
    if path.is_file():
        return "weight file"
    found = layout_for(path)
    if found:
        return found[1].name
    if is_xtuner_folder(path):
        return "XTuner pth_to_hf folder"
    if is_original_llava(path):
        return "original LLaVA repository folder"
    return "vlmtune / transformers / PEFT folder"


def load_any(path: str | Path, options: LoadOptions | None = None, components: dict | None = None,
             trust_remote_code: bool = False) -> LoadedModel:
    """Load a model from any supported layout, converting foreign ones in memory."""
    path = Path(path)
    options = options or LoadOptions(trust_remote_code=trust_remote_code)
    if path.is_file():
        raise ModelLoadError(f"{path} is a single weight file, which does not say what model it belongs to; "
                             "combine it with its base first (`vlmtune merge` or `vlmtune convert`)")
    found = layout_for(path)
    if found:
        return found[1].load(path, options)
    if is_xtuner_folder(path):
        return assemble(xtuner_parts(path, Parts()))
    if is_original_llava(path):
        return convert_original(path, vision=None)
    return load_model(path, options=options, components=components)
