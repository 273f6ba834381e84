"""Row gather: the embedding lookup (indices are range-checked by cembed._checks first)."""
from cython.parallel cimport prange
from cython cimport floating
from libc.string cimport memcpy

from cembed._typedefs cimport index_t
from cembed._rows cimport prefetch_row, row_stride_items, PREFETCH_DISTANCE


def gather_rows(const floating[:, :] weight,    # IN  (n_rows, dim), unit column stride
                const index_t[::1] indices,      # IN  (n_indices,), validated to lie in [0, n_rows)
                floating[:, ::1] out,            # OUT (n_indices, dim)
                int n_threads):
    """out[i, :] = weight[indices[i], :], parallel over i, prefetching rows PREFETCH_DISTANCE ahead.
    Row offsets are computed in Py_ssize_t, so tables with n_rows * dim > 2**31 work."""
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t i
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef Py_ssize_t row_stride
    cdef const floating *base
    if n_indices == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("gather_rows: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    with nogil:
        for i in prange(n_indices, schedule="static", num_threads=n_threads):
            if i + PREFETCH_DISTANCE < n_indices:
                prefetch_row(base + (<Py_ssize_t> indices[i + PREFETCH_DISTANCE]) * row_stride, row_bytes)
            memcpy(&out[i, 0], base + (<Py_ssize_t> indices[i]) * row_stride, row_bytes)
