"""Key strategies and value quantization: the parts a :class:`~mixkvq.MixKVQConfig` is made of.

Each part is a small frozen dataclass that validates itself at construction and owns its
rule (docs/numerics.md §8): which widths a block's tier map may hold, whether a head of a
given size can be served, and how a block's tier map (and, for rate-distortion, its value
width) is assigned. The streaming cache calls :meth:`KeyScheme.assign` and never switches on
a mode name.

* :class:`UniformKeys` — KIVI: every key channel at one width (no salience).
* :class:`BudgetKeys` — §8.1: fixed counts of 16-bit and mid-width channels per head.
* :class:`ThresholdKeys` — §8.2 (the paper's): absolute salience thresholds.
* :class:`RateDistortionKeys` — §8.3: one true-bit budget over key widths and the value width.
* :class:`ValueQuant` — values per token (§6) and their window (§9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .format import CODE_BITS, HIGH_BITS, HIGH_DTYPES, CostModel, budget_count
from .dtypes import canonical_dtype
from .validation import as_int, check_bits

if TYPE_CHECKING:
    from .backend import Backend
    from .policy import SaliencePolicy

#: Largest accepted ``rd_bits``: more than any allocation can spend (8-bit keys and values with
#: float32 metadata for every element, G = 1, and a tier map per token, R = 1: 76 bits), so a
#: larger budget is a typo, not a request.
MAX_RD_BITS = 128.0
#: Largest accepted ``rd_value_weight`` (λ): beyond it the value error swamps every key error
#: (the allocator would only ever widen values), so a larger rate is a typo.
MAX_RD_VALUE_WEIGHT = 1e6
#: Largest channel count a budget may name: more channels than any attention head has.
MAX_BUDGET_COUNT = 1 << 16


def as_float32(x: Any) -> Any:
    """``x`` as float32 in its own array library (NumPy, CuPy or torch; exact for float16/bfloat16)."""
    return x.astype("float32") if hasattr(x, "astype") else x.float()


class KeyScheme:
    """What every key strategy provides (see the module docstring).

    Attributes:
        name: the ``tier_mode`` of the flat config form.
        high_dtype: storage of 16-bit key channels (``"bfloat16"`` or ``"float16"``).
    """

    name: ClassVar[str]
    high_dtype: str = "bfloat16"
    #: whether tiers follow a salience (so a query-aware policy makes blocks wait for queries)
    uses_salience: ClassVar[bool] = True

    def widths(self) -> tuple[int, ...]:
        """Tier-map values a block may hold, widest first (16 = 16-bit floats)."""
        raise NotImplementedError

    def check_shape(self, head_dim: int, heads: int, costs: CostModel) -> None:
        """Raise ValueError if heads of ``head_dim`` channels (``heads`` = batch x KV heads per
        block) cannot be stored by this scheme."""

    def assign(self, backend: "Backend", keys: Any, values: Any, relevance: Any, policy: "SaliencePolicy",
               costs: CostModel) -> "tuple[Any, int | None]":
        """Tier map uint8 ``(B, H, D)`` of a block ``keys``/``values`` ``(B, H, R, D)`` and the
        block's value width (None: the config's). ``values`` are as §6 will quantize them
        (rotated, when the config rotates values: §11.6); None with a sliding value window
        (values then leave the residual on their own schedule); ``relevance`` float32
        ``(B, H, D)``, or None for policies that use no queries."""
        raise NotImplementedError

    def flat(self) -> dict[str, Any]:
        """This part's fields in the flat config form (docs/numerics.md §9)."""
        raise NotImplementedError


def _check_high_dtype(scheme: Any) -> None:
    object.__setattr__(scheme, "high_dtype", canonical_dtype(scheme.high_dtype, allowed=HIGH_DTYPES, what="high_dtype"))


def _check_tier_bits(scheme: Any) -> None:
    check_bits(scheme.mid_bits, "mid_bits")
    check_bits(scheme.low_bits, "low_bits")
    if scheme.mid_bits < scheme.low_bits:
        raise ValueError(f"mid_bits ({scheme.mid_bits}) must be >= low_bits ({scheme.low_bits})")


