"""Torch backend specifics: exactness corner cases, errors, attention streaming, devices."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mixkvq  # noqa: E402
from mixkvq import KVCache, MixKVQConfig  # noqa: E402
from mixkvq.backend import get_backend  # noqa: E402
from mixkvq.sim import NumpyBackend  # noqa: E402
from mixkvq.testing import assert_same_array, attention_tolerance  # noqa: E402

TB, SIM = get_backend("torch"), NumpyBackend()


def _same(actual, expected, what="result"):
    assert_same_array(TB.to_numpy(actual), np.asarray(expected), what)


def test_registry_loads_torch_backend():
    from mixkvq.backends.torch import TorchBackend

    assert isinstance(get_backend("torch"), TorchBackend)


@pytest.mark.parametrize("meta", ["float16", "bfloat16", "float32"])
def test_round_half_even_signed_zero_and_subnormal_metadata(meta):
    x = np.array([[0.0, -0.0, 0.5, 1.5, 2.5, 3.0],            # ties at every code
                  [-0.0, -0.0, -0.0, -0.0, -0.0, -0.0],       # -0 group -> zero +0
                  [6e-8, 1.2e-7, 0.0, 6e-8, 0.0, 1.2e-7],     # float16 subnormal scale/zero
                  [1.0, 1.0 + 2**-23, 1.0, 1.0, 1.0, 1.0]],   # scale underflows in float16
                 dtype=np.float32)
    for bits in (1, 2, 3, 8):
        want = SIM.quantize(x, bits, 3, meta, "x")
        got = TB.quantize(torch.from_numpy(x), bits, 3, meta, "x")
        for g, w, what in zip(got, want, ("packed", "scale", "zero")):
            _same(g, w, f"{what} bits={bits}")
        _same(TB.dequantize(*got, bits, 3, 6, "float32"), SIM.dequantize(*want, bits, 3, 6, "float32"), "dequantized")


def test_float16_and_bfloat16_inputs_are_upcast_exactly():
    rng = np.random.default_rng(0)
    x32 = (rng.standard_normal((5, 70)) * 100).astype(np.float32)
    for dt in (torch.float16, torch.bfloat16):
        xt = torch.from_numpy(x32).to(dt)
        want = SIM.quantize(xt.float().numpy(), 3, 7, "float16", "x")
        got = TB.quantize(xt, 3, 7, "float16", "x")
        for g, w in zip(got, want):
            _same(g, w)


def test_int64_to_float32_rounds_once_to_nearest_even():
    from mixkvq.backends.torch.ops import int64_to_float32

    vals = [2**53 + 1, 2**60 + 2**36 + 1, 2**60 + 2**36, 2**60 + 3 * 2**36, 2**62 - 1, 2**24 + 1, 2**24 + 3, 12345]
    got = int64_to_float32(torch.tensor(vals, dtype=torch.int64)).numpy()
    from fractions import Fraction

    for v, g in zip(vals, got):
        exact = Fraction(v)
        lo = np.float32(g)
        up, down = np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(0))
        assert abs(Fraction(float(lo)) - exact) <= abs(Fraction(float(up)) - exact)
        assert abs(Fraction(float(lo)) - exact) <= abs(Fraction(float(down)) - exact)
    qsum = np.array(vals, dtype=np.int64).reshape(1, 1, -1)
    _same(TB.relevance(torch.from_numpy(qsum), 3, 2), SIM.relevance(qsum, 3, 2), "relevance")


def test_metadata_overflow_raises_the_simulators_message():
    x = np.array([[-65504.0, 65504.0, 0.0, 1.0]], dtype=np.float32) * 4
    with pytest.raises(ValueError) as want:
        SIM.quantize(x, 2, 2, "float16", "keys")
    with pytest.raises(ValueError) as got:
        TB.quantize(torch.from_numpy(x), 2, 2, "float16", "keys")
    assert str(got.value) == str(want.value) and "float16" in str(got.value)
    with pytest.raises(ValueError) as want:
        SIM.encode_half(np.array([1e6], dtype=np.float32), "float16", "keys")
    with pytest.raises(ValueError) as got:
        TB.encode_half(torch.tensor([1e6]), "float16", "keys")
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_input_gets_the_shared_validation_messages(bad):
    x = np.zeros((2, 3), dtype=np.float32)
    x[1, 2] = bad
    msgs = []
    for arr in (x, torch.from_numpy(x)):
        with pytest.raises(ValueError) as e:
            mixkvq.quantize(arr, bits=2)
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1] and "(1, 2)" in msgs[0]
    with pytest.raises(TypeError) as e:
        mixkvq.quantize(torch.zeros(3, dtype=torch.int32), bits=2)
    assert "int32" in str(e.value)
    cache = KVCache(MixKVQConfig(policy="key_only", group_size=2, residual_length=2), backend="torch")
    with pytest.raises(ValueError, match="same shape"):
        cache.append(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 3, 4))


def test_pack_every_width_matches_and_round_trips():
    rng = np.random.default_rng(1)
    for bits in range(1, 9):
        for n in (1, 7, 8, 9, 33):
            codes = rng.integers(0, 2**bits, (3, n)).astype(np.uint8)
            packed = TB.pack(torch.from_numpy(codes), bits)
            _same(packed, SIM.pack(codes, bits), f"pack bits={bits} n={n}")
            _same(TB.unpack(packed, bits, n), codes, "unpack")


@pytest.mark.parametrize("window", ["block", "sliding"])
@pytest.mark.parametrize("chunk_tokens", [1, 8, 4096])
def test_attention_blockwise_matches_reference(window, chunk_tokens, monkeypatch):
    """Small chunks force many online-softmax steps and misaligned value chunks (sliding)."""
    rng = np.random.default_rng(2)
    B, H, n_rep, T, D = 2, 2, 3, 45, 8
    k, v = (rng.standard_normal((B, H, T, D)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float32)
    cfg = MixKVQConfig(group_size=4, residual_length=8, budget=(1, 2), value_window=window)
    ref, dut = KVCache(cfg, backend="numpy"), KVCache(cfg, backend="torch")
    for a, b in ((0, 13), (13, 30), (30, 45)):
        ref.append(k[:, :, a:b], v[:, :, a:b], q[:, :, a:b])
        dut.append(torch.from_numpy(k[:, :, a:b]), torch.from_numpy(v[:, :, a:b]), torch.from_numpy(q[:, :, a:b]))
    monkeypatch.setattr(type(TB), "attention_chunk_tokens", chunk_tokens)
    keys, values = ref.layout.dequantized(ref.backend, ref.state.storage)
    for Tq, causal in ((1, True), (5, True), (5, False)):
        qn = q[:, :, T - Tq:]
        want = ref.attention(qn, causal=causal)
        got = dut.attention(torch.from_numpy(qn), causal=causal).numpy()
        tol = attention_tolerance(qn, keys, values, 1 / math.sqrt(D))
        assert np.abs(got - want).max() <= tol


def test_bfloat16_cache_stores_the_simulators_bytes():
    rng = np.random.default_rng(3)
    kt = torch.from_numpy(rng.standard_normal((1, 2, 20, 16)).astype(np.float32)).to(torch.bfloat16)
    vt = torch.from_numpy(rng.standard_normal((1, 2, 20, 16)).astype(np.float32)).to(torch.bfloat16)
    qt = torch.from_numpy(rng.standard_normal((1, 4, 20, 16)).astype(np.float32)).to(torch.bfloat16)
    cfg = MixKVQConfig(group_size=8, residual_length=8, budget=(2, 2), meta_dtype="bfloat16")
    ref = KVCache(cfg, backend="numpy")
    ref.append(kt.float().numpy(), vt.float().numpy(), qt.float().numpy())
    dut = KVCache(cfg, backend="torch")
    dut.append(kt, vt, qt)
    got, want = list(dut.arrays()), list(ref.arrays())
    assert len(got) == len(want)
    # quantized blocks, tier maps and the query statistics; the residuals differ in dtype on
    # purpose (torch keeps bfloat16, the NumPy reference was fed the exact float32 upcast)
    for a, b in zip(got[:-3], want[:-3], strict=True):
        _same(a, b)
    _same(got[-1], want[-1])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(4)
    x = torch.from_numpy((rng.standard_normal((4, 8, 100)) * 30).astype(np.float32))
    for bits in (1, 3, 4, 7):
        cpu = TB.quantize(x, bits, 32, "float16", "x")
        gpu = TB.quantize(x.cuda(), bits, 32, "float16", "x")
        for c, g in zip(cpu, gpu):
            assert g.device.type == "cuda"
            _same(g, TB.to_numpy(c))
        _same(TB.dequantize(*gpu, bits, 32, 100), TB.to_numpy(TB.dequantize(*cpu, bits, 32, 100)))


def test_bench_quick_smoke(capsys):
    from mixkvq.apps import bench

    rows = bench.run(quick=True, backends=("torch",), lengths=(256,), shapes=((1, 16, 2),))
    assert {r["op"] for r in rows} == {"quantize+pack", "unpack+dequantize", "flush", "decode"}
