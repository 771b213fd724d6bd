"""Recording overhead and bytes on disk, measured side by side in one run.

    python benchmarks/bench_record.py [--reps 5] [--json benchmarks/out/record.json]

1. Overhead: the same digits training run (same seed, same batches) with and without the
   Recorder, alternated rep by rep so machine noise hits both; the ratio of medians is the
   result. Two sizes: the sample-run MLP (64→32→32→10, batch 32: tiny matmuls, so fixed
   per-step costs dominate) and a wider one (64→512→512→10, batch 256) where compute is
   larger. The recorder's own time is split into its parts by wrapping its methods.
2. Bytes on disk per pattern per layer, float32 vs bfloat16 storage, from `dualtui info`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from dualtui.bundle import Bundle
from dualtui.cli import info_json
from dualtui.record import digits as digits_mod
from dualtui.record import recorder as recorder_mod


def timed_run(record: bool, out: Path, **kw) -> tuple[float, float]:
    """(seconds in the training loop, seconds for record_test + writing the bundle)."""
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_step(done: int, total: int) -> None:
        if done == total:
            marks["trained"] = time.perf_counter()

    digits_mod.record_digits(out, "single", record=record, on_step=on_step, **kw)
    t1 = time.perf_counter()
    return marks["trained"] - t0, t1 - marks["trained"]


class PartTimer:
    """Wraps Recorder methods to attribute its time to forward hooks, the step check, the copy."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._orig = {}

    def _wrap(self, cls: type, name: str, label: str) -> None:
        orig = getattr(cls, name)
        self._orig[(cls, name)] = orig
        seconds = self.seconds

        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                seconds[label] += time.perf_counter() - t

        setattr(cls, name, wrapped)

    def __enter__(self) -> "PartTimer":
        R = recorder_mod.Recorder
        self._wrap(R, "_before_step", "step pre-hook: read hyperparameters, project .grad (per step)")
        self._wrap(R, "_commit_pending", "every 32 steps: check gradient scales, copy patterns to CPU, spool")
        self._wrap(R, "_examples_for", "forward hook: example ids")
        self._wrap(recorder_mod._Call, "add_grad", "backward: capture dL/dy")
        self._wrap(R, "close", "finalize: coefficients + write bundle")
        return self

    def __exit__(self, *exc: object) -> None:
        for (cls, name), orig in self._orig.items():
            setattr(cls, name, orig)


def overhead(reps: int, tmp: Path, **kw) -> dict:
    base, rec, fin = [], [], []
    for r in range(reps):
        t_base, _ = timed_run(False, tmp / f"base{r}.safetensors", **kw)
        t_rec, t_fin = timed_run(True, tmp / f"rec{r}.safetensors", **kw)
        base.append(t_base)
        rec.append(t_rec)
        fin.append(t_fin)
    with PartTimer() as parts:
        timed_run(True, tmp / "parts.safetensors", **kw)
    b = Bundle.open(tmp / "parts.safetensors")
    patterns = b.manifest.layers[0].patterns
    return {
        "config": kw,
        "steps": b.manifest.training["steps"],
        "patterns_per_layer": patterns,
        "train_seconds_without": statistics.median(base),
        "train_seconds_with": statistics.median(rec),
        "ratio": statistics.median(rec) / statistics.median(base),
        "finalize_seconds": statistics.median(fin),
        "recorder_parts_seconds": dict(parts.seconds),
    }


def bytes_per_pattern(tmp: Path) -> list[dict]:
    rows = []
    for dtype in ("float32", "bfloat16"):
        out = tmp / f"bytes-{dtype}.safetensors"
        digits_mod.record_digits(out, "single", epochs=1, storage_dtype=dtype)
        for layer in info_json(Bundle.open(out))["layers"]:
            rows.append({"dtype": dtype, "layer": layer["name"], "in": layer["in_features"], "out": layer["out_features"],
                         "bytes_per_pattern": layer["bytes_per_pattern"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results: dict = {"torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["overhead_small"] = overhead(args.reps, tmp, epochs=6, hidden=32, batch_size=32)
        results["overhead_wide"] = overhead(max(1, args.reps // 2), tmp, epochs=3, hidden=512, batch_size=256)
        results["bytes"] = bytes_per_pattern(tmp)

    for key in ("overhead_small", "overhead_wide"):
        o = results[key]
        c = o["config"]
        print(f"## recording overhead: MLP 64→{c['hidden']}→{c['hidden']}→10, batch {c['batch_size']}, "
              f"{o['steps']} steps, {o['patterns_per_layer']:,} patterns/layer")
        print(f"train without recorder {o['train_seconds_without']:.3f} s | with {o['train_seconds_with']:.3f} s | "
              f"ratio {o['ratio']:.2f}x | then record_test + write bundle {o['finalize_seconds']:.3f} s")
        for part, s in sorted(o["recorder_parts_seconds"].items(), key=lambda kv: -kv[1]):
            print(f"  {s:8.3f} s  {part}")
        print()
    print("## bytes on disk per pattern per layer")
    print("| layer | in → out | float32 | bfloat16 |")
    print("|---|---|---|---|")
    by = {(r["dtype"], r["layer"]): r for r in results["bytes"]}
    for r in results["bytes"]:
        if r["dtype"] == "float32":
            bf = by[("bfloat16", r["layer"])]["bytes_per_pattern"]
            print(f"| {r['layer']} | {r['in']} → {r['out']} | {r['bytes_per_pattern']:.0f} | {bf:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
