"""Fuzzing the cache file format: whatever is done to a saved cache — flipped bytes, cut files,
hand-edited or rewritten headers, altered arrays, altered ZIP fields — loading either raises
:class:`CacheFileError` or returns a cache equal to the original (or, for a file rewritten
consistently with new checksums, a cache that works).

Bounded by the Hypothesis profile (tests/conftest.py: ``ci`` by default, ``thorough`` with
``MIXKVQ_HYPOTHESIS_PROFILE=thorough``); the whole file runs in well under a minute on ``ci``.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkvq import KVCache, MixKVQConfig
from mixkvq.io import CacheFileError, load_cache, save_cache
from test_io import _members_of, _rewrite


def _examples(factor: int) -> settings:
    """``factor`` times the loaded profile's examples (loads are ~1 ms: cheap)."""
    base = settings()
    return settings(base, max_examples=base.max_examples * factor, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


CONFIGS = {
    "budget": MixKVQConfig(residual_length=16, group_size=8),
    "threshold": MixKVQConfig(residual_length=16, group_size=8, tier_mode="threshold", thresholds=(0.6, 0.2),
                              meta_dtype="bfloat16"),
    "rd": MixKVQConfig(residual_length=16, group_size=8, tier_mode="rd", rd_bits=8.0, policy="key_only"),
    "kivi-sliding": MixKVQConfig(policy="uniform", low_bits=3, value_bits=3, residual_length=16, group_size=8,
                                 value_window="sliding"),
}


@lru_cache(maxsize=None)
def _saved(kind: str) -> bytes:
    """A small saved cache: two quantized blocks, a residual and pending query snapshots."""
    rng = np.random.default_rng(len(kind))
    B, H, D, T = 1, 2, 12, 40  # D = 12: packed value rows of 3 bits carry padding bits
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    q = rng.standard_normal((B, 2 * H, T, D)).astype(np.float32)
    cache = KVCache(CONFIGS[kind], backend="numpy")
    cache.append(k[:, :, :30], v[:, :, :30], queries=q[:, :, :30])
    cache.append(k[:, :, 30:], v[:, :, 30:])
    cache.observe_queries(q[:, :, 30:34])
    buf = Path(f"/tmp/mixkvq-fuzz-{kind}-{id(cache)}.mkvq")
    save_cache(cache, buf)
    try:
        return buf.read_bytes()
    finally:
        buf.unlink()


@lru_cache(maxsize=None)
def _reference(kind: str) -> tuple:
    return _fingerprint_bytes(_saved(kind))


def _fingerprint(cache: KVCache) -> tuple:
    return (json.dumps(cache.config.to_dict(), sort_keys=True), cache.seq_len, cache.n_quantized, cache.query_position, cache.shape,
            tuple(np.asarray(cache.backend.to_numpy(a)).tobytes() for a in cache.arrays()),
            tuple(str(np.asarray(cache.backend.to_numpy(a)).dtype) for a in cache.arrays()))


def _fingerprint_bytes(data: bytes) -> tuple:
    return _fingerprint(_load(data))


def _load(data: bytes) -> KVCache:
    p = _tmp() / "f.mkvq"
    p.write_bytes(data)
    return load_cache(p)


@lru_cache(maxsize=None)
def _tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mixkvq-fuzz-"))


def _load_or_error(data: bytes) -> "KVCache | None":
    """The loaded cache, or None for a CacheFileError; any other exception fails the test."""
    try:
        return _load(data)
    except CacheFileError:
        return None


def _usable(cache: KVCache) -> None:
    """A loaded cache works: it dequantizes to finite values, attends and round-trips."""
    keys, values = cache.dequantized()
    assert np.isfinite(np.asarray(keys)).all() and np.isfinite(np.asarray(values)).all()
    B, H, D = cache.shape
    q = np.ones((B, H * (cache.state.geometry.n_rep or 1), 1, D), np.float32)
    assert np.isfinite(np.asarray(cache.attention(q))).all()
    p = _tmp() / "again.mkvq"
    save_cache(cache, p)
    assert _fingerprint(load_cache(p)) == _fingerprint(cache)


KINDS = st.sampled_from(sorted(CONFIGS))


# -- byte-level damage ----------------------------------------------------------------------------------
@_examples(8)
@given(kind=KINDS, data=st.data())
def test_flipped_bytes_give_an_error_or_the_original(kind, data):
    raw = bytearray(_saved(kind))
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for pos, mask in flips:
        raw[pos] ^= mask
    cache = _load_or_error(bytes(raw))
    if cache is not None:
        assert _fingerprint(cache) == _reference(kind)


@_examples(4)
@given(kind=KINDS, data=st.data())
def test_truncated_or_extended_files_give_an_error_or_the_original(kind, data):
    raw = _saved(kind)
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=64))
    cache = _load_or_error(raw[:cut] + tail)
    if cache is not None:
        assert _fingerprint(cache) == _reference(kind)


