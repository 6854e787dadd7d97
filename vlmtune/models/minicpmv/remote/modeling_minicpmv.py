"""MiniCPM-V 2.x (Llama3-V 2.5, V 2.6) for transformers 5: `vpm` (a SigLIP / Idefics2-style NaViT
encoder), `resampler` (`query_num` learned queries per slice) and `llm` (Llama or Qwen2 causal LM).

Self-contained, with OpenBMB's weight names and config fields, so OpenBMB's folders load into it and
the folders written with it load in OpenBMB's code and servers. Two ways in:
- transformers style: `input_ids` + `pixel_values` [slices, 3, patch, len * patch] + `tgt_sizes`
  [slices, 2]; each slice's features replace the `<unk>` placeholders inside `<image>`/`<slice>`
  blocks, in order, and the counts must match;
- OpenBMB style: `model(data={...})` with per-sample lists and `image_bound`, and `chat(...)`.
"""

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoProcessor, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder

from .configuration_minicpmv import MiniCPMVConfig
from .resampler_minicpmv import Resampler


class NaViTEmbeddings(nn.Module):
    """Patches of a slice laid in one row ([B, 3, P, L*P]); each patch gets the learned position of
    its fractional (row, col) in the `image_size / patch_size` grid (NaViT bucketing)."""

    def __init__(self, config):
        super().__init__()
        self.patch_size = config.patch_size
        self.per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, config.patch_size, config.patch_size)
        self.position_embedding = nn.Embedding(self.per_side ** 2, config.hidden_size)

    def forward(self, pixel_values, tgt_sizes):
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # [B, L, D]
        boundaries = torch.arange(1 / self.per_side, 1.0, 1 / self.per_side)
        position_ids = torch.zeros(x.shape[0], x.shape[1], dtype=torch.long)
        for i, (h, w) in enumerate(tgt_sizes.tolist()):
            rows = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / h), boundaries, right=True)
            cols = torch.bucketize(torch.arange(0, 1 - 1e-6, 1 / w), boundaries, right=True)
            position_ids[i, : h * w] = (rows[:, None] * self.per_side + cols).flatten()
        return x + self.position_embedding(position_ids.to(x.device))


class MiniCPMVVisionTower(nn.Module):
    """`vpm`: embeddings, Idefics2's encoder layers (SigLIP weight names), post layer norm."""

    def __init__(self, config: Idefics2VisionConfig, drop_last_layer: bool = False):
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.embeddings = NaViTEmbeddings(config)
        self.encoder = Idefics2Encoder(config)
        if drop_last_layer:
            self.encoder.layers = self.encoder.layers[:-1]
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values, tgt_sizes):
        hidden = self.embeddings(pixel_values, tgt_sizes)  # [B, L, D]
        lengths = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(hidden.device)
        mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=mask)
        hidden = self.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.post_layernorm(hidden))


class MiniCPMVPreTrainedModel(PreTrainedModel):
    config_class = MiniCPMVConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Idefics2EncoderLayer", "LlamaDecoderLayer", "Qwen2DecoderLayer"]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim ** -0.5)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif hasattr(module, "in_proj_weight"):
            init.xavier_uniform_(module.in_proj_weight)
            init.zeros_(module.in_proj_bias)


