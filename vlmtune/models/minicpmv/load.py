"""Load a MiniCPM-V 2.x folder (OpenBMB's or vlmtune's) into vlmtune's implementation, reading only
data files: `config.json`, the weights, `tokenizer.json` + `tokenizer_config.json` and
`preprocessor_config.json`. With `trust_remote_code` the folder's own code is used instead."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoModel, AutoProcessor, PreTrainedTokenizerFast

from vlmtune.models.family import FamilyError, LoadOptions
from vlmtune.models.minicpmv.remote.configuration_minicpmv import MiniCPMVConfig
from vlmtune.models.minicpmv.remote.image_processing_minicpmv import MiniCPMVImageProcessor
from vlmtune.models.minicpmv.remote.modeling_minicpmv import MiniCPMV
from vlmtune.models.minicpmv.remote.processing_minicpmv import MiniCPMVProcessor

BLOCK_TOKENS = {"im_start_id": "im_start", "im_end_id": "im_end", "slice_start_id": "slice_start",
                "slice_end_id": "slice_end"}


def read_processor(path: Path) -> MiniCPMVProcessor:
    """Tokenizer from `tokenizer.json` (OpenBMB's tokenizer class adds only id shortcuts), slicing from
    `preprocessor_config.json`."""
    for name in ("tokenizer.json", "preprocessor_config.json"):
        if not (path / name).is_file():
            raise FamilyError(f"{path} has no {name}: a MiniCPM-V folder needs it (copy it from the original model)")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    for key in ("auto_map", "tokenizer_class"):  # OpenBMB's tokenizer class: not needed, not carried
        tokenizer.init_kwargs.pop(key, None)
    image_processor = MiniCPMVImageProcessor.from_pretrained(path)
    for attr in ("auto_map", "processor_class", "image_processor_type"):
        image_processor.__dict__.pop(attr, None)  # written afresh when saved
    missing = [t for t in (image_processor.unk, image_processor.im_start, image_processor.im_end)
               if t not in tokenizer.get_vocab()]
    if missing:
        raise FamilyError(f"{path}/tokenizer.json lacks MiniCPM-V's special token(s) {missing}")
    return MiniCPMVProcessor(image_processor=image_processor, tokenizer=tokenizer)


def load_folder(path: Path, options: LoadOptions):
    from vlmtune.models.loaded import LoadedModel
    from vlmtune.models.minicpmv.family import MINICPMV

    if options.trust_remote_code:  # the user asked for the folder's own code
        model = AutoModel.from_pretrained(path, **options.kwargs())
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
        return LoadedModel(model, processor, MINICPMV, path, "full", sources={c: f"{path} (its own code)"
                                                                          for c in MINICPMV.components})
    processor = read_processor(path)
    config = MiniCPMVConfig.from_pretrained(path)
    for field, token in BLOCK_TOKENS.items():
        if getattr(config, field) is None:
            setattr(config, field, processor.tokenizer.convert_tokens_to_ids(getattr(processor.image_processor, token)))
    kwargs = {k: v for k, v in options.kwargs().items() if k != "trust_remote_code"}
    model, info = MiniCPMV.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    model.processor = processor  # `chat` uses it, never the folder's processor code
    # OpenBMB's folder cannot load in plain transformers 5 (its code predates it): it counts as converted,
    # so a LoRA or delta run writes a loadable base (with our code) and points the adapter at it
    loaded = LoadedModel(model, processor, MINICPMV, path, "converted", sources={c: str(path) for c in MINICPMV.components})
    if info.get("missing_keys") or info.get("unexpected_keys"):
        raise FamilyError(f"{path}: the weights do not match MiniCPM-V {config.version} "
                          f"(missing {sorted(info['missing_keys'])[:4]}, unexpected {sorted(info['unexpected_keys'])[:4]}); "
                          "is it another version? `version` in config.json picks the LLM (2.5: Llama, 2.6: Qwen2)")
    return loaded
