"""Scattered parts onto a model: projector weights from any layout, and PEFT LoRA adapters merged
through `peft` itself after checking that every tensor fits (PEFT alone only warns, and an adapter
saved against another key naming silently does nothing)."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vlmtune.convert.weights import ConversionError, read_state_dict

# projector key layouts: XTuner `projector/` (model.0, model.2), original LLaVA (model.mm_projector.0/.2,
# or a single linear model.mm_projector), transformers (multi_modal_projector.linear_1/2)
_PROJECTOR_PATTERNS = [
    (re.compile(r"^(?:.*\.)?(?:mm_projector|projector\.model|model)\.0\.(weight|bias)$"), "linear_1"),
    (re.compile(r"^(?:.*\.)?(?:mm_projector|projector\.model|model)\.2\.(weight|bias)$"), "linear_2"),
    (re.compile(r"^(?:.*\.)?multi_modal_projector\.(linear_[12])\.(weight|bias)$"), None),
    (re.compile(r"^(?:.*\.)?mm_projector\.(weight|bias)$"), "linear"),
]


def projector_weights(source: str | Path | dict) -> dict[str, torch.Tensor]:
    """`linear_1.*` / `linear_2.*` (or `linear.*` for a single-layer projector) from any projector layout."""
    state = source if isinstance(source, dict) else read_state_dict(source)
    out, unused = {}, []
    for key, tensor in state.items():
        for pattern, target in _PROJECTOR_PATTERNS:
            match = pattern.match(key)
            if match:
                name = f"{match.group(1)}.{match.group(2)}" if target is None else f"{target}.{match.group(1)}"
                out[name] = tensor
                break
        else:
            if "projector" in key:
                unused.append(key)
    if unused:
        raise ConversionError(f"{source}: projector tensor(s) of an unknown layout: {unused[:5]}")
    if not out:
        raise ConversionError(f"{source}: no projector weights found (expected mm_projector.*, model.0/2.* or "
                              "multi_modal_projector.*)")
    return out


def apply_projector(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> str:
    """Copy projector weights into a LLaVA model; returns its kind (`mlp2x_gelu` or `linear`)."""
    projector = model.model.multi_modal_projector
    if "linear.weight" in weights:  # a single linear layer: first layer + identity second layer
        weights = {"linear_1.weight": weights["linear.weight"], "linear_1.bias": weights.get("linear.bias"),
                   "linear_2.weight": torch.eye(projector.linear_2.out_features, projector.linear_2.in_features),
                   "linear_2.bias": torch.zeros(projector.linear_2.out_features)}
        kind = "linear"
    else:
        kind = "mlp2x_gelu"
    targets = dict(projector.named_parameters())
    for name, tensor in weights.items():
        if tensor is None:
            continue
        if name not in targets:
            raise ConversionError(f"{source}: projector tensor {name} has no place in the model")
        if tensor.shape != targets[name].shape:
            raise ConversionError(
                f"{source}: projector tensor {name} has shape {tuple(tensor.shape)} but the model needs "
                f"{tuple(targets[name].shape)}; the projector was trained for another vision encoder or LLM width"
            )
        with torch.no_grad():
            targets[name].copy_(tensor.to(targets[name].dtype))
    if kind == "linear":
        model.config.projector_hidden_act = "linear"
        projector.act = nn.Identity()
    return kind


def merge_adapter(module: nn.Module, adapter_dir: str | Path, rename=lambda key: key) -> nn.Module:
    """Merge a PEFT LoRA adapter into `module` (returned without PEFT wrappers).

    `rename` maps the adapter's module paths (after `base_model.model.`) to `module`'s, for adapters
    saved against another key naming. Every adapter tensor must find its layer with matching shapes."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConversionError(f"{adapter_dir} is not a PEFT adapter folder (no adapter_config.json)")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ConversionError(f"{adapter_dir}: only LoRA adapters can be merged (this one is {config.get('peft_type')})")
    state = read_state_dict(adapter_dir)
    renamed, layers, full = {}, set(), {}
    modules = dict(module.named_modules())
    params = module.state_dict()
    for key, tensor in state.items():
        path = key.removeprefix("base_model.model.")
        layer_name, lora, leaf = path.rpartition(".lora_")
        if not lora:  # a fully trained module saved with the adapter (PEFT `modules_to_save`)
            name = path if path in params else rename(path)
            if name not in params:
                raise ConversionError(f"{adapter_dir}: tensor {key} (a fully trained module saved with the adapter) "
                                      "matches no parameter of the base; the adapter is for another model")
            if tensor.shape != params[name].shape:
                raise ConversionError(f"{adapter_dir}: tensor {key} has shape {tuple(tensor.shape)} but {name} needs "
                                      f"{tuple(params[name].shape)}; the adapter was trained on a different base")
            full[name] = tensor
            continue
        if layer_name not in modules:  # adapters on the bare LLM or vision encoder name layers without the VLM prefix
            path = rename(path)
            layer_name = path.rpartition(".lora_")[0]
        renamed["base_model.model." + path] = tensor
        layers.add(layer_name)
        layer = modules.get(layer_name)
        if not isinstance(layer, nn.Linear):
            raise ConversionError(
                f"{adapter_dir}: tensor {key} targets layer {layer_name}, which the base does not have as a linear "
                "layer; the adapter is for another model, or for another key naming of it"
            )
        expected = (tensor.shape[0], layer.in_features) if leaf.startswith("A") else (layer.out_features, tensor.shape[1])
        if tuple(tensor.shape) != expected:
            raise ConversionError(
                f"{adapter_dir}: tensor {key} has shape {tuple(tensor.shape)} but layer {layer_name} "
                f"({layer.in_features} -> {layer.out_features}) needs {expected}; the adapter was trained on a different base"
            )
    merged = module
    if layers:
        with tempfile.TemporaryDirectory() as tmp:  # PEFT loads a renamed copy that targets exactly these layers
            (Path(tmp) / "adapter_config.json").write_text(
                json.dumps({**config, "target_modules": sorted(layers), "modules_to_save": None}))
            save_file({k: v.contiguous() for k, v in renamed.items()}, str(Path(tmp) / "adapter_model.safetensors"))
            merged = PeftModel.from_pretrained(module, tmp).merge_and_unload(safe_merge=True)
    if full:
        targets = merged.state_dict()
        merged.load_state_dict({k: v.to(targets[k].dtype) for k, v in full.items()}, strict=False)
    return merged


