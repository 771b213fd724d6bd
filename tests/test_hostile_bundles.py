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


def test_no_tab_of_the_app_sends_a_control_character_to_the_terminal(base: Path, tmp_path: Path) -> None:
    """What the app draws (the compositor's output, as the terminal gets it), on every tab, with
    escape sequences, C1 controls and bidi overrides in task, class and optimizer names. The
    Overview once drew task names raw: the SVG export escaped them, the terminal did not."""
    from dualtui.bundle import Bundle
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun
    from test_tui_pilot import screen_text, settle

    t, m = _load(base)
    evil = "\x1b[31mRED\x1b]0;pwned\x07\x1b[2J\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\\x7f\x9b31m\u202e"
    m["tasks"] = [evil]
    m["classes"][2] = evil
    m["optimizer"]["name"] = evil
    m["training"]["interrupted"] = evil
    b = Bundle.open(_write(tmp_path / "app.safetensors", t, m))

    async def drive() -> list[str]:
        a = DualtuiApp(OpenRun(b, b.default_query_set), test=0, layer="net.4", export_dir=tmp_path)
        shown = []
        async with a.run_test(size=(120, 40)) as pilot:
            await settle(pilot, a)
            for key in ["1", "2", "3", "4", "5", "question_mark", "escape"]:
                await pilot.press(key)
                await settle(pilot, a)
                shown.append(screen_text(a))
        return shown

    for text in asyncio.run(drive()):
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text), repr(text[:400])


# ----------------------------------------------------------------------------- found by an independent check
def test_a_lone_surrogate_in_a_name_is_refused_not_a_traceback(base: Path, tmp_path: Path) -> None:
    t, m = _load(base)
    text = json.dumps(m).replace('"digits 0-9"', '"digits \\ud800"')
    assert "\\ud800" in text
    path = _write(tmp_path / "s.safetensors", t, text)
    for cmd in (["info"], ["rank", "--test", "0", "--group", "example", "--by", "effect"], ["mass", "--test", "0"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
        assert "lone surrogate" in r.stderr


@pytest.mark.parametrize("field", ["keys", "values"])
def test_keys_and_values_of_one_layer_share_a_storage_dtype(base: Path, tmp_path: Path, field: str) -> None:
    t, m = _load(base)
    t[f"layer/net.4/{field}"] = t[f"layer/net.4/{field}"].astype(np.float64)
    path = _write(tmp_path / "d.safetensors", t, m)
    for cmd in (["rank", "--test", "0", "--json"], ["verify"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
        assert "share one storage dtype" in r.stderr


@pytest.mark.parametrize("bad", [-1, "N"])
def test_ids_read_for_the_shown_rows_are_checked_too(base: Path, tmp_path: Path, bad) -> None:
    """Ranking by attention streams keys only: the example ids of the rows it prints are read by
    random access, and were not checked (example −1 was printed as the last example's label)."""
    t, m = _load(base)
    n = len(t["train/label"])
    _set(t, "layer/net.0/example", 0, n if bad == "N" else bad)
    path = _write(tmp_path / "e.safetensors", t, m)
    r = runner.invoke(app, ["rank", str(path), "--test", "0", "--layer", "net.0", "-k", "20000", "--csv"])
    _check(r, True, ["rank"])
    r = runner.invoke(app, ["rank", str(path), "--test", "0", "--layer", "net.0", "-k", "20000", "--csv", "--reverse"])
    _check(r, True, ["rank"])


@pytest.mark.parametrize("value", [-(2**63), 60, 999])
def test_a_text_runs_windows_hold_token_ids_in_the_vocabulary(tmp_path: Path, value: int) -> None:
    t, m = _load(TEXT_SAMPLE)
    _set(t, "train/input", (0, 5), value)
    path = _write(tmp_path / "w.safetensors", t, m)
    for cmd in (["mass", "--test", "0", "--layer", "head"], ["info"], ["rank", "--test", "0"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
        assert "'train/input'" in r.stderr and "token ids" in r.stderr


@pytest.mark.parametrize("case", ["loop", "nul"])
def test_odd_shard_names_and_links_are_one_line(base: Path, tmp_path: Path, case: str) -> None:
    (tmp_path / "set").mkdir()
    meta = safe_open(str(base), "np").metadata()
    name = "s-00001-of-00001.safetensors"
    if case == "loop":
        (tmp_path / "set" / name).symlink_to(tmp_path / "set" / name)
    else:
        name += "\x00.x"
    index = {"metadata": meta, "weight_map": {n: name for n in load_file(str(base))}}
    path = tmp_path / "set" / "s.safetensors.index.json"
    path.write_text(json.dumps(index))
    for cmd in (["info"], ["verify"], ["rank", "--test", "0", "--json"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)


def test_a_path_that_is_not_utf8_is_printed_visibly(base: Path, tmp_path: Path) -> None:
    name = os.fsdecode(b"\xff\xfe\x9b31m.safetensors")  # its bytes arrive as surrogates
    path = tmp_path / name
    path.write_bytes(base.read_bytes())
    r = runner.invoke(app, ["info", str(path)])
    _check(r, False, ["info"])
    assert "\\xff\\xfe\\x9b31m.safetensors" in r.stdout.splitlines()[0]


@pytest.mark.parametrize("where", ["manifest", "header"])
def test_a_key_given_twice_is_refused(base: Path, tmp_path: Path, where: str) -> None:
    """Python's json keeps the last of two equal keys, other readers the first: a bundle whose
    JSON says two things is refused instead of read one way."""
    raw = base.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = raw[8 : 8 + n].decode(), raw[8 + n :]
    if where == "manifest":
        m = json.loads(json.loads(header)["__metadata__"]["dualtui"])
        text = json.dumps(m).replace('"tasks": ', '"tasks": ["other"], "tasks": ', 1)
        h = json.loads(header)
        h["__metadata__"]["dualtui"] = text
        new = json.dumps(h)
    else:
        new = header.replace('{"__metadata__":', '{"__metadata__":{"format":"pt"},"__metadata__":', 1)
    assert new != header
    body = new.encode()
    body += b" " * ((-len(body)) % 8)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    r = runner.invoke(app, ["info", str(path)])
    _check(r, True, ["info"])
    assert "appears twice" in r.stderr


def test_a_query_position_outside_the_context_is_refused(tmp_path: Path) -> None:
    t, m = _load(TEXT_SAMPLE)
    name = "queries/test/layer/head/position"
    _set(t, name, 0, 10**6)
    path = _write(tmp_path / "p.safetensors", t, m)
    for cmd in (["verify"], ["rank", "--test", "0"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
        assert "outside the 16-token context" in r.stderr


@pytest.mark.parametrize("key, value", [("not_covered", '"abc"'), ("not_covered", "[1, 2]"),
                                        ("attribution.layers.net.4", "1" + "0" * 400)])
def test_manifest_fields_readers_print_have_their_types(base: Path, tmp_path: Path, key: str, value: str) -> None:
    """Found by benchmarks/fuzz_bundles.py: a string not_covered crashed info (join), a 400-digit
    number in attribution.layers overflowed every command's float()."""
    t, m = _load(base)
    marker = "\u2603"
    if key == "not_covered":
        m["not_covered"] = marker
    else:
        m["attribution"]["layers"]["net.4"] = marker
    text = json.dumps(m).replace(json.dumps(marker), value)
    path = _write(tmp_path / "f.safetensors", t, text)
    for cmd in (["info"], ["verify"], ["rank", "--test", "0"]):
        r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]])
        _check(r, True, cmd)
