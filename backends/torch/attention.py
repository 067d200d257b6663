"""Decode/prefill attention over a quantized cache, straight from the codes.

Nothing here is stored, so nothing here has to be bit-exact; the result has to stay within
the float32 tolerance of docs/conformance.md. The keys are never dequantized: a key channel
``d`` of a block dequantizes to ``k[t] = s[g(t)] * c[t] + z[g(t)]`` (§4), so

    q . k[t] = sum_d (q_d s_{d,g}) c_{d,t} + sum_d q_d z_{d,g}

is one small matmul per (block, head, token group) from the codes plus a matmul of the
zeros; likewise, with per-token value scales, ``sum_t p_t v_t = (p * s) @ c + p @ z``.

Everything is vectorised over all blocks of an attention chunk at once: the rows of width
``w`` of every block, concatenated in block order, are exactly the ``tier_map == w``
entries of the stacked tier maps ``(n_blocks, B, H, D)`` in lexicographic order, so one
``nonzero`` gives every row's channel. With fixed counts (budget mode) the rows of each
(block, b, h) are a dense ``(n_w, R)`` slab; with varying counts (threshold / rd modes) the
rows are scattered into slabs padded to the largest count with zero scales and zeros.

Precision: codes, `q_d s_d` and the partial sums are float32, like the float32 dot product
the tolerance assumes; the terms are `q_d s c` and `q_d z` instead of `q_d k`, so a
channel whose group spans zero sums larger magnitudes than its dequantized key (at most the
group's largest |k| each). tests/test_torch_attention.py stresses that (outliers spread over
tokens, offset channels) in every tier mode.
"""

from __future__ import annotations

import bisect
import math
from typing import Any

import torch

from mixkvq.format import HIGH_BITS, n_groups

from . import ops

def _codes_grouped(packed: torch.Tensor, bits: int, n: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows -> float codes arranged by group and bit plane, for a batched matmul.

    ``packed`` uint8 ``(*lead, rows, ceil(n*bits/8))``. Returns ``(*lead, ng, P, rows, gb)``
    with ``[..., g, i, r, k]`` the code of row ``r`` at position ``g*group + P*k + i``
    (zero past ``n``). For widths 1, 2, 4 with byte-aligned groups ``P = 8 // bits`` (each
    plane is one shift-and-mask of the bytes, converted once: no per-code gather);
    otherwise ``P = 1``, ``gb = group`` (generic unpack).
    """
    *lead, rows, nbytes = packed.shape
    ng = n_groups(n, group)
    if bits in (1, 2, 4, 8) and (group * bits) % 8 == 0 and n == ng * group:
        gb = group * bits // 8
        src = packed.reshape(*lead, rows, ng, gb).transpose(-2, -3).contiguous()  # (*lead, ng, rows, gb) bytes
        per = 8 // bits
        out = torch.empty((*lead, ng, per, rows, gb), dtype=dtype, device=packed.device)
        if per == 1:
            out.select(-3, 0).copy_(src)
            return out
        mask = (1 << bits) - 1
        for i in range(per):
            plane = src if i == 0 else src >> (bits * i)
            out.select(-3, i).copy_(plane & mask if i < per - 1 else plane)
        return out
    codes = ops.unpack(packed, bits, n)  # (*lead, rows, n)
    if ng * group != n:
        codes = torch.nn.functional.pad(codes, (0, ng * group - n))
    out = torch.empty((*lead, ng, 1, rows, group), dtype=dtype, device=packed.device)
    out.select(-3, 0).copy_(codes.reshape(*lead, rows, ng, group).transpose(-2, -3))
    return out


def _grouped_matmul(a: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``a (..., ng, M, rows)`` @ codes ``(..., ng, P, rows, gb)`` -> ``(..., ng, M, P*gb)`` in position order."""
    part = torch.matmul(a.unsqueeze(-3), codes)  # (..., ng, P, M, gb)
    P, gb = int(codes.shape[-3]), int(codes.shape[-1])
    if P == 1:
        return part.squeeze(-3)
    k = part.dim()
    out = part.permute(*range(k - 4), k - 4, k - 2, k - 1, k - 3)  # (..., ng, M, gb, P)
    return out.reshape(*part.shape[:-3], part.shape[-2], P * gb)


