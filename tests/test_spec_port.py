"""Check the independent spec port (tests/spec_port.py) against the golden vectors.

Every case of tests/vectors/v1 is compared byte for byte: packed codes, scale / zero
bits, dequantized float32 bits, 16-bit rows, and for the cache cases every key block
(tier map and per-tier arrays), every value array, the dequantized keys / values and
nbytes.  The port is written from docs/numerics.md alone; each cache case is configured
from the manifest's complete `config` (the §9 table) and fed as its `stream` says.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import spec_port as sp  # noqa: E402

VEC = pathlib.Path(__file__).resolve().parent / "vectors" / "v1"
MANIFEST = json.loads((VEC / "manifest.json").read_text())
CASES = {c["name"]: c for c in MANIFEST["cases"]}


def cases_of(kind):
    return [name for name, c in CASES.items() if c["kind"] == kind]


def load(name):
    with np.load(VEC / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def assert_same_bytes(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.tobytes() != want.tobytes():
        g = got.reshape(-1).view(np.uint8 if got.itemsize == 1 else f"u{got.itemsize}")
        w = want.reshape(-1).view(g.dtype)
        bad = np.flatnonzero(g != w)
        i = np.unravel_index(bad[0], want.shape) if want.ndim else ()
        raise AssertionError(f"{what}: {bad.size} element(s) differ, first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r}")


def test_manifest_version():
    assert MANIFEST["format_version"] == 1
    for name in CASES:
        assert (VEC / f"{name}.npz").exists(), name


# ---------------------------------------------------------------------------------------
# pack / quantize / half: all cases, fully
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", cases_of("pack"))
def test_pack(name):
    z, b = load(name), CASES[name]["params"]["bits"]
    packed = sp.pack(z["in_codes"], b)
    assert_same_bytes(packed, z["out_packed"], "packed")
    for row_codes, row_bytes in zip(z["in_codes"], z["out_packed"]):
        assert sp.unpack_row(row_bytes.tobytes(), b, len(row_codes)) == row_codes.tolist()


@pytest.mark.parametrize("name", cases_of("quantize"))
def test_quantize(name):
    z, p = load(name), CASES[name]["params"]
    r = sp.quantize_rows(z["in_x"], p["bits"], p["group_size"], p["meta_dtype"],
                         out_dtype=p.get("out_dtype", "float32"))
    for key in ("packed", "scale", "zero", "dequantized"):
        assert_same_bytes(r[key], z[f"out_{key}"], key)


def f16_half_ulp(v: float) -> float:
    """Half the float16 spacing at |v| (subnormal spacing below 2^-14)."""
    a = abs(v)
    if a < 2.0 ** -14:
        return 2.0 ** -25
    return 2.0 ** (math.frexp(a)[1] - 1 - 11)


def golden_dequantized32(z, p):
    """§4 float32 x^ rebuilt from the golden packed codes, scale and zero bits."""
    b, G = p["bits"], p["group_size"]
    meta = p["meta_dtype"]
    decode = {"float32": lambda v: sp.bits_f32(int(v)),
              "float16": lambda v: sp.f16_value(int(v)),
              "bfloat16": lambda v: sp.bf16_value(int(v))}[meta]
    n = z["in_x"].shape[1]
    out = np.zeros(z["in_x"].shape, np.float32)
    for r in range(out.shape[0]):
        codes = sp.unpack_row(z["out_packed"][r].tobytes(), b, n)
        ss = [decode(v) for v in z["out_scale"][r]]
        zs = [decode(v) for v in z["out_zero"][r]]
        out[r] = sp.dequantize_row(codes, ss, zs, G)
    return out


@pytest.mark.parametrize("name", cases_of("quantize"))
def test_quantize_error_bound(name):
    """§4: |x - x^| <= s/2 + delta + 4u(L*s + |z| + |x|), evaluated in float64, for the
    float32 output.  For a float16 output the bound is checked on the float32 result the
    output is made from, and the output must be that result clamped to +-65504 and within
    half a float16 spacing of it."""
    z, p = load(name), CASES[name]["params"]
    b, G = p["bits"], p["group_size"]
    L, u = (1 << b) - 1, 2.0 ** -24
    meta = sp.MetaDtype(p["meta_dtype"])
    decode = {"float32": lambda v: float(sp.bits_f32(int(v))),
              "float16": lambda v: float(sp.f16_value(int(v))),
              "bfloat16": lambda v: float(sp.bf16_value(int(v)))}[meta.name]
    x = z["in_x"].astype(np.float64)
    out_dtype = p.get("out_dtype", "float32")
    assert out_dtype in ("float32", "float16", "bfloat16"), out_dtype
    assert z["out_dequantized"].dtype == np.dtype(out_dtype if out_dtype != "bfloat16" else "uint16")
    if out_dtype == "bfloat16":  # stored as bits; the bound holds for the float32 result it is made from
        xh = golden_dequantized32(z, p).astype(np.float64)
    elif out_dtype == "float32":
        xh = z["out_dequantized"].astype(np.float64)
    else:
        x32 = golden_dequantized32(z, p).astype(np.float64)
        x16 = z["out_dequantized"].astype(np.float64)
        assert np.all(np.isfinite(x16))
        clamped = np.clip(x32, -65504.0, 65504.0)
        for v16, c in zip(x16.reshape(-1), clamped.reshape(-1)):
            assert abs(v16 - c) <= f16_half_ulp(max(abs(v16), abs(c))), (v16, c)
        xh = x32
    for r in range(x.shape[0]):
        for g in range(z["out_scale"].shape[1]):
            sl = slice(g * G, (g + 1) * G)
            s, zz = decode(z["out_scale"][r, g]), decode(z["out_zero"][r, g])
            mn, mx = x[r, sl].min(), x[r, sl].max()
            delta = max(0.0, zz - mn, mx - (zz + L * s))
            bound = s / 2 + delta + 4 * u * (L * s + abs(zz) + np.abs(x[r, sl]))
            assert np.all(np.abs(x[r, sl] - xh[r, sl]) <= bound), (r, g)


@pytest.mark.parametrize("name", cases_of("half"))
def test_half(name):
    z, hd = load(name), CASES[name]["params"]["high_dtype"]
    r = sp.half_rows(z["in_x"], hd)
    assert_same_bytes(r["packed"], z["out_packed"], "packed")
    assert_same_bytes(r["decoded"], z["out_decoded"], "decoded")


# ---------------------------------------------------------------------------------------
# spec rules not covered by a vector
# ---------------------------------------------------------------------------------------

def test_overflow_rejected_float16_meta():
    x = np.array([[-70000.0, 70000.0]], dtype=np.float32)  # mn rounds to -Inf in float16
    with pytest.raises(ValueError, match="overflows float16 metadata"):
        sp.quantize_rows(x, 2, 2, "float16")
    sp.quantize_rows(x, 2, 2, "bfloat16")  # representable there


def test_non_finite_rejected_with_index():
    x = np.zeros((2, 3), np.float32)
    x[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"index \(1, 2\)"):
        sp.quantize_rows(x, 4, 3, "float32")


def test_own_float16_and_bfloat16_rounding_agree_with_numpy_on_edges():
    vals = [0.0, -0.0, 1e-8, 2.0 ** -25, 2.0 ** -25 * 3, 2.0 ** -24, 65504.0, 65519.99,
            65520.0, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, -3.0e-5, 6.1e-5, 3.4e38]
    for v in vals:
        x = np.float32(v)
        with np.errstate(over="ignore"):
            ref16 = int(np.array(x).astype(np.float16).view(np.uint16))
        assert sp.f16_bits(x) == ref16, v
        u = int(np.array(x).view(np.uint32))
        assert sp.bf16_bits(x) == ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


def test_int_to_f32_ties_to_even():
    assert sp.int_to_f32(2 ** 24 + 1) == np.float32(2 ** 24)
    assert sp.int_to_f32(2 ** 24 + 3) == np.float32(2 ** 24 + 4)
    big = 2 ** 53 + 2 ** 29 + 1  # float64 would round to 2**53 + 2**29 -> tie in float32
    assert sp.int_to_f32(big) == np.float32(2 ** 53 + 2 ** 30)


# ---------------------------------------------------------------------------------------
# cache cases: all blocks, all values, dequantized tensors, nbytes
# ---------------------------------------------------------------------------------------

STREAM_PREFILL = "one append(keys, values, queries) of all tokens"


def cache_config(name):
    """The case's complete §9 configuration, from the manifest."""
    case = CASES[name]
    config = case["config"]
    assert set(config) == set(sp.CONFIG_DEFAULTS), sorted(set(config) ^ set(sp.CONFIG_DEFAULTS))
    for key, val in case["params"].items():   # params are a view of the config
        assert config[key] == val, (key, val, config[key])
    return sp.PortConfig(**config)


