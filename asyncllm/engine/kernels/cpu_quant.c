/* y = x W^T on the CPU with W kept in llama.cpp's 32-weight blocks, float32 activations.
 *
 * Built at first use by asyncllm/engine/kernels/cpu_quant.py (through _cpu_build: gcc -O3
 * -march=native -fopenmp) and called through ctypes; no torch headers. W is held as the GGUF
 * blocks' parts, split at load so the loop reads plain arrays:
 *   4-bit (Q4_0, Q4_1): qs [N][K/2] uint8 (per block of 32: 16 bytes, the low nibbles are weights
 *     0-15, the high ones 16-31, as in the file), d and m [N][K/32] float32: w = q*d + m
 *     (Q4_1's minimum m; Q4_0 is m = -8d);
 *   8-bit (Q8_0): qs [N][K] int8, d [N][K/32] float32: w = q*d.
 * So no float32 copy of W exists: a panel of NR rows of W is expanded into a per-thread buffer
 * in L1 (NR * K floats), used by every row of x, and dropped. The expansion is exact (q*d + m in
 * one fused multiply-add; the float32 path computes q*d then + m, which may differ in the last
 * bit); the products and sums are float32, in a different order from oneDNN's.
 *
 * Micro-kernel: MR rows of x times the NR panel rows, 16-wide along K, MR*NR accumulators
 * (4 x 4 = 16 registers of AVX-512), reduced across lanes at the end of K. Panels are split over
 * OpenMP threads (torch's runtime). Written on GCC vector types: AVX-512 with -march=native on
 * this machine, pairs of AVX2 registers elsewhere.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VW 16
#define NR 4
#define MR 4
typedef float vf __attribute__((vector_size(VW * sizeof(float)), aligned(4)));
typedef float vfa __attribute__((vector_size(VW * sizeof(float))));
typedef uint8_t vu8 __attribute__((vector_size(16), aligned(1)));
typedef int8_t vi8 __attribute__((vector_size(16), aligned(1)));

/* Below this many multiply-adds a call stays on the calling thread. */
#define PAR_MIN 65536

#ifdef __AVX512F__
#include <immintrin.h>

/* Rows n0..n0+nr of W, expanded to float32 into panel[NR][K] (rows past nr are zero). */
static inline void expand_q4(const uint8_t *qs, const float *d, const float *m, int64_t K,
                             int64_t n0, int nr, float *panel) {
    const int64_t nb = K / 32;
    const __m128i low4 = _mm_set1_epi8(0x0F);
    for (int j = 0; j < nr; j++) {
        const uint8_t *q = qs + (n0 + j) * (K / 2);
        const float *dj = d + (n0 + j) * nb, *mj = m + (n0 + j) * nb;
        float *out = panel + j * K;
        for (int64_t b = 0; b < nb; b++) {
            __m128i raw = _mm_loadu_si128((const __m128i *)(q + b * 16));
            __m128i lo = _mm_and_si128(raw, low4);
            __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
            __m512 vd = _mm512_set1_ps(dj[b]), vm = _mm512_set1_ps(mj[b]);
            __m512 flo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo));
            __m512 fhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi));
            _mm512_store_ps(out + b * 32, _mm512_fmadd_ps(flo, vd, vm));
            _mm512_store_ps(out + b * 32 + 16, _mm512_fmadd_ps(fhi, vd, vm));
        }
    }
    for (int j = nr; j < NR; j++) memset(panel + j * K, 0, K * sizeof(float));
}

static inline void expand_q8(const int8_t *qs, const float *d, int64_t K, int64_t n0, int nr,
                             float *panel) {
    const int64_t nb = K / 32;
    for (int j = 0; j < nr; j++) {
        const int8_t *q = qs + (n0 + j) * K;
        const float *dj = d + (n0 + j) * nb;
        float *out = panel + j * K;
        for (int64_t b = 0; b < nb; b++) {
            __m512 vd = _mm512_set1_ps(dj[b]);
            __m128i a = _mm_loadu_si128((const __m128i *)(q + b * 32));
            __m128i c = _mm_loadu_si128((const __m128i *)(q + b * 32 + 16));
            _mm512_store_ps(out + b * 32, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), vd));
            _mm512_store_ps(out + b * 32 + 16,
                            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(c)), vd));
        }
    }
    for (int j = nr; j < NR; j++) memset(panel + j * K, 0, K * sizeof(float));
}

/* y[i][n0 + j] for i < mr, j < nr; mr is a constant in each inlined copy. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                       const float *panel, int64_t K, int mr,
                                                       int nr, float *y, int64_t ldy) {
    __m512 acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += VW) {
        __m512 w[NR];
        for (int j = 0; j < NR; j++) w[j] = _mm512_load_ps(panel + j * K + k);
        for (int i = 0; i < mr; i++) {
            __m512 xi = _mm512_loadu_ps(x + i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] = _mm512_fmadd_ps(xi, w[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i][j]);
}

#else /* portable: GCC vector types (slower conversions) */

