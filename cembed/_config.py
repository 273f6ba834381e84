"""Threads (how many, per call, and after ``fork``), the thread grains of every kernel, build info."""
from __future__ import annotations

import os
import re
import sys
import warnings
from typing import Any, Dict, List, Optional, TextIO

import numpy as np

from . import _threads
from ._validation import check_int

try:  # written by setup.py at build time
    from . import _build_config as _build_info
except ImportError:  # pragma: no cover - only in a broken checkout
    _build_info = None  # type: ignore[assignment]

#: Upper bound of :func:`set_num_threads`: more threads than this is a mistake, not a setting.
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))

#: Work items per thread below which a kernel does not wake another thread, per kernel family.
#: Results never depend on these numbers (every kernel is bitwise thread-count independent); they
#: only keep small calls from paying for a parallel region.
GRAIN = {
    "gather": 2048,          # looked-up rows
    "renorm": 256,           # distinct rows renormalised
    "sort": 16384,           # indices radix-sorted
    "segment": 256,          # distinct rows summed (gradient coalescing)
    "zero_fill": 1 << 20,    # elements of a dense gradient zeroed
    "optimizer": 512,        # rows updated by an optimizer step
    "merge": 4096,           # rows of two sparse gradients merged
    "bag": 64,               # bags pooled
    "entry": 4096,           # per-index work of a bag backward (per-sample-weight gradient)
    "column_block": 16,      # column blocks of the max-mode bag backward
    "elementwise": 1 << 16,  # elements of a streaming pass (gradient norms, scaling, clamping)
}

#: The environment variable that turns cembed's hand-written CPU paths off (read by the kernels' C code
#: the first time each needs its answer: set it before ``import cembed``).
DISABLE_CPU_FEATURES = "CEMBED_DISABLE_CPU_FEATURES"


def _unknown_disabled_features() -> List[str]:
    """The names in $CEMBED_DISABLE_CPU_FEATURES that are no hand-written path of cembed's (separated
    by commas or spaces, any case: as the C code reads them)."""
    names = re.split(r"[, ]+", os.environ.get(DISABLE_CPU_FEATURES, "").lower())
    known = _threads.cpu_paths()
    return [name for name in names if name and name not in known]


def _warn_unknown_disabled_features() -> None:
    """At import: a typo in $CEMBED_DISABLE_CPU_FEATURES would silently keep the path on."""
    unknown = _unknown_disabled_features()
    if unknown:
        warnings.warn(f"{DISABLE_CPU_FEATURES} names no cembed CPU path: {', '.join(unknown)} "
                      f"(known: {', '.join(_threads.cpu_paths())})", RuntimeWarning, stacklevel=3)


_warn_unknown_disabled_features()

_user_threads: Optional[int] = None
_parallel_region_used = False   # has this process run a kernel on more than one thread?
_forked_after_parallel = False  # are we a fork() child of a process whose OpenMP pool had started?


def set_num_threads(n: Optional[int] = None) -> Optional[int]:
    """Use ``n`` threads in every cembed kernel.

    Parameters
    ----------
    n : int or None
        ``1 <= n <= MAX_THREADS``; ``None`` restores the default, which follows ``OMP_NUM_THREADS``
        and ``threadpoolctl.threadpool_limits(..., user_api="openmp")`` at each call.

    Returns
    -------
    int or None
        The previous setting (``None``: the default was in effect), so that
        ``previous = set_num_threads(n); ...; set_num_threads(previous)`` restores it exactly.

    Raises
    ------
    TypeError
        ``n`` is not an int (bools included).
    ValueError
        ``n`` is below 1 or above ``cembed._config.MAX_THREADS``.

    Examples
    --------
    >>> import cembed
    >>> previous = cembed.set_num_threads(1)
    >>> cembed.get_num_threads()
    1
    >>> cembed.set_num_threads(previous)
    1
    """
    global _user_threads
    previous = _user_threads
    _user_threads = None if n is None else check_int(n, "set_num_threads: n", low=1, high=MAX_THREADS)
    return previous


def get_num_threads() -> int:
    """The number of threads the next kernel call may use, resolved now.

    Unless :func:`set_num_threads` chose it, this is OpenMP's setting (``OMP_NUM_THREADS``,
    ``threadpoolctl``) capped at :data:`MAX_THREADS`, the bound :func:`set_num_threads` enforces:
    ``OMP_NUM_THREADS=1000`` on a 2-core machine is a mistake, not a setting (each thread of a kernel
    also gets its own scratch space).

    In a child process created by ``fork()`` after this process ran a parallel kernel, this is
    always 1: GNU OpenMP's thread pool does not survive ``fork``, and entering a parallel region in
    such a child would hang forever (see ``docs/safety.md``).

    Examples
    --------
    >>> import cembed
    >>> cembed.get_num_threads() >= 1
    True
    """
    if _forked_after_parallel:
        return 1
    if _user_threads is not None:
        return _user_threads
    return max(1, min(MAX_THREADS, _threads.max_threads()))


