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

/* ---- int8 activations (small M): llama.cpp's q8 dot products, on AVX512-VNNI ----------------
 *
 * At a few rows the float32 path above is bound by its own instructions, not by memory: each
 * weight is widened to float32, stored to the panel, loaded back and multiplied (~6 vector
 * instructions per 16 weights). Here each row of x is instead quantized per block of 32 to int8,
 * as llama.cpp's q8_0/q8_1 activations: dx = max|x| / 127, xq = round(x / dx) (to nearest, even
 * on ties, through x * (127 / max|x|) in float32), and the weight blocks are multiplied with
 * `vpdpbusd` (64 u8 x s8 products summed in fours into 16 int32 lanes) straight from their
 * quants. Per block b of weight row n and x row i, with integer sum S = sum_k q_k xq_k:
 *   4-bit (w = q d + m): y += d_b dx_b S + m_b dx_b sum_k xq_k
 *   8-bit (w = q d):     y += d_b dx_b S
 * which is exactly W (xq * dx): the only approximation is x -> xq * dx, at most dx_b / 2 per
 * input (the 4-bit minimum term uses the quantized sum, as llama.cpp's q8_1, so the error is
 * sum_k w_k (xq_k dx_b - x_k), not a larger one in q d alone). S is exact in int32 (|S| <=
 * 32 * 15 * 127 for 4-bit, 32 * 128 * 127 for 8-bit); the scales and sums are float32.
 *
 * Layouts (the x side is built once per call, on the calling thread, into one buffer):
 *   4-bit: a vector of 64 quant bytes holds 4 blocks (16 bytes each); its low nibbles are the
 *     blocks' weights 0-15, its high nibbles weights 16-31. So xq is stored per group of 4
 *     blocks as lo[64] (the 4 blocks' inputs 0-15) then hi[64] (inputs 16-31): int32 lane l of
 *     both products belongs to block l / 4, and one scale vector serves both.
 *   8-bit: 64 quant bytes are 2 blocks in order (lane l: block l / 8). vpdpbusd takes unsigned
 *     bytes on one side: the weights go in as q + 128 (one xor), and each lane starts from
 *     -128 * (its 4 inputs' sum), precomputed with x.
 *   dxl: each int32 lane's dx (0 past the last block, so padding adds 0): 16 per group of 4
 *     blocks (4-bit), per pair of blocks (8-bit).
 * Tails (K/32 not a multiple of 4 or 2) load the weights with masks: nothing past a row is read.
 */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define HAVE_INT8_ACT 1

typedef struct {
    int8_t *q;      /* [M][qn] quantized inputs in the layout above */
    float *dxl;     /* [M][ln] per-lane dx */
    float *sx;      /* 4-bit: [M][sn] per block dx * sum(xq), zero-padded to 16 */
    int32_t *corr;  /* 8-bit: [M][ln] per-lane -128 * sum of the lane's 4 inputs */
    int64_t qn, ln, sn;
} qact;

/* One block of 32 inputs to int8: returns dx, the two halves' bytes and the sum of xq. */
static inline float quant_block(const float *x, __m128i *q0, __m128i *q1, int32_t *sum) {
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
    *q0 = _mm512_cvtsepi32_epi8(i0);
    *q1 = _mm512_cvtsepi32_epi8(i1);
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    /* a NaN or infinite input converts to INT32_MIN (and the max may have skipped it): make the
     * block's scale NaN, so the outputs are NaN as on the float32 path, not silently finite */
    const __m512i bad = _mm512_set1_epi32(INT32_MIN);
    if (_mm512_cmpeq_epi32_mask(i0, bad) | _mm512_cmpeq_epi32_mask(i1, bad)) return __builtin_nanf("");
    return amax / 127.0f;
}