def salience(backend: "Backend", keys: Any, relevance: Any, policy: "SaliencePolicy", low_bits: int) -> Any:
    """§8: the salience ``A`` float32 ``(B, H, D)`` of a block's key channels, as the cache ranks them."""
    return policy.score(relevance, backend.difficulty(keys, low_bits))


@dataclass(frozen=True)
class UniformKeys(KeyScheme):
    """KIVI: every key channel quantized at ``bits`` (per channel, groups of G tokens)."""

    bits: int = 2
    name: ClassVar[str] = "uniform"
    uses_salience: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")

    def widths(self) -> tuple[int, ...]:
        return (self.bits,)

    def assign(self, backend, keys, values, relevance, policy, costs):
        B, H, _, D = (int(s) for s in keys.shape)
        return backend.zeros((B, H, D), "uint8", like=keys) + self.bits, None

    def flat(self) -> dict[str, Any]:
        return {"tier_mode": "uniform", "low_bits": self.bits}


@dataclass(frozen=True)
class BudgetKeys(KeyScheme):
    """§8.1: per (block, head) the ``high`` most salient channels in 16 bits, the next ``mid``
    at ``mid_bits``, the rest at ``low_bits``. ``high``/``mid``: two ints (channel counts) or
    two floats in [0, 1] (fractions of head_dim, ``floor(f*D + 0.5)``)."""

    high: float = 1 / 32
    mid: float = 1 / 8
    mid_bits: int = 4
    low_bits: int = 2
    high_dtype: str = "bfloat16"
    name: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        hi, mid = _check_budget((self.high, self.mid))
        object.__setattr__(self, "high", hi)
        object.__setattr__(self, "mid", mid)
        _check_tier_bits(self)
        _check_high_dtype(self)

    @property
    def budget(self) -> tuple[float, float]:
        return (self.high, self.mid)

    def counts(self, head_dim: int) -> tuple[int, int]:
        """``(n_high, n_mid)`` for a head of ``head_dim`` channels."""
        if isinstance(self.high, int) and isinstance(self.mid, int):
            n_high, n_mid = self.high, self.mid
        else:
            n_high, n_mid = budget_count(self.high, head_dim), budget_count(self.mid, head_dim)
        if n_high + n_mid > head_dim:
            raise ValueError(f"budget {self.budget} asks for {n_high} high + {n_mid} mid channels but head_dim is {head_dim}")
        return n_high, n_mid

    def tier_counts(self, head_dim: int) -> dict[int, int]:
        """Channels of each width in one head's block (widths may coincide)."""
        n_high, n_mid = self.counts(head_dim)
        out: dict[int, int] = {}
        for bits, n in ((HIGH_BITS, n_high), (self.mid_bits, n_mid), (self.low_bits, head_dim - n_high - n_mid)):
            out[bits] = out.get(bits, 0) + n
        return out

    def widths(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((HIGH_BITS, self.mid_bits, self.low_bits)))

    def check_shape(self, head_dim, heads, costs):
        self.counts(head_dim)

    def assign(self, backend, keys, values, relevance, policy, costs):
        n_high, n_mid = self.counts(int(keys.shape[-1]))
        a = salience(backend, keys, relevance, policy, self.low_bits)
        return backend.assign_budget(a, n_high, n_mid, (HIGH_BITS, self.mid_bits, self.low_bits)), None

    def flat(self) -> dict[str, Any]:
        return {"tier_mode": "budget", "budget": [self.high, self.mid], "mid_bits": self.mid_bits,
                "low_bits": self.low_bits, "high_dtype": self.high_dtype}


@dataclass(frozen=True)
class ThresholdKeys(KeyScheme):
    """§8.2: ``A > tau_high`` -> 16 bits; ``tau_mid < A <= tau_high`` -> ``mid_bits``; else
    ``low_bits`` (taus rounded to float32). Counts follow the data."""

    tau_high: float = 1.44
    tau_mid: float = 0.79
    mid_bits: int = 4
    low_bits: int = 2
    high_dtype: str = "bfloat16"
    name: ClassVar[str] = "threshold"

    def __post_init__(self) -> None:
        hi, mid = _check_thresholds((self.tau_high, self.tau_mid))
        object.__setattr__(self, "tau_high", hi)
        object.__setattr__(self, "tau_mid", mid)
        _check_tier_bits(self)
        _check_high_dtype(self)

    @property
    def thresholds(self) -> tuple[float, float]:
        return (self.tau_high, self.tau_mid)

    def widths(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((HIGH_BITS, self.mid_bits, self.low_bits)))

    def assign(self, backend, keys, values, relevance, policy, costs):
        a = salience(backend, keys, relevance, policy, self.low_bits)
        return backend.assign_threshold(a, self.tau_high, self.tau_mid, (HIGH_BITS, self.mid_bits, self.low_bits)), None

    def flat(self) -> dict[str, Any]:
        return {"tier_mode": "threshold", "thresholds": [self.tau_high, self.tau_mid], "mid_bits": self.mid_bits,
                "low_bits": self.low_bits, "high_dtype": self.high_dtype}


