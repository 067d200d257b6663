"""The streaming cache (docs/numerics.md §7–§9) on the simulator backend."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mixkvq
from mixkvq import KVCache, MixKVQConfig, sim
from mixkvq.layout import nbytes_of


def stream(seed=0, B=2, H=2, n_rep=2, T=200, D=16, dtype=np.float16):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H, T, D)).astype(dtype)
    k[..., 3] *= 12  # an outlier channel
    v = rng.standard_normal((B, H, T, D)).astype(dtype)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(dtype)
    return k, v, q


def stored_bytes(cache: KVCache) -> list[bytes]:
    """The cache's full state as bytes: every key block array, the value rows joined along the
    tokens (sliding-window values are quantized in chunks that follow the appends), residuals
    and statistics."""
    out = [np.ascontiguousarray(a).tobytes() for blk in cache.key_blocks for a in blk.arrays()]
    rows = cache.value_rows
    if rows:
        out += [np.concatenate([getattr(r, f) for r in rows], axis=2).tobytes() for f in ("packed", "scale", "zero")]
    s = cache.state
    out += [np.ascontiguousarray(a).tobytes() for a in (*cache.residual, s.stats.qsum) if a is not None]
    return out


def small_config(**kw):
    """G=8, R=32, budget (2, 3); flat overrides, fields the chosen strategy does not use ignored."""
    base = dict(group_size=8, residual_length=32, budget=(2, 3))
    base.update(kw)
    return MixKVQConfig.from_dict(base)


# -- streaming semantics --------------------------------------------------------------------------
@given(cuts=st.lists(st.integers(1, 199), max_size=6, unique=True), policy=st.sampled_from(["query_aware", "key_only", "query_only", "uniform"]),
       mode=st.sampled_from(["budget", "threshold"]), window=st.sampled_from(["block", "sliding"]))
def test_chunked_append_equals_one_shot(cuts, policy, mode, window):
    k, v, q = stream()
    cfg = small_config(policy=policy, tier_mode=mode, thresholds=(0.6, 0.25), value_window=window)
    one = KVCache(cfg)
    one.append(k, v, queries=q)
    chunked = KVCache(cfg)
    bounds = [0, *sorted(cuts), k.shape[2]]
    for a, b in zip(bounds, bounds[1:]):
        chunked.append(k[:, :, a:b], v[:, :, a:b], queries=q[:, :, a:b])
    assert chunked.seq_len == one.seq_len == 200 and one.n_quantized == 192
    assert stored_bytes(chunked) == stored_bytes(one)


def test_queries_lagging_keys_give_the_same_blocks():
    """The transformers order: keys are appended first, their queries observed afterwards."""
    k, v, q = stream()
    cfg = small_config()
    ref = KVCache(cfg)
    ref.append(k, v, queries=q)
    lag = KVCache(cfg)
    for t in range(k.shape[2]):
        lag.append(k[:, :, t:t + 1], v[:, :, t:t + 1])
        if t % 32 != 31:  # the block waits for the queries of its last token
            lag.observe_queries(q[:, :, t:t + 1])
        else:
            assert lag.n_quantized == t + 1 - 32
            lag.observe_queries(q[:, :, t:t + 1])
            assert lag.n_quantized == t + 1
    assert stored_bytes(lag) == stored_bytes(ref)


def test_quantized_tokens_never_change():
    k, v, q = stream(T=200)
    cache = KVCache(small_config())
    seen: list[list[bytes]] = []
    for a in range(0, 200, 7):
        cache.append(k[:, :, a:a + 7], v[:, :, a:a + 7], queries=q[:, :, a:a + 7])
        blocks = [b"".join(np.ascontiguousarray(x).tobytes() for x in blk.arrays()) for blk in cache.key_blocks]
        values = [b"".join(np.ascontiguousarray(x).tobytes() for x in r.arrays()) for r in cache.value_rows]
        if seen:
            assert blocks[: len(seen[-1][0])] == seen[-1][0] and values[: len(seen[-1][1])] == seen[-1][1]
        seen.append([blocks, values])
    keys, _ = cache.dequantized()
    before = keys[:, :, :96].copy()
    cache.append(k[:, :, :64], v[:, :, :64], queries=q[:, :, :64])
    assert np.array_equal(cache.dequantized()[0][:, :, :96], before)


def test_prefill_quantizes_whole_blocks_and_keeps_the_rest():
    k, v, q = stream(T=100)
    cache = KVCache(small_config())
    cache.append(k, v, queries=q)
    assert cache.n_quantized == 96
    rk, rv = cache.residual
    assert rk.shape[2] == 4 and np.array_equal(rk, k[:, :, 96:])


def test_decode_keys_really_are_quantized():
    """Fails for a cache that never quantizes (or quantizes one-token groups losslessly)."""
    k, v, q = stream(T=160, dtype=np.float32)
    cache = KVCache(small_config())
    for t in range(160):  # decode: one token at a time
        cache.append(k[:, :, t:t + 1], v[:, :, t:t + 1], queries=q[:, :, t:t + 1])
    assert cache.n_quantized == 160
    keys, values = cache.dequantized()
    low = np.asarray(cache.key_blocks[0].tier_map) == 2
    err = np.abs(keys - k).transpose(0, 1, 3, 2)[np.broadcast_to(low[..., None], (2, 2, 16, 160))]
    assert err.mean() > 1e-3 and np.abs(values - v).mean() > 1e-3
    assert cache.residual[0].shape[2] == 0
    full_precision_bytes = k.nbytes + v.nbytes
    assert cache.nbytes < 0.4 * full_precision_bytes


def test_sliding_value_window_keeps_last_r_values_exact():
    k, v, q = stream(T=70)
    cache = KVCache(small_config(value_window="sliding"))
    cache.append(k, v, queries=q)
    _, values = cache.dequantized()
    assert np.array_equal(values[:, :, -32:], v[:, :, -32:].astype(np.float32))
    assert not np.array_equal(values[:, :, :38], v[:, :, :38].astype(np.float32))
    assert cache.residual[1].shape[2] == 32 and cache.residual[0].shape[2] == 70 - 64


def test_sliding_value_window_decode_keeps_about_one_chunk_per_block():
    """Token-by-token decoding in sliding mode merges the quantized value rows into the newest
    chunk until it holds R tokens: O(n / R) chunks (bounded work per step), same bytes as one
    append."""
    k, v, q = stream(T=200)
    cfg = small_config(value_window="sliding")
    one = KVCache(cfg)
    one.append(k, v, queries=q)
    step = KVCache(cfg)
    step.append(k[:, :, :40], v[:, :, :40], queries=q[:, :, :40])
    for t in range(40, 200):
        step.append(k[:, :, t:t + 1], v[:, :, t:t + 1], queries=q[:, :, t:t + 1])
        sizes = [r.n_tokens for r in step.value_rows]
        assert all(n >= 32 for n in sizes[:-1]) and len(sizes) <= (t + 1) // 32 + 1
    assert sum(sizes) == 200 - 32 and len(sizes) == 6
    assert stored_bytes(step) == stored_bytes(one)


def test_keys_wait_for_queries_and_warn_when_none_come():
    k, v, _ = stream(T=100)
    cache = KVCache(small_config())
    with pytest.warns(UserWarning, match="wait in the residual"):
        cache.append(k, v)
    assert cache.n_quantized == 0
    key_only = KVCache(small_config(policy="key_only"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        key_only.append(k, v)
    assert key_only.n_quantized == 96


# -- tiers ----------------------------------------------------------------------------------------
def test_budget_mode_hits_its_exact_counts_and_bytes():
    k, v, q = stream(T=96)
    cfg = small_config(budget=(2, 3))
    cache = KVCache(cfg)
    cache.append(k, v, queries=q)
    B, H, D, R, G = 2, 2, 16, 32, 8
    for block in cache.key_blocks:
        tm = np.asarray(block.tier_map)
        assert ((tm == 16).sum(-1) == 2).all() and ((tm == 4).sum(-1) == 3).all() and ((tm == 2).sum(-1) == 11).all()
    per_block = (B * H * D  # tier map
                 + B * H * 2 * R * 2  # bf16 channels
                 + B * H * 3 * (R * 4 // 8 + 2 * (R // G) * 2)  # 4-bit codes + f16 scale/zero
                 + B * H * 11 * (R * 2 // 8 + 2 * (R // G) * 2))
    values = B * H * R * (D * 2 // 8 + 2 * (D // G) * 2)
    qstats = B * H * D * 8
    assert cache.nbytes == 3 * (per_block + values) + qstats
    assert B * H * cfg.costs(D).head_block_bytes(cfg.keys.tier_counts(D), cfg.values.bits) == per_block + values
    assert cache.nominal_key_bits == (2 * 16 + 3 * 4 + 11 * 2) / 16


def test_budget_fractions_follow_the_paper_default():
    cfg = MixKVQConfig()
    assert cfg.keys.counts(64) == (2, 8) and cfg.keys.counts(128) == (4, 16)


def test_threshold_mode_follows_the_rule():
    k, v, q = stream(T=64)
    cfg = small_config(tier_mode="threshold", thresholds=(0.9, 0.3))
    cache = KVCache(cfg)
    cache.append(k, v, queries=q)
    for j, block in enumerate(cache.key_blocks):
        end = (j + 1) * 32
        u = sim.query_token_sums(q[:, :, :end], 2).sum(2)
        a = sim.relevance(u, end, 2) * sim.difficulty(k[:, :, j * 32:end], 2)
        want = np.where(a > np.float32(0.9), 16, np.where(a > np.float32(0.3), 4, 2))
        assert np.array_equal(np.asarray(block.tier_map), want)
        assert len(np.unique(want)) > 1


def test_query_awareness_changes_the_tiers():
    """A channel with tiny keys but huge queries must win over key_only's choice."""
    k, v, q = stream(T=32, dtype=np.float32)
    q[..., 9] *= 1000.0
    aware = KVCache(small_config(budget=(1, 0)))
    aware.append(k, v, queries=q)
    blind = KVCache(small_config(budget=(1, 0), policy="key_only"))
    blind.append(k, v, queries=q)
    assert (np.asarray(aware.key_blocks[0].tier_map)[..., 9] == 16).all()
    assert (np.asarray(blind.key_blocks[0].tier_map)[..., 3] == 16).all()


