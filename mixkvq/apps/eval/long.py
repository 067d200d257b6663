"""Long-context evaluation: ``mixkvq eval --long`` (or ``python -m mixkvq.apps.eval.long``).

On the embedded model up to its 8192-token window, for contexts of 2k, 4k and 8k tokens:

* **perplexity** of the last ``score_len`` tokens of each context, teacher-forced, with KL and
  top-1 agreement against full precision on the same tokens;
* **retrieval**: a passage of ``passage_len`` tokens from a far document is placed at depths of
  10/50/90% of the context; at the end its first ``cue_len`` tokens are repeated and the rest of
  the passage is scored teacher-forced — ``copy_top1`` (fraction of copied tokens predicted
  top-1) and ``copy_exact`` (all of them right);
* **decode ms/token** of each cache at each length (a few timed single-token steps) and its
  ratio to DynamicCache at the same length.

The prefill of every context is computed **once** in full precision and its post-RoPE
queries/keys/values (what every cache receives in a prefill: a prefill attends to its own
exact tokens) are handed to each method's cache layer by layer; only the scored tokens run
through the model with each cache. This is exactly what each cache sees in ``generate`` and
makes the run about as many times cheaper as there are methods.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mixkvq.integrations.transformers import MixKVQCache, enable

from .harness import capture_qkv, continue_stream
from .methods import Method, MethodUnavailable, build_cache, builtin_methods, cache_stats, resolve_methods

CONTEXTS = (2048, 4096, 8192)
DEPTHS = (0.1, 0.5, 0.9)
LONG_METHODS = ("full", "kivi2", "kivi3", "kivi4", "kivi_k4v2", "mixkvq", "mixkvq_thr", "rd3.25", "rd3.53125",
                "rd4.03125", "quanto2")


@dataclass
class LongSettings:
    """Sizes of a long-context run."""

    contexts: tuple[int, ...] = CONTEXTS
    depths: tuple[float, ...] = DEPTHS
    score_len: int = 64
    passage_len: int = 64
    cue_len: int = 16
    timed_steps: int = 6
    seed: int = 0

    def check(self, max_positions: int) -> None:
        for c in self.contexts:
            if not 4 * self.passage_len <= c <= max_positions:
                raise ValueError(f"context {c} must lie in [{4 * self.passage_len}, {max_positions}] (the model's window)")
        if not all(0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 1]; got {self.depths}")
        if not 0 < self.cue_len < self.passage_len:
            raise ValueError("cue_len must be in (0, passage_len)")


def _fill(cache: Any, captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
    """Give ``cache`` the prefill every layer received (keys/values, and queries for MixKVQ
    layers, which observe them as the "mixkvq" attention function would)."""
    for li in sorted(captured):
        q, k, v = captured[li]
        if isinstance(cache, MixKVQCache):
            cache.update(k, v, li)
            layer = cache.layers[li]
            if hasattr(layer, "observe"):
                layer.observe(q)
        else:
            cache.update(k, v, li)
    from mixkvq.integrations import transformers as integ

    integ._PENDING.set(None)  # nothing waits for queries: they were handed over above


def _tokens(tokenizer: Any, docs: list[str], n: int, start: int) -> list[int]:
    from mixkvq.apps.data import token_stream

    return token_stream(tokenizer, docs, n, start_doc=start)


def build_retrieval(tokenizer: Any, docs: list[str], context: int, depth: float, s: LongSettings,
                    seed: int = 0) -> tuple[torch.Tensor, int]:
    """``(ids (1, context), prompt_len)``: filler text with a far document's passage at
    ``depth`` and, at the end, the passage's first ``cue_len`` tokens; the last
    ``passage_len - cue_len`` ids are the rest of the passage (the tokens to copy)."""
    far = _tokens(tokenizer, docs, 4 * s.passage_len, len(docs) // 2 + 17 * seed + 3)
    passage = far[s.passage_len: 2 * s.passage_len]  # from inside the document, not its title
    n_fill = context - s.passage_len - s.passage_len  # passage + (cue + copied) at the end
    fill = _tokens(tokenizer, docs, n_fill, 1 + 31 * seed)
    at = int(round(depth * n_fill))
    ids = fill[:at] + passage + fill[at:] + passage
    return torch.tensor([ids], dtype=torch.long), context - (s.passage_len - s.cue_len)


def run_long(model: Any, tokenizer: Any, docs: list[str], methods: list[Method], settings: LongSettings,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every method at every context length on the same texts; a JSON-ready results dict."""
    enable(model)
    max_pos = int(getattr(model.config, "max_position_embeddings", 8192))
    settings.check(max_pos)
    rows: list[dict[str, Any]] = []
    for L in settings.contexts:
        # -- perplexity of the last tokens (and the decode timing) --
        ids = torch.tensor([_tokens(tokenizer, docs, L, 0)], dtype=torch.long)
        start = L - settings.score_len - settings.timed_steps
        captured, first = capture_qkv(model, ids[:, :start], with_logits=True)
        targets = ids[0, start:]
        ref = None
        # -- retrieval prompts (one capture each, shared by the methods) --
        probes = []
        for d in settings.depths:
            rid, prompt_len = build_retrieval(tokenizer, docs, L, d, settings)
            probes.append((d, rid, prompt_len, *capture_qkv(model, rid[:, :prompt_len], with_logits=True)))
        for method in methods:
            row: dict[str, Any] = {"context": L, "method": method.name, "description": method.description}
            try:
                cache = build_cache(method, model)
            except MethodUnavailable as exc:
                row.update(available=False, reason=str(exc))
                rows.append(row)
                log(f"[{L} {method.name}] unavailable: {exc}")
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _fill(cache, captured)
                rest, times = continue_stream(model, cache, ids, start, chunk_period=method.exact_chunk_period,
                                              timed=settings.timed_steps)
                times = times[: settings.timed_steps]  # a token-by-token method times every step
            logp = torch.cat([first[None], rest])
            nll = float(-logp.gather(1, targets[:, None]).mean())
            stats = cache_stats(cache)
            del cache
            if method.kind == "full":
                ref = logp
            kl = float((ref.exp() * (ref - logp)).sum(-1).mean()) if ref is not None else float("nan")
            top1 = float((ref.argmax(-1) == logp.argmax(-1)).float().mean()) if ref is not None else float("nan")
            copy_top1, copy_exact = [], []
            for d, rid, prompt_len, cap, f in probes:
                cache = build_cache(method, model)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _fill(cache, cap)
                    rest, _ = continue_stream(model, cache, rid, prompt_len, chunk_period=method.exact_chunk_period)
                del cache
                pred = torch.cat([f[None], rest]).argmax(-1)
                hit = (pred == rid[0, prompt_len:]).float()
                copy_top1.append(float(hit.mean()))
                copy_exact.append(float(hit.min()))
            row.update(available=True, ppl=math.exp(nll), nll=nll, kl=kl, top1=top1,
                       decode_ms=1e3 * float(np.mean(times)) if times else None,
                       bits_per_element=stats["bits_per_element"], block_bits=stats.get("block_bits"),
                       nbytes=stats["nbytes"], copy_top1=float(np.mean(copy_top1)), copy_exact=float(np.mean(copy_exact)),
                       copy_top1_by_depth=dict(zip(map(str, settings.depths), copy_top1)))
            rows.append(row)
            log(f"[{L:>5} {method.name:<10}] ppl {row['ppl']:8.3f}  KL {kl:.4f}  copy top1 {row['copy_top1']:.3f} "
                f"exact {row['copy_exact']:.2f}  bits/elem {row['bits_per_element']:.2f}  "
                f"decode {row['decode_ms'] or float('nan'):.1f} ms/token")
        del captured, probes
    for r in rows:  # decode time relative to full precision at the same length
        ref_row = next((x for x in rows if x["context"] == r["context"] and x["method"] == "full" and x.get("available")), None)
        if r.get("available") and ref_row and r.get("decode_ms") and ref_row.get("decode_ms"):
            r["decode_ratio"] = r["decode_ms"] / ref_row["decode_ms"]
    return {"settings": settings.__dict__, "rows": rows}


