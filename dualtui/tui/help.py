"""The help screen (`?`): every key, grouped."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = [
    ("Views", [("1 … 5", "overview · tests · spotlight · layers · tasks & time"), ("tab / shift+tab", "move focus")]),
    ("Spotlight", [("b", "score: attention → magnitude → effect"), ("g", "group per pattern / per training example / per training token (text runs)"),
                   ("r", "highest first / lowest (most negative) first"), ("[  ]", "previous / next layer"),
                   ("n  p", "next / previous test item"), ("↑ ↓ pgup pgdn", "move in the ranking")]),
    ("Tests", [("enter", "spotlight the highlighted test item"), ("#", "jump box: type an index, enter")]),
    ("Export", [("x", "ranking as CSV (same columns as `dualtui rank --csv`)"),
                ("j", "ranking as JSON (same as `dualtui rank --json --top 100`)"), ("s", "screen as SVG")]),
    ("App", [("ctrl+p", "command palette"), ("?", "this help"), ("q", "quit")]),
]


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close", id="help.close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 72; max-width: 100%; height: auto; max-height: 90%;
                                  border: round $accent; background: $panel; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        t = Table(box=None, show_header=False, pad_edge=False)
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for section, rows in KEYS:
            t.add_row(f"[bold]{section}[/]", "")
            for key, what in rows:
                t.add_row(key, what)
        with VerticalScroll():
            yield Static(t)
            yield Static("[dim]escape to close[/]")
