"""Scripted spotlights: `rank`, `mass`, `layers`, `votes` (tables, --json or --csv on stdout)."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_common import UsageError, _emit_json, _open, _stdout, app, handles_errors
from .tables import Col, left_out_note, rich_table, score_columns
from .units import num


class By(str, Enum):
    attention = "attention"
    magnitude = "magnitude"
    effect = "effect"
    cosine = "cosine"


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
    return num(x)


def _score_cols(by: str, rows: list[dict], names: tuple[str, ...]) -> list[Col]:
    return score_columns(by, {n: [_fmt(r[n]) for r in rows] for n in names})


def _print_table(out: Any, cols: list[Col], **kw: Any) -> None:
    t, left = rich_table(cols, out.width, **kw)  # piped: 240 columns, past them columns drop with a note
    out.print(t)
    if left:
        score = next((c for c in cols if c.header == "score"), None)
        same = {c.header for c in cols if score is not None and c.cells == score.cells and c is not score}
        out.print(left_out_note([f"{h} (= score)" if h in same else h for h in left]), style="dim")


# ----------------------------------------------------------------------------- rank
def rank_json(bundle: Any, layer: str, test: int, by: str, group: str, reverse: bool, top: int, device: Any,
              queries: Optional[str] = None, focus: Any = None) -> dict:
    from .engine.report import ranking_dict
    from .engine.spotlight import spotlights

    try:
        res = spotlights(bundle, layer, [test], top=top, by=[by], groups=[group], reverse=[reverse],
                         summary=bundle.manifest.approximate, masses=False, device=device, queries=queries, focus=focus)[0]
    except ValueError as e:  # e.g. --position an item does not have
        raise UsageError(str(e)) from None
    d = ranking_dict(bundle, res, by, group, reverse, queries)
    if res.summary is not None:  # approximate: the output term no pattern explains, beside the ranking
        d["not_attributed"] = {"norm": res.summary.residual_norm, "share_of_learned_output": res.summary.residual_share}
    if focus is not None:
        d["position"] = focus
    return d


@app.command()
@handles_errors
def rank(
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="Test item index."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer name (default: the last layer)."),
    by: By = typer.Option(By.effect, "--by", help="Score to rank by (default effect: what the pattern did to this "
                          "prediction; see above)."),
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
    """Training patterns (or examples) ranked by their score for one test item at one layer.

    Scores (docs/format.md section 6), with k a pattern's key (the training input), v its value
    (the scaled error signal), q the test item's input and g the gradient of its target logit:

    attention α = k · q (+1 with a bias): unnormalised; training inputs with a large norm get a large α.

    magnitude = |α| · ‖v‖: the size of the pattern's contribution α v to the layer's output.

    effect = Σ_rows α (v · g): the pattern's first-order change of the target logit (exact at a last
    layer, where the effects of all patterns plus the initial-weight term add up to the logit).

    cosine = α / (‖k‖ ‖q‖) (k and q extended by the bias input 1): attention normalised, 1 for a
    training input that is a copy of the test input, whatever its size. Per example or token:
    the mean over its patterns (the other scores are sums).
    """
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

    classes, tasks = b.manifest.classes, b.manifest.tasks
    name = lambda names, i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    out = _stdout()
    order = f"by {by.value} · {group.value}s · {'lowest' if reverse else 'highest'} first"
    if "test_text" in d:
        _print_text_ranking(out, d, L, order, classes, tasks)
        _not_attributed_line(out, d)
        return
    item = f"test {m}" if qname == "test" else f"{qname} {m}"
    out.print(f"{item} (label {name(classes, d['test_label'])}, predicted {name(classes, d['test_prediction'])}) · layer {L} · {order}")
    rows = d["results"]
    pat = group == Group.pattern
    cols = [Col("rank", [str(r["rank"]) for r in rows], numeric=True), Col("score", [_fmt(r["score"]) for r in rows], numeric=True),
            *_score_cols(by.value, rows, ("attention", "magnitude", "effect", "cosine"))]
    cols += ([Col("pattern", [str(r["pattern"]) for r in rows], numeric=True, drop=1),
              Col("step", [str(r["step"]) for r in rows], numeric=True, drop=1)] if pat else
             [Col("patterns", [str(r["patterns"]) for r in rows], numeric=True, drop=1)])
    cols += [Col("example", [str(r["example"]) for r in rows], numeric=True), Col("label", [name(classes, r["label"]) for r in rows]),
             Col("task", [name(tasks, r["task"]) for r in rows], drop=1)]
    _print_table(out, cols)
    _not_attributed_line(out, d)


def _not_attributed_line(out: Any, d: dict) -> None:
    na = d.get("not_attributed")
    if na is not None:
        out.print(f"not attributed to any pattern (approximate dual form): ‖R q‖ = {_fmt(na['norm'])}, "
                  f"{na['share_of_learned_output']:.1%} of ‖(W_T − w0) q‖", style="yellow", markup=False)


def _print_text_ranking(out: Any, d: dict, layer: str, order: str, classes: list[str], tasks: list[str]) -> None:
    """Text runs: each result as the training text around it, the attended token reversed and
    the token it was trained to predict after "▸" (green)."""
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
    rows = d["results"]
    texts = []
    for r in rows:
        if "token" in r:
            ctx = Text(visible(r["context_before"]))
            ctx.append(visible(r["token"]), "reverse bold")
            ctx.append("▸" + visible(r["next_token"], alone=True), "bold green")
            ctx.append(visible(r["context_after"]), "dim")
        else:
            ctx = Text(visible(r["text"]))
        texts.append(ctx)
    cols = [Col("rank", [str(r["rank"]) for r in rows], numeric=True), Col("score", [_fmt(r["score"]) for r in rows], numeric=True),
            *_score_cols(d["by"], rows, ("attention", "effect", "cosine")),
            Col("step" if group == "pattern" else "patterns", [str(r["step"] if group == "pattern" else r["patterns"]) for r in rows],
                numeric=True, drop=1),
            Col("example", [str(r["example"]) for r in rows], numeric=True)]
    if group != "example":
        cols.append(Col("pos", [str(r["position"]) for r in rows], numeric=True))
    if len(tasks) > 1:
        cols.append(Col("task", [tasks[r["task"]] if 0 <= r["task"] < len(tasks) else str(r["task"]) for r in rows], drop=1))
    cols.append(Col("training text", texts))
    _print_table(out, cols)


# ----------------------------------------------------------------------------- mass
def mass_json(bundle: Any, layers: list[str], test: int, device: Any, queries: Optional[str] = None) -> dict:
    from .engine.spotlight import spotlights

    tasks, classes = bundle.manifest.tasks, bundle.manifest.classes
    task_rows, class_rows, step_rows, unattributed = [], [], [], []
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
        if ms.unattributed_effect is not None:
            unattributed.append({"layer": L, "effect_sum": ms.unattributed_effect})
    d = {"queries": bundle.queries(queries).name, "test": test, "tasks": task_rows, "classes": class_rows, "steps": step_rows}
    if bundle.manifest.approximate:  # the residual's effect, which no task, class or step holds
        d["not_attributed"] = unattributed
    return d


NOT_ATTRIBUTED = "not attributed"


def _with_not_attributed(rows: list[dict], d: dict, key: str) -> list[dict]:
    """The table's rows with, after each layer's, the residual's row of an approximate bundle:
    no attention, its effect on the target logit, so the Σeffect column adds up to what each
    layer learned and nothing is silently dropped."""
    extra = {r["layer"]: r for r in d.get("not_attributed", [])}
    if not extra:
        return rows
    out: list[dict] = []
    for i, r in enumerate(rows):
        out.append(r)
        if i + 1 == len(rows) or rows[i + 1]["layer"] != r["layer"]:
            if r["layer"] in extra:
                out.append({"layer": r["layer"], key: NOT_ATTRIBUTED, "residual": True, "effect_sum": extra[r["layer"]]["effect_sum"]})
    return out


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
                   + [{"kind": "step", **r} for r in d["steps"]]
                   + [{"kind": "not_attributed", **r} for r in d.get("not_attributed", [])])
        return

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
        rows = _with_not_attributed(rows, d, key)
        cell = lambda r, f: "-" if r.get("residual") else f(r)  # noqa: E731 (the residual has no attention)
        _print_table(out, [Col("layer", [r["layer"] for r in rows]),
                           Col(label, [r[key] if r.get("residual") or not text else visible(r[key], alone=True) for r in rows]),
                           Col("Σα", [cell(r, lambda r: _fmt(r["attention_sum"])) for r in rows], numeric=True, drop=1),
                           Col("Σ|α|", [cell(r, lambda r: _fmt(r["abs_sum"])) for r in rows], numeric=True),
                           Col("share of Σ|α|", [cell(r, lambda r: f"{r['abs_share']:.1%}") for r in rows], numeric=True),
                           Col("Σeffect", [_fmt(r["effect_sum"]) for r in rows], numeric=True)], title=title)
    # Over training time: which part of training the prediction draws on (continual learning:
    # which task's phase), with each bin's steps, and the task phases when the run has them.
    rows = _with_not_attributed(d["steps"], d, "steps")
    phases = b.manifest.training.get("task_phases") if isinstance(b.manifest.training.get("task_phases"), list) else None

    def phase_of(r: dict) -> str:
        if not phases:
            return ""
        names = [b.manifest.tasks[i] if i < len(b.manifest.tasks) else str(i) for i, ph in enumerate(phases)
                 if isinstance(ph, list) and len(ph) == 2 and ph[0] < r["step_end"] and r["step_start"] < ph[1]]
        return ", ".join(names)

    cell = lambda r, f: "-" if r.get("residual") else f(r)  # noqa: E731
    cols = [Col("layer", [r["layer"] for r in rows]),
            Col("steps", [r["steps"] if r.get("residual") else
                          f"{r['step_start']}–{r['step_end'] - 1}" if r["step_end"] > r["step_start"] else "-" for r in rows],
                numeric=True),
            *([Col("task phase", [cell(r, phase_of) for r in rows], drop=1)] if phases else []),
            Col("Σ|α|", [cell(r, lambda r: _fmt(r["abs_sum"])) for r in rows], numeric=True),
            Col("share of Σ|α|", [cell(r, lambda r: f"{r['abs_share']:.1%}") for r in rows], numeric=True),
            Col("Σeffect", [_fmt(r["effect_sum"]) for r in rows], numeric=True)]
    bins = len(d["steps"]) // max(len(layers), 1)
    _print_table(out, cols, title=f"test {m}: attention mass over training steps ({bins} bins per layer)")


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

    rows = d["layers"]
    # an approximate bundle's residual is its own column: what no pattern explains is never dropped
    residual = [Col("‖not attributed‖", [_fmt(r["residual_norm"]) for r in rows], numeric=True),
                Col("of learned output", [f"{r['residual_share']:.1%}" for r in rows], numeric=True)] if b.manifest.approximate else []
    _print_table(_stdout(), [
        Col("layer", [r["layer"] for r in rows]),
        Col("‖w0 q + b0‖", [_fmt(r["initial_norm"]) for r in rows], numeric=True),
        Col("‖Σ α v‖", [_fmt(r["learned_norm"]) for r in rows], numeric=True),
        *residual,
        Col("learned share", [f"{r['learned_share']:.1%}" for r in rows], numeric=True),
        Col("effective patterns", [_fmt(r["effective_patterns"]) for r in rows], numeric=True, drop=1),
        Col("of", [f"{r['patterns']:,}" for r in rows], numeric=True, drop=3),
        Col("top-10 share", [f"{r['top10_share']:.2%}" for r in rows], numeric=True, drop=2),
        Col("top-100 share", [f"{r['top100_share']:.2%}" for r in rows], numeric=True, drop=2),
        *([] if b.manifest.approximate else [Col("primal−dual", [f"{r['primal_dual_error']:.1e}" for r in rows], numeric=True, drop=1)])],
        title=f"test {m}: per-layer contributions")


# ----------------------------------------------------------------------------- influence
def influence_json(bundle: Any, example: int, layers: list[str], by: str, top: int, device: Any,
                   queries: Optional[str] = None) -> dict:
    from .engine.influence import influence

    qs = bundle.queries(queries)
    label, pred, task = qs.label, qs.prediction, qs.array("task")
    classes, tasks = bundle.manifest.classes, bundle.manifest.tasks

    def item(inf: Any, m: int, rank: int) -> dict:
        return {"rank": rank, "item": m, **{s: float(inf.scores[s][m]) for s in ("attention", "magnitude", "effect", "cosine")},
                "label": int(label[m]), "prediction": int(pred[m]), "task": int(task[m])}

    out = []
    for L in layers:
        try:
            inf = influence(bundle, L, example, qs.name, device)
        except IndexError as e:
            raise UsageError(str(e)) from None
        out.append({"layer": L, "patterns": int(len(inf.patterns)),
                    "most": [item(inf, m, i + 1) for i, m in enumerate(inf.ranked(by, False, top))],
                    "least": [item(inf, m, i + 1) for i, m in enumerate(inf.ranked(by, True, top))]})
    train_label = int(bundle.array("train/label", example, example + 1)[0])
    train_task = int(bundle.array("train/task", example, example + 1)[0])
    return {"queries": qs.name, "example": example, "by": by, "example_label": train_label,
            "example_label_name": classes[train_label] if 0 <= train_label < len(classes) else str(train_label),
            "example_task": train_task, "example_task_name": tasks[train_task] if 0 <= train_task < len(tasks) else str(train_task),
            "layers": out}


@app.command()
@handles_errors
def influence(
    bundle: Path = BUNDLE_ARG,
    example: int = typer.Option(..., "--example", "-e", help="Training example index."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="One layer (default: every layer)."),
    by: By = typer.Option(By.effect, "--by", help="Score to rank the items by."),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many items at each end."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """The reverse spotlight: the items of a query set that one training example contributes to
    most and least, per layer.

    An item's score is the sum over the example's patterns of attention, magnitude or effect:
    exactly the example's score in `dualtui rank --test ITEM --group example`. By effect (the
    default), "most" are the items whose target logit the example pushed up most, "least" those
    it pushed down most.
    """
    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    layers = [_layer(b, layer)] if layer is not None else list(b.manifest.layer_names)
    d = influence_json(b, example, layers, by.value, top, _device(device), qname)
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{"layer": lay["layer"], "end": end, **r} for lay in d["layers"] for end in ("most", "least")
                    for r in lay[end]])
        return
    from .engine.text import labels_are_tokens
    from .tokens import visible

    classes, tasks = b.manifest.classes, b.manifest.tasks
    text = labels_are_tokens(b)  # a language model's classes are next tokens: show them visibly

    def name(names: list[str], i: int) -> str:
        n = names[i] if 0 <= i < len(names) else str(i)
        return visible(n, alone=True) if text and names is classes else n

    out = _stdout()
    out.print(f"training example {example} (label {name(classes, d['example_label'])}, task {d['example_task_name']}) · "
              f"query set {qname} · by {by.value}")
    for lay in d["layers"]:
        for end, words in (("most", "highest first"), ("least", "lowest first")):
            rows = lay[end]
            cols = [Col("rank", [str(r["rank"]) for r in rows], numeric=True),
                    Col("item", [str(r["item"]) for r in rows], numeric=True),
                    *_score_cols(by.value, rows, ("attention", "magnitude", "effect", "cosine")),
                    Col("label", [name(classes, r["label"]) for r in rows]),
                    Col("predicted", [name(classes, r["prediction"]) for r in rows]),
                    Col("task", [name(tasks, r["task"]) for r in rows], drop=1)]
            _print_table(out, cols, title=f"{lay['layer']} · {lay['patterns']} patterns of example {example} · "
                                          f"{by.value}, {words}", title_justify="left")


# ----------------------------------------------------------------------------- votes
def _pct(x: Any) -> str:
    return "-" if x is None else f"{x:.1%}"


def _ratio(x: Any) -> str:
    return "-" if x is None else f"{x:.3g}"


@app.command()
@handles_errors
def votes(
    bundles: list[Path] = typer.Argument(..., help="One bundle, or several runs of the same setting (e.g. seeds) for "
                                         "mean ± std per layer."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="One layer (default: every layer)."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Predictive power of attention over a whole query set (default: test), per layer.

    A layer's vote is the training class with the largest Σ|α| (the paper's sum-vote); it is
    compared with the true label and with the model's prediction (agreement rates and a 2×2
    table), over all items and split into the items the model gets right and those it gets
    wrong. Peakedness: mean ÷ std of Σ|α| over the classes (lower: attention more peaked on
    a few classes), averaged over the right and the wrong items. Beside it, the
    frequency-normalised vote: the class with the largest mean |α| per pattern.

    Several bundles (runs of one setting with different seeds): every metric's mean ± sample
    standard deviation over the runs, per layer. The runs must have the same layers and the
    same query set.
    """
    from .engine.votes import across_runs, layer_votes

    _check_formats(as_json, as_csv)
    opened = [_open(p) for p in bundles]
    b = opened[0]
    qname = _queries(b, queries)
    names = [_layer(b, layer)] if layer else b.manifest.layer_names
    for p, other in zip(bundles[1:], opened[1:]):
        if _queries(other, qname) != qname or other.queries(qname).size != b.queries(qname).size:
            raise UsageError(f"{p}: query set {qname!r} has {other.queries(qname).size} items, "
                             f"{bundles[0]} has {b.queries(qname).size}: votes over runs need the same query set")
        missing = [L for L in names if L not in other.manifest.layer_names]
        if missing:
            raise UsageError(f"{p}: no layer {missing[0]!r} (runs to average must have the same layers)")
    dev = _device(device)
    runs = [[layer_votes(o, L, dev, queries=qname).to_json() for L in names] for o in opened]
    if len(runs) > 1:
        _votes_over_runs(bundles, runs, across_runs(runs), qname, b, as_json, as_csv)
        return
    rows = runs[0]
    if as_json:
        _emit_json({"queries": qname, "layers": rows})
        return
    if as_csv:
        _write_csv([_flat_votes(r) for r in rows])
        return
    title = f"{b.queries(qname).size} test items" if qname == "test" else f"{b.queries(qname).size} items of query set {qname!r}"
    out = _stdout()
    _print_table(out, [
        Col("layer", [r["layer"] for r in rows]),
        Col("vote = label", [f"{r['label_agreement']:.1%}" for r in rows], numeric=True),
        Col("vote = prediction", [f"{r['prediction_agreement']:.1%}" for r in rows], numeric=True),
        Col("model accuracy", [f"{r['model_accuracy']:.1%}" for r in rows], numeric=True),
        Col("right: vote = label", [_pct(r["correct"]["label_agreement"]) for r in rows], numeric=True, drop=1),
        Col("wrong: vote = label", [_pct(r["misclassified"]["label_agreement"]) for r in rows], numeric=True, drop=1),
        Col("wrong: vote = prediction", [_pct(r["misclassified"]["prediction_agreement"]) for r in rows], numeric=True, drop=1),
        Col("peakedness right / wrong", [f"{_ratio(r['peakedness']['correct'])} / {_ratio(r['peakedness']['misclassified'])}"
                                        for r in rows], numeric=True, drop=2),
        Col("normalised = label", [f"{r['normalised_label_agreement']:.1%}" for r in rows], numeric=True, drop=3),
        Col("normalised = prediction", [f"{r['normalised_prediction_agreement']:.1%}" for r in rows], numeric=True, drop=3)], title=title)
    out.print("vote: the training class with the largest Σ|α| (the paper's); right / wrong: the items the model classifies "
              "correctly / not; peakedness: mean ÷ std of Σ|α| over classes (lower: more peaked); normalised: the largest "
              "mean |α| per pattern of the class (Σ|α| ÷ its pattern count), which a frequent class cannot win by numbers "
              "alone; --json and --csv add the 2×2 counts", style="dim")


