"""Predictive power of attention (Irie et al. 2022): does the training class that a layer
attends to most (largest Σ|α| over its patterns) match the label, or the model's prediction?"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.reader import Bundle
from .stream import block_rows, pick_device, stream_blocks
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

    def to_json(self) -> dict:
        return {
            "layer": self.layer,
            "test_items": self.test_items,
            "label_agreement": self.label_agreement,
            "prediction_agreement": self.prediction_agreement,
            "model_accuracy": self.model_accuracy,
            "table": {"vote_right_model_right": self.table[0][0], "vote_right_model_wrong": self.table[0][1],
                      "vote_wrong_model_right": self.table[1][0], "vote_wrong_model_wrong": self.table[1][1]},
        }


def layer_votes(bundle: Bundle, layer: str, device: str | torch.device = "auto", query_batch: int = 4096) -> LayerVotes:
    """One streaming pass per batch of test queries: Σ|α| per training class, per test item."""
    dev = device if isinstance(device, torch.device) else pick_device(device)
    spec = bundle.layer_spec(layer)
    emb = spec.kind == "embedding"
    n_classes = max(len(bundle.manifest.classes), 1)
    label_of = torch.from_numpy(bundle.array("train/label").astype(np.int64)).to(dev)
    # Text runs: a pattern votes for the token it was trained to predict (the token after its position).
    next_token = NextTokens(bundle, dev) if labels_are_tokens(bundle) and bundle.has_position(layer) else None
    fields = ("keys", "example") + (("position",) if next_token is not None else ())
    queries = bundle.array(f"layer/{layer}/queries")
    M = queries.shape[0]
    class_abs = np.zeros((n_classes, M))
    for lo in range(0, M, query_batch):
        q = torch.from_numpy(np.array(queries[lo : lo + query_batch])).to(dev)
        q = q.long() if emb else q.float()
        acc = torch.zeros(n_classes, q.shape[0], dtype=torch.float64, device=dev)
        for block in stream_blocks(bundle, layer, fields, dev, block_rows(bundle, layer, q.shape[0])):
            k = block.tensors["keys"]
            if emb:
                a = (k[:, None] == q[None, :]).double()
            else:
                a = k @ q.T
                if spec.bias:
                    a += 1.0
                a = a.abs().double()
            ex = block.tensors["example"]
            acc.index_add_(0, label_of[ex] if next_token is None else next_token(ex, block.tensors["position"]), a)
        class_abs[:, lo : lo + q.shape[0]] = acc.cpu().numpy()
    vote = class_abs.argmax(axis=0) if M else np.zeros(0, dtype=np.int64)
    label = bundle.array("test/label")
    pred = bundle.array("test/prediction")
    vote_right = vote == label
    model_right = pred == label
    mean = lambda x: float(x.mean()) if len(x) else 0.0  # noqa: E731
    table = [[int((vote_right & model_right).sum()), int((vote_right & ~model_right).sum())],
             [int((~vote_right & model_right).sum()), int((~vote_right & ~model_right).sum())]]
    return LayerVotes(layer, M, vote, class_abs, mean(vote_right), mean(vote == pred), mean(model_right), table)
