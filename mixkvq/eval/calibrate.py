"""Calibration of the threshold-mode thresholds ``(tau_high, tau_mid)`` for a bit target.

Method (a cheap proxy, done once per calibration text):

1. Capture every layer's post-RoPE Q/K/V from one full-precision forward pass.
2. Compute the salience ``A = I * S`` (docs/numerics.md §8) of every (layer, block, head,
   channel) from the captured tensors. Thresholds are quantiles of this pooled distribution:
   a pair of tier fractions ``(f_high, f_mid)`` maps to ``tau_high = Q(1 - f_high)`` and
   ``tau_mid = Q(1 - f_high - f_mid)``.
3. The true bits per element of a quantized block are affine in the fractions (16-bit
   channels carry no scale/zero; quantized channels carry ``32/G`` metadata bits), so for
   every ``f_high`` on a grid the ``f_mid`` that meets the target exactly is solved for.
4. Each candidate on that iso-bits curve is scored by the mean per-layer attention-output
   relative error of a real :class:`~mixkvq.KVCache` in threshold mode; a finer grid
   around the best ``f_high`` refines it. The winner's true bits/element is measured on the
   filled caches and reported beside the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from ..config import MixKVQConfig
from .harness import attention_errors


@dataclass
class Candidate:
    f_high: float
    f_mid: float
    tau_high: float
    tau_mid: float
    predicted_bits: float
    measured_bits: float
    attn_err: float


def salience_values(captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], config: MixKVQConfig) -> np.ndarray:
    """Pooled query-aware salience of every (layer, block, batch, head, channel)."""
    R, L = config.residual_length, 2 ** config.low_bits - 1
    vals = []
    for li in sorted(captured):
        q, k, _ = (x.double().numpy() for x in captured[li])
        B, H, T, D = k.shape
        n_rep = q.shape[1] // H
        aq = np.abs(q).reshape(B, H, n_rep, T, D).mean(axis=2)  # (B, H, T, D)
        csum = np.cumsum(aq, axis=2)
        for j in range(T // R):
            blk = k[:, :, j * R:(j + 1) * R]
            S = (blk.max(axis=2) - blk.min(axis=2)) / L
            I = csum[:, :, (j + 1) * R - 1] / ((j + 1) * R)
            vals.append((I * S).reshape(-1))
    if not vals:
        raise ValueError(f"calibration needs at least residual_length={R} tokens of text")
    return np.concatenate(vals)


def _overheads(config: MixKVQConfig) -> tuple[float, float, float]:
    G, R = config.group_size, config.residual_length
    meta_bits = 2 * (16 if config.meta_dtype in ("float16", "bfloat16") else 32)
    key_meta = meta_bits / G
    value_bits = config.value_bits + meta_bits / G
    tier_map = 8.0 / R
    return key_meta, value_bits, tier_map


def predicted_bits(f_high: float, f_mid: float, config: MixKVQConfig, stats_bits: float = 0.0) -> float:
    """True bits per K/V element of quantized blocks for the given tier fractions."""
    key_meta, value_bits, tier_map = _overheads(config)
    f_low = 1.0 - f_high - f_mid
    key = 16 * f_high + (config.mid_bits + key_meta) * f_mid + (config.low_bits + key_meta) * f_low + tier_map
    return (key + value_bits) / 2 + stats_bits


def _measured_bits(caches: list[Any]) -> float:
    nbytes = sum(c.nbytes for c in caches)
    n = sum(c.n_elements for c in caches)
    return 8.0 * nbytes / n


def calibrate(captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], base: MixKVQConfig,
              target_bits: float | None = None, probe: int = 64,
              log: Callable[[str], None] = print) -> tuple[MixKVQConfig, dict[str, Any]]:
    """Find ``(tau_high, tau_mid)`` for ``target_bits`` true bits per element (default: what
    ``base`` in budget mode stores on the same data). Returns the threshold-mode config and
    a report."""
    base = base.replace(tier_mode="threshold", policy="query_aware" if base.salience_policy.name in ("uniform",) else base.policy)
    budget = base.replace(tier_mode="budget")
    T = min(int(v[1].shape[2]) for v in captured.values())
    if T < base.residual_length:
        raise ValueError(f"calibration text gives {T} tokens; at least residual_length={base.residual_length} are needed")
    usable = T - T % base.residual_length
    captured = {li: tuple(x[:, :, :usable] for x in v) for li, v in captured.items()}
    err_budget, caches = attention_errors(budget, captured, probe)
    budget_bits = _measured_bits(caches)
    D = int(next(iter(captured.values()))[1].shape[-1])
    n_hi, n_mid = budget.budget_counts(D)
    stats_bits = budget_bits - predicted_bits(n_hi / D, n_mid / D, budget)
    target = float(target_bits) if target_bits is not None else budget_bits
    log(f"budget config: {budget_bits:.3f} true bits/elem, attention error {np.mean(err_budget):.4f}; target {target:.3f}")
    A = salience_values(captured, base)
    lo_bits = predicted_bits(0.0, 0.0, base, stats_bits)
    if target < lo_bits - 1e-9:
        raise ValueError(f"target {target:.3f} bits/element is below what the low tier alone stores ({lo_bits:.3f})")

    def f_mid_for(f_high: float) -> float | None:
        # predicted_bits is affine: each unit of f_mid adds (mid_bits - low_bits) / 2 bits
        room = target - predicted_bits(f_high, 0.0, base, stats_bits)
        if room < -1e-12:
            return None
        slope = (base.mid_bits - base.low_bits) / 2
        return 0.0 if slope <= 0 else float(min(max(room, 0.0) / slope, 1.0 - f_high))

    tried: dict[float, Candidate] = {}

    def score(f_high: float) -> Candidate | None:
        f_high = round(float(f_high), 5)
        if f_high in tried:
            return tried[f_high]
        f_mid = f_mid_for(f_high)
        if f_mid is None or f_high < 0:
            return None
        th = float(np.quantile(A, 1.0 - f_high)) if f_high > 0 else float(A.max()) + 1.0
        tm = float(np.quantile(A, max(0.0, 1.0 - f_high - f_mid))) if f_high + f_mid > 0 else th
        tm = min(tm, th)
        cfg = base.replace(thresholds=(th, tm))
        errs, cs = attention_errors(cfg, captured, probe)
        c = Candidate(f_high, f_mid, th, tm, predicted_bits(f_high, f_mid, base, stats_bits), _measured_bits(cs), float(np.mean(errs)))
        log(f"  f_high {f_high:.4f} f_mid {f_mid:.4f}  tau=({th:.4g}, {tm:.4g})  bits {c.measured_bits:.3f}  attn err {c.attn_err:.4f}")
        tried[f_high] = c
        return c

    grid = [0.0, 0.0078, 0.0156, 0.03125, 0.0469, 0.0625, 0.09375]
    cands = [c for c in (score(g) for g in grid) if c is not None]
    if not cands:
        raise ValueError(f"no threshold pair reaches {target:.3f} bits/element")
    best = min(cands, key=lambda c: c.attn_err)
    step = 0.0078
    for f in (best.f_high - step / 2, best.f_high + step / 2):
        if f >= 0:
            score(f)
    best = min((c for c in tried.values()), key=lambda c: c.attn_err)
    config = base.replace(thresholds=(best.tau_high, best.tau_mid))
    report = {
        "target_bits": target,
        "budget_reference": {"bits": budget_bits, "attn_err": float(np.mean(err_budget))},
        "chosen": best.__dict__,
        "candidates": [c.__dict__ for c in sorted(tried.values(), key=lambda c: c.f_high)],
        "calibration_tokens": usable,
    }
    return config, report
