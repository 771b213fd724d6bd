"""`dualtui open` (the Textual app), measured in-process with `app.run_test(size=(120, 40))`.

    python benchmarks/bench_tui.py [--reps 3] [--switches 20] [--key-presses 12]
                                   [--patterns 1e6] [--width 128] [--skip-synthetic] [--tmp DIR]
                                   [--bundle sample_runs/digits-continual.safetensors]
                                   [--json benchmarks/out/tui.json]

On the digits sample and on a synthetic bundle of `--patterns` patterns (written to a temporary
directory with benchmarks/synthetic.py; one linear layer "fc" of width `--width`, no inputs):

1. Engine: `OpenRun.compute(test, layer)` (the very `spotlights(...)` call the app's worker
   makes) called directly on the main thread, per layer, so the UI's overhead is visible.
2. Start-up: from constructing (Bundle.open + OpenRun + DualtuiApp) and from entering
   `run_test` until `app.results` holds the starting layer and `#spot-table` shows its ranking
   (`ranked_rows` is that spotlight's ranking and the table has the rows); then until every
   layer is computed.
3. Switching test item (`n`): from the key press until `app.test` is the new item, `app.results`
   holds the current layer for it and the table shows that spotlight's ranking. "idle": pressed
   once every worker is done (every switch goes to a never-computed item); "busy" (bundles with
   several layers): pressed as soon as the current layer shows, while the previous item's other
   layers are still being computed. Also back to a cached item (`p`), score (`b`) and grouping
   (`g`), which must not start an engine pass (counted).
4. Responsiveness: while the worker computes (the synthetic bundle, after switching to a new
   item; and at start-up, where the Overview pane's verify worker runs too), press `2` then `3`
   and time until `TabbedContent.active` changes; plus the event loop's worst lag meanwhile.
5. Where the main thread's time goes: refresh_views, each pane's update_view, a table fill and
   the side panel's across_layers called directly, split into the call, processing the messages
   it queues and the repaint.

How: keys are sent with `pilot.press` in a separate task while this coroutine polls the state
with `await pilot.pause(0.01)` ("polled"). Not awaiting the press first matters: `pilot.press`
ends with Textual's `wait_for_idle`, which waits until the *process* stops using CPU (up to 1 s,
twice), so with a worker computing `await pilot.press(...)` returns long after the app has
reacted (shown as "`await pilot.press` returned"). Each `pilot.pause` also posts a callback to
every widget and repaints the screen, which costs the main thread ~4 ms per poll and slows the
worker; so test switches alternate with a "light poll" (a bare `asyncio.sleep(0.01)`, closer to
a terminal nobody polls). "exact" times come from wrappers this process puts around
`RankingTable.show` and `DualtuiApp.action_view` (timestamp when they return: the rows / the
tab are set, before Textual lays them out and repaints); `OpenRun.compute` is wrapped on the
instance to count and time engine passes. The app's code is not changed. A diagnostic start-up
run stubs out the Overview pane's verify worker to show its share of the start-up time.

Every measurement is repeated `--reps` times, each with a fresh app; the table gives medians
(p90 over all samples). On a 2-core machine anything else running shows up: the JSON records
the load average before and after each bundle, and the raw samples.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import textual
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic  # noqa: E402

from dualtui.bundle import Bundle  # noqa: E402
from dualtui.tui.app import DualtuiApp  # noqa: E402
from dualtui.tui.model import OpenRun  # noqa: E402
from dualtui.tui.panes.layers import LayersPane  # noqa: E402
from dualtui.tui.panes.overview import OverviewPane  # noqa: E402
from dualtui.tui.panes.spotlight import SpotlightPane  # noqa: E402
from dualtui.tui.panes.tasks import TasksPane  # noqa: E402
from dualtui.tui.widgets.ranking_table import RankingTable  # noqa: E402
from textual.widgets import TabbedContent  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = (120, 40)
POLL = 0.01
TIMEOUT = 120.0
perf = time.perf_counter

# ----------------------------------------------------------------------------- instrumentation
# Class-level wrappers (this process only): timestamps of table fills and view switches.
SHOWS: list[tuple[float, int]] = []  # (time show() returned, id(rows))
VIEWS: list[tuple[float, str]] = []  # (time action_view returned, view)

_orig_show = RankingTable.show
_orig_action_view = DualtuiApp.action_view
_orig_verify = OverviewPane.verify


@functools.wraps(_orig_show)
def _show(self, rows, group):
    _orig_show(self, rows, group)
    SHOWS.append((perf(), id(rows)))


@functools.wraps(_orig_action_view)
def _action_view(self, view):
    _orig_action_view(self, view)
    VIEWS.append((perf(), view))


RankingTable.show = _show
DualtuiApp.action_view = _action_view


class Counting:
    """Wraps `run.compute` on one OpenRun instance: engine passes started / in flight."""

    def __init__(self, run: OpenRun):
        self.orig = run.compute
        self.calls = 0
        self.in_flight = 0
        self.durations: list[float] = []
        run.compute = self  # type: ignore[method-assign]

    def __call__(self, test, layer, cancel=None):
        self.calls += 1
        self.in_flight += 1
        t = perf()
        try:
            return self.orig(test, layer, cancel=cancel)
        finally:
            self.durations.append(perf() - t)
            self.in_flight -= 1


# ----------------------------------------------------------------------------- helpers
def med(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def p90(xs: list[float]) -> float | None:
    return float(np.percentile(xs, 90)) if xs else None


async def wait_until(pilot, cond: Callable[[], bool], what: str, timeout: float = TIMEOUT, light: bool = False) -> float:
    """Poll `cond` every POLL s with `pilot.pause` (or, light=True, a bare asyncio.sleep, which
    neither walks the widgets nor forces a repaint: closer to an unobserved terminal)."""
    end = perf() + timeout
    while not cond():
        if perf() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        if light:
            await asyncio.sleep(POLL)
        else:
            await pilot.pause(POLL)
    return perf()


def expected_rows(app: DualtuiApp):
    spot = app.results.get(app.layer)
    return None if spot is None else spot.ranked[(app.by, app.group, app.reverse)]


def table_shows_current(app: DualtuiApp) -> bool:
    rows = expected_rows(app)
    table = app.query_one("#spot-table", RankingTable)
    return rows is not None and len(rows) > 0 and table.ranked_rows is rows and table.row_count == len(rows)


def shown_at(rows, after: float) -> float | None:
    """When `RankingTable.show` first returned with exactly these rows at or after `after`."""
    for t, rid in SHOWS:
        if t >= after and rid == id(rows):
            return t
    return None


def open_run(app: DualtuiApp) -> OpenRun:
    """The app's OpenRun (`app.open_run`; older versions kept it on `app.run`)."""
    r = getattr(app, "open_run", None)
    return r if isinstance(r, OpenRun) else app.run  # type: ignore[return-value]


