"""Two runs on the same data side by side (the pseudo-kernel question: how the scale of the
initial weights, or the curriculum, shapes what a network learns): per layer, each run's
initial-weight vs learned share, effective number of attended patterns and mass by task and
class, and how alike the two runs' rankings of the training examples are for the same test
items (top-k Jaccard, Spearman's ρ over the examples both runs trained on at that layer).

Every number is the mean over the compared items of what `layers`, `mass` and `rank --group
example` report for each item in each run."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..bundle.reader import Bundle
from .compare import spearman, top_examples
from .spotlight import SCORES, spotlights


class RunsDiffer(ValueError):
    """The two runs are not on the same data (one line: what differs)."""


@dataclass
class RunSide:
    initial_share: float
    learned_share: float
    effective_patterns: float
    top10_share: float
    task_share: list[float]
    class_share: list[float]
    # the share of Σ|α| on each item's own task (continual vs multitask: does a prediction
    # draw on its own task's training data?), the mean over items; None with one task
    own_task_share: float | None = None


@dataclass
class LayerRuns:
    layer: str
    items: int
    by: str
    top: int
    a: RunSide
    b: RunSide
    jaccard: float  # mean over items of |A ∩ B| / |A ∪ B| of the two runs' top-k examples
    spearman: float  # mean over items of ρ over the examples both runs have patterns of (nan: none defined)
    examples: int  # how many examples that is
    per_item: list[dict] = field(default_factory=list)  # {"item", "jaccard", "spearman"}


def check_same_data(a: Bundle, b: Bundle, queries: str) -> None:
    """Refuse runs whose training data or query items differ: their rankings would not be
    about the same examples and items."""
    if a.train_size != b.train_size:
        raise RunsDiffer(f"the runs have {a.train_size} and {b.train_size} training examples: compare runs on the same data")
    if not np.array_equal(a.array("train/label"), b.array("train/label")):
        raise RunsDiffer("the runs' training labels differ: compare runs on the same data (same examples, same order)")
    qa, qb = a.queries(queries), b.queries(queries)
    if qa.size != qb.size or not np.array_equal(qa.label, qb.label):
        raise RunsDiffer(f"query set {queries!r} differs between the runs ({qa.size} vs {qb.size} items or other labels): "
                         "compare runs with the same test items")
    if a.manifest.tasks != b.manifest.tasks or len(a.manifest.classes) != len(b.manifest.classes):
        raise RunsDiffer("the runs name different tasks or classes: compare runs of one setting's data "
                         "(multitask vs continual share them)")


def _side(spots: list, n_tasks: int, n_classes: int, item_task: np.ndarray) -> RunSide:
    def mean(f) -> float:
        return float(np.mean([f(s) for s in spots])) if spots else 0.0

    def share(kind: str, n: int) -> list[float]:
        rows = [getattr(s.masses, f"{kind}_abs_sum")[:n] / max(s.masses.abs_total, 1e-300) for s in spots]
        return [float(x) for x in np.mean(rows, axis=0)] if rows else [0.0] * n

    own = None
    if n_tasks > 1 and spots:
        own = float(np.mean([s.masses.task_abs_sum[t] / max(s.masses.abs_total, 1e-300) if 0 <= t < n_tasks else 0.0
                             for s, t in zip(spots, item_task)]))
    return RunSide(mean(lambda s: s.summary.initial_share), mean(lambda s: s.summary.learned_share),
                   mean(lambda s: s.summary.effective_patterns), mean(lambda s: s.summary.top10_share),
                   share("task", n_tasks), share("class", n_classes), own)


def compare_runs(a: Bundle, b: Bundle, layers: list[str], items: list[int], *, by: str = "effect", top: int = 10,
                 queries: str = "test", device="auto") -> list[LayerRuns]:
    if by not in SCORES:
        raise ValueError(f"unknown score {by!r}; choose from {', '.join(SCORES)}")
    check_same_data(a, b, queries)
    out = []
    n_tasks, n_classes = max(len(a.manifest.tasks), 1), max(len(a.manifest.classes), 1)
    for L in layers:
        kw = dict(by=[by], groups=[], reverse=[False], top=top, summary=True, masses=True, dense_examples=True,
                  device=device, queries=queries)
        sa, sb = spotlights(a, L, items, **kw), spotlights(b, L, items, **kw)
        both = (np.asarray(sa[0].example_patterns) > 0) & (np.asarray(sb[0].example_patterns) > 0)
        per_item = []
        for m, x, y in zip(items, sa, sb):
            ta = top_examples(x.example_scores[by], both, top)
            tb = top_examples(y.example_scores[by], both, top)
            union = len(set(ta) | set(tb))
            per_item.append({"item": int(m), "jaccard": len(set(ta) & set(tb)) / union if union else float("nan"),
                             "spearman": spearman(x.example_scores[by][both], y.example_scores[by][both])})
        rho = np.array([p["spearman"] for p in per_item], dtype=np.float64)
        jac = np.array([p["jaccard"] for p in per_item], dtype=np.float64)
        item_task = a.queries(queries).task[np.asarray(items, dtype=np.int64)]
        out.append(LayerRuns(L, len(items), by, top, _side(sa, n_tasks, n_classes, item_task),
                             _side(sb, n_tasks, n_classes, item_task),
                             float(np.nanmean(jac)) if np.isfinite(jac).any() else float("nan"),
                             float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"),
                             int(both.sum()), per_item))
    return out
