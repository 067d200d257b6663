"""The one validation layer every backend shares.

Public entry points (``mixkvq.quantize``, ``KVCache.append`` …) call these checks before any
backend op runs, so op bodies may assume valid input and every backend rejects bad input
with the same message. Checks that need to look at the data (finiteness) ask the backend
for the first offending index through :meth:`Backend.first_nonfinite`.
"""

from __future__ import annotations

import math
import operator
from typing import TYPE_CHECKING, Any, Sequence

from .dtypes import dtype_name
from .format import INPUT_DTYPES

if TYPE_CHECKING:
    from .backend import Backend


def check_float_tensor(x: Any, name: str, *, ndim: int | None = None) -> str:
    """Check that ``x`` is an array of an accepted floating dtype (and rank); return the dtype name."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")
    dt = dtype_name(x)
    if dt not in INPUT_DTYPES:
        raise TypeError(
            f"{name} has dtype {dt}; expected one of {', '.join(INPUT_DTYPES)} "
            f"(cast integer or other data to a float dtype first)"
        )
    if ndim is not None and len(x.shape) != ndim:
        raise ValueError(
            f"{name} must have {ndim} dimensions (batch, heads, tokens, head_dim); "
            f"got shape {tuple(x.shape)}"
        )
    return dt


def check_finite(x: Any, name: str, backend: "Backend") -> None:
    """Reject NaN/Inf, naming the tensor and the first offending index (row-major)."""
    bad = backend.first_nonfinite(x)
    if bad is not None:
        index, value = bad
        raise ValueError(
            f"{name} contains a non-finite value ({value}) at index {tuple(index)}; "
            "NaN and Inf cannot be quantized — fix the producer of this tensor"
        )


def as_int(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (Python or NumPy, not bool), else None."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_bits(bits: Any, name: str = "bits", *, low: int = 1, high: int = 8) -> int:
    b = as_int(bits)
    if b is None or not (low <= b <= high):
        raise ValueError(f"{name} must be an integer in {low}..{high}; got {bits!r}")
    return b


def check_positive_int(value: Any, name: str) -> int:
    v = as_int(value)
    if v is None or v < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return v


def check_positive_finite(value: Any, name: str) -> float:
    """A Python int/float (not bool) that is finite and > 0, as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(value)


def normalize_axis(axis: Any, ndim: int, name: str = "axis") -> int:
    a = as_int(axis)
    if a is None or not (-ndim <= a < ndim):
        raise ValueError(f"{name}={axis!r} is out of range for a tensor with {ndim} dimensions")
    return a % ndim


def check_same_shape(a: Sequence[int], b: Sequence[int], name_a: str, name_b: str) -> None:
    if tuple(a) != tuple(b):
        raise ValueError(f"{name_a} has shape {tuple(a)} but {name_b} has shape {tuple(b)}; they must match")


def check_array(x: Any, name: str) -> None:
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}")


def check_codes(codes: Any, bits: int, backend: "Backend", name: str = "codes") -> None:
    """Codes must be an integer array (already in ``backend``'s type) whose values fit in ``bits``."""
    dt = dtype_name(codes)
    if not (dt.startswith("uint") or dt.startswith("int")):
        raise TypeError(f"{name} must be an integer array; got dtype {dt}")
    lo, hi = backend.min_max(codes)
    if lo is not None and (lo < 0 or hi >= (1 << bits)):
        raise ValueError(f"{name} holds values in [{lo}, {hi}], outside 0..{(1 << bits) - 1} for bits={bits}")
