"""Crash-safe, complete training checkpoints on top of the transformers Trainer.

The Trainer writes each `checkpoint-<step>` into `<output.dir>/.partial/`; `CompleteCheckpoints`
then adds what it leaves out (generation config, the manifest with every file's hash, written last)
and renames the folder into `<output.dir>` in one step. A kill at any moment leaves either no
checkpoint or a complete one; old checkpoints are pruned only after a newer one is complete, by
renaming them out of the way first. One run at a time holds `<output.dir>` (an `flock` on
`<output.dir>/.vlmtune.lock`, released by the kernel when the process ends, however it ends).
Resuming checks the checkpoint's files against its manifest first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

from safetensors.torch import load_file
from transformers import TrainerCallback

from vlmtune.checkpoints.manifest import MANIFEST, ManifestError, hash_problems, read_manifest, write_manifest
from vlmtune.checkpoints.save import STAGING, clean_stale_staging, is_adapter, remove_tree
from vlmtune.config import ConfigError
from vlmtune.training.distributed import barrier

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
LOCK = ".vlmtune.lock"
# what the Trainer needs to restore a run exactly; without them it silently restarts that state
TRAINER_STATE = ("trainer_state.json", "optimizer.pt", "scheduler.pt")
# config keys that may change between a run and its resumption (how long, how often, where to report)
RESUMABLE_CHANGES = {"train.max_steps", "train.epochs", "train.resume", "train.save_steps", "train.save_total_limit",
                     "train.logging_steps", "train.eval_steps", "train.tensorboard", "data.eval", "data.num_workers",
                     "output.overwrite", "output.merge", "output.save"}


@contextlib.contextmanager
def hold_output_dir(out: Path) -> Iterator[None]:
    """Hold `out` for this process: a second run on the same folder is refused, naming this one.

    `fcntl.flock` is released by the kernel when the process ends, so a killed run leaves no stale lock."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process that has not said which"
            os.close(fd)
            raise ConfigError(f"`output.dir`: {out} is in use by another vlmtune run ({holder}); wait for it to end, "
                              "or choose another output.dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the lock file was not removed by a run that ended meanwhile
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()}: {' '.join(sys.argv)}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before unlocking: a run waiting on this file then takes a new one
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # a run refused before it wrote anything leaves no empty folder behind


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
        discard(path)
    return doomed


def discard(checkpoint: Path) -> None:
    """Remove a checkpoint so that a kill never leaves it half deleted in place: it is renamed into
    `.partial/` (one step) and deleted there; a symbolic link is removed itself, not followed."""
    if checkpoint.is_symlink():
        checkpoint.unlink()
        return
    aside = checkpoint.parent / STAGING / f"{checkpoint.name}-{os.getpid()}"
    aside.parent.mkdir(exist_ok=True)
    os.replace(checkpoint, aside)
    _pause_for_crash_test("PRUNE", int(checkpoint.name.split("-")[1]))
    remove_tree(aside)


class CompleteCheckpoints(TrainerCallback):
    """Completes each staged checkpoint and moves it into place (see the module docstring)."""

    def __init__(self, out: Path, record: Callable[[object], dict], keep: int | None):
        self.out = Path(out)
        self.staging = self.out / STAGING
        self.record = record  # (TrainerState) -> manifest fields
        self.keep = keep

    def on_save(self, args, state, control, model=None, **kwargs):
        barrier()  # every process has written its part (its RNG state) before the folder is declared complete
        if not state.is_world_process_zero:
            return
        name = f"checkpoint-{state.global_step}"
        staged = self.staging / name
        if model is not None:
            base = model.get_base_model() if is_adapter(model) else model
            base.generation_config.save_pretrained(staged)
        _pause_for_crash_test("SAVE", state.global_step)
        write_manifest(staged, {"kind": "lora" if is_adapter(model) else "full", **self.record(state)})
        final = self.out / name
        if final.exists() or final.is_symlink():  # the same step saved again after a resume: replace it whole
            discard(final)
        os.replace(staged, final)
        prune(self.out, self.keep)


