"""Adaptive optimizers (dualtui/record/adaptive.py, docs/format.md `dual_form`).

Adafactor: every bundle is checked against the weights torch.optim.Adafactor itself produced,
read back with safetensors' own numpy loader (not dualtui's reader): W_T == w0 + Σ v kᵀ to
1e-10 in float64, over random small configurations (weight decay, update clipping, maximize,
schedules, gradient clipping; linear, embedding, attention projections, 1-D norm gains). Adam:
the residual W_T − w0 − Σ v kᵀ is recomputed by brute force from the stored tensors and the
model's final weights, and every view marks the bundle approximate.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file
from torch import nn
from typer.testing import CliRunner

from dualtui.cli import app as cli_app
from dualtui.record import Recorder, RecorderError
from dualtui.record.coefficients import StepRecord, adaptive_coefficients

F64_TOL = 1e-10
runner = CliRunner()


def dualtui(*args: str) -> SimpleNamespace:
    r = runner.invoke(cli_app, [str(a) for a in args])
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return SimpleNamespace(returncode=r.exit_code, stdout=r.stdout, stderr=r.stderr)


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _manifest(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return json.loads(f.metadata()["dualtui"])


def _learned(kind: str, keys: np.ndarray, values: np.ndarray, shape: tuple) -> np.ndarray:
    """Σ_t v_t k_tᵀ from the stored tensors, by the format's definition (docs/format.md 4a)."""
    out = np.zeros(shape)
    if kind == "embedding":
        for t, k in enumerate(keys):
            out[k] += values[t]
    elif kind == "elementwise":
        out += (values * keys).sum(axis=0)
    else:
        out += values.T @ keys
    return out


