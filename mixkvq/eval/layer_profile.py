"""Measure a :class:`~mixkvq.layer_budget.LayerProfile` on a real model (``mixkvq calibrate --layers``).

Two measurements, combined under one assumption:

1. *Sensitivity*: for every layer ``l``, the model streams the calibration samples with only
   layer ``l`` quantized (``rd`` at the probe budget, the lowest of the grid; every other
   layer full precision) and the KL to the full-precision next-token distributions is
   recorded: ``KL_l``.
2. *Distortion curves*: on the Q/K/V captured from one full-precision pass, each layer's
   relative attention-output error ``e_l(b)`` at every grid budget ``b`` (cheap: no model
   forward per budget).

Assumption (the usual small-perturbation one): a layer's contribution to the KL is
proportional to its squared attention error, and contributions add over layers. So the
predicted loss of layer ``l`` at ``b`` is ``KL_l * (e_l(b) / e_l(b_probe))^2``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import numpy as np
import torch

from ..config import MixKVQConfig
from ..layer_budget import QUANTUM, LayerProfile
from .harness import attention_errors, stream

#: the default budget grid, as offsets from the config's lowest feasible rd_bits (for G=32,
#: R=128, D=64: 3.03125, the KIVI-2 point, then the other KIVI splits' bytes and midpoints, to 6.03)
GRID_OFFSETS = (0.0, 0.21875, 0.5, 0.71875, 1.0, 1.21875, 1.5, 1.71875, 2.0, 2.46875, 3.0)


def default_grid(config: MixKVQConfig, head_dim: int) -> tuple[float, ...]:
    """:data:`GRID_OFFSETS` above the lowest ``rd_bits`` a block of ``config`` can meet."""
    from ..dtypes import ITEMSIZE
    from ..sim.allocate import min_block_bits

    low = min_block_bits(config.bit_ladder[0], config.value_bit_ladder[0], config.residual_length,
                         config.group_size, head_dim, ITEMSIZE[config.meta_dtype])
    low = math.ceil(low * QUANTUM) / QUANTUM
    return tuple(low + d for d in GRID_OFFSETS)


@torch.no_grad()
def profile_layers(model: Any, samples: list[torch.Tensor], captured: dict[int, tuple[torch.Tensor, ...]],
                   base: MixKVQConfig, context_len: int, *, grid: "tuple[float, ...] | None" = None, probe: int = 64,
                   progress: bool = True, log: Callable[[str], None] = print) -> LayerProfile:
    """Per-layer loss curves of ``base`` (an ``rd`` config) over ``grid``.

    Args:
        model: a transformers causal LM with the ``"mixkvq"`` attention enabled.
        samples: token id tensors ``(1, T)``; the first ``context_len`` tokens are prefilled,
            the rest decoded one at a time and scored (the eval protocol).
        captured: :func:`~mixkvq.eval.harness.capture_qkv` of calibration text (distortion curves).
        base: the ``rd`` config whose ``rd_bits`` the profile will set per layer.
        grid: ascending ``rd_bits`` to profile (default :func:`default_grid`); the first is the
            probe budget of the sensitivity pass.
    """
    from transformers import DynamicCache

    from ..integrations.transformers import MixKVQCache

    if base.tier_mode != "rd":
        raise ValueError("a layer profile sets rd_bits per layer: pass a config with tier_mode='rd'")
    head_dim = int(next(iter(captured.values()))[1].shape[-1])
    grid = tuple(sorted(float(b) for b in (grid if grid is not None else default_grid(base, head_dim))))
    n_layers = len(captured)
    from .methods import Method

    refs = [stream(model, DynamicCache(config=model.config), ids, context_len, chunk_period=None)[0] for ids in samples]
    kl = np.zeros(n_layers)
    probe_cfg = base.replace(rd_bits=grid[0])
    period = Method("probe", "mixkvq", probe_cfg).exact_chunk_period
    layers = range(n_layers)
    if progress:
        try:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc="layer sensitivity", unit="layer")
        except ImportError:
            pass
    for li in layers:
        total = n_tok = 0.0
        others: dict[int, MixKVQConfig | None] = {j: None for j in range(n_layers) if j != li}
        for ids, ref in zip(samples, refs):
            cache = MixKVQCache(probe_cfg, model_config=model.config, layer_configs=others)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                logp, _, _ = stream(model, cache, ids, context_len, chunk_period=period)
            total += float((ref.exp() * (ref - logp)).sum())
            n_tok += logp.shape[0]
        kl[li] = max(total / n_tok, 0.0)
        if not progress:
            log(f"  layer {li}: KL {kl[li]:.5f} at {grid[0]} bits")
    errs = np.array([attention_errors(base.replace(rd_bits=b), captured, probe)[0] for b in grid]).T  # (L, G)
    ratio = np.divide(errs, errs[:, :1], out=np.zeros_like(errs), where=errs[:, :1] > 0)
    loss = kl[:, None] * ratio**2
    info = {"probe_budget": grid[0], "kl_at_probe": kl.tolist(), "attn_err": errs.tolist(),
            "samples": len(samples), "context_len": context_len,
            "scored_tokens_per_sample": int(samples[0].shape[1] - context_len), "base_config": base.to_dict()}
    return LayerProfile(grid, tuple(tuple(r) for r in loss), info)


__all__ = ["profile_layers", "default_grid", "GRID_OFFSETS"]
