"""Test items: label, prediction, correct/wrong, task; filters, jump by index, preview."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Input, Select, Static

from ..messages import TestChosen
from ...units import num
from ..model import OpenRun
from ..render import plain
from ..widgets.preview import Preview

# Rows put in the table at once: a DataTable gets slow with tens of thousands of rows; the
# filters and the jump box reach the rest.
PAGE = 1000


class VimTable(DataTable):
    """A DataTable that also moves with j / k."""

    BINDINGS = [Binding("j", "cursor_down", show=False), Binding("k", "cursor_up", show=False)]


class TestsPane(Horizontal):
    def __init__(self, run: OpenRun, spotlit: int | None = None, **kw):
        super().__init__(**kw)
        self.run = run
        self.shown: list[int] = []
        self.spotlit = spotlit  # the item the app spotlights (the cursor goes back to it)

    def compose(self) -> ComposeResult:
        classes = [(self.run.class_name(i), i) for i in range(len(self.run.classes))]
        with Vertical(id="tests-left"):
            with Horizontal(id="tests-filters"):
                if len(self.run.tasks) > 1:
                    yield Select([(name, i) for i, name in enumerate(self.run.tasks)], prompt="tasks", id="filter-task")
                yield Select([("correct", True), ("wrong", False)], prompt="✓ ✗", id="filter-correct")
                yield Select(classes, prompt="label", id="filter-label")
                yield Select(classes, prompt="pred.", id="filter-prediction")
            with Horizontal(id="tests-filters-2"):
                yield Select([(OpenRun.SORTS[s], s) for s in self.run.sorts()], value="index", allow_blank=False, id="sort")
                yield Input(placeholder="jump to #", id="jump", type="integer")
            yield Static(id="tests-count")
            yield VimTable(id="tests-table", cursor_type="row", zebra_stripes=True)
        with Vertical(id="tests-right"):
            yield Preview(self.run, id="tests-preview")

    def on_mount(self) -> None:
        self.fill()

    def _choice(self, name: str) -> int | bool | None:
        """A filter's value; an empty Select holds a sentinel, not None: anything that is not a
        choice means "all"."""
        found = self.query(f"#{name}")
        value = found.first(Select).value if found else None
        return value if isinstance(value, (int, bool)) else None

    def fill(self) -> None:
        task, correct = self._choice("filter-task"), self._choice("filter-correct")
        sort = self.query_one("#sort", Select).value
        idx = self.run.test_items(task if not isinstance(task, bool) else None, correct if isinstance(correct, bool) else None,
                                  self._choice("filter-label"), self._choice("filter-prediction"),
                                  sort if isinstance(sort, str) else "index")
        table = self.query_one("#tests-table", DataTable)
        table.clear(columns=True)
        # One corpus or task: its column would repeat one name; the text context gets the room.
        tasks, prob, loss = len(self.run.tasks) > 1, self.run.test_probability, self.run.test_loss
        table.add_columns("#", "label", "predicted", "", *(["task"] if tasks else []),
                          *(["conf"] if prob is not None else []), *(["loss"] if loss is not None else []),
                          *(["context"] if self.run.is_text else []))
        self.shown = [int(i) for i in idx[:PAGE]]
        width = max(16, (table.size.width or 60) - 34 - (12 if tasks else 0))
        for i in self.shown:
            it = self.run.test_item(i)
            mark = Text("✓", style="green") if it.correct else Text("✗", style="bold red")
            cells = [Text(str(i), justify="right"), plain(self.run.class_name(it.label)), plain(self.run.class_name(it.prediction)), mark]
            cells += [plain(self.run.task_name(it.task))] if tasks else []
            cells += [Text(f"{float(prob[i]):.1%}", justify="right")] if prob is not None else []
            cells += [Text(num(float(loss[i])), justify="right")] if loss is not None else []
            cells += [plain(self.run.test_snippet(i, width))] if self.run.is_text else []
            table.add_row(*cells, key=str(i))
        more = f" (first {PAGE}; jump to reach the rest)" if len(idx) > PAGE else ""
        wrong = int(sum(not self.run.test_item(i).correct for i in idx))
        what = "test items" if self.run.queries_name == "test" else f"items of {self.run.queries_name!r}"
        switch = " · Q: next query set" if len(self.run.query_set_names) > 1 else ""
        self.query_one("#tests-count", Static).update(f"{len(idx):,} {what}, {wrong:,} wrong{more} · Enter: spotlight{switch}")
        if self.spotlit is not None:
            self.highlight(self.spotlit)

    def on_select_changed(self, event: Select.Changed) -> None:
        self.fill()

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id != "tests-table" or event.row_key is None or event.row_key.value is None:
            return
        self.preview(int(event.row_key.value))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "tests-table" and event.row_key.value is not None:
            event.stop()
            self.post_message(TestChosen(int(event.row_key.value)))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        try:
            m = int(event.value)
        except ValueError:
            m = -1
        if not 0 <= m < self.run.test_size:
            self.app.notify(f"no test item {event.value!r}: valid 0..{self.run.test_size - 1}", severity="error")
            return
        event.input.value = ""
        self.post_message(TestChosen(m))

    def on_key(self, event) -> None:
        # Escape always leaves the jump box (the app's keys would otherwise be typed into it).
        if event.key == "escape" and self.app.focused is self.query_one("#jump", Input):
            event.stop()
            self.query_one("#jump", Input).value = ""
            self.query_one("#tests-table", DataTable).focus()

    def highlighted(self) -> int | None:
        """The item under the table's cursor (None: an empty list)."""
        table = self.query_one("#tests-table", DataTable)
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return int(key) if key is not None else None

    def highlight(self, m: int) -> None:
        """Put the table's cursor on item m when the list shows it (it is the item spotlit)."""
        self.spotlit = m
        table = self.query_one("#tests-table", DataTable)
        try:
            row = table.get_row_index(str(m))
        except Exception:  # noqa: BLE001 - not in the list (filtered out, or past the first page)
            return
        table.move_cursor(row=row)

    def preview(self, m: int) -> None:
        it = self.run.test_item(m)
        cap = Text(f"test {m}  label {self.run.class_name(it.label)}  predicted {self.run.class_name(it.prediction)}",
                   style="bold" if it.correct else "bold red")
        data, marks = self.run.test_preview(m)
        self.query_one("#tests-preview", Preview).show(data, cap, **marks)
