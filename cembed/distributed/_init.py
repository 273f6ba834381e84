"""Initial table values defined per global row: a counter-based generator (SplitMix64 of
``(seed, row, column)``), so a row's values do not depend on which shard holds it, on how many shards
there are, or on the order rows are generated in."""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import storage

__all__ = ["initial_rows", "INITS"]

#: The initialisations :func:`initial_rows` knows.
INITS = ("uniform", "zeros")

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_CHUNK_VALUES = 1 << 20   # temporaries stay near 8 MB whatever the table size


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 (wrap-around arithmetic), in place on ``x``."""
    x += _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _MIX1
    x ^= x >> np.uint64(27)
    x *= _MIX2
    x ^= x >> np.uint64(31)
    return x


def check_seed(seed: Any) -> int:
    """A seed: an int in [0, 2**64)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    return int(seed)


def initial_rows(seed: int, rows: Any, dim: int, dtype: Any = np.float32, init: str = "uniform") -> np.ndarray:
    """The initial values of global rows ``rows`` of a table of width ``dim``.

    ``"uniform"`` is word2vec's initialisation, ``(u - 0.5) / dim`` with ``u`` uniform in [0, 1) on a
    grid of 2**-24 (float32) or 2**-53 (float64); ``"zeros"`` is all zeros. ``u`` for entry
    ``(row, column)`` comes from SplitMix64 applied to ``(row * dim + column) XOR SplitMix64(seed)``:
    integer arithmetic and one correctly rounded division, so the values are the same on every
    machine and for any split of the rows over shards.

    Parameters
    ----------
    seed : int
        In ``[0, 2**64)``.
    rows : array_like of int, shape (n,)
        Global row ids (>= 0), any order, repeats allowed.
    dim : int
        Width of the table (part of the counter: a row's values depend on it).
    dtype : float32, float64, float16 or bfloat16
        A 16-bit table gets the float32 values rounded to nearest (ties to even).
    init : {"uniform", "zeros"}

    Returns
    -------
    numpy.ndarray
        ``(n, dim)`` of ``dtype``, a new writable array.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed.distributed import initial_rows
    >>> table = initial_rows(7, np.arange(6), 4)
    >>> bool(np.array_equal(table[[4, 1]], initial_rows(7, [4, 1], 4)))   # rows are independent
    True
    >>> bool(np.abs(table).max() <= 0.5 / 4)
    True
    """
    seed = check_seed(seed)
    from ..modules import Embedding   # the public constructor resolves "bfloat16" (ml_dtypes) and checks the dtype
    try:
        table_dtype = Embedding(1, 1, dtype=dtype, seed=0).weight.dtype
    except TypeError:
        raise TypeError(f"initial_rows: dtype must be float32, float64, float16 or bfloat16, got {dtype!r}") from None
    if table_dtype.itemsize == 2:   # 16-bit: the float32 values, rounded to nearest
        return storage.aligned_copy(initial_rows(seed, rows, dim, np.float32, init), table_dtype)
    dtype = table_dtype
    if init not in INITS:
        raise ValueError(f"initial_rows: init must be one of {INITS}, got {init!r}")
    if isinstance(dim, (bool, np.bool_)) or not isinstance(dim, (int, np.integer)) or dim < 0:
        raise ValueError(f"initial_rows: dim must be an int >= 0, got {dim!r}")
    dim = int(dim)
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and rows.dtype.kind not in "iu"):
        raise TypeError(f"initial_rows: rows must be a 1-D array of integers, got {rows.dtype} {rows.shape}")
    if rows.size and rows.min() < 0:
        raise IndexError("initial_rows: rows must be >= 0")
    out = storage.aligned_zeros((rows.size, dim), dtype)   # rows on cache-line boundaries, as a module's table
    if init == "zeros" or out.size == 0:
        return out
    key = _splitmix64(np.array([seed], dtype=np.uint64))[0]
    bits = 24 if dtype == np.float32 else 53
    step = max(1, _CHUNK_VALUES // max(1, dim))
    cols = np.arange(dim, dtype=np.uint64)
    half, width, grid = dtype.type(0.5), dtype.type(dim), dtype.type(2.0 ** -bits)
    for lo in range(0, rows.size, step):
        block = rows[lo:lo + step].astype(np.uint64)
        x = block[:, None] * np.uint64(dim) + cols[None, :]
        x ^= key
        _splitmix64(x)
        x >>= np.uint64(64 - bits)
        u = x.astype(dtype) * grid          # exact: an integer below 2**bits times a power of two
        out[lo:lo + step] = (u - half) / width
    return out
