"""How a token is written on screen, in the CLI's tables and in the app alike: control
characters become visible glyphs so a context never breaks a row or hides a byte. Plain
Python (no torch, numpy or Rich), so every layer can use it."""

from __future__ import annotations

VISIBLE = {"\n": "⏎", "\t": "→", "\r": "␍"}


def visible(token: str, alone: bool = False) -> str:
    """A token as printable characters (newline ⏎, tab →, carriage return ␍, other controls ·).
    `alone`: the token is shown by itself (a prediction, a class name), so a space shows as ␣
    and an empty token as ·."""
    if not token:
        return "·" if alone else ""
    shown = "".join(VISIBLE.get(ch) or (ch if ch.isprintable() else "·") for ch in token)
    if alone and shown.strip() == "":
        shown = "␣" * max(len(shown), 1)
    return shown
