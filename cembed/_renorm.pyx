"""In-place max_norm renormalisation of the (unique) rows a lookup touches."""
from cython.parallel cimport prange
from cython cimport floating
from libc.math cimport sqrt, pow, fabs, INFINITY, isnan
from libc.stdint cimport int64_t

from cembed._rows cimport prefetch_row, row_stride_items, PREFETCH_DISTANCE

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
