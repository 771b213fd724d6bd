"""`dualtui compare RUN_A RUN_B` and `dualtui flow`, recomputed by brute force in numpy (and
scipy's Spearman) from the stored tensors of small digits runs: per-example effect sums,
top-k sets, Jaccard, ρ over the examples both runs trained on, the learned share, the mass
per class, and which examples enter and leave the top-k from layer to layer."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from scipy.stats import spearmanr
from typer.testing import CliRunner

from dualtui.cli import app
from dualtui.record.digits import record_digits

runner = CliRunner()
LAYERS = ("net.0", "net.2", "net.4")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("runs")
    return {name: record_digits(folder / f"{name}.safetensors", setting, epochs=1, hidden=12, init_scale=scale).path
            for name, setting, scale in (("small", "single", 0.5), ("large", "single", 2.0),
                                         ("multitask", "multitask", 1.0), ("continual", "continual", 1.0))}


def cli(*args: object) -> dict:
    r = runner.invoke(app, [str(a) for a in args] + ["--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


class Brute:
    def __init__(self, path: Path):
        self.t = load_file(str(path))

    def scores(self, layer: str, item: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Per training example: Σ effect over its patterns, its pattern count; and the item's terms."""
        t = self.t
        k, v = t[f"layer/{layer}/keys"].astype(np.float64), t[f"layer/{layer}/values"].astype(np.float64)
        ex = t[f"layer/{layer}/example"]
        q = t[f"queries/test/layer/{layer}/query"][item].astype(np.float64)
        g = t[f"queries/test/layer/{layer}/grad"][item].astype(np.float64)
        alpha = k @ q + 1.0
        n = len(t["train/label"])
        effect = np.bincount(ex, weights=alpha * (v @ g), minlength=n)
        count = np.bincount(ex, minlength=n)
        w0, b0 = t[f"layer/{layer}/w0"].astype(np.float64), t[f"layer/{layer}/b0"].astype(np.float64)
        learned = np.linalg.norm(alpha @ v)
        initial = np.linalg.norm(w0 @ q + b0)
        cls = np.bincount(t["train/label"][ex], weights=np.abs(alpha), minlength=10)
        return effect, count, {"learned_share": learned / (learned + initial), "class_share": cls / cls.sum(),
                               "effective": np.abs(alpha).sum() ** 2 / (alpha ** 2).sum()}


def top(scores: np.ndarray, seen: np.ndarray, k: int) -> list[int]:
    idx = np.nonzero(seen)[0]
    return [int(i) for i in idx[np.lexsort((idx, -scores[idx]))][:k]]


def test_compare_runs_matches_brute_force(runs) -> None:
    a, b = Brute(runs["small"]), Brute(runs["large"])
    for item in (0, 7):
        d = cli("compare", runs["small"], runs["large"], "--test", item, "--top", 5)
        assert d["items"] == [item]
        for row in d["layers"]:
            L = row["layer"]
            ea, ca, ta = a.scores(L, item)
            eb, cb, tb = b.scores(L, item)
            both = (ca > 0) & (cb > 0)
            ja, jb = set(top(ea, both, 5)), set(top(eb, both, 5))
            assert row["jaccard"] == pytest.approx(len(ja & jb) / len(ja | jb))
            assert row["spearman"] == pytest.approx(spearmanr(ea[both], eb[both]).statistic, abs=1e-6)
            assert row["examples"] == int(both.sum())
            assert row["a"]["learned_share"] == pytest.approx(ta["learned_share"], rel=1e-5)
            assert row["b"]["learned_share"] == pytest.approx(tb["learned_share"], rel=1e-5)
            assert row["a"]["effective_patterns"] == pytest.approx(ta["effective"], rel=1e-5)
            assert np.allclose(row["b"]["class_share"], tb["class_share"], atol=1e-6)


def test_compare_runs_over_every_item_is_the_mean(runs) -> None:
    d = cli("compare", runs["multitask"], runs["continual"], "--layer", "net.4")
    row = d["layers"][0]
    assert d["items"] == 360 and len(row["per_item"]) == 360
    assert row["jaccard"] == pytest.approx(np.mean([p["jaccard"] for p in row["per_item"]]))
    one = cli("compare", runs["multitask"], runs["continual"], "--layer", "net.4", "--test", 11)["layers"][0]
    assert one["jaccard"] == pytest.approx(row["per_item"][11]["jaccard"])
    assert one["spearman"] == pytest.approx(row["per_item"][11]["spearman"])
    assert len(row["a"]["task_share"]) == 2 and sum(row["a"]["task_share"]) == pytest.approx(1.0)
    t = load_file(str(runs["continual"]))  # own-task share, by brute force: Σ|α| on each item's own task ÷ Σ|α|
    k, ex = t["layer/net.4/keys"].astype(np.float64), t["layer/net.4/example"]
    a = np.abs(k @ t["queries/test/layer/net.4/query"].astype(np.float64).T + 1.0)  # [patterns, items]
    own = a * (t["train/task"][ex][:, None] == t["queries/test/task"][None, :])
    assert row["b"]["own_task_share"] == pytest.approx(float(np.mean(own.sum(0) / a.sum(0))), rel=1e-6)
    table = runner.invoke(app, ["compare", str(runs["multitask"]), str(runs["continual"]), "--layer", "net.4"]).stdout
    assert "Jaccard" in table and "run A / run B" in table