def test_custom_policy_registration():
    pol = mixkvq.policy.FunctionPolicy("test_square", lambda i, s: i * s * s)
    mixkvq.register_policy(pol, overwrite=True)
    k, v, q = stream(T=32)
    cache = KVCache(small_config(policy="test_square"))
    cache.append(k, v, queries=q)
    assert cache.n_quantized == 32
    with pytest.raises(ValueError, match="unknown policy 'nope'; registered policies: .*query_aware"):
        MixKVQConfig(policy="nope")


# -- attention ------------------------------------------------------------------------------------
def test_attention_matches_dense_reference_on_dequantized_history():
    k, v, q = stream(T=75)
    cache = KVCache(small_config())
    cache.append(k, v, queries=q)
    keys, values = cache.dequantized()
    out = cache.attention(q[:, :, -3:])
    kk = np.repeat(keys, 2, 1).astype(np.float64)
    vv = np.repeat(values, 2, 1).astype(np.float64)
    s = np.einsum("bhqd,bhkd->bhqk", q[:, :, -3:].astype(np.float64), kk) / 4.0
    s[..., 2, 75:] = -np.inf  # (no-op) last query sees everything
    s[..., 0, 73:] = -np.inf
    s[..., 1, 74:] = -np.inf
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert np.allclose(out, np.einsum("bhqk,bhkd->bhqd", p, vv), rtol=1e-5, atol=1e-6)
    assert out.dtype == np.float32 and out.shape == (2, 4, 3, 16)


