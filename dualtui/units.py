"""Human-readable sizes and dtype names, shared by the CLI and the app."""

from __future__ import annotations

DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
