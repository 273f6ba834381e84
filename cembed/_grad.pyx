"""Gradient accumulation: the segment sum behind every embedding backward and `coalesce`.

The entries have already been grouped by row (`_sort.sort_rows`): segment s holds the positions of
every entry of row `seg_rows[s]`, in input order. Each output row is owned by one thread, which sums
its contributions in input order, so the result is bitwise the same for any thread count and equal
to torch's dense gradient (which also adds per row in input order).
"""
import enum

from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from libc.stdint cimport uint16_t

from cembed._rows cimport (check_state_shapes, prefetch_row, prefetch_row_for_write, row_stride_items, row_add, row_axpy,
                           row_fma_accumulate, row_add_half, row_axpy_half, row_fma_accumulate_half,
                           apply_row_update, row_update_has_state, row_rule_t, set_row_rule, prefetch_rule_entries,
                           PREFETCH_DISTANCE, ROW_SGD, ROW_ADAGRAD, ROW_ADAM, ROW_ROWWISE_ADAGRAD, ROW_ADAM_ROW_BIAS,
                           ROW_ADAMW, TABLE_F32, TABLE_F64, TABLE_BF16, TABLE_F16)

cdef enum:
    SEGMENTS_PER_CHUNK = 64   # dynamic-schedule chunk: rows are skewed (Zipf), one hot row can be long
    CHUNK_SUM_BYTES = 65536   # segment_update: at most this much of summed rows per thread and chunk
    UPDATE_PREFETCH_ROWS = 8  # segment_update: rows prefetched ahead in the update phase of a chunk


cdef inline Py_ssize_t _update_chunk(Py_ssize_t row_bytes) noexcept nogil:
    """Segments per chunk of segment_update: SEGMENTS_PER_CHUNK, fewer for rows so wide that their sums
    would pass CHUNK_SUM_BYTES (the sums of a chunk should stay in the core's L2)."""
    cdef Py_ssize_t n = CHUNK_SUM_BYTES // row_bytes if row_bytes > 0 else SEGMENTS_PER_CHUNK
    return max(1, min(<Py_ssize_t> SEGMENTS_PER_CHUNK, n))

ctypedef fused grad_rows_t:   # gradient rows: float32 / float64, or the bit patterns of a 16-bit table's dtype
    float
    double
    uint16_t


cdef inline int _values_format(int values_fmt, Py_ssize_t itemsize, Py_ssize_t acc_itemsize) except -1:
    """The format code of gradient rows of `itemsize` bytes summed into rows of `acc_itemsize` bytes:
    16-bit rows (into float32 only) keep the caller's code (TABLE_BF16 / TABLE_F16); float rows must
    be the accumulator's own type."""
    if itemsize == 2:
        if acc_itemsize != 4 or (values_fmt != TABLE_BF16 and values_fmt != TABLE_F16):
            raise TypeError("16-bit gradient rows are summed into float32 only, with a 16-bit format code")
        return values_fmt
    if itemsize != acc_itemsize:
        raise TypeError("gradient rows must have the dtype of the rows they are summed into")
    return TABLE_F32 if itemsize == 4 else TABLE_F64


class UpdateKind(enum.IntEnum):
    """The row updates segment_update applies (the ROW_* kinds of _rows.pxd, parameters there)."""
    UPDATE_SGD = ROW_SGD
    UPDATE_ADAGRAD = ROW_ADAGRAD
    UPDATE_ADAM = ROW_ADAM
    UPDATE_ROWWISE_ADAGRAD = ROW_ROWWISE_ADAGRAD
    UPDATE_ADAM_ROW_BIAS = ROW_ADAM_ROW_BIAS
    UPDATE_ADAMW = ROW_ADAMW


cdef inline void _add_term(floating *out_row, const floating *v, const floating *scale, Py_ssize_t p,
                           floating inv_count, bint by_freq, Py_ssize_t dim) noexcept nogil:
    """One entry's term of _sum_segment for float rows."""
    if scale != NULL:
        if by_freq:
            row_fma_accumulate(out_row, v, scale[p], inv_count, dim)
        else:
            row_axpy(out_row, v, scale[p], dim)
    elif by_freq:
        row_fma_accumulate(out_row, v, <floating> 1, inv_count, dim)
    else:
        row_add(out_row, v, dim)


