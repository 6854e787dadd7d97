"""`vlmtune.json`: what a folder holds, what it was trained from, and the sha256 of every file.

The manifest is written last, so a folder with a manifest is complete; `verify` re-hashes the files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

MANIFEST = "vlmtune.json"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20
_SAMPLE = 4 << 20  # bytes hashed at each end of a weight file for a quick fingerprint


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below `folder` (sub-checkpoints and the manifest itself excluded)."""
    hashes = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.name != MANIFEST and not _nested_run_file(rel):
            hashes[str(rel)] = sha256_file(path)
    return hashes


def _nested_run_file(rel: Path) -> bool:
    """Files that belong to the run around a model, not the model: checkpoints, staging, logs, base."""
    top = rel.parts[0]
    return len(rel.parts) > 1 and (top.startswith(("checkpoint-", ".partial", "runs", "base", "merged")))


def model_fingerprint(folder: Path) -> str:
    """A quick identity of a model folder: its config and, per weight file, size and both ends.

    Hashing whole multi-gigabyte weights on every run is too slow; a changed config, a different
    tensor layout or retrained weights all change this fingerprint."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for name in ("config.json", "adapter_config.json"):
        if (folder / name).is_file():
            digest.update(name.encode() + (folder / name).read_bytes())
    for path in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            digest.update(fh.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                fh.seek(size - _SAMPLE)
                digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()


def data_fingerprint(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in files:
        digest.update(Path(name).name.encode() + sha256_file(Path(name)).encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    import vlmtune

    return {"vlmtune": vlmtune.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "torch": torch.__version__, "python": platform.python_version()}


def write_manifest(folder: Path, record: dict) -> dict:
    """Hash every file of `folder`, then write the manifest atomically (the folder's completion mark)."""
    full = {
        "format_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **record,
        "files": file_hashes(folder),
    }
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(full, indent=2, default=str) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return full


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder may be damaged") from None


def hash_problems(folder: Path, manifest: dict) -> list[str]:
    """Files that are missing or differ from the manifest, one message each."""
    problems = []
    for name, expected in manifest.get("files", {}).items():
        path = Path(folder) / name
        if not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST} but missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (the file is corrupted or was changed)")
    return problems
