# Declarations shared with the kernels that write straight into read-only blocks (_sort.sort_rows).

cdef class Block:
    cdef void *ptr
    cdef size_t size
    cdef bint readonly

cdef Block frozen_block(size_t nbytes)
cdef object block_array(Block block, size_t nbytes, object dtype, object shape)
