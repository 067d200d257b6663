// Query statistics (§7), difficulty and tier assignment (§8). One thread per output item.
#include "mixkvq_common.cuh"

#define GRID_STRIDE(i, total) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (total); \
         i += (long long)blockDim.x * gridDim.x)

// q float32 (B, H*n_rep, T, D) -> int64 (B, H, T, D): sum over the group's query heads of
// min(rint(fl32(|q| * 2^16)), 2^40). Integer sums are exact, so the order is free.
extern "C" __global__ void query_token_sums(const float* __restrict__ q, int B, int H, int n_rep, int T, int D,
                                            long long* __restrict__ out) {
    long long total = (long long)B * H * T * D;
    GRID_STRIDE(o, total) {
        long long td = (long long)T * D;
        long long bh = o / td, rest = o % td;
        long long b = bh / H, h = bh % H;
        long long acc = 0;
        for (int r = 0; r < n_rep; ++r) {
            float a = fabsf(q[((b * H + h) * n_rep + r) * td + rest]);
            float m = __fmul_rn(a, MIXKVQ_FIXED_ONE);
            float f = fminf(rintf(m), MIXKVQ_FIXED_MAX);  // Inf saturates too
            acc += (long long)f;
        }
        out[o] = acc;
    }
}

// §7 step 5: float32(qsum) / float32(denominator), both int64 -> float32 nearest even.
extern "C" __global__ void relevance(const long long* __restrict__ qsum, long long count, long long denominator,
                                     float* __restrict__ out) {
    float den = __ll2float_rn(denominator);
    GRID_STRIDE(i, count) { out[i] = __fdiv_rn(__ll2float_rn(qsum[i]), den); }
}

// keys float32 (BH, R, D) -> (BH, D): fl32(fl32(mx - mn) / L) over the R tokens.
extern "C" __global__ void difficulty(const float* __restrict__ k, long long BH, int R, int D, float L,
                                      float* __restrict__ out) {
    GRID_STRIDE(o, BH * D) {
        long long bh = o / D;
        int d = (int)(o % D);
        const float* p = k + bh * R * D + d;
        float mn = p[0], mx = p[0];
        for (int t = 1; t < R; ++t) {
            float v = p[(long long)t * D];
            mn = v < mn ? v : mn;
            mx = v > mx ? v : mx;
        }
        out[o] = __fdiv_rn(__fsub_rn(__fadd_rn(mx, 0.0f), __fadd_rn(mn, 0.0f)), L);
    }
}

// Whether channel e ranks before channel d: a stable sort of -A, where NumPy puts NaN last.
__device__ __forceinline__ bool ranks_before(float ae, int e, float ad, int d) {
    bool ne = ae != ae, nd = ad != ad;
    if (ne || nd) return !ne ? true : (nd && e < d);
    return ae > ad || (ae == ad && e < d);
}

// Budget mode: rank of channel d in its head = channels ranked before it; first n_high
// high, next n_mid mid, the rest low.
extern "C" __global__ void assign_budget(const float* __restrict__ a, long long BH, int D, int n_high, int n_mid,
                                         int high, int mid, int low, unsigned char* __restrict__ out) {
    GRID_STRIDE(o, BH * D) {
        const float* row = a + (o / D) * D;
        int d = (int)(o % D);
        float ad = row[d];
        int rank = 0;
        for (int e = 0; e < D; ++e) rank += (e != d && ranks_before(row[e], e, ad, d)) ? 1 : 0;
        out[o] = (unsigned char)(rank < n_high ? high : (rank < n_high + n_mid ? mid : low));
    }
}

extern "C" __global__ void assign_threshold(const float* __restrict__ a, long long count, float tau_high,
                                            float tau_mid, int high, int mid, int low,
                                            unsigned char* __restrict__ out) {
    GRID_STRIDE(i, count) {
        float v = a[i];
        out[i] = (unsigned char)(v > tau_high ? high : (v > tau_mid ? mid : low));
    }
}
