"""Packed layouts: how codes, metadata and tier maps of a key block and of value rows are stored.

The byte-level format is docs/numerics.md §5–§6. In short, for a key block of R tokens:

* ``tier_map`` uint8 ``(B, H, D)``: each channel's bit width (1..8, or 16 for 16-bit floats).
* per width ``w``: :class:`TierRows` whose row ``r`` is the r-th channel with that width in
  lexicographic ``(b, h, d)`` order — codes packed LSB-first along the tokens
  (``ceil(R*w/8)`` bytes), one (scale, zero) per G tokens; for ``w == 16`` the row holds
  the R values as little-endian 16-bit floats and there is no metadata.

Counts per width may differ between heads and blocks (threshold mode) or be fixed (budget
mode); the layout is the same. The encode/decode functions here are written once on the
backend's primitive ops and array indexing shared by NumPy, CuPy and torch, so no backend
repeats the layout logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .config import HIGH_BITS

if TYPE_CHECKING:
    from .backend import Backend
    from .config import MixKVQConfig


def row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes of ``bits`` bits (padding at the row's end)."""
    return (n * bits + 7) // 8


def n_groups(n: int, group_size: int) -> int:
    """Groups along a row of ``n`` elements (the last may be partial)."""
    return -(-n // group_size)


@dataclass
class TierRows:
    """The channels of one bit width in one key block.

    Attributes:
        bits: width (1..8, or 16 for 16-bit floats).
        packed: uint8 ``(N, row_bytes)``.
        scale, zero: ``(N, R/G)`` in the metadata dtype, or None for 16-bit rows.
    """

    bits: int
    packed: Any
    scale: Any = None
    zero: Any = None

    def arrays(self) -> Iterator[Any]:
        yield self.packed
        if self.scale is not None:
            yield self.scale
            yield self.zero


@dataclass
class KeyBlock:
    """One quantized key block: ``tier_map`` uint8 ``(B, H, D)`` and the rows of each width."""

    tier_map: Any
    tiers: dict[int, TierRows] = field(default_factory=dict)
    n_tokens: int = 0

    def arrays(self) -> Iterator[Any]:
        yield self.tier_map
        for rows in self.tiers.values():
            yield from rows.arrays()


@dataclass
class ValueRows:
    """Per-token quantized values: packed ``(B, H, n, ceil(D*bits/8))``, scale/zero
    ``(B, H, n, ceil(D/G))``. ``bits`` is the chunk's width (``config.value_bits``, or the
    width the ``rd`` allocator chose for the block)."""

    packed: Any
    scale: Any
    zero: Any
    bits: int = 2

    def arrays(self) -> Iterator[Any]:
        yield from (self.packed, self.scale, self.zero)

    @property
    def n_tokens(self) -> int:
        return int(self.packed.shape[2])


@dataclass(frozen=True)
class PackedLayout:
    """The storage geometry of a config for heads of ``head_dim`` channels (§5–§6).

    One object answers "how is it stored and how many bytes is it": encode/decode of key
    blocks and value rows (delegating to the functions below), and exact byte counts used by
    budget-mode predictions and the ``rd`` allocator's costs.
    """

    config: "MixKVQConfig"
    head_dim: int

    @property
    def meta_bytes(self) -> int:
        from .dtypes import ITEMSIZE

        return ITEMSIZE[self.config.meta_dtype]

    def key_row_nbytes(self, bits: int) -> int:
        """Bytes of one key channel over a block at width ``bits`` (codes + scale + zero, or 16-bit values)."""
        R, G = self.config.residual_length, self.config.group_size
        if bits == HIGH_BITS:
            return 2 * R
        return row_bytes(R, bits) + 2 * self.meta_bytes * n_groups(R, G)

    def value_token_nbytes(self, bits: int) -> int:
        """Bytes of one head's value row for one token at width ``bits``."""
        D, G = self.head_dim, self.config.group_size
        return row_bytes(D, bits) + 2 * self.meta_bytes * n_groups(D, G)

    def key_block_nbytes(self, tier_counts: "dict[int, int]", heads: int) -> int:
        """Bytes of a key block whose tier map holds ``tier_counts[bits]`` channels per width
        (summed over ``heads`` = batch x kv_heads), tier map included."""
        return heads * self.head_dim + sum(n * self.key_row_nbytes(b) for b, n in tier_counts.items())

    def budget_block_nbytes(self, heads: int) -> int:
        """Bytes of one key block plus its values in budget mode (fixed counts), ``heads`` = B x H."""
        n_high, n_mid = self.config.budget_counts(self.head_dim)
        counts = {HIGH_BITS: n_high, self.config.mid_bits: n_mid, self.config.low_bits: self.head_dim - n_high - n_mid}
        merged: dict[int, int] = {}
        for bits, n in counts.items():
            merged[bits] = merged.get(bits, 0) + n
        values = self.config.residual_length * self.value_token_nbytes(self.config.value_bits)
        return self.key_block_nbytes({b: heads * n for b, n in merged.items()}, heads) + heads * values

    def encode_keys(self, backend: "Backend", keys: Any, tier_map: Any, name: str = "keys") -> "KeyBlock":
        return encode_key_block(backend, keys, tier_map, self.config, name)

    def decode_keys(self, backend: "Backend", block: "KeyBlock") -> Any:
        return decode_key_block(backend, block, self.config)

    def encode_values(self, backend: "Backend", values: Any, bits: int | None = None, name: str = "values") -> "ValueRows":
        return encode_values(backend, values, self.config, name, bits)

    def decode_values(self, backend: "Backend", rows: "ValueRows") -> Any:
        return decode_values(backend, rows, self.config, self.head_dim)


def encode_key_block(backend: "Backend", keys: Any, tier_map: Any, config: "MixKVQConfig", name: str = "keys") -> KeyBlock:
    """Quantize and pack one key block ``keys`` ``(B, H, R, D)`` by ``tier_map`` (§6)."""
    channel_rows = keys.swapaxes(-1, -2)  # (B, H, D, R): one row per channel, along tokens
    block = KeyBlock(tier_map=tier_map, n_tokens=int(keys.shape[2]))
    for bits in config.key_tier_bits:
        rows = channel_rows[tier_map == bits]
        if bits == HIGH_BITS:
            block.tiers[bits] = TierRows(bits, backend.encode_half(rows, config.high_dtype, name))
        else:
            packed, scale, zero = backend.quantize(rows, bits, config.group_size, config.meta_dtype, name)
            block.tiers[bits] = TierRows(bits, packed, scale, zero)
    return block


def decode_key_block(backend: "Backend", block: KeyBlock, config: "MixKVQConfig") -> Any:
    """Dequantize a key block to float32 ``(B, H, R, D)``."""
    B, H, D = (int(s) for s in block.tier_map.shape)
    R = block.n_tokens
    out = backend.zeros((B, H, D, R), "float32", like=block.tier_map)
    for bits, rows in block.tiers.items():
        if bits == HIGH_BITS:
            values = backend.decode_half(rows.packed, config.high_dtype)
        else:
            values = backend.dequantize(rows.packed, rows.scale, rows.zero, bits, config.group_size, R, "float32")
        out[block.tier_map == bits] = values
    return out.swapaxes(-1, -2)


def encode_values(backend: "Backend", values: Any, config: "MixKVQConfig", name: str = "values",
                  bits: int | None = None) -> ValueRows:
    """Quantize values ``(B, H, n, D)`` per token (groups of G along the channels) at ``bits``
    (default ``config.value_bits``)."""
    bits = config.value_bits if bits is None else bits
    packed, scale, zero = backend.quantize(values, bits, config.group_size, config.meta_dtype, name)
    return ValueRows(packed, scale, zero, bits)


def decode_values(backend: "Backend", rows: ValueRows, config: "MixKVQConfig", head_dim: int) -> Any:
    """Dequantize a value chunk to float32 ``(B, H, n, D)``."""
    return backend.dequantize(rows.packed, rows.scale, rows.zero, rows.bits, config.group_size, head_dim, "float32")


def nbytes_of(arrays: "Iterator[Any]") -> int:
    """Sum of the real sizes of arrays (numpy/cupy ``nbytes``, torch ``numel*element_size``)."""
    total = 0
    for a in arrays:
        nb = getattr(a, "nbytes", None)
        total += int(nb) if nb is not None else int(a.numel() * a.element_size())
    return total