@dataclass(frozen=True)
class RateDistortionKeys(KeyScheme):
    """§8.3: per block, key widths from ``ladder`` and one value width from ``value_ladder``
    minimising a modelled attention-output error under ``bits`` TRUE bits per K/V element
    (codes, scales, zeros, tier map and 16-bit channels counted). ``value_weight`` (λ) is
    the exchange rate between value and key errors (docs/design.md)."""

    bits: float = 3.5
    ladder: tuple[int, ...] = (2, 3, 4, 8, 16)
    value_ladder: tuple[int, ...] = (2, 3, 4)
    value_weight: float = 2.0
    high_dtype: str = "bfloat16"
    name: ClassVar[str] = "rd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", _positive_float(self.bits, "rd_bits", "a number of bits per element",
                                                         upper=MAX_RD_BITS))
        object.__setattr__(self, "value_weight", _positive_float(self.value_weight, "rd_value_weight", "an exchange rate",
                                                                 upper=MAX_RD_VALUE_WEIGHT))
        object.__setattr__(self, "ladder", _check_ladder(self.ladder, "bit_ladder", allow_high=True))
        object.__setattr__(self, "value_ladder", _check_ladder(self.value_ladder, "value_bit_ladder", allow_high=False))
        _check_high_dtype(self)

    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.ladder, reverse=True))

    def check_budget(self, residual_length: int, group_size: int, meta_bytes: int) -> None:
        """Raise ValueError if ``bits`` is below the cheapest block for every head size (the
        head_dim-independent part of :meth:`check_shape`; :meth:`MixKVQConfig.check_feasible`, run
        when a config file is loaded)."""
        floor = rd_min_bits(residual_length, group_size, meta_bytes, self.ladder[0], self.value_ladder[0])
        if self.bits < floor:
            raise ValueError(
                f"rd_bits={self.bits} is below the cheapest allocation of any block: with residual_length="
                f"{residual_length}, group_size={group_size}, {meta_bytes}-byte metadata and widths {self.ladder[0]} "
                f"(keys) and {self.value_ladder[0]} (values) a block costs at least {floor:.4f} true bits per element "
                f"whatever head_dim is; raise rd_bits to {math.ceil(floor * 1000) / 1000:g} or more, or lower the "
                "metadata cost (a larger group_size or residual_length, float16/bfloat16 meta_dtype)")

    def check_shape(self, head_dim, heads, costs):
        R, D = costs.residual_length, head_dim
        cheapest = heads * (costs.tier_map_bits + D * costs.key_channel_bits(self.ladder[0])) \
            + heads * costs.value_head_bits(self.value_ladder[0])
        if math.floor(self.bits * (2 * R * D * heads)) < cheapest:  # §8.3 step 3, integer budget
            raise ValueError(
                f"rd_bits={self.bits} is below the cheapest allocation of a block "
                f"({costs.min_block_bits(self.ladder[0], self.value_ladder[0]):.4f} true bits per element with widths "
                f"{self.ladder[0]} and {self.value_ladder[0]}, head_dim {D}); raise rd_bits to at least "
                f"{math.ceil(cheapest / (2 * R * D * heads) * 10000) / 10000:g}")

    def assign(self, backend, keys, values, relevance, policy, costs):
        import numpy as np

        from .sim.allocate import rd_allocate  # the one host implementation for every backend

        host = lambda x: np.asarray(backend.to_numpy(as_float32(x)))  # noqa: E731
        shape = tuple(int(s) for s in keys.shape)
        weight = np.ones(shape[:2] + shape[3:], np.float32) if relevance is None else np.asarray(backend.to_numpy(relevance))
        tier_map, value_bits = rd_allocate(
            host(keys), host(values), weight, ladder=self.ladder, value_ladder=self.value_ladder, budget_bits=self.bits,
            group_size=costs.group_size, meta_bytes=costs.meta_bytes, high_dtype=self.high_dtype,
            value_weight=self.value_weight)
        return backend.from_any(tier_map, like=keys), value_bits

    def flat(self) -> dict[str, Any]:
        return {"tier_mode": "rd", "rd_bits": self.bits, "bit_ladder": list(self.ladder),
                "value_bit_ladder": list(self.value_ladder), "rd_value_weight": self.value_weight,
                "high_dtype": self.high_dtype}


