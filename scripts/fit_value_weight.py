"""Fit the ``rd`` allocator's K/V exchange rate (``rd_value_weight``, λ) against perplexity.

Evaluates the rd allocator at several budgets and exchange rates on held-out text (by
default documents 1000+ of the embedded Wikipedia extracts, apart from the ones
``mixkvq eval`` scores) and prints, for each λ, the perplexity increase at every budget
and its sum; docs/design.md ("The K/V exchange rate") records the run behind the default.

    python scripts/fit_value_weight.py                       # embedded model, about 20 min on 2 cores
    python scripts/fit_value_weight.py --weights 1,2,3 --budgets 3.53125,4.03125,4.53125 --n-samples 8
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from mixkvq import MixKVQConfig
from mixkvq.apps.data import load_documents, load_model
from mixkvq.apps.eval.harness import EvalSettings, evaluate
from mixkvq.apps.eval.methods import Method, builtin_methods


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local model folder or .gguf (default: the embedded SmolLM2-135M)")
    p.add_argument("--text", help="text file or wiki JSON (default: the embedded Wikipedia extracts)")
    p.add_argument("--start-doc", type=int, default=1000, help="first document used (kept apart from eval's)")
    p.add_argument("--weights", default="1,2,3", help="comma-separated λ values")
    p.add_argument("--budgets", default="3.25,3.53125,3.75,4.03125,4.25,4.53125",
                   help="comma-separated rd_bits budgets")
    p.add_argument("--n-samples", type=int, default=24)
    p.add_argument("--context-len", type=int, default=512)
    p.add_argument("--score-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the eval results (JSON) here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tok, _ = load_model(args.model)
    docs = load_documents(args.text)[args.start_doc:]
    if not docs:
        p.error(f"--start-doc {args.start_doc} leaves no documents")
    catalog = builtin_methods()
    base = catalog["rd4.03125"].config
    weights, budgets = _floats(args.weights), _floats(args.budgets)
    methods = [catalog["full"]]
    for lam in weights:
        for bits in budgets:
            cfg: MixKVQConfig = base.replace(rd_bits=bits, rd_value_weight=lam)
            methods.append(Method(f"rd{bits:g}_w{lam:g}", "mixkvq", cfg))
    settings = EvalSettings(n_samples=args.n_samples, context_len=args.context_len, score_len=args.score_len,
                            gen_tokens=0)
    results = evaluate(model, tok, docs, methods, settings, log=lambda s: print(s, file=sys.stderr))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    full = results["results"][0]["ppl"]
    delta = {r["name"]: 100.0 * (r["ppl"] - full) / full for r in results["results"][1:]}
    print("| λ | " + " | ".join(f"{b:g}" for b in budgets) + " | sum |")
    print("|---" * (len(budgets) + 2) + "|")
    for lam in weights:
        row = [delta[f"rd{b:g}_w{lam:g}"] for b in budgets]
        print(f"| {lam:g} | " + " | ".join(f"{d:+.3f}%" for d in row) + f" | {sum(row):+.3f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
