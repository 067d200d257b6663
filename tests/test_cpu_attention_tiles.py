"""The native fused attention at the geometries models use, against the float64 reference.

The conformance kit draws small caches (R, G <= 32, D <= 40), where the kernel's tiled paths
(16-token key tiles in groups of 2-8, 64-channel value blocks, 2/4-bit code loaders) are rarely
taken. This draws real head sizes and block lengths, every key width 1-8 and 16 (rd ladders),
value widths, every residual dtype, grouped queries, several query tokens, masks, windows and
soft-capping, and checks the result within docs/conformance.md's tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from mixkvq import KVCache, MixKVQConfig  # noqa: E402
from mixkvq.backend import get_backend, reference_attention  # noqa: E402
from mixkvq.layout import PackedLayout  # noqa: E402
from mixkvq.testing import attention_tolerance  # noqa: E402
from mixkvq.format import CostModel  # noqa: E402
from mixkvq.testing.strategies import _rd_min_bits  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@st.composite
def geometries(draw):
    D = draw(st.sampled_from([16, 24, 48, 64, 80, 96, 128]))
    G = draw(st.sampled_from([4, 8, 16, 32, 48, 64]))
    R = G * draw(st.integers(1, max(1, 256 // G)))
    n_blocks = draw(st.integers(0, 3))
    T = n_blocks * R + draw(st.integers(1, R))
    n_rep = draw(st.sampled_from([1, 2, 3, 4, 5, 8]))
    Tq = draw(st.integers(1, min(T, 3)))
    return D, G, R, T, n_rep, Tq


@st.composite
def configs(draw, D, G, R):
    mode = draw(st.sampled_from(["budget", "rd", "uniform"]))
    base = dict(group_size=G, residual_length=R, high_dtype=draw(st.sampled_from(["bfloat16", "float16"])),
                meta_dtype=draw(st.sampled_from(["float16", "bfloat16", "float32"])))
    if mode == "uniform":
        b = draw(st.sampled_from([1, 2, 3, 4, 8]))
        return MixKVQConfig.from_dict(dict(base, policy="uniform", tier_mode="budget", low_bits=b, mid_bits=b,
                                           budget=[0, 0], value_bits=draw(st.sampled_from([1, 2, 3, 4, 8]))))
    if mode == "budget":
        low = draw(st.sampled_from([1, 2, 3, 4]))
        return MixKVQConfig.from_dict(dict(base, tier_mode="budget", low_bits=low, mid_bits=draw(st.sampled_from([low, 4, 8])),
                                           budget=[draw(st.sampled_from([0.0, 1 / 32, 0.125])), 0.125],
                                           value_bits=draw(st.sampled_from([2, 3, 4]))))
    ladder = sorted(draw(st.sets(st.sampled_from([1, 2, 3, 4, 8, 16]), min_size=2, max_size=4)))
    return MixKVQConfig.from_dict(dict(base, tier_mode="rd", value_window="block", bit_ladder=ladder,
                                       value_bit_ladder=[2, 3, 4],
                                       rd_bits=_rd_min_bits(CostModel.of(R, G, D, base["meta_dtype"]), ladder[0], 2)
                                       + draw(st.sampled_from([0.0, 0.5, 2.0, 8.0]))))


@settings(deadline=None)
@given(data=st.data())
def test_fused_attention_within_tolerance_at_model_geometries(data):
    D, G, R, T, n_rep, Tq = data.draw(geometries(), label="D, G, R, T, n_rep, Tq")
    cfg = data.draw(configs(D, G, R), label="config")
    dtype = data.draw(st.sampled_from(list(DTYPES)), label="dtype")
    B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    k = torch.randn(B, H, T, D, generator=gen)
    k[..., :: max(1, D // 8)] *= 8  # outlier channels
    v = torch.randn(B, H, T, D, generator=gen)
    q_all = torch.randn(B, H * n_rep, T, D, generator=gen)
    cache = KVCache(cfg, backend="cpu")
    cache.append(k.to(DTYPES[dtype]), v.to(DTYPES[dtype]), queries=q_all.to(DTYPES[dtype]))
    q = torch.randn(B, H * n_rep, Tq, D, generator=gen)
    kw = {"scale": 1.0 / math.sqrt(D), "causal": data.draw(st.booleans(), label="causal")}
    if data.draw(st.booleans(), label="window"):
        kw["window"] = data.draw(st.integers(1, T), label="window size")
    if data.draw(st.booleans(), label="softcap"):
        kw["softcap"] = data.draw(st.sampled_from([5.0, 30.0]), label="softcap value")
    mask = None
    if data.draw(st.booleans(), label="mask"):
        mask = torch.rand(B, Tq, T, generator=gen) > 0.3
    got = cache.attention(q, mask=mask, **kw)
    be = get_backend("cpu")
    layout = PackedLayout(cfg, D)
    want = reference_attention(be, q, cache.state.storage, layout, mask=mask, **kw)
    keys, values = (np.asarray(x.float().numpy(), dtype=np.float32) for x in layout.dequantized(be, cache.state.storage))
    tol = attention_tolerance(q.numpy(), keys, values, kw["scale"])
    err = float((got.float() - want.float()).abs().max())
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e}"


@pytest.mark.parametrize("R, T", [(32, 110), (128, 300)])
def test_a_query_gets_the_same_bits_alone_or_in_a_chunk(R, T):
    """Query i of a causal chunk of Tq sees the cache as it was after its own token: the
    same bits as a call with that query alone on a cache that holds only the tokens up to it
    (the eval's chunked scoring and a chunked prefill rely on it)."""
    gen = torch.Generator().manual_seed(R)
    cfg = MixKVQConfig(group_size=16, residual_length=R)
    B, H, n_rep, D, Tq = 1, 3, 3, 64, 24
    k, v = torch.randn(B, H, T, D, generator=gen), torch.randn(B, H, T, D, generator=gen)
    q = torch.randn(B, H * n_rep, T, D, generator=gen)
    start = (T - Tq) // R * R  # blocks flushed before the chunk; the chunk stays in the residual
    end = start + Tq
    chunk = KVCache(cfg, backend="cpu")
    chunk.append(k[:, :, :end], v[:, :, :end], queries=q[:, :, :end])
    got = chunk.attention(q[:, :, end - Tq:end])
    for i in range(Tq):
        pos = end - Tq + i
        alone = KVCache(cfg, backend="cpu")
        alone.append(k[:, :, :pos + 1], v[:, :, :pos + 1], queries=q[:, :, :pos + 1])
        assert torch.equal(got[:, :, i:i + 1], alone.attention(q[:, :, pos:pos + 1])), f"query {i}"
