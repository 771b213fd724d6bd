"""Predictive power of attention (Irie et al. 2022): does the training class that a layer
attends to most (largest Σ|α| over its patterns) match the label, or the model's prediction?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.queries import QueryRows
from ..bundle.reader import Bundle
from .queryrows import ItemQueries
from .stream import block_rows, ProductGuard, compute_dtype, pick_device, stream_blocks
from .text import NextTokens, labels_are_tokens


@dataclass
class LayerVotes:
    layer: str
    test_items: int
    vote: np.ndarray  # [M] class with the largest Σ|α|
    class_abs: np.ndarray  # [C, M] Σ|α| per training class
    label_agreement: float  # vote == true label
    prediction_agreement: float  # vote == model's prediction
    model_accuracy: float  # prediction == true label
    # 2×2 counts: rows vote right / wrong (vs label), columns model right / wrong
    table: list[list[int]]
    # The frequency-normalised vote: the class with the largest mean |α| per pattern (Σ|α| ÷
    # the class's pattern count). The sum-vote favours classes with many patterns (in text
    # runs the most frequent next character, the space, wins every sum); this one does not.
    class_patterns: np.ndarray | None = None  # [C] patterns per training class
    vote_normalised: np.ndarray | None = None  # [M]
    normalised_label_agreement: float = 0.0
    normalised_prediction_agreement: float = 0.0
    # The paper's split: agreement among the items the model gets right and among those it
    # gets wrong (there the vote can side with the label or with the wrong prediction).
    correct: dict | None = None  # {"items", "label_agreement", "prediction_agreement"}
    misclassified: dict | None = None
    # How peaked each item's class attention is: mean ÷ std of Σ|α| over the classes (the
    # paper's statistic; lower is more peaked), averaged over the correct and the wrong items.
    peakedness_correct: float | None = None
    peakedness_misclassified: float | None = None

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "test_items": self.test_items,
            "label_agreement": self.label_agreement,
            "prediction_agreement": self.prediction_agreement,
            "model_accuracy": self.model_accuracy,
            "table": {"vote_right_model_right": self.table[0][0], "vote_right_model_wrong": self.table[0][1],
                      "vote_wrong_model_right": self.table[1][0], "vote_wrong_model_wrong": self.table[1][1]},
            "normalised_label_agreement": self.normalised_label_agreement,
            "normalised_prediction_agreement": self.normalised_prediction_agreement,
            "correct": self.correct,
            "misclassified": self.misclassified,
            "peakedness": {"correct": self.peakedness_correct, "misclassified": self.peakedness_misclassified},
        }


METRICS = ("label_agreement", "prediction_agreement", "model_accuracy", "normalised_label_agreement",
           "normalised_prediction_agreement", "correct.label_agreement", "misclassified.label_agreement",
           "misclassified.prediction_agreement", "peakedness.correct", "peakedness.misclassified")


def metric(row: dict, name: str) -> float | None:
    """A metric of a layer's votes JSON by dotted name (None where a split has no items)."""
    value: object = row
    for part in name.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return None if value is None else float(value)


def across_runs(runs: list[list[dict]]) -> list[dict]:
    """Per layer: each metric's mean and sample standard deviation (ddof 1; 0 for one run)
    over the runs that define it, like the paper's table over seeds."""
    out = []
    for j, first in enumerate(runs[0]):
        row: dict = {"layer": first["layer"], "runs": len(runs)}
        for name in METRICS:
            xs = np.array([x for r in runs if (x := metric(r[j], name)) is not None], dtype=np.float64)
            row[name] = {"mean": float(xs.mean()) if len(xs) else None,
                         "std": float(xs.std(ddof=1)) if len(xs) > 1 else (0.0 if len(xs) else None), "n": int(len(xs))}
        out.append(row)
    return out


