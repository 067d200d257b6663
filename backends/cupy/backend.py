"""The Backend protocol on the CUDA kernels: :class:`CupyBackend` (GPU, CuPy arrays) and
:class:`CupyCpuBackend` (the same kernels emulated on the CPU, NumPy arrays).

Both classes are this one implementation: shape handling, casts, allocations, geometry and
argument lists are shared; only the launcher (and the array module it brings) differs.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from mixkvq.backend import BackendBase, reference_attention
from mixkvq.dtypes import dtype_name
from mixkvq.format import DTYPE_KIND as _KIND
from mixkvq.format import FIXED_ONE, TIER_SLOTS, meta_overflow_error, n_groups, range_overflow_error, row_bytes

from . import kernels as K
from .launch import CupyLauncher, Launcher

_META_STORAGE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}
_META_OF_STORAGE = {"float16": "float16", "uint16": "bfloat16", "float32": "float32"}
#: Blocks per multiprocessor of the element-wise kernels (grid-stride loops do the rest).
BLOCKS_PER_SM = 16
#: attn_split blocks per multiprocessor the automatic split size aims for (4-5 fit at once).
ATTN_BLOCKS_PER_SM = 8


def _i32(v: int) -> np.int32:
    if not -(2**31) <= v < 2**31:
        raise ValueError(f"{v} does not fit a 32-bit kernel argument")
    return np.int32(v)


class _KernelBackend(BackendBase):
    """Shared implementation; ``launcher`` decides where kernels run."""

    name = "cupy"

    def __init__(self, launcher: Launcher, *, attention_split_tokens: int | None = None) -> None:
        self.launcher = launcher
        self.xp = launcher.xp
        #: tokens per attention split (a multiple of 32); None plans it from the device size.
        self.attention_split_tokens = attention_split_tokens

    # -- geometry ------------------------------------------------------------------------
    def _grid(self, total: int) -> tuple[int, int, int]:
        blocks = max(1, min(-(-total // K.THREADS), self.launcher.sm_count * BLOCKS_PER_SM))
        return (blocks, 1, 1)

    def _run(self, name: str, total: int, args: Sequence[Any]) -> None:
        if total > 0:
            self.launcher.launch(name, self._grid(total), (K.THREADS, 1, 1), args)

    # -- plumbing ------------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, self.xp.ndarray)

    def from_any(self, x: Any, *, like: Any = None) -> Any:
        xp = self.xp
        if isinstance(x, xp.ndarray):
            return x
        module = type(x).__module__.split(".")[0]
        if module == "torch":
            t = x.detach()
            if dtype_name(t) == "bfloat16":  # no bfloat16 array dtype here: exact upcast
                t = t.float()
            if xp is np:
                return t.cpu().numpy()
            if t.is_cuda:
                return xp.from_dlpack(t.contiguous())  # zero-copy on the same device
            return xp.asarray(t.numpy())
        if module == "cupy":  # only reached by the NumPy-array (CPU) variant
            return x.get()
        return xp.asarray(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        if self.xp is np:
            return np.asarray(x)
        return self.xp.asnumpy(x)

    def zeros(self, shape: Sequence[int], dtype: str, *, like: Any = None) -> Any:
        return self.xp.zeros(tuple(shape), dtype=dtype)

    def concat(self, arrays: Sequence[Any], axis: int) -> Any:
        return self.xp.concatenate(list(arrays), axis=axis)

    def first_nonfinite(self, x: Any):
        xp = self.xp
        if x.dtype.kind != "f":
            return None
        finite = xp.isfinite(x).reshape(-1)
        if bool(finite.all()):
            return None
        flat = int(xp.argmin(finite))
        idx = tuple(int(i) for i in np.unravel_index(flat, x.shape))
        return idx, float(x.reshape(-1)[flat])

    def min_max(self, x: Any):
        if x.size == 0:
            return None, None
        return x.min().item(), x.max().item()

    # -- helpers ---------------------------------------------------------------------------
    def _f32(self, x: Any) -> Any:
        """float32, C-contiguous (§1: exact upcast; float64 rounds to nearest even)."""
        return self.xp.ascontiguousarray(x, dtype=self.xp.float32)

    @staticmethod
    def _rows(shape: Sequence[int]) -> int:
        return int(math.prod(shape[:-1]))

    # -- §5 packing ------------------------------------------------------------------------
    def pack(self, codes: Any, bits: int) -> Any:
        """uint8 codes ``(..., n)`` -> uint8 ``(..., ceil(n*bits/8))``."""
        xp = self.xp
        codes = xp.ascontiguousarray(codes, dtype=xp.uint8)
        n = int(codes.shape[-1])
        rb = row_bytes(n, bits)
        out = xp.empty(codes.shape[:-1] + (rb,), dtype=xp.uint8)
        rows = self._rows(codes.shape)
        self._run(f"pack_codes<{bits}>", rows * rb, [codes, np.int64(rows), _i32(n), _i32(rb), out])
        return out

    def unpack(self, packed: Any, bits: int, n: int) -> Any:
        """uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``."""
        xp = self.xp
        packed = xp.ascontiguousarray(packed, dtype=xp.uint8)
        rb = int(packed.shape[-1])
        out = xp.empty(packed.shape[:-1] + (n,), dtype=xp.uint8)
        rows = self._rows(packed.shape)
        self._run(f"unpack_codes<{bits}>", rows * n, [packed, np.int64(rows), _i32(n), _i32(rb), out])
        return out

    # -- §3–§4 -------------------------------------------------------------------------------
    def quantize(self, x: Any, bits: int, group_size: int, meta_dtype: str, name: str = "x"):
        """x ``(..., n)`` -> (packed uint8 ``(..., rb)``, scale, zero ``(..., ng)``); bfloat16
        metadata is stored as its uint16 bit pattern."""
        xp = self.xp
        x32 = self._f32(x)
        n = int(x32.shape[-1])
        ng, rb = n_groups(n, group_size), row_bytes(n, bits)
        rows = self._rows(x32.shape)
        lead = x32.shape[:-1]
        scale = xp.empty(lead + (ng,), dtype=_META_STORAGE[meta_dtype])
        zero = xp.empty(lead + (ng,), dtype=_META_STORAGE[meta_dtype])
        bad = xp.empty(lead + (ng,), dtype=xp.int32)
        kind = _i32(_KIND[meta_dtype])
        self._run("quant_meta", rows * ng, [x32, np.int64(rows), _i32(n), _i32(group_size), _i32(ng),
                                            np.float32(2**bits - 1), kind, scale, zero, bad])
        if rows * ng and bool(bad.any()):  # metadata overflow (1) is reported before range overflow (2)
            flat = bad.reshape(-1)
            code = 1 if bool((flat == 1).any()) else 2
            index = tuple(int(i) for i in np.unravel_index(int(xp.argmax(flat == code)), bad.shape))
            raise meta_overflow_error(name, index, meta_dtype) if code == 1 else range_overflow_error(name, index)
        packed = xp.empty(lead + (rb,), dtype=xp.uint8)
        self._run(f"quant_pack<{bits}>", rows * rb, [x32, np.int64(rows), _i32(n), _i32(group_size), _i32(ng),
                                                     _i32(rb), kind, scale, zero, packed])
        return packed, scale, zero

    def dequantize(self, packed: Any, scale: Any, zero: Any, bits: int, group_size: int, n: int,
                   out_dtype: str = "float32") -> Any:
        """-> ``(..., n)``: float32, float16, or bfloat16 as its uint16 bit pattern."""
        xp = self.xp
        meta = _META_OF_STORAGE[str(scale.dtype)]
        packed = xp.ascontiguousarray(packed, dtype=xp.uint8)
        scale, zero = xp.ascontiguousarray(scale), xp.ascontiguousarray(zero, dtype=scale.dtype)
        rb, ng = int(packed.shape[-1]), int(scale.shape[-1])
        rows = self._rows(packed.shape)
        out = xp.empty(packed.shape[:-1] + (n,), dtype={"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[out_dtype])
        self._run(f"dequant<{bits}>", rows * n, [packed, scale, zero, np.int64(rows), _i32(n), _i32(group_size),
                                                 _i32(ng), _i32(rb), _i32(_KIND[meta]), _i32(_KIND[out_dtype]), out])
        return out

    # -- §6 16-bit rows ------------------------------------------------------------------------
    def encode_half(self, x: Any, high_dtype: str, name: str = "keys") -> Any:
        """x ``(..., n)`` -> uint8 ``(..., 2n)`` little-endian 16-bit words."""
        xp = self.xp
        x32 = self._f32(x)
        words = xp.empty(x32.shape, dtype=xp.uint16)
        bad = xp.empty(x32.shape, dtype=xp.int32)
        self._run("encode_half", x32.size, [x32, np.int64(x32.size), _i32(_KIND[high_dtype]), words, bad])
        if x32.size and bool(bad.any()):
            first = int(xp.argmax(bad.reshape(-1)))
            raise meta_overflow_error(name, tuple(int(i) for i in np.unravel_index(first, bad.shape)), high_dtype,
                                what="16-bit key channel")
        return words.view(xp.uint8).reshape(x32.shape[:-1] + (2 * int(x32.shape[-1]),))

    def decode_half(self, packed: Any, high_dtype: str) -> Any:
        xp = self.xp
        words = xp.ascontiguousarray(packed, dtype=xp.uint8).view(xp.uint16)
        out = xp.empty(words.shape, dtype=xp.float32)
        self._run("decode_half", words.size, [words, np.int64(words.size), _i32(_KIND[high_dtype]), out])
        return out

    # -- §7–§8 ------------------------------------------------------------------------------------
    def query_token_sums(self, q: Any, n_rep: int) -> Any:
        """q ``(B, H*n_rep, T, D)`` -> int64 ``(B, H, T, D)``."""
        xp = self.xp
        q32 = self._f32(q)
        B, Hq, T, D = (int(s) for s in q32.shape)
        H = Hq // n_rep
        out = xp.empty((B, H, T, D), dtype=xp.int64)
        self._run("query_token_sums", out.size, [q32, _i32(B), _i32(H), _i32(n_rep), _i32(T), _i32(D), out])
        return out

    def relevance(self, qsum: Any, count: int, n_rep: int) -> Any:
        xp = self.xp
        if count == 0:
            return xp.ones(tuple(qsum.shape), dtype=xp.float32)
        qsum = xp.ascontiguousarray(qsum, dtype=xp.int64)
        out = xp.empty(qsum.shape, dtype=xp.float32)
        self._run("relevance", qsum.size, [qsum, np.int64(qsum.size), np.int64(count * n_rep * FIXED_ONE), out])
        return out

    def difficulty(self, keys: Any, low_bits: int) -> Any:
        """keys ``(B, H, R, D)`` -> float32 ``(B, H, D)``."""
        xp = self.xp
        k32 = self._f32(keys)
        B, H, R, D = (int(s) for s in k32.shape)
        out = xp.empty((B, H, D), dtype=xp.float32)
        self._run("difficulty", out.size, [k32, np.int64(B * H), _i32(R), _i32(D), np.float32(2**low_bits - 1), out])
        return out

    def assign_budget(self, salience: Any, n_high: int, n_mid: int, tier_bits: Sequence[int]) -> Any:
        xp = self.xp
        a = self._f32(salience)
        D = int(a.shape[-1])
        out = xp.empty(a.shape, dtype=xp.uint8)
        high, mid, low = (_i32(int(b)) for b in tier_bits)
        self._run("assign_budget", a.size, [a, np.int64(a.size // D if D else 0), _i32(D), _i32(n_high), _i32(n_mid),
                                            high, mid, low, out])
        return out

    def assign_threshold(self, salience: Any, tau_high: float, tau_mid: float, tier_bits: Sequence[int]) -> Any:
        xp = self.xp
        a = self._f32(salience)
        out = xp.empty(a.shape, dtype=xp.uint8)
        high, mid, low = (_i32(int(b)) for b in tier_bits)
        self._run("assign_threshold", a.size, [a, np.int64(a.size), np.float32(tau_high), np.float32(tau_mid),
                                               high, mid, low, out])
        return out

    # -- fused attention ----------------------------------------------------------------------------
    def _ptr(self, a: Any) -> int:
        return int(a.ctypes.data) if self.xp is np else int(a.data.ptr)

    def attention_plan(self, storage: Any, layout: Any, B: int, H: int) -> dict[str, Any]:
        """Index tables of a cache's storage for :meth:`attention`: stacked tier maps
        ``(nkb, B*H*D)`` uint8, row index of each channel within its tier ``(nkb, B*H*D)``
        int32, pointer tables of key tiers ``(nkb, TIER_SLOTS, 3)`` and value chunks ``(nvc, 3)``
        (uint64: packed, scale, zero), token -> value chunk ``(nvq,)`` int32 and chunk
        (start, length, bits) ``(nvc, 3)`` int64. Holds references to every array it points to."""
        xp, cfg = self.xp, layout.config
        D, R = int(layout.head_dim), int(cfg.residual_length)
        keep: list[Any] = []
        blocks = storage.key_blocks
        nkb = len(blocks)
        kptr = np.zeros((max(nkb, 1), TIER_SLOTS, 3), dtype=np.uint64)
        if nkb:
            tm = xp.ascontiguousarray(xp.stack([blk.tier_map for blk in blocks]).reshape(nkb, -1), dtype=xp.uint8)
            row_index = xp.zeros(tm.shape, dtype=xp.int32)
            for w in {int(b) for blk in blocks for b in blk.tiers}:
                mask = tm == w
                row_index = xp.where(mask, xp.cumsum(mask, axis=1, dtype=xp.int32) - 1, row_index).astype(xp.int32)
            for j, blk in enumerate(blocks):
                for w, rows in blk.tiers.items():
                    arrays = [rows.packed] + ([rows.scale, rows.zero] if rows.scale is not None else [])
                    for s, a in enumerate(arrays):
                        a = xp.ascontiguousarray(a)
                        if s and _META_OF_STORAGE[str(a.dtype)] != cfg.meta_dtype:
                            raise TypeError(f"key block {j} tier {w} metadata is {a.dtype}, config says {cfg.meta_dtype}")
                        keep.append(a)
                        kptr[j, w, s] = self._ptr(a) if a.size else 0
        else:
            tm = xp.zeros((1, 1), dtype=xp.uint8)
            row_index = xp.zeros((1, 1), dtype=xp.int32)
        chunks = storage.value_rows
        sizes = [int(c.packed.shape[2]) for c in chunks]
        nvq = sum(sizes)
        vptr = np.zeros((max(len(chunks), 1), 3), dtype=np.uint64)
        vchunk = np.zeros((max(len(chunks), 1), 3), dtype=np.int64)
        start = 0
        for c, (rows, n) in enumerate(zip(chunks, sizes)):
            for s, a in enumerate((rows.packed, rows.scale, rows.zero)):
                a = xp.ascontiguousarray(a)
                keep.append(a)
                vptr[c, s] = self._ptr(a) if a.size else 0
            vchunk[c] = (start, n, int(rows.bits))
            start += n
        vtok = np.repeat(np.arange(len(chunks), dtype=np.int32), sizes) if nvq else np.zeros(1, np.int32)

        def residual(a: Any) -> tuple[Any, int]:
            if a is None or int(a.shape[2]) == 0:
                return xp.zeros(1, dtype=xp.float32), 0
            return self._f32(a), int(a.shape[2])

        res_k, rk = residual(storage.residual_keys)
        res_v, rv = residual(storage.residual_values)
        T = nkb * R + rk
        if T != nvq + rv:
            raise ValueError(f"cache storage holds {T} key tokens but {nvq + rv} value tokens")
        return dict(nkb=nkb, R=R, tm=tm, row_index=row_index, kptr=xp.asarray(kptr), res_k=res_k, nvq=nvq,
                    vtok=xp.asarray(vtok), vchunk=xp.asarray(vchunk), vptr=xp.asarray(vptr), res_v=res_v, T=T,
                    keep=keep)

    def attention(self, q: Any, storage: Any, layout: Any, *, scale: float, causal: bool, mask: Any = None,
                  window: "int | None" = None, softcap: "float | None" = None, plan: dict | None = None) -> Any:
        """Fused decode attention: q ``(B, Hq, Tq, D)`` -> float32 ``(B, Hq, Tq, D)``, reading the
        packed key blocks, packed values and the residual directly (flash-decoding splits).
        ``mask``: bool ``(B, Tq, T)`` (True = may attend) or None; ``window``: sliding-window
        size; ``softcap``: score soft-capping — all applied in the kernel. Heads wider than
        ATTN_MAXD (256) take :func:`mixkvq.backend.reference_attention` (correct, slow)."""
        xp, cfg = self.xp, layout.config
        q32 = self._f32(q)
        B, Hq, Tq, D = (int(s) for s in q32.shape)
        if D > K.ATTN_MAXD:
            # beyond the kernel's register/shared-memory plan: the history decoded by the format
            # kernels, then the float64 reference on the host — correct, slow, a dequantized copy
            return reference_attention(self, q32, storage, layout, scale=scale, causal=causal, mask=mask,
                                       window=window, softcap=softcap)
        tmpl = storage.residual_keys if storage.residual_keys is not None else storage.key_blocks[0].tier_map
        H = int(tmpl.shape[1])
        n_rep = Hq // H
        p = plan if plan is not None else self.attention_plan(storage, layout, B, H)
        T = p["T"]
        nz = -(-(n_rep * Tq) // K.ATTN_QROWS)
        split = self.attention_split_tokens
        if split is None:
            want = max(1, -(-ATTN_BLOCKS_PER_SM * self.launcher.sm_count // (B * H * nz)))
            split = -(-T // want)
        split = max(K.ATTN_TILE, -(-int(split) // K.ATTN_TILE) * K.ATTN_TILE)
        n_splits = -(-T // split)
        part_acc = xp.empty((n_splits, B, Hq, Tq, D), dtype=xp.float32)
        part_ml = xp.empty((n_splits, B, Hq, Tq, 2), dtype=xp.float32)
        high_kind = _KIND[cfg.high_dtype]
        if mask is not None:
            mask_u8 = xp.ascontiguousarray(xp.asarray(mask), dtype=xp.uint8)
            if tuple(mask_u8.shape) != (B, Tq, T):
                raise ValueError(f"mask has shape {tuple(mask_u8.shape)}; expected (B, Tq, T) = {(B, Tq, T)}")
        else:
            mask_u8 = xp.zeros(1, dtype=xp.uint8)
        self.launcher.launch("attn_split", (n_splits, B * H, nz), (K.ATTN_THREADS, 1, 1), [
            q32, _i32(B), _i32(H), _i32(n_rep), _i32(Tq), _i32(D), np.int64(T), np.float32(scale), _i32(int(causal)),
            mask_u8, _i32(int(mask is not None)), np.int64(window or 0), np.float32(softcap or 0.0),
            _i32(p["nkb"]), _i32(p["R"]), _i32(cfg.group_size), _i32(_KIND[cfg.meta_dtype]), _i32(high_kind),
            p["tm"], p["row_index"], p["kptr"], p["res_k"], np.int64(p["nvq"]), p["vtok"],
            p["vchunk"], p["vptr"], p["res_v"], np.int64(split), part_acc, part_ml])
        out = xp.empty((B, Hq, Tq, D), dtype=xp.float32)
        rows = B * Hq * Tq
        self._run("attn_combine", rows * D, [part_acc, part_ml, _i32(n_splits), np.int64(rows), _i32(D), out])
        return out


class CupyBackend(_KernelBackend):
    """The CUDA backend: CuPy arrays in and out (torch CUDA tensors enter zero-copy via DLPack).

    Importing needs no GPU; constructing one without a usable CUDA device raises RuntimeError.
    """

    name = "cupy"

    def __init__(self, **options: Any) -> None:
        super().__init__(CupyLauncher(), **options)


class CupyCpuBackend(_KernelBackend):
    """The same kernels, launch code and geometry, run on the CPU (NumPy arrays): the
    ``"cupy-cpu"`` backend used to cross-validate the CUDA source where no GPU exists."""

    name = "cupy-cpu"

    def __init__(self, **options: Any) -> None:
        from .cpu import CpuLauncher

        super().__init__(CpuLauncher(), **options)
