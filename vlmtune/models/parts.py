"""Scattered parts onto a model: PEFT LoRA adapters merged through `peft` itself after checking that
every tensor fits (PEFT alone only warns, and an adapter saved against another key naming silently
does nothing), state dicts in any naming the family knows, and the accounting every conversion ends
with (no source tensor unused, no parameter unfilled, unless allowed). Families' loaders use these,
so they live below `vlmtune/convert/`."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from vlmtune.models.family import ConvertOptions, LoadOptions
from vlmtune.models.loaded import LoadedModel
from vlmtune.models.weights import ConversionError, read_state_dict


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


@dataclass
class Parts:
    base: Path | None = None
    llm: Path | None = None
    vision: Path | None = None
    llm_adapter: Path | None = None
    vision_adapter: Path | None = None
    projector: Path | None = None
    weights: Path | None = None  # a state dict (transformers or XTuner naming) loaded over the base
    feature_layer: int | None = None  # the vision layer feeding the projector, when the source says (XTuner)
    chat_template: str | None = None  # a built-in template name, when the source says which it was trained with
    notes: list[str] = field(default_factory=list)  # where each part was found


def check_accounting(source: str, unused: list[str], unfilled: list[str], convert: ConvertOptions) -> list[str]:
    """Raise on leftovers unless allowed; return the notes that remain. `unfilled` entries that start
    with "vision " are tower parameters the checkpoint lacks (they keep the vision folder's weights)."""
    problems, notes = [], []
    vision = [k for k in unfilled if k.startswith("vision ")]
    other = [k for k in unfilled if not k.startswith("vision ")]
    for keys, allowed, what in (
            (unused, convert.allow_unused, "source tensor(s) not used"),
            (vision, convert.allow_missing, "vision parameter(s) not in the checkpoint (they keep the vision folder's weights)"),
            (other, convert.allow_missing, "model parameter(s) not filled (they would keep a new random init)")):
        if keys:
            line = f"{len(keys)} {what}: {', '.join(sorted(keys)[:8])}{' ...' if len(keys) > 8 else ''}"
            (notes if allowed else problems).append(line)
    if problems:
        flags = " ".join(f for f, keys in (("--allow-unused", unused), ("--allow-missing", unfilled)) if keys)
        how = (f"use {flags.replace(' ', ' / ')} to convert anyway" if convert.command == "convert" else
               f"to accept that, convert it once with `vlmtune convert {source} {flags} --out OUT` and use OUT")
        raise ConversionError(f"{source}: " + "; ".join(problems) + f" ({how})")
    return notes


def convert_transformers(folder: Path, options: LoadOptions, convert: ConvertOptions) -> LoadedModel:
    """A transformers folder of a known family in any key naming it has had, re-read strictly through
    the family's renames."""
    from vlmtune.models.registry import family_for  # the registry imports the families, which import this

    config = AutoConfig.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    family = family_for(config, where=str(folder))
    dtype = getattr(torch, options.dtype) if options.dtype else torch.float32  # not the dtype the config records
    model = (family.model_class or AutoModelForImageTextToText)._from_config(config, dtype=dtype)
    state = {family.canonical_key(k): v for k, v in read_state_dict(folder).items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set()
    notes = check_accounting(str(folder), list(result.unexpected_keys), [k for k in result.missing_keys if k not in tied],
                             convert)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    if convert.chat_template:
        from vlmtune.data.templates import resolve_template

        processor.chat_template = resolve_template(convert.chat_template)
        notes.append(f"chat template: {convert.chat_template} (from --chat-template)")
    model.generation_config.pad_token_id = getattr(config.get_text_config(), "pad_token_id", None)
    return LoadedModel(model, processor, family, folder, "converted",
                       sources={c: str(folder) for c in family.components}, notes=notes)
