"""Recording a query set (`Recorder.record_test`): every layer's query rows and their gradients.

For each item the model is run once (eval mode, in batches) and, at every recorded layer, every
row of every call is kept: its input (the query) and the gradient of the item's target logit
with respect to the matching output row. Effect summed over an item's rows is then the exact
first-order change of that logit at every layer (attention projections included), not only at
the head. The prediction is read from the model's output as the user says (`read=`): one
position of a sequence output, the mean over positions, or any function of the output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
from torch import nn

from ..bundle.manifest import QuerySetSpec, bad_query_set_name
from .attribution import find_output
from .adapters.base import autograd_input
from .errors import RecorderError
from .layout import LayoutError, resolve_output

if TYPE_CHECKING:
    from .recorder import Recorder

# rows="auto": all rows unless that would exceed this many bytes for the set, then focus rows.
AUTO_ROW_BYTES = 1 << 30


@dataclass
class QuerySetInfo:
    """What record_test stored, for the caller to report."""

    name: str
    items: int
    rows: Any  # "all" | "focus" | [positions]
    rows_per_layer: dict[str, int]
    bytes: int


@dataclass
class _Rows:
    query: list[torch.Tensor]
    grad: list[torch.Tensor]
    item: list[torch.Tensor]
    position: list[torch.Tensor]
    call: list[torch.Tensor]




def _batch_axes(inputs: Any, m: int, batch_axis: int | None) -> Any:
    """The batch axis of every tensor in `inputs` (None: not batched, passed whole)."""
    def axis(t: Any) -> int | None:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return None
        if batch_axis is not None:
            if t.dim() <= batch_axis or t.shape[batch_axis] != m:
                raise RecorderError(f"record_test: an input of shape {list(t.shape)} has no {m} items along batch_axis={batch_axis}")
            return batch_axis
        # Axis 0 unless only axis 1 has one entry per item (record_test's documented contract:
        # a [M, M] input is batch-first; pass batch_axis=1 for sequence-first inputs).
        if t.shape[0] == m:
            return 0
        if t.dim() >= 2 and t.shape[1] == m:
            return 1
        return None

    if isinstance(inputs, dict):
        return {k: axis(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return [axis(v) for v in inputs]
    return axis(inputs)


def _slice(inputs: Any, axes: Any, lo: int, hi: int, device: torch.device) -> Any:
    def cut(t: Any, a: int | None) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        t = t.to(device)
        return t if a is None else t.narrow(a, lo, hi - lo)

    if isinstance(inputs, dict):
        return {k: cut(v, axes[k]) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(cut(v, a) for v, a in zip(inputs, axes))
    return cut(inputs, axes)


def _call_model(model: nn.Module, x: Any) -> Any:
    if isinstance(x, dict):
        return model(**x)
    if isinstance(x, (tuple, list)):
        return model(*x)
    return model(x)


def read_logits(rec: "Recorder", output: Any, read: Any, b: int) -> tuple[torch.Tensor, str]:
    """[b, C] logits per item from the model's output, and the manifest's name for the rule."""
    if callable(read):
        logits = read(output)
        if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != b:
            raise RecorderError(f"record_test: read(output) must return [{b}, classes] logits, not "
                         f"{type(logits).__name__}{list(logits.shape) if isinstance(logits, torch.Tensor) else ''}")
        return logits, "custom"
    tensor, _ = find_output(output)
    if tensor is None:
        raise RecorderError(f"record_test: the model returned {type(output).__name__}; pass forward= returning logits, "
                     "or read=lambda output: logits")
    if tensor.dim() == 2:
        if tensor.shape[0] != b:
            raise RecorderError(f"record_test: the model's output has shape {list(tensor.shape)} for a batch of {b} items")
        return tensor, "logits"
    if tensor.dim() != 3:
        raise RecorderError(f"record_test: the model's output has shape {list(tensor.shape)}; expected [items, classes] or a "
                     "sequence [items, positions, classes] (pass read=lambda output: logits)")
    try:
        rowmap = resolve_output(tuple(tensor.shape), b, rec.output_layout, rec.check.input_rule)
    except LayoutError as e:
        raise RecorderError(f"record_test: {e}") from None
    seq = tensor.transpose(0, 1) if rowmap.rule == "sequence-first" else tensor  # [b, P, C]
    if seq.shape[0] != b:
        raise RecorderError(f"record_test: the model's output has shape {list(tensor.shape)} for a batch of {b} items")
    rule = "last" if read is None else read
    if rule == "last":
        return seq[:, -1], "last"
    if rule == "first":
        return seq[:, 0], "first"
    if rule == "mean":
        return seq.mean(dim=1), "mean"
    if isinstance(rule, int) and not isinstance(rule, bool):
        if not -seq.shape[1] <= rule < seq.shape[1]:
            raise RecorderError(f"record_test: read={rule} is outside the output's {seq.shape[1]} positions")
        return seq[:, rule], rule
    raise RecorderError(f"record_test: read={rule!r}; choose 'last', 'first', 'mean', a position, or a function of the output")


def _focus_rule(read_rule: Any, focus: Any) -> Any:
    if focus is not None:
        if focus in ("last", "first", "mean") or (isinstance(focus, int) and not isinstance(focus, bool)):
            return focus
        raise RecorderError(f"record_test: focus={focus!r}; choose 'last', 'first', 'mean' or a position")
    if read_rule in ("first", "mean") or isinstance(read_rule, int):
        return read_rule
    return "last"


def _focus_rows(item: np.ndarray, position: np.ndarray, call: np.ndarray, m: int, rule: Any) -> np.ndarray:
    """Per item, the index of its focus row (docs/format.md section 5), or -1."""
    focus = np.full(m, -1, dtype=np.int64)
    if not len(item):
        return focus
    starts = np.searchsorted(item, np.arange(m), side="left")
    ends = np.searchsorted(item, np.arange(m), side="right")
    for j in range(m):
        a, b = int(starts[j]), int(ends[j])
        if b - a == 1:
            focus[j] = a
            continue
        if b == a or rule == "mean":
            continue
        last = a + np.nonzero(call[a:b] == call[a:b].max())[0]
        pos = position[last]
        if rule == "last":
            focus[j] = last[int(np.argmax(pos))]
        elif rule == "first":
            focus[j] = last[int(np.argmin(pos))]
        else:
            target = rule if rule >= 0 else int(pos.max()) + 1 + rule
            hit = last[pos == target]
            focus[j] = int(hit[0]) if len(hit) else -1
    return focus


def record_query_set(
    rec: "Recorder",
    name: str,
    inputs: Any,
    labels: Any,
    tasks: Any = None,
    *,
    preview: Any = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    read: Any = None,
    focus: Any = None,
    target: Any = "prediction",
    rows: Any = "auto",
    examples: Any = None,
    batch_size: int = 512,
    batch_axis: int | None = None,
) -> tuple[np.ndarray, QuerySetInfo]:
    why = bad_query_set_name(name)
    if why:
        raise RecorderError(f"record_test: {why}")
    if name in rec.query_set_specs:
        raise RecorderError(f"record_test: a query set named {name!r} was already recorded; give each set its own name=")
    labels = torch.as_tensor(labels).long().reshape(-1).cpu()
    m = labels.numel()
    tasks_t = torch.zeros(m, dtype=torch.long) if tasks is None else torch.as_tensor(tasks).long().reshape(-1).cpu()
    if tasks_t.numel() == 1 and m > 1:
        tasks_t = tasks_t.expand(m).clone()
    if tasks_t.numel() != m:
        raise RecorderError(f"record_test: {tasks_t.numel()} tasks for {m} labels")
    rec._check_ids("record_test labels", labels, rec.classes, "classes")
    rec._check_ids("record_test tasks", tasks_t, rec.tasks, "tasks")
    ex_t = None
    if examples is not None:
        ex_t = torch.as_tensor(examples).long().reshape(-1).cpu()
        if ex_t.numel() != m:
            raise RecorderError(f"record_test: {ex_t.numel()} examples for {m} labels")
        if ex_t.numel() and int(ex_t.min()) < 0:
            raise RecorderError("record_test: example ids must be non-negative")
    given_target = None
    if not isinstance(target, str):
        given_target = torch.as_tensor(target).long().reshape(-1).cpu()
        if given_target.numel() != m:
            raise RecorderError(f"record_test: {given_target.numel()} targets for {m} items")
        rec._check_ids("record_test target", given_target, rec.classes, "classes")
        target_rule = "given"
    elif target in ("prediction", "label"):
        target_rule = target
    else:
        raise RecorderError(f"record_test: target={target!r}; choose 'prediction', 'label' or a tensor of class ids")
    if not (rows in ("auto", "all", "focus") or (isinstance(rows, (list, tuple)) and all(isinstance(p, int) and p >= 0 for p in rows))):
        raise RecorderError(f"record_test: rows={rows!r}; choose 'all', 'focus', 'auto' or a list of positions")
    preview_np = None if preview is None else np.asarray(preview.cpu() if isinstance(preview, torch.Tensor) else preview)
    if preview_np is not None:
        rec._check_preview("record_test preview", preview_np, m)
    if batch_size < 1:
        raise RecorderError("record_test: batch_size must be at least 1")

    params = list(rec.model.parameters())
    device = params[0].device if params else torch.device("cpu")
    axes = _batch_axes(inputs, m, batch_axis)
    call_model = forward or (lambda model, x: _call_model(model, x))
    got = {n: _Rows([], [], [], [], []) for n in rec.layers}
    preds, probs, losses, targets = [], [], [], []
    read_name: Any = None
    was_training = rec.model.training
    rec._mode = "test"  # the recorder's hooks note query rows instead of patterns (Recorder.capture)
    rec.model.eval()
    try:
        for lo in range(0, m, batch_size):
            hi = min(m, lo + batch_size)
            b = hi - lo
            x = _slice(inputs, axes, lo, hi, device)
            seen: list[tuple[str, torch.Tensor, torch.Tensor, Any]] = []  # (layer, rows input, output, rowmap)
            rec._test_batch, rec._test_seen = b, seen
            try:
                with torch.enable_grad():
                    output = call_model(rec.model, x)
                    logits, read_name = read_logits(rec, output, read, b)
                    pred = logits.argmax(dim=-1)
                    tgt = pred if target_rule == "prediction" else (labels[lo:hi] if target_rule == "label" else given_target[lo:hi])
                    tgt = tgt.to(logits.device)
                    chosen = logits.gather(1, tgt[:, None])[:, 0]
                    picked = chosen.sum()
                    outs = [o for _, _, o, _ in seen]
                    live = [o for o in outs if o.requires_grad] if picked.requires_grad else []
                    ambiguous = any(isinstance(rm, list) for _, _, _, rm in seen)
                    got_grads = iter(torch.autograd.grad(picked, live, allow_unused=True, retain_graph=ambiguous) if live else ())
                    grads = [next(got_grads) if picked.requires_grad and o.requires_grad else None for o in outs]
                    if ambiguous:
                        seen = _decide_layouts(rec, seen, grads, chosen, live, lo)
                    with torch.no_grad():
                        lp = torch.log_softmax(logits.detach().float(), dim=-1)
                        probs.append(lp.gather(1, pred[:, None]).exp()[:, 0].cpu())
                        lab = labels[lo:hi].to(lp.device)
                        in_range = lab < lp.shape[1]
                        lab_safe = torch.where(in_range, lab, torch.zeros_like(lab))
                        loss = -lp.gather(1, lab_safe[:, None])[:, 0]
                        losses.append(torch.where(in_range, loss, torch.zeros_like(loss)).cpu())
            finally:
                rec._test_seen = []
            missing = [n for n in rec.layers if n not in {s[0] for s in seen}]
            if missing:
                raise RecorderError(f"record_test: layer {missing[0]!r} did not run on the query inputs")
            calls: dict[str, int] = {}
            for (n, q, out, rowmap), g in zip(seen, grads):
                k = calls.get(n, 0)
                calls[n] = k + 1
                layer = rec.layers[n]
                g = torch.zeros_like(out) if g is None else g
                r = got[n]
                r.query.append(layer.adapter.keys(autograd_input(q, layer.adapter)).detach().cpu())
                g = layer.adapter.output_rows(g.detach())
                r.grad.append((g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).cpu())
                r.item.append(lo + rowmap.examples())
                r.position.append(rowmap.positions())
                r.call.append(torch.full((rowmap.rows,), k, dtype=torch.long))
            preds.append(pred.cpu())
            targets.append(tgt.cpu())
    finally:
        rec._mode = "train"
        rec.model.train(was_training)

    prediction = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    if prediction.numel():
        rec._check_ids("the model's predictions", prediction, rec.classes, "classes")
    focus_rule = _focus_rule(read_name, focus)
    static: dict[str, np.ndarray] = {}
    per_layer: dict[str, int] = {}
    partial: list[str] = []
    rows_choice = rows
    if rows == "auto":
        total = sum(sum(t.numel() for t in r.query) * 4 + sum(t.numel() for t in r.grad) * 4 for r in got.values())
        rows_choice = "all"
        if total > AUTO_ROW_BYTES:
            rows_choice = "focus"
            warnings.warn(f"record_test({name!r}): every row of every layer would take {total / 2**30:.1f} GiB; keeping "
                          "only each item's focus row (effects then cover that row only; pass rows='all' to keep all)",
                          stacklevel=3)
    P = f"queries/{name}"
    for n, layer in rec.layers.items():
        r = got[n]
        emb = layer.adapter.feature is None
        if r.item:
            item = torch.cat(r.item)
            order = torch.argsort(item, stable=True)
            q = torch.cat(r.query)[order]
            g = torch.cat(r.grad)[order]
            item = item[order]
            pos = torch.cat(r.position)[order]
            call = torch.cat(r.call)[order]
        else:
            q = torch.zeros((0,) if emb else (0, layer.spec.in_features))
            g = torch.zeros(0, layer.spec.out_features)
            item = pos = call = torch.zeros(0, dtype=torch.long)
        item_np, pos_np, call_np = item.numpy(), pos.numpy(), call.numpy()
        focus_idx = _focus_rows(item_np, pos_np, call_np, m, focus_rule)
        if rows_choice != "all":
            keep = np.zeros(len(item_np), dtype=bool)
            keep[focus_idx[focus_idx >= 0]] = True
            if isinstance(rows_choice, (list, tuple)):
                keep |= np.isin(pos_np, np.asarray(rows_choice, dtype=np.int64))
            if focus_rule == "mean":
                keep[:] = True  # the mean needs every row
            if not keep.all():
                partial.append(n)
            new_index = np.cumsum(keep) - 1
            focus_idx = np.where(focus_idx >= 0, new_index[np.maximum(focus_idx, 0)], -1)
            sel = torch.from_numpy(np.nonzero(keep)[0])
            q, g = q[sel], g[sel]
            item_np, pos_np, call_np = item_np[keep], pos_np[keep], call_np[keep]
        f64 = rec.storage_dtype == "float64"
        real = (lambda t: t.double()) if f64 else (lambda t: t.float())  # noqa: E731
        static[f"{P}/layer/{n}/query"] = q.long().numpy() if emb else real(q).numpy()
        static[f"{P}/layer/{n}/grad"] = real(g).numpy()
        static[f"{P}/layer/{n}/item"] = item_np.astype(np.int64)
        static[f"{P}/layer/{n}/position"] = pos_np.astype(np.int64)
        static[f"{P}/layer/{n}/call"] = call_np.astype(np.int64)
        static[f"{P}/layer/{n}/focus"] = focus_idx.astype(np.int64)
        per_layer[n] = int(len(item_np))
    static[f"{P}/label"] = labels.numpy().astype(np.int64)
    static[f"{P}/task"] = tasks_t.numpy().astype(np.int64)
    static[f"{P}/prediction"] = prediction.numpy().astype(np.int64)
    static[f"{P}/target"] = (torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)).numpy().astype(np.int64)
    static[f"{P}/probability"] = (torch.cat(probs) if probs else torch.zeros(0)).numpy().astype(np.float32)
    static[f"{P}/loss"] = (torch.cat(losses) if losses else torch.zeros(0)).numpy().astype(np.float32)
    if ex_t is not None:
        static[f"{P}/example"] = ex_t.numpy().astype(np.int64)
    if preview_np is not None:
        static[f"{P}/input"] = preview_np
    spec = QuerySetSpec(name, m, rows_choice if not isinstance(rows_choice, tuple) else list(rows_choice),
                        read_name if read_name is not None else "logits", target_rule, partial)
    rec.query_set_specs[name] = spec
    rec.query_tensors[name] = static
    nbytes = sum(a.nbytes for a in static.values())
    info = QuerySetInfo(name, m, spec.rows, per_layer, nbytes)
    rec.query_sets[name] = info
    return prediction.numpy(), info


def _decide_layouts(rec: "Recorder", seen: list, grads: list, chosen: torch.Tensor, live: list, lo: int) -> list:
    """Calls whose layout the shape left open ([b, b, C]): items are independent at test time,
    so weighting item m's target logit by c_m must scale exactly the rows of item m. One more
    backward pass tells the candidate layouts apart (the test-time twin of attribution.py)."""
    from .attribution import example_weights

    b = chosen.shape[0]
    c = example_weights(torch.arange(lo, lo + b), -1).to(device=chosen.device, dtype=chosen.dtype)
    weighted = iter(torch.autograd.grad((chosen * c).sum(), live, allow_unused=True) if live else ())
    wgrads = [next(weighted) if o.requires_grad and chosen.requires_grad else None for _, _, o, _ in seen]
    out = []
    for (n, q, o, rm), g, gw in zip(seen, grads, wgrads):
        if not isinstance(rm, list):
            out.append((n, q, o, rm))
            continue
        layer = rec.layers[n]
        fits = []
        if g is not None and gw is not None and bool(g.abs().max() > 0):
            g2 = layer.adapter.output_rows(g).double()
            w2 = layer.adapter.output_rows(gw).double()
            for cand in rm:
                cw = c.double()[cand.examples().to(c.device)]
                err = float((w2 - cw[:, None] * g2).norm() / (cw[:, None] * g2).norm().clamp(min=1e-300))
                fits.append((err, cand))
        passing = [cand for err, cand in fits if err <= 1e-3]
        if len(passing) == 1:
            chosen_map = passing[0]
            layer.rule = chosen_map.rule
        elif not fits and layer.spec.patterns == 0 and rec.writer.patterns(n) == 0:
            # No gradient reaches the layer and it has no patterns: no score depends on the
            # mapping, so the rows are read batch-first.
            chosen_map = rm[0]
        else:
            raise RecorderError(f"record_test: layer {n!r} got an input of shape {list(q.shape)} whose batch axis the shape "
                         f"leaves open, and the gradients cannot tell; declare Recorder(layouts={{{n!r}: 'batch-first'}}) "
                         "or 'sequence-first'")
        layer.rule_used = layer.rule_used or chosen_map.rule
        out.append((n, q, o, chosen_map))
    return out
