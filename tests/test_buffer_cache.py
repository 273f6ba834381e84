"""The output buffer cache: recycled blocks never alias live arrays, and results do not change."""
import gc

import numpy as np

import cembed
from cembed import _buffer_cache
from cembed import functional as F

from util import assert_bitwise_equal


def _address(a):
    return a.__array_interface__["data"][0]


def test_blocks_are_reused_only_after_their_arrays_die():
    cembed.release_memory()
    shape = (1 << 16, 32)                                  # 8 MiB of float32: pooled
    a = _buffer_cache.empty(shape, np.float32)
    b = _buffer_cache.empty(shape, np.float32)
    assert a.flags.c_contiguous and a.flags.writeable and a.shape == shape and a.dtype == np.float32
    assert _address(a) != _address(b) and _address(a) % 64 == 0
    a.fill(1.0)
    b.fill(2.0)
    address_a = _address(a)
    view = a[10:20]                                        # a view keeps the block alive
    del a
    gc.collect()
    c = _buffer_cache.empty(shape, np.float32)
    assert _address(c) != address_a
    c.fill(3.0)
    assert np.all(view == 1.0) and np.all(b == 2.0)
    del view
    gc.collect()
    assert _buffer_cache.cached_bytes() >= shape[0] * shape[1] * 4
    d = _buffer_cache.empty(shape, np.float32)
    assert _address(d) == address_a                        # recycled
    assert np.all(b == 2.0) and np.all(c == 3.0)
    small = _buffer_cache.empty((10, 3), np.float64)       # small outputs: plain NumPy arrays
    assert small.shape == (10, 3) and small.dtype == np.float64
    del b, c, d
    gc.collect()
    assert cembed.release_memory() > 0 and _buffer_cache.cached_bytes() == 0


def test_results_are_identical_with_recycled_outputs(rng):
    weight = rng.standard_normal((50_000, 64)).astype(np.float32)
    idx = rng.integers(0, 50_000, 40_000)
    first = F.embedding(idx, weight)
    kept = first.copy()
    for _ in range(3):                                     # later outputs may reuse dead blocks only
        again = F.embedding(idx, weight)
        assert_bitwise_equal(again, kept)
        assert_bitwise_equal(first, kept)
        del again
    g = rng.standard_normal((40_000, 64)).astype(np.float32)
    s1 = F.embedding_backward(g, idx, 50_000, sparse=True)
    v1 = s1.values.copy()
    s2 = F.embedding_backward(g, idx, 50_000, sparse=True)
    assert_bitwise_equal(s1.values, v1)
    assert_bitwise_equal(s2.values, v1)


def test_cache_limit():
    cembed.release_memory()
    _buffer_cache.set_cache_limit(0)
    try:
        a = _buffer_cache.empty((1 << 16, 32), np.float32)
        del a
        gc.collect()
        assert _buffer_cache.cached_bytes() == 0
    finally:
        _buffer_cache.set_cache_limit(1 << 30)


def test_frozen_copies_are_read_only_for_life():
    """frozen_copy: the same values in a block that exports only read-only buffers; nothing turns it
    writeable, and once its arrays are gone a large block is recycled as an ordinary writeable one."""
    cembed.release_memory()
    for source in (np.arange(10, dtype=np.int32), np.arange(1 << 16, dtype=np.int64)[::2],   # small; strided
                   np.arange(1 << 17, dtype=np.int64).reshape(-1, 4)):                      # 1 MiB: cached
        frozen = _buffer_cache.frozen_copy(source)
        assert_bitwise_equal(frozen, source)
        assert _buffer_cache.is_frozen(frozen) and _buffer_cache.is_frozen(frozen[1:])
        assert not frozen.flags.writeable
        owner = frozen
        while isinstance(owner, np.ndarray):
            owner = owner.base
        for attempt in (lambda: setattr(frozen.flags, "writeable", True),
                        lambda: np.frombuffer(owner.obj, dtype=np.uint8).__setitem__(0, 1),
                        lambda: memoryview(owner.obj).cast("B").__setitem__(0, 1)):
            try:
                attempt()
            except (ValueError, TypeError, BufferError):
                continue
            raise AssertionError("a frozen copy was written")
        source_copy = source.copy()
        source[...] = 0                       # the copy is its own
        assert_bitwise_equal(frozen, source_copy)
    assert not _buffer_cache.is_frozen(np.zeros(3)) and not _buffer_cache.is_frozen(_buffer_cache.empty((1 << 16,), np.int64))
    address = _address(frozen)
    del frozen, owner
    gc.collect()
    again = _buffer_cache.empty((1 << 17,), np.int64)
    assert _address(again) == address and again.flags.writeable   # recycled, writeable again
    again[:] = 7
    del again
    assert cembed.release_memory() > 0


def test_a_full_cache_makes_room_for_the_blocks_in_use():
    """A cache filled with blocks of sizes nobody asks for any more does not keep them for good: the
    blocks given back last are kept (the longest-kept are freed), so a loop's own blocks recycle."""
    cembed.release_memory()
    stale = [_buffer_cache.empty(((1 << 19) + 4096 * k,), np.uint8) for k in range(20)]   # 20 odd sizes
    del stale
    gc.collect()
    shape = (3 << 20,)                                    # a size no stale block fits (> twice theirs)
    first = _buffer_cache.empty(shape, np.uint8)
    address = _address(first)
    del first
    gc.collect()
    again = _buffer_cache.empty(shape, np.uint8)
    assert _address(again) == address                     # recycled although the cache was full
    del again
    assert cembed.release_memory() > 0 and _buffer_cache.cached_bytes() == 0
