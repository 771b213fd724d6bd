"""The built-in text experiment: a character Transformer on real text, recorded exactly.

One tiny bundle per module (context 8, width 8, one block, one head, a few SGD steps) is
recorded once and reused: exactness (verify, and float64 to 1e-12 through the Recorder), the
per-token pattern layout, scores against a brute-force numpy computation, reduced-precision
storage, corpus handling and what is left on disk when training stops with an exception.
"""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder
from dualtui.record import text as text_mod
from dualtui.record.text import CharTransformer, TextConfig, TrainingDiverged, record_text
from dualtui.record.text_corpus import CorpusError, Source, make_windows, read_corpus

PROSE = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
    "father had taught him. At the top he trimmed the wick, polished the great brass lens, and "
    "watched the fishing boats slide home past the headland in the fading light.\n\n"
    "Some nights the fog rolled in so thick that he could not see his own hands. Then he rang the "
    "bell every minute until morning, and the sound went out over the water like a slow heartbeat.\n\n"
    "In winter the storms came from the north. Waves broke over the rocks, and spray rattled against "
    "the windows like gravel thrown by a careless child. He kept a logbook of every vessel, every gale "
    "and every strange light on the water, written in a small and careful hand.\n\n"
    "When the supply boat was late he baked bread, mended nets, and read the same three novels again, "
    "each time finding a sentence he was sure had not been there before.\n"
)

CONTEXT = 8
CFG = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=6, batch_size=3, tests=5, lr=0.3, seed=0)


def _decode(vocab: list[str], ids: np.ndarray) -> str:
    return "".join(vocab[i] for i in np.asarray(ids).reshape(-1).tolist())


def _pattern_array(b: Bundle, layer: str, field: str) -> np.ndarray:
    names = b.pattern_names(layer, field)
    return np.concatenate([b.array(n) for n in names])


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "lighthouse.txt"
    p.write_text(PROSE, encoding="utf-8")
    assert len(PROSE) >= 400
    return p


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path):
    out = tmp_path_factory.mktemp("run") / "text.safetensors"
    result = record_text(out, [corpus_file], CFG)
    return result, Bundle.open(result.path)


@pytest.fixture(scope="module")
def revisit_run(tmp_path_factory: pytest.TempPathFactory):
    """A corpus so short that the run wraps into a second epoch: some windows are seen twice
    (13 windows, batches of 4: the fifth step starts the second pass)."""
    out = tmp_path_factory.mktemp("revisit") / "revisit.safetensors"
    src = Source("short", PROSE[:120], "short prose")
    cfg = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=5, batch_size=4, tests=5, seed=1)
    result = record_text(out, cfg=cfg, sources=[src])
    return result, Bundle.open(result.path)


# ----------------------------------------------------------------------------- 1. exactness
def test_float32_bundle_verifies_every_layer(text_run) -> None:
    result, b = text_run
    assert result.steps == CFG.steps and not result.interrupted
    names = b.manifest.layer_names
    assert names[:2] == ["tok", "pos"] and names[-1] == "head"
    assert [s.kind for s in b.manifest.layers][:2] == ["embedding", "embedding"]
    report = verify_bundle(b)
    assert report.ok, report.to_json()
    assert [c.name for c in report.layers] == names
    for c in report.layers:
        assert c.storage_dtype == "F32" and c.rounding_bound == 0.0
        assert c.weight_max_abs_error <= c.tolerance
        assert c.output_max_abs_error is not None and c.output_max_abs_error <= 1e-4
        assert c.patterns == CFG.steps * CFG.batch_size * CONTEXT


def test_manifest_describes_a_character_language_model(text_run, corpus_file: Path) -> None:
    _, b = text_run
    m = b.manifest
    vocab = m.input["vocab"]
    assert m.input["kind"] == "text" and m.input["context"] == CONTEXT
    assert vocab == sorted(set(PROSE)) and m.classes == vocab
    assert m.tasks == ["lighthouse"]
    assert m.optimizer["name"] == "sgd" and m.optimizer["momentum"] == CFG.momentum
    assert m.training["steps"] == CFG.steps and m.training["batch_size"] == CFG.batch_size
    assert str(corpus_file) in m.extra["experiment"]["corpus"]
    assert b.test_size == CFG.tests
    test_input = b.array("queries/test/input")
    assert test_input.shape == (CFG.tests, CONTEXT + 1)
    np.testing.assert_array_equal(b.array("queries/test/label"), test_input[:, -1])
    # every position of every test window is a query row, the last one is the focus
    (qs,) = m.query_sets
    assert (qs.name, qs.rows, qs.read, qs.target, qs.partial_layers) == ("test", "all", "last", "prediction", [])
    # every test window is real held-out text, and the last tenth of the corpus holds it
    held_out = PROSE[int(len(PROSE) * 0.9):]
    for row in test_input:
        assert _decode(vocab, row) in held_out