def _bundle_weights(path: Path, layer: str, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stored weight, w0, w0 + Σ v kᵀ), read with safetensors alone."""
    t = load_file(str(path))
    w, w0 = t[f"layer/{layer}/weight"], t[f"layer/{layer}/w0"]
    return w, w0, w0 + _learned(kind, t[f"layer/{layer}/keys"], t[f"layer/{layer}/values"], w.shape)


class Mixed(nn.Module):
    """Token ids -> Embedding -> attention (bias-free) -> LayerNorm gain -> bias-free MLP."""

    def __init__(self, vocab: int = 9, d: int = 6, classes: int = 4, norm: bool = True, attention: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.attn = nn.MultiheadAttention(d, 2, bias=False, batch_first=True) if attention else None
        self.norm = nn.LayerNorm(d, bias=False) if norm else None
        self.fc1 = nn.Linear(d, 7, bias=False)
        self.fc2 = nn.Linear(7, classes, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        if self.attn is not None:
            h = h + self.attn(h, h, h, need_weights=False)[0]
        if self.norm is not None:
            h = self.norm(h)
        return self.fc2(torch.tanh(self.fc1(h))).mean(dim=1)


def _train(model: nn.Module, opt: torch.optim.Optimizer, path: Path, steps: int, *, inputs: torch.Tensor,
           labels: torch.Tensor, B: int = 4, clip: float | None = None, sched: bool = False, **kw) -> Recorder:
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5) if sched else None
    n = len(labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = Recorder(model, opt, path, **kw)
    with rec:
        for s in range(steps):
            idx = torch.arange(s * B, s * B + B) % n
            with rec.batch(idx, labels[idx]):
                loss = nn.functional.cross_entropy(model(inputs[idx]), labels[idx])
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad()
            if schedule is not None:
                schedule.step()
        rec.record_test(inputs[:5], labels[:5])
    return rec


def _kinds(path: Path) -> dict[str, str]:
    return {spec["name"]: spec["kind"] for spec in _manifest(path)["layers"]}


# ====================================================================== Adafactor: exact
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(wd=st.sampled_from([0.0, 0.1]), d=st.sampled_from([1.0, 1e6]), lr=st.sampled_from([0.01, 0.3]),
       maximize=st.booleans(), clip=st.sampled_from([None, 0.05]), sched=st.booleans(),
       norm=st.booleans(), attention=st.booleans(), seed=st.integers(0, 10_000))
def test_adafactor_is_exact(tmp_path_factory, wd, d, lr, maximize, clip, sched, norm, attention, seed) -> None:
    torch.manual_seed(seed)
    path = tmp_path_factory.mktemp("ada") / "run.safetensors"
    model = Mixed(norm=norm, attention=attention)
    opt = torch.optim.Adafactor(model.parameters(), lr=lr, weight_decay=wd, d=d, maximize=maximize)
    ids = torch.randint(0, 9, (24, 5))
    labels = torch.randint(0, 4, (24,))
    _train(model, opt, path, 9, inputs=ids, labels=labels, clip=clip, sched=sched)
    params = dict(model.named_parameters())
    kinds = _kinds(path)
    assert "fc1" in kinds and "emb" in kinds and (("attn.q_proj" in kinds) == attention)
    for layer, kind in kinds.items():
        w, w0, dual = _bundle_weights(path, layer, kind)
        if layer.startswith("attn."):  # rows of the packed in_proj_weight (q, k, v) or out_proj
            part = {"attn.q_proj": 0, "attn.k_proj": 1, "attn.v_proj": 2}.get(layer)
            full = params["attn.in_proj_weight"] if part is not None else params["attn.out_proj.weight"]
            torch_w = full.detach().numpy()[part * 6:(part + 1) * 6] if part is not None else full.detach().numpy()
        else:
            torch_w = params[f"{layer}.weight"].detach().numpy().reshape(w.shape)
        assert np.abs(w - torch_w).max() == 0.0, f"{layer}: the bundle's weight is not the one torch trained"
        err = np.abs(torch_w - dual).max()
        assert err <= F64_TOL * max(1.0, np.abs(torch_w).max()), f"{layer} ({kind}): |W_T - (w0 + Σ v kᵀ)| = {err:.3g}"
        assert np.abs(torch_w - w0).max() > 1e-6, f"{layer}: did not train"
    m = _manifest(path)
    assert m["version"] == 2 and m["dual_form"] == {**m["dual_form"], "exact": True, "method": "adafactor"}
    assert m["optimizer"]["name"] == "adafactor"
    out = dualtui("verify", path)
    assert out.returncode == 0 and "primal == dual for every layer" in out.stdout, out.stdout + out.stderr


def test_adafactor_update_clipping_and_decay_are_in_the_chain(tmp_path: Path) -> None:
    """A configuration where RMS(U) > d (clipping) and decoupled decay act at every step."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    opt = torch.optim.Adafactor(model.parameters(), lr=0.5, d=1.0, weight_decay=0.2)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    rec = _train(model, opt, tmp_path / "r.safetensors", 8, inputs=x, labels=y)
    steps = rec.layers["0"].steps
    assert all(r.rule == "adafactor" and r.weight_decay == pytest.approx(0.1) for r in steps)
    for name in ("0", "2"):
        w, w0, dual = _bundle_weights(tmp_path / "r.safetensors", name, "linear")
        torch_w = dict(model.named_parameters())[f"{name}.weight"].detach().numpy()
        assert np.abs(torch_w - dual).max() <= F64_TOL


