"""A bounded, seeded fuzz of every command over mutated bundles (tests/bundle_mutator.py):
exit code in {0, 1, 2, 3}, no traceback, no control byte on the terminal outside --json,
strict JSON, one line for an invalid bundle, no hang, nothing written anywhere but the test's
folder. benchmarks/fuzz_bundles.py runs the same properties over thousands of cases."""

from __future__ import annotations

import random
import signal

import pytest
from typer.testing import CliRunner

from bundle_mutator import COMMANDS, check, files_under, mutate
from dualtui.cli import app

CASES = 240  # per base bundle, two commands each: ~40 s on 2 cores
HANG_S = 30  # one command on a ~1 MB bundle takes well under a second


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, bytes]:
    """Two small real recordings: an image MLP and a character Transformer (embedding,
    attention projections, several rows per item)."""
    folder = tmp_path_factory.mktemp("fuzzbase")
    runner = CliRunner()
    r1 = runner.invoke(app, ["record", "digits", "--epochs", "1", "--hidden", "8", "-o", str(folder / "d.safetensors")])
    r2 = runner.invoke(app, ["record", "text", "--max-chars", "1500", "--context", "8", "--width", "8", "--blocks", "1",
                             "--heads", "1", "--steps", "12", "--batch-size", "2", "--tests", "6",
                             "-o", str(folder / "t.safetensors")])
    assert r1.exit_code == 0 and r2.exit_code == 0, (r1.output, r2.output)
    return {"digits": (folder / "d.safetensors").read_bytes(), "text": (folder / "t.safetensors").read_bytes()}


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang()


@pytest.mark.parametrize("base", ["digits", "text"])
def test_mutated_bundles_never_crash_hang_or_escape(bases, base, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that wrote a file in its working folder would show here
    root = tmp_path.parent
    before = files_under(root)
    rng = random.Random(f"dualtui-fuzz-{base}")
    runner = CliRunner()
    path = tmp_path / "m.safetensors"
    failures = []
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        for case in range(CASES):
            raw, what = mutate(bases[base], rng)
            path.write_bytes(raw)
            for cmd in rng.sample(COMMANDS, 2):
                signal.alarm(HANG_S)
                try:
                    r = runner.invoke(app, [cmd[0], str(path), *cmd[1:]], env={"COLUMNS": "160"})
                finally:
                    signal.alarm(0)
                if isinstance(r.exception, Hang):
                    failures.append((case, what, cmd, f"no answer within {HANG_S} s"))
                    continue
                problem = check(r, cmd)
                if problem:
                    failures.append((case, what, cmd, problem))
    finally:
        signal.signal(signal.SIGALRM, old)
    assert not failures, "\n".join(map(str, failures[:20]))
    assert files_under(root) - before == {path}, sorted(files_under(root) - before)
