"""The lookup (F.embedding) and the max_norm renormalisation (F.embedding_renorm_)."""
import numpy as np

from . import _gather, _renorm, _sort
from ._buffer_cache import empty as pooled_empty
from ._config import n_threads_for
from ._validation import (
    as_index_array,
    check_index_range,
    check_max_norm,
    check_weight,
    check_writeable,
    flat_indices,
    normalize_padding_idx,
    rows_contiguous,
)


def validated_indices(indices, n_rows, name="indices"):
    """(index array of the caller's shape, its flat int32/int64 view), range-checked."""
    idx = as_index_array(indices, name, n_rows)
    flat = flat_indices(idx)
    check_index_range(flat, idx.shape, n_rows, name)
    return idx, flat


def unique_rows(flat):
    """The distinct row ids of a validated flat index array, ascending (radix sort, O(len))."""
    _, rows, _ = _sort.sort_rows(flat, n_threads_for(flat.size, 16384), want_order=False)
    return rows


def renorm_validated(weight, flat, max_norm, norm_type):
    """Renormalise the distinct rows of ``flat`` (already validated) in place."""
    if flat.size == 0 or weight.shape[1] == 0:
        return
    rows = unique_rows(flat)
    if rows_contiguous(weight):
        _renorm.renorm_rows(weight, rows, max_norm, norm_type, n_threads_for(rows.size, 256))
    else:  # rare: a strided column layout; renorm a contiguous copy of the touched rows
        block = np.ascontiguousarray(weight[rows])
        _renorm.renorm_rows(block, np.arange(rows.size, dtype=np.int64), max_norm, norm_type,
                            n_threads_for(rows.size, 256))
        weight[rows] = block


def gather_validated(weight, idx, flat):
    """weight[idx] as a fresh (*idx.shape, dim) array."""
    dim = weight.shape[1]
    if not rows_contiguous(weight):
        return np.take(weight, flat, axis=0).reshape(idx.shape + (dim,))
    out = pooled_empty((flat.size, dim), weight.dtype)
    _gather.gather_rows(weight, flat, out, n_threads_for(flat.size, 2048))
    return out.reshape(idx.shape + (dim,))


def embedding_renorm_(weight, indices, max_norm, norm_type=2.0):
    """In place: every distinct row referenced by ``indices`` whose ``norm_type``-norm exceeds
    ``max_norm`` is scaled by ``max_norm / (norm + 1e-7)``. Returns ``weight``.

    Every index is validated before any row is touched: a call that raises changes nothing."""
    weight = check_weight(weight)
    if max_norm is None:
        raise TypeError("embedding_renorm_: max_norm must be a real number, got None")
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    _, flat = validated_indices(indices, weight.shape[0])
    if flat.size:
        check_writeable(weight, "embedding_renorm_")
    renorm_validated(weight, flat, max_norm, norm_type)
    return weight


def embedding(indices, weight, padding_idx=None, max_norm=None, norm_type=2.0):
    """torch.nn.functional.embedding: ``weight[indices]`` with shape ``(*indices.shape, dim)``.

    ``padding_idx`` does not change the forward values (it only masks the gradient); it is
    range-checked as in torch. With ``max_norm``, the referenced rows are renormalised in place
    first (after every index was validated)."""
    weight = check_weight(weight)
    normalize_padding_idx(padding_idx, weight.shape[0])
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    idx, flat = validated_indices(indices, weight.shape[0])
    if max_norm is not None and flat.size:
        check_writeable(weight, "max_norm renormalisation")
        renorm_validated(weight, flat, max_norm, norm_type)
    return gather_validated(weight, idx, flat)
