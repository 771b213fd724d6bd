"""The bundle manifest (docs/format.md section 3): schema, parsing, serialising (versions 1 and 2)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from . import errors
from .checksums import parse as checksum_entry

FORMAT = "dualtui.bundle"
VERSION = 2  # what writers write
APPROXIMATE_VERSION = 3  # what writers write for a bundle whose dual form is approximate (dual_form)
READ_VERSIONS = (1, 2, 3)  # what readers read
METADATA_KEY = "dualtui"
LAYER_KINDS = ("linear", "embedding", "conv", "elementwise")
INPUT_KINDS = ("image", "text", "vector")
# Query-set names become parts of tensor names: no "/", nothing a shell or terminal mangles.
QUERY_SET_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
QUERY_ROWS = ("all", "focus")
QUERY_READS = ("logits", "last", "first", "mean", "custom")
QUERY_TARGETS = ("prediction", "label", "given")


def bad_layer_name(name: object) -> str | None:
    """Why `name` cannot be a layer name (None when it can): module paths, printable, no "/"."""
    if not isinstance(name, str) or name == "":
        return "a layer name must be a non-empty string"
    if "/" in name:
        return f"layer name {name!r} contains '/', which separates the parts of tensor names"
    if not name.isprintable():
        return f"layer name {name!r} contains control characters"
    return None


def bad_query_set_name(name: object) -> str | None:
    if not isinstance(name, str) or not QUERY_SET_NAME.fullmatch(name):
        return (f"query set name {name!r} must be 1-64 letters, digits, '_', '.' or '-' "
                "(not starting with '.' or '-')")
    return None


@dataclass
class LayerSpec:
    name: str
    kind: str
    in_features: int
    out_features: int
    bias: bool
    patterns: int
    chunks: int
    extra: dict[str, Any] = field(default_factory=dict)  # keys we do not know, kept on rewrite

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LayerSpec":
        """The inverse of to_json (a journal's layer spec; the manifest has its own checked parser)."""
        fields = ("name", "kind", "in_features", "out_features", "bias", "patterns", "chunks")
        return cls(**{k: d[k] for k in fields}, extra={k: v for k, v in d.items() if k not in fields})


@dataclass
class QuerySetSpec:
    """How one query set was recorded (docs/format.md section 5)."""

    name: str
    items: int
    rows: Any = "all"  # "all" | "focus" | [positions]
    read: Any = "logits"  # "logits" | "last" | "first" | int | "mean" | "custom"
    target: str = "prediction"
    partial_layers: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**extra, **d}


@dataclass
class Manifest:
    layers: list[LayerSpec]
    tasks: list[str]
    classes: list[str]
    input: dict[str, Any]
    optimizer: dict[str, Any]
    training: dict[str, Any]
    version: int = VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    query_sets: list[QuerySetSpec] = field(default_factory=list)
    attribution: dict[str, Any] | None = None  # the recorder's attribution check (version 2)
    # {"algorithm": ..., "tensors": {name: hex}} (bundle/checksums.py); None: written before
    # checksums existed, or by a writer that does not store them
    checksums: dict[str, Any] | None = None

    @property
    def dual_form(self) -> dict[str, Any]:
        """docs/format.md section 3, `dual_form`: {"exact": true} unless the recorder said otherwise."""
        return self.extra.get("dual_form") or {"exact": True}

    @property
    def approximate(self) -> bool:
        """The patterns do not explain the learned change exactly (Adam, AdamW: version 3)."""
        return not self.dual_form.get("exact", True)

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

    @property
    def query_set_names(self) -> list[str]:
        return [q.name for q in self.query_sets]

    def query_set(self, name: str) -> QuerySetSpec:
        for q in self.query_sets:
            if q.name == name:
                return q
        raise KeyError(name)

    def to_json(self) -> str:
        d: dict[str, Any] = dict(self.extra)
        d.update(
            format=FORMAT,
            version=self.version,
            layers=[spec.to_json() for spec in self.layers],
            tasks=list(self.tasks),
            classes=list(self.classes),
            input=self.input,
            optimizer=self.optimizer,
            training=self.training,
        )
        if self.version >= 2:
            d["query_sets"] = [q.to_json() for q in self.query_sets]
            if self.attribution is not None:
                d["attribution"] = self.attribution
        if self.checksums is not None:
            d["checksums"] = self.checksums
        else:
            d.pop("checksums", None)  # a rewritten bundle's old digests would no longer hold
        return json.dumps(d)


