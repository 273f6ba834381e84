/* 16-bit table formats: bfloat16 and IEEE binary16 (float16) <-> float32, by bit manipulation only
 * (portable C99: no _Float16, no intrinsics). Every kernel that reads a 16-bit table converts a row
 * to float32 on the fly, computes in float32 and, when it writes, rounds each element once.
 *
 *   bfloat16: the top 16 bits of a float32 (sign, 8 exponent bits, 7 mantissa bits). Widening is a
 *             shift (exact); narrowing rounds to nearest, ties to even; a NaN stays a (quiet) NaN,
 *             infinities stay infinite, values past the largest finite bfloat16 round to infinity.
 *   float16:  sign, 5 exponent bits (bias 15), 10 mantissa bits; subnormals below 2**-14. Widening is
 *             exact (subnormals included); narrowing rounds to nearest, ties to even: |x| >= 65520
 *             becomes infinity, tiny values become subnormals or a signed zero, NaN stays a quiet NaN.
 *
 * Results are identical to ml_dtypes' and numpy's float16 casts (tests/test_half_tables.py checks
 * all 65536 bit patterns one way and a sweep of float32 patterns the other way). The narrowing
 * functions assume the default floating-point environment (round to nearest): the float16 subnormal
 * path lets one float32 addition do the rounding.
 *
 * The loops are branch-free (selects, not jumps), so the compiler vectorises the row functions.
 */
#ifndef CEMBED_HALF_H
#define CEMBED_HALF_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define CEMBED_HALF_INLINE static inline __attribute__((unused))
#else
#define CEMBED_HALF_INLINE static inline
#endif

/* the formats a kernel may be handed a table in (the `fmt` argument of the row functions) */
#define CEMBED_TABLE_F32 0
#define CEMBED_TABLE_F64 1
#define CEMBED_TABLE_BF16 2
#define CEMBED_TABLE_F16 3

CEMBED_HALF_INLINE uint32_t cembed_f32_bits(float x) { uint32_t u; memcpy(&u, &x, sizeof u); return u; }
CEMBED_HALF_INLINE float cembed_bits_f32(uint32_t u) { float x; memcpy(&x, &u, sizeof x); return x; }

/* ---- bfloat16 ------------------------------------------------------------------------------- */

CEMBED_HALF_INLINE float cembed_bf16_to_f32(uint16_t h)
{
    return cembed_bits_f32((uint32_t)h << 16);
}

CEMBED_HALF_INLINE uint16_t cembed_f32_to_bf16_rne(float x)
{
    uint32_t u = cembed_f32_bits(x);
    /* add just under half an ulp of the result, plus one when the kept part is odd: ties go to even */
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    /* NaN: keep sign and the top payload bits, force the quiet bit so it cannot become infinity */
    uint32_t quiet_nan = (u >> 16) | 0x0040u;
    int is_nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (uint16_t)(is_nan ? quiet_nan : rounded);
}

/* ---- float16 (IEEE binary16) ---------------------------------------------------------------- */

CEMBED_HALF_INLINE float cembed_f16_to_f32(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t body = ((uint32_t)h & 0x7FFFu) << 13;          /* exponent and mantissa, float32 place */
    uint32_t exp = body & 0x0F800000u;
    /* normal numbers: rebias the exponent by 127 - 15 */
    uint32_t normal = body + ((127u - 15u) << 23);
    /* infinity / NaN: exponent all ones (mantissa, hence NaN-ness, kept) */
    uint32_t special = body | 0x7F800000u;
    /* subnormal / zero: the value is mantissa * 2**-24 = as_float(body + 2**-14 exponent) - 2**-14,
     * exact because the result is representable */
    float sub = cembed_bits_f32(body + (113u << 23)) - cembed_bits_f32(113u << 23);
    uint32_t subnormal = cembed_f32_bits(sub);
    uint32_t out = exp == 0x0F800000u ? special : (exp == 0 ? subnormal : normal);
    return cembed_bits_f32(out | sign);
}

CEMBED_HALF_INLINE uint16_t cembed_f32_to_f16_rne(float x)
{
    uint32_t u = cembed_f32_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7FFFFFFFu;
    /* normal range: rebias, then round away the 13 low mantissa bits to nearest, ties to even */
    uint32_t normal = (a - ((127u - 15u) << 23) + 0x0FFFu + ((a >> 13) & 1u)) >> 13;
    /* below 2**-14: adding 0.5 makes the float32 adder round to a multiple of 2**-24 (one float16
     * subnormal step), to nearest, ties to even; the low bits are then the float16 pattern (a result
     * of 2**-14 comes out as 0x0400, the smallest normal, as it should) */
    float shifted = cembed_bits_f32(a) + 0.5f;
    uint32_t subnormal = cembed_f32_bits(shifted) - 0x3F000000u;
    uint32_t nan = 0x7E00u | ((a >> 13) & 0x03FFu);
    uint32_t out = a > 0x7F800000u ? nan                      /* NaN */
                 : a >= 0x477FF000u ? 0x7C00u                 /* >= 65520 (and inf): infinity */
                 : a < 0x38800000u ? subnormal                /* < 2**-14 */
                 : normal;
    return (uint16_t)(out | sign);
}

