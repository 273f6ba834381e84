/* Row dot products of the scoring kernels (_score.pyx): one query row against one table row.
 *
 * The sum runs in 8 interleaved lanes (lane l takes d = l, l + 8, ...; the lanes are then added
 * 0..7 in order), each step an fma, so the order of operations is fixed by `dim` alone: the same bits
 * for any thread count, and in both target_clones versions (fma is exactly rounded everywhere).
 */
#ifndef CEMBED_SCORE_H
#define CEMBED_SCORE_H

#include <math.h>
#include <stddef.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CEMBED_SCORE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define CEMBED_SCORE_CLONES __attribute__((unused))
#else
#define CEMBED_SCORE_CLONES
#endif

#define CEMBED_DEFINE_DOT(NAME, T, FMA)                                                                \
CEMBED_SCORE_CLONES static T NAME(const T *restrict a, const T *restrict b, ptrdiff_t dim)            \
{                                                                                                      \
    T lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
    ptrdiff_t d = 0;                                                                                   \
    for (; d + 8 <= dim; d += 8)                                                                       \
        for (int l = 0; l < 8; l++) lanes[l] = FMA(a[d + l], b[d + l], lanes[l]);                     \
    for (int l = 0; d < dim; d++, l++) lanes[l] = FMA(a[d], b[d], lanes[l]);                           \
    T total = lanes[0];                                                                                \
    for (int l = 1; l < 8; l++) total = total + lanes[l];                                              \
    return total;                                                                                      \
}

CEMBED_DEFINE_DOT(cembed_dot_f32, float, fmaf)
CEMBED_DEFINE_DOT(cembed_dot_f64, double, fma)

/* out[d] = fma(scale, row[d], out[d]) */
CEMBED_SCORE_CLONES static void cembed_score_axpy_f32(float *restrict out, const float *restrict row, float scale,
                                                      ptrdiff_t dim)
{
    for (ptrdiff_t d = 0; d < dim; d++) out[d] = fmaf(scale, row[d], out[d]);
}

CEMBED_SCORE_CLONES static void cembed_score_axpy_f64(double *restrict out, const double *restrict row, double scale,
                                                      ptrdiff_t dim)
{
    for (ptrdiff_t d = 0; d < dim; d++) out[d] = fma(scale, row[d], out[d]);
}

#endif
