/* Paged decode attention on the CPU, float32, reading the paged KV cache in place.
 *
 * Built at first use by asyncllm/engine/kernels/cpu_decode_attention.py (gcc -O3 -march=native
 * -fopenmp) and called through ctypes; no torch headers.
 *
 * One new token per sequence: q [B, Hq, D] attends over the first seq_lens[b] cached tokens of
 * sequence b, whose blocks are block_tables[b, :]. KV cache [2, num_blocks, block_size, Hkv, D],
 * contiguous. GQA: query head hq reads KV head hq / (Hq / Hkv), as SDPA's enable_gqa does.
 *
 * Work item = (sequence, KV head): the G = Hq / Hkv query heads sharing that KV head are done
 * together, so each K and V row is read from memory once for all of them. Two passes over the
 * sequence's blocks, K then V (each byte of the cache read once): scores for all positions into a
 * per-thread buffer (G * L floats, stays in L1/L2), an exact softmax (max, exp, sum), then the
 * probability-weighted sum of V rows. Everything accumulates in float32. (An online softmax
 * would need no buffer, but rescales the accumulators as the max moves; with the buffer the
 * softmax is exact and the V pass is plain multiply-adds.)
 *
 * Rows with seq_len <= 0 (padding) get zeros and read nothing. Returns the number of work items
 * whose block table held an id outside [0, num_blocks) (their rows are zeroed, nothing is read);
 * 0 when all is well.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats (64 bytes): GCC/clang vector extensions, lowered to whatever the target has (one
 * AVX-512 register, two AVX2 ones, four NEON ones). */
#define VW 16
typedef float vf __attribute__((vector_size(VW * sizeof(float))));

/* exp(x) for x <= 0 (scores minus their max), vectorisable: 2^n * p(r), r = x - n ln2 in
 * [-ln2/2, ln2/2], p a degree-6 Taylor polynomial (relative error ~2e-8 over the range, below
 * float32's rounding). x < -87.3 gives 0, as expf does within float32's normal range. */
#pragma omp declare simd
static inline float exp_nonpos(float x) {
    const float log2e = 1.44269504088896341f;
    const float ln2_hi = 0.693145751953125f;
    const float ln2_lo = 1.428606765330187045e-06f;
    float xc = x < -87.0f ? -87.0f : x;
    float n = floorf(xc * log2e + 0.5f);
    float r = xc - n * ln2_hi;
    r = r - n * ln2_lo;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof(two_n));
    float e = p * two_n;
    return x < -87.0f ? 0.0f : e;
}

static inline __attribute__((always_inline)) void prefetch_rows(const float *p, int rows,
                                                                 int64_t stride, int D) {
    for (int t = 0; t < rows; t++)
        for (int d = 0; d < D; d += 64 / sizeof(float)) __builtin_prefetch(p + t * stride + d);
}

/* One work item: the G query heads of KV head h of one sequence, over its L cached tokens.
 * always_inline with D a compile-time constant at the call sites below (64, 128) lets the
 * compiler keep a query row and an accumulator row in registers; the loops run block by block,
 * query head by query head, token by token, so a block's K (then V) rows come from L1 for every
 * query head after the first. */
static inline __attribute__((always_inline)) void attend_item(
    float *restrict o, const float *restrict q, int64_t q_stride_h, const float *restrict K,
    const float *restrict V, const int32_t *restrict table, int64_t L, int G, const int D,
    int block_size, int64_t tok_stride, int64_t blk_stride, int64_t max_len, float scale,
    float *restrict scores, float *restrict acc) {
    const int nblk = (int)((L + block_size - 1) / block_size);
    /* pass 1: scaled scores, scores[g * max_len + position] */
    for (int j = 0; j < nblk; j++) {
        const float *kb = K + (int64_t)table[j] * blk_stride;
        const int64_t base = (int64_t)j * block_size;
        const int n = (int)(L - base < block_size ? L - base : block_size);
        /* The blocks are scattered, so the hardware prefetcher cannot run ahead across them:
         * ask for the next block's K rows and this block's V rows (pass 2 reads them; the
         * item's K and V, ~50 KB at 100 tokens, stay in L2) while this block computes. */
        if (j + 1 < nblk) prefetch_rows(K + (int64_t)table[j + 1] * blk_stride, block_size,
                                        tok_stride, D);
        prefetch_rows(V + (int64_t)table[j] * blk_stride, n, tok_stride, D);
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * q_stride_h;
            float qr[D];
#pragma omp simd
            for (int d = 0; d < D; d++) qr[d] = qg[d] * scale;
            float *sg = scores + g * max_len + base;
            int t = 0;
            /* four tokens at a time: four independent FMA chains instead of one */
            for (; t + 4 <= n; t += 4) {
                const float *k0 = kb + t * tok_stride, *k1 = k0 + tok_stride;
                const float *k2 = k1 + tok_stride, *k3 = k2 + tok_stride;
                float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                for (int d = 0; d < D; d++) {
                    s0 += qr[d] * k0[d];
                    s1 += qr[d] * k1[d];
                    s2 += qr[d] * k2[d];
                    s3 += qr[d] * k3[d];
                }
                sg[t] = s0, sg[t + 1] = s1, sg[t + 2] = s2, sg[t + 3] = s3;
            }
            for (; t < n; t++) {
                const float *kt = kb + t * tok_stride;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += qr[d] * kt[d];
                sg[t] = s;
            }
        }
    }
    /* softmax numerators, in place; acc[g * D] holds 1 / sum until the end */
    float inv[G];
    for (int g = 0; g < G; g++) {
        float *sg = scores + g * max_len;
        float m = sg[0];
#pragma omp simd reduction(max : m)
        for (int64_t i = 1; i < L; i++) m = sg[i] > m ? sg[i] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < L; i++) {
            float e = exp_nonpos(sg[i] - m);
            sg[i] = e;
            sum += e;
        }
        inv[g] = 1.0f / sum;
    }
    /* pass 2: probability-weighted sum of V rows */
    memset(acc, 0, sizeof(float) * (size_t)G * D);
    for (int j = 0; j < nblk; j++) {
        const float *vb = V + (int64_t)table[j] * blk_stride;
        const int64_t base = (int64_t)j * block_size;
        const int n = (int)(L - base < block_size ? L - base : block_size);
        for (int g = 0; g < G; g++) {
            const float *pg = scores + g * max_len + base;
            float *ag = acc + g * D;
            if (D % VW == 0 && D <= 8 * VW) {
                /* whole rows of vectors, held in registers across the block's tokens */
                vf a[8];
                for (int v = 0; v < D / VW; v++) memcpy(&a[v], ag + v * VW, sizeof(vf));
                for (int t = 0; t < n; t++) {
                    const float *vt = vb + t * tok_stride;
                    const float p = pg[t];
                    for (int v = 0; v < D / VW; v++) {
                        vf x;
                        memcpy(&x, vt + v * VW, sizeof(vf));
                        a[v] += p * x;
                    }
                }
                for (int v = 0; v < D / VW; v++) memcpy(ag + v * VW, &a[v], sizeof(vf));
            } else {
                for (int t = 0; t < n; t++) {
                    const float *vt = vb + t * tok_stride;
                    const float p = pg[t];
#pragma omp simd
                    for (int d = 0; d < D; d++) ag[d] += p * vt[d];
                }
            }
        }
    }
    for (int g = 0; g < G; g++) {
#pragma omp simd
        for (int d = 0; d < D; d++) o[g * D + d] = acc[g * D + d] * inv[g];
    }
}

