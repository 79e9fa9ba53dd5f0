/* moe-local's CPU kernel for group-wise quantized weights: y = x @ W_hat^T.
 *
 * Reads the codes in moe-local's own packing (moe_local/quant/pack.py), so the stored codes are the
 * one copy in RAM: nothing is converted at load. W_hat = (q - zero) * scale per group of `group`
 * weights along I, scale and zero fp16 [O, G].
 *
 * The activations are quantized per chunk to int8 (as llama.cpp's Q8_0 does) and the codes are
 * multiplied with them as integers (AVX2 maddubs: 32 multiply-adds per instruction), one float
 * multiply-add per chunk:
 *
 *     sum_j (q_j - z) s x_j  =  s * (dx * sum_j q_j xq_j  -  z * sum_j x_j)
 *
 * where dx is the chunk's activation scale and sum_j x_j the group's sum of the rounded activations.
 *
 * A chunk is 32 bytes of codes: 64 4-bit codes (byte k = c[2k] | c[2k+1] << 4), 128 2-bit codes
 * (byte k = c[4k] | c[4k+1] << 2 | ...), or 32 8-bit codes. Its codes split into P = 8 / bits
 * "planes" of 32 values (plane p holds codes P*k + p), and the activations are laid out the same way
 * once per call, so no code is ever moved. 8-bit codes run signed (q - 128) with the sign trick,
 * since maddubs multiplies an unsigned byte by a signed one and 255 * 127 * 2 would saturate.
 *
 * Shapes: x [M, I] float32, y [M, O] float32, codes [O, I * bits / 8] uint8, scales/zeros [O, G]. Rows
 * may lie apart: row o's codes start at codes + o * code_stride (bytes), its scales and zeros at
 * o * scale_stride (values), so a weight whose rows hold their codes, scales and zeros side by side
 * (moe_local/quant/interleave.py: one stream through memory instead of three) runs unchanged; a
 * stride of 0 means packed rows (I * bits / 8 bytes, G values).
 * Built at first use by moe_local/quant/native.py with the machine's C compiler (-mavx2 -mfma -mf16c).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CHUNK_BYTES 32

int moe_local_qlinear_abi(void) { return 12; }

/* Quantize one token's activations: per chunk of 32 * P values, int8 codes in plane order and a scale,
 * and per group the sum of the rounded activations (a group is whole chunks, or 1/2, 1/4, 1/8 of one). */
static void quantize_x(const float *x, int I, int bits, int group, int8_t *xq, float *dx, float *sumx) {
    const int planes = 8 / bits;
    const int per_chunk = CHUNK_BYTES * planes;
    const int chunks = I / per_chunk;
    const int chunks_per_group = group >= per_chunk ? group / per_chunk : 1;
    const int groups_per_chunk = group >= per_chunk ? 1 : per_chunk / group;
    for (int c = 0; c < chunks; c++) {
        const float *xc = x + (size_t)c * per_chunk;
        float amax = 0.0f;
        for (int j = 0; j < per_chunk; j++) amax = fmaxf(amax, fabsf(xc[j]));
        const float d = amax / 127.0f;
        const float inv = d > 0.0f ? 1.0f / d : 0.0f;
        dx[c] = d;
        int8_t *out = xq + (size_t)c * per_chunk;
        int total[8] = {0, 0, 0, 0, 0, 0, 0, 0}; /* per group inside the chunk (code k*P+p is in group
                                                    (k*P+p) / group, i.e. byte k / (CHUNK_BYTES / gpc)) */
        const int bytes_per_group = CHUNK_BYTES / groups_per_chunk;
        for (int k = 0; k < CHUNK_BYTES; k++)
            for (int p = 0; p < planes; p++) {
                const int q = (int)lrintf(xc[planes * k + p] * inv);
                out[p * CHUNK_BYTES + k] = (int8_t)q;
                total[k / bytes_per_group] += q;
            }
        /* the zero term uses the same rounded activations as the dot, so the two stay consistent:
           sum_j (q_j - z) xq_j, not sum_j q_j xq_j - z sum_j x_j (z near 128 would amplify the rounding) */
        if (groups_per_chunk == 1) {
            const int g = c / chunks_per_group;
            if (c % chunks_per_group == 0) sumx[g] = 0.0f;
            sumx[g] += d * (float)total[0];
        } else {
            for (int i = 0; i < groups_per_chunk; i++) sumx[c * groups_per_chunk + i] = d * (float)total[i];
        }
    }
}

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* The P planes of one 32-byte chunk of codes, as unsigned bytes (8 bits: signed q - 128). */
static inline __attribute__((always_inline)) void chunk_planes(const uint8_t *w, const int bits, __m256i *planes) {
    const __m256i bytes = _mm256_loadu_si256((const __m256i *)w);
    if (bits == 4) {
        const __m256i mask = _mm256_set1_epi8(0x0F);
        planes[0] = _mm256_and_si256(bytes, mask);
        planes[1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
    } else if (bits == 2) {
        const __m256i mask = _mm256_set1_epi8(0x03);
        planes[0] = _mm256_and_si256(bytes, mask);
        planes[1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 2), mask);
        planes[2] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
        planes[3] = _mm256_and_si256(_mm256_srli_epi16(bytes, 6), mask);
    } else {
        planes[0] = _mm256_xor_si256(bytes, _mm256_set1_epi8((char)0x80));
    }
}

