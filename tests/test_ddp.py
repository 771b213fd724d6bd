"""Data-parallel training: PyTorch's DistributedDataParallel with 2 gloo processes on CPU and a
DistributedSampler, as PyTorch's DDP tutorial writes the loop. The ranks end with one bundle
that verifies, whose example ids are global, and which equals the single-process twin that
trains on the same global batches (the ranks' batches side by side, the loss averaged over
the global batch: what DDP's gradient average computes)."""

from __future__ import annotations

import json
import os
import shutil
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
from dualtui.record import Recorder

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or sys.platform == "win32",
                                reason="torch.distributed with gloo")

N, PER_RANK, EPOCHS, WORLD = 96, 6, 2, 2  # 8 steps an epoch

COMMON = textwrap.dedent("""
    import torch
    from torch import nn

    def make(seed=0):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(5, 12, bias={BIAS}), nn.Tanh(), nn.Linear(12, 3, bias={BIAS}))
        g = torch.Generator().manual_seed(7)
        x, y = torch.randn({N}, 5, generator=g), torch.randint(0, 3, ({N},), generator=g)
        return model, x, y

    def make_opt(params):
        return {OPT}

    def global_batches(epochs, world, per_rank):
        # what DistributedSampler(shuffle=True, seed=0) hands each rank, epoch by epoch
        from torch.utils.data import DistributedSampler
        out = []
        for epoch in range(epochs):
            ranks = []
            for r in range(world):
                s = DistributedSampler(range({N}), num_replicas=world, rank=r, shuffle=True, seed=0)
                s.set_epoch(epoch)
                ids = torch.tensor(list(s))
                ranks.append([ids[i:i + per_rank] for i in range(0, len(ids), per_rank)])
            out += [list(step) for step in zip(*ranks)]
        return out
""").replace("{N}", str(N))
SGD = ("True", "torch.optim.SGD(params, lr=0.2, momentum=0.9)")
ADAFACTOR = ("False", "torch.optim.Adafactor(params, lr=0.05, weight_decay=0.1)")


def _common(variant: tuple[str, str]) -> str:
    return COMMON.replace("{BIAS}", variant[0]).replace("{OPT}", variant[1])

WORKER = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
    from dualtui.record import Recorder

    rank, world, out, init, stop_after = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    model, x, y = make()
    ddp = DDP(model)
    opt = make_opt(ddp.parameters())
    ds = TensorDataset(torch.arange(len(x)), x, y)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size={per_rank}, sampler=sampler)
    step = 0
    with Recorder(ddp, opt, out, journal_every=4) as rec:
        for epoch in range({epochs}):
            sampler.set_epoch(epoch)
            for ids, xb, yb in loader:
                with rec.batch(example=ids, label=yb):  # global example ids: the dataset's indices
                    nn.functional.cross_entropy(ddp(xb), yb).backward()
                opt.step()
                opt.zero_grad()
                step += 1
                if step == stop_after and rank == 0:
                    os.kill(os.getpid(), signal.SIGSTOP)  # the test signals rank 0 here
        if rank == 0:
            rec.record_test(x[:10], y[:10])
    dist.destroy_process_group()
""").replace("{per_rank}", str(PER_RANK)).replace("{epochs}", str(EPOCHS))


def _run_ranks(tmp_path: Path, out: Path, stop_after: int = -1, signal_to_send: int | None = None,
               variant: tuple[str, str] = SGD) -> list[int]:
    script = tmp_path / "worker.py"
    script.write_text(_common(variant) + WORKER)
    init = tmp_path / "init"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(WORLD), str(out), str(init), str(stop_after)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in range(WORLD)]
    try:
        if signal_to_send is not None:
            _, status = os.waitpid(procs[0].pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
            os.kill(procs[0].pid, signal_to_send)  # pending until it continues
            os.kill(procs[0].pid, signal.SIGCONT)
        results = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, results):
        if signal_to_send is None:
            assert "Traceback" not in err, err
        else:  # the loop does not catch it: Python's own report of the exception, after the bundle is written
            assert err.rstrip().endswith(f"Interrupted: {signal.Signals(signal_to_send).name}"), err
    return [p.returncode for p in procs]


def _twin(path: Path, steps: int | None = None, variant: tuple[str, str] = SGD) -> Bundle:
    """One process, the same global batches: the ranks' batches side by side, loss averaged."""
    ns: dict = {}
    exec(_common(variant), ns)
    model, x, y = ns["make"]()
    opt = ns["make_opt"](model.parameters())
    with Recorder(model, opt, path) as rec:
        for s, ranks in enumerate(ns["global_batches"](EPOCHS, WORLD, PER_RANK)):
            if steps is not None and s == steps:
                break
            ids = torch.cat(ranks)
            with rec.batch(example=ids, label=y[ids]):
                nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
            opt.step()
            opt.zero_grad()
        rec.record_test(x[:10], y[:10])
    return Bundle.open(path)


def _field(b: Bundle, layer: str, f: str) -> np.ndarray:
    return np.concatenate([b.array(n) for n in b.pattern_names(layer, f)])


