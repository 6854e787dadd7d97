"""The `llava` family entry: components and key renames of `LlavaForConditionalGeneration`, and the
foreign layouts it reads (the original LLaVA repository's folders, XTuner's, Mini-Gemini refused)."""

from __future__ import annotations

from transformers import LlavaForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.llava.build import build
from vlmtune.models.llava.convert import TRANSFORMERS4_RENAMES, XTUNER_EXPORT, XTUNER_RENAMES
from vlmtune.models.llava.layouts import LAYOUTS
from vlmtune.models.llava.merge import merge_parts
from vlmtune.models.registry import register
from vlmtune.models.skipped import after_feature_layer

LLAVA = register(
    Family(
        name="llava",
        packing=True,
        components={
            "vision": ("model.vision_tower",),
            "projector": ("model.multi_modal_projector",),
            "llm": ("model.language_model", "lm_head"),
        },
        matches=model_type_is("llava"),
        unused_layers=after_feature_layer("model.vision_tower"),
        model_class=LlavaForConditionalGeneration,
        build=build,
        key_renames=(
            *TRANSFORMERS4_RENAMES,  # transformers 4's vision towers had a `vision_model.` level
            # transformers before 4.52 (and 5.x when saving) name LLaVA weights this way
            ("language_model.model.", "model.language_model."),
            ("language_model.lm_head.", "lm_head."),
            ("vision_tower.", "model.vision_tower."),
            ("multi_modal_projector.", "model.multi_modal_projector."),
            *XTUNER_RENAMES,  # XTuner's LLaVAModel (pretrained_pth, iter_N.pth)
        ),
        layouts=LAYOUTS,
        merge=merge_parts,
        export_renames=(("xtuner-pth", XTUNER_EXPORT),),
    )
)
