"""Integrity of a run folder under attack: a second run on the same folder, overwrite, damaged
checkpoints, kills while pruning or before the first checkpoint, a full disk, an output.dir that is
its own file system. Crashes are real SIGKILLs of real `vlmtune train` processes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from vlmtune.checkpoints.manifest import MANIFEST
from vlmtune.cli import main

TUNE = {"vision": "frozen", "projector": "full", "llm": "full"}
CLI = [sys.executable, "-m", "vlmtune.cli"]


def write_config(path, model, data, out, steps=4, save_steps=2, **train):
    path.write_text(yaml.safe_dump({
        "model": {"path": str(model)}, "data": {"train": str(data)}, "tune": TUNE,
        "train": {"max_steps": steps, "save_steps": save_steps, "batch_size": 4, "lr": 3e-3, "logging_steps": 1, **train},
        "output": {"dir": str(out)}}))
    return path


def checkpoints(out):
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def wait_for(condition, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline or process.poll() is not None:
            raise TimeoutError(f"the training process never reached the expected point (exit {process.poll()})")
        time.sleep(0.05)


def start_paused(config, pause):
    env = {**os.environ, **pause, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([*CLI, "train", str(config)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill(process):
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_overwrite_starts_from_an_empty_folder_and_resume_refuses_another_runs_checkpoint(
        tiny_vlm, color_data, tmp_path, capsys):
    """Item 1: the earlier run's later checkpoints, logs and model do not survive into the new run."""
    out = tmp_path / "run"
    assert main(["train", str(write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out, steps=6))]) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    second = write_config(tmp_path / "b.yaml", tiny_vlm, color_data, out, steps=2, seed=7)
    assert main(["train", str(second)]) == 2
    assert "holds an earlier run (newest checkpoint-6); continue it with `vlmtune train CONFIG --resume`" in capsys.readouterr().out
    assert main(["train", str(second), "output.overwrite=true"]) == 0
    assert "output.overwrite: removed the earlier run's" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2"]
    assert len((out / "trainer_log.jsonl").read_text().splitlines()) == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert (manifest["config"]["train"]["seed"], manifest["state"]["step"]) == (7, 2)

    other = write_config(tmp_path / "c.yaml", tiny_vlm, color_data, out, steps=4, seed=7, lr=1e-3)
    assert main(["train", str(other), "--resume"]) == 2
    assert (f"--resume: {out / 'checkpoint-2'} belongs to another run (train.lr 0.003 -> 0.001); resume with the "
            "config that wrote it, or pass --force-resume" in capsys.readouterr().out)
    assert main(["train", str(other), "--resume", "--force-resume"]) == 0
    assert "--force-resume: continuing from" in capsys.readouterr().out
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"]
    color_data.write_text(color_data.read_text().replace('"value": "red"', '"value": "blue"', 1))
    assert main(["train", str(other), "--resume"]) == 2
    assert (f"--resume: {out / 'checkpoint-4'} belongs to another run (the training data files' contents)"
            in capsys.readouterr().out)


def test_overwrite_refuses_files_no_run_wrote(tiny_vlm, color_data, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out)
    assert main(["train", str(config), "output.overwrite=true"]) == 2
    assert f"`output.overwrite`: {out} holds notes.txt, which no vlmtune run wrote" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "keep me"


def test_resume_skips_a_damaged_checkpoint_saying_so_and_refuses_missing_trainer_state(
        tiny_vlm, color_data, tmp_path, capsys):
    """Item 2: a flipped bit falls back to the newest intact checkpoint; missing optimizer or
    scheduler state is an error naming the file, never a silent restart of that state."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out)
    assert main(["train", str(config)]) == 0
    weights = out / "checkpoint-4" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    # the run finished at step 4; it goes on to step 6 (a resume may raise max_steps)
    assert main(["train", str(config), "train.max_steps=6", "--resume"]) == 0
    printed = capsys.readouterr().out
    assert (f"resuming from checkpoint-2 instead: checkpoint-4 is damaged ({weights}: sha256 differs from vlmtune.json"
            in printed)
    assert f"resuming from {out / 'checkpoint-2'}" in printed
    assert [json.loads(line)["step"] for line in (out / "trainer_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    assert main(["verify", str(out / "checkpoint-4")]) == 0  # saved again by the resumed run

    (out / "checkpoint-6" / "optimizer.pt").unlink()
    (out / "checkpoint-4" / "optimizer.pt").unlink()
    (out / "checkpoint-2" / "scheduler.pt").unlink()
    capsys.readouterr()
    assert main(["train", str(config), "train.max_steps=8", "--resume"]) == 2
    assert (f"--resume: no checkpoint in {out} is intact: checkpoint-6 is damaged ({out / 'checkpoint-6' / 'optimizer.pt'}: "
            f"missing (the trainer state needs it)); checkpoint-4 is damaged ({out / 'checkpoint-4' / 'optimizer.pt'}: "
            "missing" in " ".join(capsys.readouterr().out.split()))
    assert main(["train", str(config), "train.max_steps=8", f"train.resume={out / 'checkpoint-4'}"]) == 2
    assert f"cannot resume from it: {out / 'checkpoint-4' / 'optimizer.pt'}: missing" in " ".join(capsys.readouterr().out.split())


def test_kill_while_pruning_leaves_no_half_deleted_checkpoint(tiny_vlm, color_data, tmp_path):
    """Item 3: the pruned checkpoint is renamed out of the way before it is deleted."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out, steps=6, save_total_limit=1)
    process = start_paused(config, {"VLMTUNE_TEST_PAUSE_IN_PRUNE": "2:120"})
    try:
        wait_for(lambda: (out / "checkpoint-4" / MANIFEST).is_file() and not (out / "checkpoint-2").exists(), process)
    finally:
        kill(process)
    assert checkpoints(out) == ["checkpoint-4"]  # checkpoint-2 is gone whole; what is left of it is in .partial/
    assert list((out / ".partial").glob("checkpoint-2-*"))
    assert main(["verify", str(out / "checkpoint-4")]) == 0
    assert main(["train", str(config), "--resume"]) == 0
    assert checkpoints(out) == ["checkpoint-6"] and not (out / ".partial").exists()


