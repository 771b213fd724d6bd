"""Pure Rich renderables of the TUI (dualtui.tui.render): colours, sizes, scaling, trimming."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.cells import cell_len
from rich.color import Color
from rich.console import Console
from rich.style import Style
from rich.text import Text

from dualtui.tui.render import bar_table, column_chart, hbar, image_halfblock, sparkline, text_window

EIGHT = np.zeros((8, 8), np.uint8)
EIGHT[1:7, 2:6] = 255
EIGHT[2:6, 3:5] = 0


def lines(text: Text) -> list[Text]:
    return text.split("\n", allow_blank=True)


def widths(text: Text) -> list[int]:
    return [line.cell_len for line in lines(text)]


def style_at(text: Text, offset: int) -> Style:
    """Combined style of the character at ``offset`` (spans only; no console theme needed)."""
    return Style.combine([Style.parse(s.style) if isinstance(s.style, str) else s.style
                          for s in text.spans if s.start <= offset < s.end] or [Style()])


def test_halfblock_cell_colours_are_top_fg_and_bottom_bg() -> None:
    img = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]], np.uint8)
    out = image_halfblock(img, 2, 1)
    assert out.plain == "▀▀"
    left, right = style_at(out, 0), style_at(out, 1)
    assert left.color == Color.from_rgb(255, 0, 0) and left.bgcolor == Color.from_rgb(0, 0, 255)
    assert right.color == Color.from_rgb(0, 255, 0) and right.bgcolor == Color.from_rgb(10, 20, 30)


def test_halfblock_grey_float_uses_array_max_and_vmax() -> None:
    img = np.array([[0.0, 0.5], [1.0, 2.0]])
    out = image_halfblock(img, 2, 1)  # vmax defaults to the array max, 2.0
    assert style_at(out, 1).color == Color.from_rgb(64, 64, 64)
    assert style_at(out, 1).bgcolor == Color.from_rgb(255, 255, 255)
    out = image_halfblock(img, 2, 1, vmax=1.0)  # values above vmax clip to white
    assert style_at(out, 0).bgcolor == Color.from_rgb(255, 255, 255)
    assert style_at(out, 1).color == Color.from_rgb(128, 128, 128)


def test_halfblock_odd_height_pads_with_terminal_background() -> None:
    out = image_halfblock(np.full((3, 1), 255, np.uint8), 1, 2)
    assert out.plain == "▀\n▀"
    last = style_at(out, 2)
    assert last.color == Color.from_rgb(255, 255, 255) and last.bgcolor is None


@pytest.mark.parametrize(("box", "size"), [((40, 12), (24, 12)), ((16, 8), (16, 8)), ((8, 4), (8, 4))])
def test_halfblock_auto_scale_for_8x8_digit(box: tuple[int, int], size: tuple[int, int]) -> None:
    out = image_halfblock(EIGHT, *box)
    assert widths(out) == [size[0]] * size[1]
    assert not out.plain.endswith("\n")


def test_halfblock_explicit_scale_and_oversized_images_fit() -> None:
    assert widths(image_halfblock(EIGHT, 100, 100, scale=2)) == [16] * 8
    big = image_halfblock(np.ones((100, 300), np.uint8), 40, 12)  # subsampled, never overflows
    assert max(widths(big)) <= 40 and len(lines(big)) <= 12
    assert image_halfblock(EIGHT, 0, 5).plain == ""
    with pytest.raises(ValueError):
        image_halfblock(np.zeros((2, 2, 2)), 10, 10)


def test_hbar_widths_and_proportionality() -> None:
    for width in (0, 1, 7, 20):
        for value in (0.0, 0.13, 0.5, 1.0, 3.0, -0.5):
            assert hbar(value, 1.0, width).cell_len == width
    assert hbar(0.0, 1.0, 10).plain == " " * 10
    assert hbar(1.0, 1.0, 10).plain == "█" * 10
    assert hbar(5.0, 0.0, 10).plain == " " * 10  # max_value 0: nothing to scale against
    assert hbar(0.5, 1.0, 10).plain == "█" * 5 + " " * 5
    assert hbar(-0.5, 1.0, 10).plain == hbar(0.5, 1.0, 10).plain  # magnitude only
    assert hbar(1 / 80, 1.0, 10).plain == "▏" + " " * 9  # one eighth of one cell
    assert hbar(0.55, 1.0, 10).plain == "█████▌    "
    filled = [sum(" ▏▎▍▌▋▊▉█".index(c) for c in hbar(v, 1.0, 10).plain) for v in np.linspace(0, 1, 41)]
    assert filled == sorted(filled) and filled[0] == 0 and filled[-1] == 80
    red = hbar(0.5, 1.0, 4, style="on red")
    assert [(s.start, s.end, s.style) for s in red.spans] == [(0, 2, "on red")] and not red.style


def test_bar_table_layout() -> None:
    rows = [("alpha", 0.5), ("a label longer than twenty characters", 0.25), ("z", 0.0)]
    out = bar_table(rows, 51)
    ls = [line.plain for line in lines(out)]
    assert len(ls) == 3 and all(cell_len(line) <= 51 for line in ls)
    assert ls[1].startswith("a label longer than…") and len("a label longer than…") == 20
    assert ls[0].startswith(" " * 15 + "alpha ") and ls[2].startswith(" " * 19 + "z ")
    assert ls[0].endswith("50.0%") and ls[1].endswith("25.0%") and ls[2].endswith(" 0.0%")
    assert ls[0].count("█") == 2 * ls[1].count("█")  # shared scale: max value fills the bar
    assert ls[0].count("█") == 51 - 20 - 5 - 2  # label, value and two separating spaces
    narrow = bar_table(rows, 10)
    assert max(widths(narrow)) <= 10
    custom = bar_table([("a", 2.0), ("b", 1.0)], 30, value_format="{:.0f}", max_value=4.0)
    assert lines(custom)[0].plain.endswith(" 2") and lines(custom)[0].plain.count("█") == 13
    assert bar_table([], 30).plain == ""
    assert bar_table([("a\nb", 1.0)], 20).plain.startswith("a⏎b ")


def chart_fill(out: Text, height: int) -> list[int]:
    """Eighths filled per column of a column_chart (ignoring marker and axis rows)."""
    rows = [line.plain for line in lines(out)][:height]
    return [sum(" ▁▂▃▄▅▆▇█".index(r[c]) if r[c] in " ▁▂▃▄▅▆▇█" else 0 for r in rows)
            for c in range(len(rows[0]))]


def test_column_chart_heights_sizes_and_resampling() -> None:
    values = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 3.0, -5.0, 0.01])
    out = column_chart(values, 8, 4)
    assert widths(out) == [8] * 5
    fill = chart_fill(out, 4)
    assert fill[4] == 32 and fill[0] == 0 and fill[6] == 0  # max fills, zero/negative empty
    assert fill[1] < fill[2] < fill[3] < fill[4] and fill[5] < fill[3]
    assert fill[7] == 1  # tiny but positive stays visible
    order = np.argsort(values.clip(0), kind="stable")
    assert [fill[i] for i in order] == sorted(fill)
    # growing repeats each value; shrinking sums bins (a constant series stays flat)
    assert chart_fill(column_chart([1.0, 3.0], 6, 2), 2) == [5, 5, 5, 16, 16, 16]
    assert set(chart_fill(column_chart(np.ones(1000), 30, 3), 3)) == {24}
    shrunk = chart_fill(column_chart(np.r_[np.ones(50), np.zeros(50)], 10, 1), 1)
    assert shrunk == [8] * 5 + [0] * 5
    assert widths(column_chart(np.zeros(5), 12, 3)) == [12] * 4


def test_column_chart_markers() -> None:
    values = np.r_[np.ones(10), np.zeros(10)]
    out = column_chart(values, 20, 3, markers=[(0.25, "a"), (0.75, "ep2"), (1.0, "end")])
    ls = [line.plain for line in lines(out)]
    assert [cell_len(line) for line in ls] == [20] * 4
    assert all(line[5] == "█" for line in ls[:3])  # marker under a full bar is not drawn
    assert all(line[15] == "┃" for line in ls[:3])
    assert ls[3][5] == "a" and ls[3][15:17] == "ep"
    assert ls[3].endswith("end")  # shifted left to stay inside the width (over "ep2"'s tail)
    off = lines(out)[0].plain.index("┃")
    assert style_at(lines(out)[0], off) == Style.parse("bold magenta")


def test_resampling_preserves_sums() -> None:
    from dualtui.tui.render import _resample

    rng = np.random.default_rng(0)
    v = rng.random(997)
    for width in (1, 10, 333, 996):
        assert np.isclose(_resample(v, width).sum(), v.sum())
    assert np.array_equal(_resample(v[:5], 5), v[:5])


def test_text_window_escapes_and_highlight() -> None:
    tokens = ["a", "\n", "\t", "\x00", "b", " ", "c"]
    out = text_window(tokens, 4, next_token="\n")
    assert out.plain == "a⏎→·b c▸⏎"
    spans = {(s.start, s.end): str(s.style) for s in out.spans}
    assert spans[(4, 5)] == "reverse bold"
    assert spans[(7, 9)] == "bold green"
    assert text_window(["x", "y"]).plain == "xy" and text_window([]).plain == ""
    assert text_window(["x"], 5).plain == "x" and not text_window(["x"], 5).spans


@pytest.mark.parametrize("highlight", [0, 1, 25, 48, 49, None])
def test_text_window_trimming_keeps_highlight(highlight: int | None) -> None:
    tokens = [chr(ord("a") + i % 26) for i in range(50)]
    out = text_window(tokens, highlight, next_token="Z", width=15)
    assert out.cell_len == 15 and out.plain.endswith("▸Z")
    if highlight is None:
        assert out.plain == "…" + "".join(tokens[-12:]) + "▸Z"
        return
    (hl,) = [s for s in out.spans if s.style == "reverse bold"]
    assert out.plain[hl.start:hl.end] == tokens[highlight]
    assert out.plain.startswith("…") == (highlight > 5)
    body = out.plain[:-2].strip("…")
    assert body in "".join(tokens)


def test_text_window_tiny_width_still_fits() -> None:
    out = text_window(["hello", "world"], 1, next_token="next", width=4)
    assert out.cell_len <= 4
    wide = text_window(["漢", "字", "漢", "字"], 2, width=5)
    assert wide.cell_len <= 5 and "漢" in wide.plain


def test_sparkline() -> None:
    assert sparkline([0, 1, 2, 3, 4, 5, 6, 7], 8) == "▁▂▃▄▅▆▇█"
    assert sparkline(np.zeros(4), 6) == "▁" * 6
    assert sparkline([], 5) == " " * 5 and sparkline([1, 2], 0) == ""
    assert len(sparkline(np.arange(1000), 17)) == 17


@pytest.mark.parametrize("color_system", ["truecolor", "256", "standard"])
def test_everything_renders_through_a_console(color_system: str) -> None:
    rng = np.random.default_rng(1)
    renderables = [
        image_halfblock(EIGHT, 40, 12),
        image_halfblock(rng.random((7, 5, 3)), 30, 10),
        image_halfblock(rng.integers(0, 256, (28, 28), dtype=np.uint8), 60, 20),
        text_window(list("hello\nworld\tand\x07more"), 3, next_token="!", width=12),
        hbar(0.3, 1.0, 20),
        bar_table([("one", 0.7), ("two", 0.2), ("three", 0.1)], 40),
        column_chart(rng.random(500), 50, 6, markers=[(0.0, "ep1"), (0.5, "ep2")]),
        sparkline(rng.random(100), 30),
    ]
    console = Console(width=80, record=True, color_system=color_system, force_terminal=True, file=io.StringIO())
    for renderable in renderables:
        console.print(renderable)
    assert "▀" in console.export_text(clear=False) and "ep2" in console.export_text(clear=False)
    assert "\x1b[" in console.file.getvalue()


def test_rgb_degrades_to_256_colours() -> None:
    # A fresh process: Rich caches each Style's ANSI codes for the first colour system that
    # rendered it (and shares combined styles between consoles), so in-process checks would lie.
    code = ("import io, numpy as np; from rich.console import Console;"
            "from dualtui.tui.render import image_halfblock;"
            "c = Console(color_system='256', force_terminal=True, file=io.StringIO());"
            "c.print(image_halfblock(np.random.default_rng(0).random((6, 6, 3)), 12, 6));"
            "print(repr(c.file.getvalue()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "38;5;" in out and "48;5;" in out and "38;2;" not in out


def test_module_imports_neither_textual_nor_torch() -> None:
    # Load render.py by path: dualtui/tui/__init__.py (the app's) may import Textual itself.
    path = Path(__file__).resolve().parents[1] / "dualtui" / "tui" / "render.py"
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('render_alone', {str(path)!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(sorted(m for m in ('textual', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
