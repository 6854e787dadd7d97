"""Resume after a crash: a training process killed in the middle of writing a checkpoint leaves every
earlier checkpoint intact, and resuming ends with weights bitwise identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlmtune.cli import main

TUNES = {"full": {"vision": "full", "projector": "full", "llm": "full"},
         "lora": {"vision": "lora", "projector": "full", "llm": "lora", "lora": {"dropout": 0.1}}}
WEIGHTS = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


def write_config(path, model, data, out, mode):
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "data": {"train": str(data)}, "tune": TUNES[mode],
        "train": {"max_steps": 6, "save_steps": 2, "save_total_limit": 1, "batch_size": 4, "lr": 3e-3,
                  "warmup_ratio": 0.2, "logging_steps": 1},
        "output": {"dir": str(out)}}))
    return path


def wait_for(condition, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the training process never reached the expected point")
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_kill_during_save_then_resume_is_bitwise_identical(tiny_vlm, color_data, tmp_path, mode):
    reference = tmp_path / "uninterrupted"
    assert main(["train", str(write_config(tmp_path / "a.yaml", tiny_vlm, color_data, reference, mode))]) == 0

    out = tmp_path / "crashed"
    config = write_config(tmp_path / "b.yaml", tiny_vlm, color_data, out, mode)
    env = {**os.environ, "VLMTUNE_TEST_PAUSE_IN_SAVE": "4:120", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "train", str(config)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        staged = out / ".partial" / "checkpoint-4"
        wait_for(lambda: (staged / "trainer_state.json").is_file() and (staged / "generation_config.json").is_file())
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    # killed mid-save: checkpoint-4 is not in place, checkpoint-2 (the last complete one) survived pruning
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert main(["verify", str(out / "checkpoint-2")]) == 0

    assert main(["train", str(config), "--resume"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
    assert not (out / ".partial").exists()
    expected, resumed = load_file(str(reference / WEIGHTS[mode])), load_file(str(out / WEIGHTS[mode]))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    steps = [line for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert len(steps) == 6  # the killed run's lines after checkpoint-2 were replaced, not duplicated


def test_resume_without_a_checkpoint_is_refused(tiny_vlm, color_data, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_vlm, color_data, tmp_path / "empty", "full")
    assert main(["train", str(config), "--resume"]) == 2
    assert "holds no complete checkpoint-<step> folder to resume from" in capsys.readouterr().out


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tiny_vlm, color_data, tmp_path):
    """SIGINT to a real `vlmtune train` process: the step, the newest complete checkpoint, the command; loss.png
    written, no `.partial/` left."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", tiny_vlm, color_data, out, "full")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "vlmtune.cli", "train", str(config), "train.max_steps=500",
                                "train.save_total_limit=2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        wait_for(lambda: (out / "checkpoint-4" / "vlmtune.json").is_file())
    finally:
        process.send_signal(signal.SIGINT)
        printed, _ = process.communicate(timeout=120)
    assert process.returncode == 130, printed
    lines = printed.splitlines()
    stopped = next(line for line in lines if line.startswith("interrupted at step "))
    step = int(stopped.split()[3])
    assert stopped == f"interrupted at step {step} of 500; loss curve: {out / 'loss.png'}"
    newest = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert 4 <= newest <= step
    assert f"newest complete checkpoint: {out / f'checkpoint-{newest}'}" in lines
    assert f"resume with: vlmtune train {config} train.max_steps=500 train.save_total_limit=2 --resume" in lines
    assert (out / "loss.png").stat().st_size > 1000 and not (out / ".partial").exists()
    assert "Traceback" not in printed


def test_resuming_a_finished_run_changes_nothing(tiny_vlm, color_data, tmp_path, capsys):
    out = tmp_path / "done"
    config = write_config(tmp_path / "d.yaml", tiny_vlm, color_data, out, "full")
    assert main(["train", str(config), "train.max_steps=4"]) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["train", str(config), "train.max_steps=4", "--resume"]) == 2
    assert (f"--resume: the run in {out} already finished (4 of 4 steps); nothing was changed. To train further, "
            "raise train.max_steps (or train.epochs) and resume") in " ".join(capsys.readouterr().out.split())
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main(["train", str(config), "train.max_steps=6", "--resume"]) == 0  # a longer run continues
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-6"]
