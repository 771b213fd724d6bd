"""CLI basics: fast help without torch, engine/bundle free of Textual, record → verify → info."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dualtui.cli import app
from dualtui.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = sorted((ROOT / "sample_runs").glob("*.safetensors"))
runner = CliRunner()


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_help_does_not_import_torch() -> None:
    mods = _modules_after("from typer.testing import CliRunner\nfrom dualtui.cli import app\n"
                          "r = CliRunner().invoke(app, ['--help'])\nassert r.exit_code == 0, r.output")
    assert "torch" not in mods


@pytest.mark.parametrize("module", ["dualtui.bundle", "dualtui.engine", "dualtui.engine.verify", "dualtui.engine.spotlight", "dualtui.engine.votes", "dualtui.record", "dualtui.cli"])
def test_core_never_imports_textual(module: str) -> None:
    mods = _modules_after(f"import {module}")
    assert "textual" not in mods


def test_exit_codes_are_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f"`{int(code)}`" in readme, f"exit code {int(code)} missing from README"


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_runs_verify(sample: Path) -> None:
    r = runner.invoke(app, ["verify", str(sample), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["ok"]
    for layer in report["layers"]:
        assert layer["weight_max_abs_error"] <= 1e-4 * 1.0 or layer["weight_max_abs_error"] <= layer["tolerance"]
        assert layer["output_max_abs_error"] is not None


def test_sample_runs_exist_with_their_commands() -> None:
    names = {p.name for p in SAMPLES}
    assert {"digits-single.safetensors", "digits-multitask.safetensors", "digits-continual.safetensors"} <= names
    made_by = (ROOT / "sample_runs" / "README.md").read_text()
    for name in names:
        assert name in made_by
    assert sum(p.stat().st_size for p in SAMPLES) < 40e6


def test_info_json_fields_on_sample() -> None:
    sample = ROOT / "sample_runs" / "digits-multitask.safetensors"
    r = runner.invoke(app, ["info", str(sample), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["version"] == 2
    assert [q["name"] for q in d["query_sets"]] == ["test"] and d["attribution"]["checked"]
    assert d["tasks"] == ["digits 0-4", "digits 5-9"]
    assert d["train_size"] + d["test_size"] == 1797
    assert [(x["name"], x["in_features"], x["out_features"]) for x in d["layers"]] == [
        ("net.0", 64, 32), ("net.2", 32, 32), ("net.4", 32, 10)]
    assert all(x["patterns"] == d["layers"][0]["patterns"] for x in d["layers"])
    # every pattern is one training example seen once per epoch
    assert d["layers"][0]["patterns"] == d["train_size"] * d["training"]["epochs"]


@pytest.mark.parametrize("setting", ["single", "multitask", "continual"])
def test_record_digits_then_verify(tmp_path: Path, setting: str) -> None:
    out = tmp_path / f"{setting}.safetensors"
    r = runner.invoke(app, ["record", "digits", "--setting", setting, "--epochs", "1", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["bundle"] == str(out)
    assert 0.0 <= summary["test_accuracy"]["all"] <= 1.0
    tasks = ["digits 0-9"] if setting == "single" else ["digits 0-4", "digits 5-9"]
    assert set(summary["test_accuracy"]) == set(tasks) | {"all"}
    v = runner.invoke(app, ["verify", str(out), "--json"])
    assert v.exit_code == 0, v.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--json"]).stdout)
    assert info["training"]["setting"] == setting
    n = info["train_size"]
    # continual trains each task for --epochs: the same number of patterns as one joint epoch
    assert info["layers"][0]["patterns"] == n


def test_record_digits_bfloat16_reports_rounding(tmp_path: Path) -> None:
    out = tmp_path / "bf16.safetensors"
    r = runner.invoke(app, ["record", "digits", "--epochs", "1", "--dtype", "bfloat16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(runner.invoke(app, ["verify", str(out), "--json"]).stdout)
    assert report["ok"]
    assert all(layer["storage_dtype"] == "BF16" and layer["rounding_bound"] > 0 for layer in report["layers"])
    assert max(layer["weight_max_abs_error"] for layer in report["layers"]) > 1e-5


def test_record_digits_bad_output_path_is_usage_error(tmp_path: Path) -> None:
    r = runner.invoke(app, ["record", "digits", "--epochs", "1", "-o", str(tmp_path / "run.bin")])
    assert r.exit_code == ExitCode.USAGE
    assert "must end in .safetensors" in r.stderr
