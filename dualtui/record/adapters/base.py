"""What every adapter provides (see adapters/__init__.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from ...bundle.manifest import LayerSpec

if TYPE_CHECKING:
    from ..recorder import Recorder


class AdapterError(Exception):
    """A module of a recordable kind is configured in a way the dual form cannot describe."""


class Adapter:
    """The dual form of one recorded layer (one module, or one part of a module: a projection of
    nn.MultiheadAttention, a group of a grouped convolution).

    A pattern is one input row of one forward call: its key (`keys`) and the gradient of the
    loss with respect to the matching output row (the raw value, scaled at finalize by the
    step's SGD-family coefficient). The gradient-scale check compares the parameters' `.grad`
    with the recorded patterns through two fixed random directions (`project_*`).

    Most kinds are captured by forward hooks on their module (`hooked`); a kind whose module
    calls its weights functionally (MultiheadAttention) installs its own capture (`install`).
    """

    kind: ClassVar[str]
    describes: ClassVar[str]  # e.g. "nn.Linear", for messages
    autocast: ClassVar[bool] = False  # torch.autocast runs it in the low-precision dtype (matmul-like)
    hooked: ClassVar[bool] = True
    rule: ClassVar[str | None] = None  # a layout fixed by the module kind (conv: batch-first), or None

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.claims: list[str] = []  # names of submodules this adapter records (no adapter of their own)

    @staticmethod
    def matches(module: nn.Module) -> bool:
        raise NotImplementedError

    @classmethod
    def create(cls, name: str, module: nn.Module) -> list["Adapter"]:
        """The recorded layers of one module (most kinds: one)."""
        return [cls(name, module)]

    # ---------------------------------------------------------------- structure
    @property
    def spec(self) -> LayerSpec:
        raise NotImplementedError

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters whose gradients this layer's patterns explain: [weight] or [weight, bias]
        (whole tensors; `rows` says which rows of them, for a part of a parameter)."""
        raise NotImplementedError

    @property
    def rows(self) -> slice | None:
        """The rows of params[0] (and of the bias) this layer covers, or None for all of them."""
        return None

    def param_rows(self, j: int) -> slice | None:
        """The rows of params[j] this layer covers (None: all)."""
        return self.rows

    @property
    def feature(self) -> int | None:
        """Size of the input's feature axis (the last), or None when every input entry is a row."""
        raise NotImplementedError

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like params[0] (the weight, its gradient, an optimizer's per-coordinate
        state) in the bundle's layout ([out, in]; embedding [vocab, width])."""
        return t if self.rows is None else t[self.rows]

    def weight(self) -> torch.Tensor:
        """The weight now, in the bundle's layout."""
        return self.layout(self.params[0].detach())

    def bias(self) -> torch.Tensor | None:
        if not self.spec.bias:
            return None
        b = self.params[1].detach()
        return b if self.rows is None else b[self.rows]

    def weight_grad(self) -> torch.Tensor | None:
        g = self.params[0].grad
        if g is None:
            return None
        return g if self.rows is None else g[self.rows]

    def bias_grad(self) -> torch.Tensor | None:
        if not self.spec.bias or self.params[1].grad is None:
            return None
        g = self.params[1].grad
        return g if self.rows is None else g[self.rows]

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

    def output_rows(self, out: torch.Tensor) -> torch.Tensor:
        """The output (or its gradient) as one row per input row: [n, out]."""
        return out.reshape(-1, self.spec.out_features)

    def keep(self, keys: torch.Tensor) -> torch.Tensor | None:
        """A mask of the rows that are patterns (None: all); e.g. not an embedding's padding id."""
        return None

    def install(self, recorder: "Recorder", layer: Any) -> list:
        """Hooks of an adapter that is not `hooked` (returns handles with .remove())."""
        return []

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
        """weight, w0 (= a·W_0), bias, b0 (= a_bias·b_0; a_bias defaults to a) of the layer, in
        the bundle's layout, as float32 arrays (float64 with f64). w_init / b_init are copies of
        weight() / bias() taken when the recorder attached."""
        L = self.name
        cast = (lambda t: t.double()) if f64 else (lambda t: t.float())  # noqa: E731
        out = {f"layer/{L}/weight": cast(self.weight().cpu()).numpy(),
               f"layer/{L}/w0": cast(a * w_init.double()).numpy()}
        if self.spec.bias:
            out[f"layer/{L}/bias"] = cast(self.bias().cpu()).numpy()
            out[f"layer/{L}/b0"] = cast((a if a_bias is None else a_bias) * b_init.double()).numpy()
        return out


class LinearMath:
    """The gradient-scale projections of any layer whose update is Σ v kᵀ on a [out, in] weight
    (plus Σ v on a bias): Linear, Conv1D, the projections of attention, convolutions."""

    def probe_rows(self) -> int:
        return self.spec.in_features + 1  # the last row is the bias's (a constant input 1)

    def linear_project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        parts = getattr(self, "_probe_parts", None)
        if parts is None or parts[0] is not probe:  # the weight rows and the bias row, contiguous, once
            parts = self._probe_parts = (probe, probe[:-1].contiguous(), probe[-1].contiguous())
        g = self.weight_grad()
        actual = (g if g.dim() == 2 else g.reshape(g.shape[0], -1)) @ parts[1]  # [out, 2]
        bg = self.bias_grad()
        if bg is not None:
            actual.addr_(bg, parts[2])
        return actual

    def linear_project_patterns(self, keys, grads, seg, steps, probe):
        p = probe.to(torch.float64)
        k64 = keys.to(torch.float64)
        proj = k64 @ p[:-1]  # [n, 2]
        proj_abs = k64.abs() @ p[:-1].abs()
        if self.spec.bias:
            proj = proj + p[-1]
            proj_abs = proj_abs + p[-1].abs()
        rows = self.spec.out_features
        zeros = lambda: torch.zeros(steps, rows, dtype=torch.float64, device=keys.device)  # noqa: E731
        recorded = torch.stack([zeros().index_add_(0, seg, grads * proj[:, j : j + 1]) for j in range(2)], dim=2)
        magnitude = torch.stack([zeros().index_add_(0, seg, grads.abs() * proj_abs[:, j : j + 1]) for j in range(2)], dim=2)
        return recorded, magnitude


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
