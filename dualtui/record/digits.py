"""Built-in experiment: an MLP trained with SGD + momentum on scikit-learn's real 8×8 digits.

Settings: `single` (one task, all ten digits), `multitask` (tasks "digits 0-4" and "digits
5-9" trained jointly, mixed batches) and `continual` (the same two tasks one after the other,
which shows forgetting and lets the spotlight show which training phase a prediction uses).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .adaptive import EXPERIMENT_LR, experiment_optimizer
from .recorder import Approximate, Recorder, interruption

SETTINGS = ("single", "multitask", "continual")
TWO_TASKS = ["digits 0-4", "digits 5-9"]


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 32, bias: bool = True, in_features: int = 64, init_scale: float = 1.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden, bias=bias), nn.ReLU(),
            nn.Linear(hidden, hidden, bias=bias), nn.ReLU(),
            nn.Linear(hidden, 10, bias=bias),
        )
        if init_scale != 1.0:  # the pseudo-kernel question: how the initial weights' scale shapes what is learned
            with torch.no_grad():
                for p in self.parameters():
                    p.mul_(init_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class DigitsData:
    x_train: torch.Tensor  # [N, 64] float32 in [0, 1]
    y_train: torch.Tensor
    task_train: torch.Tensor
    img_train: np.ndarray  # [N, 8, 8] uint8 for previews
    x_test: torch.Tensor
    y_test: torch.Tensor
    task_test: torch.Tensor
    img_test: np.ndarray
    tasks: list[str]
    continual: bool = False  # train the tasks one after the other (task 0, then task 1, ...)


def load_digits_split(setting: str, seed: int = 0, test_fraction: float = 0.2) -> DigitsData:
    """The 1,797 digits, split once (stratified, `seed` 0 unless asked) into train and test.
    `record_digits` always uses seed 0, so runs with different seeds (votes over seeds,
    compare) share their test items."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=seed, stratify=y)
    tasks = ["digits 0-9"] if setting == "single" else TWO_TASKS
    task = np.zeros_like(y) if setting == "single" else (y >= 5).astype(np.int64)
    img = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    t = torch.from_numpy
    return DigitsData(
        t(x[idx_train]), t(y[idx_train]), t(task[idx_train]), img[idx_train],
        t(x[idx_test]), t(y[idx_test]), t(task[idx_test]), img[idx_test], tasks,
    )


def batch_schedule(setting: str, tasks: torch.Tensor, epochs: int, batch_size: int, gen: torch.Generator) -> tuple[list[torch.Tensor], list[int]]:
    """The example ids of every minibatch in training order, and the step count at the end
    of each epoch (of each task's epochs, in a continual setting)."""
    n_tasks = int(tasks.max()) + 1 if len(tasks) else 1
    phases = ([torch.arange(len(tasks))] if not setting.endswith("continual")
              else [torch.nonzero(tasks == k).flatten() for k in range(n_tasks)])
    batches: list[torch.Tensor] = []
    epoch_ends: list[int] = []
    for pool in phases:
        for _ in range(epochs):
            order = pool[torch.randperm(len(pool), generator=gen)]
            batches.extend(order[i : i + batch_size] for i in range(0, len(order), batch_size))
            epoch_ends.append(len(batches))
    return batches, epoch_ends


@dataclass
class DigitsResult:
    path: Path
    steps: int
    accuracy: dict[str, float]  # per task name, plus "all"
    interrupted: bool = False
    query_bytes: int | None = None  # bytes of the recorded test set (queries and their gradients)
    signal: int | None = None  # what interrupted training (SIGINT, SIGTERM, SIGHUP)


