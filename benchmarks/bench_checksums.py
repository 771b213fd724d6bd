"""What the per-tensor checksums cost (issue 12), side by side in one run:

- writing: `write_file` of a bundle-shaped file (one big tensor per layer field, 64 MiB pieces)
  with no checksum, with XXH3-128 (the default) and with hashlib's sha256 / blake2b, each
  written and fsync'd to disk; the anchor is the plain write.
- verifying: recomputing every digest of the written file (`Bundle.digest` through the memory
  map, pages released as it goes) against the anchor of reading the same bytes without
  hashing them (readinto a buffer).

    python benchmarks/bench_checksums.py [--gib 5] [--dir /tmp] [--repeats 2]

The data is random bytes generated once and streamed repeatedly, so generating it costs nothing
in the timings. The file is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dualtui.bundle import checksums  # noqa: E402
from dualtui.bundle.safetensors_io import PendingTensor, read_header, write_file, MappedFile  # noqa: E402

PIECE = 64 << 20


def tensors(total: int, block: np.ndarray) -> list[PendingTensor]:
    """Four tensors (keys, values, step, example in the proportions of a 128→16 layer) of `total` bytes."""
    parts = [("layer/fc/keys", 128 * 4), ("layer/fc/values", 16 * 4), ("layer/fc/step", 8), ("layer/fc/example", 8)]
    row = sum(w for _, w in parts)
    rows = total // row
    out = []
    for name, width in parts:
        n = rows * width

        def produce(n=n):
            for lo in range(0, n, PIECE):
                yield block[: min(PIECE, n - lo)]

        out.append(PendingTensor(name, "U8", (n,), produce))
    return out


def timed_write(path: Path, ts: list[PendingTensor], algorithm: str | None) -> float:
    t = time.perf_counter()
    write_file(path, ts, {"format": "pt"}, checksum=algorithm)
    return time.perf_counter() - t


def timed_read(path: Path) -> float:
    buf = bytearray(PIECE)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def timed_digests(path: Path, algorithm: str) -> float:
    mapped = MappedFile(read_header(path))
    t = time.perf_counter()
    for name in mapped.header.tensors:
        mapped.digest(name, algorithm)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=5.0)
    ap.add_argument("--dir", type=Path, default=Path("/tmp"))
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    total = int(args.gib * (1 << 30))
    block = np.random.default_rng(0).integers(0, 256, PIECE, dtype=np.uint8)
    ts = tensors(total, block)
    size = sum(t.nbytes for t in ts)
    path = args.dir / "bench_checksums.safetensors"
    print(f"file: {size / 2**30:.2f} GiB, {len(ts)} tensors, in {args.dir}; load {os.getloadavg()[0]:.2f}, "
          f"{os.cpu_count()} cores")

    # In-memory hash throughput: what each algorithm can do at best on this CPU.
    mem = {}
    for algorithm in ("xxh3-128", "sha256", "blake2b-128"):
        h = checksums.hasher(algorithm)
        t = time.perf_counter()
        for _ in range(8):
            h.update(memoryview(block))
        mem[algorithm] = 8 * PIECE / (time.perf_counter() - t) / 2**30
    print("hash in memory: " + ", ".join(f"{a} {v:.2f} GiB/s" for a, v in mem.items()))

    writes: dict[str, list[float]] = {"none": [], "xxh3-128": [], "sha256": [], "blake2b-128": []}
    reads: list[float] = []
    digests: list[float] = []
    try:
        for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits each alike
            for algorithm in writes:
                writes[algorithm].append(timed_write(path, ts, None if algorithm == "none" else algorithm))
            reads.append(timed_read(path))
            digests.append(timed_digests(path, "xxh3-128"))  # the last file written has blake2b's bytes: same data
        base = min(writes["none"])
        print(f"\nwrite + fsync, best of {args.repeats}:")
        for algorithm, times in writes.items():
            t = min(times)
            print(f"  {algorithm:12s} {t:7.2f} s  {size / t / 2**30:5.2f} GiB/s  {t / base:5.2f}x the plain write")
        r, d = min(reads), min(digests)
        print(f"\nverify's checksum pass (page cache warm from the write), best of {args.repeats}:")
        print(f"  read only     {r:7.2f} s  {size / r / 2**30:5.2f} GiB/s")
        print(f"  xxh3-128      {d:7.2f} s  {size / d / 2**30:5.2f} GiB/s  {d / r:5.2f}x reading the bytes")
        print(f"\nload at the end {os.getloadavg()[0]:.2f}")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