def run_cache(name, z, chunks=None, query_lag=0):
    """Feed the stream; chunks=None is a single prefill with its queries."""
    cfg = cache_config(name)
    K, V, Q = z["in_keys"], z["in_values"], z["in_queries"]
    B, H, T, D = K.shape
    cache = sp.PortCache(cfg, B, H, D)
    if chunks is None:
        cache.append(K, V, Q)
        return cache
    t, qt = 0, 0
    for n in chunks:
        cache.append(K[:, :, t:t + n], V[:, :, t:t + n])
        t += n
        q_to = max(t - query_lag, qt)
        if q_to > qt:
            cache.observe_queries(Q[:, :, qt:q_to])
            qt = q_to
    assert t == T
    if qt < T:
        cache.observe_queries(Q[:, :, qt:T])
    return cache


def check_cache(name, z, cache):
    cfg = cache.cfg
    T = z["in_keys"].shape[2]
    n_blocks = T // cfg.R
    assert len(cache.blocks) == n_blocks
    for j in range(n_blocks):
        got = cache.block_arrays(j)
        prefix = f"out_block{j}_"
        want_keys = {k[len(prefix):] for k in z if k.startswith(prefix)}
        assert set(got) == want_keys, (j, sorted(got), sorted(want_keys))
        for key, arr in got.items():
            assert_same_bytes(arr, z[prefix + key], prefix + key)
    if cfg.value_window == "sliding":
        spans = [(0, T - cfg.R)]
    else:
        spans = [(j * cfg.R, (j + 1) * cfg.R) for j in range(n_blocks)]
    assert len(cache.value_tokens) == spans[-1][1]
    for i, (t0, t1) in enumerate(spans):
        for key, arr in cache.value_arrays(t0, t1).items():
            assert_same_bytes(arr, z[f"out_values{i}_{key}"], f"values{i}_{key}")
    assert not any(k.startswith(f"out_values{len(spans)}_") for k in z)
    dk, dv = cache.dequantized()
    assert_same_bytes(dk, z["out_dequantized_keys"], "dequantized_keys")
    assert_same_bytes(dv, z["out_dequantized_values"], "dequantized_values")
    assert cache.nbytes(z["in_keys"].dtype.itemsize) == int(z["out_nbytes"])


