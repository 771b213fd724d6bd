"""nn.Embedding: row k of the table is the weight of token k, so one pattern per input token id
(key: the id, value: dL/d(its output row)); attention is [k_t == q]."""

from __future__ import annotations

from functools import cached_property

import torch
from torch import nn

from ...bundle.manifest import LayerSpec
from .base import Adapter, AdapterError


class EmbeddingAdapter(Adapter):
    kind = "embedding"
    describes = "nn.Embedding"

    def __init__(self, name: str, module: nn.Module):
        super().__init__(name, module)
        if module.sparse:
            raise AdapterError(f"layer {name!r}: sparse embeddings are not supported (use sparse=False)")
        if module.scale_grad_by_freq:
            raise AdapterError(f"layer {name!r}: scale_grad_by_freq rescales each row's gradient by its token count, which breaks the dual form")
        if module.max_norm is not None:
            raise AdapterError(f"layer {name!r}: max_norm renormalises weights in the forward pass, which breaks the dual form")

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding)

    @cached_property
    def spec(self) -> LayerSpec:
        m = self.module
        return LayerSpec(self.name, self.kind, m.num_embeddings, m.embedding_dim, False, 0, 1)

    @cached_property
    def params(self) -> list[torch.Tensor]:
        return [self.module.weight]

    @property
    def feature(self) -> None:
        return None

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)

    def keep(self, keys: torch.Tensor) -> torch.Tensor | None:
        pad = self.module.padding_idx
        return None if pad is None else keys != pad  # PyTorch gives the padding row no gradient

    @property
    def probe_width(self) -> int:
        return self.module.embedding_dim

    @property
    def projected_rows(self) -> int:
        return self.module.num_embeddings

    def project_grad(self, probe: torch.Tensor) -> torch.Tensor:
        return self.weight_grad() @ probe  # [vocab, 2]

    def project_patterns(self, keys, grads, seg, steps, probe):
        p = probe.to(torch.float64)
        gp = grads @ p  # [n, 2]
        gp_abs = grads.abs() @ p.abs()
        keep = self.keep(keys)
        if keep is not None:
            gp, gp_abs = gp * keep[:, None], gp_abs * keep[:, None]
        rows = self.projected_rows
        recorded = torch.zeros(steps * rows, 2, dtype=torch.float64, device=keys.device)
        magnitude = torch.zeros_like(recorded)
        recorded.index_add_(0, seg * rows + keys, gp)
        magnitude.index_add_(0, seg * rows + keys, gp_abs)
        return recorded.view(steps, rows, 2), magnitude.view(steps, rows, 2)
