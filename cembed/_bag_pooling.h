/* EmbeddingBag pooling: a whole unscaled bag summed in vector registers, and a group of rows
 * pooled (sum, scaled sum, max) into an accumulator row (one call per group of rows, so the loop
 * over the group runs inside one vectorised target clone). Every element accumulates in row order
 * (acc + w0 + w1 + ...). The Cython side reaches them through the fused wrappers in _bag_pooling.pxd.
 *
 * Compiled as target clones on x86-64 GCC (AVX-512, AVX2+FMA, baseline), chosen at load time.
 */
#ifndef CEMBED_BAG_POOLING_H
#define CEMBED_BAG_POOLING_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "_half.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CEMBED_BAG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
#elif defined(__GNUC__)
#define CEMBED_BAG_CLONES __attribute__((unused))
#else
#define CEMBED_BAG_CLONES
#endif

/* acc[j] = acc[j] + rows[p][j] (scales == NULL), or with per-row scales:
 * fused: acc[j] = fma(scales[p], rows[p][j], acc[j]);  else acc[j] = acc[j] + scales[p] * rows[p][j].
 * The pooling keeps blocks of the accumulator in vector registers (GCC/Clang vector extensions)
 * while the rows stream through: no store-to-load round trip per row. All vectors are 32 bytes
 * (8 floats / 4 doubles): native AVX2 registers. (Wider, 64-byte vectors are lowered by GCC through
 * the stack on an AVX2 target, which made the float32 bag sum slower than the 16-bit one.) */
#if defined(__GNUC__)
typedef float cembed_vf8 __attribute__((vector_size(32), aligned(4)));    /* 8 floats, unaligned ok */
typedef double cembed_vd4 __attribute__((vector_size(32), aligned(8)));   /* 4 doubles */
typedef uint32_t cembed_vu8 __attribute__((vector_size(32), aligned(4)));  /* 8 uint32 */
typedef uint16_t cembed_vh8 __attribute__((vector_size(16), aligned(2)));  /* 8 bf16/f16 bit patterns */
#else
#error "cembed's pooling kernels need GCC or Clang vector extensions"
#endif

/* Loading one vector of a row (8 floats, 4 doubles): plain float32 / float64 loads, and the 16-bit
 * formats widened on the fly (exactly as cembed_bf16_to_f32 / cembed_f16_to_f32 of _half.h do it, lane
 * by lane): bfloat16 is a zero-extend and a shift; float16 rebiases the exponent, with selects for
 * zero/subnormal and inf/NaN. Macros (GCC/Clang statement expressions), so each target clone uses its
 * own vector instructions. */
#define CEMBED_LOAD_VF8(p) (*(const cembed_vf8 *)(p))
#define CEMBED_LOAD_VD4(p) (*(const cembed_vd4 *)(p))
#define CEMBED_SCALAR(x) (x)

#define cembed_load_bf16x8(p)                                                                          \
    ({ cembed_vu8 u_ = __builtin_convertvector(*(const cembed_vh8 *)(p), cembed_vu8) << 16; (cembed_vf8)u_; })
#define cembed_load_f16x8(p)                                                                           \
    ({                                                                                                \
        cembed_vu8 h_ = __builtin_convertvector(*(const cembed_vh8 *)(p), cembed_vu8);                \
        cembed_vu8 sign_ = (h_ & 0x8000u) << 16;                                                       \
        cembed_vu8 body_ = (h_ & 0x7FFFu) << 13;                                                       \
        cembed_vu8 exp_ = body_ & 0x0F800000u;                                                         \
        cembed_vu8 normal_ = body_ + ((127u - 15u) << 23);                                             \
        cembed_vu8 special_ = body_ | 0x7F800000u;                                                     \
        cembed_vf8 sub_f_ = (cembed_vf8)(body_ + (113u << 23)) - 6.103515625e-05f;  /* 2**-14 */        \
        cembed_vu8 sub_ = (cembed_vu8)sub_f_;                                                           \
        cembed_vu8 is_special_ = (cembed_vu8)(exp_ == 0x0F800000u);                                     \
        cembed_vu8 is_sub_ = (cembed_vu8)(exp_ == 0u);                                                  \
        cembed_vu8 out_ = (special_ & is_special_) | (sub_ & is_sub_) | (normal_ & ~(is_special_ | is_sub_)); \
        (cembed_vf8)(out_ | sign_);                                                                    \
    })

