/* Reproducible stochastic rounding of float32 to bfloat16 / float16 (docs/behaviour.md §8.7).
 *
 * Generator: counter-based, no state. Every rounding event is named by
 *   (seed, step, row, stream, column)
 * and its 32 random bits are a pure function of that name:
 *   key     = mix64(mix64(mix64(mix64(seed) ^ step) ^ row) ^ stream)     (one per row and array)
 *   draw(q) = hash32(lo32(key) ^ q * 0x9E3779B9) ^ hi32(key)              (q = 0, 1, ... per row)
 * mix64 is SplitMix64's step (add the golden gamma 0x9E3779B97F4A7C15, then its 64-bit finaliser);
 * hash32 is a 32-bit integer finaliser (xor-shift 16, * 0x7FEB352D, xor-shift 15, * 0x846CA68B,
 * xor-shift 16). Both are bijections, so within one row and array every draw has a different input.
 * float16 uses draw j for column j (32 bits); bfloat16 needs 16 bits per element, so one draw serves
 * two columns (cembed_f32_row_to_bf16_sr). Nothing depends on the thread that runs the row or on the other rows of the batch: the
 * result is bitwise the same for any thread count, any batching and across save / load / resume
 * (the step is part of the optimizer state).
 *
 * Stochastic rounding (x a float32, u the 32 random bits, lo <= |x| < hi the two neighbours of |x| in
 * the 16-bit format): the magnitude becomes hi when u < floor((|x| - lo) / (hi - lo) * 2**32), else
 * lo — hi with probability (|x| - lo) / (hi - lo), exactly whenever that fraction has at most 32 bits
 * (always for bfloat16 and for float16 normals; for float16 subnormals down to 2**-33, below which the
 * probability is truncated to a multiple of 2**-32). Exact values are
 * unchanged, signs are kept (magnitudes are rounded, so rounding is symmetric about zero), NaN stays
 * a quiet NaN, infinities stay infinite; past the largest finite value the next value up is infinity
 * (so a value between the largest finite one and the overflow threshold becomes infinity with
 * probability proportional to its distance, as round-to-nearest sends the upper half there).
 *   bfloat16: add the top 16 bits of ~u to the float32 bit pattern and keep its top 16 bits (a carry
 *             happens exactly when u < the dropped 16 bits, as a 32-bit fraction).
 *   float16:  normals: the same with 13 bits of ~u after rebiasing the exponent; subnormals (below
 *             2**-14): the magnitude in units of 2**-24 is split into integer q and remainder, and
 *             q + 1 is taken when u < remainder as a 32-bit fraction.
 * Nearest rounding (ties to even) is _half.h's.
 */
#ifndef CEMBED_ROUNDING_H
#define CEMBED_ROUNDING_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "_half.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CEMBED_ROUND_CLONES __attribute__((target_clones("arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define CEMBED_ROUND_CLONES __attribute__((unused))
#else
#define CEMBED_ROUND_CLONES
#endif

#if defined(__GNUC__) || defined(__clang__)
#define CEMBED_ROUND_INLINE static inline __attribute__((unused))
#else
#define CEMBED_ROUND_INLINE static inline
#endif

/* the random streams: which array of a row an event rounds (docs/behaviour.md §8.7) */
#define CEMBED_STREAM_WEIGHT 0
#define CEMBED_STREAM_STATE_A 1   /* exp_avg, Adagrad's sum, the momentum buffer, row-wise Adagrad's sum */
#define CEMBED_STREAM_STATE_B 2   /* exp_avg_sq */
#define CEMBED_STREAM_DECAY 3     /* SparseAdamW.apply_pending_decay's rounding of the weight */

/* ---- the generator ------------------------------------------------------------------------- */

