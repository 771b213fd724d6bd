"""The long fuzz run of issue 12: thousands of mutated bundles (tests/bundle_mutator.py) through
every command, and a share of them through the app (Pilot), with the properties of
tests/test_fuzz.py. Prints counts: cases, command runs, outcomes by exit code, mutation kinds,
and every failure (none expected).

    python benchmarks/fuzz_bundles.py [--cases 2000] [--app-every 10] [--seed 1]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from typer.testing import CliRunner  # noqa: E402

from bundle_mutator import COMMANDS, CONTROL, check, files_under, mutate  # noqa: E402
from dualtui.cli import app  # noqa: E402

HANG_S = 60


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


def make_bases(folder: Path) -> dict[str, bytes]:
    runner = CliRunner()
    runner.invoke(app, ["record", "digits", "--epochs", "1", "--hidden", "8", "-o", str(folder / "d.safetensors")])
    runner.invoke(app, ["record", "text", "--max-chars", "1500", "--context", "8", "--width", "8", "--blocks", "1",
                        "--heads", "1", "--steps", "12", "--batch-size", "2", "--tests", "6", "-o", str(folder / "t.safetensors")])
    return {"digits": (folder / "d.safetensors").read_bytes(), "text": (folder / "t.safetensors").read_bytes()}


def app_case(path: Path, out: Path) -> str | None:
    """Open the bundle as `dualtui open` would (refused bundles never reach a screen), press
    through every view and export; what went wrong, or None."""
    from dualtui.bundle import Bundle
    from dualtui.bundle.errors import BundleError
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun

    try:
        b = Bundle.open(path)
        b.validate_small()
    except BundleError:
        return None  # exit 3 before any screen: what `open` does
    a = DualtuiApp(OpenRun(b, b.default_query_set), test=0, export_dir=out)

    async def drive() -> str:
        async with a.run_test(size=(120, 36)) as pilot:
            for key in ["1", "2", "3", "x", "j", "4", "5", "3", "b", "g", "down", "s"]:
                await pilot.press(key)
                await pilot.pause()
            while any(not w.is_finished for w in a.workers):
                await a.workers.wait_for_complete()
            return a.export_screenshot()

    try:
        svg = asyncio.run(drive())
    except Exception as e:  # noqa: BLE001 - the point is to catch whatever the app let through
        return f"app raised {e.__class__.__name__}: {str(e)[:100]}"
    if a.return_code:
        return f"app exited {a.return_code}"
    if CONTROL.search(svg):
        return "control byte in the app's screen"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=2000, help="mutated bundles (half from each base)")
    ap.add_argument("--app-every", type=int, default=10, help="open every Nth case in the app too (0: never)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        bases = make_bases(tmp / "base")
        work = tmp / "work"
        work.mkdir()
        os.chdir(work)
        exports = tmp / "exports"
        exports.mkdir()
        before = files_under(tmp)
        rng = random.Random(args.seed)
        runner = CliRunner()
        path = work / "m.safetensors"
        exits: collections.Counter = collections.Counter()
        kinds: collections.Counter = collections.Counter()
        failures = []
        runs = apps = 0
        signal.signal(signal.SIGALRM, _alarm)
        for case in range(args.cases):
            base = "digits" if case % 2 == 0 else "text"
            raw, what = mutate(bases[base], rng)
            kinds[what.split()[0]] += 1
            path.write_bytes(raw)
            for cmd in COMMANDS:
                signal.alarm(HANG_S)
                try:
                    r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]], env={"COLUMNS": "160"})
                finally:
                    signal.alarm(0)
                runs += 1
                if isinstance(r.exception, Hang):
                    failures.append((case, base, what, cmd, "hang"))
                    continue
                exits[r.exit_code] += 1
                problem = check(r, cmd)
                if problem:
                    failures.append((case, base, what, cmd, problem))
            if args.app_every and case % args.app_every == 0:
                apps += 1
                problem = app_case(path, exports)
                if problem:
                    failures.append((case, base, what, ["open"], problem))
        outside = files_under(tmp) - before - {path} - {p for p in files_under(exports)}
        elapsed = time.perf_counter() - t0
    print(f"cases {args.cases} (seed {args.seed}), command runs {runs}, app sessions {apps}, {elapsed:.0f} s, "
          f"load {os.getloadavg()[0]:.2f}")
    print("exit codes: " + ", ".join(f"{k}: {v}" for k, v in sorted(exits.items())))
    print("mutations: " + ", ".join(f"{k} {v}" for k, v in kinds.most_common()))
    print(f"files written outside the work and export folders: {len(outside)}" + (f" {sorted(map(str, outside))[:5]}" if outside else ""))
    print(f"failures: {len(failures)}")
    for f in failures[:50]:
        print("  ", f)
    sys.exit(1 if failures or outside else 0)


if __name__ == "__main__":
    main()
