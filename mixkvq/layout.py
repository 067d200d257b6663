"""The stored structures of the format and their encode/decode, written once on backend ops.

The byte-level format is docs/numerics.md §5–§6. In short, for a key block of R tokens:

* ``tier_map`` uint8 ``(B, H, D)``: each channel's bit width (1..8, or 16 for 16-bit floats).
* per width ``w``: :class:`TierRows` whose row ``r`` is the r-th channel with that width in
  lexicographic ``(b, h, d)`` order — codes packed LSB-first along the tokens
  (``ceil(R*w/8)`` bytes), one (scale, zero) per G tokens; for ``w == 16`` the row holds
  the R values as little-endian 16-bit floats and there is no metadata.

Values are :class:`ValueRows` chunks, per token (groups of G along the channels).
:class:`PackedLayout` (a config and a head size) encodes and decodes these structures with
a backend's primitive ops, so no backend repeats the layout logic; its byte counts are the
format's one cost model (:class:`mixkvq.format.CostModel`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

from .format import HIGH_BITS, CostModel
from .schemes import as_float32

if TYPE_CHECKING:
    from .backend import Backend
    from .config import MixKVQConfig


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class KeyBlock:
    """One quantized key block: ``tier_map`` uint8 ``(B, H, D)`` and the rows of each width
    (every width of the config's ladder, possibly with 0 rows)."""

    tier_map: Any
    tiers: dict[int, TierRows] = field(default_factory=dict)
    n_tokens: int = 0

    def arrays(self) -> Iterator[Any]:
        yield self.tier_map
        for rows in self.tiers.values():
            yield from rows.arrays()


@dataclass(frozen=True)
class ValueRows:
    """Per-token quantized values: packed ``(B, H, n, ceil(D*bits/8))``, scale/zero
    ``(B, H, n, ceil(D/G))``. ``bits`` is the chunk's width (the config's value bits, or the
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
    """How a config's data is stored for heads of ``head_dim`` channels (§5–§6)."""

    config: "MixKVQConfig"
    head_dim: int

    @property
    def costs(self) -> CostModel:
        return self.config.costs(self.head_dim)

    def encode_keys(self, backend: "Backend", keys: Any, tier_map: Any, name: str = "keys") -> KeyBlock:
        """Quantize and pack one key block ``keys`` ``(B, H, R, D)`` by ``tier_map`` (§6)."""
        cfg = self.config
        rotated = cfg.rotation.key_widths(cfg.key_tier_bits)
        if rotated:  # §11.6: the channel sets of the chosen tiers, rotated per token
            from .rotation import rotate_tiers

            keys = rotate_tiers(backend, keys, tier_map, rotated, cfg.rotation.seed, name=name)
        rows = backend.encode_key_block(keys, tier_map, cfg.key_tier_bits, cfg.group_size, cfg.meta_dtype,
                                        cfg.high_dtype, name)
        return KeyBlock(tier_map=tier_map, n_tokens=int(keys.shape[2]),
                        tiers={bits: TierRows(bits, *rows[bits]) for bits in cfg.key_tier_bits})

    def decode_keys(self, backend: "Backend", block: KeyBlock) -> Any:
        """Dequantize a key block to float32 ``(B, H, R, D)``."""
        B, H, D = (int(s) for s in block.tier_map.shape)
        R = block.n_tokens
        out = backend.zeros((B, H, D, R), "float32", like=block.tier_map)
        for bits, rows in block.tiers.items():
            if bits == HIGH_BITS:
                values = backend.decode_half(rows.packed, self.config.high_dtype)
            else:
                values = backend.dequantize(rows.packed, rows.scale, rows.zero, bits, self.config.group_size, R, "float32")
            out[block.tier_map == bits] = values
        out = out.swapaxes(-1, -2)
        rotated = self.config.rotation.key_widths(self.config.key_tier_bits)
        if rotated:
            from .rotation import rotate_tiers

            out = rotate_tiers(backend, out, block.tier_map, rotated, self.config.rotation.seed, inverse=True,
                               name="dequantized keys")
        return out

    def values_as_quantized(self, backend: "Backend", values: Any, name: str = "values") -> Any:
        """Values ``(B, H, n, D)`` as §6 quantizes them: rotated (§11.6, float32) when the
        config rotates values, else unchanged. The rd allocator prices these (§8.3)."""
        if not self.config.rotation.values:
            return values
        from .rotation import rotate_values

        return rotate_values(backend, values, self.config.rotation.seed, name=name)

    def encode_values(self, backend: "Backend", values: Any, bits: int | None = None, name: str = "values",
                      *, rotated: bool = False) -> ValueRows:
        """Quantize values ``(B, H, n, D)`` per token at ``bits`` (default: the config's).
        ``rotated``: ``values`` already went through :meth:`values_as_quantized`."""
        bits = self.config.values.bits if bits is None else bits
        if not rotated:
            values = self.values_as_quantized(backend, values, name)
        packed, scale, zero = backend.quantize(values, bits, self.config.group_size, self.config.meta_dtype, name)
        return ValueRows(packed, scale, zero, bits)

    def decode_values(self, backend: "Backend", rows: ValueRows) -> Any:
        """Dequantize a value chunk to float32 ``(B, H, n, D)``."""
        out = backend.dequantize(rows.packed, rows.scale, rows.zero, rows.bits, self.config.group_size,
                                 self.head_dim, "float32")
        if self.config.rotation.values:
            from .rotation import rotate_values

            out = rotate_values(backend, out, self.config.rotation.seed, inverse=True, name="dequantized values")
        return out

    def dequantized(self, backend: "Backend", storage: "Any") -> tuple[Any, Any]:
        """A :class:`mixkvq.state.Storage` as float32 ``(B, H, T, D)`` keys and values
        (quantized tokens dequantized, then the residual's exact upcast)."""
        keys = [self.decode_keys(backend, b) for b in storage.key_blocks]
        values = [self.decode_values(backend, r) for r in storage.value_rows]
        for part, res in ((keys, storage.residual_keys), (values, storage.residual_values)):
            if res is not None and (res.shape[2] or not part):
                part.append(as_float32(res))
        return backend.concat(keys, axis=2), backend.concat(values, axis=2)


def nbytes_of(arrays: "Iterator[Any]") -> int:
    """Sum of the real sizes of arrays (numpy/cupy ``nbytes``, torch ``numel*element_size``)."""
    total = 0
    for a in arrays:
        nb = getattr(a, "nbytes", None)
        total += int(nb) if nb is not None else int(a.numel() * a.element_size())
    return total
