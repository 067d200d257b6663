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


# -- hardened reading: every failure is a CacheFileError -------------------------------------------
import io as _io
import json as _json
import struct as _struct


def _members_of(path) -> tuple[dict, dict]:
    """(header, {name: (array, label)}) of a saved file, read with plain zipfile/numpy."""
    with zipfile.ZipFile(path) as zf:
        raw = {n[:-4]: np.lib.format.read_array(_io.BytesIO(zf.read(n))) for n in zf.namelist()}
    header = _json.loads(raw.pop("__header__").tobytes())
    return header, {n: (a, header["arrays"][n]["dtype"]) for n, a in raw.items()}


def _rewrite(src, dst, *, header_fn=None, arrays_fn=None, rehash: bool = True) -> None:
    """Rewrite ``src`` as ``dst`` after ``header_fn(header)`` / ``arrays_fn(arrays)`` edit it in
    place. ``rehash``: recompute the array checksums and header digest (a consistent file
    that merely says something else); else keep them (a hand-edited file)."""
    import mixkvq.io as mio

    header, arrays = _members_of(src)
    if arrays_fn is not None:
        arrays_fn(arrays)
    if header_fn is not None:
        header_fn(header)
    if rehash:
        header.pop("arrays", None)
        mio._write(dst, header, arrays)
        return
    _zip(dst, [("__header__", np.frombuffer(_json.dumps(header, sort_keys=True).encode(), np.uint8))]
         + [(n, arrays[n][0]) for n in sorted(arrays)])


def _zip(dst, members, *, compression=zipfile.ZIP_STORED) -> None:
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, arr in members:
            data = _io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compression
            zf.writestr(info, data.getvalue())
    with open(dst, "wb") as f:
        f.write(buf.getvalue())


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "c.mkvq"
    save_cache(_filled(CONFIGS[0]), p)
    return p


def test_only_stored_members_are_accepted(tmp_path, saved):
    header, arrays = _members_of(saved)
    members = [("__header__", np.frombuffer(_json.dumps(header, sort_keys=True).encode(), np.uint8))] + \
        [(n, arrays[n][0]) for n in sorted(arrays)]
    for method in (zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        _zip(tmp_path / "z", members, compression=method)
        with pytest.raises(CacheFileError, match="compression method"):
            load_cache(tmp_path / "z")
    # a method number zipfile does not know (a flipped byte) is a CacheFileError, not NotImplementedError
    data = bytearray(saved.read_bytes())
    cd = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
    data[cd + 10] = 99
    (tmp_path / "m").write_bytes(bytes(data))
    with pytest.raises(CacheFileError):
        load_cache(tmp_path / "m")


def test_encrypted_flag_is_a_cache_file_error(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    for sig, at in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):  # central directory / local header flag bits
        d = bytearray(data)
        i = d.find(sig)
        d[i + at] |= 0x1
        (tmp_path / "e").write_bytes(bytes(d))
        with pytest.raises(CacheFileError, match="encrypted|local header"):
            load_cache(tmp_path / "e")


def test_declared_sizes_are_checked_before_reading(tmp_path, saved):
    data = bytearray(saved.read_bytes())
    cd = data.find(b"PK\x01\x02")
    for field in (20, 24):  # compressed / uncompressed size of the first member
        d = bytearray(data)
        _struct.pack_into("<I", d, cd + field, 0xFFFFFFF0)
        (tmp_path / "s").write_bytes(bytes(d))
        with pytest.raises(CacheFileError):
            load_cache(tmp_path / "s")


def test_huge_declared_array_shape_is_not_allocated(tmp_path, saved):
    header, arrays = _members_of(saved)
    qsum = arrays["qsum"][0]
    f = _io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (2**40, 2**40, 1)})
    huge = f.getvalue() + qsum.tobytes()  # declares 2^80 elements, holds a few
    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("__header__.npy", _npy(np.frombuffer(_json.dumps(header, sort_keys=True).encode(), np.uint8)))
        for n in sorted(arrays):
            zf.writestr(n + ".npy", huge if n == "qsum" else _npy(arrays[n][0]))
    (tmp_path / "h").write_bytes(buf.getvalue())
    with pytest.raises(CacheFileError, match="declares shape"):
        load_cache(tmp_path / "h")
    # a header that declares huge shapes/counters (consistent checksums) is rejected too
    for edit in (lambda h: h.update(shape=[2**40, 2**40, 2**40]),
                 lambda h: h["counters"].update(n_tokens=10**30),
                 lambda h: h["arrays"]["qsum"].update(shape=[2**62, 2**62])):
        _rewrite(saved, tmp_path / "h2", header_fn=edit, rehash=False)
        with pytest.raises(CacheFileError):
            load_cache(tmp_path / "h2")


