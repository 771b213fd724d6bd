"""Stream a layer's patterns from a bundle to a compute device, block by block.

On CPU the blocks are zero-copy views of the memory-mapped file (page cache straight into
the matmul). On CUDA the next block is copied from pinned host memory on a side stream
while the current one is being computed on, so transfers overlap with compute.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from ..bundle.reader import Bundle

# How many bytes of the widest per-pattern tensor one block holds: big enough that Python
# overhead vanishes, small enough that the [rows, queries] score matrices stay modest.
BLOCK_BYTES = 32 << 20


class DeviceError(ValueError):
    """The requested device cannot be used (e.g. --device cuda on a machine without a GPU)."""


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA device is available (use auto or cpu)")
        return torch.device("cuda")
    raise DeviceError(f"unknown device {name!r}; choose from auto, cpu, cuda")


def _torch_view(raw: np.ndarray, st_dtype: str) -> torch.Tensor:
    """A torch tensor sharing memory with a (read-only, memory-mapped) numpy array."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memmap: we never write to it
        if st_dtype == "BF16":
            return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(raw)


@dataclass
class Block:
    start: int  # global index of the first pattern
    tensors: dict[str, torch.Tensor]  # on the compute device; floats in float32

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]


def compute_dtype(bundle: Bundle, layer: str) -> torch.dtype:
    """The dtype a layer's scores are computed in: float64 for float64 storage, else float32."""
    spec = bundle.layer_spec(layer)
    if spec.patterns and bundle.storage_dtype(layer) == "F64":
        return torch.float64
    return torch.float64 if bundle.info(f"layer/{layer}/weight").dtype == "F64" else torch.float32


