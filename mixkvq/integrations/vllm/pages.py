"""Where a packed MixKVQ block lives inside one vLLM page (no vLLM import: testable alone).

A vLLM page is one block of R tokens of one layer, all KV heads (layout LBHNC makes
``kv_cache[block]`` one contiguous run of ``heads * R * state_content_bytes`` bytes). A
packed block stores, at fixed offsets (each section 8-byte aligned):

    qsum      int64 (H, D)            §7 query sums over tokens [0, end of this block)
    tier_map  uint8 (H, D)            §6
    per key width w (widest first):
      packed  uint8 (H*c_w, row_bytes(R, w))   rows in (head, channel) order
      scale   meta  (H*c_w, R/G)               (none for the 16-bit tier)
      zero    meta  (H*c_w, R/G)
    values packed uint8 (H, R, row_bytes(D, v)), scale/zero meta (H, R, ceil(D/G))

``c_w`` is the number of channels of width ``w`` per head: fixed in budget and uniform modes
(``BudgetKeys.tier_counts``), which is what makes the page size a constant. The byte counts
are the format's :class:`~mixkvq.format.CostModel`; the page adds only the query sums
(``8*D`` bytes per head) and alignment padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import MixKVQConfig
from ...format import HIGH_BITS, ITEMSIZE, n_groups, row_bytes
from ...schemes import BudgetKeys, UniformKeys


def _align(n: int, a: int = 8) -> int:
    return (n + a - 1) // a * a


def tier_counts(config: MixKVQConfig, head_dim: int) -> dict[int, int]:
    """Channels per head of each key width; raises for modes whose counts follow the data."""
    keys = config.keys
    if isinstance(keys, BudgetKeys):
        return keys.tier_counts(head_dim)
    if isinstance(keys, UniformKeys):
        return {int(keys.widths()[0]): head_dim}
    raise NotImplementedError(
        f"the vLLM backend needs a fixed page size: tier_mode {config.tier_mode!r} chooses tier counts from the "
        "data (threshold/rd), so a page would have to be sized for its worst case; use tier_mode='budget' or "
        "'uniform'")


@dataclass(frozen=True)
class Section:
    offset: int
    nbytes: int
    dtype: str  # "uint8", "int64" or the metadata dtype
    shape: tuple[int, ...]


class PageLayout:
    """Offsets of every section of a packed block of ``heads`` KV heads."""

    def __init__(self, config: MixKVQConfig, heads: int, head_dim: int) -> None:
        if config.values.window != "block":
            raise NotImplementedError("the vLLM backend stores values per block (value_window='block')")
        if config.rotation.active:
            raise NotImplementedError("the vLLM backend's fused kernels read unrotated rows: key_rotation / "
                                      "value_rotation (docs/numerics.md §11.6) are not supported there; "
                                      "leave them at their defaults")
        self.config, self.heads, self.head_dim = config, int(heads), int(head_dim)
        H, D, R, G = self.heads, self.head_dim, config.residual_length, config.group_size
        self.R = R
        self.counts = tier_counts(config, D)
        self.widths = tuple(config.key_tier_bits)
        self.value_bits = int(config.values.bits)
        meta = config.meta_dtype
        mb = ITEMSIZE[meta]
        sections: dict[str, Section] = {}
        off = 0

        def add(name: str, dtype: str, shape: tuple[int, ...], itemsize: int) -> None:
            nonlocal off
            n = itemsize
            for s in shape:
                n *= s
            sections[name] = Section(off, n, dtype, shape)
            off = _align(off + n)

        add("qsum", "int64", (H, D), 8)
        add("tier_map", "uint8", (H, D), 1)
        for w in self.widths:
            rows = H * self.counts.get(w, 0)
            if w == HIGH_BITS:
                add(f"k{w}.packed", "uint8", (rows, 2 * R), 1)
            else:
                add(f"k{w}.packed", "uint8", (rows, row_bytes(R, w)), 1)
                add(f"k{w}.scale", meta, (rows, n_groups(R, G)), mb)
                add(f"k{w}.zero", meta, (rows, n_groups(R, G)), mb)
        v = self.value_bits
        add("v.packed", "uint8", (1, H, R, row_bytes(D, v)), 1)
        add("v.scale", meta, (1, H, R, n_groups(D, G)), mb)
        add("v.zero", meta, (1, H, R, n_groups(D, G)), mb)
        self.sections = sections
        #: bytes a packed block uses (all heads)
        self.block_bytes = off
        #: what vLLM's spec gets: bytes per (KV head, token) cell, so that
        #: heads * R * state_content_bytes >= block_bytes
        self.state_content_bytes = -(-off // (H * R))
        #: the page vLLM allocates per block and layer
        self.page_bytes = H * R * self.state_content_bytes

    # -- accounting -------------------------------------------------------------------------
    def format_block_bytes(self) -> int:
        """The format's bytes for this block (CostModel, all heads): no query sums, no padding."""
        return self.heads * self.config.costs(self.head_dim).head_block_bytes(self.counts, self.value_bits)

    def bytes_per_token(self) -> float:
        """Page bytes per token per layer (all KV heads)."""
        return self.page_bytes / self.R

    # -- views ------------------------------------------------------------------------------
    def views(self, page: Any) -> dict[str, Any]:
        """Typed torch views of the sections of ``page`` (a contiguous uint8 tensor of at
        least ``block_bytes``)."""
        import torch

        dt = {"uint8": torch.uint8, "int64": torch.int64, "float16": torch.float16,
              "bfloat16": torch.bfloat16, "float32": torch.float32}
        out = {}
        for name, s in self.sections.items():
            out[name] = page[s.offset: s.offset + s.nbytes].view(dt[s.dtype]).view(s.shape)
        return out


__all__ = ["PageLayout", "Section", "tier_counts"]
