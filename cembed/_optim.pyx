"""Fused row-sparse optimizer steps.

Each kernel makes one pass over the rows of a coalesced gradient: it reads the weight row, its state
rows and the gradient row once and writes the weight and state once. Rows are split statically across
threads (one writer per row, so any thread count gives the same bits); rows a gradient does not name
are never read or written. Upcoming rows are prefetched, since they are scattered over the table.

The weight may be any (n_rows, dim) view whose rows are contiguous (unit column stride, any row
stride: a column slice of a wider table works); optimizer state and gradient values are C-contiguous.
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.stdint cimport int64_t

from cembed._rows cimport (check_state_shapes, prefetch_row_for_write, row_stride_items, apply_row_update, row_update_has_state,
                           row_rule_t, set_row_rule, prefetch_rule_entries, PREFETCH_DISTANCE)

cdef enum:
    ROWS_PER_CHUNK = 64


cdef inline void _prefetch_ahead(const int64_t *rows, Py_ssize_t k, Py_ssize_t n_listed, Py_ssize_t dim,
                                 floating *weight, Py_ssize_t row_stride,
                                 floating *state_a, floating *state_b) noexcept nogil:
    """Prefetch, for writing, the row PREFETCH_DISTANCE positions ahead in the weight (rows row_stride
    apart) and in up to two C-contiguous state tables (rows dim apart; NULL for none)."""
    cdef Py_ssize_t r
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    if k + PREFETCH_DISTANCE >= n_listed:
        return
    r = rows[k + PREFETCH_DISTANCE]
    prefetch_row_for_write(weight + r * row_stride, row_bytes)
    if state_a != NULL:
        prefetch_row_for_write(state_a + r * dim, row_bytes)
    if state_b != NULL:
        prefetch_row_for_write(state_b + r * dim, row_bytes)


cdef inline void _prefetch_row_log_ahead(const int64_t *rows, Py_ssize_t k, Py_ssize_t n_listed,
                                         const double *row_log) noexcept nogil:
    """Prefetch, for writing, SparseAdamW's L_s of the row PREFETCH_DISTANCE positions ahead."""
    if k + PREFETCH_DISTANCE < n_listed:
        prefetch_row_for_write(row_log + rows[k + PREFETCH_DISTANCE], sizeof(double))


