"""Running top-k over a stream of score blocks, per query, without keeping the scores."""

from __future__ import annotations

import numpy as np
import torch


class RunningTopK:
    """The k largest scores seen so far in each column of a [patterns, queries] stream."""

    def __init__(self, k: int):
        self.k = k
        self.values: torch.Tensor | None = None  # [<=k, M]
        self.index: torch.Tensor | None = None  # [<=k, M] global pattern index

    def update(self, scores: torch.Tensor, start: int) -> None:
        if scores.shape[0] == 0 or self.k == 0:
            return
        v, i = scores.topk(min(self.k, scores.shape[0]), dim=0)
        i = i + start
        if self.values is not None:
            v = torch.cat([self.values, v])
            i = torch.cat([self.index, i])
            if v.shape[0] > self.k:
                v, sel = v.topk(self.k, dim=0)
                i = i.gather(0, sel)
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
    idx = np.arange(len(scores))
    order = np.lexsort((idx, scores if reverse else -scores))
    return order[:k]
