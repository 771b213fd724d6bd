"""Run overview: the manifest at a glance, and `verify` per layer computed in a worker."""

from __future__ import annotations

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, ProgressBar, Static
from textual.worker import get_current_worker

from ... import dual_form
from ...literal import literal
from ..model import OpenRun
from ..render import plain

from ...units import DTYPE_NAMES as _DT
from ...units import human_bytes as _size


def _short(v: object) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class OverviewPane(VerticalScroll):
    def __init__(self, run: OpenRun, **kw):
        super().__init__(**kw)
        self.run = run
        self.verify_started = False

    def compose(self) -> ComposeResult:
        yield Static(id="overview-text")
        yield DataTable(id="overview-layers", cursor_type="row")
        yield ProgressBar(id="verify-progress", total=len(self.run.layers), show_eta=False)
        yield Static(id="verify-status")

    def on_mount(self) -> None:
        b = self.run.bundle
        m = b.manifest
        t = Text()

        def add(text: str, style: str | None = None) -> None:
            # everything here may come from the bundle: shown as literal characters, never sent raw
            t.append(literal(text, keep_lines=True), style=style)

        add(f"{b.path}", style="bold")
        add(f"   format v{m.version} · {_size(b.size_bytes)}" + (f" in {len(b.files)} shards" if b.sharded else "") + "\n")
        add(f"train examples {b.train_size:,} · input {self.run.input_kind}\n")
        if m.approximate:  # before anything else the run says: its scores are not exact
            add(dual_form.label(m) + "\n", style="bold yellow")
        add("query sets: ", style="bold")
        add(", ".join(f"{n} ({b.queries(n).size:,} items)" for n in b.query_set_names) or "none")
        add("\n")
        a = m.attribution
        add("attribution: ", style="bold")
        if a is None:
            add("not checked (recorded before the check existed, format v1)\n")
        elif a.get("checked"):
            add(f"example ids checked at {len(a.get('steps', []))} steps, max relative error "
                     f"{a.get('max_relative_error', 0.0):.1e}\n")
        else:
            add(f"not checked ({a.get('reason', '')})\n")
        add(f"tasks ({len(m.tasks)}): ", style="bold")
        add(", ".join(m.tasks) + "\n")
        add(f"classes ({len(m.classes)}): ", style="bold")
        names = [self.run.class_name(i) for i in range(min(24, len(m.classes)))]  # text runs: visible tokens
        add(", ".join(names) + (" …" if len(m.classes) > 24 else "") + "\n")
        if isinstance(m.extra.get("not_covered"), list):
            nc = m.extra["not_covered"]
            add("coverage: ", style="bold")
            add(("not covered by the dual form: " + ", ".join(map(str, nc))) if nc else "every trained parameter is recorded")
            add("\n")
        if m.optimizer:
            add("optimizer: ", style="bold")
            # per-group settings (lists of objects) are `dualtui info`'s to show, one line per group
            add(", ".join(f"{k}={_short(v)}" for k, v in m.optimizer.items()
                               if not isinstance(v, (list, dict)) and v not in (None, False, 0, 0.0)) + "\n")
        if m.training:
            add("training: ", style="bold")
            add(", ".join(f"{k}={_short(v)}" for k, v in m.training.items() if not isinstance(v, (list, dict)) and v is not None))
        self.query_one("#overview-text", Static).update(t)
        table = self.query_one("#overview-layers", DataTable)
        table.add_columns("layer", "kind", "in → out", "patterns", "storage", "size", "verify")
        for spec in m.layers:
            nbytes = sum(b.info(n).end - b.info(n).start for n in b.tensor_names if n.startswith(f"layer/{spec.name}/"))
            table.add_row(plain(spec.name), spec.kind, f"{spec.in_features} → {spec.out_features}", f"{spec.patterns:,}",
                          _DT.get(b.storage_dtype(spec.name), "?"), _size(nbytes), "…", key=spec.name)
        self.query_one("#verify-status", Static).update(
            "verify (primal == dual) starts when the first spotlight is complete, or now if you stay on this tab")
        self.verify_started = False

    def start_verify(self) -> None:
        """Verify every layer, once. Deferred: started at mount it competed with the first
        spotlight for the CPU and doubled its time (benchmarks/README.md, TUI)."""
        if self.verify_started:
            return
        self.verify_started = True
        self.query_one("#verify-status", Static).update("verifying primal == dual …")
        self.verify()

    @work(thread=True, group="verify", exclusive=True, exit_on_error=False)
    def verify(self) -> None:
        from ...bundle.errors import BundleError
        from ...engine.verify import verify_layer

        worker = get_current_worker()
        try:
            self.run.bundle.validate_contents()
        except BundleError as e:
            self.app.call_from_thread(self._status, Text(literal(f"invalid bundle: {e.detail}"), style="bold red"))
            return
        failed = 0
        for i, name in enumerate(self.run.layers):
            if worker.is_cancelled:
                return
            check = verify_layer(self.run.bundle, name)
            failed += not check.ok
            if check.approximate:  # never "ok" for primal == dual: what the patterns explain
                cell = Text(f"explains {check.explained:.0%}" if check.ok else "FAIL: residual not as recorded",
                            style="yellow" if check.ok else "bold red")
            else:
                cell = Text(f"{'ok' if check.ok else 'FAIL'}  {check.weight_max_abs_error:.1e} ≤ {check.tolerance:.1e}",
                            style="green" if check.ok else "bold red")
            self.app.call_from_thread(self._cell, name, cell, i + 1)
        if failed:
            msg = Text(f"{failed} layer(s) out of tolerance", style="bold red")
        elif self.run.bundle.manifest.approximate:
            msg = Text("approximate dual form: primal != dual by the residual (not attributed to any pattern)", style="yellow")
        else:
            msg = Text("primal == dual for every layer", style="green")
        self.app.call_from_thread(self._status, msg)

    def _cell(self, layer: str, cell: Text, done: int) -> None:
        table = self.query_one("#overview-layers", DataTable)
        table.update_cell(layer, table.ordered_columns[-1].key, cell, update_width=True)
        self.query_one("#verify-progress", ProgressBar).update(progress=done)

    def _status(self, msg: Text) -> None:
        self.query_one("#verify-status", Static).update(msg)
        self.query_one("#verify-progress", ProgressBar).display = False
