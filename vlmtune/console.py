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


def gib(value: float) -> str:
    return f"{value / 1024 ** 3:.2f}"


def memory_table(estimate, nproc: int) -> Table:
    """`vlmtune plan`: GiB per device, by component and kind, then the run-wide extras."""
    table = Table(title=f"Peak memory per device (GiB), {nproc} process(es)")
    for column in ("component", "mode", "params", "trainable", "weights", "grads", "optimizer", "activations", "total"):
        table.add_column(column, justify="left" if column in ("component", "mode") else "right")
    for row in estimate.rows:
        table.add_row(row.component, row.mode, human_count(row.params), human_count(row.trainable), gib(row.weights),
                      gib(row.grads), gib(row.optimizer), gib(row.activations), gib(row.total))
    for name, value in estimate.extra.items():
        table.add_row(name, "", "", "", "", "", "", "", gib(value))
    table.add_row("[bold]total[/]", "", "", "", "", "", "", "", f"[bold]{gib(estimate.total)}[/]")
    return table
