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

int moe_local_lean_abi(void) { return 2; }

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

/* out[Hq * D] = softmax(q k^T * scale) v for one query, in float32 (what moe-local's float32 sdpa
 * computes for bf16 inputs), rounded to bf16 once. q [Hq, D]; k, v [Hkv, stride, D] of which the first
 * S positions are used; query head h reads KV head h / (Hq / Hkv) (grouped-query attention).
 * scores [S] is the caller's scratch. */
void moe_local_attend_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, int Hq, int Hkv, int D, int S,
                           int stride, float scale, float *scores, uint16_t *out) {
    const int group = Hq / Hkv;
    float qf[512], acc[512]; /* D <= 512 (checked by the caller) */
    for (int h = 0; h < Hq; h++) {
        const uint16_t *kh = k + (size_t)(h / group) * stride * D, *vh = v + (size_t)(h / group) * stride * D;
        for (int d = 0; d < D; d++) qf[d] = f32(q[(size_t)h * D + d]);
        float top = -INFINITY;
        for (int s = 0; s < S; s++) {
            scores[s] = dot_f32_bf16(qf, kh + (size_t)s * D, D) * scale;
            top = fmaxf(top, scores[s]);
        }
        float total = 0.0f;
        for (int s = 0; s < S; s++) {
            scores[s] = expf(scores[s] - top);
            total += scores[s];
        }
        for (int d = 0; d < D; d++) acc[d] = 0.0f;
        for (int s = 0; s < S; s++) axpy_bf16(acc, scores[s] / total, vh + (size_t)s * D, D);
        for (int d = 0; d < D; d++) out[(size_t)h * D + d] = bf16(acc[d]);
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
