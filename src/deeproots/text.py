"""Plain-text tables, the one way deeproots prints rows for a person to read (torch-free)."""
from __future__ import annotations

from typing import Sequence

__all__ = ["format_table"]


def format_table(head: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """Plain-text table; ``align`` has one 'l' or 'r' per column."""
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    align = align or "l" * len(head)

    def fmt(row):
        cells = [str(x).ljust(wd) if a == "l" else str(x).rjust(wd)
                 for x, wd, a in zip(row, widths, align)]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), "  ".join("-" * wd for wd in widths)] + [fmt(r) for r in rows])