# XTuner's LLaVAModel state dict (`pretrained_pth`, iter_N.pth) -> transformers LLaVA module paths
XTUNER_RENAMES = (
    ("projector.model.0.", "model.multi_modal_projector.linear_1."),
    ("projector.model.2.", "model.multi_modal_projector.linear_2."),
    ("llm.model.", "model.language_model."),
    ("llm.lm_head.", "lm_head."),
    ("visual_encoder.", "model.vision_tower."),
)


def rename_prefix(key: str, renames) -> str:
    for old, new in renames:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def apply_state_dict(model: nn.Module, family, source: str | Path) -> set[str]:
    """Load a (possibly partial) state dict in transformers or XTuner naming over `model`; returns the
    components it filled. Tensors that fit nowhere, or do not fit in shape, are errors."""
    state = read_state_dict(source)
    if any("lora_" in key for key in state):
        raise ConversionError(f"{source} holds LoRA tensors, which cannot be merged without their adapter config "
                              "(alpha, targets); use the adapter folders (vlmtune merge --from / --llm-adapter)")
    targets = model.state_dict()
    renamed, unused = {}, []
    for key, tensor in state.items():
        name = rename_prefix(family.canonical_key(key), XTUNER_RENAMES)
        if name not in targets:
            unused.append(key)
        elif tensor.shape != targets[name].shape:
            raise ConversionError(f"{source}: tensor {key} has shape {tuple(tensor.shape)} but {name} needs "
                                  f"{tuple(targets[name].shape)}; the weights are for another model size")
        else:
            renamed[name] = tensor.to(targets[name].dtype)
    if unused:
        raise ConversionError(f"{source}: {len(unused)} tensor(s) match no parameter of the model: {unused[:5]}")
    model.load_state_dict(renamed, strict=False)
    return {family.component_of(name) for name in renamed}