/* Integer dot of one chunk's planes with one token's activations: 8 int32 partial sums. */
static inline __attribute__((always_inline)) __m256i chunk_dot(const __m256i *planes, const int8_t *xq,
                                                                const int bits) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc16;
    if (bits == 8) { /* signed codes q - 128, |q - 128| <= 128 and |xq| <= 127: pairs <= 32512 */
        const __m256i xs = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xq), planes[0]);
        acc16 = _mm256_maddubs_epi16(_mm256_abs_epi8(planes[0]), xs);
    } else { /* 4 bits: 2 planes, pairs <= 2 * 15 * 127; 2 bits: 4 planes, pairs <= 2 * 3 * 127 */
        acc16 = _mm256_maddubs_epi16(planes[0], _mm256_loadu_si256((const __m256i *)xq));
        for (int p = 1; p < 8 / bits; p++)
            acc16 = _mm256_add_epi16(
                acc16, _mm256_maddubs_epi16(planes[p], _mm256_loadu_si256((const __m256i *)(xq + 32 * p))));
    }
    return _mm256_madd_epi16(acc16, ones);
}

/* One output row for NT tokens (1 to 4; each chunk's codes are unpacked once for all of them).
 * `bits` and `NT` are constants in each caller, so the branches and loops fold away. */
