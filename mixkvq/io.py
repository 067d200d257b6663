"""Saving and loading quantized caches and captured tensors (versioned, checked).

File format (``SCHEMA_VERSION`` 1): a ZIP archive of ``.npy`` members (the NumPy ``.npz``
layout, readable with ``numpy.load``) written deterministically — fixed member order and
timestamps, no compression — so saving the same cache twice gives the same bytes. Member
``__header__.npy`` is a uint8 array holding UTF-8 JSON:

* ``format``: ``"mixkvq.kvcache"`` or ``"mixkvq.tensors"``; ``schema_version``;
* for caches: the config (``MixKVQConfig.to_dict``), counters (tokens, query position,
  query count), ``(batch, heads, head_dim)``, input dtype, ``n_rep``, the block / value
  chunk structure and the snapshot token counts;
* ``arrays``: for every member, its dtype name as stored by the backend (bfloat16 arrays
  are stored as their uint16 bit pattern), shape and SHA-256 of its bytes.

Loading checks everything before building anything: the archive opens, the header parses,
the format and version match, every member exists with the recorded shape, dtype and
checksum, and the arrays agree with the config and the counters (tier rows per width,
packed row lengths, group counts, token totals). Any failure raises :class:`CacheFileError`
(a ValueError) that says what is wrong; nothing half-loaded is returned.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .backend import array_kind, get_backend
from .cache import KVCache, _State
from .config import HIGH_BITS, MixKVQConfig
from .dtypes import dtype_name
from .layout import KeyBlock, TierRows, ValueRows, n_groups, row_bytes

SCHEMA_VERSION = 1
CACHE_FORMAT = "mixkvq.kvcache"
TENSORS_FORMAT = "mixkvq.tensors"
_HEADER = "__header__"
_DATE = (1980, 1, 1, 0, 0, 0)


class CacheFileError(ValueError):
    """A cache or tensor file is truncated, corrupted, of another version or inconsistent."""


# -- low level: deterministic npz ------------------------------------------------------------------
def _np(backend: Any, a: Any) -> tuple[np.ndarray, str]:
    """A C-contiguous NumPy copy of ``a`` (bfloat16 as its uint16 bits) and its dtype name;
    ``backend=None`` converts through the backend of ``a``'s own array kind."""
    name = dtype_name(a)
    backend = backend if backend is not None else get_backend(array_kind(a))
    return np.ascontiguousarray(backend.to_numpy(a)), name


def _write(path: "str | Path", header: dict[str, Any], arrays: dict[str, tuple[np.ndarray, str]]) -> None:
    header = dict(header)
    header["arrays"] = {k: {"dtype": d, "shape": list(a.shape), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
                        for k, (a, d) in arrays.items()}
    blob = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), dtype=np.uint8)
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


