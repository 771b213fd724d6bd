"""The process exit codes of every dualtui command (documented in the README)."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CHECK_FAILED = 1  # e.g. verify out of tolerance
    USAGE = 2  # unknown layer, index out of range, bad option value
    INVALID_BUNDLE = 3  # unreadable or invalid bundle / input file
    OUTPUT = 4  # the output cannot be written: missing folder, no permission, disk full, busy
    INTERRUPTED = 130  # SIGINT; SIGTERM exits 143 and SIGHUP 129 (128 + the signal's number)
