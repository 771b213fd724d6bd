"""Per-tensor checksums: the writer hashes each tensor's bytes as it streams them out, the
manifest keeps the digests, `dualtui verify` recomputes them (docs/format.md section 3).

They detect corruption (a flipped bit, a tool that rewrote a tensor, a truncated copy patched
up), not tampering: whoever can change a tensor can change the manifest too. So the default is
a fast non-cryptographic hash, XXH3-128 (python-xxhash, ~8 GB/s on one core here, several
times faster than the disk; blake2b is ~0.5 GB/s); other writers may use sha256 from any
standard library.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np

DEFAULT = "xxh3-128"
DIGEST_HEX = {"xxh3-128": 32, "sha256": 64, "blake2b-128": 32}  # what readers accept: length of the hex digest
PIECE = 64 << 20  # bytes hashed per update when reading back (bounded memory, pages released after)


def hasher(algorithm: str):
    """A new incremental hasher (`update(bytes)`, `hexdigest()`)."""
    if algorithm == "xxh3-128":
        import xxhash

        return xxhash.xxh3_128()
    if algorithm == "sha256":
        return hashlib.sha256()
    if algorithm == "blake2b-128":
        return hashlib.blake2b(digest_size=16)
    raise ValueError(f"unknown checksum algorithm {algorithm!r}")


def placeholder(algorithm: str) -> str:
    """A digest-shaped string: the header is written with these first, then rewritten in
    place with the real digests (same length) once the data has streamed."""
    return "0" * DIGEST_HEX[algorithm]


def digest_of(buffer: np.ndarray, start: int, end: int, algorithm: str,
              release: Callable[[int, int], None] | None = None) -> str:
    """The digest of bytes [start, end) of a file mapped as uint8 `buffer`, hashed piece by
    piece; `release(lo, hi)` is told when a piece is done with (the map drops its pages)."""
    h = hasher(algorithm)
    for lo in range(start, end, PIECE):
        hi = min(lo + PIECE, end)
        h.update(memoryview(buffer[lo:hi]))
        if release is not None:
            release(lo, hi)
    return h.hexdigest()


def parse(raw: object) -> tuple[str, dict[str, str]] | str:
    """The manifest's `checksums` entry as (algorithm, {tensor: hex}), or a sentence saying
    what is wrong with it."""
    if not isinstance(raw, dict):
        return "'checksums' must be an object"
    algorithm = raw.get("algorithm")
    if algorithm not in DIGEST_HEX:
        return f"'checksums.algorithm' must be one of {', '.join(DIGEST_HEX)}"
    tensors = raw.get("tensors")
    if not isinstance(tensors, dict):
        return "'checksums.tensors' must map tensor names to hex digests"
    n = DIGEST_HEX[algorithm]
    for name, value in tensors.items():
        if not (isinstance(value, str) and len(value) == n and all(c in "0123456789abcdef" for c in value)):
            return f"'checksums.tensors' entry {name[:60]!r} is not a {n}-digit lowercase hex digest"
    return algorithm, dict(tensors)
