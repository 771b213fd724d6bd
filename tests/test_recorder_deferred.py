"""The gradient-scale check runs per window of steps after the first ones: a failure found
late must keep every pattern, say what went wrong in the bundle, and let verify fail."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualtui.bundle import Bundle
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder, RecorderError
from dualtui.record import recorder as recorder_mod


def _train(tmp_path, bad_from: int, steps: int = 12):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    path = tmp_path / "run.safetensors"
    with pytest.raises(RecorderError, match="not a scalar multiple"):
        with Recorder(model, opt, path) as rec:
            for s in range(steps):
                ids = torch.arange(8) + 8 * (s % 4)
                with rec.batch(example=ids, label=y[ids]):
                    nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
                if s >= bad_from:
                    torch.nn.utils.clip_grad_value_(model.parameters(), 1e-3)  # per-coordinate: not exact
                opt.step()
                opt.zero_grad()
    return path


def test_late_failure_keeps_patterns_and_fails_verify(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(recorder_mod, "CHECK_WINDOW", 4)
    path = _train(tmp_path, bad_from=5)
    b = Bundle.open(path)
    training = b.manifest.training
    assert training["interrupted"] == "RecorderError"
    assert any("not a scalar multiple" in f for f in training["check_failures"])
    # every applied step's patterns were kept: the check fires at the end of the window of step 5
    assert b.manifest.layers[0].patterns == training["steps"] * 8
    assert training["steps"] == 8
    assert not verify_bundle(b).ok  # honest: the recorded dual form does not match the weights


def test_early_failure_stops_before_the_step(tmp_path) -> None:
    """Refused at step 0, before any weight changed: nothing was recorded, so nothing is
    written, and an earlier bundle at the same path is left as it was."""
    (tmp_path / "run.safetensors").write_bytes(b"an earlier run")
    path = _train(tmp_path, bad_from=0)
    assert path.read_bytes() == b"an earlier run"
    assert not list(tmp_path.glob(".run.safetensors.spool-*"))


def test_scale_grad_by_freq_is_refused(tmp_path) -> None:
    emb = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True))
    with pytest.raises(RecorderError, match="scale_grad_by_freq"):
        Recorder(emb, torch.optim.SGD(emb.parameters(), lr=0.1), tmp_path / "x.safetensors")
