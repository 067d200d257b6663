"""§8.3 rate-distortion allocation: one true-bit budget over key channel widths and the value width.

Runs on the host in float64 for every backend (its inputs are per-channel statistics of
one block), so every backend's tier maps come from this one implementation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from mixkvq.format import HALF_ULP, HIGH_BITS, CostModel, n_groups

from .floats import to_float32
from .quant import _groups


def _fsum(a: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Correctly rounded float64 sums over ``axes`` (order-free: math.fsum per output)."""
    moved = np.moveaxis(a, axes, tuple(range(a.ndim - len(axes), a.ndim)))
    flat = moved.reshape(*moved.shape[: a.ndim - len(axes)], -1)
    out = np.empty(flat.shape[:-1], dtype=np.float64)
    for idx in np.ndindex(out.shape):
        out[idx] = math.fsum(flat[idx].tolist())
    return out


def _hull_chains(cost: np.ndarray, err: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Lower convex hull steps of each row of (cost, error) points, from the cheapest point.

    ``cost`` ``(L,)`` increasing, ``err`` ``(N, L)``. Returns per step s the arrays
    (valid, from_index, to_index, delta_cost, gain) over the N rows: from the current point the
    next is the one with the steepest error drop per bit (ties: the farther point); a chain
    ends when no point lowers the error.
    """
    N, L = err.shape
    current = np.zeros(N, dtype=np.int64)
    alive = np.ones(N, dtype=bool)
    steps = []
    for _ in range(L - 1):
        dc = cost[None, :] - cost[current][:, None]                     # (N, L)
        de = err[np.arange(N), current][:, None] - err                  # error drop
        later = np.arange(L)[None, :] > current[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = np.where(later & (de > 0), de / dc, -np.inf)
        best = L - 1 - np.argmax(slope[:, ::-1], axis=1)                # ties -> farther point
        gain = slope[np.arange(N), best]
        valid = alive & np.isfinite(gain)
        steps.append((valid, current.copy(), best, dc[np.arange(N), best], gain))
        current = np.where(valid, best, current)
        alive = valid
    return steps


def _key_items(chains: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Every hull step of every key channel as (owner, step, delta cost, to-index), in walk
    order: gain per bit descending, then channel ((b, h, d) order), then step."""
    empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float64)  # one-width ladders have no steps
    owner, step_no, dcost, gain, to_idx = [empty_i], [empty_i], [empty_f], [empty_f], [empty_i]
    for s, (valid, _, to, dc, g) in enumerate(chains):
        owner.append(np.flatnonzero(valid)); step_no.append(np.full(int(valid.sum()), s))
        dcost.append(dc[valid]); gain.append(g[valid]); to_idx.append(to[valid])
    owner_a, step_a, dcost_a, gain_a, to_a = (np.concatenate(x) for x in (owner, step_no, dcost, gain, to_idx))
    order = np.lexsort((step_a, owner_a, -gain_a))
    return owner_a[order], step_a[order], dcost_a[order], to_a[order]


def _greedy_walk(items: tuple[np.ndarray, ...], n_keys: int, remaining: float) -> tuple[np.ndarray, bool]:
    """Take items in order while they fit; an item that does not fit closes its chain.
    Returns each channel's ladder index and whether a step was skipped before one was taken."""
    owner_a, step_a, dcost_a, to_a = items
    next_step = np.zeros(n_keys, dtype=np.int64)
    closed = np.zeros(n_keys, dtype=bool)
    chosen = np.zeros(n_keys, dtype=np.int64)
    skipped = skipped_then_taken = False
    for o, st, dc, to in zip(owner_a.tolist(), step_a.tolist(), dcost_a.tolist(), to_a.tolist()):
        if closed[o] or st != next_step[o]:
            continue
        if dc <= remaining:
            remaining -= dc
            chosen[o] = to
            next_step[o] += 1
            skipped_then_taken |= skipped
        else:
            closed[o] = True
            skipped = True
    return chosen, skipped_then_taken


@dataclass(frozen=True)
class RDModel:
    """§8.3 steps 1–3 for one block: modelled errors and true-bit costs of every choice.

    Attributes:
        key_err: ``(B, H, D, L)`` squared output error of each key channel at each ladder width.
        value_err: ``(Lv,)`` the block's value error at each value width.
        key_cost: ``(L,)`` bits of one key channel; value_cost: ``(Lv,)`` bits of the block's values.
        budget: total bits allowed; base: bits of the cheapest allocation (incl. tier maps);
        key_base: the keys' share of it (every channel at the lowest width, and the tier maps).
    """

    key_err: np.ndarray
    value_err: np.ndarray
    key_cost: np.ndarray
    value_cost: np.ndarray
    budget: int
    base: float
    key_base: float