/* one accumulator vector += one row vector: unscaled, scaled (two roundings) or fused (one fma per
 * lane; each target clone with FMA turns the lane loop into one vector fma) */
#define CEMBED_POOL_STEP(a, x, s, MODE, FMA, LANES)                                                    \
    do {                                                                                              \
        if ((MODE) == 0) (a) = (a) + (x);                                                             \
        else if ((MODE) == 2) (a) = (a) + (s) * (x);                                                  \
        else for (int l_ = 0; l_ < (LANES); l_++) (a)[l_] = FMA((s)[l_], (x)[l_], (a)[l_]);           \
    } while (0)
/* The group's rows stream through a block of 8 native-width accumulators (32-byte vectors: registers
 * on AVX2, where wider ones went through the stack), then single vectors, then scalars. */
#define CEMBED_POOL_SUM_BLOCKS(T, V, FMA, MODE)                                                        \
    do {                                                                                              \
        for (; j0 + 8 * lanes <= dim; j0 += 8 * lanes) {                                              \
            V a0 = *(const V *)(acc + j0), a1 = *(const V *)(acc + j0 + lanes);                       \
            V a2 = *(const V *)(acc + j0 + 2 * lanes), a3 = *(const V *)(acc + j0 + 3 * lanes);       \
            V a4 = *(const V *)(acc + j0 + 4 * lanes), a5 = *(const V *)(acc + j0 + 5 * lanes);       \
            V a6 = *(const V *)(acc + j0 + 6 * lanes), a7 = *(const V *)(acc + j0 + 7 * lanes);       \
            for (ptrdiff_t p = 0; p < n; p++) {                                                       \
                const T *w = rows[p] + j0;                                                            \
                V sv = {0};                                                                           \
                if ((MODE) != 0) sv = sv + scales[p];                                                 \
                CEMBED_POOL_STEP(a0, *(const V *)w, sv, MODE, FMA, lanes);                            \
                CEMBED_POOL_STEP(a1, *(const V *)(w + lanes), sv, MODE, FMA, lanes);                  \
                CEMBED_POOL_STEP(a2, *(const V *)(w + 2 * lanes), sv, MODE, FMA, lanes);              \
                CEMBED_POOL_STEP(a3, *(const V *)(w + 3 * lanes), sv, MODE, FMA, lanes);              \
                CEMBED_POOL_STEP(a4, *(const V *)(w + 4 * lanes), sv, MODE, FMA, lanes);              \
                CEMBED_POOL_STEP(a5, *(const V *)(w + 5 * lanes), sv, MODE, FMA, lanes);              \
                CEMBED_POOL_STEP(a6, *(const V *)(w + 6 * lanes), sv, MODE, FMA, lanes);              \
                CEMBED_POOL_STEP(a7, *(const V *)(w + 7 * lanes), sv, MODE, FMA, lanes);              \
            }                                                                                         \
            *(V *)(acc + j0) = a0; *(V *)(acc + j0 + lanes) = a1;                                     \
            *(V *)(acc + j0 + 2 * lanes) = a2; *(V *)(acc + j0 + 3 * lanes) = a3;                     \
            *(V *)(acc + j0 + 4 * lanes) = a4; *(V *)(acc + j0 + 5 * lanes) = a5;                     \
            *(V *)(acc + j0 + 6 * lanes) = a6; *(V *)(acc + j0 + 7 * lanes) = a7;                     \
        }                                                                                             \
        for (; j0 + lanes <= dim; j0 += lanes) {                                                      \
            V a0 = *(const V *)(acc + j0);                                                            \
            for (ptrdiff_t p = 0; p < n; p++) {                                                       \
                V sv = {0};                                                                           \
                if ((MODE) != 0) sv = sv + scales[p];                                                 \
                CEMBED_POOL_STEP(a0, *(const V *)(rows[p] + j0), sv, MODE, FMA, lanes);               \
            }                                                                                         \
            *(V *)(acc + j0) = a0;                                                                    \
        }                                                                                             \
    } while (0)