static inline __attribute__((always_inline)) void row_dot(const uint8_t *codes, const uint16_t *scales,
                                                          const uint16_t *zeros, int I, const int bits, int group,
                                                          const int8_t *xq, const float *dx, const float *sumx,
                                                          const int NT, float *y, int y_stride) {
    const int per_chunk = CHUNK_BYTES * (8 / bits);
    const int chunks_per_group = group >= per_chunk ? group / per_chunk : 1;
    const int groups = I / group, chunks = I / per_chunk;
    /* 8-bit codes ran as q - 128: sum (q - z) x = sum (q - 128) x - (z - 128) sum x */
    const float shift = bits == 8 ? 128.0f : 0.0f;
    float zterm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    {
        __m256 zacc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int g = 0;
        for (; g + 8 <= groups; g += 8) { /* the zero term, 8 groups at a time */
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + g)));
            const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(zeros + g)));
            const __m256 sz = _mm256_mul_ps(s, _mm256_sub_ps(z, _mm256_set1_ps(shift)));
            for (int t = 0; t < NT; t++)
                zacc[t] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(sumx + (size_t)t * groups + g), zacc[t]);
        }
        for (int t = 0; t < NT; t++) zterm[t] = hsum(zacc[t]);
        for (; g < groups; g++) {
            const float sz = _cvtsh_ss(scales[g]) * (_cvtsh_ss(zeros[g]) - shift);
            for (int t = 0; t < NT; t++) zterm[t] += sz * sumx[(size_t)t * groups + g];
        }
    }
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (group < per_chunk) {
        /* several groups per chunk: the chunk's 8 int32 partial sums follow its bytes in order (byte k
           lands in lane k / 4), so group i of the chunk owns lanes 8i/gpc .. 8(i+1)/gpc - 1 and one
           vector of per-lane scales does it: gpc = 2 (int4 g32, int8 g16), 4 (int4 g16), 8 (2-bit g16) */
        const int gpc = per_chunk / group;
        const __m256i lane_group = gpc == 2   ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                   : gpc == 4 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                                              : _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (int c = 0; c < chunks; c++) {
            const uint16_t *sc = scales + (size_t)c * gpc;
            __m128i halves;
            if (gpc == 8) halves = _mm_loadu_si128((const __m128i *)sc);
            else if (gpc == 4) halves = _mm_loadl_epi64((const __m128i *)sc);
            else halves = _mm_cvtsi32_si128((int)((uint32_t)sc[0] | ((uint32_t)sc[1] << 16)));
            const __m256 sv = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(halves), lane_group);
            __m256i planes[4];
            chunk_planes(codes + (size_t)c * CHUNK_BYTES, bits, planes);
            for (int t = 0; t < NT; t++) {
                const __m256i dot = chunk_dot(planes, xq + (size_t)t * I + (size_t)c * per_chunk, bits);
                const __m256 sd = _mm256_mul_ps(sv, _mm256_set1_ps(dx[(size_t)t * chunks + c]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sd, acc[t]);
            }
        }
    } else if (group == per_chunk) {
        /* each token's scale times its chunk's weight scale, 8 at a time first (a group is one chunk:
           the recipes' int4 g64): the chunk loop is then the codes' work and one broadcast load. It was
           instruction-bound, about 30 a chunk, a third of them these scalar steps. */
        float sd[NT * chunks]; /* [NT, chunks] */
        for (int t = 0; t < NT; t++) {
            int c = 0;
            for (; c + 8 <= chunks; c += 8)
                _mm256_storeu_ps(sd + t * chunks + c,
                                 _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + c))),
                                               _mm256_loadu_ps(dx + (size_t)t * chunks + c)));
            for (; c < chunks; c++) sd[t * chunks + c] = _cvtsh_ss(scales[c]) * dx[(size_t)t * chunks + c];
        }
        /* one token: even and odd chunks into two sums, so the loop does not wait on one FMA chain
           (int4 g64 from the cache, one core: 13.5 -> 17 GB/s with both changes) */
        __m256 odd = _mm256_setzero_ps();
        int c = 0;
        if (NT == 1)
            for (; c + 2 <= chunks; c += 2) {
                __m256i planes[4], planes2[4];
                chunk_planes(codes + (size_t)c * CHUNK_BYTES, bits, planes);
                chunk_planes(codes + (size_t)(c + 1) * CHUNK_BYTES, bits, planes2);
                const __m256i dot = chunk_dot(planes, xq + (size_t)c * per_chunk, bits);
                const __m256i dot2 = chunk_dot(planes2, xq + (size_t)(c + 1) * per_chunk, bits);
                acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(sd + c), acc[0]);
                odd = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2), _mm256_broadcast_ss(sd + c + 1), odd);
            }
        for (; c < chunks; c++) {
            __m256i planes[4];
            chunk_planes(codes + (size_t)c * CHUNK_BYTES, bits, planes);
            for (int t = 0; t < NT; t++) {
                const __m256i dot = chunk_dot(planes, xq + (size_t)t * I + (size_t)c * per_chunk, bits);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_broadcast_ss(sd + t * chunks + c), acc[t]);
            }
        }
        acc[0] = _mm256_add_ps(acc[0], odd);
    } else {
        int c = 0;
        for (int g = 0; g < groups; g++) {
            const float s = _cvtsh_ss(scales[g]);
            for (int k = 0; k < chunks_per_group; k++, c++) {
                __m256i planes[4];
                chunk_planes(codes + (size_t)c * CHUNK_BYTES, bits, planes);
                for (int t = 0; t < NT; t++) {
                    const __m256i dot = chunk_dot(planes, xq + (size_t)t * I + (size_t)c * per_chunk, bits);
                    acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                                             _mm256_set1_ps(s * dx[(size_t)t * chunks + c]), acc[t]);
                }
            }
        }
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * y_stride] = hsum(acc[t]) - zterm[t];
}

/* All rows, tokens 4 at a time, for one code width and group size (a constant where the caller passes
 * one: the group loops of row_dot then fold away, which measured a third faster on one core). */
#define ROWS_NT(BITS, GROUP, NT)                                                                              \
    row_dot(w, s, z, I, BITS, GROUP, xq + (size_t)m * I, dx + (size_t)m * chunks, sumx + (size_t)m * groups,  \
            NT, y + (size_t)m * O + o, O)
#define ROW_BODY(BITS, GROUP)                                                                                 \
    {                                                                                                         \
        const uint8_t *w = codes + (size_t)o * code_stride;                                                   \
        const uint16_t *s = scales + (size_t)o * scale_stride, *z = zeros + (size_t)o * scale_stride;         \
        int m = 0;                                                                                            \
        for (; m + 4 <= M; m += 4) ROWS_NT(BITS, GROUP, 4);                                                   \
        switch (M - m) {                                                                                      \
            case 3: ROWS_NT(BITS, GROUP, 3); break;                                                           \
            case 2: ROWS_NT(BITS, GROUP, 2); break;                                                           \
            case 1: ROWS_NT(BITS, GROUP, 1); break;                                                           \
        }                                                                                                     \
    }
/* One thread runs a plain loop: inside an OpenMP region, even one of one thread, the outlined body
 * read the shared sizes through memory and ran a third slower (8 against 12.8 GB/s on one core). */
