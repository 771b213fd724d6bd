"""One adapter per recorded module kind: how a kind's keys, values and queries are captured and
what the dual form of its parameters is. The recorder core knows no module kind itself."""

from __future__ import annotations

from torch import nn

from .attention import MultiheadAttentionAdapter
from .base import Adapter, AdapterError
from .conv import ConvAdapter
from .conv1d_hf import Conv1DAdapter
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter
from .norm import NormAdapter

# Most specific first: the first adapter whose `matches` accepts a module records it.
ADAPTERS: tuple[type[Adapter], ...] = (MultiheadAttentionAdapter, Conv1DAdapter, EmbeddingAdapter, LinearAdapter,
                                       ConvAdapter, NormAdapter)

# Kinds dualtui does not record, and what to do instead (said when they are named or left out).
_RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)
_UNSUPPORTED = {
    _RECURRENT: ("keeps its gate weights in fused parameters applied by one kernel; write the recurrence with "
                 "nn.Linear cells (e.g. gates = self.ih(x_t) + self.hh(h)), which dualtui records exactly, call by call"),
    (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Conv3d): "is a convolution kind dualtui does not record yet",
    (nn.Bilinear,): "is a bilinear map (two inputs per pattern), which dualtui does not record",
}


def adapter_class(module: nn.Module) -> type[Adapter] | None:
    for cls in ADAPTERS:
        if cls.matches(module):
            return cls
    return None


def unsupported_reason(name: str, module: nn.Module | None) -> str | None:
    """Why a module of a known kind is not recorded, naming what to do instead."""
    if module is None:
        return None
    for kinds, why in _UNSUPPORTED.items():
        if isinstance(module, kinds):
            return f"{type(module).__name__} {name!r} {why}"
    return None


def recordable_kinds() -> str:
    return ", ".join(dict.fromkeys(cls.describes for cls in ADAPTERS))


__all__ = ["ADAPTERS", "Adapter", "AdapterError", "ConvAdapter", "Conv1DAdapter", "EmbeddingAdapter", "LinearAdapter",
           "MultiheadAttentionAdapter", "NormAdapter", "adapter_class", "recordable_kinds", "unsupported_reason"]
