"""The sorted score curve of the current ranking (the paper's main plot): how fast the score
falls from the top pattern to the last, i.e. how many patterns a prediction really uses."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Static

from ..model import OpenRun
from ..state import ViewState
from ..widgets.curve_plot import GroupCurves, ScoreCurve


class CurvePane(Vertical):
    DEFAULT_CSS = """
    CurvePane { padding: 0 1; }
    CurvePane #curve-head, CurvePane #curve-legend { height: auto; }
    CurvePane ScoreCurve { height: 1fr; min-height: 10; }
    """

    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self.groups_cache: dict[tuple, object] = {}  # (queries, test, layer, by) -> engine Curves
        self.groups_pending: tuple | None = None
        self.last_state: ViewState | None = None
        self.can_focus = True  # the tab's main widget (nothing in it scrolls: the keys go to the app)

    def compose(self) -> ComposeResult:
        yield Static(id="curve-head")
        yield ScoreCurve(id="curve-plot")
        yield GroupCurves(id="curve-groups")
        yield Static(id="curve-legend")

    def update_view(self, state: ViewState) -> None:
        self.last_state = state
        self.query_one("#curve-groups").display = state.per_group
        if state.per_group:
            self.query_one("#curve-plot").display = False
            self._show_groups(state)
            return
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

    # ----------------------------------------------------------------- per (task, class)
    def _group_key(self, state: ViewState) -> tuple:
        by = state.by if state.by in ("attention", "magnitude", "effect") else "attention"
        return (self.run.queries_name, state.test, state.layer, by)

    def _show_groups(self, state: ViewState) -> None:
        key = self._group_key(state)
        head = Text()
        head.append(f"test {state.test} · {state.layer} · ", style="bold")
        head.append(f"sorted top-500 {key[3]} per {'(task, class)' if len(self.run.tasks) > 1 else 'class'}", style="bold cyan")
        plot = self.query_one(GroupCurves)
        curves = self.groups_cache.get(key)
        legend = Text()
        if curves is None:
            head.append("   computing…", style="yellow")
            plot.display = False
            if self.groups_pending != key:
                self.groups_pending = key
                self.compute_groups(key)
        else:
            from ..widgets.curve_plot import GROUP_COLOURS, TASK_GLYPHS

            plot.display = True
            plot.show_groups([(g.task, g.cls, g.scores) for g in curves.groups], key[3], state.log_rank)
            head.append(f" · {len(curves.groups)} groups · {'log' if state.log_rank else 'linear'} rank axis (l) · y: the "
                        "ranking's curve", style="dim")
            legend.append("colour: class  ")
            for c in sorted({g.cls for g in curves.groups}):
                legend.append("━ ", style=GROUP_COLOURS[c % len(GROUP_COLOURS)])
                legend.append(f"{self.run.class_name(c)}  ")
            tasks = sorted({g.task for g in curves.groups})
            if len(tasks) > 1:
                legend.append("\nline: task  ")
                for t in tasks:
                    legend.append(TASK_GLYPHS[min(t, len(TASK_GLYPHS) - 1)] + " ", style="bold")
                    legend.append(f"{self.run.task_name(t)}  ")
            legend.append("\neach line: a group's patterns' scores, highest first, ranks 1–500 (`dualtui curves` has "
                          "them with their training steps)", style="italic dim")
        self.query_one("#curve-head", Static).update(head)
        self.query_one("#curve-legend", Static).update(legend)

    @work(thread=True, group="curve-groups", exclusive=True, exit_on_error=False)
    def compute_groups(self, key: tuple) -> None:
        curves = self.run.group_curves(key[1], key[2], key[3])
        self.app.call_from_thread(self._groups_done, key, curves)

    def _groups_done(self, key: tuple, curves) -> None:
        self.groups_cache[key] = curves
        if len(self.groups_cache) > 16:  # a few items' worth: each is ≤ 500 scores per group
            self.groups_cache.pop(next(iter(self.groups_cache)))
        if self.groups_pending == key:
            self.groups_pending = None
        if self.last_state is not None and self.last_state.per_group:
            self._show_groups(self.last_state)