cdef void _sum_segment(const char *values,                             # IN gradient rows, row_bytes apart
                       Py_ssize_t row_bytes, int values_fmt,          # IN their format (TABLE_*)
                       Py_ssize_t dim,
                       const int64_t *positions, Py_ssize_t count,   # IN entry positions, input order
                       Py_ssize_t lookahead,                          # IN entries readable past the segment
                       const int64_t *src,                            # IN value row per position, or NULL
                       const floating *scale,                         # IN factor per position, or NULL
                       floating inv_count, bint by_freq,
                       floating *out_row) noexcept nogil:            # INOUT: the sum is added to it
    """out_row += sum over the segment's entries, in input order, of scale[p] * values[src[p]]
    (with by_freq each term is fused as fma(term, inv_count, acc), as torch does). 16-bit value rows
    (values_fmt TABLE_BF16 / TABLE_F16, float32 sums only) are widened exactly inside each term: the
    same bits as summing their float32 copies.
    Prefetches the value rows of the entries PREFETCH_DISTANCE ahead in the sorted order, across
    segment boundaries (most segments hold a single entry)."""
    cdef Py_ssize_t k, p, vrow
    cdef floating c
    if floating is float:
        if values_fmt == TABLE_BF16 or values_fmt == TABLE_F16:   # the loop of the float rows, widening
            for k in range(count):
                if k + PREFETCH_DISTANCE < count + lookahead:
                    p = positions[k + PREFETCH_DISTANCE]
                    prefetch_row(values + (src[p] if src != NULL else p) * row_bytes, row_bytes)
                p = positions[k]
                vrow = src[p] if src != NULL else p
                c = scale[p] if scale != NULL else 1
                if by_freq:
                    row_fma_accumulate_half(out_row, <const uint16_t *> (values + vrow * row_bytes), values_fmt, c,
                                            inv_count, dim)
                elif scale != NULL:
                    row_axpy_half(out_row, <const uint16_t *> (values + vrow * row_bytes), values_fmt, c, dim)
                else:
                    row_add_half(out_row, <const uint16_t *> (values + vrow * row_bytes), values_fmt, dim)
            return
    for k in range(count):
        if k + PREFETCH_DISTANCE < count + lookahead:
            p = positions[k + PREFETCH_DISTANCE]
            prefetch_row(values + (src[p] if src != NULL else p) * row_bytes, row_bytes)
        p = positions[k]
        vrow = src[p] if src != NULL else p
        _add_term(out_row, <const floating *> (values + vrow * row_bytes), scale, p, inv_count, by_freq, dim)


cdef inline void _sum_chunk(const char *values, Py_ssize_t row_bytes, int values_fmt,   # IN as _sum_segment
                            Py_ssize_t dim,
                            const int64_t *order, const int64_t *starts,   # IN  as segment_sum
                            const int64_t *seg_ids, Py_ssize_t lo, Py_ssize_t hi,   # IN  the chunk: seg_ids[lo:hi]
                            Py_ssize_t n_entries, const int64_t *src, const floating *scale, bint by_freq,
                            floating *rows) noexcept nogil:                 # OUT (hi - lo, dim)
    """The first phase of a segment_update chunk: rows[j - lo] = the summed gradient row of segment
    seg_ids[j] (zero, then its contributions in input order, exactly as segment_sum's compact output)."""
    cdef Py_ssize_t j, s, d, count
    cdef floating *row
    for j in range(lo, hi):
        s = seg_ids[j]
        count = starts[s + 1] - starts[s]
        row = rows + (j - lo) * dim
        for d in range(dim):
            row[d] = 0
        _sum_segment(values, row_bytes, values_fmt, dim, &order[starts[s]], count, n_entries - starts[s + 1], src,
                     scale, <floating> (1.0 / <double> count), by_freq, row)


