"""Attention mass per task and per class at each layer, and over training time with the
task boundaries marked (in continual learning: which phase a prediction draws on)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from rich.console import Group, RenderableType
from rich.text import Text

from .base import RenderedPane

if TYPE_CHECKING:
    from ..app import DualtuiApp


TOP_TOKENS = 15


class TasksPane(RenderedPane):
    def build(self, app: "DualtuiApp") -> RenderableType:
        from ..render import bar_table, column_chart

        width = self.bar_width
        parts = [Text(f"test {app.test}: share of Σ|α| by task, by training class, and over training steps", style="bold")]
        spot = app.results.get(app.layer)
        if spot is not None and spot.masses is not None:
            ms = spot.masses
            steps = int(ms.step_edges[-1])
            markers = [(start / max(steps, 1), name) for start, name in self.run.task_boundaries()]
            parts.append(Text(f"\nlayer {app.layer}: Σ|α| over training steps 0..{steps}"
                              + ("  (┃ = start of a task's phase)" if markers else ""), style="bold cyan"))
            parts.append(column_chart(np.asarray(ms.step_abs_sum), width, 6, markers=markers))
        one_task = len(self.run.tasks) <= 1
        if one_task:  # a bar of 100% per layer says nothing
            parts.append(Text(f"\none task ({self.run.task_name(0)}): every pattern's mass is in it", style="dim"))
        for L in ([] if one_task else self.run.layers):
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
            shares = [(self.run.class_name(i), v / total) for i, v in enumerate(ms.class_abs_sum)]
            title = f"\n{app.layer}: by training class"
            if self.run.labels_are_tokens:  # a vocabulary is long: the tokens with the most mass
                shares = sorted(shares, key=lambda kv: -kv[1])[:TOP_TOKENS]
                title = f"\n{app.layer}: by the next token each pattern was trained to predict (top {TOP_TOKENS})"
            parts.append(Text(title, style="bold cyan"))
            parts.append(bar_table(shares, width, style="green"))
        return Group(*parts)
