"""Every pattern belongs to the right training example (issue: attribution you can prove).

Each case of the issue's "what was seen" is recorded here with models built from PyTorch's own
modules where they exist, and every pattern's example id, key and value is checked against a
brute force that re-runs each example alone on the same weights (attribution_bruteforce.py).
A layout the recorder cannot map must be refused with one line, before any weight changes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attribution_bruteforce import check_layer, train
from dualtui.bundle import Bundle
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder, RecorderError
from dualtui.record import recorder as recorder_mod

@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def ce_sum(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


# ----------------------------------------------------------------------------- sequence-first inputs
class SeqFirstMLP(nn.Module):
    """A per-position MLP on [L, B, C] inputs (PyTorch's default layout for sequences)."""

    def __init__(self, c: int = 3, h: int = 5, k: int = 4):
        super().__init__()
        self.fc = nn.Linear(c, h)
        self.out = nn.Linear(h, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.fc(x)))


def _seq_batches(L: int, B: int, steps: int, c: int = 3, k: int = 4, n: int = 12):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, L, c, generator=g)
    Y = torch.randint(0, k, (n, L), generator=g)
    out = []
    for s in range(steps):
        ids = torch.randperm(n, generator=g)[:B]
        out.append((X[ids].transpose(0, 1).contiguous(), ids, Y[ids].transpose(0, 1).contiguous()))
    return out


@pytest.mark.parametrize("L,B", [(3, 4), (4, 4)])  # (4, 4): the shapes leave the layout open
def test_sequence_first_linear_patterns_belong_to_their_examples(tmp_path, L, B) -> None:
    torch.manual_seed(0)
    model = SeqFirstMLP()
    batches = _seq_batches(L, B, steps=4)
    kw = {}
    if L == B:
        # Positions that never interact are exactly as independent as examples: no gradient can
        # tell [L, B] from [B, L]. Refused, with the one declaration that settles it.
        with pytest.raises(RecorderError, match=r"output_layout='batch-first' or 'sequence-first'") as e:
            train(SeqFirstMLP(), tmp_path / "r.safetensors", batches, ce_sum)
        assert "\n" not in str(e.value) and "[4, 4, 3]" in str(e.value)
        assert not (tmp_path / "r.safetensors").exists()
        kw = {"output_layout": "sequence-first"}  # the layers are then decided by the check
    run = train(model, tmp_path / "r.safetensors", batches, ce_sum, **kw)
    sel, sel_y = (lambda x, r: x[:, r : r + 1]), (lambda y, r: y[:, r : r + 1])
    for layer in ("fc", "out"):
        assert check_layer(run, layer, sel, sel_y, ce_sum) == 4 * B * L
    b = Bundle.open(run.path)
    assert b.manifest.layer("fc").extra["rows"] == "sequence-first"
    a = b.manifest.attribution
    assert a["checked"] and a["max_relative_error"] < 1e-9
    assert verify_bundle(b).ok


