"""Numbers for docs/vllm.md: KV capacity, greedy agreement, tokens/s (MixKVQ vs stock vLLM).

Run in the vLLM environment (bash scripts/vllm_env.sh):
    VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0 \
        ~/.cache/mixkvq/vllm-venv/bin/python scripts/vllm_bench.py [--quick] [-o vllm-bench.json]

Each engine runs in its own process (the plugin choice is made when vLLM's processes start);
about 6-10 minutes on 2 cores (--quick: fewer, shorter requests).
"""

from __future__ import annotations

import argparse
import json

from mixkvq.integrations.vllm import bench


def engine_run(enabled: bool, what: str, *, timeout: int, **kw) -> dict:
    return bench.engine_in_subprocess(what, enabled=enabled, timeout=timeout, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("-o", "--output", default="vllm-bench.json")
    ap.add_argument("--only", choices=("capacity", "throughput", "agreement"), help="one part of the report")
    ap.add_argument("--prompt-len", type=int, default=256, help="throughput: prompt tokens per request (default 256)")
    ap.add_argument("--batches", default=None, help="throughput: concurrent requests, e.g. 1,4,16 (default; --quick: 1,4)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="throughput: model dtype of both engines (default float32)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per engine run")
    ap.add_argument("--kv-mib", type=int, default=bench.KV_BYTES >> 20, help="KV cache memory of every engine (MiB)")
    a = ap.parse_args()
    bench.setup_env()
    batches = [int(x) for x in a.batches.split(",")] if a.batches else ([1, 4] if a.quick else [1, 4, 16])
    new = 32 if a.quick else 64
    kv_bytes = a.kv_mib << 20
    lengths = [60, 200, 300, 520]
    out: dict = {"kv_cache_bytes": kv_bytes, "prompt_len": a.prompt_len, "dtype": a.dtype}

    part = a.only
    out["capacity"] = {}
    if part in (None, "capacity"):  # stock bf16 (stock fp32 and MixKVQ come with the throughput runs)
        out["capacity"]["stock_bf16"] = engine_run(False, "capacity", timeout=a.timeout, dtype="bfloat16", kv_bytes=kv_bytes)["kv_tokens"]
        print(out, flush=True)
    if part == "capacity":
        out["capacity"]["mixkvq"] = engine_run(True, "capacity", timeout=a.timeout, dtype="float32", kv_bytes=kv_bytes)["kv_tokens"]
        out["capacity"]["ratio_vs_bf16"] = out["capacity"]["mixkvq"] / out["capacity"]["stock_bf16"]
        print(json.dumps(out, indent=1))
        return

    # throughput + the agreement prompts, float32 models for both
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bench.DEFAULT_MODEL))
    prompts = bench.prompts_from_wiki(tok, lengths)
    kw = dict(dtype=a.dtype, batches=batches, max_tokens=new, prompt_len=a.prompt_len, kv_bytes=kv_bytes)
    if part in (None, "throughput"):
        ours = engine_run(True, "throughput", timeout=a.timeout, **kw)
        stock = engine_run(False, "throughput", timeout=a.timeout, **kw)
        out["capacity"].update(stock_fp32=stock["kv_tokens"], mixkvq=ours["kv_tokens"])
        if "stock_bf16" in out["capacity"]:
            out["capacity"]["ratio_vs_bf16"] = ours["kv_tokens"] / out["capacity"]["stock_bf16"]
        out["throughput"] = {f"{n}": {"mixkvq": ours[f"tps_{n}"], "stock": stock[f"tps_{n}"]} for n in batches}
        out["impls"] = {"mixkvq": ours["reports"][0]["impls"], "stock": stock["reports"][0]["impls"]}
        out["mixkvq_worker_stats"] = ours["reports"][0]["stats"]
        out["stock_worker_stats"] = {k: stock["reports"][0]["stats"][k] for k in ("forwards", "t_forward", "t_forward_mixed", "t_update")}
        print(json.dumps(out["throughput"]), flush=True)
    if part == "throughput":
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "impls"}, indent=1))
        return

    v_ours = engine_run(True, "generate", timeout=a.timeout, dtype="float32", prompts=prompts, max_tokens=new, kv_bytes=kv_bytes)["outputs"]
    v_stock = engine_run(False, "generate", timeout=a.timeout, dtype="float32", prompts=prompts, max_tokens=new, kv_bytes=kv_bytes)["outputs"]
    h_mix = bench.hf_generate(prompts, new)
    h_full = bench.hf_generate(prompts, new, mixkvq=False)
    out["agreement"] = {
        "prompt_lengths": lengths, "new_tokens": new,
        "vllm_mixkvq_vs_hf_mixkvqcache": bench.agreement(v_ours, h_mix),
        "vllm_stock_vs_hf_dynamiccache": bench.agreement(v_stock, h_full),
        "hf_mixkvqcache_vs_hf_dynamiccache": bench.agreement(h_mix, h_full),
        "vllm_mixkvq_vs_vllm_stock": bench.agreement(v_ours, v_stock),
    }
    with open(a.output, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k != "impls"}, indent=1))


if __name__ == "__main__":
    main()
