"""Scores of a block of patterns against items with one or many query rows (docs/format.md §6).

An item has rows r (positions, calls) at a layer, each with a query q_r and gradient g_r:
    α_{t,r}   = k_t · q_r (+1 with a bias; [k_t == q_r] for an embedding)
    attention = α at the item's focus row (or the mean over its rows, focus −1)
    effect    = Σ_r α_{t,r} (v_t · g_r)
With one row per item (a classifier's head, version-1 bundles) this is the plain
attention / effect, and the fast path below does no extra work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.manifest import LayerSpec
from ..bundle.queries import QueryRows


def refocus(rows: QueryRows, focus: int | str | None, layer: str) -> QueryRows:
    """The same rows with another focus: a position (of each item's last call), "mean", or
    None (keep the stored focus)."""
    if focus is None:
        return rows
    M = len(rows.focus)
    if focus == "mean":
        new = np.full(M, -1, dtype=np.int64)
    elif isinstance(focus, (int, np.integer)) and not isinstance(focus, bool):
        new = np.full(M, -1, dtype=np.int64)
        for m in range(M):
            mine = np.nonzero(rows.item == m)[0]
            if not len(mine):
                continue
            last = mine[rows.call[mine] == rows.call[mine].max()]
            p = int(focus) if focus >= 0 else int(rows.position[last].max()) + 1 + int(focus)
            hit = last[rows.position[last] == p]
            if not len(hit):
                raise ValueError(f"layer {layer!r}: item has no query row at position {focus} "
                                 f"(positions {int(rows.position[last].min())}..{int(rows.position[last].max())})")
            new[m] = int(hit[0])
    else:
        raise ValueError(f"focus must be a position, 'mean' or None, not {focus!r}")
    return QueryRows(rows.query, rows.grad, rows.item, rows.position, rows.call, new)


@dataclass
class ItemQueries:
    """The query rows of a batch of M items on the compute device."""

    M: int
    emb: bool
    bias: bool
    q: torch.Tensor  # [R, in] float32, or [R] int64 token ids
    g: torch.Tensor  # [R, out] float32
    item: torch.Tensor  # [R] int64 in 0..M-1
    focus: torch.Tensor  # [M] int64 row index or -1
    single: bool  # one row per item and focus == identity: the plain one-query case
    has_focus: torch.Tensor  # [M] bool
    count: torch.Tensor  # [M] float32 rows per item (for the mean)
    elementwise: bool = False  # a norm's gain and bias: contributions v ⊙ (k ⊙ q + 1), not α v
    qf: torch.Tensor | None = None  # [M, C] each item's focus query (the mean of its rows for −1)

    @classmethod
    def build(cls, rows: QueryRows, spec: LayerSpec, device: torch.device,
              dtype: torch.dtype = torch.float32) -> "ItemQueries":
        """`dtype`: the keys' compute dtype (float64 for a float64 bundle)."""
        M = len(rows.focus)
        emb = spec.kind == "embedding"
        q = torch.from_numpy(np.ascontiguousarray(rows.query)).to(device)
        q = q.long() if emb else q.to(dtype)
        g = torch.from_numpy(np.ascontiguousarray(rows.grad)).to(device=device, dtype=dtype)
        item = torch.from_numpy(np.ascontiguousarray(rows.item, dtype=np.int64)).to(device)
        focus = torch.from_numpy(np.ascontiguousarray(rows.focus, dtype=np.int64)).to(device)
        single = len(rows.item) == M and bool(np.array_equal(rows.focus, np.arange(M))) and bool(np.array_equal(rows.item, np.arange(M)))
        count = torch.from_numpy(np.bincount(rows.item, minlength=M)).to(device=device, dtype=dtype)
        iq = cls(M, emb, spec.bias, q, g, item, focus, single, focus >= 0, count)
        if spec.kind == "elementwise":
            iq.elementwise = True
        if not emb:
            # Each item's focus query (the mean of its rows for focus −1): attention is linear in
            # it, so the cosine score divides by its norm.
            mean = torch.zeros(M, q.shape[1], dtype=dtype, device=device).index_add_(0, item, q) / count.clamp(min=1.0)[:, None]
            iq.qf = torch.where(iq.has_focus[:, None], q[focus.clamp(min=0)] if len(q) else mean, mean)
        return iq

    def cosine(self, alpha: torch.Tensor, k: torch.Tensor, bias_term: torch.Tensor | None = None) -> torch.Tensor:
        """[n, M]: attention normalised by both norms, α / (‖k̃‖ ‖q̃‖), with k̃ = (k, b) and q̃ = (q, 1)
        when the layer has a bias (b = 1, or the pattern's bias_scale): how alike the training
        and test inputs are, whatever their size (1 for an exact copy). 0 where a norm is 0. An
        embedding's keys and queries are one-hot: its cosine is its attention."""
        if self.emb:
            return alpha
        # vector_norm is one fused pass; (k * k).sum(1) materialises the block again (~7x slower here)
        k2 = torch.linalg.vector_norm(k, dim=1) ** 2
        q2 = torch.linalg.vector_norm(self.qf, dim=1) ** 2
        if self.bias and not self.elementwise:
            k2 = k2 + (bias_term.to(k2.dtype) ** 2 if bias_term is not None else 1.0)
            q2 = q2 + 1.0
        denom = torch.sqrt(k2)[:, None] * torch.sqrt(q2)[None, :]
        return torch.where(denom > 0, alpha / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(alpha))

    def row_alpha(self, k: torch.Tensor, bias_term: torch.Tensor | None = None) -> torch.Tensor:
        """α_{t,r} for a block of keys: [n, R]. The bias is the weight of a constant input 1, or
        of bias_term [n] (layer/<L>/bias_scale at each pattern's step) when it has its own chain.
        Elementwise layers: α = k·q, the similarity of the normalised rows (no bias term)."""
        if self.emb:
            return (k[:, None] == self.q[None, :]).to(self.g.dtype)
        a = k @ self.q.T
        if self.elementwise:
            return a
        if bias_term is not None:
            a += bias_term.to(a.dtype)[:, None]
        elif self.bias:
            a += 1.0
        return a

    def attention(self, a_rows: torch.Tensor) -> torch.Tensor:
        """[n, M]: α at each item's focus row (the mean over its rows for focus −1)."""
        if self.single:
            return a_rows
        n = a_rows.shape[0]
        out = a_rows[:, self.focus.clamp(min=0)]
        if not bool(self.has_focus.all()):
            mean = torch.zeros(n, self.M, dtype=a_rows.dtype, device=a_rows.device).index_add_(1, self.item, a_rows)
            mean = mean / self.count.clamp(min=1.0)
            out = torch.where(self.has_focus[None, :], out, mean)
        return out

    def magnitude(self, alpha: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[n, M]: the size of each pattern's contribution to the output at the focus row."""
        if not self.elementwise:
            return alpha.abs() * torch.linalg.vector_norm(v, dim=1)[:, None]
        # ‖v ⊙ (k ⊙ q + b)‖² = Σ v²k² q² + 2b Σ v²k q + b Σ v²   (b = 1 with a bias)
        b = 1.0 if self.bias else 0.0
        v2 = v * v
        sq = (v2 * k * k) @ (self.qf * self.qf).T
        if b:
            sq = sq + 2.0 * ((v2 * k) @ self.qf.T) + v2.sum(1)[:, None]
        return sq.clamp(min=0).sqrt()

    def learned(self, alpha: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """[M, out] float64: the block's part of Σ_t (contribution of t) at each item's focus row."""
        if not self.elementwise:
            return alpha.T.double() @ v.double()
        out = self.qf.double() * (v * k).double().sum(0)[None, :]
        if self.bias:
            out = out + v.double().sum(0)[None, :]
        return out

    def effect(self, a_rows: torch.Tensor, v: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """[n, M]: Σ over each item's rows of α_{t,r} (v_t · g_r); for an elementwise layer the
        contribution's first-order effect Σ_r g_r · v_t ⊙ (k_t ⊙ q_r + b)."""
        if self.elementwise:
            e_rows = (v * k) @ (self.g * self.q).T
            if self.bias:
                e_rows = e_rows + v @ self.g.T
        else:
            e_rows = a_rows * (v @ self.g.T)
        if self.single:
            return e_rows
        return torch.zeros(e_rows.shape[0], self.M, dtype=e_rows.dtype, device=e_rows.device).index_add_(1, self.item, e_rows)


def item_rows(rows: QueryRows, j: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The rows of item j: (queries, grads, index of the focus among them or -1)."""
    mine = np.nonzero(rows.item == j)[0]
    f = int(rows.focus[j])
    local = int(np.nonzero(mine == f)[0][0]) if f >= 0 else -1
    return rows.query[mine], rows.grad[mine], local


def exact_scores(spec: LayerSpec, keys: np.ndarray, values: np.ndarray, q: np.ndarray, g: np.ndarray,
                 focus: int, bias_term: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """float64 scores of a few patterns (keys, values) for one item's rows (q [r, ...], g [r, out]);
    bias_term [n]: each pattern's bias_scale (default 1 with a bias)."""
    values = values.astype(np.float64)
    if spec.kind == "elementwise":
        return _exact_elementwise(spec, keys.astype(np.float64), values, np.asarray(q, dtype=np.float64),
                                  np.asarray(g, dtype=np.float64), focus)
    if spec.kind == "embedding":
        a_rows = (keys[:, None] == np.asarray(q)[None, :]).astype(np.float64)
    else:
        a_rows = keys.astype(np.float64) @ np.asarray(q, dtype=np.float64).T
        if bias_term is not None:
            a_rows += np.asarray(bias_term, dtype=np.float64)[:, None]
        elif spec.bias:
            a_rows += 1.0
    if a_rows.shape[1] == 0:
        alpha = np.zeros(len(keys))
    elif focus >= 0:
        alpha = a_rows[:, focus]
    else:
        alpha = a_rows.mean(axis=1)
    effect = (a_rows * (values @ np.asarray(g, dtype=np.float64).T)).sum(axis=1)
    if spec.kind == "embedding":
        cosine = alpha
    else:
        q64 = np.asarray(q, dtype=np.float64)
        qf = q64[focus] if focus >= 0 else (q64.mean(axis=0) if len(q64) else np.zeros(keys.shape[1]))
        k2 = (keys.astype(np.float64) ** 2).sum(axis=1)
        q2 = float((qf * qf).sum())
        if spec.bias:
            k2 = k2 + (np.asarray(bias_term, dtype=np.float64) ** 2 if bias_term is not None else 1.0)
            q2 += 1.0
        denom = np.sqrt(k2) * np.sqrt(q2)
        cosine = np.where(denom > 0, alpha / np.where(denom > 0, denom, 1.0), 0.0)
    return {"attention": alpha, "magnitude": np.abs(alpha) * np.linalg.norm(values, axis=1), "effect": effect,
            "cosine": cosine}


def _exact_elementwise(spec: LayerSpec, k: np.ndarray, v: np.ndarray, q: np.ndarray, g: np.ndarray, focus: int) -> dict:
    b = 1.0 if spec.bias else 0.0
    qf = q[focus] if focus >= 0 else (q.mean(axis=0) if len(q) else np.zeros(k.shape[1]))
    contrib = v * (k * qf[None, :] + b)  # [n, C] at the focus row
    effect = sum(((v * (k * q[r][None, :] + b)) @ g[r]) for r in range(len(q))) if len(q) else np.zeros(len(k))
    alpha = k @ qf
    denom = np.linalg.norm(k, axis=1) * np.linalg.norm(qf)
    cosine = np.where(denom > 0, alpha / np.where(denom > 0, denom, 1.0), 0.0)
    return {"attention": alpha, "magnitude": np.linalg.norm(contrib, axis=1), "effect": np.asarray(effect, dtype=np.float64),
            "cosine": cosine}


def focus_outputs(spec: LayerSpec, weight: np.ndarray, bias: np.ndarray | None, rows: QueryRows) -> np.ndarray:
    """[M, out] float64: the layer's output at each item's focus (mean over rows for −1), for
    a weight/bias pair (primal: trained; initial: w0, b0)."""
    M = len(rows.focus)
    if spec.kind == "embedding":
        per_row = weight[np.asarray(rows.query, dtype=np.int64)]
    elif spec.kind == "elementwise":  # y = γ ⊙ x̂ + β
        per_row = np.asarray(rows.query, dtype=np.float64) * weight[None, :]
        if bias is not None:
            per_row = per_row + bias
    else:
        per_row = np.asarray(rows.query, dtype=np.float64) @ weight.T
        if bias is not None:
            per_row = per_row + bias
    out = np.zeros((M, weight.shape[0] if spec.kind != "embedding" else weight.shape[1]))
    has = rows.focus >= 0
    out[has] = per_row[rows.focus[has]]
    if not has.all():
        sums = np.zeros_like(out)
        np.add.at(sums, rows.item, per_row)
        count = np.maximum(np.bincount(rows.item, minlength=M), 1)[:, None]
        out[~has] = (sums / count)[~has]
    return out


def learned_change_effect(spec: LayerSpec, change: np.ndarray, bias_change: np.ndarray | None, rows: QueryRows) -> np.ndarray:
    """[M] float64: Σ_r g_r · ((W − w0) q_r + (b − b0)) for each item, from the weights alone:
    the first-order change of the target logit that everything learned at this layer made. In an
    exact bundle the patterns' effects add up to it; in an approximate one the difference is the
    effect no pattern is attributed (the residual's)."""
    M = len(rows.focus)
    g = np.asarray(rows.grad, dtype=np.float64)
    if spec.kind == "embedding":
        per_row = change[np.asarray(rows.query, dtype=np.int64)]
    elif spec.kind == "elementwise":  # y = γ ⊙ x̂ + β
        per_row = np.asarray(rows.query, dtype=np.float64) * change[None, :]
    else:
        per_row = np.asarray(rows.query, dtype=np.float64) @ change.T
    if bias_change is not None:
        per_row = per_row + bias_change
    return np.bincount(rows.item, weights=(per_row * g).sum(1), minlength=M)
