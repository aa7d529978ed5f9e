/* Weight-only INT8 / INT4 linear layers for the CPU, in the THUDM layout.
 *
 *   y[b, o] = scale[o] * sum_i x[b, i] * q[o, i] + bias[o]
 *
 * q is int8 [n, k], or int4 packed two per byte [n, k/2] with the even column in the high nibble.
 * Each weight row is read from memory once per call and reused for every row of x (decode and small
 * batches are memory-bound: the weights are the traffic). Rows of the output are split across OpenMP
 * threads. Build: gcc -O3 -fPIC -shared -fopenmp -std=c99 [-march=native]
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
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

/* Rows per task: 4 outputs share each x load. */
#define ROWS 4

void w8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y, int m, int n,
               int k) {
#pragma omp parallel for schedule(static)
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
void w4_linear(const float *x_even, const float *x_odd, const int8_t *w, const float *scale, const float *bias,
               float *y, int m, int n, int k) {
    int h = k / 2;
#pragma omp parallel for schedule(static)
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
                    float hi = (float)(byte >> 4);                  /* even column, sign kept */
                    float lo = (float)((int8_t)(byte << 4) >> 4);   /* odd column */
                    a += xe[j] * hi + xo[j] * lo;
                }
                int o = o0 + r;
                y[(size_t)b * n + o] = a * scale[o] + (bias ? bias[o] : 0.f);
            }
        }
    }
}

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