_JSON_TYPES = {dict: "object", list: "array", int: "number", float: "number", bool: "boolean"}


def _require(cond: bool, path: object, detail: str) -> None:
    if not cond:
        raise errors.BadManifest(path, detail)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_manifest(text: str | None, path: object) -> Manifest:
    """Parse the manifest JSON string; every defect is a one-line `BundleError`."""
    if text is None:
        raise errors.MissingManifest(path, f"no {METADATA_KEY!r} entry in the safetensors metadata (is this a dualtui bundle?)")
    if not isinstance(text, str):  # a sharded index is JSON itself, so an object can sneak in
        raise errors.BadManifest(path, f"the {METADATA_KEY!r} metadata must be the manifest as a JSON string, "
                                       f"not a JSON {_JSON_TYPES.get(type(text), type(text).__name__)}")
    try:
        d = json.loads(text, object_pairs_hook=errors.no_duplicates)
    except json.JSONDecodeError as e:
        raise errors.BadManifest(path, f"manifest is not valid JSON ({e.msg} at char {e.pos})") from None
    except ValueError as e:  # an integer of more than 4,300 digits
        raise errors.BadManifest(path, f"manifest is not valid JSON ({str(e)[:80]})") from None
    except RecursionError:
        raise errors.BadManifest(path, "manifest is not valid JSON (nested too deeply)") from None
    _require(isinstance(d, dict), path, "manifest must be a JSON object")
    try:  # JSON may escape a lone surrogate ("\\ud800"): a string no UTF-8 output can carry
        json.dumps(d, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise errors.BadManifest(path, "a string in the manifest holds a lone surrogate (a \\ud800-\\udfff escape): "
                                       "not valid Unicode") from None
    _require(d.get("format") == FORMAT, path, f"manifest 'format' is {d.get('format')!r}, expected {FORMAT!r}")
    version = d.get("version")
    if not _is_int(version) or version not in READ_VERSIONS:
        raise errors.UnsupportedVersion(path, f"version {version!r}; this dualtui reads versions "
                                              f"{', '.join(map(str, READ_VERSIONS))}")

    layers_raw = d.get("layers")
    _require(isinstance(layers_raw, list) and len(layers_raw) > 0, path, "manifest 'layers' must be a non-empty list")
    known = {"name", "kind", "in_features", "out_features", "bias", "patterns", "chunks"}
    layers: list[LayerSpec] = []
    for i, raw in enumerate(layers_raw):
        _require(isinstance(raw, dict), path, f"layers[{i}] must be an object")
        name = raw.get("name")
        _require(isinstance(name, str) and name != "", path, f"layers[{i}] needs a non-empty string 'name'")
        why = bad_layer_name(name)
        _require(why is None, path, why or "")
        kind = raw.get("kind")
        _require(kind in LAYER_KINDS, path, f"layer {name!r}: kind {kind!r} is not one of {', '.join(LAYER_KINDS)}")
        for key in ("in_features", "out_features", "patterns"):
            _require(_is_int(raw.get(key)) and raw[key] >= 0, path, f"layer {name!r}: {key!r} must be a non-negative integer")
        _require(raw["in_features"] > 0 and raw["out_features"] > 0, path, f"layer {name!r}: features must be positive")
        chunks = raw.get("chunks", 1)
        _require(_is_int(chunks) and chunks >= 1, path, f"layer {name!r}: 'chunks' must be a positive integer")
        bias = raw.get("bias", False)
        _require(isinstance(bias, bool), path, f"layer {name!r}: 'bias' must be true or false")
        _require(not (kind == "embedding" and bias), path, f"layer {name!r}: an embedding layer has no bias")
        _require(all(s.name != name for s in layers), path, f"layer {name!r} appears twice")
        layers.append(
            LayerSpec(
                name=name,
                kind=kind,
                in_features=raw["in_features"],
                out_features=raw["out_features"],
                bias=bias,
                patterns=raw["patterns"],
                chunks=chunks,
                extra={k: v for k, v in raw.items() if k not in known},
            )
        )

    tasks = d.get("tasks", [])
    classes = d.get("classes", [])
    _require(isinstance(tasks, list) and all(isinstance(t, str) for t in tasks), path, "'tasks' must be a list of strings")
    _require(isinstance(classes, list) and all(isinstance(c, str) for c in classes), path, "'classes' must be a list of strings")
    inp = d.get("input", {"kind": "vector"})
    _require(isinstance(inp, dict) and inp.get("kind") in INPUT_KINDS, path, f"'input.kind' must be one of {', '.join(INPUT_KINDS)}")
    if inp["kind"] == "text":
        _require(isinstance(inp.get("vocab"), list), path, "a text input needs 'vocab', the list of token strings")
    optimizer = d.get("optimizer", {})
    training = d.get("training", {})
    _require(isinstance(optimizer, dict), path, "'optimizer' must be an object")
    _require(isinstance(training, dict), path, "'training' must be an object")
    steps = training.get("steps")
    _require(steps is None or (_is_int(steps) and 0 <= steps < 1 << 53), path,
             f"'training.steps' must be an integer in 0..2^53, not {str(steps)[:40]}")
    if inp["kind"] == "text":
        ctx = inp.get("context")
        _require(ctx is None or (_is_int(ctx) and 0 < ctx <= 1 << 20), path,
                 f"'input.context' must be an integer in 1..2^20, not {str(ctx)[:40]}")
        _require(all(isinstance(t, str) for t in inp["vocab"]), path, "'input.vocab' must be a list of strings")
    if inp["kind"] == "image":
        shape = inp.get("shape")
        _require(shape is None or (isinstance(shape, list) and len(shape) in (2, 3) and all(_is_int(x) and 0 < x <= 1 << 16 for x in shape)),
                 path, "'input.shape' must be [H, W] or [H, W, C] of positive integers")
    query_sets: list[QuerySetSpec] = []
    attribution = None
    if version >= 2:
        _require("query_sets" in d, path, f"a version {version} manifest needs 'query_sets' (a list, empty when no set was recorded)")
        query_sets = _parse_query_sets(d["query_sets"], path)
        names = {spec.name for spec in layers}
        for q in query_sets:
            unknown = [x for x in q.partial_layers if x not in names]
            if unknown:
                raise errors.BadManifest(path, f"query set {q.name!r}: partial_layers names {unknown[0]!r}, which is not a layer")
            _require(q.rows != "all" or not q.partial_layers, path,
                     f"query set {q.name!r} keeps rows 'all' but lists partial_layers")
        attribution = d.get("attribution")
        _require(attribution is None or isinstance(attribution, dict), path, "'attribution' must be an object")
        if attribution is not None:
            _check_attribution(attribution, path)
    nc = d.get("not_covered")
    _require(nc is None or (isinstance(nc, list) and all(isinstance(x, str) for x in nc)), path,
             "'not_covered' must be a list of parameter names")
    checksums = d.get("checksums")
    if checksums is not None:
        parsed = checksum_entry(checksums)
        _require(not isinstance(parsed, str), path, parsed if isinstance(parsed, str) else "")
    _check_dual_form(d.get("dual_form"), version, path)
    top_known = {"format", "version", "layers", "tasks", "classes", "input", "optimizer", "training", "checksums"}
    if version >= 2:
        top_known |= {"query_sets", "attribution"}
    return Manifest(
        layers=layers,
        tasks=tasks,
        classes=classes,
        input=inp,
        optimizer=optimizer,
        training=training,
        version=version,
        extra={k: v for k, v in d.items() if k not in top_known},
        query_sets=query_sets,
        attribution=attribution,
        checksums=checksums,
    )


def _check_dual_form(df: Any, version: int, path: object) -> None:
    """An approximate dual form needs version 3, so that a reader that does not know the key
    refuses the bundle instead of presenting approximate scores as exact."""
    if df is None:
        _require(version < 3, path, "a version 3 manifest needs 'dual_form'")
        return
    _require(isinstance(df, dict) and isinstance(df.get("exact"), bool), path, "'dual_form' must be an object with a boolean 'exact'")
    _require(df["exact"] or version >= 3, path, "an approximate 'dual_form' (exact: false) needs version 3")
    layers = df.get("layers", {})
    _require(isinstance(layers, dict) and all(isinstance(v, dict) and all(_is_number(x) for x in v.values())
                                              for v in layers.values()), path,
             "'dual_form.layers' must map layer names to objects of numbers")


def _is_number(x: Any) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    return abs(x) < 1e308 if isinstance(x, int) else math.isfinite(x)  # a 400-digit int overflows isfinite


def _check_attribution(a: dict, path: object) -> None:
    """The keys of `attribution` that readers print have the types docs/format.md section 6 gives."""
    def bad(key: str, what: str) -> str:
        return f"'attribution.{key}' must be {what}"

    _require(isinstance(a.get("checked", False), bool), path, bad("checked", "true or false"))
    _require(isinstance(a.get("ok", True), bool), path, bad("ok", "true or false"))
    steps = a.get("steps", [])
    _require(isinstance(steps, list) and all(_is_int(x) and x >= 0 for x in steps), path, bad("steps", "a list of step numbers"))
    for key in ("max_relative_error", "tolerance"):
        _require(key not in a or _is_number(a[key]), path, bad(key, "a finite number"))
    layers = a.get("layers", {})
    _require(isinstance(layers, dict) and all(v is None or _is_number(v) for v in layers.values()), path,
             bad("layers", "an object of finite numbers"))
    for key in ("unchecked_layers", "coupled_layers", "skipped"):
        v = a.get(key, [])
        _require(isinstance(v, list) and all(isinstance(x, str) for x in v), path, bad(key, "a list of strings"))
    for key in ("reason", "method", "failed"):
        _require(a.get(key) is None or isinstance(a[key], str), path, bad(key, "a string"))


def _parse_query_sets(raw: Any, path: object) -> list[QuerySetSpec]:
    _require(isinstance(raw, list), path, "'query_sets' must be a list")
    out: list[QuerySetSpec] = []
    known = {"name", "items", "rows", "read", "target", "partial_layers"}
    for i, q in enumerate(raw):
        _require(isinstance(q, dict), path, f"query_sets[{i}] must be an object")
        name = q.get("name")
        why = bad_query_set_name(name)
        _require(why is None, path, f"query_sets[{i}]: {why}")
        _require(all(o.name != name for o in out), path, f"query set {name!r} appears twice")
        items = q.get("items")
        _require(_is_int(items) and items >= 0, path, f"query set {name!r}: 'items' must be a non-negative integer")
        rows = q.get("rows", "all")
        _require(rows in QUERY_ROWS or (isinstance(rows, list) and all(_is_int(p) and p >= 0 for p in rows)), path,
                 f"query set {name!r}: 'rows' must be 'all', 'focus' or a list of positions")
        read = q.get("read", "logits")
        _require(read in QUERY_READS or (_is_int(read) and read >= 0), path,
                 f"query set {name!r}: 'read' must be one of {', '.join(QUERY_READS)} or a position")
        target = q.get("target", "prediction")
        _require(target in QUERY_TARGETS, path, f"query set {name!r}: 'target' must be one of {', '.join(QUERY_TARGETS)}")
        partial = q.get("partial_layers", [])
        _require(isinstance(partial, list) and all(isinstance(x, str) for x in partial), path,
                 f"query set {name!r}: 'partial_layers' must be a list of layer names")
        out.append(QuerySetSpec(name, items, rows, read, target, list(partial), {k: v for k, v in q.items() if k not in known}))
    return out
