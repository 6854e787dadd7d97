"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): any-resolution tiles plus a learned row separator."""

from vlmtune.models.llava_next.family import LLAVA_NEXT

__all__ = ["LLAVA_NEXT"]
