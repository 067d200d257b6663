"""Cross-validation of any backend against the NumPy simulator (docs/conformance.md).

One table, :data:`OP_CASES`, maps every op of the :class:`~mixkvq.backend.Backend` protocol
to a Hypothesis strategy of arguments; the simulator's backend and the backend under test
get the same arguments (each in its own array type) and their results must agree:

* every stored or deciding result **exactly**: same shape, same dtype, same bytes (packed
  codes, scale and zero bit patterns, tier maps, dequantized float32 values incl. the sign
  of zero) — and the same ``ValueError`` message where the simulator rejects the data;
* ``attention`` within :func:`attention_tolerance` (a float32 error bound, see the docs).

On top of the op table, :func:`check_backend` feeds the same token stream (same chunks,
same queries) to a :class:`~mixkvq.cache.KVCache` on the backend and one on ``"numpy"``
and requires identical stored bytes of every block, plus the functional API
(``mixkvq.quantize``/``dequantize``/``pack``/``unpack``) and its validation messages.

Nothing here assumes an array library: backend arrays go in through ``backend.from_any``
and come back through ``backend.to_numpy``.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixkvq import backend as backend_registry
from mixkvq.backend import Backend, get_backend, register_backend
from mixkvq.cache import KVCache
from mixkvq.config import MixKVQConfig
from mixkvq.schemes import TierRotation
from mixkvq.format import row_bytes
from mixkvq.layout import KeyBlock, PackedLayout, TierRows, ValueRows
from mixkvq.state import Storage

from . import strategies as S

U32 = 2.0**-24  #: unit roundoff of float32


# ---------------------------------------------------------------------------------------
# comparison helpers
# ---------------------------------------------------------------------------------------
class ConformanceError(AssertionError):
    """A backend result differs from the simulator's."""


def _np(x: Any, backend: Backend) -> np.ndarray:
    return np.asarray(backend.to_numpy(x))


