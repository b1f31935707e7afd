/* y = x W^T (+ b) with both sides in int8 (W8A8): x quantized per row on the fly, W per output
 * column at load time; int32 sums, one float multiply per output.
 *
 * W [n, k] int8 with scales ws[n] is stored as panels of PANEL output columns, each panel
 * [k4][PANEL][4] (k4 = ceil(k / 4), zero-padded): four consecutive k of one column fill one
 * 32-bit lane, the layout of AVX-512 VNNI's vpdpbusd, which multiplies four unsigned bytes by
 * four signed bytes and adds them to a 32-bit lane. The unsigned side is x's row quantized to
 * int8 and shifted by +128; the shift is taken back with each column's sum of weights:
 *   sum_k (q + 128) w = sum_k q w + 128 colsum(w).
 * Sums are exact in int32 (|q|, |w| <= 127: 2^31 / 127^2 ~ 133,000 k at least). Where there is
 * no VNNI but AVX2 the same layout runs through vpmaddwd: both sides widened to 16 bits, each
 * 32-bit lane summing two products (|x| <= 255, |w| <= 127: exact), so the sums are the same
 * bit for bit; elsewhere, plain int32 vectors.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define VNNI512 1
#elif defined(__AVX2__)
#include <immintrin.h>
#define MADD256 1
#endif

/* x's quantized rows: bytes for vpdpbusd, 16-bit for vpmaddwd and the portable loop. */
#ifdef VNNI512
typedef uint8_t xq_t;
#else
typedef int16_t xq_t;
#endif

#include "run_shares.h"

#define VW 16 /* int32 lanes per vector */
#define PV 2  /* vectors per panel row */
#define PANEL (PV * VW)
#define ROWS 8

typedef int32_t vi __attribute__((vector_size(VW * 4)));

int64_t gemm_int8_panel_width(void) { return PANEL; }

/* x [m, k] float32 (row stride ldx) -> xq [m, k4 * 4] as q + 128 (zero-padded past k: the
 * padded weights are zero) and xs [m] with x ~= q * xs, symmetric per row: over the row's own
 * max |x|, or row_absmax[r] where given (a row split over tensor ranks shares one scale). */
static void quantize_rows(const float *x, int64_t m, int64_t ldx, int64_t k,
                          const float *row_absmax, xq_t *xq, float *xs) {
    const int64_t kp = (k + 3) / 4 * 4;
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * ldx;
        float absmax = 0.f;
        if (row_absmax)
            absmax = row_absmax[r];
        else
            for (int64_t i = 0; i < k; i++) absmax = fmaxf(absmax, fabsf(row[i]));
        const float scale = absmax > 0.f ? absmax / 127.f : 1.f;
        for (int64_t i = 0; i < k; i++) {
            /* x / scale rounded half to even: what torch.round(x / scale) gives, bit for bit */
            float q = nearbyintf(row[i] / scale);
            /* clamped with fmaxf first, so a NaN becomes -127: a defined value in every
             * build (the cast of a NaN is not), and only this row's outputs are wrong */
            q = fminf(fmaxf(q, -127.f), 127.f);
            xq[r * kp + i] = (xq_t)((int)q + 128);
        }
        for (int64_t i = k; i < kp; i++) xq[r * kp + i] = 128;
        xs[r] = scale;
    }
}

/* y = (sum - 128 colsum) * xs * ws (+ b) for rows x cols int32 sums. */
static inline __attribute__((always_inline)) void scale_out(
    const int rows, const int32_t sums[][PANEL], const float *xs, const int32_t *colsum,
    const float *ws, const float *bias, float *y, int64_t ldy, int64_t cols) {
    for (int r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) {
            float out = (float)(sums[r][c] - 128 * colsum[c]) * xs[r] * ws[c];
            y[r * ldy + c] = bias ? out + bias[c] : out;
        }
}

