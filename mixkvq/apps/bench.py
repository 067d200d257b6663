"""Throughput benchmarks: ``python -m mixkvq.apps.bench [--quick] [--backends numpy,torch]``.

For each shape (batch 1; 3 KV heads x 64 with 9 query heads, and 8 KV heads x 128 with 32
query heads) and cache length (4k, 16k, 64k tokens) it times, per backend:

* ``quantize+pack``: values-style per-token quantization of a float16 ``(1, H, T, D)``
  (``vs_copy``: a same-size ``clone`` time / this op's time, so 0.5 = half the copy bandwidth);
* ``unpack+dequantize``: the inverse, to float32;
* ``flush``: one key+value block flush of a :class:`~mixkvq.KVCache` (R tokens, query-aware);
* ``decode``: one decode attention step (1 query token) over the quantized cache;

each as GB/s of float16 input and as a ratio to a plain copy of the same float16 tensor
timed in the same run (``x.clone()`` / ``np.copy``). The decode step is also compared with
``torch.nn.functional.scaled_dot_product_attention`` over the same tokens in float16 and in
float32 (``speedup_vs_sdpa16/32`` > 1: the packed decode is faster), with the ratio of bytes
held (quantized cache ``nbytes`` / fp16 K+V bytes). ``mixkvq bench --generate`` is the
end-to-end benchmark (:mod:`mixkvq.apps.genbench`).
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from typing import Any, Callable

import numpy as np

SHAPES = ((3, 64, 9), (8, 128, 32))  # (KV heads, head_dim, query heads)
LENGTHS = (4096, 16384, 65536)


def _time(fn: Callable[[], Any], *, min_time: float = 0.3, max_reps: int = 30) -> float:
    """Median seconds per call (one warm-up call)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _row(rows: list[dict[str, Any]], **kw: Any) -> None:
    rows.append(kw)
    gb = kw.get("gbps")
    extra = "  ".join(f"{k}={v}" for k, v in kw.items() if k not in ("op", "backend", "shape", "tokens", "ms", "gbps"))
    print(f"{kw['op']:<18} {kw['backend']:<6} {kw['shape']:<10} {kw['tokens']:>6}  {kw['ms']:9.2f} ms"
          f"  {'' if gb is None else f'{gb:7.2f} GB/s'}  {extra}", flush=True)