def test_real_transformer_encoder_layer_sequence_first(tmp_path) -> None:
    """nn.TransformerEncoderLayer(batch_first=False): the feed-forward Linears see [L, B, E], and
    record_test takes the items from axis 1 of [L, M, E] test inputs."""
    torch.manual_seed(0)
    L, B, E, M = 5, 3, 8, 4

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=False)
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            return self.head(self.enc(x))

    model = Net()
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(10, L, E, generator=g), torch.randint(0, 3, (10, L), generator=g)
    batches = []
    for s in range(3):
        ids = torch.randperm(10, generator=g)[:B]
        batches.append((X[ids].transpose(0, 1), ids, Y[ids].transpose(0, 1)))
    layers = ["enc.linear1", "enc.linear2", "head"]
    run = train(model, tmp_path / "enc.safetensors", batches, ce_sum, layers=layers)
    sel, sel_y = (lambda x, r: x[:, r : r + 1]), (lambda y, r: y[:, r : r + 1])
    for layer in layers:
        assert check_layer(run, layer, sel, sel_y, ce_sum, rtol=1e-5) == 3 * B * L
    # record_test on a fresh recorder of the trained model: M items, every position a query row
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "t.safetensors", layers=layers)
    xt = torch.randn(L, M, E, generator=g)
    pred = rec.record_test(xt, torch.zeros(M, dtype=torch.long), read="last")
    rec.close()
    assert pred.shape == (M,)
    with torch.no_grad():
        want = model.eval()(xt)[-1].argmax(-1).numpy()  # [L, M, C]: the last position of each item
    np.testing.assert_array_equal(pred, want)
    qs = Bundle.open(tmp_path / "t.safetensors").queries()
    rows = qs.rows("enc.linear1", np.arange(M))
    np.testing.assert_array_equal(rows.item, np.repeat(np.arange(M), L))
    seen = []
    h = model.enc.linear1.register_forward_hook(lambda mod, a, out: seen.append(a[0].detach()))
    with torch.no_grad():
        model(xt)
    h.remove()
    np.testing.assert_allclose(rows.query, seen[0].transpose(0, 1).reshape(-1, E).numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- broadcast inputs
class PosModel(nn.Module):
    """Token + position embeddings with position ids of shape [1, L] (the Hugging Face default)."""

    def __init__(self, vocab: int = 7, L: int = 8, E: int = 4, k: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, E)
        self.pos = nn.Embedding(L, E)
        self.head = nn.Linear(E, k)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        position_ids = torch.arange(ids.shape[1])[None, :]  # [1, L], broadcast over the batch
        return self.head(torch.tanh(self.tok(ids) + self.pos(position_ids)))


@pytest.mark.parametrize("L,B", [(8, 4), (6, 4), (4, 4)])  # L a multiple of B, not, and L == B
def test_broadcast_position_ids_get_one_pattern_per_example(tmp_path, L, B) -> None:
    torch.manual_seed(0)
    model = PosModel(L=L)
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randint(0, 7, (12, L), generator=g), torch.randint(0, 3, (12, L), generator=g)
    batches = [(X[ids], ids, Y[ids]) for ids in (torch.randperm(12, generator=g)[:B] for _ in range(3))]
    if L == B:
        # [1, L] with L == B: one row per position shared by the batch, or one position of a
        # sequence-first batch. The two need different inputs, so it must be declared.
        with pytest.raises(RecorderError, match=r"layer 'pos' got an input of shape \[1, 4\] in a batch of 4"):
            train(model, tmp_path / "p.safetensors", batches, ce_sum, output_layout="batch-first")
        assert not (tmp_path / "p.safetensors").exists()
        run = train(model, tmp_path / "p.safetensors", batches, ce_sum, layouts={"pos": "batch-first"},
                    output_layout="batch-first")
    else:
        run = train(model, tmp_path / "p.safetensors", batches, ce_sum)
    sel, sel_y = (lambda x, r: x[r : r + 1]), (lambda y, r: y[r : r + 1])
    for layer in ("tok", "pos", "head"):
        assert check_layer(run, layer, sel, sel_y, ce_sum) == 3 * B * L
    b = Bundle.open(run.path)
    assert b.manifest.layer("pos").extra["rows"] in ("broadcast", "batch-first")
    assert verify_bundle(b).ok


# ----------------------------------------------------------------------------- rows that are not examples
class Mlp(nn.Module):
    def __init__(self, c: int = 4, h: int = 6, k: int = 3):
        super().__init__()
        self.fc = nn.Linear(c, h)
        self.out = nn.Linear(h, k)

    def forward(self, x):
        return self.out(F.relu(self.fc(x)))


def _two_view_batches(B: int = 4, steps: int = 3):
    g = torch.Generator().manual_seed(3)
    X, Y = torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g)
    out = []
    for _ in range(steps):
        ids = torch.randperm(12, generator=g)[:B]
        v1 = X[ids] + 0.1 * torch.randn(B, 4, generator=g)  # two augmented views
        v2 = X[ids] + 0.1 * torch.randn(B, 4, generator=g)
        out.append((torch.cat([v1, v2]), ids, torch.cat([Y[ids], Y[ids]])))
    return out


def test_two_views_with_one_id_per_row_are_exact(tmp_path) -> None:
    torch.manual_seed(0)
    batches = [(x, torch.cat([ids, ids]), y) for x, ids, y in _two_view_batches()]
    run = train(Mlp(), tmp_path / "v.safetensors", batches, ce_sum)
    sel, sel_y = (lambda x, r: x[r : r + 1]), (lambda y, r: y[r : r + 1])
    for layer in ("fc", "out"):
        assert check_layer(run, layer, sel, sel_y, ce_sum) == 3 * 8


def test_two_views_with_one_id_per_example_are_refused(tmp_path) -> None:
    """2B rows for B ids: example-major or example-minor? The model's output cannot say either,
    so the recorder refuses before the first step and writes nothing."""
    torch.manual_seed(0)
    with pytest.raises(RecorderError) as e:
        train(Mlp(), tmp_path / "v.safetensors", _two_view_batches(), ce_sum)
    msg = str(e.value)
    assert "\n" not in msg and "'fc'" in msg and "[8, 4]" in msg and "4 example ids" in msg
    assert "batch(example=" in msg
    assert not (tmp_path / "v.safetensors").exists()


