"""`Recorder`: hooks a PyTorch model and its SGD optimizer and writes an exact dual-form bundle.

Usage, in the user's own training loop:

    with Recorder(model, optimizer, "run.safetensors", tasks=[...], classes=[...]) as rec:
        for x, y, idx, task in loader:
            with rec.batch(example=idx, label=y, task=task):
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        rec.record_test(x_test, y_test, tasks=t_test)
    # leaving the block writes the bundle; an exception or Ctrl-C writes the steps completed so far
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..bundle.manifest import LayerSpec, Manifest
from ..bundle.writer import STORAGE_DTYPES, BundleWriter
from .coefficients import StepRecord, sgd_coefficients

REFUSED_OPTIMIZERS = "Adam, AdamW, RMSprop, Adagrad and other per-coordinate optimizers"


class RecorderError(Exception):
    """The model, optimizer or training loop cannot be recorded exactly (one-line message)."""


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
    example: torch.Tensor  # [b] example ids of the batch (CPU)
    per: int  # patterns per example: n == b * per, batch-major
    out_features: int
    grad: torch.Tensor | None = None

    def add_grad(self, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, self.out_features)
        self.grad = g if self.grad is None else self.grad + g


@dataclass
class _Layer:
    name: str
    module: nn.Module
    kind: str
    spec: LayerSpec
    w_init: torch.Tensor  # W_0 (CPU copy, model dtype)
    b_init: torch.Tensor | None
    group: dict = field(default_factory=dict)  # the optimizer param group of weight (and bias)
    bias_group: dict | None = None  # the bias's group when it is a different one
    calls: list[_Call] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)  # one per optimizer step, by step index
    pending: list["_PendingStep"] = field(default_factory=list)  # applied steps not yet spooled
    pending_bytes: int = 0
    probe: torch.Tensor | None = None  # fixed random directions for the gradient-scale check
    probe_w: torch.Tensor | None = None  # its weight rows and bias row, contiguous
    probe_b: torch.Tensor | None = None
    handle: Any = None

    @property
    def params(self) -> list[torch.Tensor]:
        ps = [self.module.weight]
        if self.kind == "linear" and self.module.bias is not None:
            ps.append(self.module.bias)
        return ps


@dataclass
class _PendingStep:
    step: int
    calls: list[_Call]
    actual: torch.Tensor  # the parameter gradient projected on the layer's probe (on device)


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict | None:
    for group in optimizer.param_groups:
        if any(q is p for q in group["params"]):
            return group
    return None


_HYPER = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


def _hyper(group: dict) -> tuple:
    return tuple(float(group.get(k, 0)) if k not in ("nesterov", "maximize") else bool(group.get(k, False)) for k in _HYPER)


class Recorder:
    """Record the dual form of a model's `nn.Linear` / `nn.Embedding` layers during SGD training.

    layers: module names to record (default: every Linear and Embedding).
    storage_dtype: "float32" (default), "float16" or "bfloat16" for stored keys and values.
    tasks / classes: names; task and class ids index into them.
    clip_norm: the max norm you pass to clip_grad_norm_, for the manifest only (the factor
        each step actually applied is measured from the gradients, so any clipping by global
        norm, loss scaling or accumulation is exact without telling the recorder).
    input: the manifest's input description, e.g. {"kind": "image", "shape": [8, 8]}.
    train_inputs / train_labels / train_tasks: per training example (index = example id);
        labels and tasks may instead come from `batch(label=..., task=...)`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        path: str | Path,
        *,
        layers: Sequence[str] | None = None,
        storage_dtype: str = "float32",
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
    ):
        if not isinstance(optimizer, torch.optim.SGD):
            raise RecorderError(
                f"{type(optimizer).__name__} cannot be recorded exactly: dualtui supports torch.optim.SGD "
                f"(schedules, momentum, dampening, Nesterov, weight decay, clipping, accumulation); "
                f"{REFUSED_OPTIMIZERS} rescale each weight coordinate separately, so an update is no longer "
                f"an outer product of a key and a value"
            )
        if storage_dtype not in STORAGE_DTYPES:
            raise RecorderError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, not {storage_dtype!r}")
        self.model = model
        self.optimizer = optimizer
        self.tasks = list(tasks) if tasks is not None else None
        self.classes = list(classes) if classes is not None else None
        self.input = dict(input) if input is not None else {"kind": "vector"}
        self.extra = dict(extra or {})
        self.training = dict(training or {})
        self.clip_norm = clip_norm  # informational: the actual clipping factor is measured per step
        self._pending_records: list = []
        self.check_failures: list[str] = []
        self.positions = self.input.get("kind") == "text"
        self.storage_dtype = storage_dtype
        self.step_count = 0
        self.closed = False
        self.interrupted: str | None = None
        self._example: torch.Tensor | None = None
        self._auto_example = 0
        self._labels: list[tuple[torch.Tensor, torch.Tensor]] = []  # (example ids, labels) per batch
        self._tasks_of: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._train_inputs = train_inputs
        self._train_labels = None if train_labels is None else torch.as_tensor(train_labels).long().cpu()
        self._train_tasks = None if train_tasks is None else torch.as_tensor(train_tasks).long().cpu()
        self._test: dict[str, np.ndarray] = {}
        self._queries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._in_step = False
        self._pending_interrupt = False
        self._recording = True

        self.layers = self._select_layers(layers)
        self.writer = BundleWriter(path, storage_dtype=storage_dtype, chunk_bytes=chunk_bytes, max_shard_bytes=max_shard_bytes)
        for layer in self.layers.values():
            self.writer.add_layer(layer.spec, with_position=self.positions)
            layer.handle = layer.module.register_forward_hook(self._make_forward_hook(layer))
        self._pre = optimizer.register_step_pre_hook(self._before_step)
        self._post = optimizer.register_step_post_hook(self._after_step)
        self._old_sigint = None
        if threading.current_thread() is threading.main_thread():
            # Ctrl-C inside optimizer.step() would leave weights half-updated; defer it to after the step.
            self._old_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    # ------------------------------------------------------------------ set-up
    def _select_layers(self, names: Sequence[str] | None) -> dict[str, _Layer]:
        candidates = {n: m for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
        if names is None:
            chosen = list(candidates)
        else:
            unknown = [n for n in names if n not in candidates]
            if unknown:
                raise RecorderError(f"unknown layer {unknown[0]!r}; recordable layers: {', '.join(candidates) or '(none)'}")
            chosen = list(names)
        if not chosen:
            raise RecorderError("the model has no nn.Linear or nn.Embedding layer to record")
        seen: dict[int, str] = {}
        out: dict[str, _Layer] = {}
        for name in chosen:
            m = candidates[name]
            kind = "embedding" if isinstance(m, nn.Embedding) else "linear"
            if kind == "embedding":
                if m.sparse:
                    raise RecorderError(f"layer {name!r}: sparse embeddings are not supported (use sparse=False)")
                if m.scale_grad_by_freq:
                    raise RecorderError(f"layer {name!r}: scale_grad_by_freq rescales each row's gradient by its token count, which breaks the dual form")
                if m.max_norm is not None:
                    raise RecorderError(f"layer {name!r}: max_norm renormalises weights in the forward pass, which breaks the dual form")
            params = [m.weight] + ([m.bias] if kind == "linear" and m.bias is not None else [])
            groups = []
            for p in params:
                if id(p) in seen:
                    raise RecorderError(f"layer {name!r} shares a parameter with {seen[id(p)]!r} (tied weights are not supported)")
                seen[id(p)] = name
                g = _group_of(self.optimizer, p)
                if g is None:
                    raise RecorderError(f"layer {name!r} has a parameter the optimizer does not train; leave it out with layers=[...]")
                if self.optimizer.state.get(p):
                    raise RecorderError(f"layer {name!r}: the optimizer already has state (momentum); attach the Recorder before the first step")
                groups.append(g)
            if len(groups) == 2 and _hyper(groups[0]) != _hyper(groups[1]):
                raise RecorderError(
                    f"layer {name!r}: weight and bias use different optimizer settings; the dual form needs one value per pattern"
                )
            if kind == "linear":
                spec = LayerSpec(name, kind, m.in_features, m.out_features, m.bias is not None, 0, 1)
            else:
                spec = LayerSpec(name, kind, m.num_embeddings, m.embedding_dim, False, 0, 1)
            w0 = m.weight.detach().to("cpu", copy=True)
            b0 = m.bias.detach().to("cpu", copy=True) if spec.bias else None
            bias_group = groups[1] if len(groups) == 2 and groups[1] is not groups[0] else None
            out[name] = _Layer(name, m, kind, spec, w0, b0, group=groups[0], bias_group=bias_group)
        return out

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self._in_step:
            self._pending_interrupt = True
            return
        raise KeyboardInterrupt

    # ------------------------------------------------------------------ batches
    @contextlib.contextmanager
    def batch(self, example: Any, label: Any = None, task: Any = None):
        """Declare the training examples of the next forward pass(es) (ids index train/*)."""
        ex = torch.as_tensor(example).long().reshape(-1).cpu()
        if ex.numel() and int(ex.min()) < 0:
            raise RecorderError("example ids must be non-negative")
        for ids, store, what in ((label, self._labels, "label"), (task, self._tasks_of, "task")):
            if ids is None:
                continue
            t = torch.as_tensor(ids).long().reshape(-1).cpu()
            if t.numel() == 1 and ex.numel() > 1:
                t = t.expand(ex.numel())
            if t.numel() != ex.numel():
                raise RecorderError(f"batch(): {t.numel()} {what}s for {ex.numel()} examples")
            store.append((ex, t))  # scattered into train/label, train/task at close
        previous = self._example
        self._example = ex
        try:
            yield self
        finally:
            self._example = previous

    def _examples_for(self, rows: int, layer: str) -> tuple[torch.Tensor, int]:
        ex = self._example
        if ex is None:
            raise RecorderError("a recorded layer ran without example ids: wrap the forward pass in `with recorder.batch(example=ids):`")
        b = ex.numel()
        if b == 0 or rows % b:
            raise RecorderError(f"layer {layer!r} saw {rows} input rows, which do not split evenly over {b} examples of the batch")
        return ex, rows // b

    def _make_forward_hook(self, layer: _Layer) -> Callable:
        out_features = layer.spec.out_features

        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor):
            if not self._recording or not torch.is_grad_enabled() or not output.requires_grad:
                return None
            x = inputs[0].detach()
            if layer.kind == "embedding":
                keys = x.reshape(-1)
            else:
                keys = x.reshape(-1, x.shape[-1])
            example, per = self._examples_for(keys.shape[0], layer.name)
            call = _Call(keys, example, per, out_features)
            layer.calls.append(call)
            # Not output.register_hook: with in-place changes through views of the output
            # (embeddings plus positions, reshapes) the tensor hook can miss its gradient.
            return _CaptureGrad.apply(output, call)

        return hook

    # ------------------------------------------------------------------ optimizer steps
    def _before_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        # PyTorch passes the optimizer itself as args[0].
        if any(a is not None for a in args[1:]) or kwargs.get("closure") is not None:
            raise RecorderError("optimizer.step(closure) re-evaluates the loss inside the step; call backward() before step() instead")
        records = []
        hypers: dict[int, tuple] = {}  # per param group, read once per step
        for layer in self.layers.values():
            hyper = hypers.get(id(layer.group)) or hypers.setdefault(id(layer.group), _hyper(layer.group))
            if layer.bias_group is not None and _hyper(layer.bias_group) != hyper:
                raise RecorderError(
                    f"layer {layer.name!r} step {self.step_count}: weight and bias use different optimizer settings "
                    "(e.g. a scheduler drove their groups apart); the dual form needs one value per pattern"
                )
            lr, mu, damp, nest, wd, maxim = hyper
            active = layer.module.weight.grad is not None
            layer.calls = [c for c in layer.calls if c.grad is not None]  # forwards without backward add nothing
            actual = self._project_grad(layer) if active else None
            record = StepRecord(lr, mu, damp, nest, wd, maxim, active, 1.0)
            if active and self.step_count < EAGER_STEPS:
                self._scales(layer, [_PendingStep(self.step_count, layer.calls, actual)])  # raises before the update
            records.append((record, actual))
        # Appended in the post-hook, once the step has really happened.
        self._pending_records = records
        self._in_step = True

    def _project_grad(self, layer: _Layer) -> torch.Tensor:
        """.grad of the layer projected on two fixed random directions (no device sync)."""
        w = layer.module.weight
        if layer.probe is None:
            gen = torch.Generator(device="cpu").manual_seed(1234)
            rows = layer.spec.out_features if layer.kind == "embedding" else layer.spec.in_features + 1
            layer.probe = torch.randn(rows, 2, generator=gen, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
            layer.probe_w = layer.probe[:-1].contiguous()
            layer.probe_b = layer.probe[-1].contiguous()
        if layer.kind == "embedding":
            return w.grad @ layer.probe  # [vocab, 2]
        actual = w.grad @ layer.probe_w  # [out, 2]
        bias = layer.module.bias
        if layer.spec.bias and bias.grad is not None:
            actual.addr_(bias.grad, layer.probe_b)
        return actual

    def _scales(self, layer: _Layer, pending: list[_PendingStep], failures: list[str] | None = None) -> np.ndarray:
        """How each step's .grad relates to its recorded patterns: grad = scale·Σ g kᵀ.

        Clipping by global norm, loss scaling and accumulation multiply a whole gradient by
        one number; we read it off the random projections and refuse anything that is not
        such a multiple (per-coordinate clipping, gradients from unrecorded uses of a layer):
        raised at once, or appended to `failures` (keeping the least-squares scale) if given.
        """
        w = layer.module.weight
        probe = layer.probe.to(torch.float64)
        S = len(pending)
        counts = [sum(c.keys.shape[0] for c in p.calls) for p in pending]
        calls = [c for p in pending for c in p.calls]
        rows = layer.spec.in_features if layer.kind == "embedding" else layer.spec.out_features
        recorded = torch.zeros(S * rows, 2, dtype=torch.float64, device=w.device)
        # The same sums over |terms|: rounding in the sums that built .grad is relative to the
        # size of the summed terms, not of the result (contributions can cancel).
        magnitude = torch.zeros(S * rows, 2, dtype=torch.float64, device=w.device)
        if calls:
            keys = torch.cat([c.keys for c in calls])
            grads = torch.cat([c.grad for c in calls]).to(torch.float64)
            seg = torch.repeat_interleave(torch.arange(S, device=w.device), torch.tensor(counts, device=w.device))
            if layer.kind == "embedding":
                gp = grads @ probe  # [n, 2]
                gp_abs = grads.abs() @ probe.abs()
                if layer.module.padding_idx is not None:
                    keep = (keys != layer.module.padding_idx)[:, None]  # PyTorch gives padding no gradient
                    gp, gp_abs = gp * keep, gp_abs * keep
                recorded.index_add_(0, seg * rows + keys, gp)
                magnitude.index_add_(0, seg * rows + keys, gp_abs)
            else:
                k64 = keys.to(torch.float64)
                proj = k64 @ probe[:-1]  # [n, 2]
                proj_abs = k64.abs() @ probe[:-1].abs()
                if layer.spec.bias:
                    proj = proj + probe[-1]
                    proj_abs = proj_abs + probe[-1].abs()
                recorded = recorded.view(S, rows, 2)
                magnitude = magnitude.view(S, rows, 2)
                zeros = lambda: torch.zeros(S, rows, dtype=torch.float64, device=w.device)  # noqa: E731
                for j in range(2):
                    recorded[:, :, j] = zeros().index_add_(0, seg, grads * proj[:, j : j + 1])
                    magnitude[:, :, j] = zeros().index_add_(0, seg, grads.abs() * proj_abs[:, j : j + 1])
        recorded = recorded.view(S, rows, 2)
        magnitude = magnitude.view(S, rows, 2)
        actual = torch.stack([p.actual for p in pending]).to(torch.float64).view(S, rows, 2)
        aa = (actual * actual).sum((1, 2))
        ar = (actual * recorded).sum((1, 2))
        rr = (recorded * recorded).sum((1, 2))
        scale = torch.where(rr > 0, ar / torch.where(rr > 0, rr, 1.0), torch.ones_like(rr))
        residual = torch.linalg.vector_norm(actual - scale[:, None, None] * recorded, dim=(1, 2))
        mag = torch.linalg.vector_norm(magnitude, dim=(1, 2))
        scale, residual, aa, rr, mag = (t.cpu().numpy() for t in (scale, residual, aa, rr, mag))
        eps = torch.finfo(w.dtype).eps
        for i, p in enumerate(pending):
            problem = None
            if rr[i] == 0.0 and aa[i] ** 0.5 > 1e3 * eps * mag[i]:
                problem = (f"layer {layer.name!r} has a gradient at step {p.step} but no recorded forward pass produced it "
                           "(was it run under a different module, or outside `recorder.batch`?)")
            elif residual[i] > 1e3 * eps * max(aa[i] ** 0.5, abs(scale[i]) * mag[i]) + 1e-300:
                problem = (f"layer {layer.name!r} step {p.step}: the gradient is not a scalar multiple of the recorded "
                           f"patterns (relative residual {residual[i] / aa[i] ** 0.5:.1e}); per-coordinate gradient changes "
                           "(clip_grad_value_, masking) or gradients from unrecorded uses of the layer break the dual form")
            if problem is not None:
                if failures is None:
                    raise RecorderError(problem)
                failures.append(problem)
        # Within rounding of 1 means unscaled: say so exactly rather than carry the noise.
        scale[np.abs(scale - 1.0) <= 100 * eps] = 1.0
        return scale

    def _after_step(self, optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        flush = False
        for layer, (record, actual) in zip(self.layers.values(), self._pending_records):
            layer.steps.append(record)
            calls, layer.calls = layer.calls, []
            if record.active:
                layer.pending.append(_PendingStep(self.step_count, calls, actual))
                layer.pending_bytes += sum(c.keys.nbytes + c.grad.nbytes for c in calls)
                flush = flush or len(layer.pending) >= CHECK_WINDOW or layer.pending_bytes >= self.writer.chunk_bytes
        self._pending_records = []
        self.step_count += 1
        try:
            if flush:
                self._commit_pending()
        finally:
            # Ctrl-C stays deferred through the commit: pending patterns are popped before
            # they reach the spool, and an interrupt in between would lose them.
            self._in_step = False
        if self._pending_interrupt:
            self._pending_interrupt = False
            raise KeyboardInterrupt

    def _commit_pending(self, strict: bool = True) -> None:
        """Check the scales of the applied steps and move their patterns to the spool."""
        first_failure = None
        for layer in self.layers.values():
            pending, layer.pending, layer.pending_bytes = layer.pending, [], 0
            if not pending:
                continue
            # Failures are kept with the patterns (nothing recorded is dropped) and raised
            # once the patterns are safely spooled; the bundle then says what went wrong.
            failures: list[str] = []
            scales = self._scales(layer, pending, failures)
            self.check_failures.extend(failures)
            if failures and strict:
                first_failure = first_failure or failures[0]
            for p, sc in zip(pending, scales):
                layer.steps[p.step] = dataclasses.replace(layer.steps[p.step], scale=float(sc))
            calls = [c for p in pending for c in p.calls]
            if not calls:
                continue
            counts = [sum(c.keys.shape[0] for c in p.calls) for p in pending]
            keys = torch.cat([c.keys for c in calls]).cpu()
            grads = torch.cat([c.grad for c in calls]).cpu()
            if all(c.per == 1 for c in calls):  # the common case: one pattern per example
                example = torch.cat([c.example for c in calls])
            else:
                example = torch.cat([c.example.repeat_interleave(c.per) for c in calls])
            position = torch.cat([torch.arange(c.per).repeat(c.example.numel()) for c in calls]) if self.positions else example
            step = torch.repeat_interleave(torch.tensor([p.step for p in pending]), torch.tensor(counts))
            if layer.kind == "embedding" and layer.module.padding_idx is not None:
                keep = keys != layer.module.padding_idx  # PyTorch gives the padding row no gradient
                keys, grads, example, position, step = keys[keep], grads[keep], example[keep], position[keep], step[keep]
            arrays = dict(keys=keys.numpy(), values=grads.numpy(), step=step.numpy(), example=example.numpy())
            if self.positions:
                arrays["position"] = position.numpy()
            self.writer.append(layer.name, **arrays)
        if first_failure is not None:
            raise RecorderError(first_failure)

    # ------------------------------------------------------------------ test set
    def record_test(
        self,
        inputs: Any,
        labels: Any,
        tasks: Any = None,
        *,
        preview: Any = None,
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        batch_size: int = 512,
    ) -> np.ndarray:
        """Run the test set once: record each layer's query (its input), the gradient of the
        predicted-class logit w.r.t. its output, and the predictions. Sequence outputs
        [B, L, C] use the last position. Returns the predictions."""
        inputs = torch.as_tensor(inputs) if not isinstance(inputs, torch.Tensor) else inputs
        labels = torch.as_tensor(labels).long().reshape(-1).cpu()
        m = labels.numel()
        tasks_t = torch.zeros(m, dtype=torch.long) if tasks is None else torch.as_tensor(tasks).long().reshape(-1).cpu()
        device = next(self.model.parameters()).device
        forward = forward or (lambda model, x: model(x))
        queries: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        qgrads: dict[str, list[torch.Tensor]] = {n: [] for n in self.layers}
        preds = []
        was_training = self.model.training
        self._recording = False
        self.model.eval()
        try:
            for lo in range(0, m, batch_size):
                x = inputs[lo : lo + batch_size].to(device)
                seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

                def make(name: str) -> Callable:
                    def hook(module: nn.Module, ins: tuple, out: torch.Tensor) -> torch.Tensor:
                        seen[name] = (ins[0].detach(), out)  # the last call wins for reused layers
                        # Hand on a copy: an in-place op downstream (ReLU(inplace=True)) would
                        # otherwise rewrite `out`'s autograd history, and the gradient taken
                        # below would be w.r.t. the activation instead of the layer output.
                        return out.clone()

                    return hook

                handles = [layer.module.register_forward_hook(make(n)) for n, layer in self.layers.items()]
                try:
                    with torch.enable_grad():
                        logits = forward(self.model, x)
                        if logits.dim() == 3:
                            logits = logits[:, -1]
                        pred = logits.argmax(dim=-1)
                        missing = [n for n in self.layers if n not in seen]
                        if missing:
                            raise RecorderError(f"layer {missing[0]!r} did not run on the test inputs")
                        outs = [seen[n][1] for n in self.layers]
                        target = logits.gather(1, pred[:, None]).sum()
                        # A frozen layer whose output needs no gradient has query_grad 0 (autograd
                        # refuses to differentiate with respect to it).
                        live = [o for o in outs if o.requires_grad] if target.requires_grad else []
                        got = iter(torch.autograd.grad(target, live, allow_unused=True) if live else ())
                        grads = [next(got) if target.requires_grad and o.requires_grad else None for o in outs]
                finally:
                    for h in handles:
                        h.remove()
                for (n, layer), g in zip(self.layers.items(), grads):
                    q, out = seen[n]
                    g = torch.zeros_like(out) if g is None else g
                    if layer.kind == "embedding":
                        q = q.reshape(q.shape[0], -1)[:, -1] if q.dim() > 1 else q
                    elif q.dim() > 2:
                        q = q.reshape(q.shape[0], -1, q.shape[-1])[:, -1]
                    if g.dim() > 2:
                        g = g.reshape(g.shape[0], -1, g.shape[-1])[:, -1]
                    queries[n].append(q.cpu())
                    qgrads[n].append(g.detach().cpu())
                preds.append(pred.cpu())
        finally:
            self._recording = True
            self.model.train(was_training)
        prediction = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
        for n, layer in self.layers.items():
            emb = layer.kind == "embedding"
            q = torch.cat(queries[n]) if queries[n] else torch.zeros((0,) if emb else (0, layer.spec.in_features))
            g = torch.cat(qgrads[n]) if qgrads[n] else torch.zeros(0, layer.spec.out_features)
            self._queries[n] = (q.long().numpy() if emb else q.float().numpy(), g.float().numpy())
        self._test = {
            "test/label": labels.numpy(),
            "test/task": tasks_t.numpy(),
            "test/prediction": prediction.numpy().astype(np.int64),
        }
        if preview is not None:
            self._test["test/input"] = np.asarray(preview)
        return prediction.numpy()

    # ------------------------------------------------------------------ the dual form
    def coefficients(self, layer: str) -> tuple[float, np.ndarray]:
        """(a, C): W_T = a·W_0 + Σ_s C[s]·G_s over the steps recorded so far."""
        return sgd_coefficients(self.layers[layer].steps)

    def dual(self, layer: str) -> dict[str, np.ndarray]:
        """The whole dual memory of one layer in the recording dtype (loads it all: for tests
        and notebooks on small runs). Keys: w0, b0 (if bias), keys, values, step, example."""
        self._commit_pending()
        a, C = self.coefficients(layer)
        lay = self.layers[layer]
        chunks = list(self.writer.iter_chunks(layer))
        cat = lambda f, width: np.concatenate([c[f] for c in chunks]) if chunks else np.zeros((0,) + width)  # noqa: E731
        out = {
            "w0": a * lay.w_init.numpy(),
            "keys": cat("keys", () if lay.kind == "embedding" else (lay.spec.in_features,)),
            "step": cat("step", ()).astype(np.int64),
            "example": cat("example", ()).astype(np.int64),
        }
        raw = cat("values", (lay.spec.out_features,))
        out["values"] = raw * C[out["step"]][:, None] if len(raw) else raw
        if lay.b_init is not None:
            out["b0"] = a * lay.b_init.numpy()
        return out

    # ------------------------------------------------------------------ finishing
    def _train_tables(self) -> dict[str, np.ndarray]:
        n = 0
        for t in (self._train_labels, self._train_tasks):
            if t is not None:
                n = max(n, t.numel())
        if self._train_inputs is not None:  # train/input has one row per example: size the tables to match
            n = max(n, len(self._train_inputs))
        for ex, _ in self._labels + self._tasks_of:
            if ex.numel():
                n = max(n, int(ex.max()) + 1)
        for layer in self.layers.values():
            for chunk in self.writer.iter_chunks(layer.name):
                if len(chunk["example"]):
                    n = max(n, int(chunk["example"].max()) + 1)
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
        if self._train_inputs is not None:
            out["train/input"] = np.asarray(self._train_inputs.cpu() if isinstance(self._train_inputs, torch.Tensor) else self._train_inputs)
        return out

    def _optimizer_json(self) -> dict:
        g = self.optimizer.param_groups[0]
        scales = [s.scale for lay in self.layers.values() for s in lay.steps if s.active]
        clipped = any(abs(s - 1.0) > 1e-6 for s in scales)
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
        }

    def close(self) -> Path | None:
        """Write the bundle (atomically) and detach every hook. Returns the path to open."""
        if self.closed:
            return None
        self.closed = True
        self._detach()
        self._commit_pending(strict=False)
        static: dict[str, np.ndarray] = {}
        specs = []
        for lay in self.layers.values():
            a, _ = self.coefficients(lay.name)
            L = lay.name
            static[f"layer/{L}/weight"] = lay.module.weight.detach().cpu().float().numpy()
            static[f"layer/{L}/w0"] = (a * lay.w_init.double()).float().numpy()
            if lay.spec.bias:
                static[f"layer/{L}/bias"] = lay.module.bias.detach().cpu().float().numpy()
                static[f"layer/{L}/b0"] = (a * lay.b_init.double()).float().numpy()
            if L in self._queries:
                q, g = self._queries[L]
            else:
                q = np.zeros((0,) if lay.kind == "embedding" else (0, lay.spec.in_features), dtype=np.int64 if lay.kind == "embedding" else np.float32)
                g = np.zeros((0, lay.spec.out_features), dtype=np.float32)
            static[f"layer/{L}/queries"] = q
            static[f"layer/{L}/query_grad"] = g
            specs.append(lay.spec)
        static.update(self._train_tables())
        if not self._test:
            self._test = {k: np.zeros(0, dtype=np.int64) for k in ("test/label", "test/task", "test/prediction")}
        static.update(self._test)
        labels_n = int(max([static["train/label"].max(initial=-1), static["test/label"].max(initial=-1), static["test/prediction"].max(initial=-1)])) + 1
        tasks_n = int(max(static["train/task"].max(initial=-1), static["test/task"].max(initial=-1))) + 1
        classes = self.classes if self.classes is not None else [str(i) for i in range(max(labels_n, 1))]
        tasks = self.tasks if self.tasks is not None else (["all"] if tasks_n <= 1 else [f"task {i}" for i in range(tasks_n)])
        training = {**self.training, "steps": self.step_count}
        if self.interrupted:
            training["interrupted"] = self.interrupted
        if self.check_failures:
            training["check_failures"] = self.check_failures
        extra = {"not_covered": self._not_covered(), **self.extra}
        manifest = Manifest(layers=specs, tasks=tasks, classes=classes, input=self.input,
                            optimizer=self._optimizer_json(), training=training, extra=extra)
        coeffs = {lay.name: self.coefficients(lay.name)[1] for lay in self.layers.values()}

        def transform(layer: str, raw: np.ndarray, steps: np.ndarray) -> np.ndarray:
            return raw.astype(np.float64) * coeffs[layer][steps][:, None]

        return self.writer.finalize(manifest, static, transform)

    def _not_covered(self) -> list[str]:
        """Trained parameters outside the recorded layers (e.g. LayerNorm gains): the dual form
        says nothing about them, and `dualtui info` says so."""
        recorded = {id(p) for lay in self.layers.values() for p in lay.params}
        trained = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        return [n for n, p in self.model.named_parameters() if id(p) in trained and id(p) not in recorded]

    def _detach(self) -> None:
        for layer in self.layers.values():
            if layer.handle is not None:
                layer.handle.remove()
                layer.handle = None
            layer.calls = []
        self._pre.remove()
        self._post.remove()
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None

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
            # Keep what was recorded: the bundle holds every completed optimizer step.
            self.interrupted = "KeyboardInterrupt" if exc_type is KeyboardInterrupt else exc_type.__name__
        self.close()
