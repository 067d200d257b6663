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

import torch

from mixkvq.errors import raise_meta_overflow

META_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FIXED_ONE = 65536.0
FIXED_MAX = float(2**40)
#: elements per tile of the quantize pipeline (float32 intermediates stay in L2)
TILE_ELEMENTS = 1 << 16
_FLOAT_MAX = {torch.float16: 65504.0, torch.bfloat16: 3.3895313892515355e38}


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
    nbytes = (n * bits + 7) // 8
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
        if what is None:
            raise_meta_overflow(name, index, dtype)
        raise_meta_overflow(name, index, dtype, what=what)


# -- §3 quantization -------------------------------------------------------------------------
def _group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(rows, n)`` -> ``(rows, ceil(n/G), G)``, a partial last group padded with its last element."""
    n = x.shape[-1]
    ng = -(-n // group_size)
    pad = ng * group_size - n
    if pad:
        x = torch.cat([x, x[:, -1:].expand(x.shape[0], pad)], dim=-1)
    return x.reshape(x.shape[0], ng, group_size)


def group_min_max(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """§3 steps 1–2 on ``(..., G)`` groups: float32 min and max with ``-0`` made ``+0``."""
    mn, mx = torch.aminmax(groups, dim=-1)
    return to_float32(mn) + 0.0, to_float32(mx) + 0.0


def quantize(x: torch.Tensor, bits: int, group_size: int, meta_dtype: str, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """§3 along the last axis: ``x (..., n)`` -> (packed uint8 ``(..., ceil(n*bits/8))``,
    scale ``(..., ceil(n/G))``, zero ``(..., ceil(n/G))``) in ``meta_dtype``."""
    lead, n = x.shape[:-1], x.shape[-1]
    if x.dtype == torch.float64:
        x = x.to(torch.float32)
    rows = x.reshape(-1, n)
    groups = _group_view(rows, group_size)  # input dtype: min/max are exact in it
    mn, mx = group_min_max(groups)
    levels = full_like_scalar(mn, float(2**bits - 1))
    scale = round_meta((mx - mn) / levels, meta_dtype)
    zero = round_meta(mn, meta_dtype)
    ng = scale.shape[-1]
    _check_overflow((torch.isinf(scale) | torch.isinf(zero)).reshape(*lead, ng), name, meta_dtype)
    s = to_float32(scale)
    # s == 0: every code is 0 (§3 step 5). Dividing by +Inf instead gives +-0, which rounds
    # and clamps to code 0 — no per-element select needed.
    s_div = torch.where(s == 0, torch.full_like(s, float("inf")), s).unsqueeze(-1)
    z = to_float32(zero).unsqueeze(-1)
    n_rows, _, G = groups.shape
    codes = torch.empty((n_rows, ng * G), dtype=torch.uint8, device=x.device)
    tile = max(1, TILE_ELEMENTS // max(1, ng * G))
    lmax = float(2**bits - 1)
    for r0 in range(0, n_rows, tile):  # row tiles: the float32 passes stay in cache
        r1 = min(n_rows, r0 + tile)
        d = torch.sub(groups[r0:r1], z[r0:r1])  # float32 (input upcast exactly, then one rounding)
        d.div_(s_div[r0:r1])
        d.round_().clamp_(0.0, lmax)
        codes[r0:r1] = d.reshape(r1 - r0, ng * G)
    packed = pack(codes[:, :n], bits)
    return packed.reshape(*lead, (n * bits + 7) // 8), scale.reshape(*lead, ng), zero.reshape(*lead, ng)


def cast_output(y32: torch.Tensor, out_dtype: str) -> torch.Tensor:
    """§4 output dtype: float16/bfloat16 saturate to the largest finite value, then RNE."""
    if out_dtype == "float32":
        return y32
    dt = META_TORCH[out_dtype]
    limit = _FLOAT_MAX[dt]
    return y32.clamp(-limit, limit).to(dt)


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
    m = to_float32(q).abs() * full_like_scalar(q, FIXED_ONE)  # exact scaling by 2^16
    f = m.round_().clamp_(max=FIXED_MAX).to(torch.int64)
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
    denominator = int64_to_float32(torch.tensor(count * n_rep * int(FIXED_ONE), dtype=torch.int64, device=qsum.device))
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
