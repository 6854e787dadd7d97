"""Tiny random MiniCPM-V 2.x folders laid out as OpenBMB ships them: `config.json` with `auto_map`,
`version`, `query_num`, `slice_config`, `batch_vision_input`, flat LLM fields and `vision_config`;
`preprocessor_config.json` with the slicing fields; a tokenizer with MiniCPM-V's special tokens, the
llama3 (2.5) or chatml (2.6) template and an `auto_map` to OpenBMB's tokenizer class; weights named
`vpm.*`, `resampler.*`, `llm.*`; and `.py` files that fail loudly if anything executes them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from families.tiny import tokenizer
from vlmtune.models.minicpmv.remote.configuration_minicpmv import MiniCPMVConfig
from vlmtune.models.minicpmv.remote.modeling_minicpmv import MiniCPMV

SPECIAL = ["<unk>", "<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>",
           "<ref>", "</ref>", "<box>", "</box>"]
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
VISION = {"hidden_size": 32, "image_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
          "num_hidden_layers": 2, "patch_size": 4}
LLM = {"hidden_size": 256, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
REMOTE = {"2.5": ("configuration_minicpm.py", "modeling_minicpmv.py", "resampler.py", "modeling_navit_siglip.py",
                  "image_processing_minicpmv.py", "processing_minicpmv.py", "tokenization_minicpmv_fast.py"),
          "2.6": ("configuration_minicpm.py", "modeling_minicpmv.py", "resampler.py", "modeling_navit_siglip.py",
                  "image_processing_minicpmv.py", "processing_minicpmv.py", "tokenization_minicpmv_fast.py")}


def build_original(folder: Path, version: str = "2.6", seed: int = 0) -> Path:
    """A tiny OpenBMB-layout MiniCPM-V `version` folder (2.5: Llama-3 LLM; 2.6: Qwen2 LLM)."""
    folder.mkdir(parents=True, exist_ok=True)
    v26 = version == "2.6"
    extra = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"] if not v26 else []
    tok = tokenizer("bytelevel_bos" if not v26 else "bytelevel", SPECIAL + extra, folder / "spm")
    tok.unk_token = "<unk>"
    tok.chat_template = CHATML if v26 else LLAMA3
    if not v26:
        tok.eos_token = "<|eot_id|>"
    tok.save_pretrained(folder)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config.update(tokenizer_class="MiniCPMVTokenizerFast",
                      auto_map={"AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))

    query_num, slice_config = 4, {"max_slice_nums": 4, "patch_size": 4, "scale_resolution": 16, "model_type": "minicpmv"}
    ids = {k: t and tok.convert_tokens_to_ids(t) for k, t in (("pad", tok.pad_token), ("bos", tok.bos_token), ("eos", tok.eos_token))}
    config = {
        "_name_or_path": f"openbmb/MiniCPM-V-{version.replace('.', '_')}", "architectures": ["MiniCPMV"],
        "auto_map": {"AutoConfig": "configuration_minicpm.MiniCPMVConfig", "AutoModel": "modeling_minicpmv.MiniCPMV",
                     "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV"},
        "model_type": "minicpmv", "version": float(version), "query_num": query_num, "image_size": 16, "patch_size": 4,
        "slice_config": slice_config, "slice_mode": True, "batch_vision_input": True, "drop_vision_last_layer": False,
        "use_image_id": v26, "vision_batch_size": 16, "vocab_size": len(tok), "hidden_act": "silu",
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "torch_dtype": "float32",
        "rope_theta": 10000.0, "initializer_range": 0.02, "use_cache": True, **LLM,
        "vision_config": {**VISION, "model_type": "siglip_vision_model" if v26 else "idefics2"},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    preprocessor = {
        "image_processor_type": "MiniCPMVImageProcessor", "processor_class": "MiniCPMVProcessor",
        "auto_map": {"AutoProcessor": "processing_minicpmv.MiniCPMVProcessor",
                     "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor"},
        "max_slice_nums": 4, "scale_resolution": 16, "patch_size": 4, "use_image_id": v26, "image_feature_size": query_num,
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>", "unk": "<unk>",
        "im_id_start": "<image_id>", "im_id_end": "</image_id>", "slice_mode": True,
        "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5], "version": float(version)}
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]}))
    torch.manual_seed(seed)
    model = MiniCPMV(MiniCPMVConfig(**{k: v for k, v in config.items() if k not in ("auto_map", "architectures")}))
    with torch.no_grad():  # LayerNorms away from 1/0 so that a wrong one shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name or name.startswith("resampler.ln"):
                p.add_(0.1 * torch.randn_like(p))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for name in REMOTE[version]:
        (folder / name).write_text('raise RuntimeError("the original folder\'s code was executed")\n')
    return folder
