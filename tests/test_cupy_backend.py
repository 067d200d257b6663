"""The CUDA kernels against the simulator, bit for bit.

Runs the kernels on the CPU emulation (``"cupy-cpu"``: same .cu source, launch code and
geometry as on the GPU, see docs/cuda.md) everywhere, and on the GPU through CuPy where one
is present (tests marked ``gpu`` skip with the reason otherwise).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkvq.backends.cupy import CupyCpuBackend
from mixkvq.backend import get_backend
from mixkvq.cache import KVCache
from mixkvq.config import MixKVQConfig
from mixkvq.sim import NumpyBackend
from mixkvq.testing import attention_tolerance

SIM = NumpyBackend()
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
META = st.sampled_from(["float16", "bfloat16", "float32"])

SPECIALS = np.array([0.0, -0.0, 1e-45, -1e-45, 6e-8, 5.96e-8, 2.98e-8, 6.1e-5, -6.1e-5, 65504.0, -65504.0,
                     65519.0, 65520.0, 1.0, -1.0, 3.0e4, 1e-30, 2.5, -2.5, 0.5], dtype=np.float32)


def _backend(**kw):
    return CupyCpuBackend(**kw)


CPU = _backend(attention_split_tokens=32)


def _gpu_backend(**kw):
    """The CUDA backend, or a visible skip (a failure when MIXKVQ_REQUIRE_GPU=1, as
    scripts/gpu_check.sh sets, so a device run can never pass by skipping)."""
    from mixkvq.backends.cupy import CupyBackend

    try:
        return CupyBackend(**kw)
    except Exception as exc:  # noqa: BLE001 - the reason is shown in the skip message
        if os.environ.get("MIXKVQ_REQUIRE_GPU") == "1":
            raise
        pytest.skip(f"no usable CUDA GPU for the cupy backend: {exc}")


def _make(where, **kw):
    return _backend(**kw) if where == "cpu" else _gpu_backend(**kw)


WHERE = pytest.mark.parametrize("where", ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])


def _host(a):
    return a.get() if type(a).__module__.split(".")[0] == "cupy" else np.asarray(a)


def same_bits(a, b) -> bool:
    a, b = _host(a), _host(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@st.composite
def rows(draw, max_rows=6, max_n=70):
    """float32 ``(r1, r2, n)`` mixing random scales, special values and constant runs."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_rows)), draw(st.integers(1, max_n)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    mag = draw(st.sampled_from([1e-6, 1e-3, 1.0, 30.0, 1e3, 6e4, 1e30]))
    x = (rng.standard_normal(shape) * mag).astype(np.float32)
    if draw(st.booleans()):
        mask = rng.random(shape) < 0.3
        x[mask] = rng.choice(SPECIALS, size=int(mask.sum()))
    if draw(st.booleans()):
        x[..., : shape[-1] // 2] = x[..., :1]  # constant groups
    return x


def _run_both(fn_kernel, fn_sim):
    """Both raise the same ValueError, or both return."""
    try:
        want = fn_sim()
    except ValueError as exc:
        with pytest.raises(ValueError) as got:
            fn_kernel()
        assert str(got.value) == str(exc)
        return None, None
    return fn_kernel(), want


@FAST
@given(x=rows(), bits=st.integers(1, 8), group=st.integers(1, 40), meta=META,
       out=st.sampled_from(["float32", "float16"]))
def test_quantize_dequantize_bit_exact(x, bits, group, meta, out):
    b = CPU
    got, want = _run_both(lambda: b.quantize(x, bits, group, meta, "x"), lambda: SIM.quantize(x, bits, group, meta, "x"))
    if want is None:
        return
    for g, w in zip(got, want):
        assert same_bits(g, w)
    n = x.shape[-1]
    assert same_bits(b.dequantize(*got, bits, group, n, out), SIM.dequantize(*want, bits, group, n, out))


def test_dequantize_bfloat16_output_bits():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((4, 50)) * 1e3).astype(np.float32)
    packed, s, z = SIM.quantize(x, 3, 16, "float32", "x")
    from mixkvq.sim.floats import bf16_bits
    want = bf16_bits(np.clip(SIM.dequantize(packed, s, z, 3, 16, 50), -3.3895313892515355e38, 3.3895313892515355e38))
    assert same_bits(CPU.dequantize(packed, s, z, 3, 16, 50, "bfloat16"), want)


