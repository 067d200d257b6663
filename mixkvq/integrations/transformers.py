"""MixKVQ as a drop-in transformers cache (tested against transformers 5.0 to 5.24).

Usage::

    from mixkvq import MixKVQConfig
    from mixkvq.integrations.transformers import MixKVQCache, enable

    enable(model)                              # attention implementation "mixkvq"
    cache = MixKVQCache(MixKVQConfig(), model_config=model.config)
    out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64)

How it works (docs/integration.md has the details):

* Each attention layer gets a :class:`MixKVQLayer` holding one core
  :class:`~mixkvq.KVCache`. ``update(k, v)`` appends the new tokens and returns the
  layer's history **as it was stored before the call** (quantized blocks dequantized, the
  full-precision residual) followed by the new tokens in full precision — what a deployment
  kernel sees: the tokens of the current forward attend to each other exactly, everything
  older is read from the quantized storage.
* The attention function ``"mixkvq"`` (registered through ``AttentionInterface`` by
  :func:`register`) receives the query states, feeds them to
  :meth:`~mixkvq.KVCache.observe_queries` of the layer that was just updated (this is
  what lets a query-aware block flush), then computes standard SDPA attention on the K/V
  that ``update`` returned. No model code is patched.
* Dequantized blocks are memoised per layer (quantized tokens never change, so neither
  does their dequantized form); ``nbytes`` counts only the quantized storage.
"""

from __future__ import annotations

import contextvars
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from ..backend import ENV_VAR, Backend, get_backend
from ..cache import KVCache
from ..config import MixKVQConfig

ATTN_IMPLEMENTATION = "mixkvq"
ATTENTION_MODES = ("dequantized", "packed")
TESTED_TRANSFORMERS = "5.24"


_NATIVE: "dict[str, str | None]" = {}


def native_cpu_status() -> "str | None":
    """None when the native ``"cpu"`` backend loads here (it is built on first use), else
    why not (e.g. no C++ compiler)."""
    if "status" not in _NATIVE:
        try:
            get_backend("cpu")
            _NATIVE["status"] = None
        except (RuntimeError, OSError) as exc:
            _NATIVE["status"] = str(exc).splitlines()[0]
    return _NATIVE["status"]


