"""Mislabel detection: dualtui's self-scores vs Captum's TracInCP self-influence, side by side.

    python benchmarks/bench_mislabel.py [--datasets digits mnist] [--json benchmarks/out/mislabel.json]

The standard evaluation of data-attribution toolkits: flip the labels of 10% of the training
examples (each to another class, fixed seed), train once, and rank every training example by
a score that should put the flipped ones first; report the area under the ROC curve and the
time each method takes to score the whole training set.

One training run per data set gives both tools what they need: dualtui's bundle (recorded
with every training example as the query set "train", target = its training label) and one
checkpoint per epoch (weights + learning rate) for Captum.

- dualtui `self-scores` at the last layer: the self effect (the part of the example's label
  logit its own patterns wrote; exact), the other examples' effect (the rest; ranked lowest
  first), the self share (÷ the learned term), and the self effect summed over all layers
  (first-order at the hidden layers).
- The baseline every detector must beat: the final model misclassifies the example.
- Captum `TracInCP.self_influence` over all parameters (Σ_checkpoints lr·‖∇loss‖²) and
  `TracInCPFast.self_influence` (the last layer only), each with the checkpoints of every epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dualtui.bundle import Bundle
from dualtui.engine.selfscore import self_scores


def flipped_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(new labels, mask of the flipped examples): `fraction` of them moved to another class."""
    rng = np.random.default_rng(seed)
    flip = np.zeros(len(labels), dtype=bool)
    flip[rng.choice(len(labels), int(round(fraction * len(labels))), replace=False)] = True
    out = labels.copy()
    out[flip] = (labels[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
    return out, flip


def auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_positive, score))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def evaluate(dataset: str, tmp: Path, *, fraction: float = 0.1, seed: int = 0, captum_full: bool = True,
             **train_kw) -> dict:
    """One run: train with flipped labels, score every training example both ways."""
    from dualtui.record import digits as digits_mod
    from dualtui.record import mnist as mnist_mod

    data = digits_mod.load_digits_split("single") if dataset == "digits" else mnist_mod.mnist_data(
        "single", train_kw.get("per_class", 400))
    labels, flip = flipped_labels(data.y_train.numpy(), fraction, seed)
    ckpts: list[Path] = []

    def on_epoch(epoch: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        path = tmp / f"{dataset}-epoch-{epoch:03d}.pt"
        torch.save({"model_state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
                    "learning_rate": float(opt.param_groups[0]["lr"])}, path)
        ckpts.append(path)

    record = digits_mod.record_digits if dataset == "digits" else mnist_mod.record_mnist
    t_train, res = _timed(lambda: record(tmp / f"{dataset}.safetensors", "single", seed=seed, labels=labels,
                                         train_queries=len(labels), on_epoch=on_epoch, **train_kw))
    bundle = Bundle.open(res.path)
    layers = bundle.manifest.layer_names
    last = layers[-1]
    t_self, s = _timed(lambda: self_scores(bundle, last, "train", "cpu"))
    order = s.example  # the items are the training examples, in the query set's order
    is_flip = flip[order]
    t_all, per_layer = _timed(lambda: [self_scores(bundle, L, "train", "cpu").self_effect for L in layers])
    share = np.nan_to_num(s.self_share, nan=0.0)
    out = {
        "dataset": dataset, "train_examples": int(len(labels)), "flipped": int(flip.sum()), "epochs": len(ckpts),
        "test_accuracy": res.accuracy.get("all"), "record_s": t_train,
        "dualtui": {
            "self_effect_last_layer": {"auc": auc(is_flip, s.self_effect), "seconds": t_self},
            "self_share_last_layer": {"auc": auc(is_flip, share), "seconds": t_self},
            # the rest of the data arguing against the label: −(learned − self effect)
            "others_effect_last_layer": {"auc": auc(is_flip, -s.others), "seconds": t_self},
            "self_effect_all_layers": {"auc": auc(is_flip, np.sum(per_layer, axis=0)), "seconds": t_all},
        },
        # the trivial baseline every detector must beat: the final model disagrees with the label
        "baseline_misclassified": auc(is_flip, (s.prediction != s.label).astype(np.float64)),
        "scores_for_every_example": {"dualtui": bool(np.isfinite(s.self_effect).all() and len(s.self_effect) == len(labels))},
    }
    x, y = data.x_train, torch.from_numpy(labels)
    hidden = train_kw.get("hidden", 32 if dataset == "digits" else 100)
    out["captum"] = captum_self_influence(x, y, ckpts, hidden, last, captum_full)
    for name, r in out["captum"].items():
        r["auc"] = auc(flip, r.pop("scores"))
    out["scores_for_every_example"]["captum"] = all(r["every_example"] for r in out["captum"].values())
    return out


def captum_self_influence(x: torch.Tensor, y: torch.Tensor, ckpts: list[Path], hidden: int, last: str,
                          full: bool) -> dict:
    from captum.influence import TracInCP, TracInCPFast

    from dualtui.record.digits import DigitsMLP

    def load(model: nn.Module, path) -> float:
        d = torch.load(path)
        model.load_state_dict(d["model_state_dict"])
        return float(d["learning_rate"])

    ds = torch.utils.data.TensorDataset(x, y)
    out = {}
    runs = [("TracInCPFast (last layer)", lambda m: TracInCPFast(
        m, last, ds, [str(p) for p in ckpts], checkpoints_load_func=load,
        loss_fn=nn.CrossEntropyLoss(reduction="sum"), batch_size=512))]
    if full:
        runs.append(("TracInCP (all parameters)", lambda m: TracInCP(
            m, ds, [str(p) for p in ckpts], checkpoints_load_func=load, loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            batch_size=256, sample_wise_grads_per_batch=True)))
    for name, make in runs:
        model = DigitsMLP(hidden, in_features=x.shape[1]).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t, scores = _timed(lambda: make(model).self_influence(None, show_progress=False))
        scores = scores.detach().numpy().astype(np.float64)
        out[name] = {"seconds": t, "scores": scores, "every_example": bool(np.isfinite(scores).all() and len(scores) == len(x))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["digits", "mnist"], choices=["digits", "mnist"])
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "torch": torch.__version__}, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            folder = Path(tmp) / ds
            folder.mkdir()
            results["runs"].append(evaluate(ds, folder, fraction=args.fraction, seed=args.seed))
    results["machine"]["load_after"] = os.getloadavg()
    for r in results["runs"]:
        print(f"\n{r['dataset']}: {r['train_examples']} training examples, {r['flipped']} flipped, {r['epochs']} epochs, "
              f"test accuracy {r['test_accuracy']:.1%}, recorded in {r['record_s']:.1f} s")
        print(f"  {'method':44s} {'AUC':>6s} {'seconds':>9s}")
        for name, v in r["dualtui"].items():
            print(f"  {'dualtui ' + name.replace('_', ' '):44s} {v['auc']:6.3f} {v['seconds']:9.3f}")
        for name, v in r["captum"].items():
            print(f"  {'Captum ' + name:44s} {v['auc']:6.3f} {v['seconds']:9.3f}")
        print(f"  {'baseline: the final model misclassifies it':44s} {r['baseline_misclassified']:6.3f}")
    print(f"\nload {results['machine']['load_before']} -> {results['machine']['load_after']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
