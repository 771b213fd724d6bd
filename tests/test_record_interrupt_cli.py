"""Ctrl-C during `dualtui record digits` / `record text`: exit 130, and the bundle of the completed
steps verifies. Deterministic: the child stops itself after a known step (DUALTUI_STOP_AFTER_STEP),
the test waits for that stop, sends SIGINT and lets it continue, so the interrupt lands right
after that step on every run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def interrupt_recording(tmp_path: Path, args: list[str], after: int) -> tuple[dict, str]:
    """Run `dualtui record ARGS -o tmp/run.safetensors`, interrupt it right after step `after`,
    check the exit and that the bundle verifies; return its `dualtui info --json` and stderr."""
    exe = shutil.which("dualtui")
    if exe is None:
        pytest.skip("the dualtui console script is not installed")
    out = tmp_path / "run.safetensors"
    env = {**os.environ, "DUALTUI_STOP_AFTER_STEP": str(after)}
    proc = subprocess.Popen([exe, "record", *args, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns once the child has stopped itself
        assert os.WIFSTOPPED(status), f"the child ended before step {after}: {status}"
        proc.send_signal(signal.SIGINT)  # pending until it continues
        proc.send_signal(signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert f"after {after} steps; wrote a bundle of the completed steps" in stderr
    verify = subprocess.run([exe, "verify", str(out), "--json"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    info = json.loads(subprocess.run([exe, "info", str(out), "--json"], capture_output=True, text=True).stdout)
    assert info["training"]["interrupted"] == "KeyboardInterrupt"
    assert info["training"]["steps"] == after  # exactly the completed steps
    assert not list(tmp_path.glob(".run.safetensors.spool-*"))  # nothing left behind
    return info, stderr


def test_ctrl_c_keeps_completed_steps(tmp_path: Path) -> None:
    info, _ = interrupt_recording(tmp_path, ["digits", "--epochs", "400"], after=7)
    assert info["layers"][0]["patterns"] == 7 * 32
    assert info["test_size"] == 360  # the test set is still recorded after the interrupt


def _corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40)
    return corpus


TEXT = ["--steps", "100000", "--context", "8", "--width", "8", "--blocks", "1", "--heads", "1", "--tests", "5"]


def test_ctrl_c_during_record_text_keeps_completed_steps(tmp_path: Path) -> None:
    """The same for the language-model experiment (a small corpus, many steps, tiny model)."""
    info, stderr = interrupt_recording(tmp_path, ["text", "--corpus", str(_corpus(tmp_path)), *TEXT], after=3)
    assert info["test_size"] == 5 and info["input"]["kind"] == "text"
    assert "train loss" in stderr


def test_ctrl_c_after_zero_steps_says_nothing_was_trained(tmp_path: Path) -> None:
    """Stopped before the first step completes (after "step 0"): no `loss nan`."""
    info, stderr = interrupt_recording(tmp_path, ["text", "--corpus", str(_corpus(tmp_path)), *TEXT], after=0)
    assert "nothing was trained" in stderr and "nan" not in stderr
