"""A new MGM model from parts (stage 1): a CLIP ViT folder, a ConvNeXt folder (transformers, OpenCLIP
or timm) and an LLM folder; the mining modules and the projector are new. The skeleton is built on
the meta device and the loaded parts put in place, so each weight is held once."""

from __future__ import annotations

import torch
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoTokenizer

from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE
from vlmtune.models.family import FamilyError, LoadOptions
from vlmtune.models.llava.build import load_vision
from vlmtune.models.mgm.configuration_mgm import MGMConfig
from vlmtune.models.mgm.modeling_mgm import MGMForConditionalGeneration, MGMMining, MGMProjector
from vlmtune.models.mgm.processing_mgm import MGMImageProcessor, MGMProcessor
from vlmtune.models.mgm.towers import load_aux_tower

IMAGE_TOKEN = "<image>"


def build(vision_dir: str, llm_dir: str, projector: str = "mlp2x_gelu", options: LoadOptions = LoadOptions(),
          vision_aux: str | None = None, image_size_aux: int | None = None, image_grid: int = 1,
          image_global: bool = False):
    """A new MGM model: `model.vision` (CLIP), `model.vision_aux` (ConvNeXt) and `model.llm`; MGM-HD with
    `image_grid` 2 (and `image_global`)."""
    if not vision_aux:
        raise FamilyError("`model.family: mgm` needs `model.vision_aux`: the high-resolution ConvNeXt folder "
                          "(a transformers ConvNextModel, OpenCLIP or timm folder)")
    dtype = getattr(torch, options.dtype) if options.dtype else None
    aux, native_size = load_aux_tower(vision_aux, dtype)
    return build_from_parts(
        load_vision(vision_dir, options),
        AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=options.trust_remote_code),
        aux,
        AutoModelForCausalLM.from_pretrained(llm_dir, **options.kwargs()),
        AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=options.trust_remote_code),
        projector, image_size_aux or native_size, image_grid=image_grid, image_global=image_global,
    )


def check_sizes(vision_config, image_size_aux: int, image_grid: int = 1, stride: int = 4) -> None:
    """The ConvNeXt's first-stage map must tile into one window per ViT token (of every crop, with MGM-HD)."""
    grid = vision_config.image_size // vision_config.patch_size * image_grid
    side = image_size_aux // stride
    if image_size_aux % stride or side % grid:
        views = f" x {image_grid}x{image_grid} crops" if image_grid > 1 else ""
        raise FamilyError(f"MGM: image_size_aux {image_size_aux} gives a {side}x{side} ConvNeXt map, which does not "
                          f"split into the ViT's {grid // image_grid}x{grid // image_grid} tokens{views}; use a multiple "
                          f"of {grid * stride} (e.g. {grid * stride * max(1, round(side / grid))})")


def build_from_parts(vision, image_processor, aux, llm, tokenizer, projector: str = "mlp2x_gelu",
                     image_size_aux: int = 768, vision_feature_layer: int = -2, image_grid: int = 1,
                     image_global: bool = False):
    """Assemble an MGM model and its processor from loaded parts; mining and projector are new."""
    if image_global and image_grid < 2:
        raise FamilyError("MGM: image_global adds a whole-image view to MGM-HD's crops; set image_grid: 2 too")
    check_sizes(vision.config, image_size_aux, image_grid)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))
    text_config = llm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    has_cls = hasattr(getattr(vision, "vision_model", vision).embeddings, "class_embedding")
    config = MGMConfig(vision_config=vision.config, vision_aux_config=aux.config, text_config=text_config,
                       image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), projector_type=projector,
                       vision_feature_select_strategy="default" if has_cls else "full",
                       vision_feature_layer=vision_feature_layer, image_size_aux=image_size_aux,
                       image_grid=image_grid, image_global=image_global,
                       tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)))
    model = _assemble(config, vision, aux, llm)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tokenizer, key))
    mgm_images = MGMImageProcessor(
        image_size=vision.config.image_size, image_mean=image_processor.image_mean, image_std=image_processor.image_std,
        image_grid=image_grid, image_global=image_global,
        size={"shortest_edge": image_size_aux}, crop_size={"height": image_size_aux, "width": image_size_aux})
    processor = MGMProcessor(mgm_images, tokenizer, patch_size=vision.config.patch_size, image_token=IMAGE_TOKEN,
                             chat_template=tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
    return model, processor


def _assemble(config: MGMConfig, vision, aux, llm) -> MGMForConditionalGeneration:
    with torch.device("meta"):
        model = MGMForConditionalGeneration(config)
    inner = model.model
    inner.vision_tower = vision
    inner.vision_tower_aux = aux
    inner.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    dtype = next(llm.parameters()).dtype
    inner.mining = MGMMining(config).to(dtype)
    inner.multi_modal_projector = MGMProjector(config).to(dtype)
    for module in (inner.mining, inner.multi_modal_projector):
        module.apply(model._init_weights)
    if config.tie_word_embeddings:
        model.lm_head.weight = inner.language_model.get_input_embeddings().weight
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"building MGM from parts left {len(left)} parameter(s) unfilled: {left[:5]}")
    return model
