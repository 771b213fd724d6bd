"""The scripted spotlights (`rank`, `mass`, `layers`, `votes`) through typer's CliRunner: JSON
shape, numbers against the brute force (tests/bruteforce_v1.py), CSV equal to the JSON, usage
errors (exit 2, one line listing the valid choices, nothing on stdout), and the committed
sample runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bruteforce_v1 import (CHECK_RANKS, N_TEST, REL, SCORES, Brute, check_example_ranks, check_masses,
                           check_pattern_ranks, check_summary, make, write)

from dualtui.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_runs").glob("digits-*.safetensors"))


def cli(*args: str, code: int = 0):
    r = runner.invoke(app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    assert "Traceback" not in r.output
    assert r.exit_code == code, (r.exit_code, r.output)
    return r


def cli_json(*args: str) -> dict:
    r = cli(*args, "--json")
    assert r.stderr == ""
    return json.loads(r.stdout)


def cli_csv(*args: str) -> list[dict]:
    r = cli(*args, "--csv")
    return list(csv.DictReader(io.StringIO(r.stdout)))


def usage_error(*args: str) -> str:
    """Run, expect exit 2 with nothing on stdout; return stderr."""
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    return r.stderr


RESULT_FIELDS = ("rank", "score", "attention", "magnitude", "effect", "example", "task", "label")


def as_ranked(d: dict) -> SimpleNamespace:
    return SimpleNamespace(**{"pattern": None, "step": None, "position": None, "patterns": None, **d})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(path, brute force) for a chunked float32 MLP bundle, a sharded bfloat16 text classifier
    and a chunked bfloat16 language model (classes are tokens)."""
    out = {}
    for cfg in (("mlp", "float32", "chunked"), ("text", "bfloat16", "sharded"), ("lm", "bfloat16", "chunked")):
        vb = make(*cfg, seed=101)
        path = write(vb, tmp_path_factory.mktemp("-".join(cfg)) / "run.safetensors", cfg[2])
        out[cfg[0]] = (path, Brute.from_valid(vb))
    return out


# ----------------------------------------------------------------------------- rank
@pytest.mark.parametrize("family", ["mlp", "text", "lm"])
def test_rank_json_matches_brute_force(runs, family) -> None:
    path, bf = runs[family]
    layers = [s["name"] for s in bf.manifest["layers"]]
    vocab = bf.manifest["input"].get("vocab")
    m = 3
    for L in layers:
        assert ("position" in bf.groups(L)) == (family != "mlp")
        for by in SCORES:
            for group in bf.groups(L):
                for reverse in (False, True):
                    top = 4
                    args = [path, "--test", m, "--layer", L, "--by", by, "--group", group, "--top", top] + (["--reverse"] if reverse else [])
                    d = cli_json("rank", *args)
                    assert {"test", "layer", "by", "group", "results"} <= set(d)
                    assert (d["test"], d["layer"], d["by"], d["group"], d["reverse"]) == (m, L, by, group, reverse)
                    assert (d["test_label"], d["test_prediction"], d["test_task"]) == (
                        bf.test_label[m], bf.test_prediction[m], bf.test_task[m])
                    for r in d["results"]:
                        assert set(RESULT_FIELDS) <= set(r)
                        if group == "pattern":
                            assert {"pattern", "step"} <= set(r) and "patterns" not in r
                            assert ("position" in r) == (family != "mlp")
                        else:
                            assert "patterns" in r and "pattern" not in r and "step" not in r
                            assert ("position" in r) == (group == "position")
                        if family != "mlp":  # the text around each result
                            assert ({"context_before", "token", "next_token", "context_after"} <= set(r)) == (group != "example")
                            assert ("text" in r) == (group == "example")
                        if family == "lm" and group != "example":  # the label is the token trained to predict
                            assert r["next_token"] == vocab[r["label"]]
                    ranked = [as_ranked(r) for r in d["results"]]
                    CHECK_RANKS[group](bf, L, m, ranked, by, reverse, top)
                    rows = cli_csv("rank", *args)
                    assert len(rows) == len(d["results"])
                    for row, r in zip(rows, d["results"]):
                        assert set(row) == set(r)
                        for k, v in r.items():
                            assert (float(row[k]) == v) if isinstance(v, float) else (row[k] == str(v)), k


def test_rank_defaults_to_last_layer_and_prints_a_table(runs) -> None:
    path, bf = runs["mlp"]
    last = bf.manifest["layers"][-1]["name"]
    d = cli_json("rank", path, "-t", 0)
    assert d["layer"] == last and d["by"] == "effect" and d["group"] == "pattern" and len(d["results"]) == 10
    check_pattern_ranks(bf, last, 0, [as_ranked(r) for r in d["results"]], "effect", False, 10)
    r = cli("rank", path, "-t", 0, "--by", "effect", "--group", "example")
    assert "effect" in r.stdout and r.stdout.count("\n") > 3
    cli("rank", path, "-t", 0, "--device", "cpu", "--json")