@dataclass(frozen=True)
class ValueQuant:
    """Values per token (groups of G channels, §6) at ``bits``, and their window (§9):
    ``"block"`` (values flush with their key block) or ``"sliding"`` (KIVI: the last R values
    stay in full precision, older ones are quantized as they leave)."""

    bits: int = 2
    window: str = "block"

    def __post_init__(self) -> None:
        check_bits(self.bits, "value_bits")
        if self.window not in ("block", "sliding"):
            raise ValueError(f"value_window must be 'block' or 'sliding'; got {self.window!r}")


#: ``key_rotation`` values (§11.6)
KEY_ROTATIONS = ("none", "tiers", "low")
#: the flat-form fields of :class:`TierRotation`, written only when a rotation is on
ROTATION_FIELDS = ("key_rotation", "value_rotation", "rotation_seed")


@dataclass(frozen=True)
class TierRotation:
    """The optional rotation inside the format (docs/numerics.md §11.6).

    Attributes:
        keys: ``"none"``; ``"tiers"`` — in every key block, each quantized width's channel
            set of a head (chosen by salience on the unrotated keys) is rotated per token by
            §11.1 before its rows are quantized; ``"low"`` — only the narrowest width's set.
            16-bit channels are never rotated.
        values: rotate each token's values over the head's channels before quantizing them.
        seed: the §11.2 sign seed (``0 .. 2^64 - 1``), one for every set.

    The stored bytes per element are unchanged (the signs are a function of the seed).
    """

    keys: str = "none"
    values: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.keys not in KEY_ROTATIONS:
            raise ValueError(f"key_rotation must be one of {', '.join(map(repr, KEY_ROTATIONS))}; got {self.keys!r}")
        if not _is_bool(self.values):
            raise ValueError(f"value_rotation must be true or false; got {self.values!r}")
        object.__setattr__(self, "values", bool(self.values))
        import numbers

        if _is_bool(self.seed) or not isinstance(self.seed, numbers.Integral) or not 0 <= int(self.seed) < 1 << 64:
            raise ValueError(f"rotation_seed must be an integer in 0..2^64-1; got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    @property
    def active(self) -> bool:
        """Whether anything is rotated."""
        return self.keys != "none" or self.values

    def key_widths(self, ladder: "tuple[int, ...]") -> tuple[int, ...]:
        """The widths of ``ladder`` (the config's tier widths) whose channel sets rotate."""
        quantized = tuple(w for w in ladder if w != HIGH_BITS)
        if self.keys == "none" or not quantized:
            return ()
        return quantized if self.keys == "tiers" else (min(quantized),)

    def flat(self) -> dict[str, Any]:
        """The flat fields (§9 table), empty when nothing rotates (files of unrotated configs
        are what they were before the option existed)."""
        if not self.active:
            return {}
        return {"key_rotation": self.keys, "value_rotation": self.values, "rotation_seed": self.seed}

    @classmethod
    def from_flat(cls, d: "dict[str, Any]") -> "TierRotation":
        return cls(d.get("key_rotation", "none"), d.get("value_rotation", False), d.get("rotation_seed", 0))


KEY_SCHEMES: dict[str, type[KeyScheme]] = {c.name: c for c in (UniformKeys, BudgetKeys, ThresholdKeys, RateDistortionKeys)}


def rd_min_bits(residual_length: int, group_size: int, meta_bytes: int, key_bits: int, value_bits: int) -> float:
    """A lower bound, over every head_dim, of the true bits per K/V element of a block with
    every key channel at ``key_bits`` and values at ``value_bits`` (the tier map's byte and
    the key row per channel are per R tokens; a value row costs at least ``value_bits`` plus
    one scale and zero per G channels per element; exact when G divides D and D*bits is a
    multiple of 8)."""
    costs = CostModel(residual_length, group_size, 1, meta_bytes)
    key = (8 + costs.key_channel_bits(key_bits)) / residual_length
    value = value_bits + 16 * meta_bytes / group_size
    return (key + value) / 2


# -- field checks -----------------------------------------------------------------------------------
def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ in ("bool_", "bool")


def _is_real(v: Any) -> bool:
    """A real number (Python or NumPy int/float), not a bool and not a string."""
    import numbers

    return isinstance(v, numbers.Real) and not _is_bool(v)


def _check_budget(budget: Any) -> tuple[float, float]:
    try:
        hi, mid = budget
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a pair (high, mid); got {budget!r}") from None
    for v in (hi, mid):
        if _is_bool(v):
            raise ValueError(f"budget entries must be channel counts (ints) or fractions (floats), not booleans; got {budget!r}")
        if not _is_real(v):
            raise ValueError(f"budget entries must be numbers: channel counts (ints) or fractions (floats); got {budget!r}")
    ints = [as_int(v) for v in (hi, mid)]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise ValueError(f"budget counts must be >= 0; got {budget!r}")
        if max(ints) > MAX_BUDGET_COUNT:
            raise ValueError(f"budget counts must be at most {MAX_BUDGET_COUNT} channels; got {budget!r} "
                             "(pass fractions of head_dim, e.g. (1/32, 1/8), for a size-independent budget)")
        return (ints[0], ints[1])
    if any(i not in (None, 0) for i in ints):
        raise ValueError(f"budget {budget!r} mixes a channel count with a fraction; pass two ints (counts) "
                         "or two floats (fractions of head_dim)")
    try:
        fhi, fmid = float(hi), float(mid)
    except (TypeError, ValueError):
        raise ValueError(f"budget entries must be numbers; got {budget!r}") from None
    if not (0.0 <= fhi <= 1.0 and 0.0 <= fmid <= 1.0 and fhi + fmid <= 1.0):
        raise ValueError(f"budget fractions must lie in [0, 1] and sum to at most 1; got {budget!r} "
                         "(pass two ints for channel counts)")
    return (fhi, fmid)


def _positive_float(value: Any, name: str, what: str, *, upper: float | None = None) -> float:
    try:
        if not _is_real(value):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}; got {value!r}") from None
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a positive finite number ({what}); got {value!r}")
    if upper is not None and out > upper:
        raise ValueError(f"{name} must be at most {upper:g} ({what}); got {value!r}")
    return out


