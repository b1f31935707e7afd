/*
 * Element-wise steps of a decoder layer, each fused into one pass over its rows, for CPUs.
 *
 * torch runs each of these as several small ops (RMSNorm alone is add, pow, mean, add, rsqrt,
 * mul, mul), each a dispatch, an allocation and a pass over memory; at decode batch sizes the
 * overhead is most of their cost. Every function computes the same float32 operations as the
 * torch code it replaces (workers/layers/fused.py holds that reference), and this file is
 * built with -ffp-contract=off so that a * b + c stays two roundings, as in torch:
 *   - rotary embedding and the cache write are bit-identical to torch;
 *   - RMSNorm differs only in the order of the sum of squares (four vector accumulators);
 *   - SiLU uses an exp accurate to ~1e-7 relative instead of torch's SLEEF exp.
 * Rows are split over threads (OpenMP, torch's own pool) only when there is enough work for
 * a parallel region to pay.
 */
#include <math.h>

#include "vector_math.h"

/* The same rounding as torch also where decode_layers.c compiles this file into its own. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")

#define PARALLEL_ELEMENTS 65536

/* Four vector accumulators: a single one would make every add wait on the previous one. */
static inline float sum_of_squares(const float *x, int64_t n) {
    v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        const v8 a = LOAD8(x + i), b = LOAD8(x + i + 8), c = LOAD8(x + i + 16),
                 d = LOAD8(x + i + 24);
        s0 += a * a;
        s1 += b * b;
        s2 += c * c;
        s3 += d * d;
    }
    const v8 s = (s0 + s1) + (s2 + s3);
    float total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) total += x[i] * x[i];
    return total;
}

/* summed = x + residual, then out = weight * (summed * rsqrt(mean(summed^2) + eps)), for rows
 * [first, end). Without a residual (NULL) the norm is of x itself and summed is not written.
 * summed may be residual itself (updated in place). All [rows, n] contiguous. */
static void add_rms_norm_rows(float *out, float *summed, const float *x, const float *residual,
                              const float *weight, int64_t first, int64_t end, int64_t n,
                              float eps) {
    for (int64_t r = first; r < end; r++) {
        const float *src = x + r * n;
        if (residual != NULL) {
            const float *res = residual + r * n;
            float *sum_row = summed + r * n;
            for (int64_t i = 0; i < n; i++) sum_row[i] = res[i] + src[i];
            src = sum_row;
        }
        const float inv = 1.f / sqrtf(sum_of_squares(src, n) / (float)n + eps);
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i++) o[i] = weight[i] * (src[i] * inv);
    }
}

void add_rms_norm_f32(float *out, float *summed, const float *x, const float *residual,
                      const float *weight, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows * n >= PARALLEL_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        add_rms_norm_rows(out, summed, x, residual, weight, r, r + 1, n, eps);
}

static inline float silu(float g) {
    return g / (1.f + expf(-g));
}

/* out[r] = silu(gate_up[r, :n]) * gate_up[r, n:2n] for rows [first, end): the gated MLP's
 * activation, reading the fused gate/up projection's output directly. out [rows, n],
 * gate_up [rows, 2n]. */
static void silu_and_mul_rows(float *out, const float *gate_up, int64_t first, int64_t end,
                              int64_t n) {
    for (int64_t r = first; r < end; r++) {
        const float *g = gate_up + r * 2 * n, *u = g + n;
        float *o = out + r * n;
        int64_t i = 0;
        const v8 one = {1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f, 1.f};
        for (; i + 8 <= n; i += 8) {
            const v8 x = LOAD8(g + i);
            const v8i negative = x < (v8){0};
            /* exp(-|x|) <= 1 keeps exp8 in its range: sigmoid(x) = 1 / (1 + e) for x >= 0,
             * e / (1 + e) for x < 0, with e = exp(-|x|). */
            const v8 absx = (v8)((v8i)x & (v8i){0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff,
                                                0x7fffffff, 0x7fffffff, 0x7fffffff, 0x7fffffff});
            const v8 e = exp8(-absx);
            const v8 numerator = (v8)(((v8i)e & negative) | ((v8i)one & ~negative));
            *(v8u *)(o + i) = x * (numerator / (one + e)) * LOAD8(u + i);
        }
        for (; i < n; i++) o[i] = silu(g[i]) * u[i];
    }
}