# ----------------------------------------------------------------------------- mass
@pytest.mark.parametrize("family", ["mlp", "text", "lm"])
def test_mass_json_matches_brute_force(runs, family) -> None:
    path, bf = runs[family]
    layers = [s["name"] for s in bf.manifest["layers"]]
    m = 4
    d = cli_json("mass", path, "--test", m)
    assert d["test"] == m
    for kind in ("tasks", "classes"):
        for row in d[kind]:
            assert {"layer", kind[:-2] if kind == "classes" else "task", "attention_sum", "abs_sum", "abs_share", "effect_sum"} <= set(row)
    assert [r["layer"] for r in d["tasks"]] == [L for L in layers for _ in range(bf.n_tasks)]
    assert [r["layer"] for r in d["classes"]] == [L for L in layers for _ in range(bf.n_classes)]
    for L in layers:
        tasks = [r for r in d["tasks"] if r["layer"] == L]
        classes = [r for r in d["classes"] if r["layer"] == L]
        steps = [r for r in d["steps"] if r["layer"] == L]
        assert [r["task"] for r in tasks] == list(range(bf.n_tasks))
        assert [r["task_name"] for r in tasks] == bf.manifest["tasks"]
        assert [r["class"] for r in classes] == list(range(bf.n_classes))
        assert [r["class_name"] for r in classes] == bf.manifest["classes"]
        edges = np.array([r["step_start"] for r in steps] + [steps[-1]["step_end"]])
        assert all(a["step_end"] == b["step_start"] for a, b in zip(steps, steps[1:]))
        ms = SimpleNamespace(
            task_attention_sum=np.array([r["attention_sum"] for r in tasks]), task_abs_sum=np.array([r["abs_sum"] for r in tasks]),
            task_effect_sum=np.array([r["effect_sum"] for r in tasks]),
            class_attention_sum=np.array([r["attention_sum"] for r in classes]), class_abs_sum=np.array([r["abs_sum"] for r in classes]),
            class_effect_sum=np.array([r["effect_sum"] for r in classes]), step_edges=edges,
            step_attention_sum=np.array([r["attention_sum"] for r in steps]), step_abs_sum=np.array([r["abs_sum"] for r in steps]),
            step_effect_sum=np.array([r["effect_sum"] for r in steps]),
            abs_total=float(sum(r["abs_sum"] for r in tasks)))
        check_masses(bf, L, m, ms, len(steps))
        total = ms.abs_total  # the engine's Σ|α| (check_masses compared it with the brute force)
        for rows in (tasks, classes, steps):
            assert sum(r["abs_share"] for r in rows) == pytest.approx(1.0 if total else 0.0, abs=1e-6)
            for r in rows:
                assert r["abs_share"] == pytest.approx(r["abs_sum"] / total if total else 0.0, rel=1e-9, abs=1e-12)
    # one layer only; CSV carries the same rows, tagged by kind
    L = layers[0]
    one = cli_json("mass", path, "-t", m, "--layer", L)
    assert one["tasks"] == [r for r in d["tasks"] if r["layer"] == L]
    rows = cli_csv("mass", path, "-t", m)
    assert [r["kind"] for r in rows] == ["task"] * len(d["tasks"]) + ["class"] * len(d["classes"]) + ["step"] * len(d["steps"])
    for row, r in zip(rows, d["tasks"] + d["classes"] + d["steps"]):
        for k, v in r.items():
            assert (float(row[k]) == v) if isinstance(v, float) else (row[k] == str(v)), k
    assert "attention mass per task" in cli("mass", path, "-t", m).stdout


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("family", ["mlp", "text", "lm"])
def test_layers_json_matches_brute_force(runs, family) -> None:
    path, bf = runs[family]
    m = 0  # in the text bundle, rare.emb's query 0 matches no pattern: every α is 0
    d = cli_json("layers", path, "--test", m)
    assert d["test"] == m
    assert [r["layer"] for r in d["layers"]] == [s["name"] for s in bf.manifest["layers"]]
    for r in d["layers"]:
        assert set(r) == {"layer", "patterns", "initial_norm", "learned_norm", "initial_share", "learned_share",
                          "effective_patterns", "top10_share", "top100_share", "primal_dual_error", "abs_sum",
                          "residual_norm", "residual_share"}
        check_summary(bf, r["layer"], m, SimpleNamespace(**r))
        # an exact bundle: what no pattern explains is rounding
        assert r["residual_norm"] <= 1e-4 * max(1.0, r["initial_norm"] + r["learned_norm"])
    if family == "text":
        rare = next(r for r in d["layers"] if r["layer"] == "rare.emb")
        assert rare["abs_sum"] == 0 and rare["learned_norm"] == 0 and rare["effective_patterns"] == 0
    rows = cli_csv("layers", path, "-t", m)
    assert [r["layer"] for r in rows] == [r["layer"] for r in d["layers"]]
    for row, r in zip(rows, d["layers"]):
        for k, v in r.items():
            assert (float(row[k]) == v) if isinstance(v, float) else (row[k] == str(v)), k
    assert "per-layer contributions" in cli("layers", path, "-t", m).stdout


