"""Names of the floating dtypes the format knows, independent of the array library.

Every backend reports an array's dtype through :func:`dtype_name`, so validation and
configuration speak one vocabulary: ``"float16"``, ``"bfloat16"``, ``"float32"``,
``"float64"`` (inputs only) and the integer/bool names for rejection messages.
"""

from __future__ import annotations

from typing import Any

INPUT_DTYPES = ("float16", "bfloat16", "float32", "float64")
META_DTYPES = ("float16", "bfloat16", "float32")
HIGH_DTYPES = ("bfloat16", "float16")
OUT_DTYPES = ("float32", "float16", "bfloat16")

#: Largest finite magnitude of each 16/32-bit float format (used for output saturation).
FLOAT_MAX = {
    "float16": 65504.0,
    "bfloat16": 3.3895313892515355e38,
    "float32": 3.4028234663852886e38,
}

#: Bytes per element of each storage dtype.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def dtype_name(x: Any) -> str:
    """Canonical dtype name of a NumPy, CuPy or torch array (``"torch.float16"`` -> ``"float16"``)."""
    name = str(getattr(x, "dtype", type(x).__name__))
    return name.removeprefix("torch.")


def canonical_dtype(name: Any, *, allowed: tuple[str, ...], what: str) -> str:
    """Validate a dtype given by name (or as a dtype object) against ``allowed``."""
    text = str(name).removeprefix("torch.")
    if text not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {name!r}")
    return text
