/* y = x W^T for a few rows of x: the CPU's bandwidth-bound path for decode (core/gemv.py).
 *
 * At 1-2 rows a linear layer does 1-2 multiply-adds per weight it reads, so its speed is how fast
 * the weights stream from memory. Each output's weight row is read once, for all rows of x at once,
 * the outputs split into contiguous ranges over the threads (one pass over W, in order, which the
 * hardware prefetcher follows). Built by core/gemv.py with -O3 -march=native -fopenmp; the OpenMP
 * runtime is torch's own (the same libgomp, already loaded), so there is one thread pool.
 *
 * Shapes: x (m, k) fp32 row-major, W (n, k) row-major (fp32 or bf16 bits), y (m, n) fp32; m <= 2.
 * (With 4 rows oneDNN's prepacked GEMM is as fast or faster: bench/linear.py.)
 */
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 2

static inline float bf16_to_f32(uint16_t bits) {
    uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* One output o for both rows; with one row the second accumulator re-reads row 0 (from L1). */
#define DOT_ROWS(LOAD)                                                                      \
    float s0 = 0.f, s1 = 0.f;                                                               \
    _Pragma("omp simd reduction(+:s0,s1)")                                                  \
    for (int64_t i = 0; i < k; i++) {                                                       \
        float wi = LOAD;                                                                    \
        s0 += wi * x0[i]; s1 += wi * x1[i];                                                 \
    }                                                                                       \
    y[o] = s0;                                                                              \
    if (m > 1) y[n + o] = s1;

#define ROW_POINTERS const float *x0 = x, *x1 = m > 1 ? x + k : x;

int gemv_max_rows(void) { return MAX_ROWS; }

void gemv_f32(const float *restrict x, const float *restrict w, float *restrict y,
              int64_t m, int64_t n, int64_t k, int threads) {
    ROW_POINTERS
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const float *restrict wr = w + o * k;
        DOT_ROWS(wr[i])
    }
}

void gemv_bf16(const float *restrict x, const uint16_t *restrict w, float *restrict y,
               int64_t m, int64_t n, int64_t k, int threads) {
    ROW_POINTERS
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n; o++) {
        const uint16_t *restrict wr = w + o * k;
        DOT_ROWS(bf16_to_f32(wr[i]))
    }
}
