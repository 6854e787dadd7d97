"""Training logs: one JSON line per logging step, and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "loss.png"


def component_rates(optimizer) -> dict[str, float]:
    """`learning_rate/<component>` for each parameter group: the Trainer logs only the first group's."""
    if optimizer is None:
        return {}
    return {f"learning_rate/{group['name']}": group["lr"] for group in optimizer.param_groups if "name" in group}


class JsonlLogger(TrainerCallback):
    """Appends `{"step", "epoch", "loss", "learning_rate", "learning_rate/<component>", ...}` for each
    Trainer log event."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if not any(key in logs for key in ("loss", "eval_loss")):
            return  # the end-of-training summary is not a step
        if "loss" in logs:
            logs.update(component_rates(optimizer))  # the console line (StepLines) shows them too
        record = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def step_line(step: int, max_steps: int, logs: dict) -> str:
    """`step 10/100  loss 1.2345  lr projector 1.00e-03 llm 2.00e-05  epoch 0.50` instead of a raw dict."""
    if "eval_loss" in logs:
        return f"step {step}/{max_steps}  eval loss {logs['eval_loss']:.4f}"
    rates = {k.split("/", 1)[1]: v for k, v in logs.items() if k.startswith("learning_rate/")}
    lr = " ".join(f"{name} {rate:.2e}" for name, rate in rates.items()) or f"{logs.get('learning_rate', 0.0):.2e}"
    line = f"step {step}/{max_steps}  loss {logs['loss']:.4f}  lr {lr}"
    if "grad_norm" in logs:
        line += f"  grad norm {logs['grad_norm']:.3f}"
    return line + f"  epoch {logs.get('epoch', 0.0):.2f}"


class StepLines(ProgressCallback):
    """The progress bar, with one readable line per logging step (the Trainer's prints the raw dict)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            if "loss" in logs or "eval_loss" in logs:
                self.training_bar.write(step_line(state.global_step, state.max_steps, logs))

    def close(self) -> None:
        """End the bar's line, so that what is printed next (e.g. after Ctrl-C) starts on its own line."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


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
