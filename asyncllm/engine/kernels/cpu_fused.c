/* Fused elementwise work of the decoder layer on the CPU, float32.
 *
 * Built at first use by asyncllm/engine/kernels/cpu_fused.py (through _cpu_build: gcc -O3
 * -march=native -fopenmp, plus -ffp-contract=off so a*b + c rounds twice, as torch's separate
 * ops do) and called through ctypes; no torch headers. Each function replaces a chain of small
 * torch ops with one pass over rows that sit in L1/L2:
 *   residual add + RMSNorm      (torch: add, pow, mean, add, rsqrt, mul, mul: 7 ops, 5 passes)
 *   SiLU(gate) * up             (torch: chunk, silu, mul)
 *   q/k [RMSNorm +] rotary, in place in the fused qkv projection (torch: ~8 ops per q and k)
 *   KV cache write              (torch: a mask, a host sync, two index_copy_)
 * Rows are split over OpenMP threads (torch's own runtime) when there is enough work.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* below this many floats a call stays on the calling thread: waking the pool costs more */
#define PAR_MIN 32768

/* exp(x): 2^n * p(r), n = floor(x log2e + 1/2), r = x - n ln2 in [-ln2/2, ln2/2], p a degree-7
 * Taylor polynomial (relative error ~1e-8 over the range). x is clamped to [-87.3, 88.7]
 * (float32's normal range; below it the result is ~1e-38 rather than a denormal or 0). 2^n is
 * built in the exponent field as two factors, so n = 128 does not overflow it. Written once on
 * GCC/clang vector types (16 lanes: one AVX-512 register) and once on scalars, with the same
 * operations in the same order: the tail of a row gets the same bits as its body. (A scalar
 * function in an `omp simd` loop did not vectorise: GCC 12 gives up on the bit cast.) */
#define VW 16
typedef float vf __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693145751953125f
#define EXP_LN2_LO 1.428606765330187045e-06f

static inline vf vsel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }

static inline vf exp_v(vf x) {
    const vf lo = (vf){0} - 87.3f, hi = (vf){0} + 88.7f;
    x = vsel(x < lo, lo, x);
    x = vsel(x > hi, hi, x);
    const vf y = x * EXP_LOG2E + 0.5f;
    vi ni = __builtin_convertvector(y, vi); /* toward zero; one less where that rounded up */
    ni += (vi)(__builtin_convertvector(ni, vf) > y);
    const vf n = __builtin_convertvector(ni, vf);
    vf r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    vf p = (vf){0} + 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vi n1 = ni >> 1, n2 = ni - n1;
    return p * (vf)((n1 + 127) << 23) * (vf)((n2 + 127) << 23);
}

static inline float exp_f(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.7f ? 88.7f : x;
    const float y = x * EXP_LOG2E + 0.5f;
    int32_t ni = (int32_t)y;
    ni -= (float)ni > y;
    const float n = (float)ni;
    float r = x - n * EXP_LN2_HI;
    r = r - n * EXP_LN2_LO;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t n1 = ni >> 1, n2 = ni - n1;
    union {
        uint32_t u;
        float f;
    } f1 = {.u = (uint32_t)(n1 + 127) << 23}, f2 = {.u = (uint32_t)(n2 + 127) << 23};
    return p * f1.f * f2.f;
}

/* weight * (s * 1/sqrt(mean(s^2) + eps)) over one row of n, s = x (+ r); s stored to so */
static inline void rms_row(float *restrict out, float *restrict so, const float *restrict x,
                           const float *restrict r, const float *restrict w, int64_t n,
                           float eps) {
    float ss = 0.0f;
    if (r) {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) {
            const float s = x[i] + r[i];
            so[i] = s;
            ss += s * s;
        }
        x = so;
    } else {
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    }
    const float inv = 1.0f / sqrtf(ss / (float)n + eps);
#pragma omp simd
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * inv);
}

/* out [rows, n] = RMSNorm(x + res) * w, res_out = x + res (res may be NULL: out only). Rows of
 * x/res/out/res_out at the given row strides, contiguous within a row. */
void asyncllm_add_rms_norm_f32(float *out, int64_t out_stride, float *res_out,
                               int64_t res_out_stride, const float *x, int64_t x_stride,
                               const float *res, int64_t res_stride, const float *w, int64_t rows,
                               int64_t n, float eps, int32_t num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * n >= PAR_MIN && rows > 1)
    for (int64_t t = 0; t < rows; t++)
        rms_row(out + t * out_stride, res ? res_out + t * res_out_stride : NULL,
                x + t * x_stride, res ? res + t * res_stride : NULL, w, n, eps);
}

