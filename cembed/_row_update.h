/* Row update routines: one call updates one row of `dim` elements (gradient accumulation, the
 * optimizer steps). The Cython side reaches them only through the fused wrappers in _rows.pxd.
 *
 * Several of them use a fused multiply-add (torch's Adagrad, SGD and scale_grad_by_freq do). Without
 * -mfma the compiler turns fma()/fmaf() into a libm call per element, so these functions are compiled
 * twice on x86-64 GCC (target_clones): a baseline version and an FMA/AVX2 one chosen at load time by
 * the CPU, so the portable build still runs the vector fma instruction where the CPU has it.
 * Results are identical in both versions (fma is exactly rounded everywhere).
 */
#ifndef CEMBED_ROW_UPDATE_H
#define CEMBED_ROW_UPDATE_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "_half.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CEMBED_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define CEMBED_CLONES __attribute__((unused))
#else
#define CEMBED_CLONES
#endif

/* w[j] = fma(alpha, sign * g[j], w[j]) */
CEMBED_CLONES static void cembed_axpy_fma_f32(float *restrict w, const float *restrict g, float alpha, float sign, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) w[j] = fmaf(alpha, sign * g[j], w[j]);
}

CEMBED_CLONES static void cembed_axpy_fma_f64(double *restrict w, const double *restrict g, double alpha, double sign, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) w[j] = fma(alpha, sign * g[j], w[j]);
}

/* Adagrad row: h += g*g; w = fma(neg_clr, g / (sqrt(h) + eps), w), with g = sign * grad. */
CEMBED_CLONES static void cembed_adagrad_row_f32(float *w, float *h, const float *grad, float neg_clr, float eps,
                                                 float sign, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) {
        float g = sign * grad[j];
        float hj = h[j] + g * g;
        h[j] = hj;
        w[j] = fmaf(neg_clr, g / (sqrtf(hj) + eps), w[j]);
    }
}

CEMBED_CLONES static void cembed_adagrad_row_f64(double *w, double *h, const double *grad, double neg_clr,
                                                 double eps, double sign, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) {
        double g = sign * grad[j];
        double hj = h[j] + g * g;
        h[j] = hj;
        w[j] = fma(neg_clr, g / (sqrt(hj) + eps), w[j]);
    }
}

/* SparseAdam row (docs/behaviour.md §8.2), g = sign * grad:
 * dm = (g - m0)(1 - b1); dv = (g*g - v0)(1 - b2); m = m0 + dm; v = v0 + dv;
 * w = w + neg_step * ((dm + m0) / (sqrt(dv + v0) + eps)) */
#define CEMBED_DEFINE_ADAM_ROW(NAME, T, SQRT)                                                          \
CEMBED_CLONES static void NAME(T *restrict w, T *restrict m, T *restrict v, const T *restrict grad,    \
                               T one_minus_beta1, T one_minus_beta2, T eps, T neg_step, T sign,        \
                               ptrdiff_t dim)                                                          \
{                                                                                                      \
    for (ptrdiff_t j = 0; j < dim; j++) {                                                              \
        const T g = sign * grad[j], m0 = m[j], v0 = v[j];                                              \
        const T dm = (g - m0) * one_minus_beta1;                                                       \
        const T dv = (g * g - v0) * one_minus_beta2;                                                   \
        m[j] = m0 + dm;                                                                                \
        v[j] = v0 + dv;                                                                                \
        w[j] = w[j] + neg_step * ((dm + m0) / (SQRT(dv + v0) + eps));                                  \
    }                                                                                                  \
}
CEMBED_DEFINE_ADAM_ROW(cembed_adam_row_f32, float, sqrtf)
CEMBED_DEFINE_ADAM_ROW(cembed_adam_row_f64, double, sqrt)

/* out[j] = out[j] + scale * v[j] (two roundings, like torch's unfused paths) */
CEMBED_CLONES static void cembed_axpy_f32(float *restrict out, const float *restrict v, float scale, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + scale * v[j];
}

CEMBED_CLONES static void cembed_axpy_f64(double *restrict out, const double *restrict v, double scale, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + scale * v[j];
}