#define ROWS(BITS, GROUP)                                                                                     \
    if (threads > 1) {                                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                     \
        for (int o = 0; o < O; o++) ROW_BODY(BITS, GROUP)                                                     \
    } else {                                                                                                  \
        for (int o = 0; o < O; o++) ROW_BODY(BITS, GROUP)                                                     \
    }

/* y[M, O] = x[M, I] @ W_hat^T. Returns 0, or -1 when a temporary buffer cannot be allocated. */
int moe_local_qlinear(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int O, int I,
                      int bits, int group, int code_stride, int scale_stride, const float *x, int M, float *y,
                      int threads) {
    const int planes = 8 / bits;
    const int chunks = I / (CHUNK_BYTES * planes);
    const int groups = I / group;
    if (code_stride <= 0) code_stride = I * bits / 8;
    if (scale_stride <= 0) scale_stride = groups;
    int8_t *xq = malloc((size_t)M * I);
    float *dx = malloc(sizeof(float) * (size_t)M * chunks);
    float *sumx = malloc(sizeof(float) * (size_t)M * groups);
    if (!xq || !dx || !sumx) {
        free(xq), free(dx), free(sumx);
        return -1;
    }
    for (int m = 0; m < M; m++)
        quantize_x(x + (size_t)m * I, I, bits, group, xq + (size_t)m * I, dx + (size_t)m * chunks,
                   sumx + (size_t)m * groups);
    /* the schemes moe-local's recipes use get their own constant-folded loops; others the general one */
    if (bits == 4 && group == 64) {
        ROWS(4, 64)
    } else if (bits == 4 && group == 32) {
        ROWS(4, 32)
    } else if (bits == 4 && group == 128) {
        ROWS(4, 128)
    } else if (bits == 4) {
        ROWS(4, group)
    } else if (bits == 8 && group == 128) {
        ROWS(8, 128)
    } else if (bits == 8 && group == 64) {
        ROWS(8, 64)
    } else if (bits == 8) {
        ROWS(8, group)
    } else if (bits == 2 && group == 64) {
        ROWS(2, 64)
    } else {
        ROWS(2, group)
    }
    free(xq), free(dx), free(sumx);
    return 0;
}

/* Ternary rows (five base-3 codes a byte, lowest first: moe_local/quant/pack.py) into the 2-bit packing,
 * rows of n codes (n a multiple of 4): src [rows, m] with m = ceil(n / 5), dst [rows, n / 4]. Each
 * byte's five codes are looked up as ten bits and shifted into a bit buffer that is emptied a byte at
 * a time. Returns 0, or -1 where a byte above 242 (not five ternary codes) is met. */
int moe_local_ternary_to_2bit(const uint8_t *src, int64_t rows, int m, int n, uint8_t *dst) {
    static uint16_t table[243];
    static int ready = 0;
    if (!ready) { /* idempotent: concurrent first calls write the same values */
        for (int b = 0; b < 243; b++) {
            int v = b, bits = 0;
            for (int k = 0; k < 5; k++, v /= 3) bits |= (v % 3) << (2 * k);
            table[b] = (uint16_t)bits;
        }
        ready = 1;
    }
    const int out_bytes = n / 4;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *s = src + r * (int64_t)m;
        uint8_t *d = dst + r * (int64_t)out_bytes;
        uint64_t acc = 0;
        int held = 0, written = 0;
        for (int j = 0; j < m && written < out_bytes; j++) {
            if (s[j] > 242) return -1;
            acc |= (uint64_t)table[s[j]] << held;
            held += 10;
            while (held >= 8 && written < out_bytes) {
                d[written++] = (uint8_t)acc;
                acc >>= 8;
                held -= 8;
            }
        }
    }
    return 0;
}

/* W_hat rows [start, end) as float32 [end - start, I]: the prefill path's dequantization (many tokens
 * then run as one float32 matmul, which on AVX2 is several times faster than bf16's). */
