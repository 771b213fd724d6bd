"""Attention mass per task and per class at each layer, and over training time with the
task boundaries marked (in continual learning: which phase a prediction draws on)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from ...units import num
from ..state import ViewState
from ..widgets.mass_plot import MassOverTime
from .base import RenderedPane


TOP_TOKENS = 15


class TasksPane(RenderedPane):
    def compose(self) -> ComposeResult:
        yield Static(id="tasks-head")
        yield MassOverTime(id="tasks-time")
        yield Static(classes="pane-body")

    def update_view(self, state: ViewState) -> None:
        head = Text(f"test {state.test}: share of Σ|α| by task, by training class, and over training steps", style="bold")
        spot = state.spot
        plots = self.query_one(MassOverTime)
        plots.display = spot is not None and spot.masses is not None
        if plots.display:
            last = int(spot.masses.step_edges[-1]) - 1  # the edges end one past the last step
            head.append(f"\n{state.layer}: ", style="bold cyan")
            head.append("Σ|α|", style="bold cyan")
            head.append(" and ", style="bold")
            head.append("Σ effect", style="bold magenta")
            head.append(f" per step bin over training steps 0..{last}", style="bold")
            phases = self.run.task_boundaries()
            if phases:
                head.append("\n" + " · ".join(f"{task} from step {start}" for start, task in phases), style="yellow")
                head.append(" (yellow lines)", style="dim")
            plots.show(spot.masses, self.run.task_boundaries())
            if spot.masses.unattributed_effect is not None:  # approximate: what no step holds, beside the plot
                head.append(f"\nnot attributed to any pattern (approximate dual form): effect {num(spot.masses.unattributed_effect)} "
                            "on the target logit, in no step bin", style="yellow")
        self.query_one("#tasks-head", Static).update(head)
        super().update_view(state)

    def build(self, state: ViewState) -> RenderableType:
        from ..render import bar_table

        width = self.bar_width
        parts = []
        one_task = len(self.run.tasks) <= 1
        if one_task:  # a bar of 100% per layer says nothing
            parts.append(Text(f"\none task ({self.run.task_name(0)}): every pattern's mass is in it", style="dim"))
        for L in ([] if one_task else self.run.layers):
            spot = state.results.get(L)
            parts.append(Text(f"\n{L}: by task", style="bold cyan"))
            if spot is None:
                parts.append(Text("computing…", style="yellow"))
                continue
            ms = spot.masses
            total = max(ms.abs_total, 1e-300)
            parts.append(bar_table([(self.run.task_name(i), v / total) for i, v in enumerate(ms.task_abs_sum)], width))
        spot = state.results.get(state.layer)
        if spot is not None:
            ms = spot.masses
            total = max(ms.abs_total, 1e-300)
            shares = [(self.run.class_name(i), v / total) for i, v in enumerate(ms.class_abs_sum)]
            title = f"\n{state.layer}: by training class"
            if self.run.labels_are_tokens:  # a vocabulary is long: the tokens with the most mass
                shares = sorted(shares, key=lambda kv: -kv[1])[:TOP_TOKENS]
                title = f"\n{state.layer}: by the next token each pattern was trained to predict (top {TOP_TOKENS})"
            parts.append(Text(title, style="bold cyan"))
            parts.append(bar_table(shares, width, style="green"))
        return Group(*parts)
