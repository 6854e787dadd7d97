"""Every layout `model.path` accepts, first match wins: the foreign layouts families register
(`models/registry.layouts()`), then anything `checkpoints.load` reads (full, LoRA adapter, delta)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.models.loaded import LoadedModel
from vlmtune.checkpoints.load import ModelLoadError, load_model
from vlmtune.models.family import ConvertOptions, LoadOptions
from vlmtune.models.registry import layout_for


def load_any(path: str | Path, options: LoadOptions | None = None, components: dict | None = None,
             trust_remote_code: bool = False, convert: ConvertOptions | None = None) -> LoadedModel:
    """Load a model from any supported layout, converting foreign ones in memory."""
    path = Path(path)
    options = options or LoadOptions(trust_remote_code=trust_remote_code)
    found = layout_for(path)
    if found:
        return found[1].load(path, options, convert or ConvertOptions())
    if path.is_file():
        raise ModelLoadError(f"{path} is a single weight file, which does not say what model it belongs to; "
                             "combine it with its base first (`vlmtune merge` or `vlmtune convert`)")
    return load_model(path, options=options, components=components)
