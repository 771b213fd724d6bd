"""One adapter per module kind, each checked by the same exactness tests: the dual form of every
recorded parameter must reproduce what the real optimizer did to it (float64 ≤ 1e-10), read
off the module in PyTorch's own layout by the test, not through the recorder. Also: models
built from library modules (nn.TransformerEncoder, a ResNet-style CNN with BatchNorm,
Hugging Face GPT-2) leave no trained parameter uncovered; mixed precision; refusals.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attribution_bruteforce import check_layer, train
from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder, RecorderError

F64_TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def ce_sum(out, y):
    out = out.logits if hasattr(out, "logits") else out
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum")


def dual_errors(rec: Recorder, truth: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, float]:
    """max |primal − dual| per layer, the primal taken by the test from the module itself."""
    errs = {}
    for L, (w, b) in truth.items():
        d = rec.dual(L)
        kind = rec.layers[L].spec.kind
        K, V = d["keys"].astype(np.float64), d["values"].astype(np.float64)
        if kind == "elementwise":
            recon = d["w0"] + (V * K).sum(0)
        elif kind == "embedding":
            recon = d["w0"].copy()
            np.add.at(recon, d["keys"].astype(np.int64), V)
        else:
            recon = d["w0"] + V.T @ K
        err = float(np.abs(w.detach().double().numpy() - recon).max())
        if b is not None:
            err = max(err, float(np.abs(b.detach().double().numpy() - (d["b0"] + d["bias_values"].sum(0))).max()))
        errs[L] = err
    return errs


def run(model: nn.Module, batches, loss=ce_sum, path=None, steps_hook=None, **kw) -> Recorder:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    rec = Recorder(model, opt, path, **kw)
    for s, (x, ids, y) in enumerate(batches):
        with rec.batch(example=ids):
            loss(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return rec


def _batches(x_of, n, B, steps, classes=3, per_row_labels=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = x_of(n, g)
    Y = torch.randint(0, classes, (n,) if per_row_labels is None else (n, per_row_labels), generator=g)
    return [(X[ids], ids, Y[ids]) for ids in (torch.randperm(n, generator=g)[:B] for _ in range(steps))], X, Y


# ----------------------------------------------------------------------------- MultiheadAttention
class Attn(nn.Module):
    def __init__(self, batch_first: bool, cross: bool, kdim: int | None = None, E: int = 8):
        super().__init__()
        self.batch_first, self.cross = batch_first, cross
        self.mha = nn.MultiheadAttention(E, 2, batch_first=batch_first, kdim=kdim, vdim=kdim)
        if cross or kdim:
            self.mem = nn.Linear(E, kdim or E)  # the memory of cross-attention (its own layer)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        kv = self.mem(x.flip(1 if self.batch_first else 0)) if hasattr(self, "mem") else x
        y, _ = self.mha(x, kv, kv)
        return self.head(y)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("how", ["self", "cross", "separate"])
def test_multihead_attention_is_exact(tmp_path: Path, batch_first: bool, how: str) -> None:
    torch.manual_seed(0)
    kdim = 5 if how == "separate" else None
    model = Attn(batch_first, how == "cross", kdim)
    L, B = 4, 3
    def x_of(n, g):
        return torch.randn(n, L, 8, generator=g)
    batches, _, _ = _batches(x_of, 10, B, 4, per_row_labels=L)
    if not batch_first:
        batches = [(x.transpose(0, 1), ids, y.transpose(0, 1)) for x, ids, y in batches]
    rec = run(model, batches, path=tmp_path / "a.safetensors")
    m, E = model.mha, 8
    if m._qkv_same_embed_dim:
        W, bias = m.in_proj_weight, m.in_proj_bias
        truth = {f"mha.{p}_proj": (W[i * E:(i + 1) * E], bias[i * E:(i + 1) * E]) for i, p in enumerate("qkv")}
    else:
        truth = {f"mha.{p}_proj": (getattr(m, f"{p}_proj_weight"), m.in_proj_bias[i * E:(i + 1) * E]) for i, p in enumerate("qkv")}
    truth["mha.out_proj"] = (m.out_proj.weight, m.out_proj.bias)
    errs = dual_errors(rec, truth)
    assert max(errs.values()) <= F64_TOL, errs
    x_test = batches[0][0]
    with rec.batch(example=batches[0][1]):
        y_routed = model(x_test).detach()  # through the recorder's routing of the projections
    rec.record_test(x_test, torch.zeros(B, dtype=torch.long), batch_axis=0 if batch_first else 1)
    rec.close()
    b = Bundle.open(tmp_path / "a.safetensors")
    assert b.manifest.extra["not_covered"] == []
    a = b.manifest.attribution
    assert a["checked"] and {"mha.q_proj", "mha.out_proj"} <= set(a["layers"]), a
    assert verify_bundle(b).ok
    # the forward is PyTorch's own: routed, it computes bit for bit what the bare module does
    assert torch.equal(y_routed, model(x_test).detach())
    assert "forward" not in model.mha.__dict__  # the routing is gone with the recorder


def test_multihead_attention_keys_belong_to_their_examples(tmp_path: Path) -> None:
    """q_proj's keys are the attention's query rows: brute force against each example alone."""
    torch.manual_seed(0)
    model = Attn(batch_first=False, cross=False)
    L, B = 4, 3
    batches, _, _ = _batches(lambda n, g: torch.randn(n, L, 8, generator=g), 10, B, 3, per_row_labels=L)
    batches = [(x.transpose(0, 1), ids, y.transpose(0, 1)) for x, ids, y in batches]
    run_ = train(model, tmp_path / "k.safetensors", batches, ce_sum)
    b = Bundle.open(run_.path)
    keys = np.concatenate([c.keys for c in b.chunks("mha.q_proj")])
    step = np.concatenate([c.step for c in b.chunks("mha.q_proj")])
    example = np.concatenate([c.example for c in b.chunks("mha.q_proj")])
    for s, st in enumerate(run_.steps):
        for r, e in enumerate(st.ids.tolist()):
            want = st.x[:, r].numpy()  # the attention's own query rows of example e (its input here)
            got = keys[(step == s) & (example == e)]
            np.testing.assert_allclose(got, want, rtol=1e-12)
    for layer in ("head",):
        assert check_layer(run_, layer, lambda x, r: x[:, r:r + 1], lambda y, r: y[:, r:r + 1], ce_sum) == 3 * B * L


def test_transformer_encoder_covers_every_parameter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    V, L, E = 11, 5, 8

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(V, E)
            layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(E, V)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)))

    model = Enc()
    batches, _, _ = _batches(lambda n, g: torch.randint(0, V, (n, L), generator=g), 12, 4, 4, classes=V, per_row_labels=L)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left uncovered: no NotCovered warning either
        rec = run(model, batches, path=tmp_path / "e.safetensors")
    rec.record_test(batches[0][0], torch.zeros(4, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "e.safetensors")
    assert b.manifest.extra["not_covered"] == []
    names = b.manifest.layer_names
    assert {"enc.layers.0.self_attn.q_proj", "enc.layers.1.norm2"} <= set(names)
    assert verify_bundle(b).ok
    assert b.manifest.attribution["checked"] and not b.manifest.attribution.get("coupled_layers")


# ----------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("cfg", [
    dict(dims=2, stride=1, padding=1, dilation=1, groups=1, bias=True, padding_mode="zeros"),
    dict(dims=2, stride=2, padding=2, dilation=2, groups=2, bias=False, padding_mode="zeros"),
    dict(dims=2, stride=1, padding="same", dilation=1, groups=1, bias=True, padding_mode="reflect"),
    dict(dims=1, stride=2, padding=1, dilation=1, groups=3, bias=True, padding_mode="circular"),
    dict(dims=1, stride=1, padding="valid", dilation=3, groups=1, bias=True, padding_mode="zeros"),
], ids=["2d-plain", "2d-stride-dilation-groups", "2d-same-reflect", "1d-groups-circular", "1d-valid-dilation"])
def test_convolutions_are_exact(tmp_path: Path, cfg: dict) -> None:
    torch.manual_seed(0)
    dims = cfg.pop("dims")
    Conv = nn.Conv2d if dims == 2 else nn.Conv1d
    conv = Conv(6, 6, 3, **cfg)
    shape = (6, 7, 7) if dims == 2 else (6, 11)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))
    model(torch.randn(1, *shape))  # materialise the lazy head
    batches, X, _ = _batches(lambda n, g: torch.randn(n, *shape, generator=g), 10, 4, 4)
    rec = run(model, batches, path=tmp_path / "c.safetensors")
    G = conv.groups
    o = 6 // G
    names = ["0"] if G == 1 else [f"0.group{g}" for g in range(G)]
    truth = {n: (conv.weight[g * o:(g + 1) * o].reshape(o, -1), None if conv.bias is None else conv.bias[g * o:(g + 1) * o])
             for g, n in enumerate(names)}
    errs = dual_errors(rec, truth)
    assert max(errs.values()) <= F64_TOL, errs
    # one pattern per output position of every example, for every group
    with torch.no_grad():
        out_positions = model[0](X[:1]).shape[2:].numel()
    assert rec.layers[names[0]].spec.patterns == 0 and rec.writer.patterns(names[0]) == 4 * 4 * out_positions
    rec.record_test(X[:3], torch.zeros(3, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "c.safetensors")
    assert verify_bundle(b).ok and b.manifest.extra["not_covered"] == []
    conv_info = b.manifest.layer(names[0]).extra["conv"]
    assert conv_info["kernel"] == list(conv.kernel_size) and conv_info["groups"] == G


def test_conv_keys_are_the_patches_of_their_examples(tmp_path: Path) -> None:
    """The key of pattern (example, position) is the input patch there, by brute force."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    batches, _, _ = _batches(lambda n, g: torch.randn(n, 2, 5, 5, generator=g), 8, 3, 3, classes=4)
    run_ = train(model, tmp_path / "p.safetensors", batches, ce_sum)
    b = Bundle.open(run_.path)
    keys = np.concatenate([c.keys for c in b.chunks("0")])
    step, example, pos = (np.concatenate([getattr(c, f) for c in b.chunks("0")]) for f in ("step", "example", "position"))
    for s, st in enumerate(run_.steps):
        for r, e in enumerate(st.ids.tolist()):
            xp = F.pad(st.x[r], (1, 1, 1, 1)).numpy()  # [2, 7, 7]
            mine = (step == s) & (example == e)
            for k, p in zip(keys[mine], pos[mine]):
                i, j = divmod(int(p), 3)
                np.testing.assert_allclose(k, xp[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1), rtol=1e-12)
            assert mine.sum() == 9


