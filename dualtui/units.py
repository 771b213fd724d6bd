"""Human-readable sizes and dtype names, shared by the CLI and the app."""

from __future__ import annotations

DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


SIGNIFICANT = 4  # digits every score shows, in the CLI tables and the app alike


def num(x: float, digits: int = SIGNIFICANT) -> str:
    """A score as text with `digits` significant digits, never fewer (trailing zeros kept, so
    -0.1002 is never shown as -0.1), fixed-point for 0.001 ≤ |x| < 100,000 and scientific
    outside it (-8.497e-05, not a -0.0000849 that reads like a small number cut short).
    --json and --csv keep full precision; this is for people."""
    x = float(x)
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    a = abs(x)
    if 1e-3 <= a < 1e5:
        text = f"{x:#.{digits}g}"
        if "e" not in text:
            return text.rstrip(".")
        if round(a) < 1e5:  # 10,000..99,999: all five digits, no exponent (12346, not 1.235e+04)
            return f"{x:.0f}"
        # else rounding carried into the next decade (99999.5 → 1.000e+05)
    mantissa, exp = f"{x:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exp):+03d}"
