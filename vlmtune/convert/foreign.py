"""`vlmtune convert`: a foreign layout into a transformers model folder.

The layouts are registry entries contributed by the families (`vlmtune/models/<family>/`), first
match wins; a transformers folder of a known family (either key naming) is re-read strictly; a
projector file is combined with `--vision` and `--llm`. Every source tensor must land somewhere and
every model parameter must be filled: what is left over on either side is listed, and is an error
unless explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlmtune.models.loaded import LoadedModel
from vlmtune.convert.merge import assemble
from vlmtune.models.parts import Parts, convert_transformers
from vlmtune.models.weights import ConversionError
from vlmtune.models.family import ConvertOptions, LoadOptions
from vlmtune.models.registry import layout_for, layout_names


def convert(source: str | Path, convert: ConvertOptions = ConvertOptions(),
            options: LoadOptions | None = None) -> LoadedModel:
    """Recognise `source`'s layout (first match wins) and convert it; the error lists what is supported."""
    source = Path(source)
    options = options or LoadOptions()
    found = layout_for(source)
    if found:
        return found[1].load(source, options, convert)
    if source.is_file():
        if convert.vision is None or convert.llm is None:
            raise ConversionError(f"{source} is a weight file: a stage-1 projector needs --vision and --llm folders")
        return assemble(Parts(llm=convert.llm, vision=convert.vision, projector=source,
                              chat_template=convert.chat_template), options)
    if (source / "config.json").is_file() and json.loads((source / "config.json").read_text()).get("model_type"):
        return convert_transformers(source, options, convert)
    raise ConversionError(
        f"{source}: layout not recognised. convert reads: {layout_names()}; a transformers folder of a known "
        "family (either key naming); a projector file with --vision and --llm. "
        "For adapters and XTuner folders also see `vlmtune merge`."
    )
