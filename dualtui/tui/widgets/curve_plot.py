"""The sorted score curve of the current ranking: score against rank over everything ranked
(engine/curve.py), on a linear or a log rank axis."""

from __future__ import annotations

import numpy as np
from textual_plot import HiResMode, PlotWidget

from ...engine.curve import Curve
from .axes import LogRanks, ShortNumbers


class ScoreCurve(PlotWidget):
    def __init__(self, **kw):
        super().__init__(allow_pan_and_zoom=False, **kw)

    def show(self, curve: Curve, score: str, log_rank: bool, marks: tuple[int, ...] = (10, 100)) -> list[int]:
        """Plot the curve; returns the ranks marked with a vertical line."""
        self.clear()
        # A tick every other row of the plot area (its height less the 5 rows of margins), read
        # when the axis is drawn: the height at this call may be before the layout settled.
        self.set_y_formatter(ShortNumbers(most=lambda: max(2, (self.size.height - 5) // 2) if self.size.height else 5))
        ranks = curve.ranks.astype(np.float64)
        x = np.log10(ranks) if log_rank else ranks
        self.set_x_formatter(LogRanks() if log_rank else ShortNumbers())
        # zero first (drawn under the curve): where support turns to opposition
        self.plot(np.array([x[0], x[-1]]), np.zeros(2), line_style="grey50", hires_mode=HiResMode.BRAILLE)
        self.plot(x, curve.values, line_style="green", hires_mode=HiResMode.BRAILLE)
        marked = []
        for k in marks:  # the ranking's rows (top 10 on screen, top 100 computed)
            # (on a linear axis over many ranks they would sit on the head and hide it)
            if 1 < k < curve.total and (log_rank or k > 0.05 * curve.total):
                self.add_v_line(float(np.log10(k) if log_rank else k), "yellow")
                marked.append(k)
        hi = float(np.max(curve.values)) if len(curve.values) else 1.0
        lo = float(np.min(curve.values)) if len(curve.values) else 0.0
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        span = float(max(x[-1] - x[0], 1e-9))  # 1% room: a hi-res line ending at the limit overshoots the axis
        self.set_xlimits(float(x[0]), float(x[0]) + span * 1.01)
        self.set_ylimits(min(lo, 0.0) - pad, max(hi, 0.0) + pad)
        self.set_xlabel("rank (log scale)" if log_rank else "rank")
        self.set_ylabel(score)  # (textual-plot drops the first letter of a label of 19+ characters)
        return marked


# One colour per class: matplotlib's tab10, the colours of `dualtui curves --plot` too (a
# theme's ANSI reds and greens are too alike for ten lines); one kind of line per task:
# braille dots for the first, quadrant blocks for the second, half blocks after.
GROUP_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                 "#17becf")
TASK_LINES = (HiResMode.BRAILLE, HiResMode.QUADRANT, HiResMode.HALFBLOCK)
TASK_GLYPHS = ("⠒⠒", "▀▀", "▀▄")


class GroupCurves(ScoreCurve):
    def show_groups(self, curves: list[tuple[int, int, np.ndarray]], score: str, log_rank: bool) -> None:
        """One line per group (task, class, scores highest first): colour by class, line by task."""
        self.clear()
        self.set_y_formatter(ShortNumbers(most=lambda: max(2, (self.size.height - 5) // 2) if self.size.height else 5))
        self.set_x_formatter(LogRanks() if log_rank else ShortNumbers())
        longest = max((len(v) for _, _, v in curves), default=1)
        ranks = np.arange(1, longest + 1, dtype=np.float64)
        x = np.log10(ranks) if log_rank else ranks
        lo, hi = 0.0, 0.0
        for task, cls, values in curves:
            if not len(values):
                continue
            self.plot(x[: len(values)], np.asarray(values, dtype=np.float64), line_style=GROUP_COLOURS[cls % len(GROUP_COLOURS)],
                      hires_mode=TASK_LINES[min(task, len(TASK_LINES) - 1)])
            lo, hi = min(lo, float(np.min(values))), max(hi, float(np.max(values)))
        pad = (hi - lo) * 0.05 or 1.0
        span = float(max(x[-1] - x[0], 1e-9))
        self.set_xlimits(float(x[0]), float(x[0]) + span * 1.01)
        self.set_ylimits(lo - pad if lo < 0 else 0.0, hi + pad)
        self.set_xlabel("rank within the group (log scale)" if log_rank else "rank within the group")
        self.set_ylabel(score)
