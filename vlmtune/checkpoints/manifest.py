"""`vlmtune.json`: what a folder holds, what it was trained from, and the size and sha256 of every file.

The manifest is written last, so a folder with a manifest is complete; `verify` re-hashes the files.
It carries a hash of its own canonical content, so a changed manifest is caught too, and it may only
name files inside its folder.
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
QUICK_HASH_LIMIT = 2 << 30  # on load, folders up to this size are hashed in full (about a second per GiB)
SELF_HASH = "manifest_sha256"


class ManifestError(ValueError):
    """A manifest or the files it lists do not hold what it promises; the message names the file."""


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


def same_mode_for_all(folder: Path) -> None:
    """One mode for every file (the umask's default): some writers create 0600 files, others 0644."""
    umask = _umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def self_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spacing), its own hash left out."""
    body = {k: v for k, v in manifest.items() if k != SELF_HASH}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, record: dict) -> dict:
    """Hash every file of `folder`, then write the manifest atomically (the folder's completion mark)."""
    same_mode_for_all(folder)
    hashes = file_hashes(folder)
    full = {
        "format_version": MANIFEST_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        **record,
        "files": hashes,
        "sizes": {name: (folder / name).stat().st_size for name in hashes},
    }
    full = json.loads(json.dumps(full, default=str))  # the self-hash covers what the file will hold
    full[SELF_HASH] = self_hash(full)
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(full, indent=2) + "\n")
    tmp.chmod(0o666 & ~_umask())
    os.replace(tmp, folder / MANIFEST)
    return full


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def read_manifest(folder: Path) -> dict | None:
    """The manifest of `folder` (None when there is none); a damaged or edited one is refused."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path} is not valid JSON ({err}); the folder may be damaged") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} does not hold a JSON object; the folder may be damaged")
    if SELF_HASH in manifest and manifest[SELF_HASH] != self_hash(manifest):
        raise ManifestError(f"{path} was changed after it was written (its own sha256 differs); the folder may be damaged")
    return manifest


def listed_path(folder: Path, name: str) -> Path:
    """The file a manifest entry names, refused unless it lies inside `folder` (no `..`, no absolute
    path, no symlink leading out)."""
    folder = Path(folder)
    rel = Path(name)
    inside = folder.resolve()
    path = folder / rel
    if rel.is_absolute() or ".." in rel.parts or not path.resolve().is_relative_to(inside):
        raise ManifestError(f"{folder / MANIFEST} names {name!r}, which is outside {folder}; the manifest was tampered with")
    return path


def hash_problems(folder: Path, manifest: dict, hashes: bool = True) -> list[str]:
    """Files that are missing or differ from the manifest (size always, sha256 when `hashes`), one
    message each."""
    problems = []
    sizes = manifest.get("sizes", {})
    for name, expected in manifest.get("files", {}).items():
        try:
            path = listed_path(folder, name)
        except ManifestError as err:
            problems.append(str(err))
            continue
        if not path.is_file():
            problems.append(f"{path}: listed in {MANIFEST} but missing")
        elif name in sizes and path.stat().st_size != sizes[name]:
            problems.append(f"{path}: {path.stat().st_size} bytes, but {MANIFEST} says {sizes[name]} "
                            "(the file is truncated or was changed)")
        elif hashes and sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from {MANIFEST} (the file is corrupted or was changed)")
    return problems


_load_checks = {"enabled": True}


def set_load_checks(enabled: bool) -> None:
    """`--no-verify`: commands load folders without `check_on_load` (set once by the CLI)."""
    _load_checks["enabled"] = enabled


def check_on_load(folder: Path) -> None:
    """The cheap check every command runs before it loads a vlmtune folder: the manifest is intact,
    every listed file has its size, and — for folders up to QUICK_HASH_LIMIT — its sha256.
    Raises ManifestError naming the first damaged file."""
    if not _load_checks["enabled"]:
        return
    manifest = read_manifest(folder)
    if manifest is None:
        return
    total = sum(manifest.get("sizes", {}).values()) or sum(
        (Path(folder) / name).stat().st_size for name in manifest.get("files", {}) if (Path(folder) / name).is_file())
    problems = hash_problems(folder, manifest, hashes=total <= QUICK_HASH_LIMIT)
    if problems:
        raise ManifestError(f"{problems[0]}; restore the file, or pass --no-verify to load {folder} anyway")
