"""The streaming MixKVQ KV cache (docs/numerics.md §9), written once on the Backend ops."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import numpy as np

from .backend import Backend, convert_like, get_backend
from .config import HIGH_BITS, MixKVQConfig
from .dtypes import ITEMSIZE, dtype_name
from .layout import KeyBlock, TierRows, ValueRows, decode_key_block, decode_values, encode_key_block, encode_values, nbytes_of
from .validation import check_finite, check_float_tensor

#: the parts of :meth:`KVCache.nbytes_breakdown` that are quantized storage
QUANTIZED_PARTS = ("key_codes", "key_high", "key_meta", "tier_maps", "value_codes", "value_meta")


@dataclass
class CacheView:
    """Read-only view of a cache's storage, handed to a backend's ``attention``.

    Attributes:
        key_blocks: quantized key blocks, oldest first (each ``R`` tokens).
        value_rows: per-token quantized value chunks, oldest first.
        residual_keys / residual_values: full-precision tails ``(B, H, r, D)`` (input dtype)
            or None; with ``value_window="sliding"`` the two tails differ in length.
    """

    config: MixKVQConfig
    backend: Backend
    key_blocks: list[KeyBlock]
    value_rows: list[ValueRows]
    residual_keys: Any
    residual_values: Any
    head_dim: int

    def dequantized_keys(self) -> Iterator[Any]:
        """Float32 key chunks ``(B, H, n, D)`` in token order (blocks, then the residual)."""
        for block in self.key_blocks:
            yield decode_key_block(self.backend, block, self.config)
        if self.residual_keys is not None and self.residual_keys.shape[2]:
            yield _float32(self.residual_keys)

    def dequantized_values(self) -> Iterator[Any]:
        for rows in self.value_rows:
            yield decode_values(self.backend, rows, self.config, self.head_dim)
        if self.residual_values is not None and self.residual_values.shape[2]:
            yield _float32(self.residual_values)

    def dequantized(self) -> tuple[Any, Any]:
        """Whole history as float32 ``(B, H, T, D)`` keys and values."""
        return (self.backend.concat(list(self.dequantized_keys()), axis=2),
                self.backend.concat(list(self.dequantized_values()), axis=2))


def _float32(x: Any) -> Any:
    return x.astype("float32") if hasattr(x, "astype") else x.float()


@dataclass
class _State:
    """Everything the cache stores. Replaced as a whole, so a failed call changes nothing."""

    key_blocks: list[KeyBlock] = field(default_factory=list)
    value_rows: list[ValueRows] = field(default_factory=list)
    residual_keys: Any = None
    residual_values: Any = None
    n_tokens: int = 0          # tokens appended (keys and values)
    qsum: Any = None           # int64 (B, H, D): fixed-point sum of |q| (§7)
    q_position: int = 0        # tokens whose queries have been observed
    q_count: int = 0           # query tokens in qsum (== q_position unless crop dropped tokens)
    snapshots: dict[int, tuple[Any, int]] = field(default_factory=dict)  # token count -> (qsum, q_count)

    def copy(self) -> "_State":
        return replace(self, key_blocks=list(self.key_blocks), value_rows=list(self.value_rows),
                       snapshots=dict(self.snapshots))

    @property
    def n_key_quantized(self) -> int:
        return sum(b.n_tokens for b in self.key_blocks)

    @property
    def n_value_quantized(self) -> int:
        return sum(r.n_tokens for r in self.value_rows)


class KVCache:
    """A streaming MixKVQ cache for one attention layer.

    Keys, values and queries have shape ``(batch, heads, tokens, head_dim)``; queries may have
    ``n_rep`` times as many heads as keys (grouped-query attention, query head ``j`` serves
    KV head ``j // n_rep``). Tokens enter a full-precision residual; each full block of
    ``residual_length`` tokens is quantized once (keys per channel by salience tier, values
    per token) and never changes again. Arrays come back as the kind that was passed in
    (NumPy or torch, same device).

    Example:
        >>> cache = KVCache(MixKVQConfig())
        >>> cache.append(k, v, queries=q)      # (B, H, T, D), queries (B, Hq, T, D)
        >>> out = cache.attention(q_new)       # (B, Hq, 1, D)
        >>> cache.bits_per_element             # every stored byte counted
    """

    def __init__(self, config: MixKVQConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = MixKVQConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        if not isinstance(config, MixKVQConfig):
            raise TypeError(f"config must be a MixKVQConfig, got {type(config).__name__}")
        self.config = config
        self._backend: Backend | None = get_backend(config.backend) if config.backend else None
        self._state = _State()
        self._shape: tuple[int, int, int] | None = None  # (B, H, D)
        self._dtype: str | None = None
        self._n_rep: int | None = None
        self._template: Any = None
        self._warned_waiting = False

    # -- properties ----------------------------------------------------------------------
    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = get_backend(None)
        return self._backend

    @property
    def seq_len(self) -> int:
        """Tokens held (quantized + residual)."""
        return self._state.n_tokens

    @property
    def n_quantized(self) -> int:
        """Key tokens stored in quantized blocks."""
        return self._state.n_key_quantized

    @property
    def key_blocks(self) -> list[KeyBlock]:
        return list(self._state.key_blocks)

    @property
    def value_rows(self) -> list[ValueRows]:
        return list(self._state.value_rows)

    @property
    def residual(self) -> tuple[Any, Any]:
        """The full-precision tails (keys, values), in the backend's array type."""
        return self._state.residual_keys, self._state.residual_values

    @property
    def query_stats(self) -> tuple[Any, int]:
        """(int64 fixed-point sum of |q| ``(B, H, D)``, number of query tokens in it)."""
        return self._state.qsum, self._state.q_count

    @property
    def query_position(self) -> int:
        """Tokens of the stream whose queries have been observed (lags ``seq_len`` at most)."""
        return self._state.q_position

    def select_batch(self, indices: Any) -> None:
        """Keep batch rows ``indices`` (any order, repeats allowed), in place, on the quantized
        storage (beam-search reorder, ``num_return_sequences`` repeat). Never re-quantizes."""
        from .cache_ops import select_batch

        select_batch(self, indices)

    def crop(self, n_tokens: int) -> None:
        """Keep the first ``n_tokens`` tokens (negative: drop ``-n_tokens``), in place. Cuts
        inside a quantized block are refused (they would need re-quantization)."""
        from .cache_ops import crop

        crop(self, n_tokens)

    def view(self) -> CacheView:
        s = self._state
        return CacheView(self.config, self.backend, list(s.key_blocks), list(s.value_rows),
                         s.residual_keys, s.residual_values, self._shape[2] if self._shape else 0)

    # -- input ---------------------------------------------------------------------------
    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """Undo the call's changes to the cache's attributes if it fails (the stored state
        itself is only replaced by ``_commit``), so a rejected call changes nothing."""
        saved = (self._backend, self._n_rep)
        try:
            yield
        except BaseException:
            self._backend, self._n_rep = saved
            raise

    def append(self, keys: Any, values: Any, queries: Any = None) -> None:
        """Add ``T`` tokens: keys and values ``(B, H, T, D)``; optional queries ``(B, Hq, T, D)``
        of the same tokens (feeds the salience statistics, §7). Flushes every complete block.
        The tokens are copied: later writes to the caller's buffers do not reach the cache."""
        with self._transaction():
            self._append(keys, values, queries)

    def _append(self, keys: Any, values: Any, queries: Any) -> None:
        self._validate_kv(keys, values)
        if queries is not None:
            B, H, T, D = (int(s) for s in keys.shape)
            self._validate_queries(queries, expect_tokens=T, after_append=True, expect_shape=(B, H, D))
        backend = self._resolve_backend(keys)
        k, v = backend.from_any(keys), backend.from_any(values)
        state = self._state.copy()
        # concat always copies: the residual never aliases the caller's arrays
        state.residual_keys = backend.concat([k] if state.residual_keys is None else [state.residual_keys, k], 2)
        state.residual_values = backend.concat([v] if state.residual_values is None else [state.residual_values, v], 2)
        state.n_tokens += int(keys.shape[2])
        if queries is not None:
            self._observe(state, backend.from_any(queries))
        self._drain(state)
        self._commit(state, keys)

    def observe_queries(self, queries: Any) -> None:
        """Feed the queries of the next tokens of the stream (they may lag keys, never lead)."""
        with self._transaction():
            self._observe_queries(queries)

    def _observe_queries(self, queries: Any) -> None:
        self._validate_queries(queries, expect_tokens=None, after_append=False)
        state = self._state.copy()
        self._observe(state, self.backend.from_any(queries))
        self._drain(state)
        self._commit(state, None)

    def _commit(self, state: _State, template: Any) -> None:
        if template is not None and self._template is None:
            self._shape = (int(template.shape[0]), int(template.shape[1]), int(template.shape[3]))
            self._dtype = dtype_name(template)
            self._template = template[:0] if hasattr(template, "__getitem__") else template
        self._state = state
        pending = state.n_tokens - state.n_key_quantized
        if pending >= 2 * self.config.residual_length and self.config.salience_policy.uses_queries and not self._warned_waiting:
            self._warned_waiting = True
            warnings.warn(
                f"{pending} tokens wait in the residual because the policy "
                f"{self.config.salience_policy.name!r} needs their queries; pass queries= to append(), "
                "call observe_queries(), or use a policy that does not use queries (e.g. 'key_only')",
                stacklevel=3,
            )

    # -- validation (shared layer; nothing is mutated before it passes) -------------------
    def _resolve_backend(self, like: Any) -> Backend:
        if self._backend is None:
            self._backend = get_backend(None, like=like)
        return self._backend

    def _validate_kv(self, keys: Any, values: Any) -> None:
        dk = check_float_tensor(keys, "keys", ndim=4)
        dv = check_float_tensor(values, "values", ndim=4)
        if tuple(keys.shape) != tuple(values.shape):
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must have the same shape")
        if dk != dv:
            raise TypeError(f"keys ({dk}) and values ({dv}) must have the same dtype")
        B, H, T, D = (int(s) for s in keys.shape)
        if min(B, H, D) == 0:
            raise ValueError(f"keys have an empty batch, head or head_dim axis: shape {tuple(keys.shape)}")
        if self._shape is not None:
            if (B, H, D) != self._shape:
                raise ValueError(
                    f"keys have (batch, heads, head_dim) = {(B, H, D)} but this cache holds {self._shape}"
                )
            if dk != self._dtype:
                raise TypeError(f"keys have dtype {dk} but this cache holds {self._dtype}; cast them first")
        if self.config.tier_mode == "budget" and self.config.salience_policy.mixed_precision:
            self.config.budget_counts(D)  # raises if the budget does not fit head_dim
        backend = self._resolve_backend(keys)
        check_finite(keys, "keys", backend)
        check_finite(values, "values", backend)

    def _validate_queries(self, q: Any, *, expect_tokens: int | None, after_append: bool,
                          expect_shape: tuple[int, int, int] | None = None) -> None:
        check_float_tensor(q, "queries", ndim=4)
        B, Hq, T, D = (int(s) for s in q.shape)
        shape = self._shape or expect_shape
        if shape is None and not after_append:
            raise ValueError("observe_queries() before any append(): queries may not run ahead of keys")
        if shape is not None:
            if B != shape[0] or D != shape[2]:
                raise ValueError(f"queries have batch {B} and head_dim {D}; the cache holds batch {shape[0]}, head_dim {shape[2]}")
        H = shape[1] if shape is not None else None
        if H is not None and Hq % H:
            raise ValueError(f"queries have {Hq} heads, not a multiple of the cache's {H} KV heads")
        if expect_tokens is not None and T != expect_tokens:
            raise ValueError(f"queries cover {T} tokens but keys cover {expect_tokens}; they must describe the same tokens")
        if self._n_rep is not None and H is not None and Hq // H != self._n_rep:
            raise ValueError(f"queries have {Hq} heads; earlier queries had {self._n_rep * H}")
        s = self._state
        if after_append and s.q_position != s.n_tokens:
            raise ValueError(
                f"queries were observed for {s.q_position} of {s.n_tokens} tokens; feed the missing ones "
                "with observe_queries() before append(..., queries=...)"
            )
        if not after_append and s.q_position + T > s.n_tokens:
            raise ValueError(
                f"queries for tokens {s.q_position}..{s.q_position + T - 1} but only {s.n_tokens} tokens were appended; "
                "queries may lag keys, never lead them"
            )
        check_finite(q, "queries", self._resolve_backend(q))

    # -- statistics and flushing ------------------------------------------------------------
    def _observe(self, state: _State, q: Any) -> None:
        backend = self.backend
        H = self._shape[1] if self._shape else None
        if H is None:  # first append in progress: H from the residual
            H = int(state.residual_keys.shape[1])
        n_rep = int(q.shape[1]) // H
        if q.shape[1] % H:
            raise ValueError(f"queries have {q.shape[1]} heads, not a multiple of {H} KV heads")
        self._n_rep = n_rep
        u = backend.query_token_sums(q, n_rep)  # int64 (B, H, T, D)
        T = int(q.shape[2])
        start = state.q_position
        qsum = state.qsum if state.qsum is not None else backend.zeros(u.shape[:2] + (u.shape[3],), "int64", like=u)
        R = self.config.residual_length
        first_boundary = (start // R + 1) * R
        for m in range(first_boundary, start + T + 1, R):
            if m > state.n_key_quantized:
                state.snapshots[m] = (qsum + u[:, :, : m - start].sum(axis=2), state.q_count + (m - start))
        state.qsum = qsum + u.sum(axis=2)
        state.q_position += T
        state.q_count += T

    def _drain(self, state: _State) -> None:
        cfg, backend = self.config, self.backend
        R = cfg.residual_length
        policy = cfg.salience_policy
        flushed_keys, flushed_values = state.n_key_quantized, state.n_value_quantized
        while state.residual_keys is not None and state.residual_keys.shape[2] >= R:
            end = state.n_key_quantized + R
            if policy.uses_queries and policy.mixed_precision and state.q_position < end:
                break
            kblk = state.residual_keys[:, :, :R]
            tier_map, value_bits = self._tier_map(kblk, state.residual_values[:, :, :R], state, end)
            state.key_blocks.append(encode_key_block(backend, kblk, tier_map, cfg))
            state.residual_keys = state.residual_keys[:, :, R:]
            state.snapshots.pop(end, None)
            if cfg.value_window == "block":
                state.value_rows.append(encode_values(backend, state.residual_values[:, :, :R], cfg, bits=value_bits))
                state.residual_values = state.residual_values[:, :, R:]
        if cfg.value_window == "sliding" and state.residual_values is not None:
            excess = int(state.residual_values.shape[2]) - R
            if excess > 0:
                state.value_rows.append(encode_values(backend, state.residual_values[:, :, :excess], cfg))
                state.residual_values = state.residual_values[:, :, excess:]
        # A slice would keep the flushed tokens alive in its base array (memory that nbytes
        # could not see): store the residuals as arrays of their own.
        if state.n_key_quantized != flushed_keys:
            state.residual_keys = backend.concat([state.residual_keys], 2)
        if state.n_value_quantized != flushed_values:
            state.residual_values = backend.concat([state.residual_values], 2)

    def _tier_map(self, kblk: Any, vblk: Any, state: _State, end: int) -> tuple[Any, int]:
        """Tier map ``(B, H, D)`` of the block ending at token ``end`` and its value width."""
        cfg, backend = self.config, self.backend
        policy = cfg.salience_policy
        B, H, _, D = (int(s) for s in kblk.shape)
        if not policy.mixed_precision:
            return backend.zeros((B, H, D), "uint8", like=kblk) + cfg.low_bits, cfg.value_bits
        relevance = None
        if policy.uses_queries:
            qsum, count = state.snapshots[end]
            relevance = backend.relevance(qsum, count, self._n_rep or 1)
        if cfg.tier_mode == "rd":
            return self._rd_allocate(kblk, vblk, relevance)
        salience = policy.score(relevance, backend.difficulty(kblk, cfg.low_bits))
        tier_bits = (HIGH_BITS, cfg.mid_bits, cfg.low_bits)
        if cfg.tier_mode == "budget":
            n_high, n_mid = cfg.budget_counts(D)
            return backend.assign_budget(salience, n_high, n_mid, tier_bits), cfg.value_bits
        return backend.assign_threshold(salience, cfg.thresholds[0], cfg.thresholds[1], tier_bits), cfg.value_bits

    def _rd_allocate(self, kblk: Any, vblk: Any, relevance: Any) -> tuple[Any, int]:
        """§8.3: the allocator runs on the host (float64, one implementation for every backend)."""
        from .sim.allocate import rd_allocate

        cfg, backend = self.config, self.backend
        host = backend.to_numpy
        weight = np.ones(tuple(kblk.shape[:2]) + (kblk.shape[3],), np.float32) if relevance is None else host(relevance)
        tier_map, value_bits = rd_allocate(
            host(_float32(kblk)), host(_float32(vblk)), weight, ladder=cfg.bit_ladder, value_ladder=cfg.value_bit_ladder,
            budget_bits=cfg.rd_bits, group_size=cfg.group_size, meta_bytes=ITEMSIZE[cfg.meta_dtype],
            high_dtype=cfg.high_dtype, value_weight=cfg.rd_value_weight,
        )
        return backend.from_any(tier_map, like=kblk), value_bits

    # -- output ----------------------------------------------------------------------------
    def attention(self, q: Any, *, scale: float | None = None, causal: bool = True) -> Any:
        """``softmax(q K^T * scale) V`` over the whole cache. ``q (B, Hq, Tq, D)`` holds the
        last ``Tq`` tokens' queries (decode: ``Tq = 1``); returns float32 of q's shape."""
        check_float_tensor(q, "q", ndim=4)
        if self._shape is None or self.seq_len == 0:
            raise ValueError("attention() on an empty cache: append keys and values first")
        B, Hq, Tq, D = (int(s) for s in q.shape)
        if B != self._shape[0] or D != self._shape[2] or Hq % self._shape[1]:
            raise ValueError(
                f"q has shape {tuple(q.shape)}; the cache holds batch {self._shape[0]}, "
                f"{self._shape[1]} KV heads (q heads must be a multiple), head_dim {self._shape[2]}"
            )
        if Tq > self.seq_len:
            raise ValueError(f"q covers {Tq} tokens but the cache holds only {self.seq_len}")
        backend = self.backend
        check_finite(q, "q", backend)
        out = backend.attention(backend.from_any(q), self.view(), scale=scale if scale is not None else 1.0 / math.sqrt(D), causal=causal)
        return convert_like(out, q, backend)

    def dequantized(self) -> tuple[Any, Any]:
        """The whole history as float32 ``(B, H, T, D)`` (keys, values), as the kind appended."""
        if self._shape is None:
            raise ValueError("the cache is empty")
        k, v = self.view().dequantized()
        return convert_like(k, self._template, self.backend), convert_like(v, self._template, self.backend)

    # -- accounting --------------------------------------------------------------------------
    def nbytes_breakdown(self) -> dict[str, int]:
        """Stored bytes by kind: every array the cache holds, counted once."""
        s = self._state
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
        parts["query_stats"] = nbytes_of(
            [s.qsum] * (s.qsum is not None) + [snap for snap, _ in s.snapshots.values()]
        )
        return parts

    def arrays(self) -> Iterator[Any]:
        """Every stored array (what ``nbytes`` sums)."""
        s = self._state
        for block in s.key_blocks:
            yield from block.arrays()
        for rows in s.value_rows:
            yield from rows.arrays()
        yield from (a for a in (s.residual_keys, s.residual_values, s.qsum) if a is not None)
        yield from (snap for snap, _ in s.snapshots.values())

    @property
    def nbytes(self) -> int:
        """Every stored byte: codes, scales, zeros, tier maps, 16-bit channels, residual, statistics."""
        return nbytes_of(self.arrays())

    @property
    def n_elements(self) -> int:
        """K and V elements represented: ``2 * B * H * T * D``."""
        if self._shape is None:
            return 0
        B, H, D = self._shape
        return 2 * B * H * self.seq_len * D

    @property
    def quantized_nbytes(self) -> int:
        """Bytes of the quantized storage alone: codes, 16-bit channels, scales, zeros and tier
        maps (no residual, no query statistics) — what a long context converges to."""
        parts = self.nbytes_breakdown()
        return sum(parts[p] for p in QUANTIZED_PARTS)

    @property
    def n_quantized_elements(self) -> int:
        """K and V elements held in quantized storage (keys and values may flush apart)."""
        if self._shape is None:
            return 0
        B, H, D = self._shape
        return B * H * D * (self.n_quantized + sum(r.n_tokens for r in self._state.value_rows))

    @property
    def bits_per_element(self) -> float:
        """True stored bits per K/V element (``8 * nbytes / n_elements``)."""
        return 8.0 * self.nbytes / self.n_elements if self.n_elements else 0.0

    @property
    def nominal_bits(self) -> float:
        """Code bits per quantized K/V element (16 for a 16-bit channel), no metadata or residual."""
        bits, elements = self._key_code_bits()
        if self._shape is not None:
            B, H, D = self._shape
            for rows in self._state.value_rows:
                nv = rows.n_tokens * B * H * D
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
        for block in self._state.key_blocks:
            tm = np.asarray(self.backend.to_numpy(block.tier_map), dtype=np.int64)
            bits += int(tm.sum()) * block.n_tokens
            elements += tm.size * block.n_tokens
        return bits, elements
