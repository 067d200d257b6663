"""The cache state: one immutable value (geometry, storage, query statistics) and pure edits.

A :class:`CacheState` is never changed in place. Every edit — appending tokens, observing
queries, flushing blocks (docs/numerics.md §9), selecting batch rows, cropping, rebuilding
from saved arrays — is a function from a state to a new state, so a call that fails halfway
leaves nothing half-updated: :class:`~mixkvq.KVCache` only swaps its reference to the new
state once the whole edit has succeeded. The storage half (:class:`Storage`) is what a
backend's attention reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

from .dtypes import dtype_name
from .format import HIGH_BITS, n_groups, row_bytes
from .layout import KeyBlock, PackedLayout, TierRows, ValueRows, nbytes_of

if TYPE_CHECKING:
    from .backend import Backend
    from .config import MixKVQConfig


@dataclass(frozen=True)
class Geometry:
    """What the first append fixed.

    Attributes:
        batch, heads, head_dim: ``(B, H, D)`` of the keys and values.
        dtype: the input dtype name (the residual is kept in it).
        template: a zero-size array of the kind appended (its library and device: outputs
            come back as that kind).
        n_rep: query heads per KV head, once queries were observed (None before).
    """

    batch: int
    heads: int
    head_dim: int
    dtype: str
    template: Any = field(default=None, compare=False, repr=False)
    n_rep: int | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.batch, self.heads, self.head_dim)


@dataclass(frozen=True)
class Storage:
    """Every stored token: quantized key blocks and value chunks (oldest first) and the
    full-precision residuals ``(B, H, r, D)`` in the input dtype (with
    ``value_window="sliding"`` the two residuals differ in length)."""

    key_blocks: tuple[KeyBlock, ...] = ()
    value_rows: tuple[ValueRows, ...] = ()
    residual_keys: Any = None
    residual_values: Any = None
    #: oldest tokens no longer held (whole blocks freed outside a sliding window; see
    #: :func:`free_before`). They count as quantized, so positions stay absolute.
    freed: int = 0

    @property
    def n_key_quantized(self) -> int:
        return self.freed + sum(b.n_tokens for b in self.key_blocks)

    @property
    def n_value_quantized(self) -> int:
        return self.freed + sum(r.n_tokens for r in self.value_rows)

    def arrays(self) -> Iterator[Any]:
        for block in self.key_blocks:
            yield from block.arrays()
        for rows in self.value_rows:
            yield from rows.arrays()
        yield from (a for a in (self.residual_keys, self.residual_values) if a is not None)


@dataclass(frozen=True)
class QueryStats:
    """§7: ``qsum`` int64 ``(B, H, D)`` (None before any query), the stream position the
    queries reached, the query tokens summed (``count``; differs from ``position`` after a
    crop), and the snapshots ``{boundary: (qsum, count)}`` of block boundaries whose queries
    were observed but whose block is not flushed yet."""

    qsum: Any = None
    position: int = 0
    count: int = 0
    snapshots: Mapping[int, tuple[Any, int]] = field(default_factory=dict)

    def arrays(self) -> Iterator[Any]:
        if self.qsum is not None:
            yield self.qsum
        yield from (q for q, _ in self.snapshots.values())


@dataclass(frozen=True)
class CacheState:
    """The whole state of one layer's cache (see the module docstring)."""

    geometry: Geometry | None = None
    storage: Storage = field(default_factory=Storage)
    stats: QueryStats = field(default_factory=QueryStats)
    n_tokens: int = 0

    def arrays(self) -> Iterator[Any]:
        """Every stored array (what ``nbytes`` sums)."""
        yield from self.storage.arrays()
        yield from self.stats.arrays()


def _take(backend: "Backend", a: Any, idx: np.ndarray) -> Any:
    """Rows ``idx`` of ``a`` along its first axis (the index array on ``a``'s device)."""
    return None if a is None else a[backend.from_any(idx, like=a)]


def _own(backend: "Backend", a: Any) -> Any:
    """A copy that keeps no larger base array alive (a slice would, unseen by ``nbytes``)."""
    return None if a is None else backend.concat([a], 2)


