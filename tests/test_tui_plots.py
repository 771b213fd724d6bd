"""The app's plots hold the numbers the CLI prints: the Tasks tab's mass over time equals
`dualtui mass --json`'s step bins, the Curve tab's curve is the engine's (brute-forced in
test_score_curve.py), on a log or linear rank axis; ticks are round and never share a row."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from textual_plot import PlotWidget
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app as cli_app
from dualtui.tui.app import DualtuiApp
from dualtui.tui.model import OpenRun
from dualtui.tui.widgets.axes import LogRanks, ShortNumbers, rank_label, tick_label
from dualtui.tui.widgets.mass_plot import staircase

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = ROOT / "sample_runs" / "digits-continual.safetensors"
runner = CliRunner()


def lines(plot: PlotWidget) -> list:
    return [d for d in plot._datasets]  # textual-plot keeps what was plotted, in order


async def settled(app, pilot) -> None:
    while any(not w.is_finished for w in app.workers):
        await app.workers.wait_for_complete()
    await pilot.pause()


def test_tasks_tab_plots_the_mass_json_step_bins(tmp_path) -> None:
    d = json.loads(runner.invoke(cli_app, ["mass", str(CONTINUAL), "-t", "0", "--json"]).stdout)
    bins = [b for b in d["steps"] if b["layer"] == "net.4"]
    edges = np.array([b["step_start"] for b in bins] + [bins[-1]["step_end"]], dtype=float)

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(CONTINUAL)), export_dir=tmp_path)
        async with app.run_test(size=(100, 40)) as pilot:
            await settled(app, pilot)
            await pilot.press("5")
            await pilot.pause()
            for pid, key in (("#mass-abs", "abs_sum"), ("#mass-effect", "effect_sum")):
                data = lines(app.query_one(pid, PlotWidget))[-1]  # the bins (the effect plot draws zero first)
                x, y = staircase(edges, np.array([b[key] for b in bins]))
                np.testing.assert_array_equal(data.x, x)
                np.testing.assert_allclose(data.y, y, rtol=1e-12)
                vlines = [v.x for v in app.query_one(pid, PlotWidget)._v_lines]
                assert vlines == [float(s) for s, _ in OpenRun(Bundle.open(CONTINUAL)).task_boundaries()]
            head = str(app.query_one("#tasks-head").render())
            assert "digits 5-9 from step" in head  # the phase marks are named

    asyncio.run(go())


def test_curve_tab_plots_the_engine_curve_and_toggles_log(tmp_path) -> None:
    async def go() -> None:
        run = OpenRun(Bundle.open(CONTINUAL))
        app = DualtuiApp(run, export_dir=tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            await settled(app, pilot)
            await pilot.press("6")
            await pilot.pause()
            curve = app.results[app.layer].curves[(app.by, app.group)]
            assert curve.total == run.bundle.layer_spec(app.layer).patterns  # every pattern was sorted
            plot = app.query_one("#curve-plot", PlotWidget)
            data = lines(plot)[-1]
            np.testing.assert_array_equal(data.y, curve.values)
            np.testing.assert_allclose(data.x, np.log10(curve.ranks))  # log rank axis by default
            assert f"{curve.total:,} ranked" in str(app.query_one("#curve-head").render())
            await pilot.press("l")
            await pilot.pause()
            np.testing.assert_array_equal(lines(plot)[-1].x, curve.ranks.astype(float))
            await pilot.press("g")  # per example: the curve over examples
            await pilot.pause()
            c2 = app.results[app.layer].curves[(app.by, "example")]
            np.testing.assert_array_equal(lines(plot)[-1].y, c2.values)
            assert c2.total == int((app.results[app.layer].example_patterns > 0).sum())

    asyncio.run(go())


@pytest.mark.parametrize("lo,hi", [(-2.05, 7.08), (0, 27000), (-0.12, 0.7), (-3e-5, 1e-4), (5.0, 5.5)])
def test_ticks_are_round_and_few(lo, hi) -> None:
    f = ShortNumbers(most=4)
    ticks = [t for t in f.get_ticks(lo, hi) if lo <= t <= hi]
    assert 1 <= len(ticks) <= 4
    labels = f.get_labels_for_ticks(ticks)
    assert all(len(s) <= 7 for s in labels) and "-0" not in labels
    assert all(float(s) == pytest.approx(t, rel=1e-3, abs=1e-12) for s, t in zip(labels, ticks))


def test_log_rank_ticks() -> None:
    f = LogRanks()
    t = f.get_ticks(0.0, np.log10(8622))
    assert f.get_labels_for_ticks(t) == ["1", "10", "100", "1k"]
    assert [rank_label(r) for r in (1, 20, 1500, 2_000_000)] == ["1", "20", "1.5k", "2M"]
    assert tick_label(-0.0) == "0" and tick_label(0.0015) == "0.0015" and tick_label(5e-5) == "5e-05"
