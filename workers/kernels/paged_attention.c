/*
 * Decode attention over a paged KV cache, for CPUs.
 *
 * One query token per sequence. Keys and values are read in place from their blocks (no
 * gather into a padded copy), and each (sequence, KV head) pair is one work item: the query
 * heads that share the KV head are processed together, so every key and value is loaded once
 * per item. Softmax is computed online, one block at a time (as in FlashAttention).
 *
 * Layouts (row-major, contiguous):
 *   q, out        [num_seqs, num_q_heads, head_dim]
 *   k_cache/v     [num_kv_heads, num_blocks, block_size, head_dim]
 *   block_tables  [num_seqs, max_blocks]  (int64)
 *   context_lens  [num_seqs]              (int64)
 *   kv_of_q       [num_q_heads]           (int64): the KV head each query head reads
 * Element types: float32, bfloat16, float16; accumulation in float32.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_GROUP 64
#define MAX_HEAD_DIM 256
#define MAX_BLOCK 256

typedef struct {
    void *out;
    const void *q, *k_cache, *v_cache;
    const int64_t *block_tables, *context_lens, *kv_of_q;
    int64_t num_seqs, num_q_heads, num_kv_heads, num_blocks, block_size, head_dim, max_blocks;
    int64_t window;
    float scale;
    int64_t item_begin, item_end;
} job_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* Loads a row of n elements of the given type into floats. */
#define DEFINE_LOAD(NAME, T, CONV)                                              \
    static inline void NAME(const void *base, int64_t offset, int64_t n, float *dst) { \
        const T *src = (const T *)base + offset;                                \
        for (int64_t i = 0; i < n; i++) dst[i] = CONV(src[i]);                  \
    }
#define IDENTITY(x) (x)
#define HALF_TO_F32(x) ((float)(x))
DEFINE_LOAD(load_f32, float, IDENTITY)
DEFINE_LOAD(load_bf16, uint16_t, bf16_to_f32)
DEFINE_LOAD(load_f16, _Float16, HALF_TO_F32)