/* x [M][K] -> a (allocated here, one buffer; free(a->q)). Returns 0 or -1 (no memory). */
static int quantize_x(const float *x, int64_t ldx, int64_t M, int64_t K, int kind, qact *a) {
    const int64_t nb = K / 32;
    const int64_t vecs = kind == 4 ? (nb + 3) / 4 * 2 : (nb + 1) / 2; /* 64-byte vectors a row */
    a->qn = vecs * 64;
    a->ln = kind == 4 ? vecs / 2 * 16 : vecs * 16; /* 4-bit: lo and hi share a group's lanes */
    a->sn = kind == 4 ? (nb + 15) / 16 * 16 : 0;
    const size_t qb = (size_t)(M * a->qn), lb = (size_t)(M * a->ln) * 4, sb = (size_t)(M * a->sn) * 4;
    const size_t cb = kind == 8 ? lb : 0;
    char *buf = aligned_alloc(64, qb + lb + sb + cb);
    if (!buf) return -1;
    memset(buf, 0, qb + lb + sb + cb);
    a->q = (int8_t *)buf;
    a->dxl = (float *)(buf + qb);
    a->sx = (float *)(buf + qb + lb);
    a->corr = (int32_t *)(buf + qb + lb + sb);
    for (int64_t i = 0; i < M; i++) {
        int8_t *q = a->q + i * a->qn;
        float *dxl = a->dxl + i * a->ln;
        for (int64_t b = 0; b < nb; b++) {
            __m128i q0, q1;
            int32_t s;
            const float dx = quant_block(x + i * ldx + b * 32, &q0, &q1, &s);
            if (kind == 4) {
                const int64_t g = b / 4, j = b % 4;
                _mm_store_si128((__m128i *)(q + g * 128 + j * 16), q0);
                _mm_store_si128((__m128i *)(q + g * 128 + 64 + j * 16), q1);
                for (int l = 0; l < 4; l++) dxl[g * 16 + j * 4 + l] = dx;
                a->sx[i * a->sn + b] = dx * (float)s;
            } else {
                const int64_t c = b / 2, h = b % 2;
                _mm_store_si128((__m128i *)(q + b * 32), q0);
                _mm_store_si128((__m128i *)(q + b * 32 + 16), q1);
                for (int l = 0; l < 8; l++) dxl[c * 16 + h * 8 + l] = dx;
            }
        }
        if (kind == 8) {
            const __m512i off = _mm512_set1_epi8((char)0x80);
            for (int64_t c = 0; c < vecs; c++) {
                const __m512i xq = _mm512_load_si512(q + c * 64);
                const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, xq);
                _mm512_store_si512(a->corr + i * a->ln + c * 16, _mm512_sub_epi32(_mm512_setzero_si512(), s));
            }
        }
    }
    return 0;
}

/* One group of 4 blocks of weight row w (4-bit) against mr rows of x: acc[i] += the group's
 * d dx S. bm/fm: the bytes/scales of the group that exist (all of them but in the tail). */
static inline __attribute__((always_inline)) void q4_group(const qact *a, int mr, int64_t g,
                                                           const uint8_t *wq, const float *wd,
                                                           __mmask64 bm, __mmask16 fm,
                                                           __m512 *acc) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m512i lane_block = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i raw = _mm512_maskz_loadu_epi8(bm, wq + g * 64);
    const __m512i lo = _mm512_and_si512(raw, low4);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
    const __m512 dw = _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps(fm, wd + g * 4));
    for (int i = 0; i < mr; i++) {
        const int8_t *xq = a->q + i * a->qn + g * 128;
        __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512(xq));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512(xq + 64));
        const __m512 sc = _mm512_mul_ps(dw, _mm512_load_ps(a->dxl + i * a->ln + g * 16));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[i]);
    }
}

/* Two blocks (64 weights) of 8-bit weight row w against mr rows of x. */
static inline __attribute__((always_inline)) void q8_pair(const qact *a, int mr, int64_t c,
                                                          const int8_t *wq, const float *wd,
                                                          __mmask64 bm, __mmask16 fm,
                                                          __m512 *acc) {
    const __m512i off = _mm512_set1_epi8((char)0x80);
    const __m512i lane_block = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    /* masked-off bytes load as 0 and become 128: their inputs are 0, and so is their lane's
     * correction */
    const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(bm, wq + c * 64), off);
    const __m512 dw = _mm512_permutexvar_ps(lane_block, _mm512_maskz_loadu_ps(fm, wd + c * 2));
    for (int i = 0; i < mr; i++) {
        const __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512(a->corr + i * a->ln + c * 16), w,
                                              _mm512_load_si512(a->q + i * a->qn + c * 64));
        const __m512 sc = _mm512_mul_ps(dw, _mm512_load_ps(a->dxl + i * a->ln + c * 16));
        acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, acc[i]);
    }
}

/* y[i][n0 + j] for i < mr, j < nr: rows n0.. of W, one at a time, against mr rows of quantized
 * x (mr is a constant in each inlined copy, so the mr accumulators stay in registers; x is read
 * from L1 again for each weight row, the weights once). */
