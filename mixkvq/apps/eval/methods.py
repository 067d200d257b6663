"""The KV-cache methods an evaluation compares, and how to build each one's cache."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from mixkvq.config import MixKVQConfig
from mixkvq.schemes import TierRotation, UniformKeys, ValueQuant
from ..layer_budget import LayerProfile


class MethodUnavailable(RuntimeError):
    """A method cannot run here (e.g. an optional package is missing); the message says why."""


@dataclass(frozen=True)
class Method:
    """One row of the results table.

    Attributes:
        name: short id used on the command line and in results.
        kind: ``"full"`` (transformers DynamicCache), ``"mixkvq"`` (MixKVQCache with
            ``config``), ``"quanto"`` / ``"hqq"`` (transformers QuantizedCache),
            ``"rotated"`` (:class:`~mixkvq.apps.eval.rotated.RotatedCache` with ``options``).
        config: the MixKVQ config (kind ``"mixkvq"``).
        options: QuantizedCache options (``nbits``, ``q_group_size``, ``residual_length``);
            for ``"rotated"`` the RotatedCache arguments.
        description: what the row is, for the table.
        layer_profile: for ``rd`` configs, a :class:`~mixkvq.apps.layer_budget.LayerProfile` that
            splits ``config.rd_bits`` across layers (see :attr:`layer_configs`).
    """

    name: str
    kind: str
    config: MixKVQConfig | None = None
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    layer_profile: "LayerProfile | None" = None

    @cached_property
    def layer_configs(self) -> "dict[int, MixKVQConfig] | None":
        """Per-layer configs from :attr:`layer_profile` (None without one); solved on first use,
        so building the catalogue stays cheap."""
        if self.layer_profile is None or self.config is None:
            return None
        return self.layer_profile.layer_configs(self.config, self.config.keys.bits)

    @property
    def exact_chunk_period(self) -> int | None:
        """The largest period ``P`` such that feeding tokens in chunks that end at multiples of
        ``P`` gives this method's cache exactly what it sees token by token (``None``: any
        chunk; ``1``: one token at a time).

        A MixKVQ layer answers a forward with its history *as stored before the forward* plus
        the forward's own tokens exact, and with block-window values it changes its storage
        only when a block of ``residual_length`` tokens completes, i.e. at multiples of
        ``R`` (query sums are integers, so their order does not matter either). A chunk that
        ends at the next multiple of ``R`` therefore sees what each of its tokens would have
        seen. Sliding values and foreign caches change storage every token: one at a time.
        """
        if self.kind == "full":
            return None
        if self.kind == "rotated":  # blocks of R complete at multiples of R, like block-window MixKVQ
            return int(self.options.get("residual_length", 128))
        if self.kind != "mixkvq" or self.config is None:
            return 1
        configs = [self.config, *(c for c in (self.layer_configs or {}).values() if c is not None)]
        if any(c.values.window != "block" for c in configs):
            return 1
        return math.gcd(*(c.residual_length for c in configs))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "description": self.description,
                "config": self.config.to_dict() if self.config is not None else None, "options": dict(self.options)}


def kivi(bits: int, group_size: int = 32, residual_length: int = 128) -> Method:
    """KIVI-style uniform quantization: keys per channel and values per token at ``bits``."""
    cfg = MixKVQConfig(keys=UniformKeys(bits), values=ValueQuant(bits), group_size=group_size,
                       residual_length=residual_length)
    name = f"kivi{bits}" + (f"_g{group_size}" if group_size != 32 else "")
    return Method(name, "mixkvq", cfg, description=f"KIVI-{bits} (uniform K{bits}/V{bits}, G={group_size})")


def builtin_methods(base: MixKVQConfig | None = None, threshold: MixKVQConfig | None = None,
                    layer_profile: "LayerProfile | None" = None) -> dict[str, Method]:
    """Every named method. ``base`` is the MixKVQ config (default: the paper's budget mode);
    ``threshold`` the threshold-mode config (default: ``base`` with ``tier_mode="threshold"``);
    ``layer_profile`` adds the ``rdl<bits>`` rows (one budget across layers)."""
    base = base or MixKVQConfig()
    if base.tier_mode != "budget":
        budget_cfg = base.replace(tier_mode="budget")
    else:
        budget_cfg = base
    thr = threshold or (base if base.tier_mode == "threshold" else base.replace(tier_mode="threshold"))
    R, G = base.residual_length, base.group_size
    out: dict[str, Method] = {
        "full": Method("full", "full", description="full precision (DynamicCache)"),
        "mixkvq": Method("mixkvq", "mixkvq", budget_cfg, description="MixKVQ, budget mode (query-aware)"),
        "mixkvq_thr": Method("mixkvq_thr", "mixkvq", thr, description="MixKVQ, threshold mode (query-aware)"),
        "key_only": Method("key_only", "mixkvq", budget_cfg.replace(policy="key_only"),
                           description="ablation: salience = key range only (same budget)"),
        "query_only": Method("query_only", "mixkvq", budget_cfg.replace(policy="query_only"),
                             description="ablation: salience = mean |q| only (same budget)"),
        "quanto2": Method("quanto2", "quanto", options={"nbits": 2, "q_group_size": G, "residual_length": R},
                          description="transformers QuantizedCache, quanto int2"),
        "quanto4": Method("quanto4", "quanto", options={"nbits": 4, "q_group_size": G, "residual_length": R},
                          description="transformers QuantizedCache, quanto int4"),
        # quanto's axis=-1 groups along the token axis: per-channel keys, as KIVI
        "quanto2_kc": Method("quanto2_kc", "quanto", options={"nbits": 2, "q_group_size": G, "residual_length": R,
                                                              "axis_key": -1, "axis_value": 0},
                             description="transformers QuantizedCache, quanto int2, per-channel keys"),
        "hqq2": Method("hqq2", "hqq", options={"nbits": 2, "q_group_size": G, "residual_length": R},
                       description="transformers QuantizedCache, HQQ 2-bit"),
    }
    for bits in (2, 3, 4):
        for g in (32, 64, 128):
            if R % g == 0:
                m = kivi(bits, g, R)
                out[m.name] = m
    for kb in (2, 3, 4):  # KIVI at every K/V split
        for vb in (2, 3, 4):
            if kb != vb:
                cfg = MixKVQConfig(keys=UniformKeys(kb), values=ValueQuant(vb), group_size=G, residual_length=R)
                out[f"kivi_k{kb}v{vb}"] = Method(f"kivi_k{kb}v{vb}", "mixkvq", cfg, description=f"KIVI K{kb}/V{vb}")
    out["mixkvq_v3"] = Method("mixkvq_v3", "mixkvq", budget_cfg.replace(value_bits=3),
                              description="MixKVQ default tiers, 3-bit values")
    out["mixkvq_nohigh"] = Method("mixkvq_nohigh", "mixkvq", budget_cfg.replace(budget=(0.0, 0.125)),
                                  description="MixKVQ tiers 0 bf16 / 1/8 int4 / rest int2")
    rd_base = budget_cfg.replace(tier_mode="rd", value_window="block")

    def add_layer_budget_row(name: str, cfg: MixKVQConfig, what: str) -> None:
        """``name``: ``cfg`` with its rd_bits split across layers by the profile, if one is given
        and the budget is on its grid."""
        if layer_profile is not None and cfg.keys.bits >= layer_profile.budgets[0]:
            out[name] = Method(name, "mixkvq", cfg, layer_profile=layer_profile,
                               description=f"rd allocation{what} per-layer budgets from the layer profile, "
                                           f"{cfg.keys.bits:g} true bits/element on average")

    for bits in RD_BUDGETS:
        try:
            rd_cfg = rd_base.replace(rd_bits=bits)
        except ValueError:  # below the floor of this G/R/metadata for any head size: no such row
            continue
        name = f"rd{bits:g}"
        out[name] = Method(name, "mixkvq", rd_cfg,
                           description=f"rate-distortion allocation, {bits:g} true bits/element of quantized blocks")
        add_layer_budget_row(f"rdl{bits:g}", rd_cfg, " with")
    # the allocator with groups of 128: one scale and zero per key channel per block of 128
    # tokens and per token's values (D <= 128), 0.375 bits of metadata per element at D = 64
    # where G = 32 spends 1.0 — the rotated Lloyd–Max rows' 0.25 is the comparison
    for bits in RD_BUDGETS_G128:
        try:
            cfg = rd_base.replace(rd_bits=bits, group_size=128)
        except ValueError:  # R not a multiple of 128: no such row
            continue
        out[f"rd{bits:g}_g128"] = Method(f"rd{bits:g}_g128", "mixkvq", cfg,
                                         description=f"rate-distortion allocation, G=128, {bits:g} true bits/element "
                                                     "of quantized blocks")
        # the profile's losses were measured at G=32: a proxy for G=128's (docs/rotation.md)
        add_layer_budget_row(f"rdl{bits:g}_g128", cfg, ", G=128,")
    # the allocator with 1-bit key channels on its ladder: below KIVI-2's bytes, and at them
    # with room to trade (every other rd row's cheapest point is all keys at 2 bits)
    b1 = rd_base.replace(bit_ladder=(1, 2, 3, 4, 8, 16))
    for bits in RD_BUDGETS_B1:
        name = f"rd{bits:g}_b1"
        out[name] = Method(name, "mixkvq", b1.replace(rd_bits=bits),
                           description=f"rate-distortion allocation with 1-bit key channels allowed, {bits:g} true "
                                       "bits/element of quantized blocks")
    to_rotate = {n: m for n, m in out.items() if n in ("mixkvq", "mixkvq_thr", "mixkvq_v3") or n.startswith("rd")}
    out.update(rotated_methods(budget_cfg, G, R, to_rotate))
    # 1-bit key channels stay unrotated (a rotated set's 1-bit min/max codes of Gaussian-like
    # coordinates lose more than the rotation gains), the values rotate (docs/rotation.md)
    for bits in RD_BUDGETS_B1:
        m = out[f"rd{bits:g}_b1"]
        out[f"rd{bits:g}_b1_rotv"] = replace(m, name=f"rd{bits:g}_b1_rotv",
                                             config=m.config.replace(rotation=TierRotation(values=True)),
                                             description=m.description + "; values rotated, key channels not (§11.6)")
    return out


def _split_name(key_bits: int, value_bits: int) -> str:
    return f"{key_bits}" if key_bits == value_bits else f"_k{key_bits}v{value_bits}"


def rotated_token(key_bits: int, value_bits: int, group_size: int = 32, residual_length: int = 128,
                  seed: int = 0) -> Method:
    """``rot_tok<split>``: the §11 rotation with seeded signs, then per-token keys and values
    (mixkvq/apps/eval/rotated.py; the llama.cpp / vLLM recipe), residual ``R`` exact."""
    name = "rot_tok" + _split_name(key_bits, value_bits)
    return Method(name, "rotated", options={"key_bits": key_bits, "value_bits": value_bits, "group_size": group_size,
                                            "residual_length": residual_length, "seed": seed},
                  description=f"Hadamard rotation (seed {seed}) + per-token K{key_bits}/V{value_bits}, G={group_size} "
                              "(llama.cpp / vLLM rotated-cache recipe, this project's implementation)")


def rotated_lloyd_max(key_bits: int, value_bits: int, residual_length: int = 128, seed: int = 0) -> Method:
    """``rot_lm<split>``: the §11 rotation with seeded signs, then per token the norm (float16)
    and Lloyd–Max codes of the normal distribution (mixkvq/apps/eval/rotated.py; TurboQuant-MSE
    style), residual ``R`` exact."""
    name = "rot_lm" + _split_name(key_bits, value_bits)
    return Method(name, "rotated", options={"key_bits": key_bits, "value_bits": value_bits, "codebook": "lloyd_max",
                                            "residual_length": residual_length, "seed": seed},
                  description=f"Hadamard rotation (seed {seed}) + per-token norm and Lloyd–Max codes K{key_bits}/"
                              f"V{value_bits} (TurboQuant-MSE style, this project's implementation)")


def rotated_methods(base: MixKVQConfig, group_size: int = 32, residual_length: int = 128,
                    rotated_rows: "dict[str, Method] | None" = None) -> dict[str, Method]:
    """The rotated rows: ``rot_tok<split>`` and ``rot_kivi<split>`` (rotation + KIVI: a
    uniform config with every key channel and the values rotated, §11.6) at every K/V split of
    2..4; and MixKVQ with rotation inside its tiers — ``<row>_rot`` (key tier sets and values
    rotated) for each row of ``rotated_rows``, and the ablations ``mixkvq_rotk`` (key tier
    sets only), ``mixkvq_rotlow`` (the 2-bit set only), ``mixkvq_rotv`` (values only)."""
    out: dict[str, Method] = {}
    both = TierRotation("tiers", values=True)
    for kb in (2, 3, 4):
        for vb in (2, 3, 4):
            for m in (rotated_token(kb, vb, group_size, residual_length), rotated_lloyd_max(kb, vb, residual_length)):
                out[m.name] = m
            name = "rot_kivi" + _split_name(kb, vb)
            cfg = MixKVQConfig(keys=UniformKeys(kb), values=ValueQuant(vb), group_size=group_size,
                               residual_length=residual_length, rotation=both)
            out[name] = Method(name, "mixkvq", cfg, description=f"Hadamard rotation + KIVI K{kb}/V{vb} "
                                                                "(per-channel keys, per-token values)")
    for name, m in (rotated_rows or {}).items():
        out[f"{name}_rot"] = replace(m, name=f"{name}_rot", config=m.config.replace(rotation=both),
                                     description=m.description + "; key tier sets and values rotated (§11.6)")
    for suffix, rot, what in (("rotk", TierRotation("tiers"), "key tier sets rotated"),
                              ("rotlow", TierRotation("low"), "the 2-bit key set rotated"),
                              ("rotv", TierRotation(values=True), "values rotated")):
        out[f"mixkvq_{suffix}"] = Method(f"mixkvq_{suffix}", "mixkvq", base.replace(rotation=rot),
                                         description=f"MixKVQ default tiers, {what} (§11.6)")
    return out


#: budgets (true bits per element of quantized blocks) of the rd rows
#: (3.03125, 3.53125, 4.03125, 4.53125 are the block bits of the KIVI splits, 3.15625 and
#: 3.859375 those of the MixKVQ tiers without bf16 channels and with 3-bit values, 3.5, 4.0
#: and 4.5 those of rotated per-token K3/V2, K4/V2 = K3/V3 and K4/V3: equal bytes)
RD_BUDGETS = (3.03125, 3.15625, 3.25, 3.5, 3.53125, 3.75, 3.859375, 4.0, 4.03125, 4.25, 4.5, 4.53125)

#: budgets of the ``rd<bits>_g128`` rows: the rotated Lloyd–Max rows' 3.25, 3.75, 4.25 block bits
RD_BUDGETS_G128 = (3.25, 3.75, 4.25)

#: budgets of the ``rd<bits>_b1`` rows (ladder 1, 2, 3, 4, 8, 16): rotated per-token K2/V2's
#: 3.0 block bits and KIVI-2's 3.03125, where the default ladder has no choice left
RD_BUDGETS_B1 = (3.0, 3.03125)

#: the rotated rows of the frontier between 3.0 and 4.5 block bits (docs/rotation.md)
ROTATED_FRONTIER = ("rot_tok2", "rot_tok_k3v2", "rot_tok_k2v3", "rot_tok3", "rot_tok_k4v2", "rot_tok_k4v3",
                    "rot_kivi2", "rot_kivi_k3v2", "rot_kivi3", "rot_kivi_k4v3", "rot_lm3", "rot_lm_k4v2", "rot_lm_k4v3",
                    "rot_lm4", "mixkvq_rot", "mixkvq_thr_rot", "rdl3.25_rot", "rdl4.03125_rot")

QUICK_METHODS = ("full", "kivi2", "kivi4", "quanto2_kc", "mixkvq", "mixkvq_thr", "key_only", "query_only")
FULL_METHODS = QUICK_METHODS + ("quanto2", "kivi3", "kivi2_g64", "kivi2_g128", "kivi3_g64", "kivi3_g128",
                                "kivi4_g64", "kivi4_g128")
#: the quality-per-bit frontier: KIVI at every K/V split, MixKVQ tiers, the rd allocator's budgets
FRONTIER_METHODS = ("full", "kivi2", "kivi_k2v3", "kivi_k2v4", "kivi_k3v2", "kivi3", "kivi_k3v4", "kivi_k4v2",
                    "kivi_k4v3", "kivi4", "mixkvq", "mixkvq_nohigh", "mixkvq_v3", "mixkvq_thr",
                    *ROTATED_FRONTIER,
                    *(f"rd{b:g}" for b in RD_BUDGETS), *(f"rdl{b:g}" for b in RD_BUDGETS))


def resolve_methods(names: "list[str] | tuple[str, ...]", catalog: dict[str, Method]) -> list[Method]:
    """Look up method names; unknown names raise ValueError listing the known ones."""
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(sorted(catalog))}")
    seen: dict[str, Method] = {}
    for n in names:
        seen.setdefault(n, catalog[n])
    return list(seen.values())


def build_cache(method: Method, model: Any) -> Any:
    """A fresh cache object for one run of ``method`` on ``model``."""
    if method.kind == "full":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    if method.kind == "mixkvq":
        from mixkvq.integrations.transformers import MixKVQCache

        return MixKVQCache(method.config, model_config=model.config, layer_configs=method.layer_configs)
    if method.kind in ("quanto", "hqq"):
        from transformers import QuantizedCache

        try:
            return QuantizedCache(backend=method.kind, config=model.config, **method.options)
        except ImportError as exc:
            raise MethodUnavailable(f"{method.kind} is not installed ({str(exc).splitlines()[0]})") from None
        except Exception as exc:  # noqa: BLE001 - report, never fake
            raise MethodUnavailable(f"QuantizedCache({method.kind}) failed: {type(exc).__name__}: {exc}") from None
    if method.kind == "rotated":
        from .rotated import RotatedCache

        return RotatedCache(model_config=model.config, **method.options)
    raise ValueError(f"unknown method kind {method.kind!r}")


# -- accounting of foreign caches ------------------------------------------------------------------
def _tensor_bytes(t: Any) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (quanto QTensors)."""
    import torch

    if t is None:
        return 0
    if isinstance(t, (tuple, list)):
        return sum(_tensor_bytes(x) for x in t)
    if isinstance(t, dict):
        return sum(_tensor_bytes(x) for x in t.values() if isinstance(x, torch.Tensor))
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = flatten()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    if isinstance(t, torch.Tensor):
        return int(t.numel() * t.element_size())
    return 0


def cache_stats(cache: Any) -> dict[str, float]:
    """``nbytes``, true ``bits_per_element`` and ``nominal_bits`` of any supported cache."""
    from mixkvq.integrations.transformers import MixKVQCache

    if isinstance(cache, MixKVQCache):
        return {"nbytes": cache.nbytes, "bits_per_element": cache.bits_per_element, "nominal_bits": cache.nominal_bits,
                "block_bits": cache.block_bits}
    from .rotated import RotatedCache

    if isinstance(cache, RotatedCache):
        return cache.stats()
    nbytes = elements = 0
    nominal = None
    for layer in cache.layers:
        T = layer.get_seq_length()
        shaped = [t for t in (getattr(layer, "keys", None), getattr(layer, "_quantized_keys", None))
                  if t is not None and len(t.shape) == 4]
        if not shaped or T == 0:
            continue
        B, H, _, D = (int(s) for s in shaped[0].shape)
        elements += 2 * B * H * T * D
        nbytes += _tensor_bytes(layer.keys) + _tensor_bytes(layer.values)
        if getattr(layer, "_quantized_keys", None) is not None:
            nbytes += _tensor_bytes(layer._quantized_keys) + _tensor_bytes(layer._quantized_values)
            nominal = float(getattr(layer, "nbits", 0)) or None
    if nominal is None and elements:
        nominal = float(8 * next(l.keys.element_size() for l in cache.layers if getattr(l, "keys", None) is not None and l.keys.dim() == 4))
    q_bytes = q_elements = 0
    for layer in cache.layers:
        qk = getattr(layer, "_quantized_keys", None)
        if qk is not None and getattr(layer, "keys", None) is not None and layer.keys.dim() == 4:
            B, H, r, D = (int(x) for x in layer.keys.shape)
            q_bytes += _tensor_bytes(qk) + _tensor_bytes(layer._quantized_values)
            q_elements += 2 * B * H * max(layer.get_seq_length() - r, 0) * D
    return {"nbytes": nbytes, "bits_per_element": 8.0 * nbytes / elements if elements else 0.0,
            "nominal_bits": nominal or 0.0, "block_bits": 8.0 * q_bytes / q_elements if q_elements else float("nan")}
