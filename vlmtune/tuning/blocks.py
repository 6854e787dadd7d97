"""`tune.blocks`: part of a component, as module paths inside it with slices over layer lists, so
MGM's "last half of the ViT" (`encoder.layers[1/2:]`) and "last block of each ConvNeXt
stage" (`encoder.stages[:].layers[-1]`) are written once for any depth."""

from __future__ import annotations

import re
from fractions import Fraction

from torch import nn

_INDEXED = re.compile(r"^(\w+)\[([^\]]+)\]$")


class BlockError(ValueError):
    """A `tune.blocks` entry that names no module; the message lists what is there."""


def _bound(text: str, length: int) -> int | None:
    text = text.strip()
    if not text:
        return None
    return int(Fraction(text) * length) if "/" in text else int(text)


def select(selector: str, length: int) -> list[int]:
    """Indices of `length` items that `1/2:`, `-1`, `:`, `2:4` select."""
    if ":" in selector:
        start, stop = selector.split(":", 1)
        return list(range(length))[slice(_bound(start, length), _bound(stop, length))]
    index = int(selector)
    if not -length <= index < length:
        raise BlockError(f"index {index} is outside a list of {length}")
    return [index % length]


def expand(modules: dict[str, nn.Module], base: str, spec: str) -> list[str]:
    """Full module paths `spec` names under `base` (empty when it names nothing there)."""
    paths = [base]
    for token in spec.split("."):
        indexed = _INDEXED.match(token)
        name = indexed.group(1) if indexed else token
        found = []
        for path in paths:
            child = f"{path}.{name}"
            if child not in modules:
                continue
            if not indexed:
                found.append(child)
            elif isinstance(modules[child], (nn.ModuleList, nn.Sequential)):
                found += [f"{child}.{i}" for i in select(indexed.group(2), len(modules[child]))]
        paths = found
    return paths


def block_paths(model: nn.Module, prefixes: tuple[str, ...], specs: list[str], where: str) -> list[str]:
    """Every spec expanded under the component's prefixes; a spec that names nothing is an error."""
    modules = dict(model.named_modules())
    out = []
    for spec in specs:
        found = [p for prefix in prefixes for p in expand(modules, prefix, spec)]
        if not found:
            children = sorted({n[len(prefix) + 1:].split(".")[0] for prefix in prefixes for n in modules
                               if n.startswith(prefix + ".")})
            raise BlockError(f"`{where}`: {spec!r} names no module inside {', '.join(prefixes)} "
                             f"(its top-level modules: {', '.join(children)})")
        out += found
    return out
