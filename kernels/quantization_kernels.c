/* Weight-only INT8 / INT4 linear layers and a bf16/fp16 GEMV for the CPU, in the THUDM weight layout.
 *
 *   y[b, o] = scale[o] * sum_i x[b, i] * q[o, i] + bias[o]
 *
 * q is int8 [n, k], or int4 packed two per byte [n, k/2] with the even column in the HIGH nibble (signed
 * nibbles). Every kernel reads each weight row from memory once per call and reuses it for every row of x
 * (decode and small batches are memory-bound: the weights are the traffic). Output rows are split across
 * OpenMP threads.
 *
 * Two families of quantized kernels:
 *   w8_linear / w4_linear      "q" kernels: x is first quantized to int8 per block of QB = 64 columns
 *                              (symmetric, scale = max|x| / 127 per block, round half away from zero), then
 *                              the dot products are exact integer sums (AVX2: maddubs / madd), scaled per
 *                              block in fp32. Activation rounding costs ~0.3% relative error; the integer
 *                              work is what makes INT4 memory-bound.
 *   w8_linear_f / w4_linear_f  float kernels: exact fp32 products (the previous behaviour).
 * The INT4 q kernel reads THUDM's packed bytes directly: the activations are quantized with each 64-column
 * block stored as its 32 even columns then its 32 odd ones, so the high nibbles of 32 weight bytes meet the
 * even half and the low nibbles the odd half. Signed nibbles become unsigned by XOR 0x88 (s + 8), and the
 * +8 is taken back once per x row: sum_i (s_i + 8) x_i - 8 sum_i x_i.
 *
 * SIMD paths are compiled only with __AVX2__ and __FMA__ (-march=native on such a CPU) and not with
 * -DCHATGLM_PORTABLE; the portable C path computes the same integers and runs on any CPU.
 * Build: gcc -O3 -fPIC -shared -fopenmp -std=c99 [-march=native]
 */
#define _DEFAULT_SOURCE /* syscall() */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && !defined(CHATGLM_PORTABLE)
#define USE_AVX2 1
#include <immintrin.h>
#endif
#if defined(__F16C__) && defined(USE_AVX2)
#define USE_F16C 1
#endif
/* AVX-512 with VNNI (vpdpbusd: u8 x s8 products summed four at a time into int32, one instruction where AVX2
 * needs maddubs + madd + add): the INT4 kernels read two 64-column blocks per 512-bit load. */
#if defined(USE_F16C) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define USE_VNNI512 1
#endif
/* Where the VNNI decode kernels prefetch the weight rows ahead: into L2 (T1). Measured on a Zen 4, 2 threads, cold
 * INT4 weights at m = 1: 30-32 GB/s at every shape against 22-27 GB/s into L1 (T0); docs/benchmarks.md. */
#ifndef VNNI_PREFETCH
#define VNNI_PREFETCH _MM_HINT_T1
#endif
/* AMX int8 tiles (Intel Sapphire Rapids and later, with -march=native there): the GEMM for many rows multiplies
 * 16 x rows by 32 weight rows per 64-column block in two tile instructions. Linux hands the tile registers to a
 * process only once it asks (arch_prctl); wq_gemm asks once and keeps to the VNNI code where that is refused. */
#if defined(USE_VNNI512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define USE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

void set_num_threads(int n) {
#ifdef _OPENMP
    omp_set_num_threads(n);
#else
    (void)n;
#endif
}

int get_num_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Which SIMD path this build has: 0 portable C, 2 AVX2+FMA (+F16C: 3; 4 when the compiler may also use
 * AVX-512 for the code around the intrinsics, as -march=native does on such a CPU; 5 with the AVX-512 VNNI
 * INT4 kernels; 6 with those and the AMX int8 GEMM). */
int simd_level(void) {
#if defined(USE_AMX)
    return 6;
#elif defined(USE_VNNI512)
    return 5;
#elif defined(USE_F16C) && defined(__AVX512F__)
    return 4;
#elif defined(USE_F16C)
    return 3;
#elif defined(USE_AVX2)
    return 2;
#else
    return 0;
#endif
}

/* Rows of the weight per task: they share each load of x. */
#define ROWS 4
/* A call with less work than this (multiply-adds) runs on the calling thread alone: waking the OpenMP workers costs
 * more than it saves there, and on 2 cores the woken workers then spin beside the threads serving requests (a tiny
 * model's one-row layers are 8-40 K multiply-adds: one streaming client of the tiny model through openai_api.py
 * cost its server 1.1-1.9 ms of CPU a token with a worker spinning, 0.64 without; a 6B model's are 18 M+). */
#define PAR_MIN_WORK 65536
#define PAR_IF(work) if ((double)(work) >= PAR_MIN_WORK)
/* Activation quantization block, in columns of x. */
#define QB 64

/* ------------------------------------------------------------------------------------------------------- */
/* Activation quantization                                                                                  */

/* Round half to even (the default rounding mode, as torch.round and cvtps2dq): exact for |v| < 2^22. */
static inline float round_even(float v) {
    const float magic = 12582912.f; /* 1.5 * 2^23 */
    float t = v + magic; /* two IEEE roundings (no -ffast-math here) */
    return t - magic;
}

/* One block of c <= QB columns: q[0, QB) in column order (padding zero), or with split the even columns then the
 * odd ones; returns the scale, *sum = sum(q). */
static float quantize_block(const float *xb, int c, int split, int8_t *q, int *sum) {
#ifdef USE_AVX2
    if (c == QB) {
        const __m256 sign = _mm256_set1_ps(-0.f);
        __m256 v[8], mx = _mm256_setzero_ps();
        for (int i = 0; i < 8; i++) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float s = _mm_cvtss_f32(m4) / 127.f;
        __m256 inv = _mm256_set1_ps(s > 0.f ? 1.f / s : 0.f);
        const __m256i lim = _mm256_set1_epi32(127), nlim = _mm256_set1_epi32(-127);
        __m256i r[8], acc = _mm256_setzero_si256();
        for (int i = 0; i < 8; i++) {
            r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
            r[i] = _mm256_max_epi32(_mm256_min_epi32(r[i], lim), nlim);
            acc = _mm256_add_epi32(acc, r[i]);
        }
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        const __m256i parity = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8,
                                                10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        __m256i p[2];
        for (int h = 0; h < 2; h++) {
            __m256i a = _mm256_packs_epi32(r[4 * h], r[4 * h + 1]), b = _mm256_packs_epi32(r[4 * h + 2], r[4 * h + 3]);
            p[h] = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order); /* columns 32h .. 32h + 31 */
            if (split) /* per 16 columns: 8 even then 8 odd; then per 32: 16 even, 16 odd */
                p[h] = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(p[h], parity), 0xD8);
        }
        if (split) {
            __m256i even = _mm256_permute2x128_si256(p[0], p[1], 0x20), odd = _mm256_permute2x128_si256(p[0], p[1], 0x31);
            p[0] = even, p[1] = odd;
        }
        _mm256_storeu_si256((__m256i *)q, p[0]);
        _mm256_storeu_si256((__m256i *)(q + 32), p[1]);
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        *sum = _mm_cvtsi128_si32(s4);
        return s;
    }
#endif
    float amax = 0.f;
    for (int i = 0; i < c; i++) {
        float a = xb[i] < 0.f ? -xb[i] : xb[i];
        amax = a > amax ? a : amax;
    }
    float s = amax / 127.f;
    float inv = s > 0.f ? 1.f / s : 0.f;
    int total = 0;
    for (int i = 0; i < QB; i++) {
        int r = i < c ? (int)round_even(xb[i] * inv) : 0;
        r = r > 127 ? 127 : (r < -127 ? -127 : r);
        q[split ? (i & 1) * (QB / 2) + i / 2 : i] = (int8_t)r;
        total += r;
    }
    *sum = total;
    return s;
}

/* x [k] -> q [nb * QB] int8 and d [nb] fp32 (nb = ceil(k / QB)): per block, scale = max|x| / 127 and
 * q = round_half_even(x * (1 / scale)) (zero for padding). With split, each block is stored as its even
 * columns then its odd ones (the INT4 order). Returns sum over the blocks before `full` of d[b] * sum(q). */
static float quantize_row(const float *x, int k, int split, int full, int8_t *q, float *d) {
    int nb = (k + QB - 1) / QB;
    float total = 0.f;
    for (int b = 0; b < nb; b++) {
        int c0 = b * QB, c = k - c0 < QB ? k - c0 : QB, sum;
        float s = quantize_block(x + c0, c, split, q + (size_t)b * QB, &sum);
        d[b] = s;
        if (b < full) total += s * (float)sum;
    }
    return total;
}

/* Exposed for the tests: the activation quantization exactly as the q kernels do it. */
void quantize_activations(const float *x, int8_t *q, float *d, int m, int k, int split) {
    int nb = (k + QB - 1) / QB;
    for (int b = 0; b < m; b++)
        quantize_row(x + (size_t)b * k, k, split, 0, q + (size_t)b * nb * QB, d + (size_t)b * nb);
}

/* Portable block dots (exact integers). INT4: bytes [j0, j1) of a row against block-local q (even | odd). */
static int dot4_block(const int8_t *row, const int8_t *qb, int j0, int j1) {
    int s = 0;
    for (int j = j0; j < j1; j++) {
        int8_t byte = row[j];
        int hi = byte >> 4;
        int lo = (int8_t)(byte << 4) >> 4;
        s += hi * qb[j - j0] + lo * qb[QB / 2 + j - j0];
    }
    return s;
}

static int dot8_block(const int8_t *row, const int8_t *qb, int c) {
    int s = 0;
    for (int i = 0; i < c; i++) s += row[i] * qb[i];
    return s;
}

#ifdef USE_AVX2
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 packed bytes (64 columns) against the block's even / odd int8 activations: 8 int32 partial sums of
 * sum (s + 8) * x. */
static inline __m256i dot4_avx2(const int8_t *wp, __m256i xe, __m256i xo) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)wp), _mm256_set1_epi8((char)0x88));
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m4);
    __m256i lo = _mm256_and_si256(w, m4);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(hi, xe), _mm256_maddubs_epi16(lo, xo));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

/* 64 int8 weights against 64 int8 activations: |w| * sign(x, w), exact for w in [-128, 127], x in [-127, 127]. */
static inline __m256i dot8_avx2(const int8_t *wp, const int8_t *qp) {
    __m256i w0 = _mm256_loadu_si256((const __m256i *)wp), w1 = _mm256_loadu_si256((const __m256i *)(wp + 32));
    __m256i x0 = _mm256_loadu_si256((const __m256i *)qp), x1 = _mm256_loadu_si256((const __m256i *)(qp + 32));
    __m256i p0 = _mm256_maddubs_epi16(_mm256_abs_epi8(w0), _mm256_sign_epi8(x0, w0));
    __m256i p1 = _mm256_maddubs_epi16(_mm256_abs_epi8(w1), _mm256_sign_epi8(x1, w1));
    const __m256i one = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(p0, one), _mm256_madd_epi16(p1, one));
}
#endif

/* sums[r] = sum over blocks of d * dot for R rows starting at w (row stride `stride` bytes), one x row. */
static inline void q4_rows(const int8_t *w, size_t stride, int R, const int8_t *q, const float *d, float corr,
                           int k, float *sums) {
    int h = k / 2, nb = (k + QB - 1) / QB;
    int b0 = 0;
#ifdef USE_AVX2
    int full = h / (QB / 2);
    if (R == ROWS) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const int8_t *r0 = w, *r1 = w + stride, *r2 = w + 2 * stride, *r3 = w + 3 * stride;
        /* The next 4 rows (contiguous after these): 128 bytes of them per block, so they are in cache when their
         * turn comes. Rows of 2 KB are too short streams for the hardware prefetcher to reach full bandwidth. */
        const char *pf = (const char *)(w + 2 * ROWS * stride);
        for (int b = 0; b < full; b++) {
            _mm_prefetch(pf + (size_t)b * 128, _MM_HINT_T0);
            _mm_prefetch(pf + (size_t)b * 128 + 64, _MM_HINT_T0);
            __m256i xe = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB));
            __m256i xo = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB + 32));
            __m256 db = _mm256_set1_ps(d[b]);
            size_t off = (size_t)b * 32;
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(r0 + off, xe, xo)), db, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(r1 + off, xe, xo)), db, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(r2 + off, xe, xo)), db, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(r3 + off, xe, xo)), db, a3);
        }
        sums[0] = hsum256(a0) - 8.f * corr, sums[1] = hsum256(a1) - 8.f * corr;
        sums[2] = hsum256(a2) - 8.f * corr, sums[3] = hsum256(a3) - 8.f * corr;
    } else {
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_setzero_ps();
            const int8_t *row = w + r * stride;
            for (int b = 0; b < full; b++) {
                __m256i xe = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB));
                __m256i xo = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB + 32));
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(row + (size_t)b * 32, xe, xo)),
                                    _mm256_set1_ps(d[b]), a);
            }
            sums[r] = hsum256(a) - 8.f * corr;
        }
    }
    b0 = full;
#else
    (void)corr;
    for (int r = 0; r < R; r++) sums[r] = 0.f;
#endif
    for (int r = 0; r < R; r++) {
        const int8_t *row = w + r * stride;
        float a = 0.f;
        for (int b = b0; b < nb; b++) {
            int j0 = b * (QB / 2), j1 = j0 + QB / 2 < h ? j0 + QB / 2 : h;
            a += d[b] * (float)dot4_block(row, q + (size_t)b * QB, j0, j1);
        }
        sums[r] += a;
    }
}

static inline void q8_rows(const int8_t *w, size_t stride, int R, const int8_t *q, const float *d, int k,
                           float *sums) {
    int nb = (k + QB - 1) / QB;
    int b0 = 0;
#ifdef USE_AVX2
    int full = k / QB;
    if (R == ROWS) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        const int8_t *r0 = w, *r1 = w + stride, *r2 = w + 2 * stride, *r3 = w + 3 * stride;
        const char *pf = (const char *)(w + 2 * ROWS * stride); /* the next 4 rows, 256 bytes per block (as q4_rows) */
        for (int b = 0; b < full; b++) {
            for (int l = 0; l < 4; l++) _mm_prefetch(pf + (size_t)b * 256 + 64 * l, _MM_HINT_T0);
            const int8_t *qb = q + (size_t)b * QB;
            __m256 db = _mm256_set1_ps(d[b]);
            size_t off = (size_t)b * QB;
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8_avx2(r0 + off, qb)), db, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8_avx2(r1 + off, qb)), db, a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8_avx2(r2 + off, qb)), db, a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8_avx2(r3 + off, qb)), db, a3);
        }
        sums[0] = hsum256(a0), sums[1] = hsum256(a1), sums[2] = hsum256(a2), sums[3] = hsum256(a3);
    } else {
        for (int r = 0; r < R; r++) {
            __m256 a = _mm256_setzero_ps();
            const int8_t *row = w + r * stride;
            for (int b = 0; b < full; b++)
                a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8_avx2(row + (size_t)b * QB, q + (size_t)b * QB)),
                                    _mm256_set1_ps(d[b]), a);
            sums[r] = hsum256(a);
        }
    }
    b0 = full;
#else
    for (int r = 0; r < R; r++) sums[r] = 0.f;
#endif
    for (int r = 0; r < R; r++) {
        const int8_t *row = w + r * stride;
        float a = 0.f;
        for (int b = b0; b < nb; b++) {
            int c = k - b * QB < QB ? k - b * QB : QB;
            a += d[b] * (float)dot8_block(row + (size_t)b * QB, q + (size_t)b * QB, c);
        }
        sums[r] += a;
    }
}

