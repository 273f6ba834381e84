"""In-place max_norm renormalisation of the (unique) rows a lookup touches."""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.math cimport sqrt, pow, fabs, INFINITY, isnan
from libc.stdint cimport int64_t, uint16_t
from libc.stdlib cimport malloc, free

from cembed._rows cimport (prefetch_row_for_write, prefetch_row, row_stride_items, PREFETCH_DISTANCE, TABLE_BF16,
                           TABLE_F16, cembed_half_row_to_f32, cembed_f32_row_to_half_rne, half_to_f32,
                           f32_to_half_rne)

cdef double RENORM_EPS = 1e-7   # torch's absolute epsilon: scale = max_norm / (norm + 1e-7)


cdef inline double row_norm(const floating *x, Py_ssize_t dim, double p) noexcept nogil:
    """The p-"norm" torch's embedding_renorm_ uses (docs/behaviour.md §4), accumulated in double and
    rounded to the weight's dtype, then widened back to double for the comparison."""
    cdef Py_ssize_t j
    cdef double acc = 0.0, a
    if p == 2.0:
        for j in range(dim):
            acc += <double> x[j] * <double> x[j]
        acc = sqrt(acc)
    elif p == 1.0:
        for j in range(dim):
            acc += fabs(<double> x[j])
    elif p == INFINITY:
        for j in range(dim):
            a = fabs(<double> x[j])
            if a > acc or isnan(a):
                acc = a
                if isnan(a):
                    break
    elif p == -INFINITY:
        acc = INFINITY
        for j in range(dim):
            a = fabs(<double> x[j])
            if a < acc or isnan(a):
                acc = a
                if isnan(a):
                    break
    elif p == 0.0:
        for j in range(dim):
            acc += x[j] != 0
    else:
        for j in range(dim):
            acc += pow(fabs(<double> x[j]), p)
        acc = pow(acc, 1.0 / p)
    return <double> (<floating> acc)


def renorm_rows(floating[:, :] weight,         # INOUT (n_rows, dim), unit column stride
                const int64_t[::1] rows,        # IN    (n_unique,) distinct row ids, validated
                double max_norm, double norm_type, int n_threads):
    """For each listed row: if its norm is > max_norm (strict), scale it by
    fp(max_norm / (norm + 1e-7)) with one multiply in the weight's dtype. Each row is owned by one
    thread, so the result does not depend on the thread count."""
    cdef Py_ssize_t n_unique = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, j, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef floating *base
    cdef floating *x
    cdef floating scale
    cdef double norm
    if n_unique == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("renorm_rows: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    with nogil:
        for k in prange(n_unique, schedule="static", num_threads=n_threads):
            if k + PREFETCH_DISTANCE < n_unique:
                prefetch_row(base + rows[k + PREFETCH_DISTANCE] * row_stride, row_bytes)
            x = base + rows[k] * row_stride
            norm = row_norm(x, dim, norm_type)
            if norm > max_norm:
                scale = <floating> (max_norm / (norm + RENORM_EPS))
                for j in range(dim):
                    x[j] = x[j] * scale


def renorm_rows_half(uint16_t[:, :] weight,         # INOUT (n_rows, dim) 16-bit bit patterns, unit column stride
                     int fmt,                        # TABLE_BF16 or TABLE_F16
                     const int64_t[::1] rows,        # IN    (n_unique,) distinct row ids, validated
                     double max_norm, double norm_type, int n_threads):
    """renorm_rows for a bfloat16 / float16 table, as torch renormalises such a table: the row is
    widened to float32, its norm accumulated in double and rounded to the table's format (through
    float32); if norm > max_norm the factor max_norm / (norm + 1e-7) is rounded to the table's format,
    each element multiplied by it in float32 (exact: both have at most 11 significant bits) and rounded
    once, to nearest even. One thread per row; a per-thread float32 scratch row."""
    cdef Py_ssize_t n_unique = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, j, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(uint16_t)
    cdef uint16_t *base
    cdef uint16_t *x
    cdef float *scratch_all
    cdef float *buf
    cdef float scale
    cdef double norm
    if n_unique == 0 or dim == 0:
        return
    if fmt != TABLE_BF16 and fmt != TABLE_F16:
        raise ValueError(f"renorm_rows_half: fmt must be TABLE_BF16 or TABLE_F16, got {fmt}")
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError("renorm_rows_half: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    n_threads = max(1, n_threads)
    scratch_all = <float *> malloc(n_threads * dim * sizeof(float))
    if scratch_all == NULL:
        raise MemoryError("renorm_rows_half: no memory for the per-thread scratch rows")
    buf = scratch_all
    try:
        with nogil, parallel(num_threads=n_threads):
            buf = scratch_all + threadid() * dim
            for k in prange(n_unique, schedule="static"):
                if k + PREFETCH_DISTANCE < n_unique:
                    prefetch_row_for_write(base + rows[k + PREFETCH_DISTANCE] * row_stride, row_bytes)
                x = base + rows[k] * row_stride
                cembed_half_row_to_f32(fmt, buf, x, dim)
                norm = row_norm(buf, dim, norm_type)                             # rounded to float32
                norm = half_to_f32(fmt, f32_to_half_rne(fmt, <float> norm))      # then to the format
                if norm > max_norm:
                    scale = half_to_f32(fmt, f32_to_half_rne(fmt, <float> (max_norm / (norm + RENORM_EPS))))
                    for j in range(dim):
                        buf[j] = buf[j] * scale
                    cembed_f32_row_to_half_rne(fmt, x, buf, dim)
    finally:
        free(scratch_all)
