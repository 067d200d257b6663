"""Errors raised where the data itself cannot be represented (shared by every backend)."""

from __future__ import annotations


def raise_meta_overflow(name: str, index: tuple[int, ...], dtype: str, what: str = "scale/zero metadata") -> None:
    """§2: a scale, zero or 16-bit channel value overflowed its 16-bit dtype."""
    hint = "use meta_dtype='float32' or 'bfloat16'" if what.startswith("scale") else "use high_dtype='bfloat16'"
    raise ValueError(
        f"{name}: the {what} at group/row index {index} overflows {dtype} "
        f"(the values' range is too large for that dtype); {hint}"
    )
