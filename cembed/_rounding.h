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

/* x, the value of column j, rounded stochastically under the row key's halves (lo, hi), one column at a
 * time: draw (j >> 5) * 16 + (j & 15), its high half when (j >> 4) is even (the rule above; the row
 * kernels below do whole blocks of 32 columns at once and their last columns with this) */
CEMBED_ROUND_INLINE uint16_t cembed_f32_column_to_bf16_sr(float x, ptrdiff_t j, uint32_t lo, uint32_t hi)
{
    const uint32_t r = cembed_round_bits(lo, hi, (uint32_t)((j >> 5) * 16 + (j & 15)));
    return cembed_f32_to_bf16_sr16(x, (j & 16) ? (r & 0xFFFFu) : (r >> 16));
}

/* columns [b, dim) of v rounded stochastically into `out`, one at a time */
CEMBED_ROUND_INLINE void cembed_f32_columns_to_bf16_sr(uint16_t *restrict out, const float *restrict v, ptrdiff_t b,
                                                       ptrdiff_t dim, uint32_t lo, uint32_t hi)
{
    for (ptrdiff_t j = b; j < dim; j++) out[j] = cembed_f32_column_to_bf16_sr(v[j], j, lo, hi);
}

/* v[0:dim] rounded stochastically into the bfloat16 row `out` under row key `key`. The draws of up to
 * 512 columns are made first, then the columns rounded (two simple loops vectorise best). */
CEMBED_ROUND_CLONES static void cembed_f32_row_to_bf16_sr_portable(uint16_t *restrict out, const float *restrict v,
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
    cembed_f32_columns_to_bf16_sr(out, v, b, dim, lo, hi);
}

/* ---- the same bfloat16 rows with AVX-512F (x86-64, checked once at run time; _half.h) ------------
 * 16 columns per instruction: the 16 draws of a block of 32 columns are one vector (lane k: draw
 * b / 2 + k, the same expression as cembed_round_bits), column b + k rounds with its high half and
 * column b + 16 + k with its low half, and every float32 operation is the scalar code's, in its order
 * (no fma: -ffp-contract=off), so each result is bit for bit the portable kernel's (tests compare
 * them) — up to the sign and payload of a NaN made from two NaN operands, which x86 takes from the
 * first operand, and either compiler may order a commutative operation's operands as it likes. GCC's
 * own vectorisation of the portable kernels measured about half as fast: it keeps to 256-bit vectors
 * and goes through scratch arrays. */
#ifdef CEMBED_X86_INTRINSICS

/* 16 draws at once: lane k is cembed_round_bits(key_lo, key_hi, q_k), given q_golden[k] = q_k * 0x9E3779B9
 * (mod 2**32) */
CEMBED_AVX512_FUNCTION static inline __m512i cembed_round_bits_x16(__m512i q_golden, __m512i key_lo, __m512i key_hi)
{
    __m512i x = _mm512_xor_si512(q_golden, key_lo);
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7FEB352D));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
    x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846CA68Bu));
    x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    return _mm512_xor_si512(x, key_hi);
}

/* (b / 2 + k) * 0x9E3779B9 for k = 0..15: the draw inputs of the block starting at column b */
CEMBED_AVX512_FUNCTION static inline __m512i cembed_block_golden_x16(ptrdiff_t b)
{
    const __m512i k = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_mullo_epi32(_mm512_add_epi32(k, _mm512_set1_epi32((int)(uint32_t)(b / 2))),
                              _mm512_set1_epi32((int)0x9E3779B9u));
}

/* a stochastic rounding of a block of 32 columns: draws r (lane k) round column b + k with r >> 16 and
 * column b + 16 + k with r & 0xFFFF, i.e. add 0xFFFF minus those 16 bits (cembed_f32_to_bf16_sr16) */
CEMBED_AVX512_FUNCTION static inline void cembed_bf16x32_store_sr(uint16_t *p, __m512 first, __m512 second, __m512i r)
{
    const __m512i not_r = _mm512_xor_si512(r, _mm512_set1_epi32(-1));
    cembed_bf16x16_store(p, first, _mm512_srli_epi32(not_r, 16));
    cembed_bf16x16_store(p + 16, second, _mm512_and_si512(not_r, _mm512_set1_epi32(0xFFFF)));
}

CEMBED_AVX512_FUNCTION static void cembed_f32_row_to_bf16_sr_avx512(uint16_t *restrict out, const float *restrict v,
                                                                    ptrdiff_t dim, uint64_t key)
{
    const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
    const __m512i key_lo = _mm512_set1_epi32((int)lo), key_hi = _mm512_set1_epi32((int)hi);
    ptrdiff_t b = 0;
    for (; b + 32 <= dim; b += 32) {
        const __m512i r = cembed_round_bits_x16(cembed_block_golden_x16(b), key_lo, key_hi);
        cembed_bf16x32_store_sr(out + b, _mm512_loadu_ps(v + b), _mm512_loadu_ps(v + b + 16), r);
    }
    cembed_f32_columns_to_bf16_sr(out, v, b, dim, lo, hi);
}
#endif