def markdown(results: dict[str, Any]) -> str:
    """One table per context length."""
    out = []
    for L in sorted({r["context"] for r in results["rows"]}):
        out.append(f"\n**{L} tokens**\n")
        out.append("| method | true bits/elem | ppl | KL | top-1 | copy top-1 (10/50/90%) | copy exact | decode ms (x full) |")
        out.append("|---|---|---|---|---|---|---|---|")
        for r in results["rows"]:
            if r["context"] != L:
                continue
            if not r.get("available"):
                out.append(f"| {r['method']} | unavailable: {r.get('reason', '')} | | | | | | |")
                continue
            depths = "/".join(f"{v:.2f}" for v in r["copy_top1_by_depth"].values())
            dec = f"{r['decode_ms']:.1f} ({r.get('decode_ratio', float('nan')):.2f})" if r.get("decode_ms") else "n/a"
            out.append(f"| {r['method']} | {r['bits_per_element']:.2f} | {r['ppl']:.3f} | {r['kl']:.4f} | {r['top1']:.3f} "
                       f"| {r['copy_top1']:.3f} ({depths}) | {r['copy_exact']:.2f} | {dec} |")
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: "str | Path") -> None:
    """Perplexity increase over full precision and copy top-1 against context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r.get("available")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    full = {r["context"]: r for r in rows if r["method"] == "full"}
    for i, m in enumerate(methods):  # one colour per method in both panels
        pts = sorted(((r["context"], r) for r in rows if r["method"] == m), key=lambda p: p[0])
        xs = [c for c, _ in pts]
        style = dict(marker="o", label=m, color="black" if m == "full" else colors[i % len(colors)],
                     linestyle="--" if i >= len(colors) else "-")
        if m != "full":
            a.plot(xs, [r["ppl"] / full[c]["ppl"] - 1 if c in full else float("nan") for c, r in pts], **style)
        b.plot(xs, [r["copy_top1"] for _, r in pts], **style)
    a.set_xscale("log", base=2)
    b.set_xscale("log", base=2)
    a.set_xlabel("context tokens")
    b.set_xlabel("context tokens")
    a.set_ylabel("perplexity increase over full precision")
    b.set_ylabel("copied passage: top-1 (teacher-forced)")
    b.legend(fontsize=7, ncol=2)
    a.grid(alpha=0.3)
    b.grid(alpha=0.3)
    fig.suptitle("SmolLM2-135M, Wikipedia: long contexts")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: "list[str] | None" = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixkvq.apps.eval.long", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    p.add_argument("--methods", default=",".join(LONG_METHODS))
    p.add_argument("--out", default="mixkvq-eval-long", help="folder for results.json, results.md, plot")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    from mixkvq.apps.data import load_documents, load_model

    if a.threads:
        torch.set_num_threads(a.threads)
    settings = LongSettings(contexts=tuple(int(c) for c in a.contexts.split(",") if c))
    model, tok, _ = load_model()
    docs = load_documents()
    methods = resolve_methods([m for m in a.methods.split(",") if m], builtin_methods())
    results = run_long(model, tok, docs, methods, settings)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_long.json").write_text(json.dumps(results, indent=1))
    (out / "results_long.md").write_text(markdown(results))
    plot(results, out / "results_long.png")
    print(markdown(results))


if __name__ == "__main__":
    main()
