"""Recording: hooks for users' own SGD training loops, coefficients, built-in experiments."""

from .coefficients import StepRecord, sgd_coefficients
from .recorder import Recorder, RecorderError

__all__ = ["Recorder", "RecorderError", "StepRecord", "sgd_coefficients"]
