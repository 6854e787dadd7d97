"""The aux tower (ConvNeXt) from any of the folders MGM users have: a transformers `ConvNextModel`
folder, an OpenCLIP folder (`open_clip_config.json` + `open_clip_pytorch_model.bin`, timm keys under
`visual.trunk.`, as MGM reads it) or a timm folder (`config.json` with `architecture: convnext_*`).
timm and OpenCLIP weights are renamed onto transformers' ConvNeXt; the architecture (stage widths
and depths) is read from the weights themselves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import ConvNextConfig, ConvNextModel

from vlmtune.models.weights import read_state_dict

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

_TIMM_RENAMES = [  # timm ConvNeXt trunk -> transformers ConvNextModel
    (r"^stem\.0\.", "embeddings.patch_embeddings."),
    (r"^stem\.1\.", "embeddings.layernorm."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"encoder.stages.\1.downsampling_layer.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"encoder.stages.\1.layers.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.norm\.", r"encoder.stages.\1.layers.\2.layernorm."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"encoder.stages.\1.layers.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"encoder.stages.\1.layers.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.gamma$", r"encoder.stages.\1.layers.\2.layer_scale_parameter"),
    (r"^head\.norm\.", "layernorm."),
]
_TIMM_UNUSED = re.compile(r"^(head\.(fc|pre_logits)|norm_pre)\.?")  # MGM drops the classifier head


class TowerError(ValueError):
    """An aux tower folder vlmtune cannot read; the message says what it expected."""


def timm_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ConvNeXt trunk's weights to transformers' `ConvNextModel` names."""
    out, unknown = {}, []
    for key, tensor in state.items():
        for pattern, target in _TIMM_RENAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = tensor
                break
        else:
            if not _TIMM_UNUSED.match(key):
                unknown.append(key)
    if unknown:
        raise TowerError(f"ConvNeXt weights with keys no timm ConvNeXt has: {unknown[:5]}")
    return out


def convnext_config(state: dict[str, torch.Tensor], image_size: int) -> ConvNextConfig:
    """Stage widths and depths of a (transformers-named) ConvNeXt, from its weights."""
    widths, depths = [], []
    for stage in range(16):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"encoder\.stages\.{stage}\.layers\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
        widths.append(state[f"encoder.stages.{stage}.layers.0.dwconv.weight"].shape[0])
    if not depths:
        raise TowerError("no ConvNeXt stages found in the weights")
    return ConvNextConfig(hidden_sizes=widths, depths=depths, num_stages=len(depths), image_size=image_size)


def tower_from_state(state: dict[str, torch.Tensor], image_size: int, dtype=None) -> ConvNextModel:
    """A transformers ConvNeXt holding `state` (transformers names); every tensor must fit."""
    model = ConvNextModel(convnext_config(state, image_size))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("layernorm.")]  # the pooled-output norm MGM never uses
    if missing or unexpected:
        raise TowerError(f"ConvNeXt weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(dtype) if dtype is not None else model


def aux_kind(folder: Path) -> str | None:
    """`transformers`, `open_clip`, `timm` or None."""
    if (folder / OPEN_CLIP_CONFIG).is_file():
        return "open_clip"
    config = folder / "config.json"
    if config.is_file():
        raw = json.loads(config.read_text())
        if raw.get("model_type") == "convnext":
            return "transformers"
        if str(raw.get("architecture", "")).startswith("convnext"):
            return "timm"
    return None


def _first(folder: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise TowerError(f"{folder}: none of {', '.join(names)} found")


def load_aux_tower(folder: str | Path, dtype=None) -> tuple[ConvNextModel, int]:
    """(ConvNeXt, its native image size) from a transformers, OpenCLIP or timm folder."""
    folder = Path(folder)
    kind = aux_kind(folder)
    if kind == "transformers":
        model = ConvNextModel.from_pretrained(folder, dtype=dtype)
        return model, int(model.config.image_size)
    if kind == "open_clip":
        cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
        vision = cfg.get("model_cfg", cfg).get("vision_cfg", {})
        state = read_state_dict(_first(folder, OPEN_CLIP_WEIGHTS))
        trunk = {k.removeprefix("visual.trunk."): v for k, v in state.items() if k.startswith("visual.trunk.")}
        if not trunk:
            raise TowerError(f"{folder}: no `visual.trunk.*` weights: not an OpenCLIP ConvNeXt (MGM's aux tower)")
        size = int(vision.get("image_size", 320))
        return tower_from_state(timm_to_transformers(trunk), size, dtype), size
    if kind == "timm":
        raw = json.loads((folder / "config.json").read_text())
        state = read_state_dict(_first(folder, TIMM_WEIGHTS))
        size = int((raw.get("pretrained_cfg", {}).get("input_size") or [3, 224, 224])[-1])
        return tower_from_state(timm_to_transformers(state), size, dtype), size
    raise TowerError(f"`model.vision_aux`: {folder} is not a ConvNeXt folder vlmtune reads (a transformers ConvNextModel "
                     f"folder, an OpenCLIP folder with {OPEN_CLIP_CONFIG}, or a timm folder with `architecture: convnext_*`)")
