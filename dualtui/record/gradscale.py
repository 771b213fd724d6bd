"""The gradient-scale check: how each optimizer step's `.grad` relates to its recorded patterns.

Clipping by global norm, loss scaling and accumulation multiply a whole gradient by one number;
we read that number off two fixed random projections of `.grad` and of the recorded patterns,
and refuse anything that is not such a multiple (per-coordinate clipping, gradients from
unrecorded uses of a layer). Mapping-independent: it sums patterns over all rows, so it proves
primal == dual, while the attribution check (attribution.py) proves which example each row is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from .adapters import Adapter
from .errors import RecorderError

PROBE_SEED = 1234


@dataclass
class PendingStep:
    """An applied optimizer step of one layer whose patterns are not yet spooled."""

    step: int
    calls: list[Any]  # the layer's _Call objects of that step
    actual: torch.Tensor  # the parameter gradient projected on the layer's probe (on device)
    factors: Any = None  # an adaptive step's rescaling of the patterns (adaptive.Factors)


def make_probe(adapter: Adapter, like: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(PROBE_SEED)
    probe = torch.randn(adapter.probe_width, 2, generator=gen, dtype=torch.float64)
    return probe.to(device=like.device, dtype=like.dtype)


def _projected(adapter: Adapter, probe: torch.Tensor, pending: list[PendingStep], device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    S = len(pending)
    counts = [sum(c.keys.shape[0] for c in p.calls) for p in pending]
    calls = [c for p in pending for c in p.calls]
    if calls:
        keys = torch.cat([c.keys for c in calls])
        grads = torch.cat([c.grad for c in calls]).to(torch.float64)
        seg = torch.repeat_interleave(torch.arange(S, device=keys.device), torch.tensor(counts, device=keys.device))
        recorded, magnitude = adapter.project_patterns(keys, grads, seg, S, probe)
        return recorded.to(device), magnitude.to(device)
    zeros = torch.zeros(S, adapter.projected_rows, 2, dtype=torch.float64, device=device)
    return zeros, zeros.clone()


def measure_scales(adapter: Adapter, probe: torch.Tensor, pending: list[PendingStep],
                   failures: list[str] | None = None, partner: tuple | None = None,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> np.ndarray:
    """grad = scale·Σ g kᵀ per pending step. A step that is not such a multiple raises (or, with
    `failures` given, is appended there and keeps its least-squares scale). `partner`: the
    (adapter, probe, pending) of the other use of a tied weight, whose patterns add to the same
    gradient (its steps aligned with `pending`). `reduce`: the sum over the ranks of a
    data-parallel run (distributed.World.all_sum): `.grad` is then the ranks' average."""
    name = adapter.name
    w = adapter.params[0]
    S = len(pending)
    calls = [c for p in pending for c in p.calls]
    recorded, magnitude = _projected(adapter, probe, pending, w.device)
    if partner is not None:
        p_adapter, p_probe, p_pending = partner
        r2, m2 = _projected(p_adapter, p_probe, p_pending, w.device)
        recorded, magnitude = recorded + r2, magnitude + m2
        calls = calls + [c for p in p_pending for c in p.calls]
    if reduce is not None:  # every rank's patterns made the (all-reduced) gradient
        recorded, magnitude = reduce(recorded), reduce(magnitude)
    rows = adapter.projected_rows
    actual = torch.stack([p.actual for p in pending]).to(torch.float64).view(S, rows, 2)
    aa = (actual * actual).sum((1, 2))
    ar = (actual * recorded).sum((1, 2))
    rr = (recorded * recorded).sum((1, 2))
    scale = torch.where(rr > 0, ar / torch.where(rr > 0, rr, 1.0), torch.ones_like(rr))
    residual = torch.linalg.vector_norm(actual - scale[:, None, None] * recorded, dim=(1, 2))
    # Rounding in the sums that built .grad is relative to the size of the summed terms, not of
    # the result (contributions can cancel): compare against the sums over |terms|.
    mag = torch.linalg.vector_norm(magnitude, dim=(1, 2))
    scale, residual, aa, rr, mag = (t.cpu().numpy() for t in (scale, residual, aa, rr, mag))
    eps = torch.finfo(w.dtype).eps
    # Mixed precision: each step's gradient came out of a half-precision matmul, rounded
    # elementwise by its unit roundoff: allow that much on top of the parameter dtype's noise.
    low = [c.grad_dtype for c in calls if c.grad_dtype in (torch.float16, torch.bfloat16)]
    half_u = max((torch.finfo(d).eps / 2 for d in low), default=0.0)
    for i, p in enumerate(pending):
        problem = None
        if rr[i] == 0.0 and aa[i] ** 0.5 > 1e3 * eps * mag[i]:
            problem = (f"layer {name!r} has a gradient at step {p.step} but no recorded forward pass produced it "
                       "(was it run under a different module, or outside `recorder.batch`?)")
        elif residual[i] > (1e3 * eps + 8 * half_u) * max(aa[i] ** 0.5, abs(scale[i]) * mag[i]) + 1e-300:
            problem = (f"layer {name!r} step {p.step}: the gradient is not a scalar multiple of the recorded "
                       f"patterns (relative residual {residual[i] / aa[i] ** 0.5:.1e}); per-coordinate gradient changes "
                       "(clip_grad_value_, masking) or gradients from unrecorded uses of the layer break the dual form")
        if problem is not None:
            if failures is None:
                raise RecorderError(problem)
            failures.append(problem)
    # Within rounding of 1 means unscaled: say so exactly rather than carry the noise.
    scale[np.abs(scale - 1.0) <= 100 * eps] = 1.0
    return scale


