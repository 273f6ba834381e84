"""Gradient accumulation: the segment sum behind every embedding backward and `coalesce`.

The entries have already been grouped by row (`_sort.sort_rows`): segment s holds the positions of
every entry of row `seg_rows[s]`, in input order. Each output row is owned by one thread, which sums
its contributions in input order, so the result is bitwise the same for any thread count and equal
to torch's dense gradient (which also adds per row in input order).
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.stdint cimport int64_t
from libc.string cimport memset

from cembed._rows cimport prefetch_row, row_add, row_axpy, row_fma_accumulate, PREFETCH_DISTANCE

cdef enum:
    SEGMENTS_PER_CHUNK = 64   # dynamic-schedule chunk: rows are skewed (Zipf), one hot row can be long


cdef void _sum_segment(const floating *values, Py_ssize_t value_stride, Py_ssize_t dim,
                       const int64_t *positions, Py_ssize_t count,   # IN entry positions, input order
                       Py_ssize_t lookahead,                          # IN entries readable past the segment
                       const int64_t *src,                            # IN value row per position, or NULL
                       const floating *scale,                         # IN factor per position, or NULL
                       floating inv_count, bint by_freq,
                       floating *out_row) noexcept nogil:            # INOUT: the sum is added to it
    """out_row += sum over the segment's entries, in input order, of scale[p] * values[src[p]]
    (with by_freq each term is fused as fma(term, inv_count, acc), as torch does).
    Prefetches the value rows of the entries PREFETCH_DISTANCE ahead in the sorted order, across
    segment boundaries (most segments hold a single entry)."""
    cdef Py_ssize_t k, p, vrow
    cdef const floating *v
    cdef floating c
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    for k in range(count):
        if k + PREFETCH_DISTANCE < count + lookahead:
            p = positions[k + PREFETCH_DISTANCE]
            vrow = src[p] if src != NULL else p
            prefetch_row(values + vrow * value_stride, row_bytes)
        p = positions[k]
        vrow = src[p] if src != NULL else p
        v = values + vrow * value_stride
        if scale != NULL:
            c = scale[p]
            if by_freq:
                row_fma_accumulate(out_row, v, c, inv_count, dim)
            else:
                row_axpy(out_row, v, c, dim)
        elif by_freq:
            row_fma_accumulate(out_row, v, <floating> 1, inv_count, dim)
        else:
            row_add(out_row, v, dim)


def segment_sum(const floating[:, ::1] values,   # IN  (n_values, dim) gradient rows
                const int64_t[::1] order,         # IN  (n_entries,) entry positions grouped by row, input order
                const int64_t[::1] starts,        # IN  (n_segments + 1,) segment s = order[starts[s]:starts[s+1]]
                const int64_t[::1] seg_rows,      # IN  (n_segments,) row id of each segment
                const int64_t[::1] seg_ids,       # IN  (n_out,) the segments to compute, in output order
                const int64_t[::1] src,           # IN  (n_entries,) value row of each entry, or empty for identity
                const floating[::1] scale,        # IN  (n_entries,) factor of each entry, or empty for none
                bint scale_grad_by_freq,
                floating[:, ::1] out,             # INOUT (n_out, dim) compact, or (n_rows, dim) scattered
                bint scatter,
                int n_threads):
    """For each output slot j (segment s = seg_ids[j], row r = seg_rows[s]):
         compact (scatter=False): out[j] = 0 + contributions          (out may be uninitialised)
         scatter (scatter=True):  out[r] = out[r] + contributions     (out pre-filled by the caller)
    with scale_grad_by_freq, each contribution is multiplied by 1/(segment length) rounded to the value
    dtype, fused into the addition. Parallel over segments; each output row has exactly one writer."""
    cdef Py_ssize_t n_out = seg_ids.shape[0]
    cdef Py_ssize_t n_entries = order.shape[0]
    cdef Py_ssize_t dim = values.shape[1]
    cdef Py_ssize_t j, s, d, count
    cdef const int64_t *src_ptr = &src[0] if src.shape[0] > 0 else NULL
    cdef const floating *scale_ptr = &scale[0] if scale.shape[0] > 0 else NULL
    cdef const floating *values_ptr
    cdef floating *out_row
    cdef floating inv_count
    if n_out == 0 or dim == 0:
        return
    values_ptr = &values[0, 0]
    with nogil:
        for j in prange(n_out, schedule="dynamic", chunksize=SEGMENTS_PER_CHUNK, num_threads=n_threads):
            s = seg_ids[j]
            count = starts[s + 1] - starts[s]
            if scatter:
                out_row = &out[seg_rows[s], 0]
            else:
                out_row = &out[j, 0]
                for d in range(dim):
                    out_row[d] = 0
            inv_count = <floating> (1.0 / <double> count)
            _sum_segment(values_ptr, dim, dim, &order[starts[s]], count, n_entries - starts[s + 1], src_ptr, scale_ptr,
                         inv_count, scale_grad_by_freq, out_row)


def zero_fill(floating[:, ::1] out, int n_threads):
    """out[:] = 0 in parallel row blocks, so a fresh allocation is first touched by every thread."""
    cdef Py_ssize_t n_rows = out.shape[0]
    cdef Py_ssize_t dim = out.shape[1]
    cdef Py_ssize_t t, lo, hi
    if n_rows == 0 or dim == 0:
        return
    with nogil:
        for t in prange(n_threads, schedule="static", chunksize=1, num_threads=n_threads):
            lo = t * n_rows // n_threads
            hi = (t + 1) * n_rows // n_threads
            if hi > lo:
                memset(&out[lo, 0], 0, (hi - lo) * dim * sizeof(floating))
