"""The `llava_next` family entry. `image_newline` (the learned separator between tile rows) is part
of the projector: it is trained with it and saved with it."""

from __future__ import annotations

from transformers import LlavaNextForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.registry import register
from vlmtune.models.skipped import after_feature_layer

LLAVA_NEXT = register(
    Family(
        name="llava_next",
        packing=True,
        components={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector", "model.image_newline"),
            "llm": ("model.language_model", "lm_head"),
        },
        matches=model_type_is("llava_next"),
        unused_layers=after_feature_layer("model.vision_tower"),
        model_class=LlavaNextForConditionalGeneration,
        key_renames=(
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            ("image_newline", "model.image_newline"),
        ),
    )
)