void moe_local_dequantize(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int I, int bits,
                          int group, int code_stride, int scale_stride, int start, int end, float *out,
                          int threads) {
    const int groups = I / group;
    const size_t row_bytes = code_stride > 0 ? (size_t)code_stride : (size_t)I * bits / 8;
    const size_t scale_row = scale_stride > 0 ? (size_t)scale_stride : (size_t)groups;
    const int per_byte = 8 / bits, mask = (1 << bits) - 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int r = start; r < end; r++) {
        const uint8_t *w = codes + (size_t)r * row_bytes;
        float *o = out + (size_t)(r - start) * I;
        for (int g = 0; g < groups; g++) {
            /* (q - z) * s in float32, rounded as torch's reference path rounds it: bit-identical */
            const float s = _cvtsh_ss(scales[(size_t)r * scale_row + g]);
            const float z = _cvtsh_ss(zeros[(size_t)r * scale_row + g]);
            const uint8_t *wg = w + (size_t)g * group / per_byte;
            float *og = o + (size_t)g * group;
            if (bits == 8) {
                for (int j = 0; j < group; j++) og[j] = ((float)wg[j] - z) * s;
            } else if (bits == 4) {
                for (int j = 0; j < group / 2; j++) {
                    og[2 * j] = ((float)(wg[j] & 15) - z) * s;
                    og[2 * j + 1] = ((float)(wg[j] >> 4) - z) * s;
                }
            } else {
                for (int j = 0; j < group / per_byte; j++)
                    for (int p = 0; p < per_byte; p++) og[per_byte * j + p] = ((float)((wg[j] >> (bits * p)) & mask) - z) * s;
            }
        }
    }
}

/* bf16 round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN). */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* n bf16 values as float32 (exact), and n float32 values rounded to bf16: the bf16 entry points' ends. */
static void widen_bf16(const uint16_t *x, float *xf, size_t n) {
    for (size_t k = 0; k < n; k++) {
        const uint32_t u = (uint32_t)x[k] << 16;
        memcpy(xf + k, &u, sizeof u);
    }
}

static void narrow_bf16(const float *yf, uint16_t *y, size_t n) {
    for (size_t k = 0; k < n; k++) y[k] = to_bf16(yf[k]);
}

/* moe_local_qlinear with bf16 activations in and out (what a bf16 model computes in): the two
 * conversions run here instead of as two more torch calls per weight and token. */
int moe_local_qlinear_bf16(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int O, int I,
                           int bits, int group, int code_stride, int scale_stride, const uint16_t *x, int M,
                           uint16_t *y, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)M * I);
    float *yf = malloc(sizeof(float) * (size_t)M * O);
    if (!xf || !yf) {
        free(xf), free(yf);
        return -1;
    }
    widen_bf16(x, xf, (size_t)M * I);
    const int rc = moe_local_qlinear(codes, scales, zeros, O, I, bits, group, code_stride, scale_stride, xf, M, yf,
                                     threads);
    if (rc == 0)
        narrow_bf16(yf, y, (size_t)M * O);
    free(xf), free(yf);
    return rc;
}

/* Eight bf16 values as float32 (exact: a bf16 is the top half of a float32). */
static inline __attribute__((always_inline)) __m256 load_bf16x8(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* One output row of a bf16 weight for NT tokens (1 to 4): float32 products and sums. One or two
 * tokens keep four sums each (32 weights a step): with two, a long row (the down projection's 3584)
 * waited on the FMA latency chain and read at 14.5 GB/s against 24 for short rows. */
static inline __attribute__((always_inline)) void bf16_row(const uint16_t *w, const float *x, int I, const int NT,
                                                           float *y, int y_stride) {
    enum { MAX_A = 4 };
    const int A = NT <= 2 ? 4 : 2; /* sums per token: at most 8 vectors of sums in the 16 registers */
    __m256 acc[4][MAX_A];
    for (int t = 0; t < NT; t++)
        for (int a = 0; a < A; a++) acc[t][a] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 * A <= I; k += 8 * A) {
        for (int a = 0; a < A; a++) {
            const __m256 wa = load_bf16x8(w + k + 8 * a);
            for (int t = 0; t < NT; t++)
                acc[t][a] = _mm256_fmadd_ps(wa, _mm256_loadu_ps(x + (size_t)t * I + k + 8 * a), acc[t][a]);
        }
    }
    for (; k + 8 <= I; k += 8) { /* a tail of 8-weight steps into the first sums */
        const __m256 w0 = load_bf16x8(w + k);
        for (int t = 0; t < NT; t++) acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + (size_t)t * I + k), acc[t][0]);
    }
    for (int t = 0; t < NT; t++) {
        __m256 total = acc[t][0];
        for (int a = 1; a < A; a++) total = _mm256_add_ps(total, acc[t][a]);
        float sum = hsum(total);
        for (int j = k; j < I; j++) {
            uint32_t u = (uint32_t)w[j] << 16;
            float wf;
            memcpy(&wf, &u, sizeof wf);
            sum += wf * x[(size_t)t * I + j];
        }
        y[(size_t)t * y_stride] = sum;
    }
}

