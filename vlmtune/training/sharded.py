"""FSDP checkpoints in the same format as every other run's: whole tensors, the optimizer in torch's
own layout (`optimizer.pt`, states keyed by position in the parameter groups). So a checkpoint written
by N sharded processes resumes on M processes, sharded or not, and the file set of a checkpoint never
depends on how it was trained. accelerate's FSDP files (`pytorch_model_fsdp.bin`, an `optimizer.bin`
keyed by parameter name) would resume only under FSDP."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from vlmtune.config import ConfigError


def full_optimizer_state(model, optimizer) -> dict:
    """The optimizer's whole state in torch's layout, on the main process (empty on the others); every
    process must call it (it gathers the shards)."""
    named = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not named:
        return {}
    index: dict[str, int] = {}
    groups = [{**group, "params": [index.setdefault(name, len(index)) for name in group["params"]]}
              for group in named["param_groups"]]
    return {"state": {index[name]: value for name, value in named["state"].items()}, "param_groups": groups}


def load_full_optimizer_state(model, optimizer, state: dict, checkpoint: Path) -> None:
    """Shard a whole optimizer state in torch's layout (from any run) onto this process's parameters."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [i for group in state["param_groups"] for i in group["params"]]
    if len(saved) != len(order):
        raise ConfigError(f"--resume: {checkpoint / 'optimizer.pt'} holds the state of {len(saved)} parameters and "
                          f"this run trains {len(order)}; resume with the tuning (tune.*) that wrote it")
    name_of = dict(zip(saved, order))
    named = {"state": {name_of[i]: value for i, value in state["state"].items()},
             "param_groups": [{**group, "params": [name_of[i] for i in group["params"]]}
                              for group in state["param_groups"]]}
    # not strict: a parameter that never had a gradient (a tower's unused last layer) has no state, as in
    # torch's own `load_state_dict`; that both runs train the same parameters is checked above
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True, strict=False))


def restore_adapter_weights(model, checkpoint: Path) -> None:
    """A LoRA checkpoint's adapter (and its fully trained modules) into the model before FSDP wraps it;
    the Trainer's own loading under FSDP expects accelerate's files."""
    result = set_peft_model_state_dict(model, load_file(str(checkpoint / "adapter_model.safetensors")))
    if result.unexpected_keys:
        raise ConfigError(f"--resume: {checkpoint / 'adapter_model.safetensors'} holds {len(result.unexpected_keys)} "
                          f"tensor(s) this run has no place for (e.g. {result.unexpected_keys[:3]}); resume with the "
                          "tuning (tune.*) that wrote it")
