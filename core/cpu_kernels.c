/* The CPU's decode kernels (loaded by core/cpu_kernels.py): where a step has few rows, each torch op
 * costs more in dispatch than in arithmetic, and the weights' bytes are the step's real cost.
 *
 *   linear_*          y = x W^T over fp32, bf16, int8 or int4 weights, any row count: core/linear.py
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
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* ---- y = x W^T, one kernel for every row count, over the one layout the weights are held in ----
 *
 * The layouts ("blocked"): W (n, k) cut into panels of 16 outputs, each panel stored k-major, so that
 * the weights of one input column are adjacent, P = ceil(n / 16) panels, rows past n zero
 * (core/cpu_kernels.py builds them once, at load). The types:
 *   f32, bf16  Wb (P, k, 16): the weights;
 *   i8         Wb (P, ceil(k / 2), 16, 2) int8: for each pair of columns c, output j's two weights
 *              side by side (w[j, 2c], w[j, 2c + 1]; an odd k's last partner zero); a fp32 scale per
 *              output (P * 16,), applied once to each finished sum;
 *   i4         Wb (P, ceil(k / 2), 16) bytes: byte j of pair c holds output j's column 2c in its low
 *              nibble and column 2c + 1 in its high one, each as q + 8 (0..15 for q in -8..7); a bf16
 *              scale per output and group of GROUP columns, (P, ceil(k / GROUP), 16), applied to each
 *              group's sums.
 * x (m, k) fp32, y (m, P * 16) fp32.
 *
 * Float weights go through FMAs. For 8- and 4-bit ones, widening each weight to fp32 for an FMA costs
 * three or more vector instructions per 16 weights, more than two cores issue at the rate the bytes
 * arrive (int8 decode was compute-bound at ~42 GB/s, int4 at a third of its roofline). So each row of
 * x is written as two int16 digits, x ~= xs * (hi + lo / 65536) with xs = max |x| / 32767 (at most
 * max |x| / 2^32 off: finer than fp32 holds any value above 1/256 of the row's largest), and two
 * columns at a time go through one multiply-add of int16 pairs into int32 lanes per digit
 * (AVX512-VNNI's vpdpwssd, else vpmaddwd and vpaddd): 32 weights per two to four instructions, exact.
 * (One digit alone, 1/65534 of the row's largest value, is not enough: a row with an outlier puts
 * the others on a coarse grid, and the rounding then tips with fp32's last bit, so that the same
 * token decoded and prefilled gave logprobs 1e-2 apart.) int8's sums turn into fp32 every chunk of
 * KC columns, before they could overflow (KC * 127 * 32767 < 2^31); int4's every group, times the
 * group's scale (its nibbles are q + 8: the group's sum of x times 8 comes off first).
 *
 * Each micro-kernel keeps R rows x B panels of sums in vector registers; each step over k loads B
 * panels' weights once for all R rows and broadcasts one x value (float) or pair (integer) per row
 * (no horizontal sums, no tails: k needs no particular multiple). Outputs split over the threads by
 * whole panels; each thread walks its panels NB at a time, k in chunks of KC (a chunk of NB panels
 * stays in L1/L2 while every row tile of x passes it). At a few rows the weights stream from memory
 * once per call (decode is bandwidth-bound); at many rows the arithmetic decides (prefill).
 *
 * Row r's outputs depend only on x's row r: each sum runs over k in one order, the same whatever m,
 * the tile, the thread count or the chunking, so a row's result is bitwise the same in any batch. */
#define PANEL 16
#if defined(__AVX512F__)
#define VL 16
#define MR 6 /* 32 vector registers: 24 sums, 4 weight vectors, a broadcast */
#define MR_I8 3 /* two int32 sums per output (x's high and low digits): 24, 4 weights, 2 broadcasts */
#define MR_I4 2 /* and int4's fp32 ones beside them: 8 + 8 + 8 + 4 + 2 */
#define NB 4
#elif defined(__AVX__)
#define VL 8
#define MR 6 /* 16 registers: 12 sums, 2 weight vectors, a broadcast */
#define MR_I8 2 /* 8 + 2 + 2, and a product in flight (no VNNI in AVX2) */
#define MR_I4 3 /* 12 int32 sums, 2 weight vectors, 2 x pairs; the fp32 sums wait on the stack between groups */
#define NB 1
#else
#define VL 4 /* SSE, NEON: 16 or 32 registers */
#define MR 3
#define MR_I8 1
#define MR_I4 1
#define NB 1
#endif
#define HALVES (PANEL / VL) /* native vectors per panel */
#define KC 256 /* columns per chunk: a multiple of GROUP */
#define MC 256 /* rows per pass: their chunk of x stays in L2 while every panel goes by */
#define GROUP 32 /* int4's columns per scale */
#define XQ_MAX 32767.f /* the int16 grid of a row of x: this many steps either side of zero */
#define XQ_LOW 65536.f /* x's low digits: on a grid this much finer (a power of two: exact scaling) */

#if defined(__x86_64__) || defined(__i386__)
#define IN_REGISTER(v) __asm__("" : "+v"(v))
#elif defined(__aarch64__)
#define IN_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_REGISTER(v) (void)0
#endif
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the integer kernels read a pair of int16 as one little-endian int32"
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

int linear_panel(void) { return PANEL; }
int linear_group(void) { return GROUP; }

static inline vf vload_f32(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
/* *p in every lane: one broadcast load. ((vf){0} + *p is not: adding +0 changes -0, so the compiler
 * keeps the add, and broadcasts from a register, two more instructions beside each row's FMAs.) */
static inline vf vsplat(const float *p) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(*p);
#elif defined(__AVX2__)
    return (vf)_mm256_set1_ps(*p);
#else
    float s = *p;
    return (vf){s, s, s, s}; /* VL 4 */
#endif
}
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }

/* Widening loads. Compilers turn the generic forms into one byte or half-word at a time (GCC 12
 * does), 8x slower than the weights stream: on x86 the instructions are named.
 *   vload_bf16    16 bf16 -> fp32
 *   widen_pairs   i8: 32 bytes (16 outputs x two columns) -> HALVES vectors of VL int32 lanes, each
 *                 lane one output's two weights as int16 (low: the even column)
 *   widen_nibbles i4: 16 bytes -> the same lanes from the two nibbles (0..15) of each byte
 *   dot_pairs     acc + per lane lo16(x) * lo16(w) + hi16(x) * hi16(w), in int32 */
#if defined(__AVX512F__)
#if !defined(__AVX512BW__)
#error "an AVX-512 build needs AVX512BW for the integer kernels"
#endif
static inline vf vload_bf16(const uint16_t *p) {
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (vf)_mm512_castsi512_ps(u);
}
static inline vi widen_pairs(const int8_t *p, int h) {
    (void)h;
    return (vi)_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
}
static inline vi widen_nibbles(const uint8_t *p, int h) {
    (void)h;
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    /* (b | b << 12) & 0x000F000F: the low nibble stays at bit 0, the high one moves to bit 16 */
    return (vi)_mm512_ternarylogic_epi32(b, _mm512_slli_epi32(b, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
}
static inline vi dot_pairs(vi acc, vi x, vi w) {
#if defined(__AVX512VNNI__)
    return (vi)_mm512_dpwssd_epi32((__m512i)acc, (__m512i)x, (__m512i)w);
#else
    return (vi)_mm512_add_epi32((__m512i)acc, _mm512_madd_epi16((__m512i)x, (__m512i)w));
#endif
}
#elif defined(__AVX2__) && VL == 8
static inline vf vload_bf16(const uint16_t *p) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (vf)_mm256_castsi256_ps(u);
}
static inline vi widen_pairs(const int8_t *p, int h) {
    return (vi)_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16 * h)));
}
static inline vi widen_nibbles(const uint8_t *p, int h) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8 * h)));
    return (vi)_mm256_and_si256(_mm256_or_si256(b, _mm256_slli_epi32(b, 12)), _mm256_set1_epi32(0x000F000F));
}
static inline vi dot_pairs(vi acc, vi x, vi w) {
    return (vi)_mm256_add_epi32((__m256i)acc, _mm256_madd_epi16((__m256i)x, (__m256i)w));
}
#else
static inline vf vload_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline vi widen_pairs(const int8_t *p, int h) {
    vi lanes;
    for (int j = 0; j < VL; j++)
        lanes[j] = (int32_t)(uint16_t)(int16_t)p[2 * (h * VL + j)] | (int32_t)p[2 * (h * VL + j) + 1] * 65536;
    return lanes;
}
static inline vi widen_nibbles(const uint8_t *p, int h) {
    vi lanes;
    for (int j = 0; j < VL; j++) lanes[j] = (p[h * VL + j] & 15) | (p[h * VL + j] >> 4) << 16;
    return lanes;
}
static inline vi dot_pairs(vi acc, vi x, vi w) {
    return acc + ((x << 16) >> 16) * ((w << 16) >> 16) + (x >> 16) * (w >> 16);
}
#endif

