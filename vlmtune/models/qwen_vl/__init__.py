"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: dynamic resolution, merged patches, 3-row multimodal rotary positions."""

from vlmtune.models.qwen_vl.family import QWEN2_5_VL, QWEN2_VL, QWEN3_VL

__all__ = ["QWEN2_VL", "QWEN2_5_VL", "QWEN3_VL"]
