"""`Recorder`: hooks a PyTorch model and its optimizer and writes a dual-form bundle: exact for
torch.optim.SGD and Adafactor, a labelled approximation for Adam/AdamW (approximate=True).

Usage, in the user's own training loop:

    with Recorder(model, optimizer, "run.safetensors", tasks=[...], classes=[...]) as rec:
        for x, y, idx, task in loader:
            with rec.batch(example=idx, label=y, task=task):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        rec.record_test(x_test, y_test, tasks=t_test)             # the query set "test"
        rec.record_test(x_train[:1000], y_train[:1000], name="train-subset", examples=range(1000))
    # leaving the block writes the bundle; an exception or Ctrl-C writes the steps completed so far

The pieces: `adapters/` (what each module kind records), `layout.py` (which example each input
row belongs to), `gradscale.py` (primal == dual, step by step), `attribution.py` (the example
ids are right), `queries.py` (query sets), `coefficients.py` (the per-step scalars), `adaptive.py` (Adafactor's
and Adam's per-step rescaling of the patterns).
"""

from __future__ import annotations

import contextlib
import copy
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..bundle.manifest import INPUT_KINDS, LayerSpec, QuerySetSpec, bad_layer_name
from ..bundle.writer import STORAGE_DTYPES, BundleWriter, OutputError
from .adapters import Adapter, AdapterError, adapter_class, recordable_kinds, unsupported_reason
from .adapters.base import autograd_input
from .attribution import AttributionCheck, make_schedule
from .adaptive import adafactor_step, adam_scalars, adam_step, bias_fit, check_adafactor_layer, optimizer_rule
from .coefficients import StepRecord, coefficients
from .distributed import detect, rank_spools, unwrap
from .errors import RecorderError
from .gradscale import PendingStep, make_probe, measure_scales
from .journal import bias_chain, compose, write_merged, restore_check, state_of_check, steps_from_json, steps_json
from .layout import AmbiguousLayout, LayoutError, RowMap, check_layouts, declared_rule, explicit, resolve
from .queries import QuerySetInfo, record_query_set

HANDLED_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)


class Interrupted(KeyboardInterrupt):
    """A signal that ends training (SIGINT, SIGTERM, SIGHUP): handled like Ctrl-C, and remembered
    so a command line can exit with the conventional 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def interruption(exc: BaseException | None) -> str:
    """How the manifest names what stopped training."""
    if isinstance(exc, Interrupted):
        return "KeyboardInterrupt" if exc.signum == signal.SIGINT else signal.Signals(exc.signum).name
    if isinstance(exc, KeyboardInterrupt):
        return "KeyboardInterrupt"
    return type(exc).__name__ if exc is not None else "unknown"


class NotCovered(UserWarning):
    """Trained parameters that the recorded dual form will not describe (said when recording starts)."""


class Approximate(UserWarning):
    """The recording's dual form is approximate (Adam, AdamW): said when recording starts."""




