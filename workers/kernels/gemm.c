/* y = x W^T (+ b) in float32 over weights packed once at load time, for any number of rows.
 *
 * W [n, k] is stored as panels of PANEL output columns: panel p holds W[p*PANEL .. +PANEL, :]
 * transposed to [k][PANEL] (zero-padded past n), so one panel is one contiguous stream. The
 * threads split the panels. The inner step: for one k, PV vector loads of the panel and ROWS
 * broadcasts of x feed PV x ROWS fused multiply-adds into accumulators held in registers.
 *
 * The weights are float32, or int8 with one float32 scale per output column (weight-only
 * quantization): an int8 panel row is widened to float32 in registers, the sums are float32,
 * and each column's sum is multiplied by its scale once at the end, so int8 weights are never
 * materialised as float32 and a decode step streams a quarter of the bytes.
 *
 * 2:4 sparse weights (two of every four consecutive k of a column are zero) are stored
 * compactly: for each group of four k, a panel holds the two kept values of each column
 * ([2][PANEL], float32 or int8) and, in a separate array, their places in the group, one byte
 * per column (first | second << 2). A group of x's four values sits in a vector's first lanes
 * and each column picks its two with a permute, so the zeros are neither read nor multiplied:
 * float32 weights stream 9/16 of the dense bytes, int8 ones 3/4.
 *
 * A decode step (up to ROWS rows) is bound by streaming the weights from memory: each panel
 * is read once, whole, in order, with software prefetch ahead of it. On a 2-core Xeon this
 * streams SmolLM2's 537 MB ~14% faster per decode step than oneDNN's packed GEMM, which is
 * tuned for many rows. With many rows the work is ordered as BLIS orders a GEMM (a tile of x
 * in L1 meets a group of panel slices held in L2); there oneDNN is still ~10-20% faster
 * (bench/README.md has the measurements).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "run_shares.h"

#if defined(__AVX512F__)
#define VW 16 /* floats per vector */
#define PV 2 /* vectors per panel row */
#define ROWS 8 /* 16 accumulators of 32 registers */
#else
#define VW 8
#define PV 2
#define ROWS 6 /* 12 accumulators of 16 registers */
#endif
#define PANEL (PV * VW)

typedef float vf __attribute__((vector_size(VW * 4)));
typedef float vfu __attribute__((vector_size(VW * 4), aligned(4)));
typedef int8_t vq __attribute__((vector_size(VW), aligned(1)));
typedef int32_t vi __attribute__((vector_size(VW * 4)));

enum { WEIGHTS_F32 = 0, WEIGHTS_I8 = 1 }; /* the element type of the packed weights */

int64_t gemm_panel_width(void) { return PANEL; }

/* Streaming weights at one or a few rows: fetch this many bytes ahead, which keeps more
 * requests in flight than the hardware prefetcher alone (measured ~5-10%). */
#define PREFETCH 8192
#define KC 576 /* at most this much k per pass of many rows (a tile of x stays in L1) */

static inline __attribute__((always_inline)) vf load_weights(const int wtype,
                                                            const void *panel, int64_t at) {
    if (wtype == WEIGHTS_I8) {
        const int8_t *q = (const int8_t *)panel + at;
        /* Sign extension by intrinsic: GCC 12 widens a generic int8 vector byte by byte. */
#if defined(__AVX512F__)
        const vi wide = (vi)_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q));
#elif defined(__AVX2__)
        const vi wide = (vi)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)q));
#else
        const vi wide = __builtin_convertvector(*(const vq *)q, vi);
#endif
        return __builtin_convertvector(wide, vf);
    }
    return *(const vfu *)((const float *)panel + at);
}

static inline __attribute__((always_inline)) vi load_places(const uint8_t *p) {
#if defined(__AVX512F__)
    return (vi)_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
#elif defined(__AVX2__)
    return (vi)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
#else
    vi v;
    for (int l = 0; l < VW; l++) v[l] = p[l];
    return v;
#endif
}

