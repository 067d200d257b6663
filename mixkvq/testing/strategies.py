"""Hypothesis strategies for the MixKVQ format: shapes, bit widths, configs and nasty values.

Arrays are drawn as NumPy (the simulator's type) from a drawn seed and a drawn *value kind*,
so large tensors stay cheap to generate while Hypothesis still explores every special case:
constant groups, signed zeros, subnormals, huge ranges, float16 extremes and
bfloat16-representable data. A backend receives the same data through
:func:`to_backend_input`, in its requested input dtype (bfloat16 travels as a torch tensor,
since NumPy has no bfloat16).

All strategies return plain Python / NumPy values; nothing here imports a backend.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Any

import numpy as np
from hypothesis import strategies as st

from mixkvq.config import MixKVQConfig
from mixkvq.format import CostModel

#: Value kinds :func:`float_arrays` can draw.
VALUE_KINDS = (
    "normal", "outliers", "constant", "signed_zeros", "subnormal", "huge_range",
    "float16_extremes", "tiny_range", "integers", "mixed",
)
INPUT_DTYPES = ("float32", "float16", "bfloat16", "float64")
META_DTYPES = ("float16", "bfloat16", "float32")
HIGH_DTYPES = ("bfloat16", "float16")
POLICIES = ("query_aware", "key_only", "query_only", "uniform")

bits = st.integers(1, 8)
group_sizes = st.sampled_from([1, 2, 3, 4, 7, 8, 16, 32, 64])
meta_dtypes = st.sampled_from(META_DTYPES)
high_dtypes = st.sampled_from(HIGH_DTYPES)
input_dtypes = st.sampled_from(INPUT_DTYPES)
value_kinds = st.sampled_from(VALUE_KINDS)
seeds = st.integers(0, 2**32 - 1)


def _bf16_round(x32: np.ndarray) -> np.ndarray:
    """float32 -> nearest-even bfloat16 value, returned as float32 (exact carrier)."""
    from mixkvq.sim.floats import bf16_bits, bf16_to_float32

    return bf16_to_float32(bf16_bits(np.asarray(x32, dtype=np.float32)))


def make_values(shape: tuple[int, ...], kind: str, seed: int, dtype: str = "float32") -> np.ndarray:
    """A finite float array of ``shape`` with the values of ``kind``, representable in ``dtype``.

    Returns float32 for ``float32``/``bfloat16`` (bfloat16 data as exactly representable
    float32, see :func:`to_backend_input`), float16 for ``float16`` and float64 for ``float64``.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape)) if shape else 1
    if kind == "normal":
        v = rng.standard_normal(size) * rng.choice([1e-3, 0.1, 1.0, 30.0])
    elif kind == "outliers":  # channel-wise outliers, like real keys
        v = rng.standard_normal(size)
        v[rng.random(size) < 0.05] *= 200.0
    elif kind == "constant":
        v = np.full(size, rng.choice([0.0, -0.0, 1.0, -3.5, 1e-5, 6e4]))
    elif kind == "signed_zeros":
        v = rng.choice([0.0, -0.0], size)
        v[rng.random(size) < 0.2] = rng.choice([1.0, -1.0, 2.0**-24])
    elif kind == "subnormal":  # float16 and float32 subnormals, and tiny normals
        v = rng.choice([2.0**-24, -(2.0**-24), 3 * 2.0**-24, 2.0**-14, 6e-8, 1e-40, -1e-42, 0.0, -0.0], size)
        v = v * rng.integers(1, 4, size)
    elif kind == "huge_range":
        v = rng.standard_normal(size) * 1e4
        v[rng.random(size) < 0.1] = rng.choice([3e38, -3e38, 1e30, -65504.0, 65504.0])
    elif kind == "float16_extremes":
        v = rng.choice([65504.0, -65504.0, 6.1035e-5, -6.1035e-5, 5.96e-8, 0.0, 1.0, -1.0, 32768.0], size)
    elif kind == "tiny_range":  # range far below the metadata's smallest step
        v = 1.0 + rng.integers(0, 3, size) * 2.0**-23
    elif kind == "integers":  # exact ties for round-half-even
        v = rng.integers(-8, 9, size).astype(np.float64) * 0.5
    elif kind == "mixed":
        v = rng.standard_normal(size)
        v[rng.random(size) < 0.1] = 0.0
        v[rng.random(size) < 0.1] = -0.0
        v[rng.random(size) < 0.05] = 1e-40
    else:
        raise ValueError(f"unknown value kind {kind!r}; known: {VALUE_KINDS}")
    v = np.asarray(v, dtype=np.float64).reshape(shape)
    if dtype == "float64":
        return v
    if dtype == "float16":
        with np.errstate(over="ignore"):
            v16 = v.astype(np.float16)
        return np.where(np.isfinite(v16), v16, np.sign(v) * np.float16(65504.0)).astype(np.float16)
    v32 = np.clip(v, -3.3e38, 3.3e38).astype(np.float32)
    return _bf16_round(v32) if dtype == "bfloat16" else v32


