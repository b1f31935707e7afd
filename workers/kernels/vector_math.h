/* What the kernels in this folder share: element type codes, eight-float vectors (GCC/Clang
 * vector extensions: AVX on x86, NEON pairs on ARM, scalar elsewhere), an exp on eight lanes,
 * and float32 rows stored as 16-bit floats. */
#ifndef SHARDSERVE_VECTOR_MATH_H
#define SHARDSERVE_VECTOR_MATH_H

#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 };

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4))); /* unaligned loads/stores */
#define LOAD8(p) (*(const v8u *)(p))

typedef int32_t v8i __attribute__((vector_size(32)));

/* exp on eight lanes, for x <= 0: x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series
 * to r^6 (relative error ~1e-7), times 2^n built in the exponent bits. */
static inline v8 exp8(v8 x) {
    const v8 lo = {-87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f, -87.f};
    const v8i below = x < lo; /* there exp underflows float's normal range */
    x = (v8)(((v8i)lo & below) | ((v8i)x & ~below));
    const v8 magic = {12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f, 12582912.f,
                      12582912.f, 12582912.f}; /* 1.5 * 2^23: adding it rounds to an integer */
    const v8 shifted = x * 1.44269504f + magic;
    const v8 n = shifted - magic;
    const v8 r = (x - n * 0.693359375f) + n * 2.12194440e-4f; /* ln2 split in two parts */
    v8 p = r * (1.f / 720) + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    const v8i bits = ((v8i)shifted - 0x4B400000 + 127) << 23;
    return p * (v8)bits;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fff + ((u >> 16) & 1); /* round to nearest even, as torch's .to(bfloat16) */
    return (uint16_t)(u >> 16);
}

static inline void store_row(int dtype, void *base, int64_t offset, const float *src,
                             int64_t n) {
    if (dtype == F32) {
        memcpy((float *)base + offset, src, n * sizeof(float));
    } else if (dtype == BF16) {
        uint16_t *dst = (uint16_t *)base + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
    } else {
        _Float16 *dst = (_Float16 *)base + offset;
        int64_t i = 0;
#ifdef __F16C__
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(dst + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; i < n; i++) dst[i] = (_Float16)src[i];
    }
}

#endif