/* ---- rows ----------------------------------------------------------------------------------- */

CEMBED_HALF_INLINE void cembed_bf16_row_to_f32(float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_bf16_to_f32(row[j]);
}

/* Hand-written x86-64 paths (GCC / Clang: CEMBED_X86_INTRINSICS), each chosen at run time by a CPU check
 * below and each bit for bit the portable loop it replaces (tests run both; any other machine, and the
 * last columns of a row, take the portable loops):
 * - float16 rows with AVX2 and F16C: vcvtph2ps widens 8 at a time, exactly; it quiets a signalling NaN,
 *   whose quiet bit is cleared again so the result is the portable conversion's (and numpy's). (The
 *   portable loop runs at about a fifth of the speed of a float32 copy.) vcvtps2ph narrows 8 at a time,
 *   to nearest, ties to even, as the portable rule does (a NaN comes out quiet in both).
 * - bfloat16 rows with AVX-512F: 16 columns per instruction (rounding to nearest here; the stochastic
 *   rounding, the Adam row and float16's stochastic rounding in _rounding.h). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#include <immintrin.h>
#define CEMBED_X86_INTRINSICS 1
#define CEMBED_AVX512_FUNCTION __attribute__((target("avx512f"), unused))
/* 8 float16 bit patterns (unaligned) widened to float32, bit for bit cembed_f16_to_f32's */
__attribute__((target("avx2,f16c"), unused))
static inline __m256 cembed_f16x8_widen(const uint16_t *p)
{
    const __m256i exponent = _mm256_set1_epi32(0x7C00), mantissa = _mm256_set1_epi32(0x03FF);
    const __m256i half_quiet = _mm256_set1_epi32(0x0200), float_quiet = _mm256_set1_epi32(0x00400000);
    const __m256i zero = _mm256_setzero_si256();
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    __m256i bits = _mm256_castps_si256(_mm256_cvtph_ps(h));
    __m256i w = _mm256_cvtepu16_epi32(h);
    __m256i all_ones = _mm256_cmpeq_epi32(_mm256_and_si256(w, exponent), exponent);
    __m256i no_payload = _mm256_cmpeq_epi32(_mm256_and_si256(w, mantissa), zero);
    __m256i not_quiet = _mm256_cmpeq_epi32(_mm256_and_si256(w, half_quiet), zero);
    __m256i signalling = _mm256_andnot_si256(no_payload, _mm256_and_si256(all_ones, not_quiet));
    return _mm256_castsi256_ps(_mm256_andnot_si256(_mm256_and_si256(signalling, float_quiet), bits));
}

__attribute__((target("avx2,f16c"), unused))
static void cembed_f16_row_to_f32_f16c(float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= dim; j += 8) _mm256_storeu_ps(out + j, cembed_f16x8_widen(row + j));
    for (; j < dim; j++) out[j] = cembed_f16_to_f32(row[j]);
}

/* Whether the environment variable CEMBED_DISABLE_CPU_FEATURES (read once per check) names `feature`:
 * a list of names separated by commas or spaces, any case, e.g. "avx512f,f16c". It turns cembed's
 * hand-written paths for those features off (for tests of the portable kernels, or to compare). */
CEMBED_HALF_INLINE int cembed_cpu_feature_disabled(const char *feature)
{
    const char *p = getenv("CEMBED_DISABLE_CPU_FEATURES");
    const size_t n = strlen(feature);
    while (p != NULL && *p != '\0') {
        size_t k = 0;
        while (*p == ',' || *p == ' ') p++;
        while (p[k] != '\0' && p[k] != ',' && p[k] != ' ') k++;
        if (k == n) {
            size_t i = 0;
            while (i < n && (p[i] | 0x20) == (feature[i] | 0x20)) i++;   /* ASCII letters and digits, any case */
            if (i == n) return 1;
        }
        p += k;
    }
    return 0;
}

/* NAME() = whether cembed uses its hand-written path for FEATURE: the CPU (and the OS) supports what
 * CONDITION asks and CEMBED_DISABLE_CPU_FEATURES does not name it; checked once per process (every
 * thread computes the same answer: a benign, atomic race) */