def _pause_for_crash_test(phase: str, step: int) -> None:
    """`VLMTUNE_TEST_PAUSE_IN_SAVE=STEP:SECONDS` holds the save of checkpoint STEP half-written
    (`VLMTUNE_TEST_PAUSE_IN_PRUNE`: the deletion of checkpoint STEP), so the crash-safety tests can
    kill a real training process at exactly that moment."""
    spec = os.environ.get(f"VLMTUNE_TEST_PAUSE_IN_{phase}", "")
    if spec and int(spec.split(":")[0]) == step:
        time.sleep(float(spec.split(":")[1]))


def clean_staging(out: Path) -> list[str]:
    """Remove what interrupted saves left half-written in `<out>/.partial/` (the caller holds `out`)."""
    return clean_stale_staging(Path(out) / STAGING, everything=True)


def checkpoint_problems(path: Path) -> list[str]:
    """Why `path` cannot be resumed from exactly: a damaged manifest, a file that differs from it, or
    a missing piece of trainer state (optimizer, scheduler, RNG). Empty when it can."""
    try:
        manifest = read_manifest(path)
    except ManifestError as err:
        return [str(err)]
    if manifest is None:
        return [f"{path}/{MANIFEST} is missing: not a complete vlmtune checkpoint"]
    problems = [f"{path / name}: missing (the trainer state needs it)" for name in TRAINER_STATE
                if not (path / name).is_file()]
    if not any(path.glob("rng_state*.pth")):
        problems.append(f"{path / 'rng_state.pth'}: missing (the trainer state needs it)")
    return problems + hash_problems(path, manifest)


def resume_point(out: Path, resume: str | bool | None, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint to resume from, checked against its manifest: `auto`/True -> the newest intact
    one in `out` (a damaged newer one is skipped, and `say` tells which and why); a path -> that one."""
    if resume in (None, False):
        return None
    if resume not in (True, "auto"):
        path = Path(resume)
        problems = checkpoint_problems(path)
        if problems:
            raise ConfigError(f"--resume {path}: cannot resume from it: {problems[0]}")
        return path
    found = complete_checkpoints(out)
    if not found:
        raise ConfigError(f"--resume: {out} holds no complete checkpoint-<step> folder to resume from; start the run "
                          "again with `vlmtune train CONFIG output.overwrite=true` (it replaces what is there)")
    damaged = []
    for path in reversed(found):
        problems = checkpoint_problems(path)
        if not problems:
            if damaged:
                say(f"resuming from {path.name} instead: " + "; ".join(damaged))
            return path
        damaged.append(f"{path.name} is damaged ({problems[0]})")
    raise ConfigError(f"--resume: no checkpoint in {out} is intact: " + "; ".join(damaged)
                      + "; restore the file(s) or start again with output.overwrite=true")


def run_differences(checkpoint_manifest: dict, record: dict) -> list[str]:
    """How this run differs from the one that wrote a checkpoint: config keys (besides those a
    resumption may change), the data files' fingerprint and the fingerprint of the model it starts
    from (`source`: `model.path`, or the parts a new VLM is built from)."""
    def flat(tree: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                items.update(flat(value, f"{prefix}{key}."))
            else:
                items[f"{prefix}{key}"] = value
        return items

    now = json.loads(json.dumps(record.get("config", {}), default=str))  # as the manifest stores it
    before, now = flat(checkpoint_manifest.get("config", {})), flat(now)
    changed = [f"{key} {before.get(key)!r} -> {now.get(key)!r}" for key in sorted(before.keys() | now.keys())
               if before.get(key) != now.get(key) and not any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)]
    if checkpoint_manifest.get("data", {}).get("fingerprint") != record["data"]["fingerprint"]:
        changed.append("the training data files' contents")
    if "source" in checkpoint_manifest and _base_fingerprints(checkpoint_manifest["source"]) != _base_fingerprints(record["source"]):
        changed.append("the model it starts from (its fingerprint)")
    return changed


def _base_fingerprints(base: dict) -> object:
    return base.get("fingerprint") or {k: v.get("fingerprint") for k, v in base.get("built_from", {}).items()}


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