/* ---- float weights ---- */
typedef float f32;
typedef uint16_t bf16;

static inline vf column_f32(const float *p, int h) { return vload_f32(p + h * VL); }
static inline vf column_bf16(const uint16_t *p, int h) { return vload_bf16(p + h * VL); }

/* y[r, 16 * b + j] (+)= sum_{i < kc} x[r, i] * W(b)[i][j] for R rows, B panels (wb's panels
 * `panel_stride` apart); the sums start from y unless `fresh`. IN_REGISTER (an empty asm statement)
 * keeps each loaded weight vector in a register: without it the compiler folds the loads into every
 * FMA, R loads where one will do, and the loads, not the FMAs, set the pace. */
#define MICRO(T, R, B) MICRO_(T, R, B) /* (expands NB before pasting names) */
#define MICRO_(T, R, B)                                                                                 \
static inline void micro_##T##_##R##_##B(const float *x, int64_t ldx, const T *wb, int64_t panel_stride, \
                                         int64_t kc, int fresh, float *y, int64_t ldy) {                \
    vf acc[R][B][HALVES];                                                                               \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++)                                                            \
                acc[r][b][h] = fresh ? (vf){0} : vload_f32(y + r * ldy + b * PANEL + h * VL);           \
    for (int64_t i = 0; i < kc; i++) {                                                                  \
        vf wv[B][HALVES];                                                                               \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) {                                                          \
                wv[b][h] = column_##T(wb + b * panel_stride + i * PANEL, h);                            \
                IN_REGISTER(wv[b][h]);                                                                  \
            }                                                                                           \
        for (int r = 0; r < R; r++) {                                                                   \
            vf xv = vsplat(x + r * ldx + i);                                                            \
            for (int b = 0; b < B; b++)                                                                 \
                for (int h = 0; h < HALVES; h++) acc[r][b][h] += xv * wv[b][h];                         \
        }                                                                                               \
    }                                                                                                   \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) vstore(y + r * ldy + b * PANEL + h * VL, acc[r][b][h]);    \
}

/* Rows in tiles of MR (the last tile R < MR rows). */
#define TILE(T, B) TILE_(T, B)
#define TILE_NAME(T, B) TILE_NAME_(T, B)
#define TILE_NAME_(T, B) tile_##T##_##B
#define TILE_(T, B)                                                                                     \
static inline void tile_##T##_##B(const float *x, int64_t rows, int64_t ldx, const T *wb, int64_t ps,   \
                                  int64_t kc, int fresh, float *y, int64_t ldy) {                       \
    for (int64_t r = 0; r < rows; r += MR) {                                                            \
        const float *xr = x + r * ldx;                                                                  \
        float *yr = y + r * ldy;                                                                        \
        switch (rows - r < MR ? rows - r : MR) {                                                        \
        case 1: micro_##T##_1_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                          \
        case 2: micro_##T##_2_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                          \
        case 3: micro_##T##_3_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                          \
        case 4: micro_##T##_4_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                          \
        case 5: micro_##T##_5_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                          \
        default: micro_##T##_6_##B(xr, ldx, wb, ps, kc, fresh, yr, ldy); break;                         \
        }                                                                                               \
    }                                                                                                   \
}

