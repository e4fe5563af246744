/* Paged decode attention on the CPU, float32, reading the paged KV cache in place.
 *
 * Built at first use by asyncllm/engine/kernels/cpu_decode_attention.py (gcc -O3 -march=native
 * -fopenmp) and called through ctypes; no torch headers.
 *
 * One new token per sequence: q [B, Hq, D] attends over the first seq_lens[b] cached tokens of
 * sequence b, whose blocks are block_tables[b, :]. KV cache [2, num_blocks, block_size, Hkv, D],
 * contiguous. GQA: query head hq reads KV head hq / (Hq / Hkv), as SDPA's enable_gqa does.
 *
 * Work item = one sequence, all KV heads (or, with fewer than 2 sequences per thread, one
 * (sequence, KV head)): the G = Hq / Hkv query heads sharing a KV head are done together, so
 * each K and V row is read from memory once for all of them, and a block's K (then V) for all
 * heads is one contiguous read. Two passes over the sequence's blocks, K then V (each byte of
 * the cache read once): scores for all positions into a per-thread buffer (Hq * L floats, stays
 * in L1/L2), an exact softmax (max, vectorised exp, sum), then the
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

/* exp(x) for x <= 0 (scores minus their max): 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p a
 * degree-6 Taylor polynomial (relative error ~2e-8 over the range, below float32's rounding).
 * x < -87.0 gives 0, as expf does within float32's normal range. On vector types (a scalar
 * function in an `omp simd` loop did not vectorise: GCC 12 gives up on the bit cast). */
typedef int32_t vi __attribute__((vector_size(VW * sizeof(int32_t))));

static inline vf exp_nonpos(vf x) {
    const vf lo = (vf){0} - 87.0f;
    const vi tiny = x < lo;
    x = (vf)((tiny & (vi)lo) | (~tiny & (vi)x));
    const vf y = x * 1.44269504088896341f + 0.5f;
    vi ni = __builtin_convertvector(y, vi); /* toward zero; one less where that rounded up */
    ni += (vi)(__builtin_convertvector(ni, vf) > y);
    const vf n = __builtin_convertvector(ni, vf);
    vf r = x - n * 0.693145751953125f;
    r = r - n * 1.428606765330187045e-06f;
    vf p = (vf){0} + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const vf e = p * (vf)((ni + 127) << 23);
    return (vf)(~tiny & (vi)e);
}

/* Into L2 (locality 1), not L1: a block is 192 lines and L1's miss buffers are few; asking for
 * L1 stalled on them (2 threads, B=64: 0.96 -> 0.80 ms per call with L2 hints). */
static inline __attribute__((always_inline)) void prefetch_rows(const float *p, int rows,
                                                                 int64_t stride, int width) {
    for (int t = 0; t < rows; t++)
        for (int d = 0; d < width; d += 64 / sizeof(float)) __builtin_prefetch(p + t * stride + d, 0, 1);
}

/* One work item: KV heads h0 .. h0 + NH - 1 of one sequence (all of them, or one when there are
 * few sequences to share out), their NH * G query heads, over its L cached tokens. With all
 * heads, a block's K (then V) is one contiguous stretch of memory (block_size * Hkv * D floats,
 * 12 KB here) instead of NH strided pieces: the hardware prefetcher streams it, and the next
 * block is asked for by software. always_inline with D a compile-time constant at the call
 * sites below (64, 128) lets the compiler keep a query row and an accumulator row in registers;
 * the loops run block by block, head by head, query head by query head, token by token, so a
 * block's K (then V) rows come from L1 for every query head of a KV head after the first. */
