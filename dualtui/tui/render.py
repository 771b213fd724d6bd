"""Pure Rich renderables for the TUI: images, text windows, bars, charts, sparklines.

Everything here returns ``rich.text.Text`` (or ``str``) built from Rich and numpy only, so the
app can drop the results into any Textual widget (``Static.update``) and the tests need no
terminal, Textual app or torch.
"""

from __future__ import annotations

from typing import Callable

import math

import numpy as np
from rich.cells import cell_len
from rich.color import Color
from rich.style import Style
from rich.text import Text

from dualtui.literal import literal  # absolute: the tests load this module by its path
from dualtui.tokens import visible

__all__ = ["image_halfblock", "text_window", "hbar", "bar_table", "column_chart", "sparkline"]

_EIGHTHS_H = " ▏▎▍▌▋▊▉"  # index = eighths of a cell filled from the left
_EIGHTHS_V = " ▁▂▃▄▅▆▇█"  # index = eighths of a cell filled from the bottom


def _runs(cells: list[tuple[str, Style | str | None]]) -> Text:
    """Join (char, style) cells into one Text, one span per run of equal style (few spans)."""
    out = Text()
    i = 0
    while i < len(cells):
        j = i + 1
        while j < len(cells) and cells[j][1] == cells[i][1]:
            j += 1
        out.append("".join(c for c, _ in cells[i:j]), cells[i][1])
        i = j
    return out


