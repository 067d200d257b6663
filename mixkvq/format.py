"""The MixKVQ storage format's constants and its one cost model (docs/numerics.md).

The ground floor of the library: this module imports nothing but the standard library, so
the simulator (:mod:`mixkvq.sim`), the core, every backend, the rate-distortion allocator and
calibration all take the format's numbers from here — bit widths, the 16-bit tier slot, row
and group sizes, the fixed-point unit of the query statistics, float limits, dtype codes
and the byte count of every stored piece. The C/CUDA kernels get the same numbers from the
header :func:`c_header` generates (``backends/cupy/kernels/mixkvq_format.h``; a test checks
the committed file against this module).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

#: Version of the format (stored bytes, golden vectors, cache files). One number for all.
FORMAT_VERSION = 1

# -- bit widths --------------------------------------------------------------------------------
#: Quantized code widths (§3, §5).
CODE_BITS = tuple(range(1, 9))
#: Tier-map value of a key channel kept as 16-bit floats (§6).
HIGH_BITS = 16
#: Number of tier-map values a pointer table indexed by width needs (0..16).
TIER_SLOTS = HIGH_BITS + 1
#: Every value a tier map may hold.
TIER_WIDTHS = (*CODE_BITS, HIGH_BITS)

# -- dtypes --------------------------------------------------------------------------------------
INPUT_DTYPES = ("float16", "bfloat16", "float32", "float64")
META_DTYPES = ("float16", "bfloat16", "float32")
HIGH_DTYPES = ("bfloat16", "float16")
OUT_DTYPES = ("float32", "float16", "bfloat16")
#: Bytes per element of each storage dtype.
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
#: Largest finite magnitude of each 16/32-bit float format (output saturation, §4).
FLOAT_MAX = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38, "float32": 3.4028234663852886e38}
#: Storage-kind codes the kernels receive for metadata and 16-bit data.
DTYPE_KIND = {"float16": 0, "bfloat16": 1, "float32": 2}
#: Step of a 16-bit channel relative to its largest magnitude (half an ulp, §8.3 step 1).
HALF_ULP = {"bfloat16": 2.0**-7, "float16": 2.0**-10}

# -- query statistics (§7) -------------------------------------------------------------------------
#: Fixed-point unit of |q|: 2^16.
FIXED_ONE = 65536
#: Per-element saturation of the fixed-point |q|: 2^40.
FIXED_MAX = 2**40


def row_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes of ``bits`` bits (§5: padding at the row's end)."""
    return (n * bits + 7) // 8


