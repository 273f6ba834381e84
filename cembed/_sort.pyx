"""Grouping of row ids: a parallel, stable LSD radix sort and the segment boundaries of equal rows.

Every accumulation kernel (gradient coalescing, renorm of unique rows, optimizer steps) starts here:
after the sort each unique row owns one contiguous segment of input positions, in input order, so one
thread can own each row and the result does not depend on the thread count.
"""
import numpy as np

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint64_t

from cembed._typedefs cimport index_t
from cembed._buffer_cache cimport Block, frozen_block, block_array
from cembed import _buffer_cache

cdef enum:
    MAX_DIGIT_BITS = 11          # 2048 buckets per chunk: the histograms stay in L1/L2
    MIN_ITEMS_PER_CHUNK = 16384  # below this a chunk is not worth a thread


cdef void _radix_pass(const uint64_t *src, uint64_t *dst, Py_ssize_t n_keys, int shift, uint64_t mask,
                      int64_t[:, ::1] hist, int n_chunks, bint counted) noexcept nogil:
    """One stable counting-sort pass on bits [shift, shift + width) of the packed keys.
    Chunk c (a contiguous slice of src) writes its items in order into the slots reserved for it,
    so the pass is stable and its output does not depend on n_chunks. With `counted`, hist already
    holds each chunk's bucket counts (the first pass: _pack counted them)."""
    cdef Py_ssize_t c, i, lo, hi, b
    cdef Py_ssize_t n_buckets = hist.shape[1]
    cdef int64_t running, count
    cdef int64_t *chunk_hist     # hist[c] as a plain pointer: the loops below then keep it in a register
    cdef uint64_t item           # (through the memoryview it is reloaded after every store to dst)
    if not counted:
        for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
            lo = c * n_keys // n_chunks
            hi = (c + 1) * n_keys // n_chunks
            chunk_hist = &hist[c, 0]
            for b in range(n_buckets):
                chunk_hist[b] = 0
            for i in range(lo, hi):
                chunk_hist[(src[i] >> shift) & mask] += 1
    running = 0
    for b in range(n_buckets):
        for c in range(n_chunks):
            count = hist[c, b]
            hist[c, b] = running
            running = running + count
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        chunk_hist = &hist[c, 0]
        for i in range(lo, hi):
            item = src[i]
            b = (item >> shift) & mask
            dst[chunk_hist[b]] = item
            chunk_hist[b] += 1


cdef uint64_t _pack(const index_t[::1] keys, uint64_t *packed, int64_t[::1] chunk_max,
                    int64_t[:, ::1] low_hist,   # OUT (n_chunks, 2**MAX_DIGIT_BITS) counts of the low bits
                    int n_chunks) noexcept nogil:
    """packed[i] = key << 32 | i, a contiguous slice of the keys per chunk; returns the largest key.
    Also counts, per chunk, the keys by their low MAX_DIGIT_BITS bits: the first radix pass's
    histogram (its digit is never wider), so that pass need not read the keys once more."""
    cdef Py_ssize_t c, i, lo, hi, b, n_keys = keys.shape[0]
    cdef uint64_t local_max, max_key = 0, key
    cdef uint64_t low_mask = (<uint64_t> 1 << MAX_DIGIT_BITS) - 1
    cdef int64_t *chunk_hist      # low_hist[c] (see _radix_pass)
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        chunk_hist = &low_hist[c, 0]
        for b in range(1 << MAX_DIGIT_BITS):
            chunk_hist[b] = 0
        local_max = 0
        for i in range(lo, hi):
            key = <uint64_t> keys[i]
            packed[i] = (key << 32) | <uint64_t> i
            chunk_hist[key & low_mask] += 1
            if key > local_max:
                local_max = key
        chunk_max[c] = <int64_t> local_max
    for c in range(n_chunks):
        if <uint64_t> chunk_max[c] > max_key:
            max_key = <uint64_t> chunk_max[c]
    return max_key


# Scratch space of the sort (the packed keys and the ping-pong buffer, 16 bytes per key), kept for
# the next call instead of going back to the system: a training loop sorts batches of one size over
# and over, and fresh pages cost the kernel's zeroing every time. A call pops a buffer (or makes
# one) with the GIL held and returns it afterwards, so concurrent calls never share one.
cdef list _spare_scratch = []
cdef enum:
    MAX_SPARE_SCRATCH = 2
MAX_SPARE_SCRATCH_BYTES = 1 << 24  # at most 2 buffers of 16 MB (1M keys) are kept