# ----------------------------------------------------------------------------- norms
@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "batchnorm1d", "batchnorm2d", "groupnorm"])
def test_norm_gains_and_biases_are_exact(tmp_path: Path, kind: str) -> None:
    torch.manual_seed(0)
    if kind in ("batchnorm2d", "groupnorm"):
        norm = nn.BatchNorm2d(4) if kind == "batchnorm2d" else nn.GroupNorm(2, 4)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), norm, nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3))
        x_of = lambda n, g: torch.randn(n, 2, 5, 5, generator=g)  # noqa: E731
    else:
        norm = {"layernorm": nn.LayerNorm(6), "rmsnorm": nn.RMSNorm(6), "batchnorm1d": nn.BatchNorm1d(6)}[kind]
        model = nn.Sequential(nn.Linear(5, 6), norm, nn.Tanh(), nn.Linear(6, 3))
        x_of = lambda n, g: torch.randn(n, 5, generator=g)  # noqa: E731
    batches, X, _ = _batches(x_of, 16, 6, 5)
    rec = run(model, batches, path=tmp_path / "n.safetensors")
    errs = dual_errors(rec, {"1": (norm.weight, getattr(norm, "bias", None))})
    assert errs["1"] <= F64_TOL, errs
    rec.record_test(X[:4], torch.zeros(4, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "n.safetensors")
    assert b.manifest.layer("1").kind == "elementwise"
    assert verify_bundle(b).ok and b.manifest.extra["not_covered"] == []
    a = b.manifest.attribution
    if kind.startswith("batchnorm"):
        # BatchNorm in training mode mixes the examples' error signals: the layers before it are
        # reported as not checkable, the ones after it are checked.
        assert "0" in a["coupled_layers"] and "3" in a["layers"] if kind == "batchnorm1d" else "0" in a["coupled_layers"]
    else:
        assert not a.get("coupled_layers") and set(a["layers"]) >= {"0", "1"}


def test_elementwise_scores_match_brute_force(tmp_path: Path) -> None:
    """attention k·q, magnitude ‖v ⊙ (k ⊙ q + 1)‖ and effect Σ_r g_r · v ⊙ (k ⊙ q_r + 1) of a
    LayerNorm's patterns, recomputed in numpy from the stored tensors."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
    batches, X, _ = _batches(lambda n, g: torch.randn(n, 5, generator=g), 16, 6, 5)
    rec = run(model, batches, path=tmp_path / "s.safetensors")
    rec.record_test(X[:4], torch.zeros(4, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "s.safetensors")
    K = np.concatenate([c.keys for c in b.chunks("1")])
    V = np.concatenate([c.values for c in b.chunks("1")])
    for m in range(4):
        q = b.array("queries/test/layer/1/query")[m]
        gq = b.array("queries/test/layer/1/grad")[m]
        want = {"attention": K @ q, "magnitude": np.linalg.norm(V * (K * q + 1.0), axis=1),
                "effect": (V * (K * q + 1.0)) @ gq}
        res = spotlights(b, "1", [m], top=5, groups=["pattern"], reverse=(False,), device="cpu")[0]
        for score, w in want.items():
            top = res.ranked[(score, "pattern", False)]
            np.testing.assert_allclose([r.score for r in top], np.sort(w)[::-1][:5], rtol=1e-9)
            for r in top:
                np.testing.assert_allclose([r.attention, r.magnitude, r.effect],
                                           [want["attention"][r.pattern], want["magnitude"][r.pattern], want["effect"][r.pattern]],
                                           rtol=1e-9, atol=1e-14)
        # the summary: the dual reproduces the layer's output γ ⊙ q + β
        assert res.summary.primal_dual_error < 1e-9


def test_resnet_style_cnn_with_batchnorm_covers_everything(tmp_path: Path) -> None:
    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
            self.block = Block(4)
            self.head = nn.Linear(4, 10)

        def forward(self, x):
            return self.head(F.adaptive_avg_pool2d(self.block(F.relu(self.bn(self.stem(x)))), 1).flatten(1))

    torch.manual_seed(0)
    model = Net()
    batches, X, _ = _batches(lambda n, g: torch.randn(n, 1, 6, 6, generator=g), 16, 4, 4, classes=10)
    rec = run(model, batches, path=tmp_path / "r.safetensors")
    rec.record_test(X[:3], torch.zeros(3, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "r.safetensors")
    assert b.manifest.extra["not_covered"] == []
    assert verify_bundle(b).ok
    a = b.manifest.attribution
    assert a["checked"] and "head" in a["layers"] and "stem" in a["coupled_layers"]


# ----------------------------------------------------------------------------- Hugging Face GPT-2
def test_hugging_face_gpt2_from_a_config(tmp_path: Path) -> None:
    """GPT-2: transformers' Conv1D layers (found by behaviour), tied wte / lm_head, LayerNorms,
    broadcast position ids: nothing uncovered, verify passes, patterns belong to their examples."""
    transformers = pytest.importorskip("transformers", reason="pip install -e '.[test]' (transformers)")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = transformers.GPT2LMHeadModel(cfg)

        def forward(self, ids):
            return self.lm(input_ids=ids)

    model = GPT()
    L = 6
    batches, X, Y = _batches(lambda n, g: torch.randint(0, 20, (n, L), generator=g), 10, 3, 3, classes=20, per_row_labels=L)
    run_ = train(model, tmp_path / "gpt2.safetensors", batches, ce_sum)
    b = Bundle.open(run_.path)
    assert b.manifest.extra["not_covered"] == []
    P = "lm.transformer."
    assert b.manifest.layer(P + "h.0.attn.c_attn").kind == "linear"  # a Conv1D
    assert b.manifest.layer(P + "wte").extra["tied"] == b.manifest.layer("lm.lm_head").extra["tied"]
    report = verify_bundle(b)
    assert report.ok, [(c.name, c.weight_max_abs_error, c.tolerance) for c in report.layers if not c.ok]
    sel, sel_y = (lambda x, r: x[r:r + 1]), (lambda y, r: y[r:r + 1])
    for layer in (P + "h.0.attn.c_attn", P + "h.0.mlp.c_proj", P + "wpe", P + "h.0.ln_1", "lm.lm_head"):
        assert check_layer(run_, layer, sel, sel_y, ce_sum, rtol=1e-5) == 3 * 3 * L, layer


# ----------------------------------------------------------------------------- mixed precision
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_and_grad_scaler(tmp_path: Path, dtype: str) -> None:
    """The training loop of PyTorch's AMP recipe: keys as autocast computed them, a step the
    scaler skips contributes no pattern, and verify holds the float32 master weights to its
    reported tolerance (the half-precision matmul's rounding included)."""
    low = getattr(torch, dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4)).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if low is torch.float16 else None
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(64, 10, generator=g, dtype=torch.float32), torch.randint(0, 4, (64,), generator=g)
    path = tmp_path / "amp.safetensors"
    with Recorder(model, opt, path) as rec:
        for s in range(12):
            ids = torch.randperm(64, generator=g)[:8]
            opt.zero_grad()
            with rec.batch(example=ids):
                with torch.autocast("cpu", dtype=low):
                    loss = F.cross_entropy(model(X[ids]), Y[ids])
                if scaler is not None:
                    if s == 5:
                        loss = loss * float("inf")  # an overflow: the scaler skips this step
                    scaler.scale(loss).backward()
                else:
                    loss.backward()
            if scaler is not None:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
        rec.record_test(X[:8], Y[:8])
    b = Bundle.open(path)
    t = b.manifest.training
    assert t["compute_dtype"] == dtype
    skipped = 1 if scaler is not None else 0
    assert t.get("skipped_steps", 0) == skipped and t["steps"] == 12 - skipped
    assert b.manifest.layers[0].patterns == 8 * (12 - skipped)
    report = verify_bundle(b)
    assert report.ok and all(c.rounding_bound > 0 for c in report.layers)
    # the keys are the inputs rounded to the autocast dtype, as the matmul saw them
    k = np.concatenate([c.keys for c in b.chunks("0")])
    assert np.array_equal(k, torch.from_numpy(k).to(low).float().numpy())


def test_half_precision_parameters_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2)).half()
    with pytest.raises(RecorderError, match="float16 parameters: SGD then rounds the weights themselves"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "h.safetensors")


