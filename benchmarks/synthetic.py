"""Write large synthetic format-v1 bundles fast, for engine benchmarks (random keys/values;
the dual form is *not* consistent, so do not `verify` them)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualtui.bundle.manifest import METADATA_KEY, LayerSpec, Manifest
from dualtui.bundle.safetensors_io import PendingTensor, write_file
from dualtui.bundle.writer import _cast


def write_synthetic(path: str | Path, patterns: int, in_features: int = 128, out_features: int = 16,
                    chunk_rows: int = 1 << 20, storage: str = "F32", tests: int = 8, seed: int = 0) -> Path:
    path = Path(path)
    rng = np.random.default_rng(seed)
    n_train = max(1, patterns // 10)
    chunks = max(1, -(-patterns // chunk_rows))
    sizes = [min(chunk_rows, patterns - c * chunk_rows) for c in range(chunks)]
    L = "fc"
    tensors: list[PendingTensor] = []

    def floats(rows: int, width: int, seed: int):
        def gen():
            r = np.random.default_rng(seed)
            for lo in range(0, rows, 1 << 18):
                n = min(1 << 18, rows - lo)
                yield _cast(r.standard_normal((n, width), dtype=np.float32), storage)
        return gen

    def ints(rows: int, kind: str, start: int, seed: int):
        def gen():
            r = np.random.default_rng(seed)
            for lo in range(0, rows, 1 << 20):
                n = min(1 << 20, rows - lo)
                if kind == "step":
                    yield ((start + lo + np.arange(n)) // 32).astype(np.int64)
                else:
                    yield r.integers(0, n_train, n, dtype=np.int64)
        return gen

    start = 0
    for c, n in enumerate(sizes):
        suffix = f"/{c}" if chunks > 1 else ""
        tensors += [
            PendingTensor(f"layer/{L}/keys{suffix}", storage, (n, in_features), floats(n, in_features, seed * 1000 + 2 * c)),
            PendingTensor(f"layer/{L}/values{suffix}", storage, (n, out_features), floats(n, out_features, seed * 1000 + 2 * c + 1)),
            PendingTensor(f"layer/{L}/step{suffix}", "I64", (n,), ints(n, "step", start, c)),
            PendingTensor(f"layer/{L}/example{suffix}", "I64", (n,), ints(n, "example", start, 7919 + c)),
        ]
        start += n
    static = {
        f"layer/{L}/weight": rng.standard_normal((out_features, in_features), dtype=np.float32),
        f"layer/{L}/w0": rng.standard_normal((out_features, in_features), dtype=np.float32),
        f"layer/{L}/bias": rng.standard_normal(out_features, dtype=np.float32),
        f"layer/{L}/b0": rng.standard_normal(out_features, dtype=np.float32),
        f"layer/{L}/queries": rng.standard_normal((tests, in_features), dtype=np.float32),
        f"layer/{L}/query_grad": rng.standard_normal((tests, out_features), dtype=np.float32),
        "train/label": rng.integers(0, 10, n_train, dtype=np.int64),
        "train/task": rng.integers(0, 2, n_train, dtype=np.int64),
        "test/label": rng.integers(0, 10, tests, dtype=np.int64),
        "test/task": rng.integers(0, 2, tests, dtype=np.int64),
        "test/prediction": rng.integers(0, 10, tests, dtype=np.int64),
    }
    dt = {"F32": "F32", "I64": "I64"}
    for name, a in static.items():
        tensors.append(PendingTensor(name, dt["F32" if a.dtype == np.float32 else "I64"], a.shape, lambda a=a: [a]))
    manifest = Manifest(
        layers=[LayerSpec(L, "linear", in_features, out_features, True, patterns, chunks)],
        tasks=["task 0", "task 1"], classes=[str(i) for i in range(10)], input={"kind": "vector"},
        optimizer={"name": "sgd"}, training={"steps": -(-patterns // 32), "synthetic": True},
        version=1,  # the version-1 layout (one query row per test item), which readers keep reading
    )
    tmp = path.with_name(path.name + ".tmp")

    def metadata(digests: dict[str, str]) -> dict[str, str]:  # checksummed like a recorded bundle
        manifest.checksums = {"algorithm": "xxh3-128", "tensors": digests}
        return {METADATA_KEY: manifest.to_json()}

    write_file(tmp, tensors, {}, checksum="xxh3-128", finish=metadata)
    tmp.replace(path)
    return path
