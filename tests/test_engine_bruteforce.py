"""The spotlight engine against a brute force (tests/bruteforce_v1.py: full patterns × test
items matrices in float64 with numpy) on bundles written by the independent format-v1 writer
(tests/independent_v1.py): single-file, chunked (with empty chunks) and sharded; with and
without bias; linear and embedding layers; float32, float16 and bfloat16 storage (the brute
force reads the *stored* values, widened exactly). Families: "mlp" (image input), "text" (a
text classifier: classes are not tokens) and "lm" (a language model: a pattern's class is the
token after its position, and training tokens can be ranked by position).

Every score, group sum, mass, summary and vote the engine returns is compared. Tolerances are
relative to the absolute scale of the summed terms (the engine scores in float32)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import independent_v1 as iv
from bruteforce_v1 import (N_TEST, SCORES, Brute, check_all, check_example_ranks, check_masses, check_pattern_ranks,
                           check_position_ranks, check_votes, make, ranking, write)

import dualtui.engine.spotlight as spot
from dualtui.bundle import Bundle
from dualtui.engine.spotlight import GROUPS, spotlights
from dualtui.engine.stream import DeviceError, pick_device
from dualtui.engine.topk import RunningTopK, top_of_dense
from dualtui.engine.votes import layer_votes

CONFIGS = [(f, s, l) for f in ("mlp", "text", "lm") for s in ("float32", "bfloat16") for l in ("single", "chunked", "sharded")]
CONFIGS += [("mlp", "float16", "chunked"), ("text", "float16", "single"), ("lm", "float16", "sharded")]
PLAIN = ("pattern", "example")  # the groupings every layer has ("position" needs positions)
IDS = ["-".join(c) for c in CONFIGS]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache: dict = {}

    def get(cfg: tuple[str, str, str]) -> tuple[Bundle, Brute, iv.ValidBundle]:
        if cfg not in cache:
            vb = make(*cfg, seed=sum(map(ord, "-".join(cfg))))
            path = write(vb, tmp_path_factory.mktemp("-".join(cfg)) / "run.safetensors", cfg[2])
            cache[cfg] = (Bundle.open(path), Brute.from_valid(vb), vb)
        return cache[cfg]

    return get


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_spotlights_match_brute_force(built, cfg) -> None:
    bundle, bf, _ = built(cfg)
    tests = list(range(N_TEST))
    for L in bundle.manifest.layer_names:
        groups = bf.groups(L)
        assert ("position" in groups) == (cfg[0] in ("text", "lm"))  # text runs rank training tokens too
        for top in (5, 1000):
            res = spotlights(bundle, L, tests, top=top, groups=groups, device="cpu")
            check_all(bf, L, tests, res, top, groups=groups)


@pytest.mark.parametrize("cfg", [("mlp", "float32", "chunked"), ("text", "bfloat16", "sharded"), ("lm", "float32", "chunked")],
                         ids=lambda c: "-".join(c))
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_tiny_blocks_match_one_block(built, cfg, rows) -> None:
    bundle, bf, _ = built(cfg)
    tests = [4, 0, 2]
    for L in bundle.manifest.layer_names:
        one = spotlights(bundle, L, tests, top=6, groups=bf.groups(L), device="cpu")
        tiny = spotlights(bundle, L, tests, top=6, groups=bf.groups(L), device="cpu", rows=rows)
        check_all(bf, L, tests, tiny, 6)
        assert_same(one, tiny)


def assert_same(a: list, b: list) -> None:
    """Two runs agree: same ranked patterns/examples (scores to float32 noise), masses, summaries."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x.test, x.layer) == (y.test, y.layer)
        assert set(x.ranked) == set(y.ranked)
        for key in x.ranked:
            rx, ry = x.ranked[key], y.ranked[key]
            ident = lambda r: (r.pattern, r.example, r.position, r.step, r.label, r.patterns)  # noqa: E731
            assert [ident(r) for r in rx] == [ident(r) for r in ry], key
            np.testing.assert_allclose([r.score for r in rx], [r.score for r in ry], rtol=1e-5, atol=1e-6)
        for f in ("task_attention_sum", "task_abs_sum", "task_effect_sum", "class_abs_sum", "step_edges", "step_abs_sum", "step_effect_sum"):
            np.testing.assert_allclose(getattr(x.masses, f), getattr(y.masses, f), rtol=1e-5, atol=1e-5)
        for f in ("initial_norm", "learned_norm", "effective_patterns", "top10_share", "top100_share", "abs_sum"):
            assert getattr(x.summary, f) == pytest.approx(getattr(y.summary, f), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("cfg", [("mlp", "bfloat16", "sharded"), ("text", "float32", "chunked"), ("lm", "bfloat16", "single")],
                         ids=lambda c: "-".join(c))
def test_query_batches_match_one_batch(built, cfg, monkeypatch) -> None:
    bundle, bf, _ = built(cfg)
    tests = [3, 1, 4, 1, 0]  # a repeated test item too
    for L in bundle.manifest.layer_names:
        whole = spotlights(bundle, L, tests, top=4, groups=bf.groups(L), device="cpu")
        monkeypatch.setattr(spot, "QUERY_BATCH", 2)
        batched = spotlights(bundle, L, tests, top=4, groups=bf.groups(L), device="cpu")
        monkeypatch.undo()
        check_all(bf, L, tests, batched, 4)
        assert_same(whole, batched)


@pytest.mark.parametrize("bins", [1, 3, 7, 500])
def test_step_bins_cover_all_steps(built, bins) -> None:
    bundle, bf, _ = built(("mlp", "float32", "chunked"))
    for L in bundle.manifest.layer_names:
        res = spotlights(bundle, L, [2], groups=[], by=[], summary=False, masses=True, step_bins=bins, device="cpu")
        check_masses(bf, L, 2, res[0].masses, bins)
        assert res[0].summary is None and res[0].ranked == {}


@pytest.mark.parametrize("family", ["text", "lm"])
def test_partial_requests(built, family) -> None:
    """Only what was asked for is computed, and it is still right (attention alone reads no values)."""
    bundle, bf, _ = built((family, "float32", "single"))
    for L in bundle.manifest.layer_names:
        res = spotlights(bundle, L, [1, 3], top=3, by=["attention"], groups=["pattern"], reverse=[True],
                         summary=False, masses=False, device="cpu")
        for m, sp in zip([1, 3], res):
            assert set(sp.ranked) == {("attention", "pattern", True)}
            assert sp.summary is None and sp.masses is None
            check_pattern_ranks(bf, L, m, sp.ranked[("attention", "pattern", True)], "attention", True, 3)
        res = spotlights(bundle, L, [0], top=2, by=["effect"], groups=["example"], reverse=[False], summary=False, masses=False)
        assert set(res[0].ranked) == {("effect", "example", False)}
        check_example_ranks(bf, L, 0, res[0].ranked[("effect", "example", False)], "effect", False, 2)
        # training tokens alone, with masses (which read positions too in a language model)
        res = spotlights(bundle, L, [2, 4], top=3, by=["magnitude"], groups=["position"], reverse=[True, False],
                         summary=False, masses=True, device="cpu")
        for m, sp in zip([2, 4], res):
            assert set(sp.ranked) == {("magnitude", "position", True), ("magnitude", "position", False)}
            assert sp.summary is None
            for r in (False, True):
                check_position_ranks(bf, L, m, sp.ranked[("magnitude", "position", r)], "magnitude", r, 3)
            check_masses(bf, L, m, sp.masses, 20)


def test_embedding_ties_break_by_lower_index(built) -> None:
    """Embedding attention is 0 or 1: rankings are all ties, and must not depend on blocking."""
    bundle, bf, _ = built(("text", "float32", "chunked"))
    lay = bf.layers["tok.emb"]
    for rows in (None, 1, 2, 5):
        res = spotlights(bundle, "tok.emb", list(range(N_TEST)), top=4, by=["attention"], groups=["pattern"],
                         summary=False, masses=False, device="cpu", rows=rows)
        for m, sp in enumerate(res):
            a = lay.alpha()[:, m]
            for r in (False, True):
                want = ranking(a, r)[:4].tolist()
                assert [x.pattern for x in sp.ranked[("attention", "pattern", r)]] == want, (rows, m, r)


def test_top_zero_and_errors(built) -> None:
    bundle, _, _ = built(("mlp", "float32", "single"))
    res = spotlights(bundle, "head", [0], top=0, groups=PLAIN, device="cpu")
    assert set(res[0].ranked) == {(b, g, r) for b in SCORES for g in PLAIN for r in (False, True)}
    assert all(v == [] for v in res[0].ranked.values())
    lm, _, _ = built(("lm", "float32", "single"))
    res = spotlights(lm, "head", [0], top=0, groups=GROUPS, device="cpu")
    assert len(res[0].ranked) == len(SCORES) * 3 * 2 and all(v == [] for v in res[0].ranked.values())
    with pytest.raises(IndexError, match="out of range"):
        spotlights(bundle, "head", [N_TEST])
    with pytest.raises(IndexError, match="out of range"):
        spotlights(bundle, "head", [-1])
    with pytest.raises(ValueError, match="attention, magnitude, effect"):
        spotlights(bundle, "head", [0], by=["size"])
    with pytest.raises(ValueError, match="pattern, example, position"):
        spotlights(bundle, "head", [0], groups=["task"])
    # training tokens need positions: asking for them in an image run is an error...
    for groups in (["position"], GROUPS):
        with pytest.raises(ValueError, match="position"):
            spotlights(bundle, "head", [0], groups=groups, device="cpu")
    # ...while the default asks only for the groupings the layer supports
    default = spotlights(bundle, "head", [0], top=2, device="cpu")[0]
    assert {g for _, g, _ in default.ranked} == set(PLAIN)
    assert spotlights(bundle, "head", [], groups=PLAIN) == []


def test_primal_dual_error_detects_a_tampered_weight(tmp_path) -> None:
    vb = make("mlp", "float32", "single", seed=5)
    w = vb.tensors["layer/head/weight"].data.copy()
    w[1, 2] += 0.75
    vb.tensors["layer/head/weight"] = iv.tensor(w)
    bundle = Bundle.open(vb.write(tmp_path / "bad.safetensors"))
    bf = Brute.from_valid(vb)
    lay = bf.layers["head"]
    res = spotlights(bundle, "head", list(range(N_TEST)), groups=PLAIN, device="cpu")
    for m, sp in enumerate(res):
        want = float(np.abs(lay.primal()[m] - (lay.initial()[m] + lay.learned()[m])).max())
        assert want == pytest.approx(0.75 * abs(lay.Q[m, 2]), rel=1e-4, abs=1e-5)
        assert sp.summary.primal_dual_error == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[1] != "float16"], ids=lambda c: "-".join(c))
