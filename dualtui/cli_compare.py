"""`dualtui compare`: two query items side by side at one layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_common import UsageError, _emit_json, _open, _stdout, app, handles_errors
from .cli_spotlight import (CSV_OPT, DEVICE_OPT, JSON_OPT, QUERIES_OPT, By, Device, _check_formats, _device,
                            _layer, _print_table, _queries, _test, _write_csv)
from .tables import Col
from .units import num


def comparison_json(bundle: Any, c: Any) -> dict:
    qs = bundle.queries(c.queries)
    train_label, train_task = bundle.array("train/label"), bundle.array("train/task")

    def item(j: int) -> dict:
        m = c.items[j]
        other = set(c.tops[1 - j])
        return {"item": m, "label": int(qs.label[m]), "prediction": int(qs.prediction[m]),
                "top": [{"rank": r + 1, "example": e, "score": float(c.scores[j][e]), "label": int(train_label[e]),
                         "task": int(train_task[e]), "shared": e in other} for r, e in enumerate(c.tops[j])],
                "task_share": [float(x) for x in c.task_share[j]], "class_share": [float(x) for x in c.class_share[j]]}

    nan_null = lambda x: None if math.isnan(x) else x  # noqa: E731 - strict JSON has no NaN
    return {"queries": c.queries, "layer": c.layer, "by": c.by, "top": c.top, "items": [item(0), item(1)],
            "shared": c.shared, "jaccard": nan_null(c.jaccard), "spearman": nan_null(c.spearman), "examples": c.examples}


@app.command()
@handles_errors
def compare(
    bundles: list[Path] = typer.Argument(..., help="One bundle (compare two of its items: --test and --with), or two runs "
                                         "on the same data (RUN_A RUN_B: compare the runs, for --test or every item)."),
    test: Optional[int] = typer.Option(None, "--test", "-t", help="The first item; with two runs: the one item to compare "
                                       "(default: every item of the query set)."),
    other: Optional[int] = typer.Option(None, "--with", "-w", help="The second item (one bundle)."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer (default: the last; with two runs: every layer)."),
    by: By = typer.Option(By.effect, "--by", help="Score the training examples are ranked by."),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many training examples per item."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Two items side by side, or two runs on the same data side by side.

    Two items (BUNDLE --test A --with B): each one's top training examples, their overlap, and
    each one's attention mass by task and class. Per training example (the scores of `rank
    --group example`). shared: examples in both tops; Jaccard: |A ∩ B| / |A ∪ B| of the two
    tops; Spearman ρ: the rank correlation of the two items' scores over every training example
    seen at the layer (1: the same order, 0: none).

    Two runs (RUN_A RUN_B [--test M]; e.g. two --init-scale values, or multitask vs continual):
    per layer, each run's initial-weight vs learned share, effective number of attended
    patterns, top-10 share and share of Σ|α| per task and class (means over the items), and how
    alike the runs' rankings of the training examples are for the same items (mean top-k
    Jaccard, mean Spearman ρ over the examples both runs trained on at the layer).
    """
    _check_formats(as_json, as_csv)
    if len(bundles) == 2:
        if other is not None:
            raise UsageError("--with compares two items of one bundle; with two runs, --test picks the item (or none: every item)")
        _compare_runs(bundles, test, layer, by.value, top, queries, device, as_json, as_csv)
        return
    if len(bundles) != 1:
        raise UsageError(f"compare takes one bundle (two of its items) or two runs, not {len(bundles)} bundles")
    if test is None or other is None:
        raise UsageError("comparing two items of one bundle needs --test A and --with B (or give two runs: RUN_A RUN_B)")
    from .engine.compare import compare as run_compare

    b = _open(bundles[0])
    qname = _queries(b, queries)
    first, second = _test(b, test, qname), _test(b, other, qname)
    L = _layer(b, layer)
    try:
        c = run_compare(b, L, first, second, by.value, top, qname, _device(device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    d = comparison_json(b, c)
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{"item": it["item"], **r} for it in d["items"] for r in it["top"]])
        return
    _print(b, d)


