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
 * 3. Dequantization and bias fused on the way out: y = (acc - zero_point * rowsum(W_q)) * (scale * w_scale) + b,
 *    then optionally the activation that follows the Linear in the model (GELU, erf form) and a residual
 *    (y += residual[T, R], a transformer block's skip connection), so that neither costs an extra pass.
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
#define ACT_NONE 0
#define ACT_GELU 1

/* exp(v) for v <= 0 in float32 arithmetic only (Cephes' expf: range reduction by ln 2 in two parts, degree-6
 * polynomial, 2^n through the exponent bits), written so that the compiler vectorizes the loops that call it on
 * every instruction set (no floorf or fmaxf, which it does not vectorize without -ffast-math); relative error
 * ~1e-7. Below -87 the result is flushed towards 0 (no denormals). */
static inline float exp_nonpositive(float v) {
    v = v > -87.0f ? v : -87.0f;
    /* n = v / ln 2 rounded to an integer (the magic constant 1.5 * 2^23 rounds in the FPU's mode) */
    const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = v - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* GELU, erf form: x/2 (1 + erf(x / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7, the
 * approximation torch's own vectorized erf uses); branch-free, so loops over it vectorize. */
static inline float gelu_erf(float x) {
    const float z = x * 0.70710678118654752f, a = z < 0.0f ? -z : z;
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float erf_a = 1.0f - poly * exp_nonpositive(-a * a);
    return 0.5f * x * (1.0f + (z < 0.0f ? -erf_a : erf_a));
}

static void activate(float *y, int64_t n, int activation) {
    if (activation == ACT_GELU)
        for (int64_t i = 0; i < n; i++) y[i] = gelu_erf(y[i]);
}


int pofa_sparse_int8_abi(void) { return 3; }
const char *pofa_sparse_int8_isa(void) { return POFA_ISA; }
int pofa_sparse_int8_token_block(void) { return TB; }

/* Everything one Linear's call needs besides its input and output, built once per module by the Python side
 * (pofa/runtime/int8.py, ctypes mirror of this struct) so that a call converts three arguments, not fifteen. Rows
 * may be a slice of a larger packed matrix: row_ptr then points at its first row (its values index group/word
 * absolutely), and out_scale/out_offset/bias at the same row. */
typedef struct {
    const int64_t *row_ptr;
    const int32_t *group;
    const int32_t *word;
    const float *out_scale;
    const int32_t *out_offset;
    const float *bias;
    int64_t rows;
    int64_t in_features;
    float scale, zero_point, qmax;
    int32_t activation;
} pofa_linear_t;

/* Quantize features [4 * g0, 4 * g1) of token block tb into xq. Padded tokens and features get the zero point;
 * padded features meet zero weights and padded tokens are never written out, so any value would do. */
static void quantize_chunk(const float *x, int64_t T, int64_t K, float scale, float zero_point, float qmax,
                           uint8_t *xq, int64_t tb, int64_t g0, int64_t g1) {
    const int64_t G = (K + 3) / 4;
    uint8_t *block = xq + tb * G * TB * 4;
    const uint8_t zp = (uint8_t)zero_point;
    const int64_t k0 = g0 * 4, k1 = g1 * 4 < K ? g1 * 4 : K;
    const int64_t jn = T - tb * TB < TB ? T - tb * TB : TB; /* real tokens in this block */
    for (int64_t j = 0; j < jn; j++) {
        const float *row = x + (tb * TB + j) * K;
        int64_t k = k0;
#if POFA_PATH == 3
        /* 16 features (4 groups) per step: x / scale (float32 division, as the fake-quant), round half to even,
         * + zero point, clamp (max first: NaN becomes 0), then 4 bytes to each of the 4 groups' rows. */
        const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(zero_point), vq = _mm512_set1_ps(qmax);
        for (; k + 16 <= k1; k += 16) {
            __m512 v = _mm512_div_ps(_mm512_loadu_ps(row + k), vs);
            v = _mm512_add_ps(_mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), vz);
            v = _mm512_min_ps(_mm512_max_ps(v, _mm512_setzero_ps()), vq);
            const __m128i b = _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(v));
            uint8_t *dst = block + ((k / 4) * TB + j) * 4;
            *(int32_t *)(dst) = _mm_extract_epi32(b, 0);
            *(int32_t *)(dst + TB * 4) = _mm_extract_epi32(b, 1);
            *(int32_t *)(dst + 2 * TB * 4) = _mm_extract_epi32(b, 2);
            *(int32_t *)(dst + 3 * TB * 4) = _mm_extract_epi32(b, 3);
        }
#endif
        uint8_t q[4 * GROUPS_PER_CHUNK];
        memset(q, zp, sizeof q);
        for (int64_t i = 0; i < k1 - k; i++) { /* contiguous: vectorized by the compiler */
            float v = rintf(row[k + i] / scale) + zero_point;
            v = v > 0.0f ? v : 0.0f; /* also maps NaN to 0 */
            v = v < qmax ? v : qmax;
            q[i] = (uint8_t)(int32_t)v;
        }
        for (int64_t g = k / 4; g < g1; g++) memcpy(block + (g * TB + j) * 4, q + 4 * g - k, 4);
    }
    if (jn < TB)
        for (int64_t g = g0; g < g1; g++) memset(block + (g * TB + jn) * 4, zp, (size_t)(TB - jn) * 4);
}

#if POFA_PATH == 3
/* In-register transpose of a 16 x 16 int32 tile: r[i] lane j <-> r[j] lane i. */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 4; i++) {
            t[8 * h + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0x88);
            t[8 * h + 4 + i] = _mm512_shuffle_i32x4(r[8 * h + i], r[8 * h + 4 + i], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_i32x4(t[i], t[8 + i], 0xdd);
    }
}
#endif

/* One row's sums over its kept groups for the first nv vectors of a token block (nv is a constant at every call
 * site, so that the accumulators stay in registers): a block with fewer real tokens than TB (a short batch) skips
 * the vectors that hold only padding. */
#if POFA_PATH == 3
static inline __attribute__((always_inline)) void row_sums(const uint8_t *block, int64_t p0, int64_t p1,
                                                           const int32_t *group, const int32_t *word, int32_t *out,
                                                           const int nv) {
    __m512i a[TB / 16];
    for (int v = 0; v < nv; v++) a[v] = _mm512_setzero_si512();
    for (int64_t p = p0; p < p1; p++) {
        const __m512i w = _mm512_set1_epi32(word[p]);
        const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
        for (int v = 0; v < nv; v++)
            a[v] = _mm512_dpbusd_epi32(a[v], _mm512_loadu_si512((const void *)(xg + v * 64)), w);
    }
    for (int v = 0; v < nv; v++) _mm512_store_si512((void *)(out + v * 16), a[v]);
}
#elif POFA_PATH == 2
static inline __attribute__((always_inline)) void row_sums(const uint8_t *block, int64_t p0, int64_t p1,
                                                           const int32_t *group, const int32_t *word, int32_t *out,
                                                           const int nv) {
    __m256i a[TB / 4];
    for (int v = 0; v < nv; v++) a[v] = _mm256_setzero_si256();
    for (int64_t p = p0; p < p1; p++) {
        /* the 4 weights as int16, twice per 128-bit lane: (w0 w1)(w2 w3) pairs meet each token's 4 features */
        const __m256i w = _mm256_cvtepi8_epi16(_mm_set1_epi32(word[p]));
        const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
        for (int v = 0; v < nv; v++) {
            const __m256i xv = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(xg + v * 16)));
            a[v] = _mm256_add_epi32(a[v], _mm256_madd_epi16(xv, w));
        }
    }
    for (int v = 0; v < nv; v++) _mm256_store_si256((__m256i *)(out + v * 8), a[v]);
}
#endif