/* x[0..3] in the first four lanes (the others are never picked). */
static inline __attribute__((always_inline)) vf load_group(const float *x) {
#if defined(__AVX512F__)
    return (vf)_mm512_castps128_ps512(_mm_loadu_ps(x));
#elif defined(__AVX2__)
    return (vf)_mm256_castps128_ps256(_mm_loadu_ps(x));
#else
    vf v = {0};
    memcpy(&v, x, 4 * sizeof(float));
    return v;
#endif
}

/* lane l of the result is x[place[l]] */
static inline __attribute__((always_inline)) vf pick(vf x, vi place) {
#if defined(__AVX512F__)
    return (vf)_mm512_permutexvar_ps((__m512i)place, (__m512)x);
#elif defined(__AVX2__)
    return (vf)_mm256_permutevar8x32_ps((__m256)x, (__m256i)place);
#else
    vf v;
    for (int l = 0; l < VW; l++) v[l] = x[place[l]];
    return v;
#endif
}

static inline __attribute__((always_inline)) void start_sums(const int rows, vf acc[ROWS][PV],
                                                             int first, int stored,
                                                             const float *y, int64_t ldy,
                                                             int64_t cols) {
    float buf[PANEL];
#pragma GCC unroll 8
    for (int r = 0; r < rows; r++) {
        if (first || r >= stored) {
#pragma GCC unroll 4
            for (int v = 0; v < PV; v++) acc[r][v] = (vf){0};
        } else {
            memcpy(buf, y + r * ldy, cols * sizeof(float));
            memcpy(acc[r], buf, sizeof(acc[r]));
        }
    }
}

static inline __attribute__((always_inline)) void store_sums(const vf acc[ROWS][PV], int stored,
                                                             const float *scale,
                                                             const float *bias, float *y,
                                                             int64_t ldy, int64_t cols) {
    float buf[PANEL];
    for (int r = 0; r < stored; r++) {
        memcpy(buf, acc[r], sizeof(buf));
        if (scale)
            for (int64_t c = 0; c < cols; c++) buf[c] *= scale[c];
        if (bias)
            for (int64_t c = 0; c < cols; c++) buf[c] += bias[c];
        memcpy(y + r * ldy, buf, cols * sizeof(float));
    }
}

/* rows x PANEL outputs over k in [0, kc) of this pass, added to what earlier passes left in y
 * (first: start from zero; last: scale the sums and add the bias, either may be NULL). rows
 * and wtype are constants wherever this is inlined, so the loops unroll and the accumulators
 * are registers. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const int wtype, const float *x, int64_t ldx, int64_t xk, const void *panel,
    int64_t kc, int first, int stored, const int stream, const float *scale, const float *bias,
    float *y, int64_t ldy, int64_t cols) {
    const int64_t wbytes = wtype == WEIGHTS_I8 ? 1 : 4;
    vf acc[ROWS][PV];
    start_sums(rows, acc, first, stored, y, ldy, cols);
    for (int64_t i = 0; i < kc; i++) {
        if (stream) /* each 64-byte line of the panel row, PREFETCH bytes ahead */
            for (int64_t b = 0; b < PANEL * wbytes; b += 64)
                __builtin_prefetch((const char *)panel + i * PANEL * wbytes + PREFETCH + b);
        vf w[PV];
#pragma GCC unroll 4
        for (int v = 0; v < PV; v++) w[v] = load_weights(wtype, panel, i * PANEL + v * VW);
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const float a = x[r * ldx + i * xk];
#pragma GCC unroll 4
            for (int v = 0; v < PV; v++) acc[r][v] += a * w[v];
        }
    }
    store_sums(acc, stored, scale, bias, y, ldy, cols);
}

/* The 2:4 sparse tile: rows x PANEL outputs over groups [0, kc / 4) of this pass; x holds
 * the rows (stride ldx) from this pass's first k, values and places this pass's groups. */
