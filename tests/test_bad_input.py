"""Every way a bundle can be broken ends in exit code 3 and one stderr line naming the file and
the problem, never a traceback (DESIGN.md section 5). Broken files are made from a valid bundle
written by the independent implementation (tests/independent_v1.py)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

import independent_v1 as iv
from independent_v1 import LayerPlan

from dualtui.cli import app

runner = CliRunner()
INVALID = 3


def base() -> iv.ValidBundle:
    """A small valid text bundle: an embedding layer and a two-chunk linear layer with bias."""
    return iv.make_valid_bundle(
        np.random.default_rng(7),
        [LayerPlan("tok", kind="embedding", in_features=6, out_features=4, bias=False, patterns=10),
         LayerPlan("net.1", in_features=4, out_features=3, bias=True, patterns=12, chunks=2)],
        text=True, n_train=8, n_test=3, classes=["x", "y", "z"], tasks=["t0", "t1"],
    )


def chunk_names(vb: iv.ValidBundle, field: str) -> list[str]:
    return [f"layer/net.1/{field}/{c}" for c in range(2)]


def nonempty_chunk(vb: iv.ValidBundle, field: str) -> str:
    return next(n for n in chunk_names(vb, field) if vb.tensors[n].shape[0] > 0)


def set_entry(vb: iv.ValidBundle, name: str, index: tuple | int, value: float | int) -> None:
    t = vb.tensors[name]
    data = t.as_float64() if t.dtype in iv.FLOAT_ST else t.data.copy()
    data[index] = value
    vb.tensors[name] = iv.tensor(data, t.dtype)


# ----------------------------------------------------------------------------- case makers
# Each returns (path to pass on the command line, path the message must name).
Case = Callable[[Path], tuple[Path, Path]]


def same(p: Path) -> tuple[Path, Path]:
    return p, p


def text_file(tmp: Path):
    p = tmp / "notes.safetensors"
    p.write_text("these are my notes about the run\nsecond line\n")
    return same(p)


def short_text_file(tmp: Path):
    p = tmp / "hi.safetensors"
    p.write_text("hi\n")
    return same(p)


def png_file(tmp: Path):
    p = tmp / "plot.safetensors"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x06\x00\x00\x00" + bytes(range(256)))
    return same(p)


def empty_file(tmp: Path):
    p = tmp / "empty.safetensors"
    p.write_bytes(b"")
    return same(p)


def directory(tmp: Path):
    p = tmp / "adir.safetensors"
    p.mkdir()
    return same(p)


def nonexistent(tmp: Path):
    return same(tmp / "nope" / "missing.safetensors")


def unrelated_json(tmp: Path):
    p = tmp / "config.json"
    p.write_text(json.dumps({"hidden_size": 4}))
    return same(p)


def truncated_in_header(tmp: Path):
    p = base().write(tmp / "cut-header.safetensors")
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    p.write_bytes(data[: 8 + n // 2])
    return same(p)


def truncated_in_data(tmp: Path):
    p = base().write(tmp / "cut-data.safetensors")
    data = p.read_bytes()
    p.write_bytes(data[:-37])
    return same(p)


def header_too_large(tmp: Path):
    p = tmp / "huge-header.safetensors"
    p.write_bytes(struct.pack("<Q", 200_000_000) + b'{"__metadata__": {"dualtui": "{}"}}')
    return same(p)


def trailing_garbage(tmp: Path):
    p = base().write(tmp / "trailing.safetensors")
    with open(p, "ab") as f:
        f.write(b"\x00" * 16)
    return same(p)


def missing_manifest(tmp: Path):
    vb = base()
    return same(iv.write_single(tmp / "plain.safetensors", vb.tensors, None, extra_metadata={"format": "pt"}))


def missing_manifest_no_metadata(tmp: Path):
    vb = base()
    return same(iv.write_single(tmp / "nometa.safetensors", vb.tensors, None))


def bad_json_manifest(tmp: Path):
    vb = base()
    return same(iv.write_single(tmp / "badjson.safetensors", vb.tensors, '{"format": "dualtui.bundle", "version": 1, "layers": ['))


def manifest_not_object(tmp: Path):
    vb = base()
    return same(iv.write_single(tmp / "list.safetensors", vb.tensors, "[1, 2, 3]"))


def manifest_without_layers(tmp: Path):
    vb = base()
    del vb.manifest["layers"]
    return same(vb.write(tmp / "nolayers.safetensors"))


def version_4(tmp: Path):
    vb = base()
    vb.manifest["version"] = 4
    return same(vb.write(tmp / "v2.safetensors"))


def version_3_without_dual_form(tmp: Path):
    vb = base()
    vb.manifest["version"] = 3  # an approximate bundle's version: it must say what its dual form is
    vb.manifest["query_sets"] = []
    return same(vb.write(tmp / "v3.safetensors"))


def missing_tensor(tmp: Path):
    vb = base()
    del vb.tensors["layer/net.1/values/1"]
    return same(vb.write(tmp / "missing.safetensors"))


def missing_weight(tmp: Path):
    vb = base()
    del vb.tensors["layer/tok/weight"]
    return same(vb.write(tmp / "noweight.safetensors"))


def shape_mismatch_weight(tmp: Path):
    vb = base()
    vb.tensors["layer/net.1/weight"] = iv.tensor(np.zeros((3, 5), np.float32))
    return same(vb.write(tmp / "shape.safetensors"))


def shape_mismatch_patterns(tmp: Path):
    vb = base()
    vb.manifest["layers"][1]["patterns"] = 13
    return same(vb.write(tmp / "patterns.safetensors"))


def shape_mismatch_chunk_lengths(tmp: Path):
    vb = base()
    name = nonempty_chunk(vb, "example")
    vb.tensors[name] = iv.tensor(vb.tensors[name].data[:-1])
    return same(vb.write(tmp / "chunklen.safetensors"))


def dtype_mismatch_weight(tmp: Path):
    vb = base()
    vb.tensors["layer/net.1/weight"] = iv.tensor(vb.tensors["layer/net.1/weight"].data, "F16")
    return same(vb.write(tmp / "dtype.safetensors"))


def dtype_mismatch_step(tmp: Path):
    vb = base()
    vb.tensors["layer/net.1/step/0"] = iv.tensor(vb.tensors["layer/net.1/step/0"].data, "I32")
    return same(vb.write(tmp / "step32.safetensors"))


def sharded_missing_shard(tmp: Path):
    index = base().write_sharded(tmp / "run.safetensors", 3)
    shard = tmp / "run-00002-of-00003.safetensors"
    shard.unlink()
    return index, shard


def sharded_missing_shard_by_name(tmp: Path):
    base().write_sharded(tmp / "run.safetensors", 2)
    shard = tmp / "run-00001-of-00002.safetensors"
    shard.unlink()
    return tmp / "run.safetensors", shard


def sharded_bad_index(tmp: Path):
    index = base().write_sharded(tmp / "run.safetensors", 2)
    index.write_text(index.read_text()[:-20])
    return same(index)


def sharded_truncated_shard(tmp: Path):
    index = base().write_sharded(tmp / "run.safetensors", 2)
    shard = tmp / "run-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    return index, shard


def header_nested_too_deeply(tmp: Path):
    p = tmp / "deep.safetensors"
    raw = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return same(p)


def manifest_nested_too_deeply(tmp: Path):
    return same(iv.write_single(tmp / "deepman.safetensors", base().tensors, '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"))


def index_nested_too_deeply(tmp: Path):
    p = tmp / "deep.safetensors.index.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    return same(p)


def index_manifest_as_object(tmp: Path):
    """The index is JSON already, so writing the manifest as an object (not a string) is an easy slip."""
    vb = base()
    index = vb.write_sharded(tmp / "run.safetensors", 2)
    d = json.loads(index.read_text())
    d["metadata"]["dualtui"] = vb.manifest
    index.write_text(json.dumps(d))
    return same(index)


def absurd_chunk_count(tmp: Path):
    vb = base()
    vb.manifest["layers"][0]["chunks"] = 10**20  # must be refused without listing 10**20 names
    return same(vb.write(tmp / "chunks.safetensors"))


def _edit_header(p: Path, edit: Callable[[dict], None]) -> Path:
    data = p.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    return p


def dtype_not_a_string(tmp: Path):
    return same(_edit_header(base().write(tmp / "dt.safetensors"), lambda h: h["layer/tok/w0"].update(dtype=["F32"])))


def shape_infinite(tmp: Path):
    return same(_edit_header(base().write(tmp / "inf.safetensors"), lambda h: h["layer/tok/w0"].update(shape=[float("inf"), 4])))


def offsets_overlap(tmp: Path):
    def edit(h: dict) -> None:
        lo, hi = h["layer/tok/w0"]["data_offsets"]
        h["layer/tok/w0"]["data_offsets"] = [lo + 4, hi + 4]

    return same(_edit_header(base().write(tmp / "overlap.safetensors"), edit))


def bytes_do_not_match_shape(tmp: Path):
    return same(_edit_header(base().write(tmp / "span.safetensors"), lambda h: h["layer/tok/w0"].update(shape=[5, 4])))


STRUCTURAL: dict[str, tuple[Case, str]] = {
    # case: (maker, the problem the message must name)
    "text file": (text_file, "not a safetensors file"),
    "short text file": (short_text_file, "not a safetensors file"),
    "PNG bytes": (png_file, "not a safetensors file"),
    "empty file": (empty_file, "not a safetensors file"),
    "directory": (directory, "is a directory"),
    "nonexistent path": (nonexistent, "no such file"),
    "unrelated json": (unrelated_json, "weight_map"),
    "truncated in header": (truncated_in_header, "truncated file"),
    "truncated in data": (truncated_in_data, "truncated file"),
    "header too large": (header_too_large, "header too large"),
    "bytes after the last tensor": (trailing_garbage, "after the last tensor"),
    "missing manifest": (missing_manifest, "missing manifest"),
    "missing manifest, no metadata": (missing_manifest_no_metadata, "missing manifest"),
    "unparseable manifest": (bad_json_manifest, "unparseable manifest"),
    "manifest not an object": (manifest_not_object, "unparseable manifest"),
    "manifest without layers": (manifest_without_layers, "layers"),
    "format version 4": (version_4, "unknown format version"),
    "format version 3 without dual_form": (version_3_without_dual_form, "needs 'dual_form'"),
    "missing tensor": (missing_tensor, "missing tensor"),
    "missing weight": (missing_weight, "missing tensor"),
    "weight shape": (shape_mismatch_weight, "shape disagrees with manifest"),
    "pattern count": (shape_mismatch_patterns, "shape disagrees with manifest"),
    "chunk lengths differ": (shape_mismatch_chunk_lengths, "shape disagrees with manifest"),
    "weight dtype": (dtype_mismatch_weight, "dtype disagrees with manifest"),
    "step dtype": (dtype_mismatch_step, "dtype disagrees with manifest"),
    "sharded: index points at a missing shard": (sharded_missing_shard, "no such file"),
    "sharded: opened by name, shard missing": (sharded_missing_shard_by_name, "no such file"),
    "sharded: index is not JSON": (sharded_bad_index, "not valid JSON"),
    "sharded: truncated shard": (sharded_truncated_shard, "truncated file"),
    "header nested too deeply": (header_nested_too_deeply, "not a safetensors file"),
    "manifest nested too deeply": (manifest_nested_too_deeply, "unparseable manifest"),
    "index nested too deeply": (index_nested_too_deeply, "not valid JSON"),
    "sharded: manifest as an object": (index_manifest_as_object, "unparseable manifest"),
    "absurd chunk count": (absurd_chunk_count, "missing tensor"),
    "dtype not a string": (dtype_not_a_string, "not a safetensors file"),
    "shape Infinity": (shape_infinite, "not a safetensors file"),
    "offsets overlap": (offsets_overlap, "not a safetensors file"),
    "byte span disagrees with shape": (bytes_do_not_match_shape, "not a safetensors file"),
}


# Content errors: the headers are fine, the numbers are not. `verify` reads every number.
def content_case(mutate: Callable[[iv.ValidBundle], None]) -> Case:
    def make(tmp: Path):
        vb = base()
        mutate(vb)
        return same(vb.write(tmp / f"{mutate.__name__}.safetensors"))

    make.__name__ = mutate.__name__
    return make


def example_id_too_large(vb):
    set_entry(vb, nonempty_chunk(vb, "example"), 0, vb.n_train)


def example_id_negative(vb):
    set_entry(vb, "layer/tok/example", 3, -1)


def train_label_too_large(vb):
    set_entry(vb, "train/label", 2, 3)  # 3 classes


def prediction_too_large(vb):
    set_entry(vb, "test/prediction", 0, 17)


def task_too_large(vb):
    set_entry(vb, "train/task", 0, 2)  # 2 tasks


def token_too_large(vb):
    set_entry(vb, "layer/tok/keys", 4, 6)  # vocab 6


def query_token_too_large(vb):
    set_entry(vb, "layer/tok/queries", 1, 99)


def nan_in_values(vb):
    set_entry(vb, nonempty_chunk(vb, "values"), (0, 1), np.nan)


def inf_in_keys(vb):
    set_entry(vb, nonempty_chunk(vb, "keys"), (0, 0), np.inf)


def nan_in_weight(vb):
    set_entry(vb, "layer/tok/weight", (2, 1), np.nan)


def inf_in_w0(vb):
    set_entry(vb, "layer/net.1/w0", (0, 0), -np.inf)


def nan_in_queries(vb):
    set_entry(vb, "layer/net.1/queries", (0, 0), np.nan)


def step_decreasing(vb):
    n = vb.tensors["layer/tok/step"].shape[0]
    vb.tensors["layer/tok/step"] = iv.tensor(np.arange(n, dtype=np.int64)[::-1].copy())


def step_decreasing_across_chunks(vb):
    a, b = chunk_names(vb, "step")
    vb.tensors[a] = iv.tensor(np.full(vb.tensors[a].shape[0], 5, np.int64))
    vb.tensors[b] = iv.tensor(np.full(vb.tensors[b].shape[0], 4, np.int64))


CONTENT: dict[str, tuple[Case, str]] = {
    "example id >= N": (content_case(example_id_too_large), "id out of range"),
    "example id < 0": (content_case(example_id_negative), "id out of range"),
    "train label >= classes": (content_case(train_label_too_large), "id out of range"),
    "test prediction >= classes": (content_case(prediction_too_large), "id out of range"),
    "task >= tasks": (content_case(task_too_large), "id out of range"),
    "embedding token >= vocab": (content_case(token_too_large), "id out of range"),
    "query token >= vocab": (content_case(query_token_too_large), "id out of range"),
    "NaN in values": (content_case(nan_in_values), "non-finite"),
    "Inf in keys": (content_case(inf_in_keys), "non-finite"),
    "NaN in weight": (content_case(nan_in_weight), "non-finite"),
    "-Inf in w0": (content_case(inf_in_w0), "non-finite"),
    "NaN in queries": (content_case(nan_in_queries), "non-finite"),
    "step decreasing": (content_case(step_decreasing), "steps out of order"),
    "step decreasing across chunks": (content_case(step_decreasing_across_chunks), "steps out of order"),
}


def assert_one_line_error(result, named: Path, problem: str) -> None:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == INVALID, result.output
    assert result.stdout == ""  # stdout carries data only
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("dualtui: error: ")
    assert str(named) in line, line
    assert problem in line, line


def test_every_case_breaks_the_independent_checker_too(tmp_path: Path) -> None:
    """The broken bundles are broken by the spec, not only by dualtui's reading of it."""
    for i, (label, (make, _)) in enumerate({**STRUCTURAL, **CONTENT}.items()):
        d = tmp_path / f"c{i}"
        d.mkdir()
        path, _ = make(d)
        with pytest.raises(Exception):
            iv.check_invariants(path)


