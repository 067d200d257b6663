"""MixKVQConfig validates every field's type, range and feasibility, with messages that say how to fix it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixkvq import KVCache, MixKVQConfig
from mixkvq.schemes import MAX_RD_BITS, rd_min_bits


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(budget=(True, False)), r"not booleans"),
    (dict(budget=(np.bool_(True), 0.1)), r"not booleans"),
    (dict(budget=(0.5, 0.6)), r"sum to at most 1"),
    (dict(budget=(-1, 2)), r">= 0"),
    (dict(budget=(10**30, 0)), r"at most 65536 channels"),
    (dict(budget=(3, 0.5)), r"mixes a channel count with a fraction"),
    (dict(budget=[0.1]), r"pair"),
    (dict(budget="ab"), r"pair"),
    (dict(budget=(float("nan"), 0.1)), r"\[0, 1\]"),
    (dict(tier_mode="rd", rd_bits=1e308), rf"rd_bits must be at most {MAX_RD_BITS:g}"),
    (dict(tier_mode="rd", rd_bits=True), r"rd_bits must be a number"),
    (dict(tier_mode="rd", rd_bits=float("nan")), r"positive finite"),
    (dict(tier_mode="rd", rd_bits="3.5"), r"rd_bits"),
    (dict(tier_mode="rd", rd_value_weight=1e308), r"rd_value_weight must be at most"),
    (dict(tier_mode="rd", rd_value_weight=0), r"positive finite"),
    (dict(tier_mode="rd", bit_ladder=[True, 2]), r"bit_ladder entries"),
    (dict(tier_mode="rd", bit_ladder=[2.0, 4]), r"bit_ladder entries"),
    (dict(tier_mode="rd", bit_ladder=[]), r"bit_ladder entries"),
    (dict(tier_mode="rd", bit_ladder=[2, 2]), r"repeated"),
    (dict(tier_mode="rd", value_bit_ladder=[16]), r"value_bit_ladder entries must be integers in 1..8"),
    (dict(tier_mode=["rd"]), r"tier_mode must be one of"),
    (dict(tier_mode=3), r"tier_mode must be one of"),
    (dict(tier_mode="threshold", thresholds=(True, 0.5)), r"pair of numbers"),
    (dict(tier_mode="threshold", thresholds=(0.1, 0.5)), r"tau_high >= tau_mid"),
    (dict(tier_mode="threshold", thresholds=(float("inf"), 0.5)), r"finite"),
    (dict(group_size=True), r"group_size must be a positive integer"),
    (dict(group_size=32.0), r"group_size must be a positive integer"),
    (dict(residual_length=[128]), r"residual_length must be a positive integer"),
    (dict(residual_length=2**70, group_size=2**70), r"at most 1048576"),
    (dict(low_bits=True), r"low_bits must be an integer in 1..8"),
    (dict(low_bits=2.0), r"low_bits must be an integer"),
    (dict(value_bits=9), r"value_bits must be an integer in 1..8"),
    (dict(mid_bits=2, low_bits=3), r"mid_bits \(2\) must be >= low_bits"),
    (dict(meta_dtype="float64"), r"meta_dtype must be one of"),
    (dict(high_dtype="float32"), r"high_dtype must be one of"),
    (dict(value_window=["block"]), r"value_window must be 'block' or 'sliding'"),
    (dict(budget=None), r"budget must not be null"),
    (dict(tier_mode="rd", rd_bits=None), r"rd_bits must not be null"),
])
def test_every_field_is_validated_at_construction(kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        MixKVQConfig(**kwargs)


def test_policy_types_are_checked():
    with pytest.raises(TypeError, match="policy must be a registered name"):
        MixKVQConfig(policy=3)
    with pytest.raises(ValueError, match="unknown policy 'nope'; registered policies"):
        MixKVQConfig(policy="nope")


def _file(tmp_path, **fields) -> str:
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"mixkvq_config": 1, **fields}))
    return str(p)


def test_config_file_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"config file .*: config field budget must not be null: give a value"):
        MixKVQConfig.load(_file(tmp_path, budget=None))
    with pytest.raises(ValueError, match=r"config fields group_size, residual_length must not be null"):
        MixKVQConfig.load(_file(tmp_path, group_size=None, residual_length=None))
    with pytest.raises(ValueError, match=r"budget entries must be channel counts"):
        MixKVQConfig.load(_file(tmp_path, budget=[True, False]))
    with pytest.raises(ValueError, match=r"unknown config keys \['bugdet'\]"):
        MixKVQConfig.load(_file(tmp_path, bugdet=[1, 2]))
    deep = tmp_path / "deep.json"
    deep.write_text('{"mixkvq_config": 1, "budget": ' + "[" * 50_000 + "]" * 50_000 + "}")
    with pytest.raises(ValueError, match="nested too deeply"):
        MixKVQConfig.load(deep)


def test_rd_floor_is_a_lower_bound_of_every_head_size():
    from mixkvq.format import CostModel

    for R, G, meta in ((128, 32, 2), (32, 8, 2), (16, 16, 4), (64, 32, 4)):
        floor = rd_min_bits(R, G, meta, 2, 2)
        for D in (1, 3, 8, 16, 31, 64, 128, 256):
            assert CostModel(R, G, D, meta).min_block_bits(2, 2) >= floor - 1e-12
        # reached when G divides D
        assert CostModel(R, G, 4 * G, meta).min_block_bits(2, 2) == pytest.approx(floor)


def test_infeasible_rd_budget_is_rejected_at_construction(tmp_path):
    path = _file(tmp_path, tier_mode="rd", rd_bits=3.0, group_size=8, residual_length=32, value_window="block")
    with pytest.raises(ValueError, match=r"rd_bits=3.0 is below the cheapest allocation of any block.*raise rd_bits to 6.125"):
        MixKVQConfig.load(path)
    with pytest.raises(ValueError, match="whatever head_dim is"):
        MixKVQConfig(tier_mode="rd", rd_bits=3.0, group_size=8, residual_length=32)
    with pytest.raises(ValueError, match="whatever head_dim is"):
        MixKVQConfig(tier_mode="rd", rd_bits=6.125, group_size=8, residual_length=32).replace(rd_bits=6.0)
    with pytest.raises(ValueError, match="whatever head_dim is"):
        MixKVQConfig.from_dict({"tier_mode": "rd", "rd_bits": 3.0, "group_size": 8, "residual_length": 32})
    MixKVQConfig(tier_mode="rd", rd_bits=6.125, group_size=8, residual_length=32).check_feasible()
    MixKVQConfig().check_feasible()  # not rd: nothing to check


def test_head_dim_dependent_infeasibility_is_reported_at_first_use():
    # feasible for large heads (floor 3.03125) but not for head_dim 16 with G = 32
    cfg = MixKVQConfig(tier_mode="rd", rd_bits=3.1, policy="key_only")
    cfg.check_feasible()
    cache = KVCache(cfg, backend="numpy")
    k = np.zeros((1, 1, 128, 16), np.float32)
    with pytest.raises(ValueError, match=r"rd_bits=3.1 is below the cheapest allocation of a block .*head_dim 16\); "
                                         r"raise rd_bits to at least 3.\d+"):
        cache.append(k, k)
    assert cache.seq_len == 0


def test_replace_revalidates():
    cfg = MixKVQConfig()
    with pytest.raises(ValueError, match="not booleans"):
        cfg.replace(budget=(True, 1))
    with pytest.raises(ValueError, match="at most"):
        cfg.replace(tier_mode="rd", rd_bits=1e9)
