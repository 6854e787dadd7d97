"""Training logs: one JSON line per logging step, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "loss.png"


class JsonlLogger(TrainerCallback):
    """Appends `{"step", "epoch", "loss", "learning_rate", ...}` for each Trainer log event."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if not any(key in logs for key in ("loss", "eval_loss")):
            return  # the end-of-training summary is not a step
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, after_step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint: they are about to be run again."""
    kept = [r for r in read_log(path) if r.get("step", 0) <= after_step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_loss(log_path: Path, out: Path) -> Path | None:
    """Training (and eval) loss against step; returns None when nothing was logged."""
    records = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)