#ifdef USE_AVX2
/* INT4 with several x rows (prefill, batches): the 4 weight rows of a group are unpacked once into u (per
 * 64-column block: the 32 high nibbles, then the 32 low ones, each made unsigned by XOR 0x88, i.e. s + 8), so
 * each x row then costs two loads and two maddubs per 32 weight bytes instead of the whole nibble unpacking.
 * Full 64-column blocks only (k % 64 == 0). */
static inline void q4_unpack_rows(const int8_t *w, size_t stride, int full, uint8_t *u) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
    for (int r = 0; r < ROWS; r++)
        for (int b = 0; b < full; b++) {
            __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + r * stride + (size_t)b * 32)), flip);
            uint8_t *ub = u + ((size_t)r * full + b) * QB;
            _mm256_storeu_si256((__m256i *)ub, _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
            _mm256_storeu_si256((__m256i *)(ub + 32), _mm256_and_si256(v, m4));
        }
}

static inline void q4u_rows(const uint8_t *u, int full, const int8_t *q, const float *d, float corr, float *sums) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const size_t rs = (size_t)full * QB;
    for (int b = 0; b < full; b++) {
        __m256i xe = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB));
        __m256i xo = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB + 32));
        __m256 db = _mm256_set1_ps(d[b]);
        const uint8_t *ub = u + (size_t)b * QB;
#define Q4U_ROW(a, r)                                                                                          \
    a = _mm256_fmadd_ps(                                                                                       \
        _mm256_cvtepi32_ps(_mm256_madd_epi16(                                                                  \
            _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(ub + (r) * rs)), xe),   \
                             _mm256_maddubs_epi16(_mm256_loadu_si256((const __m256i *)(ub + (r) * rs + 32)), xo)), \
            one)),                                                                                             \
        db, a)
        Q4U_ROW(a0, 0);
        Q4U_ROW(a1, 1);
        Q4U_ROW(a2, 2);
        Q4U_ROW(a3, 3);
#undef Q4U_ROW
    }
    sums[0] = hsum256(a0) - 8.f * corr, sums[1] = hsum256(a1) - 8.f * corr;
    sums[2] = hsum256(a2) - 8.f * corr, sums[3] = hsum256(a3) - 8.f * corr;
}

/* The same for two x rows at once (q0/d0/c0 and q1/d1/c1): each unpacked weight vector is loaded once for both,
 * and eight independent accumulators keep the multiply units busy. */
static inline void q4u_rows2(const uint8_t *u, int full, const int8_t *q0, const float *d0, float c0,
                             const int8_t *q1, const float *d1, float c1, float *s0, float *s1, const int8_t *pf,
                             size_t stride) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const size_t rs = (size_t)full * QB;
    for (int b = 0; b < full; b++) {
        if (pf && !(b & 1)) /* the next group's packed rows into L2, a cache line of each per two blocks */
            for (int r = 0; r < ROWS; r++) _mm_prefetch((const char *)(pf + r * stride + (size_t)b * 32), _MM_HINT_T1);
        const __m256i *x0e = (const __m256i *)(q0 + (size_t)b * QB), *x0o = x0e + 1;
        const __m256i *x1e = (const __m256i *)(q1 + (size_t)b * QB), *x1o = x1e + 1;
        __m256 e0 = _mm256_set1_ps(d0[b]), e1 = _mm256_set1_ps(d1[b]);
        const uint8_t *ub = u + (size_t)b * QB;
#define Q4U_ROW2(a, c, r)                                                                                      \
    do {                                                                                                       \
        __m256i hi = _mm256_loadu_si256((const __m256i *)(ub + (r) * rs));                                     \
        __m256i lo = _mm256_loadu_si256((const __m256i *)(ub + (r) * rs + 32));                                \
        __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(x0e)),                        \
                                     _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x0o)));                       \
        __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256(x1e)),                        \
                                     _mm256_maddubs_epi16(lo, _mm256_loadu_si256(x1o)));                       \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, one)), e0, a);                             \
        c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(t, one)), e1, c);                             \
    } while (0)
        Q4U_ROW2(a0, b0, 0);
        Q4U_ROW2(a1, b1, 1);
        Q4U_ROW2(a2, b2, 2);
        Q4U_ROW2(a3, b3, 3);
#undef Q4U_ROW2
    }
    s0[0] = hsum256(a0) - 8.f * c0, s0[1] = hsum256(a1) - 8.f * c0;
    s0[2] = hsum256(a2) - 8.f * c0, s0[3] = hsum256(a3) - 8.f * c0;
    s1[0] = hsum256(b0) - 8.f * c1, s1[1] = hsum256(b1) - 8.f * c1;
    s1[2] = hsum256(b2) - 8.f * c1, s1[3] = hsum256(b3) - 8.f * c1;
}

/* INT8 with two x rows per pass over a group of 4 weight rows (prefill, batches): |w| once for both rows, eight
 * independent accumulators. Full 64-column blocks only. */
static inline void q8_rows2(const int8_t *w, size_t stride, int full, const int8_t *q0, const float *d0,
                            const int8_t *q1, const float *d1, float *s0, float *s1) {
    const __m256i one = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const char *pf = (const char *)(w + 2 * ROWS * stride);
    for (int b = 0; b < full; b++) {
        for (int l = 0; l < 4; l++) _mm_prefetch(pf + (size_t)b * 256 + 64 * l, _MM_HINT_T0);
        const __m256i *x0 = (const __m256i *)(q0 + (size_t)b * QB), *x1 = (const __m256i *)(q1 + (size_t)b * QB);
        __m256 e0 = _mm256_set1_ps(d0[b]), e1 = _mm256_set1_ps(d1[b]);
        const int8_t *wb = w + (size_t)b * QB;
#define Q8_ROW2(a, c, r)                                                                                       \
    do {                                                                                                       \
        __m256i w0 = _mm256_loadu_si256((const __m256i *)(wb + (r) * stride));                                 \
        __m256i w1 = _mm256_loadu_si256((const __m256i *)(wb + (r) * stride + 32));                            \
        __m256i u0 = _mm256_abs_epi8(w0), u1 = _mm256_abs_epi8(w1);                                            \
        __m256i p = _mm256_add_epi32(                                                                          \
            _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(_mm256_loadu_si256(x0), w0)), one),    \
            _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(_mm256_loadu_si256(x0 + 1), w1)), one)); \
        __m256i t = _mm256_add_epi32(                                                                          \
            _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_sign_epi8(_mm256_loadu_si256(x1), w0)), one),    \
            _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_sign_epi8(_mm256_loadu_si256(x1 + 1), w1)), one)); \
        a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), e0, a);                                                     \
        c = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), e1, c);                                                     \
    } while (0)
        Q8_ROW2(a0, b0, 0);
        Q8_ROW2(a1, b1, 1);
        Q8_ROW2(a2, b2, 2);
        Q8_ROW2(a3, b3, 3);
#undef Q8_ROW2
    }
    s0[0] = hsum256(a0), s0[1] = hsum256(a1), s0[2] = hsum256(a2), s0[3] = hsum256(a3);
    s1[0] = hsum256(b0), s1[1] = hsum256(b1), s1[2] = hsum256(b2), s1[3] = hsum256(b3);
}
#endif

#ifdef USE_AVX2
/* INT4 decode (one x row): 8 weight rows per pass, so each activation load and block scale serves twice as many
 * rows as q4_rows and eight independent accumulators hide the multiply latencies. Full 64-column blocks. */
static inline void q4_rows8(const int8_t *w, size_t stride, const int8_t *q, const float *d, float corr, int full,
                            float *sums) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    const char *pf = (const char *)(w + 16 * stride); /* the group of 8 rows after the next, 256 bytes a block */
    for (int b = 0; b < full; b++) {
        for (int l = 0; l < 4; l++) _mm_prefetch(pf + (size_t)b * 256 + 64 * l, _MM_HINT_T0);
        __m256i xe = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB));
        __m256i xo = _mm256_loadu_si256((const __m256i *)(q + (size_t)b * QB + 32));
        __m256 db = _mm256_set1_ps(d[b]);
        const int8_t *wb = w + (size_t)b * 32;
#define Q4_ROW8(a, r) a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot4_avx2(wb + (r) * stride, xe, xo)), db, a)
        Q4_ROW8(a0, 0);
        Q4_ROW8(a1, 1);
        Q4_ROW8(a2, 2);
        Q4_ROW8(a3, 3);
        Q4_ROW8(a4, 4);
        Q4_ROW8(a5, 5);
        Q4_ROW8(a6, 6);
        Q4_ROW8(a7, 7);
#undef Q4_ROW8
    }
    float c = 8.f * corr;
    sums[0] = hsum256(a0) - c, sums[1] = hsum256(a1) - c, sums[2] = hsum256(a2) - c, sums[3] = hsum256(a3) - c;
    sums[4] = hsum256(a4) - c, sums[5] = hsum256(a5) - c, sums[6] = hsum256(a6) - c, sums[7] = hsum256(a7) - c;
}
#endif

/* x rows from which an AVX2 INT4 call unpacks each weight group once (q4_unpack_rows) rather than per x row
 * (AVX-512 VNNI builds take wq_rows_bs / wq_rows_lanes below instead). */
#ifndef Q4_UNPACK_MIN_ROWS
#define Q4_UNPACK_MIN_ROWS 4
#endif

/* One x row's outputs o0 .. o0 + rows - 1: the integer-kernel sums times the weight scale, plus the bias. */
static inline void store_outputs(float *yrow, const float *sums, const float *scale, const float *bias, int o0,
                                 int rows) {
    for (int r = 0; r < rows; r++) yrow[o0 + r] = sums[r] * scale[o0 + r] + (bias ? bias[o0 + r] : 0.f);
}

#ifdef USE_VNNI512
/* The activations of one x row rearranged for 512-bit INT4 work: per pair of 64-column blocks (2p, 2p + 1), the 32
 * even columns of both, then the 32 odd ones of both (128 bytes). */
static void vnni_pairs(const int8_t *q, int pairs, int8_t *q2) {
    for (int p = 0; p < pairs; p++) {
        const int8_t *b0 = q + (size_t)(2 * p) * QB, *b1 = b0 + QB;
        int8_t *o = q2 + (size_t)p * 128;
        memcpy(o, b0, 32), memcpy(o + 32, b1, 32), memcpy(o + 64, b0 + 32, 32), memcpy(o + 96, b1 + 32, 32);
    }
}

/* INT4 and INT8 for one or two x rows ("block sums"), with the arithmetic of the GEMM (gemm_tile), of the lanes
 * kernels below and of the AMX kernels, so that a row gets the same bits alone as in any batch: 8 weight rows per
 * pass (read in place, a 512-bit vector of one row at a time), two blocks per step, each block's integer sum
 * completed first (the 8 rows' vpdpbusd lanes transposed and added, bs_reduce8) and then added as
 * acc = cvt(sum) * d + acc, block after block. At one or two x rows this costs what the old per-row kernels did
 * (decode stays at the memory's speed); from three rows the lanes kernels are faster. INT4 (q4_rows8_bs): the
 * nibbles unpacked in registers, x in vnni_pairs order; f, fb: the 8 rows' sums (ymm), before the -8 * corr. */
static inline __m512i bs_reduce8(const __m512i *t) {
    __m512i r[2];
    for (int h = 0; h < 2; h++) {
        const __m512i *u = t + 4 * h;
        __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(u[0], u[1]), _mm512_unpackhi_epi32(u[0], u[1]));
        __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(u[2], u[3]), _mm512_unpackhi_epi32(u[2], u[3]));
        r[h] = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    } /* r[h], per 128-bit lane L: the sums of lane L of rows 4h .. 4h + 3 */
    __m512i s = _mm512_add_epi32(_mm512_shuffle_i32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_i32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
    /* s: [first block rows 0-3, second block rows 0-3, first block rows 4-7, second block rows 4-7] */
    return _mm512_shuffle_i32x4(s, s, _MM_SHUFFLE(3, 1, 2, 0));
}

/* a + the 8 rows' sums of two blocks (bs_reduce8 of t), each block's times its activation scale (d[0], d[1]), in
 * block order. */
static inline __m256 bs_accumulate(const __m512i *t, const float *d, __m256 a) {
    __m512 s = _mm512_cvtepi32_ps(bs_reduce8(t));
    a = _mm256_fmadd_ps(_mm512_castps512_ps256(s), _mm256_set1_ps(d[0]), a);
    return _mm256_fmadd_ps(_mm512_extractf32x8_ps(s, 1), _mm256_set1_ps(d[1]), a);
}

static inline void q4_rows8_bs(const int8_t *w, size_t stride, const int8_t *q2, const float *d, const int8_t *q2b,
                               const float *db, int pairs, __m256 *f, __m256 *fb) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x88);
    __m256 a = _mm256_setzero_ps(), c = a;
    const char *pf = (const char *)(w + 16 * stride);
    for (int p = 0; p < pairs; p++) {
        for (int l = 0; l < 8; l++) _mm_prefetch(pf + (size_t)p * 512 + 64 * l, VNNI_PREFETCH);
        __m512i xe = _mm512_loadu_si512((const void *)(q2 + (size_t)p * 128));
        __m512i xo = _mm512_loadu_si512((const void *)(q2 + (size_t)p * 128 + 64));
        __m512i ye = xe, yo = xo;
        if (q2b) {
            ye = _mm512_loadu_si512((const void *)(q2b + (size_t)p * 128));
            yo = _mm512_loadu_si512((const void *)(q2b + (size_t)p * 128 + 64));
        }
        __m512i t[8], u[8];
        const int8_t *wb = w + (size_t)p * 64;
        for (int r = 0; r < 8; r++) {
            __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + r * stride)), flip);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), lo = _mm512_and_si512(v, m4);
            t[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xe), lo, xo);
            if (q2b) u[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, ye), lo, yo);
        }
        a = bs_accumulate(t, d + 2 * p, a);
        if (q2b) c = bs_accumulate(u, db + 2 * p, c);
    }
    *f = a;
    if (q2b) *fb = c;
}

/* INT8 as q4_rows8_bs: 8 weight rows (w + 128 as unsigned bytes, read in place) per pass, two blocks per step,
 * each row's two 16-lane vpdpbusd results folded to [first block, 8 lanes | second block, 8 lanes] so that
 * bs_reduce8 completes both blocks' sums; then acc = cvt(sum) * d + acc, block after block. The x rows in natural
 * column order (q, q2: k bytes each, or q2 NULL). f, fb: the 8 rows' sums, before the -128 * corr. */
static inline __m512i bs_fold(__m512i u, __m512i v) {
    return _mm512_add_epi32(_mm512_shuffle_i32x4(u, v, _MM_SHUFFLE(1, 0, 1, 0)),
                            _mm512_shuffle_i32x4(u, v, _MM_SHUFFLE(3, 2, 3, 2)));
}

static inline void q8_rows8_bs(const int8_t *w, size_t stride, const int8_t *q, const float *d, const int8_t *q2,
                               const float *d2, int pairs, __m256 *f, __m256 *fb) {
    const __m512i flip = _mm512_set1_epi8((char)0x80), z = _mm512_setzero_si512();
    __m256 a = _mm256_setzero_ps(), c = a;
    const char *pf = (const char *)(w + 16 * stride);
    for (int p = 0; p < pairs; p++) {
        for (int l = 0; l < 16; l++) _mm_prefetch(pf + (size_t)p * 1024 + 64 * l, VNNI_PREFETCH);
        const int8_t *qp = q + (size_t)p * 128, *qp2 = q2 ? q2 + (size_t)p * 128 : NULL;
        __m512i x0 = _mm512_loadu_si512((const void *)qp), x1 = _mm512_loadu_si512((const void *)(qp + 64));
        __m512i y0 = x0, y1 = x1;
        if (q2) y0 = _mm512_loadu_si512((const void *)qp2), y1 = _mm512_loadu_si512((const void *)(qp2 + 64));
        __m512i t[8], u[8];
        const int8_t *wb = w + (size_t)p * 128;
        for (int r = 0; r < 8; r++) {
            __m512i v0 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + r * stride)), flip);
            __m512i v1 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(wb + r * stride + 64)), flip);
            t[r] = bs_fold(_mm512_dpbusd_epi32(z, v0, x0), _mm512_dpbusd_epi32(z, v1, x1));
            if (q2) u[r] = bs_fold(_mm512_dpbusd_epi32(z, v0, y0), _mm512_dpbusd_epi32(z, v1, y1));
        }
        a = bs_accumulate(t, d + 2 * p, a);
        if (q2) c = bs_accumulate(u, d2 + 2 * p, c);
    }
    *f = a;
    if (q2) *fb = c;
}

