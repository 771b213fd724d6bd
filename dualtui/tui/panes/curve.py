"""The sorted score curve of the current ranking (the paper's main plot): how fast the score
falls from the top pattern to the last, i.e. how many patterns a prediction really uses."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from ..model import OpenRun
from ..state import ViewState
from ..widgets.curve_plot import ScoreCurve


class CurvePane(Vertical):
    DEFAULT_CSS = """
    CurvePane { padding: 0 1; }
    CurvePane #curve-head, CurvePane #curve-legend { height: auto; }
    CurvePane ScoreCurve { height: 1fr; min-height: 10; }
    """

    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self.can_focus = True  # the tab's main widget (nothing in it scrolls: the keys go to the app)

    def compose(self) -> ComposeResult:
        yield Static(id="curve-head")
        yield ScoreCurve(id="curve-plot")
        yield Static(id="curve-legend")

    def update_view(self, state: ViewState) -> None:
        head = Text()
        head.append(f"test {state.test} · {state.layer} · ", style="bold")
        head.append(f"sorted {state.by} per {state.group}", style="bold cyan")
        spot = state.spot
        curve = spot.curves.get((state.by, state.group)) if spot is not None else None
        plot = self.query_one(ScoreCurve)
        marked: list[int] = []
        if spot is None:
            head.append("   computing…", style="yellow")
        elif curve is None or not curve.total:
            head.append("   no curve: " + ("nothing ranked" if curve is not None else
                                          "this layer's pattern scores are too many to sort in memory; g: per example"),
                        style="yellow")
        else:
            head.append(f" · {curve.total:,} ranked · {len(curve.ranks)} ranks plotted · "
                        f"{'log' if state.log_rank else 'linear'} rank axis (l)", style="dim")
            marked = plot.show(curve, state.by, state.log_rank)
        plot.display = curve is not None and bool(curve.total)
        self.query_one("#curve-head", Static).update(head)
        self.query_one("#curve-legend", Static).update(Text(
            "each point: the score at rank r of the full sort, highest first (exact, not interpolated); "
            "the ranking's lowest-first order reads the same curve from the right · "
            + (f"yellow lines: rank {' and '.join(map(str, marked))} · " if marked else "") + "grey: zero",
            style="italic dim"))
