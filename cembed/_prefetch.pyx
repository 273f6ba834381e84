"""Prefetch of table rows from disk: ask the kernel to start reading the pages of given rows.

For a memory-mapped table (``numpy.memmap``) a row that is not in memory costs a page fault and a
synchronous disk read when a kernel first touches it. ``willneed_rows`` computes the pages the given
rows occupy, merges them into ranges and calls ``madvise(MADV_WILLNEED)`` once per range: the kernel
starts the reads and returns at once, so the disk works while the caller computes.
"""
from libc.stdint cimport int64_t, uintptr_t
from posix.mman cimport madvise, MADV_WILLNEED


cdef inline Py_ssize_t _advise(uintptr_t first_page, uintptr_t end_page, Py_ssize_t page) noexcept nogil:
    """madvise(WILLNEED) on pages [first_page, end_page) (page numbers); returns pages advised."""
    madvise(<void *> (first_page * page), (end_page - first_page) * page, MADV_WILLNEED)
    return <Py_ssize_t> (end_page - first_page)


def willneed_rows(const unsigned char[:, :] table,   # IN  (n_rows, row_bytes) bytes of the mapped array
                  const int64_t[::1] rows,            # IN  (n,) strictly increasing, validated in [0, n_rows)
                  Py_ssize_t page,                    # IN  the page size (a power of two)
                  Py_ssize_t gap_pages):              # IN  merge ranges separated by <= gap_pages pages
    """Advise WILLNEED on every page holding a byte of the given rows; ranges whose gap is at most
    ``gap_pages`` pages are merged into one call. Returns (madvise calls, pages advised). Errors of
    madvise (e.g. on memory that is not a file mapping) are ignored: it is advice."""
    cdef Py_ssize_t n = rows.shape[0]
    cdef Py_ssize_t row_bytes = table.shape[1]
    cdef Py_ssize_t stride = table.strides[0]
    cdef Py_ssize_t i, r, calls = 0, pages = 0
    cdef uintptr_t base, lo, hi, cur_lo = 0, cur_hi = 0
    if n == 0 or row_bytes == 0 or table.shape[0] == 0:
        return 0, 0
    base = <uintptr_t> &table[0, 0]
    with nogil:
        for i in range(n):   # in address order: rows ascending, or descending for a negative row stride
            r = rows[i] if stride >= 0 else rows[n - 1 - i]
            lo = (base + <uintptr_t> (r * stride)) // <uintptr_t> page
            hi = (base + <uintptr_t> (r * stride + row_bytes - 1)) // <uintptr_t> page + 1
            if i > 0 and lo <= cur_hi + <uintptr_t> gap_pages:
                if hi > cur_hi:
                    cur_hi = hi
                continue
            if i > 0:
                pages += _advise(cur_lo, cur_hi, page)
                calls += 1
            cur_lo = lo
            cur_hi = hi
        pages += _advise(cur_lo, cur_hi, page)
        calls += 1
    return calls, pages
