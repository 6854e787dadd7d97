"""`vlmtune export`: any loadable model (adapters merged) as a full folder or one state-dict file."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlmtune.models.loaded import LoadedModel
from vlmtune.checkpoints.load import load_model
from vlmtune.checkpoints.save import save_model_folder
from vlmtune.models.weights import ConversionError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMATS = ("hf", "safetensors", "pth", "xtuner-pth")


def save_converted(loaded: LoadedModel, out: str | Path, record: dict) -> Path:
    """A merged, converted or exported model as a complete vlmtune folder (written crash-safely)."""
    return save_model_folder(loaded.model, loaded.processor, Path(out),
                             {"family": loaded.family.name, "base": {"sources": loaded.sources},
                              "notes": loaded.notes, **record})


def check_out(out: str | Path, folder: bool) -> None:
    """Refuse an `--out` of the wrong kind before anything loads (or is staged in `.partial/`)."""
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise ConversionError(f"--out {out} is an existing file, and this writes a model folder; choose a new folder path")
    if not folder and out.is_dir():
        raise ConversionError(f"--out {out} is a folder, and this format writes one file; give a file path")


def export(model: str | Path, fmt: str, out: str | Path, dtype: str | None = None) -> Path:
    """Write `model` as `hf` (a folder), `safetensors` or `pth` (one file of `name -> tensor`), or
    `xtuner-pth` (XTuner's LLaVAModel naming, for its `pretrained_pth`)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    check_out(out, folder=fmt == "hf")
    loaded = load_model(model)
    namings = dict(loaded.family.export_renames)
    if fmt not in ("hf", "safetensors", "pth") and fmt not in namings:
        raise ConversionError(f"{model}: a {loaded.family.name} model has no {fmt} naming "
                              f"(its formats: hf, safetensors, pth{''.join(', ' + n for n in namings)})")
    net = loaded.model.to(DTYPES[dtype]) if dtype else loaded.model
    out = Path(out)
    if fmt == "hf":
        return save_converted(loaded, out, {"exported_from": str(model), "dtype": dtype or "as saved"})
    state = {}
    renames = namings.get(fmt, ())
    for name, tensor in net.state_dict().items():  # tied weights share storage: store each name separately
        key = next((new + name[len(old):] for old, new in renames if name.startswith(old)), name)
        state[key] = tensor.detach().clone().contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    if fmt == "safetensors":
        save_file(state, str(tmp), metadata={"format": "pt", "family": loaded.family.name})
    else:
        torch.save(state, tmp)
    os.replace(tmp, out)
    return out
