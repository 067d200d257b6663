// Native CPU kernels of the mixkvq format: quantize + pack, unpack + dequantize, the key
// block encode, and fused decode attention over the packed cache (docs/numerics.md,
// docs/cpu.md).
//
// The scalar numerics are mixkvq_common.cuh, the very functions the CUDA kernels use,
// compiled as C++ through mixkvq_host.h: one definition of every rounding step for both
// engines. Built by backends/cpu/build.py with -ffp-contract=off (no FMA contraction) and
// without -ffast-math, so every float operation is the IEEE operation the spec names; the
// loops are written so that the compiler vectorises them under those rules (division,
// round-to-nearest-even, compares and selects vectorise exactly; nothing is reassociated).
// The one exception is the fused attention, which is not stored bytes: its dot products and
// weighted sums are explicit fused multiply-adds in a fixed order (docs/cpu.md).
//
// Threads: OpenMP over independent rows (quantization) or over (KV head, token split)
// tasks (attention); every thread writes disjoint outputs, so results do not depend on
// the thread count. Errors are reported, never raised: the caller (Python) turns the
// first bad index into the shared validation message.
#include "mixkvq_host.h"
#include "mixkvq_common.cuh"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

typedef long long i64;
typedef unsigned char u8;
typedef unsigned short u16;

static const float NEG_INF = -INFINITY;

// Metadata element i -> float32. The float16 -> float32 conversion is exact, so the F16C
// instruction gives the same bits as the software conversion of mixkvq_host.h.
static inline float meta_at(const void* base, i64 i, int kind) {
#ifdef __F16C__
    if (kind == MIXKVQ_KIND_F16) return _cvtsh_ss(((const u16*)base)[i]);
#endif
    return mixkvq_load_meta(base, i, kind);
}

// ---- element loads ---------------------------------------------------------------------------
static inline float load_elem(const void* x, i64 i, int kind) {
    if (kind == MIXKVQ_KIND_F32) return ((const float*)x)[i];
    return mixkvq_half_to_f32(((const u16*)x)[i], kind);
}

// n elements x[base + k*stride] (any input kind) -> float32 buf (exact upcast, §1).
static inline void gather_f32(const void* x, int kind, i64 base, i64 stride, int n, float* buf) {
    if (kind == MIXKVQ_KIND_F32) {
        const float* p = (const float*)x + base;
        for (int k = 0; k < n; ++k) buf[k] = p[k * stride];
    } else if (kind == MIXKVQ_KIND_BF16) {
        const u16* p = (const u16*)x + base;
        for (int k = 0; k < n; ++k) buf[k] = __uint_as_float((unsigned)p[k * stride] << 16);
    } else {
        const u16* p = (const u16*)x + base;
        int k = 0;
#ifdef __F16C__
        // float16 -> float32 is exact: the F16C instruction gives the software conversion's bits
        if (stride == 1)
            for (; k + 8 <= n; k += 8)
                _mm256_storeu_ps(buf + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + k))));
#endif
        for (; k < n; ++k) buf[k] = mixkvq_f16_bits_to_f32(p[k * stride]);
    }
}

// ---- §5 packing --------------------------------------------------------------------------------
// codes (n, zero-padded to a multiple of 8) -> ceil(n*bits/8) bytes, LSB first.
static inline void pack_row(const u8* codes, int n, int bits, u8* out) {
    int rb = (n * bits + 7) / 8;
    switch (bits) {
        case 8:
            for (int k = 0; k < n; ++k) out[k] = codes[k];
            return;
        case 4:
            for (int k = 0; k < rb; ++k) out[k] = (u8)(codes[2 * k] | (codes[2 * k + 1] << 4));
            return;
        case 2:
            for (int k = 0; k < rb; ++k)
                out[k] = (u8)(codes[4 * k] | (codes[4 * k + 1] << 2) | (codes[4 * k + 2] << 4) | (codes[4 * k + 3] << 6));
            return;
        case 1:
            for (int k = 0; k < rb; ++k) {
                const u8* c = codes + 8 * k;
                out[k] = (u8)(c[0] | (c[1] << 1) | (c[2] << 2) | (c[3] << 3) | (c[4] << 4) | (c[5] << 5) | (c[6] << 6) | (c[7] << 7));
            }
            return;
        default: {
            unsigned long long acc = 0;
            int nb = 0, o = 0;
            for (int i = 0; i < n; ++i) {
                acc |= (unsigned long long)codes[i] << nb;
                nb += bits;
                while (nb >= 8) {
                    out[o++] = (u8)(acc & 0xFFu);
                    acc >>= 8;
                    nb -= 8;
                }
            }
            if (nb > 0) out[o++] = (u8)(acc & 0xFFu);
        }
    }
}

// ceil(n*bits/8) bytes -> n codes (buffer holds n rounded up to a multiple of 8).
static inline void unpack_row(const u8* in, int n, int bits, u8* codes) {
    int rb = (n * bits + 7) / 8;
    switch (bits) {
        case 8:
            for (int k = 0; k < n; ++k) codes[k] = in[k];
            return;
        case 4:
            for (int k = 0; k < rb; ++k) {
                codes[2 * k] = in[k] & 15u;
                codes[2 * k + 1] = in[k] >> 4;
            }
            return;
        case 2:
            for (int k = 0; k < rb; ++k) {
                u8 b = in[k];
                codes[4 * k] = b & 3u;
                codes[4 * k + 1] = (b >> 2) & 3u;
                codes[4 * k + 2] = (b >> 4) & 3u;
                codes[4 * k + 3] = b >> 6;
            }
            return;
        case 1:
            for (int k = 0; k < rb; ++k)
                for (int j = 0; j < 8; ++j) codes[8 * k + j] = (in[k] >> j) & 1u;
            return;
        default:
            for (int i = 0; i < n; ++i) codes[i] = (u8)mixkvq_read_code(in, i, bits, rb);
    }
}

// §2 round_meta(v) stored at element i (mixkvq_store_meta); for float16 the F16C
// instruction with round-to-nearest-even (imm 0), which is the IEEE conversion the
// software version computes, overflow to Inf and subnormals included.
static inline float store_meta(void* base, i64 i, int kind, float v, bool* inf) {
#ifdef __F16C__
    if (kind == MIXKVQ_KIND_F16) {
        u16 h = (u16)_cvtss_sh(v, 0);
        ((u16*)base)[i] = h;
        *inf = (h & 0x7FFFu) == 0x7C00u;
        return _cvtsh_ss(h);
    }
#endif
    return mixkvq_store_meta(base, i, kind, v, inf);
}

