"""Crash-safe, complete training checkpoints on top of the transformers Trainer.

The Trainer writes each `checkpoint-<step>` into `<output.dir>/.partial/`; `CompleteCheckpoints`
then adds what it leaves out (generation config, the manifest with every file's hash, written last)
and renames the folder into `<output.dir>` in one step. A kill at any moment leaves either no
checkpoint or a complete one; old checkpoints are pruned only after a newer one is complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from safetensors.torch import load_file
from transformers import TrainerCallback

from vlmtune.checkpoints.manifest import MANIFEST, read_manifest, write_manifest
from vlmtune.checkpoints.save import STAGING, is_adapter

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(out: Path) -> list[Path]:
    """`checkpoint-<step>` folders of `out` that hold a manifest, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def prune(out: Path, keep: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `keep`; the newest complete one always stays."""
    done = complete_checkpoints(out)
    doomed = done[: max(0, len(done) - max(keep or len(done), 1))]
    for path in doomed:
        shutil.rmtree(path)
    return doomed


class CompleteCheckpoints(TrainerCallback):
    """Completes each staged checkpoint and moves it into place (see the module docstring)."""

    def __init__(self, out: Path, record: Callable[[object], dict], keep: int | None):
        self.out = Path(out)
        self.staging = self.out / STAGING
        self.record = record  # (TrainerState) -> manifest fields
        self.keep = keep

    def on_save(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        staged = self.staging / name
        if model is not None:
            base = model.get_base_model() if is_adapter(model) else model
            base.generation_config.save_pretrained(staged)
        _pause_for_crash_test(state.global_step)
        write_manifest(staged, {"kind": "lora" if is_adapter(model) else "full", **self.record(state)})
        final = self.out / name
        if final.exists():  # the same step saved again after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(staged, final)
        prune(self.out, self.keep)


def _pause_for_crash_test(step: int) -> None:
    """`VLMTUNE_TEST_PAUSE_IN_SAVE=STEP:SECONDS` holds the save of checkpoint STEP half-written, so
    the crash-safety test can kill a real training process at exactly that moment."""
    spec = os.environ.get("VLMTUNE_TEST_PAUSE_IN_SAVE", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))


def clean_staging(out: Path) -> None:
    """Remove what an interrupted save left half-written."""
    shutil.rmtree(Path(out) / STAGING, ignore_errors=True)


def resume_point(out: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint to resume from: `auto`/True -> the newest complete one in `out`."""
    if resume in (None, False):
        return None
    if resume in (True, "auto"):
        found = latest_checkpoint(out)
        if found is None:
            raise FileNotFoundError(f"--resume: {out} holds no complete checkpoint-<step> folder to resume from")
        return found
    path = Path(resume)
    if read_manifest(path) is None:
        raise FileNotFoundError(f"--resume {path}: not a complete vlmtune checkpoint (no {MANIFEST})")
    return path


def restore_full_weights(model, checkpoint: Path, family) -> None:
    """Load a full checkpoint's weights strictly, translating saved key names to the model's.

    The Trainer's own resume loads full weights with `strict=False` and the module's key names, so
    a checkpoint saved under transformers' legacy LLaVA naming loads nothing and training silently
    restarts from the initial weights. This loads every tensor or says which did not fit."""
    index = checkpoint / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        state.update({family.canonical_key(k): v for k, v in load_file(str(checkpoint / name)).items()})
    result = model.load_state_dict(state, strict=False)
    shared = {p.data_ptr() for k, p in model.state_dict().items() if k in state}
    missing = [k for k in result.missing_keys if model.state_dict()[k].data_ptr() not in shared]  # tied weights
    if result.unexpected_keys or missing:
        raise RuntimeError(f"cannot resume from {checkpoint}: {len(missing)} model tensor(s) missing "
                           f"(e.g. {missing[:3]}), {len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})")
