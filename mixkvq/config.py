"""MixKVQConfig: every knob of the format and the cache, validated at construction."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from .dtypes import HIGH_DTYPES, META_DTYPES, canonical_dtype
from .policy import SaliencePolicy, get_policy
from .validation import as_int, check_bits, check_positive_int

HIGH_BITS = 16  #: tier-map value of a channel kept as 16-bit floats


@dataclass(frozen=True)
class MixKVQConfig:
    """Configuration of MixKVQ quantization and of the streaming cache.

    Defaults follow the paper: query-aware policy, G = 32, R = 128, 2-bit values, and a key
    budget of 1/32 of channels in bfloat16 and 1/8 at 4 bits (about 2.7 nominal key bits).

    Attributes:
        policy: a registered policy name (``"query_aware"``, ``"key_only"``,
            ``"query_only"``, ``"uniform"``) or a :class:`~mixkvq.SaliencePolicy`.
        tier_mode: ``"budget"`` (fixed counts per tier; memory exactly predictable),
            ``"threshold"`` (the paper's absolute thresholds; counts follow the data) or
            ``"rd"`` (rate-distortion allocation of a true-bit budget over key channels and
            the block's value width, docs/numerics.md §8.3).
        budget: ``(high, mid)`` channels per (block, head): two ints (counts) or two floats
            in [0, 1] (fractions of head_dim, rounded as ``floor(f*D + 0.5)``).
        thresholds: ``(tau_high, tau_mid)`` for threshold mode, ``tau_high >= tau_mid``.
        high_dtype: storage of high-tier key channels: ``"bfloat16"`` or ``"float16"``.
        mid_bits / low_bits: bit widths of the mid and low key tiers (1..8).
        value_bits: bit width of values (per-token groups), 1..8.
        group_size: G, elements sharing one (scale, zero).
        residual_length: R, tokens kept in full precision before a block is quantized;
            a multiple of G.
        value_window: ``"block"`` (values flush with keys) or ``"sliding"`` (KIVI: the
            last R values stay in full precision).
        meta_dtype: dtype of scales and zeros.
        rd_bits: ``rd`` mode budget in TRUE bits per K/V element of a quantized block (codes,
            scales, zeros, tier map and 16-bit channels all counted).
        bit_ladder: key widths the ``rd`` allocator may give a channel (16 = 16-bit floats).
        value_bit_ladder: value widths the ``rd`` allocator may choose per block.
        rd_value_weight: the ``rd`` error model's exchange rate between value and key errors
            (``E_val`` is multiplied by it, §8.3 step 2). 1 is the attention-output model as
            derived; the default 2 is the rate perplexity prefers on held-out text of the
            embedded model (docs/design.md, "The K/V exchange rate").
        backend: backend name (``"numpy"``, ``"torch"``, ``"cupy"``) or None to use
            ``$MIXKVQ_BACKEND`` or the kind of the arrays passed in.
    """

    policy: "str | SaliencePolicy" = "query_aware"
    tier_mode: Literal["budget", "threshold", "rd"] = "budget"
    budget: tuple[float, float] = (1 / 32, 1 / 8)
    thresholds: tuple[float, float] = (1.44, 0.79)
    high_dtype: str = "bfloat16"
    mid_bits: int = 4
    low_bits: int = 2
    value_bits: int = 2
    group_size: int = 32
    residual_length: int = 128
    value_window: Literal["block", "sliding"] = "block"
    meta_dtype: str = "float16"
    backend: str | None = None
    rd_bits: float = 3.5
    bit_ladder: tuple[int, ...] = (2, 3, 4, 8, 16)
    value_bit_ladder: tuple[int, ...] = (2, 3, 4)
    rd_value_weight: float = 2.0
    _policy: SaliencePolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        set_("_policy", get_policy(self.policy))
        if self.tier_mode not in ("budget", "threshold", "rd"):
            raise ValueError(f"tier_mode must be 'budget', 'threshold' or 'rd'; got {self.tier_mode!r}")
        set_("bit_ladder", _check_ladder(self.bit_ladder, "bit_ladder", allow_high=True))
        set_("value_bit_ladder", _check_ladder(self.value_bit_ladder, "value_bit_ladder", allow_high=False))
        set_("rd_bits", _positive_float(self.rd_bits, "rd_bits", "a number of bits per element"))
        set_("rd_value_weight", _positive_float(self.rd_value_weight, "rd_value_weight", "an exchange rate"))
        set_("budget", _check_budget(self.budget))
        set_("thresholds", _check_thresholds(self.thresholds))
        set_("high_dtype", canonical_dtype(self.high_dtype, allowed=HIGH_DTYPES, what="high_dtype"))
        set_("meta_dtype", canonical_dtype(self.meta_dtype, allowed=META_DTYPES, what="meta_dtype"))
        check_bits(self.mid_bits, "mid_bits")
        check_bits(self.low_bits, "low_bits")
        check_bits(self.value_bits, "value_bits")
        if self.mid_bits < self.low_bits:
            raise ValueError(f"mid_bits ({self.mid_bits}) must be >= low_bits ({self.low_bits})")
        check_positive_int(self.group_size, "group_size")
        check_positive_int(self.residual_length, "residual_length")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length ({self.residual_length}) must be a multiple of group_size "
                f"({self.group_size}), so every key block holds whole groups; "
                f"try residual_length={self.group_size * max(1, round(self.residual_length / self.group_size))}"
            )
        if self.value_window not in ("block", "sliding"):
            raise ValueError(f"value_window must be 'block' or 'sliding'; got {self.value_window!r}")
        if self.tier_mode == "rd":
            if self.value_window != "block":
                raise ValueError("tier_mode='rd' chooses the value width per block: it needs value_window='block'")
            if not self._policy.mixed_precision:
                raise ValueError(f"tier_mode='rd' allocates bits by salience; the policy {self._policy.name!r} has none")
        if self.backend is not None:
            from .backend import available_backends

            if not isinstance(self.backend, str):
                raise TypeError("backend must be a backend name such as 'numpy' or 'torch', or None")
            if self.backend not in available_backends():
                raise ValueError(f"unknown backend {self.backend!r}; available backends: {', '.join(available_backends())}")

    # -- derived -----------------------------------------------------------------------
    @property
    def salience_policy(self) -> SaliencePolicy:
        """The resolved policy object."""
        return self._policy

    @property
    def key_tier_bits(self) -> tuple[int, ...]:
        """Tier widths from high to low, as stored in tier maps (16 = 16-bit floats)."""
        if not self._policy.mixed_precision:
            return (self.low_bits,)
        if self.tier_mode == "rd":
            return tuple(sorted(self.bit_ladder, reverse=True))
        return tuple(dict.fromkeys((HIGH_BITS, self.mid_bits, self.low_bits)))

    def budget_counts(self, head_dim: int) -> tuple[int, int]:
        """``(n_high, n_mid)`` for a head of ``head_dim`` channels (budget mode)."""
        hi, mid = self.budget
        if isinstance(hi, int) and isinstance(mid, int):
            n_high, n_mid = hi, mid
        else:
            n_high, n_mid = (math.floor(f * head_dim + 0.5) for f in (hi, mid))
        if n_high + n_mid > head_dim:
            raise ValueError(
                f"budget {self.budget} asks for {n_high} high + {n_mid} mid channels but head_dim is {head_dim}"
            )
        return n_high, n_mid

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if not isinstance(self.policy, str):
            raise ValueError("only configs whose policy is a registered name can be serialised")
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        for key in ("budget", "thresholds", "bit_ladder", "value_bit_ladder"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MixKVQConfig":
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        d = dict(data)
        for key in ("budget", "thresholds", "bit_ladder", "value_bit_ladder"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def save(self, path: "str | Path") -> None:
        """Write the config as JSON (what ``mixkvq calibrate`` produces)."""
        Path(path).write_text(json.dumps({"mixkvq_config": 1, **self.to_dict()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: "str | Path") -> "MixKVQConfig":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"config file {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("mixkvq_config", None) != 1:
            raise ValueError(f"{p} is not a mixkvq config file (missing 'mixkvq_config': 1)")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "MixKVQConfig":
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d.update(changes)
        return type(self)(**d)


def _check_budget(budget: Any) -> tuple[float, float]:
    try:
        hi, mid = budget
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a pair (high, mid); got {budget!r}") from None
    ints = [as_int(v) for v in (hi, mid)]
    if all(i is not None for i in ints):
        if min(ints) < 0:
            raise ValueError(f"budget counts must be >= 0; got {budget!r}")
        return (ints[0], ints[1])
    if any(i not in (None, 0) for i in ints):
        raise ValueError(
            f"budget {budget!r} mixes a channel count with a fraction; pass two ints (counts) "
            "or two floats (fractions of head_dim)"
        )
    try:
        fhi, fmid = float(hi), float(mid)
    except (TypeError, ValueError):
        raise ValueError(f"budget entries must be numbers; got {budget!r}") from None
    if not (0.0 <= fhi <= 1.0 and 0.0 <= fmid <= 1.0 and fhi + fmid <= 1.0):
        raise ValueError(
            f"budget fractions must lie in [0, 1] and sum to at most 1; got {budget!r} "
            "(pass two ints for channel counts)"
        )
    return (fhi, fmid)


def _positive_float(value: Any, name: str, what: str) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {what}; got {value!r}") from None
    if not (math.isfinite(out) and out > 0):
        raise ValueError(f"{name} must be a positive finite number ({what}); got {value!r}")
    return out


def _check_ladder(ladder: Any, name: str, *, allow_high: bool) -> tuple[int, ...]:
    try:
        widths = tuple(ladder)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of bit widths; got {ladder!r}") from None
    allowed = set(range(1, 9)) | ({HIGH_BITS} if allow_high else set())
    if not widths or any(isinstance(w, bool) or not isinstance(w, int) or w not in allowed for w in widths):
        extra = " or 16 (16-bit floats)" if allow_high else ""
        raise ValueError(f"{name} entries must be integers in 1..8{extra}; got {ladder!r}")
    if len(set(widths)) != len(widths):
        raise ValueError(f"{name} has repeated widths: {ladder!r}")
    return tuple(sorted(widths))


def _check_thresholds(thresholds: Any) -> tuple[float, float]:
    try:
        hi, mid = (float(t) for t in thresholds)
    except (TypeError, ValueError):
        raise ValueError(f"thresholds must be a pair (tau_high, tau_mid); got {thresholds!r}") from None
    if not (math.isfinite(hi) and math.isfinite(mid)) or hi < mid:
        raise ValueError(f"thresholds need finite tau_high >= tau_mid; got {thresholds!r}")
    return (hi, mid)
