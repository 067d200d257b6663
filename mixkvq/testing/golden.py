"""Golden vectors: fixed-seed cases of the format, made by the simulator, checkable by anyone.

``python scripts/make_golden_vectors.py`` writes ``tests/vectors/v1/<case>.npz`` and
``manifest.json``. Each npz holds the case's inputs (``in_*``) and expected outputs
(``out_*``); :func:`compute` turns inputs into outputs with any backend, and
:func:`check_vectors` compares every output byte for byte. bfloat16 metadata is stored as
its uint16 bit pattern.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mixkvq.format import FORMAT_VERSION


def _special_values(rng: np.random.Generator) -> np.ndarray:
    """Rows of float32 special values (each row is one quantization row of 40 elements)."""
    f16_sub = np.float32(np.finfo(np.float16).smallest_subnormal)
    rows = [
        np.zeros(40, np.float32),                                   # constant zero group
        np.full(40, -0.0, np.float32),                              # all -0
        np.where(np.arange(40) % 2, 0.0, -0.0).astype(np.float32),  # mixed +-0
        np.full(40, 3.25, np.float32),                              # constant non-zero
        (np.arange(40) % 3 * f16_sub).astype(np.float32),           # float16 subnormals
        (np.arange(40) * np.float32(1e-41)).astype(np.float32),     # float32 subnormals
        np.where(np.arange(40) % 2, 65504.0, -65504.0).astype(np.float32),  # float16 extremes
        np.linspace(-1, 1, 40, dtype=np.float32) * np.float32(60000),
        (np.arange(40) % 4).astype(np.float32) * np.float32(0.5),   # exact half-step ties
        rng.standard_normal(40).astype(np.float32) * np.float32(1e-3) + np.float32(100.0),
        (np.float32(1.0) + (np.arange(40) % 2) * np.float32(2**-23)).astype(np.float32),  # scale underflows float16
        np.float32(2.0) ** rng.integers(-20, 15, 40).astype(np.float32),  # wide dynamic range
    ]
    return np.stack(rows)


def cases() -> Iterator[tuple[str, str, dict[str, Any], dict[str, np.ndarray]]]:
    """Every golden case: (name, kind, params, inputs)."""
    rng = np.random.default_rng(20251219)
    for bits in range(1, 9):
        codes = rng.integers(0, 2**bits, size=(3, 37), dtype=np.uint8)
        yield f"pack_b{bits}", "pack", {"bits": bits}, {"codes": codes}
    for bits in range(1, 9):
        for meta in ("float16", "bfloat16", "float32"):
            x = (rng.standard_normal((5, 77)) * rng.uniform(0.01, 10, (5, 1))).astype(np.float16)
            yield f"quant_b{bits}_{meta}_f16in", "quantize", {"bits": bits, "group_size": 32, "meta_dtype": meta}, {"x": x}
    specials = _special_values(rng)
    for bits in (1, 2, 3, 4, 8):
        yield f"quant_special_b{bits}", "quantize", {"bits": bits, "group_size": 8, "meta_dtype": "float32"}, {"x": specials}
    for bits in (2, 3, 4, 8):
        yield f"quant_special_b{bits}_f16meta", "quantize", {"bits": bits, "group_size": 8, "meta_dtype": "float16"}, {"x": specials}
    yield "quant_special_b2_f16meta_f16out", "quantize", {"bits": 2, "group_size": 8, "meta_dtype": "float16", "out_dtype": "float16"}, {"x": specials}
    yield "quant_special_b8_bf16meta", "quantize", {"bits": 8, "group_size": 8, "meta_dtype": "bfloat16"}, {"x": specials}
    x64 = rng.standard_normal((3, 45)) * 3.0 + 1e-9 * rng.standard_normal((3, 45))
    yield "quant_b3_float64in", "quantize", {"bits": 3, "group_size": 32, "meta_dtype": "float16"}, {"x": x64}
    for bits in (2, 4):
        x = rng.standard_normal((4, 50)).astype(np.float32) * np.float32(1e30)
        yield f"quant_huge_b{bits}_bf16", "quantize", {"bits": bits, "group_size": 16, "meta_dtype": "bfloat16"}, {"x": x}
    for high in ("bfloat16", "float16"):
        x = rng.standard_normal((6, 33)).astype(np.float32) * np.float32(7.0)
        yield f"half_{high}", "half", {"high_dtype": high}, {"x": x}
    B, H, n_rep, T, D = 2, 2, 3, 300, 24
    k = rng.standard_normal((B, H, T, D)).astype(np.float16)
    k[:, :, :, 5] *= 20  # an outlier channel
    v = rng.standard_normal((B, H, T, D)).astype(np.float16)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float16)
    q[:, :, :, 7] *= 8
    inputs = {"keys": k, "values": v, "queries": q}
    base = {"group_size": 32, "residual_length": 64, "meta_dtype": "float16"}
    yield "cache_budget", "cache", {**base, "tier_mode": "budget", "budget": [2, 4]}, inputs
    yield "cache_threshold", "cache", {**base, "tier_mode": "threshold", "thresholds": [1.55, 1.2]}, inputs
    yield "cache_key_only_bf16", "cache", {**base, "policy": "key_only", "meta_dtype": "bfloat16", "high_dtype": "float16"}, inputs
    yield "cache_uniform_sliding", "cache", {**base, "policy": "uniform", "value_window": "sliding", "value_bits": 3}, inputs
    # Thresholds placed exactly on relevance values of the first block, so any deviation in
    # the fixed-point statistics (§7) flips a tier: tau_mid equals one channel's I (that
    # channel must be low), tau_high is one float32 step below another's (that one is high).
    relevance = _first_block_relevance(q, n_rep, base["residual_length"])
    ranked = np.sort(relevance.reshape(-1))
    tau_mid, tau_high = float(ranked[len(ranked) // 2]), float(np.nextafter(ranked[-3], np.float32(0)))
    yield "cache_query_only_threshold", "cache", {**base, "policy": "query_only", "tier_mode": "threshold",
                                                  "thresholds": [tau_high, tau_mid]}, inputs
    # rd cases pin the exchange rate so that a change of its default never moves a vector
    yield "cache_rd", "cache", {**base, "tier_mode": "rd", "rd_bits": 4.0, "rd_value_weight": 1.0}, inputs
    yield "cache_rd_value_weight", "cache", {**base, "tier_mode": "rd", "rd_bits": 4.0, "rd_value_weight": 20.0}, inputs
    # rd with exact gain ties (duplicated channels and heads), 16-bit channels and a value
    # width that moves off the bottom of its ladder.
    kt = k.copy()
    kt[:, :, :, 1:4] = kt[:, :, :, :1]
    kt[:, 1] = kt[:, 0]
    kt[:, :, :, 9] = (kt[:, :, :, 9] * 40 + 500).astype(np.float16)
    qt = q.copy()
    qt[:, :, :, 1:4] = qt[:, :, :, :1]
    qt[:, n_rep:2 * n_rep] = qt[:, :n_rep]
    vt = v.copy()
    vt[:, 1] = vt[:, 0]
    yield "cache_rd_ties", "cache", {**base, "tier_mode": "rd", "rd_bits": 5.2, "bit_ladder": [2, 4, 8, 16], "high_dtype": "float16",
                                "rd_value_weight": 1.0}, \
        {"keys": kt, "values": vt, "queries": qt}
    yield from _added_cases()


def _first_block_relevance(q: np.ndarray, n_rep: int, R: int) -> np.ndarray:
    from mixkvq.sim import salience

    return salience.relevance(salience.query_token_sums(q[:, :, :R], n_rep).sum(axis=2), R, n_rep)


def compute(kind: str, params: dict[str, Any], inputs: dict[str, np.ndarray], backend: Any = None,
            stream: Any = None, expect: "dict[str, Any] | None" = None) -> dict[str, np.ndarray]:
    """Expected outputs of one case, computed with ``backend`` (default: the simulator).

    ``stream`` is the manifest's machine-readable stream (a list of operations, docs §10.2;
    None or the legacy string: one append of every token with its queries). ``expect`` is an
    ``error`` case's expected rejection: the call must raise it (checked here)."""
    import mixkvq

    be = mixkvq.get_backend(backend or "numpy")
    np_ = be.to_numpy
    if kind == "error":
        assert expect is not None, "an error case needs its 'expect'"
        call = params["call"]
        inner = {k: v for k, v in params.items() if k != "call"}
        _expect_error(expect, lambda: compute(call, inner, inputs, backend))
        return {}
    if kind == "pack":
        packed = be.pack(be.from_any(inputs["codes"]), params["bits"])
        return {"packed": np_(packed)}
    if kind == "quantize":
        from mixkvq.validation import check_finite

        x = be.from_any(inputs["x"])
        check_finite(x, "x", be)  # §1, as mixkvq.quantize does
        packed, scale, zero = be.quantize(x, params["bits"], params["group_size"], params["meta_dtype"], "x")
        out_dtype = params.get("out_dtype", "float32")
        if out_dtype == "bfloat16":  # stored as its uint16 bits; made from the float32 result by §4's rule
            y32 = np.asarray(np_(be.dequantize(packed, scale, zero, params["bits"], params["group_size"], x.shape[-1], "float32")))
            y = _bfloat16_output_bits(y32)
        else:
            y = np_(be.dequantize(packed, scale, zero, params["bits"], params["group_size"], x.shape[-1], out_dtype))
        return {"packed": np_(packed), "scale": _bits(np_(scale)), "zero": _bits(np_(zero)), "dequantized": y}
    if kind == "half":
        packed = be.encode_half(be.from_any(inputs["x"]), params["high_dtype"], "x")
        return {"packed": np_(packed), "decoded": np_(be.decode_half(packed, params["high_dtype"]))}
    if kind == "cache":
        config = mixkvq.MixKVQConfig.from_dict(params)
        cache = mixkvq.KVCache(config, backend=be)
        out: dict[str, np.ndarray] = {}
        if stream is None or isinstance(stream, str):
            cache.append(be.from_any(inputs["keys"]), be.from_any(inputs["values"]), queries=be.from_any(inputs["queries"]))
        else:
            trace: dict[str, list] = {"nbytes": [], "nominal_bits": [], "bits_per_element": [], "seq_len": []}
            for op in stream:
                _run_op(cache, op, inputs, be)
                trace["nbytes"].append(cache.nbytes)
                trace["nominal_bits"].append(cache.nominal_bits)
                trace["bits_per_element"].append(cache.bits_per_element)
                trace["seq_len"].append(cache.seq_len)
            out["trace_nbytes"] = np.array(trace["nbytes"], np.int64)
            out["trace_seq_len"] = np.array(trace["seq_len"], np.int64)
            out["trace_nominal_bits"] = np.array(trace["nominal_bits"], np.float64)
            out["trace_bits_per_element"] = np.array(trace["bits_per_element"], np.float64)
        for j, block in enumerate(cache.key_blocks):
            out[f"block{j}_tier_map"] = np_(block.tier_map)
            for bits, rows in block.tiers.items():
                out[f"block{j}_w{bits}_packed"] = np_(rows.packed)
                if rows.scale is not None:
                    out[f"block{j}_w{bits}_scale"] = _bits(np_(rows.scale))
                    out[f"block{j}_w{bits}_zero"] = _bits(np_(rows.zero))
        chunks = [tuple(np.asarray(np_(a)) for a in (rows.packed, rows.scale, rows.zero)) for rows in cache.value_rows]
        if config.values.window == "sliding" and len(chunks) > 1:  # one chunk of every quantized token (§10)
            chunks = [tuple(np.concatenate(parts, axis=2) for parts in zip(*chunks))]
        for j, (packed, scale, zero) in enumerate(chunks):
            out[f"values{j}_packed"] = packed
            out[f"values{j}_scale"] = _bits(scale)
            out[f"values{j}_zero"] = _bits(zero)
        if cache.seq_len:
            keys, values = cache.dequantized()
            out["dequantized_keys"], out["dequantized_values"] = np.asarray(np_(keys)), np.asarray(np_(values))
        out["nbytes"] = np.array(cache.nbytes, dtype=np.int64)
        return out
    if kind == "rotate":
        return _compute_rotate(params, inputs, backend)
    raise ValueError(f"unknown golden case kind {kind!r}")


