"""Check the files and folders a run config names, all at once, before anything heavy loads.

A mistyped data file is a config error naming its key, not "1 bad sample"; a model folder that is not
there is said so, instead of transformers reading it as a malformed hub repo id.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from vlmtune.config.load import ConfigError
from vlmtune.config.schema import RunConfig


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. a name longer than the file system allows
        return False


def _missing(key: str, path: Path, what: str) -> str:
    near = []
    if _exists(path.parent) and path.parent.is_dir():
        near = difflib.get_close_matches(path.name, [p.name for p in path.parent.iterdir()], n=1, cutoff=0.6)
    hint = f"; did you mean {path.parent / near[0]}?" if near else ""
    return f"`{key}`: {path} does not exist ({what}){hint}"


def _is_empty(path: Path) -> bool:
    with open(path, "rb") as fh:
        return not fh.read(4096).strip() and not fh.read(1)


def path_problems(cfg: RunConfig) -> list[str]:
    """Every named file or folder that is missing or of the wrong kind, one line each."""
    problems = []
    for key in ("train", "eval"):
        for name in getattr(cfg.data, key):
            path = Path(name)
            if not _exists(path):
                problems.append(_missing(f"data.{key}", path, "a JSON or JSON Lines data file"))
            elif not path.is_file():
                problems.append(f"`data.{key}`: {path} is a folder; give the data file(s) in it")
            elif _is_empty(path):
                problems.append(f"`data.{key}`: {path} is empty")
    if cfg.data.images_root and not Path(cfg.data.images_root).is_dir():
        problems.append(f"`data.images_root`: {cfg.data.images_root} is not a folder")
    m = cfg.model
    for key, value, what in (("path", m.path, "a model folder"), ("vision", m.vision, "a vision encoder folder"),
                             ("llm", m.llm, "a language model folder"),
                             ("projector_weights", m.projector_weights, "a projector weight file or folder"),
                             ("weights", m.weights, "a state-dict file")):
        if value and not _exists(Path(value)):
            problems.append(_missing(f"model.{key}", Path(value), what + "; vlmtune reads local folders, so download "
                                     "hub models first, e.g. `hf download REPO --local-dir DIR`"))
    out = Path(cfg.output.dir)
    if _exists(out) and not out.is_dir():
        problems.append(f"`output.dir`: {out} is a file, not a folder; choose another path")
    return problems


def check_paths(cfg: RunConfig) -> None:
    problems = path_problems(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the files the config names:\n"
                          + "\n".join(f"  - {p}" for p in problems))