@dataclass(frozen=True)
class DrawnArray:
    """A drawn input: ``values`` (NumPy, float16/float32/float64 carrier) and its ``dtype``.

    For ``dtype == "bfloat16"`` the values are float32 holding bfloat16-representable numbers;
    the simulator gets them as float32 (the exact upcast, docs/numerics.md §1) and a backend as
    a real bfloat16 tensor via :func:`to_backend_input`.
    """

    values: np.ndarray
    dtype: str
    kind: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)


@st.composite
def float_arrays(draw: Any, shape: tuple[int, ...], *, dtypes: Any = input_dtypes, kinds: Any = value_kinds) -> DrawnArray:
    """A :class:`DrawnArray` of ``shape`` with a drawn dtype and value kind (all finite)."""
    dtype = draw(dtypes)
    kind = draw(kinds)
    values = make_values(shape, kind, draw(seeds), dtype)
    return DrawnArray(values, dtype, kind)


def to_backend_input(arr: DrawnArray, backend: Any) -> Any:
    """The drawn array in the backend's type, in its dtype (bfloat16 via a torch tensor)."""
    if arr.dtype != "bfloat16":
        return backend.from_any(arr.values)
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - torch is a test dependency
        raise RuntimeError("bfloat16 inputs need torch to carry them (NumPy has no bfloat16)") from exc
    return backend.from_any(torch.from_numpy(np.ascontiguousarray(arr.values)).to(torch.bfloat16))


def to_sim_input(arr: DrawnArray) -> np.ndarray:
    """The drawn array as the simulator takes it (bfloat16 data as its exact float32 upcast)."""
    return arr.values


@st.composite
def row_shapes(draw: Any, *, max_rows: int = 3, max_n: int = 97) -> tuple[int, ...]:
    """Shapes ``(..., n)`` with 0–2 leading axes and odd or even row lengths ``n >= 1``."""
    lead = draw(st.lists(st.integers(1, max_rows), min_size=0, max_size=2))
    n = draw(st.integers(1, max_n))
    return (*lead, n)


@st.composite
def kv_shapes(draw: Any, *, max_tokens: int = 70) -> tuple[int, int, int, int, int]:
    """``(B, H, n_rep, T, D)``: batch, KV heads, GQA ratio, tokens (odd counts too), head_dim."""
    B = draw(st.integers(1, 2))
    H = draw(st.integers(1, 3))
    n_rep = draw(st.sampled_from([1, 2, 3, 4]))
    T = draw(st.integers(1, max_tokens))
    D = draw(st.sampled_from([1, 3, 4, 8, 12, 16, 32, 40]))
    return B, H, n_rep, T, D