def _npy(a: np.ndarray) -> bytes:
    f = _io.BytesIO()
    np.lib.format.write_array(f, a, allow_pickle=False)
    return f.getvalue()


def test_deeply_nested_header_is_a_cache_file_error(tmp_path, saved):
    for depth in (100, 100_000):
        deep = "[" * depth + "]" * depth
        blob = ('{"format": "mixkvq.kvcache", "format_version": 1, "x": ' + deep + "}").encode()
        _zip(tmp_path / "d", [("__header__", np.frombuffer(blob, np.uint8))])
        with pytest.raises(CacheFileError, match="nested|corrupted"):
            load_cache(tmp_path / "d")


def test_edited_header_fields_are_caught(tmp_path, saved):
    """A hand-edited header (valid ZIP CRCs, old digest) is caught by the digest; a consistent
    rewrite that contradicts the arrays is caught by the consistency checks."""
    edits = {
        "high_dtype": lambda h: h["config"].update(high_dtype="float16"),
        "q_count": lambda h: h["counters"].update(q_count=h["counters"]["q_count"] + 1),
        "n_rep": lambda h: h.update(n_rep=3),
        "dtype": lambda h: h.update(dtype="float16"),
    }
    for name, edit in edits.items():
        _rewrite(saved, tmp_path / name, header_fn=edit, rehash=False)
        with pytest.raises(CacheFileError, match="digest"):
            load_cache(tmp_path / name)
    # consistent files that contradict their arrays
    for name, edit in {"dtype": edits["dtype"], "q_count_low": lambda h: h["counters"].update(q_count=0),
                       "n_rep_null": lambda h: h.update(n_rep=None),
                       "value_bits": lambda h: h["value_rows"][0].update(bits=3)}.items():
        _rewrite(saved, tmp_path / name, header_fn=edit)
        with pytest.raises(CacheFileError):
            load_cache(tmp_path / name)


def test_a_file_without_digest_still_loads(tmp_path, saved):
    _rewrite(saved, tmp_path / "nd", header_fn=lambda h: h.pop("digest"), rehash=False)
    assert load_cache(tmp_path / "nd").seq_len == load_cache(saved).seq_len


def _set(name, fn):
    def edit(arrays):
        a, label = arrays[name]
        a = np.array(a)
        fn(a)
        arrays[name] = (a, label)
    return edit


@pytest.mark.parametrize("name,fn,match", [
    ("k0.t2.scale", lambda a: a.flat.__setitem__(0, np.inf), "non-finite scales"),
    ("k0.t2.zero", lambda a: a.flat.__setitem__(0, np.nan), "non-finite scales"),
    ("k0.t2.scale", lambda a: a.flat.__setitem__(0, -1.0), "negative scales"),
    ("v0.scale", lambda a: a.flat.__setitem__(0, np.nan), "non-finite"),
    ("residual_keys", lambda a: a.flat.__setitem__(3, np.nan), "residual_keys holds non-finite"),
    ("residual_values", lambda a: a.flat.__setitem__(3, -np.inf), "residual_values holds non-finite"),
    ("k0.tier_map", lambda a: a.flat.__setitem__(0, 5), "tier map"),
    ("k0.t16.packed", lambda a: a.flat.__setitem__(1, 0x7F) or a.flat.__setitem__(0, 0xC0), "16-bit"),
    ("qsum", lambda a: a.flat.__setitem__(0, -1), "qsum"),
])
def test_payload_is_validated_like_live_input(tmp_path, saved, name, fn, match):
    _rewrite(saved, tmp_path / "p", arrays_fn=_set(name, fn))
    with pytest.raises(CacheFileError, match=match):
        load_cache(tmp_path / "p")