def workers_busy(app: DualtuiApp, counter: Counting) -> bool:
    return counter.in_flight > 0 or any(not w.is_finished for w in app.workers)


async def wait_idle(pilot, app: DualtuiApp, counter: Counting) -> None:
    await wait_until(pilot, lambda: set(app.results) >= set(open_run(app).layers) and table_shows_current(app)
                     and not workers_busy(app, counter), "every layer computed and no worker running")
    await pilot.pause(0.05)


async def press_and_wait(pilot, key: str, cond: Callable[[], bool], what: str, light: bool = False) -> dict:
    """Press `key` in a separate task and poll `cond`; returns timings from the press, and the
    main thread's CPU time until `cond` held."""
    c0 = time.thread_time()
    t0 = perf()
    task = asyncio.create_task(pilot.press(key))
    t_cond = await wait_until(pilot, cond, what, light=light)
    main_cpu = time.thread_time() - c0
    await pilot.pause(0)  # messages queued by the change (RowSelected -> side panel) processed
    t_settled = perf()
    await task
    return {"t0": t0, "polled": t_cond - t0, "settled": t_settled - t0, "press_returned": perf() - t0,
            "main_thread_cpu": main_cpu}


# ----------------------------------------------------------------------------- measurements
def engine_direct(path: Path, tests: list[int], reps: int) -> dict:
    """`OpenRun.compute` on the main thread, no app: first call per layer, then `reps` rounds
    over `tests` (layers interleaved), medians per layer."""
    run = OpenRun(Bundle.open(path))
    first = {}
    for L in run.layers:
        t = perf()
        run.compute(tests[0], L)
        first[L] = perf() - t
    times: dict[str, list[float]] = {L: [] for L in run.layers}
    for _ in range(reps):
        for m in tests:
            for L in run.layers:
                t = perf()
                run.compute(m, L)
                times[L].append(perf() - t)
    out: dict = {"per_layer": {L: {"first_call_s": first[L], "median_s": med(v), "p90_s": p90(v), "n": len(v)}
                               for L, v in times.items()}}
    out["all_layers_median_s"] = sum(d["median_s"] for d in out["per_layer"].values())
    return out


