"""Public functional API: quantize / dequantize / pack / unpack on any backend.

Validation happens here, once, for every backend; results come back as the same kind of
array that was passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import Backend, array_kind, convert_like, get_backend
from .dtypes import canonical_dtype, dtype_name
from .format import META_DTYPES, OUT_DTYPES, n_groups, row_bytes
from .layout import nbytes_of
from .validation import (as_int, check_array, check_bits, check_codes, check_finite, check_float_tensor,
                         check_positive_int, normalize_axis)


@dataclass(frozen=True)
class QTensor:
    """A tensor quantized per group along one axis (docs/numerics.md §3, §5).

    Attributes:
        packed: uint8, ``shape`` with ``shape[axis]`` replaced by ``ceil(n*bits/8)``.
        scale, zero: ``meta_dtype``, ``shape`` with ``shape[axis]`` replaced by ``ceil(n/G)``
            (bfloat16 metadata is a uint16 bit pattern in NumPy).
        bits, group_size, axis (non-negative), shape (of the original tensor), meta_dtype.
    """

    packed: Any
    scale: Any
    zero: Any
    bits: int
    group_size: int
    axis: int
    shape: tuple[int, ...]
    meta_dtype: str

    @property
    def nbytes(self) -> int:
        """Stored bytes: codes + scales + zeros."""
        return nbytes_of([self.packed, self.scale, self.zero])

    @property
    def bits_per_element(self) -> float:
        n = 1
        for s in self.shape:
            n *= s
        return 8.0 * self.nbytes / n if n else 0.0


def quantize(x: Any, *, bits: int, group_size: int = 32, axis: int = -1, meta_dtype: str = "float16",
             backend: "str | Backend | None" = None) -> QTensor:
    """Quantize ``x`` in groups of ``group_size`` consecutive elements along ``axis``.

    Args:
        x: float16 / bfloat16 / float32 (float64 is rounded to float32) array or tensor.
        bits: code width, 1..8.
        group_size: elements sharing one (scale, zero); a partial last group is allowed.
        axis: the grouped (and packed) axis; keys use the token axis, values the channel axis.
        meta_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.
        backend: backend name or object; default ``$MIXKVQ_BACKEND`` or the array's kind.
    """
    check_float_tensor(x, "x")
    bits = check_bits(bits)
    group_size = check_positive_int(group_size, "group_size")
    meta_dtype = canonical_dtype(meta_dtype, allowed=META_DTYPES, what="meta_dtype")
    if len(x.shape) == 0:
        raise ValueError("x must have at least one dimension to quantize along")
    ax = normalize_axis(axis, len(x.shape))
    if x.shape[ax] == 0:
        raise ValueError(f"x has no elements along axis {axis}")
    be = get_backend(backend, like=x)
    check_finite(x, "x", be)
    xb = be.from_any(x).swapaxes(ax, -1)
    packed, scale, zero = (a.swapaxes(ax, -1) for a in be.quantize(xb, bits, group_size, meta_dtype, "x"))
    return QTensor(*(convert_like(a, x, be) for a in (packed, scale, zero)), bits, group_size, ax,
                   tuple(int(s) for s in x.shape), meta_dtype)


def dequantize(qt: QTensor, *, dtype: str = "float32", backend: "str | Backend | None" = None) -> Any:
    """Dequantize a :class:`QTensor` (``code * scale + zero``, §4) to ``dtype``."""
    if not isinstance(qt, QTensor):
        raise TypeError(f"dequantize expects a QTensor, got {type(qt).__name__}")
    dtype = canonical_dtype(dtype, allowed=OUT_DTYPES, what="dtype")
    check_bits(qt.bits, "QTensor.bits")
    check_positive_int(qt.group_size, "QTensor.group_size")
    canonical_dtype(qt.meta_dtype, allowed=META_DTYPES, what="QTensor.meta_dtype")
    if as_int(qt.axis) is None or not (0 <= qt.axis < len(qt.shape)):
        raise ValueError(f"QTensor.axis={qt.axis!r} is out of range for shape {qt.shape}")
    if dtype_name(qt.packed) != "uint8":
        raise TypeError(f"QTensor.packed must be uint8; got {dtype_name(qt.packed)}")
    stored = {"float16": ("float16",), "float32": ("float32",), "bfloat16": ("bfloat16", "uint16")}[qt.meta_dtype]
    for name, arr in (("scale", qt.scale), ("zero", qt.zero)):
        if dtype_name(arr) not in stored:
            raise TypeError(f"QTensor.{name} has dtype {dtype_name(arr)} but meta_dtype is {qt.meta_dtype}")
    n = qt.shape[qt.axis]
    expect_packed = qt.shape[: qt.axis] + (row_bytes(n, qt.bits),) + qt.shape[qt.axis + 1:]
    expect_meta = qt.shape[: qt.axis] + (n_groups(n, qt.group_size),) + qt.shape[qt.axis + 1:]
    for name, arr, expect in (("packed", qt.packed, expect_packed), ("scale", qt.scale, expect_meta), ("zero", qt.zero, expect_meta)):
        if tuple(arr.shape) != expect:
            raise ValueError(f"QTensor.{name} has shape {tuple(arr.shape)}, expected {expect} for shape {qt.shape}")
    be = get_backend(backend, like=qt.packed)
    arrays = [be.from_any(a).swapaxes(qt.axis, -1) for a in (qt.packed, qt.scale, qt.zero)]
    y = be.dequantize(*arrays, qt.bits, qt.group_size, n, dtype).swapaxes(qt.axis, -1)
    return convert_like(y, qt.packed, be)


def pack(codes: Any, bits: int, axis: int = -1, *, backend: "str | Backend | None" = None) -> Any:
    """Pack integer codes (``0 <= c < 2**bits``) LSB-first along ``axis`` into uint8 (§5)."""
    bits = check_bits(bits)
    check_array(codes, "codes")
    be = get_backend(backend, like=codes)
    ax = normalize_axis(axis, len(codes.shape))
    if not dtype_name(codes).startswith(("int", "uint")):
        raise TypeError(f"codes must be an integer array; got dtype {dtype_name(codes)}")
    wide = _cast(codes, "int64")  # exact for every integer dtype, whatever the library supports
    check_codes(wide, bits, get_backend(array_kind(codes)))
    # uint8 before the backend sees it: no backend may read uint16 codes as bfloat16 bits
    out = be.pack(be.from_any(_cast(wide, "uint8")).swapaxes(ax, -1), bits).swapaxes(ax, -1)
    return convert_like(out, codes, be)


def _cast(x: Any, dtype: str) -> Any:
    """Cast an array within its own library (NumPy, CuPy or torch)."""
    if array_kind(x) == "torch":
        import torch

        return x.to(getattr(torch, dtype))
    return x.astype(dtype)


def unpack(packed: Any, bits: int, n: int, axis: int = -1, *, backend: "str | Backend | None" = None) -> Any:
    """Unpack ``n`` codes of ``bits`` bits per row along ``axis`` (inverse of :func:`pack`)."""
    bits = check_bits(bits)
    check_array(packed, "packed")
    n_int = as_int(n)
    if n_int is None or n_int < 0:
        raise ValueError(f"n must be a non-negative integer; got {n!r}")
    n = n_int
    be = get_backend(backend, like=packed)
    ax = normalize_axis(axis, len(packed.shape))
    if dtype_name(packed) != "uint8":
        raise TypeError(f"packed must be a uint8 array; got dtype {packed.dtype}")
    if packed.shape[ax] != row_bytes(n, bits):
        raise ValueError(f"packed has {packed.shape[ax]} bytes along axis {axis}; {n} codes of {bits} bits need {row_bytes(n, bits)}")
    out = be.unpack(be.from_any(packed).swapaxes(ax, -1), bits, n).swapaxes(ax, -1)
    return convert_like(out, packed, be)
