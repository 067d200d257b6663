"""An independent, deliberately scalar port of docs/numerics.md (format version 1).

Written from the spec text alone, to show the spec is sufficient: it uses nothing
from the package but numpy scalars and the standard library.  Every float32 operation is
a single numpy float32 scalar operation (so each one is rounded to binary32 on its own,
never fused); bit packing uses Python ints; float16 / bfloat16 rounding is done here from
the binary32 bit pattern.  Everything runs one group / one element at a time, so it is
slow, but it is meant to be read, not to be fast.

The §8.3 rate-distortion allocator is host float64 by definition: it is written with
Python floats (IEEE binary64, one rounding per operation, no fusion), operations in the
order the spec writes them, math.fsum for every Σ, and Python ints for bit costs; it is
kept in its own section below.  Configurations are the §9 table (CONFIG_DEFAULTS); the
golden-vector tests pass each case's complete manifest `config`.

Section numbers (§n) refer to docs/numerics.md.
"""

from __future__ import annotations

import math
import struct

import numpy as np

F32 = np.float32
ZERO32 = F32(0.0)


# ---------------------------------------------------------------------------------------
# Bit-level helpers (§1, §2)
# ---------------------------------------------------------------------------------------

def f32_bits(x) -> int:
    """The binary32 bit pattern of a float32 value, as a Python int."""
    return struct.unpack("<I", struct.pack("<f", float(x)))[0]


def bits_f32(u: int) -> np.float32:
    return F32(struct.unpack("<f", struct.pack("<I", u & 0xFFFFFFFF))[0])


def is_finite32(x) -> bool:
    return (f32_bits(x) >> 23) & 0xFF != 0xFF


def int_to_f32(n: int) -> np.float32:
    """Exact int -> float32 with round-to-nearest-even (§7 step 5), no double rounding."""
    if n == 0:
        return F32(0.0)
    sign = -1 if n < 0 else 1
    a = abs(n)
    nbits = a.bit_length()
    if nbits <= 24:
        return F32(sign * a)
    shift = nbits - 24
    q, r = a >> shift, a & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if r > half or (r == half and (q & 1)):
        q += 1
    return F32(sign * math.ldexp(q, shift))  # q * 2^shift is exact in float64


# bfloat16 — §2: u' = (u + 0x7FFF + ((u >> 16) & 1)) >> 16, unsigned 32-bit arithmetic.
def bf16_bits(x) -> int:
    u = f32_bits(x)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFFFFFF) >> 16


def bf16_value(bits16: int) -> np.float32:
    return bits_f32(bits16 << 16)


# float16 — IEEE binary16, round-to-nearest-even, gradual underflow (§2).
def f16_bits(x) -> int:
    v = float(x)  # exact: a float32 fits in a float64
    sign = 0x8000 if math.copysign(1.0, v) < 0 else 0
    a = abs(v)
    if a == 0.0:
        return sign
    if math.isinf(a):
        return sign | 0x7C00
    _, e2 = math.frexp(a)          # a = f * 2^e2, f in [0.5, 1)
    e = max(e2 - 1, -14)           # unbiased exponent; -14 also covers subnormals
    n = round(math.ldexp(a, 10 - e))  # exact scaling; round() is half-to-even
    if n >= 2048:                  # mantissa carried into the next binade
        e += 1
        n //= 2
    if e > 15:
        return sign | 0x7C00      # overflow to Inf
    if e == -14:
        return sign | n            # subnormal (n < 1024) or smallest binade (n in 1024..2047)
    return sign | ((e + 15) << 10) | (n - 1024)


def f16_value(bits16: int) -> np.float32:
    sign = -1.0 if bits16 & 0x8000 else 1.0
    e = (bits16 >> 10) & 0x1F
    m = bits16 & 0x3FF
    if e == 0x1F:
        return F32(sign * math.inf) if m == 0 else F32(math.nan)
    if e == 0:
        return F32(sign * math.ldexp(m, -24))
    return F32(sign * math.ldexp(1024 + m, e - 25))


def is_inf16(bits16: int) -> bool:
    return (bits16 & 0x7FFF) == 0x7C00


def is_inf_bf16(bits16: int) -> bool:
    return (bits16 & 0x7FFF) == 0x7F80


class MetaDtype:
    """round_meta for one metadata dtype: returns (stored bits, float32 value)."""

    def __init__(self, name: str):
        if name not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"unknown meta dtype {name!r}")
        self.name = name

    def round(self, v) -> tuple[int, np.float32]:
        if self.name == "float32":
            return f32_bits(v), F32(v)
        if self.name == "float16":
            b = f16_bits(v)
            return b, f16_value(b)
        b = bf16_bits(v)
        return b, bf16_value(b)

    def overflowed(self, value) -> bool:
        return not is_finite32(value)

    @property
    def bits_dtype(self):
        return np.uint32 if self.name == "float32" else np.uint16


# ---------------------------------------------------------------------------------------
# §1 input checks
# ---------------------------------------------------------------------------------------