static inline __attribute__((always_inline)) void tile_24(
    const int rows, const int wtype, const float *x, int64_t ldx, const void *values,
    const uint8_t *places, int64_t kc, int first, int stored, const int stream,
    const float *scale, const float *bias, float *y, int64_t ldy, int64_t cols) {
    const int64_t wbytes = wtype == WEIGHTS_I8 ? 1 : 4;
    vf acc[ROWS][PV];
    start_sums(rows, acc, first, stored, y, ldy, cols);
    for (int64_t g = 0; g < kc / 4; g++) {
        if (stream) {
            for (int64_t b = 0; b < 2 * PANEL * wbytes; b += 64)
                __builtin_prefetch((const char *)values + g * 2 * PANEL * wbytes + PREFETCH + b);
            __builtin_prefetch(places + g * PANEL + PREFETCH / 4);
        }
        vf w0[PV], w1[PV];
        vi at0[PV], at1[PV];
#pragma GCC unroll 4
        for (int v = 0; v < PV; v++) {
            w0[v] = load_weights(wtype, values, (2 * g) * PANEL + v * VW);
            w1[v] = load_weights(wtype, values, (2 * g + 1) * PANEL + v * VW);
            const vi both = load_places(places + g * PANEL + v * VW);
            at0[v] = both & 3;
            at1[v] = both >> 2;
        }
#pragma GCC unroll 8
        for (int r = 0; r < rows; r++) {
            const vf group = load_group(x + r * ldx + 4 * g);
#pragma GCC unroll 4
            for (int v = 0; v < PV; v++)
                acc[r][v] += w0[v] * pick(group, at0[v]) + w1[v] * pick(group, at1[v]);
        }
    }
    store_sums(acc, stored, scale, bias, y, ldy, cols);
}

typedef struct {
    const float *x;
    const void *packed;
    const uint8_t *places; /* 2:4 sparse weights: where each kept value sits; NULL: dense */
    const float *scale, *bias;
    float *y;
    int64_t m, ldx, n, k, ldy, first_panel, end_panel;
    int wtype;
} Job;

#define NC 16 /* panels per group: their KC-slices (NC x KC x PANEL floats) stay in L2 */

/* One tile of `rows` (any count up to ROWS) over k in [0, kc), streamed: the decode step's,
 * and the many-row path's sparse tiles (which read x in place, so take the exact count). */
static inline __attribute__((always_inline)) void rows_tile(
    int rows, const int wtype, const int sparse, const float *x, int64_t ldx, const void *panel,
    const uint8_t *places, int64_t kc, int first, int stream, const float *scale,
    const float *bias, float *y, int64_t ldy, int64_t cols) {
    switch (rows) {
#define ROWS_CASE(r)                                                                       \
    case r:                                                                                \
        if (sparse)                                                                        \
            tile_24(r, wtype, x, ldx, panel, places, kc, first, r, stream, scale, bias, y, \
                    ldy, cols);                                                            \
        else                                                                               \
            tile(r, wtype, x, ldx, 1, panel, kc, first, r, stream, scale, bias, y, ldy,    \
                 cols);                                                                    \
        break;
    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
#if ROWS > 6
    ROWS_CASE(7) ROWS_CASE(8)
#endif
#undef ROWS_CASE
    }
}