@pytest.mark.parametrize("name", [n for n in cases_of("cache") if CASES[n]["stream"] == STREAM_PREFILL])
def test_cache_prefill(name):
    assert CASES[name]["stream"] == STREAM_PREFILL
    z = load(name)
    check_cache(name, z, run_cache(name, z))


@pytest.mark.parametrize("name", ["cache_budget", "cache_uniform_sliding", "cache_rd"])
def test_cache_chunked_with_lagging_queries(name):
    """§7/§9: chunking and a lagging query stream must not change a byte."""
    z = load(name)
    chunks = [1, 37, 26, 64, 5, 100, 67]
    check_cache(name, z, run_cache(name, z, chunks=chunks, query_lag=30))


def test_query_aware_block_waits_for_its_queries():
    z = load("cache_budget")
    cache = sp.PortCache(cache_config("cache_budget"), 2, 2, 24)
    cache.append(z["in_keys"][:, :, :70], z["in_values"][:, :, :70])
    assert len(cache.blocks) == 0  # keys for block 0 present, queries not yet
    cache.observe_queries(z["in_queries"][:, :, :63])
    assert len(cache.blocks) == 0
    cache.observe_queries(z["in_queries"][:, :, 63:64])
    assert len(cache.blocks) == 1


def test_threshold_rule_edges():
    cfg = sp.PortConfig(group_size=2, residual_length=2, tier_mode="threshold",
                        thresholds=(0.25, 0.12))
    A = [np.float32(v) for v in (0.25, 0.2500001, 0.12, 0.1200001, 0.0, 1.0)]
    assert sp.assign_tiers(A, cfg) == [4, 16, 2, 4, 2, 16]