def _read(path: "str | Path", expect_format: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError) as exc:
        raise CacheFileError(f"{p} is not a mixkvq file (truncated or not a ZIP/npz archive: {exc})") from None
    with zf:
        names = set(zf.namelist())
        if _HEADER + ".npy" not in names:
            raise CacheFileError(f"{p} has no {_HEADER} member: not a mixkvq file")
        try:
            header = json.loads(_load_member(zf, _HEADER).tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CacheFileError(f"{p}: the header is corrupted ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != expect_format:
            raise CacheFileError(f"{p} holds {header.get('format') if isinstance(header, dict) else '?'!r}, expected {expect_format!r}")
        version = header.get("schema_version")
        if version != SCHEMA_VERSION:
            raise CacheFileError(f"{p} has schema version {version!r}; this mixkvq reads version {SCHEMA_VERSION} "
                                 "(re-save it with the mixkvq version that wrote it, or upgrade)")
        specs = header.get("arrays")
        if not isinstance(specs, dict):
            raise CacheFileError(f"{p}: the header lists no arrays")
        arrays = {}
        for name, spec in specs.items():
            if name + ".npy" not in names:
                raise CacheFileError(f"{p}: member {name!r} is missing (truncated file?)")
            a = _load_member(zf, name, p)
            if list(a.shape) != spec.get("shape") or hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() != spec.get("sha256"):
                raise CacheFileError(f"{p}: member {name!r} does not match its recorded shape/checksum (corrupted file)")
            arrays[name] = a
    return header, arrays


def _load_member(zf: zipfile.ZipFile, name: str, path: Any = None) -> np.ndarray:
    try:
        with zf.open(name + ".npy") as f:
            return np.lib.format.read_array(io.BytesIO(f.read()), allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise CacheFileError(f"{path or 'file'}: member {name!r} is unreadable ({exc}; corrupted or truncated file)") from None


# -- tensors ----------------------------------------------------------------------------------------
def save_tensors(path: "str | Path", tensors: dict[str, Any], *, meta: dict[str, Any] | None = None) -> None:
    """Save named arrays/tensors (e.g. captured K/V/Q) with their dtypes; ``meta`` is free JSON."""
    arrays = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name or "/" in name or name == _HEADER:
            raise ValueError(f"invalid tensor name {name!r}")
        arrays[name] = _np(None, t)
    _write(path, {"format": TENSORS_FORMAT, "schema_version": SCHEMA_VERSION, "meta": meta or {}}, arrays)


def load_tensors(path: "str | Path", *, as_torch: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load ``(tensors, meta)`` written by :func:`save_tensors` (torch tensors by default)."""
    header, arrays = _read(path, TENSORS_FORMAT)
    out = {}
    for name, a in arrays.items():
        dt = header["arrays"][name]["dtype"]
        if as_torch:
            import torch

            t = torch.from_numpy(a.copy())
            out[name] = t.view(torch.int16).view(torch.bfloat16) if dt == "bfloat16" else t
        else:
            out[name] = a
    return out, header.get("meta", {})


# -- caches -----------------------------------------------------------------------------------------
def save_cache(cache: KVCache, path: "str | Path") -> None:
    """Write every array, the config and the counters of ``cache`` (see the module doc)."""
    if not isinstance(cache, KVCache):
        raise TypeError(f"save_cache expects a KVCache, got {type(cache).__name__}")
    s = cache._state
    backend = cache.backend
    arrays: dict[str, tuple[np.ndarray, str]] = {}
    blocks = []
    for i, blk in enumerate(s.key_blocks):
        arrays[f"k{i}.tier_map"] = _np(backend, blk.tier_map)
        tiers = []
        for bits, rows in blk.tiers.items():
            tiers.append(bits)
            arrays[f"k{i}.t{bits}.packed"] = _np(backend, rows.packed)
            if rows.scale is not None:
                arrays[f"k{i}.t{bits}.scale"] = _np(backend, rows.scale)
                arrays[f"k{i}.t{bits}.zero"] = _np(backend, rows.zero)
        blocks.append({"n_tokens": blk.n_tokens, "tiers": tiers})
    vrows = []
    for i, r in enumerate(s.value_rows):
        for part in ("packed", "scale", "zero"):
            arrays[f"v{i}.{part}"] = _np(backend, getattr(r, part))
        vrows.append({"bits": r.bits})
    for name, a in (("residual_keys", s.residual_keys), ("residual_values", s.residual_values), ("qsum", s.qsum)):
        if a is not None:
            arrays[name] = _np(backend, a)
    snaps = []
    for j, (m, (q, c)) in enumerate(sorted(s.snapshots.items())):
        arrays[f"snap{j}"] = _np(backend, q)
        snaps.append([m, c])
    header = {
        "format": CACHE_FORMAT, "schema_version": SCHEMA_VERSION,
        "config": cache.config.to_dict(),
        "counters": {"n_tokens": s.n_tokens, "q_position": s.q_position, "q_count": s.q_count},
        "shape": list(cache._shape) if cache._shape else None, "dtype": cache._dtype, "n_rep": cache._n_rep,
        "backend": backend.name, "blocks": blocks, "value_rows": vrows, "snapshots": snaps,
    }
    _write(path, header, arrays)


def load_cache(path: "str | Path", *, config: MixKVQConfig | None = None, backend: str | None = None) -> KVCache:
    """Rebuild a :class:`KVCache` written by :func:`save_cache`.

    Args:
        config: when given, must equal the saved config (else :class:`CacheFileError`).
        backend: backend for the loaded arrays (default: the one that saved it).
    """
    header, arrays = _read(path, CACHE_FORMAT)
    p = Path(path)
    try:
        saved = MixKVQConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"{p}: the saved config is invalid ({exc})") from None
    if config is not None and config.to_dict() != saved.to_dict():
        diff = sorted(k for k, v in config.to_dict().items() if saved.to_dict().get(k) != v)
        raise CacheFileError(f"{p} was saved with a different config (fields {', '.join(diff)} differ); "
                             "load it without config= or with the config it was saved with")
    cfg = saved if backend is None else saved.replace(backend=backend)
    cache = KVCache(cfg)
    be = get_backend(backend or header.get("backend") or cfg.backend or "numpy")
    cache._backend = be
    try:
        _fill(cache, header, arrays, be)
    except CacheFileError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CacheFileError(f"{p}: inconsistent cache file ({type(exc).__name__}: {exc})") from None
    return cache


def _restore(be: Any, a: np.ndarray, dtype: str) -> Any:
    if be.name == "torch":
        import torch

        t = torch.from_numpy(a.copy())
        return t.view(torch.int16).view(torch.bfloat16) if dtype == "bfloat16" else t
    return be.from_any(a.copy())


def _fill(cache: KVCache, header: dict[str, Any], arrays: dict[str, np.ndarray], be: Any) -> None:
    cfg = cache.config
    specs = header["arrays"]
    get = lambda name: _restore(be, arrays[name], specs[name]["dtype"])  # noqa: E731

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise CacheFileError(f"inconsistent cache file: {msg}")

    counters = header["counters"]
    shape = header["shape"]
    s = _State()
    if shape is None:
        need(not arrays and counters["n_tokens"] == 0, "no shape but stored arrays")
        cache._state = s
        return
    B, H, D = (int(x) for x in shape)
    R, G = cfg.residual_length, cfg.group_size
    for i, blk in enumerate(header["blocks"]):
        tm = arrays[f"k{i}.tier_map"]
        need(tm.shape == (B, H, D) and tm.dtype == np.uint8, f"block {i} tier map has shape {tm.shape}, expected {(B, H, D)}")
        need(blk["n_tokens"] == R, f"block {i} holds {blk['n_tokens']} tokens, the config's residual_length is {R}")
        need(set(np.unique(tm).tolist()) <= set(blk["tiers"]), f"block {i} tier map uses widths without rows")
        kb = KeyBlock(tier_map=get(f"k{i}.tier_map"), n_tokens=R)
        for bits in blk["tiers"]:
            n = int((tm == bits).sum())
            packed = arrays[f"k{i}.t{bits}.packed"]
            width = 2 * R if bits == HIGH_BITS else row_bytes(R, bits)
            need(packed.shape == (n, width), f"block {i} tier {bits} packed shape {packed.shape}, expected {(n, width)}")
            if bits == HIGH_BITS:
                kb.tiers[bits] = TierRows(bits, get(f"k{i}.t{bits}.packed"))
            else:
                for part in ("scale", "zero"):
                    need(arrays[f"k{i}.t{bits}.{part}"].shape == (n, n_groups(R, G)), f"block {i} tier {bits} {part} shape")
                kb.tiers[bits] = TierRows(bits, get(f"k{i}.t{bits}.packed"), get(f"k{i}.t{bits}.scale"), get(f"k{i}.t{bits}.zero"))
        s.key_blocks.append(kb)
    for i, vr in enumerate(header["value_rows"]):
        bits = int(vr["bits"])
        packed = arrays[f"v{i}.packed"]
        need(packed.ndim == 4 and packed.shape[:2] == (B, H) and packed.shape[3] == row_bytes(D, bits), f"value chunk {i} packed shape {packed.shape}")
        for part in ("scale", "zero"):
            need(arrays[f"v{i}.{part}"].shape == packed.shape[:3] + (n_groups(D, G),), f"value chunk {i} {part} shape")
        s.value_rows.append(ValueRows(get(f"v{i}.packed"), get(f"v{i}.scale"), get(f"v{i}.zero"), bits))
    n = int(counters["n_tokens"])
    for name in ("residual_keys", "residual_values"):
        if name in arrays:
            a = arrays[name]
            need(a.ndim == 4 and a.shape[:2] == (B, H) and a.shape[3] == D, f"{name} shape {a.shape}")
            setattr(s, name, get(name))
    rk = 0 if s.residual_keys is None else int(s.residual_keys.shape[2])
    rv = 0 if s.residual_values is None else int(s.residual_values.shape[2])
    s.n_tokens = n
    need(s.n_key_quantized + rk == n, f"{s.n_key_quantized} quantized + {rk} residual key tokens != {n} tokens")
    need(s.n_value_quantized + rv == n, f"{s.n_value_quantized} quantized + {rv} residual value tokens != {n} tokens")
    if "qsum" in arrays:
        need(arrays["qsum"].shape == (B, H, D) and arrays["qsum"].dtype == np.int64, "qsum shape/dtype")
        s.qsum = get("qsum")
    s.q_position, s.q_count = int(counters["q_position"]), int(counters["q_count"])
    need(0 <= s.q_position <= n, "query position beyond the tokens")
    for j, (m, c) in enumerate(header["snapshots"]):
        need(arrays[f"snap{j}"].shape == (B, H, D), f"snapshot {j} shape")
        s.snapshots[int(m)] = (get(f"snap{j}"), int(c))
    cache._state = s
    cache._shape = (B, H, D)
    cache._dtype = header["dtype"]
    cache._n_rep = header["n_rep"]
    if be.name == "torch":
        import torch

        cache._template = torch.empty((0, H, 0, D), dtype=getattr(torch, cache._dtype))
    else:
        cache._template = np.empty((0, H, 0, D), dtype=np.float32 if cache._dtype == "bfloat16" else cache._dtype)
