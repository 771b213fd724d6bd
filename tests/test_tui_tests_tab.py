"""The Tests tab as a working list (issue 13): filter by task, correct/wrong, label and
prediction, sort by confidence or loss where the query set stores them; the order and the
rows shown are recomputed here from the bundle's arrays (safetensors' own reader)."""

from __future__ import annotations

import asyncio

import numpy as np
from safetensors.numpy import load_file
from textual.widgets import DataTable, Select

from test_tui_pilot import CONTINUAL, TEXT, new_app, settle


def _rows(app) -> list[int]:
    t = app.query_one("#tests-table", DataTable)
    return [int(t.coordinate_to_cell_key((i, 0)).row_key.value) for i in range(t.row_count)]


def test_sort_and_filter_match_the_stored_arrays():
    t = load_file(str(CONTINUAL))
    label, pred = t["queries/test/label"], t["queries/test/prediction"]
    prob, loss = t["queries/test/probability"], t["queries/test/loss"]

    async def go():
        app, run = new_app(CONTINUAL)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("2")
            await settle(pilot, app)
            assert _rows(app) == list(range(len(label)))
            sort = app.query_one("#sort", Select)
            for value, key in (("loss-high", -loss), ("confidence-low", prob), ("confidence-high", -prob)):
                sort.value = value
                await pilot.pause()
                idx = np.arange(len(label))
                assert _rows(app) == list(np.lexsort((idx, key))), value
            app.query_one("#filter-label", Select).value = 3
            await pilot.pause()
            shown = _rows(app)
            want = [int(i) for i in np.lexsort((np.arange(len(label)), -prob)) if label[i] == 3]
            assert shown == want and shown
            app.query_one("#filter-prediction", Select).value = 5
            app.query_one("#filter-correct", Select).value = False
            await pilot.pause()
            assert all(label[i] == 3 and pred[i] == 5 for i in _rows(app))
            table = app.query_one("#tests-table", DataTable)
            labels = [str(c.label) for c in table.ordered_columns]
            assert "conf" in labels and "loss" in labels and "task" in labels

    asyncio.run(go())


def test_a_single_corpus_text_run_gives_its_column_to_the_context():
    async def go():
        app, run = new_app(TEXT)
        async with app.run_test(size=(120, 40)) as pilot:
            await settle(pilot, app)
            await pilot.press("2")
            await settle(pilot, app)
            table = app.query_one("#tests-table", DataTable)
            labels = [str(c.label) for c in table.ordered_columns]
            assert "task" not in labels and "context" in labels  # one corpus: no task column, no task filter
            assert not app.query("#filter-task")
            context = table.get_row_at(0)[labels.index("context")]
            assert len(str(context)) >= run.context  # the whole window, not the ~9 characters it had beside a task column

    asyncio.run(go())
