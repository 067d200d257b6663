"""Golden vectors: fixed-seed cases of the format, made by the simulator, checkable by anyone.

``python scripts/make_golden_vectors.py`` writes ``tests/vectors/v1/<case>.npz`` and
``manifest.json``. Each npz holds the case's inputs (``in_*``) and expected outputs
(``out_*``); :func:`compute` turns inputs into outputs with any backend, and
:func:`check_vectors` compares every output byte for byte. bfloat16 metadata is stored as
its uint16 bit pattern.
"""

from __future__ import annotations

import json
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


def _first_block_relevance(q: np.ndarray, n_rep: int, R: int) -> np.ndarray:
    from mixkvq.sim import salience

    return salience.relevance(salience.query_token_sums(q[:, :, :R], n_rep).sum(axis=2), R, n_rep)


def compute(kind: str, params: dict[str, Any], inputs: dict[str, np.ndarray], backend: Any = None) -> dict[str, np.ndarray]:
    """Expected outputs of one case, computed with ``backend`` (default: the simulator)."""
    import mixkvq

    be = mixkvq.get_backend(backend or "numpy")
    np_ = be.to_numpy
    if kind == "pack":
        packed = be.pack(be.from_any(inputs["codes"]), params["bits"])
        return {"packed": np_(packed)}
    if kind == "quantize":
        x = be.from_any(inputs["x"])
        packed, scale, zero = be.quantize(x, params["bits"], params["group_size"], params["meta_dtype"], "x")
        y = be.dequantize(packed, scale, zero, params["bits"], params["group_size"], x.shape[-1], params.get("out_dtype", "float32"))
        return {"packed": np_(packed), "scale": _bits(np_(scale)), "zero": _bits(np_(zero)), "dequantized": np_(y)}
    if kind == "half":
        packed = be.encode_half(be.from_any(inputs["x"]), params["high_dtype"], "x")
        return {"packed": np_(packed), "decoded": np_(be.decode_half(packed, params["high_dtype"]))}
    if kind == "cache":
        cache = mixkvq.KVCache(mixkvq.MixKVQConfig.from_dict(params), backend=be)
        cache.append(be.from_any(inputs["keys"]), be.from_any(inputs["values"]), queries=be.from_any(inputs["queries"]))
        out: dict[str, np.ndarray] = {}
        for j, block in enumerate(cache.key_blocks):
            out[f"block{j}_tier_map"] = np_(block.tier_map)
            for bits, rows in block.tiers.items():
                out[f"block{j}_w{bits}_packed"] = np_(rows.packed)
                if rows.scale is not None:
                    out[f"block{j}_w{bits}_scale"] = _bits(np_(rows.scale))
                    out[f"block{j}_w{bits}_zero"] = _bits(np_(rows.zero))
        for j, rows in enumerate(cache.value_rows):
            out[f"values{j}_packed"] = np_(rows.packed)
            out[f"values{j}_scale"] = _bits(np_(rows.scale))
            out[f"values{j}_zero"] = _bits(np_(rows.zero))
        keys, values = cache.dequantized()
        out["dequantized_keys"], out["dequantized_values"] = np.asarray(np_(keys)), np.asarray(np_(values))
        out["nbytes"] = np.array(cache.nbytes, dtype=np.int64)
        return out
    raise ValueError(f"unknown golden case kind {kind!r}")


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
    for name, kind, params, inputs in cases():
        outputs = compute(kind, params, inputs)
        np.savez_compressed(folder / f"{name}.npz", **{f"in_{k}": v for k, v in inputs.items()},
                            **{f"out_{k}": v for k, v in outputs.items()})
        entry = {"name": name, "kind": kind, "params": params}
        if kind == "cache":  # the complete configuration, defaults included, and how it was fed
            import mixkvq

            entry["config"] = mixkvq.MixKVQConfig.from_dict(params).to_dict()
            entry["stream"] = "one append(keys, values, queries) of all tokens"
        manifest.append(entry)
    (folder / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "cases": manifest}, indent=1) + "\n")
    return manifest


def check_vectors(folder: Path, backend: Any = None) -> list[str]:
    """Recompute every case with ``backend``; return the names of mismatching outputs ([] = pass)."""
    meta = json.loads((folder / "manifest.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} holds golden vectors of version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    failures = []
    for case in meta["cases"]:
        with np.load(folder / f"{case['name']}.npz") as data:
            inputs = {k[3:]: data[k] for k in data.files if k.startswith("in_")}
            expected = {k[4:]: data[k] for k in data.files if k.startswith("out_")}
        got = compute(case["kind"], case["params"], inputs, backend)
        for key in sorted(set(expected) | set(got)):
            e, g = expected.get(key), got.get(key)
            if e is None or g is None or e.shape != np.shape(g) or not np.array_equal(_bits(e), _bits(np.asarray(g)), equal_nan=False):
                failures.append(f"{case['name']}:{key}")
    return failures
