"""Strict, lazy safetensors reading (memory-mapped) and streaming safetensors writing.

We parse the header ourselves instead of calling `safetensors.safe_open` because format v1
needs named errors for every way a file can be broken, bfloat16 without torch, and writing
a file whose tensors are produced chunk by chunk (never all in memory at once).
"""

from __future__ import annotations

import json
import mmap as mmap_module
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import checksums, errors

# Same cap as the reference implementation: a header is JSON describing tensors, never data.
MAX_HEADER_BYTES = 100_000_000
# Parsing a header costs ~1 KB of memory per tensor entry (1M empty tensors: ~1 GB, 12 s), so the
# count is bounded before parsing. A recorded file holds layers × 5 fields × chunks of 32 MB
# (a 4 GiB shard: a few hundred chunk tensors per layer); 200,000 is far above any of them.
MAX_TENSORS = 200_000

# safetensors dtype name -> numpy dtype used to map the bytes (bfloat16 is mapped as uint16
# and widened on read, see `to_float32`).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INT_DTYPES = {"I64", "I32", "I16", "I8", "U8"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors name, e.g. "F32", "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and check a safetensors header; raise a named `BundleError` on any defect."""
    path = Path(path)
    try:
        st = path.stat()
        # A FIFO would block open() forever, a device could be endless: only regular files.
        if stat.S_ISDIR(st.st_mode):
            raise errors.UnreadableFile(path, "is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise errors.UnreadableFile(path, "is not a regular file (a FIFO, socket or device)")
        size = st.st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise errors.NotSafetensors(path, f"file is {size} bytes, shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                # A huge length not followed by '{' means the file is something else entirely.
                if f.read(1) != b"{":
                    raise errors.NotSafetensors(path, "the first 8 bytes are not a header length followed by JSON")
                raise errors.HeaderTooLarge(path, f"header claims {header_len} bytes, the limit is {MAX_HEADER_BYTES}")
            raw = f.read(header_len)
    except errors.BundleError:
        raise
    except IsADirectoryError:
        raise errors.UnreadableFile(path, "is a directory") from None
    except FileNotFoundError:
        raise errors.UnreadableFile(path, "no such file") from None
    except PermissionError:
        raise errors.UnreadableFile(path, "permission denied") from None
    except OSError as e:
        raise errors.UnreadableFile(path, e.strerror or str(e)) from None

    if not raw.startswith(b"{"):
        raise errors.NotSafetensors(path, "the header is not a JSON object")
    if len(raw) < header_len:
        raise errors.TruncatedFile(path, f"header needs {header_len} bytes, file has {len(raw)} after the length")
    entries = raw.count(b'"data_offsets"')  # an upper bound on the tensors (names could hold it too)
    if entries > MAX_TENSORS:
        raise errors.HeaderTooLarge(path, f"header lists {entries:,} tensors, the limit is {MAX_TENSORS:,}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=errors.no_duplicates)
    except errors.DuplicateKey as e:
        raise errors.NotSafetensors(path, f"the header is ambiguous: {e}") from None
    except (ValueError, RecursionError) as e:
        # RecursionError: JSON nested deeper than Python's parser can follow; ValueError also
        # covers an integer of more than 4,300 digits and bad UTF-8.
        raise errors.NotSafetensors(path, f"the header is not valid JSON ({e.__class__.__name__})") from None
    if not isinstance(header, dict):
        raise errors.NotSafetensors(path, "the header is not a JSON object")

    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise errors.NotSafetensors(path, "__metadata__ must map strings to strings")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        # As strict as the safetensors specification: shape and offsets are lists of JSON integers
        # (not strings, floats or booleans), and offsets are exactly two.
        if (not isinstance(entry, dict) or not isinstance(entry.get("shape"), list)
                or not all(type(d) is int for d in entry["shape"])
                or not isinstance(entry.get("data_offsets"), list) or len(entry["data_offsets"]) != 2
                or not all(type(x) is int for x in entry["data_offsets"]) or "dtype" not in entry):
            raise errors.NotSafetensors(path, f"tensor {name!r} lacks a valid dtype, shape or data_offsets")
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        lo, hi = entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise errors.NotSafetensors(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        if any(d < 0 for d in shape) or lo < 0 or hi < lo:
            raise errors.NotSafetensors(path, f"tensor {name!r} has a negative shape or offsets")
        info = TensorInfo(name, dtype, shape, data_start + lo, data_start + hi)
        if info.numel * DTYPES[dtype].itemsize != hi - lo:
            raise errors.NotSafetensors(
                path, f"tensor {name!r}: {dtype} x {list(shape)} needs {info.numel * DTYPES[dtype].itemsize} bytes, offsets span {hi - lo}"
            )
        tensors[name] = info

    # Offsets must tile the data buffer exactly: contiguous, non-overlapping, no gaps.
    expected = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != expected:
            raise errors.NotSafetensors(path, f"tensor {info.name!r} does not start where the previous one ends (overlap or gap)")
        expected = info.end
    if size < expected:
        raise errors.TruncatedFile(path, f"data needs {expected} bytes, file has {size}")
    if size > expected:
        raise errors.NotSafetensors(path, f"{size - expected} bytes after the last tensor")
    return SafetensorsHeader(path, tensors, metadata, data_start)


class MappedFile:
    """A safetensors file whose tensors are numpy views of one read-only memory map."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        self._map: np.memmap | None = None

    def _buffer(self) -> np.memmap:
        if self._map is None:
            size = self.header.path.stat().st_size
            if size == 0:
                self._map = np.zeros(0, dtype=np.uint8)  # type: ignore[assignment]
            else:
                self._map = np.memmap(self.header.path, dtype=np.uint8, mode="r")
        return self._map

    def array(self, name: str) -> np.ndarray:
        """The raw tensor as a lazily-paged numpy view (bfloat16 comes back as uint16)."""
        info = self.header.tensors[name]
        buf = self._buffer()[info.start : info.end]
        return buf.view(DTYPES[info.dtype]).reshape(info.shape)

    def digest(self, name: str, algorithm: str) -> str:
        """The checksum of a tensor's stored bytes, read piece by piece (pages released after)."""
        info = self.header.tensors[name]
        return checksums.digest_of(self._buffer(), info.start, info.end, algorithm, self.release)

    def release(self, start: int, end: int) -> None:
        """Drop our mapping of file bytes [start, end) that a stream has finished with.

        The pages stay in the OS page cache (a second pass is still fast), but they stop
        counting towards this process's resident memory, so streaming a bundle larger than
        RAM keeps the footprint at about one block.
        """
        mm = getattr(self._map, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap_module, "MADV_DONTNEED"):
            return
        page = mmap_module.PAGESIZE
        lo = -(-start // page) * page  # only whole pages inside the range
        hi = (end // page) * page
        if hi > lo:
            try:
                mm.madvise(mmap_module.MADV_DONTNEED, lo, hi - lo)
            except (OSError, ValueError):
                pass


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Widen a float tensor read by `MappedFile.array` to float32 (bfloat16 from its bits);
    float64 stays float64 (a float64 bundle is read at its own precision)."""
    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    if dtype == "F64":
        return np.asarray(raw, dtype=np.float64)
    return np.asarray(raw, dtype=np.float32)


# ----------------------------------------------------------------------------- writing


@dataclass
class PendingTensor:
    """A tensor to write: its bytes arrive from `produce`, chunk by chunk, in order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[bytes | np.ndarray]]

    @property
    def nbytes(self) -> int:
        n = DTYPES[self.dtype].itemsize
        for d in self.shape:
            n *= d
        return n


def build_header(tensors: list[PendingTensor], metadata: dict[str, str], length: int | None = None) -> bytes:
    """The 8-byte length and the JSON header; `length`: pad the JSON to exactly that many bytes
    (a header rewritten in place must keep its size)."""
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for t in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    if length is None:
        raw += b" " * ((-len(raw)) % 8)  # pad so tensor data starts 8-byte aligned for mmap views
    elif len(raw) <= length:
        raw += b" " * (length - len(raw))  # trailing spaces are JSON whitespace, as the padding above
    else:
        raise RuntimeError(f"internal error: the rewritten header is {len(raw)} bytes, {length} were reserved")
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: str | os.PathLike, tensors: list[PendingTensor], metadata: dict[str, str], *,
               checksum: str | None = None,
               finish: Callable[[dict[str, str]], dict[str, str]] | None = None) -> dict[str, str]:
    """Stream tensors into `path` (not atomic by itself: callers write to a temp name).

    `checksum`: hash each tensor's bytes as they stream (bundle/checksums.py) and return
    {tensor name: hex digest}. `finish(digests)`: the metadata depends on the digests (the
    manifest holds them), so the header is first written with same-length placeholders and
    rewritten in place once the data has streamed: one pass over the data, never two.
    """
    digests: dict[str, str] = {}
    if finish is not None:
        assert checksum is not None, "finish() needs the digests of a checksum"
        metadata = finish({t.name: checksums.placeholder(checksum) for t in tensors})
    with open(path, "wb") as f:
        header = build_header(tensors, metadata)
        f.write(header)
        for t in tensors:
            h = checksums.hasher(checksum) if checksum else None
            written = 0
            for piece in t.produce():
                data = piece.tobytes() if isinstance(piece, np.ndarray) else bytes(piece)
                f.write(data)
                if h is not None:
                    h.update(data)
                written += len(data)
            if written != t.nbytes:
                raise RuntimeError(f"internal error: tensor {t.name} produced {written} bytes, expected {t.nbytes}")
            if h is not None:
                digests[t.name] = h.hexdigest()
        if finish is not None:
            f.seek(0)
            f.write(build_header(tensors, finish(digests), length=len(header) - 8))
        f.flush()
        os.fsync(f.fileno())
    return digests


def iter_rows(array: np.ndarray, rows: int) -> Iterator[np.ndarray]:
    """Yield contiguous row blocks of `array`, so huge tensors are copied in bounded pieces."""
    for lo in range(0, max(1, array.shape[0] if array.ndim else 1), rows):
        yield np.ascontiguousarray(array[lo : lo + rows] if array.ndim else array)
