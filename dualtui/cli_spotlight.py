"""Scripted spotlights: `rank`, `mass`, `layers`, `votes` (tables, --json or --csv on stdout)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .cli import UsageError, _emit_json, _open, _stdout, app, handles_errors


class By(str, Enum):
    attention = "attention"
    magnitude = "magnitude"
    effect = "effect"


class Group(str, Enum):
    pattern = "pattern"
    example = "example"
    position = "position"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


BUNDLE_ARG = typer.Argument(..., help="A .safetensors bundle or a sharded .safetensors.index.json.")
JSON_OPT = typer.Option(False, "--json", help="Print JSON to stdout.")
CSV_OPT = typer.Option(False, "--csv", help="Print CSV to stdout.")
DEVICE_OPT = typer.Option(Device.auto, "--device", help="Where to compute: auto uses CUDA when present.")
QUERIES_OPT = typer.Option(None, "--queries", "-q", help="Query set (default: test); `dualtui info` lists them.")


def _layer(bundle: Any, layer: Optional[str]) -> str:
    names = bundle.manifest.layer_names
    if layer is None:
        return names[-1]
    if layer not in names:
        raise UsageError(f"unknown layer {layer!r}; valid layers: {', '.join(names)}")
    return layer


def _queries(bundle: Any, queries: Optional[str]) -> str:
    """The query set to use (default "test"), or a usage error listing the valid ones."""
    names = bundle.query_set_names
    if not names:
        raise UsageError("the bundle has no query sets (record_test was never called)")
    if queries is None:
        return bundle.default_query_set
    if queries not in names:
        raise UsageError(f"unknown query set {queries!r}; valid: {', '.join(names)}")
    return queries


def _test(bundle: Any, test: int, queries: Optional[str] = None) -> int:
    qs = bundle.queries(_queries(bundle, queries))
    n = qs.size
    if not 0 <= test < n:
        raise UsageError(f"item {test} out of range; query set {qs.name!r} has 0..{n - 1}" if n else
                         f"query set {qs.name!r} has no items")
    return test


def _focus(position: Optional[str]) -> Any:
    if position is None:
        return None
    if position == "mean":
        return "mean"
    try:
        return int(position)
    except ValueError:
        raise UsageError(f"--position {position!r}: give a position (an integer, -1 for the last) or 'mean'") from None


def _device(name: Device) -> Any:
    from .engine.stream import DeviceError, pick_device

    try:
        return pick_device(name.value)
    except DeviceError as e:
        raise UsageError(str(e)) from None


def _write_csv(rows: list[dict]) -> None:
    from .engine.report import csv_text

    sys.stdout.write(csv_text(rows))


def _check_formats(as_json: bool, as_csv: bool) -> None:
    if as_json and as_csv:
        raise UsageError("choose one of --json and --csv")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


# ----------------------------------------------------------------------------- rank
def rank_json(bundle: Any, layer: str, test: int, by: str, group: str, reverse: bool, top: int, device: Any,
              queries: Optional[str] = None, focus: Any = None) -> dict:
    from .engine.report import ranking_dict
    from .engine.spotlight import spotlights

    try:
        res = spotlights(bundle, layer, [test], top=top, by=[by], groups=[group], reverse=[reverse],
                         summary=False, masses=False, device=device, queries=queries, focus=focus)[0]
    except ValueError as e:  # e.g. --position an item does not have
        raise UsageError(str(e)) from None
    d = ranking_dict(bundle, res, by, group, reverse, queries)
    if focus is not None:
        d["position"] = focus
    return d


@app.command()
@handles_errors
def rank(
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="Test item index."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer name (default: the last layer)."),
    by: By = typer.Option(By.attention, "--by", help="Score to rank by."),
    group: Group = typer.Option(Group.pattern, "--group", help="Rank patterns; training examples (sum over their patterns); "
                                "or, in text runs, training tokens (sum over the epochs that saw each position)."),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many results."),
    reverse: bool = typer.Option(False, "--reverse", help="Lowest scores first (most negative)."),
    queries: Optional[str] = QUERIES_OPT,
    position: Optional[str] = typer.Option(None, "--position", help="Attention at this position of the item "
                                           "(-1: the last; 'mean': averaged over positions) instead of the position the "
                                           "prediction reads. Effect always sums over every position."),
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Training patterns (or examples) ranked by their score for one test item at one layer."""
    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    L, m = _layer(b, layer), _test(b, test, qname)
    if group == Group.position and not b.has_position(L):
        raise UsageError(f"--group position needs a text run (patterns with positions); layer {L!r} has none")
    d = rank_json(b, L, m, by.value, group.value, reverse, top, _device(device), qname, _focus(position))
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv(d["results"])
        return
    from rich.table import Table

    classes, tasks = b.manifest.classes, b.manifest.tasks
    name = lambda names, i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    out = _stdout()
    order = f"by {by.value} · {group.value}s · {'lowest' if reverse else 'highest'} first"
    if "test_text" in d:
        _print_text_ranking(out, d, L, order, classes, tasks)
        return
    item = f"test {m}" if qname == "test" else f"{qname} {m}"
    out.print(f"{item} (label {name(classes, d['test_label'])}, predicted {name(classes, d['test_prediction'])}) · layer {L} · {order}")
    cols = ["rank", "score", "attention", "magnitude", "effect"] + (["pattern", "step"] if group == Group.pattern else ["patterns"]) + ["example", "label", "task"]
    t = Table(*cols, box=None, pad_edge=False)
    for r in d["results"]:
        row = [str(r["rank"]), _fmt(r["score"]), _fmt(r["attention"]), _fmt(r["magnitude"]), _fmt(r["effect"])]
        row += [str(r["pattern"]), str(r["step"])] if group == Group.pattern else [str(r["patterns"])]
        row += [str(r["example"]), name(classes, r["label"]), name(tasks, r["task"])]
        t.add_row(*row)
    out.print(t)