/* INT4 or INT8, few x rows, n % 8 == 0 and an even number of 64-column blocks (every ChatGLM shape):
 * q4_rows8_bs / q8_rows8_bs, two x rows per pass. */
static int wq_rows_bs(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                      int n, int k, int bits) {
    int nb = k / QB, pairs = nb / 2;
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    int8_t *q = (int8_t *)malloc((size_t)m * k + 64);
    int8_t *q2 = bits == 4 ? (int8_t *)malloc((size_t)m * k + 64) : q; /* INT4: vnni_pairs order (k bytes a row) */
    float *d = (float *)malloc(((size_t)m * nb + 1) * sizeof(float));
    float *corr = (float *)malloc(((size_t)m + 1) * sizeof(float));
    if (!q || !q2 || !d || !corr) {
        free(q), free(d), free(corr);
        if (bits == 4) free(q2);
        return -1;
    }
    for (int b = 0; b < m; b++) {
        corr[b] = quantize_row(x + (size_t)b * k, k, bits == 4, nb, q + (size_t)b * k, d + (size_t)b * nb);
        if (bits == 4)
            vnni_pairs(q + (size_t)b * k, pairs, q2 + (size_t)b * k);
    }
    const float off = bits == 4 ? 8.f : 128.f;
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int o0 = 0; o0 < n; o0 += 8) {
        const int8_t *wr = w + (size_t)o0 * stride;
        __m256 sc = _mm256_loadu_ps(scale + o0), bi = bias ? _mm256_loadu_ps(bias + o0) : _mm256_setzero_ps();
        for (int b = 0; b < m; b += 2) {
            int two = b + 1 < m;
            const int8_t *qa = q2 + (size_t)b * k, *qb = two ? qa + k : NULL;
            const float *da = d + (size_t)b * nb, *db = two ? da + nb : NULL;
            __m256 f[2];
            if (bits == 4)
                q4_rows8_bs(wr, stride, qa, da, qb, db, pairs, &f[0], &f[1]);
            else
                q8_rows8_bs(wr, stride, qa, da, qb, db, pairs, &f[0], &f[1]);
            for (int i = 0; i <= two; i++) {
                __m256 c = _mm256_set1_ps(off * corr[b + i]);
                _mm256_storeu_ps(y + (size_t)(b + i) * n + o0, _mm256_fmadd_ps(_mm256_sub_ps(f[i], c), sc, bi));
            }
        }
    }
    free(q), free(d), free(corr);
    if (bits == 4) free(q2);
    return 0;
}
#endif

#ifdef USE_AMX
static int amx_enabled, amx_granted(void);
static int wq_rows_amx(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                       int n, int k, int bits);
#endif

#ifdef USE_AVX2
#ifndef XPAD /* bytes between quantized x rows beyond k: rows 4 KB apart share L1 sets (INT8 65024 x 4096, 8 rows: 5%) */
#define XPAD 256
#endif
/* The lanes16 layout (wq_rows_packed): each thread reads its groups as one sequential stream, prefetched this many
 * bytes ahead into L2. Up to `few` x rows (memory-bound; VNNI 2, AVX2 1): 1 KB; more (compute-bound, x rows to keep
 * in L1): 8 KB.
 * Measured on a Zen 4, 2 threads, ChatGLM2 shapes at 8 rows: INT8 65024 x 4096 5.6 ms at 8 or 16 KB ahead, 5.7 at
 * 6 KB, 6.8 at 4 KB (INT4 the same from 4 KB on); 2 KB ahead costs 10-35%, no prefetch 45-60%, T0 hints 10-25%;
 * at one or two rows T0 or 512 bytes ahead cost up to 5%. */
#ifndef AHEAD_FEW
#define AHEAD_FEW 1024
#endif
#ifndef AHEAD_MANY
#define AHEAD_MANY 8192
#endif
#define PACKED_PREFETCH(src, i, nx, few)                                                                       \
    _mm_prefetch((const char *)((src) + ((nx) <= (few) ? AHEAD_FEW : AHEAD_MANY) + 64 * (i)), _MM_HINT_T1)
#endif

#ifdef USE_VNNI512
/* The "lanes" kernels (AVX-512 VNNI builds; on AMX builds with the tiles switched off): INT4 and INT8 for 3 x rows
 * and more (decode batches, below the GEMM's row count), with the GEMM's arithmetic. Per 64-column block, 16
 * weight rows are read in place and transposed in registers so that each 512-bit vector holds 4 columns of the 16
 * rows (one row per int32 lane); one vpdpbusd per 4 columns and x row, with the x row's 4 int8 activations as an
 * embedded broadcast, so the 16 rows' exact integer sums of the block come out in the lanes with no horizontal
 * reduction and the transposition is shared by all the x rows of a pass (the kernels they replace spent a
 * conversion and an fma per row, block and x row, and unpacked the weights again for every pair of x rows). The
 * sums are then scaled and added as gemm_tile does (acc = cvt(sum) * d + acc, block after block;
 * y = (acc - off * corr) * scale + bias), so a row gets the bits it gets alone (wq_rows_bs), in any batch, and in
 * the GEMM. Measured on a Zen 4 (2 threads, weights from memory), a ChatGLM2 block's four INT4 matrices / the
 * 65024 x 4096 INT8 output layer at 8 rows: 6.8-7.1 / 13.0-13.7 ms against 9.2-9.7 / 15.5-16.1 with the kernels
 * replaced; at 3-4 rows INT4 15-25% faster, INT8 about even; one or two rows: wq_rows_bs, as fast as before.
 * Weights stored transposed so ("lanes16", wq_rows_packed; what a model loaded for such a CPU holds) skip the
 * transposition, whose shuffles took the dot products' cycles: at 8 rows 2.3 ms against 3.0 (INT4 4096 -> 27392)
 * and 5.6 against 9.5 (the INT8 output layer), and they take every row count, prompts too. */
#ifndef LANES_MIN_ROWS
#define LANES_MIN_ROWS 3 /* x rows from which the lanes kernels take over from wq_rows_bs (INT4 and INT8) */
#endif
#define LX 8 /* x rows per pass over a group of 16 weight rows */

/* 8x8 dword transposes in both 256-bit halves of a[0..7] (a[i] = [row i | row i + 8], 8 dwords each) -> a[g] = dword
 * g of rows 0 .. 15, row order in the lanes. */
static inline __attribute__((always_inline)) void lanes_transpose(__m512i *a) {
    __m512i t[8], u[8];
    for (int i = 0; i < 8; i += 2)
        t[i] = _mm512_unpacklo_epi32(a[i], a[i + 1]), t[i + 1] = _mm512_unpackhi_epi32(a[i], a[i + 1]);
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]), u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]), u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    /* u[j] (j < 4), 128-bit lanes: dword j of rows 0-3, dword j + 4 of rows 0-3, the same of rows 8-11; u[4 + j]: of
     * rows 4-7 and 12-15 */
    const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for (int j = 0; j < 4; j++) {
        a[j] = _mm512_permutex2var_epi64(u[j], lo, u[4 + j]);
        a[j + 4] = _mm512_permutex2var_epi64(u[j], hi, u[4 + j]);
    }
}

/* 16 rows (rows[i], i < 16) x 32 bytes at `off` -> a[0..7] as lanes_transpose expects. */
static inline __attribute__((always_inline)) void lanes_load(const int8_t *const *rows, size_t off, __m512i *a) {
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(rows[i] + off))),
                                  _mm256_loadu_si256((const __m256i *)(rows[i + 8] + off)), 1);
}

/* s[r] += the 16 rows' products of x row r (q + r * k, 4 bytes at o, broadcast) with wv: vpdpbusd with an
 * embedded broadcast (a separate broadcast costs the shuffle unit as much again; measured on a Zen 4). */
#define LANES_DP(s, wv, p) __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(s) : "v"(wv), "m"(*(const int32_t *)(p)))

/* One group of 16 weight rows (rows[], `pf`: the next group's rows, prefetched; or `gp`: the group in the lanes16
 * layout, whose 64-byte vectors are what the transposition makes of rows[]) against nx <= LX x rows (q: row
 * stride k bytes, k + XPAD here; INT4: split order, as the q kernels quantize; d: row stride nb). f[r]: the 16 sums of x row r.
 * Registers: the block's transposed weights and one integer sum per x row (more for one to three rows, so that
 * the dependent vpdpbusd overlap). */
static inline __attribute__((always_inline)) void lanes_group(const int8_t *const *rows, const int8_t *const *pf,
                                                              const int8_t *gp, int bits, const int8_t *q, size_t k,
                                                              const float *d, size_t nb, int nx, __m512 *f) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(bits == 4 ? (char)0x88 : (char)0x80);
    const int na = nx == 1 ? 4 : nx <= 3 ? 2 : 1; /* partial sums per x row (exact: any split gives the same sum) */
    for (int r = 0; r < nx; r++) f[r] = _mm512_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        __m512i v[16], s[LX < 4 ? 4 : LX]; /* INT4: v[0..7] */
        for (int r = 0; r < nx * na; r++) s[r] = _mm512_setzero_si512();
        const int8_t *qb = q + b * QB;
        /* lanes16: each vector straight from its load into its dot products (loading the block into v[] first
         * and sharing the loops below measured 1% slower for INT4 and 28% for INT8 at 8 rows: 7.1 against 5.5 ms) */
        if (gp && bits == 4) {
            const int8_t *src = gp + b * 512;
            for (int i = 0; i < 8; i++) PACKED_PREFETCH(src, i, nx, 2);
            for (int g = 0; g < 8; g++) {
                __m512i v8 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(src + 64 * g)), flip);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v8, 4), m4), lo = _mm512_and_si512(v8, m4);
                for (int r = 0; r < nx; r++) {
                    LANES_DP(s[r * na + (2 * g) % na], hi, qb + r * k + 4 * g);
                    LANES_DP(s[r * na + (2 * g + 1) % na], lo, qb + r * k + 32 + 4 * g);
                }
            }
        } else if (gp) {
            const int8_t *src = gp + b * 1024;
            for (int i = 0; i < 16; i++) PACKED_PREFETCH(src, i, nx, 2);
            for (int g = 0; g < 16; g++) {
                __m512i v8 = _mm512_xor_si512(_mm512_loadu_si512((const void *)(src + 64 * g)), flip);
                for (int r = 0; r < nx; r++) LANES_DP(s[r * na + g % na], v8, qb + r * k + 4 * g);
            }
        } else if (bits == 4) {
            size_t off = b * 32;
            if (pf && !(b & 1))
                for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(pf[i] + off), VNNI_PREFETCH);
            lanes_load(rows, off, v);
            for (int i = 0; i < 8; i++) v[i] = _mm512_xor_si512(v[i], flip);
            lanes_transpose(v);
            for (int g = 0; g < 8; g++) { /* dword g: columns 8g .. 8g + 7, high nibbles the even ones, which q
                                           * holds at 4g (split order), the odd ones at 32 + 4g */
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v[g], 4), m4), lo = _mm512_and_si512(v[g], m4);
                for (int r = 0; r < nx; r++) {
                    LANES_DP(s[r * na + (2 * g) % na], hi, qb + r * k + 4 * g);
                    LANES_DP(s[r * na + (2 * g + 1) % na], lo, qb + r * k + 32 + 4 * g);
                }
            }
        } else {
            size_t off = b * QB;
            if (pf)
                for (int i = 0; i < 16; i++) _mm_prefetch((const char *)(pf[i] + off), VNNI_PREFETCH);
            /* each row's 64 bytes in one load (rows 4 KB apart share an L1 set: 16 of them do not stay for a
             * second read), split into the halves lanes_transpose takes: v[i] columns 0-31, v[8 + i] 32-63 */
            for (int i = 0; i < 8; i++) {
                __m512i r0 = _mm512_loadu_si512((const void *)(rows[i] + off));
                __m512i r1 = _mm512_loadu_si512((const void *)(rows[i + 8] + off));
                v[i] = _mm512_xor_si512(_mm512_shuffle_i64x2(r0, r1, _MM_SHUFFLE(1, 0, 1, 0)), flip);
                v[8 + i] = _mm512_xor_si512(_mm512_shuffle_i64x2(r0, r1, _MM_SHUFFLE(3, 2, 3, 2)), flip);
            }
            for (int h = 0; h < 64; h += 32) {
                if (h) for (int i = 0; i < 8; i++) v[i] = v[8 + i];
                lanes_transpose(v);
                for (int g = 0; g < 8; g++) /* columns h + 4g .. h + 4g + 3 */
                    for (int r = 0; r < nx; r++) LANES_DP(s[r * na + g % na], v[g], qb + r * k + h + 4 * g);
            }
        }
        for (int r = 0; r < nx; r++) {
            __m512i t = s[r * na];
            for (int j = 1; j < na; j++) t = _mm512_add_epi32(t, s[r * na + j]);
            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_set1_ps(d[r * nb + b]), f[r]);
        }
    }
}

static void lanes_groups(const int8_t *const *rows, const int8_t *const *pf, const int8_t *gp, int bits,
                         const int8_t *q, size_t k, const float *d, size_t nb, int nx, __m512 *f) {
    switch (nx) { /* one instance per x-row count: f[] and the weight vectors stay in registers */
#define LANES_CASE(N)                                                                                          \
    case N:                                                                                                    \
        if (gp && bits == 4)                                                                                   \
            lanes_group(NULL, NULL, gp, 4, q, k, d, nb, N, f);                                                 \
        else if (gp)                                                                                           \
            lanes_group(NULL, NULL, gp, 8, q, k, d, nb, N, f);                                                 \
        else if (bits == 4)                                                                                    \
            lanes_group(rows, pf, NULL, 4, q, k, d, nb, N, f);                                                 \
        else                                                                                                   \
            lanes_group(rows, pf, NULL, 8, q, k, d, nb, N, f);                                                 \
        break;
        LANES_CASE(1) LANES_CASE(2) LANES_CASE(3) LANES_CASE(4) LANES_CASE(5) LANES_CASE(6) LANES_CASE(7) LANES_CASE(8)
#undef LANES_CASE
    }
}