# -- accounting -----------------------------------------------------------------------------------
def test_nbytes_is_the_sum_of_the_real_arrays():
    k, v, q = stream(T=150)
    cache = KVCache(small_config(tier_mode="threshold", thresholds=(0.8, 0.2)))
    cache.append(k, v, queries=q)
    s = cache.state.storage
    arrays = [s.residual_keys, s.residual_values, cache.state.stats.qsum]
    for blk in s.key_blocks:
        arrays += [blk.tier_map] + [a for rows in blk.tiers.values() for a in (rows.packed, rows.scale, rows.zero) if a is not None]
    for rows in s.value_rows:
        arrays += [rows.packed, rows.scale, rows.zero]
    assert cache.nbytes == sum(a.nbytes for a in arrays) == sum(cache.nbytes_breakdown().values())
    assert cache.bits_per_element == 8 * cache.nbytes / (2 * k.size)
    residual_and_stats = sum(a.nbytes for a in arrays[:3])
    assert cache.quantized_nbytes == cache.nbytes - residual_and_stats
    assert cache.n_quantized_elements == 2 * k.size // 150 * 128  # four blocks of 32 of 150 tokens


def test_sliding_values_count_their_own_quantized_elements():
    k, v, q = stream(T=50)
    cache = KVCache(small_config(value_window="sliding"))
    cache.append(k, v, queries=q)  # keys: one block of 32; values: all but the last 32
    B, H, _, D = k.shape
    assert cache.n_quantized_elements == B * H * D * (32 + 18)
    assert KVCache(small_config()).n_quantized_elements == 0 == KVCache(small_config()).quantized_nbytes


