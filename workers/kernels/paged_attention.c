/*
 * Decode attention over a paged KV cache, for CPUs.
 *
 * One query token per sequence. Keys and values are read in place from their blocks (no
 * gather into a padded copy), and each (sequence, KV head) pair is one work item: the query
 * heads that share the KV head are processed together, so every key and value is loaded once
 * per item. Softmax is computed online, one block at a time (as in FlashAttention). Scores
 * are computed eight tokens at a time and exponentiated eight lanes at a time.
 *
 * Layouts (row-major, contiguous but for q's rows):
 *   q             [num_seqs, num_q_heads, head_dim], q_stride elements from one row to the next
 *                 (q may be a view into the fused q/k/v projection's output)
 *   out           [num_seqs, num_q_heads, head_dim]
 *   k_cache/v     [num_kv_heads, num_blocks, block_size, head_dim]
 *   block_tables  [num_seqs, max_blocks]  (int64)
 *   context_lens  [num_seqs]              (int64)
 *   kv_of_q       [num_q_heads]           (int64): the KV head each query head reads
 *   k_scale/v     [num_kv_heads, num_blocks, block_size] float32, for an int8 cache only
 * Element types: float32, bfloat16, float16, for q/out and (separately) for the cache, and
 * int8 for the cache (each cached vector times its own scale); accumulation in float32. A
 * 16-bit or int8 cache is widened to float32 a block at a time (F16C on x86), so it halves
 * or quarters the bytes read, which bound this kernel.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256

#include "run_shares.h"
#include "vector_math.h"

typedef struct {
    void *out;
    const void *q, *k_cache, *v_cache;
    const float *k_scales, *v_scales;
    const int64_t *block_tables, *context_lens, *kv_of_q;
    int64_t num_q_heads, num_kv_heads, num_blocks, block_size, head_dim, max_blocks, window;
    int64_t q_stride;
    float scale;
    int dtype, cache_dtype;
    int64_t item_begin, item_end;
} job_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* A block of an int8 cache as floats: row t (head_dim values) times scales[t]. */
static inline const float *int8_as_f32(const int8_t *src, const float *scales, int64_t rows,
                                       int64_t D, float *buf) {
    for (int64_t t = 0; t < rows; t++) {
        const float scale = scales[t];
        for (int64_t d = 0; d < D; d++) buf[t * D + d] = (float)src[t * D + d] * scale;
    }
    return buf;
}

/* n elements as floats: float32 data is read in place, other types converted into buf. */
static inline const float *as_f32(int dtype, const void *base, int64_t offset, int64_t n,
                                  float *buf) {
    if (dtype == F32) return (const float *)base + offset;
    if (dtype == BF16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int64_t i = 0; i < n; i++) buf[i] = bf16_to_f32(src[i]);
    } else {
        const _Float16 *src = (const _Float16 *)base + offset;
        int64_t i = 0;
#ifdef __F16C__
        /* GCC does not vectorize the plain loop: eight at a time with F16C instead (5x). */
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
        for (; i < n; i++) buf[i] = (float)src[i];
    }
    return buf;
}