def _compare_runs(paths: list[Path], test: Optional[int], layer: Optional[str], by: str, top: int,
                  queries: Optional[str], device: Any, as_json: bool, as_csv: bool) -> None:
    from dataclasses import asdict

    from .engine.compare_runs import RunsDiffer, compare_runs

    a, b = _open(paths[0]), _open(paths[1])
    qname = _queries(a, queries)
    _queries(b, qname)
    layers = [_layer(a, layer)] if layer else a.manifest.layer_names
    missing = [L for L in layers if L not in b.manifest.layer_names]
    if missing:
        raise UsageError(f"{paths[1]}: no layer {missing[0]!r} (compare runs of the same model)")
    items = [_test(a, test, qname)] if test is not None else list(range(a.queries(qname).size))
    try:
        rows = compare_runs(a, b, layers, items, by=by, top=top, queries=qname, device=_device(device))
    except RunsDiffer as e:
        raise UsageError(str(e)) from None
    nan_null = lambda x: None if isinstance(x, float) and math.isnan(x) else x  # noqa: E731
    d = {"runs": [str(p) for p in paths], "queries": qname, "items": items if test is not None else len(items), "by": by,
         "top": top, "layers": [{**{k: nan_null(v) for k, v in asdict(r).items() if k != "per_item"},
                                 "per_item": [{k: nan_null(v) for k, v in p.items()} for p in r.per_item]} for r in rows]}
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{"layer": r["layer"], "items": r["items"], "jaccard": r["jaccard"], "spearman": r["spearman"],
                     "examples": r["examples"], **{f"{side}_{k}": v for side in ("a", "b") for k, v in r[side].items()
                                                   if not isinstance(v, list)}} for r in d["layers"]])
        return
    tasks, classes = a.manifest.tasks, a.manifest.classes
    out = _stdout()
    what = f"item {items[0]}" if test is not None else f"the {len(items)} items of query set {qname!r} (means)"
    out.print(f"A = {paths[0]}\nB = {paths[1]}\n{what} · by {by} per training example · top {top}")
    L_rows = d["layers"]
    pair = lambda r, k, f: f"{f(r['a'][k])} / {f(r['b'][k])}"  # noqa: E731
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    _print_table(out, [Col("layer", [r["layer"] for r in L_rows]),
                       Col("learned share A / B", [pair(r, "learned_share", pct) for r in L_rows], numeric=True),
                       Col("effective patterns A / B", [pair(r, "effective_patterns", lambda x: f"{x:,.0f}") for r in L_rows],
                           numeric=True),
                       Col("top-10 share A / B", [pair(r, "top10_share", pct) for r in L_rows], numeric=True, drop=1),
                       *([Col("own-task share A / B", [pair(r, "own_task_share", pct) for r in L_rows], numeric=True)]
                         if L_rows[0]["a"]["own_task_share"] is not None else []),
                       Col(f"top-{top} Jaccard", ["n/a" if r["jaccard"] is None else f"{r['jaccard']:.3f}" for r in L_rows],
                           numeric=True),
                       Col("Spearman ρ", ["n/a" if r["spearman"] is None else f"{r['spearman']:.3f}" for r in L_rows],
                           numeric=True),
                       Col("examples", [f"{r['examples']:,}" for r in L_rows], numeric=True, drop=2)],
                 title="per layer: run A / run B", title_justify="left")
    for key, names, kind in (("task_share", tasks, "task"), ("class_share", classes, "class")):
        if len(L_rows[0]["a"][key]) <= 1:
            continue
        cols = [Col(kind, [names[i] if i < len(names) else str(i) for i in range(len(L_rows[0]["a"][key]))])]
        for r in L_rows:
            cols.append(Col(f"{r['layer']} A / B", [f"{x:.1%} / {y:.1%}" for x, y in zip(r["a"][key], r["b"][key])],
                            numeric=True))
        _print_table(out, cols, title=f"share of Σ|α| by {kind}: run A / run B", title_justify="left")
    out.print("learned share: ‖learned term‖ ÷ (‖initial term‖ + ‖learned term‖) of the layer's output; effective "
              "patterns: (Σ|α|)² ÷ Σα²; own-task share: of Σ|α|, on the item's own task; Jaccard: overlap of the two runs' top training examples for the same item; "
              "Spearman ρ: rank correlation of the two runs' scores over the examples both trained on", style="dim")


def _print(b: Any, d: dict) -> None:
    from .engine.text import labels_are_tokens
    from .tokens import visible

    classes, tasks = b.manifest.classes, b.manifest.tasks
    text = labels_are_tokens(b)

    def cname(i: int) -> str:
        n = classes[i] if 0 <= i < len(classes) else str(i)
        return visible(n, alone=True) if text else n

    out = _stdout()
    a, z = d["items"]
    head = " vs ".join(f"item {it['item']} (label {cname(it['label'])}, predicted {cname(it['prediction'])})" for it in (a, z))
    out.print(f"{head} · {d['layer']} · by {d['by']} per training example · query set {d['queries']}")
    rho = "n/a (a constant score)" if d["spearman"] is None else f"{d['spearman']:.3f}"
    jac = "n/a" if d["jaccard"] is None else f"{d['jaccard']:.3f}"
    out.print(f"shared in the top {d['top']}: {len(d['shared'])} · Jaccard {jac} · Spearman ρ {rho} over "
              f"{d['examples']:,} training examples")
    for it in (a, z):
        rows = it["top"]
        _print_table(out, [Col("rank", [str(r["rank"]) for r in rows], numeric=True),
                           Col("example", [str(r["example"]) for r in rows], numeric=True),
                           Col(d["by"], [num(r["score"]) for r in rows], numeric=True),
                           Col("label", [cname(r["label"]) for r in rows]),
                           Col("task", [tasks[r["task"]] if 0 <= r["task"] < len(tasks) else str(r["task"]) for r in rows], drop=2),
                           Col("shared", ["●" if r["shared"] else "" for r in rows])],
                     title=f"item {it['item']}: top {d['top']} training examples", title_justify="left")
    for key, names, what in (("task_share", tasks, "task"), ("class_share", [cname(i) for i in range(len(classes))], "class")):
        if len(a[key]) <= 1:
            continue
        labels = [names[i] if i < len(names) else str(i) for i in range(len(a[key]))]
        _print_table(out, [Col(what, labels), Col(f"item {a['item']}", [f"{x:.1%}" for x in a[key]], numeric=True),
                           Col(f"item {z['item']}", [f"{x:.1%}" for x in z[key]], numeric=True)],
                     title=f"share of Σ|α| by {what}", title_justify="left")
    out.print("shared ●: in both tops · Jaccard: |A ∩ B| / |A ∪ B| of the tops · Spearman ρ: rank correlation of the "
              "two items' scores over every training example", style="dim")