/* out[j] = out[j] + v[j] */
CEMBED_CLONES static void cembed_add_f32(float *restrict out, const float *restrict v, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + v[j];
}

CEMBED_CLONES static void cembed_add_f64(double *restrict out, const double *restrict v, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + v[j];
}

/* out[j] = fma(x[j], y[j], out[j]): torch's addcmul_(x, y, value=1) on the CPU (dense Adagrad) */
CEMBED_CLONES static void cembed_add_product_f32(float *restrict out, const float *x, const float *y, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = fmaf(x[j], y[j], out[j]);
}

CEMBED_CLONES static void cembed_add_product_f64(double *restrict out, const double *x, const double *y, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = fma(x[j], y[j], out[j]);
}

/* out[j] = fma(scale * v[j], inv, out[j]) (scale_grad_by_freq accumulation) */
CEMBED_CLONES static void cembed_fma_accumulate_f32(float *out, const float *v, float scale, float inv, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = fmaf(scale * v[j], inv, out[j]);
}

CEMBED_CLONES static void cembed_fma_accumulate_f64(double *out, const double *v, double scale, double inv,
                                                    ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = fma(scale * v[j], inv, out[j]);
}

/* ---- 16-bit gradient rows (grad_output in a 16-bit table's own dtype) -------------------------
 * The three accumulations above with v a bfloat16 / float16 row (fmt as _half.h), each element widened
 * exactly to float32 inside the expression: the same bits as widening the row first and calling the
 * float32 routine (widening is exact and the build keeps the compiler from contracting a * b + c). */
#define CEMBED_DEFINE_HALF_ACCUMULATE(SUFFIX, WIDEN)                                                   \
CEMBED_CLONES static void cembed_add_##SUFFIX(float *restrict out, const uint16_t *restrict v, ptrdiff_t dim) \
{                                                                                                      \
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + WIDEN(v[j]);                                 \
}                                                                                                      \
CEMBED_CLONES static void cembed_axpy_##SUFFIX(float *restrict out, const uint16_t *restrict v, float scale, \
                                               ptrdiff_t dim)                                          \
{                                                                                                      \
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = out[j] + scale * WIDEN(v[j]);                         \
}                                                                                                      \
CEMBED_CLONES static void cembed_fma_accumulate_##SUFFIX(float *out, const uint16_t *v, float scale, float inv, \
                                                         ptrdiff_t dim)                                \
{                                                                                                      \
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = fmaf(scale * WIDEN(v[j]), inv, out[j]);               \
}
CEMBED_DEFINE_HALF_ACCUMULATE(bf16, cembed_bf16_to_f32)
CEMBED_DEFINE_HALF_ACCUMULATE(f16, cembed_f16_to_f32)

/* Row-wise Adagrad row (FBGEMM's EXACT_ROWWISE_ADAGRAD rule), g = sign * grad, in the row's type:
 *   s = sum over d of h_d^2 with h = g + wd * w ("l2", mode 1) or h = g (modes 0, 2), accumulated in
 *       8 interleaved lanes (lane l takes d = l, l + 8, ...; the lanes are then added 0..7 in order)
 *   state += s / dim;  multiplier = lr / (sqrt(state) + eps)
 *   correction = 1 - multiplier * wd (l2), 1 - lr * wd (decoupled, mode 2), or 1
 *   w = correction * w - g * multiplier                                    (two roundings each) */