def test_non_finite_gradient_without_a_scaler_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="non-finite gradient"):
        with Recorder(model, opt, tmp_path / "nf.safetensors") as rec:
            with rec.batch(example=torch.arange(4)):
                (model(torch.randn(4, 3)).sum() * float("inf")).backward()
            opt.step()


# ----------------------------------------------------------------------------- recurrent layers
def test_lstm_is_refused_when_named_and_said_when_left(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0][:, -1])

    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecorderError, match=r"LSTM 'lstm' keeps its gate weights in fused parameters .* nn.Linear cells"):
        Recorder(model, opt, tmp_path / "l.safetensors", layers=["lstm"])
    with pytest.warns(UserWarning, match=r"not covered by the dual form: lstm.weight_ih_l0, .*LSTM 'lstm' keeps"):
        rec = Recorder(model, opt, tmp_path / "l.safetensors")
    rec.abort()


def test_conv_and_attention_scores_match_brute_force(tmp_path: Path) -> None:
    """attention k·q + 1, magnitude |α|‖v‖, effect Σ_r α_r (v·g_r) of a convolution's patterns
    (every output position of a test image is a query row) and of an attention projection,
    recomputed in numpy from the stored tensors."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.conv(x)).flatten(2).transpose(1, 2)  # [N, positions, 4]
            return self.head(self.mha(h, h, h)[0].mean(1))

    model = Net()
    batches, X, _ = _batches(lambda n, g: torch.randn(n, 2, 4, 4, generator=g), 12, 4, 4)
    rec = run(model, batches, path=tmp_path / "b.safetensors")
    rec.record_test(X[:2], torch.zeros(2, dtype=torch.long))
    rec.close()
    b = Bundle.open(tmp_path / "b.safetensors")
    for L in ("conv", "mha.v_proj"):
        K = np.concatenate([c.keys for c in b.chunks(L)])
        V = np.concatenate([c.values for c in b.chunks(L)])
        item = b.array(f"queries/test/layer/{L}/item")
        Q, G = b.array(f"queries/test/layer/{L}/query"), b.array(f"queries/test/layer/{L}/grad")
        focus = b.array(f"queries/test/layer/{L}/focus")
        for m in range(2):
            rows = np.nonzero(item == m)[0]
            assert len(rows) == 16  # every output position (conv) / every position of the sequence (attention)
            A = K @ Q[rows].T + 1.0
            f = int(np.nonzero(rows == focus[m])[0][0])
            want = {"attention": A[:, f], "magnitude": np.abs(A[:, f]) * np.linalg.norm(V, axis=1),
                    "effect": (A * (V @ G[rows].T)).sum(1)}
            res = spotlights(b, L, [m], top=4, groups=["pattern"], reverse=(False, True), device="cpu")[0]
            for score, w in want.items():
                for rev in (False, True):
                    got = [r.score for r in res.ranked[(score, "pattern", rev)]]
                    expect = (np.sort(w)[:4] if rev else np.sort(w)[::-1][:4])
                    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)