/* Panels [first, last) of the product (one thread's share), NB at a time (the last ones singly). */
#define RANGE(T)                                                                                        \
static void range_##T(const float *x, const T *wb, float *y, int64_t m, int64_t k, int64_t ldy,         \
                      int64_t first, int64_t last) {                                                    \
    int64_t ps = k * PANEL;                                                                             \
    for (int64_t p = first; p < last; p += NB) {                                                        \
        int64_t group = last - p < NB ? last - p : NB;                                                  \
        for (int64_t c = 0; c < k; c += KC) {                                                           \
            int64_t kc = k - c < KC ? k - c : KC;                                                       \
            const T *w = wb + p * ps + c * PANEL;                                                       \
            if (group == NB) {                                                                          \
                TILE_NAME(T, NB)(x + c, m, k, w, ps, kc, c == 0, y + p * PANEL, ldy);                   \
            } else {                                                                                    \
                for (int64_t q = 0; q < group; q++)                                                     \
                    tile_##T##_1(x + c, m, k, w + q * ps, ps, kc, c == 0, y + (p + q) * PANEL, ldy);    \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}

/* The threads take contiguous runs of panels, whole groups of NB where there are enough:
 * body(first, last) for each run. */
#define SPLIT_PANELS(panels, threads, body)                                                             \
    do {                                                                                                \
        int64_t groups_ = ((panels) + NB - 1) / NB;                                                     \
        int threads_ = (threads) > groups_ ? (int)groups_ : (threads) < 1 ? 1 : (threads);              \
        _Pragma("omp parallel for num_threads(threads_) schedule(static)")                              \
        for (int t = 0; t < threads_; t++) {                                                            \
            int64_t first = groups_ * t / threads_ * NB, last = groups_ * (t + 1) / threads_ * NB;     \
            if (last > (panels)) last = (panels);                                                       \
            if (first < last) body;                                                                     \
        }                                                                                               \
    } while (0)

/* x (m, k), wb (P, k, 16) of the type, y (m, P * 16). (`scale`, `group_scale`: unused, the places
 * of the integer kernels' scales, so that every linear_* takes the same arguments.) */
#define LINEAR(T)                                                                                       \
void linear_##T(const float *restrict x, const T *restrict wb, const float *restrict scale,             \
                const uint16_t *restrict group_scale, float *restrict y, int64_t m, int64_t panels,     \
                int64_t k, int threads) {                                                               \
    (void)scale, (void)group_scale;                                                                     \
    SPLIT_PANELS(panels, threads, for (int64_t r0 = 0; r0 < m; r0 += MC)                                \
        range_##T(x + r0 * k, wb, y + r0 * panels * PANEL, m - r0 < MC ? m - r0 : MC, k, panels * PANEL,  \
                  first, last));                                                                        \
}

#define KERNELS(T)                                                                                      \
    MICRO(T, 1, NB) MICRO(T, 2, NB) MICRO(T, 3, NB) MICRO(T, 4, NB) MICRO(T, 5, NB) MICRO(T, 6, NB)     \
    TILE(T, NB) RANGE(T) LINEAR(T)
#if NB != 1
#define SINGLE(T) MICRO(T, 1, 1) MICRO(T, 2, 1) MICRO(T, 3, 1) MICRO(T, 4, 1) MICRO(T, 5, 1) MICRO(T, 6, 1) TILE(T, 1)
SINGLE(f32) SINGLE(bf16)
#endif
KERNELS(f32)
KERNELS(bf16)

/* ---- 8- and 4-bit weights: integer products ---- */

/* x (m, k) -> its two digits hi and lo (m, 2 * ceil(k / 2)) int16 each (an odd k's last partner zero)
 * and xs (m,): x ~= xs * (hi + lo / XQ_LOW). A row that is not finite gets digits 0 and xs NaN, so
 * that its outputs are NaN, as fp32's would not be finite either. With gsum (m, 2, ceil(k / GROUP))
 * given: each group's sum of hi, then of lo (int4's offset). Rows shared among `threads` (each row's
 * digits are its own: the same whatever the split; serial, they held up a small weight's 8-32 row
 * product on two threads by 7-16%). */
static void quantize_rows_i16(const float *x, int64_t m, int64_t k, int16_t *hi, int16_t *lo, float *xs,
                              int32_t *gsum, int threads) {
    int64_t width = (k + 1) / 2 * 2, groups = (k + GROUP - 1) / GROUP;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m > 1)
    for (int64_t r = 0; r < m; r++) {
        const float *xr = x + r * k;
        int16_t *hr = hi + r * width, *lr = lo + r * width;
        /* max |x| over the bits: non-negative floats order as their bits do, and inf and NaN lie above
         * every finite one (an integer max vectorizes; a float max with NaN in play does not) */
        uint32_t top_bits = 0;
        for (int64_t i = 0; i < k; i++) {
            uint32_t bits;
            memcpy(&bits, xr + i, sizeof bits);
            bits &= 0x7fffffffu;
            top_bits = bits > top_bits ? bits : top_bits;
        }
        float top;
        memcpy(&top, &top_bits, sizeof top);
        int finite = top_bits < 0x7f800000u;
        xs[r] = finite ? top / XQ_MAX : NAN;
        hr[width - 1] = lr[width - 1] = 0;  /* an odd k's partner (overwritten below when k is even) */
        if (!finite || top == 0.f) {
            memset(hr, 0, (size_t)width * sizeof *hr);
            memset(lr, 0, (size_t)width * sizeof *lr);
        } else {
            float step = xs[r], inverse = XQ_MAX / top, low_inverse = inverse * XQ_LOW;
            #pragma omp simd
            for (int64_t i = 0; i < k; i++) {
                float q = nearbyintf(xr[i] * inverse);
                float rest = fmaf(-q, step, xr[i]);  /* x less its high digit: |rest| <= step / 2 */
                float l = nearbyintf(rest * low_inverse);
                hr[i] = (int16_t)q;
                lr[i] = (int16_t)(l > XQ_MAX ? XQ_MAX : l < -XQ_MAX ? -XQ_MAX : l);
            }
        }
        for (int64_t g = 0; gsum && g < groups; g++) {
            int32_t sh = 0, sl = 0;
            int64_t end = (g + 1) * GROUP < k ? (g + 1) * GROUP : k;
            for (int64_t i = g * GROUP; i < end; i++) sh += hr[i], sl += lr[i];
            gsum[r * 2 * groups + g] = sh;
            gsum[r * 2 * groups + groups + g] = sl;
        }
    }
}

/* The pair of a row's digits at columns 2i, 2i + 1, in every lane. */
static inline vi x_pair(const int16_t *digits, int64_t i) {
    int32_t pair;
    memcpy(&pair, digits + 2 * i, sizeof pair);
    return (vi){0} + pair;
}

/* Two digits' int32 sums -> their value in units of xs (the scaling by 2^-16 exact; the conversions
 * and the add round as fp32 does, in the same order in every variant). */
static inline vf digits_value(vi high, vi low) {
    return __builtin_convertvector(high, vf) + __builtin_convertvector(low, vf) * (1.f / XQ_LOW);
}

/* One pair of columns i for R rows and B panels (wb's panels `panel_stride` apart, this pair's
 * weights `at` bytes in, widened by WIDEN): both digit sums, high and low, of every row and panel.
 * IN_REGISTER (an empty asm statement) keeps each widened weight vector in a register for all rows. */
#define DIGITS_STEP(R, B, WIDEN, at)                                                                    \
    do {                                                                                                \
        vi wv[B][HALVES];                                                                               \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) {                                                          \
                wv[b][h] = WIDEN(wb + b * panel_stride + (at), h);                                      \
                IN_REGISTER(wv[b][h]);                                                                  \
            }                                                                                           \
        for (int r = 0; r < R; r++) {                                                                   \
            vi xh = x_pair(hi + r * ldx, i), xl = x_pair(lo + r * ldx, i);                              \
            for (int b = 0; b < B; b++)                                                                 \
                for (int h = 0; h < HALVES; h++) {                                                      \
                    high[r][b][h] = dot_pairs(high[r][b][h], xh, wv[b][h]);                             \
                    low[r][b][h] = dot_pairs(low[r][b][h], xl, wv[b][h]);                               \
                }                                                                                       \
        }                                                                                               \
    } while (0)

/* int8: y[r, 16 * b + j] (+)= xs[r] * sum over `pairs` column pairs of x's digits . W(b)[., j], for R
 * rows and B panels; times scale[16 * b + j] when scale is given (the last chunk). */
#define MICRO_I8(R, B) MICRO_I8_(R, B)
#define MICRO_I8_(R, B)                                                                                 \
static inline void micro_i8_##R##_##B(const int16_t *hi, const int16_t *lo, int64_t ldx, const float *xs, \
                                      const int8_t *wb, int64_t panel_stride, int64_t pairs, int fresh, \
                                      const float *scale, float *y, int64_t ldy) {                      \
    vi high[R][B][HALVES], low[R][B][HALVES];                                                           \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) high[r][b][h] = low[r][b][h] = (vi){0};                    \
    for (int64_t i = 0; i < pairs; i++) DIGITS_STEP(R, B, widen_pairs, i * 2 * PANEL);                 \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) {                                                          \
                float *out = y + r * ldy + b * PANEL + h * VL;                                          \
                vf sum = digits_value(high[r][b][h], low[r][b][h]) * xs[r];                             \
                IN_REGISTER(sum); /* rounded here in every variant: no FMA with the add below */        \
                if (!fresh) sum += vload_f32(out);                                                      \
                vstore(out, scale ? sum * vload_f32(scale + b * PANEL + h * VL) : sum);                 \
            }                                                                                           \
}

/* int4: the same over `pairs` column pairs, group by group: each group's int32 sums, less 8 times
 * the group's sums of x's digits (gsum: high at [r * ldg + g], low `low_at` further on; the nibbles'
 * offset), turn fp32 times the group's scales (gscale, the chunk's first group of each panel, panels
 * `group_stride` apart), then all times xs[r]. */
#define MICRO_I4(R, B) MICRO_I4_(R, B)
#define MICRO_I4_(R, B)                                                                                 \
static inline void micro_i4_##R##_##B(const int16_t *hi, const int16_t *lo, int64_t ldx, const float *xs, \
                                      const int32_t *gsum, int64_t ldg, int64_t low_at, const uint8_t *wb, \
                                      int64_t panel_stride, const uint16_t *gscale, int64_t group_stride, \
                                      int64_t pairs, int fresh, float *y, int64_t ldy) {                \
    vf acc[R][B][HALVES];                                                                               \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) acc[r][b][h] = (vf){0};                                    \
    for (int64_t g = 0; g * (GROUP / 2) < pairs; g++) {                                                 \
        int64_t end = (g + 1) * (GROUP / 2) < pairs ? (g + 1) * (GROUP / 2) : pairs;                    \
        vi high[R][B][HALVES], low[R][B][HALVES];                                                       \
        for (int r = 0; r < R; r++)                                                                     \
            for (int b = 0; b < B; b++)                                                                 \
                for (int h = 0; h < HALVES; h++) high[r][b][h] = low[r][b][h] = (vi){0};                \
        for (int64_t i = g * (GROUP / 2); i < end; i++) DIGITS_STEP(R, B, widen_nibbles, i * PANEL);    \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) {                                                          \
                vf gs = vload_bf16(gscale + b * group_stride + g * PANEL + h * VL);                     \
                for (int r = 0; r < R; r++) {                                                           \
                    const int32_t *sums = gsum + r * ldg + g;                                           \
                    vf part = digits_value(high[r][b][h] - 8 * sums[0], low[r][b][h] - 8 * sums[low_at]) * gs; \
                    IN_REGISTER(part);                                                                  \
                    acc[r][b][h] += part;                                                               \
                }                                                                                       \
            }                                                                                           \
    }                                                                                                   \
    for (int r = 0; r < R; r++)                                                                         \
        for (int b = 0; b < B; b++)                                                                     \
            for (int h = 0; h < HALVES; h++) {                                                          \
                float *out = y + r * ldy + b * PANEL + h * VL;                                          \
                vf sum = acc[r][b][h] * xs[r];                                                          \
                IN_REGISTER(sum);                                                                       \
                vstore(out, fresh ? sum : sum + vload_f32(out));                                        \
            }                                                                                           \
}

