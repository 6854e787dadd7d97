"""Mini-Gemini (MGM) as a transformers model: CLIP ViT tokens (low resolution) each attend over their
own window of ConvNeXt features (high resolution), the result is added to the ViT feature, and a
projector maps it into the LLM's embeddings at the image placeholders.

Self-contained (imports only transformers and torch): saved folders carry this file, so plain
transformers and PEFT load them with `trust_remote_code=True`, vlmtune not installed.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mgm import MGMConfig


# transformers 5.24 renamed the outputs' `past_key_values` field to `cache` (and refuses the old name in
# a new output class): this file runs under every transformers 5, so it uses the name the installed one has
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MGMNormLinear(nn.Module):
    """LayerNorm then Linear: one of the mining projections."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.proj(self.norm(x))


class MGMMining(nn.Module):
    """Patch-info mining: each low-res token (query) attends over the high-res features of its own
    window (keys, values); the mean over the query's single row is the token's mined feature."""

    def __init__(self, config: MGMConfig):
        super().__init__()
        dim = config.vision_config.hidden_size
        dim_aux = sum(config.vision_aux_config.hidden_sizes)  # every ConvNeXt stage, concatenated (2880 for -L)
        self.query = MGMNormLinear(dim, dim)
        self.key = MGMNormLinear(dim_aux, dim)
        self.value = MGMNormLinear(dim_aux, dim)

    def forward(self, tokens: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        batch, count, _ = tokens.shape  # [batch, side*side, dim]
        side = int(round(count ** 0.5))
        height, width = aux.shape[-2:]  # aux: [batch, dim_aux, height, width]
        if side * side != count or height != width or height % side:
            raise ValueError(f"MGM mining needs a square grid of {count} ViT tokens and a square aux feature map "
                             f"divisible by it; got aux {height}x{width}: check image_size_aux against the ViT size")
        window = height // side
        aux = aux.permute(0, 2, 3, 1).reshape(batch, side, window, side, window, -1)
        aux = aux.permute(0, 1, 3, 2, 4, 5).reshape(batch, count, window * window, -1)  # [batch, tokens, window², dim_aux]
        query = self.query(tokens)[:, :, None]  # [batch, tokens, 1, dim]
        key, value = self.key(aux), self.value(aux)  # [batch, tokens, window², dim]
        attention = (query @ (key.transpose(-1, -2) / key.shape[-1] ** 0.5)).nan_to_num()
        return (attention.softmax(-1) @ value).mean(2)  # [batch, tokens, dim]


class MGMProjector(nn.Module):
    def __init__(self, config: MGMConfig):
        super().__init__()
        dim, text = config.vision_config.hidden_size, config.text_config.hidden_size
        self.linear_1 = nn.Linear(dim, text)
        if config.projector_type == "mlp2x_gelu":
            self.act = nn.GELU()
            self.linear_2 = nn.Linear(text, text)
        elif config.projector_type != "linear":
            raise ValueError(f"MGM projector_type {config.projector_type!r}: use 'mlp2x_gelu' or 'linear'")

    def forward(self, x):
        x = self.linear_1(x)
        return self.linear_2(self.act(x)) if hasattr(self, "linear_2") else x


class MGMPreTrainedModel(PreTrainedModel):
    config_class = MGMConfig
    config: MGMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class MGMModel(MGMPreTrainedModel):
    def __init__(self, config: MGMConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.vision_tower_aux = AutoModel.from_config(config.vision_aux_config)
        self.mining = MGMMining(config)
        self.multi_modal_projector = MGMProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def aux_features(self, pixel_values_aux: torch.Tensor) -> torch.Tensor:
        """Every ConvNeXt stage output, upsampled to the first stage's size, concatenated on channels."""
        out = self.vision_tower_aux(pixel_values_aux, output_hidden_states=True)
        stages = out.hidden_states[1:]  # hidden_states[0] is the stem output
        size = stages[0].shape[-2:]
        resized = [stages[0]] + [F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False).to(s.dtype)
                                 for s in stages[1:]]
        return torch.cat(resized, dim=1)  # [batch, sum(hidden_sizes), height, width]

    def get_image_features(self, pixel_values: torch.Tensor, pixel_values_aux: torch.Tensor) -> torch.Tensor:
        """`pixel_values`: [images * views, 3, size, size], each image's crops row by row, then its global view
        (MGM-HD; one view otherwise). `pixel_values_aux`: [images, 3, size_aux, size_aux]. Returns
        [images, views * tokens, text hidden], tokens ordered global view first, then the crops (MGM's order)."""
        config, dtype = self.config, self.vision_tower.dtype
        images, views, grid = pixel_values_aux.shape[0], config.image_views, config.image_grid
        if pixel_values.shape[0] != images * views:
            raise ValueError(f"MGM: {pixel_values.shape[0]} low-resolution views for {images} high-resolution image(s); "
                             f"image_grid={grid}, image_global={config.image_global} needs {views} per image: "
                             "use the MGM processor saved with this model")
        out = self.vision_tower(pixel_values.to(dtype), output_hidden_states=True)
        tokens = out.hidden_states[config.vision_feature_layer]
        if config.vision_feature_select_strategy == "default":
            tokens = tokens[:, 1:]
        tokens = tokens.reshape(images, views, *tokens.shape[1:])
        aux = self.aux_features(pixel_values_aux.to(self.vision_tower_aux.dtype)).to(tokens.dtype)
        crops = tokens[:, : grid * grid].flatten(0, 1)
        if grid > 1:  # each crop mines its own part of the aux map: [images * grid², dim_aux, h / grid, w / grid]
            parts = aux.reshape(*aux.shape[:2], grid, aux.shape[-2] // grid, grid, aux.shape[-1] // grid)
            parts = parts.permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        else:
            parts = aux
        mined = (crops + self.mining(crops, parts)).reshape(images, -1, tokens.shape[-1])
        if views > grid * grid:  # the global view mines the whole aux map, downsampled to its scale
            whole = F.interpolate(aux.float(), scale_factor=1 / grid, mode="bilinear", align_corners=False).to(aux.dtype)
            mined = torch.cat([tokens[:, -1] + self.mining(tokens[:, -1], whole), mined], dim=1)
        return self.multi_modal_projector(mined)  # [images, views * tokens, text hidden]

    def forward(self, input_ids=None, pixel_values=None, pixel_values_aux=None, attention_mask=None,
                position_ids=None, past_key_values=None, inputs_embeds=None, use_cache=None, **kwargs):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            if pixel_values_aux is None:
                raise ValueError("MGM needs `pixel_values_aux` (the high-resolution image) with `pixel_values`; "
                                 "use the MGM processor, which returns both")
            features = self.get_image_features(pixel_values, pixel_values_aux).to(inputs_embeds.dtype)
            mask = input_ids == self.config.image_token_id
            if int(mask.sum()) != features.shape[0] * features.shape[1]:
                raise ValueError(f"image placeholders and image features do not match: {int(mask.sum())} tokens, "
                                 f"{features.shape[0]} image(s) x {features.shape[1]} features")
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, past_key_values=past_key_values,
                                   use_cache=use_cache, **kwargs)


class MGMForConditionalGeneration(MGMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: MGMConfig):
        super().__init__(config)
        self.model = MGMModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_image_features(self, pixel_values, pixel_values_aux):
        return self.model.get_image_features(pixel_values, pixel_values_aux)

    def forward(self, input_ids=None, pixel_values=None, pixel_values_aux=None, attention_mask=None,
                position_ids=None, past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                logits_to_keep=0, **kwargs):
        out = self.model(input_ids=input_ids, pixel_values=pixel_values, pixel_values_aux=pixel_values_aux,
                         attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):  # positions, or a [batch, seq] mask (-> [kept, hidden])
            hidden = hidden[logits_to_keep] if logits_to_keep.dtype == torch.bool else hidden[:, logits_to_keep]
        elif logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions,
                                      **{CACHE_FIELD: getattr(out, CACHE_FIELD)})


__all__ = ["MGMForConditionalGeneration", "MGMModel", "MGMPreTrainedModel"]