class _CaptureGrad(torch.autograd.Function):
    """Identity whose backward hands dL/d(output) to a sink.

    A fresh autograd node (rather than a tensor hook) keeps working when the user's code
    later modifies the layer output in place, e.g. ReLU(inplace=True). The output must be a
    copy, not a view: PyTorch forbids in-place changes to a view returned by a custom Function.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, sink: "_Call") -> torch.Tensor:  # type: ignore[override]
        ctx.sink = sink
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        if not ctx.sink.check.running:  # the attribution check's extra passes record nothing
            ctx.sink.add_grad(grad)
        return grad, None


# Gradient scales are checked for a window of steps at once (one device sync per window);
# the first steps are checked before they are applied, so a training loop that cannot be
# recorded exactly stops before it changes any weight.
CHECK_WINDOW = 32
EAGER_STEPS = 2


@dataclass
class _Call:
    """One forward call of a recorded layer during training: its patterns, awaiting grads."""

    keys: torch.Tensor  # [n, in] (or [n] token ids)
    rowmap: RowMap  # which batch row each input row belongs to
    ids: torch.Tensor  # example ids: of the batch rows, or (explicit rows) of each input row (CPU)
    rows_of: Callable[[torch.Tensor], torch.Tensor]  # the output gradient as [n, out] (adapter.output_rows)
    check: AttributionCheck
    grad: torch.Tensor | None = None
    grad_dtype: torch.dtype = torch.float32
    check_out: torch.Tensor | None = None  # the output the attribution check differentiates
    check_grads: tuple | None = None
    check_coupled: list | None = None  # BatchNorm modules in training mode during the checked forward
    check_step: int = -1
    candidates: list[RowMap] | None = None  # layouts that fit the shape, for the attribution check to decide
    ambiguity: str = ""

    def add_grad(self, g: torch.Tensor) -> None:
        self.grad_dtype = g.dtype
        g = self.rows_of(g.detach())
        if g.dtype in (torch.float16, torch.bfloat16):  # mixed precision: exact in float32
            g = g.float()
        self.grad = g if self.grad is None else self.grad + g

    def example_ids(self) -> torch.Tensor:
        if self.rowmap.rule == "explicit":
            return self.ids
        return self.ids[self.rowmap.examples()]

    def positions(self) -> torch.Tensor:
        if self.rowmap.rule == "explicit":  # rows of one example numbered in order of appearance
            ids = self.ids
            order = torch.argsort(ids, stable=True)
            sorted_ids = ids[order]
            start = torch.ones_like(sorted_ids, dtype=torch.bool)
            start[1:] = sorted_ids[1:] != sorted_ids[:-1]
            idx = torch.arange(len(ids))
            first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
            pos = torch.empty_like(ids)
            pos[order] = idx - first
            return pos
        return self.rowmap.positions()


@dataclass
class _Layer:
    name: str
    adapter: Adapter
    spec: LayerSpec
    w_init: torch.Tensor  # W_0 (CPU copy, model dtype)
    b_init: torch.Tensor | None
    group: dict = field(default_factory=dict)  # the optimizer param group of weight (and bias)
    bias_group: dict | None = None  # the bias's group when it is a different one
    calls: list[_Call] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)  # one per optimizer step, by step index
    # The bias's own chain: its param group (weight decay 0 in the usual no-decay grouping), or
    # a bias without gradient, gives it other per-step coefficients than the weight's.
    bias_steps: list[StepRecord] = field(default_factory=list)
    pending: list[PendingStep] = field(default_factory=list)  # applied steps not yet spooled
    pending_bytes: int = 0
    probe: torch.Tensor | None = None  # fixed random directions for the gradient-scale check
    rule: str | None = None  # the layout rule: declared, or the first one inferred
    rule_used: str | None = None  # what the first call used (for the manifest)
    rowmaps: dict = field(default_factory=dict)  # (lead, B, test, rule) -> RowMap
    handles: list = field(default_factory=list)
    tie: str | None = None  # the parameter this layer shares with another use (tied weights)
    with_position: bool = False  # store each pattern's position within its example

    @property
    def module(self) -> nn.Module:
        return self.adapter.module

    @property
    def params(self) -> list[torch.Tensor]:
        return self.adapter.params


def seen_owner(seen: dict, p: torch.Tensor) -> str:
    """The layer that first recorded parameter p (whole)."""
    return next(v for k, v in seen.items() if k[0] == id(p))


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


_HYPER = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


def _hyper(group: dict) -> tuple:
    return tuple(float(group.get(k, 0)) if k not in ("nesterov", "maximize") else bool(group.get(k, False)) for k in _HYPER)


def _names(values: Sequence[Any] | None, what: str) -> list[str] | None:
    if values is None:
        return None
    out = list(values)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise RecorderError(f"{what} must be strings (names), not {type(bad[0]).__name__} {bad[0]!r}")
    return out


class Recorder:
    """Record the dual form of a model's `nn.Linear` / `nn.Embedding` layers during SGD training.

    layers: module names to record (default: every recordable module).
    storage_dtype: "float32" (default), "float16" or "bfloat16" for stored keys and values.
    tasks / classes: names; task and class ids index into them.
    clip_norm: the max norm you pass to clip_grad_norm_, for the manifest only (the factor
        each step actually applied is measured from the gradients, so any clipping by global
        norm, loss scaling or accumulation is exact without telling the recorder).
    input: the manifest's input description, e.g. {"kind": "image", "shape": [8, 8]}.
    train_inputs / train_labels / train_tasks: per training example (index = example id);
        labels and tasks may instead come from `batch(label=..., task=...)`.
    layouts: {layer name or glob: "batch-first" | "sequence-first"}, for inputs whose batch
        axis the shape alone does not tell (docs/format.md section 6); output_layout: the same
        for the model's output.
    check_attribution: True (default: steps 0, 1, 2, 4, 8, ...), False, every N steps, a list of
        steps, or a function of the step: when to prove the example ids (attribution.py).
    positions: store each pattern's position within its example (default: text runs only).
    journal_every / journal_seconds: how often the spool's journal is brought up to date (the
        steps a SIGKILL can lose: at most that many steps or seconds of training, whichever
        comes first); `dualtui recover` finishes a journal.
    resume: `rec.state_dict()` of an interrupted recording, saved beside the model's and the
        optimizer's checkpoint: the recording continues in the same spool from that step.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        path: str | Path,
        *,
        layers: Sequence[str] | None = None,
        storage_dtype: str | None = None,
        tasks: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
        input: dict | None = None,
        train_inputs: Any = None,
        train_labels: Any = None,
        train_tasks: Any = None,
        chunk_bytes: int = 32 << 20,
        max_shard_bytes: int = 4 << 30,
        training: dict | None = None,
        extra: dict | None = None,
        clip_norm: float | None = None,
        layouts: Mapping[str, str] | None = None,
        output_layout: str | None = None,
        check_attribution: bool | int | Sequence[int] | Callable[[int], bool] = True,
        positions: bool | None = None,
        journal_every: int = 1024,
        journal_seconds: float = 60.0,
        resume: dict | None = None,
        approximate: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise RecorderError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        # sgd and adafactor: exact; adam (Adam, AdamW): a labelled approximation (adaptive.py)
        self.rule = optimizer_rule(optimizer)
        if self.rule == "adam" and not approximate:
            raise RecorderError(
                f"{type(optimizer).__name__} cannot be recorded exactly: its per-coordinate preconditioner makes an update "
                f"no outer product of a key and a value (SGD and Adafactor are recorded exactly); pass approximate=True to "
                f"record it as a labelled approximation whose unexplained part every command reports")
        wrapper = model
        model = unwrap(model)  # DistributedDataParallel: its .module, so names match a 1-process run
        # Several processes (torch.distributed): each rank records its own patterns and the
        # ranks' journals become one bundle (distributed.py).
        self.world = detect()
        self._reduce = self.world.all_sum if self.world else None
        if storage_dtype is None:  # a float64 model is stored in float64, so verify reaches ~1e-12
            storage_dtype = "float64" if any(p.dtype == torch.float64 for p in model.parameters()) else "float32"
        if storage_dtype not in STORAGE_DTYPES:
            raise RecorderError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
        self.model = model
        self.optimizer = optimizer
        self.tasks = _names(tasks, "tasks")
        self.classes = _names(classes, "classes")
        self.input = self._check_input(dict(input) if input is not None else {"kind": "vector"})
        self.extra = dict(extra or {})
        self.training = dict(training or {})
        self.clip_norm = clip_norm  # informational: the actual clipping factor is measured per step
        try:
            check_layouts(layouts)
            check_layouts({"(model output)": output_layout} if output_layout is not None else None)
            # A layouts={"*": ...} default covers the model's output too.
            output_layout = output_layout or declared_rule("(model output)", layouts)
            self.check = AttributionCheck(make_schedule(check_attribution), output_layout)
        except (LayoutError, ValueError) as e:
            raise RecorderError(str(e)) from None
        self.layouts = dict(layouts or {})
        self.output_layout = output_layout
        self._pending_records: list = []
        self.check_failures: list[str] = []
        self.positions = self.input.get("kind") == "text" if positions is None else bool(positions)
        self.storage_dtype = storage_dtype
        self.step_count = 0
        self.closed = False
        self.interrupted: str | None = None
        self._example: torch.Tensor | None = None
        self._rows: dict[str, torch.Tensor] = {}
        self._labels: list[tuple[torch.Tensor, torch.Tensor]] = []  # (example ids, labels) per batch
        self._tasks_of: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._train_inputs = train_inputs
        if train_inputs is not None:
            self._check_preview("train_inputs", np.asarray(train_inputs.cpu() if isinstance(train_inputs, torch.Tensor) else train_inputs), None)
        self._train_labels = None if train_labels is None else torch.as_tensor(train_labels).long().reshape(-1).cpu()
        self._train_tasks = None if train_tasks is None else torch.as_tensor(train_tasks).long().reshape(-1).cpu()
        if self._train_labels is not None:
            self._check_ids("train_labels", self._train_labels, self.classes, "classes")
        if self._train_tasks is not None:
            self._check_ids("train_tasks", self._train_tasks, self.tasks, "tasks")
        self.query_set_specs: dict[str, QuerySetSpec] = {}
        self.query_tensors: dict[str, dict[str, np.ndarray]] = {}
        self.query_sets: dict[str, QuerySetInfo] = {}
        self._in_step = False
        self._finalizing = False
        self._pending_interrupt = 0  # a signal number, deferred until the step / the write is done
        self.late_signal: int | None = None  # one that came while close() wrote the bundle
        self._checkpointed, self._checkpointed_step = False, 0  # state_dict() was taken
        self._mode = "train"  # "train" | "test" (record_test) | "off"
        self._test_batch = 0
        self._test_seen: list = []
        self._compute_dtype: str | None = None  # torch.autocast's dtype, once a recorded layer ran under it
        self._checked_forward = False  # a forward of this step ran under the attribution check
        self._undecided = False  # some call of this step waits for the check to pick its layout
        self.skipped_steps = 0  # optimizer steps that never happened (GradScaler found inf/NaN)

        self._unrecordable: dict[str, str] = {}  # modules of a recordable kind in a configuration it cannot record
        # a copy: the recording goes on changing its state, the caller's checkpoint must not
        self._resume = self._check_resume(copy.deepcopy(resume), path) if resume is not None else None
        self.layers = self._select_layers(layers)
        for layer in self.layers.values():
            if self.rule != "sgd" and layer.tie is not None:
                other = next((o.name for o in self.layers.values() if o.tie == layer.tie and o is not layer), layer.tie)
                raise RecorderError(f"layer {layer.name!r} shares its weight with {other!r}: tied weights are recorded "
                                    f"with SGD only; leave one use out with layers=[...]")
            if self.rule == "adafactor":
                check_adafactor_layer(layer.name, layer.adapter, layer.params)
        self._pre_factors: dict[str, Any] = {}  # Adafactor: each layer's rescaling of this step, worked out before it
        bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # batch statistics (training mode, or no running statistics) couple the examples
        self.check.batch_norms = lambda: [n for n, m in bns if m.training or not m.track_running_stats]
        try:
            self.writer = BundleWriter(path, storage_dtype=storage_dtype, chunk_bytes=chunk_bytes,
                                       max_shard_bytes=max_shard_bytes,
                                       spool=Path(self._resume["spool"]) if self._resume else None,
                                       lock=self.world is None or self.world.rank == 0,
                                       spool_tag=self.world.spool_tag if self.world else "")
        except ValueError as e:
            raise RecorderError(str(e)) from None
        if journal_every < 1 or journal_seconds <= 0:
            raise RecorderError("journal_every must be >= 1 and journal_seconds > 0")
        self.journal_every, self.journal_seconds = int(journal_every), float(journal_seconds)
        self._arrays: dict[str, str] = {}  # journal key -> file in the spool
        self._live: dict[str, np.ndarray] = {}  # the same arrays, held for close()
        if self._resume:
            self._restore(self._resume)
        for layer in self.layers.values():
            # a convolution's pattern is an output position: always stored (the patch's place on the input)
            layer.with_position = self.positions or layer.adapter.kind == "conv"
            if not self._resume:
                self.writer.add_layer(layer.spec, with_position=layer.with_position)
            if layer.adapter.hooked:
                layer.handles = [layer.module.register_forward_hook(self._make_forward_hook(layer))]
            else:
                layer.handles = layer.adapter.install(self, layer)
        if self.rule == "adam":
            warnings.warn(Approximate(f"{type(optimizer).__name__}: recorded as an approximation (each step's preconditioner "
                                     f"replaced by its best rank-1 approximation); the bundle says how much of the "
                                     f"learned change its patterns explain, and verify exits 1 for it unless "
                                     f"--accept-approximate"), stacklevel=2)
        nc = self._not_covered()
        if nc:  # said at the start, not discovered in `verify` afterwards
            warnings.warn(NotCovered(self._not_covered_line(nc)), stacklevel=2)
        self._root_handles: list = []
        self._arm_check()
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)
        # A step GradScaler skips (inf/NaN gradients) runs neither hook: its calls would leak into
        # the next step. zero_grad() is where a training loop says "this step is over".
        self._zero_grad_owners = [optimizer, model] + ([wrapper] if wrapper is not model else [])
        for owner in self._zero_grad_owners:
            owner.zero_grad = self._make_zero_grad(owner.zero_grad)
        self._old_handlers: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C, a scheduler's SIGTERM, or SIGHUP when the SSH connection drops: the bundle of
            # the completed steps is written; inside optimizer.step() (half-updated weights) and
            # while the bundle is written the signal waits until that is done.
            for sig in HANDLED_SIGNALS:
                try:
                    self._old_handlers[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):
                    pass
        self._last_journal = time.monotonic()
        self._journaled_step = -1
        try:
            if not self._resume:
                self._save_once()
            self._journal()  # from here on, a SIGKILL loses at most one journal interval
        except OutputError as e:  # no room for even the first journal: refused before any step
            self.closed = True
            self._detach()
            if self._resume:
                self.writer.release()  # the checkpoint's spool stays as it was
                raise
            self.writer.abandon()
            raise OutputError(f"{e}; nothing was recorded") from None

    # ------------------------------------------------------------------ set-up and validation
    def _check_input(self, inp: dict) -> dict:
        """Refuse now what the bundle reader would refuse after training (docs/format.md §3)."""
        kind = inp.get("kind")
        if kind not in INPUT_KINDS:
            raise RecorderError(f"input kind {kind!r} is not one of {', '.join(INPUT_KINDS)} "
                                "(e.g. input={'kind': 'text', 'vocab': [...], 'context': 32})")
        if kind == "text":
            vocab = inp.get("vocab")
            if not isinstance(vocab, (list, tuple)) or not all(isinstance(t, str) for t in vocab):
                raise RecorderError("a text input needs 'vocab', the list of token strings (input={'kind': 'text', 'vocab': [...]})")
            inp["vocab"] = list(vocab)
            ctx = inp.get("context")
            if ctx is not None and (not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1):
                raise RecorderError(f"input 'context' must be a positive integer, not {ctx!r}")
        if kind == "image":
            shape = inp.get("shape")
            if (not isinstance(shape, (list, tuple)) or len(shape) not in (2, 3)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                raise RecorderError(f"an image input needs 'shape' [H, W] or [H, W, C] of positive integers, not {shape!r}")
            inp["shape"] = list(shape)
        return inp

    def _check_preview(self, what: str, a: np.ndarray, n: int | None) -> None:
        if n is not None and (a.ndim == 0 or a.shape[0] != n):
            raise RecorderError(f"{what} has {a.shape[0] if a.ndim else 0} rows for {n} items")
        if a.dtype.kind not in "biuf":
            raise RecorderError(f"{what} must be numbers (images, token ids or vectors), not {a.dtype}")
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise RecorderError(f"{what} holds NaN or Inf")
        kind = self.input["kind"]
        if kind == "image" and list(a.shape[1:]) != list(self.input["shape"]):
            raise RecorderError(f"{what} rows have shape {list(a.shape[1:])}, but input['shape'] is {self.input['shape']} "
                                "(previews are drawn as images of that shape)")
        if kind == "text":
            if a.dtype.kind not in "iu":
                raise RecorderError(f"{what} of a text run must be token ids (integers), not {a.dtype}")
            vocab = len(self.input["vocab"])
            if a.size and (a.min() < 0 or a.max() >= vocab):
                raise RecorderError(f"{what} holds token id {int(a.max()) if a.max() >= vocab else int(a.min())}, "
                                    f"outside the {vocab}-token vocabulary")

    def _check_ids(self, what: str, ids: torch.Tensor, names: list[str] | None, kind: str) -> None:
        if not ids.numel():
            return
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0:
            raise RecorderError(f"{what} hold {lo}: ids must be non-negative")
        if names is not None and hi >= len(names):
            raise RecorderError(f"{what} hold {hi}, but only {len(names)} {kind} are named (0..{len(names) - 1})")

    def _select_layers(self, names: Sequence[str] | None) -> dict[str, _Layer]:
        modules = dict(self.model.named_modules())
        if "" in modules and adapter_class(modules[""]) is not None:
            raise RecorderError(f"the model itself is an {type(self.model).__name__}: wrap it so that the layer has a name, "
                                "e.g. Recorder(nn.Sequential(model), ...) records it as layer '0'")
        # Each recordable module gives one or more layers (attention: four projections; a grouped
        # convolution: one per group); a submodule an adapter records itself gets none of its own.
        made: dict[str, list[Adapter]] = {}
        claimed: set[str] = set()
        for n, m in modules.items():
            if n in claimed:
                continue
            cls = adapter_class(m)
            if cls is None:
                continue
            try:
                adapters = cls.create(n, m)
            except AdapterError as e:
                if names is None or n in names:  # a kind dualtui records, configured so it cannot be exact
                    raise RecorderError(f"{e} (leave it out with layers=[...] to record the rest)") from None
                self._unrecordable[n] = str(e)
                continue
            made[n] = adapters
            for ad in adapters:
                claimed.update(ad.claims)
        by_layer = {ad.name: (n, ad) for n, ads in made.items() for ad in ads}
        if names is None:
            chosen = list(by_layer)
        else:
            chosen = []
            for n in names:
                if n in by_layer:
                    chosen.append(n)
                elif n in made:  # a module name: all its layers
                    chosen.extend(ad.name for ad in made[n])
                elif n in self._unrecordable:
                    raise RecorderError(self._unrecordable[n])
                elif n in modules:
                    why = unsupported_reason(n, modules[n]) or (f"module {n!r} is a {type(modules[n]).__name__}, which "
                                                                "dualtui cannot record")
                    raise RecorderError(f"{why}; recordable kinds: {recordable_kinds()}; recordable layers: "
                                        f"{', '.join(by_layer) or '(none)'}")
                else:
                    raise RecorderError(f"unknown layer {n!r}; recordable layers: {', '.join(by_layer) or '(none)'}")
        if not chosen:
            raise RecorderError(f"the model has no layer dualtui can record ({recordable_kinds()})")
        seen: dict[tuple, str] = {}  # (parameter, rows) -> the layer recording them
        whole: dict[int, tuple[str, Adapter]] = {}  # parameter -> a layer using it whole
        out: dict[str, _Layer] = {}
        for name in chosen:
            why = bad_layer_name(name)
            if why:
                raise RecorderError(why)
            adapter = by_layer[name][1]
            params = adapter.params
            half = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
            if half:
                raise RecorderError(f"layer {name!r} has {half[0].dtype} parameters: SGD then rounds the weights themselves "
                                    "at every step, which no dual form reproduces; keep float32 parameters and compute "
                                    "in half precision with torch.autocast")
            groups = []
            tie = None
            for j, p in enumerate(params):
                rows = adapter.param_rows(j)
                key = (id(p), None if rows is None else (rows.start, rows.stop))
                if key in seen or (rows is None and any(k[0] == id(p) for k in seen)) or \
                        (rows is not None and (id(p), None) in seen):
                    other = seen.get(key) or next(v for k, v in seen.items() if k[0] == id(p))
                    tie = self._tie(name, adapter, other, out, j, p)
                else:
                    seen[key] = name
                    if rows is None:
                        whole[id(p)] = (name, adapter)
                g = _group_of(self.optimizer, p)
                if g is None:
                    raise RecorderError(f"layer {name!r} has a parameter the optimizer does not train; leave it out with layers=[...]")
                if self.optimizer.state.get(p) and self._resume is None:
                    raise RecorderError(f"layer {name!r}: the optimizer already has state (momentum); attach the Recorder before the first step")
                groups.append(g)
            spec = adapter.spec
            w0 = adapter.weight().to("cpu", copy=True)
            b0 = adapter.bias().to("cpu", copy=True) if spec.bias else None
            bias_group = groups[1] if len(groups) == 2 and groups[1] is not groups[0] else None
            rule = declared_rule(name, self.layouts) or adapter.rule
            layer = _Layer(name, adapter, spec, w0, b0, group=groups[0], bias_group=bias_group, rule=rule)
            if tie is not None:
                layer.tie = tie
                out[seen_owner(seen, params[0])].tie = tie
            out[name] = layer
        return out

    def _non_finite(self, name: str) -> RecorderError:
        return RecorderError(f"layer {name!r} step {self.step_count}: the optimizer is about to apply a non-finite "
                             "gradient (inf/NaN); with mixed precision use torch.amp.GradScaler, which skips such steps")

    def _partner(self, layer: _Layer) -> _Layer:
        """The other use of a tied weight."""
        return next(lay for lay in self.layers.values() if lay.tie == layer.tie and lay is not layer)

    def _tie(self, name: str, adapter: Adapter, other: str, out: dict, j: int, p: torch.Tensor) -> str:
        """One parameter used by an Embedding and by a linear head (tied input/output embeddings,
        GPT-2's lm_head and wte): one matrix, two kinds of patterns. Anything else is refused."""
        first = out.get(other)
        kinds = {adapter.kind, first.adapter.kind if first is not None else None}
        if (j == 0 and first is not None and kinds == {"embedding", "linear"} and adapter.rows is None
                and first.adapter.rows is None and tuple(adapter.weight().shape) == tuple(first.adapter.weight().shape)
                and first.tie is None):
            names = {id(q): n for n, q in self.model.named_parameters()}
            return names.get(id(p), f"{other}.weight")
        raise RecorderError(f"layer {name!r} shares a parameter with {other!r}; dualtui records a weight shared by an "
                            "nn.Embedding and a linear head of the same shape (tied embeddings), not other sharing")

    def _make_zero_grad(self, original: Callable) -> Callable:
        def zero_grad(*args: Any, **kwargs: Any) -> Any:
            self._drop_unapplied()
            return original(*args, **kwargs)

        return zero_grad

    def _drop_unapplied(self) -> None:
        """Forget the calls whose gradients no optimizer step applied (a skipped step)."""
        dropped = False
        for layer in self.layers.values():
            if any(c.grad is not None for c in layer.calls):
                dropped = True
            # A forward whose backward is still to come (zero_grad between the two) stays.
            layer.calls = [c for c in layer.calls if c.grad is None]
        if dropped:
            self.skipped_steps += 1

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Under torch.distributed a signal waits for the end of the step, where the ranks stop together.
        if self._in_step or self._finalizing or self.world is not None:
            self._pending_interrupt = signum
            return
        raise Interrupted(signum)

    # ------------------------------------------------------------------ batches
    @contextlib.contextmanager
    def batch(self, example: Any, label: Any = None, task: Any = None, rows: Mapping[str, Any] | None = None):
        """Declare the training examples of the next forward pass(es): one id per row of the
        batch (ids index train/*; two views of one example are two rows with the same id).
        rows: {layer: one example id per input row of that layer}, for layers whose input rows
        follow no batch layout."""
        ex = torch.as_tensor(example).long().reshape(-1).cpu()
        if ex.numel() and int(ex.min()) < 0:
            raise RecorderError("example ids must be non-negative")
        for ids, store, what, names, kind in ((label, self._labels, "label", self.classes, "classes"),
                                              (task, self._tasks_of, "task", self.tasks, "tasks")):
            if ids is None:
                continue
            t = torch.as_tensor(ids).long().reshape(-1).cpu()
            if t.numel() == 1 and ex.numel() > 1:
                t = t.expand(ex.numel())
            if t.numel() != ex.numel():
                raise RecorderError(f"batch(): {t.numel()} {what}s for {ex.numel()} examples")
            self._check_ids(f"batch() {what}s", t, names, kind)
            store.append((ex, t))  # scattered into train/label, train/task at close
        explicit_rows: dict[str, torch.Tensor] = {}
        for name, ids in (rows or {}).items():
            if name not in self.layers:
                raise RecorderError(f"batch(rows=...): {name!r} is not a recorded layer; recorded: {', '.join(self.layers)}")
            t = torch.as_tensor(ids).long().reshape(-1).cpu()
            if t.numel() and int(t.min()) < 0:
                raise RecorderError("example ids must be non-negative")
            explicit_rows[name] = t
        previous, previous_rows = self._example, self._rows
        self._example, self._rows = ex, explicit_rows
        try:
            yield self
        finally:
            self._example, self._rows = previous, previous_rows

    def _rowmap(self, layer: _Layer, x: torch.Tensor, batch: int, test: bool = False) -> RowMap:
        """The RowMap of one call (cached per shape), resolved under the layer's rule. Raises
        AmbiguousLayout when several rules fit and the layer has none yet."""
        lead = layer.adapter.lead(x)
        key = (lead, batch, test, layer.rule)
        rowmap = layer.rowmaps.get(key)
        if rowmap is None:
            try:
                rowmap = resolve(layer.name, lead, batch, layer.rule, layer.adapter.feature)
            except AmbiguousLayout:
                raise
            except LayoutError as e:
                raise RecorderError(str(e)) from None
            if layer.rule is None and rowmap.rule in ("batch-first", "sequence-first") and batch > 1:
                # The first unambiguous shape fixes the layer's layout: later calls (a short last
                # batch with B == L, say) are read the same way, or refused if they cannot be.
                layer.rule = rowmap.rule
            elif layer.rule is None and rowmap.rule == "broadcast":
                layer.rule = "batch-first"
            layer.rule_used = layer.rule_used or rowmap.rule
            layer.rowmaps[key] = rowmap
        return rowmap

    def _batch_size(self) -> int | None:
        """Rows of the current batch: the example ids given (training) or the query batch (record_test)."""
        if self._mode == "test":
            return self._test_batch
        return None if self._example is None else self._example.numel()

    def _make_forward_hook(self, layer: _Layer) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            if self._mode == "off" or not torch.is_grad_enabled() or not inputs or not isinstance(output, torch.Tensor):
                return None
            x = inputs[0]
            if not isinstance(x, torch.Tensor):
                raise RecorderError(f"layer {layer.name!r} was called without a tensor as its first argument")
            B = self._batch_size()
            if layer.adapter.rule is None and B is not None and not (self._mode == "train" and layer.name in self._rows):
                try:
                    rowmap = self._rowmap(layer, x, B, test=self._mode == "test")
                except AmbiguousLayout:
                    rowmap = None  # decided in capture()
                if rowmap is not None and rowmap.expand_to is not None:
                    # An input shared by the batch ([1, ...]): run the layer again on it expanded to
                    # [B, ...], so that every example gets its own row, pattern and error signal.
                    # (Done here, not in a pre-hook: a pre-hook on every layer costs every step.)
                    x = layer.adapter.expand(x, rowmap.expand_to)
                    output = module.forward(x, *inputs[1:])
            return self.capture(layer, x, output)

        return hook

    def capture(self, layer: _Layer, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """One call of a recorded layer: its input x (the keys' source) and output. Training:
        keep the keys and hand on an identity node that catches dL/d(output). record_test:
        note the call for the query rows. Adapters that route functional calls (attention) use
        this too. Returns the tensor to hand on."""
        if self._mode == "off" or not torch.is_grad_enabled():
            return output
        adapter = layer.adapter
        if self._mode == "test":
            try:
                rowmap: Any = self._rowmap(layer, x, self._test_batch, test=True)
            except AmbiguousLayout as e:  # training never decided it: the gradients will (queries.py)
                rowmap = e.candidates
            self._test_seen.append((layer.name, x.detach(), output, rowmap))
            # Hand on a copy: an in-place op downstream (ReLU(inplace=True)) would otherwise rewrite
            # `output`'s autograd history, and the query gradient would be w.r.t. the activation.
            return output.clone()
        if not output.requires_grad:
            return output
        if self._example is None:
            raise RecorderError("a recorded layer ran without example ids: wrap the forward pass in `with recorder.batch(example=ids):`")
        candidates, ambiguity = None, ""
        explicit_ids = self._rows.get(layer.name)
        if explicit_ids is not None:
            try:
                rowmap = explicit(layer.name, adapter.lead(x), explicit_ids, adapter.feature)
            except LayoutError as e:
                raise RecorderError(str(e)) from None
            layer.rule_used = layer.rule_used or "explicit"
            ids = explicit_ids
        else:
            ids = self._example
            try:
                rowmap = self._rowmap(layer, x, ids.numel())
            except AmbiguousLayout as e:
                if self.check.current is None:
                    raise RecorderError(f"{e}; or keep check_attribution on (it tells the layouts apart at a "
                                        "checked step where the layer runs)") from None
                # Decided by the attribution check of this step (before the step is applied).
                rowmap, candidates, ambiguity = e.candidates[0], e.candidates, str(e)
        if adapter.autocast and self._compute_dtype is None and torch.is_autocast_enabled(x.device.type):
            self._compute_dtype = str(torch.get_autocast_dtype(x.device.type)).replace("torch.", "")
        keys = adapter.keys(autograd_input(x.detach(), adapter))
        call = _Call(keys, rowmap, ids, adapter.output_rows, self.check)
        call.candidates, call.ambiguity = candidates, ambiguity
        if candidates is not None:
            self._undecided = True
        layer.calls.append(call)
        # Not output.register_hook: with in-place changes through views of the output
        # (embeddings plus positions, reshapes) the tensor hook can miss its gradient.
        wrapped = _CaptureGrad.apply(output, call)
        if self.check.current is not None:
            call.check_out = wrapped
            self.check.note_call(call)
            self._checked_forward = True
        return wrapped

    def _arm_check(self) -> None:
        """Hook the model's own forward only for the steps the attribution check runs at: a
        hook on the root module costs ~0.3 ms per step on small models (PyTorch's slow call
        path), which is most of the recorder's overhead there when paid every step."""
        due = self.check.schedule is not None and self.check.schedule(self.step_count)
        if due and not self._root_handles:
            self._root_handles = [self.model.register_forward_pre_hook(self._root_pre_hook),
                                  self.model.register_forward_hook(self._root_hook)]
        elif not due and self._root_handles:
            for h in self._root_handles:
                h.remove()
            self._root_handles = []
            self.check.current = None

    def _root_pre_hook(self, module: nn.Module, args: tuple) -> None:
        if self._mode == "train" and torch.is_grad_enabled():
            self.check.begin(self.step_count, self._example, args)

    def _root_hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._mode == "train" and torch.is_grad_enabled() and self.check.current is not None:
            return self.check.tap(output)
        return None

    # ------------------------------------------------------------------ optimizer steps
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # PyTorch passes the optimizer itself as args[0].
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RecorderError("optimizer.step(closure) re-evaluates the loss inside the step; call backward() before step() instead")
        records = []
        eager_ties: list = []
        hypers: dict[int, tuple] = {}  # per param group, read once per step
        for layer in self.layers.values():
            hyper = hypers.get(id(layer.group)) or hypers.setdefault(id(layer.group), _hyper(layer.group))
            bgroup = layer.bias_group if layer.bias_group is not None else layer.group
            bias_hyper = hypers.get(id(bgroup)) or hypers.setdefault(id(bgroup), _hyper(bgroup))
            lr, mu, damp, nest, wd, maxim = hyper
            active = layer.params[0].grad is not None
            layer.calls = [c for c in layer.calls if c.grad is not None]  # forwards without backward add nothing
            if self.check.enabled and self._checked_forward:
                failure = self.check.compare(layer.name, layer.calls, _Call.example_ids)
                if failure:
                    raise RecorderError(failure)
            for c in (layer.calls if self._undecided else ()):
                if c.candidates is not None:  # the check could not run on this call: nothing decided it
                    why = next(iter(self.check.skipped), "the loss must use the model's output")
                    raise RecorderError(f"{c.ambiguity}; the attribution check could not tell the layouts apart at "
                                        f"step {self.step_count} ({why})")
                if layer.rule is None and c.rowmap.rule in ("batch-first", "sequence-first") and c.rowmap.batch > 1:
                    layer.rule = c.rowmap.rule  # decided by the check: later calls follow it
                    layer.rule_used = layer.rule_used or c.rowmap.rule
            if active and layer.probe is None:
                layer.probe = make_probe(layer.adapter, layer.params[0])
                if layer.tie is not None and layer.adapter.kind == "embedding":
                    # the tied head's probe, without its bias row: both uses project one gradient
                    head = self._partner(layer)
                    if head.probe is None:
                        head.probe = make_probe(head.adapter, head.params[0])
                    layer.probe = head.probe[:-1].contiguous()
            actual = layer.adapter.project_grad(layer.probe) if active else None
            if active and self.step_count < EAGER_STEPS and not bool(torch.isfinite(actual).all()):
                raise self._non_finite(layer.name)
            record = StepRecord(lr, mu, damp, nest, wd, maxim, active, 1.0, self.rule)
            if self.rule == "adafactor" and active:  # before the step: a refusal leaves the weights as recorded
                eta, decay, factors = adafactor_step(layer.name, self.step_count, layer.adapter, layer.group,
                                                     self.optimizer.state[layer.params[0]], layer.params[0])
                record.lr, record.momentum, record.dampening, record.nesterov, record.weight_decay = eta, 0.0, 0.0, False, decay
                self._pre_factors[layer.name] = factors
            bias_record = None
            if layer.spec.bias:
                if lr == 0.0 and bias_hyper[0] != 0.0 and active:
                    raise RecorderError(f"layer {layer.name!r} step {self.step_count}: the weight's learning rate is 0 while "
                                        "its bias trains; record the layer with its weight trained, or leave it out")
                bias = layer.params[1]
                bias_record = StepRecord(*bias_hyper, active and bias.grad is not None, 1.0, self.rule)
            if active and self.step_count < EAGER_STEPS:
                if layer.tie is None:
                    measure_scales(layer.adapter, layer.probe, [PendingStep(self.step_count, layer.calls, actual)],
                                   reduce=self._reduce)  # raises before the update
                else:  # checked for both uses together, once every layer has been seen (below)
                    eager_ties.append((layer, actual))
            records.append((record, actual, bias_record))
        by_name = {lay.name: (lay, act) for lay, act in eager_ties}
        for lay, act in eager_ties:  # tied weights: the head's gradient is the sum of both uses
            if lay.adapter.kind != "embedding":
                emb, emb_act = by_name[self._partner(lay).name]
                measure_scales(lay.adapter, lay.probe, [PendingStep(self.step_count, lay.calls, act)],
                               partner=(emb.adapter, emb.probe, [PendingStep(self.step_count, emb.calls, emb_act)]),
                               reduce=self._reduce)
        self.check.step_done(self.step_count)
        self._checked_forward = self._undecided = False
        # Appended in the post-hook, once the step has really happened.
        self._pending_records = records
        self._in_step = True

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        flush = False
        for layer, (record, actual, bias_record) in zip(self.layers.values(), self._pending_records):
            layer.steps.append(record)
            if bias_record is not None:
                layer.bias_steps.append(bias_record)
            calls, layer.calls = layer.calls, []
            factors = self._adaptive(layer, record, bias_record) if record.active and self.rule != "sgd" else None
            if record.active:
                layer.pending.append(PendingStep(self.step_count, calls, actual, factors))
                layer.pending_bytes += sum(c.keys.nbytes + c.grad.nbytes for c in calls)
                flush = flush or len(layer.pending) >= CHECK_WINDOW or layer.pending_bytes >= self.writer.chunk_bytes
        self._pending_records = []
        self.step_count += 1
        self._arm_check()
        due = self._due_journal()
        if self.world:  # collective calls follow: every rank decides alike (a signal on one stops all)
            f, d, signum = self.world.max_of(flush, due, self._pending_interrupt)
            flush, due, self._pending_interrupt = bool(f), bool(d), signum  # maybe another rank's signal
        try:
            if flush:
                self._commit_pending()
        finally:
            # Ctrl-C stays deferred through the commit: pending patterns are popped before
            # they reach the spool, and an interrupt in between would lose them.
            self._in_step = False
        if due:
            self._journal()
        if self._pending_interrupt:
            signum, self._pending_interrupt = self._pending_interrupt, 0
            raise Interrupted(signum)

    def _adaptive(self, layer: _Layer, record: StepRecord, bias_record: StepRecord | None) -> Any:
        """An adaptive step's scalars into its StepRecord; returns how its patterns are rescaled."""
        if self.rule == "adafactor":
            return self._pre_factors.pop(layer.name)
        w = layer.params[0]
        eta, beta1, decay, factors = adam_step(layer.adapter, layer.group, self.optimizer.state[w], w.grad)
        record.lr, record.momentum, record.dampening, record.nesterov, record.weight_decay = eta, beta1, 0.0, False, decay
        if bias_record is not None and bias_record.active:
            bgroup = layer.bias_group if layer.bias_group is not None else layer.group
            bias = layer.params[1]
            b_eta, b_beta1, b_decay = adam_scalars(bgroup, self.optimizer.state[bias])
            bias_record.lr, bias_record.momentum, bias_record.dampening, bias_record.weight_decay = b_eta, b_beta1, 0.0, b_decay
            bias_record.precondition = bias_fit(layer.adapter, factors.value, self.optimizer.state[bias], bgroup, bias.grad)
        return factors

    def _commit_pending(self, strict: bool = True) -> None:
        """Check the scales of the applied steps and move their patterns to the spool."""
        first_failure = None
        ties = {lay.name: list(lay.pending) for lay in self.layers.values() if lay.tie is not None}
        for layer in self.layers.values():
            pending, layer.pending, layer.pending_bytes = layer.pending, [], 0
            if not pending:
                continue
            # Failures are kept with the patterns (nothing recorded is dropped) and raised
            # once the patterns are safely spooled; the bundle then says what went wrong.
            failures: list[str] = []
            if layer.tie is not None:
                partner = self._partner(layer)
                # One gradient, two uses: measured once, on the head, for both.
                head, emb = (layer, partner) if layer.adapter.kind != "embedding" else (partner, layer)
                scales = measure_scales(head.adapter, head.probe, ties[head.name], failures,
                                        partner=(emb.adapter, emb.probe, ties[emb.name]), reduce=self._reduce)
                if layer is emb:
                    failures = []  # reported once, with the head
            else:
                scales = measure_scales(layer.adapter, layer.probe, pending, failures, reduce=self._reduce)
            self.check_failures.extend(failures)
            if failures and strict:
                first_failure = first_failure or failures[0]
            for p, sc in zip(pending, scales):
                layer.steps[p.step].scale = float(sc)
                if layer.bias_steps:  # clipping and loss scaling rescale the bias's gradient alike
                    layer.bias_steps[p.step].scale = float(sc)
            calls = [c for p in pending for c in p.calls]
            if not calls:
                continue
            counts = [sum(c.keys.shape[0] for c in p.calls) for p in pending]
            # An adaptive step's rescaling goes into its patterns once the scales are measured
            # (the check compares the raw patterns with .grad).
            pairs = [(c.keys, c.grad) if p.factors is None else p.factors.apply(c.keys, c.grad) for p in pending for c in p.calls]
            keys = torch.cat([k for k, _ in pairs]).cpu()
            grads = torch.cat([g for _, g in pairs]).cpu()
            example = torch.cat([c.example_ids() for c in calls])
            position = torch.cat([c.positions() for c in calls]) if layer.with_position else example
            step = torch.repeat_interleave(torch.tensor([p.step for p in pending]), torch.tensor(counts))
            keep = layer.adapter.keep(keys)
            if keep is not None:
                keys, grads, example, position, step = keys[keep], grads[keep], example[keep], position[keep], step[keep]
            arrays = dict(keys=keys.numpy(), values=grads.numpy(), step=step.numpy(), example=example.numpy())
            if layer.with_position:
                arrays["position"] = position.numpy()
            self.writer.append(layer.name, **arrays)
        if first_failure is not None:
            raise RecorderError(first_failure)

    # ------------------------------------------------------------------ query sets
    def record_test(
        self,
        inputs: Any,
        labels: Any,
        tasks: Any = None,
        *,
        name: str = "test",
        preview: Any = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        read: Any = None,
        focus: Any = None,
        target: Any = "prediction",
        rows: Any = "auto",
        examples: Any = None,
        batch_size: int = 512,
        batch_axis: int | None = None,
    ) -> np.ndarray:
        """Record a query set: run the model once per item (eval mode) and keep, at every layer,
        every input row of every call (the queries) and the gradient of the item's target logit
        with respect to each output row. Returns the predictions.

        inputs: a tensor, a tuple of tensors (model(*inputs)) or a dict (model(**inputs)),
            batched along `batch_axis` (default: the axis with len(labels) entries).
        name: the set's name ("test", "train-subset", "ood", ...); call once per set.
        read: how to read one row of logits per item from the output: "last" (default for a
            sequence output [items, positions, classes]), "first" ([CLS]), a position, "mean",
            or a function of the output. Outputs with `.logits` are unwrapped.
        focus: the position whose attention is ranked at layers with several rows per item
            (default: the read-out position; "mean" for a mean read-out).
        target: "prediction" (default), "label", or class ids: the logit whose gradient is kept.
        rows: "all" (every row; the default unless it exceeds 1 GiB: "auto"), "focus", or a
            list of positions. Effects are exact first-order changes when every row is kept.
        examples: for a set drawn from the training data, the training example of each item.
        """
        preds, _ = record_query_set(self, name, inputs, labels, tasks, preview=preview, forward=forward, read=read,
                                    focus=focus, target=target, rows=rows, examples=examples, batch_size=batch_size,
                                    batch_axis=batch_axis)
        with self._signals_deferred():  # the set reaches the journal whole, or not at all
            for key, array in self.query_tensors[name].items():  # journaled: a crash now keeps the set
                self._save(key, array)
            self._journal()
        return preds

    @contextlib.contextmanager
    def _signals_deferred(self) -> Iterator[None]:
        was, self._in_step = self._in_step, True
        try:
            yield
        finally:
            self._in_step = was
        if not was and self._pending_interrupt and self.world is None:
            signum, self._pending_interrupt = self._pending_interrupt, 0
            raise Interrupted(signum)

    # ------------------------------------------------------------------ the dual form
    def coefficients(self, layer: str) -> tuple[float, np.ndarray]:
        """(a, C): W_T = a·W_0 + Σ_s C[s]·G_s over the steps recorded so far."""
        return coefficients(self.layers[layer].steps)

    def dual(self, layer: str) -> dict[str, np.ndarray]:
        """The whole dual memory of one layer in the recording dtype (loads it all: for tests
        and notebooks on small runs). Keys: w0, b0 (if bias), keys, values, step, example[, position]."""
        self._commit_pending()
        a, C = self.coefficients(layer)
        lay = self.layers[layer]
        chunks = list(self.writer.iter_chunks(layer))
        cat = lambda f, width: np.concatenate([c[f] for c in chunks]) if chunks else np.zeros((0,) + width)  # noqa: E731
        out = {
            "w0": a * lay.w_init.numpy(),
            "keys": cat("keys", () if lay.adapter.feature is None else (lay.spec.in_features,)),
            "step": cat("step", ()).astype(np.int64),
            "example": cat("example", ()).astype(np.int64),
        }
        if lay.with_position:
            out["position"] = cat("position", ()).astype(np.int64)
        raw = cat("values", (lay.spec.out_features,))
        out["values"] = raw * C[out["step"]][:, None] if len(raw) else raw
        if lay.b_init is not None:
            a_b, ratio = self._bias_chain(lay, C)
            out["b0"] = (a if a_b is None else a_b) * lay.b_init.numpy()
            # b_T = b0 + Σ_t bias_values_t (values scaled by the bias's own chain)
            out["bias_values"] = out["values"] * ratio[out["step"]][:, None] if ratio is not None and len(raw) else out["values"]
        return out

    # ------------------------------------------------------------------ finishing
    def _bias_chain(self, lay: _Layer, C: np.ndarray) -> tuple[float | None, np.ndarray | None]:
        """The bias's own coefficient chain (journal.bias_chain)."""
        if not lay.spec.bias:
            return None, None
        return bias_chain(C, lay.bias_steps, lay.name, [])

    def _train_tables(self, with_input: bool = True) -> dict[str, np.ndarray]:
        n = 0
        for t in (self._train_labels, self._train_tasks):
            if t is not None:
                n = max(n, t.numel())
        if self._train_inputs is not None:  # train/input has one row per example: size the tables to match
            n = max(n, len(self._train_inputs))
        for ex, _ in self._labels + self._tasks_of:
            if ex.numel():
                n = max(n, int(ex.max()) + 1)
        n = max(n, self.writer.max_example + 1)  # tracked as patterns are spooled: no pass over the chunks
        for static in self.query_tensors.values():
            for key, a in static.items():
                if key.endswith("/example") and a.size:
                    n = max(n, int(a.max()) + 1)
        labels = np.zeros(n, dtype=np.int64)
        tasks = np.zeros(n, dtype=np.int64)
        if self._train_labels is not None:
            labels[: self._train_labels.numel()] = self._train_labels.numpy()
        if self._train_tasks is not None:
            tasks[: self._train_tasks.numel()] = self._train_tasks.numpy()
        for ex, v in self._labels:  # in order: a later batch's label for an example wins
            labels[ex.numpy()] = v.numpy()
        for ex, v in self._tasks_of:
            tasks[ex.numpy()] = v.numpy()
        out = {"train/label": labels, "train/task": tasks}
        if self._train_inputs is not None and with_input:
            inputs = np.asarray(self._train_inputs.cpu() if isinstance(self._train_inputs, torch.Tensor) else self._train_inputs)
            if len(inputs) < n:
                raise RecorderError(f"train_inputs has {len(inputs)} rows, but example ids reach {n - 1}")
            out["train/input"] = inputs
        return out

    def _optimizer_json(self) -> dict:
        g = self.optimizer.param_groups[0]
        scales = [s.scale for lay in self.layers.values() for s in lay.steps if s.active]
        clipped = any(abs(s - 1.0) > 1e-6 for s in scales)
        if self.rule != "sgd":
            return self._adaptive_json(clipped)
        return {
            "name": "sgd",
            "lr": float(g.get("initial_lr", g["lr"])),  # a scheduler keeps the base rate here
            "lr_final": float(g["lr"]),
            "momentum": float(g.get("momentum", 0)),
            "dampening": float(g.get("dampening", 0)),
            "nesterov": bool(g.get("nesterov", False)),
            "weight_decay": float(g.get("weight_decay", 0)),
            "maximize": bool(g.get("maximize", False)),
            "clip_norm": self.clip_norm,
            "gradient_scaled": clipped,  # some steps' gradients were rescaled (clipping / accumulation)
            "param_groups": len(self.optimizer.param_groups),
            # every group's settings (the keys above are group 0's), and which parameters it holds
            "groups": [self._group_json(g) for g in self.optimizer.param_groups],
        }

    def _adaptive_json(self, clipped: bool) -> dict:
        """Adafactor's or Adam's settings, per group (group 0's at the top, as for SGD)."""
        keys = {"adafactor": ("beta2_decay", "eps", "d", "weight_decay", "maximize"),
                "adam": ("betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay")}[self.rule]

        def plain(v: Any) -> Any:
            if isinstance(v, (tuple, list)):
                return [plain(x) for x in v]
            return v if v is None or isinstance(v, (bool, str)) else float(v)

        def group(g: dict) -> dict:
            names = {id(p): n for n, p in self.model.named_parameters()}
            params = [names.get(id(p), "(not in the model)") for p in g["params"]]
            return {"lr": float(g.get("initial_lr", g["lr"])), "lr_final": float(g["lr"]),
                    **{k: plain(g.get(k)) for k in keys}, "parameters": len(params),
                    "names": params if len(params) <= 64 else params[:64] + [f"… {len(params) - 64} more"]}

        groups = [group(g) for g in self.optimizer.param_groups]
        name = self.rule if self.rule != "adam" else ("adamw" if self.optimizer.param_groups[0].get("decoupled_weight_decay") else "adam")
        return {"name": name, **{k: v for k, v in groups[0].items() if k not in ("parameters", "names")},
                "clip_norm": self.clip_norm, "gradient_scaled": clipped,
                "param_groups": len(groups), "groups": groups}

    def _group_json(self, g: dict) -> dict:
        names = {id(p): n for n, p in self.model.named_parameters()}
        out = {k: (bool(g.get(k, False)) if k in ("nesterov", "maximize") else float(g.get(k, 0))) for k in _HYPER}
        out["lr"] = float(g.get("initial_lr", g["lr"]))
        out["lr_final"] = float(g["lr"])
        params = [names.get(id(p), "(not in the model)") for p in g["params"]]
        out["parameters"] = len(params)
        out["names"] = params if len(params) <= 64 else params[:64] + [f"… {len(params) - 64} more"]
        return out

    # ------------------------------------------------------------------ the journal
    def _save(self, key: str, array: np.ndarray, changing: bool = False) -> None:
        self._arrays[key] = self.writer.save_array(key, array, changing=changing)
        self._live[key] = array

    def _save_once(self) -> None:
        """What never changes: the initial weights (in the bundle's layout) and the previews."""
        for lay in self.layers.values():  # float64 whatever the storage: compose() folds the coefficient in first
            self._save(f"init/{lay.name}/w", lay.w_init.double().numpy())
            if lay.b_init is not None:
                self._save(f"init/{lay.name}/b", lay.b_init.double().numpy())
        if self._train_inputs is not None:
            x = self._train_inputs
            self._save("train/input", np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x))

    def _due_journal(self) -> bool:
        return (self.step_count - self._journaled_step >= self.journal_every
                or time.monotonic() - self._last_journal >= self.journal_seconds)

    def _journal(self, tag: str | None = None) -> dict:
        """Bring the journal up to date: commit the applied steps, save the current weights and
        tables, and rename journal.json into place (writer.write_journal). A signal waits
        until it is done: the commit moves patterns from memory to the spool, and stopping
        half-way would lose a layer's share of them. Returns the state it journaled."""
        with self._signals_deferred():
            return self._journal_now(tag)

    def _journal_now(self, tag: str | None) -> dict:
        failure = None
        try:
            self._commit_pending()
        except RecorderError as e:  # the patterns are spooled; journal them, then stop as before
            failure = e
        for lay in self.layers.values():
            self._save(f"now/{lay.name}/w", lay.adapter.weight().detach().cpu().double().numpy(), changing=True)
            if lay.spec.bias:
                self._save(f"now/{lay.name}/b", lay.adapter.bias().detach().cpu().double().numpy(), changing=True)
        tables = self._train_tables(with_input=False)
        for key in ("train/label", "train/task"):
            self._save(key, tables[key], changing=True)
            if tag is not None:  # a checkpoint's own copy, for resume (the plain one keeps moving)
                self._save(f"{key}@{tag}", tables[key])
        self.writer.flush_all()  # first: the state names the chunks as they are on disk
        state = self._journal_state()
        self.writer.write_journal(state, dict(self._arrays))
        self._journaled_step = self.step_count
        self._last_journal = time.monotonic()
        if failure is not None:
            raise failure
        return state

    def _journal_state(self) -> dict:
        return {
            "step": self.step_count,
            "layer_order": list(self.layers),
            "layers": {lay.name: {"steps": steps_json(lay.steps), "bias_steps": steps_json(lay.bias_steps),
                                  "rule": lay.rule, "rule_used": lay.rule_used, "tie": lay.tie,
                                  "spec_extra": self._spec_extra(lay)}
                       for lay in self.layers.values()},
            "storage_dtype": self.storage_dtype, "tasks": self.tasks, "classes": self.classes, "input": self.input,
            "training": self.training, "extra": self.extra, "optimizer": self._optimizer_json(),
            "attribution": self.check.to_json(list(self.layers)), "check": state_of_check(self.check),
            "check_failures": list(self.check_failures), "compute_dtype": self._compute_dtype,
            "skipped_steps": self.skipped_steps, "interrupted": self.interrupted, "not_covered": self._not_covered(),
            "query_sets": [q.to_json() for q in self.query_set_specs.values()],
            "query_arrays": {name: sorted(t) for name, t in self.query_tensors.items()},
            "chunks": self.writer.chunk_counts(),
            **({"dual_form": self._dual_form()} if self.rule != "sgd" else {}),
        }

    def _dual_form(self) -> dict:
        if self.rule == "adafactor":
            return {"exact": True, "method": "adafactor",
                    "keys": "layer inputs rescaled by the column factor of their step's second-moment estimate"}
        return {"exact": False, "method": "adam-rank1",
                "approximation": "each step's preconditioner 1/(sqrt(v_hat)+eps) replaced by its best rank-1 "
                                 "approximation and kept for the gradient's momentum tail"}

    def _spec_extra(self, lay: _Layer) -> dict:
        extra = {}
        if lay.tie is not None:
            extra["tied"] = lay.tie  # the shared parameter: verify sums both uses
        if lay.rule_used:
            extra["rows"] = lay.rule_used
        return extra

    def state_dict(self) -> dict:
        """The recording's state at this step, to save beside the model's and the optimizer's
        checkpoint (it is small: the spool holds the patterns). A job restarted from that
        checkpoint continues the same recording with `Recorder(..., resume=state)`; the final
        bundle equals the uninterrupted run's when the data order is the same."""
        state = self._journal(tag=str(self.step_count))
        self._checkpointed, self._checkpointed_step = True, self.step_count
        return {"format": "dualtui.recorder-state", "version": 1, "spool": str(self.writer.spool),
                "output": str(self.writer.path), "step": self.step_count, "state": state, "arrays": dict(self._arrays)}

    def _check_resume(self, resume: dict, path: str | Path) -> dict:
        if not isinstance(resume, dict) or resume.get("format") != "dualtui.recorder-state":
            raise RecorderError("resume= takes the dict rec.state_dict() returned")
        spool = Path(resume["spool"])
        if not (spool / "journal.json").exists():
            raise RecorderError(f"resume: the recording's spool {spool} is gone (it holds the patterns recorded "
                                f"before step {resume['step']})")
        if Path(resume["output"]).resolve() != BundleWriter.output_of(path).resolve():
            raise RecorderError(f"resume: that state belongs to a recording to {resume['output']}, not {path}")
        return resume

    def _restore(self, resume: dict) -> None:
        """Continue a recording from its state_dict: steps, layouts, tables and the check's
        progress as they were at the checkpoint, and its chunks (later ones are dropped)."""
        state, arrays = resume["state"], resume["arrays"]
        journal = BundleWriter.read_journal(self.writer.spool)
        self.writer.adopt(journal, chunks_upto=state["chunks"])
        if list(self.layers) != state["layer_order"]:
            raise RecorderError("resume: the recorded layers differ from the checkpoint's: "
                                f"{', '.join(state['layer_order'])}")
        self.step_count = state["step"]
        self._journaled_step = self.step_count
        self._checkpointed, self._checkpointed_step = True, self.step_count  # a later resume may use it again
        for lay in self.layers.values():
            st = state["layers"][lay.name]
            lay.steps, lay.bias_steps = steps_from_json(st["steps"]), steps_from_json(st["bias_steps"])
            lay.rule, lay.rule_used, lay.tie = st["rule"], st["rule_used"], st["tie"]
            lay.spec = self.writer.layers[lay.name].spec
        for key, file in arrays.items():  # what never changes, loaded once
            if key.startswith("init/") or key == "train/input" or key.startswith("queries/"):
                self._arrays[key] = file
                self._live[key] = self.writer.load_array(file)
        for lay in self.layers.values():
            lay.w_init = torch.from_numpy(self._live[f"init/{lay.name}/w"])
            if lay.spec.bias:
                lay.b_init = torch.from_numpy(self._live[f"init/{lay.name}/b"])
        tag = str(state["step"])
        self._train_labels = torch.from_numpy(self.writer.load_array(arrays[f"train/label@{tag}"]))
        self._train_tasks = torch.from_numpy(self.writer.load_array(arrays[f"train/task@{tag}"]))
        restore_check(self.check, state["check"])
        self.check_failures = list(state["check_failures"])
        self._compute_dtype = state["compute_dtype"]
        self.skipped_steps = state["skipped_steps"]
        self.training = state["training"]
        for q in state["query_sets"]:
            spec = QuerySetSpec(**{k: v for k, v in q.items() if k != "extra"})
            self.query_set_specs[spec.name] = spec
            self.query_tensors[spec.name] = {k: self._live[k] for k in state["query_arrays"][spec.name]}

    # ------------------------------------------------------------------ finishing
    def close(self) -> Path | None:
        """Write the bundle (atomically) and detach every hook. Returns the path to open. A
        recording that stopped early never replaces a bundle already at the path: it is
        written to NAME.partial.safetensors then (see `path_written`)."""
        if self.closed:
            return None
        self.closed = True
        self._finalizing = True  # a second Ctrl-C (or SIGTERM) now waits until the bundle is written
        try:
            self._detach(signals=False)
            try:
                return self._finish()
            except OutputError as e:  # disk full: the spool is cut back to its last journal
                left = self.writer.abandon()
                raise OutputError(f"{e}; {left}") from None
        finally:
            self._finalizing = False
            self._detach_signals()

    def _finish(self) -> Path:
        """close(): the last journal, then the bundle composed from it."""
        if self.writer.failed:  # a write already failed while training: nothing more is tried
            raise OutputError(self.writer.failed)
        try:
            state = self._journal()
        except RecorderError as e:  # a late gradient-scale failure: kept in the bundle, said there
            if str(e) not in self.check_failures:
                self.check_failures.append(str(e))
            state = self._journal_state()
            self.writer.write_journal(state, dict(self._arrays))
        partial = self.interrupted is not None
        # An interrupted run whose checkpoint named the spool (state_dict) keeps it: the job
        # restarted from that checkpoint continues the recording (resume=).
        keep = partial and self._checkpointed
        if self.world:  # rank 0 composes the bundle from every rank's journal
            self.path_written = self._finish_merged(partial, keep)
        else:
            manifest, static, transform = compose(state, [lay.spec for lay in self.layers.values()], self._live.get,
                                                  self.writer.iter_chunks)
            self.path_written = self.writer.finalize(manifest, static, transform, partial=partial, keep_spool=keep)
        if keep:
            print(f"dualtui: kept the recording's spool {self.writer.spool} for a resume from the checkpoint "
                  f"at step {self._checkpointed_step} (Recorder(..., resume=state))", file=sys.stderr)
        # a signal that came while the bundle was written: the caller still ends the process
        self.late_signal = self._pending_interrupt or None
        return self.path_written

    def _finish_merged(self, partial: bool, keep: bool) -> Path:
        """Data-parallel: every rank's journal is complete; rank 0 merges them into one bundle
        (journal.write_merged), the others wait for it, then each rank's spool goes (or stays,
        for a resume)."""
        world = self.world
        world.barrier()  # every rank's last journal is on disk
        result: tuple = (None, None)
        if world.rank == 0:
            try:
                spools = rank_spools(self.writer.spool)
                written, _ = write_merged(spools, self.writer.path, partial=partial,
                                          max_shard_bytes=self.writer.max_shard_bytes)
                result = (str(written), None)
            except (OutputError, RecorderError) as e:
                result = (None, str(e))
        written, error = world.broadcast(result)
        if error is not None:
            self.writer.release()
            raise OutputError(error) if world.rank == 0 else OutputError(f"rank 0 could not write the bundle: {error}")
        if keep:
            self.writer.release()
        else:
            self.writer.discard()
        return Path(written)

    def _not_covered(self) -> list[str]:
        """Trained parameters outside the recorded layers (e.g. an LSTM's gates): the dual form
        says nothing about them, and `dualtui info` says so. A parameter recorded in parts (the
        packed projections of attention) counts as covered when its parts cover every row."""
        rows: dict[int, list] = {}
        for lay in self.layers.values():
            for j, p in enumerate(lay.params):
                r = lay.adapter.param_rows(j)
                rows.setdefault(id(p), []).append((0, p.shape[0]) if r is None or p.dim() == 0 else (r.start, r.stop))
        trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        out = []
        for n, p in self.model.named_parameters():
            if id(p) not in trained:
                continue
            have = sorted(rows.get(id(p), []))
            covered, upto = bool(have), 0
            for lo, hi in have:
                if lo > upto:
                    covered = False
                upto = max(upto, hi)
            if not covered or (p.dim() and upto < p.shape[0]):
                out.append(n)
        return out

    def _not_covered_line(self, names: list[str]) -> str:
        """One line for the start of a recording: what is not covered, and why where known."""
        modules = dict(self.model.named_modules())
        reasons: list[str] = []
        for n in names:
            owner = n.rsplit(".", 1)[0] if "." in n else ""
            why = self._unrecordable.get(owner) or unsupported_reason(owner, modules.get(owner))
            if why and why not in reasons:
                reasons.append(why)
        shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
        return f"dualtui: not covered by the dual form: {shown}" + ("; " + "; ".join(reasons) if reasons else "")

    def _detach(self, signals: bool = True) -> None:
        for layer in self.layers.values():
            for h in layer.handles:
                h.remove()
            layer.handles = []
            layer.calls = []
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        self._pre.remove()
        self._post.remove()
        for owner in self._zero_grad_owners:
            owner.__dict__.pop("zero_grad", None)
        self._zero_grad_owners = []
        if signals:
            self._detach_signals()

    def _detach_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):
                pass
        self._old_handlers = {}

    def abort(self) -> None:
        """Detach and throw away everything recorded (nothing is written)."""
        if not self.closed:
            self.closed = True
            self._detach()
            self.writer.discard()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None and not self.closed:
            if issubclass(exc_type, RecorderError) and self.step_count == 0 and not self._resume:
                # Refused before any step: nothing was recorded, so nothing is written (an earlier
                # bundle at the same path stays as it was).
                self.abort()
                return
            # Keep what was recorded: the bundle holds every completed optimizer step.
            self.interrupted = interruption(exc)
        self.close()
        if exc_type is None and self._pending_interrupt:  # a signal that came while the bundle was written
            signum, self._pending_interrupt = self._pending_interrupt, 0
            raise Interrupted(signum)