def peakedness(class_abs: np.ndarray) -> np.ndarray:
    """[M]: mean ÷ std over the classes of each item's Σ|α| (population std; inf for an item
    whose classes all got the same mass)."""
    mean = class_abs.mean(axis=0)
    std = class_abs.std(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(std > 0, mean / np.where(std > 0, std, 1.0), np.inf)


def layer_votes(bundle: Bundle, layer: str, device: str | torch.device = "auto", query_batch: int = 4096,
                queries: str | None = None) -> LayerVotes:
    """One streaming pass per batch of items of a query set: Σ|α| (attention at each item's
    focus row) per training class."""
    from .spotlight import query_set

    dev = device if isinstance(device, torch.device) else pick_device(device)
    spec = bundle.layer_spec(layer)
    qs = query_set(bundle, queries)
    n_classes = max(len(bundle.manifest.classes), 1)
    label_of = torch.from_numpy(bundle.array("train/label").astype(np.int64)).to(dev)
    # Text runs: a pattern votes for the token it was trained to predict (the token after its position).
    next_token = NextTokens(bundle, dev) if labels_are_tokens(bundle) and bundle.has_position(layer) else None
    bias_scale = bundle.bias_scale(layer)
    bias_table = torch.from_numpy(bias_scale).to(dev) if bias_scale is not None else None
    fields = ("keys", "example") + (("position",) if next_token is not None else ()) + (("step",) if bias_table is not None else ())
    M = qs.size
    # Votes need each item's focus row only (all rows where the focus is a mean over them).
    per = max(1, int(query_batch / max(1.0, qs.rows_per_item(layer) if _needs_all_rows(qs, layer) else 1.0)))
    class_abs = np.zeros((n_classes, M))
    class_patterns = torch.zeros(n_classes, dtype=torch.float64, device=dev)  # counted in the first batch's pass
    for lo in range(0, M, per):
        items = np.arange(lo, min(M, lo + per))
        rows = qs.rows(layer, items)
        if bool((rows.focus >= 0).all()):
            rows = _focus_only(rows)
        iq = ItemQueries.build(rows, spec, dev, compute_dtype(bundle, layer))
        acc = torch.zeros(n_classes, len(items), dtype=torch.float64, device=dev)
        guard = ProductGuard(bundle, layer, dev)
        for block in stream_blocks(bundle, layer, fields, dev, block_rows(bundle, layer, max(len(rows), len(items)))):
            bt = bias_table[block.tensors["step"]] if bias_table is not None else None
            a = iq.attention(iq.row_alpha(block.tensors["keys"], bt))
            guard.add([a])  # NaN/Inf in keys shows here
            a = a.abs().double()
            ex = block.tensors["example"]
            cls = label_of[ex] if next_token is None else next_token(ex, block.tensors["position"])
            acc.index_add_(0, cls, a)
            if lo == 0:
                class_patterns.index_add_(0, cls, torch.ones(cls.shape[0], dtype=torch.float64, device=dev))
        guard.done()
        class_abs[:, lo : lo + len(items)] = acc.cpu().numpy()
    vote = class_abs.argmax(axis=0) if M else np.zeros(0, dtype=np.int64)
    label = qs.label
    pred = qs.prediction
    vote_right = vote == label
    model_right = pred == label
    mean = lambda x: float(x.mean()) if len(x) else 0.0  # noqa: E731
    table = [[int((vote_right & model_right).sum()), int((vote_right & ~model_right).sum())],
             [int((~vote_right & model_right).sum()), int((~vote_right & ~model_right).sum())]]
    counts = class_patterns.cpu().numpy()
    # Classes without patterns cannot be voted for (their mean is undefined, not zero).
    per_pattern = np.where(counts[:, None] > 0, class_abs / np.maximum(counts, 1)[:, None], -np.inf)
    vote_n = per_pattern.argmax(axis=0) if M else np.zeros(0, dtype=np.int64)
    peaked = peakedness(class_abs) if M else np.zeros(0)

    def split(mask: np.ndarray) -> dict:
        n = int(mask.sum())
        return {"items": n, "label_agreement": mean(vote_right[mask]) if n else None,
                "prediction_agreement": mean((vote == pred)[mask]) if n else None}

    def finite_mean(mask: np.ndarray) -> float | None:
        x = peaked[mask & np.isfinite(peaked)]
        return float(x.mean()) if len(x) else None

    return LayerVotes(layer, M, vote, class_abs, mean(vote_right), mean(vote == pred), mean(model_right), table,
                      counts, vote_n, mean(vote_n == label), mean(vote_n == pred),
                      split(model_right), split(~model_right), finite_mean(model_right), finite_mean(~model_right))


def _needs_all_rows(qs, layer: str) -> bool:
    if qs.legacy:
        return False
    return bool((qs.bundle.raw(qs.row_name(layer, "focus")) < 0).any())


def _focus_only(rows: QueryRows) -> QueryRows:
    """Each item's focus row alone (enough for attention)."""
    f = rows.focus
    M = len(f)
    return QueryRows(rows.query[f], rows.grad[f], np.arange(M), rows.position[f], rows.call[f], np.arange(M))