class MiniCPMV(MiniCPMVPreTrainedModel, GenerationMixin):
    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.llm = AutoModelForCausalLM.from_config(config.llm_config())
        vision = Idefics2VisionConfig(**config.vision_fields())
        vision._attn_implementation = config._attn_implementation or "sdpa"
        self.vpm = MiniCPMVVisionTower(vision, config.drop_vision_last_layer)
        hidden = self.llm.config.hidden_size
        self.resampler = Resampler(config.query_num, hidden, max(hidden // 128, 1), vision.hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def image_features(self, pixel_values, tgt_sizes):
        """[slices, 3, P, L*P] (zero-padded along the width) -> [slices, query_num, hidden]."""
        tgt_sizes = tgt_sizes.long()
        longest = int((tgt_sizes[:, 0] * tgt_sizes[:, 1]).max())
        pixel_values = pixel_values[..., : longest * self.vpm.embeddings.patch_size]
        features = self.vpm(pixel_values, tgt_sizes).last_hidden_state
        return self.resampler(features, tgt_sizes)

    def placeholder_mask(self, input_ids):
        """Positions strictly inside `<image>...</image>` (and, from 2.6, `<slice>...</slice>`) blocks."""
        ids = self.config.block_token_ids()
        starts = sum((input_ids == t).long() for t in ids["start"]).cumsum(-1)
        ends = sum((input_ids == t).long() for t in ids["end"]).cumsum(-1)
        inside = (starts - ends) > 0
        return inside & ~sum((input_ids == t) for t in ids["start"]).bool()

    def embed(self, input_ids, pixel_values=None, tgt_sizes=None, image_bound=None):
        """Token embeddings with each slice's features in its placeholders; the counts must agree."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is None or pixel_values.numel() == 0:
            return embeds
        features = self.image_features(pixel_values, tgt_sizes).to(embeds.dtype)  # [slices, Q, D]
        if image_bound is not None:
            mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for row, bounds in enumerate(image_bound):
                for start, end in bounds.tolist() if hasattr(bounds, "tolist") else bounds:
                    mask[row, start:end] = True
        else:
            mask = self.placeholder_mask(input_ids)
        if int(mask.sum()) != features.shape[0] * features.shape[1]:
            raise ValueError(f"the text has {int(mask.sum())} image placeholder token(s) but the images give "
                             f"{features.shape[0]} slice(s) x {features.shape[1]} = {features.shape[0] * features.shape[1]} "
                             "features; encode the text with this model's processor")
        return embeds.masked_scatter(mask[..., None], features.reshape(-1, features.shape[-1]))

    def forward(self, input_ids=None, pixel_values=None, tgt_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, data=None, image_bound=None, **kwargs):
        if data is not None:  # OpenBMB's calling convention
            input_ids, pixel_values, tgt_sizes, image_bound = from_openbmb_data(data)
            position_ids = data.get("position_ids", position_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, tgt_sizes, image_bound)
        return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=past_key_values, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids=None, pixel_values=None, tgt_sizes=None, attention_mask=None, image_bound=None,
                 **kwargs):
        """Returns the prompt followed by the new tokens (transformers' convention for decoder-only models)."""
        kwargs.pop("tokenizer", None)
        embeds = self.embed(input_ids, pixel_values, tgt_sizes, image_bound)
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, out.to(input_ids.device)], dim=1)

    def chat(self, image=None, msgs=None, tokenizer=None, processor=None, max_new_tokens=2048, sampling=True,
             system_prompt="", stream=False, max_slice_nums=None, use_image_id=None, **kwargs):
        """OpenBMB's `chat`: `msgs` as [{"role", "content"}] with content a string or a list of PIL
        images and strings; `image` goes first in the first message. Sampling defaults are OpenBMB's."""
        if stream:
            raise NotImplementedError("chat(stream=True) is not supported by this implementation; use stream=False")
        processor = processor or getattr(self, "processor", None) or AutoProcessor.from_pretrained(
            self.config._name_or_path, trust_remote_code=True)
        tokenizer = tokenizer or processor.tokenizer
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        images = []
        for i, msg in enumerate(msgs):
            content = msg["content"] if isinstance(msg["content"], list) else [msg["content"]]
            if i == 0 and image is not None:
                content = [image] + content
            text = ""
            for part in content:
                if isinstance(part, str):
                    text += part
                else:
                    images.append(part.convert("RGB"))
                    text += processor.image_token + "\n"
            messages.append({"role": msg["role"], "content": text})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = processor(text=prompt, images=images or None, return_tensors="pt", max_slice_nums=max_slice_nums,
                           use_image_id=use_image_id).to(self.device)
        options = dict(top_p=0.8, top_k=100, temperature=0.7, repetition_penalty=1.05) if sampling else {}
        options.update(kwargs)
        out = self.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **options)
        return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def from_openbmb_data(data):
    """OpenBMB's `data` dict (per-sample lists) -> flat tensors; `image_bound` is kept as given."""
    slices = [p for sample in data["pixel_values"] for p in sample]
    sizes = [s for s in data["tgt_sizes"] if s is not None and len(s)]
    if not slices:
        return data["input_ids"], None, None, None
    width = max(p.shape[-1] for p in slices)
    pixel_values = torch.stack([nn.functional.pad(p, (0, width - p.shape[-1])) for p in slices])
    return data["input_ids"], pixel_values, torch.cat([torch.as_tensor(s) for s in sizes]).long(), data["image_bound"]
