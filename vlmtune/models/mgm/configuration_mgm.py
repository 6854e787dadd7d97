"""Configuration of a Mini-Gemini (MGM) model: a low-resolution ViT, a high-resolution ConvNeXt whose
features each ViT token mines over its own window, a projector and any causal LM.

Self-contained (imports only transformers): saved model folders carry this file, so plain
transformers loads them with `trust_remote_code=True`.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class MGMConfig(PreTrainedConfig):
    model_type = "mgm"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "vision_aux_config": SubConfigSpec(config_class=AutoConfig, model_type="convnext"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    vision_aux_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_id: int = 32000
    vision_feature_layer: int = -2  # MGM's mm_vision_select_layer
    vision_feature_select_strategy: str = "default"  # "default" drops the CLS token (MGM's "patch")
    projector_type: str = "mlp2x_gelu"  # Linear-GELU-Linear, or "linear"
    image_size_aux: int = 768
    image_grid: int = 1  # MGM-HD: the ViT sees image_grid x image_grid crops, each mining its part of the aux map
    image_global: bool = False  # MGM-HD: plus a whole-image view, whose tokens come first
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if not isinstance(self.image_grid, int) or self.image_grid < 1:
            raise ValueError(f"MGMConfig: image_grid={self.image_grid!r}; use 1 (one view) or 2 (MGM-HD's 2x2 crops)")
        if self.image_global and self.image_grid == 1:
            raise ValueError("MGMConfig: image_global adds a whole-image view to MGM-HD's crops; it needs image_grid >= 2")

    @property
    def image_views(self) -> int:
        """ViT inputs per image: the crops, then the global view (the processor's order)."""
        return self.image_grid**2 + (1 if self.image_global and self.image_grid > 1 else 0)


__all__ = ["MGMConfig"]
