"""Ctrl-C during `dualtui record digits` / `record text`: exit 130, and the bundle of completed steps verifies."""

from __future__ import annotations

import json

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def interrupt_recording(tmp_path: Path, args: list[str]) -> dict:
    """Start `dualtui record ARGS -o tmp/run.safetensors`, send SIGINT a second into training,
    check the exit and that the bundle verifies; return its `dualtui info --json`."""
    exe = shutil.which("dualtui")
    if exe is None:
        pytest.skip("the dualtui console script is not installed")
    out = tmp_path / "run.safetensors"
    proc = subprocess.Popen([exe, "record", *args, "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # The spool directory appears when the Recorder is attached: training has started.
        while not list(tmp_path.glob(".run.safetensors.spool-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "interrupted after" in stderr
    verify = subprocess.run([exe, "verify", str(out), "--json"], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    info = json.loads(subprocess.run([exe, "info", str(out), "--json"], capture_output=True, text=True).stdout)
    assert info["training"]["interrupted"] == "KeyboardInterrupt"
    assert not list(tmp_path.glob(".run.safetensors.spool-*"))  # nothing left behind
    return info


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_keeps_completed_steps(tmp_path: Path) -> None:
    info = interrupt_recording(tmp_path, ["digits", "--epochs", "400"])
    assert 0 < info["training"]["steps"] < 400 * 45
    assert info["layers"][0]["patterns"] > 0
    assert info["test_size"] == 360  # the test set is still recorded after the interrupt


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_during_record_text_keeps_completed_steps(tmp_path: Path) -> None:
    """The same for the language-model experiment (a small corpus, many steps, tiny model)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It was the best of times, it was the worst of times, it was the age of wisdom.\n" * 40)
    info = interrupt_recording(tmp_path, ["text", "--corpus", str(corpus), "--steps", "100000", "--context", "8",
                                          "--width", "8", "--blocks", "1", "--heads", "1", "--tests", "5"])
    assert 0 < info["training"]["steps"] < 100000
    assert info["test_size"] == 5 and info["input"]["kind"] == "text"
