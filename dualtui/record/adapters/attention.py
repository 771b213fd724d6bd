"""nn.MultiheadAttention: its input projection is three linear maps (query, key and value
projections of their own inputs), packed in one parameter `in_proj_weight` [3E, E] or kept as
`q/k/v_proj_weight`, and its output projection `out_proj` is a Linear; all four are applied
functionally inside PyTorch's F.multi_head_attention_forward, so no module hook ever fires.

The module's forward stays PyTorch's own code: while it runs, the `linear` calls it makes
with this module's own weights are routed through the recorder (the same values, plus an
identity node that captures the output gradient), so the computation is bit-for-bit
PyTorch's. Each projection is recorded as a layer of its own, `<name>.q_proj`, `.k_proj`,
`.v_proj` (rows of the packed weight, or the separate weights) and `<name>.out_proj`; SGD
updates each row block from its own gradient, so each has an exact dual form. Inside the
function the inputs are sequence-first, [L, B, E] (batch_first inputs are transposed first),
and out_proj sees [L·B, E]: both layouts are PyTorch's, fixed here, and still checked by the
attribution check.
"""

from __future__ import annotations

from functools import cached_property

import contextlib
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ...bundle.manifest import LayerSpec
from .base import Adapter, AdapterError, LinearMath

if TYPE_CHECKING:
    from ..recorder import Recorder

_PARTS = ("q", "k", "v")


class ProjectionAdapter(LinearMath, Adapter):
    """One of the q / k / v input projections of a MultiheadAttention."""

    kind = "linear"
    describes = "nn.MultiheadAttention"
    autocast = True
    hooked = False
    rule = "sequence-first"

    def __init__(self, name: str, module: nn.Module, part: int):
        super().__init__(name, module)
        self.part = part
        m = module
        E = m.embed_dim
        self.packed = m._qkv_same_embed_dim
        self.weight_param = m.in_proj_weight if self.packed else getattr(m, f"{_PARTS[part]}_proj_weight")
        self.in_features = E if self.packed else int(self.weight_param.shape[1])
        self.bias_param = m.in_proj_bias

    @cached_property
    def spec(self) -> LayerSpec:
        E = self.module.embed_dim
        spec = LayerSpec(self.name, self.kind, self.in_features, E, self.bias_param is not None, 0, 1)
        spec.extra["parameter"] = ("in_proj_weight" if self.packed else f"{_PARTS[self.part]}_proj_weight")
        if self.packed:
            spec.extra["parameter_rows"] = [self.part * E, (self.part + 1) * E]
        return spec

    @cached_property
    def params(self) -> list[torch.Tensor]:
        return [self.weight_param] + ([self.bias_param] if self.bias_param is not None else [])

    @property
    def _slice(self) -> slice:
        E = self.module.embed_dim
        return slice(self.part * E, (self.part + 1) * E)

    @property
    def rows(self) -> slice | None:
        return self._slice if self.packed else None

    def param_rows(self, j: int) -> slice | None:
        return self.rows if j == 0 else self._slice  # the bias is always in_proj_bias's rows

    def bias(self) -> torch.Tensor | None:
        return None if self.bias_param is None else self.bias_param.detach()[self._slice]

    def bias_grad(self) -> torch.Tensor | None:
        b = self.bias_param
        return None if b is None or b.grad is None else b.grad[self._slice]

    @property
    def feature(self) -> int:
        return self.in_features

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, x.shape[-1])

    @property
    def probe_width(self) -> int:
        return self.probe_rows()

    @property
    def projected_rows(self) -> int:
        return self.module.embed_dim

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        return self.linear_project_grad(probe)

    def project_patterns(self, keys, grads, seg, steps, probe):
        return self.linear_project_patterns(keys, grads, seg, steps, probe)

    def install(self, recorder: "Recorder", layer: Any) -> list:
        if self.part != 0:
            return []  # the q projection installs the capture for all four
        return [_Capture(recorder, self.module, self.name.rsplit(".", 1)[0])]


