"""MixKVQConfig: the format's configuration, made of a key strategy and value quantization.

A config is ``policy`` (the salience, §8) + ``keys`` (a :mod:`mixkvq.schemes` key strategy)
+ ``values`` (:class:`~mixkvq.schemes.ValueQuant`) + the shared ``group_size`` (G),
``residual_length`` (R) and ``meta_dtype``. Which backend runs it is chosen where a cache is
built (``KVCache(config, backend=...)``), not here: the config describes stored bytes only.

The flat form of docs/numerics.md §9 (``tier_mode``, ``budget``, ``rd_bits`` …) is the JSON
form (:meth:`MixKVQConfig.to_dict`, files written by ``mixkvq calibrate``, golden-vector
manifests) and is accepted as keyword arguments too, so ``MixKVQConfig(tier_mode="rd",
rd_bits=3.5)`` and ``MixKVQConfig(keys=RateDistortionKeys(bits=3.5))`` are the same config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import canonical_dtype
from .format import ITEMSIZE, META_DTYPES, CostModel
from .policy import SaliencePolicy, get_policy
from .schemes import (ROTATION_FIELDS, BudgetKeys, KeyScheme, RateDistortionKeys, ThresholdKeys, TierRotation,
                      UniformKeys, ValueQuant)
from .validation import check_positive_int

#: Flat-form fields every config has.
COMMON_FIELDS = ("policy", "tier_mode", "group_size", "residual_length", "meta_dtype", "value_bits", "value_window")
#: Flat-form fields of each key strategy (``tier_mode``).
SCHEME_FIELDS = {
    "uniform": ("low_bits",),
    "budget": ("budget", "mid_bits", "low_bits", "high_dtype"),
    "threshold": ("thresholds", "mid_bits", "low_bits", "high_dtype"),
    "rd": ("rd_bits", "bit_ladder", "value_bit_ladder", "rd_value_weight", "high_dtype"),
}
FLAT_FIELDS = tuple(dict.fromkeys(COMMON_FIELDS + sum(SCHEME_FIELDS.values(), ()) + ROTATION_FIELDS))
#: Largest residual_length / group_size: a block of more tokens would never fill in practice.
MAX_BLOCK_TOKENS = 1 << 20
_BACKEND_MOVED = ("a config describes stored bytes, not where they are computed: choose the backend where the "
                  "cache is built, e.g. KVCache(config, backend='torch') or MixKVQCache(config, backend='torch')")


@dataclass(frozen=True, init=False)
class MixKVQConfig:
    """Configuration of MixKVQ quantization and of the streaming cache.

    Defaults follow the paper: query-aware policy, G = 32, R = 128, 2-bit values, and a key
    budget of 1/32 of channels in bfloat16 and 1/8 at 4 bits (about 2.7 nominal key bits).

    Args:
        policy: a registered salience policy name (``"query_aware"``, ``"key_only"``,
            ``"query_only"``; ``"uniform"`` is KIVI and means ``keys=UniformKeys(...)``) or a
            :class:`~mixkvq.SaliencePolicy`.
        keys: the key strategy: :class:`~mixkvq.UniformKeys`, :class:`~mixkvq.BudgetKeys`
            (default), :class:`~mixkvq.ThresholdKeys` or :class:`~mixkvq.RateDistortionKeys`.
        values: :class:`~mixkvq.ValueQuant` (bits and window).
        group_size: G, elements sharing one (scale, zero).
        residual_length: R, tokens kept in full precision before a block is quantized; a
            multiple of G.
        meta_dtype: dtype of scales and zeros (``"float16"``, ``"bfloat16"``, ``"float32"``).
        rotation: :class:`~mixkvq.TierRotation` — the optional Walsh–Hadamard rotation of key
            tier channel sets and of values (docs/numerics.md §11.6); default none. Flat
            form: ``key_rotation``, ``value_rotation``, ``rotation_seed``.
        **flat: the flat form instead of ``keys``/``values`` (docs/numerics.md §9):
            ``tier_mode`` (``"uniform"``, ``"budget"``, ``"threshold"``, ``"rd"``), ``budget``,
            ``thresholds``, ``mid_bits``, ``low_bits``, ``high_dtype``, ``rd_bits``,
            ``bit_ladder``, ``value_bit_ladder``, ``rd_value_weight``, ``value_bits``,
            ``value_window``. A field the chosen strategy does not use is an error.
    """

    policy: "str | SaliencePolicy"
    keys: KeyScheme
    values: ValueQuant
    group_size: int
    residual_length: int
    meta_dtype: str
    rotation: TierRotation

    def __init__(self, policy: "str | SaliencePolicy | None" = None, keys: KeyScheme | None = None,
                 values: ValueQuant | None = None, group_size: int = 32, residual_length: int = 128,
                 meta_dtype: str = "float16", rotation: "TierRotation | None" = None, **flat: Any) -> None:
        if "backend" in flat:
            raise TypeError(f"MixKVQConfig takes no backend: {_BACKEND_MOVED}")
        rotation_flat = {k: flat.pop(k) for k in ROTATION_FIELDS if k in flat}
        if rotation_flat:
            if rotation is not None:
                raise TypeError(f"pass either rotation= or the flat fields {sorted(rotation_flat)}, not both")
            rotation = TierRotation.from_flat(rotation_flat)
        rotation = TierRotation() if rotation is None else rotation
        if not isinstance(rotation, TierRotation):
            raise TypeError(f"rotation must be a TierRotation; got {type(rotation).__name__}")
        if flat:
            if keys is not None or values is not None:
                raise TypeError(f"pass either keys=/values= or the flat fields {sorted(flat)}, not both")
            policy, keys, values = _parts_from_flat({"policy": policy, **flat}, strict=set(flat))
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        if keys is None:  # policy="uniform" alone is KIVI at the default width
            keys = UniformKeys() if policy is not None and not get_policy(policy).mixed_precision else BudgetKeys()
        if not isinstance(keys, KeyScheme):
            raise TypeError(f"keys must be a key strategy (UniformKeys, BudgetKeys, ThresholdKeys, "
                            f"RateDistortionKeys); got {type(keys).__name__}")
        values = ValueQuant() if values is None else values
        if not isinstance(values, ValueQuant):
            raise TypeError(f"values must be a ValueQuant; got {type(values).__name__}")
        if policy is None:
            policy = "uniform" if isinstance(keys, UniformKeys) else "query_aware"
        resolved = get_policy(policy)
        if isinstance(keys, UniformKeys) != (not resolved.mixed_precision):
            if isinstance(keys, UniformKeys):
                raise ValueError(f"keys=UniformKeys is KIVI (no salience); policy {resolved.name!r} ranks channels: "
                                 "use BudgetKeys, ThresholdKeys or RateDistortionKeys with it")
            raise ValueError(f"policy {resolved.name!r} gives every key channel one width: use keys=UniformKeys(bits)")
        if isinstance(keys, RateDistortionKeys) and values.window != "block":
            raise ValueError("tier_mode='rd' chooses the value width per block: it needs value_window='block'")
        set_("policy", policy)
        set_("keys", keys)
        set_("values", values)
        set_("rotation", rotation)
        set_("group_size", check_positive_int(group_size, "group_size"))
        set_("residual_length", check_positive_int(residual_length, "residual_length"))
        set_("meta_dtype", canonical_dtype(meta_dtype, allowed=META_DTYPES, what="meta_dtype"))
        for name in ("group_size", "residual_length"):
            if getattr(self, name) > MAX_BLOCK_TOKENS:
                raise ValueError(f"{name} must be at most {MAX_BLOCK_TOKENS} tokens; got {getattr(self, name)}")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"residual_length ({self.residual_length}) must be a multiple of group_size "
                f"({self.group_size}), so every key block holds whole groups; "
                f"try residual_length={self.group_size * max(1, round(self.residual_length / self.group_size))}"
            )
        self.check_feasible()

    # -- derived -----------------------------------------------------------------------
    @property
    def salience_policy(self) -> SaliencePolicy:
        """The resolved policy object."""
        return get_policy(self.policy)

    @property
    def tier_mode(self) -> str:
        """The key strategy's name: ``"uniform"``, ``"budget"``, ``"threshold"`` or ``"rd"``."""
        return self.keys.name

    @property
    def key_tier_bits(self) -> tuple[int, ...]:
        """Tier-map values a block may hold, widest first (16 = 16-bit floats)."""
        return self.keys.widths()

    @property
    def high_dtype(self) -> str:
        """Storage of 16-bit key channels."""
        return self.keys.high_dtype

    @property
    def waits_for_queries(self) -> bool:
        """Whether a block flushes only once its last token's queries were observed (§9)."""
        return self.keys.uses_salience and self.salience_policy.uses_queries

    def check_feasible(self) -> None:
        """Raise ValueError if no head size can be stored under this config: for ``tier_mode='rd'``,
        an ``rd_bits`` below the cheapest block whatever head_dim is. Construction runs it, so
        such a config never exists; the head_dim-dependent check runs at the first append,
        when the head size is known."""
        if isinstance(self.keys, RateDistortionKeys):
            self.keys.check_budget(self.residual_length, self.group_size, ITEMSIZE[self.meta_dtype])

    def costs(self, head_dim: int) -> CostModel:
        """The byte counts of this config's blocks for heads of ``head_dim`` channels."""
        return CostModel.of(self.residual_length, self.group_size, head_dim, self.meta_dtype)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The flat form (JSON-ready): common fields and the key strategy's own."""
        if not isinstance(self.policy, str):
            raise ValueError("only configs whose policy is a registered name can be serialised")
        out: dict[str, Any] = {"policy": self.policy, **self.keys.flat()}
        if not isinstance(self.keys, RateDistortionKeys):  # rd chooses the value width per block
            out["value_bits"] = self.values.bits
        out.update(value_window=self.values.window, group_size=self.group_size,
                   residual_length=self.residual_length, meta_dtype=self.meta_dtype, **self.rotation.flat())
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "MixKVQConfig":
        """Read the flat form. Files of earlier versions (every field of every mode, and a
        ``backend`` entry) load: fields the chosen strategy does not use are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"a config must be a JSON object of fields; got {type(data).__name__}")
        d = {k: v for k, v in data.items() if k != "backend"}
        unknown = sorted(set(d) - set(FLAT_FIELDS))
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(FLAT_FIELDS)}")
        rotation = TierRotation.from_flat({k: d.pop(k) for k in ROTATION_FIELDS if k in d})
        policy, keys, values = _parts_from_flat(d, strict=set())
        return cls(policy, keys, values, rotation=rotation,
                   **{k: d[k] for k in ("group_size", "residual_length", "meta_dtype") if k in d})

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
        except RecursionError:
            raise ValueError(f"config file {p} is not a config: its JSON is nested too deeply") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"config file {p} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or data.pop("mixkvq_config", None) != 1:
            raise ValueError(f"{p} is not a mixkvq config file (missing 'mixkvq_config': 1)")
        try:
            config = cls.from_dict(data)
            config.check_feasible()
            return config
        except (TypeError, ValueError) as exc:
            raise ValueError(f"config file {p}: {exc}") from None

    def replace(self, **changes: Any) -> "MixKVQConfig":
        """A copy with ``changes``: flat fields (``rd_bits=3.0``, ``tier_mode="threshold"``) or
        parts (``keys=...``, ``values=...``, ``policy=...``). A flat field the resulting
        strategy does not use is an error; switching strategy drops the old one's fields."""
        if "backend" in changes:
            raise TypeError(f"MixKVQConfig has no backend: {_BACKEND_MOVED}")
        changes = dict(changes)
        rotation = changes.pop("rotation", self.rotation)
        rotation_flat = {k: changes.pop(k) for k in ROTATION_FIELDS if k in changes}
        if rotation_flat:
            rotation = TierRotation.from_flat({"key_rotation": rotation.keys, "value_rotation": rotation.values,
                                               "rotation_seed": rotation.seed, **rotation_flat})
        shared = {"policy", "group_size", "residual_length", "meta_dtype"}
        if {"keys", "values"} & set(changes) or set(changes) <= shared and "policy" not in changes:
            parts = {"policy": self.policy, "keys": self.keys, "values": self.values, "group_size": self.group_size,
                     "residual_length": self.residual_length, "meta_dtype": self.meta_dtype, **changes}
            return type(self)(**parts, rotation=rotation)
        flat = {k: v for k, v in self.to_dict().items() if k not in ROTATION_FIELDS}
        flat = {**flat, "policy": self.policy, **changes}
        policy, keys, values = _parts_from_flat(flat, strict=set(changes))
        return type(self)(policy, keys, values, group_size=flat["group_size"], residual_length=flat["residual_length"],
                          meta_dtype=flat["meta_dtype"], rotation=rotation)


