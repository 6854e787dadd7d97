"""Write complete model folders, crash-safely.

A folder holds weights (full), a PEFT adapter (LoRA) or only the tuned components' weights (delta,
with a reference to its base), plus config, processor (tokenizer, image processor, chat template),
generation config and the `vlmtune.json` manifest. Everything is written into a staging folder and
moved into place, the manifest last: a folder with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoProcessor

from vlmtune.checkpoints.manifest import MANIFEST, write_manifest

STAGING = ".partial"
DELTA_WEIGHTS = "delta.safetensors"
# weight files of every kind: when a folder is rewritten, those the new model does not have must go,
# or a full model's weights would sit beside a new adapter (and be loaded instead of it)
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                   "adapter_config.json", DELTA_WEIGHTS, "pytorch_model*.bin")


def is_adapter(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def staging_dir(out: Path) -> Path:
    """A fresh folder next to `out` (inside its parent's `.partial/`) to write into."""
    root = out.parent / STAGING
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{out.name}-{os.getpid()}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    return target


def publish(staging: Path, out: Path) -> Path:
    """Move a complete staging folder to `out`: one rename when `out` is new, else file by file
    (keeping what else `out` holds, e.g. checkpoints and logs), the manifest last."""
    if not out.exists():
        os.replace(staging, out)
    else:
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
        for pattern in WEIGHT_PATTERNS:
            for stale in out.glob(pattern):
                if not (staging / stale.name).exists():
                    stale.unlink()
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST)
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # the staging root goes once nothing else is being written there
    return out


def write_model_files(model: nn.Module, processor, folder: Path, delta_keys: set[str] | None = None) -> str:
    """Weights (or adapter, or delta), config, processor and generation config; returns the kind."""
    if is_adapter(model):
        model.save_pretrained(folder, safe_serialization=True)
        base = model.get_base_model()
        base.generation_config.save_pretrained(folder)
        kind = "lora"
    elif delta_keys is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k in delta_keys}
        save_file(state, str(folder / DELTA_WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        kind = "delta"
    else:
        model.save_pretrained(folder, safe_serialization=True)
        kind = "full"
    processor.save_pretrained(folder)
    return kind


def save_model_folder(model: nn.Module, processor, out: str | Path, record: dict,
                      delta_keys: set[str] | None = None) -> Path:
    """Save `model` with its processor and a manifest into `out`, crash-safely, and check it loads.

    `delta_keys`: write only these tensors (a delta on `base`)."""
    out = Path(out)
    staging = staging_dir(out)
    kind = write_model_files(model, processor, staging, delta_keys)
    check_folder_loads(staging, model, delta_keys)
    code = sorted(p.name for p in staging.glob("*.py"))  # model code the folder carries (`trust_remote_code`)
    write_manifest(staging, {"kind": kind, **record, **({"code": code} if code else {})})
    return publish(staging, out)


def check_folder_loads(folder: Path, model: nn.Module, delta_keys: set[str] | None = None) -> None:
    """Cheap load check: config and processor reload, and the weight files hold as many tensors and
    elements as the model (names are not compared: transformers may write a legacy key naming)."""
    if is_adapter(model):
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
        files = [folder / "adapter_model.safetensors"]
    else:
        AutoConfig.from_pretrained(folder)
        expected = {k: v for k, v in model.state_dict().items() if delta_keys is None or k in delta_keys}
        index = folder / "model.safetensors.index.json"
        if delta_keys is not None:
            files = [folder / DELTA_WEIGHTS]
        elif index.is_file():
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            files = [folder / "model.safetensors"]
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