@pytest.mark.parametrize("query_batch", [2, 4096])
def test_votes_match_brute_force(built, cfg, query_batch) -> None:
    bundle, bf, _ = built(cfg)
    for L in bundle.manifest.layer_names:
        check_votes(bf, L, layer_votes(bundle, L, device="cpu", query_batch=query_batch))


# ----------------------------------------------------------------------------- text runs: windows and span
def lm_variant(tmp_path: Path, variant: str) -> tuple[Bundle, Brute]:
    """The lm bundle with its windows or manifest changed:
    - "no-context": no input.context, so the span falls back to train/input's width (4);
    - "recorder": windows of context + 1 = 5 tokens (as dualtui's recorder writes them), so the
      token after position 3 is train/input[e, 4] and train/label is never a pattern's class;
    - "classifier": classes renamed (no longer the vocabulary), so labels are per example."""
    vb = make("lm", "float32", "chunked", seed=77)
    inp = vb.tensors["train/input"].data
    if variant == "no-context":
        del vb.manifest["input"]["context"]
    elif variant == "recorder":
        extra = np.random.default_rng(1).integers(0, inp.max() + 1, size=(inp.shape[0], 1))
        vb.tensors["train/input"] = iv.tensor(np.concatenate([inp, extra], axis=1).astype(np.int64))
    else:
        vb.manifest["classes"] = [f"class {c}" for c in vb.manifest["classes"]]
    return Bundle.open(write(vb, tmp_path / "run.safetensors", "chunked")), Brute.from_valid(vb)