CEMBED_ROUND_INLINE void cembed_f32_row_to_bf16_sr(uint16_t *restrict out, const float *restrict v, ptrdiff_t dim,
                                                   uint64_t key)
{
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 32 && cembed_have_avx512f()) {
        cembed_f32_row_to_bf16_sr_avx512(out, v, dim, key);
        return;
    }
#endif
    cembed_f32_row_to_bf16_sr_portable(out, v, dim, key);
}

CEMBED_ROUND_CLONES static void cembed_f32_row_to_f16_sr_portable(uint16_t *restrict out, const float *restrict v,
                                                                  ptrdiff_t dim, uint64_t key)
{
    const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f32_to_f16_sr(v[j], cembed_round_bits(lo, hi, (uint32_t)j));
}

#ifdef CEMBED_X86_INTRINSICS
/* cembed_f32_to_f16_sr on 16 lanes: the same integer expressions, lane by lane, and every one of them fits
 * in 32 bits — the subnormal threshold is rem · 2**(32 - s) with rem < 2**s, or rem >> (s - 32) with
 * rem < 2**24 — so the scalar code's 64-bit threshold is the same number. AVX-512's variable shifts give
 * 0 for a count of 32 or more, as the scalar code's guards do. */
CEMBED_AVX512_FUNCTION static inline __m256i cembed_f16x16_sr(__m512 x, __m512i r)
{
    const __m512i u = _mm512_castps_si512(x);
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000));
    const __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i not_r = _mm512_xor_si512(r, _mm512_set1_epi32(-1));
    const __m512i normal = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_sub_epi32(a, _mm512_set1_epi32((127 - 15) << 23)), _mm512_srli_epi32(not_r, 19)), 13);
    const __m512i e = _mm512_srli_epi32(a, 23);
    const __mmask16 has_e = _mm512_test_epi32_mask(e, e);
    const __m512i m = _mm512_mask_or_epi32(a, has_e, _mm512_and_si512(a, _mm512_set1_epi32(0x007FFFFF)),
                                           _mm512_set1_epi32(0x00800000));
    const __m512i s = _mm512_sub_epi32(_mm512_set1_epi32(126), _mm512_max_epu32(e, _mm512_set1_epi32(1)));
    const __m512i q = _mm512_srlv_epi32(m, s);
    const __m512i rem = _mm512_sub_epi32(m, _mm512_sllv_epi32(q, s));
    const __m512i threshold = _mm512_or_si512(_mm512_sllv_epi32(rem, _mm512_sub_epi32(_mm512_set1_epi32(32), s)),
                                              _mm512_srlv_epi32(rem, _mm512_sub_epi32(s, _mm512_set1_epi32(32))));
    const __m512i subnormal = _mm512_mask_add_epi32(q, _mm512_cmplt_epu32_mask(r, threshold), q,
                                                    _mm512_set1_epi32(1));
    const __m512i nan = _mm512_or_si512(_mm512_set1_epi32(0x7E00),
                                        _mm512_and_si512(_mm512_srli_epi32(a, 13), _mm512_set1_epi32(0x03FF)));
    __m512i out = normal;
    out = _mm512_mask_mov_epi32(out, _mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x38800000)), subnormal);
    out = _mm512_mask_mov_epi32(out, _mm512_cmpge_epu32_mask(a, _mm512_set1_epi32(0x47800000)),
                                _mm512_set1_epi32(0x7C00));
    out = _mm512_mask_mov_epi32(out, _mm512_cmpgt_epu32_mask(a, _mm512_set1_epi32(0x7F800000)), nan);
    return _mm512_cvtepi32_epi16(_mm512_or_si512(out, sign));
}

CEMBED_AVX512_FUNCTION static void cembed_f32_row_to_f16_sr_avx512(uint16_t *restrict out, const float *restrict v,
                                                                   ptrdiff_t dim, uint64_t key)
{
    const uint32_t lo = (uint32_t)key, hi = (uint32_t)(key >> 32);
    const __m512i key_lo = _mm512_set1_epi32((int)lo), key_hi = _mm512_set1_epi32((int)hi);
    const __m512i k = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    ptrdiff_t b = 0;
    for (; b + 16 <= dim; b += 16) {   /* draw j for column j: q_golden = j * 0x9E3779B9 */
        const __m512i q = _mm512_mullo_epi32(_mm512_add_epi32(k, _mm512_set1_epi32((int)(uint32_t)b)),
                                             _mm512_set1_epi32((int)0x9E3779B9u));
        _mm256_storeu_si256((__m256i *)(out + b),
                            cembed_f16x16_sr(_mm512_loadu_ps(v + b), cembed_round_bits_x16(q, key_lo, key_hi)));
    }
    for (; b < dim; b++) out[b] = cembed_f32_to_f16_sr(v[b], cembed_round_bits(lo, hi, (uint32_t)b));
}
#endif