def test_budget_rule_ties_by_lower_index():
    cfg = sp.PortConfig(group_size=2, residual_length=2, budget=(1, 2))
    A = [np.float32(v) for v in (0.5, 0.7, 0.7, 0.5, 0.1)]
    assert sp.assign_tiers(A, cfg) == [4, 16, 4, 2, 2]
    assert sp.budget_counts((0.1, 0.25), 24) == (math.floor(0.1 * 24 + 0.5), 6) == (2, 6)
    # §9: two ints are counts; anything else is a pair of fractions
    assert sp.budget_counts((1, 0), 24) == (1, 0)
    assert sp.budget_counts((1.0, 0.0), 24) == (24, 0)
    assert sp.budget_counts((1, 0.5), 24) == (24, 12)


# ---------------------------------------------------------------------------------------
# §8.3 statements the cache_rd vector cannot reach (it has no gain ties, no 16-bit channel
# and keeps 2-bit values): checked on the port directly
# ---------------------------------------------------------------------------------------

def test_rd_hull_ties_take_the_farther_point_and_stop_without_a_drop():
    # (cost, error, width): 2 -> 3 -> 4 collinear, 8 lowers nothing further
    pts = [(10, 8.0, 2), (20, 6.0, 3), (30, 4.0, 4), (40, 4.0, 8)]
    assert sp.rd_hull_steps(pts) == [(0.2, 20, 4)]
    # a point above the hull is jumped over
    pts = [(10, 8.0, 2), (20, 7.9, 3), (30, 2.0, 4)]
    assert sp.rd_hull_steps(pts) == [(0.3, 20, 4)]
    assert sp.rd_hull_steps([(10, 0.0, 2), (20, 0.0, 3)]) == []


