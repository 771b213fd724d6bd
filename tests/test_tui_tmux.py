"""`dualtui open` in a real terminal: a detached tmux session of 100×30, read back with
`tmux capture-pane`, driven with `tmux send-keys`. Skipped when tmux is not installed
(.ci/run installs it when it can)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dualtui.cli import app as cli_app

TMUX = shutil.which("tmux")
pytestmark = pytest.mark.skipif(TMUX is None, reason="tmux is not installed")

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = "sample_runs/digits-single.safetensors"
TEST = 3
WIDTH, HEIGHT = 100, 30
TIMEOUT = 30.0

def dualtui_command() -> list[str]:
    """The `dualtui` console script of this Python (not whatever is first on PATH)."""
    script = Path(sys.executable).with_name("dualtui")
    if script.is_file():
        return [str(script)]
    found = shutil.which("dualtui")
    return [found] if found else [sys.executable, "-c", "from dualtui.cli import main; main()"]


def cli_top_examples(k: int) -> list[int]:
    r = CliRunner().invoke(cli_app, ["rank", str(ROOT / BUNDLE), "--test", str(TEST), "--json"])
    assert r.exit_code == 0, r.output
    return [row["example"] for row in json.loads(r.stdout)["results"][:k]]


class Tmux:
    """One tmux server of our own (its own socket), so nothing else's sessions are touched."""

    def __init__(self) -> None:
        # A socket of our own in a short temporary folder (a Unix socket path has ~100 bytes),
        # removed in close(): tmux leaves its socket file behind after kill-server.
        self.folder = tempfile.mkdtemp(prefix="dualtui-tmux-")
        self.socket = os.path.join(self.folder, "socket")
        self.session = "dualtui"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        # An explicit environment: the process may carry COLUMNS/LINES set below os.environ (some
        # terminal libraries putenv them: under pytest the pane saw COLUMNS=80 LINES=24), and the
        # app would believe them rather than the 100×30 the pane has.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run([TMUX, "-S", self.socket, *args], capture_output=True, text=True, check=check, timeout=10,
                              env=env)

    def alive(self) -> bool:
        return self("has-session", "-t", self.session, check=False).returncode == 0

    def capture(self) -> str:
        r = self("capture-pane", "-p", "-t", self.session, check=False)
        return r.stdout if r.returncode == 0 else ""

    def close(self) -> None:
        self("kill-session", "-t", self.session, check=False)
        self("kill-server", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)


def ranking_rows(screen: str, n: int) -> list[tuple[str, str]] | None:
    """(rank, example) of the first `n` rows of the ranking table, read under its header."""
    lines = screen.splitlines()
    for i, line in enumerate(lines):
        m_rank, m_ex = re.search(r"\brank\b", line), re.search(r"\bexample\b", line)
        if not (m_rank and m_ex and "score" in line):
            continue
        rows = []
        for row in lines[i + 1:i + 1 + n]:
            rank = row[m_rank.start():].split()[:1]
            example = row[m_ex.start():].split()[:1]
            if not rank or not example:
                return None
            rows.append((rank[0], example[0]))
        return rows if len(rows) == n else None
    return None


def spotlight_header(screen: str) -> str | None:
    return next((ln for ln in screen.splitlines() if re.search(r"·\s*per\s+(pattern|example)\b", ln)), None)


def wait_for(tmux: Tmux, status: Path, what: str, found, timeout: float = TIMEOUT):
    """Poll the pane until `found(screen)` is truthy, and the same, in two captures in a row (a
    capture can catch a frame half drawn); fail with the screen if the app died or time ran out."""
    deadline = time.monotonic() + timeout
    screen, last = "", None
    while time.monotonic() < deadline:
        screen = tmux.capture() or screen
        result = found(screen)
        if result and result == last:
            return result
        last = result
        if status.exists() and status.read_text().strip() not in ("", "0"):
            time.sleep(0.5)
            pytest.fail(f"`dualtui open` exited with {status.read_text().strip()} before {what}; the pane showed:\n"
                        f"{tmux.capture() or screen}")
        if not tmux.alive():
            pytest.fail(f"the tmux session ended before {what}; last screen:\n{screen}")
        time.sleep(0.2)
    pytest.fail(f"no {what} within {timeout:.0f} s; the pane shows:\n{screen}")


def test_open_in_tmux_shows_ranking_cycles_score_and_quits(tmp_path: Path) -> None:
    expected = cli_top_examples(3)
    status = tmp_path / "status"
    command = shlex.join([*dualtui_command(), "open", BUNDLE, "--test", str(TEST)])
    # On failure the pane stays up a while so the error can be read back; on success the
    # shell exits with the app and the session ends.
    shell = f"unset COLUMNS LINES; {command}; code=$?; echo $code > {shlex.quote(str(status))}; [ $code -eq 0 ] || sleep 60"
    tmux = Tmux()
    try:
        tmux("new-session", "-d", "-s", tmux.session, "-x", str(WIDTH), "-y", str(HEIGHT), "-c", str(ROOT), shell)

        def ranked(screen: str):
            head = spotlight_header(screen) or ""
            rows = ranking_rows(screen, 3)
            done = all(w in head for w in ("effect", "per pattern", "highest first")) and "computing" not in head
            return (head, rows, screen) if done and rows else None

        head, rows, screen = wait_for(tmux, status, "the ranking of test 3 by effect", ranked)
        assert [rank for rank, _ in rows] == ["1", "2", "3"], screen
        assert [int(example) for _, example in rows] == expected, screen
        assert "net.4" in head, head  # the last layer, as `dualtui rank` without --layer

        # The ranking has the keyboard from the start: ↓ selects #2, whose example the
        # training preview beside the ranking names.
        assert f"#1 example {expected[0]}" in screen, screen
        tmux("send-keys", "-t", tmux.session, "Down")
        wait_for(tmux, status, "the second pattern selected after ↓", lambda s: f"#2 example {expected[1]}" in s)

        tmux("send-keys", "-t", tmux.session, "b")
        head = wait_for(tmux, status, "'cosine' in the spotlight header",
                        lambda s: (h := spotlight_header(s)) and "cosine" in h and h)
        assert "cosine" in head.splitlines()[0]

        tmux("send-keys", "-t", tmux.session, "q")
        deadline = time.monotonic() + 10
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tmux.alive(), f"the session is still there after q:\n{tmux.capture()}"
        assert status.read_text().strip() == "0"
    finally:
        tmux.close()
