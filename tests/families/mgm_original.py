"""Folders laid out exactly as dvlab-research/MGM writes them (read from its train.py, mgm_arch.py and
openclip_encoder.py): a stage-1 folder (`config.json` + `mm_projector.bin` holding the projector, the
mining modules and both towers) and a stage-2 folder (sharded `MGMLlamaForCausalLM` weights with an
index, transformers-4 CLIP names, the ConvNeXt in float16, tokenizer, trainer state)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

VIT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=16, patch_size=8)
RELEASED_TOWERS = {"mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
                   "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"}


def original_state(llm_dir: Path, convnext: dict[str, torch.Tensor], seed: int = 1) -> dict[str, torch.Tensor]:
    """Every tensor an MGM-Llama model holds, under MGM's names."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.2  # noqa: E731
    llm = LlamaForCausalLM.from_pretrained(llm_dir)
    text = llm.config.hidden_size
    torch.manual_seed(seed)
    vit = CLIPVisionModel(CLIPVisionConfig(**VIT))
    hidden, aux = VIT["hidden_size"], sum(convnext[f"stages.{i}.blocks.0.conv_dw.weight"].shape[0] for i in range(4))
    state = dict(llm.state_dict())
    state |= {f"model.vision_tower.vision_tower.vision_model.{k}": v for k, v in vit.state_dict().items()}
    for key, tensor in convnext.items():  # MGM drops the classifier head; its trainer casts the tower to fp16
        if key.startswith(("stem.", "stages.")):
            state[f"model.vision_tower_aux.vision_{key}"] = tensor.half()
    for name, dim_in in (("query", hidden), ("aux", aux), ("val", aux)):
        state |= {f"model.vlm_uni_{name}_projector.0.weight": 1 + r(dim_in), f"model.vlm_uni_{name}_projector.0.bias": r(dim_in),
                  f"model.vlm_uni_{name}_projector.1.weight": r(hidden, dim_in), f"model.vlm_uni_{name}_projector.1.bias": r(hidden)}
    state |= {"model.mm_projector.0.weight": r(text, hidden), "model.mm_projector.0.bias": r(text),
              "model.mm_projector.2.weight": r(text, text), "model.mm_projector.2.bias": r(text)}
    return state


def original_config(llm_dir: Path, towers: dict, image_size_aux: int = 32, image_grid: int = 1,
                    image_global: bool = False) -> dict:
    raw = json.loads((llm_dir / "config.json").read_text())
    return {**raw, "_name_or_path": str(llm_dir), "architectures": ["MGMLlamaForCausalLM"], "model_type": "mgm",
            **towers, "mm_hidden_size": VIT["hidden_size"], "mm_hidden_size_aux": 72, "mm_projector_type": "mlp2x_gelu",
            "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
            "mm_use_im_patch_token": False, "mm_projector_lr": None, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
            "freeze_mm_mlp_adapter": False, "image_size_aux": image_size_aux, "image_grid": image_grid, "image_global": image_global,
            "image_aspect_ratio": "pad", "optimize_vision_tower": False, "optimize_vision_tower_aux": False,
            "tokenizer_padding_side": "right", "tokenizer_model_max_length": 2048, "torch_dtype": "bfloat16",
            "transformers_version": "4.36.2", "use_cache": True}


def write_stage2(folder: Path, llm_dir: Path, state: dict, towers: dict = RELEASED_TOWERS, **config) -> Path:
    """`trainer.save_model`: two shards and their index, config, generation config, tokenizer, trainer state.
    `config`: image_size_aux, image_grid, image_global (MGM-HD: 1536, 2, true)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original_config(llm_dir, towers, **config), indent=2))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(folder / name), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": {k: name for name, names in shards.items() for k in names}}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (llm_dir / name).is_file():
            shutil.copy(llm_dir / name, folder / name)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10, "epoch": 1.0, "max_steps": 10}))
    return folder


def write_stage1(folder: Path, llm_dir: Path, state: dict, towers: dict = RELEASED_TOWERS) -> Path:
    """`safe_save_model_for_hf_trainer` with tune_mm_mlp_adapter: config + mm_projector.bin, whose filter
    (`mm_projector`, `vlm_uni`, `vision_tower`, `vision_stages`) also takes in both towers."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(original_config(llm_dir, towers), indent=2))
    keep = ("mm_projector", "vision_resampler", "vlm_uni", "vision_tower", "vision_fpn", "vision_stages")
    torch.save({k: v for k, v in state.items() if any(m in k for m in keep)}, folder / "mm_projector.bin")
    return folder
