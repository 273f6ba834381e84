"""Fused row-sparse optimizer steps.

Each kernel makes one pass over the rows of a coalesced gradient: it reads the weight row, its state
rows and the gradient row once and writes the weight and state once. Rows are split statically across
threads (one writer per row, so any thread count gives the same bits); rows a gradient does not name
are never read or written. Upcoming rows are prefetched, since they are scattered over the table.
"""
from cython.parallel cimport prange
from cython cimport floating
from libc.stdint cimport int64_t

from cembed._typedefs cimport cembed_prefetch, cembed_prefetch_w, PREFETCH_DISTANCE

cdef extern from "_row_update.h" nogil:
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

cdef enum:
    ROWS_PER_CHUNK = 64


cdef inline void _prefetch_row(const void *row, Py_ssize_t n_bytes, bint for_write) noexcept nogil:
    cdef const char *p = <const char *> row
    cdef Py_ssize_t k
    for k in range(0, n_bytes, 64):
        if for_write:
            cembed_prefetch_w(p + k)
        else:
            cembed_prefetch(p + k)


cdef inline void _prefetch_ahead(const int64_t *rows, Py_ssize_t k, Py_ssize_t n, Py_ssize_t dim,
                                 floating *a, floating *b, floating *c) noexcept nogil:
    """Prefetch (for writing) the row PREFETCH_DISTANCE positions ahead in tables a, b, c (b, c may be NULL)."""
    cdef Py_ssize_t r
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    if k + PREFETCH_DISTANCE >= n:
        return
    r = rows[k + PREFETCH_DISTANCE]
    _prefetch_row(a + r * dim, row_bytes, True)
    if b != NULL:
        _prefetch_row(b + r * dim, row_bytes, True)
    if c != NULL:
        _prefetch_row(c + r * dim, row_bytes, True)


cdef inline void _adam_row(floating *w, floating *m, floating *v, const floating *grad, Py_ssize_t dim,
                           floating one_minus_beta1, floating one_minus_beta2, floating eps,
                           floating neg_step_size, floating sign) noexcept nogil:
    """torch's SparseAdam on one row (SPEC_torch §8.2), in the weight dtype (vectorised C routine)."""
    if floating is float:
        cembed_adam_row_f32(w, m, v, grad, one_minus_beta1, one_minus_beta2, eps, neg_step_size, sign, dim)
    else:
        cembed_adam_row_f64(w, m, v, grad, one_minus_beta1, one_minus_beta2, eps, neg_step_size, sign, dim)


def sparse_adam_rows(floating[:, ::1] weight,        # INOUT (n_rows, dim)
                     floating[:, ::1] exp_avg,       # INOUT (n_rows, dim)
                     floating[:, ::1] exp_avg_sq,    # INOUT (n_rows, dim)
                     const int64_t[::1] rows,        # IN    (nnz,) distinct rows of the gradient
                     const floating[:, ::1] grad,    # IN    (nnz, dim) their gradient
                     double beta1, double beta2, double eps, double step_size, bint maximize,
                     int n_threads):
    """The lazy Adam update of the rows named by the gradient; every other row is untouched."""
    cdef Py_ssize_t nnz = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r
    cdef floating omb1 = <floating> (1.0 - beta1)
    cdef floating omb2 = <floating> (1.0 - beta2)
    cdef floating eps_ = <floating> eps
    cdef floating neg_step = <floating> (-step_size)
    cdef floating sign = -1 if maximize else 1
    if nnz == 0 or dim == 0:
        return
    with nogil:
        for k in prange(nnz, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            _prefetch_ahead(&rows[0], k, nnz, dim, &weight[0, 0], &exp_avg[0, 0], &exp_avg_sq[0, 0])
            r = rows[k]
            _adam_row(&weight[r, 0], &exp_avg[r, 0], &exp_avg_sq[r, 0], &grad[k, 0], dim,
                      omb1, omb2, eps_, neg_step, sign)


def adagrad_rows(floating[:, ::1] weight,            # INOUT (n_rows, dim)
                 floating[:, ::1] state_sum,         # INOUT (n_rows, dim)
                 const int64_t[::1] rows,            # IN    (nnz,) distinct rows of the gradient
                 const floating[:, ::1] grad,        # IN    (nnz, dim)
                 double clr, double eps, bint maximize, int n_threads):
    """Adagrad on the named rows: sum += g*g; w = fma(-clr, g / (sqrt(sum) + eps), w)."""
    cdef Py_ssize_t nnz = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r
    if nnz == 0 or dim == 0:
        return
    with nogil:
        for k in prange(nnz, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            _prefetch_ahead(&rows[0], k, nnz, dim, &weight[0, 0], &state_sum[0, 0], NULL)
            r = rows[k]
            if floating is float:
                cembed_adagrad_row_f32(&weight[r, 0], &state_sum[r, 0], &grad[k, 0], <float> (-clr),
                                       <float> eps, -1.0 if maximize else 1.0, dim)
            else:
                cembed_adagrad_row_f64(&weight[r, 0], &state_sum[r, 0], &grad[k, 0], -clr,
                                       eps, -1.0 if maximize else 1.0, dim)


def sgd_rows(floating[:, ::1] weight,                # INOUT (n_rows, dim)
             const int64_t[::1] rows,                # IN    (nnz,) distinct rows of the gradient
             const floating[:, ::1] grad,            # IN    (nnz, dim)
             double lr, bint maximize, int n_threads):
    """Plain SGD on the named rows: w = fma(-lr, g, w)."""
    cdef Py_ssize_t nnz = rows.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, r
    if nnz == 0 or dim == 0:
        return
    with nogil:
        for k in prange(nnz, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            _prefetch_ahead(&rows[0], k, nnz, dim, &weight[0, 0], NULL, NULL)
            r = rows[k]
            if floating is float:
                cembed_axpy_fma_f32(&weight[r, 0], &grad[k, 0], <float> (-lr), -1.0 if maximize else 1.0, dim)
            else:
                cembed_axpy_fma_f64(&weight[r, 0], &grad[k, 0], -lr, -1.0 if maximize else 1.0, dim)


def sgd_momentum_rows(floating[:, ::1] weight,       # INOUT (n_rows, dim)
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
    cdef Py_ssize_t k, r, s, j
    cdef floating mu = <floating> momentum
    cdef floating one_minus_damp = <floating> (1.0 - dampening)
    cdef floating neg_lr = <floating> (-lr)
    cdef floating sign = -1 if maximize else 1
    cdef floating g, b, d
    if n_active == 0 or dim == 0:
        return
    with nogil:
        for k in prange(n_active, schedule="static", chunksize=ROWS_PER_CHUNK, num_threads=n_threads):
            _prefetch_ahead(&rows[0], k, n_active, dim, &weight[0, 0], &buf[0, 0], NULL)
            r = rows[k]
            s = grad_slot[k]
            for j in range(dim):
                g = sign * grad[s, j] if s >= 0 else 0
                if first_step:
                    b = g
                else:
                    b = mu * buf[r, j] + one_minus_damp * g
                buf[r, j] = b
                d = g + mu * b if nesterov else b
                weight[r, j] = weight[r, j] + neg_lr * d