@FAST
@given(bits=st.integers(1, 8), shape=st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 45)),
       seed=st.integers(0, 2**32 - 1))
def test_pack_unpack_bit_exact(bits, shape, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, shape).astype(np.uint8)
    packed = CPU.pack(codes, bits)
    assert same_bits(packed, SIM.pack(codes, bits))
    junk = packed.copy()
    junk[..., -1] |= np.uint8(0xFF << ((shape[-1] * bits) % 8) & 0xFF) if (shape[-1] * bits) % 8 else 0
    assert same_bits(CPU.unpack(junk, bits, shape[-1]), codes)  # padding bits ignored


@FAST
@given(x=rows(), high=st.sampled_from(["bfloat16", "float16"]))
def test_encode_decode_half_bit_exact(x, high):
    got, want = _run_both(lambda: CPU.encode_half(x, high, "keys"), lambda: SIM.encode_half(x, high, "keys"))
    if want is None:
        return
    assert same_bits(got, want)
    assert same_bits(CPU.decode_half(got, high), SIM.decode_half(want, high))


def test_half_conversions_exhaustive():
    """Every float16 pattern decodes like NumPy; float32 -> float16 rounding around every
    boundary (subnormals, ties, overflow) encodes like NumPy's."""
    words = np.arange(2**16, dtype=np.uint16)
    got = CPU.decode_half(words.view(np.uint8), "float16")
    want = words.view(np.float16).astype(np.float32)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(got), nan)
    assert same_bits(got[~nan], want[~nan])
    # float32 values at and next to every float16 value and midpoint
    f16 = words.view(np.float16)
    f16 = f16[np.isfinite(f16)].astype(np.float32)
    mids = ((f16[:-1].astype(np.float64) + f16[1:]) / 2).astype(np.float32)
    base = np.concatenate([f16, mids, np.float32([65519.996, 65520.0, 1e5, 2.0**-25, 2.0**-26, 3e38])])
    x = np.concatenate([base, np.nextafter(base, np.float32(np.inf)), np.nextafter(base, np.float32(-np.inf))])
    x = np.concatenate([x, -x])
    with np.errstate(over="ignore"):
        want16 = x.astype(np.float16).view(np.uint16)
    words_got = np.empty(x.size, np.uint16)
    bad = np.empty(x.size, np.int32)
    CPU.launcher.launch("encode_half", CPU._grid(x.size), (128, 1, 1), [x, np.int64(x.size), np.int32(0), words_got, bad])
    assert np.array_equal(words_got, want16)
    assert np.array_equal(bad.astype(bool), np.isinf(want16.view(np.float16)))


@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), n_rep=st.integers(1, 4), T=st.integers(1, 5), D=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1), mag=st.sampled_from([1e-6, 1.0, 1e3, 1e7, 3e38]))
def test_query_statistics_bit_exact(B, H, n_rep, T, D, seed, mag):
    rng = np.random.default_rng(seed)
    q = np.clip(rng.standard_normal((B, H * n_rep, T, D)) * mag, -3.4e38, 3.4e38).astype(np.float32)
    sums = CPU.query_token_sums(q, n_rep)
    assert same_bits(sums, SIM.query_token_sums(q, n_rep))
    qsum = sums.sum(axis=2)
    for count in (0, 1, T, 12345):
        assert same_bits(CPU.relevance(qsum, count, n_rep), SIM.relevance(qsum, count, n_rep))


@FAST
@given(B=st.integers(1, 2), H=st.integers(1, 3), R=st.integers(1, 12), D=st.integers(1, 24),
       low=st.integers(1, 8), seed=st.integers(0, 2**32 - 1), ties=st.booleans(), budget=st.data())
