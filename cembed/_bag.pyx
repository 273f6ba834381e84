"""EmbeddingBag kernels: pooled lookup (sum / mean / max, per-sample weights, padding) and the parts
of its backward that are not a plain segment sum (max-mode routing, per-sample-weight gradient).

Bags are given in CSR form: bag b holds the entries offsets[b] .. offsets[b+1]-1. The forward is
parallel over bags with a guided schedule (large chunks first, then small ones: bag sizes can be
skewed); each bag accumulates in bag order in the weight dtype, so results do not depend on the
thread count.

A 16-bit table (bfloat16 / float16, handed over as its uint16 bit patterns and a format code) is pooled
by the *_half kernels: each row is widened to float32 as it is read and the bag is pooled in float32,
exactly as the float32 kernels pool the widened table (same order, same vector blocks), so the result
is bitwise that of the float32 computation on the upcast table.
"""
from cython.parallel cimport prange, parallel, threadid
from cython cimport floating
from libc.string cimport memset
from libc.stdlib cimport malloc, free
from libc.stdint cimport int64_t, uint16_t

from cembed._typedefs cimport index_t
from cembed._rows cimport (prefetch_row, row_stride_items, PREFETCH_DISTANCE, TABLE_BF16, TABLE_F16,
                           cembed_half_row_to_f32, half_to_f32)
from cembed._bag_pooling cimport bag_sum, bag_sum_half, pool_sum, pool_max


cdef enum:
    MODE_SUM = 0
    MODE_MEAN = 1
    MODE_MAX = 2
    BAGS_PER_CHUNK = 16
    GROUP_ROWS = 64
    COLUMNS_PER_BLOCK = 16


