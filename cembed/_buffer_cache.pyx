"""A small cache of large output buffers.

Kernel outputs of training-step size (tens of MB: looked-up rows, coalesced gradient values; MBs:
a batch's sorted order and segment starts) are
returned to the caller as NumPy arrays. Fresh memory of that size comes straight from mmap, so the
kernel that fills it pays for the operating system zeroing every page first — often a third of the
kernel's time. Arrays made by :func:`empty` own a ``Block``; when the last array using a block dies,
the block goes back to a short free list instead of to the system, and the next output of a similar
size reuses it: the steady state of a training loop allocates nothing new.

At most ``MAX_FREE`` blocks and ``cache_limit`` bytes are kept (when full, the blocks kept longest make
room for the one given back); :func:`release` frees them.
"""
import numpy as np

from cpython.buffer cimport PyBuffer_FillInfo
from libc.stdlib cimport free
from libc.string cimport memcpy

cdef extern from "stdlib.h" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from *:
    """
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Ask for transparent huge pages on a large block (as NumPy does for its own large arrays): a
       training step's outputs are hundreds of MB, and with 4 kB pages every 4 kB of them costs a TLB
       miss. Advice only: without THP (or off Linux) nothing changes. */
    static void cembed_advise_huge(void *ptr, size_t size)
    {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        (void)madvise(ptr, size, MADV_HUGEPAGE);
    #else
        (void)ptr; (void)size;
    #endif
    }
    """
    void cembed_advise_huge(void *ptr, size_t size) nogil

cdef enum:
    MAX_FREE = 16
    ALIGNMENT = 64
    HUGE_PAGE = 1 << 21           # blocks of HUGE_MIN_BYTES or more are aligned to this and advised
    HUGE_MIN_BYTES = 1 << 22
    MIN_BLOCK_BYTES = 1 << 18     # MIN_BYTES below

# Smaller outputs come from NumPy's allocator. Blocks of a few hundred kB and more are cached too: the
# allocator returns them to the system when they are freed (they are mmap'ed, or trimmed off the heap),
# so a training loop's per-step index arrays (sorted order, segment starts: MBs) would otherwise be
# page-faulted and zeroed afresh at every step.
MIN_BYTES = MIN_BLOCK_BYTES

cdef void *_free_ptr[MAX_FREE]
cdef size_t _free_size[MAX_FREE]
cdef int _n_free = 0
cdef size_t _cached = 0
cdef size_t _cache_limit = <size_t> 1 << 30


cdef void _remove(int i) noexcept nogil:
    """Drop entry i of the free list, keeping the others in the order they were given back."""
    global _n_free, _cached
    cdef int j
    _cached -= _free_size[i]
    for j in range(i, _n_free - 1):
        _free_ptr[j] = _free_ptr[j + 1]
        _free_size[j] = _free_size[j + 1]
    _n_free -= 1


cdef void _give_back(void *ptr, size_t size) noexcept nogil:
    """Keep the block for reuse; when the cache is full, the blocks kept longest are freed to make
    room (the blocks a loop gives back now are the ones it asks for next: stale sizes from earlier
    work must not hold the cache for good). Blocks below MIN_BLOCK_BYTES or above the limit are freed.
    Callers hold the GIL, which is what serialises every access to the free list."""
    global _n_free, _cached
    if size < MIN_BLOCK_BYTES or size > _cache_limit:
        free(ptr)
        return
    while _n_free > 0 and (_n_free >= MAX_FREE or _cached + size > _cache_limit):
        free(_free_ptr[0])
        _remove(0)
    _free_ptr[_n_free] = ptr
    _free_size[_n_free] = size
    _n_free += 1
    _cached += size


cdef void *_take(size_t size,      # IN  bytes wanted
                 size_t *got) noexcept nogil:   # OUT size of the block returned
    """The smallest cached block of at least ``size`` bytes (and at most twice that), or NULL.
    Callers hold the GIL (see _give_back)."""
    cdef int i, best = -1
    cdef void *ptr
    for i in range(_n_free):
        if size <= _free_size[i] <= 2 * size and (best < 0 or _free_size[i] < _free_size[best]):
            best = i
    if best < 0:
        return NULL
    ptr = _free_ptr[best]
    got[0] = _free_size[best]
    _remove(best)
    return ptr


