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

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmtune.checkpoints.load import LoadedModel
from vlmtune.convert.merge import Parts, assemble
from vlmtune.convert.weights import ConversionError, read_state_dict
from vlmtune.models.family import ConvertOptions, LoadOptions
from vlmtune.models.registry import family_for, layout_for, layout_names


def check_accounting(source: str, unused: list[str], unfilled: list[str], convert: ConvertOptions) -> list[str]:
    """Raise on leftovers unless allowed; return the notes that remain. `unfilled` entries that start
    with "vision " are tower parameters the checkpoint lacks (they keep the vision folder's weights)."""
    problems, notes = [], []
    vision = [k for k in unfilled if k.startswith("vision ")]
    other = [k for k in unfilled if not k.startswith("vision ")]
    for keys, allowed, what in (
            (unused, convert.allow_unused, "source tensor(s) not used"),
            (vision, convert.allow_missing, "vision parameter(s) not in the checkpoint (they keep the vision folder's weights)"),
            (other, convert.allow_missing, "model parameter(s) not filled (they would keep a new random init)")):
        if keys:
            line = f"{len(keys)} {what}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}"
            (notes if allowed else problems).append(line)
    if problems:
        flags = " ".join(f for f, keys in (("--allow-unused", unused), ("--allow-missing", unfilled)) if keys)
        how = (f"use {flags.replace(' ', ' / ')} to convert anyway" if convert.command == "convert" else
               f"to accept that, convert it once with `vlmtune convert {source} {flags} --out OUT` and use OUT")
        raise ConversionError(f"{source}: " + "; ".join(problems) + f" ({how})")
    return notes


def convert_transformers(folder: Path, options: LoadOptions, convert: ConvertOptions) -> LoadedModel:
    """A transformers folder of a known family in any key naming it has had, re-read strictly through
    the family's renames."""
    config = AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    family = family_for(config, where=str(folder))
    dtype = getattr(torch, options.dtype) if options.dtype else torch.float32  # not the dtype the config records
    model = (family.model_class or AutoModelForImageTextToText)._from_config(config, dtype=dtype)
    state = {family.canonical_key(k): v for k, v in read_state_dict(folder).items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    notes = check_accounting(str(folder), list(result.unexpected_keys), [k for k in result.missing_keys if k not in tied],
                             convert)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    if convert.chat_template:
        from vlmtune.data.templates import resolve_template

        processor.chat_template = resolve_template(convert.chat_template)
        notes.append(f"chat template: {convert.chat_template} (from --chat-template)")
    model.generation_config.pad_token_id = getattr(config.get_text_config(), "pad_token_id", None)
    return LoadedModel(model, processor, family, folder, "converted",
                       sources={c: str(folder) for c in family.components}, notes=notes)


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
