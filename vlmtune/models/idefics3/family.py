"""The `idefics3` and `smolvlm` family entries. Their processors write each tile as
`<fake_token_around_image><row_i_col_j><image>...` and the global image as `<global-img>`; the whole
run, markers included, is the image's block (the processor's replacement text). Per sample
`pixel_values` is [1, images, 3, H, W]; the collator zero-pads the image dim, and both models drop
all-zero images as padding."""

from __future__ import annotations

from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.registry import register

COMPONENTS = {
    "vision": ("model.vision_model",),
    "projector": ("model.connector",),
    "llm": ("model.text_model", "lm_head"),
}

IDEFICS3 = register(Family(
    name="idefics3",
    packing=True,
    components=COMPONENTS,
    matches=model_type_is("idefics3"),
    model_class=Idefics3ForConditionalGeneration,
))
SMOLVLM = register(Family(
    name="smolvlm",
    packing=True,
    components=COMPONENTS,
    matches=model_type_is("smolvlm"),
    model_class=SmolVLMForConditionalGeneration,
    requires=("torchvision", "num2words"),
))
