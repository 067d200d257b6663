"""TorchBackend: the Backend protocol on torch tensors (CPU or CUDA, same code).

Metadata uses torch's own float16 / bfloat16 / float32 dtypes (the simulator's uint16
bfloat16 bit patterns convert to ``torch.bfloat16`` with the same bits, and back).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from mixkvq.backend import BackendBase

from . import ops
from .attention import attention as _fast_attention

_DTYPES = {
    "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "bool": torch.bool, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float32": torch.float32, "float64": torch.float64,
}


def _device_of(like: Any) -> "torch.device | None":
    return like.device if isinstance(like, torch.Tensor) else None


class TorchBackend(BackendBase):
    """Bit-exact torch implementation of docs/numerics.md (see :mod:`mixkvq.backends.torch.ops`).

    Attributes:
        attention_chunk_tokens: most tokens :meth:`attention` decodes at once (whole key
            blocks; fewer when B*H*D is large, so a chunk's float codes stay near L2 size).
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
    def attention(self, q: torch.Tensor, storage: Any, layout: Any, *, scale: float, causal: bool,
                  mask: Any = None, window: "int | None" = None, softcap: "float | None" = None) -> torch.Tensor:
        """``softmax(q K^T * scale) V`` over a cache's storage -> float32 ``q.shape``.

        Scores and ``p @ V`` straight from the codes (scale/zero algebra, no dequantized
        keys or values; :mod:`mixkvq.backends.torch.attention`), all blocks of a chunk (at
        most :attr:`attention_chunk_tokens` tokens) at once, with an online softmax in float32.
        Grouped-query: query head ``j`` uses KV head ``j // n_rep``; query ``i`` of ``Tq``
        sits at position ``T - Tq + i`` and, when causal, sees positions up to its own.
        """
        return _fast_attention(self.attention_chunk_tokens, q, storage, layout, scale=scale, causal=causal,
                               mask=None if mask is None else self.from_any(mask, like=q), window=window,
                               softcap=softcap)
