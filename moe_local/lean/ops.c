/* The small steps of one decode token of a bf16 decoder layer, each in one call (moe_local/lean/ops.py).
 *
 * transformers computes each of these as 5-15 torch calls on tensors of a few thousand values, where
 * every call costs more in dispatch than in arithmetic: for a small MoE the glue between the
 * matrix-vector products was 40% of a decode step. Each function below rounds to bf16 wherever the
 * torch code it replaces rounds (a bf16 tensor between two ops), and sums in float32 where torch does;
 * only the order of the float32 sums may differ (bounded in tests/lean/test_ops.py).
 *
 * bf16 values travel as uint16_t; shapes are written beside each function (H hidden size, D head size,
 * S cached positions, E experts, K experts per token).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

int moe_local_lean_abi(void) { return 3; }

static inline float f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* round to nearest even, as torch's float -> bfloat16 conversion (NaN stays NaN) */
static inline uint16_t bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* sum_i a[i] * b[i] for float32 a and bf16 b, 8 lanes at a time (AVX2/FMA), the tail after */
static inline float dot_f32_bf16(const float *a, const uint16_t *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + i)));
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)), acc);
    }
    __m128 lo = _mm256_castps256_ps128(acc), hi = _mm256_extractf128_ps(acc, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    float sum = _mm_cvtss_f32(lo);
    for (; i < n; i++) sum += a[i] * f32(b[i]);
    return sum;
}

/* acc[i] += p * b[i] for bf16 b */
static inline void axpy_bf16(float *acc, float p, const uint16_t *b, int n) {
    const __m256 pv = _mm256_set1_ps(p);
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(b + i)));
        const __m256 bv = _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, bv, _mm256_loadu_ps(acc + i)));
    }
    for (; i < n; i++) acc[i] += p * f32(b[i]);
}

/* y[rows, H] = w * bf16(x * rsqrt(mean(x^2) + eps)) per row: transformers' RMSNorm of a bf16 input
 * (float32 inside, rounded to bf16, then the bf16 product with the weight); rows > 1 for a per-head
 * norm (Qwen3's q_norm and k_norm over [heads, D]). */
void moe_local_rmsnorm_bf16(const uint16_t *x, const uint16_t *w, int rows, int H, float eps, uint16_t *y) {
    for (int r = 0; r < rows; r++) {
        const uint16_t *xr = x + (size_t)r * H;
        uint16_t *yr = y + (size_t)r * H;
        float ss = 0.0f;
        for (int i = 0; i < H; i++) {
            const float v = f32(xr[i]);
            ss += v * v;
        }
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int i = 0; i < H; i++) yr[i] = bf16(f32(w[i]) * f32(bf16(f32(xr[i]) * inv)));
    }
}

/* In place, heads x [heads, D]: x * cos + rotate_half(x) * sin, each product and the sum rounded to bf16
 * as the bf16 torch expression rounds them; rotate_half(x) = (-x[D/2:], x[:D/2]). cos, sin [D]. */
void moe_local_rope_bf16(uint16_t *x, int heads, int D, const uint16_t *cos, const uint16_t *sin) {
    const int half = D / 2;
    for (int h = 0; h < heads; h++) {
        uint16_t *v = x + (size_t)h * D;
        for (int j = 0; j < half; j++) {
            const float a = f32(v[j]), b = f32(v[j + half]);
            const float lo = f32(bf16(a * f32(cos[j]))) + f32(bf16(-b * f32(sin[j])));
            const float hi = f32(bf16(b * f32(cos[j + half]))) + f32(bf16(a * f32(sin[j + half])));
            v[j] = bf16(lo);
            v[j + half] = bf16(hi);
        }
    }
}

/* e^x for 8 floats (Cephes' polynomial, as in avx_mathfun: within 2 ulp of expf over the softmax's
 * range x <= 0; below -87.3 the result is 0, where expf's is under 1e-38 and vanishes in the sum too). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

static inline __m256 widen8(const uint16_t *b) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)b)), 16));
}

/* Softmax in place over S positions of 4 heads at once: scores [S][4] (position-major, a head per lane),
 * each lane normalised on its own. */
