"""Text from a bundle, as literal characters: control characters (C0, DEL, C1 and the bidi
overrides that reorder what a reader sees) shown as visible symbols. No UI imports: the
engine's CSV, the CLI and the app all use it."""

from __future__ import annotations

import re
from typing import Any

# C0 (but newline and tab where kept), DEL, C1, and the invisible bidi controls.
# Surrogates too: a lone one from a JSON "\\ud800" escape cannot be encoded at all, and a path
# that is not UTF-8 arrives with its bytes as U+DC80..U+DCFF (surrogateescape), which would be
# written back raw (a C1 CSI among them).
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_CONTROL_KEEP_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(m: re.Match) -> str:
    c = ord(m.group())
    if c < 0x20:
        return chr(0x2400 + c)  # ␀ … ␟ (ESC shows as ␛, newline as ␊)
    if c == 0x7F:
        return "\u2421"  # ␡
    if 0xDC80 <= c <= 0xDCFF:
        return f"\\x{c - 0xDC00:02x}"  # a byte of a name that is not UTF-8, as Python shows it
    return f"<U+{c:04X}>"


def literal(text: Any, keep_lines: bool = False) -> str:
    """`text` with every control character shown visibly (newline and tab kept with keep_lines)."""
    return (_CONTROL_KEEP_LINES if keep_lines else _CONTROL).sub(_visible, str(text))
