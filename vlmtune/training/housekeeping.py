"""What a run changes, freezes and frees around the training loop, so that neither work whose output
reaches no loss, nor Python's garbage collector, nor the end of the run costs what training does not need."""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from vlmtune.models.family import Family
from vlmtune.models.labelled import KeptPositions, kept_positions_only, last_mlp
from vlmtune.models.skipped import skipping
from vlmtune.training.dropout import gap_dropout


@dataclass
class TrainingForm:
    """What `trained_as_training_runs` changed: the modules run as identities, the LoRA dropouts drawn by
    their gaps, the last MLP (path) and the holder of its positions, which the trainer sets each step."""

    unused: list[str]
    dropouts: int
    mlp: str | None
    kept: KeptPositions | None


@contextlib.contextmanager
def trained_as_training_runs(model: nn.Module, family: Family, kept_logits: bool) -> Iterator[TrainingForm]:
    """The model as training runs it, put back afterwards: the family's unused layers skipped
    (`vlmtune.models.skipped`), LoRA dropout drawn by its gaps on the CPU (`vlmtune.training.dropout`) and,
    where the loss takes logits only at labelled positions (`kept_logits`), the last MLP only there
    (`vlmtune.models.labelled`). One place, so that `benchmarks/memory_plan.py` measures what training does."""
    unused = family.layers_not_run(model)
    mlp = last_mlp(model) if kept_logits else None
    with skipping(model, unused), gap_dropout(model) as dropouts, kept_positions_only(model, mlp) as kept:
        yield TrainingForm(unused, dropouts, mlp, kept)


@contextlib.contextmanager
def collector_frozen():
    """Python's cyclic garbage collector left out of what exists before training (`gc.freeze`). After
    torch and transformers import, a full collection walks over half a million objects that live as
    long as the process (0.28 s for the benchmark's LLaVA, 4% of its 30 steps; accelerate runs one as
    training ends, Python more as objects pile up); objects made during training are still collected,
    and everything is collectable again afterwards (unless the caller had frozen objects itself: then
    it is theirs to undo, and nothing changes)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_training_state(trainer) -> None:
    """Frees the optimizer's moments and the gradients once training is over: with AdamW they are three
    times the trainable weights, and the final save, merge and verify (which loads a second copy of the
    model) need none of them. Kept, they made the end of a run its peak of memory. The checkpoints that
    resume a run already hold the optimizer state; the final folder never did. DeepSpeed's engine owns
    its partitioned state and frees it itself."""
    trainer.model.zero_grad(set_to_none=True)
    if trainer.optimizer is not None and not trainer.is_deepspeed_enabled:
        trainer.optimizer.state.clear()  # in place: the accelerator and the scheduler hold the same optimizer
    give_back_freed_memory()


def give_back_freed_memory() -> bool:
    """Returns the process's freed heap memory to the system (glibc's `malloc_trim`; False where there
    is no glibc). glibc keeps freed blocks resident for reuse — blocks below its mmap threshold, which
    rises to the size of the large blocks a run frees — so the moments and gradients just freed still
    counted in the resident set, and the final save and verify came on top of them: without it, a 60M
    LLaVA's run peaked after training, 235 MiB above its training steps."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # no C library by that call (Windows), or no glibc
        return False
    trim(0)
    return True
