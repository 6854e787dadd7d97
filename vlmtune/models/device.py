"""Where inference runs: on the GPU when there is one (a model loads on the CPU), unless told otherwise."""

from __future__ import annotations

import torch

from vlmtune.config import ConfigError


def inference_device(requested: str = "auto") -> torch.device:
    """`auto`: the first CUDA GPU, else the CPU; `cpu`, `cuda` or `cuda:N` as given, refused when absent."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"--device {requested}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {requested}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def place(model: torch.nn.Module, requested: str = "auto") -> torch.nn.Module:
    """The model on the inference device, in eval mode. A model already dispatched across devices
    (`device_map`) or quantized by bitsandbytes (which loads on its device) stays where it is."""
    model.eval()
    if getattr(model, "hf_device_map", None) or getattr(model, "is_quantized", False):
        return model
    return model.to(inference_device(requested))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where inputs go: the device of the input embeddings (the first layer a batch meets)."""
    return model.get_input_embeddings().weight.device