def test_base_bundle_is_valid(tmp_path: Path) -> None:
    path = base().write(tmp_path / "ok.safetensors")
    iv.check_invariants(path)
    for cmd in ("info", "verify"):
        assert runner.invoke(app, [cmd, str(path)]).exit_code == 0


@pytest.mark.parametrize("command", ["info", "verify"])
@pytest.mark.parametrize("case", list(STRUCTURAL))
def test_structural_error(tmp_path: Path, case: str, command: str) -> None:
    make, problem = STRUCTURAL[case]
    path, named = make(tmp_path)
    result = runner.invoke(app, [command, "--json", str(path)])
    assert_one_line_error(result, named, problem)


@pytest.mark.parametrize("case", list(CONTENT))
def test_content_error_fails_verify(tmp_path: Path, case: str) -> None:
    make, problem = CONTENT[case]
    path, named = make(tmp_path)
    assert_one_line_error(runner.invoke(app, ["verify", str(path)]), named, problem)
    assert_one_line_error(runner.invoke(app, ["verify", "--json", str(path)]), named, problem)
    # `info` reads headers only: it may accept the file, but never with a traceback.
    result = runner.invoke(app, ["info", "--json", str(path)])
    assert "Traceback" not in result.output
    assert result.exit_code in (0, INVALID)
    if result.exit_code == 0:
        assert json.loads(result.stdout)["version"] == 1


