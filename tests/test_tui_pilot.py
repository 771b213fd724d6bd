"""`dualtui open` driven like a person would, through Textual's Pilot (`App.run_test`).

Every ranking the app shows is checked against its CLI twin, `dualtui rank --json`, run
through typer's CliRunner for the same test item / layer / score / grouping / order; the
app's exports must be byte-for-byte what `dualtui rank --top 100 --csv/--json` prints.
Also: the overview and its verify worker, the help screen, the command palette, quitting,
and the one-line errors of `dualtui open` (exit 3 for an invalid bundle, 2 for bad options).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import time
from pathlib import Path

import pytest
from rich.console import Console
from textual.command import CommandList, CommandPalette
from textual.widgets import DataTable, Input, Select, Static
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app as cli_app
from dualtui.tui.app import DualtuiApp
from dualtui.tui.help import HelpScreen
from dualtui.tui.model import OpenRun
from dualtui.tui.widgets.ranking_table import RankingTable

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = ROOT / "sample_runs" / "digits-continual.safetensors"
SINGLE = ROOT / "sample_runs" / "digits-single.safetensors"
SIZE = (110, 32)
TOP = 5

runner = CliRunner()


# ----------------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=None)
def cli_stdout(bundle: Path, test: int, layer: str, by: str, group: str, reverse: bool, top: int, fmt: str) -> str:
    """`dualtui rank ...` through CliRunner: its stdout (exit 0, nothing on stderr)."""
    args = ["rank", str(bundle), "--test", str(test), "--layer", layer, "--by", by, "--group", group,
            "--top", str(top), f"--{fmt}"] + (["--reverse"] if reverse else [])
    r = runner.invoke(cli_app, args)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert r.exit_code == 0, (args, r.output)
    assert r.stderr == ""
    return r.stdout


def state(app: DualtuiApp) -> tuple:
    return (app.test, app.layer, app.by, app.group, app.reverse)


def cli_top(bundle: Path, app: DualtuiApp, k: int = TOP) -> list[tuple]:
    d = json.loads(cli_stdout(bundle, *state(app), k, "json"))
    assert (d["test"], d["layer"], d["by"], d["group"], d["reverse"]) == state(app)
    return [(r["example"], r.get("pattern"), r["score"]) for r in d["results"]]


async def settle(pilot, app: DualtuiApp) -> None:
    """Wait for the spotlight / verify workers, then for the screen to catch up."""
    # A finished spotlight starts the verify worker: wait until no worker is left running.
    while any(not w.is_finished for w in app.workers):
        await app.workers.wait_for_complete()
    await pilot.pause()


def header_text(app: DualtuiApp) -> str:
    return str(app.query_one("#spot-header", Static).render())


def screen_text(app: DualtuiApp) -> str:
    """What the terminal shows now, as plain text (the same render the SVG export uses)."""
    w, h = app.size
    console = Console(width=w, height=h, file=io.StringIO(), force_terminal=True, record=True, legacy_windows=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text()


def check_spotlight(app: DualtuiApp, bundle: Path, *, view: bool = True) -> None:
    """The ranking shown is the CLI's top-5 for the app's current state, in data and on screen."""
    if view:
        assert app.query_one("#views").active == "spotlight"
    table = app.query_one("#spot-table", RankingTable)
    assert not table.loading
    shown = [(r.example, r.pattern, r.score) for r in table.ranked_rows[:TOP]]
    assert shown == cli_top(bundle, app), state(app)
    if app.group == "example":
        assert all(p is None for _, p, _ in shown)
    # The cells on screen say the same as ranked_rows (the example column, found by its label).
    labels = [str(c.label) for c in table.ordered_columns]
    ex, rank = labels.index("example"), labels.index("rank")
    for i, (example, _, _) in enumerate(shown):
        row = table.get_row_at(i)
        assert (str(row[rank]), str(row[ex])) == (str(i + 1), str(example))
    head = header_text(app)
    assert app.layer in head and app.by in head and f"per {app.group}" in head
    assert ("lowest first" if app.reverse else "highest first") in head
    assert "computing" not in head


def new_app(bundle: Path, tmp_path: Path | None = None, **kw) -> tuple[DualtuiApp, OpenRun]:
    """The app and the OpenRun it browses (kept here: the tests never read the app's attribute for it)."""
    run = OpenRun(Bundle.open(bundle))
    return DualtuiApp(run, export_dir=tmp_path, **kw), run


async def choose(pilot, select: Select, steps_down: int) -> None:
    """Open a Select with the keyboard, move down `steps_down` options, pick with Enter."""
    select.focus()
    await pilot.pause()
    await pilot.press("enter")
    await pilot.pause()
    assert select.expanded
    await pilot.press(*["down"] * steps_down, "enter")
    await pilot.pause()
    assert not select.expanded


# ----------------------------------------------------------------------------- overview
def test_overview_shows_every_layer_and_verify_ok() -> None:
    async def go() -> None:
        app, run = new_app(CONTINUAL, view="overview")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)  # the verify worker (group "verify") and the spotlights
            assert not [w for w in app.workers if w.group == "verify"]
            table = app.query_one("#overview-layers", DataTable)
            layers = run.layers
            assert [k.value for k in table.rows] == layers == ["net.0", "net.2", "net.4"]
            for name in layers:
                verify = str(table.get_row(name)[-1])
                assert "ok" in verify.split() and "FAIL" not in verify, (name, verify)
            status = str(app.query_one("#verify-status", Static).render())
            assert "primal == dual for every layer" in status
            text = screen_text(app)
            for name in layers:  # on screen too, each row with its verdict
                line = next(ln for ln in text.splitlines() if ln.strip().startswith(name))
                assert " ok " in f" {line} ", line
            assert "sample_runs/digits-continual.safetensors" in text

    asyncio.run(go())