/* Rows n0..n0+nr of W, expanded to float32 into panel[NR][K] (rows past nr are zero). */
static inline void expand_q4(const uint8_t *qs, const float *d, const float *m, int64_t K,
                             int64_t n0, int nr, float *panel) {
    const int64_t nb = K / 32;
    for (int j = 0; j < nr; j++) {
        const uint8_t *q = qs + (n0 + j) * (K / 2);
        const float *dj = d + (n0 + j) * nb, *mj = m + (n0 + j) * nb;
        float *out = panel + j * K;
        for (int64_t b = 0; b < nb; b++) {
            vu8 raw = *(const vu8 *)(q + b * 16);
            vfa lo = __builtin_convertvector(raw & 0x0F, vfa);
            vfa hi = __builtin_convertvector(raw >> 4, vfa);
            vfa vd = (vfa){0} + dj[b], vm = (vfa){0} + mj[b];
            *(vf *)(out + b * 32) = lo * vd + vm;
            *(vf *)(out + b * 32 + 16) = hi * vd + vm;
        }
    }
    for (int j = nr; j < NR; j++) memset(panel + j * K, 0, K * sizeof(float));
}

static inline void expand_q8(const int8_t *qs, const float *d, int64_t K, int64_t n0, int nr,
                             float *panel) {
    const int64_t nb = K / 32;
    for (int j = 0; j < nr; j++) {
        const int8_t *q = qs + (n0 + j) * K;
        const float *dj = d + (n0 + j) * nb;
        float *out = panel + j * K;
        for (int64_t b = 0; b < nb; b++) {
            vfa vd = (vfa){0} + dj[b];
            vfa a = __builtin_convertvector(*(const vi8 *)(q + b * 32), vfa);
            vfa c = __builtin_convertvector(*(const vi8 *)(q + b * 32 + 16), vfa);
            *(vf *)(out + b * 32) = a * vd;
            *(vf *)(out + b * 32 + 16) = c * vd;
        }
    }
    for (int j = nr; j < NR; j++) memset(panel + j * K, 0, K * sizeof(float));
}

static inline float hsum(vfa v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* y[i][n0 + j] for i < mr, j < nr; mr is a constant in each inlined copy. */
static inline __attribute__((always_inline)) void tile(const float *x, int64_t ldx,
                                                       const float *panel, int64_t K, int mr,
                                                       int nr, float *y, int64_t ldy) {
    vfa acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = (vfa){0};
    for (int64_t k = 0; k < K; k += VW) {
        vfa w[NR];
        for (int j = 0; j < NR; j++) w[j] = *(const vf *)(panel + j * K + k);
        for (int i = 0; i < mr; i++) {
            vfa xi = *(const vf *)(x + i * ldx + k);
            for (int j = 0; j < NR; j++) acc[i][j] += xi * w[j];
        }
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) y[i * ldy + j] = hsum(acc[i][j]);
}

#endif

static void panel_rows(const float *x, int64_t ldx, int64_t M, const float *panel, int64_t K,
                       int nr, float *y, int64_t ldy) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) tile(x + i * ldx, ldx, panel, K, MR, nr, y + i * ldy, ldy);
    switch (M - i) {
        case 3: tile(x + i * ldx, ldx, panel, K, 3, nr, y + i * ldy, ldy); break;
        case 2: tile(x + i * ldx, ldx, panel, K, 2, nr, y + i * ldy, ldy); break;
        case 1: tile(x + i * ldx, ldx, panel, K, 1, nr, y + i * ldy, ldy); break;
        default: break;
    }
}

/* kind 4: Q4_0/Q4_1 parts (qs uint8 [N][K/2], d, m); kind 8: Q8_0 parts (qs int8 [N][K], d).
 * x [M][K] with row stride ldx, y [M][N] with row stride ldy. K is a multiple of 32.
 * Returns 0, or -1 when a buffer could not be allocated, -2 for a bad argument. */
int asyncllm_gguf_linear_f32(const float *x, int64_t ldx, int64_t M, const void *qs,
                             const float *d, const float *m, int kind, int64_t N, int64_t K,
                             float *y, int64_t ldy) {
    if (K % 32 || (kind != 4 && kind != 8) || (kind == 4 && !m)) return -2;
    const int64_t panels = (N + NR - 1) / NR;
    int failed = 0;
    const int par = M * N * K >= PAR_MIN;
#pragma omp parallel if (par) reduction(| : failed)
    {
        float *panel = aligned_alloc(64, ((NR * K * sizeof(float)) + 63) / 64 * 64);
        /* every thread reaches the worksharing loop, with or without its buffer */
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (!panel) {
                failed = 1;
                continue;
            }
            const int64_t n0 = p * NR;
            const int nr = N - n0 < NR ? (int)(N - n0) : NR;
            if (kind == 4)
                expand_q4((const uint8_t *)qs, d, m, K, n0, nr, panel);
            else
                expand_q8((const int8_t *)qs, d, K, n0, nr, panel);
            panel_rows(x, ldx, M, panel, K, nr, y + n0, ldy);
        }
        free(panel);
    }
    return failed ? -1 : 0;
}