/* Rows in tiles of up to MR_I8 (int8) or MR_I4 (int4) rows, at most 3. */
#define TILE_I8(B) TILE_I8_(B)
#define TILE_I8_(B)                                                                                     \
static inline void tile_i8_##B(const int16_t *hi, const int16_t *lo, const float *xs, int64_t rows,     \
                               int64_t ldx, const int8_t *wb, int64_t ps, int64_t pairs, int fresh,     \
                               const float *sc, float *y, int64_t ldy) {                                \
    for (int64_t r = 0; r < rows; r += MR_I8) {                                                         \
        const int16_t *h = hi + r * ldx, *l = lo + r * ldx;                                             \
        if (MR_I8 >= 3 && rows - r >= 3)                                                                \
            micro_i8_3_##B(h, l, ldx, xs + r, wb, ps, pairs, fresh, sc, y + r * ldy, ldy);              \
        else if (MR_I8 >= 2 && rows - r >= 2)                                                           \
            micro_i8_2_##B(h, l, ldx, xs + r, wb, ps, pairs, fresh, sc, y + r * ldy, ldy);              \
        else                                                                                            \
            micro_i8_1_##B(h, l, ldx, xs + r, wb, ps, pairs, fresh, sc, y + r * ldy, ldy);              \
    }                                                                                                   \
}
#define TILE_I4(B) TILE_I4_(B)
#define TILE_I4_(B)                                                                                     \
static inline void tile_i4_##B(const int16_t *hi, const int16_t *lo, const float *xs, const int32_t *gsum, \
                               int64_t ldg, int64_t low_at, int64_t rows, int64_t ldx, const uint8_t *wb, \
                               int64_t ps, const uint16_t *gscale, int64_t gps, int64_t pairs, int fresh, \
                               float *y, int64_t ldy) {                                                 \
    for (int64_t r = 0; r < rows; r += MR_I4) {                                                         \
        const int16_t *h = hi + r * ldx, *l = lo + r * ldx;                                             \
        if (MR_I4 >= 3 && rows - r >= 3)                                                                \
            micro_i4_3_##B(h, l, ldx, xs + r, gsum + r * ldg, ldg, low_at, wb, ps, gscale, gps, pairs,  \
                           fresh, y + r * ldy, ldy);                                                    \
        else if (MR_I4 >= 2 && rows - r >= 2)                                                           \
            micro_i4_2_##B(h, l, ldx, xs + r, gsum + r * ldg, ldg, low_at, wb, ps, gscale, gps, pairs,  \
                           fresh, y + r * ldy, ldy);                                                    \
        else                                                                                            \
            micro_i4_1_##B(h, l, ldx, xs + r, gsum + r * ldg, ldg, low_at, wb, ps, gscale, gps, pairs,  \
                           fresh, y + r * ldy, ldy);                                                    \
    }                                                                                                   \
}
#define TILE_I_NAME(T, B) TILE_I_NAME_(T, B)
#define TILE_I_NAME_(T, B) tile_##T##_##B
MICRO_I8(1, NB) MICRO_I8(2, NB) MICRO_I8(3, NB) TILE_I8(NB)
MICRO_I4(1, NB) MICRO_I4(2, NB) MICRO_I4(3, NB) TILE_I4(NB)
#if NB != 1
MICRO_I8(1, 1) MICRO_I8(2, 1) MICRO_I8(3, 1) TILE_I8(1)
MICRO_I4(1, 1) MICRO_I4(2, 1) MICRO_I4(3, 1) TILE_I4(1)
#endif

/* x's rows as digits: hi and lo (m, 2 * ceil(k / 2)) int16, xs (m,), and for int4 gsum (m, 2, groups). */
typedef struct {
    int16_t *hi, *lo;
    float *xs;
    int32_t *gsum;
    int64_t width, groups;
} Digits;

/* Panels [first, last) (one thread's share), NB at a time, KC columns (KC / 2 pairs) per chunk. */
static void range_i8(const Digits *x, const int8_t *wb, const float *scale, float *y, int64_t m, int64_t k,
                     int64_t ldy, int64_t first, int64_t last) {
    int64_t pairs_all = (k + 1) / 2, ps = pairs_all * 2 * PANEL;
    for (int64_t p = first; p < last; p += NB) {
        int64_t group = last - p < NB ? last - p : NB;
        for (int64_t c = 0; c < pairs_all; c += KC / 2) {
            int64_t pairs = pairs_all - c < KC / 2 ? pairs_all - c : KC / 2;
            const float *sc = c + pairs == pairs_all ? scale + p * PANEL : 0;
            const int8_t *w = wb + p * ps + c * 2 * PANEL;
            const int16_t *hi = x->hi + 2 * c, *lo = x->lo + 2 * c;
            if (group == NB) {
                TILE_I_NAME(i8, NB)(hi, lo, x->xs, m, x->width, w, ps, pairs, c == 0, sc, y + p * PANEL, ldy);
            } else {
                for (int64_t q = 0; q < group; q++)
                    tile_i8_1(hi, lo, x->xs, m, x->width, w + q * ps, ps, pairs, c == 0, sc ? sc + q * PANEL : 0,
                              y + (p + q) * PANEL, ldy);
            }
        }
    }
}

static void range_i4(const Digits *x, const uint8_t *wb, const uint16_t *group_scale, float *y, int64_t m,
                     int64_t k, int64_t ldy, int64_t first, int64_t last) {
    int64_t pairs_all = (k + 1) / 2, ps = pairs_all * PANEL, gps = x->groups * PANEL;
    for (int64_t p = first; p < last; p += NB) {
        int64_t group = last - p < NB ? last - p : NB;
        for (int64_t c = 0; c < pairs_all; c += KC / 2) {
            int64_t pairs = pairs_all - c < KC / 2 ? pairs_all - c : KC / 2, g = c / (GROUP / 2);
            const uint8_t *w = wb + p * ps + c * PANEL;
            const uint16_t *gs = group_scale + p * gps + g * PANEL;
            const int16_t *hi = x->hi + 2 * c, *lo = x->lo + 2 * c;
            const int32_t *sums = x->gsum + g;
            if (group == NB) {
                TILE_I_NAME(i4, NB)(hi, lo, x->xs, sums, 2 * x->groups, x->groups, m, x->width, w, ps, gs, gps,
                                    pairs, c == 0, y + p * PANEL, ldy);
            } else {
                for (int64_t q = 0; q < group; q++)
                    tile_i4_1(hi, lo, x->xs, sums, 2 * x->groups, x->groups, m, x->width, w + q * ps, ps,
                              gs + q * gps, gps, pairs, c == 0, y + (p + q) * PANEL, ldy);
            }
        }
    }
}

/* Rows r0.. of x's digits (a pass over MC rows). */
static inline Digits rows_of(const Digits *d, int64_t r0) {
    Digits part = *d;
    part.hi += r0 * d->width, part.lo += r0 * d->width, part.xs += r0;
    if (part.gsum) part.gsum += r0 * 2 * d->groups;
    return part;
}

/* x's digits into buffers the size of x (small beside the weights); 0 when out of memory, and then
 * the product y (m, n) is NaN: a result no one mistakes for a number. */
