"""The rotated per-token KV baseline of ``mixkvq eval`` (rows ``rot_tok*``): this project's
implementation of the published rotated KV-cache recipe (llama.cpp's rotated quantized cache
types, vLLM's per-token-head int4/int8), at the same true bytes as every other row.

Keys (after RoPE) and values are rotated over their channels by the normalised
Walsh–Hadamard transform with seeded ±1 signs (docs/numerics.md §11), then quantized **per
token**, in groups of ``G`` channels (one scale and zero per group: the per-token-head
scheme of llama.cpp's q4_0-style cache types, here with this project's asymmetric min/max
quantizer, §3, and float16 metadata). Per-token keys are not a format of the core cache,
which is why this baseline lives here; rotation + KIVI's per-channel keys *is* one (a
uniform config with ``key_rotation="tiers"``, §11.6), and its rows (``rot_kivi*``) are
ordinary MixKVQCache rows.

It keeps a full-precision residual of the most recent ``T mod R`` tokens (unrotated, in the
model's dtype) like the KIVI and MixKVQ rows (block-window values), and quantizes a block of
``R`` tokens when it completes. ``update`` returns the layer's history **as stored before
the call** — quantized blocks dequantized and rotated back (the inverse of §11.1), then the
residual — followed by the call's own tokens exact, which is the equivalent form of rotated
attention that §11.3 states (``q·Rᵀk̂ = (Rq)·k̂``, ``Σ p Rᵀv̂ = Rᵀ Σ p v̂``), so plain SDPA on
it is attention in the rotated basis with the output rotated back. The view changes only
when a block completes, so the chunked scoring protocol (``exact_chunk_period = R``) holds.

Why here and not in :mod:`mixkvq.integrations`: this cache exists to be compared against —
an evaluation baseline with a deliberately small surface (no beam search, no crop, no
packed attention kernels), not a deployment integration.

The ``rot_lm`` rows (``codebook="lloyd_max"``) replace the min/max groups by a
TurboQuant-MSE-style code: per token its float16 norm and the Lloyd–Max levels of the normal
distribution (:data:`LLOYD_MAX_LEVELS`, docs/rotation.md).

Accounting (:attr:`RotatedCache.nbytes`) counts every array held: packed codes, scales and
zeros (or norms) of keys and values, and the residual in the model dtype. The sign vector and the
transform are a function of the seed (like llama.cpp's fixed Hadamard matrix) and hold no
per-token state; they are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from mixkvq.backend import Backend, get_backend
from mixkvq.integrations.transformers import default_backend_name
from mixkvq.rotation import Rotation
from mixkvq.validation import check_bits, check_positive_int


def _nbytes(*arrays: Any) -> int:
    return sum(int(a.numel() * a.element_size()) if isinstance(a, torch.Tensor) else int(a.nbytes)
               for a in arrays if a is not None)


class _TokenBlocks:
    """Per-token quantized keys and values of the rotated basis (groups of G channels)."""

    def __init__(self, backend: Backend, key_bits: int, value_bits: int, group_size: int, meta_dtype: str) -> None:
        self.backend, self.bits, self.G, self.meta = backend, (key_bits, value_bits), group_size, meta_dtype
        self.stored: list[tuple[Any, Any, Any]] = []  # (packed, scale, zero), keys and values alternately

    def add(self, k: Any, v: Any, first: int = 0) -> tuple[Any, Any]:
        """Store a rotated float32 block ``(B, H, R, D)``; return it dequantized (float32).
        ``first`` (the block's stream position) is unused here: §3's errors index the block."""
        be, D = self.backend, int(k.shape[-1])
        out = []
        for x, bits, name in ((k, self.bits[0], "rotated keys"), (v, self.bits[1], "rotated values")):
            packed, scale, zero = be.quantize(x, bits, self.G, self.meta, name)
            self.stored.append((packed, scale, zero))
            out.append(be.dequantize(packed, scale, zero, bits, self.G, D, "float32"))
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(*parts) for parts in self.stored)


#: Lloyd–Max levels of the standard normal distribution (the MSE-optimal scalar quantizer,
#: Max 1960), the non-negative half, as float32; level ``-l`` mirrors each. Computed by Lloyd's
#: iteration in 40-digit arithmetic, then rounded to float32 (docs/rotation.md).
LLOYD_MAX_LEVELS: dict[int, tuple[float, ...]] = {
    1: (0.7978846,),
    2: (0.45278004, 1.5104176),
    3: (0.24509418, 0.7560053, 1.3439093, 2.1519456),
    4: (0.12839504, 0.3880483, 0.65675914, 0.94234043, 1.2562312, 1.6180464, 2.0690172, 2.7325895),
}


def lloyd_max_codebook(bits: int, name: str = "bits") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``2^bits`` ascending float32 levels and the ``2^bits - 1`` float32 decision
    thresholds between them (each the float32 midpoint ``fl32((l_i + l_{i+1}) / 2)``).
    ``name``: the argument an unsupported width is reported as."""
    if bits not in LLOYD_MAX_LEVELS:
        raise ValueError(f"the Lloyd–Max codebooks have 1..{max(LLOYD_MAX_LEVELS)} bits; got {name}={bits}")
    half = torch.tensor(LLOYD_MAX_LEVELS[bits], dtype=torch.float32)
    levels = torch.cat([-half.flip(0), half])
    return levels, (levels[:-1] + levels[1:]) * 0.5


class _CodebookBlocks:
    """Per-token keys and values of the rotated basis as TurboQuant-MSE-style codes: each
    token's ``D`` rotated channels scaled by ``sqrt(D) / ||x||`` (its coordinates then about
    standard normal) and mapped to the nearest Lloyd–Max level; stored as packed codes plus
    the norm in float16 (16 bits per token and head)."""

    def __init__(self, backend: Backend, key_bits: int, value_bits: int) -> None:
        self.backend, self.bits = backend, (key_bits, value_bits)
        self.books = {b: lloyd_max_codebook(b) for b in set(self.bits)}
        self.stored: list[tuple[Any, Any]] = []  # (packed codes, float16 norms), keys and values alternately

    def add(self, k: Any, v: Any, first: int = 0) -> tuple[Any, Any]:
        """Store a rotated float32 block ``(B, H, R, D)`` of the tokens from position
        ``first``; return it dequantized (float32)."""
        be, tb = self.backend, get_backend("torch")
        out = []
        for x, bits, name in ((k, self.bits[0], "rotated keys"), (v, self.bits[1], "rotated values")):
            x = tb.from_any(x).to(torch.float32)
            D = int(x.shape[-1])
            norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True).to(torch.float16)
            if not bool(torch.isfinite(norm).all()):  # the rotation refused non-finite inputs
                b, h, t = (int(i) for i in torch.nonzero(~torch.isfinite(norm))[0][:-1])
                raise ValueError(f"{name}: the norm of batch {b}, head {h}, token {first + t} overflows float16 "
                                 "(> 65504); the Lloyd–Max rows store each token's norm in float16")
            sigma = norm.to(torch.float32) / torch.tensor(D, dtype=torch.float32).sqrt()
            y = torch.where(sigma > 0, x / torch.where(sigma > 0, sigma, 1.0), 0.0)
            levels, thresholds = (t.to(x.device) for t in self.books[bits])
            codes = torch.bucketize(y, thresholds, right=True).to(torch.uint8)  # a tie goes to the upper level
            self.stored.append((tb.pack(codes, bits), norm))
            out.append(be.from_any(levels[codes.long()] * sigma))
        return out[0], out[1]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(*parts) for parts in self.stored)


