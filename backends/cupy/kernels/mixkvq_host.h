// mixkvq_host.h — the CUDA built-ins of the scalar numerics, for a host (CPU) compile.
//
// mixkvq_common.cuh is written in CUDA C. Included after this header, it compiles as
// plain C++ with the same rounding: the __*_rn intrinsics are the IEEE operations (the
// translation units are built with -ffp-contract=off and without -ffast-math, so nothing
// is fused or reordered) and the fp16 conversions are bit-exact software versions of
// cvt.rn.f16.f32 / cvt.f32.f16. Used by the CUDA-on-CPU emulation (cuda_cpu_compat.h) and
// by the native CPU backend (backends/cpu).
#pragma once
#ifndef MIXKVQ_CPU_EMULATION
#define MIXKVQ_CPU_EMULATION 1
#endif

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict

// ---- integer min/max of the CUDA device library -------------------------------------------
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }

// ---- float intrinsics -------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __ll2float_rn(long long v) { return (float)v; }  // cvtsi2ss: nearest even
inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }

// fp16 <-> fp32 on bit patterns (what the device helpers in mixkvq_common.cuh do with cvt).
inline unsigned short mixkvq_f32_to_f16_bits(float f) {
    unsigned int u = __float_as_uint(f);
    unsigned int sign = (u >> 16) & 0x8000u;
    unsigned int a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) return (unsigned short)(sign | (a > 0x7F800000u ? 0x7E00u : 0x7C00u));
    if (a >= 0x477FF000u) return (unsigned short)(sign | 0x7C00u);  // rounds to >= 65520: Inf
    if (a < 0x38800000u) {  // below 2^-14: a float16 subnormal (or zero)
        if (a < 0x33000000u) return (unsigned short)sign;  // <= 2^-25: rounds to 0 (tie -> even 0)
        unsigned int e = a >> 23;                // biased exponent, 102..112
        unsigned int m = (a & 0x7FFFFFu) | 0x800000u;
        unsigned int shift = 126u - e;           // value = m * 2^(e-150); unit 2^-24
        unsigned int q = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) ++q;
        return (unsigned short)(sign | q);
    }
    unsigned int q = a - 0x38000000u;            // rebias 127 -> 15 (exponent field - 112)
    unsigned int rem = q & 0x1FFFu;
    q >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) ++q;  // carry may bump the exponent
    return (unsigned short)(sign | q);
}

inline float mixkvq_f16_bits_to_f32(unsigned short h) {
    unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    unsigned int e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return __uint_as_float(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        float v = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
