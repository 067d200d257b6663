// Fused decode attention over the packed MixKVQ cache (flash-decoding style).
//
// attn_split: grid (n_splits, B*H, ceil(n_rep*Tq / QROWS)), block 128 threads = 4 warps.
// A block takes one KV head (GQA: its n_rep query heads share every K/V tile it loads),
// up to QROWS = 4 query rows (one per warp) and the tokens [split*split_len, +split_len).
// It walks them in tiles of 32 tokens: all threads dequantize the tile's keys (from the
// tier rows of their key block, or the float32 residual) into shared memory — never to
// global memory — DCH = 128 channels at a time (heads up to MAXD = 256 channels fit the
// 48 KB of static shared memory that way); each warp scores its query row (lane = token,
// the dot product summed over channels in order across the chunks), applies soft-capping,
// the causal / sliding-window / padding masks, updates its running max / sum with warp
// shuffles, then the tile's values (per-token rows, or the residual) are decoded chunk by
// chunk and p * V folded into registers (lane owns channels lane, lane+32, ...). The
// partial (acc, m, l) of each split go to global memory; attn_combine merges the splits.
#include "mixkvq_common.cuh"

#define TILE 32
#define QROWS 4
#define MAXD 256
#define DCH 128
#define ATTN_THREADS (32 * QROWS)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Key element (token tok, channel d) of KV head bh, as float32 exactly as §4 / §6 decode it.
__device__ __forceinline__ float load_key(long long tok, int d, long long bh, int D, long long BHD, int nkb, int R,
                                          int G, int meta_kind, int high_kind, const unsigned char* tier_maps,
                                          const int* row_index, const unsigned long long* kptr,
                                          const float* res_k, long long rk) {
    long long nq = (long long)nkb * R;
    if (tok >= nq) return res_k[(bh * rk + (tok - nq)) * D + d];
    long long j = tok / R;
    int tb = (int)(tok % R);
    long long idx = j * BHD + bh * D + d;
    int w = tier_maps[idx];
    long long row = row_index[idx];
    const unsigned long long* p = kptr + (j * MIXKVQ_TIER_SLOTS + w) * 3;
    if (w == MIXKVQ_HIGH_BITS) {
        const unsigned short* words = (const unsigned short*)p[0];
        return mixkvq_half_to_f32(words[row * R + tb], high_kind);
    }
    int rb = (R * w + 7) / 8, ng = R / G;
    unsigned int c = mixkvq_read_code((const unsigned char*)p[0] + row * rb, tb, w, rb);
    long long gi = row * ng + tb / G;
    return mixkvq_dequant(c, mixkvq_load_meta((const void*)p[1], gi, meta_kind),
                          mixkvq_load_meta((const void*)p[2], gi, meta_kind));
}

__device__ __forceinline__ float load_value(long long tok, int d, long long bh, int D, int G, int meta_kind,
                                            long long nvq, const int* vtok_chunk,
                                            const long long* vchunk, const unsigned long long* vptr,
                                            const float* res_v, long long rv) {
    if (tok >= nvq) return res_v[(bh * rv + (tok - nvq)) * D + d];
    int c = vtok_chunk[tok];
    long long start = vchunk[3 * c], n = vchunk[3 * c + 1];
    int vbits = (int)vchunk[3 * c + 2];  // each chunk has its own width (rd mode)
    long long row = bh * n + (tok - start);
    int rb = (D * vbits + 7) / 8, ng = (D + G - 1) / G;
    const unsigned long long* p = vptr + (long long)c * 3;
    unsigned int code = mixkvq_read_code((const unsigned char*)p[0] + row * rb, d, vbits, rb);
    long long gi = row * ng + d / G;
    return mixkvq_dequant(code, mixkvq_load_meta((const void*)p[1], gi, meta_kind),
                          mixkvq_load_meta((const void*)p[2], gi, meta_kind));
}

extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
attn_split(const float* __restrict__ q, int B, int H, int n_rep, int Tq, int D, long long T, float scale, int causal,
           const unsigned char* __restrict__ mask, int use_mask, long long window, float softcap,
           int nkb, int R, int G, int meta_kind, int high_kind, const unsigned char* __restrict__ tier_maps,
           const int* __restrict__ row_index, const unsigned long long* __restrict__ kptr,
           const float* __restrict__ res_k, long long nvq, const int* __restrict__ vtok_chunk,
           const long long* __restrict__ vchunk, const unsigned long long* __restrict__ vptr,
           const float* __restrict__ res_v, long long split_len, float* __restrict__ part_acc,
           float* __restrict__ part_ml) {
    // mask: uint8 (B, Tq, T), 1 = may attend (read when use_mask); window > 0 hides positions <= pos - window;
    // softcap > 0 replaces each scaled score s by softcap * tanh(s / softcap)
    __shared__ float Ks[TILE][DCH + 1];  // +1: lane t reads row t, so rows must not share a bank
    __shared__ float Vs[TILE][DCH];
    __shared__ float Qs[QROWS][MAXD];
    __shared__ float Ps[QROWS][TILE];

    const int split = blockIdx.x;
    const long long bh = blockIdx.y;
    const int b = (int)(bh / H), h = (int)(bh % H);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int n_rows = n_rep * Tq;
    const int row = blockIdx.z * QROWS + warp;  // query row (r, tq), r major
    const bool active = row < n_rows;
    const int r = active ? row / Tq : 0, tq = active ? row % Tq : 0;
    const int hq = h * n_rep + r;
    const int Hq = H * n_rep;
    const long long BHD = (long long)B * H * D;
    const long long rk = T - (long long)nkb * R, rv = T - nvq;
    const long long pos = T - Tq + tq;  // this query's position
    const long long t0 = (long long)split * split_len;
    const long long t1 = min(T, t0 + split_len);
    const unsigned char* mrow = use_mask ? mask + ((long long)b * Tq + tq) * T : nullptr;

    for (int d = lane; d < D; d += 32) Qs[warp][d] = active ? q[(((long long)b * Hq + hq) * Tq + tq) * D + d] : 0.0f;

    float acc[MAXD / 32];
    for (int k = 0; k < MAXD / 32; ++k) acc[k] = 0.0f;
    float m = NEG_INF, l = 0.0f;

    for (long long base = t0; base < t1; base += TILE) {
        // a tile wholly outside every query's window is never decoded (block-uniform skip)
        if (window > 0 && base + TILE - 1 <= T - Tq - window) continue;
        // -- scores: keys decoded DCH channels at a time, the dot product summed in channel order --
        float s = 0.0f;
#pragma unroll
        for (int ci = 0; ci < MAXD / DCH; ++ci) {
            const int c0 = ci * DCH;
            if (c0 >= D) break;  // block-uniform (D is an argument)
            const int dc = min(DCH, D - c0);
            __syncthreads();  // the previous chunk (or tile) is consumed
            for (int e = threadIdx.x; e < TILE * dc; e += ATTN_THREADS) {
                int t = e / dc, d = e % dc;
                long long tok = base + t;
                Ks[t][d] = tok < t1 ? load_key(tok, c0 + d, bh, D, BHD, nkb, R, G, meta_kind, high_kind, tier_maps,
                                               row_index, kptr, res_k, rk)
                                    : 0.0f;
            }
            __syncthreads();
            if (active)
                for (int d = 0; d < dc; ++d) s = __fadd_rn(s, __fmul_rn(Qs[warp][c0 + d], Ks[lane][d]));
        }
        float keep = 0.0f;
        if (active) {  // warp-uniform: the whole warp takes this branch or none of it
            long long tok = base + lane;
            s = __fmul_rn(s, scale);
            if (softcap > 0.0f) s = __fmul_rn(softcap, tanhf(__fdiv_rn(s, softcap)));
            if (tok >= t1 || (causal && tok > pos) || (window > 0 && tok <= pos - window) || (mrow && !mrow[tok]))
                s = NEG_INF;
            float m_new = fmaxf(m, warp_max(s));
            float p = 0.0f, alpha = 1.0f;
            if (m_new != NEG_INF) {
                p = s == NEG_INF ? 0.0f : expf(s - m_new);
                alpha = m == NEG_INF ? 0.0f : expf(m - m_new);
            }
            float l_kept = __fmul_rn(l, alpha);
            l = __fadd_rn(l_kept, warp_sum(p));
            m = m_new;
            // acc is kept as the weighted MEAN of the values seen (not their weighted sum), a
            // convex combination that cannot overflow even for values near the float32 limit
            float inv_l = l > 0.0f ? __fdiv_rn(1.0f, l) : 0.0f;
            keep = __fmul_rn(l_kept, inv_l);
            Ps[warp][lane] = __fmul_rn(p, inv_l);
        }
        // -- values, DCH channels at a time, folded into the running means --
#pragma unroll
        for (int ci = 0; ci < MAXD / DCH; ++ci) {  // unrolled, so acc[] is indexed by constants
            const int c0 = ci * DCH;
            if (c0 >= D) break;
            const int dc = min(DCH, D - c0);
            __syncthreads();  // Ks/Vs consumed, Ps written
            for (int e = threadIdx.x; e < TILE * dc; e += ATTN_THREADS) {
                int t = e / dc, d = e % dc;
                long long tok = base + t;
                Vs[t][d] = tok < t1 ? load_value(tok, c0 + d, bh, D, G, meta_kind, nvq, vtok_chunk, vchunk, vptr,
                                                 res_v, rv)
                                    : 0.0f;
            }
            __syncthreads();
            if (active) {
                for (int k = 0; k < DCH / 32; ++k) {
                    int d = lane + 32 * k;
                    if (d < dc) {
                        int ka = ci * (DCH / 32) + k;
                        float a = __fmul_rn(acc[ka], keep);
                        for (int t = 0; t < TILE; ++t) a = __fadd_rn(a, __fmul_rn(Ps[warp][t], Vs[t][d]));
                        acc[ka] = a;
                    }
                }
            }
        }
    }
    if (active) {
        long long orow = (((long long)split * B + b) * Hq + hq) * Tq + tq;
        for (int k = 0; k < MAXD / 32; ++k) {
            int d = lane + 32 * k;
            if (d < D) part_acc[orow * D + d] = acc[k];
        }
        if (lane == 0) {
            part_ml[2 * orow] = m;
            part_ml[2 * orow + 1] = l;
        }
    }
}

