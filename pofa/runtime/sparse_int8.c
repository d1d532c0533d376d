/* Sparse int8 Linear for CPUs: y = dequant(quant(x) W_q^T) + b, with W_q unstructured-sparse int8.
 *
 * Compiled by pofa/runtime/native.py on first use (-O3 -march=native -fopenmp) and called through ctypes; the
 * Python side packs the weights (pofa/runtime/int8.py). One call runs one Linear on a [T, K] float32 input:
 *
 * 1. Activation quantization, fused into the call and parallel: q = clamp(rint(x / scale) + zero_point, 0, qmax),
 *    the arithmetic of the QAT model's fake-quant (float32 division, round half to even), written as uint8 in a
 *    token-blocked, feature-interleaved layout xq[token_block][group][token][4] (group = 4 consecutive features).
 * 2. Sparse x dense product on the integers. The weight is stored by groups of 4 consecutive input features: a
 *    row keeps every group that holds at least one non-zero (at 90% unstructured sparsity, 34% of the groups for
 *    10% of the weights), as a group index and the 4 int8 weights packed in an int32. One group times a block of
 *    tokens is then exactly the u8 x s8 4-way dot product of VNNI (vpdpbusd, exact: no int16 saturation), with
 *    the weight word broadcast and the activations read contiguously; each weight word is loaded once per token
 *    block and the accumulators of a row's token block stay in registers.
 * 3. Dequantization and bias fused on the way out: y = (acc - zero_point * rowsum(W_q)) * (scale * w_scale) + b.
 *
 * Three code paths, chosen at compile time by what -march=native enables: AVX-512 VNNI (16 tokens per
 * instruction), AVX2 (vpmaddwd on zero-extended activations: two partial sums per token, added at the end), and
 * portable C. All three compute the same integers; the float epilogue may differ in the last bit (FMA).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define POFA_ISA "avx512-vnni"
#define POFA_PATH 3
#define TB 64 /* tokens per block: 4 zmm accumulators */
#define PARTIAL 1 /* int32 partial sums per token */
#elif defined(__AVX2__)
#include <immintrin.h>
#define POFA_ISA "avx2"
#define POFA_PATH 2
#define TB 32 /* 8 ymm accumulators of 4 tokens x 2 partial sums */
#define PARTIAL 2
#else
#define POFA_ISA "portable"
#define POFA_PATH 1
#define TB 32
#define PARTIAL 1
#endif
#define RB 16 /* output rows per task: 16 floats = one 64-byte line of y per token */
#define GROUPS_PER_CHUNK 64 /* quantization work unit: 256 features of one token block */

int pofa_sparse_int8_abi(void) { return 1; }
const char *pofa_sparse_int8_isa(void) { return POFA_ISA; }
int pofa_sparse_int8_token_block(void) { return TB; }

/* Quantize features [4 * g0, 4 * g1) of token block tb into xq. Padded tokens and features get the zero point;
 * padded features meet zero weights and padded tokens are never written out, so any value would do. */
static void quantize_chunk(const float *x, int64_t T, int64_t K, float scale, float zero_point, float qmax,
                           uint8_t *xq, int64_t tb, int64_t g0, int64_t g1) {
    const int64_t G = (K + 3) / 4;
    uint8_t *block = xq + tb * G * TB * 4;
    const uint8_t zp = (uint8_t)zero_point;
    const int64_t k0 = g0 * 4, k1 = g1 * 4 < K ? g1 * 4 : K;
    uint8_t q[4 * GROUPS_PER_CHUNK];
    for (int64_t j = 0; j < TB; j++) {
        const int64_t t = tb * TB + j;
        memset(q, zp, sizeof q);
        if (t < T) {
            const float *row = x + t * K + k0;
            for (int64_t k = 0; k < k1 - k0; k++) { /* contiguous: vectorized by the compiler */
                float v = rintf(row[k] / scale) + zero_point;
                v = v > 0.0f ? v : 0.0f; /* also maps NaN to 0 */
                v = v < qmax ? v : qmax;
                q[k] = (uint8_t)(int32_t)v;
            }
        }
        for (int64_t g = g0; g < g1; g++) memcpy(block + (g * TB + j) * 4, q + (g - g0) * 4, 4);
    }
}

