"""Text from a bundle, made safe for a terminal: nothing a bundle holds is ever interpreted.

A bundle is a file from somebody else. Its names (tasks, classes, layers, vocabulary tokens,
text previews) are printed as literal text: control characters (C0, DEL, C1, and the bidi
overrides that reorder what a reader sees) are shown as visible symbols, never sent to the
terminal, and Rich markup in them is never parsed. `SafeConsole` applies this to every string
Rich turns into text (print arguments, table cells); our own styling is passed as Text objects.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console

from .literal import literal


class SafeConsole(Console):
    """A Console that never interprets a string: no markup, no control characters."""

    def render_str(self, text: str, **kwargs: Any) -> Any:
        kwargs["markup"] = False
        kwargs["emoji"] = False
        return super().render_str(literal(text, keep_lines=True), **kwargs)
