"""Swapping backends by configuration: same script, same bytes; arrays come back as passed in."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import mixkvq  # noqa: E402
from mixkvq import KVCache, MixKVQConfig  # noqa: E402
from mixkvq.backend import get_backend  # noqa: E402


def _stream(seed=0, B=1, H=2, n_rep=3, T=75, D=16):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k[..., 3] *= 40.0  # an outlier channel
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float32)
    return k, v, q


def _script(backend, k, v, q, as_torch=False):
    """The user's script: only the backend name changes."""
    cfg = MixKVQConfig(group_size=8, residual_length=16, budget=(2, 4), meta_dtype="bfloat16")
    cache = KVCache(cfg, backend=backend)
    conv = (lambda a: torch.from_numpy(a)) if as_torch else (lambda a: a)
    for a, b in ((0, 20), (20, 21), (21, 75)):
        cache.append(conv(k[:, :, a:b]), conv(v[:, :, a:b]), queries=conv(q[:, :, a:b]))
    out = cache.attention(conv(q[:, :, -1:]))
    qt = mixkvq.quantize(conv(k), bits=3, group_size=8, axis=2, meta_dtype="bfloat16", backend=backend)
    return cache, out, qt


def _stored_bytes(cache):
    be = cache.backend
    return [np.ascontiguousarray(be.to_numpy(a)).tobytes() for a in cache.arrays()]


def _np(a):
    return get_backend("torch").to_numpy(a) if isinstance(a, torch.Tensor) else np.asarray(a)


def test_numpy_and_torch_scripts_store_identical_bytes():
    k, v, q = _stream()
    c_np, out_np, qt_np = _script("numpy", k, v, q)
    c_t, out_t, qt_t = _script("torch", k, v, q)
    assert c_np.n_quantized == c_t.n_quantized == 64
    assert _stored_bytes(c_np) == _stored_bytes(c_t)
    for what in ("packed", "scale", "zero"):
        assert _np(getattr(qt_np, what)).tobytes() == _np(getattr(qt_t, what)).tobytes()
    np.testing.assert_allclose(_np(out_t), _np(out_np), rtol=0, atol=1e-5)


def test_env_var_selects_the_backend(monkeypatch):
    k, v, q = _stream(seed=1)
    monkeypatch.setenv("MIXKVQ_BACKEND", "torch")
    c_env, _, _ = _script(None, k, v, q)
    assert c_env.backend.name == "torch"
    monkeypatch.setenv("MIXKVQ_BACKEND", "numpy")
    c_np, _, _ = _script(None, k, v, q)
    assert c_np.backend.name == "numpy"
    assert _stored_bytes(c_env) == _stored_bytes(c_np)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_numpy_in_numpy_out(backend):
    k, v, q = _stream(seed=2)
    _, out, qt = _script(backend, k, v, q)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert all(isinstance(a, np.ndarray) for a in (qt.packed, qt.scale, qt.zero))
    assert qt.scale.dtype == np.uint16  # bfloat16 metadata as the simulator's bit patterns
    y = mixkvq.dequantize(qt, backend=backend)
    assert isinstance(y, np.ndarray)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_torch_in_torch_out(backend):
    k, v, q = _stream(seed=3)
    _, out, qt = _script(backend, k, v, q, as_torch=True)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.device == torch.device("cpu")
    assert all(isinstance(a, torch.Tensor) for a in (qt.packed, qt.scale, qt.zero))
    assert qt.scale.dtype == torch.bfloat16  # the same bits as the simulator's uint16
    y = mixkvq.dequantize(qt, backend=backend)
    assert isinstance(y, torch.Tensor)


def test_convert_like_keeps_bfloat16_bits():
    x = torch.tensor([1.0, -2.5, 3e-40], dtype=torch.float32).to(torch.bfloat16)
    back = mixkvq.backend.convert_like(x, np.zeros(1), get_backend("torch"))
    assert back.dtype == np.uint16
    assert back.tobytes() == x.view(torch.int16).numpy().tobytes()
    again = mixkvq.backend.convert_like(back, x, get_backend("numpy"))
    assert again.dtype == torch.bfloat16 and torch.equal(again.view(torch.int16), x.view(torch.int16))
