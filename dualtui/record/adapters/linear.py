"""nn.Linear: y = x Wᵀ + b, one pattern per input row (key x, value dL/dy)."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ...bundle.manifest import LayerSpec
from .base import Adapter, LinearMath


class LinearAdapter(LinearMath, Adapter):
    kind = "linear"
    describes = "nn.Linear"
    autocast = True

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @cached_property
    def spec(self) -> LayerSpec:
        m = self.module
        return LayerSpec(self.name, self.kind, m.in_features, m.out_features, m.bias is not None, 0, 1)

    @cached_property
    def params(self) -> list[torch.Tensor]:
        m = self.module
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    @property
    def feature(self) -> int:
        return self.spec.in_features

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    @property
    def probe_width(self) -> int:
        return self.probe_rows()

    @property
    def projected_rows(self) -> int:
        return self.spec.out_features

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        return self.linear_project_grad(probe)

    def project_patterns(self, keys, grads, seg, steps, probe):
        return self.linear_project_patterns(keys, grads, seg, steps, probe)