def _check_ladder(ladder: Any, name: str, *, allow_high: bool) -> tuple[int, ...]:
    if isinstance(ladder, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of bit widths; got {ladder!r}")
    try:
        widths = tuple(ladder)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of bit widths; got {ladder!r}") from None
    allowed = set(CODE_BITS) | ({HIGH_BITS} if allow_high else set())
    if not widths or any(as_int(w) is None or as_int(w) not in allowed for w in widths):
        extra = " or 16 (16-bit floats)" if allow_high else ""
        raise ValueError(f"{name} entries must be integers in 1..8{extra}; got {ladder!r}")
    widths = tuple(as_int(w) for w in widths)
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name} has repeated widths: {ladder!r}")
    return tuple(sorted(widths))


def _check_thresholds(thresholds: Any) -> tuple[float, float]:
    try:
        hi, mid = thresholds
        if not all(_is_real(t) for t in (hi, mid)):
            raise TypeError
        hi, mid = float(hi), float(mid)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a pair of numbers (tau_high, tau_mid); got {thresholds!r}") from None
    if not (math.isfinite(hi) and math.isfinite(mid)) or hi < mid:
        raise ValueError(f"thresholds need finite tau_high >= tau_mid; got {thresholds!r}")
    return (hi, mid)


__all__ = ["KeyScheme", "UniformKeys", "BudgetKeys", "ThresholdKeys", "RateDistortionKeys", "ValueQuant", "TierRotation",
           "KEY_SCHEMES", "salience", "as_float32", "MAX_RD_BITS", "MAX_RD_VALUE_WEIGHT", "MAX_BUDGET_COUNT",
           "rd_min_bits"]
