"""The `mgm` family entry: Mini-Gemini's dual encoder (CLIP ViT + ConvNeXt), mining, projector, LLM.

vlmtune implements the model itself (`modeling_mgm.py` and friends, self-contained). Importing this
module registers the classes with transformers' Auto classes in this process, and marks them for
`save_pretrained` to copy their code into every folder it writes (with `auto_map`), so saved folders
load in plain transformers with `trust_remote_code=True`."""

from __future__ import annotations

from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

from vlmtune.models.family import Family, Layout
from vlmtune.models.mgm.build import build
from vlmtune.models.mgm.configuration_mgm import MGMConfig
from vlmtune.models.mgm.modeling_mgm import MGMForConditionalGeneration
from vlmtune.models.mgm.original import describe, is_stage1, is_stage2, load_original
from vlmtune.models.mgm.processing_mgm import MGMImageProcessor, MGMProcessor
from vlmtune.models.registry import register

AutoConfig.register("mgm", MGMConfig, exist_ok=True)
AutoModelForImageTextToText.register(MGMConfig, MGMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(MGMConfig, fast_image_processor_class=MGMImageProcessor, exist_ok=True)
AutoProcessor.register(MGMConfig, MGMProcessor, exist_ok=True)
MGMConfig.register_for_auto_class()
MGMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
MGMImageProcessor.register_for_auto_class("AutoImageProcessor")
MGMProcessor.register_for_auto_class("AutoProcessor")


def is_vlmtune_mgm(config) -> bool:
    """Our MGM, not an original one (`MGMLlamaForCausalLM` and friends: read through the layouts below)."""
    original = any(a.startswith("MGM") and a.endswith("ForCausalLM") for a in getattr(config, "architectures", None) or [])
    return getattr(config, "model_type", None) == "mgm" and not original


MGM = register(Family(
    name="mgm",
    packing=True,
    components={
        "vision": ("model.vision_tower",),
        "vision_aux": ("model.vision_tower_aux",),
        "mining": ("model.mining",),
        "projector": ("model.multi_modal_projector",),
        "llm": ("model.language_model", "lm_head"),
    },
    matches=is_vlmtune_mgm,
    model_class=MGMForConditionalGeneration,
    build=build,
    layouts=(
        Layout(name="original Mini-Gemini folder (MGM*ForCausalLM)", detect=is_stage2, load=load_original,
               describe=describe, hint="vlmtune convert it, or give it as model.path"),
        Layout(name="original Mini-Gemini stage-1 folder (config.json + mm_projector.bin)", detect=is_stage1,
               load=load_original, describe=describe,
               hint="its LLM is the folder config.json's _name_or_path names (vlmtune convert --llm to give another)"),
    ),
    requires=("torchvision",),
    notes="Mini-Gemini: low-res ViT tokens mine their window of high-res ConvNeXt features",
))