def test_salience_and_tiers_bit_exact(B, H, R, D, low, seed, ties, budget):
    rng = np.random.default_rng(seed)
    k = (rng.standard_normal((B, H, R, D)) * 10).astype(np.float32)
    if ties:
        k = np.round(k)  # many equal ranges: tie-breaking by channel index matters
    diff = CPU.difficulty(k, low)
    assert same_bits(diff, SIM.difficulty(k, low))
    a = diff * np.float32(rng.random((B, H, D)) < 0.5)  # zeros tie too
    if D > 2 and not ties:
        a[..., 0] = np.nan  # NaN sorts last (as NumPy's stable argsort of -A)
        a[..., 1] = np.inf
    n_high = budget.draw(st.integers(0, D))
    n_mid = budget.draw(st.integers(0, D - n_high))
    tiers = (16, 4, low)
    assert same_bits(CPU.assign_budget(a, n_high, n_mid, tiers), SIM.assign_budget(a, n_high, n_mid, tiers))
    th, tm = sorted(budget.draw(st.floats(0, 20, width=32)) for _ in range(2))[::-1]
    assert same_bits(CPU.assign_threshold(a, th, tm, tiers), SIM.assign_threshold(a, th, tm, tiers))


CONFIGS = st.fixed_dictionaries({
    "policy": st.sampled_from(["query_aware", "key_only", "query_only", "uniform"]),
    "tier_mode": st.sampled_from(["budget", "threshold", "rd"]),
    "meta_dtype": META,
    "high_dtype": st.sampled_from(["bfloat16", "float16"]),
    "mid_bits": st.integers(2, 8),
    "value_bits": st.integers(1, 8),
    "value_window": st.sampled_from(["block", "sliding"]),
    "group": st.sampled_from([4, 8, 16]),
    "blocks": st.integers(1, 3),
})


@WHERE
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=CONFIGS, B=st.integers(1, 2), H=st.integers(1, 2), n_rep=st.sampled_from([1, 2, 4]),
       D=st.sampled_from([8, 20, 32, 64, 128, 200, 256]), extra=st.integers(0, 40), Tq=st.sampled_from([1, 2, 5]),
       causal=st.booleans(), seed=st.integers(0, 2**32 - 1), split=st.sampled_from([32, 64, None]),
       masking=st.sampled_from(["none", "window", "softcap", "padding", "all"]))
