"""Effect summed over an item's query rows is the exact first-order change of its target logit.

For pattern t at layer L, the first-order change of the target logit when the layer's weight
moves by the pattern's contribution (ΔW = v kᵀ, Δb = v; an embedding row k moves by v) is
<∂logit/∂W, v kᵀ> + <∂logit/∂b, v>. The reference takes ∂logit/∂W from torch.autograd on the
trained model, independently of the recorded queries; the engine computes effect from the
stored query rows (docs/format.md section 6). They must agree at every layer: the attention
projections of a Transformer and the layers before a [CLS] read-out or a mean pool included.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from dualtui.bundle import Bundle
from dualtui.engine.spotlight import spotlights
from dualtui.record import Recorder
from dualtui.record.text import CharTransformer


def _autograd_effects(model: nn.Module, b: Bundle, layer: str, logit: torch.Tensor) -> np.ndarray:
    """Per-pattern first-order effects from ∂logit/∂(layer parameters), by autograd."""
    mod = model.get_submodule(layer)
    params = [mod.weight] + ([mod.bias] if getattr(mod, "bias", None) is not None else [])
    grads = torch.autograd.grad(logit, params, retain_graph=True, allow_unused=True)
    gw = np.zeros(tuple(mod.weight.shape)) if grads[0] is None else grads[0].double().numpy()
    keys = np.concatenate([c.keys for c in b.chunks(layer)])
    values = np.concatenate([c.values for c in b.chunks(layer)]).astype(np.float64)
    if isinstance(mod, nn.Embedding):
        return (gw[keys] * values).sum(1)
    eff = np.einsum("to,oi,ti->t", values, gw, keys.astype(np.float64))
    if len(params) == 2:
        gb = np.zeros(mod.bias.shape) if grads[1] is None else grads[1].double().numpy()
        eff += values @ gb
    return eff


def _check(model: nn.Module, b: Bundle, layers: list[str], logits_of: callable, x: torch.Tensor, items: list[int]) -> None:
    model.eval()
    for m in items:
        logits = logits_of(model(x[m : m + 1]))[0]
        target = int(b.queries().target[m])
        for layer in layers:
            want = _autograd_effects(model, b, layer, logits[target])
            spot = spotlights(b, layer, [m], top=5, by=["effect"], groups=["pattern", "example"], reverse=(False,),
                              summary=False, masses=True, dense_examples=True, device="cpu")[0]
            scale = max(np.abs(want).max(), 1e-12)
            got_total = float(spot.masses.task_effect_sum.sum())
            assert got_total == pytest.approx(want.sum(), rel=1e-4, abs=1e-6 * scale), (layer, m)
            top = spot.ranked[("effect", "pattern", False)]
            for r in top:
                assert r.effect == pytest.approx(want[r.pattern], rel=1e-4, abs=1e-6 * scale), (layer, m, r.pattern)
            assert top[0].effect == pytest.approx(want.max(), rel=1e-4, abs=1e-6 * scale), (layer, m)
            example = np.concatenate([c.example for c in b.chunks(layer)])
            per_example = np.bincount(example, weights=want, minlength=b.train_size)
            np.testing.assert_allclose(spot.example_scores["effect"], per_example, rtol=1e-4, atol=1e-6 * scale)
            assert np.abs(want).max() > 0, f"{layer}: vacuous (no first-order effect)"


def test_char_transformer_effects_at_every_layer(tmp_path) -> None:
    """A causal Transformer (embeddings, q/k/v/output projections, MLP, head): effect at the
    layers before the head was partial when only the last position was kept."""
    torch.manual_seed(0)
    V, L, n = 11, 6, 24
    model = CharTransformer(V, L, width=8, blocks=1, heads=2).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (n, L + 1), generator=g)
    vocab = [chr(97 + i) for i in range(V)]
    path = tmp_path / "t.safetensors"
    with Recorder(model, opt, path, classes=vocab, input={"kind": "text", "vocab": vocab, "context": L},
                  train_inputs=data.numpy()) as rec:
        for s in range(6):
            ids = torch.randperm(n, generator=g)[:4]
            with rec.batch(example=ids):
                out = model(data[ids, :-1])
                F.cross_entropy(out.reshape(-1, V), data[ids, 1:].reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        xt = torch.randint(0, V, (3, L), generator=g)
        rec.record_test(xt, torch.zeros(3, dtype=torch.long))
    b = Bundle.open(path)
    layers = b.manifest.layer_names
    assert "blocks.0.attn.q" in layers and "tok" in layers
    _check(model, b, layers, lambda out: out[:, -1], xt, items=[0, 2])


class TinyEncoder(nn.Module):
    """Token embedding + one post-norm Transformer encoder layer (batch-first) + a classifier
    head on position 0 ([CLS]) or on the mean over positions."""

    def __init__(self, vocab: int = 9, E: int = 8, classes: int = 3, pool: str = "cls"):
        super().__init__()
        self.pool = pool
        self.tok = nn.Embedding(vocab, E)
        self.enc = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.tok(ids))
        return self.head(h[:, 0] if self.pool == "cls" else h.mean(dim=1))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_cls_and_pooled_classifiers(tmp_path, pool: str) -> None:
    """The model reads position 0 (or pools) itself: every layer before the read-out still gets
    the exact first-order effect, and query_grad is not 0 there."""
    torch.manual_seed(0)
    model = TinyEncoder(pool=pool).double()
    layers = ["tok", "enc.linear1", "enc.linear2", "head"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randint(0, 9, (16, 5), generator=g), torch.randint(0, 3, (16,), generator=g)
    path = tmp_path / f"{pool}.safetensors"
    with Recorder(model, opt, path, layers=layers) as rec:
        for _ in range(5):
            ids = torch.randperm(16, generator=g)[:4]
            with rec.batch(example=ids, label=Y[ids]):
                F.cross_entropy(model(X[ids]), Y[ids]).backward()
            opt.step()
            opt.zero_grad()
        xt = torch.randint(0, 9, (3, 5), generator=g)
        rec.record_test(xt, torch.zeros(3, dtype=torch.long), focus="first" if pool == "cls" else "mean")
    b = Bundle.open(path)
    qs = b.queries()
    for layer in ("tok", "enc.linear1", "enc.linear2"):
        rows = qs.rows(layer, np.arange(3))
        assert np.abs(rows.grad).max() > 0, f"{layer}: query_grad is 0"
        assert len(rows) == 15  # five positions per item
    focus = qs.rows("enc.linear1", np.arange(3)).focus
    if pool == "cls":
        np.testing.assert_array_equal(focus, np.arange(3) * 5)  # position 0
    else:
        np.testing.assert_array_equal(focus, [-1, -1, -1])
    _check(model, b, layers, lambda out: out, xt, items=[0, 1])
