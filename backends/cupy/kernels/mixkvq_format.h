// Generated from mixkvq/format.py by mixkvq.format.c_header(); do not edit.
// The format's constants for the C and CUDA kernels (docs/numerics.md).
#pragma once
#define MIXKVQ_FORMAT_VERSION 1
#define MIXKVQ_HIGH_BITS 16
#define MIXKVQ_TIER_SLOTS 17
#define MIXKVQ_MAX_CODE_BITS 8
#define MIXKVQ_FIXED_ONE 65536.0f
#define MIXKVQ_FIXED_MAX 1099511627776.0f
#define MIXKVQ_FLOAT16_MAX 65504.0f
#define MIXKVQ_KIND_F16 0
#define MIXKVQ_KIND_BF16 1
#define MIXKVQ_KIND_F32 2
