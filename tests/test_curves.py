"""`dualtui curves` (engine/group_curves.py), recomputed by brute force in numpy from the
stored tensors of a two-task digits run: each (task, class) group's sorted top-k attention and
the steps of those patterns, Σα and Σ|α| per group, and the per-example totals' quantiles and
histogram; the plot is a real image; bad options are one-line errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from dualtui.cli import app
from dualtui.record.digits import record_digits

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return record_digits(tmp_path_factory.mktemp("curves") / "c.safetensors", "continual", epochs=2, hidden=10).path


def brute(path: Path, layer: str, item: int, by: str) -> dict:
    t = load_file(str(path))
    k, v = t[f"layer/{layer}/keys"].astype(np.float64), t[f"layer/{layer}/values"].astype(np.float64)
    ex, step = t[f"layer/{layer}/example"], t[f"layer/{layer}/step"]
    q = t[f"queries/test/layer/{layer}/query"][item].astype(np.float64)
    g = t[f"queries/test/layer/{layer}/grad"][item].astype(np.float64)
    alpha = k @ q + 1.0
    score = {"attention": alpha, "effect": alpha * (v @ g), "magnitude": np.abs(alpha) * np.linalg.norm(v, axis=1)}[by]
    group = t["train/task"][ex] * 10 + t["train/label"][ex]
    out = {}
    for gid in np.unique(group):
        mine = np.nonzero(group == gid)[0]
        order = mine[np.lexsort((mine, -score[mine]))]
        out[int(gid)] = {"scores": score[order], "steps": step[order], "attention_sum": alpha[mine].sum(),
                         "abs_sum": np.abs(alpha[mine]).sum(), "patterns": len(mine)}
    totals = np.bincount(ex, weights=score, minlength=len(t["train/label"]))[np.bincount(ex, minlength=len(t["train/label"])) > 0]
    return {"groups": out, "totals": totals}


@pytest.mark.parametrize("by,layer", [("attention", "net.4"), ("effect", "net.2"), ("magnitude", "net.0")])
def test_curves_match_brute_force(run: Path, by: str, layer: str) -> None:
    r = runner.invoke(app, ["curves", str(run), "-t", "4", "-l", layer, "--by", by, "--top", "50", "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    want = brute(run, layer, 4, by)
    assert len(d["groups"]) == len(want["groups"]) == 10  # tasks 0-4 and 5-9: each class in one task
    for gr in d["groups"]:
        w = want["groups"][gr["task"] * 10 + gr["class"]]
        assert gr["patterns"] == w["patterns"]
        assert np.allclose(gr["scores"], w["scores"][:50], rtol=1e-5, atol=1e-6)
        sc, n = w["scores"], min(50, len(w["scores"]))
        close = (np.isclose(sc[:n], np.r_[sc[1:], -np.inf][:n], rtol=1e-5)  # near-ties may swap places
                 | np.isclose(sc[:n], np.r_[np.inf, sc[:-1]][:n], rtol=1e-5))
        assert [s for s, c in zip(gr["steps"], close) if not c] == [int(s) for s, c in zip(w["steps"][:n], close) if not c]
        assert gr["attention_sum"] == pytest.approx(w["attention_sum"], rel=1e-5)
        assert gr["abs_sum"] == pytest.approx(w["abs_sum"], rel=1e-5)
    totals = d["example_totals"]
    assert totals["examples"] == len(want["totals"])
    for qname, value in totals["quantiles"].items():
        assert value == pytest.approx(float(np.quantile(want["totals"], float(qname))), rel=1e-5, abs=1e-7)
    assert sum(totals["histogram"]["counts"]) == len(want["totals"])


def test_csv_table_and_plot(run: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["curves", str(run), "-t", "1", "--top", "5", "--csv"]).stdout)))
    assert len(rows) == 10 * 5 and rows[0]["rank"] == "1" and set(rows[0]) == {"task", "class", "rank", "score", "step", "pattern"}
    table = runner.invoke(app, ["curves", str(run), "-t", "1", "--top", "100"]).stdout
    assert "digits 5-9 / 7" in table and "#100" in table and "(d) per-example totals" in table
    png = tmp_path / "fig.png"
    r = runner.invoke(app, ["curves", str(run), "-t", "1", "--plot", str(png)])
    assert r.exit_code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = tmp_path / "fig.svg"
    assert runner.invoke(app, ["curves", str(run), "-t", "1", "--plot", str(svg), "--json"]).exit_code == 0
    assert b"<svg" in svg.read_bytes()[:400]
    bad = runner.invoke(app, ["curves", str(run), "-t", "1", "--plot", str(tmp_path / "fig.pdf")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
    bad = runner.invoke(app, ["curves", str(run), "-t", "1", "--by", "cosine"])
    assert bad.exit_code == 2 and "attention" in bad.stderr
    bad = runner.invoke(app, ["curves", str(run), "-t", "1", "--plot", str(tmp_path / "missing" / "f.png")])
    assert bad.exit_code == 4 and bad.stderr.count("\n") == 1


def test_app_curve_tab_draws_one_curve_per_group(run: Path) -> None:
    """Tab 6, y: the same per-(task, class) curves in the app (the paper's main figure)."""
    import asyncio

    from dualtui.bundle import Bundle
    from dualtui.engine.group_curves import group_curves
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(run)))
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.press("6")
            await pilot.press("y")
            await app.workers.wait_for_complete()
            await pilot.pause()
            pane = app.query_one("CurvePane")
            legend = str(app.query_one("#curve-legend").render())
            assert app.query_one("#curve-groups").display and not app.query_one("#curve-plot").display
            assert "colour: class" in legend and "line: task" in legend and "digits 5-9" in legend
            key = pane._group_key(app.state)
            want = group_curves(Bundle.open(run), key[2], key[1], by=key[3], top=500)
            got = pane.groups_cache[key]
            assert [len(g.scores) for g in got.groups] == [len(g.scores) for g in want.groups]
            assert all(np.allclose(a.scores, b.scores) for a, b in zip(got.groups, want.groups))
            await pilot.press("y")
            await pilot.pause()
            assert not app.query_one("#curve-groups").display and app.query_one("#curve-plot").display

    asyncio.run(go())