/* Four independent accumulators keep the FMA units busy instead of waiting on one chain. */
static inline float dot(const float *a, const float *b, int64_t n) {
    int64_t d = 0;
    float total = 0.f;
    if (n >= 32) {
        v8 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (; d + 32 <= n; d += 32) {
            s0 += LOAD8(a + d) * LOAD8(b + d);
            s1 += LOAD8(a + d + 8) * LOAD8(b + d + 8);
            s2 += LOAD8(a + d + 16) * LOAD8(b + d + 16);
            s3 += LOAD8(a + d + 24) * LOAD8(b + d + 24);
        }
        v8 s = (s0 + s1) + (s2 + s3);
        total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
    for (; d < n; d++) total += a[d] * b[d];
    return total;
}

/* acc[0:n] = acc * correction + sum_t p[t] * rows[t][0:n], rows of stride n. Even and odd
 * tokens go to separate accumulators, so consecutive FMAs do not wait on each other. */
static inline void accumulate(float *acc, float correction, const float *p, const float *rows,
                              int64_t lo, int64_t hi, int64_t n) {
    int64_t d = 0;
    for (; d + 32 <= n; d += 32) {
        v8 e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0}, o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
        int64_t t = lo;
        for (; t + 2 <= hi; t += 2) {
            const float *r = rows + t * n + d, *s = r + n;
            e0 += p[t] * LOAD8(r);
            e1 += p[t] * LOAD8(r + 8);
            e2 += p[t] * LOAD8(r + 16);
            e3 += p[t] * LOAD8(r + 24);
            o0 += p[t + 1] * LOAD8(s);
            o1 += p[t + 1] * LOAD8(s + 8);
            o2 += p[t + 1] * LOAD8(s + 16);
            o3 += p[t + 1] * LOAD8(s + 24);
        }
        if (t < hi) {
            const float *r = rows + t * n + d;
            e0 += p[t] * LOAD8(r);
            e1 += p[t] * LOAD8(r + 8);
            e2 += p[t] * LOAD8(r + 16);
            e3 += p[t] * LOAD8(r + 24);
        }
        *(v8u *)(acc + d) = LOAD8(acc + d) * correction + (e0 + o0);
        *(v8u *)(acc + d + 8) = LOAD8(acc + d + 8) * correction + (e1 + o1);
        *(v8u *)(acc + d + 16) = LOAD8(acc + d + 16) * correction + (e2 + o2);
        *(v8u *)(acc + d + 24) = LOAD8(acc + d + 24) * correction + (e3 + o3);
    }
    for (; d < n; d++) {
        float a = acc[d] * correction;
        for (int64_t t = lo; t < hi; t++) a += p[t] * rows[t * n + d];
        acc[d] = a;
    }
}

/* Eight dot products at once: scores[t] = q . rows[t] for t in 0..7 (rows of stride n). Each
 * token keeps a vector of partial sums; a shuffle tree then adds the eight vectors across
 * their lanes together, instead of eight separate horizontal sums. */
