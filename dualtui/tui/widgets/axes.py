"""Tick labels for the app's plots: short numbers, and ranks on a log axis (1, 10, 100, 1k)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

from textual_plot.axis_formatter import AxisFormatter, NumericAxisFormatter


def tick_label(x: float) -> str:
    """The shortest exact-enough label of a tick at a round value: 0.0015, 5e-05, 200, 1e+06."""
    if x == 0:
        return "0"
    return f"{float(f'{x:.4g}'):g}"


def rank_label(r: float) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if r >= div:
            return f"{r / div:g}{suffix}"
    return f"{r:g}"


class ShortNumbers(NumericAxisFormatter):
    """Round ticks (1, 2, 5 × 10^k) labelled without trailing digits. `most`: at most this many
    ticks (a short plot has one row per tick or less, and two labels on one row read as one:
    "-2" under "0" showed "-0")."""

    def __init__(self, most: int | Callable[[], int] | None = None):
        self.most = most  # a callable is asked at each drawing (a plot whose height follows the window)

    def get_ticks(self, min_: float, max_: float, max_ticks: int = 8) -> list[float]:
        ticks = super().get_ticks(min_, max_, max_ticks)
        most = self.most() if callable(self.most) else self.most
        while most is not None and len(ticks) > max(most, 2):
            keep = 0 if 0.0 not in ticks else ticks.index(0.0) % 2  # keep the zero tick when there is one
            ticks = ticks[keep::2]
        return ticks

    def get_labels_for_ticks(self, ticks: Sequence[float]) -> list[str]:
        # A tick computed as 0 can come out as ±1e-17: label it by the tick spacing.
        step = abs(ticks[1] - ticks[0]) if len(ticks) > 1 else 0.0
        return [tick_label(0.0 if abs(t) <= step * 1e-9 else t) for t in ticks]


class LogRanks(AxisFormatter):
    """An axis whose coordinate is log10(rank): ticks at 1, 10, 100, … (and 2, 5 × 10^k when
    the range spans less than two decades)."""

    def get_ticks(self, min_: float, max_: float, max_ticks: int = 8) -> list[float]:
        lo, hi = math.floor(min_), math.ceil(max_)
        mantissas = (1.0,) if hi - lo >= 2 else (1.0, 2.0, 5.0)
        ticks = [d + math.log10(m) for d in range(lo, hi + 1) for m in mantissas]
        ticks = [t for t in ticks if min_ - 1e-9 <= t <= max_ + 1e-9]
        while len(ticks) > max_ticks:
            ticks = ticks[::2]
        return ticks

    def get_labels_for_ticks(self, ticks: Sequence[float]) -> list[str]:
        return [rank_label(round(10 ** t)) for t in ticks]
