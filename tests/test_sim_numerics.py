"""The simulator against docs/numerics.md §1–§6: packing, quantization, error bound, specials."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mixkvq
from mixkvq import sim
from mixkvq.sim.floats import bf16_bits, bf16_to_float32, meta_to_float32

META = ("float16", "bfloat16", "float32")


# -- §5 packing -----------------------------------------------------------------------------
@given(bits=st.integers(1, 8), n=st.integers(0, 70), rows=st.integers(1, 3), data=st.data())
def test_pack_unpack_identity(bits, n, rows, data):
    codes = data.draw(hnp.arrays(np.uint8, (rows, n), elements=st.integers(0, 2**bits - 1)))
    packed = sim.pack(codes, bits)
    assert packed.shape == (rows, (n * bits + 7) // 8)
    assert np.array_equal(sim.unpack(packed, bits, n), codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_matches_bit_stream_definition(bits):
    """Element i takes stream bits [i*b, (i+1)*b); stream bit 8k+j is bit j of byte k."""
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, 29, dtype=np.uint8)
    stream = [(int(c) >> j) & 1 for c in codes for j in range(bits)]
    stream += [0] * (-len(stream) % 8)  # zero padding at the row's end
    expected = [sum(stream[8 * k + j] << j for j in range(8)) for k in range(len(stream) // 8)]
    assert sim.pack(codes[None], bits)[0].tolist() == expected


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_equals_kivi_int32_little_endian(bits):
    """KIVI packs 32/b codes per int32, first code in the lowest bits."""
    rng = np.random.default_rng(0)
    per_word = 32 // bits
    codes = rng.integers(0, 2**bits, 4 * per_word, dtype=np.uint8)
    words = np.zeros(4, dtype=np.uint32)
    for w in range(4):
        for i in range(per_word):
            words[w] |= np.uint32(int(codes[w * per_word + i]) << (i * bits))
    assert sim.pack(codes[None], bits)[0].tobytes() == words.astype("<u4").tobytes()


def test_pack_rows_are_padded_separately():
    codes = np.array([[1, 1, 1], [1, 1, 1]], dtype=np.uint8)
    assert sim.pack(codes, 3).tolist() == [[0b01001001, 0b0], [0b01001001, 0b0]]


# -- §2 metadata rounding ---------------------------------------------------------------------
def test_bfloat16_rounding_is_nearest_even():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -2.5], dtype=np.float32)
    assert bf16_to_float32(bf16_bits(x)).tolist() == [1.0, 1.0, 1.0 + 2**-6, 1.0 + 2**-7, -2.5]


@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_bfloat16_rounding_matches_a_float64_reference(v):
    x = np.float32(v)
    u = int(np.array([x]).view(np.uint32)[0])
    lo = np.array([u & 0xFFFF0000], np.uint32).view(np.float32)[0].astype(np.float64)
    exponent = max((u >> 23) & 0xFF, 1)  # one bfloat16 ulp below |x|'s binade (subnormals: 2^-133)
    ulp = 2.0 ** (exponent - 127 - 7)
    hi = lo + np.copysign(ulp, lo if lo != 0 else float(x))  # may be 2^128: IEEE rounds that to Inf
    d_lo, d_hi = abs(float(x) - lo), abs(hi - float(x))
    want = lo if d_lo < d_hi or (d_lo == d_hi and (u >> 16) % 2 == 0) else hi
    if abs(want) >= 2.0**128:
        want = np.copysign(np.inf, want)
    assert bf16_to_float32(bf16_bits(np.array([x])))[0].astype(np.float64) == want


# -- §3/§4 quantization and the error bound -----------------------------------------------------
finite_f32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=True)


def error_bound(x32, scale, zero, bits, group_size, meta):
    """docs/numerics.md §4, evaluated in float64."""
    n = x32.shape[-1]
    s = np.repeat(meta_to_float32(scale, meta).astype(np.float64), group_size, -1)[..., :n]
    z = np.repeat(meta_to_float32(zero, meta).astype(np.float64), group_size, -1)[..., :n]
    groups = sim.quant._groups(x32.astype(np.float64), group_size)
    mn = np.repeat(groups.min(-1), group_size, -1)[..., :n]
    mx = np.repeat(groups.max(-1), group_size, -1)[..., :n]
    L = 2**bits - 1
    delta = np.maximum(0, np.maximum(z - mn, mx - (z + L * s)))
    u = 2.0**-24
    return s / 2 + delta + 4 * u * (L * s + np.abs(z) + np.abs(x32.astype(np.float64)))


@given(
    bits=st.integers(1, 8), group_size=st.sampled_from([1, 3, 8, 32]), meta=st.sampled_from(META),
    x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 70)), elements=finite_f32),
)
@example(bits=2, group_size=8, meta="float16", x=np.array([[0.0, 0.5, 1.0, 1.5, 0.25, 1e-7, -0.0, 2.0]], np.float32))
def test_error_bound_holds(bits, group_size, meta, x):
    packed, scale, zero = sim.quantize(x, bits, group_size, meta)
    y = sim.dequantize(packed, scale, zero, bits, group_size, x.shape[-1])
    assert y.dtype == np.float32
    err = np.abs(x.astype(np.float64) - y.astype(np.float64))
    assert np.all(err <= error_bound(x, scale, zero, bits, group_size, meta))


@given(bits=st.integers(1, 8), x=hnp.arrays(np.float16, (2, 64), elements=st.floats(-65504, 65504, width=16)))
def test_float16_inputs_never_overflow_float16_metadata_for_two_bits_and_up(bits, x):
    assume(bits >= 2)
    packed, scale, zero = sim.quantize(x, bits, 32, "float16")
    assert np.all(np.isfinite(scale)) and np.all(np.isfinite(zero))


def test_constant_group_dequantizes_to_its_zero():
    x = np.full((1, 32), 1.2345678, np.float32)
    for meta in META:
        packed, scale, zero = sim.quantize(x, 2, 32, meta)
        assert not sim.unpack(packed, 2, 32).any()
        y = sim.dequantize(packed, scale, zero, 2, 32, 32)
        assert np.all(y == meta_to_float32(zero, meta)[0, 0])
    _, _, zero = sim.quantize(x, 2, 32, "float32")
    assert zero[0, 0] == x[0, 0]


def test_negative_zero_is_canonicalised():
    x = np.full((1, 8), -0.0, np.float32)
    _, scale, zero = sim.quantize(x, 3, 8, "float32")
    assert zero.view(np.uint32)[0, 0] == 0 and scale.view(np.uint32)[0, 0] == 0


def test_scale_underflow_behaves_like_a_constant_group():
    x = np.array([[1.0, 1.0 + 2**-23]], np.float32)  # range 1.19e-7, scale/255 underflows float16
    packed, scale, zero = sim.quantize(x, 8, 2, "float16")
    assert scale[0, 0] == 0 and not sim.unpack(packed, 8, 2).any()
    assert np.array_equal(sim.dequantize(packed, scale, zero, 8, 2, 2), np.ones((1, 2), np.float32))


def test_rounding_ties_go_to_even():
    x = np.array([[0.0, 0.5, 1.5, 2.5, 3.0]], np.float32)  # scale 1.0 at 2 bits over [0, 3]
    packed, scale, _ = sim.quantize(x, 2, 5, "float32")
    assert scale[0, 0] == 1.0
    assert sim.unpack(packed, 2, 5).tolist() == [[0, 0, 2, 2, 3]]


def test_division_is_not_a_reciprocal_multiplication():
    """x/s and x*(1/s) differ for these float32 values; the spec divides."""
    s = np.float32(3.0)
    x = np.float32(0.3) * np.arange(1, 2000, dtype=np.float32)
    assert np.any(x / s != x * (np.float32(1) / s))  # the premise
    row = np.concatenate([[0.0], x]).astype(np.float32)[None]
    packed, scale, zero = sim.quantize(row, 8, row.shape[1], "float32")
    t = (row - zero[0, 0]) / scale[0, 0]
    assert np.array_equal(sim.unpack(packed, 8, row.shape[1]), np.clip(np.rint(t), 0, 255).astype(np.uint8))


def test_metadata_overflow_is_rejected_with_a_hint():
    x = np.array([[-65504.0, 65504.0]], np.float32)
    with pytest.raises(ValueError, match=r"x: .*overflows float16.*meta_dtype='float32'"):
        sim.quantize(x, 1, 2, "float16")
    sim.quantize(x, 1, 2, "float32")  # fine with wider metadata


def test_dequantize_output_dtypes_saturate():
    x = np.array([[-65504.0, 65504.0, 0.0]], np.float32)
    packed, scale, zero = sim.quantize(x, 2, 3, "float16")
    y16 = sim.dequantize(packed, scale, zero, 2, 3, 3, "float16")
    assert y16.dtype == np.float16 and np.all(np.isfinite(y16))


# -- §6 16-bit rows -------------------------------------------------------------------------------
@pytest.mark.parametrize("high", ["bfloat16", "float16"])
def test_half_rows_round_trip(high):
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    packed = sim.encode_half(x, high)
    assert packed.shape == (3, 20) and packed.dtype == np.uint8
    ref = x.astype(np.float16).astype(np.float32) if high == "float16" else bf16_to_float32(bf16_bits(x))
    assert np.array_equal(sim.decode_half(packed, high), ref)
    if high == "float16":  # little-endian words
        assert packed[0, :2].tobytes() == x[0, :1].astype("<f2").tobytes()


def test_half_overflow_rejected():
    with pytest.raises(ValueError, match="16-bit key channel"):
        sim.encode_half(np.array([[1e6]], np.float32), "float16", "keys")


# -- §7/§8 statistics and tiers ------------------------------------------------------------------
@given(n_rep=st.integers(1, 3), T=st.integers(1, 9), split=st.integers(0, 9))
def test_query_sums_are_exact_and_order_free(n_rep, T, split):
    rng = np.random.default_rng(T * 7 + n_rep)
    q = (rng.standard_normal((1, 2 * n_rep, T, 5)) * 10).astype(np.float32)
    u = sim.query_token_sums(q, n_rep)
    assert u.dtype == np.int64 and u.shape == (1, 2, T, 5)
    split = min(split, T)
    parts = sim.query_token_sums(q[:, :, :split], n_rep).sum(2) + sim.query_token_sums(q[:, :, split:], n_rep).sum(2)
    assert np.array_equal(parts, u.sum(2))
    manual = np.rint(np.abs(q).astype(np.float64) * 65536).astype(np.int64).reshape(1, 2, n_rep, T, 5).sum(2)
    assert np.array_equal(u, manual)


def test_relevance_without_queries_is_one():
    assert np.all(sim.relevance(np.zeros((1, 2, 3), np.int64), 0, 2) == 1.0)


def test_budget_ranking_breaks_ties_by_lower_channel():
    a = np.array([[[1.0, 3.0, 3.0, 0.5, 3.0, 2.0]]], np.float32)
    tm = sim.assign_budget(a, 1, 2, (16, 4, 2))
    assert tm.tolist() == [[[2, 16, 4, 2, 4, 2]]]


def test_threshold_rule():
    a = np.array([[[0.1, 0.79, 0.8, 1.44, 1.45]]], np.float32)
    tm = sim.assign_threshold(a, 1.44, 0.79, (16, 4, 2))
    assert tm.tolist() == [[[2, 2, 4, 4, 16]]]


def test_difficulty_is_range_over_levels():
    k = np.zeros((1, 1, 4, 2), np.float32)
    k[0, 0, :, 0] = [1.0, -2.0, 0.5, 4.0]
    assert sim.difficulty(k, 2).tolist() == [[[2.0, 0.0]]]


# -- public API ----------------------------------------------------------------------------------
def test_public_quantize_axis_and_shapes():
    x = np.random.default_rng(1).standard_normal((2, 70, 3)).astype(np.float32)
    qt = mixkvq.quantize(x, bits=3, group_size=32, axis=1)
    assert qt.packed.shape == (2, 27, 3) and qt.scale.shape == (2, 3, 3) and qt.axis == 1
    assert qt.nbytes == qt.packed.nbytes + qt.scale.nbytes + qt.zero.nbytes
    y = mixkvq.dequantize(qt)
    ref = sim.dequantize(*sim.quantize(np.moveaxis(x, 1, -1), 3, 32, "float16"), 3, 32, 70)
    assert np.array_equal(y, np.moveaxis(ref, -1, 1))
    codes = mixkvq.unpack(mixkvq.pack(np.arange(6, dtype=np.uint8).reshape(2, 3) % 4, 2, axis=0), 2, 2, axis=0)
    assert codes.tolist() == (np.arange(6).reshape(2, 3) % 4).tolist()


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"bits": 0}, ValueError, "bits must be an integer in 1..8"),
        ({"bits": 9}, ValueError, "bits must be"),
        ({"bits": 2, "group_size": 0}, ValueError, "group_size must be a positive integer"),
        ({"bits": 2, "axis": 5}, ValueError, "axis=5 is out of range"),
        ({"bits": 2, "meta_dtype": "int8"}, ValueError, "meta_dtype must be one of"),
    ],
)
def test_public_quantize_rejects_bad_arguments(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        mixkvq.quantize(np.ones((2, 4), np.float32), **kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_named_with_its_position(bad):
    x = np.ones((3, 5), np.float32)
    x[2, 1] = bad
    with pytest.raises(ValueError, match=r"x contains a non-finite value .* at index \(2, 1\)"):
        mixkvq.quantize(x, bits=2)


def test_integer_input_is_rejected():
    with pytest.raises(TypeError, match="x has dtype int32"):
        mixkvq.quantize(np.ones((2, 4), np.int32), bits=2)


def test_unknown_backend_lists_available():
    with pytest.raises(ValueError, match="unknown backend 'nope'; available backends: .*numpy"):
        mixkvq.quantize(np.ones((2, 4), np.float32), bits=2, backend="nope")


def test_nan_salience_ranks_last_and_is_low():
    a = np.array([[[np.nan, 1.0, np.nan, 0.0]]], np.float32)
    assert sim.assign_budget(a, 1, 2, (16, 4, 2)).tolist() == [[[4, 16, 2, 4]]]
    assert sim.assign_threshold(a, 0.5, -1.0, (16, 4, 2)).tolist() == [[[2, 16, 2, 4]]]


def test_dequantize_checks_the_qtensor_against_its_arrays():
    import dataclasses

    qt = mixkvq.quantize(np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32), bits=4)
    with pytest.raises(ValueError, match="QTensor.scale has shape"):
        mixkvq.dequantize(dataclasses.replace(qt, group_size=16))
    with pytest.raises(ValueError, match="QTensor.bits must be an integer in 1..8"):
        mixkvq.dequantize(dataclasses.replace(qt, bits=0))
    with pytest.raises(TypeError, match="QTensor.scale has dtype float16 but meta_dtype is float32"):
        mixkvq.dequantize(dataclasses.replace(qt, meta_dtype="float32"))
    with pytest.raises(TypeError, match="QTensor.packed must be uint8"):
        mixkvq.dequantize(dataclasses.replace(qt, packed=qt.packed.astype(np.float32)))


def test_pack_reads_uint16_codes_as_codes_on_every_backend():
    codes = np.array([[1, 2, 3, 0]], np.uint16)
    assert mixkvq.pack(codes, 2).tolist() == [[57]]
    pytest.importorskip("torch")
    assert mixkvq.pack(codes, 2, backend="torch").tolist() == [[57]]
