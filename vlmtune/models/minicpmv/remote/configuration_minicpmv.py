"""Configuration of MiniCPM-V 2.x (Llama3-V 2.5, V 2.6) as OpenBMB lays it out in `config.json`.

Self-contained (this file travels into every model folder vlmtune writes, and `trust_remote_code=True`
loads it with plain transformers 5). The language model's fields sit at the top level, as in OpenBMB's
config (their class subclasses LlamaConfig / Qwen2Config); `llm_config()` rebuilds them for the LLM.
`version` picks the LLM (2.5: Llama, 2.6: Qwen2) unless `llm_model_type` names it.
"""

from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

OWN_FIELDS = ("version", "query_num", "image_size", "patch_size", "slice_config", "slice_mode",
              "batch_vision_input", "use_image_id", "drop_vision_last_layer", "vision_batch_size",
              "vision_config", "llm_model_type", "auto_map", "architectures", "model_type",
              "transformers_version", "dtype", "torch_dtype", "_name_or_path", "im_start_id", "im_end_id",
              "slice_start_id", "slice_end_id")
DEFAULT_SLICE_CONFIG = {"max_slice_nums": 9, "patch_size": 14, "scale_resolution": 448}
DEFAULT_VISION = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "num_attention_heads": 16,
                  "num_hidden_layers": 27, "patch_size": 14}


class MiniCPMVConfig(PretrainedConfig):
    model_type = "minicpmv"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, version=2.6, query_num=64, image_size=448, patch_size=14, slice_config=None,
                 slice_mode=True, batch_vision_input=True, use_image_id=None, drop_vision_last_layer=False,
                 vision_batch_size=16, vision_config=None, llm_model_type=None, im_start_id=None, im_end_id=None,
                 slice_start_id=None, slice_end_id=None, **kwargs):
        self.version = version
        self.query_num = query_num
        self.image_size = image_size
        self.patch_size = patch_size
        self.slice_config = dict(DEFAULT_SLICE_CONFIG, **(slice_config or {}))
        self.slice_mode = slice_mode
        self.batch_vision_input = batch_vision_input
        self.use_image_id = (float(version) >= 2.6) if use_image_id is None else use_image_id
        self.drop_vision_last_layer = drop_vision_last_layer
        self.vision_batch_size = vision_batch_size
        vision = vision_config.to_dict() if hasattr(vision_config, "to_dict") else dict(vision_config or DEFAULT_VISION)
        self.vision_config = vision
        self.llm_model_type = llm_model_type or ("qwen2" if float(version) >= 2.6 else "llama")
        # ids of `<image>`, `</image>`, `<slice>`, `</slice>`: OpenBMB's processor computes `image_bound`
        # from them; we record them so that `input_ids` alone locate the placeholders
        self.im_start_id, self.im_end_id = im_start_id, im_end_id
        self.slice_start_id, self.slice_end_id = slice_start_id, slice_end_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    def llm_config(self):
        """The LLM's config from the top-level fields (OpenBMB keeps them there)."""
        fields = {k: v for k, v in self.to_dict().items() if k not in OWN_FIELDS}
        text = CONFIG_MAPPING[self.llm_model_type](**fields)
        text._attn_implementation = self._attn_implementation
        return text

    def vision_fields(self):
        """Vision encoder fields (SigLIP / Idefics2 naming), without OpenBMB's `model_type` tag."""
        return {k: v for k, v in self.vision_config.items() if k not in ("model_type", "transformers_version")}

    def block_token_ids(self):
        """Tokens opening and closing placeholder blocks: `<image>` (2.5 nests slices' `<image>`
        blocks inside one `<slice>`), and from 2.6 also `<slice>` (one per slice)."""
        if self.im_start_id is None or self.im_end_id is None:
            raise ValueError("config.json has no im_start_id / im_end_id (the ids of <image> and </image>): pass "
                             "`image_bound` as OpenBMB's processor computes it, or convert the folder with vlmtune")
        start, end = [self.im_start_id], [self.im_end_id]
        if float(self.version) >= 2.6 and self.slice_start_id is not None:
            start.append(self.slice_start_id)
            end.append(self.slice_end_id)
        return {"start": start, "end": end}
