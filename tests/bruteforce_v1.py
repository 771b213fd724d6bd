"""Brute-force spotlight scores, written from DESIGN.md section 3 alone (never imports dualtui).

`Brute.from_valid(vb)` reads the tensors a `independent_v1.ValidBundle` holds (the *stored*
values: bfloat16/float16 widened exactly) and `Brute.from_file(path)` reads any bundle through
the `safetensors` library. Every score is computed as a full [patterns, test items] matrix in
float64 with numpy; group sums, masses, summaries and votes follow by plain indexing.

`make` builds the small test bundles (chunked ones with empty chunks), and the `check_*`
functions compare what the engine (or the CLI's JSON, read into attribute objects) returned
with the brute force.

Alongside each score matrix comes an "absolute scale" matrix (the same formula with every
product replaced by the product of absolute values), from which the tests derive the rounding
tolerance that a float32 computation of that score may need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import independent_v1 as iv
from independent_v1 import LayerPlan

SCORES = ("attention", "magnitude", "effect")
REL = 1e-5  # relative tolerance, against the absolute scale of the terms
N_TEST = 5


@dataclass
class Layer:
    name: str
    kind: str
    bias: bool
    K: np.ndarray  # [T, in] float64, or [T] int64 token ids
    V: np.ndarray  # [T, out]
    step: np.ndarray  # [T]
    example: np.ndarray  # [T]
    position: np.ndarray | None
    Q: np.ndarray  # [M, in] or [M]
    G: np.ndarray  # [M, out]
    W: np.ndarray
    w0: np.ndarray
    b: np.ndarray | None
    b0: np.ndarray | None

    @property
    def T(self) -> int:
        return int(self.V.shape[0])

    # ------------------------------------------------------------------ scores [T, M]
    def alpha(self) -> np.ndarray:
        if self.kind == "embedding":
            return (self.K[:, None] == self.Q[None, :]).astype(np.float64)
        return self.K @ self.Q.T + (1.0 if self.bias else 0.0)

    def alpha_abs(self) -> np.ndarray:
        if self.kind == "embedding":
            return self.alpha()
        return np.abs(self.K) @ np.abs(self.Q).T + (1.0 if self.bias else 0.0)

    def scores(self) -> dict[str, np.ndarray]:
        if "_scores_memo" not in self.__dict__:
            self.__dict__["_scores_memo"] = self._scores()
        return self.__dict__["_scores_memo"]

    def scales(self) -> dict[str, np.ndarray]:
        if "_scales_memo" not in self.__dict__:
            self.__dict__["_scales_memo"] = self._scales()
        return self.__dict__["_scales_memo"]

    def _scores(self) -> dict[str, np.ndarray]:
        a = self.alpha()
        vnorm = np.linalg.norm(self.V, axis=1)
        return {"attention": a, "magnitude": np.abs(a) * vnorm[:, None], "effect": a * (self.V @ self.G.T)}

    def _scales(self) -> dict[str, np.ndarray]:
        """|terms| bounds: a float32 evaluation of score t is within ~n·2⁻²⁴ of this."""
        aa = self.alpha_abs()
        vnorm = np.linalg.norm(self.V, axis=1)
        return {"attention": aa, "magnitude": aa * vnorm[:, None], "effect": aa * (np.abs(self.V) @ np.abs(self.G).T)}

    # ------------------------------------------------------------------ primal / dual
    def initial(self) -> np.ndarray:  # [M, out]  w0 q + b0
        if self.kind == "embedding":
            return self.w0[self.Q]
        out = self.Q @ self.w0.T
        return out + self.b0 if self.bias else out

    def primal(self) -> np.ndarray:  # [M, out]  W q + b
        if self.kind == "embedding":
            return self.W[self.Q]
        out = self.Q @ self.W.T
        return out + self.b if self.bias else out

    def learned(self) -> np.ndarray:  # [M, out]  Σ α v
        return self.alpha().T @ self.V


@dataclass
class Brute:
    manifest: dict
    layers: dict[str, Layer]
    train_task: np.ndarray
    train_label: np.ndarray
    test_label: np.ndarray
    test_task: np.ndarray
    test_prediction: np.ndarray
    cache: dict = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return max(len(self.manifest["tasks"]), 1)

    @property
    def n_classes(self) -> int:
        return max(len(self.manifest["classes"]), 1)

    @classmethod
    def _build(cls, manifest: dict, get, has) -> "Brute":
        layers = {}
        for spec in manifest["layers"]:
            L, chunks = spec["name"], spec.get("chunks", 1)

            def cat(f: str) -> np.ndarray:
                names = [f"layer/{L}/{f}"] if chunks == 1 and has(f"layer/{L}/{f}") else [f"layer/{L}/{f}/{c}" for c in range(chunks)]
                return np.concatenate([get(n) for n in names])

            emb = spec["kind"] == "embedding"
            bias = bool(spec.get("bias"))
            pos_name = f"layer/{L}/position" if chunks == 1 else f"layer/{L}/position/0"
            layers[L] = Layer(
                name=L, kind=spec["kind"], bias=bias,
                K=cat("keys").astype(np.int64) if emb else cat("keys"), V=cat("values"),
                step=cat("step").astype(np.int64), example=cat("example").astype(np.int64),
                position=cat("position").astype(np.int64) if has(pos_name) else None,
                Q=get(f"layer/{L}/queries").astype(np.int64) if emb else get(f"layer/{L}/queries"),
                G=get(f"layer/{L}/query_grad"), W=get(f"layer/{L}/weight"), w0=get(f"layer/{L}/w0"),
                b=get(f"layer/{L}/bias") if bias else None, b0=get(f"layer/{L}/b0") if bias else None,
            )
        ints = lambda n: get(n).astype(np.int64)  # noqa: E731
        return cls(manifest, layers, ints("train/task"), ints("train/label"), ints("test/label"), ints("test/task"),
                   ints("test/prediction"))

    @classmethod
    def from_valid(cls, vb: "iv.ValidBundle") -> "Brute":
        t = vb.tensors
        return cls._build(vb.manifest, lambda n: t[n].as_float64(), lambda n: n in t)

    @classmethod
    def from_file(cls, path: str | Path) -> "Brute":
        src = iv._Source(Path(path))
        return cls._build(json.loads(src.manifest_text), src.get, src.has)

    # ------------------------------------------------------------------ group sums
    def example_sums(self, L: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Per training example [N, M]: Σ score, Σ scale, and the pattern count [N]."""
        key = ("example_sums", L)
        if key not in self.cache:
            lay = self.layers[L]
            n = len(self.train_label)
            sc, ab = lay.scores(), lay.scales()
            by_column = lambda x: np.stack([np.bincount(lay.example, weights=x[:, j], minlength=n)  # noqa: E731
                                            for j in range(x.shape[1])], axis=1).reshape(n, x.shape[1])
            self.cache[key] = ({s: by_column(sc[s]) for s in SCORES}, {s: by_column(ab[s]) for s in SCORES},
                               np.bincount(lay.example, minlength=n))
        return self.cache[key]

    def masses(self, L: str, m: int, edges: np.ndarray) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
        """(kind, what) -> (sums, scale sums); kind task/class/step, what attention/abs/effect.
        Step bin b holds steps [edges[b], edges[b+1])."""
        lay = self.layers[L]
        sc, ab = lay.scores(), lay.scales()
        a, e = sc["attention"][:, m], sc["effect"][:, m]
        terms = {"attention": (a, ab["attention"][:, m]), "abs": (np.abs(a), ab["attention"][:, m]),
                 "effect": (e, ab["effect"][:, m])}
        bins = np.searchsorted(edges, lay.step, side="right") - 1
        ids = {"task": (self.train_task[lay.example], self.n_tasks), "class": (self.train_label[lay.example], self.n_classes),
               "step": (bins, len(edges) - 1)}
        out = {}
        for kind, (idx, n) in ids.items():
            assert idx.min(initial=0) >= 0 and idx.max(initial=0) < n, f"{kind} ids out of range"
            for what, (x, s) in terms.items():
                out[(kind, what)] = (np.bincount(idx, weights=x, minlength=n), np.bincount(idx, weights=s, minlength=n))
        return out

    def class_abs(self, L: str) -> tuple[np.ndarray, np.ndarray]:
        """Σ|α| per training class [C, M], and its scale."""
        lay = self.layers[L]
        a, aa = np.abs(lay.alpha()), lay.alpha_abs()
        C, M = self.n_classes, len(lay.G)
        out, scale = np.zeros((C, M)), np.zeros((C, M))
        cls_of = self.train_label[lay.example]
        np.add.at(out, cls_of, a)
        np.add.at(scale, cls_of, aa)
        return out, scale


