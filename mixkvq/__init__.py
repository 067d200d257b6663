"""mixkvq — query-aware mixed-precision KV-cache quantization (MixKVQ).

The format is defined by docs/numerics.md and implemented literally by the NumPy simulator
(:mod:`mixkvq.sim`); backends (:mod:`mixkvq.backends`) reproduce its bytes exactly.
"""

from .api import QTensor, dequantize, pack, quantize, unpack
from .backend import Backend, available_backends, get_backend, register_backend
from .cache import CacheView, KVCache
from .config import MixKVQConfig
from .layout import KeyBlock, PackedLayout, TierRows, ValueRows
from .policy import SaliencePolicy, available_policies, get_policy, register_policy

__version__ = "0.1.0"
FORMAT_VERSION = 1

__all__ = [
    "QTensor", "quantize", "dequantize", "pack", "unpack",
    "Backend", "available_backends", "get_backend", "register_backend",
    "KVCache", "CacheView", "MixKVQConfig",
    "KeyBlock", "PackedLayout", "TierRows", "ValueRows",
    "SaliencePolicy", "available_policies", "get_policy", "register_policy",
    "FORMAT_VERSION", "__version__",
]