#define CEMBED_DEFINE_POOL_SUM(NAME, T, V, FMA)                                                        \
CEMBED_BAG_CLONES static void NAME(T *restrict acc, const T *const *rows, const T *scales,            \
                                    ptrdiff_t n, ptrdiff_t dim, int fused)                            \
{                                                                                                     \
    const int lanes = (int)(sizeof(V) / sizeof(T));                                                   \
    ptrdiff_t j0 = 0;                                                                                 \
    if (scales == NULL) CEMBED_POOL_SUM_BLOCKS(T, V, FMA, 0);                                         \
    else if (fused) CEMBED_POOL_SUM_BLOCKS(T, V, FMA, 1);                                             \
    else CEMBED_POOL_SUM_BLOCKS(T, V, FMA, 2);                                                        \
    for (ptrdiff_t p = 0; p < n; p++) {                                                               \
        const T *restrict w = rows[p];                                                                \
        if (scales == NULL) {                                                                         \
            for (ptrdiff_t j = j0; j < dim; j++) acc[j] = acc[j] + w[j];                              \
        } else if (fused) {                                                                           \
            const T s = scales[p];                                                                    \
            for (ptrdiff_t j = j0; j < dim; j++) acc[j] = FMA(s, w[j], acc[j]);                       \
        } else {                                                                                      \
            const T s = scales[p];                                                                    \
            for (ptrdiff_t j = j0; j < dim; j++) acc[j] = acc[j] + s * w[j];                          \
        }                                                                                             \
    }                                                                                                 \
}

/* Max pooling continued over a group: a later value replaces the current one only if strictly
 * greater (first occurrence wins ties; a NaN survives only as the first value). argmax may be NULL. */
#define CEMBED_DEFINE_POOL_MAX(NAME, T)                                                                \
CEMBED_BAG_CLONES static void NAME(T *restrict acc, int64_t *restrict argmax, const T *const *rows,                    \
                                    const int64_t *row_ids, ptrdiff_t n, ptrdiff_t dim)               \
{                                                                                                     \
    if (argmax == NULL) {                                                                             \
        for (ptrdiff_t p = 0; p < n; p++) {                                                           \
            const T *restrict w = rows[p];                                                            \
            for (ptrdiff_t j = 0; j < dim; j++) acc[j] = (w[j] > acc[j]) ? w[j] : acc[j];             \
        }                                                                                             \
        return;                                                                                       \
    }                                                                                                 \
    for (ptrdiff_t p = 0; p < n; p++) {                                                               \
        const T *w = rows[p];                                                                         \
        const int64_t r = row_ids[p];                                                                 \
        for (ptrdiff_t j = 0; j < dim; j++) {                                                         \
            const int gt = w[j] > acc[j];                                                             \
            acc[j] = gt ? w[j] : acc[j];                                                              \
            argmax[j] = gt ? r : argmax[j];                                                           \
        }                                                                                             \
    }                                                                                                 \
}

CEMBED_DEFINE_POOL_SUM(cembed_pool_sum_f32, float, cembed_vf8, fmaf)
CEMBED_DEFINE_POOL_SUM(cembed_pool_sum_f64, double, cembed_vd4, fma)
CEMBED_DEFINE_POOL_MAX(cembed_pool_max_f32, float)
CEMBED_DEFINE_POOL_MAX(cembed_pool_max_f64, double)

/* A whole bag, unscaled: out = sum over k in [begin, end) with idx[k] != padding_idx of row idx[k],
 * accumulated in bag order in vector registers, prefetching the row `ahead` entries ahead (all of its
 * cache lines). Returns the number of rows summed.
 * The distance is one of bytes: CEMBED_BAG_PREFETCH_BYTES of rows ahead (at least CEMBED_BAG_PREFETCH_MIN
 * rows, at most CEMBED_BAG_PREFETCH_MAX), so a 16-bit row is prefetched twice as many entries ahead as a
 * float32 one and the same number of lines is in flight. */
