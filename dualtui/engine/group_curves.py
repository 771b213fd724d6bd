"""The paper's figures for one item at one layer (Irie et al. 2022, Figures 1–3):

(a) the sorted top-k scores of the patterns of each (task, class) group, the main figure,
    with the training step of every pattern on those curves;
(b) (the top-k of all patterns in rank order is `rank`);
(c) Σα and Σ|α| per (task, class), as one table;
(d) per-example totals over all their patterns (the `rank --group example` scores of every
    training example), as a distribution: quantiles and a histogram.

One streaming pass over the layer keeps a running top-k per group, so a group's curve is
exact however many patterns the layer has."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..bundle.reader import Bundle
from .queryrows import ItemQueries, refocus
from .spotlight import SCORES, _tables, query_set, spotlights
from .stream import ProductGuard, block_rows, compute_dtype, pick_device, stream_blocks

QUANTILES = (0.0, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)


@dataclass
class GroupCurve:
    task: int
    cls: int
    patterns: int  # the group's patterns at the layer
    scores: np.ndarray  # [≤ top] float64, highest first
    steps: np.ndarray  # [≤ top] the training step of each
    pattern: np.ndarray  # [≤ top] the pattern index of each
    attention_sum: float  # Σα over the group's patterns
    abs_sum: float  # Σ|α|


@dataclass
class Curves:
    layer: str
    item: int
    by: str
    top: int
    groups: list[GroupCurve]  # every (task, class) with at least one pattern, by task then class
    example_quantiles: dict[float, float]  # of the per-example totals (examples with patterns)
    example_histogram: tuple[np.ndarray, np.ndarray]  # (counts [bins], edges [bins + 1])
    examples: int


def group_curves(bundle: Bundle, layer: str, item: int, *, by: str = "attention", top: int = 500, bins: int = 20,
                 queries: str | None = None, device="auto", focus: int | str | None = None) -> Curves:
    if by not in SCORES or by == "cosine":
        raise ValueError(f"curves rank by attention, magnitude or effect, not {by!r}")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    spec = bundle.layer_spec(layer)
    qs = query_set(bundle, queries)
    rows = refocus(qs.rows(layer, np.asarray([item])), focus, layer)
    iq = ItemQueries.build(rows, spec, dev, compute_dtype(bundle, layer))
    tables = _tables(bundle, dev, layer)
    n_groups = tables.n_tasks * tables.n_classes
    bias_scale = bundle.bias_scale(layer)
    bias_table = torch.from_numpy(bias_scale).to(dev) if bias_scale is not None else None
    need_pos = tables.next_token is not None
    fields = ["keys", "example", "step"] + (["values"] if by != "attention" else []) + (["position"] if need_pos else [])
    kept_score = np.zeros(0)
    kept_group = np.zeros(0, dtype=np.int64)
    kept_step = np.zeros(0, dtype=np.int64)
    kept_pattern = np.zeros(0, dtype=np.int64)
    att = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    absum = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    count = torch.zeros(n_groups, dtype=torch.float64, device=dev)
    guard = ProductGuard(bundle, layer, dev)
    for block in stream_blocks(bundle, layer, fields, dev, block_rows(bundle, layer, 1)):
        k = block.tensors["keys"]
        bt = bias_table[block.tensors["step"]] if bias_table is not None else None
        a_rows = iq.row_alpha(k, bt)
        alpha = iq.attention(a_rows)[:, 0]
        if by == "attention":
            s = alpha
        elif by == "magnitude":
            s = iq.magnitude(alpha[:, None], block.tensors["values"], k)[:, 0]
        else:
            s = iq.effect(a_rows, block.tensors["values"], k)[:, 0]
        guard.add([s, alpha])
        ex = block.tensors["example"]
        g = tables.task[ex] * tables.n_classes + tables.classes(ex, block.tensors.get("position"))
        a64 = alpha.double()
        att.index_add_(0, g, a64)
        absum.index_add_(0, g, a64.abs())
        count.index_add_(0, g, torch.ones_like(a64))
        # this block's top `top` per group, merged with the running ones
        sc = np.concatenate([kept_score, s.double().cpu().numpy()])
        gr = np.concatenate([kept_group, g.cpu().numpy()])
        st = np.concatenate([kept_step, block.tensors["step"].cpu().numpy().astype(np.int64)])
        pa = np.concatenate([kept_pattern, block.start + np.arange(len(s), dtype=np.int64)])
        order = np.lexsort((pa, -sc, gr))  # by group, score highest first, ties by lower pattern index
        gs = gr[order]
        first = np.r_[0, np.nonzero(gs[1:] != gs[:-1])[0] + 1]
        within = np.arange(len(gs)) - np.repeat(first, np.diff(np.r_[first, len(gs)]))
        keep = order[within < top]
        kept_score, kept_group, kept_step, kept_pattern = sc[keep], gr[keep], st[keep], pa[keep]
    guard.done()
    att_h, abs_h, count_h = att.cpu().numpy(), absum.cpu().numpy(), count.cpu().numpy().astype(np.int64)
    groups = []
    for gid in np.nonzero(count_h > 0)[0]:
        mine = np.nonzero(kept_group == gid)[0]
        mine = mine[np.lexsort((kept_pattern[mine], -kept_score[mine]))]
        groups.append(GroupCurve(int(gid // tables.n_classes), int(gid % tables.n_classes), int(count_h[gid]),
                                 kept_score[mine], kept_step[mine], kept_pattern[mine], float(att_h[gid]), float(abs_h[gid])))
    # (d) per-example totals: the dense example sums of one spotlight pass
    sp = spotlights(bundle, layer, [item], by=[by], groups=[], reverse=[False], top=0, summary=False, masses=False,
                    device=dev, queries=queries, dense_examples=True, focus=focus)[0]
    totals = sp.example_scores[by][np.asarray(sp.example_patterns) > 0]
    quant = {q: float(np.quantile(totals, q)) for q in QUANTILES} if len(totals) else {}
    hist = np.histogram(totals, bins=bins) if len(totals) else (np.zeros(0, dtype=np.int64), np.zeros(0))
    return Curves(layer, item, by, top, groups, quant, hist, int(len(totals)))
