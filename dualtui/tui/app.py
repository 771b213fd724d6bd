"""`dualtui open`: browse which training patterns a prediction leans on, layer by layer."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from ..engine.report import csv_text, ranking_dict
from ..engine.spotlight import Cancelled, Spotlight
from ..literal import literal
from .commands import DualtuiCommands
from .export import safe_name, write_new
from .help import HelpScreen
from .messages import ExampleChosen, TestChosen
from .model import OpenRun
from .panes.compare import ComparePane
from .panes.curve import CurvePane
from .panes.layers import LayersPane
from .panes.overview import OverviewPane
from .panes.spotlight import SpotlightPane
from .panes.runs import RunsPane
from .panes.tasks import TasksPane
from .panes.tests import TestsPane
from .state import ViewState

BY_ORDER = ("effect", "cosine", "attention", "magnitude")  # what `b` cycles through, from the default
VIEWS = ("overview", "tests", "spotlight", "layers", "tasks", "curve", "compare", "runs")
# Test items whose spotlights stay cached, so going back is instant.
CACHE_TESTS = 16


class DualtuiApp(App[None]):
    CSS_PATH = "dualtui.tcss"
    TITLE = "dualtui"
    COMMANDS = App.COMMANDS | {DualtuiCommands}
    BINDINGS = [
        Binding("q", "quit", "Quit", id="app.quit"),
        Binding("question_mark", "help", "Help", id="app.help"),
        Binding("1", "view('overview')", "Overview", show=False, id="view.overview"),
        Binding("2", "view('tests')", "Tests", show=False, id="view.tests"),
        Binding("3", "view('spotlight')", "Spotlight", show=False, id="view.spotlight"),
        Binding("4", "view('layers')", "Layers", show=False, id="view.layers"),
        Binding("5", "view('tasks')", "Tasks", show=False, id="view.tasks"),
        Binding("6", "view('curve')", "Curve", show=False, id="view.curve"),
        Binding("7", "view('compare')", "Compare", show=False, id="view.compare"),
        Binding("8", "view('runs')", "Runs", show=False, id="view.runs"),
        Binding("l", "toggle_log", "Log ranks", show=False, id="curve.log"),
        Binding("y", "toggle_per_group", "Per class", show=False, id="curve.groups"),
        Binding("c", "pin_other", "Compare", show=False, id="compare.pin"),
        Binding("number_sign", "jump", "Jump", show=False, id="tests.jump"),
        Binding("b", "cycle_by", "Score", id="spot.by"),
        Binding("g", "toggle_group", "Group", id="spot.group"),
        Binding("r", "toggle_reverse", "Reverse", id="spot.reverse"),
        Binding("left_square_bracket", "layer(-1)", "Layer−", id="spot.layer_prev", show=False),
        Binding("right_square_bracket", "layer(1)", "Layer", key_display="[ ]", id="spot.layer_next"),
        Binding("n", "step_test(1)", "Next", id="spot.next_test", show=False),
        Binding("p", "step_test(-1)", "Prev", id="spot.prev_test", show=False),
        # Not j: vim users move down with it (the tables take j / k as ↓ / ↑).
        Binding("x", "export('csv')", "CSV", id="export.csv", show=False),
        Binding("X", "export('json')", "JSON", id="export.json", show=False),
        Binding("s", "svg", "SVG", id="export.svg", show=False),
        Binding("Q", "next_queries", "Query set", id="queries.next", show=False),
    ]

    def __init__(self, run: OpenRun, *, test: int = 0, layer: str | None = None, view: str = "spotlight",
                 export_dir: Path | None = None, other: int | None = None, against=None):
        super().__init__()
        self.against = against  # a second run on the same data: tab 8 compares the two
        self.open_run = run  # not `self.run`: that would shadow App.run()
        self.test = test
        self.layer = layer or run.layers[-1]
        # Effect first: what each pattern did to this prediction (its sum is the learned part of
        # the logit at the last layer); raw attention favours large-norm inputs (README).
        self.by = BY_ORDER[0]
        self.group = "pattern"
        self.reverse = False
        self.per_group = False  # the Curve tab: the ranking's curve, or one per (task, class) (the paper's figure)
        self.log_rank = True  # the score curve: a few patterns carry most of it, so ranks read best on a log axis
        self.other = other  # the Compare tab's second item (c pins it)
        self._other_pending: tuple[str, int, str] | None = None
        self.start_view = view
        self.export_dir = export_dir or Path.cwd()
        self.exported: list[Path] = []  # every file this session wrote, in order
        self.results: dict[str, Spotlight] = {}
        self._cache: OrderedDict[tuple[str, int], dict[str, Spotlight]] = OrderedDict()  # (query set, item)
        self._generation = 0
        # The ranking takes the keyboard as soon as its rows arrive (arrows work at once).
        self.focus_ranking_pending = view == "spotlight"

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        from ..dual_form import label

        approximate = label(self.open_run.bundle.manifest)
        if approximate:  # on every tab: no number of this run is exact
            yield Static(approximate, id="approximate-banner", markup=False)
        with TabbedContent(initial=self.start_view, id="views"):
            with TabPane("1 Overview", id="overview"):
                yield OverviewPane(self.open_run, id="overview-pane")
            with TabPane("2 Tests", id="tests"):
                yield TestsPane(self.open_run, spotlit=self.test, id="tests-pane")
            with TabPane("3 Spotlight", id="spotlight"):
                yield SpotlightPane(self.open_run, id="spotlight-pane")
            with TabPane("4 Layers", id="layers"):
                yield LayersPane(self.open_run, id="layers-pane")
            with TabPane("5 Tasks & time", id="tasks"):
                yield TasksPane(self.open_run, id="tasks-pane")
            with TabPane("6 Curve", id="curve"):
                yield CurvePane(self.open_run, id="curve-pane")
            with TabPane("7 Compare", id="compare"):
                yield ComparePane(self.open_run, id="compare-pane")
            if self.against is not None:
                with TabPane("8 Runs", id="runs"):
                    yield RunsPane(self.open_run, self.against, id="runs-pane")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.open_run.bundle.path)
        self.compute()  # (its refresh starts the second item's spotlight too, with --compare)
        if self.start_view == "overview":
            self.query_one(OverviewPane).start_verify()

    # ------------------------------------------------------------------ state
    def set_state(self, **changes: object) -> None:
        """Change by / group / reverse / layer / test and refresh what depends on it."""
        test_changed = "test" in changes and changes["test"] != self.test
        for key, value in changes.items():
            setattr(self, key, value)
        if test_changed:
            self.query_one(TestsPane).highlight(self.test)  # the Tests tab follows the item being spotlit
            self.compute()
        elif "layer" in changes and self.layer not in self.results:
            self.compute()
        else:
            self.refresh_views()  # (it also starts the second item's spotlight at a new layer)

    @property
    def state(self) -> ViewState:
        other = self._cache.get((self.open_run.queries_name, self.other), {}) if self.other is not None else {}
        return ViewState(self.test, self.layer, self.by, self.group, self.reverse, self.results, other=self.other,
                         other_results=dict(other), log_rank=self.log_rank, per_group=self.per_group)

    def refresh_views(self) -> None:
        state = self.state
        if self.other is not None and self.layer not in state.other_results:
            self.compute_other()  # (its spotlight may have left the cache)
        for pane in (SpotlightPane, LayersPane, TasksPane, CurvePane, ComparePane):
            self.query_one(pane).update_view(state)
        if self.against is not None:
            self.query_one(RunsPane).update_view(state)
        table = self.query_one("#spot-table")
        if self.focus_ranking_pending and not table.loading:  # its rows have arrived: arrows work now
            self.focus_ranking_pending = False
            table.focus()

    def compute(self) -> None:
        """Spotlights for the current test item: the current layer first, then the others."""
        self._generation += 1
        cached = self._cache.get((self.open_run.queries_name, self.test))
        self.results = dict(cached) if cached else {}
        self.refresh_views()
        missing = [self.layer] + [L for L in self.open_run.layers if L != self.layer]
        missing = [L for L in missing if L not in self.results]
        if missing:
            self._compute_worker(self.test, missing, self._generation, self.open_run.queries_name)

    def compute_other(self) -> None:
        """The Compare tab's second item at the current layer (from the cache when it is there)."""
        want = (self.open_run.queries_name, self.other, self.layer)
        if self.other is None or self.layer in self._cache.get(want[:2], {}) or self._other_pending == want:
            return
        self._other_pending = want  # (a second call while it runs would cancel and restart it)
        self._other_worker(self.other, self.layer, self.open_run.queries_name)

    @work(thread=True, exclusive=True, group="compare", exit_on_error=False)
    def _other_worker(self, test: int, layer: str, queries: str) -> None:
        try:
            spot = self.open_run.compute(test, layer, cancel=lambda: get_current_worker().is_cancelled)
        except Cancelled:
            return
        except Exception as e:  # shown, never a crash
            self.call_from_thread(self.notify, f"spotlight of item {test} at {layer} failed: {e}", severity="error", timeout=10)
            return
        self.call_from_thread(self._other_ready, test, layer, spot, queries)

    def _other_ready(self, test: int, layer: str, spot: Spotlight, queries: str) -> None:
        self._other_pending = None
        self._cache.setdefault((queries, test), {})[layer] = spot
        if queries == self.open_run.queries_name:
            self.refresh_views()

    def action_pin_other(self) -> None:
        """c: the second item of the Compare tab (the highlighted row on the Tests tab, else the
        item being spotlit)."""
        m = self.test
        if self.query_one("#views", TabbedContent).active == "tests":
            row = self.query_one(TestsPane).highlighted()
            m = row if row is not None else m
        self.set_state(other=m)
        self.notify(f"item {m} pinned for the Compare tab (7); pick another item to compare it with", timeout=3)

    @work(thread=True, exclusive=True, group="spotlight", exit_on_error=False)
    def _compute_worker(self, test: int, layers: list[str], generation: int, queries: str) -> None:
        worker = get_current_worker()

        def stale() -> bool:  # the user moved on: stop between blocks
            return worker.is_cancelled or generation != self._generation

        for layer in layers:
            try:
                spot = self.open_run.compute(test, layer, cancel=stale)
            except Cancelled:
                return
            except Exception as e:  # shown, never a crash: the app stays usable
                self.call_from_thread(self.notify, f"spotlight of test {test} at {layer} failed: {e}", severity="error",
                                      timeout=10)
                return
            if stale():
                return
            self.call_from_thread(self._layer_ready, test, layer, spot, generation, queries)

    def _layer_ready(self, test: int, layer: str, spot: Spotlight, generation: int, queries: str) -> None:
        cached = self._cache.setdefault((queries, test), {})
        cached[layer] = spot
        self._cache.move_to_end((queries, test))
        while len(self._cache) > CACHE_TESTS:
            self._cache.popitem(last=False)
        if generation == self._generation and test == self.test and queries == self.open_run.queries_name:
            self.results[layer] = spot
            self.refresh_views()
        if len(cached) == len(self.open_run.layers):  # the first complete spotlight: now verify
            self.query_one(OverviewPane).start_verify()

    # ------------------------------------------------------------------ actions
    def action_view(self, view: str) -> None:
        if view == "runs" and self.against is None:
            self.notify("no second run: open with --against RUN_B (same data) to compare two runs", severity="warning")
            return
        self.query_one("#views", TabbedContent).active = view

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_views()  # panes size their bars to the width they now have
        if event.pane.id == "overview":
            self.query_one(OverviewPane).start_verify()
        self.focus_main(event.pane.id)

    # Each tab's main widget: the one the arrows, PgUp/PgDn and Home/End should move.
    MAIN_WIDGET = {"overview": "#overview-pane", "tests": "#tests-table", "spotlight": "#spot-table",
                   "layers": "#layers-pane", "tasks": "#tasks-pane", "curve": "#curve-pane", "compare": "#compare-pane"}

    def focus_main(self, view: str | None) -> None:
        target = self.query_one(self.MAIN_WIDGET.get(view or "", "#spot-table"))
        if view == "spotlight" and target.loading:  # a loading table cannot take focus: when its rows arrive
            self.focus_ranking_pending = True
            return
        target.focus()

    def action_cycle_by(self) -> None:
        self.set_state(by=BY_ORDER[(BY_ORDER.index(self.by) + 1) % len(BY_ORDER)])

    def action_toggle_group(self) -> None:
        groups = self.open_run.groups  # per pattern → per example (→ per training token, text runs)
        self.set_state(group=groups[(groups.index(self.group) + 1) % len(groups)])

    def action_toggle_log(self) -> None:
        self.set_state(log_rank=not self.log_rank)

    def action_toggle_per_group(self) -> None:
        self.set_state(per_group=not self.per_group)

    def action_toggle_reverse(self) -> None:
        self.set_state(reverse=not self.reverse)

    def action_layer(self, delta: int) -> None:
        layers = self.open_run.layers
        self.set_state(layer=layers[(layers.index(self.layer) + delta) % len(layers)])

    def action_step_test(self, delta: int) -> None:
        self.set_state(test=(self.test + delta) % self.open_run.test_size)

    def on_test_chosen(self, message: TestChosen) -> None:
        self.set_state(test=message.index)
        # Drop focus first: focus left on a widget of the hidden Tests tab would bring that tab back.
        self.screen.set_focus(None)
        self.action_view("spotlight")
        # A table still loading cannot take focus: the pane focuses it when its rows arrive.
        self.focus_ranking_pending = True
        self.call_after_refresh(self.refresh_views)

    def on_example_chosen(self, message: ExampleChosen) -> None:
        from .influence_screen import InfluenceScreen

        self.push_screen(InfluenceScreen(self.open_run, message.example, self.layer, self.by))

    def action_queries(self, name: str) -> None:
        """Browse another query set: its items become the Tests tab's list, from item 0."""
        if name == self.open_run.queries_name:
            return
        self.open_run.use_queries(name)
        self.other = None  # an index of the other query set
        self.test = -1  # force a recompute below
        self.query_one(TestsPane).fill()
        self.set_state(test=0)
        self.notify(f"query set {name!r}: {self.open_run.test_size:,} items")

    def action_next_queries(self) -> None:
        names = self.open_run.query_set_names
        if len(names) < 2:
            self.notify(f"this bundle has one query set ({names[0]!r})" if names else "this bundle has no query sets")
            return
        self.action_queries(names[(names.index(self.open_run.queries_name) + 1) % len(names)])

    def action_jump(self) -> None:
        self.action_view("tests")
        self.call_after_refresh(self.query_one("#jump").focus)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def export_path(self, ext: str) -> Path:
        """Where an export of the current ranking goes (the file actually written gets -2, -3,
        ... when that name is taken: see `exported`)."""
        qs = self.open_run.queries_name
        item = f"test{self.test}" if qs == "test" else f"{qs}{self.test}"
        stem = f"dualtui-{item}-{self.layer}-{self.by}-{self.group}{'-reverse' if self.reverse else ''}"
        return self.export_dir / safe_name(stem, ext)

    def _wrote(self, path: Path) -> None:
        self.exported.append(path)
        self.notify(f"wrote {literal(str(path))}", markup=False)

    def action_export(self, fmt: str) -> None:
        spot = self.results.get(self.layer)
        if spot is None:
            self.notify("the spotlight is still being computed", severity="warning")
            return
        d = ranking_dict(self.open_run.bundle, spot, self.by, self.group, self.reverse, self.open_run.queries_name)
        path = self.export_path(fmt)
        try:
            path = write_new(self.export_dir, path.name,
                             json.dumps(d, indent=2) + "\n" if fmt == "json" else csv_text(d["results"]))
        except OSError as e:
            self.notify(f"could not write {literal(str(path))}: {e.strerror or e}", severity="error", markup=False)
            return
        self._wrote(path)

    def action_svg(self) -> None:
        qs = self.open_run.queries_name
        item = f"test{self.test}" if qs == "test" else f"{qs}{self.test}"
        name = safe_name(f"dualtui-{item}-{self.layer}-screen", "svg")
        try:
            path = write_new(self.export_dir, name, self.export_screenshot())
        except OSError as e:
            self.notify(f"could not save the screenshot in {literal(str(self.export_dir))}: {e.strerror or e}",
                        severity="error", markup=False)
            return
        self._wrote(path)


def run_app(bundle_path: Path, test: int = 0, layer: str | None = None) -> None:
    from ..bundle import Bundle

    app = DualtuiApp(OpenRun(Bundle.open(bundle_path)), test=test, layer=layer)
    app.run()
