"""Several processes, through the engines that exist: torchrun / accelerate start them, torch's DDP or
FSDP2 (through the transformers Trainer and accelerate) runs them, DeepSpeed ZeRO is configured for
the Trainer.

A run learns its place from the launcher's environment (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`). Every
machine's first process checks and encodes the data, the others read its result
(`vlmtune.data.shared`); every process builds the model (deterministically, so all hold the same);
only the main process writes files, and the others wait for it where they must (`barrier`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vlmtune.config import ConfigError
from vlmtune.config.schema import RunConfig
from vlmtune.models.family import Family, base_model


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # processes on this machine (torchrun's --nproc_per_node)

    @classmethod
    def from_env(cls) -> Processes:
        get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        world = get("WORLD_SIZE", 1)
        return cls(get("RANK", 0), get("LOCAL_RANK", 0), world, get("LOCAL_WORLD_SIZE", world))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def share_on_machine(self) -> bool:
        """Whether this machine's first process hands its prepared data to others on the machine: not
        with one process per node (each node's only process prepares its own)."""
        return self.local_world_size > 1


def barrier() -> None:
    """Wait for every process (nothing to wait for in a single-process run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def check_strategy(cfg: RunConfig, processes: Processes) -> None:
    """Refuse, before anything loads, what this machine or this version cannot run."""
    d = cfg.train.distributed
    if not processes.several:
        return
    if d.strategy == "fsdp":  # see docs/distributed.md, "FSDP"
        if cfg.tune.quantize:
            raise ConfigError("`train.distributed.strategy=fsdp` with `tune.quantize` (QLoRA) is not supported yet: "
                              "bitsandbytes' packed 4-bit weights do not shard; use strategy=ddp for QLoRA")
        if d.offload_params and not torch.cuda.is_available():
            raise ConfigError("`train.distributed.offload_params` with fsdp moves parameters from the GPU to CPU "
                              "memory, and this machine has no GPU; set offload_params=false")
        if d.offload_optimizer:
            raise ConfigError("`train.distributed.offload_optimizer` is DeepSpeed's; FSDP2 offloads parameters, "
                              "gradients and optimizer states together: use offload_params=true")
    if d.strategy == "deepspeed":
        if not torch.cuda.is_available():
            raise ConfigError("`train.distributed.strategy=deepspeed` needs CUDA GPUs and none was found; on this "
                              "machine use train.distributed.strategy=ddp")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError("`train.distributed.strategy=deepspeed` needs the deepspeed package: pip install "
                              "deepspeed") from None
    if d.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("`train.distributed.backend=nccl` needs CUDA GPUs; use gloo (or auto) on the CPU")


def backend(cfg: RunConfig) -> str:
    chosen = cfg.train.distributed.backend
    return chosen if chosen != "auto" else ("nccl" if torch.cuda.is_available() else "gloo")


def deepspeed_config(cfg: RunConfig) -> dict:
    """The DeepSpeed JSON config for `train.distributed` (or the file it names, passed through).
    Sizes the Trainer knows are left "auto", so the two can never disagree."""
    d = cfg.train.distributed
    if d.deepspeed_config:
        path = Path(d.deepspeed_config)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"`train.distributed.deepspeed_config`: {path} is not a readable JSON file ({err})") from None
    if d.offload_params and d.zero_stage != 3:
        raise ConfigError("`train.distributed.offload_params` needs zero_stage 3 (stage 2 does not partition parameters)")
    zero: dict = {"stage": d.zero_stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": "auto"}
    if d.zero_stage == 3:
        zero |= {"stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                 "stage3_gather_16bit_weights_on_model_save": True}
    else:
        zero |= {"allgather_partitions": True, "allgather_bucket_size": 2e8, "reduce_scatter": True}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}, "zero_optimization": zero}


def fsdp_config(cfg: RunConfig) -> dict:
    """The Trainer's `fsdp_config` for `train.distributed` (FSDP2). Full state dicts on save, so a
    checkpoint holds whole tensors that load on any number of processes; the layers to wrap are set
    once the model is known (`fsdp_layer_classes`)."""
    return {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "state_dict_type": "FULL_STATE_DICT",
            "reshard_after_forward": True, "cpu_offload": cfg.train.distributed.offload_params,
            "cpu_ram_efficient_loading": False}


def fsdp_layer_classes(model, family: Family) -> list[str]:
    """FSDP2's units: the classes of the LLM's repeated layers (each a unit of its own; accelerate also
    gives the input embeddings and the output head theirs). The vision tower and projector stay in the
    root unit, gathered once per step: a process whose batch holds no image runs them on a blank image
    (`keep_vision_busy`), and with layers of their own its gathers would come in another order than an
    image batch's, which a collective cannot survive."""
    base = base_model(model)
    names: list[str] = []
    for prefix in family.components.get("llm", ()):
        try:
            root = base.get_submodule(prefix)
        except AttributeError:
            continue
        for module in root.modules():
            kinds = {type(child).__name__ for child in module.children()} if isinstance(module, nn.ModuleList) else set()
            if len(kinds) == 1 and len(module) > 1 and kinds.isdisjoint(names):
                names += kinds
    if not names:
        raise ConfigError(f"`train.distributed.strategy=fsdp`: found no repeated layers in the {family.name} family's "
                          f"llm ({', '.join(family.components.get('llm', ()))}) to shard; use strategy=ddp")
    return names


def fsdp_on_cpu(accelerator, plugin) -> None:
    """accelerate (1.16) enables FSDP only on accelerators: on the CPU its state stays MULTI_CPU, drops
    the plugin, and the Trainer would run plain DDP while `args.fsdp` reads True. FSDP2 itself runs on
    the CPU over gloo, so this sets the state accelerate would set on a GPU machine (the one place
    vlmtune reaches into accelerate; tests/training/test_distributed.py checks the model really is
    sharded, from the units the run prints)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    state = accelerator.state
    state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin


def launch(config: str, overrides: list[str], nproc: int, extra: list[str]) -> int:
    """`vlmtune train CONFIG --nproc N`: the same command under torchrun, on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlmtune.cli", "train", config, *overrides, *extra]
    return subprocess.run(command).returncode
