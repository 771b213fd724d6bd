"""Built-in experiment: a small character-level causal Transformer trained with SGD on real text.

Every weight matrix is an `nn.Linear` or `nn.Embedding` (token and position embeddings, the
query/key/value/output projections of each attention block, the MLPs, the output head), and
the layer norms have no gain or bias, so the recorder covers every trained parameter: the
whole model is exactly attention over its training tokens. (`nn.MultiheadAttention` and
`nn.LSTM` keep their projections in fused parameters the recorder cannot see, hence the
explicit layers.)

Each position of each training window is one pattern per layer (`layer/<L>/position` filled);
a test item is a held-out window, and its query is the model's state when predicting the
character after it (the last position).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .adaptive import experiment_optimizer
from .recorder import Approximate, Recorder, interruption
from .text_corpus import Source, Windows, make_windows, read_corpus, stdlib_docstrings


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, bias: bool = True):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width, bias=bias)
        self.k = nn.Linear(width, width, bias=bias)
        self.v = nn.Linear(width, width, bias=bias)
        self.proj = nn.Linear(width, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        split = lambda t: t.view(B, L, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp: int, bias: bool = True):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, elementwise_affine=False)
        self.attn = CausalSelfAttention(width, heads, bias)
        self.ln2 = nn.LayerNorm(width, elementwise_affine=False)
        self.up = nn.Linear(width, mlp, bias=bias)
        self.down = nn.Linear(mlp, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, context: int, width: int = 32, blocks: int = 2, heads: int = 2, mlp: int | None = None,
                 bias: bool = True):
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, mlp or 2 * width, bias) for _ in range(blocks))
        self.ln = nn.LayerNorm(width, elementwise_affine=False)
        self.head = nn.Linear(width, vocab, bias=bias)
        with torch.no_grad():  # small embeddings: the layer norms set the scale anyway
            self.tok.weight.mul_(0.1)
            self.pos.weight.mul_(0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        # Positions as a [B, L] batch (not [L]) so the recorder sees one pattern per token.
        pos = torch.arange(L, device=ids.device).expand(B, L)
        x = self.tok(ids) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


@dataclass
class TextConfig:
    context: int = 32
    width: int = 32
    blocks: int = 2
    heads: int = 2
    steps: int = 300
    batch_size: int = 16
    lr: float = 0.3
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    tests: int = 200
    max_chars: int | None = None  # use only the first max_chars characters of each corpus
    storage_dtype: str = "float32"
    seed: int = 0
    check_attribution: bool = True
    journal_every: int = 1024
    query_rows: str = "auto"  # record_test rows: "all" positions of every test window, or "focus" (the last)
    optimizer: str = "sgd"  # or "adafactor" (exact, bias-free layers), "adamw" (approximate); lr then its usual rate
    bias: bool | None = None  # the Linear layers' biases (default: all but with Adafactor)


@dataclass
class TextResult:
    path: Path
    steps: int
    accuracy: dict[str, float]  # next-character accuracy on the test items, per task and "all"
    train_loss: float  # mean loss over the last tenth of the steps
    patterns_per_layer: int
    interrupted: bool = False
    origins: list[str] = field(default_factory=list)
    query_bytes: int | None = None
    signal: int | None = None  # what interrupted training (SIGINT, SIGTERM, SIGHUP)  # bytes of the recorded test set (every position's queries and gradients)


@dataclass
class SizeEstimate:
    layers: int
    per_token: float  # bytes of dual memory per training token, all layers together
    total: int


def layer_shapes(cfg: TextConfig, vocab: int) -> list[tuple[str, int, int]]:
    """(kind, in, out) of every recorded layer, in forward order."""
    w, mlp = cfg.width, 2 * cfg.width
    block = [("linear", w, w)] * 4 + [("linear", w, mlp), ("linear", mlp, w)]
    return [("embedding", vocab, w), ("embedding", cfg.context, w)] + block * cfg.blocks + [("linear", w, vocab)]


def estimate_bytes(cfg: TextConfig, vocab: int) -> SizeEstimate:
    """Dual-memory size before training: per pattern, keys + values in the storage dtype (a token
    id for embeddings) and int64 step, example and position (DESIGN.md section 3)."""
    item = 4 if cfg.storage_dtype == "float32" else 2
    shapes = layer_shapes(cfg, min(vocab, 256))
    per = sum((8 if kind == "embedding" else item * i) + item * o + 24 for kind, i, o in shapes)
    tokens = cfg.steps * cfg.batch_size * cfg.context
    return SizeEstimate(len(shapes), float(per), int(per * tokens))


class TrainingDiverged(Exception):
    """The loss stopped being finite; the steps before it are kept in the bundle."""


def load_sources(corpus: list[Path] | None) -> list[Source]:
    return [read_corpus(p) for p in corpus] if corpus else [stdlib_docstrings()]


def truncate(sources: list[Source], max_chars: int | None) -> list[Source]:
    if max_chars is None:
        return sources
    return [s if len(s.text) <= max_chars else Source(s.name, s.text[:max_chars], f"{s.origin} (first {max_chars:,} characters)")
            for s in sources]


def training_windows(windows: Windows, cfg: TextConfig) -> np.ndarray:
    """Indices of the training windows the run will visit: all of them, or when the steps
    cannot reach every window, an evenly spread subset (so train/* holds only what was used)."""
    n = len(windows.train)
    want = cfg.steps * cfg.batch_size
    if want >= n:
        return np.arange(n)
    gen = np.random.default_rng(cfg.seed)
    return np.sort(gen.choice(n, size=want, replace=False))


def _bias(cfg: TextConfig) -> bool:
    return cfg.optimizer != "adafactor" if cfg.bias is None else cfg.bias


def record_text(
    out: str | Path,
    corpus: list[Path] | None = None,
    cfg: TextConfig | None = None,
    *,
    record: bool = True,
    sources: list[Source] | None = None,
    windows: Windows | None = None,
    on_step: Callable[[int, int, float], None] | None = None,
    command: str | None = None,
) -> TextResult:
    """Train the character Transformer on `corpus` (default: Python's docstrings), recording
    its dual form unless record=False, and write the bundle. Each corpus file is one task.
    `windows`: already cut from the sources with this cfg (the CLI cuts them first, to refuse a
    bad corpus before anything is printed or trained)."""
    cfg = cfg or TextConfig()
    if windows is None:
        sources = sources if sources is not None else load_sources(corpus)
        windows = make_windows(truncate(sources, cfg.max_chars), cfg.context, tests=cfg.tests)
    chosen = training_windows(windows, cfg)
    train = torch.from_numpy(windows.train[chosen])  # [N, context + 1]
    train_task = torch.from_numpy(windows.train_task[chosen])
    test = torch.from_numpy(windows.test)
    n = len(train)
    vocab = windows.vocab.tokens

    torch.manual_seed(cfg.seed)
    model = CharTransformer(len(vocab), cfg.context, cfg.width, cfg.blocks, cfg.heads, bias=_bias(cfg))
    opt = experiment_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.steps, eta_min=cfg.lr * 0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[torch.Tensor] = []
    while len(order) < cfg.steps:
        perm = torch.randperm(n, generator=gen)
        order.extend(perm[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size))
    batches = order[: cfg.steps]

    rec = None
    if record:
        with warnings.catch_warnings():  # the command says it after the run, from the bundle
            warnings.simplefilter("ignore", Approximate)
            rec = Recorder(
                model, opt, out,
                tasks=windows.tasks, classes=vocab,
                input={"kind": "text", "vocab": vocab, "context": cfg.context, "tokenizer": "characters",
                       "window": "train/input and test/input rows hold context + 1 tokens: the inputs, then the target of the last position"},
                storage_dtype=cfg.storage_dtype, clip_norm=cfg.clip_norm,
                output_layout="batch-first",  # [windows, positions, vocab]: the attribution check decides each layer
                check_attribution=cfg.check_attribution, journal_every=cfg.journal_every,
                approximate=cfg.optimizer == "adamw",
                # train/label of a window is the token after it; class masses of text runs use the
                # token after each pattern's own position instead (DESIGN.md section 3).
                train_inputs=train.numpy(), train_labels=train[:, -1], train_tasks=train_task,
                training={"steps": cfg.steps, "batch_size": cfg.batch_size, "schedule": "cosine", "clip_norm": cfg.clip_norm,
                          "seed": cfg.seed, "dataset": "; ".join(windows.origins),
                          "train_characters": int(n * cfg.context), "held_out_characters": int(sum(t for _, t in windows.chars))},
                extra={"experiment": {"name": "text", "model": "character-level causal Transformer",
                                      "context": cfg.context, "width": cfg.width, "blocks": cfg.blocks, "heads": cfg.heads,
                                      "optimizer": cfg.optimizer, "bias": _bias(cfg),
                                      "corpus": windows.origins, "command": command or "dualtui record text"}},
            )
    interrupted = False
    signum = None
    losses: list[float] = []
    tokens = 0  # training tokens seen (a pass's last batch may be short)
    try:
        model.train()
        if on_step:
            on_step(0, len(batches), None)  # training starts (the progress bar appears)
        for s, ids in enumerate(batches):
            x, y = train[ids, :-1], train[ids, 1:]
            ctx = rec.batch(example=ids, task=train_task[ids]) if rec else contextlib.nullcontext()
            with ctx:
                logits = model(x)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                if not math.isfinite(float(loss.detach())):  # before backward: no NaN reaches the weights
                    raise TrainingDiverged(f"the loss became {float(loss.detach())} at step {s}; lower --lr or set --clip-norm")
                loss.backward()
            if cfg.clip_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            losses.append(float(loss.detach()))
            tokens += x.numel()
            if on_step:
                on_step(s + 1, len(batches), losses[-1])
    except KeyboardInterrupt as e:
        interrupted = True
        signum = getattr(e, "signum", None)
        if rec:
            rec.interrupted = interruption(e)
    except BaseException as e:
        if rec:  # keep every completed step: the bundle says why training stopped
            rec.interrupted = type(e).__name__
            rec.close()
        raise
    try:
        labels = test[:, -1]
        if rec:
            preds = rec.record_test(test[:, :-1], labels, torch.from_numpy(windows.test_task), preview=windows.test,
                                    rows=cfg.query_rows)
        else:
            with torch.no_grad():
                preds = model.eval()(test[:, :-1])[:, -1].argmax(-1).numpy()
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
        correct = preds == labels.numpy()
        acc = {name: float(correct[windows.test_task == k].mean()) for k, name in enumerate(windows.tasks)}
        acc["all"] = float(correct.mean())
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    steps = rec.step_count if rec else len(losses)
    qbytes = rec.query_sets["test"].bytes if rec and "test" in rec.query_sets else None
    return TextResult(Path(path), steps, acc, float(np.mean(tail)), tokens,
                      interrupted, windows.origins, qbytes, signum)