static inline void silu_mul_row(float *restrict o, const float *restrict g,
                                const float *restrict u, int64_t n) {
    int64_t i = 0;
    for (; i + VW <= n; i += VW) {
        vf gv, uv;
        memcpy(&gv, g + i, sizeof(vf));
        memcpy(&uv, u + i, sizeof(vf));
        const vf ov = gv / (1.0f + exp_v(-gv)) * uv;
        memcpy(o + i, &ov, sizeof(vf));
    }
    for (; i < n; i++) o[i] = g[i] / (1.0f + exp_f(-g[i])) * u[i];
}

/* out [rows, d] = silu(x[:, :d]) * x[:, d:2d]; silu(g) = g / (1 + exp(-g)) */
void asyncllm_silu_and_mul_f32(float *out, int64_t out_stride, const float *x, int64_t x_stride,
                               int64_t rows, int64_t d, int32_t num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * d >= PAR_MIN && rows > 1)
    for (int64_t t = 0; t < rows; t++)
        silu_mul_row(out + t * out_stride, x + t * x_stride, x + t * x_stride + d, d);
}

/* One head row of D, in place: optionally RMSNorm with weight nw (as the torch path: the norm
 * rounds to float32 first), then the neox rotation of its first rot dims at one position:
 * y[i] = x[i] cos[i] - x[i+h] sin[i], y[i+h] = x[i+h] cos[i+h] + x[i] sin[i+h], h = rot/2. */
static inline void rope_row(float *restrict x, const float *restrict c, const float *restrict s,
                            const float *restrict nw, float eps, int D, int rot) {
    if (nw) {
        float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
        for (int i = 0; i < D; i++) ss += x[i] * x[i];
        const float inv = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int i = 0; i < D; i++) x[i] = nw[i] * (x[i] * inv);
    }
    const int h = rot / 2;
    float a[h], b[h];
    memcpy(a, x, sizeof(float) * h);
    memcpy(b, x + h, sizeof(float) * h);
#pragma omp simd
    for (int i = 0; i < h; i++) {
        x[i] = a[i] * c[i] + (-b[i]) * s[i];
        x[i + h] = b[i] * c[i + h] + a[i] * s[i + h];
    }
}

/* q/k heads rotated in place at positions[t]: q row t head j at q + t * q_st + j * D (heads
 * contiguous), k likewise; cos/sin tables [max_pos, rot] at row stride cs_stride. qw/kw: the
 * per-head RMSNorm weights [D] (Qwen3) or NULL. Returns how many positions were outside
 * [0, max_pos) (those rows are left as they were). */
int asyncllm_qk_norm_rope_f32(float *q, int64_t q_st, int32_t hq, float *k, int64_t k_st,
                              int32_t hk, const int64_t *positions, const float *cos,
                              const float *sin, int64_t cs_stride, int64_t max_pos,
                              const float *qw, const float *kw, float eps, int32_t D,
                              int32_t rot, int64_t T, int32_t num_threads) {
    int bad = 0;
#pragma omp parallel for num_threads(num_threads) reduction(+ : bad) \
    if (T * (hq + hk) * D >= PAR_MIN && T > 1)
    for (int64_t t = 0; t < T; t++) {
        const int64_t p = positions[t];
        if (p < 0 || p >= max_pos) {
            bad += 1;
            continue;
        }
        const float *c = cos + p * cs_stride, *s = sin + p * cs_stride;
        for (int j = 0; j < hq; j++) rope_row(q + t * q_st + (int64_t)j * D, c, s, qw, eps, D, rot);
        for (int j = 0; j < hk; j++) rope_row(k + t * k_st + (int64_t)j * D, c, s, kw, eps, D, rot);
    }
    return bad;
}

/* The new tokens' K/V rows ([T, H, D] at token stride k_st / v_st, heads contiguous) to their
 * flat slots of the cache [2, num_slots, H, D]; slot -1 writes nothing. Returns how many slots
 * were outside [-1, num_slots) (not written). */
int asyncllm_write_kv_f32(float *cache, int64_t num_slots, const float *k, int64_t k_st,
                          const float *v, int64_t v_st, int64_t row, const int64_t *slots,
                          int64_t T, int32_t num_threads) {
    int bad = 0;
    float *kc = cache, *vc = cache + num_slots * row;
#pragma omp parallel for num_threads(num_threads) reduction(+ : bad) if (T * row >= 4 * PAR_MIN)
    for (int64_t t = 0; t < T; t++) {
        const int64_t s = slots[t];
        if (s < 0 || s >= num_slots) {
            bad += s != -1;
            continue;
        }
        memcpy(kc + s * row, k + t * k_st, sizeof(float) * (size_t)row);
        memcpy(vc + s * row, v + t * v_st, sizeof(float) * (size_t)row);
    }
    return bad;
}