# -- bad input: clear errors, cache unchanged -----------------------------------------------------
def _bad_calls():
    k, v, q = stream(T=8)
    nan_k = k.copy()
    nan_k[1, 0, 5, 2] = np.nan
    inf_q = q.copy()
    inf_q[0, 3, 1, 0] = np.inf
    return [
        (lambda c: c.append(nan_k, v, queries=q), ValueError, r"keys contains a non-finite value \(nan\) at index \(1, 0, 5, 2\)"),
        (lambda c: c.append(k, v, queries=inf_q), ValueError, r"queries contains a non-finite value \(inf\) at index \(0, 3, 1, 0\)"),
        (lambda c: c.append(k[0], v[0]), ValueError, r"keys must have 4 dimensions"),
        (lambda c: c.append(k, v[:, :, :4]), ValueError, r"keys .* and values .* must have the same shape"),
        (lambda c: c.append(k, v, queries=q[:, :3]), ValueError, r"queries have 3 heads, not a multiple of the cache's 2 KV heads"),
        (lambda c: c.append(k.astype(np.int32), v.astype(np.int32)), TypeError, r"keys has dtype int32"),
        (lambda c: c.append(k[:, :1], v[:, :1]), ValueError, r"this cache holds"),
        (lambda c: c.append(k.astype(np.float32), v.astype(np.float32)), TypeError, r"this cache holds float16"),
        (lambda c: c.observe_queries(q[:, :, :8]), ValueError, r"queries may lag keys, never lead them"),
        (lambda c: c.attention(q[:, :3, -1:]), ValueError, r"q has shape"),
    ]


@pytest.mark.parametrize("index", range(10))
def test_bad_input_raises_and_leaves_the_cache_unchanged(index):
    k, v, q = stream(T=40)
    cache = KVCache(small_config())
    cache.append(k, v, queries=q)
    before = (stored_bytes(cache), cache.seq_len, cache.n_quantized)
    call, exc, pattern = _bad_calls()[index]
    with pytest.raises(exc, match=pattern):
        call(cache)
    assert (stored_bytes(cache), cache.seq_len, cache.n_quantized) == before


