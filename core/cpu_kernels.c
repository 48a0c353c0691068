/* The CPU's decode kernels (loaded by core/cpu_kernels.py): where a step has few rows, each torch op
 * costs more in dispatch than in arithmetic, and the weights' bytes are the step's real cost.
 *
 *   gemv_*            y = x W^T for 1-2 rows: the bandwidth-bound path of core/linear.py
 *   rms_norm_f32      RMSNorm of a few rows
 *   rope_store_f32    rotate q and k of each row in place, store k and v into the paged cache
 *   decode_attention_f32  one query row per sequence over its cached keys (online softmax)
 *   gate_top_k_f32    Mixtral gating: softmax over experts, top k, renormalised
 *   silu_mul_f32      SwiGLU's silu(gate) * up
 *   combine_f32       each token's gate-weighted sum of its expert outputs
 *
 * Built with -O3 -march=native -fopenmp; OpenMP is torch's own libgomp (already loaded), so there is
 * one thread pool. Row-major, fp32 unless named; shapes in each function's comment.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 2 /* gemv: from 4 rows up oneDNN's prepacked GEMM is as fast or faster (bench/linear.py) */

int gemv_max_rows(void) { return MAX_ROWS; }

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* x (m, k), W (n, k), y (m, n), m <= 2. Each weight row is read once for both rows of x; outputs
 * split in contiguous ranges over the threads (one pass over W, in order, for the prefetcher). With
 * one row the second accumulator re-reads row 0 (from L1). */
#define GEMV_BODY(LOAD)                                                                     \
    const float *x0 = x, *x1 = m > 1 ? x + k : x;                                           \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                       \
    for (int64_t o = 0; o < n; o++) {                                                       \
        float s0 = 0.f, s1 = 0.f;                                                           \
        _Pragma("omp simd reduction(+:s0,s1)")                                              \
        for (int64_t i = 0; i < k; i++) {                                                   \
            float wi = LOAD;                                                                \
            s0 += wi * x0[i];                                                               \
            s1 += wi * x1[i];                                                               \
        }                                                                                   \
        y[o] = s0;                                                                          \
        if (m > 1) y[n + o] = s1;                                                           \
    }

void gemv_f32(const float *restrict x, const float *restrict w, float *restrict y,
              int64_t m, int64_t n, int64_t k, int threads) {
    GEMV_BODY(w[o * k + i])
}

void gemv_bf16(const float *restrict x, const uint16_t *restrict w, float *restrict y,
               int64_t m, int64_t n, int64_t k, int threads) {
    GEMV_BODY(bf16_to_f32(w[o * k + i]))
}

/* x (m, d), w (d,) -> y (m, d) = w * x / sqrt(mean(x^2) + eps) */
void rms_norm_f32(const float *restrict x, const float *restrict w, float *restrict y,
                  int64_t m, int64_t d, float eps) {
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * d;
        float s = 0.f;
        #pragma omp simd reduction(+:s)
        for (int64_t i = 0; i < d; i++) s += xr[i] * xr[i];
        float scale = 1.f / sqrtf(s / (float)d + eps);
        #pragma omp simd
        for (int64_t i = 0; i < d; i++) y[r * d + i] = w[i] * (xr[i] * scale);
    }
}

/* qkv (m, (h + 2g) * dh): q heads, then k heads, then v heads. The first h + g heads are rotated
 * in place by their row's position (half-split layout: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin,
 * cos/sin tables (P, dh) with both halves equal); then k and v of row r go to cache slot slots[r]
 * of k_cache/v_cache (S, g, dh). */
