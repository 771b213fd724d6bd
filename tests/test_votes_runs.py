"""`dualtui votes` as the paper reports it: split by correctly and wrongly classified items,
the class-peakedness statistic, over any query set (a training subset recorded with
--train-queries), and over several runs (mean ± sample std per layer). Every number is
recomputed here by brute force in numpy from the stored tensors."""

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
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("seeds")
    return [record_digits(folder / f"s{s}.safetensors", "single", epochs=1, seed=s, train_queries=40).path for s in SEEDS]


def votes(*args: object) -> dict:
    r = runner.invoke(app, ["votes", *map(str, args), "--json"])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout)


def brute(path: Path, layer: str, queries: str) -> dict:
    t = load_file(str(path))
    k = t[f"layer/{layer}/keys"].astype(np.float64)
    cls = t["train/label"][t[f"layer/{layer}/example"]]
    q = t[f"queries/{queries}/layer/{layer}/query"].astype(np.float64)  # one row per item (an MLP)
    a = np.abs(k @ q.T + 1.0)  # the layers have biases: α = k·q + 1
    class_abs = np.stack([a[cls == c].sum(axis=0) for c in range(10)])
    vote = class_abs.argmax(axis=0)
    label, pred = t[f"queries/{queries}/label"], t[f"queries/{queries}/prediction"]
    right = pred == label
    peak = class_abs.mean(axis=0) / class_abs.std(axis=0)
    return {
        "label_agreement": np.mean(vote == label), "prediction_agreement": np.mean(vote == pred),
        "model_accuracy": np.mean(right),
        "correct.label_agreement": np.mean((vote == label)[right]) if right.any() else None,
        "misclassified.label_agreement": np.mean((vote == label)[~right]) if (~right).any() else None,
        "misclassified.prediction_agreement": np.mean((vote == pred)[~right]) if (~right).any() else None,
        "peakedness.correct": peak[right].mean() if right.any() else None,
        "peakedness.misclassified": peak[~right].mean() if (~right).any() else None,
        "items": (int(right.sum()), int((~right).sum())),
    }


def get(row: dict, name: str):
    for part in name.split("."):
        row = row[part]
    return row


@pytest.mark.parametrize("queries", ["test", "train"])
def test_splits_and_peakedness_match_brute_force(runs, queries) -> None:
    d = votes(runs[0], "--queries", queries)
    assert d["queries"] == queries
    for row in d["layers"]:
        want = brute(runs[0], row["layer"], queries)
        assert (row["correct"]["items"], row["misclassified"]["items"]) == want.pop("items")
        for name, value in want.items():
            if value is None:
                assert get(row, name) is None, name
            else:
                assert get(row, name) == pytest.approx(value, rel=1e-6), name  # α in float32, summed in float64


def test_over_seeds_mean_and_sample_std(runs) -> None:
    d = votes(*runs)
    assert d["runs"] == [str(p) for p in runs] and len(d["per_run"]) == len(SEEDS)
    for j, row in enumerate(d["layers"]):
        per = [brute(p, row["layer"], "test") for p in runs]
        for name in ("label_agreement", "prediction_agreement", "model_accuracy", "misclassified.label_agreement",
                     "peakedness.correct", "peakedness.misclassified"):
            xs = np.array([r[name] for r in per if r[name] is not None], dtype=np.float64)
            assert row[name]["n"] == len(xs)
            assert row[name]["mean"] == pytest.approx(xs.mean(), rel=1e-6), name
            assert row[name]["std"] == pytest.approx(xs.std(ddof=1), rel=1e-4, abs=1e-7), name
        assert d["per_run"][1]["layers"][j] == votes(runs[1])["layers"][j]  # each run as alone
    table = runner.invoke(app, ["votes", *map(str, runs)]).stdout
    assert "3 runs" in table and "±" in table
    rows = list(csv.DictReader(io.StringIO(runner.invoke(app, ["votes", *map(str, runs), "--csv"]).stdout)))
    assert float(rows[0]["label_agreement_mean"]) == pytest.approx(d["layers"][0]["label_agreement"]["mean"])


def test_runs_must_share_the_query_set_and_layers(runs, tmp_path: Path) -> None:
    other = record_digits(tmp_path / "c.safetensors", "continual", epochs=1, hidden=8).path
    r = runner.invoke(app, ["votes", str(runs[0]), str(other), "--queries", "train"])
    assert r.exit_code == 2 and "query set" in r.stderr  # the continual run has no 'train' set
    r = runner.invoke(app, ["votes", str(runs[0]), str(tmp_path / "missing.safetensors")])
    assert r.exit_code == 3 and r.stderr.count("\n") == 1