#ifndef CEMBED_BAG_PREFETCH_BYTES
#define CEMBED_BAG_PREFETCH_BYTES 16384
#endif
#define CEMBED_BAG_PREFETCH_MIN 16
#define CEMBED_BAG_PREFETCH_MAX 256
static inline __attribute__((unused)) ptrdiff_t cembed_bag_prefetch_rows(ptrdiff_t row_bytes)
{
    const ptrdiff_t rows = row_bytes > 0 ? CEMBED_BAG_PREFETCH_BYTES / row_bytes : CEMBED_BAG_PREFETCH_MAX;
    return rows < CEMBED_BAG_PREFETCH_MIN ? CEMBED_BAG_PREFETCH_MIN : rows > CEMBED_BAG_PREFETCH_MAX ? CEMBED_BAG_PREFETCH_MAX : rows;
}
/* inside the bag sums: prefetch every cache line of the row of entry k + ahead */
#define CEMBED_BAG_PREFETCH_ROW(k)                                                                     \
    do {                                                                                              \
        if ((k) + ahead < n_indices) {                                                                \
            const char *ahead_ = (const char *)(base + (ptrdiff_t)idx[(k) + ahead] * row_stride);     \
            for (ptrdiff_t b_ = 0; b_ < row_bytes; b_ += 64) __builtin_prefetch(ahead_ + b_, 0, 3);   \
        }                                                                                             \
    } while (0)
/* the start of every bag sum: the row's bytes, the prefetch distance, the count of rows summed (entries
 * other than padding_idx), the first column not yet summed (j0) and whether the first pass over the bag
 * (the one that prefetches) is done */
#define CEMBED_BAG_SUM_BEGIN(TW)                                                                       \
    const ptrdiff_t row_bytes = dim * (ptrdiff_t)sizeof(TW);                                          \
    const ptrdiff_t ahead = cembed_bag_prefetch_rows(row_bytes);                                      \
    ptrdiff_t count = 0, j0 = 0;                                                                      \
    int prefetched = 0;                                                                               \
    for (ptrdiff_t k = begin; k < end; k++) count += (int64_t)idx[k] != padding_idx
/* inside the bag sums: the columns j0..dim-1 that no vector block took, one at a time (in T, each row
 * widened by WIDEN), in bag order from +0 as the blocks sum */
#define CEMBED_BAG_SUM_LAST_COLUMNS(T, WIDEN)                                                          \
    for (ptrdiff_t j = j0; j < dim; j++) {                                                            \
        T a = 0;                                                                                      \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            a = a + WIDEN((base + (ptrdiff_t)idx[k] * row_stride)[j]);                                \
        }                                                                                             \
        out[j] = a;                                                                                   \
    }
/* the signature of every bag sum (T the output's type, TW the table's element type, IT the indices'):
 * out[0:dim] = the sum of rows idx[begin:end] of the table at base (row_stride elements apart), entries
 * equal to padding_idx skipped, n_indices entries readable in idx (for the prefetch); returns the count
 * of rows summed */
#define CEMBED_BAG_SUM_SIGNATURE(ATTR, NAME, T, TW, IT)                                                \
ATTR ptrdiff_t NAME(T *restrict out, const TW *base, ptrdiff_t row_stride, ptrdiff_t dim, const IT *idx,   \
                    ptrdiff_t begin, ptrdiff_t end, ptrdiff_t n_indices, int64_t padding_idx)
#define CEMBED_DEFINE_BAG_SUM(NAME, T, TW, V, IT, LOAD, WIDEN, WIDE)                                   \
    CEMBED_DEFINE_BAG_SUM_AS(CEMBED_BAG_CLONES, NAME, T, TW, V, IT, LOAD, WIDEN, WIDE)
