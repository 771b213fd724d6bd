"""The app's exports (x: CSV, j: JSON, s: SVG) go into the folder the user chose, under names
made of safe characters whatever the bundle's names hold, never over an existing file or
through a symlink planted at the name, and the app says where each went."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app as cli
from dualtui.tui.app import DualtuiApp
from dualtui.tui.export import safe_name
from dualtui.tui.model import OpenRun

ODD = "..\\..\\x y;$(rm)*?:|<>'\"`ESCAPED"  # printable, no "/": a layer name the format allows


@pytest.fixture(scope="module")
def odd_bundle(tmp_path_factory) -> Path:
    """A recorded bundle whose last layer is renamed ODD (names, tensors and manifest)."""
    from dualtui.record.digits import record_digits

    folder = tmp_path_factory.mktemp("odd")
    base = record_digits(folder / "base.safetensors", "single", epochs=1).path
    with safe_open(str(base), "np") as f:
        m = json.loads(f.metadata()["dualtui"])
    m.pop("checksums", None)
    old = m["layers"][-1]["name"]
    m["layers"][-1]["name"] = ODD
    rename = lambda n: n.replace(f"layer/{old}/", f"layer/{ODD}/")  # noqa: E731
    tensors = {rename(k): v for k, v in load_file(str(base)).items()}
    path = folder / "odd.safetensors"
    save_file(tensors, str(path), metadata={"dualtui": json.dumps(m)})
    return path


def test_safe_names_keep_only_safe_characters():
    for stem in (ODD, "../../etc/passwd", "\x1b]0;x\x07", ".hidden", "", "a" * 1000, "ü名"):
        name = safe_name(stem, "csv")
        assert name.endswith(".csv") and len(name) <= 204
        assert "/" not in name and "\\" not in name and not name.startswith(".")
        assert all(c.isascii() and (c.isalnum() or c in "._+-") for c in name), name
    assert safe_name("dualtui-test3-net.4-attention-pattern", "json") == "dualtui-test3-net.4-attention-pattern.json"


async def _press(app: DualtuiApp, keys: list[str]) -> list[str]:
    notes: list[str] = []
    async with app.run_test(size=(120, 36)) as pilot:
        while any(not w.is_finished for w in app.workers):
            await app.workers.wait_for_complete()
        await pilot.pause()
        for key in keys:
            await pilot.press(key)
            await pilot.pause()
        notes = [str(n.message) for n in app._notifications]
    return notes


def test_exports_stay_in_the_folder_never_overwrite_and_report_the_path(odd_bundle, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    planted = tmp_path / "victim.txt"
    planted.write_text("keep me")
    b = Bundle.open(odd_bundle)
    app = DualtuiApp(OpenRun(b, b.default_query_set), test=0, layer=ODD, export_dir=out)
    first = app.export_path("csv")
    (out / first.name.replace(".csv", ".json")).symlink_to(planted)  # a symlink planted at the JSON's name
    before = {p for p in tmp_path.rglob("*")}
    notes = asyncio.run(_press(app, ["x", "x", "X", "s", "s"]))
    written = sorted(p.name for p in out.iterdir() if not p.is_symlink())
    stem = first.name[: -len(".csv")]
    assert written == sorted([f"{stem}.csv", f"{stem}-2.csv", f"{stem}-2.json",
                              *[p.name for p in app.exported if p.suffix == ".svg"]]), written
    assert len([p for p in app.exported if p.suffix == ".svg"]) == 2
    assert planted.read_text() == "keep me"  # the symlink was not written through
    assert {p for p in tmp_path.rglob("*")} - before == set(app.exported)  # nothing anywhere else
    assert all(p.parent == out for p in app.exported)
    assert [n for n in notes if n.startswith("wrote ")] == [f"wrote {p}" for p in app.exported]
    assert (out / f"{stem}.csv").read_text() == (out / f"{stem}-2.csv").read_text()
    assert json.loads((out / f"{stem}-2.json").read_text())["layer"] == ODD


def test_open_refuses_an_export_folder_it_cannot_use(odd_bundle, tmp_path):
    r = CliRunner().invoke(cli, ["open", str(odd_bundle), "--export-dir", str(tmp_path / "missing")])
    assert r.exit_code == 4
    assert r.output.strip().count("\n") == 0 and "not a folder" in r.output
    f = tmp_path / "file"
    f.write_text("")
    r = CliRunner().invoke(cli, ["open", str(odd_bundle), "--export-dir", str(f)], env={"DUALTUI_EXPORT_DIR": ""})
    assert r.exit_code == 4


def test_an_export_that_cannot_be_written_is_a_notice_not_a_crash(odd_bundle, tmp_path):
    out = tmp_path / "gone"
    out.mkdir()
    b = Bundle.open(odd_bundle)
    app = DualtuiApp(OpenRun(b, b.default_query_set), test=0, export_dir=out)
    out.rmdir()  # the folder vanished while the app ran
    notes = asyncio.run(_press(app, ["x", "s"]))
    assert app.exported == [] and not out.exists()
    assert any(n.startswith("could not write") for n in notes) and any("could not save the screenshot" in n for n in notes)
    assert app.return_code in (None, 0)
