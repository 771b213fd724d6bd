"""`dualtui curves`: the paper's figures for one item at one layer, as tables, JSON, CSV and
(with matplotlib, the `plot` extra) a PNG/SVG for papers and slides."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from .cli_common import UsageError, _emit_json, _open, _stdout, app, handles_errors
from .cli_spotlight import (BUNDLE_ARG, CSV_OPT, DEVICE_OPT, JSON_OPT, QUERIES_OPT, Device, _check_formats, _device,
                            _focus, _layer, _print_table, _queries, _test, _write_csv)
from .tables import Col
from .units import num

SHOWN_RANKS = (1, 10, 100, 500)


def curves_json(bundle: Any, c: Any) -> dict:
    tasks, classes = bundle.manifest.tasks, bundle.manifest.classes
    name = lambda names, i: names[i] if 0 <= i < len(names) else str(i)  # noqa: E731
    total = sum(g.abs_sum for g in c.groups) or 1.0
    return {
        "layer": c.layer, "item": c.item, "by": c.by, "top": c.top,
        "groups": [{"task": g.task, "task_name": name(tasks, g.task), "class": g.cls, "class_name": name(classes, g.cls),
                    "patterns": g.patterns, "attention_sum": g.attention_sum, "abs_sum": g.abs_sum,
                    "abs_share": g.abs_sum / total, "scores": [float(x) for x in g.scores],
                    "steps": [int(x) for x in g.steps], "pattern": [int(x) for x in g.pattern]} for g in c.groups],
        "example_totals": {"examples": c.examples, "quantiles": {str(q): v for q, v in c.example_quantiles.items()},
                           "histogram": {"counts": [int(x) for x in c.example_histogram[0]],
                                         "edges": [float(x) for x in c.example_histogram[1]]}},
    }


@app.command()
@handles_errors
def curves(
    bundle: Path = BUNDLE_ARG,
    test: int = typer.Option(..., "--test", "-t", help="Test item index."),
    layer: Optional[str] = typer.Option(None, "--layer", "-l", help="Layer (default: the last)."),
    by: str = typer.Option("attention", "--by", help="attention (the paper's), magnitude or effect."),
    top: int = typer.Option(500, "--top", "-k", min=1, help="Patterns per (task, class) curve (the paper: 500)."),
    bins: int = typer.Option(20, "--bins", min=1, help="Histogram bins of the per-example totals."),
    queries: Optional[str] = QUERIES_OPT,
    position: Optional[str] = typer.Option(None, "--position", help="Attention at this position (text runs; see rank)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also draw the figures into this .png or .svg file "
                                        "(needs matplotlib: pip install \"dualtui[plot]\")."),
    device: Device = DEVICE_OPT,
    as_json: bool = JSON_OPT,
    as_csv: bool = CSV_OPT,
) -> None:
    """The paper's figures for one test item at one layer: (a) the sorted top-k scores of each
    (task, class) group's patterns, with the training step of each pattern on the curve; (c) Σα
    and Σ|α| per (task, class); (d) the distribution of per-example totals (each training
    example's score summed over its patterns, as `rank --group example`). (b), the top-k of all
    patterns in rank order with label, task and step, is `rank`. --json and --csv have the whole
    curves (CSV: one row per point)."""
    from .engine.group_curves import group_curves

    _check_formats(as_json, as_csv)
    if plot is not None and plot.suffix.lower() not in (".png", ".svg"):
        raise UsageError(f"--plot must end in .png or .svg: {plot}")
    b = _open(bundle)
    qname = _queries(b, queries)
    L, m = _layer(b, layer), _test(b, test, qname)
    try:
        c = group_curves(b, L, m, by=by, top=top, bins=bins, queries=qname, device=_device(device), focus=_focus(position))
    except ValueError as e:
        raise UsageError(str(e)) from None
    d = curves_json(b, c)
    if plot is not None:
        _plot(d, plot, f"{qname} item {m} · layer {L}")
    if as_json:
        _emit_json(d)
        return
    if as_csv:
        _write_csv([{"task": g["task"], "class": g["class"], "rank": r + 1, "score": s, "step": st, "pattern": p}
                    for g in d["groups"] for r, (s, st, p) in enumerate(zip(g["scores"], g["steps"], g["pattern"]))])
        return
    _print(b, d)
    if plot is not None:
        print(f"wrote {plot}", file=__import__("sys").stderr)


def _print(b: Any, d: dict) -> None:
    import numpy as np

    out = _stdout()
    groups = d["groups"]
    multi = len(b.manifest.tasks) > 1
    label = lambda g: f"{g['task_name']} / {g['class_name']}" if multi else g["class_name"]  # noqa: E731
    out.print(f"test {d['item']} · layer {d['layer']} · by {d['by']}: the paper's figures")
    ranks = [r for r in SHOWN_RANKS if r <= d["top"]]
    _print_table(out, [Col("task / class" if multi else "class", [label(g) for g in groups]),
                       Col("patterns", [f"{g['patterns']:,}" for g in groups], numeric=True),
                       Col("Σα", [num(g["attention_sum"]) for g in groups], numeric=True, drop=1),
                       Col("Σ|α|", [num(g["abs_sum"]) for g in groups], numeric=True),
                       Col("share", [f"{g['abs_share']:.1%}" for g in groups], numeric=True),
                       *[Col(f"#{r}", [num(g["scores"][r - 1]) if len(g["scores"]) >= r else "-" for g in groups],
                             numeric=True) for r in ranks],
                       Col(f"median step of top {d['top']}",
                           [str(int(np.median(g["steps"]))) if g["steps"] else "-" for g in groups], numeric=True, drop=2)],
                 title=f"(a, c) per {'(task, class)' if multi else 'class'}: Σα, Σ|α|, and the sorted top-{d['top']} "
                       f"{d['by']} at ranks {', '.join(map(str, ranks))}", title_justify="left")
    t = d["example_totals"]
    if t["examples"]:
        qs = t["quantiles"]
        _print_table(out, [Col("quantile", list(qs)), Col(f"per-example Σ {d['by']}", [num(v) for v in qs.values()], numeric=True)],
                     title=f"(d) per-example totals over {t['examples']:,} training examples", title_justify="left")
        counts, edges = t["histogram"]["counts"], t["histogram"]["edges"]
        most = max(counts) or 1
        for n, lo, hi in zip(counts, edges, edges[1:]):
            out.print(f"{num(lo):>11} … {num(hi):<11} {'█' * max(int(round(40 * n / most)), 1 if n else 0)} {n}",
                      markup=False, highlight=False)
    out.print("--json/--csv: every curve point with its training step; --plot FILE.png draws the figures", style="dim")


def _plot(d: dict, path: Path, title: str) -> None:
    """The figures as an image: (a) a curve per group on a log rank axis, (d) the histogram."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display over SSH
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError('--plot needs matplotlib: pip install -c constraints.txt "dualtui[plot]"') from None
    fig, (ax, hx) = plt.subplots(1, 2, figsize=(11, 4.2))
    multi = len({g["task"] for g in d["groups"]}) > 1
    for g in d["groups"]:
        if g["scores"]:
            # colour: the class; line style: the task (the paper's data sets)
            ax.plot(range(1, len(g["scores"]) + 1), g["scores"], lw=1.2, color=f"C{g['class'] % 10}",
                    linestyle=("-", "--", ":", "-.")[g["task"] % 4],
                    label=f"{g['task_name']} / {g['class_name']}" if multi else g["class_name"])
    ax.set_xscale("log")
    ax.set_xlabel("rank within the group")
    ax.set_ylabel(d["by"])
    ax.set_title(f"sorted top-{d['top']} {d['by']} per {'(task, class)' if multi else 'class'}")
    ax.legend(fontsize=7, ncol=2)
    h = d["example_totals"]["histogram"]
    if h["counts"]:
        hx.stairs(h["counts"], h["edges"], fill=True)
    hx.set_xlabel(f"per-example Σ {d['by']}")
    hx.set_ylabel("training examples")
    hx.set_title("per-example totals")
    fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        from .bundle.writer import OutputError

        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
