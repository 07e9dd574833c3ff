"""Tables for people: rich tables on the terminal, markdown for files."""

from __future__ import annotations

from typing import Sequence

from rich.console import Console
from rich.table import Table


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]],
                caption: str | None = None, console: Console | None = None) -> None:
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for i, col in enumerate(header):
        table.add_column(str(col), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(str(c) for c in row))
    (console or Console()).print(table)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f} M"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def fmt_ppl(p: float) -> str:
    return f"{p:.2f}" if p < 1e4 else f"{p:.3g}"