def test_adafactor_keys_are_inputs_rescaled_by_the_column_factor(tmp_path: Path) -> None:
    """At the first step (β̂ = 1) the column factor is the mean squared gradient of each input
    column: key = input / √c, value = √m · error / √r (docs/format.md, 4c)."""
    torch.manual_seed(2)
    lin = nn.Linear(4, 3, bias=False)
    model = nn.Sequential(lin, nn.Tanh(), nn.Linear(3, 2, bias=False))
    opt = torch.optim.Adafactor(model.parameters(), lr=0.1)
    x, y = torch.randn(4, 4), torch.randint(0, 2, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rec = Recorder(model, opt, tmp_path / "r.safetensors")
    with rec:
        with rec.batch(torch.arange(4), y):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        G = lin.weight.grad.clone()
        opt.step()
        opt.zero_grad()
    t = load_file(str(tmp_path / "r.safetensors"))
    c = (G * G).mean(dim=0).numpy()
    np.testing.assert_allclose(t["layer/0/keys"], x.numpy() / np.sqrt(c)[None, :], rtol=1e-12)


def test_adafactor_refuses_a_bias_a_convolution_and_tied_weights(tmp_path: Path) -> None:
    cases = {
        "has a bias": nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False)),
        "kernel axes": nn.Sequential(nn.Conv1d(2, 3, 3, bias=False), nn.Flatten(), nn.Linear(3, 2, bias=False)),
    }
    for why, model in cases.items():
        with pytest.raises(RecorderError, match=why):
            Recorder(model, torch.optim.Adafactor(model.parameters()), tmp_path / "r.safetensors")
    assert not list(tmp_path.iterdir())