def ranking(scores: np.ndarray, reverse: bool) -> np.ndarray:
    """Indices best first (reverse: lowest first), ties by the lower index."""
    return np.lexsort((np.arange(len(scores)), scores if reverse else -scores))


def determined(scores: np.ndarray, value: float, tol: float) -> bool:
    """True when every score within `tol` of `value` equals it exactly: the rank of `value`
    (and, with ties broken by index, which item holds it) cannot depend on rounding."""
    near = np.abs(scores - value) <= tol
    return bool(np.all(scores[near] == value))


# ----------------------------------------------------------------------------- bundles
def rechunk(vb: iv.ValidBundle, layer: str, sizes: list[int]) -> None:
    """Re-split a layer's per-pattern tensors into chunks of the given sizes (0 = empty)."""
    spec = next(s for s in vb.manifest["layers"] if s["name"] == layer)
    assert sum(sizes) == spec["patterns"]
    old = spec.get("chunks", 1)
    for f in ("keys", "values", "step", "example", "position"):
        names = [f"layer/{layer}/{f}"] if old == 1 else [f"layer/{layer}/{f}/{c}" for c in range(old)]
        if names[0] not in vb.tensors:
            continue
        parts = [vb.tensors.pop(n) for n in names]
        whole = np.concatenate([p.data for p in parts])
        lo = 0
        for c, n in enumerate(sizes):
            vb.tensors[f"layer/{layer}/{f}/{c}"] = iv.Tensor(parts[0].dtype, whole[lo : lo + n])
            lo += n
    spec["chunks"] = len(sizes)


