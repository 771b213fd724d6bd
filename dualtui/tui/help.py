"""The help screen (`?`): every key, grouped."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = [
    ("Views", [("1 … 8", "overview · tests · spotlight · layers · tasks & time · curve · compare · runs (8: with --against RUN_B)"),
               ("tab / shift+tab", "move focus")]),
    ("Spotlight", [("b", "score: effect → cosine → attention → magnitude"), ("g", "group per pattern / per training example / per training token (text runs)"),
                   ("r", "highest first / lowest (most negative) first"), ("[  ]", "previous / next layer"),
                   ("n  p", "next / previous test item"),
                   ("enter", "reverse spotlight: the items the selected training example contributes to most and least"),
                   ("↑ ↓ j k pgup pgdn", "move in the ranking (it has the keyboard when the tab opens); when the ranking "
                                         "changes, the selection stays on the same pattern if it is still listed, else goes to #1")]),
    ("Tests", [("enter", "spotlight the highlighted test item"), ("#", "jump box: type an index, enter; escape leaves it")]),
    ("Curve", [("l", "rank axis log / linear (the curve: the current ranking's score against its rank, over every "
                     "pattern or example, highest first)"),
               ("y", "one curve per (task, class): the sorted top-500 scores of each group's patterns, the paper's main "
                     "figure (`dualtui curves`)")]),
    ("Compare", [("c", "pin the item being spotlit (on the Tests tab: the highlighted one) as the second item B; then "
                       "spotlight another item A: tab 7 shows both at the current layer and score")]),
    ("Export", [("x", "ranking as CSV (same columns as `dualtui rank --csv`)"),
                ("X", "ranking as JSON (same as `dualtui rank --json --top 100`)"), ("s", "screen as SVG"),
                ("", "into --export-dir (default: the current folder); an existing file is never overwritten")]),
    ("App", [("Q", "next query set (test, a training subset, …: `dualtui info` lists them)"), ("ctrl+p", "command palette"), ("?", "this help"), ("q", "quit")]),
]

# What the numbers on screen mean (docs/format.md section 6): the same words as `rank --help`.
SCORES_HELP = [
    ("attention α", "k · q (+1 with a bias): the training input's dot product with the test input at this layer "
                    "(unnormalised: training inputs with a large norm get a large α)"),
    ("magnitude", "|α| · ‖v‖: the size of the pattern's contribution α v to the layer's output"),
    ("effect", "Σ_r α_r (v · g_r): the pattern's first-order change of the test item's target logit (exact at a last "
               "layer); the effects of all patterns plus the initial-weight term add up to that logit there"),
    ("cosine", "α / (‖k‖ ‖q‖), with the bias input 1 in both: attention normalised; 1 for a training input that is a "
               "copy of the test input, whatever its size (per example or token: the mean over its patterns)"),
    ("learned %", "‖Σ α v‖ / (‖w0 q + b0‖ + ‖Σ α v‖): how much of the layer's output comes from learning"),
    ("effective", "(Σ|α|)² / Σα²: how many patterns the attention is spread over"),
    ("top-k share", "share of Σ|α| held by the k patterns with the largest |α|"),
    ("primal−dual", "max |W_T q − (w0 q + Σ α v)|: how exactly the dual form reproduces the layer (float rounding)"),
    ("Σ|α|, Σ effect", "(tasks & time) the sums of |α| and of effect over the patterns of each bin of training steps"),
    ("Jaccard", "(compare) |A ∩ B| / |A ∪ B| of the two items' top-10 training examples: 1 the same set, 0 disjoint"),
    ("Spearman ρ", "(compare) the rank correlation of A's and B's per-example scores over every training example "
                   "seen at the layer: 1 the same order, 0 unrelated, −1 reversed"),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close"),
                Binding("s", "app.svg", "SVG", show=False, id="help.svg")]  # a screenshot of the help too
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 80; max-width: 100%; height: auto; max-height: 90%;
                                  border: round $accent; background: $panel; padding: 0 1;
                                  border-subtitle-align: right; }
    """

    def compose(self) -> ComposeResult:
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for section, rows in KEYS + [("Scores and summaries", SCORES_HELP)]:
            t.add_row(f"[bold]{section}[/]", "")
            for key, what in rows:
                t.add_row(key, what)
        scroll = VerticalScroll()
        # On the border, so it shows however far the help is scrolled and at 80×24.
        scroll.border_subtitle = "↑ ↓ pgup pgdn scroll · escape to close"
        with scroll:
            yield Static(t)

    def on_mount(self) -> None:
        self.query_one(VerticalScroll).focus()  # the arrows scroll the help at once
