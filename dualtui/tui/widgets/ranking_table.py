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
    """Rank, score, attention, magnitude, effect, step, example, label, task."""

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
        if group == "pattern":
            self.add_columns("rank", "score", "attention", "magnitude", "effect", "step", "example", "label", "task")
        else:
            self.add_columns("rank", "score", "attention", "magnitude", "effect", "patterns", "example", "label", "task")
        for r in rows:
            middle = str(r.step) if group == "pattern" else str(r.patterns)
            self.add_row(str(r.rank), fmt(r.score), fmt(r.attention), fmt(r.magnitude), fmt(r.effect), middle,
                         str(r.example), self.run.class_name(r.label), self.run.task_name(r.task))
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