#define BF16_ROW_BODY                                                                                     \
    {                                                                                                         \
        const uint16_t *wo = w + (size_t)o * I;                                                               \
        int m = 0;                                                                                            \
        for (; m + 4 <= M; m += 4) bf16_row(wo, xf + (size_t)m * I, I, 4, yf + (size_t)m * O + o, O);         \
        switch (M - m) {                                                                                      \
            case 3: bf16_row(wo, xf + (size_t)m * I, I, 3, yf + (size_t)m * O + o, O); break;                 \
            case 2: bf16_row(wo, xf + (size_t)m * I, I, 2, yf + (size_t)m * O + o, O); break;                 \
            case 1: bf16_row(wo, xf + (size_t)m * I, I, 1, yf + (size_t)m * O + o, O); break;                 \
        }                                                                                                     \
    }

/* y[M, O] = x[M, I] @ W^T for a bf16 weight W [O, I], bf16 activations in and out, float32 inside
 * (the decode path of a bf16 model: torch's bf16 matmul converts on the fly at about half the
 * memory bandwidth a matrix-vector product needs). Returns 0, or -1 when a buffer cannot be allocated. */
static void dense_f32(const uint16_t *w, int O, int I, const float *xf, int M, float *yf, int threads) {
    if (threads > 1) { /* one thread: a plain loop (see ROWS) */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int o = 0; o < O; o++) BF16_ROW_BODY
    } else {
        for (int o = 0; o < O; o++) BF16_ROW_BODY
    }
}

int moe_local_linear_bf16(const uint16_t *w, int O, int I, const uint16_t *x, int M, uint16_t *y, int threads) {
    float *xf = malloc(sizeof(float) * (size_t)M * I);
    float *yf = malloc(sizeof(float) * (size_t)M * O);
    if (!xf || !yf) {
        free(xf), free(yf);
        return -1;
    }
    widen_bf16(x, xf, (size_t)M * I);
    dense_f32(w, O, I, xf, M, yf, threads);
    narrow_bf16(yf, y, (size_t)M * O);
    free(xf), free(yf);
    return 0;
}

/* ---- MXFP4 (OCP microscaling FP4: GPT-OSS's experts) ------------------------------------------
 * A block is 32 e2m1 values in 16 bytes (byte k: value 2k in the low nibble, 2k + 1 in the high one)
 * with one e8m0 exponent e: value = e2m1 * 2^(e - 127). e2m1 doubled is an integer (0, 1, 2, 3, 4,
 * 6, 8, 12 and their negatives), so two blocks (32 bytes) run like a 4-bit chunk: nibbles looked up
 * into int8 values with one shuffle, multiplied with the int8 activations (maddubs, the sign trick),
 * each block's 4 int32 lanes scaled by 2^(e - 128) and the chunk's activation scale.
 * Shapes: blocks [O, I / 32, 16] uint8, scales [O, I / 32] uint8, I a multiple of 64. */

static float mx_scale[256];  /* 2^(e - 128): the e8m0 scale times the halving of the doubled values */

__attribute__((constructor)) static void mx_init(void) { /* once, when the library is loaded */
    for (int e = 0; e < 256; e++) mx_scale[e] = ldexpf(1.0f, e - 128);
}

static inline __attribute__((always_inline)) void mx_row(const uint8_t *blocks, const uint8_t *scales, int I,
                                                         const int8_t *xq, const float *dx, const int NT,
                                                         float *y, int y_stride) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12, 0, 1, 2, 3, 4,
                                         6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12);
    const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const int chunks = I / 64;
    for (int c = 0; c < chunks; c++) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)(blocks + (size_t)c * 32));
        const __m256i vlo = _mm256_shuffle_epi8(lut, _mm256_and_si256(bytes, mask));
        const __m256i vhi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask));
        const __m256i alo = _mm256_abs_epi8(vlo), ahi = _mm256_abs_epi8(vhi);
        const float s0 = mx_scale[scales[2 * c]], s1 = mx_scale[scales[2 * c + 1]];
        const __m256 sv = _mm256_setr_ps(s0, s0, s0, s0, s1, s1, s1, s1); /* lanes 0-3: block 2c */
        for (int t = 0; t < NT; t++) {
            const int8_t *xc = xq + (size_t)t * I + (size_t)c * 64;
            const __m256i xlo = _mm256_loadu_si256((const __m256i *)xc);
            const __m256i xhi = _mm256_loadu_si256((const __m256i *)(xc + 32));
            /* pairs <= 2 * 12 * 127, two planes <= 6096: no int16 saturation */
            const __m256i p16 = _mm256_add_epi16(_mm256_maddubs_epi16(alo, _mm256_sign_epi8(xlo, vlo)),
                                                 _mm256_maddubs_epi16(ahi, _mm256_sign_epi8(xhi, vhi)));
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            acc[t] = _mm256_fmadd_ps(dot, _mm256_mul_ps(sv, _mm256_set1_ps(dx[(size_t)t * chunks + c])), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) y[(size_t)t * y_stride] = hsum(acc[t]);
}

