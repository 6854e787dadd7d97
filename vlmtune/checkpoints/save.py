"""Write complete model folders, crash-safely.

A folder holds weights (full), a PEFT adapter (LoRA) or only the tuned components' weights (delta,
with a reference to its base), plus config, processor (tokenizer, image processor, chat template),
generation config and the `vlmtune.json` manifest. Everything is written into a staging folder on the
same file system as the destination and moved into place, the manifest last: a folder with a
manifest is complete. An existing folder is replaced whole (the old one renamed aside, the new one
renamed in, then the old one deleted); only a run folder, which also holds checkpoints and logs, is
updated file by file, its manifest removed first and written last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoProcessor

from vlmtune.checkpoints.manifest import MANIFEST, ManifestError, read_manifest, write_manifest

STAGING = ".partial"
DELTA_WEIGHTS = "delta.safetensors"
# weight files of every kind: when a folder is rewritten, those the new model does not have must go,
# or a full model's weights would sit beside a new adapter (and be loaded instead of it)
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "adapter_model.safetensors",
                   "adapter_config.json", DELTA_WEIGHTS, "pytorch_model*.bin")


def is_adapter(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


_OWNED = re.compile(r"^(?P<name>.+?)(?P<replaced>-replaced)?-(?P<pid>\d+)$")  # <name>-<pid>, <name>-replaced-<pid>


class DiskFullError(OSError):
    """A save ran out of disk space; the message says where, how much is free and how much it needs."""


class OutputExistsError(FileExistsError):
    """`--out` names something that exists and `--overwrite` was not given."""


def refuse_existing_out(out: Path, overwrite: bool) -> None:
    """`merge`, `convert`, `export`: a non-empty `--out` is replaced only with `--overwrite`."""
    out = Path(out)
    if overwrite or not (out.exists() or out.is_symlink()) or (out.is_dir() and not any(out.iterdir())):
        return
    if out.is_dir():
        try:
            kind = (read_manifest(out) or {}).get("kind")
        except ManifestError:
            kind = "damaged"
        what = f"a vlmtune {kind} model folder" if kind else f"a folder of {len(list(out.iterdir()))} entries"
        checkpoints = len(list(out.glob("checkpoint-*")))
        what += f" with {checkpoints} checkpoint(s)" if checkpoints else ""
    else:
        what = "a file"
    raise OutputExistsError(f"--out {out} is {what}; choose a new --out, or pass --overwrite to replace it whole")


def in_place(out: Path, run_folder: bool) -> bool:
    """Whether `out` is updated file by file: a run folder (it keeps its checkpoints and logs), or an
    existing folder that is its own mount point (it cannot be renamed)."""
    return run_folder or (out.is_dir() and not out.is_symlink() and out.stat().st_dev != out.parent.stat().st_dev)


def staging_dir(out: Path, run_folder: bool = False) -> Path:
    """A fresh folder to write `out` into, on `out`'s file system: `<out>/.partial/` for a folder
    updated in place, else `<out's parent>/.partial/`. Staging folders of processes that are gone
    are cleaned up first."""
    root = (out if in_place(out, run_folder) else out.parent) / STAGING
    clean_stale_staging(root)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{out.name}-{os.getpid()}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    return target


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(root: Path, everything: bool = False) -> list[str]:
    """Remove what interrupted saves left in a `.partial/` folder: `<name>-<pid>` of processes that
    are gone (with `everything`, also folders that carry no process id, e.g. the Trainer's). A folder
    that was renamed aside to be replaced, whose replacement never arrived, is put back."""
    notes = []
    if not root.is_dir():
        return notes
    for entry in sorted(root.iterdir()):
        match = None if everything and re.match(r"^checkpoint-\d+$", entry.name) else _OWNED.match(entry.name)
        if match and process_alive(int(match["pid"])) and int(match["pid"]) != os.getpid():
            continue
        if not match and not everything:
            continue
        original = root.parent / match["name"] if match and match["replaced"] else None
        if original is not None and not original.exists() and (entry / MANIFEST).is_file():
            os.replace(entry, original)
            notes.append(f"put back {original}: a replacement of it was interrupted")
        else:
            remove_tree(entry)
            notes.append(f"removed {entry}, left by an interrupted save")
    with contextlib.suppress(OSError):
        root.rmdir()
    return notes


def remove_tree(path: Path) -> None:
    """Delete a folder crash-safely: its manifest first (so it never looks complete while half
    deleted), then the rest. A symbolic link is removed itself, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    (path / MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(path)


def publish(staging: Path, out: Path, run_folder: bool = False) -> Path:
    """Move a complete staging folder to `out`: one rename when `out` is new; else the old folder is
    renamed aside, the new one renamed in and the old one deleted; a folder updated in place (see
    `in_place`) gets the new files one by one, its manifest removed first and written last."""
    if not out.exists() and not out.is_symlink():
        os.replace(staging, out)
    elif in_place(out, run_folder):
        (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the new manifest lands
        for pattern in WEIGHT_PATTERNS:
            for stale in out.glob(pattern):
                if not (staging / stale.name).exists():
                    stale.unlink()
        files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: p.name == MANIFEST)
        for path in files:
            target = out / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        shutil.rmtree(staging, ignore_errors=True)
    else:
        _pause_for_crash_test()
        aside = staging.parent / f"{out.name}-replaced-{os.getpid()}"
        os.replace(out, aside)
        os.replace(staging, out)
        remove_tree(aside)
    with contextlib.suppress(OSError):
        staging.parent.rmdir()  # the staging root goes once nothing else is being written there
    return out


def _pause_for_crash_test() -> None:
    """`VLMTUNE_TEST_PAUSE_IN_PUBLISH=SECONDS` holds a finished replacement before it is moved into
    place, so a test can kill a real process at that moment."""
    if os.environ.get("VLMTUNE_TEST_PAUSE_IN_PUBLISH"):
        time.sleep(float(os.environ["VLMTUNE_TEST_PAUSE_IN_PUBLISH"]))


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC however it surfaces: an OSError, torch's zip writer, or safetensors' IoError."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)
    return any(sign in text for sign in ("No space left on device", "StorageFull", "code: 28", "os error 28", "inline_container"))


def disk_full_error(where: Path, needed: int, err: BaseException) -> DiskFullError:
    """One sentence: the disk is full, where, what is free and about how much the save needs."""
    probe = where
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return DiskFullError(f"the disk holding {where} is full ({free / 2**20:.1f} MiB free; this save needs "
                         f"about {needed / 2**20:.1f} MiB): free some space or choose another folder "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})")


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in model.state_dict().values()}.values())