void silu_and_mul_f32(float *out, const float *gate_up, int64_t rows, int64_t n) {
#pragma omp parallel for if (rows * n >= PARALLEL_ELEMENTS) schedule(static)
    for (int64_t r = 0; r < rows; r++) silu_and_mul_rows(out, gate_up, r, r + 1, n);
}

/* Symmetric int8 with one scale per vector: scale = max|x| / 127, q = round(x / scale), the
 * same float32 operations as the torch reference (round half to even). */
static void store_int8_row(int8_t *dst, float *scale_out, const float *src, int64_t n) {
    float amax = 0.f;
    for (int64_t i = 0; i < n; i++) amax = fmaxf(amax, fabsf(src[i]));
    const float scale = amax / 127.f;
    *scale_out = scale;
    for (int64_t i = 0; i < n; i++)
        dst[i] = scale > 0.f ? (int8_t)nearbyintf(src[i] / scale) : 0;
}

/* x * cos + rotate_half(x) * sin on one head, in place: rotate_half(x) is (-x2, x1) for the
 * halves x1, x2, so element i and i + D/2 are computed from the same pair. */
static inline void rotate_head(float *x, const float *cos, const float *sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] + (-x2) * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/* Rows [first, end) of rotary_and_cache_f32 below, its arguments checked. */
static void rotary_and_cache_rows(float *qkv, int64_t first, int64_t end, int64_t row_stride,
                                  int64_t num_q, int64_t num_kv, int64_t D, const float *cos,
                                  const float *sin, const int64_t *slots, void *k_cache,
                                  void *v_cache, float *k_scales, float *v_scales,
                                  int64_t total_slots, int cache_dtype) {
    for (int64_t r = first; r < end; r++) {
        float *row = qkv + r * row_stride;
        const float *c = cos + r * D, *s = sin + r * D;
        for (int64_t h = 0; h < num_q + num_kv; h++) rotate_head(row + h * D, c, s, D);
        const float *k = row + num_q * D, *v = k + num_kv * D;
        for (int64_t h = 0; h < num_kv; h++) {
            const int64_t slot = h * total_slots + slots[r];
            if (cache_dtype == I8) {
                store_int8_row((int8_t *)k_cache + slot * D, k_scales + slot, k + h * D, D);
                store_int8_row((int8_t *)v_cache + slot * D, v_scales + slot, v + h * D, D);
            } else {
                store_row(cache_dtype, k_cache, slot * D, k + h * D, D);
                store_row(cache_dtype, v_cache, slot * D, v + h * D, D);
            }
        }
    }
}

/* 0 when rotary_and_cache can run: -1 for an odd head_dim or an unknown cache dtype, -2 for a
 * slot outside the cache. */
static int check_rotary_and_cache(int64_t rows, int64_t head_dim, const int64_t *slots,
                                  const float *k_scales, const float *v_scales,
                                  int64_t total_slots, int cache_dtype) {
    if (head_dim % 2 || cache_dtype < F32 || cache_dtype > I8 ||
        (cache_dtype == I8 && (k_scales == NULL || v_scales == NULL)))
        return -1;
    for (int64_t r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= total_slots) return -2;
    return 0;
}

/* For each token row of the fused q/k/v projection ([rows, row_stride], q heads then k heads
 * then v heads, each of head_dim): rotary on q and k in place, then k and v stored at the
 * token's cache slot (caches [num_kv, total_slots, head_dim] of cache_dtype; for int8 also
 * each vector's scale in k_scales/v_scales [num_kv, total_slots]). cos, sin: [rows, head_dim].
 * Returns 0; -1 for an odd head_dim or an unknown cache dtype, -2 for a
 * slot outside the cache (nothing is written then). */
int rotary_and_cache_f32(float *qkv, int64_t rows, int64_t row_stride, int64_t num_q,
                         int64_t num_kv, int64_t head_dim, const float *cos, const float *sin,
                         const int64_t *slots, void *k_cache, void *v_cache, float *k_scales,
                         float *v_scales, int64_t total_slots, int cache_dtype) {
    const int status = check_rotary_and_cache(rows, head_dim, slots, k_scales, v_scales,
                                              total_slots, cache_dtype);
    if (status) return status;
#pragma omp parallel for if (rows * (num_q + 2 * num_kv) * head_dim >= PARALLEL_ELEMENTS) \
    schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rotary_and_cache_rows(qkv, r, r + 1, row_stride, num_q, num_kv, head_dim, cos, sin,
                              slots, k_cache, v_cache, k_scales, v_scales, total_slots,
                              cache_dtype);
    return 0;
}

#pragma GCC pop_options
