"""Spotlight engine, measured side by side in one run.

    python benchmarks/bench_engine.py [--sizes 1e5,1e6,1e7] [--width 128] [--device cpu|cuda]

1. Roofline: rank one query (`--by attention --group pattern`, top 10) over keys that sit in
   the page cache, vs a bare torch matrix-vector product over the same keys already in memory.
   Reported as (bare matvec time) / (rank time): 1.0 means ranking is as fast as the matvec.
2. Memory: peak RSS of a separate process ranking a synthetic bundle with > 4 GB of keys
   (by attention, and by effect with example grouping + masses + summary, which also reads
   values, steps and example ids).
3. CPU compute dtype: matvec over 1M×width keys stored as float32 / float16 / bfloat16,
   computed natively vs widened to float32 first.
4. Batching: `votes` over the whole digits test set (all layers): patterns × queries / s.
5. Validation: the per-block checks of streamed ids and floats (engine/stream.py, issue 12)
   on vs off, same bundle, interleaved: rank by attention (keys only) and by effect with
   example grouping, masses and summary (keys, values, steps, example ids).
6. Scores: one query ranked by attention (keys only), by cosine (keys and their norms) and by
   effect (keys and values, the default), interleaved on the same bundle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic  # noqa: E402

from dualtui.bundle import Bundle  # noqa: E402
from dualtui.engine.spotlight import spotlights  # noqa: E402
from dualtui.engine.votes import layer_votes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _median_time(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def roofline(tmp: Path, sizes: list[int], width: int, device: str) -> list[dict]:
    rows = []
    for n in sizes:
        path = write_synthetic(tmp / f"roof-{n}.safetensors", n, in_features=width)
        b = Bundle.open(path)
        dev = torch.device(device)
        rank = lambda: spotlights(b, "fc", [0], top=10, by=["attention"], groups=["pattern"], reverse=[False],  # noqa: E731
                                  summary=False, masses=False, device=dev)
        rank()  # warm the page cache
        t_rank = _median_time(rank, reps=5)
        keys = torch.cat([torch.from_numpy(np.array(b.raw(name))) for name in b.pattern_names("fc", "keys")]).to(dev)
        q = torch.from_numpy(b.array("layer/fc/queries")[0]).to(dev)
        matvec = lambda: keys @ q  # noqa: E731
        matvec()
        t_mv = _median_time(matvec, reps=5)
        gbytes = keys.numel() * 4 / 1e9
        rows.append({"patterns": n, "width": width, "keys_GB": gbytes, "rank_s": t_rank, "matvec_s": t_mv,
                     "ratio": t_mv / t_rank, "rank_GBps": gbytes / t_rank, "matvec_GBps": gbytes / t_mv,
                     "rank_ns_per_pattern": t_rank / n * 1e9})
        del keys
        print(f"  roofline {n:>10,} patterns: rank {t_rank * 1e3:8.1f} ms ({gbytes / t_rank:5.1f} GB/s) | "
              f"bare matvec {t_mv * 1e3:8.1f} ms ({gbytes / t_mv:5.1f} GB/s) | ratio {t_mv / t_rank:.2f}", flush=True)
        if n < max(sizes):
            path.unlink()
    return rows


_RSS_CHILD = r"""
import json, resource, sys, time
from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
b = Bundle.open(sys.argv[1])
before = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
t = time.perf_counter()
if sys.argv[2] == "attention":
    spotlights(b, "fc", [0], top=10, by=["attention"], groups=["pattern"], summary=False, masses=False, device="cpu")
else:
    spotlights(b, "fc", [0], top=10, by=["effect"], groups=["pattern", "example"], summary=True, masses=True, device="cpu")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
