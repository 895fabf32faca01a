"""Fixed-width text tables for the commands' results."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def table(rows: Sequence[Mapping[str, Any]], cols: Sequence[tuple[str, str, str]]) -> str:
    """``cols`` are (key, header, format spec); a missing or None cell prints as ``-``. The first
    column is left-aligned, the others right-aligned."""
    cells = [[h for _, h, _ in cols]] + [
        [("-" if r.get(k) is None else format(r[k], f)) for k, _, f in cols] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]

    def line(row: list[str]) -> str:
        pairs = enumerate(zip(row, widths, strict=True))
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in pairs)

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])
