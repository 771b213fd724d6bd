"""dualtui vs Captum's TracInCPFast on the digits MLP, side by side in one run.

    pip install -c constraints.txt captum          # the `bench` extra; benchmark-only
    python benchmarks/bench_peer_tracin.py [--setting single|continual] [--reps 5]
                                           [--test 0] [--json benchmarks/out/peer_tracin.json]

One training run (`record_digits`, same seed) gives both tools what they need: dualtui's bundle,
and one checkpoint per epoch (model state_dict + the learning rate at that moment, which
TracInCP uses as the checkpoint's weight) for Captum. Both then score all 1,437 training examples
for test items at the last Linear layer (`net.4`, 32→10):

1. Time for ONE test item: dualtui's engine on an opened bundle (`spotlights`, by effect, grouped
   by example; top 10 and the full per-example vector), the `dualtui rank` CLI as a subprocess end
   to end, vs `TracInCPFast.influence` for that item (full score vector, and its k=10 mode), plus a
   fresh Python process doing Captum's one-shot equivalent end to end. One-time setup (opening the
   bundle / constructing TracInCPFast) is excluded from the per-query times and reported apart.
2. Time for the WHOLE test set: one `spotlights` call over all test items (the engine batches
   queries) vs one `influence` call on the whole test batch.
3. Agreement: Spearman rank correlation of the two per-training-example score vectors, per test
   item, over all training examples (median / mean / min over the test set), and the overlap of
   the top-10 proponents (and top-10 opponents), for three Captum test losses:
     label      the documented usage: cross-entropy with the test item's true label,
     pred       cross-entropy with the model's prediction passed as the target,
     pred-logit test_loss_fn = −(predicted-class logit): the test gradient is then −e_pred,
                i.e. exactly −g, dualtui's query gradient at this layer.
   and, for `--setting continual`, the label and pred-logit variants "phase-aware": one
   TracInCPFast per task phase, each training example scored only with the checkpoints of the
   phase that trained it (plain TracInCP credits it with the other phase's checkpoints too).

What differs mathematically (score of training example i for test item m):
  dualtui   effect_i = Σ_{t: example(t)=i} (k_t·q_m + 1) (v_t·g_m)     (exact, no checkpoints)
            k_t = the layer input of example i at the step t it was trained on, q_m = the final
            model's layer input for m, g_m = d(predicted logit)/d(layer output) = e_pred, and
            v_t = example i's loss gradient at that step with the whole SGD trajectory folded in:
            −Σ_{s≥t} lr_s μ^{s−t}·(1/B)·∂L_i/∂y (momentum, cosine schedule, weight decay folded into
            w0). Summed over all examples plus the initial-weight term it equals the logit.
  TracInCPFast  Σ_c lr_c (x_i^c·x_m^c) (∇_y L(x_i, y_i)^c · ∇_y L_test(x_m)^c)
            over per-epoch checkpoints c: features and gradients are re-evaluated at each
            checkpoint for every example (not at the step it was actually used), every example
            is credited with every checkpoint (also ones from a phase that never trained it, as in
            `continual`), momentum is ignored, the layer bias is ignored (no +1), and by default the test gradient is that
            of the cross-entropy of the test item's *label* (the last element of `inputs`), not
            of the predicted logit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.record.digits import DigitsMLP, load_digits_split, record_digits

ROOT = Path(__file__).resolve().parents[1]
LAYER = "net.4"
KEY = ("effect", "example", False)


def _med(times: list[float]) -> float:
    return statistics.median(times)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ----------------------------------------------------------------------------- training
def train(tmp: Path, setting: str, epochs: int, seed: int) -> tuple[Path, list[str], list[dict], float]:
    """Record the bundle and save one checkpoint per epoch (state_dict + learning rate)."""
    ckpt_dir = tmp / "checkpoints"
    ckpt_dir.mkdir()
    ckpts: list[Path] = []
    info: list[dict] = []

    def on_epoch(epoch: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        lr = float(opt.param_groups[0]["lr"])
        path = ckpt_dir / f"epoch-{epoch:03d}.pt"
        torch.save({"model_state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "learning_rate": lr}, path)
        ckpts.append(path)
        info.append({"epoch": epoch, "learning_rate": lr})

    t, res = _timed(lambda: record_digits(tmp / "digits.safetensors", setting, epochs=epochs, seed=seed, on_epoch=on_epoch))
    return Path(res.path), [str(p) for p in ckpts], info, t


def load_ckpt(model: nn.Module, ckpt) -> float:
    """checkpoints_load_func for TracInCPFast: load weights, return the checkpoint's lr.
    `ckpt` is a path (Captum's usual way) or an already-loaded dict (in-memory variant)."""
    d = torch.load(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
    model.load_state_dict(d["model_state_dict"])
    return float(d["learning_rate"])


def neg_pred_logit(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Test 'loss' = −(logit of the target class), summed over the batch: gradient −e_target."""
    return -out.gather(1, targets.long().view(-1, 1)).sum()


neg_pred_logit.reduction = "sum"  # tell Captum the reduction (avoids its warning)


def make_tracin(ckpts, x_train, y_train, test_loss_fn=None, batch_size: int | None = None):
    from captum.influence import TracInCPFast

    model = DigitsMLP()
    model.eval()
    return TracInCPFast(
        model, "net.4", torch.utils.data.TensorDataset(x_train, y_train), ckpts,
        checkpoints_load_func=load_ckpt, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
        batch_size=batch_size or len(x_train), test_loss_fn=test_loss_fn,
    )


# ----------------------------------------------------------------------------- dualtui side
def dualtui_full(bundle: Bundle, tests: list[int]) -> np.ndarray:
    """[len(tests), N] effect sums per training example (the engine's dense output).

    Examples never trained on have no patterns and get NaN, as they have no score."""
    res = spotlights(bundle, LAYER, tests, by=["effect"], groups=[], reverse=[False], top=0,
                     summary=False, masses=False, device="cpu", dense_examples=True)
    out = np.stack([sp.example_scores["effect"] for sp in res])
    out[:, res[0].example_patterns == 0] = np.nan
    return out


def dualtui_call(bundle: Bundle, tests: list[int], top: int):
    return spotlights(bundle, LAYER, tests, by=["effect"], groups=["example"], reverse=[False], top=top,
                      summary=False, masses=False, device="cpu")


def cli_rank(bundle_path: Path, test: int, top: int) -> tuple[float, dict]:
    exe = shutil.which("dualtui")
    cmd = ([exe] if exe else [sys.executable, "-c", "from dualtui.cli import main; main()"]) + [
        "rank", str(bundle_path), "--test", str(test), "--layer", LAYER, "--by", "effect", "--group", "example",
        "--top", str(top), "--json", "--device", "cpu"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(p.stdout)


_CAPTUM_CHILD = textwrap.dedent(r"""
    import sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from torch import nn
    from captum.influence import TracInCPFast
    from dualtui.record.digits import DigitsMLP, load_digits_split
    setting, seed, test = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpts = sys.argv[4:]
    def load(model, path):
        d = torch.load(path)
        model.load_state_dict(d["model_state_dict"])
        return float(d["learning_rate"])
    data = load_digits_split(setting)  # the split record_digits uses (fixed)
    model = DigitsMLP().eval()
    tr = TracInCPFast(model, "net.4", torch.utils.data.TensorDataset(data.x_train, data.y_train), ckpts,
                      checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=len(data.x_train))
    r = tr.influence((data.x_test[test:test + 1], data.y_test[test:test + 1]), k=10)
    print(r.indices[0].tolist())
""")


def captum_process(setting: str, seed: int, test: int, ckpts: list[str]) -> tuple[float, list[int]]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", _CAPTUM_CHILD, setting, str(seed), str(test), *map(str, ckpts)],
                       capture_output=True, text=True, check=True)
    return time.perf_counter() - t, json.loads(p.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- agreement
def agreement(d: np.ndarray, c: np.ndarray, k: int = 10) -> dict:
    from scipy.stats import spearmanr

    rho = np.array([spearmanr(d[m], c[m]).statistic for m in range(len(d))])
    top = np.array([len(set(np.argsort(-d[m])[:k]) & set(np.argsort(-c[m])[:k])) / k for m in range(len(d))])
    bot = np.array([len(set(np.argsort(d[m])[:k]) & set(np.argsort(c[m])[:k])) / k for m in range(len(d))])
    return {"spearman": rho, "top_overlap": top, "bottom_overlap": bot}


def stats(a: np.ndarray) -> dict:
    a = np.asarray(a, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()), "min": float(a.min()),
            "max": float(a.max())}


# ----------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="single", choices=["single", "continual"])
    ap.add_argument("--epochs", type=int, default=6, help="epochs per task (record_digits default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per timing (median reported)")
    ap.add_argument("--cli-reps", type=int, default=3, help="repetitions of the subprocess timings")
    ap.add_argument("--test", type=int, default=0, help="the test item for the one-item timings")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "peer_tracin.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="captum")
    import captum

    torch.manual_seed(0)
    res: dict = {"setting": args.setting, "epochs_per_task": args.epochs, "seed": args.seed, "reps": args.reps,
                 "torch": torch.__version__, "captum": captum.__version__, "torch_threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "layer": LAYER, "device": "cpu"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"## training digits ({args.setting}, {args.epochs} epochs per task) with recording + per-epoch checkpoints", flush=True)
        bundle_path, ckpts, ckpt_info, t_train = train(tmp, args.setting, args.epochs, args.seed)
        res["train_record_and_checkpoint_s"] = t_train
        res["checkpoints"] = ckpt_info
        res["bundle_bytes"] = bundle_path.stat().st_size
        res["checkpoint_bytes"] = sum(Path(p).stat().st_size for p in ckpts)
        data = load_digits_split(args.setting)
        N, M = len(data.y_train), len(data.y_test)
        res["train_size"], res["test_size"] = N, M
        print(f"   {t_train:.2f} s; bundle {res['bundle_bytes'] / 1e6:.2f} MB, {len(ckpts)} checkpoints "
              f"({res['checkpoint_bytes'] / 1e6:.2f} MB); {N} training examples, {M} test items", flush=True)

        # ---- consistency: same data, same final model
        bundle = Bundle.open(bundle_path)
        assert np.array_equal(bundle.array("train/label"), data.y_train.numpy()), "train split differs"
        assert np.array_equal(bundle.queries().label, data.y_test.numpy()), "test split differs"
        final = DigitsMLP().eval()
        load_ckpt(final, ckpts[-1])
        with torch.no_grad():
            logits = final(data.x_test)
        pred = logits.argmax(-1)
        pred_bundle = bundle.queries().prediction
        res["final_checkpoint_predictions_match_bundle"] = float((pred.numpy() == pred_bundle).mean())
        pred_t = torch.from_numpy(np.array(pred_bundle, dtype=np.int64))
        correct = pred_bundle == data.y_test.numpy()
        res["test_accuracy"] = float(correct.mean())

        tracin = {}
        t_setup_captum, tracin["label"] = _timed(lambda: make_tracin(ckpts, data.x_train, data.y_train))
        tracin["pred-logit"] = make_tracin(ckpts, data.x_train, data.y_train, test_loss_fn=neg_pred_logit)
        mem_ckpts = [torch.load(p) for p in ckpts]
        tracin_mem = make_tracin(mem_ckpts, data.x_train, data.y_train)
        t_open = _med([_timed(lambda: Bundle.open(bundle_path))[0] for _ in range(args.reps)])
        res["setup_s"] = {"dualtui_bundle_open": t_open, "captum_construct_TracInCPFast": t_setup_captum}

        m = args.test
        one = lambda x: x[m : m + 1]  # noqa: E731
        # warm-up (imports, page cache, lazy init) for everything that is timed
        dualtui_call(bundle, [m], args.top)
        dualtui_full(bundle, [m])
        tracin["label"].influence((one(data.x_test), one(data.y_test)))
        tracin_mem.influence((one(data.x_test), one(data.y_test)))

        # ---- 1. one test item (interleaved reps so machine noise hits all)
        print(f"## one test item (#{m}), {args.reps} reps interleaved", flush=True)
        keys1 = ["dualtui_engine_top", "dualtui_engine_full", "captum_influence_full", "captum_influence_k",
                 "captum_influence_full_mem_ckpts"]
        t1: dict[str, list[float]] = {k: [] for k in keys1}
        for _ in range(args.reps):
            t1["dualtui_engine_top"].append(_timed(lambda: dualtui_call(bundle, [m], args.top))[0])
            t1["captum_influence_full"].append(_timed(lambda: tracin["label"].influence((one(data.x_test), one(data.y_test))))[0])
            t1["dualtui_engine_full"].append(_timed(lambda: dualtui_full(bundle, [m]))[0])
            t1["captum_influence_k"].append(_timed(lambda: tracin["label"].influence((one(data.x_test), one(data.y_test)), k=args.top))[0])
            t1["captum_influence_full_mem_ckpts"].append(_timed(lambda: tracin_mem.influence((one(data.x_test), one(data.y_test))))[0])
        print(f"## one test item end to end in a fresh process, {args.cli_reps} reps interleaved", flush=True)
        t1["dualtui_cli_subprocess"], t1["captum_fresh_process"] = [], []
        cli_out, cap_top = None, None
        for _ in range(args.cli_reps):
            t, cli_out = cli_rank(bundle_path, m, args.top)
            t1["dualtui_cli_subprocess"].append(t)
            t, cap_top = captum_process(args.setting, args.seed, m, ckpts)
            t1["captum_fresh_process"].append(t)
        res["one_item"] = {"test": m, "median_s": {k: _med(v) for k, v in t1.items()}, "all_s": t1}

        # ---- 2. whole test set
        allm = list(range(M))
        print(f"## whole test set ({M} items), {args.reps} reps interleaved", flush=True)
        dualtui_call(bundle, allm, args.top)
        tracin["label"].influence((data.x_test, data.y_test))
        keys2 = ["dualtui_engine_top", "dualtui_engine_full", "captum_influence_full", "captum_influence_k",
                 "captum_influence_full_mem_ckpts"]
        t2: dict[str, list[float]] = {k: [] for k in keys2}
        for _ in range(args.reps):
            t2["dualtui_engine_top"].append(_timed(lambda: dualtui_call(bundle, allm, args.top))[0])
            t2["captum_influence_full"].append(_timed(lambda: tracin["label"].influence((data.x_test, data.y_test)))[0])
            t2["dualtui_engine_full"].append(_timed(lambda: dualtui_full(bundle, allm))[0])
            t2["captum_influence_k"].append(_timed(lambda: tracin["label"].influence((data.x_test, data.y_test), k=args.top))[0])
            t2["captum_influence_full_mem_ckpts"].append(_timed(lambda: tracin_mem.influence((data.x_test, data.y_test)))[0])
        res["whole_test_set"] = {"items": M, "median_s": {k: _med(v) for k, v in t2.items()}, "all_s": t2}

        # ---- 3. agreement over all training examples
        print("## agreement (all test items, all training examples)", flush=True)
        D = dualtui_full(bundle, allm)
        assert not np.isnan(D).any(), "some training example has no effect score"
        # exactness check: Σ_i effect_i + (w0 q + b0)·g == predicted logit of the final model
        q = bundle.queries().rows(LAYER, np.arange(bundle.test_size)).query.astype(np.float64)
        g = bundle.queries().rows(LAYER, np.arange(bundle.test_size)).grad.astype(np.float64)
        w0 = bundle.array(f"layer/{LAYER}/w0").astype(np.float64)
        b0 = bundle.array(f"layer/{LAYER}/b0").astype(np.float64)
        init = ((q @ w0.T + b0) * g).sum(1)
        plogit = logits.double().gather(1, pred_t.view(-1, 1)).squeeze(1).numpy()
        res["dualtui_decomposition_max_abs_error"] = float(np.abs(D.sum(1) + init - plogit).max())
        res["dualtui_learned_share_of_logit_median"] = float(np.median(D.sum(1) / plogit))
        C = {
            "label": tracin["label"].influence((data.x_test, data.y_test)).double().numpy(),
            "pred": tracin["label"].influence((data.x_test, pred_t)).double().numpy(),
            "pred-logit": tracin["pred-logit"].influence((data.x_test, pred_t)).double().numpy(),
        }
        if args.setting == "continual":
            # TracInCP credits every training example with every checkpoint, also those of the
            # phase in which it was not trained. Phase-aware: one TracInCPFast per task phase,
            # each example scored only with the checkpoints of the phase that trained it.
            E = args.epochs
            task_tr = data.task_train.numpy()[None, :]
            for name, loss, target in (("label", None, data.y_test), ("pred-logit", neg_pred_logit, pred_t)):
                parts = [make_tracin(ck, data.x_train, data.y_train, test_loss_fn=loss).influence((data.x_test, target))
                         .double().numpy() for ck in (ckpts[:E], ckpts[E:])]
                C[f"{name}, phase-aware"] = np.where(task_tr == 0, parts[0], parts[1])
        # pairs of Captum variants too: how much of the disagreement is the test loss alone
        agree: dict = {}
        for name, Cm in C.items():
            a = agreement(D, Cm)
            agree[name] = {
                "all": {k: stats(v) for k, v in a.items()},
                "correct": {k: stats(v[correct]) for k, v in a.items()},
                "misclassified": {k: stats(v[~correct]) for k, v in a.items()},
            }
        a = agreement(C["label"], C["pred-logit"])
        agree["captum label vs captum pred-logit"] = {"all": {k: stats(v) for k, v in a.items()}}
        res["agreement"] = agree
        res["misclassified_test_items"] = int((~correct).sum())
        res["captum_fresh_process_top10_matches_in_process"] = (
            cap_top == np.argsort(-C["label"][m], kind="stable")[: args.top].tolist())
        res["dualtui_cli_top_matches_engine"] = (
            [r["example"] for r in cli_out["results"]] == np.argsort(-D[m], kind="stable")[: args.top].tolist())

    report(res, args.top)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(f"\nJSON written to {args.json}")


def _ms(s: float) -> str:
    return f"{s * 1e3:9.1f} ms"


def report(res: dict, top: int) -> None:
    o, w = res["one_item"]["median_s"], res["whole_test_set"]["median_s"]
    N, M = res["train_size"], res["test_size"]
    print()
    print(f"## dualtui vs Captum TracInCPFast ({res['captum']}), digits '{res['setting']}', layer {LAYER}, "
          f"{N} training examples, {M} test items; CPU, {res['torch_threads']} torch threads; medians of "
          f"{res['reps']} reps")
    print(f"setup (excluded below): dualtui Bundle.open {_ms(res['setup_s']['dualtui_bundle_open'])} | "
          f"TracInCPFast(...) {_ms(res['setup_s']['captum_construct_TracInCPFast'])}")
    print(f"(training + recording + {len(res['checkpoints'])} checkpoints: {res['train_record_and_checkpoint_s']:.2f} s, "
          f"shared by both; bundle {res['bundle_bytes'] / 1e6:.2f} MB vs checkpoints {res['checkpoint_bytes'] / 1e6:.2f} MB)")
    print()
    print("| scores for | dualtui | Captum TracInCPFast | Captum / dualtui |")
    print("|---|---|---|---|")
    rows = [
        (f"1 item, top {top}", o["dualtui_engine_top"], o["captum_influence_k"]),
        (f"1 item, all {N} scores", o["dualtui_engine_full"], o["captum_influence_full"]),
        ("1 item, all scores, Captum ckpts in memory", o["dualtui_engine_full"], o["captum_influence_full_mem_ckpts"]),
        (f"1 item, fresh process (CLI / script), top {top}", o["dualtui_cli_subprocess"], o["captum_fresh_process"]),
        (f"{M} items, top {top}", w["dualtui_engine_top"], w["captum_influence_k"]),
        (f"{M} items, all scores", w["dualtui_engine_full"], w["captum_influence_full"]),
        (f"{M} items, all scores, Captum ckpts in memory", w["dualtui_engine_full"], w["captum_influence_full_mem_ckpts"]),
    ]
    for name, a, b in rows:
        print(f"| {name} | {_ms(a)} | {_ms(b)} | {b / a:6.2f}x |")
    print()
    print(f"dualtui exactness: Σ effects + initial-weight term = predicted logit, max abs error "
          f"{res['dualtui_decomposition_max_abs_error']:.2e}")
    print(f"test accuracy {res['test_accuracy']:.3f} ({res['misclassified_test_items']} misclassified)")
    print()
    print(f"## agreement with dualtui's effect (per test item, over all {N} training examples)")
    print("| Captum test loss | subset | Spearman median | mean | min | top-10 proponents overlap (mean) | top-10 opponents overlap (mean) |")
    print("|---|---|---|---|---|---|---|")
    for name, a in res["agreement"].items():
        for subset, s in a.items():
            r = s["spearman"]
            if r.get("n", 0) == 0:
                continue
            print(f"| {name} | {subset} (n={r['n']}) | {r['median']:.3f} | {r['mean']:.3f} | {r['min']:.3f} | "
                  f"{s['top_overlap']['mean']:.2f} | {s['bottom_overlap']['mean']:.2f} |")
    print(textwrap.dedent("""
        label: cross-entropy of the test item's true label (Captum's documented usage; the label is
        the last element of `inputs`). pred: the model's prediction passed as that target.
        pred-logit: test_loss_fn = -(predicted-class logit), so Captum's test gradient is -g, the
        same direction as dualtui's query gradient; what still differs is TracIn's checkpoint
        approximation (features and gradients re-evaluated at per-epoch checkpoints, weighted by
        the lr at the checkpoint) vs dualtui's exact per-step record (the example's input and loss
        gradient at the step it was trained, momentum and the lr schedule folded in, the final
        model's query), and Captum ignoring the bias (+1 in dualtui's attention)."""))
    if res["setting"] == "continual":
        print(textwrap.dedent("""\
            continual: TracInCP scores every training example at every checkpoint, including the
            checkpoints of the other task's phase, when that example was not trained at all; dualtui
            only has patterns for the steps that used the example. ', phase-aware' runs one
            TracInCPFast per phase (its own checkpoints) and scores each example with the one
            for the phase that trained it."""))


if __name__ == "__main__":
    main()
