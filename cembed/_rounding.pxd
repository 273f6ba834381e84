# Reproducible rounding of float32 rows into 16-bit rows (_rounding.h, docs/behaviour.md §8.7), and the
# one half-precision row update shared by the optimizer kernels (_optim) and the fused backward (_grad):
# widen the weight row (and 16-bit state rows) to float32, apply the float32 row update of _rows.pxd,
# round every element once.
from libc.stdint cimport uint16_t, uint64_t

from cembed._rows cimport apply_row_update, ROW_ADAM

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
                                 bint stochastic, uint64_t seed, uint64_t step, uint64_t row) noexcept nogil:
    """apply_row_update(kind) on row `row` of a 16-bit weight in float32: the weight (and 16-bit state)
    widened exactly, the float32 row rule, each element rounded once (weight stream 0, state_a and
    row_state stream 1, state_b stream 2)."""
    cdef float *sw = scratch
    cdef float *sa
    cdef float *sb
    cdef float rs = 0
    cdef float *prs = NULL
    if state_t is uint16_t:
        if kind == ROW_ADAM and weight_fmt == CEMBED_TABLE_BF16 and state_fmt == CEMBED_TABLE_BF16:
            # the common bfloat16 case, fused in one pass (same bits)
            cembed_adam_row_bf16(w, state_a, state_b, grad, q0, q1, q2, q3, sign, dim, stochastic, seed, step, row)
            return
    cembed_half_row_to_f32(weight_fmt, sw, w, dim)
    if state_t is float:
        apply_row_update(kind, sw, state_a, state_b, row_state, grad, q0, q1, q2, q3, mode, sign, dim)
    else:
        sa = scratch + dim if state_a != NULL else NULL
        sb = scratch + 2 * dim if state_b != NULL else NULL
        if sa != NULL:
            cembed_half_row_to_f32(state_fmt, sa, state_a, dim)
        if sb != NULL:
            cembed_half_row_to_f32(state_fmt, sb, state_b, dim)
        if row_state != NULL:
            cembed_half_row_to_f32(state_fmt, &rs, row_state, 1)
            prs = &rs
        apply_row_update(kind, sw, sa, sb, prs, grad, q0, q1, q2, q3, mode, sign, dim)
        if sa != NULL:
            cembed_row_round(state_fmt, stochastic, state_a, sa, dim, seed, step, row, CEMBED_STREAM_STATE_A)
        if sb != NULL:
            cembed_row_round(state_fmt, stochastic, state_b, sb, dim, seed, step, row, CEMBED_STREAM_STATE_B)
        if prs != NULL:
            cembed_row_round(state_fmt, stochastic, row_state, prs, 1, seed, step, row, CEMBED_STREAM_STATE_A)
    cembed_row_round(weight_fmt, stochastic, w, sw, dim, seed, step, row, CEMBED_STREAM_WEIGHT)
