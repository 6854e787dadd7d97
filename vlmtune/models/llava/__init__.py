"""LLaVA (`LlavaForConditionalGeneration`): vision tower -> multi-modal projector -> language model."""

from vlmtune.models.llava.build import build, build_from_parts, load_vision
from vlmtune.models.llava.family import LLAVA

__all__ = ["LLAVA", "build", "build_from_parts", "load_vision"]