cdef class Block:
    """Owner of one buffer; exports it through the buffer protocol: writable, or read-only for its
    whole life when made by :c:func:`frozen_block` (its contents are then written by C code through
    ``ptr`` before any array on it exists)."""

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ptr, <Py_ssize_t> self.size, self.readonly, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        if self.ptr != NULL:
            _give_back(self.ptr, self.size)
            self.ptr = NULL


cdef void *_allocate(size_t nbytes, size_t *got) except NULL:
    """A cached block of at least nbytes (large sizes only), else a new one, aligned for streaming
    stores (and huge pages when large)."""
    cdef void *ptr = _take(nbytes, got) if nbytes >= MIN_BLOCK_BYTES else NULL
    if ptr != NULL:
        return ptr
    if nbytes >= HUGE_MIN_BYTES:
        got[0] = (nbytes + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE
        if posix_memalign(&ptr, HUGE_PAGE, got[0]) != 0:
            raise MemoryError(f"cannot allocate {nbytes} bytes")
        cembed_advise_huge(ptr, got[0])
    else:
        got[0] = max(<size_t> ALIGNMENT, (nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)
        if posix_memalign(&ptr, ALIGNMENT, got[0]) != 0:
            raise MemoryError(f"cannot allocate {nbytes} bytes")
    return ptr


def empty(shape, dtype):
    """An uninitialised C-contiguous array like ``numpy.empty(shape, dtype)``, in a reusable block
    when it is large."""
    dtype = np.dtype(dtype)
    n_items = 1
    for extent in shape:
        n_items *= int(extent)
    cdef size_t nbytes = <size_t> (n_items * dtype.itemsize)
    if nbytes < MIN_BLOCK_BYTES:
        return np.empty(shape, dtype)
    cdef size_t got = 0
    cdef void *ptr = _allocate(nbytes, &got)
    cdef Block block = Block.__new__(Block)
    block.ptr = ptr
    block.size = got
    return np.frombuffer(block, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


cdef Block frozen_block(size_t nbytes):
    """A block of at least nbytes that exports only read-only buffers, from birth: the caller fills
    it through ``ptr`` (C code, before :func:`block_array` makes any array on it), and from then on
    nothing — no array, ``.base``, memoryview or the block itself — can write it. No writeable alias
    exists at any moment, not even for code run in between (a garbage-collector callback, say)."""
    cdef size_t got = 0
    cdef void *ptr = _allocate(nbytes, &got)
    cdef Block block = Block.__new__(Block)
    block.ptr = ptr
    block.size = got
    block.readonly = True
    return block


cdef object block_array(Block block, size_t nbytes, object dtype, object shape):
    """The read-only array of ``shape`` and ``dtype`` on the first nbytes of a frozen block."""
    return np.frombuffer(block, dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)


def frozen_copy(array):
    """A copy of ``array`` (any ndarray; subclasses are read as plain arrays) in a frozen block:
    read-only from birth, so nothing can ever make it writeable (``flags.writeable = True`` is refused,
    also through ``.base`` or the block)."""
    cdef object plain = np.ascontiguousarray(np.ndarray.view(array, np.ndarray))
    cdef size_t nbytes = <size_t> plain.nbytes
    cdef const unsigned char[::1] src
    cdef Block block = frozen_block(nbytes)
    if nbytes:
        src = plain.reshape(-1).view(np.uint8)
        if <size_t> src.shape[0] != nbytes:
            raise ValueError("frozen_copy: the array's buffer does not match its size")
        memcpy(block.ptr, &src[0], nbytes)
    return block_array(block, nbytes, plain.dtype, plain.shape)


def is_frozen(array):
    """Whether ``array``'s memory can never be written: a frozen block's or a ``bytes`` object's."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    return isinstance(base, bytes) or (type(base) is Block and (<Block> base).readonly)


def release():
    """Free every cached block; returns the number of bytes given back to the system."""
    global _n_free, _cached
    cdef size_t freed = _cached
    cdef int i
    for i in range(_n_free):
        free(_free_ptr[i])
    _n_free = 0
    _cached = 0
    return freed


def cached_bytes():
    return _cached


def set_cache_limit(size_t n_bytes):
    """At most this many bytes of free blocks are kept (0 disables the cache)."""
    global _cache_limit
    _cache_limit = n_bytes
    if _cached > _cache_limit:
        release()
