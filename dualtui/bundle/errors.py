"""Named, one-line errors for everything that can be wrong with a bundle file."""

from __future__ import annotations


class BundleError(Exception):
    """A bundle (or a file given as one) is unreadable or breaks format v1.

    `str(error)` is one line: the file and what is wrong with it.
    """

    kind = "invalid bundle"

    def __init__(self, path: object, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(f"{_one_line(self.path)}: {self.kind}: {_one_line(detail)}")


def _one_line(text: str) -> str:
    """Escape control characters (a newline in a file name) so the message stays one line."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


class NotSafetensors(BundleError):
    kind = "not a safetensors file"


class TruncatedFile(BundleError):
    kind = "truncated file"


class HeaderTooLarge(BundleError):
    kind = "header too large"


class MissingManifest(BundleError):
    kind = "missing manifest"


class BadManifest(BundleError):
    kind = "unparseable manifest"


class UnsupportedVersion(BundleError):
    kind = "unknown format version"


class MissingTensor(BundleError):
    kind = "missing tensor"


class ShapeMismatch(BundleError):
    kind = "shape disagrees with manifest"


class DtypeMismatch(BundleError):
    kind = "dtype disagrees with manifest"


class IdOutOfRange(BundleError):
    kind = "id out of range"


class NonFinite(BundleError):
    kind = "non-finite values"


class BadOrder(BundleError):
    kind = "steps out of order"


class UnreadableFile(BundleError):
    kind = "unreadable file"


class DuplicateKey(ValueError):
    """A JSON object names one key twice: readers would disagree on its value."""


def no_duplicates(pairs: list) -> dict:
    """json.loads(object_pairs_hook=...): refuse an object with a key given twice (Python keeps
    the last, other readers the first or an error: a bundle must mean one thing)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(f"the key {k[:60]!r} appears twice in one object")
        out[k] = v
    return out