print(json.dumps({"peak_rss_MB": hwm(), "rss_after_import_MB": before, "seconds": time.perf_counter() - t}))
"""


def memory(path: Path) -> list[dict]:
    b = Bundle.open(path)
    keys_gb = sum(b.info(n).end - b.info(n).start for n in b.pattern_names("fc", "keys")) / 1e9
    file_gb = path.stat().st_size / 1e9
    rows = []
    for mode in ("attention", "effect+example+masses+summary"):
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), mode.split("+")[0]], capture_output=True, text=True, check=True)
        d = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"mode": mode, "keys_GB": keys_gb, "file_GB": file_gb, **d})
        print(f"  memory ({mode}): keys {keys_gb:.2f} GB, file {file_gb:.2f} GB -> peak RSS {d['peak_rss_MB']:.0f} MB "
              f"(after imports {d['rss_after_import_MB']:.0f} MB), {d['seconds']:.1f} s", flush=True)
    return rows


def storage_rank(tmp: Path, width: int) -> list[dict]:
    """What users get: ranking 1M patterns stored in each dtype (the stream widens float16 /
    bfloat16 blocks into a reused float32 buffer), side by side."""
    rows = []
    for st in ("F32", "F16", "BF16"):
        path = write_synthetic(tmp / f"dtype-{st}.safetensors", 1_000_000, in_features=width, storage=st)
        b = Bundle.open(path)
        rank = lambda: spotlights(b, "fc", [0], top=10, by=["attention"], groups=["pattern"], reverse=[False],  # noqa: E731
                                  summary=False, masses=False, device="cpu")
        rank()
        t = _median_time(rank, reps=5)
        rows.append({"storage": st, "rank_ms": t * 1e3, "file_MB": path.stat().st_size / 1e6})
        print(f"  rank 1M×{width} stored {st:4}: {t * 1e3:7.1f} ms (file {path.stat().st_size / 1e6:6.0f} MB)", flush=True)
        path.unlink()
    return rows


def compute_dtype(width: int) -> list[dict]:
    rows = []
    keys32 = torch.randn(1_000_000, width)
    q32 = torch.randn(width)
    for name, dt in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        k = keys32.to(dt)
        native = _median_time(lambda: k @ q32.to(dt))
        widened = _median_time(lambda: k.float() @ q32)
        rows.append({"storage": name, "native_ms": native * 1e3, "widen_then_float32_ms": widened * 1e3})
        print(f"  CPU matvec 1M×{width} stored {name:8}: native {native * 1e3:7.1f} ms | widened to float32 first {widened * 1e3:7.1f} ms", flush=True)
    return rows


def batching() -> list[dict]:
    rows = []
    for setting in ("single", "continual"):
        b = Bundle.open(ROOT / "sample_runs" / f"digits-{setting}.safetensors")
        for spec in b.manifest.layers:
            layer_votes(b, spec.name, "cpu")  # warm
            t = _median_time(lambda: layer_votes(b, spec.name, "cpu"))
            pq = spec.patterns * b.test_size
            rows.append({"bundle": setting, "layer": spec.name, "patterns": spec.patterns, "queries": b.test_size,
                         "seconds": t, "pattern_queries_per_s": pq / t})
            print(f"  votes digits-{setting} {spec.name}: {spec.patterns:,} patterns × {b.test_size} queries in {t * 1e3:.1f} ms "
                  f"= {pq / t / 1e6:,.0f} M pattern·queries/s", flush=True)
    return rows


def block_checks(tmp: Path, sizes: list[int], width: int) -> list[dict]:
    import dualtui.engine.stream as stream

    rows = []
    for n in sizes:
        path = write_synthetic(tmp / f"checks-{n}.safetensors", n, in_features=width)
        b = Bundle.open(path)
        for label, kw in (("attention", dict(by=["attention"], groups=["pattern"], summary=False, masses=False)),
                          ("effect+example+masses", dict(by=["effect"], groups=["pattern", "example"], summary=True, masses=True))):
            run = lambda: spotlights(b, "fc", [0], top=10, reverse=[False], device="cpu", **kw)  # noqa: E731
            run()  # page cache warm
            on, off = [], []
            for _ in range(5):  # interleaved: drift in the machine's load hits both alike
                stream.CHECK_BLOCKS = True
                on.append(_median_time(run, reps=1))
                stream.CHECK_BLOCKS = False
                off.append(_median_time(run, reps=1))
            stream.CHECK_BLOCKS = True
            t_on, t_off = statistics.median(on), statistics.median(off)
            rows.append({"patterns": n, "score": label, "checked_s": t_on, "unchecked_s": t_off, "ratio": t_on / t_off})
            print(f"  checks {n:>10,} patterns, {label:22s}: checked {t_on * 1e3:8.1f} ms | unchecked {t_off * 1e3:8.1f} ms "
                  f"| ratio {t_on / t_off:.3f}", flush=True)
        path.unlink()
    return rows


def _side_by_side(runs: dict) -> dict:
    """Median seconds of each run over 5 interleaved rounds (after one warm-up each), so that
    load on a shared machine falls on every variant alike."""
    for run in runs.values():
        run()  # page cache warm
    times: dict = {key: [] for key in runs}
    for _ in range(5):
        for key, run in runs.items():
            times[key].append(_median_time(run, reps=1))
    return {key: statistics.median(ts) for key, ts in times.items()}


def score_costs(tmp: Path, n: int, width: int) -> list[dict]:
    path = write_synthetic(tmp / f"scores-{n}.safetensors", n, in_features=width)
    b = Bundle.open(path)
    runs = {by: (lambda by=by: spotlights(b, "fc", [0], top=10, by=[by], groups=["pattern"], reverse=[False],
                                          summary=False, masses=False, device="cpu")) for by in ("attention", "cosine", "effect")}
    medians = _side_by_side(runs)
    base = medians["attention"]
    rows = []
    for by, t in medians.items():
        rows.append({"patterns": n, "by": by, "seconds": t, "vs_attention": t / base})
        print(f"  scores {n:>10,} patterns, by {by:9s}: {t * 1e3:8.1f} ms | {t / base:.2f}x attention", flush=True)
    path.unlink()
    return rows


def curve_costs(tmp: Path, n: int, width: int) -> list[dict]:
    """The app's pass (every score, per pattern and per example, summary, masses) with and
    without the sorted score curves (each pattern's 4 scores kept, then sorted)."""
    path = write_synthetic(tmp / f"curves-{n}.safetensors", n, in_features=width)
    b = Bundle.open(path)
    runs = {c: (lambda c=c: spotlights(b, "fc", [0], top=100, groups=["pattern", "example"], summary=True, masses=True,
                                       dense_examples=True, device="cpu", curve=c)) for c in (0, 200)}
    medians = _side_by_side(runs)
    base = medians[0]
    rows = []
    for c, t in medians.items():
        rows.append({"patterns": n, "curve_points": c, "seconds": t, "vs_no_curve": t / base})
        print(f"  app pass {n:>10,} patterns, curve={c:3d}: {t * 1e3:8.1f} ms | {t / base:.2f}x without", flush=True)
    path.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", type=Path, default=None, help="where to write synthetic bundles (needs ~6 GB for 1e7)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: roofline,memory,dtype,batching,checks,scores,curves")
    ap.add_argument("--check-sizes", default="1e6,4e6", help="bundle sizes (patterns) for the validation part")
    args = ap.parse_args()
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    results: dict = {"device": args.device, "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        tmp = Path(d)
        if "roofline" not in skip:
            print("## roofline: rank one query vs bare matvec over the same keys", flush=True)
            results["roofline"] = roofline(tmp, sizes, args.width, args.device)
        if "memory" not in skip and args.device == "cpu":
            print("## memory: peak RSS ranking a bundle with > 4 GB of keys", flush=True)
            big = tmp / f"roof-{max(sizes)}.safetensors"
            if not big.exists() or big.stat().st_size < 4.2e9:
                big = write_synthetic(tmp / "big.safetensors", 9_000_000, in_features=128)
            results["memory"] = memory(big)
    if "dtype" not in skip:
        print("## compute dtype on CPU", flush=True)
        results["compute_dtype"] = compute_dtype(args.width)
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            results["storage_rank"] = storage_rank(Path(d), args.width)
    if "batching" not in skip:
        print("## batching: votes over the digits test set", flush=True)
        results["batching"] = batching()
    if "checks" not in skip:
        print("## validation: per-block id and float checks on vs off", flush=True)
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            results["block_checks"] = block_checks(Path(d), [int(float(x)) for x in args.check_sizes.split(",")], args.width)
    if "scores" not in skip:
        print("## scores: one query by attention, cosine and effect", flush=True)
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            results["scores"] = score_costs(Path(d), int(float(args.check_sizes.split(",")[0])), args.width)
    if "curves" not in skip:
        print("## curves: the app's pass with and without the sorted score curves", flush=True)
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            results["curves"] = curve_costs(Path(d), int(float(args.check_sizes.split(",")[0])), args.width)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