/* y[M, O] = x[M, I] @ W^T for MXFP4 W, bf16 in and out. Returns 0, or -1 when a buffer cannot be allocated. */
int moe_local_mxfp4_bf16(const uint8_t *blocks, const uint8_t *scales, int O, int I, const uint16_t *x, int M,
                         uint16_t *y, int threads) {
    const int chunks = I / 64;
    const size_t row_blocks = (size_t)I / 2, row_scales = (size_t)I / 32;
    float *xf = malloc(sizeof(float) * (size_t)M * I);
    float *yf = malloc(sizeof(float) * (size_t)M * O);
    int8_t *xq = malloc((size_t)M * I);
    float *dx = malloc(sizeof(float) * (size_t)M * chunks);
    float *sumx = malloc(sizeof(float) * (size_t)M * chunks);
    if (!xf || !yf || !xq || !dx || !sumx) {
        free(xf), free(yf), free(xq), free(dx), free(sumx);
        return -1;
    }
    widen_bf16(x, xf, (size_t)M * I);
    /* the 4-bit chunk layout: 64 values, even ones in the first 32 bytes, odd ones in the next */
    for (int m = 0; m < M; m++)
        quantize_x(xf + (size_t)m * I, I, 4, 64, xq + (size_t)m * I, dx + (size_t)m * chunks, sumx + (size_t)m * chunks);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int o = 0; o < O; o++) {
        const uint8_t *b = blocks + (size_t)o * row_blocks, *s = scales + (size_t)o * row_scales;
        int m = 0;
        for (; m + 4 <= M; m += 4) mx_row(b, s, I, xq + (size_t)m * I, dx + (size_t)m * chunks, 4, yf + (size_t)m * O + o, O);
        switch (M - m) {
            case 3: mx_row(b, s, I, xq + (size_t)m * I, dx + (size_t)m * chunks, 3, yf + (size_t)m * O + o, O); break;
            case 2: mx_row(b, s, I, xq + (size_t)m * I, dx + (size_t)m * chunks, 2, yf + (size_t)m * O + o, O); break;
            case 1: mx_row(b, s, I, xq + (size_t)m * I, dx + (size_t)m * chunks, 1, yf + (size_t)m * O + o, O); break;
        }
    }
    narrow_bf16(yf, y, (size_t)M * O);
    free(xf), free(yf), free(xq), free(dx), free(sumx);
    return 0;
}

/* ---- one gated expert in one call: down(silu(gate) * up) ---------------------------------------
 * The decode step's expert is two quantized matmuls and an activation between them; as separate
 * calls from Python, the glue (checks, three torch ops, two more calls) cost about as much as the
 * arithmetic for small experts. This computes the same values the separate calls compute: every
 * intermediate rounded to bf16 where those calls round it (gate_up out, silu out, the product), silu
 * as x / (1 + exp(-x)) in float32. gate_up [2I, H] holds the gate rows first, then the up rows.
 * A weight of `bits` 16 is a plain bf16 matrix (its codes pointer; scales and zeros unused), computed
 * as moe_local_linear_bf16 computes it: the experts of a bf16 model take the same single call. */

