"""Text runs: which token a training position was trained to predict, and plain-string context
windows around it (shared by `dualtui rank` and the app's export, so both print the same).

In a text bundle (input.kind "text") `train/input` holds token windows. dualtui's recorder
writes context + 1 tokens per window: the inputs, then the target of the last position, so the
token after position p is `train/input[e, p + 1]`. A window of only `context` tokens (another
writer) has no column for the last position's target; `train/label[e]` (the token after the
window) stands in for it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..bundle.reader import Bundle

def is_text(bundle: Bundle) -> bool:
    return bundle.manifest.input.get("kind") == "text" and bundle.has("train/input")


def labels_are_tokens(bundle: Bundle) -> bool:
    """A language-model run: text input whose classes are its vocabulary, so a label is a next
    token. Then a pattern's class is the token after its own position (not its window's label).
    A text classifier (classes "neg", "pos", ...) keeps per-example labels."""
    m = bundle.manifest
    return is_text(bundle) and bool(m.classes) and list(m.classes) == vocab(bundle)


def vocab(bundle: Bundle) -> list[str]:
    v = bundle.manifest.input.get("vocab")
    return [str(t) for t in v] if isinstance(v, list) else []


def position_span(bundle: Bundle) -> int:
    """How many positions a window has: the manifest's `context`, else the windows' width."""
    ctx = bundle.manifest.input.get("context")
    if isinstance(ctx, int) and ctx > 0:
        return ctx
    if bundle.has("train/input"):
        shape = bundle.info("train/input").shape
        if len(shape) == 2:
            return max(int(shape[1]), 1)
    return 1


class NextTokens:
    """The token each (example, position) was trained to predict, as a device lookup for the
    streaming pass (the numpy twin for a few rows is `next_tokens`)."""

    def __init__(self, bundle: Bundle, device: torch.device):
        windows = np.asarray(bundle.array("train/input"))
        if windows.ndim != 2:
            windows = windows.reshape(len(windows), -1)
        self.width = windows.shape[1]
        self.windows = torch.from_numpy(windows.astype(np.int64)).to(device)
        self.after = torch.from_numpy(bundle.array("train/label").astype(np.int64)).to(device)

    def __call__(self, example: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        nxt = (position + 1).clamp_(max=self.width - 1)
        inside = position + 1 < self.width
        return torch.where(inside, self.windows[example, nxt], self.after[example])


def next_tokens(bundle: Bundle, examples: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The tokens that (examples[i], positions[i]) were trained to predict (ranked rows: reads
    only those windows from the memory map)."""
    examples = np.asarray(examples, dtype=np.int64)
    positions = np.asarray(positions, dtype=np.int64)
    windows = bundle.array("train/input")
    windows = windows.reshape(len(windows), -1)
    after = positions + 1
    inside = after < windows.shape[1]
    got = windows[examples, np.minimum(after, windows.shape[1] - 1)].astype(np.int64)
    return np.where(inside, got, bundle.array("train/label")[examples].astype(np.int64))


def _decode(tokens: list[str], ids: np.ndarray) -> str:
    return "".join(tokens[i] if 0 <= i < len(tokens) else "?" for i in ids.tolist())


def position_context(bundle: Bundle, example: int, position: int, before: int = 24, after: int = 8) -> dict[str, str]:
    """Plain strings around one training position: up to `before` tokens, the attended token,
    the token it was trained to predict, and up to `after` tokens following that one."""
    tokens = vocab(bundle)
    span = position_span(bundle)
    row = bundle.array("train/input", example, example + 1)[0].reshape(-1).astype(np.int64)
    nxt = int(next_tokens(bundle, np.array([example]), np.array([position]))[0])
    return {
        "context_before": _decode(tokens, row[max(0, position - before) : position]),
        "token": _decode(tokens, row[position : position + 1]),
        "next_token": _decode(tokens, np.array([nxt])),
        "context_after": _decode(tokens, row[position + 2 : min(len(row), position + 2 + after, span + 1)]),
    }


def window_text(bundle: Bundle, example: int) -> str:
    """A training window's input tokens as one string."""
    row = bundle.array("train/input", example, example + 1)[0].reshape(-1).astype(np.int64)
    return _decode(vocab(bundle), row[: position_span(bundle)])


def test_text(bundle: Bundle, test: int, queries: str | None = None) -> str | None:
    """A query item's context (the tokens before the predicted one), when the bundle has it."""
    qs = bundle.queries(queries)
    if not qs.has("input"):
        return None
    row = qs.array("input", test, test + 1)[0].reshape(-1).astype(np.int64)
    return _decode(vocab(bundle), row[: position_span(bundle)])