def test_cache_and_fused_attention(where, c, B, H, n_rep, D, extra, Tq, causal, seed, split, masking):
    """A whole streaming cache on the kernels stores the simulator's bytes; the fused
    attention over it (heads up to 256 channels, padding masks, sliding windows and
    soft-capping in the kernel) agrees with the float64 reference within the stated bound."""
    R = c["group"] * 2
    rd = {}
    if c["tier_mode"] == "rd":  # per-block key widths and value width; needs salience and block values
        c["policy"] = "key_only" if c["policy"] == "uniform" else c["policy"]
        c["value_window"] = "block"
        rd = dict(rd_bits=20.0)
    cfg = MixKVQConfig.from_dict(dict(policy=c["policy"], tier_mode=c["tier_mode"], meta_dtype=c["meta_dtype"],
                                      high_dtype=c["high_dtype"], mid_bits=c["mid_bits"], low_bits=2, value_bits=c["value_bits"],
                                      value_window=c["value_window"], group_size=c["group"], residual_length=R,
                                      budget=(1, min(2, D - 1)), thresholds=(1.0, 0.5), **rd))
    T = c["blocks"] * R + extra
    rng = np.random.default_rng(seed)
    k, v = (rng.standard_normal((2, B, H, T, D)) * 2).astype(np.float32)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float32)
    ref = KVCache(cfg, backend="numpy")
    mine = KVCache(cfg, backend=_make(where, attention_split_tokens=split))
    for lo, hi in ((0, T // 3), (T // 3, T)):  # streamed in two chunks
        if hi > lo:
            ref.append(k[:, :, lo:hi], v[:, :, lo:hi], queries=q[:, :, lo:hi])
            mine.append(k[:, :, lo:hi], v[:, :, lo:hi], queries=q[:, :, lo:hi])
    got_arrays, want_arrays = list(mine.arrays()), list(ref.arrays())
    assert len(got_arrays) == len(want_arrays)
    for g, w in zip(got_arrays, want_arrays):
        assert same_bits(g, w)
    qq = rng.standard_normal((B, H * n_rep, Tq, D)).astype(np.float32)
    kw: dict = {}
    if masking in ("window", "all"):
        kw["window"] = int(rng.integers(1, T + 1))
    if masking in ("softcap", "all"):
        kw["softcap"] = float(rng.uniform(0.5, 30.0))
    if masking in ("padding", "all"):  # left padding of a random length per row, plus random holes
        m = rng.random((B, Tq, T)) > 0.2
        m[:, :, : int(rng.integers(0, T // 2 + 1))] = False
        kw["mask"] = m
    want = ref.attention(qq, causal=causal, **kw)
    got = mine.attention(qq, causal=causal, **kw)
    keys, values = ref.dequantized()
    tol = attention_tolerance(qq, keys, values, 1.0 / np.sqrt(D))
    got = _host(got)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.max(np.abs(got - want)) <= tol


def test_launch_arguments_are_checked():
    """A Python int where the kernel takes int32 (which CuPy would pass as 8 bytes) is refused
    before the launch, on both launchers alike."""
    x = np.zeros(4, np.float32)
    out = np.zeros(4, np.uint16)
    bad = np.zeros(4, np.int32)
    with pytest.raises(TypeError, match="argument 2 must be int32"):
        CPU.launcher.launch("encode_half", (1,), (128,), [x, np.int64(4), 0, out, bad])
    with pytest.raises(ValueError, match="C-contiguous"):
        CPU.launcher.launch("decode_half", (1,), (128,), [out[::2], np.int64(2), np.int32(0), x[::2]])
    with pytest.raises(TypeError, match="takes 4"):
        CPU.launcher.launch("decode_half", (1,), (128,), [out])


def test_registered_and_imports_without_gpu():
    from mixkvq.backends.cupy import CupyBackend

    assert get_backend("cupy-cpu").name == "cupy-cpu"
    try:
        CupyBackend()
    except RuntimeError as exc:
        assert "GPU" in str(exc) or "CuPy" in str(exc)


def test_conformance_kit_cupy_cpu():
    from mixkvq.testing import check_backend

    report = check_backend("cupy-cpu", max_examples=10)
    assert all(n > 0 for n in report.examples.values()), report


@pytest.mark.gpu
def test_gpu_matches_cpu_emulation_and_sim():
    gpu = _gpu_backend()
    import cupy

    rng = np.random.default_rng(7)
    x = (rng.standard_normal((3, 7, 300)) * 5).astype(np.float32)
    for bits in range(1, 9):
        for meta in ("float16", "bfloat16", "float32"):
            got = gpu.quantize(cupy.asarray(x), bits, 32, meta, "x")
            want = SIM.quantize(x, bits, 32, meta, "x")
            for g, w in zip(got, want):
                assert same_bits(cupy.asnumpy(g), w)
    from mixkvq.testing import check_backend

    check_backend("cupy", max_examples=25)


def test_fused_attention_stays_finite_for_values_near_the_float32_limit():
    """The kernel keeps each split's weighted mean (a convex combination), not the weighted
    sum, so values near FLT_MAX cannot overflow (found by the conformance kit)."""
    import mixkvq

    rng = np.random.default_rng(0)
    k = rng.standard_normal((1, 2, 24, 8)).astype(np.float32)
    # near FLT_MAX yet storable (float32 metadata, a range that fits): values that could never be
    # quantized are rejected at append (docs/numerics.md §9)
    v = np.full((1, 2, 24, 8), 3.0e38, np.float32)
    v[..., ::2] = 2.0e38
    q = rng.standard_normal((1, 4, 24, 8)).astype(np.float32)
    outs = []
    for name in ("numpy", "cupy-cpu"):
        cache = mixkvq.KVCache(mixkvq.MixKVQConfig(policy="uniform", residual_length=32, group_size=8,
                                                   meta_dtype="float32"), backend=name)
        cache.append(k, v)
        outs.append(np.asarray(cache.attention(q[:, :, -1:])))
    assert np.isfinite(outs[1]).all()
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5)