def test_every_byte_position_flipped_once():
    """A deterministic sweep: every 7th byte of the file, flipped two ways."""
    raw = _saved("budget")
    loaded = errors = 0
    for pos in range(0, len(raw), 7):
        for mask in (0x01, 0xFF):
            d = bytearray(raw)
            d[pos] ^= mask
            cache = _load_or_error(bytes(d))
            if cache is None:
                errors += 1
            else:
                loaded += 1
                assert _fingerprint(cache) == _reference("budget"), (pos, mask)
    assert errors > 0.9 * (errors + loaded)  # only ZIP bookkeeping (timestamps, attributes) is unchecked


# -- ZIP structure ---------------------------------------------------------------------------------------
ZIP_FIELDS = {  # (signature, offset, struct format) of central-directory and local-header fields
    "cd.version": (b"PK\x01\x02", 4, "<H"), "cd.flags": (b"PK\x01\x02", 8, "<H"),
    "cd.method": (b"PK\x01\x02", 10, "<H"), "cd.crc": (b"PK\x01\x02", 16, "<I"),
    "cd.csize": (b"PK\x01\x02", 20, "<I"), "cd.usize": (b"PK\x01\x02", 24, "<I"),
    "cd.name_len": (b"PK\x01\x02", 28, "<H"), "cd.extra_len": (b"PK\x01\x02", 30, "<H"),
    "cd.offset": (b"PK\x01\x02", 42, "<I"), "lh.flags": (b"PK\x03\x04", 6, "<H"),
    "lh.method": (b"PK\x03\x04", 8, "<H"), "lh.crc": (b"PK\x03\x04", 14, "<I"),
    "lh.csize": (b"PK\x03\x04", 18, "<I"), "lh.usize": (b"PK\x03\x04", 22, "<I"),
    "lh.name_len": (b"PK\x03\x04", 26, "<H"), "lh.extra_len": (b"PK\x03\x04", 28, "<H"),
    "eocd.count": (b"PK\x05\x06", 10, "<H"), "eocd.cd_size": (b"PK\x05\x06", 12, "<I"),
    "eocd.cd_offset": (b"PK\x05\x06", 16, "<I"),
}


@_examples(8)
@given(kind=KINDS, field=st.sampled_from(sorted(ZIP_FIELDS)), data=st.data())
def test_crafted_zip_fields_give_an_error_or_the_original(kind, field, data):
    raw = bytearray(_saved(kind))
    sig, off, fmt = ZIP_FIELDS[field]
    starts = [i for i in range(len(raw)) if raw.startswith(sig, i)]
    at = data.draw(st.sampled_from(starts)) + off
    bits = 8 * struct.calcsize(fmt)
    value = data.draw(st.one_of(st.sampled_from([0, 1, 8, 12, 14, 99, 2**bits - 1]), st.integers(0, 2**bits - 1)))
    struct.pack_into(fmt, raw, at, value)
    cache = _load_or_error(bytes(raw))
    if cache is not None:
        assert _fingerprint(cache) == _reference(kind)


# -- headers ----------------------------------------------------------------------------------------------
def _leaves(x, path=()):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(x, list) and x:
        for i, v in enumerate(x):
            yield from _leaves(v, path + (i,))
    yield path


def _header_paths(kind: str) -> list:
    p = _tmp() / f"{kind}.src"
    p.write_bytes(_saved(kind))
    header, _ = _members_of(p)
    return sorted({path for path in _leaves(header) if path and path[0] != "digest"}, key=repr)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, 1, 2, 3, 4, 8, 16, 17, -1]),
              st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
              st.sampled_from(["float16", "bfloat16", "float32", "uint8", "int64", "numpy", "torch", "rd", "budget"])),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=6)


def _set_path(header, path, value) -> None:
    target = header
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value


_DELETE = object()