static int digits_of(const float *x, int64_t m, int64_t k, int with_group_sums, Digits *d, float *y, int64_t n,
                     int threads) {
    d->width = (k + 1) / 2 * 2, d->groups = (k + GROUP - 1) / GROUP;
    d->hi = malloc((size_t)(2 * m * d->width) * sizeof *d->hi);
    d->lo = d->hi ? d->hi + m * d->width : 0;
    d->xs = malloc((size_t)m * sizeof *d->xs);
    d->gsum = with_group_sums ? malloc((size_t)(2 * m * d->groups) * sizeof *d->gsum) : 0;
    if (!d->hi || !d->xs || (with_group_sums && !d->gsum)) {
        free(d->hi), free(d->xs), free(d->gsum);
        for (int64_t i = 0; i < m * n; i++) y[i] = NAN;
        return 0;
    }
    quantize_rows_i16(x, m, k, d->hi, d->lo, d->xs, d->gsum, threads);
    return 1;
}

/* x (m, k) fp32, wb (P, ceil(k / 2), 16, 2) int8, scale (P * 16,) fp32, y (m, P * 16); group_scale
 * unused. */
void linear_i8(const float *restrict x, const int8_t *restrict wb, const float *restrict scale,
               const uint16_t *restrict group_scale, float *restrict y, int64_t m, int64_t panels, int64_t k,
               int threads) {
    (void)group_scale;
    Digits d;
    if (!digits_of(x, m, k, 0, &d, y, panels * PANEL, threads)) return;
    SPLIT_PANELS(panels, threads, for (int64_t r0 = 0; r0 < m; r0 += MC) {
        Digits part = rows_of(&d, r0);
        range_i8(&part, wb, scale, y + r0 * panels * PANEL, m - r0 < MC ? m - r0 : MC, k, panels * PANEL, first, last);
    });
    free(d.hi), free(d.xs);
}

/* x (m, k) fp32, wb (P, ceil(k / 2), 16) bytes, group_scale (P, ceil(k / GROUP), 16) bf16, y
 * (m, P * 16); scale unused. */
void linear_i4(const float *restrict x, const uint8_t *restrict wb, const float *restrict scale,
               const uint16_t *restrict group_scale, float *restrict y, int64_t m, int64_t panels, int64_t k,
               int threads) {
    (void)scale;
    Digits d;
    if (!digits_of(x, m, k, 1, &d, y, panels * PANEL, threads)) return;
    SPLIT_PANELS(panels, threads, for (int64_t r0 = 0; r0 < m; r0 += MC) {
        Digits part = rows_of(&d, r0);
        range_i4(&part, wb, group_scale, y + r0 * panels * PANEL, m - r0 < MC ? m - r0 : MC, k, panels * PANEL,
                 first, last);
    });
    free(d.hi), free(d.xs), free(d.gsum);
}

/* ---- w8a8: 8-bit weights times 8-bit activations (--quantize w8a8), llama.cpp's Q8_0 arithmetic ----
 *
 * The weights: int8, a fp32 scale per output, laid out (P, K32 / 4, 16, 4): for each quad of columns,
 * each output's four weights side by side; K32 = k rounded up to QB (zeros past k). Each row of x is
 * put on an int8 grid of its own per block of QB columns: x ~= xs[r, b] * qx, |qx| <= 127. A block's
 * products sum exactly in int32 (4 * 127 * 127 per quad); y[r, j] = scale[j] * sum over blocks, in
 * order, of xs[r, b] * that sum (one rounding per block, fmaf's; the vector FMA's the same), so a row's
 * result is bitwise the same in any batch, on any thread count and in every build.
 * AVX2: the unsigned-by-signed byte product (vpmaddubsw) takes |qx| and the weights with qx's signs
 * (vpsignb), pairs into int16 (at most 2 * 127 * 127: no saturation), vpmaddwd by ones into int32: four
 * instructions per 32 products and row, where the int16 digits of linear_i8 take eight per 16 pairs.
 * The price is x's precision: 8 bits a block instead of linear_i8's two int16 digits, so the same
 * token decoded and prefilled can differ (docs/performance.md says by how much). */
#define QB 32 /* columns per activation block */
#define QKC 1024 /* columns per pass: every row's chunk of x stays in L2 while the panels go by */
#define QMC 128 /* rows per pass */
#define FEW_BYTE_ROWS 8 /* up to this many rows, a pass takes every column */

#define MR_Q8 3

/* x (m, k) -> qx and |qx| (m, K32) int8, xs (m, K32 / QB) and the w4a8 kernel's start (m, K32 / QB): for each
 * block, two int16, minus 8 times the sum of qx over the columns 4i, 4i + 1 (low half) and 4i + 2, 4i + 3
 * (high half); a row that is not finite gets xs NaN. */
static void quantize_rows_q8(const float *x, int64_t m, int64_t k, int64_t k32, int64_t ldq, int8_t *q, int8_t *aq,
                             float *xs, uint32_t *start, int threads) {
    int64_t blocks = k32 / QB;
    #pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && m > 1)
    for (int64_t r = 0; r < m; r++) {
        int finite = 1;
        memset(q + r * ldq, 0, (size_t)k32), memset(aq + r * ldq, 0, (size_t)k32);
        for (int64_t b = 0; b < blocks; b++) {
            int64_t first = b * QB, end = first + QB < k ? first + QB : k;
            uint32_t top_bits = 0;  /* max |x| over the bits, as quantize_rows_i16 */
            for (int64_t i = first; i < end; i++) {
                uint32_t bits;
                memcpy(&bits, x + r * k + i, sizeof bits);
                bits &= 0x7fffffffu;
                top_bits = bits > top_bits ? bits : top_bits;
            }
            float top;
            memcpy(&top, &top_bits, sizeof top);
            xs[r * blocks + b] = top / 127.f;
            start[r * blocks + b] = 0;
            if (top_bits >= 0x7f800000u) finite = 0;
            if (!finite || top == 0.f) continue;
            float inverse = 127.f / top;
            int32_t sums[2] = {0, 0};
            for (int64_t i = first; i < end; i++) {
                float v = nearbyintf(x[r * k + i] * inverse);
                v = v > 127.f ? 127.f : v < -127.f ? -127.f : v;
                q[r * ldq + i] = (int8_t)v;
                aq[r * ldq + i] = (int8_t)(v < 0 ? -v : v);
                sums[i % 4 / 2] += (int32_t)v;
            }
            start[r * blocks + b] = (uint16_t)(-8 * sums[0]) | (uint32_t)(uint16_t)(-8 * sums[1]) << 16;
        }
        if (!finite)
            for (int64_t b = 0; b < blocks; b++) xs[r * blocks + b] = NAN;
    }
}

/* x's rows on int8 grids, for the w8a8 and w4a8 kernels: qx and |qx| (m, k32) with rows ldq apart, xs and
 * start (m, blocks). ldq is k32 and a cache line: rows k32 apart (a multiple of 4096 bytes at Mixtral's
 * sizes) would share a few L1 sets, and a tile's rows evict each other and the panel's weights. */
typedef struct {
    int8_t *q, *aq;
    float *xs;
    uint32_t *start;
    int64_t k32, ldq, blocks;
} ByteRows;

/* x (m, k) into `rows` (buffers the size of x); 0 when out of memory, and then y (m, n) is NaN. */
static int byte_rows_of(const float *x, int64_t m, int64_t k, ByteRows *rows, float *y, int64_t n, int threads) {
    rows->k32 = (k + QB - 1) / QB * QB, rows->ldq = rows->k32 + 64, rows->blocks = rows->k32 / QB;
    rows->q = malloc((size_t)(2 * m * rows->ldq));
    rows->xs = malloc((size_t)(m * rows->blocks) * sizeof *rows->xs);
    rows->start = malloc((size_t)(m * rows->blocks) * sizeof *rows->start);
    if (!rows->q || !rows->xs || !rows->start) {
        free(rows->q), free(rows->xs), free(rows->start);
        for (int64_t i = 0; i < m * n; i++) y[i] = NAN;
        return 0;
    }
    rows->aq = rows->q + m * rows->ldq;
    quantize_rows_q8(x, m, k, rows->k32, rows->ldq, rows->q, rows->aq, rows->xs, rows->start, threads);
    return 1;
}

