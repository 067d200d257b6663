"""Float conversions of docs/numerics.md §1–§2, written out on bit patterns where NumPy has no type.

bfloat16 values are carried as their uint16 bit patterns (NumPy has no bfloat16 dtype).
"""

from __future__ import annotations

import numpy as np

from mixkvq.format import FLOAT_MAX


def to_float32(x: np.ndarray) -> np.ndarray:
    """§1: float16/bfloat16/float32 upcast exactly; float64 rounds to nearest even."""
    x = np.asarray(x)
    if x.dtype == np.float32:
        return x
    return x.astype(np.float32)


def bf16_bits(x32: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit pattern (uint16), round to nearest even. Finite inputs only."""
    u = np.ascontiguousarray(x32, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit pattern (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_meta(v32: np.ndarray, meta_dtype: str) -> np.ndarray:
    """§2 ``round_meta``: float32 -> stored metadata (float16, bfloat16 bits as uint16, float32)."""
    if meta_dtype == "float32":
        return np.asarray(v32, dtype=np.float32).copy()
    if meta_dtype == "float16":
        with np.errstate(over="ignore"):
            return np.asarray(v32, dtype=np.float32).astype(np.float16)
    if meta_dtype == "bfloat16":
        return bf16_bits(v32)
    raise ValueError(f"unknown metadata dtype {meta_dtype!r}")


def meta_to_float32(stored: np.ndarray, meta_dtype: str) -> np.ndarray:
    """Stored metadata -> float32 (exact)."""
    if meta_dtype == "bfloat16":
        return bf16_to_float32(stored)
    return np.asarray(stored).astype(np.float32)


def meta_isinf(stored: np.ndarray, meta_dtype: str) -> np.ndarray:
    if meta_dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16) & np.uint16(0x7FFF)) == np.uint16(0x7F80)
    return np.isinf(stored)


def half_bits(x32: np.ndarray, high_dtype: str) -> np.ndarray:
    """float32 -> 16-bit pattern of ``high_dtype`` (bfloat16 or float16), nearest even."""
    return round_meta(x32, high_dtype).view(np.uint16) if high_dtype == "float16" else bf16_bits(x32)


def half_bits_to_float32(bits: np.ndarray, high_dtype: str) -> np.ndarray:
    if high_dtype == "float16":
        return np.asarray(bits, dtype=np.uint16).view(np.float16).astype(np.float32)
    return bf16_to_float32(bits)


def cast_output(y32: np.ndarray, out_dtype: str) -> np.ndarray:
    """§4 output dtype: float32 as is; float16/bfloat16 saturate to the largest finite
    magnitude, then round to nearest even. bfloat16 needs the ``ml_dtypes`` package in NumPy."""
    if out_dtype == "float32":
        return y32
    limit = np.float32(FLOAT_MAX[out_dtype])
    y = np.clip(y32, -limit, limit)
    if out_dtype == "float16":
        return y.astype(np.float16)
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - depends on the environment
        raise TypeError(
            "NumPy has no bfloat16 dtype: install ml_dtypes, or dequantize to float32 / float16"
        ) from None
    return bf16_bits(y).view(ml_dtypes.bfloat16)

