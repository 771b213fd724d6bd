"""Query sets of a bundle (docs/format.md section 5): per-item tables and per-layer query rows.

A version-2 bundle stores each set under `queries/<S>/...`; a version-1 bundle has one set,
`test`, stored as `test/*` and `layer/<L>/queries|query_grad` with one row per item. A
`QuerySet` hides the difference, so the engine, the CLI and the app read both the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .manifest import QuerySetSpec

if TYPE_CHECKING:
    from .reader import Bundle

ITEM_FIELDS = ("label", "task", "prediction", "target", "probability", "loss", "example", "input")
ROW_FIELDS = ("query", "grad", "item", "position", "call", "focus")


@dataclass
class QueryRows:
    """The query rows of some items at one layer, as numpy arrays (floats as float32)."""

    query: np.ndarray  # [R, in] float32, or [R] int64 token ids for an embedding
    grad: np.ndarray  # [R, out] float32
    item: np.ndarray  # [R] int64: position of the row's item in the requested list
    position: np.ndarray  # [R] int64
    call: np.ndarray  # [R] int64
    focus: np.ndarray  # [M] int64: index into these rows, or -1 (mean over the item's rows)

    def __len__(self) -> int:
        return int(self.item.shape[0])

    def focus_query(self, m: int) -> np.ndarray | None:
        """The query the attention of item m is ranked with (its focus row; None for -1)."""
        f = int(self.focus[m])
        return None if f < 0 else self.query[f]


class QuerySet:
    """One named query set of a bundle."""

    def __init__(self, bundle: "Bundle", spec: QuerySetSpec, legacy: bool):
        self.bundle = bundle
        self.spec = spec
        self.name = spec.name
        self.legacy = legacy  # version 1: test/* and layer/<L>/queries

    # ------------------------------------------------------------------ names
    def item_name(self, field: str) -> str:
        if self.legacy:
            return f"test/{field}"
        return f"queries/{self.name}/{field}"

    def row_name(self, layer: str, field: str) -> str:
        if self.legacy:
            return {"query": f"layer/{layer}/queries", "grad": f"layer/{layer}/query_grad"}[field]
        return f"queries/{self.name}/layer/{layer}/{field}"

    # ------------------------------------------------------------------ per item
    @property
    def size(self) -> int:
        return int(self.bundle.info(self.item_name("label")).shape[0])

    def has(self, field: str) -> bool:
        if self.legacy and field not in ("label", "task", "prediction", "input"):
            return field == "target"  # v1: the target is the prediction
        return self.bundle.has(self.item_name(field))

    def array(self, field: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """A per-item field, read now (the v1 target is the prediction)."""
        if self.legacy and field == "target":
            field = "prediction"
        return self.bundle.array(self.item_name(field), start, stop)

    @property
    def label(self) -> np.ndarray:
        return self.array("label")

    @property
    def task(self) -> np.ndarray:
        return self.array("task")

    @property
    def prediction(self) -> np.ndarray:
        return self.array("prediction")

    @property
    def target(self) -> np.ndarray:
        return self.array("target")

    def input(self, m: int) -> np.ndarray | None:
        return self.array("input", m, m + 1)[0] if self.has("input") else None

    # ------------------------------------------------------------------ per layer
    def row_count(self, layer: str) -> int:
        return int(self.bundle.info(self.row_name(layer, "query")).shape[0]) if not self.legacy else self.size

    def rows_per_item(self, layer: str) -> float:
        return self.row_count(layer) / max(self.size, 1)

    def row_range(self, layer: str, items: np.ndarray) -> np.ndarray:
        """Indices of the rows of `items` at `layer` (in item order, then row order)."""
        items = np.asarray(items, dtype=np.int64)
        if self.legacy:
            return items
        item = self.bundle.raw(self.row_name(layer, "item"))
        lo = np.searchsorted(item, items, side="left")
        hi = np.searchsorted(item, items, side="right")
        return np.concatenate([np.arange(a, b) for a, b in zip(lo, hi)]) if len(items) else np.zeros(0, dtype=np.int64)

    def rows(self, layer: str, items: np.ndarray | list[int]) -> QueryRows:
        """The query rows of `items` at `layer`; `item` and `focus` are renumbered to the
        positions in `items` and in the returned rows."""
        items = np.asarray(items, dtype=np.int64)
        M = len(items)
        if self.legacy:
            query = self.bundle.take(self.row_name(layer, "query"), items)
            grad = self.bundle.take(self.row_name(layer, "grad"), items)
            zeros = np.zeros(M, dtype=np.int64)
            return QueryRows(query, grad, np.arange(M), zeros, zeros.copy(), np.arange(M))
        idx = self.row_range(layer, items)
        full_item = self.bundle.raw(self.row_name(layer, "item"))
        counts = np.searchsorted(full_item, items, side="right") - np.searchsorted(full_item, items, side="left")
        local_item = np.repeat(np.arange(M), counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if M else np.zeros(0, dtype=np.int64)
        # focus is stored as a global row index: map it into the returned rows
        focus_global = self.bundle.raw(self.row_name(layer, "focus"))[items].astype(np.int64)
        first_global = np.searchsorted(full_item, items, side="left")
        focus = np.where(focus_global >= 0, focus_global - first_global + starts, -1)
        get = lambda f: self.bundle.take(self.row_name(layer, f), idx)  # noqa: E731
        return QueryRows(get("query"), get("grad"), local_item, get("position"), get("call"), focus.astype(np.int64))
