"""The attribution check: proof, while training, that every pattern is credited to the right example.

`W = w0 + Σ v kᵀ` holds whichever example a pattern is labelled with, so `verify` cannot see a
wrong example id. This check can. At sampled steps the model's output gradient G (what the loss
sends back into the model) is backpropagated twice more from the output, inside the user's own
backward pass (a reentrant `torch.autograd.grad`, so no forward is re-run and dropout masks stay
the same): once as it is, giving g¹_r at every recorded output row r, and once with the rows of
each example e weighted by a random factor c_e, giving g^c_r. Backpropagation is linear in G, so
when example e alone produced row r, g^c_r = c_e·g¹_r exactly. A row credited to the wrong
example, or fed by two examples, breaks that equality; the check compares it per example with
the recorder's own mapping and stops the run on a mismatch.

What it proves: the rows' example ids, for the part of each layer's gradient that passes through
the model's output (an auxiliary loss taken elsewhere is left out, not mistaken for an error).
Where it cannot run (the loss never uses the model's output, e.g. computed inside a Hugging Face
forward from labels=...; an output whose batch axis is ambiguous) it says so in the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .layout import LayoutError, input_rule, resolve_output

METHOD = "weighted-backward"
# Relative error allowed per example, by the dtype autograd computed the gradients in. A wrong
# row is off by |c_a/c_b - 1|, typically 0.3 with c in [1, 4); rounding is orders smaller.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}
# Examples whose gradient is this small next to the largest of the call are rounding noise.
FLOOR = 1e-6


def default_schedule(step: int) -> bool:
    """The first three steps, steps 4, 8, 16, ..., and one step in 64 more, drawn by a fixed
    hash of the step: a model whose row order changes from step to step (a batch sorted inside
    forward) is caught at one of those instead of only at the powers of two it may dodge."""
    if step < 3 or (step & (step - 1)) == 0:
        return True
    h = (step * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    return (h >> 58) == 0  # the top 6 bits: 1 in 64


def make_schedule(spec: bool | int | Sequence[int] | Callable[[int], bool]) -> Callable[[int], bool] | None:
    if spec is False or spec is None:
        return None
    if spec is True:
        return default_schedule
    if callable(spec):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        if spec < 1:
            raise ValueError("check_attribution=N needs N >= 1 (check every N steps)")
        return lambda s: default_schedule(s) or s % spec == 0
    steps = {int(s) for s in spec}
    return lambda s: s in steps


def example_weights(ids: torch.Tensor, step: int) -> torch.Tensor:
    """c_e in [1, 4) for example ids, a fixed pseudo-random function of (id, step): two rows of
    one example always get the same weight, whatever batch row they sit in."""
    u = (ids.cpu().numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
         + np.uint64((step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64))
    u ^= u >> np.uint64(31)
    u *= np.uint64(0xD6E9F4B4B6A1B5C5)
    u ^= u >> np.uint64(29)
    frac = (u >> np.uint64(11)).astype(np.float64) / float(2**53)
    return torch.from_numpy(1.0 + 3.0 * frac)


@dataclass
class _Forward:
    """One checked forward pass: its calls of recorded layers, and what its output tap saw."""

    step: int
    batch_ids: torch.Tensor  # [B] example ids of the batch rows
    calls: list[Any] = field(default_factory=list)  # _Call objects of this forward
    tapped: bool = False
    coupled: list[str] = field(default_factory=list)  # BatchNorm modules in training mode


class _Tap(torch.autograd.Function):
    """Identity on the model output whose backward runs the two extra backward passes."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Callable) -> torch.Tensor:  # type: ignore[override]
        ctx.run = run
        ctx.inner = x  # the original output: the reentrant passes start from its grad_fn
        return x.clone()  # a copy, so in-place changes downstream cannot touch `inner`

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        ctx.run(ctx.inner, grad)
        ctx.inner = None
        return grad, None


