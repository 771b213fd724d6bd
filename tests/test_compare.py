"""Two items side by side (engine/compare.py, `dualtui compare`, the Compare tab) against a
brute force: per-example sums from the float64 matrices of tests/bruteforce_v1.py, tops by
sorting, Jaccard by sets, Spearman's ρ by scipy, task and class shares by bincount."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr
from typer.testing import CliRunner

from bruteforce_v1 import Brute, make, write

from dualtui.bundle import Bundle
from dualtui.cli import app as cli_app
from dualtui.engine.compare import compare, ranks_with_ties, spearman

ROOT = Path(__file__).resolve().parents[1]
CONTINUAL = ROOT / "sample_runs" / "digits-continual.safetensors"
runner = CliRunner()


@pytest.fixture(scope="module", params=[("mlp", "float32", "chunked"), ("lm", "bfloat16", "sharded")],
                ids=lambda c: "-".join(c))
def built(request, tmp_path_factory):
    vb = make(*request.param, seed=11)
    path = write(vb, tmp_path_factory.mktemp("cmp") / "run.safetensors", request.param[2])
    return Bundle.open(path), Brute.from_valid(vb)


def brute_compare(bf: Brute, L: str, a: int, b: int, by: str, top: int) -> dict:
    sums, scales, count = bf.example_sums(L)
    seen = np.nonzero(count > 0)[0]
    tops = []
    for m in (a, b):
        s = sums[by][seen, m]
        order = sorted(range(len(seen)), key=lambda i: (-s[i], seen[i]))  # highest first, ties by index
        tops.append([int(seen[i]) for i in order[:top]])
    inter, union = set(tops[0]) & set(tops[1]), set(tops[0]) | set(tops[1])
    lay = bf.layers[L]
    task_share = []
    for m in (a, b):
        w = np.abs(lay.scores()["attention"][:, m])
        t = np.bincount(bf.train_task[lay.example], weights=w, minlength=bf.n_tasks)
        task_share.append(t / w.sum())
    return {"tops": tops, "jaccard": len(inter) / len(union), "spearman": spearmanr(sums[by][seen, a], sums[by][seen, b]).statistic,
            "scales": scales[by][seen], "task_share": task_share, "examples": len(seen)}


@pytest.mark.parametrize("by", ["effect", "attention", "cosine"])
def test_compare_matches_brute_force(built, by) -> None:
    bundle, bf = built
    for L in bundle.manifest.layer_names:
        for a, b in ((0, 1), (2, 0), (3, 3)):
            c = compare(bundle, L, a, b, by=by, top=4, device="cpu")
            want = brute_compare(bf, L, a, b, by, 4)
            assert c.examples == want["examples"]
            for j, m in enumerate((a, b)):
                # ties within float32 noise may order differently: compare the scores at each rank
                sums = bf.example_sums(L)[0][by][:, m]
                tol = 1e-5 * float(np.max(bf.example_sums(L)[1][by][:, m])) + 1e-12
                np.testing.assert_allclose(sums[c.tops[j]], sums[want["tops"][j]], atol=tol, rtol=0)
                np.testing.assert_allclose(c.task_share[j], want["task_share"][j], atol=1e-5)
            if a == b:
                assert c.shared == c.tops[0] and c.jaccard == 1.0 and c.spearman == pytest.approx(1.0)
            else:
                assert c.jaccard == pytest.approx(want["jaccard"]) or set(c.tops[0]) != set(want["tops"][0])
                assert c.spearman == pytest.approx(want["spearman"], abs=1e-3)


def test_spearman_with_ties_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = rng.integers(0, 5, 50).astype(float)  # many ties
        b = a + rng.integers(0, 3, 50)
        assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-12)
    np.testing.assert_array_equal(ranks_with_ties(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))  # a constant score has no order


def test_cli_compare_json_csv_table_and_errors() -> None:
    r = runner.invoke(cli_app, ["compare", str(CONTINUAL), "-t", "2", "-w", "0", "-k", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert [it["item"] for it in d["items"]] == [2, 0] and d["layer"] == "net.4" and d["by"] == "effect"
    # each item's top is exactly `rank --group example` for that item
    for it in d["items"]:
        rk = json.loads(runner.invoke(cli_app, ["rank", str(CONTINUAL), "-t", str(it["item"]), "--group", "example",
                                                "--by", "effect", "-k", "5", "--json"]).stdout)
        assert [r["example"] for r in it["top"]] == [r["example"] for r in rk["results"]]
        np.testing.assert_allclose([r["score"] for r in it["top"]], [r["score"] for r in rk["results"]], rtol=1e-6)  # float32 blocks of 1 vs 2 items
        assert sum(it["task_share"]) == pytest.approx(1.0) and sum(it["class_share"]) == pytest.approx(1.0)
    tops = [{r["example"] for r in it["top"]} for it in d["items"]]
    assert d["jaccard"] == pytest.approx(len(tops[0] & tops[1]) / len(tops[0] | tops[1]))
    assert set(d["shared"]) == tops[0] & tops[1]
    csv = runner.invoke(cli_app, ["compare", str(CONTINUAL), "-t", "2", "-w", "0", "-k", "5", "--csv"])
    assert csv.exit_code == 0 and len(csv.stdout.strip().splitlines()) == 1 + 10
    table = runner.invoke(cli_app, ["compare", str(CONTINUAL), "-t", "2", "-w", "0", "-k", "5"])
    assert table.exit_code == 0 and "Jaccard" in table.stdout and "Spearman" in table.stdout
    for bad in (["-t", "2", "-w", "99999"], ["-t", "2", "-w", "0", "-l", "nope"], ["-t", "2", "-w", "0", "-k", "0"]):
        r = runner.invoke(cli_app, ["compare", str(CONTINUAL), *bad])
        assert r.exit_code == 2, (bad, r.output)
        assert "Traceback" not in r.output


def shown(app) -> str:
    """The Compare tab's text (what its Static shows, printed)."""
    import io

    from rich.console import Console

    console = Console(width=120, file=io.StringIO(), record=True)
    console.print(app.query_one("#compare-pane").build(app.state))  # what the pane's Static was given
    return console.export_text()


