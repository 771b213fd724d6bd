"""The main view: a test item, the training patterns its layer attends to, and the selected
pattern next to it with its scores at every layer."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Static

from ...engine.spotlight import Ranked
from ...units import num
from ..render import plain
from ..messages import ColumnsFitted, ExampleChosen, RowSelected
from ..model import OpenRun
from ..state import ViewState
from ..widgets.preview import Preview
from ..widgets.ranking_table import RankingTable


class SpotlightPane(Horizontal):
    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self.state: ViewState | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="spot-side"):
            yield Preview(self.run, id="spot-test")
            yield Preview(self.run, id="spot-train")
            yield Static(id="spot-across")
        with Vertical(id="spot-main"):
            yield Static(id="spot-header")
            yield RankingTable(self.run, id="spot-table")

    def update_view(self, state: ViewState) -> None:
        self.state = state
        m, L = state.test, state.layer
        it = self.run.test_item(m)
        cap = Text(f"test {m} · label {self.run.class_name(it.label)} · predicted {self.run.class_name(it.prediction)}",
                   style="bold" if it.correct else "bold red")
        data, marks = self.run.test_preview(m)
        self.query_one("#spot-test", Preview).show(data, cap, **marks)
        spot = state.results.get(L)
        table = self.query_one("#spot-table", RankingTable)
        table.loading = spot is None
        if spot is not None:
            rows = spot.ranked[(state.by, state.group, state.reverse)]
            # Another layer arriving refreshes every view; rebuilding an unchanged 100-row
            # table costs ~0.1 s of main-thread time (benchmarks/README.md, TUI).
            if rows is not table.ranked_rows or state.group != table.group:
                table.show(rows, state.group, state.by)
            else:
                self.show_selected(table.selected)  # the other layers' scores may have just arrived
        self.show_header()

    def show_header(self) -> None:
        """The ranking's title: layer, score, grouping, order, the layer's summary, and the
        columns the table left out at its width."""
        state = self.state
        L = state.layer
        header = Text()
        header.append(L, style="bold")
        header.append(f" ({self.run.layers.index(L) + 1}/{len(self.run.layers)}) · ")
        header.append(state.by, style="bold cyan")
        header.append(" · per ")
        header.append(state.group, style="bold cyan")
        header.append(" · ")
        header.append("lowest first" if state.reverse else "highest first", style="bold cyan")
        spot = state.results.get(L)
        if spot is None:
            header.append("   computing…", style="yellow")
        else:
            s = spot.summary
            if self.run.bundle.manifest.approximate:  # the ranking covers only what the patterns explain
                header.append(f"\nAPPROXIMATE · not attributed to any pattern: ‖R q‖ = {s.residual_share:.0%} of ‖(W_T − w0) q‖",
                              style="bold yellow")
                header.append(f" · {s.patterns:,} patterns · learned {s.learned_share:.0%} · "
                              f"effective {s.effective_patterns:,.0f}", style="dim")
            else:
                header.append(f"\n{s.patterns:,} patterns · learned {s.learned_share:.0%} · "
                              f"effective {s.effective_patterns:,.0f} · primal−dual {s.primal_dual_error:.0e}", style="dim")
            # (the chosen score's own raw column is never needed: the score column shows it)
            table = self.query_one("#spot-table", RankingTable)
            left_out = [c for c in table.left_out if not c.endswith("(= score)")]
            if left_out:
                header.append(f" · not shown at this width: {', '.join(left_out)}", style="dim")
        self.query_one("#spot-header", Static).update(header)

    def on_columns_fitted(self, event: ColumnsFitted) -> None:
        if self.state is not None:  # a resize re-fits the columns: the header's note must follow
            self.show_header()

    def on_row_selected(self, event: RowSelected) -> None:
        self.show_selected(event.row)

    def on_data_table_row_selected(self, event) -> None:
        """Enter on a ranked row: the reverse spotlight of its training example."""
        if event.data_table.id != "spot-table":
            return
        event.stop()
        row = self.query_one("#spot-table", RankingTable).selected
        if row is not None:
            self.post_message(ExampleChosen(row.example))

    def show_selected(self, row: Ranked | None) -> None:
        state = self.state
        train = self.query_one("#spot-train", Preview)
        across = self.query_one("#spot-across", Static)
        if row is None:
            train.clear("")
            across.update("")
            return
        what = f"pattern {row.pattern} · step {row.step}" if state.group == "pattern" else f"{row.patterns} patterns"
        where = f" · position {row.position}" if row.position is not None else ""
        label = "next" if self.run.is_text and row.position is not None else "label"
        cap = Text(f"#{row.rank} example {row.example}{where} · {label} {self.run.class_name(row.label)} · {what}", style="bold")
        data, marks = self.run.train_preview(row)
        train.show(data, cap, **marks)
        scores = self.run.across_layers(state.test, row, state.group, state.results)
        rows = [(sc.layer + ("" if sc.exact_pattern or state.group != "pattern" else " Σ"), num(sc.attention), num(sc.effect))
                for sc in scores]
        w_name = max([len("layer")] + [len(r[0]) for r in rows])
        w_att = max([len("attention")] + [len(r[1]) for r in rows])
        w_eff = max([len("effect")] + [len(r[2]) for r in rows])
        if w_name + w_att + w_eff + 2 <= (across.size.width or 26):
            t = Table("layer", "attention", "effect", box=None, pad_edge=False, title="at every layer", title_justify="left")
            for row in rows:
                t.add_row(*map(plain, row))
        else:  # a narrow side panel (80 columns): each layer's name on its own line, numbers below
            t = Text()
            t.append("at every layer (α, effect)\n", style="italic")
            for name, a, e in rows:
                t.append(name + "\n", style="bold")
                t.append(f"α {a}  eff {e}\n")
        across.update(t)
