"""cembed.EmbeddingBag and cembed.functional.embedding_bag: pooled lookups (torch.nn.EmbeddingBag).

Bags come from a 1-D index array plus ``offsets`` (bag starts; CSR-style with ``include_last_offset``)
or from a 2-D ``(B, n)`` index array. Every argument is validated before anything is computed or
renormalised: malformed offsets are a ``ValueError`` (torch's behaviour there is path dependent), bad
indices an ``IndexError``.
"""
import numpy as np

from . import _bag, _lookup
from ._buffer_cache import empty as pooled_empty
from ._backward import _check_grad_output, accumulate_rows
from ._config import n_threads_for
from ._validation import (
    as_index_array,
    check_float_dtype,
    check_max_norm,
    check_size,
    check_weight,
    check_writeable,
    flat_indices,
    normalize_padding_idx,
    rows_contiguous,
)
from .embedding import TableModule, check_given_weight, check_pretrained, init_weight
from .sparse import SparseGrad

MODES = {"sum": 0, "mean": 1, "max": 2}
_BAG_GRAIN = 64


class _Bags:
    """A validated call: flat indices, CSR offsets (n_bags + 1), mode, padding, per-sample weights."""

    __slots__ = ("flat", "offsets", "n_bags", "mode", "padding_idx", "psw", "input_shape", "counts")

    def bag_of_entry(self):
        """(n_indices,) int64: the bag each entry belongs to."""
        return np.repeat(np.arange(self.n_bags, dtype=np.int64), np.diff(self.offsets))


def _check_mode(mode):
    if mode not in MODES:
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    return mode


def validate_bags(input, weight, offsets=None, mode="mean", per_sample_weights=None, include_last_offset=False,
                  padding_idx=None, sparse=False, scale_grad_by_freq=False):
    """Every check of F.embedding_bag (SPEC_torch §6.1, with SPEC.md's decisions), before any work."""
    weight = check_weight(weight)
    n_rows = weight.shape[0]
    idx = as_index_array(input, "input", n_rows)
    if idx.ndim == 2:
        if offsets is not None:
            raise ValueError("if input is 2D, then offsets has to be None, as input is treated as a mini-batch "
                             "of fixed length sequences")
    elif idx.ndim == 1:
        if offsets is None:
            raise ValueError("offsets has to be a 1D array but got None (a 1-D input needs offsets)")
    else:
        raise ValueError(f"input has to be 1D or 2D, but got an array of dimension {idx.ndim}")
    _check_mode(mode)
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    psw = None
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"per_sample_weights is only supported for mode='sum' (got mode={mode!r})")
        psw = per_sample_weights if isinstance(per_sample_weights, np.ndarray) else np.asarray(per_sample_weights)
        if psw.shape != idx.shape:
            raise ValueError(f"per_sample_weights must have the same shape as the input {idx.shape}, "
                             f"got {psw.shape}")
        if psw.dtype != weight.dtype:
            raise TypeError(f"per_sample_weights must have the weight's dtype {weight.dtype}, got {psw.dtype}")
    padding_idx = normalize_padding_idx(padding_idx, n_rows)
    flat = flat_indices(idx)
    n_total = flat.size
    if idx.ndim == 2:
        n_bags, bag_len = idx.shape
        csr = np.arange(n_bags + 1, dtype=np.int64) * bag_len
    else:
        off = as_index_array(offsets, "offsets")
        if off.ndim != 1:
            raise ValueError(f"offsets has to be a 1D array, got shape {off.shape}")
        off = off.astype(np.int64, copy=False)
        if include_last_offset and off.size == 0:
            raise ValueError("include_last_offset: number of offsets should be at least 1")
        if off.size:
            if off[0] != 0:
                raise ValueError(f"offsets[0] has to be 0, i.e. the first bag starts at the first index, "
                                 f"got {off[0]}")
            steps = np.diff(off)
            if steps.size and steps.min() < 0:
                pos = int(np.flatnonzero(steps < 0)[0]) + 1
                raise ValueError(f"offsets must be non-decreasing: offsets[{pos}] = {off[pos]} is smaller than "
                                 f"offsets[{pos - 1}] = {off[pos - 1]}")
            if off[-1] > n_total:
                pos = int(np.flatnonzero(off > n_total)[0])
                raise ValueError(f"offsets[{pos}] = {off[pos]} is past the end of the input (length {n_total})")
        if include_last_offset:
            if off[-1] != n_total:
                raise ValueError(f"with include_last_offset=True the last offset must equal the input length "
                                 f"{n_total}, got {off[-1]}")
            csr = np.ascontiguousarray(off)
        else:
            csr = np.append(off, np.int64(n_total))
        n_bags = csr.size - 1
    _lookup.check_index_range(flat, idx.shape, n_rows, "input")
    bags = _Bags()
    bags.flat, bags.offsets, bags.n_bags = flat, csr, n_bags
    bags.mode, bags.padding_idx, bags.input_shape = mode, padding_idx, idx.shape
    bags.psw = None if psw is None else np.ascontiguousarray(psw).reshape(-1)
    bags.counts = None
    return weight, bags


