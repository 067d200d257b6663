"""Dtype names independent of the array library (the format's dtypes are in :mod:`mixkvq.format`).

Every backend reports an array's dtype through :func:`dtype_name`, so validation and
configuration speak one vocabulary: ``"float16"``, ``"bfloat16"``, ``"float32"``,
``"float64"`` (inputs only) and the integer/bool names for rejection messages.
"""

from __future__ import annotations

from typing import Any




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
