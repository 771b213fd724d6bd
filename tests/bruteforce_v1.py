"""Brute-force spotlight scores, written from DESIGN.md section 3 alone (never imports dualtui).

`Brute.from_valid(vb)` reads the tensors a `independent_v1.ValidBundle` holds (the *stored*
values: bfloat16/float16 widened exactly) and `Brute.from_file(path)` reads any bundle through
the `safetensors` library. Every score is computed as a full [patterns, test items] matrix in
float64 with numpy; group sums, masses, summaries and votes follow by plain indexing.

`make` builds the small test bundles (chunked ones with empty chunks), and the `check_*`
functions compare what the engine (or the CLI's JSON, read into attribute objects) returned
with the brute force.

Text runs (the rules of the text-run semantics, restated here from the spec, not the engine):
- Grouping "position" ranks training tokens: slot e·span + p sums every pattern of example e
  at position p (the epochs that revisited it); span is the manifest's input `context`, else
  the width of `train/input`.
- Labels are tokens: in a language model (input kind "text", `train/input` present, and
  `classes` equal to the input's `vocab`) the class of a pattern at (e, p) is the token after
  it, `train/input[e, p + 1]`, or `train/label[e]` when the window has no column p + 1. That
  class feeds class masses, votes and the label of pattern and position rows; example rows
  keep `train/label[e]`, as does every other bundle.

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

SCORES = ("attention", "magnitude", "effect", "cosine")
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

    def norms(self) -> np.ndarray:
        """‖k̃_t‖ ‖q̃_m‖ [patterns, M], the bias input 1 appended to both (docs/format.md section 6)."""
        if self.kind == "embedding":
            return np.ones((len(self.K), len(self.Q)))
        extra = 1.0 if self.bias else 0.0
        k = np.sqrt((self.K.astype(np.float64) ** 2).sum(axis=1) + extra)
        q = np.sqrt((self.Q.astype(np.float64) ** 2).sum(axis=1) + extra)
        return k[:, None] * q[None, :]

    def _scores(self) -> dict[str, np.ndarray]:
        a = self.alpha()
        vnorm = np.linalg.norm(self.V, axis=1)
        n = self.norms()
        return {"attention": a, "magnitude": np.abs(a) * vnorm[:, None], "effect": a * (self.V @ self.G.T),
                "cosine": np.where(n > 0, a / np.where(n > 0, n, 1.0), 0.0)}

    def _scales(self) -> dict[str, np.ndarray]:
        """|terms| bounds: a float32 evaluation of score t is within ~n·2⁻²⁴ of this."""
        aa = self.alpha_abs()
        vnorm = np.linalg.norm(self.V, axis=1)
        n = self.norms()
        return {"attention": aa, "magnitude": aa * vnorm[:, None], "effect": aa * (np.abs(self.V) @ np.abs(self.G).T),
                "cosine": np.where(n > 0, aa / np.where(n > 0, n, 1.0), 0.0) + 1e-7}

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
    train_input: np.ndarray | None = None  # [N, ...] as stored (ints widened to int64)
    cache: dict = field(default_factory=dict)

    @property
    def n_tasks(self) -> int:
        return max(len(self.manifest["tasks"]), 1)

    @property
    def n_classes(self) -> int:
        return max(len(self.manifest["classes"]), 1)

    # ------------------------------------------------------------------ text runs
    @property
    def text(self) -> bool:
        return self.manifest["input"].get("kind") == "text" and self.train_input is not None

    @property
    def labels_are_tokens(self) -> bool:
        vocab = self.manifest["input"].get("vocab")
        classes = self.manifest["classes"]
        return self.text and isinstance(vocab, list) and len(classes) > 0 and [str(c) for c in classes] == [str(v) for v in vocab]

    @property
    def span(self) -> int:
        """Positions per training window: input `context`, else the width of train/input."""
        ctx = self.manifest["input"].get("context")
        if isinstance(ctx, int) and not isinstance(ctx, bool) and ctx > 0:
            return ctx
        if self.train_input is not None and self.train_input.ndim == 2:
            return max(int(self.train_input.shape[1]), 1)
        return 1

    def groups(self, L: str) -> tuple[str, ...]:
        """The groupings valid at layer L: by position only where patterns have positions."""
        return ("pattern", "example") + (("position",) if self.layers[L].position is not None else ())

    def next_token(self, example: np.ndarray, position: np.ndarray) -> np.ndarray:
        """The token after (e, p): train/input[e, p+1], or train/label[e] past the window."""
        windows = self.train_input.reshape(len(self.train_input), -1)
        example, position = np.asarray(example, dtype=np.int64), np.asarray(position, dtype=np.int64)
        out = self.train_label[example].copy()
        inside = position + 1 < windows.shape[1]
        out[inside] = windows[example[inside], position[inside] + 1]
        return out

    def pattern_class(self, L: str) -> np.ndarray:
        """[T] the class each pattern of layer L counts for (masses, votes, row labels)."""
        lay = self.layers[L]
        if self.labels_are_tokens and lay.position is not None:
            return self.next_token(lay.example, lay.position)
        return self.train_label[lay.example]

    def slot_class(self, slots: np.ndarray) -> np.ndarray:
        """The label of position rows: the token after (e, p) in a language model."""
        e, p = np.asarray(slots) // self.span, np.asarray(slots) % self.span
        return self.next_token(e, p) if self.labels_are_tokens else self.train_label[e]

    @classmethod
    def _build(cls, manifest: dict, get, has) -> "Brute":
        layers = {}
        v2 = manifest.get("version") == 2
        # A version-2 bundle is read here only when every layer has exactly one query row per
        # test item (an MLP): then its "test" set is the version-1 layout under other names.
        # Items with many rows are brute-forced in independent_v2.py.
        q_name = (lambda L: f"queries/test/layer/{L}/query") if v2 else (lambda L: f"layer/{L}/queries")
        g_name = (lambda L: f"queries/test/layer/{L}/grad") if v2 else (lambda L: f"layer/{L}/query_grad")
        t_name = (lambda f: f"queries/test/{f}") if v2 else (lambda f: f"test/{f}")
        for spec in manifest["layers"]:
            if v2:
                M = len(get(t_name("label")))
                assert np.array_equal(get(f"queries/test/layer/{spec['name']}/item").astype(np.int64), np.arange(M)), \
                    "bruteforce_v1 reads one query row per item only"
                assert np.array_equal(get(f"queries/test/layer/{spec['name']}/focus").astype(np.int64), np.arange(M))
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
                Q=get(q_name(L)).astype(np.int64) if emb else get(q_name(L)),
                G=get(g_name(L)), W=get(f"layer/{L}/weight"), w0=get(f"layer/{L}/w0"),
                b=get(f"layer/{L}/bias") if bias else None, b0=get(f"layer/{L}/b0") if bias else None,
            )
        ints = lambda n: get(n).astype(np.int64)  # noqa: E731
        text = manifest["input"].get("kind") == "text" and has("train/input")
        return cls(manifest, layers, ints("train/task"), ints("train/label"), ints(t_name("label")), ints(t_name("task")),
                   ints(t_name("prediction")), train_input=ints("train/input") if text else None)

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
            count = np.bincount(lay.example, minlength=n)
            sums, scales = {s: by_column(sc[s]) for s in SCORES}, {s: by_column(ab[s]) for s in SCORES}
            for d in (sums, scales):  # a group's cosine is the mean over its patterns, not the sum
                d["cosine"] = d["cosine"] / np.maximum(count, 1)[:, None]
            self.cache[key] = (sums, scales, count)
        return self.cache[key]

    def position_sums(self, L: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray]:
        """Per training token, slot e·span + p [N·span, M]: Σ score, Σ scale, and the count."""
        key = ("position_sums", L)
        if key not in self.cache:
            lay = self.layers[L]
            assert lay.position is not None
            n = len(self.train_label) * self.span
            slot = lay.example * self.span + lay.position
            assert slot.size == 0 or (lay.position.min() >= 0 and lay.position.max() < self.span)
            sc, ab = lay.scores(), lay.scales()
            M = len(lay.G)

            def by_slot(x: np.ndarray) -> np.ndarray:
                out = np.zeros((n, M))
                np.add.at(out, slot, x)
                return out

            count = np.bincount(slot, minlength=n)
            sums, scales = {s: by_slot(sc[s]) for s in SCORES}, {s: by_slot(ab[s]) for s in SCORES}
            for d in (sums, scales):
                d["cosine"] = d["cosine"] / np.maximum(count, 1)[:, None]
            self.cache[key] = (sums, scales, count)
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
        ids = {"task": (self.train_task[lay.example], self.n_tasks), "class": (self.pattern_class(L), self.n_classes),
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
        cls_of = self.pattern_class(L)
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
    elif family == "lm":
        # A language model: classes are the vocabulary, so a pattern's class is the token after
        # its position. Windows hold exactly `context` (4) tokens: positions 0..2 find that token
        # in train/input[e, p + 1], position 3 in train/label[e]. 8 windows × 4 positions = 32
        # training tokens for 40-odd patterns per layer: tokens revisited, and some never seen.
        plans = [LayerPlan("tok.emb", kind="embedding", in_features=7, out_features=3, bias=False, patterns=46),
                 LayerPlan("mix", in_features=3, out_features=5, bias=True, patterns=40),
                 LayerPlan("head", in_features=5, out_features=7, bias=False, patterns=43)]
        vb = iv.make_valid_bundle(rng, plans, storage=storage, n_train=8, n_test=N_TEST, labels_are_tokens=True,
                                  tasks=["corpus"])
        assert vb.manifest["classes"] == vb.manifest["input"]["vocab"] and vb.tensors["train/input"].shape == (8, 4)
        for spec in vb.manifest["layers"]:  # both ways of finding the next token are exercised
            pos = vb.tensors[f"layer/{spec['name']}/position"].data
            assert (pos == 3).any() and (pos < 3).any()
    elif family == "text":
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
    else:
        raise ValueError(f"unknown family {family!r}")
    if layout in ("chunked", "sharded"):
        for spec in vb.manifest["layers"]:
            T = spec["patterns"]
            rechunk(vb, spec["name"], [T // 3, 0, T - T // 3 - 1, 1, 0])  # empty middle and last chunks
    return vb


def write(vb: iv.ValidBundle, path: Path, layout: str) -> Path:
    return vb.write_sharded(path, shards=3) if layout == "sharded" else vb.write(path)


# ----------------------------------------------------------------------------- checks
def determined_all(scores: np.ndarray, values: np.ndarray, tol: float) -> np.ndarray:
    """`determined` for each of `values` at once ([k] bool)."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return np.zeros(0, dtype=bool)
    near = np.abs(scores[None, :] - values[:, None]) <= tol
    return ~np.any(near & (scores[None, :] != values[:, None]), axis=1)


