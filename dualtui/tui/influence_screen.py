"""The reverse spotlight (Enter on a ranked row): the items of the query set that the row's
training example contributes to most and least at the current layer, by the current score
(engine/influence.py, the same numbers as `dualtui influence`). Enter on an item spotlights it."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Static

from ..units import num
from .messages import TestChosen
from .model import OpenRun
from .render import plain

TOP = 20


class InfluenceScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q", "dismiss", "Close", id="influence.close"),
                Binding("s", "app.svg", "SVG", show=False, id="influence.svg")]
    DEFAULT_CSS = """
    InfluenceScreen { align: center middle; }
    InfluenceScreen > Vertical { width: 96%; height: 90%; border: round $accent; background: $panel; padding: 0 1; }
    InfluenceScreen Horizontal { height: 1fr; }
    InfluenceScreen DataTable { width: 1fr; height: 1fr; }
    """

    def __init__(self, run: OpenRun, example: int, layer: str, by: str):
        super().__init__()
        self.run, self.example, self.layer_name, self.by = run, example, layer, by
        self.result = None  # engine.influence.Influence, when computed

    def compose(self) -> ComposeResult:
        box = Vertical()
        box.border_title = f"reverse spotlight · training example {self.example} · {self.layer_name} · by {self.by}"
        box.border_subtitle = "enter: spotlight the item · escape: back"
        with box:
            yield Static("computing…", id="influence-head")
            with Horizontal():
                yield DataTable(id="influence-most", cursor_type="row", zebra_stripes=True)
                yield DataTable(id="influence-least", cursor_type="row", zebra_stripes=True)

    def on_mount(self) -> None:
        for t in self.query(DataTable):
            t.loading = True
        self._compute()

    @work(thread=True, exclusive=True, group="influence", exit_on_error=False)
    def _compute(self) -> None:
        from ..engine.influence import influence

        try:
            result = influence(self.run.bundle, self.layer_name, self.example, self.run.queries_name)
        except Exception as e:  # shown, never a crash
            self.app.call_from_thread(self.query_one("#influence-head", Static).update, Text(f"failed: {e}", style="red"))
            return
        self.app.call_from_thread(self._show, result)

    def _show(self, result) -> None:
        self.result = result
        head = Text(f"{len(result.patterns)} patterns of example {self.example} at {self.layer_name}: "
                    f"each item's {self.by} summed over them (= the example's score in its per-example ranking)")
        self.query_one("#influence-head", Static).update(head)
        for end, reverse in (("most", False), ("least", True)):
            table = self.query_one(f"#influence-{end}", DataTable)
            table.loading = False
            table.clear(columns=True)
            table.add_column(f"{'highest' if not reverse else 'lowest'} {self.by}")
            table.add_columns("item", "label", "predicted", "task")
            for m in result.ranked(self.by, reverse, TOP):
                it = self.run.test_item(m)
                table.add_row(Text(num(result.scores[self.by][m]), justify="right"), Text(str(m), justify="right"),
                              plain(self.run.class_name(it.label)), plain(self.run.class_name(it.prediction)),
                              plain(self.run.task_name(it.task)), key=str(m))
        self.query_one("#influence-most", DataTable).focus()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        if event.row_key.value is not None:
            m = int(event.row_key.value)
            self.dismiss()
            self.app.post_message(TestChosen(m))
