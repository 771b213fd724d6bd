"""The ranked training patterns of the current spotlight (at most model.TOP rows: never the
whole dual memory, so the table stays instant however many patterns a bundle holds)."""

from __future__ import annotations

from textual.widgets import DataTable

from ...engine.spotlight import Ranked
from ..messages import RowSelected
from ..model import OpenRun


def fmt(x: float) -> str:
    return f"{x:.4g}"


class RankingTable(DataTable):
    """Rank, score, example, label, task, step (or patterns), attention, magnitude, effect."""

    def __init__(self, run: OpenRun, **kw):
        super().__init__(cursor_type="row", zebra_stripes=True, **kw)
        self.run = run
        self.ranked_rows: list[Ranked] = []
        self.group = "pattern"

    def show(self, rows: list[Ranked], group: str) -> None:
        keep_cursor = self.cursor_row if self.ranked_rows and group == self.group else 0
        self.ranked_rows = rows
        self.group = group
        self.clear(columns=True)
        # Who the pattern is comes first: at 80 columns the three raw scores scroll off, the
        # identity of the training example should not.
        middle = "step" if group == "pattern" else "patterns"
        labels = ("rank", "score", "example", "label", "task", middle, "attention", "magnitude", "effect")
        cells = [
            (str(r.rank), fmt(r.score), str(r.example), self.run.class_name(r.label), self.run.task_name(r.task),
             str(r.step) if group == "pattern" else str(r.patterns), fmt(r.attention), fmt(r.magnitude), fmt(r.effect))
            for r in rows
        ]
        # Explicit widths: a frame drawn before the table's own resize would otherwise clip
        # cells to the header's width ("digits 5-9" as "digi").
        for i, label in enumerate(labels):
            self.add_column(label, width=max([len(label)] + [len(c[i]) for c in cells]))
        for c in cells:
            self.add_row(*c)
        if rows:
            self.move_cursor(row=min(keep_cursor, len(rows) - 1))
        self.post_message(RowSelected(self.selected))

    @property
    def selected(self) -> Ranked | None:
        if not self.ranked_rows:
            return None
        return self.ranked_rows[min(max(self.cursor_row, 0), len(self.ranked_rows) - 1)]

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(RowSelected(self.selected))
