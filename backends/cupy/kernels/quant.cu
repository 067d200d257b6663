// Quantization kernels of docs/numerics.md §3–§6, along the last axis of contiguous rows.
// One thread per output item (a group, a byte, an element) in grid-stride loops, so any
// grid size is correct; the launch code picks it (backends/cupy/launch.py).
#include "mixkvq_common.cuh"

#define GRID_STRIDE(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)blockDim.x * gridDim.x)

// §3 steps 1–4 per group: x float32 (nrows, n) -> scale, zero (nrows, ng) stored as `kind`;
// bad[g] = 1 where a stored scale or zero is +-Inf (overflow, §2), 2 where the group's
// largest dequantized value fl32(fl32(L * s) + z) overflows float32 (§3 step 4).
extern "C" __global__ void quant_meta(const float* __restrict__ x, long long nrows, int n, int G, int ng,
                                      float L, int kind, void* scale, void* zero, int* __restrict__ bad) {
    GRID_STRIDE(g, nrows * ng) {
        long long row = g / ng;
        int j = (int)(g % ng);
        const float* p = x + row * n + (long long)j * G;
        int m = min(G, n - j * G);
        float mn = p[0], mx = p[0];
        for (int i = 1; i < m; ++i) {
            float v = p[i];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        mn = __fadd_rn(mn, 0.0f);  // -0 -> +0
        mx = __fadd_rn(mx, 0.0f);
        float scale32 = __fdiv_rn(__fsub_rn(mx, mn), L);
        bool inf_s, inf_z;
        float s = mixkvq_store_meta(scale, g, kind, scale32, &inf_s);
        float z = mixkvq_store_meta(zero, g, kind, mn, &inf_z);
        float top = __fadd_rn(__fmul_rn(s, L), z);
        bool far = (__float_as_uint(top) & 0x7FFFFFFFu) >= 0x7F800000u;
        bad[g] = (inf_s || inf_z) ? 1 : (far ? 2 : 0);
    }
}

// §3 step 5 + §5: one thread per packed byte; it quantizes the (at most 8) elements whose
// bits fall in its byte with the stored (scale, zero) of their groups.
template <int BITS>
__global__ void quant_pack(const float* __restrict__ x, long long nrows, int n, int G, int ng, int rb,
                           int kind, const void* scale, const void* zero, unsigned char* __restrict__ packed) {
    const float L = (float)((1 << BITS) - 1);
    GRID_STRIDE(o, nrows * rb) {
        long long row = o / rb;
        packed[o] = mixkvq_pack_byte<BITS>((int)(o % rb), n, [&](int i) {
            long long gi = row * ng + i / G;
            return mixkvq_code(x[row * n + i], mixkvq_load_meta(scale, gi, kind), mixkvq_load_meta(zero, gi, kind), L);
        });
    }
}

// §4: packed (nrows, rb) + scale/zero (nrows, ng) -> out (nrows, n); out_kind float32 (2),
// float16 (0) or bfloat16 (1) saturated to the largest finite value, then rounded.
template <int BITS>
__global__ void dequant(const unsigned char* __restrict__ packed, const void* scale, const void* zero,
                        long long nrows, int n, int G, int ng, int rb, int meta_kind, int out_kind, void* out) {
    GRID_STRIDE(e, nrows * n) {
        long long row = e / n;
        int i = (int)(e % n);
        unsigned int c = mixkvq_read_code(packed + row * rb, i, BITS, rb);
        long long gi = row * ng + i / G;
        float y = mixkvq_dequant(c, mixkvq_load_meta(scale, gi, meta_kind), mixkvq_load_meta(zero, gi, meta_kind));
        if (out_kind == MIXKVQ_KIND_F32) {
            ((float*)out)[e] = y;
        } else {
            float lim = out_kind == MIXKVQ_KIND_F16 ? MIXKVQ_FLOAT16_MAX : __uint_as_float(0x7F7F0000u);
            y = fminf(fmaxf(y, -lim), lim);
            ((unsigned short*)out)[e] = mixkvq_f32_to_half(y, out_kind);
        }
    }
}

// §5 on given codes: uint8 codes (nrows, n) -> packed (nrows, rb).
template <int BITS>
__global__ void pack_codes(const unsigned char* __restrict__ codes, long long nrows, int n, int rb,
                           unsigned char* __restrict__ packed) {
    GRID_STRIDE(o, nrows * rb) {
        long long row = o / rb;
        packed[o] = mixkvq_pack_byte<BITS>((int)(o % rb), n, [&](int i) {
            return (unsigned int)(codes[row * n + i] & ((1u << BITS) - 1u));
        });
    }
}

template <int BITS>
__global__ void unpack_codes(const unsigned char* __restrict__ packed, long long nrows, int n, int rb,
                             unsigned char* __restrict__ codes) {
    GRID_STRIDE(e, nrows * n) {
        long long row = e / n;
        codes[e] = (unsigned char)mixkvq_read_code(packed + row * rb, (int)(e % n), BITS, rb);
    }
}

// §6 16-bit rows: float32 -> 16-bit words of `kind` (round to nearest even); bad = overflow.
extern "C" __global__ void encode_half(const float* __restrict__ x, long long count, int kind,
                                       unsigned short* __restrict__ out, int* __restrict__ bad) {
    GRID_STRIDE(i, count) {
        unsigned short h = mixkvq_f32_to_half(x[i], kind);
        out[i] = h;
        bad[i] = mixkvq_half_is_inf(h, kind) ? 1 : 0;
    }
}

extern "C" __global__ void decode_half(const unsigned short* __restrict__ in, long long count, int kind,
                                       float* __restrict__ out) {
    GRID_STRIDE(i, count) { out[i] = mixkvq_half_to_f32(in[i], kind); }
}
