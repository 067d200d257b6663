"""§7–§8: exact query statistics, channel difficulty, and tier assignment."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mixkvq.format import FIXED_MAX, FIXED_ONE

from .floats import to_float32
from .quant import group_min_max


def query_token_sums(q: np.ndarray, n_rep: int) -> np.ndarray:
    """§7 steps 1–3: ``q (B, H*n_rep, T, D)`` -> int64 ``(B, H, T, D)``."""
    a = np.abs(to_float32(q))
    with np.errstate(over="ignore"):
        m = a * np.float32(FIXED_ONE)  # exact scaling by 2^16 (Inf on overflow)
    f = np.minimum(np.rint(m), np.float32(FIXED_MAX)).astype(np.int64)
    B, Hq, T, D = f.shape
    return f.reshape(B, Hq // n_rep, n_rep, T, D).sum(axis=2, dtype=np.int64)


def relevance(qsum: np.ndarray, count: int, n_rep: int) -> np.ndarray:
    """§7 step 5: mean |q| per (batch, kv_head, channel) as float32; 1.0 when nothing was seen."""
    if count == 0:
        return np.ones(qsum.shape, dtype=np.float32)
    numerator = np.asarray(qsum, dtype=np.int64).astype(np.float32)
    denominator = np.array(count * n_rep * FIXED_ONE, dtype=np.int64).astype(np.float32)
    return numerator / denominator


def difficulty(keys: np.ndarray, low_bits: int) -> np.ndarray:
    """§8: per-channel range over the block's tokens / (2^B_low - 1): ``(B, H, R, D)`` -> ``(B, H, D)``."""
    k32 = to_float32(keys).swapaxes(-1, -2)  # rows along tokens
    mn, mx = group_min_max(k32, k32.shape[-1])
    return (mx[..., 0] - mn[..., 0]) / np.float32(2**low_bits - 1)


def assign_budget(salience: np.ndarray, n_high: int, n_mid: int, tier_bits: Sequence[int]) -> np.ndarray:
    """§8 budget mode: rank by salience descending (ties: lower channel first)."""
    high, mid, low = tier_bits
    order = np.argsort(-salience, axis=-1, kind="stable")
    rank = np.argsort(order, axis=-1)  # inverse permutation: channel -> its rank
    tier = np.where(rank < n_high, high, np.where(rank < n_high + n_mid, mid, low))
    return tier.astype(np.uint8)


def assign_threshold(salience: np.ndarray, tau_high: float, tau_mid: float, tier_bits: Sequence[int]) -> np.ndarray:
    """§8 threshold mode: ``A > tau_high`` high; ``tau_mid < A <= tau_high`` mid; else low."""
    high, mid, low = tier_bits
    a = np.asarray(salience, dtype=np.float32)
    tier = np.where(a > np.float32(tau_high), high, np.where(a > np.float32(tau_mid), mid, low))
    return tier.astype(np.uint8)
