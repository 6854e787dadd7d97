"""The `gemma3` family entry. An image is `\\n\\n<start_of_image>` + soft tokens + `<end_of_image>\\n\\n`
(the processor's replacement for the boi token); training needs `token_type_ids` (1 on image
tokens), which give the image tokens bidirectional attention."""

from __future__ import annotations

from transformers import Gemma3ForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.registry import register

GEMMA3 = register(Family(
    name="gemma3",
    components={
        "vision": ("model.vision_tower",),
        "projector": ("model.multi_modal_projector",),
        "llm": ("model.language_model", "lm_head"),
    },
    matches=model_type_is("gemma3"),
    model_class=Gemma3ForConditionalGeneration,
    token_type_keys=("token_type_ids",),
))
