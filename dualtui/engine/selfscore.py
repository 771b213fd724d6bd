"""Self-scores: for a query set drawn from the training data, how much of each example's own
target logit comes from its own patterns (docs/format.md §6, `effect`).

For an item that is training example e, with query rows q_r and target-logit gradients g_r:
    self effect = Σ_{t: example(t) = e} Σ_r α_{t,r} (v_t · g_r)
    learned     = Σ_r g_r · ((W − w0) q_r + (b − b0))   (= Σ_t of every pattern's effect)
    others      = learned − self effect: what the rest of the training set did to that logit
    self share  = self effect ÷ learned
At the last layer g_r is the one-hot of the target class, so the self effect is exactly the
part of the example's target logit its own training steps wrote there: a mislabelled or
memorised example is one the network can only fit with its own patterns, and one whose label
the rest of the data argues against (others < 0: every other example's patterns together
lowered the logit of its label). At earlier layers these are first-order.

Only the patterns of the set's own examples are scored, each against its own item's rows:
one pass over the layer, O(patterns × rows × in), whatever the set's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.reader import Bundle
from .queryrows import learned_change_effect
from .stream import ProductGuard, block_rows, compute_dtype, pick_device, stream_blocks

CHUNK = 4096  # patterns scored at once: CHUNK × rows × in floats of gathered queries


@dataclass
class SelfScores:
    layer: str
    queries: str
    example: np.ndarray  # [M] the training example each item is
    label: np.ndarray  # [M] the item's (training) label
    target: np.ndarray  # [M] the class whose logit the scores are about
    prediction: np.ndarray  # [M]
    self_effect: np.ndarray  # [M] float64
    learned: np.ndarray  # [M] float64: every pattern's effect together
    patterns: np.ndarray  # [M] int64: the example's patterns at the layer

    @property
    def others(self) -> np.ndarray:
        """[M]: the effect of every other example's patterns (exact at the last layer)."""
        return self.learned - self.self_effect

    @property
    def self_share(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.learned != 0, self.self_effect / np.where(self.learned != 0, self.learned, 1.0), np.nan)


def self_scores(bundle: Bundle, layer: str, queries: str, device: str | torch.device = "auto") -> SelfScores:
    """Every item's self effect at `layer` (a linear or convolution-free layer: keys are inputs)."""
    from .spotlight import query_set

    qs = query_set(bundle, queries)
    spec = bundle.layer_spec(layer)
    if spec.kind != "linear":
        raise ValueError(f"self-scores are for linear layers (the read-out above all); layer {layer!r} is {spec.kind}")
    if not qs.has("example"):
        raise ValueError(f"query set {qs.name!r} is not drawn from the training data (it stores no `example` per item): "
                         "record one with --train-queries N, or Recorder.record_test(..., examples=ids)")
    M = qs.size
    example = qs.array("example").astype(np.int64)
    n_train = bundle.train_size
    if M and (example.min() < 0 or example.max() >= n_train or len(np.unique(example)) != M):
        raise ValueError(f"query set {qs.name!r}: its `example` ids must be distinct training examples in 0..{n_train - 1}")
    rows = qs.rows(layer, np.arange(M))
    per_item = np.bincount(rows.item, minlength=M)
    R = int(per_item[0]) if M else 1
    if M and not (per_item == R).all():
        raise ValueError(f"layer {layer!r}: items of query set {qs.name!r} have different numbers of query rows")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    dt = compute_dtype(bundle, layer)
    Q = torch.from_numpy(np.ascontiguousarray(rows.query, dtype=np.float32)).to(dev, dt).reshape(M, R, -1)
    G = torch.from_numpy(np.ascontiguousarray(rows.grad, dtype=np.float32)).to(dev, dt).reshape(M, R, -1)
    item_of = torch.full((n_train,), -1, dtype=torch.int64, device=dev)
    item_of[torch.from_numpy(example).to(dev)] = torch.arange(M, device=dev)
    bias_scale = bundle.bias_scale(layer)
    bias_table = torch.from_numpy(bias_scale).to(dev, dt) if bias_scale is not None else None
    fields = ["keys", "values", "example"] + (["step"] if bias_table is not None else [])
    own = torch.zeros(M, dtype=torch.float64, device=dev)
    count = torch.zeros(M, dtype=torch.float64, device=dev)
    guard = ProductGuard(bundle, layer, dev)
    for block in stream_blocks(bundle, layer, fields, dev, block_rows(bundle, layer, 1)):
        m = item_of[block.tensors["example"]]
        sel = torch.nonzero(m >= 0).flatten()
        for lo in range(0, len(sel), CHUNK):
            s = sel[lo : lo + CHUNK]
            mi = m[s]
            k, v = block.tensors["keys"][s].to(dt), block.tensors["values"][s].to(dt)
            alpha = torch.einsum("nri,ni->nr", Q[mi], k)  # [n, R]
            if spec.bias:
                alpha = alpha + (bias_table[block.tensors["step"][s]][:, None] if bias_table is not None else 1.0)
            effect = (alpha * torch.einsum("nro,no->nr", G[mi], v)).sum(1)
            guard.add([effect])
            own.index_add_(0, mi, effect.double())
            count.index_add_(0, mi, torch.ones(len(s), dtype=torch.float64, device=dev))
    guard.done()
    w = bundle.array(f"layer/{layer}/weight").astype(np.float64)
    w0 = bundle.array(f"layer/{layer}/w0").astype(np.float64)
    bias_change = (bundle.array(f"layer/{layer}/bias").astype(np.float64) - bundle.array(f"layer/{layer}/b0").astype(np.float64)
                   if spec.bias else None)
    learned = learned_change_effect(spec, w - w0, bias_change, rows)
    return SelfScores(layer, qs.name, example, qs.label, qs.target, qs.prediction, own.cpu().numpy(), learned,
                      count.cpu().numpy().astype(np.int64))
