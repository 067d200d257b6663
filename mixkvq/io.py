"""Saving and loading quantized caches and captured tensors (versioned, checked).

File format (``mixkvq.FORMAT_VERSION``, 1; docs/file-format.md): a ZIP archive of ``.npy``
members (the NumPy ``.npz`` layout, readable with ``numpy.load``) written deterministically —
fixed member order and timestamps, no compression — so saving the same cache twice gives the
same bytes. Member ``__header__.npy`` is a uint8 array holding UTF-8 JSON:

* ``format``: ``"mixkvq.kvcache"`` or ``"mixkvq.tensors"``; ``format_version`` (files of
  mixkvq 0.1 call it ``schema_version``; both are read);
* for caches: the config (``MixKVQConfig.to_dict``), counters (tokens, query position,
  query count), ``(batch, heads, head_dim)``, input dtype, ``n_rep``, the block / value
  chunk structure and the snapshot token counts;
* ``arrays``: for every member, its dtype name as stored by the backend (bfloat16 arrays
  are stored as their uint16 bit pattern), shape and SHA-256 of its bytes;
* ``digest``: SHA-256 of the rest of the header (canonical JSON), so together with the
  per-array checksums it covers header and arrays (files written before it existed have no
  digest and still load).

Loading checks everything before building anything, and never inflates, allocates or parses
more than the file holds: the container (stored members only, no encryption, declared sizes
within the file and :data:`MAX_MEMBER_BYTES`, CRC-32 of every member), the header (size,
nesting depth, every field's type and range), the format and version, every member's ``.npy``
header (plain little-endian dtypes, declared size = its bytes) against the recorded dtype,
shape and checksum, the arrays against the config and the counters (tier rows per width,
packed row lengths, group counts, token totals), and the payload as the cache checks live
input (finite residuals, finite non-negative scales, finite zeros, 16-bit channels finite,
tier maps of the config's widths and budget counts, zero padding bits, query statistics
within their bounds). Any failure raises :class:`CacheFileError` (a ValueError) that says
what is wrong; nothing half-loaded is returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .backend import array_kind, get_backend
from .cache import KVCache
from .config import MixKVQConfig
from .dtypes import dtype_name
from .format import FIXED_MAX, FORMAT_VERSION, HIGH_BITS, INPUT_DTYPES, row_bytes
from .state import StateError, from_arrays, to_arrays

CACHE_FORMAT = "mixkvq.kvcache"
TENSORS_FORMAT = "mixkvq.tensors"
_HEADER = "__header__"
_DATE = (1980, 1, 1, 0, 0, 0)

#: Limits a file must respect (anything beyond is rejected before it is read or allocated).
#: Largest member (one array's ``.npy`` bytes): 64 GiB; and no member may declare more bytes
#: than the file holds.
MAX_MEMBER_BYTES = 2**36
#: Largest ``__header__`` member (JSON): 64 MiB.
MAX_HEADER_BYTES = 2**26
#: Most members in one file.
MAX_MEMBERS = 1 << 20
#: Deepest nesting of the header JSON (configs and ``meta`` included).
MAX_JSON_DEPTH = 64
#: Largest counter (tokens, query position, query count) and dimension accepted.
MAX_COUNT = 2**48
MAX_DIM = 2**31
#: Array dtypes a member may hold (``.npy`` descr strings: little-endian or byte-sized).
_NPY_DTYPES = {"|b1": "bool", "|i1": "int8", "<i2": "int16", "<i4": "int32", "<i8": "int64", "|u1": "uint8",
               "<u2": "uint16", "<u4": "uint32", "<u8": "uint64", "<f2": "float16", "<f4": "float32",
               "<f8": "float64", "<c8": "complex64", "<c16": "complex128"}
_SHA = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,200}")
_ZIP_FLAGS_OK = 0x800  # UTF-8 names; anything else (encryption, data descriptors, ...) mixkvq never writes


class CacheFileError(ValueError):
    """A cache or tensor file is truncated, corrupted, of another version or inconsistent."""


# -- low level: deterministic npz ------------------------------------------------------------------
def _np(backend: Any, a: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous NumPy copy of ``a`` (bfloat16 as its uint16 bits) and its dtype name;
    ``backend=None`` converts through the backend of ``a``'s own array kind."""
    name = dtype_name(a)
    backend = backend if backend is not None else get_backend(array_kind(a))
    return np.ascontiguousarray(backend.to_numpy(a)), name


