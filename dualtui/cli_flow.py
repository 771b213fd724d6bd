"""`dualtui flow`: which training examples enter and leave the top-k from layer to layer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli_common import UsageError, _emit_json, _open, _stdout, app, handles_errors
from .cli_spotlight import (BUNDLE_ARG, CSV_OPT, DEVICE_OPT, JSON_OPT, QUERIES_OPT, By, Device, _check_formats, _device,
                            _print_table, _queries, _test, _write_csv)
from .tables import Col


@app.command()
@handles_errors
def flow(
    bundle: Path = BUNDLE_ARG,
    test: Optional[int] = typer.Option(None, "--test", "-t", help="One item: the examples that enter and leave (default: "
                                       "every item of the query set, as shares)."),
    by: By = typer.Option(By.effect, "--by", help="Score the training examples are ranked by at each layer."),
    top: int = typer.Option(10, "--top", "-k", min=1, help="The size of each layer's top."),
    queries: Optional[str] = QUERIES_OPT,
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """Layer flow: from each layer to the next (in the model's order), which training examples
    enter an item's top-k (by the scores of `rank --group example`), which leave it and which
    stay. Without --test: over every item of the query set, the mean share of each layer's
    top-k that is new (not in the layer below's) and the mean Jaccard of the two tops."""
    from .engine.flow import layer_flow

    _check_formats(as_json, as_csv)
    b = _open(bundle)
    qname = _queries(b, queries)
    items = [_test(b, test, qname)] if test is not None else list(range(b.queries(qname).size))
    try:
        f = layer_flow(b, items, by=by.value, top=top, queries=qname, device=_device(device))
    except ValueError as e:
        raise UsageError(str(e)) from None
    steps = []
    for s in f.steps:
        new = s.new_share(top)
        jac = [len(k) / max(len(set(e) | set(k) | set(lf)), 1) for e, k, lf in zip(s.entered, s.kept, s.left)]
        row = {"below": s.below, "above": s.above, "items": len(items), "mean_new_share": float(new.mean()),
               "mean_carried_share": float(1.0 - new.mean()), "mean_jaccard": float(sum(jac) / len(jac))}
        if test is not None:
            row.update({"entered": s.entered[0], "left": s.left[0], "kept": s.kept[0]})
        steps.append(row)
    d = {"queries": qname, "by": by.value, "top": top, "layers": f.layers, "steps": steps}
    if test is not None:
        d.update({"test": items[0], "tops": {L: f.tops[L][0] for L in f.layers}})
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in r.items()} for r in steps])
        return
    out = _stdout()
    label = b.array("train/label")
    classes = b.manifest.classes
    name = lambda e: f"{e} ({classes[label[e]] if 0 <= label[e] < len(classes) else label[e]})"  # noqa: E731
    if test is not None:
        out.print(f"{qname} item {items[0]} · top {top} training examples by {by.value} at each layer (label in brackets)")
        for s in steps:
            out.print(f"\n{s['below']} → {s['above']}: {len(s['kept'])} stay, {len(s['entered'])} enter, {len(s['left'])} leave")
            _print_table(out, [Col("enter", [name(e) for e in s["entered"]] + [""] * max(0, len(s["left"]) - len(s["entered"]))),
                               Col("leave", [name(e) for e in s["left"]] + [""] * max(0, len(s["entered"]) - len(s["left"])))])
        return
    _print_table(out, [Col("from", [s["below"] for s in steps]), Col("to", [s["above"] for s in steps]),
                       Col(f"new in the top {top}", [f"{s['mean_new_share']:.1%}" for s in steps], numeric=True),
                       Col("carried over", [f"{s['mean_carried_share']:.1%}" for s in steps], numeric=True),
                       Col("Jaccard", [f"{s['mean_jaccard']:.3f}" for s in steps], numeric=True)],
                 title=f"{len(items)} items of query set {qname!r}: top {top} training examples by {by.value}, layer to layer (means)")
