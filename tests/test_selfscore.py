"""`dualtui self-scores` (engine/selfscore.py) recomputed by brute force in numpy from the
stored tensors: per training example, the effect of its own patterns on its own target logit,
the learned term from the weights, and at the last layer the identity logit = initial term +
own patterns + every other pattern."""

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
from dualtui.record.digits import load_digits_split, record_digits

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    rng = np.random.default_rng(3)
    labels = load_digits_split("single").y_train.numpy().copy()
    flip = rng.choice(len(labels), 40, replace=False)
    labels[flip] = (labels[flip] + rng.integers(1, 10, len(flip))) % 10  # a wrong label, never the right one
    path = tmp_path_factory.mktemp("self") / "d.safetensors"
    return record_digits(path, "single", epochs=2, hidden=16, train_queries=300, labels=labels).path


def brute(path: Path, layer: str) -> dict[str, np.ndarray]:
    t = load_file(str(path))
    k, v = t[f"layer/{layer}/keys"].astype(np.float64), t[f"layer/{layer}/values"].astype(np.float64)
    ex = t[f"layer/{layer}/example"]
    q = t[f"queries/train/layer/{layer}/query"].astype(np.float64)  # one row per item
    g = t[f"queries/train/layer/{layer}/grad"].astype(np.float64)
    items = t["queries/train/example"]
    own = np.array([sum((k[p] @ q[m] + 1.0) * (v[p] @ g[m]) for p in np.nonzero(ex == e)[0]) for m, e in enumerate(items)])
    W, w0 = t[f"layer/{layer}/weight"].astype(np.float64), t[f"layer/{layer}/w0"].astype(np.float64)
    b, b0 = t[f"layer/{layer}/bias"].astype(np.float64), t[f"layer/{layer}/b0"].astype(np.float64)
    learned = np.einsum("mo,mo->m", g, q @ (W - w0).T + (b - b0))
    every = (k @ q.T + 1.0) * (v @ g.T)  # [patterns, items]: each pattern's effect on each item
    return {"own": own, "learned": learned, "every": every.sum(0), "initial": np.einsum("mo,mo->m", g, q @ w0.T + b0),
            "logit": np.einsum("mo,mo->m", g, q @ W.T + b), "count": np.array([(ex == e).sum() for e in items]),
            "example": items, "target": t["queries/train/target"], "label": t["queries/train/label"],
            "train_label": t["train/label"]}


@pytest.mark.parametrize("layer", ["net.4", "net.2", "net.0"])
def test_self_scores_match_brute_force(run: Path, layer: str) -> None:
    r = runner.invoke(app, ["self-scores", str(run), "--layer", layer, "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    want = brute(run, layer)
    items = sorted(d["items"], key=lambda x: x["item"])
    assert len(items) == 300 and [x["rank"] for x in d["items"]] == list(range(1, 301))
    assert all(a["self_effect"] >= b["self_effect"] for a, b in zip(d["items"], d["items"][1:]))  # highest first
    got = {f: np.array([x[f] for x in items], dtype=np.float64) for f in ("self_effect", "learned", "others", "patterns", "example")}
    assert np.allclose(got["self_effect"], want["own"], rtol=1e-5, atol=1e-6)
    assert np.allclose(got["learned"], want["learned"], rtol=1e-9, atol=1e-9)
    assert np.allclose(got["others"], want["every"] - want["own"], rtol=1e-4, atol=1e-4)  # every other example's patterns
    assert (got["patterns"] == want["count"]).all() and (got["patterns"] == 2).all()  # once per epoch
    assert (got["example"] == want["example"]).all()
    # the set's target is the training label (flipped ones included)
    assert (want["target"] == want["label"]).all() and (want["label"] == want["train_label"][want["example"]]).all()
    assert np.allclose(want["every"], want["learned"], rtol=1e-4, atol=1e-4)  # the dual form: exact up to float32
    if layer == "net.4":  # the read-out: g is one-hot, so these are logits
        assert np.allclose(want["initial"] + want["every"], want["logit"], rtol=1e-4, atol=1e-4)


def test_csv_has_every_item_and_the_table_the_top(run: Path) -> None:
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["self-scores", str(run), "--csv"]).stdout)))
    assert len(rows) == 300 and set(rows[0]) >= {"example", "self_effect", "learned", "self_share", "patterns"}
    table = runner.invoke(app, ["self-scores", str(run), "--top", "5"]).stdout
    assert "300 training examples" in table and len([ln for ln in table.splitlines()[1:] if ln[:4].strip().isdigit()]) == 5
    by_share = json.loads(runner.invoke(app, ["self-scores", str(run), "--by", "share", "--json"]).stdout)["items"]
    shares = [x["self_share"] for x in by_share if x["self_share"] is not None]
    assert shares == sorted(shares, reverse=True)
    others = [x["others"] for x in json.loads(runner.invoke(app, ["self-scores", str(run), "--by", "others", "--json"]).stdout)["items"]]
    assert others == sorted(others)  # most opposed by the rest of the data first


def test_mislabel_benchmark_tiny_configuration(tmp_path: Path) -> None:
    """benchmarks/bench_mislabel.py on a tiny run: both methods score every training example
    (the real AUC and time figures are in benchmarks/README.md)."""
    pytest.importorskip("captum")
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_mislabel", Path(__file__).parents[1] / "benchmarks" / "bench_mislabel.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.evaluate("digits", tmp_path, epochs=1, hidden=8, captum_full=True)
    assert r["scores_for_every_example"] == {"dualtui": True, "captum": True}
    assert r["flipped"] == round(0.1 * r["train_examples"])
    for v in list(r["dualtui"].values()) + list(r["captum"].values()):
        assert 0.0 <= v["auc"] <= 1.0 and v["seconds"] >= 0.0
    labels, flip = bench.flipped_labels(np.arange(100) % 10, 0.1, 0)
    assert flip.sum() == 10 and (labels[flip] != (np.arange(100) % 10)[flip]).all() and (labels[~flip] == (np.arange(100) % 10)[~flip]).all()


def test_a_set_not_drawn_from_training_is_refused(run: Path) -> None:
    r = runner.invoke(app, ["self-scores", str(run), "--queries", "test"])
    assert r.exit_code == 2 and "--train-queries" in r.stderr and r.stderr.count("\n") == 1
