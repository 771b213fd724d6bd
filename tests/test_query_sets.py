"""Query sets: several named sets in one bundle, selectable in every command and in the app.

The numbers are checked against a brute force over the stored tensors (attention = k·q + 1 of
the set's own query rows), never against the engine's earlier output.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app as cli_app
from dualtui.record import Recorder

runner = CliRunner()


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    path = tmp_path_factory.mktemp("sets") / "two.safetensors"
    with Recorder(model, opt, path, classes=["a", "b", "c"], train_inputs=X.numpy(), train_labels=Y) as rec:
        for s in range(12):
            ids = torch.randperm(40, generator=g)[:8]
            with rec.batch(example=ids):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
        rec.record_test(torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g))
        rec.record_test(X[:4], Y[:4], name="train-subset", examples=torch.arange(4))
        rec.record_test(3 + torch.randn(5, 5, generator=g), torch.zeros(5, dtype=torch.long), name="ood")
    return path


def cli(*args) -> tuple[int, str, str]:
    r = runner.invoke(cli_app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def test_info_lists_every_set(two_sets: Path) -> None:
    code, out, _ = cli("info", two_sets, "--json")
    d = json.loads(out)
    assert [(q["name"], q["items"]) for q in d["query_sets"]] == [("test", 6), ("train-subset", 4), ("ood", 5)]
    assert all(q["bytes"] > 0 and q["rows"] == "all" for q in d["query_sets"])
    code, out, _ = cli("info", two_sets)
    assert "query set 'ood': 5 items, one query row per item" in out
    b = Bundle.open(two_sets)
    np.testing.assert_array_equal(b.queries("train-subset").array("example"), np.arange(4))


@pytest.mark.parametrize("name", ["test", "ood", "train-subset"])
def test_rank_uses_the_named_set(two_sets: Path, name: str) -> None:
    b = Bundle.open(two_sets)
    keys = np.concatenate([c.keys for c in b.chunks("2")]).astype(np.float64)
    q = b.array(f"queries/{name}/layer/2/query").astype(np.float64)
    m = 1
    alpha = keys @ q[m] + 1.0
    code, out, err = cli("rank", two_sets, "-t", m, "--queries", name, "-k", 5, "--by", "attention", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["queries"] == name
    assert d["test_label"] == int(b.array(f"queries/{name}/label")[m])
    np.testing.assert_allclose([r["score"] for r in d["results"]], np.sort(alpha)[::-1][:5], rtol=1e-6)
    for cmd in ("mass", "layers"):
        code, out, err = cli(cmd, two_sets, "-t", m, "--queries", name, "--json")
        assert code == 0 and json.loads(out)["queries"] == name, err
    code, out, err = cli("votes", two_sets, "--queries", name, "--json")
    assert code == 0, err
    v = json.loads(out)
    assert v["queries"] == name and all(r["test_items"] == b.queries(name).size for r in v["layers"])


def test_a_bad_set_or_item_is_a_usage_error(two_sets: Path) -> None:
    code, _, err = cli("rank", two_sets, "-t", 0, "--queries", "nope")
    assert code == 2 and err.strip() == "dualtui: error: unknown query set 'nope'; valid: test, train-subset, ood"
    code, _, err = cli("rank", two_sets, "-t", 4, "--queries", "train-subset")
    assert code == 2 and "item 4 out of range; query set 'train-subset' has 0..3" in err
    code, _, err = cli("open", two_sets, "--queries", "nope")
    assert code == 2 and "unknown query set 'nope'" in err


def test_a_version_1_bundle_reads_as_one_test_set(tmp_path: Path) -> None:
    import bruteforce_v1 as bfv

    vb = bfv.make("mlp", "float32", "single", 0)
    path = bfv.write(vb, tmp_path / "v1.safetensors", "single")
    b = Bundle.open(path)
    assert b.manifest.version == 1 and b.query_set_names == ["test"]
    code, out, err = cli("info", path, "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["attribution"]["checked"] is False and "version 1" in d["attribution"]["reason"]
    code, out, err = cli("verify", path)
    assert code == 0 and "recorded before the attribution check existed" in out


def test_the_app_switches_query_set(two_sets: Path, tmp_path: Path) -> None:
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(two_sets)), export_dir=tmp_path)
        async with app.run_test(size=(110, 32)) as pilot:
            while any(not w.is_finished for w in app.workers):
                await app.workers.wait_for_complete()
            assert app.open_run.queries_name == "test" and app.open_run.test_size == 6
            await pilot.press("Q")
            while any(not w.is_finished for w in app.workers):
                await app.workers.wait_for_complete()
            await pilot.pause()
            assert app.open_run.queries_name == "train-subset" and app.test == 0
            assert app.query_one("#tests-table").row_count == 4
            spot = app.results[app.layer]
            code, out, _ = cli("rank", two_sets, "-t", 0, "--queries", "train-subset", "-l", app.layer, "-k", 5, "--by", "attention",
                               "--json")
            want = [(r["pattern"], r["score"]) for r in json.loads(out)["results"]]
            got = [(r.pattern, r.score) for r in spot.ranked[("attention", "pattern", False)][:5]]
            assert got == want
            await pilot.press("x")
            await pilot.pause()
            exported = app.export_path("csv")
            assert "train-subset0" in exported.name and exported.exists()

    asyncio.run(go())
