"""Several processes, through the engines that exist: torchrun / accelerate start them, torch's DDP
(through the transformers Trainer) runs them, DeepSpeed ZeRO is configured for the Trainer.

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

from vlmtune.config import ConfigError
from vlmtune.config.schema import RunConfig


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @classmethod
    def from_env(cls) -> Processes:
        get = lambda name, default: int(os.environ.get(name, default))  # noqa: E731
        return cls(get("RANK", 0), get("LOCAL_RANK", 0), get("WORLD_SIZE", 1))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


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
        raise ConfigError("`train.distributed.strategy=fsdp` is not supported yet; use ddp (every process holds the "
                          "whole model) or deepspeed (ZeRO-3 shards the parameters, on GPUs)")
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


def launch(config: str, overrides: list[str], nproc: int, extra: list[str]) -> int:
    """`vlmtune train CONFIG --nproc N`: the same command under torchrun, on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "vlmtune.cli", "train", config, *overrides, *extra]
    return subprocess.run(command).returncode