static inline __attribute__((always_inline)) void run_job(const Job *j, const int wtype,
                                                          const int sparse) {
    const int64_t k = j->k, wbytes = wtype == WEIGHTS_I8 ? 1 : 4;
    /* Bytes of values per k of a panel, and of places (sparse: two values per four k). */
    const int64_t row_bytes = sparse ? PANEL * wbytes / 2 : PANEL * wbytes;
    const char *packed = j->packed;
    if (j->m <= ROWS) {
        /* A decode step: each panel once, whole, in order: one stream at full bandwidth. */
        for (int64_t p = j->first_panel; p < j->end_panel; p++) {
            const int64_t col = p * PANEL, cols = j->n - col < PANEL ? j->n - col : PANEL;
            rows_tile((int)j->m, wtype, sparse, j->x, j->ldx, packed + p * k * row_bytes,
                      sparse ? j->places + p * (k / 4) * PANEL : NULL, k, 1, 1,
                      j->scale ? j->scale + col : NULL, j->bias ? j->bias + col : NULL,
                      j->y + col, j->ldy, cols);
        }
        return;
    }
    /* Many rows (as BLIS orders a GEMM): a tile of x's rows (ROWS x KC, in L1) meets every
     * panel slice of a group (in L2) before the next tile is loaded. */
    const int64_t passes = (k + KC - 1) / KC;
    const int64_t step = ((k + passes - 1) / passes + 7) / 8 * 8; /* equal passes */
    for (int64_t p0 = j->first_panel; p0 < j->end_panel; p0 += NC) {
        const int64_t p1 = p0 + NC < j->end_panel ? p0 + NC : j->end_panel;
        for (int64_t k0 = 0; k0 < k; k0 += step) {
            const int64_t kc = k - k0 < step ? k - k0 : step;
            const int last = k0 + kc == k;
            for (int64_t r = 0; r < j->m; r += ROWS) {
                const int rows = j->m - r < ROWS ? (int)(j->m - r) : ROWS;
                /* The tile of x interleaved, [kc][ROWS]: the ROWS values one step of k
                 * broadcasts are adjacent (zero past the last row). The sparse tiles pick
                 * groups of four k from each row, so read x as it is. */
                float xt[KC * ROWS];
                if (!sparse)
                    for (int64_t i = 0; i < kc; i++)
                        for (int q = 0; q < ROWS; q++)
                            xt[i * ROWS + q] = q < rows ? j->x[(r + q) * j->ldx + k0 + i] : 0.f;
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t col = p * PANEL, cols = j->n - col < PANEL ? j->n - col : PANEL;
                    const float *scale = j->scale && last ? j->scale + col : NULL;
                    const float *bias = j->bias && last ? j->bias + col : NULL;
                    const char *panel = packed + p * k * row_bytes + k0 * row_bytes;
                    float *y = j->y + r * j->ldy + col;
                    if (sparse)
                        rows_tile(rows, wtype, 1, j->x + r * j->ldx + k0, j->ldx, panel,
                                  j->places + (p * k + k0) / 4 * PANEL, kc, k0 == 0, 0, scale,
                                  bias, y, j->ldy, cols);
                    else
                        tile(ROWS, wtype, xt, 1, ROWS, panel, kc, k0 == 0, rows, 0, scale,
                             bias, y, j->ldy, cols);
                }
            }
        }
    }
}

static void *panels_worker(void *arg) {
    const Job *j = arg;
    const int sparse = j->places != NULL;
    if (j->wtype == WEIGHTS_I8) {
        if (sparse)
            run_job(j, WEIGHTS_I8, 1);
        else
            run_job(j, WEIGHTS_I8, 0);
    } else {
        if (sparse)
            run_job(j, WEIGHTS_F32, 1);
        else
            run_job(j, WEIGHTS_F32, 0);
    }
    return NULL;
}

/* Thread t of num_threads's share of the panels (decode_layers.c runs shares itself). */
static Job panels_share(const float *x, int64_t m, int64_t ldx, const void *packed,
                        const uint8_t *places, int wtype, const float *scale, int64_t n,
                        int64_t k, const float *bias, float *y, int64_t ldy, int t,
                        int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    return (Job){x, packed, places, scale, bias, y, m, ldx, n, k, ldy,
                 panels * t / num_threads, panels * (t + 1) / num_threads, wtype};
}

/* x [m, k] with row stride ldx; packed as the layout above, of float32 (wtype 0) or int8
 * (wtype 1, with scale: one float per output column); places: NULL for dense weights, else
 * the places of 2:4 sparse ones (k a multiple of 4); y [m, n] with row stride ldy. */
void linear_panels(const float *x, int64_t m, int64_t ldx, const void *packed,
                   const uint8_t *places, int wtype, const float *scale, int64_t n, int64_t k,
                   const float *bias, float *y, int64_t ldy, int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > panels) num_threads = (int)panels;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < num_threads; t++)
        jobs[t] = panels_share(x, m, ldx, packed, places, wtype, scale, n, k, bias, y, ldy, t,
                               num_threads);
    run_shares(panels_worker, jobs, sizeof(Job), num_threads);
}
