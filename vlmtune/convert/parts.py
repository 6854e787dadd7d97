"""Scattered parts onto a model: PEFT LoRA adapters merged through `peft` itself after checking that
every tensor fits (PEFT alone only warns, and an adapter saved against another key naming silently
does nothing), and state dicts in any naming the family knows."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vlmtune.convert.weights import ConversionError, read_state_dict


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


def apply_state_dict(model: nn.Module, family, source: str | Path) -> set[str]:
    """Load a (possibly partial) state dict over `model`, in any naming the family knows (`key_renames`:
    older transformers, other tools); returns the components it filled. Tensors that fit nowhere, or do
    not fit in shape, are errors."""
    state = read_state_dict(source)
    if any("lora_" in key for key in state):
        raise ConversionError(f"{source} holds LoRA tensors, which cannot be merged without their adapter config "
                              "(alpha, targets); use the adapter folders (for XTuner: `xtuner convert pth_to_hf`, "
                              "then vlmtune merge --from that folder; or vlmtune merge --llm-adapter)")
    targets = model.state_dict()
    embeddings = {p.data_ptr() for p in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    renamed, unused = {}, []
    for key, tensor in state.items():
        name = family.canonical_key(key)
        if name in targets and targets[name].data_ptr() in embeddings and tensor.shape[1:] == targets[name].shape[1:] \
                and tensor.shape[0] < targets[name].shape[0]:
            # the source's vocabulary without the tokens vlmtune added (`<image>`): those rows keep theirs
            tensor = torch.cat([tensor.to(targets[name].dtype), targets[name][tensor.shape[0]:]])
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