/* The threads take contiguous runs of panels; each walks rows in passes of QMC and columns in
 * passes of QKC (blocks b0 .. b0 + nb; all of them up to FEW_BYTE_ROWS rows), running
 * `tile(p, b0, nb, r0, r1)` for each of its panels p. */
#define BYTE_PASSES(rows, m, panels, threads, tile)                                                     \
    do {                                                                                                \
        int threads_ = (threads) < (panels) ? (threads) : (int)(panels);                                \
        /* a few rows: each panel read start to end, one stream the prefetcher follows */              \
        int64_t pass_ = (m) <= FEW_BYTE_ROWS ? (rows).blocks : QKC / QB;                                \
        _Pragma("omp parallel for num_threads(threads_) schedule(static) if (threads_ > 1)")            \
        for (int t = 0; t < threads_; t++) {                                                            \
            int64_t first = (panels) * t / threads_, last = (panels) * (t + 1) / threads_;              \
            for (int64_t r0 = 0; r0 < (m); r0 += QMC) {                                                \
                int64_t r1 = r0 + QMC < (m) ? r0 + QMC : (m);                                         \
                for (int64_t b0 = 0; b0 < (rows).blocks; b0 += pass_) {                                 \
                    int64_t nb = (rows).blocks - b0 < pass_ ? (rows).blocks - b0 : pass_;               \
                    for (int64_t p = first; p < last; p++) tile;                                        \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    } while (0)

#if defined(__AVX2__)
/* One quad of columns for one row: its four x values (q, and their magnitudes aq) times the quad's
 * weights of the panel's outputs 0-7 (w0) and 8-15 (w1), into that row's int32 sums. */
static inline void add_quad(__m256i sums[2], __m256i w0, __m256i w1, const int8_t *q, const int8_t *aq,
                            __m256i ones) {
    int32_t xq, xa;
    memcpy(&xq, q, sizeof xq);
    memcpy(&xa, aq, sizeof xa);
    __m256i xv = _mm256_set1_epi32(xq), av = _mm256_set1_epi32(xa);
    sums[0] = _mm256_add_epi32(sums[0], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(w0, xv)), ones));
    sums[1] = _mm256_add_epi32(sums[1], _mm256_madd_epi16(_mm256_maddubs_epi16(av, _mm256_sign_epi8(w1, xv)), ones));
}

/* A byte tile's float sums wait between blocks in `sums` (PANEL floats a row), not in y: y's rows
 * are n * 4 bytes apart, a multiple of 4096 at Mixtral's sizes, and a load from one row after a
 * store to another waits on it (4K aliasing). In: y's rows, or zeros on the first pass; out: to y. */
static inline void sums_in(float *sums, const float *y, int64_t ldy, int rows, int fresh) {
    for (int i = 0; i < rows; i++)
        if (fresh)
            memset(sums + i * PANEL, 0, sizeof(float) * PANEL);
        else
            memcpy(sums + i * PANEL, y + i * ldy, sizeof(float) * PANEL);
}

static inline void sums_out(const float *sums, float *y, int64_t ldy, int rows) {
    for (int i = 0; i < rows; i++) memcpy(y + i * ldy, sums + i * PANEL, sizeof(float) * PANEL);
}

/* R rows x one panel over `blocks` blocks (wb: the panel's first, 4 * PANEL bytes a quad): y's 16
 * outputs += the blocks' sums, times scale when given (the last pass). */
#define MICRO_Q8(R)                                                                                     \
static inline void micro_q8_##R(const int8_t *q, const int8_t *aq, int64_t ldq, const float *xs,        \
                                int64_t ldxs, const int8_t *wb, int64_t blocks, const float *scale,     \
                                float *y, int64_t ldy) {                                                \
    const __m256i ones = _mm256_set1_epi16(1);                                                          \
    /* y (tile_q8's sums) holds the float sums between blocks: registers for the int32 sums,       \
     * weights and broadcasts only, so nothing spills in the quads' loop */                           \
    for (int64_t b = 0; b < blocks; b++) {                                                              \
        __m256i sums[R][2];                                                                             \
        for (int r = 0; r < R; r++) sums[r][0] = sums[r][1] = _mm256_setzero_si256();                  \
        _Pragma("GCC unroll 1") /* unrolled, gcc sums the products on the stack */                    \
        for (int s = 0; s < QB / 4; s += 2) { /* two quads a step, as micro_q4 */                       \
            const int8_t *w = wb + (b * QB + s * 4) * PANEL;                                            \
            __m256i wq[2][2] = {{_mm256_loadu_si256((const __m256i *)w),                                \
                                 _mm256_loadu_si256((const __m256i *)(w + 32))},                        \
                                {_mm256_loadu_si256((const __m256i *)(w + 64)),                         \
                                 _mm256_loadu_si256((const __m256i *)(w + 96))}};                       \
            for (int half = 0; half < 2; half++)                                                        \
                for (int r = 0; r < R; r++)                                                             \
                    add_quad(sums[r], wq[half][0], wq[half][1], q + r * ldq + b * QB + (s + half) * 4,    \
                             aq + r * ldq + b * QB + (s + half) * 4, ones);                             \
        }                                                                                               \
        for (int r = 0; r < R; r++) {                                                                   \
            __m256 step = _mm256_set1_ps(xs[r * ldxs + b]);                                             \
            for (int h = 0; h < 2; h++)                                                                 \
                _mm256_storeu_ps(y + r * ldy + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[r][h]), step, \
                                                                      _mm256_loadu_ps(y + r * ldy + 8 * h))); \
        }                                                                                               \
    }                                                                                                   \
    if (scale)                                                                                          \
        for (int r = 0; r < R; r++)                                                                     \
            for (int h = 0; h < 2; h++)                                                                 \
                _mm256_storeu_ps(y + r * ldy + 8 * h, _mm256_mul_ps(_mm256_loadu_ps(y + r * ldy + 8 * h), \
                                                                    _mm256_loadu_ps(scale + 8 * h)));   \
}
MICRO_Q8(1) MICRO_Q8(2) MICRO_Q8(3)
#endif

/* Rows [r0, r1) of one panel (wb: its weights) over blocks [b0, b0 + blocks) (the pass's). */
static void tile_q8(const ByteRows *x, const int8_t *wb, int64_t b0, int64_t blocks, int fresh, const float *scale,
                    float *y, int64_t ldy, int64_t r0, int64_t r1) {
#if defined(__AVX2__)
    for (int64_t r = r0; r < r1; r += MR_Q8) {
        const int8_t *qr = x->q + r * x->ldq + b0 * QB, *ar = x->aq + r * x->ldq + b0 * QB, *w = wb + b0 * QB * PANEL;
        const float *xr = x->xs + r * x->blocks + b0;
        float *yr = y + r * ldy;
        int rows = r1 - r < MR_Q8 ? (int)(r1 - r) : MR_Q8;
        float sums[MR_Q8 * PANEL] __attribute__((aligned(32)));
        sums_in(sums, yr, ldy, rows, fresh);
        switch (rows) {
        case 1: micro_q8_1(qr, ar, x->ldq, xr, x->blocks, w, blocks, scale, sums, PANEL); break;
        case 2: micro_q8_2(qr, ar, x->ldq, xr, x->blocks, w, blocks, scale, sums, PANEL); break;
        default: micro_q8_3(qr, ar, x->ldq, xr, x->blocks, w, blocks, scale, sums, PANEL); break;
        }
        sums_out(sums, yr, ldy, rows);
    }
#else
    for (int64_t r = r0; r < r1; r++)
        for (int j = 0; j < PANEL; j++) {
            float acc = fresh ? 0.f : y[r * ldy + j];
            for (int64_t b = b0; b < b0 + blocks; b++) {
                int32_t sum = 0;
                for (int64_t i = 0; i < QB; i++)
                    sum += x->q[r * x->ldq + b * QB + i] * wb[((b * QB + i) / 4 * PANEL + j) * 4 + i % 4];
                acc = fmaf((float)sum, x->xs[r * x->blocks + b], acc);
            }
            y[r * ldy + j] = scale ? acc * scale[j] : acc;
        }
#endif
}

