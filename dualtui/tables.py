"""Tables for people, shared by the CLI and the app: numbers right-aligned and never cut; a
column that does not fit is left out whole (by the caller's priority) and said so, instead of
being squeezed until "-8.497e-05" reads "-8.497"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rich.cells import cell_len

GAP = 2  # between columns (Rich's default padding with box=None, pad_edge=False)


@dataclass
class Col:
    header: str
    cells: list[Any] = field(default_factory=list)  # str or rich Text
    numeric: bool = False
    drop: int = 0  # 0: always kept; larger numbers are left out first when the width is short

    @property
    def width(self) -> int:
        return max([cell_len(self.header)] + [cell_len(str(c)) for c in self.cells])


# Raw score columns at a narrow width: the one equal to the chosen score (the "score" column
# shows it) is left out first, then magnitude and cosine, then attention and effect.
_SCORE_DROP = {"cosine": 3, "magnitude": 3, "attention": 2, "effect": 2}


def score_columns(by: str, values: dict[str, list[str]]) -> list[Col]:
    """Columns for the raw scores (`values`: score -> its formatted cells), with their drop order."""
    return [Col(n, cells, numeric=True, drop=4 if n == by else _SCORE_DROP[n]) for n, cells in values.items()]


def fit(columns: list[Col], width: int | None) -> tuple[list[Col], list[Col]]:
    """The columns that fit in `width` (None: all), and those left out, by their `drop` order."""
    kept = list(columns)
    left: list[Col] = []
    if width is None:
        return kept, left
    while sum(c.width for c in kept) + GAP * (len(kept) - 1) > width:
        candidates = [c for c in kept if c.drop > 0]
        if not candidates:
            break  # what is left is wrapped by the table, never cut (numbers do not wrap)
        worst = max(candidates, key=lambda c: c.drop)
        kept.remove(worst)
        left.append(worst)
    return kept, left


def rich_table(columns: list[Col], width: int | None, **kw: Any) -> tuple[Any, list[str]]:
    """A Rich table of the columns that fit, and the headers of those left out."""
    from rich.table import Table

    kept, left = fit(columns, width)
    t = Table(box=None, pad_edge=False, **kw)
    for c in kept:
        if c.numeric:
            t.add_column(c.header, justify="right", no_wrap=True, min_width=c.width)
        else:
            t.add_column(c.header)
    for i in range(len(columns[0].cells) if columns else 0):
        t.add_row(*(c.cells[i] for c in kept))
    return t, [c.header for c in left]


def left_out_note(headers: list[str]) -> str:
    return f"(not shown at this width: {', '.join(headers)}; widen the terminal, or --json/--csv for every column)"