def _assert_twins(ddp: Bundle, twin: Bundle, rtol: float = 0.0) -> None:
    assert ddp.manifest.training["steps"] == twin.manifest.training["steps"]
    for spec in twin.manifest.layers:
        L = spec.name
        for key in ("w0", "b0", "weight", "bias") if spec.bias else ("w0", "weight"):
            np.testing.assert_allclose(ddp.array(f"layer/{L}/{key}"), twin.array(f"layer/{L}/{key}"), rtol=0, atol=1e-6)
        for f in ("step", "example"):
            np.testing.assert_array_equal(_field(ddp, L, f), _field(twin, L, f))
        for f in ("keys", "values"):
            np.testing.assert_allclose(_field(ddp, L, f), _field(twin, L, f), rtol=rtol, atol=1e-6)
    np.testing.assert_array_equal(ddp.array("train/label"), twin.array("train/label"))


def test_ddp_two_ranks_give_one_bundle_equal_to_the_single_process_twin(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    assert _run_ranks(tmp_path, out) == [0, 0]
    b = Bundle.open(out)
    assert verify_bundle(b).ok
    assert b.manifest.extra["distributed"]["world_size"] == WORLD
    twin = _twin(tmp_path / "twin.safetensors")
    _assert_twins(b, twin)
    ex = _field(b, "2", "example")
    assert sorted(set(ex.tolist())) == list(range(N))  # global ids: every example of the data set
    names = [n for n in twin.tensor_names if n.startswith("queries/")]
    assert names and names == [n for n in b.tensor_names if n.startswith("queries/")]
    for n in names:  # rank 0's test queries: the same model, so the same as the twin's
        np.testing.assert_allclose(b.array(n), twin.array(n), rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".ddp.safetensors.*"))  # no spool, no lock left


def test_ddp_adafactor_is_exact_and_equals_the_twin(tmp_path: Path) -> None:
    """Adafactor's per-step factors come from the all-reduced gradient, the same on every rank."""
    out = tmp_path / "ddp.safetensors"
    assert _run_ranks(tmp_path, out, variant=ADAFACTOR) == [0, 0]
    b = Bundle.open(out)
    assert verify_bundle(b).ok and b.manifest.dual_form.get("method") == "adafactor"
    twin = _twin(tmp_path / "twin.safetensors", variant=ADAFACTOR)
    assert verify_bundle(twin).ok
    # Both are exact; they differ by float32 rounding of two computations of the same gradient
    # (DDP's average vs one batch), which the factors 1/√r, 1/√c (up to ~1e2 here) scale up.
    _assert_twins(b, twin, rtol=1e-4)


def test_ddp_sigterm_on_one_rank_stops_both_with_the_completed_steps(tmp_path: Path) -> None:
    """A scheduler's SIGTERM reaching rank 0 only: both ranks stop after the same step and the
    bundle holds exactly the completed steps, equal to the twin's first steps."""
    out = tmp_path / "ddp.safetensors"
    codes = _run_ranks(tmp_path, out, stop_after=5, signal_to_send=signal.SIGTERM)
    assert codes[0] != 0 and codes[1] != 0
    b = Bundle.open(out)
    assert verify_bundle(b).ok
    # it landed between steps 5 and 6; under torch.distributed a signal takes effect at the end
    # of the step in progress, on every rank at once: step 6 completes everywhere, then all stop
    assert b.manifest.training["steps"] == 6
    twin = _twin(tmp_path / "twin.safetensors", steps=6)
    for L in ("0", "2"):
        np.testing.assert_array_equal(_field(b, L, "example"), _field(twin, L, "example"))
        np.testing.assert_allclose(_field(b, L, "values"), _field(twin, L, "values"), rtol=0, atol=1e-6)


def test_ddp_sigkill_then_recover_merges_the_ranks_journals(tmp_path: Path) -> None:
    out = tmp_path / "ddp.safetensors"
    script = tmp_path / "worker.py"
    script.write_text(_common(SGD) + WORKER)
    init = tmp_path / "init"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(WORLD), str(out), str(init), "10"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}) for r in range(WORLD)]
    try:
        _, status = os.waitpid(procs[0].pid, os.WUNTRACED)  # rank 0 stopped after step 10
        assert os.WIFSTOPPED(status), status
        for p in procs:
            p.kill()
            p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    exe = shutil.which("dualtui")
    if exe is None:
        pytest.skip("the dualtui console script is not installed")
    r = subprocess.run([exe, "recover", str(out), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    assert steps == 8  # journaled every 4 steps: 10 completed, 8 journaled on both ranks
    b = Bundle.open(out)
    assert verify_bundle(b).ok
    twin = _twin(tmp_path / "twin.safetensors", steps=8)
    for L in ("0", "2"):
        np.testing.assert_array_equal(_field(b, L, "example"), _field(twin, L, "example"))
        np.testing.assert_allclose(_field(b, L, "values"), _field(twin, L, "values"), rtol=0, atol=1e-6)
    assert not list(tmp_path.glob(".ddp.safetensors.spool-*"))