def test_two_views_declared_sequence_first_are_decided_and_exact(tmp_path) -> None:
    """The same rows declared example-minor ([view][example]) per layer, and per model output."""
    torch.manual_seed(0)
    run = train(Mlp(), tmp_path / "v.safetensors", _two_view_batches(), ce_sum,
                layouts={"*": "sequence-first"}, check_attribution=False)
    sel, sel_y = (lambda x, r: x[r : r + 1]), (lambda y, r: y[r : r + 1])
    run.steps = [type(st)(st.state, st.x, torch.cat([st.ids, st.ids]), st.y) for st in run.steps]
    for layer in ("fc", "out"):
        assert check_layer(run, layer, sel, sel_y, ce_sum) == 3 * 8


# ----------------------------------------------------------------------------- a layer called several times
class LinearRNN(nn.Module):
    """An Elman RNN written with nn.Linear cells, batch-first [B, T, C]: each cell runs T times."""

    def __init__(self, c: int = 3, h: int = 5, k: int = 3):
        super().__init__()
        self.wx = nn.Linear(c, h)
        self.wh = nn.Linear(h, h, bias=False)
        self.out = nn.Linear(h, k)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.wh.in_features)
        for t in range(x.shape[1]):
            h = torch.tanh(self.wx(x[:, t]) + self.wh(h))
        return self.out(h)


def test_rnn_cell_calls_are_all_patterns_and_all_queries(tmp_path) -> None:
    torch.manual_seed(0)
    T, B = 4, 3
    g = torch.Generator().manual_seed(4)
    X, Y = torch.randn(9, T, 3, generator=g), torch.randint(0, 3, (9,), generator=g)
    batches = [(X[ids], ids, Y[ids]) for ids in (torch.randperm(9, generator=g)[:B] for _ in range(3))]
    run = train(LinearRNN(), tmp_path / "rnn.safetensors", batches, ce_sum)
    sel, sel_y = (lambda x, r: x[r : r + 1]), (lambda y, r: y[r : r + 1])
    assert check_layer(run, "wx", sel, sel_y, ce_sum) == 3 * B * T
    assert check_layer(run, "wh", sel, sel_y, ce_sum) == 3 * B * T
    assert check_layer(run, "out", sel, sel_y, ce_sum) == 3 * B
    # record_test keeps every call: T query rows per item at the cells, the last one in focus
    model = run.model
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "q.safetensors")
    xt = torch.randn(5, T, 3, generator=g)
    rec.record_test(xt, torch.zeros(5, dtype=torch.long))
    rec.close()
    qs = Bundle.open(tmp_path / "q.safetensors").queries()
    rows = qs.rows("wx", np.arange(5))
    np.testing.assert_array_equal(rows.item, np.repeat(np.arange(5), T))
    np.testing.assert_array_equal(rows.call, np.tile(np.arange(T), 5))
    np.testing.assert_allclose(rows.query, xt.reshape(-1, 3).numpy(), atol=0)
    np.testing.assert_array_equal(rows.focus, np.arange(5) * T + T - 1)


# ----------------------------------------------------------------------------- the check itself
def test_attribution_check_catches_a_swapped_pair(tmp_path, monkeypatch) -> None:
    """A test double of the recorder's mapping that swaps two rows' example ids: the dual form
    still holds (verify cannot see it), but the attribution check stops the run."""
    real = recorder_mod._Call.example_ids

    def swapped(self):
        ids = real(self).clone()
        ids[[0, 1]] = ids[[1, 0]]
        return ids

    monkeypatch.setattr(recorder_mod._Call, "example_ids", swapped)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    batches = [(X[ids], ids, Y[ids]) for ids in (torch.randperm(8, generator=g)[:4] for _ in range(3))]
    with pytest.raises(RecorderError, match="attribution check failed at layer 'fc', step 0") as e:
        train(Mlp(), tmp_path / "s.safetensors", batches, ce_sum)
    assert "\n" not in str(e.value)