def _pool(weight, bags, want_argmax):
    dim = weight.shape[1]
    out = pooled_empty((bags.n_bags, dim), weight.dtype)
    argmax = np.empty((bags.n_bags, dim) if want_argmax else (0, 0), dtype=np.int64)
    psw = bags.psw if bags.psw is not None else np.zeros(0, dtype=weight.dtype)
    # torch's float32 fast path fuses psw into an fma; with padding_idx or float64 it rounds twice
    fused = weight.dtype == np.float32 and bags.padding_idx is None
    src = weight if rows_contiguous(weight) else np.ascontiguousarray(weight)
    _bag.bag_forward(src, bags.flat, bags.offsets, MODES[bags.mode],
                     -1 if bags.padding_idx is None else bags.padding_idx, psw, fused, out, argmax,
                     n_threads_for(bags.n_bags, _BAG_GRAIN))
    return out, (argmax if want_argmax else None)


def embedding_bag(input, weight, offsets=None, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                  mode="mean", sparse=False, per_sample_weights=None, include_last_offset=False,
                  padding_idx=None):
    """torch.nn.functional.embedding_bag: ``(B, dim)`` pooled rows (sum, mean or max per bag).

    With ``max_norm`` the distinct referenced rows are renormalised in place first — after every
    argument was validated."""
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    weight, bags = validate_bags(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                                 padding_idx, sparse, scale_grad_by_freq)
    if max_norm is not None and bags.flat.size:
        check_writeable(weight, "max_norm renormalisation")
        _lookup.renorm_validated(weight, bags.flat, max_norm, norm_type)
    out, _ = _pool(weight, bags, False)
    return out


def bag_counts(bags):
    """(n_bags,) number of non-padding entries per bag."""
    sizes = np.diff(bags.offsets)
    if bags.padding_idx is None:
        return sizes
    is_pad = (bags.flat == bags.padding_idx).astype(np.int64)
    cum = np.concatenate(([0], np.cumsum(is_pad)))
    return sizes - (cum[bags.offsets[1:]] - cum[bags.offsets[:-1]])


def embedding_bag_backward(grad_output, weight, bags, argmax=None, scale_grad_by_freq=False, sparse=False,
                           want_psw_grad=False):
    """(weight gradient, per_sample_weights gradient or None) of a validated bag call."""
    n_rows, dim = weight.shape
    grad_output = _check_grad_output(grad_output, (bags.n_bags,), dim=dim, dtype=weight.dtype)
    psw_grad = None
    bag_of = bags.bag_of_entry()
    if want_psw_grad and bags.psw is not None:
        psw_grad = np.empty(bags.flat.size, dtype=weight.dtype)
        src = weight if rows_contiguous(weight) else np.ascontiguousarray(weight)
        _bag.psw_backward(src, bags.flat, bag_of, grad_output,
                          -1 if bags.padding_idx is None else bags.padding_idx, psw_grad,
                          n_threads_for(bags.flat.size, 4096))
        psw_grad = psw_grad.reshape(bags.input_shape)
    if bags.mode == "max":
        grad = np.zeros((n_rows, dim), dtype=weight.dtype)
        _bag.max_backward(grad_output, argmax, grad, n_threads_for(dim, 16))
        return grad, psw_grad
    scale = None
    if bags.mode == "mean":
        counts = bag_counts(bags)
        inv = (1.0 / np.maximum(counts, 1)).astype(weight.dtype)  # double, rounded to the weight dtype
        scale = inv[bag_of]
    elif bags.psw is not None:
        scale = bags.psw
    grad = accumulate_rows(grad_output, bags.flat, n_rows, src=bag_of, scale=scale, padding_idx=bags.padding_idx,
                           scale_grad_by_freq=scale_grad_by_freq, sparse=sparse)
    return grad, psw_grad


