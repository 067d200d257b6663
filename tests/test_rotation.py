"""docs/numerics.md §11: the Walsh–Hadamard rotation — the simulator's literal form against
exact arithmetic, and every available backend against the simulator bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mixkvq
from mixkvq.backend import available_backends
from mixkvq.rotation import Rotation, hadamard
from mixkvq.sim import rotation as sim

VECTORS = Path(__file__).parent / "vectors" / "v1"


def _backend(name):
    try:
        return mixkvq.get_backend(name)
    except (RuntimeError, OSError) as exc:  # e.g. no GPU for cupy, no compiler for cpu
        pytest.skip(f"backend {name!r} is not usable here: {str(exc).splitlines()[0]}")


BACKENDS = available_backends()


def _usable(name):
    try:
        mixkvq.get_backend(name)
        return True
    except (RuntimeError, OSError):
        return False


def _native(be, x):
    """``x`` (NumPy) as ``be``'s own array."""
    return be.from_any(x)


def _host(be, y):
    return np.asarray(be.to_numpy(y))


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _hadamard_matrix(P):
    i = np.arange(P)
    return np.where(np.vectorize(lambda v: bin(v).count("1") % 2)(i[:, None] & i[None, :]) == 1, -1.0, 1.0)


# -- the reference itself -------------------------------------------------------------------------
def test_splitmix64_is_the_published_generator():
    """The first outputs of SplitMix64 for seed 1234567 (the generator's common test vector)."""
    assert sim.splitmix64(1234567, 5) == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                         4593380528125082431, 16408922859458223821]


def test_sign_vector_top_bits_and_prefix():
    s = sim.sign_vector(300, 42)
    assert s.dtype == np.float32 and set(np.unique(s)) == {-1.0, 1.0}
    want = [-1.0 if z >> 63 else 1.0 for z in sim.splitmix64(42, 300)]
    assert s.tolist() == want
    assert np.array_equal(sim.sign_vector(17, 42), s[:17])
    assert sim.sign_vector(4, 2**64 - 1).shape == (4,)
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            sim.sign_vector(4, bad)