class RotatedLayer(CacheLayerMixin):
    """One attention layer of a :class:`RotatedCache` (transformers layer API)."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, *, key_bits: int = 4, value_bits: int = 4, group_size: int = 32,
                 residual_length: int = 128, meta_dtype: str = "float16", seed: "int | None" = 0,
                 block_size: "int | None" = None, codebook: str = "minmax",
                 backend: "str | Backend | None" = None) -> None:
        super().__init__()
        self.key_bits, self.value_bits = check_bits(key_bits, "key_bits"), check_bits(value_bits, "value_bits")
        if codebook not in ("minmax", "lloyd_max"):
            raise ValueError(f"codebook must be 'minmax' or 'lloyd_max'; got {codebook!r}")
        if codebook == "lloyd_max":  # refused now, not at the first flush
            lloyd_max_codebook(self.key_bits, "key_bits")
            lloyd_max_codebook(self.value_bits, "value_bits")
        self.codebook = codebook
        self.group_size = check_positive_int(group_size, "group_size")
        self.residual_length = check_positive_int(residual_length, "residual_length")
        self.meta_dtype, self.seed, self.block_size = meta_dtype, seed, block_size
        self._backend_arg = backend
        self._clear()

    def _clear(self) -> None:
        self.store: "_TokenBlocks | _CodebookBlocks | None" = None
        self.rotation: "Rotation | None" = None
        self.backend: "Backend | None" = None
        self._memo_k: "torch.Tensor | None" = None  # dequantized blocks rotated back, model dtype
        self._memo_v: "torch.Tensor | None" = None
        self._res_k: "torch.Tensor | None" = None  # the residual: unrotated, model dtype
        self._res_v: "torch.Tensor | None" = None
        self.n_quantized = 0
        self.dtype: "torch.dtype | None" = None
        self.device: "torch.device | None" = None
        self.is_initialized = False

    # -- CacheLayerMixin ----------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: Any = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.backend = get_backend(self._backend_arg or default_backend_name(key_states.device))
        self.rotation = Rotation(int(key_states.shape[-1]), seed=self.seed, block_size=self.block_size)
        self.store = (_CodebookBlocks(self.backend, self.key_bits, self.value_bits) if self.codebook == "lloyd_max"
                      else _TokenBlocks(self.backend, self.key_bits, self.value_bits, self.group_size, self.meta_dtype))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, T, D)`` post-RoPE keys and values; return (history as stored
        before this call + the new tokens exact)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past_k = [t for t in (self._memo_k, self._res_k) if t is not None and t.shape[2]]
        past_v = [t for t in (self._memo_v, self._res_v) if t is not None and t.shape[2]]
        k_new, v_new = key_states.detach(), value_states.detach()
        self._res_k = k_new.clone() if self._res_k is None else torch.cat([self._res_k, k_new], dim=2)
        self._res_v = v_new.clone() if self._res_v is None else torch.cat([self._res_v, v_new], dim=2)
        R = self.residual_length
        n_full = (int(self._res_k.shape[2]) // R) * R
        if n_full:
            self._flush(self._res_k[:, :, :n_full], self._res_v[:, :, :n_full])
            self._res_k = self._res_k[:, :, n_full:].clone()  # its own storage: no view keeps flushed tokens
            self._res_v = self._res_v[:, :, n_full:].clone()
        return torch.cat(past_k + [key_states], dim=2), torch.cat(past_v + [value_states], dim=2)

    def _flush(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Rotate, quantize and store whole blocks; memoise them dequantized and rotated back."""
        rot, be = self.rotation, self.backend
        kr = rot.apply(be.from_any(k.contiguous()), backend=be, name="keys")
        vr = rot.apply(be.from_any(v.contiguous()), backend=be, name="values")
        kh, vh = self.store.add(kr, vr, self.n_quantized)
        back = [rot.apply(x, inverse=True, backend=be, name=n) for x, n in ((kh, "dequantized keys"), (vh, "dequantized values"))]
        tk, tv = (get_backend("torch").from_any(x).to(device=self.device, dtype=self.dtype) for x in back)
        self._memo_k = tk if self._memo_k is None else torch.cat([self._memo_k, tk], dim=2)
        self._memo_v = tv if self._memo_v is None else torch.cat([self._memo_v, tv], dim=2)
        self.n_quantized += int(k.shape[2])

    def get_mask_sizes(self, query_length: "int | torch.Tensor") -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # early 5.x passes the cache_position tensor
            query_length = int(query_length.shape[0])
        return self.get_seq_length() + int(query_length), 0

    def get_seq_length(self) -> int:
        return self.n_quantized + (int(self._res_k.shape[2]) if self._res_k is not None else 0)

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # early 5.x's name of get_max_length
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        return None

    def prefetch(self) -> None:
        return None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("the rotated baselines do not implement beam search")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("the rotated baselines do not implement batch selection")

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("the rotated baselines do not implement crop")

    # -- accounting ----------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Every byte held: the quantized blocks' codes, scales and zeros (or norms), and the residual."""
        return (self.store.nbytes if self.store is not None else 0) + _nbytes(self._res_k, self._res_v)

    @property
    def quantized_nbytes(self) -> int:
        return self.store.nbytes if self.store is not None else 0

    @property
    def n_elements(self) -> int:
        if self._res_k is None:
            return 0
        B, H, _, D = (int(s) for s in self._res_k.shape)
        return 2 * B * H * self.get_seq_length() * D

    @property
    def n_quantized_elements(self) -> int:
        if self._res_k is None:
            return 0
        B, H, _, D = (int(s) for s in self._res_k.shape)
        return 2 * B * H * self.n_quantized * D


