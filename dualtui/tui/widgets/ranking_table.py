"""The ranked training patterns of the current spotlight (at most model.TOP rows: never the
whole dual memory, so the table stays instant however many patterns a bundle holds)."""

from __future__ import annotations

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from ...engine.spotlight import Ranked
from ...tables import Col, fit, score_columns
from ...units import num
from ..messages import RowSelected, ColumnsFitted
from ..model import OpenRun
from ..render import plain


# Cells of training text shown per row in text runs (the preview beside shows the whole window).
SNIPPET = 18


def fmt(x: float) -> str:
    return num(x)  # the CLI tables' format (units.num): the same text for the same number


class RankingTable(DataTable):
    """Rank, score, example, label, task, step (or patterns), attention, magnitude, effect.

    Columns that do not fit the table's width are left out whole, the raw score equal to the
    chosen score first (the score column shows it), never cut mid-number; the header above the
    table says which."""

    BINDINGS = [Binding("j", "cursor_down", show=False), Binding("k", "cursor_up", show=False)]

    def __init__(self, run: OpenRun, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.run = run
        self.ranked_rows: list[Ranked] = []
        self.group = "pattern"
        self.by = "attention"
        self.left_out: list[str] = []
        self._fitted_width = 0

    def columns_for(self, rows: list[Ranked], group: str, by: str) -> list[Col]:
        middle = Col("step", [str(r.step) for r in rows], numeric=True, drop=1) if group == "pattern" else \
            Col("patterns", [str(r.patterns) for r in rows], numeric=True, drop=1)
        scores = score_columns(by, {n: [fmt(getattr(r, n) or 0.0) for r in rows]
                                    for n in ("attention", "magnitude", "effect", "cosine")})
        head = [Col("rank", [str(r.rank) for r in rows], numeric=True), Col("score", [fmt(r.score) for r in rows], numeric=True),
                Col("example", [str(r.example) for r in rows], numeric=True)]
        if self.run.is_text:  # where the pattern sits in the training text, not a class
            tasks = len(self.run.tasks) > 1  # one corpus: the task column would repeat its name
            return head + [Col("pos", ["" if r.position is None else str(r.position) for r in rows], numeric=True),
                           Col("training text", [self.run.snippet(r, SNIPPET) for r in rows])] + (
                [Col("task", [self.run.task_name(r.task) for r in rows], drop=1)] if tasks else []) + [middle] + scores
        return head + [Col("label", [self.run.class_name(r.label) for r in rows]),
                       Col("task", [self.run.task_name(r.task) for r in rows], drop=1), middle] + scores

    def show(self, rows: list[Ranked], group: str, by: str | None = None) -> None:
        """Show a ranking. The cursor follows the same training pattern (or example, or
        token) when the new ranking still holds it, else goes back to #1."""
        before = self.selected
        by = by or self.by
        self.ranked_rows, self.group, self.by = rows, group, by
        self.clear(columns=True)
        # Who the pattern is comes first: at 80 columns the raw scores go, the identity of the
        # training example stays. The width is the table's own (the pane sets it), minus the
        # scrollbar.
        width = (self.size.width or self.app.size.width) - 2
        self._fitted_width = self.size.width
        kept, left = fit(self.columns_for(rows, group, by), width)
        self.left_out = [f"{c.header} (= score)" if c.header == by else c.header for c in left]
        # Explicit widths: a frame drawn before the table's own resize would otherwise clip
        # cells to the header's width ("digits 5-9" as "digi").
        for c in kept:
            self.add_column(Text(c.header, justify="right") if c.numeric else c.header, width=c.width)
        for i in range(len(rows)):
            self.add_row(*(Text(str(c.cells[i]), justify="right") if c.numeric else plain(c.cells[i]) for c in kept))
        if rows:
            same = [i for i, r in enumerate(rows) if before is not None and _identity(r, group) == _identity(before, self.group)]
            self.move_cursor(row=same[0] if same else 0)
        self.post_message(RowSelected(self.selected))
        self.post_message(ColumnsFitted())

    def on_resize(self) -> None:
        if self.ranked_rows and self.size.width != self._fitted_width:
            self.show(self.ranked_rows, self.group, self.by)

    @property
    def selected(self) -> Ranked | None:
        if not self.ranked_rows:
            return None
        return self.ranked_rows[min(max(self.cursor_row, 0), len(self.ranked_rows) - 1)]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(RowSelected(self.selected))


def _identity(r: Ranked, group: str) -> tuple:
    """What a row stands for: the same pattern, example or training token in another ranking."""
    if group == "pattern":
        return ("pattern", r.pattern)
    if group == "position":
        return ("position", r.example, r.position)
    return ("example", r.example)
