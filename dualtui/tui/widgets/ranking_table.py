"""The ranked training patterns of the current spotlight (at most model.TOP rows: never the
whole dual memory, so the table stays instant however many patterns a bundle holds)."""

from __future__ import annotations

from rich.cells import cell_len
from textual.widgets import DataTable

from ...engine.spotlight import Ranked
from ..messages import RowSelected
from ..model import OpenRun
from ..render import plain


# Cells of training text shown per row in text runs (the preview beside shows the whole window).
SNIPPET = 18


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
        if self.run.is_text:  # text runs: where the pattern sits in the training text, not a class
            tasks = len(self.run.tasks) > 1  # one corpus: the task column would repeat its name
            labels = ("rank", "score", "example", "pos", "training text") + (("task",) if tasks else ()) + (
                middle, "attention", "magnitude", "effect")
            cells = [
                (str(r.rank), fmt(r.score), str(r.example), "" if r.position is None else str(r.position),
                 self.run.snippet(r, SNIPPET)) + ((self.run.task_name(r.task),) if tasks else ()) + (
                 str(r.step) if group == "pattern" else str(r.patterns), fmt(r.attention), fmt(r.magnitude), fmt(r.effect))
                for r in rows
            ]
        else:
            labels = ("rank", "score", "example", "label", "task", middle, "attention", "magnitude", "effect")
            cells = [
                (str(r.rank), fmt(r.score), str(r.example), self.run.class_name(r.label), self.run.task_name(r.task),
                 str(r.step) if group == "pattern" else str(r.patterns), fmt(r.attention), fmt(r.magnitude), fmt(r.effect))
                for r in rows
            ]
        # Explicit widths: a frame drawn before the table's own resize would otherwise clip
        # cells to the header's width ("digits 5-9" as "digi").
        for i, label in enumerate(labels):
            self.add_column(label, width=max([len(label)] + [cell_len(str(c[i])) for c in cells]))
        for c in cells:
            self.add_row(*map(plain, c))
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
