"""The one console vlmtune prints to, and the tables it shows."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console(highlight=False, soft_wrap=True)


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def plan_table(rows) -> Table:
    """Each component: mode, trainable and total parameters, learning rate."""
    table = Table(title="Tuning plan")
    for column in ("component", "mode", "trainable", "total", "lr"):
        table.add_column(column, justify="right" if column in ("trainable", "total", "lr") else "left")
    for row in rows:
        table.add_row(row.name, row.mode, human_count(row.trainable), human_count(row.total),
                      f"{row.lr:.2e}" if row.lr is not None else "-")
    return table