def _canonical(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True).encode("utf-8")


def _write(path: "str | Path", header: dict[str, Any], arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    header = dict(header)
    header.pop("digest", None)
    header["arrays"] = {k: {"dtype": d, "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                        for k, (a, d) in arrays.items()}
    header["digest"] = hashlib.sha256(_canonical(header)).hexdigest()
    blob = np.frombuffer(_canonical(header), dtype=np.uint8)
    members = [(_HEADER, blob)] + [(k, arrays[k][0]) for k in sorted(arrays)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in members:
            info = zipfile.ZipInfo(name + ".npy", date_time=_DATE)
            info.external_attr = 0o644 << 16
            data = io.BytesIO()
            np.lib.format.write_array(data, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, data.getvalue())
    tmp = Path(str(path) + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # ZIP local file header (30 bytes)


def _members(p: Path, data: bytes) -> dict[str, memoryview]:
    """The stored members of ZIP bytes ``data`` by name (without ``.npy``), each checked: stored
    (uncompressed), not encrypted, within the file, no overlaps, CRC-32 as recorded."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except Exception as exc:  # noqa: BLE001 - zipfile raises many kinds on a damaged directory
        raise CacheFileError(f"{p} is not a mixkvq file (truncated or not a ZIP/npz archive: {exc})") from None
    size = len(data)
    if len(infos) > MAX_MEMBERS:
        raise CacheFileError(f"{p} has {len(infos)} members; a mixkvq file holds at most {MAX_MEMBERS}")
    for info in infos:  # what mixkvq never writes, before any size is trusted
        if info.compress_type != zipfile.ZIP_STORED:
            raise CacheFileError(f"{p}: member {info.filename[:80]!r} uses ZIP compression method {info.compress_type}; "
                                 "mixkvq files store members uncompressed (method 0) — re-save it with "
                                 "mixkvq.save_cache")
        if info.flag_bits & ~_ZIP_FLAGS_OK:
            what = "is encrypted" if info.flag_bits & 0x1 else f"has ZIP flags {info.flag_bits:#x}"
            raise CacheFileError(f"{p}: member {info.filename[:80]!r} {what}; mixkvq files are plain stored ZIP archives")
    total = sum(i.file_size for i in infos)
    if total > size:
        raise CacheFileError(f"{p}: its members declare {total} bytes but the file holds {size} (corrupted file)")
    out: dict[str, memoryview] = {}
    view = memoryview(data)
    spans = []
    for info in infos:
        fname = info.filename
        if not fname.endswith(".npy") or not _NAME.fullmatch(fname[:-4]):
            raise CacheFileError(f"{p}: unexpected member {fname!r} (corrupted file or not a mixkvq file)")
        name = fname[:-4]
        if name in out:
            raise CacheFileError(f"{p}: member {name!r} appears twice (corrupted file)")
        if info.file_size != info.compress_size or info.file_size > MAX_MEMBER_BYTES or info.file_size > size:
            raise CacheFileError(f"{p}: member {name!r} declares {info.file_size} bytes ({info.compress_size} stored); "
                                 f"the limit is the file's size ({size}) and {MAX_MEMBER_BYTES} (corrupted file)")
        off = info.header_offset
        if off < 0 or off + _LOCAL.size > size:
            raise CacheFileError(f"{p}: member {name!r} lies outside the file (truncated file?)")
        sig, _, flags, method, _, _, crc, csize, usize, nlen, elen = _LOCAL.unpack_from(data, off)
        start = off + _LOCAL.size + nlen + elen
        local_name = bytes(view[off + _LOCAL.size: off + _LOCAL.size + nlen])
        if (sig != b"PK\x03\x04" or method != zipfile.ZIP_STORED or flags & ~_ZIP_FLAGS_OK
                or local_name != fname.encode("utf-8") or crc != info.CRC
                or (csize != 0xFFFFFFFF and (csize, usize) != (info.compress_size, info.file_size))):
            raise CacheFileError(f"{p}: the local header of member {name!r} does not match the archive directory "
                                 "(corrupted file)")
        end = start + info.file_size
        if end > size:
            raise CacheFileError(f"{p}: member {name!r} runs past the end of the file (truncated file?)")
        body = view[start:end]
        if zlib.crc32(body) & 0xFFFFFFFF != info.CRC:
            raise CacheFileError(f"{p}: member {name!r} fails its CRC-32 check (corrupted file)")
        spans.append((off, end, name))
        out[name] = body
    spans.sort()
    for (_, e0, a), (s1, _, b) in zip(spans, spans[1:]):
        if s1 < e0:
            raise CacheFileError(f"{p}: members {a!r} and {b!r} overlap (corrupted file)")
    return out


def _parse_npy(p: Path, name: str, body: memoryview) -> np.ndarray:
    """A read-only array over ``body`` (a ``.npy`` member) after checking its header: version
    1.0/2.0, a dtype of :data:`_NPY_DTYPES`, C order, and exactly as many data bytes as the
    declared shape needs (nothing is allocated from the declared shape)."""
    try:
        f = io.BytesIO(body)
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
        offset = f.tell()
    except Exception as exc:  # noqa: BLE001 - numpy raises ValueError, SyntaxError, ... on a bad header
        raise CacheFileError(f"{p}: member {name!r} is unreadable ({type(exc).__name__}: {exc}; corrupted or "
                             "truncated file)") from None
    descr = dtype.str if not dtype.fields and not dtype.subdtype else None
    if descr not in _NPY_DTYPES:
        raise CacheFileError(f"{p}: member {name!r} has dtype {dtype!r}; mixkvq files hold little-endian numbers "
                             f"({', '.join(sorted(set(_NPY_DTYPES.values())))})")
    if fortran or not isinstance(shape, tuple) or len(shape) > 8 or any(
            not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in shape):
        raise CacheFileError(f"{p}: member {name!r} has an invalid layout (shape {shape!r}, fortran_order {fortran})")
    count = math.prod(shape)
    if count * dtype.itemsize != len(body) - offset:
        raise CacheFileError(f"{p}: member {name!r} declares shape {shape} ({count * dtype.itemsize} bytes) but holds "
                             f"{len(body) - offset} (corrupted or truncated file)")
    return np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)


def _parse_json(p: Path, raw: bytes) -> Any:
    def pairs(items: list) -> dict:
        d = dict(items)
        if len(d) != len(items):
            raise ValueError("duplicate keys")
        return d

    def constant(c: str) -> Any:
        raise ValueError(f"non-finite number {c}")

    try:
        text = raw.decode("utf-8")
        header = json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        msg = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:200]
        raise CacheFileError(f"{p}: the header is corrupted ({msg})") from None
    if _depth(header) > MAX_JSON_DEPTH:
        raise CacheFileError(f"{p}: the header is nested deeper than {MAX_JSON_DEPTH} levels (corrupted file)")
    return header


def _depth(x: Any) -> int:
    depth, level = 0, [x]
    while level:
        depth += 1
        if depth > MAX_JSON_DEPTH:
            return depth
        level = [v for c in level if isinstance(c, (dict, list)) for v in (c.values() if isinstance(c, dict) else c)]
    return depth


def _read(path: "str | Path", expect_format: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CacheFileError(f"{p} cannot be read ({exc})") from None
    members = _members(p, data)
    if _HEADER not in members:
        raise CacheFileError(f"{p} has no {_HEADER} member: not a mixkvq file")
    if len(members[_HEADER]) > MAX_HEADER_BYTES:
        raise CacheFileError(f"{p}: the header member holds {len(members[_HEADER])} bytes; the limit is {MAX_HEADER_BYTES}")
    blob = _parse_npy(p, _HEADER, members[_HEADER])
    if blob.dtype != np.uint8 or blob.ndim != 1:
        raise CacheFileError(f"{p}: the header member is not a uint8 vector (corrupted file)")
    header = _parse_json(p, blob.tobytes())
    if not isinstance(header, dict) or header.get("format") != expect_format:
        found = header.get("format") if isinstance(header, dict) else "?"
        raise CacheFileError(f"{p} holds {str(found)[:80]!r}, expected {expect_format!r}")
    version = header.get("format_version", header.get("schema_version"))  # files of 0.1 say schema_version
    if type(version) is not int or version != FORMAT_VERSION:
        raise CacheFileError(f"{p} has format version {str(version)[:40]}; this mixkvq reads version {FORMAT_VERSION} "
                             "(re-save it with the mixkvq version that wrote it, or upgrade)")
    if "digest" in header:
        digest = header.pop("digest")
        if not isinstance(digest, str) or hashlib.sha256(_canonical(header)).hexdigest() != digest:
            raise CacheFileError(f"{p}: the header does not match its digest (corrupted or edited file)")
    specs = header.get("arrays")
    if not isinstance(specs, dict):
        raise CacheFileError(f"{p}: the header lists no arrays")
    extra = sorted(set(members) - set(specs) - {_HEADER})
    if extra:
        raise CacheFileError(f"{p}: members {extra[:5]} are not listed in the header (corrupted file)")
    arrays = {}
    for name, spec in specs.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "sha256"} or not isinstance(spec["dtype"], str) \
                or not isinstance(spec["shape"], list) or not isinstance(spec["sha256"], str) \
                or not _SHA.fullmatch(spec["sha256"]):
            raise CacheFileError(f"{p}: the header's entry for member {str(name)[:80]!r} is malformed")
        if name not in members:
            raise CacheFileError(f"{p}: member {str(name)[:80]!r} is missing (truncated file?)")
        a = _parse_npy(p, name, members[name])
        if list(a.shape) != spec["shape"] or hashlib.sha256(a.data if a.size else b"").hexdigest() != spec["sha256"]:
            raise CacheFileError(f"{p}: member {name!r} does not match its recorded shape/checksum (corrupted file)")
        label, stored = spec["dtype"], a.dtype.name
        if not (label == stored or (label == "bfloat16" and stored == "uint16")):
            raise CacheFileError(f"{p}: member {name!r} is labelled {label[:40]!r} but stores {stored} "
                                 "(corrupted or edited file)")
        arrays[name] = a
    return header, arrays


# -- tensors ----------------------------------------------------------------------------------------
def save_tensors(path: "str | Path", tensors: dict[str, Any], *, meta: dict[str, Any] | None = None) -> None:
    """Save named arrays/tensors (e.g. captured K/V/Q) with their dtypes; ``meta`` is free JSON."""
    arrays = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name == _HEADER:
            raise ValueError(f"invalid tensor name {name!r} (letters, digits, '_', '.', '-'; at most 200)")
        arrays[name] = _np(None, t)
    if _depth({"meta": meta}) > MAX_JSON_DEPTH:
        raise ValueError(f"meta is nested deeper than {MAX_JSON_DEPTH} levels, which load_tensors refuses")
    _write(path, {"format": TENSORS_FORMAT, "format_version": FORMAT_VERSION, "meta": meta or {}}, arrays)


def load_tensors(path: "str | Path", *, as_torch: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(tensors, meta)`` written by :func:`save_tensors` (torch tensors by default).
    Every member's stored dtype is checked against its label (:class:`CacheFileError`)."""
    header, arrays = _read(path, TENSORS_FORMAT)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise CacheFileError(f"{Path(path)}: the header's meta is not a JSON object")
    out = {}
    for name, a in arrays.items():
        dt = header["arrays"][name]["dtype"]
        if as_torch:
            import torch

            t = torch.from_numpy(a.copy())
            out[name] = t.view(torch.int16).view(torch.bfloat16) if dt == "bfloat16" else t
        else:
            out[name] = a.copy()
    return out, meta


# -- caches -----------------------------------------------------------------------------------------
def save_cache(cache: KVCache, path: "str | Path") -> None:
    """Write every array, the config and the counters of ``cache`` (see the module doc)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"save_cache expects a KVCache, got {type(cache).__name__}")
    backend = cache.backend
    structure, arrays = to_arrays(cache.state)
    header = {"format": CACHE_FORMAT, "format_version": FORMAT_VERSION, "config": cache.config.to_dict(),
              "backend": backend.name, **structure}
    _write(path, header, {name: _np(backend, a) for name, a in arrays.items()})


def load_cache(path: "str | Path", *, config: MixKVQConfig | None = None, backend: "str | Any | None" = None) -> KVCache:
    """Rebuild a :class:`KVCache` written by :func:`save_cache`.

    Args:
        config: when given, must equal the saved config (else :class:`CacheFileError`).
        backend: backend for the loaded arrays (default: the one that saved it).
    """
    header, arrays = _read(path, CACHE_FORMAT)
    p = Path(path)
    _check_cache_header(p, header)
    try:
        saved = MixKVQConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, RecursionError) as exc:
        raise CacheFileError(f"{p}: the saved config is invalid ({exc})") from None
    if config is not None and config.to_dict() != saved.to_dict():
        diff = sorted(k for k in set(config.to_dict()) | set(saved.to_dict()) if saved.to_dict().get(k) != config.to_dict().get(k))
        raise CacheFileError(f"{p} was saved with a different config (fields {', '.join(diff)} differ); "
                             "load it without config= or with the config it was saved with")
    _check_members(p, header, arrays, saved)
    try:
        from_arrays(header, arrays, saved, lambda name: arrays[name])  # structure and counters, before any conversion
    except StateError as exc:
        raise CacheFileError(f"{p}: inconsistent cache file: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure is an inconsistent file too
        raise CacheFileError(f"{p}: inconsistent cache file ({type(exc).__name__}: {exc})") from None
    _check_payload(p, header, arrays, saved)
    name = backend or header.get("backend") or "numpy"
    try:
        be = get_backend(name)
    except (ValueError, RuntimeError, TypeError) as exc:
        if backend is not None:
            raise
        raise CacheFileError(f"{p} was saved by backend {name!r}, which is not usable here ({exc}); "
                             "pass load_cache(..., backend='numpy') or another available backend") from None
    labels = {n: spec["dtype"] for n, spec in header["arrays"].items()}
    try:
        state = from_arrays(header, arrays, saved, lambda n: _restore(be, arrays[n], labels[n]))
        return KVCache.from_state(saved, state, be)
    except StateError as exc:  # pragma: no cover - checked above
        raise CacheFileError(f"{p}: inconsistent cache file: {exc}") from None


def _restore(be: Any, a: np.ndarray, dtype: str) -> Any:
    """A stored member as ``be``'s array, as if it had been computed there: bfloat16 data
    (stored as its uint16 bits) becomes what the backend makes of a bfloat16 tensor."""
    if dtype == "bfloat16" and a.dtype == np.uint16:
        try:
            import torch
        except ImportError:  # pragma: no cover - a bfloat16 file was written by torch
            return be.from_any((a.astype(np.uint32) << 16).view(np.float32))
        return be.from_any(torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16))
    return be.from_any(a.copy())


# -- cache checks -----------------------------------------------------------------------------------
_CACHE_KEYS = {"format", "format_version", "schema_version", "config", "backend", "counters", "shape", "dtype",
               "n_rep", "blocks", "value_rows", "snapshots", "arrays"}


def _int(x: Any, lo: int = 0, hi: int = MAX_COUNT) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def _check_cache_header(p: Path, h: dict[str, Any]) -> None:
    """Every header field's type and range (what :func:`mixkvq.state.from_arrays` reads)."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise CacheFileError(f"{p}: the header's {what} (corrupted or edited file)")

    unknown = sorted(set(h) - _CACHE_KEYS)
    need(not unknown, f"fields {unknown[:5]} are unknown")
    need(isinstance(h.get("config"), dict), "config is missing or not an object")
    need(h.get("backend") is None or (isinstance(h["backend"], str) and _NAME.fullmatch(h["backend"]) is not None),
         "backend is not a backend name")
    c = h.get("counters")
    need(isinstance(c, dict) and set(c) == {"n_tokens", "q_position", "q_count"}
         and all(_int(v) for v in c.values()), f"counters must be n_tokens, q_position, q_count in 0..{MAX_COUNT}")
    need(c["q_position"] <= c["q_count"], "q_position exceeds q_count (queries counted)")
    shape = h.get("shape")
    if shape is None:
        need(h.get("dtype") is None and h.get("n_rep") is None and c["n_tokens"] == 0 and c["q_count"] == 0,
             "shape is null (an empty cache) but other fields are set")
        need(all(h.get(k) in (None, []) for k in ("blocks", "value_rows", "snapshots")), "empty cache has blocks")
        return
    need(isinstance(shape, list) and len(shape) == 3 and all(_int(s, 1, MAX_DIM) for s in shape),
         f"shape must be [batch, heads, head_dim] of positive integers, got {str(shape)[:80]}")
    need(h.get("dtype") in INPUT_DTYPES, f"dtype must be one of {', '.join(INPUT_DTYPES)}")
    need(h.get("n_rep") is None or _int(h["n_rep"], 1, MAX_DIM), "n_rep must be null or a positive integer")
    blocks = h.get("blocks")
    need(isinstance(blocks, list) and all(
        isinstance(b, dict) and set(b) == {"n_tokens", "tiers"} and _int(b["n_tokens"], 1)
        and isinstance(b["tiers"], list) and all(_int(t, 1, HIGH_BITS) for t in b["tiers"])
        and len(set(b["tiers"])) == len(b["tiers"]) for b in blocks), "blocks are malformed")
    rows = h.get("value_rows")
    need(isinstance(rows, list) and all(isinstance(r, dict) and set(r) == {"bits"} and _int(r["bits"], 1, 8)
                                        for r in rows), "value_rows are malformed")
    snaps = h.get("snapshots")
    need(isinstance(snaps, list) and all(isinstance(s, list) and len(s) == 2 and all(_int(x) for x in s)
                                         for s in snaps), "snapshots are malformed")
    marks = [m for m, _ in snaps]
    need(marks == sorted(set(marks)), "snapshots are not in increasing order")
    need(all(cnt <= c["q_count"] for _, cnt in snaps), "a snapshot counts more queries than q_count")


def _expected_members(h: dict[str, Any]) -> set[str]:
    names: set[str] = set()
    if h.get("shape") is None:
        return names
    for i, blk in enumerate(h["blocks"]):
        names.add(f"k{i}.tier_map")
        for bits in blk["tiers"]:
            names |= {f"k{i}.t{bits}.packed"} | ({f"k{i}.t{bits}.scale", f"k{i}.t{bits}.zero"} if bits != HIGH_BITS else set())
    for i in range(len(h["value_rows"])):
        names |= {f"v{i}.packed", f"v{i}.scale", f"v{i}.zero"}
    names |= {"residual_keys", "residual_values"} | {f"snap{j}" for j in range(len(h["snapshots"]))}
    return names


def _meta_labels(cfg: MixKVQConfig) -> set[str]:
    return {cfg.meta_dtype} | ({"uint16"} if cfg.meta_dtype == "bfloat16" else set())


def _check_members(p: Path, h: dict[str, Any], arrays: dict[str, np.ndarray], cfg: MixKVQConfig) -> None:
    """The member set and every member's label are what the header's structure and config say."""
    want = _expected_members(h)
    have = set(arrays) - {"qsum"}
    if have != want:
        missing, extra = sorted(want - have), sorted(have - want)
        raise CacheFileError(f"{p}: inconsistent cache file: members missing {missing[:5]}, unexpected {extra[:5]}")
    labels = {n: s["dtype"] for n, s in h["arrays"].items()}
    meta = _meta_labels(cfg)
    for name, label in labels.items():
        part = name.rsplit(".", 1)[-1]
        if name in ("residual_keys", "residual_values"):
            ok = label == h["dtype"]
        elif name == "qsum" or name.startswith("snap"):
            ok = label == "int64"
        elif part in ("scale", "zero"):
            ok = label in meta
        else:  # tier maps and packed rows
            ok = label == "uint8"
        if not ok:
            raise CacheFileError(f"{p}: inconsistent cache file: member {name!r} has dtype {label!r}, which the "
                                 f"config (meta_dtype={cfg.meta_dtype}) and header (dtype={h['dtype']}) rule out")


def _as_float32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Stored float data (bfloat16 as uint16 bits) as float32 / float64 for checking."""
    if a.dtype == np.uint16 and dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def _pad_ok(packed: np.ndarray, n: int, bits: int) -> bool:
    pad = 8 * row_bytes(n, bits) - n * bits
    return not pad or packed.size == 0 or not (packed[..., -1] >> (8 - pad)).any()


def _check_payload(p: Path, h: dict[str, Any], a: dict[str, np.ndarray], cfg: MixKVQConfig) -> None:
    """The values, as the cache checks live input (after the shapes were checked)."""

    def need(cond: Any, what: str) -> None:
        if not cond:
            raise CacheFileError(f"{p}: inconsistent cache file: {what}")

    if h["shape"] is None:
        return
    B, H, D = h["shape"]
    R, G = cfg.residual_length, cfg.group_size
    c = h["counters"]
    try:
        cfg.keys.check_shape(D, B * H, cfg.costs(D))
    except ValueError as exc:
        raise CacheFileError(f"{p}: the saved config cannot store heads of {D} channels: {exc}") from None
    from .schemes import BudgetKeys, RateDistortionKeys

    rd = isinstance(cfg.keys, RateDistortionKeys)
    levels_max = np.finfo(np.float32).max

    def meta_ok(name: str, bits: int) -> None:
        s = _as_float32(a[f"{name}.scale"], cfg.meta_dtype).astype(np.float32)
        z = _as_float32(a[f"{name}.zero"], cfg.meta_dtype).astype(np.float32)
        need(np.isfinite(s).all() and np.isfinite(z).all(), f"{name} holds non-finite scales or zeros")
        need((s >= 0).all(), f"{name} holds negative scales")
        with np.errstate(over="ignore"):
            top = s * np.float32(2**bits - 1) + z
        need(np.isfinite(top).all() and (np.abs(top) <= levels_max).all(),
             f"{name} holds a group that dequantizes beyond float32's range")

    for i, blk in enumerate(h["blocks"]):
        tm = a[f"k{i}.tier_map"]
        if isinstance(cfg.keys, BudgetKeys) and tm.size:
            for bits, n in cfg.keys.tier_counts(D).items():
                need(((tm == bits).sum(axis=-1) == n).all(), f"block {i} tier map does not hold {n} channels of "
                                                             f"width {bits} per head (the config's budget)")
        for bits in blk["tiers"]:
            packed = a[f"k{i}.t{bits}.packed"]
            if bits == HIGH_BITS:
                words = packed.reshape(-1).view("<u2") if packed.size else np.zeros(0, np.uint16)
                exp_mask = 0x7F80 if cfg.high_dtype == "bfloat16" else 0x7C00
                need(((words & exp_mask) != exp_mask).all(), f"block {i} holds non-finite 16-bit key channels")
                continue
            need(_pad_ok(packed, R, bits), f"block {i} tier {bits} has non-zero padding bits")
            meta_ok(f"k{i}.t{bits}", bits)
    for i, vr in enumerate(h["value_rows"]):
        bits = vr["bits"]
        if rd:
            need(bits in cfg.keys.value_ladder, f"value chunk {i} has {bits} bits, not in value_bit_ladder "
                                                f"{list(cfg.keys.value_ladder)}")
        else:
            need(bits == cfg.values.bits, f"value chunk {i} has {bits} bits; the config's value_bits is {cfg.values.bits}")
        need(a[f"v{i}.packed"].shape[2] >= 1, f"value chunk {i} holds no tokens")
        need(_pad_ok(a[f"v{i}.packed"], D, bits), f"value chunk {i} has non-zero padding bits")
        meta_ok(f"v{i}", bits)
    if cfg.values.window == "block":
        need(len(h["value_rows"]) == len(h["blocks"]) and all(a[f"v{i}.packed"].shape[2] == R
                                                              for i in range(len(h["value_rows"]))),
             "value chunks do not follow the key blocks (value_window='block')")
    for name in ("residual_keys", "residual_values"):
        x = _as_float32(a[name], h["dtype"])
        need(np.isfinite(x).all(), f"{name} holds non-finite values")
    nq = R * len(h["blocks"])
    qsum = a.get("qsum")
    need((qsum is None) == (h["n_rep"] is None), "qsum and n_rep must be both present or both absent")
    need(qsum is not None or (c["q_count"] == 0 and not h["snapshots"]), "queries were counted but no qsum is stored")
    if cfg.waits_for_queries:
        need(nq <= c["q_position"], f"{nq} key tokens were quantized but queries reached only {c['q_position']} "
                                    "(this config quantizes a block once its queries are in)")
    if qsum is not None:
        bound = c["q_count"] * h["n_rep"] * FIXED_MAX
        need(qsum.size == 0 or (int(qsum.min()) >= 0 and int(qsum.max()) <= bound),
             "qsum lies outside 0..q_count * n_rep * 2^40")
        for j, (m, cnt) in enumerate(h["snapshots"]):
            snap = a[f"snap{j}"]
            need(m % R == 0 and nq < m <= c["q_position"], f"snapshot {j} at token {m} is not a pending block boundary")
            need(snap.size == 0 or (int(snap.min()) >= 0 and (snap <= qsum).all()
                                    and int(snap.max()) <= cnt * h["n_rep"] * FIXED_MAX),
                 f"snapshot {j} is not a prefix of the query statistics")


__all__ = ["CacheFileError", "save_cache", "load_cache", "save_tensors", "load_tensors",
           "MAX_MEMBER_BYTES", "MAX_HEADER_BYTES", "MAX_MEMBERS", "MAX_JSON_DEPTH"]
