"""MiniCPM-V 4.6, native in transformers 5.23 (`MiniCPMV4_6ForConditionalGeneration`)."""

from vlmtune.models.minicpmv4_6.family import MINICPMV4_6

__all__ = ["MINICPMV4_6"]