def default_backend_name(device: "str | torch.device" = "cpu") -> str:
    """The backend the integration uses when none is given: ``$MIXKVQ_BACKEND``; else, for
    tensors on the CPU, the native ``"cpu"`` backend when it builds here (a warning says so
    when it does not); else ``"torch"`` (transformers brings torch, so it always loads)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    if torch.device(device).type == "cpu":
        why = native_cpu_status()
        if why is None:
            return "cpu"
        if not _NATIVE.get("warned"):
            _NATIVE["warned"] = "yes"
            warnings.warn(f"mixkvq: the native CPU backend is unavailable ({why}); using the slower 'torch' "
                          "backend", RuntimeWarning, stacklevel=2)
    return "torch"


@dataclass
class _Pending:
    layer: "MixKVQLayer"
    layer_idx: int
    n_tokens: int


#: The layer updated last in this context, waiting for its queries (set by ``update``,
#: consumed by the ``"mixkvq"`` attention function of the same layer).
_PENDING: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar("mixkvq_pending", default=None)


class MixKVQLayer(CacheLayerMixin):
    """One attention layer's MixKVQ cache, in the transformers layer API."""

    is_compileable = False
    is_croppable = False  # crops inside a quantized block are refused (see KVCache.crop)
    is_sliding = False

    def __init__(self, config: MixKVQConfig | None = None, *, attention: str = "packed",
                 backend: "str | Backend | None" = None, sliding_window: "int | None" = None) -> None:
        super().__init__()
        #: a sliding-window layer (the model's layer type): in the packed mode it frees the
        #: quantized blocks that fall wholly out of its window, bounding its memory
        self.sliding_window = int(sliding_window) if sliding_window else None
        self.is_sliding = self.sliding_window is not None
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}; got {attention!r}")
        self.attention = attention
        self.prefill = True
        self.config = config or MixKVQConfig()
        self._auto_backend = backend is None and not os.environ.get(ENV_VAR)
        self.backend = get_backend(backend or default_backend_name())
        self.kv = KVCache(self.config, backend=self.backend)
        self._memo_k: torch.Tensor | None = None  # dequantized key blocks (model dtype)
        self._memo_v: torch.Tensor | None = None
        self._memo_blocks = 0
        self._memo_vrows = 0
        self.dtype: torch.dtype | None = None
        self.device: torch.device | None = None

    # -- CacheLayerMixin ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self._auto_backend and self.kv.seq_len == 0:  # the default follows the model's device
            name = default_backend_name(key_states.device)
            if name != self.backend.name:
                self.backend = get_backend(name)
                self.kv = KVCache(self.config, backend=self.backend)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, T, D)`` keys/values; return ``(past + new)`` keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        policy = self.config.salience_policy
        if policy.uses_queries and self.kv.seq_len > self.kv.query_position:
            raise RuntimeError(
                f"MixKVQCache: the policy {policy.name!r} needs the query states, but the last "
                f"{self.kv.seq_len - self.kv.query_position} tokens of this layer never reached the cache. "
                "Use the 'mixkvq' attention implementation: call mixkvq.integrations.transformers.enable(model) "
                "(or model.set_attn_implementation('mixkvq') after register()), or use a policy that does not "
                "need queries ('key_only', 'uniform')"
            )
        self.prefill = self.kv.seq_len == 0  # nothing stored yet: the forward sees only its own tokens
        past_k, past_v = self.past() if self.attention == "dequantized" else (None, None)
        with warnings.catch_warnings():
            # the queries of these tokens arrive moments later, in the attention function
            warnings.filterwarnings("ignore", message=r".*tokens wait in the residual", category=UserWarning)
            self.kv.append(key_states.detach(), value_states.detach())
        if self.sliding_window and self.attention == "packed":
            # the queries of these tokens (and every later one) see positions > own - window only
            self.kv.free_before(self.kv.seq_len - int(key_states.shape[2]) - self.sliding_window + 1)
        if past_k is None:
            return key_states, value_states
        return torch.cat([past_k, key_states], dim=-2), torch.cat([past_v, value_states], dim=-2)

    def observe(self, query_states: torch.Tensor) -> None:
        """Feed the queries of the tokens appended last (called by the attention function)."""
        if self.config.salience_policy.uses_queries:
            self.kv.observe_queries(query_states.detach())

    def get_mask_sizes(self, query_length: "int | torch.Tensor") -> tuple[int, int]:
        # early 5.x (5.0; 5.5 already passes the length) gives the ``cache_position`` tensor
        if isinstance(query_length, torch.Tensor):
            query_length = int(query_length.shape[0])
        return self.get_seq_length() + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.kv.seq_len

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the abstract name of get_max_length in early 5.x (5.0-5.10)
        return -1

    def packed_attention(self, query: torch.Tensor, scaling: float, mask: "torch.Tensor | None" = None,
                         window: "int | None" = None, softcap: "float | None" = None) -> torch.Tensor:
        """Causal attention of ``query (B, Hq, T, D)`` (the tokens appended last) over the packed
        cache — no dequantized history is formed; ``mask`` bool ``(B, T, kv_len)`` (True =
        attend) adds padding, ``window`` a sliding window, ``softcap`` score capping.
        Returns ``(B, T, Hq, D)`` in the query's dtype."""
        out = self.kv.attention(query.detach(), scale=scaling, causal=True, mask=mask, window=window, softcap=softcap)
        return out.to(query.dtype).transpose(1, 2).contiguous()

    def reset(self) -> None:
        self.kv = KVCache(self.config, backend=self.backend)
        self._drop_memo()
        self.is_initialized = False

    def offload(self) -> None:  # storage stays where it is (CPU for the NumPy backend)
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch for beam search — on the quantized storage, no re-quantization."""
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = torch.as_tensor(indices).reshape(-1).to("cpu", torch.long)
        if self.kv.seq_len == 0:
            return
        self.kv.select_batch(idx)
        if self._memo_k is not None:
            dev = self._memo_k.device
            self._memo_k = self._memo_k.index_select(0, idx.to(dev))
            self._memo_v = self._memo_v.index_select(0, idx.to(dev))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.kv.seq_len == 0 or self.kv.shape is None:
            return
        B = self.kv.shape[0]
        self.batch_select_indices(torch.arange(B).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest tokens (negative count, transformers' convention; a non-negative
        value is the length to keep). Refuses a cut inside a quantized block."""
        if tokens_to_remove == 0 or self.kv.seq_len == 0:
            return
        self.kv.crop(tokens_to_remove)
        self._drop_memo()

    # -- reading ------------------------------------------------------------------------------
    def _drop_memo(self) -> None:
        self._memo_k = self._memo_v = None
        self._memo_blocks = self._memo_vrows = 0

    def _torch(self, x: Any) -> torch.Tensor:
        """A backend array (dequantized float32 or residual) as a tensor in the model's dtype
        and device (exact conversion)."""
        t = x if isinstance(x, torch.Tensor) else get_backend("torch").from_any(x)
        return t.to(device=self.device, dtype=self.dtype)

    def past(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The stored history as ``(B, H, T, D)`` tensors in the model dtype: dequantized
        quantized tokens, then the full-precision residual."""
        if self.kv.seq_len == 0:
            return None, None
        kv, backend = self.kv, self.kv.backend
        layout = kv.layout
        blocks, vrows = kv.key_blocks, kv.value_rows
        if len(blocks) > self._memo_blocks:
            new = [layout.decode_keys(backend, b) for b in blocks[self._memo_blocks:]]
            parts = [self._torch(x) for x in new]
            self._memo_k = torch.cat(([self._memo_k] if self._memo_k is not None else []) + parts, dim=2)
            self._memo_blocks = len(blocks)
        if len(vrows) > self._memo_vrows:
            new = [layout.decode_values(backend, r) for r in vrows[self._memo_vrows:]]
            parts = [self._torch(x) for x in new]
            self._memo_v = torch.cat(([self._memo_v] if self._memo_v is not None else []) + parts, dim=2)
            self._memo_vrows = len(vrows)
        rk, rv = kv.residual
        rk = self._torch(rk) if rk is not None else None
        rv = self._torch(rv) if rv is not None else None
        ks = [t for t in (self._memo_k, rk) if t is not None and t.shape[2]]
        vs = [t for t in (self._memo_v, rv) if t is not None and t.shape[2]]
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)


class MixKVQCache(Cache):
    """A transformers :class:`~transformers.Cache` that stores K/V with MixKVQ.

    Args:
        config: the :class:`~mixkvq.MixKVQConfig` (default: the paper's), or a path to a
            config JSON (``mixkvq calibrate`` writes one). Its ``backend`` defaults to
            :func:`default_backend_name`.
        attention: ``"packed"`` (default): ``update`` returns only the new tokens and the
            ``"mixkvq"`` attention function computes attention from the packed cache
            (:meth:`mixkvq.KVCache.attention`: fused kernels on the ``cpu`` and ``cupy``
            backends), so no dequantized history ever exists. The prefill attends to its own
            exact tokens (SDPA); later forwards (decode, chunks, speculative tokens) read the
            packed history with the causal rule plus any padding mask (left-padded batches).
            ``"dequantized"``: an opt-in quality harness — ``update`` returns the history
            dequantized (memoised) and SDPA runs on it, so every transformers mask feature
            works, at the price of a dequantized copy in memory. With a policy that does not
            use queries, a token that completes a block is quantized before it is attended to.
        model_config: the model's config; when given, one layer per hidden layer is created
            up front (otherwise layers appear lazily on first use).
        layer_configs: optional per-layer overrides ``{layer_idx: MixKVQConfig}``; ``None`` for
            a layer keeps it in full precision (a transformers ``DynamicLayer``, counted at its
            real bytes), e.g. for layers a sensitivity probe finds too fragile to quantize.
        backend: the backend of every layer (name or object); default
            :func:`default_backend_name` of each layer's device.

    Query-aware policies need the ``"mixkvq"`` attention implementation (:func:`enable`).
    """

    def __init__(self, config: "MixKVQConfig | str | os.PathLike[str] | None" = None, *, model_config: Any = None,
                 layer_configs: "dict[int, MixKVQConfig | None] | None" = None, attention: str = "packed",
                 backend: "str | Backend | None" = None) -> None:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}; got {attention!r}")
        self.attention = attention
        if config is not None and not isinstance(config, MixKVQConfig):
            config = MixKVQConfig.load(config)
        self.mixkvq_config = config or MixKVQConfig()
        self.layer_configs = dict((int(i), c) for i, c in (layer_configs or {}).items())
        # an explicit backend must load now, not inside generate(); the default follows each
        # layer's device (native 'cpu' on CPU when it builds, else 'torch')
        self.backend = get_backend(backend) if backend is not None else None
        self._model_text_config = None
        if model_config is not None:
            text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
            self._model_text_config = text
            n = int(text.num_hidden_layers)
            super().__init__(layers=[self._make_layer(i) for i in range(n)])
        else:
            super().__init__(layer_class_to_replicate=self._next_layer)

    def _layer_config(self, i: int) -> MixKVQConfig | None:
        return self.layer_configs.get(i, self.mixkvq_config)

    def _make_layer(self, i: int) -> CacheLayerMixin:
        cfg = self._layer_config(i)
        if cfg is None:
            return DynamicLayer()
        return MixKVQLayer(cfg, attention=self.attention, backend=self.backend, sliding_window=self._window_of(i))

    def _window_of(self, i: int) -> "int | None":
        """The sliding window of layer ``i`` by the model's ``layer_types`` (None: full attention)."""
        text = self._model_text_config
        types = getattr(text, "layer_types", None) if text is not None else None
        if types and i < len(types) and types[i] == "sliding_attention":
            return getattr(text, "sliding_window", None)
        if types and i < len(types) and types[i] not in ("full_attention", "sliding_attention"):
            raise NotImplementedError(f"layer {i} is a {types[i]!r} layer, which MixKVQCache cannot serve; "
                                      "give it layer_configs={%d: None} to keep it in full precision" % i)
        if not types and text is not None and getattr(text, "sliding_window", None) and \
                getattr(text, "use_sliding_window", True) is not False:
            return int(text.sliding_window)  # Mistral-style: every layer slides
        return None

    def _next_layer(self) -> CacheLayerMixin:
        return self._make_layer(len(self.layers))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        _PENDING.set(_Pending(layer, layer_idx, int(key_states.shape[2])) if isinstance(layer, MixKVQLayer) else None)
        return k, v

    # -- accounting ----------------------------------------------------------------------------
    @property
    def kv_caches(self) -> list[KVCache]:
        """The core cache of every quantized layer (full-precision layers have none)."""
        return [layer.kv for layer in self.layers if isinstance(layer, MixKVQLayer)]

    def _full_layer_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if not isinstance(layer, MixKVQLayer)
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]

    @property
    def nbytes(self) -> int:
        """Stored bytes over all layers (quantized storage, residual, query statistics, and
        the tensors of full-precision layers)."""
        return sum(c.nbytes for c in self.kv_caches) + sum(t.numel() * t.element_size() for t in self._full_layer_tensors())

    @property
    def n_elements(self) -> int:
        return sum(c.n_elements for c in self.kv_caches) + sum(t.numel() for t in self._full_layer_tensors())

    @property
    def bits_per_element(self) -> float:
        """True stored bits per K/V element over all layers."""
        n = self.n_elements
        return 8.0 * self.nbytes / n if n else 0.0

    @property
    def block_bits(self) -> float:
        """True bits per element of the quantized storage alone (codes, metadata, tier maps,
        16-bit channels; no residual) — what a long context converges to and what ``rd_bits``
        budgets. Full-precision layers count at their real bytes. NaN before any block."""
        full = self._full_layer_tensors()
        bits = 8 * (sum(t.numel() * t.element_size() for t in full) + sum(c.quantized_nbytes for c in self.kv_caches))
        elements = sum(t.numel() for t in full) + sum(c.n_quantized_elements for c in self.kv_caches)
        return bits / elements if elements else float("nan")

    @property
    def nominal_bits(self) -> float:
        """Code bits per quantized element, averaged over layers weighted by their tokens."""
        num = den = 0.0
        for c in self.kv_caches:
            q = c.n_quantized
            num += c.nominal_bits * q
            den += q
        return num / den if den else 0.0


# -- attention function -------------------------------------------------------------------------
def mixkvq_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """The ``"mixkvq"`` attention: hand the queries to the layer's cache, then SDPA.

    ``key``/``value`` are what :meth:`MixKVQLayer.update` returned (stored history + the new
    tokens). With any other cache (or none) this is plain SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    pending = _PENDING.get()
    if pending is not None:
        _PENDING.set(None)
        layer_idx = getattr(module, "layer_idx", pending.layer_idx)
        if layer_idx == pending.layer_idx and int(query.shape[2]) == pending.n_tokens:
            layer = pending.layer
            if layer.attention == "packed" and not layer.prefill:
                # attend first, then observe: a block completed by these tokens waits for their
                # queries, so they are still exact in the residual (as with "dequantized")
                window, softcap = _window_and_softcap(module, kwargs)
                mask = _padding_mask(attention_mask, query.shape[2], layer.kv.n_held, window)
                scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or query.shape[-1] ** -0.5
                out = layer.packed_attention(query, float(scaling), mask, window, softcap)
                layer.observe(query)
                return out, None
            layer.observe(query)
    # (a packed-mode prefill attends only to its own exact tokens: plain SDPA on them)
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"{type(module).__name__} asks for soft-capping or sinks, which SDPA lacks, and its "
                                      "module has no eager_attention_forward to fall back on")
        if attention_mask is not None and attention_mask.dtype == torch.bool:  # our masks are SDPA-style booleans;
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
                ~attention_mask, torch.finfo(query.dtype).min)  # eager paths add a float mask
        return eager(module, query, key, value, attention_mask, **kwargs)  # the model's own reference path
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _window_and_softcap(module: Any, kwargs: dict) -> "tuple[int | None, float | None]":
    """The sliding window and logit soft-capping the model's attention layer asks for (what
    transformers passes its attention functions); refuses what the packed path cannot do
    (attention sinks) instead of ignoring it."""
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError(
            "MixKVQCache(attention='packed') does not implement attention sinks ('s_aux') yet; "
            "use MixKVQCache(attention='dequantized') for this model")
    window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
    return (int(window) if window else None), (float(softcap) if softcap else None)


def _padding_mask(mask: "torch.Tensor | None", q_len: int, kv_len: int, window: "int | None" = None) -> "torch.Tensor | None":
    """The transformers attention mask as what the packed cache takes: None when it is just
    the causal (and sliding-window) rule, which the cache applies itself, else bool
    ``(B, q_len, kv_len)`` (True = attend). Per-head masks are refused."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask == 0  # additive float masks: 0 = attend
    if m.dim() == 4:
        if m.shape[1] != 1:
            raise NotImplementedError("MixKVQCache(attention='packed') takes masks shared by all heads")
        m = m[:, 0]
    m = m[..., -q_len:, -kv_len:] if m.shape[-1] >= kv_len else m
    if tuple(m.shape[-2:]) != (q_len, kv_len):
        raise ValueError(f"attention mask has shape {tuple(mask.shape)}; expected (..., {q_len}, {kv_len})")
    kv = torch.arange(kv_len, device=m.device)[None, :]
    pos = torch.arange(kv_len - q_len, kv_len, device=m.device)[:, None]
    rule = kv <= pos
    if window:
        rule = rule & (kv > pos - window)
    if bool((m == rule).all()):
        return None
    return m.expand(m.shape[0] if m.dim() == 3 else 1, q_len, kv_len).contiguous()


def cache_argument(model: Any) -> str:
    """The keyword the installed transformers takes a cache by: ``"cache"`` where the model's
    ``forward`` has it (newer 5.x, where ``past_key_values`` is deprecated), else
    ``"past_key_values"``. ``model.generate(**{cache_argument(model): cache}, ...)`` works on
    every version the project supports."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def register() -> None:
    """Register the ``"mixkvq"`` attention function (and its SDPA-style mask) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, mixkvq_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)


def enable(model: Any) -> Any:
    """Register the attention function and switch ``model`` to it; returns the model."""
    register()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


__all__ = ["MixKVQCache", "MixKVQLayer", "mixkvq_attention_forward", "register", "enable", "cache_argument",
           "default_backend_name", "ATTN_IMPLEMENTATION"]