cdef extern from *:
    """
    /* The next chunk of a segment_update loop: a shared counter taken with an atomic fetch-and-add, so
       each thread knows its next chunk while it works on the current one and can prefetch into it. Which
       thread takes which chunk changes nothing in the result (each row has one writer). This work counter
       is what OpenMP's schedule(dynamic) keeps inside its runtime; no data is ever updated atomically.
       Dealing the chunks round-robin instead (thread t takes t, t + n, ...: no counter) measured slower:
       fused step 73-79 ms against 59-79 ms, 0.92-0.95x against 1.04-1.11x the unfused step (three
       interleaved pairs of `python -m cembed bench --only train_step,fused_train_step`, load ~1.7): the
       first chunks hold the Zipf-hot rows, whose sums are long, and a fixed deal leaves them to one thread. */
    static inline Py_ssize_t cembed_take_chunk(Py_ssize_t *counter)
    {
        Py_ssize_t c;
        #pragma omp atomic capture
        c = (*counter)++;
        return c;
    }
    """
    Py_ssize_t cembed_take_chunk(Py_ssize_t *counter) noexcept nogil


cdef inline void _prefetch_chunk_entries(const char *values, Py_ssize_t row_bytes,
                                         const int64_t *order, const int64_t *starts, const int64_t *seg_ids,
                                         Py_ssize_t lo, Py_ssize_t n_entries, const int64_t *src) noexcept nogil:
    """Prefetch the gradient rows of the first PREFETCH_DISTANCE entries of the chunk starting at
    seg_ids[lo] (in sorted order; _sum_segment keeps that distance from there on)."""
    cdef Py_ssize_t k, p, first = starts[seg_ids[lo]]
    cdef Py_ssize_t last = min(first + <Py_ssize_t> PREFETCH_DISTANCE, n_entries)
    for k in range(first, last):
        p = order[k]
        prefetch_row(values + (src[p] if src != NULL else p) * row_bytes, row_bytes)


