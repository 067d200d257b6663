"""Reference attention over a cache view: dequantize everything, then float64 softmax."""

from __future__ import annotations

import numpy as np


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, *, scale: float, causal: bool,
              mask: "np.ndarray | None" = None, window: "int | None" = None,
              softcap: "float | None" = None) -> np.ndarray:
    """``q (B, Hq, Tq, D)``, ``keys``/``values`` float32 ``(B, H, T, D)`` -> float32 ``(B, Hq, Tq, D)``.

    Query ``i`` sits at position ``T - Tq + i``; with ``causal`` it sees positions ``<=`` its own.
    ``mask`` bool ``(B, Tq, T)`` (True = may attend) removes more, as does a sliding ``window``
    (positions ``<= own - window`` hidden); ``softcap`` caps scores (``c tanh(s / c)``). A query
    that sees no token returns zeros.
    """
    B, Hq, Tq, D = q.shape
    H, T = keys.shape[1], keys.shape[2]
    n_rep = Hq // H
    k = np.repeat(keys.astype(np.float64), n_rep, axis=1)
    v = np.repeat(values.astype(np.float64), n_rep, axis=1)
    scores = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), k) * scale
    if softcap:
        scores = softcap * np.tanh(scores / softcap)
    if window:
        pos_q = np.arange(T - Tq, T)[:, None]
        scores = np.where(np.arange(T)[None, :] > pos_q - window, scores, -np.inf)
    if causal and Tq > 1:
        pos_q = np.arange(T - Tq, T)[:, None]
        scores = np.where(np.arange(T)[None, :] <= pos_q, scores, -np.inf)
    if mask is not None:
        scores = np.where(np.asarray(mask, dtype=bool)[:, None], scores, -np.inf)
    top = scores.max(axis=-1, keepdims=True)
    seen = np.isfinite(top)
    p = np.exp(scores - np.where(seen, top, 0.0))
    total = p.sum(axis=-1, keepdims=True)
    p /= np.where(total > 0, total, 1.0)
    return np.einsum("bhqk,bhkd->bhqd", p, v).astype(np.float32)
