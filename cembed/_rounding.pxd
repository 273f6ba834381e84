# Reproducible rounding of float32 rows into 16-bit rows (_rounding.h, docs/behaviour.md §8.7), and the
# one half-precision row update shared by the optimizer kernels (_optim) and the fused backward (_grad):
# widen the weight row (and 16-bit state rows) to float32, apply the float32 row update of _rows.pxd,
# round every element once.
from libc.stdint cimport uint16_t, uint64_t

from cembed._rows cimport adam_row, apply_row_update, row_bias_step_size, row_rule_t, ROW_ADAM, ROW_ADAM_ROW_BIAS

cdef extern from "_rounding.h" nogil:
    int CEMBED_TABLE_BF16
    int CEMBED_TABLE_F16
    int CEMBED_STREAM_WEIGHT
    int CEMBED_STREAM_STATE_A
    int CEMBED_STREAM_STATE_B
    int CEMBED_STREAM_DECAY
    void cembed_half_row_to_f32(int fmt, float *out, const uint16_t *row, Py_ssize_t dim)
    void cembed_row_round(int fmt, int stochastic, uint16_t *out, const float *v, Py_ssize_t dim, uint64_t seed,
                          uint64_t step, uint64_t row, uint64_t stream)
    void cembed_adam_row_bf16(uint16_t *w, uint16_t *m, uint16_t *v, const float *grad, float one_minus_beta1,
                              float one_minus_beta2, float eps, float neg_step, float sign, Py_ssize_t dim,
                              int stochastic, uint64_t seed, uint64_t step, uint64_t row)


ctypedef fused state_t:   # a 16-bit weight's optimizer state: float32, or 16-bit (bfloat16 / float16 bits)
    float
    uint16_t


cdef inline void half_rows_widen(uint16_t *w, int weight_fmt,          # IN (dim,) 16-bit weight row
                                 state_t *state_a, state_t *state_b,   # IN (dim,) state rows, or NULL
                                 int state_fmt, Py_ssize_t dim,
                                 float *scratch,                       # OUT (3 * dim,)
                                 float **a, float **b) noexcept nogil:  # OUT the float32 state rows, or NULL
    """The float32 rows a 16-bit row's update works in: the weight row widened (exactly) into
    scratch[0:dim]; 16-bit state rows widened into scratch[dim:2 dim] (state_a) and scratch[2 dim:3 dim]
    (state_b), float32 state rows used in place. half_rows_round stores them back."""
    cembed_half_row_to_f32(weight_fmt, scratch, w, dim)
    if state_t is float:
        a[0] = state_a
        b[0] = state_b
    else:
        a[0] = scratch + dim if state_a != NULL else NULL
        b[0] = scratch + 2 * dim if state_b != NULL else NULL
        if state_a != NULL:
            cembed_half_row_to_f32(state_fmt, a[0], state_a, dim)
        if state_b != NULL:
            cembed_half_row_to_f32(state_fmt, b[0], state_b, dim)


cdef inline void half_rows_round(uint16_t *w, int weight_fmt,          # OUT (dim,) 16-bit weight row
                                 state_t *state_a, state_t *state_b,   # OUT (dim,) state rows, or NULL
                                 int state_fmt, Py_ssize_t dim,
                                 const float *scratch,                 # IN  (3 * dim,) as half_rows_widen left it
                                 bint stochastic, uint64_t seed, uint64_t step, uint64_t row) noexcept nogil:
    """Store the float32 rows of half_rows_widen, each element rounded once: 16-bit state rows on
    streams 1 (state_a) and 2 (state_b), the weight row on stream 0 (float32 state was updated in place)."""
    if state_t is uint16_t:
        if state_a != NULL:
            cembed_row_round(state_fmt, stochastic, state_a, scratch + dim, dim, seed, step, row, CEMBED_STREAM_STATE_A)
        if state_b != NULL:
            cembed_row_round(state_fmt, stochastic, state_b, scratch + 2 * dim, dim, seed, step, row,
                             CEMBED_STREAM_STATE_B)
    cembed_row_round(weight_fmt, stochastic, w, scratch, dim, seed, step, row, CEMBED_STREAM_WEIGHT)