def n_groups(n: int, group_size: int) -> int:
    """Groups along a row of ``n`` elements (§3: the last may be partial)."""
    return -(-n // group_size)


def budget_count(fraction_or_count: float, head_dim: int) -> int:
    """§9: a fraction of ``head_dim`` as a channel count, ``floor(f * D + 0.5)``."""
    return math.floor(fraction_or_count * head_dim + 0.5)


def meta_overflow_error(name: str, index: tuple[int, ...], dtype: str, what: str = "scale/zero metadata") -> ValueError:
    """§2: the error for a scale, zero or 16-bit channel value that overflows its dtype."""
    hint = "use meta_dtype='float32' or 'bfloat16'" if what.startswith("scale") else "use high_dtype='bfloat16'"
    return ValueError(
        f"{name}: the {what} at group/row index {index} overflows {dtype} "
        f"(the values' range is too large for that dtype); {hint}"
    )


def range_overflow_error(name: str, index: tuple[int, ...]) -> ValueError:
    """§3 step 4: the error for a group whose largest dequantized value overflows float32."""
    return ValueError(
        f"{name}: the group at group/row index {index} would dequantize beyond float32's range "
        "(its rounded scale times 2^bits - 1, plus its zero, overflows float32); its values lie too close "
        "to float32's limit to be stored"
    )


@dataclass(frozen=True)
class CostModel:
    """Exact stored bytes of every piece of a quantized block (§6, §8.3 step 3, §9).

    One model serves the layout, budget-mode predictions, the rd allocator's costs, the
    calibration's bit targets and the page size of a paged (serving) cache.

    Attributes:
        residual_length: R, tokens per block.
        group_size: G.
        head_dim: D.
        meta_bytes: bytes per scale/zero value (2 for float16/bfloat16, 4 for float32).
    """

    residual_length: int
    group_size: int
    head_dim: int
    meta_bytes: int

    @classmethod
    def of(cls, residual_length: int, group_size: int, head_dim: int, meta_dtype: str) -> "CostModel":
        return cls(residual_length, group_size, head_dim, ITEMSIZE[meta_dtype])

    # -- bytes ---------------------------------------------------------------------------------
    def key_row_bytes(self, bits: int) -> int:
        """One key channel over a block: codes + scale + zero per group, or 16-bit values."""
        R = self.residual_length
        if bits == HIGH_BITS:
            return 2 * R
        return row_bytes(R, bits) + 2 * self.meta_bytes * n_groups(R, self.group_size)

    def value_token_bytes(self, bits: int) -> int:
        """One head's value row for one token: codes + scale + zero per channel group."""
        D = self.head_dim
        return row_bytes(D, bits) + 2 * self.meta_bytes * n_groups(D, self.group_size)

    @property
    def tier_map_bytes(self) -> int:
        """One head's tier map for one block (uint8 per channel)."""
        return self.head_dim

    def head_block_bytes(self, counts: Mapping[int, int], value_bits: int) -> int:
        """One (batch, head)'s block of R tokens: tier map, ``counts[w]`` key channels of each
        width ``w`` and the R value rows at ``value_bits``."""
        if sum(counts.values()) != self.head_dim:
            raise ValueError(f"tier counts {dict(counts)} do not add up to head_dim {self.head_dim}")
        keys = sum(n * self.key_row_bytes(w) for w, n in counts.items())
        return self.tier_map_bytes + keys + self.residual_length * self.value_token_bytes(value_bits)

    # -- bits (the rd allocator's integer costs, §8.3 step 3) -------------------------------------------
    def key_channel_bits(self, bits: int) -> int:
        return 8 * self.key_row_bytes(bits)

    def value_head_bits(self, bits: int) -> int:
        """One head's R value tokens at ``bits``."""
        return 8 * self.residual_length * self.value_token_bytes(bits)

    @property
    def tier_map_bits(self) -> int:
        return 8 * self.tier_map_bytes

    def block_bits(self, fractions: Mapping[int, float], value_bits: int) -> float:
        """True bits per K/V element of a block whose key channels have width ``w`` in
        fraction ``fractions[w]`` (affine in the fractions; exact for integer counts)."""
        R, D = self.residual_length, self.head_dim
        keys = D * (self.tier_map_bits / D + sum(f * self.key_channel_bits(w) for w, f in fractions.items()))
        return (keys + self.value_head_bits(value_bits)) / (2 * R * D)

    def min_block_bits(self, key_bits: int, value_bits: int) -> float:
        """True bits per element of the cheapest block (every key channel at ``key_bits``,
        values at ``value_bits``): the lowest feasible ``rd_bits``."""
        return self.block_bits({key_bits: 1.0}, value_bits)


def c_header() -> str:
    """The C/CUDA header with this module's constants (``mixkvq_format.h``)."""
    lines = [
        "// Generated from mixkvq/format.py by mixkvq.format.c_header(); do not edit.",
        "// The format's constants for the C and CUDA kernels (docs/numerics.md).",
        "#pragma once",
        f"#define MIXKVQ_FORMAT_VERSION {FORMAT_VERSION}",
        f"#define MIXKVQ_HIGH_BITS {HIGH_BITS}",
        f"#define MIXKVQ_TIER_SLOTS {TIER_SLOTS}",
        f"#define MIXKVQ_MAX_CODE_BITS {CODE_BITS[-1]}",
        f"#define MIXKVQ_FIXED_ONE {FIXED_ONE}.0f",
        f"#define MIXKVQ_FIXED_MAX {FIXED_MAX}.0f",
        f"#define MIXKVQ_FLOAT16_MAX {FLOAT_MAX['float16']}f",
        *(f"#define MIXKVQ_KIND_{name.upper().replace('FLOAT', 'F').replace('BF', 'BF')} {code}"
          for name, code in DTYPE_KIND.items()),
    ]
    return "\n".join(lines) + "\n"


__all__ = [
    "FORMAT_VERSION", "CODE_BITS", "HIGH_BITS", "TIER_SLOTS", "TIER_WIDTHS", "INPUT_DTYPES", "META_DTYPES",
    "HIGH_DTYPES", "OUT_DTYPES", "ITEMSIZE", "FLOAT_MAX", "DTYPE_KIND", "HALF_ULP", "FIXED_ONE", "FIXED_MAX",
    "row_bytes", "n_groups", "budget_count", "meta_overflow_error", "range_overflow_error", "CostModel", "c_header",
]
