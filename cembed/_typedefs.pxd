# Shared type definitions for every kernel module (values use cython.floating: float32 / float64).
from libc.stdint cimport int32_t, int64_t

# Index arrays: exactly the two widths the façades hand to kernels (cython.integral is
# short/int/long, which is not the same set on every platform).
ctypedef fused index_t:
    int32_t
    int64_t
