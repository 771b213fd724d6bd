"""An independent implementation of bundle format version 2, written from docs/format.md alone.

It never imports `dualtui` or torch (numpy only; safetensors headers are parsed by hand). The
tests use it as a second reading of the spec: bundles it writes must be read by dualtui, the
scores dualtui computes must match the brute force here, and bundles that break the spec must be
rejected by both.

- `make_valid_bundle_v2`: a tiny random model whose dual form holds by construction, with query
  sets whose items have several rows per layer (several positions; a layer run twice per item;
  a layer that does not run at all for some items), focus rows -1 (mean) for some sets/items,
  and the per-item tables. `ValidBundleV2.write(path, layout)` writes it as one file, as a
  sharded set, or with chunked per-pattern tensors.
- `check_invariants(path)`: reads any v2 bundle (one file or a sharded index) and asserts the
  structural rules of sections 2-5 and every invariant of section 7; raises `InvariantError`.
- `brute_scores`, `brute_example_sums`, `brute_masses`: section 6 in float64, plainly.

Readings of the spec this file commits to (where the text leaves room) are listed in
`SPEC_READINGS` below, so a test failure can be traced to one of them.
"""

from __future__ import annotations

import copy
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from independent_v1 import FLOAT_ST, ST_DTYPES, Tensor, decode, quantize, tensor, write_single, write_sharded