def assert_same_array(actual: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Same shape, same dtype and the same bytes (so ``-0.0 != +0.0`` and NaN bits count)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    if actual.shape != expected.shape:
        raise ConformanceError(f"{what}: shape {actual.shape} != simulator {expected.shape}")
    if actual.dtype != expected.dtype:
        raise ConformanceError(f"{what}: dtype {actual.dtype} != simulator {expected.dtype}")
    a = np.ascontiguousarray(actual).view(np.uint8)
    e = np.ascontiguousarray(expected).view(np.uint8)
    if not np.array_equal(a, e):
        flat_a, flat_e = np.ascontiguousarray(actual).reshape(-1), np.ascontiguousarray(expected).reshape(-1)
        eq = (flat_a.view(np.uint8).reshape(flat_a.size, -1) == flat_e.view(np.uint8).reshape(flat_e.size, -1)).all(-1)
        i = int(np.argmin(eq))
        idx = np.unravel_index(i, actual.shape)
        raise ConformanceError(
            f"{what}: {int((~eq).sum())} of {eq.size} elements differ; first at {tuple(int(j) for j in idx)}: "
            f"backend {flat_a[i]!r} vs simulator {flat_e[i]!r}"
        )


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b or (isinstance(a, (int, float)) and isinstance(b, (int, float)) and a == b
                                            and not isinstance(a, bool) and not isinstance(b, bool))


def compare_results(actual: Any, expected: Any, backend: Backend, what: str) -> None:
    """Recursively compare a backend result with the simulator's (arrays exactly)."""
    if expected is None or actual is None:
        if not (expected is None and actual is None):
            raise ConformanceError(f"{what}: backend {actual!r} vs simulator {expected!r}")
        return
    if isinstance(expected, np.ndarray):
        assert_same_array(_np(actual, backend), expected, what)
        return
    if isinstance(expected, (tuple, list)):
        if not isinstance(actual, (tuple, list)) or len(actual) != len(expected):
            raise ConformanceError(f"{what}: backend {actual!r} vs simulator {expected!r}")
        for i, (a, e) in enumerate(zip(actual, expected)):
            compare_results(a, e, backend, f"{what}[{i}]")
        return
    if isinstance(expected, float) and math.isnan(expected):
        if not (isinstance(actual, float) and math.isnan(actual)):
            raise ConformanceError(f"{what}: backend {actual!r} vs simulator NaN")
        return
    if not (actual == expected and _same_scalar(actual, expected)):
        raise ConformanceError(f"{what}: backend {actual!r} ({type(actual).__name__}) vs simulator {expected!r} ({type(expected).__name__})")


def attention_tolerance(q: np.ndarray, keys: np.ndarray, values: np.ndarray, scale: float) -> float:
    """Absolute tolerance for a float32 attention against the float64 reference.

    ``q (B, Hq, Tq, D)``, ``keys``/``values`` float32 ``(B, H, T, D)`` (the dequantized cache).
    With ``u = 2^-24``, ``S = max over (query, token) of sum_d |q_d| |k_d|`` and
    ``Vmax = max |v|``::

        tol = Vmax * u * (4 (D + 2) scale S + 4 T + 64) + 4 T 2^-149

    Logit error of a float32 dot product (any order) is at most ``(D + 1) u scale S``; a
    logit error ``e`` moves every softmax weight by a factor within ``exp(±2e)``, moving the
    output by at most ``~2e Vmax``; the float32 sums over ``T`` tokens (normaliser and
    ``p @ V``, any blocking, with online rescaling) add ``<= 2 T u Vmax``; exp, rescale and
    the final division a few ``u Vmax``. Each term carries a factor of 2 margin; the last
    term covers subnormal products.
    """
    q64 = np.abs(np.asarray(q, dtype=np.float64))
    k64 = np.abs(np.asarray(keys, dtype=np.float64))
    B, Hq, Tq, D = q64.shape
    H, T = k64.shape[1], k64.shape[2]
    k64 = np.repeat(k64, Hq // H, axis=1)
    s_max = float(np.einsum("bhqd,bhkd->bhqk", q64, k64).max()) if T and D else 0.0
    v_max = float(np.abs(np.asarray(values, dtype=np.float64)).max()) if values.size else 0.0
    return v_max * U32 * (4 * (D + 2) * scale * s_max + 4 * T + 64) + 4 * T * 2.0**-149


def assert_attention_close(actual: np.ndarray, expected: np.ndarray, tol: float, what: str) -> None:
    actual = np.asarray(actual)
    if actual.shape != expected.shape or actual.dtype != np.float32:
        raise ConformanceError(f"{what}: got {actual.dtype}{actual.shape}, expected float32{expected.shape}")
    err = np.abs(actual.astype(np.float64) - expected.astype(np.float64))
    if not np.all(np.isfinite(actual)) or float(err.max(initial=0.0)) > tol:
        i = int(np.nanargmax(np.where(np.isfinite(err), err, np.inf)))
        raise ConformanceError(
            f"{what}: max abs error {float(np.nanmax(err)) if np.isfinite(err).all() else 'non-finite'} > tolerance {tol:.3g}; "
            f"first worst at flat index {i}: backend {actual.reshape(-1)[i]!r} vs simulator {expected.reshape(-1)[i]!r}"
        )


def _logits_fit_float32(q: np.ndarray, keys: np.ndarray) -> bool:
    """Attention is compared only where every logit and partial sum is far from float32 overflow."""
    if keys.size == 0:
        return True
    qm = float(np.abs(q.astype(np.float64)).max(initial=0.0))
    km = float(np.abs(keys.astype(np.float64)).max(initial=0.0))
    return qm * km * q.shape[-1] < 1e30


# ---------------------------------------------------------------------------------------
# converting arguments
# ---------------------------------------------------------------------------------------
def _convert_block(block: KeyBlock, be: Backend) -> KeyBlock:
    tiers = {b: TierRows(b, be.from_any(r.packed),
                         None if r.scale is None else be.from_any(r.scale),
                         None if r.zero is None else be.from_any(r.zero)) for b, r in block.tiers.items()}
    return KeyBlock(be.from_any(block.tier_map), tiers, block.n_tokens)


def convert_storage(storage: Storage, be: Backend) -> Storage:
    """A simulator :class:`~mixkvq.state.Storage` with every array converted to backend ``be``."""
    conv = lambda a: None if a is None else be.from_any(a)  # noqa: E731
    return Storage(tuple(_convert_block(b, be) for b in storage.key_blocks),
                   tuple(ValueRows(conv(r.packed), conv(r.scale), conv(r.zero), r.bits) for r in storage.value_rows),
                   conv(storage.residual_keys), conv(storage.residual_values))


def _to_backend(arg: Any, be: Backend) -> Any:
    if isinstance(arg, S.DrawnArray):
        return S.to_backend_input(arg, be)
    if isinstance(arg, np.ndarray):
        return be.from_any(arg)
    if isinstance(arg, Storage):
        return convert_storage(arg, be)
    return arg


def _to_sim(arg: Any) -> Any:
    return S.to_sim_input(arg) if isinstance(arg, S.DrawnArray) else arg


# ---------------------------------------------------------------------------------------
# the op table
# ---------------------------------------------------------------------------------------
@dataclass
class OpCase:
    """Arguments for one call of op ``name`` (arrays as NumPy or :class:`DrawnArray`).

    ``expected``, when given, replaces calling the simulator (used where NumPy cannot
    express the result type, e.g. bfloat16 outputs without ``ml_dtypes``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    expected: Callable[[], Any] | None = None
    attention: bool = False


SIM = None  # the NumpyBackend, created lazily


def _sim() -> Backend:
    global SIM
    if SIM is None:
        from mixkvq.sim import NumpyBackend

        SIM = NumpyBackend()
    return SIM


@st.composite
def _case_from_any(draw: Any) -> OpCase:
    arr = draw(S.float_arrays(draw(S.row_shapes())))
    return OpCase((arr,))


@st.composite
def _case_to_numpy(draw: Any) -> OpCase:
    kind = draw(st.sampled_from(["uint8", "int64", "float16", "float32", "bf16bits"]))
    shape = draw(S.row_shapes())
    rng = np.random.default_rng(draw(S.seeds))
    if kind == "uint8":
        arr = rng.integers(0, 256, shape).astype(np.uint8)
    elif kind == "int64":
        arr = rng.integers(-(2**62), 2**62, shape).astype(np.int64)
    elif kind == "bf16bits":  # bfloat16 metadata carried as uint16 bit patterns (finite)
        arr = S._bf16_round(S.make_values(shape, draw(S.value_kinds), int(rng.integers(2**31))))
        from mixkvq.sim.floats import bf16_bits

        arr = bf16_bits(arr)
    else:
        arr = S.make_values(shape, draw(S.value_kinds), int(rng.integers(2**31)), kind)
    # identity through the backend: from_any then to_numpy must give the same bytes
    return OpCase((arr,), expected=lambda: arr)


@st.composite
def _case_zeros(draw: Any) -> OpCase:
    return OpCase((draw(S.row_shapes()), draw(st.sampled_from(["uint8", "int64", "float32", "float16"]))))


@st.composite
def _case_concat(draw: Any) -> OpCase:
    shape = list(draw(S.row_shapes()))
    axis = draw(st.integers(0, len(shape) - 1))
    parts = []
    dtype = draw(st.sampled_from(["float32", "float16"]))
    for _ in range(draw(st.integers(1, 3))):
        shape[axis] = draw(st.integers(0, 5))
        parts.append(S.make_values(tuple(shape), "mixed", draw(S.seeds), dtype))
    return OpCase((parts, axis), expected=lambda: np.concatenate(parts, axis=axis))


@st.composite
def _case_first_nonfinite(draw: Any) -> OpCase:
    arr = draw(S.float_arrays(draw(S.row_shapes()), dtypes=st.sampled_from(["float32", "float16", "float64"])))
    values = arr.values.copy()
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, values.size - 1))
        values.reshape(-1)[i] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    return OpCase((values,))


@st.composite
def _case_min_max(draw: Any) -> OpCase:
    shape = draw(S.row_shapes())
    rng = np.random.default_rng(draw(S.seeds))
    dtype = draw(st.sampled_from(["uint8", "int64", "int32"]))
    lo = 0 if dtype == "uint8" else -1000
    return OpCase((rng.integers(lo, 256, shape).astype(dtype),))


@st.composite
def _case_pack(draw: Any) -> OpCase:
    b = draw(S.bits)
    shape = draw(S.row_shapes())
    rng = np.random.default_rng(draw(S.seeds))
    codes = rng.integers(0, 2**b, shape).astype(np.uint8)
    return OpCase((codes, b))


@st.composite
def _case_unpack(draw: Any) -> OpCase:
    b = draw(S.bits)
    shape = draw(S.row_shapes())
    rng = np.random.default_rng(draw(S.seeds))
    n = shape[-1]
    packed = rng.integers(0, 256, (*shape[:-1], row_bytes(n, b))).astype(np.uint8)  # random padding bits
    return OpCase((packed, b, n))


@st.composite
def _case_quantize(draw: Any) -> OpCase:
    x = draw(S.float_arrays(draw(S.row_shapes())))
    return OpCase((x, draw(S.bits), draw(S.group_sizes), draw(S.meta_dtypes), "x"))


def _bf16_output(packed: np.ndarray, scale: np.ndarray, zero: np.ndarray, b: int, g: int, n: int) -> Callable[[], Any]:
    def expected() -> np.ndarray:
        from mixkvq.format import FLOAT_MAX
        from mixkvq.sim.floats import bf16_bits

        y = _sim().dequantize(packed, scale, zero, b, g, n, "float32")
        limit = np.float32(FLOAT_MAX["bfloat16"])
        return bf16_bits(np.clip(y, -limit, limit))  # §4: saturate, then round to nearest even

    return expected


@st.composite
def _case_dequantize(draw: Any) -> OpCase:
    x = draw(S.float_arrays(draw(S.row_shapes()), dtypes=st.sampled_from(["float32", "float16"])))
    b, g, meta = draw(S.bits), draw(S.group_sizes), draw(S.meta_dtypes)
    try:
        packed, scale, zero = _sim().quantize(x.values, b, g, meta, "x")
    except ValueError:  # metadata overflow: nothing to dequantize, draw a float32 grid instead
        meta = "float32"
        packed, scale, zero = _sim().quantize(x.values, b, g, meta, "x")
    out = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    n = x.shape[-1]
    expected = _bf16_output(packed, scale, zero, b, g, n) if out == "bfloat16" else None
    return OpCase((packed, scale, zero, b, g, n, out), expected=expected)


@st.composite
def _case_encode_half(draw: Any) -> OpCase:
    x = draw(S.float_arrays(draw(S.row_shapes())))
    return OpCase((x, draw(S.high_dtypes), "keys"))


@st.composite
def _case_decode_half(draw: Any) -> OpCase:
    high = draw(S.high_dtypes)
    x = draw(S.float_arrays(draw(S.row_shapes()), kinds=st.sampled_from(["normal", "subnormal", "signed_zeros", "float16_extremes"])))
    try:
        packed = _sim().encode_half(x.values, high, "keys")
    except ValueError:
        high = "bfloat16"
        packed = _sim().encode_half(x.values, high, "keys")
    return OpCase((packed, high))


@st.composite
def _case_query_token_sums(draw: Any) -> OpCase:
    B, H, n_rep, T, D = draw(S.kv_shapes(max_tokens=9))
    q = draw(S.float_arrays((B, H * n_rep, T, D)))
    return OpCase((q, n_rep))


@st.composite
def _case_relevance(draw: Any) -> OpCase:
    B, H, n_rep, _, D = draw(S.kv_shapes())
    rng = np.random.default_rng(draw(S.seeds))
    top = draw(st.sampled_from([2**20, 2**40, 2**53, 2**62]))  # includes values that round as int64 -> float32
    qsum = rng.integers(0, top, (B, H, D), dtype=np.int64)
    if draw(st.booleans()):  # exact ties between float32 neighbours (round half to even)
        qsum = (qsum >> 30 << 30) | np.int64(1 << 29)
    count = draw(st.sampled_from([0, 1, 3, 127, 4096, 10**6]))
    return OpCase((qsum, count, n_rep))


@st.composite
def _case_difficulty(draw: Any) -> OpCase:
    B, H, _, R, D = draw(S.kv_shapes(max_tokens=40))
    return OpCase((draw(S.float_arrays((B, H, R, D))), draw(S.bits)))


def _tier_bits(draw: Any) -> tuple[int, int, int]:
    low = draw(S.bits)
    return (16, draw(st.integers(low, 8)), low)


@st.composite
def _case_assign_budget(draw: Any) -> OpCase:
    B, H, _, _, D = draw(S.kv_shapes())
    sal = draw(S.salience_arrays((B, H, D)))
    n_high = draw(st.integers(0, D))
    return OpCase((sal, n_high, draw(st.integers(0, D - n_high)), _tier_bits(draw)))


@st.composite
def _case_assign_threshold(draw: Any) -> OpCase:
    B, H, _, _, D = draw(S.kv_shapes())
    sal = draw(S.salience_arrays((B, H, D)))
    tau_mid = draw(st.sampled_from([0.0, 0.5, 0.79, 1e-3, 0.1 + 0.2]))
    tau_high = draw(st.sampled_from([tau_mid, 1.0, 1.44, 2.0, 3.4e38]))
    return OpCase((sal, max(tau_high, tau_mid), tau_mid, _tier_bits(draw)))


def _fill_cache(cache: KVCache, keys: np.ndarray, values: np.ndarray, queries: np.ndarray | None, chunks: Sequence[int]) -> None:
    start = 0
    for c in chunks:
        sl = slice(start, start + c)
        cache.append(keys[:, :, sl], values[:, :, sl], None if queries is None else queries[:, :, sl])
        start += c


@st.composite
def _case_attention(draw: Any) -> OpCase:
    B, H, n_rep, T, D = draw(S.kv_shapes(max_tokens=80))
    # the attention op reads §6 rows as stored; a rotated config (§11.6) is attended by the
    # cache over its decoded history instead, so the op is defined for unrotated configs
    cfg = draw(S.configs(head_dim=D)).replace(rotation=TierRotation())
    if cfg.tier_mode == "budget":
        try:
            cfg.keys.counts(D)
        except ValueError:  # a budget that does not fit this head_dim: use counts instead
            cfg = cfg.replace(budget=(0, 0))
    moderate = st.sampled_from(["normal", "outliers", "constant", "signed_zeros", "subnormal", "integers", "mixed"])
    dt = st.sampled_from(["float32", "float16"])
    k = draw(S.float_arrays((B, H, T, D), dtypes=dt, kinds=moderate)).values
    v = draw(S.float_arrays((B, H, T, D), dtypes=st.just(k.dtype.name), kinds=moderate)).values
    q_all = draw(S.float_arrays((B, H * n_rep, T, D), dtypes=st.just(k.dtype.name), kinds=moderate)).values
    cache = KVCache(cfg, backend="numpy")
    _fill_cache(cache, k, v, q_all, draw(S.chunkings(T)))
    Tq = draw(st.integers(1, min(T, 5)))
    q = draw(S.float_arrays((B, H * n_rep, Tq, D), dtypes=st.sampled_from(["float32", "float16"]), kinds=moderate)).values
    scale = draw(st.sampled_from([1.0 / math.sqrt(D), 0.5, 2.0]))
    return OpCase((q, cache.state.storage, cache.layout), {"scale": scale, "causal": draw(st.booleans())}, attention=True)


#: The op table: protocol op name -> strategy of :class:`OpCase`. The simulator's
#: ``NumpyBackend`` has a method of each name; ``check_backend`` calls both.
OP_CASES: dict[str, Callable[[], st.SearchStrategy[OpCase]]] = {
    "from_any": _case_from_any,
    "to_numpy": _case_to_numpy,
    "zeros": _case_zeros,
    "concat": _case_concat,
    "first_nonfinite": _case_first_nonfinite,
    "min_max": _case_min_max,
    "pack": _case_pack,
    "unpack": _case_unpack,
    "quantize": _case_quantize,
    "dequantize": _case_dequantize,
    "encode_half": _case_encode_half,
    "decode_half": _case_decode_half,
    "query_token_sums": _case_query_token_sums,
    "relevance": _case_relevance,
    "difficulty": _case_difficulty,
    "assign_budget": _case_assign_budget,
    "assign_threshold": _case_assign_threshold,
    "attention": _case_attention,
}


def _call(fn: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Any, BaseException | None]:
    try:
        return fn(*args, **kwargs), None
    except (ValueError, TypeError) as exc:
        return None, exc


def check_op(name: str, case: OpCase, backend: Backend) -> None:
    """Run op ``name`` on the simulator and on ``backend`` with ``case``'s arguments and compare."""
    sim = _sim()
    if name == "to_numpy":  # the identity through from_any/to_numpy
        compare_results(backend.to_numpy(backend.from_any(case.args[0])), case.expected(), backend, "from_any/to_numpy")
        return
    if name == "from_any":
        arr = case.args[0]
        got = _np(S.to_backend_input(arr, backend), backend)
        want = arr.values
        if arr.dtype == "bfloat16" and got.dtype != np.float32:  # native bfloat16 -> uint16 bit pattern
            from mixkvq.sim.floats import bf16_bits

            want = bf16_bits(arr.values)  # (a backend without bfloat16 holds the exact float32 upcast)
        assert_same_array(got, want, f"from_any({arr.dtype})")
        return
    b_args = [[_to_backend(a, backend) for a in arg] if isinstance(arg, list) else _to_backend(arg, backend) for arg in case.args]
    if name == "zeros":
        b_args = list(case.args)
    if case.expected is not None:
        expected, exp_err = _call(case.expected, (), {})
    else:
        expected, exp_err = _call(getattr(sim, name), [_to_sim(a) for a in case.args], case.kwargs)
    actual, act_err = _call(getattr(backend, name), b_args, case.kwargs)
    if case.expected is not None and isinstance(act_err, TypeError):
        # an output type the simulator itself cannot make (bfloat16 without ml_dtypes):
        # a NumPy-based backend may refuse it with the simulator's own message
        _, sim_err = _call(getattr(sim, name), [_to_sim(a) for a in case.args], case.kwargs)
        if isinstance(sim_err, TypeError) and str(sim_err) == str(act_err):
            return
    if exp_err is not None or act_err is not None:
        if exp_err is None:
            raise ConformanceError(f"{name}: backend raised {act_err!r}; the simulator did not") from act_err
        if act_err is None:
            raise ConformanceError(f"{name}: the simulator raised {exp_err!r}; the backend did not")
        if type(act_err) is not type(exp_err) or str(act_err) != str(exp_err):
            raise ConformanceError(f"{name}: backend raised {act_err!r}, simulator {exp_err!r}")
        return
    if case.attention:
        q = np.asarray(case.args[0], dtype=np.float32)
        keys, values = case.args[2].dequantized(_sim(), case.args[1])
        if _logits_fit_float32(q, keys):
            tol = attention_tolerance(q, keys, values, case.kwargs["scale"])
            assert_attention_close(_np(actual, backend), expected, tol, name)
        return
    compare_results(actual, expected, backend, name)


# ---------------------------------------------------------------------------------------
# whole-cache and API checks
# ---------------------------------------------------------------------------------------
def compare_caches(actual: KVCache, expected: KVCache, backend: Backend, *, exact_residual: bool = True) -> None:
    """Every stored array of two caches fed the same stream must hold the same bytes."""
    if actual.seq_len != expected.seq_len or actual.n_quantized != expected.n_quantized:
        raise ConformanceError(f"cache: {actual.seq_len}/{actual.n_quantized} tokens (total/quantized) vs "
                               f"simulator {expected.seq_len}/{expected.n_quantized}")
    be = actual.backend
    blocks_a, blocks_e = actual.key_blocks, expected.key_blocks
    for j, (ba, bexp) in enumerate(zip(blocks_a, blocks_e)):
        compare_results(ba.tier_map, np.asarray(bexp.tier_map), be, f"block {j} tier_map")
        if sorted(ba.tiers) != sorted(bexp.tiers):
            raise ConformanceError(f"block {j}: tiers {sorted(ba.tiers)} vs simulator {sorted(bexp.tiers)}")
        for bits, rows in bexp.tiers.items():
            got = ba.tiers[bits]
            compare_results(got.packed, rows.packed, be, f"block {j} tier {bits} packed")
            compare_results(got.scale, rows.scale, be, f"block {j} tier {bits} scale")
            compare_results(got.zero, rows.zero, be, f"block {j} tier {bits} zero")
    va, ve = actual.value_rows, expected.value_rows
    if expected.config.values.window == "sliding" and va and ve:
        # sliding-mode chunking is storage layout (numerics §9): compare the joined rows
        def joined(rows: list, conv: Any) -> list:
            return [ValueRows(*(np.concatenate([conv(getattr(r, f)) for r in rows], axis=2)
                                for f in ("packed", "scale", "zero")), rows[0].bits)]
        va, ve = joined(va, lambda a: _np(a, be)), joined(ve, np.asarray)
    if [r.n_tokens for r in va] != [r.n_tokens for r in ve]:
        raise ConformanceError(f"value chunks {[r.n_tokens for r in va]} vs simulator {[r.n_tokens for r in ve]}")
    for j, (ra, re_) in enumerate(zip(va, ve)):
        if getattr(ra, "bits", None) != getattr(re_, "bits", None):
            raise ConformanceError(f"value chunk {j}: {getattr(ra, 'bits', None)} bits vs simulator {getattr(re_, 'bits', None)}")
        for what in ("packed", "scale", "zero"):
            compare_results(getattr(ra, what), getattr(re_, what), be, f"value chunk {j} {what}")
    qa, ca = actual.query_stats
    qe, ce = expected.query_stats
    if ca != ce:
        raise ConformanceError(f"query count {ca} vs simulator {ce}")
    compare_results(qa, qe, be, "query statistics qsum")
    for name, ra, re_ in zip(("residual keys", "residual values"), actual.residual, expected.residual):
        if re_ is None or ra is None:
            compare_results(ra, re_, be, name)
        elif exact_residual:
            compare_results(ra, np.asarray(re_), be, name)
        else:  # bfloat16 input: the simulator holds the exact float32 upcast
            got = _np(ra, be)
            got32 = (got.astype(np.uint32) << 16).view(np.float32) if got.dtype == np.uint16 else got.astype(np.float32)
            assert_same_array(got32, np.asarray(re_, dtype=np.float32), name)
    if exact_residual and actual.nbytes != expected.nbytes:
        raise ConformanceError(f"nbytes {actual.nbytes} vs simulator {expected.nbytes}")


def _cache_check(data: Any, backend_name: str, backend: Backend) -> None:
    B, H, n_rep, T, D = data.draw(S.kv_shapes(max_tokens=90), label="B, H, n_rep, T, D")
    cfg = data.draw(S.configs(head_dim=D), label="config")
    dtype = data.draw(st.sampled_from(["float32", "float16", "bfloat16"]), label="dtype")
    kinds = data.draw(st.lists(S.value_kinds, min_size=3, max_size=3), label="value kinds")
    k = S.DrawnArray(S.make_values((B, H, T, D), kinds[0], data.draw(S.seeds), dtype), dtype, kinds[0])
    v = S.DrawnArray(S.make_values((B, H, T, D), kinds[1], data.draw(S.seeds), dtype), dtype, kinds[1])
    q = S.DrawnArray(S.make_values((B, H * n_rep, T, D), kinds[2], data.draw(S.seeds), dtype), dtype, kinds[2])
    chunks = data.draw(S.chunkings(T), label="chunks")
    lag = data.draw(st.booleans(), label="queries lag (observe_queries)")
    ref = KVCache(cfg, backend="numpy")
    dut = KVCache(cfg, backend=backend_name)
    start = 0
    sim = _sim()
    for c in chunks:
        sl = slice(start, start + c)
        args_ref = [S.to_sim_input(a)[:, :, sl] for a in (k, v, q)]
        args_dut = [S.to_backend_input(S.DrawnArray(a.values[:, :, sl], a.dtype, a.kind), backend) for a in (k, v, q)]
        steps: list[tuple[str, Callable[[KVCache, list[Any]], None]]]
        if lag:
            steps = [("append", lambda cache, a: cache.append(a[0], a[1])),
                     ("observe_queries", lambda cache, a: cache.observe_queries(a[2]))]
        else:
            steps = [("append", lambda cache, a: cache.append(a[0], a[1], a[2]))]
        for what, step in steps:
            with warnings.catch_warnings():  # "tokens wait for their queries" is expected when queries lag
                warnings.simplefilter("ignore", UserWarning)
                _, e_ref = _call(step, (ref, args_ref), {})
                _, e_dut = _call(step, (dut, args_dut), {})
            if (e_ref is None) != (e_dut is None) or (e_ref is not None and (type(e_ref) is not type(e_dut) or str(e_ref) != str(e_dut))):
                raise ConformanceError(f"cache.{what}: backend raised {e_dut!r}, simulator {e_ref!r}")
            if e_ref is not None:  # both rejected the data and must be unchanged: compare and stop
                compare_caches(dut, ref, backend, exact_residual=dtype != "bfloat16")
                return
        start += c
    compare_caches(dut, ref, backend, exact_residual=dtype != "bfloat16")
    keys_ref, values_ref = ref.layout.dequantized(ref.backend, ref.state.storage)
    keys_dut, values_dut = dut.layout.dequantized(dut.backend, dut.state.storage)
    assert_same_array(_np(keys_dut, backend), keys_ref, "dequantized keys")
    assert_same_array(_np(values_dut, backend), values_ref, "dequantized values")
    Tq = data.draw(st.integers(1, min(T, 4)), label="Tq")
    q_new = q.values[:, :, T - Tq:]
    if _logits_fit_float32(np.asarray(q_new, dtype=np.float32), keys_ref):
        causal = data.draw(st.booleans(), label="causal")
        want = ref.attention(q_new.astype(np.float32) if q.dtype == "bfloat16" else q_new, causal=causal)
        got = dut.attention(S.to_backend_input(S.DrawnArray(q_new, q.dtype, q.kind), backend), causal=causal)
        tol = attention_tolerance(q_new.astype(np.float32), keys_ref, values_ref, 1.0 / math.sqrt(D))
        assert_attention_close(_np(got, backend), want, tol, "cache.attention")
    del sim


def _api_check(data: Any, backend: Backend) -> None:
    import mixkvq

    shape = data.draw(S.row_shapes(), label="shape")
    x = data.draw(S.float_arrays(shape, dtypes=st.sampled_from(["float32", "float16", "float64"])), label="x")
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    b, g, meta = data.draw(S.bits), data.draw(S.group_sizes), data.draw(S.meta_dtypes)
    xb = S.to_backend_input(x, backend)
    qt_ref, e_ref = _call(lambda: mixkvq.quantize(x.values, bits=b, group_size=g, axis=axis, meta_dtype=meta, backend="numpy"), (), {})
    qt_dut, e_dut = _call(lambda: mixkvq.quantize(xb, bits=b, group_size=g, axis=axis, meta_dtype=meta, backend=backend), (), {})
    if (e_ref is None) != (e_dut is None) or (e_ref is not None and str(e_ref) != str(e_dut)):
        raise ConformanceError(f"mixkvq.quantize: backend raised {e_dut!r}, simulator {e_ref!r}")
    if e_ref is not None:
        return
    for what in ("packed", "scale", "zero"):
        compare_results(getattr(qt_dut, what), getattr(qt_ref, what), backend, f"mixkvq.quantize {what}")
    y_ref = mixkvq.dequantize(qt_ref, backend="numpy")
    y_dut = mixkvq.dequantize(qt_dut, backend=backend)
    compare_results(y_dut, y_ref, backend, "mixkvq.dequantize")
    codes = np.random.default_rng(data.draw(S.seeds)).integers(0, 2**b, shape).astype(np.uint8)
    p_ref = mixkvq.pack(codes, b, axis, backend="numpy")
    p_dut = mixkvq.pack(backend.from_any(codes), b, axis, backend=backend)
    compare_results(p_dut, p_ref, backend, "mixkvq.pack")
    n = shape[axis]
    compare_results(mixkvq.unpack(backend.from_any(p_ref), b, n, axis, backend=backend),
                    mixkvq.unpack(p_ref, b, n, axis, backend="numpy"), backend, "mixkvq.unpack")
    # validation: a non-finite element gets the same message on every backend
    bad = np.array(x.values, dtype=np.float32 if x.dtype == "float64" else x.values.dtype)
    i = data.draw(st.integers(0, bad.size - 1))
    bad.reshape(-1)[i] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    _, e_ref = _call(lambda: mixkvq.quantize(bad, bits=b, backend="numpy"), (), {})
    _, e_dut = _call(lambda: mixkvq.quantize(backend.from_any(bad), bits=b, backend=backend), (), {})
    if e_ref is None or e_dut is None or str(e_ref) != str(e_dut):
        raise ConformanceError(f"validation of non-finite input: backend {e_dut!r} vs simulator {e_ref!r}")


# ---------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------
@dataclass
class ConformanceReport:
    """What :func:`check_backend` ran: examples per check (every one passed)."""

    backend: str
    examples: dict[str, int] = field(default_factory=dict)

    def __str__(self) -> str:
        body = ", ".join(f"{k}: {v}" for k, v in self.examples.items())
        return f"backend {self.backend!r} matches the simulator ({body})"


@contextlib.contextmanager
def _registered_name(backend: Backend) -> Iterator[str]:
    """A name under which ``get_backend`` returns ``backend`` (KVCache configs take names)."""
    name = getattr(backend, "name", None)
    try:
        same = isinstance(name, str) and get_backend(name) is backend
    except (ValueError, RuntimeError, ImportError):
        same = False
    if same:
        yield name
        return
    tmp = f"__conformance_{name}_{id(backend)}"
    register_backend(tmp, lambda: backend, overwrite=True)
    try:
        yield tmp
    finally:
        backend_registry._FACTORIES.pop(tmp, None)
        backend_registry._INSTANCES.pop(tmp, None)


CHECKS = (*OP_CASES, "cache", "api")


def check_backend(name_or_backend: "str | Backend", *, max_examples: int | None = None,
                  checks: Sequence[str] | None = None, cache_examples: int | None = None,
                  derandomize: bool | None = None) -> ConformanceReport:
    """Cross-validate a backend against the simulator; raise :class:`ConformanceError` on a mismatch.

    Args:
        name_or_backend: a registered name (``"torch"``, an entry point of the group
            ``mixkvq.backends``) or a backend object.
        max_examples: Hypothesis examples per check (default: the active profile's).
        checks: subset of :data:`CHECKS` (op names, ``"cache"``, ``"api"``); default all.
        cache_examples: examples of the whole-cache check (default ``max_examples``).
        derandomize: fixed example sequence (default: the active profile's).

    Returns:
        A :class:`ConformanceReport` with the number of examples each check ran.
    """
    backend = get_backend(name_or_backend)
    selected = tuple(checks) if checks is not None else CHECKS
    unknown = sorted(set(selected) - set(CHECKS))
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(CHECKS)}")
    base = settings()
    n = max_examples if max_examples is not None else base.max_examples
    report = ConformanceReport(getattr(backend, "name", type(backend).__name__))

    def run(check: str, body: Callable[[Any], None], examples: int) -> None:
        count = [0]

        @settings(base, max_examples=examples, deadline=None, database=None,
                  derandomize=base.derandomize if derandomize is None else derandomize,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
        @given(data=st.data())
        def inner(data: Any) -> None:
            count[0] += 1
            body(data)

        inner.__name__ = inner.__qualname__ = f"check_{check}"
        inner()
        report.examples[check] = count[0]

    with _registered_name(backend) as registered:
        for check in selected:
            if check in OP_CASES:
                run(check, lambda data, c=check: check_op(c, data.draw(OP_CASES[c](), label="case"), backend), n)
            elif check == "cache":
                run(check, lambda data: _cache_check(data, registered, backend), cache_examples or n)
            elif check == "api":
                run(check, lambda data: _api_check(data, backend), n)
    return report
