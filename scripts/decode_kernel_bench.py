"""Decode attention of a serving step: MixKVQ's fused kernel over the packed cache against
vLLM's CPU attention kernel over a bfloat16 paged cache, same shapes, same process.

    python scripts/decode_kernel_bench.py                  # 16 requests x 4160 tokens, 1 and 2 threads
    python scripts/decode_kernel_bench.py --requests 4 --tokens 16384

Geometry: SmolLM2-135M (3 KV heads, 9 query heads, head_dim 64), one query token per request,
the default MixKVQ config (G=32, R=128, 2/4/16-bit key tiers, 2-bit values), bfloat16 inputs.
The vLLM column needs vLLM's CPU build (scripts/vllm_env.sh's environment); without it only
MixKVQ and torch's SDPA (bfloat16, the KV heads repeated) are timed. Prints one line per
thread count with the medians and ratios (> 1: MixKVQ faster)."""

from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
import torch

from mixkvq.apps.bench import _time


def median_ms(fn: Callable[[], object], reps: int) -> float:
    """Median ms per call over exactly ``reps`` calls after a warm-up (the bench's timer)."""
    return _time(fn, min_time=float("inf"), max_reps=reps) * 1e3


def vllm_decode(n_req: int, tokens: int, H: int, Hq: int, D: int, R: int) -> "Callable[[], None] | None":
    try:
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    except ImportError:
        return None
    dtype = torch.bfloat16
    isa = _get_attn_isa(dtype, R, D, "auto")
    nb = -(-tokens // R)
    cache = torch.randn((n_req * nb, H, 2 * R, D), dtype=dtype)
    kc, vc = cache.chunk(2, dim=2)
    qsl = torch.arange(n_req + 1, dtype=torch.int32)
    seq = torch.full((n_req,), tokens, dtype=torch.int32)
    bt = torch.arange(n_req * nb, dtype=torch.int32).view(n_req, nb)
    meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=n_req, num_heads=Hq, num_kv_heads=H, head_dim=D, seq_lens=seq,
                                               dtype=dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1,
                                               isa=isa, enable_kv_split=False)
    q = torch.randn((n_req, Hq, D), dtype=dtype)
    o = torch.empty_like(q)

    def run() -> None:
        ops.cpu_attention_with_kv_cache(query=q, key_cache=kc, value_cache=vc, output=o, query_start_loc=qsl,
                                        seq_lens=seq, scale=D ** -0.5, causal=True, alibi_slopes=None,
                                        sliding_window=-1, block_table=bt, softcap=0.0, scheduler_metadata=meta,
                                        s_aux=None)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=4160, help="tokens per request (default 4096 + 64)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()

    from mixkvq import KVCache, MixKVQConfig

    B, H, Hq, D, T = a.requests, 3, 9, 64, a.tokens
    rng = np.random.default_rng(0)
    bf16 = lambda x: torch.from_numpy(x).to(torch.bfloat16)  # noqa: E731
    k = rng.standard_normal((B, H, T, D)).astype(np.float32)
    k[..., ::8] *= 8  # outlier channels
    v = rng.standard_normal((B, H, T, D)).astype(np.float32)
    cfg = MixKVQConfig()
    cache = KVCache(cfg, backend="cpu")
    cache.append(bf16(k), bf16(v), queries=bf16(rng.standard_normal((B, Hq, T, D)).astype(np.float32)))
    q1 = torch.from_numpy(rng.standard_normal((B, Hq, 1, D)).astype(np.float32))
    kr, vr = bf16(k).repeat_interleave(Hq // H, 1), bf16(v).repeat_interleave(Hq // H, 1)
    qb = q1.to(torch.bfloat16)
    print(f"{B} requests x {T} tokens, {H}x{D} KV heads / {Hq} query heads; MixKVQ holds "
          f"{8 * cache.nbytes / (2 * k.size):.2f} bits per K/V element")
    for n in (int(x) for x in a.threads.split(",")):
        torch.set_num_threads(n)
        stock = vllm_decode(B, T, H, Hq, D, cfg.residual_length)  # its schedule is made for the thread count
        t_mkq = median_ms(lambda: cache.attention(q1), a.reps)
        t_sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qb, kr, vr), a.reps)
        line = f"threads {n}: MixKVQ fused {t_mkq:.2f} ms | torch SDPA bf16 {t_sdpa:.2f} ms ({t_sdpa / t_mkq:.2f}x)"
        if stock is not None:
            t_vllm = median_ms(stock, a.reps)
            line += f" | vLLM CPU kernel bf16 {t_vllm:.2f} ms ({t_vllm / t_mkq:.2f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
