// Shared device helpers: metadata / 16-bit conversions of docs/numerics.md §2, §4, §6.
// Every float operation is one explicitly rounded intrinsic (the modules are also compiled
// with --fmad=false); nothing here depends on CUDA headers, so NVRTC needs no include path.
#pragma once
#include "mixkvq_format.h"

#ifndef MIXKVQ_CPU_EMULATION
// Exact hardware conversions (round to nearest even, gradual underflow, no flush to zero).
__device__ __forceinline__ unsigned short mixkvq_f32_to_f16_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ float mixkvq_f16_bits_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

// Storage kinds of metadata and 16-bit data (MIXKVQ_KIND_*) come from mixkvq_format.h.

// §2 bfloat16: u' = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 on the float32 bits (finite inputs).
__device__ __forceinline__ unsigned short mixkvq_f32_to_bf16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
__device__ __forceinline__ float mixkvq_bf16_bits_to_f32(unsigned short h) {
    return __uint_as_float((unsigned int)h << 16);
}

__device__ __forceinline__ float mixkvq_half_to_f32(unsigned short h, int kind) {
    return kind == MIXKVQ_KIND_F16 ? mixkvq_f16_bits_to_f32(h) : mixkvq_bf16_bits_to_f32(h);
}
__device__ __forceinline__ unsigned short mixkvq_f32_to_half(float f, int kind) {
    return kind == MIXKVQ_KIND_F16 ? mixkvq_f32_to_f16_bits(f) : mixkvq_f32_to_bf16_bits(f);
}
// Whether a 16-bit pattern is +-Inf (the overflow of §2; inputs are finite, so never NaN).
__device__ __forceinline__ bool mixkvq_half_is_inf(unsigned short h, int kind) {
    return (h & 0x7FFFu) == (kind == MIXKVQ_KIND_F16 ? 0x7C00u : 0x7F80u);
}

// Metadata element i of a buffer stored as `kind` -> float32 (exact).
__device__ __forceinline__ float mixkvq_load_meta(const void* base, long long i, int kind) {
    if (kind == MIXKVQ_KIND_F32) return ((const float*)base)[i];
    return mixkvq_half_to_f32(((const unsigned short*)base)[i], kind);
}

// round_meta(v) stored at element i; returns the stored value as float32 and sets *inf.
__device__ __forceinline__ float mixkvq_store_meta(void* base, long long i, int kind, float v, bool* inf) {
    if (kind == MIXKVQ_KIND_F32) {
        ((float*)base)[i] = v;
        *inf = (__float_as_uint(v) & 0x7FFFFFFFu) == 0x7F800000u;
        return v;
    }
    unsigned short h = mixkvq_f32_to_half(v, kind);
    ((unsigned short*)base)[i] = h;
    *inf = mixkvq_half_is_inf(h, kind);
    return mixkvq_half_to_f32(h, kind);
}

// Code of element i of a row packed LSB-first (§5) with `bits` bits; row_bytes bounds reads.
// §5: byte k of a row's packed stream, from code_at(i) of the codes whose bits fall in it.
template <int BITS, class CodeAt>
__device__ __forceinline__ unsigned char mixkvq_pack_byte(int k, int n, CodeAt code_at) {
    int first = (8 * k) / BITS;
    int last = min(n - 1, (8 * k + 7) / BITS);
    unsigned int byte = 0;
    for (int i = first; i <= last; ++i) {
        unsigned int c = code_at(i);
        int shift = i * BITS - 8 * k;
        byte |= shift >= 0 ? (c << shift) : (c >> -shift);
    }
    return (unsigned char)(byte & 0xFFu);
}

__device__ __forceinline__ unsigned int mixkvq_read_code(const unsigned char* row, long long i, int bits, int row_bytes) {
    long long p = i * bits;
    int k = (int)(p >> 3), off = (int)(p & 7);
    unsigned int w = row[k];
    if (k + 1 < row_bytes) w |= (unsigned int)row[k + 1] << 8;
    return (w >> off) & ((1u << bits) - 1u);
}

// §3 step 5 for one element: code of x in a group with stored (s, z), L = 2^bits - 1.
__device__ __forceinline__ unsigned int mixkvq_code(float x, float s, float z, float L) {
    if (s == 0.0f) return 0u;
    float d = __fsub_rn(x, z);
    float t = __fdiv_rn(d, s);
    float c = rintf(t);
    c = fminf(fmaxf(c, 0.0f), L);
    return (unsigned int)c;
}

// §4: fl32(fl32(code * s) + z).
__device__ __forceinline__ float mixkvq_dequant(unsigned int code, float s, float z) {
    return __fadd_rn(__fmul_rn((float)code, s), z);
}
