# The EmbeddingBag pooling routines of _bag_pooling.h as `cdef inline` functions over `floating`
# (and `index_t` for the whole-bag sum), each written once, so _bag.pyx never dispatches on
# float/double itself. Every function here is `noexcept nogil`.
from cython cimport floating
from libc.stdint cimport int32_t, int64_t, uint16_t

from cembed._typedefs cimport index_t

cdef extern from "_bag_pooling.h" nogil:
    void cembed_pool_sum_f32(float *acc, const float *const *rows, const float *scales, Py_ssize_t n,
                             Py_ssize_t dim, int fused)
    void cembed_pool_sum_f64(double *acc, const double *const *rows, const double *scales, Py_ssize_t n,
                             Py_ssize_t dim, int fused)
    void cembed_pool_max_f32(float *acc, int64_t *argmax, const float *const *rows, const int64_t *row_ids,
                             Py_ssize_t n, Py_ssize_t dim)
    void cembed_pool_max_f64(double *acc, int64_t *argmax, const double *const *rows, const int64_t *row_ids,
                             Py_ssize_t n, Py_ssize_t dim)
    Py_ssize_t cembed_bag_sum_f32_i32(float *out, const float *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int32_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_f32_i64(float *out, const float *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int64_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_f64_i32(double *out, const double *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int32_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_f64_i64(double *out, const double *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int64_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)

    # 16-bit tables (bit patterns; _half.h): rows widened to float32 as they are summed
    Py_ssize_t cembed_bag_sum_bf16_i32(float *out, const uint16_t *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                       const int32_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                       int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_bf16_i64(float *out, const uint16_t *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                       const int64_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                       int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_f16_i32(float *out, const uint16_t *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int32_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)
    Py_ssize_t cembed_bag_sum_f16_i64(float *out, const uint16_t *base, Py_ssize_t row_stride, Py_ssize_t dim,
                                      const int64_t *idx, Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                      int64_t padding_idx)


cdef inline Py_ssize_t bag_sum_half(int fmt,                    # TABLE_BF16 or TABLE_F16 (_rows.pxd)
                                    float *out,                 # OUT (dim,)
                                    const uint16_t *base,       # IN  the 16-bit table, rows row_stride apart
                                    Py_ssize_t row_stride, Py_ssize_t dim,
                                    const index_t *indices,     # IN  (n_indices,) row of each entry
                                    Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                                    int64_t padding_idx) noexcept nogil:
    """bag_sum on a 16-bit table: each row widened to float32 as it streams in, summed in float32 in the
    order (and vector blocks) bag_sum uses for the widened float32 table, so the result is bitwise that."""
    if fmt == 2:  # TABLE_BF16
        if index_t is int32_t:
            return cembed_bag_sum_bf16_i32(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        else:
            return cembed_bag_sum_bf16_i64(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
    else:
        if index_t is int32_t:
            return cembed_bag_sum_f16_i32(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        else:
            return cembed_bag_sum_f16_i64(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)


cdef inline Py_ssize_t bag_sum(floating *out,                  # OUT (dim,)
                               const floating *base,           # IN  the table, rows row_stride apart
                               Py_ssize_t row_stride, Py_ssize_t dim,
                               const index_t *indices,         # IN  (n_indices,) row of each entry
                               Py_ssize_t begin, Py_ssize_t end, Py_ssize_t n_indices,
                               int64_t padding_idx) noexcept nogil:
    """out = sum of the rows of entries [begin, end) that are not padding_idx, in bag order, in vector
    registers (prefetching ahead); returns the number of rows summed."""
    if floating is float:
        if index_t is int32_t:
            return cembed_bag_sum_f32_i32(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        else:
            return cembed_bag_sum_f32_i64(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
    else:
        if index_t is int32_t:
            return cembed_bag_sum_f64_i32(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)
        else:
            return cembed_bag_sum_f64_i64(out, base, row_stride, dim, indices, begin, end, n_indices, padding_idx)


cdef inline void pool_sum(floating *acc,                     # INOUT (dim,)
                          const floating *const *rows,       # IN    (n_group,) row pointers
                          const floating *scales,            # IN    (n_group,) per-row factors, or NULL
                          Py_ssize_t n_group, Py_ssize_t dim, bint fused) noexcept nogil:
    """acc += each row in order (times its scale, fused into one fma when `fused`)."""
    if floating is float:
        cembed_pool_sum_f32(acc, rows, scales, n_group, dim, fused)
    else:
        cembed_pool_sum_f64(acc, rows, scales, n_group, dim, fused)


cdef inline void pool_max(floating *acc,                     # INOUT (dim,)
                          int64_t *argmax,                   # INOUT (dim,) winning row id, or NULL
                          const floating *const *rows,       # IN    (n_group,) row pointers
                          const int64_t *row_ids,            # IN    (n_group,) their row ids
                          Py_ssize_t n_group, Py_ssize_t dim) noexcept nogil:
    """acc = elementwise max with each row in order (strictly greater replaces: first wins ties)."""
    if floating is float:
        cembed_pool_max_f32(acc, argmax, rows, row_ids, n_group, dim)
    else:
        cembed_pool_max_f64(acc, argmax, rows, row_ids, n_group, dim)