static void softmax4_(float *scores, int S) {
    __m128 top4 = _mm_set1_ps(-INFINITY);
    for (int s = 0; s < S; s++) top4 = _mm_max_ps(top4, _mm_loadu_ps(scores + 4 * s));
    const __m256 top = _mm256_set_m128(top4, top4);
    __m256 sum8 = _mm256_setzero_ps();
    int s = 0;
    for (; s + 2 <= S; s += 2) { /* two positions of the 4 heads per vector */
        const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(scores + 4 * s), top));
        _mm256_storeu_ps(scores + 4 * s, e);
        sum8 = _mm256_add_ps(sum8, e);
    }
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
    if (s < S) {
        const __m128 e = _mm256_castps256_ps128(exp8(_mm256_sub_ps(_mm256_castps128_ps256(_mm_loadu_ps(scores + 4 * s)), top)));
        _mm_storeu_ps(scores + 4 * s, e);
        sum4 = _mm_add_ps(sum4, e);
    }
    const __m128 inv = _mm_div_ps(_mm_set1_ps(1.0f), sum4);
    for (s = 0; s < S; s++) _mm_storeu_ps(scores + 4 * s, _mm_mul_ps(_mm_loadu_ps(scores + 4 * s), inv));
}

/* NH query heads (1 to 4) of one key/value head: each cached key and value row is widened from bf16
 * once for all of them. q [NH, D] float32; k, v [S, D] rows of that head; scores [S][4] scratch (lanes
 * past NH unused); out [NH, D] bf16. `NH` is a constant in each caller, so the loops over heads unroll. */
static inline __attribute__((always_inline)) void attend_heads(const float *q, const uint16_t *k,
                                                                const uint16_t *v, int D, int S, float scale,
                                                                float *scores, uint16_t *out, const int NH) {
    const int D8 = D & ~7;
    const __m128 scale4 = _mm_set1_ps(scale);
    for (int s = 0; s < S; s++) {
        const uint16_t *ks = k + (size_t)s * D;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int d = 0; d < D8; d += 8) {
            const __m256 kv = widen8(ks + d);
            for (int j = 0; j < NH; j++) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)j * D + d), kv, acc[j]);
        }
        /* the 4 heads' horizontal sums in one vector: lane j holds head j's dot */
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
        __m128 dots = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
        if (D8 < D) { /* a head size not a multiple of 8: the tail one value at a time */
            float tail[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int j = 0; j < NH; j++)
                for (int d = D8; d < D; d++) tail[j] += q[(size_t)j * D + d] * f32(ks[d]);
            dots = _mm_add_ps(dots, _mm_loadu_ps(tail));
        }
        _mm_storeu_ps(scores + 4 * (size_t)s, _mm_mul_ps(dots, scale4));
    }
    softmax4_(scores, S);
    /* out = p v, 32 output values at a time held in registers across all positions (4 x NH vectors) */
    int d = 0;
    for (; d + 32 <= D; d += 32) {
        __m256 acc[4][4];
        for (int j = 0; j < NH; j++)
            for (int u = 0; u < 4; u++) acc[j][u] = _mm256_setzero_ps();
        for (int s = 0; s < S; s++) {
            const uint16_t *vs = v + (size_t)s * D + d;
            const __m256 v0 = widen8(vs), v1 = widen8(vs + 8), v2 = widen8(vs + 16), v3 = widen8(vs + 24);
            for (int j = 0; j < NH; j++) {
                const __m256 p = _mm256_broadcast_ss(scores + 4 * (size_t)s + j);
                acc[j][0] = _mm256_fmadd_ps(p, v0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(p, v1, acc[j][1]);
                acc[j][2] = _mm256_fmadd_ps(p, v2, acc[j][2]);
                acc[j][3] = _mm256_fmadd_ps(p, v3, acc[j][3]);
            }
        }
        for (int j = 0; j < NH; j++) {
            float lanes[32];
            for (int u = 0; u < 4; u++) _mm256_storeu_ps(lanes + 8 * u, acc[j][u]);
            for (int i = 0; i < 32; i++) out[(size_t)j * D + d + i] = bf16(lanes[i]);
        }
    }
    for (; d < D; d++) /* a head size not a multiple of 32: the rest one value at a time */
        for (int j = 0; j < NH; j++) {
            float sum = 0.0f;
            for (int s = 0; s < S; s++) sum += scores[4 * (size_t)s + j] * f32(v[(size_t)s * D + d]);
            out[(size_t)j * D + d] = bf16(sum);
        }
}