/* k % 64 == 0. Rows past n in the last group repeat row n - 1 (their outputs are not stored). */
static int wq_rows_lanes(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                         int n, int k, int bits, int packed) {
    int nb = k / QB;
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    size_t qs = (size_t)k + XPAD; /* x rows' stride */
    int8_t *q = (int8_t *)malloc((size_t)m * qs + 64);
    float *d = (float *)malloc(((size_t)m * nb + 1) * sizeof(float));
    float *corr = (float *)malloc(((size_t)m + 1) * sizeof(float));
    if (!q || !d || !corr) {
        free(q), free(d), free(corr);
        return -1;
    }
    for (int b = 0; b < m; b++)
        corr[b] = quantize_row(x + (size_t)b * k, k, bits == 4, nb, q + (size_t)b * qs, d + (size_t)b * nb);
    const float off = bits == 4 ? 8.f : 128.f;
    int groups = (n + 15) / 16;
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int gi = 0; gi < groups; gi++) {
        int o0 = gi * 16, valid = n - o0 < 16 ? n - o0 : 16;
        __mmask16 cols = (__mmask16)((1u << valid) - 1);
        const int8_t *rows[16], *next[16];
        for (int i = 0; i < 16; i++) {
            rows[i] = w + (size_t)(i < valid ? o0 + i : n - 1) * stride;
            next[i] = w + (size_t)(o0 + 16 + i < n ? o0 + 16 + i : n - 1) * stride;
        }
        __m512 sc = _mm512_maskz_loadu_ps(cols, scale + o0);
        __m512 bi = bias ? _mm512_maskz_loadu_ps(cols, bias + o0) : _mm512_setzero_ps();
        for (int r0 = 0; r0 < m; r0 += LX) {
            int nx = m - r0 < LX ? m - r0 : LX;
            __m512 f[LX];
            const int8_t *gp = packed ? w + (size_t)o0 * stride : NULL; /* the group's 16 rows, lanes16 */
            lanes_groups(rows, r0 == 0 && o0 + 16 < n ? next : NULL, gp, bits, q + (size_t)r0 * qs, qs,
                         d + (size_t)r0 * nb, (size_t)nb, nx, f);
            for (int r = 0; r < nx; r++) {
                __m512 c = _mm512_set1_ps(off * corr[r0 + r]);
                __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(f[r], c), sc, bi);
                _mm512_mask_storeu_ps(y + (size_t)(r0 + r) * n + o0, cols, v);
            }
        }
    }
    free(q), free(d), free(corr);
    return 0;
}
#endif

/* bits 8 or 4: the activation-quantized ("q") kernels. x [m, k] fp32. Returns 0, or -1 when out of memory. */
static int wq_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                     int n, int k, int bits) {
#ifdef USE_AMX
    if (k % QB == 0 && amx_enabled && amx_granted()) {
        if (bits == 4 && m < 4 && n % 8 == 0 && (k / QB) % 2 == 0) return wq_rows_bs(x, w, scale, bias, y, m, n, k, 4);
        return wq_rows_amx(x, w, scale, bias, y, m, n, k, bits);
    }
#endif
#ifdef USE_VNNI512
    if (k % QB == 0) {
        if (m < LANES_MIN_ROWS && n % 8 == 0 && (k / QB) % 2 == 0)
            return wq_rows_bs(x, w, scale, bias, y, m, n, k, bits);
        return wq_rows_lanes(x, w, scale, bias, y, m, n, k, bits, 0);
    }
#endif
    int nb = (k + QB - 1) / QB;
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    int8_t *q = (int8_t *)malloc((size_t)m * nb * QB + 64);
    float *d = (float *)malloc(((size_t)m * nb + 1) * sizeof(float));
    float *corr = (float *)malloc(((size_t)m + 1) * sizeof(float));
    if (!q || !d || !corr) {
        free(q), free(d), free(corr);
        return -1;
    }
    int full = bits == 4 ? (k / 2) / (QB / 2) : k / QB;
    for (int b = 0; b < m; b++)
        corr[b] = quantize_row(x + (size_t)b * k, k, bits == 4, full, q + (size_t)b * nb * QB, d + (size_t)b * nb);
    int unpack = 0;
#ifdef USE_AVX2
#ifndef USE_VNNI512 /* (VNNI builds took k % 64 == 0 above) */
    unpack = bits == 4 && m >= Q4_UNPACK_MIN_ROWS && k % QB == 0;
    if (bits == 4 && m == 1 && k % QB == 0) { /* decode: groups of 8 rows (the last partial group by q4_rows) */
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
        for (int o0 = 0; o0 < n; o0 += 8) {
            float sums[8];
            int rows = n - o0 < 8 ? n - o0 : 8;
            const int8_t *wr = w + (size_t)o0 * stride;
            if (rows == 8) {
                q4_rows8(wr, stride, q, d, corr[0], full, sums);
            } else {
                for (int r0 = 0; r0 < rows; r0 += ROWS)
                    q4_rows(wr + (size_t)r0 * stride, stride, rows - r0 < ROWS ? rows - r0 : ROWS, q, d, corr[0], k,
                            sums + r0);
            }
            store_outputs(y, sums, scale, bias, o0, rows);
        }
        free(q), free(d), free(corr);
        return 0;
    }
#endif
#endif
#pragma omp parallel PAR_IF((double)m * n * k)
    {
        /* (without the buffer, a thread unpacks per x row as decode does) */
        uint8_t *u = unpack ? (uint8_t *)malloc((size_t)ROWS * full * QB) : NULL;
#pragma omp for schedule(static)
        for (int o0 = 0; o0 < n; o0 += ROWS) {
            int rows = n - o0 < ROWS ? n - o0 : ROWS;
            const int8_t *wr = w + (size_t)o0 * stride;
#ifdef USE_AVX2
            int use_u = u != NULL && rows == ROWS;
            if (use_u) q4_unpack_rows(wr, stride, full, u);
#endif
            for (int b = 0; b < m; b++) {
                float sums[ROWS];
                const int8_t *qb = q + (size_t)b * nb * QB;
                const float *db = d + (size_t)b * nb;
#ifdef USE_AVX2
                int pair8 = bits == 8 && k % QB == 0 && rows == ROWS;
                if ((use_u || pair8) && b + 1 < m) { /* two x rows per pass over the group */
                    float sums1[ROWS] = {0};
                    if (use_u)
                        q4u_rows2(u, full, qb, db, corr[b], qb + (size_t)nb * QB, db + nb, corr[b + 1], sums, sums1,
                                  b == 0 && o0 + 2 * ROWS <= n ? wr + ROWS * stride : NULL, stride);
                    else
                        q8_rows2(wr, stride, full, qb, db, qb + (size_t)nb * QB, db + nb, sums, sums1);
                    store_outputs(y + (size_t)b * n, sums, scale, bias, o0, ROWS);
                    store_outputs(y + (size_t)(b + 1) * n, sums1, scale, bias, o0, ROWS);
                    b++;
                    continue;
                }
                if (use_u)
                    q4u_rows(u, full, qb, db, corr[b], sums);
                else
#endif
                if (bits == 4)
                    q4_rows(wr, stride, rows, qb, db, corr[b], k, sums);
                else
                    q8_rows(wr, stride, rows, qb, db, k, sums);
                store_outputs(y + (size_t)b * n, sums, scale, bias, o0, rows);
            }
        }
        free(u);
    }
    free(q), free(d), free(corr);
    return 0;
}

int w8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
              int k) {
    return wq_linear(x, w, scale, bias, y, m, n, k, 8);
}

/* k must be even (two columns per byte). */
int w4_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
              int k) {
    return wq_linear(x, w, scale, bias, y, m, n, k, 4);
}

/* ------------------------------------------------------------------------------------------------------- */
/* INT8 / INT4 GEMM for many x rows (prefill), AVX-512 VNNI                                                 */
/*
 * The q kernels above keep THUDM's layout and put 64 columns of one (weight row, x row) pair in a vector, so
 * each vpdpbusd is followed by a conversion and an fma for the block's scale: right for decode (the weights
 * are read once, in place), a third of the machine for prefill. Here a panel of GN = 32 weight rows is first
 * rearranged, per thread and for GK columns at a time, so that one 512-bit vector holds 4 consecutive columns
 * of 16 rows as unsigned bytes (s + 8 for INT4, w + 128 for INT8); 4 int8 activations of an x row are
 * broadcast against it, and a tile of GM x GN outputs takes 16 vpdpbusd per 64-column block before the block's
 * scale is applied once (GM * 2 int32 and GM * 2 fp32 accumulators in registers). The activations are quantized
 * as for the q kernels (int8 per 64 columns) and each block's integer sum is the same; the fp32 sums over the
 * blocks run in another order, so the results differ from w8_linear / w4_linear in the last bits.
 */
#ifdef USE_VNNI512
#define GM 6
#define GN 32
#define GK 4096

/* Panel rows o0 .. o0 + GN - 1 (rows at or past n left as zero bytes), columns [c0, c0 + kc) (multiples of
 * 64) -> p: per group of 4 columns, GN dwords of 4 unsigned bytes (INT8 with `sign`: the signed bytes). */
static void gemm_pack(const int8_t *w, size_t stride, int n, int o0, int c0, int kc, int bits, int sign,
                      uint32_t *p) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32((int)stride));
    /* INT4: one gathered dword = 4 packed bytes = 8 columns = two groups; bytes [b, b, b', b'] per group, then
     * the high nibble into the even byte (the even column) and the low nibble into the odd one */
    const __m512i lo_pair = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13));
    const __m512i hi_pair = _mm512_broadcast_i32x4(_mm_setr_epi8(2, 2, 3, 3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15));
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip4 = _mm512_set1_epi8((char)0x88);
    const __m512i flip8 = _mm512_set1_epi8(sign ? 0 : (char)0x80);
    const __mmask64 odd = 0xAAAAAAAAAAAAAAAAull;
    for (int h = 0; h < GN; h += 16) {
        int valid = n - (o0 + h);
        __mmask16 mask = valid >= 16 ? (__mmask16)0xFFFF : valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
        const int8_t *base = w + (size_t)(o0 + h) * stride;
        if (bits == 4) {
            for (int g = 0; g < kc / 4; g += 2) {
                const int8_t *src = base + (size_t)(c0 + 4 * g) / 2;
                __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, (const void *)src, 1);
                v = _mm512_xor_si512(v, flip4);
                __m512i t0 = _mm512_shuffle_epi8(v, lo_pair), t1 = _mm512_shuffle_epi8(v, hi_pair);
                t0 = _mm512_and_si512(_mm512_mask_blend_epi8(odd, _mm512_srli_epi16(t0, 4), t0), m4);
                t1 = _mm512_and_si512(_mm512_mask_blend_epi8(odd, _mm512_srli_epi16(t1, 4), t1), m4);
                _mm512_storeu_si512((void *)(p + (size_t)g * GN + h), t0);
                _mm512_storeu_si512((void *)(p + (size_t)(g + 1) * GN + h), t1);
            }
        } else {
            for (int g = 0; g < kc / 4; g++) {
                const int8_t *src = base + (size_t)c0 + 4 * g;
                __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mask, rows, (const void *)src, 1);
                _mm512_storeu_si512((void *)(p + (size_t)g * GN + h), _mm512_xor_si512(v, flip8));
            }
        }
    }
}

/* The scales and biases of a tile's 32 columns (zero unless `last`): sb = {scale lo, scale hi, bias lo, bias hi}. */
static inline void gemm_scales(int last, const float *scale, const float *bias, __mmask16 cols0, __mmask16 cols1,
                               __m512 *sb) {
    sb[0] = sb[1] = sb[2] = sb[3] = _mm512_setzero_ps();
    if (last) {
        sb[0] = _mm512_maskz_loadu_ps(cols0, scale), sb[1] = _mm512_maskz_loadu_ps(cols1, scale + 16);
        if (bias) sb[2] = _mm512_maskz_loadu_ps(cols0, bias), sb[3] = _mm512_maskz_loadu_ps(cols1, bias + 16);
    }
}

/* A tile row's 32 sums to y: with `last`, (sum - c) * scale + bias (c = off * corr of the x row), else as they
 * are (the next pass over k adds to them). */
static inline void gemm_store_row(float *yr, __m512 v0, __m512 v1, int last, float c, const __m512 *sb,
                                  __mmask16 cols0, __mmask16 cols1) {
    if (last) {
        __m512 cv = _mm512_set1_ps(c);
        v0 = _mm512_fmadd_ps(_mm512_sub_ps(v0, cv), sb[0], sb[2]);
        v1 = _mm512_fmadd_ps(_mm512_sub_ps(v1, cv), sb[1], sb[3]);
    }
    _mm512_mask_storeu_ps(yr, cols0, v0);
    _mm512_mask_storeu_ps(yr + 16, cols1, v1);
}

/* One GM x GN tile: x rows q (row stride k bytes, natural column order) with scales d (row stride nb), blocks
 * [0, nbk) of the packed panel p, added to the tile of y (row stride n; `first`: y not yet written). With
 * `last`, y = (sum - off * corr[r]) * scale[o] + bias[o]. Only `rows` x rows and the columns in `cols` are
 * stored. */
static inline void gemm_tile(const uint32_t *p, const int8_t *q, size_t k, const float *d, size_t nb, int nbk,
                             float *y, size_t n, int first, int last, const float *scale, const float *bias,
                             const float *corr, float off, int rows, __mmask16 cols0, __mmask16 cols1) {
    __m512 f[GM][2];
    for (int r = 0; r < GM; r++) {
        if (first || r >= rows) {
            f[r][0] = f[r][1] = _mm512_setzero_ps();
        } else {
            f[r][0] = _mm512_maskz_loadu_ps(cols0, y + r * n);
            f[r][1] = _mm512_maskz_loadu_ps(cols1, y + r * n + 16);
        }
    }
    for (int b = 0; b < nbk; b++) {
        __m512i s[GM][2];
        for (int r = 0; r < GM; r++) s[r][0] = s[r][1] = _mm512_setzero_si512();
        const uint32_t *pb = p + (size_t)b * 16 * GN;
        const int8_t *qb = q + (size_t)b * QB;
        for (int g = 0; g < 16; g++) {
            __m512i w0 = _mm512_loadu_si512((const void *)(pb + g * GN));
            __m512i w1 = _mm512_loadu_si512((const void *)(pb + g * GN + 16));
            for (int r = 0; r < GM; r++) {
                int32_t a4;
                memcpy(&a4, qb + r * k + 4 * g, 4);
                __m512i a = _mm512_set1_epi32(a4);
                s[r][0] = _mm512_dpbusd_epi32(s[r][0], w0, a);
                s[r][1] = _mm512_dpbusd_epi32(s[r][1], w1, a);
            }
        }
        for (int r = 0; r < GM; r++) {
            __m512 e = _mm512_set1_ps(d[r * nb + b]);
            f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][0]), e, f[r][0]);
            f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][1]), e, f[r][1]);
        }
    }
    __m512 sb[4];
    gemm_scales(last, scale, bias, cols0, cols1, sb);
    for (int r = 0; r < rows && r < GM; r++)
        gemm_store_row(y + r * n, f[r][0], f[r][1], last, off * corr[r], sb, cols0, cols1);
}
#endif

#ifdef USE_AMX
/* The GEMM on AMX int8 tiles: per 64-column block, a tile of 16 x rows (signed bytes, TM) times a tile of 16
 * packed weight rows (gemm_pack's bytes, read in place: 16 groups of 4 columns, 128 bytes apart) gives the
 * block's exact integer sums (TDPBSUD on INT4's s + 8, TDPBSSD on INT8's signed bytes), which are then scaled and
 * added exactly as gemm_tile does (one fma per block, in block order). So INT4 gets gemm_tile's bits, and both
 * get the bits of the AMX row kernels below (wq_rows_amx, wq_rows4_bs): a prompt's rows are the same whether
 * prefilled in one GEMM, in chunks, or one by one. Measured on a Xeon (Sapphire Rapids
 * class, 2 threads), a ChatGLM2 block's four matrices at 512 rows: 138 ms against 262 without the tiles and
 * 154 dequantize + torch's bf16 GEMM; a tile product costs ~13 cycles, its store and scaling ~40 more, which
 * the per-block scales make unavoidable (docs/benchmarks.md). */
#define TM 16
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static int amx_enabled = 1; /* set_amx */