static inline __attribute__((always_inline)) void attend_item(
    float *restrict o, const float *restrict q, int64_t q_stride_h, const float *restrict K,
    const float *restrict V, const int32_t *restrict table, int64_t L, int NH, int G, const int D,
    int block_size, int64_t tok_stride, int64_t blk_stride, int64_t max_len, float scale,
    int64_t first, float softcap, float *restrict scores, float *restrict acc) {
    const int nblk = (int)((L + block_size - 1) / block_size);
    /* A sliding window: positions before `first` are hidden, and blocks wholly before it are
     * not read at all (they may have been freed). */
    const int j0 = (int)(first / block_size);
    const int64_t lo = (int64_t)j0 * block_size;
    const int QH = NH * G; /* query heads of this item, in order: q + i * q_stride_h, o + i * D */
    /* pass 1: scaled scores, scores[i * max_len + position] for query head i */
    for (int j = j0; j < nblk; j++) {
        const float *kb = K + (int64_t)table[j] * blk_stride;
        const int64_t base = (int64_t)j * block_size;
        const int n = (int)(L - base < block_size ? L - base : block_size);
        /* The blocks are scattered, so the hardware prefetcher cannot run ahead across them:
         * ask for the next block's K rows and this block's V rows (pass 2 reads them; the
         * item's K and V, ~50 KB at 100 tokens, stay in L2) while this block computes. */
        if (j + 1 < nblk) prefetch_rows(K + (int64_t)table[j + 1] * blk_stride, block_size,
                                        tok_stride, NH * D);
        prefetch_rows(V + (int64_t)table[j] * blk_stride, n, tok_stride, NH * D);
        for (int i = 0; i < QH; i++) {
            const float *qg = q + i * q_stride_h;
            const float *kh = kb + (i / G) * D;
            float qr[D];
#pragma omp simd
            for (int d = 0; d < D; d++) qr[d] = qg[d] * scale;
            float *sg = scores + i * max_len + base;
            int t = 0;
            /* four tokens at a time: four independent FMA chains instead of one */
            for (; t + 4 <= n; t += 4) {
                const float *k0 = kh + t * tok_stride, *k1 = k0 + tok_stride;
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
                const float *kt = kh + t * tok_stride;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int d = 0; d < D; d++) s += qr[d] * kt[d];
                sg[t] = s;
            }
        }
    }
    /* soft cap (Gemma 2): c * tanh(s / c); then the window's hidden head of the first block */
    for (int g = 0; g < QH; g++) {
        float *sg = scores + g * max_len;
        if (softcap > 0.0f)
            for (int64_t i = lo; i < L; i++) sg[i] = softcap * tanhf(sg[i] / softcap);
        for (int64_t i = lo; i < first; i++) sg[i] = -INFINITY;
    }
    /* softmax numerators, in place; inv[i] = 1 / sum, applied at the end */
    float inv[QH];
    for (int g = 0; g < QH; g++) {
        float *sg = scores + g * max_len;
        float m = sg[first];
#pragma omp simd reduction(max : m)
        for (int64_t i = first + 1; i < L; i++) m = sg[i] > m ? sg[i] : m;
        /* whole vectors; the tail of the row padded with -inf (exp 0) in a copy */
        vf sums = (vf){0};
        for (int64_t i = lo; i < L; i += VW) {
            vf x;
            const int64_t n = L - i < VW ? L - i : VW;
            if (n == VW) {
                memcpy(&x, sg + i, sizeof(vf));
            } else {
                float tail[VW];
                for (int64_t t = 0; t < VW; t++) tail[t] = t < n ? sg[i + t] : -INFINITY;
                memcpy(&x, tail, sizeof(vf));
            }
            const vf e = exp_nonpos(x - m);
            sums += e;
            memcpy(sg + i, &e, sizeof(float) * (size_t)n);
        }
        float sum = 0.0f;
        for (int v = 0; v < VW; v++) sum += sums[v];
        inv[g] = 1.0f / sum;
    }
    /* pass 2: probability-weighted sum of V rows */
    memset(acc, 0, sizeof(float) * (size_t)QH * D);
    for (int j = j0; j < nblk; j++) {
        const float *vb = V + (int64_t)table[j] * blk_stride;
        const int64_t base = (int64_t)j * block_size;
        const int n = (int)(L - base < block_size ? L - base : block_size);
        for (int g = 0; g < QH; g++) {
            const float *pg = scores + g * max_len + base;
            const float *vh = vb + (g / G) * D;
            float *ag = acc + g * D;
            if (D % VW == 0 && D <= 8 * VW) {
                /* whole rows of vectors, held in registers across the block's tokens */
                vf a[8];
                for (int v = 0; v < D / VW; v++) memcpy(&a[v], ag + v * VW, sizeof(vf));
                for (int t = 0; t < n; t++) {
                    const float *vt = vh + t * tok_stride;
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
                    const float *vt = vh + t * tok_stride;
                    const float p = pg[t];
#pragma omp simd
                    for (int d = 0; d < D; d++) ag[d] += p * vt[d];
                }
            }
        }
    }
    for (int g = 0; g < QH; g++) {
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
    int32_t block_size, int64_t num_blocks, float scale, int32_t num_threads,
    int64_t window,              /* > 0: each query sees its last `window` positions only */
    float softcap) {             /* > 0: scores become softcap * tanh(score / softcap) */
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
    /* A work item is a whole sequence (all KV heads) when there are enough sequences to go
     * round; otherwise one (sequence, KV head), so a few long sequences still use every thread. */
    const int per_seq = batch >= 2 * num_threads;
    const int NH = per_seq ? num_kv_heads : 1;
    const int items = per_seq ? batch : batch * num_kv_heads;
    const int QH = NH * G;
    int bad = 0;

#pragma omp parallel num_threads(num_threads) reduction(+ : bad)
    {
        /* per thread: scores [QH, max_len], accumulators [QH, D] */
        float *scores = (float *)malloc(sizeof(float) * ((size_t)QH * max_len + (size_t)QH * D));
        float *acc = scores ? scores + (size_t)QH * max_len : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int item = 0; item < items; item++) {
            const int b = per_seq ? item : item / num_kv_heads;
            const int h = per_seq ? 0 : item % num_kv_heads;
            float *o = out + ((int64_t)b * num_q_heads + (int64_t)h * G) * D;
            const int64_t L = seq_lens[b] < cap ? seq_lens[b] : cap;
            const int32_t *table = block_tables + b * bt_stride;
            const int nblk = L > 0 ? (int)((L + block_size - 1) / block_size) : 0;
            const int64_t first = window > 0 && L > window ? L - window : 0;
            int ok = scores != NULL && L > 0;
            for (int j = (int)(first / block_size); ok && j < nblk; j++)
                if (table[j] < 0 || table[j] >= num_blocks) ok = 0;
            if (!ok) {
                if (L > 0) bad += 1;
                memset(o, 0, sizeof(float) * (size_t)QH * D);
                continue;
            }
            const float *qb = q + b * q_stride_b + (int64_t)h * G * q_stride_h;
            const float *Kh = K + (int64_t)h * D, *Vh = V + (int64_t)h * D;
            if (D == 64)
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, NH, G, 64, block_size,
                            tok_stride, blk_stride, max_len, scale, first, softcap, scores,
                            acc);
            else if (D == 128)
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, NH, G, 128, block_size,
                            tok_stride, blk_stride, max_len, scale, first, softcap, scores,
                            acc);
            else
                attend_item(o, qb, q_stride_h, Kh, Vh, table, L, NH, G, D, block_size,
                            tok_stride, blk_stride, max_len, scale, first, softcap, scores,
                            acc);
        }
        free(scores);
    }
    return bad;
}