def test_float64_recorder_is_exact_to_1e12(tmp_path: Path) -> None:
    """Momentum and weight decay in float64: W_T == w0 + valuesᵀ keys, the embedding rows
    == w0 + the values scattered onto their token rows, to 1e-12."""
    windows = make_windows([Source("prose", PROSE, "prose")], CONTEXT, tests=4)
    vocab = windows.vocab.tokens
    train = torch.from_numpy(windows.train[:12])
    torch.manual_seed(0)
    model = CharTransformer(len(vocab), CONTEXT, width=8, blocks=1, heads=2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
    out = tmp_path / "f64.safetensors"
    with Recorder(model, opt, out, classes=vocab, input={"kind": "text", "vocab": vocab, "context": CONTEXT},
                  train_inputs=train.numpy(), train_labels=train[:, -1]) as rec:
        for s in range(4):
            ids = torch.arange(3 * s, 3 * s + 3)
            with rec.batch(example=ids):
                logits = model(train[ids, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), train[ids, 1:].reshape(-1))
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        checked = set()
        for name, mod in model.named_modules():
            if not isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
                continue
            d = rec.dual(name)
            w = mod.weight.detach().numpy()
            assert d["keys"].shape[0] == 4 * 3 * CONTEXT
            if isinstance(mod, torch.nn.Embedding):
                assert d["keys"].dtype == np.int64
                rebuilt = d["w0"].copy()
                np.add.at(rebuilt, d["keys"], d["values"])
            else:
                assert d["keys"].dtype == np.float64 and d["values"].dtype == np.float64
                rebuilt = d["w0"] + d["values"].T @ d["keys"]
                b = mod.bias.detach().numpy()
                assert np.abs(b - (d["b0"] + d["values"].sum(0))).max() <= 1e-12 * max(1.0, np.abs(b).max())
            assert np.abs(w - rebuilt).max() <= 1e-12 * max(1.0, np.abs(w).max()), name
            assert not np.allclose(w, d["w0"]), f"{name} did not learn anything"
            checked.add(name)
    assert {"tok", "pos", "head", "blocks.0.attn.q", "blocks.0.down"} <= checked
    assert verify_bundle(Bundle.open(out)).ok


# ----------------------------------------------------------------------------- 2. per-token patterns
def test_patterns_are_tokens(text_run) -> None:
    _, b = text_run
    train_input = b.array("train/input")
    assert train_input.dtype == np.int64 and train_input.shape[1] == CONTEXT + 1
    T = CFG.steps * CFG.batch_size * CONTEXT
    for spec in b.manifest.layers:
        L = spec.name
        assert spec.patterns == T
        position = _pattern_array(b, L, "position")
        example = _pattern_array(b, L, "example")
        step = _pattern_array(b, L, "step")
        assert position.dtype == np.int64 and example.dtype == np.int64
        np.testing.assert_array_equal(position, np.tile(np.arange(CONTEXT), T // CONTEXT))
        # one example per run of `context` patterns; `batch_size` examples per step
        per_example = example.reshape(-1, CONTEXT)
        assert (per_example == per_example[:, :1]).all()
        np.testing.assert_array_equal(step, np.repeat(np.arange(CFG.steps), CFG.batch_size * CONTEXT))
        assert example.max() < len(train_input)
    tok_keys = _pattern_array(b, "tok", "keys")
    assert tok_keys.dtype == np.int64
    ex, pos = _pattern_array(b, "tok", "example"), _pattern_array(b, "tok", "position")
    np.testing.assert_array_equal(tok_keys, train_input[ex, pos])
    np.testing.assert_array_equal(_pattern_array(b, "pos", "keys"), _pattern_array(b, "pos", "position"))
    # the test queries of the embeddings are every position's token and position; the focus
    # row is the last position (the one whose output predicts the next character)
    test_input = b.array("queries/test/input")
    M = b.test_size
    np.testing.assert_array_equal(b.array("queries/test/layer/tok/query"), test_input[:, :CONTEXT].reshape(-1))
    np.testing.assert_array_equal(b.array("queries/test/layer/pos/query"), np.tile(np.arange(CONTEXT), M))
    for L in ("tok", "pos", "head"):
        np.testing.assert_array_equal(b.array(f"queries/test/layer/{L}/item"), np.repeat(np.arange(M), CONTEXT))
        np.testing.assert_array_equal(b.array(f"queries/test/layer/{L}/focus"), np.arange(M) * CONTEXT + CONTEXT - 1)


def test_training_windows_are_the_corpus(text_run) -> None:
    _, b = text_run
    vocab = b.manifest.input["vocab"]
    train_input = b.array("train/input")
    train_part = PROSE[: int(len(PROSE) * 0.9)]
    for row in train_input:
        window = _decode(vocab, row)
        assert window in train_part
    np.testing.assert_array_equal(b.array("train/label"), train_input[:, -1])


# ----------------------------------------------------------------------------- 3. scores vs brute force
def _item_rows(b: Bundle, layer: str, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Item m's query rows at a layer, straight from the tensors: (queries, grads, focus among them)."""
    item = b.array(f"queries/test/layer/{layer}/item")
    mine = np.nonzero(item == m)[0]
    q = b.array(f"queries/test/layer/{layer}/query")[mine].astype(np.float64)
    g = b.array(f"queries/test/layer/{layer}/grad")[mine].astype(np.float64)
    focus = int(b.array(f"queries/test/layer/{layer}/focus")[m])
    return q, g, int(np.nonzero(mine == focus)[0][0])


def _brute_force(b: Bundle, layer: str, m: int) -> dict[str, np.ndarray]:
    """docs/format.md section 6: attention at the focus row, effect summed over every row."""
    keys = _pattern_array(b, layer, "keys").astype(np.float64)
    values = _pattern_array(b, layer, "values").astype(np.float64)
    q, g, f = _item_rows(b, layer, m)
    alpha_rows = keys @ q.T + (1.0 if b.layer_spec(layer).bias else 0.0)  # [T, rows]
    alpha = alpha_rows[:, f]
    effect = (alpha_rows * (values @ g.T)).sum(axis=1)
    return {"attention": alpha, "magnitude": np.abs(alpha) * np.linalg.norm(values, axis=1), "effect": effect}


def _check_against_brute_force(b: Bundle, layer: str, m: int, top: int) -> None:
    bf = _brute_force(b, layer, m)
    example = _pattern_array(b, layer, "example")
    position = _pattern_array(b, layer, "position")
    train_input = b.array("train/input")
    slot = example * CONTEXT + position
    sums = {s: np.zeros(len(train_input) * CONTEXT) for s in bf}
    for s in bf:
        np.add.at(sums[s], slot, bf[s])
    count = np.bincount(slot, minlength=len(train_input) * CONTEXT)
    seen = np.nonzero(count)[0]

    res = spotlights(b, layer, [m], top=top, groups=["pattern", "position"], reverse=(False, True),
                     summary=True, masses=False, device="cpu")[0]
    for score in bf:
        for rev in (False, True):
            sign = -1.0 if rev else 1.0
            ranked = res.ranked[(score, "pattern", rev)]
            assert len(ranked) == top
            expect = np.sort(sign * bf[score])[::-1][:top] * sign
            got = np.array([r.score for r in ranked])
            np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)  # same values, same order
            for r in ranked:
                t = r.pattern
                assert r.attention == pytest.approx(bf["attention"][t], rel=1e-9, abs=1e-12)
                assert r.magnitude == pytest.approx(bf["magnitude"][t], rel=1e-9, abs=1e-12)
                assert r.effect == pytest.approx(bf["effect"][t], rel=1e-9, abs=1e-12)
                assert (r.example, r.position) == (example[t], position[t])
                assert r.label == train_input[r.example, r.position + 1]  # the next token
            ranked = res.ranked[(score, "position", rev)]
            assert len(ranked) == top
            # grouped sums add float32 per-pattern scores (in float64): float32 accuracy
            expect = np.sort(sign * sums[score][seen])[::-1][:top] * sign
            np.testing.assert_allclose([r.score for r in ranked], expect, rtol=1e-5, atol=1e-6)
            for r in ranked:
                s = r.example * CONTEXT + r.position
                assert r.patterns == count[s]
                for name in bf:
                    assert getattr(r, name) == pytest.approx(sums[name][s], rel=1e-5, abs=1e-6)
                assert r.label == train_input[r.example, r.position + 1]
    # the summary's learned part is Σ α v, and the dual reproduces the primal
    assert res.summary.patterns == len(bf["attention"])
    assert res.summary.primal_dual_error <= 1e-4


def test_scores_match_brute_force_on_the_head(text_run) -> None:
    _, b = text_run
    _check_against_brute_force(b, "head", 1, top=7)


def test_effects_sum_to_the_predicted_logit(text_run) -> None:
    """Last layer: Σ effect + the initial-weight term == the predicted logit (DESIGN.md 3)."""
    _, b = text_run
    m = 2
    bf = _brute_force(b, "head", m)
    q_rows, g_rows, f = _item_rows(b, "head", m)
    q, g = q_rows[f], g_rows[f]
    w = b.array("layer/head/weight").astype(np.float64)
    bias = b.array("layer/head/bias").astype(np.float64)
    w0 = b.array("layer/head/w0").astype(np.float64)
    b0 = b.array("layer/head/b0").astype(np.float64)
    pred = int(b.array("queries/test/prediction")[m])
    assert np.flatnonzero(g).tolist() == [pred] and g[pred] == 1.0  # d logit_pred / d logits
    others = np.delete(g_rows, f, axis=0)
    assert not others.any()  # the head of the other positions does not reach the last logit
    logit = (w @ q + bias)[pred]
    assert bf["effect"].sum() + (w0 @ q + b0) @ g == pytest.approx(logit, rel=1e-5, abs=1e-5)


def test_position_grouping_sums_revisited_tokens(revisit_run) -> None:
    result, b = revisit_run
    count = np.bincount(_pattern_array(b, "head", "example") * CONTEXT + _pattern_array(b, "head", "position"))
    assert count.max() == 2, "the fixture should revisit some windows in a second epoch"
    assert verify_bundle(b).ok
    _check_against_brute_force(b, "head", 0, top=5)


def test_reported_pattern_count_matches_the_bundle(revisit_run) -> None:
    """TextResult.patterns_per_layer is the bundle's patterns per layer, also when a pass over
    the windows ends in a short batch (13 windows in batches of 4)."""
    result, b = revisit_run
    assert result.patterns_per_layer == b.manifest.layers[0].patterns


# ----------------------------------------------------------------------------- 4. reduced precision
@pytest.mark.parametrize("dtype, st", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_precision_storage_verifies(tmp_path: Path, corpus_file: Path, dtype: str, st: str) -> None:
    cfg = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=4, batch_size=2, tests=3, storage_dtype=dtype)
    result = record_text(tmp_path / f"{dtype}.safetensors", [corpus_file], cfg)
    b = Bundle.open(result.path)
    report = verify_bundle(b)
    assert report.ok, report.to_json()
    for c in report.layers:
        assert c.storage_dtype == st
        assert c.rounding_bound > 0.0
        assert c.tolerance >= c.rounding_bound
        assert c.weight_max_abs_error > 0.0  # rounding to half precision shows
        assert c.weight_max_abs_error <= c.tolerance
    assert b.info("layer/head/keys").dtype == st and b.info("layer/head/values").dtype == st
    assert b.info("layer/tok/keys").dtype == "I64"  # token ids stay exact


# ----------------------------------------------------------------------------- 5. corpus handling
@pytest.mark.parametrize(
    "content, problem",
    [(b"", "empty"), (b"   \n\t\r\n  \n", "empty"), (b"some text\x00\x01\x02 more text", "binary"),
     ("caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e".encode("latin-1"), "not UTF-8")],
    ids=["empty", "whitespace", "binary", "latin-1"],
)
def test_read_corpus_rejects_non_text(tmp_path: Path, content: bytes, problem: str) -> None:
    p = tmp_path / "corpus.txt"
    p.write_bytes(content)
    with pytest.raises(CorpusError) as e:
        read_corpus(p)
    msg = str(e.value)
    assert problem in msg and str(p) in msg and "\n" not in msg


def test_read_corpus_missing_directory_and_permission(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="no such file") as e:
        read_corpus(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(CorpusError, match="is a directory") as e:
        read_corpus(tmp_path)
    assert str(tmp_path) in str(e.value)
    p = tmp_path / "locked.txt"
    p.write_text(PROSE)

    def deny(self: pathlib.Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(pathlib.Path, "read_bytes", deny)
    with pytest.raises(CorpusError, match="permission denied") as e:
        read_corpus(p)
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_read_corpus_normalises_line_ends(tmp_path: Path) -> None:
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"first line\r\nsecond line\rthird line\n")
    src = read_corpus(p)
    assert src.text == "first line\nsecond line\nthird line\n"
    assert src.name == "crlf" and src.origin == str(p)
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello world".encode("utf-8"))
    assert read_corpus(bom).text == "hello world"


def test_too_short_corpus(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="too short") as e:
        make_windows([Source("tiny", "just a few words here", "tiny.txt")], CONTEXT)
    assert "tiny.txt" in str(e.value)
    with pytest.raises(CorpusError, match="too short"):
        record_text(tmp_path / "x.safetensors", cfg=CFG, sources=[Source("tiny", "short text", "tiny.txt")])
    assert not (tmp_path / "x.safetensors").exists()


def test_two_corpora_are_two_tasks() -> None:
    a = Source("sea", PROSE, "sea.txt")
    b = Source("bread", PROSE.upper(), "bread.txt")
    w = make_windows([a, b], CONTEXT, tests=6)
    assert w.tasks == ["sea", "bread"] and w.origins == ["sea.txt", "bread.txt"]
    assert set(w.train_task.tolist()) == {0, 1} and set(w.test_task.tolist()) == {0, 1}
    n_sea = int((w.train_task == 0).sum())
    assert _decode(w.vocab.tokens, w.train[0]) == PROSE[: CONTEXT + 1]
    assert _decode(w.vocab.tokens, w.train[n_sea]) == PROSE.upper()[: CONTEXT + 1]
    same = make_windows([a, Source("sea", PROSE, "other/sea.txt")], CONTEXT, tests=2)
    assert same.tasks == ["sea (1)", "sea (2)"]


def test_windows_do_not_overlap_and_reproduce_the_text() -> None:
    w = make_windows([Source("prose", PROSE, "prose")], CONTEXT, tests=5)
    vocab = w.vocab.tokens
    n = len(w.train)
    cut = int(len(PROSE) * 0.9)
    assert w.chars == [(cut, len(PROSE) - cut)]
    assert n == (cut - 1) // CONTEXT
    np.testing.assert_array_equal(w.train_offset, np.arange(n) * CONTEXT)
    # the inputs of consecutive windows tile the training text; each target is the next input
    inputs = "".join(_decode(vocab, row[:CONTEXT]) for row in w.train)
    assert inputs == PROSE[: n * CONTEXT]
    np.testing.assert_array_equal(w.train[:-1, CONTEXT], w.train[1:, 0])
    for off, row in zip(w.train_offset, w.train):
        assert _decode(vocab, row) == PROSE[off : off + CONTEXT + 1]
    # test windows come from the held-out tail only
    assert w.test.shape == (5, CONTEXT + 1)
    for row in w.test:
        assert _decode(vocab, row) in PROSE[cut:]


# ----------------------------------------------------------------------------- 6. exceptions
def _check_partial_bundle(path: Path, steps: int, reason: str) -> Bundle:
    b = Bundle.open(path)
    assert b.manifest.training["steps"] == steps
    assert b.manifest.training["interrupted"] == reason
    for spec in b.manifest.layers:
        assert spec.patterns == steps * 2 * CONTEXT
    report = verify_bundle(b)
    assert report.ok, report.to_json()
    return b


def test_exception_in_training_keeps_completed_steps(tmp_path: Path, corpus_file: Path) -> None:
    cfg = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=6, batch_size=2, tests=3)
    out = tmp_path / "broken.safetensors"

    def on_step(done: int, total: int, loss: float) -> None:
        if done == 3:
            raise RuntimeError("the training loop broke")

    with pytest.raises(RuntimeError, match="broke"):
        record_text(out, [corpus_file], cfg, on_step=on_step)
    _check_partial_bundle(out, 3, "RuntimeError")
    assert not list(tmp_path.glob(".*spool*")), "the spool directory was left behind"


def test_diverged_training_keeps_completed_steps(tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=6, batch_size=2, tests=3)
    calls = {"n": 0}

    class NaNOnThirdLoss:
        def __getattr__(self, name: str):
            return getattr(F, name)

        @staticmethod
        def cross_entropy(*args, **kwargs):
            calls["n"] += 1
            loss = F.cross_entropy(*args, **kwargs)
            return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(text_mod, "F", NaNOnThirdLoss())
    out = tmp_path / "diverged.safetensors"
    with pytest.raises(TrainingDiverged, match="step 2"):
        record_text(out, [corpus_file], cfg)
    _check_partial_bundle(out, 2, "TrainingDiverged")


def test_keyboard_interrupt_keeps_steps_and_tests(tmp_path: Path, corpus_file: Path) -> None:
    cfg = TextConfig(context=CONTEXT, width=8, blocks=1, heads=1, steps=6, batch_size=2, tests=3)

    def on_step(done: int, total: int, loss: float) -> None:
        if done == 2:
            raise KeyboardInterrupt

    result = record_text(tmp_path / "ctrl-c.safetensors", [corpus_file], cfg, on_step=on_step)
    assert result.interrupted and result.steps == 2
    b = _check_partial_bundle(result.path, 2, "KeyboardInterrupt")
    assert b.test_size == 3  # the test items are still recorded after an interrupt