CEMBED_ROUND_INLINE uint64_t cembed_mix64(uint64_t z)
{
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

CEMBED_ROUND_INLINE uint32_t cembed_hash32(uint32_t x)
{
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    x ^= x >> 16;
    return x;
}

/* the key of one row at one step, shared by its arrays (streams) */
CEMBED_ROUND_INLINE uint64_t cembed_row_key(uint64_t seed, uint64_t step, uint64_t row)
{
    return cembed_mix64(cembed_mix64(cembed_mix64(seed) ^ step) ^ row);
}

/* the key of one row of one array at one step */
CEMBED_ROUND_INLINE uint64_t cembed_round_key(uint64_t seed, uint64_t step, uint64_t row, uint64_t stream)
{
    return cembed_mix64(cembed_row_key(seed, step, row) ^ stream);
}

/* draw q (32 random bits) under a row key */
CEMBED_ROUND_INLINE uint32_t cembed_round_bits(uint32_t key_lo, uint32_t key_hi, uint32_t q)
{
    return cembed_hash32(key_lo ^ (q * 0x9E3779B9u)) ^ key_hi;
}

/* ---- stochastic rounding of one value ------------------------------------------------------ */

CEMBED_ROUND_INLINE uint16_t cembed_f32_to_bf16_sr(float x, uint32_t r)
{
    uint32_t u = cembed_f32_bits(x);
    /* carries into the kept part exactly when (r >> 16) < low16, i.e. when r < (x - lo) / (hi - lo)
     * as a 32-bit fraction */
    uint32_t rounded = (u + (~r >> 16)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x0040u;
    int is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (uint16_t)(is_nan ? quiet_nan : rounded);
}

CEMBED_ROUND_INLINE uint16_t cembed_f32_to_f16_sr(float x, uint32_t r)
{
    uint32_t u = cembed_f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    /* normal range [2**-14, 2**16): rebias, add 13 random bits below the kept mantissa, truncate
     * (a carry out of 65504 gives 0x7C00, infinity) */
    uint32_t normal = (a - ((127u - 15u) << 23) + (~r >> 19)) >> 13;
    /* below 2**-14: magnitude = m * 2**-s in units of 2**-24 (the float16 subnormal step) */
    uint32_t e = a >> 23;
    uint32_t m = e ? (a & 0x007FFFFFu) | 0x00800000u : a;
    uint32_t s = 126u - (e ? e : 1u);                      /* >= 14 here */
    uint32_t q = s < 32u ? m >> s : 0u;
    uint32_t rem = s < 32u ? m - (q << s) : m;
    uint64_t threshold = s <= 32u ? (uint64_t)rem << (32u - s)
                       : (s - 32u < 24u ? (uint64_t)(rem >> (s - 32u)) : 0u);
    uint32_t subnormal = q + ((uint64_t)r < threshold ? 1u : 0u);
    uint32_t nan = 0x7E00u | ((a >> 13) & 0x03FFu);
    uint32_t out = a > 0x7F800000u ? nan
                 : a >= 0x47800000u ? 0x7C00u              /* >= 2**16 (and inf): infinity */
                 : a < 0x38800000u ? subnormal
                 : normal;
    return (uint16_t)(out | sign);
}

/* ---- rows ---------------------------------------------------------------------------------- */

/* bfloat16 needs 16 random bits per element, so one 32-bit draw serves two columns: in each block of
 * 32 columns, column b + k (k < 16) takes the high half and column b + 16 + k the low half of draw
 * b / 2 + k — for any column j: draw (j >> 5) * 16 + (j & 15), high half when (j >> 4) is even. The
 * element then rounds up when its 16 bits, as a fraction of 2**16, are below the dropped part. */
CEMBED_ROUND_INLINE uint16_t cembed_f32_to_bf16_sr16(float x, uint32_t r16)
{
    return cembed_f32_to_bf16_sr(x, r16 << 16);   /* the 32-bit rule with u = r16 * 2**16 */
}

/* v[0:dim] rounded stochastically into the bfloat16 row `out` under row key `key`. The draws of up to
 * 512 columns are made first, then the columns rounded (two simple loops vectorise best). */
CEMBED_ROUND_CLONES static void cembed_f32_row_to_bf16_sr(uint16_t *restrict out, const float *restrict v,
                                                          ptrdiff_t dim, uint64_t key)
{
    const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
    const ptrdiff_t full = dim - dim % 32;     /* columns in whole blocks of 32 */
    uint32_t draws[256];
    ptrdiff_t b = 0;
    while (b < full) {
        const ptrdiff_t end = full - b > 512 ? b + 512 : full;
        const ptrdiff_t n_draws = (end - b) / 2;
        for (ptrdiff_t q = 0; q < n_draws; q++) draws[q] = cembed_round_bits(lo, hi, (uint32_t)(b / 2 + q));
        for (const uint32_t *r = draws; b < end; b += 32, r += 16) {
            for (int k = 0; k < 16; k++) out[b + k] = cembed_f32_to_bf16_sr16(v[b + k], r[k] >> 16);
            for (int k = 0; k < 16; k++) out[b + 16 + k] = cembed_f32_to_bf16_sr16(v[b + 16 + k], r[k] & 0xFFFFu);
        }
    }
    for (ptrdiff_t j = b; j < dim; j++) {
        const uint32_t r = cembed_round_bits(lo, hi, (uint32_t)(b / 2 + (j & 15)));
        out[j] = cembed_f32_to_bf16_sr16(v[j], (j & 16) ? (r & 0xFFFFu) : (r >> 16));
    }
}

CEMBED_ROUND_CLONES static void cembed_f32_row_to_f16_sr(uint16_t *restrict out, const float *restrict v,
                                                         ptrdiff_t dim, uint64_t key)
{
    const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f32_to_f16_sr(v[j], cembed_round_bits(lo, hi, (uint32_t)j));
}

CEMBED_ROUND_CLONES static void cembed_f32_row_to_bf16_nearest(uint16_t *restrict out, const float *restrict v,
                                                               ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f32_to_bf16_rne(v[j]);
}

CEMBED_ROUND_CLONES static void cembed_f32_row_to_f16_nearest(uint16_t *restrict out, const float *restrict v,
                                                              ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f32_to_f16_rne(v[j]);
}

CEMBED_ROUND_CLONES static void cembed_bf16_row_widen(float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_bf16_to_f32(row[j]);
}

CEMBED_ROUND_CLONES static void cembed_f16_row_widen(float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f16_to_f32(row[j]);
}

/* A 16-bit row of format fmt (CEMBED_TABLE_BF16 / CEMBED_TABLE_F16) widened into out[0:dim]. */
CEMBED_ROUND_INLINE void cembed_row_widen(int fmt, float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
    if (fmt == CEMBED_TABLE_BF16) cembed_bf16_row_widen(out, row, dim);
    else cembed_f16_row_widen(out, row, dim);
}

/* v[0:dim] rounded once per element into the 16-bit row `out` of format fmt: stochastically under
 * the key of (seed, step, row, stream), or to nearest (ties to even; the key is then unused). */
CEMBED_ROUND_INLINE void cembed_row_round(int fmt, int stochastic, uint16_t *restrict out, const float *restrict v,
                                          ptrdiff_t dim, uint64_t seed, uint64_t step, uint64_t row,
                                          uint64_t stream)
{
    if (stochastic) {
        uint64_t key = cembed_round_key(seed, step, row, stream);
        if (fmt == CEMBED_TABLE_BF16) cembed_f32_row_to_bf16_sr(out, v, dim, key);
        else cembed_f32_row_to_f16_sr(out, v, dim, key);
    } else if (fmt == CEMBED_TABLE_BF16) {
        cembed_f32_row_to_bf16_nearest(out, v, dim);
    } else {
        cembed_f32_row_to_f16_nearest(out, v, dim);
    }
}

/* ---- fused rows ---------------------------------------------------------------------------- */

/* SparseAdam on one row of a bfloat16 weight with bfloat16 exp_avg / exp_avg_sq, in one pass over the
 * columns: bitwise what widening the three rows, cembed_adam_row_f32 (_row_update.h, the same
 * expressions in the same order) and rounding w, m, v (streams 0, 1, 2; stochastically under the keys of
 * (seed, step, row, stream), or to nearest) give, without the three float32 scratch rows in between. */
CEMBED_ROUND_CLONES static void cembed_adam_row_bf16(uint16_t *restrict w, uint16_t *restrict m, uint16_t *restrict v,
        const float *restrict grad, float omb1, float omb2, float eps, float neg_step, float sign, ptrdiff_t dim,
        int stochastic, uint64_t seed, uint64_t step, uint64_t row)
{
    /* the three arrays' keys from one row key (cembed_round_key of each stream; 6 mixes, not 12) */
    const uint64_t key_row = stochastic ? cembed_row_key(seed, step, row) : 0;
    const uint64_t key_w = stochastic ? cembed_mix64(key_row ^ CEMBED_STREAM_WEIGHT) : 0;
    const uint64_t key_a = stochastic ? cembed_mix64(key_row ^ CEMBED_STREAM_STATE_A) : 0;
    const uint64_t key_b = stochastic ? cembed_mix64(key_row ^ CEMBED_STREAM_STATE_B) : 0;
    const uint32_t wl = (uint32_t)key_w, wh = (uint32_t)(key_w >> 32);
    const uint32_t al = (uint32_t)key_a, ah = (uint32_t)(key_a >> 32);
    const uint32_t bl = (uint32_t)key_b, bh = (uint32_t)(key_b >> 32);
    ptrdiff_t b = 0;
    for (; b + 32 <= dim; b += 32) {
        float nw[32], nm[32], nv[32];
        for (int k = 0; k < 32; k++) {
            const float g = sign * grad[b + k], m0 = cembed_bf16_to_f32(m[b + k]), v0 = cembed_bf16_to_f32(v[b + k]);
            const float dm = (g - m0) * omb1;
            const float dv = (g * g - v0) * omb2;
            nm[k] = m0 + dm;
            nv[k] = v0 + dv;
            nw[k] = cembed_bf16_to_f32(w[b + k]) + neg_step * ((dm + m0) / (sqrtf(dv + v0) + eps));
        }
        if (stochastic) {
            uint32_t rw[16], ra[16], rb[16];
            const uint32_t q0 = (uint32_t)(b / 2);
            for (int k = 0; k < 16; k++) {
                rw[k] = cembed_round_bits(wl, wh, q0 + k);
                ra[k] = cembed_round_bits(al, ah, q0 + k);
                rb[k] = cembed_round_bits(bl, bh, q0 + k);
            }
            for (int k = 0; k < 16; k++) {
                w[b + k] = cembed_f32_to_bf16_sr16(nw[k], rw[k] >> 16);
                w[b + 16 + k] = cembed_f32_to_bf16_sr16(nw[16 + k], rw[k] & 0xFFFFu);
                m[b + k] = cembed_f32_to_bf16_sr16(nm[k], ra[k] >> 16);
                m[b + 16 + k] = cembed_f32_to_bf16_sr16(nm[16 + k], ra[k] & 0xFFFFu);
                v[b + k] = cembed_f32_to_bf16_sr16(nv[k], rb[k] >> 16);
                v[b + 16 + k] = cembed_f32_to_bf16_sr16(nv[16 + k], rb[k] & 0xFFFFu);
            }
        } else {
            for (int k = 0; k < 32; k++) {
                w[b + k] = cembed_f32_to_bf16_rne(nw[k]);
                m[b + k] = cembed_f32_to_bf16_rne(nm[k]);
                v[b + k] = cembed_f32_to_bf16_rne(nv[k]);
            }
        }
    }
    for (ptrdiff_t j = b; j < dim; j++) {
        const float g = sign * grad[j], m0 = cembed_bf16_to_f32(m[j]), v0 = cembed_bf16_to_f32(v[j]);
        const float dm = (g - m0) * omb1;
        const float dv = (g * g - v0) * omb2;
        const float nmj = m0 + dm, nvj = v0 + dv;
        const float nwj = cembed_bf16_to_f32(w[j]) + neg_step * ((dm + m0) / (sqrtf(dv + v0) + eps));
        if (stochastic) {
            const uint32_t q = (uint32_t)(b / 2 + (j & 15));
            const uint32_t rw = cembed_round_bits(wl, wh, q), ra = cembed_round_bits(al, ah, q), rb = cembed_round_bits(bl, bh, q);
            w[j] = cembed_f32_to_bf16_sr16(nwj, (j & 16) ? (rw & 0xFFFFu) : (rw >> 16));
            m[j] = cembed_f32_to_bf16_sr16(nmj, (j & 16) ? (ra & 0xFFFFu) : (ra >> 16));
            v[j] = cembed_f32_to_bf16_sr16(nvj, (j & 16) ? (rb & 0xFFFFu) : (rb >> 16));
        } else {
            w[j] = cembed_f32_to_bf16_rne(nwj); m[j] = cembed_f32_to_bf16_rne(nmj); v[j] = cembed_f32_to_bf16_rne(nvj);
        }
    }
}

#endif /* CEMBED_ROUNDING_H */
