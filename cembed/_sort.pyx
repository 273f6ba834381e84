"""Grouping of row ids: a parallel, stable LSD radix sort and the segment boundaries of equal rows.

Every accumulation kernel (gradient coalescing, renorm of unique rows, optimizer steps) starts here:
after the sort each unique row owns one contiguous segment of input positions, in input order, so one
thread can own each row and the result does not depend on the thread count.
"""
import numpy as np

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t

from cembed._typedefs cimport index_t

cdef enum:
    MAX_DIGIT_BITS = 11          # 2048 buckets per chunk: the histograms stay in L1/L2
    MIN_ITEMS_PER_CHUNK = 16384  # below this a chunk is not worth a thread


cdef void _radix_pass(const uint64_t *src, uint64_t *dst, Py_ssize_t n_keys, int shift, uint64_t mask,
                      int64_t[:, ::1] hist, int n_chunks) noexcept nogil:
    """One stable counting-sort pass on bits [shift, shift + width) of the packed keys.
    Chunk c (a contiguous slice of src) writes its items in order into the slots reserved for it,
    so the pass is stable and its output does not depend on n_chunks."""
    cdef Py_ssize_t c, i, lo, hi, b
    cdef Py_ssize_t n_buckets = hist.shape[1]
    cdef int64_t running, count
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        for b in range(n_buckets):
            hist[c, b] = 0
        for i in range(lo, hi):
            hist[c, (src[i] >> shift) & mask] += 1
    running = 0
    for b in range(n_buckets):
        for c in range(n_chunks):
            count = hist[c, b]
            hist[c, b] = running
            running = running + count
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        for i in range(lo, hi):
            b = (src[i] >> shift) & mask
            dst[hist[c, b]] = src[i]
            hist[c, b] += 1


cdef uint64_t _pack(const index_t[::1] keys, uint64_t[::1] packed, int n_threads) noexcept nogil:
    """packed[i] = key << 32 | i; returns the largest key."""
    cdef Py_ssize_t i, n_keys = keys.shape[0]
    cdef uint64_t max_key = 0
    for i in prange(n_keys, schedule="static", num_threads=n_threads):
        packed[i] = ((<uint64_t> keys[i]) << 32) | <uint64_t> i
    for i in range(n_keys):
        if <uint64_t> keys[i] > max_key:
            max_key = <uint64_t> keys[i]
    return max_key


def sort_rows(const index_t[::1] keys, int n_threads, bint want_order=True):
    """Group equal row ids.

    keys: (n_keys,) non-negative row ids (validated by the caller).
    Returns (order, unique_rows, starts):
      order       int64 (n_keys,): positions such that keys[order] is ascending and equal keys keep input
                  order (a stable argsort); None when want_order is False
      unique_rows int64 (n_unique,): the distinct keys, ascending
      starts      int64 (n_unique + 1,): segment s is order[starts[s]:starts[s + 1]]
    Work and memory are O(n_keys) (plus 2**11 counters per thread), never O(number of rows in the table).
    """
    cdef Py_ssize_t n_keys = keys.shape[0]
    cdef Py_ssize_t i, n_unique
    cdef int n_chunks, n_passes, width, p, bits
    cdef uint64_t max_key, mask
    cdef uint64_t low_bits = (<uint64_t> 1 << 32) - 1
    cdef uint64_t[::1] packed, scratch
    cdef uint64_t *src
    cdef uint64_t *dst
    cdef uint64_t *tmp
    cdef int64_t[:, ::1] hist
    cdef int64_t[::1] order_v, unique_v, starts_v
    if n_keys == 0:
        empty = np.zeros(0, dtype=np.int64)
        return (empty if want_order else None), empty.copy(), np.zeros(1, dtype=np.int64)
    if n_keys >= (<Py_ssize_t> 1 << 32):
        return _sort_rows_numpy(np.asarray(keys), want_order)
    packed_arr = np.empty(n_keys, dtype=np.uint64)
    scratch_arr = np.empty(n_keys, dtype=np.uint64)
    packed = packed_arr
    scratch = scratch_arr
    n_chunks = max(1, min(n_threads, n_keys // MIN_ITEMS_PER_CHUNK))
    with nogil:
        max_key = _pack(keys, packed, n_threads)
    if max_key >= (<uint64_t> 1 << 32):
        return _sort_rows_numpy(np.asarray(keys), want_order)
    bits = max(1, int(max_key).bit_length())
    n_passes = (bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
    width = (bits + n_passes - 1) // n_passes
    mask = (<uint64_t> 1 << width) - 1
    hist = np.empty((n_chunks, 1 << width), dtype=np.int64)
    src = &packed[0]
    dst = &scratch[0]
    with nogil:
        for p in range(n_passes):
            _radix_pass(src, dst, n_keys, 32 + p * width, mask, hist, n_chunks)
            tmp = src
            src = dst
            dst = tmp
        n_unique = 1
        for i in range(1, n_keys):
            n_unique += (src[i] >> 32) != (src[i - 1] >> 32)
    unique_arr = np.empty(n_unique, dtype=np.int64)
    starts_arr = np.empty(n_unique + 1, dtype=np.int64)
    unique_v = unique_arr
    starts_v = starts_arr
    order_arr = None
    if want_order:
        order_arr = np.empty(n_keys, dtype=np.int64)
        order_v = order_arr
    with nogil:
        _segments(src, n_keys, unique_v, starts_v)
        if want_order:
            for i in prange(n_keys, schedule="static", num_threads=n_threads):
                order_v[i] = <int64_t> (src[i] & low_bits)
    return order_arr, unique_arr, starts_arr


cdef void _segments(const uint64_t *packed, Py_ssize_t n_keys,   # IN  (n_keys,) sorted packed keys
                    int64_t[::1] unique_rows,                      # OUT (n_unique,)
                    int64_t[::1] starts) noexcept nogil:           # OUT (n_unique + 1,)
    """Distinct keys of the sorted packed array and where each one's run starts."""
    cdef Py_ssize_t i, s = 0
    unique_rows[0] = <int64_t> (packed[0] >> 32)
    starts[0] = 0
    for i in range(1, n_keys):
        if (packed[i] >> 32) != (packed[i - 1] >> 32):
            s += 1
            unique_rows[s] = <int64_t> (packed[i] >> 32)
            starts[s] = i
    starts[s + 1] = n_keys


def _sort_rows_numpy(keys, want_order):
    """Fallback for more than 2**32 items or row ids: NumPy's stable sort."""
    order = np.argsort(keys, kind="stable").astype(np.int64, copy=False)
    sorted_keys = keys[order]
    head = np.ones(len(keys), dtype=bool)
    head[1:] = sorted_keys[1:] != sorted_keys[: len(keys) - 1]
    starts = np.flatnonzero(head)
    unique_rows = sorted_keys[starts].astype(np.int64)
    starts = np.append(starts, len(keys)).astype(np.int64)
    return (order if want_order else None), unique_rows, starts
