"""One adapter per recorded module kind: how a kind's keys, values and queries are captured and
what the dual form of its parameters is. The recorder core knows no module kind itself."""

from __future__ import annotations

from torch import nn

from .base import Adapter, AdapterError
from .embedding import EmbeddingAdapter
from .linear import LinearAdapter

# Most specific first: the first adapter whose `matches` accepts a module records it.
ADAPTERS: tuple[type[Adapter], ...] = (EmbeddingAdapter, LinearAdapter)


def adapter_class(module: nn.Module) -> type[Adapter] | None:
    for cls in ADAPTERS:
        if cls.matches(module):
            return cls
    return None


def recordable_kinds() -> str:
    return ", ".join(cls.describes for cls in ADAPTERS)


__all__ = ["ADAPTERS", "Adapter", "AdapterError", "EmbeddingAdapter", "LinearAdapter", "adapter_class", "recordable_kinds"]
