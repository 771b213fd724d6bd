"""Brute-force attribution: re-run each training example alone on the weights of its step.

For a model whose examples do not interact (no batch statistics in training mode), example e's
patterns at a layer are exactly that layer's input rows when the model sees e alone, and their
values are -lr × the gradient of e's own loss with respect to the layer's output rows (plain
SGD, a loss that is a sum over examples). None of this uses the recorder's hooks or its layout
rules: it is what "pattern t belongs to example e" means.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dualtui.bundle import Bundle
from dualtui.record import Recorder


@dataclass
class Step:
    state: dict  # the model's weights before the step
    x: Any  # the batch as fed to the model
    ids: torch.Tensor  # example id of each batch row
    y: Any


@dataclass
class Run:
    model: nn.Module
    path: Path
    lr: float
    steps: list[Step] = field(default_factory=list)


def train(model: nn.Module, path: Path, batches: list[tuple[Any, torch.Tensor, Any]],
          loss_fn: Callable[[Any, Any], torch.Tensor], lr: float = 0.05, **rec_kwargs: Any) -> Run:
    """Plain SGD over `batches` [(x, ids, y)], recording; keeps each step's weights."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    run = Run(model, path, lr)
    rec_kwargs.setdefault("positions", True)
    with Recorder(model, opt, path, **rec_kwargs) as rec:
        for x, ids, y in batches:
            run.steps.append(Step(copy.deepcopy(model.state_dict()), x, ids, y))
            with rec.batch(example=ids):
                loss_fn(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        run.rec = rec
    return run


def alone(model: nn.Module, state: dict, layer: str, x_one: Any, y_one: Any,
          loss_fn: Callable[[Any, Any], torch.Tensor], calls_input: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Layer input rows and d(loss)/d(output rows) for one example alone, every call in order."""
    m = copy.deepcopy(model)
    m.load_state_dict(state)
    mod = m.get_submodule(layer)
    ins, outs = [], []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        x = args[0].detach()
        if isinstance(module, nn.LayerNorm):  # a norm's key is its normalised input: PyTorch's own, no affine
            x = F.layer_norm(x, module.normalized_shape, eps=module.eps)
        ins.append(x)
        out = out + torch.zeros_like(out, requires_grad=True)  # a fresh leaf to differentiate
        outs.append(out)
        out.retain_grad()
        return out

    h = mod.register_forward_hook(hook)
    try:
        loss = loss_fn(m(x_one), y_one)
    finally:
        h.remove()
    grads = torch.autograd.grad(loss, outs, allow_unused=True)
    emb = isinstance(mod, nn.Embedding)
    keys = [i.reshape(-1) if emb else i.reshape(-1, i.shape[-1]) for i in ins]
    vals = [(torch.zeros_like(o) if g is None else g).reshape(-1, o.shape[-1]) for o, g in zip(outs, grads)]
    return torch.cat(keys).double().numpy(), torch.cat(vals).double().numpy()


def check_layer(run: Run, layer: str, select: Callable[[Any, int], Any], select_y: Callable[[Any, int], Any],
                loss_fn: Callable[[Any, Any], torch.Tensor], rtol: float = 1e-6) -> int:
    """Every pattern of `layer` in the bundle against the brute force; returns patterns checked.
    (The bundle stores float32: `rtol` is float32 rounding, far below a wrong row's error.)"""
    b = Bundle.open(run.path)
    chunks = list(b.chunks(layer))
    keys = np.concatenate([c.keys for c in chunks]).astype(np.float64)
    values = np.concatenate([c.values for c in chunks]).astype(np.float64)
    step = np.concatenate([c.step for c in chunks])
    example = np.concatenate([c.example for c in chunks])
    checked = 0
    for s, st in enumerate(run.steps):
        for row, e in enumerate(st.ids.tolist()):
            if e in st.ids.tolist()[:row]:
                continue  # a second row (view) of the same example: checked together with the first
            rows_of_e = [r for r, v in enumerate(st.ids.tolist()) if v == e]
            k_parts, v_parts = [], []
            for r in rows_of_e:
                k, g = alone(run.model, st.state, layer, select(st.x, r), select_y(st.y, r), loss_fn)
                k_parts.append(k)
                v_parts.append(-run.lr * g)
            want_k, want_v = np.concatenate(k_parts), np.concatenate(v_parts)
            pad = getattr(run.model.get_submodule(layer), "padding_idx", None)
            if pad is not None:  # PyTorch gives the padding row no gradient: it is no pattern
                keep = want_k != pad
                want_k, want_v = want_k[keep], want_v[keep]
            mine = (step == s) & (example == e)
            got_k, got_v = keys[mine], values[mine]
            assert len(got_k) == len(want_k), (f"step {s} example {e} at {layer!r}: {len(got_k)} patterns credited, "
                                               f"{len(want_k)} rows produced by it")
            # Same rows, same order up to the order of views: compare as sorted multisets.
            order_g = np.lexsort(np.atleast_2d(got_k).T[::-1]) if got_k.ndim > 1 else np.argsort(got_k, kind="stable")
            order_w = np.lexsort(np.atleast_2d(want_k).T[::-1]) if want_k.ndim > 1 else np.argsort(want_k, kind="stable")
            np.testing.assert_allclose(got_k[order_g], want_k[order_w], rtol=rtol, atol=rtol * 0.1,
                                       err_msg=f"keys of example {e} at step {s}, {layer!r}")
            if got_k.ndim == 1:  # token ids tie: compare the values summed per id
                for tok in np.unique(want_k):
                    np.testing.assert_allclose(got_v[got_k == tok].sum(0), want_v[want_k == tok].sum(0), rtol=rtol, atol=rtol * 1e-3,
                                               err_msg=f"values of example {e} token {tok} at step {s}, {layer!r}")
            else:
                np.testing.assert_allclose(got_v[order_g], want_v[order_w], rtol=rtol, atol=rtol * 1e-3,
                                           err_msg=f"values of example {e} at step {s}, {layer!r}")
            checked += len(got_k)
    return checked
