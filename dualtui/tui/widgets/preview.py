"""One preview widget for every input kind: half-block images, text windows, vectors."""

from __future__ import annotations

import numpy as np
from rich.console import Group, RenderableType
from rich.text import Text
from textual.widget import Widget

from ..model import OpenRun


class Preview(Widget):
    """Shows one test item or training example as a person would recognise it."""

    DEFAULT_CSS = """
    Preview { height: auto; min-height: 3; }
    """

    def __init__(self, run: OpenRun, *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.run = run
        self.pixels: np.ndarray | None = None
        self.caption = Text("")
        self.highlight: int | None = None
        self.target: int | None = None
        self.suffix: tuple[str, str] | None = None
        self.max_rows = 8

    def show(self, data: np.ndarray | None, caption: Text | str, highlight: int | None = None, *,
             target: int | None = None, suffix: tuple[str, str] | None = None) -> None:
        """`highlight`: the token (text) a pattern sits at; `target`: the token it was trained to
        predict; `suffix`: (token, style) drawn after the window, e.g. the model's prediction."""
        self.pixels = data
        self.caption = caption if isinstance(caption, Text) else Text(caption)
        self.highlight = highlight
        self.target = target
        self.suffix = suffix
        self.refresh(layout=True)

    def clear(self, caption: str = "") -> None:
        self.show(None, caption)

    def _body(self, width: int) -> RenderableType:
        from ..render import image_halfblock, sparkline, text_block

        data = self.pixels
        if data is None:
            return Text("(no preview)", style="dim")
        kind = self.run.input_kind
        if kind == "image":
            return image_halfblock(np.asarray(data), max_width=max(4, width), max_height=self.max_rows)
        if kind == "text":
            tokens = self.run.tokens(data)
            suffix, style = self.suffix if self.suffix is not None else (None, "bold green")
            return text_block(tokens, self.highlight, target=self.target, suffix=suffix, suffix_style=style)
        flat = np.asarray(data, dtype=np.float64).reshape(-1)
        return Text(sparkline(flat, max(4, min(width, 60))))

    def render(self) -> RenderableType:
        width = max(4, self.size.width or 24)
        return Group(self.caption, self._body(width))

    def get_content_height(self, container, viewport, width: int) -> int:  # noqa: ANN001
        body = self._body(max(4, width))
        lines = len(body.wrap(self.app.console, max(4, width))) if isinstance(body, Text) else 1
        # Captions wrap in a narrow side panel: count wrapped lines, or the body gets cut off.
        return lines + max(1, len(self.caption.wrap(self.app.console, max(4, width))))