class EmbeddingBag(TableModule):
    """Pooled lookups over bags of indices (torch.nn.EmbeddingBag); ``backward`` accumulates the weight
    gradient into ``.grad`` and returns the gradient of ``per_sample_weights`` (or None)."""

    def __init__(self, num_embeddings, embedding_dim, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                 mode="mean", sparse=False, _weight=None, include_last_offset=False, padding_idx=None,
                 dtype=np.float32, seed=None, _freeze=False):
        self.num_embeddings = check_size(num_embeddings, "num_embeddings")
        self.embedding_dim = check_size(embedding_dim, "embedding_dim")
        self.padding_idx = normalize_padding_idx(padding_idx, self.num_embeddings)
        self.max_norm, self.norm_type = check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.mode = mode  # validated at forward, as in torch
        self.sparse = bool(sparse)
        self.include_last_offset = bool(include_last_offset)
        if _weight is None:
            self.weight = init_weight(self.num_embeddings, self.embedding_dim, check_float_dtype(dtype), seed,
                                      self.padding_idx)
        else:
            self.weight = check_given_weight(_weight, self.num_embeddings, self.embedding_dim)
        self.requires_grad = not _freeze
        self.grad = None
        self._saved = None

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, max_norm=None, norm_type=2.0, scale_grad_by_freq=False,
                        mode="mean", sparse=False, include_last_offset=False, padding_idx=None):
        embeddings = check_pretrained(embeddings)
        rows, dim = embeddings.shape
        return cls(rows, dim, max_norm=max_norm, norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq,
                   mode=mode, sparse=sparse, _weight=embeddings, include_last_offset=include_last_offset,
                   padding_idx=padding_idx, _freeze=freeze)

    def forward(self, input, offsets=None, per_sample_weights=None):
        weight, bags = validate_bags(input, self.weight, offsets, self.mode, per_sample_weights,
                                     self.include_last_offset, self.padding_idx, self.sparse,
                                     self.scale_grad_by_freq)
        if self.max_norm is not None and bags.flat.size:
            check_writeable(weight, "max_norm renormalisation")
            _lookup.renorm_validated(weight, bags.flat, self.max_norm, self.norm_type)
        out, argmax = _pool(weight, bags, want_argmax=self.mode == "max")
        self._saved = (bags, argmax)
        return out

    __call__ = forward

    def backward(self, grad_output):
        """Accumulate d(loss)/d(weight) of the last forward into ``.grad``; return d(loss)/d(psw)
        (same shape as the per_sample_weights given to forward) or None."""
        if self._saved is None:
            raise ValueError("backward: call forward first")
        bags, argmax = self._saved
        want_psw = bags.psw is not None
        if not self.requires_grad:
            grad_output = _check_grad_output(grad_output, (bags.n_bags,), dim=self.embedding_dim,
                                             dtype=self.weight.dtype)
            if not want_psw:
                return None
            _, psw_grad = embedding_bag_backward(grad_output, self.weight, bags, argmax, want_psw_grad=True)
            return psw_grad
        grad, psw_grad = embedding_bag_backward(grad_output, self.weight, bags, argmax,
                                                scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse,
                                                want_psw_grad=want_psw)
        old = self.grad
        if old is None:
            self.grad = grad
        elif isinstance(old, SparseGrad) and isinstance(grad, SparseGrad):
            self.grad = old.merge(grad)
        elif isinstance(old, SparseGrad):
            self.grad = old.to_dense() + grad
        elif isinstance(grad, SparseGrad):
            old[grad.indices] += grad.values
        else:
            old += grad
        return psw_grad

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}" + self._repr_options([
            ("max_norm", self.max_norm), ("norm_type", self.norm_type if self.norm_type != 2.0 else None),
            ("scale_grad_by_freq", self.scale_grad_by_freq), ("mode", self.mode), ("sparse", self.sparse),
            ("include_last_offset", self.include_last_offset), ("padding_idx", self.padding_idx)])