def rd_model(keys: Any, values: Any, relevance: Any, *, ladder: tuple[int, ...], value_ladder: tuple[int, ...],
             budget_bits: float, group_size: int, meta_bytes: int, high_dtype: str, value_weight: float = 1.0) -> RDModel:
    """Errors and costs of §8.3 for a block ``keys``/``values`` ``(B, H, R, D)``."""
    k = to_float32(np.asarray(keys)).astype(np.float64)
    v = to_float32(np.asarray(values)).astype(np.float64)
    w = np.asarray(relevance, dtype=np.float32).astype(np.float64)
    B, H, R, D = k.shape
    G = group_size
    # Step size of each key channel at each width (§8.3 step 1).
    k_range = k.max(axis=2) - k.min(axis=2)                                   # (B, H, D)
    k_amax = np.abs(k).max(axis=2)
    key_step = np.stack([k_amax * HALF_ULP[high_dtype] if b == HIGH_BITS else k_range / (2.0**b - 1)
                         for b in ladder], axis=-1)                          # (B, H, D, L)
    # Modelled squared attention-output error (§8.3 step 2): a key error e_d moves the score
    # by q.e/sqrt(D) and the output by that times (v - o); a value error moves it directly.
    v_mean = _fsum(v, (2,)) / R                                               # (B, H, D)
    v_spread_sq = _fsum((v - v_mean[:, :, None, :]) ** 2, (2, 3)) / (R * D)   # (B, H)
    key_err = (w**2 * v_spread_sq[:, :, None])[..., None] * key_step**2 / 12.0
    ng = n_groups(D, G)
    vg = _groups(v, G)                                                        # (B, H, R, ng, G)
    range_sq = float(_fsum((vg.max(-1) - vg.min(-1)) ** 2, (0, 1, 2, 3)))     # whole block
    value_err = np.array([float(value_weight) * (D * range_sq / (R * ng) / (12.0 * (2.0**b - 1) ** 2))
                          for b in value_ladder])
    # Costs (§8.3 step 3) and the budget, pooled over the block's (batch, head) pairs.
    costs = CostModel(R, G, D, meta_bytes)
    key_cost = np.array([costs.key_channel_bits(b) for b in ladder], dtype=np.float64)
    value_cost = np.array([costs.value_head_bits(b) * B * H for b in value_ladder], dtype=np.float64)
    budget = math.floor(budget_bits * (2 * R * D * B * H))
    key_base = B * H * (costs.tier_map_bits + D * key_cost[0])
    return RDModel(key_err, value_err, key_cost, value_cost, budget, float(key_base + value_cost[0]), float(key_base))


def rd_allocate(keys: Any, values: Any, relevance: Any, *, ladder: tuple[int, ...], value_ladder: tuple[int, ...],
                budget_bits: float, group_size: int, meta_bytes: int, high_dtype: str, value_weight: float = 1.0,
                return_skipped: bool = False) -> "tuple[np.ndarray, int] | tuple[np.ndarray, int, bool]":
    """Key widths ``(B, H, D)`` uint8 and one value width for a block (docs/numerics.md §8.3).

    Args:
        keys, values: the block, ``(B, H, R, D)`` (any float dtype; upcast to float32).
        relevance: float32 ``(B, H, D)`` — the query weight of each channel (ones for key_only).
        ladder / value_ladder: ascending widths (16 = 16-bit floats).
        budget_bits: true bits per K/V element of the block.
        value_weight: multiplies the modelled value error (the K/V exchange rate, §8.3 step 2).
        return_skipped: also return whether a step was skipped before the last one taken
            (when not, the result is optimal for the bits it spends).
    """
    model = rd_model(keys, values, relevance, ladder=ladder, value_ladder=value_ladder, budget_bits=budget_bits,
                     group_size=group_size, meta_bytes=meta_bytes, high_dtype=high_dtype, value_weight=value_weight)
    B, H, D, _ = model.key_err.shape
    R = int(np.shape(keys)[2])
    key_err, value_err, key_cost, value_cost = model.key_err, model.value_err, model.key_cost, model.value_cost
    budget, base = model.budget, model.base
    if base > budget:
        raise ValueError(
            f"rd_bits={budget_bits} is below the cheapest allocation of this block "
            f"({base / (2 * R * D * B * H):.4f} true bits per element with widths {ladder[0]} and {value_ladder[0]}); raise rd_bits"
        )
    # §8.3 step 4: for every value width that fits, a greedy over the key channels' convex-hull
    # steps by gain per bit; the value width with the least total modelled error wins.
    n_keys = B * H * D
    err_rows = key_err.reshape(n_keys, len(ladder))
    items = _key_items(_hull_chains(key_cost, err_rows))
    key_base = model.key_base
    best: "tuple[float, int, np.ndarray, bool] | None" = None
    for vi in range(len(value_ladder)):
        remaining = budget - key_base - value_cost[vi]
        if remaining < 0:
            break  # value costs ascend with the width
        chosen, skipped = _greedy_walk(items, n_keys, remaining)
        total = math.fsum([*err_rows[np.arange(n_keys), chosen].tolist(), float(value_err[vi])])
        if best is None or total < best[0]:
            best = (total, vi, chosen, skipped)
    assert best is not None  # base <= budget: the lowest value width always fits
    _, vi, chosen, skipped_then_taken = best
    tier_map = np.asarray(ladder, dtype=np.int64)[chosen].reshape(B, H, D).astype(np.uint8)
    value_bits = int(value_ladder[vi])
    return (tier_map, value_bits, skipped_then_taken) if return_skipped else (tier_map, value_bits)
