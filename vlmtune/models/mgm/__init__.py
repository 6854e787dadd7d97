"""Mini-Gemini (MGM): a CLIP ViT, a ConvNeXt at high resolution, patch-info mining, projector, LLM."""

from vlmtune.models.mgm.family import MGM

__all__ = ["MGM"]