// Smallest and largest of m finite floats. Lane-wise accumulators so the loop vectorises;
// min/max of finite values do not depend on the order, except which zero of -0/+0 is
// kept, and §3 adds +0 to both results, which makes either zero +0.
static inline void group_min_max(const float* p, int m, float* mn_out, float* mx_out) {
    enum { LANES = 16 };
    float mn = p[0], mx = p[0];
    int i = 1;
    if (m >= 2 * LANES) {
        float a[LANES], b[LANES];
        for (int k = 0; k < LANES; ++k) a[k] = b[k] = p[k];
        for (i = LANES; i + LANES <= m; i += LANES)
            for (int k = 0; k < LANES; ++k) {
                float v = p[i + k];
                a[k] = v < a[k] ? v : a[k];
                b[k] = v > b[k] ? v : b[k];
            }
        for (int k = 0; k < LANES; ++k) {
            mn = a[k] < mn ? a[k] : mn;
            mx = b[k] > mx ? b[k] : mx;
        }
    }
    for (; i < m; ++i) {
        float v = p[i];
        mn = v < mn ? v : mn;
        mx = v > mx ? v : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
}

// ---- §3 quantization of one row ---------------------------------------------------------------
// x float32 (n) -> packed (row_bytes), scale/zero (ng) at element meta0 of buffers stored as
// meta_kind. Returns 0, or the first bad group of this row as 1 + 2*j + (code - 1): code 1 a
// metadata overflow (§2), code 2 a range overflow (§3 step 4); a row reports its first
// metadata overflow if it has one, else its first range overflow.
static inline i64 quant_row(const float* x, int n, int G, int bits, int meta_kind, void* scale, void* zero,
                            i64 meta0, u8* packed, u8* codes) {
    const float L = (float)((1 << bits) - 1);
    int ng = (n + G - 1) / G;
    i64 first1 = -1, first2 = -1;
    for (int j = 0; j < ng; ++j) {
        const float* p = x + (i64)j * G;
        int m = n - j * G < G ? n - j * G : G;
        float mn, mx;
        group_min_max(p, m, &mn, &mx);
        mn = __fadd_rn(mn, 0.0f);  // -0 -> +0
        mx = __fadd_rn(mx, 0.0f);
        float scale32 = __fdiv_rn(__fsub_rn(mx, mn), L);
        bool inf_s, inf_z;
        float s = store_meta(scale, meta0 + j, meta_kind, scale32, &inf_s);
        float z = store_meta(zero, meta0 + j, meta_kind, mn, &inf_z);
        float top = __fadd_rn(__fmul_rn(s, L), z);
        if (inf_s || inf_z) {
            if (first1 < 0) first1 = j;
        } else if ((__float_as_uint(top) & 0x7FFFFFFFu) >= 0x7F800000u) {
            if (first2 < 0) first2 = j;
        }
        u8* c = codes + j * G;
        if (s == 0.0f) {
            for (int i = 0; i < m; ++i) c[i] = 0;
        } else {
            for (int i = 0; i < m; ++i) {  // §3 step 5: rint((x - z) / s), clamped to [0, L]
                float t = rintf(__fdiv_rn(__fsub_rn(p[i], z), s));
                t = t < 0.0f ? 0.0f : t;
                t = t > L ? L : t;
                c[i] = (u8)(int)t;
            }
        }
    }
    for (int i = n; i < ((n + 7) & ~7); ++i) codes[i] = 0;
    pack_row(codes, n, bits, packed);
    if (first1 >= 0) return 1 + 2 * first1;
    if (first2 >= 0) return 2 + 2 * first2;
    return 0;
}

// The first bad (row, group) over rows, metadata overflow before range overflow, as
// flat indices row*ng + j; threads fold their own minima in.
struct BadIndex {
    i64 meta = -1, range = -1;
    void add(i64 flat, int code) {
        i64& slot = code == 1 ? meta : range;
        if (slot < 0 || flat < slot) slot = flat;
    }
    void merge(const BadIndex& o) {
        if (o.meta >= 0) add(o.meta, 1);
        if (o.range >= 0) add(o.range, 2);
    }
};

// Threads for a parallel region over `items` work items touching `elements` elements in all:
// one when there is one item, or too little work to pay for waking a second thread — a
// parallel region costs microseconds on idle cores but milliseconds when other processes hold
// them (a decode step's value dry run is 192 elements). No result depends on the thread count.
static const i64 MIN_PARALLEL_ELEMENTS = 1 << 14;
static inline int threads_for(int n_threads, i64 items, i64 elements) {
    if (n_threads < 1) n_threads = 1;
    return items < 2 || elements < MIN_PARALLEL_ELEMENTS ? 1 : n_threads;
}

extern "C" {

int mkq_abi_version() { return 2; }

// §3 + §5 along the last axis: x (rows, n) of in_kind -> packed (rows, rb), scale/zero
// (rows, ng) stored as meta_kind. bad[0] / bad[1]: first flat (row*ng + j) group with a
// metadata / range overflow, or -1.
void mkq_quantize(const void* x, int in_kind, i64 rows, int n, int G, int bits, int meta_kind, void* scale,
                  void* zero, u8* packed, i64* bad, int n_threads) {
    int ng = (n + G - 1) / G, rb = (n * bits + 7) / 8;
    BadIndex total;
#pragma omp parallel num_threads(threads_for(n_threads, rows, rows * n))
    {
        std::vector<float> buf(n);
        std::vector<u8> codes(((n + 7) & ~7) + 8);
        BadIndex mine;
#pragma omp for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
            const float* row;
            if (in_kind == MIXKVQ_KIND_F32) {
                row = (const float*)x + r * n;
            } else {
                gather_f32(x, in_kind, r * n, 1, n, buf.data());
                row = buf.data();
            }
            i64 b = quant_row(row, n, G, bits, meta_kind, scale, zero, r * ng, packed + r * rb, codes.data());
            if (b) mine.add(r * ng + (b - 1) / 2, (int)((b - 1) % 2) + 1);
        }
#pragma omp critical
        total.merge(mine);
    }
    bad[0] = total.meta;
    bad[1] = total.range;
}

// §4 along the last axis: packed (rows, rb) + scale/zero (rows, ng) -> out (rows, n) as
// out_kind (float32; float16 / bfloat16 saturated to the largest finite value, then rounded).
void mkq_dequantize(const u8* packed, const void* scale, const void* zero, int meta_kind, i64 rows, int n, int G,
                    int bits, int out_kind, void* out, int n_threads) {
    int ng = (n + G - 1) / G, rb = (n * bits + 7) / 8;
    const float lim = out_kind == MIXKVQ_KIND_F16 ? MIXKVQ_FLOAT16_MAX : __uint_as_float(0x7F7F0000u);
#pragma omp parallel num_threads(threads_for(n_threads, rows, rows * n))
    {
        std::vector<u8> codes(((n + 7) & ~7) + 8);
        std::vector<float> y(n);
#pragma omp for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
            unpack_row(packed + r * rb, n, bits, codes.data());
            for (int j = 0; j < ng; ++j) {
                float s = mixkvq_load_meta(scale, r * ng + j, meta_kind);
                float z = mixkvq_load_meta(zero, r * ng + j, meta_kind);
                int i1 = (j + 1) * G < n ? (j + 1) * G : n;
                for (int i = j * G; i < i1; ++i) y[i] = __fadd_rn(__fmul_rn((float)codes[i], s), z);
            }
            if (out_kind == MIXKVQ_KIND_F32) {
                float* o = (float*)out + r * n;
                for (int i = 0; i < n; ++i) o[i] = y[i];
            } else {
                u16* o = (u16*)out + r * n;
                for (int i = 0; i < n; ++i) {
                    float v = y[i] < -lim ? -lim : (y[i] > lim ? lim : y[i]);
                    o[i] = mixkvq_f32_to_half(v, out_kind);
                }
            }
        }
    }
}

// §5 on given codes (rows, n) -> (rows, rb), and back.
void mkq_pack(const u8* codes, i64 rows, int n, int bits, u8* packed, int n_threads) {
    int rb = (n * bits + 7) / 8;
    const u8 mask = (u8)((1u << bits) - 1u);
#pragma omp parallel num_threads(threads_for(n_threads, rows, rows * n))
    {
        std::vector<u8> c(((n + 7) & ~7) + 8, 0);
#pragma omp for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
            for (int i = 0; i < n; ++i) c[i] = codes[r * n + i] & mask;
            pack_row(c.data(), n, bits, packed + r * rb);
        }
    }
}

void mkq_unpack(const u8* packed, i64 rows, int n, int bits, u8* codes, int n_threads) {
    int rb = (n * bits + 7) / 8;
#pragma omp parallel num_threads(threads_for(n_threads, rows, rows * n))
    {
        std::vector<u8> c(((n + 7) & ~7) + 8);
#pragma omp for schedule(static)
        for (i64 r = 0; r < rows; ++r) {
            unpack_row(packed + r * rb, n, bits, c.data());
            for (int i = 0; i < n; ++i) codes[r * n + i] = c[i];
        }
    }
}