/* Rows [RB * rb, RB * rb + RB) x tokens of block tb. */
static void row_block(const uint8_t *xq, int64_t G, int64_t T, const pofa_linear_t *L, const float *residual,
                      float *y, int64_t rb, int64_t tb) {
    int32_t acc[RB][TB * PARTIAL] __attribute__((aligned(64)));
    const uint8_t *block = xq + tb * G * TB * 4;
    const int64_t R = L->rows, r0 = rb * RB, rn = R - r0 < RB ? R - r0 : RB;
    const int64_t t0 = tb * TB, tn = T - t0 < TB ? T - t0 : TB;
    const int64_t *row_ptr = L->row_ptr;
    const int32_t *group = L->group, *word = L->word;
    for (int64_t i = 0; i < rn; i++) {
        const int64_t p0 = row_ptr[r0 + i], p1 = row_ptr[r0 + i + 1];
#if POFA_PATH == 3
        switch ((tn + 15) / 16) { /* TB = 64: 1 to 4 vectors of 16 tokens */
        case 1: row_sums(block, p0, p1, group, word, acc[i], 1); break;
        case 2: row_sums(block, p0, p1, group, word, acc[i], 2); break;
        case 3: row_sums(block, p0, p1, group, word, acc[i], 3); break;
        default: row_sums(block, p0, p1, group, word, acc[i], TB / 16);
        }
#elif POFA_PATH == 2
        const int64_t vectors = (tn + 3) / 4; /* TB = 32: 8 vectors of 4 tokens; 2, 4 or all 8 of them */
        if (vectors <= 2) row_sums(block, p0, p1, group, word, acc[i], 2);
        else if (vectors <= 4) row_sums(block, p0, p1, group, word, acc[i], 4);
        else row_sums(block, p0, p1, group, word, acc[i], TB / 4);
#else
        for (int j = 0; j < tn; j++) acc[i][j] = 0;
        for (int64_t p = p0; p < p1; p++) {
            int8_t w[4];
            memcpy(w, &word[p], 4);
            const uint8_t *xg = block + (int64_t)group[p] * TB * 4;
            for (int j = 0; j < tn; j++)
                acc[i][j] += w[0] * xg[4 * j] + w[1] * xg[4 * j + 1] + w[2] * xg[4 * j + 2] + w[3] * xg[4 * j + 3];
        }
#endif
    }
#if POFA_PATH == 3
    /* acc holds a token per lane, y a row per float: each 16 x 16 tile is transposed in registers so that a token's
     * RB outputs are one vector (dequantized, biased, activated, written with one store); the rows past rn are
     * masked off (neither read nor written). */
    const __mmask16 m = (__mmask16)((1u << rn) - 1);
    const __m512i offset = _mm512_maskz_loadu_epi32(m, L->out_offset + r0);
    const __m512 scale = _mm512_maskz_loadu_ps(m, L->out_scale + r0), shift = _mm512_maskz_loadu_ps(m, L->bias + r0);
    for (int64_t c = 0; c * 16 < tn; c++) {
        __m512i tile[16];
        for (int i = 0; i < 16; i++)
            tile[i] = i < rn ? _mm512_load_si512((const void *)(acc[i] + c * 16)) : _mm512_setzero_si512();
        transpose16(tile);
        const int64_t jn = tn - c * 16 < 16 ? tn - c * 16 : 16;
        for (int64_t j = 0; j < jn; j++) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(tile[j], offset));
            float *out = y + (t0 + c * 16 + j) * R + r0;
            __m512 o = _mm512_fmadd_ps(v, scale, shift);
            if (L->activation != ACT_NONE) { /* the one GELU of this file, which the compiler vectorizes */
                float lane[16] __attribute__((aligned(64)));
                _mm512_store_ps(lane, o);
                activate(lane, 16, L->activation);
                o = _mm512_load_ps(lane);
            }
            if (residual) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, residual + (t0 + c * 16 + j) * R + r0));
            _mm512_mask_storeu_ps(out, m, o);
        }
    }