def test_metadata_overflow_mid_stream_leaves_the_cache_unchanged():
    k, v, q = stream(T=32, dtype=np.float32)
    cache = KVCache(small_config(policy="uniform", low_bits=1))
    cache.append(k[:, :, :16], v[:, :, :16])
    before = stored_bytes(cache)
    k2 = k[:, :, 16:].copy()
    k2[0, 0, 3, 0], k2[0, 0, 4, 0] = 60000.0, -60000.0
    with pytest.raises(ValueError, match="overflows float16"):
        cache.append(k2, v[:, :, 16:])
    assert stored_bytes(cache) == before and cache.seq_len == 16


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(residual_length=100, group_size=32), r"residual_length \(100\) must be a multiple of group_size \(32\)"),
        (dict(mid_bits=9), r"mid_bits must be an integer in 1..8"),
        (dict(low_bits=0), r"low_bits must be"),
        (dict(value_bits=12), r"value_bits must be"),
        (dict(tier_mode="ratio"), r"tier_mode must be one of 'uniform', 'budget', 'threshold', 'rd'"),
        (dict(budget=(0.9, 0.5)), r"budget fractions must lie in \[0, 1\] and sum to at most 1"),
        (dict(tier_mode="threshold", thresholds=(0.1, 0.5)), r"tau_high >= tau_mid"),
        (dict(thresholds=(1.0, 0.5)), r"thresholds does not apply here: tier_mode='budget' uses budget"),
        (dict(rd_bits=3.0), r"rd_bits does not apply here"),
        (dict(tier_mode="rd", value_bits=3), r"rd chooses the value width per block"),
        (dict(budget=(True, False)), r"not booleans"),
        (dict(budget=None), r"must not be null"),
        (dict(tier_mode="rd", rd_bits=1e308), r"rd_bits must be at most 128"),
        (dict(tier_mode="rd", rd_bits=True), r"rd_bits must be a number of bits"),
        (dict(policy="uniform", tier_mode="threshold"), r"is KIVI"),
        (dict(meta_dtype="int8"), r"meta_dtype must be one of"),
        (dict(high_dtype="float32"), r"high_dtype must be one of"),
        (dict(value_window="ring"), r"value_window must be"),
        (dict(mid_bits=2, low_bits=3), r"mid_bits \(2\) must be >= low_bits \(3\)"),
    ],
)
def test_config_errors_say_what_is_wrong(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MixKVQConfig(**kwargs)


def test_budget_larger_than_head_dim_is_rejected_at_append():
    k, v, q = stream(T=8, D=16)
    cache = KVCache(small_config(budget=(10, 10)))
    with pytest.raises(ValueError, match="asks for 10 high \\+ 10 mid channels but head_dim is 16"):
        cache.append(k, v, queries=q)
    assert cache.seq_len == 0


def test_config_round_trips_through_json(tmp_path):
    cfg = MixKVQConfig(tier_mode="threshold", thresholds=(1.2, 0.5), meta_dtype="bfloat16")
    cfg.save(tmp_path / "c.json")
    assert MixKVQConfig.load(tmp_path / "c.json") == cfg
    (tmp_path / "bad.json").write_text('{"policy": "query_aware"}')
    with pytest.raises(ValueError, match="not a mixkvq config file"):
        MixKVQConfig.load(tmp_path / "bad.json")


def test_backend_chosen_by_environment(monkeypatch):
    monkeypatch.setenv("MIXKVQ_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        KVCache(small_config()).append(*stream(T=4)[:2])
    monkeypatch.setenv("MIXKVQ_BACKEND", "numpy")
    cache = KVCache(small_config(policy="key_only"))
    cache.append(*stream(T=40)[:2])
    assert cache.backend.name == "numpy"


# -- structural edits on the quantized storage --------------------------------------------------
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_select_batch_equals_a_cache_fed_those_rows(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    k, v, q = stream(B=3, T=75)
    cfg = small_config(tier_mode="threshold", thresholds=(0.9, 0.3), backend=backend)
    cache = KVCache(cfg)
    cache.append(k, v, queries=q)
    cache.select_batch([2, 0, 2])
    ref = KVCache(cfg)
    idx = [2, 0, 2]
    ref.append(k[idx], v[idx], queries=q[idx])
    as_np = lambda c: [np.asarray(c.backend.to_numpy(a)).tobytes() for a in c.arrays()]  # noqa: E731
    assert as_np(cache) == as_np(ref)
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 3\)"):
        cache.select_batch([3])


def test_crop_to_a_block_boundary_equals_the_prefix_and_refuses_cuts_inside_blocks():
    k, v, q = stream(T=100)
    cache = KVCache(small_config(policy="key_only"))
    cache.append(k, v, queries=q)
    before = stored_bytes(cache)
    with pytest.raises(ValueError, match="would cut quantized block 1"):
        cache.crop(40)
    assert stored_bytes(cache) == before
    cache.crop(-4)  # inside the residual
    assert cache.seq_len == 96 and cache.n_quantized == 96
    cache.crop(64)
    ref = KVCache(small_config(policy="key_only"))
    ref.append(k[:, :, :64], v[:, :, :64], queries=q[:, :, :64])
    assert [a.tobytes() for blk in cache.key_blocks for a in blk.arrays()] == \
        [a.tobytes() for blk in ref.key_blocks for a in blk.arrays()]
    assert cache.seq_len == 64 and cache.query_position == 64


# -- regressions found in review ------------------------------------------------------------------
def test_cache_does_not_alias_the_callers_buffers():
    k, v, q = stream(T=40, dtype=np.float32)
    cache = KVCache(small_config())
    cache.append(k, v, queries=q)
    before = cache.dequantized()[0].copy()
    k[:] = 0  # a decode loop reusing its buffer
    v[:] = 0
    assert np.array_equal(cache.dequantized()[0], before)


def test_residual_does_not_keep_flushed_tokens_alive():
    k, v, q = stream(T=100)
    cache = KVCache(small_config(policy="key_only"))
    cache.append(k, v)
    rk, rv = cache.residual
    assert rk.base is None or rk.base.nbytes == rk.nbytes
    assert rv.base is None or rv.base.nbytes == rv.nbytes


def test_a_failed_append_does_not_pin_head_counts_or_backend():
    rng = np.random.default_rng(0)
    cache = KVCache(MixKVQConfig(residual_length=32, group_size=8, budget=(1, 1)))
    big = (rng.standard_normal((1, 2, 32, 8)) * 1e6).astype(np.float32)
    with pytest.raises(ValueError, match="overflows float16"):
        cache.append(big, big, queries=rng.standard_normal((1, 4, 32, 8)).astype(np.float32))
    ok = rng.standard_normal((1, 2, 32, 8)).astype(np.float32)
    cache.append(ok, ok, queries=ok)  # 2 query heads now: must be accepted
    assert cache.n_quantized == 32


def test_structural_edits_reject_non_integer_arguments():
    k, v, q = stream(B=2, T=40)
    cache = KVCache(small_config())
    cache.append(k, v, queries=q)
    with pytest.raises(TypeError, match="batch indices must be integers"):
        cache.select_batch([0.5])
    with pytest.raises(TypeError, match="batch indices must be integers"):
        cache.select_batch(np.array([True, False]))
    with pytest.raises(TypeError, match="crop needs an integer token count"):
        cache.crop(10.5)


def test_attention_on_a_cache_of_zero_tokens_says_so():
    k, v, q = stream(T=0)
    cache = KVCache(small_config())
    cache.append(k, v)
    with pytest.raises(ValueError, match="empty cache"):
        cache.attention(q)
