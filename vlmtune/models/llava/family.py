"""The `llava` family entry: components and key renames of `LlavaForConditionalGeneration`."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.llava.build import build
from vlmtune.models.registry import register

LLAVA = register(
    Family(
        name="llava",
        components={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector",),
            "llm": ("model.language_model", "lm_head"),
        },
        matches=model_type_is("llava"),
        model_class=LlavaForConditionalGeneration,
        build=build,
        key_renames=(  # transformers before 4.52 (and 5.x when saving) name LLaVA weights this way
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
        ),
    )
)