def _run_op(cache: Any, op: dict[str, Any], inputs: dict[str, np.ndarray], be: Any) -> None:
    """One operation of a machine-readable stream (docs §10.2)."""
    def rows(name: str, start: int, stop: int) -> Any:
        a = inputs[name][:, :, start:stop]
        if "batch" in op:
            a = a[np.asarray(op["batch"], dtype=np.int64)]
        return be.from_any(np.ascontiguousarray(a))

    def act() -> None:
        kind = op["op"]
        if kind == "append":
            q = rows(op.get("queries_input", "queries"), op["start"], op["stop"]) if op["queries"] else None
            cache.append(rows(op.get("keys", "keys"), op["start"], op["stop"]),
                         rows(op.get("values", "values"), op["start"], op["stop"]), queries=q)
        elif kind == "observe_queries":
            cache.observe_queries(rows(op.get("queries_input", "queries"), op["start"], op["stop"]))
        elif kind == "crop":
            cache.crop(op["n"])
        elif kind == "select_batch":
            cache.select_batch(np.asarray(op["indices"], dtype=np.int64))
        else:
            raise ValueError(f"unknown stream operation {kind!r}")

    if "expect_error" in op:
        before = cache.nbytes
        _expect_error(op["expect_error"], act)
        assert cache.nbytes == before
    else:
        act()


