"""Bundles from somebody else: hostile names, bad ids, non-finite floats, odd files. Every
command gives a result or one line and exit 3, never a traceback, never a control byte on
the terminal, never bare NaN in --json; the app draws names as text. Each case is crafted
with safetensors' own writer from a real recorded bundle."""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from dualtui.cli import app

runner = CliRunner()
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
COMMANDS = [["info"], ["verify"], ["rank", "--test", "0"], ["rank", "--test", "0", "--group", "example"],
            ["mass", "--test", "0"], ["layers", "--test", "0"], ["votes"], ["rank", "--test", "0", "--json"],
            ["rank", "--test", "0", "--csv"], ["mass", "--test", "0", "--json"]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from dualtui.record.digits import record_digits

    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    record_digits(path, "single", epochs=1)
    return path


def _load(base: Path) -> tuple[dict, dict]:
    meta = safe_open(str(base), "np").metadata()
    m = json.loads(meta["dualtui"])
    # As a writer that stores no checksums would leave it: what is tested here is what every
    # command validates (test_checksums.py: what the checksums add).
    m.pop("checksums", None)
    return dict(load_file(str(base))), m


def _write(path: Path, tensors: dict, manifest: dict | str) -> Path:
    save_file(tensors, str(path), metadata={"dualtui": manifest if isinstance(manifest, str) else json.dumps(manifest)})
    return path


def _set(t: dict, name: str, index, value) -> None:
    t[name] = t[name].copy()
    t[name][index] = value


def _case(name: str, t: dict, m: dict) -> None:
    if name == "escape in a task name":
        m["tasks"] = ["\x1b]0;PWNED\x07\x1b[2J\u202etask"]
    elif name == "markup in names":
        m["classes"][0], m["tasks"] = "[/]", ["[bold red]x[/"]
    elif name == "label out of range":
        _set(t, "train/label", 0, 99)
    elif name == "task out of range":
        _set(t, "train/task", 0, 5)
    elif name == "example id out of range":
        _set(t, "layer/net.4/example", 0, 10**6)
    elif name == "classes too short":
        m["classes"] = m["classes"][:3]
    elif name == "NaN in keys":
        _set(t, "layer/net.4/keys", (0, 0), np.nan)
    elif name == "Inf in a query":
        _set(t, "queries/test/layer/net.4/query", (0, 0), np.inf)
    elif name == "huge training.steps":
        m["training"]["steps"] = 10**30
    elif name == "flat image previews":
        t["train/input"] = t["train/input"].reshape(len(t["train/input"]), -1)
    else:
        raise KeyError(name)


CASES = ["escape in a task name", "markup in names", "label out of range", "task out of range", "example id out of range",
         "classes too short", "NaN in keys", "Inf in a query", "huge training.steps", "flat image previews"]
REFUSED = set(CASES) - {"escape in a task name", "markup in names"}


def _check(result, refused: bool, cmd: list[str]) -> None:
    out = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in out
    assert not CONTROL.search(out), out[:300]
    assert result.exit_code in ((3,) if refused else (0, 3)), (cmd, result.exit_code, out[-300:])
    if refused and cmd[0] != "verify":
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    if "--json" in cmd and result.exit_code == 0:
        json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))


@pytest.mark.parametrize("case", CASES)
def test_every_command_on_a_hostile_bundle(base: Path, tmp_path: Path, case: str) -> None:
    t, m = _load(base)
    _case(case, t, m)
    path = _write(tmp_path / "hostile.safetensors", t, m)
    for cmd in COMMANDS:
        if case in REFUSED and cmd[0] in ("info",) and case in ("example id out of range", "NaN in keys"):
            continue  # info reads no pattern: it has nothing to refuse
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]], env={"COLUMNS": "200"})
        _check(r, case in REFUSED and not (case in ("example id out of range",) and cmd in
                                          (["rank", "--test", "0"], ["layers", "--test", "0"], ["rank", "--test", "0", "--json"],
                                           ["rank", "--test", "0", "--csv"])), cmd)