def make(family: str, storage: str, layout: str, seed: int) -> iv.ValidBundle:
    rng = np.random.default_rng(seed)
    if family == "mlp":
        plans = [LayerPlan("enc.0", in_features=5, out_features=4, bias=True, patterns=150),
                 LayerPlan("head", in_features=4, out_features=3, bias=False, patterns=37)]
        vb = iv.make_valid_bundle(rng, plans, storage=storage, n_train=12, n_test=N_TEST,
                                  tasks=["task a", "task b"], classes=["c0", "c1", "c2"])
        if storage == "bfloat16":  # queries may be any float dtype: store one layer's in bf16
            q = vb.tensors["layer/enc.0/queries"].as_float64()
            vb.tensors["layer/enc.0/queries"] = iv.bf16(q)
    else:
        plans = [LayerPlan("tok.emb", kind="embedding", in_features=6, out_features=3, bias=False, patterns=41),
                 LayerPlan("rare.emb", kind="embedding", in_features=30, out_features=2, bias=False, patterns=8),
                 LayerPlan("out", in_features=3, out_features=4, bias=True, patterns=60)]
        vb = iv.make_valid_bundle(rng, plans, storage=storage, n_train=9, n_test=N_TEST, text=True,
                                  tasks=["t0", "t1", "t2"], classes=["neg", "pos"])
        # A query token no pattern of rare.emb has: every α is 0 for that test item.
        keys = vb.tensors["layer/rare.emb/keys"].as_float64().astype(np.int64)
        unseen = next(t for t in range(30) if t not in set(keys.tolist()))
        q = vb.tensors["layer/rare.emb/queries"].data.copy()
        q[0] = unseen
        vb.tensors["layer/rare.emb/queries"] = iv.tensor(q.astype(np.int64))
    if layout in ("chunked", "sharded"):
        for spec in vb.manifest["layers"]:
            T = spec["patterns"]
            rechunk(vb, spec["name"], [T // 3, 0, T - T // 3 - 1, 1, 0])  # empty middle and last chunks
    return vb


def write(vb: iv.ValidBundle, path: Path, layout: str) -> Path:
    return vb.write_sharded(path, shards=3) if layout == "sharded" else vb.write(path)


# ----------------------------------------------------------------------------- checks
def check_pattern_ranks(bf: Brute, L: str, m: int, ranked, by: str, reverse: bool, top: int) -> None:
    lay = bf.layers[L]
    sc, ab = lay.scores(), lay.scales()
    s = sc[by][:, m]
    tol = REL * max(float(ab[by][:, m].max(initial=0.0)), 1e-12)
    order = ranking(s, reverse)[:top]
    assert len(ranked) == min(top, lay.T)
    np.testing.assert_allclose([r.score for r in ranked], s[order], rtol=0, atol=tol)
    for n, r in enumerate(ranked):
        t = r.pattern
        assert r.rank == n + 1
        assert r.patterns is None
        # the result's own fields are those of pattern t (exact float64 re-scoring)
        for name in SCORES:
            assert getattr(r, name) == pytest.approx(sc[name][t, m], rel=1e-9, abs=1e-12 * (1 + ab[name][t, m]))
        assert r.score == getattr(r, by)
        assert r.step == lay.step[t] and r.example == lay.example[t]
        assert r.task == bf.train_task[lay.example[t]] and r.label == bf.train_label[lay.example[t]]
        assert r.position == (None if lay.position is None else lay.position[t])
        if determined(s, s[order[n]], tol):
            assert t == order[n], f"rank {n + 1}: pattern {t}, brute force {order[n]} (score {s[order[n]]})"
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=not reverse)
    assert len({r.pattern for r in ranked}) == len(ranked)


def check_example_ranks(bf: Brute, L: str, m: int, ranked, by: str, reverse: bool, top: int) -> None:
    sums, scale, count = bf.example_sums(L)
    seen = np.nonzero(count)[0]
    s = sums[by][seen, m]
    tol = REL * max(float(scale[by][seen, m].max(initial=0.0)), 1e-12)
    order = seen[ranking(s, reverse)[:top]]
    assert len(ranked) == min(top, len(seen))
    np.testing.assert_allclose([r.score for r in ranked], sums[by][order, m], rtol=0, atol=tol)
    for n, r in enumerate(ranked):
        e = r.example
        assert r.rank == n + 1 and r.pattern is None and r.step is None
        assert r.patterns == count[e] > 0
        for name in SCORES:
            assert getattr(r, name) == pytest.approx(sums[name][e, m], rel=0, abs=REL * scale[name][e, m] + 1e-12)
        assert r.score == getattr(r, by)
        assert r.task == bf.train_task[e] and r.label == bf.train_label[e]
        if determined(s, sums[by][order[n], m], tol):
            assert e == order[n]


def check_masses(bf: Brute, L: str, m: int, ms, step_bins: int) -> None:
    lay = bf.layers[L]
    edges = np.asarray(ms.step_edges)
    assert edges.shape == (step_bins + 1,)
    assert edges[0] <= lay.step.min(initial=0) and edges[0] == 0
    assert edges[-1] > lay.step.max(initial=0)  # every recorded step falls in a bin
    assert np.all(np.diff(edges) >= 0)
    widths = np.diff(edges)
    assert widths.max() - widths.min() <= 1  # equal bins (up to integer rounding)
    brute = bf.masses(L, m, edges)
    got = {("task", "attention"): ms.task_attention_sum, ("task", "abs"): ms.task_abs_sum, ("task", "effect"): ms.task_effect_sum,
           ("class", "attention"): ms.class_attention_sum, ("class", "abs"): ms.class_abs_sum, ("class", "effect"): ms.class_effect_sum,
           ("step", "attention"): ms.step_attention_sum, ("step", "abs"): ms.step_abs_sum, ("step", "effect"): ms.step_effect_sum}
    assert len(ms.task_abs_sum) == bf.n_tasks and len(ms.class_abs_sum) == bf.n_classes
    for key, (want, scale) in brute.items():
        np.testing.assert_allclose(got[key], want, rtol=0, atol=REL * scale.max(initial=0.0) + 1e-12, err_msg=str(key))
    # totals: every grouping partitions the patterns
    a = lay.alpha()[:, m]
    sc = lay.scales()
    for what, total, scale in (("attention", a.sum(), sc["attention"][:, m].sum()), ("abs", np.abs(a).sum(), sc["attention"][:, m].sum()),
                               ("effect", lay.scores()["effect"][:, m].sum(), sc["effect"][:, m].sum())):
        for kind in ("task", "class", "step"):
            assert float(got[(kind, what)].sum()) == pytest.approx(total, abs=REL * scale + 1e-12)
    assert ms.abs_total == pytest.approx(np.abs(a).sum(), abs=REL * sc["attention"][:, m].sum() + 1e-12)


def check_summary(bf: Brute, L: str, m: int, s) -> None:
    lay = bf.layers[L]
    a = lay.alpha()[:, m]
    aa = lay.alpha_abs()[:, m]
    init = lay.initial()[m]
    learned = lay.learned()[m]
    learned_scale = float(np.linalg.norm(aa @ np.abs(lay.V)))
    assert s.layer == L and s.patterns == lay.T
    assert s.initial_norm == pytest.approx(np.linalg.norm(init), rel=1e-9, abs=1e-12)
    assert s.learned_norm == pytest.approx(np.linalg.norm(learned), rel=0, abs=REL * learned_scale + 1e-12)
    tot = np.linalg.norm(init) + np.linalg.norm(learned)
    assert s.initial_share == pytest.approx(np.linalg.norm(init) / tot, abs=REL * (1 + learned_scale / tot))
    assert s.learned_share == pytest.approx(np.linalg.norm(learned) / tot, abs=REL * (1 + learned_scale / tot))
    assert s.initial_share + s.learned_share == pytest.approx(1.0)
    A = np.abs(a).sum()
    assert s.abs_sum == pytest.approx(A, abs=REL * aa.sum() + 1e-12)
    if A == 0:
        assert s.effective_patterns == 0 and s.top10_share == 0 and s.top100_share == 0
    else:
        eff = A * A / float((a * a).sum())
        assert s.effective_patterns == pytest.approx(eff, rel=1e-4 * aa.sum() / A)
        assert 1 - 1e-6 <= s.effective_patterns <= lay.T + 1e-6
        desc = np.sort(np.abs(a))[::-1]
        for n, got in ((10, s.top10_share), (100, s.top100_share)):
            assert got == pytest.approx(desc[:n].sum() / A, abs=1e-4 * aa.sum() / A)
        if lay.T <= 10:
            assert s.top10_share == pytest.approx(1.0)
    # primal vs dual: tiny for a valid bundle, and equal to the brute force's own error
    brute_err = float(np.abs(lay.primal()[m] - (init + learned)).max())
    scale = max(1.0, float(np.abs(lay.primal()[m]).max()), learned_scale)
    assert s.primal_dual_error <= 1e-4 * scale
    assert abs(s.primal_dual_error - brute_err) <= REL * scale


def check_last_layer_identity(bf: Brute, L: str, m: int, ms) -> None:
    """Σ_t effect_t + (w0 q + b0)·g == (W q + b)·g: exact given W = w0 + Σ v kᵀ."""
    lay = bf.layers[L]
    g = lay.G[m]
    sum_effect = float(ms.task_effect_sum.sum())
    lhs = sum_effect + float(lay.initial()[m] @ g)
    rhs = float(lay.primal()[m] @ g)
    scale = float(lay.scales()["effect"][:, m].sum() + np.abs(lay.primal()[m]) @ np.abs(g) + 1.0)
    assert lhs == pytest.approx(rhs, abs=1e-4 * scale)
    # and the brute force satisfies it too (the bundle is valid)
    assert float(lay.scores()["effect"][:, m].sum()) + float(lay.initial()[m] @ g) == pytest.approx(rhs, abs=1e-4 * scale)


def check_all(bf: Brute, L: str, tests: list[int], res: list, top: int, step_bins: int = 20) -> None:
    assert [r.test for r in res] == tests
    for m, sp in zip(tests, res):
        assert sp.layer == L
        assert set(sp.ranked) == {(b, g, r) for b in SCORES for g in ("pattern", "example") for r in (False, True)}
        for b in SCORES:
            for r in (False, True):
                check_pattern_ranks(bf, L, m, sp.ranked[(b, "pattern", r)], b, r, top)
                check_example_ranks(bf, L, m, sp.ranked[(b, "example", r)], b, r, top)
        check_masses(bf, L, m, sp.masses, step_bins)
        check_summary(bf, L, m, sp.summary)
        check_last_layer_identity(bf, L, m, sp.masses)


def check_votes(bf: Brute, L: str, v) -> None:
    want, scale = bf.class_abs(L)
    M = want.shape[1]
    assert v.layer == L and v.test_items == M
    np.testing.assert_allclose(v.class_abs, want, rtol=0, atol=REL * scale.max(initial=0.0) + 1e-12)
    vote = want.argmax(axis=0)
    for m in range(M):
        col = want[:, m]
        tol = REL * scale[:, m].max() + 1e-12
        if determined(col, col.max(), tol):  # no near-tie for the largest class
            assert v.vote[m] == vote[m]
        else:
            vote[m] = v.vote[m]
    right, model_right = vote == bf.test_label, bf.test_prediction == bf.test_label
    assert v.label_agreement == pytest.approx(right.mean())
    assert v.prediction_agreement == pytest.approx((vote == bf.test_prediction).mean())
    assert v.model_accuracy == pytest.approx(model_right.mean())
    assert v.table == [[int((right & model_right).sum()), int((right & ~model_right).sum())],
                       [int((~right & model_right).sum()), int((~right & ~model_right).sum())]]
    assert sum(map(sum, v.table)) == M
    j = v.to_json()
    assert j["table"]["vote_right_model_right"] == v.table[0][0] and j["table"]["vote_wrong_model_wrong"] == v.table[1][1]


