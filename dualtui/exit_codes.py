"""The process exit codes of every dualtui command (documented in the README)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1  # e.g. verify out of tolerance
    USAGE = 2  # unknown layer, index out of range, bad option value
    INVALID_BUNDLE = 3  # unreadable or invalid bundle / input file
    INTERRUPTED = 130
