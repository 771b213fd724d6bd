"""Hugging Face's `Conv1D` (GPT-2's attention and MLP layers): a linear layer whose weight is
stored transposed, [in, out], and applied as y = x W + b. Found by its behaviour, not by
importing `transformers` (an optional dependency): a module called Conv1D with `nf`, a
[nx, nf] weight and an [nf] bias, whose output is checked once against x W + b."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ...bundle.manifest import LayerSpec
from .base import AdapterError
from .linear import LinearAdapter


def _looks_like_conv1d(module: nn.Module) -> bool:
    w, b = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "nf", None), int)
            and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == module.nf
            and isinstance(b, torch.Tensor) and b.shape == (module.nf,) and not isinstance(module, nn.Linear))


class Conv1DAdapter(LinearAdapter):
    kind = "linear"
    describes = "transformers' Conv1D"

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        w = module.weight
        with torch.no_grad():  # its behaviour, checked: y == x W + b
            x = torch.randn(3, w.shape[0], dtype=w.dtype, device=w.device, generator=None)
            if not torch.allclose(module(x), x @ w + module.bias, rtol=1e-4, atol=1e-5):
                raise AdapterError(f"layer {name!r}: a Conv1D whose output is not x W + b; dualtui cannot record it")

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return _looks_like_conv1d(module)

    @cached_property
    def spec(self) -> LayerSpec:
        w = self.module.weight
        spec = LayerSpec(self.name, self.kind, int(w.shape[0]), int(w.shape[1]), True, 0, 1)
        spec.extra["module_layout"] = "[in, out] (transformers Conv1D; stored here as [out, in])"
        return spec

    @cached_property
    def params(self) -> list[torch.Tensor]:
        return [self.module.weight, self.module.bias]

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.T

    def weight(self) -> torch.Tensor:
        return self.layout(self.module.weight.detach())

    def weight_grad(self) -> torch.Tensor | None:
        g = self.module.weight.grad
        return None if g is None else g.T