def n_threads_for(n_items: int, work: str) -> int:
    """Threads for a loop over ``n_items`` units of ``work`` (a key of :data:`GRAIN`)."""
    global _parallel_region_used
    n = max(1, min(get_num_threads(), int(n_items) // GRAIN[work]))
    if n > 1:
        _parallel_region_used = True
    return n


def _after_fork_in_child() -> None:
    global _forked_after_parallel
    if _parallel_region_used:
        _forked_after_parallel = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def release_memory() -> int:
    """Free the cached output buffers; returns the number of bytes given back.

    Large kernel outputs (looked-up rows, gradient values, bag outputs) are recycled when the arrays
    holding them die, so a training loop stops allocating after its first step; this gives that
    memory back to the system.

    Examples
    --------
    >>> import cembed
    >>> cembed.release_memory() >= 0
    True
    """
    from . import _buffer_cache, _sort

    return int(_buffer_cache.release()) + int(_sort.release_scratch())


def openmp_enabled() -> bool:
    """True when the kernels were compiled with OpenMP."""
    return bool(_threads.openmp_enabled())


def show_config(file: Optional[TextIO] = None, mode: str = "stdout") -> Optional[Dict[str, Any]]:
    """The version, whether OpenMP is enabled, the thread count, the compile flags, the hand-written
    CPU paths the kernels take on this machine and the output cache: printed (``mode="stdout"``, to
    ``file`` or standard output) or returned as a dict (``mode="dicts"``, as ``numpy.show_config`` does).

    ``cpu_paths``: F16C for float16 rows, AVX-512F for bfloat16 rounding, float16 stochastic rounding,
    the bfloat16 Adam row and the float32 / bfloat16 bag sums, each where the CPU has it. The environment variable ``CEMBED_DISABLE_CPU_FEATURES`` (e.g.
    ``"avx512f,f16c"``), set before ``import cembed``, turns them off — not the compiler's AVX2 / AVX-512
    versions of the vectorised loops, which the loader picks. Every path gives the same bits.

    Examples
    --------
    >>> import io, cembed
    >>> buf = io.StringIO()
    >>> cembed.show_config(file=buf)
    >>> buf.getvalue().startswith("cembed ")
    True
    >>> info = cembed.show_config(mode="dicts")
    >>> sorted(info)[:3], isinstance(info["openmp"], bool)
    (['bounds_checking', 'cached_bytes', 'compile_args'], True)
    """
    from . import __version__, _buffer_cache

    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    omp = bool(_threads.openmp_enabled())
    info: Dict[str, Any] = {
        "version": __version__, "numpy": np.__version__, "python": sys.version.split()[0],
        "openmp": omp, "openmp_version": int(_threads.openmp_version()) if omp else None,
        "threads": get_num_threads(), "threads_set_by_user": _user_threads is not None,
        "compiler": None, "compiler_type": None, "compile_args": [], "link_args": [], "bounds_checking": False,
        "cpu_paths": dict(_threads.cpu_paths()), "cached_bytes": int(_buffer_cache.cached_bytes()),
    }
    if _build_info is not None:
        info.update(compiler=str(_build_info.COMPILER), compiler_type=_build_info.COMPILER_TYPE,
                    compile_args=list(_build_info.COMPILE_ARGS), link_args=list(_build_info.LINK_ARGS),
                    bounds_checking=bool(_build_info.BOUNDSCHECK))
    if mode == "dicts":
        return info
    lines = [
        f"cembed {info['version']}",
        f"NumPy {info['numpy']}, Python {info['python']}",
        "OpenMP: " + (f"enabled (_OPENMP {info['openmp_version']})" if omp else "disabled (serial kernels)"),
        f"threads: {info['threads']}" + (" (set_num_threads)" if info["threads_set_by_user"] else " (default)"),
    ]
    if _build_info is not None:
        lines += [
            f"compiler: {info['compiler']} ({info['compiler_type']})",
            f"compile flags: {' '.join(info['compile_args'])}",
            f"link flags: {' '.join(info['link_args'])}",
            f"bounds checking: {'on' if info['bounds_checking'] else 'off'}",
        ]
    paths = ", ".join(f"{name} {'on' if used else 'off'}" for name, used in info["cpu_paths"].items())
    lines.append(f"hand-written CPU paths: {paths} (CEMBED_DISABLE_CPU_FEATURES turns them off)")
    lines.append(f"output buffer cache: {info['cached_bytes'] / 2**20:.1f} MiB held (cembed.release_memory() frees it)")
    print("\n".join(lines), file=sys.stdout if file is None else file)
    return None
