"""nn.Linear: y = x Wᵀ + b, one pattern per input row (key x, value dL/dy)."""

from __future__ import annotations

import torch
from torch import nn

from ...bundle.manifest import LayerSpec
from .base import Adapter


class LinearAdapter(Adapter):
    kind = "linear"
    describes = "nn.Linear"
    autocast = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @property
    def spec(self) -> LayerSpec:
        m = self.module
        return LayerSpec(self.name, self.kind, m.in_features, m.out_features, m.bias is not None, 0, 1)

    @property
    def params(self) -> list[torch.Tensor]:
        m = self.module
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    @property
    def feature(self) -> int:
        return self.module.in_features

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    @property
    def probe_width(self) -> int:
        return self.module.in_features + 1  # the last row is the bias's (a constant input 1)

    @property
    def projected_rows(self) -> int:
        return self.module.out_features

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        m = self.module
        actual = m.weight.grad @ probe[:-1]  # [out, 2]
        if m.bias is not None and m.bias.grad is not None:
            actual.addr_(m.bias.grad, probe[-1])
        return actual

    def project_patterns(self, keys, grads, seg, steps, probe):
        p = probe.to(torch.float64)
        k64 = keys.to(torch.float64)
        proj = k64 @ p[:-1]  # [n, 2]
        proj_abs = k64.abs() @ p[:-1].abs()
        if self.module.bias is not None:
            proj = proj + p[-1]
            proj_abs = proj_abs + p[-1].abs()
        rows = self.projected_rows
        zeros = lambda: torch.zeros(steps, rows, dtype=torch.float64, device=keys.device)  # noqa: E731
        recorded = torch.stack([zeros().index_add_(0, seg, grads * proj[:, j : j + 1]) for j in range(2)], dim=2)
        magnitude = torch.stack([zeros().index_add_(0, seg, grads.abs() * proj_abs[:, j : j + 1]) for j in range(2)], dim=2)
        return recorded, magnitude