#define CEMBED_DEFINE_BAG_SUM_AS(ATTR, NAME, T, TW, V, IT, LOAD, WIDEN, WIDE)                          \
CEMBED_BAG_SUM_SIGNATURE(ATTR static, NAME, T, TW, IT)                                                \
{                                                                                                     \
    const ptrdiff_t lanes = (ptrdiff_t)(sizeof(V) / sizeof(T));                                       \
    CEMBED_BAG_SUM_BEGIN(TW);                                                                         \
    for (; WIDE && j0 + 8 * lanes <= dim; j0 += 8 * lanes) {  /* 8 vectors of columns in 8 registers  */ \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};             \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);  /* the row `ahead` entries ahead */        \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            const TW *w = base + (ptrdiff_t)idx[k] * row_stride + j0;                                  \
            a0 = a0 + LOAD(w);                                                                         \
            a1 = a1 + LOAD(w + lanes);                                                                 \
            a2 = a2 + LOAD(w + 2 * lanes);                                                             \
            a3 = a3 + LOAD(w + 3 * lanes);                                                             \
            a4 = a4 + LOAD(w + 4 * lanes);                                                             \
            a5 = a5 + LOAD(w + 5 * lanes);                                                             \
            a6 = a6 + LOAD(w + 6 * lanes);                                                             \
            a7 = a7 + LOAD(w + 7 * lanes);                                                             \
        }                                                                                             \
        *(V *)(out + j0) = a0;                                                                        \
        *(V *)(out + j0 + lanes) = a1;                                                                \
        *(V *)(out + j0 + 2 * lanes) = a2;                                                            \
        *(V *)(out + j0 + 3 * lanes) = a3;                                                            \
        *(V *)(out + j0 + 4 * lanes) = a4;                                                            \
        *(V *)(out + j0 + 5 * lanes) = a5;                                                            \
        *(V *)(out + j0 + 6 * lanes) = a6;                                                            \
        *(V *)(out + j0 + 7 * lanes) = a7;                                                            \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    for (; j0 + 4 * lanes <= dim; j0 += 4 * lanes) {                                                  \
        V a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                     \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);  /* the row `ahead` entries ahead */        \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            const TW *w = base + (ptrdiff_t)idx[k] * row_stride + j0;                                  \
            a0 = a0 + LOAD(w);                                                                         \
            a1 = a1 + LOAD(w + lanes);                                                                 \
            a2 = a2 + LOAD(w + 2 * lanes);                                                             \
            a3 = a3 + LOAD(w + 3 * lanes);                                                             \
        }                                                                                             \
        *(V *)(out + j0) = a0;                                                                        \
        *(V *)(out + j0 + lanes) = a1;                                                                \
        *(V *)(out + j0 + 2 * lanes) = a2;                                                            \
        *(V *)(out + j0 + 3 * lanes) = a3;                                                            \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    for (; j0 + lanes <= dim; j0 += lanes) {                                                          \
        V a0 = {0};                                                                                   \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);                                              \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            a0 = a0 + LOAD(base + (ptrdiff_t)idx[k] * row_stride + j0);                                \
        }                                                                                             \
        *(V *)(out + j0) = a0;                                                                        \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    CEMBED_BAG_SUM_LAST_COLUMNS(T, WIDEN);                                                            \
    return count;                                                                                     \
}

CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f32_portable_i32, float, float, cembed_vf8, int32_t, CEMBED_LOAD_VF8, CEMBED_SCALAR, 1)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f32_portable_i64, float, float, cembed_vf8, int64_t, CEMBED_LOAD_VF8, CEMBED_SCALAR, 1)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f64_i32, double, double, cembed_vd4, int32_t, CEMBED_LOAD_VD4, CEMBED_SCALAR, 1)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f64_i64, double, double, cembed_vd4, int64_t, CEMBED_LOAD_VD4, CEMBED_SCALAR, 1)
/* 16-bit tables: rows widened to float32 as they stream in, summed in float32 in the order the float32
 * version sums the widened table (each element: row after row), so bitwise equal to it. float16 (and
 * bfloat16 on a big-endian machine) uses 8-float vectors: 64 columns per pass over the bag in 8
 * registers (the bag's rows are in L1 for the next pass). */
/* bfloat16, little-endian: a 32-bit lane of a row holds columns 2i (low half) and 2i+1 (high half), so
 * `lane << 16` and `lane & 0xFFFF0000` are both columns as float32 with no shuffle: one load, a shift,
 * an and and two adds per 16 columns. Even and odd columns accumulate in separate registers (each
 * element still sums its rows in bag order, from +0: bitwise the float32 kernel's result) and are
 * interleaved once per bag and block. */
