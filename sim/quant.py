"""§3–§4 affine quantization along the last axis, one float32 operation per line."""

from __future__ import annotations

import numpy as np

from mixkvq.format import meta_overflow_error, n_groups, range_overflow_error

from .floats import cast_output, half_bits, half_bits_to_float32, meta_isinf, meta_to_float32, round_meta, to_float32
from .packing import pack, unpack


def _groups(x32: np.ndarray, group_size: int) -> np.ndarray:
    """``(..., n)`` -> ``(..., ceil(n/G), G)``; a partial last group is padded with its own
    last element, which changes neither its minimum nor its maximum."""
    n = x32.shape[-1]
    ng = n_groups(n, group_size)
    pad = ng * group_size - n
    if pad:
        x32 = np.concatenate([x32, np.repeat(x32[..., -1:], pad, axis=-1)], axis=-1)
    return x32.reshape(*x32.shape[:-1], ng, group_size)


def _per_element(meta32: np.ndarray, group_size: int, n: int) -> np.ndarray:
    """Broadcast per-group values ``(..., ng)`` back to ``(..., n)``."""
    return np.repeat(meta32, group_size, axis=-1)[..., :n]


def group_min_max(x32: np.ndarray, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """§3 steps 1–2: per-group minimum and maximum, ``-0`` canonicalised to ``+0``."""
    groups = _groups(x32, group_size)
    zero = np.float32(0.0)
    return groups.min(axis=-1) + zero, groups.max(axis=-1) + zero


def quantize(x: np.ndarray, bits: int, group_size: int, meta_dtype: str = "float16", name: str = "x"):
    """§3: ``x (..., n)`` -> (packed uint8 ``(..., ceil(n*bits/8))``, scale, zero ``(..., ceil(n/G))``)."""
    x32 = to_float32(x)
    n = x32.shape[-1]
    levels = np.float32(2**bits - 1)
    mn, mx = group_min_max(x32, group_size)
    scale32 = (mx - mn) / levels  # float32 subtract, then float32 divide
    scale = round_meta(scale32, meta_dtype)
    zero = round_meta(mn, meta_dtype)
    bad = meta_isinf(scale, meta_dtype) | meta_isinf(zero, meta_dtype)
    if bad.any():
        raise meta_overflow_error(name, tuple(int(i) for i in np.argwhere(bad)[0]), meta_dtype)
    s32, z32 = meta_to_float32(scale, meta_dtype), meta_to_float32(zero, meta_dtype)
    with np.errstate(over="ignore"):
        top = s32 * levels  # the largest dequantized value: fl32(fl32(L * s) + z)
        top = top + z32
    far = ~np.isfinite(top)
    if far.any():
        raise range_overflow_error(name, tuple(int(i) for i in np.argwhere(far)[0]))
    s = _per_element(s32, group_size, n)
    z = _per_element(z32, group_size, n)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        d = x32 - z
        t = d / s
        c = np.clip(np.rint(t), 0, levels)
    codes = np.where(s == 0, np.float32(0), c).astype(np.uint8)
    return pack(codes, bits), scale, zero


def dequantize(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int, group_size: int, n: int,
               out_dtype: str = "float32", meta_dtype: str | None = None) -> np.ndarray:
    """§4: ``code * scale`` then ``+ zero``, two float32 roundings -> ``(..., n)`` in ``out_dtype``."""
    meta_dtype = meta_dtype or _meta_dtype_of(scale)
    codes = unpack(packed, bits, n).astype(np.float32)
    s = _per_element(meta_to_float32(scale, meta_dtype), group_size, n)
    z = _per_element(meta_to_float32(zero, meta_dtype), group_size, n)
    with np.errstate(over="ignore"):
        y = codes * s
        y = y + z
    return cast_output(y, out_dtype)


def _meta_dtype_of(scale: np.ndarray) -> str:
    """Stored metadata dtype: float16/float32 as themselves, uint16 = bfloat16 bit patterns."""
    return {"float16": "float16", "float32": "float32", "uint16": "bfloat16"}[str(scale.dtype)]


def encode_half(x: np.ndarray, high_dtype: str, name: str = "keys") -> np.ndarray:
    """§6 16-bit rows: ``(..., n)`` -> uint8 ``(..., 2n)`` little-endian ``high_dtype`` words."""
    words = half_bits(to_float32(x), high_dtype)
    inf = meta_isinf(words if high_dtype == "bfloat16" else words.view(np.float16), high_dtype)
    if inf.any():
        raise meta_overflow_error(name, tuple(int(i) for i in np.argwhere(inf)[0]), high_dtype, what="16-bit key channel")
    words = np.ascontiguousarray(words.astype("<u2"))
    return words.view(np.uint8).reshape(*words.shape[:-1], 2 * words.shape[-1])


def decode_half(packed: np.ndarray, high_dtype: str) -> np.ndarray:
    words = np.ascontiguousarray(packed, dtype=np.uint8).view("<u2")
    return half_bits_to_float32(words.astype(np.uint16), high_dtype)
