"""The torch attention computes scores and P.V from the codes (scale/zero algebra): it must
stay within the conformance tolerance on data that stresses the algebra's cancellation
(outlier channels, wide ranges around zero) in every tier mode, and its quantize fast path
must keep the simulator's bytes."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mixkvq import KVCache, MixKVQConfig  # noqa: E402
from mixkvq.testing import attention_tolerance  # noqa: E402
from mixkvq.backend import get_backend  # noqa: E402


@pytest.mark.parametrize("mode", ["budget", "threshold", "rd"])
@pytest.mark.parametrize("D", [64, 128])
def test_attention_from_codes_within_tolerance(mode, D):
    rng = np.random.default_rng(D + len(mode))
    B, H, n_rep, T = 1, 2, 4, 300
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k[rng.random(k.shape) < 0.05] *= 200.0  # outliers spread over tokens and channels
    k[..., ::7] += 50.0  # offset channels: zeros far from the dequantized keys
    v = (rng.standard_normal((B, H, T, D)) * 30).astype(np.float32)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float32)
    cfg = MixKVQConfig.from_dict(dict(tier_mode=mode, group_size=32, residual_length=64, thresholds=(30.0, 5.0)))
    ref, dut = KVCache(cfg, backend="numpy"), KVCache(cfg, backend="torch")
    ref.append(k, v, q)
    dut.append(torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(q))
    keys, values = ref.layout.dequantized(ref.backend, ref.state.storage)
    for Tq, causal in ((1, True), (7, True), (3, False)):
        qn = q[:, :, T - Tq:] * 3
        want = ref.attention(qn, causal=causal)
        got = dut.attention(torch.from_numpy(qn), causal=causal).numpy()
        tol = attention_tolerance(qn, keys, values, 1 / math.sqrt(D))
        assert np.abs(got - want).max() <= tol


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_quantize_tiles_match_simulator(bits, dtype, monkeypatch):
    from backends.torch import ops

    monkeypatch.setattr(ops, "TILE_ELEMENTS", 100)  # many tiles, a partial last one
    sim, tb = get_backend("numpy"), get_backend("torch")
    rng = np.random.default_rng(bits)
    for n, G in ((64, 32), (37, 8), (5, 32)):
        x = (rng.standard_normal((3, 11, n)) * 5).astype(dtype)
        x[0, 0, :] = -0.0
        xt = torch.from_numpy(x.copy())
        got = tb.quantize(xt, bits, G, "float16", "x")
        want = sim.quantize(x, bits, G, "float16", "x")
        for g, w in zip(got, want):
            assert np.array_equal(tb.to_numpy(g).view(np.uint8), np.asarray(w).view(np.uint8))
        assert torch.equal(xt, torch.from_numpy(x))  # the input is not overwritten


def test_attention_values_near_float32_limit_stay_finite():
    """Values up to 3e38 over many tokens: an unnormalised float32 p @ V overflows (it did
    before); the chunk-normalised accumulation must give the finite reference."""
    from mixkvq.testing.strategies import make_values

    cfg = MixKVQConfig(tier_mode="rd", group_size=1, residual_length=1, meta_dtype="bfloat16", rd_bits=44.0,
                       bit_ladder=(1,), value_bit_ladder=(1,))
    for seed in range(12):
        k = make_values((1, 1, 74, 1), "normal", seed).astype(np.float32)
        v = make_values((1, 1, 74, 1), "huge_range", seed + 1).astype(np.float32)
        q = make_values((1, 1, 74, 1), "normal", seed + 2).astype(np.float32)
        ref, dut = KVCache(cfg, backend="numpy"), KVCache(cfg, backend="torch")
        ref.append(k, v, q)
        dut.append(torch.from_numpy(k), torch.from_numpy(v), torch.from_numpy(q))
        keys, values = ref.layout.dequantized(ref.backend, ref.state.storage)
        want = ref.attention(q[:, :, -1:], causal=False)
        got = dut.attention(torch.from_numpy(q[:, :, -1:]), causal=False).numpy()
        assert np.isfinite(got).all()
        assert np.abs(got.astype(np.float64) - want).max() <= attention_tolerance(q[:, :, -1:], keys, values, 1.0)