@pytest.mark.parametrize("variant", ["no-context", "recorder", "classifier"])
def test_text_variants_match_brute_force(tmp_path, variant) -> None:
    bundle, bf = lm_variant(tmp_path, variant)
    assert bf.span == 4 and bf.labels_are_tokens == (variant != "classifier")
    if variant == "recorder":  # the label is no pattern's class here; in the plain lm it is
        assert not any(np.array_equal(bf.pattern_class(L), bf.train_label[bf.layers[L].example]) for L in bf.layers)
    tests = list(range(N_TEST))
    for L in bundle.manifest.layer_names:
        res = spotlights(bundle, L, tests, top=6, groups=GROUPS, device="cpu", rows=5)
        check_all(bf, L, tests, res, 6, groups=GROUPS)
        check_votes(bf, L, layer_votes(bundle, L, device="cpu", query_batch=3))


def test_lm_classes_are_next_tokens(built) -> None:
    """In the lm bundle, pattern rows and class masses follow the token after the position (both
    sources of it occur), example rows the window's label; the brute force's rule, spelled out."""
    bundle, bf, vb = built(("lm", "float32", "single"))
    inp, lab = vb.tensors["train/input"].data, vb.tensors["train/label"].data
    L = "tok.emb"
    lay = bf.layers[L]
    want = [int(inp[e, p + 1]) if p < 3 else int(lab[e]) for e, p in zip(lay.example, lay.position)]
    assert bf.pattern_class(L).tolist() == want
    assert want != lab[lay.example].tolist()
    res = spotlights(bundle, L, [1], top=1000, by=["attention"], reverse=[False], groups=GROUPS, summary=False, device="cpu")[0]
    rows = res.ranked[("attention", "pattern", False)]
    assert {r.position for r in rows} == {0, 1, 2, 3}
    for r in rows:
        assert r.label == want[r.pattern]
    for r in res.ranked[("attention", "position", False)]:
        assert r.label == (int(inp[r.example, r.position + 1]) if r.position < 3 else int(lab[r.example]))
    for r in res.ranked[("attention", "example", False)]:
        assert r.label == int(lab[r.example])
    per_class = np.bincount(want, weights=np.abs(lay.alpha()[:, 1]), minlength=bf.n_classes)
    np.testing.assert_allclose(res.masses.class_abs_sum, per_class, rtol=0, atol=1e-9)


