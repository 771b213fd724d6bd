"""How every view names a bundle's dual form: exact (SGD, Adafactor) or approximate (Adam).

An approximate bundle's patterns do not add up to the trained weights; what they leave out is
the residual (docs/format.md section 3, `dual_form`). No command or view may present its
numbers as exact, so each one takes its label from here.
"""

from __future__ import annotations

from typing import Any


def explained_text(manifest: Any) -> str:
    layers = manifest.dual_form.get("layers") or {}
    if not layers:
        return "an unmeasured share (run `dualtui verify`)"
    return ", ".join(f"{float(v['explained']):.0%} ({name})" for name, v in layers.items())


def label(manifest: Any) -> str | None:
    """One line for an approximate bundle (None for an exact one)."""
    if not manifest.approximate:
        return None
    method = manifest.dual_form.get("method", "approximate")
    return (f"APPROXIMATE dual form ({method}): the patterns explain {explained_text(manifest)} of the learned "
            f"change; the rest is not attributed to any pattern")


def marker(manifest: Any) -> dict | None:
    """The JSON every command adds to its output for an approximate bundle."""
    if not manifest.approximate:
        return None
    df = manifest.dual_form
    return {"exact": False, "method": df.get("method"),
            "explained": {name: v.get("explained") for name, v in (df.get("layers") or {}).items()}}
