"""LLaVA: vision tower -> multi-modal projector -> language model (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

from pathlib import Path

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

from vlmtune.models.chat_template import DEFAULT_CHAT_TEMPLATE
from vlmtune.models.registry import Family, register

IMAGE_TOKEN = "<image>"


def image_token_counts(processor: LlavaProcessor, images: list[Path]) -> list[int]:
    """Every image is resized to the crop size, so each takes the same number of tokens."""
    crop = processor.image_processor.crop_size
    patch = processor.patch_size
    count = (crop["height"] // patch) * (crop["width"] // patch) + processor.num_additional_image_tokens
    if processor.vision_feature_select_strategy == "default":
        count -= 1  # the CLS token is dropped
    return [count] * len(images)


def image_inputs(processor: LlavaProcessor, images) -> dict[str, torch.Tensor]:
    return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}


def load_vision(vision_dir: str, trust_remote_code: bool = False):
    """A vision encoder folder, or the vision half of a CLIP/SigLIP dual-encoder folder."""
    config = AutoConfig.from_pretrained(vision_dir, trust_remote_code=trust_remote_code)
    if hasattr(config, "vision_config") and config.model_type in ("clip", "siglip", "siglip2"):
        from transformers import CLIPVisionModel, Siglip2VisionModel, SiglipVisionModel

        cls = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "siglip2": Siglip2VisionModel}[config.model_type]
        return cls.from_pretrained(vision_dir)
    return AutoModel.from_pretrained(vision_dir, trust_remote_code=trust_remote_code)


def build(vision_dir: str, llm_dir: str, projector: str = "mlp2x_gelu", trust_remote_code: bool = False):
    """A new LLaVA model from a pretrained vision encoder and LLM, with a freshly initialised projector."""
    return build_from_parts(
        load_vision(vision_dir, trust_remote_code),
        AutoImageProcessor.from_pretrained(vision_dir, trust_remote_code=trust_remote_code),
        AutoModelForCausalLM.from_pretrained(llm_dir, trust_remote_code=trust_remote_code),
        AutoTokenizer.from_pretrained(llm_dir, trust_remote_code=trust_remote_code),
        projector,
    )


def build_from_parts(vision, image_processor, llm, tokenizer, projector: str = "mlp2x_gelu",
                     vision_feature_layer: int = -2, drop_cls: bool | None = None):
    """Assemble a LLaVA model from loaded parts; the projector is newly initialised.

    `drop_cls` (default: when the encoder has a CLS token) selects `vision_feature_select_strategy`."""
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
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
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
        chat_template=tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE,
    )
    return model, processor


LLAVA = register(
    Family(
        name="llava",
        components={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector",),
            "llm": ("model.language_model", "lm_head"),
        },
        matches=lambda config: getattr(config, "model_type", None) == "llava",
        model_class=LlavaForConditionalGeneration,
        image_token_counts=image_token_counts,
        image_inputs=image_inputs,
        build=build,
        key_renames=(  # transformers before 4.52 (and 5.x when saving) name LLaVA weights this way
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ),
    )
)
