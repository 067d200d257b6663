"""Save/load of quantized caches and captured tensors: round trips and rejected files."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from mixkvq import KVCache, MixKVQConfig
from mixkvq.io import CacheFileError, load_cache, load_tensors, save_cache, save_tensors

CONFIGS = [
    MixKVQConfig(residual_length=32, group_size=32),
    MixKVQConfig(residual_length=32, group_size=16, tier_mode="threshold", thresholds=(0.5, 0.1)),
    MixKVQConfig(policy="uniform", low_bits=4, value_bits=4, residual_length=32),
    MixKVQConfig(residual_length=32, value_window="sliding", meta_dtype="bfloat16"),
]


def _filled(cfg: MixKVQConfig, tokens: int = 80, seed: int = 0) -> KVCache:
    rng = np.random.default_rng(seed)
    B, H, D, Hq = 2, 2, 32, 4
    k = rng.standard_normal((B, H, tokens, D)).astype(np.float32)
    v = rng.standard_normal((B, H, tokens, D)).astype(np.float32)
    q = rng.standard_normal((B, Hq, tokens, D)).astype(np.float32)
    cache = KVCache(cfg, backend="numpy")
    cache.append(k[:, :, :50], v[:, :, :50], queries=q[:, :, :50])
    cache.append(k[:, :, 50:], v[:, :, 50:])
    cache.observe_queries(q[:, :, 50:70])  # the query stream lags: snapshots stay pending
    return cache


def _arrays(cache: KVCache) -> list[np.ndarray]:
    return [np.asarray(cache.backend.to_numpy(a)) for a in cache.arrays()]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["budget", "threshold", "kivi4", "sliding-bf16"])
def test_round_trip_is_byte_identical(tmp_path, cfg):
    cache = _filled(cfg)
    assert cache.n_quantized > 0
    p1, p2 = tmp_path / "a.mkvq", tmp_path / "b.mkvq"
    save_cache(cache, p1)
    loaded = load_cache(p1)
    a, b = _arrays(cache), _arrays(loaded)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert loaded.seq_len == cache.seq_len and loaded.nbytes == cache.nbytes
    assert loaded.config == cache.config
    save_cache(loaded, p2)
    assert p1.read_bytes() == p2.read_bytes()
    # the loaded cache keeps streaming exactly like the original
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 2, 40, 32)).astype(np.float32)
    q = rng.standard_normal((2, 4, 10, 32)).astype(np.float32)
    for c in (cache, loaded):
        c.observe_queries(q)
        c.append(k, k, queries=None)
    for x, y in zip(_arrays(cache), _arrays(loaded)):
        assert x.tobytes() == y.tobytes()


def test_empty_cache_round_trip(tmp_path):
    cache = KVCache(MixKVQConfig(), backend="numpy")
    save_cache(cache, tmp_path / "e")
    assert load_cache(tmp_path / "e").seq_len == 0


def test_truncated_file_is_rejected(tmp_path):
    p = tmp_path / "c"
    save_cache(_filled(CONFIGS[0]), p)
    data = p.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):
        (tmp_path / "t").write_bytes(data[:cut])
        with pytest.raises(CacheFileError):
            load_cache(tmp_path / "t")


def test_corrupted_member_is_rejected(tmp_path):
    p = tmp_path / "c"
    save_cache(_filled(CONFIGS[0]), p)
    data = bytearray(p.read_bytes())
    with zipfile.ZipFile(p) as zf:
        info = zf.getinfo("k0.t2.packed.npy")
    pos = info.header_offset + 30 + len(info.filename) + 128 + 3  # inside the array data
    data[pos] ^= 0xFF
    (tmp_path / "x").write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum|unreadable|corrupt"):
        load_cache(tmp_path / "x")


def test_wrong_version_kind_and_config_are_rejected(tmp_path):
    import json

    import mixkvq.io as mio

    cache = _filled(CONFIGS[0])
    p = tmp_path / "c"
    save_cache(cache, p)
    with pytest.raises(CacheFileError, match="different config"):
        load_cache(p, config=CONFIGS[0].replace(low_bits=3))
    with pytest.raises(CacheFileError, match="expected 'mixkvq.tensors'"):
        load_tensors(p)
    old = mio.FORMAT_VERSION
    try:
        mio.FORMAT_VERSION = 99
        save_cache(cache, tmp_path / "v99")
    finally:
        mio.FORMAT_VERSION = old
    with pytest.raises(CacheFileError, match="format version 99"):
        load_cache(tmp_path / "v99")
    (tmp_path / "junk").write_text("not a cache")
    with pytest.raises(CacheFileError, match="not a mixkvq file"):
        load_cache(tmp_path / "junk")
    with pytest.raises(FileNotFoundError):
        load_cache(tmp_path / "missing")


def test_inconsistent_shapes_are_rejected(tmp_path, monkeypatch):
    import mixkvq.io as mio

    cache = _filled(CONFIGS[0])
    p = tmp_path / "c"
    real = mio._write

    def tamper(path, header, arrays):
        header = dict(header)
        header["counters"] = dict(header["counters"], n_tokens=header["counters"]["n_tokens"] + 1)
        real(path, header, arrays)

    monkeypatch.setattr(mio, "_write", tamper)
    save_cache(cache, p)
    monkeypatch.setattr(mio, "_write", real)
    with pytest.raises(CacheFileError, match="inconsistent"):
        load_cache(p)


def test_tensors_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    t = {"q": torch.randn(1, 9, 5, 8), "k": torch.randn(1, 3, 5, 8).to(torch.bfloat16), "n": np.arange(4)}
    save_tensors(tmp_path / "t", t, meta={"layer": 3})
    back, meta = load_tensors(tmp_path / "t")
    assert meta == {"layer": 3}
    assert torch.equal(back["q"], t["q"]) and back["k"].dtype == torch.bfloat16 and torch.equal(back["k"], t["k"])
    assert back["n"].tolist() == [0, 1, 2, 3]
    save_tensors(tmp_path / "t2", back, meta={"layer": 3})
    assert (tmp_path / "t").read_bytes() == (tmp_path / "t2").read_bytes()


def test_a_file_written_by_version_0_1_loads_and_continues(tmp_path):
    """tests/data/cache_v0.1.mkvq was saved by mixkvq 0.1 (``schema_version`` header, a config
    with every field and ``backend``). It must load, equal a fresh cache fed the same stream
    (tests/data/cache_v0.1_inputs.npz: 30 tokens with queries, 10 without, 5 lagging queries),
    and keep streaming."""
    from pathlib import Path

    data = Path(__file__).parent / "data"
    old = load_cache(data / "cache_v0.1.mkvq")
    x = np.load(data / "cache_v0.1_inputs.npz")
    fresh = KVCache(old.config, backend="numpy")
    fresh.append(x["k"][:, :, :30], x["v"][:, :, :30], queries=x["q"][:, :, :30])
    fresh.append(x["k"][:, :, 30:], x["v"][:, :, 30:])
    fresh.observe_queries(x["q"][:, :, 30:35])
    assert (old.seq_len, old.n_quantized, old.query_position, old.nbytes) == (40, 32, 35, 3088)
    assert (fresh.n_quantized, fresh.query_position, fresh.nbytes) == (old.n_quantized, old.query_position, old.nbytes)
    for a, b in zip(old.dequantized(), fresh.dequantized()):
        assert np.array_equal(a, b)
    q = x["q"][:, :, -1:]
    assert np.array_equal(old.attention(q), fresh.attention(q))
    save_cache(old, tmp_path / "new.mkvq")  # re-saved in the current format, it round-trips
    again = load_cache(tmp_path / "new.mkvq")
    assert again.nbytes == old.nbytes and np.array_equal(again.dequantized()[0], old.dequantized()[0])
