"""The Backend protocol and the backend registry.

A backend provides the primitive operations of docs/numerics.md on its own array type
(NumPy for the simulator, torch, CuPy). Everything above them — validation, the packed
layout, the streaming cache — is written once in the core and calls these ops. The
simulator (:class:`mixkvq.sim.NumpyBackend`) is the reference every backend must match byte
for byte; ``mixkvq.testing.check_backend`` proves it.

Backends are chosen by name: the ``backend=`` argument or config field, else the
environment variable ``MIXKVQ_BACKEND``, else the kind of array passed in (NumPy arrays ->
``numpy``, torch tensors -> ``torch``, CuPy arrays -> ``cupy``). An explicitly named backend
that cannot load raises; nothing silently falls back to another backend. Third-party
backends register through the entry-point group ``mixkvq.backends`` or
:func:`register_backend`.
"""

from __future__ import annotations

import importlib
import os
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from .format import HIGH_BITS

ENV_VAR = "MIXKVQ_BACKEND"


@runtime_checkable
class Backend(Protocol):
    """Operations a backend provides. Arrays are the backend's own type.

    All quantization ops work along the **last axis** (callers move axes); inputs are
    validated by :mod:`mixkvq.validation` before an op is called.
    """

    name: str

    # -- array plumbing ----------------------------------------------------------------
    def is_native(self, x: Any) -> bool:
        """Whether ``x`` is this backend's array type."""

    def from_any(self, x: Any, *, like: Any = None) -> Any:
        """Convert a NumPy / torch / CuPy array to this backend's type (exactly, keeping dtype;
        on ``like``'s device when given)."""

    def to_numpy(self, x: Any) -> Any:
        """A NumPy copy (bfloat16 becomes its uint16 bit pattern)."""

    def zeros(self, shape: Sequence[int], dtype: str, *, like: Any = None) -> Any: ...

    def concat(self, arrays: Sequence[Any], axis: int) -> Any: ...

    def first_nonfinite(self, x: Any) -> "tuple[tuple[int, ...], float] | None":
        """Index (row-major first) and value of the first NaN/Inf in ``x``, or None."""

    def min_max(self, x: Any) -> "tuple[Any, Any]":
        """Python scalars (min, max) of an array, (None, None) when empty."""

    # -- numerics (docs/numerics.md) ---------------------------------------------------
    def pack(self, codes: Any, bits: int) -> Any:
        """§5: codes ``(..., n)`` (< 2^bits) -> uint8 ``(..., ceil(n*bits/8))``."""

    def unpack(self, packed: Any, bits: int, n: int) -> Any:
        """§5 inverse: uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``."""

    def quantize(self, x: Any, bits: int, group_size: int, meta_dtype: str, name: str) -> "tuple[Any, Any, Any]":
        """§3 along the last axis: ``x (..., n)`` -> (packed uint8 ``(..., row_bytes)``,
        scale ``(..., n_groups)``, zero ``(..., n_groups)``) in ``meta_dtype``.
        Raises ValueError naming ``name`` when metadata overflows (§2)."""

    def dequantize(self, packed: Any, scale: Any, zero: Any, bits: int, group_size: int, n: int, out_dtype: str) -> Any:
        """§4 along the last axis -> ``(..., n)`` in ``out_dtype``."""

    def encode_half(self, x: Any, high_dtype: str, name: str) -> Any:
        """§6 16-bit rows: ``x (..., n)`` -> uint8 ``(..., 2n)`` little-endian ``high_dtype`` words."""

    def decode_half(self, packed: Any, high_dtype: str) -> Any:
        """Inverse of :meth:`encode_half` -> float32 ``(..., n)``."""

    def query_token_sums(self, q: Any, n_rep: int) -> Any:
        """§7 steps 1–3: ``q (B, H*n_rep, T, D)`` -> int64 ``(B, H, T, D)`` fixed-point sums."""

    def query_segment_sums(self, q: Any, n_rep: int, bounds: Sequence[int]) -> Any:
        """§7 steps 1–3 summed over token segments: ``q (B, H*n_rep, T, D)`` and ascending
        ``bounds`` ``b_0 <= … <= b_S`` in ``[0, T]`` -> int64 ``(B, H, S, D)``, segment ``s`` the
        sum of :meth:`query_token_sums` over tokens ``[b_s, b_{s+1})`` (:class:`BackendBase`
        composes it; a native backend fuses it)."""

    def relevance(self, qsum: Any, count: int, n_rep: int) -> Any:
        """§7 step 5: int64 ``(B, H, D)`` -> float32 ``(B, H, D)``."""

    def difficulty(self, keys: Any, low_bits: int) -> Any:
        """§8: keys ``(B, H, R, D)`` -> float32 ``(B, H, D)``."""

    def assign_budget(self, salience: Any, n_high: int, n_mid: int, tier_bits: Sequence[int]) -> Any:
        """§8 budget mode -> uint8 tier map ``(B, H, D)``; ``tier_bits`` = (high, mid, low) widths."""

    def assign_threshold(self, salience: Any, tau_high: float, tau_mid: float, tier_bits: Sequence[int]) -> Any:
        """§8 threshold mode -> uint8 tier map ``(B, H, D)``."""

    def encode_key_block(self, keys: Any, tier_map: Any, widths: Sequence[int], group_size: int, meta_dtype: str,
                         high_dtype: str, name: str) -> "dict[int, tuple[Any, Any, Any]]":
        """§6: a key block ``keys (B, H, R, D)`` by its tier map -> ``{width: (packed, scale,
        zero)}`` for every width of ``widths`` (16-bit rows: ``(packed, None, None)``); rows
        of a width in ``(b, h, d)`` order. :class:`BackendBase` composes it from ``quantize``
        and ``encode_half``; a backend may do it in one call."""

    def attention(self, q: Any, storage: Any, layout: Any, *, scale: float, causal: bool, mask: Any = None,
                  window: "int | None" = None, softcap: "float | None" = None) -> Any:
        """softmax(q K^T * scale) V over a :class:`mixkvq.state.Storage` read with a
        :class:`mixkvq.layout.PackedLayout` -> float32 ``q.shape``. Query ``i`` of ``Tq`` sits
        at position ``T - Tq + i`` and, when causal, sees positions up to its own; ``mask``
        (bool ``(B, Tq, T)``, True = may attend, the same for every head) removes more (padding);
        ``window`` (sliding layers) hides positions ``<= own - window``; ``softcap`` replaces each
        scaled score ``s`` by ``softcap * tanh(s / softcap)``. A query row that sees no token
        returns zeros."""


