"""What the recovery journal costs: recording overhead and bytes written, side by side in one run.

    python benchmarks/bench_journal.py [--reps 5] [--json benchmarks/out/journal.json]

The same digits training run (same seed, same batches) without the Recorder, and with it at
several journal intervals: only the journals at start and end (journal_every=10^9, i.e. no
periodic journal), the default (every 1024 steps or 60 s), every 64 and every 16 steps,
alternated rep by rep in a rotating order so machine noise and warm-up hit all of them; ratios of medians to the run without
a recorder are the result. Bytes written into the spool are counted by wrapping the writer's
two write paths (arrays and journal.json), so "bytes per step" is what reaches the disk per
optimizer step, patterns included. Two sizes: the sample-run MLP (64→32→32→10, batch 32) and
a wide one (64→512→512→10, batch 256), where the weights saved with every journal are larger.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dualtui.bundle import writer as writer_mod
from dualtui.record import digits as digits_mod

INTERVALS = {"no periodic journal": 10**9, "default (1024 steps / 60 s)": 1024, "every 64 steps": 64,
             "every 16 steps": 16}


class ByteCounter:
    """Counts what BundleWriter writes into the spool (np.save'd arrays and journal.json)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.journals = 0

    def __enter__(self) -> "ByteCounter":
        W = writer_mod.BundleWriter
        self._save, self._journal = W._save, W.write_journal
        counter = self

        def save(w, name: str, array: np.ndarray) -> None:
            counter.bytes += np.asarray(array).nbytes + 128  # + the .npy header
            return counter._save(w, name, array)

        def journal(w, state: dict, arrays: dict) -> None:
            counter._journal(w, state, arrays)
            counter.journals += 1
            counter.bytes += os.path.getsize(w.spool / "journal.json")

        W._save, W.write_journal = save, journal
        return self

    def __exit__(self, *exc: object) -> None:
        writer_mod.BundleWriter._save, writer_mod.BundleWriter.write_journal = self._save, self._journal


def timed(out: Path, journal_every: int | None, **kw) -> tuple[float, int, int, int]:
    """(training seconds, bytes written to the spool, journals, steps)."""
    marks: dict[str, float] = {}

    def on_step(done: int, total: int) -> None:
        if done == 0:
            marks["start"] = time.perf_counter()
        if done == total:
            marks["trained"] = time.perf_counter()

    with ByteCounter() as c:
        r = digits_mod.record_digits(out, "single", record=journal_every is not None, on_step=on_step,
                                     journal_every=journal_every or 1024, **kw)
    return marks["trained"] - marks["start"], c.bytes, c.journals, r.steps


def measure(reps: int, tmp: Path, **kw) -> dict:
    times: dict[str, list[float]] = {"without recorder": [], **{k: [] for k in INTERVALS}}
    written: dict[str, tuple[int, int]] = {}
    steps = 0
    modes: list[tuple[str, int | None]] = [("without recorder", None), *INTERVALS.items()]
    for r in range(reps):
        for name, every in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotated: no mode always runs first
            t, b, j, n = timed(tmp / f"{every}-{r}.safetensors", every, **kw)
            times[name].append(t)
            if every is not None:
                written[name], steps = (b, j), n
    base = statistics.median(times["without recorder"])
    rows = []
    for name, ts in times.items():
        b, j = written.get(name, (0, 0))
        rows.append({"mode": name, "train_seconds": statistics.median(ts), "ratio": statistics.median(ts) / base,
                     "journals": j, "spool_bytes": b, "bytes_per_step": b / steps if name in written else 0})
    return {"config": kw, "steps": steps, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    load = os.getloadavg()
    results = {"torch_threads": torch.get_num_threads(), "loadavg_before": load}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["small"] = measure(args.reps, tmp, epochs=6, hidden=32, batch_size=32)
        results["wide"] = measure(max(1, args.reps // 2), tmp, epochs=20, hidden=512, batch_size=256)
    results["loadavg_after"] = os.getloadavg()
    print(f"load average before {load[0]:.2f}, after {results['loadavg_after'][0]:.2f} "
          f"({os.cpu_count()} cores, {results['torch_threads']} torch threads)")
    for key in ("small", "wide"):
        r = results[key]
        c = r["config"]
        print(f"## MLP 64→{c['hidden']}→{c['hidden']}→10, batch {c['batch_size']}, {r['steps']} steps")
        print("| recording | train s | ratio to no recorder | journals | bytes to spool | bytes per step |")
        print("|---|---|---|---|---|---|")
        for row in r["rows"]:
            print(f"| {row['mode']} | {row['train_seconds']:.3f} | {row['ratio']:.2f}x | {row['journals']} | "
                  f"{row['spool_bytes']:,} | {row['bytes_per_step']:,.0f} |")
        print()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