# -- the stream (§9) ------------------------------------------------------------------------------
def append(state: CacheState, keys: Any, values: Any, backend: "Backend", template: Any) -> CacheState:
    """Add validated tokens ``(B, H, T, D)`` (backend arrays) to the residual; the tokens are
    copied (the residual never aliases the caller's arrays)."""
    s = state.storage
    geometry = state.geometry
    if geometry is None:
        B, H, _, D = (int(x) for x in keys.shape)
        geometry = Geometry(B, H, D, dtype_name(template), template[:0] if hasattr(template, "__getitem__") else template)
    residual_keys = backend.concat([keys] if s.residual_keys is None else [s.residual_keys, keys], 2)
    residual_values = backend.concat([values] if s.residual_values is None else [s.residual_values, values], 2)
    return replace(state, geometry=geometry, n_tokens=state.n_tokens + int(keys.shape[2]),
                   storage=replace(s, residual_keys=residual_keys, residual_values=residual_values))


def observe(state: CacheState, queries: Any, backend: "Backend", residual_length: int) -> CacheState:
    """Fold validated queries ``(B, H*n_rep, T, D)`` of the next ``T`` stream tokens into the
    statistics (§7), with a snapshot at every block boundary they cross that is not flushed."""
    geometry = state.geometry
    n_rep = int(queries.shape[1]) // geometry.heads
    stats = state.stats
    T = int(queries.shape[2])
    start = stats.position
    R = residual_length
    marks = list(range((start // R + 1) * R, start + T + 1, R))  # block boundaries these tokens reach
    # int64 (B, H, len(marks) + 1, D): the sums up to each boundary, then the rest (exact integers)
    seg = backend.query_segment_sums(queries, n_rep, [0, *(m - start for m in marks), T])
    running = stats.qsum if stats.qsum is not None else backend.zeros(seg.shape[:2] + (seg.shape[3],), "int64", like=seg)
    quantized = state.storage.n_key_quantized
    snapshots = dict(stats.snapshots)
    for k, m in enumerate(marks):
        running = running + seg[:, :, k]
        if m > quantized:
            snapshots[m] = (running, stats.count + (m - start))
    stats = QueryStats(running + seg[:, :, len(marks)], start + T, stats.count + T, snapshots)
    return replace(state, stats=stats, geometry=replace(geometry, n_rep=n_rep))


def flush(state: CacheState, config: "MixKVQConfig", backend: "Backend") -> CacheState:
    """Quantize every block the residual holds whose queries are in (§9): salience and tiers
    by the key strategy, key rows per tier, values per token (or, with a sliding value
    window, the values that left the window)."""
    if state.geometry is None:
        return state
    R = config.residual_length
    layout = PackedLayout(config, state.geometry.head_dim)
    costs = layout.costs
    policy = config.salience_policy
    s, stats = state.storage, state.stats
    blocks, chunks = list(s.key_blocks), list(s.value_rows)
    res_k, res_v = s.residual_keys, s.residual_values
    snapshots = dict(stats.snapshots)
    quantized = s.n_key_quantized
    sliding = config.values.window == "sliding"
    while res_k is not None and res_k.shape[2] >= R:
        end = quantized + R
        if config.waits_for_queries and stats.position < end:
            break
        kblk = res_k[:, :, :R]
        # the rd allocator prices the values as they will be quantized (rotated, §11.6)
        vblk = layout.values_as_quantized(backend, res_v[:, :, :R]) if not sliding else None
        relevance = None
        if config.waits_for_queries:
            qsum, count = snapshots[end]
            relevance = backend.relevance(qsum, count, state.geometry.n_rep or 1)
        tier_map, value_bits = config.keys.assign(backend, kblk, vblk, relevance, policy, costs)
        blocks.append(layout.encode_keys(backend, kblk, tier_map))
        res_k = res_k[:, :, R:]
        snapshots.pop(end, None)
        quantized = end
        if not sliding:
            chunks.append(layout.encode_values(backend, vblk, bits=value_bits, rotated=True))
            res_v = res_v[:, :, R:]
    values_moved = len(chunks) != len(s.value_rows)
    if sliding and res_v is not None:
        excess = int(res_v.shape[2]) - R
        if excess > 0:
            rows = layout.encode_values(backend, res_v[:, :, :excess])
            if chunks and chunks[-1].n_tokens < R:
                # The newest chunk stays open until it holds R tokens: a decode step then costs
                # one bounded copy, and a stream of n tokens holds about n / R chunks, not n.
                # Per-token quantization makes the merged bytes those of separate chunks.
                last = chunks[-1]
                rows = ValueRows(*(backend.concat([a, b], 2) for a, b in zip(last.arrays(), rows.arrays())), last.bits)
                chunks[-1] = rows
            else:
                chunks.append(rows)
            res_v = res_v[:, :, excess:]
            values_moved = True
    if len(blocks) == len(s.key_blocks) and not values_moved:
        return state
    storage = Storage(tuple(blocks), tuple(chunks),
                      _own(backend, res_k) if len(blocks) != len(s.key_blocks) else res_k,
                      _own(backend, res_v) if values_moved else res_v, s.freed)
    return replace(state, storage=storage, stats=replace(stats, snapshots=snapshots))


# -- structural edits ------------------------------------------------------------------------------
def _select_block(block: KeyBlock, idx: np.ndarray, backend: "Backend") -> KeyBlock:
    tm = np.asarray(backend.to_numpy(block.tier_map))
    tiers = {}
    for bits, rows in block.tiers.items():
        per_batch = (tm == bits).reshape(tm.shape[0], -1).sum(axis=1)
        starts = np.concatenate([[0], np.cumsum(per_batch)[:-1]])
        row_idx = np.concatenate([np.arange(starts[b], starts[b] + per_batch[b]) for b in idx]).astype(np.int64)
        tiers[bits] = TierRows(bits, *(_take(backend, a, row_idx) for a in (rows.packed, rows.scale, rows.zero)))
    return KeyBlock(_take(backend, block.tier_map, idx), tiers, block.n_tokens)


def select_batch(state: CacheState, idx: np.ndarray, backend: "Backend") -> CacheState:
    """Keep batch rows ``idx`` (validated int64 indices; any order, repeats allowed). The
    tier rows of a key block, ordered by ``(batch, head, channel)``, are regrouped per batch
    row; the result holds exactly the bytes a cache fed with only those rows would hold."""
    if state.geometry is None:
        return state
    s, q = state.storage, state.stats
    storage = Storage(
        tuple(_select_block(b, idx, backend) for b in s.key_blocks),
        tuple(ValueRows(*(_take(backend, a, idx) for a in (r.packed, r.scale, r.zero)), r.bits) for r in s.value_rows),
        _take(backend, s.residual_keys, idx), _take(backend, s.residual_values, idx), s.freed)
    stats = replace(q, qsum=_take(backend, q.qsum, idx),
                    snapshots={m: (_take(backend, snap, idx), c) for m, (snap, c) in q.snapshots.items()})
    return replace(state, storage=storage, stats=stats, geometry=replace(state.geometry, batch=int(idx.size)))


def free_before(state: CacheState, position: int, residual_length: int, backend: "Backend") -> CacheState:
    """Drop the quantized key blocks that lie wholly before ``position`` — what a
    sliding-window layer never reads again — and the value rows of the same tokens (a value
    chunk that straddles the boundary keeps its later rows: values are quantized per token, so
    the kept rows' bytes do not change). Positions stay absolute (``Storage.freed``)."""
    s = state.storage
    R = residual_length
    n_blocks = max(0, min(len(s.key_blocks), (position - s.freed) // R))
    target = n_blocks * R
    if not n_blocks or s.n_value_quantized - s.freed < target:
        return state
    chunks, acc = [], 0
    for r in s.value_rows:
        if acc + r.n_tokens <= target:
            acc += r.n_tokens
            continue
        cut = max(0, target - acc)
        chunks.append(r if cut == 0 else
                      ValueRows(*(_own(backend, a[:, :, cut:]) for a in (r.packed, r.scale, r.zero)), r.bits))
        acc += r.n_tokens
    storage = replace(s, key_blocks=s.key_blocks[n_blocks:], value_rows=tuple(chunks), freed=s.freed + target)
    return replace(state, storage=storage)


def crop(state: CacheState, keep: int, residual_length: int, backend: "Backend") -> CacheState:
    """Keep the first ``keep`` tokens (``0 <= keep < n_tokens``): from the residual, then whole
    quantized blocks; a cut strictly inside a quantized block raises ValueError. Value chunks
    lose their newest rows (per-token quantization: the kept rows do not change). The query
    statistics are not rolled back (§9); the query position rewinds to ``keep``."""
    R = residual_length
    s = state.storage
    nq = s.n_key_quantized
    if keep < s.freed:
        raise ValueError(f"crop to {keep} tokens reaches tokens this sliding-window cache already freed "
                         f"(it holds positions {s.freed}..{state.n_tokens - 1})")
    if keep < nq:
        if keep % R:
            raise ValueError(
                f"crop to {keep} tokens would cut quantized block {keep // R} (tokens {keep // R * R}..{keep // R * R + R - 1}) "
                f"in two and re-quantize it; crop to a block boundary (a multiple of residual_length={R}) or to at least "
                f"{nq} tokens (the quantized prefix)")
        blocks, res_k = s.key_blocks[: (keep - s.freed) // R], s.residual_keys[:, :, :0]
    else:
        blocks, res_k = s.key_blocks, s.residual_keys[:, :, : keep - nq]
    nv = s.n_value_quantized
    if keep < nv:
        chunks, acc = [], s.freed
        for r in s.value_rows:
            if acc >= keep:
                break
            take = min(r.n_tokens, keep - acc)
            chunks.append(r if take == r.n_tokens else
                          ValueRows(*(_own(backend, a[:, :, :take]) for a in (r.packed, r.scale, r.zero)), r.bits))
            acc += take
        res_v = s.residual_values[:, :, :0]
    else:
        chunks, res_v = list(s.value_rows), s.residual_values[:, :, : keep - nv]
    storage = Storage(tuple(blocks), tuple(chunks), _own(backend, res_k), _own(backend, res_v), s.freed)
    q = state.stats
    stats = replace(q, position=min(q.position, keep), snapshots={m: v for m, v in q.snapshots.items() if m <= keep})
    return replace(state, storage=storage, stats=stats, n_tokens=keep)


# -- to and from arrays (persistence) ----------------------------------------------------------------
def to_arrays(state: CacheState) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(header, arrays)``: the counters and structure as JSON-ready data, and every stored
    array by member name (backend arrays; the caller converts them)."""
    g, s, q = state.geometry, state.storage, state.stats
    if s.freed:
        raise StateError(f"this sliding-window cache freed its first {s.freed} tokens; the file format stores whole "
                         "caches only, so it cannot be saved")
    arrays: dict[str, Any] = {}
    blocks = []
    for i, blk in enumerate(s.key_blocks):
        arrays[f"k{i}.tier_map"] = blk.tier_map
        for bits, rows in blk.tiers.items():
            arrays[f"k{i}.t{bits}.packed"] = rows.packed
            if rows.scale is not None:
                arrays[f"k{i}.t{bits}.scale"] = rows.scale
                arrays[f"k{i}.t{bits}.zero"] = rows.zero
        blocks.append({"n_tokens": blk.n_tokens, "tiers": list(blk.tiers)})
    value_rows = []
    for i, r in enumerate(s.value_rows):
        for part in ("packed", "scale", "zero"):
            arrays[f"v{i}.{part}"] = getattr(r, part)
        value_rows.append({"bits": r.bits})
    for name, a in (("residual_keys", s.residual_keys), ("residual_values", s.residual_values), ("qsum", q.qsum)):
        if a is not None:
            arrays[name] = a
    snapshots = []
    for j, (m, (snap, c)) in enumerate(sorted(q.snapshots.items())):
        arrays[f"snap{j}"] = snap
        snapshots.append([m, c])
    header = {
        "counters": {"n_tokens": state.n_tokens, "q_position": q.position, "q_count": q.count},
        "shape": list(g.shape) if g else None, "dtype": g.dtype if g else None, "n_rep": g.n_rep if g else None,
        "blocks": blocks, "value_rows": value_rows, "snapshots": snapshots,
    }
    return header, arrays


class StateError(ValueError):
    """Saved arrays and counters that do not form a valid state (the message says why)."""


def from_arrays(header: dict[str, Any], arrays: Mapping[str, np.ndarray], config: "MixKVQConfig",
                restore: Any) -> CacheState:
    """Rebuild a state from :func:`to_arrays`'s header and NumPy arrays, checking that they
    agree with ``config`` and with each other; ``restore(name)`` converts member ``name`` to
    the backend's array. Raises :class:`StateError` on any inconsistency."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise StateError(msg)

    counters = header["counters"]
    shape = header["shape"]
    n = int(counters["n_tokens"])
    if shape is None:
        need(not arrays and n == 0, "no shape but stored arrays or tokens")
        return CacheState()
    B, H, D = (int(x) for x in shape)
    R, G = config.residual_length, config.group_size
    widths = set(config.key_tier_bits)
    blocks = []
    for i, blk in enumerate(header["blocks"]):
        tm = arrays[f"k{i}.tier_map"]
        need(tm.shape == (B, H, D) and tm.dtype == np.uint8, f"block {i} tier map has shape {tm.shape}, expected {(B, H, D)}")
        need(int(blk["n_tokens"]) == R, f"block {i} holds {blk['n_tokens']} tokens, the config's residual_length is {R}")
        need(set(int(b) for b in blk["tiers"]) == widths, f"block {i} has tiers {blk['tiers']}, the config's are {sorted(widths)}")
        need(set(np.unique(tm).tolist()) <= widths, f"block {i} tier map uses widths outside the config's {sorted(widths)}")
        tiers = {}
        for bits in (int(b) for b in blk["tiers"]):
            count = int((tm == bits).sum())
            packed = arrays[f"k{i}.t{bits}.packed"]
            width = 2 * R if bits == HIGH_BITS else row_bytes(R, bits)
            need(packed.shape == (count, width) and packed.dtype == np.uint8,
                 f"block {i} tier {bits} packed shape {packed.shape}, expected {(count, width)}")
            if bits == HIGH_BITS:
                tiers[bits] = TierRows(bits, restore(f"k{i}.t{bits}.packed"))
                continue
            for part in ("scale", "zero"):
                need(arrays[f"k{i}.t{bits}.{part}"].shape == (count, n_groups(R, G)), f"block {i} tier {bits} {part} shape")
            tiers[bits] = TierRows(bits, *(restore(f"k{i}.t{bits}.{p}") for p in ("packed", "scale", "zero")))
        blocks.append(KeyBlock(restore(f"k{i}.tier_map"), tiers, R))
    chunks = []
    for i, vr in enumerate(header["value_rows"]):
        bits = int(vr["bits"])
        need(1 <= bits <= 8, f"value chunk {i} has {bits} bits")
        packed = arrays[f"v{i}.packed"]
        need(packed.ndim == 4 and packed.shape[:2] == (B, H) and packed.shape[3] == row_bytes(D, bits) and packed.dtype == np.uint8,
             f"value chunk {i} packed shape {packed.shape}")
        for part in ("scale", "zero"):
            need(arrays[f"v{i}.{part}"].shape == packed.shape[:3] + (n_groups(D, G),), f"value chunk {i} {part} shape")
        chunks.append(ValueRows(*(restore(f"v{i}.{p}") for p in ("packed", "scale", "zero")), bits))
    residual = {}
    for name in ("residual_keys", "residual_values"):
        need(name in arrays, f"{name} is missing")
        a = arrays[name]
        need(a.ndim == 4 and a.shape[:2] == (B, H) and a.shape[3] == D, f"{name} shape {a.shape}")
        residual[name] = restore(name)
    storage = Storage(tuple(blocks), tuple(chunks), residual["residual_keys"], residual["residual_values"])
    rk, rv = int(arrays["residual_keys"].shape[2]), int(arrays["residual_values"].shape[2])
    need(storage.n_key_quantized + rk == n, f"{storage.n_key_quantized} quantized + {rk} residual key tokens != {n} tokens")
    need(storage.n_value_quantized + rv == n, f"{storage.n_value_quantized} quantized + {rv} residual value tokens != {n} tokens")
    qsum = None
    if "qsum" in arrays:
        need(arrays["qsum"].shape == (B, H, D) and arrays["qsum"].dtype == np.int64, "qsum shape/dtype")
        qsum = restore("qsum")
    position, count = int(counters["q_position"]), int(counters["q_count"])
    need(0 <= position <= n, "query position beyond the tokens")
    snapshots = {}
    for j, (m, c) in enumerate(header["snapshots"]):
        need(arrays[f"snap{j}"].shape == (B, H, D) and arrays[f"snap{j}"].dtype == np.int64, f"snapshot {j} shape/dtype")
        snapshots[int(m)] = (restore(f"snap{j}"), int(c))
    n_rep = header["n_rep"]
    need(n_rep is None or (isinstance(n_rep, int) and n_rep >= 1), f"n_rep {n_rep!r}")
    geometry = Geometry(B, H, D, str(header["dtype"]), None, n_rep)
    return CacheState(geometry, storage, QueryStats(qsum, position, count, snapshots), n)


__all__ = ["CacheState", "Geometry", "Storage", "QueryStats", "StateError", "append", "observe", "flush",
           "select_batch", "crop", "to_arrays", "from_arrays"]
