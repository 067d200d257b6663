"""Measurements of the vLLM backend: capacity, greedy agreement with MixKVQCache, tokens/s.

Used by tests/test_vllm.py and scripts/vllm_bench.py; runs in the vLLM environment
(scripts/vllm_env.sh). Engines are made with :func:`make_llm`; a stock engine (vLLM's own
CPU backend) must be made in another process with ``MIXKVQ_VLLM=0`` (:func:`stock_in_subprocess`),
because the plugin decision is taken when vLLM's processes load their plugins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_MODEL = Path(os.environ.get("MIXKVQ_VLLM_MODEL") or
                     Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mixkvq/smollm2-hf")
KV_BYTES = 1 << 28  # 256 MiB of KV cache: small and the same for every engine


def setup_env() -> None:
    """The CPU engine's settings for this 2-core machine (respecting what is set)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(worker_report)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_llm(model: "str | Path" = DEFAULT_MODEL, *, dtype: str = "float32", kv_bytes: int = KV_BYTES,
             max_model_len: int = 2048, max_num_seqs: int = 16, prefix_caching: bool = True, **kw: Any) -> Any:
    setup_env()
    from vllm import LLM

    return LLM(model=str(model), dtype=dtype, max_model_len=max_model_len, enforce_eager=True,
               enable_prefix_caching=prefix_caching, kv_cache_memory_bytes=kv_bytes, max_num_seqs=max_num_seqs,
               seed=0, **kw)


def kv_tokens(llm: Any) -> int:
    """KV capacity in tokens as the engine reports it (blocks x block size)."""
    cc = llm.llm_engine.vllm_config.cache_config
    return int(cc.num_gpu_blocks) * int(cc.block_size)


def worker_reports(llm: Any) -> list[dict]:
    from .backend import worker_report

    return llm.collective_rpc(worker_report)


def prompts_from_wiki(tokenizer: Any, lengths: "list[int]", start_doc: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, each from its own stretch of the embedded
    Wikipedia text (mixkvq.apps.data); falls back to a repeated sentence without it."""
    try:
        from ...apps.data import load_documents, token_stream

        stream = token_stream(tokenizer, load_documents(), sum(lengths) + 16, start_doc=start_doc)
    except Exception:  # noqa: BLE001 - the text package is optional
        text = "The history of the city goes back to the Roman era, when a small settlement grew by the river. "
        stream = tokenizer(text * (sum(lengths) // 10 + 2))["input_ids"]
    out, pos = [], 0
    for n in lengths:
        out.append([int(t) for t in stream[pos: pos + n]])
        pos += n
    return out


def vllm_generate(llm: Any, prompts: "list[list[int]]", max_tokens: int) -> tuple[list[list[int]], float]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    dt = time.perf_counter() - t
    return [list(o.outputs[0].token_ids) for o in outs], dt


def hf_generate(prompts: "list[list[int]]", max_tokens: int, *, model: "str | Path" = DEFAULT_MODEL,
                mixkvq: bool = True, config: Any = None, prefilled: int = 0) -> list[list[int]]:
    """Greedy continuations with transformers: MixKVQCache (packed attention, native cpu
    backend) or, with ``mixkvq=False``, the default DynamicCache. One prompt at a time.
    ``prefilled``: run the first that many prompt tokens as a forward of their own first."""
    import torch
    from transformers import AutoModelForCausalLM

    from ...config import MixKVQConfig
    from ..transformers import MixKVQCache, cache_argument, enable

    m = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    if mixkvq:
        enable(m)
    out = []
    with torch.no_grad():
        for p in prompts:
            kw = {}
            if mixkvq:
                kw[cache_argument(m)] = MixKVQCache(config or MixKVQConfig(), model_config=m.config)
            if prefilled and mixkvq:
                # the prefix in one forward first: what a vLLM prefix-cache hit leaves stored
                m(input_ids=torch.tensor([p[:prefilled]]), use_cache=True, **kw)
            g = m.generate(torch.tensor([p]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                           **kw)
            out.append(g[0, len(p):].tolist())
    return out


def agreement(a: "list[list[int]]", b: "list[list[int]]") -> dict:
    """Per prompt: the length of the common greedy prefix, as a fraction of the continuation."""
    firsts = []
    for x, y in zip(a, b):
        n = min(len(x), len(y))
        k = next((i for i in range(n) if x[i] != y[i]), n)
        firsts.append(k)
    n = max(1, len(a[0]) if a else 1)
    return {"common_prefix": firsts, "fraction": [f / n for f in firsts],
            "mean_fraction": sum(firsts) / (n * max(1, len(firsts)))}


def throughput(llm: Any, prompts: "list[list[int]]", max_tokens: int) -> dict:
    outs, dt = vllm_generate(llm, prompts, max_tokens)
    n = sum(len(o) for o in outs)
    return {"requests": len(prompts), "output_tokens": n, "seconds": dt, "tokens_per_s": n / dt}


def engine_in_subprocess(what: str = "capacity", *, enabled: bool = False, timeout: int = 900, **kw: Any) -> dict:
    """Run :func:`main` in a fresh process, with the MixKVQ plugin on or off (off: vLLM's own
    CPU backend); returns its RESULT row."""
    env = dict(os.environ, MIXKVQ_VLLM="1" if enabled else "0", MIXKVQ_VLLM_TIME_STOCK="0" if enabled else "1")
    cmd = [sys.executable, "-m", "mixkvq.integrations.vllm.bench", what, json.dumps(kw)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    for line in reversed(r.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"engine run failed (rc {r.returncode}):\n{r.stderr[-4000:]}")


def stock_in_subprocess(what: str = "capacity", **kw: Any) -> dict:
    """:func:`engine_in_subprocess` with the plugin off (vLLM's own CPU backend)."""
    return engine_in_subprocess(what, enabled=False, **kw)


def main(what: str, kw: dict) -> dict:
    longest = kw.get("prompt_len", 256) + kw.get("max_tokens", 64)
    llm = make_llm(dtype=kw.get("dtype", "float32"), kv_bytes=kw.get("kv_bytes", KV_BYTES),
                   max_model_len=max(2048, -(-longest // 128) * 128))
    res: dict[str, Any] = {"kv_tokens": kv_tokens(llm)}
    if what == "throughput":
        tok = llm.get_tokenizer()
        for n in kw.get("batches", [1, 4, 16]):
            prompts = prompts_from_wiki(tok, [kw.get("prompt_len", 256)] * n, start_doc=7)
            res[f"tps_{n}"] = throughput(llm, prompts, kw.get("max_tokens", 64))
    if what == "generate":
        outs, _ = vllm_generate(llm, kw["prompts"], kw["max_tokens"])
        res["outputs"] = outs
    res["reports"] = worker_reports(llm)  # after the work: its counters and timers
    return res


if __name__ == "__main__":
    _what = sys.argv[1] if len(sys.argv) > 1 else "capacity"
    _kw = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print("RESULT " + json.dumps(main(_what, _kw)), flush=True)