def test_budget_counts_and_padding_are_checked(tmp_path):
    cfg = MixKVQConfig(residual_length=32, group_size=16)
    p = tmp_path / "c"
    save_cache(_filled(cfg), p)
    header, arrays = _members_of(p)
    tm = arrays["k0.tier_map"][0]
    swap = np.array(tm)
    i, j = np.argwhere(swap[0, 0] == 16)[0][0], np.argwhere(swap[0, 0] == 2)[0][0]
    swap[0, 0, i], swap[0, 0, j] = 2, 16  # same counts per width overall: the shapes still agree
    _rewrite(p, tmp_path / "t", arrays_fn=lambda a: a.update({"k0.tier_map": (swap, "uint8")}))
    load_cache(tmp_path / "t")  # a legal (if different) tier map
    bad = np.array(tm)
    bad[0, 0, i] = 2
    bad[0, 1, np.argwhere(bad[0, 1] == 2)[0][0]] = 16  # per-head counts break, totals stay
    _rewrite(p, tmp_path / "b", arrays_fn=lambda a: a.update({"k0.tier_map": (bad, "uint8")}))
    with pytest.raises(CacheFileError, match="budget"):
        load_cache(tmp_path / "b")


def test_unlisted_or_mislabelled_members_are_rejected(tmp_path, saved):
    header, arrays = _members_of(saved)
    members = [("__header__", np.frombuffer(_json.dumps(header, sort_keys=True).encode(), np.uint8))] + \
        [(n, arrays[n][0]) for n in sorted(arrays)] + [("extra", np.zeros(3))]
    _zip(tmp_path / "x", members)
    with pytest.raises(CacheFileError, match="not listed"):
        load_cache(tmp_path / "x")
    _rewrite(saved, tmp_path / "l", arrays_fn=lambda a: a.update(qsum=(a["qsum"][0], "float64")))
    with pytest.raises(CacheFileError, match="labelled"):
        load_cache(tmp_path / "l")


def test_load_tensors_checks_stored_dtype_against_label(tmp_path):
    save_tensors(tmp_path / "t", {"a": np.arange(6, dtype=np.int32), "b": np.ones(3, np.float32)})
    _rewrite(tmp_path / "t", tmp_path / "u", arrays_fn=lambda a: a.update(a=(a["a"][0], "float32")))
    with pytest.raises(CacheFileError, match="labelled 'float32' but stores int32"):
        load_tensors(tmp_path / "u", as_torch=False)
    _rewrite(tmp_path / "t", tmp_path / "v", arrays_fn=lambda a: a.update(b=(a["b"][0], "bfloat16")))
    with pytest.raises(CacheFileError, match="labelled 'bfloat16'"):
        load_tensors(tmp_path / "v", as_torch=False)
    back, _ = load_tensors(tmp_path / "t", as_torch=False)
    assert back["a"].dtype == np.int32 and back["a"].tolist() == list(range(6))


def test_limits_are_documented_constants():
    import mixkvq.io as mio

    assert mio.MAX_MEMBER_BYTES >= 2**30 and mio.MAX_HEADER_BYTES >= 2**20 and mio.MAX_JSON_DEPTH >= 16


def test_save_tensors_refuses_meta_that_load_would_refuse(tmp_path):
    meta: dict = {}
    node = meta
    for _ in range(80):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(ValueError, match="nested deeper"):
        save_tensors(tmp_path / "t", {"a": np.zeros(2)}, meta=meta)
