"""KVCache: the streaming MixKVQ cache of one attention layer (docs/numerics.md §9).

A cache holds a config, a backend and an immutable :class:`~mixkvq.state.CacheState`. Every
call validates its input (the shared validation layer), computes a new state with the pure
edits of :mod:`mixkvq.state`, and only then commits it — so a rejected call changes nothing.

Threads: a cache serialises its own mutations (one lock per cache), so calls from several
threads never lose or interleave tokens; each call is atomic, and the order in which
concurrent calls take effect is the order they take the lock. Reads see one committed state.
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import replace
from typing import Any, Iterator

import numpy as np

from . import state as st
from .backend import Backend, convert_like, get_backend, reference_attention
from .config import MixKVQConfig
from .format import HIGH_BITS
from .layout import KeyBlock, PackedLayout, ValueRows, nbytes_of
from .validation import as_int, check_finite, check_float_tensor, check_positive_finite, check_positive_int

#: the parts of :meth:`KVCache.nbytes_breakdown` that are quantized storage
QUANTIZED_PARTS = ("key_codes", "key_high", "key_meta", "tier_maps", "value_codes", "value_meta")


class KVCache:
    """A streaming MixKVQ cache for one attention layer.

    Keys, values and queries have shape ``(batch, heads, tokens, head_dim)``; queries may have
    ``n_rep`` times as many heads as keys (grouped-query attention, query head ``j`` serves
    KV head ``j // n_rep``). Tokens enter a full-precision residual; each full block of
    ``residual_length`` tokens is quantized once (keys per channel by salience tier, values
    per token) and never changes again. Arrays come back as the kind that was passed in
    (NumPy or torch, same device).

    Args:
        config: the :class:`~mixkvq.MixKVQConfig` (default: the paper's); flat config fields
            may be given as keyword overrides instead.
        backend: a backend name or object (``"numpy"``, ``"torch"``, ``"cupy"`` ...); default
            ``$MIXKVQ_BACKEND``, else the kind of the first arrays appended.

    Example:
        >>> cache = KVCache(MixKVQConfig())
        >>> cache.append(k, v, queries=q)      # (B, H, T, D), queries (B, Hq, T, D)
        >>> out = cache.attention(q_new)       # (B, Hq, 1, D)
        >>> cache.bits_per_element             # every stored byte counted
    """

    def __init__(self, config: MixKVQConfig | None = None, *, backend: "str | Backend | None" = None,
                 **overrides: Any) -> None:
        if config is None:
            config = MixKVQConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, MixKVQConfig):
            raise TypeError(f"config must be a MixKVQConfig, got {type(config).__name__}")
        self.config = config
        self._backend: Backend | None = get_backend(backend) if backend is not None else None
        self._state = st.CacheState()
        self._lock = threading.RLock()
        self._warned_waiting = False

    @classmethod
    def from_state(cls, config: MixKVQConfig, state: st.CacheState, backend: "str | Backend") -> "KVCache":
        """A cache holding ``state`` (e.g. rebuilt by :func:`mixkvq.io.load_cache`); its arrays
        must be ``backend``'s."""
        cache = cls(config, backend=backend)
        if state.geometry is not None and state.geometry.template is None:
            g = state.geometry
            dtype = g.dtype if g.dtype != "bfloat16" or cache.backend.name == "torch" else "float32"
            state = replace(state, geometry=replace(g, template=cache.backend.zeros((0, g.heads, 0, g.head_dim), dtype)))
        cache._state = state
        return cache

    # -- state ---------------------------------------------------------------------------
    @property
    def state(self) -> st.CacheState:
        """The committed state (immutable)."""
        return self._state

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            return get_backend(None)
        return self._backend

    @property
    def layout(self) -> PackedLayout:
        """How this cache's data is stored (needs the head size: after the first append)."""
        g = self._state.geometry
        if g is None:
            raise ValueError("the cache is empty: its layout is fixed by the first append")
        return PackedLayout(self.config, g.head_dim)

    @property
    def seq_len(self) -> int:
        """Tokens held (quantized + residual)."""
        return self._state.n_tokens

    @property
    def shape(self) -> "tuple[int, int, int] | None":
        """``(batch, kv_heads, head_dim)``, None before the first append."""
        g = self._state.geometry
        return None if g is None else g.shape

    @property
    def n_quantized(self) -> int:
        """Key tokens stored in quantized blocks."""
        return self._state.storage.n_key_quantized

    @property
    def key_blocks(self) -> list[KeyBlock]:
        return list(self._state.storage.key_blocks)

    @property
    def value_rows(self) -> list[ValueRows]:
        return list(self._state.storage.value_rows)

    @property
    def residual(self) -> tuple[Any, Any]:
        """The full-precision tails (keys, values), in the backend's array type."""
        s = self._state.storage
        return s.residual_keys, s.residual_values

    @property
    def query_stats(self) -> tuple[Any, int]:
        """(int64 fixed-point sum of |q| ``(B, H, D)``, number of query tokens in it)."""
        q = self._state.stats
        return q.qsum, q.count

    @property
    def query_position(self) -> int:
        """Tokens of the stream whose queries have been observed (lags ``seq_len`` at most)."""
        return self._state.stats.position

    # -- input ---------------------------------------------------------------------------
    def append(self, keys: Any, values: Any, queries: Any = None) -> None:
        """Add ``T`` tokens: keys and values ``(B, H, T, D)``; optional queries ``(B, Hq, T, D)``
        of the same tokens (feeds the salience statistics, §7). Flushes every complete block.
        The tokens are copied: later writes to the caller's buffers do not reach the cache."""
        with self._lock:
            state = self._state
            backend = self._backend or get_backend(None, like=keys)
            self._validate_kv(state, keys, values, backend)
            if queries is not None:
                B, H, T, D = (int(s) for s in keys.shape)
                self._validate_queries(state, queries, backend, expect_tokens=T, after_append=True, expect_shape=(B, H, D))
            vals = backend.from_any(values)
            self._check_values_storable(vals, backend)
            new = st.append(state, backend.from_any(keys), vals, backend, keys)
            if queries is not None:
                new = st.observe(new, backend.from_any(queries), backend, self.config.residual_length)
            self._commit(self._flush(new, backend), backend)

    def observe_queries(self, queries: Any) -> None:
        """Feed the queries of the next tokens of the stream (they may lag keys, never lead)."""
        with self._lock:
            state = self._state
            if state.geometry is None:
                raise ValueError("observe_queries() before any append(): queries may not run ahead of keys")
            backend = self.backend
            self._validate_queries(state, queries, backend, expect_tokens=None, after_append=False)
            new = st.observe(state, backend.from_any(queries), backend, self.config.residual_length)
            self._commit(self._flush(new, backend), backend)

    def _check_values_storable(self, values: Any, backend: Backend) -> None:
        """Values are quantized per token, so whether a token's values can be stored is known
        when it arrives: a dry run of §3 on the new tokens rejects, at the call that brings it,
        a value whose group range overflows the metadata (index in the caller's tensor), instead
        of letting it into the residual where it would fail every later flush. (rd mode: at the
        widest value width of its ladder, so only certain failures are caught here.)"""
        cfg = self.config
        ladder = getattr(cfg.keys, "value_ladder", None)
        bits = max(ladder) if ladder else cfg.values.bits
        if cfg.rotation.values:  # §11.6: the rotated values are what is quantized
            from .rotation import rotate_values

            values = rotate_values(backend, values, cfg.rotation.seed)
        backend.quantize(values, bits, cfg.group_size, cfg.meta_dtype, "values")

    def _flush(self, state: st.CacheState, backend: Backend) -> st.CacheState:
        """:func:`mixkvq.state.flush`, with a rejected block explained in the caller's terms."""
        try:
            return st.flush(state, self.config, backend)
        except ValueError as exc:
            start = state.storage.n_key_quantized
            R = self.config.residual_length
            raise type(exc)(
                f"{exc} [while quantizing the key block of tokens {start}..{start + R - 1}; the index counts within "
                f"that block. Nothing was stored. If those tokens came in an earlier call, crop({start}) drops them "
                "and the cache streams on]") from None

    def _commit(self, state: st.CacheState, backend: Backend) -> None:
        self._state = state
        self._backend = backend
        pending = state.n_tokens - state.storage.n_key_quantized
        if pending >= 2 * self.config.residual_length and self.config.waits_for_queries and not self._warned_waiting:
            self._warned_waiting = True
            warnings.warn(
                f"{pending} tokens wait in the residual because the policy "
                f"{self.config.salience_policy.name!r} needs their queries; pass queries= to append(), "
                "call observe_queries(), or use a policy that does not use queries (e.g. 'key_only')",
                stacklevel=3,
            )

    def select_batch(self, indices: Any) -> None:
        """Keep batch rows ``indices`` (any order, repeats allowed), in place, on the quantized
        storage (beam-search reorder, ``num_return_sequences`` repeat). Never re-quantizes;
        the result holds the bytes a cache fed only those rows would hold."""
        raw = np.asarray(indices.detach().cpu().numpy() if hasattr(indices, "detach") else indices)
        if raw.dtype.kind not in "iu":
            raise TypeError(f"batch indices must be integers; got dtype {raw.dtype} (for a boolean mask pass mask.nonzero())")
        idx = raw.astype(np.int64).reshape(-1)
        if idx.size == 0:
            raise ValueError("select_batch needs at least one batch index")
        with self._lock:
            state = self._state
            B = state.geometry.batch if state.geometry is not None else None
            if idx.min() < 0 or (B is not None and idx.max() >= B):
                raise ValueError(f"batch indices must lie in [0, {B if B is not None else 'batch'}); got {idx.tolist()}")
            if B is not None:  # an empty cache holds no rows to select: nothing to do
                self._state = st.select_batch(state, idx, self.backend)

    @property
    def n_freed(self) -> int:
        """Oldest tokens no longer held (freed by :meth:`free_before`); positions stay absolute."""
        return self._state.storage.freed

    @property
    def n_held(self) -> int:
        """Tokens actually stored: ``seq_len - n_freed`` (what :meth:`attention` reads)."""
        return self._state.n_tokens - self._state.storage.freed

    def free_before(self, position: int) -> int:
        """Free the quantized blocks that lie wholly before ``position`` (a sliding-window
        layer never reads them again); returns the tokens freed now. Whole blocks only, so
        nothing is re-quantized; ``seq_len`` and positions are unchanged, ``attention`` reads
        the ``n_held`` newest tokens, and a ``crop`` into the freed part is refused."""
        p = as_int(position)
        if p is None:
            raise TypeError(f"free_before needs an integer position; got {position!r}")
        with self._lock:
            before = self._state.storage.freed
            self._state = st.free_before(self._state, p, self.config.residual_length, self.backend)
            return self._state.storage.freed - before

    def crop(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` tokens (negative: drop ``-n_tokens``), in place. Cuts
        inside a quantized block are refused (they would need re-quantization); the query
        statistics are not rolled back (§9)."""
        n = as_int(n_tokens)
        if n is None:
            raise TypeError(f"crop needs an integer token count; got {n_tokens!r}")
        with self._lock:
            state = self._state
            total = state.n_tokens
            keep = total + n if n < 0 else n
            if keep < 0:
                raise ValueError(f"cannot remove {-n} tokens from a cache holding {total}")
            if keep >= total:
                return
            self._state = st.crop(state, keep, self.config.residual_length, self.backend)

    # -- validation (shared layer; nothing is mutated before it passes) -------------------
    def _validate_kv(self, state: st.CacheState, keys: Any, values: Any, backend: Backend) -> None:
        dk = check_float_tensor(keys, "keys", ndim=4)
        dv = check_float_tensor(values, "values", ndim=4)
        if tuple(keys.shape) != tuple(values.shape):
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
        if dk != dv:
            raise TypeError(f"keys ({dk}) and values ({dv}) must have the same dtype")
        B, H, T, D = (int(s) for s in keys.shape)
        if min(B, H, D) == 0:
            raise ValueError(f"keys have an empty batch, head or head_dim axis: shape {tuple(keys.shape)}")
        g = state.geometry
        if g is not None:
            if (B, H, D) != g.shape:
                raise ValueError(f"keys have (batch, heads, head_dim) = {(B, H, D)} but this cache holds {g.shape}")
            if dk != g.dtype:
                raise TypeError(f"keys have dtype {dk} but this cache holds {g.dtype}; cast them first")
        else:
            self.config.keys.check_shape(D, B * H, self.config.costs(D))
        check_finite(keys, "keys", backend)
        check_finite(values, "values", backend)

    def _validate_queries(self, state: st.CacheState, q: Any, backend: Backend, *, expect_tokens: int | None,
                          after_append: bool, expect_shape: tuple[int, int, int] | None = None) -> None:
        check_float_tensor(q, "queries", ndim=4)
        B, Hq, T, D = (int(s) for s in q.shape)
        g = state.geometry
        shape = g.shape if g is not None else expect_shape
        if B != shape[0] or D != shape[2]:
            raise ValueError(f"queries have batch {B} and head_dim {D}; the cache holds batch {shape[0]}, head_dim {shape[2]}")
        H = shape[1]
        if Hq % H or Hq == 0:
            raise ValueError(f"queries have {Hq} heads, not a multiple of the cache's {H} KV heads")
        if expect_tokens is not None and T != expect_tokens:
            raise ValueError(f"queries cover {T} tokens but keys cover {expect_tokens}; they must describe the same tokens")
        if g is not None and g.n_rep is not None and Hq // H != g.n_rep:
            raise ValueError(f"queries have {Hq} heads; earlier queries had {g.n_rep * H}")
        q_pos, n = state.stats.position, state.n_tokens
        if after_append and q_pos != n:
            raise ValueError(f"queries were observed for {q_pos} of {n} tokens; feed the missing ones "
                             "with observe_queries() before append(..., queries=...)")
        if not after_append and q_pos + T > n:
            raise ValueError(f"queries for tokens {q_pos}..{q_pos + T - 1} but only {n} tokens were appended; "
                             "queries may lag keys, never lead them")
        check_finite(q, "queries", backend)

    # -- output ----------------------------------------------------------------------------
    def attention(self, q: Any, *, scale: float | None = None, causal: bool = True, mask: Any = None,
                  window: "int | None" = None, softcap: "float | None" = None) -> Any:
        """``softmax(q K^T * scale) V`` over the whole cache. ``q (B, Hq, Tq, D)`` holds the
        last ``Tq`` tokens' queries (decode: ``Tq = 1``); returns float32 of q's shape.

        ``mask``: which held positions (``T = n_held``) each query may see, bool (or 0/1) ``(B, Tq, T)`` or
        ``(B, 1, Tq, T)`` (True = attend; e.g. left padding), applied on top of ``causal``.
        ``window``: a sliding window (query at ``p`` sees positions ``> p - window``);
        ``softcap``: scores become ``softcap * tanh(score / softcap)`` (Gemma 2).
        A query that sees no position returns zeros."""
        check_float_tensor(q, "q", ndim=4)
        state = self._state
        g = state.geometry
        if g is None or state.n_tokens == 0:
            raise ValueError("attention() on an empty cache: append keys and values first")
        B, Hq, Tq, D = (int(s) for s in q.shape)
        if B != g.batch or D != g.head_dim or Hq % g.heads or Hq == 0:
            raise ValueError(f"q has shape {tuple(q.shape)}; the cache holds batch {g.batch}, {g.heads} KV heads "
                             f"(q heads must be a multiple), head_dim {g.head_dim}")
        held = state.n_tokens - state.storage.freed
        if Tq > held:
            raise ValueError(f"q covers {Tq} tokens but the cache holds only {held}")
        backend = self.backend
        check_finite(q, "q", backend)
        scale = 1.0 / math.sqrt(D) if scale is None else check_positive_finite(scale, "scale")
        if mask is not None:
            mask = _attention_mask(mask, (B, Tq, held), backend, like=q)
        extra: dict[str, Any] = {}
        if window is not None:
            extra["window"] = check_positive_int(window, "window")
        if softcap is not None:
            extra["softcap"] = check_positive_finite(softcap, "softcap")
        layout = PackedLayout(self.config, D)
        qb = backend.from_any(q)
        if self.config.rotation.active:
            # the fused kernels read unrotated rows: a rotated config is attended over its
            # decoded history (§11.6), by the float64 reference
            return convert_like(reference_attention(backend, qb, state.storage, layout, scale=float(scale),
                                                    causal=causal, mask=mask, **extra), q, backend)
        out = backend.attention(qb, state.storage, layout, scale=float(scale), causal=causal, mask=mask, **extra)
        if backend.first_nonfinite(out) is not None:
            # a float32 logit overflowed (|q| |k| D beyond ~3e38) where the float64 reference stays
            # finite: answer this call with the reference, so finite inputs never give NaN/Inf
            out = reference_attention(backend, qb, state.storage, layout, scale=float(scale), causal=causal,
                                      mask=mask, **extra)
        return convert_like(out, q, backend)

    def dequantized(self) -> tuple[Any, Any]:
        """The whole history as float32 ``(B, H, T, D)`` (keys, values), as the kind appended."""
        state = self._state
        if state.geometry is None:
            raise ValueError("the cache is empty")
        k, v = PackedLayout(self.config, state.geometry.head_dim).dequantized(self.backend, state.storage)
        t = state.geometry.template
        return convert_like(k, t, self.backend), convert_like(v, t, self.backend)

    # -- accounting --------------------------------------------------------------------------
    def nbytes_breakdown(self) -> dict[str, int]:
        """Stored bytes by kind: every array the cache holds, counted once."""
        s, q = self._state.storage, self._state.stats
        parts = dict.fromkeys(("key_codes", "key_high", "key_meta", "tier_maps", "value_codes",
                               "value_meta", "residual", "query_stats"), 0)
        for block in s.key_blocks:
            parts["tier_maps"] += nbytes_of([block.tier_map])
            for bits, rows in block.tiers.items():
                parts["key_high" if bits == HIGH_BITS else "key_codes"] += nbytes_of([rows.packed])
                if rows.scale is not None:
                    parts["key_meta"] += nbytes_of([rows.scale, rows.zero])
        for rows in s.value_rows:
            parts["value_codes"] += nbytes_of([rows.packed])
            parts["value_meta"] += nbytes_of([rows.scale, rows.zero])
        parts["residual"] = nbytes_of(a for a in (s.residual_keys, s.residual_values) if a is not None)
        parts["query_stats"] = nbytes_of(q.arrays())
        return parts

    def arrays(self) -> Iterator[Any]:
        """Every stored array (what ``nbytes`` sums)."""
        return self._state.arrays()

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, scales, zeros, tier maps, 16-bit channels, residual, statistics."""
        return nbytes_of(self.arrays())

    @property
    def n_elements(self) -> int:
        """K and V elements represented: ``2 * B * H * T * D``."""
        g = self._state.geometry
        return 0 if g is None else 2 * g.batch * g.heads * self.n_held * g.head_dim

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the quantized storage alone: codes, 16-bit channels, scales, zeros and tier
        maps (no residual, no query statistics) — what a long context converges to."""
        parts = self.nbytes_breakdown()
        return sum(parts[p] for p in QUANTIZED_PARTS)

    @property
    def n_quantized_elements(self) -> int:
        """K and V elements held in quantized storage (keys and values may flush apart)."""
        g, s = self._state.geometry, self._state.storage
        return 0 if g is None else g.batch * g.heads * g.head_dim * (s.n_key_quantized + s.n_value_quantized - 2 * s.freed)

    @property
    def bits_per_element(self) -> float:
        """True stored bits per K/V element (``8 * nbytes / n_elements``)."""
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else 0.0

    @property
    def nominal_bits(self) -> float:
        """Code bits per quantized K/V element (16 for a 16-bit channel), no metadata or residual."""
        bits, elements = self._key_code_bits()
        g = self._state.geometry
        if g is not None:
            for rows in self._state.storage.value_rows:
                nv = rows.n_tokens * g.batch * g.heads * g.head_dim
                bits, elements = bits + nv * rows.bits, elements + nv
        return bits / elements if elements else 0.0

    @property
    def nominal_key_bits(self) -> float:
        """Average key code bits over quantized key elements (the paper's "effective bits")."""
        bits, elements = self._key_code_bits()
        return bits / elements if elements else 0.0

    def _key_code_bits(self) -> tuple[int, int]:
        """(code bits, elements) of the quantized keys, from the tier maps."""
        bits = elements = 0
        for block in self._state.storage.key_blocks:
            tm = np.asarray(self.backend.to_numpy(block.tier_map), dtype=np.int64)
            bits += int(tm.sum()) * block.n_tokens
            elements += tm.size * block.n_tokens
        return bits, elements


def _attention_mask(mask: Any, shape: tuple[int, int, int], backend: Any, *, like: Any) -> Any:
    """A user's attention mask as the backend's bool ``(B, Tq, T)`` (True = attend)."""
    m = backend.to_numpy(backend.from_any(mask)) if not isinstance(mask, np.ndarray) else mask
    m = np.asarray(m)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.dtype.kind not in "biu":
        raise TypeError(f"mask must be bool (True = attend) or 0/1 integers; got dtype {m.dtype}")
    if tuple(m.shape) != shape:
        raise ValueError(f"mask has shape {tuple(np.shape(mask))}; expected (B, Tq, T) = {shape} or (B, 1, Tq, T)")
    return backend.from_any(np.ascontiguousarray(m != 0), like=like)
