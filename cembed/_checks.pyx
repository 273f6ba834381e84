"""Range and order checks of index arrays: the guards every kernel call stands behind.

Both are one branch-free pass over the array (negative values wrap to huge unsigned ones, so a single
unsigned compare catches both ends); the position of the first offender is only searched for when
something was wrong.
"""
from libc.stdint cimport int64_t, uint64_t

from cembed._typedefs cimport index_t


def first_out_of_range(const index_t[::1] indices,   # IN (n,)
                       int64_t n_rows):
    """Position of the first index outside [0, n_rows), or -1 when all are valid."""
    cdef Py_ssize_t i, n = indices.shape[0]
    cdef uint64_t limit = <uint64_t> n_rows if n_rows > 0 else 0
    cdef int bad = 0
    cdef Py_ssize_t first = -1
    with nogil:
        for i in range(n):
            bad |= (<uint64_t> (<int64_t> indices[i])) >= limit
        if bad:
            for i in range(n):
                if (<uint64_t> (<int64_t> indices[i])) >= limit:
                    first = i
                    break
    return first


def first_unsorted_or_out_of_range(const int64_t[::1] rows,   # IN (n,) row ids kept between calls
                                   int64_t n_rows):
    """Position of the first row id that is outside [0, n_rows) or not greater than its predecessor,
    or -1 when the array is a strictly increasing list of valid rows."""
    cdef Py_ssize_t i, n = rows.shape[0]
    cdef uint64_t limit = <uint64_t> n_rows if n_rows > 0 else 0
    cdef int bad = 0
    cdef Py_ssize_t first = -1
    if n == 0:
        return -1
    with nogil:
        bad = (<uint64_t> rows[0]) >= limit
        for i in range(1, n):
            bad |= ((<uint64_t> rows[i]) >= limit) | (rows[i] <= rows[i - 1])
        if bad:
            if (<uint64_t> rows[0]) >= limit:
                first = 0
            else:
                for i in range(1, n):
                    if (<uint64_t> rows[i]) >= limit or rows[i] <= rows[i - 1]:
                        first = i
                        break
    return first
