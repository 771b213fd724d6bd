"""Adaptive optimizers: Adafactor recorded exactly, Adam and AdamW as a labelled approximation.

Adafactor (torch.optim.Adafactor) divides a matrix's gradient elementwise by the square root of
a factored second-moment estimate V = r cᵀ / m (r: row factor, c: column factor, m: the mean of
r). An outer product divided elementwise by √(r cᵀ/m) is again an outer product:

    (g kᵀ) ⊘ √(r cᵀ / m) = (√m · g ⊘ √r) (k ⊘ √c)ᵀ

so each pattern keeps one key and one value, rescaled by its step's column and row factors
(`Factors`). The relative step size, update clipping (÷ max(1, RMS(U)/d)) and decoupled weight
decay are per-step scalars (`StepRecord` with rule "adafactor"). This holds exactly wherever
torch's elementwise floor on V (eps1²) is inactive at a coordinate whose gradient is not zero;
where the floor bites, the recording stops with the step and the reason. A vector (a norm's
gain) has its own per-coordinate variance: the factor goes into the value. A bias would need a
second value per pattern (its variance is not the weight's row factor): refused.

Adam's preconditioner 1/(√v̂ + ε) is a full matrix, not an outer product, and its momentum
carries a gradient into later steps, each with its own preconditioner. The approximation
recorded here (rule "adam") replaces each step's preconditioner by its best rank-1
approximation (power iteration) and keeps it for the gradient's whole momentum tail. What that
leaves out is measured exactly at the end (the residual W_T − w0 − Σ v kᵀ; docs/format.md
section 3, `dual_form`), never hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import RecorderError

RULES = {"SGD": "sgd", "Adafactor": "adafactor", "Adam": "adam", "AdamW": "adam"}
POWER_ITERATIONS = 6  # alternating least-squares sweeps of the rank-1 fit


def optimizer_rule(optimizer: torch.optim.Optimizer) -> str:
    """sgd (exact), adafactor (exact) or adam (approximate), by the optimizer's class."""
    for cls in type(optimizer).__mro__:
        rule = RULES.get(cls.__name__)
        if rule is not None and cls.__module__.startswith("torch.optim"):
            return rule
    raise RecorderError(
        f"{type(optimizer).__name__} cannot be recorded: dualtui records torch.optim.SGD and Adafactor exactly "
        f"and Adam/AdamW as a labelled approximation; RMSprop, Adagrad and other per-coordinate optimizers "
        f"rescale each weight coordinate separately, so an update is no longer an outer product of a key and a value")