void rope_store_f32(float *restrict qkv, const int64_t *restrict positions, const int64_t *restrict slots,
                    const float *restrict cos_table, const float *restrict sin_table,
                    float *restrict k_cache, float *restrict v_cache, int64_t m, int64_t h, int64_t g,
                    int64_t dh) {
    int64_t half = dh / 2, width = (h + 2 * g) * dh;
    for (int64_t r = 0; r < m; r++) {
        float *row = qkv + r * width;
        const float *c = cos_table + positions[r] * dh, *s = sin_table + positions[r] * dh;
        for (int64_t head = 0; head < h + g; head++) {
            float *x = row + head * dh;
            #pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] - x2 * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
        memcpy(k_cache + slots[r] * g * dh, row + h * dh, g * dh * sizeof(float));
        memcpy(v_cache + slots[r] * g * dh, row + (h + g) * dh, g * dh * sizeof(float));
    }
}

/* One query row per sequence b (row b of q, stride q_stride; h heads of dh) over the keys at
 * slots[b, 0 .. lens[b]) of the paged cache (S, g, dh), the last `window` of them when window > 0.
 * Query head j reads kv head j / (h / g). o (b, h * dh). One pass per (sequence, head) with a
 * running maximum (online softmax): no score buffer. */
void decode_attention_f32(const float *restrict q, int64_t q_stride, const float *restrict k_cache,
                          const float *restrict v_cache, const int64_t *restrict slots, int64_t cmax,
                          const int64_t *restrict lens, float *restrict o, int64_t b, int64_t h, int64_t g,
                          int64_t dh, int64_t window, int threads) {
    float scale = 1.f / sqrtf((float)dh);
    int64_t group = h / g;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t seq = 0; seq < b; seq++) {
        for (int64_t head = 0; head < h; head++) {
            const float *qh = q + seq * q_stride + head * dh;
            float acc[dh];
            memset(acc, 0, sizeof acc);
            float best = -INFINITY, total = 0.f;
            int64_t end = lens[seq], start = window > 0 && end > window ? end - window : 0;
            for (int64_t t = start; t < end; t++) {
                int64_t base = (slots[seq * cmax + t] * g + head / group) * dh;
                const float *kt = k_cache + base, *vt = v_cache + base;
                float score = 0.f;
                #pragma omp simd reduction(+:score)
                for (int64_t i = 0; i < dh; i++) score += qh[i] * kt[i];
                score *= scale;
                if (score > best) {  /* rescale what was summed under the old maximum */
                    float shrink = expf(best - score);
                    total *= shrink;
                    #pragma omp simd
                    for (int64_t i = 0; i < dh; i++) acc[i] *= shrink;
                    best = score;
                }
                float p = expf(score - best);
                total += p;
                #pragma omp simd
                for (int64_t i = 0; i < dh; i++) acc[i] += p * vt[i];
            }
            float *out = o + (seq * h + head) * dh;
            for (int64_t i = 0; i < dh; i++) out[i] = acc[i] / total;
        }
    }
}

/* logits (m, e) -> weights (m, k) and ids (m, k): softmax over the e experts, the k largest
 * (earlier expert first on a tie), divided by their sum. */
void gate_top_k_f32(const float *restrict logits, float *restrict weights, int64_t *restrict ids,
                    int64_t m, int64_t e, int64_t k) {
    for (int64_t r = 0; r < m; r++) {
        const float *l = logits + r * e;
        float best = -INFINITY, z = 0.f, p[e];
        for (int64_t i = 0; i < e; i++) best = l[i] > best ? l[i] : best;
        for (int64_t i = 0; i < e; i++) z += (p[i] = expf(l[i] - best));
        float kept = 0.f;
        for (int64_t j = 0; j < k; j++) {
            int64_t top = -1;
            for (int64_t i = 0; i < e; i++) {
                int taken = 0;
                for (int64_t u = 0; u < j; u++) taken |= ids[r * k + u] == i;
                if (!taken && (top < 0 || p[i] > p[top])) top = i;
            }
            ids[r * k + j] = top;
            weights[r * k + j] = p[top] / z;
            kept += p[top] / z;
        }
        for (int64_t j = 0; j < k; j++) weights[r * k + j] /= kept;
    }
}

/* gate_up (m, 2i): gate then up -> out (m, i) = silu(gate) * up */
void silu_mul_f32(const float *restrict gate_up, float *restrict out, int64_t m, int64_t i) {
    for (int64_t r = 0; r < m; r++) {
        const float *gate = gate_up + r * 2 * i, *up = gate + i;
        #pragma omp simd
        for (int64_t j = 0; j < i; j++) out[r * i + j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
    }
}

/* rows (n, d): expert outputs of the flattened (token, slot) pairs[i] -> out (t, d), zeroed first,
 * out[pairs[i] / k] += weights[pairs[i]] * rows[i] (weights (t, k) flattened) */
void combine_f32(const float *restrict rows, const int64_t *restrict pairs, const float *restrict weights,
                 float *restrict out, int64_t n, int64_t t, int64_t d, int64_t k) {
    memset(out, 0, (size_t)(t * d) * sizeof(float));
    for (int64_t i = 0; i < n; i++) {
        float w = weights[pairs[i]];
        float *dst = out + (pairs[i] / k) * d;
        #pragma omp simd
        for (int64_t j = 0; j < d; j++) dst[j] += w * rows[i * d + j];
    }
}
