"""Which example of the batch each input row of a recorded layer belongs to (docs/format.md §6).

A layer's input has "lead" dimensions (everything but the feature axis of a Linear; all of an
Embedding's id tensor) and one row per lead index. The batch has B rows (one id each, from
`Recorder.batch(example=...)`). The rules:

- batch-first: axis 0 is the batch (`[B, ...]`), or a flat `[B·L]` row axis example-major;
- sequence-first: axis 1 is the batch (`[L, B, ...]`, PyTorch's default for Transformer and
  RNN modules), or a flat `[L·B]` row axis example-minor (what `nn.MultiheadAttention` hands
  its output projection, and what `torch.cat` of two views along the batch gives);
- broadcast: a `[1, ...]` input used for all B examples (Hugging Face position ids) is
  expanded to `[B, ...]` before the layer runs, so each example gets its own pattern and its
  own error signal instead of one pattern carrying the batch's summed gradient.

A shape that fits more than one rule ([B, B, C], [k·B, C]) is decided by the attribution check
at the step where the layer first runs (only the true mapping passes it), or refused with a
message saying what to declare when the check is off or cannot tell; [1, B] (one row per
position shared by the batch, or one position of a sequence-first batch) is always refused
unless declared, because the two readings need different inputs. A shape that fits no rule
is refused too. Nothing is guessed.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Mapping

import torch

RULES = ("batch-first", "sequence-first")


class LayoutError(Exception):
    """The rows of a layer's input cannot be mapped to the batch's examples unambiguously."""


class AmbiguousLayout(LayoutError):
    """Several rules fit the shape (e.g. [B, B, C]) and none needs the input changed: the
    attribution check can tell them apart by proof at the step where the layer first runs."""

    def __init__(self, message: str, candidates: list["RowMap"]):
        super().__init__(message)
        self.candidates = candidates


@dataclass(frozen=True)
class RowMap:
    """How the n rows of one layer call map to the B rows of the batch."""

    rule: str  # "batch-first" | "sequence-first" | "broadcast" | "broadcast-sequence-first" | "explicit"
    batch: int  # B
    rows: int  # n, after any expansion
    inner: int  # batch-first: rows per example; sequence-first: rows per (outer index, example)
    expand_to: tuple[int, ...] | None = None  # lead shape to expand the input to (broadcast)

    def examples(self) -> torch.Tensor:
        """[n] int64: the batch row (0..B-1) of each input row, in flattened (C) order."""
        return self._examples

    @cached_property
    def _examples(self) -> torch.Tensor:  # computed once per shape (RowMaps are cached per layer)
        r = torch.arange(self.rows)
        if self.rule.endswith("sequence-first"):
            return (r // self.inner) % self.batch
        return r // self.inner

    def positions(self) -> torch.Tensor:
        """[n] int64: each row's position within its example (the flattened non-batch index)."""
        return self._positions

    @cached_property
    def _positions(self) -> torch.Tensor:
        r = torch.arange(self.rows)
        if self.rule.endswith("sequence-first"):
            return (r // (self.batch * self.inner)) * self.inner + r % self.inner
        return r % self.inner

    @property
    def per_example(self) -> int:
        return self.rows // max(self.batch, 1)


def declared_rule(name: str, layouts: Mapping[str, str] | None) -> str | None:
    """The rule the user declared for layer `name` (exact name first, then glob patterns)."""
    if not layouts:
        return None
    if name in layouts:
        return layouts[name]
    for pattern, rule in layouts.items():
        if fnmatch.fnmatchcase(name, pattern):
            return rule
    return None


def check_layouts(layouts: Mapping[str, str] | None) -> None:
    for pattern, rule in (layouts or {}).items():
        if rule not in RULES:
            raise LayoutError(f"layouts[{pattern!r}] = {rule!r}: choose {' or '.join(repr(r) for r in RULES)}")


def _shape(lead: tuple[int, ...], feature: int | None) -> str:
    dims = list(lead) + ([feature] if feature is not None else [])
    return "[" + ", ".join(map(str, dims)) + "]"


def resolve(layer: str, lead: tuple[int, ...], batch: int, rule: str | None, feature: int | None = None) -> RowMap:
    """The RowMap of a layer call whose input has lead shape `lead`, in a batch of `batch` rows.
    `rule` is the declared (or earlier resolved) rule, None to infer it from the shape."""
    B = batch
    n = math.prod(lead) if lead else 1
    shape = _shape(lead, feature)
    where = f"layer {layer!r} got an input of shape {shape} in a batch of {B} example ids"
    declare = (f"declare the layout with Recorder(..., layouts={{{layer!r}: 'batch-first'}}) (axis 0 is the batch) "
               f"or 'sequence-first' (axis 1 is the batch)")
    if B < 1:
        raise LayoutError(f"{where}: the batch has no example ids")
    if not lead:
        if B == 1:
            return RowMap("batch-first", 1, 1, 1)
        raise LayoutError(f"{where}: an unbatched input cannot be split over the examples")
    if B == 1:  # every row belongs to the one example, whatever the layout
        return RowMap("batch-first", 1, n, n)
    if rule == "batch-first":
        if lead[0] == B:
            return RowMap("batch-first", B, n, n // B)
        if lead[0] == 1:
            return RowMap("broadcast", B, n * B, n, (B,) + lead[1:])
        if len(lead) == 1 and lead[0] % B == 0:
            return RowMap("batch-first", B, n, n // B)
        raise LayoutError(f"{where}: with the declared layout 'batch-first' axis 0 must have {B} (or 1) rows")
    if rule == "sequence-first":
        if len(lead) >= 2 and lead[1] == B:
            return RowMap("sequence-first", B, n, math.prod(lead[2:]))
        if len(lead) >= 2 and lead[1] == 1:
            return RowMap("broadcast-sequence-first", B, n * B, math.prod(lead[2:]), (lead[0], B) + lead[2:])
        if len(lead) == 1 and lead[0] % B == 0:
            return RowMap("sequence-first", B, n, 1)
        raise LayoutError(f"{where}: with the declared layout 'sequence-first' axis 1 must have {B} (or 1) rows")
    if rule is not None:
        raise LayoutError(f"layout {rule!r} of layer {layer!r}: choose {' or '.join(repr(r) for r in RULES)}")
    # Inferred from the shape alone, only where exactly one rule fits.
    if len(lead) == 1:
        if n == B:
            return RowMap("batch-first", B, n, 1)
        if n == 1:
            return RowMap("broadcast", B, B, 1, (B,))
        if n % B == 0:
            raise AmbiguousLayout(
                f"{where}: {n} = {n // B}·{B} rows fit several layouts; declare Recorder(..., layouts={{{layer!r}: "
                f"'batch-first'}}) if the rows are example-major (x.view(B*L, C)), 'sequence-first' if example-minor "
                f"(x.view(L*B, C), or torch.cat of views along the batch), or give one example id per row with "
                f"batch(example=...)", [RowMap("batch-first", B, n, n // B), RowMap("sequence-first", B, n, 1)])
        raise LayoutError(f"{where}: {n} rows do not split over {B} examples; if the input is shared by the whole "
                          f"batch (torch.arange(L) positions, say), give it a batch axis of size 1 (x[None]) and it is "
                          f"broadcast; otherwise give one example id per row with batch(rows={{{layer!r}: ids}})")
    s0, s1 = lead[0], lead[1]
    if s0 == B and s1 != B:
        return RowMap("batch-first", B, n, n // B)
    if s1 == B and s0 not in (B, 1):
        return RowMap("sequence-first", B, n, math.prod(lead[2:]))
    if s0 == 1 and s1 != B:
        return RowMap("broadcast", B, n * B, n, (B,) + lead[1:])
    if s0 == B and s1 == B:
        raise AmbiguousLayout(f"{where}: axes 0 and 1 both have {B} rows, so the batch axis is ambiguous; {declare}",
                              [RowMap("batch-first", B, n, n // B), RowMap("sequence-first", B, n, math.prod(lead[2:]))])
    if s0 == 1 and s1 == B:
        raise LayoutError(f"{where}: it is either one row per position shared by the batch ([1, L] with L = {B}) or "
                          f"sequence-first with one position; {declare}")
    raise LayoutError(f"{where}: neither axis 0 nor axis 1 has {B} rows (are the rows not one per example, e.g. two "
                      f"views concatenated?); give one example id per batch row with batch(example=...), or per layer "
                      f"with batch(rows={{{layer!r}: ids}})")


def resolve_output(shape: tuple[int, ...], batch: int, rule: str | None, evidence: str | None = None) -> RowMap:
    """The RowMap of the model's output [rows..., classes]: the reference the attribution check
    weights by, so it must never be guessed.

    `rule` is the declared output layout; `evidence` what the model's input showed during
    training (its first tensor argument, [B, L, ...] or [L, B, ...] with L != B). A square
    output ([B, B, ...]) with neither is refused: batch and positions cannot be told apart by
    any gradient when positions do not interact, so only the user can say which axis is the
    batch (output_layout=, or a layouts={'*': ...} default)."""
    lead = tuple(shape[:-1]) if len(shape) >= 2 else tuple(shape)
    square = len(shape) >= 2 and shape[0] == shape[1] == batch and batch > 1
    if rule is None and square:
        if evidence == "batch-first" or (evidence == "sequence-first" and len(shape) >= 3):
            rule = evidence
        else:
            raise LayoutError(f"the model's output has shape {list(shape)}: axes 0 and 1 both have {batch} rows; "
                              "say which is the batch with Recorder(..., output_layout='batch-first' or "
                              "'sequence-first')")
    try:
        return resolve("(model output)", lead, batch, rule)
    except AmbiguousLayout:
        raise LayoutError(f"the model's output has {math.prod(lead)} rows for {batch} example ids: give one example id "
                          "per output row with batch(example=...)") from None


def input_rule(args: tuple, batch: int) -> str | None:
    """The layout the model's first tensor input shows unambiguously ([B, L, ...] or [L, B, ...])."""
    for a in args:
        if hasattr(a, "shape") and hasattr(a, "dim"):
            if a.dim() < 2:
                return None
            s0, s1 = a.shape[0], a.shape[1]
            if s0 == batch and s1 != batch:
                return "batch-first"
            if s1 == batch and s0 != batch:
                return "sequence-first"
            return None
    return None


def explicit(layer: str, lead: tuple[int, ...], ids: torch.Tensor, feature: int | None = None) -> RowMap:
    """A per-layer list of one example id per input row (batch(rows=...)), as a RowMap that
    maps row r to itself; the caller looks the ids up instead of the batch's."""
    n = math.prod(lead) if lead else 1
    if ids.numel() != n:
        raise LayoutError(f"batch(rows={{{layer!r}: ...}}) gives {ids.numel()} example ids for an input of shape "
                          f"{_shape(lead, feature)} ({n} rows)")
    return RowMap("explicit", n, n, 1)
