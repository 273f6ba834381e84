/* Row dot products of the scoring kernels (_score.pyx): one query row against one table row.
 *
 * The sum runs in 8 interleaved lanes (lane l takes d = l, l + 8, ...; the lanes are then added
 * 0..7 in order), each step an fma, so the order of operations is fixed by `dim` alone: the same bits
 * for any thread count, and in both target_clones versions (fma is exactly rounded everywhere).
 * A 16-bit table's rows (bfloat16 / float16 bit patterns) are widened exactly inside the loops, so
 * scoring them gives the bits of scoring their float32 copy.
 */
#ifndef CEMBED_SCORE_H
#define CEMBED_SCORE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "_half.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CEMBED_SCORE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define CEMBED_SCORE_CLONES __attribute__((unused))
#else
#define CEMBED_SCORE_CLONES
#endif

/* NAME(a, b, dim) = <a, b>; b's elements go through LOAD (the identity, or the exact widening of a
 * 16-bit table's bit patterns: the same bits as the dot with the widened float32 row) */
#define CEMBED_DEFINE_DOT(NAME, T, ROW_T, FMA, LOAD)                                                   \
CEMBED_SCORE_CLONES static T NAME(const T *restrict a, const ROW_T *restrict b, ptrdiff_t dim)        \
{                                                                                                      \
    T lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
    ptrdiff_t d = 0;                                                                                   \
    for (; d + 8 <= dim; d += 8) {                                                                     \
        /* not unrolled: GCC then vectorises the 8 lanes as one vector fma (the same bits); unrolled,  */ \
        /* it left 8 scalar fmas per step                                                               */ \
        _Pragma("GCC unroll 1")                                                                        \
        for (int l = 0; l < 8; l++) lanes[l] = FMA(a[d + l], LOAD(b[d + l]), lanes[l]);               \
    }                                                                                                  \
    for (int l = 0; d < dim; d++, l++) lanes[l] = FMA(a[d], LOAD(b[d]), lanes[l]);                     \
    T total = lanes[0];                                                                                \
    for (int l = 1; l < 8; l++) total = total + lanes[l];                                              \
    return total;                                                                                      \
}

/* NAME(out, row, scale, dim): out[d] = fma(scale, LOAD(row[d]), out[d]) */
#define CEMBED_DEFINE_SCORE_AXPY(NAME, T, ROW_T, FMA, LOAD)                                            \
CEMBED_SCORE_CLONES static void NAME(T *restrict out, const ROW_T *restrict row, T scale, ptrdiff_t dim) \
{                                                                                                      \
    for (ptrdiff_t d = 0; d < dim; d++) out[d] = FMA(scale, LOAD(row[d]), out[d]);                     \
}

#define CEMBED_SCORE_SAME(x) (x)

CEMBED_DEFINE_DOT(cembed_dot_f32, float, float, fmaf, CEMBED_SCORE_SAME)
CEMBED_DEFINE_DOT(cembed_dot_f64, double, double, fma, CEMBED_SCORE_SAME)
CEMBED_DEFINE_DOT(cembed_dot_bf16, float, uint16_t, fmaf, cembed_bf16_to_f32)
CEMBED_DEFINE_DOT(cembed_dot_f16, float, uint16_t, fmaf, cembed_f16_to_f32)

CEMBED_DEFINE_SCORE_AXPY(cembed_score_axpy_f32, float, float, fmaf, CEMBED_SCORE_SAME)
CEMBED_DEFINE_SCORE_AXPY(cembed_score_axpy_f64, double, double, fma, CEMBED_SCORE_SAME)
CEMBED_DEFINE_SCORE_AXPY(cembed_score_axpy_bf16, float, uint16_t, fmaf, cembed_bf16_to_f32)
CEMBED_DEFINE_SCORE_AXPY(cembed_score_axpy_f16, float, uint16_t, fmaf, cembed_f16_to_f32)

/* the 16-bit rows of format fmt (CEMBED_TABLE_BF16 / CEMBED_TABLE_F16) */
static inline __attribute__((unused)) float cembed_dot_half(int fmt, const float *a, const uint16_t *b, ptrdiff_t dim)
{
    return fmt == CEMBED_TABLE_BF16 ? cembed_dot_bf16(a, b, dim) : cembed_dot_f16(a, b, dim);
}

static inline __attribute__((unused)) void cembed_score_axpy_half(int fmt, float *out, const uint16_t *row, float scale,
                                                                  ptrdiff_t dim)
{
    if (fmt == CEMBED_TABLE_BF16) cembed_score_axpy_bf16(out, row, scale, dim);
    else cembed_score_axpy_f16(out, row, scale, dim);
}

#endif