// §6 one key block in one call: keys (B, H, R, D) of in_kind, tier_map (B, H, D) ->
// for every width w of the map, rows in (b, h, d) order: out[3*w + 0] packed (N_w, rb_w)
// (16-bit rows: N_w x R little-endian words), out[3*w + 1 / 2] scale / zero (N_w, R/G).
// bad[2*w + 0 / 1]: first flat index with a metadata / range overflow within width w's
// arrays (16-bit rows: element row*R + t that overflows high_kind), or -1.
void mkq_encode_key_block(const void* keys, int in_kind, int B, int H, int R, int D, const u8* tier_map, int G,
                          int meta_kind, int high_kind, void* const* out, i64* bad, int n_threads) {
    i64 channels = (i64)B * H * D;
    int ng = R / G;
    std::vector<int> row_of(channels);
    i64 count[MIXKVQ_TIER_SLOTS] = {0};
    for (i64 c = 0; c < channels; ++c) row_of[c] = (int)count[tier_map[c]]++;
    BadIndex total[MIXKVQ_TIER_SLOTS];
#pragma omp parallel num_threads(threads_for(n_threads, channels, channels * R))
    {
        std::vector<float> buf(R);
        std::vector<u8> codes(((R + 7) & ~7) + 8);
        BadIndex mine[MIXKVQ_TIER_SLOTS];
        bool any = false;
#pragma omp for schedule(static)
        for (i64 c = 0; c < channels; ++c) {
            int w = tier_map[c];
            if (!out[3 * w]) continue;  // a width the caller did not ask for
            i64 bh = c / D;
            int d = (int)(c % D);
            gather_f32(keys, in_kind, bh * R * D + d, D, R, buf.data());
            i64 row = row_of[c];
            if (w == MIXKVQ_HIGH_BITS) {
                u16* words = (u16*)out[3 * w] + row * R;
                for (int t = 0; t < R; ++t) {
                    u16 h = mixkvq_f32_to_half(buf[t], high_kind);
                    words[t] = h;
                    if (mixkvq_half_is_inf(h, high_kind)) {
                        mine[w].add(row * R + t, 1);
                        any = true;
                    }
                }
            } else {
                int rb = (R * w + 7) / 8;
                i64 b = quant_row(buf.data(), R, G, w, meta_kind, out[3 * w + 1], out[3 * w + 2], row * ng,
                                  (u8*)out[3 * w] + row * rb, codes.data());
                if (b) {
                    mine[w].add(row * ng + (b - 1) / 2, (int)((b - 1) % 2) + 1);
                    any = true;
                }
            }
        }
        if (any) {
#pragma omp critical
            for (int w = 0; w < MIXKVQ_TIER_SLOTS; ++w) total[w].merge(mine[w]);
        }
    }
    for (int w = 0; w < MIXKVQ_TIER_SLOTS; ++w) {
        bad[2 * w] = total[w].meta;
        bad[2 * w + 1] = total[w].range;
    }
}

// §7 steps 1-3, summed over token segments: element (b, j, t, d) of q (query head j, any
// input kind) at b*sb + j*sh + t*st + d (d contiguous) -> out int64 (B, H, n_seg, D), the
// sum over tokens [bounds[s], bounds[s+1]) and the n_rep query heads j of KV head j / n_rep
// of min(rint(fl32(|q| * 2^16)), 2^40). Integer sums: every order gives the same bits, so
// tasks are (b, segment, KV head) in any split. bad[0]: the first flat index
// ((b*Hq + j)*T + t)*D + d of a NaN (whose value the spec leaves undefined), or -1.
void mkq_query_segment_sums(const void* q, int in_kind, int B, int Hq, i64 T, int D, i64 sb, i64 sh, i64 st,
                            int n_rep, const i64* bounds, int n_seg, i64* out, i64* bad, int n_threads) {
    const int H = Hq / n_rep;
    const i64 tasks = (i64)B * n_seg * H;
    i64 first_nan = -1;
#pragma omp parallel num_threads(threads_for(n_threads, tasks, (i64)B * T * Hq * D))
    {
        std::vector<float> buf(D);
        i64 mine = -1;
#pragma omp for schedule(dynamic, 1)
        for (i64 task = 0; task < tasks; ++task) {
            int h = (int)(task % H);
            i64 s = (task / H) % n_seg, b = task / ((i64)H * n_seg);
            i64* acc = out + ((b * H + h) * n_seg + s) * D;
            for (int d = 0; d < D; ++d) acc[d] = 0;
            for (i64 t = bounds[s]; t < bounds[s + 1]; ++t) {
                for (int r = 0; r < n_rep; ++r) {
                    int j = h * n_rep + r;
                    gather_f32(q, in_kind, b * sb + j * sh + t * st, 1, D, buf.data());
                    bool nan = false;
                    for (int d = 0; d < D; ++d) {
                        float m = fabsf(buf[d]) * MIXKVQ_FIXED_ONE;  // exact, or Inf on overflow
                        float f = rintf(m);
                        f = f < MIXKVQ_FIXED_MAX ? f : MIXKVQ_FIXED_MAX;  // Inf -> 2^40
                        acc[d] += (i64)f;
                        nan |= buf[d] != buf[d];
                    }
                    if (nan) {
                        for (int d = 0; d < D; ++d)
                            if (buf[d] != buf[d]) {
                                i64 idx = ((b * Hq + j) * T + t) * D + d;
                                if (mine < 0 || idx < mine) mine = idx;
                                break;
                            }
                    }
                }
            }
        }
        if (mine >= 0) {
#pragma omp critical
            if (first_nan < 0 || mine < first_nan) first_nan = mine;
        }
    }
    bad[0] = first_nan;
}

}  // extern "C"

