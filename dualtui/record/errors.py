"""The recorder's one error type, importable without torch (the CLI maps it to an exit code)."""


class RecorderError(Exception):
    """The model, optimizer or training loop cannot be recorded exactly (one-line message)."""
