"""Calibration of the threshold-mode thresholds ``(tau_high, tau_mid)`` for a bit target.

Method (a cheap proxy, done once per calibration text):

1. Capture every layer's post-RoPE Q/K/V from one full-precision forward pass.
2. Compute the salience (docs/numerics.md §8) of every (layer, block, head, channel) from
   the captured tensors, with the cache's own policy and fixed-point relevance. Thresholds are quantiles of this pooled distribution:
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

from mixkvq.config import MixKVQConfig
from mixkvq.format import HIGH_BITS
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
    """Pooled salience of every (layer, block, batch, head, channel), exactly as the cache
    ranks them: ``config``'s policy on the fixed-point relevance of §7 (the snapshot after each
    block's last token) and the difficulty of §8 (the simulator's ops)."""
    from mixkvq.backend import get_backend
    from mixkvq.schemes import salience

    sim = get_backend("numpy")
    R, low_bits, policy = config.residual_length, config.keys.low_bits, config.salience_policy
    vals = []
    for li in sorted(captured):
        q, k, _ = (x.detach().float().numpy() for x in captured[li])
        B, H, T, D = k.shape
        n_rep = q.shape[1] // H
        qsum = np.cumsum(sim.query_token_sums(q, n_rep), axis=2)  # int64: exact, order-free
        for j in range(T // R):
            end = (j + 1) * R
            relevance = sim.relevance(qsum[:, :, end - 1], end, n_rep) if policy.uses_queries else None
            vals.append(np.asarray(salience(sim, k[:, :, j * R:end], relevance, policy, low_bits)).reshape(-1))
    if not vals:
        raise ValueError(f"calibration needs at least residual_length={R} tokens of text")
    return np.concatenate(vals)


def predicted_bits(f_high: float, f_mid: float, config: MixKVQConfig, head_dim: int, stats_bits: float = 0.0) -> float:
    """True bits per K/V element of quantized blocks for the given tier fractions (the
    format's cost model; affine in the fractions)."""
    keys = config.keys
    fractions = {HIGH_BITS: f_high, keys.mid_bits: f_mid}
    fractions[keys.low_bits] = fractions.get(keys.low_bits, 0.0) + 1.0 - f_high - f_mid
    return config.costs(head_dim).block_bits(fractions, config.values.bits) + stats_bits


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
    policy = "query_aware" if not base.salience_policy.mixed_precision else base.policy
    base = base.replace(tier_mode="threshold", policy=policy)
    budget = base.replace(tier_mode="budget")
    T = min(int(v[1].shape[2]) for v in captured.values())
    if T < base.residual_length:
        raise ValueError(f"calibration text gives {T} tokens; at least residual_length={base.residual_length} are needed")
    usable = T - T % base.residual_length
    captured = {li: tuple(x[:, :, :usable] for x in v) for li, v in captured.items()}
    err_budget, caches = attention_errors(budget, captured, probe)
    budget_bits = _measured_bits(caches)
    D = int(next(iter(captured.values()))[1].shape[-1])
    n_hi, n_mid = budget.keys.counts(D)
    stats_bits = budget_bits - predicted_bits(n_hi / D, n_mid / D, budget, D)
    target = float(target_bits) if target_bits is not None else budget_bits
    log(f"budget config: {budget_bits:.3f} true bits/elem, attention error {np.mean(err_budget):.4f}; target {target:.3f}")
    A = salience_values(captured, base)
    lo_bits = predicted_bits(0.0, 0.0, base, D, stats_bits)
    if target < lo_bits - 1e-9:
        raise ValueError(f"target {target:.3f} bits/element is below what the low tier alone stores ({lo_bits:.3f})")

    def f_mid_for(f_high: float) -> float | None:
        # predicted_bits is affine in f_mid: solve for the f_mid that meets the target
        room = target - predicted_bits(f_high, 0.0, base, D, stats_bits)
        if room < -1e-12:
            return None
        slope = predicted_bits(f_high, 1.0, base, D) - predicted_bits(f_high, 0.0, base, D)  # bits per unit of f_mid
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
        c = Candidate(f_high, f_mid, th, tm, predicted_bits(f_high, f_mid, base, D, stats_bits), _measured_bits(cs), float(np.mean(errs)))
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
