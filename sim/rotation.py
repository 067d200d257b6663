"""docs/numerics.md §11: the normalised fast Walsh–Hadamard rotation, literally.

A row of ``n`` channels is cut into blocks of consecutive channels, each a power of two
(default: the binary expansion of ``n``, largest first; or equal blocks of a given size).
Forward: the optional ±1 signs
(exact), then per block the butterfly stages ``h = 1, 2, 4, …, P/2`` — every pair
``(i, i + h)`` with ``i & h == 0`` becomes ``(a + b, a - b)``, each one float32 rounding —
then one multiply by the block's ``c_P = RN32(P ** -0.5)``. Inverse: the same butterfly, the same
multiply, then the signs. A round trip is not bit-exactly the identity (the additions
round, and ``c_P**2 * P != 1`` in float32 for odd ``log2(P)``).

Readable first: the pairs of a stage are listed explicitly; every arithmetic line is one
IEEE float32 operation on whole arrays (NumPy float32 arithmetic is exactly that).
"""

from __future__ import annotations

import numpy as np

#: float32 of 1/sqrt(2), round-to-nearest-even: 0x3F3504F3 = 0.707106769084930419921875
INV_SQRT2_BITS = 0x3F3504F3
#: SplitMix64 constants (the golden gamma and the two multipliers of its finaliser)
SPLITMIX_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX_M1 = 0xBF58476D1CE4E5B9
SPLITMIX_M2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1


def block_sizes(n: int, block_size: "int | None" = None) -> tuple[int, ...]:
    """The §11.1 blocks of ``n`` channels, in channel order. Default: the binary expansion of
    ``n``, largest first (64 -> (64,), 96 -> (64, 32), 80 -> (64, 16), 54 -> (32, 16, 4, 2),
    7 -> (4, 2, 1)); with ``block_size`` a power of two dividing ``n``: ``n / block_size``
    blocks of that size. Anything else is rejected."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"a rotation needs at least one channel; got {n!r}")
    n = int(n)
    if block_size is None:
        return tuple(1 << k for k in reversed(range(n.bit_length())) if n >> k & 1)
    P = block_size
    if isinstance(P, bool) or not isinstance(P, (int, np.integer)) or P < 1 or (P & (P - 1)) or n % P:
        raise ValueError(f"block_size must be a power of two that divides the {n} rotated channels; got {block_size!r}")
    return (int(P),) * (n // int(P))


def norm_constant(P: int) -> np.float32:
    """``c_P = RN32(1/sqrt(P))`` for ``P = 2^k``: ``2^(-k/2)`` exactly for even ``k``; for odd
    ``k`` the float32 of 1/sqrt(2) (bits 0x3F3504F3) times ``2^(-(k-1)/2)`` (exact scaling)."""
    k = int(P).bit_length() - 1
    if k % 2 == 0:
        return np.float32(2.0 ** (-(k // 2)))
    inv_sqrt2 = np.array([INV_SQRT2_BITS], dtype=np.uint32).view(np.float32)[0]
    return np.float32(inv_sqrt2 * np.float32(2.0 ** (-((k - 1) // 2))))  # a power-of-two multiply: exact


def splitmix64(seed: int, n: int) -> list[int]:
    """The first ``n`` outputs of SplitMix64 seeded with ``seed`` (mod 2^64), as Python ints."""
    out = []
    state = int(seed) & MASK64
    for _ in range(n):
        state = (state + SPLITMIX_GAMMA) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * SPLITMIX_M1) & MASK64
        z = ((z ^ (z >> 27)) * SPLITMIX_M2) & MASK64
        z = z ^ (z >> 31)
        out.append(z)
    return out


def sign_vector(n: int, seed: int) -> np.ndarray:
    """§11 signs: float32 ``(n,)``, ``s_i = -1`` where the top bit of the ``i``-th SplitMix64
    output of ``seed`` is set, else ``+1``. A prefix property holds: ``sign_vector(m, s)`` is
    the first ``m`` entries of ``sign_vector(n, s)`` for ``m <= n``."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) <= MASK64:
        raise ValueError(f"seed must be an integer in 0..2^64-1; got {seed!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    bits = [z >> 63 for z in splitmix64(int(seed), n)]
    return np.array([-1.0 if b else 1.0 for b in bits], dtype=np.float32)


def _first_nonfinite(x: np.ndarray) -> "tuple[tuple[int, ...], float] | None":
    bad = ~np.isfinite(x)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), x.shape))
    return idx, float(x[idx])