def _print_text_ranking(out: Any, d: dict, layer: str, order: str, classes: list[str], tasks: list[str]) -> None:
    """Text runs: each result as the training text around it, the attended token reversed and
    the token it was trained to predict after "▸" (green)."""
    from rich.table import Table
    from rich.text import Text

    from .tokens import visible

    name = lambda i: visible(classes[i], alone=True) if 0 <= i < len(classes) else str(i)  # noqa: E731
    item = f"test {d['test']}" if d.get("queries", "test") == "test" else f"{d['queries']} {d['test']}"
    head = Text(f"{item} · layer {layer} · {order}\n")
    head.append(visible(d["test_text"] or "")[-48:])
    head.append("▸" + name(d["test_prediction"]), "bold green" if d["test_prediction"] == d["test_label"] else "bold red")
    head.append(f"  predicted {name(d['test_prediction'])}, true {name(d['test_label'])}")
    out.print(head)
    group = d["group"]
    cols = ["rank", "score", "attention", "effect"] + (["step"] if group == "pattern" else ["patterns"]) + ["example"]
    cols += (["pos"] if group != "example" else []) + (["task"] if len(tasks) > 1 else []) + ["training text"]
    t = Table(*cols, box=None, pad_edge=False)
    for r in d["results"]:
        row: list[Any] = [str(r["rank"]), _fmt(r["score"]), _fmt(r["attention"]), _fmt(r["effect"])]
        row += [str(r["step"])] if group == "pattern" else [str(r["patterns"])]
        row += [str(r["example"])] + ([str(r["position"])] if group != "example" else [])
        row += [tasks[r["task"]] if 0 <= r["task"] < len(tasks) else str(r["task"])] if len(tasks) > 1 else []
        if "token" in r:
            ctx = Text(visible(r["context_before"]))
            ctx.append(visible(r["token"]), "reverse bold")
            ctx.append("▸" + visible(r["next_token"], alone=True), "bold green")
            ctx.append(visible(r["context_after"]), "dim")
        else:
            ctx = Text(visible(r["text"]))
        row.append(ctx)
        t.add_row(*row)
    out.print(t)


# ----------------------------------------------------------------------------- mass
def mass_json(bundle: Any, layers: list[str], test: int, device: Any, queries: Optional[str] = None) -> dict:
    from .engine.spotlight import spotlights

    tasks, classes = bundle.manifest.tasks, bundle.manifest.classes
    task_rows, class_rows, step_rows = [], [], []
    for L in layers:
        res = spotlights(bundle, L, [test], groups=[], by=[], summary=False, masses=True, device=device, queries=queries)[0]
        ms = res.masses
        total = ms.abs_total or 1.0
        for i in range(len(ms.task_abs_sum)):
            task_rows.append({"layer": L, "task": i, "task_name": tasks[i] if i < len(tasks) else str(i),
                              "attention_sum": float(ms.task_attention_sum[i]), "abs_sum": float(ms.task_abs_sum[i]),
                              "abs_share": float(ms.task_abs_sum[i] / total), "effect_sum": float(ms.task_effect_sum[i])})
        for i in range(len(ms.class_abs_sum)):
            class_rows.append({"layer": L, "class": i, "class_name": classes[i] if i < len(classes) else str(i),
                               "attention_sum": float(ms.class_attention_sum[i]), "abs_sum": float(ms.class_abs_sum[i]),
                               "abs_share": float(ms.class_abs_sum[i] / total), "effect_sum": float(ms.class_effect_sum[i])})
        for i in range(len(ms.step_abs_sum)):
            step_rows.append({"layer": L, "bin": i, "step_start": int(ms.step_edges[i]), "step_end": int(ms.step_edges[i + 1]),
                              "attention_sum": float(ms.step_attention_sum[i]), "abs_sum": float(ms.step_abs_sum[i]),
                              "abs_share": float(ms.step_abs_sum[i] / total), "effect_sum": float(ms.step_effect_sum[i])})
    return {"queries": bundle.queries(queries).name, "test": test, "tasks": task_rows, "classes": class_rows, "steps": step_rows}