// Merge the splits: out[row, d] = sum_s acc_s * (l_s e^(m_s - M) / sum_s' l_s' e^(m_s' - M)),
// acc_s being each split's weighted mean (again a convex combination).
extern "C" __global__ void attn_combine(const float* __restrict__ part_acc, const float* __restrict__ part_ml,
                                        int n_splits, long long rows, int D, float* __restrict__ out) {
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < rows * D;
         e += (long long)blockDim.x * gridDim.x) {
        long long row = e / D;
        int d = (int)(e % D);
        float M = NEG_INF;
        for (int s = 0; s < n_splits; ++s) M = fmaxf(M, part_ml[2 * (s * rows + row)]);
        float den = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            float ms = part_ml[2 * (s * rows + row)];
            if (ms == NEG_INF) continue;  // a split this query cannot see
            den = __fadd_rn(den, __fmul_rn(part_ml[2 * (s * rows + row) + 1], expf(ms - M)));
        }
        float num = 0.0f;
        for (int s = 0; s < n_splits; ++s) {
            float ms = part_ml[2 * (s * rows + row)];
            if (ms == NEG_INF) continue;
            float w = __fdiv_rn(__fmul_rn(part_ml[2 * (s * rows + row) + 1], expf(ms - M)), den);
            num = __fadd_rn(num, __fmul_rn(part_acc[(s * rows + row) * D + d], w));
        }
        out[e] = num;
    }
}
