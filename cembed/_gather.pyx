"""Row gather: the embedding lookup (indices are range-checked by cembed._checks first); 16-bit tables
widened to float32 on the fly, and float32 rows rounded to a 16-bit format."""
from cython.parallel cimport prange, parallel
from cython cimport floating
from libc.string cimport memcpy
from libc.stdint cimport uint16_t

from cembed._typedefs cimport index_t
from cembed._rows cimport (prefetch_row, row_stride_items, PREFETCH_DISTANCE, TABLE_F32, TABLE_F64, TABLE_BF16,
                           TABLE_F16, cembed_half_row_to_f32, cembed_f32_row_to_half_rne, cembed_can_stream,
                           cembed_stream_copy, cembed_stream_fence, cembed_bf16_row_to_f32_stream, STREAM_MIN_BYTES, STREAM_CHUNK)

# the kernel format codes of _rows.pxd / _half.h, for tests to check cembed._dtypes against
TABLE_FORMATS = {"float32": TABLE_F32, "float64": TABLE_F64, "bfloat16": TABLE_BF16, "float16": TABLE_F16}

ctypedef fused row_t:   # an element copied as is: float32, float64, or a 16-bit table's bit pattern
    float
    double
    uint16_t


def gather_rows(const row_t[:, :] weight,       # IN  (n_rows, dim), unit column stride
                const index_t[::1] indices,      # IN  (n_indices,), validated to lie in [0, n_rows)
                row_t[:, ::1] out,               # OUT (n_indices, dim)
                int n_threads):
    """out[i, :] = weight[indices[i], :], parallel over i, prefetching rows PREFETCH_DISTANCE ahead.
    Row offsets are computed in Py_ssize_t, so tables with n_rows * dim > 2**31 work. A 16-bit table
    (uint16 bit patterns) is copied as is: the result has the table's format. An output of at least
    STREAM_MIN_BYTES is written with streaming stores (_rows.pxd): it is larger than the caches, so
    reading its lines in before overwriting them would only double the bytes moved."""
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t i
    cdef Py_ssize_t row_bytes = dim * sizeof(row_t)
    cdef Py_ssize_t row_stride
    cdef const row_t *base
    cdef bint stream
    if n_indices == 0 or dim == 0:
        return
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(row_t)):
        raise ValueError("gather_rows: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    stream = n_indices * row_bytes >= STREAM_MIN_BYTES and cembed_can_stream(&out[0, 0], out.strides[0], row_bytes)
    with nogil, parallel(num_threads=n_threads):
        for i in prange(n_indices, schedule="static"):
            if i + PREFETCH_DISTANCE < n_indices:
                prefetch_row(base + (<Py_ssize_t> indices[i + PREFETCH_DISTANCE]) * row_stride, row_bytes)
            if stream:
                cembed_stream_copy(&out[i, 0], base + (<Py_ssize_t> indices[i]) * row_stride, row_bytes)
            else:
                memcpy(&out[i, 0], base + (<Py_ssize_t> indices[i]) * row_stride, row_bytes)
        if stream:
            cembed_stream_fence()


cdef void _widen_row_streamed(int fmt, float *out,            # OUT (dim,), 16-byte aligned, dim % 4 == 0
                              const uint16_t *row,             # IN  (dim,) 16-bit bit patterns
                              Py_ssize_t dim) noexcept nogil:
    """out = float32(row), widened STREAM_CHUNK columns at a time into a stack buffer and streamed out."""
    cdef float buf[STREAM_CHUNK]
    cdef Py_ssize_t j = 0, n
    if fmt == TABLE_BF16:
        cembed_bf16_row_to_f32_stream(out, row, dim)
        return
    while j < dim:
        n = dim - j if dim - j < STREAM_CHUNK else STREAM_CHUNK
        cembed_half_row_to_f32(fmt, buf, row + j, n)
        cembed_stream_copy(out + j, buf, n * sizeof(float))
        j += n


def gather_rows_widen(const uint16_t[:, :] weight,   # IN  (n_rows, dim) 16-bit bit patterns, unit column stride
                      int fmt,                        # TABLE_BF16 or TABLE_F16
                      const index_t[::1] indices,     # IN  (n_indices,), validated to lie in [0, n_rows)
                      float[:, ::1] out,              # OUT (n_indices, dim) float32
                      int n_threads):
    """out[i, :] = float32(weight[indices[i], :]) for a bfloat16 / float16 table: exact widening, half
    the bytes read of a float32 gather. Parallel over i, prefetching and (for a large output) streaming
    as gather_rows does."""
    cdef Py_ssize_t n_indices = indices.shape[0]
    cdef Py_ssize_t dim = weight.shape[1]
    cdef Py_ssize_t i
    cdef Py_ssize_t row_bytes = dim * sizeof(uint16_t)
    cdef Py_ssize_t row_stride
    cdef const uint16_t *base
    cdef bint stream
    if n_indices == 0 or dim == 0:
        return
    if fmt != TABLE_BF16 and fmt != TABLE_F16:
        raise ValueError(f"gather_rows_widen: fmt must be TABLE_BF16 or TABLE_F16, got {fmt}")
    if not row_stride_items(&row_stride, weight.shape[0], dim, weight.strides[0], weight.strides[1],
                            sizeof(uint16_t)):
        raise ValueError("gather_rows_widen: the weight's rows must be contiguous (unit column stride)")
    base = &weight[0, 0]
    stream = (n_indices * dim * <Py_ssize_t> sizeof(float) >= STREAM_MIN_BYTES
              and cembed_can_stream(&out[0, 0], out.strides[0], dim * sizeof(float)))
    with nogil, parallel(num_threads=n_threads):
        for i in prange(n_indices, schedule="static"):
            if i + PREFETCH_DISTANCE < n_indices:
                prefetch_row(base + (<Py_ssize_t> indices[i + PREFETCH_DISTANCE]) * row_stride, row_bytes)
            if stream:
                _widen_row_streamed(fmt, &out[i, 0], base + (<Py_ssize_t> indices[i]) * row_stride, dim)
            else:
                cembed_half_row_to_f32(fmt, &out[i, 0], base + (<Py_ssize_t> indices[i]) * row_stride, dim)
        if stream:
            cembed_stream_fence()


def narrow_rows(const float[:, ::1] src,        # IN  (n, dim) float32
                int fmt,                         # TABLE_BF16 or TABLE_F16
                uint16_t[:, ::1] out,            # OUT (n, dim) bit patterns of format fmt
                int n_threads):
    """out = src rounded to nearest (ties to even) in a 16-bit format, element by element (a 16-bit
    `out_dtype` of a float32 result). Parallel over rows; each element is written once."""
    cdef Py_ssize_t n = src.shape[0]
    cdef Py_ssize_t dim = src.shape[1]
    cdef Py_ssize_t i
    if n == 0 or dim == 0:
        return
    if fmt != TABLE_BF16 and fmt != TABLE_F16:
        raise ValueError(f"narrow_rows: fmt must be TABLE_BF16 or TABLE_F16, got {fmt}")
    with nogil:
        for i in prange(n, schedule="static", num_threads=n_threads):
            cembed_f32_row_to_half_rne(fmt, &out[i, 0], &src[i, 0], dim)