static int amx_granted(void) {
    static int state = 0; /* 0 not asked, 1 granted, -1 refused */
    if (state == 0) {
        long rc = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
        state = rc == 0 ? 1 : -1;
    }
    return state == 1;
}

static void amx_configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = 16; /* 0, 3: x; 1, 2: weights; 4-7: sums */
    _tile_loadconfig(&c);
}

/* The tile instructions take constant tile numbers, hence macros for the two sets that alternate. C = A x B:
 * with sgn (INT8) signed bytes on both sides, else MIXED (the INT4 weights' s + 8 unsigned: _tile_dpbsud when
 * they are B, _tile_dpbusd when they are A), then C stored to out. */
#define AMX_PRODUCT(A, B, C, out, sgn, MIXED)                                                                 \
    do {                                                                                                       \
        _tile_zero(C);                                                                                         \
        if (sgn)                                                                                               \
            _tile_dpbssd(C, A, B);                                                                             \
        else                                                                                                   \
            MIXED(C, A, B);                                                                                    \
        _tile_stored(C, out, 64);                                                                              \
    } while (0)
/* The GEMM's step: x tile XT (loaded from qa) against the panel's two halves (tiles 1, 2) into C0, C1 -> out[0, 1]. */
#define AMX_TWO(XT, C0, C1, qa, out, sgn)                                                                      \
    do {                                                                                                       \
        _tile_loadd(XT, qa, QB);                                                                               \
        AMX_PRODUCT(XT, 1, C0, out[0], sgn, _tile_dpbsud);                                                     \
        AMX_PRODUCT(XT, 2, C1, out[1], sgn, _tile_dpbsud);                                                     \
    } while (0)

/* Rows of x per pass over a panel: their fp32 sums (MT * TM x GN, 16 KB) stay in L1 while each block's weight
 * tiles are loaded once for all of them. */
#define MT 8

/* Up to MT * TM x rows (`rows` of them real) against the panel's GN weight rows, blocks [0, nbk): per block the
 * panel's two halves are loaded once (tiles 1, 2), then per 16 x rows (tile 0 or 3) two products give the block's
 * exact integer sums (tiles 4-5 or 6-7, alternating so that one group's products run beside the other's
 * scaling), stored and added into acc as gemm_tile adds them: acc = cvt(sum) * d + acc, block after block. q:
 * the x rows in tiles (16 rows x 64 columns a KB; the next block 1 KB on, the next 16 rows nb KB on). */
static inline void amx_panel(const uint32_t *p, const int8_t *q, size_t nb, const float *d, int nbk, float *y,
                             size_t n, int first, int last, const float *scale, const float *bias, const float *corr,
                             float off, int rows, __mmask16 cols0, __mmask16 cols1, int bits) {
    int tiles = (rows + TM - 1) / TM;
    int32_t s[2][2][TM][16] __attribute__((aligned(64)));
    float acc[MT * TM * GN] __attribute__((aligned(64)));
    for (int r = 0; r < tiles * TM; r++) {
        float *f = acc + (size_t)r * GN;
        if (first || r >= rows) {
            _mm512_store_ps(f, _mm512_setzero_ps()), _mm512_store_ps(f + 16, _mm512_setzero_ps());
        } else {
            _mm512_store_ps(f, _mm512_maskz_loadu_ps(cols0, y + r * n));
            _mm512_store_ps(f + 16, _mm512_maskz_loadu_ps(cols1, y + r * n + 16));
        }
    }
    /* step i = (block b, x tile t); its sums are scaled one step later, when the tile stores have landed */
    int steps = nbk * tiles;
    for (int i = 0; i <= steps; i++) {
        if (i < steps) {
            int b = i / tiles, t = i % tiles;
            const int8_t *qa = q + ((size_t)t * nb + b) * TM * QB;
            if (t == 0) {
                const uint32_t *pb = p + (size_t)b * 16 * GN;
                _tile_loadd(1, pb, GN * 4);
                _tile_loadd(2, pb + 16, GN * 4);
            }
            if (i & 1)
                AMX_TWO(3, 6, 7, qa, s[1], bits == 8);
            else
                AMX_TWO(0, 4, 5, qa, s[0], bits == 8);
        }
        if (i == 0) continue;
        int j = i - 1, b = j / tiles, t = j % tiles, u = j & 1;
        const float *db = d + (size_t)t * TM * nb + b;
        float *f = acc + (size_t)t * TM * GN;
        for (int r = 0; r < TM; r++) {
            __m512 e = _mm512_set1_ps(db[r * nb]);
            _mm512_store_ps(f + r * GN, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s[u][0][r])), e,
                                                        _mm512_load_ps(f + r * GN)));
            _mm512_store_ps(f + r * GN + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s[u][1][r])), e,
                                                             _mm512_load_ps(f + r * GN + 16)));
        }
    }
    __m512 sb[4];
    gemm_scales(last, scale, bias, cols0, cols1, sb);
    for (int r = 0; r < rows; r++)
        gemm_store_row(y + r * n, _mm512_load_ps(acc + (size_t)r * GN), _mm512_load_ps(acc + (size_t)r * GN + 16),
                       last, off * corr[r], sb, cols0, cols1);
}
/* Decode and small batches on AMX int8 tiles (wq_linear, where enabled): any number of x rows, and every row gets
 * the same bits whatever rows share its call. Per group of 16 weight rows and 64-column block, the weights (a
 * tile: INT8 read in place; INT4 unpacked to s + 8 per nibble, the high nibbles (even columns) then the low ones)
 * times the x rows' int8 block (16 rows a pass, as the tile's columns; q kernels' quantization) give the exact
 * integer sums, each added as acc = cvt(sum) * d + acc in block order (a step behind the tile work, which runs
 * beside it); then y = (acc - 8 * corr) * scale + bias (INT4) or (acc - 0) * scale + bias (INT8). */
static inline void amx_unpack4(const int8_t *w, size_t stride, int rows, uint8_t *a) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88);
    for (int r = 0; r < rows; r++) {
        __m256i v = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + r * stride)), flip);
        _mm256_store_si256((__m256i *)(a + 64 * r), _mm256_and_si256(_mm256_srli_epi16(v, 4), m4));
        _mm256_store_si256((__m256i *)(a + 64 * r + 32), _mm256_and_si256(v, m4));
    }
}

/* Two blocks at once: 64 packed bytes of each row -> a0 (block b) and a1 (block b + 1), 64 bytes a row each. */
static inline void amx_unpack4x2(const int8_t *w, size_t stride, int rows, uint8_t *a0, uint8_t *a1) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8((char)0x88);
    for (int r = 0; r < rows; r++) {
        __m512i v = _mm512_xor_si512(_mm512_loadu_si512((const void *)(w + r * stride)), flip);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4), lo = _mm512_and_si512(v, m4);
        _mm512_store_si512((void *)(a0 + 64 * r), _mm512_shuffle_i64x2(hi, lo, 0x44));
        _mm512_store_si512((void *)(a1 + 64 * r), _mm512_shuffle_i64x2(hi, lo, 0xEE));
    }
}

static int wq_rows_amx(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                       int n, int k, int bits) {
    int nb = k / QB, groups = (m + 15) / 16;
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    int8_t *q = (int8_t *)malloc((size_t)m * k + 64);
    float *d = (float *)malloc(((size_t)m * nb + 1) * sizeof(float));
    float *corr = (float *)calloc((size_t)groups * 16 + 1, sizeof(float));
    int32_t *bt = (int32_t *)malloc((size_t)nb * groups * 1024 + 64);
    float *dt = (float *)malloc(((size_t)nb * groups * 16 + 16) * sizeof(float));
    if (!q || !d || !corr || !bt || !dt) {
        free(q), free(d), free(corr), free(bt), free(dt);
        return -1;
    }
    for (int b = 0; b < m; b++)
        corr[b] = quantize_row(x + (size_t)b * k, k, bits == 4, nb, q + (size_t)b * k, d + (size_t)b * nb);
    memset(bt, 0, (size_t)nb * groups * 1024);
    memset(dt, 0, (size_t)nb * groups * 16 * sizeof(float));
    for (int r = 0; r < m; r++) {
        int g = r / 16, mm = r % 16;
        const int32_t *qr = (const int32_t *)(q + (size_t)r * k);
        for (int b = 0; b < nb; b++) {
            int32_t *t = bt + ((size_t)b * groups + g) * 256;
            for (int kk = 0; kk < 16; kk++) t[kk * 16 + mm] = qr[b * 16 + kk];
            dt[((size_t)b * groups + g) * 16 + mm] = d[(size_t)r * nb + b];
        }
    }
    float off = bits == 4 ? 8.f : 0.f;
#pragma omp parallel
    {
        uint8_t abuf[4][1024] __attribute__((aligned(64)));
        int32_t s[2][16][16] __attribute__((aligned(64)));
        float tmp[16][16] __attribute__((aligned(64)));
        amx_configure();
        for (int g = 0; g < groups; g++) {
            int mg = m - g * 16 < 16 ? m - g * 16 : 16;
            __m512 cv = _mm512_mul_ps(_mm512_set1_ps(off), _mm512_loadu_ps(corr + g * 16));
#pragma omp for schedule(static)
            for (int n0 = 0; n0 < n; n0 += 16) {
                int rows = n - n0 < 16 ? n - n0 : 16;
                __m512 f[16];
                for (int r = 0; r < 16; r++) f[r] = _mm512_setzero_ps();
                if (rows < 16) memset(abuf, 0, sizeof abuf);
                const int8_t *wg = w + (size_t)n0 * stride;
                if (bits == 4) {
                    if (nb > 1)
                        amx_unpack4x2(wg, stride, rows, abuf[0], abuf[1]);
                    else
                        amx_unpack4(wg, stride, rows, abuf[0]);
                }
                /* step b: the weights of block b into a tile, its product and store; then block b - 1 scaled */
                for (int b = 0; b <= nb; b++) {
                    if (b < nb) {
                        int u = b & 1;
                        uint8_t *ab = abuf[bits == 4 ? b & 3 : u]; /* INT4: unpacked two blocks ahead */
                        const int32_t *bb = bt + ((size_t)b * groups + g) * 256;
                        if (bits == 4) {
                            if ((b & 1) == 0 && b + 2 < nb) { /* two blocks ahead of their tile loads */
                                int c = b + 2;
                                for (int r = 0; r < rows; r++)
                                    _mm_prefetch((const char *)(wg + r * stride + (size_t)(c + 8) * 32), VNNI_PREFETCH);
                                if (c + 1 < nb)
                                    amx_unpack4x2(wg + (size_t)c * 32, stride, rows, abuf[c & 3], abuf[(c + 1) & 3]);
                                else
                                    amx_unpack4(wg + (size_t)c * 32, stride, rows, abuf[c & 3]);
                            }
                        } else if (rows < 16) {
                            for (int r = 0; r < rows; r++) memcpy(ab + 64 * r, wg + r * stride + (size_t)b * QB, 64);
                        } else {
                            for (int r = 0; r < 16; r++)
                                _mm_prefetch((const char *)(wg + r * stride + (size_t)(b + 4) * QB), VNNI_PREFETCH);
                        }
                        int direct = bits == 8 && rows == 16; /* INT8 tiles read in place */
                        const void *src = direct ? (const void *)(wg + (size_t)b * QB) : (const void *)ab;
                        size_t ss = direct ? stride : 64;
                        if (u) {
                            _tile_loadd(2, src, ss);
                            _tile_loadd(3, bb, 64);
                            AMX_PRODUCT(2, 3, 5, s[1], bits == 8, _tile_dpbusd);
                        } else {
                            _tile_loadd(0, src, ss);
                            _tile_loadd(1, bb, 64);
                            AMX_PRODUCT(0, 1, 4, s[0], bits == 8, _tile_dpbusd);
                        }
                    }
                    if (b > 0) {
                        int p = (b - 1) & 1;
                        __m512 dv = _mm512_loadu_ps(dt + ((size_t)(b - 1) * groups + g) * 16);
                        for (int r = 0; r < 16; r++)
                            f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(s[p][r])), dv, f[r]);
                    }
                }
                for (int r = 0; r < rows; r++) {
                    __m512 v = _mm512_fmadd_ps(_mm512_sub_ps(f[r], cv), _mm512_set1_ps(scale[n0 + r]),
                                               _mm512_set1_ps(bias ? bias[n0 + r] : 0.f));
                    _mm512_store_ps(tmp[r], v);
                }
                for (int mm = 0; mm < mg; mm++)
                    for (int r = 0; r < rows; r++) y[(size_t)(g * 16 + mm) * n + n0 + r] = tmp[r][mm];
            }
        }
        _tile_release();
    }
    free(q), free(d), free(corr), free(bt), free(dt);
    return 0;
}
#endif

/* y [m, n] = x [m, k] @ W^T * scale + bias as w8_linear / w4_linear compute it (bits 8 or 4), as a GEMM for
 * many rows, on AMX tiles where this build has them and `tiles` is nonzero (INT4: the same bits either way).
 * Returns 0; -1 when out of memory; -2 when this build has no such kernel (no AVX-512 VNNI, or k not a
 * multiple of 64): the caller then takes w8_linear / w4_linear. */
static int wq_gemm_impl(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                        int n, int k, int bits, int tiles) {
#ifndef USE_VNNI512
    (void)x, (void)w, (void)scale, (void)bias, (void)y, (void)m, (void)n, (void)k, (void)bits, (void)tiles;
    return -2;
#else
    if (k % QB || m <= 0) return -2;
#ifdef USE_AMX
    tiles = tiles && amx_enabled && amx_granted();
#else
    tiles = 0;
#endif
    int tm = tiles ? 16 : GM;
    int nb = k / QB, mp = (m + tm - 1) / tm * tm;
    int8_t *q = (int8_t *)malloc((size_t)mp * k + 64);
    float *d = (float *)calloc((size_t)mp * nb + 1, sizeof(float));
    float *corr = (float *)calloc((size_t)mp + 1, sizeof(float));
    if (!q || !d || !corr) {
        free(q), free(d), free(corr);
        return -1;
    }
    memset(q + (size_t)m * k, 0, (size_t)(mp - m) * k); /* padding rows: zero activations, zero scales */
#pragma omp parallel for schedule(static)
    for (int b = 0; b < m; b++)
        corr[b] = quantize_row(x + (size_t)b * k, k, 0, nb, q + (size_t)b * k, d + (size_t)b * nb);
    int8_t *qt = NULL; /* tiles: each 16 rows' block of 64 columns as 1 KB (rows k bytes apart share a cache set) */
#ifdef USE_AMX
    if (tiles) {
        qt = (int8_t *)malloc((size_t)mp * k + 64);
        if (!qt) {
            free(q), free(d), free(corr);
            return -1;
        }
#pragma omp parallel for schedule(static)
        for (int t = 0; t < mp / TM; t++)
            for (int b = 0; b < nb; b++)
                for (int r = 0; r < TM; r++)
                    memcpy(qt + (((size_t)t * nb + b) * TM + r) * QB, q + ((size_t)t * TM + r) * k + (size_t)b * QB,
                           QB);
    }
#endif
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    float off = bits == 4 ? 8.f : tiles ? 0.f : 128.f; /* INT8 on the tiles: signed products, as wq_rows_amx */
    int panels = (n + GN - 1) / GN, failed = 0;
#pragma omp parallel
    {
        uint32_t *p = (uint32_t *)malloc((size_t)GK * GN + 64);
        if (!p) {
#pragma omp atomic write
            failed = 1;
        }
#ifdef USE_AMX
        if (tiles) amx_configure(); /* per thread */
#endif
#pragma omp for schedule(static)
        for (int pi = 0; pi < panels; pi++) {
            if (!p || failed) continue;
            int o0 = pi * GN, valid = n - o0;
            __mmask16 c0 = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1);
            __mmask16 c1 = valid >= 32 ? 0xFFFF : valid <= 16 ? 0 : (__mmask16)((1u << (valid - 16)) - 1);
            for (int k0 = 0; k0 < k; k0 += GK) {
                int kc = k - k0 < GK ? k - k0 : GK;
                gemm_pack(w, stride, n, o0, k0, kc, bits, tiles, p);
                for (int i0 = 0; i0 < m; i0 += tm) {
#ifdef USE_AMX
                    if (tiles) {
                        int rows = m - i0 < MT * TM ? m - i0 : MT * TM;
                        amx_panel(p, qt + ((size_t)(i0 / TM) * nb + k0 / QB) * TM * QB, (size_t)nb,
                                  d + (size_t)i0 * nb + k0 / QB, kc / QB, y + (size_t)i0 * n + o0, (size_t)n, k0 == 0,
                                  k0 + kc == k, scale + o0, bias ? bias + o0 : NULL, corr + i0, off, rows, c0, c1,
                                  bits);
                        i0 += (MT - 1) * TM;
                        continue;
                    }
#endif
                    gemm_tile(p, q + (size_t)i0 * k + k0, (size_t)k, d + (size_t)i0 * nb + k0 / QB, (size_t)nb,
                              kc / QB, y + (size_t)i0 * n + o0, (size_t)n, k0 == 0, k0 + kc == k, scale + o0,
                              bias ? bias + o0 : NULL, corr + i0, off, m - i0, c0, c1);
                }
            }
        }
#ifdef USE_AMX
        if (tiles) _tile_release();
#endif
        free(p);
    }
    free(q), free(qt), free(d), free(corr);
    return failed ? -1 : 0;
