"""GPU benchmarks of the CUDA backend (run by scripts/gpu_check.sh; see docs/cuda.md).

1. quantize+pack throughput (both kernels: metadata + codes) as a fraction of the device
   copy bandwidth measured in the same run;
2. fused decode attention over a packed MixKVQ cache vs torch scaled_dot_product_attention
   on fp16 K/V (32 query / 8 KV heads, head_dim 128), tokens 8k..128k, batch 1..16; plus the
   fused kernel's error against a float32 attention over the dequantized cache.

Writes ``<out>/gpu_bench.json`` and ``<out>/gpu_bench.md``. ``--cpu-dry-run`` runs the same
code with tiny shapes on the CPU emulation (NumPy arrays), to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

from mixkvq.config import MixKVQConfig
from mixkvq.format import HIGH_BITS
from mixkvq.layout import PackedLayout
from mixkvq.state import Storage

HQ, HKV, D = 32, 8, 128


class Timer:
    """Median milliseconds of ``fn`` (CUDA events on the GPU, wall clock on the CPU)."""

    def __init__(self, xp, iters: int = 10, warmup: int = 2):
        self.xp, self.iters, self.warmup = xp, iters, warmup
        self.gpu = xp.__name__ == "cupy"

    def __call__(self, fn, iters: int | None = None, warmup: int | None = None) -> float:
        iters = self.iters if iters is None else min(iters, self.iters)
        warmup = self.warmup if warmup is None else min(warmup, self.warmup)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.gpu:
                start, end = self.xp.cuda.Event(), self.xp.cuda.Event()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(self.xp.cuda.get_elapsed_time(start, end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))


def bench_quantize(backend, timer, shapes) -> list[dict]:
    xp = backend.xp
    out = []
    for label, shape, bits, group in shapes:
        x = xp.asarray(np.random.default_rng(0).standard_normal(shape, dtype=np.float32))
        y = xp.empty_like(x)
        copy_ms = timer(lambda: xp.copyto(y, x))
        copy_gbs = 2 * x.nbytes / copy_ms / 1e6
        q_ms = timer(lambda: backend.quantize(x, bits, group, "float16", "x"))
        packed, scale, zero = backend.quantize(x, bits, group, "float16", "x")
        moved = x.nbytes + packed.nbytes + scale.nbytes + zero.nbytes
        q_gbs = moved / q_ms / 1e6
        out.append(dict(case=label, shape=list(shape), bits=bits, group_size=group, copy_ms=copy_ms,
                        copy_GBps=copy_gbs, quantize_ms=q_ms,
                        quantize_GBps=q_gbs, input_GBps=x.nbytes / q_ms / 1e6, fraction_of_copy=q_gbs / copy_gbs))
        del x, y, packed, scale, zero
    return out


def build_storage(backend, cfg: MixKVQConfig, B: int, T: int, seed: int = 0) -> Storage:
    """A packed cache of T tokens (T // R quantized blocks, the rest residual), made block by
    block with the backend's ops (random keys/values, salience from random queries)."""
    xp = backend.xp
    R = cfg.residual_length
    rs = np.random.default_rng(seed)

    def normal(shape):  # generated on the device: host generation would dominate at 128k tokens
        if xp.__name__ == "cupy":
            return xp.random.standard_normal(shape, dtype=xp.float32)
        return rs.standard_normal(shape, dtype=np.float32)

    blocks, values = [], []
    layout = PackedLayout(cfg, D)
    keys = cfg.keys
    n_high, n_mid = keys.counts(D)
    for _ in range(T // R):
        k, v = normal((B, HKV, R, D)), normal((B, HKV, R, D))
        rel = xp.abs(normal((B, HKV, D)))
        sal = rel * backend.difficulty(k, keys.low_bits)
        tier_map = backend.assign_budget(sal, n_high, n_mid, (HIGH_BITS, keys.mid_bits, keys.low_bits))
        blocks.append(layout.encode_keys(backend, k, tier_map))
        values.append(layout.encode_values(backend, v))
    r = T - (T // R) * R
    res_k, res_v = normal((B, HKV, r, D)).astype(xp.float16), normal((B, HKV, r, D)).astype(xp.float16)
    return Storage(tuple(blocks), tuple(values), res_k, res_v)


def sub_storage(storage: Storage, T: int, R: int, xp) -> Storage:
    """The first T tokens of a storage whose residual is empty (T a multiple of R)."""
    nb = T // R
    empty = xp.zeros((storage.key_blocks[0].tier_map.shape[0], HKV, 0, D), dtype=xp.float16)
    return Storage(storage.key_blocks[:nb], storage.value_rows[:nb], empty, empty)


def packed_bytes(storage: Storage) -> int:
    return sum(int(a.nbytes) for a in storage.arrays())


def float32_attention(xp, q, k, v, scale):
    """Reference: float32 attention over dequantized K/V (decode: no mask needed)."""
    B, Hq, Tq, Dh = q.shape
    n_rep = Hq // k.shape[1]
    qg = q.reshape(B, k.shape[1], n_rep * Tq, Dh)
    s = xp.einsum("bhqd,bhkd->bhqk", qg, k) * np.float32(scale)
    s -= s.max(axis=-1, keepdims=True)
    p = xp.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return xp.einsum("bhqk,bhkd->bhqd", p, v).reshape(B, Hq, Tq, Dh)


def torch_sdpa(xp, B: int, T: int, timer) -> "float | str":
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as exc:
        return f"torch not importable: {exc}"
    if xp.__name__ != "cupy" or not torch.cuda.is_available():
        return "torch has no CUDA here"
    try:
        q = torch.randn(B, HQ, 1, D, device="cuda", dtype=torch.float16)
        k = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16)
        v = torch.randn(B, HKV, T, D, device="cuda", dtype=torch.float16)
        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
        with torch.no_grad():
            fn()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(10):
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        del q, k, v
        torch.cuda.empty_cache()
        return float(np.median(times))
    except Exception as exc:  # noqa: BLE001 - reported in the results instead of aborting the run
        return f"torch sdpa failed: {type(exc).__name__}: {exc}"


def bench_attention(backend, timer, tokens, batches, cfg) -> list[dict]:
    xp = backend.xp
    out = []
    for B in batches:
        t0 = time.perf_counter()
        full = build_storage(backend, cfg, B, max(tokens))
        layout = PackedLayout(cfg, D)
        build_s = time.perf_counter() - t0
        for T in tokens:
            view = sub_storage(full, T, cfg.residual_length, xp)
            q = xp.asarray(np.random.default_rng(1).standard_normal((B, HQ, 1, D), dtype=np.float32))
            scale = 1.0 / math.sqrt(D)
            plan_ms = timer(lambda: backend.attention_plan(view, layout, B, HKV), iters=3, warmup=1)
            plan = backend.attention_plan(view, layout, B, HKV)
            fused_ms = timer(lambda: backend.attention(q, view, layout, scale=scale, causal=True, plan=plan))
            row = dict(batch=B, tokens=T, fused_ms=fused_ms, plan_ms=plan_ms, cache_build_s=build_s,
                       packed_MB=packed_bytes(view) / 1e6, fp16_kv_MB=2 * B * HKV * T * D * 2 / 1e6)
            row["fused_effective_GBps"] = packed_bytes(view) / fused_ms / 1e6
            sdpa = torch_sdpa(xp, B, T, timer)
            if isinstance(sdpa, float):
                row["sdpa_fp16_ms"] = sdpa
                row["speedup_vs_sdpa"] = sdpa / fused_ms
            else:
                row["sdpa_fp16_ms"] = None
                row["sdpa_note"] = sdpa
            if B * T <= 32768:  # error check against float32 attention over the dequantized cache
                k, v = layout.dequantized(backend, view)
                ref = float32_attention(xp, q, k, v, scale)
                got = backend.attention(q, view, layout, scale=scale, causal=True, plan=plan)
                row["max_abs_err_vs_dequantized_fp32"] = float(xp.abs(got - ref).max())
            out.append(row)
            print(json.dumps(row), flush=True)
        del full
        if xp.__name__ == "cupy":
            xp.get_default_memory_pool().free_all_blocks()
    return out


def to_markdown(res: dict) -> str:
    lines = [f"# GPU check: {res['device']}", "", f"CuPy {res.get('cupy')}, {res['python']}", "",
             "## quantize+pack throughput", "",
             "| case | shape | bits | G | copy GB/s | quantize GB/s (bytes moved) | fraction of copy |",
             "|---|---|---|---|---|---|---|"]
    for r in res["quantize"]:
        lines.append(f"| {r['case']} | {r['shape']} | {r['bits']} | {r['group_size']} | {r['copy_GBps']:.0f} | "
                     f"{r['quantize_GBps']:.0f} | {r['fraction_of_copy']:.2f} |")
    lines += ["", "## fused decode attention (32 q heads / 8 KV heads, head_dim 128, Tq = 1)", "",
              "| batch | tokens | fused ms | plan ms | torch SDPA fp16 ms | speed-up | packed MB | fp16 K/V MB | max abs err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in res["attention"]:
        sd = f"{r['sdpa_fp16_ms']:.3f}" if r.get("sdpa_fp16_ms") else r.get("sdpa_note", "-")
        sp = f"{r['speedup_vs_sdpa']:.2f}x" if r.get("speedup_vs_sdpa") else "-"
        err = f"{r['max_abs_err_vs_dequantized_fp32']:.2e}" if "max_abs_err_vs_dequantized_fp32" in r else "-"
        lines.append(f"| {r['batch']} | {r['tokens']} | {r['fused_ms']:.3f} | {r['plan_ms']:.2f} | {sd} | {sp} | "
                     f"{r['packed_MB']:.1f} | {r['fp16_kv_MB']:.1f} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny shapes on the CPU emulation")
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = MixKVQConfig(group_size=32, residual_length=128)
    if args.cpu_dry_run:
        from mixkvq.backends.cupy import CupyCpuBackend

        backend = CupyCpuBackend()
        device = "CPU emulation (dry run)"
        qshapes = [("values per token", (64, 128), 2, 32)]
        tokens, batches = [128, 256], [1]
    else:
        from mixkvq.backends.cupy import CupyBackend

        backend = CupyBackend()
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        # 16 batch x 8 heads x 8192 tokens x 128 channels = 2^27 float32 (512 MiB) per tensor
        qshapes = [("values per token", (16 * 8 * 8192, 128), 2, 32),
                   ("keys per channel, 2-bit", (16 * 8 * 128 * 64, 128), 2, 32),
                   ("keys per channel, 4-bit", (16 * 8 * 128 * 64, 128), 4, 32)]
        tokens, batches = [8192, 32768, 131072], [1, 4, 16]
    timer = Timer(backend.xp, *((1, 0) if args.cpu_dry_run else (10, 2)))
    res = dict(device=device, python=sys.version.split()[0], platform=platform.platform(),
               cupy=getattr(backend.xp, "__version__", None) if backend.xp.__name__ == "cupy" else None,
               config=cfg.to_dict(), split_tokens="auto")
    res["quantize"] = bench_quantize(backend, timer, qshapes)
    print(json.dumps(res["quantize"], indent=1), flush=True)
    res["attention"] = bench_attention(backend, timer, tokens, batches, cfg)
    (out_dir / "gpu_bench.json").write_text(json.dumps(res, indent=1))
    (out_dir / "gpu_bench.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
