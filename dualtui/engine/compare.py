"""Two query items side by side at one layer: the training examples each leans on most, how
much those sets overlap, how alike the two whole rankings are, and each item's mass by task
and by class ("why was this 8 called a 9 when that 8 was not").

Everything is per training example, from the dense per-example sums of one spotlight pass
over both items (`spotlights(..., dense_examples=True)`): the examples' scores are exactly
those of `rank --group example`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..bundle.reader import Bundle
from .spotlight import SCORES, Spotlight, spotlights


@dataclass
class Comparison:
    layer: str
    by: str
    top: int
    items: tuple[int, int]
    queries: str
    tops: tuple[list[int], list[int]]  # each item's top-`top` examples by `by`, highest first
    shared: list[int]  # examples in both tops, in the first item's order
    jaccard: float  # |A ∩ B| / |A ∪ B| of the two tops
    spearman: float  # rank correlation of the two items' `by` over every example seen at the layer (nan: constant)
    examples: int  # how many examples that correlation is over
    scores: tuple[np.ndarray, np.ndarray]  # every example's `by` for each item (float64, [train examples])
    task_share: tuple[np.ndarray, np.ndarray]  # share of Σ|α| per task
    class_share: tuple[np.ndarray, np.ndarray]  # share of Σ|α| per training class


def ranks_with_ties(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (as Spearman's ρ needs)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]  # where each run of equal values starts, in sorted order
    starts = np.nonzero(new)[0]
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]  # one pass: a million examples, no Python loop
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ: the Pearson correlation of the tie-averaged ranks (nan when one is constant)."""
    if len(a) < 2:
        return float("nan")
    ra, rb = ranks_with_ties(a), ranks_with_ties(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def top_examples(scores: np.ndarray, seen: np.ndarray, top: int) -> list[int]:
    """The `top` seen examples with the highest score, ties by lower index."""
    idx = np.nonzero(seen)[0]
    order = np.lexsort((idx, -scores[idx]))
    return [int(i) for i in idx[order[:top]]]


def compare_spotlights(a: Spotlight, b: Spotlight, by: str, top: int, queries: str = "test") -> Comparison:
    """Compare two spotlights of one layer, both computed with dense_examples=True and masses."""
    if by not in SCORES:
        raise ValueError(f"unknown score {by!r}; choose from {', '.join(SCORES)}")
    if a.example_scores is None or b.example_scores is None or a.masses is None or b.masses is None:
        raise ValueError("comparing needs spotlights computed with dense_examples=True and masses=True")
    if a.layer != b.layer:
        raise ValueError(f"the two spotlights are of different layers ({a.layer!r}, {b.layer!r})")
    seen = np.asarray(a.example_patterns) > 0  # examples with a pattern at this layer (the same for both items)
    sa, sb = a.example_scores[by], b.example_scores[by]
    ta, tb = top_examples(sa, seen, top), top_examples(sb, seen, top)
    in_b = set(tb)
    shared = [e for e in ta if e in in_b]
    union = len(set(ta) | in_b)

    def share(x: np.ndarray, total: float) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) / total if total > 0 else np.zeros(len(x))

    return Comparison(
        layer=a.layer, by=by, top=top, items=(a.test, b.test), queries=queries, tops=(ta, tb), shared=shared,
        jaccard=len(shared) / union if union else float("nan"), spearman=spearman(sa[seen], sb[seen]), examples=int(seen.sum()),
        scores=(sa, sb),
        task_share=(share(a.masses.task_abs_sum, a.masses.abs_total), share(b.masses.task_abs_sum, b.masses.abs_total)),
        class_share=(share(a.masses.class_abs_sum, a.masses.abs_total), share(b.masses.class_abs_sum, b.masses.abs_total)),
    )


def compare(bundle: Bundle, layer: str, first: int, second: int, by: str = "effect", top: int = 10,
            queries: str | None = None, device: str = "auto") -> Comparison:
    """One spotlight pass over both items at `layer`, then compare_spotlights."""
    if top < 1:
        raise ValueError(f"--top must be at least 1, got {top}")
    # No ranking is asked for (groups=()): the dense per-example sums and the masses are all it reads.
    a, b = spotlights(bundle, layer, [first, second], top=1, by=(by,), groups=(), summary=False, masses=True,
                      dense_examples=True, device=device, queries=queries)
    return compare_spotlights(a, b, by, top, bundle.queries(queries).name)