SCORES = ("attention", "magnitude", "effect")
STORAGES = ("F32", "F16", "BF16")
# unit roundoff of each storage dtype (half the spacing of the numbers just above 1)
UNIT_ROUNDOFF = {"F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
# the largest absolute error of rounding a number in the subnormal range (half the subnormal spacing)
UNDERFLOW = {"F32": 2.0**-150, "F16": 2.0**-25, "BF16": 2.0**-134}
SET_NAME = re.compile(r"[A-Za-z0-9_.-]+")
READS = ("logits", "last", "first", "mean", "custom")
TARGETS = ("prediction", "label", "given")
ROW_RULES = ("batch-first", "sequence-first", "broadcast")
PER_PATTERN = ("keys", "values", "step", "example", "position")

SPEC_READINGS = """
1. chunks == 1: the per-pattern tensors are `layer/<L>/<f>`, or `layer/<L>/<f>/0` (either is
   accepted, never both); chunks > 1: exactly `/0` .. `/chunks-1`. Empty chunks are allowed.
2. The weight tolerance is one number per layer ("a tolerance reported per layer"):
   1e-4·max(1, max|W|) + 2.05·u·max_ij Σ_t |v_t,i||k_t,j| + underflow for F16/BF16, with u the
   unit roundoff of the coarser of the keys'/values' dtypes and underflow = T·η·(max|k|+max|v|)
   (η: half the subnormal spacing). The bias uses the same with k = 1.
3. "primal == dual at the scale of the outputs": |primal - dual| per row <= tol_w·(‖q‖₁ + 1)
   (what the weight invariant implies; embedding: tol_w), i.e. never stricter than section 7's
   weight check.
4. magnitude uses the Euclidean norm ‖v_t‖₂.
5. An item with no rows at a layer has every score 0 (attention too, not the +1 of the bias).
6. Focus: a row of the item's own, or -1; an item with no rows has focus -1. Which row the
   writer picks (section 5 describes dualtui's recorder's choice) is not checked.
7. rows "focus": each item has at most its focus row; rows [positions]: every row is its item's
   focus row or at one of those positions; rows "all": partial_layers is [].
8. The manifest's target "prediction"/"label" means queries/<S>/target equals prediction/label.
9. probability lies in [0, 1] and loss is >= 0 (definitions: softmax probability, cross-entropy).
10. Grouping by example ranks only examples that have at least one pattern at the layer.
11. In a language-model run (input text, classes == vocab), a pattern's class is
    train/input[e, p+1], or train/label[e] when the window has no column p+1; otherwise it is
    train/label[e]. Text runs must store `position` for every layer.
12. Pattern steps are checked to be >= 0 and never decreasing; not checked against training.steps.
"""


class InvariantError(AssertionError):
    """A bundle breaks the format-v2 spec; the message says where."""


def _check(cond: Any, msg: str) -> None:
    if not cond:
        raise InvariantError(msg)


# ============================================================================= reading
def _parse_file(path: Path) -> tuple[dict, dict[str, tuple[str, tuple[int, ...], int, int]]]:
    """(metadata, {name: (dtype, shape, begin, end)}) of one safetensors file, with the header's
    own consistency checked (known dtypes, sizes that match shapes, offsets inside the file)."""
    data = path.read_bytes()
    _check(len(data) >= 8, f"{path.name}: shorter than a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    _check(8 + n <= len(data), f"{path.name}: header length {n} past the end of the file")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvariantError(f"{path.name}: header is not JSON ({e})") from None
    _check(isinstance(header, dict), f"{path.name}: header is not an object")
    meta = header.pop("__metadata__", None) or {}
    _check(isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values()),
           f"{path.name}: __metadata__ must map strings to strings")
    base, size = 8 + n, len(data) - 8 - n
    entries = {}
    for name, e in header.items():
        _check(isinstance(e, dict) and e.get("dtype") in ST_DTYPES, f"{path.name}: tensor {name!r} dtype {e.get('dtype')!r}")
        shape = tuple(e["shape"])
        _check(all(isinstance(s, int) and s >= 0 for s in shape), f"{name}: bad shape {shape}")
        b, t = e["data_offsets"]
        _check(0 <= b <= t <= size, f"{name}: data_offsets {b, t} outside the data ({size} bytes)")
        _check(t - b == math.prod(shape) * ST_DTYPES[e["dtype"]].itemsize, f"{name}: {t - b} bytes for shape {shape} {e['dtype']}")
        entries[name] = (e["dtype"], shape, base + b, base + t)
    return meta, entries


class Files:
    """The tensors of a bundle: one .safetensors file, or a sharded set through its index."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists() and Path(str(path) + ".index.json").exists():
            path = Path(str(path) + ".index.json")
        _check(path.exists(), f"{path}: no such bundle")
        self.path = path
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int, int]] = {}
        self._bytes: dict[Path, bytes] = {}
        if path.name.endswith(".index.json"):
            try:
                index = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise InvariantError(f"index is not JSON: {e}") from None
            _check(isinstance(index, dict) and isinstance(index.get("metadata"), dict)
                   and isinstance(index.get("weight_map"), dict), "index must hold 'metadata' and 'weight_map' objects")
            self.manifest_text = index["metadata"].get("dualtui")
            shards: dict[str, list[str]] = {}
            for name, shard in index["weight_map"].items():
                _check(isinstance(shard, str) and shard and "/" not in shard and "\\" not in shard and not shard.startswith("."),
                       f"weight_map: shard name {shard!r} of {name!r} is not a plain file name")
                shards.setdefault(shard, []).append(name)
            for shard, names in shards.items():
                p = path.parent / shard
                _check(p.is_file(), f"shard {shard} is missing")
                _, entries = _parse_file(p)
                for name in names:
                    _check(name in entries, f"{name}: not in its shard {shard}")
                for name, (dt, shape, b, t) in entries.items():
                    _check(index["weight_map"].get(name) == shard, f"{name}: in shard {shard} but the weight_map says {index['weight_map'].get(name)!r}")
                    self.entries[name] = (p, dt, shape, b, t)
        else:
            meta, entries = _parse_file(path)
            self.manifest_text = meta.get("dualtui")
            for name, (dt, shape, b, t) in entries.items():
                self.entries[name] = (path, dt, shape, b, t)

    def has(self, name: str) -> bool:
        return name in self.entries

    def dtype(self, name: str) -> str:
        return self.entries[name][1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def get(self, name: str) -> np.ndarray:
        """float64 for floats (bfloat16/float16 widened exactly), int64 for integers."""
        p, dt, shape, b, t = self.entries[name]
        if p not in self._bytes:
            self._bytes[p] = p.read_bytes()
        raw = np.frombuffer(self._bytes[p], dtype=ST_DTYPES[dt], count=math.prod(shape), offset=b) if t > b \
            else np.zeros(0, dtype=ST_DTYPES[dt])
        return decode(dt, raw.reshape(shape))

    def manifest(self) -> dict:
        _check(isinstance(self.manifest_text, str), "no 'dualtui' manifest string in the metadata")
        try:
            m = json.loads(self.manifest_text)
        except json.JSONDecodeError as e:
            raise InvariantError(f"manifest is not JSON: {e}") from None
        _check(isinstance(m, dict), "manifest is not a JSON object")
        return m


def pattern_names(files: Files, L: str, f: str, chunks: int) -> list[str]:
    """The tensor names holding per-pattern field `f` of layer L, in order (reading 1)."""
    plain, first = f"layer/{L}/{f}", f"layer/{L}/{f}/0"
    if chunks == 1:
        _check(not (files.has(plain) and files.has(first)), f"{plain}: stored both whole and as chunk 0")
        return [plain] if files.has(plain) else ([first] if files.has(first) else [])
    _check(not files.has(plain), f"{plain}: stored whole but the layer has {chunks} chunks")
    return [f"layer/{L}/{f}/{c}" for c in range(chunks) if files.has(f"layer/{L}/{f}/{c}")]


@dataclass
class Loaded:
    """Everything the brute force needs, read without checks (run check_invariants first)."""

    manifest: dict
    tensors: dict[str, np.ndarray]
    layers: dict[str, dict]  # name -> manifest entry

    def layer(self, L: str) -> dict[str, np.ndarray]:
        return {f: self.tensors[f"layer/{L}/{f}"] for f in ("keys", "values", "step", "example", "position")
                if f"layer/{L}/{f}" in self.tensors}

    def rows(self, S: str, L: str) -> dict[str, np.ndarray]:
        return {f: self.tensors[f"queries/{S}/layer/{L}/{f}"] for f in ("query", "grad", "item", "position", "call", "focus")}

    @property
    def language_model(self) -> bool:
        inp = self.manifest.get("input", {})
        return inp.get("kind") == "text" and self.manifest.get("classes") == inp.get("vocab")

    def pattern_class(self, L: str) -> np.ndarray:
        """Class of each pattern (reading 11)."""
        lay = self.layer(L)
        ex = lay["example"]
        label = self.tensors["train/label"]
        if not self.language_model or "train/input" not in self.tensors:
            return label[ex]
        inp = self.tensors["train/input"]
        nxt = lay["position"] + 1
        inside = nxt < inp.shape[1]
        out = label[ex].copy()
        out[inside] = inp[ex[inside], nxt[inside]]
        return out


_CACHE: dict[tuple, Loaded] = {}


def load(path: str | Path) -> Loaded:
    files = Files(path)
    key = (str(files.path.resolve()),) + tuple(sorted((str(p), p.stat().st_mtime_ns) for p in {e[0] for e in files.entries.values()}))
    if key in _CACHE:
        return _CACHE[key]
    m = files.manifest()
    t: dict[str, np.ndarray] = {}
    for name in files.entries:
        t[name] = files.get(name)
    layers = {spec["name"]: spec for spec in m["layers"]}
    for L, spec in layers.items():
        for f in PER_PATTERN:
            names = pattern_names(files, L, f, int(spec.get("chunks", 1)))
            if names:
                t[f"layer/{L}/{f}"] = np.concatenate([t[n] for n in names])
    out = Loaded(m, t, layers)
    _CACHE.clear()  # keep one bundle in memory
    _CACHE[key] = out
    return out


# ============================================================================= checking
def check_invariants(path: str | Path, *, strict_focus: bool = True) -> dict:
    """Assert the format-v2 rules (sections 2-5) and invariants (section 7) on the bundle at
    `path` (a .safetensors file or a sharded set's .index.json). Returns a report:
    {"layers": {L: {weight_error, bias_error, tolerance, patterns, storage}},
     "query_sets": {S: {L: {"rows", "primal_dual_error", "allowed"}}}}."""
    files = Files(path)
    m = files.manifest()
    _check(m.get("format") == "dualtui.bundle", f"manifest format {m.get('format')!r}")
    _check(m.get("version") == 2, f"manifest version {m.get('version')!r} (this checker reads version 2)")
    for key in ("layers", "tasks", "classes", "input", "optimizer", "training", "query_sets"):
        _check(key in m, f"manifest has no {key!r}")
    tasks, classes = m["tasks"], m["classes"]
    _check(isinstance(tasks, list) and all(isinstance(x, str) for x in tasks), "tasks must be a list of strings")
    _check(isinstance(classes, list) and all(isinstance(x, str) for x in classes), "classes must be a list of strings")
    _check(isinstance(m["optimizer"], dict) and isinstance(m["training"], dict), "optimizer/training must be objects")
    steps = m["training"].get("steps")
    _check(isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0, f"training.steps {steps!r}")
    if "not_covered" in m:
        _check(isinstance(m["not_covered"], list) and all(isinstance(x, str) for x in m["not_covered"]), "not_covered must list names")
    if "attribution" in m:  # optional: writers without an attribution check leave it out
        _check_attribution(m)

    inp = m["input"]
    _check(isinstance(inp, dict) and inp.get("kind") in ("image", "text", "vector"), f"input.kind {inp.get('kind') if isinstance(inp, dict) else inp!r}")
    text = inp["kind"] == "text"
    if inp["kind"] == "image":
        _check(isinstance(inp.get("shape"), list) and len(inp["shape"]) in (2, 3)
               and all(isinstance(s, int) and s > 0 for s in inp["shape"]), f"image input shape {inp.get('shape')!r}")
    if text:
        _check(isinstance(inp.get("vocab"), list) and all(isinstance(x, str) for x in inp["vocab"]), "text input needs vocab (list of strings)")
        _check(isinstance(inp.get("context"), int) and inp["context"] >= 1, f"text input context {inp.get('context')!r}")

    def expect(name: str, shape: tuple, dtypes: set[str] | tuple, *, optional: bool = False) -> np.ndarray | None:
        if optional and not files.has(name):
            return None
        _check(files.has(name), f"missing tensor {name}")
        got = files.shape(name)
        _check(len(got) == len(shape) and all(s is None or s == g for s, g in zip(shape, got)),
               f"{name}: shape {list(got)}, expected {[('?' if s is None else s) for s in shape]}")
        _check(files.dtype(name) in dtypes, f"{name}: dtype {files.dtype(name)}, expected one of {sorted(dtypes)}")
        a = files.get(name)
        if files.dtype(name) in FLOAT_ST:
            _check(bool(np.isfinite(a).all()), f"{name}: non-finite values at {np.argwhere(~np.isfinite(a))[:3].tolist()}")
        return a

    def in_range(a: np.ndarray, lo: int, hi: int, what: str) -> None:
        bad = np.nonzero((a < lo) | (a >= hi))[0] if a.ndim == 1 else np.argwhere((a < lo) | (a >= hi))
        _check(len(bad) == 0, f"{what}: values out of range {lo}..{hi - 1} at {bad[:3].tolist()}")

    # ---------------------------------------------------------------- training side
    train_label = expect("train/label", (None,), {"I64"})
    N = train_label.shape[0]
    in_range(train_label, 0, len(classes), "train/label")
    train_task = expect("train/task", (N,), {"I64"})
    in_range(train_task, 0, len(tasks), "train/task")
    input_dtypes = {"U8", "I64"} | FLOAT_ST
    train_input = None
    if files.has("train/input"):
        if inp["kind"] == "image":
            train_input = expect("train/input", (N, *inp["shape"]), input_dtypes)
        elif text:
            train_input = expect("train/input", (N, None), {"I64"})
            _check(files.shape("train/input")[1] in (inp["context"], inp["context"] + 1),
                   f"train/input: windows of {files.shape('train/input')[1]} tokens, context {inp['context']}")
            in_range(train_input, 0, len(inp["vocab"]), "train/input token ids")
        else:
            shape = files.shape("train/input")
            train_input = expect("train/input", (N, *shape[1:]), input_dtypes)

    _check(isinstance(m["layers"], list), "layers must be a list")
    layer_names = []
    report: dict[str, Any] = {"layers": {}, "query_sets": {}}
    W_of: dict[str, tuple] = {}
    for spec in m["layers"]:
        _check(isinstance(spec, dict), "a layer entry is not an object")
        L = spec.get("name")
        _check(isinstance(L, str) and L and L.isprintable() and "/" not in L, f"layer name {L!r}")
        _check(L not in layer_names, f"layer {L} listed twice")
        layer_names.append(L)
        kind = spec.get("kind")
        _check(kind in ("linear", "embedding"), f"layer {L}: kind {kind!r}")
        emb = kind == "embedding"
        i, o = spec.get("in_features"), spec.get("out_features")
        _check(all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in (i, o)), f"layer {L}: features {i!r}, {o!r}")
        bias = spec.get("bias")
        _check(isinstance(bias, bool), f"layer {L}: bias must be true/false")
        _check(not (emb and bias), f"layer {L}: an embedding has no bias")
        T, chunks = spec.get("patterns"), spec.get("chunks", 1)
        _check(isinstance(T, int) and T >= 0, f"layer {L}: patterns {T!r}")
        _check(isinstance(chunks, int) and chunks >= 1, f"layer {L}: chunks {chunks!r}")
        if "rows" in spec:
            _check(spec["rows"] in ROW_RULES, f"layer {L}: rows {spec['rows']!r}")
        wshape = (i, o) if emb else (o, i)
        W = expect(f"layer/{L}/weight", wshape, {"F32", "F64"})  # F64: a float64 bundle
        wdt = {files.dtype(f"layer/{L}/weight")}
        spec["_weight_dtype"] = next(iter(wdt))
        w0 = expect(f"layer/{L}/w0", wshape, wdt)
        b = expect(f"layer/{L}/bias", (o,), wdt) if bias else None
        b0 = expect(f"layer/{L}/b0", (o,), wdt) if bias else None
        if not bias:
            _check(not files.has(f"layer/{L}/bias") and not files.has(f"layer/{L}/b0"), f"layer {L}: bias tensors but bias is false")

        fields: dict[str, list[np.ndarray]] = {}
        dtypes: dict[str, set[str]] = {}
        allowed = {"keys": {"I64"} if emb else set(STORAGES) | {"F64"}, "values": set(STORAGES) | {"F64"}, "step": {"I64"}, "example": {"I64"}, "position": {"I64"}}
        tails = {"keys": () if emb else (i,), "values": (o,), "step": (), "example": (), "position": ()}
        lengths: dict[str, list[int]] = {}
        for f in PER_PATTERN:
            names = pattern_names(files, L, f, chunks)
            if f == "position" and not names and not text:
                continue  # optional outside text runs
            _check(len(names) == chunks, f"layer {L}: {f} has {len(names)} of {chunks} chunks")
            fields[f] = [expect(n, (None, *tails[f]), allowed[f]) for n in names]
            dtypes[f] = {files.dtype(n) for n in names}
            lengths[f] = [a.shape[0] for a in fields[f]]
        for f, ls in lengths.items():
            _check(ls == lengths["keys"], f"layer {L}: chunk lengths of {f} {ls} differ from keys {lengths['keys']}")
        _check(sum(lengths["keys"]) == T, f"layer {L}: {sum(lengths['keys'])} patterns stored, manifest says {T}")
        K, V = np.concatenate(fields["keys"]), np.concatenate(fields["values"])
        step, example = np.concatenate(fields["step"]), np.concatenate(fields["example"])
        _check(bool(np.all(np.diff(step) >= 0)), f"layer {L}: step decreases at pattern {int(np.argmax(np.diff(step) < 0)) + 1 if T > 1 else 0}")
        _check(T == 0 or step.min() >= 0, f"layer {L}: negative step")
        in_range(example, 0, N, f"layer {L}: example")
        position = None
        if "position" in fields:
            position = np.concatenate(fields["position"])
            in_range(position, 0, inp["context"] if text else 2**62, f"layer {L}: position")
        if emb:
            in_range(K, 0, i, f"layer {L}: key token ids")
        # the constant input of the bias: 1, or bias_scale[step] when the bias has its own chain
        bconst = np.ones(T)
        if files.has(f"layer/{L}/bias_scale"):
            _check(bias, f"layer {L}: bias_scale without a bias")
            bs = expect(f"layer/{L}/bias_scale", (None,), {"F64"})
            _check(T == 0 or step.max() < bs.shape[0], f"layer {L}: bias_scale does not cover step {int(step.max()) if T else 0}")
            bconst = bs[step] if T else bconst
        spec["_bias_const"] = bconst

        # weight == w0 + valuesᵀ keys (embedding: value t added to row keys[t])
        if emb:
            learned = np.zeros(wshape)
            np.add.at(learned, K.astype(np.int64), V)
            size = np.zeros(wshape)
            np.add.at(size, K.astype(np.int64), np.abs(V))
            kmax = 1.0
        else:
            learned = V.T @ K
            size = np.abs(V).T @ np.abs(K)
            kmax = float(np.abs(K).max(initial=0.0))
        coarse = [dt for dt in ("BF16", "F16") if dt in dtypes["values"] | dtypes["keys"]]
        tol = 1e-4 * max(1.0, float(np.abs(W).max(initial=0.0)))
        tol_b = tol
        if coarse:
            u, eta = UNIT_ROUNDOFF[coarse[0]], UNDERFLOW[coarse[0]]
            vmax = float(np.abs(V).max(initial=0.0))
            tol += 2.05 * u * float(size.max(initial=0.0)) + T * eta * (kmax + vmax + eta)
            tol_b += 2.05 * u * float(np.abs(V).sum(axis=0).max(initial=0.0)) + T * eta
        werr = float(np.abs(W - (w0 + learned)).max(initial=0.0))
        _check(werr <= tol, f"layer {L}: max|weight - (w0 + vᵀk)| = {werr:.3g} > tolerance {tol:.3g}")
        berr = None
        if bias:
            berr = float(np.abs(b - (b0 + bconst @ V)).max(initial=0.0))
            _check(berr <= tol_b, f"layer {L}: max|bias - (b0 + Σv)| = {berr:.3g} > tolerance {tol_b:.3g}")
        report["layers"][L] = {"weight_error": werr, "bias_error": berr, "tolerance": tol, "patterns": T,
                               "storage": sorted(dtypes["values"])}
        W_of[L] = (spec, W, w0, b, b0, K, V, max(tol, tol_b))

    # stray tensors of unknown layers
    for name in files.entries:
        if name.startswith("layer/"):
            _check(name.split("/")[1] in layer_names, f"{name}: no layer {name.split('/')[1]!r} in the manifest")

    # ---------------------------------------------------------------- query sets
    _check(isinstance(m["query_sets"], list), "query_sets must be a list")
    set_names: list[str] = []
    for entry in m["query_sets"]:
        _check(isinstance(entry, dict), "a query_sets entry is not an object")
        S = entry.get("name")
        _check(isinstance(S, str) and SET_NAME.fullmatch(S) and len(S) <= 64 and not S.startswith("."), f"query set name {S!r}")
        _check(S not in set_names, f"query set {S} listed twice")
        set_names.append(S)
        M = entry.get("items")
        _check(isinstance(M, int) and not isinstance(M, bool) and M >= 0, f"query set {S}: items {M!r}")
        rows_rule = entry.get("rows", "all")
        _check(rows_rule in ("all", "focus") or (isinstance(rows_rule, list) and all(isinstance(p, int) and p >= 0 for p in rows_rule)),
               f"query set {S}: rows {rows_rule!r}")
        read = entry.get("read")
        _check(read in READS or (isinstance(read, int) and not isinstance(read, bool)), f"query set {S}: read {read!r}")
        target_rule = entry.get("target")
        _check(target_rule in TARGETS, f"query set {S}: target {target_rule!r}")
        partial = entry.get("partial_layers", [])
        _check(isinstance(partial, list) and all(p in layer_names for p in partial) and len(set(partial)) == len(partial),
               f"query set {S}: partial_layers {partial!r} must name layers of the manifest, once each")
        if rows_rule == "all":
            _check(partial == [], f"query set {S}: rows 'all' but partial_layers {partial}")

        q = f"queries/{S}"
        label = expect(f"{q}/label", (M,), {"I64"})
        in_range(label, 0, len(classes), f"{q}/label")
        in_range(expect(f"{q}/task", (M,), {"I64"}), 0, len(tasks), f"{q}/task")
        prediction = expect(f"{q}/prediction", (M,), {"I64"})
        in_range(prediction, 0, len(classes), f"{q}/prediction")
        target = expect(f"{q}/target", (M,), {"I64"})
        in_range(target, 0, len(classes), f"{q}/target")
        if target_rule == "prediction":
            _check(np.array_equal(target, prediction), f"{q}/target differs from the prediction but the manifest says target 'prediction'")
        if target_rule == "label":
            _check(np.array_equal(target, label), f"{q}/target differs from the label but the manifest says target 'label'")
        prob = expect(f"{q}/probability", (M,), {"F32"}, optional=True)
        if prob is not None:
            _check(bool(np.all((prob >= 0) & (prob <= 1 + 1e-6))), f"{q}/probability outside [0, 1]")
        loss = expect(f"{q}/loss", (M,), {"F32"}, optional=True)
        if loss is not None:
            _check(bool(np.all(loss >= -1e-6)), f"{q}/loss negative")
        ex = expect(f"{q}/example", (M,), {"I64"}, optional=True)
        if ex is not None:
            in_range(ex, 0, N, f"{q}/example")
        if files.has(f"{q}/input"):
            shape = files.shape(f"{q}/input")
            if train_input is not None:
                _check(files.dtype(f"{q}/input") == files.dtype("train/input"), f"{q}/input dtype differs from train/input")
            if inp["kind"] == "image":
                expect(f"{q}/input", (M, *inp["shape"]), input_dtypes)
            elif text:
                qi = expect(f"{q}/input", (M, None), {"I64"})
                in_range(qi, 0, len(inp["vocab"]), f"{q}/input token ids")
            else:
                expect(f"{q}/input", (M, *shape[1:]), input_dtypes)

        report["query_sets"][S] = {}
        for L in layer_names:
            spec, W, w0, b, b0, K, V, tol = W_of[L]
            emb, i, o = spec["kind"] == "embedding", spec["in_features"], spec["out_features"]
            base = f"{q}/layer/{L}"
            item = expect(f"{base}/item", (None,), {"I64"})
            R = item.shape[0]
            wdt = {spec["_weight_dtype"]}  # query rows and grads come in the weight's dtype
            Q = expect(f"{base}/query", (R,) if emb else (R, i), {"I64"} if emb else wdt)
            expect(f"{base}/grad", (R, o), wdt)
            pos = expect(f"{base}/position", (R,), {"I64"})
            call = expect(f"{base}/call", (R,), {"I64"})
            focus = expect(f"{base}/focus", (M,), {"I64"})
            in_range(item, 0, M, f"{base}/item")
            _check(bool(np.all(np.diff(item) >= 0)), f"{base}/item decreases at row {int(np.argmax(np.diff(item) < 0)) + 1 if R > 1 else 0}")
            in_range(pos, 0, 2**62, f"{base}/position")
            in_range(call, 0, 2**62, f"{base}/call")
            in_range(focus, -1, R, f"{base}/focus")
            for mm in range(M):
                f = int(focus[mm])
                _check(f == -1 or int(item[f]) == mm, f"{base}/focus[{mm}] = {f} is a row of item {int(item[f]) if f >= 0 else None}, not of item {mm}")
            if emb:
                in_range(Q, 0, i, f"{base}/query token ids")
            # which rows were stored
            counts = np.bincount(item, minlength=M) if R else np.zeros(M, dtype=np.int64)
            if rows_rule == "focus":
                for mm in range(M):
                    _check(counts[mm] <= 1 and (counts[mm] == 0 or item[focus[mm]] == mm),
                           f"{base}: rows 'focus' but item {mm} has {counts[mm]} rows / focus {int(focus[mm])}")
            elif isinstance(rows_rule, list):
                is_focus = np.zeros(R, dtype=bool)
                is_focus[focus[focus >= 0]] = True
                bad = np.nonzero(~is_focus & ~np.isin(pos, rows_rule))[0]
                _check(len(bad) == 0, f"{base}: rows {bad[:3].tolist()} are neither focus rows nor at positions {rows_rule}")
            if strict_focus:
                _check_focus_rule(base, read, item, pos, call, focus, counts, M)
            # primal == dual on every row
            if R:
                if emb:
                    Qi = Q.astype(np.int64)
                    primal = W[Qi]
                    alpha = (K[:, None] == Qi[None, :]).astype(np.float64)  # [T, R]
                    dual = w0[Qi] + alpha.T @ V
                    allowed_err = np.full(R, tol)
                else:
                    primal = Q @ W.T + (b if spec["bias"] else 0.0)
                    alpha = K @ Q.T + (spec["_bias_const"][:, None] if spec["bias"] else 0.0)
                    dual = Q @ w0.T + alpha.T @ V + (b0 if spec["bias"] else 0.0)
                    allowed_err = tol * (np.abs(Q).sum(axis=1) + 1.0)
                err = np.abs(primal - dual).max(axis=1)
                worst = int(np.argmax(err - allowed_err))
                _check(bool(np.all(err <= allowed_err)),
                       f"{base}: primal vs dual differ by {err[worst]:.3g} at row {worst} (allowed {allowed_err[worst]:.3g})")
                report["query_sets"][S][L] = {"rows": R, "primal_dual_error": float(err.max()), "allowed": float(allowed_err.min())}
            else:
                report["query_sets"][S][L] = {"rows": 0, "primal_dual_error": 0.0, "allowed": tol}
    for name in files.entries:
        if name.startswith("queries/"):
            parts = name.split("/")
            _check(parts[1] in set_names, f"{name}: query set {parts[1]!r} is not in the manifest's query_sets")
            if len(parts) > 3 and parts[2] == "layer":
                _check(parts[3] in layer_names, f"{name}: no layer {parts[3]!r} in the manifest")
    return report


def _check_focus_rule(base: str, read: Any, item, pos, call, focus, counts, M: int) -> None:
    """Reading 6 of SPEC_READINGS: the focus is any row of its own item or -1; an item with no
    rows has focus -1. (Which row a writer picks is the writer's business.)"""
    for mm in range(M):
        f = int(focus[mm])
        if counts[mm] == 0:
            _check(f == -1, f"{base}: item {mm} has no rows, so its focus must be -1 (is {f})")


def _check_attribution(m: dict) -> None:
    a = m["attribution"]
    _check(isinstance(a, dict) and isinstance(a.get("checked"), bool), "attribution must be an object with 'checked'")
    if not a["checked"]:
        _check(isinstance(a.get("reason"), str), "attribution not checked but no 'reason'")
        return
    _check(a.get("method") == "weighted-backward", f"attribution method {a.get('method')!r}")
    _check(isinstance(a.get("steps"), list) and all(isinstance(s, int) for s in a["steps"]), "attribution steps")
    for k in ("max_relative_error", "tolerance"):
        _check(isinstance(a.get(k), (int, float)) and math.isfinite(a[k]), f"attribution {k}")
    if "layers" in a:
        names = {s.get("name") for s in m["layers"] if isinstance(s, dict)}
        _check(isinstance(a["layers"], dict) and set(a["layers"]) <= names, "attribution layers must name manifest layers")


# ============================================================================= brute force
def _item_rows(B: Loaded, S: str, L: str, item: int) -> tuple[np.ndarray, int]:
    """Row indices of `item` at L in set S and the item's focus row (-1 = mean)."""
    r = B.rows(S, L)
    _check(0 <= item < r["focus"].shape[0], f"item {item} not in set {S}")
    return np.nonzero(r["item"] == item)[0], int(r["focus"][item])


def brute_alpha_rows(B: Loaded, S: str, L: str, item: int, *, absolute: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """α_{t,r} for every pattern t and each of the item's rows r: ([T, R_m], row ids, focus)."""
    spec = B.layers[L]
    lay, r = B.layer(L), B.rows(S, L)
    rows, f = _item_rows(B, S, L, item)
    K = lay["keys"]
    T = K.shape[0]
    bs = B.tensors.get(f"layer/{L}/bias_scale")
    bconst = (np.abs(bs[lay["step"]]) if absolute else bs[lay["step"]]) if bs is not None else (1.0 if spec["bias"] else 0.0)
    a = np.zeros((T, len(rows)))
    for j, row in enumerate(rows):
        if spec["kind"] == "embedding":
            a[:, j] = (K == r["query"][row]).astype(np.float64)
        else:
            q = r["query"][row]
            a[:, j] = (np.abs(K) @ np.abs(q) if absolute else K @ q) + bconst
    return a, rows, f


def brute_scores(path: str | Path, queries: str, layer: str, item: int, *, absolute: bool = False) -> dict[str, np.ndarray]:
    """attention, magnitude and effect of every pattern of `layer` for `item` of set `queries`
    ([T] float64 each), as section 6 defines them. `absolute=True` returns the same formulas with
    every product taken of absolute values: the scale a floating-point evaluation errs against."""
    B = load(path)
    a_rows, rows, f = brute_alpha_rows(B, queries, layer, item, absolute=absolute)
    V = B.layer(layer)["values"]
    G = B.rows(queries, layer)["grad"]
    T = V.shape[0]
    if len(rows) == 0:
        alpha = np.zeros(T)  # reading 5
    elif f >= 0:
        alpha = a_rows[:, list(rows).index(f)]
    else:
        alpha = a_rows.mean(axis=1)
    vnorm = np.sqrt((V * V).sum(axis=1))
    effect = np.zeros(T)
    for j, row in enumerate(rows):
        vg = (np.abs(V) @ np.abs(G[row])) if absolute else V @ G[row]
        effect += a_rows[:, j] * vg
    if absolute:
        alpha = np.abs(alpha)
    return {"attention": alpha, "magnitude": np.abs(alpha) * vnorm, "effect": effect}


def brute_example_sums(path: str | Path, queries: str, layer: str, item: int, *, absolute: bool = False
                       ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each score summed over the patterns of each training example ([N] each) and the number of
    patterns per example ([N]; examples with 0 are not ranked, reading 10)."""
    B = load(path)
    s = brute_scores(path, queries, layer, item, absolute=absolute)
    ex = B.layer(layer)["example"]
    N = B.tensors["train/label"].shape[0]
    sums = {}
    for k, v in s.items():
        out = np.zeros(N)
        np.add.at(out, ex, v)
        sums[k] = out
    return sums, np.bincount(ex, minlength=N)


def brute_masses(path: str | Path, queries: str, layer: str, item: int, *, absolute: bool = False) -> dict[str, np.ndarray]:
    """Task and class masses: Σα, Σ|α| and Σeffect over the patterns whose training example has
    that task / class (the pattern's class as in reading 11). Keys task_attention_sum,
    task_abs_sum, task_effect_sum, class_attention_sum, class_abs_sum, class_effect_sum."""
    B = load(path)
    s = brute_scores(path, queries, layer, item, absolute=absolute)
    ex = B.layer(layer)["example"]
    task = B.tensors["train/task"][ex]
    cls = B.pattern_class(layer)
    out = {}
    for prefix, ids, n in (("task", task, len(B.manifest["tasks"])), ("class", cls, len(B.manifest["classes"]))):
        for name, v in (("attention", s["attention"]), ("abs", np.abs(s["attention"])), ("effect", s["effect"])):
            acc = np.zeros(n)
            np.add.at(acc, ids, v)
            out[f"{prefix}_{name}_sum"] = acc
    return out


# ============================================================================= a valid bundle
@dataclass
class LayerSpec:
    name: str
    kind: str  # "linear" / "embedding"
    in_features: int
    out_features: int
    bias: bool
    calls: int = 1  # runs per item / example
    seq: bool = True  # one row per position (else one row per item/example)
    conditional: bool = False  # runs only for some items/examples
    train_last_only: bool = False  # patterns only at the last position (a classifier head)


@dataclass
class QuerySetPlan:
    name: str
    items: int = 5
    rows: Any = "all"  # "all", "focus" or a list of positions
    read: Any = "last"
    target: str = "prediction"
    from_train: bool = False


@dataclass
class ValidBundleV2:
    """A bundle in memory: tensors (per-pattern fields unchunked), manifest, and the facts a
    test asserts against (`info`)."""

    tensors: dict[str, Tensor]
    manifest: dict
    storage: str
    family: str
    info: dict = field(default_factory=dict)

    def copy(self) -> "ValidBundleV2":
        return ValidBundleV2({k: Tensor(t.dtype, t.data.copy()) for k, t in self.tensors.items()},
                             copy.deepcopy(self.manifest), self.storage, self.family, copy.deepcopy(self.info))

    def write(self, path: str | Path, layout: str = "single", *, chunks: int = 3, shards: int = 3, seed: int = 0) -> Path:
        """layout "single" (one file), "sharded" (NAME.safetensors.index.json + shards; the index
        path is returned) or "chunked" (one file, per-pattern tensors split into /0, /1, ...)."""
        path = Path(path)
        tensors = dict(self.tensors)
        manifest = copy.deepcopy(self.manifest)
        if layout == "chunked":
            rng = np.random.default_rng(seed)
            for spec in manifest["layers"]:
                L, T = spec["name"], spec["patterns"]
                cuts = np.sort(rng.integers(0, T + 1, size=chunks - 1))
                bounds = np.concatenate([[0], cuts, [T]]).astype(int)
                spec["chunks"] = chunks
                for f in PER_PATTERN:
                    name = f"layer/{L}/{f}"
                    if name not in tensors:
                        continue
                    whole = tensors.pop(name)
                    for c in range(chunks):
                        tensors[f"{name}/{c}"] = Tensor(whole.dtype, whole.data[bounds[c] : bounds[c + 1]])
        names = list(tensors)
        np.random.default_rng(seed + 1).shuffle(names)  # no reader may rely on a writer's order
        tensors = {n: tensors[n] for n in names}
        if layout == "sharded":
            return write_sharded(path, tensors, manifest, shards)
        _check(layout in ("single", "chunked"), f"layout {layout!r}")
        return write_single(path, tensors, manifest)


def default_query_sets(family: str) -> list[QuerySetPlan]:
    if family == "vector":
        return [QuerySetPlan("test", 5, "all", "logits", "prediction"),
                QuerySetPlan("ood-1", 4, "all", "custom", "label")]
    return [QuerySetPlan("test", 5, "all", "last", "prediction"),
            QuerySetPlan("mean.read", 4, "all", "mean", "label"),
            QuerySetPlan("train_sub", 4, [0], "last", "given", from_train=True),
            QuerySetPlan("ood.first", 3, "focus", "first", "label")]


def default_layers(family: str, kinds: tuple[str, ...], vocab: int, n_classes: int) -> list[LayerSpec]:
    d = 4
    if family == "vector":
        layers = [LayerSpec("mix", "linear", d, d, True, calls=2, seq=False),
                  LayerSpec("head", "linear", d, n_classes, True, seq=False)]
    else:
        layers = [LayerSpec("tok.emb", "embedding", vocab, d, False),
                  LayerSpec("mix", "linear", d, d, True, calls=2),
                  LayerSpec("gate.expert", "linear", d, d, True, conditional=True),
                  LayerSpec("head", "linear", d, n_classes, True, train_last_only=family == "text")]
    return [s for s in layers if s.kind in kinds]


def make_valid_bundle_v2(
    seed: int,
    *,
    storage: str = "F32",
    family: str = "text",
    kinds: tuple[str, ...] = ("linear", "embedding"),
    query_sets: list[QuerySetPlan] | None = None,
    n_train: int = 12,
    steps: int = 6,
    batch: int = 3,
    rounding: str = "exact",
) -> ValidBundleV2:
    """A tiny random model in bundle format v2 whose dual form holds by construction.

    family: "text" (a text classifier: embedding, a block run twice per item, a conditional
    expert that does not run for some items, a head), "lm" (the same as a language model:
    classes are the vocabulary, windows of `context` tokens so the last position's class is
    train/label) or "vector" (vector input, a block run twice, a one-row-per-item head).
    storage: "F32" / "F16" / "BF16" for keys and values. rounding "exact": weight and bias are
    computed in float64 from the *stored* keys/values (then cast to float32 once); "realistic":
    from the unrounded ones, so stored F16/BF16 patterns are off by rounding, as a recorder's are.
    """
    assert family in ("text", "lm", "vector") and storage in STORAGES and rounding in ("exact", "realistic")
    rng = np.random.default_rng(seed)
    text = family != "vector"
    context = 4 if text else 1
    V = 9
    vocab = [f"t{j}" for j in range(V)]
    classes = list(vocab) if family == "lm" else (["neg", "pos", "mixed"] if text else ["c0", "c1", "c2"])
    tasks = ["task a", "task b", "task c"]
    layers = default_layers(family, tuple(kinds), V, len(classes))
    plans = query_sets if query_sets is not None else default_query_sets(family)

    t: dict[str, Tensor] = {}
    train_label = rng.integers(0, len(classes), size=n_train)
    t["train/label"] = tensor(train_label.astype(np.int64))
    t["train/task"] = tensor(rng.integers(0, len(tasks), size=n_train).astype(np.int64))
    if text:
        width = context if family == "lm" else context + 1
        train_input = rng.integers(0, V, size=(n_train, width)).astype(np.int64)
        inp = {"kind": "text", "vocab": vocab, "context": context}
    else:
        train_input = rng.normal(size=(n_train, 4)).astype(np.float32)
        inp = {"kind": "vector"}
    t["train/input"] = tensor(train_input)
    train_gate = rng.random(n_train) < 0.5
    train_gate[:2] = [True, False]

    # ------------------------------------------------------------ training patterns
    batches = [rng.choice(n_train, size=batch, replace=False) for _ in range(steps)]
    man_layers = []
    for spec in layers:
        L, i, o = spec.name, spec.in_features, spec.out_features
        emb = spec.kind == "embedding"
        step, example, position = [], [], []
        for s, ex in enumerate(batches):
            for c in range(spec.calls):
                for e in ex:
                    if spec.conditional and not train_gate[e]:
                        continue
                    ps = [context - 1] if spec.train_last_only else range(context)
                    for p in ps:
                        step.append(s), example.append(int(e)), position.append(p)
        T = len(step)
        example_a = np.array(example, dtype=np.int64)
        position_a = np.array(position, dtype=np.int64)
        w0 = rng.normal(size=(i, o) if emb else (o, i)).astype(np.float32)
        if emb:
            k_exact = train_input[example_a, position_a].astype(np.float64) if T else np.zeros(0)
            keys_t = tensor(k_exact.astype(np.int64), "I64")
        else:
            k_exact = rng.normal(size=(T, i))
            keys_t = quantize(k_exact, storage)
        v_exact = rng.normal(scale=0.3, size=(T, o))
        values_t = quantize(v_exact, storage)
        if rounding == "exact":
            k_use, v_use = (k_exact if emb else keys_t.as_float64()), values_t.as_float64()
        else:
            k_use, v_use = k_exact, v_exact
        weight = w0.astype(np.float64)
        if emb:
            np.add.at(weight, k_use.astype(np.int64), v_use)
        else:
            weight = weight + v_use.T @ k_use
        t[f"layer/{L}/weight"] = tensor(weight.astype(np.float32))
        t[f"layer/{L}/w0"] = tensor(w0)
        if spec.bias:
            b0 = rng.normal(size=o).astype(np.float32)
            t[f"layer/{L}/bias"] = tensor((b0.astype(np.float64) + v_use.sum(axis=0)).astype(np.float32))
            t[f"layer/{L}/b0"] = tensor(b0)
        t[f"layer/{L}/keys"] = keys_t
        t[f"layer/{L}/values"] = values_t
        t[f"layer/{L}/step"] = tensor(np.array(step, dtype=np.int64))
        t[f"layer/{L}/example"] = tensor(example_a)
        if text:
            t[f"layer/{L}/position"] = tensor(position_a)
        man_layers.append({"name": L, "kind": spec.kind, "in_features": i, "out_features": o, "bias": spec.bias,
                           "patterns": T, "chunks": 1, "rows": "batch-first"})

    # ------------------------------------------------------------ query sets
    man_sets, info_sets = [], {}
    for plan in plans:
        S, M = plan.name, plan.items
        q = f"queries/{S}"
        label = rng.integers(0, len(classes), size=M)
        prediction = rng.integers(0, len(classes), size=M)
        target = {"prediction": prediction, "label": label}.get(plan.target, rng.integers(0, len(classes), size=M))
        t[f"{q}/label"] = tensor(label.astype(np.int64))
        t[f"{q}/task"] = tensor(rng.integers(0, len(tasks), size=M).astype(np.int64))
        t[f"{q}/prediction"] = tensor(prediction.astype(np.int64))
        t[f"{q}/target"] = tensor(target.astype(np.int64))
        t[f"{q}/probability"] = tensor(rng.uniform(0.05, 1.0, size=M).astype(np.float32))
        t[f"{q}/loss"] = tensor(rng.exponential(1.0, size=M).astype(np.float32))
        # per item: its length (positions), whether the conditional layer ran, its tokens
        if text:
            length = rng.integers(1, context + 1, size=M)
            if M > 0:
                length[0] = context
            if M > 2:
                length[2] = 1
        else:
            length = np.ones(M, dtype=np.int64)
        gate = rng.random(M) < 0.6
        if M > 1:
            gate[0], gate[1] = True, False  # item 1: no rows at a conditional layer
        if plan.from_train:
            ex = rng.integers(0, n_train, size=M)
            t[f"{q}/example"] = tensor(ex.astype(np.int64))
            items_input = train_input[ex].copy()
        else:
            items_input = (rng.integers(0, V, size=(M, train_input.shape[1])).astype(np.int64) if text
                           else rng.normal(size=(M, 4)).astype(np.float32))
        if text:
            for mm in range(M):
                items_input[mm, length[mm]:] = 0  # padding in the preview
        t[f"{q}/input"] = tensor(items_input)
        partial = []
        info_layers = {}
        for spec in layers:
            L, emb = spec.name, spec.kind == "embedding"
            rows = []  # (item, call, position) of every row, then which are stored
            focus = np.full(M, -1, dtype=np.int64)
            stored = []
            dropped = False
            for mm in range(M):
                if spec.conditional and not gate[mm]:
                    continue
                positions = list(range(int(length[mm]))) if spec.seq else [0]
                own = [(mm, c, p) for c in range(spec.calls) for p in positions]
                if plan.read in ("mean", "custom"):
                    f_key = None
                elif plan.read == "first":
                    f_key = (mm, spec.calls - 1, positions[0])
                elif isinstance(plan.read, int):
                    f_key = (mm, spec.calls - 1, plan.read) if plan.read in positions else None
                else:  # last, logits
                    f_key = (mm, spec.calls - 1, positions[-1])
                for key in own:
                    keep = (plan.rows == "all" or key == f_key
                            or (isinstance(plan.rows, list) and key[2] in plan.rows))
                    if keep:
                        if key == f_key:
                            focus[mm] = len(stored)
                        stored.append(key)
                    else:
                        dropped = True
            if dropped:
                partial.append(L)
            R = len(stored)
            item_a = np.array([k[0] for k in stored], dtype=np.int64)
            call_a = np.array([k[1] for k in stored], dtype=np.int64)
            pos_a = np.array([k[2] for k in stored], dtype=np.int64)
            base = f"{q}/layer/{L}"
            if emb:
                t[f"{base}/query"] = tensor(items_input[item_a, pos_a].astype(np.int64) if R else np.zeros(0, dtype=np.int64))
            else:
                t[f"{base}/query"] = tensor(rng.normal(size=(R, spec.in_features)).astype(np.float32))
            t[f"{base}/grad"] = tensor(rng.normal(size=(R, spec.out_features)).astype(np.float32))
            t[f"{base}/item"] = tensor(item_a)
            t[f"{base}/position"] = tensor(pos_a)
            t[f"{base}/call"] = tensor(call_a)
            t[f"{base}/focus"] = tensor(focus)
            info_layers[L] = {"rows_per_item": np.bincount(item_a, minlength=M).tolist(), "focus": focus.tolist(),
                              "calls": spec.calls}
        man_sets.append({"name": S, "items": M, "rows": plan.rows, "read": plan.read, "target": plan.target,
                         "partial_layers": partial})
        info_sets[S] = info_layers

    manifest = {
        "format": "dualtui.bundle",
        "version": 2,
        "layers": man_layers,
        "tasks": tasks,
        "classes": classes,
        "input": inp,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "clip_norm": None},
        "training": {"steps": steps, "batch_size": batch},
        "query_sets": man_sets,
        "attribution": {"checked": True, "method": "weighted-backward", "steps": [0, 1, 2, 4],
                        "max_relative_error": 1e-7, "tolerance": 1e-3,
                        "layers": {s["name"]: 1e-7 for s in man_layers}},
        "not_covered": [],
        "a_key_no_reader_knows": {"readers": "ignore it"},
    }
    return ValidBundleV2(t, manifest, storage, family, {"sets": info_sets, "layers": [s.name for s in layers]})
