"""Open a bundle (one file or a sharded set) lazily and check it against the format (v1 or v2).

Opening reads headers only; tensors are memory-mapped views, and per-pattern tensors are
served chunk by chunk, so opening a 10 GB bundle touches kilobytes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import errors
from .manifest import METADATA_KEY, LayerSpec, Manifest, QuerySetSpec, parse_manifest
from .queries import QuerySet
from .safetensors_io import FLOAT_DTYPES, MappedFile, TensorInfo, read_header, to_float32

PATTERN_FIELDS = ("keys", "values", "step", "example", "position")
STORAGE_FLOATS = ("F32", "F64", "F16", "BF16")
# Weights, initial weights, query rows and grads: float32, or float64 in a float64 bundle.
EXACT_FLOATS = ("F32", "F64")
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass
class PatternChunk:
    """Patterns [start, start + len) of one layer, as float32 (float64 storage: float64) / int64 arrays."""

    start: int
    keys: np.ndarray  # [n, in] float32, or [n] int64 token ids for embeddings
    values: np.ndarray  # [n, out] float32
    step: np.ndarray  # [n] int64
    example: np.ndarray  # [n] int64
    position: np.ndarray | None  # [n] int64

    def __len__(self) -> int:
        return int(self.step.shape[0])


def _inside(folder: Path, name: str, index: Path) -> Path:
    """A shard must be a file in the index's folder: a symlink is followed only when it
    resolves inside that folder (read_header then refuses FIFOs, devices and folders)."""
    p = folder / name
    if p.is_symlink():
        try:
            real, home = p.resolve(strict=True), folder.resolve()
        except (OSError, RuntimeError):  # a loop (RuntimeError on Python 3.11), or a dangling link
            raise errors.UnreadableFile(index, f"shard {name} is a symlink that does not resolve (a loop, or its target "
                                               "is missing)") from None
        if home != real.parent and home not in real.parents:
            raise errors.NotSafetensors(index, f"shard {name} is a symlink to {real}, outside the bundle's folder")
    return p


class Bundle:
    """A dual-form bundle (format v1 or v2). Use `Bundle.open(path)`; structure is checked on open."""

    def __init__(self, path: Path, manifest: Manifest, files: dict[str, MappedFile], sharded: bool):
        self.path = path
        self.manifest = manifest
        self._files = files  # tensor name -> the file holding it
        self.sharded = sharded
        if manifest.version == 1:
            # One query set, "test", in the v1 layout (docs/format.md section 8).
            n = self.info("test/label").shape[0] if self.has("test/label") and self.info("test/label").shape else 0
            self._query_sets = {"test": QuerySet(self, QuerySetSpec("test", int(n), "all", "logits"), legacy=True)}
        else:
            self._query_sets = {q.name: QuerySet(self, q, legacy=False) for q in manifest.query_sets}
        self.validate_structure()

    # -------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        path = Path(path)
        if not path.exists() and not str(path).endswith(".json"):
            index = Path(str(path) + ".index.json")
            if index.exists():
                path = index
        if str(path).endswith(".json"):
            return cls._open_index(path)
        header = read_header(path)
        manifest = parse_manifest(header.metadata.get(METADATA_KEY), path)
        mapped = MappedFile(header)
        return cls(path, manifest, {name: mapped for name in header.tensors}, sharded=False)

    @classmethod
    def _open_index(cls, path: Path) -> "Bundle":
        try:
            if path.exists() and not path.is_file():  # a FIFO would block read_text() forever
                raise errors.UnreadableFile(path, "is not a regular file")
            index = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=errors.no_duplicates)
        except FileNotFoundError:
            raise errors.UnreadableFile(path, "no such file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise errors.UnreadableFile(path, str(e)) from None
        except ValueError as e:  # not JSON, or an integer of more than 4,300 digits
            raise errors.NotSafetensors(path, f"index is not valid JSON ({getattr(e, 'msg', str(e)[:80])})") from None
        except RecursionError:
            raise errors.NotSafetensors(path, "index is not valid JSON (nested too deeply)") from None
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise errors.NotSafetensors(path, "a sharded index needs a 'weight_map' object")
        meta = index.get("metadata") or {}
        if not isinstance(meta, dict):
            raise errors.NotSafetensors(path, "index 'metadata' must be an object")
        manifest = parse_manifest(meta.get(METADATA_KEY), path)
        shards: dict[str, MappedFile] = {}
        files: dict[str, MappedFile] = {}
        for name, shard in index["weight_map"].items():
            if (not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith(".")
                    or not shard.isprintable()):  # a NUL would reach os.stat; a control character the terminal
                raise errors.NotSafetensors(path, f"weight_map entry for {name!r} is not a shard file name beside the index")
            if shard not in shards:
                shards[shard] = MappedFile(read_header(_inside(path.parent, shard, path)))
            if name not in shards[shard].header.tensors:
                raise errors.MissingTensor(path, f"{name!r} is mapped to {shard} but that shard does not hold it")
            files[name] = shards[shard]
        return cls(path, manifest, files, sharded=True)

    # -------------------------------------------------------------- raw access
    def has(self, name: str) -> bool:
        return name in self._files

    def info(self, name: str) -> TensorInfo:
        if name not in self._files:
            raise errors.MissingTensor(self.path, f"{name!r}")
        return self._files[name].header.tensors[name]

    def raw(self, name: str) -> np.ndarray:
        """The stored tensor as a lazy memory-mapped view (bfloat16 as uint16 bits)."""
        self.info(name)
        return self._files[name].array(name)

    def array(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of a tensor, read now; floats come back as float32."""
        info = self.info(name)
        raw = self._files[name].array(name)
        if start is not None or stop is not None:
            raw = raw[start:stop]
        if info.dtype in FLOAT_DTYPES:
            return to_float32(raw, info.dtype)
        return np.asarray(raw)

    def take(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows `indices` of a tensor (random access), floats as float32."""
        info = self.info(name)
        raw = self._files[name].array(name)
        rows = raw[np.asarray(indices, dtype=np.int64)]
        if info.dtype in FLOAT_DTYPES:
            return to_float32(rows, info.dtype)
        return np.asarray(rows)

    def release(self, name: str, start: int, stop: int) -> None:
        """Tell the OS we are done with rows [start, stop) of a tensor (see MappedFile.release)."""
        info = self.info(name)
        row = (info.end - info.start) // max(info.shape[0], 1) if info.shape else 0
        self._files[name].release(info.start + start * row, info.start + stop * row)

    def digest(self, name: str, algorithm: str) -> str:
        """The checksum of a tensor's stored bytes (bundle/checksums.py)."""
        self.info(name)
        return self._files[name].digest(name, algorithm)

    @property
    def tensor_names(self) -> list[str]:
        return list(self._files)

    @property
    def files(self) -> list[Path]:
        return sorted({f.header.path for f in self._files.values()})

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files) + (self.path.stat().st_size if self.sharded else 0)

    # -------------------------------------------------------------- layers
    def layer_spec(self, layer: str) -> LayerSpec:
        try:
            return self.manifest.layer(layer)
        except KeyError:
            raise KeyError(layer) from None

    def pattern_names(self, layer: str, field: str) -> list[str]:
        """Tensor names holding one per-pattern field, in order (one, or one per chunk)."""
        spec = self.layer_spec(layer)
        base = f"layer/{layer}/{field}"
        if spec.chunks == 1 and base in self._files:
            return [base]
        return [f"{base}/{i}" for i in range(spec.chunks)]

    def has_position(self, layer: str) -> bool:
        return all(self.has(n) for n in self.pattern_names(layer, "position"))

    def chunk_bounds(self, layer: str) -> list[tuple[int, int]]:
        bounds, start = [], 0
        for name in self.pattern_names(layer, "step"):
            n = self.info(name).shape[0]
            bounds.append((start, start + n))
            start += n
        return bounds

    def chunks(self, layer: str, rows: int | None = None) -> Iterator[PatternChunk]:
        """Stream a layer's patterns chunk by chunk (sub-split into at most `rows` rows)."""
        names = {f: self.pattern_names(layer, f) for f in PATTERN_FIELDS}
        with_position = self.has_position(layer)
        for i, (start, stop) in enumerate(self.chunk_bounds(layer)):
            n = stop - start
            step = rows or max(n, 1)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                yield PatternChunk(
                    start=start + lo,
                    keys=self.array(names["keys"][i], lo, hi),
                    values=self.array(names["values"][i], lo, hi),
                    step=self.array(names["step"][i], lo, hi),
                    example=self.array(names["example"][i], lo, hi),
                    position=self.array(names["position"][i], lo, hi) if with_position else None,
                )

    def bias_scale(self, layer: str) -> np.ndarray | None:
        """layer/<L>/bias_scale (float64, by step) when the layer's bias has its own coefficient
        chain, else None (a bias is the weight of a constant input 1)."""
        name = f"layer/{layer}/bias_scale"
        # a copy: [steps] float64 is small, and torch refuses to wrap a read-only mapping
        return np.array(self.array(name), dtype=np.float64) if self.has(name) else None

    def storage_dtype(self, layer: str) -> str:
        return self.info(self.pattern_names(layer, "values")[0]).dtype

    @property
    def train_size(self) -> int:
        return int(self.info("train/label").shape[0])

    # -------------------------------------------------------------- query sets
    @property
    def query_set_names(self) -> list[str]:
        return list(self._query_sets)

    @property
    def default_query_set(self) -> str | None:
        """"test" when the bundle has it, else its first query set (None: it has none)."""
        if "test" in self._query_sets:
            return "test"
        return next(iter(self._query_sets), None)

    def queries(self, name: str | None = None) -> QuerySet:
        """A query set by name (default: `default_query_set`); KeyError names the valid ones."""
        name = name if name is not None else self.default_query_set
        if name is None or name not in self._query_sets:
            raise KeyError(name)
        return self._query_sets[name]

    @property
    def test_size(self) -> int:
        """Items of the default query set (0 when the bundle has none)."""
        name = self.default_query_set
        return self._query_sets[name].size if name is not None else 0

    # -------------------------------------------------------------- checks
    def _expect(self, name: str, shape: tuple[int | None, ...], dtypes: tuple[str, ...]) -> TensorInfo:
        """Check a tensor exists with `shape` (None = any size there) and one of `dtypes`."""
        info = self.info(name)
        if len(info.shape) != len(shape) or any(s is not None and s != d for s, d in zip(shape, info.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise errors.ShapeMismatch(self.path, f"{name!r} has shape {list(info.shape)}, expected {want}")
        if info.dtype not in dtypes:
            raise errors.DtypeMismatch(self.path, f"{name!r} is {info.dtype}, expected {' or '.join(dtypes)}")
        return info

    def validate_structure(self) -> None:
        """Check every promised tensor exists with the manifest's shapes and dtypes (headers only)."""
        m = self.manifest
        n_train = self._expect("train/label", (None,), ("I64",)).shape[0]
        self._expect("train/task", (n_train,), ("I64",))
        if self.has("train/input") and self.info("train/input").shape[:1] != (n_train,):
            raise errors.ShapeMismatch(self.path, f"'train/input' has {self.info('train/input').shape[:1]} rows, expected {n_train}")
        if self.manifest.input.get("kind") == "image":  # previews the app draws as pixels
            names = ["train/input"] + [qs.item_name("input") for qs in self._query_sets.values() if qs.has("input")]
            for name in (n for n in names if self.has(n)):
                px = self.info(name).shape[1:]
                want = self.manifest.input.get("shape")
                if not (len(px) == 2 or (len(px) == 3 and px[2] == 3)) or (want is not None and list(px) != list(want)):
                    raise errors.ShapeMismatch(self.path, f"{name!r}: an image run's previews must be [N, H, W] or "
                                                          f"[N, H, W, 3]{f' matching input.shape {want}' if want else ''}, "
                                                          f"not {[self.info(name).shape[0], *px]}")
        ctx = m.input.get("context") if m.input.get("kind") == "text" else None
        if isinstance(ctx, int):
            # Per-token tables are sized training examples × context: a manifest number must not
            # size an allocation the file's own tensors cannot back (the windows hold context + 1
            # tokens; without them, every (example, position) of a recorded window is a pattern).
            if self.has("train/input") and len(self.info("train/input").shape) == 2:
                width = self.info("train/input").shape[1]
                if ctx > width:
                    raise errors.BadManifest(self.path, f"'input.context' is {ctx}, but the training windows "
                                                        f"('train/input') hold {width} tokens")
            elif n_train * ctx > max(sum(spec.patterns for spec in m.layers), 1 << 20):
                raise errors.BadManifest(self.path, f"'input.context' {ctx} × {n_train:,} training examples is more "
                                                    "(example, position) pairs than the bundle has patterns")
        for qs in self._query_sets.values():
            self._validate_query_set(qs)
        if m.version >= 2:
            for name in self._files:
                if name.startswith("queries/"):
                    parts = name.split("/")
                    if len(parts) < 3 or parts[1] not in self._query_sets:
                        raise errors.BadManifest(self.path, f"tensor {name!r} belongs to no query set of the manifest's query_sets")
                    if len(parts) > 3 and parts[2] == "layer" and parts[3] not in m.layer_names:
                        raise errors.BadManifest(self.path, f"tensor {name!r} belongs to no layer of the manifest")
        text = m.input.get("kind") == "text"
        for spec in m.layers:
            L, i, o = spec.name, spec.in_features, spec.out_features
            emb = spec.kind == "embedding"
            wshape = (i, o) if emb else ((o,) if spec.kind == "elementwise" else (o, i))
            if spec.kind == "elementwise" and i != o:
                raise errors.BadManifest(self.path, f"layer {L!r}: an elementwise layer has in_features == out_features")
            self._expect(f"layer/{L}/weight", wshape, EXACT_FLOATS)
            self._expect(f"layer/{L}/w0", wshape, EXACT_FLOATS)
            if spec.bias:
                self._expect(f"layer/{L}/bias", (o,), EXACT_FLOATS)
                self._expect(f"layer/{L}/b0", (o,), EXACT_FLOATS)
            if self.has(f"layer/{L}/bias_scale"):
                if not spec.bias:
                    raise errors.BadManifest(self.path, f"layer {L!r} has a bias_scale but no bias")
                self._expect(f"layer/{L}/bias_scale", (None,), ("F64",))
            if spec.chunks > len(self._files):
                # Checked before listing chunk names: a corrupt count like 10**20 must not eat memory.
                raise errors.MissingTensor(self.path, f"layer {L!r}: the manifest promises {spec.chunks} chunks, "
                                                      f"the bundle holds only {len(self._files)} tensors")
            fields = ["keys", "values", "step", "example"] + (["position"] if text or self.has_position(L) else [])
            names_of = {f: self.pattern_names(L, f) for f in fields}
            total = 0
            storage: set[str] = set()
            for c in range(spec.chunks):
                sizes = set()
                for f in fields:
                    name = names_of[f][c]
                    if f == "keys":
                        info = self._expect(name, (None,), ("I64",)) if emb else self._expect(name, (None, i), STORAGE_FLOATS)
                    elif f == "values":
                        info = self._expect(name, (None, o), STORAGE_FLOATS)
                    else:
                        info = self._expect(name, (None,), ("I64",))
                    if f in ("keys", "values") and info.dtype != "I64":
                        storage.add(info.dtype)
                    sizes.add(info.shape[0])
                # One storage dtype per layer (keys and values, every chunk): the engine computes a
                # layer in one dtype, chosen from it.
                if len(storage) > 1:
                    raise errors.ShapeMismatch(self.path, f"layer {L!r}: keys and values are stored as {' and '.join(sorted(storage))}; "
                                                          "a layer's keys and values share one storage dtype")
                if len(sizes) != 1:
                    raise errors.ShapeMismatch(self.path, f"layer {L!r} chunk {c}: per-pattern tensors have different lengths {sorted(sizes)}")
                total += sizes.pop()
            if total != spec.patterns:
                raise errors.ShapeMismatch(self.path, f"layer {L!r} holds {total} patterns, the manifest says {spec.patterns}")

    def _validate_query_set(self, qs: QuerySet) -> None:
        def weight_dtype(layer: str) -> str:
            d = self.info(f"layer/{layer}/weight").dtype if self.has(f"layer/{layer}/weight") else "F32"
            return d if d in EXACT_FLOATS else "F32"

        n = self._expect(qs.item_name("label"), (None,), ("I64",)).shape[0]
        if not qs.legacy and n != qs.spec.items:
            raise errors.ShapeMismatch(self.path, f"query set {qs.name!r} holds {n} items, the manifest says {qs.spec.items}")
        for f in ("task", "prediction") + (() if qs.legacy else ("target",)):
            self._expect(qs.item_name(f), (n,), ("I64",))
        if not qs.legacy:
            for f, dtypes in (("probability", ("F32",)), ("loss", ("F32",)), ("example", ("I64",))):
                if self.has(qs.item_name(f)):
                    self._expect(qs.item_name(f), (n,), dtypes)
        if qs.has("input") and self.info(qs.item_name("input")).shape[:1] != (n,):
            raise errors.ShapeMismatch(self.path, f"{qs.item_name('input')!r} has {self.info(qs.item_name('input')).shape[:1]} rows, expected {n}")
        for spec in self.manifest.layers:
            L, i, o = spec.name, spec.in_features, spec.out_features
            emb = spec.kind == "embedding"
            rows = None if not qs.legacy else n
            if emb:
                r = self._expect(qs.row_name(L, "query"), (rows,), ("I64",)).shape[0]
            else:  # version 1 allowed any float; version 2: the dtype of the layer's weight (F32 or F64)
                r = self._expect(qs.row_name(L, "query"), (rows, i), tuple(FLOAT_DTYPES) if qs.legacy else (weight_dtype(L),)).shape[0]
            self._expect(qs.row_name(L, "grad"), (r, o), ("F32",) if qs.legacy else (weight_dtype(L),))
            if not qs.legacy:
                for f in ("item", "position", "call"):
                    self._expect(qs.row_name(L, f), (r,), ("I64",))
                self._expect(qs.row_name(L, "focus"), (n,), ("I64",))

    def validate_contents(self, rows: int = 1 << 16) -> None:
        """Stream through every tensor: ids in range, steps in order, floats finite."""
        self.validate_small()
        self.validate_patterns(rows)

    def validate_small(self) -> None:
        """Everything but the per-pattern tensors (one pass over small tensors: tables, query
        sets, weights): every command runs it before it computes; the per-pattern ids and
        floats are checked as the engine streams them (`check_block`)."""
        m = self.manifest
        n_train = self.train_size
        n_tasks, n_classes = len(m.tasks), len(m.classes)

        def ids(name: str, upper: int, what: str) -> None:
            a = self.array(name)
            if a.size and (a.min() < 0 or a.max() >= upper):
                bad = int(a.min()) if a.min() < 0 else int(a.max())
                raise errors.IdOutOfRange(self.path, f"{name!r} holds {bad}, valid {what} are 0..{upper - 1}")

        ids("train/label", n_classes, "classes")
        ids("train/task", n_tasks, "tasks")
        if self.has("train/input") and self.info("train/input").dtype in FLOAT_DTYPES:
            self._finite("train/input", self.array("train/input"))
        if m.input.get("kind") == "text":
            # A text run's windows are token ids: the next token of a pattern (its class in a
            # language model), and every preview, is read from them.
            vocab = len(m.input.get("vocab", []))
            windows = ["train/input"] + [qs.item_name("input") for qs in self._query_sets.values() if qs.has("input")]
            for name in (w for w in windows if self.has(w)):
                if self.info(name).dtype in FLOAT_DTYPES:
                    raise errors.ShapeMismatch(self.path, f"{name!r}: a text run's windows are token ids (integers), not "
                                                          f"{self.info(name).dtype}")
                ids(name, vocab, "token ids")
        for qs in self._query_sets.values():
            n = qs.size
            for f, upper, what in (("label", n_classes, "classes"), ("prediction", n_classes, "classes"),
                                   ("target", n_classes, "classes"), ("task", n_tasks, "tasks"), ("example", n_train, "examples")):
                if qs.has(f) and not (qs.legacy and f == "target"):
                    ids(qs.item_name(f), upper, what)
            for f in ("probability", "loss", "input"):
                if qs.has(f) and self.info(qs.item_name(f)).dtype in FLOAT_DTYPES:
                    self._finite(qs.item_name(f), self.array(qs.item_name(f)))
            rule = qs.spec.target
            if not qs.legacy and rule in ("prediction", "label") and np.any(qs.target != qs.array(rule)):
                bad = int(np.nonzero(qs.target != qs.array(rule))[0][0])
                raise errors.IdOutOfRange(self.path, f"query set {qs.name!r}: the manifest says target {rule!r}, but item "
                                                     f"{bad}'s target differs from its {rule}")
            for spec in m.layers:
                L = spec.name
                self._finite(qs.row_name(L, "grad"), self.array(qs.row_name(L, "grad")))
                if spec.kind == "embedding":
                    ids(qs.row_name(L, "query"), spec.in_features, "token ids")
                else:
                    self._finite(qs.row_name(L, "query"), self.array(qs.row_name(L, "query")))
                if qs.legacy:
                    continue
                item = self.array(qs.row_name(L, "item"))
                ids(qs.row_name(L, "item"), n, "items")
                if np.any(np.diff(item) < 0):
                    raise errors.BadOrder(self.path, f"{qs.row_name(L, 'item')!r} must never decrease")
                for f in ("position", "call"):
                    a = self.array(qs.row_name(L, f))
                    if a.size and a.min() < 0:
                        raise errors.IdOutOfRange(self.path, f"{qs.row_name(L, f)!r} holds {int(a.min())}, must be >= 0")
                ctx = m.input.get("context") if m.input.get("kind") == "text" else None
                pos = self.array(qs.row_name(L, "position"))
                if isinstance(ctx, int) and pos.size and pos.max() >= ctx:
                    raise errors.IdOutOfRange(self.path, f"{qs.row_name(L, 'position')!r} holds {int(pos.max())}, "
                                                         f"outside the {ctx}-token context")
                focus = self.array(qs.row_name(L, "focus"))
                if focus.size:
                    if focus.min() < -1 or focus.max() >= len(item):
                        bad = int(focus.min()) if focus.min() < -1 else int(focus.max())
                        raise errors.IdOutOfRange(self.path, f"{qs.row_name(L, 'focus')!r} holds {bad}, valid rows are -1..{len(item) - 1}")
                    own = focus >= 0
                    if np.any(item[focus[own]] != np.nonzero(own)[0]):
                        raise errors.IdOutOfRange(self.path, f"{qs.row_name(L, 'focus')!r} points at a row of another item")
        for spec in m.layers:
            L = spec.name
            for name in (f"layer/{L}/weight", f"layer/{L}/w0") + ((f"layer/{L}/bias", f"layer/{L}/b0") if spec.bias else ()):
                self._finite(name, self.array(name))
            bias_scale = self.bias_scale(L)
            if bias_scale is not None:
                self._finite(f"layer/{L}/bias_scale", bias_scale)

    def validate_patterns(self, rows: int = 1 << 16) -> None:
        for spec in self.manifest.layers:
            L = spec.name
            bias_scale = self.bias_scale(L)
            last_step = -math.inf
            for chunk in self.chunks(L, rows):
                where = f"layer {L!r} patterns {chunk.start}..{chunk.start + len(chunk) - 1}"
                if spec.kind == "embedding":
                    if chunk.keys.size and (chunk.keys.min() < 0 or chunk.keys.max() >= spec.in_features):
                        raise errors.IdOutOfRange(self.path, f"{where}: key token id outside 0..{spec.in_features - 1}")
                else:
                    self._finite(f"{where} keys", chunk.keys)
                self._finite(f"{where} values", chunk.values)
                if len(chunk):
                    if chunk.step.min() < 0 or chunk.step[0] < last_step or np.any(np.diff(chunk.step) < 0):
                        raise errors.BadOrder(self.path, f"{where}: 'step' must be non-negative and never decrease")
                    self.check_ids(L, where, chunk.example, chunk.step, chunk.position)
                    last_step = chunk.step[-1]
                    if bias_scale is not None and chunk.step[-1] >= len(bias_scale):
                        raise errors.IdOutOfRange(self.path, f"{where}: step {int(chunk.step[-1])} has no bias_scale "
                                                             f"(it covers steps 0..{len(bias_scale) - 1})")

    def check_ids(self, layer: str, where: str, example: Any, step: Any, position: Any = None) -> None:
        """The per-pattern ids of some patterns (numpy arrays or tensors) in range: examples in
        0..train_size-1, steps >= 0, positions >= 0
        and below the context of a text run."""
        n_train = self.train_size
        if len(example) and (int(example.min()) < 0 or int(example.max()) >= n_train):
            raise errors.IdOutOfRange(self.path, f"{where}: example id outside 0..{n_train - 1}")
        # (the format does not bound steps by training.steps: other writers count differently)
        if len(step) and int(step.min()) < 0:
            raise errors.IdOutOfRange(self.path, f"{where}: negative step")
        if position is not None and len(position):
            ctx = self.manifest.input.get("context") if self.manifest.input.get("kind") == "text" else None
            if int(position.min()) < 0 or (isinstance(ctx, int) and int(position.max()) >= ctx):
                raise errors.IdOutOfRange(self.path, f"{where}: position outside 0..{ctx - 1 if isinstance(ctx, int) else '∞'}")

    def _finite(self, what: str, a: np.ndarray) -> None:
        if a.size and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise errors.NonFinite(self.path, f"{what} has {bad} NaN/Inf entries")