@st.composite
def configs(draw: Any, *, head_dim: int | None = None) -> MixKVQConfig:
    """A valid :class:`MixKVQConfig` covering every policy, every key strategy, every bit
    width, group size, residual length, metadata dtype, high dtype and value window (drawn in
    the flat form; the fields a strategy does not use are dropped by ``from_dict``), and
    in about one draw of four a §11.6 rotation of key tier sets and/or values."""
    policy = draw(st.sampled_from(POLICIES))
    tier_mode = draw(st.sampled_from(["budget", "threshold", "rd"]))
    if tier_mode == "rd" and policy == "uniform":
        policy = draw(st.sampled_from([p for p in POLICIES if p != "uniform"]))
    low_bits = draw(bits)
    mid_bits = draw(st.integers(low_bits, 8))
    group_size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    residual_length = group_size * draw(st.integers(1, max(1, 32 // group_size)))
    if head_dim is not None and draw(st.booleans()):
        n_high = draw(st.integers(0, head_dim))
        budget: tuple[Any, Any] = (n_high, draw(st.integers(0, head_dim - n_high)))
    else:
        hi = draw(st.sampled_from([0.0, 1 / 32, 0.125, 0.25, 0.5]))
        budget = (hi, draw(st.sampled_from([0.0, 0.125, 0.25, 0.5])))
    thresholds = draw(st.sampled_from([(1.44, 0.79), (0.5, 0.1), (0.05, 0.01), (0.0, 0.0), (1e-3, 1e-6), (10.0, 0.3)]))
    meta_dtype = draw(meta_dtypes)
    value_window = draw(st.sampled_from(["block", "sliding"]))
    rd: dict[str, Any] = {}
    if tier_mode == "rd":
        # per-channel bit ladders (§8.3): any widths 1..8 plus optionally 16
        ladder = sorted(draw(st.sets(bits, min_size=1, max_size=4)) | draw(st.sampled_from([set(), {16}])))
        value_ladder = sorted(draw(st.sets(bits, min_size=1, max_size=3)))
        value_window = "block"
        rd = dict(bit_ladder=tuple(ladder), value_bit_ladder=tuple(value_ladder),
                  rd_bits=_rd_min_bits(CostModel.of(residual_length, group_size, head_dim or 40, meta_dtype), ladder[0],
                                       value_ladder[0]) + draw(st.sampled_from([0.0, 0.3, 1.0, 4.0, 20.0])))
    rotation: dict[str, Any] = {}
    if draw(st.integers(0, 3)) == 0:
        rotation = dict(key_rotation=draw(st.sampled_from(["none", "tiers", "low"])), value_rotation=draw(st.booleans()),
                        rotation_seed=draw(st.sampled_from([0, 1, 2**64 - 1])))
    return MixKVQConfig.from_dict(dict(
        policy=policy, tier_mode=tier_mode, budget=list(budget), thresholds=list(thresholds),
        high_dtype=draw(high_dtypes), mid_bits=mid_bits, low_bits=low_bits,
        value_bits=draw(bits), group_size=group_size, residual_length=residual_length,
        value_window=value_window, meta_dtype=meta_dtype, **rd, **rotation,
    ))


def _rd_min_bits(costs: CostModel, key_bits: int, value_bits: int) -> float:
    """Smallest ``rd_bits`` every block of this geometry can meet (§8.3 step 3), rounded up."""
    return math.ceil(1000 * costs.min_block_bits(key_bits, value_bits)) / 1000


@st.composite
def chunkings(draw: Any, total: int) -> list[int]:
    """Split ``total`` tokens into a drawn list of positive chunk sizes (a token stream)."""
    sizes: list[int] = []
    left = total
    while left > 0:
        step = draw(st.integers(1, left)) if len(sizes) < 6 else left
        sizes.append(step)
        left -= step
    return sizes


@st.composite
def salience_arrays(draw: Any, shape: tuple[int, ...]) -> np.ndarray:
    """float32 salience with many exact ties (incl. ``-0.0`` vs ``0.0``) to test stable ranking."""
    rng = np.random.default_rng(draw(seeds))
    pool = np.array([0.0, -0.0, 1.0, 0.5, 0.5, 2.0, 1e-3, 3.4e38, 1e-45, 0.79, 1.44], dtype=np.float32)
    if draw(st.booleans()):
        return rng.choice(pool, size=shape).astype(np.float32)
    return np.abs(rng.standard_normal(shape)).astype(np.float32)
