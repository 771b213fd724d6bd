"""Dense per-example scores and the partitioned top-k, against brute force."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.engine.topk import top_of_dense

SAMPLE = Path(__file__).resolve().parents[1] / "sample_runs" / "digits-multitask.safetensors"


def test_dense_example_scores_match_brute_force() -> None:
    b = Bundle.open(SAMPLE)
    L = "net.2"
    tests = [0, 7, 123]
    res = spotlights(b, L, tests, by=["effect"], groups=["pattern"], top=3, summary=False, masses=False,
                     dense_examples=True, device="cpu")
    K = b.array(f"layer/{L}/keys").astype(np.float64)
    V = b.array(f"layer/{L}/values").astype(np.float64)
    ex = b.array(f"layer/{L}/example")
    for r, m in zip(res, tests):
        q = b.array(f"queries/test/layer/{L}/query")[m].astype(np.float64)  # an MLP: one row per item
        g = b.array(f"queries/test/layer/{L}/grad")[m].astype(np.float64)
        alpha = K @ q + 1.0
        brute = {"attention": alpha, "magnitude": np.abs(alpha) * np.linalg.norm(V, axis=1), "effect": alpha * (V @ g)}
        for score, per_pattern in brute.items():
            dense = np.zeros(b.train_size)
            np.add.at(dense, ex, per_pattern)
            scale = np.zeros(b.train_size)
            np.add.at(scale, ex, np.abs(per_pattern))
            assert np.all(np.abs(r.example_scores[score] - dense) <= 1e-5 * (scale + 1e-12))
        assert np.array_equal(r.example_patterns, np.bincount(ex, minlength=b.train_size))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=60), st.integers(0, 70), st.booleans())
def test_partitioned_top_k_equals_full_sort(values: list[int], k: int, reverse: bool) -> None:
    scores = np.array(values, dtype=np.float64)  # small integers: plenty of ties
    idx = np.arange(len(scores))
    full = np.lexsort((idx, scores if reverse else -scores))[:k]
    assert np.array_equal(top_of_dense(scores, k, reverse), full)
