"""The numerics of docs/numerics.md on torch tensors (any device), bit-exact with mixkvq.sim.

Every float operation is one float32 rounding as the spec writes it: ``torch.sub``,
``torch.div`` (a true division by a *tensor* — never by a Python scalar, which CUDA turns
into a multiplication by the reciprocal), ``torch.round`` (half to even), ``torch.clamp``,
and for dequantization a separate ``mul`` then ``add`` (never ``addcmul``: no FMA).
Large inputs are processed in row tiles so the element-wise passes stay in cache; each
tile is fully vectorised.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from mixkvq.format import FIXED_MAX, FIXED_ONE, FLOAT_MAX, meta_overflow_error, n_groups, range_overflow_error, row_bytes

META_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
#: elements per tile of the quantize pipeline (float32 intermediates stay in L2)
TILE_ELEMENTS = 1 << 18


def to_float32(x: torch.Tensor) -> torch.Tensor:
    """§1: exact upcast of float16/bfloat16; float64 rounds to nearest even."""
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def full_like_scalar(ref: torch.Tensor, value: float) -> torch.Tensor:
    """A 0-dim float32 tensor on ``ref``'s device (divisions by it are true divisions)."""
    return torch.tensor(value, dtype=torch.float32, device=ref.device)


# -- §5 packing ----------------------------------------------------------------------------
def _pack_terms(bits: int) -> list[list[tuple[int, int]]]:
    """For a group of 8 codes (= ``bits`` bytes): byte j = OR of (code i shifted by s)."""
    terms = []
    for j in range(bits):
        row = []
        for i in range(8):
            lo, hi = i * bits, i * bits + bits  # stream bits of code i
            if lo < 8 * j + 8 and hi > 8 * j:
                row.append((i, lo - 8 * j))  # shift: >0 left, <0 right
        terms.append(row)
    return terms


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(..., n)`` (< 2^bits) -> uint8 ``(..., ceil(n*bits/8))``, LSB-first."""
    codes = codes.to(torch.uint8)
    lead, n = codes.shape[:-1], codes.shape[-1]
    nbytes = row_bytes(n, bits)
    if bits == 8:
        return codes.clone(memory_format=torch.contiguous_format)
    n8 = -(-n // 8)
    flat = codes.reshape(-1, n)
    if n8 * 8 != n:
        flat = torch.nn.functional.pad(flat, (0, n8 * 8 - n))
    groups = flat.reshape(-1, n8, 8)
    out = torch.empty((groups.shape[0], n8, bits), dtype=torch.uint8, device=codes.device)
    for j, row in enumerate(_pack_terms(bits)):
        acc = None
        for i, shift in row:
            term = groups[:, :, i]
            term = term << shift if shift >= 0 else term >> (-shift)
            acc = term if acc is None else acc | term
        out[:, :, j] = acc
    return out.reshape(*lead, n8 * bits)[..., :nbytes]


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 ``(..., ceil(n*bits/8))`` -> uint8 codes ``(..., n)``; padding bits ignored."""
    packed = packed.to(torch.uint8)
    lead = packed.shape[:-1]
    if bits == 8:
        return packed[..., :n].contiguous()
    n8 = -(-n // 8)
    flat = packed.reshape(-1, packed.shape[-1])
    if flat.shape[-1] != n8 * bits:
        flat = torch.nn.functional.pad(flat, (0, n8 * bits - flat.shape[-1]))
    groups = flat.reshape(-1, n8, bits)
    mask = (1 << bits) - 1
    out = torch.empty((groups.shape[0], n8, 8), dtype=torch.uint8, device=packed.device)
    for i in range(8):
        lo = i * bits
        j0, j1 = lo // 8, (lo + bits - 1) // 8
        code = groups[:, :, j0] >> (lo - 8 * j0)
        if j1 != j0:
            code = code | (groups[:, :, j1] << (8 * j1 - lo))
        out[:, :, i] = code & mask
    return out.reshape(*lead, n8 * 8)[..., :n]


# -- §2 metadata ---------------------------------------------------------------------------
def round_meta(v32: torch.Tensor, meta_dtype: str) -> torch.Tensor:
    """float32 -> metadata dtype, round to nearest even (torch's casts are RNE with subnormals)."""
    return v32.to(META_TORCH[meta_dtype])


def _check_overflow(bad: torch.Tensor, name: str, dtype: str, what: str | None = None) -> None:
    """§2: raise (the simulator's message) at the first True of ``bad`` in row-major order."""
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
        raise meta_overflow_error(name, index, dtype) if what is None else meta_overflow_error(name, index, dtype, what=what)


# -- §3 quantization -------------------------------------------------------------------------
def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(rows, n)`` -> ``(rows, ceil(n/G), G)``, a partial last group padded with its last element."""
    n = x.shape[-1]
    ng = n_groups(n, group_size)
    pad = ng * group_size - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(x.shape[0], pad)], dim=-1)
    return x.reshape(x.shape[0], ng, group_size)


def group_min_max(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§3 steps 1–2 on ``(..., G)`` groups: float32 min and max with ``-0`` made ``+0``."""
    mn, mx = torch.aminmax(groups, dim=-1)
    return to_float32(mn) + 0.0, to_float32(mx) + 0.0


_WORD = {2: torch.int32, 4: torch.int16, 1: torch.int64}


def _pack_tile(codes: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """Float codes ``(rows, >= n)`` (exact integers < 2^bits) -> packed uint8 ``(rows, ceil(n*bits/8))``.

    Widths 1, 2, 4: the ``8/bits`` codes of a byte, converted to uint8, are the bytes of one
    little-endian word; OR-ing the word with itself shifted by ``8 - bits``, ``2 (8 - bits)``,
    ... gathers them into its low byte (contiguous integer ops, no strided passes). Other
    widths go through :func:`pack`."""
    c = codes[:, :n].to(torch.uint8)
    if bits not in (1, 2, 4):
        return c.contiguous() if bits == 8 else pack(c, bits)
    per = 8 // bits
    nbytes = -(-n // per)
    if nbytes * per != n:
        c = torch.nn.functional.pad(c, (0, nbytes * per - n))
    rows = c.shape[0]
    w = c.contiguous().reshape(-1).view(_WORD[bits]).reshape(rows, nbytes)  # word k: codes per*k .. per*k+per-1
    acc = w.clone()
    for i in range(1, per):
        acc |= w >> ((8 - bits) * i)
    return acc.to(torch.uint8)  # the low byte (integer casts wrap)


def quantize(x: torch.Tensor, bits: int, group_size: int, meta_dtype: str, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§3 along the last axis: ``x (..., n)`` -> (packed uint8 ``(..., ceil(n*bits/8))``,
    scale ``(..., ceil(n/G))``, zero ``(..., ceil(n/G))``) in ``meta_dtype``.

    One pass per row tile (float32 intermediates stay in cache): upcast (exact), group
    min/max on float32 (no float16 reduction slow path), scale/zero and their overflow
    check, codes, packing. Tiles run in row order, so the first overflowing group found is
    the first in row-major order (the simulator's message)."""
    lead, n = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, n)
    n_rows = rows.shape[0]
    ng = n_groups(n, group_size)
    G = group_size
    mdt = META_TORCH[meta_dtype]
    nbytes = row_bytes(n, bits)
    packed = torch.empty((n_rows, nbytes), dtype=torch.uint8, device=x.device)
    scale = torch.empty((n_rows, ng), dtype=mdt, device=x.device)
    zero = torch.empty((n_rows, ng), dtype=mdt, device=x.device)
    levels = torch.tensor(float(2**bits - 1), dtype=torch.float32, device=x.device)
    lmax = float(2**bits - 1)
    tile = max(1, TILE_ELEMENTS // max(1, ng * G))
    far_first: "tuple[int, torch.Tensor] | None" = None  # first tile with a range overflow (§3 step 4)
    for r0 in range(0, n_rows, tile):
        r1 = min(n_rows, r0 + tile)
        src = rows[r0:r1]
        x32 = src.to(torch.float32)  # §1: exact upcast (float64 rounds to nearest)
        owned = src.dtype != torch.float32  # a fresh tensor: safe to overwrite
        groups = _group_view(x32, G)  # (r, ng, G)
        mn = groups.amin(dim=-1).add_(0.0)  # exact; -0 -> +0 (§3 step 2). (amin/amax are
        mx = groups.amax(dim=-1).add_(0.0)  # vectorised where aminmax over a short axis is not)
        sc = round_meta((mx - mn) / levels, meta_dtype)
        ze = round_meta(mn, meta_dtype)
        bad = torch.isinf(sc) | torch.isinf(ze)
        if bool(bad.any()):
            full = torch.zeros((n_rows, ng), dtype=torch.bool, device=x.device)
            full[r0:r1] = bad
            _check_overflow(full.reshape(*lead, ng), name, meta_dtype)
        scale[r0:r1] = sc
        zero[r0:r1] = ze
        s = sc.to(torch.float32)
        top = (s * levels).add_(ze.to(torch.float32))  # fl32(fl32(L * s) + z): the largest dequantized value
        if far_first is None and not bool(torch.isfinite(top).all()):
            far_first = (r0, ~torch.isfinite(top))
        # s == 0: every code is 0 (§3 step 5). Dividing by +Inf instead gives +-0, which
        # rounds and clamps to code 0 — no per-element select needed.
        s_div = s.masked_fill(s == 0, float("inf")).unsqueeze(-1)
        z = ze.to(torch.float32).unsqueeze(-1)
        d = groups.sub_(z) if owned else torch.sub(groups, z)  # one rounding
        d.div_(s_div).round_().clamp_(0.0, lmax)
        packed[r0:r1] = _pack_tile(d.reshape(r1 - r0, ng * G), n, bits)
    if far_first is not None:  # metadata overflow anywhere is reported first (the simulator's order)
        r0, far = far_first
        row, group = (int(i) for i in torch.nonzero(far)[0].tolist())
        index = np.unravel_index((r0 + row) * ng + group, (*lead, ng))
        raise range_overflow_error(name, tuple(int(i) for i in index))
    return packed.reshape(*lead, nbytes), scale.reshape(*lead, ng), zero.reshape(*lead, ng)


def cast_output(y32: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """§4 output dtype: float16/bfloat16 saturate to the largest finite value, then RNE."""
    if out_dtype == "float32":
        return y32
    limit = FLOAT_MAX[out_dtype]
    return y32.clamp(-limit, limit).to(META_TORCH[out_dtype])


def dequantize(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, n: int,
               out_dtype: str = "float32") -> torch.Tensor:
    """§4: ``fl32(fl32(code * s) + z)`` -> ``(..., n)`` in ``out_dtype``."""
    lead = packed.shape[:-1]
    ng = scale.shape[-1]
    codes = unpack(packed, bits, n).reshape(-1, n)
    if ng * group_size != n:
        codes = torch.nn.functional.pad(codes, (0, ng * group_size - n))
    y = codes.reshape(-1, ng, group_size).to(torch.float32)
    y.mul_(to_float32(scale).reshape(-1, ng, 1))  # one rounding ...
    y.add_(to_float32(zero).reshape(-1, ng, 1))   # ... then another (no FMA)
    y = y.reshape(-1, ng * group_size)[:, :n].reshape(*lead, n)
    return cast_output(y, out_dtype)


# -- §6 16-bit channels -----------------------------------------------------------------------
def encode_half(x: torch.Tensor, high_dtype: str, name: str) -> torch.Tensor:
    """``(..., n)`` -> uint8 ``(..., 2n)``: little-endian ``high_dtype`` words (RNE)."""
    words = to_float32(x).to(META_TORCH[high_dtype])
    _check_overflow(torch.isinf(words), name, high_dtype, what="16-bit key channel")
    words = words.contiguous()
    if words.numel() == 0:
        return torch.empty((*words.shape[:-1], 2 * words.shape[-1]), dtype=torch.uint8, device=x.device)
    return words.view(torch.uint8)  # little-endian hosts and GPUs


def decode_half(packed: torch.Tensor, high_dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_half` -> float32 ``(..., n)``."""
    packed = packed.contiguous()
    if packed.numel() == 0:
        return torch.empty((*packed.shape[:-1], packed.shape[-1] // 2), dtype=torch.float32, device=packed.device)
    return packed.view(META_TORCH[high_dtype]).to(torch.float32)


# -- §7 query statistics ----------------------------------------------------------------------
def query_token_sums(q: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``q (B, H*n_rep, T, D)`` -> int64 ``(B, H, T, D)``: exact fixed-point sums of |q|."""
    m = to_float32(q).abs() * full_like_scalar(q, float(FIXED_ONE))  # exact scaling by 2^16
    f = m.round_().clamp_(max=float(FIXED_MAX)).to(torch.int64)
    B, Hq, T, D = f.shape
    return f.reshape(B, Hq // n_rep, n_rep, T, D).sum(dim=2)


def int64_to_float32(v: torch.Tensor) -> torch.Tensor:
    """int64 -> float32 rounded once to nearest even, for every int64.

    Via float64: exact below 2^53; above, the bits below 2^11 are first folded into a
    sticky bit ("round to odd"), so the float64 holds the value exactly enough that its
    one rounding to float32 is the correctly rounded result (no double rounding)."""
    a = v.abs()
    big = a >= (1 << 53)
    low = a & 0x7FF
    jammed = (a & ~0x7FF) | ((low != 0).to(torch.int64) << 11)
    a = torch.where(big, jammed, a)
    f = a.to(torch.float64).to(torch.float32)
    return torch.where(v < 0, -f, f)


def relevance(qsum: torch.Tensor, count: int, n_rep: int) -> torch.Tensor:
    """§7 step 5: ``fl32(float32(qsum) / float32(count * n_rep * 2^16))`` -> float32 ``(B, H, D)``."""
    if count == 0:
        return torch.ones(qsum.shape, dtype=torch.float32, device=qsum.device)
    denominator = int64_to_float32(torch.tensor(count * n_rep * FIXED_ONE, dtype=torch.int64, device=qsum.device))
    return int64_to_float32(qsum.to(torch.int64)) / denominator


# -- §8 salience and tiers ----------------------------------------------------------------------
def difficulty(keys: torch.Tensor, low_bits: int) -> torch.Tensor:
    """keys ``(B, H, R, D)`` -> float32 ``(B, H, D)``: channel range / (2^low_bits - 1)."""
    if keys.dtype == torch.float64:
        keys = keys.to(torch.float32)
    mn, mx = torch.aminmax(keys, dim=-2)
    mn, mx = to_float32(mn) + 0.0, to_float32(mx) + 0.0
    return (mx - mn) / full_like_scalar(mn, float(2**low_bits - 1))


def _tiers_from(cond_high: torch.Tensor, cond_mid: torch.Tensor, tier_bits: Sequence[int]) -> torch.Tensor:
    high, mid, low = (int(b) for b in tier_bits)
    tier = torch.full(cond_high.shape, low, dtype=torch.uint8, device=cond_high.device)
    tier.masked_fill_(cond_mid, mid)
    tier.masked_fill_(cond_high, high)
    return tier


def assign_budget(salience: torch.Tensor, n_high: int, n_mid: int, tier_bits: Sequence[int]) -> torch.Tensor:
    """Rank channels by salience descending (stable: ties to the lower channel) -> uint8 ``(B, H, D)``."""
    order = torch.sort(-salience, dim=-1, stable=True).indices
    rank = torch.empty_like(order)
    ar = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank.scatter_(-1, order, ar)
    return _tiers_from(rank < n_high, rank < n_high + n_mid, tier_bits)


def assign_threshold(salience: torch.Tensor, tau_high: float, tau_mid: float, tier_bits: Sequence[int]) -> torch.Tensor:
    """``A > tau_high`` high; ``tau_mid < A <= tau_high`` mid; else low (taus rounded to float32)."""
    a = to_float32(salience)
    th = torch.tensor(tau_high, dtype=torch.float64).to(torch.float32).to(a.device)
    tm = torch.tensor(tau_mid, dtype=torch.float64).to(torch.float32).to(a.device)
    return _tiers_from(a > th, a > tm, tier_bits)
