"""Gradient clipping: streaming norm reductions and in-place scale / clamp passes.

The norm of a flat array is computed in fixed blocks of BLOCK elements. Each block is reduced by one
thread into a float64 partial with a fixed accumulation pattern (GCC vector extensions of a fixed
width, so the pattern does not depend on the instruction set either); the partials are then combined
serially in block order. Block boundaries depend only on the array length and each partial has its own
slot, so the result is bitwise the same for any thread count and any schedule (blocks are handed out
dynamically: on a shared machine a descheduled thread does not hold up the others). The scale and
clamp passes are elementwise and write each element once.
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.stdlib cimport malloc, free

cdef extern from *:
    """
    #include <math.h>
    #include <stddef.h>
    #include <stdint.h>
    #include <string.h>

    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
    #define CEMBED_CLIP_CLONES \\
        __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), unused))
    #elif defined(__GNUC__)
    #define CEMBED_CLIP_CLONES __attribute__((unused))
    #else
    #define CEMBED_CLIP_CLONES
    #endif

    #if !defined(__GNUC__)
    #error "cembed's clipping kernels need GCC or Clang vector extensions"
    #endif

    /* Fixed-width 32-byte vectors: one register with AVX2 (and AVX-512), two with SSE2. The arithmetic
     * is elementwise IEEE whatever registers carry it, so every clone gives the same bits. (64-byte
     * generic vectors are lowered through the stack where AVX-512 is missing: 5-10x slower.) */
    typedef float cembed_clip_vf4 __attribute__((vector_size(16), aligned(4)));    /* 4 floats */
    typedef double cembed_clip_vd __attribute__((vector_size(32), aligned(8)));    /* 4 doubles */
    typedef int32_t cembed_clip_vi __attribute__((vector_size(32), aligned(4), may_alias));  /* 8 float bits */
    typedef int64_t cembed_clip_vl __attribute__((vector_size(32), aligned(8), may_alias));  /* 4 double bits */

    #define CEMBED_CLIP_ABS_D(v) ((cembed_clip_vd)((cembed_clip_vl)(v) & (int64_t)0x7fffffffffffffffLL))
    #define CEMBED_CLIP_SQ(v) ((v) * (v))

    /* Element k of 32 as a double (exact): accumulator j takes elements 4j..4j+3 of every 32. Macros,
     * not functions: vector arguments and returns would change the ABI between target clones. */
    #define cembed_clip_load4_f32(x) __builtin_convertvector(*(const cembed_clip_vf4 *)(x), cembed_clip_vd)
    #define cembed_clip_load4_f64(x) (*(const cembed_clip_vd *)(x))

    /* sum |x|^2 (SQ) or sum |x| (ABS) over x[0:n], float64 accumulation: eight vector accumulators of
     * 4 doubles over 32 elements per step, combined pairwise in a fixed tree, the lanes in lane
     * order, then the tail in order. float32 squares are exact in float64: only the additions round. */
    #define CEMBED_CLIP_DEFINE_SUM(NAME, T, LOAD, TERM, STERM)                                        \\
    CEMBED_CLIP_CLONES static double NAME(const T *restrict x, ptrdiff_t n)                           \\
    {                                                                                                 \\
        cembed_clip_vd a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0}; \\
        ptrdiff_t i = 0;                                                                              \\
        for (; i + 32 <= n; i += 32) {                                                                \\
            cembed_clip_vd v0 = LOAD(x + i), v1 = LOAD(x + i + 4);                                    \\
            cembed_clip_vd v2 = LOAD(x + i + 8), v3 = LOAD(x + i + 12);                               \\
            cembed_clip_vd v4 = LOAD(x + i + 16), v5 = LOAD(x + i + 20);                              \\
            cembed_clip_vd v6 = LOAD(x + i + 24), v7 = LOAD(x + i + 28);                              \\
            a0 = a0 + TERM(v0);                                                                       \\
            a1 = a1 + TERM(v1);                                                                       \\
            a2 = a2 + TERM(v2);                                                                       \\
            a3 = a3 + TERM(v3);                                                                       \\
            a4 = a4 + TERM(v4);                                                                       \\
            a5 = a5 + TERM(v5);                                                                       \\
            a6 = a6 + TERM(v6);                                                                       \\
            a7 = a7 + TERM(v7);                                                                       \\
        }                                                                                             \\
        cembed_clip_vd a = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));                         \\
        double s = (a[0] + a[1]) + (a[2] + a[3]);                                                     \\
        for (; i < n; i++) { double v = (double)x[i]; s += STERM(v); }                                \\
        return s;                                                                                     \\
    }
    CEMBED_CLIP_DEFINE_SUM(cembed_clip_sumsq_f32, float, cembed_clip_load4_f32, CEMBED_CLIP_SQ, CEMBED_CLIP_SQ)
    CEMBED_CLIP_DEFINE_SUM(cembed_clip_sumsq_f64, double, cembed_clip_load4_f64, CEMBED_CLIP_SQ, CEMBED_CLIP_SQ)
    CEMBED_CLIP_DEFINE_SUM(cembed_clip_sumabs_f32, float, cembed_clip_load4_f32, CEMBED_CLIP_ABS_D, fabs)
    CEMBED_CLIP_DEFINE_SUM(cembed_clip_sumabs_f64, double, cembed_clip_load4_f64, CEMBED_CLIP_ABS_D, fabs)

    /* sum |x|^p for any other p: pow per element (no vector pow without a vector math library). */
    #define CEMBED_CLIP_DEFINE_SUMPOW(NAME, T)                                                        \\
    static double NAME(const T *restrict x, ptrdiff_t n, double p)                                    \\
    {                                                                                                 \\
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                                \\
        ptrdiff_t i = 0;                                                                              \\
        for (; i + 4 <= n; i += 4) {                                                                  \\
            s0 += pow(fabs((double)x[i]), p);                                                         \\
            s1 += pow(fabs((double)x[i + 1]), p);                                                     \\
            s2 += pow(fabs((double)x[i + 2]), p);                                                     \\
            s3 += pow(fabs((double)x[i + 3]), p);                                                     \\
        }                                                                                             \\
        double s = (s0 + s1) + (s2 + s3);                                                             \\
        for (; i < n; i++) s += pow(fabs((double)x[i]), p);                                          \\
        return s;                                                                                     \\
    }
    CEMBED_CLIP_DEFINE_SUMPOW(cembed_clip_sumpow_f32, float)
    CEMBED_CLIP_DEFINE_SUMPOW(cembed_clip_sumpow_f64, double)

    /* max |x| with NaN propagation, as an integer max over the sign-cleared bit patterns: for
     * non-negative IEEE values the bit pattern orders like the value, and every NaN lies above +inf.
     * Max is exact and order-free, so the result (NaN payload included) depends on no order at all. */
    static inline double cembed_clip_nanmax(double m, double a)
    { return (a > m || a != a) ? a : m; }

    #define CEMBED_CLIP_DEFINE_MAXABS(NAME, T, I, VI, MASK)                                           \\
    CEMBED_CLIP_CLONES static double NAME(const T *restrict x, ptrdiff_t n)                           \\
    {                                                                                                 \\
        const ptrdiff_t lanes = (ptrdiff_t)(sizeof(VI) / sizeof(I));                                  \\
        VI m0 = {0}, m1 = {0}, m2 = {0}, m3 = {0};                                                    \\
        ptrdiff_t i = 0;                                                                              \\
        for (; i + 4 * lanes <= n; i += 4 * lanes) {                                                  \\
            VI v0 = *(const VI *)(x + i) & (I)MASK;                                                   \\
            VI v1 = *(const VI *)(x + i + lanes) & (I)MASK;                                           \\
            VI v2 = *(const VI *)(x + i + 2 * lanes) & (I)MASK;                                       \\
            VI v3 = *(const VI *)(x + i + 3 * lanes) & (I)MASK;                                       \\
            VI k0 = v0 > m0, k1 = v1 > m1, k2 = v2 > m2, k3 = v3 > m3;                                \\
            m0 = (k0 & v0) | (~k0 & m0);                                                              \\
            m1 = (k1 & v1) | (~k1 & m1);                                                              \\
            m2 = (k2 & v2) | (~k2 & m2);                                                              \\
            m3 = (k3 & v3) | (~k3 & m3);                                                              \\
        }                                                                                             \\
        I m = 0;                                                                                      \\
        for (ptrdiff_t k = 0; k < lanes; k++) {                                                       \\
            if (m0[k] > m) m = m0[k];                                                                 \\
            if (m1[k] > m) m = m1[k];                                                                 \\
            if (m2[k] > m) m = m2[k];                                                                 \\
            if (m3[k] > m) m = m3[k];                                                                 \\
        }                                                                                             \\
        for (; i < n; i++) {                                                                          \\
            I v;                                                                                      \\
            memcpy(&v, x + i, sizeof v);                                                              \\
            v &= (I)MASK;                                                                             \\
            if (v > m) m = v;                                                                         \\
        }                                                                                             \\
        T r;                                                                                          \\
        memcpy(&r, &m, sizeof r);                                                                     \\
        return (double)r;                                                                             \\
    }
    CEMBED_CLIP_DEFINE_MAXABS(cembed_clip_maxabs_f32, float, int32_t, cembed_clip_vi, 0x7fffffff)
    CEMBED_CLIP_DEFINE_MAXABS(cembed_clip_maxabs_f64, double, int64_t, cembed_clip_vl, 0x7fffffffffffffffLL)

    /* x = x * c, and x = min(max(x, lo), hi) with NaN kept (lo <= hi). */
    #define CEMBED_CLIP_DEFINE_SCALE(NAME, T)                                                         \\
    CEMBED_CLIP_CLONES static void NAME(T *restrict x, ptrdiff_t n, T c)                              \\
    {                                                                                                 \\
        for (ptrdiff_t i = 0; i < n; i++) x[i] = x[i] * c;                                            \\
    }
    #define CEMBED_CLIP_DEFINE_CLAMP(NAME, T)                                                         \\
    CEMBED_CLIP_CLONES static void NAME(T *restrict x, ptrdiff_t n, T lo, T hi)                       \\
    {                                                                                                 \\
        for (ptrdiff_t i = 0; i < n; i++) {                                                           \\
            T v = x[i];                                                                               \\
            v = v < lo ? lo : v;                                                                      \\
            v = v > hi ? hi : v;                                                                      \\
            x[i] = v;                                                                                 \\
        }                                                                                             \\
    }
    CEMBED_CLIP_DEFINE_SCALE(cembed_clip_scale_f32, float)
    CEMBED_CLIP_DEFINE_SCALE(cembed_clip_scale_f64, double)
    CEMBED_CLIP_DEFINE_CLAMP(cembed_clip_clamp_f32, float)
    CEMBED_CLIP_DEFINE_CLAMP(cembed_clip_clamp_f64, double)
    """
    double cembed_clip_sumsq_f32(const float *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_sumsq_f64(const double *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_sumabs_f32(const float *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_sumabs_f64(const double *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_sumpow_f32(const float *x, Py_ssize_t n, double p) noexcept nogil
    double cembed_clip_sumpow_f64(const double *x, Py_ssize_t n, double p) noexcept nogil
    double cembed_clip_maxabs_f32(const float *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_maxabs_f64(const double *x, Py_ssize_t n) noexcept nogil
    double cembed_clip_nanmax(double m, double a) noexcept nogil
    void cembed_clip_scale_f32(float *x, Py_ssize_t n, float c) noexcept nogil
    void cembed_clip_scale_f64(double *x, Py_ssize_t n, double c) noexcept nogil
    void cembed_clip_clamp_f32(float *x, Py_ssize_t n, float lo, float hi) noexcept nogil
    void cembed_clip_clamp_f64(double *x, Py_ssize_t n, double lo, double hi) noexcept nogil

cdef enum:
    BLOCK = 8192          # elements per reduction block: fixes the summation order (never the thread count)
    BLOCKS_PER_CHUNK = 4  # dynamic schedule: a thread that the (shared) machine stalls does not hold the rest

# Reduction kinds (the façade picks one from norm_type).
KIND_MAX_ABS = 0          # norm_type = inf:  max |x|
KIND_SUM_ABS = 1          # norm_type = 1:    sum |x|
KIND_SUM_SQ = 2           # norm_type = 2:    sum x^2
KIND_SUM_POW = 3          # other norm_type:  sum |x|^p


cdef inline double _block_reduce(const floating *x, Py_ssize_t n, int kind, double p) noexcept nogil:
    if floating is float:
        if kind == 0:
            return cembed_clip_maxabs_f32(x, n)
        elif kind == 1:
            return cembed_clip_sumabs_f32(x, n)
        elif kind == 2:
            return cembed_clip_sumsq_f32(x, n)
        return cembed_clip_sumpow_f32(x, n, p)
    else:
        if kind == 0:
            return cembed_clip_maxabs_f64(x, n)
        elif kind == 1:
            return cembed_clip_sumabs_f64(x, n)
        elif kind == 2:
            return cembed_clip_sumsq_f64(x, n)
        return cembed_clip_sumpow_f64(x, n, p)


def norm_reduce(const floating[::1] x,          # IN (n,) the stored gradient values, flat
                int kind, double p, int n_threads):
    """The float64 reduction of ``x`` for ``kind`` (KIND_*): sum of |x|^p, or max |x| (NaN wins).

    Blocks of BLOCK elements are reduced in parallel into partials, which are then combined serially
    in block order: the result does not depend on ``n_threads``."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = (n + BLOCK - 1) // BLOCK
    cdef Py_ssize_t b, k, start, stop
    cdef double total = 0.0
    cdef double *partials
    if kind < 0 or kind > 3:
        raise ValueError(f"unknown reduction kind {kind}")
    if n == 0:
        return 0.0
    partials = <double *> malloc(n_blocks * sizeof(double))
    if partials == NULL:
        raise MemoryError()
    try:
        with nogil:
            for b in prange(n_blocks, schedule="dynamic", chunksize=BLOCKS_PER_CHUNK, num_threads=n_threads):
                start = b * BLOCK
                stop = start + BLOCK
                if stop > n:
                    stop = n
                partials[b] = _block_reduce(&x[start], stop - start, kind, p)
            if kind == 0:
                for k in range(n_blocks):
                    total = cembed_clip_nanmax(total, partials[k])
            else:
                for k in range(n_blocks):
                    total = total + partials[k]
    finally:
        free(partials)
    return total