#if defined(__BYTE_ORDER__) && defined(__ORDER_LITTLE_ENDIAN__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
typedef uint32_t cembed_vpair __attribute__((vector_size(32), aligned(2)));  /* 16 bf16 as 8 pairs */
#define CEMBED_BF16_EVEN(x) ((cembed_vf8)((x) << 16))
#define CEMBED_BF16_ODD(x) ((cembed_vf8)((x) & 0xFFFF0000u))
#define CEMBED_STORE_PAIRS(dst, even, odd)                                                            \
    do {                                                                                              \
        for (int i_ = 0; i_ < 8; i_++) { (dst)[2 * i_] = (even)[i_]; (dst)[2 * i_ + 1] = (odd)[i_]; } \
    } while (0)
#define CEMBED_DEFINE_BAG_SUM_BF16(NAME, IT)                                                           \
CEMBED_BAG_SUM_SIGNATURE(CEMBED_BAG_CLONES static, NAME, float, uint16_t, IT)                         \
{                                                                                                     \
    CEMBED_BAG_SUM_BEGIN(uint16_t);                                                                   \
    for (; j0 + 64 <= dim; j0 += 64) {  /* 64 columns: 8 accumulators */                              \
        cembed_vf8 e0 = {0}, o0 = {0}, e1 = {0}, o1 = {0}, e2 = {0}, o2 = {0}, e3 = {0}, o3 = {0};    \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);                                              \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            const uint16_t *w = base + (ptrdiff_t)idx[k] * row_stride + j0;                           \
            cembed_vpair x0 = *(const cembed_vpair *)w, x1 = *(const cembed_vpair *)(w + 16);         \
            cembed_vpair x2 = *(const cembed_vpair *)(w + 32), x3 = *(const cembed_vpair *)(w + 48);  \
            e0 = e0 + CEMBED_BF16_EVEN(x0); o0 = o0 + CEMBED_BF16_ODD(x0);                            \
            e1 = e1 + CEMBED_BF16_EVEN(x1); o1 = o1 + CEMBED_BF16_ODD(x1);                            \
            e2 = e2 + CEMBED_BF16_EVEN(x2); o2 = o2 + CEMBED_BF16_ODD(x2);                            \
            e3 = e3 + CEMBED_BF16_EVEN(x3); o3 = o3 + CEMBED_BF16_ODD(x3);                            \
        }                                                                                             \
        CEMBED_STORE_PAIRS(out + j0, e0, o0);                                                         \
        CEMBED_STORE_PAIRS(out + j0 + 16, e1, o1);                                                    \
        CEMBED_STORE_PAIRS(out + j0 + 32, e2, o2);                                                    \
        CEMBED_STORE_PAIRS(out + j0 + 48, e3, o3);                                                    \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    for (; j0 + 16 <= dim; j0 += 16) {                                                                \
        cembed_vf8 e0 = {0}, o0 = {0};                                                                \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);                                              \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            cembed_vpair x0 = *(const cembed_vpair *)(base + (ptrdiff_t)idx[k] * row_stride + j0);    \
            e0 = e0 + CEMBED_BF16_EVEN(x0); o0 = o0 + CEMBED_BF16_ODD(x0);                            \
        }                                                                                             \
        CEMBED_STORE_PAIRS(out + j0, e0, o0);                                                         \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    CEMBED_BAG_SUM_LAST_COLUMNS(float, cembed_bf16_to_f32);                                           \
    return count;                                                                                     \
}
CEMBED_DEFINE_BAG_SUM_BF16(cembed_bag_sum_bf16_portable_i32, int32_t)
CEMBED_DEFINE_BAG_SUM_BF16(cembed_bag_sum_bf16_portable_i64, int64_t)
#else
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_bf16_portable_i32, float, uint16_t, cembed_vf8, int32_t, cembed_load_bf16x8,
                      cembed_bf16_to_f32, 1)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_bf16_portable_i64, float, uint16_t, cembed_vf8, int64_t, cembed_load_bf16x8,
                      cembed_bf16_to_f32, 1)
#endif
/* float32 and bfloat16 on a CPU with AVX-512F (_half.h's check, which CEMBED_DISABLE_CPU_FEATURES=avx512f
 * turns off): 128 columns per pass over the bag in 8 zmm accumulators (a 128-column row is summed in one
 * pass, all its cache lines read together; the 256-bit kernels above take two passes), bfloat16 widened
 * 16 columns at a time by one zero-extend and a shift (cembed_bf16x16_widen). Each element still sums its
 * rows in bag order from +0: bit for bit the portable kernels' result. Chosen by the dispatchers below. */
