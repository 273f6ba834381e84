"""Vectorised argument checks shared by every façade. They run before any kernel, so a call that
raises has modified nothing."""
import operator

import numpy as np

from . import _gather

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NATIVE_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))


def check_float_dtype(dtype, name="dtype"):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_weight(weight, name="weight"):
    """A 2-D float32/float64 ndarray in native byte order (used as is, never copied)."""
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(weight).__name__}")
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {weight.dtype}")
    if not weight.dtype.isnative:
        raise TypeError(f"{name} must be in native byte order, got dtype {weight.dtype.str}")
    return weight


def check_writeable(weight, what, name="weight"):
    if not weight.flags.writeable:
        raise ValueError(f"{name} is read-only but {what} writes into it")


def rows_contiguous(weight):
    """True when each row is contiguous (unit column stride), which is what the kernels need;
    the row stride itself may be anything."""
    return weight.shape[1] <= 1 or weight.strides[1] == weight.itemsize


def as_index_array(indices, name="indices", n_rows=None):
    """Indices as an int32 or int64 ndarray of any shape (int32/int64 input is not copied).

    Any signed or unsigned integer dtype is accepted; bool, float and object are a TypeError.
    uint64 values that do not fit int64 are reported as out of range rather than wrapped."""
    arr = indices if isinstance(indices, np.ndarray) else np.asarray(indices)
    if not isinstance(indices, np.ndarray) and arr.size == 0 and arr.dtype.kind == "f":
        arr = arr.astype(np.int64)  # [] (or [[]]) from Python: an empty index list
    kind = arr.dtype.kind
    if kind == "b" or kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype in _NATIVE_INDEX_DTYPES and arr.dtype.isnative:
        return arr
    if kind == "u" and arr.dtype.itemsize >= 8 and arr.size:
        too_big = arr > np.iinfo(np.int64).max
        if too_big.any():
            _raise_index_error(arr, int(np.flatnonzero(too_big.ravel())[0]), n_rows, name)
    if arr.dtype.itemsize <= 4 and not (kind == "u" and arr.dtype.itemsize == 4):
        return arr.astype(np.int32)
    return arr.astype(np.int64)


def flat_indices(arr):
    """The indices as a 1-D C-contiguous array (a view when they already are)."""
    return np.ascontiguousarray(arr).reshape(-1)


def _raise_index_error(arr, pos, n_rows, name):
    value = arr.reshape(-1)[pos]
    where = tuple(int(i) for i in np.unravel_index(pos, arr.shape)) if arr.ndim > 1 else pos
    valid = f"[0, {n_rows})" if n_rows is not None else "[0, num_embeddings)"
    raise IndexError(
        f"{name} contains {value} at position {where}, outside the valid range {valid}"
    )


def check_index_range(flat, shape, n_rows, name="indices"):
    """IndexError naming the first index outside [0, n_rows) (negative included)."""
    if flat.size == 0:
        return
    pos = _gather.first_out_of_range(flat, n_rows)
    if pos >= 0:
        _raise_index_error(flat.reshape(shape), int(pos), n_rows, name)


def normalize_padding_idx(padding_idx, n_rows):
    """torch's rule: -n_rows <= p < n_rows, negatives stored as n_rows + p; None stays None."""
    if padding_idx is None:
        return None
    if isinstance(padding_idx, (bool, np.bool_)):
        raise TypeError("padding_idx must be an int or None, got a bool")
    try:
        p = operator.index(padding_idx)
    except TypeError:
        raise TypeError(f"padding_idx must be an int or None, got {type(padding_idx).__name__}") from None
    if not -n_rows <= p < n_rows:
        raise ValueError(
            f"padding_idx must be within num_embeddings: got {p}, valid range is "
            f"[{-n_rows}, {n_rows - 1}] for num_embeddings={n_rows}"
        )
    return p + n_rows if p < 0 else p


def check_size(value, name):
    """A non-negative int (num_embeddings, embedding_dim)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def check_max_norm(max_norm, norm_type):
    """max_norm: None or a real number (not validated further, as in torch); norm_type: a real."""
    if max_norm is not None:
        try:
            max_norm = float(max_norm)
        except (TypeError, ValueError):
            raise TypeError(f"max_norm must be a real number or None, got {type(max_norm).__name__}") from None
    try:
        norm_type = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a real number, got {type(norm_type).__name__}") from None
    return max_norm, norm_type
