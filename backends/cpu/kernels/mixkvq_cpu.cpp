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

// One task: KV head bh, tokens [t0, t1) (whole key blocks, then residual tokens). Writes
// the partial (acc as a weighted mean, m, l) of its NR = n_rep*Tq query rows.
void attend_range(const AttnArgs& a, const int* row_index, i64 bh, i64 t0, i64 t1, float* acc,
                  float* ml) {
    const int D = a.D, R = a.R, NR = a.n_rep * a.Tq, G = a.G;
    const int b = (int)(bh / a.H), h = (int)(bh % a.H);
    const int Hq = a.H * a.n_rep;
    const i64 nq = (i64)a.nkb * R, nvq = a.T - a.rv, BHD = (i64)a.B * a.H * D;
    const int SEG = R > 0 ? R : 128;
    std::vector<float> Q((size_t)NR * D), S((size_t)NR * SEG), kf(SEG > D ? SEG : D), vf(D);
    std::vector<u8> codes(((SEG > D ? SEG : D) + 7) / 8 * 8 + 8);
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
        if (s0 < nq) {  // a whole key block: channel rows, dequantized once for all NR rows
            i64 j = s0 / R;
            s1 = s0 + R;
            for (size_t i = 0; i < (size_t)NR * R; ++i) S[i] = 0.0f;
            const u8* tm = a.tier_maps[j] + bh * D;
            const int* ri = row_index + j * BHD + bh * D;
            const void* const* kp = a.kptr + (i64)j * MIXKVQ_TIER_SLOTS * 3;
            for (int d = 0; d < D; ++d) {
                int w = tm[d];
                i64 row = ri[d];
                if (w == MIXKVQ_HIGH_BITS) {
                    const u16* words = (const u16*)kp[3 * w] + row * R;
                    if (a.high_kind == MIXKVQ_KIND_BF16)
                        for (int t = 0; t < R; ++t) kf[t] = __uint_as_float((unsigned)words[t] << 16);
                    else
                        for (int t = 0; t < R; ++t) kf[t] = mixkvq_f16_bits_to_f32(words[t]);
                } else {
                    int rb = (R * w + 7) / 8, ng = R / G;
                    unpack_row((const u8*)kp[3 * w] + row * rb, R, w, codes.data());
                    for (int g = 0; g < ng; ++g) {
                        float sc = meta_at(kp[3 * w + 1], row * ng + g, a.meta_kind);
                        float z = meta_at(kp[3 * w + 2], row * ng + g, a.meta_kind);
                        for (int t = g * G; t < (g + 1) * G; ++t) kf[t] = __fadd_rn(__fmul_rn((float)codes[t], sc), z);
                    }
                }
                for (int r = 0; r < NR; ++r) {
                    float qd = Q[(size_t)r * D + d];
                    float* Sr = S.data() + (size_t)r * R;
                    for (int t = 0; t < R; ++t) Sr[t] = __fadd_rn(Sr[t], __fmul_rn(qd, kf[t]));
                }
            }
        } else {  // residual tokens: full-precision rows
            s1 = s0 + SEG < t1 ? s0 + SEG : t1;
            for (i64 tok = s0; tok < s1; ++tok) {
                gather_f32(a.res_k, a.res_k_kind, (bh * a.rk + (tok - nq)) * D, 1, D, kf.data());
                for (int r = 0; r < NR; ++r) {
                    const float* qr = Q.data() + (size_t)r * D;
                    float s = 0.0f;
                    for (int d = 0; d < D; ++d) s = __fadd_rn(s, __fmul_rn(qr[d], kf[d]));
                    S[(size_t)r * SEG + (tok - s0)] = s;
                }
            }
        }
        const int n = (int)(s1 - s0);
        const int stride = s0 < nq ? R : SEG;
        // -- online softmax: mask, scale, new max; S becomes the weights p / l_new --
        bool any = false;
        for (int r = 0; r < NR; ++r) {
            int tq = r % a.Tq;
            i64 pos = a.T - a.Tq + tq;
            float* Sr = S.data() + (size_t)r * stride;
            const u8* mk = a.mask ? a.mask + ((i64)b * a.Tq + tq) * a.T + s0 : nullptr;
            float mx = NEG_INF;
            for (int t = 0; t < n; ++t) {
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
            float sum = 0.0f;
            for (int t = 0; t < n; ++t) {
                float p = exp_nonpos(__fsub_rn(Sr[t], m_new));  // -inf - m_new = -inf -> 0
                Sr[t] = p;
                sum = __fadd_rn(sum, p);
            }
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
        // -- values: each token's row dequantized once, folded into every query row --
        if (any) {
            for (int t = 0; t < n; ++t) {
                i64 tok = s0 + t;
                if (tok < nvq) {
                    while (tok >= a.vchunk[3 * chunk] + a.vchunk[3 * chunk + 1]) ++chunk;
                    i64 start = a.vchunk[3 * chunk], cn = a.vchunk[3 * chunk + 1];
                    int vbits = (int)a.vchunk[3 * chunk + 2];
                    int rb = (D * vbits + 7) / 8, ng = (D + G - 1) / G;
                    i64 row = bh * cn + (tok - start);
                    const void* const* vp = a.vptr + (i64)chunk * 3;
                    unpack_row((const u8*)vp[0] + row * rb, D, vbits, codes.data());
                    for (int g = 0; g < ng; ++g) {
                        float sc = meta_at(vp[1], row * ng + g, a.meta_kind);
                        float z = meta_at(vp[2], row * ng + g, a.meta_kind);
                        int d1 = (g + 1) * G < D ? (g + 1) * G : D;
                        for (int d = g * G; d < d1; ++d) vf[d] = __fadd_rn(__fmul_rn((float)codes[d], sc), z);
                    }
                } else {
                    gather_f32(a.res_v, a.res_v_kind, (bh * a.rv + (tok - nvq)) * D, 1, D, vf.data());
                }
                for (int r = 0; r < NR; ++r) {
                    float wt = S[(size_t)r * stride + t];
                    if (wt == 0.0f) continue;
                    float* ar = acc + (size_t)r * D;
                    for (int d = 0; d < D; ++d) ar[d] = __fadd_rn(ar[d], __fmul_rn(wt, vf[d]));
                }
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