def run(quick: bool = False, backends: tuple[str, ...] = ("cpu", "torch"), threads: int | None = None,
        lengths: "tuple[int, ...] | None" = None, shapes: "tuple[tuple[int, int, int], ...]" = SHAPES,
        budget: "tuple[float, float] | None" = None) -> list[dict[str, Any]]:
    """Run the benchmarks, print one line per measurement and return the rows."""
    import torch
    import torch.nn.functional as F

    from mixkvq import KVCache, MixKVQConfig
    from mixkvq.backend import get_backend

    if threads:
        torch.set_num_threads(threads)
    if lengths is None:
        lengths = (4096, 16384) if quick else LENGTHS
    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    cfg = MixKVQConfig(group_size=32, residual_length=128)  # paper defaults: 2-bit values/keys, query-aware
    if budget is not None:
        cfg = cfg.replace(budget=budget)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; config: G={cfg.group_size}, R={cfg.residual_length}, "
          f"keys {cfg.key_tier_bits} bits, budget {cfg.keys.budget}, values {cfg.values.bits} bits, meta {cfg.meta_dtype}", flush=True)
    for H, D, Hq in shapes:
        shape = f"{H}x{D}/{Hq}"
        for T in lengths:
            x16 = (rng.standard_normal((1, H, T, D)) * 2).astype(np.float16)
            nbytes = x16.nbytes
            for name in backends:
                if name == "numpy" and T > 16384:
                    continue  # the reference simulator is not a fast path; skip the largest size
                be = get_backend(name)
                x = be.from_any(x16)
                is_torch = isinstance(x, torch.Tensor)
                copy = (lambda: x.clone()) if is_torch else (lambda: np.copy(x))
                t_copy = _time(copy)
                t_q = _time(lambda: be.quantize(x, cfg.values.bits, cfg.group_size, cfg.meta_dtype, "x"))
                packed, scale, zero = be.quantize(x, cfg.values.bits, cfg.group_size, cfg.meta_dtype, "x")
                t_d = _time(lambda: be.dequantize(packed, scale, zero, cfg.values.bits, cfg.group_size, D, "float32"))
                for op, t in (("quantize+pack", t_q), ("unpack+dequantize", t_d)):
                    _row(rows, op=op, backend=name, shape=shape, tokens=T, ms=t * 1e3, gbps=nbytes / t / 1e9,
                         vs_copy=f"{t_copy / t:.3f}", copy_gbps=f"{nbytes / t_copy / 1e9:.2f}")
                del packed, scale, zero
                gc.collect()
            # the caches: prefill T tokens (with queries), then flush one more block and decode
            k16 = (rng.standard_normal((1, H, T, D))).astype(np.float16)
            k16[..., :: max(1, D // 8)] *= 8  # outlier channels
            v16 = rng.standard_normal((1, H, T, D)).astype(np.float16)
            q16 = rng.standard_normal((1, Hq, T, D)).astype(np.float16)
            q1 = rng.standard_normal((1, Hq, 1, D)).astype(np.float16)
            R = cfg.residual_length
            kb = rng.standard_normal((1, H, R, D)).astype(np.float16)
            qb = rng.standard_normal((1, Hq, R, D)).astype(np.float16)
            for name in backends:
                if name == "numpy" and T > 16384:
                    continue
                be = get_backend(name)
                conv = be.from_any
                cache = KVCache(cfg, backend=name)
                cache.append(conv(k16), conv(v16), queries=conv(q16))
                blk = (conv(kb), conv(kb), conv(qb))
                flush_nbytes = 2 * kb.nbytes

                def flush() -> None:
                    c = KVCache(cfg, backend=name)  # an empty cache flushing exactly one block
                    c.append(*blk[:2], queries=blk[2])

                t_f = _time(flush)
                xb = conv(kb)
                t_fc = _time((lambda: xb.clone()) if isinstance(xb, torch.Tensor) else (lambda: np.copy(xb)))
                _row(rows, op="flush", backend=name, shape=shape, tokens=R, ms=t_f * 1e3, gbps=flush_nbytes / t_f / 1e9,
                     vs_copy=f"{2 * t_fc / t_f:.3f}")
                qn = conv(q1)
                t_a = _time(lambda: cache.attention(qn), min_time=0.5, max_reps=20)
                kv_fp16 = 2 * k16.nbytes
                extra: dict[str, Any] = {"held": f"{cache.nbytes / kv_fp16:.3f}"}
                if isinstance(qn, torch.Tensor):
                    # speedup = SDPA time / this decode's time (> 1: faster than SDPA) over the same
                    # tokens, float16 K/V (what the quantized cache replaces) and float32 (what a
                    # float32 model's DynamicCache attends over)
                    kt, vt, qt = (torch.from_numpy(a) for a in (k16, v16, q1))
                    kr, vr = kt.repeat_interleave(Hq // H, 1), vt.repeat_interleave(Hq // H, 1)
                    t_sdpa = _time(lambda: F.scaled_dot_product_attention(qt, kr, vr), min_time=0.5, max_reps=20)
                    k32, v32, q32 = kr.float(), vr.float(), qt.float()
                    t_sdpa32 = _time(lambda: F.scaled_dot_product_attention(q32, k32, v32), min_time=0.5, max_reps=20)
                    extra.update(sdpa16_ms=f"{t_sdpa * 1e3:.2f}", speedup_vs_sdpa16=f"{t_sdpa / t_a:.2f}x",
                                 sdpa32_ms=f"{t_sdpa32 * 1e3:.2f}", speedup_vs_sdpa32=f"{t_sdpa32 / t_a:.2f}x")
                    del k32, v32, kr, vr
                _row(rows, op="decode", backend=name, shape=shape, tokens=T, ms=t_a * 1e3, gbps=kv_fp16 / t_a / 1e9, **extra)
                del cache
                gc.collect()
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixkvq.apps.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="4k and 16k tokens only")
    p.add_argument("--backends", default="cpu,torch", help="comma-separated backend names (numpy: the simulator)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--budget", default=None, help="HIGH,MID channel fractions (default: the config's 1/32,1/8)")
    a = p.parse_args(argv)
    budget = tuple(float(f) for f in a.budget.split(",")) if a.budget else None
    run(a.quick, tuple(b for b in a.backends.split(",") if b), a.threads, budget=budget)


if __name__ == "__main__":
    main()
