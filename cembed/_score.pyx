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

from libc.stdint cimport uint16_t

from cembed._typedefs cimport index_t
from cembed._rows cimport prefetch_row, row_stride_items, PREFETCH_DISTANCE, TABLE_F32, TABLE_F64, TABLE_BF16, TABLE_F16

cdef enum:
    # dynamic-schedule chunk of queries: a thread that the OS pauses (a shared host) holds up only
    # its current chunk, not a static half of the batch; the results do not depend on the schedule
    QUERIES_PER_CHUNK = 128


cdef extern from "_score.h" nogil:
    float cembed_dot_f32(const float *a, const float *b, Py_ssize_t dim)
    double cembed_dot_f64(const double *a, const double *b, Py_ssize_t dim)
    void cembed_score_axpy_f32(float *out, const float *row, float scale, Py_ssize_t dim)
    void cembed_score_axpy_f64(double *out, const double *row, double scale, Py_ssize_t dim)
    float cembed_dot_half(int fmt, const float *a, const uint16_t *b, Py_ssize_t dim)
    void cembed_score_axpy_half(int fmt, float *out, const uint16_t *row, float scale, Py_ssize_t dim)


ctypedef fused table_t:   # the scored table: float32 / float64 rows, or a 16-bit table's bit patterns
    float
    double
    uint16_t


cdef inline floating table_dot(const floating *query, const table_t *row, int fmt, Py_ssize_t dim) noexcept nogil:
    """<query, row> in 8 fma lanes (_score.h) for a table row of any format (a 16-bit row widened
    exactly: the bits of its float32 copy). Only the pairs _check_table admits reach here; the others
    return 0. (For float32 / float64 rows fmt is not read.)"""
    if table_t is uint16_t:
        if floating is float:
            return cembed_dot_half(fmt, query, row, dim)
        return 0
    elif table_t is float:
        if floating is float:
            return cembed_dot_f32(query, row, dim)
        return 0
    else:
        if floating is double:
            return cembed_dot_f64(query, row, dim)
        return 0


cdef inline void table_scaled_add(floating *out, const table_t *row, int fmt, floating scale,
                                  Py_ssize_t dim) noexcept nogil:
    """out = fma(scale, row, out) for a table row of any format (as table_dot)."""
    if table_t is uint16_t:
        if floating is float:
            cembed_score_axpy_half(fmt, out, row, scale, dim)
    elif table_t is float:
        if floating is float:
            cembed_score_axpy_f32(out, row, scale, dim)
    else:
        if floating is double:
            cembed_score_axpy_f64(out, row, scale, dim)


cdef bint _check_table(const floating *query_type, const table_t *table_type, int fmt, Py_ssize_t n_rows,
                       Py_ssize_t dim, Py_ssize_t row_stride_bytes, Py_ssize_t column_stride_bytes,
                       Py_ssize_t *row_stride) except False:
    """Raise ValueError unless the table's format matches the queries (float32 rows or 16-bit ones of
    format fmt for float32 queries, float64 rows for float64 queries) and its rows are contiguous;
    then set row_stride (in elements). query_type and table_type are NULL: they only select the types."""
    cdef bint ok
    if table_t is uint16_t:
        ok = floating is float and (fmt == TABLE_BF16 or fmt == TABLE_F16)
    elif table_t is float:
        ok = floating is float and fmt == TABLE_F32
    else:
        ok = floating is double and fmt == TABLE_F64
    if not ok:
        raise ValueError("score kernels: the table's format does not match the queries' dtype")
    if not row_stride_items(row_stride, n_rows, dim, row_stride_bytes, column_stride_bytes, sizeof(table_t)):
        raise ValueError("score kernels: the weight's rows must be contiguous (unit column stride)")
    return True


def dot_scores(const floating[:, ::1] query,     # IN  (n_queries, dim)
               const table_t[:, :] weight,       # IN  (n_rows, dim), unit column stride; 16-bit: bit patterns
               int fmt,                          # IN  the table's format (TABLE_*)
               const index_t[:, ::1] indices,    # IN  (n_queries, n_per_query), validated in [0, n_rows)
               floating[:, ::1] out,             # OUT (n_queries, n_per_query)
               int n_threads):
    """out[b, k] = <query[b], weight[indices[b, k]]>, parallel over b, prefetching table rows
    PREFETCH_DISTANCE entries ahead."""
    cdef Py_ssize_t n_queries = indices.shape[0], n_per = indices.shape[1], dim = weight.shape[1]
    cdef Py_ssize_t b, k, ahead, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(table_t)
    cdef Py_ssize_t n_total
    cdef const table_t *base
    cdef const index_t *flat
    _check_table(<const floating *> NULL, <const table_t *> NULL, fmt, weight.shape[0], dim, weight.strides[0],
                 weight.strides[1], &row_stride)
    if n_queries == 0 or n_per == 0:
        return
    if dim == 0 or weight.shape[0] == 0:
        for b in range(n_queries):
            for k in range(n_per):
                out[b, k] = 0
        return
    base = &weight[0, 0]
    flat = &indices[0, 0]
    n_total = n_queries * n_per
    with nogil:
        for b in prange(n_queries, schedule="dynamic", chunksize=QUERIES_PER_CHUNK, num_threads=n_threads):
            for k in range(n_per):
                ahead = b * n_per + k + PREFETCH_DISTANCE
                if ahead < n_total:
                    prefetch_row(base + (<Py_ssize_t> flat[ahead]) * row_stride, row_bytes)
                out[b, k] = table_dot(&query[b, 0], base + (<Py_ssize_t> indices[b, k]) * row_stride, fmt, dim)