// ---- fused decode attention ------------------------------------------------------------------------
// exp(x) for x <= 0 (scores minus their running max): Cody-Waite reduction x = n ln2 + r,
// a degree-7 Taylor polynomial for e^r on |r| <= ln2/2, the power of two put in the exponent
// bits. Relative error < 2 float32 ulp, inside the few-u term docs/conformance.md allows
// for exp; below -87.3 (e^x under the normal range) it returns 0, which the tolerance's
// subnormal term covers. Written without calls or branches so loops over it vectorise.
static inline float exp_nonpos(float x) {
    const float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
    float xc = x < -87.3f ? -87.3f : x;
    float n = rintf(__fmul_rn(xc, log2e));
    float r = __fsub_rn(__fsub_rn(xc, __fmul_rn(n, ln2_hi)), __fmul_rn(n, ln2_lo));
    float p = 1.98412698e-4f;
    p = __fadd_rn(__fmul_rn(p, r), 1.3888889e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 8.3333333e-3f);
    p = __fadd_rn(__fmul_rn(p, r), 4.1666667e-2f);
    p = __fadd_rn(__fmul_rn(p, r), 1.6666667e-1f);
    p = __fadd_rn(__fmul_rn(p, r), 0.5f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    p = __fadd_rn(__fmul_rn(p, r), 1.0f);
    int e = (int)n + 127;
    float two_n = __int_as_float(e << 23);
    float y = __fmul_rn(p, two_n);
    return x < -87.3f ? 0.0f : y;
}

namespace {

struct AttnArgs {
    const float* q;
    int B, H, n_rep, Tq, D;
    i64 T;
    float scale;
    int causal;
    const u8* mask;  // (B, Tq, T), 1 = may attend; null: none
    i64 window;      // > 0: query at p sees only positions > p - window (sliding layers)
    float softcap;   // > 0: scores become softcap * tanh(score / softcap) (Gemma 2)
    int nkb, R, G, meta_kind, high_kind;
    const u8* const* tier_maps;      // nkb x (B, H, D)
    const void* const* kptr;         // nkb x TIER_SLOTS x 3
    const void* res_k;
    int res_k_kind;
    i64 rk;
    int nvc;
    const i64* vchunk;               // nvc x (start, n, bits)
    const void* const* vptr;         // nvc x 3
    const void* res_v;
    int res_v_kind;
    i64 rv;
};

// ---- vector tiles -----------------------------------------------------------------------------
// The attention works on tiles of VW lanes: VW tokens of one key channel (scores), VW channels
// of one value row (outputs). GCC vector types: one AVX-512 register here, two AVX2 or four
// SSE registers elsewhere, the same lanes. Attention is not stored bytes, so its dot products
// and weighted sums use fused multiply-adds (docs/conformance.md's tolerance bounds any
// order and any rounding of those sums); every lane does what the scalar fallback does, so
// the result does not depend on the ISA, and the order is fixed, so it does not depend on the
// thread count. Dequantization stays §4's multiply, then add: the keys and values attended to
// are the decoded ones bit for bit.
constexpr int VW = 16;
typedef float vf __attribute__((vector_size(VW * 4)));
typedef int vi __attribute__((vector_size(VW * 4)));
typedef unsigned vu __attribute__((vector_size(VW * 4)));
typedef unsigned char v16u8 __attribute__((vector_size(16)));
typedef unsigned short v16u16 __attribute__((vector_size(32)));
static_assert(VW == 16, "the code loaders below are written for 16 lanes");

// (not vf{} + x: without fast-math that is a real addition of +0)
static inline vf vbroadcast(float x) { return vf{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
static inline vu vbroadcast_u(unsigned x) { return vu{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }

static inline vf vfma(vf a, vf b, vf c) {  // a * b + c, one rounding per lane
#if defined(__AVX512F__)
    return (vf)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#elif defined(__FMA__)
    typedef float v8f __attribute__((vector_size(32)));
    v8f lo = (v8f)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7),
                                  (__m256)__builtin_shufflevector(b, b, 0, 1, 2, 3, 4, 5, 6, 7),
                                  (__m256)__builtin_shufflevector(c, c, 0, 1, 2, 3, 4, 5, 6, 7));
    v8f hi = (v8f)_mm256_fmadd_ps((__m256)__builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15),
                                  (__m256)__builtin_shufflevector(b, b, 8, 9, 10, 11, 12, 13, 14, 15),
                                  (__m256)__builtin_shufflevector(c, c, 8, 9, 10, 11, 12, 13, 14, 15));
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
#else
    vf r;
    for (int i = 0; i < VW; ++i) r[i] = fmaf(a[i], b[i], c[i]);
    return r;
#endif
}

// sum of the lanes, pairwise halving (a fixed order)
static inline float vsum(vf x) {
    typedef float v8f __attribute__((vector_size(32)));
    typedef float v4f __attribute__((vector_size(16)));
    v8f h = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f g = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (g[0] + g[2]) + (g[1] + g[3]);
}

// 16 codes of BITS bits, LSB first from the byte p (the tile starts on a byte: 16·BITS bits)
template <int BITS>
static inline vu codes16(const u8* p);
template <>
inline vu codes16<1>(const u8* p) {
    unsigned short w;
    memcpy(&w, p, 2);
    const vu sh = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    return (vbroadcast_u(w) >> sh) & 1u;
}
template <>
inline vu codes16<2>(const u8* p) {
    unsigned w;
    memcpy(&w, p, 4);
    const vu sh = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    return (vbroadcast_u(w) >> sh) & 3u;
}
template <>
inline vu codes16<4>(const u8* p) {
    const vu sh = {0, 4, 8, 12, 16, 20, 24, 28, 0, 4, 8, 12, 16, 20, 24, 28};
#if defined(__AVX512F__)
    // one 8-byte load, its two words spread over the lanes by one permute (a vector built from
    // two scalars, or widened from 16 bytes, goes through the stack: a store-forwarding stall)
    const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const vu w = (vu)_mm512_permutexvar_epi32(idx, _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i*)p)));
#else
    unsigned lo, hi;
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 4);
    const vu w = {lo, lo, lo, lo, lo, lo, lo, lo, hi, hi, hi, hi, hi, hi, hi, hi};
#endif
    return (w >> sh) & 15u;
}
template <>
inline vu codes16<8>(const u8* p) {
    v16u8 b;
    memcpy(&b, p, 16);
    return __builtin_convertvector(b, vu);
}

// n <= 16 codes of any width from code index `first` of a row of rb bytes; lanes >= n are 0
static inline vu codes_any(const u8* row, i64 first, int n, int bits, int rb) {
    vu c{};
    for (int i = 0; i < n; ++i) c[i] = mixkvq_read_code(row, first + i, bits, rb);
    return c;
}

static inline vf dequant16(vu codes, vf sc, vf z) {  // §4: fl(fl(c * s) + z)
    return __builtin_convertvector((vi)codes, vf) * sc + z;
}

// n <= 16 elements of a 16-bit row (bfloat16 or float16 bits) -> float32 (exact); lanes >= n are 0
static inline vf half16(const u16* p, int n, int kind) {
    if (n == VW && kind == MIXKVQ_KIND_BF16) {
        v16u16 h;
        memcpy(&h, p, 32);
        return (vf)(__builtin_convertvector(h, vu) << 16);
    }
#if defined(__AVX512F__)
    if (n == VW) return (vf)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#endif
    vf x{};
    for (int i = 0; i < n; ++i)
        x[i] = kind == MIXKVQ_KIND_BF16 ? __uint_as_float((unsigned)p[i] << 16) : mixkvq_f16_bits_to_f32(p[i]);
    return x;
}

// n <= 16 elements of a full-precision row of any input kind -> float32; lanes >= n are 0
static inline vf load16(const void* x, int kind, i64 base, int n) {
    if (kind != MIXKVQ_KIND_F32) return half16((const u16*)x + base, n, kind);
    vf v{};
    if (n == VW) memcpy(&v, (const float*)x + base, 64);
    else
        for (int i = 0; i < n; ++i) v[i] = ((const float*)x)[base + i];
    return v;
}

