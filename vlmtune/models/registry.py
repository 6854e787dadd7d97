"""Model families behind one registry: the first family whose `matches` accepts a config wins.

A family says where its components live in the module tree, how many placeholder tokens an image
takes, how images become model inputs, and how to build a new VLM from a vision encoder and an LLM.
Everything else in vlmtune (tuning plans, data encoding, checkpoints) works through this interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image


@dataclass(frozen=True)
class Family:
    name: str
    # component name -> module paths inside the model (e.g. "model.vision_tower")
    components: dict[str, tuple[str, ...]]
    matches: Callable[[Any], bool]  # (transformers config) -> bool
    model_class: type  # the transformers class that loads a full folder
    image_token_counts: Callable[[Any, list[Path]], list[int]]  # (processor, image paths) -> tokens per image
    image_inputs: Callable[[Any, list[Image.Image]], dict[str, torch.Tensor]]  # (processor, images) -> model kwargs
    build: Callable[..., tuple[torch.nn.Module, Any]] | None = None  # (vision_dir, llm_dir, projector, ...) -> (model, processor)
    # older key namings found in saved weights -> the current module paths (first matching prefix wins)
    key_renames: tuple[tuple[str, str], ...] = ()

    def canonical_key(self, key: str) -> str:
        """A weight name as the current transformers module tree spells it."""
        for old, new in self.key_renames:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def component_of(self, name: str) -> str | None:
        """The component a parameter or module name belongs to (PEFT's wrapper prefix ignored)."""
        name = name.removeprefix("base_model.model.")
        for component, prefixes in self.components.items():
            if any(name == p or name.startswith(p + ".") for p in prefixes):
                return component
        return None


_FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    _FAMILIES.append(family)
    return family


def families() -> list[Family]:
    _load_builtin()
    return list(_FAMILIES)


def family_for(config: Any, where: str = "model") -> Family:
    """The family of a transformers config; the error lists what is supported."""
    for family in families():
        if family.matches(config):
            return family
    supported = ", ".join(f.name for f in _FAMILIES)
    raise ValueError(
        f"{where}: model type {getattr(config, 'model_type', '?')!r} is not supported by vlmtune yet "
        f"(supported families: {supported})"
    )


def family_named(name: str) -> Family:
    for family in families():
        if family.name == name:
            return family
    raise ValueError(f"unknown model family {name!r} (supported: {', '.join(f.name for f in _FAMILIES)})")


def _load_builtin() -> None:
    if not _FAMILIES:
        from vlmtune.models import llava  # noqa: F401  (registers itself)