def _flat_votes(r: dict) -> dict:
    flat = {k: v for k, v in r.items() if k not in ("table", "correct", "misclassified", "peakedness")}
    flat.update(r["table"])
    for split in ("correct", "misclassified"):
        flat.update({f"{split}_{k}": v for k, v in r[split].items()})
    flat.update({f"peakedness_{k}": v for k, v in r["peakedness"].items()})
    return flat


def _votes_over_runs(paths: list[Path], runs: list[list[dict]], summary: list[dict], qname: str, b: Any,
                     as_json: bool, as_csv: bool) -> None:
    if as_json:
        _emit_json({"queries": qname, "runs": [str(p) for p in paths], "layers": summary,
                    "per_run": [{"bundle": str(p), "layers": rows} for p, rows in zip(paths, runs)]})
        return
    if as_csv:
        _write_csv([{"layer": r["layer"], "runs": r["runs"],
                     **{f"{m}_{k}": v[k] for m, v in r.items() if isinstance(v, dict) for k in ("mean", "std", "n")}}
                    for r in summary])
        return

    def pm(r: dict, m: str, pct: bool = True) -> str:
        v = r[m]
        if v["mean"] is None:
            return "-"
        return f"{v['mean']:.1%} ± {v['std']:.1%}" if pct else f"{v['mean']:.3g} ± {v['std']:.2g}"

    out = _stdout()
    _print_table(out, [
        Col("layer", [r["layer"] for r in summary]),
        Col("vote = label", [pm(r, "label_agreement") for r in summary], numeric=True),
        Col("vote = prediction", [pm(r, "prediction_agreement") for r in summary], numeric=True),
        Col("model accuracy", [pm(r, "model_accuracy") for r in summary], numeric=True),
        Col("right: vote = label", [pm(r, "correct.label_agreement") for r in summary], numeric=True, drop=1),
        Col("wrong: vote = label", [pm(r, "misclassified.label_agreement") for r in summary], numeric=True, drop=1),
        Col("wrong: vote = prediction", [pm(r, "misclassified.prediction_agreement") for r in summary], numeric=True, drop=1),
        Col("peakedness right", [pm(r, "peakedness.correct", False) for r in summary], numeric=True, drop=2),
        Col("peakedness wrong", [pm(r, "peakedness.misclassified", False) for r in summary], numeric=True, drop=2)],
        title=f"{len(paths)} runs, {b.queries(qname).size} items of query set {qname!r} each: mean ± std over runs")
    out.print("std: the sample standard deviation over the runs (ddof 1); per-run figures: --json", style="dim")