async def session(path: Path, switches: int, first_test: int, reps_keys: int, do_busy: bool,
                  do_responsive: bool, stub_verify: bool = False, startup_only: bool = False) -> dict:
    """One app, start to finish: start-up, then (unless startup_only) the interaction tests."""
    OverviewPane.verify = (lambda self: None) if stub_verify else _orig_verify
    r: dict = {}
    t_c0 = perf()
    bundle = Bundle.open(path)
    r["bundle_open_s"] = perf() - t_c0
    run = OpenRun(bundle)
    counter = Counting(run)
    app = DualtuiApp(run, test=first_test)
    t_enter = perf()
    r["construct_s"] = t_enter - t_c0
    async with app.run_test(size=SIZE) as pilot:
        t_body = perf()
        r["run_test_ready_s"] = t_body - t_enter
        r["results_at_ready"] = sorted(app.results)
        start_layer = app.layer
        t_first = await wait_until(pilot, lambda: start_layer in app.results and table_shows_current(app),
                                   "the first spotlight in the table")
        exact = shown_at(expected_rows(app), t_enter)
        r["first_from_enter_s"] = t_first - t_enter
        r["first_from_construct_s"] = t_first - t_c0
        r["first_exact_from_enter_s"] = (exact - t_enter) if exact else None
        t_all = await wait_until(pilot, lambda: set(app.results) >= set(run.layers), "every layer")
        r["all_from_enter_s"] = t_all - t_enter
        r["all_from_construct_s"] = t_all - t_c0
        r["engine_passes_startup"] = list(counter.durations)
        if startup_only:
            return r
        await wait_idle(pilot, app, counter)
        r["idle_after_startup_s"] = perf() - t_enter

        # -- switching test item, idle
        def new_test_shown(target: int) -> Callable[[], bool]:
            return lambda: app.test == target and table_shows_current(app)

        # alternating: polled with pilot.pause(0.01) (as specified) / with a bare asyncio.sleep(0.01)
        idle, light = [], []
        for i in range(2 * switches):
            target = (app.test + 1) % run.test_size
            n0 = len(counter.durations)
            d = await press_and_wait(pilot, "n", new_test_shown(target), f"test {target}", light=bool(i % 2))
            t0 = d.pop("t0")
            d["exact"] = shown_at(expected_rows(app), t0) - t0
            d["engine_s"] = counter.durations[n0] if len(counter.durations) > n0 else None
            (light if i % 2 else idle).append(d)
            await wait_idle(pilot, app, counter)
            # the same engine pass called directly right away (main thread, app idle): paired
            t = perf()
            counter.orig(target, app.layer)
            d["engine_direct_s"] = perf() - t
            await pilot.pause(0.02)
        r["switch_test_idle"] = idle
        r["switch_test_idle_light"] = light

        # -- back to a cached item (p): no engine pass expected
        cached = []
        for _ in range(min(5, switches)):
            target = (app.test - 1) % run.test_size
            n0 = counter.calls
            d = await press_and_wait(pilot, "p", new_test_shown(target), f"cached test {target}")
            t0 = d.pop("t0")
            d["exact"] = shown_at(expected_rows(app), t0) - t0
            d["engine_passes"] = counter.calls - n0
            cached.append(d)
            await wait_idle(pilot, app, counter)
        r["switch_test_cached"] = cached

        # -- switching test item while the previous item's other layers compute
        if do_busy:
            busy, tasks = [], []
            await wait_idle(pilot, app, counter)
            # fresh items: jump past everything cached so far
            app.set_state(test=(app.test + switches + 10) % run.test_size)
            await wait_until(pilot, lambda: table_shows_current(app), "jump")
            for _ in range(switches):
                target = (app.test + 1) % run.test_size
                others_pending = len(set(run.layers) - set(app.results))
                t0 = perf()
                tasks.append(asyncio.create_task(pilot.press("n")))
                t = await wait_until(pilot, new_test_shown(target), f"test {target}")
                busy.append({"polled": t - t0, "exact": shown_at(expected_rows(app), t0) - t0,
                             "layers_pending_at_press": others_pending})
            await asyncio.gather(*tasks)
            await wait_idle(pilot, app, counter)
            r["switch_test_busy"] = busy

        # -- score (b) and grouping (g): re-rank what is there, no engine pass
        for key, attr, name in (("b", "by", "switch_score"), ("g", "group", "switch_group")):
            res = []
            for _ in range(reps_keys):
                before = getattr(app, attr)
                n0 = counter.calls
                d = await press_and_wait(pilot, key, lambda: getattr(app, attr) != before and table_shows_current(app),
                                         f"{attr} change")
                t0 = d.pop("t0")
                d["exact"] = shown_at(expected_rows(app), t0) - t0
                d["engine_passes"] = counter.calls - n0
                res.append(d)
                await wait_idle(pilot, app, counter)
            r[name] = res
        # back to attention / pattern
        app.set_state(by="attention", group="pattern")
        await wait_idle(pilot, app, counter)

        # -- tab switch while idle (baseline for the responsiveness test)
        tabs = app.query_one(TabbedContent)
        r["tab_idle"] = [await tab_pair(pilot, tabs) for _ in range(reps_keys // 2 or 1)]
        await wait_idle(pilot, app, counter)

        # -- tab switch while the worker computes (a never-visited test item, from the end)
        if do_responsive:
            resp = []
            for k in range(max(3, reps_keys // 4)):
                target = run.test_size - 1 - k
                n0 = counter.calls
                t0 = perf()
                app.set_state(test=target)  # what n / Enter in the test list do: starts the worker
                await wait_until(pilot, lambda: counter.calls > n0, "the worker to start")
                lag = LoopLag()
                lag.start()
                pair = await tab_pair(pilot, tabs, counter)
                await wait_until(pilot, new_test_shown(target), f"test {target}")
                pair["switch_total"] = perf() - t0
                pair.update(lag.stop())
                resp.append(pair)
                await wait_idle(pilot, app, counter)
            r["tab_during_compute"] = resp

        # -- where the time goes on the main thread (called directly, idle)
        r["direct"] = await direct_costs(pilot, app)
        r["engine_passes_total"] = counter.calls
    return r


async def tab_pair(pilot, tabs: TabbedContent, counter: Counting | None = None) -> dict:
    """Press 2 (tests) then 3 (spotlight); time until TabbedContent.active changes."""
    out = {}
    pending = []
    for key, view in (("2", "tests"), ("3", "spotlight")):
        t0 = perf()
        pending.append(asyncio.create_task(pilot.press(key)))
        t = await wait_until(pilot, lambda: tabs.active == view, f"tab {view}")
        exact = next((tv for tv, v in VIEWS if v == view and tv >= t0), None)
        out[f"{key}_polled"] = t - t0
        out[f"{key}_exact"] = exact - t0 if exact else None
        if counter is not None:
            out[f"{key}_engine_still_running"] = counter.in_flight > 0
    t = perf()
    await asyncio.gather(*pending)
    out["pilot_press_extra_wait"] = perf() - t
    return out


class LoopLag:
    """Worst lateness of a 5 ms asyncio sleep on the app's event loop while it runs."""

    def __init__(self):
        self.lags: list[float] = []
        self._task = None
        self._stop = False

    def start(self):
        async def beat():
            while not self._stop:
                t = perf()
                await asyncio.sleep(0.005)
                self.lags.append(perf() - t - 0.005)
        self._task = asyncio.get_running_loop().create_task(beat())

    def stop(self) -> dict:
        self._stop = True
        return {"loop_lag_max": max(self.lags) if self.lags else None,
                "loop_lag_p99": float(np.percentile(self.lags, 99)) if self.lags else None,
                "loop_beats": len(self.lags)}


async def direct_costs(pilot, app: DualtuiApp, n: int = 8) -> dict:
    """Main-thread cost of what follows a table fill, split into the call itself, processing
    the messages it queues (DataTable re-measuring, RowSelected -> side panel) and the repaint
    (Textual's private `_wait_for_screen` / `screen._on_timer_update`, benchmark only)."""
    table = app.query_one("#spot-table", RankingTable)
    rows = expected_rows(app)
    row = table.selected
    calls = {
        "nothing (poll baseline)": lambda: None,
        "app.refresh_views (after each layer arrives)": app.refresh_views,
        "SpotlightPane.update_view": lambda: app.query_one(SpotlightPane).update_view(app),
        "LayersPane.update_view (hidden)": lambda: app.query_one(LayersPane).update_view(app),
        "TasksPane.update_view (hidden)": lambda: app.query_one(TasksPane).update_view(app),
        "RankingTable.show (100 rows)": lambda: table.show(rows, app.group),
        "OpenRun.across_layers (side panel)": lambda: open_run(app).across_layers(app.test, row, app.group, app.results),
    }
    out = {}
    for name, fn in calls.items():
        parts = []
        for _ in range(n):
            await pilot._wait_for_screen()
            t0 = perf()
            fn()
            t1 = perf()
            await pilot._wait_for_screen()
            t2 = perf()
            app.screen._on_timer_update()
            t3 = perf()
            parts.append((t1 - t0, t2 - t1, t3 - t2))
            await asyncio.sleep(0.02)
        out[name] = {k: med([p[i] for p in parts]) for i, k in enumerate(("call_s", "messages_s", "repaint_s"))}
    return out


# ----------------------------------------------------------------------------- report
def pool(sessions: list[dict], key: str, field: str) -> list[float]:
    return [d[field] for s in sessions for d in s.get(key, []) if d.get(field) is not None]


def summarize(name: str, path: Path, eng: dict, sessions: list[dict], stubbed: list[dict], startup_resp: list[dict]) -> dict:
    s: dict = {"bundle": name, "path": str(path), "engine": eng}
    for k in ("bundle_open_s", "construct_s", "run_test_ready_s", "first_from_enter_s", "first_from_construct_s",
              "first_exact_from_enter_s", "all_from_enter_s", "all_from_construct_s"):
        vals = [x[k] for x in sessions if x.get(k) is not None]
        s[k] = {"median": med(vals), "all": vals}
        if stubbed:
            vals = [x[k] for x in stubbed if x.get(k) is not None]
            s.setdefault("startup_verify_stubbed", {})[k] = {"median": med(vals), "all": vals}
    for key in ("switch_test_idle", "switch_test_idle_light", "switch_test_busy", "switch_test_cached", "switch_score", "switch_group"):
        if not any(key in x for x in sessions):
            continue
        d = {}
        for field in ("polled", "exact", "settled", "press_returned", "engine_s", "engine_direct_s", "main_thread_cpu"):
            vals = pool(sessions, key, field)
            if vals:
                d[field] = {"median": med(vals), "p90": p90(vals), "n": len(vals),
                            "per_rep_median": [med([e[field] for e in x.get(key, []) if e.get(field) is not None])
                                               for x in sessions]}
        if key in ("switch_test_cached", "switch_score", "switch_group"):
            d["engine_passes"] = sum(pool(sessions, key, "engine_passes"))
        s[key] = d
    for key, src in (("tab_idle", sessions), ("tab_during_compute", sessions), ("tab_at_startup", startup_resp)):
        vals = [e for x in src for e in x.get(key, [])]
        if not vals:
            continue
        d = {"n": len(vals)}
        for field in ("2_polled", "2_exact", "3_polled", "3_exact", "pilot_press_extra_wait", "loop_lag_max",
                      "switch_total"):
            v = [e[field] for e in vals if e.get(field) is not None]
            if v:
                d[field] = {"median": med(v), "max": max(v)}
        for field in ("2_engine_still_running", "3_engine_still_running"):
            v = [e[field] for e in vals if field in e]
            if v:
                d[field] = f"{sum(v)}/{len(v)}"
        s[key] = d
    direct = [x["direct"] for x in sessions if "direct" in x]
    if direct:
        s["direct"] = {k: {f: med([d[k][f] for d in direct]) for f in direct[0][k]} for k in direct[0]}
    for key in ("switch_test_idle", "switch_test_idle_light"):
        pairs = [(d["engine_s"], d["engine_direct_s"]) for x in sessions for d in x.get(key, [])
                 if d.get("engine_s") and d.get("engine_direct_s")]
        if pairs:
            s[key]["engine_in_app_over_direct"] = med([a / b for a, b in pairs])
    return s


def ms(x: float | None) -> str:
    return "—" if x is None else (f"{x * 1e3:,.0f} ms" if x >= 0.1 else f"{x * 1e3:.1f} ms")


def print_summary(s: dict) -> None:
    la = s.get("loadavg_before_after")
    print(f"\n### {s['bundle']}" + (f"   (1-min load average {la[0][0]:.1f} before, {la[1][0]:.1f} after)" if la else ""))
    rows: list[tuple[str, str, str]] = []
    for L, d in s["engine"]["per_layer"].items():
        rows.append((f"engine OpenRun.compute, layer {L}, no app (first call {ms(d['first_call_s'])})", ms(d["median_s"]),
                     ms(d["p90_s"])))
    rows.append(("engine, all layers (sum of medians)", ms(s["engine"]["all_layers_median_s"]), ""))
    rows.append(("Bundle.open", ms(s["bundle_open_s"]["median"]), ""))
    rows.append(("run_test ready (enter → body)", ms(s["run_test_ready_s"]["median"]), ""))
    rows.append(("first spotlight, from entering run_test (polled)", ms(s["first_from_enter_s"]["median"]),
                 "exact " + ms(s["first_exact_from_enter_s"]["median"])))
    rows.append(("first spotlight, from constructing (Bundle.open…)", ms(s["first_from_construct_s"]["median"]), ""))
    rows.append(("all layers, from entering run_test", ms(s["all_from_enter_s"]["median"]), ""))
    rows.append(("all layers, from constructing", ms(s["all_from_construct_s"]["median"]), ""))
    if "startup_verify_stubbed" in s:
        v = s["startup_verify_stubbed"]
        rows.append(("  diagnostic, verify worker stubbed: first / all from enter",
                     ms(v["first_from_enter_s"]["median"]), ms(v["all_from_enter_s"]["median"])))
    labels = {"switch_test_idle": "switch test (n), idle",
              "switch_test_idle_light": "switch test (n), idle, light poll (asyncio.sleep)", "switch_test_busy": "switch test (n), other layers computing",
              "switch_test_cached": "back to a cached test (p)", "switch_score": "switch score (b)",
              "switch_group": "switch grouping (g)"}
    for key, label in labels.items():
        if key not in s:
            continue
        d = s[key]
        extra = f"  [engine passes: {d['engine_passes']}]" if "engine_passes" in d else ""
        rows.append((f"{label}: polled median (p90)", ms(d["polled"]["median"]), ms(d["polled"]["p90"]) + extra))
        rows.append((f"  exact (table.show returned) median (p90)", ms(d["exact"]["median"]), ms(d["exact"]["p90"])))
        if "engine_s" in d:
            rows.append(("  the engine pass inside the app (worker thread), median (p90)", ms(d["engine_s"]["median"]),
                         ms(d["engine_s"]["p90"])))
            if "engine_direct_s" in d:
                rows.append(("  the same pass called directly right after, median (p90)", ms(d["engine_direct_s"]["median"]),
                             ms(d["engine_direct_s"]["p90"]) + f"  [in app ÷ direct, paired: {d['engine_in_app_over_direct']:.2f}×]"))
        if "main_thread_cpu" in d and key.startswith("switch_test_idle"):
            rows.append(("  main-thread CPU until then (median)", ms(d["main_thread_cpu"]["median"]), ""))
        if "press_returned" in d:
            rows.append(("  `await pilot.press` returned after (median)", ms(d["press_returned"]["median"]), ""))
    for key, label in (("tab_idle", "tab 2 / 3, idle"), ("tab_during_compute", "tab 2 / 3 while the engine computes"),
                       ("tab_at_startup", "tab 2 / 3 at start-up (spotlight + verify running)")):
        if key not in s:
            continue
        d = s[key]
        still = f"  [engine still running: {d.get('2_engine_still_running', '')}, {d.get('3_engine_still_running', '')}]" \
            if "2_engine_still_running" in d else ""
        rows.append((f"{label}: polled median (max)", f"{ms(d['2_polled']['median'])} / {ms(d['3_polled']['median'])}",
                     f"({ms(d['2_polled']['max'])} / {ms(d['3_polled']['max'])}){still}"))
        rows.append(("  exact (action_view returned) median", f"{ms(d['2_exact']['median'])} / {ms(d['3_exact']['median'])}", ""))
        if "loop_lag_max" in d:
            rows.append(("  event-loop lag during the pass: median of max (worst)", ms(d["loop_lag_max"]["median"]),
                         ms(d["loop_lag_max"]["max"])))
    if "direct" in s:
        rows.append(("main thread, called directly (idle): call + its messages + repaint", "", ""))
        for k, v in s["direct"].items():
            rows.append((f"  {k}", ms(v["call_s"] + v["messages_s"] + v["repaint_s"]),
                         f"= {ms(v['call_s'])} + {ms(v['messages_s'])} + {ms(v['repaint_s'])}"))
    w = max(len(r[0]) for r in rows)
    for a, b, c in rows:
        print(f"  {a:<{w}}  {b:>16}  {c}")


# ----------------------------------------------------------------------------- main
def run_bundle(name: str, path: Path, args, tests_available: int) -> dict:
    print(f"## {name}: {path}", flush=True)
    switches = args.switches
    multi = len(Bundle.open(path).manifest.layer_names) > 1
    load_before = os.getloadavg()
    eng = engine_direct(path, list(range(1, min(5, tests_available - 1) + 1)), reps=args.reps)
    print(f"  engine: " + ", ".join(f"{L} {ms(d['median_s'])}" for L, d in eng["per_layer"].items()), flush=True)
    # a tab switch "during a computation" needs a pass long enough to press keys in
    responsive = eng["per_layer"][Bundle.open(path).manifest.layer_names[-1]]["median_s"] > 0.1
    sessions, stubbed, startup_resp = [], [], []
    for rep in range(args.reps):
        s = asyncio.run(session(path, switches, first_test=0, reps_keys=args.key_presses, do_busy=multi,
                                do_responsive=responsive))
        sessions.append(s)
        print(f"  rep {rep + 1}: first {ms(s['first_from_enter_s'])} (from construct {ms(s['first_from_construct_s'])}), "
              f"all {ms(s['all_from_enter_s'])}; switch n median {ms(med(pool([s], 'switch_test_idle', 'polled')))}; "
              f"b {ms(med(pool([s], 'switch_score', 'polled')))}; g {ms(med(pool([s], 'switch_group', 'polled')))}",
              flush=True)
    for rep in range(args.reps):
        s = asyncio.run(session(path, switches, 0, args.key_presses, False, False, stub_verify=True, startup_only=True))
        stubbed.append(s)
        s2 = asyncio.run(startup_responsiveness(path))
        startup_resp.append(s2)
        print(f"  diag rep {rep + 1}: verify stubbed: first {ms(s['first_from_enter_s'])}, all {ms(s['all_from_enter_s'])}; "
              f"tab 2/3 at start-up {ms(s2['tab_at_startup'][0]['2_polled'])} / {ms(s2['tab_at_startup'][0]['3_polled'])}",
              flush=True)
    OverviewPane.verify = _orig_verify
    out = summarize(name, path, eng, sessions, stubbed, startup_resp)
    out["loadavg_before_after"] = [load_before, os.getloadavg()]
    out["raw"] = {"sessions": sessions, "verify_stubbed": stubbed, "startup_responsiveness": startup_resp}
    return out


async def startup_responsiveness(path: Path) -> dict:
    """Press 2 / 3 right after run_test is ready, while the first spotlight (and verify) run."""
    OverviewPane.verify = _orig_verify
    run = OpenRun(Bundle.open(path))
    counter = Counting(run)
    app = DualtuiApp(run)
    async with app.run_test(size=SIZE) as pilot:
        tabs = app.query_one(TabbedContent)
        computing = app.layer not in app.results
        lag = LoopLag()
        lag.start()
        pair = await tab_pair(pilot, tabs, counter)
        pair["first_still_computing_at_ready"] = computing
        await wait_until(pilot, lambda: set(app.results) >= set(run.layers), "every layer")
        pair.update(lag.stop())
        await wait_idle(pilot, app, counter)
    return {"tab_at_startup": [pair]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=ROOT / "sample_runs" / "digits-continual.safetensors")
    ap.add_argument("--patterns", type=float, default=1e6, help="synthetic bundle size (patterns)")
    ap.add_argument("--width", type=int, default=128, help="synthetic key width (in_features)")
    ap.add_argument("--reps", type=int, default=3, help="fresh apps per bundle (medians over them)")
    ap.add_argument("--switches", type=int, default=20, help="test switches per app")
    ap.add_argument("--key-presses", type=int, default=12, help="presses of b and of g per app")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--tmp", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "out" / "tui.json")
    args = ap.parse_args()
    try:  # read-only: which app code was measured
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "dualtui"], cwd=ROOT, capture_output=True,
                                    text=True).stdout.strip())
    except OSError:
        commit, dirty = "", False
    results = {"date": datetime.date.today().isoformat(), "commit": commit, "dualtui_modified": dirty, "cpus": os.cpu_count(), "torch": torch.__version__,
               "torch_threads": torch.get_num_threads(), "textual": textual.__version__, "size": SIZE,
               "reps": args.reps, "switches": args.switches, "bundles": []}
    b = Bundle.open(args.bundle)
    results["bundles"].append(run_bundle(args.bundle.stem, args.bundle, args, b.test_size))
    if not args.skip_synthetic:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            n = int(args.patterns)
            n_tests = 3 * args.switches + 32  # every switch measured goes to a never-computed item
            path = Path(d) / f"synthetic-{n}.safetensors"
            t = perf()
            write_synthetic(path, n, in_features=args.width, tests=n_tests)
            print(f"wrote {path} ({path.stat().st_size / 1e6:,.0f} MB) in {perf() - t:.1f} s", flush=True)
            results["bundles"].append(run_bundle(f"synthetic {n:,} × {args.width}", path, args, n_tests))
    print(f"\ncommit {commit}{' (dualtui/ modified)' if dirty else ''}, {results['cpus']} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), textual {textual.__version__}")
    for s in results["bundles"]:
        print_summary(s)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