def _expect_error(expect: dict[str, Any], call: Any) -> None:
    """``call()`` must raise ``expect['type']`` whose message holds every ``expect['match']``."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - compared by name below
        if type(exc).__name__ != expect["type"] or not all(m in str(exc) for m in expect["match"]):
            raise AssertionError(f"expected {expect['type']} with {expect['match']}, got {exc!r}") from exc
        return
    raise AssertionError(f"expected {expect['type']} with {expect['match']}; nothing was raised")


def _bfloat16_output_bits(y32: np.ndarray) -> np.ndarray:
    """§4 bfloat16 output: clamp to bfloat16's largest finite, round to nearest even; uint16 bits."""
    from mixkvq.sim.floats import bf16_bits

    limit = np.uint32(0x7F7F0000).view(np.float32)
    return bf16_bits(np.clip(y32, -limit, limit))


def _bits(a: np.ndarray) -> np.ndarray:
    """Metadata as raw bits so float comparisons cannot hide a difference (-0 vs +0)."""
    a = np.asarray(a)
    if a.dtype == np.float16 or str(a.dtype) == "bfloat16":
        return a.view(np.uint16)
    if a.dtype == np.float32:
        return a.view(np.uint32)
    return a


def write_vectors(folder: Path) -> list[dict[str, Any]]:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for name, kind, params, inputs, *rest in cases():
        extra = rest[0] if rest else {}
        outputs = compute(kind, params, inputs, stream=extra.get("stream"), expect=extra.get("expect"))
        np.savez_compressed(folder / f"{name}.npz", **{f"in_{k}": v for k, v in inputs.items()},
                            **{f"out_{k}": v for k, v in outputs.items()})
        entry = {"name": name, "kind": kind, "params": params}
        if kind == "cache" or (kind == "error" and params.get("call") == "cache"):
            import mixkvq  # the complete configuration, defaults included, and how it was fed

            given = {k: v for k, v in params.items() if k != "call"}
            mixkvq.MixKVQConfig.from_dict(given)  # a valid configuration
            entry["config"] = {k: given.get(k, v) for k, v in TABLE_DEFAULTS.items()}
            entry["stream"] = extra.get("stream", LEGACY_STREAM)
        if "expect" in extra:
            entry["expect"] = extra["expect"]
        manifest.append(entry)
    (folder / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "cases": manifest}, indent=1) + "\n")
    return manifest + write_rotation_vectors(folder)


#: Every field of the docs §9 configuration table with its default, in the manifest's order:
#: a manifest ``config`` lists all of them, whichever apply to the tier mode.
TABLE_DEFAULTS: dict[str, Any] = {
    "policy": "query_aware", "tier_mode": "budget", "budget": [1 / 32, 1 / 8], "thresholds": [1.44, 0.79],
    "high_dtype": "bfloat16", "mid_bits": 4, "low_bits": 2, "value_bits": 2, "group_size": 32, "residual_length": 128,
    "value_window": "block", "meta_dtype": "float16", "rd_bits": 3.5, "bit_ladder": [2, 3, 4, 8, 16],
    "value_bit_ladder": [2, 3, 4], "rd_value_weight": 2.0,
}

#: The ``stream`` of the original cache cases: one append(keys, values, queries) of every token,
#: i.e. ``[{"op": "append", "start": 0, "stop": T, "queries": true}]``.
LEGACY_STREAM = "one append(keys, values, queries) of all tokens"


def check_vectors(folder: Path, backend: Any = None) -> list[str]:
    """Recompute every case with ``backend``; return the names of mismatching outputs ([] = pass).
    Checks ``manifest.json`` and, when present, the rotation cases of ``rotation.json``."""
    failures = check_manifest(folder, "manifest.json", backend)
    if (folder / ROTATION_MANIFEST).exists():
        failures += check_manifest(folder, ROTATION_MANIFEST, backend)
    return failures