#define CEMBED_DEFINE_CPU_CHECK(NAME, FEATURE, CONDITION)                                              \
CEMBED_HALF_INLINE int NAME(void)                                                                      \
{                                                                                                     \
    static int known = -1;                                                                            \
    int have = __atomic_load_n(&known, __ATOMIC_RELAXED);                                             \
    if (have < 0) {                                                                                   \
        __builtin_cpu_init();                                                                         \
        have = !cembed_cpu_feature_disabled(FEATURE) && (CONDITION);                                  \
        __atomic_store_n(&known, have, __ATOMIC_RELAXED);                                             \
    }                                                                                                 \
    return have;                                                                                      \
}
/* F16C (with AVX2): float16 rows widened 8 columns per instruction */
CEMBED_DEFINE_CPU_CHECK(cembed_have_f16c, "f16c", __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
/* AVX-512F: bfloat16 rows rounded (to nearest here, stochastically in _rounding.h) and the bfloat16 Adam
 * row of _rounding.h, 16 columns per instruction */
CEMBED_DEFINE_CPU_CHECK(cembed_have_avx512f, "avx512f", __builtin_cpu_supports("avx512f"))

/* 16 bfloat16 bit patterns widened to float32 */
CEMBED_AVX512_FUNCTION static inline __m512 cembed_bf16x16_widen(const uint16_t *p)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* 16 float32 values stored as bfloat16: add `add` to each bit pattern and keep its top 16 bits (the
 * rounding of cembed_f32_to_bf16_rne and of _rounding.h's stochastic rule); a NaN keeps its top bits
 * with the quiet bit set */
CEMBED_AVX512_FUNCTION static inline void cembed_bf16x16_store(uint16_t *p, __m512 x, __m512i add)
{
    const __m512i u = _mm512_castps_si512(x);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, add), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                  _mm512_set1_epi32(0x7F800000));
    const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x0040));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet)));
}

/* what cembed_bf16x16_store adds to round to nearest, ties to even: 0x7FFF + the lowest kept bit */
CEMBED_AVX512_FUNCTION static inline __m512i cembed_bf16x16_nearest(__m512 x)
{
    const __m512i u = _mm512_castps_si512(x);
    return _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
}

CEMBED_AVX512_FUNCTION static void cembed_f32_row_to_bf16_rne_avx512(uint16_t *restrict row, const float *restrict v,
                                                                     ptrdiff_t dim)
{
    ptrdiff_t j = 0;
    for (; j + 16 <= dim; j += 16) {
        const __m512 x = _mm512_loadu_ps(v + j);
        cembed_bf16x16_store(row + j, x, cembed_bf16x16_nearest(x));
    }
    for (; j < dim; j++) row[j] = cembed_f32_to_bf16_rne(v[j]);
}
#endif

CEMBED_HALF_INLINE void cembed_f16_row_to_f32(float *restrict out, const uint16_t *restrict row, ptrdiff_t dim)
{
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 8 && cembed_have_f16c()) {
        cembed_f16_row_to_f32_f16c(out, row, dim);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < dim; j++) out[j] = cembed_f16_to_f32(row[j]);
}

CEMBED_HALF_INLINE void cembed_f32_row_to_bf16_rne(uint16_t *restrict row, const float *restrict v, ptrdiff_t dim)
{
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 16 && cembed_have_avx512f()) {
        cembed_f32_row_to_bf16_rne_avx512(row, v, dim);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < dim; j++) row[j] = cembed_f32_to_bf16_rne(v[j]);
}

#ifdef CEMBED_X86_INTRINSICS
/* float16 narrowing with F16C (vcvtps2ph, to nearest, ties to even): bit for bit cembed_f32_to_f16_rne,
 * NaNs (quiet, top payload bits kept), overflow and subnormals included (all 2**32 float32 patterns
 * compared, 2026-11-27) */
__attribute__((target("avx2,f16c"), unused))
static void cembed_f32_row_to_f16_rne_f16c(uint16_t *restrict row, const float *restrict v, ptrdiff_t dim)
{
    ptrdiff_t j = 0;
    for (; j + 8 <= dim; j += 8)
        _mm_storeu_si128((__m128i *)(row + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(v + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < dim; j++) row[j] = cembed_f32_to_f16_rne(v[j]);
}
#endif

CEMBED_HALF_INLINE void cembed_f32_row_to_f16_rne(uint16_t *restrict row, const float *restrict v, ptrdiff_t dim)
{
#ifdef CEMBED_X86_INTRINSICS
    if (dim >= 8 && cembed_have_f16c()) {
        cembed_f32_row_to_f16_rne_f16c(row, v, dim);
        return;
    }
#endif
    for (ptrdiff_t j = 0; j < dim; j++) row[j] = cembed_f32_to_f16_rne(v[j]);
}

/* A 16-bit row (fmt CEMBED_TABLE_BF16 or CEMBED_TABLE_F16) widened into out[0:dim]. */
CEMBED_HALF_INLINE void cembed_half_row_to_f32(int fmt, float *restrict out, const uint16_t *restrict row,
                                               ptrdiff_t dim)
{
    if (fmt == CEMBED_TABLE_BF16) cembed_bf16_row_to_f32(out, row, dim);
    else cembed_f16_row_to_f32(out, row, dim);
}

/* v[0:dim] rounded to nearest (ties to even) into a 16-bit row of format fmt. */
CEMBED_HALF_INLINE void cembed_f32_row_to_half_rne(int fmt, uint16_t *restrict row, const float *restrict v,
                                                   ptrdiff_t dim)
{
    if (fmt == CEMBED_TABLE_BF16) cembed_f32_row_to_bf16_rne(row, v, dim);
    else cembed_f32_row_to_f16_rne(row, v, dim);
}

#endif /* CEMBED_HALF_H */