class RotatedCache(Cache):
    """A transformers cache of :class:`RotatedLayer` s (see the module docstring).

    Args:
        key_bits, value_bits: code widths (1..8).
        group_size: ``G``: channels per group (per-token rows) or tokens per group (KIVI keys).
        residual_length: ``R``: tokens per quantized block; the newest ``T mod R`` stay exact.
        meta_dtype: scales' and zeros' dtype (§2), ``"float16"`` as every other row.
        seed: the §11.2 sign seed (None: the plain Hadamard transform).
        block_size: the §11.1 block size (default: blocks by the binary expansion of D).
        codebook: ``"minmax"`` (groups of G channels, §3 min/max codes with a scale and zero)
            or ``"lloyd_max"`` (TurboQuant-MSE style: per token the norm in float16 and the
            Lloyd–Max levels of the normal distribution, 1..4 bits; G and meta_dtype unused).
        model_config: the model's config (one layer per hidden layer, created up front).
        backend: the backend of every layer; default that of the integration for the device.
    """

    def __init__(self, *, key_bits: int = 4, value_bits: int = 4, group_size: int = 32,
                 residual_length: int = 128, meta_dtype: str = "float16", seed: "int | None" = 0,
                 block_size: "int | None" = None, codebook: str = "minmax", model_config: Any = None,
                 backend: "str | Backend | None" = None) -> None:
        self.options = dict(key_bits=key_bits, value_bits=value_bits, group_size=group_size,
                            residual_length=residual_length, meta_dtype=meta_dtype, seed=seed, block_size=block_size,
                            codebook=codebook, backend=backend)
        RotatedLayer(**self.options)  # validate now, not inside generate()
        if model_config is not None:
            text = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
            super().__init__(layers=[RotatedLayer(**self.options) for _ in range(int(text.num_hidden_layers))])
        else:
            super().__init__(layer_class_to_replicate=lambda: RotatedLayer(**self.options))

    @property
    def nbytes(self) -> int:
        """Stored bytes over all layers (codes, scales and zeros or norms, residual)."""
        return sum(layer.nbytes for layer in self.layers)

    def stats(self) -> dict[str, float]:
        """What :func:`mixkvq.apps.eval.methods.cache_stats` reports, counted as for every
        other row: true bits per K/V element (everything held), block bits (the quantized
        blocks alone; NaN before any) and nominal code bits (mean of the K and V widths)."""
        n = sum(layer.n_elements for layer in self.layers)
        nq = sum(layer.n_quantized_elements for layer in self.layers)
        quantized = sum(layer.quantized_nbytes for layer in self.layers)
        nominal = (self.options["key_bits"] + self.options["value_bits"]) / 2.0 if nq else 0.0
        return {"nbytes": self.nbytes, "bits_per_element": 8.0 * self.nbytes / n if n else 0.0,
                "nominal_bits": nominal, "block_bits": 8.0 * quantized / nq if nq else float("nan")}


__all__ = ["LLOYD_MAX_LEVELS", "RotatedCache", "RotatedLayer", "lloyd_max_codebook"]