/* x (m, k) fp32, wb (P, K32 / 4, 64) int8, scale (P * 16,) fp32, y (m, P * 16); group_scale unused. */
void linear_q8(const float *restrict x, const int8_t *restrict wb, const float *restrict scale,
               const uint16_t *restrict group_scale, float *restrict y, int64_t m, int64_t panels, int64_t k,
               int threads) {
    (void)group_scale;
    ByteRows rows;
    int64_t ldy = panels * PANEL;
    if (!byte_rows_of(x, m, k, &rows, y, ldy, threads)) return;
    BYTE_PASSES(rows, m, panels, threads,
                tile_q8(&rows, wb + p * rows.k32 * PANEL, b0, nb, b0 == 0,
                        b0 + nb == rows.blocks ? scale + p * PANEL : 0, y + p * PANEL, ldy, r0, r1));
    free(rows.q), free(rows.xs), free(rows.start);
}

/* ---- w4a8: 4-bit weights times 8-bit activations (--quantize w4a8), llama.cpp's Q4_0 x Q8_0 ----
 *
 * The weights: int4's (q in [-8, 7], a bf16 scale per output and group of GROUP == QB columns), laid
 * out (P, K32 / 8, 16, 4) bytes: for each two quads of columns, each output's four bytes, whose low
 * nibbles are the first quad's weights and high nibbles the second's, each as q + 8. x as for w8a8.
 * y[r, j] = sum over blocks, in order, of (xs[r, b] * gscale[j, b]) * (the block's int32 sum), one
 * rounding each (fmaf's; the vector FMA's the same).
 * AVX2: the nibbles as they are (q + 8, 0..15) are vpmaddubsw's unsigned operand and qx its signed one,
 * so no vpsignb and no subtraction: a step unpacks 64 weight bytes once for all the tile's rows (and,
 * shift, and) and each row adds four products into int16 sums, summed over the whole block (at most
 * 16 * 15 * 127 a lane) and widened once per block; the sums start at minus 8 times x's sum over the
 * lane's columns (`start`), which takes the + 8 off. The block's int32 sum is the same integer as
 * sum(qx * q), so the result is the generic build's, bit for bit. */
static inline float bf16_value(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#if defined(__AVX2__)
#define MR_Q4 4
/* acc += v in int16 lanes, in acc's own register. Written as an intrinsic, gcc adds into the product's
 * register and copies the sum back, which takes a second register per sum: at this kernel's 16 live
 * registers it then keeps half the sums on the stack, and each step waits on their stores. */
#define ADD16(acc, v) __asm__("vpaddw %1, %0, %0" : "+x"(acc) : "x"(v))
/* R rows x one panel over `blocks` blocks: 2R int16 sums, the step's weights unpacked into four
 * vectors (each half's low and high nibbles), two broadcasts, the nibble mask: 2R + 7 registers, so
 * R <= 4. Each broadcast of x serves both halves (the broadcasts, not the products, set the pace: with
 * half panels a step took one per 32 products). Each block's int16 pair sums start at `start` (the
 * nibbles' + 8 taken off first), so at most 16 * 8 * 127 on the way: no overflow; y (tile_q4's
 * sums) holds the float sums between blocks. */
#define MICRO_Q4(R)                                                                                     \
static inline void micro_q4_##R(const int8_t *q, int64_t ldq, const float *xs, const uint32_t *start,   \
                                int64_t ldxs, const uint8_t *wb, const uint16_t *gs, int64_t blocks,    \
                                float *y, int64_t ldy) {                                                \
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);                          \
    for (int64_t b = 0; b < blocks; b++) {                                                              \
        __m256i pairs[R][2];                                                                            \
        for (int r = 0; r < R; r++) pairs[r][0] = pairs[r][1] = _mm256_set1_epi32((int32_t)start[r * ldxs + b]); \
        _Pragma("GCC unroll 1")                                                                         \
        for (int s = 0; s < QB / 8; s++) { /* two quads: the low nibbles' and the high ones' */        \
            const uint8_t *w = wb + (b * QB + s * 8) * PANEL / 2;                                       \
            __m256i v0 = _mm256_loadu_si256((const __m256i *)w), v1 = _mm256_loadu_si256((const __m256i *)(w + 32)); \
            __m256i low0 = _mm256_and_si256(v0, low4), high0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low4); \
            __m256i low1 = _mm256_and_si256(v1, low4), high1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low4); \
            for (int r = 0; r < R; r++) {                                                               \
                int32_t first, second;                                                                  \
                memcpy(&first, q + r * ldq + b * QB + s * 8, sizeof first);                              \
                memcpy(&second, q + r * ldq + b * QB + s * 8 + 4, sizeof second);                        \
                __m256i x0 = _mm256_set1_epi32(first), x1 = _mm256_set1_epi32(second);                  \
                ADD16(pairs[r][0], _mm256_maddubs_epi16(low0, x0));                                     \
                ADD16(pairs[r][1], _mm256_maddubs_epi16(low1, x0));                                     \
                ADD16(pairs[r][0], _mm256_maddubs_epi16(high0, x1));                                    \
                ADD16(pairs[r][1], _mm256_maddubs_epi16(high1, x1));                                    \
            }                                                                                           \
        }                                                                                               \
        for (int h = 0; h < 2; h++) {                                                                   \
            __m256 g = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(                     \
                _mm_loadu_si128((const __m128i *)(gs + b * PANEL + 8 * h))), 16));                      \
            for (int r = 0; r < R; r++) {                                                               \
                float *out = y + r * ldy + 8 * h;                                                       \
                _mm256_storeu_ps(out, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r][h], ones)), \
                                 _mm256_mul_ps(_mm256_set1_ps(xs[r * ldxs + b]), g), _mm256_loadu_ps(out))); \
            }                                                                                           \
        }                                                                                               \
    }                                                                                                   \
}
MICRO_Q4(2) MICRO_Q4(3) MICRO_Q4(4)

/* One row: both halves at once, the sums in registers across blocks. */
static inline void micro_q4_one(const int8_t *q, const float *xs, const uint32_t *start, const uint8_t *wb,
                                const uint16_t *gs, int64_t blocks, int fresh, float *y) {
    const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256 acc[2] = {fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(y), fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(y + 8)};
    for (int64_t b = 0; b < blocks; b++) {
        __m256i pairs[2];
        pairs[0] = pairs[1] = _mm256_set1_epi32((int32_t)start[b]);
        _Pragma("GCC unroll 1")
        for (int s = 0; s < QB / 8; s++) {
            const uint8_t *w = wb + (b * QB + s * 8) * PANEL / 2;
            __m256i v0 = _mm256_loadu_si256((const __m256i *)w), v1 = _mm256_loadu_si256((const __m256i *)(w + 32));
            int32_t first, second;
            memcpy(&first, q + b * QB + s * 8, sizeof first);
            memcpy(&second, q + b * QB + s * 8 + 4, sizeof second);
            __m256i x0 = _mm256_set1_epi32(first), x1 = _mm256_set1_epi32(second);
            pairs[0] = _mm256_add_epi16(pairs[0], _mm256_maddubs_epi16(_mm256_and_si256(v0, low4), x0));
            pairs[1] = _mm256_add_epi16(pairs[1], _mm256_maddubs_epi16(_mm256_and_si256(v1, low4), x0));
            pairs[0] = _mm256_add_epi16(pairs[0], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low4), x1));
            pairs[1] = _mm256_add_epi16(pairs[1], _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low4), x1));
        }
        __m256 step = _mm256_set1_ps(xs[b]);
        for (int h = 0; h < 2; h++) {
            __m256 g = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                _mm_loadu_si128((const __m128i *)(gs + b * PANEL + 8 * h))), 16));
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[h], ones)), _mm256_mul_ps(step, g), acc[h]);
        }
    }
    _mm256_storeu_ps(y, acc[0]), _mm256_storeu_ps(y + 8, acc[1]);
}
#endif