#ifdef CEMBED_X86_INTRINSICS
#define CEMBED_LOAD_F32X16(p) _mm512_loadu_ps(p)
#define CEMBED_DEFINE_BAG_SUM_AVX512(NAME, TW, IT, LOAD16, WIDEN)                                      \
CEMBED_BAG_SUM_SIGNATURE(CEMBED_AVX512_FUNCTION static, NAME, float, TW, IT)                          \
{                                                                                                     \
    CEMBED_BAG_SUM_BEGIN(TW);                                                                         \
    for (; j0 + 128 <= dim; j0 += 128) {  /* 128 columns: 8 accumulators */                           \
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0; \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);                                              \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            const TW *w = base + (ptrdiff_t)idx[k] * row_stride + j0;                                 \
            a0 = _mm512_add_ps(a0, LOAD16(w));                                                        \
            a1 = _mm512_add_ps(a1, LOAD16(w + 16));                                                   \
            a2 = _mm512_add_ps(a2, LOAD16(w + 32));                                                   \
            a3 = _mm512_add_ps(a3, LOAD16(w + 48));                                                   \
            a4 = _mm512_add_ps(a4, LOAD16(w + 64));                                                   \
            a5 = _mm512_add_ps(a5, LOAD16(w + 80));                                                   \
            a6 = _mm512_add_ps(a6, LOAD16(w + 96));                                                   \
            a7 = _mm512_add_ps(a7, LOAD16(w + 112));                                                  \
        }                                                                                             \
        _mm512_storeu_ps(out + j0, a0); _mm512_storeu_ps(out + j0 + 16, a1);                          \
        _mm512_storeu_ps(out + j0 + 32, a2); _mm512_storeu_ps(out + j0 + 48, a3);                     \
        _mm512_storeu_ps(out + j0 + 64, a4); _mm512_storeu_ps(out + j0 + 80, a5);                     \
        _mm512_storeu_ps(out + j0 + 96, a6); _mm512_storeu_ps(out + j0 + 112, a7);                    \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    for (; j0 + 16 <= dim; j0 += 16) {                                                                \
        __m512 a0 = _mm512_setzero_ps();                                                              \
        for (ptrdiff_t k = begin; k < end; k++) {                                                     \
            if (!prefetched) CEMBED_BAG_PREFETCH_ROW(k);                                              \
            if ((int64_t)idx[k] == padding_idx) continue;                                             \
            a0 = _mm512_add_ps(a0, LOAD16(base + (ptrdiff_t)idx[k] * row_stride + j0));               \
        }                                                                                             \
        _mm512_storeu_ps(out + j0, a0);                                                               \
        prefetched = 1;                                                                               \
    }                                                                                                 \
    CEMBED_BAG_SUM_LAST_COLUMNS(float, WIDEN);                                                        \
    return count;                                                                                     \
}
CEMBED_DEFINE_BAG_SUM_AVX512(cembed_bag_sum_f32_avx512_i32, float, int32_t, CEMBED_LOAD_F32X16, CEMBED_SCALAR)
CEMBED_DEFINE_BAG_SUM_AVX512(cembed_bag_sum_f32_avx512_i64, float, int64_t, CEMBED_LOAD_F32X16, CEMBED_SCALAR)
CEMBED_DEFINE_BAG_SUM_AVX512(cembed_bag_sum_bf16_avx512_i32, uint16_t, int32_t, cembed_bf16x16_widen, cembed_bf16_to_f32)
CEMBED_DEFINE_BAG_SUM_AVX512(cembed_bag_sum_bf16_avx512_i64, uint16_t, int64_t, cembed_bf16x16_widen, cembed_bf16_to_f32)
#define CEMBED_BAG_SUM_AVX512_FIRST(FMT, SUFFIX)                                                       \
    if (dim >= 16 && cembed_have_avx512f())                                                           \
        return cembed_bag_sum_##FMT##_avx512_##SUFFIX(out, base, row_stride, dim, idx, begin, end, n_indices, padding_idx);
