"""The recorder's exactness and robustness (DESIGN.md sections 1 and 3).

Every number is checked against what the real `torch.optim.SGD` did to the model's weights:
the dual memory (w0 + Σ v kᵀ, b0 + Σ v) must reproduce the trained primal weights, to 1e-10 in
float64 and to the format's tolerance in float32. The recorder's own arithmetic is never the
reference. Also: refusals at construction, test-set recording against independent autograd,
interrupted runs, storage dtypes, chunked and sharded bundles.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from dualtui.bundle import Bundle
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder, RecorderError

F64_TOL = 1e-10
F32_REL_TOL = 1e-4


# ====================================================================== small random models
@dataclass(frozen=True)
class RecArch:
    """A small model. mode: 'vec' [B, in] floats; 'seq' [B, L, in] floats, logits [B, L, C];
    'tok' [B, L] token ids -> Embedding -> per-position MLP -> [B, L, C];
    'tokflat' [B, L] ids -> Embedding -> flatten -> MLP -> [B, C]."""

    mode: str = "vec"
    d_in: int = 5
    widths: tuple[int, ...] = (6,)
    n_cls: int = 3
    bias: tuple[bool, ...] = (True, True)  # one flag per Linear of the body (missing: True)
    act: str = "relu_inplace"  # or "tanh"
    seq_len: int = 3
    vocab: int = 7
    padding_idx: int | None = None
    aux: bool = False  # a side Linear that some steps do not use
    frozen: bool = False  # a side Linear with requires_grad=False (never gets a grad)


class RecNet(nn.Module):
    def __init__(self, arch: RecArch):
        super().__init__()
        self.arch = arch
        if arch.mode in ("tok", "tokflat"):
            self.emb = nn.Embedding(arch.vocab, arch.d_in, padding_idx=arch.padding_idx)
        first = arch.d_in * arch.seq_len if arch.mode == "tokflat" else arch.d_in
        dims = [first, *arch.widths, arch.n_cls]
        mods: list[nn.Module] = []
        for i in range(len(dims) - 1):
            mods.append(nn.Linear(dims[i], dims[i + 1], bias=arch.bias[i] if i < len(arch.bias) else True))
            if i < len(dims) - 2:
                mods.append(nn.ReLU(inplace=True) if arch.act == "relu_inplace" else nn.Tanh())
        self.body = nn.Sequential(*mods)
        if arch.aux:
            self.aux = nn.Linear(first, arch.n_cls)
        if arch.frozen:
            self.frozen = nn.Linear(first, arch.n_cls)
            self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor, use_aux: bool = True) -> torch.Tensor:
        h = self.emb(x) if hasattr(self, "emb") else x
        if self.arch.mode == "tokflat":
            h = h.reshape(h.shape[0], -1)
        out = self.body(h)
        if self.arch.aux and use_aux:
            out = out + self.aux(h)
        if self.arch.frozen:
            out = out + self.frozen(h)
        return out

    @property
    def last(self) -> str:
        return f"body.{len(self.body) - 1}"


def rec_data(arch: RecArch, n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if arch.mode == "vec":
        x = torch.randn(n, arch.d_in, generator=g, dtype=dtype)
    elif arch.mode == "seq":
        x = torch.randn(n, arch.seq_len, arch.d_in, generator=g, dtype=dtype)
    else:
        x = torch.randint(0, arch.vocab, (n, arch.seq_len), generator=g)
        if arch.padding_idx is not None:
            x[torch.rand(x.shape, generator=g) < 0.3] = arch.padding_idx
    y = torch.randint(0, arch.n_cls, (n,), generator=g)
    return x, y


def rec_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 3:  # every position is trained
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, None].expand(-1, logits.shape[1]).reshape(-1))
    return nn.functional.cross_entropy(logits, y)


# ====================================================================== the training harness
@dataclass(frozen=True)
class RecOpt:
    lr: float = 0.1
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    foreach: bool | None = None
    fused: bool | None = None
    groups: bool = False  # one param group per layer (weight and bias together), different lr
    sched: str | None = None  # step | cosine | lambda | hand
    clip: float | None = None  # clip_grad_norm_ max norm
    accum: int = 1  # micro-batches per optimizer step (loss / accum)
    unused_every: int | None = None  # aux branch skipped on steps s % unused_every == 0
    set_to_none: bool = True
    momentum_by_hand: bool = False  # change momentum between steps


@dataclass
class RecRun:
    model: RecNet
    path: Path
    errors: dict[str, float] = field(default_factory=dict)  # float64 dual vs primal, per layer
    duals: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    clipped_steps: int = 0
    steps_done: int = 0


def rec_make_optimizer(model: nn.Module, o: RecOpt) -> torch.optim.SGD:
    kw = dict(lr=o.lr, momentum=o.momentum, dampening=o.dampening, nesterov=o.nesterov,
              weight_decay=o.weight_decay, maximize=o.maximize, foreach=o.foreach, fused=o.fused)
    if not o.groups:
        return torch.optim.SGD(model.parameters(), **kw)
    groups = []
    for i, m in enumerate(mm for mm in model.modules() if isinstance(mm, (nn.Linear, nn.Embedding))):
        groups.append({"params": list(m.parameters()), "lr": o.lr * (0.5 + 0.37 * i)})
    return torch.optim.SGD(groups, **kw)


def rec_make_scheduler(opt: torch.optim.Optimizer, o: RecOpt, steps: int):
    if o.sched == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    if o.sched == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=0.01)
    if o.sched == "lambda":
        n = len(opt.param_groups)
        return torch.optim.lr_scheduler.LambdaLR(opt, [lambda e, i=i: 1.0 / (1.0 + 0.3 * e * (i + 1)) for i in range(n)])
    return None


def rec_dual_errors(rec: Recorder, model: nn.Module) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """max |primal - (w0 + Σ v kᵀ)| (and the bias) per recorded layer, from `Recorder.dual`."""
    errs, duals = {}, {}
    for name in rec.layers:
        mod = model.get_submodule(name)
        d = rec.dual(name)
        duals[name] = d
        w = mod.weight.detach().double().cpu().numpy()
        if isinstance(mod, nn.Embedding):
            recon = np.array(d["w0"], dtype=np.float64)  # [vocab, width]: a pattern adds its value to row key
            np.add.at(recon, d["keys"].astype(np.int64), d["values"].astype(np.float64))
        else:
            recon = d["w0"].astype(np.float64) + d["values"].astype(np.float64).T @ d["keys"].astype(np.float64)
        assert recon.shape == w.shape
        err = float(np.abs(w - recon).max(initial=0.0))
        if getattr(mod, "bias", None) is not None:
            b = mod.bias.detach().double().cpu().numpy()
            err = max(err, float(np.abs(b - (d["b0"].astype(np.float64) + d["bias_values"].astype(np.float64).sum(0))).max(initial=0.0)))
        errs[name] = err
    return errs, duals


def rec_train(
    arch: RecArch,
    o: RecOpt,
    path: Path,
    *,
    steps: int = 6,
    batch: int = 4,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    rec_kwargs: dict | None = None,
    interrupt: tuple[str, int] | None = None,  # (where, step): 'forward' | 'before_step' | 'sigint_in_step'
    test_n: int = 0,
    per_coordinate_clip: bool = False,
) -> RecRun:
    torch.manual_seed(seed)
    model = RecNet(arch).to(dtype)
    opt = rec_make_optimizer(model, o)
    sched = rec_make_scheduler(opt, o, steps)
    x, y = rec_data(arch, 40, dtype, seed + 1)
    run = RecRun(model, path)
    gen = torch.Generator().manual_seed(seed + 2)
    kwargs = dict(rec_kwargs or {})
    if arch.mode in ("tok", "tokflat") and "input" not in kwargs:
        kwargs["input"] = {"kind": "text", "vocab": [f"t{i}" for i in range(arch.vocab)], "context": arch.seq_len}
    if arch.mode != "vec":
        # Batch-first, said outright: these tests are about exactness, and with batch == seq_len
        # the shapes alone leave the layout open (tests/test_attribution.py covers that).
        kwargs.setdefault("layouts", {"*": "batch-first"})
    rec = Recorder(model, opt, path, **kwargs)
    hook = None
    if interrupt and interrupt[0] == "sigint_in_step":
        # Registered after the recorder's pre-hook: a real SIGINT arrives while the step is under way.
        def pre(optimizer: Any, args: Any, kw: Any) -> None:
            if run.steps_done == interrupt[1]:
                os.kill(os.getpid(), signal.SIGINT)

        hook = opt.register_step_pre_hook(pre)
    try:
        with rec:
            for s in range(steps):
                idx = torch.randint(0, x.shape[0], (batch * o.accum,), generator=gen)
                use_aux = not (o.unused_every and s % o.unused_every == 0)
                for micro in range(o.accum):
                    sub = idx[micro * batch : (micro + 1) * batch]
                    with rec.batch(example=sub, label=y[sub]):
                        if interrupt == ("forward", s) and micro == o.accum - 1:
                            raise RuntimeError("boom in the middle of training")
                        loss = rec_loss(model(x[sub], use_aux=use_aux), y[sub]) / o.accum
                        (-loss if o.maximize else loss).backward()
                if interrupt == ("before_step", s):
                    raise KeyboardInterrupt
                if o.clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip)
                    run.clipped_steps += int(float(norm) > o.clip)
                if per_coordinate_clip:
                    top = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
                    torch.nn.utils.clip_grad_value_(model.parameters(), 0.3 * top)
                opt.step()
                run.steps_done += 1
                opt.zero_grad(set_to_none=o.set_to_none)
                if sched is not None:
                    sched.step()
                if o.sched == "hand":
                    for i, g in enumerate(opt.param_groups):
                        g["lr"] = o.lr * (1.0 + 0.5 * np.sin(3.0 * s + i))
                if o.momentum_by_hand:
                    for g in opt.param_groups:
                        g["momentum"] = [0.9, 0.0, 0.5, 0.7][s % 4]
            run.errors, run.duals = rec_dual_errors(rec, model)
            if test_n:
                xt, yt = rec_data(arch, test_n, dtype, seed + 3)
                rec.record_test(xt, yt)
    finally:
        if hook is not None:
            hook.remove()
    return run


def rec_bundle_errors(bundle: Bundle, model: nn.Module) -> dict[str, tuple[float, float]]:
    """From the written bundle, against the live model: (max |primal - dual|, max|W|) per layer."""
    out = {}
    for spec in bundle.manifest.layers:
        mod = model.get_submodule(spec.name)
        w = mod.weight.detach().double().cpu().numpy()
        recon = bundle.array(f"layer/{spec.name}/w0").astype(np.float64)
        bias = np.zeros(spec.out_features) if spec.bias else None
        if bias is not None:
            bias += bundle.array(f"layer/{spec.name}/b0").astype(np.float64)
        for c in bundle.chunks(spec.name):
            v = c.values.astype(np.float64)
            if spec.kind == "embedding":
                np.add.at(recon, c.keys, v)
            else:
                recon += v.T @ c.keys.astype(np.float64)
                if bias is not None:
                    bias += v.sum(0)
        err = float(np.abs(w - recon).max(initial=0.0))
        if bias is not None:
            err = max(err, float(np.abs(mod.bias.detach().double().cpu().numpy() - bias).max()))
        out[spec.name] = (err, float(np.abs(w).max(initial=0.0)))
    return out


def rec_tmp() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="dualtui-rec-")


# ====================================================================== exactness, float64
EXACT_CASES = {
    "plain": (RecArch(), RecOpt()),
    "steplr": (RecArch(), RecOpt(sched="step")),
    "cosine": (RecArch(widths=(4, 5), bias=(True, False, True)), RecOpt(sched="cosine")),
    "lambdalr_groups": (RecArch(widths=(4,)), RecOpt(sched="lambda", groups=True)),
    "lr_by_hand": (RecArch(), RecOpt(sched="hand", groups=True)),
    "momentum": (RecArch(), RecOpt(momentum=0.9)),
    "dampening": (RecArch(), RecOpt(momentum=0.8, dampening=0.3)),
    "nesterov": (RecArch(), RecOpt(momentum=0.9, nesterov=True)),
    "weight_decay": (RecArch(), RecOpt(weight_decay=0.05)),
    "weight_decay_momentum": (RecArch(), RecOpt(momentum=0.7, dampening=0.2, weight_decay=0.1)),
    "maximize": (RecArch(), RecOpt(maximize=True)),
    "maximize_nesterov_wd": (RecArch(), RecOpt(maximize=True, momentum=0.9, nesterov=True, weight_decay=0.02)),
    "clip": (RecArch(), RecOpt(clip=0.05)),
    "clip_momentum": (RecArch(), RecOpt(clip=0.05, momentum=0.9)),
    "accumulation": (RecArch(), RecOpt(accum=3)),
    "accumulation_clip": (RecArch(), RecOpt(accum=2, clip=0.05, momentum=0.5)),
    "groups": (RecArch(widths=(4, 4)), RecOpt(groups=True, momentum=0.9)),
    "unused_layer_none": (RecArch(aux=True), RecOpt(unused_every=2, momentum=0.9, weight_decay=0.05)),
    "unused_layer_zeros": (RecArch(aux=True), RecOpt(unused_every=2, momentum=0.9, weight_decay=0.05, set_to_none=False)),
    "unused_first_step": (RecArch(aux=True), RecOpt(unused_every=3, momentum=0.9, dampening=0.5)),
    "frozen_branch": (RecArch(frozen=True, aux=True), RecOpt(momentum=0.9, weight_decay=0.01, unused_every=3)),
    "momentum_by_hand": (RecArch(), RecOpt(momentum=0.9, momentum_by_hand=True, weight_decay=0.01)),
    "foreach": (RecArch(), RecOpt(momentum=0.9, nesterov=True, weight_decay=0.01, foreach=True)),
    "fused": (RecArch(), RecOpt(momentum=0.9, dampening=0.2, weight_decay=0.01, maximize=True, fused=True)),
    "no_foreach": (RecArch(), RecOpt(momentum=0.9, dampening=0.1, weight_decay=0.01, foreach=False)),
    "no_bias": (RecArch(bias=(False, False)), RecOpt(momentum=0.9)),
    "seq": (RecArch(mode="seq", widths=(5,)), RecOpt(momentum=0.9, clip=0.1)),
    "embedding": (RecArch(mode="tok"), RecOpt(momentum=0.9, weight_decay=0.01)),
    "embedding_padding": (RecArch(mode="tok", padding_idx=0), RecOpt(momentum=0.9, weight_decay=0.01, clip=0.1)),
    "embedding_flat": (RecArch(mode="tokflat", padding_idx=2, widths=(4,)), RecOpt(momentum=0.5, accum=2, sched="step")),
    "tanh_deep": (RecArch(act="tanh", widths=(3, 6, 2), bias=(True, False, True, False)), RecOpt(momentum=0.9, nesterov=True)),
    "everything": (
        RecArch(mode="tok", padding_idx=1, widths=(5, 4), bias=(True, False, True), aux=True, frozen=True),
        RecOpt(momentum=0.9, nesterov=True, weight_decay=0.03, maximize=True, groups=True, sched="cosine",
               clip=0.05, accum=2, unused_every=2),
    ),
    "everything_seq": (
        RecArch(mode="seq", widths=(6,), aux=True),
        RecOpt(momentum=0.8, dampening=0.25, weight_decay=0.03, groups=True, sched="lambda", clip=0.2, accum=3,
               unused_every=3, set_to_none=False),
    ),
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_float64_dual_matches_trained_weights(case: str) -> None:
    arch, o = EXACT_CASES[case]
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=7)
        assert run.steps_done == 7
        assert run.errors, "no layer recorded"
        for name, err in run.errors.items():
            assert err <= F64_TOL, f"{case}: layer {name} dual vs primal {err:.3e}"
        if o.clip is not None:
            assert run.clipped_steps > 0, "the clipping threshold never bit: the case tests nothing"
        # Learning happened in every layer that trains, so the check above is not vacuous.
        for name, dual in run.duals.items():
            mod = run.model.get_submodule(name)
            if mod.weight.requires_grad:
                assert len(dual["keys"]) > 0 and np.abs(dual["values"]).max() > 0, name
            else:
                assert len(dual["keys"]) == 0, f"frozen layer {name} has patterns"
        b = Bundle.open(Path(d) / "run.safetensors")
        report = verify_bundle(b)
        assert report.ok, json.dumps(report.to_json())


def test_patterns_are_one_per_leading_index() -> None:
    """Every example and every sequence position is its own pattern; padding tokens are not."""
    arch = RecArch(mode="tok", padding_idx=0, widths=(4,), aux=True)
    o = RecOpt(accum=2, unused_every=2)
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=5, batch=3)
        per_step = 2 * 3  # accum * batch examples per optimizer step
        L = arch.seq_len
        lin = run.duals["body.0"]
        assert len(lin["keys"]) == 5 * per_step * L
        assert np.array_equal(np.bincount(lin["step"]), np.full(5, per_step * L))
        aux = run.duals["aux"]
        used = [s for s in range(5) if s % 2 != 0]
        assert sorted(set(aux["step"].tolist())) == used
        emb = run.duals["emb"]
        assert len(emb["keys"]) > 0 and not np.any(emb["keys"] == 0)
        b = Bundle.open(run.path)
        pos = np.concatenate([c.position for c in b.chunks("body.0")])
        assert np.array_equal(pos, np.tile(np.arange(L), 5 * per_step))


def test_reused_layer_and_manual_loss_scaling_are_exact() -> None:
    """A layer applied twice per forward pass, and a gradient rescaled by hand (loss scaling)."""

    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))

    torch.manual_seed(3)
    model = Twice().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.01)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    with rec_tmp() as d, Recorder(model, opt, Path(d) / "r.safetensors") as rec:
        for s in range(6):
            idx = torch.arange(s, s + 5) % 20
            with rec.batch(example=idx, label=y[idx]):
                (nn.functional.cross_entropy(model(x[idx]), y[idx]) * 1024.0).backward()
            for p in model.parameters():
                p.grad.div_(1024.0)
            opt.step()
            opt.zero_grad()
        errs, duals = rec_dual_errors(rec, model)
        assert len(duals["a"]["keys"]) == 6 * 5 * 2
    assert max(errs.values()) <= F64_TOL, errs


# ---------------------------------------------------------------------- property test
@st.composite
def rec_configs(draw: Any) -> tuple[RecArch, RecOpt, int]:
    mode = draw(st.sampled_from(["vec", "seq", "tok", "tokflat"]))
    depth = draw(st.integers(0, 2))
    widths = tuple(draw(st.lists(st.integers(1, 6), min_size=depth, max_size=depth)))
    bias = tuple(draw(st.lists(st.booleans(), min_size=depth + 1, max_size=depth + 1)))
    emb = mode in ("tok", "tokflat")
    arch = RecArch(
        mode=mode, d_in=draw(st.integers(1, 5)), widths=widths, n_cls=draw(st.integers(2, 4)), bias=bias,
        act=draw(st.sampled_from(["relu_inplace", "tanh"])), seq_len=draw(st.integers(1, 3)),
        vocab=draw(st.integers(2, 8)), aux=draw(st.booleans()), frozen=draw(st.booleans()),
    )
    if emb and draw(st.booleans()):
        arch = replace(arch, padding_idx=draw(st.integers(0, arch.vocab - 1)))
    momentum = draw(st.sampled_from([0.0, 0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    o = RecOpt(
        lr=draw(st.sampled_from([0.01, 0.1, 0.3])),
        momentum=momentum,
        dampening=0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.3])),
        nesterov=nesterov,
        weight_decay=draw(st.sampled_from([0.0, 0.01, 0.2])),
        maximize=draw(st.booleans()),
        groups=draw(st.booleans()),
        sched=draw(st.sampled_from([None, "step", "cosine", "lambda", "hand"])),
        clip=draw(st.sampled_from([None, 0.05, 1.0])),
        accum=draw(st.integers(1, 3)),
        unused_every=draw(st.sampled_from([None, 2, 3])) if arch.aux else None,
        set_to_none=draw(st.booleans()),
        momentum_by_hand=momentum > 0 and not nesterov and draw(st.booleans()),
    )
    return arch, o, draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec_configs())
def test_property_float64_dual_is_exact(cfg: tuple[RecArch, RecOpt, int]) -> None:
    arch, o, seed = cfg
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=5, batch=3, seed=seed, test_n=3)
        for name, err in run.errors.items():
            assert err <= F64_TOL, f"layer {name}: {err:.3e}"


# ====================================================================== float32 models
@pytest.mark.parametrize("case", ["everything", "everything_seq", "embedding_flat", "clip_momentum"])
def test_float32_bundle_verifies_against_trained_weights(case: str) -> None:
    arch, o = EXACT_CASES[case]
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=8, dtype=torch.float32, test_n=6)
        b = Bundle.open(run.path)
        report = verify_bundle(b)
        assert report.ok, json.dumps(report.to_json())
        assert {c.name for c in report.layers} == set(run.errors)
        for name, (err, wmax) in rec_bundle_errors(b, run.model).items():
            assert err <= F32_REL_TOL * max(1.0, wmax), f"{name}: {err:.3e}"
            # The bundle's primal is the model's own trained weight, bit for bit.
            assert np.array_equal(b.array(f"layer/{name}/weight"), run.model.get_submodule(name).weight.detach().numpy())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rec_configs())
def test_property_float32_bundle_verifies(cfg: tuple[RecArch, RecOpt, int]) -> None:
    arch, o, seed = cfg
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=5, batch=3, seed=seed, dtype=torch.float32, test_n=3)
        b = Bundle.open(run.path)
        assert verify_bundle(b).ok
        for name, (err, wmax) in rec_bundle_errors(b, run.model).items():
            assert err <= F32_REL_TOL * max(1.0, wmax), f"{name}: {err:.3e}"


# ====================================================================== refusals
def _lin() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-3),
    lambda ps: torch.optim.NAdam(ps, lr=1e-3),
], ids=["Adam", "AdamW", "RMSprop", "Adagrad", "NAdam"])
def test_refuses_per_coordinate_optimizers(make: Any, tmp_path: Path) -> None:
    """Adam and AdamW only as an approximation the caller asks for (tests/test_adaptive.py);
    the others not at all."""
    model = _lin()
    opt = make(model.parameters())
    with pytest.raises(RecorderError) as e:
        Recorder(model, opt, tmp_path / "r.safetensors")
    msg = str(e.value)
    assert type(opt).__name__ in msg and "per-coordinate" in msg and "SGD" in msg
    assert ("approximate=True" in msg) == isinstance(opt, torch.optim.Adam)
    assert not list(tmp_path.iterdir()), "a refused recorder left files behind"


def test_tied_embedding_and_head_are_one_exact_matrix(tmp_path: Path) -> None:
    """An nn.Embedding and a linear head sharing one weight (GPT-2's wte and lm_head): two kinds
    of patterns, token rows and outer products, whose sum is the trained matrix."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6)
            self.head.weight = self.emb.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.emb(x)))

    torch.manual_seed(0)
    model = Tied().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randint(0, 6, (10, 3), generator=g), torch.randint(0, 6, (10, 3), generator=g)
    path = tmp_path / "tied.safetensors"
    with Recorder(model, opt, path) as rec:
        for s in range(6):
            ids = torch.randperm(10, generator=g)[:4]
            with rec.batch(example=ids):
                out = model(X[ids])
                nn.functional.cross_entropy(out.reshape(-1, 6), Y[ids].reshape(-1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            opt.zero_grad()
        e, h = rec.dual("emb"), rec.dual("head")
        rec.record_test(X[:3], Y[:3, -1])
    recon = e["w0"] + h["values"].T @ h["keys"]
    np.add.at(recon, e["keys"], e["values"])
    assert np.abs(recon - model.emb.weight.detach().numpy()).max() <= F64_TOL
    b = Bundle.open(path)
    assert b.manifest.layer("emb").extra["tied"] == b.manifest.layer("head").extra["tied"] == "emb.weight"
    report = verify_bundle(b)
    assert report.ok and max(c.weight_max_abs_error for c in report.layers) < 1e-12
    assert b.manifest.extra["not_covered"] == []
    for L in ("emb", "head"):  # the summary's learned term counts both uses: primal == dual at the queries
        from dualtui.engine.spotlight import spotlights

        assert spotlights(b, L, [0, 1, 2], device="cpu")[0].summary.primal_dual_error < 1e-9


def test_refuses_other_shared_weights(tmp_path: Path) -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    model = Shared()
    with pytest.raises(RecorderError, match="shares a parameter with 'a'"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "r.safetensors")


def test_refuses_sparse_embedding(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Linear(3, 2))
    with pytest.raises(RecorderError, match="sparse"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "r.safetensors")


def test_refuses_embedding_max_norm(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 2))
    with pytest.raises(RecorderError, match="max_norm"):
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "r.safetensors")