def test_file_name_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    vb = base()
    vb.manifest["version"] = 4
    path = vb.write(tmp_path / "bad\nname.safetensors")
    result = runner.invoke(app, ["info", str(path)])
    assert result.exit_code == INVALID
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, result.stderr
    assert "bad\\nname.safetensors" in lines[0] and "unknown format version" in lines[0]


def dualtui_command() -> list[str]:
    import shutil

    exe = shutil.which("dualtui")
    return [exe] if exe else [sys.executable, "-c", "from dualtui.cli import main; main()"]


@pytest.mark.parametrize(
    "command, case",
    [("verify", "text file"), ("info", "truncated in data"), ("info", "sharded: index points at a missing shard"),
     ("verify", "NaN in values"), ("verify", "step decreasing")],
)
def test_console_script_prints_one_line(tmp_path: Path, command: str, case: str) -> None:
    """The installed `dualtui` script, in a real process: exit 3, one stderr line, no traceback."""
    make, problem = {**STRUCTURAL, **CONTENT}[case]
    path, named = make(tmp_path)
    out = subprocess.run(dualtui_command() + [command, str(path)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stderr + out.stdout
    assert out.returncode == INVALID, out.stderr
    assert out.stdout == ""
    lines = out.stderr.strip("\n").splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("dualtui: error: ") and str(named) in lines[0] and problem in lines[0], lines[0]
