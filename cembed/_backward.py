"""Embedding gradients: dense and coalesced sparse, `coalesce`, and `Embedding.backward`.

Every path groups the entries by row with the parallel radix sort (`_sort.sort_rows`) and sums each
row's contributions in input order on one thread (`_grad.segment_sum`): deterministic for any thread
count, bitwise equal to torch's dense gradient, and — for sparse output — work and memory
proportional to the batch, never to the number of rows in the table.
"""
import numpy as np

from . import _grad, _sort
from ._buffer_cache import empty as pooled_empty
from ._config import n_threads_for
from ._lookup import validated_indices
from ._validation import FLOAT_DTYPES, check_size, normalize_padding_idx
from .sparse import SparseGrad

_EMPTY_POSITIONS = np.zeros(0, dtype=np.int64)
_SORT_GRAIN = 16384      # entries per thread for the radix sort
_SEGMENT_GRAIN = 256     # unique rows per thread for the segment sum


def accumulate_rows(values, rows, num_rows, *, src=None, scale=None, padding_idx=None,
                    scale_grad_by_freq=False, sparse=False, out=None):
    """The gradient of a table of ``num_rows`` rows from per-entry contributions (no validation:
    the façades have checked everything).

    values: (n_values, dim) C-contiguous float32/float64 gradient rows.
    rows:   (n,) int32/int64 row ids, all in [0, num_rows).
    src:    optional (n,) int64: entry k reads values[src[k]] (default: values[k]).
    scale:  optional (n,) values.dtype: entry k contributes scale[k] * values[src[k]].
    Entries whose row is ``padding_idx`` contribute nothing. With ``scale_grad_by_freq`` each
    contribution is scaled by 1/count(row) (count over all of ``rows``), fused as torch does.

    Returns a coalesced SparseGrad (``sparse=True``), else a dense (num_rows, dim) array; with ``out``
    (dense only) the sum is added into ``out`` row by row (out[r] + (sum of row r's entries))."""
    dim = values.shape[1]
    dtype = values.dtype
    order, seg_rows, starts = _sort.sort_rows(rows, n_threads_for(rows.size, _SORT_GRAIN))
    n_segments = seg_rows.size
    seg_ids = np.arange(n_segments, dtype=np.int64)
    if padding_idx is not None and n_segments:
        hit = int(np.searchsorted(seg_rows, padding_idx))
        if hit < n_segments and seg_rows[hit] == padding_idx:
            seg_ids = np.delete(seg_ids, hit)
    src = _EMPTY_POSITIONS if src is None else np.ascontiguousarray(src, dtype=np.int64)
    scale = np.zeros(0, dtype=dtype) if scale is None else np.ascontiguousarray(scale, dtype=dtype)
    n_threads = n_threads_for(seg_ids.size, _SEGMENT_GRAIN)
    if sparse:
        compact = pooled_empty((seg_ids.size, dim), dtype)
        _grad.segment_sum(values, order, starts, seg_rows, seg_ids, src, scale,
                          bool(scale_grad_by_freq), compact, False, n_threads)
        return SparseGrad(seg_rows[seg_ids], compact, num_rows, check=False)
    if out is None:
        out = np.empty((num_rows, dim), dtype=dtype)
        _grad.zero_fill(out, n_threads_for(num_rows * dim, 1 << 20))  # parallel first touch
        _grad.segment_sum(values, order, starts, seg_rows, seg_ids, src, scale,
                          bool(scale_grad_by_freq), out, True, n_threads)
        return out
    # Accumulate into an existing gradient the way torch does (old + new, new summed from zero):
    # sum the touched rows compactly, then add them in.
    compact = pooled_empty((seg_ids.size, dim), dtype)
    _grad.segment_sum(values, order, starts, seg_rows, seg_ids, src, scale,
                      bool(scale_grad_by_freq), compact, False, n_threads)
    touched = seg_rows[seg_ids]
    out[touched] += compact
    return out


def _check_grad_output(grad_output, index_shape, dim=None, dtype=None, name="grad_output"):
    """grad_output as a C-contiguous (n, dim) array; shape must be index_shape + (dim,)."""
    if not isinstance(grad_output, np.ndarray):
        grad_output = np.asarray(grad_output)
    if grad_output.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got dtype {grad_output.dtype}")
    if dtype is not None and grad_output.dtype != dtype:
        raise TypeError(f"{name} has dtype {grad_output.dtype} but the weight is {dtype}")
    if grad_output.ndim != len(index_shape) + 1 or grad_output.shape[:-1] != tuple(index_shape) or (
            dim is not None and grad_output.shape[-1] != dim):
        want = tuple(index_shape) + ((dim,) if dim is not None else ("dim",))
        raise ValueError(f"{name} must have shape indices.shape + (embedding_dim,) = {want}, "
                         f"got {grad_output.shape}")
    n = int(np.prod(index_shape, dtype=np.int64))
    return np.ascontiguousarray(grad_output.astype(grad_output.dtype.newbyteorder("="), copy=False)).reshape(
        n, grad_output.shape[-1])


