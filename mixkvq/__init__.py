"""mixkvq — query-aware mixed-precision KV-cache quantization (MixKVQ).

The format is defined by docs/numerics.md and implemented literally by the NumPy simulator
(:mod:`mixkvq.sim`); backends (:mod:`mixkvq.backends`) reproduce its bytes exactly.

Public API: configs (:class:`MixKVQConfig` and its parts), the streaming :class:`KVCache`,
one-shot :func:`quantize` / :func:`dequantize` / :func:`pack` / :func:`unpack`, the
Walsh–Hadamard rotation (:func:`hadamard`, :class:`Rotation`, docs/numerics.md §11), persistence
(:func:`save_cache`, :func:`load_cache`, :func:`save_tensors`, :func:`load_tensors`), the
per-layer budget profile :class:`LayerProfile`, and the backend and policy registries. The
stored structures are in :mod:`mixkvq.layout` and :mod:`mixkvq.state`.
"""

from .api import QTensor, dequantize, pack, quantize, unpack
from .apps.layer_budget import LayerProfile
from .backend import Backend, available_backends, get_backend, register_backend
from .cache import KVCache
from .config import MixKVQConfig
from .format import FORMAT_VERSION
from .io import CacheFileError, load_cache, load_tensors, save_cache, save_tensors
from .rotation import Rotation, hadamard, sign_vector
from .policy import SaliencePolicy, available_policies, get_policy, register_policy
from .schemes import BudgetKeys, RateDistortionKeys, ThresholdKeys, TierRotation, UniformKeys, ValueQuant

__version__ = "0.2.0"

__all__ = [
    "MixKVQConfig", "UniformKeys", "BudgetKeys", "ThresholdKeys", "RateDistortionKeys", "ValueQuant", "TierRotation",
    "KVCache",
    "QTensor", "quantize", "dequantize", "pack", "unpack",
    "hadamard", "sign_vector", "Rotation",
    "save_cache", "load_cache", "save_tensors", "load_tensors", "CacheFileError",
    "LayerProfile",
    "Backend", "available_backends", "get_backend", "register_backend",
    "SaliencePolicy", "available_policies", "get_policy", "register_policy",
    "FORMAT_VERSION", "__version__",
]