def _algebra_safe(s32: torch.Tensor, zero: torch.Tensor, bits: int) -> bool:
    """``s*c`` and ``z`` kept apart stay far from float32 overflow (else: dequantize first,
    as the spec does, so a huge range that cancels to a moderate key cannot overflow)."""
    if s32.numel() == 0:
        return True
    big = float(s32.abs().amax()) * (2**bits - 1) + float(ops.to_float32(zero).abs().amax())
    return big < 1e30


def _width_rows(blocks: list[Any], bits: int, tier_maps: torch.Tensor, R: int) -> "tuple | None":
    """The rows of width ``bits`` of ``blocks`` as slabs ``(nb, B, H, n, ...)``.

    Returns ``(packed, scale, zero, channel)``, scale/zero None for 16-bit rows; padded rows
    (varying counts) have zero scale and zero and point at channel 0. None if no rows.
    """
    tiers = [b.tiers[bits] for b in blocks if bits in b.tiers]
    if not tiers:
        return None
    cat = (lambda xs: xs[0] if len(xs) == 1 else torch.cat(xs))
    packed = cat([t.packed for t in tiers])
    if packed.shape[0] == 0:
        return None
    quant = bits != HIGH_BITS
    scale = cat([t.scale for t in tiers]) if quant else None
    zero = cat([t.zero for t in tiers]) if quant else None
    nb, B, H, D = tier_maps.shape
    mask = tier_maps == bits
    nz = torch.nonzero(mask)  # (N, 4) in row order
    N = int(nz.shape[0])
    counts = mask.sum(-1).reshape(-1)  # (nb*B*H,)
    n_max = int(counts.max())
    channel = nz[:, 3]
    if N == n_max * nb * B * H:  # fixed counts: dense slabs already
        shape = (nb, B, H, n_max)
        return (packed.reshape(*shape, -1), None if scale is None else scale.reshape(*shape, -1),
                None if zero is None else zero.reshape(*shape, -1), channel.reshape(shape))
    seg = (nz[:, 0] * B + nz[:, 1]) * H + nz[:, 2]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(N, device=nz.device) - starts[seg]
    S = nb * B * H

    def scatter(x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros((S, n_max) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        out[seg, rank] = x
        return out.reshape((nb, B, H, n_max) + tuple(x.shape[1:]))

    return (scatter(packed), None if scale is None else scatter(scale), None if zero is None else scatter(zero),
            scatter(channel))


def block_scores(qg: torch.Tensor, blocks: list[Any], config: Any) -> torch.Tensor:
    """``q . k`` for every token of ``blocks`` (all ``R`` tokens): float32 ``(B, H, M, nb*R)``.

    ``qg`` float32 ``(B, H, M, D)`` (query rows grouped by KV head).
    """
    B, H, M, D = qg.shape
    R = blocks[0].n_tokens
    G = config.group_size
    nb = len(blocks)
    tier_maps = torch.stack([b.tier_map for b in blocks])  # (nb, B, H, D)
    ngk = n_groups(R, G)
    acc = torch.zeros((nb, B, H, ngk, M, G), dtype=torch.float32, device=qg.device)
    widths = sorted({w for b in blocks for w in b.tiers})
    qexp = qg.unsqueeze(0).expand(nb, B, H, M, D)
    for bits in widths:
        rows = _width_rows(blocks, bits, tier_maps, R)
        if rows is None:
            continue
        packed, scale, zero, channel = rows
        n = int(channel.shape[-1])
        qw = torch.gather(qexp, -1, channel.unsqueeze(-2).expand(nb, B, H, M, n))  # (nb, B, H, M, n)
        if bits == HIGH_BITS:
            vals = ops.decode_half(packed, config.high_dtype)  # (nb, B, H, n, R)
            if ngk * G != R:
                vals = torch.nn.functional.pad(vals, (0, ngk * G - R))
            part = torch.matmul(qw, vals)  # (nb, B, H, M, ngk*G)
            acc += part.reshape(nb, B, H, M, ngk, G).transpose(3, 4)
            continue
        s = ops.to_float32(scale)  # (nb, B, H, n, ngk)
        if not _algebra_safe(s, zero, bits):  # s*c and z could overflow separately: dequantize
            vals = ops.dequantize(packed, scale, zero, bits, G, R)  # (nb, B, H, n, R)
            if ngk * G != R:
                vals = torch.nn.functional.pad(vals, (0, ngk * G - R))
            acc += torch.matmul(qw, vals).reshape(nb, B, H, M, ngk, G).transpose(3, 4)
            continue
        codes = _codes_grouped(packed, bits, R, G, torch.float32)  # (nb, B, H, ngk, P, n, gb)
        a = qw.unsqueeze(3) * s.transpose(-1, -2).unsqueeze(-2)  # (nb, B, H, ngk, M, n)
        acc += _grouped_matmul(a, codes)
        acc += torch.matmul(qw, ops.to_float32(zero)).transpose(-1, -2).unsqueeze(-1)  # (nb, B, H, ngk, M, 1)
    out = acc.permute(1, 2, 4, 0, 3, 5).reshape(B, H, M, nb, ngk * G)[..., :R]
    return out.reshape(B, H, M, nb * R)


class ValueReader:
    """``sum_t p_t v_t`` over any token range, from the per-token chunks and the residual."""

    def __init__(self, storage: Any, layout: Any) -> None:
        self.storage, self.layout = storage, layout
        self.rows = list(storage.value_rows)
        self.starts: list[int] = []
        pos = 0
        for rows in self.rows:
            self.starts.append(pos)
            pos += rows.n_tokens
        self.residual_start = pos

    def weighted_sum(self, p: torch.Tensor, a: int) -> torch.Tensor:
        """``p`` float32 ``(B, H, M, n)`` for tokens ``[a, a+n)`` -> float32 ``(B, H, M, D)``."""
        B, H, M, n = p.shape
        D = self.layout.head_dim
        b = a + n
        out = torch.zeros((B, H, M, D), dtype=torch.float32, device=p.device)
        i = max(0, bisect.bisect_right(self.starts, a) - 1)
        run: list[tuple[Any, int, int]] = []  # consecutive pieces of one width
        run_bits = None
        run_start = a

        def flush() -> None:
            if run:
                self._quantized(out, p, run, run_start - a, int(run_bits))

        while i < len(self.rows) and self.starts[i] < b:
            rows, start = self.rows[i], self.starts[i]
            lo, hi = max(a, start), min(b, start + rows.n_tokens)
            if lo < hi:
                bits = rows.bits
                if bits != run_bits:
                    flush()
                    run, run_bits, run_start = [], bits, lo
                run.append((rows, lo - start, hi - start))
            i += 1
        flush()
        res = self.storage.residual_values
        if res is not None and b > self.residual_start:
            lo = max(a, self.residual_start)
            v = ops.to_float32(res[:, :, lo - self.residual_start: b - self.residual_start])
            out += torch.matmul(p[..., lo - a:], v)
        return out

    def _quantized(self, out: torch.Tensor, p: torch.Tensor, run: list, offset: int, bits: int) -> None:
        D, G = self.layout.head_dim, self.layout.config.group_size

        def cat(xs: list) -> torch.Tensor:
            return xs[0] if len(xs) == 1 else torch.cat(xs, dim=2)

        whole = [lo == 0 and hi == r.n_tokens for r, lo, hi in run]
        packed = cat([r.packed if w else r.packed[:, :, lo:hi] for (r, lo, hi), w in zip(run, whole)])
        scale = cat([r.scale if w else r.scale[:, :, lo:hi] for (r, lo, hi), w in zip(run, whole)])
        zero = cat([r.zero if w else r.zero[:, :, lo:hi] for (r, lo, hi), w in zip(run, whole)])
        n = int(packed.shape[2])
        pp = p[..., offset: offset + n]  # (B, H, M, n)
        B, H, M, _ = pp.shape
        ng = int(scale.shape[-1])
        if not _algebra_safe(ops.to_float32(scale), zero, bits):
            out += torch.matmul(pp, ops.dequantize(packed, scale, zero, bits, G, D))
            return
        codes = _codes_grouped(packed, bits, D, G, torch.float32)  # (B, H, ng, P, n, gb): rows = tokens
        s = ops.to_float32(scale).transpose(-1, -2)  # (B, H, ng, n)
        w = pp.unsqueeze(2) * s.unsqueeze(-2)  # (B, H, ng, M, n)
        part = _grouped_matmul(w, codes)  # (B, H, ng, M, G)
        part = part.permute(0, 1, 3, 2, 4).reshape(B, H, M, ng * G)[..., :D]
        zs = torch.matmul(pp, ops.to_float32(zero))  # (B, H, M, ng)
        zs = zs.unsqueeze(-1).expand(B, H, M, ng, G).reshape(B, H, M, ng * G)[..., :D]
        out += part
        out += zs


def attention(chunk_tokens: int, q: torch.Tensor, storage: Any, layout: Any, *, scale: float, causal: bool,
              mask: "torch.Tensor | None" = None, window: "int | None" = None,
              softcap: "float | None" = None) -> torch.Tensor:
    cfg = layout.config
    q32 = ops.to_float32(q)
    B, Hq, Tq, D = q32.shape
    blocks = storage.key_blocks
    res_k = storage.residual_keys
    n_res = int(res_k.shape[2]) if res_k is not None else 0
    H = int(blocks[0].tier_map.shape[1]) if blocks else int(res_k.shape[1])
    n_rep = Hq // H
    T = sum(b.n_tokens for b in blocks) + n_res
    M = n_rep * Tq
    qg = q32.reshape(B, H, M, D)  # row r*Tq + i: query head h*n_rep + r, query i
    device = q32.device
    row_pos = (T - Tq) + torch.arange(M, device=device) % Tq
    masked = causal and Tq > 1
    # mask (B, Tq, T) -> per row r*Tq + i of the grouped queries: (B, 1, M, T)
    row_mask = None if mask is None else mask.to(torch.bool)[:, torch.arange(M, device=device) % Tq][:, None]
    m = torch.full((B, H, M, 1), -math.inf, dtype=torch.float32, device=device)
    l = torch.zeros((B, H, M, 1), dtype=torch.float32, device=device)
    acc = torch.zeros((B, H, M, D), dtype=torch.float64, device=device)  # normalised output so far
    values = ValueReader(storage, layout)

    def step(start: int, s: torch.Tensor) -> None:  # s: float32 scores (B, H, M, n)
        nonlocal m, l, acc
        n = int(s.shape[-1])
        s.mul_(scale)
        if softcap:
            s = torch.tanh(s / softcap).mul_(softcap)
        if window:
            tok = torch.arange(start, start + n, device=device)
            s.masked_fill_(tok[None, :] <= row_pos[:, None] - window, -math.inf)
        if masked:
            tok = torch.arange(start, start + n, device=device)
            s.masked_fill_(tok[None, :] > row_pos[:, None], -math.inf)
        if row_mask is not None:
            s.masked_fill_(~row_mask[..., start: start + n], -math.inf)
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # a row that has seen only masked tokens keeps m = -inf: exp(-inf - -inf) would be NaN
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        corr = torch.exp(m - m_safe)
        p = torch.exp(s.sub_(m_safe))
        lc = p.sum(dim=-1, keepdim=True)
        # p @ V of a chunk normalised by its own sum (<= max|v|: cannot overflow where the
        # unnormalised sum of up to n values near float32's limit would); the running
        # output is combined in float64, where l * max|v| cannot overflow either
        pv = values.weighted_sum(p.div_(torch.where(lc == 0, torch.ones_like(lc), lc)), start)
        l_old = (l * corr).to(torch.float64)
        l = l * corr + lc
        l64 = l.to(torch.float64)
        acc = (acc * l_old + pv.to(torch.float64) * lc.to(torch.float64)) / torch.where(l64 == 0, torch.ones_like(l64), l64)
        m = m_new

    R = cfg.residual_length
    # the float codes of one chunk stay around L2 size (2^21 elements): larger chunks spill to
    # memory, smaller ones pay the per-chunk op overhead more often
    chunk_tokens = min(chunk_tokens, max(R, (1 << 21) // max(1, B * H * D)))
    per_chunk = max(1, chunk_tokens // max(1, R))
    pos = 0
    j = 0
    while j < len(blocks):
        group = blocks[j: j + per_chunk]
        n0 = group[0].n_tokens
        k = 1
        while k < len(group) and group[k].n_tokens == n0:
            k += 1
        group = group[:k]
        step(pos, block_scores(qg, group, cfg))
        pos += n0 * k
        j += k
    chunk = max(1, chunk_tokens)
    for a in range(0, n_res, chunk):
        keys_t = ops.to_float32(res_k[:, :, a: a + chunk]).transpose(-1, -2)
        step(pos, torch.matmul(qg, keys_t))
        pos += int(keys_t.shape[-1])
    return acc.to(torch.float32).reshape(B, Hq, Tq, D)
