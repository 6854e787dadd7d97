"""A new LLaVA model from a pretrained vision encoder and LLM (stage 1); only the projector is new.

The model skeleton is created on the meta device and the loaded encoder and LLM are put in place,
so a 7B LLM is held once in memory, not twice (random init, then overwritten)."""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE
from vlmtune.models.family import LoadOptions

IMAGE_TOKEN = "<image>"
DUAL_ENCODERS = ("clip", "siglip", "siglip2")


def load_vision(vision_dir: str, options: LoadOptions = LoadOptions()):
    """A vision encoder folder, or the vision half of a CLIP/SigLIP dual-encoder folder."""
    config = AutoConfig.from_pretrained(vision_dir, trust_remote_code=options.trust_remote_code)
    if hasattr(config, "vision_config") and config.model_type in DUAL_ENCODERS:
        from transformers import CLIPVisionModel, Siglip2VisionModel, SiglipVisionModel

        cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "siglip2": Siglip2VisionModel}[config.model_type]
        return cls.from_pretrained(vision_dir, **options.kwargs())
    return AutoModel.from_pretrained(vision_dir, **options.kwargs())


def build(vision_dir: str, llm_dir: str, projector: str = "mlp2x_gelu", options: LoadOptions = LoadOptions()):
    """A new LLaVA model from a vision encoder folder and an LLM folder, with a new projector."""
    return build_from_parts(
        load_vision(vision_dir, options),
        AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=options.trust_remote_code),
        AutoModelForCausalLM.from_pretrained(llm_dir, **options.kwargs()),
        AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=options.trust_remote_code),
        projector,
    )


def build_from_parts(vision, image_processor, llm, tokenizer, projector: str = "mlp2x_gelu",
                     vision_feature_layer: int = -2, drop_cls: bool | None = None, chat_template: str | None = None):
    """Assemble a LLaVA model from loaded parts; the projector is newly initialised.

    `drop_cls` (default: when the encoder has a CLS token) selects `vision_feature_select_strategy`;
    `chat_template` (default: the tokenizer's, else vlmtune's) is the conversation format it keeps."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        llm.resize_token_embeddings(len(tokenizer))

    has_cls = hasattr(getattr(vision, "vision_model", vision).embeddings, "class_embedding")
    drop_cls = has_cls if drop_cls is None else drop_cls
    text_config = llm.config
    text_config.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu" if projector == "mlp2x_gelu" else "linear",
        vision_feature_select_strategy="default" if drop_cls else "full",
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    model = _assemble(config, vision, llm)
    if projector == "linear":
        # transformers' LLaVA projector is Linear-act-Linear; with an identity activation and an
        # identity second layer it is exactly a linear projector, and still loads in plain transformers.
        with torch.no_grad():
            second = model.model.multi_modal_projector.linear_2
            second.weight.copy_(torch.eye(second.out_features, second.in_features))
            second.bias.zero_()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1 if has_cls else 0,
        chat_template=chat_template or tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
    )
    return model, processor


def _assemble(config: LlavaConfig, vision, llm) -> LlavaForConditionalGeneration:
    """The skeleton on the meta device; the loaded parts moved in, the projector initialised."""
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    dtype = next(llm.parameters()).dtype
    if next(vision.parameters()).dtype != dtype:  # a fp16 Vicuna beside a fp32 CLIP: one dtype, the LLM's
        vision = vision.to(dtype)
    model.model.vision_tower = vision
    model.model.language_model = llm.get_decoder()
    model.lm_head = llm.get_output_embeddings()
    model.model.multi_modal_projector = LlavaMultiModalProjector(config).to(dtype)
    model.model.multi_modal_projector.apply(model._init_weights)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    left = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"building LLaVA from parts left {len(left)} parameter(s) unfilled: {left[:5]}")
    return model