cdef enum:
    OP_SCALE = 0
    OP_CLAMP = 1


def transform_(floating[::1] x,                 # INOUT (n,)
               int op, double a, double b, int n_threads):
    """In place, block by block: ``op == 0``: ``x[i] = x[i] * a`` (``a`` representable in x's dtype);
    ``op == 1``: ``x[i] = min(max(x[i], a), b)`` with NaN kept (``a <= b``, both representable)."""
    cdef Py_ssize_t n = x.shape[0]
    cdef Py_ssize_t n_blocks = (n + BLOCK - 1) // BLOCK
    cdef Py_ssize_t blk, start, stop
    if op != OP_SCALE and op != OP_CLAMP:
        raise ValueError(f"transform_: unknown op {op}")
    if n == 0:
        return
    with nogil:
        for blk in prange(n_blocks, schedule="dynamic", chunksize=BLOCKS_PER_CHUNK, num_threads=n_threads):
            start = blk * BLOCK
            stop = start + BLOCK
            if stop > n:
                stop = n
            if op == OP_SCALE:
                if floating is float:
                    cembed_clip_scale_f32(&x[start], stop - start, <float> a)
                else:
                    cembed_clip_scale_f64(&x[start], stop - start, a)
            elif floating is float:
                cembed_clip_clamp_f32(&x[start], stop - start, <float> a, <float> b)
            else:
                cembed_clip_clamp_f64(&x[start], stop - start, a, b)
