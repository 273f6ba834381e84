# Row-level building blocks shared by the kernel modules, each written once:
#   - software prefetch of a whole row (read or write intent) and how far ahead the loops prefetch;
#   - the row stride of a table that only needs unit column stride;
#   - the row update routines of _row_update.h, as `cdef inline` functions over `floating`, so a
#     kernel calls row_add(out, v, dim) and never dispatches on float/double itself.
# Every function here is `noexcept nogil` and operates on `dim` contiguous elements per row.
from cython cimport floating
from libc.math cimport exp, pow, sqrt
from libc.stdint cimport int64_t, uint16_t, INT64_MAX

# Software prefetch of one cache line (a no-op where the builtin is missing).
cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define cembed_prefetch(p) __builtin_prefetch((const void *)(p), 0, 3)
    #define cembed_prefetch_w(p) __builtin_prefetch((const void *)(p), 1, 3)
    #else
    #define cembed_prefetch(p) ((void)0)
    #define cembed_prefetch_w(p) ((void)0)
    #endif
    """
    void cembed_prefetch(const void *p) noexcept nogil
    void cembed_prefetch_w(const void *p) noexcept nogil

cdef enum:
    PREFETCH_DISTANCE = 16   # how many rows (or entries) ahead the row loops prefetch
    CACHE_LINE_BYTES = 64

# Non-temporal (streaming) row stores, for large outputs that are written once and not read back soon:
# a plain store first reads the destination line into the cache (read for ownership), so writing an
# output larger than the caches moves its bytes twice; a streaming store writes the line without
# reading it. x86-64 (SSE2, part of the baseline) only; elsewhere, or for a destination that is not
# 16-byte aligned or a length that is not a multiple of 16 bytes, a plain memcpy. Each thread that
# streamed calls cembed_stream_fence() before its results are read by another thread.
cdef extern from *:
    """
    #include <string.h>
    #include <stdint.h>
    #if defined(__x86_64__) || defined(_M_X64)
    #include <emmintrin.h>
    #define CEMBED_HAVE_STREAM 1
    #else
    #define CEMBED_HAVE_STREAM 0
    #endif
    /* 1 when rows of n_bytes starting at dst can be streamed (n_rows rows, any row stride multiple of 16) */
    static inline __attribute__((unused)) int cembed_can_stream(const void *dst, Py_ssize_t row_stride_bytes,
                                                                Py_ssize_t n_bytes)
    {
        return CEMBED_HAVE_STREAM && ((uintptr_t)dst % 16 == 0) && (row_stride_bytes % 16 == 0) && (n_bytes % 16 == 0);
    }
    static inline __attribute__((unused)) void cembed_stream_copy(void *dst, const void *src, Py_ssize_t n_bytes)
    {
    #if CEMBED_HAVE_STREAM
        __m128i *d = (__m128i *)dst;
        const __m128i *s = (const __m128i *)src;
        Py_ssize_t k = 0, n = n_bytes / 16;
        for (; k + 4 <= n; k += 4) {
            __m128i a = _mm_loadu_si128(s + k), b = _mm_loadu_si128(s + k + 1);
            __m128i c = _mm_loadu_si128(s + k + 2), e = _mm_loadu_si128(s + k + 3);
            _mm_stream_si128(d + k, a); _mm_stream_si128(d + k + 1, b);
            _mm_stream_si128(d + k + 2, c); _mm_stream_si128(d + k + 3, e);
        }
        for (; k < n; k++) _mm_stream_si128(d + k, _mm_loadu_si128(s + k));
    #else
        memcpy(dst, src, (size_t)n_bytes);
    #endif
    }
    /* out[0:dim] = float32 of the bfloat16 bit patterns row[0:dim], streamed (cembed_can_stream holds
     * for out; exact: a bfloat16 is the top half of its float32) */
    static inline __attribute__((unused)) void cembed_bf16_row_to_f32_stream(float *out, const uint16_t *row,
                                                                            Py_ssize_t dim)
    {
    #if CEMBED_HAVE_STREAM
        const __m128i zero = _mm_setzero_si128();
        __m128i *d = (__m128i *)out;
        Py_ssize_t j = 0;
        for (; j + 8 <= dim; j += 8) {
            __m128i x = _mm_loadu_si128((const __m128i *)(row + j));
            _mm_stream_si128(d + j / 4, _mm_unpacklo_epi16(zero, x));
            _mm_stream_si128(d + j / 4 + 1, _mm_unpackhi_epi16(zero, x));
        }
        if (j + 4 <= dim) {
            _mm_stream_si128(d + j / 4, _mm_unpacklo_epi16(zero, _mm_loadl_epi64((const __m128i *)(row + j))));
            j += 4;
        }
        for (; j < dim; j++) { uint32_t u = (uint32_t)row[j] << 16; memcpy(out + j, &u, 4); }
    #else
        for (Py_ssize_t j = 0; j < dim; j++) { uint32_t u = (uint32_t)row[j] << 16; memcpy(out + j, &u, 4); }
    #endif
    }
    static inline __attribute__((unused)) void cembed_stream_fence(void)
    {
    #if CEMBED_HAVE_STREAM
        _mm_sfence();
    #endif
    }
    """
    bint cembed_can_stream(const void *dst, Py_ssize_t row_stride_bytes, Py_ssize_t n_bytes) noexcept nogil
    void cembed_stream_copy(void *dst, const void *src, Py_ssize_t n_bytes) noexcept nogil
    void cembed_bf16_row_to_f32_stream(float *out, const uint16_t *row, Py_ssize_t dim) noexcept nogil
    void cembed_stream_fence() noexcept nogil

cdef enum:
    STREAM_MIN_BYTES = 16 << 20   # outputs at least this large are written with streaming stores
    STREAM_CHUNK = 256            # columns widened per streamed piece (a 1 kB float32 stack buffer)


cdef inline void prefetch_row(const void *row, Py_ssize_t n_bytes) noexcept nogil:
    """Prefetch every cache line of a row we will read soon."""
    cdef const char *p = <const char *> row
    cdef Py_ssize_t k = 0
    while k < n_bytes:
        cembed_prefetch(p + k)
        k += CACHE_LINE_BYTES


cdef inline void prefetch_row_for_write(const void *row, Py_ssize_t n_bytes) noexcept nogil:
    """Prefetch every cache line of a row we will read and then write soon."""
    cdef const char *p = <const char *> row
    cdef Py_ssize_t k = 0
    while k < n_bytes:
        cembed_prefetch_w(p + k)
        k += CACHE_LINE_BYTES


cdef inline bint row_stride_items(Py_ssize_t *row_stride,      # OUT distance between rows, in elements
                                  Py_ssize_t n_rows, Py_ssize_t dim, Py_ssize_t row_stride_bytes,
                                  Py_ssize_t column_stride_bytes, Py_ssize_t itemsize) noexcept nogil:
    """For an (n_rows, dim) table: False when the elements of a row are not adjacent or the rows are
    not a whole number of elements apart; else True, with the row stride in elements (any value, even
    negative). Strides of length-1 axes are never used, so never checked."""
    row_stride[0] = 0
    if dim > 1 and column_stride_bytes != itemsize:
        return False
    if n_rows <= 1:
        return True
    if row_stride_bytes % itemsize != 0:
        return False
    row_stride[0] = row_stride_bytes // itemsize
    return True


cdef extern from "_row_update.h" nogil:
    void cembed_add_f32(float *out, const float *v, Py_ssize_t dim)
    void cembed_add_f64(double *out, const double *v, Py_ssize_t dim)
    void cembed_add_product_f32(float *out, const float *x, const float *y, Py_ssize_t dim)
    void cembed_add_product_f64(double *out, const double *x, const double *y, Py_ssize_t dim)
    void cembed_axpy_f32(float *out, const float *v, float scale, Py_ssize_t dim)
    void cembed_axpy_f64(double *out, const double *v, double scale, Py_ssize_t dim)
    void cembed_fma_accumulate_f32(float *out, const float *v, float scale, float inv, Py_ssize_t dim)
    void cembed_fma_accumulate_f64(double *out, const double *v, double scale, double inv, Py_ssize_t dim)
    void cembed_axpy_fma_f32(float *w, const float *g, float alpha, float sign, Py_ssize_t dim)
    void cembed_axpy_fma_f64(double *w, const double *g, double alpha, double sign, Py_ssize_t dim)
    void cembed_adagrad_row_f32(float *w, float *h, const float *grad, float neg_clr, float eps,
                                float sign, Py_ssize_t dim)
    void cembed_adagrad_row_f64(double *w, double *h, const double *grad, double neg_clr, double eps,
                                double sign, Py_ssize_t dim)
    void cembed_adam_row_f32(float *w, float *m, float *v, const float *grad, float one_minus_beta1,
                             float one_minus_beta2, float eps, float neg_step, float sign, Py_ssize_t dim)
    void cembed_adam_row_f64(double *w, double *m, double *v, const double *grad, double one_minus_beta1,
                             double one_minus_beta2, double eps, double neg_step, double sign, Py_ssize_t dim)
    void cembed_rowwise_adagrad_row_f32(float *w, float *state, const float *grad, float sign, float lr, float eps,
                                        float weight_decay, int mode, Py_ssize_t dim)
    void cembed_rowwise_adagrad_row_f64(double *w, double *state, const double *grad, double sign, double lr,
                                        double eps, double weight_decay, int mode, Py_ssize_t dim)
    void cembed_add_bf16(float *out, const uint16_t *v, Py_ssize_t dim)
    void cembed_add_f16(float *out, const uint16_t *v, Py_ssize_t dim)
    void cembed_axpy_bf16(float *out, const uint16_t *v, float scale, Py_ssize_t dim)
    void cembed_axpy_f16(float *out, const uint16_t *v, float scale, Py_ssize_t dim)
    void cembed_fma_accumulate_bf16(float *out, const uint16_t *v, float scale, float inv, Py_ssize_t dim)
    void cembed_fma_accumulate_f16(float *out, const uint16_t *v, float scale, float inv, Py_ssize_t dim)


cdef inline void row_add(floating *out,            # INOUT (dim,)
                         const floating *v,        # IN    (dim,)
                         Py_ssize_t dim) noexcept nogil:
    """out = out + v."""
    if floating is float:
        cembed_add_f32(out, v, dim)
    else:
        cembed_add_f64(out, v, dim)


cdef inline void row_axpy(floating *out,           # INOUT (dim,)
                          const floating *v,       # IN    (dim,)
                          floating scale, Py_ssize_t dim) noexcept nogil:
    """out = out + scale * v (two roundings, like torch's unfused paths)."""
    if floating is float:
        cembed_axpy_f32(out, v, scale, dim)
    else:
        cembed_axpy_f64(out, v, scale, dim)


cdef inline void row_fma_accumulate(floating *out,         # INOUT (dim,)
                                    const floating *v,     # IN    (dim,)
                                    floating scale, floating inv, Py_ssize_t dim) noexcept nogil:
    """out = fma(scale * v, inv, out) (scale_grad_by_freq accumulation)."""
    if floating is float:
        cembed_fma_accumulate_f32(out, v, scale, inv, dim)
    else:
        cembed_fma_accumulate_f64(out, v, scale, inv, dim)


cdef inline void row_add_product(floating *out,       # INOUT (dim,)
                                 const floating *x,   # IN    (dim,)
                                 const floating *y,   # IN    (dim,)
                                 Py_ssize_t dim) noexcept nogil:
    """out = fma(x, y, out) (one rounding per element)."""
    if floating is float:
        cembed_add_product_f32(out, x, y, dim)
    else:
        cembed_add_product_f64(out, x, y, dim)


cdef inline void row_axpy_fma(floating *w,         # INOUT (dim,) weight row
                              const floating *g,   # IN    (dim,) gradient row
                              floating alpha, floating sign, Py_ssize_t dim) noexcept nogil:
    """w = fma(alpha, sign * g, w) (SGD)."""
    if floating is float:
        cembed_axpy_fma_f32(w, g, alpha, sign, dim)
    else:
        cembed_axpy_fma_f64(w, g, alpha, sign, dim)


cdef inline void adagrad_row(floating *w,          # INOUT (dim,) weight row
                             floating *state_sum,  # INOUT (dim,) sum of squared gradients
                             const floating *grad, # IN    (dim,)
                             floating neg_clr, floating eps, floating sign, Py_ssize_t dim) noexcept nogil:
    """g = sign * grad; state_sum += g*g; w = fma(neg_clr, g / (sqrt(state_sum) + eps), w)."""
    if floating is float:
        cembed_adagrad_row_f32(w, state_sum, grad, neg_clr, eps, sign, dim)
    else:
        cembed_adagrad_row_f64(w, state_sum, grad, neg_clr, eps, sign, dim)


cdef inline void rowwise_adagrad_row(floating *w,           # INOUT (dim,) weight row
                                     floating *state,       # INOUT (1,) the row's accumulator
                                     const floating *grad,  # IN    (dim,)
                                     floating sign, floating lr, floating eps, floating weight_decay,
                                     int mode, Py_ssize_t dim) noexcept nogil:
    """Row-wise Adagrad (FBGEMM's EXACT_ROWWISE_ADAGRAD, docs/behaviour.md §8.6); mode 0 no weight
    decay, 1 L2, 2 decoupled."""
    if floating is float:
        cembed_rowwise_adagrad_row_f32(w, state, grad, sign, lr, eps, weight_decay, mode, dim)
    else:
        cembed_rowwise_adagrad_row_f64(w, state, grad, sign, lr, eps, weight_decay, mode, dim)


cdef inline void adam_row(floating *w,             # INOUT (dim,) weight row
                          floating *exp_avg,       # INOUT (dim,)
                          floating *exp_avg_sq,    # INOUT (dim,)
                          const floating *grad,    # IN    (dim,)
                          floating one_minus_beta1, floating one_minus_beta2, floating eps,
                          floating neg_step_size, floating sign, Py_ssize_t dim) noexcept nogil:
    """torch's SparseAdam on one row (docs/behaviour.md §8.2), in the weight dtype."""
    if floating is float:
        cembed_adam_row_f32(w, exp_avg, exp_avg_sq, grad, one_minus_beta1, one_minus_beta2, eps,
                            neg_step_size, sign, dim)
    else:
        cembed_adam_row_f64(w, exp_avg, exp_avg_sq, grad, one_minus_beta1, one_minus_beta2, eps,
                            neg_step_size, sign, dim)


# ---- SparseAdamW and per-row bias correction (docs/behaviour.md §8.5) ----------------------------
cdef extern from "_row_update.h" nogil:
    void cembed_adamw_row_f32(float *w, float *m, float *v, const float *grad, float decay, float lerp_weight,
                              float beta2, float one_minus_beta2, float bc2_sqrt, float eps, float neg_step,
                              float sign, Py_ssize_t dim)
    void cembed_adamw_row_f64(double *w, double *m, double *v, const double *grad, double decay,
                              double lerp_weight, double beta2, double one_minus_beta2, double bc2_sqrt,
                              double eps, double neg_step, double sign, Py_ssize_t dim)
    void cembed_scale_f32(float *w, float scale, Py_ssize_t dim)
    void cembed_scale_f64(double *w, double scale, Py_ssize_t dim)


cdef inline void adamw_row(floating *w,            # INOUT (dim,) weight row
                           floating *exp_avg,      # INOUT (dim,)
                           floating *exp_avg_sq,   # INOUT (dim,)
                           const floating *grad,   # IN    (dim,)
                           floating decay, floating lerp_weight, floating beta2, floating one_minus_beta2,
                           floating bc2_sqrt, floating eps, floating neg_step_size, floating sign,
                           Py_ssize_t dim) noexcept nogil:
    """The row's pending weight decay, then torch's AdamW update of one row (docs/behaviour.md §8.5)."""
    if floating is float:
        cembed_adamw_row_f32(w, exp_avg, exp_avg_sq, grad, decay, lerp_weight, beta2, one_minus_beta2,
                             bc2_sqrt, eps, neg_step_size, sign, dim)
    else:
        cembed_adamw_row_f64(w, exp_avg, exp_avg_sq, grad, decay, lerp_weight, beta2, one_minus_beta2,
                             bc2_sqrt, eps, neg_step_size, sign, dim)


cdef inline void row_scale(floating *w,            # INOUT (dim,)
                           floating scale, Py_ssize_t dim) noexcept nogil:
    """w = w * scale."""
    if floating is float:
        cembed_scale_f32(w, scale, dim)
    else:
        cembed_scale_f64(w, scale, dim)


# The row updates a kernel can apply to one weight row and its state, given the row's summed gradient
# (the optimizer kernels of _optim, the fused backward of _grad and the fused scoring of _score share this
# one dispatch):
cdef enum:
    ROW_SGD = 0               # w = fma(q0, sign * g, w)                                      q0 = -lr
    ROW_ADAGRAD = 1           # state_a: sum; q0 = -clr, q1 = eps
    ROW_ADAM = 2              # state_a, state_b: exp_avg, exp_avg_sq; q0 = 1-b1, q1 = 1-b2, q2 = eps, q3 = -step
    ROW_ROWWISE_ADAGRAD = 3   # row_state: the row's one accumulator; q0 = lr, q1 = eps, q2 = weight_decay, mode
    ROW_ADAM_ROW_BIAS = 4     # SparseAdam, bias_correction="row": state_a, state_b; rule.counts; q0 = 1-b1,
    #                           q1 = 1-b2, q2 = eps; rule.lr, beta1, beta2 (the step size from the row's count)
    ROW_ADAMW = 5             # SparseAdamW: state_a, state_b; rule.row_log (and rule.counts for the per-row bias
    #                           correction); q0 = 1-b1, q1 = 1-b2, q2 = eps, q3 = b2; every scalar of rule
    ROW_RULE_PARAMS = 8       # the doubles of row_rule_t after its two arrays


# SparseAdamW and per-row bias correction (docs/behaviour.md §8.5). Per parameter the optimizer keeps the
# running float64 log-sum of the weight-decay factors, L_t = sum_{u<=t} log1p(-lr_u * weight_decay), and per
# row the value L_s of the row's last update. A row's pending decay is exp(L_t - L_s), or the step's own
# factor (1 - lr_t * weight_decay) when the row was last brought up to date one step ago (L_s == L_{t-1}).
# Every row reads and writes only its own entries, so the rows may come in any number of calls (the fused
# backward) with the same bits.
ctypedef struct row_rule_t:
    double *row_log           # (n_rows,) SparseAdamW's L_s of each row's last update, or NULL
    int64_t *counts           # (n_rows,) each row's update count (per-row bias correction), or NULL
    double lr, beta1, beta2
    double decay_log          # L_t
    double decay_log_prev     # L_{t-1}
    double decay_last         # 1 - lr_t * weight_decay
    double step_size          # lr / (1 - beta1**t): the global bias correction's
    double bc2_sqrt           # (1 - beta2**t) ** 0.5
    bint has_params           # whether the scalars were given (the per-row kinds need them)


cdef inline int set_row_rule(row_rule_t *rule,                  # OUT
                             double[::1] row_log,               # IN  (n_rows,) or (0,)
                             int64_t[::1] counts,               # IN  (n_rows,) or (0,)
                             const double[::1] params,          # IN  (ROW_RULE_PARAMS,) or (0,): lr .. bc2_sqrt
                             Py_ssize_t n_rows, str kernel) except -1:
    """Fill `rule` from a kernel's arguments (ValueError for arrays of the wrong length)."""
    if row_log.shape[0] not in (0, n_rows) or counts.shape[0] not in (0, n_rows):
        raise ValueError(f"{kernel}: the per-row rule arrays must have one entry per table row")
    if params.shape[0] not in (0, ROW_RULE_PARAMS):
        raise ValueError(f"{kernel}: the rule parameters must be {ROW_RULE_PARAMS} values or none")
    rule.row_log = &row_log[0] if row_log.shape[0] > 0 else NULL
    rule.counts = &counts[0] if counts.shape[0] > 0 else NULL
    rule.has_params = params.shape[0] > 0
    if params.shape[0] == 0:
        rule.lr = rule.beta1 = rule.beta2 = rule.decay_log = rule.decay_log_prev = rule.decay_last = 0
        rule.step_size = rule.bc2_sqrt = 0
    else:
        rule.lr, rule.beta1, rule.beta2 = params[0], params[1], params[2]
        rule.decay_log, rule.decay_log_prev, rule.decay_last = params[3], params[4], params[5]
        rule.step_size, rule.bc2_sqrt = params[6], params[7]
    return 0


cdef inline int check_state_shapes(str kernel, Py_ssize_t n_rows, Py_ssize_t dim,
                                   Py_ssize_t a_rows, Py_ssize_t a_cols,     # state_a: (n_rows, dim) or empty
                                   Py_ssize_t b_rows, Py_ssize_t b_cols,     # state_b: (n_rows, dim) or empty
                                   Py_ssize_t row_state_rows) except -1:     # row_state: (n_rows,) or empty
    """An update kernel's last guard on the optimizer state it was handed, with the GIL held in the call
    that then uses it (ValueError otherwise). The optimizers check every state array against the weight
    before a step; this closes the gap between that check and the kernel, in which code of another
    Python thread (a ``load_state_dict``, a state edited by hand) could put arrays of another table in
    the state."""
    if ((a_rows != 0 and (a_rows != n_rows or a_cols != dim))
            or (b_rows != 0 and (b_rows != n_rows or b_cols != dim))
            or (row_state_rows != 0 and row_state_rows != n_rows)):
        raise ValueError(f"{kernel}: the optimizer state does not have the weight's shape ({n_rows}, {dim}) (it was "
                         "replaced after the step checked it: by another thread?)")
    return 0


cdef inline void prefetch_rule_entries(const row_rule_t *rule, Py_ssize_t r) noexcept nogil:
    """Prefetch, for writing, row r's entries of the rule's per-row arrays (if it has any)."""
    if rule.row_log != NULL:
        cembed_prefetch_w(rule.row_log + r)
    if rule.counts != NULL:
        cembed_prefetch_w(rule.counts + r)


cdef inline double pending_decay(double row_log,         # IN L_s of the row
                                 double decay_log,       # IN L_t
                                 double decay_log_prev,  # IN L_{t-1}
                                 double decay_last) noexcept nogil:  # IN 1 - lr_t * weight_decay
    """The factor that brings a row last updated at L_s up to L_t."""
    if row_log == decay_log_prev:
        return decay_last
    return exp(decay_log - row_log)


cdef inline int64_t count_update(int64_t *count) noexcept nogil:  # INOUT one row's update count
    """count += 1 (saturating, so a hostile count cannot overflow); returns the new count."""
    cdef int64_t n = count[0]
    if n < INT64_MAX:
        n += 1
    count[0] = n
    return n


cdef inline double row_bias_step_size(int64_t *count,   # INOUT the row's update count
                                      double lr, double beta1, double beta2) noexcept nogil:
    """SparseAdam's step size for a row by its own update count n (incremented first): the expression
    (and bits) SparseAdam evaluates for the parameter's step counter."""
    cdef int64_t n = count_update(count)
    return lr * sqrt(1 - pow(beta2, <double> n)) / (1 - pow(beta1, <double> n))


cdef inline double adamw_row_scalars(const row_rule_t *rule, Py_ssize_t r,
                                     double *row_step_size, double *row_bc2_sqrt) noexcept nogil:   # OUT
    """Row r's pending decay factor (returned; its L_s set to L_t), its step size and sqrt(bias
    correction 2): from its own count (incremented first) when the rule has counts, else the
    parameter's."""
    cdef double decay = pending_decay(rule.row_log[r], rule.decay_log, rule.decay_log_prev, rule.decay_last)
    cdef int64_t n
    rule.row_log[r] = rule.decay_log
    if rule.counts != NULL:
        n = count_update(rule.counts + r)
        row_step_size[0] = rule.lr / (1 - pow(rule.beta1, <double> n))
        row_bc2_sqrt[0] = pow(1 - pow(rule.beta2, <double> n), 0.5)
    else:
        row_step_size[0] = rule.step_size
        row_bc2_sqrt[0] = rule.bc2_sqrt
    return decay


cdef inline bint row_update_has_state(int kind, bint has_a, bint has_b, bint has_row_state,
                                      const row_rule_t *rule) noexcept nogil:
    """Whether `kind` is a ROW_* update and the state it needs is there (state_a for Adagrad, state_a
    and state_b for the Adams, row_state for row-wise Adagrad, the rule's counts / row_log and its
    scalars for the per-row kinds)."""
    if kind == ROW_SGD:
        return True
    if kind == ROW_ADAGRAD:
        return has_a
    if kind == ROW_ADAM:
        return has_a and has_b
    if kind == ROW_ROWWISE_ADAGRAD:
        return has_row_state
    if kind == ROW_ADAM_ROW_BIAS:
        return has_a and has_b and rule.counts != NULL and rule.has_params
    if kind == ROW_ADAMW:
        return has_a and has_b and rule.row_log != NULL and rule.has_params
    return False


cdef inline void apply_row_update(int kind,
                                  floating *w,                # INOUT (dim,) weight row
                                  floating *state_a,          # INOUT (dim,) or NULL
                                  floating *state_b,          # INOUT (dim,) or NULL
                                  floating *row_state,        # INOUT (1,) or NULL
                                  const floating *grad,       # IN    (dim,) the row's summed gradient
                                  floating q0, floating q1, floating q2, floating q3, int mode, floating sign,
                                  Py_ssize_t dim,
                                  const row_rule_t *rule,     # INOUT the per-row kinds' arrays and scalars
                                  Py_ssize_t r) noexcept nogil:   # the table row (rule's arrays' index)
    """One row's update of kind ROW_*, by the row routines above."""
    cdef double step, bc2_sqrt, decay
    if kind == ROW_SGD:
        row_axpy_fma(w, grad, q0, sign, dim)
    elif kind == ROW_ADAGRAD:
        adagrad_row(w, state_a, grad, q0, q1, sign, dim)
    elif kind == ROW_ADAM:
        adam_row(w, state_a, state_b, grad, q0, q1, q2, q3, sign, dim)
    elif kind == ROW_ROWWISE_ADAGRAD:
        rowwise_adagrad_row(w, row_state, grad, sign, q0, q1, q2, mode, dim)
    elif kind == ROW_ADAM_ROW_BIAS:
        step = row_bias_step_size(rule.counts + r, rule.lr, rule.beta1, rule.beta2)
        adam_row(w, state_a, state_b, grad, q0, q1, q2, <floating> (-step), sign, dim)
    else:
        decay = adamw_row_scalars(rule, r, &step, &bc2_sqrt)
        adamw_row(w, state_a, state_b, grad, <floating> decay, q0, q3, q1, <floating> bc2_sqrt, q2, <floating> (-step),
                  sign, dim)


# ---- 16-bit tables (bfloat16, float16): _half.h ----------------------------------------------------
# A 16-bit table reaches a kernel as its uint16 bit patterns (Cython memoryviews know no bfloat16 or
# float16) plus one of the format codes below (cembed._dtypes.kernel_format gives the code of a dtype).
# Kernels widen a row to float32, compute in float32 and round each element once (to nearest, ties to
# even) when they write a 16-bit row.
from libc.stdint cimport uint16_t

cdef extern from "_half.h" nogil:
    enum:
        CEMBED_TABLE_F32
        CEMBED_TABLE_F64
        CEMBED_TABLE_BF16
        CEMBED_TABLE_F16
    float cembed_bf16_to_f32(uint16_t h)
    uint16_t cembed_f32_to_bf16_rne(float x)
    float cembed_f16_to_f32(uint16_t h)
    uint16_t cembed_f32_to_f16_rne(float x)
    void cembed_bf16_row_to_f32(float *out, const uint16_t *row, Py_ssize_t dim)
    void cembed_f16_row_to_f32(float *out, const uint16_t *row, Py_ssize_t dim)
    void cembed_f32_row_to_bf16_rne(uint16_t *row, const float *v, Py_ssize_t dim)
    void cembed_f32_row_to_f16_rne(uint16_t *row, const float *v, Py_ssize_t dim)
    void cembed_half_row_to_f32(int fmt, float *out, const uint16_t *row, Py_ssize_t dim)
    void cembed_f32_row_to_half_rne(int fmt, uint16_t *row, const float *v, Py_ssize_t dim)

cdef enum:
    TABLE_F32 = CEMBED_TABLE_F32     # float32 table (floating kernels)
    TABLE_F64 = CEMBED_TABLE_F64     # float64 table (floating kernels)
    TABLE_BF16 = CEMBED_TABLE_BF16   # bfloat16 bit patterns (uint16)
    TABLE_F16 = CEMBED_TABLE_F16     # IEEE float16 bit patterns (uint16)


# The same three accumulations for a 16-bit gradient row `v` of format `fmt` (TABLE_BF16 or TABLE_F16)
# into a float32 row: bitwise what widening `v` first and calling row_add / row_axpy /
# row_fma_accumulate give.
cdef inline void row_add_half(float *out, const uint16_t *v, int fmt, Py_ssize_t dim) noexcept nogil:
    """out = out + widen(v)."""
    if fmt == TABLE_BF16:
        cembed_add_bf16(out, v, dim)
    else:
        cembed_add_f16(out, v, dim)


cdef inline void row_axpy_half(float *out, const uint16_t *v, int fmt, float scale, Py_ssize_t dim) noexcept nogil:
    """out = out + scale * widen(v)."""
    if fmt == TABLE_BF16:
        cembed_axpy_bf16(out, v, scale, dim)
    else:
        cembed_axpy_f16(out, v, scale, dim)


cdef inline void row_fma_accumulate_half(float *out, const uint16_t *v, int fmt, float scale, float inv,
                                         Py_ssize_t dim) noexcept nogil:
    """out = fma(scale * widen(v), inv, out)."""
    if fmt == TABLE_BF16:
        cembed_fma_accumulate_bf16(out, v, scale, inv, dim)
    else:
        cembed_fma_accumulate_f16(out, v, scale, inv, dim)


cdef inline float half_to_f32(int fmt, uint16_t h) noexcept nogil:
    """One 16-bit element of format fmt (TABLE_BF16 / TABLE_F16) as float32 (exact)."""
    if fmt == TABLE_BF16:
        return cembed_bf16_to_f32(h)
    return cembed_f16_to_f32(h)


cdef inline uint16_t f32_to_half_rne(int fmt, float x) noexcept nogil:
    """x rounded to nearest (ties to even) in format fmt (TABLE_BF16 / TABLE_F16)."""
    if fmt == TABLE_BF16:
        return cembed_f32_to_bf16_rne(x)
    return cembed_f32_to_f16_rne(x)


cdef inline const float *load_row_f32(int fmt,               # TABLE_F32, TABLE_BF16 or TABLE_F16
                                      const void *row,       # IN  (dim,) elements of format fmt
                                      float *buf,            # OUT (dim,) scratch, used for 16-bit rows
                                      Py_ssize_t dim) noexcept nogil:
    """The row as float32: the row itself for TABLE_F32, else widened into buf (returns buf)."""
    if fmt == TABLE_F32:
        return <const float *> row
    cembed_half_row_to_f32(fmt, buf, <const uint16_t *> row, dim)
    return buf


cdef inline void store_row_f32_rne(int fmt,                  # TABLE_F32, TABLE_BF16 or TABLE_F16
                                   void *row,                # OUT (dim,) elements of format fmt
                                   const float *v,           # IN  (dim,) float32 values
                                   Py_ssize_t dim) noexcept nogil:
    """row[:] = v, each element rounded once to nearest (ties to even) for a 16-bit row; v may be the
    row itself only when fmt is TABLE_F32."""
    cdef Py_ssize_t j
    if fmt == TABLE_F32:
        if <const void *> v != <const void *> row:
            for j in range(dim):
                (<float *> row)[j] = v[j]
        return
    cembed_f32_row_to_half_rne(fmt, <uint16_t *> row, v, dim)
