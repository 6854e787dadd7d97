"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, soft-token projector, Gemma 3 LM."""

from vlmtune.models.gemma3.family import GEMMA3

__all__ = ["GEMMA3"]