# ----------------------------------------------------------------------------- tests tab → spotlight
def test_pick_in_tests_tab_then_spotlight_matches_cli() -> None:
    async def go() -> None:
        app, run = new_app(CONTINUAL)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            check_spotlight(app, CONTINUAL)  # test 0, the last layer, as opened
            await pilot.press("2")
            await pilot.pause()
            assert app.query_one("#views").active == "tests"
            pane = app.query_one("TestsPane")
            # Filters: task "digits 5-9" (second choice after "all tasks"), then "wrong".
            await choose(pilot, app.query_one("#filter-task", Select), 2)
            assert app.query_one("#filter-task", Select).value == 1
            await choose(pilot, app.query_one("#filter-correct", Select), 2)
            assert app.query_one("#filter-correct", Select).value is False
            expected = [int(i) for i in run.test_items(task=1, correct=False)]
            assert pane.shown == expected and len(expected) >= 3
            assert all(run.test_item(i).task == 1 and not run.test_item(i).correct for i in pane.shown)
            table = app.query_one("#tests-table", DataTable)
            assert table.row_count == len(expected)
            table.focus()
            await pilot.press("down", "down", "enter")
            await settle(pilot, app)
            assert app.test == expected[2]
            check_spotlight(app, CONTINUAL)

    asyncio.run(go())


# Regression (fixed in the app): Enter in the jump box switched to the spotlight and bounced
# straight back to the Tests tab (focus fell from the hidden Input to its sibling Select, and
# TabbedContent re-activated that Select's tab).
def test_jump_box_goes_to_spotlight() -> None:
    async def go() -> None:
        app, run = new_app(CONTINUAL)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("2")
            await pilot.pause()
            # The task filter hides task 0; the jump box reaches any item all the same.
            await choose(pilot, app.query_one("#filter-task", Select), 2)
            hidden = int(run.test_items(task=0)[-1])
            assert hidden not in app.query_one("TestsPane").shown

            # An index out of range is refused with a message; nothing changes.
            await pilot.click("#jump")
            await pilot.press(*str(run.test_size), "enter")
            await settle(pilot, app)
            assert app.test == 0 and app.query_one("#views").active == "tests"
            assert any(f"no test item '{run.test_size}'" in n.message for n in app._notifications)
            assert app.query_one("#jump", Input).value == str(run.test_size)

            await pilot.click("#jump")
            await pilot.press("end", *["backspace"] * 4, *str(hidden), "enter")
            await settle(pilot, app)
            assert app.test == hidden
            assert app.query_one("#jump", Input).value == ""
            check_spotlight(app, CONTINUAL)

    asyncio.run(go())