@dataclass
class Factors:
    """One step's rescaling of one layer's patterns, in the bundle's layout: values ⊙ `value`,
    keys ⊙ `key` (float keys), or values · key[token id] (an embedding's id keys)."""

    value: torch.Tensor  # [out]
    key: torch.Tensor | None  # [in] or [vocab]; None: keys unchanged
    key_by_id: bool = False

    def apply(self, keys: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.value.to(device=grads.device, dtype=grads.dtype)
        grads = grads * v[None, :]
        if self.key is None:
            return keys, grads
        k = self.key.to(device=grads.device, dtype=grads.dtype)
        if self.key_by_id:
            return keys, grads * k[keys.long()][:, None]
        return keys * k[None, :].to(keys.dtype), grads


def _eps1(group: dict, p: torch.Tensor) -> float:
    eps1 = group["eps"][0]
    return float(torch.finfo(p.dtype).eps) if eps1 is None else float(eps1)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """1/√x, and 0 where x is 0 (a row or column whose gradient has always been zero)."""
    return torch.where(x > 0, x.clamp(min=torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


def _orientation(adapter, R: int, C: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Where the layout puts the parameter's rows: along the outputs, or (transposed:
    transformers' Conv1D) along the inputs; a slice of them for packed attention. Read off the
    layout of an index matrix, once per layer (the probe is as large as the weight)."""
    cached = getattr(adapter, "_factor_orientation", None)
    if cached is None or cached[0].device != device:
        idx = adapter.layout(torch.arange(R * C, device=device).reshape(R, C))
        r_of, c_of = idx // C, idx % C
        if bool((r_of == r_of[:, :1]).all()):  # each output is one parameter row
            cached = (r_of[:, 0].clone(), c_of[0].clone(), False)
        else:
            cached = (c_of[:, 0].clone(), r_of[0].clone(), True)
        adapter._factor_orientation = cached
    return cached


def _orient(adapter, row: torch.Tensor, col: torch.Tensor) -> Factors:
    """The parameter-shaped rank-1 matrix row colᵀ as the layer's value and key factors."""
    if adapter.kind == "embedding":  # [vocab, width]: rows are the token ids (keys), columns the values
        return Factors(value=col, key=row, key_by_id=True)
    out_idx, in_idx, transposed = _orientation(adapter, row.numel(), col.numel(), row.device)
    if transposed:
        return Factors(value=col[out_idx], key=row[in_idx])
    return Factors(value=row[out_idx], key=col[in_idx])


def check_adafactor_layer(name: str, adapter, params: list[torch.Tensor]) -> None:
    """Refuse, before training, what Adafactor's exact dual form cannot describe."""
    if adapter.kind == "conv":
        raise RecorderError(f"layer {name!r}: Adafactor factors a convolution's weight over its kernel axes, not over "
                            f"(outputs × input patches), so its update is not an outer product of a key and a value; "
                            f"train convolutions with SGD or leave the layer out with layers=[...]")
    if adapter.spec.bias:
        raise RecorderError(f"layer {name!r} has a bias: Adafactor rescales a bias by its own per-coordinate second "
                            f"moment, which one value per pattern cannot carry; dualtui records Adafactor exactly for "
                            f"bias-free layers (bias=False, as T5 and LLaMA are built), or leave it out with layers=[...]")
    w = params[0]
    if adapter.kind == "elementwise" and w.dim() != 1:
        raise RecorderError(f"layer {name!r}: Adafactor factors a {w.dim()}-D norm gain over its last two axes; "
                            f"dualtui records 1-D gains only")
    if adapter.kind in ("linear", "embedding") and w.dim() != 2:
        raise RecorderError(f"layer {name!r}: Adafactor factors a {w.dim()}-D weight over its last two axes; "
                            f"dualtui records 2-D weights only")


def adafactor_step(name: str, step: int, adapter, group: dict, state: dict, p: torch.Tensor
                   ) -> tuple[float, float, Factors]:
    """Before torch's Adafactor step on weight p (so that a refusal leaves the weights as recorded):
    (η, decay, factors) with p_t = (1 − decay)·p_{t−1} − η·(±G ⊙ factors). Mirrors
    `_single_tensor_adafactor` in torch/optim/_adafactor.py op for op, from the state before the
    step, and raises where the floor on V would change a coordinate whose gradient is not zero."""
    grad = p.grad
    eps1 = _eps1(group, p)
    lr = float(group["lr"])
    t = float(state["step"]) + 1.0 if state else 1.0
    w = t ** float(group["beta2_decay"])
    if grad.dim() > 1:
        row_mean = torch.norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
        col_mean = torch.norm(grad, dim=-2, keepdim=True).square_().div_(grad.size(-2))
        r = (state["row_var"] if state else torch.zeros_like(row_mean)).lerp(row_mean, w)
        c = (state["col_var"] if state else torch.zeros_like(col_mean)).lerp(col_mean, w)
        mean = r.mean(dim=-2, keepdim=True).clamp_(min=eps1)
        var = (r @ c).div_(mean)
    else:
        v = (state["variance"] if state else torch.zeros_like(grad)).lerp(grad * grad, w)
        var = v.clone()
    floor = eps1 * eps1
    # The floor bites nowhere when even the smallest entry of V clears it (one sync, O(out + in));
    # otherwise it may only bite where the gradient is zero (a row or column never trained).
    smallest = float(r.min()) * float(c.min()) / float(mean) if grad.dim() > 1 else float(v.min())
    clear = smallest >= floor * (1 + 1e-6)  # (a margin for V's own rounding)
    if not clear and bool(((var < floor) & (grad != 0)).any()):
        raise RecorderError(f"layer {name!r} step {step}: Adafactor's floor on its second-moment estimate "
                            f"(eps1² = {eps1 * eps1:.3g}) would change a coordinate whose gradient is not zero, so "
                            f"this update is not an outer product of a key and a value; the recording stops before "
                            f"the step (a float64 model has a smaller default eps1)")
    update = var.clamp(min=floor).rsqrt().mul_(grad)
    denom = max(1.0, update.norm(2).item() / ((update.numel() ** 0.5) * float(group["d"])))
    rho = min(lr, 1.0 / math.sqrt(t))
    alpha = max(float(group["eps"][1]), p.detach().norm(2).item() / (p.numel() ** 0.5)) * rho
    decay = lr * float(group["weight_decay"]) if group["weight_decay"] != 0 else 0.0
    f64 = torch.float64
    if grad.dim() > 1:
        row = _safe_rsqrt(r.reshape(-1).to(f64)) * math.sqrt(float(mean))
        factors = _orient(adapter, row, _safe_rsqrt(c.reshape(-1).to(f64)))
    else:
        factors = Factors(value=adapter.layout(_safe_rsqrt(v.to(f64))), key=None)
    return alpha / denom, decay, factors


def rank1(p: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v minimising ‖(p − u vᵀ) ⊙ g‖: the rank-1 preconditioner closest to the real one on
    this step's update (alternating weighted least squares, float64). Weighted by the gradient,
    so that coordinates it does not touch (a pixel that is always 0: v̂ = 0, p = 1/ε) do not
    decide the fit; where a row or column has no gradient its factor is 0."""
    p, w = p.to(torch.float64), g.to(torch.float64).square()
    tiny = torch.finfo(torch.float64).tiny
    wp = w * p
    v = torch.ones(p.shape[1], dtype=torch.float64, device=p.device)
    for _ in range(POWER_ITERATIONS):
        u = wp @ v / (w @ (v * v)).clamp(min=tiny)
        v = wp.T @ u / (w.T @ (u * u)).clamp(min=tiny)
    return u, v


def _adam_preconditioner(group: dict, state: dict) -> torch.Tensor:
    """1/(√v̂ + ε) after the step, as torch.optim.Adam divides by it (float64)."""
    beta2 = float(group["betas"][1])
    v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    return 1.0 / ((v.to(torch.float64) / (1.0 - beta2 ** float(state["step"]))).sqrt() + float(group["eps"]))


def adam_scalars(group: dict, state: dict) -> tuple[float, float, float]:
    """(η, β1, decay) of an Adam/AdamW step: η = lr / (1 − β1^t); AdamW decays the weight outside
    the preconditioner (a per-step scalar); Adam's coupled decay goes through the gradient, and
    so is left in the residual."""
    beta1 = float(group["betas"][0])
    lr = float(group["lr"])
    decoupled = bool(group.get("decoupled_weight_decay", False))
    decay = lr * float(group["weight_decay"]) if decoupled and group["weight_decay"] != 0 else 0.0
    return lr / (1.0 - beta1 ** float(state["step"])), beta1, decay


def adam_step(adapter, group: dict, state: dict, grad: torch.Tensor) -> tuple[float, float, float, Factors]:
    """After torch's Adam/AdamW step on a weight with gradient `grad`: (η, β1, decay, factors),
    with the step's preconditioner 1/(√v̂ + ε) replaced by its rank-1 approximation closest on
    this step's update, in the layer's layout."""
    eta, beta1, decay = adam_scalars(group, state)
    lay = adapter.layout(_adam_preconditioner(group, state))
    if lay.dim() == 1:
        return eta, beta1, decay, Factors(value=lay, key=None)
    u, w = rank1(lay, adapter.layout(grad))
    if adapter.kind == "embedding":  # [vocab, width]: keys are the token ids
        return eta, beta1, decay, Factors(value=w, key=u, key_by_id=True)
    return eta, beta1, decay, Factors(value=u, key=w)


def bias_fit(adapter, value: torch.Tensor, state: dict, group: dict, grad: torch.Tensor) -> float:
    """The bias's values are the weight's (rescaled by the weight's row factor `value`); its own
    preconditioner P_b differs per coordinate. The scalar s minimising ‖P_b ⊙ g − s·value ⊙ g‖
    (g: the bias's gradient) is the closest one value per pattern can come; the rest is residual."""
    rows = adapter.param_rows(1)
    pb, g = _adam_preconditioner(group, state).reshape(-1), grad.to(torch.float64).reshape(-1)
    if rows is not None:
        pb, g = pb[rows], g[rows]
    a = value.to(device=g.device, dtype=torch.float64)
    den = float(((a * g) ** 2).sum())
    return float((pb * a * g * g).sum()) / den if den > 0 else 1.0


# ---------------------------------------------------------------- the built-in experiments
EXPERIMENT_OPTIMIZERS = ("sgd", "adafactor", "adamw")
EXPERIMENT_LR = {"adafactor": 1e-2, "adamw": 3e-3}  # their usual rates (Adafactor's: the maximum relative step)


def experiment_optimizer(name: str, params, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """`dualtui record digits|text --optimizer`: SGD with momentum (the default), Adafactor
    (exact; the experiments then build bias-free layers) or AdamW (approximate)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(EXPERIMENT_OPTIMIZERS)}")