@pytest.mark.parametrize("k", range(0, 12))
def test_norm_constant_is_the_rounded_inverse_square_root(k):
    c = sim.norm_constant(2**k)
    assert c.dtype == np.float32
    assert c == np.float32(1.0 / math.sqrt(2.0**k))
    if k % 2 == 0:
        assert float(c) == 2.0 ** (-k / 2)  # exact for even log2
    else:
        assert _bits(c) == _bits(np.float32(0.70710677) * np.float32(2.0 ** (-(k - 1) // 2)))


def test_block_rule():
    """Default: the binary expansion of n, largest first; an explicit size: equal blocks."""
    assert [sim.block_sizes(n) for n in (1, 2, 3, 7, 12, 54, 64, 80, 96, 100, 112, 128, 136)] == \
        [(1,), (2,), (2, 1), (4, 2, 1), (8, 4), (32, 16, 4, 2), (64,), (64, 16), (64, 32), (64, 32, 4),
         (64, 32, 16), (128,), (128, 8)]
    assert sim.block_sizes(96, 32) == (32, 32, 32) and sim.block_sizes(12, 4) == (4, 4, 4)
    for n, bad in ((12, 8), (12, 3), (12, 0), (12, True)):
        with pytest.raises(ValueError, match="power of two"):
            sim.block_sizes(n, bad)
    with pytest.raises(ValueError, match="at least one channel"):
        sim.block_sizes(0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 12, 54, 96])
def test_simulator_is_the_scaled_hadamard_matrix(n):
    """Against the explicit matrix in float64: a few float32 roundings per output."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((5, n)).astype(np.float32)
    sizes = sim.block_sizes(n)
    H = np.zeros((n, n))  # block-diagonal: one scaled Hadamard matrix per block
    start = 0
    for P in sizes:
        H[start:start + P, start:start + P] = _hadamard_matrix(P) / math.sqrt(P)
        start += P
    tol = 1e-5 * np.abs(x).max() * max(1, math.log2(max(sizes)))
    assert np.allclose(sim.hadamard(x), x.astype(np.float64) @ H, rtol=0, atol=tol)
    s = sim.sign_vector(n, 9)
    assert np.allclose(sim.hadamard(x, signs=s), (x * s).astype(np.float64) @ H, rtol=0, atol=tol)


def test_butterfly_order_and_single_final_multiply():
    """n = 4, spelled out: stage h=1 pairs (0,1),(2,3), stage h=2 pairs (0,2),(1,3), then * 0.5."""
    f = np.float32
    x = np.array([[1.0, 2.0**-24, 3.0, -(2.0**-24)]], np.float32)
    a = [f(x[0, 0] + x[0, 1]), f(x[0, 0] - x[0, 1]), f(x[0, 2] + x[0, 3]), f(x[0, 2] - x[0, 3])]
    b = [f(a[0] + a[2]), f(a[1] + a[3]), f(a[0] - a[2]), f(a[1] - a[3])]
    want = np.array([[f(v * f(0.5)) for v in b]], np.float32)
    assert _bits(sim.hadamard(x)).tolist() == _bits(want).tolist()


def test_round_trip_is_close_but_not_the_identity():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    s = sim.sign_vector(32, 1)
    back = sim.hadamard(sim.hadamard(x, signs=s), signs=s, inverse=True)
    assert np.allclose(back, x, rtol=0, atol=1e-5)
    assert not np.array_equal(back, x)  # stated in §11: not bit-exact


def test_signed_zeros_follow_ieee():
    z = np.full((1, 2), -0.0, np.float32)
    y = sim.hadamard(z)
    assert _bits(y).tolist() == [[0x80000000, 0x00000000]]  # -0 + -0 = -0, -0 - -0 = +0


def test_axis_argument():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 8, 5)).astype(np.float32)
    y = sim.hadamard(x, axis=1)
    assert np.array_equal(y, np.moveaxis(sim.hadamard(np.moveaxis(x, 1, -1)), -1, 1))
    assert np.array_equal(hadamard(x, axis=1, backend="numpy"), y)


# -- every backend against the simulator ------------------------------------------------------------
_SIZES = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 256, 3, 12, 80, 96, 100, 112, 136, 192, 255]),
                   st.integers(1, 256))
_VALUES = st.one_of(
    st.floats(-1e4, 1e4, width=32, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1e-40, 65504.0, -65504.0, 2.0**24, 1e30, -1e30]),
)


@st.composite
def rotation_inputs(draw):
    n = draw(_SIZES)
    rows = draw(st.integers(1, 3))
    x = np.array(draw(st.lists(_VALUES, min_size=rows * n, max_size=rows * n)), dtype=np.float32).reshape(rows, n)
    dtype = draw(st.sampled_from(["float32", "float32", "float16", "float64"]))
    if dtype == "float16":
        x = np.clip(x, -65504, 65504).astype(np.float16)
    elif dtype == "float64":
        x = x.astype(np.float64) * (1 + 1e-12)
    P0 = n & -n  # explicit block sizes: the powers of two dividing n
    block = draw(st.sampled_from([None] + [1 << j for j in range(P0.bit_length()) if (1 << j) <= P0]))
    seed = draw(st.one_of(st.none(), st.integers(0, 2**64 - 1)))
    inverse = draw(st.booleans())
    return x, block, seed, inverse


@pytest.mark.parametrize("name", BACKENDS)
@given(case=rotation_inputs())
def test_backend_matches_the_simulator_bit_for_bit(name, case):
    be = _backend(name)
    x, block, seed, inverse = case
    signs = None if seed is None else sim.sign_vector(x.shape[-1], seed)
    try:
        want = sim.hadamard(x, signs=signs, block_size=block, inverse=inverse)
    except ValueError as exc:  # an overflow: every backend must reject it the same way
        with pytest.raises(ValueError, match="overflows float32"):
            hadamard(_native(be, x), seed=seed, block_size=block, inverse=inverse, backend=be)
        assert "overflows float32" in str(exc)
        return
    got = _host(be, hadamard(_native(be, x), seed=seed, block_size=block, inverse=inverse, backend=be))
    assert got.dtype == np.float32 and got.shape == x.shape
    assert _bits(got).tobytes() == _bits(want).tobytes()


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_rejects_non_finite_naming_the_tensor(name):
    be = _backend(name)
    x = np.zeros((2, 3, 8), np.float32)
    x[1, 2, 5] = np.nan
    x[1, 2, 6] = np.inf
    with pytest.raises(ValueError, match=r"keys contains a non-finite value \(nan\) at index \(1, 2, 5\)"):
        hadamard(_native(be, x), backend=be, name="keys")
    with pytest.raises(ValueError, match=r"keys contains a non-finite value \(nan\) at index \(1, 2, 5\)"):
        sim.hadamard(x, name="keys")
    y = np.zeros((1, 4), np.float32)
    y[0, :2] = -3.0e38
    with pytest.raises(ValueError, match=r"rotating values overflows float32 .*index \(0, 0\)"):
        hadamard(_native(be, y), backend=be, name="values")
    with pytest.raises(ValueError, match=r"rotating values overflows float32 .*index \(0, 0\)"):
        sim.hadamard(y, name="values")


@pytest.mark.parametrize("name", BACKENDS)
def test_backend_bfloat16_and_axis(name):
    """bfloat16 tensors (torch) upcast exactly; a rotated middle axis; the Rotation helper."""
    be = _backend(name)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 24, 3)).astype(np.float32)
    want = sim.hadamard(x, axis=1, signs=sim.sign_vector(24, 5))
    got = _host(be, hadamard(_native(be, x), axis=1, seed=5, backend=be))
    assert _bits(got).tobytes() == _bits(want).tobytes()
    rot = Rotation(24, seed=5, block_size=8)
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    assert _bits(_host(be, rot.apply(_native(be, xl), backend=be))).tobytes() == \
        _bits(sim.hadamard(xl, signs=rot.signs, block_size=8)).tobytes()
    if name in ("torch", "cpu"):
        import torch

        xb = torch.from_numpy(x).to(torch.bfloat16)
        want = sim.hadamard(xb.float().numpy(), axis=1)
        got = hadamard(xb, axis=1, backend=be)
        assert got.dtype == torch.float32
        assert _bits(got.numpy()).tobytes() == _bits(want).tobytes()


def test_argument_errors():
    x = np.zeros((2, 12), np.float32)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        hadamard(x, block_size=8)
    with pytest.raises(ValueError, match="signs or seed"):
        hadamard(x, signs=np.ones(12), seed=1)
    with pytest.raises(ValueError, match="signs must be 12 values"):
        hadamard(x, signs=np.ones(11))
    with pytest.raises(ValueError, match="signs must be 12 values"):
        hadamard(x, signs=np.full(12, 2.0))
    with pytest.raises(TypeError, match="dtype int32"):
        hadamard(np.zeros((2, 4), np.int32))
    with pytest.raises(ValueError, match="at least one channel"):
        hadamard(np.zeros((2, 0), np.float32))


def test_result_kind_follows_the_input():
    torch = pytest.importorskip("torch")
    x = torch.randn(2, 16)
    y = hadamard(x, backend="numpy")
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float32
    assert isinstance(hadamard(x.numpy(), backend="torch"), np.ndarray)


# -- golden vectors ---------------------------------------------------------------------------------
def test_rotation_manifest_is_the_generator():
    from mixkvq.testing.golden import ROTATION_MANIFEST, rotation_cases

    meta = json.loads((VECTORS / ROTATION_MANIFEST).read_text())
    assert meta["format_version"] == mixkvq.FORMAT_VERSION
    assert [c["name"] for c in meta["cases"]] == [name for name, *_ in rotation_cases()]
    assert {c["kind"] for c in meta["cases"]} == {"rotate", "cache", "error"}


@pytest.mark.parametrize("name", [None] + BACKENDS)
def test_rotation_golden_vectors(name):
    from mixkvq.testing.golden import ROTATION_MANIFEST, check_manifest

    if name is not None:
        _backend(name)
    assert check_manifest(VECTORS, ROTATION_MANIFEST, backend=name) == []


# -- rotation inside the format (§11.6) --------------------------------------------------------------
@st.composite
def tier_sets(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    T, D = draw(st.sampled_from([1, 2, 5, 32])), draw(st.sampled_from([1, 3, 8, 24, 64, 80]))
    widths = draw(st.sampled_from([(16, 4, 2), (2,), (8, 4, 3, 2, 16)]))
    tm = np.array(draw(st.lists(st.sampled_from(widths), min_size=B * H * D, max_size=B * H * D)), np.uint8)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal((B, H, T, D)) * rng.uniform(0.01, 50, D)).astype(np.float32)
    rotated = draw(st.sampled_from([w for w in ((4, 2), (2,), (8, 4, 3, 2)) if set(w) <= set(widths)] or [(2,)]))
    return x, tm.reshape(B, H, D), rotated, draw(st.integers(0, 2**64 - 1)), draw(st.booleans())


@pytest.mark.parametrize("name", BACKENDS)
@given(case=tier_sets())
def test_tier_rotation_matches_the_literal_simulator(name, case):
    """The vectorised §11.6 (heads grouped by set size) against the per-head loop, bit for bit."""
    from mixkvq.rotation import rotate_tiers

    be = _backend(name)
    x, tm, widths, seed, inverse = case
    want = sim.rotate_tier_sets(x, tm, widths, seed, inverse=inverse)
    got = _host(be, rotate_tiers(be, _native(be, x), _native(be, tm), widths, seed, inverse=inverse))
    assert _bits(got).tobytes() == _bits(want).tobytes()
    untouched = ~np.isin(tm, widths)[:, :, None, :].repeat(x.shape[2], axis=2)
    assert np.array_equal(got[untouched], x[untouched])  # other channels keep their values


def _cache_inputs(seed=0, T=256, D=64):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, 2, T, D)).astype(np.float32)
    k[..., 3] *= 25
    k[..., 10] += 8
    v = rng.standard_normal((1, 2, T, D)).astype(np.float32)
    q = rng.standard_normal((1, 6, T, D)).astype(np.float32)
    return k, v, q


@pytest.mark.parametrize("mode", [dict(tier_mode="budget"), dict(tier_mode="threshold"),
                                  dict(tier_mode="rd", rd_bits=3.5)])
def test_rotated_cache_keeps_the_tiers_and_the_bytes(mode):
    """Salience comes first: the tier maps and every array's size equal the unrotated cache's;
    the stored rows differ, and the decoded history stays close to the input. (rd with rotated
    values prices the rotated values, §11.6, so its value width may differ: keys only here.)"""
    k, v, q = _cache_inputs()
    plain = mixkvq.KVCache(mixkvq.MixKVQConfig(**mode), backend="numpy")
    values = mode["tier_mode"] != "rd"
    rot = mixkvq.KVCache(mixkvq.MixKVQConfig(**mode, key_rotation="tiers", value_rotation=values), backend="numpy")
    for c in (plain, rot):
        c.append(k, v, queries=q)
    assert rot.nbytes == plain.nbytes and len(rot.key_blocks) == len(plain.key_blocks) == 2
    for a, b in zip(plain.key_blocks, rot.key_blocks):
        assert np.array_equal(a.tier_map, b.tier_map)
        assert {w: r.packed.shape for w, r in a.tiers.items()} == {w: r.packed.shape for w, r in b.tiers.items()}
    filled = [w for w, r in plain.key_blocks[0].tiers.items() if w != 16 and r.packed.shape[0] > 1]
    assert filled and all(not np.array_equal(plain.key_blocks[0].tiers[w].packed, rot.key_blocks[0].tiers[w].packed)
                          for w in filled)
    kd, vd = rot.dequantized()
    kp, vp = plain.dequantized()
    # both within the quantization error of the input; the residual is exact in both
    assert np.abs(kd - k).mean() < 2 * np.abs(kp - k).mean() and np.abs(vd - v).mean() < 2 * np.abs(vp - v).mean()
    assert np.array_equal(kd[:, :, 256:], kp[:, :, 256:])


def test_rd_prices_rotated_values_as_they_are_stored():
    """§8.3 / §11.6: with value_rotation the allocator's value model reads the rotated values.
    An outlier value channel makes every unrotated per-token group wide; rotated, it spreads
    thin, so the allocator keeps 2-bit values and spends the bits on keys — the allocation is
    exactly the simulator's on the rotated block, and the unrotated pricing would differ."""
    from mixkvq.sim.allocate import rd_allocate

    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    k[..., 3] *= 10
    v = rng.standard_normal((1, 2, 64, 32)).astype(np.float32)
    v[..., 7] *= 30
    kw = dict(tier_mode="rd", rd_bits=4.0, rd_value_weight=1.0, policy="key_only", group_size=32, residual_length=64)
    args = dict(ladder=(2, 3, 4, 8, 16), value_ladder=(2, 3, 4), budget_bits=4.0, group_size=32, meta_bytes=2,
                high_dtype="bfloat16", value_weight=1.0)
    ones = np.ones((1, 2, 32), np.float32)
    rotated = sim.hadamard(v, signs=sim.sign_vector(32, 0))
    for backend in ["numpy"] + [b for b in BACKENDS if _usable(b)]:
        rot = mixkvq.KVCache(mixkvq.MixKVQConfig(**kw, value_rotation=True), backend=backend)
        rot.append(k, v)
        tm, vb = rd_allocate(k, rotated, ones, **args)
        assert rot.value_rows[0].bits == vb == 2
        assert np.array_equal(np.asarray(rot.key_blocks[0].tier_map), tm)
    tm0, vb0 = rd_allocate(k, v, ones, **args)
    assert vb0 == 3 and not np.array_equal(tm0, tm)        # priced unrotated: 3-bit values, fewer key bits
    plain = mixkvq.KVCache(mixkvq.MixKVQConfig(**kw), backend="numpy")
    plain.append(k, v)
    assert plain.value_rows[0].bits == 3 and rot.nbytes <= plain.nbytes  # both within the same budget


def test_low_rotation_touches_only_the_narrowest_tier():
    k, v, q = _cache_inputs(1)
    caches = {}
    for rot in ("none", "low", "tiers"):
        caches[rot] = mixkvq.KVCache(mixkvq.MixKVQConfig(key_rotation=rot), backend="numpy")
        caches[rot].append(k, v, queries=q)
    tiers = {rot: c.key_blocks[0].tiers for rot, c in caches.items()}
    assert np.array_equal(tiers["low"][4].packed, tiers["none"][4].packed)      # mid tier untouched
    assert np.array_equal(tiers["low"][16].packed, tiers["none"][16].packed)    # 16-bit never rotated
    assert np.array_equal(tiers["low"][2].packed, tiers["tiers"][2].packed)
    assert not np.array_equal(tiers["tiers"][4].packed, tiers["none"][4].packed)


@pytest.mark.parametrize("name", BACKENDS)
def test_rotated_cache_attention_is_over_the_decoded_history(name):
    """The fused kernels read unrotated rows, so a rotated cache must attend over its decoded
    history (the float64 reference): equal to the simulator's attention over dequantized()."""
    from mixkvq.sim.attention import attention as sim_attention

    be = _backend(name)
    k, v, q = _cache_inputs(2, T=200)
    c = mixkvq.KVCache(mixkvq.MixKVQConfig(key_rotation="tiers", value_rotation=True), backend=be)
    c.append(_native(be, k), _native(be, v), queries=_native(be, q))
    kd, vd = (_host(be, t) for t in c.dequantized())
    qq = q[:, :, -3:]
    want = sim_attention(qq, kd, vd, scale=1 / 8, causal=True)
    got = _host(be, c.attention(_native(be, qq)))
    assert np.allclose(got, want, rtol=0, atol=1e-6)


def test_rotation_config_fields():
    cfg = mixkvq.MixKVQConfig(key_rotation="low", value_rotation=True, rotation_seed=2**64 - 1)
    assert cfg.rotation == mixkvq.TierRotation("low", True, 2**64 - 1)
    d = cfg.to_dict()
    assert (d["key_rotation"], d["value_rotation"], d["rotation_seed"]) == ("low", True, 2**64 - 1)
    assert mixkvq.MixKVQConfig.from_dict(json.loads(json.dumps(d))) == cfg
    assert cfg.replace(rd_bits=3.5, tier_mode="rd").rotation == cfg.rotation
    assert cfg.replace(key_rotation="none", value_rotation=False).to_dict() == mixkvq.MixKVQConfig().to_dict()
    assert not set(mixkvq.MixKVQConfig().to_dict()) & {"key_rotation", "value_rotation", "rotation_seed"}
    for bad, match in ((dict(key_rotation="all"), "key_rotation"), (dict(value_rotation="yes"), "value_rotation"),
                       (dict(rotation_seed=-1), "rotation_seed"), (dict(rotation_seed=2**64), "rotation_seed"),
                       (dict(rotation_seed=1.0), "rotation_seed")):
        with pytest.raises(ValueError, match=match):
            mixkvq.MixKVQConfig(**bad)
    with pytest.raises(TypeError, match="not both"):
        mixkvq.MixKVQConfig(rotation=mixkvq.TierRotation("tiers"), key_rotation="low")


def test_rotation_overflow_leaves_the_cache_as_it_was():
    cfg = mixkvq.MixKVQConfig(policy="key_only", budget=(0, 0), key_rotation="tiers", meta_dtype="float32",
                              group_size=32, residual_length=64)
    c = mixkvq.KVCache(cfg, backend="numpy")
    k = np.zeros((1, 1, 40, 8), np.float32)
    c.append(k, k)
    before = (c.nbytes, c.seq_len)
    k2 = np.zeros((1, 1, 30, 8), np.float32)
    k2[..., :2] = 2e38
    with pytest.raises(ValueError, match="rotating keys overflows float32"):
        c.append(k2, np.zeros_like(k2))
    assert (c.nbytes, c.seq_len) == before


def test_vllm_pages_refuse_rotation():
    from mixkvq.integrations.vllm.pages import PageLayout

    with pytest.raises(NotImplementedError, match="rotation"):
        PageLayout(mixkvq.MixKVQConfig(key_rotation="tiers"), heads=3, head_dim=64)
