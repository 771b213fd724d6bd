"""Tied weights (docs/format.md: a layer's `tied`): one parameter used by an embedding and by a
linear head, recorded as two layers whose patterns both update the same matrix. Each layer ranks
its own patterns; the weight, and so `verify` and the learned term of the summary, is the sum
of both uses."""

from __future__ import annotations

import numpy as np

from ..bundle.reader import Bundle


def partners(bundle: Bundle, layer: str) -> list[str]:
    """The other layers that share `layer`'s weight."""
    tie = bundle.layer_spec(layer).extra.get("tied")
    if not tie:
        return []
    return [s.name for s in bundle.manifest.layers if s.extra.get("tied") == tie and s.name != layer]


def partner_learned(bundle: Bundle, layer: str, rows: int = 1 << 15) -> tuple[np.ndarray, np.ndarray] | None:
    """Σ over the partners' patterns of their updates to the shared matrix, in the layer's
    layout ([vocab, width] for both uses), and the same over |terms|; None without partners."""
    others = partners(bundle, layer)
    if not others:
        return None
    shape = bundle.info(f"layer/{layer}/weight").shape
    learned = np.zeros(shape)
    magnitude = np.zeros(shape)
    for other in others:
        emb = bundle.layer_spec(other).kind == "embedding"
        for chunk in bundle.chunks(other, rows):
            v = chunk.values.astype(np.float64)
            if emb:
                np.add.at(learned, chunk.keys, v)
                np.add.at(magnitude, chunk.keys, np.abs(v))
            else:
                k = chunk.keys.astype(np.float64)
                learned += v.T @ k
                magnitude += np.abs(v).T @ np.abs(k)
    return learned, magnitude