/* Rows [RB * rb, RB * rb + RB) x tokens of block tb. */
static void row_block(const uint8_t *xq, int64_t G, int64_t T, int64_t R, const int64_t *row_ptr,
                      const int32_t *group, const int32_t *word, const float *out_scale, const int32_t *out_offset,
                      const float *bias, float *y, int64_t rb, int64_t tb) {
    int32_t acc[RB][TB * PARTIAL] __attribute__((aligned(64)));
    const uint8_t *block = xq + tb * G * TB * 4;
    const int64_t r0 = rb * RB, rn = R - r0 < RB ? R - r0 : RB;
    for (int64_t i = 0; i < rn; i++) {
        const int64_t r = r0 + i;
#if POFA_PATH == 3
        __m512i a[TB / 16];
        for (int v = 0; v < TB / 16; v++) a[v] = _mm512_setzero_si512();
        for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; p++) {
            const __m512i w = _mm512_set1_epi32(word[p]);
            const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
            for (int v = 0; v < TB / 16; v++)
                a[v] = _mm512_dpbusd_epi32(a[v], _mm512_loadu_si512((const void *)(xg + v * 64)), w);
        }
        for (int v = 0; v < TB / 16; v++) _mm512_store_si512((void *)(acc[i] + v * 16), a[v]);
#elif POFA_PATH == 2
        __m256i a[TB / 4];
        for (int v = 0; v < TB / 4; v++) a[v] = _mm256_setzero_si256();
        for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; p++) {
            /* the 4 weights as int16, twice per 128-bit lane: (w0 w1)(w2 w3) pairs meet each token's 4 features */
            const __m256i w = _mm256_cvtepi8_epi16(_mm_set1_epi32(word[p]));
            const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
            for (int v = 0; v < TB / 4; v++) {
                const __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(xg + v * 16)));
                a[v] = _mm256_add_epi32(a[v], _mm256_madd_epi16(xv, w));
            }
        }
        for (int v = 0; v < TB / 4; v++) _mm256_store_si256((__m256i *)(acc[i] + v * 8), a[v]);
#else
        for (int j = 0; j < TB; j++) acc[i][j] = 0;
        for (int64_t p = row_ptr[r]; p < row_ptr[r + 1]; p++) {
            int8_t w[4];
            memcpy(w, &word[p], 4);
            const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
            for (int j = 0; j < TB; j++)
                acc[i][j] += w[0] * xg[4 * j] + w[1] * xg[4 * j + 1] + w[2] * xg[4 * j + 2] + w[3] * xg[4 * j + 3];
        }
#endif
    }
    const int64_t t0 = tb * TB, tn = T - t0 < TB ? T - t0 : TB;
#if POFA_PATH == 3
    /* acc holds a token per lane, y a row per float: each token's RB sums are gathered (one column of acc) and
     * written as one vector; the rows past rn are masked off (neither read nor written). */
    const __mmask16 m = (__mmask16)((1u << rn) - 1);
    const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                              _mm512_set1_epi32(TB));
    const __m512i offset = _mm512_maskz_loadu_epi32(m, out_offset + r0);
    const __m512 scale = _mm512_maskz_loadu_ps(m, out_scale + r0), shift = _mm512_maskz_loadu_ps(m, bias + r0);
    for (int64_t j = 0; j < tn; j++) {
        const __m512i s = _mm512_mask_i32gather_epi32(offset, m, column, (const void *)&acc[0][j], 4);
        const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(s, offset));
        _mm512_mask_storeu_ps(y + (t0 + j) * R + r0, m, _mm512_fmadd_ps(v, scale, shift));
    }
#else
    for (int64_t j = 0; j < tn; j++) {
        float *out = y + (t0 + j) * R + r0;
        for (int64_t i = 0; i < rn; i++) {
            int32_t s = acc[i][PARTIAL * j];
            if (PARTIAL == 2) s += acc[i][PARTIAL * j + 1];
            out[i] = (float)(s - out_offset[r0 + i]) * out_scale[r0 + i] + bias[r0 + i];
        }
    }
#endif
}

/* y[T, R] = Linear of x[T, K] (both float32, row-major). Returns 0, or 1 if the scratch could not be allocated. */
int pofa_sparse_int8_linear(const float *x, int64_t T, int64_t K, float scale, float zero_point, float qmax,
                            const int64_t *row_ptr, const int32_t *group, const int32_t *word, int64_t R,
                            const float *out_scale, const int32_t *out_offset, const float *bias, float *y) {
    const int64_t G = (K + 3) / 4, n_tb = (T + TB - 1) / TB, n_rb = (R + RB - 1) / RB;
    const int64_t n_chunks = (G + GROUPS_PER_CHUNK - 1) / GROUPS_PER_CHUNK;
    size_t bytes = (size_t)(n_tb * G * TB * 4);
    bytes = (bytes + 63) / 64 * 64; /* aligned_alloc wants a multiple of the alignment */
    uint8_t *xq = aligned_alloc(64, bytes ? bytes : 64);
    if (!xq) return 1;
#pragma omp parallel
    {
#pragma omp for collapse(2) schedule(static)
        for (int64_t tb = 0; tb < n_tb; tb++)
            for (int64_t c = 0; c < n_chunks; c++) {
                const int64_t g0 = c * GROUPS_PER_CHUNK;
                const int64_t g1 = g0 + GROUPS_PER_CHUNK < G ? g0 + GROUPS_PER_CHUNK : G;
                quantize_chunk(x, T, K, scale, zero_point, qmax, xq, tb, g0, g1);
            }
        /* (implicit barrier) dynamic: a thread preempted by another process does not hold the others up */
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t tb = 0; tb < n_tb; tb++)
            for (int64_t rb = 0; rb < n_rb; rb++)
                row_block(xq, G, T, R, row_ptr, group, word, out_scale, out_offset, bias, y, rb, tb);
    }
    free(xq);
    return 0;
}