#endif
}

int wq_gemm(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n, int k,
            int bits) {
    return wq_gemm_impl(x, w, scale, bias, y, m, n, k, bits, 1);
}

/* The same without AMX tiles (for the tests and benchmarks; INT4 gets the same bits, INT8 sums w + 128 there). */
int wq_gemm_vnni(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
                 int k, int bits) {
    return wq_gemm_impl(x, w, scale, bias, y, m, n, k, bits, 0);
}

#if defined(USE_AVX2) && !defined(USE_VNNI512)
/* The lanes16 layout on AVX2 (no VNNI): each 64 bytes of a group (16 weight rows x 4 bytes) are two 256-bit vectors,
 * rows 0-7 and rows 8-15, one int32 lane a row, as the VNNI lanes kernel holds them in one. A broadcast of 4 int8
 * activations against such a vector: maddubs gives each row two int16 sums of two products. INT4 (s + 8 in 0..15 by
 * XOR 0x88, against x in -127..127: at most 3810 a pair) adds the even and the odd columns' maddubs and sums 4 such
 * in int16 (at most 30480) before a madd widens them (one int16 sum per x row: with one for the even and one for the
 * odd columns, gcc spilled and copied registers, 4 rows 21 ms against 18); INT8 multiplies |w| by sign(x, w) (at
 * most 32512 a pair) and widens each. Each block's integer sum is exact and the same as the VNNI kernel's (INT8:
 * plus 128 times the block's activation sum, the w + 128 it sums there), and the fp32 steps are the same, so this
 * build gets the VNNI build's bits, at every row count.
 * Where the time goes against the THUDM-layout AVX2 kernels: per x row and 8 weight rows of a 64-column block, 16
 * maddubs + 16 int16 adds + 2 madd + 2 int32 adds + 1 cvt + 1 fma (INT4), where those take per weight row 2 maddubs,
 * an add, a madd, a cvt and an fma; the weights' unpacking is shared by LX2 x rows. */
#define LX2 4 /* x rows per pass over a group (8 measured the same at 8 rows) */
/* Prefetch 1 KB ahead for one x row only, 8 KB from two (Zen 4, AVX2 build, four blocks' INT4 matrices at 2 rows:
 * 19 ms at 1 KB, 14-15 at 8 KB). */
#define LANES2_FEW 1

/* 4 int8 activations at p in every int32 lane (memcpy: p is an int8 buffer; one vpbroadcastd from memory) */
static inline __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return _mm256_set1_epi32(v);
}

static inline __attribute__((always_inline)) void lanes2_group(const int8_t *gp, int bits, const int8_t *q, size_t k,
                                                               const float *d, const int *qsum, size_t nb, int nx,
                                                               __m256 *f) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), flip = _mm256_set1_epi8((char)0x88), one = _mm256_set1_epi16(1);
    /* halves (8 weight rows each) per pass: both for one x row; one from two rows on, where both spilled registers
     * (2 rows: 34 ms against 22, measured with two int16 sums per row and half) */
    const int hn = nx == 1 ? 2 : 1;
    for (int r = 0; r < 2 * nx; r++) f[r] = _mm256_setzero_ps();
    for (size_t b = 0; b < nb; b++) {
        const int8_t *qb = q + b * QB;
        if (bits == 4) {
            const int8_t *src = gp + b * 512;
            for (int i = 0; i < 8; i++) PACKED_PREFETCH(src, i, nx, LANES2_FEW);
            for (int h0 = 0; h0 < 2; h0 += hn) {
                __m256i s32[LX2 * 2];
                for (int i = 0; i < nx * hn; i++) s32[i] = _mm256_setzero_si256();
                for (int c = 0; c < 8; c += 4) {
                    __m256i a16[LX2 * 2];
                    for (int i = 0; i < nx * hn; i++) a16[i] = _mm256_setzero_si256();
#pragma GCC unroll 1 /* unrolled, gcc kept the unpacked weights on the stack: 4 rows 29 ms, not 20 */
                    for (int g = c; g < c + 4; g++)
                        for (int h = 0; h < hn; h++) {
                            const __m256i *wv = (const __m256i *)(src + 64 * g + 32 * (h0 + h));
                            __m256i v = _mm256_xor_si256(_mm256_loadu_si256(wv), flip);
                            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                            __m256i lo = _mm256_and_si256(v, m4);
                            for (int r = 0; r < nx; r++) {
                                __m256i xe = bcast4(qb + r * k + 4 * g);
                                __m256i xo = bcast4(qb + r * k + 32 + 4 * g);
                                __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(hi, xe),
                                                             _mm256_maddubs_epi16(lo, xo));
                                a16[r * hn + h] = _mm256_add_epi16(t, a16[r * hn + h]);
                            }
                        }
                    for (int i = 0; i < nx * hn; i++)
                        s32[i] = _mm256_add_epi32(s32[i], _mm256_madd_epi16(a16[i], one));
                }
                for (int r = 0; r < nx; r++)
                    for (int h = 0; h < hn; h++) {
                        __m256 *a = f + 2 * r + h0 + h;
                        __m256 sum = _mm256_cvtepi32_ps(s32[r * hn + h]);
                        *a = _mm256_fmadd_ps(sum, _mm256_set1_ps(d[r * nb + b]), *a);
                    }
            }
        } else {
            const int8_t *src = gp + b * 1024;
            for (int i = 0; i < 16; i++) PACKED_PREFETCH(src, i, nx, LANES2_FEW);
            for (int h0 = 0; h0 < 2; h0 += hn) {
                __m256i s[LX2 * 2];
                for (int i = 0; i < nx * hn; i++) s[i] = _mm256_setzero_si256();
#pragma GCC unroll 1
                for (int g = 0; g < 16; g++)
                    for (int h = 0; h < hn; h++) {
                        __m256i v = _mm256_loadu_si256((const __m256i *)(src + 64 * g + 32 * (h0 + h)));
                        __m256i a = _mm256_abs_epi8(v);
                        for (int r = 0; r < nx; r++) {
                            __m256i xb = bcast4(qb + r * k + 4 * g);
                            __m256i p = _mm256_maddubs_epi16(a, _mm256_sign_epi8(xb, v));
                            s[r * hn + h] = _mm256_add_epi32(s[r * hn + h], _mm256_madd_epi16(p, one));
                        }
                    }
                for (int r = 0; r < nx; r++)
                    for (int h = 0; h < hn; h++) {
                        __m256i t = _mm256_add_epi32(s[r * hn + h], _mm256_set1_epi32(128 * qsum[r * nb + b]));
                        __m256 *a = f + 2 * r + h0 + h;
                        *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(d[r * nb + b]), *a);
                    }
            }
        }
    }
}

static void lanes2_groups(const int8_t *gp, int bits, const int8_t *q, size_t k, const float *d, const int *qsum,
                          size_t nb, int nx, __m256 *f) {
    switch (nx) { /* one instance per x-row count and width: the sums stay in registers */
#define LANES2_CASE(N)                                                                                         \
    case N:                                                                                                    \
        if (bits == 4)                                                                                         \
            lanes2_group(gp, 4, q, k, d, qsum, nb, N, f);                                                      \
        else                                                                                                   \
            lanes2_group(gp, 8, q, k, d, qsum, nb, N, f);                                                      \
        break;
        LANES2_CASE(1) LANES2_CASE(2) LANES2_CASE(3) LANES2_CASE(4)
#undef LANES2_CASE
    }
}

/* wq_rows_packed on AVX2: k % 64 == 0, n % 16 == 0. */
static int wq_rows_lanes2(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m,
                          int n, int k, int bits) {
    int nb = k / QB;
    size_t stride = bits == 4 ? (size_t)(k / 2) : (size_t)k;
    size_t qs = (size_t)k + XPAD;
    int8_t *q = (int8_t *)malloc((size_t)m * qs + 64);
    float *d = (float *)malloc(((size_t)m * nb + 1) * sizeof(float));
    float *corr = (float *)malloc(((size_t)m + 1) * sizeof(float));
    int *qsum = (int *)malloc(((size_t)m * nb + 1) * sizeof(int));
    if (!q || !d || !corr || !qsum) {
        free(q), free(d), free(corr), free(qsum);
        return -1;
    }
    for (int b = 0; b < m; b++) {
        const int8_t *qr = q + (size_t)b * qs;
        corr[b] = quantize_row(x + (size_t)b * k, k, bits == 4, nb, q + (size_t)b * qs, d + (size_t)b * nb);
        for (int j = 0; bits == 8 && j < nb; j++) { /* INT8's block sums of x (the w + 128 of VNNI) */
            int s = 0;
            for (int i = 0; i < QB; i++) s += qr[j * QB + i];
            qsum[(size_t)b * nb + j] = s;
        }
    }
    const float off = bits == 4 ? 8.f : 128.f;
    int groups = n / 16;
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int gi = 0; gi < groups; gi++) {
        int o0 = gi * 16;
        const int8_t *gp = w + (size_t)o0 * stride;
        __m256 sc[2], bi[2];
        for (int h = 0; h < 2; h++) {
            sc[h] = _mm256_loadu_ps(scale + o0 + 8 * h);
            bi[h] = bias ? _mm256_loadu_ps(bias + o0 + 8 * h) : _mm256_setzero_ps();
        }
        for (int r0 = 0; r0 < m; r0 += LX2) {
            int nx = m - r0 < LX2 ? m - r0 : LX2;
            __m256 f[2 * LX2];
            lanes2_groups(gp, bits, q + (size_t)r0 * qs, qs, d + (size_t)r0 * nb, qsum + (size_t)r0 * nb,
                          (size_t)nb, nx, f);
            for (int r = 0; r < nx; r++) {
                __m256 c = _mm256_set1_ps(off * corr[r0 + r]);
                for (int h = 0; h < 2; h++)
                    _mm256_storeu_ps(y + (size_t)(r0 + r) * n + o0 + 8 * h,
                                     _mm256_fmadd_ps(_mm256_sub_ps(f[2 * r + h], c), sc[h], bi[h]));
            }
        }
    }
    free(q), free(d), free(corr), free(qsum);
    return 0;
}
#endif

/* The weights in the "lanes16" layout (AVX-512 VNNI and AVX2 builds; quantization/ops.py to_lanes16): per group of
 * 16 rows, per 4 bytes of a row (INT8: 4 columns; INT4: 8), the 16 rows' 4 bytes, row after row (64 bytes), so the
 * lanes kernels load what they would otherwise transpose, one sequential stream a thread. On VNNI the same bits as
 * w8_linear / w4_linear and wq_gemm_vnni on THUDM's layout (tests/test_kernels.py), at any number of rows (as fast
 * as the GEMM from 128 rows to 512, so prompts take it too); on AVX2 (wq_rows_lanes2) the VNNI build's bits, which
 * THUDM's layout does not get there (its kernels sum each row's 8 lanes in fp32 across the blocks), at any number of
 * rows, faster than those kernels at every row count. n % 16 == 0, k % 64 == 0; else, and on other builds, -2. */
int wq_rows_packed(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
                   int k, int bits) {
#ifdef USE_VNNI512
    if (k % QB == 0 && n % 16 == 0 && m > 0) return wq_rows_lanes(x, w, scale, bias, y, m, n, k, bits, 1);
#elif defined(USE_AVX2)
    if (k % QB == 0 && n % 16 == 0 && m > 0) return wq_rows_lanes2(x, w, scale, bias, y, m, n, k, bits);
#endif
    (void)x, (void)w, (void)scale, (void)bias, (void)y, (void)m, (void)n, (void)k, (void)bits;
    return -2;
}

/* Whether the kernels may use AMX tiles where they have them (settings.cpu_amx; on by default). */
void set_amx(int on) {
#ifdef USE_AMX
    amx_enabled = on;
#else
    (void)on;
#endif
}

/* Whether this build has AMX tiles and the kernel lets this process use them. */
int gemm_tiles(void) {
#ifdef USE_AMX
    return amx_granted();
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------------------------------------------- */
/* Float kernels: exact fp32 products, fp32 accumulation.                                                   */

void w8_linear_f(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
                 int k) {
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int o0 = 0; o0 < n; o0 += ROWS) {
        int rows = n - o0 < ROWS ? n - o0 : ROWS;
        for (int b = 0; b < m; b++) {
            const float *xb = x + (size_t)b * k;
            float acc[ROWS] = {0.f, 0.f, 0.f, 0.f};
            if (rows == ROWS) {
                const int8_t *r0 = w + (size_t)(o0 + 0) * k, *r1 = w + (size_t)(o0 + 1) * k;
                const int8_t *r2 = w + (size_t)(o0 + 2) * k, *r3 = w + (size_t)(o0 + 3) * k;
                float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int i = 0; i < k; i++) {
                    float xi = xb[i];
                    a0 += xi * (float)r0[i];
                    a1 += xi * (float)r1[i];
                    a2 += xi * (float)r2[i];
                    a3 += xi * (float)r3[i];
                }
                acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
            } else {
                for (int r = 0; r < rows; r++) {
                    const int8_t *row = w + (size_t)(o0 + r) * k;
                    float a = 0.f;
#pragma omp simd reduction(+ : a)
                    for (int i = 0; i < k; i++) a += xb[i] * (float)row[i];
                    acc[r] = a;
                }
            }
            for (int r = 0; r < rows; r++) {
                int o = o0 + r;
                y[(size_t)b * n + o] = acc[r] * scale[o] + (bias ? bias[o] : 0.f);
            }
        }
    }
}

