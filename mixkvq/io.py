"""Saving and loading quantized caches and captured tensors (versioned, checked).

File format (``mixkvq.FORMAT_VERSION``, 1): a ZIP archive of ``.npy`` members (the NumPy ``.npz``
layout, readable with ``numpy.load``) written deterministically — fixed member order and
timestamps, no compression — so saving the same cache twice gives the same bytes. Member
``__header__.npy`` is a uint8 array holding UTF-8 JSON:

* ``format``: ``"mixkvq.kvcache"`` or ``"mixkvq.tensors"``; ``format_version`` (files of
  mixkvq 0.1 call it ``schema_version``; both are read);
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
from .cache import KVCache
from .config import MixKVQConfig
from .dtypes import dtype_name
from .format import FORMAT_VERSION
from .state import StateError, from_arrays, to_arrays

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
        version = header.get("format_version", header.get("schema_version"))  # files of 0.1 say schema_version
        if version != FORMAT_VERSION:
            raise CacheFileError(f"{p} has format version {version!r}; this mixkvq reads version {FORMAT_VERSION} "
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
    _write(path, {"format": TENSORS_FORMAT, "format_version": FORMAT_VERSION, "meta": meta or {}}, arrays)


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
    try:
        saved = MixKVQConfig.from_dict(header["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFileError(f"{p}: the saved config is invalid ({exc})") from None
    if config is not None and config.to_dict() != saved.to_dict():
        diff = sorted(k for k in set(config.to_dict()) | set(saved.to_dict()) if saved.to_dict().get(k) != config.to_dict().get(k))
        raise CacheFileError(f"{p} was saved with a different config (fields {', '.join(diff)} differ); "
                             "load it without config= or with the config it was saved with")
    be = get_backend(backend or header.get("backend") or "numpy")
    labels = {name: spec["dtype"] for name, spec in header["arrays"].items()}
    try:
        state = from_arrays(header, arrays, saved, lambda name: _restore(be, arrays[name], labels[name]))
    except StateError as exc:
        raise CacheFileError(f"{p}: inconsistent cache file: {exc}") from None
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CacheFileError(f"{p}: inconsistent cache file ({type(exc).__name__}: {exc})") from None
    return KVCache.from_state(saved, state, be)


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
