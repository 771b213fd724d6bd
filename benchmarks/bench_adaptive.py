"""Adaptive optimizers: recording overhead, Adafactor's exactness, AdamW's explained share, and
how AdamW's rankings compare with SGD's on the same model — measured side by side in one run.

    python benchmarks/bench_adaptive.py [--reps 3] [--json benchmarks/out/adaptive.json]

1. Overhead: the same bias-free digits MLP (64→32→32→10, batch 32, 6 epochs, same seed and
   batches) trained with SGD, Adafactor and AdamW, each without the Recorder and with it,
   alternated rep by rep; ratios of medians. The same for the character Transformer of
   `dualtui record text` (bias-free, 300 steps).
2. Exactness: `verify` of the Adafactor runs (max |W_T − (w0 + Σ v kᵀ)| against the float32
   tolerance), per layer.
3. AdamW, explained share per layer (the digits MLP with biases, as `dualtui record digits
   --optimizer adamw` trains it, and the char Transformer); the same with β1 = 0 splits the
   residual into what the rank-1 preconditioner misses and what freezing it over the momentum
   tail adds.
4. Rankings: for every test item, the top-10 training examples by effect at each layer of the
   AdamW run vs the SGD run of the same model (same initial weights, same batches): Jaccard of
   the two tops and Spearman's ρ over all examples.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dualtui.bundle import Bundle
from dualtui.engine.compare import spearman
from dualtui.engine.spotlight import spotlights
from dualtui.engine.verify import verify_bundle
from dualtui.record import digits as digits_mod
from dualtui.record import text as text_mod


def _timed(fn) -> float:
    marks: dict[str, float] = {}

    def on_step(done: int, total: int, loss: float | None = None) -> None:
        if done == 0:
            marks["start"] = time.perf_counter()
        if done == total:
            marks["end"] = time.perf_counter()

    fn(on_step)
    return marks["end"] - marks["start"]


def digits_run(out: Path, optimizer: str, record: bool, bias: bool = False, **kw) -> float:
    return _timed(lambda on_step: digits_mod.record_digits(out, "single", optimizer=optimizer, bias=bias, record=record,
                                                           on_step=on_step, **kw))


def text_run(out: Path, optimizer: str, record: bool, bias: bool = False, steps: int = 300) -> float:
    lr = {"sgd": 0.3}.get(optimizer, digits_mod.EXPERIMENT_LR.get(optimizer))
    cfg = text_mod.TextConfig(optimizer=optimizer, bias=bias, lr=lr, steps=steps)
    return _timed(lambda on_step: text_mod.record_text(out, cfg=cfg, record=record, on_step=on_step, windows=WINDOWS.get("w")))


WINDOWS: dict = {}


def overhead(tmp: Path, reps: int) -> dict:
    out: dict = {}
    for model, run in (("digits MLP", digits_run), ("char Transformer", text_run)):
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(reps):
            for opt in ("sgd", "adafactor", "adamw"):
                for record in (False, True):
                    times.setdefault((opt, record), []).append(run(tmp / f"o-{opt}.safetensors", opt, record))
        med = {k: statistics.median(v) for k, v in times.items()}
        out[model] = {opt: {"train_s": med[(opt, False)], "recorded_s": med[(opt, True)],
                            "overhead": med[(opt, True)] / med[(opt, False)],
                            "recorded_vs_sgd_recorded": med[(opt, True)] / med[("sgd", True)]}
                      for opt in ("sgd", "adafactor", "adamw")}
    return out


def exactness(tmp: Path) -> dict:
    out = {}
    for model, run in (("digits MLP", digits_run), ("char Transformer", text_run)):
        path = tmp / f"x-{model[:5]}.safetensors"
        run(path, "adafactor", True)
        report = verify_bundle(Bundle.open(path))
        out[model] = {"ok": report.ok, "layers": {c.name: {"weight_err": c.weight_max_abs_error, "tolerance": c.tolerance}
                                                  for c in report.layers}}
    return out


def explained(tmp: Path) -> dict:
    out = {}
    real = torch.optim.AdamW
    for beta1 in (0.9, 0.0):
        # β1 = 0 (no momentum): what is left is the rank-1 approximation's alone
        torch.optim.AdamW = (lambda *a, **k: real(*a, betas=(beta1, 0.999), **k)) if beta1 == 0.0 else real  # type: ignore
        try:
            for model, run in (("digits MLP", digits_run), ("char Transformer", text_run)):
                path = tmp / f"e-{model[:5]}-{beta1}.safetensors"
                run(path, "adamw", True, bias=True)
                m = Bundle.open(path).manifest
                out[f"{model}, beta1={beta1}"] = {L: v["explained"] for L, v in m.dual_form["layers"].items()}
        finally:
            torch.optim.AdamW = real  # type: ignore
    return out


def rankings(tmp: Path) -> dict:
    paths = {}
    for opt in ("sgd", "adamw"):
        paths[opt] = tmp / f"r-{opt}.safetensors"
        digits_run(paths[opt], opt, True, bias=True)
    a, b = Bundle.open(paths["sgd"]), Bundle.open(paths["adamw"])
    M = a.test_size
    out = {}
    for L in a.manifest.layer_names:
        ja, rho = [], []
        sa = spotlights(a, L, list(range(M)), top=10, by=["effect"], groups=["example"], reverse=[False],
                        summary=False, masses=False, dense_examples=True)
        sb = spotlights(b, L, list(range(M)), top=10, by=["effect"], groups=["example"], reverse=[False],
                        summary=False, masses=False, dense_examples=True)
        for x, y in zip(sa, sb):
            ex, ey = x.example_scores["effect"], y.example_scores["effect"]
            seen = (x.example_patterns > 0) & (y.example_patterns > 0)
            idx = np.nonzero(seen)[0]
            tx = set(idx[np.argsort(-ex[idx], kind="stable")[:10]])
            ty = set(idx[np.argsort(-ey[idx], kind="stable")[:10]])
            ja.append(len(tx & ty) / len(tx | ty))
            rho.append(spearman(ex[idx], ey[idx]))
        out[L] = {"mean_top10_jaccard": float(np.mean(ja)), "mean_spearman": float(np.mean(rho)),
                  "items": M}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    src = text_mod.load_sources(None)
    WINDOWS["w"] = text_mod.make_windows(src, text_mod.TextConfig().context, tests=text_mod.TextConfig().tests)
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        result = {"machine": {"cpus": os.cpu_count(), "load_before": load, "torch": torch.__version__},
                  "overhead": overhead(tmp, args.reps), "adafactor_exactness": exactness(tmp),
                  "adamw_explained": explained(tmp), "adamw_vs_sgd_rankings": rankings(tmp)}
    result["machine"]["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
