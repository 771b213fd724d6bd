"""nn.Conv1d / nn.Conv2d: every output position is a pattern whose key is the input patch the
kernel saw there (unfolded: channels × kernel taps) and whose value is that position's error
signal. A convolution is a linear map of its patches, so its dual form is a linear layer's with
in = C_in/groups · kernel size; a grouped convolution is one such layer per group
(`<name>.group<g>`). Stride, padding (any padding_mode), dilation and groups are PyTorch's own:
patches are cut with the same padding the module applies. The pattern's position is the output
position (row · W_out + column for Conv2d), and the layer's `conv` entry in the manifest says how
to find the patch on the input (kernel, stride, padding, dilation)."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn
from torch.nn import functional as F

from ...bundle.manifest import LayerSpec
from .base import Adapter, LinearMath


class ConvAdapter(LinearMath, Adapter):
    kind = "conv"
    describes = "nn.Conv1d / nn.Conv2d"
    autocast = True
    rule = "batch-first"  # PyTorch convolutions take [N, C, ...]

    def __init__(self, name: str, module: nn.Module, group: int = 0):
        super().__init__(name, module)
        self.group = group
        self._cache: tuple | None = None  # (input id, unfolded patches): shared by the groups of one call

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return type(module) in (nn.Conv1d, nn.Conv2d)

    @classmethod
    def create(cls, name: str, module: nn.Module) -> list[Adapter]:
        G = module.groups
        return [cls(name if G == 1 else f"{name}.group{g}", module, g) for g in range(G)]

    @property
    def two_d(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    @property
    def _out_per_group(self) -> int:
        return self.module.out_channels // self.module.groups

    @property
    def _in_per_group(self) -> int:
        return self.module.in_channels // self.module.groups

    @property
    def taps(self) -> int:
        k = self.module.kernel_size
        return k[0] * (k[1] if self.two_d else 1)

    @cached_property
    def spec(self) -> LayerSpec:
        m = self.module
        spec = LayerSpec(self.name, self.kind, self._in_per_group * self.taps, self._out_per_group, m.bias is not None, 0, 1)
        spec.extra["conv"] = {"module": self.name if m.groups == 1 else self.name.rsplit(".group", 1)[0],
                              "dims": 2 if self.two_d else 1, "kernel": list(m.kernel_size), "stride": list(m.stride),
                              "padding": [int(p) for p in m._reversed_padding_repeated_twice[::-2]],
                              "dilation": list(m.dilation), "groups": m.groups, "group": self.group,
                              "in_channels": m.in_channels, "out_channels": m.out_channels}
        return spec

    @cached_property
    def params(self) -> list[torch.Tensor]:
        m = self.module
        return [m.weight] + ([m.bias] if m.bias is not None else [])

    @property
    def rows(self) -> slice:
        o = self._out_per_group
        return slice(self.group * o, (self.group + 1) * o)

    @property
    def feature(self) -> int:
        return self.spec.in_features

    def layout(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rows].reshape(self._out_per_group, -1)

    def weight(self) -> torch.Tensor:
        return self.layout(self.module.weight.detach())

    def weight_grad(self) -> torch.Tensor | None:
        g = self.module.weight.grad
        return None if g is None else g[self.rows].reshape(self._out_per_group, -1)

    # ---------------------------------------------------------------- capture
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C_in·taps, L_out]: the input patch of every output position, as the module pads it."""
        if self._cache is not None and self._cache[0] is x:
            return self._cache[1]
        m = self.module
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        pad = m._reversed_padding_repeated_twice
        xp = F.pad(x, pad, mode=mode) if any(pad) else x
        if self.two_d:
            cols = F.unfold(xp, m.kernel_size, dilation=m.dilation, stride=m.stride)
        else:
            cols = F.unfold(xp.unsqueeze(2), (1, m.kernel_size[0]), dilation=(1, m.dilation[0]), stride=(1, m.stride[0]))
        self._cache = (x, cols)
        return cols

    def lead(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], self.patches(x).shape[-1])

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        cols = self.patches(x)
        k = self.spec.in_features
        part = cols[:, self.group * k : (self.group + 1) * k]  # this group's input channels
        if self.group == self.module.groups - 1:
            self._cache = None  # the last group of this call: let the patches go
        return part.transpose(1, 2).reshape(-1, k)

    def output_rows(self, out: torch.Tensor) -> torch.Tensor:
        o = out[:, self.rows]  # [N, C_out/G, *spatial]
        return o.reshape(o.shape[0], o.shape[1], -1).transpose(1, 2).reshape(-1, self._out_per_group)

    @property
    def probe_width(self) -> int:
        return self.probe_rows()

    @property
    def projected_rows(self) -> int:
        return self._out_per_group

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        return self.linear_project_grad(probe)

    def project_patterns(self, keys, grads, seg, steps, probe):
        return self.linear_project_patterns(keys, grads, seg, steps, probe)
