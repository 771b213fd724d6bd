"""An independent implementation of bundle format v1, written from DESIGN.md section 3 alone.

It never imports `dualtui`: the tests use it to write bundles that dualtui must read, and to
check bundles that dualtui writes. Two readings of one spec that agree are evidence that the
spec, not one implementation's habits, is what the files follow.

- `Tensor`, `bf16`, `tensor`: named tensors in a safetensors dtype (bfloat16 by bit rounding).
- `write_single` / `write_sharded`: lay out safetensors files with our own header packing.
- `make_valid_bundle`: a tiny random model whose dual form holds by construction.
- `check_invariants`: read any bundle (with the `safetensors` library) and assert the invariants.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# safetensors dtype name -> numpy dtype of the stored bytes (bfloat16 as its uint16 bits)
ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_FROM_NUMPY = {v: k for k, v in ST_DTYPES.items() if k != "BF16"}  # numpy dtype -> name (little-endian host)
STORAGE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
FLOAT_ST = {"F64", "F32", "F16", "BF16"}


# ----------------------------------------------------------------------------- tensors
@dataclass
class Tensor:
    """A tensor as it will be stored: safetensors dtype name and the array of its bytes."""

    dtype: str
    data: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def raw(self) -> bytes:
        return np.ascontiguousarray(self.data, dtype=ST_DTYPES[self.dtype]).tobytes()

    def as_float64(self) -> np.ndarray:
        return decode(self.dtype, self.data)


def tensor(a: Any, dtype: str | None = None) -> Tensor:
    """Wrap a numpy array; `dtype` ("F32", "F16", "BF16", "I64", ...) casts to it first."""
    a = np.asarray(a)
    if dtype is None:
        dtype = _FROM_NUMPY[a.dtype]
    if dtype == "BF16":
        return bf16(a)
    return Tensor(dtype, np.ascontiguousarray(a, dtype=ST_DTYPES[dtype]))


def bf16(a: Any) -> Tensor:
    """Round float values to bfloat16 (nearest, ties to even) by manipulating float32 bits."""
    f = np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32))
    bits = f.view(np.uint32).astype(np.uint64)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) >> 16).astype(np.uint16)
    rounded[np.isnan(f)] = 0x7FC0  # keep NaN a NaN whatever its payload
    return Tensor("BF16", rounded)


def decode(dtype: str, data: np.ndarray) -> np.ndarray:
    """Stored bytes -> float64 (floats) or int64 (ints) numpy array."""
    if dtype == "BF16":
        return (np.asarray(data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    if dtype in FLOAT_ST:
        return np.asarray(data).astype(np.float64)
    return np.asarray(data).astype(np.int64)


def quantize(a: np.ndarray, storage: str) -> Tensor:
    """float64 -> storage dtype (F32 / F16 / BF16)."""
    return bf16(a) if storage == "BF16" else tensor(np.asarray(a, dtype=np.float64), storage)


# ----------------------------------------------------------------------------- writing
def pack_header(entries: dict[str, dict], metadata: dict[str, str] | None, align: int = 8) -> tuple[bytes, int]:
    """8-byte little-endian length + JSON header, space-padded so the data starts at a multiple
    of `align`; `align=0` pads it to start 3 bytes past a multiple of 8 (deliberately misaligned,
    which the safetensors spec allows). Returns (bytes, data start)."""
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    obj.update(entries)
    raw = json.dumps(obj).encode("utf-8")
    if align > 1:
        raw += b" " * ((-(8 + len(raw))) % align)
    elif align == 0:
        raw += b" " * ((3 - (8 + len(raw))) % 8)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw)


def layout(tensors: dict[str, Tensor]) -> tuple[dict[str, dict], list[bytes]]:
    """Header entries with contiguous data_offsets, in dict order, and the data pieces."""
    entries, pieces, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.raw()
        entries[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        pieces.append(data)
        offset += len(data)
    return entries, pieces


def safetensors_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None, align: int = 8) -> bytes:
    entries, pieces = layout(tensors)
    header, _ = pack_header(entries, metadata, align)
    return header + b"".join(pieces)


def write_single(path: str | Path, tensors: dict[str, Tensor], manifest: dict | str | None, *,
                 align: int = 8, extra_metadata: dict[str, str] | None = None) -> Path:
    """One-file bundle. `manifest` may be a dict, a raw string (to write broken ones) or None."""
    metadata = dict(extra_metadata or {})
    if manifest is not None:
        metadata["dualtui"] = manifest if isinstance(manifest, str) else json.dumps(manifest)
    path = Path(path)
    path.write_bytes(safetensors_bytes(tensors, metadata or None, align))
    return path


def write_sharded(path: str | Path, tensors: dict[str, Tensor], manifest: dict | str, shards: int = 2) -> Path:
    """Hugging Face sharded set: NAME.safetensors.index.json + NAME-0000i-of-0000n.safetensors.

    `path` is NAME.safetensors; returns the index path. Tensors are dealt to shards in order,
    balanced by count (a tensor is never split across shards)."""
    path = Path(path)
    assert path.name.endswith(".safetensors")
    stem = path.name[: -len(".safetensors")]
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        shard_name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
        (path.parent / shard_name).write_bytes(safetensors_bytes(part, {"format": "pt"}))
        for n, t in part.items():
            weight_map[n] = shard_name
            total += len(t.raw())
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    index = {"metadata": {"total_size": total, "dualtui": text}, "weight_map": weight_map}
    index_path = path.with_name(path.name + ".index.json")
    index_path.write_text(json.dumps(index, indent=2))
    return index_path


# ----------------------------------------------------------------------------- a valid bundle
@dataclass
class LayerPlan:
    name: str
    kind: str = "linear"  # or "embedding"
    in_features: int = 4  # vocabulary size for an embedding
    out_features: int = 3
    bias: bool = True
    patterns: int = 12
    chunks: int = 1


@dataclass
class ValidBundle:
    """A bundle in memory: its tensors, its manifest, and the facts a test asserts against."""

    tensors: dict[str, Tensor]
    manifest: dict
    plans: list[LayerPlan]
    n_train: int
    n_test: int
    extra: dict = field(default_factory=dict)

    def write(self, path: str | Path, **kw: Any) -> Path:
        return write_single(path, self.tensors, self.manifest, **kw)

    def write_sharded(self, path: str | Path, shards: int = 2) -> Path:
        return write_sharded(path, self.tensors, self.manifest, shards)

    def pattern_name(self, layer: str, f: str, chunk: int = 0) -> str:
        plan = next(p for p in self.plans if p.name == layer)
        return f"layer/{layer}/{f}" + (f"/{chunk}" if plan.chunks > 1 else "")


def _split(total: int, parts: int, rng: np.random.Generator) -> list[int]:
    """`parts` chunk sizes summing to `total` (some may be empty)."""
    cuts = np.sort(rng.integers(0, total + 1, size=parts - 1))
    return [int(x) for x in np.diff(np.concatenate([[0], cuts, [total]]))]


def make_valid_bundle(
    rng: np.random.Generator,
    layers: list[LayerPlan] | None = None,
    *,
    storage: str = "float32",
    n_train: int = 10,
    n_test: int = 3,
    tasks: list[str] | None = None,
    classes: list[str] | None = None,
    text: bool = False,
    labels_are_tokens: bool = False,
    steps_per_pattern: int = 2,
) -> ValidBundle:
    """A tiny model whose dual form is exact by construction.

    w0, keys and values are random; keys and values are rounded to the storage dtype first and
    the weight is then computed from the *stored* numbers in float64 (w0 + valuesᵀ keys, or
    row-wise scatter-adds for an embedding) and cast to float32 once.

    `labels_are_tokens` (implies `text`): a language model, whose classes are the vocabulary's
    token strings, so every label and prediction is a token id (`classes` must then be None)."""
    layers = layers or [LayerPlan("net.0", in_features=5, out_features=4), LayerPlan("net.2", in_features=4, out_features=3, bias=False)]
    st = STORAGE[storage]
    text = text or labels_are_tokens
    tasks = tasks if tasks is not None else ["task a", "task b"]
    context = 4
    vocab_size = next((p.in_features for p in layers if p.kind == "embedding"), 7)
    vocab = [f"tok{j}" for j in range(vocab_size)]
    if labels_are_tokens:
        assert classes is None, "a language model's classes are its vocabulary"
        classes = list(vocab)
    classes = classes if classes is not None else ["c0", "c1", "c2"]
    t: dict[str, Tensor] = {}
    man_layers = []
    for plan in layers:
        L, i, o = plan.name, plan.in_features, plan.out_features
        emb = plan.kind == "embedding"
        T = plan.patterns
        w0 = rng.normal(size=(i, o) if emb else (o, i)).astype(np.float32)
        if emb:
            keys_t = tensor(rng.integers(0, i, size=T), "I64")
        else:
            keys_t = quantize(rng.normal(size=(T, i)), st)
        values_t = quantize(rng.normal(scale=0.3, size=(T, o)), st)
        k, v = keys_t.as_float64(), values_t.as_float64()
        weight = w0.astype(np.float64)
        if emb:
            np.add.at(weight, k.astype(np.int64), v)
        else:
            weight = weight + v.T @ k
        t[f"layer/{L}/weight"] = tensor(weight.astype(np.float32))
        t[f"layer/{L}/w0"] = tensor(w0)
        if plan.bias:
            b0 = rng.normal(size=o).astype(np.float32)
            t[f"layer/{L}/bias"] = tensor((b0.astype(np.float64) + v.sum(axis=0)).astype(np.float32))
            t[f"layer/{L}/b0"] = tensor(b0)
        step = np.sort(rng.integers(0, max(1, T // steps_per_pattern), size=T)).astype(np.int64)
        fields = {
            "keys": keys_t,
            "values": values_t,
            "step": tensor(step),
            "example": tensor(rng.integers(0, n_train, size=T).astype(np.int64)),
        }
        if text:
            fields["position"] = tensor(rng.integers(0, context, size=T).astype(np.int64))
        sizes = _split(T, plan.chunks, rng) if plan.chunks > 1 else [T]
        for f, whole in fields.items():
            lo = 0
            for c, n in enumerate(sizes):
                name = f"layer/{L}/{f}" + (f"/{c}" if plan.chunks > 1 else "")
                t[name] = Tensor(whole.dtype, whole.data[lo : lo + n])
                lo += n
        if emb:
            t[f"layer/{L}/queries"] = tensor(rng.integers(0, i, size=n_test).astype(np.int64))
        else:
            t[f"layer/{L}/queries"] = tensor(rng.normal(size=(n_test, i)).astype(np.float32))
        t[f"layer/{L}/query_grad"] = tensor(rng.normal(size=(n_test, o)).astype(np.float32))
        man_layers.append({"name": L, "kind": plan.kind, "in_features": i, "out_features": o,
                           "bias": plan.bias, "patterns": T, "chunks": plan.chunks})
    t["train/label"] = tensor(rng.integers(0, len(classes), size=n_train).astype(np.int64))
    t["train/task"] = tensor(rng.integers(0, len(tasks), size=n_train).astype(np.int64))
    t["test/label"] = tensor(rng.integers(0, len(classes), size=n_test).astype(np.int64))
    t["test/task"] = tensor(rng.integers(0, len(tasks), size=n_test).astype(np.int64))
    t["test/prediction"] = tensor(rng.integers(0, len(classes), size=n_test).astype(np.int64))
    if text:
        t["train/input"] = tensor(rng.integers(0, vocab_size, size=(n_train, context)).astype(np.int64))
        t["test/input"] = tensor(rng.integers(0, vocab_size, size=(n_test, context)).astype(np.int64))
        inp = {"kind": "text", "vocab": vocab, "context": context}
    else:
        t["train/input"] = tensor(rng.integers(0, 256, size=(n_train, 2, 3)).astype(np.uint8))
        t["test/input"] = tensor(rng.integers(0, 256, size=(n_test, 2, 3)).astype(np.uint8))
        inp = {"kind": "image", "shape": [2, 3]}
    manifest = {
        "format": "dualtui.bundle",
        "version": 1,
        "layers": man_layers,
        "tasks": tasks,
        "classes": classes,
        "input": inp,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "clip_norm": None},
        "training": {"steps": 6, "batch_size": 2},
        "a_key_no_reader_knows": {"readers": "must ignore it"},
    }
    # Shuffle tensor order so no reader can rely on the layout order of its own writer.
    names = list(t)
    rng.shuffle(names)
    return ValidBundle({n: t[n] for n in names}, manifest, list(layers), n_train, n_test)


# ----------------------------------------------------------------------------- checking
class _Source:
    """Tensors of a bundle (single or sharded) through the `safetensors` library."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        path = Path(path)
        if not path.exists() and Path(str(path) + ".index.json").exists():
            path = Path(str(path) + ".index.json")
        self.path = path
        self.where: dict[str, Path] = {}
        if path.name.endswith(".json"):
            index = json.loads(path.read_text())
            self.manifest_text = index["metadata"]["dualtui"]
            for name, shard in index["weight_map"].items():
                self.where[name] = path.parent / shard
        else:
            with safe_open(str(path), framework="pt") as f:
                self.manifest_text = (f.metadata() or {}).get("dualtui")
                for name in f.keys():
                    self.where[name] = path
        self._open = safe_open
        self._dtypes: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for shard in set(self.where.values()):
            header = read_raw_header(shard)
            for name, e in header.items():
                if name != "__metadata__":
                    self._dtypes[name] = e["dtype"]
                    self._shapes[name] = tuple(e["shape"])

    def has(self, name: str) -> bool:
        return name in self.where

    def dtype(self, name: str) -> str:
        return self._dtypes[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """float64 for floats, int64 for ints (bfloat16 through torch, which safetensors needs)."""
        import torch

        with self._open(str(self.where[name]), framework="pt") as f:
            x = f.get_tensor(name)
        if x.is_floating_point():
            return x.to(torch.float64).numpy()
        return x.to(torch.int64).numpy()


def read_raw_header(path: str | Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


class InvariantError(AssertionError):
    pass


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise InvariantError(msg)


def check_invariants(path: str | Path, *, rounding_allowance: bool = False) -> dict:
    """Assert every format-v1 invariant of section 3 on the bundle at `path`.

    Float32 storage must meet `max|W - (w0 + vᵀk)| <= 1e-4 max(1, max|W|)`. With
    `rounding_allowance`, float16/bfloat16 storage may also be off by what rounding keys and
    values to that dtype explains (2u Σ|v||k|). Returns per-layer errors for the test to read."""
    src = _Source(Path(path))
    _check(src.manifest_text is not None, "no 'dualtui' metadata")
    m = json.loads(src.manifest_text)
    _check(m.get("format") == "dualtui.bundle", f"format {m.get('format')!r}")
    _check(m.get("version") == 1, f"version {m.get('version')!r}")
    tasks, classes = m["tasks"], m["classes"]
    _check(isinstance(tasks, list) and isinstance(classes, list), "tasks/classes must be lists")
    _check(m["input"]["kind"] in ("image", "text", "vector"), "input.kind")
    text = m["input"]["kind"] == "text"

    def expect(name: str, shape: tuple, dtypes: set[str]) -> np.ndarray:
        _check(src.has(name), f"missing tensor {name}")
        got = src.shape(name)
        _check(len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got)),
               f"{name}: shape {got}, expected {shape}")
        _check(src.dtype(name) in dtypes, f"{name}: dtype {src.dtype(name)} not in {dtypes}")
        a = src.get(name)
        if src.dtype(name) in FLOAT_ST:
            _check(bool(np.isfinite(a).all()), f"{name}: non-finite values")
        return a

    def in_range(a: np.ndarray, upper: int, what: str) -> None:
        _check(a.size == 0 or (a.min() >= 0 and a.max() < upper), f"{what} out of range 0..{upper - 1}")

    train_label = expect("train/label", (None,), {"I64"})
    n = train_label.shape[0]
    in_range(train_label, len(classes), "train/label")
    in_range(expect("train/task", (n,), {"I64"}), len(tasks), "train/task")
    test_label = expect("test/label", (None,), {"I64"})
    M = test_label.shape[0]
    in_range(test_label, len(classes), "test/label")
    in_range(expect("test/task", (M,), {"I64"}), len(tasks), "test/task")
    in_range(expect("test/prediction", (M,), {"I64"}), len(classes), "test/prediction")
    for name, rows in (("train/input", n), ("test/input", M)):
        if src.has(name):
            _check(src.shape(name)[:1] == (rows,), f"{name} rows")
            _check(src.dtype(name) in {"U8", "I64"} | FLOAT_ST, f"{name} dtype")
            if src.dtype(name) in FLOAT_ST:
                _check(bool(np.isfinite(src.get(name)).all()), f"{name}: non-finite values")

    report = {}
    for spec in m["layers"]:
        L, i, o, kind = spec["name"], spec["in_features"], spec["out_features"], spec["kind"]
        _check(kind in ("linear", "embedding"), f"layer kind {kind}")
        emb = kind == "embedding"
        chunks = spec.get("chunks", 1)
        _check(isinstance(chunks, int) and 1 <= chunks <= len(src.where), f"layer {L}: chunks {chunks!r}")
        W = expect(f"layer/{L}/weight", (i, o) if emb else (o, i), {"F32"})
        w0 = expect(f"layer/{L}/w0", (i, o) if emb else (o, i), {"F32"})
        if spec.get("bias"):
            b = expect(f"layer/{L}/bias", (o,), {"F32"})
            b0 = expect(f"layer/{L}/b0", (o,), {"F32"})
        fields = ["keys", "values", "step", "example"] + (["position"] if text else [])

        def cat(f: str, tail: tuple, dtypes: set[str]) -> tuple[np.ndarray, str | None]:
            parts, dt = [], None
            names = [f"layer/{L}/{f}"] if chunks == 1 and src.has(f"layer/{L}/{f}") else [f"layer/{L}/{f}/{c}" for c in range(chunks)]
            for name in names:
                parts.append(expect(name, (None,) + tail, dtypes))
                dt = src.dtype(name)
            return np.concatenate(parts), dt

        storage = {"F32", "F16", "BF16"}
        keys, kdt = cat("keys", () if emb else (i,), {"I64"} if emb else storage)
        values, vdt = cat("values", (o,), storage)
        step, _ = cat("step", (), {"I64"})
        example, _ = cat("example", (), {"I64"})
        T = spec["patterns"]
        for f, a in (("keys", keys), ("values", values), ("step", step), ("example", example)):
            _check(a.shape[0] == T, f"layer {L}: {f} has {a.shape[0]} patterns, manifest says {T}")
        if "position" in fields:
            position, _ = cat("position", (), {"I64"})
            _check(position.shape[0] == T and (position.size == 0 or position.min() >= 0), f"layer {L}: position")
        _check(bool(np.all(np.diff(step) >= 0)), f"layer {L}: step decreases")
        in_range(example, n, f"layer {L} example")
        if emb:
            in_range(keys, i, f"layer {L} key token ids")

        # weight == w0 + valuesᵀ keys (embedding: value t added to row keys[t])
        learned = np.zeros_like(W)
        magnitude = np.zeros_like(W)
        if emb:
            np.add.at(learned, keys, values)
            np.add.at(magnitude, keys, np.abs(values))
        else:
            learned = values.T @ keys
            magnitude = np.abs(values).T @ np.abs(keys)
        scale = max(1.0, float(np.abs(W).max(initial=0.0)))
        tol = 1e-4 * scale
        if rounding_allowance and vdt != "F32":
            u = {"F16": 2.0**-11, "BF16": 2.0**-8}[vdt]
            tol += float(2.05 * u * magnitude.max(initial=0.0)) + 1e-6
        werr = float(np.abs(W - (w0 + learned)).max(initial=0.0))
        _check(werr <= tol, f"layer {L}: |weight - (w0 + vᵀk)| = {werr:.3g} > {tol:.3g}")
        berr = None
        if spec.get("bias"):
            berr = float(np.abs(b - (b0 + values.sum(axis=0))).max(initial=0.0))
            _check(berr <= tol, f"layer {L}: |bias - (b0 + Σv)| = {berr:.3g} > {tol:.3g}")

        # primal == dual on the test queries
        if emb:
            q = expect(f"layer/{L}/queries", (M,), {"I64"})
            in_range(q, i, f"layer {L} queries")
            if M:
                alpha = (keys[:, None] == q[None, :]).astype(np.float64)  # [T, M]
                primal = W[q]
                dual = w0[q] + alpha.T @ values
                oerr = float(np.abs(primal - dual).max())
                _check(oerr <= tol, f"layer {L}: primal vs dual {oerr:.3g}")
        else:
            q = expect(f"layer/{L}/queries", (M, i), FLOAT_ST)
            if M:
                alpha = keys @ q.T + (1.0 if spec.get("bias") else 0.0)
                primal = q @ W.T + (b if spec.get("bias") else 0.0)
                dual = q @ w0.T + alpha.T @ values + (b0 if spec.get("bias") else 0.0)
                oerr = float(np.abs(primal - dual).max())
                qscale = float(np.abs(q).sum(axis=1).max()) + (1.0 if spec.get("bias") else 0.0)
                _check(oerr <= tol * max(1.0, qscale), f"layer {L}: primal vs dual {oerr:.3g}")
        expect(f"layer/{L}/query_grad", (M, o), {"F32"})
        report[L] = {"weight_error": werr, "bias_error": berr, "tolerance": tol, "patterns": T,
                     "storage": kdt if not emb else vdt}
    return report