static inline float round_bf16(float v) {
    const uint32_t u = (uint32_t)to_bf16(v) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

int moe_local_expert_bf16(const uint8_t *gu_codes, const uint16_t *gu_scales, const uint16_t *gu_zeros,
                          int gu_bits, int gu_group, int gu_cs, int gu_ss, const uint8_t *d_codes,
                          const uint16_t *d_scales, const uint16_t *d_zeros, int d_bits, int d_group, int d_cs,
                          int d_ss, int H, int I, const uint16_t *x, int M, uint16_t *y, int threads_gu,
                          int threads_d) {
    float *xf = malloc(sizeof(float) * (size_t)M * H);
    float *gu = malloc(sizeof(float) * (size_t)M * 2 * I);
    float *h = malloc(sizeof(float) * (size_t)M * I);
    float *yf = malloc(sizeof(float) * (size_t)M * H);
    int rc = -1;
    if (!xf || !gu || !h || !yf) goto done;
    widen_bf16(x, xf, (size_t)M * H);
    if (gu_bits == 16)
        dense_f32((const uint16_t *)gu_codes, 2 * I, H, xf, M, gu, threads_gu);
    else if (moe_local_qlinear(gu_codes, gu_scales, gu_zeros, 2 * I, H, gu_bits, gu_group, gu_cs, gu_ss, xf, M, gu,
                               threads_gu))
        goto done;
    for (int m = 0; m < M; m++) {
        const float *g = gu + (size_t)m * 2 * I, *u = g + I;
        float *hm = h + (size_t)m * I;
        for (int j = 0; j < I; j++) {
            const float gv = round_bf16(g[j]);
            const float act = round_bf16(gv / (1.0f + expf(-gv)));
            hm[j] = round_bf16(act * round_bf16(u[j]));
        }
    }
    if (d_bits == 16)
        dense_f32((const uint16_t *)d_codes, H, I, h, M, yf, threads_d);
    else if (moe_local_qlinear(d_codes, d_scales, d_zeros, H, I, d_bits, d_group, d_cs, d_ss, h, M, yf, threads_d))
        goto done;
    narrow_bf16(yf, y, (size_t)M * H);
    rc = 0;
done:
    free(xf), free(gu), free(h), free(yf);
    return rc;
}

/* The routed experts of B rows (the newest tokens of B sequences) in one call. Expert e computes the
 * rows rows[first[e]] .. rows[first[e + 1] - 1] of x, all at once (its weights read once for them),
 * its outputs landing in pair slots first[e] .. first[e + 1] - 1. Row b then adds its K slots
 * mix[b * K + j] (-1: none), each times bf16(weights[b * K + j]), in that order from zero with a bf16
 * rounding after each product and addition: the roundings of OffloadedExperts' loop (a bf16 product,
 * then out += it). ptrs: n rows of 6 pointers (gate_up codes, scales, zeros; down codes, scales,
 * zeros); meta: n rows of 8 ints (gate_up bits, group, code stride, scale stride; the same of down).
 * x [B, H], out [B, H] bf16. */
int moe_local_experts_rows_bf16(int n, const int64_t *ptrs, const int32_t *meta, int H, int I, const uint16_t *x,
                                const int32_t *rows, const int32_t *first, int B, int K, const int32_t *mix,
                                const float *weights, uint16_t *out, int threads_gu, int threads_d) {
    const int pairs = first[n];
    uint16_t *xs = malloc(sizeof(uint16_t) * (size_t)pairs * H);
    uint16_t *ys = malloc(sizeof(uint16_t) * (size_t)pairs * H);
    if (!xs || !ys) {
        free(xs), free(ys);
        return -1;
    }
    for (int p = 0; p < pairs; p++) memcpy(xs + (size_t)p * H, x + (size_t)rows[p] * H, sizeof(uint16_t) * H);
    /* with several threads and experts, each thread computes whole experts (one thread each: the same
       values, since a row's sum never depends on the split) instead of splitting every matrix: half
       the thread start-ups and waits, and the activations between the matrices overlap */
    const int threads = threads_gu > threads_d ? threads_gu : threads_d;
    int failed = 0;
#define EXPERT_CALL(E, TG, TD)                                                                                    \
    moe_local_expert_bf16((const uint8_t *)ptrs[6 * (E)], (const uint16_t *)ptrs[6 * (E) + 1],                    \
                          (const uint16_t *)ptrs[6 * (E) + 2], meta[8 * (E)], meta[8 * (E) + 1], meta[8 * (E) + 2], \
                          meta[8 * (E) + 3], (const uint8_t *)ptrs[6 * (E) + 3], (const uint16_t *)ptrs[6 * (E) + 4], \
                          (const uint16_t *)ptrs[6 * (E) + 5], meta[8 * (E) + 4], meta[8 * (E) + 5],               \
                          meta[8 * (E) + 6], meta[8 * (E) + 7], H, I, xs + (size_t)first[E] * H,                  \
                          first[(E) + 1] - first[E], ys + (size_t)first[E] * H, TG, TD)
    if (threads > 1 && n > 1) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads < n ? threads : n) reduction(| : failed)
        for (int e = 0; e < n; e++) failed |= EXPERT_CALL(e, 1, 1) != 0;
    } else {
        for (int e = 0; e < n && !failed; e++) failed = EXPERT_CALL(e, threads_gu, threads_d) != 0;
    }
#undef EXPERT_CALL
    for (int b = 0; b < B && !failed; b++) {
        uint16_t *ob = out + (size_t)b * H;
        for (int h = 0; h < H; h++) ob[h] = 0;
        for (int j = 0; j < K; j++) {
            const int p = mix[b * K + j];
            if (p < 0) continue;
            const float w = round_bf16(weights[b * K + j]);
            const uint16_t *y = ys + (size_t)p * H;
            for (int h = 0; h < H; h++) {
                const uint32_t yu = (uint32_t)y[h] << 16, ou = (uint32_t)ob[h] << 16;
                float yf, of;
                memcpy(&yf, &yu, sizeof yf);
                memcpy(&of, &ou, sizeof of);
                ob[h] = to_bf16(of + round_bf16(yf * w));
            }
        }
    }
    free(xs), free(ys);
    return failed ? -1 : 0;
}
