"""Attention mass per task and per class at each layer, and over training time with the
task boundaries marked (in continual learning: which phase a prediction draws on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Group
from rich.text import Text
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..model import OpenRun

if TYPE_CHECKING:
    from ..app import DualtuiApp


class TasksPane(VerticalScroll):
    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self._shown_for: "DualtuiApp | None" = None

    def compose(self):
        yield Static(id="tasks-body")

    def on_resize(self) -> None:
        if self._shown_for is not None:
            self.update_view(self._shown_for)  # bars are sized to the pane's width

    def update_view(self, app: "DualtuiApp") -> None:
        self._shown_for = app
        from ..render import bar_table, column_chart

        width = max(40, (self.size.width or 80) - 4)
        parts = [Text(f"test {app.test}: share of Σ|α| by task, by training class, and over training steps", style="bold")]
        spot = app.results.get(app.layer)
        if spot is not None and spot.masses is not None:
            ms = spot.masses
            steps = int(ms.step_edges[-1])
            markers = [(start / max(steps, 1), name) for start, name in self.run.task_boundaries()]
            parts.append(Text(f"\nlayer {app.layer}: Σ|α| over training steps 0..{steps}"
                              + ("  (┃ = start of a task's phase)" if markers else ""), style="bold cyan"))
            parts.append(column_chart(np.asarray(ms.step_abs_sum), width, 6, markers=markers))
        for L in self.run.layers:
            spot = app.results.get(L)
            parts.append(Text(f"\n{L}: by task", style="bold cyan"))
            if spot is None:
                parts.append(Text("computing…", style="yellow"))
                continue
            ms = spot.masses
            total = max(ms.abs_total, 1e-300)
            parts.append(bar_table([(self.run.task_name(i), v / total) for i, v in enumerate(ms.task_abs_sum)], width))
        spot = app.results.get(app.layer)
        if spot is not None:
            ms = spot.masses
            total = max(ms.abs_total, 1e-300)
            parts.append(Text(f"\n{app.layer}: by training class", style="bold cyan"))
            parts.append(bar_table([(self.run.class_name(i), v / total) for i, v in enumerate(ms.class_abs_sum)], width,
                                   style="green"))
        self.query_one("#tasks-body", Static).update(Group(*parts))
