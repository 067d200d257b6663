"""One budget across layers: the exact allocation over a LayerProfile, full-precision layers in
MixKVQCache, and the profile measured on the embedded model."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixkvq import MixKVQConfig
from mixkvq.apps.layer_budget import QUANTUM, LayerProfile


@st.composite
def profiles(draw):
    n_layers = draw(st.integers(1, 4))
    budgets = sorted(draw(st.sets(st.sampled_from([3.03125, 3.25, 3.5, 3.53125, 4.0, 4.5, 6.0]), min_size=1, max_size=4)))
    loss = [[draw(st.floats(0, 10, allow_nan=False)) for _ in budgets] for _ in range(n_layers)]
    target = draw(st.floats(budgets[0], budgets[-1] + 0.5))
    return LayerProfile(tuple(budgets), tuple(tuple(r) for r in loss)), target


@given(profiles())
def test_allocation_is_the_exact_optimum_under_the_mean_budget(case):
    profile, target = case
    picks = profile.allocate(target)
    assert len(picks) == profile.n_layers and all(b in profile.budgets for b in picks)
    cost = lambda bs: sum(math.ceil(b * QUANTUM - 1e-9) for b in bs)  # noqa: E731
    assert cost(picks) <= math.floor(target * profile.n_layers * QUANTUM + 1e-9)
    loss = lambda bs: sum(profile.loss[i][profile.budgets.index(b)] for i, b in enumerate(bs))  # noqa: E731
    feasible = [c for c in itertools.product(profile.budgets, repeat=profile.n_layers)
                if cost(c) <= math.floor(target * profile.n_layers * QUANTUM + 1e-9)]
    assert loss(picks) <= min(loss(c) for c in feasible) + 1e-9
    assert np.mean(picks) <= target + 1e-12


def test_bits_go_to_the_sensitive_layer():
    # layer 1 loses 10x more per unit of error: it gets the larger budget at a 3.5 mean
    profile = LayerProfile((3.0, 4.0), ((1.0, 0.5), (10.0, 5.0)))
    assert profile.allocate(3.5) == [3.0, 4.0]
    assert profile.allocate(3.0) == [3.0, 3.0]
    assert profile.allocate(4.0) == [4.0, 4.0]


@pytest.mark.parametrize("budgets, loss, pattern", [
    ((4.0, 3.0), ((1, 1),), "ascending"),
    ((3.0,), ((1, 2),), "one row of 1 values"),
    ((3.0, 4.0), ((1, -1),), "non-negative"),
    ((3.0, 4.0), ((1, float("nan")),), "finite"),
    ((), (), "non-empty"),
])
def test_bad_profiles_are_rejected(budgets, loss, pattern):
    with pytest.raises(ValueError, match=pattern):
        LayerProfile(budgets, loss)


def test_target_below_the_grid_and_non_rd_configs_are_rejected():
    profile = LayerProfile((3.25, 4.0), ((1, 0.5),))
    with pytest.raises(ValueError, match="below the profile's lowest budget 3.25"):
        profile.allocate(3.1)
    with pytest.raises(ValueError, match="tier_mode='rd'"):
        profile.layer_configs(MixKVQConfig(), 3.5)
    cfgs = profile.layer_configs(MixKVQConfig(tier_mode="rd"), 4.0)
    assert cfgs[0].keys.bits == 4.0 and cfgs[0].tier_mode == "rd"


def test_profile_round_trips_and_foreign_files_are_refused(tmp_path):
    profile = LayerProfile((3.0, 4.0), ((1.0, 0.5), (2.0, 0.25)), {"model": "x"})
    path = tmp_path / "p.json"
    profile.save(path)
    assert LayerProfile.load(path) == profile
    path.write_text(json.dumps({"budgets": [3.0]}))
    with pytest.raises(ValueError, match="not a mixkvq layer profile"):
        LayerProfile.load(path)
    with pytest.raises(FileNotFoundError):
        LayerProfile.load(tmp_path / "missing.json")


# -- on the embedded model --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf():
    from conftest_hf import get_model

    return get_model()


def test_full_precision_layers_are_exact_and_counted_at_their_bytes(hf):
    import torch
    from transformers import DynamicCache

    from mixkvq.apps.eval.harness import stream
    from mixkvq.apps.eval.methods import cache_stats
    from mixkvq.integrations.transformers import MixKVQCache

    model, tok, _ = hf
    ids = tok("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt")["input_ids"][:, :200]
    n = model.config.num_hidden_layers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, _, _ = stream(model, DynamicCache(config=model.config), ids, 160)
        all_full = MixKVQCache(MixKVQConfig(), model_config=model.config, layer_configs={i: None for i in range(n)})
        got, _, _ = stream(model, all_full, ids, 160)
        assert torch.equal(ref, got)
        assert all_full.kv_caches == [] and cache_stats(all_full)["bits_per_element"] == 32.0
        one = MixKVQCache(MixKVQConfig(), model_config=model.config, layer_configs={i: None for i in range(1, n)})
        got1, _, _ = stream(model, one, ids, 160)
    assert not torch.equal(ref, got1)  # layer 0 is quantized (160 tokens > R = 128)
    assert len(one.kv_caches) == 1 and one.kv_caches[0].n_quantized == 128
    stats = cache_stats(one)
    quantized_bits = 8 * one.kv_caches[0].nbytes
    full_bits = 32 * (n - 1) * 2 * 3 * 64 * 199
    assert stats["nbytes"] * 8 == quantized_bits + full_bits


def test_profile_on_the_embedded_model(hf):
    from mixkvq.apps.eval.harness import capture_qkv
    from mixkvq.apps.eval.layer_profile import profile_layers

    model, tok, _ = hf
    text = "The history of the city begins with a small settlement on the river. " * 30
    ids = tok(text, return_tensors="pt")["input_ids"]
    sample = ids[:, :134]
    captured = capture_qkv(model, ids[:, :128])
    grid = (3.03125, 4.03125, 6.03125)
    quiet = dict(probe=16, progress=False, log=lambda s: None)
    scaled = profile_layers(model, [sample], captured, MixKVQConfig(tier_mode="rd"), 128, grid=grid,
                            measure="scaled", **quiet)
    assert scaled.budgets == grid and scaled.n_layers == model.config.num_hidden_layers
    kl = scaled.info["kl_at_probe"]
    assert all(k >= 0 for k in kl) and max(kl) > 0
    for row, k in zip(scaled.loss, kl):
        assert row[0] == pytest.approx(k)       # the probe budget's loss is the measured KL
        assert row[-1] <= row[0] + 1e-12        # 6 bits never predicted worse than 3
    picks = scaled.allocate(4.03125)
    assert np.mean(picks) <= 4.03125 and len(set(picks)) >= 1

    measured = profile_layers(model, [sample], captured, MixKVQConfig(tier_mode="rd"), 128, grid=grid[::2], **quiet)
    raw = np.array(measured.info["kl"])
    assert measured.info["measure"] == "kl" and raw.shape == (model.config.num_hidden_layers, 2)
    assert np.allclose(raw[:, 0], kl)           # the same runs as the scaled profile's probe
    assert np.array_equal(np.array(measured.loss), np.minimum.accumulate(raw, axis=1))
    assert (raw[:, 1] < raw[:, 0]).mean() > 0.8  # 6 bits hurt less than 3 in nearly every layer
    # the profile reuses the exact prefill's Q/K/V; streaming the whole sample gives the same KL
    import torch
    from transformers import DynamicCache

    from mixkvq.apps.eval.harness import stream
    from mixkvq.integrations.transformers import MixKVQCache

    n = model.config.num_hidden_layers
    layer = int(np.argmax(raw[:, 0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref, _, _ = stream(model, DynamicCache(config=model.config), sample, 128)
        cache = MixKVQCache(MixKVQConfig(tier_mode="rd", rd_bits=grid[0]), model_config=model.config,
                            layer_configs={j: None for j in range(n) if j != layer})
        logp, _, _ = stream(model, cache, sample, 128)
    direct = float((ref.exp() * (ref - logp)).sum()) / ref.shape[0]
    assert direct > 0 and raw[layer, 0] == pytest.approx(direct, rel=1e-3, abs=1e-7)
    with pytest.raises(ValueError, match="tier_mode='rd'"):
        profile_layers(model, [sample], captured, MixKVQConfig(), 128, grid=grid, progress=False)
    with pytest.raises(ValueError, match="measure must be"):
        profile_layers(model, [sample], captured, MixKVQConfig(tier_mode="rd"), 128, grid=grid, measure="guess")