# ----------------------------------------------------------------------------- votes
def brute_votes(bf: Brute, L: str) -> dict:
    class_abs, _ = bf.class_abs(L)
    vote = class_abs.argmax(axis=0)
    right, model_right = vote == bf.test_label, bf.test_prediction == bf.test_label
    # the frequency-normalised vote: the largest mean |α| per pattern of the class
    counts = np.bincount(bf.pattern_class(L), minlength=class_abs.shape[0])
    mean = np.where(counts[:, None] > 0, class_abs / np.maximum(counts, 1)[:, None], -np.inf)
    norm_vote = mean.argmax(axis=0)
    return {"layer": L, "test_items": len(vote), "label_agreement": right.mean(),
            "normalised_label_agreement": (norm_vote == bf.test_label).mean(),
            "normalised_prediction_agreement": (norm_vote == bf.test_prediction).mean(),
            "prediction_agreement": (vote == bf.test_prediction).mean(), "model_accuracy": model_right.mean(),
            "table": {"vote_right_model_right": int((right & model_right).sum()), "vote_right_model_wrong": int((right & ~model_right).sum()),
                      "vote_wrong_model_right": int((~right & model_right).sum()), "vote_wrong_model_wrong": int((~right & ~model_right).sum())},
            **{name: {"items": int(m.sum()), "label_agreement": right[m].mean() if m.any() else None,
                      "prediction_agreement": (vote == bf.test_prediction)[m].mean() if m.any() else None}
               for name, m in (("correct", model_right), ("misclassified", ~model_right))},
            "peakedness": {name: _peak(class_abs, m) for name, m in (("correct", model_right), ("misclassified", ~model_right))}}


def _peak(class_abs: np.ndarray, mask: np.ndarray) -> float | None:
    std = class_abs.std(axis=0)
    x = (class_abs.mean(axis=0)[std > 0] / std[std > 0])[mask[std > 0]]
    return float(x.mean()) if len(x) else None


