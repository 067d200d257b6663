"""Batch selection and cropping of a :class:`~mixkvq.KVCache`, on its quantized storage.

These are the structural edits a generation loop needs (beam search reorders the batch,
``num_return_sequences`` repeats it, assisted decoding crops rejected tokens); they are
public as :meth:`KVCache.select_batch` and :meth:`KVCache.crop`. They only move stored bytes
around: **no token is ever re-quantized**, and a failed call leaves the cache unchanged.

* :func:`select_batch` picks batch rows (any order, repeats allowed). Every stored array is
  indexed along its batch axis; the tier rows of a key block, which are ordered
  lexicographically by ``(batch, head, channel)`` (docs/numerics.md §6), are regrouped by
  batch. The result holds exactly the bytes a cache fed with only those rows would hold
  (quantization never mixes batch rows).
* :func:`crop` removes the newest tokens: from the full-precision residual, and whole
  quantized blocks. A cut strictly inside a quantized block would need the kept part of
  the block re-quantized, so it is rejected with a clear error instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .backend import Backend
from .layout import KeyBlock, TierRows, ValueRows

if TYPE_CHECKING:
    from .cache import KVCache


def _take(backend: Backend, a: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of ``a`` along its first axis (the index array on ``a``'s device)."""
    if a is None:
        return None
    return a[backend.from_any(idx, like=a)]


def _select_block(block: KeyBlock, idx: np.ndarray, backend: Backend) -> KeyBlock:
    tm = np.asarray(backend.to_numpy(block.tier_map))
    new = KeyBlock(tier_map=_take(backend, block.tier_map, idx), n_tokens=block.n_tokens)
    for bits, rows in block.tiers.items():
        per_batch = (tm == bits).reshape(tm.shape[0], -1).sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(per_batch)[:-1]])
        row_idx = np.concatenate([np.arange(starts[b], starts[b] + per_batch[b]) for b in idx]).astype(np.int64) \
            if len(idx) else np.zeros(0, np.int64)
        new.tiers[bits] = TierRows(bits, *(_take(backend, a, row_idx) for a in (rows.packed, rows.scale, rows.zero)))
    return new


def select_batch(cache: "KVCache", indices: "Sequence[int] | Any") -> None:
    """Keep batch rows ``indices`` (in that order; repeats allowed), in place.

    Raises ValueError for an index outside ``[0, batch)`` or an empty selection; the cache
    is unchanged then.
    """
    if cache._shape is None:  # empty cache: nothing stored yet
        return
    raw = np.asarray(indices.detach().cpu().numpy() if hasattr(indices, "detach") else indices)
    if raw.dtype.kind not in "iu":
        raise TypeError(f"batch indices must be integers; got dtype {raw.dtype} (for a boolean mask pass mask.nonzero())")
    idx = raw.astype(np.int64).reshape(-1)
    B, H, D = cache._shape
    if idx.size == 0:
        raise ValueError("select_batch needs at least one batch index")
    if idx.min() < 0 or idx.max() >= B:
        raise ValueError(f"batch indices must lie in [0, {B}); got {idx.tolist()}")
    backend = cache.backend
    s = cache._state.copy()
    s.key_blocks = [_select_block(b, idx, backend) for b in s.key_blocks]
    s.value_rows = [ValueRows(*(_take(backend, a, idx) for a in (r.packed, r.scale, r.zero)), r.bits) for r in s.value_rows]
    s.residual_keys = _take(backend, s.residual_keys, idx)
    s.residual_values = _take(backend, s.residual_values, idx)
    s.qsum = _take(backend, s.qsum, idx)
    s.snapshots = {m: (_take(backend, q, idx), c) for m, (q, c) in s.snapshots.items()}
    cache._state = s
    cache._shape = (int(idx.size), H, D)
    # cache._template is a zero-batch slice (kind/device/dtype only): nothing to select


def crop(cache: "KVCache", n_tokens: int) -> None:
    """Keep the first ``n_tokens`` tokens, in place (``n_tokens < 0`` removes ``-n_tokens``).

    Tokens leave the full-precision residual first, then whole quantized blocks. A cut that
    falls strictly inside a quantized block raises ValueError (the kept part would have to be
    re-quantized); the cache is unchanged then. The query statistics keep the queries already
    observed (they are a running mean over the stream); only queries of removed tokens that
    were never folded into a flushed block's snapshot are forgotten from the position count.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, (int, np.integer)):
        raise TypeError(f"crop needs an integer token count; got {n_tokens!r}")
    n_tokens = int(n_tokens)
    total = cache.seq_len
    keep = total + n_tokens if n_tokens < 0 else n_tokens
    if keep < 0:
        raise ValueError(f"cannot remove {-n_tokens} tokens from a cache holding {total}")
    if keep >= total:
        return
    R = cache.config.residual_length
    s = cache._state.copy()
    nq = s.n_key_quantized
    if keep < nq:
        if keep % R:
            raise ValueError(
                f"crop to {keep} tokens would cut quantized block {keep // R} (tokens {keep // R * R}..{keep // R * R + R - 1}) "
                f"in two and re-quantize it; crop to a block boundary (a multiple of residual_length={R}) or to at least "
                f"{nq} tokens (the quantized prefix)"
            )
        n_blocks = keep // R
        s.key_blocks = s.key_blocks[:n_blocks]
        s.residual_keys = s.residual_keys[:, :, :0]
    else:
        s.residual_keys = s.residual_keys[:, :, : keep - nq]
    nv = s.n_value_quantized
    if keep < nv:
        # values of the removed tokens: whole value chunks, then rows inside a chunk (per-token
        # quantization: dropping rows never changes the kept ones)
        rows, acc = [], 0
        for r in s.value_rows:
            if acc >= keep:
                break
            take = min(r.n_tokens, keep - acc)
            rows.append(r if take == r.n_tokens else ValueRows(r.packed[:, :, :take], r.scale[:, :, :take], r.zero[:, :, :take], r.bits))
            acc += take
        s.value_rows = rows
        s.residual_values = s.residual_values[:, :, :0]
    else:
        s.residual_values = s.residual_values[:, :, : keep - nv]
    backend = cache.backend  # slices would keep the dropped tokens alive: store copies
    kept = {id(r) for r in cache._state.value_rows}
    s.value_rows = [r if id(r) in kept else
                    ValueRows(*(backend.concat([a], 2) for a in (r.packed, r.scale, r.zero)), r.bits) for r in s.value_rows]
    s.residual_keys = backend.concat([s.residual_keys], 2)
    s.residual_values = backend.concat([s.residual_values], 2)
    s.n_tokens = keep
    s.q_position = min(s.q_position, keep)
    s.snapshots = {m: v for m, v in s.snapshots.items() if m <= keep}
    cache._state = s
