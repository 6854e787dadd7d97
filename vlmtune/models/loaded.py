"""What every loader returns: the model, its processor and family, and where each component's weights
came from. Families' own loaders build it, so it lives below them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from vlmtune.models.family import Family


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any
    family: Family
    path: Path
    kind: str  # "full" | "lora" | "delta" | "built" (from parts) | "converted" (from a foreign layout)
    base: Path | None = None  # the base model folder an adapter or delta needs
    sources: dict[str, str] = field(default_factory=dict)  # component -> where its weights came from
    notes: list[str] = field(default_factory=list)  # unexpected or missing weights, in words

    def report(self) -> list[str]:
        """The load report: each component and its source, then anything surprising."""
        if self.kind in ("built", "converted"):
            lines = [f"{self.kind} a {self.family.name} model from {self.path}"]
        else:
            lines = [f"loaded {self.path} ({self.kind}{', base ' + str(self.base) if self.base else ''})"]
        lines += [f"  {component:<10} {source}" for component, source in self.sources.items()]
        lines += [f"  note: {note}" for note in self.notes]
        return lines