class BackendBase:
    """Default implementations of the composite ops, written on the primitive ones.

    A backend subclasses this and overrides what it can do faster natively (one kernel for a
    whole key block, say); the defaults are the spec's composition, so they are right for any
    backend whose primitives are.
    """

    def encode_key_block(self, keys: Any, tier_map: Any, widths: Sequence[int], group_size: int, meta_dtype: str,
                         high_dtype: str, name: str = "keys") -> "dict[int, tuple[Any, Any, Any]]":
        channel_rows = keys.swapaxes(-1, -2)  # (B, H, D, R): one row per channel, along tokens
        out = {}
        for bits in widths:
            rows = channel_rows[tier_map == bits]
            if bits == HIGH_BITS:
                out[bits] = (self.encode_half(rows, high_dtype, name), None, None)
            else:
                out[bits] = self.quantize(rows, bits, group_size, meta_dtype, name)
        return out

    def query_segment_sums(self, q: Any, n_rep: int, bounds: Sequence[int]) -> Any:
        """Per-segment §7 sums (see :class:`Backend`) from :meth:`query_token_sums`: the sums
        are exact integers, so any grouping of them gives the same bits."""
        b = segment_bounds(bounds, int(q.shape[2]))
        u = self.query_token_sums(q, n_rep)  # int64 (B, H, T, D)
        B, H, _, D = (int(s) for s in u.shape)
        if len(b) < 2:
            return self.zeros((B, H, 0, D), "int64", like=u)
        return self.concat([u[:, :, int(lo):int(hi)].sum(axis=2)[:, :, None] for lo, hi in zip(b[:-1], b[1:])], 2)

    def hadamard(self, x: Any, signs: Any, sizes: Sequence[int], inverse: bool = False) -> Any:
        """docs/numerics.md §11 along the last axis: ``x (..., n)`` (finite, validated by the
        caller) -> float32 ``(..., n)``; ``signs`` a float32 ``(n,)`` ±1 array of this
        backend or None; ``sizes`` the blocks (powers of two summing to ``n``, in channel
        order, :func:`mixkvq.sim.rotation.block_sizes`). The default is
        :func:`hadamard_rows`, written on reshapes, slices, ``+``, ``-``, ``*`` and
        :meth:`concat`, which are IEEE float32 operations on every built-in array type."""
        return hadamard_rows(self, x, signs, sizes, inverse)


def segment_bounds(bounds: Sequence[int], n_tokens: int) -> np.ndarray:
    """``bounds`` as int64 after checking them: ascending (non-decreasing) within ``[0, n_tokens]``."""
    b = np.asarray(bounds)
    if b.ndim != 1 or (b.size and b.dtype.kind not in "iu"):
        raise TypeError(f"segment bounds must be a 1-D sequence of integers; got {b.dtype} shape {b.shape}")
    b = b.astype(np.int64)
    if b.size and (b[0] < 0 or b[-1] > n_tokens or bool((np.diff(b) < 0).any())):
        raise ValueError(f"segment bounds must ascend within [0, {n_tokens}] (the query's tokens); got {b.tolist()}")
    return b


