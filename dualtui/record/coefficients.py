"""SGD-family coefficients: W_T = a·W_0 + Σ_s C_s · G_s, computed by one backward pass.

Every `torch.optim.SGD` update (learning-rate schedule, momentum, dampening, Nesterov,
coupled weight decay, maximize) is linear in (weights, momentum buffer, gradient) with
scalar coefficients. So the final weights are a scalar combination of the initial weights
and of each step's recorded gradient sum G_s = Σ_{t in s} g_t k_tᵀ. The scalars come from
propagating the sensitivity of W_T backwards through the per-step recurrences, in O(steps)
and independent of the layer's size. Clipping and accumulation enter as the measured scale
of each step's gradient relative to the recorded patterns (`StepRecord.scale`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StepRecord:
    """What one optimizer step did to one parameter, as the optimizer saw it."""

    lr: float
    momentum: float
    dampening: float
    nesterov: bool
    weight_decay: float
    maximize: bool
    active: bool  # False when the parameter had no gradient: PyTorch skips it entirely
    scale: float  # the parameter's .grad divided by the recorded sum of patterns
    # "sgd"; or an adaptive rule (adaptive.py), whose patterns carry the step's rescaling and
    # whose scalars are: lr = the step size η, momentum = Adam's β1, weight_decay = the
    # decoupled decay (p ← (1 − weight_decay)·p), dampening unused.
    rule: str = "sgd"
    # Adam's bias: the scalar that best fits its own preconditioner given the weight's row factor,
    # which its values carry (adaptive.bias_fit); 1 otherwise
    precondition: float = 1.0


def coefficients(steps: list[StepRecord]) -> tuple[float, np.ndarray]:
    """(a, C) with W_T = a·W_0 + Σ_s C[s]·G_s, whatever the steps' rule."""
    if all(st.rule == "sgd" for st in steps):
        return sgd_coefficients(steps)
    return adaptive_coefficients(steps)


def adaptive_coefficients(steps: list[StepRecord]) -> tuple[float, np.ndarray]:
    """Adafactor (exact) and Adam with its preconditioner folded into the patterns (adaptive.py):
        m   = β1·m + (1 − β1)·(±G·scale)          (Adam; Adafactor: m = ±G·scale, β1 = 0 and no 1 − β1)
        p   = (1 − decay)·p − η·m
    run backwards like sgd_coefficients: P = ∂W_T/∂p_s, B = ∂W_T/∂m_s."""
    C = np.zeros(len(steps), dtype=np.float64)
    P, B = 1.0, 0.0
    for s in range(len(steps) - 1, -1, -1):
        st = steps[s]
        if not st.active:
            continue
        sign = (-1.0 if st.maximize else 1.0) * st.scale * st.precondition
        if st.rule == "adafactor":
            C[s] = -float(st.lr) * P * sign
        elif st.rule == "adam":
            b1 = float(st.momentum)
            total = B - float(st.lr) * P
            C[s] = (1.0 - b1) * total * sign
            B = b1 * total
        else:
            raise ValueError(f"step {s}: rule {st.rule!r} mixed with adaptive steps")
        P = P * (1.0 - float(st.weight_decay))
    return P, C


def sgd_coefficients(steps: list[StepRecord]) -> tuple[float, np.ndarray]:
    """Return (a, C) with W_T = a·W_0 + Σ_s C[s]·G_s for the recorded steps.

    Mirrors torch.optim.SGD step by step:
        d   = ±G·scale + wd·p                     (sign: maximize)
        buf = d              on the first step with momentum (PyTorch clones the gradient)
              μ·buf + (1-τ)·d afterwards
        u   = d + μ·buf (Nesterov) | buf (momentum) | d (no momentum)
        p   = p - lr·u
    P and B are ∂W_T/∂p_s and ∂W_T/∂buf_s, run from the last step back to the first.
    """
    # Forward sweep: which active step creates the momentum buffer (PyTorch's `buf is None`).
    creates_buffer = [False] * len(steps)
    has_buffer = False
    for s, st in enumerate(steps):
        if st.active and st.momentum != 0:
            creates_buffer[s] = not has_buffer
            has_buffer = True

    C = np.zeros(len(steps), dtype=np.float64)
    P, B = 1.0, 0.0
    for s in range(len(steps) - 1, -1, -1):
        st = steps[s]
        if not st.active:
            continue
        lr, mu = float(st.lr), float(st.momentum)
        if mu == 0:
            D = -lr * P  # u = d; the buffer, if any, is left as it was
            B_prev = B
        else:
            if st.nesterov:
                D_direct = -lr * P
                B_total = B - lr * mu * P
            else:
                D_direct = 0.0
                B_total = B - lr * P
            if creates_buffer[s]:
                D = D_direct + B_total
                B_prev = 0.0
            else:
                D = D_direct + (1.0 - st.dampening) * B_total
                B_prev = mu * B_total
        C[s] = D * (-1.0 if st.maximize else 1.0) * st.scale
        P = P + st.weight_decay * D
        B = B_prev
    return P, C