# Regression (fixed in the app): after a test item was chosen, the app focused the ranking with
# call_after_refresh(table.focus) while the table was still loading (loading=True makes a widget
# unfocusable), so nothing had focus and ↑ ↓ did nothing. A race in normal use; made certain
# here by a slower computation.
def test_choosing_a_test_item_focuses_the_ranking() -> None:
    async def go() -> None:
        app, run = new_app(CONTINUAL)
        compute = run.compute

        def slow_compute(*args, **kwargs):  # as on a big bundle: the ranking is still loading a while
            time.sleep(0.3)
            return compute(*args, **kwargs)

        run.compute = slow_compute
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("2")
            table = app.query_one("#tests-table", DataTable)
            table.focus()
            await pilot.press("down", "down", "down", "enter")
            await settle(pilot, app)
            assert app.test == 3 and app.query_one("#views").active == "spotlight"
            ranking = app.query_one("#spot-table", RankingTable)
            for _ in range(50):
                if app.focused is ranking:
                    break
                await pilot.pause(0.02)
            assert app.focused is ranking, app.focused  # ↑ ↓ move in the ranking at once
            await pilot.press("down")
            assert ranking.cursor_row == 1

    asyncio.run(go())


# Regression (fixed in the app): the help screen lists "#" for the jump box, and nothing bound it.
def test_hash_key_focuses_the_jump_box() -> None:
    async def go() -> None:
        app, _ = new_app(CONTINUAL)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            await pilot.press("number_sign")  # from the spotlight: to the Tests tab, into the box
            await pilot.pause()
            assert app.query_one("#views").active == "tests"
            assert app.focused is app.query_one("#jump", Input)
            await pilot.press("7", "enter")
            await settle(pilot, app)
            assert app.test == 7
            check_spotlight(app, CONTINUAL)

    asyncio.run(go())


# Regression (fixed in the app): RankingTable.show() rebuilds the table on every refresh_views()
# (each arriving layer result, tab switch, b / g / r). With auto-width columns, a DataTable sizes
# them to new rows only on its next Idle, and cells drawn before then stayed cached, so a frame
# drawn in between left the ranking with label-wide columns ("digits 5-9" shown as "digi") until
# the next change (seen in a real run and as flaky snapshots). Reproduced here at will.
def test_ranking_columns_fit_their_cells_after_a_refresh() -> None:
    async def go() -> None:
        app, _ = new_app(CONTINUAL)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            table = app.query_one("#spot-table", RankingTable)
            first = lambda: "".join(seg.text for seg in table.render_line(1))  # noqa: E731  (line 0: header)
            assert "digits 5-9" in first()
            app.refresh_views()  # what each arriving layer result, tab switch, b / g / r does
            first()  # a frame drawn before the table's Idle
            await pilot.pause()
            await pilot.pause(0.2)
            assert "digits 5-9" in first(), first()

    asyncio.run(go())


# ----------------------------------------------------------------------------- spotlight keys
def test_spotlight_keys_match_cli_each_time() -> None:
    async def go() -> None:
        app, _ = new_app(CONTINUAL, test=5, layer="net.2")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            check_spotlight(app, CONTINUAL)
            steps = [
                ("right_square_bracket", dict(layer="net.4")),
                ("right_square_bracket", dict(layer="net.0")),  # wraps around
                ("left_square_bracket", dict(layer="net.4")),
                ("b", dict(by="cosine")),
                ("b", dict(by="attention")),
                ("g", dict(group="example")),
                ("r", dict(reverse=True)),
                ("left_square_bracket", dict(layer="net.2")),
                ("b", dict(by="magnitude")),
                ("g", dict(group="pattern")),
                ("n", dict(test=6)),
                ("p", dict(test=5)),
                ("p", dict(test=4)),
                ("r", dict(reverse=False)),
            ]
            for key, want in steps:
                await pilot.press(key)
                await settle(pilot, app)
                for attr, value in want.items():
                    assert getattr(app, attr) == value, (key, attr, state(app))
                check_spotlight(app, CONTINUAL)

    asyncio.run(go())