CEMBED_ROUND_INLINE void cembed_f32_row_to_f16_sr(uint16_t *restrict out, const float *restrict v, ptrdiff_t dim,
                                                  uint64_t key)
{
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 16 && cembed_have_avx512f()) {
        cembed_f32_row_to_f16_sr_avx512(out, v, dim, key);
        return;
    }
#endif
    cembed_f32_row_to_f16_sr_portable(out, v, dim, key);
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
    } else {
        cembed_f32_row_to_half_rne(fmt, out, v, dim);
    }
}

/* ---- fused rows ---------------------------------------------------------------------------- */

/* SparseAdam on one row of a bfloat16 weight with bfloat16 exp_avg / exp_avg_sq, in one pass over the
 * columns: bitwise what widening the three rows, cembed_adam_row_f32 (_row_update.h, the same
 * expressions in the same order) and rounding w, m, v (streams 0, 1, 2; stochastically under the keys of
 * (seed, step, row, stream), or to nearest) give, without the three float32 scratch rows in between.
 * The rule on one column:
 *   g = sign * grad; dm = (g - m0)(1 - b1); dv = (g*g - v0)(1 - b2); m = m0 + dm; v = v0 + dv;
 *   w = w0 + neg_step * ((dm + m0) / (sqrt(dv + v0) + eps)) */
typedef struct {
    float omb1, omb2, eps, neg_step, sign;   /* 1 - beta1, 1 - beta2, eps, -lr / bias correction, +-1 */
    int stochastic;
    uint32_t wl, wh, al, ah, bl, bh;         /* the halves of the three arrays' row keys (stochastic) */
} cembed_adam_bf16_args;

/* columns [b, dim), one at a time: the last columns of the row kernels below */
CEMBED_ROUND_INLINE void cembed_adam_bf16_columns(uint16_t *restrict w, uint16_t *restrict m, uint16_t *restrict v,
                                                  const float *restrict grad, const cembed_adam_bf16_args *a,
                                                  ptrdiff_t b, ptrdiff_t dim)
{
    for (ptrdiff_t j = b; j < dim; j++) {
        const float g = a->sign * grad[j], m0 = cembed_bf16_to_f32(m[j]), v0 = cembed_bf16_to_f32(v[j]);
        const float dm = (g - m0) * a->omb1;
        const float dv = (g * g - v0) * a->omb2;
        const float nmj = m0 + dm, nvj = v0 + dv;
        const float nwj = cembed_bf16_to_f32(w[j]) + a->neg_step * ((dm + m0) / (sqrtf(dv + v0) + a->eps));
        if (a->stochastic) {
            w[j] = cembed_f32_column_to_bf16_sr(nwj, j, a->wl, a->wh);
            m[j] = cembed_f32_column_to_bf16_sr(nmj, j, a->al, a->ah);
            v[j] = cembed_f32_column_to_bf16_sr(nvj, j, a->bl, a->bh);
        } else {
            w[j] = cembed_f32_to_bf16_rne(nwj); m[j] = cembed_f32_to_bf16_rne(nmj); v[j] = cembed_f32_to_bf16_rne(nvj);
        }
    }
}

