"""The native CPU backend beyond the conformance kit: golden vectors, padding masks, thread
counts, and the inputs it refuses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from mixkvq import KVCache, MixKVQConfig, get_backend  # noqa: E402
from mixkvq.testing.golden import check_vectors  # noqa: E402

VECTORS = Path(__file__).parent / "vectors" / "v1"


@pytest.fixture(scope="module")
def cpu():
    return get_backend("cpu")


def test_reproduces_every_golden_vector(cpu):
    assert check_vectors(VECTORS, backend="cpu") == []


def _stream(cfg, backend, T=300, B=2, H=3, n_rep=3, D=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, T, D, generator=g).to(dtype)
    v = torch.randn(B, H, T, D, generator=g).to(dtype)
    q = torch.randn(B, H * n_rep, T, D, generator=g).to(dtype)
    cache = KVCache(cfg, backend=backend)
    cache.append(k, v, queries=q)
    return cache, q


@pytest.mark.parametrize("policy", ["query_aware", "uniform"])
@pytest.mark.parametrize("Tq", [1, 5])
def test_padding_mask_matches_the_reference(cpu, policy, Tq):
    cfg = MixKVQConfig(policy=policy)
    cache, q = _stream(cfg, "cpu")
    ref, _ = _stream(cfg, "numpy")
    B, T = 2, cache.seq_len
    mask = torch.ones(B, Tq, T, dtype=torch.bool)
    mask[0, :, :37] = False  # row 0 left-padded by 37 tokens
    mask[1, 0, :] = False    # a query that sees nothing gets zeros
    qq = q[:, :, -Tq:]
    out = cache.attention(qq, mask=mask)
    want = ref.attention(qq.numpy(), mask=mask.numpy())
    assert np.abs(out.numpy() - want).max() < 2e-5
    assert torch.count_nonzero(out[1, :, 0]) == 0
    # the torch backend agrees too (the same masks on its chunked path)
    tcache, _ = _stream(cfg, "torch")
    assert np.abs(tcache.attention(qq, mask=mask).numpy() - want).max() < 2e-5


def test_results_do_not_depend_on_the_thread_count(cpu):
    cfg = MixKVQConfig()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, q = _stream(cfg, "cpu", T=700)
        a1 = one.attention(q[:, :, -1:])
        torch.set_num_threads(2)
        two, _ = _stream(cfg, "cpu", T=700)
        a2 = two.attention(q[:, :, -1:])
    finally:
        torch.set_num_threads(threads)
    for b1, b2 in zip(one.key_blocks, two.key_blocks):
        for w in b1.tiers:
            assert torch.equal(b1.tiers[w].packed, b2.tiers[w].packed)
    assert torch.equal(a1, a2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_residual(cpu, dtype):
    cfg = MixKVQConfig(group_size=16, residual_length=32)
    cache, q = _stream(cfg, "cpu", T=100, dtype=dtype)
    ref, _ = _stream(cfg, "numpy", T=100, dtype=dtype)
    for a, b in zip(cache.dequantized(), ref.dequantized()):
        assert np.array_equal(a.numpy(), b if not isinstance(b, torch.Tensor) else b.numpy())
    qq = q[:, :, -3:]
    want = ref.attention(qq.float().numpy())
    assert np.abs(cache.attention(qq).numpy() - want).max() < 2e-5


def test_gpu_tensors_and_bad_masks_are_refused_clearly(cpu):
    cache, q = _stream(MixKVQConfig(), "cpu", T=40)
    with pytest.raises(ValueError, match="mask has shape"):
        cache.attention(q[:, :, -1:], mask=torch.ones(2, 1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        cache.attention(q[:, :, -1:], mask=torch.ones(2, 1, 40))
    with pytest.raises(ValueError, match="scale must be a positive finite"):
        cache.attention(q[:, :, -1:], scale=float("nan"))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("window,softcap", [(50, None), (1, None), (200, 20.0), (None, 5.0)])
def test_sliding_window_and_softcap_match_the_reference(backend, window, softcap):
    cfg = MixKVQConfig(group_size=16, residual_length=32)
    cache, q = _stream(cfg, backend, T=300)
    ref, _ = _stream(cfg, "numpy", T=300)
    qq = q[:, :, -4:]
    out = cache.attention(qq, window=window, softcap=softcap)
    want = ref.attention(qq.numpy(), window=window, softcap=softcap)
    assert np.abs(out.numpy() - want).max() < 3e-5
    with pytest.raises(ValueError, match="window must be"):
        cache.attention(qq, window=0)


def test_attention_batch_equals_each_sequence_alone():
    """Several sequences of different lengths (blocks + residual, residual only, GQA) in one
    native call: each output is bit-identical to that sequence's own attention call."""
    be = get_backend("cpu")
    cfg = MixKVQConfig(group_size=8, residual_length=16, policy="key_only")
    rng = np.random.default_rng(3)
    caches, queries = [], []
    for T, Tq in ((5, 1), (16, 1), (40, 3), (87, 1), (130, 2)):
        k, v = (torch.from_numpy(rng.standard_normal((1, 2, T, 32)).astype(np.float32)) for _ in range(2))
        c = KVCache(cfg, backend="cpu")
        c.append(k, v)
        caches.append(c)
        queries.append(torch.from_numpy(rng.standard_normal((1, 4, Tq, 32)).astype(np.float32)))
    layout = caches[0].layout
    scale = 32 ** -0.5
    batched = be.attention_batch(queries, [c.state.storage for c in caches], layout, scale=scale)
    for q, c, got in zip(queries, caches, batched):
        alone = be.attention(q, c.state.storage, layout, scale=scale, causal=True)
        assert torch.equal(got, alone)
    with pytest.raises(ValueError, match="one sequence per entry"):
        be.attention_batch([torch.zeros(2, 4, 1, 32)], [caches[0].state.storage], layout, scale=scale)