# ----------------------------------------------------------------------------- exports
def test_exports_equal_cli_output(tmp_path: Path) -> None:
    async def go() -> None:
        app, _ = new_app(SINGLE, tmp_path, test=3)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            for keys in ((), ("b", "b", "g", "r", "left_square_bracket")):  # as opened; attention/example/reverse/net.2
                await pilot.press(*keys)
                await settle(pilot, app)
                check_spotlight(app, SINGLE)
                await pilot.press("x", "X")
                await pilot.pause()
                for ext in ("csv", "json"):
                    path = app.export_path(ext)
                    assert path.parent == tmp_path and path.is_file(), sorted(tmp_path.iterdir())
                    assert path.read_text() == cli_stdout(SINGLE, *state(app), 100, ext), path.name
            d = json.loads(app.export_path("json").read_text())
            assert len(d["results"]) == 100 and (d["by"], d["group"], d["reverse"]) == ("attention", "example", True)

            await pilot.press("s")
            await pilot.pause()
            svgs = list(tmp_path.glob("*.svg"))
            assert len(svgs) == 1, sorted(tmp_path.iterdir())
            svg = svgs[0].read_text()
            assert svg.lstrip().startswith("<svg") and svg.rstrip().endswith("</svg>")
            plain = svg.replace("&#160;", " ")
            assert "lowest first" in plain and "net.2" in plain  # the spotlight's header, as shown
            assert len(list(tmp_path.iterdir())) == 5  # 2 × (csv, json) + 1 svg, nothing else

    asyncio.run(go())


# ----------------------------------------------------------------------------- help, palette, quit
def test_help_palette_and_quit() -> None:
    async def go() -> None:
        app, _ = new_app(SINGLE, test=3)
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            main = app.screen
            await pilot.press("question_mark")
            await pilot.pause()
            assert isinstance(app.screen, HelpScreen)
            text = screen_text(app)
            assert "escape to close" in text and "scroll" in text  # the hint, on the border
            await pilot.press("end")  # the help scrolls with the keyboard at once
            await pilot.pause()
            text = screen_text(app)
            assert "primal−dual" in text and "escape to close" in text
            await pilot.press("escape")
            await pilot.pause()
            assert app.screen is main

            assert app.by == "effect"  # the default: what each pattern did to this prediction
            await pilot.press("ctrl+p")
            await pilot.pause()
            assert isinstance(app.screen, CommandPalette)
            await pilot.press(*"score: attention")
            commands = app.screen.query_one(CommandList)
            for _ in range(100):  # the palette searches asynchronously
                if commands.option_count and commands.highlighted is not None:
                    break
                await pilot.pause(0.05)
            assert "score: attention" in str(commands.get_option_at_index(commands.highlighted).prompt)
            await pilot.press("enter")
            await settle(pilot, app)
            assert app.screen is main
            assert app.by == "attention"
            check_spotlight(app, SINGLE)

            await pilot.press("q")
            await pilot.pause()
        assert not app.is_running
        assert app.return_code == 0

    asyncio.run(go())


# ----------------------------------------------------------------------------- `dualtui open` errors
@pytest.fixture
def no_app(monkeypatch: pytest.MonkeyPatch) -> list:
    """`dualtui open` must fail before any screen: if it ever starts the app, record it instead of hanging."""
    started: list = []
    monkeypatch.setattr(DualtuiApp, "run", lambda self, *a, **k: started.append(self))
    return started


def open_fails(args: list[str], code: int) -> str:
    r = runner.invoke(cli_app, ["open", *args])
    assert r.exit_code == code, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualtui: error: "), r.stderr
    return lines[0]


