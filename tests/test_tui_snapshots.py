"""SVG snapshots of `dualtui open` (pytest-textual-snapshot): every tab, and the spotlight
after `g` and `g r`, at 80×24 and 120×40, on sample_runs/digits-continual.safetensors.

Deterministic: every worker (spotlights, verify) has finished before the screenshot, the
Input's cursor does not blink, and the bundle is opened by its path relative to the
repository, which is what the overview shows (no machine-specific absolute path).

Update after an intended change of the layout with
    python -m pytest tests/test_tui_snapshots.py --snapshot-update
and look at the SVGs in tests/__snapshots__/test_tui_snapshots/ before committing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("pytest_textual_snapshot", reason="pip install -e '.[test]' (pytest-textual-snapshot)")

from textual.app import App  # noqa: E402
from textual.widgets import DataTable, Input  # noqa: E402

from dualtui.bundle import Bundle  # noqa: E402
from dualtui.tui.app import DualtuiApp  # noqa: E402
from dualtui.tui.model import OpenRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = Path("sample_runs") / "digits-continual.safetensors"  # relative: the overview prints it

TABS = {"1": "overview", "2": "tests", "3": "spotlight", "4": "layers", "5": "tasks", "6": "curve", "7": "compare"}
SIZES = {"80x24": (80, 24), "120x40": (120, 40)}
VIEWS = {
    "overview": ("1",),
    "tests": ("2",),
    "spotlight": ("3",),
    "layers": ("4",),
    "tasks": ("5",),
    "spotlight-by-example": ("3", "g"),
    "spotlight-by-example-reversed": ("3", "g", "r"),
    "curve": ("6",),
    "compare": ("c", "n", "n", "7"),
}


def _tables_pending(app: App) -> bool:
    """A DataTable sizes its columns to new rows only when it next goes idle; until then a
    screenshot shows columns as wide as their labels (e.g. the task column cut to "digi")."""
    return any(getattr(t, "_require_update_dimensions", False) or getattr(t, "_updated_cells", None)
               for t in app.query(DataTable))


async def settle(pilot) -> None:
    app = pilot.app
    # A finished spotlight starts the verify worker: wait until no worker is left running.
    while any(not w.is_finished for w in app.workers):
        await app.workers.wait_for_complete()
    await pilot.pause()
    for field in app.query(Input):
        field.cursor_blink = False
    # pilot.pause() waits for "idle" by a CPU-time heuristic, which a busy machine defeats:
    # wait for the tables themselves (seen flaking under load without this).
    for _ in range(200):
        await pilot.pause()
        if not _tables_pending(app):
            break
    # Cells drawn before that Idle stay cached at the old column widths (the ranking's columns
    # now have explicit widths, see test_ranking_columns_fit_their_cells_after_a_refresh; the
    # tests list and the overview still size theirs on Idle): drop the caches so the snapshot
    # shows the settled layout whatever the timing.
    for table in app.query(DataTable):
        getattr(table, "_clear_caches", lambda: None)()
        table.refresh()
    # A toast ("item 0 pinned …") lives for a few seconds: whether it is still on screen would
    # depend on the machine's speed.
    app.clear_notifications()
    await pilot.pause()


def _steady_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """primal−dual errors are float32 rounding noise (~1e-6) whose last digit depends on the BLAS
    build's summation order (1.8e-06 here, 1.9e-06 there): show their power of ten only, so
    the snapshots test the layout, not the machine. The scores are computed in float64 for the
    same reason: a float32 cosine of 0.64485 showed as 0.6448 on one CPU and 0.6449 on another
    (the engine's float32 results are checked against brute force elsewhere, to tolerance)."""
    import math

    import torch

    import dualtui.engine.spotlight as spotlight_mod

    real_blocks = spotlight_mod.stream_blocks

    def float64_blocks(*a, **kw):
        for block in real_blocks(*a, **kw):
            block.tensors = {f: t.double() if t.is_floating_point() else t for f, t in block.tensors.items()}
            yield block

    monkeypatch.setattr(spotlight_mod, "compute_dtype", lambda bundle, layer: torch.float64)
    monkeypatch.setattr(spotlight_mod, "stream_blocks", float64_blocks)

    real = OpenRun.compute

    def compute(self, *a, **kw):
        spot = real(self, *a, **kw)
        e = spot.summary.primal_dual_error
        if e > 0:
            spot.summary.primal_dual_error = 10.0 ** math.floor(math.log10(e))
        return spot

    monkeypatch.setattr(OpenRun, "compute", compute)
    import dualtui.engine.verify as verify_mod

    real_verify = verify_mod.verify_layer

    def verify_layer(*a, **kw):
        check = real_verify(*a, **kw)
        if check.weight_max_abs_error > 0:
            check.weight_max_abs_error = 10.0 ** math.floor(math.log10(check.weight_max_abs_error))
        return check

    monkeypatch.setattr(verify_mod, "verify_layer", verify_layer)


@pytest.fixture
def dualtui_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DualtuiApp:
    monkeypatch.chdir(ROOT)
    _steady_rounding(monkeypatch)
    run = OpenRun(Bundle.open(BUNDLE))
    assert str(run.bundle.path) == str(BUNDLE)
    return DualtuiApp(run, export_dir=tmp_path)


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("size", list(SIZES))
def test_snapshot(snap_compare, dualtui_app: DualtuiApp, size: str, view: str) -> None:
    async def run_before(pilot) -> None:
        await settle(pilot)  # the spotlights of every layer and the verify worker
        for key in VIEWS[view]:
            await pilot.press(key)
            await settle(pilot)
        assert pilot.app.query_one("#views").active == TABS[[k for k in VIEWS[view] if k.isdigit()][-1]]

    assert snap_compare(dualtui_app, terminal_size=SIZES[size], run_before=run_before)


TEXT_BUNDLE = Path("sample_runs") / "text-docstrings.safetensors"
TEXT_VIEWS = {
    "tests": ("2",),
    "spotlight": ("3",),
    "spotlight-by-token": ("3", "g", "g"),
    "tasks": ("5",),
}


@pytest.mark.parametrize("view", list(TEXT_VIEWS))
@pytest.mark.parametrize("size", list(SIZES))
def test_text_snapshot(snap_compare, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, size: str, view: str) -> None:
    """The language-model sample: contexts in the tests list, the test context with its
    prediction, training windows with the attended token and its target, per-token grouping."""
    monkeypatch.chdir(ROOT)
    _steady_rounding(monkeypatch)
    app = DualtuiApp(OpenRun(Bundle.open(TEXT_BUNDLE)), test=3, export_dir=tmp_path)

    async def run_before(pilot) -> None:
        await settle(pilot)
        for key in TEXT_VIEWS[view]:
            await pilot.press(key)
            await settle(pilot)
        assert pilot.app.query_one("#views").active == TABS[TEXT_VIEWS[view][0]]

    assert snap_compare(app, terminal_size=SIZES[size], run_before=run_before)
