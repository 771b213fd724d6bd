"""`dualtui compare`: two query items side by side at one layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from .cli_common import UsageError, _emit_json, _open, _stdout, app, handles_errors
from .cli_spotlight import (BUNDLE_ARG, CSV_OPT, DEVICE_OPT, JSON_OPT, QUERIES_OPT, By, Device, _check_formats, _device,
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
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="The first item."),
    other: int = typer.Option(..., "--with", "-w", help="The second item."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer (default: the last)."),
    by: By = typer.Option(By.effect, "--by", help="Score the training examples are ranked by."),
    top: int = typer.Option(10, "--top", "-k", min=1, help="How many training examples per item."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Two items side by side: each one's top training examples, their overlap, and each one's
    attention mass by task and class.

    Per training example (the scores of `rank --group example`). shared: examples in both tops;
    Jaccard: |A ∩ B| / |A ∪ B| of the two tops; Spearman ρ: the rank correlation of the two
    items' scores over every training example seen at the layer (1: the same order, 0: none).
    """
    from .engine.compare import compare as run_compare

    _check_formats(as_json, as_csv)
    b = _open(bundle)
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