@_examples(6)
@given(kind=KINDS, data=st.data(), rehash=st.booleans())
def test_crafted_headers_give_an_error_or_a_working_cache(kind, data, rehash):
    """``rehash=False``: a hand edit (old checksums and digest) -> CacheFileError unless nothing
    changed. ``rehash=True``: a consistent rewrite that says something else -> CacheFileError
    or a cache that works (finite values, attention, round trip)."""
    paths = _header_paths(kind)
    path = data.draw(st.sampled_from(paths))
    value = data.draw(st.one_of(JSON_VALUES, st.just(_DELETE)))
    src, dst = _tmp() / f"{kind}.src", _tmp() / "crafted.mkvq"
    src.write_bytes(_saved(kind))
    _rewrite(src, dst, header_fn=lambda h: _set_path(h, path, value), rehash=rehash)
    cache = _load_or_error(dst.read_bytes())
    if cache is None:
        return
    if not rehash:
        assert _fingerprint(cache) == _reference(kind)
    else:
        _usable(cache)


@_examples(4)
@given(kind=KINDS, depth=st.integers(10, 20_000), where=st.sampled_from(["config", "counters", "meta", "arrays"]))
def test_deep_headers_are_errors(kind, depth, where):
    src, dst = _tmp() / f"{kind}.src", _tmp() / "deep.mkvq"
    src.write_bytes(_saved(kind))
    deep: object = []
    for _ in range(min(depth, 200)):  # json.dumps itself recurses: build deep text by hand below
        deep = [deep]

    def edit(h):
        h[where] = deep if depth <= 200 else "__DEEP__"

    header, arrays = _members_of(src)
    edit(header)
    text = json.dumps(header, sort_keys=True).replace('"__DEEP__"', "[" * depth + "]" * depth)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, arr in [("__header__", np.frombuffer(text.encode(), np.uint8))] + [(n, arrays[n][0]) for n in sorted(arrays)]:
            f = io.BytesIO()
            np.lib.format.write_array(f, arr)
            zf.writestr(name + ".npy", f.getvalue())
    dst.write_bytes(buf.getvalue())
    assert _load_or_error(dst.read_bytes()) is None


# -- arrays ----------------------------------------------------------------------------------------------
@_examples(8)
@given(kind=KINDS, data=st.data())
def test_altered_arrays_give_an_error_or_a_working_cache(kind, data):
    """Array values rewritten with fresh checksums (a consistent file holding other numbers):
    the payload checks reject what the cache would reject live; what loads must work."""
    src, dst = _tmp() / f"{kind}.src", _tmp() / "arrays.mkvq"
    src.write_bytes(_saved(kind))
    _, arrays = _members_of(src)
    name = data.draw(st.sampled_from(sorted(n for n, (a, _) in arrays.items() if a.size)))
    a, label = arrays[name]
    flat = np.array(a).reshape(-1)
    raw = flat.view(np.uint8)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, raw.size - 1))
        raw[i] = data.draw(st.one_of(st.integers(0, 255), st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x7C, 0xFC])))

    def edit(arr):
        arr[name] = (flat.reshape(a.shape), label)

    _rewrite(src, dst, arrays_fn=edit)
    cache = _load_or_error(dst.read_bytes())
    if cache is not None:
        _usable(cache)


@_examples(4)
@given(kind=KINDS, data=st.data())
def test_reshaped_or_retyped_arrays_are_errors(kind, data):
    src, dst = _tmp() / f"{kind}.src", _tmp() / "shape.mkvq"
    src.write_bytes(_saved(kind))
    _, arrays = _members_of(src)
    name = data.draw(st.sampled_from(sorted(arrays)))
    a, label = arrays[name]
    change = data.draw(st.sampled_from(["grow", "shrink", "retype", "relabel", "drop"]))

    def edit(arr):
        if change == "grow":
            arr[name] = (np.concatenate([a.reshape(-1), a.reshape(-1)[:1]]) if a.size else np.zeros(1, a.dtype), label)
        elif change == "shrink":
            arr[name] = (a.reshape(-1)[:-1] if a.size else a.reshape(-1), label)
        elif change == "retype":
            arr[name] = (a.astype(np.float64 if a.dtype != np.float64 else np.float32), label)
        elif change == "relabel":
            arr[name] = (a, "float64" if label != "float64" else "float32")
        else:
            del arr[name]

    _rewrite(src, dst, arrays_fn=edit)
    if change == "shrink" and a.size == 0:
        return
    assert _load_or_error(dst.read_bytes()) is None, (name, change)


def test_the_fixtures_round_trip():
    for kind in CONFIGS:
        _usable(_load(_saved(kind)))
        assert _load(_saved(kind)).n_quantized == 32


def test_the_0_1_file_survives_the_checks():
    """The checks accept what mixkvq 0.1 wrote (no digest, schema_version, every config field)."""
    old = load_cache(Path(__file__).parent / "data" / "cache_v0.1.mkvq")
    assert old.seq_len == 40
