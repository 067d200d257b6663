"""§5 bit packing: codes LSB-first into a byte stream along the last axis, rows padded apart."""

from __future__ import annotations

import numpy as np


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes ``(..., n)``, each ``< 2**bits`` -> uint8 ``(..., ceil(n*bits/8))``."""
    codes = np.asarray(codes).astype(np.uint8)
    n = codes.shape[-1]
    # (..., n, bits): bit j of element i is stream bit i*bits + j
    stream = (codes[..., None] >> np.arange(bits, dtype=np.uint8)) & np.uint8(1)
    stream = stream.reshape(*codes.shape[:-1], n * bits)
    return np.packbits(stream, axis=-1, bitorder="little")  # zero padding in the last byte


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``; padding bits ignored."""
    packed = np.asarray(packed, dtype=np.uint8)
    stream = np.unpackbits(packed, axis=-1, count=n * bits, bitorder="little")
    stream = stream.reshape(*packed.shape[:-1], n, bits).astype(np.uint8)
    weights = (np.uint8(1) << np.arange(bits, dtype=np.uint8))
    return (stream * weights).sum(axis=-1, dtype=np.uint32).astype(np.uint8)
