"""TorchBackend: the Backend protocol on torch tensors (CPU or CUDA, same code).

Metadata uses torch's own float16 / bfloat16 / float32 dtypes (the simulator's uint16
bfloat16 bit patterns convert to ``torch.bfloat16`` with the same bits, and back).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from mixkvq.config import HIGH_BITS

from . import ops

_DTYPES = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}


def _device_of(like: Any) -> "torch.device | None":
    return like.device if isinstance(like, torch.Tensor) else None


class TorchBackend:
    """Bit-exact torch implementation of docs/numerics.md (see :mod:`mixkvq.backends.torch.ops`).

    Attributes:
        attention_chunk_tokens: tokens dequantized at once by :meth:`attention` (whole key
            blocks; the online softmax never holds more of the history in float32).
    """

    name = "torch"
    attention_chunk_tokens: int = 4096

    # -- plumbing ----------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def from_any(self, x: Any, *, like: Any = None) -> torch.Tensor:
        """NumPy / torch / CuPy -> torch, exactly; NumPy ``uint16`` (the simulator's bfloat16
        bit patterns) and ml_dtypes ``bfloat16`` become ``torch.bfloat16`` with the same bits."""
        device = _device_of(like)
        if isinstance(x, torch.Tensor):
            return x if device is None or x.device == device else x.to(device)
        module = type(x).__module__.split(".")[0]
        if module == "cupy":
            t = torch.from_dlpack(x)
            return t if device is None else t.to(device)
        arr = np.asarray(x)
        if arr.dtype == np.uint16 or arr.dtype.name == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16).copy()).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(arr, copy=True, order="C"))
        return t if device is None else t.to(device)

    def to_numpy(self, x: Any) -> np.ndarray:
        """A NumPy copy; ``torch.bfloat16`` becomes its ``uint16`` bit pattern."""
        if not isinstance(x, torch.Tensor):
            return np.asarray(x)
        t = x.detach().to("cpu")
        if t.dtype == torch.bfloat16:
            return t.contiguous().view(torch.int16).numpy().view(np.uint16).copy()
        return t.numpy().copy()

    def zeros(self, shape: Sequence[int], dtype: str, *, like: Any = None) -> torch.Tensor:
        return torch.zeros(tuple(int(s) for s in shape), dtype=_DTYPES[str(dtype)], device=_device_of(like))

    def concat(self, arrays: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
        return torch.cat(list(arrays), dim=axis)

    def first_nonfinite(self, x: Any) -> "tuple[tuple[int, ...], float] | None":
        if not isinstance(x, torch.Tensor):
            x = self.from_any(x)
        if not x.is_floating_point() or x.numel() == 0:
            return None
        bad = ~torch.isfinite(x)
        if not bool(bad.any()):
            return None
        flat = int(torch.argmax(bad.reshape(-1).to(torch.uint8)))  # first maximum = first bad element
        index = tuple(int(i) for i in np.unravel_index(flat, tuple(x.shape)))
        return index, float(x.reshape(-1)[flat])

    def min_max(self, x: Any) -> "tuple[Any, Any]":
        if not isinstance(x, torch.Tensor):
            x = self.from_any(x)
        if x.numel() == 0:
            return None, None
        return x.min().item(), x.max().item()

    # -- numerics (docs/numerics.md) -----------------------------------------------------
    def pack(self, codes: torch.Tensor, bits: int) -> torch.Tensor:
        """§5: uint8 codes ``(..., n)`` -> uint8 ``(..., ceil(n*bits/8))``."""
        return ops.pack(codes, bits)

    def unpack(self, packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
        """§5 inverse: uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``."""
        return ops.unpack(packed, bits, n)

    def quantize(self, x: torch.Tensor, bits: int, group_size: int, meta_dtype: str, name: str = "x"):
        """§3: ``x (..., n)`` -> (packed uint8, scale, zero ``(..., ceil(n/G))`` in ``meta_dtype``)."""
        return ops.quantize(x, bits, group_size, meta_dtype, name)

    def dequantize(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   group_size: int, n: int, out_dtype: str = "float32") -> torch.Tensor:
        """§4: -> ``(..., n)`` in ``out_dtype``."""
        return ops.dequantize(packed, scale, zero, bits, group_size, n, out_dtype)

    def encode_half(self, x: torch.Tensor, high_dtype: str, name: str = "keys") -> torch.Tensor:
        """§6: ``(..., n)`` -> uint8 ``(..., 2n)`` little-endian 16-bit words."""
        return ops.encode_half(x, high_dtype, name)

    def decode_half(self, packed: torch.Tensor, high_dtype: str) -> torch.Tensor:
        return ops.decode_half(packed, high_dtype)

    def query_token_sums(self, q: torch.Tensor, n_rep: int) -> torch.Tensor:
        """§7: ``(B, H*n_rep, T, D)`` -> int64 ``(B, H, T, D)``."""
        return ops.query_token_sums(q, n_rep)

    def relevance(self, qsum: torch.Tensor, count: int, n_rep: int) -> torch.Tensor:
        """§7: int64 ``(B, H, D)`` -> float32 ``(B, H, D)``."""
        return ops.relevance(qsum, count, n_rep)

    def difficulty(self, keys: torch.Tensor, low_bits: int) -> torch.Tensor:
        """§8: ``(B, H, R, D)`` -> float32 ``(B, H, D)``."""
        return ops.difficulty(keys, low_bits)

    def assign_budget(self, salience: torch.Tensor, n_high: int, n_mid: int, tier_bits: Sequence[int]) -> torch.Tensor:
        """§8 budget mode -> uint8 tier map ``(B, H, D)``."""
        return ops.assign_budget(salience, n_high, n_mid, tier_bits)

    def assign_threshold(self, salience: torch.Tensor, tau_high: float, tau_mid: float, tier_bits: Sequence[int]) -> torch.Tensor:
        """§8 threshold mode -> uint8 tier map ``(B, H, D)``."""
        return ops.assign_threshold(salience, tau_high, tau_mid, tier_bits)

    # -- attention ------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, view: Any, *, scale: float, causal: bool) -> torch.Tensor:
        """``softmax(q K^T * scale) V`` over a cache view -> float32 ``q.shape``.

        Flash-decoding style: key blocks are dequantized a few at a time (at most
        :attr:`attention_chunk_tokens` tokens), values per token range (so sliding-window
        value chunks need not line up with key blocks), with an online softmax in float32.
        Grouped-query: query head ``j`` uses KV head ``j // n_rep``; query ``i`` of ``Tq``
        sits at position ``T - Tq + i`` and, when causal, sees positions up to its own.
        """
        return _attention(self, q, view, scale=scale, causal=causal)


# ------------------------------------------------------------------------------------------
def _decode_key_blocks(blocks: list[Any], config: Any) -> torch.Tensor:
    """Several key blocks of ``R`` tokens -> float32 ``(B, H, D, k*R)`` (channel-major, for q @ K)."""
    tier_maps = torch.stack([b.tier_map for b in blocks])  # (k, B, H, D)
    k, B, H, D = tier_maps.shape
    R = blocks[0].n_tokens
    out = torch.empty((B, H, D, k, R), dtype=torch.float32, device=tier_maps.device)
    out_blocks = out.permute(3, 0, 1, 2, 4)  # (k, B, H, D, R): rows in (block, b, h, d) order
    widths = sorted({w for b in blocks for w in b.tiers})
    for bits in widths:
        tiers = [b.tiers[bits] for b in blocks if bits in b.tiers]
        packed = torch.cat([t.packed for t in tiers]) if len(tiers) > 1 else tiers[0].packed
        if packed.shape[0] == 0:
            continue
        if bits == HIGH_BITS:
            values = ops.decode_half(packed, config.high_dtype)
        else:
            scale = torch.cat([t.scale for t in tiers]) if len(tiers) > 1 else tiers[0].scale
            zero = torch.cat([t.zero for t in tiers]) if len(tiers) > 1 else tiers[0].zero
            values = ops.dequantize(packed, scale, zero, bits, config.group_size, R)
        out_blocks[tier_maps == bits] = values
    return out.reshape(B, H, D, k * R)


class _ValueReader:
    """Float32 values for any token range, from per-token chunks and the residual."""

    def __init__(self, view: Any) -> None:
        self.view = view
        self.starts: list[int] = []
        pos = 0
        for rows in view.value_rows:
            self.starts.append(pos)
            pos += rows.n_tokens
        self.residual_start = pos

    def range(self, a: int, b: int) -> torch.Tensor:
        cfg, pieces = self.view.config, []
        for start, rows in zip(self.starts, self.view.value_rows):
            end = start + rows.n_tokens
            lo, hi = max(a, start), min(b, end)
            if lo < hi:
                sl = slice(lo - start, hi - start)
                bits = getattr(rows, "bits", cfg.value_bits)
                pieces.append(ops.dequantize(rows.packed[:, :, sl], rows.scale[:, :, sl], rows.zero[:, :, sl],
                                             bits, cfg.group_size, self.view.head_dim))
        res = self.view.residual_values
        if res is not None and b > self.residual_start:
            pieces.append(ops.to_float32(res[:, :, max(a, self.residual_start) - self.residual_start: b - self.residual_start]))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


def _attention(backend: TorchBackend, q: torch.Tensor, view: Any, *, scale: float, causal: bool) -> torch.Tensor:
    cfg = view.config
    q32 = ops.to_float32(q)
    B, Hq, Tq, D = q32.shape
    blocks = view.key_blocks
    res_k = view.residual_keys
    n_res = int(res_k.shape[2]) if res_k is not None else 0
    H = int(blocks[0].tier_map.shape[1]) if blocks else int(res_k.shape[1])
    n_rep = Hq // H
    T = sum(b.n_tokens for b in blocks) + n_res
    M = n_rep * Tq
    qg = q32.reshape(B, H, M, D)  # row r*Tq + i: query head h*n_rep + r, query i
    device = q32.device
    row_pos = (T - Tq) + torch.arange(M, device=device) % Tq
    masked = causal and Tq > 1
    m = torch.full((B, H, M, 1), -math.inf, dtype=torch.float32, device=device)
    l = torch.zeros((B, H, M, 1), dtype=torch.float32, device=device)
    acc = torch.zeros((B, H, M, D), dtype=torch.float32, device=device)
    values = _ValueReader(view)

    def step(start: int, keys_t: torch.Tensor) -> None:  # keys_t: float32 (B, H, D, n)
        nonlocal m, l, acc
        n = int(keys_t.shape[-1])
        s = torch.matmul(qg, keys_t).mul_(scale)  # (B, H, M, n)
        if masked:
            tok = torch.arange(start, start + n, device=device)
            s.masked_fill_(tok[None, :] > row_pos[:, None], -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        corr = torch.exp(m - m_new)
        p = torch.exp(s.sub_(m_new))
        l = l * corr + p.sum(dim=-1, keepdim=True)
        acc = acc * corr + torch.matmul(p, values.range(start, start + n))
        m = m_new

    R = cfg.residual_length
    per_chunk = max(1, backend.attention_chunk_tokens // max(1, R))
    pos = 0
    for j in range(0, len(blocks), per_chunk):
        group = blocks[j: j + per_chunk]
        if len({b.n_tokens for b in group}) != 1:  # (blocks always hold R tokens; be safe)
            for b in group:
                step(pos, _decode_key_blocks([b], cfg))
                pos += b.n_tokens
            continue
        step(pos, _decode_key_blocks(group, cfg))
        pos += sum(b.n_tokens for b in group)
    chunk = max(1, backend.attention_chunk_tokens)
    for a in range(0, n_res, chunk):
        keys_t = ops.to_float32(res_k[:, :, a: a + chunk]).transpose(-1, -2)
        step(pos, keys_t)
        pos += int(keys_t.shape[-1])
    out = acc / l
    return out.reshape(B, Hq, Tq, D)
