"""Spotlights of attention: scores of every training pattern for test queries, in one pass.

For an item m of a query set at layer L (docs/format.md section 6), with query rows q_r, g_r:
    attention  α_t = k_t · q_f (+1 with a bias; [k_t == q_f] for an embedding), f the focus row
    magnitude  |α_t| · ‖v_t‖
    effect     Σ_r α_{t,r} (v_t · g_r) over all the item's rows
    cosine     α_t / (‖k̃_t‖ ‖q̃_f‖), attention normalised (k̃ = (k, 1), q̃ = (q, 1) with a bias)
One streaming pass over the layer's chunks keeps running top-k at both ends, sums per
training example, masses per task / class / step bin, and the per-layer summary. Nothing of
size patterns × queries is ever materialised beyond one block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from ..bundle.queries import QueryRows
from ..bundle.reader import Bundle
from .queryrows import ItemQueries, exact_scores, focus_outputs, item_rows, learned_change_effect, refocus
from .curve import MAX_CURVE_ENTRIES, Curve, sorted_curve
from .stream import block_rows, ProductGuard, compute_dtype, gather_rows, pick_device, stream_blocks
from .text import NextTokens, labels_are_tokens, next_tokens, position_span
from .tied import partner_learned
from .topk import RunningTopK, top_of_dense

SCORES = ("attention", "magnitude", "effect", "cosine")
GROUPS = ("pattern", "example", "position")
# "position" (text runs): one row per training token, i.e. per (example, position) pair,
# summing the patterns of that token over the epochs that revisited it.
DEFAULT_STEP_BINS = 20
# Queries scored together in one pass: as many as keep the float64 [examples, queries]
# accumulators (three scores) within ACCUMULATOR_BYTES, and at most QUERY_BATCH.
QUERY_BATCH = 1024
ACCUMULATOR_BYTES = 256 << 20


class Cancelled(Exception):
    """Raised inside a pass when its `cancel()` callback says the result is no longer wanted."""


@dataclass
class Ranked:
    rank: int
    score: float
    attention: float
    magnitude: float
    effect: float
    example: int
    task: int
    label: int  # the example's label; in text runs, the token the position was trained to predict
    pattern: int | None = None  # index t (pattern grouping)
    step: int | None = None
    position: int | None = None
    patterns: int | None = None  # how many patterns were summed (example / position grouping)
    cosine: float | None = None  # α / (‖k̃‖ ‖q̃‖); per example or token: the mean over its patterns

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class Masses:
    """Σα, Σ|α| and Σeffect over the patterns of each task, class and step bin."""

    task_attention_sum: np.ndarray
    task_abs_sum: np.ndarray
    task_effect_sum: np.ndarray
    class_attention_sum: np.ndarray
    class_abs_sum: np.ndarray
    class_effect_sum: np.ndarray
    step_edges: np.ndarray  # [bins + 1]: bin b holds steps [edges[b], edges[b+1])
    step_attention_sum: np.ndarray
    step_abs_sum: np.ndarray
    step_effect_sum: np.ndarray
    # Approximate bundles: Σ_r g_r · (R q_r), the effect of the residual R = W_T − w0 − Σ v kᵀ on
    # the target logit, which no task, class or step holds (None in an exact bundle, where it is
    # rounding). With it, the Σeffect columns add up to what the layer learned.
    unattributed_effect: float | None = None

    @property
    def abs_total(self) -> float:
        return float(self.task_abs_sum.sum())


@dataclass
class LayerSummary:
    layer: str
    patterns: int
    initial_norm: float  # ‖w0 q + b0‖
    learned_norm: float  # ‖Σ α_t v_t‖
    initial_share: float  # initial_norm / (initial_norm + learned_norm)
    learned_share: float
    effective_patterns: float  # (Σ|α|)² / Σα²
    top10_share: float  # share of Σ|α| held by the 10 largest |α|
    top100_share: float
    primal_dual_error: float  # max |(W q + b) − (w0 q + b0 + Σ α v)|
    abs_sum: float  # Σ|α|
    # ‖(W q + b) − (w0 q + b0 + Σ α v)‖: the part of the output no pattern explains; rounding in
    # an exact bundle, the approximation's residual in an approximate one (docs/format.md dual_form)
    residual_norm: float = 0.0
    residual_share: float = 0.0  # residual_norm / ‖(W − w0) q + (b − b0)‖, the learned output term


@dataclass
class Spotlight:
    test: int
    layer: str
    summary: LayerSummary | None = None
    masses: Masses | None = None
    ranked: dict[tuple[str, str, bool], list[Ranked]] = field(default_factory=dict)  # (by, group, reverse)
    # With dense_examples=True: every training example's summed score, {score: [N]} (float64),
    # and how many patterns each example has at this layer.
    example_scores: dict[str, np.ndarray] | None = None
    example_patterns: np.ndarray | None = None
    # With curve=n: the sorted score curve per (by, group) over everything that group ranks
    # (engine/curve.py); a pattern curve is absent when its scores would not fit in memory.
    curves: dict[tuple[str, str], Curve] = field(default_factory=dict)


@dataclass
class _Tables:
    """Per-training-example lookups, on the compute device."""

    task: torch.Tensor
    label: torch.Tensor
    n_tasks: int
    n_classes: int
    next_token: NextTokens | None = None  # text runs: a pattern's class is the token after it

    def classes(self, example: torch.Tensor, position: torch.Tensor | None) -> torch.Tensor:
        if self.next_token is not None and position is not None:
            return self.next_token(example, position)
        return self.label[example]


def _tables(bundle: Bundle, device: torch.device, layer: str | None = None) -> _Tables:
    task = torch.from_numpy(bundle.array("train/task").astype(np.int64)).to(device)
    label = torch.from_numpy(bundle.array("train/label").astype(np.int64)).to(device)
    m = bundle.manifest
    text = layer is not None and labels_are_tokens(bundle) and bundle.has_position(layer)
    return _Tables(task, label, max(len(m.tasks), 1), max(len(m.classes), 1), NextTokens(bundle, device) if text else None)


def total_steps(bundle: Bundle, layer: str) -> int:
    """Steps of training, for binning (the manifest's count, or the last recorded step + 1)."""
    last = 0
    bounds = bundle.chunk_bounds(layer)
    names = bundle.pattern_names(layer, "step")
    for c in range(len(bounds) - 1, -1, -1):
        raw = bundle.raw(names[c])
        if raw.shape[0]:
            last = int(raw[-1]) + 1
            break
    declared = bundle.manifest.training.get("steps")
    return max(last, int(declared) if isinstance(declared, int) else 0, 1)


def query_set(bundle: Bundle, queries: str | None):
    """The named query set (default: "test"), or a ValueError naming the valid ones."""
    try:
        return bundle.queries(queries)
    except KeyError:
        names = bundle.query_set_names
        if not names:
            raise ValueError("the bundle has no query sets (record_test was never called)") from None
        raise ValueError(f"unknown query set {queries!r}; valid: {', '.join(names)}") from None


def check_tests(bundle: Bundle, tests: Iterable[int], queries: str | None = None) -> list[int]:
    tests = [int(t) for t in tests]
    qs = query_set(bundle, queries)
    n = qs.size
    for t in tests:
        if not 0 <= t < n:
            raise IndexError(f"item {t} out of range: query set {qs.name!r} has {n} items (0..{n - 1})")
    return tests


def spotlights(
    bundle: Bundle,
    layer: str,
    tests: Sequence[int],
    *,
    top: int = 10,
    by: Sequence[str] = SCORES,
    groups: Sequence[str] | None = None,
    reverse: Sequence[bool] = (False, True),
    summary: bool = True,
    masses: bool = True,
    step_bins: int = DEFAULT_STEP_BINS,
    device: str | torch.device = "auto",
    rows: int | None = None,
    dense_examples: bool = False,
    cancel: Callable[[], bool] | None = None,
    queries: str | None = None,
    focus: int | str | None = None,
    curve: int = 0,
) -> list[Spotlight]:
    """Score every pattern of `layer` for each item `tests` of the query set `queries`
    (default "test"), in one pass per batch of items. Returns one Spotlight per item, with the
    requested rankings (and, with dense_examples=True, every training example's summed scores
    as arrays). `focus`: rank attention at another position of each item (or "mean" over its
    rows) instead of the stored focus row. `cancel` is polled between blocks; when it returns
    True the pass stops with `Cancelled` (the TUI uses it to drop a computation the user has
    moved on from). `curve=n`: also each ranking's sorted score curve, sampled at about 2n
    ranks (Spotlight.curves)."""
    tests = check_tests(bundle, tests, queries)
    qs = query_set(bundle, queries)
    if groups is None:  # every grouping the layer supports ("position" needs positions: text runs)
        # (training tokens of a text run; a convolution's positions are places on an image, and a
        # pattern per example and place is already one pattern per epoch)
        text_positions = bundle.has_position(layer) and bundle.manifest.input.get("kind") == "text"
        groups = GROUPS if text_positions else tuple(g for g in GROUPS if g != "position")
    dev = device if isinstance(device, torch.device) else pick_device(device)
    for b in by:
        if b not in SCORES:
            raise ValueError(f"unknown score {b!r}; choose from {', '.join(SCORES)}")
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown grouping {g!r}; choose from {', '.join(GROUPS)}")
    if "position" in groups and not bundle.has_position(layer):
        raise ValueError(f"grouping by position needs a text run: layer {layer!r} has no layer/{layer}/position")
    out: list[Spotlight] = []
    slots = max(bundle.train_size, 1) * (1 + (position_span(bundle) if "position" in groups else 0))
    per_batch = max(1, min(QUERY_BATCH, ACCUMULATOR_BYTES // (len(SCORES) * 8 * slots)))
    # Items with many rows (all positions of a sequence) widen the score blocks: fewer per batch.
    per_batch = max(1, min(per_batch, int(QUERY_BATCH / max(qs.rows_per_item(layer), 1.0))))
    for lo in range(0, len(tests), per_batch):
        out.extend(_spotlight_batch(bundle, layer, qs, tests[lo : lo + per_batch], top, tuple(by), tuple(groups),
                                    tuple(reverse), summary, masses, step_bins, dev, rows, dense_examples, cancel, focus,
                                    curve))
    return out


def _spotlight_batch(bundle: Bundle, layer: str, qs, tests: list[int], top: int, by: tuple[str, ...],
                     groups: tuple[str, ...], reverse: tuple[bool, ...], want_summary: bool, want_masses: bool,
                     step_bins: int, dev: torch.device, rows: int | None, dense_examples: bool = False,
                     cancel: Callable[[], bool] | None = None, focus: int | str | None = None,
                     curve: int = 0) -> list[Spotlight]:
    spec = bundle.layer_spec(layer)
    M = len(tests)
    qrows = refocus(qs.rows(layer, np.asarray(tests)), focus, layer)
    iq = ItemQueries.build(qrows, spec, dev, compute_dtype(bundle, layer))
    by_example = "example" in groups or dense_examples
    by_position = "position" in groups
    need_values = want_summary or want_masses or by_example or by_position or any(b not in ("attention", "cosine") for b in by)
    # The cosine needs each key's norm (one more read of the block): only when it is ranked by,
    # or shown for examples and tokens; a pattern's cosine in a ranking is re-scored exactly.
    want_cosine = "cosine" in by or by_example or by_position
    need_example = want_masses or by_example or by_position
    bias_scale = bundle.bias_scale(layer)
    bias_table = torch.from_numpy(bias_scale).to(dev) if bias_scale is not None else None
    tables = _tables(bundle, dev, layer) if need_example else None
    need_position = by_position or (want_masses and tables.next_token is not None)
    fields = (["keys"] + (["values"] if need_values else []) + (["example"] if need_example else [])
              + (["step"] if want_masses or bias_table is not None else []) + (["position"] if need_position else []))
    n_train = bundle.train_size
    steps_total = total_steps(bundle, layer) if want_masses else 1
    f64 = torch.float64

    pattern_topk = {(b, r): RunningTopK(top) for b in by for r in reverse} if "pattern" in groups else {}
    abs_top = RunningTopK(100) if want_summary else None
    ex_sums = {s: torch.zeros(n_train, M, dtype=f64, device=dev) for s in SCORES} if by_example else {}
    ex_count = torch.zeros(n_train, dtype=f64, device=dev) if by_example else None
    span = position_span(bundle) if by_position else 1
    pos_sums = {s: torch.zeros(n_train * span, M, dtype=f64, device=dev) for s in SCORES} if by_position else {}
    pos_count = torch.zeros(n_train * span, dtype=f64, device=dev) if by_position else None
    if want_masses:
        nt, nc = tables.n_tasks, tables.n_classes
        mass = {(kind, s): torch.zeros(n, M, dtype=f64, device=dev)
                for kind, n in (("task", nt), ("class", nc), ("step", step_bins)) for s in ("attention", "abs", "effect")}
    abs_sum = torch.zeros(M, dtype=f64, device=dev)
    sq_sum = torch.zeros(M, dtype=f64, device=dev)
    learned = torch.zeros(M, spec.out_features, dtype=f64, device=dev)

    # Every pattern's score of each item, kept for the sorted curve (float32 unless computed in
    # float64: the curve shows 4 significant digits).
    keep = curve > 0 and "pattern" in groups and spec.patterns * M * len(by) <= MAX_CURVE_ENTRIES
    kept = {b: torch.empty(spec.patterns, M, dtype=compute_dtype(bundle, layer), device=dev) for b in by} if keep else {}
    guard = ProductGuard(bundle, layer, dev)
    for block in stream_blocks(bundle, layer, fields, dev, rows or block_rows(bundle, layer, max(M, len(qrows)))):
        if cancel is not None and cancel():
            raise Cancelled()
        k = block.tensors["keys"]
        bt = bias_table[block.tensors["step"]] if bias_table is not None else None
        a_rows = iq.row_alpha(k, bt)  # [n, R]
        alpha = iq.attention(a_rows)  # [n, M]
        scores: dict[str, torch.Tensor] = {"attention": alpha}
        if need_values:
            v = block.tensors["values"]
            scores["magnitude"] = iq.magnitude(alpha, v, k)
            scores["effect"] = iq.effect(a_rows, v, k)
            learned += iq.learned(alpha, v, k)
        if want_cosine:
            scores["cosine"] = iq.cosine(alpha, k, bt)
        guard.add(scores.values())  # NaN/Inf in keys or values shows here
        for b, buf in kept.items():
            buf[block.start : block.start + k.shape[0]] = scores[b]
        for (b, r), acc in pattern_topk.items():
            acc.update(-scores[b] if r else scores[b], block.start)
        a64 = alpha.double()
        abs64 = a64.abs()
        if want_summary:
            abs_sum += abs64.sum(0)
            sq_sum += (a64 * a64).sum(0)
            abs_top.update(alpha.abs(), block.start)
        if need_example:
            ex = block.tensors["example"]
        pos = block.tensors.get("position")
        if by_example:
            for s in SCORES:
                ex_sums[s].index_add_(0, ex, scores[s].double())
            ex_count.index_add_(0, ex, torch.ones(ex.shape[0], dtype=f64, device=dev))
        if by_position:
            if pos.numel() and int(pos.max()) >= span:
                raise ValueError(f"layer {layer!r}: position {int(pos.max())} is outside the {span}-token context of the manifest")
            slot = ex * span + pos
            for s in SCORES:
                pos_sums[s].index_add_(0, slot, scores[s].double())
            pos_count.index_add_(0, slot, torch.ones(slot.shape[0], dtype=f64, device=dev))
        if want_masses:
            eff64 = scores["effect"].double()
            bins = (block.tensors["step"] * step_bins // steps_total).clamp_(0, step_bins - 1)
            for kind, ids in (("task", tables.task[ex]), ("class", tables.classes(ex, pos)), ("step", bins)):
                mass[(kind, "attention")].index_add_(0, ids, a64)
                mass[(kind, "abs")].index_add_(0, ids, abs64)
                mass[(kind, "effect")].index_add_(0, ids, eff64)
    guard.done()  # before any number leaves: a block whose scores are not finite is refused

    results = [Spotlight(test=t, layer=layer) for t in tests]
    if want_summary:
        _fill_summaries(bundle, layer, results, qrows, learned.cpu().numpy(), abs_sum.cpu().numpy(), sq_sum.cpu().numpy(), abs_top)
    if want_masses:
        edges = np.array([(b * steps_total + step_bins - 1) // step_bins for b in range(step_bins + 1)], dtype=np.int64)
        host = {key: t.cpu().numpy() for key, t in mass.items()}
        unattributed = (_learned_change_effects(bundle, layer, qrows) - host[("task", "effect")].sum(0)
                        if bundle.manifest.approximate else None)
        for j, res in enumerate(results):
            res.masses = Masses(
                host[("task", "attention")][:, j], host[("task", "abs")][:, j], host[("task", "effect")][:, j],
                host[("class", "attention")][:, j], host[("class", "abs")][:, j], host[("class", "effect")][:, j],
                edges, host[("step", "attention")][:, j], host[("step", "abs")][:, j], host[("step", "effect")][:, j],
                None if unattributed is None else float(unattributed[j]),
            )
    if pattern_topk:
        _fill_pattern_ranks(bundle, layer, results, pattern_topk, qrows)
    for b, buf in kept.items():
        for j, res in enumerate(results):
            res.curves[(b, "pattern")] = sorted_curve(buf[:, j], curve)
    if by_example:
        sums = {s: t.cpu().numpy() for s, t in ex_sums.items()}
        count = ex_count.cpu().numpy()
        sums["cosine"] = sums["cosine"] / np.maximum(count, 1.0)[:, None]  # a mean, not a sum: 1 for copies
        if "example" in groups:
            _fill_slot_ranks(bundle, results, "example", sums, count, 1, by, reverse, top)
            if curve:
                _fill_slot_curves(results, "example", sums, count, by, curve)
        if dense_examples:
            for j, res in enumerate(results):
                res.example_scores = {s: sums[s][:, j].copy() for s in SCORES}
                res.example_patterns = count
    if by_position:
        sums = {s: t.cpu().numpy() for s, t in pos_sums.items()}
        pcount = pos_count.cpu().numpy()
        sums["cosine"] = sums["cosine"] / np.maximum(pcount, 1.0)[:, None]
        _fill_slot_ranks(bundle, results, "position", sums, pcount, span, by, reverse, top)
        if curve:
            _fill_slot_curves(results, "position", sums, pcount, by, curve)
    return results


def _fill_slot_curves(results: list[Spotlight], group: str, sums: dict[str, np.ndarray], count: np.ndarray,
                      by: tuple[str, ...], points: int) -> None:
    seen = np.nonzero(count > 0)[0]  # the slots the ranking ranks (never-trained ones have no score)
    for j, res in enumerate(results):
        for b in by:
            res.curves[(b, group)] = sorted_curve(sums[b][seen, j], points)


def _fill_summaries(bundle: Bundle, layer: str, results: list[Spotlight], qrows: QueryRows, learned: np.ndarray,
                    abs_sum: np.ndarray, sq_sum: np.ndarray, abs_top: RunningTopK) -> None:
    """Initial vs learned terms of the layer's output at each item's focus row."""
    spec = bundle.layer_spec(layer)
    w = bundle.array(f"layer/{layer}/weight").astype(np.float64)
    w0 = bundle.array(f"layer/{layer}/w0").astype(np.float64)
    bias = bundle.array(f"layer/{layer}/bias").astype(np.float64) if spec.bias else None
    b0 = bundle.array(f"layer/{layer}/b0").astype(np.float64) if spec.bias else None
    primal = focus_outputs(spec, w, bias, qrows)
    initial = focus_outputs(spec, w0, b0, qrows)
    tied = partner_learned(bundle, layer)
    if tied is not None:  # the other use's patterns are part of what was learned here
        learned = learned + focus_outputs(spec, tied[0], None, qrows)
    for j, res in enumerate(results):
        init_norm = float(np.linalg.norm(initial[j]))
        learn_norm = float(np.linalg.norm(learned[j]))
        total = init_norm + learn_norm
        top_abs, _ = abs_top.result(j)
        a = float(abs_sum[j])
        res.summary = LayerSummary(
            layer=layer,
            patterns=spec.patterns,
            initial_norm=init_norm,
            learned_norm=learn_norm,
            initial_share=init_norm / total if total else 0.0,
            learned_share=learn_norm / total if total else 0.0,
            effective_patterns=(a * a / float(sq_sum[j])) if sq_sum[j] > 0 else 0.0,
            top10_share=float(top_abs[:10].sum() / a) if a > 0 else 0.0,
            top100_share=float(top_abs[:100].sum() / a) if a > 0 else 0.0,
            primal_dual_error=float(np.abs(primal[j] - (initial[j] + learned[j])).max(initial=0.0)),
            abs_sum=a,
            residual_norm=float(np.linalg.norm(primal[j] - initial[j] - learned[j])),
        )
        change = float(np.linalg.norm(primal[j] - initial[j]))
        res.summary.residual_share = res.summary.residual_norm / change if change > 0 else 0.0


def _learned_change_effects(bundle: Bundle, layer: str, qrows: QueryRows) -> np.ndarray:
    spec = bundle.layer_spec(layer)
    change = bundle.array(f"layer/{layer}/weight").astype(np.float64) - bundle.array(f"layer/{layer}/w0").astype(np.float64)
    bias_change = (bundle.array(f"layer/{layer}/bias").astype(np.float64) - bundle.array(f"layer/{layer}/b0").astype(np.float64)
                   if spec.bias else None)
    return learned_change_effect(spec, change, bias_change, qrows)


def pattern_scores(bundle: Bundle, layer: str, patterns: np.ndarray, q: np.ndarray, g: np.ndarray,
                   focus: int = 0) -> dict[str, np.ndarray]:
    """Exact (float64) scores of a few patterns for one item's query rows (q [r, in] or [r] ids,
    g [r, out], `focus` the row attention is ranked at, −1: the mean), read by random access.
    A single query (q [in] or a scalar id, g [out]) is one row."""
    spec = bundle.layer_spec(layer)
    q = np.asarray(q)
    g = np.asarray(g)
    if g.ndim == 1:  # a single query row
        g = g[None]
        q = q.reshape(1) if spec.kind == "embedding" else q.reshape(1, -1)
    keys = gather_rows(bundle, layer, "keys", patterns)
    values = gather_rows(bundle, layer, "values", patterns)
    bs = bundle.bias_scale(layer)
    bias_term = bs[gather_rows(bundle, layer, "step", patterns)] if bs is not None else None
    return exact_scores(spec, keys, values, q, g, focus, bias_term)


def item_pattern_scores(bundle: Bundle, layer: str, patterns: np.ndarray, qrows: QueryRows, j: int) -> dict[str, np.ndarray]:
    """Exact scores of a few patterns for item j of `qrows` (all its rows)."""
    q, g, f = item_rows(qrows, j)
    return pattern_scores(bundle, layer, patterns, q, g, f)


def _fill_pattern_ranks(bundle: Bundle, layer: str, results: list[Spotlight], accs: dict, qrows: QueryRows) -> None:
    train_task = bundle.array("train/task")
    train_label = bundle.array("train/label")
    with_position = bundle.has_position(layer)
    text = with_position and labels_are_tokens(bundle)
    for j, res in enumerate(results):
        for (b, r), acc in accs.items():
            _, idx = acc.result(j)
            if not len(idx):
                res.ranked[(b, "pattern", r)] = []
                continue
            sc = item_pattern_scores(bundle, layer, idx, qrows, j)
            step = gather_rows(bundle, layer, "step", idx)
            example = gather_rows(bundle, layer, "example", idx)
            position = gather_rows(bundle, layer, "position", idx) if with_position else None
            # Re-sort on the exact float64 scores (the pass ranked in float32).
            order = np.lexsort((idx, sc[b] if r else -sc[b]))
            label = next_tokens(bundle, example, position) if text else train_label[example]
            res.ranked[(b, "pattern", r)] = [
                Ranked(rank=n + 1, score=float(sc[b][i]), attention=float(sc["attention"][i]), magnitude=float(sc["magnitude"][i]),
                       effect=float(sc["effect"][i]), example=int(example[i]), task=int(train_task[example[i]]),
                       label=int(label[i]), pattern=int(idx[i]), step=int(step[i]),
                       position=None if position is None else int(position[i]), cosine=float(sc["cosine"][i]))
                for n, i in enumerate(order)
            ]


def _fill_slot_ranks(bundle: Bundle, results: list[Spotlight], group: str, sums: dict[str, np.ndarray], count: np.ndarray,
                     span: int, by: tuple[str, ...], reverse: tuple[bool, ...], top: int) -> None:
    """Rank dense per-slot sums. "example": slot e is training example e (span 1). "position":
    slot e·span + p is the training token at position p of example e (its label is the token
    it was trained to predict in language-model runs)."""
    train_task = bundle.array("train/task")
    train_label = bundle.array("train/label")
    tokens = group == "position"
    next_token_labels = tokens and labels_are_tokens(bundle)
    seen = np.nonzero(count > 0)[0]  # slots never trained on have no patterns to rank
    for j, res in enumerate(results):
        for b in by:
            for r in reverse:
                chosen = seen[top_of_dense(sums[b][seen, j], top, reverse=r)]
                example, position = chosen // span, chosen % span
                label = next_tokens(bundle, example, position) if next_token_labels else train_label[example]
                res.ranked[(b, group, r)] = [
                    Ranked(rank=n + 1, score=float(sums[b][s, j]), attention=float(sums["attention"][s, j]),
                           magnitude=float(sums["magnitude"][s, j]), effect=float(sums["effect"][s, j]), example=int(example[n]),
                           task=int(train_task[example[n]]), label=int(label[n]),
                           position=int(position[n]) if tokens else None, patterns=int(count[s]),
                           cosine=float(sums["cosine"][s, j]))
                    for n, s in enumerate(chosen)
                ]
