# Shared type definitions for every kernel module.
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t

# Index arrays: exactly the two widths the façades hand to kernels (cython.integral is
# short/int/long, which is not the same set on every platform).
ctypedef fused index_t:
    int32_t
    int64_t

# Software prefetch of a row we will read soon (a no-op where the builtin is missing).
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

# How many rows ahead the row-gathering loops prefetch.
cdef enum:
    PREFETCH_DISTANCE = 16
