"""Layer flow (the layerwise-interactions question: what knowledge newly emerges and what is
forgotten from layer to layer): for each item, the top-k training examples at every layer
(the ranking of `rank --group example`), and from each layer to the next which examples enter
the top-k, which leave it and which stay; over a query set, how much of each layer's top-k is
new vs carried over from the layer below."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle.reader import Bundle
from .spotlight import SCORES, spotlights


@dataclass
class Step:
    """From layer `below` to layer `above` (the next in the model's order)."""

    below: str
    above: str
    entered: list[list[int]]  # per item: examples in above's top-k, not in below's (above's order)
    left: list[list[int]]  # per item: examples in below's top-k, not in above's (below's order)
    kept: list[list[int]]  # per item: in both (above's order)

    def new_share(self, top: int) -> np.ndarray:
        """[items]: the share of above's top-k that is new (not in below's)."""
        return np.array([len(e) / max(len(e) + len(k), 1) for e, k in zip(self.entered, self.kept)], dtype=np.float64)


@dataclass
class Flow:
    items: list[int]
    layers: list[str]
    by: str
    top: int
    tops: dict[str, list[list[int]]]  # layer -> per item: its top-k examples, highest first
    steps: list[Step]


def layer_flow(bundle: Bundle, items: list[int], *, layers: list[str] | None = None, by: str = "effect", top: int = 10,
               queries: str | None = None, device="auto") -> Flow:
    if by not in SCORES:
        raise ValueError(f"unknown score {by!r}; choose from {', '.join(SCORES)}")
    layers = layers or bundle.manifest.layer_names
    if len(layers) < 2:
        raise ValueError("layer flow needs at least two layers")
    key = (by, "example", False)
    tops: dict[str, list[list[int]]] = {}
    for L in layers:
        res = spotlights(bundle, L, items, by=[by], groups=["example"], reverse=[False], top=top, summary=False,
                         masses=False, device=device, queries=queries)
        tops[L] = [[r.example for r in sp.ranked[key]] for sp in res]
    steps = []
    for below, above in zip(layers, layers[1:]):
        entered, left, kept = [], [], []
        for lo, hi in zip(tops[below], tops[above]):
            s_lo, s_hi = set(lo), set(hi)
            entered.append([e for e in hi if e not in s_lo])
            left.append([e for e in lo if e not in s_hi])
            kept.append([e for e in hi if e in s_lo])
        steps.append(Step(below, above, entered, left, kept))
    return Flow(list(items), list(layers), by, top, tops, steps)
