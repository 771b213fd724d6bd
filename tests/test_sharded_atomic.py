"""Replacing a sharded set is atomic: a crash injected at every rename of the rewrite leaves a
set that reads whole, either the old one or the new one, never a mix (the new shards carry
generation-tagged names, the index is switched last, the old shards are removed after)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import dualtui.bundle.writer as writer_mod
from dualtui.bundle import Bundle
from dualtui.bundle.writer import OutputError
from dualtui.engine.verify import verify_bundle
from dualtui.record import Recorder


def _record(path: Path, seed: int, steps: int = 6) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    with Recorder(model, opt, path, max_shard_bytes=24 << 10) as rec:  # a few shards
        for _ in range(steps):
            with rec.batch(example=torch.arange(16)):
                nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def _fingerprint(path: Path) -> str:
    """What a reader sees: every tensor of the set, hashed."""
    b = Bundle.open(path)
    h = hashlib.sha256()
    for name in sorted(b.tensor_names):
        h.update(name.encode())
        h.update(np.ascontiguousarray(b.array(name)).tobytes())
    assert verify_bundle(b).ok
    return h.hexdigest()


def _renames_of_a_rewrite(tmp_path: Path) -> int:
    path = tmp_path / "count" / "run.safetensors"
    path.parent.mkdir()
    _record(path, seed=0)
    calls = []
    real = os.replace
    writer_mod.os.replace = lambda a, b: (calls.append(b), real(a, b))[1]
    try:
        _record(path, seed=1)
    finally:
        writer_mod.os.replace = real
    return len(calls)


def test_a_crash_at_any_rename_leaves_the_old_or_the_new_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = _renames_of_a_rewrite(tmp_path)
    assert n > 4  # spool files, the shards, the index
    index = tmp_path / "run.safetensors.index.json"
    seen = set()
    for crash_at in range(n):
        path = tmp_path / "run.safetensors"
        for f in tmp_path.glob("run*"):
            f.unlink()
        _record(path, seed=0)
        old = _fingerprint(index)
        calls = {"n": 0}
        real = os.replace

        def crashing_replace(a, b, calls=calls, crash_at=crash_at):
            if calls["n"] == crash_at:
                raise OSError(5, "Input/output error (injected)")
            calls["n"] += 1
            return real(a, b)

        monkeypatch.setattr(writer_mod.os, "replace", crashing_replace)
        with pytest.raises(OutputError):
            _record(path, seed=1)
        monkeypatch.setattr(writer_mod.os, "replace", real)
        now = _fingerprint(index)
        assert now == old  # the index was never switched: the old set, whole
        seen.add(now)
    # and a rewrite that completes gives the new set, with no old shard left over
    _record(tmp_path / "run.safetensors", seed=1)
    new = _fingerprint(index)
    assert new != old
    on_disk = {p.name for p in tmp_path.glob("run-*.safetensors")}
    assert on_disk == {f.name for f in Bundle.open(index).files}


def test_a_crash_after_the_index_switch_reads_the_new_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old shards are removed after the switch: dying before that leaves stray files, not a mix."""
    path = tmp_path / "run.safetensors"
    _record(path, seed=0)
    index = tmp_path / "run.safetensors.index.json"
    old_shards = {p.name for p in tmp_path.glob("run-*.safetensors")}

    switched = {"done": False}
    real_replace, real_remove = os.replace, writer_mod._remove_quietly

    def replace(a, b):
        real_replace(a, b)
        switched["done"] |= Path(b) == index

    def remove(p: Path) -> None:
        if switched["done"]:
            raise KeyboardInterrupt  # the process dies right after switching the index
        real_remove(p)

    monkeypatch.setattr(writer_mod.os, "replace", replace)
    monkeypatch.setattr(writer_mod, "_remove_quietly", remove)
    with pytest.raises(KeyboardInterrupt):
        _record(path, seed=1)
    monkeypatch.undo()
    b = Bundle.open(index)
    assert verify_bundle(b).ok
    used = {f.name for f in b.files}
    assert not used & old_shards  # every tensor comes from the new set