cdef inline void half_adam_row(uint16_t *w, int weight_fmt,            # INOUT (dim,) 16-bit weight row
                               state_t *exp_avg, state_t *exp_avg_sq,  # INOUT (dim,)
                               int state_fmt,
                               const float *grad,                      # IN    (dim,) the row's gradient
                               float one_minus_beta1, float one_minus_beta2, float eps, float neg_step_size,
                               float sign, Py_ssize_t dim,
                               float *scratch,                         # SCRATCH (3 * dim,)
                               bint stochastic, uint64_t seed, uint64_t step, uint64_t row) noexcept nogil:
    """SparseAdam's row rule (_rows.pxd's adam_row) on a 16-bit row: widened, the float32 rule, rounded
    once per element; a bfloat16 row with bfloat16 state in one fused pass (the same bits)."""
    cdef float *sa
    cdef float *sb
    if state_t is uint16_t:
        if weight_fmt == CEMBED_TABLE_BF16 and state_fmt == CEMBED_TABLE_BF16:
            cembed_adam_row_bf16(w, exp_avg, exp_avg_sq, grad, one_minus_beta1, one_minus_beta2, eps, neg_step_size,
                                 sign, dim, stochastic, seed, step, row)
            return
    half_rows_widen(w, weight_fmt, exp_avg, exp_avg_sq, state_fmt, dim, scratch, &sa, &sb)
    adam_row(scratch, sa, sb, grad, one_minus_beta1, one_minus_beta2, eps, neg_step_size, sign, dim)
    half_rows_round(w, weight_fmt, exp_avg, exp_avg_sq, state_fmt, dim, scratch, stochastic, seed, step, row)


cdef inline void half_row_update(int kind,
                                 uint16_t *w, int weight_fmt,        # INOUT (dim,) 16-bit weight row
                                 state_t *state_a,                   # INOUT (dim,) or NULL
                                 state_t *state_b,                   # INOUT (dim,) or NULL
                                 state_t *row_state,                 # INOUT (1,) or NULL
                                 int state_fmt,                      # IN format of 16-bit state (else unused)
                                 const float *grad,                  # IN    (dim,) the row's summed gradient
                                 float q0, float q1, float q2, float q3, int mode, float sign,
                                 Py_ssize_t dim,
                                 float *scratch,                     # SCRATCH (3 * dim,)
                                 bint stochastic, uint64_t seed, uint64_t step,
                                 uint64_t row,                       # IN the row's random key row
                                 const row_rule_t *rule,             # INOUT as apply_row_update's
                                 Py_ssize_t r) noexcept nogil:       # IN the table row (the rule's index)
    """apply_row_update(kind) on table row r of a 16-bit weight in float32: the weight (and 16-bit
    state) widened exactly, the float32 row rule, each element rounded once with the random bits of key
    row `row` (weight stream 0, state_a and row_state stream 1, state_b stream 2)."""
    cdef float *sa
    cdef float *sb
    cdef float rs = 0
    cdef float *prs = NULL
    if kind == ROW_ADAM:
        half_adam_row(w, weight_fmt, state_a, state_b, state_fmt, grad, q0, q1, q2, q3, sign, dim, scratch,
                      stochastic, seed, step, row)
        return
    if kind == ROW_ADAM_ROW_BIAS:
        half_adam_row(w, weight_fmt, state_a, state_b, state_fmt, grad, q0, q1, q2,
                      <float> (-row_bias_step_size(rule.counts + r, rule.lr, rule.beta1, rule.beta2)), sign, dim,
                      scratch, stochastic, seed, step, row)
        return
    half_rows_widen(w, weight_fmt, state_a, state_b, state_fmt, dim, scratch, &sa, &sb)
    if row_state != NULL:
        if state_t is float:
            prs = row_state
        else:
            cembed_half_row_to_f32(state_fmt, &rs, row_state, 1)
            prs = &rs
    apply_row_update(kind, scratch, sa, sb, prs, grad, q0, q1, q2, q3, mode, sign, dim, rule, r)
    if state_t is uint16_t:
        if prs != NULL:
            cembed_row_round(state_fmt, stochastic, row_state, prs, 1, seed, step, row, CEMBED_STREAM_STATE_A)
    half_rows_round(w, weight_fmt, state_a, state_b, state_fmt, dim, scratch, stochastic, seed, step, row)
