"""Model families and the checkpoint layouts they read, behind one registry: first match wins, and
the error lists what is supported. A new family is one package under `vlmtune/models/` and one
line in `_BUILTIN`."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from vlmtune.models.family import Family, FamilyError, Layout

_BUILTIN = (  # import order is match order: specific families before generic ones
    "vlmtune.models.mgm",  # first: its layouts read original Mini-Gemini folders that llava's refuse
    "vlmtune.models.llava",
    "vlmtune.models.llava_next",
    "vlmtune.models.qwen_vl",
    "vlmtune.models.idefics3",
    "vlmtune.models.gemma3",
    "vlmtune.models.minicpmv4_6",
    "vlmtune.models.minicpmv",
)
DEFAULT_BUILDER = "llava"  # `model.vision` + `model.llm` without `model.family`
_FAMILIES: list[Family] = []


_RANK: dict[str, int] = {}  # family name -> position of its package in _BUILTIN


def register(family: Family) -> Family:
    """Add a family; its place in the match order is its package's place in `_BUILTIN`, whatever
    order the packages happen to be imported in."""
    module = sys._getframe(1).f_globals.get("__name__", "")
    if all(f.name != family.name for f in _FAMILIES):
        _FAMILIES.append(family)
        _RANK[family.name] = next((i for i, m in enumerate(_BUILTIN) if module == m or module.startswith(m + ".")),
                                  len(_BUILTIN))
    return family


def families() -> list[Family]:
    """Every family, in `_BUILTIN` order (imports are cached, so this is cheap after the first call)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    return sorted(_FAMILIES, key=lambda f: _RANK[f.name])


def supported() -> str:
    return ", ".join(f.name for f in families())


def family_for(config: Any, where: str = "model") -> Family:
    """The family of a transformers config; the error lists what is supported."""
    for family in families():
        if family.matches(config):
            return family
    raise FamilyError(
        f"{where}: model type {getattr(config, 'model_type', '?')!r} is not a family vlmtune knows "
        f"(supported: {supported()}); for another architecture name its components by module path in "
        "`model.components` (e.g. {vision: [model.vision_tower], projector: [model.multi_modal_projector], "
        "llm: [model.language_model, lm_head]})"
    )


def family_named(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise FamilyError(f"unknown model family {name!r} (supported: {supported()})")


def builder(name: str | None = None) -> Family:
    """The family that builds a new VLM from a vision encoder and an LLM (`model.family`, default llava)."""
    able = [f for f in families() if f.build is not None]
    name = name or DEFAULT_BUILDER
    for family in able:
        if family.name == name:
            return family
    raise FamilyError(f"`model.family`: {name!r} cannot be built from parts (families that can: "
                     f"{', '.join(f.name for f in able)})")


def layouts() -> list[tuple[Family, Layout]]:
    return [(family, layout) for family in families() for layout in family.layouts]


def layout_for(path: Path) -> tuple[Family, Layout] | None:
    """The first foreign layout that recognises `path`, or None (then it is a vlmtune / transformers folder)."""
    for family, layout in layouts():
        if layout.detect(path):
            return family, layout
    return None


def layout_names() -> str:
    return "; ".join(f"{layout.name} ({family.name})" for family, layout in layouts())