class AttributionCheck:
    """The check's state across a recording, and its result for the manifest."""

    def __init__(self, schedule: Callable[[int], bool] | None, output_layout: str | None = None):
        self.schedule = schedule
        self.output_layout = output_layout
        self.current: _Forward | None = None
        self.running = False  # True inside the extra backward passes: capture nodes must not record
        self.steps: list[int] = []
        self.layer_error: dict[str, float] = {}
        self.tolerance = 0.0
        self.skipped: dict[str, str] = {}  # why a checked step could not be checked (first reason each)
        self.not_reached: set[str] = set()
        self.reached: set[str] = set()
        self.input_rule: str | None = None  # the model input's layout, when a batch showed it
        self.failure: str | None = None  # the first failed comparison (the run stopped there)
        # BatchNorm in training mode mixes the examples' error signals in the backward pass: the
        # layers before it cannot be checked this way (their rows follow PyTorch's batch axis).
        self.coupled: set[str] = set()
        self.coupling: list[str] = []  # the BatchNorm modules that did it
        self.batch_norms: Callable[[], list[str]] = lambda: []
        self.output_rule: str | None = None  # how the model's output rows were read

    @property
    def enabled(self) -> bool:
        return self.schedule is not None

    # ------------------------------------------------------------------ forward side
    def begin(self, step: int, batch_ids: torch.Tensor | None, args: tuple = ()) -> None:
        """At the model's forward pre-hook: is this forward one to check?"""
        self.current = None
        if batch_ids is not None and batch_ids.numel() > 1 and self.input_rule is None:
            self.input_rule = input_rule(args, batch_ids.numel())
        if self.schedule is not None and batch_ids is not None and batch_ids.numel() and self.schedule(step):
            self.current = _Forward(step, batch_ids, coupled=self.batch_norms())

    def note_call(self, call: Any) -> None:
        if self.current is not None:
            self.current.calls.append(call)

    def tap(self, output: Any) -> Any:
        """At the model's forward hook: wrap the output so that its backward runs the check."""
        fwd, self.current = self.current, None
        if fwd is None or not fwd.calls:
            return None
        tensor, put = find_output(output)
        if tensor is None or not tensor.requires_grad or not tensor.is_floating_point():
            self._skip(fwd.step, "the model's output is not a tensor (or an object with .logits) that requires grad")
            return None
        if tensor.dim() == 0:
            self._skip(fwd.step, "the model's output is a scalar (a loss computed inside forward), not one output per example")
            return None
        B = fwd.batch_ids.numel()
        lead = tuple(tensor.shape[:-1]) if tensor.dim() >= 2 else tuple(tensor.shape)
        try:
            rowmap = resolve_output(tuple(tensor.shape), B, self.output_layout, self.input_rule)
        except LayoutError as e:
            self._skip(fwd.step, str(e))
            return None
        if rowmap.expand_to is not None:
            self._skip(fwd.step, "the model's output is shared by the batch ([1, ...])")
            return None
        if self.output_rule is None:
            square = tensor.dim() >= 2 and tensor.shape[0] == tensor.shape[1] == B and self.output_layout is None
            self.output_rule = rowmap.rule + (" (square output: read like the model's input)" if square else "")
        c_rows = example_weights(fwd.batch_ids[rowmap.examples()], fwd.step)
        weights = c_rows.to(device=tensor.device, dtype=tensor.dtype).reshape(lead + ((1,) if tensor.dim() >= 2 else ()))
        fwd.tapped = True

        def run(inner: torch.Tensor, grad: torch.Tensor) -> None:
            self._backward_twice(fwd, inner, grad, weights)

        return put(_Tap.apply(tensor, run))

    # ------------------------------------------------------------------ backward side
    def _backward_twice(self, fwd: _Forward, inner: torch.Tensor, grad: torch.Tensor, weights: torch.Tensor) -> None:
        outs = [c.check_out for c in fwd.calls if c.check_out is not None]
        if not outs:
            return
        self.running = True
        try:
            plain = torch.autograd.grad(inner, outs, grad_outputs=grad, retain_graph=True, allow_unused=True)
            weighted = torch.autograd.grad(inner, outs, grad_outputs=grad * weights, retain_graph=True, allow_unused=True)
        finally:
            self.running = False
        it = iter(zip(plain, weighted))
        for c in fwd.calls:
            if c.check_out is None:
                continue
            g1, gc = next(it)
            c.check_grads = (None if g1 is None else c.rows_of(g1.detach()),
                             None if gc is None else c.rows_of(gc.detach()))
            c.check_coupled = fwd.coupled
            c.check_step = fwd.step
            c.check_out = None  # no reference to the graph beyond this pass

    # ------------------------------------------------------------------ comparison
    def compare(self, layer: str, calls: list[Any], example_of: Callable[[Any], torch.Tensor]) -> str | None:
        """Compare the checked calls of one layer at one step. Returns a failure message or None.
        A call whose layout the shape left open (`candidates`) gets the one layout that passes."""
        worst, worst_at = 0.0, None
        checked = False
        for c in calls:
            grads = getattr(c, "check_grads", None)
            if grads is None:
                continue
            c.check_grads = None
            g1, gc = grads
            if g1 is None or gc is None or not bool(g1.abs().max() > 0):
                self.not_reached.add(layer)
                continue
            tol = TOLERANCE.get(c.grad_dtype, 1e-3)
            self.tolerance = max(self.tolerance, tol)
            if c.candidates is not None and getattr(c, "check_coupled", None):
                return (f"{c.ambiguity}; the attribution check cannot decide it, because BatchNorm in training mode "
                        f"({', '.join(c.check_coupled[:3])}) mixes the examples' error signals")
            if c.candidates is not None:
                fits = []
                for cand in c.candidates:
                    c.rowmap = cand
                    err, ex = _relative_error(g1, gc, example_of(c), c.check_step)
                    fits.append((err, ex, cand))
                passing = [f for f in fits if f[0] <= tol]
                if len(passing) != 1:
                    how = "both fit" if passing else "neither fits"
                    return (f"{c.ambiguity}; the attribution check could not tell the layouts apart at step {c.check_step} "
                            f"({how}: relative errors {', '.join(f'{f[2].rule} {f[0]:.2g}' for f in fits)})")
                err, ex, c.rowmap = passing[0]
                c.candidates = None
            else:
                err, ex = _relative_error(g1, gc, example_of(c), c.check_step)
            if err > tol and getattr(c, "check_coupled", None):
                self.coupled.add(layer)  # not a proof either way: said in the manifest, not failed
                self.coupling = sorted(set(self.coupling) | set(c.check_coupled))
                continue
            checked = True
            if err > worst or worst_at is None:
                worst, worst_at = err, (ex, tol, c.check_step)
        if not checked:
            return None
        self._compared = True
        self.reached.add(layer)
        self.layer_error[layer] = max(self.layer_error.get(layer, 0.0), worst)
        if worst_at is not None and worst > worst_at[1]:
            example, tol, step = worst_at
            self.failure = self.failure or (f"step {step}, layer {layer!r}: the error signals credited to example "
                                            f"{example} do not come from it alone (relative error {worst:.2g})")
            return (f"attribution check failed at layer {layer!r}, step {step}: the error signals credited to example "
                    f"{example} do not come from example {example} alone (relative error {worst:.2g}, tolerance {tol:g}); "
                    "the layer's input rows are mapped to the wrong examples: declare Recorder(layouts=...) or give "
                    "one example id per row with batch(example=...)")
        return None

    def step_done(self, step: int) -> None:
        """The step's comparisons are done: list it if any layer was really compared at it."""
        if getattr(self, "_compared", False) and step not in self.steps:
            self.steps.append(step)
        self._compared = False

    def _skip(self, step: int, reason: str) -> None:
        self.skipped.setdefault(reason, str(step))

    # ------------------------------------------------------------------ the manifest
    def to_json(self, layers: Sequence[str]) -> dict[str, Any]:
        if self.schedule is None:
            return {"checked": False, "reason": "turned off (check_attribution=False)"}
        if not self.steps:
            reason = next(iter(self.skipped), "no checked step reached the model's output (the loss does not use it)")
            return {"checked": False, "reason": reason}
        errs = [v for v in self.layer_error.values()]
        out: dict[str, Any] = {
            "checked": True,
            "ok": self.failure is None,
            "method": METHOD,
            "steps": list(self.steps),
            "max_relative_error": max(errs) if errs else 0.0,
            "tolerance": self.tolerance,
            "layers": {L: self.layer_error[L] for L in layers if L in self.layer_error},
            "output_rows": self.output_rule,
        }
        unchecked = [L for L in layers if L not in self.layer_error and L not in self.coupled]
        if unchecked:
            out["unchecked_layers"] = unchecked  # their gradient never passed through the model's output
        coupled = [L for L in layers if L in self.coupled and L not in self.layer_error]
        if coupled:
            out["coupled_layers"] = coupled
            out["coupled_by"] = self.coupling
        if self.skipped:
            out["skipped"] = [f"step {s}: {r}" for r, s in self.skipped.items()]
        if self.failure:
            out["failed"] = self.failure  # the run stopped there; earlier patterns may be wrong too
        return out


