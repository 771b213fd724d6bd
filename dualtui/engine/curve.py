"""The sorted score curve of a ranking: score against rank over everything ranked (the
paper's main plot), sampled at a few hundred ranks so a million patterns cost a few KB.

The ranks are the union of log-spaced and evenly spaced points: the curve reads on a log rank
axis (the head) and on a linear one (the tail) alike. Every sampled value is exact: the score
at that rank of the full sort (in the pass's compute precision), not an interpolation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_POINTS = 200  # of each spacing: at most 2 × this many ranks per curve
# Scores kept for the sort during a pass (patterns × items × scores): beyond this the pattern
# curves are left out (the example curves come from the dense example sums and always fit).
MAX_CURVE_ENTRIES = 64 << 20


@dataclass
class Curve:
    ranks: np.ndarray  # int64, 1-based, increasing
    values: np.ndarray  # float64: the score at each rank, highest first
    total: int  # how many patterns (or examples, tokens) were ranked


def rank_points(n: int, points: int = DEFAULT_POINTS) -> np.ndarray:
    """1-based ranks to sample in a sort of n: log-spaced ∪ evenly spaced, always 1 and n."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    if n <= 2 * points:
        return np.arange(1, n + 1, dtype=np.int64)
    r = np.concatenate([np.geomspace(1, n, points), np.linspace(1, n, points)])
    return np.unique(np.clip(np.rint(r), 1, n).astype(np.int64))


def sorted_curve(scores: torch.Tensor | np.ndarray, points: int = DEFAULT_POINTS) -> Curve:
    """Curve of one item's scores (any device): sorted highest first, sampled at rank_points."""
    t = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.asarray(scores))
    t = t.reshape(-1)
    n = int(t.numel())
    ranks = rank_points(n, points)
    if not n:
        return Curve(ranks, np.zeros(0), 0)
    if t.device.type == "cpu":
        # numpy's sort (vectorised) is ~12x torch.sort on CPU for 1M float32 (11 ms vs 134 ms,
        # benchmarks/README.md, curves); ascending, so rank r is element n - r.
        asc = np.sort(t.numpy())
        return Curve(ranks, asc[n - ranks].astype(np.float64), n)
    desc = torch.sort(t, descending=True).values
    picked = desc[torch.from_numpy(ranks - 1).to(desc.device)]
    return Curve(ranks, picked.double().cpu().numpy(), n)
