"""Scoring kernels for dot-product models: each query row against rows of a table, read in place.

``scores[b, k] = <query[b], weight[indices[b, k]]>`` and its gradient with respect to the query,
``grad_query[b] = sum_k grad_scores[b, k] * weight[indices[b, k]]``, without gathering the
(n_queries, n_per_query, dim) copy of the looked-up rows. Parallel over queries: query b's outputs
are written by one thread in a fixed order, so the result does not depend on the thread count
(nor on which thread takes which chunk of queries: the schedule is dynamic).
Indices are range-checked by the caller (cembed.functional) first.
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.math cimport exp, expf, fabs, fabsf, log1p, log1pf

from cembed._typedefs cimport index_t
from cembed._rows cimport prefetch_row, row_stride_items, PREFETCH_DISTANCE

cdef enum:
    # dynamic-schedule chunk of queries: a thread that the OS pauses (a shared host) holds up only
    # its current chunk, not a static half of the batch; the results do not depend on the schedule
    QUERIES_PER_CHUNK = 128


cdef extern from "_score.h" nogil:
    float cembed_dot_f32(const float *a, const float *b, Py_ssize_t dim)
    double cembed_dot_f64(const double *a, const double *b, Py_ssize_t dim)
    void cembed_score_axpy_f32(float *out, const float *row, float scale, Py_ssize_t dim)
    void cembed_score_axpy_f64(double *out, const double *row, double scale, Py_ssize_t dim)


cdef inline floating row_dot(const floating *a, const floating *b, Py_ssize_t dim) noexcept nogil:
    """<a, b> in 8 fma lanes (_score.h)."""
    if floating is float:
        return cembed_dot_f32(a, b, dim)
    else:
        return cembed_dot_f64(a, b, dim)


cdef inline void row_scaled_add(floating *out, const floating *row, floating scale,
                                Py_ssize_t dim) noexcept nogil:
    """out = fma(scale, row, out), element by element."""
    if floating is float:
        cembed_score_axpy_f32(out, row, scale, dim)
    else:
        cembed_score_axpy_f64(out, row, scale, dim)


def dot_scores(const floating[:, ::1] query,     # IN  (n_queries, dim)
               const floating[:, :] weight,      # IN  (n_rows, dim), unit column stride
               const index_t[:, ::1] indices,    # IN  (n_queries, n_per_query), validated in [0, n_rows)
               floating[:, ::1] out,             # OUT (n_queries, n_per_query)
               int n_threads):
    """out[b, k] = <query[b], weight[indices[b, k]]>, parallel over b, prefetching table rows
    PREFETCH_DISTANCE entries ahead."""
    cdef Py_ssize_t n_queries = indices.shape[0], n_per = indices.shape[1], dim = weight.shape[1]
    cdef Py_ssize_t b, k, ahead, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef Py_ssize_t n_total
    cdef const floating *base
    cdef const index_t *flat
    if n_queries == 0 or n_per == 0:
        return
    if dim == 0 or weight.shape[0] == 0:
        for b in range(n_queries):
            for k in range(n_per):
                out[b, k] = 0
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("score kernels: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    flat = &indices[0, 0]
    n_total = n_queries * n_per
    with nogil:
        for b in prange(n_queries, schedule="dynamic", chunksize=QUERIES_PER_CHUNK, num_threads=n_threads):
            for k in range(n_per):
                ahead = b * n_per + k + PREFETCH_DISTANCE
                if ahead < n_total:
                    prefetch_row(base + (<Py_ssize_t> flat[ahead]) * row_stride, row_bytes)
                out[b, k] = row_dot(&query[b, 0], base + (<Py_ssize_t> indices[b, k]) * row_stride, dim)


def dot_scores_backward(const floating[:, ::1] grad_scores,   # IN  (n_queries, n_per_query)
                        const floating[:, :] weight,          # IN  (n_rows, dim), unit column stride
                        const index_t[:, ::1] indices,        # IN  (n_queries, n_per_query), validated
                        floating[:, ::1] out,                 # OUT (n_queries, dim)
                        int n_threads):
    """out[b] = sum over k (in order k = 0, 1, ...) of grad_scores[b, k] * weight[indices[b, k]],
    each term one fma per element, starting from zero; parallel over b."""
    cdef Py_ssize_t n_queries = indices.shape[0], n_per = indices.shape[1], dim = weight.shape[1]
    cdef Py_ssize_t b, k, d, ahead, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef Py_ssize_t n_total
    cdef const floating *base
    cdef const index_t *flat
    if n_queries == 0 or dim == 0:
        return
    if n_per == 0 or weight.shape[0] == 0:
        for b in range(n_queries):
            for d in range(dim):
                out[b, d] = 0
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("score kernels: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    flat = &indices[0, 0]
    n_total = n_queries * n_per
    with nogil:
        for b in prange(n_queries, schedule="dynamic", chunksize=QUERIES_PER_CHUNK, num_threads=n_threads):
            for d in range(dim):
                out[b, d] = 0
            for k in range(n_per):
                ahead = b * n_per + k + PREFETCH_DISTANCE
                if ahead < n_total:
                    prefetch_row(base + (<Py_ssize_t> flat[ahead]) * row_stride, row_bytes)
                row_scaled_add(&out[b, 0], base + (<Py_ssize_t> indices[b, k]) * row_stride,
                               grad_scores[b, k], dim)


cdef inline floating _exp_neg_abs(floating x) noexcept nogil:
    """exp(-|x|), in (0, 1]: never overflows."""
    if floating is float:
        return expf(-fabsf(x))
    else:
        return exp(-fabs(x))


cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)


def logistic_scores(const floating[:, ::1] query,       # IN  (n_queries, dim)
                    const floating[:, :] weight,        # IN  (n_rows, dim), unit column stride
                    const index_t[:, ::1] indices,      # IN  (n_queries, n_per_query), validated
                    Py_ssize_t n_positive,              # IN  columns [0, n_positive) are positives
                    bint want_loss,                     # IN  False: loss is neither computed nor written
                    floating[::1] loss,                 # OUT (n_queries,), or (0,) without want_loss
                    floating[:, ::1] grad_scores,       # OUT (n_queries, n_per_query)
                    floating[:, ::1] grad_query,        # OUT (n_queries, dim)
                    int n_threads):
    """The binary logistic loss of dot-product scores, its gradient with respect to the scores and
    to the query, reading each table row once per (query, column): with s = <query[b], row> and
    x = -s for a positive column, x = s for a negative one, and e = exp(-|x|):
    loss[b] = sum over k (in order) of softplus(x) = max(x, 0) + log1p(e),
    grad_scores[b, k] = +-sigmoid(x) (the sign of s in x), sigmoid(x) = 1 / (1 + e) for x >= 0, else
    e / (1 + e); grad_query[b] as in dot_scores_backward (k = 0, 1, ..., one fma per element)."""
    cdef Py_ssize_t n_queries = indices.shape[0], n_per = indices.shape[1], dim = weight.shape[1]
    cdef Py_ssize_t b, k, d, ahead, row_stride, n_total
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef const floating *base
    cdef const floating *row
    cdef const index_t *flat
    cdef floating s, x, e, g, total
    if n_queries == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("score kernels: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0] if weight.shape[0] > 0 and dim > 0 else NULL
    flat = &indices[0, 0] if n_per > 0 else NULL
    n_total = n_queries * n_per
    with nogil:
        for b in prange(n_queries, schedule="dynamic", chunksize=QUERIES_PER_CHUNK, num_threads=n_threads):
            total = 0
            for d in range(dim):
                grad_query[b, d] = 0
            for k in range(n_per):
                if base != NULL:
                    ahead = b * n_per + k + PREFETCH_DISTANCE
                    if ahead < n_total:
                        prefetch_row(base + (<Py_ssize_t> flat[ahead]) * row_stride, row_bytes)
                    row = base + (<Py_ssize_t> flat[b * n_per + k]) * row_stride
                    s = row_dot(&query[b, 0], row, dim)
                else:
                    s = 0
                x = -s if k < n_positive else s
                e = _exp_neg_abs(x)                   # softplus and sigmoid from one exp
                if want_loss:
                    total = total + (x if x > 0 else 0) + _log1p(e)
                g = 1 / (1 + e) if x >= 0 else e / (1 + e)
                g = -g if k < n_positive else g
                grad_scores[b, k] = g
                if base != NULL:
                    row_scaled_add(&grad_query[b, 0], row, g, dim)
            if want_loss:
                loss[b] = total
