"""A scrolling pane whose one Static is re-rendered from the app state, also on resize
(its bars and charts are sized to the pane's width)."""

from __future__ import annotations

from rich.console import RenderableType
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from ..model import OpenRun
from ..state import ViewState


class RenderedPane(VerticalScroll):
    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self._shown_for: ViewState | None = None

    def compose(self) -> ComposeResult:
        yield Static(classes="pane-body")

    def on_resize(self) -> None:
        if self._shown_for is not None:
            self.update_view(self._shown_for)

    @property
    def bar_width(self) -> int:
        return max(40, (self.size.width or 80) - 4)

    def update_view(self, state: ViewState) -> None:
        self._shown_for = state
        self.query_one(".pane-body", Static).update(self.build(state))

    def build(self, state: ViewState) -> RenderableType:
        raise NotImplementedError
