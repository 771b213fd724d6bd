"""Recording overhead and bytes on disk, measured side by side in one run.

    python benchmarks/bench_record.py [--reps 5] [--json benchmarks/out/record.json]

1. Overhead: the same digits training run (same seed, same batches) without the Recorder, with
   it (attribution check on, the default), and with the attribution check off, alternated rep
   by rep so machine noise hits all three; ratios of medians are the result. Two sizes: the
   sample-run MLP (64→32→32→10, batch 32: tiny matmuls, so fixed per-step costs dominate) and a
   wider one (64→512→512→10, batch 256) where compute is larger; and the character
   Transformer of `dualtui record text` (15 layers). The recorder's own time is split into its
   parts by wrapping its methods.
2. Bytes on disk per pattern per layer, float32 vs bfloat16 storage, from `dualtui info`.
3. Bytes per test item of a query set: every position (rows="all", the default) vs the last
   position only (rows="focus"), on the character Transformer.
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
from dualtui.record import attribution as attribution_mod
from dualtui.record import digits as digits_mod
from dualtui.record import recorder as recorder_mod
from dualtui.record import text as text_mod


def timed_run(mode: str, out: Path, model: str = "digits", **kw) -> tuple[float, float]:
    """(seconds in the training loop, seconds for record_test + writing the bundle).
    mode: "off" (no recorder), "on" (recorder, attribution check on), "nocheck"."""
    marks: dict[str, float] = {}
    t0 = time.perf_counter()

    def on_step(done: int, total: int, loss: float | None = None) -> None:
        if done == 0:
            marks["start"] = time.perf_counter()  # after data loading and set-up
        if done == total:
            marks["trained"] = time.perf_counter()

    if model == "digits":
        digits_mod.record_digits(out, "single", record=mode != "off", on_step=on_step, check_attribution=mode == "on", **kw)
    else:
        cfg = text_mod.TextConfig(check_attribution=mode == "on", **kw)
        text_mod.record_text(out, cfg=cfg, record=mode != "off", on_step=on_step, windows=TEXT_WINDOWS.get(cfg.context))
    t1 = time.perf_counter()
    return marks["trained"] - marks.get("start", t0), t1 - marks["trained"]


TEXT_WINDOWS: dict = {}


def text_windows(context: int, tests: int = 200):
    """The default corpus cut once (gathering the docstrings takes seconds: not training)."""
    if context not in TEXT_WINDOWS:
        from dualtui.record.text_corpus import make_windows

        TEXT_WINDOWS[context] = make_windows(text_mod.load_sources(None), context, tests=tests)
    return TEXT_WINDOWS[context]


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
        self._wrap(R, "_rowmap", "forward pre-hook: row-to-example layout (cached per shape)")
        self._wrap(recorder_mod._Call, "add_grad", "backward: capture dL/dy")
        A = attribution_mod.AttributionCheck
        self._wrap(A, "_backward_twice", "attribution check: two extra backward passes (checked steps)")
        self._wrap(A, "compare", "attribution check: compare per example (per step)")
        self._wrap(R, "close", "finalize: coefficients + write bundle")
        return self

    def __exit__(self, *exc: object) -> None:
        for (cls, name), orig in self._orig.items():
            setattr(cls, name, orig)


def overhead(reps: int, tmp: Path, model: str = "digits", **kw) -> dict:
    base, rec, nocheck, fin = [], [], [], []
    for r in range(reps):
        t_base, _ = timed_run("off", tmp / f"base{r}.safetensors", model, **kw)
        t_rec, t_fin = timed_run("on", tmp / f"rec{r}.safetensors", model, **kw)
        t_nc, _ = timed_run("nocheck", tmp / f"nocheck{r}.safetensors", model, **kw)
        base.append(t_base)
        rec.append(t_rec)
        nocheck.append(t_nc)
        fin.append(t_fin)
    with PartTimer() as parts:
        timed_run("on", tmp / "parts.safetensors", model, **kw)
    b = Bundle.open(tmp / "parts.safetensors")
    patterns = b.manifest.layers[0].patterns
    return {
        "model": model,
        "config": kw,
        "layers": len(b.manifest.layers),
        "steps": b.manifest.training["steps"],
        "checked_steps": b.manifest.attribution.get("steps", []),
        "patterns_per_layer": patterns,
        "train_seconds_without": statistics.median(base),
        "train_seconds_with": statistics.median(rec),
        "train_seconds_with_check_off": statistics.median(nocheck),
        "ratio": statistics.median(rec) / statistics.median(base),
        "ratio_check_off": statistics.median(nocheck) / statistics.median(base),
        "finalize_seconds": statistics.median(fin),
        "recorder_parts_seconds": dict(parts.seconds),
    }


def query_bytes(tmp: Path) -> list[dict]:
    """Bytes per test item of the test set, every position vs the last only (text run)."""
    rows = []
    for choice in ("all", "focus"):
        out = tmp / f"queries-{choice}.safetensors"
        cfg = text_mod.TextConfig(steps=20, query_rows=choice)
        text_mod.record_text(out, cfg=cfg, windows=text_windows(cfg.context))
        q = info_json(Bundle.open(out))["query_sets"][0]
        rows.append({"rows": choice, "items": q["items"], "bytes": q["bytes"], "bytes_per_item": q["bytes_per_item"],
                     "context": cfg.context, "layers": len(q["rows_per_item"])})
    return rows


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
        text_windows(32)
        results["overhead_text"] = overhead(max(1, args.reps // 2), tmp, "text", steps=100, batch_size=8)
        results["bytes"] = bytes_per_pattern(tmp)
        results["query_bytes"] = query_bytes(tmp)

    for key in ("overhead_small", "overhead_wide", "overhead_text"):
        o = results[key]
        c = o["config"]
        what = (f"MLP 64→{c['hidden']}→{c['hidden']}→10, batch {c['batch_size']}" if o["model"] == "digits"
                else f"character Transformer (record text defaults, {o['layers']} layers), batch {c['batch_size']}")
        print(f"## recording overhead: {what}, {o['steps']} steps, {o['patterns_per_layer']:,} patterns/layer, "
              f"attribution checked at {len(o['checked_steps'])} steps")
        print(f"train without recorder {o['train_seconds_without']:.3f} s | with {o['train_seconds_with']:.3f} s "
              f"(check off {o['train_seconds_with_check_off']:.3f} s) | ratio {o['ratio']:.2f}x "
              f"(check off {o['ratio_check_off']:.2f}x) | then record_test + write bundle {o['finalize_seconds']:.3f} s")
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
    print()
    print("## bytes per test item (query set 'test' of the character Transformer, all layers)")
    for r in results["query_bytes"]:
        print(f"rows={r['rows']}: {r['bytes_per_item']:,.0f} B per item ({r['items']} items, {r['bytes'] / 2**20:.2f} MiB, "
              f"context {r['context']}, {r['layers']} layers)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
