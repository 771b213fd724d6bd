"""The sorted score curve (engine/curve.py) against a brute force: every pattern's score from
the float64 matrices of tests/bruteforce_v1.py, sorted with numpy, read at the same ranks."""

from __future__ import annotations

import numpy as np
import pytest

from bruteforce_v1 import N_TEST, SCORES, Brute, make, write

from dualtui.bundle import Bundle
from dualtui.engine.curve import rank_points, sorted_curve
from dualtui.engine.spotlight import spotlights

CONFIGS = [("mlp", "float32", "chunked"), ("lm", "bfloat16", "sharded"), ("text", "float16", "single")]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: "-".join(c))
def built(request, tmp_path_factory):
    vb = make(*request.param, seed=7)
    path = write(vb, tmp_path_factory.mktemp("curve") / "run.safetensors", request.param[2])
    return Bundle.open(path), Brute.from_valid(vb)


def _check(curve, brute_scores: np.ndarray, scale: np.ndarray) -> None:
    desc = np.sort(brute_scores)[::-1]
    assert curve.total == len(desc)
    assert curve.ranks[0] == 1 and curve.ranks[-1] == len(desc)
    assert np.all(np.diff(curve.ranks) > 0)
    # float32 pass: each value within the float32 error of the terms it sums (the brute force's scale)
    tol = 1e-5 * np.max(scale) + 1e-12
    np.testing.assert_allclose(curve.values, desc[curve.ranks - 1], rtol=0, atol=tol)


@pytest.mark.parametrize("points", [3, 200])
def test_pattern_and_example_curves_match_brute_force(built, points) -> None:
    bundle, bf = built
    tests = list(range(N_TEST))
    for L in bundle.manifest.layer_names:
        groups = bf.groups(L)
        res = spotlights(bundle, L, tests, top=5, groups=groups, curve=points, device="cpu")
        lay = bf.layers[L]
        sums, scales, count = bf.example_sums(L)
        seen = count > 0
        for j, spot in enumerate(res):
            for s in SCORES:
                _check(spot.curves[(s, "pattern")], lay.scores()[s][:, j], lay.scales()[s][:, j])
                _check(spot.curves[(s, "example")], sums[s][seen, j], scales[s][seen, j])
                if "position" in groups:
                    psums, pscales, pcount = bf.position_sums(L)
                    _check(spot.curves[(s, "position")], psums[s][pcount > 0, j], pscales[s][pcount > 0, j])


def test_rank_points_cover_head_and_tail() -> None:
    assert rank_points(0).tolist() == []
    assert rank_points(5, 200).tolist() == [1, 2, 3, 4, 5]  # few: every rank
    r = rank_points(1_000_000, 200)
    assert r[0] == 1 and r[-1] == 1_000_000 and len(r) <= 400
    assert {1, 2, 3, 4, 5} <= set(r.tolist())  # the head, log-spaced
    assert np.max(np.diff(r)) <= 1_000_000 / 199 + 1  # the tail, evenly spaced


def test_sorted_curve_is_exact_order_statistics() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(10_000)
    c = sorted_curve(x, 50)
    np.testing.assert_array_equal(c.values, np.sort(x)[::-1][c.ranks - 1])


def test_curves_left_out_beyond_the_memory_cap(built, monkeypatch) -> None:
    import dualtui.engine.spotlight as spot

    bundle, bf = built
    L = bundle.manifest.layer_names[0]
    monkeypatch.setattr(spot, "MAX_CURVE_ENTRIES", 1)
    res = spotlights(bundle, L, [0], top=5, groups=("pattern", "example"), curve=10, device="cpu")[0]
    assert ("effect", "pattern") not in res.curves and ("effect", "example") in res.curves
