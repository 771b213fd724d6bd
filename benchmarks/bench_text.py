"""How big the dual memory of a language-model run gets, and what recording it costs.

    python benchmarks/bench_text.py [--steps 100] [--reps 3] [--json benchmarks/out/text.json]

1. Bytes per training token, per layer and in all, read from `dualtui info` of bundles
   recorded by `dualtui record text` (float32 and bfloat16 storage, two widths), next to the
   formula the recorder prints before training (estimate_bytes).
2. Recording overhead: the same text run (same seed, same batches) with and without the
   recorder, alternated rep by rep; the ratio of medians is the result. Writing the bundle is
   timed separately (it is a one-off cost at the end of training).
3. Ranking cost on a text bundle: one `dualtui rank` pass over every layer (all scores,
   masses, per-example and per-token sums), per pattern.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from dualtui.bundle import Bundle
from dualtui.cli import info_json
from dualtui.engine.spotlight import spotlights
from dualtui.record.text import TextConfig, estimate_bytes, load_sources, record_text


def sizes(out: Path, cfg: TextConfig, sources) -> dict:
    record_text(out, cfg=cfg, sources=sources)
    b = Bundle.open(out)
    info = info_json(b)
    tokens = info["layers"][0]["patterns"]
    per_layer = {lay["name"]: {"bytes_per_token": lay["bytes_per_pattern"], "in": lay["in_features"], "out": lay["out_features"],
                               "kind": lay["kind"]} for lay in info["layers"]}
    pattern_bytes = sum(lay["bytes_per_pattern"] * lay["patterns"] for lay in info["layers"])
    vocab = len(b.manifest.input["vocab"])
    return {"width": cfg.width, "blocks": cfg.blocks, "dtype": cfg.storage_dtype, "tokens": tokens, "vocab": vocab,
            "file_bytes": b.size_bytes, "bytes_per_token_all_layers": pattern_bytes / tokens,
            "file_bytes_per_token": b.size_bytes / tokens, "estimate_per_token": estimate_bytes(cfg, vocab).per_token,
            "layers": per_layer}


def overhead(cfg: TextConfig, sources, reps: int, tmp: Path) -> dict:
    train_s = {True: [], False: []}
    write_s = []
    for r in range(reps):
        for record in (False, True):
            marks: dict[str, float] = {}

            def on_step(done: int, total: int, loss: float) -> None:
                if done == total:
                    marks["trained"] = time.perf_counter()

            t0 = time.perf_counter()
            record_text(tmp / f"o{r}.safetensors", cfg=cfg, sources=sources, record=record, on_step=on_step)
            t1 = time.perf_counter()
            train_s[record].append(marks["trained"] - t0)
            if record:
                write_s.append(t1 - marks["trained"])
                (tmp / f"o{r}.safetensors").unlink()
    med = {k: statistics.median(v) for k, v in train_s.items()}
    return {"steps": cfg.steps, "train_s_without": med[False], "train_s_with": med[True], "ratio": med[True] / med[False],
            "test_and_write_s": statistics.median(write_s), "reps": reps}


def ranking(out: Path) -> dict:
    b = Bundle.open(out)
    rows = []
    for L in b.manifest.layer_names:
        t0 = time.perf_counter()
        spotlights(b, L, [0], top=100, groups=("pattern", "example", "position"), dense_examples=True)
        dt = time.perf_counter() - t0
        rows.append({"layer": L, "patterns": b.layer_spec(L).patterns, "seconds": dt, "ns_per_pattern": dt / b.layer_spec(L).patterns * 1e9})
    return {"layers": rows, "total_s": sum(r["seconds"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, default=Path("benchmarks/out/text.json"))
    args = ap.parse_args()
    sources = load_sources(None)
    result: dict = {"sizes": [], "python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for width, dtype in ((32, "float32"), (32, "bfloat16"), (64, "float32")):
            cfg = TextConfig(steps=args.steps, batch_size=8, width=width, heads=2, storage_dtype=dtype)
            s = sizes(tmp / f"s{width}{dtype}.safetensors", cfg, sources)
            result["sizes"].append(s)
            print(f"width {width:3d} {dtype:9s}: {s['bytes_per_token_all_layers']:8,.0f} B/token over {len(s['layers'])} layers "
                  f"(estimate {s['estimate_per_token']:,.0f}; whole file {s['file_bytes_per_token']:,.0f}), "
                  f"{s['tokens']:,} tokens → {s['file_bytes'] / 1e6:,.1f} MB")
            for name, lay in s["layers"].items():
                print(f"    {name:20s} {lay['kind']:9s} {lay['in']:4d}→{lay['out']:<4d} {lay['bytes_per_token']:6.0f} B/token")
        result["ranking"] = ranking(tmp / "s32float32.safetensors")
        print(f"rank every layer (all scores, masses, example and token sums) for one test item: {result['ranking']['total_s']:.2f} s "
              f"({statistics.median(r['ns_per_pattern'] for r in result['ranking']['layers']):.0f} ns/pattern median)")
        result["overhead"] = overhead(TextConfig(steps=args.steps, batch_size=8), sources, args.reps, tmp)
        o = result["overhead"]
        print(f"recording overhead ({o['steps']} steps, median of {o['reps']}): {o['train_s_with']:.2f} s vs {o['train_s_without']:.2f} s "
              f"= {o['ratio']:.2f}×; test pass + writing the bundle {o['test_and_write_s']:.2f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