static inline __attribute__((always_inline)) void tile_i8(const qact *a, int mr, const void *qs,
                                                          const float *d, const float *m,
                                                          int kind, int64_t K, int64_t n0,
                                                          int nr, float *y, int64_t ldy) {
    const int64_t nb = K / 32;
    for (int j = 0; j < nr; j++) {
        const int64_t n = n0 + j;
        const float *wd = d + n * nb;
        __m512 acc[MR];
        for (int i = 0; i < MR; i++) acc[i] = _mm512_setzero_ps();
        if (kind == 4) {
            const uint8_t *wq = (const uint8_t *)qs + n * (K / 2);
            const int64_t full = nb / 4, rest = nb % 4;
            for (int64_t g = 0; g < full; g++)
                q4_group(a, mr, g, wq, wd, ~(__mmask64)0, 0xF, acc);
            if (rest)
                q4_group(a, mr, full, wq, wd, ((__mmask64)1 << (16 * rest)) - 1,
                         (__mmask16)((1u << rest) - 1), acc);
            /* the minimum term, over the blocks: m_b dx_b sum(xq) */
            const float *wm = m + n * nb;
            for (int64_t b = 0; b < nb; b += 16) {
                const __mmask16 fm = nb - b >= 16 ? 0xFFFF : (__mmask16)((1u << (nb - b)) - 1);
                const __m512 mv = _mm512_maskz_loadu_ps(fm, wm + b);
                for (int i = 0; i < mr; i++)
                    acc[i] = _mm512_fmadd_ps(mv, _mm512_load_ps(a->sx + i * a->sn + b), acc[i]);
            }
        } else {
            const int8_t *wq = (const int8_t *)qs + n * K;
            const int64_t full = nb / 2;
            for (int64_t c = 0; c < full; c++) q8_pair(a, mr, c, wq, wd, ~(__mmask64)0, 0x3, acc);
            if (nb % 2) q8_pair(a, mr, full, wq, wd, 0xFFFFFFFFull, 0x1, acc);
        }
        for (int i = 0; i < mr; i++) y[i * ldy + j] = _mm512_reduce_add_ps(acc[i]);
    }
}

static void panel_rows_i8(const qact *a, int64_t M, const void *qs, const float *d,
                          const float *m, int kind, int64_t K, int64_t n0, int nr, float *y,
                          int64_t ldy) {
    int64_t i = 0;
    for (; i + MR <= M; i += MR) {
        const qact ai = {a->q + i * a->qn, a->dxl + i * a->ln, a->sx + i * a->sn,
                         kind == 8 ? a->corr + i * a->ln : NULL, a->qn, a->ln, a->sn};
        tile_i8(&ai, MR, qs, d, m, kind, K, n0, nr, y + i * ldy, ldy);
    }
    const qact ai = {a->q + i * a->qn, a->dxl + i * a->ln, a->sx + i * a->sn,
                     kind == 8 ? a->corr + i * a->ln : NULL, a->qn, a->ln, a->sn};
    switch (M - i) {
        case 3: tile_i8(&ai, 3, qs, d, m, kind, K, n0, nr, y + i * ldy, ldy); break;
        case 2: tile_i8(&ai, 2, qs, d, m, kind, K, n0, nr, y + i * ldy, ldy); break;
        case 1: tile_i8(&ai, 1, qs, d, m, kind, K, n0, nr, y + i * ldy, ldy); break;
        default: break;
    }
}
#endif

/* 1 where this library was built with the int8-activation path (AVX512-VNNI), else 0. */
int asyncllm_gguf_int8_act(void) {
#ifdef HAVE_INT8_ACT
    return 1;
#else
    return 0;
#endif
}

/* As asyncllm_gguf_linear_f32, with x quantized to int8 per block of 32 inside (above). Returns
 * 0; -1 when a buffer could not be allocated; -2 for a bad argument; -3 where the library was
 * built without the path (asyncllm_gguf_int8_act() == 0). */
int asyncllm_gguf_linear_i8(const float *x, int64_t ldx, int64_t M, const void *qs,
                            const float *d, const float *m, int kind, int64_t N, int64_t K,
                            float *y, int64_t ldy) {
    if (K % 32 || (kind != 4 && kind != 8) || (kind == 4 && !m)) return -2;
    if (M <= 0 || N <= 0) return 0;
#ifdef HAVE_INT8_ACT
    qact a;
    if (quantize_x(x, ldx, M, K, kind, &a)) return -1;
    const int64_t panels = (N + NR - 1) / NR;
    const int par = M * N * K >= PAR_MIN;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t n0 = p * NR;
        const int nr = N - n0 < NR ? (int)(N - n0) : NR;
        panel_rows_i8(&a, M, qs, d, m, kind, K, n0, nr, y + n0, ldy);
    }
    free(a.q);
    return 0;
#else
    (void)x, (void)ldx, (void)M, (void)qs, (void)d, (void)m, (void)N, (void)y, (void)ldy;
    return -3;
#endif
}