// n metadata elements [i0, i0 + n) -> float32 (exact; F16C 8 at a time for float16)
static inline void meta_block(const void* base, i64 i0, i64 n, int kind, float* out) {
    i64 i = 0;
#ifdef __F16C__
    if (kind == MIXKVQ_KIND_F16)
        for (const u16* p = (const u16*)base + i0; i + 8 <= n; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
    for (; i < n; ++i) out[i] = meta_at(base, i0 + i, kind);
}

// One key block of one KV head, its channels ordered by width (narrowest first, channel order
// within a width) — the order its channels enter every score.
struct KeyBlockRows {
    int n_runs = 0;
    int run_bits[MIXKVQ_TIER_SLOTS];
    int run_end[MIXKVQ_TIER_SLOTS];
    std::vector<int> channel;          // (D,) channel of each entry
    std::vector<const u8*> row;        // (D,) packed row (16-bit: its u16 words)
    std::vector<float> scale, zero;    // (D, R / G) per-group metadata as float32

    void load(const AttnArgs& a, const u8* tm, const int* ri, const void* const* kp) {
        const int D = a.D, R = a.R, ng = R / a.G;
        channel.resize(D);
        row.resize(D);
        scale.resize((size_t)D * ng);
        zero.resize((size_t)D * ng);
        int count[MIXKVQ_TIER_SLOTS] = {0}, start[MIXKVQ_TIER_SLOTS + 1], first_row[MIXKVQ_TIER_SLOTS];
        for (int d = 0; d < D; ++d) {
            if (!count[tm[d]]) first_row[tm[d]] = ri[d];
            ++count[tm[d]];
        }
        n_runs = 0;
        start[0] = 0;
        for (int w = 0; w < MIXKVQ_TIER_SLOTS; ++w) {
            start[w + 1] = start[w] + count[w];
            if (!count[w]) continue;
            run_bits[n_runs] = w;
            run_end[n_runs++] = start[w + 1];
            // a head's rows of one width are consecutive (rows are in (b, h, d) order), so
            // are their metadata
            if (w != MIXKVQ_HIGH_BITS) {
                meta_block(kp[3 * w + 1], (i64)first_row[w] * ng, (i64)count[w] * ng, a.meta_kind, scale.data() + (size_t)start[w] * ng);
                meta_block(kp[3 * w + 2], (i64)first_row[w] * ng, (i64)count[w] * ng, a.meta_kind, zero.data() + (size_t)start[w] * ng);
            }
        }
        for (int d = 0; d < D; ++d) {
            const int w = tm[d], e = start[w]++;
            channel[e] = d;
            row[e] = w == MIXKVQ_HIGH_BITS ? (const u8*)((const u16*)kp[3 * w] + (i64)ri[d] * R)
                                           : (const u8*)kp[3 * w] + (i64)ri[d] * ((R * w + 7) / 8);
        }
    }
};

// the dequantized tile of entry e at tokens [t0, t0 + n), any width, any group layout
static inline vf key_tile_any(const KeyBlockRows& k, int e, int bits, int t0, int n, int R, int G, int high_kind) {
    if (bits == MIXKVQ_HIGH_BITS) return half16((const u16*)k.row[e] + t0, n, high_kind);
    const int ng = R / G;
    const vu c = codes_any(k.row[e], t0, n, bits, (R * bits + 7) / 8);
    vf sc{}, z{};
    for (int i = 0; i < n; ++i) {
        sc[i] = k.scale[(size_t)e * ng + (t0 + i) / G];
        z[i] = k.zero[(size_t)e * ng + (t0 + i) / G];
    }
    return dequant16(c, sc, z);
}

// entries [e0, e1) of one width at TB whole tiles from t0 (tile j in group g[j]); BITS 0:
// any width through key_tile_any
template <int NRB, int TB, int BITS>
static inline void key_run(const KeyBlockRows& k, int e0, int e1, int bits, int t0, const int* g, int R, int G,
                           int high_kind, const float* Q, int D, vf (&acc)[NRB][TB]) {
    const int ng = R / G;
    for (int e = e0; e < e1; ++e) {
        vf kf[TB];
        for (int j = 0; j < TB; ++j) {
            const int t = t0 + j * VW;
            if constexpr (BITS == MIXKVQ_HIGH_BITS)
                kf[j] = half16((const u16*)k.row[e] + t, VW, high_kind);
            else if constexpr (BITS == 0)
                kf[j] = key_tile_any(k, e, bits, t, VW, R, G, high_kind);
            else
                kf[j] = dequant16(codes16<BITS>(k.row[e] + t * BITS / 8), vbroadcast(k.scale[(size_t)e * ng + g[j]]),
                                  vbroadcast(k.zero[(size_t)e * ng + g[j]]));
        }
        const float* q = Q + k.channel[e];
        for (int i = 0; i < NRB; ++i) {
            const vf qi = vbroadcast(q[(i64)i * D]);
            for (int j = 0; j < TB; ++j) acc[i][j] = vfma(qi, kf[j], acc[i][j]);
        }
    }
}

// Scores of query rows [r0, r0 + NRB) (Q points at row r0, rows D apart) against the block:
// S[(r0 + i) * R + t]. Per score: the channels in k's order, fused multiply-adds. TB tiles
// at a time (NRB * TB accumulators in registers), then single tiles for what is left.
template <int NRB>
static void key_block_scores(const KeyBlockRows& k, const float* Q, int D, int R, int G, int high_kind, float* S) {
    constexpr int TB = NRB <= 2 ? 8 : NRB <= 4 ? 4 : 2;
    int t0 = 0;
    if (G % VW == 0)
        for (; t0 + TB * VW <= R; t0 += TB * VW) {
            int g[TB];
            for (int j = 0; j < TB; ++j) g[j] = (t0 + j * VW) / G;
            vf acc[NRB][TB];
            for (int i = 0; i < NRB; ++i)
                for (int j = 0; j < TB; ++j) acc[i][j] = vf{};
            for (int run = 0, e0 = 0; run < k.n_runs; e0 = k.run_end[run++]) {
                const int bits = k.run_bits[run], e1 = k.run_end[run];
                switch (bits) {
                    case 1: key_run<NRB, TB, 1>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc); break;
                    case 2: key_run<NRB, TB, 2>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc); break;
                    case 4: key_run<NRB, TB, 4>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc); break;
                    case 8: key_run<NRB, TB, 8>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc); break;
                    case MIXKVQ_HIGH_BITS: key_run<NRB, TB, MIXKVQ_HIGH_BITS>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc); break;
                    default: key_run<NRB, TB, 0>(k, e0, e1, bits, t0, g, R, G, high_kind, Q, D, acc);
                }
            }
            for (int i = 0; i < NRB; ++i)
                for (int j = 0; j < TB; ++j) memcpy(S + (size_t)i * R + t0 + j * VW, &acc[i][j], sizeof(vf));
        }
    for (; t0 < R; t0 += VW) {
        const int n = R - t0 < VW ? R - t0 : VW;
        vf acc[NRB];
        for (int i = 0; i < NRB; ++i) acc[i] = vf{};
        for (int run = 0, e0 = 0; run < k.n_runs; e0 = k.run_end[run++])
            for (int e = e0; e < k.run_end[run]; ++e) {
                const vf kf = key_tile_any(k, e, k.run_bits[run], t0, n, R, G, high_kind);
                const float* q = Q + k.channel[e];
                for (int i = 0; i < NRB; ++i) acc[i] = vfma(vbroadcast(q[(i64)i * D]), kf, acc[i]);
            }
        for (int i = 0; i < NRB; ++i)
            for (int l = 0; l < n; ++l) S[(size_t)i * R + t0 + l] = acc[i][l];
    }
}

// Scores of query rows [r0, r0 + NRB) against full-precision key rows: tokens [s0, s1) of the
// residual, S[(r0 + i) * stride + tok - s0]; per score lane-wise partial sums over the channel
// tiles, then vsum.
template <int NRB>
static void residual_scores(const AttnArgs& a, i64 bh, i64 s0, i64 s1, i64 nq, const float* Q, float* S, int stride) {
    const int D = a.D;
    for (i64 tok = s0; tok < s1; ++tok) {
        const i64 base = (bh * a.rk + (tok - nq)) * D;
        vf part[NRB];
        for (int i = 0; i < NRB; ++i) part[i] = vf{};
        for (int c0 = 0; c0 < D; c0 += VW) {
            const int n = D - c0 < VW ? D - c0 : VW;
            const vf kf = load16(a.res_k, a.res_k_kind, base + c0, n);
            for (int i = 0; i < NRB; ++i) part[i] = vfma(load16(Q, MIXKVQ_KIND_F32, (i64)i * D + c0, n), kf, part[i]);
        }
        for (int i = 0; i < NRB; ++i) S[(size_t)i * stride + (tok - s0)] = vsum(part[i]);
    }
}

// One source of value rows for tokens [u0, u1): value chunk `chunk` (codes of `bits`, its
// per-token metadata converted to float32 in sc/z, (u1 - u0, ngv)), or the residual (chunk < 0).
struct ValueRun {
    int chunk, bits, rb, ngv;
    i64 u0, u1, first_row;  // first_row: the chunk row of token u0
    const u8* packed;
    const float* sc;
    const float* z;
};

// the value tile of token tok at channels [c0, c0 + n), any layout
static inline vf value_tile_any(const AttnArgs& a, const ValueRun& v, i64 bh, i64 nvq, i64 tok, int c0, int n) {
    if (v.chunk < 0) return load16(a.res_v, a.res_v_kind, (bh * a.rv + (tok - nvq)) * a.D + c0, n);
    const i64 t = tok - v.u0;
    vf sc{}, z{};
    for (int l = 0; l < n; ++l) {
        sc[l] = v.sc[t * v.ngv + (c0 + l) / a.G];
        z[l] = v.z[t * v.ngv + (c0 + l) / a.G];
    }
    return dequant16(codes_any(v.packed + (v.first_row + t) * v.rb, c0, n, v.bits, v.rb), sc, z);
}