int asyncllm_paged_decode_attention_f32(
    float *out,                  /* [B, Hq, D], contiguous */
    const float *q,              /* q[b, h, d] at q + b * q_stride_b + h * q_stride_h + d */
    int64_t q_stride_b, int64_t q_stride_h,
    const float *kv_cache,       /* [2, num_blocks, block_size, Hkv, D], contiguous */
    const int32_t *block_tables, /* block id j of sequence b at block_tables[b * bt_stride + j] */
    int64_t bt_stride, int32_t max_blocks,
    const int32_t *seq_lens,     /* [B] */
    int32_t batch, int32_t num_q_heads, int32_t num_kv_heads, int32_t head_dim,
    int32_t block_size, int64_t num_blocks, float scale, int32_t num_threads) {
    const int G = num_q_heads / num_kv_heads;
    const int D = head_dim;
    const int64_t tok_stride = (int64_t)num_kv_heads * D;
    const int64_t blk_stride = (int64_t)block_size * tok_stride;
    const float *K = kv_cache;
    const float *V = kv_cache + num_blocks * blk_stride;
    const int64_t cap = (int64_t)max_blocks * block_size;

    int64_t max_len = 1;
    for (int b = 0; b < batch; b++) {
        int64_t L = seq_lens[b] < cap ? seq_lens[b] : cap;
        if (L > max_len) max_len = L;
    }
    const int items = batch * num_kv_heads;
    /* A thread takes all KV heads of a sequence together when there are enough sequences to go
     * round: a cached token's K (or V) row holds every head, so the heads after the first find
     * its cache lines in this core's L2 (a sequence's K/V is ~160 KB at 100 tokens here). */
    const int chunk = batch >= 4 * num_threads ? num_kv_heads : 1;
    int bad = 0;

#pragma omp parallel num_threads(num_threads) reduction(+ : bad)
    {
        /* per thread: scores [G, max_len], accumulators [G, D] */
        float *scores = (float *)malloc(sizeof(float) * ((size_t)G * max_len + (size_t)G * D));
        float *acc = scores ? scores + (size_t)G * max_len : NULL;
#pragma omp for schedule(dynamic, chunk)
        for (int item = 0; item < items; item++) {
            const int b = item / num_kv_heads;
            const int h = item % num_kv_heads;
            float *o = out + ((int64_t)b * num_q_heads + (int64_t)h * G) * D;
            const int64_t L = seq_lens[b] < cap ? seq_lens[b] : cap;
            const int32_t *table = block_tables + b * bt_stride;
            const int nblk = L > 0 ? (int)((L + block_size - 1) / block_size) : 0;
            int ok = scores != NULL && L > 0;
            for (int j = 0; ok && j < nblk; j++)
                if (table[j] < 0 || table[j] >= num_blocks) ok = 0;
            if (!ok) {
                if (L > 0) bad += 1;
                memset(o, 0, sizeof(float) * (size_t)G * D);
                continue;
            }
            const float *qb = q + b * q_stride_b + (int64_t)h * G * q_stride_h;
            const float *Kh = K + (int64_t)h * D, *Vh = V + (int64_t)h * D;
            if (D == 64)
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, G, 64, block_size, tok_stride,
                            blk_stride, max_len, scale, scores, acc);
            else if (D == 128)
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, G, 128, block_size, tok_stride,
                            blk_stride, max_len, scale, scores, acc);
            else
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, G, D, block_size, tok_stride,
                            blk_stride, max_len, scale, scores, acc);
        }
        free(scores);
    }
    return bad;
}