static inline void store_f32(void *base, int64_t offset, int64_t n, const float *src) {
    memcpy((float *)base + offset, src, n * sizeof(float));
}
static inline void store_bf16(void *base, int64_t offset, int64_t n, const float *src) {
    uint16_t *dst = (uint16_t *)base + offset;
    for (int64_t i = 0; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}
static inline void store_f16(void *base, int64_t offset, int64_t n, const float *src) {
    _Float16 *dst = (_Float16 *)base + offset;
    for (int64_t i = 0; i < n; i++) dst[i] = (_Float16)src[i];
}

#define DEFINE_WORKER(NAME, LOAD, STORE)                                                   \
static void *NAME(void *arg) {                                                             \
    const job_t *j = (const job_t *)arg;                                                   \
    const int64_t D = j->head_dim, BS = j->block_size;                                     \
    float q[MAX_GROUP * MAX_HEAD_DIM], acc[MAX_GROUP * MAX_HEAD_DIM];                      \
    float row[MAX_HEAD_DIM], scores[MAX_GROUP * MAX_BLOCK];                                \
    float m[MAX_GROUP], l[MAX_GROUP];                                                      \
    int64_t heads[MAX_GROUP];                                                              \
    for (int64_t item = j->item_begin; item < j->item_end; item++) {                       \
        const int64_t s = item / j->num_kv_heads, kvh = item % j->num_kv_heads;            \
        int64_t g = 0;                                                                     \
        for (int64_t h = 0; h < j->num_q_heads; h++)                                       \
            if (j->kv_of_q[h] == kvh) heads[g++] = h;                                      \
        if (g == 0) continue;                                                              \
        for (int64_t i = 0; i < g; i++) {                                                  \
            LOAD(j->q, (s * j->num_q_heads + heads[i]) * D, D, q + i * D);                 \
            m[i] = -INFINITY;                                                              \
            l[i] = 0.f;                                                                    \
        }                                                                                  \
        memset(acc, 0, sizeof(float) * g * D);                                             \
        const int64_t ctx = j->context_lens[s];                                            \
        const int64_t first = j->window > 0 && ctx > j->window ? ctx - j->window : 0;      \
        const int64_t *table = j->block_tables + s * j->max_blocks;                        \
        for (int64_t start = first - first % BS; start < ctx; start += BS) {               \
            const int64_t block = table[start / BS];                                       \
            const int64_t base = (kvh * j->num_blocks + block) * BS * D;                   \
            const int64_t lo = start < first ? first - start : 0;                          \
            const int64_t hi = ctx - start < BS ? ctx - start : BS;                        \
            for (int64_t t = lo; t < hi; t++) {                                            \
                LOAD(j->k_cache, base + t * D, D, row);                                    \
                for (int64_t i = 0; i < g; i++) {                                          \
                    const float *qi = q + i * D;                                           \
                    float dot = 0.f;                                                       \
                    for (int64_t d = 0; d < D; d++) dot += qi[d] * row[d];                 \
                    scores[i * BS + t] = dot * j->scale;                                   \
                }                                                                          \
            }                                                                              \
            for (int64_t i = 0; i < g; i++) {                                              \
                float block_max = m[i];                                                    \
                for (int64_t t = lo; t < hi; t++)                                          \
                    if (scores[i * BS + t] > block_max) block_max = scores[i * BS + t];    \
                const float correction = expf(m[i] - block_max);                           \
                l[i] *= correction;                                                        \
                float *ai = acc + i * D;                                                   \
                for (int64_t d = 0; d < D; d++) ai[d] *= correction;                       \
                m[i] = block_max;                                                          \
                for (int64_t t = lo; t < hi; t++) {                                        \
                    const float p = expf(scores[i * BS + t] - block_max);                  \
                    scores[i * BS + t] = p;                                                \
                    l[i] += p;                                                             \
                }                                                                          \
            }                                                                              \
            for (int64_t t = lo; t < hi; t++) {                                            \
                LOAD(j->v_cache, base + t * D, D, row);                                    \
                for (int64_t i = 0; i < g; i++) {                                          \
                    const float p = scores[i * BS + t];                                    \
                    float *ai = acc + i * D;                                               \
                    for (int64_t d = 0; d < D; d++) ai[d] += p * row[d];                   \
                }                                                                          \
            }                                                                              \
        }                                                                                  \
        for (int64_t i = 0; i < g; i++) {                                                  \
            float *ai = acc + i * D;                                                       \
            const float inv = 1.f / l[i];                                                  \
            for (int64_t d = 0; d < D; d++) ai[d] *= inv;                                  \
            STORE(j->out, (s * j->num_q_heads + heads[i]) * D, D, ai);                     \
        }                                                                                  \
    }                                                                                      \
    return NULL;                                                                           \
}

DEFINE_WORKER(worker_f32, load_f32, store_f32)
DEFINE_WORKER(worker_bf16, load_bf16, store_bf16)
DEFINE_WORKER(worker_f16, load_f16, store_f16)

/* dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0, or -1 when a size is over the limits
 * above (the caller then uses its fallback). */
int paged_decode_attention(void *out, const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_tables, int64_t max_blocks,
                           const int64_t *context_lens, const int64_t *kv_of_q,
                           int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                           int64_t num_blocks, int64_t block_size, int64_t head_dim,
                           float scale, int64_t window, int dtype, int num_threads) {
    if (head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK || num_q_heads > MAX_GROUP)
        return -1;
    void *(*worker)(void *) = dtype == 0 ? worker_f32 : dtype == 1 ? worker_bf16 : worker_f16;
    const int64_t items = num_seqs * num_kv_heads;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > 64) num_threads = 64;
    if (num_threads > items) num_threads = (int)items;
    job_t jobs[64];
    pthread_t threads[64];
    for (int t = 0; t < num_threads; t++) {
        job_t jb = {out, q, k_cache, v_cache, block_tables, context_lens, kv_of_q,
                    num_seqs, num_q_heads, num_kv_heads, num_blocks, block_size, head_dim,
                    max_blocks, window, scale, items * t / num_threads,
                    items * (t + 1) / num_threads};
        jobs[t] = jb;
    }
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        if (pthread_create(&threads[t], NULL, worker, &jobs[t]) != 0) break;
        started = t;
    }
    worker(&jobs[0]);
    /* Threads that could not be started: do their share here. */
    for (int t = started + 1; t < num_threads; t++) worker(&jobs[t]);
    for (int t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    return 0;
}
