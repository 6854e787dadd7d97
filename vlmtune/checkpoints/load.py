"""Load a model folder of any kind vlmtune writes: a full model, or a PEFT adapter plus its base."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoProcessor

from vlmtune.models.registry import Family, family_for


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and what to do."""


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    family: Family
    path: Path
    kind: str  # "full" | "lora"
    base: Path | None = None  # the base model folder an adapter needs
    sources: dict[str, str] = field(default_factory=dict)  # component -> where its weights came from


def has_processor(folder: Path) -> bool:
    return (folder / "processor_config.json").is_file() or (folder / "preprocessor_config.json").is_file()


def adapter_base(folder: Path) -> Path:
    """The base model folder recorded in an adapter's `adapter_config.json`."""
    config = json.loads((folder / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{folder}/adapter_config.json records no `base_model_name_or_path`; cannot find its base model")
    base_path = Path(base)
    if not base_path.is_absolute():
        base_path = (folder / base_path) if (folder / base_path).exists() else base_path
    if not (base_path / "config.json").is_file():
        raise ModelLoadError(
            f"adapter {folder} needs its base model {base}, which is not a model folder here; "
            "copy the base there or edit `base_model_name_or_path` in its adapter_config.json"
        )
    return base_path


def load_model(path: str | Path, *, trust_remote_code: bool = False, merge_adapters: bool = True) -> LoadedModel:
    """Load `path` for training or inference; adapters are applied to their base (and merged by default)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder")
    if (folder / "adapter_config.json").is_file():
        return _load_adapter(folder, trust_remote_code, merge_adapters)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder} is not a model folder: it has neither config.json nor adapter_config.json")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    family = family_for(config, where=str(folder))
    if not has_processor(folder):
        raise ModelLoadError(f"{folder} has no processor_config.json or preprocessor_config.json: the image processor is missing")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    model = family.model_class.from_pretrained(folder, trust_remote_code=trust_remote_code)
    sources = {c: str(folder) for c in family.components}
    return LoadedModel(model, processor, family, folder, "full", sources=sources)


def _load_adapter(folder: Path, trust_remote_code: bool, merge: bool) -> LoadedModel:
    from peft import PeftModel

    base = load_model(adapter_base(folder), trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base.model, folder)
    if merge:
        model = model.merge_and_unload()
    processor = AutoProcessor.from_pretrained(folder) if has_processor(folder) else base.processor
    sources = {c: f"{base.path} + adapter {folder}" for c in base.family.components}
    return LoadedModel(model, processor, base.family, folder, "lora", base=base.path, sources=sources)
