"""Thread-count control and build information."""
import operator
import sys

import numpy as np

from . import _threads

try:  # written by setup.py at build time
    from . import _build_config
except ImportError:  # pragma: no cover - only in a broken checkout
    _build_config = None

_user_threads = None


def set_num_threads(n=None):
    """Use ``n`` threads in every cembed kernel; ``None`` restores the default, which follows
    ``OMP_NUM_THREADS`` and ``threadpoolctl.threadpool_limits(..., user_api="openmp")`` at each call."""
    global _user_threads
    if n is None:
        _user_threads = None
        return
    if isinstance(n, bool):
        raise TypeError("set_num_threads: n must be an int >= 1 or None, got a bool")
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"set_num_threads: n must be an int >= 1 or None, got {type(n).__name__}") from None
    if n < 1:
        raise ValueError(f"set_num_threads: n must be >= 1, got {n}")
    _user_threads = n


def get_num_threads():
    """The number of threads the next kernel call may use (resolved now)."""
    if _user_threads is not None:
        return _user_threads
    return max(1, _threads.max_threads())


def n_threads_for(n_items, grain=1024):
    """Threads for a loop over ``n_items`` units of work: never more than one per ``grain`` items.
    Results never depend on this number; it only avoids waking threads for tiny calls."""
    return max(1, min(get_num_threads(), int(n_items) // grain))


def release_memory():
    """Free the cached output buffers (see cembed._buffer_cache); returns the number of bytes freed.
    Large kernel outputs (looked-up rows, gradient values) are recycled when the arrays holding them
    die, so a training loop stops allocating after its first step; this gives that memory back."""
    from . import _buffer_cache

    return _buffer_cache.release()


def openmp_enabled():
    return _threads.openmp_enabled()


def show_config(file=None):
    """Print the version, whether OpenMP is enabled, the thread count and the compile flags."""
    from . import __version__

    file = sys.stdout if file is None else file
    omp = _threads.openmp_enabled()
    lines = [
        f"cembed {__version__}",
        f"NumPy {np.__version__}, Python {sys.version.split()[0]}",
        "OpenMP: " + (f"enabled (_OPENMP {_threads.openmp_version()})" if omp else "disabled (serial kernels)"),
        f"threads: {get_num_threads()}" + (" (set_num_threads)" if _user_threads is not None else " (default)"),
    ]
    if _build_config is not None:
        lines += [
            f"compiler: {_build_config.COMPILER} ({_build_config.COMPILER_TYPE})",
            f"compile flags: {' '.join(_build_config.COMPILE_ARGS)}",
            f"link flags: {' '.join(_build_config.LINK_ARGS)}",
            f"bounds checking: {'on' if _build_config.BOUNDSCHECK else 'off'}",
        ]
    from . import _buffer_cache

    lines.append(f"output buffer cache: {_buffer_cache.cached_bytes() / 2**20:.1f} MiB held (cembed.release_memory() frees it)")
    print("\n".join(lines), file=file)
