"""Files the app writes (rankings as CSV/JSON, screenshots as SVG): names made only of safe
characters whatever the bundle's layer and query set names hold, always inside the export
folder the user chose, never over an existing file."""

from __future__ import annotations

import os
import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 200  # well under every file system's 255-byte limit, suffixes included


def safe_name(stem: str, ext: str) -> str:
    """A file name from `stem` (which may hold a bundle's names): runs of anything but ASCII
    letters, digits and ._+- become one "_", so no "/", "..", control character or leading
    dot can survive; long stems are cut."""
    clean = _UNSAFE.sub("_", stem).strip("._") or "dualtui"
    return f"{clean[:MAX_NAME]}.{ext}"


def write_new(folder: Path, name: str, text: str) -> Path:
    """Write `text` to folder/name, or to name-2, name-3, ... when that exists (created with
    O_EXCL: an existing file, or a symlink planted at the name, is never written through).
    Returns the path written; raises OSError when the folder cannot take it."""
    stem, dot, ext = name.rpartition(".")
    for n in range(1, 10_000):
        path = folder / (name if n == 1 else f"{stem}-{n}{dot}{ext}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except FileExistsError:
            continue
        try:
            # "replace": a character no UTF-8 file can hold (a lone surrogate) must not cost the export
            with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
                f.write(text)
        except BaseException:
            path.unlink(missing_ok=True)  # never leave a half-written file behind
            raise
        return path
    raise FileExistsError(f"{folder}: 9,999 files named like {name} already")