@pytest.mark.parametrize("hyper", [{"lr": 0.2}, {"momentum": 0.5}, {"weight_decay": 0.0}, {"maximize": True}])
def test_weight_and_bias_in_different_groups_are_exact(hyper: dict, tmp_path: Path) -> None:
    """Hugging Face Trainer / timm grouping: biases (and norms) in their own group, typically
    weight_decay=0. Each gets its own coefficient chain; the bias's is stored as a ratio per
    step (layer/<L>/bias_scale) and the dual form stays exact."""
    torch.manual_seed(0)
    model = _lin().double()
    l0 = model[0]
    groups = [{"params": [l0.weight], "weight_decay": 0.05}, {"params": [l0.bias], "weight_decay": 0.05, **hyper},
              {"params": list(model[2].parameters())}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    path = tmp_path / "r.safetensors"
    with Recorder(model, opt, path) as rec:
        for s in range(5):
            with rec.batch(example=torch.arange(8)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        errs, _ = rec_dual_errors(rec, model)
        rec.record_test(x, y)
    assert errs["0"] <= F64_TOL and errs["2"] <= F64_TOL, errs
    b = Bundle.open(path)
    assert b.bias_scale("0") is not None and b.bias_scale("2") is None
    report = verify_bundle(b)
    assert report.ok and max(c.weight_max_abs_error for c in report.layers) < 1e-12


def test_refuses_optimizer_with_momentum_state(tmp_path: Path) -> None:
    model = _lin()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    with pytest.raises(RecorderError, match="already has state"):
        Recorder(model, opt, tmp_path / "r.safetensors")


def test_refuses_unknown_layer_listing_choices(tmp_path: Path) -> None:
    model = _lin()
    with pytest.raises(RecorderError) as e:
        Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "r.safetensors", layers=["0", "nope"])
    msg = str(e.value)
    assert "'nope'" in msg and "recordable layers: 0, 2" in msg


def test_refuses_layer_the_optimizer_does_not_train(tmp_path: Path) -> None:
    model = _lin()
    opt = torch.optim.SGD(model[2].parameters(), lr=0.1)
    with pytest.raises(RecorderError, match="layers="):
        Recorder(model, opt, tmp_path / "r.safetensors")
    rec = Recorder(model, opt, tmp_path / "r.safetensors", layers=["2"])  # leaving it out works
    assert list(rec.layers) == ["2"]
    rec.abort()


def test_refuses_per_coordinate_clipping_at_step_time() -> None:
    with rec_tmp() as d:
        path = Path(d) / "run.safetensors"
        with pytest.raises(RecorderError, match="per-coordinate"):
            rec_train(RecArch(), RecOpt(momentum=0.9), path, steps=4, per_coordinate_clip=True)
        # The refusal happened before the first step: nothing was recorded, so nothing is written.
        assert not path.exists()
        assert not list(Path(d).glob(".run.safetensors.spool-*"))


def test_bias_group_drifting_from_weight_group_is_exact() -> None:
    """Weight and bias in separate groups that start equal but a scheduler drives apart."""
    torch.manual_seed(0)
    model = _lin().double()
    l0 = model[0]
    opt = torch.optim.SGD([{"params": [l0.weight]}, {"params": [l0.bias]}, {"params": list(model[2].parameters())}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda e: 1.0, lambda e: 0.5**e, lambda e: 1.0])
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    with rec_tmp() as d:
        path = Path(d) / "r.safetensors"
        with Recorder(model, opt, path) as rec:
            for s in range(4):
                with rec.batch(example=torch.arange(8)):
                    nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
                sched.step()
            errs, _ = rec_dual_errors(rec, model)
        assert max(errs.values()) <= F64_TOL, errs
        b = Bundle.open(path)
        assert b.manifest.training["steps"] == 4
        np.testing.assert_allclose(b.bias_scale("0"), [1.0, 0.5, 0.25, 0.125])  # lr ratio per step (no momentum)
        assert verify_bundle(b).ok


# ====================================================================== test-set recording
def rec_independent_test_pass(model: nn.Module, names: list[str], x: torch.Tensor) -> tuple[torch.Tensor, dict, dict]:
    """Logits, each layer's input and d(predicted logit)/d(layer output), by a zero probe added to
    each layer's output (independent of the recorder's hooks; immune to in-place ops downstream)."""
    inputs: dict[str, torch.Tensor] = {}
    probes: dict[str, torch.Tensor] = {}

    def make(name: str) -> Any:
        def hook(mod: nn.Module, ins: tuple, out: torch.Tensor) -> torch.Tensor:
            inputs[name] = ins[0].detach().clone()
            probes[name] = torch.zeros_like(out, requires_grad=True)
            return out + probes[name]

        return hook

    was = model.training
    model.eval()
    handles = [model.get_submodule(n).register_forward_hook(make(n)) for n in names]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    last = logits[:, -1] if logits.dim() == 3 else logits
    pred = last.argmax(-1)
    grads = torch.autograd.grad(last.gather(1, pred[:, None]).sum(), [probes[n] for n in names], allow_unused=True)
    return last.detach(), inputs, {n: (torch.zeros_like(probes[n]) if g is None else g) for n, g in zip(names, grads)}


@pytest.mark.parametrize("mode", ["vec", "seq", "tok", "tokflat"])
def test_record_test_queries_grads_and_last_layer_identity(mode: str) -> None:
    arch = RecArch(mode=mode, widths=(6, 5), bias=(True, False, True), padding_idx=1 if mode != "vec" else None)
    o = RecOpt(momentum=0.9, weight_decay=0.02, clip=0.2, sched="step")
    m = 9
    with rec_tmp() as d:
        run = rec_train(arch, o, Path(d) / "run.safetensors", steps=6, test_n=m)
        model = run.model
        xt, yt = rec_data(arch, m, torch.float64, 3)  # rec_train's test set (seed 0 + 3)
        names = list(run.errors)
        logits, ins, grads = rec_independent_test_pass(model, names, xt)
        b = Bundle.open(run.path)
        qs = b.queries("test")
        assert np.array_equal(qs.label, yt.numpy())
        pred = qs.prediction
        assert np.array_equal(pred, logits.argmax(-1).numpy())
        for name in names:
            rows = qs.rows(name, np.arange(m))
            q, g = rows.query, rows.grad.astype(np.float64)
            x_in, g_ref = ins[name], grads[name]
            # Every position is a query row, in (item, position) order.
            x_in = x_in.reshape(-1) if name == "emb" else x_in.reshape(-1, x_in.shape[-1])
            g_ref = g_ref.reshape(-1, g_ref.shape[-1])
            per = x_in.shape[0] // m
            assert np.array_equal(rows.item, np.repeat(np.arange(m), per))
            assert np.array_equal(rows.position, np.tile(np.arange(per), m))
            # The focus is the last position (the one the prediction reads).
            assert np.array_equal(rows.focus, np.arange(m) * per + per - 1)
            if name == "emb":
                assert q.dtype == np.int64 and np.array_equal(q, x_in.numpy())
            else:
                assert np.allclose(q, x_in.numpy(), rtol=1e-6, atol=1e-7), name
            assert g.shape == tuple(g_ref.shape)
            assert np.allclose(g, g_ref.numpy(), rtol=1e-6, atol=1e-7), f"{name}: query_grad"
            assert np.abs(g_ref.numpy()).max() > 0, f"{name}: the gradient check is vacuous"
        # Last layer: Σ_t α_t (v_t · g_m) + (w0 q + b0) · g_m = predicted logit. Float64 dual and
        # independent g (tight), then the bundle's own float32 tensors (format tolerance).
        # Summed over every query row of the item (the head runs at every position).
        last = model.last
        lin = model.get_submodule(last)
        dual = run.duals[last]
        q = ins[last].numpy()
        q = q.reshape(-1, q.shape[-1])
        g = grads[last].numpy()
        g = g.reshape(-1, g.shape[-1])
        item = np.repeat(np.arange(m), q.shape[0] // m)
        target = logits.numpy()[np.arange(m), logits.argmax(-1).numpy()]
        stored = qs.rows(last, np.arange(m))
        for keys, values, w0, b0, qq, gg, tol in [
            (dual["keys"], dual["values"], dual["w0"], dual.get("b0"), q, g, 1e-9),
            (np.concatenate([c.keys for c in b.chunks(last)]), np.concatenate([c.values for c in b.chunks(last)]),
             b.array(f"layer/{last}/w0"), b.array(f"layer/{last}/b0") if lin.bias is not None else None,
             stored.query, stored.grad, 1e-4),
        ]:
            keys, values, w0, qq, gg = (np.asarray(a, dtype=np.float64) for a in (keys, values, w0, qq, gg))
            alpha = keys @ qq.T + (1.0 if b0 is not None else 0.0)  # [T, R]
            effects = np.zeros((len(keys), m))
            np.add.at(effects.T, item, (alpha * (values @ gg.T)).T)  # Σ over each item's rows
            init = np.zeros(m)
            np.add.at(init, item, ((qq @ w0.T + (0.0 if b0 is None else np.asarray(b0, dtype=np.float64))) * gg).sum(1))
            total = effects.sum(0) + init
            assert np.allclose(total, target, rtol=tol, atol=tol), (total, target)


def test_record_test_with_relu_inplace_after_recorded_layer() -> None:
    """ReLU(inplace=True) right after a recorded Linear: query_grad must be w.r.t. the Linear's
    output (pre-activation), not the activation."""
    arch = RecArch(widths=(8,), act="relu_inplace")
    with rec_tmp() as d:
        run = rec_train(arch, RecOpt(), Path(d) / "run.safetensors", steps=3, test_n=16)
        xt, _ = rec_data(arch, 16, torch.float64, 3)
        _, ins, grads = rec_independent_test_pass(run.model, ["body.0", "body.2"], xt)
        pre = run.model.body[0](xt)
        assert bool((pre < 0).any()), "no negative pre-activation: the test is vacuous"
        g = Bundle.open(run.path).queries().rows("body.0", np.arange(16)).grad
        assert np.allclose(g, grads["body.0"].numpy(), rtol=1e-6, atol=1e-7)


def test_record_test_with_frozen_branch_gives_zero_query_grad() -> None:
    """A frozen Linear on the raw input: its output needs no gradient. record_test still works,
    its query_grad is 0, and the bundle verifies (it has no patterns: W == w0)."""
    arch = RecArch(frozen=True, aux=True)
    with rec_tmp() as d:
        run = rec_train(arch, RecOpt(momentum=0.9, weight_decay=0.1), Path(d) / "run.safetensors", steps=4, test_n=5)
        b = Bundle.open(run.path)
        assert verify_bundle(b).ok
        assert b.manifest.layer("frozen").patterns == 0
        assert np.array_equal(b.queries().rows("frozen", np.arange(5)).grad, np.zeros((5, arch.n_cls), np.float32))
        assert np.array_equal(b.array("layer/frozen/w0"), b.array("layer/frozen/weight"))
        xt, _ = rec_data(arch, 5, torch.float64, 3)
        _, _, grads = rec_independent_test_pass(run.model, ["aux"], xt)
        assert np.allclose(b.queries().rows("aux", np.arange(5)).grad, grads["aux"].numpy(), rtol=1e-6, atol=1e-7)


# ====================================================================== interruption
def rec_check_partial(path: Path, steps: int, interrupted: str) -> Bundle:
    b = Bundle.open(path)
    report = verify_bundle(b)
    assert report.ok, json.dumps(report.to_json())
    assert b.manifest.training["steps"] == steps
    assert b.manifest.training["interrupted"] == interrupted
    for spec in b.manifest.layers:
        st_ = np.concatenate([c.step for c in b.chunks(spec.name)] or [np.zeros(0, np.int64)])
        assert st_.size == 0 or int(st_.max()) == steps - 1, spec.name
        if spec.name == "body.0":
            assert sorted(set(st_.tolist())) == list(range(steps))
    return b


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_keyboard_interrupt_mid_batch_keeps_completed_steps(dtype: torch.dtype) -> None:
    arch, o = EXACT_CASES["everything"]
    with rec_tmp() as d:
        path = Path(d) / "run.safetensors"
        with pytest.raises(RuntimeError, match="boom"):
            rec_train(arch, o, path, steps=8, interrupt=("forward", 4), dtype=dtype)
        rec_check_partial(path, 4, "RuntimeError")
        assert sorted(os.listdir(d)) == ["run.safetensors"], "spool files left behind"


def test_keyboard_interrupt_between_backward_and_step_drops_that_step() -> None:
    arch, o = EXACT_CASES["embedding_padding"]
    with rec_tmp() as d:
        path = Path(d) / "run.safetensors"
        with pytest.raises(KeyboardInterrupt):
            rec_train(arch, replace(o, accum=2), path, steps=8, interrupt=("before_step", 3))
        b = rec_check_partial(path, 3, "KeyboardInterrupt")
        # 3 steps x 2 micro-batches x 4 examples x seq_len positions; step 3's patterns are gone.
        assert b.manifest.layer("body.0").patterns == 3 * 2 * 4 * arch.seq_len


def test_real_sigint_during_step_is_deferred_until_the_step_is_recorded() -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed from the main thread")
    arch, o = EXACT_CASES["nesterov"]
    with rec_tmp() as d:
        path = Path(d) / "run.safetensors"
        before = signal.getsignal(signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            rec_train(arch, o, path, steps=8, interrupt=("sigint_in_step", 2))
        assert signal.getsignal(signal.SIGINT) is before, "the recorder did not restore the SIGINT handler"
        rec_check_partial(path, 3, "KeyboardInterrupt")  # steps 0, 1 and the interrupted 2 completed


def test_interrupt_before_any_step_still_writes_a_valid_bundle() -> None:
    with rec_tmp() as d:
        path = Path(d) / "run.safetensors"
        with pytest.raises(KeyboardInterrupt):
            rec_train(RecArch(mode="tok"), RecOpt(momentum=0.9), path, steps=3, interrupt=("before_step", 0))
        b = rec_check_partial(path, 0, "KeyboardInterrupt")
        assert all(s.patterns == 0 for s in b.manifest.layers)


# ====================================================================== storage dtypes
def test_half_storage_verifies_with_rounding_bound() -> None:
    arch, o = EXACT_CASES["everything_seq"]
    errs: dict[str, float] = {}
    with rec_tmp() as d:
        for dt in ("float32", "float16", "bfloat16"):
            path = Path(d) / f"{dt}.safetensors"
            rec_train(arch, o, path, steps=6, rec_kwargs={"storage_dtype": dt}, test_n=5)
            b = Bundle.open(path)
            report = verify_bundle(b)
            assert report.ok, json.dumps(report.to_json())
            layers = {c.name: c for c in report.layers}
            errs[dt] = max(c.weight_max_abs_error for c in report.layers)
            for c in report.layers:
                assert c.storage_dtype == {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dt]
                if dt == "float32":
                    assert c.rounding_bound == 0.0
                else:
                    assert c.rounding_bound > 0.0 and c.weight_max_abs_error <= c.tolerance
            assert set(layers) == {"body.0", "body.2", "aux"}
    assert errs["float16"] > errs["float32"] and errs["bfloat16"] > errs["float32"], errs


# ====================================================================== chunks and shards
def test_chunked_and_sharded_bundles_read_back_equal_to_unchunked() -> None:
    arch, o = EXACT_CASES["embedding_flat"]
    with rec_tmp() as d:
        d = Path(d)
        one = rec_train(arch, o, d / "one.safetensors", steps=6, test_n=4)
        chunked = rec_train(arch, o, d / "chunked.safetensors", steps=6, test_n=4, rec_kwargs={"chunk_bytes": 600})
        sharded = rec_train(arch, o, d / "sharded.safetensors", steps=6, test_n=4,
                            rec_kwargs={"chunk_bytes": 600, "max_shard_bytes": 2000})
        ref = Bundle.open(d / "one.safetensors")
        assert all(s.chunks == 1 for s in ref.manifest.layers)
        # The sharded set: an index beside NAME-0000k-of-0000n shard files, and no single file.
        idx = d / "sharded.safetensors.index.json"
        assert idx.exists() and not (d / "sharded.safetensors").exists()
        shards = sorted(p.name for p in d.glob("sharded-*-of-*.safetensors"))
        n = len(shards)
        gen = shards[0].split("-")[1]  # one generation tag for the whole set (atomic replacement)
        assert n >= 2 and shards == [f"sharded-{gen}-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        index = json.loads(idx.read_text())
        assert set(index["weight_map"].values()) == set(shards) and "dualtui" in index["metadata"]
        for run, path in ((chunked, d / "chunked.safetensors"), (sharded, d / "sharded.safetensors")):
            b = Bundle.open(path)
            assert b.sharded == (run is sharded)
            assert any(s.chunks > 1 for s in b.manifest.layers), "chunk_bytes did not split anything"
            assert verify_bundle(b).ok
            for spec in b.manifest.layers:
                L = spec.name
                assert spec.chunks == 1 or b.has(f"layer/{L}/keys/{spec.chunks - 1}")
                assert spec.patterns == ref.manifest.layer(L).patterns
                # Same training, same numbers: each field read back through the chunks is identical.
                for f in ("keys", "values", "step", "example", "position"):
                    got = np.concatenate([getattr(c, f) for c in b.chunks(L)])
                    want = np.concatenate([getattr(c, f) for c in ref.chunks(L)])
                    assert np.array_equal(got, want), (L, f)
                # ... and equal to the recorder's float64 dual, rounded to the storage dtype.
                dual = run.duals[L]
                stored = np.concatenate([c.values for c in b.chunks(L)])  # float64 model: float64 storage by default
                assert stored.dtype == np.float64 and np.array_equal(stored, dual["values"])
                assert np.array_equal(np.concatenate([c.step for c in b.chunks(L)]), dual["step"])
                for t in ("layer/{L}/weight", "layer/{L}/w0", "queries/test/layer/{L}/query", "queries/test/layer/{L}/grad"):
                    t = t.format(L=L)
                    assert np.array_equal(b.array(t), ref.array(t)), (L, t)
            assert np.array_equal(b.queries().prediction, ref.queries().prediction)


def test_open_sharded_bundle_by_either_name() -> None:
    with rec_tmp() as d:
        d = Path(d)
        run = rec_train(RecArch(), RecOpt(), d / "s.safetensors", steps=4, rec_kwargs={"max_shard_bytes": 500})
        assert run.path.name == "s.safetensors"
        a = Bundle.open(d / "s.safetensors")
        b = Bundle.open(d / "s.safetensors.index.json")
        assert a.sharded and b.sharded and a.manifest.to_json() == b.manifest.to_json()


def test_cancelling_patterns_are_not_mistaken_for_per_coordinate_changes() -> None:
    """Two patterns of one step hit the same embedding row with nearly opposite large signals:
    .grad is a small difference whose rounding residue is relative to the large terms. That is
    still an exact outer-product sum and must be recorded, not refused."""

    class Cancel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(3, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.emb(x)  # [B, 2, 4]

    torch.manual_seed(0)
    model = Cancel().double()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    big = 1e6
    with rec_tmp() as d, Recorder(model, opt, Path(d) / "r.safetensors", output_layout="batch-first") as rec:
        for s in range(4):
            u, v = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
            x = torch.tensor([[s % 3, s % 3], [0, 1]])
            with rec.batch(example=[0, 1]):
                h = model(x)
                loss = (h[0, 0] * (big * u + v)).sum() + (h[0, 1] * (-big * u)).sum() + h[1].sum()
                loss.backward()
            opt.step()
            opt.zero_grad()
        errs, _ = rec_dual_errors(rec, model)
    assert errs["emb"] <= F64_TOL, errs


def test_verify_is_not_vacuous() -> None:
    """verify must fail when the dual and the primal disagree by more than the tolerance."""
    with rec_tmp() as d:
        run = rec_train(RecArch(mode="tok", padding_idx=0), RecOpt(momentum=0.9), Path(d) / "r.safetensors", steps=4, test_n=3)
        b = Bundle.open(run.path)
        assert verify_bundle(b).ok
        real_array, real_chunks = b.array, b.chunks

        def bad_w0(name: str, *a: Any, **k: Any) -> np.ndarray:
            out = real_array(name, *a, **k)
            return out + np.float32(3e-3) if name == "layer/body.0/w0" else out

        b.array = bad_w0  # type: ignore[method-assign]
        report = verify_bundle(b, check_contents=False)
        assert not report.ok and [c.name for c in report.layers if not c.ok] == ["body.0"]
        b.array = real_array  # type: ignore[method-assign]

        def bad_chunks(layer: str, rows: int | None = None) -> Any:
            for c in real_chunks(layer, rows):
                if layer == "emb":
                    c.values = c.values.copy()
                    c.values[0] *= 1.5
                yield c

        b.chunks = bad_chunks  # type: ignore[method-assign]
        report = verify_bundle(b, check_contents=False)
        assert [c.name for c in report.layers if not c.ok] == ["emb"]


def test_train_tables_cover_every_train_input_even_if_never_sampled() -> None:
    """train_inputs for 40 examples, only some sampled and labels given by batch(): train/label,
    train/task and train/input must all have 40 rows."""
    arch = RecArch()
    torch.manual_seed(0)
    model = RecNet(arch).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = rec_data(arch, 40, torch.float64, 1)
    with rec_tmp() as d:
        path = Path(d) / "r.safetensors"
        with Recorder(model, opt, path, train_inputs=x) as rec:
            for s in range(3):
                idx = torch.arange(s * 4, s * 4 + 4)  # examples 0..11 only
                with rec.batch(example=idx, label=y[idx]):
                    rec_loss(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
        b = Bundle.open(path)
        assert b.train_size == 40 and b.info("train/input").shape[0] == 40
        assert np.array_equal(b.array("train/label")[:12], y[:12].numpy())
        assert verify_bundle(b).ok