cdef object _take_scratch(Py_ssize_t n_items):
    cdef Py_ssize_t i
    for i in range(len(_spare_scratch)):
        if n_items <= _spare_scratch[i].shape[0] <= 4 * n_items + 4096:
            buffer = _spare_scratch.pop(i)
            # checked again once it is ours: sorts run in several threads (a loader thread's
            # group_indices beside the step), and the list may have changed between check and pop
            if buffer.shape[0] >= n_items:
                return buffer
            break
    return np.empty(n_items, dtype=np.uint64)


cdef void _give_scratch(object buffer):
    if buffer.nbytes <= MAX_SPARE_SCRATCH_BYTES:
        if len(_spare_scratch) >= MAX_SPARE_SCRATCH:
            _spare_scratch.pop(0)
        _spare_scratch.append(buffer)


def release_scratch():
    """Drop the kept scratch buffers; returns the bytes released."""
    cdef Py_ssize_t n = sum(b.nbytes for b in _spare_scratch)
    _spare_scratch.clear()
    return n


def sort_rows(const index_t[::1] keys, int n_threads, bint want_order=True, empty=None, bint frozen=False):
    """Group equal row ids.

    keys: (n_keys,) non-negative row ids (validated by the caller).
    empty: makes the three outputs, called as empty(shape, dtype) (default numpy.empty); a caller
    passes a recycling allocator (cembed._buffer_cache.empty) so a training loop does not pay the
    first-touch page faults of fresh outputs at every step.
    frozen: the outputs are instead written into read-only-from-birth blocks (_buffer_cache's
    frozen_block, through their raw pointers): no writeable alias of them ever exists
    (functional.group_indices keeps them).
    Returns (order, unique_rows, starts):
      order       int64 (n_keys,): positions such that keys[order] is ascending and equal keys keep input
                  order (a stable argsort); None when want_order is False
      unique_rows int64 (n_unique,): the distinct keys, ascending
      starts      int64 (n_unique + 1,): segment s is order[starts[s]:starts[s + 1]]
    Work and memory are O(n_keys) (plus 2**11 counters per thread), never O(number of rows in the table).
    """
    cdef Py_ssize_t n_keys = keys.shape[0]
    cdef Py_ssize_t n_unique
    cdef int n_chunks, n_passes, width, p, bits
    cdef uint64_t max_key, mask
    cdef int64_t *order_ptr
    cdef uint64_t[::1] work
    cdef uint64_t *src
    cdef uint64_t *dst
    cdef uint64_t *tmp
    cdef int64_t[:, ::1] hist, low_hist
    cdef int64_t[::1] order_v, unique_v, starts_v, chunk_counts
    cdef int64_t *unique_ptr
    cdef int64_t *starts_ptr
    cdef Block unique_block, starts_block, order_block
    if n_keys == 0:
        no_items = np.zeros(0, dtype=np.int64)
        return _frozen_if((no_items if want_order else None), no_items.copy(), np.zeros(1, dtype=np.int64),
                          frozen=frozen)
    if empty is None:
        empty = np.empty
    if n_keys >= (<Py_ssize_t> 1 << 32):
        return _frozen_if(*_sort_rows_numpy(np.asarray(keys), want_order), frozen=frozen)
    n_chunks = max(1, min(n_threads, n_keys // MIN_ITEMS_PER_CHUNK))
    work_arr = _take_scratch(2 * n_keys)
    try:
        work = work_arr
        src = &work[0]
        dst = &work[n_keys]
        chunk_counts = np.empty(n_chunks + 1, dtype=np.int64)
        low_hist = np.empty((n_chunks, 1 << MAX_DIGIT_BITS), dtype=np.int64)
        with nogil:
            max_key = _pack(keys, src, chunk_counts, low_hist, n_chunks)
        if max_key >= (<uint64_t> 1 << 32):
            return _frozen_if(*_sort_rows_numpy(np.asarray(keys), want_order), frozen=frozen)
        bits = max(1, int(max_key).bit_length())
        n_passes = (bits + MAX_DIGIT_BITS - 1) // MAX_DIGIT_BITS
        width = (bits + n_passes - 1) // n_passes
        mask = (<uint64_t> 1 << width) - 1
        # the first pass's histogram: _pack's counts of the low MAX_DIGIT_BITS bits, folded to `width` bits
        hist = np.ascontiguousarray(np.asarray(low_hist).reshape(n_chunks, -1, 1 << width).sum(axis=1))
        with nogil:
            for p in range(n_passes):
                _radix_pass(src, dst, n_keys, 32 + p * width, mask, hist, n_chunks, p == 0)
                tmp = src
                src = dst
                dst = tmp
            n_unique = _count_heads(src, n_keys, chunk_counts, n_chunks)
        order_arr = None
        order_ptr = NULL
        if frozen:
            unique_block = frozen_block(n_unique * sizeof(int64_t))
            starts_block = frozen_block((n_unique + 1) * sizeof(int64_t))
            unique_ptr = <int64_t *> unique_block.ptr
            starts_ptr = <int64_t *> starts_block.ptr
            if want_order:
                order_block = frozen_block(n_keys * sizeof(int64_t))
                order_ptr = <int64_t *> order_block.ptr
        else:
            unique_arr = empty((n_unique,), np.int64)
            starts_arr = empty((n_unique + 1,), np.int64)
            unique_v = unique_arr
            starts_v = starts_arr
            unique_ptr = &unique_v[0] if n_unique > 0 else NULL
            starts_ptr = &starts_v[0]
            if want_order:
                order_arr = empty((n_keys,), np.int64)
                order_v = order_arr
                order_ptr = &order_v[0]
        with nogil:
            _segments(src, n_keys, chunk_counts, n_chunks, unique_ptr, starts_ptr, order_ptr)
        if frozen:
            int64 = np.dtype(np.int64)
            unique_arr = block_array(unique_block, n_unique * sizeof(int64_t), int64, (n_unique,))
            starts_arr = block_array(starts_block, (n_unique + 1) * sizeof(int64_t), int64, (n_unique + 1,))
            if want_order:
                order_arr = block_array(order_block, n_keys * sizeof(int64_t), int64, (n_keys,))
        return order_arr, unique_arr, starts_arr
    finally:
        _give_scratch(work_arr)


cdef Py_ssize_t _count_heads(const uint64_t *packed, Py_ssize_t n_keys,  # IN (n_keys,) sorted packed keys
                             int64_t[::1] chunk_counts,                   # OUT (n_chunks + 1,) see below
                             int n_chunks) noexcept nogil:
    """The number of distinct keys. chunk_counts[c] becomes the number of runs that start in chunk c
    (a contiguous slice of the sorted keys), then, by a prefix sum, where chunk c's first run is
    numbered; chunk_counts[n_chunks] is the total."""
    cdef Py_ssize_t c, i, lo, hi, count, running = 0
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        count = 0
        for i in range(lo, hi):
            if i == 0 or (packed[i] >> 32) != (packed[i - 1] >> 32):
                count = count + 1
        chunk_counts[c] = count
    for c in range(n_chunks):
        count = chunk_counts[c]
        chunk_counts[c] = running
        running = running + count
    chunk_counts[n_chunks] = running
    return running


cdef void _segments(const uint64_t *packed, Py_ssize_t n_keys,   # IN  (n_keys,) sorted packed keys
                    const int64_t[::1] chunk_first,                # IN  (n_chunks + 1,) from _count_heads
                    int n_chunks,
                    int64_t *unique_rows,                          # OUT (n_unique,)
                    int64_t *starts,                               # OUT (n_unique + 1,)
                    int64_t *order) noexcept nogil:                # OUT (n_keys,) input positions, or NULL
    """Distinct keys of the sorted packed array and where each one's run starts (chunk c writes the
    runs that start in its slice, numbered from chunk_first[c]); and, unless order is NULL, the
    input position of every sorted key (its low 32 bits), in the same pass."""
    cdef Py_ssize_t c, i, lo, hi, s
    cdef uint64_t low_bits = (<uint64_t> 1 << 32) - 1
    for c in prange(n_chunks, schedule="static", num_threads=n_chunks):
        lo = c * n_keys // n_chunks
        hi = (c + 1) * n_keys // n_chunks
        s = chunk_first[c]
        for i in range(lo, hi):
            if i == 0 or (packed[i] >> 32) != (packed[i - 1] >> 32):
                unique_rows[s] = <int64_t> (packed[i] >> 32)
                starts[s] = i
                s = s + 1
            if order != NULL:
                order[i] = <int64_t> (packed[i] & low_bits)
    starts[chunk_first[n_chunks]] = n_keys


def _frozen_if(order, unique_rows, starts, frozen=False):
    """The three outputs as they are, or (frozen) copied into frozen blocks."""
    if not frozen:
        return order, unique_rows, starts
    return (None if order is None else _buffer_cache.frozen_copy(order), _buffer_cache.frozen_copy(unique_rows),
            _buffer_cache.frozen_copy(starts))


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
