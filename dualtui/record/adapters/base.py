"""What every adapter provides (see adapters/__init__.py)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ...bundle.manifest import LayerSpec


class AdapterError(Exception):
    """A module of a recordable kind is configured in a way the dual form cannot describe."""


class Adapter:
    """The dual form of one module kind.

    A pattern is one input row of one forward call: its key (`keys`) and the gradient of the
    loss with respect to the matching output row (the raw value, scaled at finalize by the
    step's SGD-family coefficient). The gradient-scale check compares the parameters' `.grad`
    with the recorded patterns through two fixed random directions (`project_*`).
    """

    kind: ClassVar[str]
    describes: ClassVar[str]  # e.g. "nn.Linear", for messages
    autocast: ClassVar[bool] = False  # torch.autocast runs it in the low-precision dtype (matmul-like)

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    # ---------------------------------------------------------------- structure
    @property
    def spec(self) -> LayerSpec:
        raise NotImplementedError

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the dual form covers: [weight] or [weight, bias]."""
        raise NotImplementedError

    @property
    def feature(self) -> int | None:
        """Size of the input's feature axis (the last), or None when every input entry is a row."""
        raise NotImplementedError

    # ---------------------------------------------------------------- capture
    def lead(self, x: torch.Tensor) -> tuple[int, ...]:
        """The row dimensions of an input: everything but the feature axis."""
        return tuple(x.shape[:-1]) if self.feature is not None else tuple(x.shape)

    def expand(self, x: torch.Tensor, lead: tuple[int, ...]) -> torch.Tensor:
        """The input broadcast to the given row dimensions (a view)."""
        return x.expand(*lead, x.shape[-1]) if self.feature is not None else x.expand(*lead)

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """One key per input row: [n, in] floats, or [n] token ids."""
        raise NotImplementedError

    def keep(self, keys: torch.Tensor) -> torch.Tensor | None:
        """A mask of the rows that are patterns (None: all); e.g. not an embedding's padding id."""
        return None

    # ---------------------------------------------------------------- gradient-scale check
    @property
    def probe_width(self) -> int:
        """Rows of the random probe the parameter gradient is projected with."""
        raise NotImplementedError

    @property
    def projected_rows(self) -> int:
        """Rows of a projected gradient (per step)."""
        raise NotImplementedError

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        """The parameters' .grad projected on `probe`: [projected_rows, 2] (no device sync)."""
        raise NotImplementedError

    def project_patterns(self, keys: torch.Tensor, grads: torch.Tensor, seg: torch.Tensor, steps: int,
                         probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Σ over each step's patterns of (value kᵀ) projected on `probe`, and the same over
        |terms| (the scale of rounding): two [steps, projected_rows, 2] float64 tensors."""
        raise NotImplementedError

    # ---------------------------------------------------------------- the bundle
    def static(self, a: float, w_init: torch.Tensor, b_init: torch.Tensor | None, f64: bool = False,
               a_bias: float | None = None) -> dict[str, np.ndarray]:
        """weight, w0 (= a·W_0), bias, b0 (= a_bias·b_0; a_bias defaults to a) of the layer, as
        float32 arrays (float64 with f64)."""
        L = self.name
        m = self.module
        cast = (lambda t: t.double()) if f64 else (lambda t: t.float())  # noqa: E731
        out = {f"layer/{L}/weight": cast(m.weight.detach().cpu()).numpy(),
               f"layer/{L}/w0": cast(a * w_init.double()).numpy()}
        if self.spec.bias:
            out[f"layer/{L}/bias"] = cast(m.bias.detach().cpu()).numpy()
            out[f"layer/{L}/b0"] = cast((a if a_bias is None else a_bias) * b_init.double()).numpy()
        return out

    def empty_queries(self) -> np.ndarray:
        return np.zeros((0,), dtype=np.int64) if self.feature is None else np.zeros((0, self.spec.in_features), dtype=np.float32)


def autograd_input(x: torch.Tensor, adapter: Adapter) -> torch.Tensor:
    """The input the way autograd used it: under torch.autocast a matmul-like layer computes in
    the autocast dtype, so its key is the input rounded to it (kept as float32: exact)."""
    if adapter.autocast and x.is_floating_point():
        device = x.device.type
        if torch.is_autocast_enabled(device):
            low = torch.get_autocast_dtype(device)
            if x.dtype != low:
                x = x.to(low)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return x