#else
#define CEMBED_BAG_SUM_AVX512_FIRST(FMT, SUFFIX)
#endif
/* cembed_bag_sum_{f32,bf16}_{i32,i64}: the AVX-512 kernel where the CPU has it, else the portable one */
#define CEMBED_DEFINE_BAG_SUM_DISPATCH(FMT, TW, SUFFIX, IT)                                            \
CEMBED_BAG_SUM_SIGNATURE(static inline __attribute__((unused)), cembed_bag_sum_##FMT##_##SUFFIX, float, TW, IT) \
{                                                                                                     \
    CEMBED_BAG_SUM_AVX512_FIRST(FMT, SUFFIX)                                                          \
    return cembed_bag_sum_##FMT##_portable_##SUFFIX(out, base, row_stride, dim, idx, begin, end, n_indices, \
                                                    padding_idx);                                     \
}
CEMBED_DEFINE_BAG_SUM_DISPATCH(f32, float, i32, int32_t)
CEMBED_DEFINE_BAG_SUM_DISPATCH(f32, float, i64, int64_t)
CEMBED_DEFINE_BAG_SUM_DISPATCH(bf16, uint16_t, i32, int32_t)
CEMBED_DEFINE_BAG_SUM_DISPATCH(bf16, uint16_t, i64, int64_t)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f16_portable_i32, float, uint16_t, cembed_vf8, int32_t, cembed_load_f16x8,
                      cembed_f16_to_f32, 1)
CEMBED_DEFINE_BAG_SUM(cembed_bag_sum_f16_portable_i64, float, uint16_t, cembed_vf8, int64_t, cembed_load_f16x8,
                      cembed_f16_to_f32, 1)
/* float16 on a CPU with AVX2 and F16C (_half.h, checked once at run time): the same sums, each 8 columns
 * widened by one vcvtph2ps, chosen by the dispatchers below. vcvtph2ps quiets a signalling NaN, which the
 * portable widening keeps signalling; every row is added to an accumulator (from +0), and that addition
 * quiets it the same way, keeping its payload: the sums are bit for bit the portable kernel's. */
#ifdef CEMBED_X86_INTRINSICS
#define CEMBED_F16C_FUNCTION __attribute__((target("avx2,f16c"), unused))
#define cembed_load_f16x8_f16c(p) ((cembed_vf8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p))))
CEMBED_DEFINE_BAG_SUM_AS(CEMBED_F16C_FUNCTION, cembed_bag_sum_f16c_i32, float, uint16_t, cembed_vf8, int32_t,
                         cembed_load_f16x8_f16c, cembed_f16_to_f32, 1)
CEMBED_DEFINE_BAG_SUM_AS(CEMBED_F16C_FUNCTION, cembed_bag_sum_f16c_i64, float, uint16_t, cembed_vf8, int64_t,
                         cembed_load_f16x8_f16c, cembed_f16_to_f32, 1)
#define CEMBED_BAG_SUM_F16C_FIRST(SUFFIX)                                                              \
    if (cembed_have_f16c())                                                                           \
        return cembed_bag_sum_f16c_##SUFFIX(out, base, row_stride, dim, idx, begin, end, n_indices, padding_idx);
#else
#define CEMBED_BAG_SUM_F16C_FIRST(SUFFIX)
#endif
/* cembed_bag_sum_f16_i32 / _i64: the F16C kernel where the CPU has it, else the portable one */
#define CEMBED_DEFINE_BAG_SUM_F16(SUFFIX, IT)                                                          \
static inline __attribute__((unused)) ptrdiff_t cembed_bag_sum_f16_##SUFFIX(                           \
        float *restrict out, const uint16_t *base, ptrdiff_t row_stride, ptrdiff_t dim, const IT *idx, \
        ptrdiff_t begin, ptrdiff_t end, ptrdiff_t n_indices, int64_t padding_idx)                      \
{                                                                                                     \
    CEMBED_BAG_SUM_F16C_FIRST(SUFFIX)                                                                 \
    return cembed_bag_sum_f16_portable_##SUFFIX(out, base, row_stride, dim, idx, begin, end, n_indices, padding_idx); \
}
CEMBED_DEFINE_BAG_SUM_F16(i32, int32_t)
CEMBED_DEFINE_BAG_SUM_F16(i64, int64_t)

#endif