cdef int _weight_rows(floating[:, :] weight, Py_ssize_t *row_stride, str kernel) except -1:
    """The weight's row stride in elements (OUT), or ValueError when its rows are not contiguous."""
    if not row_stride_items(row_stride, weight.shape[0], weight.shape[1], weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError(f"{kernel}: the weight's rows must be contiguous (unit column stride)")
    return 0


cdef void _update_listed_rows(int kind, floating *w, Py_ssize_t row_stride,  # INOUT weight, rows row_stride apart
                              floating *state_a, floating *state_b,          # INOUT (n_rows, dim) or NULL
                              floating *row_state,                           # INOUT (n_rows,) or NULL
                              const row_rule_t *rule,                        # INOUT the per-row kinds' rule
                              const int64_t *rows, Py_ssize_t nnz,           # IN    distinct rows
                              const floating *grad, Py_ssize_t dim,          # IN    (nnz, dim)
                              floating q0, floating q1, floating q2, floating q3, int mode, floating sign,
                              int n_threads) noexcept nogil:
    """apply_row_update(kind) on every listed row; rows split statically (one writer per row)."""
    cdef Py_ssize_t k, r
    for k in prange(nnz, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
        _prefetch_ahead(rows, k, nnz, dim, w, row_stride, state_a, state_b)
        if k + PREFETCH_DISTANCE < nnz:
            prefetch_rule_entries(rule, rows[k + PREFETCH_DISTANCE])
        r = rows[k]
        apply_row_update(kind, w + r * row_stride, state_a + r * dim if state_a != NULL else NULL,
                         state_b + r * dim if state_b != NULL else NULL,
                         row_state + r if row_state != NULL else NULL, grad + k * dim, q0, q1, q2, q3, mode, sign,
                         dim, rule, r)


def update_rows(int kind,                            # a ROW_* kind of _rows.pxd (_grad.UpdateKind)
                floating[:, :] weight,               # INOUT (n_rows, dim), unit column stride
                floating[:, ::1] state_a,            # INOUT (n_rows, dim), or (0, 0) when the kind has none
                floating[:, ::1] state_b,            # INOUT (n_rows, dim), or (0, 0)
                floating[::1] row_state,             # INOUT (n_rows,), or (0,)
                double[::1] row_log,                 # INOUT (n_rows,) or (0,): row_rule_t's row_log
                int64_t[::1] counts,                 # INOUT (n_rows,) or (0,): row_rule_t's counts
                const double[::1] rule_params,       # IN    (ROW_RULE_PARAMS,) or (0,): row_rule_t's scalars
                const int64_t[::1] rows,             # IN    (nnz,) distinct rows of the gradient
                const floating[:, ::1] grad,         # IN    (nnz, dim) their gradient
                double p0, double p1, double p2, double p3, int mode, bint maximize, int n_threads):
    """The optimizer update ``kind`` of the rows named by the gradient (parameters as in
    ``apply_row_update``: SGD p0 = -lr; Adagrad p0 = -clr, p1 = eps; SparseAdam p0 = 1 - beta1,
    p1 = 1 - beta2, p2 = eps, p3 = -step_size; row-wise Adagrad p0 = lr, p1 = eps, p2 = weight_decay,
    mode; the per-row kinds as _rows.pxd lists them); every other row is untouched."""
    cdef Py_ssize_t row_stride
    cdef floating *a_ptr = &state_a[0, 0] if state_a.shape[0] > 0 else NULL
    cdef floating *b_ptr = &state_b[0, 0] if state_b.shape[0] > 0 else NULL
    cdef floating *rs_ptr = &row_state[0] if row_state.shape[0] > 0 else NULL
    cdef row_rule_t rule
    set_row_rule(&rule, row_log, counts, rule_params, weight.shape[0], "update_rows")
    check_state_shapes("update_rows", weight.shape[0], weight.shape[1], state_a.shape[0], state_a.shape[1],
                       state_b.shape[0], state_b.shape[1], row_state.shape[0])
    if rows.shape[0] == 0 or weight.shape[1] == 0:   # no row to update (a table of no rows has empty state too)
        return
    if not row_update_has_state(kind, a_ptr != NULL, b_ptr != NULL, rs_ptr != NULL, &rule):
        raise ValueError(f"update_rows: missing optimizer state for update kind {kind}")
    if _weight_rows(weight, &row_stride, "update_rows") == 0:
        _update_listed_rows(kind, &weight[0, 0], row_stride, a_ptr, b_ptr, rs_ptr, &rule, &rows[0], rows.shape[0],
                            &grad[0, 0], weight.shape[1], <floating> p0, <floating> p1, <floating> p2,
                            <floating> p3, mode, -1 if maximize else 1, n_threads)


cdef int _check_rows(const int64_t[::1] rows, Py_ssize_t low, Py_ssize_t high, str what, str kernel) except -1:
    """Row ids (or gradient slots) a kernel indexes with that come from the optimizer's kept state or were
    computed from it: checked against the arrays once more in the call that uses them, with the GIL held
    (another Python thread may have replaced the state after the step checked it). O(n), beside the
    O(n * dim) update."""
    cdef Py_ssize_t k
    for k in range(rows.shape[0]):
        if rows[k] < low or rows[k] >= high:
            raise ValueError(f"{kernel}: {what} {rows[k]} outside [{low}, {high}) (the optimizer state was replaced "
                             "after the step checked it: by another thread?)")
    return 0


def sgd_momentum_rows(floating[:, :] weight,         # INOUT (n_rows, dim), unit column stride
                      floating[:, ::1] buf,          # INOUT (n_rows, dim) momentum buffer
                      const int64_t[::1] rows,       # IN    (n_active,) rows with a live buffer, ascending
                      const int64_t[::1] grad_slot,  # IN    (n_active,) row of `grad` for each, or -1 (zero grad)
                      const floating[:, ::1] grad,   # IN    (nnz, dim)
                      double lr, double momentum, double dampening, bint nesterov, bint maximize,
                      bint first_step, int n_threads):
    """SGD with momentum, dense-equivalent semantics restricted to the rows whose buffer is live:
         first step: buf = g;  later: buf = momentum * buf + (1 - dampening) * g   (g = 0 if absent)
         d = g + momentum * buf (nesterov) or buf;  w = fma(-lr, d, w)."""
    cdef Py_ssize_t n_active = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r, s, row_stride
    cdef floating *w
    cdef floating mu = <floating> momentum
    cdef floating one_minus_damp = <floating> (1.0 - dampening)
    cdef floating neg_lr = <floating> (-lr)
    cdef floating sign = -1 if maximize else 1
    if buf.shape[0] != weight.shape[0] or buf.shape[1] != dim or grad_slot.shape[0] != n_active \
            or grad.shape[1] != dim:
        raise ValueError("sgd_momentum_rows: weight, buf, rows, grad_slot and grad must agree in shape")
    _check_rows(rows, 0, weight.shape[0], "a live momentum row", "sgd_momentum_rows")
    _check_rows(grad_slot, -1, grad.shape[0], "a gradient slot", "sgd_momentum_rows")
    if n_active == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("sgd_momentum_rows: the weight's rows must be contiguous (unit column stride)")
    w = &weight[0, 0]
    with nogil:
        for k in prange(n_active, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            _prefetch_ahead(&rows[0], k, n_active, dim, w, row_stride, &buf[0, 0], NULL)
            r = rows[k]
            s = grad_slot[k]
            _momentum_row(w + r * row_stride, &buf[r, 0], &grad[s, 0] if s >= 0 else NULL, mu, one_minus_damp,
                          neg_lr, sign, nesterov, first_step, dim)


cdef inline void _momentum_row(floating *w,            # INOUT (dim,) weight row
                               floating *buf,          # INOUT (dim,) its momentum buffer
                               const floating *grad,   # IN    (dim,) its gradient, or NULL (a zero gradient)
                               floating mu, floating one_minus_damp, floating neg_lr, floating sign,
                               bint nesterov, bint first_step, Py_ssize_t dim) noexcept nogil:
    """One row of sgd_momentum_rows."""
    cdef Py_ssize_t j
    cdef floating g, b, d
    for j in range(dim):
        g = sign * grad[j] if grad != NULL else 0
        if first_step:
            b = g
        else:
            b = mu * buf[j] + one_minus_damp * g
        buf[j] = b
        d = g + mu * b if nesterov else b
        w[j] = w[j] + neg_lr * d


# ---------------------------------------------------------------------------------------------------
# SparseAdamW's pending weight decay (docs/behaviour.md §8.5; _rows.pxd's row_rule_t): SparseAdamW and
# SparseAdam with per-row bias correction update rows through update_rows (kinds ROW_ADAMW,
# ROW_ADAM_ROW_BIAS); apply_pending_decay brings the untouched rows up to date here.
# ---------------------------------------------------------------------------------------------------
from cembed._rows cimport pending_decay, row_scale


def adamw_decay_rows(floating[:, :] weight,           # INOUT (n_rows, dim), unit column stride
                     double[::1] row_decay_log,       # INOUT (n_rows,) L_s of each row's last update
                     const int64_t[::1] rows,         # IN    (n_pending,) distinct rows
                     double decay_log, double decay_log_prev, double decay_last, int n_threads):
    """Bring the listed rows' weight decay up to date (w *= pending factor; L_s = L_t); rows already
    at L_t are left alone."""
    cdef Py_ssize_t n_pending = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r, row_stride
    cdef double decay
    cdef floating *w
    if row_decay_log.shape[0] != weight.shape[0]:
        raise ValueError("adamw_decay_rows: row_decay_log must be (n_rows,)")
    _check_rows(rows, 0, weight.shape[0], "a pending row", "adamw_decay_rows")
    if n_pending == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("adamw_decay_rows: the weight's rows must be contiguous (unit column stride)")
    w = &weight[0, 0] if dim > 0 else NULL
    with nogil:
        for k in prange(n_pending, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            if dim > 0:
                _prefetch_ahead(&rows[0], k, n_pending, dim, w, row_stride, NULL, NULL)
            _prefetch_row_log_ahead(&rows[0], k, n_pending, &row_decay_log[0])
            r = rows[k]
            if row_decay_log[r] == decay_log:
                continue
            decay = pending_decay(row_decay_log[r], decay_log, decay_log_prev, decay_last)
            row_decay_log[r] = decay_log
            if dim > 0:
                row_scale(w + r * row_stride, <floating> decay, dim)


# ---------------------------------------------------------------------------------------------------
# Dense gradients: torch's element-wise `a.add_(b, alpha=...)`, which its CPU kernels compute as one fused
# multiply-add per element (docs/behaviour.md §8.1).
# ---------------------------------------------------------------------------------------------------
from cembed._rows cimport row_axpy_fma, row_add_product

cdef enum:
    ELEMENTS_PER_BLOCK = 16384   # fused_multiply_add_: elements per prange iteration


def fused_multiply_add_(floating[::1] out,          # INOUT (n,)
                        const floating[::1] x,      # IN    (n,)
                        const floating[::1] y,      # IN    (n,), or empty: alpha instead
                        double alpha, int n_threads):
    """out = fma(x, y, out), or fma(alpha, x, out) for an empty y (alpha rounded to the arrays' dtype),
    element by element: torch's ``out.addcmul_(x, y)`` / ``out.add_(x, alpha=alpha)`` on the CPU, bit
    for bit. Blocks split statically; one writer each."""
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t n_blocks = (n + ELEMENTS_PER_BLOCK - 1) // ELEMENTS_PER_BLOCK
    cdef Py_ssize_t blk, lo, size
    cdef floating a = <floating> alpha
    cdef bint scalar = y.shape[0] == 0
    if x.shape[0] != n or not (scalar or y.shape[0] == n):
        raise ValueError(f"fused_multiply_add_: out has {n} elements, x {x.shape[0]}, y {y.shape[0]}")
    if n == 0:
        return
    with nogil:
        for blk in prange(n_blocks, schedule="static", num_threads=n_threads):
            lo = blk * ELEMENTS_PER_BLOCK
            size = min(<Py_ssize_t> ELEMENTS_PER_BLOCK, n - lo)
            if scalar:
                row_axpy_fma(&out[lo], &x[lo], a, 1, size)
            else:
                row_add_product(&out[lo], &x[lo], &y[lo], size)


# ---------------------------------------------------------------------------------------------------
# 16-bit weights and state (docs/behaviour.md §8.7). The *_half kernels update a 16-bit weight in place,
# one pass per row: the row (and 16-bit state rows) widened into a per-thread scratch buffer, the float32
# row rule above, each element rounded once (_rounding.pxd's half_rows_widen / half_rows_round; the
# row-rule kinds through half_row_update, which the fused backward runs too). Weights the kernels cannot
# write in place are gathered to float32 by the optimizer, updated by the float32 kernels above and
# rounded back by round_rows: the same bits.
# ---------------------------------------------------------------------------------------------------
from cython.parallel cimport parallel, threadid
from libc.stdint cimport uint16_t, uint64_t
from libc.stdlib cimport malloc, free

from cembed._rounding cimport (cembed_row_round, cembed_half_row_to_f32, state_t, half_row_update, half_rows_widen,
                               half_rows_round, CEMBED_STREAM_DECAY, CEMBED_TABLE_BF16, CEMBED_TABLE_F16)


cdef inline void _prefetch_half_ahead(const int64_t *rows, Py_ssize_t k, Py_ssize_t n_listed, Py_ssize_t dim,
                                      uint16_t *weight, Py_ssize_t row_stride,
                                      state_t *state_a, state_t *state_b) noexcept nogil:
    """_prefetch_ahead for a 16-bit weight and its (float32 or 16-bit) state tables."""
    cdef Py_ssize_t r
    if k + PREFETCH_DISTANCE >= n_listed:
        return
    r = rows[k + PREFETCH_DISTANCE]
    prefetch_row_for_write(weight + r * row_stride, dim * sizeof(uint16_t))
    if state_a != NULL:
        prefetch_row_for_write(state_a + r * dim, dim * sizeof(state_t))
    if state_b != NULL:
        prefetch_row_for_write(state_b + r * dim, dim * sizeof(state_t))


cdef int _half_weight_rows(uint16_t[:, :] weight, int weight_fmt, Py_ssize_t *row_stride, str kernel) except -1:
    """The 16-bit weight's row stride in elements (OUT); ValueError for rows that are not contiguous or
    an unknown format."""
    if weight_fmt != CEMBED_TABLE_BF16 and weight_fmt != CEMBED_TABLE_F16:
        raise ValueError(f"{kernel}: unknown weight format {weight_fmt}")
    if not row_stride_items(row_stride, weight.shape[0], weight.shape[1], weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError(f"{kernel}: the weight's rows must be contiguous (unit column stride)")
    return 0


cdef float *_thread_scratch(int n_threads, Py_ssize_t dim, str kernel) except NULL:
    """3 * dim floats per thread (half_rows_widen's rows), to be freed by the caller."""
    cdef float *scratch = <float *> malloc(max(1, n_threads) * 3 * max(1, dim) * sizeof(float))
    if scratch == NULL:
        raise MemoryError(f"{kernel}: cannot allocate the scratch rows")
    return scratch


def update_rows_half(int kind,                      # a ROW_* kind of _rows.pxd (_grad.UpdateKind)
                     uint16_t[:, :] weight,         # INOUT (n_rows, dim) 16-bit bits, unit column stride
                     int weight_fmt,                # CEMBED_TABLE_BF16 / CEMBED_TABLE_F16 (_half.h)
                     state_t[:, ::1] state_a,       # INOUT (n_rows, dim) or (0, 0): float32 or 16-bit bits
                     state_t[:, ::1] state_b,       # INOUT (n_rows, dim) or (0, 0)
                     state_t[::1] row_state,        # INOUT (n_rows,) or (0,)
                     int state_fmt,                 # format of 16-bit state (unused for float32 state)
                     double[::1] row_log,           # INOUT (n_rows,) or (0,): row_rule_t's row_log
                     int64_t[::1] counts,           # INOUT (n_rows,) or (0,): row_rule_t's counts
                     const double[::1] rule_params, # IN    (ROW_RULE_PARAMS,) or (0,): row_rule_t's scalars
                     const int64_t[::1] rows,       # IN    (nnz,) distinct rows of the gradient
                     const float[:, ::1] grad,      # IN    (nnz, dim) their gradient
                     double p0, double p1, double p2, double p3, int mode, bint maximize,
                     bint stochastic, uint64_t seed, uint64_t step,
                     uint64_t key_first, uint64_t key_stride,   # row r's random key row: first + stride * r
                     int n_threads):
    """update_rows on a 16-bit weight, in one pass: each listed row (and its 16-bit state) widened to
    float32, the float32 row rule with its gradient row, every element rounded once, keyed by (seed,
    step, key row, stream) with key row key_first + key_stride * r — `half_row_update`, the fused
    backward's row update, so the two give the same bits. Rows split statically (one writer per row;
    each row's random bits depend on its key alone): the same bits for any thread count."""
    cdef Py_ssize_t nnz = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t n_rows = weight.shape[0]
    cdef Py_ssize_t k, r, row_stride
    cdef state_t *a_ptr = &state_a[0, 0] if state_a.shape[0] > 0 else NULL
    cdef state_t *b_ptr = &state_b[0, 0] if state_b.shape[0] > 0 else NULL
    cdef state_t *rs_ptr = &row_state[0] if row_state.shape[0] > 0 else NULL
    cdef uint16_t *w
    cdef float *scratch
    cdef float *scratch_rows
    cdef float sign = -1 if maximize else 1
    cdef float q0 = <float> p0, q1 = <float> p1, q2 = <float> p2, q3 = <float> p3
    cdef row_rule_t rule
    set_row_rule(&rule, row_log, counts, rule_params, n_rows, "update_rows_half")
    check_state_shapes("update_rows_half", n_rows, weight.shape[1], state_a.shape[0], state_a.shape[1],
                       state_b.shape[0], state_b.shape[1], row_state.shape[0])
    if grad.shape[0] != nnz or grad.shape[1] != dim:
        raise ValueError("update_rows_half: grad must be (len(rows), dim)")
    if nnz == 0 or dim == 0:   # no row to update (a table of no rows has empty state too)
        return
    if not row_update_has_state(kind, a_ptr != NULL, b_ptr != NULL, rs_ptr != NULL, &rule):
        raise ValueError(f"update_rows_half: missing optimizer state for update kind {kind}")
    _half_weight_rows(weight, weight_fmt, &row_stride, "update_rows_half")
    w = &weight[0, 0]
    n_threads = max(1, n_threads)
    scratch_rows = _thread_scratch(n_threads, dim, "update_rows_half")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * 3 * dim
            for k in prange(nnz, schedule="static", chunksize=ROWS_PER_CHUNK):
                _prefetch_half_ahead(&rows[0], k, nnz, dim, w, row_stride, a_ptr, b_ptr)
                if k + PREFETCH_DISTANCE < nnz:
                    prefetch_rule_entries(&rule, rows[k + PREFETCH_DISTANCE])
                r = rows[k]
                half_row_update(kind, w + r * row_stride, weight_fmt, a_ptr + r * dim if a_ptr != NULL else NULL,
                                b_ptr + r * dim if b_ptr != NULL else NULL, rs_ptr + r if rs_ptr != NULL else NULL,
                                state_fmt, &grad[k, 0], q0, q1, q2, q3, mode, sign, dim, scratch, stochastic, seed,
                                step, key_first + key_stride * <uint64_t> r, &rule, r)
    finally:
        free(scratch_rows)


def sgd_momentum_rows_half(uint16_t[:, :] weight,          # INOUT (n_rows, dim) 16-bit bits, unit column stride
                           int weight_fmt,
                           state_t[:, ::1] buf,            # INOUT (n_rows, dim) momentum buffer, float32 or 16-bit
                           int state_fmt,
                           const int64_t[::1] rows,        # IN    as sgd_momentum_rows
                           const int64_t[::1] grad_slot,   # IN
                           const float[:, ::1] grad,       # IN    (nnz, dim)
                           double lr, double momentum, double dampening, bint nesterov, bint maximize,
                           bint first_step, bint stochastic, uint64_t seed, uint64_t step,
                           uint64_t key_first, uint64_t key_stride, int n_threads):
    """sgd_momentum_rows on a 16-bit weight, one pass per row: the row (and a 16-bit buffer row)
    widened, the float32 rule, each element rounded once (the weight on stream 0, the buffer on 1),
    keyed as update_rows_half."""
    cdef Py_ssize_t n_active = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r, s, row_stride
    cdef uint16_t *w
    cdef float *scratch
    cdef float *scratch_rows
    cdef float *sbuf
    cdef float *unused
    cdef float mu = <float> momentum
    cdef float one_minus_damp = <float> (1.0 - dampening)
    cdef float neg_lr = <float> (-lr)
    cdef float sign = -1 if maximize else 1
    if buf.shape[0] != weight.shape[0] or buf.shape[1] != dim or grad_slot.shape[0] != n_active \
            or grad.shape[1] != dim:
        raise ValueError("sgd_momentum_rows_half: weight, buf, rows, grad_slot and grad must agree in shape")
    _check_rows(rows, 0, weight.shape[0], "a live momentum row", "sgd_momentum_rows_half")
    _check_rows(grad_slot, -1, grad.shape[0], "a gradient slot", "sgd_momentum_rows_half")
    if n_active == 0 or dim == 0:
        return
    _half_weight_rows(weight, weight_fmt, &row_stride, "sgd_momentum_rows_half")
    w = &weight[0, 0]
    n_threads = max(1, n_threads)
    scratch_rows = _thread_scratch(n_threads, dim, "sgd_momentum_rows_half")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * 3 * dim
            for k in prange(n_active, schedule="static", chunksize=ROWS_PER_CHUNK):
                _prefetch_half_ahead(&rows[0], k, n_active, dim, w, row_stride, &buf[0, 0], <state_t *> NULL)
                r = rows[k]
                s = grad_slot[k]
                sbuf = unused = NULL   # set through pointers: assigned here so that prange privatises them
                half_rows_widen(w + r * row_stride, weight_fmt, &buf[r, 0], <state_t *> NULL, state_fmt, dim, scratch,
                                &sbuf, &unused)
                _momentum_row(scratch, sbuf, &grad[s, 0] if s >= 0 else NULL, mu, one_minus_damp, neg_lr, sign,
                              nesterov, first_step, dim)
                half_rows_round(w + r * row_stride, weight_fmt, &buf[r, 0], <state_t *> NULL, state_fmt, dim, scratch,
                                stochastic, seed, step, key_first + key_stride * <uint64_t> r)
    finally:
        free(scratch_rows)


def adamw_decay_rows_half(uint16_t[:, :] weight,        # INOUT (n_rows, dim) 16-bit bits, unit column stride
                          int weight_fmt,
                          double[::1] row_decay_log,    # INOUT (n_rows,)
                          const int64_t[::1] rows,      # IN    (n_pending,) distinct rows
                          double decay_log, double decay_log_prev, double decay_last,
                          bint stochastic, uint64_t seed, uint64_t step,
                          uint64_t key_first, uint64_t key_stride, int n_threads):
    """adamw_decay_rows on a 16-bit weight, one pass per row: widened, scaled in float32, each element
    rounded once on the decay stream (CEMBED_STREAM_DECAY), keyed as update_rows_half."""
    cdef Py_ssize_t n_pending = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r, row_stride = 0
    cdef double decay
    cdef uint16_t *w = NULL
    cdef float *scratch
    cdef float *scratch_rows
    if row_decay_log.shape[0] != weight.shape[0]:
        raise ValueError("adamw_decay_rows_half: row_decay_log must be (n_rows,)")
    _check_rows(rows, 0, weight.shape[0], "a pending row", "adamw_decay_rows_half")
    if n_pending == 0:
        return
    if dim > 0:
        _half_weight_rows(weight, weight_fmt, &row_stride, "adamw_decay_rows_half")
        w = &weight[0, 0]
    n_threads = max(1, n_threads)
    scratch_rows = _thread_scratch(n_threads, dim, "adamw_decay_rows_half")
    scratch = scratch_rows
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_rows + threadid() * 3 * dim
            for k in prange(n_pending, schedule="static", chunksize=ROWS_PER_CHUNK):
                if dim > 0:
                    _prefetch_half_ahead(&rows[0], k, n_pending, dim, w, row_stride, <float *> NULL, <float *> NULL)
                _prefetch_row_log_ahead(&rows[0], k, n_pending, &row_decay_log[0])
                r = rows[k]
                if row_decay_log[r] == decay_log:
                    continue
                decay = pending_decay(row_decay_log[r], decay_log, decay_log_prev, decay_last)
                row_decay_log[r] = decay_log
                if dim > 0:
                    cembed_half_row_to_f32(weight_fmt, scratch, w + r * row_stride, dim)
                    row_scale(scratch, <float> decay, dim)
                    cembed_row_round(weight_fmt, stochastic, w + r * row_stride, scratch, dim, seed, step,
                                     key_first + key_stride * <uint64_t> r, CEMBED_STREAM_DECAY)
    finally:
        free(scratch_rows)


def round_rows(const float[:, ::1] values,     # IN  (n, dim) float32 rows
               uint16_t[:, ::1] out,            # OUT (n, dim) their 16-bit bits
               int fmt,                         # CEMBED_TABLE_BF16 / CEMBED_TABLE_F16 (_half.h)
               bint stochastic,
               const int64_t[::1] key_rows,     # IN  (n,) the table row each row of `values` belongs to
               uint64_t seed, uint64_t step, int stream, int n_threads):
    """out[k] = values[k] rounded to the 16-bit format, stochastically with the random bits of
    (seed, step, key_rows[k], stream, column) or to nearest (ties to even). Rows split statically;
    each row's bits depend on its key alone."""
    cdef Py_ssize_t n = values.shape[0]
    cdef Py_ssize_t dim = values.shape[1]
    cdef Py_ssize_t k
    if out.shape[0] != n or out.shape[1] != dim or key_rows.shape[0] != n:
        raise ValueError("round_rows: values, out and key_rows must agree in shape")
    if fmt != CEMBED_TABLE_BF16 and fmt != CEMBED_TABLE_F16:
        raise ValueError(f"round_rows: unknown format {fmt}")
    if n == 0 or dim == 0:
        return
    with nogil:
        for k in prange(n, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            cembed_row_round(fmt, stochastic, &out[k, 0], &values[k, 0], dim, seed, step,
                             <uint64_t> key_rows[k], stream)