def to_f32_list(arr, name: str) -> list:
    """Upcast to float32 (float64 rounded RNE), reject non-finite values (§1)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "f" and arr.dtype.name != "bfloat16":
        raise ValueError(f"{name}: dtype {arr.dtype} is not accepted")
    flat = arr.reshape(-1).tolist()
    out = []
    for i, v in enumerate(flat):
        if not math.isfinite(v):
            idx = np.unravel_index(i, arr.shape)
            raise ValueError(f"{name}: non-finite value at index {tuple(int(k) for k in idx)}")
        out.append(F32(v))  # float64 -> float32 is RNE; f16/f32 values are exact
    return out


# ---------------------------------------------------------------------------------------
# §5 bit packing
# ---------------------------------------------------------------------------------------

def pack_row(codes, b: int) -> bytes:
    stream = 0
    for i, c in enumerate(codes):
        c = int(c)
        if not 0 <= c < (1 << b):
            raise ValueError(f"code {c} does not fit in {b} bits")
        stream |= c << (i * b)
    nbytes = (len(codes) * b + 7) // 8
    return stream.to_bytes(nbytes, "little")


def unpack_row(data: bytes, b: int, n: int) -> list:
    stream = int.from_bytes(bytes(data), "little")
    mask = (1 << b) - 1
    return [(stream >> (i * b)) & mask for i in range(n)]


def pack(codes2d, b: int) -> np.ndarray:
    rows = [pack_row(list(r), b) for r in np.asarray(codes2d).reshape(-1, np.shape(codes2d)[-1])]
    width = (np.shape(codes2d)[-1] * b + 7) // 8
    out = np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width)
    return out.reshape(tuple(np.shape(codes2d)[:-1]) + (width,))


# ---------------------------------------------------------------------------------------
# §3 quantization of one group / one row, §4 dequantization
# ---------------------------------------------------------------------------------------

class GroupResult:
    __slots__ = ("codes", "s_bits", "z_bits", "s", "z")

    def __init__(self, codes, s_bits, z_bits, s, z):
        self.codes, self.s_bits, self.z_bits, self.s, self.z = codes, s_bits, z_bits, s, z


def quantize_group(xs, b: int, meta: MetaDtype, what: str = "tensor", where=()) -> GroupResult:
    L = (1 << b) - 1
    # 1. exact min / max
    mn = xs[0]
    mx = xs[0]
    for x in xs[1:]:
        if x < mn:
            mn = x
        if x > mx:
            mx = x
    # 2. canonicalise -0 to +0
    mn = F32(mn + ZERO32)
    mx = F32(mx + ZERO32)
    # 3. range and float32 scale (true division)
    rng = F32(mx - mn)
    scale32 = F32(rng / F32(L))
    # 4. round into the metadata dtype, overflow check
    s_bits, s = meta.round(scale32)
    z_bits, z = meta.round(mn)
    if meta.overflowed(s) or meta.overflowed(z):
        raise ValueError(
            f"{what}: group {where} overflows {meta.name} metadata; "
            "use meta_dtype='float32' or 'bfloat16'")
    # §3 step 4: the largest dequantized value must be finite
    with np.errstate(over="ignore"):
        top = F32(F32(F32(L) * s) + z)
    if not is_finite32(top):
        raise ValueError(f"{what}: group {where} would dequantize beyond float32's range")
    # 5. codes
    codes = []
    for x in xs:
        if s == 0:
            codes.append(0)
            continue
        d = F32(x - z)
        t = F32(d / s)
        c = round(float(t))  # Python round(): half to even, exact on a float
        codes.append(min(max(c, 0), L))
    return GroupResult(codes, s_bits, z_bits, s, z)


def dequantize_code(code: int, s, z) -> np.float32:
    return F32(F32(F32(code) * s) + z)


def group_metadata(xs, b: int, meta: MetaDtype):
    """§3 steps 1-4 without the checks: the (s, z) rounded metadata values of one group."""
    L = (1 << b) - 1
    mn, mx = channel_minmax(xs)
    _, s = meta.round(F32(F32(mx - mn) / F32(L)))
    _, z = meta.round(mn)
    return s, z


def check_metadata_overflow(rows, b: int, G: int, meta: MetaDtype, what: str):
    """§3 step 4 ordering: a metadata overflow anywhere in the tensor is reported (at its
    row-major first group) before any range overflow.  `rows` is a list of (where, xs)."""
    for where, xs in rows:
        for gi, start in enumerate(range(0, len(xs), G)):
            s, z = group_metadata(xs[start:start + G], b, meta)
            if meta.overflowed(s) or meta.overflowed(z):
                raise ValueError(f"{what}: group {where + (gi,)} overflows {meta.name} metadata; "
                                 "use meta_dtype='float32' or 'bfloat16'")


def quantize_row(xs, b: int, G: int, meta: MetaDtype, what="tensor", where=()):
    """One row -> (codes, [s_bits], [z_bits], [s], [z]), groups of G (last may be short)."""
    codes, sb, zb, ss, zz = [], [], [], [], []
    for gi, start in enumerate(range(0, len(xs), G)):
        g = quantize_group(xs[start:start + G], b, meta, what, where + (gi,))
        codes.extend(g.codes)
        sb.append(g.s_bits)
        zb.append(g.z_bits)
        ss.append(g.s)
        zz.append(g.z)
    return codes, sb, zb, ss, zz


def dequantize_row(codes, ss, zs, G: int) -> list:
    return [dequantize_code(c, ss[i // G], zs[i // G]) for i, c in enumerate(codes)]


# §4: float16 / bfloat16 outputs are the float32 result clamped to the target's largest
# finite magnitude, then rounded to nearest even.
F16_MAX = F32(65504.0)
BF16_MAX = bits_f32(0x7F7F << 16)  # 0x7F7F is the largest finite bfloat16


def clamp32(v, limit):
    if v > limit:
        return limit
    if v < -limit:
        return F32(-limit)
    return v


def output_bits(v, out_dtype: str) -> int:
    """A float32 dequantized value in the output dtype (§4), as its raw bits."""
    if out_dtype == "float32":
        return f32_bits(v)
    if out_dtype == "float16":
        return f16_bits(clamp32(v, F16_MAX))
    if out_dtype == "bfloat16":
        return bf16_bits(clamp32(v, BF16_MAX))
    raise ValueError(f"unknown output dtype {out_dtype!r}")


def output_array(rows_of_f32, out_dtype: str, shape) -> np.ndarray:
    """float32 / float16 as those dtypes; bfloat16 as its uint16 bit pattern (the §10
    convention for stored bfloat16, applied here to outputs too)."""
    bits = [output_bits(v, out_dtype) for row in rows_of_f32 for v in row]
    if out_dtype == "float32":
        return np.array(bits, np.uint32).view(np.float32).reshape(shape)
    arr = np.array(bits, np.uint16).reshape(shape)
    return arr.view(np.float16) if out_dtype == "float16" else arr


def quantize_rows(x2d, b: int, G: int, meta_name: str, what="x", out_dtype="float32"):
    """Quantize each row of a 2-D array (§3) and pack it (§5).

    Returns dict with packed uint8, scale / zero as raw bits, dequantized in `out_dtype`
    (§4) and dequantized32 (the float32 result before any output rounding).
    """
    meta = MetaDtype(meta_name)
    x2d = np.asarray(x2d)
    nrows, n = x2d.shape
    flat = to_f32_list(x2d, what)
    ngroups = -(-n // G)
    check_metadata_overflow([((r,), flat[r * n:(r + 1) * n]) for r in range(nrows)], b, G, meta, what)
    packed, sbits, zbits, deq = [], [], [], []
    for r in range(nrows):
        xs = flat[r * n:(r + 1) * n]
        codes, sb, zb, ss, zz = quantize_row(xs, b, G, meta, what, (r,))
        packed.append(pack_row(codes, b))
        sbits.append(sb)
        zbits.append(zb)
        # dequantize from the *packed* bytes, as a reader would
        deq.append(dequantize_row(unpack_row(packed[-1], b, n), ss, zz, G))
    width = (n * b + 7) // 8
    return {
        "packed": np.frombuffer(b"".join(packed), np.uint8).reshape(nrows, width),
        "scale": np.array(sbits, dtype=meta.bits_dtype).reshape(nrows, ngroups),
        "zero": np.array(zbits, dtype=meta.bits_dtype).reshape(nrows, ngroups),
        "dequantized": output_array(deq, out_dtype, (nrows, n)),
        "dequantized32": output_array(deq, "float32", (nrows, n)),
    }


# ---------------------------------------------------------------------------------------
# 16-bit rows (§6, w == 16)
# ---------------------------------------------------------------------------------------

def half_round(x, high_dtype: str, what: str = "x") -> int:
    if high_dtype == "bfloat16":
        b = bf16_bits(x)
        if is_inf_bf16(b):
            raise ValueError(f"{what}: a value overflows bfloat16")
        return b
    if high_dtype == "float16":
        b = f16_bits(x)
        if is_inf16(b):
            raise ValueError(f"{what}: a value overflows float16")
        return b
    raise ValueError(f"unknown high dtype {high_dtype!r}")


def half_decode(bits16: int, high_dtype: str) -> np.float32:
    return bf16_value(bits16) if high_dtype == "bfloat16" else f16_value(bits16)


def encode_half_row(xs, high_dtype: str, what: str = "x") -> bytes:
    return b"".join(half_round(x, high_dtype, what).to_bytes(2, "little") for x in xs)


def decode_half_row(data: bytes, high_dtype: str) -> list:
    return [half_decode(int.from_bytes(data[2 * i:2 * i + 2], "little"), high_dtype)
            for i in range(len(data) // 2)]


def half_rows(x2d, high_dtype: str):
    x2d = np.asarray(x2d)
    nrows, n = x2d.shape
    flat = to_f32_list(x2d, "x")
    packed = [encode_half_row(flat[r * n:(r + 1) * n], high_dtype) for r in range(nrows)]
    decoded = [[float(v) for v in decode_half_row(p, high_dtype)] for p in packed]
    return {
        "packed": np.frombuffer(b"".join(packed), np.uint8).reshape(nrows, 2 * n),
        "decoded": np.array(decoded, dtype=np.float32).reshape(nrows, n),
    }


# ---------------------------------------------------------------------------------------
# §7 query statistics, §8 salience and tiers, §6 key-block layout, §9 the stream
# ---------------------------------------------------------------------------------------

SCALE_Q = F32(65536.0)
SAT_Q = 1 << 40


def query_fixed_point(q) -> int:
    """§7 step 2 for one element."""
    a = abs(F32(q))
    m = F32(a * SCALE_Q)
    if not is_finite32(m):
        return SAT_Q
    return min(round(float(m)), SAT_Q)


def relevance(qsum: int, nq: int, n_rep: int) -> np.float32:
    """§7 step 5."""
    if nq == 0:
        return F32(1.0)
    return F32(int_to_f32(qsum) / int_to_f32(nq * n_rep * 65536))


def channel_minmax(xs):
    mn = mx = xs[0]
    for x in xs[1:]:
        if x < mn:
            mn = x
        if x > mx:
            mx = x
    return F32(mn + ZERO32), F32(mx + ZERO32)


def budget_counts(budget, D: int) -> tuple:
    """§9 `budget`: two Python ints are channel counts per head; otherwise both are
    fractions of D, converted as floor(f*D + 0.5) (§8.1)."""
    n_high, n_mid = budget

    def is_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    if is_int(n_high) and is_int(n_mid):
        return int(n_high), int(n_mid)
    return (int(math.floor(float(n_high) * D + 0.5)),
            int(math.floor(float(n_mid) * D + 0.5)))


# The §9 configuration table: every field and its default.
CONFIG_DEFAULTS = {
    "policy": "query_aware",
    "tier_mode": "budget",
    "budget": (1 / 32, 1 / 8),
    "thresholds": (1.44, 0.79),
    "high_dtype": "bfloat16",
    "mid_bits": 4,
    "low_bits": 2,
    "value_bits": 2,
    "group_size": 32,
    "residual_length": 128,
    "value_window": "block",
    "meta_dtype": "float16",
    "rd_bits": 3.5,
    "bit_ladder": (2, 3, 4, 8, 16),
    "value_bit_ladder": (2, 3, 4),
    "rd_value_weight": 2.0,
}


class PortConfig:
    """The §9 configuration.  Field names and defaults are those of the §9 table."""

    def __init__(self, **fields):
        unknown = set(fields) - set(CONFIG_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown config field(s) {sorted(unknown)}")
        f = dict(CONFIG_DEFAULTS)
        f.update(fields)
        self.fields = f
        self.policy = f["policy"]
        self.tier_mode = f["tier_mode"]
        self.budget = tuple(f["budget"])
        self.thresholds = tuple(f["thresholds"])
        self.high_dtype = f["high_dtype"]
        self.mid_bits, self.low_bits = f["mid_bits"], f["low_bits"]
        self.value_bits = f["value_bits"]
        self.G, self.R = f["group_size"], f["residual_length"]
        self.value_window = f["value_window"]
        self.meta = MetaDtype(f["meta_dtype"])
        self.rd_bits = f["rd_bits"]
        self.bit_ladder = tuple(f["bit_ladder"])
        self.value_bit_ladder = tuple(f["value_bit_ladder"])
        self.rd_value_weight = float(f["rd_value_weight"])
        if self.policy not in ("query_aware", "key_only", "query_only", "uniform"):
            raise ValueError(f"unknown policy {self.policy!r}")
        if self.tier_mode not in ("budget", "threshold", "rd"):
            raise ValueError(f"unknown tier_mode {self.tier_mode!r}")
        if self.value_window not in ("block", "sliding"):
            raise ValueError(f"unknown value_window {self.value_window!r}")
        if self.R % self.G:
            raise ValueError("residual_length must be a multiple of group_size")
        if self.tier_mode == "rd" and self.policy == "uniform":
            # §8 says uniform gives every channel the low tier, §8.3 says w_d = 1 for
            # policies without queries; the spec does not say which wins.  Not guessed.
            raise NotImplementedError("policy='uniform' with tier_mode='rd' is not specified")
        if self.tier_mode == "rd" and self.value_window == "sliding":
            # §8.3 gives the *block* one value width; §9's sliding window quantizes values
            # token by token on their own schedule.  The spec does not say how they meet.
            raise NotImplementedError("tier_mode='rd' with value_window='sliding' is not specified")

    @property
    def meta_bytes(self):
        """Bytes per metadata value (m of §8.3)."""
        return 4 if self.meta.name == "float32" else 2

    @property
    def tiers(self):
        """The §9 tier ladder (high, mid, low) of the budget / threshold modes."""
        return (16, self.mid_bits, self.low_bits)

    @property
    def stored_widths(self):
        """Widths that get a per-tier array group in a key block, highest first (§6, §9):
        the distinct widths of the ladder; `uniform` has the one-width ladder (low_bits,),
        rd mode (§8.3) the `bit_ladder`."""
        if self.policy == "uniform":
            ladder = (self.low_bits,)
        elif self.tier_mode == "rd":
            ladder = self.bit_ladder
        else:
            ladder = self.tiers
        return tuple(sorted(set(ladder), reverse=True))

    @property
    def uses_queries(self):
        return self.policy in ("query_aware", "query_only")


def assign_tiers(A, cfg: PortConfig) -> list:
    """Tier widths for the D channels of one (b, h) in one block (§8.1, §8.2)."""
    high, mid, low = cfg.tiers
    D = len(A)
    if cfg.policy == "uniform":
        return [low] * D
    if cfg.tier_mode == "threshold":
        th = F32(cfg.thresholds[0])
        tm = F32(cfg.thresholds[1])
        out = []
        for a in A:
            if a > th:
                out.append(high)
            elif a > tm:
                out.append(mid)
            else:
                out.append(low)
        return out
    assert cfg.tier_mode == "budget"
    n_high, n_mid = budget_counts(cfg.budget, D)
    order = sorted(range(D), key=lambda d: (-float(A[d]), d))  # A descending, stable
    out = [low] * D
    for rank, d in enumerate(order):
        if rank < n_high:
            out[d] = high
        elif rank < n_high + n_mid:
            out[d] = mid
    return out


# ---------------------------------------------------------------------------------------
# §8.3 the rate-distortion allocator.  Host-side float64: every value below is a Python
# float (IEEE binary64, one rounding per operation, evaluated in the order written in the
# spec, left to right); sums marked Σ in the spec are math.fsum.  Costs are Python ints.
# ---------------------------------------------------------------------------------------

def rd_key_cost(b: int, cfg: PortConfig) -> int:
    """§8.3 step 3, one key channel."""
    R, G, m = cfg.R, cfg.G, cfg.meta_bytes
    if b == 16:
        return 16 * R
    return 8 * (-(-R * b // 8)) + 2 * 8 * m * (R // G)


def rd_value_cost(b: int, cfg: PortConfig, B: int, H: int, D: int) -> int:
    """§8.3 step 3, the block's values at width b."""
    R, G, m = cfg.R, cfg.G, cfg.meta_bytes
    return B * H * R * (8 * (-(-D * b // 8)) + 2 * 8 * m * (-(-D // G)))


def rd_key_step(b: int, r_d: float, amax_d: float, high_dtype: str) -> float:
    """§8.3 step 1."""
    if b <= 8:
        return r_d / float((1 << b) - 1)
    assert b == 16
    return amax_d * (2.0 ** -7 if high_dtype == "bfloat16" else 2.0 ** -10)


def rd_hull_steps(points) -> list:
    """§8.3 step 4: the lower convex hull of one owner's (cost, error, width) points,
    walked from the cheapest point.  Returns the steps as (gain, cost, width reached)."""
    cur = min(points, key=lambda p: p[0])
    steps = []
    while True:
        best, best_gain = None, None
        for p in points:
            if p[0] <= cur[0] or not p[1] < cur[1]:
                continue  # only more expensive points that lower the error
            gain = (cur[1] - p[1]) / float(p[0] - cur[0])
            # steepest drop per bit; ties: the farther (more expensive) point
            if best is None or gain > best_gain or (gain == best_gain and p[0] > best[0]):
                best, best_gain = p, gain
        if best is None:
            return steps
        steps.append((best_gain, best[0] - cur[0], best[2]))
        cur = best


def rd_check_minimum(cfg: PortConfig, B: int, H: int, D: int):
    """§8.3 step 3: (budget, minimum); a budget below the cheapest allocation is rejected."""
    R = cfg.R
    budget = math.floor(cfg.rd_bits * (2 * R * D * B * H))
    minimum = (B * H * D * min(rd_key_cost(b, cfg) for b in cfg.bit_ladder) + 8 * D * B * H
               + min(rd_value_cost(b, cfg, B, H, D) for b in cfg.value_bit_ladder))
    if minimum > budget:
        raise ValueError(
            f"rd_bits={cfg.rd_bits} is below the cheapest allocation: {minimum} bits "
            f"({minimum / (2 * R * D * B * H)} bits per element) > budget {budget} bits")
    return budget, minimum


def rd_allocate(keys, values, w, cfg: PortConfig, B: int, H: int, D: int):
    """§8.3 for one block.

    keys[b][h][d] and values[b][h][t] are lists of float32 scalars (a key channel's R
    values in token order; a token's D values); w[b][h][d] the weight w_d as a float.
    Returns (widths[b][h][d], value width, report dict)."""
    R, G = cfg.R, cfg.G
    # step 2: spread^2 per head,  Σ (v[t,c] - mean_t v[t,c])^2 / (R*D),  mean_t = Σ / R
    spread2 = {}
    for b in range(B):
        for h in range(H):
            rows = [[float(x) for x in values[b][h][t]] for t in range(R)]
            means = [math.fsum(rows[t][c] for t in range(R)) / R for c in range(D)]
            sq = []
            for t in range(R):
                for c in range(D):
                    dlt = rows[t][c] - means[c]
                    sq.append(dlt * dlt)
            spread2[b, h] = math.fsum(sq) / (R * D)
    # step 2: mean over the whole block of range_{t,g}^2 (partial groups padded with their
    # last element, which does not change a range)
    range_sq = []
    for b in range(B):
        for h in range(H):
            for t in range(R):
                tok = values[b][h][t]
                for g0 in range(0, D, G):
                    grp = [float(x) for x in tok[g0:g0 + G]]
                    grp += [grp[-1]] * (G - len(grp))
                    rg = max(grp) - min(grp)
                    range_sq.append(rg * rg)
    S = math.fsum(range_sq)
    n_g = -(-D // G)

    # owners: key channels in (b, h, d) order, then the value chain
    chains = []
    for b in range(B):
        for h in range(H):
            for d in range(D):
                col = [float(x) for x in keys[b][h][d]]
                r_d = max(col) - min(col)
                amax_d = max(abs(x) for x in col)
                wd = w[b][h][d]
                pts = []
                for bw in cfg.bit_ladder:
                    step = rd_key_step(bw, r_d, amax_d, cfg.high_dtype)
                    err = wd * wd * spread2[b, h] * (step * step) / 12.0
                    pts.append((rd_key_cost(bw, cfg), err, bw))
                chains.append(pts)
    vpts = []
    for bw in cfg.value_bit_ladder:
        L = float((1 << bw) - 1)
        # E_val(b) = λ * (D * S / (R * n_g) / (12 * (2^b - 1)^2)), in exactly that order
        e_val = cfg.rd_value_weight * (D * S / (R * n_g) / (12.0 * (L * L)))
        vpts.append((rd_value_cost(bw, cfg, B, H, D), e_val, bw))
    chains.append(vpts)

    # step 3: budget and the cheapest allocation
    budget, minimum = rd_check_minimum(cfg, B, H, D)
    start = [min(pts, key=lambda p: p[0]) for pts in chains]
    tier_map_bits = 8 * D * B * H

    # step 4: key hull steps as items, ordered by gain descending, ties by channel then step;
    # then one walk per value width that fits, the least total modelled error winning
    key_chains, vpts = chains[:-1], chains[-1]
    items = []
    for owner, pts in enumerate(key_chains):
        for k, (gain, cost, width) in enumerate(rd_hull_steps(pts)):
            items.append((gain, owner, k, cost, width))
    items.sort(key=lambda it: (-it[0], it[1], it[2]))
    err_at = [{w: e for (_, e, w) in pts} for pts in key_chains]
    key_minimum = sum(p[0] for p in start[:-1]) + tier_map_bits
    best = None
    for vcost, verr, vwidth in vpts:  # the value ladder ascends, and so do its costs
        left = budget - key_minimum - vcost
        if left < 0:
            break
        width = [p[2] for p in start[:-1]]
        next_step = [0] * len(key_chains)
        closed = [False] * len(key_chains)
        skipped = 0
        for gain, owner, k, cost, to_width in items:
            if closed[owner]:
                continue
            # "every chain is taken in step order": check it rather than assume it
            assert k == next_step[owner], "hull gains do not fall along the chain"
            if cost <= left:
                left -= cost
                width[owner] = to_width
                next_step[owner] += 1
            else:
                closed[owner] = True
                skipped += 1
        total = math.fsum([err_at[o][w] for o, w in enumerate(width)] + [verr])
        if best is None or total < best[0]:
            best = (total, width, vwidth, left, skipped)
    _, width, vwidth, left, skipped = best
    widths = [[[width[(b * H + h) * D + d] for d in range(D)] for h in range(H)]
              for b in range(B)]
    report = {"budget": budget, "minimum": minimum, "spent": budget - left,
              "skipped": skipped, "points": chains, "items": items,
              "tier_map_bits": tier_map_bits}
    return widths, vwidth, report


class PortCache:
    """A streaming cache following §9.  Inputs are kept as flat lists of float32 scalars,
    indexed [b][h][t][d]; outputs mirror the golden-vector arrays."""

    def __init__(self, cfg: PortConfig, B: int, H: int, D: int):
        self.cfg, self.B, self.H, self.D = cfg, B, H, D
        self.keys = []     # per token t: list over (b, h, d) of float32 (input order)
        self.values = []
        self.n_rep = None
        self.qsum = [0] * (B * H * D)
        self.nq = 0                    # the query position: tokens whose queries were observed
        self.count = 0                 # query tokens summed into qsum (not rolled back by crop)
        self.itemsize = None           # the input dtype's size (the residual is kept in it)
        self.snapshots = {}            # block index -> (qsum copy, nq), until it is flushed
        self.blocks = []               # flushed key blocks
        self.value_tokens = {}         # token -> (width, [(packed, s_bits, z_bits, deq)
                                       #                    per (b, h)])
        self.n_flushed = 0

    # -- input -----------------------------------------------------------------------------
    def _idx(self, b, h, d):
        return (b * self.H + h) * self.D + d

    # -- transactions: a rejected call leaves the cache exactly as it was (§1) -----------------
    def _transaction(self, fn, *args):
        import copy

        saved = copy.deepcopy(self.__dict__)
        try:
            return fn(*args)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    def observe_queries(self, q):
        return self._transaction(self._observe_queries, q)

    def append(self, keys, values, queries=None):
        return self._transaction(self._append, keys, values, queries)

    def _observe_queries(self, q):
        q = np.asarray(q)
        B, Hq, T, D = q.shape
        if Hq % self.H:
            raise ValueError("query heads must be a multiple of kv heads")
        n_rep = Hq // self.H
        if self.n_rep is None:
            self.n_rep = n_rep
        flat = to_f32_list(q, "queries")
        if self.nq + T > len(self.keys):
            raise ValueError("the query stream may not lead the key stream")
        for t in range(T):
            for b in range(B):
                for j in range(Hq):
                    h = j // n_rep
                    base = ((b * Hq + j) * T + t) * D
                    for d in range(D):
                        self.qsum[self._idx(b, h, d)] += query_fixed_point(flat[base + d])
            self.nq += 1
            self.count += 1
            if self.nq % self.cfg.R == 0 and self.nq // self.cfg.R - 1 >= self.n_flushed:
                self.snapshots[self.nq // self.cfg.R - 1] = (list(self.qsum), self.count)
        self._flush()

    def _append(self, keys, values, queries=None):
        keys, values = np.asarray(keys), np.asarray(values)
        B, H, T, D = keys.shape
        if self.cfg.tier_mode == "rd":
            rd_check_minimum(self.cfg, B, H, D)   # known from the shape alone (§8.3 step 3)
        kf = to_f32_list(keys, "keys")
        vf = to_f32_list(values, "values")
        if queries is not None:
            to_f32_list(queries, "queries")    # every check before any state changes (§1)
        self.itemsize = keys.dtype.itemsize
        for t in range(T):
            self.keys.append([kf[((b * H + h) * T + t) * D + d]
                              for b in range(B) for h in range(H) for d in range(D)])
            self.values.append([vf[((b * H + h) * T + t) * D + d]
                                for b in range(B) for h in range(H) for d in range(D)])
        if queries is not None:
            self.observe_queries(queries)
        else:
            self._flush()

    # -- structural edits (§9) ------------------------------------------------------------
    def select_batch(self, indices):
        """Keep batch rows `indices` (any order, repeats): every per-(b, h, d) list is rebuilt."""
        HD = self.H * self.D
        idx = [int(i) for i in indices]

        def take(flat):
            return [x for b in idx for x in flat[b * HD:(b + 1) * HD]]

        self.keys = [take(tok) for tok in self.keys]
        self.values = [take(tok) for tok in self.values]
        self.qsum = take(self.qsum)
        self.snapshots = {j: (take(q), c) for j, (q, c) in self.snapshots.items()}
        for blk in self.blocks:
            old_map = blk["tier_map"]
            blk["tier_map"] = take(old_map)
            for w, e in blk["tiers"].items():
                pos = {i: k for k, i in enumerate(e["rows"])}
                rows = [i for i in range(len(idx) * HD) if blk["tier_map"][i] == w]
                src = [pos[idx[i // HD] * HD + i % HD] for i in rows]
                e["rows"] = rows
                for key in ("packed", "scale", "zero", "deq"):
                    if e[key]:
                        e[key] = [e[key][k] for k in src]
        self.value_tokens = {t: (vb, [per[b * self.H + h] for b in idx for h in range(self.H)])
                             for t, (vb, per) in self.value_tokens.items()}
        self.B = len(idx)

    def crop(self, n):
        """Keep the first n tokens: the residual, or whole quantized blocks (§9)."""
        R, total = self.cfg.R, len(self.keys)
        keep = total + n if n < 0 else n
        if keep >= total:
            return
        if keep < self.n_flushed * R:
            if keep % R:
                raise ValueError(f"crop to {keep} tokens would cut a quantized block")
            self.blocks = self.blocks[:keep // R]
            self.n_flushed = keep // R
        self.keys, self.values = self.keys[:keep], self.values[:keep]
        self.value_tokens = {t: v for t, v in self.value_tokens.items() if t < keep}
        self.nq = min(self.nq, keep)                   # the position rewinds; qsum and count stay
        self.snapshots = {j: v for j, v in self.snapshots.items() if (j + 1) * R <= keep}

    # -- flushing ---------------------------------------------------------------------------
    def _flush(self):
        cfg = self.cfg
        while (self.n_flushed + 1) * cfg.R <= len(self.keys):
            j = self.n_flushed
            if cfg.uses_queries and self.nq < (j + 1) * cfg.R:
                break
            self._flush_block(j)
            self.snapshots.pop(j, None)
            self.n_flushed += 1
        # values
        if cfg.value_window == "sliding":
            last = len(self.keys) - cfg.R
        else:
            last = self.n_flushed * cfg.R
        for t in range(len(self.value_tokens), max(last, 0)):
            if cfg.value_window == "block":
                vb = self.blocks[t // cfg.R]["value_bits"]  # rd mode: the block's width
            else:
                vb = cfg.value_bits
            self._quantize_value_token(t, vb)

    def _flush_block(self, j):
        cfg, B, H, D, R = self.cfg, self.B, self.H, self.D, self.cfg.R
        high, mid, low = cfg.tiers
        snap = self.snapshots.get(j)
        if snap is None:   # no query of this block observed: nq == 0 for it (§7 step 5)
            snap = ([0] * (B * H * D), 0)
        tier_map = [0] * (B * H * D)
        cols = {}
        for b in range(B):
            for h in range(H):
                for d in range(D):
                    i = self._idx(b, h, d)
                    cols[i] = [self.keys[t][i] for t in range(j * R, (j + 1) * R)]
        value_bits = cfg.value_bits
        rd_report = None
        if cfg.tier_mode == "rd":
            # §8.3: w_d = I_d for policies that use queries, 1 otherwise
            w = [[[float(relevance(snap[0][self._idx(b, h, d)], snap[1], self.n_rep))
                   if cfg.uses_queries else 1.0 for d in range(D)]
                  for h in range(H)] for b in range(B)]
            keys = [[[cols[self._idx(b, h, d)] for d in range(D)] for h in range(H)]
                    for b in range(B)]
            vals = [[[self.values[t][(b * H + h) * D:(b * H + h + 1) * D]
                      for t in range(j * R, (j + 1) * R)] for h in range(H)]
                    for b in range(B)]
            widths, value_bits, rd_report = rd_allocate(keys, vals, w, cfg, B, H, D)
            for b in range(B):
                for h in range(H):
                    for d in range(D):
                        tier_map[self._idx(b, h, d)] = widths[b][h][d]
        else:
            for b in range(B):
                for h in range(H):
                    A = []
                    for d in range(D):
                        i = self._idx(b, h, d)
                        mn, mx = channel_minmax(cols[i])
                        S = F32(F32(mx - mn) / F32((1 << low) - 1))
                        I = relevance(snap[0][i], snap[1], self.n_rep)
                        if cfg.policy == "query_aware":
                            A.append(F32(I * S))
                        elif cfg.policy == "key_only":
                            A.append(S)
                        elif cfg.policy == "query_only":
                            A.append(I)
                        else:
                            A.append(ZERO32)
                    for d, w_ in enumerate(assign_tiers(A, cfg)):
                        tier_map[self._idx(b, h, d)] = w_
        block = {"tier_map": tier_map, "tiers": {}, "value_bits": value_bits,
                 "rd": rd_report}
        for w in cfg.stored_widths:
            rows = [i for i in range(B * H * D) if tier_map[i] == w]  # (b,h,d) lexicographic
            entry = {"rows": rows, "packed": [], "scale": [], "zero": [], "deq": []}
            for i in rows:
                col = cols[i]
                if w == 16:
                    data = encode_half_row(col, cfg.high_dtype, "keys")
                    entry["packed"].append(data)
                    entry["deq"].append(decode_half_row(data, cfg.high_dtype))
                else:
                    codes, sb, zb, ss, zz = quantize_row(col, w, cfg.G, cfg.meta, "keys", (j, i))
                    data = pack_row(codes, w)
                    entry["packed"].append(data)
                    entry["scale"].append(sb)
                    entry["zero"].append(zb)
                    entry["deq"].append(dequantize_row(unpack_row(data, w, R), ss, zz, cfg.G))
            block["tiers"][w] = entry
        self.blocks.append(block)

    def _quantize_value_token(self, t, vb):
        cfg, D = self.cfg, self.D
        per = []
        for bh in range(self.B * self.H):
            xs = self.values[t][bh * D:(bh + 1) * D]
            codes, sb, zb, ss, zz = quantize_row(xs, vb, cfg.G, cfg.meta, "values", (t, bh))
            data = pack_row(codes, vb)
            per.append((data, sb, zb, dequantize_row(unpack_row(data, vb, D), ss, zz, cfg.G)))
        self.value_tokens[t] = (vb, per)

    # -- outputs ------------------------------------------------------------------------------
    def block_arrays(self, j):
        """Golden-vector style arrays of key block j: tier_map and per-tier arrays."""
        cfg, B, H, D, R = self.cfg, self.B, self.H, self.D, self.cfg.R
        blk = self.blocks[j]
        out = {"tier_map": np.array(blk["tier_map"], np.uint8).reshape(B, H, D)}
        ng = R // cfg.G
        for w, e in blk["tiers"].items():
            n = len(e["rows"])
            if w == 16:
                out[f"w{w}_packed"] = np.frombuffer(b"".join(e["packed"]), np.uint8).reshape(n, 2 * R)
            else:
                out[f"w{w}_packed"] = np.frombuffer(
                    b"".join(e["packed"]), np.uint8).reshape(n, (R * w + 7) // 8)
                bd = cfg.meta.bits_dtype
                out[f"w{w}_scale"] = np.array(e["scale"], bd).reshape(n, ng)
                out[f"w{w}_zero"] = np.array(e["zero"], bd).reshape(n, ng)
        return out

    def value_arrays(self, t0, t1):
        """Per-token value arrays for tokens [t0, t1): packed, scale, zero (raw bits)."""
        cfg, B, H, D = self.cfg, self.B, self.H, self.D
        T = t1 - t0
        vb = self.value_tokens[t0][0]
        assert all(self.value_tokens[t][0] == vb for t in range(t0, t1)), "mixed widths"
        width = (D * vb + 7) // 8
        ng = -(-D // cfg.G)
        packed = np.zeros((B, H, T, width), np.uint8)
        bd = cfg.meta.bits_dtype
        scale = np.zeros((B, H, T, ng), bd)
        zero = np.zeros((B, H, T, ng), bd)
        for t in range(t0, t1):
            for bh in range(B * H):
                data, sb, zb, _ = self.value_tokens[t][1][bh]
                b, h = divmod(bh, H)
                packed[b, h, t - t0] = np.frombuffer(data, np.uint8)
                scale[b, h, t - t0] = sb
                zero[b, h, t - t0] = zb
        return {"packed": packed, "scale": scale, "zero": zero}

    def dequantized(self):
        """(keys, values) float32 of shape (B, H, T, D): quantized tokens dequantized,
        residual tokens as their float32 upcast."""
        B, H, D, R = self.B, self.H, self.D, self.cfg.R
        T = len(self.keys)
        K = [[float(v) for v in tok] for tok in self.keys]
        V = [[float(v) for v in tok] for tok in self.values]
        for j, blk in enumerate(self.blocks):
            for e in blk["tiers"].values():
                for i, row in zip(e["rows"], e["deq"]):
                    for r, v in enumerate(row):
                        K[j * R + r][i] = float(v)
        for t, (_, per) in self.value_tokens.items():
            for bh, (_, _, _, deq) in enumerate(per):
                for d, v in enumerate(deq):
                    V[t][bh * D + d] = float(v)
        k = np.array(K, np.float32).reshape(T, B, H, D).transpose(1, 2, 0, 3)
        v = np.array(V, np.float32).reshape(T, B, H, D).transpose(1, 2, 0, 3)
        return np.ascontiguousarray(k), np.ascontiguousarray(v)

    def nominal_bits(self) -> float:
        """§9: code bits (16 for a 16-bit channel) per quantized K/V element."""
        R, BHD = self.cfg.R, self.B * self.H * self.D
        bits = sum(sum(blk["tier_map"]) * R for blk in self.blocks)
        elements = len(self.blocks) * BHD * R
        for vb, _ in self.value_tokens.values():
            bits += BHD * vb
            elements += BHD
        return bits / elements if elements else 0.0

    def bits_per_element(self) -> float:
        """§9: 8 * nbytes / (number of K and V elements)."""
        n = 2 * self.B * self.H * len(self.keys) * self.D
        return 8.0 * self.nbytes(self.itemsize or 0) / n if n else 0.0

    def nbytes(self, input_itemsize: int) -> int:
        """§9 accounting: every array the cache holds (the residual in the input dtype)."""
        cfg, B, H, D, R = self.cfg, self.B, self.H, self.D, self.cfg.R
        m = cfg.meta_bytes
        total = 0
        for blk in self.blocks:
            total += B * H * D  # tier map, uint8
            for w, e in blk["tiers"].items():
                n = len(e["rows"])
                if w == 16:
                    total += n * 2 * R
                else:
                    total += n * ((R * w + 7) // 8) + 2 * n * (R // cfg.G) * m
        for vb, _ in self.value_tokens.values():
            total += B * H * (((D * vb + 7) // 8) + 2 * (-(-D // cfg.G)) * m)
        T, nv = len(self.keys), len(self.value_tokens)
        total += (T - self.n_flushed * R) * B * H * D * input_itemsize   # key residual
        total += (T - nv) * B * H * D * input_itemsize                   # value residual
        if self.count > 0:
            total += B * H * D * 8                                        # qsum, int64
        total += len(self.snapshots) * B * H * D * 8      # snapshots of unflushed blocks
        return total


# ---------------------------------------------------------------------------------------
# Golden-vector driver (§10): one case of tests/vectors/v1 -> its outputs, by this port
# ---------------------------------------------------------------------------------------

LEGACY_STREAM = "one append(keys, values, queries) of all tokens"


class ExpectationFailed(AssertionError):
    """An expected rejection (§10 `expect` / `expect_error`) did not happen as stated."""


def expect_error(expect, call):
    try:
        call()
    except ExpectationFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - compared by name below
        if type(exc).__name__ != expect["type"] or not all(m in str(exc) for m in expect["match"]):
            raise ExpectationFailed(f"expected {expect}, got {exc!r}") from exc
        return
    raise ExpectationFailed(f"expected {expect}; nothing was raised")


def run_stream_op(cache, op, inputs):
    def rows(name, start, stop):
        a = inputs[name][:, :, start:stop]
        if "batch" in op:
            a = a[np.asarray(op["batch"], dtype=np.int64)]
        return a

    def act():
        kind = op["op"]
        if kind == "append":
            q = rows(op.get("queries_input", "queries"), op["start"], op["stop"]) if op["queries"] else None
            cache.append(rows(op.get("keys", "keys"), op["start"], op["stop"]),
                         rows(op.get("values", "values"), op["start"], op["stop"]), q)
        elif kind == "observe_queries":
            cache.observe_queries(rows(op.get("queries_input", "queries"), op["start"], op["stop"]))
        elif kind == "crop":
            cache.crop(op["n"])
        elif kind == "select_batch":
            cache.select_batch(op["indices"])
        else:
            raise ValueError(f"unknown stream operation {kind!r}")

    if "expect_error" in op:
        expect_error(op["expect_error"], act)
    else:
        act()


def cache_outputs(cache):
    """The §10 cache outputs of the port's current state (names without `out_`)."""
    cfg, R = cache.cfg, cache.cfg.R
    out = {}
    for j in range(len(cache.blocks)):
        for key, arr in cache.block_arrays(j).items():
            out[f"block{j}_{key}"] = arr
    n_values = len(cache.value_tokens)
    if cfg.value_window == "sliding":
        spans = [(0, n_values)] if n_values else []
    else:
        spans = [(j * R, (j + 1) * R) for j in range(n_values // R)]
    for i, (t0, t1) in enumerate(spans):
        for key, arr in cache.value_arrays(t0, t1).items():
            out[f"values{i}_{key}"] = arr
    if cache.keys:
        out["dequantized_keys"], out["dequantized_values"] = cache.dequantized()
    out["nbytes"] = np.array(cache.nbytes(cache.itemsize or 0), np.int64)
    return out


def run_case(case, inputs):
    """Outputs of one manifest case (a dict of arrays named as in the npz, without `out_`).
    Raises ExpectationFailed when an expected rejection does not happen as stated."""
    kind, p = case["kind"], case["params"]
    if kind == "pack":
        return {"packed": pack(inputs["codes"], p["bits"])}
    if kind == "quantize":
        r = quantize_rows(inputs["x"], p["bits"], p["group_size"], p["meta_dtype"],
                          out_dtype=p.get("out_dtype", "float32"))
        return {k: r[k] for k in ("packed", "scale", "zero", "dequantized")}
    if kind == "half":
        return half_rows(inputs["x"], p["high_dtype"])
    if kind == "error":
        inner = {k: v for k, v in p.items() if k != "call"}
        expect_error(case["expect"], lambda: run_case({**case, "kind": p["call"], "params": inner}, inputs))
        return {}
    assert kind == "cache", kind
    cfg = PortConfig(**case["config"])
    K = inputs["keys"]
    B, H, _, D = K.shape
    cache = PortCache(cfg, B, H, D)
    stream = case["stream"]
    if stream == LEGACY_STREAM:
        cache.append(K, inputs["values"], inputs["queries"])
        return cache_outputs(cache)
    trace = {"nbytes": [], "seq_len": [], "nominal_bits": [], "bits_per_element": []}
    for op in stream:
        run_stream_op(cache, op, inputs)
        trace["nbytes"].append(cache.nbytes(cache.itemsize or 0))
        trace["seq_len"].append(len(cache.keys))
        trace["nominal_bits"].append(cache.nominal_bits())
        trace["bits_per_element"].append(cache.bits_per_element())
    out = cache_outputs(cache)
    out["trace_nbytes"] = np.array(trace["nbytes"], np.int64)
    out["trace_seq_len"] = np.array(trace["seq_len"], np.int64)
    out["trace_nominal_bits"] = np.array(trace["nominal_bits"], np.float64)
    out["trace_bits_per_element"] = np.array(trace["bits_per_element"], np.float64)
    return out


def mismatches(got, expected):
    """Names of outputs that differ in presence, dtype, shape or bytes."""
    bad = []
    for key in sorted(set(got) | set(expected)):
        g, e = got.get(key), expected.get(key)
        if g is None or e is None:
            bad.append(key)
            continue
        g, e = np.asarray(g), np.asarray(e)
        if g.dtype != e.dtype or g.shape != e.shape or g.tobytes() != e.tobytes():
            bad.append(key)
    return bad