#else
    for (int64_t j = 0; j < tn; j++) {
        float *out = y + (t0 + j) * R + r0;
        for (int64_t i = 0; i < rn; i++) {
            int32_t s = acc[i][PARTIAL * j];
            if (PARTIAL == 2) s += acc[i][PARTIAL * j + 1];
            out[i] = (float)(s - L->out_offset[r0 + i]) * L->out_scale[r0 + i] + L->bias[r0 + i];
        }
        activate(out, rn, L->activation);
        if (residual)
            for (int64_t i = 0; i < rn; i++) out[i] += residual[(t0 + j) * R + r0 + i];
    }
#endif
}

/* y[T, L->rows] = the Linear L of x[T, L->in_features] (both float32, row-major), then its activation, then
 * + residual[T, L->rows] unless residual is NULL. Returns 0, or 1 if the scratch could not be allocated. */
int pofa_sparse_int8_linear(const float *x, int64_t T, const pofa_linear_t *L, const float *residual, float *y) {
    const int64_t K = L->in_features, R = L->rows;
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
                quantize_chunk(x, T, K, L->scale, L->zero_point, L->qmax, xq, tb, g0, g1);
            }
        /* (implicit barrier) dynamic: a thread preempted by another process does not hold the others up */
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t tb = 0; tb < n_tb; tb++)
            for (int64_t rb = 0; rb < n_rb; rb++)
                row_block(xq, G, T, L, residual, y, rb, tb);
    }
    free(xq);
    return 0;
}