// Output rows [r0, r0 + NRB) (o: acc at row r0, rows D apart, weighted means) += the weights
// (W: row r0, rows `stride` apart, column tok - w0) times the value rows of v's tokens, CB
// whole channel tiles from c0 at a time. Per output element the tokens in order. BITS 0: the
// residual; else the chunk's width (1, 2, 4, 8), its groups whole tiles.
template <int NRB, int CB, int BITS>
static inline void value_block(const AttnArgs& a, const ValueRun& v, i64 bh, i64 nvq, int c0, const float* W,
                               int stride, i64 w0, float* acc) {
    const int D = a.D, G = a.G;
    vf o[NRB][CB];
    for (int i = 0; i < NRB; ++i)
        for (int c = 0; c < CB; ++c) memcpy(&o[i][c], acc + (size_t)i * D + c0 + c * VW, sizeof(vf));
    for (i64 tok = v.u0; tok < v.u1; ++tok) {
        vf vv[CB];
        if constexpr (BITS == 0) {
            const i64 base = (bh * a.rv + (tok - nvq)) * D + c0;
            for (int c = 0; c < CB; ++c) vv[c] = load16(a.res_v, a.res_v_kind, base + c * VW, VW);
        } else {
            const i64 t = tok - v.u0;
            const u8* p = v.packed + (v.first_row + t) * v.rb + c0 * BITS / 8;
            const float* sc = v.sc + t * v.ngv;
            const float* z = v.z + t * v.ngv;
            for (int c = 0; c < CB; ++c) {
                const int g = (c0 + c * VW) / G;  // G is a multiple of VW: one group per tile
                vv[c] = dequant16(codes16<BITS>(p + c * VW * BITS / 8), vbroadcast(sc[g]), vbroadcast(z[g]));
            }
        }
        const float* wcol = W + (tok - w0);
        for (int i = 0; i < NRB; ++i) {
            const vf wi = vbroadcast(wcol[(size_t)i * stride]);
            for (int c = 0; c < CB; ++c) o[i][c] = vfma(wi, vv[c], o[i][c]);
        }
    }
    for (int i = 0; i < NRB; ++i)
        for (int c = 0; c < CB; ++c) memcpy(acc + (size_t)i * D + c0 + c * VW, &o[i][c], sizeof(vf));
}

template <int NRB>
static void value_rows(const AttnArgs& a, const ValueRun& v, i64 bh, i64 nvq, const float* W, int stride, i64 w0,
                       float* acc) {
    constexpr int CB = NRB <= 4 ? 4 : 2;
    const int D = a.D;
    const bool fast = v.chunk < 0 || (a.G % VW == 0 && (v.bits == 1 || v.bits == 2 || v.bits == 4 || v.bits == 8));
    int c0 = 0;
    if (fast)
        for (; c0 + CB * VW <= D; c0 += CB * VW) {
            switch (v.chunk < 0 ? 0 : v.bits) {
                case 0: value_block<NRB, CB, 0>(a, v, bh, nvq, c0, W, stride, w0, acc); break;
                case 1: value_block<NRB, CB, 1>(a, v, bh, nvq, c0, W, stride, w0, acc); break;
                case 2: value_block<NRB, CB, 2>(a, v, bh, nvq, c0, W, stride, w0, acc); break;
                case 4: value_block<NRB, CB, 4>(a, v, bh, nvq, c0, W, stride, w0, acc); break;
                default: value_block<NRB, CB, 8>(a, v, bh, nvq, c0, W, stride, w0, acc);
            }
        }
    for (; c0 < D; c0 += VW) {  // what is left, one (possibly partial) tile at a time
        const int n = D - c0 < VW ? D - c0 : VW;
        vf o[NRB];
        for (int i = 0; i < NRB; ++i) o[i] = load16(acc, MIXKVQ_KIND_F32, (i64)i * D + c0, n);
        for (i64 tok = v.u0; tok < v.u1; ++tok) {
            const vf vv = value_tile_any(a, v, bh, nvq, tok, c0, n);
            for (int i = 0; i < NRB; ++i) o[i] = vfma(vbroadcast(W[(size_t)i * stride + (tok - w0)]), vv, o[i]);
        }
        for (int i = 0; i < NRB; ++i)
            for (int l = 0; l < n; ++l) acc[(size_t)i * D + c0 + l] = o[i][l];
    }
}

// runs CALL(nrb) for the query rows [r0, r0 + nrb), in blocks of at most 8 rows (their
// accumulators stay in registers); CALL reads r0 from this loop
#define MKQ_FOR_ROW_BLOCKS(NR, CALL)                   \
    for (int r0 = 0; r0 < (NR);) {                     \
        const int nrb = (NR) - r0 < 8 ? (NR) - r0 : 8; \
        switch (nrb) {                                 \
            case 1: CALL(1); break;                    \
            case 2: CALL(2); break;                    \
            case 3: CALL(3); break;                    \
            case 4: CALL(4); break;                    \
            case 5: CALL(5); break;                    \
            case 6: CALL(6); break;                    \
            case 7: CALL(7); break;                    \
            default: CALL(8); break;                   \
        }                                              \
        r0 += nrb;                                     \
    }

