"""NumpyBackend: the simulator exposed through the Backend protocol (the reference)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mixkvq.backend import BackendBase
from mixkvq.dtypes import dtype_name

from . import packing, quant, salience
from .attention import attention as reference_attention


class NumpyBackend(BackendBase):
    """The bit-exact reference. Every op is the literal text of docs/numerics.md."""

    name = "numpy"

    # -- plumbing ----------------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        return isinstance(x, np.ndarray)

    def from_any(self, x: Any, *, like: Any = None) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        module = type(x).__module__.split(".")[0]
        if module == "torch":
            t = x.detach().cpu()
            if dtype_name(t) == "bfloat16":  # NumPy has no bfloat16: exact upcast
                t = t.float()
            return t.numpy()
        if module == "cupy":
            return x.get()
        return np.asarray(x)

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: Sequence[int], dtype: str, *, like: Any = None) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=dtype)

    def concat(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        return np.concatenate(list(arrays), axis=axis)

    def first_nonfinite(self, x: Any):
        x = self.from_any(x)
        if x.dtype.kind != "f" and dtype_name(x) != "bfloat16":
            return None
        finite = np.isfinite(x.astype(np.float32) if dtype_name(x) == "bfloat16" else x)
        if finite.all():
            return None
        idx = np.unravel_index(int(np.argmin(finite.reshape(-1))), x.shape)
        return tuple(int(i) for i in idx), float(x[idx])

    def min_max(self, x: Any):
        x = self.from_any(x)
        if x.size == 0:
            return None, None
        return x.min().item(), x.max().item()

    # -- numerics ----------------------------------------------------------------------
    def pack(self, codes, bits):
        return packing.pack(codes, bits)

    def unpack(self, packed, bits, n):
        return packing.unpack(packed, bits, n)

    def quantize(self, x, bits, group_size, meta_dtype, name="x"):
        return quant.quantize(x, bits, group_size, meta_dtype, name)

    def dequantize(self, packed, scale, zero, bits, group_size, n, out_dtype="float32"):
        return quant.dequantize(packed, scale, zero, bits, group_size, n, out_dtype)

    def encode_half(self, x, high_dtype, name="keys"):
        return quant.encode_half(x, high_dtype, name)

    def decode_half(self, packed, high_dtype):
        return quant.decode_half(packed, high_dtype)

    def query_token_sums(self, q, n_rep):
        return salience.query_token_sums(q, n_rep)

    def relevance(self, qsum, count, n_rep):
        return salience.relevance(qsum, count, n_rep)

    def difficulty(self, keys, low_bits):
        return salience.difficulty(keys, low_bits)

    def assign_budget(self, salience_, n_high, n_mid, tier_bits):
        return salience.assign_budget(salience_, n_high, n_mid, tier_bits)

    def assign_threshold(self, salience_, tau_high, tau_mid, tier_bits):
        return salience.assign_threshold(salience_, tau_high, tau_mid, tier_bits)

    def attention(self, q, storage, layout, *, scale, causal, mask=None, window=None, softcap=None):
        keys, values = layout.dequantized(self, storage)
        return reference_attention(quant.to_float32(q), keys, values, scale=scale, causal=causal, mask=mask,
                                   window=window, softcap=softcap)
