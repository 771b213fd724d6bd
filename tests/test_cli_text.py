"""`dualtui record text` and the scripted commands on a text bundle, through the CLI.

One tiny run (context 8, width 8, one block, one head, 5 steps) is recorded once per module
with `dualtui record text` and reused by `verify`, `rank`, `mass`, `votes`, `layers`, `info`.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app
from dualtui.tokens import visible
from dualtui.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "sample_runs" / "digits-single.safetensors"
runner = CliRunner()

PROSE = (
    "A river starts as a thin thread of water high in the hills, where snow melts under a pale sun "
    "and trickles between the stones. By the time it reaches the valley it has gathered a hundred "
    "small streams and become wide and brown and slow.\n\n"
    "Children skip flat pebbles across it in summer, counting the bounces out loud, and old men sit "
    "on the bank with fishing rods they seldom lift. Herons stand in the shallows as still as posts.\n\n"
    "In spring the river floods the low meadows. The farmers grumble, move the sheep to higher "
    "ground, and wait; the water always goes back, and it leaves the soil darker and richer than "
    "before. Nobody who grew up beside it ever quite forgets the sound it makes at night.\n"
)
CONTEXT, STEPS, BATCH, TESTS = 8, 5, 3, 5
SMALL = ["--context", str(CONTEXT), "--width", "8", "--blocks", "1", "--heads", "1", "--steps", str(STEPS),
         "--batch-size", str(BATCH), "--tests", str(TESTS)]


def _invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _one_error_line(result, code: int) -> str:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dualtui: error:"), lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "river.txt"
    p.write_text(PROSE, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, corpus: Path):
    out = tmp_path_factory.mktemp("run") / "river.safetensors"
    result = _invoke("record", "text", "--corpus", corpus, "-o", out, *SMALL, "--json")
    return out, result


@pytest.fixture(scope="module")
def bundle(recorded) -> Path:
    out, result = recorded
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tables(bundle: Path):
    b = Bundle.open(bundle)
    return b.manifest.input["vocab"], b.array("train/input"), b.array("queries/test/input")


# ----------------------------------------------------------------------------- 1. record + verify
def test_record_text_writes_a_bundle(recorded, corpus: Path) -> None:
    out, result = recorded
    assert result.exit_code == 0, result.output
    assert out.exists()
    summary = json.loads(result.stdout)  # stdout is the JSON summary only
    assert summary["bundle"] == str(out) and summary["steps"] == STEPS and summary["interrupted"] is False
    assert set(summary["test_accuracy"]) == {"river", "all"}
    # the size estimate comes first, on stderr, before training
    first = result.stderr.strip().splitlines()[0]
    assert first.startswith(f"recording {STEPS * BATCH * CONTEXT:,} training tokens × 9 layers ≈ "), first
    assert "B per token" in first
    assert f"wrote {out} ({STEPS} steps)" in result.stderr
    assert "Traceback" not in result.output


def test_verify_passes_on_the_text_bundle(bundle: Path) -> None:
    r = _invoke("verify", bundle)
    assert r.exit_code == 0, r.output
    assert "primal == dual for every layer" in r.stdout
    r = _invoke("verify", bundle, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ok"] and len(report["layers"]) == 9
    assert all(layer["patterns"] == STEPS * BATCH * CONTEXT for layer in report["layers"])


# ----------------------------------------------------------------------------- 2. rank
def _check_position_fields(r: dict, vocab: list[str], train_input: np.ndarray) -> None:
    e, p = r["example"], r["position"]
    row = train_input[e]
    assert 0 <= p < CONTEXT
    assert r["token"] == vocab[row[p]]
    assert r["next_token"] == vocab[row[p + 1]]
    assert r["label"] == row[p + 1]
    assert r["context_before"] == "".join(vocab[i] for i in row[max(0, p - 24) : p])
    assert r["context_after"] == "".join(vocab[i] for i in row[p + 2 : p + 10])


@pytest.mark.parametrize("by", ["attention", "magnitude", "effect"])
def test_rank_json_carries_training_text(bundle: Path, tables, by: str) -> None:
    vocab, train_input, test_input = tables
    r = _invoke("rank", bundle, "-t", 0, "--by", by, "--json", "-k", 6)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["layer"] == "head" and d["group"] == "pattern" and d["by"] == by
    assert d["test_text"] == "".join(vocab[i] for i in test_input[0, :CONTEXT])
    assert len(d["results"]) == 6
    for res in d["results"]:
        _check_position_fields(res, vocab, train_input)
    scores = [res["score"] for res in d["results"]]
    assert scores == sorted(scores, reverse=True)


def test_rank_on_an_embedding_layer(bundle: Path, tables) -> None:
    vocab, train_input, test_input = tables
    r = _invoke("rank", bundle, "-t", 1, "-l", "tok", "--by", "attention", "--json", "-k", 4)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    query_token = vocab[test_input[1, CONTEXT - 1]]
    b = Bundle.open(bundle)
    seen = int((b.array("layer/tok/keys") == test_input[1, CONTEXT - 1]).sum())
    assert len(d["results"]) == 4
    for rank, res in enumerate(d["results"]):
        _check_position_fields(res, vocab, train_input)
        # an embedding attends (α = 1) exactly to the training positions holding its own token
        assert res["attention"] == (1.0 if rank < seen else 0.0)
        assert (res["token"] == query_token) == (res["attention"] == 1.0)


def test_rank_table_shows_the_training_text(bundle: Path, tables) -> None:
    vocab, train_input, _ = tables
    r = _invoke("rank", bundle, "-t", 0, "--json", "-k", 3)
    top = json.loads(r.stdout)["results"]
    table = _invoke("rank", bundle, "-t", 0, "-k", 3)
    assert table.exit_code == 0, table.output
    assert "training text" in table.stdout
    for res in top:
        shown = visible(res["context_before"]) + visible(res["token"]) + "▸" + visible(res["next_token"], alone=True)
        assert shown in table.stdout, (shown, table.stdout)


def test_rank_group_position_and_example(bundle: Path, tables) -> None:
    vocab, train_input, _ = tables
    r = _invoke("rank", bundle, "-t", 2, "--group", "position", "--json", "-k", 5)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["group"] == "position" and len(d["results"]) == 5
    for res in d["results"]:
        _check_position_fields(res, vocab, train_input)
        assert res["patterns"] >= 1 and "pattern" not in res
    r = _invoke("rank", bundle, "-t", 2, "--group", "example", "--json", "-k", 5)
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["group"] == "example" and len(d["results"]) == 5
    for res in d["results"]:
        assert "position" not in res and "token" not in res
        assert res["text"] == "".join(vocab[i] for i in train_input[res["example"], :CONTEXT])
        assert res["patterns"] == CONTEXT  # each window seen once, one pattern per position
    for group in ("position", "example"):
        t = _invoke("rank", bundle, "-t", 2, "--group", group, "-k", 3)
        assert t.exit_code == 0, t.output
        assert "training text" in t.stdout


def test_rank_csv_has_context_columns(bundle: Path, tables) -> None:
    vocab, train_input, _ = tables
    r = _invoke("rank", bundle, "-t", 0, "--csv", "-k", 4)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert len(rows) == 4
    assert {"context_before", "token", "next_token", "context_after", "position", "example", "label"} <= set(rows[0])
    for row in rows:
        e, p = int(row["example"]), int(row["position"])
        assert row["token"] == vocab[train_input[e, p]]
        assert row["next_token"] == vocab[train_input[e, p + 1]]
        assert int(row["label"]) == train_input[e, p + 1]


def test_group_position_needs_a_text_run() -> None:
    line = _one_error_line(_invoke("rank", DIGITS, "-t", 0, "--group", "position"), int(ExitCode.USAGE))
    assert "--group position" in line


# ----------------------------------------------------------------------------- 3. other commands
def test_info_on_the_text_bundle(bundle: Path) -> None:
    r = _invoke("info", bundle, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    b = Bundle.open(bundle)
    assert d["input"]["kind"] == "text" and d["input"]["context"] == CONTEXT
    assert "vocab" not in d["input"] and d["input"]["vocab_size"] == len(b.manifest.input["vocab"])
    assert d["classes"] == b.manifest.input["vocab"] and d["tasks"] == ["river"]
    assert ("not_covered" in d) == ("not_covered" in b.manifest.extra)
    assert [x["name"] for x in d["layers"]][:2] == ["tok", "pos"] and d["layers"][-1]["name"] == "head"
    assert d["test_size"] == TESTS and d["training"]["steps"] == STEPS
    t = _invoke("info", bundle)
    assert t.exit_code == 0 and "input: text" in t.stdout


def test_mass_on_the_text_bundle(bundle: Path, tables) -> None:
    vocab, train_input, _ = tables
    r = _invoke("mass", bundle, "-t", 0, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    head = [row for row in d["classes"] if row["layer"] == "head"]
    assert len(head) == len(vocab)
    # a language model's class mass: |α| of each pattern goes to the token after its position
    b = Bundle.open(bundle)
    keys = b.array("layer/head/keys").astype(np.float64)
    focus = int(b.array("queries/test/layer/head/focus")[0])  # item 0's last position
    alpha = np.abs(keys @ b.array("queries/test/layer/head/query")[focus].astype(np.float64) + 1.0)
    nxt = train_input[b.array("layer/head/example"), b.array("layer/head/position") + 1]
    expect = np.bincount(nxt, weights=alpha, minlength=len(vocab))
    np.testing.assert_allclose([row["abs_sum"] for row in head], expect, rtol=1e-5, atol=1e-6)
    tasks = [row for row in d["tasks"] if row["layer"] == "head"]
    assert tasks[0]["abs_sum"] == pytest.approx(alpha.sum(), rel=1e-5)
    t = _invoke("mass", bundle, "-t", 0, "-l", "head")
    assert t.exit_code == 0, t.output
    assert "next token" in t.stdout


def test_votes_and_layers_on_the_text_bundle(bundle: Path) -> None:
    r = _invoke("votes", bundle, "--json")
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["layers"]) == 9
    assert _invoke("votes", bundle, "-l", "head").exit_code == 0
    r = _invoke("layers", bundle, "-t", 1, "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["layers"]
    assert [row["layer"] for row in rows][-1] == "head" and len(rows) == 9
    assert all(row["primal_dual_error"] <= 1e-4 for row in rows)
    assert _invoke("layers", bundle, "-t", 1).exit_code == 0


def test_two_corpora_are_two_tasks(tmp_path: Path, corpus: Path) -> None:
    other = tmp_path / "shouting.txt"
    other.write_text(PROSE.upper(), encoding="utf-8")
    out = tmp_path / "two.safetensors"
    r = _invoke("record", "text", "--corpus", corpus, "--corpus", other, "-o", out, "--context", CONTEXT, "--width", 8,
                "--blocks", 0, "--heads", 1, "--steps", 4, "--batch-size", 4, "--tests", 4, "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["test_accuracy"]) == {"river", "shouting", "all"}
    d = json.loads(_invoke("info", out, "--json").stdout)
    assert d["tasks"] == ["river", "shouting"]
    b = Bundle.open(out)
    assert set(b.array("queries/test/task").tolist()) == {0, 1}
    assert _invoke("verify", out).exit_code == 0
    m = json.loads(_invoke("mass", out, "-t", 0, "-l", "head", "--json").stdout)
    assert [row["task_name"] for row in m["tasks"]] == ["river", "shouting"]


# ----------------------------------------------------------------------------- 4. bad corpora
def _bad_corpus(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.txt"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind == "whitespace":
        p.write_text("  \n\n\t \n")
    elif kind == "binary":
        p.write_bytes(bytes(range(256)) * 4)
    elif kind == "latin-1":
        p.write_bytes(("\u00e9t\u00e9 " * 200).encode("latin-1"))
    elif kind == "too-short":
        p.write_text("only a few words")
    elif kind == "directory":
        p = tmp_path / "a-folder"
        p.mkdir()
    return p  # "missing": never created


@pytest.mark.parametrize(
    "kind, problem",
    [("empty", "empty"), ("whitespace", "empty"), ("binary", "binary"), ("latin-1", "not UTF-8"),
     ("missing", "no such file"), ("directory", "directory"), ("too-short", "too short")],
)
def test_bad_corpus_is_one_line_exit_3(tmp_path: Path, kind: str, problem: str) -> None:
    p = _bad_corpus(tmp_path, kind)
    out = tmp_path / "out.safetensors"
    line = _one_error_line(_invoke("record", "text", "--corpus", p, "-o", out, *SMALL), int(ExitCode.INVALID_BUNDLE))
    assert str(p) in line and problem in line, line
    assert not out.exists()


def test_bad_corpus_in_a_real_process(tmp_path: Path) -> None:
    """The installed console script: exit 3, one stderr line, no traceback."""
    p = _bad_corpus(tmp_path, "binary")
    exe = shutil.which("dualtui")
    cmd = [exe] if exe else [sys.executable, "-c", "from dualtui.cli import main; main()"]
    proc = subprocess.run(cmd + ["record", "text", "--corpus", str(p), "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == int(ExitCode.INVALID_BUNDLE), proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("dualtui: error:") and "binary" in lines[0], proc.stderr


def test_heads_must_divide_width(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "out.safetensors"
    r = _invoke("record", "text", "--corpus", corpus, "-o", out, "--heads", "3", "--width", "8", "--steps", "1")
    line = _one_error_line(r, int(ExitCode.USAGE))
    assert "--heads 3" in line and "--width 8" in line
    assert not out.exists()