def image_halfblock(pixels, max_width: int, max_height: int, *, scale: int | None = None,
                    vmax: float | None = None) -> Text:
    """Render a [H, W] grey or [H, W, 3] RGB image with "▀" cells: fg = top pixel, bg = bottom.

    uint8 images are taken as 0..255; other dtypes map 0..``vmax`` (default: the array's max) to
    black..white. Without ``scale`` the image is upscaled (nearest neighbour) by the largest
    integer that fits ``max_width`` columns and ``2 * max_height`` pixel rows; if even 1× does
    not fit it is subsampled by the smallest integer stride that does, so it never overflows.
    An odd last pixel row is drawn over the terminal's own background (no bgcolor).
    """
    img = np.asarray(pixels)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ValueError(f"expected [H, W] or [H, W, 3] pixels, got shape {img.shape}")
    img = img[..., :3]  # drop an alpha channel if one came along
    h, w = img.shape[:2]
    if h == 0 or w == 0 or max_width <= 0 or max_height <= 0:
        return Text()
    if vmax is None:
        top = float(np.nanmax(img)) if img.dtype != np.uint8 else 255.0
        vmax = top if math.isfinite(top) and top > 0 else 1.0
    grey = np.nan_to_num(img.astype(np.float64) / vmax * 255.0, nan=0.0, posinf=255.0, neginf=0.0)
    rgb = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    if scale is None:
        scale = min(max_width // w, 2 * max_height // h)
        if scale < 1:  # too big even at 1×: subsample by the smallest stride that fits
            step = max(-(-w // max_width), -(-h // (2 * max_height)))
            rgb, scale = rgb[::step, ::step], 1
    rgb = np.repeat(np.repeat(rgb, max(1, int(scale)), axis=0), max(1, int(scale)), axis=1)
    styles: dict[tuple, Style] = {}  # identical colour pairs share one Style object

    def style(top: tuple, bottom: tuple | None) -> Style:
        if (top, bottom) not in styles:
            styles[top, bottom] = Style(color=Color.from_rgb(*top),
                                        bgcolor=None if bottom is None else Color.from_rgb(*bottom))
        return styles[top, bottom]

    px = [[tuple(p) for p in row] for row in rgb.tolist()]  # plain ints: hashing numpy rows is slow
    out = Text()
    for r in range(0, len(px), 2):
        if r:
            out.append("\n")
        bottom = px[r + 1] if r + 1 < len(px) else [None] * len(px[r])
        out.append_text(_runs([("▀", style(t, b)) for t, b in zip(px[r], bottom)]))
    return out


def _visible(token: str) -> str:
    """Make control characters visible so a window never breaks lines or hides bytes.

    A token that would take no cells at all ("" or a lone combining mark) becomes "·" too, so
    every token, the highlighted one above all, occupies at least one visible cell.
    """
    shown = visible(token)
    return shown if cell_len(shown) else "·"


def _alone(token: str) -> str:
    """A token shown by itself (after "▸"): a space would vanish, so it is drawn as ␣."""
    shown = _visible(token)
    return shown if shown.strip() else "␣" * max(len(shown), 1)


def text_window(tokens: list[str], highlight: int | None = None, *, next_token: str | None = None,
                width: int | None = None) -> Text:
    """One-line view of a context window: ``highlight`` in "reverse bold", then "▸next" in green.

    With ``width``, tokens are dropped from both ends (shown as "…") so the result fits while the
    highlighted token (or, without one, the newest tokens on the right) stays visible; the
    "▸next" suffix is always kept. An out-of-range ``highlight`` is ignored.
    """
    if width is not None and width <= 0:
        return Text()
    shown = [_visible(t) for t in tokens]
    n = len(shown)
    if highlight is not None and not 0 <= highlight < n:
        highlight = None
    suffix = "▸" + _alone(next_token) if next_token is not None else ""
    lo, hi = 0, n
    if width is not None and sum(map(cell_len, shown)) + cell_len(suffix) > width and n:
        # Grow a window outwards from the anchor, alternating sides; each "…" costs one cell.
        budget, cells = width - cell_len(suffix), [cell_len(s) for s in shown]
        anchor = n - 1 if highlight is None else highlight
        lo, hi, used = anchor, anchor + 1, cells[anchor]
        open_sides, side = [True, True], 1
        while any(open_sides):
            a, b = (lo - 1, hi) if side == 0 else (lo, hi + 1)
            if open_sides[side] and 0 <= a and b <= n:
                extra = cells[a] if side == 0 else cells[b - 1]
                if used + extra + (a > 0) + (b < n) <= budget:
                    lo, hi, used = a, b, used + extra
                else:
                    open_sides[side] = False
            else:
                open_sides[side] = False
            side ^= 1
    out = Text()
    if lo > 0:
        out.append("…", "dim")
    for i in range(lo, hi):
        out.append(shown[i], "reverse bold" if i == highlight else None)
    if hi < n:
        out.append("…", "dim")
    if suffix:
        out.append(suffix, "bold green")
    if width is not None and out.cell_len > width:  # the anchor alone does not fit: hard cut
        out.truncate(width, overflow="ellipsis")
    return out


def text_block(tokens: list[str], highlight: int | None = None, *, target: int | None = None,
               suffix: str | None = None, suffix_style: str = "bold green") -> Text:
    """A context window as wrapped text, the way it reads in the corpus: ``highlight`` (the
    attended token) in "reverse bold", ``target`` (the token it was trained to predict) in
    green, then an optional "▸suffix" (e.g. the model's prediction). A newline token shows as
    "⏎" and also breaks the line; other control characters are made visible."""
    out = Text()
    for i, tok in enumerate(tokens):
        style = "reverse bold" if i == highlight else "bold green underline" if i == target else None
        out.append(_visible(tok), style)
        if "\n" in tok:
            out.append("\n")
    if suffix is not None:
        out.append("▸" + _alone(suffix), suffix_style)
    return out


def hbar(value: float, max_value: float, width: int, *, style: str = "cyan") -> Text:
    """A bar of ``|value| / max_value`` of ``width`` cells in eighth-cell steps, space-padded."""
    width = max(int(width), 0)
    frac = abs(value) / max_value if max_value > 0 and math.isfinite(value) else 0.0
    eighths = round(min(max(frac, 0.0), 1.0) * width * 8)
    bar = "█" * (eighths // 8) + (_EIGHTHS_H[eighths % 8] if eighths % 8 else "")
    out = Text()
    out.append(bar, style)  # a span, not the Text's base style, so the padding stays plain
    out.append(" " * (width - len(bar)))
    return out


def bar_table(rows: list[tuple[str, float]], width: int, *, value_format: "str | Callable[[float], str]" = "{:.1%}",
              max_value: float | None = None, style: str = "cyan") -> Text:
    """Rows of "label bar value": labels right-aligned (cut to 20 chars), bars share one scale."""
    if not rows:
        return Text()
    labels = [_visible(lab) if lab else "" for lab, _ in rows]  # a "\n" in a label must not split a row
    labels = [lab if len(lab) <= 20 else lab[:19] + "…" for lab in labels]
    values = [value_format(v) if callable(value_format) else value_format.format(v) for _, v in rows]
    lw, vw = max(map(cell_len, labels)), max(map(cell_len, values))
    if max_value is None:
        finite = [abs(v) for _, v in rows if math.isfinite(v)]
        max_value = max(finite, default=0.0)
    bar_w = max(width - lw - vw - 2, 0)
    out = Text()
    for i, (label, (_, v), shown) in enumerate(zip(labels, rows, values)):
        line = Text(" " * (lw - cell_len(label)) + label + " ")
        line.append_text(hbar(v, max_value, bar_w, style=style))
        line.append(" " + " " * (vw - cell_len(shown)) + shown)
        line.truncate(max(width, 0))  # when there is no room for a bar at all
        out.append_text(Text("\n") + line if i else line)
    return out


def _resample(values, width: int) -> np.ndarray:
    """Series → ``width`` non-negative columns: fractional-bin sums when shrinking, repeats when growing."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64).ravel(), nan=0.0, posinf=0.0)
    v = np.maximum(v, 0.0)
    n = len(v)
    if n == 0 or width <= 0:
        return np.zeros(max(width, 0))
    if n > width:  # integrate the step function over equal bins: column sums == total exactly
        cum = np.concatenate([[0.0], np.cumsum(v)])
        return np.diff(np.interp(np.linspace(0, n, width + 1), np.arange(n + 1), cum))
    return v[np.arange(width) * n // width]


def column_chart(values: np.ndarray, width: int, height: int, *, markers: list[tuple[float, str]] = (),
                 style: str = "cyan") -> Text:
    """Vertical bars (``height`` rows, eighth-block tops) plus an axis row with marker labels.

    The tallest column fills the chart; any positive column gets at least one eighth so a
    non-zero bin never looks empty. A marker at fraction x in [0, 1] draws "┃" (bold magenta)
    in the empty cells of column ``floor(x * width)`` and its label on the axis row from there
    (shifted left if it would run off the edge). Every line is exactly ``width`` cells.
    """
    width, height = max(int(width), 0), max(int(height), 0)
    cols = _resample(values, width)
    top = cols.max() if width else 0.0
    level = np.zeros(width, dtype=int) if top <= 0 else np.rint(cols / top * height * 8).astype(int)
    level = np.where(cols > 0, np.maximum(level, 1), 0)
    marks = {min(max(int(x * width), 0), width - 1): lab for x, lab in sorted(markers) if width}
    lines = []
    for row in range(height):
        fill = np.clip(level - (height - 1 - row) * 8, 0, 8)
        lines.append(_runs([("┃", "bold magenta") if f == 0 and c in marks else (_EIGHTHS_V[f], style if f else None)
                            for c, f in enumerate(fill)]))
    axis: list[tuple[str, str | None]] = [("─", "dim")] * width
    for col, label in marks.items():
        label = "".join(ch if cell_len(ch) == 1 else "·" for ch in label)[:width]  # one char per cell
        start = min(col, width - len(label))
        for k, ch in enumerate(label):
            axis[start + k] = (ch, "bold magenta")
    lines.append(_runs(axis))
    return Text("\n").join(lines)


def sparkline(values, width: int) -> str:
    """``width`` characters of "▁▂▃▄▅▆▇█" scaled from 0 to the max (resampled like ``column_chart``)."""
    if width <= 0:
        return ""
    if len(np.asarray(values).ravel()) == 0:
        return " " * width
    cols = _resample(values, width)
    top = cols.max()
    idx = np.zeros(width, dtype=int) if top <= 0 else np.rint(cols / top * 7).astype(int)
    return "".join(_EIGHTHS_V[1 + i] for i in idx)


def plain(value: object) -> Text:
    """A table cell that is never parsed as markup (DataTable and Rich tables parse a str
    cell's brackets): names from a bundle are text, with controls shown visibly."""
    return value if isinstance(value, Text) else Text(literal(str(value)))