def test_a_second_run_on_a_held_output_dir_is_refused_and_a_killed_run_leaves_one_command(
        tiny_vlm, color_data, tmp_path, capsys):
    """Item 4 (the lock, bounded: two real processes, no network) and item 7 (a kill before the first
    checkpoint: the message names the command that continues)."""
    out = tmp_path / "run"
    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out)
    first = start_paused(config, {"VLMTUNE_TEST_PAUSE_IN_SAVE": "2:120"})
    staged = out / ".partial" / "checkpoint-2" / "trainer_state.json"
    try:
        wait_for(staged.is_file, first)
        for extra in ([], ["--resume"]):
            second = subprocess.run([*CLI, "train", str(config), "output.overwrite=true", *extra], capture_output=True,
                                    text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"is in use by another vlmtune run (process {first.pid}: " in second.stdout
        assert staged.is_file() and first.poll() is None  # the first run was not disturbed
    finally:
        kill(first)
    assert main(["train", str(config), "--resume"]) == 2  # the dead run's lock went with it
    assert (f"--resume: {out} holds no complete checkpoint-<step> folder to resume from; start the run again with "
            "`vlmtune train CONFIG output.overwrite=true`" in capsys.readouterr().out)
    assert main(["train", str(config)]) == 2
    assert (f"`output.dir`: {out} holds what an interrupted run left (no complete checkpoint); start it again with "
            "`vlmtune train CONFIG output.overwrite=true`" in capsys.readouterr().out)
    assert main(["train", str(config), "output.overwrite=true"]) == 0
    assert checkpoints(out) == ["checkpoint-2", "checkpoint-4"] and not (out / ".partial").exists()


def _unshare_works():
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not _unshare_works(), reason="needs `unshare -rm` to mount a private tmpfs")


def in_own_filesystem(folder, size, *command):
    """Run `command` with `folder` mounted as its own tmpfs of `size` (a private mount namespace)."""
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && shift && "$@"'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(folder), *command], capture_output=True,
                           text=True, timeout=300, env=env)


@needs_mounts
def test_output_dir_on_its_own_file_system(tiny_vlm, color_data, tmp_path):
    """Item 5: staging happens on the destination's file system, so the final rename works."""
    out = tmp_path / "volume"
    out.mkdir()
    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, out, steps=2)
    script = f'mount -t tmpfs -o size=64m tmpfs "$1" && {" ".join(CLI)} train {config} && ls -a "$1" && ls -a "$2"'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(out), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "saved and verified" in result.stdout
    listed = result.stdout.split()
    assert "model.safetensors" in listed and MANIFEST in listed and ".partial" not in listed


@needs_mounts
def test_a_full_disk_says_so(tiny_vlm, color_data, tmp_path):
    """Item 7: a full disk is one sentence saying where, what is free and what the save needs, for a
    model folder (export) and for a checkpoint written during training."""
    disk = tmp_path / "small"
    disk.mkdir()
    result = in_own_filesystem(disk, "256k", *CLI, "export", str(tiny_vlm), "--out", str(disk / "copy"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: the disk holding {disk / 'copy'} is full (" in result.stdout
    assert "this save needs about" in result.stdout and "Traceback" not in result.stderr

    config = write_config(tmp_path / "a.yaml", tiny_vlm, color_data, disk / "run", steps=2)
    result = in_own_filesystem(disk, "512k", *CLI, "train", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: the disk holding {disk / 'run'} is full (" in result.stdout
    assert "this save needs about" in result.stdout and "Traceback" not in result.stderr
