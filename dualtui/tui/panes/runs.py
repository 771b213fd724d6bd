"""Two runs side by side (`dualtui open RUN_A --against RUN_B`): for the item being spotlit,
per layer, each run's learned share, effective patterns, own-task share, and how alike the two
runs' rankings of the training examples are (the numbers of `dualtui compare RUN_A RUN_B
--test M`), computed in a worker."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual import work

from ...bundle.reader import Bundle
from ..model import OpenRun
from ..state import ViewState
from .base import RenderedPane


class RunsPane(RenderedPane):
    def __init__(self, run: OpenRun, against: Bundle, **kw):
        super().__init__(run, **kw)
        self.against = against
        self.cache: dict[tuple, list] = {}  # (queries, test, by) -> engine LayerRuns per layer
        self.pending: tuple | None = None
        self.error: str | None = None

    def _key(self, state: ViewState) -> tuple:
        return (self.run.queries_name, state.test, state.by)

    def build(self, state: ViewState) -> RenderableType:
        key = self._key(state)
        head = Text(f"test {state.test} · run A: {self.run.bundle.path.name} · run B: {self.against.path.name} · "
                    f"top 10 training examples by {state.by}", style="bold")
        if self.error:
            return Group(head, Text(self.error, style="bold red"))
        rows = self.cache.get(key)
        if rows is None:
            if self.pending != key:
                self.pending = key
                self.compute(key)
            return Group(head, Text("computing…", style="yellow"))
        pct = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
        t = Table(box=None, pad_edge=False)
        for h in ("layer", "learned share A / B", "effective patterns A / B", "own-task share A / B", "top-10 Jaccard",
                  "Spearman ρ"):
            t.add_column(h, justify="left" if h == "layer" else "right")
        for r in rows:
            t.add_row(r.layer, f"{pct(r.a.learned_share)} / {pct(r.b.learned_share)}",
                      f"{r.a.effective_patterns:,.0f} / {r.b.effective_patterns:,.0f}",
                      f"{pct(r.a.own_task_share)} / {pct(r.b.own_task_share)}",
                      "n/a" if r.jaccard != r.jaccard else f"{r.jaccard:.3f}",
                      "n/a" if r.spearman != r.spearman else f"{r.spearman:.3f}")
        legend = Text("\nlearned share: ‖learned term‖ ÷ (‖initial‖ + ‖learned‖) of the layer's output · effective "
                      "patterns: (Σ|α|)² ÷ Σα² · own-task share: of Σ|α|, on the item's task · Jaccard: overlap of the "
                      "two runs' top 10 examples · Spearman ρ: rank correlation of the runs' scores over the examples "
                      "both trained on · `dualtui compare RUN_A RUN_B` for every item", style="italic dim")
        return Group(head, Text(""), t, legend)

    @work(thread=True, group="runs", exclusive=True, exit_on_error=False)
    def compute(self, key: tuple) -> None:
        from ...engine.compare_runs import RunsDiffer, compare_runs

        try:
            rows = compare_runs(self.run.bundle, self.against, self.run.layers, [key[1]], by=key[2], top=10, queries=key[0])
        except RunsDiffer as e:
            self.app.call_from_thread(self._failed, str(e))
            return
        self.app.call_from_thread(self._done, key, rows)

    def _failed(self, message: str) -> None:
        self.error = message
        if self._shown_for is not None:
            self.update_view(self._shown_for)

    def _done(self, key: tuple, rows: list) -> None:
        self.cache[key] = rows
        if len(self.cache) > 32:
            self.cache.pop(next(iter(self.cache)))
        if self.pending == key:
            self.pending = None
        if self._shown_for is not None:
            self.update_view(self._shown_for)
