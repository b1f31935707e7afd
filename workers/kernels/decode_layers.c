/* A pipeline stage's decoder layers for a step of decodes only (one new token per sequence),
 * float32, one tensor-parallel rank, in one C call.
 *
 * At batch 1 a decode step is ~270 small calls (per layer: two norms, four linears, rotary
 * with the cache write, attention, SiLU); from Python each costs tens of microseconds of
 * dispatch and allocation, and every parallel region wakes torch's OpenMP workers again.
 * That was about as long as streaming the weights itself. Here the whole stage runs inside
 * one parallel region: each step of a layer is split over the threads and ends at a barrier.
 *
 * The work is the other kernels' own code (this file compiles them in), split the same way
 * (columns by panel, attention by sequence and KV head, element-wise steps by row), so the
 * results are bit-identical to calling them one by one: workers/layers/decode_layers.py falls
 * back to that path wherever this one does not apply, and the tests compare the two.
 */
#include "gemm.c"
#include "paged_attention.c"
#include "fused.c"

#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    const void *packed;    /* panels of float32 or int8 (gemm.c) */
    const uint8_t *places; /* 2:4 sparse weights: where each kept value sits; NULL: dense */
    const float *scale;    /* int8 weights: one per output column; NULL: float32 */
    const float *bias;     /* NULL: none */
    int64_t n, k, wtype;
} Linear;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights */
    Linear qkv, o, gate_up, down;
    void *k_cache, *v_cache;             /* [num_kv, num_blocks, block_size, head_dim] */
    float *k_scales, *v_scales;          /* an int8 cache's scales, else NULL */
} Layer;

typedef struct {
    int64_t rows, hidden_size, intermediate_size, num_q, num_kv, head_dim;
    float eps, scale;
    int64_t window; /* sliding window, 0: none */
    const float *cos, *sin;           /* [rows, head_dim] */
    const int64_t *slots;             /* [rows]: each new token's cache slot */
    const int64_t *block_tables;      /* [rows, max_blocks] */
    int64_t max_blocks;
    const int64_t *context_lens;      /* [rows] */
    const int64_t *kv_of_q;           /* [num_q] */
    int64_t num_blocks, block_size;
    int cache_dtype;
    /* In: hidden, the stage's input (the residual stream). Out: hidden, the last layer's
     * output, and stream, the residual stream it adds to (both [rows, hidden_size]), as the
     * loop over LlamaDecoderLayer leaves them. */
    float *hidden, *stream;
    /* Scratch: [rows, hidden], [rows, (num_q + 2 num_kv) head_dim], [rows, num_q head_dim],
     * [rows, 2 intermediate], [rows, intermediate]. */
    float *normed, *qkv, *attended, *gate_up, *activated;
} Step;

static inline void linear_share(const Linear *w, const float *x, int64_t m, float *y, int t,
                                int num_threads) {
    const Job job = panels_share(x, m, w->k, w->packed, w->places, (int)w->wtype, w->scale,
                                 w->n, w->k, w->bias, y, w->n, t, num_threads);
    panels_worker((void *)&job);
}

/* This thread's rows of [0, rows) (element-wise steps split by row). */
#define MY_ROWS(rows, t, T) ((rows) * (t) / (T)), ((rows) * ((t) + 1) / (T))

int decode_layers_threaded(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Returns 0; -1 where the attention or rotary kernels do not take these sizes (the caller
 * runs its other path); -2 for a cache slot or block outside the pool (nothing is run). */
int decode_layers_f32(const Layer *layers, int64_t num_layers, const Step *s,
                      int num_threads) {
    const int64_t m = s->rows, H = s->hidden_size, I = s->intermediate_size, D = s->head_dim;
    const int64_t total_slots = s->num_blocks * s->block_size;
    int status = check_rotary_and_cache(m, D, s->slots, layers[0].k_scales, layers[0].v_scales,
                                        total_slots, s->cache_dtype);
    if (status == 0)
        status = check_decode_attention(layers[0].k_scales, layers[0].v_scales, s->block_tables,
                                        s->max_blocks, s->context_lens, m, s->num_q,
                                        s->num_blocks, s->block_size, D, F32, s->cache_dtype);
    if (status) return status;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    const int64_t items = m * s->num_kv;
    const int attention_threads = num_threads < items ? num_threads : (int)items;
    int64_t bounds[MAX_THREADS + 1];
    balance(s->context_lens, s->num_kv, s->window, items, attention_threads, bounds);
    const int64_t qkv_width = (s->num_q + 2 * s->num_kv) * D;
    float *stream = s->stream, *out = s->hidden;
    memcpy(stream, s->hidden, m * H * sizeof(float));

#pragma omp parallel num_threads(num_threads)
    {
#ifdef _OPENMP
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        const int t = 0, T = 1;
#endif
        for (int64_t l = 0; l < num_layers; l++) {
            const Layer *w = &layers[l];
            /* The first layer norms its input, the stream itself; every other adds the
             * previous sublayer's output to the stream first. */
            const int first = l == 0;
            add_rms_norm_rows(s->normed, stream, first ? stream : out, first ? NULL : stream,
                              w->input_norm, MY_ROWS(m, t, T), H, s->eps);
#pragma omp barrier
            linear_share(&w->qkv, s->normed, m, s->qkv, t, T);
#pragma omp barrier
            rotary_and_cache_rows(s->qkv, MY_ROWS(m, t, T), qkv_width, s->num_q, s->num_kv, D,
                                  s->cos, s->sin, s->slots, w->k_cache, w->v_cache,
                                  w->k_scales, w->v_scales, total_slots, s->cache_dtype);
#pragma omp barrier
            if (t < attention_threads) {
                const job_t job = {s->attended, s->qkv, w->k_cache, w->v_cache, w->k_scales,
                                   w->v_scales, s->block_tables, s->context_lens, s->kv_of_q,
                                   s->num_q, s->num_kv, s->num_blocks, s->block_size, D,
                                   s->max_blocks, s->window, qkv_width, s->scale, F32,
                                   s->cache_dtype, bounds[t], bounds[t + 1]};
                attention_worker((void *)&job);
            }
#pragma omp barrier
            linear_share(&w->o, s->attended, m, out, t, T);
#pragma omp barrier
            add_rms_norm_rows(s->normed, stream, out, stream, w->post_norm, MY_ROWS(m, t, T), H,
                              s->eps);
#pragma omp barrier
            linear_share(&w->gate_up, s->normed, m, s->gate_up, t, T);
#pragma omp barrier
            silu_and_mul_rows(s->activated, s->gate_up, MY_ROWS(m, t, T), I);
#pragma omp barrier
            linear_share(&w->down, s->activated, m, out, t, T);
#pragma omp barrier
        }
    }
    return 0;
}
