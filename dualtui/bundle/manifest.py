"""The bundle manifest of format v1 (DESIGN.md section 3): schema, parsing, serialising."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from . import errors

FORMAT = "dualtui.bundle"
VERSION = 1
METADATA_KEY = "dualtui"
LAYER_KINDS = ("linear", "embedding")
INPUT_KINDS = ("image", "text", "vector")


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

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @property
    def layer_names(self) -> list[str]:
        return [spec.name for spec in self.layers]

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
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise errors.BadManifest(path, f"manifest is not valid JSON ({e.msg} at char {e.pos})") from None
    except RecursionError:
        raise errors.BadManifest(path, "manifest is not valid JSON (nested too deeply)") from None
    _require(isinstance(d, dict), path, "manifest must be a JSON object")
    _require(d.get("format") == FORMAT, path, f"manifest 'format' is {d.get('format')!r}, expected {FORMAT!r}")
    version = d.get("version")
    if version != VERSION:
        raise errors.UnsupportedVersion(path, f"version {version!r}; this dualtui reads version {VERSION}")

    layers_raw = d.get("layers")
    _require(isinstance(layers_raw, list) and len(layers_raw) > 0, path, "manifest 'layers' must be a non-empty list")
    known = {"name", "kind", "in_features", "out_features", "bias", "patterns", "chunks"}
    layers: list[LayerSpec] = []
    for i, raw in enumerate(layers_raw):
        _require(isinstance(raw, dict), path, f"layers[{i}] must be an object")
        name = raw.get("name")
        _require(isinstance(name, str) and name != "", path, f"layers[{i}] needs a non-empty string 'name'")
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
    top_known = {"format", "version", "layers", "tasks", "classes", "input", "optimizer", "training"}
    return Manifest(
        layers=layers,
        tasks=tasks,
        classes=classes,
        input=inp,
        optimizer=optimizer,
        training=training,
        version=version,
        extra={k: v for k, v in d.items() if k not in top_known},
    )