def test_position_outside_the_context_is_an_error(tmp_path) -> None:
    vb = make("lm", "float32", "single", seed=3)
    pos = vb.tensors["layer/mix/position"].data.copy()
    pos[-1] = 4  # context is 4: positions 0..3
    vb.tensors["layer/mix/position"] = iv.tensor(pos)
    bundle = Bundle.open(vb.write(tmp_path / "run.safetensors"))
    from dualtui.bundle.errors import IdOutOfRange

    with pytest.raises(IdOutOfRange, match=r"position outside 0\.\.3"):  # found as the block streams
        spotlights(bundle, "mix", [0], groups=["position"], device="cpu")
    spotlights(bundle, "tok.emb", [0], groups=["position"], device="cpu")  # the other layers are fine


# ----------------------------------------------------------------------------- top-k, devices
def test_running_topk_matches_dense_with_ties() -> None:
    rng = np.random.default_rng(3)
    for trial in range(30):
        n, M, k = int(rng.integers(1, 60)), int(rng.integers(1, 4)), int(rng.integers(1, 12))
        x = rng.integers(-3, 4, size=(n, M)).astype(np.float32)  # many exact ties
        rows = int(rng.integers(1, 20))
        acc = RunningTopK(k)
        for lo in range(0, n, rows):
            acc.update(torch.from_numpy(x[lo : lo + rows]), lo)
        for j in range(M):
            v, i = acc.result(j)
            want = top_of_dense(x[:, j].astype(np.float64), k)
            assert i.tolist() == want.tolist(), (trial, j)
            np.testing.assert_array_equal(v, x[want, j])


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        pick_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_gpu_is_a_clear_error(built) -> None:
    with pytest.raises(DeviceError) as e:
        pick_device("cuda")
    msg = str(e.value)
    assert "cuda" in msg.lower() and "no CUDA device" in msg and "\n" not in msg
    bundle, _, _ = built(("mlp", "float32", "single"))
    with pytest.raises(DeviceError):
        spotlights(bundle, "head", [0], device="cuda")
    with pytest.raises(DeviceError):
        layer_votes(bundle, "head", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cfg", [("mlp", "bfloat16", "sharded"), ("text", "float32", "chunked"), ("lm", "bfloat16", "chunked")],
                         ids=lambda c: "-".join(c))
def test_cuda_matches_brute_force(built, cfg) -> None:
    bundle, bf, _ = built(cfg)
    tests = list(range(N_TEST))
    for L in bundle.manifest.layer_names:
        cpu = spotlights(bundle, L, tests, top=5, groups=bf.groups(L), device="cpu")
        gpu = spotlights(bundle, L, tests, top=5, groups=bf.groups(L), device="cuda", rows=7)
        check_all(bf, L, tests, gpu, 5)
        assert_same(cpu, gpu)
        check_votes(bf, L, layer_votes(bundle, L, device="cuda", query_batch=2))


# ----------------------------------------------------------------------------- the committed samples
SAMPLES = sorted((Path(__file__).resolve().parents[1] / "sample_runs").glob("digits-*.safetensors"))


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda p: p.name)
def test_sample_last_layer_matches_brute_force(sample: Path) -> None:
    bundle = Bundle.open(sample)
    bf = Brute.from_file(sample)
    L = bundle.manifest.layer_names[-1]
    m = 7
    res = spotlights(bundle, L, [m], top=10, groups=PLAIN, device="cpu")
    check_all(bf, L, [m], res, 10, groups=PLAIN)
    # The last layer's g is d(predicted logit)/d(output), a one-hot row: Σ effect + (w0 q + b0)·g
    # (checked equal to (W q + b)·g by check_all) is then the predicted class's logit.
    lay = bf.layers[L]
    pred = int(bf.test_prediction[m])
    np.testing.assert_array_equal(lay.G[m], np.eye(lay.G.shape[1])[pred])
    assert int(lay.primal()[m].argmax()) == pred
    logit = float(res[0].masses.task_effect_sum.sum() + lay.initial()[m] @ lay.G[m])
    assert logit == pytest.approx(float(lay.primal()[m, pred]), rel=1e-5, abs=1e-5)
    assert math.isfinite(logit)
