"""The evaluation harness: streaming perplexity through each cache, agreement with full
precision, per-layer attention error, memory and speed.

Protocol (per method, same samples, same run):

1. **Streaming perplexity.** Each sample is ``context + score`` tokens. The context is
   prefilled through the cache in one forward pass; the ``score`` continuation then follows
   as in deployment: every scored token attends to the quantized past exactly as it would
   token by token (blocks flush as the residual fills). The first ``timed_samples`` samples
   are fed one token at a time (and timed); the others in the chunks of
   :attr:`Method.exact_chunk_period`, which give each token the same view of the cache
   (only the float summation order of the model's own matmuls differs). NLL of each
   continuation token → ppl.
2. **Agreement with full precision.** The full-precision run's next-token distributions are
   the reference: mean KL(full ‖ method) per token and top-1 agreement.
3. **Per-layer attention-output relative error.** Q/K/V of every layer are captured once
   from a full-precision prefill; each layer's K/V go through a core KVCache of the method
   (with the queries), and ``‖attn(Q, K̂, V̂) − attn(Q, K, V)‖ / ‖attn(Q, K, V)‖`` is
   measured for the probe queries — the same inputs for every method, no error
   propagation across layers.
4. **Memory and speed.** True stored bytes and bits per element at the end of the stream,
   nominal code bits, mean decode time per token and its ratio to the full-precision
   (DynamicCache) run.
5. **Continuations.** A short greedy continuation of one prompt per method.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from mixkvq.cache import KVCache
from mixkvq.config import MixKVQConfig
from mixkvq.integrations.transformers import cache_argument

from .methods import Method, MethodUnavailable, build_cache, cache_stats

CAPTURE_IMPLEMENTATION = "mixkvq_capture"


@dataclass
class EvalSettings:
    """Sizes of an evaluation run."""

    n_samples: int = 1
    context_len: int = 384
    score_len: int = 128
    gen_prompt_len: int = 256
    gen_tokens: int = 24
    probe_queries: int = 64
    seed: int = 0
    progress: bool = True
    #: samples fed one token at a time (their decode steps are timed); the rest go in exact chunks
    timed_samples: int = 1
    #: feed every sample one token at a time (the slow reference of the chunked protocol)
    stepwise: bool = False

    def check(self) -> None:
        for name in ("n_samples", "context_len", "score_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.score_len < 2:
            raise ValueError("score_len must be >= 2 (one prefill prediction and at least one decode step)")
        if self.timed_samples < 1:
            raise ValueError(f"timed_samples must be >= 1 (the decode speed is measured on them); got {self.timed_samples}")
        if self.gen_tokens < 0 or self.probe_queries < 1:
            raise ValueError("gen_tokens must be >= 0 and probe_queries >= 1")


@dataclass
class MethodResult:
    name: str
    description: str
    kind: str
    available: bool = True
    reason: str = ""
    ppl: float = float("nan")
    nll: float = float("nan")
    #: mean NLL of each sample's scored tokens (all samples score the same count), for paired comparisons
    nll_per_sample: list[float] = field(default_factory=list)
    kl: float = float("nan")
    #: mean KL to the full-precision row over each sample's scored tokens (paired KL comparisons)
    kl_per_sample: list[float] = field(default_factory=list)
    top1: float = float("nan")
    nbytes: float = float("nan")
    bits_per_element: float = float("nan")
    nominal_bits: float = float("nan")
    block_bits: float = float("nan")
    decode_ms: float = float("nan")
    decode_ratio: float = float("nan")
    attn_err_layers: list[float] = field(default_factory=list)
    attn_err: float = float("nan")
    continuation: str = ""
    config: dict[str, Any] | None = None
    layer_rd_bits: list[float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d


def make_samples(tokenizer: Any, docs: list[str], settings: EvalSettings) -> list[torch.Tensor]:
    """``n_samples`` token sequences of ``context_len + score_len`` ids, from consecutive
    documents (EOS-separated), each sample starting at a fresh document."""
    from ..data import DataError

    need = settings.context_len + settings.score_len
    out, i = [], 0
    eos = tokenizer.eos_token_id
    while len(out) < settings.n_samples:
        ids: list[int] = []
        start = i
        while len(ids) < need:
            if i - start >= len(docs):
                raise DataError(f"the text is too short for samples of {need} tokens; pass a longer text or smaller lengths")
            ids.extend(tokenizer(docs[i % len(docs)], add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(int(eos))
            i += 1
        out.append(torch.tensor([ids[:need]], dtype=torch.long))
    return out


@torch.no_grad()
def stream(model: Any, cache: Any, ids: torch.Tensor, context_len: int, *,
           chunk_period: int | None = 1) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Prefill ``ids[:, :context_len]`` through ``cache``, then feed the rest.

    With ``chunk_period=1`` (the deployment loop) the rest goes in one token at a time and
    every step is timed. A larger period feeds it in chunks that end at multiples of the
    period (``None``: one chunk); :attr:`Method.exact_chunk_period` gives the largest period
    with which a cache sees exactly what it sees token by token. Returns (log-probs ``(S, V)``
    of the predictions for tokens ``context_len..``, the target ids ``(S,)``, decode step
    times in seconds; empty when chunked)."""
    out = model(input_ids=ids[:, :context_len], use_cache=True, **{cache_argument(model): cache})
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    rest, times = continue_stream(model, cache, ids, context_len, chunk_period=chunk_period)
    return torch.cat([first[None], rest]), ids[0, context_len:], times