def test_open_invalid_bundle_exits_3_with_one_line(tmp_path: Path, no_app: list) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x07not a bundle at all" * 10)
    line = open_fails([str(garbage)], 3)
    assert "garbage.safetensors" in line
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(SINGLE.read_bytes()[:4096])
    assert "truncated.safetensors" in open_fails([str(truncated)], 3)
    open_fails([str(tmp_path / "missing.safetensors")], 3)
    assert no_app == []


def test_open_unknown_layer_or_test_out_of_range_exits_2(no_app: list) -> None:
    line = open_fails([str(SINGLE), "--layer", "net.9"], 2)
    assert "net.9" in line and "net.0, net.2, net.4" in line
    n = Bundle.open(SINGLE).test_size
    assert f"0..{n - 1}" in open_fails([str(SINGLE), "--test", str(n)], 2)
    open_fails([str(SINGLE), "--test", "-1"], 2)
    assert no_app == []


# ----------------------------------------------------------------------------- `dualtui open` starts the app
# Regression (fixed in the app): DualtuiApp kept its OpenRun as `self.run`, shadowing textual's
# App.run(), so `dualtui open` died at once with "TypeError: 'OpenRun' object is not callable".
# run_test() never calls run(): only this test and tests/test_tui_tmux.py can see it.
def test_open_starts_the_app_on_the_asked_test_and_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[DualtuiApp] = []

    async def fake_run_async(self, *args, **kwargs):  # no terminal here: record instead of drawing
        started.append(self)

    monkeypatch.setattr(DualtuiApp, "run_async", fake_run_async)
    r = runner.invoke(cli_app, ["open", str(SINGLE), "--test", "3", "--layer", "net.2"])
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert r.exit_code == 0, r.output
    assert len(started) == 1
    assert (started[0].test, started[0].layer) == (3, "net.2")


# ----------------------------------------------------------------------------- text runs
TEXT = ROOT / "sample_runs" / "text-docstrings.safetensors"


def test_text_run_groupings_previews_and_exports_match_cli(tmp_path: Path) -> None:
    """The language-model sample: `g` cycles pattern → example → training token (position),
    every ranking is the CLI's, the previews show the test context with its prediction and the
    training window with the attended token and the token it was trained to predict, and the
    exports carry the same training text as `dualtui rank --csv/--json`."""
    async def go() -> None:
        app, run = new_app(TEXT, tmp_path, test=3, layer="blocks.0.up")
        assert run.groups == ("pattern", "example", "position")
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot, app)
            check_spotlight(app, TEXT)
            vocab = run.vocab()
            windows = run.bundle.array("train/input")
            for key, group in (("g", "example"), ("g", "position"), ("b", "position"), ("g", "pattern")):
                await pilot.press(key)
                await settle(pilot, app)
                assert app.group == group
                check_spotlight(app, TEXT)
                table = app.query_one("#spot-table", RankingTable)
                row = table.ranked_rows[0]
                # the selected row's training window: attended token highlighted, its target marked
                train = app.query_one("#spot-train")
                assert train.highlight == row.position
                if row.position is not None:
                    assert train.target == row.position + 1
                    assert row.label == int(windows[row.example, row.position + 1])  # the next token's id
                    cells = [str(c) for c in table.get_row_at(0)]
                    snippet = vocab[int(windows[row.example, row.position])]
                    assert any(snippet in c and "▸" in c for c in cells), cells
                await pilot.press("x", "X")
                await pilot.pause()
                for ext in ("csv", "json"):
                    assert app.export_path(ext).read_text() == cli_stdout(TEXT, *state(app), 100, ext)
            # the test item: its context with the query position highlighted, the prediction after it
            test_preview = app.query_one("#spot-test")
            assert test_preview.highlight == run.context - 1
            assert test_preview.suffix[0] == run.classes[run.test_item(3).prediction]
            text = screen_text(app)
            ctx = "".join(vocab[i] for i in run.bundle.array("queries/test/input")[3][: run.context])
            assert ctx[-8:].replace("\n", "⏎") in text.replace("\n", "")

    asyncio.run(go())