class OutProjectionAdapter(ProjectionAdapter):
    """out_proj of a MultiheadAttention: a Linear applied functionally to [L·B, E]."""

    def __init__(self, name: str, module: nn.Module):
        Adapter.__init__(self, name, module)
        self.part = -1
        self.packed = False
        self.weight_param = module.out_proj.weight
        self.bias_param = module.out_proj.bias
        self.in_features = module.embed_dim

    @cached_property
    def spec(self) -> LayerSpec:
        E = self.module.embed_dim
        return LayerSpec(self.name, self.kind, E, E, self.bias_param is not None, 0, 1)

    @property
    def rows(self) -> None:
        return None

    def param_rows(self, j: int) -> None:
        return None

    def bias(self) -> torch.Tensor | None:
        return None if self.bias_param is None else self.bias_param.detach()

    def bias_grad(self) -> torch.Tensor | None:
        b = self.bias_param
        return None if b is None or b.grad is None else b.grad

    def install(self, recorder: "Recorder", layer: Any) -> list:
        return []


class MultiheadAttentionAdapter(Adapter):
    """The factory: a MultiheadAttention is recorded as four linear layers."""

    kind = "linear"
    describes = "nn.MultiheadAttention"

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    @classmethod
    def create(cls, name: str, module: nn.Module) -> list[Adapter]:
        if module.bias_k is not None or module.add_zero_attn:
            raise AdapterError(f"layer {name!r}: nn.MultiheadAttention with add_bias_kv / add_zero_attn appends learned "
                               "key/value rows, which are not a linear map of the inputs; record its other layers with "
                               "layers=[...] (these stay not covered)")
        out = [ProjectionAdapter(f"{name}.{p}_proj", module, i) for i, p in enumerate(_PARTS)]
        out.append(OutProjectionAdapter(f"{name}.out_proj", module))
        out[0].claims = [f"{name}.out_proj"]  # the submodule is never called as a module
        return out


class _Capture:
    """Routes the module's own functional `linear` calls through the recorder while its forward
    runs (restored afterwards, and by remove())."""

    def __init__(self, recorder: "Recorder", module: nn.Module, name: str):
        self.recorder = recorder
        self.module = module
        self.name = name
        self.original = module.forward  # the bound method PyTorch defines
        self.wrapper = self.forward  # one bound method, so that remove() can recognise it
        module.forward = self.wrapper  # an instance attribute shadows the class's method

    def layer(self, suffix: str) -> Any:
        return self.recorder.layers.get(f"{self.name}.{suffix}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self._routing():
            return self.original(*args, **kwargs)

    @contextlib.contextmanager
    def _routing(self) -> Iterator[None]:
        saved = F.linear
        m = self.module
        E = m.embed_dim

        def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
            out = saved(x, w, b)
            if w is m.out_proj.weight:
                return self._route(["out_proj"], x, out)
            if m._qkv_same_embed_dim:
                base = w if w is m.in_proj_weight else w._base
                if base is not m.in_proj_weight:
                    return out
                lo = (w.data_ptr() - base.data_ptr()) // (base.stride(0) * base.element_size())
                parts = [_PARTS[r // E] + "_proj" for r in range(lo, lo + w.shape[0], E)]
                return self._route(parts, x, out)
            for p in _PARTS:
                if w is getattr(m, f"{p}_proj_weight"):
                    return self._route([f"{p}_proj"], x, out)
            return out

        F.linear = linear  # F.multi_head_attention_forward looks `linear` up in torch.nn.functional
        try:
            yield
        finally:
            F.linear = saved

    def _route(self, parts: list[str], x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        layers = [self.layer(p) for p in parts]
        if all(lay is None for lay in layers):
            return out
        pieces = out.split(self.module.embed_dim, dim=-1) if len(parts) > 1 else (out,)
        got = [piece if lay is None else self.recorder.capture(lay, x, piece) for lay, piece in zip(layers, pieces)]
        return got[0] if len(got) == 1 else torch.cat(got, dim=-1)

    def remove(self) -> None:
        if self.module.__dict__.get("forward") is self.wrapper:
            del self.module.forward
