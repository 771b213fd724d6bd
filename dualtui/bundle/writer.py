"""Write bundles: per-pattern data spooled to disk in chunks while recording, then one
streaming pass that lays out the final file(s) under a temporary name and renames them.

Memory stays bounded by one chunk per layer however long training runs, and a crash never
leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .manifest import METADATA_KEY, LayerSpec, Manifest
from .reader import INDEX_SUFFIX
from .safetensors_io import DTYPES, PendingTensor, iter_rows, write_file

# numpy dtype of a spooled array -> safetensors dtype name
_NP_TO_ST = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("float16"): "F16",
             np.dtype("int64"): "I64", np.dtype("int32"): "I32", np.dtype("uint8"): "U8",
             np.dtype("int8"): "I8", np.dtype("int16"): "I16", np.dtype("bool"): "BOOL"}
STORAGE_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "bfloat16": "BF16"}
# Rows copied at a time when laying out the final file: bounds memory during finalize.
COPY_ROWS = 1 << 15


def _cast(a: np.ndarray, st_dtype: str) -> np.ndarray:
    """Cast float data to a storage dtype; bfloat16 rounds to nearest even from float32 bits."""
    if st_dtype == "BF16":
        bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        out = (rounded >> 16).astype(np.uint16)
        nan = np.isnan(a)
        if nan.any():
            out[nan] = 0x7FC0
        return out
    return np.ascontiguousarray(a, dtype=DTYPES[st_dtype])


@dataclass
class _LayerSpool:
    spec: LayerSpec
    fields: tuple[str, ...]
    buffers: dict[str, list[np.ndarray]] = field(default_factory=dict)
    buffered_rows: int = 0
    buffered_bytes: int = 0
    chunk_files: list[dict[str, Path]] = field(default_factory=list)
    chunk_rows: list[int] = field(default_factory=list)


class BundleWriter:
    """Accumulates per-pattern chunks on disk; `finalize` writes the bundle atomically.

    Values are spooled raw (the recorder's error signals) and transformed at finalize by
    `value_transform(chunk_values, chunk_steps)`, because the SGD-family coefficient of a
    step is only known once training ends.
    """

    def __init__(self, path: str | os.PathLike, *, storage_dtype: str = "float32",
                 chunk_bytes: int = 32 << 20, max_shard_bytes: int = 4 << 30):
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
        self.path = Path(path)
        if self.path.name.endswith(INDEX_SUFFIX):
            self.path = self.path.with_name(self.path.name[: -len(".index.json")])
        if self.path.suffix != ".safetensors":
            raise ValueError(f"bundle path must end in .safetensors: {self.path}")
        self.storage = STORAGE_DTYPES[storage_dtype]
        self.chunk_bytes = chunk_bytes
        self.max_shard_bytes = max_shard_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The spool lives beside the output so the final rename never crosses file systems.
        self.spool = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.spool-", dir=self.path.parent))
        self.layers: dict[str, _LayerSpool] = {}

    # ------------------------------------------------------------ recording
    def add_layer(self, spec: LayerSpec, with_position: bool = False) -> None:
        fields = ("keys", "values", "step", "example") + (("position",) if with_position else ())
        self.layers[spec.name] = _LayerSpool(spec, fields, {f: [] for f in fields})

    def append(self, layer: str, **arrays: np.ndarray) -> None:
        """Add patterns to a layer: keys, values (raw), step, example[, position] of equal length."""
        spool = self.layers[layer]
        n = None
        for f in spool.fields:
            a = arrays[f]
            if n is None:
                n = a.shape[0]
            elif a.shape[0] != n:
                raise ValueError(f"{layer}: {f} has {a.shape[0]} rows, expected {n}")
            spool.buffers[f].append(a)
            spool.buffered_bytes += a.nbytes
        spool.buffered_rows += n or 0
        if spool.buffered_bytes >= self.chunk_bytes:
            self.flush(layer)

    def flush(self, layer: str) -> None:
        spool = self.layers[layer]
        if spool.buffered_rows == 0:
            return
        index = len(spool.chunk_files)
        files = {}
        for f in spool.fields:
            p = self.spool / f"{list(self.layers).index(layer)}.{index}.{f}.npy"
            np.save(p, np.concatenate(spool.buffers[f]))
            spool.buffers[f] = []
            files[f] = p
        spool.chunk_files.append(files)
        spool.chunk_rows.append(spool.buffered_rows)
        spool.buffered_rows = spool.buffered_bytes = 0

    def iter_chunks(self, layer: str) -> Iterator[dict[str, np.ndarray]]:
        """The spooled raw chunks of a layer, memory-mapped (flushes the buffer first)."""
        self.flush(layer)
        for files in self.layers[layer].chunk_files:
            yield {f: np.load(p, mmap_mode="r") for f, p in files.items()}

    def patterns(self, layer: str) -> int:
        spool = self.layers[layer]
        return sum(spool.chunk_rows) + spool.buffered_rows

    # ------------------------------------------------------------ finalizing
    def finalize(self, manifest: Manifest, static: dict[str, np.ndarray],
                 value_transform: Callable[[str, np.ndarray, np.ndarray], np.ndarray]) -> Path:
        """Write the bundle: `static` tensors (weights, queries, train/*, test/*) plus the
        spooled patterns, values passed through `value_transform(layer, values, steps)`.
        Returns the path to open (the file, or the index of a sharded set)."""
        for layer in self.layers:
            self.flush(layer)
        tensors: list[PendingTensor] = []
        for spec in manifest.layers:
            spool = self.layers[spec.name]
            spec.patterns = sum(spool.chunk_rows)
            spec.chunks = max(1, len(spool.chunk_rows))
            chunk_list = spool.chunk_files or [None]
            for f in spool.fields:
                for c, files in enumerate(chunk_list):
                    name = f"layer/{spec.name}/{f}" + (f"/{c}" if spec.chunks > 1 else "")
                    tensors.append(self._pattern_tensor(spec, f, name, files))
        for name, array in static.items():
            array = np.ascontiguousarray(array)
            tensors.append(PendingTensor(name, _NP_TO_ST[array.dtype], tuple(array.shape),
                                         lambda a=array: iter_rows(a, COPY_ROWS)))
        self._value_transform = value_transform
        out = self._write(tensors, {METADATA_KEY: manifest.to_json()})
        shutil.rmtree(self.spool, ignore_errors=True)
        return out

    def _pattern_tensor(self, spec: LayerSpec, f: str, name: str, files: dict[str, Path] | None) -> PendingTensor:
        emb = spec.kind == "embedding"
        if files is None:  # a layer that saw no patterns still gets well-formed empty tensors
            width = {"keys": None if emb else spec.in_features, "values": spec.out_features}.get(f)
            shape = (0,) if width is None else (0, width)
            dtype = "I64" if (f not in ("keys", "values") or (f == "keys" and emb)) else self.storage
            return PendingTensor(name, dtype, shape, lambda: iter(()))
        arr = np.load(files[f], mmap_mode="r")
        if f in ("step", "example", "position") or (f == "keys" and emb):
            return PendingTensor(name, "I64", tuple(arr.shape), lambda: (a.astype(np.int64) for a in iter_rows(arr, COPY_ROWS)))
        if f == "keys":
            return PendingTensor(name, self.storage, tuple(arr.shape), lambda: (_cast(a, self.storage) for a in iter_rows(arr, COPY_ROWS)))

        def values() -> Iterator[np.ndarray]:
            steps = np.load(files["step"], mmap_mode="r")
            for lo in range(0, arr.shape[0], COPY_ROWS):
                v = self._value_transform(spec.name, np.asarray(arr[lo : lo + COPY_ROWS]), np.asarray(steps[lo : lo + COPY_ROWS]))
                yield _cast(v, self.storage)

        return PendingTensor(name, self.storage, tuple(arr.shape), values)

    def _write(self, tensors: list[PendingTensor], metadata: dict[str, str]) -> Path:
        shards: list[list[PendingTensor]] = [[]]
        size = 0
        for t in tensors:
            if shards[-1] and size + t.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(t)
            size += t.nbytes
        index_path = self.path.with_name(self.path.name + ".index.json")
        if len(shards) == 1:
            tmp = self.spool / "bundle.safetensors.tmp"
            write_file(tmp, shards[0], metadata)
            os.replace(tmp, self.path)
            _remove_quietly(index_path)  # an older sharded run of the same name would shadow nothing, but confuse
            _fsync_dir(self.path.parent)
            return self.path
        stem = self.path.name[: -len(".safetensors")]
        n = len(shards)
        names = [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard_name, shard in zip(names, shards):
            write_file(self.spool / shard_name, shard, {"format": "pt"})
        weight_map = {t.name: shard_name for shard_name, shard in zip(names, shards) for t in shard}
        index = {"metadata": {**metadata, "total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        tmp_index = self.spool / "index.json.tmp"
        tmp_index.write_text(json.dumps(index, indent=1))
        # Shards first, index last: the index is what makes the set a bundle.
        for shard_name in names:
            os.replace(self.spool / shard_name, self.path.parent / shard_name)
        os.replace(tmp_index, index_path)
        # `Bundle.open(NAME.safetensors)` prefers an existing single file: drop an older one.
        _remove_quietly(self.path)
        _fsync_dir(self.path.parent)
        return index_path

    def discard(self) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
