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
    for (int r = 0; r < stored; r++) {
        memcpy(buf, acc[r], sizeof(acc[r]));
        if (scale)
            for (int64_t c = 0; c < cols; c++) buf[c] *= scale[c];
        if (bias)
            for (int64_t c = 0; c < cols; c++) buf[c] += bias[c];
        memcpy(y + r * ldy, buf, cols * sizeof(float));
    }
}

typedef struct {
    const float *x;
    const void *packed;
    const float *scale, *bias;
    float *y;
    int64_t m, ldx, n, k, ldy, first_panel, end_panel;
    int wtype;
} Job;

#define NC 16 /* panels per group: their KC-slices (NC x KC x PANEL floats) stay in L2 */

static inline __attribute__((always_inline)) void rows_tile(
    int rows, const int wtype, const float *x, int64_t ldx, const void *panel, int64_t kc,
    const float *scale, const float *bias, float *y, int64_t ldy, int64_t cols) {
    switch (rows) {
#define ROWS_CASE(r) \
    case r: tile(r, wtype, x, ldx, 1, panel, kc, 1, r, 1, scale, bias, y, ldy, cols); break;
    ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6)
#if ROWS > 6
    ROWS_CASE(7) ROWS_CASE(8)
#endif
#undef ROWS_CASE
    }
}

static inline __attribute__((always_inline)) void run_job(const Job *j, const int wtype) {
    const int64_t k = j->k, wbytes = wtype == WEIGHTS_I8 ? 1 : 4;
    const char *packed = j->packed;
    if (j->m <= ROWS) {
        /* A decode step: each panel once, whole, in order: one stream at full bandwidth. */
        for (int64_t p = j->first_panel; p < j->end_panel; p++) {
            const int64_t col = p * PANEL, cols = j->n - col < PANEL ? j->n - col : PANEL;
            rows_tile((int)j->m, wtype, j->x, j->ldx, packed + p * k * PANEL * wbytes, k,
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
                 * broadcasts are adjacent (zero past the last row). */
                float xt[KC * ROWS];
                for (int64_t i = 0; i < kc; i++)
                    for (int q = 0; q < ROWS; q++)
                        xt[i * ROWS + q] = q < rows ? j->x[(r + q) * j->ldx + k0 + i] : 0.f;
                for (int64_t p = p0; p < p1; p++) {
                    const int64_t col = p * PANEL, cols = j->n - col < PANEL ? j->n - col : PANEL;
                    const float *scale = j->scale && last ? j->scale + col : NULL;
                    const float *bias = j->bias && last ? j->bias + col : NULL;
                    tile(ROWS, wtype, xt, 1, ROWS, packed + (p * k + k0) * PANEL * wbytes, kc,
                         k0 == 0, rows, 0, scale, bias, j->y + r * j->ldy + col, j->ldy, cols);
                }
            }
        }
    }
}

static void *worker(void *arg) {
    const Job *j = arg;
    if (j->wtype == WEIGHTS_I8)
        run_job(j, WEIGHTS_I8);
    else
        run_job(j, WEIGHTS_F32);
    return NULL;
}

/* x [m, k] with row stride ldx; packed as the layout above, of float32 (wtype 0) or int8
 * (wtype 1, with scale: one float per output column); y [m, n] with row stride ldy. */
void linear_panels(const float *x, int64_t m, int64_t ldx, const void *packed, int wtype,
                   const float *scale, int64_t n, int64_t k, const float *bias, float *y,
                   int64_t ldy, int num_threads) {
    const int64_t panels = (n + PANEL - 1) / PANEL;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > panels) num_threads = (int)panels;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < num_threads; t++)
        jobs[t] = (Job){x, packed, scale, bias, y, m, ldx, n, k, ldy, panels * t / num_threads,
                        panels * (t + 1) / num_threads, wtype};
    run_shares(worker, jobs, sizeof(Job), num_threads);
}
