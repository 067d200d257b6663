"""End-to-end generation benchmark: ``mixkvq bench --generate`` (or ``python -m mixkvq.apps.genbench``).

For each context length and cache, a **fresh Python process** loads the embedded model
(float32), builds a prompt of that many tokens from the Wikipedia text, and runs
``model.generate`` greedily for ``--new`` tokens. It reports:

* ``decode_ms``: milliseconds per generated token after the first (a logits processor
  timestamps every step, so the prefill is excluded);
* ``prefill_s``: seconds to the first token;
* ``cache_mib``: the cache's own bytes at the end (MixKVQ: every stored byte; DynamicCache:
  its float32 tensors; QuantizedCache: its quantized and residual tensors);
* ``peak_mib``: the process's peak resident memory during generation above what it held once
  the model was loaded (``VmHWM`` reset through ``/proc/self/clear_refs`` after loading), so a
  hidden dequantized copy shows.

Caches: ``dynamic`` (transformers DynamicCache), ``mixkvq`` (the README's
``MixKVQCache(MixKVQConfig(), model_config=...)``), ``quanto`` (transformers QuantizedCache,
quanto int2, G=32, R=128). Ratios are against ``dynamic`` at the same context, all measured in
this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHES = ("dynamic", "mixkvq", "quanto")
CONTEXTS = (2048, 4096, 8192)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _cache_bytes(cache: Any) -> int:
    from mixkvq.apps.eval.methods import cache_stats

    return int(cache_stats(cache)["nbytes"])


def worker(cache_kind: str, context: int, new: int, threads: int) -> dict[str, Any]:
    """One measurement in this process (called in a fresh subprocess by :func:`run`)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from mixkvq import MixKVQConfig
    from mixkvq.apps.data import load_documents, load_model, token_stream
    from mixkvq.integrations.transformers import cache_argument

    torch.set_num_threads(threads)
    model, tok, _ = load_model()
    docs = load_documents()
    ids = torch.tensor([token_stream(tok, docs, context)])
    if cache_kind == "dynamic":
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    elif cache_kind == "mixkvq":
        from mixkvq.integrations.transformers import MixKVQCache, enable

        enable(model)
        cache = MixKVQCache(MixKVQConfig(), model_config=model.config)
    elif cache_kind == "quanto":
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=model.config, nbits=2, q_group_size=32, residual_length=128)
    else:
        raise ValueError(f"unknown cache {cache_kind!r}; choose from {CACHES}")

    stamps: list[float] = []

    class Stamp(LogitsProcessor):
        def __call__(self, input_ids, scores):  # noqa: D401 - transformers' signature
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():  # warm the kernels (and build the native library) off the clock
        model(ids[:, :16])
    import gc

    gc.collect()
    base_kib = _status_kib("VmRSS")
    peak_ok = _reset_peak()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **{cache_argument(model): cache},
                             max_new_tokens=new, min_new_tokens=new, do_sample=False,
                             logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=tok.eos_token_id)
    peak_kib = _status_kib("VmHWM")
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    backend = None
    if cache_kind == "mixkvq":
        backend = cache.layers[0].backend.name
    return {
        "cache": cache_kind, "context": context, "new_tokens": int(out.shape[1] - ids.shape[1]), "threads": threads,
        "prefill_s": stamps[0] - t0 if stamps else None,
        "decode_ms": 1e3 * sum(steps) / len(steps) if steps else None,
        "cache_mib": _cache_bytes(cache) / 2**20,
        "peak_mib": (peak_kib - base_kib) / 1024 if peak_ok else None,
        "backend": backend,
    }


def run(contexts: "tuple[int, ...]" = CONTEXTS, caches: "tuple[str, ...]" = CACHES, new: int = 32,
        threads: int = 2, out: "str | None" = None) -> list[dict[str, Any]]:
    """Every (context, cache) in its own process; prints a table, returns (and writes) the rows."""
    rows: list[dict[str, Any]] = []
    for context in contexts:
        for cache in caches:
            cmd = [sys.executable, "-m", "mixkvq.apps.genbench", "--worker", cache, "--contexts", str(context),
                   "--new", str(new), "--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if proc.returncode:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                row = {"cache": cache, "context": context, "error": tail[0]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            _print_row(row, rows)
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
    return rows


def _print_row(row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if "error" in row:
        print(f"{row['context']:>6} {row['cache']:<8} error: {row['error']}", flush=True)
        return
    ref = next((r for r in rows if r.get("cache") == "dynamic" and r["context"] == row["context"] and "error" not in r), None)
    rel = ""
    if ref and ref is not row:
        rel = (f"  x_dynamic: decode {row['decode_ms'] / ref['decode_ms']:.2f}  cache {row['cache_mib'] / ref['cache_mib']:.3f}"
               + (f"  peak {row['peak_mib'] / ref['peak_mib']:.2f}" if row["peak_mib"] and ref["peak_mib"] else ""))
    peak = f"{row['peak_mib']:7.1f}" if row["peak_mib"] is not None else "    n/a"
    print(f"{row['context']:>6} {row['cache']:<8} decode {row['decode_ms']:7.1f} ms/token  prefill {row['prefill_s']:6.2f} s"
          f"  cache {row['cache_mib']:7.1f} MiB  peak+ {peak} MiB"
          f"{'  [' + row['backend'] + ']' if row.get('backend') else ''}{rel}", flush=True)


def main(argv: "list[str] | None" = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixkvq.apps.genbench", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)), help="comma-separated prompt lengths")
    p.add_argument("--caches", default=",".join(CACHES), help=f"comma-separated, from {', '.join(CACHES)}")
    p.add_argument("--new", type=int, default=32, help="tokens to generate")
    p.add_argument("--threads", type=int, default=2, help="torch (and native) threads")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    contexts = tuple(int(c) for c in a.contexts.split(",") if c)
    if a.worker:
        print(json.dumps(worker(a.worker, contexts[0], a.new, a.threads)))
        return
    run(contexts, tuple(c for c in a.caches.split(",") if c), a.new, a.threads, a.out)


if __name__ == "__main__":
    main()
