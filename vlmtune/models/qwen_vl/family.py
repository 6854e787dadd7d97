"""The `qwen2_vl`, `qwen2_5_vl` and `qwen3_vl` family entries.

The projector (`model.visual.merger`, and Qwen3-VL's deepstack mergers) sits inside the vision
tower's module path: the longest prefix decides, so it is its own component. Images of different
sizes take different numbers of tokens (`image_grid_thw`); the processor's `<|image_pad|>` run sits
between `<|vision_start|>` and `<|vision_end|>`, which belong to the image's block. Position ids are
the model's own 3-row rope index, computed per sample so packed rows can reuse them.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from vlmtune.models.family import Family, model_type_is
from vlmtune.models.registry import register

WRAPPERS = ("<|vision_start|>", "<|vision_end|>")
LLM = ("model.language_model", "lm_head")
RENAMES = (  # transformers before 4.52 saved the decoder as `model.` and the tower as `visual.`
    ("model.layers.", "model.language_model.layers."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.norm.", "model.language_model.norm."),
    ("visual.", "model.visual."),
)


def rope_positions(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """[3, batch, seq] positions from the model's own `get_rope_index` (text-only rows: 0..n-1 thrice)."""
    inner = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    positions, _ = inner.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
        attention_mask=batch.get("attention_mask"))
    return positions


def _family(name: str, model_class: type, projector: tuple[str, ...]) -> Family:
    return register(Family(
        name=name,
        packing=True,
        components={"vision": ("model.visual",), "projector": projector, "llm": LLM},
        matches=model_type_is(name),
        model_class=model_class,
        image_wrappers=WRAPPERS,
        key_renames=RENAMES,
        position_ids=rope_positions,
        requires=("torchvision",),
        token_type_keys=("mm_token_type_ids",),
    ))


QWEN2_VL = _family("qwen2_vl", Qwen2VLForConditionalGeneration, ("model.visual.merger",))
QWEN2_5_VL = _family("qwen2_5_vl", Qwen2_5_VLForConditionalGeneration, ("model.visual.merger",))
QWEN3_VL = _family("qwen3_vl", Qwen3VLForConditionalGeneration,
                   ("model.visual.merger", "model.visual.deepstack_merger_list"))
