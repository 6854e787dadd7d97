"""Idefics3 and SmolVLM: image splitting into tiles plus a global image, pixel-shuffle connector."""

from vlmtune.models.idefics3.family import IDEFICS3, SMOLVLM

__all__ = ["IDEFICS3", "SMOLVLM"]
