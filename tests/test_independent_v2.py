"""dualtui against an independent reading of bundle format version 2 (tests/independent_v2.py,
written from docs/format.md alone, numpy only).

- bundles written by the independent writer pass the independent checker in every layout
  (single file, chunked per-pattern tensors, sharded set) and storage dtype, and dualtui opens,
  validates and verifies them;
- dualtui's spotlights (every score, pattern and example grouping, both ends) and masses match
  the float64 brute force of section 6 for every item of every query set at every layer: items
  with several positions, a layer run twice per item, a layer that does not run for some items
  (focus -1, scores 0), sets read by "mean"/"custom" (focus -1: the mean over the rows) and a
  set that stores only some rows;
- corrupted bundles are rejected by the independent checker and by dualtui.

Tolerances: scores are compared against the float64 brute force within rel·(the absolute scale
of the summed terms), rel = 1e-5 for float32 storage. For float16/bfloat16 storage the stored
keys/values are exact in float32, but an engine may round the float32 query or grad to the
storage dtype before multiplying: one rounded factor per product in α (u) and one more in
v·g for the effect, so rel = 1e-5 + 2·2.05·u (u = 2⁻¹¹ for F16, 2⁻⁸ for BF16, 2.05 as in the
spec's own rounding bound). Ranks are compared where the brute force's score at a rank is not
tied (within max(1e-9 relative, that tolerance)) with another candidate's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import independent_v2 as iv2
from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.engine.verify import verify_bundle

FAMILIES = ("text", "lm", "vector")
LAYOUTS = ("single", "chunked", "sharded")
ALL = [(f, s, l) for f in FAMILIES for s in iv2.STORAGES for l in LAYOUTS]
SPOT = [("text", "F32", "single"), ("text", "F16", "chunked"), ("text", "BF16", "sharded"),
        ("lm", "F32", "chunked"), ("lm", "BF16", "single"), ("lm", "F16", "sharded"),
        ("vector", "F32", "sharded"), ("vector", "BF16", "chunked")]
ids = lambda c: "-".join(c)  # noqa: E731


def score_rel(storage: str) -> float:
    return 1e-5 if storage == "F32" else 1e-5 + 2 * 2.05 * iv2.UNIT_ROUNDOFF[storage]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}

    def get(cfg: tuple[str, str, str], rounding: str = "exact"):
        key = cfg + (rounding,)
        if key not in cache:
            fam, st, lay = cfg
            vb = iv2.make_valid_bundle_v2(sum(map(ord, "-".join(key))), storage=st, family=fam, rounding=rounding)
            path = vb.write(tmp_path_factory.mktemp("-".join(key)) / "run.safetensors", lay)
            cache[key] = (vb, path)
        return cache[key]

    return get


# ----------------------------------------------------------------------------- the generator
def test_generator_has_what_the_tests_need(built) -> None:
    vb, _ = built(("text", "F32", "single"))
    sets = vb.info["sets"]
    test = sets["test"]
    assert max(test["tok.emb"]["rows_per_item"]) > 1  # several positions per item
    assert test["mix"]["calls"] == 2 and min(n for n in test["mix"]["rows_per_item"]) >= 2  # several calls
    assert 0 in test["gate.expert"]["rows_per_item"] and -1 in test["gate.expert"]["focus"]  # an item without rows
    assert all(f == -1 for L in vb.info["layers"] for f in sets["mean.read"][L]["focus"])  # mean read-out
    assert all(f >= 0 for f in test["head"]["focus"])
    m = {s["name"]: s for s in vb.manifest["query_sets"]}
    assert m["train_sub"]["partial_layers"] and m["test"]["partial_layers"] == []
    for S in sets:
        for L in vb.info["layers"]:
            item = vb.tensors[f"queries/{S}/layer/{L}/item"].data
            assert np.all(np.diff(item) >= 0)


# ----------------------------------------------------------------------------- validity
@pytest.mark.parametrize("cfg", ALL, ids=ids)
def test_valid_bundles_pass_both_readings(built, cfg) -> None:
    _, path = built(cfg)
    report = iv2.check_invariants(path)
    for L, r in report["layers"].items():
        assert r["weight_error"] <= r["tolerance"]
    b = Bundle.open(path)
    b.validate_contents()
    v = verify_bundle(b)
    assert v.ok, v


@pytest.mark.parametrize("cfg", [(f, s, "single") for f in FAMILIES for s in ("F16", "BF16")], ids=ids)
def test_rounded_storage_within_the_spec_bound(built, cfg) -> None:
    """Weight from the unrounded patterns (as a recorder's): only the spec's rounding bound
    reconciles it with the stored F16/BF16 keys and values."""
    _, path = built(cfg, "realistic")
    report = iv2.check_invariants(path)
    assert any(r["weight_error"] > 1e-4 for r in report["layers"].values())  # really off by rounding
    b = Bundle.open(path)
    b.validate_contents()
    v = verify_bundle(b)
    assert v.ok, v


# ----------------------------------------------------------------------------- spotlights
def check_ranked(rows, cand: np.ndarray, want: dict, scale: dict, by: str, rev: bool, top: int, rel: float,
                 kind: str, what: str, pattern_example: np.ndarray | None = None) -> dict:
    """`rows` (dualtui) against the brute force over candidates `cand` (pattern or example ids);
    returns the largest relative errors seen (for the report)."""
    n = min(top, len(cand))
    assert len(rows) == n, f"{what}: {len(rows)} rows, expected {n}"
    assert [r.rank for r in rows] == list(range(1, n + 1)), f"{what}: ranks"
    got_ids = [r.pattern if kind == "pattern" else r.example for r in rows]
    where = {int(c): j for j, c in enumerate(cand)}
    unknown = [i for i in got_ids if i not in where]
    assert not unknown, f"{what}: {kind}s {unknown} are not candidates (an example needs a pattern at the layer)"
    assert len(set(got_ids)) == n, f"{what}: repeated {kind}s {got_ids}"
    pos = np.array([where[i] for i in got_ids], dtype=np.int64)
    tol = {k: rel * scale[k] + 1e-12 for k in iv2.SCORES}
    worst = {}
    for k in iv2.SCORES:
        got = np.array([getattr(r, k) for r in rows], dtype=np.float64)
        err = np.abs(got - want[k][pos])
        bad = np.nonzero(~(err <= tol[k][pos]))[0]
        assert not len(bad), (f"{what}: {k} of {kind}s {[got_ids[j] for j in bad[:4]]}: dualtui {got[bad][:4]}, "
                              f"brute force {want[k][pos][bad][:4]} (±{tol[k][pos][bad][:4]})")
        worst[k] = float((err / (scale[k][pos] + 1e-300)).max(initial=0.0))
    for r in rows:
        assert math.isclose(r.score, getattr(r, by), rel_tol=1e-12, abs_tol=1e-15), f"{what}: score is not the {by}"
        if kind == "pattern":
            assert r.pattern is not None
        else:
            assert r.pattern is None, f"{what}: example row has pattern {r.pattern}"
    if pattern_example is not None:
        assert [r.example for r in rows] == pattern_example[pos].tolist(), f"{what}: examples of the patterns"
    own = [r.score for r in rows]
    assert own == sorted(own, reverse=not rev), f"{what}: not sorted {'ascending' if rev else 'descending'}"
    s = want[by]
    ttol = np.maximum(tol[by], 1e-9 * np.maximum(np.abs(s), scale[by]))
    order = np.lexsort((np.arange(len(s)), s if rev else -s))[:n]
    for i in range(n):
        b, d = order[i], pos[i]
        assert abs(s[d] - s[b]) <= ttol[d] + ttol[b], (
            f"{what}: rank {i + 1} is {kind} {got_ids[i]} (brute {by} {s[d]!r}), brute force ranks {kind} {int(cand[b])} there ({s[b]!r})")
        near = np.abs(s - s[b]) <= ttol + ttol[b]
        near[b] = False
        if not near.any():
            assert d == b, f"{what}: rank {i + 1} is {kind} {got_ids[i]}, brute force (untied) {int(cand[b])}"
    return worst


MASSES = ("task_attention_sum", "task_abs_sum", "task_effect_sum", "class_attention_sum", "class_abs_sum", "class_effect_sum")


@pytest.mark.parametrize("cfg", SPOT, ids=ids)
def test_spotlights_match_brute_force(built, cfg) -> None:
    vb, path = built(cfg)
    b = Bundle.open(path)
    rel = score_rel(cfg[1])
    B = iv2.load(path)
    seen_focus_mean = seen_calls = seen_empty = 0
    for entry in vb.manifest["query_sets"]:
        S, M = entry["name"], entry["items"]
        items = list(range(M))
        for L in vb.info["layers"]:
            example = B.layer(L)["example"]
            T = example.shape[0]
            info = vb.info["sets"][S][L]
            for top in ((6, 10_000) if cfg == ("text", "F32", "single") else (6,)):
                res = spotlights(b, L, items, top=top, by=iv2.SCORES, groups=("pattern", "example"), reverse=(False, True),
                                 summary=True, masses=True, queries=S, device="cpu")
                assert len(res) == M
                for m, sp in zip(items, res):
                    seen_focus_mean += info["focus"][m] == -1 and info["rows_per_item"][m] > 0
                    seen_calls += info["calls"] > 1 and info["rows_per_item"][m] > 1
                    seen_empty += info["rows_per_item"][m] == 0
                    want = iv2.brute_scores(path, S, L, m)
                    scale = iv2.brute_scores(path, S, L, m, absolute=True)
                    sums, count = iv2.brute_example_sums(path, S, L, m)
                    ssc, _ = iv2.brute_example_sums(path, S, L, m, absolute=True)
                    seen = np.nonzero(count)[0]
                    for by in iv2.SCORES:
                        for rev in (False, True):
                            what = f"{cfg} set {S} layer {L} item {m} (focus {info['focus'][m]}) by {by} {'bottom' if rev else 'top'}"
                            check_ranked(sp.ranked[(by, "pattern", rev)], np.arange(T), want, scale, by, rev, top, rel,
                                         "pattern", what + " patterns", pattern_example=example)
                            check_ranked(sp.ranked[(by, "example", rev)], seen, {k: v[seen] for k, v in sums.items()},
                                         {k: v[seen] for k, v in ssc.items()}, by, rev, top, rel, "example", what + " examples")
                    mass = iv2.brute_masses(path, S, L, m)
                    mscale = iv2.brute_masses(path, S, L, m, absolute=True)
                    for k in MASSES:
                        got = np.asarray(getattr(sp.masses, k), dtype=np.float64)
                        assert got.shape == mass[k].shape, f"{cfg} {S} {L} item {m}: {k} shape {got.shape}, expected {mass[k].shape}"
                        np.testing.assert_array_less(np.abs(got - mass[k]), rel * mscale[k] + 1e-9,
                                                     err_msg=f"{cfg} {S} {L} item {m}: {k} {got} vs brute {mass[k]}")
                    e = sp.summary.primal_dual_error
                    assert e is not None and math.isfinite(e) and 0 <= e <= 1e-3, f"{cfg} {S} {L} item {m}: primal_dual_error {e}"
    assert seen_focus_mean and seen_calls
    if cfg[0] != "vector":
        assert seen_empty


# ----------------------------------------------------------------------------- corrupted bundles
def _rows(vb: iv2.ValidBundleV2, S: str, L: str, f: str) -> np.ndarray:
    return vb.tensors[f"queries/{S}/layer/{L}/{f}"].data


def corrupt(vb: iv2.ValidBundleV2, how: str) -> iv2.ValidBundleV2:
    c = vb.copy()
    S, L = "test", "mix"
    item, focus = _rows(c, S, L, "item"), _rows(c, S, L, "focus")
    M = focus.shape[0]
    if how == "focus_other_item":
        focus[0] = int(np.nonzero(item == 1)[0][0])
    elif how == "item_decreasing":  # item 0's rows say 1 and item 1's say 0: only the order is wrong
        r0, r1 = item == 0, item == 1
        item[r0], item[r1] = 1, 0
        focus[0], focus[1] = focus[1], focus[0]
    elif how == "query_nan":
        _rows(c, S, L, "query")[3, 1] = np.nan
    elif how == "grad_inf":
        _rows(c, S, "head", "grad")[0, 0] = np.inf
    elif how == "focus_out_of_range":
        focus[0] = item.shape[0]
    elif how == "item_out_of_range":
        item[item == M - 1] = M
        focus[M - 1] = -1
    elif how == "query_token_out_of_range":
        _rows(c, S, "tok.emb", "query")[0] = len(c.manifest["input"]["vocab"])
    elif how == "step_decreasing":
        step = c.tensors[f"layer/{L}/step"].data
        step[0] = step.max() + 1
    elif how == "weight_off":
        c.tensors[f"layer/{L}/weight"].data[0, 0] += 1.0
    elif how == "query_dtype_f64":  # the spec's table: query is F32 (embedding I64)
        q = c.tensors[f"queries/{S}/layer/{L}/query"]
        c.tensors[f"queries/{S}/layer/{L}/query"] = iv2.tensor(q.data.astype(np.float64))
    elif how == "target_not_prediction":  # manifest target "prediction", tensor disagrees
        pred = c.tensors[f"queries/{S}/prediction"].data
        c.tensors[f"queries/{S}/target"].data[0] = (pred[0] + 1) % len(c.manifest["classes"])
    elif how == "partial_layers_unknown":
        c.manifest["query_sets"][0]["partial_layers"] = ["no.such.layer"]
    elif how == "partial_layers_with_rows_all":
        c.manifest["query_sets"][0]["partial_layers"] = [L]
    elif how == "stray_query_set":  # tensors of a set the manifest does not list
        c.tensors["queries/ghost/label"] = iv2.tensor(np.zeros(2, dtype=np.int64))
    elif how == "no_query_sets_key":
        del c.manifest["query_sets"]
    elif how == "focus_row_under_mean_read":
        _rows(c, "mean.read", L, "focus")[0] = int(np.nonzero(_rows(c, "mean.read", L, "item") == 0)[0][0])
    elif how == "focus_not_in_last_call":
        focus[0] = int(np.nonzero((item == 0) & (_rows(c, S, L, "call") == 0))[0][-1])
    elif how == "bad_set_name":
        old, new = "mean.read", "mean read"
        next(e for e in c.manifest["query_sets"] if e["name"] == old)["name"] = new
        c.tensors = {k.replace(f"queries/{old}/", f"queries/{new}/"): t for k, t in c.tensors.items()}
    else:
        raise ValueError(how)
    return c


CORRUPTIONS = {
    "focus_other_item": r"focus\[0\].*not of item 0",
    "item_decreasing": r"item decreases",
    "query_nan": r"query: non-finite",
    "grad_inf": r"grad: non-finite",
    "focus_out_of_range": r"focus: values out of range",
    "item_out_of_range": r"item: values out of range",
    "query_token_out_of_range": r"query token ids",
    "step_decreasing": r"step decreases",
    "weight_off": r"weight - \(w0",
    "bad_set_name": r"query set name",
    "query_dtype_f64": r"query: dtype F64",
}
# Rules of sections 3-5 that tie the manifest's query_sets to the tensors (SPEC_READINGS 6-8 of
# independent_v2, and "one entry per stored query set"). Section 7 does not list them, so only
# Bundle.open / validate_contents is asked to refuse them.
STRUCTURAL = {
    "target_not_prediction": r"target differs from the prediction",
    "partial_layers_unknown": r"partial_layers",
    "partial_layers_with_rows_all": r"rows 'all' but partial_layers",
    "stray_query_set": r"not in the manifest's query_sets",
    "no_query_sets_key": r"no 'query_sets'",
}
# The spec leaves the choice of focus row to the writer: these must be read, not refused.
ACCEPTED = ("focus_row_under_mean_read", "focus_not_in_last_call")


@pytest.fixture(scope="module")
def corrupted(built, tmp_path_factory):
    vb, _ = built(("text", "F32", "single"))
    out = {}
    for how in [*CORRUPTIONS, *STRUCTURAL, *ACCEPTED]:
        out[how] = corrupt(vb, how).write(tmp_path_factory.mktemp(how) / "bad.safetensors", "single")
    return out


@pytest.mark.parametrize("how", list(CORRUPTIONS) + list(STRUCTURAL))
def test_corrupted_rejected_by_independent_checker(corrupted, how) -> None:
    with pytest.raises(iv2.InvariantError, match={**CORRUPTIONS, **STRUCTURAL}[how]):
        iv2.check_invariants(corrupted[how])


# a wrong dual form is not a content error (a bundle can be honest about not matching): only
# verify has to catch it; every other corruption must also fail Bundle.open or validate_contents
DUAL_FORM_ONLY = {"weight_off"}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_corrupted_rejected_by_dualtui(corrupted, how) -> None:
    """Bundle.open or validate_contents raises; and verify, if it gets a bundle, is not ok."""
    path = corrupted[how]
    try:
        b = Bundle.open(path)
    except Exception:
        return  # refused outright
    if how not in DUAL_FORM_ONLY:
        with pytest.raises(Exception):
            b.validate_contents()
    try:
        ok = verify_bundle(b).ok
    except Exception:
        ok = False
    assert not ok, f"{how}: verify_bundle says ok"


@pytest.mark.parametrize("how", list(STRUCTURAL))
def test_structural_violations_rejected_by_dualtui(corrupted, how) -> None:
    with pytest.raises(Exception):
        Bundle.open(corrupted[how]).validate_contents()


@pytest.mark.parametrize("how", ACCEPTED)
def test_any_focus_row_of_the_item_is_accepted(corrupted, how) -> None:
    iv2.check_invariants(corrupted[how])
    b = Bundle.open(corrupted[how])
    b.validate_contents()
    assert verify_bundle(b).ok
