"""Disk full while recording, on a small tmpfs the test mounts (root only; skipped with the
reason elsewhere): one line naming the path, the bytes needed and free, exit 4; the spool is
cut back to its last journal (nothing half-written keeps the disk full) and, once there is
room, `dualtui recover` writes the journaled steps as a bundle that verifies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="tmpfs is Linux's")


@pytest.fixture
def small_disk(tmp_path: Path):
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _exe() -> str:
    exe = shutil.which("dualtui")
    if exe is None:
        pytest.skip("the dualtui console script is not installed")
    return exe


def test_disk_full_is_one_line_exit_4_and_recoverable(small_disk: Path) -> None:
    out = small_disk / "run.safetensors"
    r = subprocess.run([_exe(), "record", "digits", "--epochs", "3", "--journal-every", "10", "-o", str(out)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"}, timeout=300)
    assert r.returncode == 4, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("dualtui: error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr
    line = errors[0]
    assert "no space left on the device writing" in line and str(small_disk) in line
    assert "needed" in line and "free" in line
    assert "dualtui recover" in line  # what was kept, and how to finish it
    assert not list(small_disk.glob(".*.lock")) and not out.exists()
    spools = list(small_disk.glob(".run.safetensors.spool-*"))
    assert len(spools) == 1
    spool = spools[0]
    journal = json.loads((spool / "journal.json").read_text())
    named = {"journal.json", *journal["arrays"].values()}
    for lay in journal["layers"].values():
        for c in lay["chunks"]:
            named |= set(c["files"].values())
    assert {f.name for f in spool.iterdir()} == named  # nothing half-written or unjournaled is left
    steps = journal["state"]["step"]
    assert steps > 0 and steps % 10 == 0
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # room again
    rec = subprocess.run([_exe(), "recover", str(out), "--json"], capture_output=True, text=True)
    assert rec.returncode == 0, rec.stderr
    assert json.loads(rec.stdout)["steps"] == steps
    v = subprocess.run([_exe(), "verify", str(out)], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr
    assert not spool.exists()


def test_disk_full_before_any_journaled_step_leaves_nothing(small_disk: Path) -> None:
    out = small_disk / "run.safetensors"
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * ((1 << 20) - (48 << 10)))  # 48 KB left: too little for the first journal
    r = subprocess.run([_exe(), "record", "digits", "--epochs", "1", "-o", str(out)],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "1000"}, timeout=300)
    assert r.returncode == 4, r.stderr
    assert "no space left" in r.stderr and "Traceback" not in r.stderr
    assert sorted(f.name for f in small_disk.iterdir()) == ["filler"]
