"""Attention mass over training steps: Σ|α| and Σ effect per step bin, as two plots on one
step axis (their scales differ by orders of magnitude), with the task phases marked."""

from __future__ import annotations

import numpy as np
from textual.app import ComposeResult
from textual.containers import Vertical
from textual_plot import HiResMode, PlotWidget

from ...engine.spotlight import Masses
from .axes import ShortNumbers


def staircase(edges: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A bin's value drawn flat over its steps [edges[b], edges[b+1]): the plot shows bins as
    the sums they are, not as points joined by slopes."""
    x = np.repeat(np.asarray(edges, dtype=np.float64), 2)[1:-1]
    y = np.repeat(np.asarray(values, dtype=np.float64), 2)
    return x, y


class MassOverTime(Vertical):
    DEFAULT_CSS = """
    MassOverTime { height: auto; }
    MassOverTime PlotWidget { height: 13; }
    """

    def compose(self) -> ComposeResult:
        yield PlotWidget(id="mass-abs", allow_pan_and_zoom=False)
        yield PlotWidget(id="mass-effect", allow_pan_and_zoom=False)

    def show(self, masses: Masses, phases: list[tuple[int, str]]) -> None:
        """Plot one spotlight's step bins; `phases`: (first step, task name) of each phase."""
        edges = np.asarray(masses.step_edges)
        for pid, values, style, name in (("#mass-abs", masses.step_abs_sum, "cyan", "Σ|α|"),
                                         ("#mass-effect", masses.step_effect_sum, "magenta", "Σ effect")):
            plot = self.query_one(pid, PlotWidget)
            plot.clear()
            plot.set_x_formatter(ShortNumbers())
            plot.set_y_formatter(ShortNumbers(most=4))  # 8 rows of plot: a tick every other row
            x, y = staircase(edges, values)
            if name == "Σ effect":  # the zero line: above it the patterns pushed this prediction up
                plot.plot(np.array([edges[0], edges[-1]], dtype=np.float64), np.zeros(2), line_style="grey50",
                          hires_mode=HiResMode.BRAILLE)
            plot.plot(x, y, line_style=style, hires_mode=HiResMode.BRAILLE)
            for start, _task in phases:  # named in the pane's header (a legend box would hide data)
                plot.add_v_line(float(start), "yellow")
            # 1% room on the right: a hi-res line ending exactly at the limit is drawn past the axis
            span = float(max(edges[-1] - edges[0], 1))
            plot.set_xlimits(float(edges[0]), float(edges[0]) + span * 1.01)
            top = float(np.max(y)) if len(y) else 1.0
            low = float(np.min(y)) if len(y) else 0.0
            pad = (top - low) * 0.05 or abs(top) * 0.05 or 1.0  # a constant layer still gets a visible band
            plot.set_ylimits(min(low, 0.0) - (pad if low < 0 else 0.0), top + pad)
            plot.set_xlabel("training step")
            plot.set_ylabel(name)  # (textual-plot drops the first letter of a label of 19+ characters)