/* Rows [r0, r1) of one panel (wb, gs: its weights and scales (groups, 16)) over blocks [b0, b0 + blocks). */
static void tile_q4(const ByteRows *x, const uint8_t *wb, const uint16_t *gs, int64_t b0, int64_t blocks, int fresh,
                    float *y, int64_t ldy, int64_t r0, int64_t r1) {
#if defined(__AVX2__)
    for (int64_t r = r0; r < r1; r += MR_Q4) {
        const int8_t *qr = x->q + r * x->ldq + b0 * QB;
        const uint8_t *w = wb + b0 * QB * PANEL / 2;
        const float *xr = x->xs + r * x->blocks + b0;
        const uint32_t *sr = x->start + r * x->blocks + b0;
        const uint16_t *g = gs + b0 * PANEL;
        float *yr = y + r * ldy;
        if (r1 - r == 1) {
            micro_q4_one(qr, xr, sr, w, g, blocks, fresh, yr);
            continue;
        }
        int rows = r1 - r < MR_Q4 ? (int)(r1 - r) : MR_Q4;
        float sums[MR_Q4 * PANEL] __attribute__((aligned(32)));
        sums_in(sums, yr, ldy, rows, fresh);
        switch (rows) {
        case 2: micro_q4_2(qr, x->ldq, xr, sr, x->blocks, w, g, blocks, sums, PANEL); break;
        case 3: micro_q4_3(qr, x->ldq, xr, sr, x->blocks, w, g, blocks, sums, PANEL); break;
        default: micro_q4_4(qr, x->ldq, xr, sr, x->blocks, w, g, blocks, sums, PANEL); break;
        }
        sums_out(sums, yr, ldy, rows);
    }
#else
    for (int64_t r = r0; r < r1; r++)
        for (int j = 0; j < PANEL; j++) {
            float acc = fresh ? 0.f : y[r * ldy + j];
            for (int64_t b = b0; b < b0 + blocks; b++) {
                int32_t sum = 0;
                for (int64_t i = 0; i < QB; i++) {
                    int64_t c = b * QB + i;  /* byte: two quads of columns, this output's four */
                    uint8_t byte = wb[((c / 8) * PANEL + j) * 4 + c % 4];
                    sum += x->q[r * x->ldq + c] * ((c % 8 < 4 ? byte & 0x0f : byte >> 4) - 8);
                }
                acc = fmaf((float)sum, x->xs[r * x->blocks + b] * bf16_value(gs[b * PANEL + j]), acc);
            }
            y[r * ldy + j] = acc;
        }
#endif
}

/* x (m, k) fp32, wb (P, K32 / 8, 64) bytes, group_scale (P, K32 / QB, 16) bf16, y (m, P * 16); scale
 * unused. */
void linear_q4(const float *restrict x, const uint8_t *restrict wb, const float *restrict scale,
               const uint16_t *restrict group_scale, float *restrict y, int64_t m, int64_t panels, int64_t k,
               int threads) {
    (void)scale;
    ByteRows rows;
    int64_t ldy = panels * PANEL;
    if (!byte_rows_of(x, m, k, &rows, y, ldy, threads)) return;
    BYTE_PASSES(rows, m, panels, threads,
                tile_q4(&rows, wb + p * rows.k32 * PANEL / 2, group_scale + p * rows.blocks * PANEL, b0, nb,
                        b0 == 0, y + p * PANEL, ldy, r0, r1));
    free(rows.q), free(rows.xs), free(rows.start);
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

/* ---- this machine's arithmetic peaks (bench/prefill.py measures prefill against them) ----
 * Independent chains on registers, no memory: `iters` steps on each of `threads` threads; each
 * returns the multiply-adds done. fp32: one FMA per lane. Bytes: unsigned by signed 8-bit products
 * summed into int32 lanes, as llama.cpp's 8-bit dot products run: vpdpbusd where AVX512-VNNI or
 * AVX-VNNI exist, else vpmaddubsw (pairs into int16) and vpmaddwd by ones (into int32). */
#define PEAK_CHAINS 10
#define PEAK_CHAINS_U8 6 /* AVX2 and generic: 6 accumulators, the operands and the products in 16 registers */
double peak_fma_f32(int64_t iters, int threads) {
    double total = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        vf acc[PEAK_CHAINS], a = (vf){0} + 0.999999f, b = (vf){0} + 1e-6f;
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = (vf){0} + (float)c;
        for (int64_t i = 0; i < iters; i++) {
            IN_REGISTER(a);
            for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = acc[c] * a + b;
        }
        float keep = 0;
        for (int c = 0; c < PEAK_CHAINS; c++) keep += acc[c][0];
        total += (double)iters * PEAK_CHAINS * VL + (keep == -1.f);  /* keep: the chains are live */
    }
    return total;
}

double peak_dot_u8s8(int64_t iters, int threads) {
    double total = 0;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        int32_t keep = 0;
        double per_step;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        __m512i acc[PEAK_CHAINS], u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2);
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm512_setzero_si512();
        for (int64_t i = 0; i < iters; i++) {
            IN_REGISTER(u);
            for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm512_dpbusd_epi32(acc[c], u, s);
        }
        for (int c = 0; c < PEAK_CHAINS; c++) keep += _mm512_reduce_add_epi32(acc[c]);
        per_step = 64;
#elif defined(__AVXVNNI__)
        __m256i acc[PEAK_CHAINS], u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2);
        for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_setzero_si256();
        for (int64_t i = 0; i < iters; i++) {
            IN_REGISTER(u);
            for (int c = 0; c < PEAK_CHAINS; c++) acc[c] = _mm256_dpbusd_avx_epi32(acc[c], u, s);
        }
        for (int c = 0; c < PEAK_CHAINS; c++) keep += _mm256_extract_epi32(acc[c], 0);
        per_step = 32;
#elif defined(__AVX2__)
        /* u "changes" before every chain's product (an empty asm): one product computed once and
         * added to every chain would measure vpaddd, not the multiplies. Named accumulators, not an
         * array, so that all of them stay in registers. */
        __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2), ones = _mm256_set1_epi16(1);
#define PEAK_U8_CHAIN(c) __m256i acc##c = _mm256_setzero_si256();
        PEAK_U8_CHAIN(0) PEAK_U8_CHAIN(1) PEAK_U8_CHAIN(2) PEAK_U8_CHAIN(3) PEAK_U8_CHAIN(4) PEAK_U8_CHAIN(5)
#define PEAK_U8_STEP(c)                                                                                 \
        IN_REGISTER(u);                                                                                 \
        acc##c = _mm256_add_epi32(acc##c, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), ones));
        for (int64_t i = 0; i < iters; i++) {
            PEAK_U8_STEP(0) PEAK_U8_STEP(1) PEAK_U8_STEP(2) PEAK_U8_STEP(3) PEAK_U8_STEP(4) PEAK_U8_STEP(5)
        }
        __m256i all = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(acc0, acc1), _mm256_add_epi32(acc2, acc3)),
                                       _mm256_add_epi32(acc4, acc5));
        keep = _mm256_extract_epi32(all, 0);
        per_step = 32.0 * PEAK_CHAINS_U8 / PEAK_CHAINS;
#else
        vi acc[PEAK_CHAINS_U8], u = (vi){0} + 3, s = (vi){0} - 2;
        for (int c = 0; c < PEAK_CHAINS_U8; c++) acc[c] = (vi){0};
        for (int64_t i = 0; i < iters; i++)
            for (int c = 0; c < PEAK_CHAINS_U8; c++) {
                IN_REGISTER(u);  /* a product per chain, as above */
                acc[c] += u * s;
            }
        for (int c = 0; c < PEAK_CHAINS_U8; c++) keep += acc[c][0];
        per_step = (double)VL * PEAK_CHAINS_U8 / PEAK_CHAINS;
#endif
        total += (double)iters * PEAK_CHAINS * per_step + (keep == 1);
    }
    return total;
}
