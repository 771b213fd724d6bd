"""Per-tensor checksums: the writer stores one per tensor, `verify` recomputes them and names
the tensor that changed. The four silent corruptions of issue 12 (scaled queries, negated query
gradients, rotated training labels, shifted example ids) pass every other check of `verify`;
the checksums catch each. Digests are recomputed here independently, with xxhash over the
bytes the safetensors reference reader returns."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from torch import nn
from typer.testing import CliRunner

from dualtui.bundle import Bundle
from dualtui.cli import app
from dualtui.record import Recorder

runner = CliRunner()
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _record(path: Path, **kw) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(40, 12), torch.randint(0, 3, (40,))
    with Recorder(model, opt, path, **kw) as rec:
        for step in range(8):
            idx = torch.arange(step * 5, step * 5 + 5) % 40
            with rec.batch(example=idx, label=y[idx]):
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            opt.zero_grad()
        rec.record_test(torch.randn(6, 12), torch.randint(0, 3, (6,)))
    return rec.output if hasattr(rec, "output") else path


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "run.safetensors"
    _record(path)
    return path


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sharded") / "run.safetensors"
    _record(path, max_shard_bytes=4 << 10)
    index = path.with_name(path.name + ".index.json")
    assert index.exists() and not path.exists()
    return index


def _manifest(path: Path) -> dict:
    if path.name.endswith(".json"):
        return json.loads(json.loads(path.read_text())["metadata"]["dualtui"])
    with safe_open(str(path), "np") as f:
        return json.loads(f.metadata()["dualtui"])


def _tensors(path: Path) -> dict[str, np.ndarray]:
    if path.name.endswith(".json"):
        out = {}
        for shard in set(json.loads(path.read_text())["weight_map"].values()):
            out.update(load_file(str(path.parent / shard)))
        return out
    return load_file(str(path))


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_every_tensor_has_the_digest_of_its_bytes(which, request):
    path = request.getfixturevalue(which)
    m = _manifest(path)
    cs = m["checksums"]
    assert cs["algorithm"] == "xxh3-128"
    tensors = _tensors(path)
    assert set(cs["tensors"]) == set(tensors)
    for name, array in tensors.items():  # the reference reader's bytes, hashed independently
        assert cs["tensors"][name] == xxhash.xxh3_128_hexdigest(np.ascontiguousarray(array).tobytes()), name
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 0, r.output
    assert f"checksums: all {len(tensors)} tensors match (xxh3-128)" in r.output
    assert "checksums: xxh3-128 of" in runner.invoke(app, ["info", str(path)]).output


def _rewrite_tensor(path: Path, name: str, change) -> None:
    """Overwrite one tensor's bytes in place (same dtype and shape): header and manifest untouched,
    as a bit flip, a buggy tool or a careless edit would leave them."""
    b = Bundle.open(path)
    info = b.info(name)
    file = b._files[name].header.path
    new = np.ascontiguousarray(change(np.array(b.raw(name))))
    assert new.nbytes == info.end - info.start
    del b
    with open(file, "r+b") as f:
        f.seek(info.start)
        f.write(new.tobytes())


CORRUPTIONS = {
    "scaled queries": ("queries/test/layer/0/query", lambda a: a * 2),
    "negated query gradients": ("queries/test/layer/2/grad", lambda a: -a),
    "rotated training labels": ("train/label", lambda a: np.roll(a, 1)),
    "shifted example ids": ("layer/0/example", lambda a: (a + 1) % (a.max() + 1)),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
@pytest.mark.parametrize("which", ["single", "sharded"])
def test_checksums_catch_the_silent_corruptions(case, which, request, tmp_path):
    src = request.getfixturevalue(which)
    for f in src.parent.iterdir():
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / src.name
    name, change = CORRUPTIONS[case]
    _rewrite_tensor(path, name, change)
    # Everything else of verify passes: only the checksum can tell.
    quiet = runner.invoke(app, ["verify", str(path), "--no-checksums"])
    assert quiet.exit_code == 0, (case, quiet.output)
    assert "checksums: not checked (--no-checksums)" in quiet.output
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 1, r.output
    assert f"checksum: tensor '{name}' changed since it was written" in r.output
    assert "its layers were not checked" in r.output
    assert not CONTROL.search(r.output)
    j = json.loads(runner.invoke(app, ["verify", str(path), "--json"]).stdout)
    assert j["ok"] is False and j["checksums"]["changed"] == [name] and j["layers"] == []


def test_a_tensor_added_or_removed_is_reported(single, tmp_path):
    tensors, m = _tensors(single), _manifest(single)
    tensors["extra/thing"] = np.zeros(3, dtype=np.float32)
    path = tmp_path / "added.safetensors"
    save_file(tensors, str(path), metadata={"dualtui": json.dumps(m)})
    r = runner.invoke(app, ["verify", str(path), "--json"])
    assert r.exit_code != 0
    # A tensor outside the format's names is refused when the bundle opens (exit 3), so add
    # one the format knows instead: a second query set's tensor missing from the digests.
    m2 = dict(m)
    m2["checksums"] = {"algorithm": "xxh3-128", "tensors": {k: v for k, v in m["checksums"]["tensors"].items()
                                                            if k != "train/label"}}
    path2 = tmp_path / "unlisted.safetensors"
    save_file(_tensors(single), str(path2), metadata={"dualtui": json.dumps(m2)})
    r = runner.invoke(app, ["verify", str(path2)])
    assert r.exit_code == 1 and "tensor 'train/label' was added after the bundle was written" in r.output
    m3 = dict(m)
    m3["checksums"] = {"algorithm": "xxh3-128", "tensors": {**m["checksums"]["tensors"], "layer/0/gone": "0" * 32}}
    path3 = tmp_path / "missing.safetensors"
    save_file(_tensors(single), str(path3), metadata={"dualtui": json.dumps(m3)})
    r = runner.invoke(app, ["verify", str(path3)])
    assert r.exit_code == 1 and "tensor 'layer/0/gone' is missing (the writer stored it)" in r.output


def test_older_bundles_have_none_and_verify_as_before(single, tmp_path):
    m = _manifest(single)
    del m["checksums"]
    path = tmp_path / "old.safetensors"
    save_file(_tensors(single), str(path), metadata={"dualtui": json.dumps(m)})
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 0, r.output
    assert "checksums: none stored" in r.output
    assert "checksums: none stored" in runner.invoke(app, ["info", str(path)]).output
    assert json.loads(runner.invoke(app, ["info", str(path), "--json"]).stdout)["checksums"] is None


@pytest.mark.parametrize("bad", [[], {"algorithm": "crc7", "tensors": {}}, {"algorithm": "xxh3-128", "tensors": []},
                                 {"algorithm": "xxh3-128", "tensors": {"train/label": "XYZ"}},
                                 {"algorithm": "sha256", "tensors": {"train/label": "0" * 32}}])
def test_a_malformed_checksums_entry_is_one_line_and_exit_3(single, tmp_path, bad):
    m = _manifest(single)
    m["checksums"] = bad
    path = tmp_path / "bad.safetensors"
    save_file(_tensors(single), str(path), metadata={"dualtui": json.dumps(m)})
    for cmd in (["verify"], ["info"], ["rank", "--test", "0"]):
        r = runner.invoke(app, [*cmd, str(path)])
        assert r.exit_code == 3, (cmd, r.output)
        assert len(r.output.strip().splitlines()) == 1 and "checksums" in r.output


def test_sha256_from_another_writer_is_checked(single, tmp_path):
    import hashlib

    tensors, m = _tensors(single), _manifest(single)
    m["checksums"] = {"algorithm": "sha256",
                      "tensors": {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in tensors.items()}}
    path = tmp_path / "sha.safetensors"
    save_file(tensors, str(path), metadata={"dualtui": json.dumps(m)})
    r = runner.invoke(app, ["verify", str(path)])
    assert r.exit_code == 0 and "match (sha256)" in r.output, r.output
