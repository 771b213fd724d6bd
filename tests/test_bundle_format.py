"""Format v1 against an independent implementation (tests/independent_v1.py), both ways:
dualtui reads what the independent writer wrote, and the independent checker accepts what
dualtui's Recorder/BundleWriter wrote. Plus lazy opening of a huge file and atomic finalize."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import independent_v1 as iv
import independent_v2 as iv2
from independent_v1 import LayerPlan

from dualtui.bundle import Bundle, BundleWriter, LayerSpec, Manifest
from dualtui.cli import app
from dualtui.engine.verify import verify_bundle

runner = CliRunner()


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# ----------------------------------------------------------------------------- dualtui reads independent bundles
VARIANTS = {
    # name: (layers, make_valid_bundle kwargs, how to write)
    "single-f32-unaligned": ([LayerPlan("net.0", in_features=5, out_features=4), LayerPlan("net.2", in_features=4, out_features=3, bias=False)],
                             {}, {"align": 0}),
    "chunked-f32": ([LayerPlan("enc.block.0", in_features=6, out_features=5, patterns=30, chunks=4),
                     LayerPlan("head", in_features=5, out_features=3, patterns=30, chunks=3)], {}, {}),
    "float16-chunked": ([LayerPlan("a", in_features=5, out_features=4, patterns=25, chunks=2)], {"storage": "float16"}, {}),
    "bfloat16": ([LayerPlan("a", in_features=5, out_features=4, patterns=25), LayerPlan("b", in_features=4, out_features=2, bias=False)],
                 {"storage": "bfloat16"}, {}),
    "embedding-text": ([LayerPlan("tok", kind="embedding", in_features=9, out_features=4, bias=False, patterns=40, chunks=2),
                        LayerPlan("out", in_features=4, out_features=3, patterns=20)], {"text": True}, {}),
    "sharded-index-path": ([LayerPlan("net.0", in_features=5, out_features=4, patterns=20, chunks=2),
                            LayerPlan("tok", kind="embedding", in_features=6, out_features=5, bias=False)],
                           {"storage": "bfloat16"}, {"shards": 3}),
    "sharded-name-path": ([LayerPlan("net.0", in_features=5, out_features=4)], {}, {"shards": 2, "open_by_name": True}),
}


def write_variant(tmp_path: Path, name: str, seed: int = 0) -> tuple[iv.ValidBundle, Path]:
    layers, kw, how = VARIANTS[name]
    vb = iv.make_valid_bundle(np.random.default_rng(seed), layers, **kw)
    path = tmp_path / f"{name}.safetensors"
    if "shards" in how:
        index = vb.write_sharded(path, how["shards"])
        return vb, (path if how.get("open_by_name") else index)
    return vb, vb.write(path, align=how.get("align", 8))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_dualtui_reads_independent_bundle(tmp_path: Path, variant: str) -> None:
    vb, path = write_variant(tmp_path, variant)
    iv.check_invariants(path)  # the independent side agrees with itself
    if VARIANTS[variant][2].get("align") == 0:
        (n,) = struct.unpack("<Q", path.read_bytes()[:8])
        assert (8 + n) % 8 == 3  # float32 data starts misaligned: readers must cope

    res = cli("verify", "--json", str(path))
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["ok"] is True
    assert [layer["name"] for layer in report["layers"]] == [p.name for p in vb.plans]

    res = cli("info", "--json", str(path))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["version"] == 1
    assert info["tasks"] == vb.manifest["tasks"]
    assert info["classes"] == vb.manifest["classes"]
    assert info["train_size"] == vb.n_train
    assert info["test_size"] == vb.n_test
    assert info["sharded"] == ("shards" in VARIANTS[variant][2])
    got = [(layer["name"], layer["kind"], layer["in_features"], layer["out_features"], layer["bias"], layer["patterns"], layer["chunks"])
           for layer in info["layers"]]
    want = [(p.name, p.kind, p.in_features, p.out_features, p.bias, p.patterns, p.chunks) for p in vb.plans]
    assert got == want
    storage = VARIANTS[variant][1].get("storage", "float32")
    assert all(layer["storage_dtype"] == storage for layer in info["layers"])


@pytest.mark.parametrize("variant", ["chunked-f32", "bfloat16", "embedding-text", "sharded-index-path"])
def test_dualtui_streams_the_same_numbers(tmp_path: Path, variant: str) -> None:
    """Every pattern dualtui streams (chunk by chunk, sub-split) is the number we stored."""
    vb, path = write_variant(tmp_path, variant, seed=3)
    b = Bundle.open(path)
    for plan in vb.plans:
        chunks = list(b.chunks(plan.name, rows=3))
        for f in ("keys", "values", "step", "example") + (("position",) if VARIANTS[variant][1].get("text") else ()):
            got = np.concatenate([getattr(c, f) for c in chunks]) if chunks else np.zeros(0)
            parts = [vb.tensors[vb.pattern_name(plan.name, f, c)] for c in range(plan.chunks)]
            want = np.concatenate([p.as_float64() for p in parts])
            np.testing.assert_array_equal(got.astype(np.float64), want, err_msg=f"{plan.name}/{f}")
        assert [c.start for c in chunks] == sorted(c.start for c in chunks)
        w = b.array(f"layer/{plan.name}/weight")
        np.testing.assert_array_equal(w, vb.tensors[f"layer/{plan.name}/weight"].data)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_perturbed_weight_fails_verify(tmp_path: Path, storage: str) -> None:
    vb = iv.make_valid_bundle(np.random.default_rng(1), [LayerPlan("net.0", in_features=5, out_features=4), LayerPlan("net.2", in_features=4, out_features=3)],
                              storage=storage)
    w = vb.tensors["layer/net.2/weight"].data.copy()
    w[1, 2] += 1.0  # far beyond 1e-4·max|W| and beyond any rounding allowance of these tiny layers
    vb.tensors["layer/net.2/weight"] = iv.tensor(w)
    path = vb.write(tmp_path / "bad.safetensors")
    with pytest.raises(iv.InvariantError):
        iv.check_invariants(path, rounding_allowance=True)
    res = cli("verify", "--json", str(path))
    assert res.exit_code == 1, res.output
    report = json.loads(res.stdout)
    assert report["ok"] is False
    assert {layer["name"]: layer["ok"] for layer in report["layers"]} == {"net.0": True, "net.2": False}


def test_perturbed_bias_fails_verify(tmp_path: Path) -> None:
    vb = iv.make_valid_bundle(np.random.default_rng(2), [LayerPlan("l", in_features=3, out_features=2)])
    b = vb.tensors["layer/l/bias"].data.copy()
    b[0] += 0.01
    vb.tensors["layer/l/bias"] = iv.tensor(b)
    res = cli("verify", str(vb.write(tmp_path / "bias.safetensors")))
    assert res.exit_code == 1, res.output


def test_just_within_tolerance_passes(tmp_path: Path) -> None:
    """The float32 tolerance is 1e-4·max(1, max|W|): half of it passes, twice of it fails."""
    vb = iv.make_valid_bundle(np.random.default_rng(4), [LayerPlan("l", in_features=3, out_features=2, bias=False)])
    base = vb.tensors["layer/l/weight"].data.astype(np.float64)
    tol = 1e-4 * max(1.0, float(np.abs(base).max()))
    for factor, code in ((0.5, 0), (2.0, 1)):
        w = base.copy()
        w[0, 0] += factor * tol
        vb.tensors["layer/l/weight"] = iv.tensor(w.astype(np.float32))
        res = cli("verify", str(vb.write(tmp_path / f"tol{factor}.safetensors")))
        assert res.exit_code == code, (factor, res.output)


plans = st.lists(
    st.builds(
        dict,
        kind=st.sampled_from(["linear", "linear", "embedding"]),
        i=st.integers(1, 6),
        o=st.integers(1, 5),
        bias=st.booleans(),
        patterns=st.integers(0, 30),
        chunks=st.integers(1, 4),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans=plans, storage=st.sampled_from(["float32", "float16", "bfloat16"]), seed=st.integers(0, 2**32 - 1),
       sharded=st.booleans(), n_test=st.integers(0, 3))
def test_property_random_valid_bundles_verify(plans: list[dict], storage: str, seed: int, sharded: bool, n_test: int) -> None:
    layers = [
        LayerPlan(f"m.{j}", kind=p["kind"], in_features=p["i"], out_features=p["o"], bias=p["bias"] and p["kind"] == "linear",
                  patterns=p["patterns"], chunks=p["chunks"])
        for j, p in enumerate(plans)
    ]
    vb = iv.make_valid_bundle(np.random.default_rng(seed), layers, storage=storage, n_test=n_test)
    with tempfile.TemporaryDirectory() as d:
        path = vb.write_sharded(Path(d) / "p.safetensors", 2) if sharded else vb.write(Path(d) / "p.safetensors")
        iv.check_invariants(path)
        b = Bundle.open(path)
        report = verify_bundle(b)
        assert report.ok, report.to_json()
        assert [s.patterns for s in b.manifest.layers] == [p.patterns for p in layers]


# ----------------------------------------------------------------------------- independent checker reads dualtui bundles
def _train_tiny(path: Path, *, storage: str = "float32", embedding: bool = False, full_tables: bool = True, **recorder_kw) -> Path:
    import torch
    from torch import nn

    from dualtui.record import Recorder

    torch.manual_seed(0)
    n, ctx, vocab = 24, 3, 7
    if embedding:
        model = nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * ctx, 3))
        X = torch.randint(0, vocab, (n, ctx))
        inp = {"kind": "text", "vocab": [f"t{i}" for i in range(vocab)], "context": ctx}
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        X = torch.randn(n, 5)
        inp = {"kind": "vector"}
    Y = torch.randint(0, 3, (n,))
    task = (torch.arange(n) >= n // 2).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    with Recorder(model, opt, path, storage_dtype=storage, tasks=["first", "second"], classes=["a", "b", "c"],
                  input=inp, train_inputs=X, **({"train_labels": Y, "train_tasks": task} if full_tables else {}),
                  **recorder_kw) as rec:
        for step in range(8):
            idx = torch.randint(0, n, (4,))
            with rec.batch(example=idx, label=Y[idx], task=task[idx]):
                nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
            opt.step()
            opt.zero_grad()
        rec.record_test(X[:5], Y[:5], tasks=task[:5])
    return rec.writer.path if not recorder_kw.get("max_shard_bytes") else path.with_name(path.name + ".index.json")


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"chunk_bytes": 300},  # many chunks per layer
        {"chunk_bytes": 300, "max_shard_bytes": 1500},  # sharded set
        {"embedding": True, "chunk_bytes": 500},
        {"storage": "bfloat16"},
        {"storage": "float16", "embedding": True},
    ],
    ids=["plain", "chunked", "sharded", "embedding", "bfloat16", "float16-embedding"],
)
def test_recorder_bundle_passes_independent_checker(tmp_path: Path, kw: dict) -> None:
    from safetensors import safe_open

    path = _train_tiny(tmp_path / "rec.safetensors", **kw)
    assert path.exists()
    report = iv2.check_invariants(path)  # the recorder writes version 2
    assert report["layers"] and all(r["patterns"] > 0 for r in report["layers"].values())
    assert set(report["query_sets"]) == {"test"}
    if "chunk_bytes" in kw:
        man = json.loads(json.loads(path.read_text())["metadata"]["dualtui"]) if path.name.endswith(".json") else \
            json.loads(iv.read_raw_header(path)["__metadata__"]["dualtui"])
        assert any(layer["chunks"] > 1 for layer in man["layers"])

    # Compatibility: every file opens with the reference library and holds what dualtui reads.
    b = Bundle.open(path)
    files = b.files
    assert (len(files) > 1) == ("max_shard_bytes" in kw)
    seen = set()
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for name in sf.keys():
                seen.add(name)
                ref = sf.get_tensor(name)
                ref = ref.double().numpy() if ref.is_floating_point() else ref.numpy()
                np.testing.assert_array_equal(b.array(name).astype(ref.dtype), ref, err_msg=name)
    assert seen == set(b.tensor_names)


def test_recorder_bundle_info_matches_manifest(tmp_path: Path) -> None:
    path = _train_tiny(tmp_path / "rec.safetensors", chunk_bytes=300)
    res = cli("info", "--json", str(path))
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    header = iv.read_raw_header(path)
    man = json.loads(header["__metadata__"]["dualtui"])
    assert info["tasks"] == man["tasks"] == ["first", "second"]
    assert [layer["name"] for layer in info["layers"]] == [layer["name"] for layer in man["layers"]] == ["0", "2"]
    assert info["train_size"] == header["train/label"]["shape"][0]
    assert info["test_size"] == 5
    assert cli("verify", str(path)).exit_code == 0


# Regression: train/label used to be sized by the example ids seen, not by train_inputs.
def test_recorder_with_train_inputs_only(tmp_path: Path) -> None:
    path = _train_tiny(tmp_path / "rec.safetensors", full_tables=False)
    iv2.check_invariants(path)
    assert cli("info", str(path)).exit_code == 0


# ----------------------------------------------------------------------------- lazy opening of a huge file
LAZY_SCRIPT = textwrap.dedent(
    """
    import json, os, resource, subprocess, sys, time

    def peak_kb():
        try:
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)

    from dualtui.bundle import Bundle
    from dualtui.cli import app, info_json
    from typer.testing import CliRunner
    path = sys.argv[1]
    base = peak_kb()
    t = time.perf_counter()
    b = Bundle.open(path)
    d = info_json(b)
    res = CliRunner().invoke(app, ["info", "--json", path])
    elapsed = time.perf_counter() - t
    grown = peak_kb() - base
    t = time.perf_counter()
    child = subprocess.run(sys.argv[2:] + ["info", "--json", path], capture_output=True, text=True, timeout=60)
    child_elapsed = time.perf_counter() - t
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // (1024 if sys.platform == "darwin" else 1)
    print(json.dumps({"elapsed": elapsed, "grown_kb": grown, "patterns": d["layers"][0]["patterns"],
                      "cli_exit": res.exit_code, "child_rc": child.returncode, "child_err": child.stderr,
                      "child_elapsed": child_elapsed, "child_peak_kb": child_peak,
                      "child_patterns": json.loads(child.stdout)["layers"][0]["patterns"] if child.returncode == 0 else None}))
    """
)


def _sparse_supported(directory: Path) -> bool:
    probe = directory / "sparse-probe"
    try:
        with open(probe, "wb") as f:
            f.truncate(256 << 20)
        return os.stat(probe).st_blocks * 512 < (1 << 20)
    except OSError:
        return False
    finally:
        probe.unlink(missing_ok=True)


def dualtui_command() -> list[str]:
    import shutil

    exe = shutil.which("dualtui")
    return [exe] if exe else [sys.executable, "-c", "from dualtui.cli import main; main()"]


def test_lazy_open_of_a_10gb_sparse_bundle(tmp_path: Path) -> None:
    if not _sparse_supported(tmp_path):
        pytest.skip("file system does not support sparse files")
    i, o, T = 256, 2, 9_800_000  # keys: T x 256 float32 = 10.0 GB of zeros
    small = iv.make_valid_bundle(np.random.default_rng(0), [LayerPlan("big", in_features=i, out_features=o, patterns=0)])
    tensors = {n: t for n, t in small.tensors.items() if n.split("/")[-1] not in ("keys", "values", "step", "example")}
    for n in ("weight", "w0"):  # zeros: weight == w0 + 0, so the file is even a valid bundle
        tensors[f"layer/big/{n}"] = iv.tensor(np.zeros((o, i), np.float32))
    tensors["layer/big/bias"] = tensors["layer/big/b0"] = iv.tensor(np.zeros(o, np.float32))
    entries, pieces = iv.layout(tensors)
    offset = sum(len(p) for p in pieces)
    for name, dtype, shape, itemsize in (("keys", "F32", [T, i], 4), ("values", "F32", [T, o], 4), ("step", "I64", [T], 8), ("example", "I64", [T], 8)):
        nbytes = int(np.prod(shape)) * itemsize
        entries[f"layer/big/{name}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    manifest = dict(small.manifest)
    manifest["layers"] = [dict(small.manifest["layers"][0], patterns=T)]
    header, start = iv.pack_header(entries, {"dualtui": json.dumps(manifest)})
    path = tmp_path / "huge.safetensors"
    try:
        with open(path, "wb") as f:
            f.write(header)
            f.write(b"".join(pieces))
            f.truncate(start + offset)
    except OSError as e:
        pytest.skip(f"cannot make a sparse 10 GB file here: {e}")
    size = path.stat().st_size
    assert size > 10_000_000_000
    if path.stat().st_blocks * 512 > size // 100:
        pytest.skip("file system allocated the sparse file")

    out = subprocess.run([sys.executable, "-c", LAZY_SCRIPT, str(path), *dualtui_command()],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["patterns"] == T and r["cli_exit"] == 0
    assert r["elapsed"] < 10, r
    assert r["grown_kb"] < 64 * 1024, r  # opening touched headers, not 10 GB
    assert r["child_rc"] == 0 and "Traceback" not in r["child_err"], r
    assert r["child_patterns"] == T
    assert r["child_peak_kb"] < 1024 * 1024, r  # the whole console-script process stays far below the file size
    assert r["child_elapsed"] < 30, r


# ----------------------------------------------------------------------------- atomic finalize
def _writer_inputs(writer: BundleWriter, n: int = 40) -> tuple[Manifest, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    spec = LayerSpec("lin", "linear", 3, 2, False, 0, 1)
    writer.add_layer(spec)
    for s in range(n // 4):
        writer.append("lin", keys=rng.normal(size=(4, 3)).astype(np.float32), values=rng.normal(size=(4, 2)).astype(np.float32),
                      step=np.full(4, s, np.int64), example=rng.integers(0, 10, 4).astype(np.int64))
    # A version-1 layout written by the writer: it writes what it is given (readers read both).
    manifest = Manifest(layers=[spec], tasks=["t"], classes=["a", "b"], input={"kind": "vector"}, optimizer={}, training={},
                        version=1)
    static = {
        "layer/lin/weight": np.zeros((2, 3), np.float32), "layer/lin/w0": np.zeros((2, 3), np.float32),
        "layer/lin/queries": np.zeros((1, 3), np.float32), "layer/lin/query_grad": np.zeros((1, 2), np.float32),
        "train/label": np.zeros(10, np.int64), "train/task": np.zeros(10, np.int64),
        "test/label": np.zeros(1, np.int64), "test/task": np.zeros(1, np.int64), "test/prediction": np.zeros(1, np.int64),
    }
    return manifest, static


def _visible(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if not p.name.startswith(".")}


@pytest.mark.parametrize("existing", [False, True])
def test_crash_in_produce_leaves_no_file_under_final_name(tmp_path: Path, existing: bool) -> None:
    final = tmp_path / "run.safetensors"
    before = None
    if existing:
        iv.make_valid_bundle(np.random.default_rng(0)).write(final)
        before = final.read_bytes()
    writer = BundleWriter(final, chunk_bytes=200)
    manifest, static = _writer_inputs(writer)
    calls = []

    def transform(layer: str, values: np.ndarray, steps: np.ndarray) -> np.ndarray:
        calls.append(len(values))
        if len(calls) == 1:  # the first chunk went to disk already; die mid-file
            return values
        raise RuntimeError("simulated crash while writing values")

    with pytest.raises(RuntimeError, match="simulated crash"):
        writer.finalize(manifest, static, transform)
    assert len(calls) == 2
    if existing:
        assert final.read_bytes() == before
        assert cli("verify", str(final)).exit_code == 0
    else:
        assert not final.exists()
    assert _visible(tmp_path) == ({"run.safetensors"} if existing else set())
    writer.discard()


@pytest.mark.parametrize("sharded", [False, True])
def test_crash_in_write_file_leaves_old_bundle_untouched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sharded: bool) -> None:
    import dualtui.bundle.writer as writer_mod

    final = tmp_path / "run.safetensors"
    old = iv.make_valid_bundle(np.random.default_rng(5))
    old_files = {}
    if sharded:
        old.write_sharded(final, 2)
    else:
        old.write(final)
    for p in tmp_path.iterdir():
        old_files[p.name] = p.read_bytes()

    real = writer_mod.write_file
    calls = []

    def crashing(path, tensors, metadata, **kw):
        calls.append(Path(path).name)
        if len(calls) == (2 if sharded else 1):
            real(path, tensors, metadata, **kw)  # the bytes are all there; the crash comes before the rename
            raise OSError(28, "No space left on device (simulated)")
        return real(path, tensors, metadata, **kw)

    monkeypatch.setattr(writer_mod, "write_file", crashing)
    writer = BundleWriter(final, chunk_bytes=200, max_shard_bytes=600 if sharded else 4 << 30)
    manifest, static = _writer_inputs(writer)
    from dualtui.bundle.writer import OutputError

    with pytest.raises(OutputError, match=r"no space left on the device writing .*run\.safetensors"):
        writer.finalize(manifest, static, lambda layer, v, s: v)
    assert len(calls) == (2 if sharded else 1)
    assert _visible(tmp_path) == set(old_files)
    for name, data in old_files.items():
        assert (tmp_path / name).read_bytes() == data, name
    writer.discard()
    assert {p.name for p in tmp_path.iterdir()} == set(old_files)


def test_successful_finalize_is_valid_and_cleans_up(tmp_path: Path) -> None:
    final = tmp_path / "run.safetensors"
    writer = BundleWriter(final, chunk_bytes=200)
    manifest, static = _writer_inputs(writer)
    # weight = w0 + vᵀk must hold for the checker: compute it from the spooled patterns.
    k = np.concatenate([c["keys"] for c in writer.iter_chunks("lin")]).astype(np.float64)
    v = np.concatenate([c["values"] for c in writer.iter_chunks("lin")]).astype(np.float64)
    static["layer/lin/weight"] = (v.T @ k).astype(np.float32)
    out = writer.finalize(manifest, static, lambda layer, values, steps: values)
    assert out == final
    assert {p.name for p in tmp_path.iterdir()} == {"run.safetensors"}
    report = iv.check_invariants(final)
    assert report["lin"]["patterns"] == 40
    assert json.loads(iv.read_raw_header(final)["__metadata__"]["dualtui"])["layers"][0]["chunks"] > 1
