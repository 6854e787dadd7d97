"""MiniCPM-V 2.x (Llama3-V 2.5, V 2.6), which OpenBMB ships as remote code: vlmtune's own
transformers-5 implementation (`remote/`, copied into every folder it writes) and the family entry."""

from vlmtune.models.minicpmv.family import MINICPMV

__all__ = ["MINICPMV"]
