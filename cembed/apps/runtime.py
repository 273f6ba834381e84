"""Process-wide settings the applications touch, and how they put them back.

Library-style entry points (``train.train``, ``bench.run``) change thread counts only inside
``thread_settings`` and leave them as they found them. Tuning the C allocator is for the process owner
only (``cli.main``): ``reuse_large_allocations``.
"""
import contextlib
import ctypes

import cembed


@contextlib.contextmanager
def thread_settings(threads=None, torch=None):
    """Inside: cembed uses ``threads`` threads (None: leave its setting alone) and, when the ``torch``
    module is given, torch uses the same number as cembed. On exit both are restored: cembed's user
    override (or its absence, so the default keeps following OMP_NUM_THREADS / threadpoolctl) and
    torch's intra-op thread count. Yields the thread count in effect."""
    torch_previous = torch.get_num_threads() if torch is not None else None
    previous = cembed.set_num_threads(None)        # returns the setting it replaces
    try:
        cembed.set_num_threads(threads if threads else previous)
        if torch is not None:
            torch.set_num_threads(cembed.get_num_threads())
        yield cembed.get_num_threads()
    finally:
        cembed.set_num_threads(previous)
        if torch is not None:
            torch.set_num_threads(torch_previous)


def reuse_large_allocations():
    """Let freed large arrays be reused instead of page-faulted anew (glibc only; for the process owner).

    glibc serves allocations above its mmap threshold (which adapts up to 32 MB) with fresh mmap'ed
    pages, so each of the ~50 MB per-step temporaries of a training step (looked-up rows, their
    gradients) would be zero-filled by the kernel page by page, every step. Raising the threshold (and
    the trim threshold) keeps that memory in the heap for the next step. This changes the allocator of
    the whole process for good (there is no way to read the old values back), which is why only
    ``cli.main``, the owner of the process, calls it, never ``train()``. A no-op where the C library
    has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 1 << 30)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError, TypeError):
        pass


def openmp_enabled():
    """Whether cembed's kernels were built with OpenMP."""
    info = cembed.show_config(mode="dicts")
    assert info is not None  # mode="dicts" always returns the dict
    return bool(info["openmp"])