/* out[Hq * D] = softmax(q k^T * scale) v for one query, in float32 (what moe-local's float32 sdpa
 * computes for bf16 inputs), rounded to bf16 once. q [Hq, D]; k, v [Hkv, stride, D] of which the first
 * S positions are used; query head h reads KV head h / (Hq / Hkv) (grouped-query attention). The heads
 * sharing a KV head run together, up to 4 at a time, and such groups split across `threads` threads.
 * scores [Hkv * ceil(Hq / Hkv / 4) * 4 * S] is the caller's scratch (ops.scores_size). */
void moe_local_attend_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int Hq, int Hkv, int D, int S,
                           int stride, float scale, float *scores, uint16_t *out, int threads) {
    const int group = Hq / Hkv, per_kv = (group + 3) / 4, items = Hkv * per_kv;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && items > 1)
    for (int it = 0; it < items; it++) {
        const int kvh = it / per_kv, first = kvh * group + (it % per_kv) * 4;
        const int nh = group - (it % per_kv) * 4 < 4 ? group - (it % per_kv) * 4 : 4;
        float qf[4 * 512]; /* D <= 512 (checked by the caller) */
        for (int i = 0; i < nh * D; i++) qf[i] = f32(q[(size_t)first * D + i]);
        const uint16_t *kh = k + (size_t)kvh * stride * D, *vh = v + (size_t)kvh * stride * D;
        float *sc = scores + (size_t)it * 4 * S;
        uint16_t *o = out + (size_t)first * D;
        switch (nh) {
            case 4: attend_heads(qf, kh, vh, D, S, scale, sc, o, 4); break;
            case 3: attend_heads(qf, kh, vh, D, S, scale, sc, o, 3); break;
            case 2: attend_heads(qf, kh, vh, D, S, scale, sc, o, 2); break;
            default: attend_heads(qf, kh, vh, D, S, scale, sc, o, 1); break;
        }
    }
}

/* A top-k softmax router on one token: logits[E] = bf16(h . w_e) (a bf16 linear: float32 sums rounded
 * once), probabilities softmax(logits) in float32, the K largest (ties: the lower expert first) and,
 * when renormalize, their probabilities divided by their sum. h [H], w [E, H]; ids [K], weights [K]. */
void moe_local_route_bf16(const uint16_t *h, const uint16_t *w, int E, int H, int K, int renormalize,
                          float *logits, int32_t *ids, float *weights) {
    float top = -INFINITY;
    float hf[16384]; /* H <= 16384 (checked by the caller) */
    for (int i = 0; i < H; i++) hf[i] = f32(h[i]);
    for (int e = 0; e < E; e++) {
        logits[e] = f32(bf16(dot_f32_bf16(hf, w + (size_t)e * H, H)));
        top = fmaxf(top, logits[e]);
    }
    float total = 0.0f;
    for (int e = 0; e < E; e++) {
        logits[e] = expf(logits[e] - top);
        total += logits[e];
    }
    for (int e = 0; e < E; e++) logits[e] /= total;
    float chosen = 0.0f;
    for (int j = 0; j < K; j++) {
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[j] = best;
        weights[j] = logits[best];
        chosen += logits[best];
    }
    if (renormalize)
        for (int j = 0; j < K; j++) weights[j] /= chosen;
}
