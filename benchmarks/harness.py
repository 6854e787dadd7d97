"""What the side-by-side benchmarks share: the work folder's links to the data and model they made,
and runs alternating between modes, each in its own process (so a busy moment hurts every mode alike
and no run inherits another's memory), reporting one JSON line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


FULL = {"vision": "full", "projector": "full", "llm": "full"}


def job_config(model: Path, data: Path, out: Path, data_extra: dict, train_extra: dict, tune: dict = FULL):
    """The benchmarks' vlmtune run: lr 1e-3, no warm-up, a loss logged every step, no checkpoints."""
    from vlmtune.config import load_config

    return load_config(tree={"model": {"path": str(model)}, "data": {"train": str(data), **data_extra}, "tune": tune,
                             "train": {"lr": 1e-3, "logging_steps": 1, "save_steps": 0, "warmup_ratio": 0.0,
                                       **train_extra},
                             "output": {"dir": str(out), "overwrite": True}})


def count_batch(seen: dict, inputs: dict, pad: int) -> None:
    """What a training batch holds: positions computed, real (non-padding) tokens, supervised tokens,
    samples (in a packed row, a segment is a sample unless it is the row's padding tail) and images."""
    ids = inputs["input_ids"]
    for key in ("positions", "real", "supervised", "samples", "images"):
        seen.setdefault(key, 0)
    seen["positions"] += ids.numel()
    seen["real"] += int((ids != pad).sum())
    seen["supervised"] += int((inputs["labels"][:, 1:] != -100).sum())
    seen["images"] += int(inputs["pixel_values"].shape[0]) if "pixel_values" in inputs else 0
    if "pack_lengths" in inputs:
        for r, sizes in enumerate(inputs["pack_lengths"].tolist()):
            starts = [sum(sizes[:k]) for k, n in enumerate(sizes) if n]
            seen["samples"] += sum(int(ids[r, start] != pad) for start in starts)
    else:
        seen["samples"] += ids.shape[0]


def job_arguments(parser, samples: int, steps: int, work: str) -> None:
    """The arguments every benchmark takes: the data, the model's size, the schedule, the rounds."""
    parser.add_argument("--samples", type=int, default=samples)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", default=work)
    parser.add_argument("--child", help=argparse.SUPPRESS)


def link_inputs(work: Path, **targets: Path) -> None:
    """`work/<name>` -> each made input, so every child finds them under fixed names."""
    for name, target in targets.items():
        (work / name).unlink(missing_ok=True)
        (work / name).symlink_to(target)


def instrument(trainer_class, pad_id, started: float) -> tuple[dict, dict, object]:
    """For a peer's own runner (its own environment): wraps `trainer_class` to count what its training
    batches hold (`count_batch`; `pad_id(trainer)` names the padding id) and to time `train()` alone,
    the span every tool's row times. Returns what is filled in as it runs (`seen`, `timing`) and a
    callback for the first step, counted from `started`."""
    import time

    from transformers import TrainerCallback

    seen: dict = {}
    timing: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timing.setdefault("first_step", time.perf_counter() - started)

    original_loss, original_train = trainer_class.compute_loss, trainer_class.train

    def counting(self, model, inputs, *args, **kwargs):
        if model.training:
            count_batch(seen, inputs, pad_id(self))
        return original_loss(self, model, inputs, *args, **kwargs)

    def timed(self, *args, **kwargs):
        begun = time.perf_counter()
        output = original_train(self, *args, **kwargs)
        timing["seconds"] = time.perf_counter() - begun
        timing["final_loss"] = [h["loss"] for h in self.state.log_history if "loss" in h][-1]
        timing["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        timing["dtype"] = str(next(self.model.parameters()).dtype)
        return output

    trainer_class.compute_loss, trainer_class.train = counting, timed
    return seen, timing, FirstStep()


def report_peer(seen: dict, timing: dict) -> None:
    """A peer runner's result: its timing, its batches' counts and its process's peak memory."""
    import resource

    report({**timing, **seen, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def report(row: dict) -> None:
    """A child's result, the one line `alternate` reads."""
    print("RESULT " + json.dumps(row))


def alternate(script: str, modes, repeats: int, args: list[str],
              env_for: Callable[[str], dict] | None = None) -> list[dict]:
    """`script --child MODE *args` for every mode, `repeats` rounds; exits with the output of a failed run."""
    rows = []
    for _ in range(repeats):
        for mode in modes:
            env = {**os.environ, **(env_for(mode) if env_for else {})}
            rows.append(run_child([sys.executable, script, "--child", mode, *args], mode, env))
    return rows


def run_child(command: list[str], name: str, env: dict | None = None) -> dict:
    """Runs `command` in its own process and returns the row of its RESULT line; exits with its output
    when it gives none."""
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])