def test_compare_runs_refuses_different_data(runs) -> None:
    r = runner.invoke(app, ["compare", str(runs["small"]), str(runs["multitask"])])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "tasks" in r.stderr
    r = runner.invoke(app, ["compare", str(runs["small"]), str(runs["large"]), "--with", "3"])
    assert r.exit_code == 2 and "--with" in r.stderr
    r = runner.invoke(app, ["compare", str(runs["small"]), "--test", "1"])
    assert r.exit_code == 2 and "--with" in r.stderr


def test_flow_matches_brute_force(runs) -> None:
    bf = Brute(runs["multitask"])
    for item in (2, 30):
        d = cli("flow", runs["multitask"], "--test", item, "--top", 6)
        tops = {}
        for L in LAYERS:
            effect, count, _ = bf.scores(L, item)
            tops[L] = top(effect, count > 0, 6)
        assert d["tops"] == tops
        for step, (lo, hi) in zip(d["steps"], zip(LAYERS, LAYERS[1:])):
            assert (step["below"], step["above"]) == (lo, hi)
            assert step["entered"] == [e for e in tops[hi] if e not in tops[lo]]
            assert step["left"] == [e for e in tops[lo] if e not in tops[hi]]
            assert step["kept"] == [e for e in tops[hi] if e in tops[lo]]
            assert step["mean_new_share"] == pytest.approx(len(step["entered"]) / 6)
    every = cli("flow", runs["multitask"], "--top", 6)
    first = every["steps"][0]
    shares = []
    for item in range(360):
        e0, c0, _ = bf.scores("net.0", item)
        e2, c2, _ = bf.scores("net.2", item)
        lo, hi = set(top(e0, c0 > 0, 6)), top(e2, c2 > 0, 6)
        shares.append(len([e for e in hi if e not in lo]) / 6)
    assert first["items"] == 360 and first["mean_new_share"] == pytest.approx(np.mean(shares))


def test_app_layers_tab_shows_the_flow(runs) -> None:
    """Tab 4: the same enter / leave lists as `dualtui flow --test` (by the app's current score)."""
    import asyncio

    from dualtui.bundle import Bundle
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun
    from dualtui.tui.panes.layers import LayersPane

    want = cli("flow", runs["multitask"], "--test", 0, "--top", 10)

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(runs["multitask"])))
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.press("4")
            for _ in range(3):  # every layer's spotlight (the app computes the others after the first)
                await app.workers.wait_for_complete()
                await pilot.pause()
            assert app.state.by == "effect" and app.state.test == 0
            text = "\n".join(str(getattr(r, "plain", r)) for r in app.query_one(LayersPane).build(app.state).renderables)
            for step in want["steps"]:
                line = next(ln for ln in text.splitlines() if ln.startswith(f"{step['below']} → {step['above']}"))
                assert f"{len(step['kept'])} stay" in line
                assert f"enter {' '.join(map(str, step['entered'])) or '-'}" in line
                assert f"leave {' '.join(map(str, step['left'])) or '-'}" in line

    asyncio.run(go())


def test_app_runs_tab_compares_two_runs(runs) -> None:
    """open RUN_A --against RUN_B: tab 8 shows `compare RUN_A RUN_B --test M` for the item spotlit."""
    import asyncio

    from dualtui.bundle import Bundle
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun
    from dualtui.tui.panes.runs import RunsPane

    want = cli("compare", runs["multitask"], runs["continual"], "--test", 3)["layers"]

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(runs["multitask"])), test=3, against=Bundle.open(runs["continual"]))
        async with app.run_test(size=(140, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.press("8")
            await app.workers.wait_for_complete()
            await pilot.pause()
            pane = app.query_one(RunsPane)
            rows = pane.cache[(pane.run.queries_name, 3, "effect")]
            for got, w in zip(rows, want):
                assert got.layer == w["layer"]
                assert got.jaccard == pytest.approx(w["jaccard"]) and got.spearman == pytest.approx(w["spearman"])
                assert got.a.learned_share == pytest.approx(w["a"]["learned_share"])
            from rich.console import Console

            console = Console(record=True, width=140, file=io.StringIO())
            console.print(pane.build(app.state))
            shown = console.export_text()
            assert "Jaccard" in shown and f"{want[-1]['jaccard']:.3f}" in shown

    asyncio.run(go())
    r = runner.invoke(app, ["open", str(runs["small"]), "--against", str(runs["multitask"])])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "--against" in r.stderr
