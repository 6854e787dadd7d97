"""`vlmtune convert`: foreign layouts into a transformers LLaVA model.

- the original LLaVA repository's folder (`LlavaLlamaForCausalLM`: `mm_*` config keys, projector under
  `model.mm_projector`, vision tower in the checkpoint or given by `--vision`);
- a stage-1 projector file (`mm_projector.bin`) with its `--vision` and `--llm` folders;
- a transformers LLaVA folder in either key naming (before or after transformers 4.52).

Every source tensor must land somewhere and every model parameter must be filled: what is left over
on either side is listed, and is an error unless explicitly allowed.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoImageProcessor, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlavaConfig

from vlmtune.checkpoints.load import LoadedModel
from vlmtune.convert.merge import Parts, assemble
from vlmtune.convert.parts import apply_projector, projector_weights
from vlmtune.convert.weights import ConversionError, read_state_dict
from vlmtune.models.family import LoadOptions
from vlmtune.models.llava import LLAVA, build_from_parts, load_vision
from vlmtune.models.registry import layout_for

ORIGINAL_VISION_PREFIX = "model.vision_tower.vision_tower."


def is_original_llava(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    config = json.loads((folder / "config.json").read_text())
    return any(key in config for key in ("mm_vision_tower", "mm_projector_type", "mm_hidden_size"))


def check_accounting(source: str, unused: list[str], unfilled: list[str], allow_unused: bool, allow_missing: bool) -> list[str]:
    """Raise on leftovers unless allowed; return the warnings that remain."""
    problems, notes = [], []
    for keys, allowed, what in ((unused, allow_unused, "source tensor(s) not used"),
                                (unfilled, allow_missing, "model parameter(s) not filled (they keep a random init)")):
        if keys:
            line = f"{len(keys)} {what}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}"
            (notes if allowed else problems).append(line)
    if problems:
        raise ConversionError(f"{source}: " + "; ".join(problems)
                              + " (use --allow-unused / --allow-missing to convert anyway)")
    return notes


def convert_original(folder: Path, vision: Path | None, allow_unused=False, allow_missing=False) -> LoadedModel:
    """An original-LLaVA folder into a transformers LLaVA model."""
    raw = json.loads((folder / "config.json").read_text())
    state = read_state_dict(folder)
    vision_dir = vision or (Path(raw["mm_vision_tower"]) if raw.get("mm_vision_tower") else None)
    if vision_dir is None or not (vision_dir / "config.json").is_file():
        raise ConversionError(f"{folder}: its vision tower {raw.get('mm_vision_tower')!r} is not a folder here; "
                              "give the CLIP folder with --vision")
    known = set(LlamaConfig().to_dict())
    text_config = LlamaConfig(**{k: v for k, v in raw.items() if k in known and k not in ("model_type", "architectures")})
    llm = LlamaForCausalLM(text_config)
    llm_state = {k: v for k, v in state.items() if not k.startswith(("model.mm_projector", "model.vision_tower"))}
    result = llm.load_state_dict(llm_state, strict=False)
    unused, unfilled = list(result.unexpected_keys), list(result.missing_keys)

    vision_model = load_vision(str(vision_dir))
    tower = {k.removeprefix(ORIGINAL_VISION_PREFIX): v for k, v in state.items() if k.startswith(ORIGINAL_VISION_PREFIX)}
    if tower:  # the checkpoint carries its (possibly tuned) tower: it wins over the folder's
        result = vision_model.load_state_dict(tower, strict=False)
        unused += [ORIGINAL_VISION_PREFIX + k for k in result.unexpected_keys]
        unfilled += [f"vision {k}" for k in result.missing_keys]
    unused += [k for k in state if k.startswith("model.vision_tower") and not k.startswith(ORIGINAL_VISION_PREFIX)]

    tokenizer_dir = folder if (folder / "tokenizer_config.json").is_file() else None
    if tokenizer_dir is None:
        raise ConversionError(f"{folder}: no tokenizer files; copy the LLM's tokenizer into the folder")
    projector = projector_weights({k: v for k, v in state.items() if k.startswith("model.mm_projector")})
    model, processor = build_from_parts(
        vision_model, AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=False), llm, AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False),
        "linear" if raw.get("mm_projector_type") == "linear" else "mlp2x_gelu",
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        drop_cls=raw.get("mm_vision_select_feature", "patch") == "patch",
    )
    apply_projector(model, projector, f"{folder} model.mm_projector")
    notes = check_accounting(str(folder), unused, unfilled, allow_unused, allow_missing)
    sources = {"vision": f"{folder} (tower tensors)" if tower else str(vision_dir), "projector": f"{folder} model.mm_projector",
               "llm": str(folder)}
    return LoadedModel(model, processor, LLAVA, folder, "converted", sources=sources, notes=notes)


def convert_transformers(folder: Path, allow_unused=False, allow_missing=False) -> LoadedModel:
    """A transformers LLaVA folder in either key naming, re-read strictly through the family's renames."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = LlavaConfig.from_pretrained(folder)
    model = LlavaForConditionalGeneration(config)
    state = {LLAVA.canonical_key(k): v for k, v in read_state_dict(folder).items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    notes = check_accounting(str(folder), list(result.unexpected_keys), [k for k in result.missing_keys if k not in tied],
                             allow_unused, allow_missing)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return LoadedModel(model, AutoProcessor.from_pretrained(folder, trust_remote_code=False), LLAVA, folder, "converted",
                       sources={c: str(folder) for c in LLAVA.components}, notes=notes)


def convert(source: str | Path, vision: Path | None = None, llm: Path | None = None,
            allow_unused: bool = False, allow_missing: bool = False) -> LoadedModel:
    """Recognise `source`'s layout (first match wins) and convert it; the error lists what is supported."""
    source = Path(source)
    found = layout_for(source)
    if found:  # a family's own layouts first (e.g. original Mini-Gemini folders)
        family, layout = found
        return layout.load(source, LoadOptions(), **({"llm": llm} if llm else {}))
    if source.is_file():
        if vision is None or llm is None:
            raise ConversionError(f"{source} is a weight file: a stage-1 projector needs --vision and --llm folders")
        return assemble(Parts(llm=llm, vision=vision, projector=source))
    if is_original_llava(source):
        return convert_original(source, vision, allow_unused, allow_missing)
    if (source / "config.json").is_file() and json.loads((source / "config.json").read_text()).get("model_type") == "llava":
        return convert_transformers(source, allow_unused, allow_missing)
    raise ConversionError(
        f"{source}: layout not recognised. convert reads: an original-LLaVA folder (config.json with mm_* keys), "
        "a transformers LLaVA folder (either key naming), or a projector file with --vision and --llm. "
        "For XTuner folders and adapters use `vlmtune merge`."
    )