def test_attribution_check_results_reach_verify_and_info(tmp_path) -> None:
    from typer.testing import CliRunner

    from dualtui.cli import app

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(6)
    X, Y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    batches = [(X[ids], ids, Y[ids]) for ids in (torch.randperm(8, generator=g)[:4] for _ in range(6))]
    train(Mlp(), tmp_path / "on.safetensors", batches, ce_sum)
    train(Mlp(), tmp_path / "off.safetensors", batches, ce_sum, check_attribution=False)
    import json

    runner = CliRunner()
    on = json.loads(runner.invoke(app, ["verify", str(tmp_path / "on.safetensors"), "--json"]).stdout)
    assert on["attribution"]["checked"] and on["attribution"]["steps"] == [0, 1, 2, 4]
    assert on["attribution"]["max_relative_error"] < 1e-9
    assert set(on["attribution"]["layers"]) == {"fc", "out"}
    off = json.loads(runner.invoke(app, ["info", str(tmp_path / "off.safetensors"), "--json"]).stdout)
    assert off["attribution"] == {"checked": False, "reason": "turned off (check_attribution=False)"}
    text = runner.invoke(app, ["verify", str(tmp_path / "off.safetensors")]).stdout
    assert "attribution: not checked (turned off (check_attribution=False))" in text
    text = runner.invoke(app, ["info", str(tmp_path / "on.safetensors")]).stdout
    assert "attribution: example ids checked at 4 steps (0, 1, 2, 4)" in text


def test_loss_computed_without_the_output_is_reported_unchecked(tmp_path) -> None:
    """A Hugging Face style forward that returns the loss it computed inside: the check cannot
    weight the examples' output gradients, and the bundle says so instead of claiming a proof."""

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Mlp()

        def forward(self, x, y):
            logits = self.net(x)
            return {"loss": ce_sum(logits, y), "logits": logits.detach()}

    torch.manual_seed(0)
    model = WithLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(7)
    X, Y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
    with Recorder(model, opt, tmp_path / "h.safetensors") as rec:
        for _ in range(3):
            ids = torch.randperm(8, generator=g)[:4]
            with rec.batch(example=ids):
                model(X[ids], Y[ids])["loss"].backward()
            opt.step()
            opt.zero_grad()
    a = Bundle.open(tmp_path / "h.safetensors").manifest.attribution
    assert a["checked"] is False and "output" in a["reason"]


# ----------------------------------------------------------------------------- refused at construction
def test_recorder_refuses_what_the_reader_would_refuse(tmp_path) -> None:
    lin = nn.Linear(3, 2)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="the model itself is an Linear: wrap it"):
        Recorder(lin, opt, tmp_path / "a.safetensors")
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="input kind 'tokens' is not one of image, text, vector"):
        Recorder(model, opt, tmp_path / "a.safetensors", input={"kind": "tokens"})
    with pytest.raises(RecorderError, match="a text input needs 'vocab'"):
        Recorder(model, opt, tmp_path / "a.safetensors", input={"kind": "text"})
    with pytest.raises(RecorderError, match=r"train_inputs rows have shape \[64\], but input\['shape'\] is \[8, 8\]"):
        Recorder(model, opt, tmp_path / "a.safetensors", input={"kind": "image", "shape": [8, 8]},
                 train_inputs=np.zeros((5, 64), np.uint8))
    with pytest.raises(RecorderError, match="train_labels hold 3, but only 2 classes are named"):
        Recorder(model, opt, tmp_path / "a.safetensors", classes=["a", "b"], train_labels=[0, 3])
    with pytest.raises(RecorderError, match="module '1' is a ReLU, which dualtui cannot record"):
        Recorder(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), opt, tmp_path / "a.safetensors", layers=["1"])
    with pytest.raises(RecorderError, match="layouts"):
        Recorder(model, opt, tmp_path / "a.safetensors", layouts={"0": "time-major"})
    assert not list(tmp_path.iterdir())  # nothing was written, not even a spool


def test_record_test_refuses_bad_sets(tmp_path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "a.safetensors", classes=["a", "b"])
    x = torch.randn(4, 3)
    with pytest.raises(RecorderError, match="record_test labels hold 5"):
        rec.record_test(x, [0, 1, 5, 0])
    with pytest.raises(RecorderError, match="query set name 'my set'"):
        rec.record_test(x, [0, 1, 1, 0], name="my set")
    rec.record_test(x, [0, 1, 1, 0])
    with pytest.raises(RecorderError, match="already recorded"):
        rec.record_test(x, [0, 1, 1, 0])
    rec.record_test(x[:2], [0, 1], name="ood")
    rec.close()
    b = Bundle.open(tmp_path / "a.safetensors")
    assert b.query_set_names == ["test", "ood"] and b.queries("ood").size == 2


def test_zero_step_refusal_leaves_an_earlier_bundle_alone(tmp_path) -> None:
    path = tmp_path / "v.safetensors"
    path.write_bytes(b"an earlier complete run")
    with pytest.raises(RecorderError):
        train(Mlp(), path, _two_view_batches(), ce_sum)
    assert path.read_bytes() == b"an earlier complete run"


