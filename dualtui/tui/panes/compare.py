"""Two items side by side at the current layer: each one's top training examples (shared ones
marked), the overlap of the two tops, the rank correlation of the whole rankings, and each
item's mass by task and class (engine/compare.py, as `dualtui compare`)."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from ...engine.compare import compare_spotlights
from ...units import num
from ..render import plain
from ..state import ViewState
from .base import RenderedPane

TOP = 10


class ComparePane(RenderedPane):
    def build(self, state: ViewState) -> RenderableType:
        run = self.run
        if state.other is None:
            return Text("No second item yet. Press c to pin the item being spotlit (or, on the Tests tab, the "
                        "highlighted one) as the second item, then pick another item (n / p, or Enter on the Tests "
                        "tab): this tab then compares the two at the current layer.", style="italic")
        if state.other == state.test:
            return Text(f"Item {state.test} is pinned as B and is also the item being spotlit: pick another item "
                        "(n / p, or Enter on the Tests tab) to compare it with.", style="italic")
        a, b = state.spot, state.other_results.get(state.layer)
        head = Text()
        for j, m in enumerate((state.test, state.other)):
            it = run.test_item(m)
            head.append(f"{'A' if j == 0 else 'B'}: item {m} (label {run.class_name(it.label)}, predicted "
                        f"{run.class_name(it.prediction)})", style="bold" if it.correct else "bold red")
            head.append("   " if j == 0 else "\n")
        head.append(f"{state.layer} · by {state.by} per training example", style="bold cyan")
        if a is None or b is None:
            head.append("   computing…", style="yellow")
            return head
        c = compare_spotlights(a, b, state.by, TOP, run.queries_name)
        rho = "n/a" if math.isnan(c.spearman) else f"{c.spearman:.3f}"
        head.append(f"\nshared in the top {TOP}: {len(c.shared)} · Jaccard {c.jaccard:.3f} · Spearman ρ {rho} over "
                    f"{c.examples:,} training examples", style="bold")
        tops = Table(box=None, pad_edge=False, title_justify="left")
        for j in (0, 1):
            tops.add_column("A" if j == 0 else "B", justify="right")
            tops.add_column("example", justify="right")
            tops.add_column(state.by, justify="right")
            tops.add_column("label")
        shared = set(c.shared)
        for r in range(max(len(c.tops[0]), len(c.tops[1]))):
            cells: list = []
            for j in (0, 1):
                if r < len(c.tops[j]):
                    e = c.tops[j][r]
                    mark = "●" if e in shared else ""
                    cells += [f"{mark}{r + 1}", str(e), num(float(c.scores[j][e])), plain(run.class_name(int(run.train_label[e])))]
                else:
                    cells += ["", "", "", ""]
            tops.add_row(*cells)
        shares = Table(box=None, pad_edge=False)
        shares.add_column("(classes: largest A + B first)")
        shares.add_column("A", justify="right")
        shares.add_column("B", justify="right")
        if len(run.tasks) > 1:
            for i, (x, y) in enumerate(zip(*c.task_share)):
                shares.add_row(plain(run.task_name(i)), f"{x:.1%}", f"{y:.1%}")
        classes = sorted(range(len(c.class_share[0])), key=lambda i: -(c.class_share[0][i] + c.class_share[1][i]))
        for i in classes[:TOP]:
            shares.add_row(plain(f"class {run.class_name(i)}"), f"{c.class_share[0][i]:.1%}", f"{c.class_share[1][i]:.1%}")
        legend = Text("● = in both tops · Jaccard = |A ∩ B| / |A ∪ B| of the two tops · Spearman ρ = rank correlation of "
                      "A's and B's scores over every training example (1: same order) · shares: of Σ|α| · c: pin another "
                      "item as B", style="italic dim")
        return Group(head, Text(""), tops, Text("\nshare of Σ|α|", style="bold cyan"), shares, Text(""), legend)