def assert_votes(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    assert got["table"] == want["table"]
    for k in ("layer", "test_items"):
        assert got[k] == want[k]
    for k in ("label_agreement", "prediction_agreement", "model_accuracy", "normalised_label_agreement",
              "normalised_prediction_agreement"):
        assert got[k] == pytest.approx(want[k]), k
    for split in ("correct", "misclassified"):
        assert got[split] == pytest.approx(want[split]), split
        # mean ÷ std amplifies the float32 rounding of α by the ratio itself (65 in the text run)
        assert got["peakedness"][split] == pytest.approx(want["peakedness"][split], rel=1e-4), split


@pytest.mark.parametrize("family", ["mlp", "text", "lm"])
def test_votes_json_matches_brute_force(runs, family) -> None:
    path, bf = runs[family]
    layers = [s["name"] for s in bf.manifest["layers"]]
    d = cli_json("votes", path)
    assert [r["layer"] for r in d["layers"]] == layers
    for r in d["layers"]:
        class_abs, scale = bf.class_abs(r["layer"])
        top2 = np.sort(class_abs, axis=0)[-2:] if class_abs.shape[0] > 1 else None
        near_tie = top2 is not None and bool(np.any((top2[1] - top2[0] <= REL * scale.max()) & (top2[1] != top2[0])))
        if not near_tie:  # exact ties go to the lowest class in both
            assert_votes(r, brute_votes(bf, r["layer"]))
    one = cli_json("votes", path, "--layer", layers[-1])
    assert one["layers"] == [d["layers"][-1]]
    rows = cli_csv("votes", path)
    for row, r in zip(rows, d["layers"]):
        nested = ("table", "correct", "misclassified", "peakedness")
        flat = {**{k: v for k, v in r.items() if k not in nested}, **r["table"],
                **{f"{s}_{k}": v for s in ("correct", "misclassified") for k, v in r[s].items()},
                **{f"peakedness_{k}": v for k, v in r["peakedness"].items()}}
        assert set(row) == set(flat)
        for k, v in flat.items():
            assert (float(row[k]) == v) if isinstance(v, float) else (row[k] == ("" if v is None else str(v))), k
    assert f"{N_TEST} test items" in cli("votes", path).stdout


# ----------------------------------------------------------------------------- usage errors
def test_unknown_layer_lists_the_valid_layers(runs) -> None:
    path, bf = runs["mlp"]
    layers = [s["name"] for s in bf.manifest["layers"]]
    for cmd in (["rank", path, "-t", 0], ["mass", path, "-t", 0], ["votes", path]):
        err = usage_error(*cmd, "--layer", "nope", "--json")
        assert "nope" in err and all(L in err for L in layers)
        assert err.strip().count("\n") == 0


def test_test_index_out_of_range_lists_the_valid_range(runs) -> None:
    path, _ = runs["mlp"]
    for cmd in ("rank", "mass", "layers"):
        for t in (N_TEST, -1):
            err = usage_error(cmd, path, "--test", t, "--json")
            assert f"0..{N_TEST - 1}" in err and str(t) in err
            assert err.strip().count("\n") == 0


def test_bad_choices_list_the_valid_ones(runs) -> None:
    path, _ = runs["mlp"]
    err = usage_error("rank", path, "-t", 0, "--by", "size")
    assert all(c in err for c in SCORES)
    err = usage_error("rank", path, "-t", 0, "--group", "task")
    assert "pattern" in err and "example" in err and "position" in err
    err = usage_error("rank", path, "-t", 0, "--group", "position", "--json")  # an image run has no positions
    assert "position" in err and err.strip().count("\n") == 0
    err = usage_error("rank", path, "-t", 0, "--device", "tpu")
    assert all(c in err for c in ("auto", "cpu", "cuda"))
    usage_error("rank", path, "-t", 0, "--top", 0)
    assert "--json" in usage_error("rank", path, "-t", 0, "--json", "--csv")
    usage_error("rank", path)  # --test is required


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_device_cuda_without_gpu_exits_2_with_one_line(runs) -> None:
    path, _ = runs["mlp"]
    for cmd in (["rank", path, "-t", 0], ["mass", path, "-t", 0], ["layers", path, "-t", 0], ["votes", path]):
        err = usage_error(*cmd, "--device", "cuda", "--json")
        assert err.strip().count("\n") == 0
        assert "cuda" in err.lower() and "no CUDA device" in err


def test_unreadable_bundle_exits_3(tmp_path) -> None:
    for cmd in (["rank", "-t", 0], ["mass", "-t", 0], ["layers", "-t", 0], ["votes"]):
        r = runner.invoke(app, [cmd[0], str(tmp_path / "missing.safetensors"), *map(str, cmd[1:]), "--json"])
        assert r.exit_code == 3 and r.stdout == "" and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- the committed samples
@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_runs(sample: Path) -> None:
    bf = Brute.from_file(sample)
    layers = [s["name"] for s in bf.manifest["layers"]]
    L, m = layers[-1], 11
    for by in SCORES:
        d = cli_json("rank", sample, "-t", m, "--by", by)
        assert d["layer"] == L
        check_pattern_ranks(bf, L, m, [as_ranked(r) for r in d["results"]], by, False, 10)
    d = cli_json("rank", sample, "-t", m, "--by", "effect", "--group", "example", "--reverse", "-k", 5)
    check_example_ranks(bf, L, m, [as_ranked(r) for r in d["results"]], "effect", True, 5)
    d = cli_json("layers", sample, "-t", m)
    assert [r["layer"] for r in d["layers"]] == layers
    check_summary(bf, L, m, SimpleNamespace(**d["layers"][-1]))
    for r in d["layers"]:
        assert r["primal_dual_error"] <= 1e-3
    d = cli_json("mass", sample, "-t", m, "--layer", L)
    tasks = d["tasks"]
    assert [r["task_name"] for r in tasks] == bf.manifest["tasks"]
    want = bf.masses(L, m, np.array([r["step_start"] for r in d["steps"]] + [d["steps"][-1]["step_end"]]))
    np.testing.assert_allclose([r["abs_sum"] for r in tasks], want[("task", "abs")][0], rtol=1e-5)
    np.testing.assert_allclose([r["abs_sum"] for r in d["classes"]], want[("class", "abs")][0], rtol=1e-5)
    np.testing.assert_allclose([r["abs_sum"] for r in d["steps"]], want[("step", "abs")][0], rtol=1e-5, atol=1e-6)
    # the last layer: Σ effect + (w0 q + b0)·g is the predicted logit
    lay = bf.layers[L]
    logit = sum(r["effect_sum"] for r in tasks) + float(lay.initial()[m] @ lay.G[m])
    assert logit == pytest.approx(float(lay.primal()[m, bf.test_prediction[m]]), rel=1e-5, abs=1e-5)
    d = cli_json("votes", sample, "--layer", L)
    assert_votes(d["layers"][0], brute_votes(bf, L))