def _close(got, want, rel: float, tol, what: str) -> None:
    """|got - want| <= max(rel·|want|, tol) elementwise (pytest.approx's rule, vectorised)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    bound = np.maximum(rel * np.abs(want), tol)
    bad = np.nonzero(~(np.abs(got - want) <= bound))[0]
    assert not len(bad), f"{what}: rows {bad.tolist()[:5]} got {got[bad][:5]}, brute force {want[bad][:5]} (±{bound[bad][:5]})"


def _check_rows(ranked, by: str, reverse: bool, s: np.ndarray, order: np.ndarray, ids: np.ndarray,
                want: dict[str, np.ndarray], rel: float, atol: dict[str, np.ndarray], tol: float, what: str) -> None:
    """Shared part of the rank checks. `s` are the candidates' scores (in candidate order, so
    ties go to the lower candidate), `order` the brute-force top (candidate positions), `ids`
    the rows' own candidate positions, `want` the brute force's scores at `ids`, each row's
    fields within max(rel·|want|, atol)."""
    np.testing.assert_allclose([r.score for r in ranked], s[order], rtol=0, atol=tol)
    assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
    for name in SCORES:
        _close([getattr(r, name) for r in ranked], want[name], rel, atol[name], f"{what} {name}")
    assert all(r.score == getattr(r, by) for r in ranked)
    fixed = determined_all(s, s[order], tol)
    wrong = np.nonzero(fixed & (ids != order))[0]
    assert not len(wrong), f"{what}: rank {wrong[0] + 1} holds {ids[wrong[0]]}, brute force {order[wrong[0]]} (score {s[order[wrong[0]]]})"
    scores = [r.score for r in ranked]
    assert scores == sorted(scores, reverse=not reverse)
    assert len(set(ids.tolist())) == len(ranked)


def check_pattern_ranks(bf: Brute, L: str, m: int, ranked, by: str, reverse: bool, top: int) -> None:
    lay = bf.layers[L]
    sc, ab = lay.scores(), lay.scales()
    s = sc[by][:, m]
    tol = REL * max(float(ab[by][:, m].max(initial=0.0)), 1e-12)
    order = ranking(s, reverse)[:top]
    assert len(ranked) == min(top, lay.T)
    t = np.array([r.pattern for r in ranked], dtype=np.int64)
    assert all(r.patterns is None for r in ranked)
    # the result's own fields are those of pattern t (exact float64 re-scoring)
    _check_rows(ranked, by, reverse, s, order, t, {n: sc[n][t, m] for n in SCORES}, 1e-9,
                {n: 1e-12 * (1 + ab[n][t, m]) for n in SCORES}, tol, f"layer {L} test {m} patterns by {by}")
    assert [r.step for r in ranked] == lay.step[t].tolist() and [r.example for r in ranked] == lay.example[t].tolist()
    assert [r.task for r in ranked] == bf.train_task[lay.example[t]].tolist()
    assert [r.label for r in ranked] == bf.pattern_class(L)[t].tolist()
    assert [r.position for r in ranked] == ([None] * len(t) if lay.position is None else lay.position[t].tolist())


def check_example_ranks(bf: Brute, L: str, m: int, ranked, by: str, reverse: bool, top: int) -> None:
    sums, scale, count = bf.example_sums(L)
    seen = np.nonzero(count)[0]
    s = sums[by][seen, m]
    tol = REL * max(float(scale[by][seen, m].max(initial=0.0)), 1e-12)
    order = ranking(s, reverse)[:top]
    assert len(ranked) == min(top, len(seen))
    e = np.array([r.example for r in ranked], dtype=np.int64)
    assert np.all(count[e] > 0)
    assert all(r.pattern is None and r.step is None for r in ranked)
    assert [r.patterns for r in ranked] == count[e].tolist()
    _check_rows(ranked, by, reverse, s, order, np.searchsorted(seen, e), {n: sums[n][e, m] for n in SCORES}, 0.0,
                {n: REL * scale[n][e, m] + 1e-12 for n in SCORES}, tol, f"layer {L} test {m} examples by {by}")
    assert [r.task for r in ranked] == bf.train_task[e].tolist() and [r.label for r in ranked] == bf.train_label[e].tolist()


def check_position_ranks(bf: Brute, L: str, m: int, ranked, by: str, reverse: bool, top: int) -> None:
    """Training tokens: slot e·span + p, ties broken by the lower slot."""
    sums, scale, count = bf.position_sums(L)
    span = bf.span
    seen = np.nonzero(count)[0]
    s = sums[by][seen, m]
    tol = REL * max(float(scale[by][seen, m].max(initial=0.0)), 1e-12)
    order = ranking(s, reverse)[:top]
    assert len(ranked) == min(top, len(seen))
    e = np.array([r.example for r in ranked], dtype=np.int64)
    p = np.array([r.position for r in ranked], dtype=np.int64)
    assert np.all((0 <= p) & (p < span))
    slot = e * span + p
    assert np.all(count[slot] > 0)
    assert all(r.pattern is None and r.step is None for r in ranked)
    assert [r.patterns for r in ranked] == count[slot].tolist()
    _check_rows(ranked, by, reverse, s, order, np.searchsorted(seen, slot), {n: sums[n][slot, m] for n in SCORES}, 0.0,
                {n: REL * scale[n][slot, m] + 1e-12 for n in SCORES}, tol, f"layer {L} test {m} tokens by {by}")
    assert [r.task for r in ranked] == bf.train_task[e].tolist() and [r.label for r in ranked] == bf.slot_class(slot).tolist()


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


CHECK_RANKS = {"pattern": check_pattern_ranks, "example": check_example_ranks, "position": check_position_ranks}


def check_all(bf: Brute, L: str, tests: list[int], res: list, top: int, step_bins: int = 20,
              groups: tuple[str, ...] | None = None) -> None:
    """Everything a spotlights() call with the default scores/reverse, summary and masses
    returned; `groups` defaults to every grouping valid at the layer (Brute.groups)."""
    groups = bf.groups(L) if groups is None else tuple(groups)
    assert [r.test for r in res] == tests
    for m, sp in zip(tests, res):
        assert sp.layer == L
        assert set(sp.ranked) == {(b, g, r) for b in SCORES for g in groups for r in (False, True)}
        for b in SCORES:
            for r in (False, True):
                for g in groups:
                    CHECK_RANKS[g](bf, L, m, sp.ranked[(b, g, r)], b, r, top)
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


