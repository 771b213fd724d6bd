"""Resume from a checkpoint: a job that saved model, optimizer, scheduler and `rec.state_dict()`
at step s, was stopped later (Ctrl-C in-process, SIGKILL as a real process), and restarted from
that checkpoint with `Recorder(..., resume=state)` ends with the same bundle as the run that was
never interrupted: same w0, keys, values, steps and examples (float32, max abs diff <= 1e-6)."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dualtui.bundle import Bundle
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder, RecorderError

STEPS, BATCH = 24, 8


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.7)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 6, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    order = torch.randperm(64 * 3, generator=g) % 64  # the data order: the same on every run
    return model, opt, sched, x, y, order


def _train(rec: Recorder, model, opt, sched, x, y, order, start: int, stop: int, checkpoint_at: int | None = None):
    """Steps start..stop-1; returns the checkpoint taken after step `checkpoint_at` (if any)."""
    ckpt = None
    for s in range(start, stop):
        ids = order[s * BATCH:(s + 1) * BATCH]
        with rec.batch(example=ids, label=y[ids]):
            nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        if checkpoint_at is not None and s + 1 == checkpoint_at:
            ckpt = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                    "sched": copy.deepcopy(sched.state_dict()), "rec": rec.state_dict(), "step": s + 1}
    return ckpt


def _uninterrupted(path: Path) -> Bundle:
    model, opt, sched, x, y, order = _setup()
    with Recorder(model, opt, path, journal_every=4) as rec:
        _train(rec, model, opt, sched, x, y, order, 0, STEPS)
    return Bundle.open(path)


def _field(b: Bundle, layer: str, f: str) -> np.ndarray:
    return np.concatenate([b.array(n) for n in b.pattern_names(layer, f)])


def _assert_same(a: Bundle, b: Bundle) -> None:
    assert a.manifest.training["steps"] == b.manifest.training["steps"] == STEPS
    assert [L.name for L in a.manifest.layers] == [L.name for L in b.manifest.layers]
    for spec in a.manifest.layers:
        L = spec.name
        for key in ("w0", "b0", "weight", "bias"):
            np.testing.assert_allclose(b.array(f"layer/{L}/{key}"), a.array(f"layer/{L}/{key}"), rtol=0, atol=1e-6)
        for f in ("keys", "values"):
            np.testing.assert_allclose(_field(b, L, f), _field(a, L, f), rtol=0, atol=1e-6)
        for f in ("step", "example"):
            np.testing.assert_array_equal(_field(b, L, f), _field(a, L, f))
    np.testing.assert_array_equal(b.array("train/label"), a.array("train/label"))


def _load(ckpt: dict, model, opt, sched) -> None:
    ckpt = copy.deepcopy(ckpt)  # as from a file: SGD.load_state_dict keeps the momentum tensors it is given
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])


def _resume(path: Path, ckpt: dict) -> Bundle:
    model, opt, sched, x, y, order = _setup(seed=123)  # a fresh process: other initial weights, overwritten below
    _load(ckpt, model, opt, sched)
    with Recorder(model, opt, path, journal_every=4, resume=ckpt["rec"]) as rec:
        _train(rec, model, opt, sched, x, y, order, ckpt["step"], STEPS)
    return Bundle.open(path)


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path: Path) -> None:
    twin = _uninterrupted(tmp_path / "twin.safetensors")
    path = tmp_path / "run.safetensors"
    model, opt, sched, x, y, order = _setup()
    ckpt = None
    with pytest.raises(KeyboardInterrupt):
        with Recorder(model, opt, path, journal_every=4) as rec:
            ckpt = _train(rec, model, opt, sched, x, y, order, 0, 10, checkpoint_at=7)
            raise KeyboardInterrupt  # preempted three steps after the checkpoint
    assert ckpt is not None
    partial = Bundle.open(path)  # the completed steps were written, and the spool kept for the resume
    assert partial.manifest.training["steps"] == 10
    assert Path(ckpt["rec"]["spool"]).is_dir()
    resumed = _resume(path, ckpt)
    _assert_same(twin, resumed)
    assert verify_bundle(resumed).ok
    assert not Path(ckpt["rec"]["spool"]).exists()  # a complete run leaves nothing behind


def test_resume_twice_from_one_checkpoint(tmp_path: Path) -> None:
    """A job preempted again before its next checkpoint restarts from the same one."""
    twin = _uninterrupted(tmp_path / "twin.safetensors")
    path = tmp_path / "run.safetensors"
    model, opt, sched, x, y, order = _setup()
    with pytest.raises(KeyboardInterrupt):
        with Recorder(model, opt, path, journal_every=4) as rec:
            ckpt = _train(rec, model, opt, sched, x, y, order, 0, 9, checkpoint_at=6)
            raise KeyboardInterrupt
    model, opt, sched, x, y, order = _setup(seed=5)
    _load(ckpt, model, opt, sched)
    with pytest.raises(KeyboardInterrupt):
        with Recorder(model, opt, path, journal_every=4, resume=ckpt["rec"]) as rec:
            _train(rec, model, opt, sched, x, y, order, 6, 15)
            raise KeyboardInterrupt  # preempted again, 9 steps past the checkpoint
    _assert_same(twin, _resume(path, ckpt))


def test_resume_refuses_a_state_for_another_output(tmp_path: Path) -> None:
    model, opt, sched, x, y, order = _setup()
    with pytest.raises(KeyboardInterrupt):
        with Recorder(model, opt, tmp_path / "a.safetensors") as rec:
            ckpt = _train(rec, model, opt, sched, x, y, order, 0, 3, checkpoint_at=2)
            raise KeyboardInterrupt
    with pytest.raises(RecorderError, match="belongs to a recording to"):
        Recorder(model, opt, tmp_path / "b.safetensors", resume=ckpt["rec"])
    with pytest.raises(RecorderError, match="resume= takes"):
        Recorder(model, opt, tmp_path / "a.safetensors", resume={"step": 3})


CHILD = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_resume import _setup, _train
    from dualtui.record import Recorder
    path, ckpt_path = sys.argv[1], sys.argv[2]
    model, opt, sched, x, y, order = _setup()
    rec = Recorder(model, opt, path, journal_every=4)
    ckpt = _train(rec, model, opt, sched, x, y, order, 0, 11, checkpoint_at=8)
    torch.save(ckpt, ckpt_path)
    os.kill(os.getpid(), signal.SIGSTOP)  # 3 steps past the checkpoint: the test SIGKILLs it here
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigkilled_job_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """A real preemption: the training process is SIGKILLed after its checkpoint; a new process
    resumes from the checkpoint file and the bundle equals the uninterrupted run's."""
    twin = _uninterrupted(tmp_path / "twin.safetensors")
    path, ckpt_path = tmp_path / "run.safetensors", tmp_path / "ckpt.pt"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    proc = subprocess.Popen([sys.executable, str(script), str(path), str(ckpt_path)])
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), status
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not path.exists()  # killed: nothing was written but the spool
    ckpt = torch.load(ckpt_path, weights_only=False)
    resumed = _resume(path, ckpt)  # the dead process's lock is taken over
    _assert_same(twin, resumed)
    assert verify_bundle(resumed).ok