/* x_even / x_odd: x split by column parity, each [m, k/2], so the nibble loop is unit-stride. */
void w4_linear_f(const float *x_even, const float *x_odd, const int8_t *w, const float *scale, const float *bias,
                 float *y, int m, int n, int k) {
    int h = k / 2;
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int o0 = 0; o0 < n; o0 += ROWS) {
        int rows = n - o0 < ROWS ? n - o0 : ROWS;
        for (int b = 0; b < m; b++) {
            const float *xe = x_even + (size_t)b * h, *xo = x_odd + (size_t)b * h;
            for (int r = 0; r < rows; r++) {
                const int8_t *row = w + (size_t)(o0 + r) * h;
                float a = 0.f;
#pragma omp simd reduction(+ : a)
                for (int j = 0; j < h; j++) {
                    int8_t byte = row[j];
                    float hi = (float)(byte >> 4);                /* even column, sign kept */
                    float lo = (float)((int8_t)(byte << 4) >> 4); /* odd column */
                    a += xe[j] * hi + xo[j] * lo;
                }
                int o = o0 + r;
                y[(size_t)b * n + o] = a * scale[o] + (bias ? bias[o] : 0.f);
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------- */
/* bf16 / fp16 / fp32 GEMV: y [m, n] fp32 = x [m, k] fp32 @ w [n, k]^T (+ bias), fp32 accumulation. Each x row  */
/* is summed in one fixed order whatever m is, so a row gets the same bits alone and in a batch (torch's sgemm  */
/* does not promise that for fp32 weights).                                                                  */

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float fp16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    float f;
    if (e == 0) {
        f = (float)man * 5.9604644775390625e-8f; /* zero or subnormal: man * 2^-24, exact */
        memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((e + 112u) << 23) | (man << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Weight element types (kernels.WEIGHT_TYPES). */
enum { W_FP32 = 0, W_BF16 = 1, W_FP16 = 2 };

/* weight element i of a vector of type wtype, as fp32 */
static inline float weight_at(const void *w, int wtype, size_t i) {
    if (wtype == W_FP32) return ((const float *)w)[i];
    uint16_t v = ((const uint16_t *)w)[i];
    return wtype == W_BF16 ? bf16_to_float(v) : fp16_to_float(v);
}

/* One x row against R rows (portable). */
static inline void float_rows_portable(const float *x, const void *w, size_t k, int R, int wtype, float *sums) {
    size_t esize = wtype == W_FP32 ? 4 : 2;
    for (int r = 0; r < R; r++) {
        const void *row = (const char *)w + r * k * esize;
        float a = 0.f;
        if (wtype == W_FP16) {
            for (size_t i = 0; i < k; i++) a += x[i] * fp16_to_float(((const uint16_t *)row)[i]);
        } else if (wtype == W_FP32) {
            const float *f = (const float *)row;
#pragma omp simd reduction(+ : a)
            for (size_t i = 0; i < k; i++) a += x[i] * f[i];
        } else {
            const uint16_t *h = (const uint16_t *)row;
#pragma omp simd reduction(+ : a)
            for (size_t i = 0; i < k; i++) a += x[i] * bf16_to_float(h[i]);
        }
        sums[r] = a;
    }
}

#ifdef USE_AVX2
/* bf16: xs is x rearranged per 16 columns as 8 even then 8 odd (so one 32-byte load of weights gives both
 * halves by a shift and a mask, no shuffles). kv = k rounded down to 16; the rest is done by the caller. */
static inline void bf16_rows_avx2(const float *xs, const uint16_t *w, size_t k, size_t kv, int R, float *sums) {
    const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
    if (R == ROWS) {
        __m256 a[2 * ROWS];
        for (int i = 0; i < 2 * ROWS; i++) a[i] = _mm256_setzero_ps();
        for (size_t i = 0; i < kv; i += 16) {
            __m256 xe = _mm256_loadu_ps(xs + i), xo = _mm256_loadu_ps(xs + i + 8);
            for (int r = 0; r < ROWS; r++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * k + i));
                a[2 * r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, a[2 * r]);
                a[2 * r + 1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)), xo, a[2 * r + 1]);
            }
        }
        for (int r = 0; r < ROWS; r++) sums[r] = hsum256(_mm256_add_ps(a[2 * r], a[2 * r + 1]));
    } else {
        for (int r = 0; r < R; r++) {
            __m256 ae = _mm256_setzero_ps(), ao = _mm256_setzero_ps();
            for (size_t i = 0; i < kv; i += 16) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(w + r * k + i));
                ae = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), _mm256_loadu_ps(xs + i), ae);
                ao = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi_mask)), _mm256_loadu_ps(xs + i + 8),
                                     ao);
            }
            sums[r] = hsum256(_mm256_add_ps(ae, ao));
        }
    }
}

/* fp32: per row two accumulators, columns i..i+7 and i+8..i+15 of every 16; four rows share each x load. */
static inline void fp32_rows_avx2(const float *x, const float *w, size_t k, size_t kv, int R, float *sums) {
    if (R == ROWS) {
        __m256 a[2 * ROWS];
        for (int i = 0; i < 2 * ROWS; i++) a[i] = _mm256_setzero_ps();
        for (size_t i = 0; i < kv; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int r = 0; r < ROWS; r++) {
                a[2 * r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i), x0, a[2 * r]);
                a[2 * r + 1] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i + 8), x1, a[2 * r + 1]);
            }
        }
        for (int r = 0; r < ROWS; r++) sums[r] = hsum256(_mm256_add_ps(a[2 * r], a[2 * r + 1]));
    } else {
        for (int r = 0; r < R; r++) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (size_t i = 0; i < kv; i += 16) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i), _mm256_loadu_ps(x + i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * k + i + 8), _mm256_loadu_ps(x + i + 8), a1);
            }
            sums[r] = hsum256(_mm256_add_ps(a0, a1));
        }
    }
}
#endif

#ifdef USE_F16C
static inline void fp16_rows_f16c(const float *x, const uint16_t *w, size_t k, size_t kv, int R, float *sums) {
    for (int r0 = 0; r0 < R; r0 += 2) {
        int two = R - r0 >= 2;
        const uint16_t *p0 = w + r0 * k, *p1 = w + (r0 + two) * k;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
        for (size_t i = 0; i < kv; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p0 + i))), x0, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p0 + i + 8))), x1, a1);
            b0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p1 + i))), x0, b0);
            b1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p1 + i + 8))), x1, b1);
        }
        sums[r0] = hsum256(_mm256_add_ps(a0, a1));
        if (two) sums[r0 + 1] = hsum256(_mm256_add_ps(b0, b1));
    }
}
#endif

/* wtype: W_BF16, W_FP16 or W_FP32 (the weight's element type). Returns 0, or -1 when out of memory. */
int float_linear(const float *x, const void *w, const float *bias, float *y, int m, int n, int k, int wtype) {
    size_t kk = (size_t)k, kv = 0, esize = wtype == W_FP32 ? 4 : 2;
    float *xbuf = NULL;
#ifdef USE_AVX2
    kv = kk / 16 * 16;
#ifndef USE_F16C
    if (wtype == W_FP16) kv = 0;
#endif
    if (wtype == W_BF16 && kv) {
        xbuf = (float *)malloc(((size_t)m * kv + 1) * sizeof(float));
        if (!xbuf) return -1;
        for (int b = 0; b < m; b++)
            for (size_t i = 0; i < kv; i += 16)
                for (int j = 0; j < 8; j++) {
                    xbuf[(size_t)b * kv + i + j] = x[(size_t)b * kk + i + 2 * j];
                    xbuf[(size_t)b * kv + i + 8 + j] = x[(size_t)b * kk + i + 2 * j + 1];
                }
    }
#endif
#pragma omp parallel for schedule(static) PAR_IF((double)m * n * k)
    for (int o0 = 0; o0 < n; o0 += ROWS) {
        int rows = n - o0 < ROWS ? n - o0 : ROWS;
        const char *wr = (const char *)w + (size_t)o0 * kk * esize;
        for (int b = 0; b < m; b++) {
            const float *xb = x + (size_t)b * kk;
            float sums[ROWS] = {0.f, 0.f, 0.f, 0.f};
            if (kv) {
#ifdef USE_AVX2
                if (wtype == W_BF16) bf16_rows_avx2(xbuf + (size_t)b * kv, (const uint16_t *)wr, kk, kv, rows, sums);
                if (wtype == W_FP32) fp32_rows_avx2(xb, (const float *)wr, kk, kv, rows, sums);
#endif
#ifdef USE_F16C
                if (wtype == W_FP16) fp16_rows_f16c(xb, (const uint16_t *)wr, kk, kv, rows, sums);
#endif
                for (int r = 0; r < rows; r++) {
                    const char *row = wr + r * kk * esize;
                    for (size_t i = kv; i < kk; i++) sums[r] += xb[i] * weight_at(row, wtype, i);
                }
            } else {
                float_rows_portable(xb, wr, kk, rows, wtype, sums);
            }
            for (int r = 0; r < rows; r++) {
                int o = o0 + r;
                y[(size_t)b * n + o] = sums[r] + (bias ? bias[o] : 0.f);
            }
        }
    }
    free(xbuf);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------- */

/* Exact unpacking (tests compare it with the PyTorch reference): [n, k/2] -> [n, k]. */
void unpack_int4(const int8_t *w, int8_t *out, int n, int k) {
    int h = k / 2;
#pragma omp parallel for schedule(static)
    for (int o = 0; o < n; o++) {
        for (int j = 0; j < h; j++) {
            int8_t byte = w[(size_t)o * h + j];
            out[(size_t)o * k + 2 * j] = (int8_t)(byte >> 4);
            out[(size_t)o * k + 2 * j + 1] = (int8_t)((int8_t)(byte << 4) >> 4);
        }
    }
}

/* Dequantize to float [n, k] (for large batches: dequantize once, then a BLAS matmul). */
void dequantize(const int8_t *w, const float *scale, float *out, int n, int k, int bits) {
#pragma omp parallel for schedule(static)
    for (int o = 0; o < n; o++) {
        float s = scale[o];
        if (bits == 8) {
            for (int i = 0; i < k; i++) out[(size_t)o * k + i] = s * (float)w[(size_t)o * k + i];
        } else {
            int h = k / 2;
            for (int j = 0; j < h; j++) {
                int8_t byte = w[(size_t)o * h + j];
                out[(size_t)o * k + 2 * j] = s * (float)(byte >> 4);
                out[(size_t)o * k + 2 * j + 1] = s * (float)((int8_t)(byte << 4) >> 4);
            }
        }
    }
}

/* bf16 with round to nearest even (the weights are finite). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Dequantize rows [o0, o1) to bf16 [o1 - o0, k] (prefill on a CPU with native bf16 matmuls: a block of weight
 * rows dequantized once, then torch's bf16 GEMM over every row of x). */
void dequantize_bf16(const int8_t *w, const float *scale, uint16_t *out, int o0, int o1, int k, int bits) {
#pragma omp parallel for schedule(static)
    for (int o = o0; o < o1; o++) {
        float s = scale[o];
        uint16_t *row = out + (size_t)(o - o0) * k;
        int i0 = 0;
        if (bits == 8) {
            const int8_t *src = w + (size_t)o * k;
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(CHATGLM_PORTABLE)
            /* 16 weights at a time: s * q in fp32, then the same rounding as float_to_bf16 on the bits */
            const __m512 sv = _mm512_set1_ps(s);
            const __m512i bias = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1);
            for (; i0 + 16 <= k; i0 += 16) {
                __m512i u = _mm512_castps_si512(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(src + i0)))), sv));
                u = _mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
                _mm256_storeu_si256((__m256i *)(row + i0), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            }
#endif
            for (int i = i0; i < k; i++) row[i] = float_to_bf16(s * (float)src[i]);
        } else {
            uint16_t lut[32]; /* the 16 nibble values times the scale (twice: a full vpermw table) */
            for (int v = 0; v < 32; v++) lut[v] = float_to_bf16(s * (float)((v & 15) < 8 ? (v & 15) : (v & 15) - 16));
            const uint8_t *src = (const uint8_t *)w + (size_t)o * (k / 2);
            int j0 = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__) && !defined(CHATGLM_PORTABLE)
            /* 16 bytes -> 32 columns: each byte b in a 32-bit lane as (b >> 4) | (b & 15) << 16, i.e. the high
             * nibble's word first (the even column), then a table lookup per 16-bit word */
            const __m512i table = _mm512_loadu_si512((const void *)lut), m4 = _mm512_set1_epi32(15);
            for (; 2 * (j0 + 16) <= k; j0 += 16) {
                __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + j0)));
                __m512i idx = _mm512_or_si512(_mm512_srli_epi32(b, 4), _mm512_slli_epi32(_mm512_and_si512(b, m4), 16));
                _mm512_storeu_si512((void *)(row + 2 * j0), _mm512_permutexvar_epi16(idx, table));
            }
#endif
            for (int j = j0; j < k / 2; j++) {
                row[2 * j] = lut[src[j] >> 4];
                row[2 * j + 1] = lut[src[j] & 15];
            }
        }
    }
}

/* ------------------------------------------------------------------------------------------------------- */
/* Decode helpers on fp32 activations: one call where the PyTorch path runs several small ops per layer.     */
/* At batch 1 those ops cost more in dispatch than in arithmetic (tens of microseconds a layer).             */

#include <math.h>

#ifdef USE_AVX2
/* e^x as 2^n * poly(r), |r| <= ln2/2, a degree-6 Taylor polynomial (relative error about 1.2e-7) for x in
 * [-87, 88]; x is clamped to that range (below -87 gives about 1e-38, not 0). */
static inline __m256 exp256_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* y = x * rsqrt(mean(x^2) + eps) * w per row of n (the RMSNorm of ChatGLM2/3), w float/bf16/fp16. */
void rms_norm_f32(const float *x, const void *w, int wtype, float *y, int rows, int n, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (size_t)r * n;
        float *yr = y + (size_t)r * n;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        int i = 0;
        for (; i + 8 <= n; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += xr[i + l] * xr[i + l];
        float ss = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; i < n; i++) ss += xr[i] * xr[i];
        float inv = 1.f / sqrtf(ss / (float)n + eps);
        for (i = 0; i < n; i++) yr[i] = xr[i] * inv * weight_at(w, wtype, (size_t)i);
    }
}

/* Rotary embedding in place. Each of `rows` rows (row_stride floats apart) holds `heads` heads of head_dim
 * floats; the first `rot` dims of every head turn as pairs (2i, 2i+1) by cs[row, i] = (cos, sin):
 * (a, b) -> (a cos - b sin, b cos + a sin). */
void rotary_f32(float *x, int rows, long row_stride, int heads, int head_dim, int rot, const float *cs) {
    for (int r = 0; r < rows; r++) {
        const float *c = cs + (size_t)r * rot;
        for (int h = 0; h < heads; h++) {
            float *p = x + (size_t)r * row_stride + (size_t)h * head_dim;
            for (int i = 0; i < rot / 2; i++) {
                float a = p[2 * i], b = p[2 * i + 1], cos_ = c[2 * i], sin_ = c[2 * i + 1];
                p[2 * i] = a * cos_ - b * sin_;
                p[2 * i + 1] = b * cos_ + a * sin_;
            }
        }
    }
}