# ----------------------------------------------------------------------------- self-scores
class SelfSort(str, Enum):
    effect = "effect"
    others = "others"
    share = "share"


@app.command("self-scores")
@handles_errors
def self_scores_cmd(
    bundle: Path = BUNDLE_ARG,
    queries: str = typer.Option("train", "--queries", "-q", help="A query set drawn from the training data (default: "
                                "train, as `record digits|mnist --train-queries N` writes it)."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer (default: the last, where the self effect is "
                                        "exactly the part of the logit the example's own patterns wrote)."),
    by: SelfSort = typer.Option(SelfSort.effect, "--by", help="effect: the self effect, highest first (memorised); others: "
                                "the other examples' effect, lowest first (the rest of the data argues against the label: "
                                "mislabelled); share: the self share, highest first."),
    top: int = typer.Option(20, "--top", "-k", min=1, help="How many items in the table (JSON and CSV have all)."),
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Training examples that only their own patterns support: memorised or mislabelled ones.

    For each item of a query set drawn from the training data (item = training example e):
    self effect = Σ over e's own patterns of their effect on the item's target logit (at the
    last layer: exactly the part of that logit e's own training steps wrote); learned = the
    effect of every pattern together, Σ_r g_r·((W − w0) q_r + b − b0); others = learned − self
    effect, what the rest of the training data did to it (mislabelled examples: strongly
    negative, --by others); self share = self effect ÷ learned.
    """
    import numpy as np

    from .engine.selfscore import self_scores

    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    L = _layer(b, layer)
    try:
        s = self_scores(b, L, qname, _device(device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    key = {SelfSort.effect: s.self_effect, SelfSort.others: -s.others,
           SelfSort.share: np.nan_to_num(s.self_share, nan=-np.inf)}[by]
    order = np.argsort(-key, kind="stable")
    share = s.self_share
    rows = [{"rank": i + 1, "item": int(m), "example": int(s.example[m]), "label": int(s.label[m]),
             "target": int(s.target[m]), "prediction": int(s.prediction[m]), "self_effect": float(s.self_effect[m]),
             "learned": float(s.learned[m]), "others": float(s.others[m]),
             "self_share": None if np.isnan(share[m]) else float(share[m]),
             "patterns": int(s.patterns[m])} for i, m in enumerate(order)]
    if as_json:
        _emit_json({"queries": qname, "layer": L, "by": by.value, "items": rows})
        return
    if as_csv:
        _write_csv(rows)
        return
    classes = b.manifest.classes
    name = lambda i: classes[i] if 0 <= i < len(classes) else str(i)  # noqa: E731
    shown = rows[:top]
    out = _stdout()
    _print_table(out, [
        Col("rank", [str(r["rank"]) for r in shown], numeric=True),
        Col("example", [str(r["example"]) for r in shown], numeric=True),
        Col("label", [name(r["label"]) for r in shown]),
        Col("predicted", [name(r["prediction"]) for r in shown]),
        Col("self effect", [_fmt(r["self_effect"]) for r in shown], numeric=True),
        Col("others", [_fmt(r["others"]) for r in shown], numeric=True),
        Col("learned", [_fmt(r["learned"]) for r in shown], numeric=True, drop=1),
        Col("self share", ["-" if r["self_share"] is None else f"{r['self_share']:.1%}" for r in shown], numeric=True),
        Col("patterns", [str(r["patterns"]) for r in shown], numeric=True, drop=2)],
        title=f"{len(rows)} training examples of query set {qname!r} · layer {L} · by "
              + ("the other examples' effect, lowest first" if by == SelfSort.others else f"self {by.value}, highest first"))
    out.print("self effect: what the example's own patterns did to its target logit; others: what every other example's "
              "patterns did (negative: the rest of the data argues against its label); learned: both; self share: self "
              "effect ÷ learned", style="dim")
