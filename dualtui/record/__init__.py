"""Recording: hooks for users' own SGD training loops, coefficients, built-in experiments.

Names are imported lazily so that `dualtui.record.errors` stays free of torch.
"""

from typing import Any

_EXPORTS = {"Recorder": "recorder", "RecorderError": "errors", "StepRecord": "coefficients",
            "sgd_coefficients": "coefficients", "coefficients": "coefficients"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