def hadamard_rows(backend: Backend, x: Any, signs: Any, sizes: Sequence[int], inverse: bool = False) -> Any:
    """§11 rotation along the last axis on any backend whose arrays support ``reshape``,
    basic slicing and IEEE float32 ``+ - *`` (NumPy, CuPy, torch). Per block of ``P``
    channels, stage ``h`` views it as ``(P / 2h, 2, h)``, whose two middle slices are the
    pairs ``(i, i + h)``, ``i & h == 0``, and concatenates ``(a + b, a - b)`` back in place;
    then one multiply by the block's ``c_P``. The result is not checked for overflow here
    (callers check it, :func:`mixkvq.rotation.hadamard`)."""
    import numpy as np

    from .schemes import as_float32
    from .sim.rotation import norm_constant

    with np.errstate(over="ignore", invalid="ignore"):  # NumPy arrays: an overflow is the caller's to report
        x = as_float32(x)
        lead = tuple(int(s) for s in x.shape[:-1])
        if signs is not None and not inverse:
            x = x * signs
        parts, start = [], 0
        for P in sizes:
            y = x[..., start:start + P]
            h = 1
            while h < P:
                v = y.reshape(lead + (P // (2 * h), 2, h))
                a, b = v[..., 0:1, :], v[..., 1:2, :]
                y = backend.concat([a + b, a - b], axis=-2).reshape(lead + (P,))
                h *= 2
            parts.append(y * backend.from_any(np.array(norm_constant(P), dtype=np.float32), like=x))
            start += P
        x = parts[0] if len(parts) == 1 else backend.concat(parts, axis=-1)
        if signs is not None and inverse:
            x = x * signs
    return x


def reference_attention(backend: Backend, q: Any, storage: Any, layout: Any, *, mask: Any = None, **kw: Any) -> Any:
    """The simulator's float64 attention (docs/numerics.md §9) over a storage decoded by
    ``backend``'s own format ops, computed on the host and returned as ``backend``'s float32
    array. Correct for every input and slow (it forms the dequantized history): the answer
    where a fused path cannot give one (a float32 logit overflow, a case a kernel lacks)."""
    import numpy as np

    from .schemes import as_float32
    from .sim.attention import attention as sim_attention

    def host(x: Any) -> Any:  # float32 first: to_numpy gives a bfloat16 array as its uint16 bits
        return np.asarray(backend.to_numpy(as_float32(x)), dtype=np.float32)

    k, v = layout.dequantized(backend, storage)
    m = None if mask is None else np.asarray(backend.to_numpy(mask), dtype=bool)
    return backend.from_any(sim_attention(host(q), host(k), host(v), mask=m, **kw), like=q)


_FACTORIES: dict[str, Callable[[], Backend]] = {}
_BUILTIN = {
    "numpy": "mixkvq.sim.backend:NumpyBackend",
    "torch": "mixkvq.backends.torch:TorchBackend",
    "cpu": "mixkvq.backends.cpu:CpuBackend",  # native C++ kernels on CPU torch tensors
    "cupy": "mixkvq.backends.cupy:CupyBackend",
    "cupy-cpu": "mixkvq.backends.cupy:CupyCpuBackend",  # the CUDA sources run on the CPU (CI)
}
_INSTANCES: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable[[], Backend], *, overwrite: bool = False) -> None:
    """Register a backend factory under ``name``."""
    if (name in _FACTORIES or name in _BUILTIN) and not overwrite:
        raise ValueError(f"a backend named {name!r} is already registered (pass overwrite=True)")
    _FACTORIES[name] = factory
    _INSTANCES.pop(name, None)


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group="mixkvq.backends")}


def available_backends() -> list[str]:
    """Every backend name that can be asked for (loading may still fail, e.g. no GPU)."""
    return sorted(set(_BUILTIN) | set(_FACTORIES) | set(_entry_points()))


def _load(name: str) -> Backend:
    if name in _FACTORIES:
        return _FACTORIES[name]()
    if name in _BUILTIN:
        module, _, attr = _BUILTIN[name].partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            raise RuntimeError(
                f"backend {name!r} is not usable here: {exc}. "
                f"Install its extra (pip install 'mixkvq[{name}]') or choose another backend."
            ) from exc
        return cls()
    eps = _entry_points()
    if name in eps:
        return eps[name].load()()
    raise ValueError(f"unknown backend {name!r}; available backends: {', '.join(available_backends())}")


def get_backend(name: "str | Backend | None" = None, *, like: Any = None) -> Backend:
    """Resolve a backend: explicit name or object, else ``$MIXKVQ_BACKEND``, else by array kind."""
    if name is not None and not isinstance(name, str):
        if isinstance(name, Backend):
            return name
        raise TypeError(f"backend must be a name or a Backend, got {type(name).__name__}")
    if name is None:
        name = os.environ.get(ENV_VAR) or None
    if name is None:
        name = array_kind(like) if like is not None else "numpy"
    if name not in _INSTANCES:
        _INSTANCES[name] = _load(name)
    return _INSTANCES[name]


def array_kind(x: Any) -> str:
    """``"torch"``, ``"cupy"`` or ``"numpy"`` for an array (anything else is NumPy-convertible)."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        return "torch"
    if module == "cupy":
        return "cupy"
    return "numpy"


def convert_like(y: Any, template: Any, backend: Backend) -> Any:
    """Return backend array ``y`` as the same kind of array as ``template`` (and its device)."""
    kind = array_kind(template)
    if kind == backend.name or backend.is_native(template):
        return y
    if kind == "numpy":  # the backend's own exact export (bfloat16 -> uint16 bits, as the simulator stores it)
        return backend.to_numpy(y)
    return get_backend(kind).from_any(y, like=template)
