"""Measure a :class:`~mixkvq.apps.layer_budget.LayerProfile` on a real model (``mixkvq calibrate --layers``).

The loss of layer ``l`` at budget ``b`` is the KL to the full-precision next-token
distributions when only layer ``l`` is quantized (``rd`` at ``b``, every other layer full
precision), on the calibration samples streamed as eval streams them. Contributions are
assumed to add over layers (the usual small-perturbation assumption), which is what lets
:meth:`~mixkvq.apps.layer_budget.LayerProfile.allocate` split one budget across layers.

Two ways to get it:

* ``measure="kl"`` (default): the KL is measured at every grid budget (``L x G`` streamed
  runs per sample). The curve is then made non-increasing in ``b`` (a running minimum),
  so sampling noise cannot make the allocator pay more bits for a predicted loss it
  already had at fewer.
* ``measure="scaled"`` (``G`` times cheaper): the KL is measured at the lowest budget only
  and carried to the others by the layer's relative attention-output error ``e_l(b)`` on
  captured Q/K/V, ``KL_l * (e_l(b) / e_l(b_probe))^2`` — assumes a layer's KL grows as its
  squared attention error, which held poorly at the middle budgets (docs/design.md).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch

from mixkvq.config import MixKVQConfig
from ..layer_budget import QUANTUM, LayerProfile
from .harness import attention_errors, capture_qkv, continue_stream, stream

#: the default budget grid, as offsets from the config's lowest feasible rd_bits (for G=32,
#: R=128, D=64: 3.03125, the KIVI-2 point, then the other KIVI splits' bytes and midpoints, to 6.03)
GRID_OFFSETS = (0.0, 0.21875, 0.5, 0.71875, 1.0, 1.21875, 1.5, 1.71875, 2.0, 2.46875, 3.0)


def default_grid(config: MixKVQConfig, head_dim: int) -> tuple[float, ...]:
    """:data:`GRID_OFFSETS` above the lowest ``rd_bits`` a block of ``config`` can meet."""
    low = config.costs(head_dim).min_block_bits(config.keys.ladder[0], config.keys.value_ladder[0])
    low = math.ceil(low * QUANTUM) / QUANTUM
    return tuple(low + d for d in GRID_OFFSETS)


def _layer_kl(model: Any, samples: list[torch.Tensor], refs: list[torch.Tensor],
              prefills: list[dict[int, tuple[torch.Tensor, ...]]], config: MixKVQConfig, layer: int,
              context_len: int) -> float:
    """Mean next-token KL(full || quantized) per scored token with only ``layer`` quantized.

    The prefill attends to its own tokens exactly, so its Q/K/V are those of the
    full-precision run: the cache is filled from ``prefills`` (captured once per sample)
    instead of running the prefill forward again, and only the continuation is streamed."""
    from mixkvq.integrations.transformers import MixKVQCache, MixKVQLayer
    from .methods import Method

    period = Method("probe", "mixkvq", config).exact_chunk_period
    others: dict[int, MixKVQConfig | None] = {j: None for j in range(len(prefills[0])) if j != layer}
    total = n_tok = 0.0
    for ids, ref, qkv in zip(samples, refs, prefills):
        cache = MixKVQCache(config, model_config=model.config, layer_configs=others)
        for li in sorted(qkv):
            q, k, v = qkv[li]
            cache.update(k, v, li)
            if isinstance(cache.layers[li], MixKVQLayer):
                cache.layers[li].observe(q)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            logp, _ = continue_stream(model, cache, ids, context_len, chunk_period=period)
        ref_rest = ref[1:]  # the first prediction comes from the exact prefill: KL 0
        total += float((ref_rest.exp() * (ref_rest - logp)).sum())
        n_tok += ref.shape[0]
    return max(total / n_tok, 0.0)


@torch.no_grad()
def profile_layers(model: Any, samples: list[torch.Tensor], captured: dict[int, tuple[torch.Tensor, ...]],
                   base: MixKVQConfig, context_len: int, *, grid: "tuple[float, ...] | None" = None, probe: int = 64,
                   measure: str = "kl", progress: bool = True, log: Callable[[str], None] = print) -> LayerProfile:
    """Per-layer loss curves of ``base`` (an ``rd`` config) over ``grid``.

    Args:
        model: a transformers causal LM with the ``"mixkvq"`` attention enabled.
        samples: token id tensors ``(1, T)``; the first ``context_len`` tokens are prefilled,
            the rest scored (the eval protocol).
        captured: :func:`~mixkvq.apps.eval.harness.capture_qkv` of calibration text (the
            attention-error curves, recorded in ``info`` and used by ``measure="scaled"``).
        base: the ``rd`` config whose ``rd_bits`` the profile will set per layer.
        grid: ascending ``rd_bits`` to profile (default :func:`default_grid`).
        probe: probe queries of the attention-error curves.
        measure: ``"kl"`` (the KL at every budget) or ``"scaled"`` (at the lowest, carried to the
            others by the attention error); see the module docstring.
    """
    from transformers import DynamicCache

    if base.tier_mode != "rd":
        raise ValueError("a layer profile sets rd_bits per layer: pass a config with tier_mode='rd'")
    if measure not in ("kl", "scaled"):
        raise ValueError(f"measure must be 'kl' or 'scaled'; got {measure!r}")
    head_dim = int(next(iter(captured.values()))[1].shape[-1])
    grid = tuple(sorted(float(b) for b in (grid if grid is not None else default_grid(base, head_dim))))
    n_layers = len(captured)
    refs = [stream(model, DynamicCache(config=model.config), ids, context_len, chunk_period=None)[0] for ids in samples]
    prefills = [capture_qkv(model, ids[:, :context_len]) for ids in samples]
    measured = grid if measure == "kl" else grid[:1]
    runs = [(li, gi) for li in range(n_layers) for gi in range(len(measured))]
    if progress:
        try:
            from tqdm.auto import tqdm

            runs = tqdm(runs, desc="layer sensitivity", unit="run")
        except ImportError:
            pass
    kl = np.zeros((n_layers, len(measured)))
    for li, gi in runs:
        kl[li, gi] = _layer_kl(model, samples, refs, prefills, base.replace(rd_bits=measured[gi]), li, context_len)
        if not progress:
            log(f"  layer {li}: KL {kl[li, gi]:.5f} at {measured[gi]} bits")
    errs = np.array([attention_errors(base.replace(rd_bits=b), captured, probe)[0] for b in grid]).T  # (L, G)
    if measure == "kl":
        loss = np.minimum.accumulate(kl, axis=1)
    else:
        ratio = np.divide(errs, errs[:, :1], out=np.zeros_like(errs), where=errs[:, :1] > 0)
        loss = kl * ratio**2
    info = {"measure": measure, "probe_budget": grid[0], "kl_at_probe": kl[:, 0].tolist(), "kl": kl.tolist(),
            "attn_err": errs.tolist(), "samples": len(samples), "context_len": context_len,
            "scored_tokens_per_sample": int(samples[0].shape[1] - context_len), "base_config": base.to_dict()}
    return LayerProfile(grid, tuple(tuple(float(x) for x in r) for r in loss), info)


__all__ = ["profile_layers", "default_grid", "GRID_OFFSETS"]
