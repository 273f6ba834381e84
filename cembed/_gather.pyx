"""Row gather (the embedding lookup) and the index range check that guards every kernel."""
from cython.parallel cimport prange
from cython cimport floating
from libc.string cimport memcpy
from libc.stdint cimport int64_t, uint64_t

from cembed._typedefs cimport index_t
from cembed._rows cimport prefetch_row, row_stride_items, PREFETCH_DISTANCE


def first_out_of_range(const index_t[::1] indices, int64_t n_rows):
    """Position of the first index outside [0, n_rows), or -1 when all are valid.

    One branch-free pass (negative values wrap to huge unsigned ones, so a single unsigned compare
    catches both ends); the position is only searched for when something was wrong."""
    cdef Py_ssize_t i, n_indices = indices.shape[0]
    cdef uint64_t limit = <uint64_t> n_rows if n_rows > 0 else 0
    cdef int bad = 0
    cdef Py_ssize_t first = -1
    with nogil:
        for i in range(n_indices):
            bad |= (<uint64_t> (<int64_t> indices[i])) >= limit
        if bad:
            for i in range(n_indices):
                if (<uint64_t> (<int64_t> indices[i])) >= limit:
                    first = i
                    break
    return first


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