# ----------------------------------------------------------------------------- Hugging Face BERT
def test_hugging_face_bert_from_a_config(tmp_path) -> None:
    """BertForSequenceClassification built from a small config (no download): word, position
    ([1, L] ids, broadcast) and token-type embeddings and every Linear, checked pattern by
    pattern against each example run alone; the ModelOutput needs no forward=."""
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' (transformers)")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=12, max_position_embeddings=12, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = transformers.BertForSequenceClassification(cfg)

        def forward(self, ids):
            return self.bert(input_ids=ids)  # a SequenceClassifierOutput: the recorder reads .logits

    model = Bert()
    g = torch.Generator().manual_seed(8)
    X, Y = torch.randint(1, 30, (12, 6), generator=g), torch.randint(0, 3, (12,), generator=g)
    X[0, 4:] = 0  # padding (pad_token_id 0): PyTorch gives it no gradient, so it is no pattern
    batches = [(X[ids], ids, Y[ids]) for ids in (torch.tensor([0, 5, 2, 9]), torch.tensor([3, 0, 11, 7]), torch.tensor([1, 4, 6, 8]))]
    n_pad = sum(int((x == 0).sum()) for x, _, _ in batches)
    assert n_pad == 4
    loss = lambda out, y: ce_sum(out.logits, y)  # noqa: E731
    run = train(model, tmp_path / "bert.safetensors", batches, loss)
    b = Bundle.open(run.path)
    assert b.manifest.layer("bert.bert.embeddings.position_embeddings").extra["rows"] == "broadcast"
    a = b.manifest.attribution
    assert a["checked"] and len(a["layers"]) == len(b.manifest.layers) and a["max_relative_error"] < 1e-6
    assert verify_bundle(b).ok
    assert b.manifest.extra["not_covered"] == []  # the LayerNorms' gains and biases are recorded too
    sel, sel_y = (lambda x, r: x[r : r + 1]), (lambda y, r: y[r : r + 1])
    P = "bert.bert."
    for layer, per in ((P + "embeddings.word_embeddings", 6), (P + "embeddings.position_embeddings", 6),
                       (P + "embeddings.token_type_embeddings", 6), (P + "encoder.layer.0.attention.self.query", 6),
                       (P + "encoder.layer.0.output.dense", 6), (P + "pooler.dense", 1), ("bert.classifier", 1)):
        pads = n_pad if layer.endswith("word_embeddings") else 0
        assert check_layer(run, layer, sel, sel_y, loss, rtol=1e-5) == 3 * 4 * per - pads, layer


def test_a_batch_reordered_inside_forward_between_checks_is_caught(tmp_path) -> None:
    """Found by the new-user audit: a model that sorts its batch inside forward (as packed-RNN
    code does) and unsorts afterwards, at steps the powers-of-two schedule skips. The default
    schedule also checks one step in 64 more (drawn by a fixed hash of the step; here step 34),
    so a recurring reorder stops the run, and the partial bundle fails verify."""
    from typer.testing import CliRunner

    from dualtui.cli import app

    class Sorting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 6)
            self.out = nn.Linear(6, 3)
            self.step = 0

        def forward(self, x):
            powers = self.step < 3 or (self.step & (self.step - 1)) == 0
            order = torch.arange(len(x)) if powers else torch.argsort(x[:, 0], descending=True)
            h = torch.relu(self.fc(x[order]))[torch.argsort(order)]  # the hidden layer sees the sorted batch
            return self.out(h)

    torch.manual_seed(0)
    model = Sorting()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(9)
    X, Y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
    path = tmp_path / "sorted.safetensors"
    with pytest.raises(RecorderError, match="attribution check failed at layer 'fc', step 34"):
        with Recorder(model, opt, path) as rec:
            for s in range(60):
                model.step = s
                ids = torch.randperm(16, generator=g)[:4]
                with rec.batch(example=ids):
                    ce_sum(model(X[ids]), Y[ids]).backward()
                opt.step()
                opt.zero_grad()
    b = Bundle.open(path)
    assert b.manifest.training["steps"] == 34  # every step before the failed one is kept ...
    assert b.manifest.attribution["failed"].startswith("step 34, layer 'fc'")
    assert not verify_bundle(b).ok  # ... but the bundle does not pass as proven
    r = CliRunner().invoke(app, ["verify", str(path)])
    assert r.exit_code == 1 and "attribution: FAILED at step 34" in r.stdout
