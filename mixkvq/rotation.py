"""The normalised Walsh–Hadamard rotation of docs/numerics.md §11, on any backend.

Rotating keys (after RoPE) and values over their channels before quantizing spreads an
outlier channel's energy over every coordinate, so per-token groups quantize well — the
recipe of llama.cpp's rotated quantized KV cache and of TurboQuant (random signs, then a
Hadamard transform). This module is the validated public entry point:

* :func:`hadamard` — the bit-exact rotation (or its inverse) along one axis, on the backend
  of the array (or the one named), returning the same kind of array;
* :func:`sign_vector` — the ±1 vector of a seed (SplitMix64, §11.2);
* :class:`Rotation` — a head size, a seed and a block size bundled for repeated use.

The simulator's literal form is :func:`mixkvq.sim.rotation.hadamard`; every backend's
:meth:`~mixkvq.backend.BackendBase.hadamard` reproduces its bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .backend import Backend, convert_like, get_backend, hadamard_rows
from .sim.rotation import block_sizes, norm_constant, sign_vector
from .schemes import as_float32
from .validation import check_finite, check_float_tensor, normalize_axis


def hadamard(x: Any, *, axis: int = -1, signs: Any = None, seed: "int | None" = None, block_size: "int | None" = None,
             inverse: bool = False, backend: "str | Backend | None" = None, name: str = "x") -> Any:
    """Rotate ``x`` over ``axis`` by the normalised Walsh–Hadamard transform (docs/numerics.md §11).

    Args:
        x: float16 / bfloat16 / float32 (float64 rounds to float32) array or tensor.
        axis: the rotated (channel) axis.
        signs: optional ±1 vector of length ``x.shape[axis]`` applied before the transform
            (after it when ``inverse``); or give ``seed`` for :func:`sign_vector`'s.
        seed: 0..2^64-1; the signs of :func:`sign_vector` (exclusive with ``signs``).
        block_size: a power of two dividing the axis length: blocks of that many consecutive
            channels are rotated independently. Default: blocks by the binary expansion of
            the length, largest first (64 -> one block; 96 -> 64 + 32).
        inverse: the inverse rotation (butterfly, multiply, then signs). A forward/inverse
            round trip is within a few float32 roundings of the input, not bit-exact.
        backend: backend name or object; default ``$MIXKVQ_BACKEND`` or the array's kind.
        name: the tensor's name in error messages.

    Returns:
        float32, the shape of ``x``, the same kind of array as ``x``.

    Raises:
        ValueError: a non-finite input (naming ``name`` and the index), a rotation whose
            result overflows float32, a bad ``block_size`` or ``signs``.
    """
    check_float_tensor(x, name)
    if len(x.shape) == 0:
        raise ValueError(f"{name} must have at least one dimension to rotate along")
    ax = normalize_axis(axis, len(x.shape))
    n = int(x.shape[ax])
    sizes = block_sizes(n, block_size)
    if signs is not None and seed is not None:
        raise ValueError("give signs or seed, not both")
    s = sign_vector(n, seed) if seed is not None else None
    if signs is not None:
        s = np.asarray(signs.detach().cpu() if hasattr(signs, "detach") else signs, dtype=np.float32).reshape(-1)
        if s.shape != (n,) or not np.all((s == 1.0) | (s == -1.0)):
            raise ValueError(f"signs must be {n} values, each +1 or -1 (the length of {name} along axis {axis})")
    be = get_backend(backend, like=x)
    check_finite(x, name, be)
    xb = be.from_any(x)
    xb = xb.swapaxes(ax, -1)
    sb = None if s is None else be.from_any(s, like=xb)
    op = getattr(be, "hadamard", None)
    y = op(xb, sb, sizes, inverse) if op is not None else hadamard_rows(be, xb, sb, sizes, inverse)
    bad = be.first_nonfinite(y)
    if bad is not None:
        index = list(bad[0])
        index[ax], index[-1] = index[-1], index[ax]  # back to x's axis order
        raise ValueError(f"rotating {name} overflows float32 (a non-finite result at index {tuple(index)}); "
                         f"its magnitudes reach float32's largest value divided by the block size {max(sizes)}")
    return convert_like(y.swapaxes(ax, -1), x, be)


@dataclass(frozen=True)
class Rotation:
    """A fixed rotation of ``n`` channels: optional seeded signs and a block size.

    ``apply(x)`` rotates the last axis of ``x`` (keys, values or queries ``(..., n)``);
    ``apply(x, inverse=True)`` rotates back. ``seed=None`` is the plain Hadamard transform.
    """

    n: int
    seed: "int | None" = 0
    block_size: "int | None" = None
    signs: "np.ndarray | None" = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        block_sizes(self.n, self.block_size)  # validated now
        object.__setattr__(self, "signs", None if self.seed is None else sign_vector(self.n, self.seed))

    def apply(self, x: Any, *, inverse: bool = False, backend: "str | Backend | None" = None, name: str = "x") -> Any:
        """:func:`hadamard` of ``x`` along its last axis with this rotation."""
        return hadamard(x, signs=self.signs, block_size=self.block_size, inverse=inverse, backend=backend, name=name)


__all__ = ["hadamard", "sign_vector", "Rotation", "block_sizes", "norm_constant"]


# -- rotation inside the format (docs/numerics.md §11.6) -------------------------------------------
def _rotated(backend: Backend, x: Any, signs: np.ndarray, inverse: bool, name: str) -> Any:
    """``backend.hadamard`` along the last axis with ``signs`` and the default blocks, its
    result checked for overflow (the inputs are finite: the cache validated them)."""
    n = int(x.shape[-1])
    y = backend.hadamard(x, backend.from_any(signs, like=x), block_sizes(n), inverse)
    bad = backend.first_nonfinite(y)
    if bad is not None:
        raise ValueError(f"rotating {name} overflows float32 (a non-finite result); its magnitudes reach "
                         f"float32's largest value divided by the rotation block ({max(block_sizes(n))} channels)")
    return y


def rotate_tiers(backend: Backend, keys: Any, tier_map: Any, widths: "tuple[int, ...]", seed: int, *,
                 inverse: bool = False, name: str = "keys") -> Any:
    """§11.6 on ``backend``: ``keys (B, H, T, D)`` (finite) -> float32 ``(B, H, T, D)``; for each
    ``(b, h)`` and width ``w`` in ``widths``, the channels with ``tier_map (B, H, D) == w``
    (ascending) rotated together per token, every other channel the float32 of its input.
    Heads whose tier holds the same number of channels are rotated in one call, so the work
    is a few backend ops per distinct count, not per head; the bytes are those of
    :func:`mixkvq.sim.rotation.rotate_tier_sets`."""
    B, H, T, D = (int(s) for s in keys.shape)
    rows = (as_float32(keys).swapaxes(-1, -2) * 1.0).reshape(B * H * D, T)  # a float32 copy; rows in (b, h, d) order
    tm = np.asarray(backend.to_numpy(tier_map)).reshape(B * H, D)
    for w in widths:
        member = tm == w
        counts = member.sum(axis=1)
        for n in np.unique(counts[counts > 0]):
            heads = np.flatnonzero(counts == n)
            index = (heads[:, None] * D + np.nonzero(member[heads])[1].reshape(len(heads), int(n))).reshape(-1)
            idx = backend.from_any(index.astype(np.int64), like=rows)
            sub = rows[idx].reshape(len(heads), int(n), T).swapaxes(-1, -2)  # (heads, T, n)
            sub = _rotated(backend, sub, sign_vector(int(n), seed), inverse, name)
            rows[idx] = sub.swapaxes(-1, -2).reshape(len(heads) * int(n), T)
    return rows.reshape(B, H, D, T).swapaxes(-1, -2)


def rotate_values(backend: Backend, values: Any, seed: int, *, inverse: bool = False, name: str = "values") -> Any:
    """§11.6 values: every token's ``D`` channels of ``values (B, H, T, D)`` rotated (float32)."""
    return _rotated(backend, values, sign_vector(int(values.shape[-1]), seed), inverse, name)