def _weighted_sources(grad_output, idx, per_sample_weights, dim=None, dtype=None):
    """For a gradient of ``(per_sample_weights[..., None] * weight[indices]).sum(-2)``: grad_output
    has shape indices.shape[:-1] + (dim,) and entry (..., k) contributes
    per_sample_weights[..., k] * grad_output[...]. Returns (values, src, scale)."""
    if idx.ndim < 1:
        raise ValueError("per_sample_weights needs indices with at least one dimension")
    psw = per_sample_weights if isinstance(per_sample_weights, np.ndarray) else np.asarray(per_sample_weights)
    if psw.shape != idx.shape:
        raise ValueError(f"per_sample_weights must have the shape of indices {idx.shape}, got {psw.shape}")
    values = _check_grad_output(grad_output, idx.shape[:-1], dim=dim, dtype=dtype)
    if psw.dtype != values.dtype:
        raise TypeError(f"per_sample_weights must have dtype {values.dtype}, got {psw.dtype}")
    group = idx.shape[-1]
    src = np.repeat(np.arange(values.shape[0], dtype=np.int64), group)
    return values, src, np.ascontiguousarray(psw).reshape(-1)


def embedding_backward(grad_output, indices, num_embeddings, padding_idx=None,
                       scale_grad_by_freq=False, sparse=False, per_sample_weights=None):
    """The gradient of ``embedding(indices, weight)`` w.r.t. ``weight`` given d(loss)/d(output).

    grad_output: (*indices.shape, dim). Returns a dense (num_embeddings, dim) array, or with
    ``sparse=True`` a coalesced :class:`cembed.SparseGrad` (unique rows ascending, duplicates summed in
    input order). The padding row's gradient is zero (absent from a sparse gradient).
    ``scale_grad_by_freq`` divides each row's contributions by its count over the whole input — for
    sparse gradients too (torch refuses that combination).

    With ``per_sample_weights`` (shape of indices) this is instead the gradient of the weighted sum
    over the last index axis, ``(per_sample_weights[..., None] * embedding(indices, weight)).sum(-2)``:
    grad_output then has shape indices.shape[:-1] + (dim,), and index (..., k) receives
    per_sample_weights[..., k] * grad_output[...] — without materialising the per-index gradient rows
    (e.g. the output table of skip-gram with negative sampling)."""
    num_embeddings = check_size(num_embeddings, "num_embeddings")
    padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
    idx, flat = validated_indices(indices, num_embeddings)
    src = scale = None
    if per_sample_weights is None:
        values = _check_grad_output(grad_output, idx.shape)
    else:
        values, src, scale = _weighted_sources(grad_output, idx, per_sample_weights)
    return accumulate_rows(values, flat, num_embeddings, src=src, scale=scale, padding_idx=padding_idx,
                           scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)


def coalesce(rows, values, num_rows):
    """Sum the value rows that share a row id: the building block NumPy users reach
    ``np.add.at`` for. Returns a :class:`cembed.SparseGrad` with unique ascending rows; each row's
    values are summed in input order (deterministic for any thread count).

    rows: (n,) integers in [0, num_rows); values: (n, dim) float32/float64."""
    num_rows = check_size(num_rows, "num_rows")
    idx, flat = validated_indices(rows, num_rows, name="rows")
    if idx.ndim != 1:
        raise ValueError(f"rows must be 1-D, got shape {idx.shape}")
    values = _check_grad_output(values, idx.shape, name="values")
    return accumulate_rows(values, flat, num_rows, sparse=True)


def accumulate_embedding_grad(module, grad_output, indices, per_sample_weights=None):
    """Embedding.backward: validate, then return the module's new ``.grad`` (dense add or sparse
    merge into the existing one). Frozen modules keep ``.grad = None`` (after validation)."""
    weight = module.weight
    n_rows, dim = weight.shape
    idx, flat = validated_indices(indices, n_rows)
    src = scale = None
    if per_sample_weights is None:
        values = _check_grad_output(grad_output, idx.shape, dim=dim, dtype=weight.dtype)
    else:
        values, src, scale = _weighted_sources(grad_output, idx, per_sample_weights, dim=dim, dtype=weight.dtype)
    old = module.grad
    if not module.requires_grad:
        return None
    kwargs = dict(src=src, scale=scale, padding_idx=module.padding_idx,
                  scale_grad_by_freq=module.scale_grad_by_freq)
    if module.sparse:
        new = accumulate_rows(values, flat, n_rows, sparse=True, **kwargs)
        if isinstance(old, SparseGrad):
            return old.merge(new)
        if old is not None:  # a dense grad from earlier calls (sparse toggled): stay dense
            return accumulate_rows(values, flat, n_rows, out=old, **kwargs)
        return new
    if old is None:
        return accumulate_rows(values, flat, n_rows, **kwargs)
    if isinstance(old, SparseGrad):
        dense = old.to_dense()
        return accumulate_rows(values, flat, n_rows, out=dense, **kwargs)
    return accumulate_rows(values, flat, n_rows, out=old, **kwargs)