def check_manifest(folder: Path, manifest: str, backend: Any = None) -> list[str]:
    """:func:`check_vectors` for the cases of one manifest file of ``folder``."""
    meta = json.loads((folder / manifest).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder / manifest} holds golden vectors of version {meta.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    failures = []
    for case in meta["cases"]:
        with np.load(folder / f"{case['name']}.npz") as data:
            inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
            expected = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
        try:
            got = compute(case["kind"], case["params"], inputs, backend, stream=case.get("stream"), expect=case.get("expect"))
        except AssertionError:
            failures.append(f"{case['name']}:expect")
            continue
        for key in sorted(set(expected) | set(got)):
            e, g = expected.get(key), got.get(key)
            if e is None or g is None or e.shape != np.shape(g) or not np.array_equal(_bits(e), _bits(np.asarray(g)), equal_nan=False):
                failures.append(f"{case['name']}:{key}")
    return failures


# ---------------------------------------------------------------------------------------
# Added cases (format version 1, appended after the original ones, which are unchanged).
# Each one exists to make some misreading of docs/numerics.md fail a vector; the comment at
# each case names the rule it pins down. Streams are machine-readable (docs §10.2).
# ---------------------------------------------------------------------------------------

def _op(op: str, **fields: Any) -> dict[str, Any]:
    return {"op": op, **fields}


def _first_block_salience(k: np.ndarray, q: np.ndarray, n_rep: int, R: int, low_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(I, A) of block 0 for query_aware: float32 (B, H, D)."""
    from mixkvq.sim import salience

    I = _first_block_relevance(q, n_rep, R)
    S = salience.difficulty(k[:, :, :R], low_bits)
    return I, (I * S).astype(np.float32)


def _code_rounding_rows(rng: np.random.Generator) -> np.ndarray:
    """Groups of 8 float32 values (b = 2, float32 metadata): [z, z + 3s, six probes] where a
    probe x sits near z + (k + 1/2) s and fl32(fl32(x - z) / s) rounds to another code than
    the correctly rounded (x - z) / s would."""
    f32 = np.float32
    rows = []
    while len(rows) < 6:
        z = f32(-rng.uniform(1e-3, 1e-1))
        top = f32(rng.uniform(1.0, 3.0))
        s = f32(f32(top - z) / f32(3))
        centre = np.array([f32(z + f32(f32(k + 0.5) * s)) for k in (0, 1, 2)], np.float32)
        bits = centre.view(np.uint32)[:, None].astype(np.int64) + np.arange(-200, 201)[None, :]
        x = bits.astype(np.uint32).view(np.float32).reshape(-1)
        two_step = np.rint((x - z) / s)                     # float32 operations
        exact = np.rint(((x.astype(np.float64) - float(z)) / float(s)).astype(np.float32))
        picks = x[two_step != exact]
        if picks.size:
            rows.append(np.concatenate([[z, top], np.resize(picks, 6)]).astype(np.float32))
    return np.stack(rows)


def _added_cases() -> Iterator[tuple[str, str, dict[str, Any], dict[str, np.ndarray], dict[str, Any]]]:
    rng = np.random.default_rng(20260101)
    f32 = np.float32
    # -- quantize ------------------------------------------------------------------------
    # §3 step 5 rint ties (t exactly k + 1/2, so half-away-from-zero or floor(t + 0.5) differ)
    # and §4 outputs: bfloat16 (stored as uint16 bits) with §4's clamp (values above bfloat16's
    # largest finite, which would round to Inf without it), float32 input, a partial group.
    rows = []
    for L in (1, 3, 7, 15):
        base = (np.arange(45) % (L + 1)).astype(np.float64)
        ties = np.where(np.arange(45) % 3 == 1, base - 0.5, base)
        ties[0], ties[1] = 0.0, float(L)
        rows.append(ties.astype(np.float32) * f32(0.25) - f32(3.0))
    rows.append(np.linspace(1e38, 3.40e38, 45, dtype=np.float32))
    rows.append(-np.linspace(1e38, 3.40e38, 45, dtype=np.float32))
    rows.append(rng.standard_normal(45).astype(np.float32) * f32(50))
    xt = np.stack(rows)
    for bits in (1, 2, 3, 4):
        yield f"quant_ties_b{bits}_f32in", "quantize", {"bits": bits, "group_size": 16, "meta_dtype": "float32"}, {"x": xt[[bits - 1, 6]]}, {}
    yield "quant_b5_f32in_bf16out", "quantize", {"bits": 5, "group_size": 16, "meta_dtype": "float32", "out_dtype": "bfloat16"}, {"x": xt}, {}
    yield "quant_b6_f32in_f16out", "quantize", {"bits": 6, "group_size": 16, "meta_dtype": "float32", "out_dtype": "float16"}, \
        {"x": np.concatenate([xt[[3, 6]] * f32(3000), xt[[4]] * f32(1e-34)])}, {}
    x = (rng.standard_normal((6, 19)) * rng.uniform(0.1, 100, (6, 1))).astype(np.float32)
    for bits in (3, 7):
        yield f"quant_b{bits}_f32in_g8", "quantize", {"bits": bits, "group_size": 8, "meta_dtype": "bfloat16"}, {"x": x}, {}
    # §3 step 5 is two roundings, d = fl32(x - z) then t = fl32(d / s): rows of elements whose
    # exact (x - z) / s rounds to a different code than the two-step float32 evaluation.
    yield "quant_code_float32_steps", "quantize", {"bits": 2, "group_size": 8, "meta_dtype": "float32"}, {"x": _code_rounding_rows(rng)}, {}
    # -- rejections (§1, §2, §3 step 4) ---------------------------------------------------
    ok = rng.standard_normal((2, 8)).astype(np.float32)
    x = ok.copy()
    x[0, 4:] = [-1.7e38, 1.7e38, 0.0, 1.0]     # group (0, 1): range overflow (bfloat16 meta)
    x[1, :4] = [-3.4e38, 0.0, 0.0, 1.0]        # group (1, 0): zero overflows bfloat16
    yield "error_meta_before_range_overflow", "error", {"call": "quantize", "bits": 2, "group_size": 4, "meta_dtype": "bfloat16"}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(1, 0)", "overflows bfloat16"]}}
    x = ok.copy()
    x[1, 4:] = [-1.7e38, 1.7e38, 0.0, 1.0]
    yield "error_range_overflow", "error", {"call": "quantize", "bits": 2, "group_size": 4, "meta_dtype": "bfloat16"}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(1, 1)", "beyond float32's range"]}}
    x = ok.copy() * f32(1e4)
    x[0, :2] = [-70000.0, 70000.0]
    yield "error_meta_overflow_float16", "error", {"call": "quantize", "bits": 2, "group_size": 4, "meta_dtype": "float16"}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(0, 0)", "overflows float16"]}}
    x = ok.copy()
    x[1, 5], x[1, 7] = np.nan, np.inf
    yield "error_non_finite", "error", {"call": "quantize", "bits": 4, "group_size": 4, "meta_dtype": "float32"}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(1, 5)"]}}
    # -- cache streams --------------------------------------------------------------------
    # Budget mode with fractions whose f*D is x.5 (floor(f*D + 0.5) vs round-half-even) and
    # x.2 (vs ceil), four exactly tied top channels straddling the n_high boundary (ties by
    # the lower channel index), head_dim 40 > G = 32 (a partial value group), float32 input,
    # several appends, queries arriving late through observe_queries, select_batch with a
    # repeat, a rejected append (non-finite value: the state must not change), crop into
    # the residual and to a block boundary, and re-appended tokens whose queries count again.
    B, H, n_rep, T, D, R = 2, 2, 2, 100, 40, 32
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float32)
    tied = [3, 11, 17, 30]
    k[..., tied] = k[..., [3]] * f32(30)
    q[..., tied] = q[..., [3]] * f32(3)
    bad = k.copy()
    bad[1, 0, 95, 6] = np.inf
    inputs = {"keys": k, "values": v, "queries": q, "bad_keys": bad}
    sel = [1, 0, 1]
    stream = [
        _op("append", start=0, stop=20, queries=True),
        _op("append", start=20, stop=50, queries=False),
        _op("observe_queries", start=20, stop=45),
        _op("append", start=50, stop=70, queries=False),
        _op("observe_queries", start=45, stop=70),
        _op("select_batch", indices=sel),
        _op("append", start=70, stop=90, queries=True, batch=sel),
        _op("append", start=90, stop=100, queries=True, batch=sel, keys="bad_keys",
            expect_error={"type": "ValueError", "match": ["keys", "(0, 0, 5, 6)"]}),
        _op("crop", n=80),
        _op("crop", n=64),
        _op("append", start=64, stop=100, queries=True, batch=sel),
    ]
    base = {"group_size": 32, "residual_length": R, "meta_dtype": "float16"}
    yield "cache_stream_budget_fractions", "cache", {**base, "budget": [0.0625, 0.18]}, inputs, {"stream": stream}
    # Threshold mode: tau_high is a float64 just below a channel's salience A that rounds to A
    # in float32 (so that channel is mid: A > fl32(tau) is false; a float64 comparison says
    # high); tau_mid likewise just below another channel's A (that one is low, not mid).
    B, H, n_rep, T, D, R = 1, 2, 3, 64, 24, 32
    k = (rng.standard_normal((B, H, T, D)) * rng.uniform(0.2, 3, (1, 1, 1, D))).astype(np.float16)
    v = rng.standard_normal((B, H, T, D)).astype(np.float16)
    q = (rng.standard_normal((B, H * n_rep, T, D)) * 40).astype(np.float16)
    _, A = _first_block_salience(k, q, n_rep, R, 2)
    ranked = np.sort(A.reshape(-1))
    a_hi, a_mid = ranked[-4], ranked[len(ranked) // 3]
    tau_high = float(a_hi) - float(np.spacing(a_hi)) / 4
    tau_mid = float(a_mid) - float(np.spacing(a_mid)) / 4
    assert np.float32(tau_high) == a_hi and tau_high < float(a_hi) and np.float32(tau_mid) == a_mid and tau_mid < float(a_mid)
    inputs = {"keys": k, "values": v, "queries": q}
    base = {"group_size": 16, "residual_length": R, "meta_dtype": "bfloat16"}
    stream = [_op("append", start=0, stop=40, queries=False), _op("observe_queries", start=0, stop=33),
              _op("append", start=40, stop=64, queries=False), _op("observe_queries", start=33, stop=64),
              # crop block 1 and feed it again: its relevance counts 96 query tokens (§9)
              _op("crop", n=32), _op("append", start=32, stop=64, queries=False), _op("observe_queries", start=32, stop=64)]
    yield "cache_stream_threshold_float32_compare", "cache", {**base, "tier_mode": "threshold", "thresholds": [tau_high, tau_mid]}, \
        inputs, {"stream": stream}
    # §7 step 5 rounding: qsum > 2^24 and nq * n_rep * 65536 not a power of two, so the two
    # int64 -> float32 conversions and the float32 division differ from one rounding of the
    # exact quotient for some channels; tau_high sits on the lower of the two readings.
    from mixkvq.sim import salience

    qsum = salience.query_token_sums(q[:, :, :R], n_rep).sum(axis=2)
    I = salience.relevance(qsum, R, n_rep)
    alt = (qsum.astype(np.float64) / float(R * n_rep * 65536)).astype(np.float32)
    differ = np.flatnonzero((I != alt).reshape(-1))
    assert differ.size, "no channel where the relevance rounding matters"
    i = differ[len(differ) // 2]
    lo = float(min(I.reshape(-1)[i], alt.reshape(-1)[i]))
    yield "cache_query_only_relevance_rounding", "cache", {**base, "policy": "query_only", "tier_mode": "threshold",
                                                         "thresholds": [lo, lo / 2]}, inputs, {"stream": stream}
    # §8 A = fl32(I * S): tau_high is a float32 salience whose exact product I*S lies above
    # it, so the channel is not high (a float64 product compared in float64 would say high).
    I, A = _first_block_salience(k, q, n_rep, R, 2)
    S = salience.difficulty(k[:, :, :R], 2)
    exact = I.astype(np.float64) * S.astype(np.float64)
    above = np.flatnonzero((exact > A.astype(np.float64)).reshape(-1))
    pick = above[np.argsort(A.reshape(-1)[above])[len(above) // 2]]
    a = float(A.reshape(-1)[pick])
    yield "cache_threshold_salience_rounding", "cache", {**base, "tier_mode": "threshold", "thresholds": [a, a / 3]}, inputs, {"stream": stream}
    # §7 step 2 rint: small float32 queries (m = |q| * 65536 has a fraction), one channel made
    # of exact half-integer m with even integer parts (rint rounds them down, half-up would
    # not): tau_high just below the top channel's I (truncation lowers it), tau_mid exactly
    # the tie channel's I (half-up raises it above).
    qf = (rng.standard_normal((B, H * n_rep, T, D)) * 1e-3).astype(np.float32)
    qf[:, :, :, 5] = ((2 * rng.integers(10, 30, (B, H * n_rep, T)) + 0.5) / 65536).astype(np.float32)
    Iq = _first_block_relevance(qf, n_rep, R)
    top = Iq.reshape(-1).max()
    assert top > Iq[0, 0, 5]
    yield "cache_query_only_fixed_point", "cache", {**base, "policy": "query_only", "tier_mode": "threshold",
                                                  "thresholds": [float(np.nextafter(top, np.float32(0))), float(Iq[0, 0, 5])]}, \
        {"keys": k, "values": v, "queries": qf}, {"stream": stream}
    # float64 input, key_only with an int budget (counts), sliding values with bfloat16 meta,
    # head_dim 12 > G = 8; queries observed although key_only ignores them (qsum is still held
    # and counted, §9); crops into the residual and to a block boundary.
    B, H, n_rep, T, D, R = 1, 2, 1, 48, 12, 16
    k = rng.standard_normal((B, H, T, D)) * 3 + 1e-9 * rng.standard_normal((B, H, T, D))
    v = rng.standard_normal((B, H, T, D))
    q = rng.standard_normal((B, H * n_rep, T, D))
    stream = [_op("append", start=0, stop=7, queries=True), _op("append", start=7, stop=30, queries=False),
              _op("append", start=30, stop=41, queries=False), _op("observe_queries", start=7, stop=20),
              _op("crop", n=36), _op("crop", n=16), _op("append", start=16, stop=48, queries=False),
              _op("crop", n=0), _op("append", start=0, stop=20, queries=False)]
    yield "cache_stream_float64_sliding", "cache", {"group_size": 8, "residual_length": R, "meta_dtype": "bfloat16", "policy": "key_only",
                                                   "budget": [1, 2], "value_window": "sliding", "value_bits": 3}, \
        {"keys": k, "values": v, "queries": q}, {"stream": stream}
    # §2 overflow inside a cache (float32 keys beyond float16 in block 1, kept as a float16
    # 16-bit channel, the most salient one): the append
    # that would flush it is rejected and the cache is unchanged.
    B, H, T, D, R = 1, 1, 48, 8, 16
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k[0, 0, 20, 3] = 70000.0
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    stream = [_op("append", start=0, stop=16, queries=False), _op("append", start=16, stop=40, queries=False,
              expect_error={"type": "ValueError", "match": ["keys", "overflows float16"]}),
              _op("append", start=16, stop=18, queries=False)]
    yield "cache_stream_meta_overflow_rejected", "cache", {"group_size": 8, "residual_length": R, "policy": "key_only", "budget": [1, 1],
                                                          "high_dtype": "float16"}, \
        {"keys": k, "values": v}, {"stream": stream}
    # -- rd (§8.3) -------------------------------------------------------------------------
    yield from _rd_cases(rng)


def _closing_matters(k: np.ndarray, v: np.ndarray, I: np.ndarray, rd_bits: float) -> bool:
    """Whether, for ladder (2, 8, 16) / values (2, 4), a walk that does not close a chain at a
    skipped item (and so may take its later steps) picks other key widths than §8.3's walk."""
    from mixkvq.sim import allocate as al

    model = al.rd_model(k, v, I, ladder=(2, 8, 16), value_ladder=(2, 4), budget_bits=rd_bits, group_size=8, meta_bytes=2,
                        high_dtype="float16", value_weight=1.0)
    if model.base > model.budget:
        return False
    n = int(np.prod(model.key_err.shape[:3]))
    owner, step, dcost, to = al._key_items(al._hull_chains(model.key_cost, model.key_err.reshape(n, -1)))
    err = model.key_err.reshape(n, -1)

    def best(close: bool) -> tuple[float, int, bytes]:
        result = None
        for vi in range(2):
            left = model.budget - model.key_base - model.value_cost[vi]
            if left < 0:
                break
            if close:
                chosen, _ = al._greedy_walk((owner, step, dcost, to), n, left)
            else:
                chosen, rem = np.zeros(n, np.int64), left
                for o, dc, t in zip(owner.tolist(), dcost.tolist(), to.tolist()):
                    if dc <= rem:
                        rem -= dc
                        chosen[o] = t
            total = math.fsum([*err[np.arange(n), chosen].tolist(), float(model.value_err[vi])])
            if result is None or total < result[0]:
                result = (total, vi, chosen.tobytes())
        return result

    return best(True)[1:] != best(False)[1:]


def _rd_cases(rng: np.random.Generator) -> Iterator[tuple[str, str, dict[str, Any], dict[str, np.ndarray], dict[str, Any]]]:
    from mixkvq.sim import salience
    from mixkvq.sim.allocate import rd_allocate

    f32 = np.float32
    B, H, n_rep, T, D, R = 1, 2, 2, 64, 16, 32
    k = rng.standard_normal((B, H, T, D)).astype(np.float32) * rng.uniform(0.05, 4, (B, H, 1, D)).astype(np.float32)
    k[..., ::3] += f32(6.0)  # offset channels: their 16-bit step exceeds the 8-bit one
    v = (rng.standard_normal((B, H, T, D)) * rng.uniform(0.5, 2, (B, H, 1, 1))).astype(np.float32)
    q = (rng.standard_normal((B, H * n_rep, T, D)) * rng.uniform(0.1, 3, (1, 1, 1, D))).astype(np.float32)
    inputs = {"keys": k, "values": v, "queries": q}
    stream = [_op("append", start=0, stop=T, queries=True)]
    I = salience.relevance(salience.query_token_sums(q[:, :, :R], n_rep).sum(axis=2), R, n_rep)
    # G = 8 with float32 metadata makes 8-bit and 16-bit channels cost the same (16R bits):
    # the hull from 4 bits goes to whichever has the lower error, skipping the other point.
    hull = {"group_size": 8, "residual_length": R, "meta_dtype": "float32", "tier_mode": "rd", "high_dtype": "float16",
            "rd_value_weight": 1.0}
    for name, rd_bits in (("cache_rd_hull_skip", 13.0), ("cache_rd_hull_skip_tight", 11.3)):
        yield name, "cache", {**hull, "rd_bits": rd_bits}, inputs, {"stream": stream}
    # ladder (2, 8, 16), G = 8, float16 metadata: steps 2->8 cost 6R and 8->16 cost 4R, so a
    # chain closed at its 2->8 step could still afford its next step; a budget where the walk
    # skips an item and then takes others (the simulator's return_skipped) pins "closes its chain".
    close = {"group_size": 8, "residual_length": R, "meta_dtype": "float16", "tier_mode": "rd", "high_dtype": "float16",
             "bit_ladder": [2, 8, 16], "value_bit_ladder": [2, 4], "rd_value_weight": 1.0}
    found = [b for b in np.round(np.arange(6.15, 14.0, 0.05), 2) if _closing_matters(k[:, :, :R], v[:, :, :R], I, float(b))]
    assert found, "no budget where closing a chain decides the allocation"
    yield "cache_rd_chain_closes", "cache", {**close, "rd_bits": float(found[len(found) // 2])}, inputs, {"stream": stream}
    # every modelled error is zero (key channels constant over the block, value groups
    # constant within each token), so every value width ties at E = 0: the narrower wins.
    kc = np.broadcast_to(rng.standard_normal((B, H, 1, D)).astype(np.float32), (B, H, T, D)).copy()
    vc = np.repeat(rng.standard_normal((B, H, T, 1)).astype(np.float32), D, axis=3)
    yield "cache_rd_value_width_tie", "cache", {"group_size": 16, "residual_length": R, "tier_mode": "rd", "policy": "key_only",
                                                "rd_bits": 7.0, "rd_value_weight": 1.0}, {"keys": kc, "values": vc, "queries": q}, {"stream": stream}
    # λ != 1 must change bytes: the first weight of a short list whose value width differs
    # from the one λ = 1 gives (both cases are vectors).
    def alloc(lam: float, bits: float) -> tuple[bytes, int]:
        tm, vb = rd_allocate(k[:, :, :R], v[:, :, :R], I, ladder=(2, 3, 4, 8, 16), value_ladder=(2, 3, 4), budget_bits=bits,
                             group_size=16, meta_bytes=2, high_dtype="bfloat16", value_weight=lam)
        return tm.tobytes(), vb

    bits, lam = next((b, w) for b in (4.6, 4.2, 5.0, 3.8, 5.5) for w in (2.0, 3.0, 0.5, 4.0, 0.25, 8.0)
                     if alloc(w, b)[1] != alloc(1.0, b)[1])
    lam_base = {"group_size": 16, "residual_length": R, "meta_dtype": "float16", "tier_mode": "rd", "rd_bits": bits}
    yield "cache_rd_value_weight_decides", "cache", {**lam_base, "rd_value_weight": lam}, inputs, {"stream": stream}
    yield "cache_rd_value_weight_one", "cache", {**lam_base, "rd_value_weight": 1.0}, inputs, {"stream": stream}
    # rd with a budget below the minimum for this head size (3.625 bits at head_dim 16, while
    # larger heads need only 3.125, so the config itself is valid): the first append is
    # rejected (the minimum depends on the shape, known then), naming the cheapest
    # allocation; the cache stays empty.
    stream_err = [_op("append", start=0, stop=20, queries=False,
                      expect_error={"type": "ValueError", "match": ["cheapest allocation"]})]
    yield "cache_rd_below_minimum_rejected", "cache", {"group_size": 32, "residual_length": R, "tier_mode": "rd", "policy": "key_only",
                                                      "rd_bits": 3.3, "rd_value_weight": 1.0}, inputs, {"stream": stream_err}
    yield "cache_rd_key_only", "cache", {"group_size": 32, "residual_length": R, "tier_mode": "rd", "policy": "key_only",
                                         "rd_bits": 4.2, "rd_value_weight": 1.0}, inputs, {"stream": stream}


# ---------------------------------------------------------------------------------------
# Rotation cases (docs/numerics.md §11), format version 1. They live in a manifest of their
# own, ``rotation.json`` (same form as ``manifest.json``), so readers written for the
# version-1 manifest's five kinds keep working unchanged; ``check_vectors`` checks both.
# ---------------------------------------------------------------------------------------

#: the file name of the rotation cases' manifest, next to ``manifest.json``
ROTATION_MANIFEST = "rotation.json"


def _compute_rotate(params: dict[str, Any], inputs: dict[str, np.ndarray], backend: Any) -> dict[str, np.ndarray]:
    """A ``rotate`` case: ``rotated`` = §11 forward of ``x`` (last axis), ``restored`` = the
    inverse of ``rotated``, ``signs`` = the seed's sign vector (when the case has a seed).
    Without ``backend`` the simulator's literal form; with one, the public
    :func:`mixkvq.rotation.hadamard` on that backend."""
    from mixkvq.sim import rotation as sim_rotation

    x, seed, P = inputs["x"], params.get("seed"), params.get("block_size")
    n = int(x.shape[-1]) if x.ndim else 0
    signs = None if seed is None else sim_rotation.sign_vector(n, seed)
    if backend is None:
        y = sim_rotation.hadamard(x, signs=signs, block_size=P)
        r = sim_rotation.hadamard(y, signs=signs, block_size=P, inverse=True)
    else:
        import mixkvq
        from mixkvq.rotation import hadamard

        be = mixkvq.get_backend(backend)
        yb = hadamard(be.from_any(x), seed=seed, block_size=P, backend=be)
        y = np.asarray(be.to_numpy(yb))
        r = np.asarray(be.to_numpy(hadamard(yb, seed=seed, block_size=P, inverse=True, backend=be)))
    out = {"rotated": y, "restored": r}
    if signs is not None:
        out["signs"] = signs
    return out


def rotation_cases() -> Iterator[tuple[str, str, dict[str, Any], dict[str, np.ndarray], dict[str, Any]]]:
    """Every §11 case: (name, kind, params, inputs, extra) as in :func:`cases`."""
    rng = np.random.default_rng(20260115)
    f32 = np.float32
    plain = {"seed": None, "block_size": None}
    # every power of two up to 256: even and odd log2(n) (the normalisation constant's two forms)
    for n in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        x = (rng.standard_normal((4, n)) * rng.uniform(0.01, 100, (4, 1))).astype(np.float32)
        yield f"rot_n{n}", "rotate", dict(plain), {"x": x}, {}
    # seeded signs (the SplitMix64 stream, its 64-bit wrap at the largest seed)
    for n, seed in ((8, 0), (64, 1234567), (128, 2**64 - 1), (256, 20260115)):
        x = (rng.standard_normal((3, n)) * f32(4)).astype(np.float32)
        x[:, 5] *= f32(40)  # an outlier channel
        yield f"rot_n{n}_seed{seed}", "rotate", {"seed": seed, "block_size": None}, {"x": x}, {}
    # sizes that are not powers of two: blocks of the largest power of two dividing n
    for n in (3, 12, 80, 96, 100, 112, 136):
        x = rng.standard_normal((3, n)).astype(np.float32)
        yield f"rot_n{n}_blocks", "rotate", {"seed": 7, "block_size": None}, {"x": x}, {}
    # an explicit block size smaller than the default
    x = rng.standard_normal((2, 128)).astype(np.float32)
    yield "rot_n128_block32", "rotate", {"seed": 3, "block_size": 32}, {"x": x}, {}
    yield "rot_n96_block8", "rotate", {"seed": None, "block_size": 8}, {"x": x[:, :96].copy()}, {}
    # special values: signed zeros (a + b and a - b of zeros, a negation by a sign), float32
    # and float16 subnormals (no flush to zero), float16 extremes, sums that round (ties at
    # 2^24), magnitudes near float32's limit whose rotation stays finite.
    n = 16
    rows = [
        np.zeros(n, f32), np.full(n, -0.0, f32), np.where(np.arange(n) % 2, 0.0, -0.0).astype(f32),
        (np.arange(n) * f32(1e-44)).astype(f32), np.full(n, np.finfo(np.float16).smallest_subnormal, f32),
        np.where(np.arange(n) % 3 == 0, 65504.0, -65504.0).astype(f32),
        (f32(2**24) + (np.arange(n) % 4)).astype(f32), np.where(np.arange(n) % 2, 1.0, 2.0**-24).astype(f32),
        np.where(np.arange(n) < 2, 1.0e37, 0.0).astype(f32), (np.arange(n) == 0).astype(f32),
        np.full(n, 2.0e37, f32),  # 16 * 2e37 = 3.2e38: the last stage stays below the limit
    ]
    specials = np.stack(rows)
    yield "rot_specials", "rotate", dict(plain), {"x": specials}, {}
    yield "rot_specials_seed", "rotate", {"seed": 99, "block_size": None}, {"x": specials}, {}
    # input dtypes (§1): float16 upcast exactly, float64 rounded to nearest even
    yield "rot_f16in", "rotate", {"seed": 5, "block_size": None}, {"x": (rng.standard_normal((3, 64)) * 30).astype(np.float16)}, {}
    yield "rot_f64in", "rotate", {"seed": 5, "block_size": None}, {"x": rng.standard_normal((3, 24)) * 3.0 + 1e-9}, {}
    # rejections: a non-finite input (named, first index), a sum beyond float32's range
    # (the first non-finite result), a block size that is not a power of two dividing n
    x = rng.standard_normal((2, 8)).astype(np.float32)
    x[1, 5], x[1, 6] = np.nan, np.inf
    yield "rot_error_non_finite", "error", {"call": "rotate", **plain}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(1, 5)", "non-finite"]}}
    x = np.zeros((2, 4), f32)
    x[1, :2] = 3.0e38
    yield "rot_error_overflow", "error", {"call": "rotate", **plain}, {"x": x}, \
        {"expect": {"type": "ValueError", "match": ["x", "(1, 0)", "overflows float32"]}}
    yield "rot_error_block_size", "error", {"call": "rotate", "seed": None, "block_size": 3}, {"x": np.zeros((1, 12), f32)}, \
        {"expect": {"type": "ValueError", "match": ["block_size", "power of two"]}}
    yield from _rotated_cache_cases(rng)


def _rotated_cache_cases(rng: np.random.Generator) -> Iterator[tuple[str, str, dict[str, Any], dict[str, np.ndarray], dict[str, Any]]]:
    """§11.6: caches whose key tier sets (salience first, on the unrotated keys) and values
    rotate. D = 24 so the sets are not powers of two (budget [2, 4]: 4 mid channels, 18 low
    = blocks 16 + 2)."""
    B, H, n_rep, T, D = 2, 2, 3, 200, 24
    k = rng.standard_normal((B, H, T, D)).astype(np.float16)
    k[:, :, :, 5] *= 20  # an outlier channel
    k[:, :, :, 11] += 6
    v = rng.standard_normal((B, H, T, D)).astype(np.float16)
    v[:, :, :, 3] *= 12
    q = rng.standard_normal((B, H * n_rep, T, D)).astype(np.float16)
    q[:, :, :, 7] *= 8
    inputs = {"keys": k, "values": v, "queries": q}
    base = {"group_size": 32, "residual_length": 64, "meta_dtype": "float16", "rotation_seed": 2026}
    yield "cache_rot_budget_tiers", "cache", {**base, "tier_mode": "budget", "budget": [2, 4], "key_rotation": "tiers"}, inputs, {}
    yield "cache_rot_budget_low_values", "cache", {**base, "tier_mode": "budget", "budget": [2, 4], "key_rotation": "low",
                                                   "value_rotation": True}, inputs, {}
    yield "cache_rot_threshold", "cache", {**base, "tier_mode": "threshold", "thresholds": [1.55, 1.2],
                                           "key_rotation": "tiers", "value_rotation": True}, inputs, {}
    yield "cache_rot_rd", "cache", {**base, "tier_mode": "rd", "rd_bits": 4.0, "rd_value_weight": 1.0,
                                    "key_rotation": "tiers", "value_rotation": True}, inputs, {}
    yield "cache_rot_kivi_sliding", "cache", {**base, "policy": "uniform", "value_window": "sliding", "value_bits": 3,
                                              "key_rotation": "tiers", "value_rotation": True,
                                              "rotation_seed": 2**64 - 1}, inputs, {}
    # two constant channels of 2e38 in one low set: unrotated they quantize (float32 metadata),
    # rotated their sum leaves float32 — the flush is rejected
    kf = np.zeros((1, 1, 64, 8), np.float32)
    kf[..., 0], kf[..., 1] = 2e38, 2e38
    small = {"keys": kf, "values": np.zeros_like(kf), "queries": np.ones_like(kf)}
    params = {"group_size": 32, "residual_length": 64, "meta_dtype": "float32", "policy": "key_only",
              "tier_mode": "budget", "budget": [0, 0], "key_rotation": "tiers"}
    yield "cache_rot_error_overflow", "error", {"call": "cache", **params}, small, \
        {"expect": {"type": "ValueError", "match": ["rotating keys overflows float32"]}}


def write_rotation_vectors(folder: Path) -> list[dict[str, Any]]:
    """Write the :func:`rotation_cases` npz files and ``rotation.json`` into ``folder``."""
    manifest = []
    for name, kind, params, inputs, extra in rotation_cases():
        outputs = compute(kind, params, inputs, expect=extra.get("expect"))
        np.savez_compressed(folder / f"{name}.npz", **{f"in_{k}": v for k, v in inputs.items()},
                            **{f"out_{k}": v for k, v in outputs.items()})
        entry = {"name": name, "kind": kind, "params": params}
        if "expect" in extra:
            entry["expect"] = extra["expect"]
        manifest.append(entry)
    (folder / ROTATION_MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "cases": manifest}, indent=1) + "\n")
    return manifest
