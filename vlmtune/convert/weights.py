"""Read weights from files others wrote, safely: safetensors first, `torch.load(weights_only=True)`
for `.bin` / `.pth` (never arbitrary pickles)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHT_NAMES = ("model.safetensors", "adapter_model.safetensors", "pytorch_model.bin", "adapter_model.bin")


class ConversionError(ValueError):
    """A layout that cannot be read, merged or converted; the message names the file or tensor."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, or of a folder's weights (single file or shards)."""
    path = Path(path)
    if path.is_dir():
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = path / index_name
            if index.is_file():
                state = {}
                for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                    state.update(read_state_dict(path / shard))
                return state
        for name in WEIGHT_NAMES:
            if (path / name).is_file():
                return read_state_dict(path / name)
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pth", ".pt"))
        if len(found) == 1:
            return read_state_dict(path / found[0])
        raise ConversionError(f"{path}: no weight file found (looked for {', '.join(WEIGHT_NAMES)})")
    if not path.is_file():
        raise ConversionError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickles with code in them are refused here, by design
        raise ConversionError(f"{path}: cannot be read as a weights-only PyTorch file ({err})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # XTuner iter_N.pth / pretrained_pth
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state