// One task: KV head bh, tokens [t0, t1) (whole key blocks, then residual tokens). Writes
// the partial (acc as a weighted mean, m, l) of its NR = n_rep*Tq query rows.
void attend_range(const AttnArgs& a, const int* row_index, i64 bh, i64 t0, i64 t1, float* acc,
                  float* ml) {
    const int D = a.D, R = a.R, NR = a.n_rep * a.Tq;
    const int b = (int)(bh / a.H), h = (int)(bh % a.H);
    const int Hq = a.H * a.n_rep;
    const i64 nq = (i64)a.nkb * R, nvq = a.T - a.rv, BHD = (i64)a.B * a.H * D;
    const int SEG = R > 0 ? R : 128;
    thread_local std::vector<float> Qbuf, Sbuf, VSc, VZ;
    thread_local KeyBlockRows keys;
    Qbuf.resize((size_t)NR * D);
    Sbuf.resize((size_t)NR * SEG);
    float* const Q = Qbuf.data();
    float* const S = Sbuf.data();
    std::vector<float> m(NR, NEG_INF), l(NR, 0.0f);
    for (int r = 0; r < NR; ++r) {
        int rep = r / a.Tq, tq = r % a.Tq;
        const float* src = a.q + (((i64)b * Hq + h * a.n_rep + rep) * a.Tq + tq) * D;
        for (int d = 0; d < D; ++d) Q[(size_t)r * D + d] = src[d];
    }
    for (size_t i = 0; i < (size_t)NR * D; ++i) acc[i] = 0.0f;
    // a sliding window hides every token before the earliest query's window: skip them
    if (a.window > 0) {
        i64 first = a.T - a.Tq - a.window + 1;
        i64 skip = first <= nq ? (first > 0 ? first / R * R : 0) : nq + (first - nq) / SEG * SEG;
        if (skip > t0) t0 = skip < t1 ? skip : t1;
    }
    int chunk = 0;  // value chunk cursor (chunks are in token order)
    while (chunk + 1 < a.nvc && a.vchunk[3 * (chunk + 1)] <= t0) ++chunk;

    for (i64 s0 = t0; s0 < t1;) {
        i64 s1;
        // -- scores of the segment's tokens, S[r][t - s0] --
        if (s0 < nq) {  // a whole key block: channel tiles, dequantized once for all NR rows
            const i64 j = s0 / R;
            s1 = s0 + R;
            keys.load(a, a.tier_maps[j] + bh * D, row_index + j * BHD + bh * D, a.kptr + j * MIXKVQ_TIER_SLOTS * 3);
#define MKQ_KEYS(K) key_block_scores<K>(keys, Q + (size_t)r0 * D, D, R, a.G, a.high_kind, S + (size_t)r0 * R)
            MKQ_FOR_ROW_BLOCKS(NR, MKQ_KEYS)
#undef MKQ_KEYS
        } else {  // residual tokens: full-precision rows
            s1 = s0 + SEG < t1 ? s0 + SEG : t1;
#define MKQ_RES(K) residual_scores<K>(a, bh, s0, s1, nq, Q + (size_t)r0 * D, S + (size_t)r0 * SEG, SEG)
            MKQ_FOR_ROW_BLOCKS(NR, MKQ_RES)
#undef MKQ_RES
        }
        const int n = (int)(s1 - s0);
        const int stride = s0 < nq ? R : SEG;
        // -- online softmax: mask, scale, new max; S becomes the weights p / l_new --
        bool any = false;
        for (int r = 0; r < NR; ++r) {
            int tq = r % a.Tq;
            i64 pos = a.T - a.Tq + tq;
            float* Sr = S + (size_t)r * stride;
            const u8* mk = a.mask ? a.mask + ((i64)b * a.Tq + tq) * a.T + s0 : nullptr;
            float mx = NEG_INF;
            // nothing to hide or cap (decode): the scale and the max lane-wise
            const bool plain = !mk && a.softcap <= 0.0f && a.window <= 0 && (!a.causal || s0 + n - 1 <= pos);
            int t = 0;
            if (plain) {
                vf vmx = vbroadcast(NEG_INF);
                const vf vs = vbroadcast(a.scale);
                for (; t + VW <= n; t += VW) {
                    vf x;
                    memcpy(&x, Sr + t, sizeof(vf));
                    x = x * vs;
                    memcpy(Sr + t, &x, sizeof(vf));
                    vmx = x > vmx ? x : vmx;
                }
                for (int l = 0; l < VW; ++l) mx = vmx[l] > mx ? vmx[l] : mx;
            }
            for (; t < n; ++t) {
                float s = __fmul_rn(Sr[t], a.scale);
                if (a.softcap > 0.0f) s = __fmul_rn(a.softcap, tanhf(__fdiv_rn(s, a.softcap)));
                bool off = (a.causal && s0 + t > pos) || (mk && !mk[t]) || (a.window > 0 && s0 + t <= pos - a.window);
                s = off ? NEG_INF : s;
                Sr[t] = s;
                mx = s > mx ? s : mx;
            }
            float m_new = mx > m[r] ? mx : m[r];
            if (m_new == NEG_INF) {  // nothing visible yet: weights 0, state unchanged
                for (int t = 0; t < n; ++t) Sr[t] = 0.0f;
                continue;
            }
            for (int t = 0; t < n; ++t) Sr[t] = exp_nonpos(__fsub_rn(Sr[t], m_new));  // -inf - m_new = -inf -> 0
            // the normaliser: token t of the segment into lane t mod 16, then vsum. Masked
            // tokens add +0 exactly, so a segment cut short (decode) and the same segment
            // with its later tokens masked (a chunk of queries) sum alike: the result of a
            // query does not depend on how many queries share the call
            vf vsum_p{};
            t = 0;
            for (; t + VW <= n; t += VW) {
                vf x;
                memcpy(&x, Sr + t, sizeof(vf));
                vsum_p = vsum_p + x;
            }
            for (int l = 0; t < n; ++t, ++l) vsum_p[l] = __fadd_rn(vsum_p[l], Sr[t]);
            const float sum = vsum(vsum_p);
            float alpha = m[r] == NEG_INF ? 0.0f : exp_nonpos(__fsub_rn(m[r], m_new));
            float l_kept = __fmul_rn(l[r], alpha);
            float l_new = __fadd_rn(l_kept, sum);
            // acc is the weighted MEAN of the values seen: a convex combination, so it cannot
            // overflow even for values near the float32 limit
            float inv = __fdiv_rn(1.0f, l_new);
            float keep = __fmul_rn(l_kept, inv);
            for (int t = 0; t < n; ++t) Sr[t] = __fmul_rn(Sr[t], inv);
            float* ar = acc + (size_t)r * D;
            for (int d = 0; d < D; ++d) ar[d] = __fmul_rn(ar[d], keep);
            m[r] = m_new;
            l[r] = l_new;
            any = true;
        }
        // -- values: runs of tokens from one source (a value chunk, or the residual), each
        // value tile dequantized once and folded into every query row --
        if (any) {
            for (i64 u0 = s0; u0 < s1;) {
                ValueRun v{-1, 0, 0, 0, u0, s1, 0, nullptr, nullptr, nullptr};
                if (u0 < nvq) {
                    while (u0 >= a.vchunk[3 * chunk] + a.vchunk[3 * chunk + 1]) ++chunk;
                    const i64 start = a.vchunk[3 * chunk], cn = a.vchunk[3 * chunk + 1];
                    const i64 end = start + cn;
                    const void* const* vp = a.vptr + (i64)chunk * 3;
                    v.chunk = chunk;
                    v.bits = (int)a.vchunk[3 * chunk + 2];
                    v.rb = (D * v.bits + 7) / 8;
                    v.ngv = (D + a.G - 1) / a.G;
                    v.u1 = end < s1 ? end : s1;
                    v.first_row = bh * cn + (u0 - start);
                    v.packed = (const u8*)vp[0];
                    const i64 nm = (v.u1 - u0) * v.ngv;  // the run's metadata is contiguous
                    VSc.resize((size_t)nm);
                    VZ.resize((size_t)nm);
                    meta_block(vp[1], v.first_row * v.ngv, nm, a.meta_kind, VSc.data());
                    meta_block(vp[2], v.first_row * v.ngv, nm, a.meta_kind, VZ.data());
                    v.sc = VSc.data();
                    v.z = VZ.data();
                }
#define MKQ_VALS(K) value_rows<K>(a, v, bh, nvq, S + (size_t)r0 * stride, stride, s0, acc + (size_t)r0 * D)
                MKQ_FOR_ROW_BLOCKS(NR, MKQ_VALS)
#undef MKQ_VALS
                u0 = v.u1;
            }
        }
        s0 = s1;
    }
    for (int r = 0; r < NR; ++r) {
        ml[2 * r] = m[r];
        ml[2 * r + 1] = l[r];
    }
}

