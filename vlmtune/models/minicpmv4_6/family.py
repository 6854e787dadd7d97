"""The `minicpmv4_6` family entry. An image is its overview plus slices
(`<image>...</image><slice>...</slice>`), numbered per sample (`<image_id>0</image_id>`); a batch's
patches are laid side by side along the width of one `pixel_values` row, with `target_sizes` per
patch. The window merger inside the ViT belongs to the vision tower; `model.merger` is the projector."""

from __future__ import annotations

from transformers import MiniCPMV4_6ForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.registry import register

MINICPMV4_6 = register(Family(
    name="minicpmv4_6",
    packing=True,
    components={
        "vision": ("model.vision_tower",),
        "projector": ("model.merger",),
        "llm": ("model.language_model", "lm_head"),
    },
    matches=model_type_is("minicpmv4_6"),
    model_class=MiniCPMV4_6ForConditionalGeneration,
    requires=("torchvision",),
    concat_dims=(("pixel_values", -1),),
))