#ifdef USE_AVX2
/* 8 cached floats at element i of an fp32 or bf16 (kv_bf16) buffer */
static inline __attribute__((always_inline)) __m256 kv_load8(const void *p, size_t i, const int kv_bf16) {
    if (kv_bf16)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

/* scores sc[h * T + t] = k[t] . qs[h] (qs is [per, d] fp32, d a multiple of 8; k fp32 or bf16, row stride st
 * elements): 8 dims a vector, four keys at a time against one head (the keys stay in L1 across the group's
 * heads). */
static inline __attribute__((always_inline)) void att_scores(const void *kg, long st, const float *qs, int d, int T,
                                                             int per, float *sc, const int kv_bf16) {
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        size_t r0 = (size_t)t * st, r1 = r0 + st, r2 = r1 + st, r3 = r2 + st;
        int h = 0;
        for (; h + 2 <= per; h += 2) { /* two heads: each key vector loaded once for both */
            const float *qa = qs + (size_t)h * d, *qb = qa + d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int j = 0; j < d; j += 8) {
                __m256 qva = _mm256_loadu_ps(qa + j), qvb = _mm256_loadu_ps(qb + j);
                __m256 k0 = kv_load8(kg, r0 + j, kv_bf16), k1 = kv_load8(kg, r1 + j, kv_bf16);
                __m256 k2 = kv_load8(kg, r2 + j, kv_bf16), k3 = kv_load8(kg, r3 + j, kv_bf16);
                a0 = _mm256_fmadd_ps(k0, qva, a0), b0 = _mm256_fmadd_ps(k0, qvb, b0);
                a1 = _mm256_fmadd_ps(k1, qva, a1), b1 = _mm256_fmadd_ps(k1, qvb, b1);
                a2 = _mm256_fmadd_ps(k2, qva, a2), b2 = _mm256_fmadd_ps(k2, qvb, b2);
                a3 = _mm256_fmadd_ps(k3, qva, a3), b3 = _mm256_fmadd_ps(k3, qvb, b3);
            }
            float *s = sc + (size_t)h * T + t, *z = s + T;
            s[0] = hsum256(a0), s[1] = hsum256(a1), s[2] = hsum256(a2), s[3] = hsum256(a3);
            z[0] = hsum256(b0), z[1] = hsum256(b1), z[2] = hsum256(b2), z[3] = hsum256(b3);
        }
        for (; h < per; h++) {
            const float *qh = qs + (size_t)h * d;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int j = 0; j < d; j += 8) {
                __m256 qv = _mm256_loadu_ps(qh + j);
                a0 = _mm256_fmadd_ps(kv_load8(kg, r0 + j, kv_bf16), qv, a0);
                a1 = _mm256_fmadd_ps(kv_load8(kg, r1 + j, kv_bf16), qv, a1);
                a2 = _mm256_fmadd_ps(kv_load8(kg, r2 + j, kv_bf16), qv, a2);
                a3 = _mm256_fmadd_ps(kv_load8(kg, r3 + j, kv_bf16), qv, a3);
            }
            float *s = sc + (size_t)h * T + t;
            s[0] = hsum256(a0), s[1] = hsum256(a1), s[2] = hsum256(a2), s[3] = hsum256(a3);
        }
    }
    for (; t < T; t++) {
        size_t r = (size_t)t * st;
        for (int h = 0; h < per; h++) {
            __m256 a = _mm256_setzero_ps();
            for (int j = 0; j < d; j += 8) a = _mm256_fmadd_ps(kv_load8(kg, r + j, kv_bf16), _mm256_loadu_ps(qs + (size_t)h * d + j), a);
            sc[(size_t)h * T + t] = hsum256(a);
        }
    }
}

/* e[t] = exp(s[t] - max_t s) in place over n floats; returns the sum of e. */
static float att_softmax_row(float *s, int n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    int t = 0;
    for (; t + 8 <= n; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
    float mx = -INFINITY, tail = 0.f;
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
    for (int i = t; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    __m256 vmx = _mm256_set1_ps(mx), vs = _mm256_setzero_ps();
    for (t = 0; t + 8 <= n; t += 8) {
        __m256 e = exp256_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
        _mm256_storeu_ps(s + t, e);
        vs = _mm256_add_ps(vs, e);
    }
    for (; t < n; t++) {
        s[t] = expf(s[t] - mx);
        tail += s[t];
    }
    return hsum256(vs) + tail;
}
#endif

/* Single-query attention: out[b, h * d + j] = sum_t softmax_t(scale * q[b, h] . k[b, g, t]) v[b, g, t, j], head
 * h reading KV group g = h / per (per = heads / groups). q: row stride q_stride elements per batch row, heads * d
 * contiguous; k, v: strides (sb, sg, st) in elements with d contiguous; q, k, v all fp32 or all bf16 (a bf16
 * model's activations and cache: read as they are, computed in fp32); out fp32. The `per` heads of a group are
 * done together, so each cached key and value is read once per group, not once per head (ChatGLM2: 16 heads a
 * group): scores s[h, t] = k[t] . (scale q)[h] vectorized over d (d a multiple of 8; else scalar), a softmax per
 * head vectorized over t, then out[h] += s[h, t] v[t] over blocks of TB positions that stay in L1. (Vectorizing
 * the scores over 8 heads instead, queries transposed, was 1.4x slower at ChatGLM2's 16 heads a group and left
 * ChatGLM-6B's one head a group scalar.) OpenMP over (batch, group). Returns -1 when out of memory.
 * lens: row bi attends to its first lens[bi] keys (rows of a batch at their own lengths), or NULL for T each. A
 * row's result depends only on its own query, keys and length: the same bits alone or beside any other rows. */
#define ATT_TB 32
static inline __attribute__((always_inline)) int attention_decode(const void *q, long q_stride, const void *k,
                                                                  const void *v, long sb, long sg, long st,
                                                                  const int *lens, float *out, int b, int heads,
                                                                  int groups, int T_all, int d, float scale,
                                                                  const int kv_bf16) {
    int per = heads / groups, units = b * groups, failed = 0;
    const int et = kv_bf16 ? W_BF16 : W_FP32;
    const size_t es = kv_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) PAR_IF(2.0 * b * heads * T_all * d)
    for (int u = 0; u < units; u++) {
        int bi = u / groups, g = u % groups;
        const int T = lens ? (lens[bi] < T_all ? lens[bi] : T_all) : T_all; /* this row's keys */
        const size_t kv_off = (size_t)bi * sb + (size_t)g * sg;
        const char *kg = (const char *)k + kv_off * es, *vg = (const char *)v + kv_off * es;
        const char *qg = (const char *)q + ((size_t)bi * q_stride + (size_t)g * per * d) * es;
        float *og = out + (size_t)bi * heads * d + (size_t)g * per * d;
        float *qt = (float *)malloc((size_t)d * per * sizeof(float));
        float *sc = (float *)malloc(((size_t)T * per + 1) * sizeof(float));
        float *mx = (float *)malloc((size_t)per * 2 * sizeof(float)), *sum = mx ? mx + per : NULL;
        if (!qt || !sc || !mx) {
            free(qt), free(sc), free(mx);
#pragma omp atomic write
            failed = 1;
            continue;
        }
        size_t sct = per, sch = 1; /* where score (t, h) is: sc[t * sct + h * sch] */
        for (int h = 0; h < per; h++) mx[h] = -INFINITY, sum[h] = 0.f;
#ifdef USE_AVX2
        if (d % 8 == 0) {
            for (size_t i = 0; i < (size_t)per * d; i++) qt[i] = weight_at(qg, et, i) * scale; /* [per, d] */
            sct = 1, sch = (size_t)T;
            att_scores(kg, st, qt, d, T, per, sc, kv_bf16);
            for (int h = 0; h < per; h++) sum[h] = att_softmax_row(sc + (size_t)h * T, T);
        } else
#endif
        {
            for (int h = 0; h < per; h++)
                for (int j = 0; j < d; j++) qt[(size_t)j * per + h] = weight_at(qg, et, (size_t)h * d + j) * scale;
            for (int t = 0; t < T; t++) {
                size_t kt = (size_t)t * st;
                for (int h = 0; h < per; h++) {
                    float a = 0.f;
                    for (int j = 0; j < d; j++) a += weight_at(kg, et, kt + j) * qt[(size_t)j * per + h];
                    sc[(size_t)t * per + h] = a;
                    mx[h] = a > mx[h] ? a : mx[h];
                }
            }
            for (int t2 = 0; t2 < T; t2++)
                for (int h = 0; h < per; h++) {
                    float e = expf(sc[(size_t)t2 * per + h] - mx[h]);
                    sc[(size_t)t2 * per + h] = e;
                    sum[h] += e;
                }
        }
        for (size_t i = 0; i < (size_t)per * d; i++) og[i] = 0.f;
        for (int t0 = 0; t0 < T; t0 += ATT_TB) {
            int t1 = t0 + ATT_TB < T ? t0 + ATT_TB : T;
            int h = 0;
#ifdef USE_AVX2
            for (; h + 2 <= per; h += 2) { /* two heads: each value vector loaded once for both */
                float *oa = og + (size_t)h * d, *ob = oa + d;
                const float *sa = sc + (size_t)h * sch, *sb2 = sa + sch;
                int j = 0;
                for (; j + 16 <= d; j += 16) {
                    __m256 a0 = _mm256_loadu_ps(oa + j), a1 = _mm256_loadu_ps(oa + j + 8);
                    __m256 b0 = _mm256_loadu_ps(ob + j), b1 = _mm256_loadu_ps(ob + j + 8);
                    for (int t2 = t0; t2 < t1; t2++) {
                        size_t vt = (size_t)t2 * st + j;
                        __m256 v0 = kv_load8(vg, vt, kv_bf16), v1 = kv_load8(vg, vt + 8, kv_bf16);
                        __m256 pa = _mm256_broadcast_ss(sa + (size_t)t2 * sct), pb = _mm256_broadcast_ss(sb2 + (size_t)t2 * sct);
                        a0 = _mm256_fmadd_ps(pa, v0, a0), a1 = _mm256_fmadd_ps(pa, v1, a1);
                        b0 = _mm256_fmadd_ps(pb, v0, b0), b1 = _mm256_fmadd_ps(pb, v1, b1);
                    }
                    _mm256_storeu_ps(oa + j, a0), _mm256_storeu_ps(oa + j + 8, a1);
                    _mm256_storeu_ps(ob + j, b0), _mm256_storeu_ps(ob + j + 8, b1);
                }
                for (; j < d; j++) {
                    float x = oa[j], y = ob[j];
                    for (int t2 = t0; t2 < t1; t2++) {
                        float w = weight_at(vg, et, (size_t)t2 * st + j);
                        x += sa[(size_t)t2 * sct] * w, y += sb2[(size_t)t2 * sct] * w;
                    }
                    oa[j] = x, ob[j] = y;
                }
            }
#endif
            for (; h < per; h++) {
                float *oh = og + (size_t)h * d;
                const float *sh = sc + (size_t)h * sch;
                int j = 0;
#ifdef USE_AVX2
                for (; j + 32 <= d; j += 32) {
                    __m256 a0 = _mm256_loadu_ps(oh + j), a1 = _mm256_loadu_ps(oh + j + 8);
                    __m256 a2 = _mm256_loadu_ps(oh + j + 16), a3 = _mm256_loadu_ps(oh + j + 24);
                    for (int t2 = t0; t2 < t1; t2++) {
                        size_t vt = (size_t)t2 * st + j;
                        __m256 p = _mm256_broadcast_ss(sh + (size_t)t2 * sct);
                        a0 = _mm256_fmadd_ps(p, kv_load8(vg, vt, kv_bf16), a0);
                        a1 = _mm256_fmadd_ps(p, kv_load8(vg, vt + 8, kv_bf16), a1);
                        a2 = _mm256_fmadd_ps(p, kv_load8(vg, vt + 16, kv_bf16), a2);
                        a3 = _mm256_fmadd_ps(p, kv_load8(vg, vt + 24, kv_bf16), a3);
                    }
                    _mm256_storeu_ps(oh + j, a0), _mm256_storeu_ps(oh + j + 8, a1);
                    _mm256_storeu_ps(oh + j + 16, a2), _mm256_storeu_ps(oh + j + 24, a3);
                }
                for (; j + 8 <= d; j += 8) {
                    __m256 a = _mm256_loadu_ps(oh + j);
                    for (int t2 = t0; t2 < t1; t2++)
                        a = _mm256_fmadd_ps(_mm256_broadcast_ss(sh + (size_t)t2 * sct),
                                            kv_load8(vg, (size_t)t2 * st + j, kv_bf16), a);
                    _mm256_storeu_ps(oh + j, a);
                }
#endif
                for (; j < d; j++) {
                    float a = oh[j];
                    for (int t2 = t0; t2 < t1; t2++) a += sh[(size_t)t2 * sct] * weight_at(vg, et, (size_t)t2 * st + j);
                    oh[j] = a;
                }
            }
        }
        for (int h = 0; h < per; h++) {
            float inv = 1.f / sum[h];
            for (int j = 0; j < d; j++) og[(size_t)h * d + j] *= inv;
        }
        free(qt), free(sc), free(mx);
    }
    return failed ? -1 : 0;
}

int attention_decode_f32(const float *q, long q_stride, const float *k, const float *v, long sb, long sg, long st,
                         const int *lens, float *out, int b, int heads, int groups, int T_all, int d, float scale) {
    return attention_decode(q, q_stride, k, v, sb, sg, st, lens, out, b, heads, groups, T_all, d, scale, 0);
}

int attention_decode_bf16(const uint16_t *q, long q_stride, const uint16_t *k, const uint16_t *v, long sb, long sg,
                          long st, const int *lens, float *out, int b, int heads, int groups, int T_all, int d,
                          float scale) {
    return attention_decode(q, q_stride, k, v, sb, sg, st, lens, out, b, heads, groups, T_all, d, scale, 1);
}

/* out[r, i] = silu(h[r, i]) * h[r, f + i] for rows of 2f (the [gate | up] output of ChatGLM2's h_to_4h). */
void silu_mul_f32(const float *h, float *out, int rows, int f) {
    for (int r = 0; r < rows; r++) {
        const float *gate = h + (size_t)r * 2 * f, *up = gate + f;
        float *o = out + (size_t)r * f;
        int i = 0;
#ifdef USE_AVX2
        const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
        for (; i + 8 <= f; i += 8) {
            __m256 g = _mm256_loadu_ps(gate + i);
            __m256 e = exp256_ps(_mm256_sub_ps(zero, g));
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
        }
#endif
        for (; i < f; i++) o[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
    }
}

/* The greedy choice of each of `rows` rows of scores (row r at x + r * stride): ids[r] = the index torch.argmax
 * gives over x[r, 0:limit) (the first maximum; the first NaN when there is one), finite[r] = whether every
 * x[r, 0:n) is finite (limit <= n). One pass finds the maximum and any NaN or infinity, a second the first index
 * holding it; torch's argmax and isfinite over 65024 scores take 60-130 us a row on 2 threads, this about 10. */
void greedy_rows(const float *x, long stride, int rows, int n, int limit, int *ids, int *finite) {
    for (int r = 0; r < rows; r++) {
        const float *p = x + (size_t)r * stride;
        float mx = -INFINITY;
        int nan = 0, bad = 0, i = 0;
#ifdef USE_AVX2
        __m256 vm = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps(), vbad = _mm256_setzero_ps();
        for (; i + 8 <= limit; i += 8) {
            __m256 v = _mm256_loadu_ps(p + i);
            vm = _mm256_max_ps(vm, v);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            __m256 d = _mm256_sub_ps(v, v); /* NaN for NaN and +-inf */
            vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(d, d, _CMP_UNORD_Q));
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vm);
        for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
        nan = _mm256_movemask_ps(vnan) != 0;
        bad = _mm256_movemask_ps(vbad) != 0;
#endif
        for (; i < limit; i++) {
            float v = p[i];
            nan |= v != v;
            bad |= !(v - v == 0.f);
            mx = v > mx ? v : mx;
        }
        for (i = limit; i < n; i++) bad |= !(p[i] - p[i] == 0.f);
        int at = 0;
        if (nan) {
            while (at < limit && p[at] == p[at]) at++;
        } else {
            i = 0;
#ifdef USE_AVX2
            __m256 vmx = _mm256_set1_ps(mx);
            for (; i + 8 <= limit; i += 8) {
                int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + i), vmx, _CMP_EQ_OQ));
                if (mask) break;
            }
#endif
            while (i < limit && p[i] != mx) i++;
            at = i < limit ? i : 0;
        }
        ids[r] = at;
        finite[r] = !bad;
    }
}
