"""Write complete model folders: weights or adapter, config, processor (tokenizer, image processor,
chat template), generation config and a `vlmtune.json` manifest, then check the folder loads."""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoProcessor

import vlmtune

MANIFEST = "vlmtune.json"
MANIFEST_VERSION = 1


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "vlmtune": vlmtune.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def is_adapter(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_model_folder(model: nn.Module, processor, out: str | Path, manifest: dict) -> Path:
    """Save `model` (full, or a PEFT adapter) with its processor and a manifest; verify it loads."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if is_adapter(model):
        model.get_base_model().generation_config.save_pretrained(out)
    record = {
        "format_version": MANIFEST_VERSION,
        "kind": "lora" if is_adapter(model) else "full",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **manifest,
    }
    (out / MANIFEST).write_text(json.dumps(record, indent=2, default=str) + "\n")
    check_folder_loads(out, model)
    return out


def check_folder_loads(folder: Path, model: nn.Module) -> None:
    """Cheap load check: config and processor reload, and the weight files hold as many tensors and
    elements as the model (names are not compared: transformers may write a legacy key naming)."""
    if is_adapter(model):
        expected = _adapter_state(model)
        files = [folder / "adapter_model.safetensors"]
    else:
        AutoConfig.from_pretrained(folder)
        expected = {k: v for k, v in model.state_dict().items()}
        index = folder / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
        files = [folder / name for name in shards]
    AutoProcessor.from_pretrained(folder)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"{folder}: weight file(s) {', '.join(missing)} were not written")
    stored_count = stored_numel = 0
    for file in files:
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                stored_count += 1
                stored_numel += _numel(fh.get_slice(key).get_shape())
    unique = {t.data_ptr(): t.numel() for t in expected.values()}  # tied weights are stored once
    if stored_numel != sum(unique.values()) or not len(unique) <= stored_count <= len(expected):
        raise RuntimeError(
            f"{folder}: the saved weights hold {stored_count} tensors / {stored_numel} values, "
            f"but the model has {len(expected)} tensors / {sum(unique.values())} values"
        )


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)