def _rd_block(seed, D, R, scale_v=1.0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((1, 1, D, R)).astype(np.float32)
    k *= rng.uniform(0.05, 3.0, (1, 1, D, 1)).astype(np.float32)
    v = (rng.standard_normal((1, 1, R, D)) * scale_v).astype(np.float32)
    keys = [[[[np.float32(x) for x in k[0, 0, d]] for d in range(D)]]]
    vals = [[[[np.float32(x) for x in v[0, 0, t]] for t in range(R)]]]
    w = [[[float(x) for x in rng.uniform(0.0, 2.0, D)]]]
    return keys, vals, w


def test_rd_minimum_budget_is_3_03_bits_and_3_0_is_rejected():
    """§8.3: default ladder, G=32, float16 metadata: 2-bit keys and values cost 3 bits per
    element with their metadata, plus the tier map (8/(2R) per element)."""
    D, R = 32, 128
    keys, vals, w = _rd_block(0, D, R)
    for bits, ok in ((3.0, False), (3.03, False), (3.03125, True)):
        cfg = sp.PortConfig(tier_mode="rd", rd_bits=bits, residual_length=R)
        if ok:
            widths, vb, rep = sp.rd_allocate(keys, vals, w, cfg, 1, 1, D)
            assert rep["minimum"] == rep["budget"] == 3.03125 * 2 * R * D
            assert vb == 2 and set(widths[0][0]) == {2}
        else:
            with pytest.raises(ValueError, match=str(3.03125 * 2 * R * D // 1)[:-2]):
                sp.rd_allocate(keys, vals, w, cfg, 1, 1, D)


@pytest.mark.parametrize("seed", range(6))
def test_rd_greedy_guarantee_by_brute_force(seed):
    """§8.3 guarantee: with no key skip before the last item taken, no allocation with the
    chosen value width costing at most what the walk spends has a lower modelled error;
    otherwise the shortfall is at most the first skipped step's gain times the bits left over."""
    import itertools
    D, R = 3, 32
    keys, vals, w = _rd_block(seed, D, R, scale_v=[0.2, 1.0, 5.0][seed % 3])
    probe = sp.PortConfig(tier_mode="rd", rd_bits=1e6, group_size=16, residual_length=R)
    rep = sp.rd_allocate(keys, vals, w, probe, 1, 1, D)[2]
    top = rep["tier_map_bits"] + sum(max(p[0] for p in pts) for pts in rep["points"])
    frac = [0.05, 0.2, 0.35, 0.5, 0.65, 0.8][seed]
    bits = (rep["minimum"] + frac * (top - rep["minimum"])) / (2 * R * D)
    cfg = sp.PortConfig(tier_mode="rd", rd_bits=bits, group_size=16, residual_length=R)
    widths, vb, rep = sp.rd_allocate(keys, vals, w, cfg, 1, 1, D)
    chains = rep["points"]
    chosen = list(widths[0][0]) + [vb]
    assert len(chains) == D + 1

    def cost_err(alloc):
        cost, err = rep["tier_map_bits"], []
        for pts, a in zip(chains, alloc):
            p = next(p for p in pts if p[2] == a)
            cost += p[0]
            err.append(p[1])
        return cost, math.fsum(err)

    spent, err = cost_err(chosen)
    assert spent == rep["spent"] <= rep["budget"]
    # the guarantee is per value width: among allocations with the chosen value width
    best = min(e for alloc in itertools.product(*[[p[2] for p in pts] for pts in chains[:-1]], [vb])
               for c, e in [cost_err(alloc)] if c <= spent)
    overall = min(e for alloc in itertools.product(*[[p[2] for p in pts] for pts in chains])
                  for c, e in [cost_err(alloc)] if c <= rep["budget"])
    assert err >= overall * (1 - 1e-12)  # brute force over every width is a lower bound
    vcost = next(p[0] for p in chains[-1] if p[2] == vb)
    taken, first_skip, skipped_before_last = [], None, False
    left = rep["budget"] - (rep["tier_map_bits"] + sum(min(p[0] for p in pts) for pts in chains[:-1])) - vcost
    closed = set()
    for gain, owner, k, cost, _ in rep["items"]:       # replay the key walk for the condition
        if owner in closed:
            continue
        if cost <= left:
            left -= cost
            taken.append(gain)
            skipped_before_last = skipped_before_last or first_skip is not None
        else:
            closed.add(owner)
            first_skip = gain if first_skip is None else first_skip
    assert left == rep["budget"] - spent
    if not skipped_before_last:
        assert err <= best * (1 + 1e-12)
    else:
        assert err - best <= first_skip * left * (1 + 1e-9) + 1e-12


# ---------------------------------------------------------------------------------------
# every case through the port's golden-vector driver (sp.run_case): machine-readable
# streams (§10.2) with traces, expected rejections, crop / select_batch
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_run_case_reproduces_every_vector(name):
    z = load(name)
    inputs = {k[3:]: v for k, v in z.items() if k.startswith("in_")}
    expected = {k[4:]: v for k, v in z.items() if k.startswith("out_")}
    got = sp.run_case(CASES[name], inputs)
    assert sp.mismatches(got, expected) == []


def test_stream_cases_are_machine_readable():
    ops = {"append", "observe_queries", "crop", "select_batch"}
    streams = [c["stream"] for c in CASES.values() if c["kind"] == "cache" and c["stream"] != STREAM_PREFILL]
    assert streams and all(isinstance(s, list) and {op["op"] for op in s} <= ops for s in streams)
    assert ops == {op["op"] for s in streams for op in s}