def _parts_from_flat(d: dict[str, Any], *, strict: set[str]) -> tuple[Any, KeyScheme, ValueQuant]:
    """(policy, keys, values) from flat fields. A field in ``strict`` (given by the caller)
    that the chosen strategy does not use raises; other unused fields are ignored (files of
    earlier versions hold every field, and a strategy switch leaves the old one's behind)."""
    nulls = sorted(k for k, v in d.items() if v is None and k != "policy")
    if nulls:
        raise ValueError(f"config field{'s' if len(nulls) > 1 else ''} {', '.join(nulls)} must not be null: "
                         "give a value or leave the field out for its default")
    policy = d.get("policy")
    mixed = get_policy(policy).mixed_precision if policy is not None else True
    mode = d.get("tier_mode", "budget")
    if not isinstance(mode, str):
        raise ValueError(f"tier_mode must be one of {', '.join(repr(m) for m in SCHEME_FIELDS)}; got {mode!r}")
    if not mixed:  # KIVI: one width for every key channel
        if mode != "uniform" and "tier_mode" in strict:
            raise ValueError(f"policy {get_policy(policy).name!r} is KIVI (one width for every key channel); "
                             f"it takes no tier_mode {mode!r}")
        mode = "uniform"
    elif mode == "uniform":
        if "tier_mode" in strict and policy is not None:
            raise ValueError(f"tier_mode='uniform' is KIVI; policy {get_policy(policy).name!r} ranks channels")
        if "tier_mode" in strict or policy is None:
            policy = "uniform"
        else:  # a salience policy given to a uniform config: the default strategy
            mode = "budget"
    if mode not in SCHEME_FIELDS:
        raise ValueError(f"tier_mode must be one of {', '.join(repr(m) for m in SCHEME_FIELDS)}; got {mode!r}")
    used = set(COMMON_FIELDS) | set(SCHEME_FIELDS[mode])
    if mode == "rd":
        used.discard("value_bits")
    stray = sorted(k for k in strict if k not in used and k in FLAT_FIELDS)
    if stray:
        why = "rd chooses the value width per block from value_bit_ladder" if stray == ["value_bits"] else \
            f"tier_mode={mode!r} uses {', '.join(SCHEME_FIELDS[mode])}"
        raise ValueError(f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply here: {why}")
    tiers = {k: d[k] for k in ("mid_bits", "low_bits", "high_dtype") if k in d}
    if mode == "uniform":
        keys: KeyScheme = UniformKeys(d.get("low_bits", 2))
    elif mode == "budget":
        keys = BudgetKeys(*_pair(d.get("budget", (1 / 32, 1 / 8)), "budget", "(high, mid)"), **tiers)
    elif mode == "threshold":
        keys = ThresholdKeys(*_pair(d.get("thresholds", (1.44, 0.79)), "thresholds", "(tau_high, tau_mid)"), **tiers)
    else:
        keys = RateDistortionKeys(**{new: d[old] for old, new in RD_FIELDS if old in d})
    values = ValueQuant(**{new: d[old] for old, new in (("value_bits", "bits"), ("value_window", "window"))
                           if old in d and (old != "value_bits" or mode != "rd")})
    return policy, keys, values


#: flat name -> RateDistortionKeys field
RD_FIELDS = (("rd_bits", "bits"), ("bit_ladder", "ladder"), ("value_bit_ladder", "value_ladder"),
             ("rd_value_weight", "value_weight"), ("high_dtype", "high_dtype"))


def _pair(value: Any, name: str, what: str) -> tuple[Any, Any]:
    if isinstance(value, (str, bytes, dict)):
        raise ValueError(f"{name} must be a pair {what}; got {value!r}")
    try:
        a, b = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair {what}; got {value!r}") from None
    return a, b


__all__ = ["MixKVQConfig", "FLAT_FIELDS", "SCHEME_FIELDS", "COMMON_FIELDS"]
