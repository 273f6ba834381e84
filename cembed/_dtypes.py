"""Table dtypes: the one policy for which element types a table may have and how kernels see them.

A trainable table is float32, float64, float16 (``numpy.float16``) or bfloat16 (``ml_dtypes.bfloat16``,
the NumPy dtype JAX and TensorFlow use; optional: ``pip install ml_dtypes``, the ``bf16`` extra). The two 16-bit
formats are storage formats only: kernels widen each row to float32, compute in float32, and round
each element once (to nearest, ties to even) when they write a 16-bit row or a 16-bit output.

Cython memoryviews understand neither float16 nor bfloat16 buffers, so a 16-bit table reaches a
kernel as ``weight.view(numpy.uint16)`` plus a format code (:func:`as_kernel_view`); the codes are
``TABLE_*`` in ``_rows.pxd`` / ``_half.h``.

``ml_dtypes`` is imported only when bfloat16 is asked for by name (``"bfloat16"``), so NumPy stays
the only runtime dependency; a bfloat16 *array* can only exist when ml_dtypes is loaded, so
recognising one never imports anything.
"""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

#: How to get bfloat16 (the advice every message gives): ml_dtypes, which cembed's "bf16" extra installs.
BF16_INSTALL = 'pip install ml_dtypes (the "bf16" extra of cembed: pip install ".[bf16]" in its checkout)'

# kernel format codes: the same numbers as CEMBED_TABLE_* in _half.h (TABLE_* in _rows.pxd)
FORMAT_F32 = 0
FORMAT_F64 = 1
FORMAT_BF16 = 2
FORMAT_F16 = 3

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOAT16 = np.dtype(np.float16)
FULL_DTYPES = (FLOAT32, FLOAT64)
TABLE_DTYPE_NAMES = "float32 or float64 (or the 16-bit float16 or bfloat16)"


def bfloat16() -> np.dtype:
    """The bfloat16 dtype (``ml_dtypes.bfloat16``), imported on first use.

    Raises
    ------
    ImportError
        ml_dtypes is not installed; the message names the extra that installs it.
    """
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(
            f"bfloat16 tables need the ml_dtypes package: {BF16_INSTALL}; the import failed with: {exc}") from exc
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype: Any) -> bool:
    """Whether ``dtype`` (a ``numpy.dtype``) is ml_dtypes' bfloat16; imports nothing."""
    return (isinstance(dtype, np.dtype) and dtype.kind == "V" and dtype.itemsize == 2
            and dtype.names is None and dtype.name == "bfloat16")


def is_half(dtype: Any) -> bool:
    """Whether ``dtype`` (a ``numpy.dtype``) is a 16-bit float table dtype: float16 or bfloat16."""
    return isinstance(dtype, np.dtype) and (dtype == FLOAT16 or is_bfloat16(dtype))


def is_table_dtype(dtype: Any) -> bool:
    """float32, float64, float16 or bfloat16 (native byte order not checked here)."""
    return isinstance(dtype, np.dtype) and (dtype in FULL_DTYPES or is_half(dtype))


def resolve_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` as a ``numpy.dtype``: the strings ``"bfloat16"`` / ``"bf16"`` (which import
    ml_dtypes), ``ml_dtypes.bfloat16``, or anything ``numpy.dtype`` accepts.

    Raises ``ImportError`` for bfloat16 without ml_dtypes, ``TypeError`` for something that is not a
    dtype at all. Whether the dtype is allowed is the caller's question (:func:`check_table_dtype`)."""
    if isinstance(dtype, str) and dtype.strip().lower() in ("bfloat16", "bf16"):
        return bfloat16()
    if isinstance(dtype, np.dtype):
        return dtype
    try:
        return np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{name} must be a dtype ({TABLE_DTYPE_NAMES}), got {dtype!r}") from None


def check_table_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    """``dtype`` resolved and checked to be a table dtype (``TypeError`` otherwise)."""
    resolved = resolve_dtype(dtype, name)
    if not is_table_dtype(resolved):
        raise TypeError(f"{name} must be {TABLE_DTYPE_NAMES}, got {resolved}")
    return resolved


def kernel_format(dtype: np.dtype) -> int:
    """The kernel format code (``FORMAT_*``) of a table dtype."""
    if dtype == FLOAT32:
        return FORMAT_F32
    if dtype == FLOAT64:
        return FORMAT_F64
    if dtype == FLOAT16:
        return FORMAT_F16
    if is_bfloat16(dtype):
        return FORMAT_BF16
    raise TypeError(f"no kernel format for dtype {dtype}: a table must be {TABLE_DTYPE_NAMES}")


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype kernels compute in and return for a table of ``dtype``: float32 for the 16-bit
    formats, the dtype itself otherwise."""
    return FLOAT32 if is_half(dtype) else dtype


def as_kernel_view(weight: np.ndarray) -> Tuple[np.ndarray, int]:
    """``(array, format code)`` for a kernel: 16-bit tables as their ``uint16`` bit patterns (a view,
    sharing memory), float32/float64 tables unchanged."""
    fmt = kernel_format(weight.dtype)
    if fmt in (FORMAT_BF16, FORMAT_F16):
        return weight.view(np.uint16), fmt
    return weight, fmt


def from_bits(bits: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A ``uint16`` array reinterpreted as the 16-bit ``dtype`` (a view)."""
    return bits.view(dtype)


def resolve_out_dtype(out_dtype: Any, table_dtype: np.dtype, name: str = "out_dtype") -> np.dtype:
    """The dtype of a lookup / pooling result: ``None`` gives :func:`compute_dtype` (float32 for a
    16-bit table); otherwise the compute dtype or, for a 16-bit table, the table's own dtype (the
    float32 result rounded to nearest, ties to even). Anything else, and any ``out_dtype`` for an
    integer (lookup-only) table, is a ``TypeError``."""
    compute = compute_dtype(table_dtype)
    if out_dtype is None:
        return compute
    if not is_table_dtype(table_dtype):
        raise TypeError(f"{name} must be None for a {table_dtype} (lookup-only) table, got {out_dtype!r}")
    resolved = resolve_dtype(out_dtype, name)
    if resolved == compute or (is_half(table_dtype) and resolved == table_dtype):
        return resolved
    allowed = f"{compute}" + (f" or {table_dtype}" if is_half(table_dtype) else "")
    raise TypeError(f"{name} must be None or {allowed} for a {table_dtype} table, got {resolved}")
