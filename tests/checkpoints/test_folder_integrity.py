"""Integrity of model folders: replacing an `--out`, leftovers of killed saves, damaged files on load,
manifests that lie, symlinked checkpoints, a folder's own code, images outside their root, file modes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from vlmtune.checkpoints.manifest import MANIFEST, self_hash
from vlmtune.checkpoints.save import STAGING, staging_dir
from vlmtune.checkpoints.verify import verify
from vlmtune.cli import main
from vlmtune.data.check import check_data
from vlmtune.training.checkpointing import prune

from conftest import make_image, write_jsonl

CLI = [sys.executable, "-m", "vlmtune.cli"]


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_existing_out_is_replaced_only_with_overwrite_and_whole(tiny_vlm, tmp_path, capsys):
    """Item 6: a non-empty --out is refused; with --overwrite a kill before the swap leaves the old
    model complete, and the next run cleans the dead process's staging folder (item 7)."""
    out = tmp_path / "copy"
    assert main(["export", str(tiny_vlm), "--out", str(out)]) == 0
    assert main(["merge", "--base", str(tiny_vlm), "--out", str(out)]) == 2
    assert (f"--out {out} is a vlmtune full model folder; choose a new --out, or pass --overwrite to replace it whole"
            in capsys.readouterr().out)
    env = {**os.environ, "VLMTUNE_TEST_PAUSE_IN_PUBLISH": "120", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*CLI, "export", str(tiny_vlm), "--out", str(out), "--overwrite"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staged = tmp_path / STAGING / f"copy-{process.pid}" / MANIFEST
    try:
        deadline = time.monotonic() + 120
        while not staged.is_file():
            assert time.monotonic() < deadline and process.poll() is None, "export never reached the swap"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert main(["verify", str(out)]) == 0  # the previous model is untouched
    assert main(["export", str(tiny_vlm), "--out", str(out), "--overwrite"]) == 0
    assert not (tmp_path / STAGING).exists() and main(["verify", str(out)]) == 0


def test_an_interrupted_swap_is_put_back(tiny_vlm, tmp_path):
    """Item 6/7: killed between 'old renamed aside' and 'new renamed in', the old folder is restored."""
    aside = tmp_path / STAGING / f"model-replaced-{dead_pid()}"
    shutil.copytree(tiny_vlm, aside)
    shutil.copytree(tiny_vlm, tmp_path / STAGING / f"model-{dead_pid()}")  # a dead process's staging folder
    staging_dir(tmp_path / "other")
    assert verify(tmp_path / "model").ok
    assert sorted(p.name for p in (tmp_path / STAGING).iterdir()) == [f"other-{os.getpid()}"]


def test_remote_code_is_never_run_nor_asked_about(parts, tmp_path):
    """Item 8: a folder whose config names its own code (`auto_map`, unknown model type)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "ran"
    (evil / "config.json").write_text(json.dumps({"model_type": "evil-net", "auto_map": {
        "AutoConfig": "evil_code.EvilConfig", "AutoModel": "evil_code.EvilModel", "AutoModelForCausalLM": "evil_code.EvilModel"}}))
    (evil / "evil_code.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"model": {"vision": str(evil), "llm": str(parts["llm"])}, "data": {"train": str(tmp_path / "x.jsonl")},
                                  "output": {"dir": str(tmp_path / "run")}}))
    write_jsonl(tmp_path / "x.jsonl", [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}])
    for command in (["inspect", str(evil)], ["merge", "--llm", str(evil), "--vision", str(evil), "--out", str(tmp_path / "m")],
                    ["train", str(config)]):
        result = subprocess.run([*CLI, *command], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stdout + result.stderr
        assert (f"error: {evil} holds its own model code (named by `auto_map` in its config), which vlmtune does not run "
                "unless told to: if you trust the folder, pass --trust-remote-code" in result.stdout)
        assert "Do you wish to run the custom code" not in result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert not marker.exists()


def test_damaged_files_fail_on_load_naming_the_file(tiny_vlm, color_data, tmp_path, capsys):
    """Item 9: every command that loads a vlmtune folder checks sizes and (small folders) hashes first."""
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm, model)
    preds = str(tmp_path / "preds.jsonl")
    flip_byte(model / "model.safetensors")
    assert main(["generate", str(model), "--data", str(color_data), "--out", preds]) == 2
    assert (f"error: {model / 'model.safetensors'}: sha256 differs from vlmtune.json (the file is corrupted or was "
            f"changed); restore the file, or pass --no-verify to load {model} anyway" in capsys.readouterr().out)
    assert main(["generate", str(model), "--data", str(color_data), "--out", preds, "--no-verify"]) == 0

    shutil.copy(tiny_vlm / "model.safetensors", model / "model.safetensors")
    tokenizer = model / "tokenizer.json"
    size = tokenizer.stat().st_size
    tokenizer.write_bytes(tokenizer.read_bytes()[: size // 2])
    for command in (["inspect", str(model)], ["export", str(model), "--out", str(tmp_path / "e")],
                    ["generate", str(model), "--data", str(color_data), "--out", preds]):
        assert main(command) == 2
        assert (f"error: {tokenizer}: {size // 2} bytes, but vlmtune.json says {size} (the file is truncated or was "
                "changed)" in capsys.readouterr().out)

    bare = tmp_path / "bare"  # no manifest: what fails to load is still one sentence
    shutil.copytree(tiny_vlm, bare)
    (bare / MANIFEST).unlink()
    (bare / "config.json").write_text('{"model_type": "llava", "text_config": ')
    assert main(["export", str(bare), "--out", str(tmp_path / "e2")]) == 2
    assert f"error: {bare}: the model cannot be loaded (" in capsys.readouterr().out


def test_inspect_refuses_a_pickle_that_is_not_plain_weights(tmp_path, capsys):
    import datetime

    torch.save({"weight": torch.zeros(2), "when": datetime.datetime(2020, 1, 1)}, tmp_path / "odd.pth")
    assert main(["inspect", str(tmp_path / "odd.pth")]) == 2
    assert f"error: {tmp_path / 'odd.pth'} cannot be read as plain weights (UnpicklingError: " in capsys.readouterr().out


def test_manifest_may_not_name_outside_files_nor_change(tiny_vlm, tmp_path, capsys):
    """Item 10: paths outside the folder are refused; the manifest's own hash catches edits that keep
    it valid JSON."""
    model = tmp_path / "model"
    shutil.copytree(tiny_vlm, model)
    (tmp_path / "secret.txt").write_text("not yours")
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["files"]["../secret.txt"] = "0" * 64
    manifest["manifest_sha256"] = self_hash(manifest)  # a manifest crafted whole, not merely damaged
    (model / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(model)]) == 1
    assert f"{model / MANIFEST} names '../secret.txt', which is outside {model}" in capsys.readouterr().out

    shutil.copy(tiny_vlm / MANIFEST, model / MANIFEST)
    text = (model / MANIFEST).read_text()
    assert '"format_version": 1' in text
    (model / MANIFEST).write_text(text.replace('"format_version": 1', '"format_version": 3'))
    assert main(["verify", str(model)]) == 1
    assert f"{model / MANIFEST} was changed after it was written (its own sha256 differs)" in capsys.readouterr().out


def test_pruning_a_symlinked_checkpoint_removes_the_link_only(tiny_vlm, tmp_path):
    """Item 10: a symlinked checkpoint folder is handled: the link goes, what it points to stays."""
    out = tmp_path / "run"
    out.mkdir()
    elsewhere = shutil.copytree(tiny_vlm, tmp_path / "kept-elsewhere")
    (out / "checkpoint-2").symlink_to(elsewhere, target_is_directory=True)
    shutil.copytree(tiny_vlm, out / "checkpoint-4")
    assert [p.name for p in prune(out, 1)] == ["checkpoint-2"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-4"]
    assert verify(elsewhere).ok


def test_confine_images_refuses_images_outside_the_root(tiny_vlm, tmp_path, capsys):
    """Item 11: by default `../` paths are read (documented); `data.confine_images` refuses them."""
    make_image(tmp_path / "outside.png")
    (tmp_path / "data").mkdir()
    data = write_jsonl(tmp_path / "data" / "train.jsonl", [{"id": "s1", "image": "../outside.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}])
    assert not check_data([str(data)]).problems
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"model": {"path": str(tiny_vlm)}, "data": {"train": str(data), "confine_images": True},
                                  "output": {"dir": str(tmp_path / "run")}}))
    assert main(["train", str(config)]) == 1
    assert (f"(id s1): image {data.parent / '../outside.png'} is outside {data.parent.resolve()} "
            "(data.confine_images=true)" in capsys.readouterr().out)


def test_every_file_of_a_folder_has_the_same_mode(tiny_vlm, color_data, tmp_path):
    """Item 11: model.safetensors was written 0600 while the rest were 0644."""
    config = tmp_path / "train.yaml"
    config.write_text(json.dumps({"model": {"path": str(tiny_vlm)}, "data": {"train": str(color_data)},
                                  "train": {"max_steps": 2, "save_steps": 2, "batch_size": 4},
                                  "output": {"dir": str(tmp_path / "run")}}))
    assert main(["train", str(config)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for folder in (tiny_vlm, tmp_path / "run" / "checkpoint-2"):
        modes = {oct(p.stat().st_mode & 0o777) for p in folder.iterdir() if p.is_file()}
        assert modes == {oct(0o666 & ~umask)}, folder
    final = json.loads((tmp_path / "run" / MANIFEST).read_text())["files"]
    assert {oct((tmp_path / "run" / name).stat().st_mode & 0o777) for name in final} == {oct(0o666 & ~umask)}