cdef inline void _prefetch_chunk_rows(const char *w, Py_ssize_t w_stride_bytes, Py_ssize_t w_bytes,
                                      const char *a, const char *b, Py_ssize_t s_bytes,
                                      const int64_t *seg_rows, const int64_t *seg_ids,
                                      Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Prefetch, for writing, the weight and state rows of the first UPDATE_PREFETCH_ROWS segments of the
    chunk seg_ids[lo:hi] (the update phase keeps that distance from there on); a and b may be NULL."""
    cdef Py_ssize_t j, r
    for j in range(lo, min(hi, lo + <Py_ssize_t> UPDATE_PREFETCH_ROWS)):
        r = seg_rows[seg_ids[j]]
        prefetch_row_for_write(w + r * w_stride_bytes, w_bytes)
        if a != NULL:
            prefetch_row_for_write(a + r * s_bytes, s_bytes)
        if b != NULL:
            prefetch_row_for_write(b + r * s_bytes, s_bytes)


def segment_sum(const grad_rows_t[:, ::1] values,  # IN  (n_values, dim) gradient rows (16-bit: bit patterns)
                int values_fmt,                   # IN  16-bit rows: their format (TABLE_BF16 / TABLE_F16)
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
    dtype, fused into the addition. 16-bit gradient rows are summed into float32 (each element widened
    exactly: the same bits as summing their float32 copies). Parallel over segments; each output row has
    exactly one writer."""
    cdef Py_ssize_t n_out = seg_ids.shape[0]
    cdef Py_ssize_t n_entries = order.shape[0]
    cdef Py_ssize_t dim = values.shape[1]
    cdef Py_ssize_t j, s, d, count
    cdef const int64_t *src_ptr = &src[0] if src.shape[0] > 0 else NULL
    cdef const floating *scale_ptr = &scale[0] if scale.shape[0] > 0 else NULL
    cdef const char *values_ptr
    cdef Py_ssize_t row_bytes = dim * sizeof(grad_rows_t)
    cdef floating *out_row
    cdef floating inv_count
    values_fmt = _values_format(values_fmt, sizeof(grad_rows_t), sizeof(floating))
    if n_out == 0 or dim == 0:
        return
    values_ptr = <const char *> &values[0, 0]
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
            _sum_segment(values_ptr, row_bytes, values_fmt, dim, &order[starts[s]], count, n_entries - starts[s + 1],
                         src_ptr, scale_ptr, inv_count, scale_grad_by_freq, out_row)


def permute_sources(const int64_t[::1] order,     # IN  (n,) entry positions in sorted order
                    const int64_t[::1] src,       # IN  (n_entries,) value row of each entry, or empty
                    const floating[::1] scale,    # IN  (n_entries,) factor of each entry, or empty
                    int64_t[::1] src_out,         # OUT (n,) src[order[k]], or empty
                    floating[::1] scale_out,      # OUT (n,) scale[order[k]], or empty
                    int n_threads):
    """src_out[k] = src[order[k]] and scale_out[k] = scale[order[k]] in one parallel pass over order:
    the per-entry sources in sorted order, so the segment kernels then read them sequentially."""
    cdef Py_ssize_t n = order.shape[0]
    cdef Py_ssize_t k
    cdef bint with_src = src_out.shape[0] > 0, with_scale = scale_out.shape[0] > 0
    if (with_src and (src_out.shape[0] != n or src.shape[0] == 0)) or \
            (with_scale and (scale_out.shape[0] != n or scale.shape[0] == 0)):
        raise ValueError("permute_sources: outputs must have the length of order, inputs present")
    if n == 0:
        return
    with nogil:
        for k in prange(n, schedule="static", num_threads=n_threads):
            if with_src:
                src_out[k] = src[order[k]]
            if with_scale:
                scale_out[k] = scale[order[k]]


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


def segment_update(const floating[:, ::1] values,  # IN  (n_values, dim) gradient rows
                   const int64_t[::1] order,        # IN  as segment_sum
                   const int64_t[::1] starts,       # IN
                   const int64_t[::1] seg_rows,     # IN  (n_segments,) row id of each segment, distinct
                   const int64_t[::1] seg_ids,      # IN  (n_out,) the segments to apply
                   const int64_t[::1] src,          # IN  or empty
                   const floating[::1] scale,       # IN  or empty
                   bint scale_grad_by_freq,
                   int kind,                         # an UpdateKind
                   floating[:, :] weight,            # INOUT (n_rows, dim), unit column stride
                   floating[:, ::1] state_a,         # INOUT (n_rows, dim) or (0, 0)
                   floating[:, ::1] state_b,         # INOUT (n_rows, dim) or (0, 0)
                   floating[::1] row_state,          # INOUT (n_rows,) or (0,)
                   double[::1] row_log,              # INOUT (n_rows,) or (0,): row_rule_t's row_log (_rows.pxd)
                   int64_t[::1] counts,              # INOUT (n_rows,) or (0,): row_rule_t's counts
                   const double[::1] rule_params,    # IN    (ROW_RULE_PARAMS,) or (0,): row_rule_t's scalars
                   double p0, double p1, double p2, double p3, int mode, bint maximize,
                   int n_threads):
    """Fused backward + update: for each segment, the summed gradient row (exactly as segment_sum's
    compact output: zero, then the contributions in input order) goes into a per-thread scratch row
    and the optimizer's row update is applied to weight row seg_rows[s] — the coalesced gradient is
    never written to memory. Work goes in chunks of consecutive segments (dynamic schedule): first the
    chunk's sums (gradient rows prefetched ahead in sorted order), into per-thread scratch rows that
    stay in cache, then the chunk's row updates (weight and state rows prefetched
    UPDATE_PREFETCH_ROWS ahead); keeping the two access patterns apart measured faster than
    alternating them row by row. Each row has one writer, so the result is bitwise that of
    segment_sum followed by the optimizer's row kernel, for any thread count."""
    cdef Py_ssize_t n_out = seg_ids.shape[0]
    cdef Py_ssize_t n_entries = order.shape[0]
    cdef Py_ssize_t dim = values.shape[1]
    cdef Py_ssize_t j, r, ahead, row_stride, c, lo, hi, following
    cdef Py_ssize_t next_chunk = 0   # the chunk counter (cembed_take_chunk)
    cdef Py_ssize_t chunk = _update_chunk(dim * sizeof(floating))
    cdef Py_ssize_t n_chunks = (n_out + chunk - 1) // chunk
    cdef const int64_t *src_ptr = &src[0] if src.shape[0] > 0 else NULL
    cdef const floating *scale_ptr = &scale[0] if scale.shape[0] > 0 else NULL
    cdef floating *a_ptr = &state_a[0, 0] if state_a.shape[0] > 0 else NULL
    cdef floating *b_ptr = &state_b[0, 0] if state_b.shape[0] > 0 else NULL
    cdef floating *rs_ptr = &row_state[0] if row_state.shape[0] > 0 else NULL
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef Py_ssize_t values_row_bytes = row_bytes
    cdef int values_fmt = TABLE_F32 if floating is float else TABLE_F64
    cdef const char *values_ptr
    cdef floating *w
    cdef floating *scratch
    cdef floating *scratch_rows
    cdef floating sign = -1 if maximize else 1
    cdef floating q0 = <floating> p0, q1 = <floating> p1, q2 = <floating> p2, q3 = <floating> p3
    cdef row_rule_t rule
    set_row_rule(&rule, row_log, counts, rule_params, weight.shape[0], "segment_update")
    check_state_shapes("segment_update", weight.shape[0], weight.shape[1], state_a.shape[0], state_a.shape[1],
                       state_b.shape[0], state_b.shape[1], row_state.shape[0])
    if n_out == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("segment_update: the weight's rows must be contiguous (unit column stride)")
    if not row_update_has_state(kind, a_ptr != NULL, b_ptr != NULL, rs_ptr != NULL, &rule):
        raise ValueError("segment_update: missing optimizer state for this update kind")
    values_ptr = <const char *> &values[0, 0]
    w = &weight[0, 0]
    n_threads = max(1, n_threads)
    scratch_rows = <floating *> malloc(n_threads * chunk * row_bytes)   # a chunk of summed rows per thread
    if scratch_rows == NULL:
        raise MemoryError("segment_update: cannot allocate the scratch rows")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * chunk * dim
            c = cembed_take_chunk(&next_chunk)
            if c < n_chunks:
                _prefetch_chunk_entries(values_ptr, values_row_bytes, &order[0], &starts[0], &seg_ids[0], c * chunk,
                                        n_entries, src_ptr)
            while c < n_chunks:
                following = cembed_take_chunk(&next_chunk)   # known now, so its first rows can be prefetched
                lo = c * chunk
                hi = min(lo + chunk, n_out)
                _prefetch_chunk_rows(<const char *> w, row_stride * sizeof(floating), row_bytes, <const char *> a_ptr,
                                     <const char *> b_ptr, row_bytes, &seg_rows[0], &seg_ids[0], lo, hi)
                _sum_chunk(values_ptr, values_row_bytes, values_fmt, dim, &order[0], &starts[0], &seg_ids[0], lo, hi,
                           n_entries, src_ptr,
                           scale_ptr, scale_grad_by_freq, scratch)   # the sums of the chunk's segments
                for j in range(lo, hi):          # then their row updates
                    if j == hi - 1 and following < n_chunks:
                        _prefetch_chunk_entries(values_ptr, values_row_bytes, &order[0], &starts[0], &seg_ids[0],
                                                following * chunk, n_entries, src_ptr)
                    if j + UPDATE_PREFETCH_ROWS < hi:
                        ahead = seg_rows[seg_ids[j + UPDATE_PREFETCH_ROWS]]
                        prefetch_row_for_write(w + ahead * row_stride, row_bytes)
                        if a_ptr != NULL:
                            prefetch_row_for_write(a_ptr + ahead * dim, row_bytes)
                        if b_ptr != NULL:
                            prefetch_row_for_write(b_ptr + ahead * dim, row_bytes)
                        prefetch_rule_entries(&rule, ahead)
                    r = seg_rows[seg_ids[j]]
                    apply_row_update(kind, w + r * row_stride, a_ptr + r * dim if a_ptr != NULL else NULL,
                                     b_ptr + r * dim if b_ptr != NULL else NULL, rs_ptr + r if rs_ptr != NULL else NULL,
                                     scratch + (j - lo) * dim, q0, q1, q2, q3, mode, sign, dim, &rule, r)
                c = following
    finally:
        free(scratch_rows)


# ---------------------------------------------------------------------------------------------------
# 16-bit weights (docs/behaviour.md §8.7): float32 (or 16-bit) gradient rows, float32 math, one rounding
# per element
# ---------------------------------------------------------------------------------------------------
from libc.stdint cimport uint64_t

from cembed._rounding cimport state_t, half_row_update, CEMBED_TABLE_BF16, CEMBED_TABLE_F16


ctypedef fused half_grad_rows_t:   # a 16-bit weight's gradient rows: float32, or bits of the table's own dtype
    float
    uint16_t


def segment_update_half(const half_grad_rows_t[:, ::1] values,   # IN  (n_values, dim) gradient rows
                        int values_fmt,                 # IN  16-bit rows: their format (TABLE_BF16 / TABLE_F16)
                        const int64_t[::1] order,       # IN  as segment_sum
                        const int64_t[::1] starts,      # IN
                        const int64_t[::1] seg_rows,    # IN  (n_segments,) row id of each segment, distinct
                        const int64_t[::1] seg_ids,     # IN  (n_out,) the segments to apply
                        const int64_t[::1] src,         # IN  or empty
                        const float[::1] scale,         # IN  or empty
                        bint scale_grad_by_freq,
                        int kind,                        # an UpdateKind
                        uint16_t[:, :] weight,           # INOUT (n_rows, dim) 16-bit bits, unit column stride
                        int weight_fmt,                  # CEMBED_TABLE_BF16 / CEMBED_TABLE_F16 (_half.h)
                        state_t[:, ::1] state_a,         # INOUT (n_rows, dim) or (0, 0): float32 or 16-bit bits
                        state_t[:, ::1] state_b,         # INOUT (n_rows, dim) or (0, 0)
                        state_t[::1] row_state,          # INOUT (n_rows,) or (0,)
                        int state_fmt,                   # format of 16-bit state (unused for float32 state)
                        double[::1] row_log,             # INOUT (n_rows,) or (0,): as segment_update's
                        int64_t[::1] counts,             # INOUT (n_rows,) or (0,)
                        const double[::1] rule_params,   # IN    (ROW_RULE_PARAMS,) or (0,)
                        double p0, double p1, double p2, double p3, int mode, bint maximize,
                        bint stochastic, uint64_t seed, uint64_t step,
                        uint64_t key_first, uint64_t key_stride,   # row r's random key row: first + stride * r
                        int n_threads):
    """segment_update for a 16-bit weight: each segment's summed float32 gradient row (exactly as
    segment_sum's) is applied by `half_row_update` — the weight and 16-bit state rows widened to
    float32, the float32 row rule, one rounding per element keyed by (seed, step, key row, stream), the
    key row of row r being key_first + key_stride * r (mod 2**64; (0, 1) for a whole table). Each
    row has one writer and its random bits depend only on its key: bitwise the same for any thread
    count, and the same bits as the unfused step (gather, float32 kernel, round_rows)."""
    cdef Py_ssize_t n_out = seg_ids.shape[0]
    cdef Py_ssize_t n_entries = order.shape[0]
    cdef Py_ssize_t dim = values.shape[1]
    cdef Py_ssize_t j, r, ahead, row_stride, c, lo, hi, following
    cdef Py_ssize_t next_chunk = 0   # the chunk counter (cembed_take_chunk)
    cdef Py_ssize_t chunk = _update_chunk(dim * sizeof(float))
    cdef Py_ssize_t n_chunks = (n_out + chunk - 1) // chunk
    cdef const int64_t *src_ptr = &src[0] if src.shape[0] > 0 else NULL
    cdef const float *scale_ptr = &scale[0] if scale.shape[0] > 0 else NULL
    cdef state_t *a_ptr = &state_a[0, 0] if state_a.shape[0] > 0 else NULL
    cdef state_t *b_ptr = &state_b[0, 0] if state_b.shape[0] > 0 else NULL
    cdef state_t *rs_ptr = &row_state[0] if row_state.shape[0] > 0 else NULL
    cdef Py_ssize_t w_bytes = dim * sizeof(uint16_t)
    cdef Py_ssize_t values_row_bytes = dim * sizeof(half_grad_rows_t)
    cdef Py_ssize_t s_bytes = dim * sizeof(state_t)
    cdef const char *values_ptr
    cdef uint16_t *w
    cdef float *scratch
    cdef float *scratch_rows
    cdef float sign = -1 if maximize else 1
    cdef float q0 = <float> p0, q1 = <float> p1, q2 = <float> p2, q3 = <float> p3
    cdef row_rule_t rule
    values_fmt = _values_format(values_fmt, sizeof(half_grad_rows_t), sizeof(float))
    set_row_rule(&rule, row_log, counts, rule_params, weight.shape[0], "segment_update_half")
    check_state_shapes("segment_update_half", weight.shape[0], weight.shape[1], state_a.shape[0], state_a.shape[1],
                       state_b.shape[0], state_b.shape[1], row_state.shape[0])
    if n_out == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError("segment_update_half: the weight's rows must be contiguous (unit column stride)")
    if not row_update_has_state(kind, a_ptr != NULL, b_ptr != NULL, rs_ptr != NULL, &rule):
        raise ValueError("segment_update_half: missing optimizer state for this update kind")
    if weight_fmt != CEMBED_TABLE_BF16 and weight_fmt != CEMBED_TABLE_F16:
        raise ValueError(f"segment_update_half: unknown weight format {weight_fmt}")
    values_ptr = <const char *> &values[0, 0]
    w = &weight[0, 0]
    n_threads = max(1, n_threads)
    # per thread: a chunk of summed rows, then the 3 float32 rows half_row_update works in
    scratch_rows = <float *> malloc(n_threads * (chunk + 3) * dim * sizeof(float))
    if scratch_rows == NULL:
        raise MemoryError("segment_update_half: cannot allocate the scratch rows")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * (chunk + 3) * dim
            c = cembed_take_chunk(&next_chunk)   # chunks taken as in segment_update
            if c < n_chunks:
                _prefetch_chunk_entries(values_ptr, values_row_bytes, &order[0], &starts[0], &seg_ids[0], c * chunk,
                                        n_entries, src_ptr)
            while c < n_chunks:
                following = cembed_take_chunk(&next_chunk)
                lo = c * chunk
                hi = min(lo + chunk, n_out)
                _prefetch_chunk_rows(<const char *> w, row_stride * sizeof(uint16_t), w_bytes, <const char *> a_ptr,
                                     <const char *> b_ptr, s_bytes, &seg_rows[0], &seg_ids[0], lo, hi)
                _sum_chunk(values_ptr, values_row_bytes, values_fmt, dim, &order[0], &starts[0], &seg_ids[0], lo, hi,
                           n_entries, src_ptr,
                           scale_ptr, scale_grad_by_freq, scratch)
                for j in range(lo, hi):
                    if j == hi - 1 and following < n_chunks:
                        _prefetch_chunk_entries(values_ptr, values_row_bytes, &order[0], &starts[0], &seg_ids[0],
                                                following * chunk, n_entries, src_ptr)
                    if j + UPDATE_PREFETCH_ROWS < hi:
                        ahead = seg_rows[seg_ids[j + UPDATE_PREFETCH_ROWS]]
                        prefetch_row_for_write(w + ahead * row_stride, w_bytes)
                        if a_ptr != NULL:
                            prefetch_row_for_write(a_ptr + ahead * dim, s_bytes)
                        if b_ptr != NULL:
                            prefetch_row_for_write(b_ptr + ahead * dim, s_bytes)
                        prefetch_rule_entries(&rule, ahead)
                    r = seg_rows[seg_ids[j]]
                    half_row_update(kind, w + r * row_stride, weight_fmt, a_ptr + r * dim if a_ptr != NULL else NULL,
                                    b_ptr + r * dim if b_ptr != NULL else NULL,
                                    rs_ptr + r if rs_ptr != NULL else NULL, state_fmt, scratch + (j - lo) * dim,
                                    q0, q1, q2, q3, mode, sign, dim, scratch + chunk * dim, stochastic, seed, step,
                                    key_first + key_stride * <uint64_t> r, &rule, r)
                c = following
    finally:
        free(scratch_rows)
