"""Plain-data views of engine results, shared by `dualtui rank --json` and the TUI's export,
so a ranking exported from the app is byte-for-byte what the CLI prints."""

from __future__ import annotations

from typing import Any

from ..bundle.reader import Bundle
from .spotlight import Spotlight
from .text import is_text, position_context, test_text, window_text


def ranking_dict(bundle: Bundle, spot: Spotlight, by: str, group: str, reverse: bool,
                 queries: str | None = None) -> dict[str, Any]:
    test = spot.test
    qs = bundle.queries(queries)
    d = {
        "queries": qs.name,
        "test": test,
        "layer": spot.layer,
        "by": by,
        "group": group,
        "reverse": reverse,
        "test_label": int(qs.array("label", test, test + 1)[0]),
        "test_prediction": int(qs.array("prediction", test, test + 1)[0]),
        "test_target": int(qs.array("target", test, test + 1)[0]),
        "test_task": int(qs.array("task", test, test + 1)[0]),
        "results": [r.to_json() for r in spot.ranked[(by, group, reverse)]],
    }
    if is_text(bundle):
        # Text runs: the words behind each number. A pattern or training token gets the context
        # around its position, the token there and the token it was trained to predict
        # (`label` is that token's id); an example gets its whole window.
        d["test_text"] = test_text(bundle, test, qs.name)
        for r in d["results"]:
            if "position" in r:
                r.update(position_context(bundle, r["example"], r["position"]))
            else:
                r["text"] = window_text(bundle, r["example"])
    return d


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV with a header of every key in first-seen order (the CLI's and the app's format)."""
    import csv
    import io

    from ..literal import literal

    if not rows:
        return ""
    fields: list[str] = []
    for r in rows:
        for k in r:
            if k not in fields:
                fields.append(k)
    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    # names from a bundle are data, not terminal commands: controls shown visibly
    w.writerows([{k: literal(v) if isinstance(v, str) else v for k, v in r.items()} for r in rows])
    return out.getvalue()
