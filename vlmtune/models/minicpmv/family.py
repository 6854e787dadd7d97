"""The `minicpmv` family: OpenBMB's 2.x folders (`vpm`, `resampler`, `llm`) loaded into vlmtune's
implementation in `remote/` without executing the folder's code.

The implementation is registered with transformers' Auto classes under `minicpmv`, so transformers
resolves these folders to it locally (their `auto_map` is only followed with `trust_remote_code`),
and `register_for_auto_class` makes `save_pretrained` copy its files into every folder written, with
an `auto_map` naming them: plain transformers loads the output with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoProcessor

from vlmtune.models.family import Family, Layout, LoadOptions
from vlmtune.models.minicpmv.remote.configuration_minicpmv import MiniCPMVConfig
from vlmtune.models.minicpmv.remote.image_processing_minicpmv import MiniCPMVImageProcessor
from vlmtune.models.minicpmv.remote.modeling_minicpmv import MiniCPMV
from vlmtune.models.minicpmv.remote.processing_minicpmv import MiniCPMVProcessor
from vlmtune.models.registry import register

REMOTE_FILES = ("configuration_minicpmv.py", "modeling_minicpmv.py", "resampler_minicpmv.py",
                "processing_minicpmv.py", "image_processing_minicpmv.py")


def register_auto_classes() -> None:
    """The one place vlmtune tells transformers about MiniCPM-V 2.x (idempotent)."""
    AutoConfig.register("minicpmv", MiniCPMVConfig, exist_ok=True)
    AutoModel.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoModelForCausalLM.register(MiniCPMVConfig, MiniCPMV, exist_ok=True)
    AutoImageProcessor.register(MiniCPMVConfig, slow_image_processor_class=MiniCPMVImageProcessor, exist_ok=True)
    AutoProcessor.register(MiniCPMVConfig, MiniCPMVProcessor, exist_ok=True)
    MiniCPMVConfig.register_for_auto_class()
    MiniCPMV.register_for_auto_class("AutoModel")
    MiniCPMVProcessor.register_for_auto_class()
    MiniCPMVImageProcessor.register_for_auto_class()


def _config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def is_minicpmv_folder(path: Path) -> bool:
    """OpenBMB's layout: `model_type` minicpmv, `auto_map` naming modeling_minicpmv and OpenBMB's
    `configuration_minicpm`. Folders vlmtune wrote name `configuration_minicpmv` (our file) and load as
    any vlmtune folder (manifest check, Auto classes resolved to the registered implementation)."""
    config = _config(path)
    auto_map = config.get("auto_map", {})
    return (config.get("model_type") == "minicpmv" and "modeling_minicpmv" in json.dumps(auto_map)
            and auto_map.get("AutoConfig") != "configuration_minicpmv.MiniCPMVConfig")


def load_minicpmv(path, options: LoadOptions = LoadOptions(), convert=None):
    """(`convert`'s options name parts of other layouts; an OpenBMB folder is complete.)"""
    from vlmtune.models.minicpmv.load import load_folder

    return load_folder(Path(path), options)


def describe(path: Path) -> dict:
    from vlmtune.models.weights import group_components, tensor_shapes

    config = _config(path)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(tensor_shapes(file))
    return {"version": config.get("version"), "query_num": config.get("query_num"),
            "slice_config": config.get("slice_config"), "llm": "qwen2" if float(config.get("version", 2.6)) >= 2.6 else "llama",
            "components": group_components(tensors, MINICPMV), "files": sorted(p.name for p in path.iterdir())}


register_auto_classes()

MINICPMV = register(Family(
    name="minicpmv",
    # embeddings apart from the LLM: OpenBMB's LoRA runs train them in full beside the adapter
    components={"vision": ("vpm",), "resampler": ("resampler",), "llm": ("llm",),
                "embeddings": ("llm.model.embed_tokens",)},
    follows=(("embeddings", "llm"),),
    matches=lambda config: getattr(config, "model_type", None) == "minicpmv",
    model_class=MiniCPMV,
    layouts=(Layout(name="MiniCPM-V 2.x folder (OpenBMB remote code)", detect=is_minicpmv_folder, load=load_minicpmv,
                    describe=describe,
                    hint="loaded into vlmtune's implementation; the folder's .py files run only with trust_remote_code"),),
    concat_dims=(),
    notes="MiniCPM-V 2.5 / 2.6 (remote code); the output folders carry vlmtune's transformers-5 code",
))
