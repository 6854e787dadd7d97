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
    image_grid: int = 1  # MGM-HD splits the image into image_grid x image_grid views (not supported yet)
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid != 1:
            raise ValueError(f"MGMConfig: image_grid={self.image_grid} (MGM-HD) is not supported; use image_grid=1")


__all__ = ["MGMConfig"]
