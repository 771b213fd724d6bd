"""The frequency-normalised vote of `dualtui votes`, recomputed by brute force in numpy from
the stored tensors: per item, the training class with the largest mean |α| per pattern."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file
from typer.testing import CliRunner

from dualtui.cli import app

BUNDLE = Path(__file__).resolve().parents[1] / "sample_runs" / "digits-continual.safetensors"


def test_normalised_vote_equals_brute_force():
    t = load_file(str(BUNDLE))
    d = json.loads(CliRunner().invoke(app, ["votes", str(BUNDLE), "--json"]).stdout)
    label, pred = t["queries/test/label"], t["queries/test/prediction"]
    for row in d["layers"]:
        L = row["layer"]
        k = t[f"layer/{L}/keys"].astype(np.float64)
        cls = t["train/label"][t[f"layer/{L}/example"]]
        q = t[f"queries/test/layer/{L}/query"].astype(np.float64)  # one row per item in this run
        a = np.abs(k @ q.T + 1.0)  # [patterns, items]
        n_classes = 10
        sums = np.stack([a[cls == c].sum(axis=0) for c in range(n_classes)])
        counts = np.array([(cls == c).sum() for c in range(n_classes)])
        mean = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], -np.inf)
        vote_sum, vote_norm = sums.argmax(axis=0), mean.argmax(axis=0)
        assert abs(row["label_agreement"] - float((vote_sum == label).mean())) < 1e-12
        assert abs(row["normalised_label_agreement"] - float((vote_norm == label).mean())) < 1e-12
        assert abs(row["normalised_prediction_agreement"] - float((vote_norm == pred).mean())) < 1e-12