@app.command()
@handles_errors
def mass(
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="Test item index."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="One layer (default: every layer)."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Attention mass per task, per training class and over training time, per layer."""
    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    m = _test(b, test, qname)
    layers = [_layer(b, layer)] if layer else b.manifest.layer_names
    d = mass_json(b, layers, m, _device(device), qname)
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{"kind": "task", **r} for r in d["tasks"]] + [{"kind": "class", **r} for r in d["classes"]]
                   + [{"kind": "step", **r} for r in d["steps"]])
        return
    from rich.table import Table

    from .engine.text import labels_are_tokens
    from .tokens import visible

    out = _stdout()
    text = labels_are_tokens(b)  # a language model's classes are next tokens
    for kind, key, label in (("tasks", "task_name", "task"), ("classes", "class_name", "next token" if text else "class")):
        rows = d[kind]
        title = f"test {m}: attention mass per {label}"
        if text and kind == "classes":  # a vocabulary is long: the 10 next tokens with most mass per layer
            rows = [r for L in layers for r in sorted((r for r in rows if r["layer"] == L), key=lambda r: -r["abs_sum"])[:10]]
            title += " (top 10 per layer; --json has all)"
        t = Table("layer", label, "Σα", "Σ|α|", "share of Σ|α|", "Σeffect", box=None, pad_edge=False, title=title)
        for r in rows:
            t.add_row(r["layer"], visible(r[key], alone=True) if text else r[key], _fmt(r["attention_sum"]), _fmt(r["abs_sum"]),
                      f"{r['abs_share']:.1%}", _fmt(r["effect_sum"]))
        out.print(t)


# ----------------------------------------------------------------------------- layers
def layers_json(bundle: Any, test: int, device: Any, queries: Optional[str] = None) -> dict:
    from dataclasses import asdict

    from .engine.spotlight import spotlights

    rows = []
    for L in bundle.manifest.layer_names:
        res = spotlights(bundle, L, [test], groups=[], by=[], summary=True, masses=False, device=device, queries=queries)[0]
        rows.append(asdict(res.summary))
    return {"queries": bundle.queries(queries).name, "test": test, "layers": rows}


@app.command()
@handles_errors
def layers(
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="Test item index."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Per-layer contributions for one test item: initial weights vs learning.

    Per layer: ‖w0 q + b0‖ vs ‖Σ α v‖, the effective number of attended patterns (Σ|α|)²/Σα²,
    the share of Σ|α| in the top 10 / top 100 patterns, and the primal-vs-dual error.
    """
    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    m = _test(b, test, qname)
    d = layers_json(b, m, _device(device), qname)
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv(d["layers"])
        return
    from rich.table import Table

    t = Table("layer", "‖w0 q + b0‖", "‖Σ α v‖", "learned share", "effective patterns", "of", "top-10 share", "top-100 share",
              "primal−dual", box=None, pad_edge=False, title=f"test {m}: per-layer contributions")
    for r in d["layers"]:
        t.add_row(r["layer"], _fmt(r["initial_norm"]), _fmt(r["learned_norm"]), f"{r['learned_share']:.1%}",
                  f"{r['effective_patterns']:,.1f}", f"{r['patterns']:,}", f"{r['top10_share']:.2%}", f"{r['top100_share']:.2%}",
                  f"{r['primal_dual_error']:.1e}")
    _stdout().print(t)


# ----------------------------------------------------------------------------- votes
@app.command()
@handles_errors
def votes(
    bundle: Path = BUNDLE_ARG,
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="One layer (default: every layer)."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Predictive power of attention over a whole query set (default: test), per layer.

    A layer's vote is the training class with the largest Σ|α|; it is compared with the true
    label and with the model's prediction (agreement rates and a 2×2 table).
    """
    from .engine.votes import layer_votes

    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    names = [_layer(b, layer)] if layer else b.manifest.layer_names
    dev = _device(device)
    rows = [layer_votes(b, L, dev, queries=qname).to_json() for L in names]
    if as_json:
        _emit_json({"queries": qname, "layers": rows})
        return
    if as_csv:
        _write_csv([{**{k: v for k, v in r.items() if k != "table"}, **r["table"]} for r in rows])
        return
    from rich.table import Table

    t = Table("layer", "vote = label", "vote = prediction", "model accuracy", "vote ✓ model ✓", "vote ✓ model ✗",
              "vote ✗ model ✓", "vote ✗ model ✗", box=None, pad_edge=False, title=f"{b.queries(qname).size} test items" if qname == "test" else f"{b.queries(qname).size} items of query set {qname!r}")
    for r in rows:
        tb = r["table"]
        t.add_row(r["layer"], f"{r['label_agreement']:.1%}", f"{r['prediction_agreement']:.1%}", f"{r['model_accuracy']:.1%}",
                  str(tb["vote_right_model_right"]), str(tb["vote_right_model_wrong"]), str(tb["vote_wrong_model_right"]),
                  str(tb["vote_wrong_model_wrong"]))
    _stdout().print(t)