def dot_scores_backward(const floating[:, ::1] grad_scores,   # IN  (n_queries, n_per_query)
                        const table_t[:, :] weight,           # IN  (n_rows, dim), unit column stride
                        int fmt,                              # IN  the table's format (TABLE_*)
                        const index_t[:, ::1] indices,        # IN  (n_queries, n_per_query), validated
                        floating[:, ::1] out,                 # OUT (n_queries, dim)
                        int n_threads):
    """out[b] = sum over k (in order k = 0, 1, ...) of grad_scores[b, k] * weight[indices[b, k]],
    each term one fma per element, starting from zero; parallel over b."""
    cdef Py_ssize_t n_queries = indices.shape[0], n_per = indices.shape[1], dim = weight.shape[1]
    cdef Py_ssize_t b, k, d, ahead, row_stride
    cdef Py_ssize_t row_bytes = dim * sizeof(table_t)
    cdef Py_ssize_t n_total
    cdef const table_t *base
    cdef const index_t *flat
    _check_table(<const floating *> NULL, <const table_t *> NULL, fmt, weight.shape[0], dim, weight.strides[0],
                 weight.strides[1], &row_stride)
    if n_queries == 0 or dim == 0:
        return
    if n_per == 0 or weight.shape[0] == 0:
        for b in range(n_queries):
            for d in range(dim):
                out[b, d] = 0
        return
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
                table_scaled_add(&out[b, 0], base + (<Py_ssize_t> indices[b, k]) * row_stride, fmt,
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
                    const table_t[:, :] weight,         # IN  (n_rows, dim), unit column stride
                    int fmt,                            # IN  the table's format (TABLE_*)
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
    cdef Py_ssize_t row_bytes = dim * sizeof(table_t)
    cdef const table_t *base
    cdef const table_t *row
    cdef const index_t *flat
    cdef floating s, x, e, g, total
    _check_table(<const floating *> NULL, <const table_t *> NULL, fmt, weight.shape[0], dim, weight.strides[0],
                 weight.strides[1], &row_stride)
    if n_queries == 0:
        return
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
                    s = table_dot(&query[b, 0], row, fmt, dim)
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
                    table_scaled_add(&grad_query[b, 0], row, fmt, g, dim)
            if want_loss:
                loss[b] = total


# ---------------------------------------------------------------------------------------------------
# Scoring fused with the table's update (docs/performance.md, "The skip-gram trainer")
# ---------------------------------------------------------------------------------------------------
from cython.parallel cimport parallel, threadid
from libc.stdint cimport int64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy

from cembed._rows cimport (check_state_shapes, prefetch_row_for_write, row_axpy, row_fma_accumulate, apply_row_update,
                           row_update_has_state, row_rule_t, set_row_rule, prefetch_rule_entries)

cdef enum:
    SEGMENTS_PER_CHUNK = 64     # dynamic-schedule chunk of the row pass (rows are Zipf-skewed)
    UPDATE_PREFETCH_ROWS = 8    # row pass: table (and state) rows prefetched this many rows ahead


cdef inline void _score_row_segment(const floating *qbase, Py_ssize_t dim, Py_ssize_t n_per,
                                    const int64_t *order, Py_ssize_t lo, Py_ssize_t hi, Py_ssize_t n_entries,
                                    const floating *old,          # IN  (dim,) the row before its update
                                    Py_ssize_t slot,              # IN  the row's slot in the old-row buffer
                                    Py_ssize_t n_positive, bint want_loss, bint accumulate, bint by_freq,
                                    floating *gs,                 # OUT (n_entries,) grad_scores, by entry
                                    floating *terms,              # OUT (n_entries, 2) loss terms, or NULL
                                    int64_t *entry_slot,          # OUT (n_entries,)
                                    floating *grad_row) noexcept nogil:   # OUT (dim,) the summed gradient
    """The entries order[lo:hi] of one table row (in input order): each entry's score against the old
    row, its loss terms and d loss / d score (the expressions of logistic_scores), and — with
    accumulate — the row's gradient sum of g * query in that order, as segment_update sums
    (zero, then out + g * q per entry; with by_freq fma(g * q, 1/count, out))."""
    cdef Py_ssize_t t, p, b, k, d
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef const floating *qrow
    cdef floating s, x, e, g
    cdef floating inv_count = <floating> (1.0 / <double> (hi - lo))
    cdef int fmt = TABLE_F32 if floating is float else TABLE_F64
    for d in range(dim):
        grad_row[d] = 0
    for t in range(lo, hi):
        if t + PREFETCH_DISTANCE < n_entries:
            prefetch_row(qbase + (order[t + PREFETCH_DISTANCE] // n_per) * dim, row_bytes)
        p = order[t]
        b = p // n_per
        k = p - b * n_per
        qrow = qbase + b * dim
        s = table_dot(qrow, old, fmt, dim)
        x = -s if k < n_positive else s
        e = _exp_neg_abs(x)
        if want_loss:
            terms[2 * p] = (x if x > 0 else 0)
            terms[2 * p + 1] = _log1p(e)
        g = 1 / (1 + e) if x >= 0 else e / (1 + e)
        g = -g if k < n_positive else g
        gs[p] = g
        entry_slot[p] = slot
        if accumulate:
            if by_freq:
                row_fma_accumulate(grad_row, qrow, g, inv_count, dim)
            else:
                row_axpy(grad_row, qrow, g, dim)


def logistic_scores_update(const floating[:, ::1] query,   # IN    (n_queries, dim)
                           floating[:, :] weight,          # INOUT (n_rows, dim), unit column stride
                           Py_ssize_t n_per,               # IN    entries per query; entry p = query p // n_per
                           const int64_t[::1] order,       # IN    (n_entries,) entries grouped by row, input order
                           const int64_t[::1] starts,      # IN    (n_segments + 1,)
                           const int64_t[::1] seg_rows,    # IN    (n_segments,) distinct rows, validated
                           Py_ssize_t skip_segment,        # IN    a segment scored but not updated (padding), or -1
                           bint scale_grad_by_freq,
                           Py_ssize_t n_positive,          # IN    columns [0, n_positive) are positives
                           bint want_loss,
                           int kind,                       # a _grad.UpdateKind
                           floating[:, ::1] state_a,       # INOUT (n_rows, dim) or (0, 0)
                           floating[:, ::1] state_b,       # INOUT (n_rows, dim) or (0, 0)
                           floating[::1] row_state,        # INOUT (n_rows,) or (0,)
                           double[::1] row_log,            # INOUT (n_rows,) or (0,): row_rule_t's (_rows.pxd)
                           int64_t[::1] counts,            # INOUT (n_rows,) or (0,)
                           const double[::1] rule_params,  # IN    (ROW_RULE_PARAMS,) or (0,)
                           double p0, double p1, double p2, double p3, int mode, bint maximize,
                           floating[:, ::1] old_rows,      # SCRATCH (n_segments, dim)
                           int64_t[::1] entry_slot,        # SCRATCH (n_entries,)
                           floating[::1] terms,            # SCRATCH (2 * n_entries,), or (0,) without want_loss
                           floating[::1] loss,             # OUT   (n_queries,), or (0,) without want_loss
                           floating[::1] grad_scores,      # OUT   (n_entries,)
                           floating[:, ::1] grad_query,    # OUT   (n_queries, dim)
                           int n_threads):
    """logistic_scores followed by segment_update of the table with the gradient (query, grad_scores as
    per-sample weights), in two passes that read each distinct table row once:

    1. by row (segments of the sorted entries, parallel, dynamic chunks): copy the row to its slot of
       old_rows, score each of its entries against it, sum the row's gradient in the entries' input
       order and apply the optimizer's row rule (apply_row_update) to the row while it is in cache;
    2. by query (parallel): grad_query[b] and loss[b] from the old rows in the compact buffer,
       k = 0, 1, ... as logistic_scores adds them.

    Every expression and summation order is the one of logistic_scores and segment_update, each row
    and each query has one writer: the result is bitwise that of the two calls, for any thread count."""
    cdef Py_ssize_t n_entries = order.shape[0]
    cdef Py_ssize_t n_segments = seg_rows.shape[0]
    cdef Py_ssize_t n_queries = query.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t j, r, ahead, row_stride, b, k, d, p, slot
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef floating *a_ptr = &state_a[0, 0] if state_a.shape[0] > 0 else NULL
    cdef floating *b_ptr = &state_b[0, 0] if state_b.shape[0] > 0 else NULL
    cdef floating *rs_ptr = &row_state[0] if row_state.shape[0] > 0 else NULL
    cdef floating *terms_ptr = &terms[0] if want_loss else NULL
    cdef floating sign = -1 if maximize else 1
    cdef floating q0 = <floating> p0, q1 = <floating> p1, q2 = <floating> p2, q3 = <floating> p3
    cdef floating total
    cdef int fmt = TABLE_F32 if floating is float else TABLE_F64
    cdef floating *w
    cdef floating *old
    cdef floating *wrow
    cdef floating *scratch
    cdef floating *scratch_rows
    cdef const floating *qbase
    cdef floating *gs
    cdef int64_t *slots
    cdef row_rule_t rule
    set_row_rule(&rule, row_log, counts, rule_params, weight.shape[0], "logistic_scores_update")
    check_state_shapes("logistic_scores_update", weight.shape[0], weight.shape[1], state_a.shape[0],
                       state_a.shape[1], state_b.shape[0], state_b.shape[1], row_state.shape[0])
    if n_queries == 0 or n_entries == 0 or dim == 0 or n_segments == 0:
        raise ValueError("logistic_scores_update: empty operands are the caller's to handle")
    if n_entries != n_queries * n_per or starts.shape[0] != n_segments + 1 or old_rows.shape[0] != n_segments \
            or old_rows.shape[1] != dim or entry_slot.shape[0] != n_entries or grad_scores.shape[0] != n_entries \
            or query.shape[1] != dim or grad_query.shape[0] != n_queries or grad_query.shape[1] != dim \
            or (want_loss and (loss.shape[0] != n_queries or terms.shape[0] != 2 * n_entries)):
        raise ValueError("logistic_scores_update: inconsistent operand shapes")
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("logistic_scores_update: the weight's rows must be contiguous (unit column stride)")
    if not row_update_has_state(kind, a_ptr != NULL, b_ptr != NULL, rs_ptr != NULL, &rule):
        raise ValueError("logistic_scores_update: missing optimizer state for this update kind")
    w = &weight[0, 0]
    old = &old_rows[0, 0]
    qbase = &query[0, 0]
    gs = &grad_scores[0]
    slots = &entry_slot[0]
    n_threads = max(1, n_threads)
    scratch_rows = <floating *> malloc(n_threads * row_bytes)   # one summed gradient row per thread
    if scratch_rows == NULL:
        raise MemoryError("logistic_scores_update: cannot allocate the scratch rows")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * dim
            for j in prange(n_segments, schedule="dynamic", chunksize=SEGMENTS_PER_CHUNK):
                if j + UPDATE_PREFETCH_ROWS < n_segments:
                    ahead = seg_rows[j + UPDATE_PREFETCH_ROWS]
                    prefetch_row_for_write(w + ahead * row_stride, row_bytes)
                    if a_ptr != NULL:
                        prefetch_row_for_write(a_ptr + ahead * dim, row_bytes)
                    if b_ptr != NULL:
                        prefetch_row_for_write(b_ptr + ahead * dim, row_bytes)
                    prefetch_rule_entries(&rule, ahead)
                r = seg_rows[j]
                wrow = w + r * row_stride
                memcpy(old + j * dim, wrow, row_bytes)
                _score_row_segment(qbase, dim, n_per, &order[0], starts[j], starts[j + 1], n_entries, old + j * dim,
                                   j, n_positive, want_loss, j != skip_segment, scale_grad_by_freq, gs, terms_ptr,
                                   slots, scratch)
                if j != skip_segment:
                    apply_row_update(kind, wrow, a_ptr + r * dim if a_ptr != NULL else NULL,
                                     b_ptr + r * dim if b_ptr != NULL else NULL, rs_ptr + r if rs_ptr != NULL else NULL,
                                     scratch, q0, q1, q2, q3, mode, sign, dim, &rule, r)
        with nogil:
            for b in prange(n_queries, schedule="dynamic", chunksize=QUERIES_PER_CHUNK, num_threads=n_threads):
                total = 0
                for d in range(dim):
                    grad_query[b, d] = 0
                for k in range(n_per):
                    p = b * n_per + k
                    if p + PREFETCH_DISTANCE < n_entries:
                        prefetch_row(old + slots[p + PREFETCH_DISTANCE] * dim, row_bytes)
                    if want_loss:
                        total = total + terms_ptr[2 * p] + terms_ptr[2 * p + 1]
                    table_scaled_add(&grad_query[b, 0], old + slots[p] * dim, fmt, gs[p], dim)
                if want_loss:
                    loss[b] = total
    finally:
        free(scratch_rows)