def test_names_are_shown_as_text(base: Path, tmp_path: Path) -> None:
    t, m = _load(base)
    _case("escape in a task name", t, m)
    r = runner.invoke(app, ["mass", str(_write(tmp_path / "x.safetensors", t, m)), "--test", "0"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "␛]0;PWNED␇" in r.stdout and "<U+202E>" in r.stdout


def _raw(path: Path, header: dict, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.mark.parametrize("what", ["huge integer", "string shape", "float offsets", "three offsets"])
def test_header_types_as_strict_as_the_spec(tmp_path: Path, what: str) -> None:
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if what == "string shape":
        entry["shape"] = ["2"]
    elif what == "float offsets":
        entry["data_offsets"] = [0.0, 8.0]
    elif what == "three offsets":
        entry["data_offsets"] = [0, 8, 8]
    header = {"x": entry, "__metadata__": {"dualtui": "{}"}}
    path = _raw(tmp_path / "h.safetensors", header, b"\0" * 8)
    if what == "huge integer":
        text = json.dumps(header).replace('"shape": [2]', '"shape": [' + "9" * 5000 + "]").encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + b"\0" * 8)
    r = runner.invoke(app, ["info", str(path)])
    _check(r, True, ["info"])


def test_a_fifo_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    r = runner.invoke(app, ["info", str(fifo)])
    _check(r, True, ["info"])
    assert "not a regular file" in r.stderr


def test_a_shard_symlinked_outside_the_folder_is_refused(base: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "set").mkdir()
    target = outside / "secret.safetensors"
    target.write_bytes(base.read_bytes())
    (tmp_path / "set" / "s-00001-of-00001.safetensors").symlink_to(target)
    meta = safe_open(str(base), "np").metadata()
    index = {"metadata": meta, "weight_map": {n: "s-00001-of-00001.safetensors" for n in load_file(str(base))}}
    path = tmp_path / "set" / "s.safetensors.index.json"
    path.write_text(json.dumps(index))
    r = runner.invoke(app, ["info", str(path)])
    _check(r, True, ["info"])
    assert "outside the bundle's folder" in r.stderr


def test_the_app_draws_markup_and_escapes_in_names_as_text(base: Path, tmp_path: Path) -> None:
    from dualtui.bundle import Bundle
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    t, m = _load(base)
    m["classes"][0], m["classes"][1] = "[/]", "[bold red]x"
    m["tasks"] = ["\x1b]0;PWNED\x07[/]task"]
    b = Bundle.open(_write(tmp_path / "app.safetensors", t, m))

    async def drive() -> str:
        a = DualtuiApp(OpenRun(b, b.default_query_set), test=0, layer="net.4", export_dir=tmp_path)
        async with a.run_test(size=(110, 32)) as pilot:
            for key in ["tab", "tab", "tab", "X", "j", "down", "tab"]:
                await pilot.press(key)
                await pilot.pause()
            return a.export_screenshot()

    svg = asyncio.run(drive())
    assert "\x1b" not in svg and "\x07" not in svg
    assert "␛]0;PWNED␇" in svg or "PWNED" in svg


@pytest.mark.parametrize("case, cmd, message", [
    ("NaN in values", ["rank", "--test", "0", "--by", "effect"], "values hold NaN/Inf"),
    ("NaN in keys", ["votes"], "keys hold NaN/Inf"),
    ("Inf in keys", ["rank", "--test", "0"], "keys hold NaN/Inf"),
    ("huge finite keys", ["rank", "--test", "0", "--by", "magnitude"], "scores overflow float32"),
    ("huge finite keys", ["mass", "--test", "0"], "scores overflow float32"),
])
def test_floats_the_engine_streams_are_proven_finite_by_their_scores(base: Path, tmp_path: Path, case, cmd, message) -> None:
    """The engine checks streamed floats through the scores computed from them (cheaper than
    testing every key): NaN/Inf in a key or value, and a finite key so large that its score
    overflows, are each refused with one line, by the field that holds them."""
    t, m = _load(base)
    if case == "NaN in values":
        _set(t, "layer/net.4/values", (5, 1), np.nan)
    elif case == "NaN in keys":
        _set(t, "layer/net.4/keys", (7, 3), np.nan)
    elif case == "Inf in keys":
        _set(t, "layer/net.4/keys", (9, 0), -np.inf)
    else:
        t["layer/net.4/keys"] = t["layer/net.4/keys"] * np.float32(1e37)
    path = _write(tmp_path / "f.safetensors", t, m)
    r = runner.invoke(app, [cmd[0], str(path), *cmd[1:], "--layer", "net.4"] if cmd[0] != "votes" else ["votes", str(path)])
    assert r.exit_code == 3, r.output
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


TEXT_SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs" / "text-docstrings.safetensors"


@pytest.mark.parametrize("windows", [True, False])
def test_a_context_the_file_cannot_back_is_refused_before_any_allocation(tmp_path: Path, windows: bool) -> None:
    """input.context sizes per-token tables (examples × context): 2^20 passed the manifest's
    bound but made `rank --group position` allocate 2.8 GB and die with a traceback."""
    t, m = _load(TEXT_SAMPLE)
    m["input"]["context"] = 1 << 20 if windows else 1 << 19
    if not windows:
        del t["train/input"]
    path = _write(tmp_path / "ctx.safetensors", t, m)
    for cmd in (["rank", "--test", "0", "--group", "position"], ["info"], ["votes"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
        assert "'input.context'" in r.stderr


def test_a_header_of_a_million_tensors_is_refused_before_it_is_parsed(base: Path, tmp_path: Path) -> None:
    raw = base.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header.update({f"x{i}": {"dtype": "F32", "shape": [0], "data_offsets": [end, end]} for i in range(300_000)})
    text = json.dumps(header).encode()
    path = tmp_path / "many.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    r = runner.invoke(app, ["info", str(path)])
    _check(r, True, ["info"])
    assert "header lists 300,052 tensors, the limit is 200,000" in r.stderr