#define CEMBED_DEFINE_ROWWISE_ADAGRAD_ROW(NAME, T, SQRT)                                               \
CEMBED_CLONES static void NAME(T *restrict w, T *restrict state, const T *restrict grad, T sign,      \
                               T lr, T eps, T weight_decay, int mode, ptrdiff_t dim)                  \
{                                                                                                      \
    T lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};                                                             \
    ptrdiff_t d = 0;                                                                                   \
    /* the mode is tested outside the lane loops, so each of them vectorises (8 lanes: one AVX      */ \
    /* register or two SSE ones, the same bits)                                                      */ \
    if (mode == 1) {                                                                                   \
        for (; d + 8 <= dim; d += 8)                                                                   \
            for (int l = 0; l < 8; l++) {                                                              \
                const T h = sign * grad[d + l] + weight_decay * w[d + l];                              \
                lanes[l] = lanes[l] + h * h;                                                           \
            }                                                                                          \
    } else {                                                                                           \
        for (; d + 8 <= dim; d += 8)                                                                   \
            for (int l = 0; l < 8; l++) {                                                              \
                const T h = sign * grad[d + l];                                                        \
                lanes[l] = lanes[l] + h * h;                                                           \
            }                                                                                          \
    }                                                                                                  \
    for (int l = 0; d < dim; d++, l++) {                                                               \
        T h = sign * grad[d];                                                                          \
        if (mode == 1) h = h + weight_decay * w[d];                                                    \
        lanes[l] = lanes[l] + h * h;                                                                   \
    }                                                                                                  \
    T total = lanes[0];                                                                                \
    for (int l = 1; l < 8; l++) total = total + lanes[l];                                              \
    const T updated = state[0] + total / (T)dim;                                                       \
    state[0] = updated;                                                                                \
    const T multiplier = lr / (SQRT(updated) + eps);                                                   \
    const T correction = mode == 1 ? (T)1 - multiplier * weight_decay                                  \
                       : mode == 2 ? (T)1 - lr * weight_decay : (T)1;                                  \
    for (ptrdiff_t j = 0; j < dim; j++)                                                                \
        w[j] = correction * w[j] - (sign * grad[j]) * multiplier;                                      \
}
CEMBED_DEFINE_ROWWISE_ADAGRAD_ROW(cembed_rowwise_adagrad_row_f32, float, sqrtf)
CEMBED_DEFINE_ROWWISE_ADAGRAD_ROW(cembed_rowwise_adagrad_row_f64, double, sqrt)

#endif

/* ---- SparseAdamW and per-row bias correction (docs/behaviour.md §8.5) ------------------------- */
#ifndef CEMBED_ROW_UPDATE_ADAMW_H
#define CEMBED_ROW_UPDATE_ADAMW_H

/* AdamW row, torch's single-tensor order (torch/optim/adam.py, decoupled_weight_decay=True), with
 * g = sign * grad and the row's pending decay folded in first:
 *   w = w * decay
 *   m = lerp(m, g, lerp_weight)        torch's vectorised lerp: fma(weight, g - m, m) for weight < 0.5,
 *                                      else fma(weight - 1, g - m, g)
 *   v = v * beta2 + (1 - beta2) * g * g
 *   w = w + (neg_step * m) / (sqrt(v) / bc2_sqrt + eps)                                          */
#define CEMBED_DEFINE_ADAMW_ROW(NAME, T, SQRT, FMA)                                                    \
CEMBED_CLONES static void NAME(T *restrict w, T *restrict m, T *restrict v, const T *restrict grad,    \
                               T decay, T lerp_weight, T beta2, T one_minus_beta2, T bc2_sqrt, T eps,  \
                               T neg_step, T sign, ptrdiff_t dim)                                      \
{                                                                                                      \
    const int small = lerp_weight < (T)0.5;                                                            \
    const T coeff = small ? lerp_weight : lerp_weight - (T)1;                                          \
    for (ptrdiff_t j = 0; j < dim; j++) {                                                              \
        const T g = sign * grad[j], m0 = m[j];                                                         \
        const T m1 = FMA(coeff, g - m0, small ? m0 : g);                                               \
        const T v1 = v[j] * beta2 + one_minus_beta2 * g * g;                                           \
        const T w1 = w[j] * decay;                                                                     \
        m[j] = m1;                                                                                     \
        v[j] = v1;                                                                                     \
        w[j] = w1 + neg_step * m1 / (SQRT(v1) / bc2_sqrt + eps);                                       \
    }                                                                                                  \
}
CEMBED_DEFINE_ADAMW_ROW(cembed_adamw_row_f32, float, sqrtf, fmaf)
CEMBED_DEFINE_ADAMW_ROW(cembed_adamw_row_f64, double, sqrt, fma)

/* w[j] = w[j] * scale (a row's pending weight decay) */
CEMBED_CLONES static void cembed_scale_f32(float *restrict w, float scale, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) w[j] = w[j] * scale;
}

CEMBED_CLONES static void cembed_scale_f64(double *restrict w, double scale, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) w[j] = w[j] * scale;
}

#endif