def test_adafactor_floor_stops_before_the_step(tmp_path: Path) -> None:
    """Input 0 is exactly zero for two steps (a zero column: exact, its factor is 0), then 1e-9:
    V's floor eps1² then changes coordinates whose gradient is not zero. The recording stops
    before that step is applied, and the bundle of the steps before it is exact."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 3, bias=False))
    opt = torch.optim.Adafactor(model.parameters(), lr=0.05, eps=(1e-6, 1e-3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    x[:8, 0], x[8:, 0] = 0.0, 1e-9
    with pytest.raises(RecorderError, match="floor on its second-moment estimate") as e:
        _train(model, opt, tmp_path / "r.safetensors", 4, inputs=x, labels=y)
    assert "layer '0' step 2" in str(e.value)
    out = dualtui("verify", tmp_path / "r.safetensors")
    assert out.returncode == 0, out.stdout + out.stderr  # nothing applied that was not recorded
    assert _manifest(tmp_path / "r.safetensors")["training"]["steps"] == 2


# ====================================================================== the coefficient chain
def test_adaptive_chain_matches_the_recurrence_it_describes() -> None:
    """(a, C) against the scalar recurrence run forwards: m = β1 m + (1 − β1) g, p = (1 − d) p − η m."""
    rng = np.random.default_rng(0)
    for rule in ("adam", "adafactor"):
        S = 12
        steps = [StepRecord(float(rng.uniform(0.01, 0.2)), 0.9 if rule == "adam" else 0.0, 0.0, False,
                            float(rng.uniform(0, 0.05)), bool(rng.integers(2)), bool(rng.random() > 0.2),
                            float(rng.uniform(0.5, 1.5)), rule) for _ in range(S)]
        g = rng.normal(size=S)
        p0 = 0.7
        p, m = p0, 0.0
        for rec_, gs in zip(steps, g):
            if not rec_.active:
                continue
            d = (-1.0 if rec_.maximize else 1.0) * rec_.scale * gs
            m = rec_.momentum * m + (1 - rec_.momentum) * d if rule == "adam" else d
            p = (1 - rec_.weight_decay) * p - rec_.lr * m
        a, C = adaptive_coefficients(steps)
        assert a * p0 + float(C @ g) == pytest.approx(p, rel=1e-12, abs=1e-14)


# ====================================================================== Adam: approximate, labelled
def _adam_run(tmp_path: Path, bias: bool = True) -> tuple[Path, nn.Module]:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8, bias=bias), nn.Tanh(), nn.Linear(8, 3, bias=bias))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    path = tmp_path / "adam.safetensors"
    _train(model, opt, path, 20, inputs=x, labels=y, approximate=True)
    return path, model


def test_adam_needs_approximate_and_warns(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(RecorderError, match="approximate=True"):
        Recorder(model, torch.optim.Adam(model.parameters()), tmp_path / "r.safetensors")
    with pytest.warns(UserWarning, match="approximation"):
        rec = Recorder(model, torch.optim.Adam(model.parameters()), tmp_path / "r.safetensors", approximate=True)
    rec.abort()


def test_adam_residual_matches_brute_force(tmp_path: Path) -> None:
    path, model = _adam_run(tmp_path)
    m = _manifest(path)
    assert m["version"] == 3 and m["dual_form"]["exact"] is False and m["optimizer"]["name"] == "adamw"
    t = load_file(str(path))
    params = dict(model.named_parameters())
    for layer in ("0", "2"):
        W = params[f"{layer}.weight"].detach().numpy()
        b = params[f"{layer}.bias"].detach().numpy()
        w0, b0 = t[f"layer/{layer}/w0"], t[f"layer/{layer}/b0"]
        v, k, step = t[f"layer/{layer}/values"], t[f"layer/{layer}/keys"], t[f"layer/{layer}/step"]
        scale = t[f"layer/{layer}/bias_scale"][step] if f"layer/{layer}/bias_scale" in t else np.ones(len(v))
        R = W - w0 - v.T @ k
        Rb = b - b0 - scale @ v
        res = np.sqrt((R ** 2).sum() + (Rb ** 2).sum())
        change = np.sqrt(((W - w0) ** 2).sum() + ((b - b0) ** 2).sum())
        stated = m["dual_form"]["layers"][layer]
        assert stated["residual_norm"] == pytest.approx(res, rel=1e-9)
        assert stated["learned_change_norm"] == pytest.approx(change, rel=1e-9)
        assert stated["explained"] == pytest.approx(1 - res / change, rel=1e-9)
        assert 0.0 < stated["explained"] < 1.0  # an approximation, neither nothing nor exact
    out = dualtui("verify", path, "--json")
    report = json.loads(out.stdout)
    assert out.returncode == 1 and report["exact"] is False and report["ok"] is False  # not without --accept-approximate
    accepted = dualtui("verify", path, "--json", "--accept-approximate")
    assert accepted.returncode == 0 and json.loads(accepted.stdout)["ok"] is True
    for row in report["layers"]:
        assert row["approximate"] and row["residual_norm"] == pytest.approx(m["dual_form"]["layers"][row["name"]]["residual_norm"])


def test_adam_bundle_is_never_called_exact(tmp_path: Path) -> None:
    path, _ = _adam_run(tmp_path)
    run = dualtui
    v = run("verify", str(path))
    assert v.returncode == 1 and "primal == dual" not in v.stdout and "approximate (adam-rank1)" in v.stdout
    assert run("verify", str(path), "--accept-approximate").returncode == 0
    info = run("info", str(path))
    assert "APPROXIMATE dual form" in info.stdout
    for cmd in (["rank", "-t", "0"], ["layers", "-t", "0"], ["mass", "-t", "0"], ["votes"]):
        out = run(*cmd, str(path))
        assert out.returncode == 0, out.stderr
        assert "APPROXIMATE dual form (adam-rank1)" in out.stderr, cmd
        assert out.stdout.startswith("APPROXIMATE dual form"), cmd  # the table says it too (`> file` keeps it)
        js = run(*cmd, str(path), "--json")
        assert json.loads(js.stdout)["dual_form"]["exact"] is False, cmd
    rank = run("rank", "-t", "0", str(path))
    assert "not attributed to any pattern" in rank.stdout
    layers = json.loads(run("layers", "-t", "0", str(path), "--json").stdout)["layers"]
    assert all(r["residual_share"] > 1e-3 for r in layers)


def test_adam_mass_has_the_residual_effect_as_its_own_row(tmp_path: Path) -> None:
    """`mass`: the effect no pattern is attributed, Σ_r g_r · (R q_r + R_b), recomputed here
    from the stored tensors and the model's weights; with it the Σeffect column adds up to the
    first-order change of the target logit the layer learned."""
    path, model = _adam_run(tmp_path)
    t = load_file(str(path))
    params = dict(model.named_parameters())
    for test in (0, 3):
        d = json.loads(dualtui("mass", "-t", test, str(path), "--json").stdout)
        by_layer = {r["layer"]: r["effect_sum"] for r in d["not_attributed"]}
        for layer in ("0", "2"):
            W, b = params[f"{layer}.weight"].detach().numpy(), params[f"{layer}.bias"].detach().numpy()
            w0, b0 = t[f"layer/{layer}/w0"], t[f"layer/{layer}/b0"]
            v, k, step = t[f"layer/{layer}/values"], t[f"layer/{layer}/keys"], t[f"layer/{layer}/step"]
            scale = t[f"layer/{layer}/bias_scale"][step]
            mine = t[f"queries/test/layer/{layer}/item"] == test
            q, g = t[f"queries/test/layer/{layer}/query"][mine], t[f"queries/test/layer/{layer}/grad"][mine]
            R, Rb = W - w0 - v.T @ k, b - b0 - scale @ v
            expected = float(sum(gr @ (R @ qr + Rb) for qr, gr in zip(q, g)))
            assert by_layer[layer] == pytest.approx(expected, rel=1e-6, abs=1e-12)
            learned = float(sum(gr @ ((W - w0) @ qr + b - b0) for qr, gr in zip(q, g)))
            tasks = sum(r["effect_sum"] for r in d["tasks"] if r["layer"] == layer)
            assert tasks + by_layer[layer] == pytest.approx(learned, rel=1e-6, abs=1e-12)
    table = dualtui("mass", "-t", "0", str(path)).stdout
    assert table.count("not attributed") >= 2 * 3  # a row per layer in the task, class and step tables
    exact = tmp_path / "sgd.safetensors"
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    _train(m, torch.optim.SGD(m.parameters(), lr=0.1), exact, 5, inputs=torch.randn(32, 6), labels=torch.randint(0, 3, (32,)))
    assert "not_attributed" not in json.loads(dualtui("mass", "-t", "0", str(exact), "--json").stdout)


def test_version_3_needs_dual_form_and_approximate_needs_version_3(tmp_path: Path) -> None:
    from dualtui.bundle.errors import BundleError
    from dualtui.bundle.manifest import parse_manifest

    path, _ = _adam_run(tmp_path)
    m = _manifest(path)
    parse_manifest(json.dumps(m), path)
    for broken in ({**m, "version": 2}, {k: v for k, v in m.items() if k != "dual_form"}):
        with pytest.raises(BundleError):
            parse_manifest(json.dumps(broken), path)


def test_app_marks_an_approximate_bundle(tmp_path: Path) -> None:
    import asyncio

    from dualtui.bundle import Bundle
    from dualtui.tui.app import DualtuiApp
    from dualtui.tui.model import OpenRun
    from dualtui.tui.panes.layers import LayersPane

    path, _ = _adam_run(tmp_path)

    async def go() -> None:
        app = DualtuiApp(OpenRun(Bundle.open(path)))
        async with app.run_test(size=(120, 40)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.pause()
            for tab in "1234567":  # a banner on every tab
                await pilot.press(tab)
                await pilot.pause()
                banner = app.query_one("#approximate-banner")
                assert banner.display and banner.region.height >= 1 and "APPROXIMATE" in str(banner.render())
            await pilot.press("3")
            await pilot.pause()
            header = str(app.query_one("#spot-header").render())
            assert "not attributed to any pattern" in header
            await pilot.press("4")
            await pilot.pause()
            text = app.query_one(LayersPane).build(app.state).renderables
            assert any("not attributed" in str(getattr(r, "plain", r)) for r in text)
            await pilot.press("5")  # Tasks: the residual's effect beside the mass over training steps
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert "not attributed to any pattern" in str(app.query_one("#tasks-head").render())
            await pilot.press("1")
            app.query_one("OverviewPane").start_verify()
            await app.workers.wait_for_complete()
            await pilot.pause()
            assert "approximate dual form" in str(app.query_one("#verify-status").render())

    asyncio.run(go())