def record_digits(
    out: str | Path,
    setting: str = "single",
    *,
    epochs: int = 6,
    hidden: int = 32,
    batch_size: int = 32,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    clip_norm: float | None = None,
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
) -> DigitsResult:
    """Train on digits (recording the dual form unless record=False) and write the bundle.
    `labels` replaces the training labels (the mislabel benchmark flips some).

    `epochs` counts passes over each task's data (so `continual` trains epochs per task).
    `on_epoch(epoch, model, optimizer)` runs after each epoch (e.g. to save checkpoints).
    """
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    data = load_digits_split(setting)  # one fixed split: runs of any seed answer for the same test items
    data.continual = setting == "continual"
    replace_labels(data, labels)
    command = (f"dualtui record digits --setting {setting} --epochs {epochs} --hidden {hidden} --seed {seed}"
               + (f" --optimizer {optimizer}" if optimizer != "sgd" else "")
               + (f" --init-scale {init_scale:g}" if init_scale != 1.0 else "")
               + (f" --train-queries {train_queries}" if train_queries else ""))
    return train_image_classifier(
        out, data, setting, name="digits", dataset="sklearn digits 8x8", shape=[8, 8], command=command,
        epochs=epochs, hidden=hidden, batch_size=batch_size, lr=lr, momentum=momentum, weight_decay=weight_decay,
        clip_norm=clip_norm, storage_dtype=storage_dtype, seed=seed, record=record, on_step=on_step, on_epoch=on_epoch,
        check_attribution=check_attribution, journal_every=journal_every, optimizer=optimizer, bias=bias,
        init_scale=init_scale, train_queries=train_queries)