// The attention of n_req independent problems (one per request of a serving batch, or one
// call) in one parallel region: per problem the same split plan as a call of its own, so a
// problem's result does not depend on its batch mates or on the thread count.
void attention_core(const AttnArgs* reqs, float* const* outs, int n_req, int n_threads, int split_blocks) {
    if (n_threads < 1) n_threads = 1;
    // row of each channel within its width, per block (tier maps are in (b, h, d) order)
    // buffers reused across calls (thread_local: two Python threads may attend at once);
    // every element is written before it is read, so they are never cleared
    thread_local std::vector<int> row_index;
    thread_local std::vector<float> part_acc, part_ml;
    thread_local std::vector<i64> ri_off, task_off, acc_off, ml_off, nsplit, per_of, blk_req;
    ri_off.assign(n_req + 1, 0);
    task_off.assign(n_req + 1, 0);
    acc_off.assign(n_req + 1, 0);
    ml_off.assign(n_req + 1, 0);
    nsplit.assign(n_req, 0);
    per_of.assign(n_req, 0);
    i64 n_blocks = 0, token_elems = 0;  // token_elems: K/V elements read, for the thread count
    const i64 ATTN_TASKS = 64;
    for (int r = 0; r < n_req; ++r) {
        const AttnArgs& a = reqs[r];
        const i64 BH = (i64)a.B * a.H;
        ri_off[r + 1] = ri_off[r] + (i64)a.nkb * BH * a.D;
        token_elems += a.T * BH * a.D * (1 + a.n_rep * a.Tq);
        n_blocks += a.nkb;
        // token splits: whole key blocks, then the residual. The plan aims at ATTN_TASKS tasks
        // whatever the thread count (enough to balance up to 16 threads), so the result does not
        // depend on how many threads run it.
        const int seg = a.R > 0 ? a.R : 128;
        const i64 nseg = (a.T + seg - 1) / seg;
        i64 per = split_blocks > 0 ? split_blocks : (nseg * BH + ATTN_TASKS - 1) / ATTN_TASKS;
        if (per < 1) per = 1;
        per_of[r] = per;
        nsplit[r] = (nseg + per - 1) / per;
        const i64 tasks = BH * nsplit[r];
        const int NR = a.n_rep * a.Tq;
        task_off[r + 1] = task_off[r] + tasks;
        acc_off[r + 1] = acc_off[r] + tasks * NR * a.D;
        ml_off[r + 1] = ml_off[r] + tasks * NR * 2;
    }
    if (row_index.size() < (size_t)ri_off[n_req]) row_index.resize((size_t)ri_off[n_req]);
    if (part_acc.size() < (size_t)acc_off[n_req]) part_acc.resize((size_t)acc_off[n_req]);
    if (part_ml.size() < (size_t)ml_off[n_req]) part_ml.resize((size_t)ml_off[n_req]);
    blk_req.resize((size_t)n_blocks);
    for (int r = 0, k = 0; r < n_req; ++r)
        for (int j = 0; j < reqs[r].nkb; ++j) blk_req[k++] = ((i64)r << 32) | j;
    // (inside a parallel region a thread_local name is the worker's own: pass pointers)
    int* const rows_of = row_index.data();
    float* const pacc = part_acc.data();
    float* const pml = part_ml.data();
    const i64* const bq = blk_req.data();
    const i64* const ri0 = ri_off.data();
    const i64* const to = task_off.data();
    const i64* const ao = acc_off.data();
    const i64* const mo = ml_off.data();
    const i64* const ns = nsplit.data();
    const i64* const po = per_of.data();
#pragma omp parallel for num_threads(threads_for(n_threads, n_blocks, ri_off[n_req])) schedule(static)
    for (i64 k = 0; k < n_blocks; ++k) {
        const int r = (int)(bq[k] >> 32), j = (int)(bq[k] & 0xffffffff);
        const AttnArgs& a = reqs[r];
        const i64 BHD = (i64)a.B * a.H * a.D;
        int count[MIXKVQ_TIER_SLOTS] = {0};
        const u8* tm = a.tier_maps[j];
        int* ri = rows_of + ri0[r] + (i64)j * BHD;
        for (i64 c = 0; c < BHD; ++c) ri[c] = count[tm[c]]++;
    }
    const i64 all_tasks = to[n_req];
#pragma omp parallel for num_threads(threads_for(n_threads, all_tasks, token_elems)) schedule(dynamic, 1)
    for (i64 task = 0; task < all_tasks; ++task) {
        const int r = (int)(std::upper_bound(to, to + n_req + 1, task) - to) - 1;
        const AttnArgs& a = reqs[r];
        const int NR = a.n_rep * a.Tq;
        const int seg = a.R > 0 ? a.R : 128;
        const i64 local = task - to[r];
        const i64 bh = local / ns[r], sp = local % ns[r];
        const i64 span = po[r] * seg;
        const i64 t0 = sp * span, t1 = (sp + 1) * span < a.T ? (sp + 1) * span : a.T;
        attend_range(a, rows_of + ri0[r], bh, t0, t1, pacc + ao[r] + local * NR * a.D, pml + mo[r] + local * NR * 2);
    }
    // merge the splits (flash-decoding): weights l_s e^(m_s - M) / sum, acc_s weighted means
    thread_local std::vector<i64> bh_off;
    bh_off.assign(n_req + 1, 0);
    for (int r = 0; r < n_req; ++r) bh_off[r + 1] = bh_off[r] + (i64)reqs[r].B * reqs[r].H;
    const i64* const bo = bh_off.data();
    const i64 all_bh = bo[n_req];
#pragma omp parallel for num_threads(threads_for(n_threads, all_bh, ao[n_req])) schedule(static)
    for (i64 k = 0; k < all_bh; ++k) {
        const int rq = (int)(std::upper_bound(bo, bo + n_req + 1, k) - bo) - 1;
        const AttnArgs& a = reqs[rq];
        const i64 bh = k - bo[rq], n_splits = ns[rq];
        const int H = a.H, n_rep = a.n_rep, Tq = a.Tq, D = a.D, Hq = H * n_rep, NR = n_rep * Tq;
        const float* pa = pacc + ao[rq];
        const float* pm = pml + mo[rq];
        float* out = outs[rq];
        int b = (int)(bh / H), h = (int)(bh % H);
        for (int r = 0; r < NR; ++r) {
            int rep = r / Tq, tq = r % Tq;
            float* o = out + (((i64)b * Hq + h * n_rep + rep) * Tq + tq) * D;
            float M = NEG_INF;
            for (i64 s = 0; s < n_splits; ++s) {
                float ms = pm[((size_t)(bh * n_splits + s) * NR + r) * 2];
                M = ms > M ? ms : M;
            }
            for (int d = 0; d < D; ++d) o[d] = 0.0f;
            if (M == NEG_INF) continue;  // sees no token
            float den = 0.0f;
            for (i64 s = 0; s < n_splits; ++s) {
                const float* ml = pm + ((size_t)(bh * n_splits + s) * NR + r) * 2;
                if (ml[0] == NEG_INF) continue;
                den = __fadd_rn(den, __fmul_rn(ml[1], exp_nonpos(__fsub_rn(ml[0], M))));
            }
            for (i64 s = 0; s < n_splits; ++s) {
                const float* ml = pm + ((size_t)(bh * n_splits + s) * NR + r) * 2;
                if (ml[0] == NEG_INF) continue;
                float w = __fdiv_rn(__fmul_rn(ml[1], exp_nonpos(__fsub_rn(ml[0], M))), den);
                const float* ac = pa + ((size_t)(bh * n_splits + s) * NR + r) * D;
                for (int d = 0; d < D; ++d) o[d] = __fadd_rn(o[d], __fmul_rn(ac[d], w));
            }
        }
    }
}

}  // namespace

extern "C" {

// softmax(q K^T * scale) V over the packed cache -> out float32 (B, Hq, Tq, D).
// q float32 (B, Hq, Tq, D); key blocks: tier_maps[j] (B, H, D), kptr[j][w][0..2] the packed
// rows / scale / zero of width w (null where absent); value chunks vchunk[c] = (start, n,
// bits), vptr[c][0..2]; residual keys/values (B, H, rk|rv, D) of their kinds. Query i of
// Tq sits at position T - Tq + i; window > 0 hides positions <= its position - window;
// softcap > 0 caps the scaled scores. A query row that sees no token gets zeros.
void mkq_attention(const float* q, int B, int H, int n_rep, int Tq, int D, i64 T, float scale, int causal,
                   const u8* mask, i64 window, float softcap, int nkb, int R, int G, int meta_kind, int high_kind, const u8* const* tier_maps,
                   const void* const* kptr, const void* res_k, int res_k_kind, i64 rk, int nvc, const i64* vchunk,
                   const void* const* vptr, const void* res_v, int res_v_kind, i64 rv, float* out, int n_threads,
                   int split_blocks) {
    AttnArgs a{q, B, H, n_rep, Tq, D, T, scale, causal, mask, window, softcap, nkb, R, G, meta_kind, high_kind, tier_maps, kptr,
               res_k, res_k_kind, rk, nvc, vchunk, vptr, res_v, res_v_kind, rv};
    attention_core(&a, &out, 1, n_threads, split_blocks);
}

// The attention of n_req requests of one serving step in one call (batch 1 each, causal,
// no mask, shared geometry and kinds). table: n_req rows of MKQ_BATCH_COLS int64 —
// q (Hq, Tq, D) float32, out (Hq, Tq, D) float32, Tq, T, nkb, tier_maps (nkb pointers),
// kptr (nkb x TIER_SLOTS x 3), res_k, rk, nvc, vchunk (nvc x 3), vptr (nvc x 3), res_v, rv.
// Each request's result is the one mkq_attention gives it alone.
void mkq_attention_batch(int n_req, const i64* table, int H, int n_rep, int D, float scale, i64 window,
                         float softcap, int R, int G, int meta_kind, int high_kind, int res_kind, int n_threads,
                         int split_blocks) {
    std::vector<AttnArgs> reqs((size_t)n_req);
    std::vector<float*> outs((size_t)n_req);
    for (int r = 0; r < n_req; ++r) {
        const i64* t = table + (i64)r * 14;  // BATCH_COLUMNS in backend.py
        reqs[r] = AttnArgs{(const float*)t[0], 1, H, n_rep, (int)t[2], D, t[3], scale, 1, nullptr, window, softcap,
                           (int)t[4], R, G, meta_kind, high_kind, (const u8* const*)t[5], (const void* const*)t[6],
                           (const void*)t[7], res_kind, t[8], (int)t[9], (const i64*)t[10], (const void* const*)t[11],
                           (const void*)t[12], res_kind, t[13]};
        outs[r] = (float*)t[1];
    }
    if (n_req > 0) attention_core(reqs.data(), outs.data(), n_req, n_threads, split_blocks);
}

}  // extern "C"
