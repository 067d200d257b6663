"""mixkvq.sim — the NumPy bit-exact simulator: the executable form of docs/numerics.md.

Function names match the Backend protocol so one table drives the cross-validation of
every backend (``mixkvq.testing``). Readable first: one float operation per line.
"""

from .attention import attention
from .backend import NumpyBackend
from .floats import bf16_bits, bf16_to_float32, round_meta
from .packing import pack, unpack
from .quant import decode_half, dequantize, encode_half, quantize
from .rotation import hadamard, sign_vector
from .salience import assign_budget, assign_threshold, difficulty, query_token_sums, relevance

__all__ = [
    "NumpyBackend", "attention", "bf16_bits", "bf16_to_float32", "round_meta", "pack", "unpack",
    "quantize", "dequantize", "encode_half", "decode_half", "query_token_sums", "relevance",
    "difficulty", "assign_budget", "assign_threshold", "hadamard", "sign_vector",
]