#ifdef MADD256
/* rows x PANEL sums, 8 columns and up to 4 rows at a time (8 accumulators, 2 weight vectors,
 * one broadcast: within AVX2's 16 registers). 16 weight bytes widen to 4 columns x 4 k; each
 * vpmaddwd lane then holds one column's sum over 2 of the 4 k, added pairwise at the end. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const xq_t *xq, int64_t kp, const int8_t *panel, const float *xs,
    const int32_t *colsum, const float *ws, const float *bias, float *y, int64_t ldy,
    int64_t cols) {
    int32_t sums[ROWS][PANEL];
    const int64_t k4 = kp / 4;
    for (int cb = 0; cb < PANEL; cb += 8) {
        for (int r0 = 0; r0 < rows; r0 += 4) {
            const int rr = rows - r0 < 4 ? rows - r0 : 4;
            __m256i acc[4][2];
            for (int r = 0; r < rr; r++) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
            for (int64_t i = 0; i < k4; i++) {
                const int8_t *w = panel + i * PANEL * 4 + cb * 4;
                __builtin_prefetch(w + 4096);
                const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w));
                const __m256i w1 =
                    _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)));
                for (int r = 0; r < rr; r++) {
                    int64_t four;
                    memcpy(&four, xq + (r0 + r) * kp + i * 4, 8);
                    const __m256i xb = _mm256_set1_epi64x(four);
                    acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(xb, w0));
                    acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(xb, w1));
                }
            }
            for (int r = 0; r < rr; r++) {
                /* lanes (c0 c0 c1 c1 | c2 c2 c3 c3) and (c4 .. c7): hadd gives c0 c1 c4 c5 |
                 * c2 c3 c6 c7, the permute puts them in order */
                const __m256i pairs = _mm256_hadd_epi32(acc[r][0], acc[r][1]);
                _mm256_storeu_si256((__m256i *)&sums[r0 + r][cb],
                                    _mm256_permute4x64_epi64(pairs, 0xD8));
            }
        }
    }
    scale_out(rows, sums, xs, colsum, ws, bias, y, ldy, cols);
}
#else
/* rows x PANEL int32 sums over one panel, then scaled. */
static inline __attribute__((always_inline)) void tile(
    const int rows, const xq_t *xq, int64_t kp, const int8_t *panel, const float *xs,
    const int32_t *colsum, const float *ws, const float *bias, float *y, int64_t ldy,
    int64_t cols) {
    vi acc[ROWS][PV];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < PV; v++) acc[r][v] = (vi){0};
    const int64_t k4 = kp / 4;
    for (int64_t i = 0; i < k4; i++) {
        const int8_t *w = panel + i * PANEL * 4;
        __builtin_prefetch(w + 4096);
        __builtin_prefetch(w + 4096 + 64);
#ifdef VNNI512
        __m512i wv[PV];
        for (int v = 0; v < PV; v++) wv[v] = _mm512_loadu_si512(w + v * VW * 4);
        for (int r = 0; r < rows; r++) {
            int32_t four;
            memcpy(&four, xq + r * kp + i * 4, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            for (int v = 0; v < PV; v++)
                acc[r][v] = (vi)_mm512_dpbusd_epi32((__m512i)acc[r][v], xb, wv[v]);
        }
#else
        for (int j = 0; j < 4; j++) {
            vi wv[PV];
            for (int v = 0; v < PV; v++)
                for (int c = 0; c < VW; c++) wv[v][c] = w[(v * VW + c) * 4 + j];
            for (int r = 0; r < rows; r++) {
                const int32_t a = (int32_t)xq[r * kp + i * 4 + j];
                for (int v = 0; v < PV; v++) acc[r][v] += a * wv[v];
            }
        }
#endif
    }
    int32_t sums[ROWS][PANEL];
    for (int r = 0; r < rows; r++) memcpy(sums[r], acc[r], sizeof(sums[r]));
    scale_out(rows, sums, xs, colsum, ws, bias, y, ldy, cols);
}
#endif

typedef struct {
    const xq_t *xq;
    const float *xs;
    const int8_t *packed;
    const int32_t *colsum;
    const float *ws, *bias;
    float *y;
    int64_t m, kp, n, ldy, first_panel, end_panel;
} Job;

static void *worker(void *arg) {
    const Job *j = arg;
    /* Panel by panel (kp x PANEL bytes stay in L2), every tile of rows against it. */
    for (int64_t p = j->first_panel; p < j->end_panel; p++) {
        const int64_t col = p * PANEL, cols = j->n - col < PANEL ? j->n - col : PANEL;
        const int8_t *panel = j->packed + p * j->kp * PANEL;
        for (int64_t r = 0; r < j->m; r += ROWS) {
            const int rows = j->m - r < ROWS ? (int)(j->m - r) : ROWS;
            const xq_t *xq = j->xq + r * j->kp;
            const float *bias = j->bias ? j->bias + col : NULL;
            float *y = j->y + r * j->ldy + col;
            switch (rows) {
#define ROWS_CASE(n_)                                                                          \
    case n_:                                                                                   \
        tile(n_, xq, j->kp, panel, j->xs + r, j->colsum + col, j->ws + col, bias, y, j->ldy,  \
             cols);                                                                            \
        break;
                ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
                ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#undef ROWS_CASE
            }
        }
    }
    return NULL;
}

/* x [m, k] float32 (row stride ldx); row_absmax [m] or NULL (see quantize_rows); packed,
 * colsum [n] and ws [n] as described above; y [m, n] float32 (row stride ldy). Returns 0, or
 * -1 when out of memory. */
int linear_w8a8(const float *x, int64_t m, int64_t ldx, const float *row_absmax,
                const int8_t *packed, const int32_t *colsum, const float *ws, int64_t n,
                int64_t k, const float *bias, float *y, int64_t ldy, int num_threads) {
    const int64_t kp = (k + 3) / 4 * 4, panels = (n + PANEL - 1) / PANEL;
    xq_t *xq = malloc((size_t)(m * kp) * sizeof(xq_t) + 64);
    float *xs = malloc((size_t)m * sizeof(float) + 64);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    quantize_rows(x, m, ldx, k, row_absmax, xq, xs);
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > panels) num_threads = (int)panels;
    Job jobs[MAX_THREADS];
    for (int t = 0; t < num_threads; t++)
        jobs[t] = (Job){xq, xs, packed, colsum, ws, bias, y, m, kp, n, ldy,
                        panels * t / num_threads, panels * (t + 1) / num_threads};
    run_shares(worker, jobs, sizeof(Job), num_threads);
    free(xq);
    free(xs);
    return 0;
}