/* the whole blocks of 32 columns; returns the first column not done */
CEMBED_ROUND_CLONES static ptrdiff_t cembed_adam_bf16_blocks_portable(uint16_t *restrict w, uint16_t *restrict m,
        uint16_t *restrict v, const float *restrict grad, const cembed_adam_bf16_args *args, ptrdiff_t dim)
{
    const float omb1 = args->omb1, omb2 = args->omb2, eps = args->eps, neg_step = args->neg_step, sign = args->sign;
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
        if (args->stochastic) {
            uint32_t rw[16], ra[16], rb[16];
            const uint32_t q0 = (uint32_t)(b / 2);
            for (int k = 0; k < 16; k++) {
                rw[k] = cembed_round_bits(args->wl, args->wh, q0 + k);
                ra[k] = cembed_round_bits(args->al, args->ah, q0 + k);
                rb[k] = cembed_round_bits(args->bl, args->bh, q0 + k);
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
    return b;
}

#ifdef CEMBED_X86_INTRINSICS
CEMBED_AVX512_FUNCTION static ptrdiff_t cembed_adam_bf16_blocks_avx512(uint16_t *restrict w, uint16_t *restrict m,
        uint16_t *restrict v, const float *restrict grad, const cembed_adam_bf16_args *args, ptrdiff_t dim)
{
    const __m512 sign = _mm512_set1_ps(args->sign), omb1 = _mm512_set1_ps(args->omb1);
    const __m512 omb2 = _mm512_set1_ps(args->omb2), eps = _mm512_set1_ps(args->eps);
    const __m512 neg_step = _mm512_set1_ps(args->neg_step);
    const __m512i wl = _mm512_set1_epi32((int)args->wl), wh = _mm512_set1_epi32((int)args->wh);
    const __m512i al = _mm512_set1_epi32((int)args->al), ah = _mm512_set1_epi32((int)args->ah);
    const __m512i bl = _mm512_set1_epi32((int)args->bl), bh = _mm512_set1_epi32((int)args->bh);
    ptrdiff_t b = 0;
    for (; b + 32 <= dim; b += 32) {
        __m512 nw[2], nm[2], nv[2];   /* columns b + [0, 16) and b + [16, 32) */
        for (int h = 0; h < 2; h++) {
            const ptrdiff_t j = b + 16 * h;
            const __m512 g = _mm512_mul_ps(sign, _mm512_loadu_ps(grad + j));
            const __m512 m0 = cembed_bf16x16_widen(m + j), v0 = cembed_bf16x16_widen(v + j);
            const __m512 dm = _mm512_mul_ps(_mm512_sub_ps(g, m0), omb1);
            const __m512 dv = _mm512_mul_ps(_mm512_sub_ps(_mm512_mul_ps(g, g), v0), omb2);
            nm[h] = _mm512_add_ps(m0, dm);
            nv[h] = _mm512_add_ps(v0, dv);
            const __m512 ratio = _mm512_div_ps(_mm512_add_ps(dm, m0), _mm512_add_ps(_mm512_sqrt_ps(_mm512_add_ps(dv, v0)), eps));
            nw[h] = _mm512_add_ps(cembed_bf16x16_widen(w + j), _mm512_mul_ps(neg_step, ratio));
        }
        if (args->stochastic) {
            const __m512i q = cembed_block_golden_x16(b);
            cembed_bf16x32_store_sr(w + b, nw[0], nw[1], cembed_round_bits_x16(q, wl, wh));
            cembed_bf16x32_store_sr(m + b, nm[0], nm[1], cembed_round_bits_x16(q, al, ah));
            cembed_bf16x32_store_sr(v + b, nv[0], nv[1], cembed_round_bits_x16(q, bl, bh));
        } else {
            for (int h = 0; h < 2; h++) {
                cembed_bf16x16_store(w + b + 16 * h, nw[h], cembed_bf16x16_nearest(nw[h]));
                cembed_bf16x16_store(m + b + 16 * h, nm[h], cembed_bf16x16_nearest(nm[h]));
                cembed_bf16x16_store(v + b + 16 * h, nv[h], cembed_bf16x16_nearest(nv[h]));
            }
        }
    }
    return b;
}
#endif

CEMBED_ROUND_INLINE void cembed_adam_row_bf16(uint16_t *restrict w, uint16_t *restrict m, uint16_t *restrict v,
        const float *restrict grad, float omb1, float omb2, float eps, float neg_step, float sign, ptrdiff_t dim,
        int stochastic, uint64_t seed, uint64_t step, uint64_t row)
{
    cembed_adam_bf16_args args = {omb1, omb2, eps, neg_step, sign, stochastic, 0, 0, 0, 0, 0, 0};
    ptrdiff_t b;
    if (stochastic) {   /* the three arrays' keys from one row key (cembed_round_key of each stream; 6 mixes, not 12) */
        const uint64_t key_row = cembed_row_key(seed, step, row);
        const uint64_t key_w = cembed_mix64(key_row ^ CEMBED_STREAM_WEIGHT);
        const uint64_t key_a = cembed_mix64(key_row ^ CEMBED_STREAM_STATE_A);
        const uint64_t key_b = cembed_mix64(key_row ^ CEMBED_STREAM_STATE_B);
        args.wl = (uint32_t)key_w; args.wh = (uint32_t)(key_w >> 32);
        args.al = (uint32_t)key_a; args.ah = (uint32_t)(key_a >> 32);
        args.bl = (uint32_t)key_b; args.bh = (uint32_t)(key_b >> 32);
    }
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 32 && cembed_have_avx512f()) b = cembed_adam_bf16_blocks_avx512(w, m, v, grad, &args, dim);
    else
#endif
    b = cembed_adam_bf16_blocks_portable(w, m, v, grad, &args, dim);
    cembed_adam_bf16_columns(w, m, v, grad, &args, b, dim);
}

#endif /* CEMBED_ROUNDING_H */
