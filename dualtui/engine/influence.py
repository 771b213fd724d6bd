"""The reverse spotlight: from one training example, the items of a query set it contributes
to most (and least), per layer, by the same scores as a spotlight.

An example has few patterns (one per time it was seen, times positions in a sequence run), so
this is the example's patterns against every query row of the set: one scan of the layer's
example ids to find them, then a small product per batch of items, in float64. The score of
example E for item m is exactly the per-example score of `rank --group example` for m:
the sum over E's patterns of attention, magnitude and effect, and the mean of their cosines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.reader import Bundle
from .queryrows import ItemQueries
from .spotlight import SCORES

ITEM_BATCH = 256  # items whose query rows are scored at once


@dataclass
class Influence:
    layer: str
    example: int
    queries: str
    patterns: np.ndarray  # global indices of the example's patterns at this layer
    scores: dict[str, np.ndarray]  # score -> [items] float64, summed over the example's patterns

    def ranked(self, by: str, reverse: bool, top: int) -> list[int]:
        """Item indices, highest (or with reverse, lowest) `by` first; ties by item index."""
        s = self.scores[by]
        order = np.lexsort((np.arange(len(s)), s if reverse else -s))
        return [int(i) for i in order[:top]]


def example_patterns(bundle: Bundle, layer: str, example: int) -> dict[str, np.ndarray]:
    """The patterns of one training example at a layer: their global indices, keys, values and
    steps (one pass over the layer's example ids, chunk by chunk)."""
    names = {f: bundle.pattern_names(layer, f) for f in ("keys", "values", "step", "example")}
    found: dict[str, list[np.ndarray]] = {"index": [], "keys": [], "values": [], "step": []}
    for c, (start, stop) in enumerate(bundle.chunk_bounds(layer)):
        ex = np.asarray(bundle.raw(names["example"][c]))
        step = np.asarray(bundle.raw(names["step"][c]))
        bundle.check_ids(layer, f"layer {layer!r} patterns {start}..{stop - 1}", ex, step)
        sel = np.nonzero(ex == example)[0]
        bundle.release(names["example"][c], 0, stop - start)
        bundle.release(names["step"][c], 0, stop - start)
        if not len(sel):
            continue
        found["index"].append(start + sel)
        found["keys"].append(bundle.take(names["keys"][c], sel))
        found["values"].append(bundle.take(names["values"][c], sel))
        found["step"].append(step[sel].astype(np.int64))
    spec = bundle.layer_spec(layer)
    empty = {"index": np.zeros(0, np.int64), "keys": np.zeros((0,) if spec.kind == "embedding" else (0, spec.in_features)),
             "values": np.zeros((0, spec.out_features)), "step": np.zeros(0, np.int64)}
    return {f: np.concatenate(v) if v else empty[f] for f, v in found.items()}


def influence(bundle: Bundle, layer: str, example: int, queries: str | None = None,
              device: torch.device | str = "cpu") -> Influence:
    """Every item's scores from training example `example` at `layer` (see the module doc)."""
    from ..bundle import errors

    n_train = bundle.train_size
    if not 0 <= example < n_train:
        raise IndexError(f"training example {example} out of range: the bundle has {n_train} (0..{n_train - 1})")
    spec = bundle.layer_spec(layer)
    qs = bundle.queries(queries)
    dev = torch.device(device)
    pats = example_patterns(bundle, layer, example)
    emb = spec.kind == "embedding"
    k = torch.from_numpy(pats["keys"].astype(np.int64 if emb else np.float64)).to(dev)
    v = torch.from_numpy(pats["values"].astype(np.float64)).to(dev)
    bias_scale = bundle.bias_scale(layer)
    bias_term = torch.from_numpy(bias_scale[pats["step"]]).to(dev) if bias_scale is not None else None
    M = qs.size
    scores = {s: np.zeros(M) for s in SCORES}
    if len(pats["index"]):
        for lo in range(0, M, ITEM_BATCH):
            items = np.arange(lo, min(M, lo + ITEM_BATCH))
            iq = ItemQueries.build(qs.rows(layer, items), spec, dev, torch.float64)
            a_rows = iq.row_alpha(k, bias_term)
            alpha = iq.attention(a_rows)
            per = {"attention": alpha, "magnitude": iq.magnitude(alpha, v, k), "effect": iq.effect(a_rows, v, k),
                   "cosine": iq.cosine(alpha, k, bias_term)}
            for s, t in per.items():
                scores[s][lo : lo + len(items)] = t.sum(0).cpu().numpy()
        scores["cosine"] /= len(pats["index"])  # the mean over the example's patterns, as `rank --group example`
    for s, a in scores.items():
        if not np.isfinite(a).all():
            raise errors.NonFinite(bundle.path, f"layer {layer!r}: example {example}'s {s} scores are not finite "
                                                "(its keys or values, or the queries, hold NaN/Inf or overflow)")
    return Influence(layer, example, qs.name, pats["index"], scores)