def train_image_classifier(
    out: str | Path,
    data: DigitsData,
    setting: str,
    *,
    name: str,
    dataset: str,
    shape: list[int],
    command: str,
    epochs: int,
    hidden: int,
    batch_size: int,
    lr: float | None,
    momentum: float,
    weight_decay: float,
    clip_norm: float | None,
    storage_dtype: str,
    seed: int,
    record: bool,
    on_step: Callable[[int, int], None] | None,
    on_epoch: Callable[[int, nn.Module, torch.optim.Optimizer], None] | None,
    check_attribution: bool,
    journal_every: int,
    optimizer: str,
    bias: bool | None,
    init_scale: float = 1.0,
    train_queries: int = 0,
    extra: dict | None = None,
    extra_queries: dict[str, tuple] | None = None,
) -> DigitsResult:
    """The built-in image experiments (digits, MNIST): an MLP in→H→H→10 trained on `data`
    (tasks one after the other when data.continual), recorded unless record=False. With
    `train_queries` N, N training examples (a fixed, class-stratified draw) are recorded as the
    query set "train" beside the test set; `extra_queries` {name: (x, labels, tasks, previews)}
    adds more (e.g. out-of-distribution items)."""
    torch.manual_seed(seed)
    lr = lr if lr is not None else EXPERIMENT_LR.get(optimizer, 0.05)
    bias = optimizer != "adafactor" if bias is None else bias  # Adafactor is exact for bias-free layers
    model = DigitsMLP(hidden, bias=bias, in_features=int(np.prod(shape)), init_scale=init_scale)
    opt = experiment_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    batches, epoch_ends = batch_schedule("continual" if data.continual else "single", data.task_train, epochs, batch_size, gen)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(batches), eta_min=lr * 0.1)
    phase_ends = [epoch_ends[(k + 1) * epochs - 1] for k in range(len(epoch_ends) // epochs)] if data.continual else []
    rec = None
    if record:
        with warnings.catch_warnings():  # the command says it after the run, from the bundle
            warnings.simplefilter("ignore", Approximate)
            rec = Recorder(
                model, opt, out,
                tasks=data.tasks, classes=[str(i) for i in range(10)],
                input={"kind": "image", "shape": list(shape)},
                storage_dtype=storage_dtype, clip_norm=clip_norm, output_layout="batch-first",
                check_attribution=check_attribution, journal_every=journal_every, approximate=optimizer == "adamw",
                train_inputs=data.img_train, train_labels=data.y_train, train_tasks=data.task_train,
                training={"steps": len(batches), "batch_size": batch_size, "epochs": epochs, "setting": setting,
                          "epoch_end_steps": epoch_ends,
                          # continual: the steps [start, end) spent on each task, for marking task boundaries
                          **({"task_phases": [[a, b] for a, b in zip([0] + phase_ends[:-1], phase_ends)]} if data.continual else {}),
                          "dataset": dataset, "schedule": "cosine", "clip_norm": clip_norm, "seed": seed,
                          "init_scale": init_scale},
                extra={"experiment": {"name": name, "setting": setting, "hidden": hidden, "optimizer": optimizer,
                                      "bias": bias, "init_scale": init_scale, "command": command, **(extra or {})}},
            )
    interrupted = False
    signum = None
    try:
        model.train()
        if on_step:
            on_step(0, len(batches))  # training starts (the progress bar appears)
        for s, ids in enumerate(batches):
            ctx = rec.batch(example=ids, label=data.y_train[ids], task=data.task_train[ids]) if rec else _null()
            with ctx:
                loss = nn.functional.cross_entropy(model(data.x_train[ids]), data.y_train[ids])
                loss.backward()
            if clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if on_step:
                on_step(s + 1, len(batches))
            if on_epoch and s + 1 in epoch_ends:
                on_epoch(epoch_ends.index(s + 1) + 1, model, opt)
    except KeyboardInterrupt as e:
        interrupted = True
        signum = getattr(e, "signum", None)
        if rec:
            rec.interrupted = interruption(e)
    except BaseException as e:
        if rec:  # keep every completed step (a full disk: close() says what it kept)
            rec.interrupted = type(e).__name__
            rec.close()
        raise
    try:
        if rec:
            preds = rec.record_test(data.x_test, data.y_test, data.task_test, preview=data.img_test)
            if train_queries:
                ids = train_query_ids(data.y_train.numpy(), train_queries, seed)
                # target = the training label: the logit each example was trained to raise (self-scores
                # of a mislabelled example are about its wrong label, which only its own patterns support)
                rec.record_test(data.x_train[ids], data.y_train[ids], data.task_train[ids], name="train",
                                preview=data.img_train[ids], examples=torch.from_numpy(ids), target="label")
            for qname, (qx, qy, qt, qimg) in (extra_queries or {}).items():
                rec.record_test(qx, qy, qt, name=qname, preview=qimg)
        else:
            with torch.no_grad():
                preds = model.eval()(data.x_test).argmax(-1).numpy()
    except KeyboardInterrupt as e:  # while the test queries were recorded: the bundle goes without them
        interrupted, preds = True, None
        signum = signum or getattr(e, "signum", None)
        if rec:
            rec.interrupted = rec.interrupted or interruption(e)
    finally:
        path = rec.close() if rec else Path(out)
    signum = signum or (rec.late_signal if rec else None)
    acc: dict[str, float] = {}
    if preds is not None:
        correct = preds == data.y_test.numpy()
        acc = {name: float(correct[data.task_test.numpy() == k].mean()) for k, name in enumerate(data.tasks)}
        acc["all"] = float(correct.mean())
    steps = rec.step_count if rec else len(batches)
    qbytes = rec.query_sets["test"].bytes if rec and "test" in rec.query_sets else None
    return DigitsResult(Path(path), steps, acc, interrupted, qbytes, signum)


def replace_labels(data: DigitsData, labels: np.ndarray | None) -> None:
    if labels is None:
        return
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != tuple(data.y_train.shape) or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"labels: {len(labels)} classes in 0..9 needed, one per training example ({len(data.y_train)})")
    data.y_train = torch.from_numpy(labels.copy())


def train_query_ids(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n training example ids, stratified by class and drawn with `seed`: the query set
    "train" (the paper's 1,000-example training subset)."""
    rng = np.random.default_rng(seed + 7919)
    ids = rng.permutation(len(labels))
    # rank of each example within its class in the shuffled order: taking the lowest ranks
    # first takes every class in turn, so each gets its share (the rest fill in)
    within = np.empty(len(ids), dtype=np.int64)
    for c in np.unique(labels):
        mine = labels[ids] == c
        within[mine] = np.arange(int(mine.sum()))
    order = ids[np.lexsort((labels[ids], within))]
    return np.sort(order[: min(n, len(labels))])


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
