"""Running top-k over a stream of score blocks, per query, without keeping the scores."""

from __future__ import annotations

import numpy as np
import torch


def _select(v: torch.Tensor, i: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each column of `v` [n, M] (float32), with their `i` [n, M].

    `i` must ascend down each column: where equal values straddle the k-th place, the lower
    index wins. (torch.topk alone picks among equal values arbitrarily, so the chosen patterns
    would depend on how the stream was cut into blocks; embedding layers, whose α is 0 or 1,
    tie everywhere.) Output rows are in no particular order."""
    n = v.shape[0]
    if n <= k:
        return v.clone(), i
    top, rows = v.topk(k + 1, dim=0)
    rows = rows[:k]
    tie = top[k - 1] == top[k]  # [M]
    if bool(tie.any()):
        cols = tie.nonzero()[:, 0]
        # Exact lexicographic key (value, then lower row): the float's order-preserving bits
        # above, the reversed row below. +0.0 turns -0.0 into 0.0 so the two tie.
        bits = (v[:, cols].float() + 0.0).view(torch.int32)
        bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
        lower_first = torch.arange(n - 1, -1, -1, device=v.device)[:, None]
        rows[:, cols] = ((bits << 32) | lower_first).topk(k, dim=0).indices
    return v.gather(0, rows), i.gather(0, rows)


class RunningTopK:
    """The k largest scores seen so far in each column of a [patterns, queries] stream."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # [<=k, M]
        self.index: torch.Tensor | None = None  # [<=k, M] global pattern index

    def update(self, scores: torch.Tensor, start: int) -> None:
        if scores.shape[0] == 0 or self.k == 0:
            return
        i = torch.arange(start, start + scores.shape[0], device=scores.device)[:, None].expand(scores.shape)
        v, i = _select(scores, i, self.k)
        if self.values is not None:
            v = torch.cat([self.values, v])
            i = torch.cat([self.index, i])
            order = i.argsort(dim=0)  # ascending index, as _select needs for its tie-break
            v, i = _select(v.gather(0, order), i.gather(0, order), self.k)
        self.values, self.index = v, i

    def result(self, column: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, indices) of one query, best first; ties broken by the lower index."""
        if self.values is None:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        v = self.values[:, column].double().cpu().numpy()
        i = self.index[:, column].cpu().numpy()
        order = np.lexsort((i, -v))
        return v[order], i[order]


def top_of_dense(scores: np.ndarray, k: int, reverse: bool = False) -> np.ndarray:
    """Indices of the k largest (reverse: smallest) entries, ties broken by the lower index."""
    key = scores if reverse else -scores  # ascending key = best first
    n = len(key)
    if k < n // 4:
        # Partition first: only the candidates at or above the k-th value get sorted (ties kept).
        kth = np.partition(key, k - 1)[k - 1] if k > 0 else -np.inf
        cand = np.nonzero(key <= kth)[0]
    else:
        cand = np.arange(n)
    order = np.lexsort((cand, key[cand]))
    return cand[order[:k]]
