"""Data prepared once per machine. With several processes on one machine, the first of them checks
and encodes the data (decoding every image once) and writes the result to a machine-local file; the
others read it instead of repeating the work. The file is plain JSON (nothing in it runs when read)
and lives only while the run starts."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from vlmtune.data.check import DataReport
from vlmtune.data.encode import EncodedSample
from vlmtune.data.records import Message, Problem, Sample


def shared_file(out: Path) -> Path:
    """One name per run and node: the output folder, the launcher's run id and port, and the node's rank
    (`GROUP_RANK`, so that two nodes started on one machine, or sharing a temporary folder, never write
    the same file)."""
    env = os.environ.get
    key = f"{Path(out).resolve()}|{env('TORCHELASTIC_RUN_ID', '')}|{env('MASTER_PORT', '')}|{env('GROUP_RANK', '')}"
    return Path(tempfile.gettempdir()) / f"vlmtune-data-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def write_reports(path: Path, reports: dict[str, DataReport]) -> None:
    staged = path.with_suffix(f".{os.getpid()}.partial")
    staged.write_text(json.dumps({role: asdict(report) for role, report in reports.items()}, default=str))
    staged.replace(path)  # a reader never sees half a file


def read_reports(path: Path) -> dict[str, DataReport]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise RuntimeError(f"{path}: the data the first process on this machine prepared cannot be read ({err}); "
                           "is the temporary folder shared between machines? Set TMPDIR to a machine-local one") from None
    return {role: _report(value) for role, value in raw.items()}


def _sample(raw: dict) -> Sample:
    return Sample(raw["id"], raw["where"], [Message(**m) for m in raw["messages"]], [Path(p) for p in raw["images"]])


def _report(raw: dict) -> DataReport:
    encoded = [EncodedSample(**{**e, "sample": _sample(e["sample"]), "images": [Path(p) for p in e["images"]],
                                "block_spans": [tuple(span) for span in e["block_spans"]]}) for e in raw["encoded"]]
    return DataReport(files=raw["files"], records=raw["records"], samples=[_sample(s) for s in raw["samples"]],
                      encoded=encoded, problems=[Problem(**p) for p in raw["problems"]],
                      downscaled=[Problem(**p) for p in raw["downscaled"]])
