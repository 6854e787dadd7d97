"""`vlmtune merge`: a base (a model folder in any layout vlmtune reads, or a separate LLM and vision
encoder) plus any of an LLM LoRA adapter, a vision LoRA adapter, a projector and a state dict, into
one complete model. The family does the merging (`Family.merge`); `--from DIR` asks the layout that
recognises DIR which parts it holds (`Layout.parts`, e.g. XTuner's `pth_to_hf` folder)."""

from __future__ import annotations

from pathlib import Path

from vlmtune.models.loaded import LoadedModel
from vlmtune.models.parts import Parts
from vlmtune.models.weights import ConversionError
from vlmtune.models.family import LoadOptions
from vlmtune.models.registry import builder, layout_for, layout_names


def parts_from(folder: Path, parts: Parts) -> Parts:
    """`--from DIR`: the parts a foreign folder holds, found by the layout that recognises it."""
    found = layout_for(folder)
    if found is None or found[1].parts is None:
        able = "; ".join(layout.name for _, layout in _layouts_with_parts()) or "none"
        raise ConversionError(f"--from {folder}: not a layout whose parts vlmtune can find (--from reads: {able}); "
                              f"layouts vlmtune reads: {layout_names()}")
    return found[1].parts(folder, parts)


def _layouts_with_parts():
    from vlmtune.models.registry import layouts

    return [(family, layout) for family, layout in layouts() if layout.parts is not None]


def assemble(parts: Parts, options: LoadOptions | None = None) -> LoadedModel:
    """The merged model, in memory; raises `ConversionError` naming what does not fit."""
    options = options or LoadOptions()
    if parts.base and (parts.llm or parts.vision):
        raise ConversionError("give either --base (a model folder) or --llm and --vision, not both")
    base = None
    if parts.base:
        from vlmtune.convert.layouts import load_any

        base = load_any(parts.base, options=options)
        family = base.family
    else:
        family = builder()
    if family.merge is None:
        raise ConversionError(f"{parts.base}: the {family.name} family does not merge parts (vlmtune merge); "
                              "load it with model.path, or export it")
    return family.merge(parts, base, options)
