"""The app as a new user meets it (issue 13): the keyboard works at once on every tab, Escape
leaves the jump box, the selection follows the pattern or goes back to #1 when the ranking
changes, the Tests tab follows the item spotlit, the palette lists its commands before
anything is typed; and every number on screen is the `rank --json` value rounded to four
significant digits, never cut, at 80 and 120 columns."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from hypothesis import given, strategies as st
from textual.command import CommandList, CommandPalette
from textual.widgets import DataTable, Input

from dualtui.tui.widgets.ranking_table import RankingTable
from dualtui.units import num
from test_tui_pilot import SINGLE, TEXT, cli_stdout, new_app, screen_text, settle, state


def _significant(text: str) -> int:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    return len(mantissa)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e300, max_value=1e300))
def test_num_keeps_four_significant_digits_and_rounds_honestly(x):
    text = num(x)
    if x == 0:
        assert text == "0"
        return
    back = float(text)
    assert math.isclose(back, x, rel_tol=5.0001e-4), (x, text)  # rounded to 4 significant digits, never cut
    a = abs(x)
    assert _significant(text) == 4 or (1e4 <= abs(back) < 1e5 and _significant(text) <= 5), (x, text)
    assert ("e" in text) == (not (1e-3 <= a < 1e5) or abs(back) >= 1e5), (x, text)


def test_num_examples_from_the_issue():
    assert num(-8.497e-05) == "-8.497e-05"
    assert num(-0.02244) == "-0.02244"
    assert num(-0.1002) == "-0.1002"
    assert num(1.22) == "1.220"
    assert num(67.09) == "67.09"
    assert num(10000.0) == "10000" and num(12345.6) == "12346" and num(99999.7) == "1.000e+05"
    assert num(float("nan")) == "nan" and num(float("-inf")) == "-inf"


def _focused_id(app) -> str | None:
    return getattr(app.focused, "id", None)


def test_the_keyboard_works_at_once_on_every_tab():
    async def go():
        app, run = new_app(SINGLE, test=3)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, app)
            table = app.query_one("#spot-table", RankingTable)
            assert app.focused is table and table.cursor_row == 0
            await pilot.press("down", "down")
            assert table.cursor_row == 2  # ↓ right after start moves the selection
            await pilot.press("j", "k", "j")
            assert table.cursor_row == 3  # and j / k, for vim hands
            for key, main in (("2", "tests-table"), ("4", "layers-pane"), ("5", "tasks-pane"), ("1", "overview-pane"),
                              ("3", "spot-table")):
                await pilot.press(key)
                await settle(pilot, app)
                assert _focused_id(app) == main, (key, _focused_id(app))
            await pilot.press("2")
            await settle(pilot, app)
            tests = app.query_one("#tests-table", DataTable)
            row = tests.cursor_row
            await pilot.press("down")
            assert tests.cursor_row == row + 1
            await pilot.press("4", "pagedown")
            await pilot.pause()
            assert app.query_one("#layers-pane").scroll_y > 0  # the Layers tab scrolls without a Tab first

    asyncio.run(go())


def test_escape_always_leaves_the_jump_box():
    async def go():
        app, run = new_app(SINGLE, test=0)
        async with app.run_test(size=(110, 32)) as pilot:
            await settle(pilot, app)
            await pilot.press("number_sign")
            await pilot.pause()
            jump = app.query_one("#jump", Input)
            assert app.focused is jump
            await pilot.press(*"99999", "enter")  # no such item: an error notice, focus stays for a retry
            await pilot.pause()
            assert app.focused is jump
            await pilot.press("escape")
            await pilot.pause()
            assert app.focused is app.query_one("#tests-table") and jump.value == ""
            await pilot.press("3")  # an app key again, not typed into the box
            await settle(pilot, app)
            assert app.query_one("#views").active == "spotlight"

    asyncio.run(go())


def _identity(r, group):
    return (r.pattern,) if group == "pattern" else (r.example, r.position)


def test_the_selection_follows_the_pattern_or_goes_back_to_the_top():
    async def go():
        app, run = new_app(SINGLE, test=3)
        async with app.run_test(size=(110, 32)) as pilot:
            await settle(pilot, app)
            table = app.query_one("#spot-table", RankingTable)
            await pilot.press("down", "down", "down")
            for key in ("b", "b", "r", "right_square_bracket", "n", "p", "g", "g"):
                before = table.selected
                await pilot.press(key)
                await settle(pilot, app)
                rows = table.ranked_rows
                same = [i for i, r in enumerate(rows) if _identity(r, table.group) == _identity(before, table.group)
                        and key not in ("g",)]
                want = same[0] if same else 0
                assert table.cursor_row == want, (key, table.cursor_row, want)
                await pilot.press("down")  # off #1 again for the next key
            await pilot.press("n")
            await settle(pilot, app)
            tests = app.query_one("#tests-table", DataTable)
            assert tests.coordinate_to_cell_key(tests.cursor_coordinate).row_key.value == str(app.test)

    asyncio.run(go())


def test_the_palette_lists_the_apps_commands_before_anything_is_typed():
    async def go():
        app, run = new_app(SINGLE)
        async with app.run_test(size=(110, 32)) as pilot:
            await settle(pilot, app)
            await pilot.press("ctrl+p")
            await pilot.pause()
            assert isinstance(app.screen, CommandPalette)
            commands = app.screen.query_one(CommandList)
            for _ in range(100):
                if commands.option_count >= 20:
                    break
                await pilot.pause(0.05)
            prompts = [str(commands.get_option_at_index(i).prompt) for i in range(commands.option_count)]
            for title in ("view: spotlight", "score: effect", "export: ranking as CSV", "layer: net.4"):
                assert any(title in p for p in prompts), (title, prompts[:10])

    asyncio.run(go())


@pytest.mark.parametrize("size", [(80, 24), (120, 40)])
@pytest.mark.parametrize("bundle", ["digits", "text"])
def test_every_number_shown_is_the_json_value_rounded_never_cut(size, bundle):
    path = SINGLE if bundle == "digits" else TEXT

    async def go():
        app, run = new_app(path, test=3)
        async with app.run_test(size=size) as pilot:
            await settle(pilot, app)
            for keys in ((), ("b", "b")):  # effect (the default), then attention
                await pilot.press(*keys)
                await settle(pilot, app)
                table = app.query_one("#spot-table", RankingTable)
                d = json.loads(cli_stdout(path, *state(app), 100, "json"))
                labels = [str(c.label) for c in table.ordered_columns]
                screen = screen_text(app)
                assert set(labels) | set(table.left_out) >= {"rank", "score", "example"}
                if size[0] == 80:
                    assert table.left_out, "80 columns cannot hold every column"
                    assert ", ".join(table.left_out) in screen.replace("\n", " ") or "not shown" in screen
                assert sum(c.width for c in table.ordered_columns) + 2 * len(labels) <= table.size.width + 2
                for i, r in enumerate(d["results"][:5]):
                    cells = [str(c) for c in table.get_row_at(i)]
                    for name in ("score", "attention", "magnitude", "effect"):
                        if name in labels:
                            shown = cells[labels.index(name)].strip()
                            assert shown == num(r[name]), (name, shown, r[name])
                            if i < 3:
                                assert shown in screen, (name, shown)  # on screen in full, not cut at the edge

    asyncio.run(go())


def test_header_names_the_left_out_columns_after_a_resize() -> None:
    """Found by an independent check: after 80 → 120 columns the header still listed columns
    that were now shown (and the reverse)."""

    async def go() -> None:
        app, _ = new_app(SINGLE)
        async with app.run_test(size=(80, 24)) as pilot:
            await settle(pilot, app)
            for size in ((120, 40), (80, 24), (160, 40)):
                await pilot.resize_terminal(*size)
                await pilot.pause()
                await pilot.pause()
                table = app.query_one("#spot-table", RankingTable)
                shown = {str(c.label) for c in table.columns.values()}
                head = str(app.query_one("#spot-header").render())
                note = head.split("not shown at this width: ")[1] if "not shown at this width: " in head else ""
                named = {n.strip() for n in note.split(",") if n.strip()}
                assert not named & shown, (size, named, shown)  # nothing both named as left out and shown
                assert named == {c for c in table.left_out if not c.endswith("(= score)")}, size

    asyncio.run(go())