def _relative_error(g1: torch.Tensor, gc: torch.Tensor, ids: torch.Tensor, step: int) -> tuple[float, int]:
    """max over examples of ‖g^c − c_e g¹‖ / ‖c_e g¹‖ over the rows credited to e, and that e."""
    g1 = g1.to(torch.float64)
    gc = gc.to(torch.float64)
    cw = example_weights(ids, step).to(g1.device)
    diff = torch.linalg.vector_norm(gc - cw[:, None] * g1, dim=1) ** 2
    size = torch.linalg.vector_norm(cw[:, None] * g1, dim=1) ** 2
    uniq, inv = torch.unique(ids.to(g1.device), return_inverse=True)
    d = torch.zeros(len(uniq), dtype=torch.float64, device=g1.device).index_add_(0, inv, diff).sqrt()
    s = torch.zeros(len(uniq), dtype=torch.float64, device=g1.device).index_add_(0, inv, size).sqrt()
    rel = d / torch.clamp(s, min=FLOOR * float(s.max()))
    k = int(rel.argmax())
    return float(rel[k]), int(uniq[k])


def find_output(output: Any) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], Any]]:
    """The logits tensor inside a model's output, and how to put a replacement back."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        def put(t: torch.Tensor) -> Any:
            try:
                output["logits"] = t  # ModelOutput keeps attributes and keys in step
            except TypeError:
                setattr(output, "logits", t)
            return output
        return logits, put
    if isinstance(output, dict) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"], lambda t: {**output, "logits": t}
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        def put_first(t: torch.Tensor) -> Any:
            if hasattr(output, "_fields"):  # a namedtuple
                return output._replace(**{output._fields[0]: t})
            return type(output)([t, *output[1:]])
        return output[0], put_first
    return None, lambda t: output