@torch.no_grad()
def continue_stream(model: Any, cache: Any, ids: torch.Tensor, start: int, *,
                    chunk_period: int | None = 1, timed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Feed ``ids[:, start:-1]`` to a cache that already holds ``ids[:, :start]`` (chunked as in
    :func:`stream`; the first ``timed`` tokens one at a time before the chunks); returns the
    log-probs ``(T - 1 - start, V)`` of the predictions for tokens ``start + 1..`` and the
    times of the single-token steps (every step when ``chunk_period=1``, else the ``timed``)."""
    kw = cache_argument(model)
    T = ids.shape[1]
    logps: list[torch.Tensor] = []
    times = []
    t = start
    while t < T - 1:
        single = len(times) < timed
        if single:
            end = t + 1
        else:
            end = T - 1 if chunk_period is None else min(T - 1, (t // chunk_period + 1) * chunk_period)
        t0 = time.perf_counter()
        out = model(input_ids=ids[:, t:end], use_cache=True, **{kw: cache})
        if chunk_period == 1 or single:
            times.append(time.perf_counter() - t0)
        logps.extend(torch.log_softmax(out.logits[0].float(), -1).unbind(0))
        t = end
    V = int(model.config.vocab_size)
    return (torch.stack(logps) if logps else torch.zeros(0, V)), times


@torch.no_grad()
def reference_decode_ms(model: Any, ids: torch.Tensor, context_len: int, steps: int = 16) -> float:
    """Mean decode time per token of a DynamicCache on the same tokens, measured right now
    (the denominator of each method's speed ratio, so CPU load shared with other processes
    hits both sides alike)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    steps = max(1, min(steps, ids.shape[1] - context_len - 1))
    _, _, times = stream(model, cache, ids[:, : context_len + steps + 1], context_len)
    return 1000.0 * float(np.mean(times))


# -- Q/K/V capture --------------------------------------------------------------------------------
_CAPTURED: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _CAPTURED[int(module.layer_idx)] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@torch.no_grad()
def capture_qkv(model: Any, ids: torch.Tensor, *, with_logits: bool = False) -> Any:
    """Post-RoPE queries, keys and values ``(B, H*, T, D)`` of every layer for a
    full-precision forward of ``ids`` (no cache), keyed by layer index; with ``with_logits``
    also the log-probs ``(V,)`` of the token after ``ids`` (batch row 0), as a pair."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capture_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, sdpa_mask)
    previous = model.config._attn_implementation
    _CAPTURED.clear()
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    try:
        out = model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(previous)
    captured = dict(_CAPTURED)
    _CAPTURED.clear()
    if with_logits:
        return captured, torch.log_softmax(out.logits[0, -1].float(), -1)
    return captured


def _attend(q: torch.Tensor, k: Any, v: Any) -> np.ndarray:
    """The simulator's reference attention (float64 softmax), causal; ``q`` holds the last
    ``Tq`` positions of ``k``."""
    from mixkvq.sim.attention import attention as reference_attention

    f32 = lambda x: np.asarray(x.detach().float().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)  # noqa: E731
    return reference_attention(f32(q), f32(k), f32(v), scale=1.0 / math.sqrt(int(q.shape[-1])), causal=True)


def attention_errors(config: MixKVQConfig, captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     probe: int, layer_configs: "dict[int, MixKVQConfig | None] | None" = None,
                     backend: "str | None" = None) -> tuple[list[float], list[KVCache]]:
    """Per-layer relative attention-output error of ``config`` (or ``layer_configs[layer]``;
    ``None`` = full precision, error 0) on captured Q/K/V; the filled caches of the quantized
    layers are returned too (for their byte counts). ``backend``: default the integration's."""
    from mixkvq.integrations.transformers import default_backend_name

    backend = backend or default_backend_name()
    errs, caches = [], []
    for li in sorted(captured):
        layer_cfg = (layer_configs or {}).get(li, config)
        if layer_cfg is None:
            errs.append(0.0)
            continue
        q, k, v = captured[li]
        cache = KVCache(layer_cfg, backend=backend)
        cache.append(k, v, queries=q)
        kh, vh = cache.dequantized()
        qp = q[:, :, -probe:]
        ref = _attend(qp, k, v)
        got = _attend(qp, kh, vh)
        errs.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
        caches.append(cache)
    return errs, caches


# -- the run ------------------------------------------------------------------------------------
def _progress(iterable: Any, settings: EvalSettings, **kw: Any) -> Any:
    if not settings.progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kw)


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, docs: list[str], methods: list[Method], settings: EvalSettings,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every method on the same samples; returns a JSON-ready results dict."""
    from mixkvq.integrations.transformers import enable

    settings.check()
    torch.manual_seed(settings.seed)
    enable(model)
    samples = make_samples(tokenizer, docs, settings)
    order = sorted(methods, key=lambda m: m.kind != "full")  # the reference first
    if order[0].kind != "full":
        from .methods import builtin_methods

        order.insert(0, builtin_methods()["full"])
    captured = capture_qkv(model, samples[0][:, : settings.context_len])
    gen_prompt = samples[0][:, : min(settings.gen_prompt_len, samples[0].shape[1])]
    ref_logps: list[torch.Tensor] = []
    full_ms = float("nan")
    results: list[MethodResult] = []
    for method in _progress(order, settings, desc="methods", unit="method"):
        res = MethodResult(method.name, method.description, method.kind,
                           config=method.config.to_dict() if method.config is not None else None)
        if method.layer_configs is not None:
            res.layer_rd_bits = [None if (c := method.layer_configs.get(i, method.config)) is None else c.keys.bits
                                 for i in range(len(captured))]
        try:
            build_cache(method, model)  # availability check before spending time
        except MethodUnavailable as exc:
            res.available, res.reason = False, str(exc)
            log(f"[{method.name}] unavailable: {exc}")
            results.append(res)
            continue
        nll_sum = kl_sum = n_tok = agree = 0.0
        times: list[float] = []
        stats: dict[str, float] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            local_ref_ms = reference_decode_ms(model, samples[0], settings.context_len)
        for si, ids in enumerate(_progress(samples, settings, desc=method.name, unit="sample", leave=False)):
            cache = build_cache(method, model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                period = 1 if settings.stepwise or si < settings.timed_samples else method.exact_chunk_period
                logp, targets, t = stream(model, cache, ids, settings.context_len, chunk_period=period)
            times.extend(t)
            sample_nll = float(-logp.gather(1, targets[:, None]).sum())
            res.nll_per_sample.append(sample_nll / targets.numel())
            nll_sum += sample_nll
            n_tok += targets.numel()
            if method.kind == "full":
                ref_logps.append(logp)
            else:
                ref = ref_logps[si]
                sample_kl = float((ref.exp() * (ref - logp)).sum())
                res.kl_per_sample.append(sample_kl / targets.numel())
                kl_sum += sample_kl
                agree += float((ref.argmax(-1) == logp.argmax(-1)).sum())
            s = cache_stats(cache)
            for k2, v2 in s.items():
                stats[k2] = stats.get(k2, 0.0) + v2 / len(samples)
            del cache
        res.nll = nll_sum / n_tok
        res.ppl = math.exp(res.nll)
        res.kl = kl_sum / n_tok if method.kind != "full" else 0.0
        res.top1 = agree / n_tok if method.kind != "full" else 1.0
        res.nbytes, res.bits_per_element, res.nominal_bits = stats["nbytes"], stats["bits_per_element"], stats["nominal_bits"]
        res.block_bits = stats.get("block_bits", float("nan"))
        res.decode_ms = 1000.0 * float(np.mean(times)) if times else float("nan")
        if method.kind == "full":
            full_ms = res.decode_ms
        # ratio to a DynamicCache timed just before this method (same load on the machine)
        res.decode_ratio = res.decode_ms / local_ref_ms
        if method.kind == "mixkvq":
            res.attn_err_layers, _ = attention_errors(method.config, captured, settings.probe_queries, method.layer_configs)
            res.attn_err = float(np.mean(res.attn_err_layers))
        elif method.kind == "full":
            res.attn_err_layers, res.attn_err = [0.0] * len(captured), 0.0
        if settings.gen_tokens:
            cache = build_cache(method, model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = model.generate(input_ids=gen_prompt, attention_mask=torch.ones_like(gen_prompt),
                                     max_new_tokens=settings.gen_tokens, do_sample=False, **{cache_argument(model): cache},
                                     pad_token_id=tokenizer.pad_token_id)
            res.continuation = tokenizer.decode(out[0, gen_prompt.shape[1]:], skip_special_tokens=True)
        log(f"[{method.name}] ppl {res.ppl:.3f}  KL {res.kl:.4f}  top1 {res.top1:.3f}  bits/elem {res.bits_per_element:.2f}  "
            f"decode {res.decode_ms:.1f} ms/token")
        results.append(res)
    full = next(r for r in results if r.kind == "full")
    for r in results:
        r_d = r.ppl - full.ppl
        setattr(r, "delta_ppl", r_d)
    return {
        "settings": dict(settings.__dict__),
        "n_scored_tokens": int(settings.n_samples * settings.score_len),
        "gen_prompt": tokenizer.decode(gen_prompt[0, -200:], skip_special_tokens=True),
        "results": [{**r.to_dict(), "delta_ppl": (None if not math.isfinite(getattr(r, "delta_ppl", float("nan")))
                                                  else getattr(r, "delta_ppl"))} for r in results],
    }