cdef void _pool_bag(const floating *base, Py_ssize_t row_stride, Py_ssize_t dim,
                    const index_t *indices, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                    int mode, int64_t padding_idx, const floating *psw, bint psw_fused,
                    floating *out_row, int64_t *argmax_row) noexcept nogil:
    """Pool entries [begin, end) into out_row (and, for max, the winning row per coordinate).
    Non-padding rows are handed to the pooling routine in groups of up to GROUP_ROWS pointers."""
    cdef const floating *rows[GROUP_ROWS]
    cdef floating scales[GROUP_ROWS]
    cdef int64_t row_ids[GROUP_ROWS]
    cdef Py_ssize_t k, j, ahead, n_group = 0
    cdef Py_ssize_t row_bytes = dim * sizeof(floating)
    cdef int64_t r
    cdef Py_ssize_t count = 0
    cdef floating c
    if mode != MODE_MAX and psw == NULL:  # the common case: one register-accumulating pass per bag
        count = bag_sum(out_row, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        if mode == MODE_MEAN and count > 1:
            c = <floating> count
            for j in range(dim):
                out_row[j] = out_row[j] / c
        return
    memset(out_row, 0, row_bytes)
    if argmax_row != NULL:
        for j in range(dim):
            argmax_row[j] = -1
    for k in range(begin, end + 1):
        if k < end:
            ahead = k + PREFETCH_DISTANCE
            if ahead < n_indices:
                prefetch_row(base + (<Py_ssize_t> indices[ahead]) * row_stride, row_bytes)
            r = indices[k]
            if r == padding_idx:
                continue
            if mode == MODE_MAX and count == 0:
                # the first row initialises the maximum (so a leading NaN survives)
                for j in range(dim):
                    out_row[j] = (base + r * row_stride)[j]
                if argmax_row != NULL:
                    for j in range(dim):
                        argmax_row[j] = r
                count = 1
                continue
            rows[n_group] = base + r * row_stride
            row_ids[n_group] = r
            if psw != NULL:
                scales[n_group] = psw[k]
            n_group += 1
            count += 1
            if n_group < GROUP_ROWS:
                continue
        if n_group == 0:
            continue
        if mode == MODE_MAX:
            pool_max(out_row, argmax_row, rows, row_ids, n_group, dim)
        else:
            pool_sum(out_row, rows, scales if psw != NULL else NULL, n_group, dim, psw_fused)
        n_group = 0
    if mode == MODE_MEAN and count > 1:
        c = <floating> count
        for j in range(dim):
            out_row[j] = out_row[j] / c


def bag_forward(const floating[:, :] weight,       # IN  (n_rows, dim), unit column stride
                const index_t[::1] indices,         # IN  (n_indices,) validated
                const int64_t[::1] offsets,         # IN  (n_bags + 1,) CSR bag boundaries
                int mode, int64_t padding_idx,      # padding_idx < 0: none
                const floating[::1] psw,            # IN  (n_indices,) per-sample weights, or empty
                bint psw_fused,
                floating[:, ::1] out,               # OUT (n_bags, dim)
                int64_t[:, ::1] argmax,             # OUT (n_bags, dim) for max mode, else (0, 0)
                int n_threads):
    """out[b] = the pooled (sum / mean / max) rows of bag b, padding entries skipped; an empty bag
    gives zeros (argmax -1). Parallel over bags; each bag is pooled in bag order by one thread."""
    cdef Py_ssize_t n_bags = out.shape[0]
    cdef Py_ssize_t dim = out.shape[1]
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t b, row_stride
    cdef const floating *base
    cdef const floating *psw_ptr = &psw[0] if psw.shape[0] > 0 else NULL
    cdef const index_t *idx_ptr = &indices[0] if n_indices > 0 else NULL
    cdef bint want_argmax = argmax.shape[0] > 0
    if n_bags == 0 or dim == 0:
        return
    if n_indices == 0 or weight.shape[0] == 0:
        out[:, :] = 0
        if want_argmax:
            argmax[:, :] = -1
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("bag_forward: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    with nogil:
        for b in prange(n_bags, schedule="guided", chunksize=BAGS_PER_CHUNK, num_threads=n_threads):
            _pool_bag(base, row_stride, dim, idx_ptr, offsets[b], offsets[b + 1], n_indices, mode,
                      padding_idx, psw_ptr, psw_fused, &out[b, 0],
                      &argmax[b, 0] if want_argmax else NULL)


def max_backward(const floating[:, ::1] grad_output,  # IN  (n_bags, dim)
                 const int64_t[:, ::1] argmax,         # IN  (n_bags, dim) winning row, -1 for none
                 floating[:, ::1] grad_weight,         # INOUT (n_rows, dim), zero-filled by the caller
                 int n_threads):
    """grad_weight[argmax[b, d], d] += grad_output[b, d], bags in order. Threads own blocks of
    COLUMNS_PER_BLOCK columns, so every element has one writer and the order is fixed."""
    cdef Py_ssize_t n_bags = grad_output.shape[0]
    cdef Py_ssize_t dim = grad_output.shape[1]
    cdef Py_ssize_t n_blocks = (dim + COLUMNS_PER_BLOCK - 1) // COLUMNS_PER_BLOCK
    cdef Py_ssize_t blk, b, d, d_end
    cdef int64_t r
    if n_bags == 0 or dim == 0:
        return
    with nogil:
        for blk in prange(n_blocks, schedule="static", chunksize=1, num_threads=n_threads):
            d_end = (blk + 1) * COLUMNS_PER_BLOCK
            if d_end > dim:
                d_end = dim
            for b in range(n_bags):
                for d in range(blk * COLUMNS_PER_BLOCK, d_end):
                    r = argmax[b, d]
                    if r >= 0:
                        grad_weight[r, d] = grad_weight[r, d] + grad_output[b, d]


def psw_backward(const floating[:, :] weight,        # IN  (n_rows, dim), unit column stride
                 const index_t[::1] indices,          # IN  (n_indices,)
                 const int64_t[::1] bag_of,           # IN  (n_indices,) bag of each entry
                 const floating[:, ::1] grad_output,  # IN  (n_bags, dim)
                 int64_t padding_idx,
                 floating[::1] grad_psw,              # OUT (n_indices,)
                 int n_threads):
    """grad_psw[k] = dot(grad_output[bag_of[k]], weight[indices[k]]), 0 for padding entries."""
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, j, row_stride
    cdef const floating *base
    cdef const floating *w
    cdef floating acc
    cdef int64_t r
    if bag_of.shape[0] != n_indices or grad_psw.shape[0] != n_indices or grad_output.shape[1] != dim:
        raise ValueError("psw_backward: bag_of and grad_psw need one entry per index, grad_output the weight's dim")
    if n_indices == 0:
        return
    if dim == 0 or weight.shape[0] == 0:
        grad_psw[:] = 0
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(floating)):
        raise ValueError("psw_backward: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    with nogil:
        for k in prange(n_indices, schedule="static", num_threads=n_threads):
            r = indices[k]
            acc = 0
            if r != padding_idx:
                w = base + r * row_stride
                for j in range(dim):
                    acc = acc + grad_output[bag_of[k], j] * w[j]
            grad_psw[k] = acc


cdef void _pool_bag_half(int fmt, const uint16_t *base, Py_ssize_t row_stride, Py_ssize_t dim,
                         const index_t *indices, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                         int mode, int64_t padding_idx, const float *psw, bint psw_fused,
                         float *scratch, float *out_row, int64_t *argmax_row) noexcept nogil:
    """_pool_bag for a 16-bit table: the unscaled sum/mean widens rows in vector registers; the scaled
    sum and max widen each row of a group into `scratch` (GROUP_ROWS * dim floats, the thread's own)
    and pool the float32 copies with the float32 routines."""
    cdef const float *rows[GROUP_ROWS]
    cdef float scales[GROUP_ROWS]
    cdef int64_t row_ids[GROUP_ROWS]
    cdef Py_ssize_t k, j, ahead, n_group = 0
    cdef Py_ssize_t row_bytes = dim * sizeof(uint16_t)
    cdef int64_t r
    cdef Py_ssize_t count = 0
    cdef float c
    if mode != MODE_MAX and psw == NULL:
        count = bag_sum_half(fmt, out_row, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        if mode == MODE_MEAN and count > 1:
            c = <float> count
            for j in range(dim):
                out_row[j] = out_row[j] / c
        return
    memset(out_row, 0, dim * sizeof(float))
    if argmax_row != NULL:
        for j in range(dim):
            argmax_row[j] = -1
    for k in range(begin, end + 1):
        if k < end:
            ahead = k + PREFETCH_DISTANCE
            if ahead < n_indices:
                prefetch_row(base + (<Py_ssize_t> indices[ahead]) * row_stride, row_bytes)
            r = indices[k]
            if r == padding_idx:
                continue
            if mode == MODE_MAX and count == 0:
                cembed_half_row_to_f32(fmt, out_row, base + r * row_stride, dim)
                if argmax_row != NULL:
                    for j in range(dim):
                        argmax_row[j] = r
                count = 1
                continue
            cembed_half_row_to_f32(fmt, scratch + n_group * dim, base + r * row_stride, dim)
            rows[n_group] = scratch + n_group * dim
            row_ids[n_group] = r
            if psw != NULL:
                scales[n_group] = psw[k]
            n_group += 1
            count += 1
            if n_group < GROUP_ROWS:
                continue
        if n_group == 0:
            continue
        if mode == MODE_MAX:
            pool_max(out_row, argmax_row, rows, row_ids, n_group, dim)
        else:
            pool_sum(out_row, rows, scales if psw != NULL else NULL, n_group, dim, psw_fused)
        n_group = 0
    if mode == MODE_MEAN and count > 1:
        c = <float> count
        for j in range(dim):
            out_row[j] = out_row[j] / c


def bag_forward_half(const uint16_t[:, :] weight,    # IN  (n_rows, dim) 16-bit bit patterns, unit column stride
                     int fmt,                         # TABLE_BF16 or TABLE_F16
                     const index_t[::1] indices,      # IN  (n_indices,) validated
                     const int64_t[::1] offsets,      # IN  (n_bags + 1,) CSR bag boundaries
                     int mode, int64_t padding_idx,   # padding_idx < 0: none
                     const float[::1] psw,            # IN  (n_indices,) per-sample weights, or empty
                     bint psw_fused,
                     float[:, ::1] out,               # OUT (n_bags, dim) float32
                     int64_t[:, ::1] argmax,          # OUT (n_bags, dim) for max mode, else (0, 0)
                     int n_threads):
    """bag_forward for a bfloat16 / float16 table, pooling in float32 into a float32 `out`: bitwise
    bag_forward on the table widened to float32. Parallel over bags (guided), one bag per thread."""
    cdef Py_ssize_t n_bags = out.shape[0]
    cdef Py_ssize_t dim = out.shape[1]
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t b, row_stride
    cdef const uint16_t *base
    cdef const float *psw_ptr = &psw[0] if psw.shape[0] > 0 else NULL
    cdef const index_t *idx_ptr = &indices[0] if n_indices > 0 else NULL
    cdef bint want_argmax = argmax.shape[0] > 0
    cdef bint need_scratch = mode == MODE_MAX or psw_ptr != NULL
    cdef float *scratch_all = NULL
    cdef float *scratch = NULL
    if n_bags == 0 or dim == 0:
        return
    if n_indices == 0 or weight.shape[0] == 0:
        out[:, :] = 0
        if want_argmax:
            argmax[:, :] = -1
        return
    if fmt != TABLE_BF16 and fmt != TABLE_F16:
        raise ValueError(f"bag_forward_half: fmt must be TABLE_BF16 or TABLE_F16, got {fmt}")
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError("bag_forward_half: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    if n_threads < 1:
        n_threads = 1
    if need_scratch:  # GROUP_ROWS widened rows per thread
        scratch_all = <float *> malloc(n_threads * GROUP_ROWS * dim * sizeof(float))
        if scratch_all == NULL:
            raise MemoryError("bag_forward_half: no memory for the per-thread scratch rows")
    try:
        with nogil, parallel(num_threads=n_threads):
            scratch = scratch_all + threadid() * GROUP_ROWS * dim if need_scratch else NULL
            for b in prange(n_bags, schedule="guided", chunksize=BAGS_PER_CHUNK):
                _pool_bag_half(fmt, base, row_stride, dim, idx_ptr, offsets[b], offsets[b + 1], n_indices, mode,
                               padding_idx, psw_ptr, psw_fused, scratch, &out[b, 0],
                               &argmax[b, 0] if want_argmax else NULL)
    finally:
        free(scratch_all)


def psw_backward_half(const uint16_t[:, :] weight,    # IN  (n_rows, dim) 16-bit bit patterns, unit column stride
                      int fmt,                         # TABLE_BF16 or TABLE_F16
                      const index_t[::1] indices,      # IN  (n_indices,)
                      const int64_t[::1] bag_of,       # IN  (n_indices,) bag of each entry
                      const float[:, ::1] grad_output, # IN  (n_bags, dim) float32
                      int64_t padding_idx,
                      float[::1] grad_psw,             # OUT (n_indices,) float32
                      int n_threads):
    """psw_backward for a 16-bit table: the dot product in float32 with each weight element widened,
    in the order psw_backward uses (bitwise its result on the widened table)."""
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t k, j, row_stride
    cdef const uint16_t *base
    cdef const uint16_t *w
    cdef float acc
    cdef int64_t r
    if bag_of.shape[0] != n_indices or grad_psw.shape[0] != n_indices or grad_output.shape[1] != dim:
        raise ValueError("psw_backward_half: bag_of and grad_psw need one entry per index, grad_output the "
                         "weight's dim")
    if n_indices == 0:
        return
    if dim == 0 or weight.shape[0] == 0:
        grad_psw[:] = 0
        return
    if fmt != TABLE_BF16 and fmt != TABLE_F16:
        raise ValueError(f"psw_backward_half: fmt must be TABLE_BF16 or TABLE_F16, got {fmt}")
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError("psw_backward_half: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    with nogil:
        for k in prange(n_indices, schedule="static", num_threads=n_threads):
            r = indices[k]
            acc = 0
            if r != padding_idx:
                w = base + r * row_stride
                for j in range(dim):
                    acc = acc + grad_output[bag_of[k], j] * half_to_f32(fmt, w[j])
            grad_psw[k] = acc