def _butterfly(y: np.ndarray, P: int) -> np.ndarray:
    """The stages ``h = 1, 2, …, P/2`` on the last axis (of length ``P``)."""
    h = 1
    while h < P:
        first = np.array([i for i in range(P) if i & h == 0], dtype=np.int64)  # i of each pair (i, i+h)
        second = first + h
        a = y[..., first]
        b = y[..., second]
        out = np.empty_like(y)
        out[..., first] = a + b   # fl32(a + b)
        out[..., second] = a - b  # fl32(a - b)
        y = out
        h *= 2
    return y


def hadamard(x: np.ndarray, axis: int = -1, signs: "np.ndarray | None" = None, *, block_size: "int | None" = None,
             inverse: bool = False, name: str = "x") -> np.ndarray:
    """§11 rotation of ``x`` along ``axis`` -> float32, same shape.

    ``signs``: None, or ``n`` values each ``+1``/``-1`` (e.g. :func:`sign_vector`).
    ``inverse``: butterfly and multiply first, signs last (the transpose of the forward).
    Raises ValueError naming ``name`` for a non-finite input (§1) or a non-finite result
    (an intermediate sum beyond float32's range)."""
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise TypeError(f"{name} must be a float array; got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name} must have at least one dimension to rotate along")
    sizes = block_sizes(x.shape[axis], block_size)
    bad = _first_nonfinite(x)
    if bad is not None:
        raise ValueError(f"{name} contains a non-finite value ({bad[1]}) at index {bad[0]}; "
                         "NaN and Inf cannot be quantized — fix the producer of this tensor")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range: reported as an overflow below
        x = np.moveaxis(x.astype(np.float32), axis, -1)  # §1: exact upcast; float64 rounds to nearest even
    n = x.shape[-1]
    s = None
    if signs is not None:
        s = np.asarray(signs, dtype=np.float32).reshape(-1)
        if s.shape != (n,) or not np.all((s == 1.0) | (s == -1.0)):
            raise ValueError(f"signs must be {n} values, each +1 or -1")
    y = x.copy()
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, by index
        if s is not None and not inverse:
            y = y * s                      # fl32(x_i * s_i): exact (a negation where s_i = -1)
        start = 0
        for P in sizes:                    # blocks are independent: the same stages, their own c_P
            y[..., start:start + P] = _butterfly(y[..., start:start + P], P) * norm_constant(P)  # one fl32 multiply
            start += P
        if s is not None and inverse:
            y = y * s
    y = np.moveaxis(y, -1, axis)
    bad = _first_nonfinite(y)
    if bad is not None:
        raise ValueError(f"rotating {name} overflows float32 (a non-finite result at index {bad[0]}); "
                         f"its magnitudes reach float32's largest value divided by the block size {max(sizes)}")
    return np.ascontiguousarray(y)


def rotate_tier_sets(keys: np.ndarray, tier_map: np.ndarray, widths: "tuple[int, ...]", seed: int, *,
                     inverse: bool = False, name: str = "keys") -> np.ndarray:
    """§11.6, literally: ``keys (B, H, T, D)`` -> float32 ``(B, H, T, D)`` where, for each
    ``(b, h)`` and each width ``w`` in ``widths``, the channels ``d`` with
    ``tier_map[b, h, d] == w`` (ascending ``d``, ``n`` of them) are rotated per token by
    :func:`hadamard` with ``sign_vector(n, seed)`` and the default blocks; every other channel
    is the exact float32 of its input."""
    x = np.asarray(keys).astype(np.float32)  # §1 (inputs are finite: the cache validated them)
    out = x.copy()
    B, H, _, _ = x.shape
    for b in range(B):
        for h in range(H):
            for w in widths:
                channels = np.flatnonzero(tier_map[b, h] == w)
                if channels.size == 0:
                    continue
                signs = sign_vector(channels.size, seed)
                out[b, h][:, channels] = hadamard(x[b, h][:, channels], signs=signs, inverse=inverse, name=name)
    return out
