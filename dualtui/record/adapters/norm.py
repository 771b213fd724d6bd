"""Elementwise affine parameters of normalisation layers (LayerNorm, RMSNorm, BatchNorm,
GroupNorm): y = x̂ ⊙ γ + β, with x̂ the normalised input. Under SGD the gain's update is
Σ_t v_t ⊙ x̂_t and the bias's Σ_t v_t, so the dual form is diagonal:

    γ_T = γ_0 + Σ_t v_t ⊙ k_t        β_T = β_0 + Σ_t v_t        k_t = x̂_t, v_t = c_s · dL/dy_t

One pattern per normalised row (a token for LayerNorm; an image position for BatchNorm2d). A
pattern's contribution to the output at a test row q is v_t ⊙ (k_t ⊙ q + 1): there is no
scalar attention weight, so docs/format.md defines attention here as k_t · q (how alike the
normalised training row and the test row are) and magnitude / effect from the contribution.

x̂ is recomputed from the layer's input exactly as PyTorch normalises it (batch statistics for
BatchNorm in training mode, running statistics in eval mode); its rounding next to the fused
kernel's is far inside the gradient-scale check's allowance.
"""

from __future__ import annotations

from functools import cached_property



import torch
from torch import nn

from ...bundle.manifest import LayerSpec
from .base import Adapter

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_NORMS = (nn.LayerNorm, nn.GroupNorm) + _BATCH_NORMS + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


class NormAdapter(Adapter):
    kind = "elementwise"
    describes = "nn.LayerNorm / nn.RMSNorm / nn.BatchNorm*d / nn.GroupNorm gains and biases"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, _NORMS) and isinstance(getattr(module, "weight", None), torch.Tensor)

    @property
    def channel_axis(self) -> bool:
        """BatchNorm and GroupNorm act on axis 1 of [N, C, ...]; LayerNorm / RMSNorm on the last axes."""
        return isinstance(self.module, _BATCH_NORMS + (nn.GroupNorm,))

    @property
    def rule(self) -> str | None:  # type: ignore[override]
        return "batch-first" if self.channel_axis else None  # PyTorch's [N, C, ...]: axis 0 is the batch

    @cached_property
    def spec(self) -> LayerSpec:
        C = self.module.weight.numel()
        return LayerSpec(self.name, self.kind, C, C, getattr(self.module, "bias", None) is not None, 0, 1,
                         {"norm": type(self.module).__name__})

    @cached_property
    def params(self) -> list[torch.Tensor]:
        b = getattr(self.module, "bias", None)
        return [self.module.weight] + ([b] if b is not None else [])

    @property
    def feature(self) -> int:
        return self.spec.in_features

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1)

    def weight(self) -> torch.Tensor:
        return self.layout(self.module.weight.detach())

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None else b.detach().reshape(-1)

    def weight_grad(self) -> torch.Tensor | None:
        g = self.module.weight.grad
        return None if g is None else g.reshape(-1)

    def bias_grad(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        return None if b is None or b.grad is None else b.grad.reshape(-1)

    # ---------------------------------------------------------------- capture
    def lead(self, x: torch.Tensor) -> tuple[int, ...]:
        if self.channel_axis:
            return (x.shape[0],) + tuple(x.shape[2:])
        nd = len(self.module.normalized_shape)
        return tuple(x.shape[:-nd])

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        """x̂, the input as the layer normalises it (before gain and bias)."""
        m = self.module
        x = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        if isinstance(m, nn.LayerNorm):
            dims = tuple(range(-len(m.normalized_shape), 0))
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
            return (x - mean) / torch.sqrt(var + m.eps)
        if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            dims = tuple(range(-len(m.normalized_shape), 0))
            eps = m.eps if m.eps is not None else torch.finfo(x.dtype).eps
            return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)
        if isinstance(m, nn.GroupNorm):
            N, G = x.shape[0], m.num_groups
            xs = x.reshape(N, G, -1)
            mean = xs.mean(-1, keepdim=True)
            var = xs.var(-1, unbiased=False, keepdim=True)
            return ((xs - mean) / torch.sqrt(var + m.eps)).reshape(x.shape)
        # BatchNorm: batch statistics in training mode (or without running statistics)
        dims = (0,) + tuple(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if m.training or not m.track_running_stats or m.running_mean is None:
            mean = x.mean(dims, keepdim=True)
            var = x.var(dims, unbiased=False, keepdim=True)
        else:
            mean = m.running_mean.reshape(shape).to(x.dtype)
            var = m.running_var.reshape(shape).to(x.dtype)
        return (x - mean) / torch.sqrt(var + m.eps)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        xh = self.normalised(x)
        return self._rows(xh)

    def output_rows(self, out: torch.Tensor) -> torch.Tensor:
        return self._rows(out)

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        C = self.spec.in_features
        if self.channel_axis:
            return t.movedim(1, -1).reshape(-1, C)
        return t.reshape(-1, C)

    # ---------------------------------------------------------------- gradient-scale check
    # The whole gradient is only C numbers: it is compared as it is, no projection needed.
    @property
    def probe_width(self) -> int:
        return 1

    @property
    def projected_rows(self) -> int:
        return self.spec.in_features

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        g = self.weight_grad()
        bg = self.bias_grad()
        return torch.stack([g, bg if bg is not None else torch.zeros_like(g)], dim=1)  # [C, 2]

    def project_patterns(self, keys, grads, seg, steps, probe):
        k64 = keys.to(torch.float64)
        C = self.spec.in_features
        zeros = lambda: torch.zeros(steps, C, dtype=torch.float64, device=keys.device)  # noqa: E731
        bias = self.spec.bias
        recorded = torch.stack([zeros().index_add_(0, seg, grads * k64),
                                zeros().index_add_(0, seg, grads) if bias else zeros()], dim=2)
        magnitude = torch.stack([zeros().index_add_(0, seg, (grads * k64).abs()),
                                 zeros().index_add_(0, seg, grads.abs()) if bias else zeros()], dim=2)
        return recorded, magnitude


