"""The reverse spotlight (`dualtui influence`), recomputed by brute force in numpy from the
stored tensors (read with safetensors' own reader, definitions from docs/format.md section 6),
and checked against the per-example scores of `dualtui rank --group example`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from dualtui.cli import app
from dualtui.cli import app as app_cli

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = {"digits": ROOT / "sample_runs" / "digits-continual.safetensors",
           "text": ROOT / "sample_runs" / "text-docstrings.safetensors"}
runner = CliRunner()


def brute(path: Path, layer: str, example: int) -> dict[str, np.ndarray]:
    """Every test item's scores from the example's patterns: α_{t,r} = k_t · q_r (+1 with a
    bias), attention at the item's focus row (mean over its rows for focus −1), magnitude
    |α| ‖v‖, effect Σ_r α_{t,r} (v_t · g_r); summed over the example's patterns."""
    t = load_file(str(path))
    base = f"layer/{layer}/"
    chunks = sorted({k.split("/")[3] for k in t if k.startswith(base + "keys/")}) if base + "keys" not in t else [None]
    get = lambda f: np.concatenate([t[base + f + (f"/{c}" if c else "")] for c in chunks])  # noqa: E731
    keys, values, ex = get("keys").astype(np.float64), get("values").astype(np.float64), get("example")
    mine = ex == example
    k, v = keys[mine], values[mine]
    bias = base + "bias" in t
    qb = f"queries/test/layer/{layer}/"
    q, g = t[qb + "query"].astype(np.float64), t[qb + "grad"].astype(np.float64)
    item, focus = t[qb + "item"], t[qb + "focus"]
    M = len(t["queries/test/label"])
    out = {s: np.zeros(M) for s in ("attention", "magnitude", "effect", "cosine")}
    extra = 1.0 if bias else 0.0
    knorm = np.sqrt((k * k).sum(axis=1) + extra)
    for m in range(M):
        rows = np.nonzero(item == m)[0]
        a = k @ q[rows].T + extra  # [patterns, rows]
        f = int(focus[m])
        alpha = a[:, list(rows).index(f)] if f >= 0 else a.mean(axis=1)
        qf = q[f] if f >= 0 else q[rows].mean(axis=0)
        out["cosine"][m] = (alpha / (knorm * np.sqrt(qf @ qf + extra))).mean()
        out["attention"][m] = alpha.sum()
        out["magnitude"][m] = (np.abs(alpha) * np.linalg.norm(v, axis=1)).sum()
        out["effect"][m] = (a * (v @ g[rows].T)).sum()
    return out


@pytest.mark.parametrize("sample, layer, example", [("digits", "net.4", 431), ("digits", "net.0", 7),
                                                    ("text", "head", 3), ("text", "blocks.0.attn.q", 273)])
@pytest.mark.parametrize("by", ["effect", "attention", "magnitude", "cosine"])
def test_influence_equals_brute_force(sample, layer, example, by):
    path = SAMPLES[sample]
    want = brute(path, layer, example)
    r = runner.invoke(app, ["influence", str(path), "--example", str(example), "--layer", layer, "--by", by,
                            "--top", "5", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    (lay,) = d["layers"]
    s = want[by]
    top = list(np.lexsort((np.arange(len(s)), -s))[:5])
    bottom = list(np.lexsort((np.arange(len(s)), s))[:5])
    assert [x["item"] for x in lay["most"]] == top
    assert [x["item"] for x in lay["least"]] == bottom
    scale = max(1.0, float(np.abs(s).max()))
    for row in lay["most"] + lay["least"]:
        for score in ("attention", "magnitude", "effect", "cosine"):
            assert abs(row[score] - want[score][row["item"]]) <= 1e-5 * max(1.0, float(np.abs(want[score]).max())), score
    assert scale > 0


@pytest.mark.parametrize("sample, layer", [("digits", "net.4"), ("text", "head")])
def test_influence_is_the_example_score_of_rank_group_example(sample, layer):
    """For one item: `rank --group example` lists the example with the same per-example score."""
    path = SAMPLES[sample]
    r = runner.invoke(app, ["rank", str(path), "--test", "5", "--layer", layer, "--group", "example", "--by", "effect",
                            "--top", "3", "--json"])
    ranked = json.loads(r.stdout)["results"]
    for row in ranked:
        inf = json.loads(runner.invoke(app, ["influence", str(path), "--example", str(row["example"]), "--layer", layer,
                                             "--top", "400", "--json"]).stdout)["layers"][0]
        mine = [x for x in inf["most"] if x["item"] == 5]
        assert mine and abs(mine[0]["effect"] - row["effect"]) <= 1e-4 * max(1.0, abs(row["effect"]))


def test_influence_errors_are_one_line():
    path = SAMPLES["digits"]
    for args, code in ((["--example", "99999"], 2), (["--example", "0", "--layer", "nope"], 2),
                       (["--example", "0", "--queries", "nope"], 2)):
        r = runner.invoke(app, ["influence", str(path), *args])
        assert r.exit_code == code and len(r.output.strip().splitlines()) == 1, r.output
    r = runner.invoke(app, ["influence", str(path), "--example", "3", "--top", "2"])
    assert r.exit_code == 0 and "highest first" in r.output and "lowest first" in r.output
    r = runner.invoke(app, ["influence", str(path), "--example", "3", "--top", "2", "--csv"])
    assert r.exit_code == 0 and r.stdout.splitlines()[0].startswith("layer,end,rank,item")


def test_enter_on_a_ranked_row_opens_its_reverse_spotlight_in_the_app():
    import asyncio

    from dualtui.tui.influence_screen import InfluenceScreen
    from test_tui_pilot import new_app, settle

    path = SAMPLES["digits"]

    async def go():
        app, run = new_app(path, test=3)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("down", "enter")
            await pilot.pause()
            screen = app.screen
            assert isinstance(screen, InfluenceScreen)
            row = app.query_one("#spot-table").ranked_rows[1]
            assert screen.example == row.example and screen.layer_name == app.layer
            while screen.result is None:
                await app.workers.wait_for_complete()
                await pilot.pause()
            d = json.loads(runner.invoke(app_cli, ["influence", str(path), "--example", str(row.example), "--layer",
                                                   app.layer, "--by", app.by, "--top", "20", "--json"]).stdout)
            shown = screen.query_one("#influence-most")
            keys = [shown.coordinate_to_cell_key((i, 0)).row_key.value for i in range(shown.row_count)]
            assert keys == [str(x["item"]) for x in d["layers"][0]["most"]]
            await pilot.press("down", "enter")  # spotlight the second item listed
            await settle(pilot, app)
            assert not isinstance(app.screen, InfluenceScreen)
            assert app.test == d["layers"][0]["most"][1]["item"]
            assert app.query_one("#views").active == "spotlight"

    asyncio.run(go())