#if defined(__clang__) || __GNUC__ >= 12
#define HAVE_SHUFFLEVECTOR 1
#define PAIRWISE(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
static inline v8 dot8(const float *q, const float *rows, int64_t n) {
    v8 a[8] = {{0}};
    for (int64_t d = 0; d < n; d += 8) {
        const v8 qd = LOAD8(q + d);
        for (int t = 0; t < 8; t++) a[t] += qd * LOAD8(rows + t * n + d);
    }
    v8 b[4], c[2];
    for (int i = 0; i < 4; i++)
        b[i] = PAIRWISE(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
               PAIRWISE(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
    for (int i = 0; i < 2; i++)
        c[i] = PAIRWISE(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
               PAIRWISE(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
    return PAIRWISE(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
           PAIRWISE(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}
#endif

/* Scores of tokens [lo, hi) of a block for one query head, softmax-weighted into acc with the
 * running max m and sum l updated (online softmax). */
static inline void attend_block(const float *q, const float *keys, const float *values,
                                float *scores, float *acc, float *m, float *l, int64_t lo,
                                int64_t hi, int64_t D, float scale) {
    int64_t t = lo;
#ifdef HAVE_SHUFFLEVECTOR
    if (D % 8 == 0)
        for (; t + 8 <= hi; t += 8) *(v8u *)(scores + t) = dot8(q, keys + t * D, D) * scale;
#endif
    for (; t < hi; t++) scores[t] = dot(q, keys + t * D, D) * scale;
    float block_max = *m;
    for (t = lo; t < hi; t++)
        if (scores[t] > block_max) block_max = scores[t];
    const float correction = expf(*m - block_max);
    float sum = *l * correction;
    t = lo;
    for (; t + 8 <= hi; t += 8) {
        const v8 p = exp8(LOAD8(scores + t) - block_max);
        *(v8u *)(scores + t) = p;
        sum += ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
    }
    for (; t < hi; t++) {
        scores[t] = expf(scores[t] - block_max);
        sum += scores[t];
    }
    *l = sum;
    *m = block_max;
    accumulate(acc, correction, scores, values, lo, hi, D);
}

static void *attention_worker(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t D = j->head_dim, BS = j->block_size;
    static __thread float q[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];
    static __thread float kbuf[MAX_BLOCK * MAX_HEAD_DIM], vbuf[MAX_BLOCK * MAX_HEAD_DIM];
    static __thread float scores[MAX_BLOCK];
    float m[MAX_GROUP], l[MAX_GROUP];
    int64_t heads[MAX_GROUP];
    for (int64_t item = j->item_begin; item < j->item_end; item++) {
        const int64_t s = item / j->num_kv_heads, kvh = item % j->num_kv_heads;
        int64_t g = 0;
        for (int64_t h = 0; h < j->num_q_heads; h++)
            if (j->kv_of_q[h] == kvh) heads[g++] = h;
        if (g == 0) continue;
        for (int64_t i = 0; i < g; i++) {
            const float *src = as_f32(j->dtype, j->q, s * j->q_stride + heads[i] * D, D, kbuf);
            memcpy(q + i * D, src, D * sizeof(float));
            m[i] = -INFINITY;
            l[i] = 0.f;
        }
        memset(acc, 0, sizeof(float) * g * D);
        const int64_t ctx = j->context_lens[s];
        const int64_t first = j->window > 0 && ctx > j->window ? ctx - j->window : 0;
        const int64_t *table = j->block_tables + s * j->max_blocks;
        for (int64_t start = first - first % BS; start < ctx; start += BS) {
            const int64_t base = (kvh * j->num_blocks + table[start / BS]) * BS * D;
            const int64_t lo = start < first ? first - start : 0;
            const int64_t hi = ctx - start < BS ? ctx - start : BS;
            if (start + BS < ctx) {
                /* Blocks are scattered: fetch the next one while this one is computed. */
                const int64_t next = (kvh * j->num_blocks + table[start / BS + 1]) * BS * D;
                const int64_t element =
                    j->cache_dtype == F32 ? 4 : j->cache_dtype == I8 ? 1 : 2;
                const int64_t bytes = BS * D * element;
                const char *nk = (const char *)j->k_cache + next * element;
                const char *nv = (const char *)j->v_cache + next * element;
                for (int64_t b = 0; b < bytes; b += 64) {
                    __builtin_prefetch(nk + b);
                    __builtin_prefetch(nv + b);
                }
            }
            const float *keys, *values;
            if (j->cache_dtype == I8) {
                keys = int8_as_f32((const int8_t *)j->k_cache + base, j->k_scales + base / D, hi,
                                   D, kbuf);
                values = int8_as_f32((const int8_t *)j->v_cache + base, j->v_scales + base / D,
                                     hi, D, vbuf);
            } else {
                keys = as_f32(j->cache_dtype, j->k_cache, base, BS * D, kbuf);
                values = as_f32(j->cache_dtype, j->v_cache, base, BS * D, vbuf);
            }
            for (int64_t i = 0; i < g; i++)
                attend_block(q + i * D, keys, values, scores, acc + i * D, &m[i], &l[i], lo,
                             hi, D, j->scale);
        }
        for (int64_t i = 0; i < g; i++) {
            float *ai = acc + i * D;
            const float inv = 1.f / l[i];
            for (int64_t d = 0; d < D; d++) ai[d] *= inv;
            store_row(j->dtype, j->out, (s * j->num_q_heads + heads[i]) * D, ai, D);
        }
    }
    return NULL;
}

/* Splits the work items (sequence, KV head), longest sequences first, into one contiguous
 * range per thread of about equal cost: an item costs its context length (plus a little
 * fixed work), so an even split by count would give the first thread all the long ones. */
static void balance(const int64_t *context_lens, int64_t num_kv_heads, int64_t window,
                    int64_t items, int num_threads, int64_t *bounds) {
    int64_t total = 0;
    for (int64_t i = 0; i < items; i++) {
        const int64_t ctx = context_lens[i / num_kv_heads];
        total += (window > 0 && ctx > window ? window : ctx) + 16;
    }
    bounds[0] = 0;
    int64_t item = 0, done = 0;
    for (int t = 1; t < num_threads; t++) {
        const int64_t target = total * t / num_threads;
        while (item < items && done < target) {
            const int64_t ctx = context_lens[item / num_kv_heads];
            done += (window > 0 && ctx > window ? window : ctx) + 16;
            item++;
        }
        bounds[t] = item;
    }
    bounds[num_threads] = items;
}

/* 0 when the arguments are within the kernel's limits and every block table is in the pool;
 * else what paged_decode_attention returns. */
static int check_decode_attention(const float *k_scales, const float *v_scales,
                                  const int64_t *block_tables, int64_t max_blocks,
                                  const int64_t *context_lens, int64_t num_seqs,
                                  int64_t num_q_heads, int64_t num_blocks, int64_t block_size,
                                  int64_t head_dim, int dtype, int cache_dtype) {
    if (head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK || num_q_heads > MAX_GROUP ||
        dtype < F32 || dtype > F16 || cache_dtype < F32 || cache_dtype > I8 ||
        (cache_dtype == I8 && (k_scales == NULL || v_scales == NULL)))
        return -1;
    for (int64_t s = 0; s < num_seqs; s++) {
        if (context_lens[s] < 0 || context_lens[s] > max_blocks * block_size) return -2;
        for (int64_t b = 0; b < (context_lens[s] + block_size - 1) / block_size; b++)
            if (block_tables[s * max_blocks + b] < 0 ||
                block_tables[s * max_blocks + b] >= num_blocks)
                return -2;
    }
    return 0;
}

/* dtype (q, out) and cache_dtype (k_cache, v_cache): 0 float32, 1 bfloat16, 2 float16, and
 * for the cache 3 int8 (k_scales, v_scales then hold each cached vector's scale; else NULL).
 * Returns 0; -1 when a size is over the limits above (the caller then uses its fallback);
 * -2 when a context is longer than its block table or a block is outside the pool (nothing
 * is read then). */
int paged_decode_attention(void *out, const void *q, int64_t q_stride, const void *k_cache,
                           const void *v_cache, const float *k_scales, const float *v_scales,
                           const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, const int64_t *kv_of_q,
                           int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                           int64_t num_blocks, int64_t block_size, int64_t head_dim,
                           float scale, int64_t window, int dtype, int cache_dtype,
                           int num_threads) {
    const int status = check_decode_attention(k_scales, v_scales, block_tables, max_blocks,
                                              context_lens, num_seqs, num_q_heads, num_blocks,
                                              block_size, head_dim, dtype, cache_dtype);
    if (status) return status;
    const int64_t items = num_seqs * num_kv_heads;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > items) num_threads = (int)items;
    int64_t bounds[MAX_THREADS + 1];
    balance(context_lens, num_kv_heads, window, items, num_threads, bounds);
    job_t jobs[MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        job_t jb = {out, q, k_cache, v_cache, k_scales, v_scales, block_tables, context_lens,
                    kv_of_q, num_q_heads, num_kv_heads, num_blocks, block_size, head_dim,
                    max_blocks, window, q_stride, scale, dtype, cache_dtype, bounds[t],
                    bounds[t + 1]};
        jobs[t] = jb;
    }
    run_shares(attention_worker, jobs, sizeof(job_t), num_threads);
    return 0;
}
