"""Real text for `dualtui record text`: the user's corpus files, or Python's own docstrings.

Character-level tokens. The vocabulary is every character of the corpus (the most frequent
MAX_VOCAB − 1 when there are more, the rest mapped to UNKNOWN), sorted by code point, so the
same corpus always gives the same ids. No torch here: this is plain text handling.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_VOCAB = 256
UNKNOWN = "\ufffd"
# Pure-Python standard-library modules with long, well-written docstrings. Their text ships
# with every Python, so the default corpus needs no download and no committed data file.
DOCSTRING_MODULES = (
    "argparse", "ast", "asyncio.events", "base64", "bisect", "calendar", "collections", "configparser",
    "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "inspect", "ipaddress", "json", "logging", "mailbox", "pathlib", "pickle", "pprint",
    "queue", "random", "re", "sched", "secrets", "shlex", "shutil", "smtplib", "statistics", "string",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback",
    "typing", "unittest.case", "urllib.parse", "uuid", "warnings", "weakref", "zipfile",
)
DEFAULT_NAME = "python-docstrings"


class CorpusError(Exception):
    """A corpus that cannot be trained on (one-line message naming the file)."""


@dataclass
class Source:
    name: str  # the task name: a file's stem, or DEFAULT_NAME
    text: str
    origin: str  # where the text came from, for the manifest


def stdlib_docstrings() -> Source:
    """The docstrings of DOCSTRING_MODULES and their public classes and functions, in a fixed order."""
    parts: list[str] = []
    used = []
    for modname in DOCSTRING_MODULES:
        try:
            mod = importlib.import_module(modname)
        except Exception:  # noqa: BLE001 - a module missing from a trimmed Python is skipped
            continue
        used.append(modname)
        docs = [inspect.getdoc(mod) or ""]
        for name in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if name.startswith("_"):
                continue
            obj = getattr(mod, name, None)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == mod.__name__:
                docs.append(inspect.getdoc(obj) or "")
        parts.extend(d.strip() for d in docs if d and d.strip())
    import sys

    origin = f"docstrings of {len(used)} Python {sys.version_info.major}.{sys.version_info.minor} standard-library modules"
    return Source(DEFAULT_NAME, "\n\n".join(parts) + "\n", origin)


def read_corpus(path: Path) -> Source:
    """A UTF-8 text file, with a one-line CorpusError for anything that is not one."""
    p = Path(path)
    try:
        if p.is_dir():
            raise CorpusError(f"{p}: is a directory, not a text file")
        raw = p.read_bytes()
    except CorpusError:
        raise
    except FileNotFoundError:
        raise CorpusError(f"{p}: no such file") from None
    except PermissionError:
        raise CorpusError(f"{p}: permission denied") from None
    except OSError as e:
        raise CorpusError(f"{p}: cannot read ({e.strerror or e})") from None
    if not raw.strip():
        raise CorpusError(f"{p}: the corpus is empty")
    if b"\x00" in raw[:1 << 20]:
        raise CorpusError(f"{p}: looks binary (NUL bytes), not text; give a UTF-8 text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{p}: not UTF-8 text (bad byte at offset {e.start}); convert it, e.g. iconv -t UTF-8") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return Source(p.stem or p.name, text, str(p))


@dataclass
class Vocab:
    tokens: list[str]

    def __post_init__(self) -> None:
        self.index = {t: i for i, t in enumerate(self.tokens)}
        self.unknown = self.index.get(UNKNOWN)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of a text, vectorised over code points (a 20 MB corpus in well under a second)."""
        unk = self.unknown if self.unknown is not None else 0
        table = np.full(0x110000, unk, dtype=np.int64)  # code point -> id: one gather per text
        for t, i in self.index.items():
            if len(t) == 1:
                table[ord(t)] = i
        return table[_code_points(text)]

    def decode(self, ids: np.ndarray) -> str:
        return "".join(self.tokens[i] for i in np.asarray(ids).reshape(-1).tolist())


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)


def build_vocab(texts: list[str], max_size: int = MAX_VOCAB) -> Vocab:
    """Every character, or the max_size − 1 most frequent (ties: lower code point) + UNKNOWN."""
    counts = np.zeros(0x110000, dtype=np.int64)
    for t in texts:
        counts += np.bincount(_code_points(t), minlength=0x110000)
    present = np.nonzero(counts)[0]
    if len(present) <= max_size:
        return Vocab([chr(c) for c in present.tolist()])
    order = present[np.lexsort((present, -counts[present]))][: max_size - 1]
    return Vocab([chr(c) for c in sorted(order.tolist())] + [UNKNOWN])


@dataclass
class Windows:
    """Training and held-out windows of one or more sources (each source is a task)."""

    vocab: Vocab
    context: int
    train: np.ndarray  # [N, context + 1] token ids: inputs, then the last position's target
    train_task: np.ndarray  # [N]
    train_offset: np.ndarray  # [N] character offset of the window in its source
    test: np.ndarray  # [M, context + 1]: the context, then the true next token
    test_task: np.ndarray
    tasks: list[str]
    origins: list[str]
    chars: list[tuple[int, int]]  # per source: characters for training, held out


def make_windows(sources: list[Source], context: int, *, test_fraction: float = 0.1, tests: int = 200) -> Windows:
    """Cut each source into training text (the first 1 − test_fraction) and held-out text (the
    rest). Training windows do not overlap: window n covers characters [n·context, n·context +
    context], so each training character is exactly one (example, position) pair. Test items
    are `tests` windows spread evenly over the held-out text (shared out across sources)."""
    if context < 2:
        raise CorpusError(f"context must be at least 2 characters, not {context}")
    if not 0.0 < test_fraction < 1.0:
        raise CorpusError(f"the held-out fraction must be between 0 and 1, not {test_fraction}")
    vocab = build_vocab([s.text for s in sources])
    train, train_task, train_off, test, test_task, chars = [], [], [], [], [], []
    for k, s in enumerate(sources):
        ids = vocab.encode(s.text)
        cut = int(len(ids) * (1.0 - test_fraction))
        head, tail = ids[:cut], ids[cut:]
        if len(head) < 2 * (context + 1) or len(tail) < context + 1:
            least = int(max(2 * (context + 1) / (1.0 - test_fraction), (context + 1) / test_fraction)) + 2
            raise CorpusError(f"{s.origin}: {len(ids):,} characters is too short for --context {context}: "
                              f"need at least {least:,}")
        n = (len(head) - 1) // context
        starts = np.arange(n) * context
        train.append(np.lib.stride_tricks.sliding_window_view(head, context + 1)[::context][:n].copy())
        train_task.append(np.full(n, k, dtype=np.int64))
        train_off.append(starts)
        span = len(tail) - (context + 1)
        share = max(1, tests // len(sources) + (k < tests % len(sources)))  # `tests` in all, shared out
        m = min(share, span + 1)
        tstarts = np.unique(np.linspace(0, span, m).round().astype(np.int64))
        test.append(np.lib.stride_tricks.sliding_window_view(tail, context + 1)[tstarts].copy())
        test_task.append(np.full(len(tstarts), k, dtype=np.int64))
        chars.append((len(head), len(tail)))
    names = [s.name if [t.name for t in sources].count(s.name) == 1 else f"{s.name} ({k + 1})" for k, s in enumerate(sources)]
    return Windows(vocab, context, np.concatenate(train), np.concatenate(train_task), np.concatenate(train_off),
                   np.concatenate(test), np.concatenate(test_task), names, [s.origin for s in sources], chars)