def write_model_files(model: nn.Module, processor, folder: Path, delta_keys: set[str] | None = None,
                      state_dict: dict | None = None) -> str:
    """Weights (or adapter, or delta), config, processor and generation config; returns the kind.
    `state_dict`: the model's full tensors when its own are shards (FSDP), gathered by the caller."""
    if is_adapter(model):
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        base = model.get_base_model()
        base.generation_config.save_pretrained(folder)
        kind = "lora"
    elif delta_keys is not None:
        state = {k: v.detach().contiguous().cpu() for k, v in (state_dict or model.state_dict()).items() if k in delta_keys}
        save_file(state, str(folder / DELTA_WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(folder)
        model.generation_config.save_pretrained(folder)
        kind = "delta"
    else:
        model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
        kind = "full"
    processor.save_pretrained(folder)
    return kind


def save_model_folder(model: nn.Module, processor, out: str | Path, record: dict,
                      delta_keys: set[str] | None = None, run_folder: bool = False,
                      state_dict: dict | None = None) -> Path:
    """Save `model` with its processor and a manifest into `out`, crash-safely, and check it loads.

    `delta_keys`: write only these tensors (a delta on `base`). `run_folder`: `out` also holds a
    training run's checkpoints and logs, so it is updated in place rather than replaced.
    `state_dict`: the full tensors of a model whose own are shards (FSDP)."""
    out = Path(out)
    if out.is_symlink() and not run_folder:
        raise ManifestError(f"{out} is a symbolic link; write to the folder it points to, or remove the link")
    staging = staging_dir(out, run_folder)
    try:
        kind = write_model_files(model, processor, staging, delta_keys, state_dict)
    except Exception as err:  # torch, safetensors and the OS each report a full disk their own way
        if not is_disk_full(err):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise disk_full_error(out, model_bytes(model), err) from None
    check_folder_loads(staging, model, delta_keys, state_dict)
    code = sorted(p.name for p in staging.glob("*.py"))  # model code the folder carries (`trust_remote_code`)
    write_manifest(staging, {"kind": kind, **record, **({"code": code} if code else {})})
    return publish(staging, out, run_folder)


def check_folder_loads(folder: Path, model: nn.Module, delta_keys: set[str] | None = None,
                       state_dict: dict | None = None) -> None:
    """Cheap load check: config and processor reload, and the weight files hold as many tensors and
    elements as the model (names are not compared: transformers may write a legacy key naming)."""
    if is_adapter(model):
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model, state_dict=state_dict)
        files = [folder / "adapter_model.safetensors"]
    else:
        AutoConfig.from_pretrained(folder, trust_remote_code=False)
        expected = {k: v for k, v in (state_dict or model.state_dict()).items() if delta_keys is None or k in delta_keys}
        index = folder / "model.safetensors.index.json"
        if delta_keys is not None:
            files = [folder / DELTA_WEIGHTS]
        elif index.is_file():
            files = [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        else:
            files = [folder / "model.safetensors"]
    AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise RuntimeError(f"{folder}: weight file(s) {', '.join(missing)} were not written")
    stored_count = stored_numel = 0
    for file in files:
        with safe_open(file, "pt") as fh:
            for key in fh.keys():
                stored_count += 1
                stored_numel += _numel(fh.get_slice(key).get_shape())
    unique = {t.data_ptr(): t.numel() for t in expected.values()}  # tied weights are stored once
    if stored_numel != sum(unique.values()) or not len(unique) <= stored_count <= len(expected):
        raise RuntimeError(
            f"{folder}: the saved weights hold {stored_count} tensors / {stored_numel} values, "
            f"but the model has {len(expected)} tensors / {sum(unique.values())} values"
        )


def _numel(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n
