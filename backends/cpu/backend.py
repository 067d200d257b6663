"""CpuBackend: the Backend protocol on torch CPU tensors, with native kernels for the hot ops.

The storage, metadata dtypes and every op the kernels do not replace are the torch
backend's (so both hold identical tensors and share its plumbing); quantize + pack,
unpack + dequantize, the key-block encode and the fused attention call
``kernels/mixkvq_cpu.cpp`` through ctypes (which releases the GIL during the call). Threads:
``torch.get_num_threads()`` at each call, so ``torch.set_num_threads`` governs both.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mixkvq.backend import segment_bounds
from mixkvq.format import DTYPE_KIND, HIGH_BITS, TIER_SLOTS, meta_overflow_error, n_groups, range_overflow_error, row_bytes

from .._native import build_library
from ..cupy.kernels import KERNEL_DIR as _SHARED_HEADERS
from ..torch import TorchBackend
from ..torch.ops import to_float32

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
SOURCE = "mixkvq_cpu.cpp"
#: IEEE float32 exactly as the spec: no FMA contraction, no fast math (-fno-math-errno only
#: lets rintf inline; it changes no result). -march=native: AVX2 / AVX-512 where present.
CXX_FLAGS = ("-O3", "-march=native", "-std=c++17", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno",
             "-fopenmp", "-fPIC", "-shared")
ABI_VERSION = 2

_P, _I, _Q, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float
_SIGNATURES = {
    "mkq_quantize": [_P, _I, _Q, _I, _I, _I, _I, _P, _P, _P, _P, _I],
    "mkq_dequantize": [_P, _P, _P, _I, _Q, _I, _I, _I, _I, _P, _I],
    "mkq_pack": [_P, _Q, _I, _I, _P, _I],
    "mkq_unpack": [_P, _Q, _I, _I, _P, _I],
    "mkq_encode_key_block": [_P, _I, _I, _I, _I, _I, _P, _I, _I, _I, _P, _P, _I],
    "mkq_query_segment_sums": [_P, _I, _I, _I, _Q, _I, _Q, _Q, _Q, _I, _P, _I, _P, _P, _I],
    "mkq_attention": [_P, _I, _I, _I, _I, _I, _Q, _F, _I, _P, _Q, _F, _I, _I, _I, _I, _I, _P, _P, _P, _I, _Q, _I, _P, _P,
                      _P, _I, _Q, _P, _I, _I],
    "mkq_attention_batch": [_I, _P, _I, _I, _I, _F, _Q, _F, _I, _I, _I, _I, _I, _I, _I],
}
#: columns of one request's row in ``mkq_attention_batch``'s table (see the C++ declaration)
BATCH_COLUMNS = ("q", "out", "Tq", "T", "nkb", "tier_maps", "kptr", "res_k", "rk", "nvc", "vchunk", "vptr", "res_v", "rv")
_LIB: Any = None
_LIB_LOCK = threading.Lock()
_KIND_OF_TORCH = {torch.float32: DTYPE_KIND["float32"], torch.float16: DTYPE_KIND["float16"],
                  torch.bfloat16: DTYPE_KIND["bfloat16"]}
_TORCH_OF_NAME = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_library() -> Any:
    """Build (first use) and load the native library; raises RuntimeError saying what is missing."""
    global _LIB
    with _LIB_LOCK:
        if _LIB is None:
            # our OpenMP runtime is not torch's: idle workers must sleep, not spin on the cores
            # torch's own threads need between two calls
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            path = build_library("mixkvq_cpu", f'#include "{SOURCE}"\n', include_dirs=[KERNEL_DIR, _SHARED_HEADERS],
                                 flags=CXX_FLAGS, subfolder="native")
            lib = ctypes.CDLL(str(path))
            if lib.mkq_abi_version() != ABI_VERSION:
                raise RuntimeError(f"{path} has ABI {lib.mkq_abi_version()}, expected {ABI_VERSION}")
            for name, args in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = args, None
            _LIB = lib
        return _LIB


def _ptr(t: "torch.Tensor | None") -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _kind(t: torch.Tensor) -> int:
    return _KIND_OF_TORCH[t.dtype]


class CpuBackend(TorchBackend):
    """Native C++ kernels on CPU torch tensors; bit-exact with the simulator (docs/cpu.md).

    Construction builds the library if needed (seconds, once per machine and source) and
    raises RuntimeError when no C++ compiler is available.
    """

    name = "cpu"

    def __init__(self) -> None:
        self.lib = load_library()
        self._memo: dict[int, tuple] = {}

    @staticmethod
    def _threads() -> int:
        return max(1, torch.get_num_threads())

    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor) and x.device.type == "cpu"

    def from_any(self, x: Any, *, like: Any = None) -> torch.Tensor:
        t = super().from_any(x)
        if t.device.type != "cpu":
            raise ValueError(f"the 'cpu' backend works on CPU tensors; got a tensor on {t.device}. "
                             "Use backend='torch' or 'cupy' for GPU tensors")
        return t

    @staticmethod
    def _input(x: torch.Tensor) -> torch.Tensor:
        """A contiguous CPU tensor of a kind the kernels read (float16/bfloat16/float32 as is,
        anything else converted to float32 by §1's rule)."""
        if x.dtype not in _KIND_OF_TORCH:
            x = to_float32(x)
        return x.contiguous()

    # -- §5 ---------------------------------------------------------------------------------
    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        codes = self.from_any(codes).to(torch.uint8).contiguous()
        n = int(codes.shape[-1])
        rows = codes.numel() // n if n else 0
        out = torch.empty(tuple(codes.shape[:-1]) + (row_bytes(n, bits),), dtype=torch.uint8)
        if rows and n:
            self.lib.mkq_pack(codes.data_ptr(), rows, n, bits, out.data_ptr(), self._threads())
        return out

    def unpack(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        packed = self.from_any(packed).to(torch.uint8).contiguous()
        out = torch.empty(tuple(packed.shape[:-1]) + (int(n),), dtype=torch.uint8)
        rows = out.numel() // n if n else 0
        if rows:
            self.lib.mkq_unpack(packed.data_ptr(), rows, int(n), bits, out.data_ptr(), self._threads())
        return out

    # -- §7 ---------------------------------------------------------------------------------------
    def query_segment_sums(self, q: Any, n_rep: int, bounds: Sequence[int]) -> torch.Tensor:
        """§7 sums over token segments in one native pass (no per-token int64 tensor): ``q
        (B, H*n_rep, T, D)`` of any strides whose last one is 1 (vLLM's ``(T, Hq, D)`` query
        transposed, say) -> int64 ``(B, H, S, D)``. Raises ValueError naming the first NaN
        (§7 leaves its value undefined); Inf saturates to 2^40 as §7 step 2 says."""
        q = self.from_any(q)
        if q.dtype not in _KIND_OF_TORCH:
            q = to_float32(q)
        if q.stride(-1) != 1:
            q = q.contiguous()
        B, Hq, T, D = (int(s) for s in q.shape)
        if n_rep < 1 or Hq % n_rep:
            raise ValueError(f"queries have {Hq} heads, not a multiple of n_rep={n_rep} (query heads per KV head)")
        b = segment_bounds(bounds, T)
        S = max(len(b) - 1, 0)
        out = torch.empty((B, Hq // n_rep, S, D), dtype=torch.int64)
        if S == 0 or q.numel() == 0:
            return out.zero_()
        bad = np.full(1, -1, dtype=np.int64)
        self.lib.mkq_query_segment_sums(q.data_ptr(), _kind(q), B, Hq, T, D, q.stride(0), q.stride(1), q.stride(2),
                                        int(n_rep), b.ctypes.data, S, out.data_ptr(), bad.ctypes.data, self._threads())
        if bad[0] >= 0:
            index = tuple(int(i) for i in np.unravel_index(int(bad[0]), (B, Hq, T, D)))
            raise ValueError(f"queries contain a non-finite value (nan) at index {index}; NaN has no §7 "
                             "statistics — fix the producer of this tensor")
        return out

    # -- §3–§4 --------------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor, bits: int, group_size: int, meta_dtype: str, name: str = "x"):
        x = self._input(self.from_any(x))
        n = int(x.shape[-1])
        lead = tuple(x.shape[:-1])
        ng, rb = n_groups(n, group_size), row_bytes(n, bits)
        rows = x.numel() // n if n else 0
        mdt = _TORCH_OF_NAME[meta_dtype]
        scale = torch.empty(lead + (ng,), dtype=mdt)
        zero = torch.empty(lead + (ng,), dtype=mdt)
        packed = torch.empty(lead + (rb,), dtype=torch.uint8)
        if rows and n:
            bad = np.full(2, -1, dtype=np.int64)
            self.lib.mkq_quantize(x.data_ptr(), _kind(x), rows, n, group_size, bits, DTYPE_KIND[meta_dtype],
                                  scale.data_ptr(), zero.data_ptr(), packed.data_ptr(), bad.ctypes.data,
                                  self._threads())
            if bad[0] >= 0:
                raise meta_overflow_error(name, tuple(int(i) for i in np.unravel_index(int(bad[0]), lead + (ng,))),
                                          meta_dtype)
            if bad[1] >= 0:
                raise range_overflow_error(name, tuple(int(i) for i in np.unravel_index(int(bad[1]), lead + (ng,))))
        return packed, scale, zero

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, n: int, out_dtype: str = "float32") -> torch.Tensor:
        packed = self.from_any(packed).to(torch.uint8).contiguous()
        scale = self.from_any(scale).contiguous()
        zero = self.from_any(zero).to(scale.dtype).contiguous()
        if scale.dtype not in _KIND_OF_TORCH:
            raise TypeError(f"scale has dtype {scale.dtype}; metadata is float16, bfloat16 or float32")
        out = torch.empty(tuple(packed.shape[:-1]) + (int(n),), dtype=_TORCH_OF_NAME[out_dtype])
        rows = out.numel() // n if n else 0
        if rows:
            self.lib.mkq_dequantize(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), _kind(scale), rows, int(n),
                                    group_size, bits, DTYPE_KIND[out_dtype], out.data_ptr(), self._threads())
        return out

    # -- §6: a whole key block in one call ------------------------------------------------------
    def encode_key_block(self, keys: Any, tier_map: Any, widths: Sequence[int], group_size: int, meta_dtype: str,
                         high_dtype: str, name: str = "keys") -> "dict[int, tuple[Any, Any, Any]]":
        keys = self._input(self.from_any(keys))
        tier_map = self.from_any(tier_map).to(torch.uint8).contiguous()
        B, H, R, D = (int(s) for s in keys.shape)
        counts = torch.bincount(tier_map.reshape(-1).to(torch.int64), minlength=TIER_SLOTS)
        mdt = _TORCH_OF_NAME[meta_dtype]
        ng = n_groups(R, group_size)
        out: dict[int, tuple[Any, Any, Any]] = {}
        table = (ctypes.c_void_p * (3 * TIER_SLOTS))()
        for w in widths:
            count = int(counts[w]) if w < TIER_SLOTS else 0
            if w == HIGH_BITS:
                out[w] = (torch.empty((count, 2 * R), dtype=torch.uint8), None, None)
            else:
                out[w] = (torch.empty((count, row_bytes(R, w)), dtype=torch.uint8),
                          torch.empty((count, ng), dtype=mdt), torch.empty((count, ng), dtype=mdt))
            for s, a in enumerate(out[w]):
                if a is not None:
                    table[3 * w + s] = a.data_ptr() if count else None
        if B * H * R * D:
            bad = np.full(2 * TIER_SLOTS, -1, dtype=np.int64)
            self.lib.mkq_encode_key_block(keys.data_ptr(), _kind(keys), B, H, R, D, tier_map.data_ptr(), group_size,
                                          DTYPE_KIND[meta_dtype], DTYPE_KIND[high_dtype], table, bad.ctypes.data,
                                          self._threads())
            for w in widths:  # the order the composed default reports in
                if w == HIGH_BITS:
                    if bad[2 * w] >= 0:
                        idx = tuple(int(i) for i in np.unravel_index(int(bad[2 * w]), (int(counts[w]), R)))
                        raise meta_overflow_error(name, idx, high_dtype, what="16-bit key channel")
                    continue
                shape = (int(counts[w]), ng)
                if bad[2 * w] >= 0:
                    raise meta_overflow_error(name, tuple(int(i) for i in np.unravel_index(int(bad[2 * w]), shape)),
                                              meta_dtype)
                if bad[2 * w + 1] >= 0:
                    raise range_overflow_error(name, tuple(int(i) for i in np.unravel_index(int(bad[2 * w + 1]), shape)))
        return out

    # -- fused attention ------------------------------------------------------------------------------
    @staticmethod
    def _key_pointers(blk: Any) -> tuple[Any, list, list]:
        table: list = [None] * (TIER_SLOTS * 3)
        tm = blk.tier_map.contiguous()
        held = [tm]
        for w, rows in blk.tiers.items():
            for s, a in enumerate(rows.arrays()):
                a = a.contiguous()
                held.append(a)
                table[3 * w + s] = _ptr(a)
        return tm.data_ptr(), table, held

    @staticmethod
    def _value_pointers(rows: Any) -> tuple[Any, list, list]:
        held = [a.contiguous() for a in rows.arrays()]
        return None, [_ptr(a) for a in held], held

    def _pointers(self, obj: Any, make: Any) -> tuple[Any, list]:
        """The data pointers of a stored (immutable) key block or value chunk, computed once
        per object and dropped with it; the entry holds the arrays it points to."""
        key = id(obj)
        hit = self._memo.get(key)
        if hit is not None and hit[0]() is obj:
            return hit[1], hit[2]
        first, table, held = make(obj)
        self._memo[key] = (weakref.ref(obj, lambda _, key=key: self._memo.pop(key, None)), first, table, held)
        return first, table

    def _storage_tables(self, storage: Any, layout: Any, keep: list) -> dict[str, Any]:
        """The native kernel's view of one storage: per key block the tier map and the tier rows'
        pointers, per value chunk (start, n, bits) and its pointers, and the residuals. Arrays
        made contiguous are appended to ``keep`` (they must outlive the call)."""
        cfg = layout.config

        def contig(t: torch.Tensor) -> torch.Tensor:
            t = t.contiguous()
            keep.append(t)
            return t

        blocks = storage.key_blocks
        nkb = len(blocks)
        R = int(cfg.residual_length)
        tier_ptrs = (ctypes.c_void_p * max(1, nkb))()
        kptr = (ctypes.c_void_p * max(1, nkb * TIER_SLOTS * 3))()
        for j, blk in enumerate(blocks):
            tm, table = self._pointers(blk, self._key_pointers)
            tier_ptrs[j] = tm
            kptr[j * TIER_SLOTS * 3: (j + 1) * TIER_SLOTS * 3] = table
        chunks = storage.value_rows
        nvc = len(chunks)
        vchunk = np.zeros((max(1, nvc), 3), dtype=np.int64)
        vptr = (ctypes.c_void_p * max(1, 3 * nvc))()
        start = 0
        for c, rows in enumerate(chunks):
            n = rows.n_tokens
            vchunk[c] = (start, n, int(rows.bits))
            vptr[3 * c: 3 * c + 3] = self._pointers(rows, self._value_pointers)[1]
            start += n

        def residual(a: Any) -> tuple[Any, int, int]:
            if a is None or int(a.shape[2]) == 0:
                return None, DTYPE_KIND["float32"], 0
            t = contig(self._input(a))
            return t.data_ptr(), _kind(t), int(a.shape[2])

        rk_ptr, rk_kind, rk = residual(storage.residual_keys)
        rv_ptr, rv_kind, rv = residual(storage.residual_values)
        H = int(blocks[0].tier_map.shape[1]) if blocks else int(storage.residual_keys.shape[1])
        T = nkb * R + rk
        if T != start + rv:
            raise ValueError(f"cache storage holds {T} key tokens but {start + rv} value tokens")
        keep.extend((tier_ptrs, kptr, vchunk, vptr))
        return dict(nkb=nkb, R=R, H=H, T=T, tier_ptrs=tier_ptrs, kptr=kptr, nvc=nvc, vchunk=vchunk, vptr=vptr,
                    rk_ptr=rk_ptr, rk_kind=rk_kind, rk=rk, rv_ptr=rv_ptr, rv_kind=rv_kind, rv=rv)

    def attention(self, q: Any, storage: Any, layout: Any, *, scale: float, causal: bool, mask: Any = None,
                  window: "int | None" = None, softcap: "float | None" = None) -> torch.Tensor:
        """Fused decode attention straight from the packed storage (docs/cpu.md): q
        ``(B, Hq, Tq, D)`` -> float32; ``mask`` bool ``(B, Tq, T)`` (True = may attend) or None;
        ``window``: sliding-window size; ``softcap``: score soft-capping."""
        cfg = layout.config
        q32 = to_float32(self.from_any(q)).contiguous()
        B, Hq, Tq, D = (int(s) for s in q32.shape)
        keep: list[Any] = []
        t = self._storage_tables(storage, layout, keep)
        nkb, R, H, T = t["nkb"], t["R"], t["H"], t["T"]
        mask_ptr = None
        if mask is not None:
            m = self.from_any(mask).to(torch.uint8).contiguous()
            if tuple(m.shape) != (B, Tq, T):
                raise ValueError(f"mask has shape {tuple(m.shape)}; expected (B, Tq, T) = {(B, Tq, T)}")
            keep.append(m)
            mask_ptr = m.data_ptr()
        out = torch.empty((B, Hq, Tq, D), dtype=torch.float32)
        self.lib.mkq_attention(q32.data_ptr(), B, H, Hq // H, Tq, D, T, float(scale), int(bool(causal)), mask_ptr,
                               int(window or 0), float(softcap or 0.0), nkb, R, cfg.group_size, DTYPE_KIND[cfg.meta_dtype], DTYPE_KIND[cfg.high_dtype],
                               t["tier_ptrs"], t["kptr"], t["rk_ptr"], t["rk_kind"], t["rk"], t["nvc"],
                               t["vchunk"].ctypes.data, t["vptr"], t["rv_ptr"], t["rv_kind"], t["rv"], out.data_ptr(),
                               self._threads(), 0)
        del keep
        return out

    def attention_batch(self, queries: "list[Any]", storages: "list[Any]", layout: Any, *, scale: float) -> list[torch.Tensor]:
        """Causal decode attention of several independent sequences in ONE native call (one
        parallel region over sequences x heads x token splits): ``queries[i]`` ``(1, Hq, Tq_i, D)``
        against ``storages[i]`` (batch 1, any length; one ``layout`` for all) -> float32 outputs
        of the queries' shapes, each bit-identical to :meth:`attention` of that sequence alone.
        What a serving engine needs for a step of many requests (the vLLM backend calls the
        same kernel entry with its paged tables)."""
        if len(queries) != len(storages):
            raise ValueError(f"{len(queries)} queries for {len(storages)} storages")
        cfg = layout.config
        keep: list[Any] = []
        rows, outs, kinds, geometry = [], [], set(), set()
        for i, (q, storage) in enumerate(zip(queries, storages)):
            q32 = to_float32(self.from_any(q)).contiguous()
            B, Hq, Tq, D = (int(x) for x in q32.shape)
            if B != 1:
                raise ValueError(f"queries[{i}] has batch {B}; attention_batch takes one sequence per entry")
            t = self._storage_tables(storage, layout, keep)
            geometry.add((t["H"], Hq, D))
            kinds.update(k for k, n in ((t["rk_kind"], t["rk"]), (t["rv_kind"], t["rv"])) if n)
            out = torch.empty((1, Hq, Tq, D), dtype=torch.float32)
            keep.append(q32)
            outs.append(out)
            rows.append([q32.data_ptr(), out.data_ptr(), Tq, t["T"], t["nkb"], ctypes.addressof(t["tier_ptrs"]),
                         ctypes.addressof(t["kptr"]), t["rk_ptr"] or 0, t["rk"], t["nvc"], t["vchunk"].ctypes.data,
                         ctypes.addressof(t["vptr"]), t["rv_ptr"] or 0, t["rv"]])
        if not rows:
            return []
        if len(geometry) != 1:
            raise ValueError(f"attention_batch needs one (kv_heads, query_heads, head_dim) for all entries; got {sorted(geometry)}")
        if len(kinds) > 1:
            raise ValueError("attention_batch needs every entry's residual in one dtype")
        H, Hq, D = geometry.pop()
        table = np.array(rows, dtype=np.int64)
        self.lib.mkq_attention_batch(len(rows), table.ctypes.data, H, Hq // H, D, float(scale), 0, 0.0,
                                     int(cfg.residual_length), cfg.group_size, DTYPE_KIND[cfg.meta_dtype],
                                     DTYPE_KIND[cfg.high_dtype], kinds.pop() if kinds else DTYPE_KIND["float32"],
                                     self._threads(), 0)
        del keep
        return outs