def block_rows(bundle: Bundle, layer: str, queries: int = 1) -> int:
    spec = bundle.layer_spec(layer)
    width = max(spec.in_features if spec.kind == "linear" else 1, spec.out_features, queries, 1)
    return max(1024, BLOCK_BYTES // (4 * width))


def _host_blocks(bundle: Bundle, layer: str, fields: Sequence[str], rows: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    names = {f: bundle.pattern_names(layer, f) for f in fields}
    for c, (start, stop) in enumerate(bundle.chunk_bounds(layer)):
        infos = {f: bundle.info(names[f][c]) for f in fields}
        raws = {f: bundle.raw(names[f][c]) for f in fields}
        for lo in range(0, stop - start, rows):
            hi = min(stop - start, lo + rows)
            block = {f: _torch_view(raws[f][lo:hi], infos[f].dtype) for f in fields}
            if CHECK_BLOCKS:
                check_block(bundle, layer, start + lo, block)
            yield start + lo, block
            # The consumer is done with this block: keep resident memory at about one block.
            for f in fields:
                bundle.release(names[f][c], lo, hi)


# Every block is checked as it streams: a command never computes on, or prints, what the bundle
# cannot back. Ids are checked here, in the producer (a min and a max per field: ~1% of a
# block's matmul). Floats are checked by the consumer on what it computed from them
# (`check_products`): a NaN or infinity in a key or value always makes the scores computed from
# it non-finite (NaN·x = NaN, ±inf·0 = NaN), so testing the small score matrix proves the
# block finite at a fraction of the cost of testing the block (torch.isfinite over a 32 MB
# block costs ~14x its matvec: benchmarks/bench_engine.py, "validation").
CHECK_BLOCKS = True


def check_block(bundle: Bundle, layer: str, start: int, block: dict[str, torch.Tensor]) -> None:
    """The per-pattern ids of a block in range (examples, steps, positions, embedding tokens)."""
    from ..bundle import errors

    if "example" in block or "step" in block or "position" in block:
        none = torch.zeros(0, dtype=torch.int64)
        bundle.check_ids(layer, _where(layer, start, block), block.get("example", none), block.get("step", none),
                         block.get("position"))
    spec = bundle.layer_spec(layer)
    t = block.get("keys")
    if t is not None and spec.kind == "embedding" and len(t) and (int(t.min()) < 0 or int(t.max()) >= spec.in_features):
        raise errors.IdOutOfRange(bundle.path, f"{_where(layer, start, block)}: key token id outside 0..{spec.in_features - 1}")


def _where(layer: str, start: int, block: dict[str, torch.Tensor]) -> str:
    return f"layer {layer!r} patterns {start}..{start + len(next(iter(block.values()))) - 1}"


class ProductGuard:
    """Proves a pass's keys and values finite from the scores computed from them: one float32
    sum per product per block, accumulated on the device (no synchronisation per block); at
    the end of the pass (`done`) a non-finite sum is explained by an exact scan of the layer's
    floats, or refused as an overflow of the scores."""

    def __init__(self, bundle: Bundle, layer: str, device: torch.device):
        self.bundle, self.layer = bundle, layer
        self.bad = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, products) -> None:
        if CHECK_BLOCKS:
            for p in products:
                if p.numel():
                    self.bad += (~torch.isfinite(p.sum())).to(torch.int64)

    def done(self) -> None:
        if not CHECK_BLOCKS or not int(self.bad):
            return
        from ..bundle import errors

        spec = self.bundle.layer_spec(self.layer)
        fields = [f for f in ("keys", "values") if not (f == "keys" and spec.kind == "embedding")]
        for start, block in _host_blocks(self.bundle, self.layer, fields, block_rows(self.bundle, self.layer)):
            for f in fields:
                if not bool(torch.isfinite(block[f]).all()):
                    raise errors.NonFinite(self.bundle.path, f"{_where(self.layer, start, block)}: {f} hold NaN/Inf")
        raise errors.NonFinite(self.bundle.path, f"layer {self.layer!r}: scores overflow float32 (keys, values or "
                                                 "queries too large to score exactly)")


def stream_blocks(bundle: Bundle, layer: str, fields: Sequence[str], device: torch.device,
                  rows: int | None = None) -> Iterator[Block]:
    """Yield blocks of the requested per-pattern fields on `device` (floats as float32; float64
    storage stays float64)."""
    rows = rows or block_rows(bundle, layer)
    host = _host_blocks(bundle, layer, fields, rows)
    if device.type != "cuda":
        # float16/bfloat16 blocks are widened into one reused float32 buffer per field: a fresh
        # 32 MB allocation per block costs more in page faults than the matmul itself
        # (benchmarks/bench_engine.py, "compute dtype"). Block tensors are therefore only
        # valid until the next block is requested.
        buffers: dict[str, torch.Tensor] = {}
        for start, ts in host:
            out = {}
            for f, t in ts.items():
                if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
                    buf = buffers.get(f)
                    if buf is None or buf.shape[0] < t.shape[0]:
                        buf = buffers[f] = torch.empty((max(rows, t.shape[0]),) + tuple(t.shape[1:]), dtype=torch.float32)
                    t = buf[: t.shape[0]].copy_(t)
                out[f] = t
            yield Block(start, out)
        return
    yield from _cuda_blocks(host, device)


class CudaTransfer:
    """Host-to-GPU copies on a side stream, so the next block moves while this one computes."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def copy_async(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        with torch.cuda.stream(self.stream):
            on_device = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return on_device, event

    def compute_waits(self, event: Any, tensors: list[torch.Tensor]) -> None:
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:
            t.record_stream(current)  # the caching allocator must not recycle them early

    def host_waits(self, event: Any) -> None:
        event.synchronize()


def overlapped_blocks(host: Iterator[tuple[int, dict[str, torch.Tensor]]], transfer: Any) -> Iterator[Block]:
    """Double-buffered transfer: block i+1 is staged in pinned memory and its copy launched
    before block i is handed to the caller. Two pinned buffers per field are reused, and a
    buffer is refilled only after the copy that last read it has finished."""
    pinned: dict[tuple[str, int], torch.Tensor] = {}
    last_event: dict[int, Any] = {}

    def launch(item: tuple[int, dict[str, torch.Tensor]], slot: int) -> tuple[int, dict[str, torch.Tensor], Any]:
        start, ts = item
        if slot in last_event:
            transfer.host_waits(last_event[slot])
        out, event = {}, None
        for f, t in ts.items():
            buf = pinned.get((f, slot))
            if buf is None or buf.shape[0] < t.shape[0] or buf.dtype != t.dtype:
                buf = pinned[(f, slot)] = transfer.pinned(tuple(t.shape), t.dtype)
            staged = buf[: t.shape[0]]
            staged.copy_(t)
            out[f], event = transfer.copy_async(staged)
        last_event[slot] = event
        return start, out, event

    slot = 0
    nxt = next(host, None)
    pending = launch(nxt, slot) if nxt is not None else None
    while pending is not None:
        start, ts, event = pending
        nxt = next(host, None)
        slot ^= 1
        pending = launch(nxt, slot) if nxt is not None else None  # overlaps with the caller's compute
        transfer.compute_waits(event, list(ts.values()))
        yield Block(start, {f: (t.float() if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64) else t)
                            for f, t in ts.items()})


def _cuda_blocks(host: Iterator[tuple[int, dict[str, torch.Tensor]]], device: torch.device) -> Iterator[Block]:
    yield from overlapped_blocks(host, CudaTransfer(device))


def gather_rows(bundle: Bundle, layer: str, field: str, indices: np.ndarray) -> np.ndarray:
    """Random access to a few patterns' rows (for the top-k results), as float32/int64."""
    indices = np.asarray(indices, dtype=np.int64)
    out = None
    bounds = bundle.chunk_bounds(layer)
    names = bundle.pattern_names(layer, field)
    for c, (start, stop) in enumerate(bounds):
        sel = np.nonzero((indices >= start) & (indices < stop))[0]
        if not len(sel):
            continue
        rows = bundle.raw(names[c])[indices[sel] - start]
        info = bundle.info(names[c])
        rows = _torch_view(np.ascontiguousarray(rows), info.dtype)
        if rows.is_floating_point() and rows.dtype != torch.float64:
            rows = rows.float()
        rows = rows.numpy()
        if out is None:
            out = np.zeros((len(indices),) + rows.shape[1:], dtype=rows.dtype)
        out[sel] = rows
    if out is None:
        spec = bundle.layer_spec(layer)
        width = () if field not in ("keys", "values") or (field == "keys" and spec.kind == "embedding") else (
            spec.in_features if field == "keys" else spec.out_features,)
        out = np.zeros((len(indices),) + width, dtype=np.float32 if width else np.int64)
    if CHECK_BLOCKS and len(indices) and field in ("example", "step", "position", "keys"):
        # A pass that never streamed this field (attention reads keys only) must not print an
        # id it read by random access unchecked: example −1 would name the last example.
        where = f"layer {layer!r} patterns {int(indices.min())}..{int(indices.max())}"
        none = np.zeros(0, dtype=np.int64)
        if field == "example":
            bundle.check_ids(layer, where, out, none)
        elif field == "step":
            bundle.check_ids(layer, where, none, out)
        elif field == "position":
            bundle.check_ids(layer, where, none, none, out)
        elif bundle.layer_spec(layer).kind == "embedding":
            check_block(bundle, layer, int(indices.min()), {"keys": torch.from_numpy(out)})
    return out