def test_compare_tab_shows_the_cli_numbers(tmp_path) -> None:
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    want = json.loads(runner.invoke(cli_app, ["compare", str(CONTINUAL), "-t", "2", "-w", "0", "-k", "10", "--json"]).stdout)

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(CONTINUAL)), export_dir=tmp_path)
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            await pilot.press("7")
            await pilot.pause()
            body = shown(app)
            assert "press c" in body.lower()  # how to pick the second item
            await pilot.press("c", "n", "n")  # pin item 0, spotlight item 2
            while any(not w.is_finished for w in app.workers):
                await app.workers.wait_for_complete()
            await pilot.pause()
            assert (app.test, app.other) == (2, 0)
            body = shown(app)
            assert f"Jaccard {want['jaccard']:.3f}" in body
            assert f"Spearman ρ {want['spearman']:.3f}" in body
            assert f"over {want['examples']:,} training examples" in body
            for it in want["items"]:
                for r in it["top"]:
                    assert f"{r['example']}" in body

    asyncio.run(go())


def test_open_compare_option(tmp_path) -> None:
    r = runner.invoke(cli_app, ["open", str(CONTINUAL), "--compare", "99999", "--export-dir", str(tmp_path)])
    assert r.exit_code == 2 and "out of range" in r.output  # before any screen

    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(CONTINUAL)), test=2, other=0, export_dir=tmp_path)
        async with app.run_test(size=(100, 30)) as pilot:
            while any(not w.is_finished for w in app.workers):
                await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.layer in app.state.other_results  # the second item's spotlight is there at start
            assert "Jaccard" in shown(app)

    asyncio.run(go())
