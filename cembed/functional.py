"""cembed.functional: the embedding family of ``torch.nn.functional``, implemented here.

This module is the middle layer: it validates every argument (``cembed._validation``), then
dispatches to the private compiled kernels. The modules (``cembed.Embedding``,
``cembed.EmbeddingBag``) and nothing else build on it; it imports no module and no optimizer.

Public: :func:`embedding`, :func:`embedding_renorm_`, :func:`embedding_backward`, :func:`coalesce`,
:func:`embedding_bag`, :func:`embedding_bag_backward`, :func:`prefetch`,
and the scoring functions of dot-product models :func:`embedding_dot`, :func:`embedding_dot_backward`,
:func:`embedding_dot_logistic`, and :func:`embedding_dot_logistic_sgd_` (the scores and an SGD step of
the table in one pass).

For the modules it also holds the two records of a validated forward that a backward needs
(:class:`SavedLookup`, :class:`SavedBags`: private, read-only copies of the indices and offsets)
and :func:`add_to_grad`, the one rule for how a new gradient joins a module's existing ``.grad``.
Behaviour follows PyTorch 2.13 except where ``docs/behaviour.md`` says otherwise.

Tables may be float32, float64, float16 or bfloat16 (``ml_dtypes.bfloat16``). A 16-bit table is a
storage format: lookups, pooling and gradients compute in float32 and return float32 (``out_dtype``
may ask for the table's 16-bit dtype, rounded to nearest); gradients of a 16-bit table are float32
(docs/behaviour.md §12).
"""
from __future__ import annotations

import atexit
import mmap
import os
import queue
import threading
from typing import Any, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np

from . import _bag, _buffer_cache, _grad, _gather, _optim, _prefetch, _renorm, _score, _sort
from ._config import n_threads_for
from ._memory import may_share
from ._dtypes import FLOAT32, as_kernel_view, compute_dtype, is_half, is_table_dtype, kernel_format, resolve_out_dtype
from ._validation import (
    FLOAT_DTYPES,
    GroupedIndices,
    as_array,
    as_index_array,
    group_new,
    check_bool,
    check_int,
    check_gradient_rows,
    check_index_range,
    check_max_norm,
    check_real,
    check_per_sample_weights,
    check_size,
    check_trainable,
    check_weight,
    check_distinct_elements,
    check_writeable,
    checked_private_indices,
    frozen,
    index_groups,
    kernel_array,
    kernel_layout,
    normalize_padding_idx,
    validated_indices,
)
from .sparse import SparseGrad, check_exact_sparse_grad

__all__ = ["embedding", "embedding_renorm_", "embedding_backward", "coalesce", "embedding_bag",
           "embedding_bag_backward", "prefetch", "check_indices", "group_indices", "GroupedIndices",
           "embedding_dot", "embedding_dot_backward", "embedding_dot_logistic", "embedding_dot_logistic_sgd_"]

Grad = Union[np.ndarray, SparseGrad]
BAG_MODES = {"sum": 0, "mean": 1, "max": 2}
_NO_POSITIONS = np.zeros(0, dtype=np.int64)


# ============================================================================ saved forwards

class SavedLookup:
    """The validated indices of one forward, kept for its backward.

    ``flat`` is a private read-only copy (int32/int64, 1-D), ``shape`` the caller's index shape,
    ``n_rows`` the table size they were checked against, ``groups`` the row grouping
    ``(order, rows, starts)`` when the forward already sorted them (max_norm)."""

    __slots__ = ("flat", "shape", "n_rows", "groups")

    def __init__(self, flat: np.ndarray, shape: Tuple[int, ...], n_rows: int,
                 groups: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> None:
        self.flat, self.shape, self.n_rows, self.groups = flat, shape, n_rows, groups

    def check_rows(self, n_rows: int, name: str = "indices") -> None:
        """The saved indices against the table as it is *now* (the weight may have been replaced):
        free when the table did not shrink, one O(n) pass when it did."""
        if n_rows < self.n_rows:
            check_index_range(self.flat, self.shape, n_rows, f"{name} (saved at forward)")
            self.n_rows = n_rows


# A 2-pass radix sort runs six parallel regions (pack, scatter, count, scatter, runs, segments), and on
# a host whose cores are shared each region can wait a scheduler time slice for its second thread:
# measured on the 2-core shared host, a fused training step of 262,144 indices took 1.4-1.5x as long with
# the sort on 2 threads as on 1, against ~1 ms (~2%) gained by the second thread when the host is idle.
# Batches below this many indices are therefore sorted on one thread (same result for any thread count).
SORT_PARALLEL_MIN = 1 << 20


def _sort_threads(n_keys: int) -> int:
    return n_threads_for(n_keys, "sort") if n_keys >= SORT_PARALLEL_MIN else 1


def _group_rows(flat: np.ndarray, kept: bool = False) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, distinct rows ascending, segment starts) of validated row ids (radix sort), in
    recycled buffers (a training loop sorts a batch every step); ``kept``: a grouping kept for a later
    call, in memory read-only from birth (as group_indices keeps its own)."""
    if kept:
        return _sort.sort_rows(flat, _sort_threads(flat.size), True, frozen=True)
    return _sort.sort_rows(flat, _sort_threads(flat.size), True, _buffer_cache.empty)


def _distinct_rows(flat: np.ndarray) -> np.ndarray:
    _, rows, _ = _sort.sort_rows(flat, _sort_threads(flat.size), False, _buffer_cache.empty)
    return rows


_IDENTITY = np.zeros(0, dtype=np.int64)


def _identity(n: int) -> np.ndarray:
    """``arange(n)`` as a read-only view of one kept array (grown as needed), not made every step."""
    global _IDENTITY
    if _IDENTITY.size < n:
        grown = np.arange(max(n, 2 * _IDENTITY.size), dtype=np.int64)
        grown.flags.writeable = False
        _IDENTITY = grown
    return _IDENTITY[:n]


# ============================================================================ lookup and renorm

def _renorm_rows(weight: np.ndarray, rows: np.ndarray, max_norm: float, norm_type: float) -> None:
    """Renormalise the distinct, validated ``rows`` of ``weight`` in place."""
    if rows.size == 0 or weight.shape[1] == 0:
        return
    n_threads = n_threads_for(rows.size, "renorm")
    if kernel_layout(weight):
        _renorm_kernel(weight, rows, max_norm, norm_type, n_threads)
    else:  # only the touched rows are copied, never the table
        block = np.ascontiguousarray(weight[rows])
        _renorm_kernel(block, np.arange(rows.size, dtype=np.int64), max_norm, norm_type, n_threads)
        weight[rows] = block


def _renorm_kernel(weight: np.ndarray, rows: np.ndarray, max_norm: float, norm_type: float, n_threads: int) -> None:
    """The renorm kernel for the table's format (16-bit tables through their uint16 view)."""
    if is_half(weight.dtype):
        bits, fmt = as_kernel_view(weight)
        _renorm.renorm_rows_half(bits, fmt, rows, max_norm, norm_type, n_threads)
    else:
        _renorm.renorm_rows(weight, rows, max_norm, norm_type, n_threads)


def renorm_referenced(weight: np.ndarray, flat: np.ndarray, max_norm: float, norm_type: float,
                      what: str = "max_norm renormalisation", rows: Optional[np.ndarray] = None) -> None:
    """Renormalise, in place, the distinct rows among validated indices ``flat`` (a float table);
    ``rows``: those distinct rows, ascending, when the caller has them already."""
    if flat.size == 0:
        return
    check_trainable(weight)
    check_writeable(weight, what)
    check_distinct_elements(weight, what)
    _renorm_rows(weight, _distinct_rows(flat) if rows is None else rows, max_norm, norm_type)


def _take_rows(weight: np.ndarray, shape: Tuple[int, ...], flat: np.ndarray,
               out_dtype: Optional[np.dtype] = None) -> np.ndarray:
    """``weight[flat]`` reshaped to ``shape + (dim,)``, a fresh array of ``out_dtype`` (a checked
    :func:`cembed._dtypes.resolve_out_dtype`; None: the table's compute dtype): a 16-bit table is
    widened to float32 on the fly, or copied as is when its own dtype is asked for."""
    dim = weight.shape[1]
    out_dtype = compute_dtype(weight.dtype) if out_dtype is None else out_dtype
    if not kernel_layout(weight):
        return np.take(weight, flat, axis=0).astype(out_dtype, copy=False).reshape(shape + (dim,))
    n_threads = n_threads_for(flat.size, "gather")
    if is_half(weight.dtype) and out_dtype == FLOAT32:
        bits, fmt = as_kernel_view(weight)
        out = _buffer_cache.empty((flat.size, dim), FLOAT32)
        _gather.gather_rows_widen(bits, fmt, flat, out, n_threads)
        return out.reshape(shape + (dim,))
    if is_half(weight.dtype):  # the 16-bit rows as they are
        bits, _ = as_kernel_view(weight)
        out_bits = _buffer_cache.empty((flat.size, dim), np.dtype(np.uint16))
        _gather.gather_rows(bits, flat, out_bits, n_threads)
        return out_bits.view(weight.dtype).reshape(shape + (dim,))
    out = _buffer_cache.empty((flat.size, dim), weight.dtype)
    _gather.gather_rows(weight, flat, out, n_threads)
    return out.reshape(shape + (dim,))


def lookup(weight: np.ndarray, indices: Any, max_norm: Optional[float], norm_type: float,
           save: bool = False, out_dtype: Any = None) -> Tuple[np.ndarray, Optional[SavedLookup]]:
    """The forward of :func:`embedding` on a checked weight and options; with ``save`` also the
    record its backward needs (a private copy of the indices; the row grouping when max_norm sorted
    them anyway, or :class:`GroupedIndices` carried it). ``out_dtype`` as :func:`embedding` takes it
    (checked here, before any work)."""
    out_dtype = resolve_out_dtype(out_dtype, weight.dtype)
    # the ids are checked in a copy when the caller could still write them (validated_indices): what
    # is kept for the backward is what was checked
    idx, flat = validated_indices(indices, weight.shape[0])
    if save:   # kept for the backward in memory read-only from birth (a fresh conversion is copied there)
        flat = frozen(flat)
    groups = index_groups(indices)   # GroupedIndices: grouped already
    if max_norm is not None:
        if groups is None and save and flat.size:   # the backward reuses this grouping
            groups = _group_rows(flat, kept=True)
        renorm_referenced(weight, flat, max_norm, norm_type, rows=None if groups is None else groups[1])
    out = _take_rows(weight, idx.shape, flat, out_dtype)
    saved = SavedLookup(flat, idx.shape, weight.shape[0], groups) if save else None   # private (above)
    return out, saved


def _checked_flags(scale_grad_by_freq: Any, sparse: Any, include_last_offset: Any = False) -> Tuple[bool, bool, bool]:
    """The flags of a functional call as bools: anything but a bool (or 0 / 1) is a ``TypeError``, as in
    torch — a string ``"False"`` is not taken as true."""
    return (check_bool(scale_grad_by_freq, "scale_grad_by_freq"), check_bool(sparse, "sparse"),
            check_bool(include_last_offset, "include_last_offset"))


def embedding(indices: Any, weight: np.ndarray, padding_idx: Optional[int] = None,
              max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False, *, out_dtype: Any = None) -> np.ndarray:
    """Look up rows of a table: ``weight[indices]``, like ``torch.nn.functional.embedding``.

    Parameters
    ----------
    indices : array_like of int
        Any shape, any integer dtype (int32/int64 are used without a copy), Python lists and scalars.
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32, float64, float16 or bfloat16 (used in place, never copied); an integer table is
        lookup-only (no ``max_norm``).
    padding_idx : int, optional
        Range-checked as in torch; it does not change the forward values (it masks the gradient).
    max_norm : float, optional
        Every distinct referenced row whose ``norm_type``-norm exceeds ``max_norm`` is scaled in place
        by ``max_norm / (norm + 1e-7)`` first — after every index was validated.
    norm_type : float, default 2.0
        The p of the p-norm for ``max_norm`` (``inf`` allowed).
    scale_grad_by_freq, sparse : bool, default False
        torch's signature, whole (``nn.Embedding.forward`` passes all seven arguments): checked, and
        without effect on the lookup — they shape the gradient, which :func:`embedding_backward`
        computes (give them to it).
    out_dtype : dtype, optional
        ``None``: float32 for a float16/bfloat16 table (exact), the weight's dtype otherwise. A 16-bit
        table may also ask for its own dtype (the rows as stored).

    Returns
    -------
    numpy.ndarray, shape (*indices.shape, embedding_dim)
        A new array of ``out_dtype``.

    Raises
    ------
    IndexError
        An index outside ``[0, num_embeddings)``; the message names the first one and its position.
    TypeError
        Non-integer indices, a non-numeric weight, ``max_norm`` on an integer table, a flag that is
        not a bool.
    ValueError
        A weight that is not 2-D, ``padding_idx`` out of range, a read-only weight with ``max_norm``.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> F.embedding([[0, 3], [1, 1]], weight)
    array([[[0., 1.],
            [6., 7.]],
    <BLANKLINE>
           [[2., 3.],
            [2., 3.]]], dtype=float32)
    >>> F.embedding([1, 2], weight.astype(np.float16))   # a 16-bit table: float32 results
    array([[2., 3.],
           [4., 5.]], dtype=float32)
    """
    weight = check_weight(weight, numeric=True)
    normalize_padding_idx(padding_idx, weight.shape[0])
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    _checked_flags(scale_grad_by_freq, sparse)
    out, _ = lookup(weight, indices, max_norm, norm_type, out_dtype=out_dtype)
    return out


def embedding_renorm_(weight: np.ndarray, indices: Any, max_norm: float, norm_type: float = 2.0) -> np.ndarray:
    """Renormalise, in place, the rows ``indices`` refer to (``torch.embedding_renorm_``).

    Every distinct referenced row whose ``norm_type``-norm is strictly greater than ``max_norm`` is
    multiplied by ``max_norm / (norm + 1e-7)`` (the factor rounded to the weight's dtype). A
    float16/bfloat16 row is computed in float32 and each element rounded once, as torch does.

    Parameters
    ----------
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32, float64, float16 or bfloat16, writeable.
    indices : array_like of int
        Any shape; every index is validated before any row is touched.
    max_norm : float
    norm_type : float, default 2.0

    Returns
    -------
    numpy.ndarray
        ``weight`` itself.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`embedding`; ``max_norm=None`` is a ``TypeError``.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> w = np.array([[3.0, 4.0], [0.3, 0.4]])
    >>> F.embedding_renorm_(w, [0, 1], max_norm=1.0).round(6)
    array([[0.6, 0.8],
           [0.3, 0.4]])
    """
    weight = check_weight(weight)
    if max_norm is None:
        raise TypeError("embedding_renorm_: max_norm must be a real number, got None")
    bound, norm_type = check_max_norm(max_norm, norm_type)
    assert bound is not None
    _, flat = validated_indices(indices, weight.shape[0])
    renorm_referenced(weight, flat, bound, norm_type, "embedding_renorm_")
    return weight


# ============================================================================ gradients

class RowRule(NamedTuple):
    """An optimizer's update of one row, as the one-pass kernels apply it (``_rows.pxd``'s
    ``apply_row_update``): ``kind`` is a ``_grad.UpdateKind``, ``states`` = (state_a, state_b,
    row_state) with None where the kind has none, ``params`` its four float parameters, ``mode`` and
    ``maximize``; the per-row kinds (SparseAdam with per-row bias correction, SparseAdamW) also have
    per-row arrays (``row_log``: float64, ``counts``: int64; None where absent) and the float64
    scalars ``rule_params`` (lr, beta1, beta2, decay_log, decay_log_prev, decay_last, step_size,
    bc2_sqrt). The optimizers build it (``Optimizer._row_rule``) from state checked in the same call."""
    kind: int
    states: Tuple[Optional[np.ndarray], Optional[np.ndarray], Optional[np.ndarray]]
    params: Tuple[float, float, float, float]
    mode: int
    maximize: bool
    row_log: Optional[np.ndarray] = None
    counts: Optional[np.ndarray] = None
    rule_params: Tuple[float, ...] = ()

    def arrays(self) -> Tuple[Optional[np.ndarray], ...]:
        """Every per-row array the update writes besides the weight: the states, then row_log and
        counts (None where absent)."""
        return tuple(self.states) + (self.row_log, self.counts)

    def rule_args(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row_log, counts, rule_params) as the kernels take them: empty arrays where absent."""
        return (np.zeros(0, np.float64) if self.row_log is None else self.row_log,
                np.zeros(0, np.int64) if self.counts is None else self.counts,
                np.asarray(self.rule_params, dtype=np.float64))

    def kernel_args(self, dtype: np.dtype) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                                    np.ndarray]:
        """(state_a, state_b, row_state, row_log, counts, rule_params) as the float kernels
        (``update_rows``, ``segment_update``, ``logistic_scores_update``) take them, absent states as
        empty arrays of the weight's ``dtype``."""
        state_a, state_b, row_state = self.states
        empty2, empty1 = np.zeros((0, 0), dtype=dtype), np.zeros(0, dtype=dtype)
        return (empty2 if state_a is None else state_a, empty2 if state_b is None else state_b,
                empty1 if row_state is None else row_state, *self.rule_args())


class RowContributions:
    """What one backward adds to a table's gradient, not yet summed: entry ``k`` adds
    ``scale[k] * values[src[k]]`` to row ``rows[k]`` (``src`` defaults to ``k``, ``scale`` to 1),
    except entries of row ``padding_idx``; with ``scale_grad_by_freq`` each term is divided by the
    count of its row. Every array has been validated by the caller. ``values`` may be 16-bit (a
    16-bit table's ``grad_output``): the sums are then float32 (``dtype``), each element widened
    exactly, so the bits are those of ``values.astype(float32)``."""

    __slots__ = ("values", "rows", "src", "scale", "padding_idx", "scale_grad_by_freq", "groups")

    def __init__(self, values: np.ndarray, rows: np.ndarray, *, src: Optional[np.ndarray] = None,
                 scale: Optional[np.ndarray] = None, padding_idx: Optional[int] = None,
                 scale_grad_by_freq: bool = False,
                 groups: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> None:
        self.values, self.rows, self.src, self.scale = values, rows, src, scale
        self.padding_idx, self.scale_grad_by_freq, self.groups = padding_idx, bool(scale_grad_by_freq), groups

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the sums (and of ``scale``): float32 for 16-bit values."""
        return compute_dtype(self.values.dtype)

    def apart_from(self, *targets: np.ndarray) -> "RowContributions":
        """These contributions, with ``values`` and ``scale`` replaced by copies where they may share
        memory with any of ``targets`` (the table or gradient they are about to be added into, the
        optimizer state a fused update writes) — also as another memory map of the same file
        (``_memory.may_share``); returns ``self``. A caller's ``grad_output`` can be a
        view of the weight or of the state, and a kernel updating rows in place must not read
        gradient rows it has already written. (In place: whatever the caller reads from this object
        afterwards, e.g. a scoring's results, comes from the copies too.)"""
        values, scale = self.values, self.scale
        if any(may_share(values, t) for t in targets):
            values = values.copy()
        if scale is not None and any(may_share(scale, t) for t in targets):
            scale = scale.copy()
        self._set_values(values, scale)
        return self

    def _set_values(self, values: np.ndarray, scale: Optional[np.ndarray]) -> None:
        self.values, self.scale = values, scale

    def check_consistent(self) -> None:
        """ValueError unless every per-entry array has one entry per row id (made in this call from
        validated arguments; checked before an optimizer changes anything), and group the entries by
        row now (the sort a fused update would start with: its result does not depend on when)."""
        n_entries = self.rows.size
        for name, arr in (("src", self.src), ("scale", self.scale)):
            if arr is not None and arr.size != n_entries:
                raise ValueError(f"backward: {arr.size} {name} entries for {n_entries} indices")
        if self.groups is None:
            self.groups = self._grouped()

    def _kernel_values(self) -> Tuple[np.ndarray, int]:
        """(values for a kernel, their format code): 16-bit values as their uint16 bit patterns."""
        return as_kernel_view(self.values)

    def _sources(self, order: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, src, scale) as the segment kernels take them. Entries with a source row or a scale
        (bags, per-sample weights) have both taken in sorted order here, once, and the kernel gets the
        identity order: it then reads them sequentially, where ``src[order[k]]`` was a dependent random
        load per entry (the largest stall of the bag backward). The same values in the same order: the
        same bits."""
        no_scale = np.zeros(0, dtype=self.dtype)
        if self.src is None and self.scale is None:
            return order, _NO_POSITIONS, no_scale
        src = order if self.src is None else _buffer_cache.empty(order.shape, np.int64)
        scale = no_scale if self.scale is None else _buffer_cache.empty(order.shape, self.scale.dtype)
        _grad.permute_sources(order, _NO_POSITIONS if self.src is None else self.src,
                              no_scale if self.scale is None else self.scale,
                              _NO_POSITIONS if self.src is None else src, scale,
                              _sort_threads(order.size))   # a light pass over the entries: as the sort
        return _identity(order.size), src, scale

    def _grouped(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, distinct rows, segment starts): the grouping given at construction, or sorted now."""
        return self.groups if self.groups is not None else _group_rows(self.rows)

    def _padding_segment(self, seg_rows: np.ndarray) -> int:
        """The segment of the padding row among the distinct rows ``seg_rows``, or -1 (none or absent)."""
        if self.padding_idx is None or not seg_rows.size:
            return -1
        hit = int(np.searchsorted(seg_rows, self.padding_idx))
        return hit if hit < seg_rows.size and seg_rows[hit] == self.padding_idx else -1

    def _segments(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        order, seg_rows, starts = self._grouped()
        seg_ids = _identity(seg_rows.size)
        skip = self._padding_segment(seg_rows)
        if skip >= 0:
            seg_ids = np.delete(seg_ids, skip)
        return order, seg_rows, starts, seg_ids

    def _sum(self, out: np.ndarray, scatter: bool,
             segments: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
             sources: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> None:
        order, seg_rows, starts, seg_ids = segments
        order, src, scale = self._sources(order) if sources is None else sources
        values, values_fmt = self._kernel_values()
        _grad.segment_sum(values, values_fmt, order, starts, seg_rows, seg_ids, src, scale,
                          self.scale_grad_by_freq, out, scatter, n_threads_for(seg_ids.size, "segment"))

    def _compact(self) -> Tuple[np.ndarray, np.ndarray]:
        """(distinct rows, their summed values)."""
        segments = self._segments()
        compact = _buffer_cache.empty((segments[3].size, self.values.shape[1]), self.dtype)
        self._sum(compact, False, segments)
        seg_rows, seg_ids = segments[1], segments[3]
        return (seg_rows if seg_ids.size == seg_rows.size else seg_rows[seg_ids]), compact

    def sparse(self, num_rows: int) -> SparseGrad:
        rows, values = self._compact()
        return SparseGrad._from_private(rows, values, num_rows)

    def update_rows(self, weight: np.ndarray, rule: RowRule) -> None:
        """Fused backward + update in one pass: sum each distinct row's contributions into a scratch
        row and apply the optimizer's row update ``rule`` to ``weight`` and its state at once;
        ``weight`` must have :func:`kernel_layout` (and 16-bit values a 16-bit weight:
        :meth:`update_rows_half`). Bitwise what :meth:`sparse` + the optimizer's kernel give."""
        order, seg_rows, starts, seg_ids = self._segments()
        order, src, scale = self._sources(order)
        _grad.segment_update(self.values, order, starts, seg_rows, seg_ids, src, scale, self.scale_grad_by_freq,
                             rule.kind, weight, *rule.kernel_args(self.values.dtype), *rule.params, rule.mode,
                             rule.maximize, n_threads_for(seg_ids.size, "segment"))

    def update_rows_half(self, bits: np.ndarray, weight_fmt: int, rule: RowRule, states: Tuple[np.ndarray, ...],
                         state_fmt: int, stochastic: bool, seed: int, step: int, key_first: int = 0,
                         key_stride: int = 1) -> None:
        """:meth:`update_rows` for a 16-bit (float16 / bfloat16) weight given as its uint16 ``bits``
        (unit column stride) and format code, with float32 or 16-bit gradient values: each row is updated in
        float32 and every element of the weight and of 16-bit state is rounded once (stochastically
        with the key (seed, step, key_first + key_stride * row, stream), or to nearest; docs/behaviour.md
        §8.7). ``states`` = ``rule.states`` as the kernel takes them: float32 arrays, or uint16 bits of
        format ``state_fmt``, empty where the update has none. Bitwise what :meth:`sparse` + the
        optimizer's unfused step give."""
        order, seg_rows, starts, seg_ids = self._segments()
        order, src, scale = self._sources(order)
        state_a, state_b, row_state = states
        values, values_fmt = self._kernel_values()
        _grad.segment_update_half(values, values_fmt, order, starts, seg_rows, seg_ids, src, scale,
                                  self.scale_grad_by_freq,
                                  rule.kind, bits, weight_fmt, state_a, state_b, row_state, state_fmt,
                                  *rule.rule_args(), *rule.params, rule.mode, rule.maximize, stochastic, seed, step,
                                  key_first, key_stride, n_threads_for(seg_ids.size, "segment"))

    def chunks(self, chunk_bytes: int = 1 << 20) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """The summed gradient a chunk of distinct rows at a time: ``(rows, values)`` pairs, rows
        ascending, each chunk about ``chunk_bytes`` of values (cache-sized, in one reused buffer: use
        a chunk before asking for the next). Each row's sum is exactly the one :meth:`sparse` gives."""
        order, seg_rows, starts, seg_ids = self._segments()
        dim = self.values.shape[1]
        per_chunk = max(64, chunk_bytes // max(1, dim * self.dtype.itemsize))
        scratch = np.empty((min(per_chunk, seg_ids.size), dim), dtype=self.dtype)
        sources = self._sources(order)
        for lo in range(0, seg_ids.size, per_chunk):
            ids = seg_ids[lo:lo + per_chunk]
            out = scratch[:ids.size]
            self._sum(out, False, (order, seg_rows, starts, ids), sources)
            yield seg_rows[ids], out

    def dense(self, num_rows: int) -> np.ndarray:
        segments = self._segments()
        out = np.empty((num_rows, self.values.shape[1]), dtype=self.dtype)
        _grad.zero_fill(out, n_threads_for(out.size, "zero_fill"))  # parallel first touch
        self._sum(out, True, segments)
        return out

    def add_into(self, out: np.ndarray) -> np.ndarray:
        """out + this gradient, row by row as torch adds gradients (old + (new summed from zero))."""
        rows, values = self._compact()
        out[rows] += values
        return out


class MaxRouting:
    """The gradient of max pooling: ``grad_output[b, d]`` goes to row ``argmax[b, d]`` (none for -1)."""

    __slots__ = ("grad_output", "argmax")

    def __init__(self, grad_output: np.ndarray, argmax: np.ndarray) -> None:
        self.grad_output, self.argmax = grad_output, argmax

    def sparse(self, num_rows: int) -> SparseGrad:  # pragma: no cover - refused at validation
        raise ValueError("max mode does not support sparse weights")

    def apart_from(self, *targets: np.ndarray) -> "MaxRouting":
        """As :meth:`RowContributions.apart_from`: ``grad_output`` copied if it may share memory with
        any of ``targets``."""
        if any(may_share(self.grad_output, t) for t in targets):
            self.grad_output = self.grad_output.copy()
        return self

    def check_consistent(self) -> None:
        """As :meth:`RowContributions.check_consistent`: one winning row per output element."""
        if self.argmax.shape != self.grad_output.shape:
            raise ValueError(f"backward: argmax of shape {self.argmax.shape} for a gradient of shape "
                             f"{self.grad_output.shape}")

    def dense(self, num_rows: int) -> np.ndarray:
        """The gradient alone: zero, plus ``grad_output[b, d]`` at ``argmax[b, d]``, bags in order."""
        out = np.zeros((num_rows, self.grad_output.shape[1]), dtype=self.grad_output.dtype)
        _bag.max_backward(self.grad_output, self.argmax, out, n_threads_for(out.shape[1], "column_block"))
        return out

    def add_into(self, out: np.ndarray) -> np.ndarray:
        """out + this gradient as torch adds gradients, old + (new summed from zero): the new gradient
        of the rows it touches is summed into zeroed compact rows first, then added to ``out``. (Adding
        each bag straight into ``out`` would round ``(old + g1) + g2`` where torch rounds
        ``old + (g1 + g2)``.)"""
        routed = self.argmax >= 0
        rows = np.unique(self.argmax[routed])
        if rows.size == 0:
            return out
        compact_argmax = np.where(routed, np.searchsorted(rows, self.argmax), -1).astype(np.int64, copy=False)
        new = np.zeros((rows.size, self.grad_output.shape[1]), dtype=self.grad_output.dtype)
        _bag.max_backward(self.grad_output, np.ascontiguousarray(compact_argmax), new,
                          n_threads_for(new.shape[1], "column_block"))
        out[rows] += new
        return out


def add_to_grad(old: Any, new: Union[RowContributions, MaxRouting], shape: Tuple[int, int],
                dtype: np.dtype, sparse: bool) -> Grad:
    """The module's next ``.grad``: ``old`` (``None``, a dense array or a SparseGrad, whatever the
    caller left there — it is checked, not trusted) plus the contributions ``new``.

    ``None`` becomes the new gradient (sparse when ``sparse``); a SparseGrad is merged with a sparse
    one, or densified when the module is dense; a dense gradient stays dense and is added to in
    place."""
    if old is None:
        return new.sparse(shape[0]) if sparse else new.dense(shape[0])
    if isinstance(old, SparseGrad):
        check_exact_sparse_grad(old, ".grad")   # as step() refuses it
        if old.shape != shape or old.dtype != dtype:
            raise ValueError(f".grad is a SparseGrad of shape {old.shape} and dtype {old.dtype}, but the weight "
                             f"is {shape} {dtype}: call zero_grad() after replacing the weight")
        return old.merge(new.sparse(shape[0])) if sparse else new.add_into(old.to_dense())
    if not isinstance(old, np.ndarray) or old.shape != shape or old.dtype != dtype:
        what = f"an array of shape {old.shape} and dtype {old.dtype}" if isinstance(old, np.ndarray) \
            else type(old).__name__
        raise ValueError(f".grad is {what}, but the weight is {shape} {dtype}: call zero_grad() "
                         "after replacing the weight or the gradient")
    check_writeable(old, "backward", ".grad")
    return new.add_into(old)


def weighted_contributions(grad_output: Any, idx_shape: Tuple[int, ...], flat: np.ndarray,
                           per_sample_weights: Any, dim: Optional[int] = None,
                           dtype: Optional[np.dtype] = None,
                           table_dtype: Optional[np.dtype] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the gradient of ``(per_sample_weights[..., None] * weight[indices]).sum(-2)``: grad_output
    has shape indices.shape[:-1] + (dim,) and entry (..., k) contributes
    per_sample_weights[..., k] * grad_output[...]. Returns (values, src, scale)."""
    if len(idx_shape) < 1:
        raise ValueError("per_sample_weights needs indices with at least one dimension")
    psw = as_array(per_sample_weights)
    if psw.shape != idx_shape:
        raise ValueError(f"per_sample_weights must have the shape of indices {idx_shape}, got {psw.shape}")
    values = check_gradient_rows(grad_output, idx_shape[:-1], dim=dim, dtype=dtype, table_dtype=table_dtype,
                                 lead="indices.shape[:-1]")
    if psw.dtype != compute_dtype(values.dtype):
        raise TypeError(f"per_sample_weights must have dtype {compute_dtype(values.dtype)}, got {psw.dtype}")
    src = np.repeat(np.arange(values.shape[0], dtype=np.int64), idx_shape[-1])
    return values, src, kernel_array(psw).reshape(-1)


def lookup_contributions(grad_output: Any, shape: Tuple[int, ...], flat: np.ndarray, *,
                         per_sample_weights: Any = None, padding_idx: Optional[int] = None,
                         scale_grad_by_freq: bool = False, dim: Optional[int] = None,
                         dtype: Optional[np.dtype] = None, table_dtype: Optional[np.dtype] = None,
                         groups: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> RowContributions:
    """Check ``grad_output`` (and ``per_sample_weights``) against a lookup of validated indices
    (``dtype``, ``table_dtype``: as :func:`check_gradient_rows` takes them)."""
    src = scale = None
    if per_sample_weights is None:
        values = check_gradient_rows(grad_output, shape, dim=dim, dtype=dtype, table_dtype=table_dtype)
    else:
        values, src, scale = weighted_contributions(grad_output, shape, flat, per_sample_weights, dim, dtype,
                                                    table_dtype)
    return RowContributions(values, flat, src=src, scale=scale, padding_idx=padding_idx,
                            scale_grad_by_freq=scale_grad_by_freq, groups=groups)


def embedding_backward(grad_output: Any, indices: Any, num_embeddings: int, padding_idx: Optional[int] = None,
                       scale_grad_by_freq: bool = False, sparse: bool = False,
                       per_sample_weights: Any = None) -> Grad:
    """The gradient of :func:`embedding` with respect to the weight.

    Each row's contributions are summed in input order on one thread: bitwise equal to torch's dense
    gradient and identical for any thread count. Work and memory of the sparse gradient follow the
    batch, never the table size.

    Parameters
    ----------
    grad_output : numpy.ndarray, shape (*indices.shape, embedding_dim)
        d(loss)/d(output), float32 or float64; float16 or bfloat16 (the ``out_dtype`` of a 16-bit
        table's lookup) is summed in float32, each element widened exactly, and gives a float32
        gradient: the bits of ``grad_output.astype(numpy.float32)``.
    indices : array_like of int
        The indices of the forward.
    num_embeddings : int
        Rows of the table.
    padding_idx : int, optional
        That row's gradient is zero (absent from a sparse gradient).
    scale_grad_by_freq : bool, default False
        Divide each row's contributions by its count in ``indices`` — for sparse gradients too
        (torch refuses that combination).
    sparse : bool, default False
        Return a coalesced :class:`cembed.SparseGrad` instead of a dense array.
    per_sample_weights : numpy.ndarray, optional
        Shape of ``indices``: the gradient of the weighted sum over the last index axis,
        ``(per_sample_weights[..., None] * embedding(indices, weight)).sum(-2)``, instead;
        ``grad_output`` then has shape ``indices.shape[:-1] + (embedding_dim,)`` and no per-index
        gradient row is materialised.

    Returns
    -------
    numpy.ndarray of shape (num_embeddings, embedding_dim), or SparseGrad

    Raises
    ------
    IndexError, TypeError, ValueError
        Bad indices, dtypes or shapes; nothing is computed.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> g = F.embedding_backward(np.ones((3, 2), np.float32), [2, 0, 2], num_embeddings=4, sparse=True)
    >>> g.indices, g.values
    (array([0, 2]), array([[1., 1.],
           [2., 2.]], dtype=float32))
    """
    num_embeddings = check_size(num_embeddings, "num_embeddings")
    padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
    scale_grad_by_freq, sparse, _ = _checked_flags(scale_grad_by_freq, sparse)
    idx, flat = validated_indices(indices, num_embeddings)
    new = lookup_contributions(grad_output, idx.shape, flat, per_sample_weights=per_sample_weights,
                               padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                               groups=index_groups(indices))
    return new.sparse(num_embeddings) if sparse else new.dense(num_embeddings)


def coalesce(rows: Any, values: Any, num_rows: int) -> SparseGrad:
    """Sum the value rows that share a row id (what NumPy users reach ``np.add.at`` for).

    Parameters
    ----------
    rows : array_like of int, shape (n,)
        In ``[0, num_rows)``, any order, repeats allowed.
    values : numpy.ndarray, shape (n, dim)
        float32 or float64.
    num_rows : int

    Returns
    -------
    SparseGrad
        Distinct rows ascending; each row's values summed in input order (deterministic for any
        thread count).

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> g = F.coalesce([3, 1, 3], np.array([[1.0], [2.0], [4.0]]), num_rows=5)
    >>> g.indices, g.values[:, 0]
    (array([1, 3]), array([2., 5.]))
    """
    num_rows = check_size(num_rows, "num_rows")
    idx, flat = validated_indices(rows, num_rows, name="rows")
    if idx.ndim != 1:
        raise ValueError(f"rows must be 1-D, got shape {idx.shape}")
    values = check_gradient_rows(values, idx.shape, name="values")
    return RowContributions(values, flat, groups=index_groups(rows)).sparse(num_rows)


def check_indices(indices: Any, num_rows: int, name: str = "indices") -> np.ndarray:
    """``indices`` checked as every lookup checks them: an int32 or int64 array of their shape whose
    every value is in ``[0, num_rows)``.

    For a caller that keeps or sends indices elsewhere (``cembed.distributed`` checks a batch with it
    before any shard sees it). Any signed or unsigned integer dtype and Python integer lists are taken;
    a list NumPy cannot make an integer array of although it holds only integers (ints beyond int64,
    uint64 mixed with signed ints) is checked as the integers it holds. When the caller could still
    write the memory the ids came in, the result is a read-only private copy (what was checked is what
    a later reader sees); otherwise the conversion itself.

    Parameters
    ----------
    indices : array_like of int
        Any shape.
    num_rows : int
        The table's number of rows.
    name : str
        What the error messages call the indices.

    Returns
    -------
    numpy.ndarray of int32 or int64, the shape of ``indices``

    Raises
    ------
    IndexError
        An id outside ``[0, num_rows)`` (negative included), named with its position.
    TypeError
        Non-integer indices (bool, float, object).

    Examples
    --------
    >>> from cembed import functional as F
    >>> F.check_indices([[3, 1], [0, 2]], num_rows=4)
    array([[3, 1],
           [0, 2]])
    >>> F.check_indices([4], num_rows=4)
    Traceback (most recent call last):
    ...
    IndexError: indices contains 4 at position 0, outside the valid range [0, 4)
    """
    num_rows = check_size(num_rows, "num_rows")
    idx, _ = validated_indices(indices, num_rows, name)
    return idx


def group_rows(indices: Any, num_rows: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal row ids with the radix sort the backward uses: ``(order, rows, starts)``.

    For a caller that keeps a batch's grouping for its backward (``lookup_contributions(...,
    groups=...)`` sums over it exactly as :func:`embedding_backward` does: each row's
    contributions in input order). To hand a grouping to the public calls, use :func:`group_indices`.

    Parameters
    ----------
    indices : array_like of int
        Any shape (flattened), in ``[0, num_rows)``.
    num_rows : int

    Returns
    -------
    order : numpy.ndarray of int64, shape (n,)
        A stable argsort of the flat indices (equal ids keep their input order).
    rows : numpy.ndarray of int64, shape (u,)
        The distinct ids, ascending.
    starts : numpy.ndarray of int64, shape (u + 1,)
        Row ``rows[s]`` is at positions ``order[starts[s]:starts[s + 1]]``.

    Raises
    ------
    IndexError, TypeError
        An id outside ``[0, num_rows)``, non-integer indices.

    Examples
    --------
    >>> from cembed import functional as F
    >>> order, rows, starts = F.group_rows([3, 1, 3, 0], num_rows=4)
    >>> order, rows, starts
    (array([3, 1, 0, 2]), array([0, 1, 3]), array([0, 1, 2, 4]))
    """
    num_rows = check_size(num_rows, "num_rows")
    _, flat = validated_indices(indices, num_rows)
    return _group_rows(flat)


def group_indices(indices: Any, num_rows: int) -> GroupedIndices:
    """Check ``indices`` against a table of ``num_rows`` rows and group them by row, once, ahead of
    the calls that use them — in a data-loading thread, say, while the previous batch trains.

    Every function and module method that takes ``indices`` (or ``rows``) for a lookup, a scoring or
    a backward — :func:`embedding`, :func:`embedding_backward`, :func:`coalesce`, the
    ``embedding_dot*`` functions, :class:`cembed.Embedding`'s ``forward``, ``backward`` and
    ``dot_logistic_backward`` — also takes the result: it skips the range check (re-done against a
    table that has fewer rows than ``num_rows`` now) and the backward's sort (the grouping made here
    is the one the backward would make: a stable radix sort of the row ids). The results are bitwise
    those of the plain indices. The grouping is about as costly as the sort it saves (a few ms per
    million indices, on one thread), so it pays where it runs beside the step instead of in it.

    The result keeps copies in memory that cannot be made writeable (``numpy.asarray`` of it is a
    writeable copy): changing ``indices`` afterwards changes nothing, and neither can anything done to
    what it hands out. It is immutable, made only by this function, and may be passed between
    threads.

    Parameters
    ----------
    indices : array_like of int
        Any shape, in ``[0, num_rows)``.
    num_rows : int

    Returns
    -------
    GroupedIndices
        ``.shape``, ``.num_rows``, ``.n_distinct``.

    Raises
    ------
    IndexError, TypeError
        An id outside ``[0, num_rows)``, non-integer indices.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> from cembed import functional as F
    >>> emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    >>> opt = cembed.optim.SGD([emb], lr=0.1)
    >>> batch = F.group_indices(np.array([[3, 1], [3, 7]]), num_rows=10)   # e.g. in a loader thread
    >>> batch
    GroupedIndices(shape=(2, 2), dtype=int64, num_rows=10, n_distinct=3)
    >>> out = emb(batch)
    >>> emb.backward(np.ones_like(out), batch, optimizer=opt)   # no sort here
    """
    num_rows = check_size(num_rows, "num_rows")
    if isinstance(indices, GroupedIndices):
        idx, flat = validated_indices(indices, num_rows)
        return indices if num_rows >= indices.num_rows else GroupedIndices._make(flat, idx.shape, num_rows,
                                                                                 indices.groups)
    # the private copy first, then its check and sort (the copy and the sort's outputs written by C code
    # into blocks read-only from birth: no writeable alias of them exists at any moment, and recycled
    # blocks spare the fresh pages of every batch)
    return group_new(indices, num_rows, _sort_threads)


# ============================================================================ bags

class SavedBags:
    """A validated bag call: private read-only copies of the flat indices, the CSR offsets
    (``n_bags + 1``) and the per-sample weights; the mode and padding row; the table size they were
    checked against; max-mode's winners (``argmax``) once pooled."""

    __slots__ = ("flat", "offsets", "n_bags", "mode", "padding_idx", "psw", "input_shape", "n_rows", "table",
                 "argmax")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray, mode: str, padding_idx: Optional[int],
                 psw: Optional[np.ndarray], input_shape: Tuple[int, ...], weight: np.ndarray) -> None:
        self.flat, self.offsets, self.n_bags = flat, offsets, int(offsets.size - 1)
        self.mode, self.padding_idx, self.psw, self.input_shape = mode, padding_idx, psw, input_shape
        self.n_rows: int = int(weight.shape[0])
        self.table: Tuple[int, np.dtype] = (int(weight.shape[1]), weight.dtype)
        self.argmax: Optional[np.ndarray] = None

    def check_table(self, weight: np.ndarray) -> None:
        """The saved call against the table as it is *now*: same dim and dtype as at the forward
        (max-mode winners and per-sample weights depend on them), rows checked as
        :meth:`SavedLookup.check_rows` does."""
        if (weight.shape[1], weight.dtype) != self.table:
            raise ValueError(f"the weight changed from {self.table[0]} columns of {self.table[1]} at the forward to "
                             f"{weight.shape[1]} columns of {weight.dtype}: run the forward again")
        n_rows = weight.shape[0]
        if n_rows < self.n_rows:
            check_index_range(self.flat, (self.flat.size,), n_rows, "input (saved at forward)")
            self.n_rows = n_rows

    def bag_of_entry(self) -> np.ndarray:
        """(n_indices,) int64: the bag each entry belongs to."""
        return np.repeat(np.arange(self.n_bags, dtype=np.int64), np.diff(self.offsets))

    def counts(self) -> np.ndarray:
        """(n_bags,) number of non-padding entries per bag."""
        sizes = np.diff(self.offsets)
        if self.padding_idx is None:
            return sizes
        cum = np.zeros(self.flat.size + 1, dtype=np.int64)
        np.cumsum(self.flat == self.padding_idx, dtype=np.int64, out=cum[1:])
        return sizes - (cum[self.offsets[1:]] - cum[self.offsets[:-1]])


def _csr_offsets(offsets: Any, n_total: int, include_last_offset: bool) -> np.ndarray:
    """Validated bag boundaries: ``offsets`` must start at 0, be non-decreasing and lie in
    ``[0, n_total]`` (with ``include_last_offset`` end at ``n_total``). Returns a new int64 array of
    n_bags + 1 boundaries."""
    try:
        off = as_index_array(offsets, "offsets")
    except IndexError:   # a uint64 (or Python int) offset beyond int64: outside [0, n_total] for any input
        raise ValueError(f"offsets contains a value outside the int64 range: offsets must lie in [0, {n_total}] "
                         f"(the input's length)") from None
    if off.ndim != 1:
        raise ValueError(f"offsets has to be a 1D array, got shape {off.shape}")
    off = np.array(off, dtype=np.int64, copy=True)   # private first, then checked: kept as checked
    if include_last_offset and off.size == 0:
        raise ValueError("include_last_offset: number of offsets should be at least 1")
    if off.size:
        if off[0] != 0:
            raise ValueError(f"offsets[0] has to be 0, i.e. the first bag starts at the first index, got {off[0]}")
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
        return off
    if off.size == 0 and n_total > 0:   # torch: no bags, and a gradient read from unset memory
        raise ValueError(f"offsets is empty but the input has {n_total} indices: every index must belong to a bag "
                         "(offsets=[0] makes one bag of them all)")
    return np.append(off, np.int64(n_total))


def validate_bags(input: Any, weight: np.ndarray, offsets: Any = None, mode: str = "mean",
                  per_sample_weights: Any = None, include_last_offset: bool = False,
                  padding_idx: Optional[int] = None, sparse: bool = False,
                  scale_grad_by_freq: bool = False) -> SavedBags:
    """Every check of an embedding_bag call, in torch's order (docs/behaviour.md), before any work."""
    if weight.dtype.kind not in "iu" and not is_table_dtype(weight.dtype):
        raise TypeError(f"embedding_bag: weight must be float32 or float64, float16 or bfloat16 (or an integer "
                        f"lookup table), got {weight.dtype}")
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
    if not isinstance(mode, str) or str.__str__(mode) not in BAG_MODES:
        raise ValueError(f"mode has to be one of sum, mean or max, got {mode!r}")
    mode = str.__str__(mode)   # a plain str from here on (a str subclass's own comparisons are not trusted)
    if mode == "max" and scale_grad_by_freq:
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if mode == "max" and sparse:
        raise ValueError("max mode does not support sparse weights")
    psw = None
    if per_sample_weights is not None:
        if mode != "sum":
            raise ValueError(f"per_sample_weights is only supported for mode='sum' (got mode={mode!r})")
        psw = as_array(per_sample_weights)
        if psw.shape != idx.shape:
            raise ValueError(f"per_sample_weights must have the same shape as the input {idx.shape}, got {psw.shape}")
        check_per_sample_weights(psw, weight)
    padding_idx = normalize_padding_idx(padding_idx, n_rows)
    if idx.ndim == 2:
        n_bags, bag_len = idx.shape
        csr = np.arange(n_bags + 1, dtype=np.int64) * bag_len
    else:
        csr = _csr_offsets(offsets, idx.size, include_last_offset)
    flat = checked_private_indices(idx, input, n_rows, "input")   # copied first, then checked: kept as checked
    # kept for the backward in memory read-only from birth (a fresh conversion, and the offsets, are
    # copied there): a flag cleared on an ordinary array could be set again
    flat, csr = frozen(flat), frozen(csr)
    psw_kept = None if psw is None else _buffer_cache.frozen_copy(psw).reshape(-1)   # private, read-only
    bags = SavedBags(flat, csr, mode, padding_idx, psw_kept, idx.shape, weight)
    return bags


def _pool_numeric(weight: np.ndarray, bags: SavedBags) -> np.ndarray:
    """Bags of an integer (lookup-only) table, which torch refuses: sums in int64, means in float64,
    maxima in the table's dtype; padding entries skipped; empty bags give 0."""
    keep = np.ones(bags.flat.size, dtype=bool) if bags.padding_idx is None else bags.flat != bags.padding_idx
    rows = np.take(weight, bags.flat, axis=0)
    starts, ends = bags.offsets[:-1], bags.offsets[1:]
    if bags.mode == "max":
        out = np.zeros((bags.n_bags, weight.shape[1]), dtype=weight.dtype)
        low = np.iinfo(weight.dtype).min
        masked = np.where(keep[:, None], rows, low)
        filled = np.flatnonzero(ends > starts)
        if filled.size:
            best = np.maximum.reduceat(masked, starts[filled], axis=0)
            has = np.add.reduceat(keep.astype(np.int64), starts[filled]) > 0
            out[filled[has]] = best[has]
        return out
    values = np.where(keep[:, None], rows, 0)
    largest = max(abs(int(values.min())), abs(int(values.max()))) if values.size else 0
    longest = int(np.diff(bags.offsets).max(initial=0))
    # every bag's sum fits int64: the int64 running sums may wrap, but each difference of two of
    # them (one bag) is then exact, as two's-complement arithmetic is exact modulo 2**64
    if largest * longest <= np.iinfo(np.int64).max:
        cum = np.zeros((bags.flat.size + 1, weight.shape[1]), dtype=np.int64)
        np.cumsum(values, axis=0, dtype=np.int64, out=cum[1:])
        sums = cum[ends] - cum[starts]
        if bags.mode == "sum":
            return sums
        return sums / np.maximum(bags.counts(), 1)[:, None]
    # values this large are summed exactly (Python integers), never wrapped: a sum outside int64 is an
    # error, a mean is the exact sum divided in float64
    exact = np.zeros((bags.n_bags, weight.shape[1]), dtype=object)
    filled = np.flatnonzero(ends > starts)
    if filled.size:
        exact[filled] = np.add.reduceat(values.astype(object), starts[filled], axis=0)
    if bags.mode == "mean":
        return exact.astype(np.float64) / np.maximum(bags.counts(), 1)[:, None]
    info = np.iinfo(np.int64)
    outside = (exact > info.max) | (exact < info.min)
    if outside.any():
        bag, column = (int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"embedding_bag: the sum of bag {bag} (column {column}) of this integer table is "
                         f"{exact[bag, column]}, outside int64 (integer bags sum in int64)")
    return exact.astype(np.int64)


def _bag_table(weight: np.ndarray, bags: SavedBags) -> Tuple[np.ndarray, np.ndarray, Optional[int]]:
    """(table, row ids, padding row) for the bag kernels: the weight itself when its layout allows,
    else a contiguous copy of only the rows the bags use (one per entry, then a last row standing for
    the padding row) — never a copy of the whole table."""
    if kernel_layout(weight):
        return weight, bags.flat, bags.padding_idx
    n = bags.flat.size
    table = np.empty((n + 1, weight.shape[1]), dtype=weight.dtype)
    np.take(weight, bags.flat, axis=0, out=table[:n])
    table[n] = 0
    positions = np.arange(n, dtype=np.int64)
    if bags.padding_idx is None:
        return table, positions, None
    return table, np.where(bags.flat == bags.padding_idx, n, positions), n


def pool(weight: np.ndarray, bags: SavedBags, want_argmax: bool = False, out_dtype: Any = None) -> np.ndarray:
    """The pooled ``(n_bags, dim)`` output of a validated call; with ``want_argmax`` (max mode) the
    winners are kept in ``bags.argmax`` for the backward. A 16-bit table pools in float32 (bitwise the
    float32 pooling of the upcast table); ``out_dtype`` its table dtype rounds that to nearest."""
    out_dtype = resolve_out_dtype(out_dtype, weight.dtype)
    if not is_table_dtype(weight.dtype):
        return _pool_numeric(weight, bags)
    dim = weight.shape[1]
    compute = compute_dtype(weight.dtype)
    out = _buffer_cache.empty((bags.n_bags, dim), compute)
    argmax = np.empty((bags.n_bags, dim) if want_argmax else (0, 0), dtype=np.int64)
    psw = bags.psw if bags.psw is not None else np.zeros(0, dtype=compute)
    # torch's float32 fast path fuses psw into an fma; with padding_idx or float64 it rounds twice
    fused = compute == np.float32 and bags.padding_idx is None
    table, flat, padding = _bag_table(weight, bags)
    padding_row = -1 if padding is None else padding
    n_threads = n_threads_for(bags.n_bags, "bag")
    if is_half(weight.dtype):
        bits, fmt = as_kernel_view(table)
        _bag.bag_forward_half(bits, fmt, flat, bags.offsets, BAG_MODES[bags.mode], padding_row, psw, fused, out,
                              argmax, n_threads)
    else:
        _bag.bag_forward(table, flat, bags.offsets, BAG_MODES[bags.mode], padding_row, psw, fused, out, argmax,
                         n_threads)
    if want_argmax:
        if table is not weight and bags.flat.size:  # winners are rows of the copy (entry positions): mapped
            # back (with no entries every winner is -1 already)
            argmax = np.where(argmax >= 0, bags.flat[np.clip(argmax, 0, bags.flat.size - 1)], -1)
        bags.argmax = argmax
    return out if out_dtype == compute else _narrow(out, out_dtype)


def _narrow(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A float32 ``(n, dim)`` result as a new array of the 16-bit ``dtype``, each element rounded to
    nearest, ties to even (the ``out_dtype`` of a 16-bit table)."""
    values = kernel_array(values, FLOAT32)
    bits = np.empty(values.shape, dtype=np.uint16)
    _gather.narrow_rows(values, kernel_format(dtype), bits, n_threads_for(values.shape[0], "gather"))
    return bits.view(dtype)


def embedding_bag(input: Any, weight: np.ndarray, offsets: Any = None, max_norm: Optional[float] = None,
                  norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                  sparse: bool = False, per_sample_weights: Any = None, include_last_offset: bool = False,
                  padding_idx: Optional[int] = None, *, out_dtype: Any = None) -> np.ndarray:
    """Pooled lookups over bags of indices, like ``torch.nn.functional.embedding_bag``.

    Parameters
    ----------
    input : array_like of int
        1-D with ``offsets`` (bag starts), or 2-D ``(n_bags, bag_size)`` without.
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32, float64, float16 or bfloat16 (the 16-bit tables pool in float32); an integer table is
        lookup-only (sums in int64, means in float64).
    offsets : array_like of int, optional
        Must start at 0, be non-decreasing and lie in ``[0, len(input)]``.
    max_norm, norm_type : float, optional
        Renormalise the referenced rows first (see :func:`embedding`).
    scale_grad_by_freq, sparse : bool
        Only checked here (they matter for the backward).
    mode : {"sum", "mean", "max"}, default "mean"
    per_sample_weights : numpy.ndarray, optional
        Shape of ``input``, the weight's dtype (float32 for a 16-bit table); ``mode="sum"`` only.
    include_last_offset : bool, default False
        ``offsets`` has ``n_bags + 1`` entries, the last equal to ``len(input)`` (CSR).
    padding_idx : int, optional
        Entries of that row are skipped (they do not count for the mean).
    out_dtype : dtype, optional
        ``None``: float32 for a float16/bfloat16 table, the weight's dtype otherwise; a 16-bit table may
        ask for its own dtype (the float32 result rounded to nearest, ties to even).

    Returns
    -------
    numpy.ndarray, shape (n_bags, embedding_dim)
        Empty bags give zeros.

    Raises
    ------
    IndexError, TypeError, ValueError
        Every argument is checked before anything is computed or renormalised.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.arange(8, dtype=np.float32).reshape(4, 2)
    >>> F.embedding_bag([0, 1, 3], weight, offsets=[0, 2], mode="sum")
    array([[2., 4.],
           [6., 7.]], dtype=float32)
    """
    weight = check_weight(weight, numeric=True)
    max_norm, norm_type = check_max_norm(max_norm, norm_type)
    resolve_out_dtype(out_dtype, weight.dtype)  # checked before anything is renormalised
    scale_grad_by_freq, sparse, include_last_offset = _checked_flags(scale_grad_by_freq, sparse, include_last_offset)
    bags = validate_bags(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                         padding_idx, sparse, scale_grad_by_freq)
    if max_norm is not None:
        renorm_referenced(weight, bags.flat, max_norm, norm_type)
    return pool(weight, bags, out_dtype=out_dtype)


def bag_contributions(grad_output: np.ndarray, weight: np.ndarray, bags: SavedBags,
                      scale_grad_by_freq: bool) -> Union[RowContributions, MaxRouting]:
    """The weight-gradient contributions of a validated bag call (grad_output already checked)."""
    if bags.mode == "max" and scale_grad_by_freq:   # (a module's option set after its forward: as the forward)
        raise ValueError("max mode does not support scaling the gradient by the frequency")
    if bags.mode == "max":
        if bags.argmax is None:   # pragma: no cover - max mode pools with want_argmax=True before its backward
            raise ValueError("embedding_bag backward: max mode needs the forward's argmax")
        return MaxRouting(grad_output, bags.argmax)
    scale = None
    if bags.mode == "mean":
        inv = (1.0 / np.maximum(bags.counts(), 1)).astype(compute_dtype(weight.dtype))  # double, rounded
        scale = inv[bags.bag_of_entry()]
    elif bags.psw is not None:
        scale = bags.psw
    return RowContributions(grad_output, bags.flat, src=bags.bag_of_entry(), scale=scale,
                            padding_idx=bags.padding_idx, scale_grad_by_freq=scale_grad_by_freq)


def psw_gradient(grad_output: np.ndarray, weight: np.ndarray, bags: SavedBags) -> np.ndarray:
    """d(loss)/d(per_sample_weights): ``dot(grad_output[bag of k], weight[input[k]])``, 0 for padding."""
    psw_grad = np.empty(bags.flat.size, dtype=compute_dtype(weight.dtype))
    table, flat, padding = _bag_table(weight, bags)
    n_threads = n_threads_for(bags.flat.size, "entry")
    if is_half(weight.dtype):
        bits, fmt = as_kernel_view(table)
        _bag.psw_backward_half(bits, fmt, flat, bags.bag_of_entry(), grad_output, -1 if padding is None else padding,
                               psw_grad, n_threads)
    else:
        _bag.psw_backward(table, flat, bags.bag_of_entry(), grad_output, -1 if padding is None else padding,
                          psw_grad, n_threads)
    return psw_grad.reshape(bags.input_shape)


def embedding_bag_backward(grad_output: Any, input: Any, weight: np.ndarray, offsets: Any = None,
                           mode: str = "mean", per_sample_weights: Any = None, include_last_offset: bool = False,
                           padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False,
                           sparse: bool = False) -> Tuple[Grad, Optional[np.ndarray]]:
    """The gradients of :func:`embedding_bag` with respect to the weight and the per-sample weights.

    Parameters
    ----------
    grad_output : numpy.ndarray, shape (n_bags, embedding_dim)
        d(loss)/d(output), the weight's dtype; for a 16-bit table float32 or the table's own dtype
        (the ``out_dtype`` its forward may return; widened exactly).
    input, weight, offsets, mode, per_sample_weights, include_last_offset, padding_idx
        As given to the forward (``weight`` is read for the per-sample-weight gradient and, in max
        mode, to find each coordinate's winning row again: pass the table as it was at the forward).
    scale_grad_by_freq : bool, default False
        Divide by the true count of each index (torch 2.13's CPU kernel uses wrong counts).
    sparse : bool, default False
        Return a coalesced :class:`cembed.SparseGrad`.

    Returns
    -------
    grad_weight : numpy.ndarray or SparseGrad
        The weight's dtype; float32 for a float16/bfloat16 table.
    grad_per_sample_weights : numpy.ndarray or None
        Shape of ``input``, when per-sample weights were given.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`embedding_bag`, and a ``grad_output`` of the wrong shape or dtype.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.ones((4, 2), np.float32)
    >>> g, _ = F.embedding_bag_backward(np.ones((2, 2), np.float32), [0, 1, 1], weight, offsets=[0, 2],
    ...                                 mode="mean", sparse=True)
    >>> g.indices, g.values[:, 0]
    (array([0, 1]), array([0.5, 1.5], dtype=float32))
    """
    weight = check_weight(weight)
    scale_grad_by_freq, sparse, include_last_offset = _checked_flags(scale_grad_by_freq, sparse, include_last_offset)
    bags = validate_bags(input, weight, offsets, mode, per_sample_weights, include_last_offset,
                         padding_idx, sparse, scale_grad_by_freq)
    dtype = compute_dtype(weight.dtype)
    values = check_gradient_rows(grad_output, (bags.n_bags,), dim=weight.shape[1], dtype=dtype,
                                 table_dtype=weight.dtype, lead="(n_bags,)").astype(dtype, copy=False)   # a few rows: widened
    if bags.mode == "max":
        pool(weight, bags, want_argmax=True)
    psw_grad = psw_gradient(values, weight, bags) if bags.psw is not None else None
    new = bag_contributions(values, weight, bags, scale_grad_by_freq)
    return add_to_grad(None, new, weight.shape, dtype, sparse), psw_grad


# ============================================================================ prefetch from disk

#: Page ranges of prefetched rows that are at most this many pages apart are advised in one call
#: (reading a few unneeded pages costs less than a system call per range).
PREFETCH_GAP_PAGES = 1


def _is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` lives in a memory-mapped file (a ``numpy.memmap`` or a view of one)."""
    if getattr(array, "_mmap", None) is not None:
        return True
    base = array.base
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        base = getattr(base, "base", None) if isinstance(base, np.ndarray) else None
    return False


def _row_bytes_view(array: np.ndarray) -> Optional[np.ndarray]:
    """``array`` as (n_rows, bytes per row) uint8 when each row's bytes are contiguous, else None."""
    if array.ndim == 1:
        array = array.reshape(array.shape[0], 1)
    if array.ndim != 2 or array.size == 0 or (array.shape[1] > 1 and array.strides[1] != array.itemsize):
        return None
    try:
        return array.view(np.uint8)
    except ValueError:
        return None


def _advise(views: List[np.ndarray], flat: np.ndarray) -> int:
    """The prefetch itself: distinct sorted rows, then one kernel call per mapped array."""
    rows = np.unique(flat).astype(np.int64, copy=False)
    return sum(int(_prefetch.willneed_rows(view, rows, mmap.PAGESIZE, PREFETCH_GAP_PAGES)[1]) for view in views)


class _PrefetchThread:
    """One background thread that runs prefetches handed over by ``prefetch(..., wait=False)``:
    sorting the rows and the ``madvise`` calls (which can take tens of milliseconds for a large
    batch: the kernel allocates and submits the reads) overlap the caller's computation. At most
    ``MAX_PENDING`` requests wait; more are dropped (it is advice). A forked child starts afresh."""

    MAX_PENDING = 2

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: Optional["queue.Queue[Any]"] = None
        self._thread: Optional[threading.Thread] = None

    def submit(self, views: List[np.ndarray], flat: np.ndarray) -> None:
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue(self.MAX_PENDING)
                self._thread = threading.Thread(target=self._run, args=(self._queue,), name="cembed-prefetch",
                                                daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait((views, flat))
            except queue.Full:
                pass

    @staticmethod
    def _run(jobs: "queue.Queue[Any]") -> None:
        while True:
            job = jobs.get()
            if job is None:   # (stop)
                return
            views, flat = job
            try:
                _advise(views, flat)
            except Exception:  # pragma: no cover - advice never fails the caller
                pass
            del job, views, flat

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread once the advice in hand is given (what waits is dropped); a later submit starts
        another. Run at exit: a daemon thread still inside NumPy (its C++ sort of the rows) when the
        interpreter finalizes is ended by a forced unwind that C++ code turns into an abort — after
        Ctrl-C, a ``python -m cembed train --table-dir`` run died of SIGABRT half of the time."""
        with self._lock:
            jobs, thread = self._queue, self._thread
            self._queue = self._thread = None
        if jobs is None or thread is None:
            return
        while True:   # room for the stop sign
            try:
                jobs.put_nowait(None)
                break
            except queue.Full:
                try:
                    jobs.get_nowait()
                except queue.Empty:
                    pass
        thread.join(timeout)

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._queue = None
        self._thread = None


_PREFETCHER = _PrefetchThread()
atexit.register(_PREFETCHER.stop)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_PREFETCHER.reset)


def prefetch(weight: np.ndarray, indices: Any, *state_arrays: np.ndarray, wait: bool = False) -> int:
    """Ask the operating system to start reading the rows ``indices`` of a table on disk (and the
    same rows of per-row ``state_arrays``, e.g. an optimizer's moments), and return at once.

    For a memory-mapped table (:func:`cembed.open_table`, ``numpy.memmap``) the pages holding the
    rows are advised ``MADV_WILLNEED``: the reads start in the background, so a lookup or update of
    those rows a little later finds them in memory instead of waiting for the disk. Nothing is
    read or written by the call itself; arrays in memory are skipped.

    Parameters
    ----------
    weight : numpy.ndarray
        The table, ``(num_embeddings, embedding_dim)``.
    indices : array_like of int
        Rows (any shape, any integer dtype), checked like a lookup's indices.
    *state_arrays : numpy.ndarray
        Arrays indexed by the same rows (first dimension ``num_embeddings``): ``(n_rows, dim)``
        moments or ``(n_rows,)`` per-row values.
    wait : bool, default False
        False: the indices are checked and copied, and the advice is given by cembed's prefetch
        thread while the caller goes on (the call returns 0). True: given before returning, which
        returns the number of pages advised.

    Returns
    -------
    int
        With ``wait``, the number of pages advised (0 when nothing is on disk); else 0.

    Raises
    ------
    IndexError
        An index outside ``[0, num_embeddings)``.
    TypeError, ValueError
        A bad table, index dtype, or a state array that is not indexed by the table's rows.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> table = cembed.open_table(os.path.join(tempfile.mkdtemp(), "t.npy"), 100_000, 64)
    >>> cembed.functional.prefetch(table, np.array([5, 70_000, 6]), wait=True) > 0
    True
    >>> cembed.functional.prefetch(table, np.array([5, 70_000, 6]))     # in the background
    0
    >>> cembed.functional.prefetch(np.zeros((10, 4)), [1, 2], wait=True)       # in memory: nothing to do
    0
    """
    weight = check_weight(weight, numeric=True)
    n_rows = weight.shape[0]
    wait = check_bool(wait, "wait")
    _, flat = validated_indices(indices, n_rows)
    arrays = [weight]
    for k, array in enumerate(state_arrays):
        if not isinstance(array, np.ndarray):
            raise TypeError(f"state_arrays[{k}] must be a numpy.ndarray, got {type(array).__name__}")
        if array.ndim not in (1, 2) or array.shape[0] != n_rows:
            raise ValueError(f"state_arrays[{k}] must have num_embeddings={n_rows} rows, got shape {array.shape}")
        arrays.append(array)
    views = [v for v in (_row_bytes_view(a) for a in arrays if _is_mapped(a)) if v is not None]
    if not views or flat.size == 0:
        return 0
    if wait:
        return _advise(views, flat)
    _PREFETCHER.submit(views, flat.copy())   # a private copy: the caller may reuse its index array
    return 0


# ============================================================================ scoring (dot-product models)

def _score_operands(indices: Any, weight: Any, name: str) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(checked weight, indices as validated int32/int64 of the caller's shape, the same as a
    C-contiguous (n_queries, n_per_query) array). The weight may be float32, float64 or 16-bit (scored
    in float32: its rows widened exactly inside the kernels)."""
    weight = check_weight(weight)   # float32, float64, float16 or bfloat16
    idx, flat = validated_indices(indices, weight.shape[0])
    if idx.ndim < 1:
        raise ValueError(f"{name}: indices must have at least one dimension (..., n_per_query), got a scalar")
    n_per = idx.shape[-1]
    n_queries = int(np.prod(idx.shape[:-1], dtype=np.int64))
    return weight, idx, flat.reshape(n_queries, n_per)


def _score_table(weight: np.ndarray, grid: np.ndarray) -> Tuple[np.ndarray, int, np.ndarray]:
    """(table, its kernel format, indices) the kernels read: the weight itself when the kernels can use
    it in place, else a contiguous copy of just the referenced rows (indices then number them in
    order); a 16-bit table as its bit patterns (``as_kernel_view``)."""
    if not kernel_layout(weight):
        weight = np.ascontiguousarray(np.take(weight, grid.reshape(-1), axis=0))
        grid = np.arange(grid.size, dtype=np.int64).reshape(grid.shape)
    table, fmt = as_kernel_view(weight)
    return table, fmt, grid


def embedding_dot(query: Any, indices: Any, weight: np.ndarray) -> np.ndarray:
    """Score each query against table rows: ``scores[..., k] = query[...] · weight[indices[..., k]]``.

    What ``(weight[indices] @ query[..., None])[..., 0]`` computes — in torch,
    ``torch.bmm(F.embedding(indices, weight), query.unsqueeze(2)).squeeze(2)`` — but read straight
    from the table, without the ``(*indices.shape, embedding_dim)`` copy of the looked-up rows: the
    scoring step of skip-gram / negative sampling, matrix factorisation and two-tower models. Each
    dot product is accumulated in a fixed order (``docs/behaviour.md`` §13), so the result is bitwise
    the same for any thread count.

    Parameters
    ----------
    query : numpy.ndarray, shape (*indices.shape[:-1], embedding_dim)
        The query vectors, in the compute dtype: the weight's, float32 for a 16-bit table.
    indices : array_like of int, shape (..., n_per_query)
        For each query, the rows it is scored against (at least one dimension; validated).
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32, float64, float16 or bfloat16; read only. A 16-bit table is scored in float32, each
        row widened exactly as it is read: bitwise the results for ``weight.astype(numpy.float32)``,
        without that copy.

    Returns
    -------
    numpy.ndarray, shape indices.shape
        A new array of the compute dtype.

    Raises
    ------
    IndexError
        An index outside ``[0, num_embeddings)``.
    TypeError
        Non-integer indices; a weight that is not float32/float64/float16/bfloat16; a query of
        another dtype than the compute dtype.
    ValueError
        A weight that is not 2-D, scalar indices, a query of the wrong shape.

    See Also
    --------
    embedding_dot_backward : the gradient with respect to ``query``. The gradient with respect to
        ``weight`` is ``embedding_backward(query, indices, num_embeddings,
        per_sample_weights=grad_scores)`` (or ``Embedding.backward`` with the same arguments).

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    >>> query = np.array([[2, 3], [1, -1]], dtype=np.float32)
    >>> F.embedding_dot(query, [[0, 2], [1, 1]], weight)
    array([[ 2.,  5.],
           [-1., -1.]], dtype=float32)
    """
    weight, idx, grid = _score_operands(indices, weight, "embedding_dot")
    dim, dtype = weight.shape[1], compute_dtype(weight.dtype)
    q = check_gradient_rows(query, idx.shape[:-1], dim=dim, dtype=dtype, name="query", lead="indices.shape[:-1]")
    out = np.empty(grid.shape, dtype=dtype)
    table, fmt, grid = _score_table(weight, grid)
    _score.dot_scores(q, table, fmt, grid, out, n_threads_for(grid.size, "gather"))
    return out.reshape(idx.shape)


def embedding_dot_backward(grad_scores: Any, indices: Any, weight: np.ndarray) -> np.ndarray:
    """The gradient of :func:`embedding_dot` with respect to the query:
    ``grad_query[...] = sum over k of grad_scores[..., k] * weight[indices[..., k]]``.

    Read straight from the table (torch: ``torch.bmm(grad_scores.unsqueeze(1), F.embedding(indices,
    weight)).squeeze(1)``). The terms are added in the order ``k = 0, 1, ...``, each with one fused
    multiply-add per element, so the result is bitwise the same for any thread count. To train both
    sides, take this gradient *before* updating ``weight`` (it reads the table as it is now).

    Parameters
    ----------
    grad_scores : numpy.ndarray, shape indices.shape
        d(loss)/d(scores), the compute dtype (the weight's; float32 for a 16-bit table).
    indices : array_like of int, shape (..., n_per_query)
        As given to the forward.
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        The table as it was at the forward (any dtype :func:`embedding_dot` takes); read only.

    Returns
    -------
    numpy.ndarray, shape (*indices.shape[:-1], embedding_dim)
        A new array of the compute dtype.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`embedding_dot`, and a ``grad_scores`` of another shape or dtype. Nothing is computed.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    >>> F.embedding_dot_backward(np.array([[1, 2]], np.float32), [[0, 2]], weight)
    array([[3., 2.]], dtype=float32)
    """
    weight, idx, grid = _score_operands(indices, weight, "embedding_dot_backward")
    dtype = compute_dtype(weight.dtype)
    grad = as_array(grad_scores)
    if grad.dtype.newbyteorder("=") not in FLOAT_DTYPES:   # (either byte order: read as native below)
        raise TypeError(f"grad_scores must be float32 or float64, got dtype {grad.dtype}")
    if grad.dtype.newbyteorder("=") != dtype:
        raise TypeError(f"grad_scores has dtype {grad.dtype} but a {weight.dtype} weight is scored in {dtype}")
    if grad.shape != idx.shape:
        raise ValueError(f"grad_scores must have the shape of indices {idx.shape}, got {grad.shape}")
    grad = kernel_array(grad.astype(grad.dtype.newbyteorder("="), copy=False)).reshape(grid.shape)
    out = np.empty((grid.shape[0], weight.shape[1]), dtype=dtype)
    table, fmt, grid = _score_table(weight, grid)
    _score.dot_scores_backward(grad, table, fmt, grid, out, n_threads_for(grid.size, "gather"))
    return out.reshape(idx.shape[:-1] + (weight.shape[1],))


def embedding_dot_logistic(query: Any, indices: Any, weight: np.ndarray, n_positive: int = 1, *,
                           with_loss: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """The binary logistic (negative-sampling) loss of :func:`embedding_dot` scores and both its
    gradients, in one pass that reads each looked-up row once.

    For ``scores = embedding_dot(query, indices, weight)``, the first ``n_positive`` columns of
    ``indices`` are positives (label 1), the others negatives (label 0)::

        loss[...]        = sum_k softplus(-scores[..., k]) (positives) or softplus(scores[..., k])
        grad_scores[...] = -sigmoid(-scores) (positives) or sigmoid(scores)  = d loss / d scores
        grad_query[...]  = embedding_dot_backward(grad_scores, indices, weight)

    the skip-gram / word2vec objective (one context word and its sampled negatives per centre word),
    and that of matrix factorisation or two-tower models trained with sampled negatives. The
    gradient for ``weight`` is ``embedding_backward(query, indices, num_embeddings,
    per_sample_weights=grad_scores)`` (or ``Embedding.backward``, fused with an optimizer): take it
    after this call, which reads ``weight`` as it is now. ``softplus(x)`` is computed as
    ``max(x, 0) + log1p(exp(-|x|))``; the sums run in a fixed order (``docs/behaviour.md`` §13), so
    the results are bitwise the same for any thread count.

    Parameters
    ----------
    query : numpy.ndarray, shape (*indices.shape[:-1], embedding_dim)
        The compute dtype: the weight's, float32 for a 16-bit table.
    indices : array_like of int, shape (..., n_per_query)
        Each query's positive columns first, then its negatives.
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32, float64, float16 or bfloat16 (scored in float32 as :func:`embedding_dot` does); read
        only.
    n_positive : int, default 1
        How many leading columns are positives, ``0 <= n_positive <= n_per_query``.
    with_loss : bool, default True
        False: skip the loss (its logarithms are a good part of the work) and return None for it;
        the gradients are the same bits either way.

    Returns
    -------
    loss : numpy.ndarray, shape indices.shape[:-1], or None
    grad_scores : numpy.ndarray, shape indices.shape
    grad_query : numpy.ndarray, shape query.shape
        New arrays of the compute dtype.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`embedding_dot`, and ``n_positive`` out of range.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    >>> loss, g, dq = F.embedding_dot_logistic(np.array([[2, 0]], np.float32), [[0, 2]], weight)
    >>> loss.round(4)
    array([0.8201], dtype=float32)
    >>> g.round(4)
    array([[-0.1192,  0.5   ]], dtype=float32)
    >>> dq.round(4)
    array([[-0.1192,  0.    ]], dtype=float32)
    """
    weight, idx, grid = _score_operands(indices, weight, "embedding_dot_logistic")
    dim, dtype = weight.shape[1], compute_dtype(weight.dtype)
    q = check_gradient_rows(query, idx.shape[:-1], dim=dim, dtype=dtype, name="query", lead="indices.shape[:-1]")
    n_positive = check_int(n_positive, "n_positive", low=0, high=grid.shape[1])
    with_loss = check_bool(with_loss, "with_loss")
    loss = np.empty(grid.shape[0] if with_loss else 0, dtype=dtype)
    grad_scores = np.empty(grid.shape, dtype=dtype)
    grad_query = np.empty((grid.shape[0], dim), dtype=dtype)
    table, fmt, grid = _score_table(weight, grid)
    _score.logistic_scores(q, table, fmt, grid, n_positive, with_loss, loss, grad_scores, grad_query,
                           n_threads_for(grid.size, "gather"))
    return (loss.reshape(idx.shape[:-1]) if with_loss else None, grad_scores.reshape(idx.shape),
            grad_query.reshape(idx.shape[:-1] + (dim,)))


# ============================================================================ scoring fused with the table's update

class LogisticScores(RowContributions):
    """:func:`embedding_dot_logistic` of validated operands and the table gradient it implies — entry
    ``(b, k)`` adds ``grad_scores[b, k] * query[b]`` to row ``indices[b, k]`` — as the
    :class:`RowContributions` an optimizer's fused step takes. :meth:`update_rows` (a float32/float64
    table updated in place) scores and updates in one kernel (``_score.logistic_scores_update``);
    every other use scores first (the table as it is now), then sums as :class:`RowContributions`
    does. Either way :meth:`results` gives ``(loss, grad_scores, grad_query)``, bitwise the same."""

    __slots__ = ("weight", "query", "grid", "shape", "n_positive", "with_loss", "scored")

    def __init__(self, weight: np.ndarray, query: np.ndarray, grid: np.ndarray, shape: Tuple[int, ...],
                 n_positive: int, with_loss: bool, padding_idx: Optional[int], scale_grad_by_freq: bool,
                 groups: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None) -> None:
        super().__init__(query, grid.reshape(-1), padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                         groups=groups)
        self.weight, self.query, self.grid, self.shape = weight, query, grid, shape
        self.n_positive, self.with_loss = n_positive, with_loss
        self.scored: Optional[Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]] = None

    def _outputs(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        n_queries, n_per = self.grid.shape
        dtype = self.query.dtype
        return (np.empty(n_queries if self.with_loss else 0, dtype=dtype), np.empty((n_queries, n_per), dtype=dtype),
                np.empty((n_queries, self.query.shape[1]), dtype=dtype))

    def _keep(self, loss: np.ndarray, grad_scores: np.ndarray, grad_query: np.ndarray) -> None:
        """Record the results, and the gradient they imply as (values, src, scale)."""
        n_queries, n_per = self.grid.shape
        self.scored = (loss if self.with_loss else None, grad_scores, grad_query)
        self.src = np.repeat(np.arange(n_queries, dtype=np.int64), n_per)
        self.scale = grad_scores.reshape(-1)

    def _score(self) -> None:
        """The scores against the table as it is now (logistic_scores; a table the kernels cannot read
        in place copied row by row)."""
        if self.scored is not None:
            return
        loss, grad_scores, grad_query = self._outputs()
        table, fmt, grid = _score_table(self.weight, self.grid)
        _score.logistic_scores(self.query, table, fmt, grid, self.n_positive, self.with_loss, loss, grad_scores,
                               grad_query, n_threads_for(grid.size, "gather"))
        self._keep(loss, grad_scores, grad_query)

    def results(self) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """(loss, grad_scores, grad_query) in the caller's shapes (scored now if nothing has yet)."""
        self._score()
        assert self.scored is not None
        loss, grad_scores, grad_query = self.scored
        lead = self.shape[:-1]
        return (None if loss is None else loss.reshape(lead), grad_scores.reshape(self.shape),
                grad_query.reshape(lead + (self.query.shape[1],)))

    def _segments(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        self._score()   # every RowContributions use but update_rows starts here: score first
        return super()._segments()

    def _set_values(self, values: np.ndarray, scale: Optional[np.ndarray]) -> None:
        self.values, self.query, self.scale = values, values, scale   # the queries are the values

    def update_rows(self, weight: np.ndarray, rule: RowRule) -> None:
        """Score and apply the row update ``rule`` in one kernel: each distinct row is read once
        (``_score.logistic_scores_update``); bitwise :meth:`results` of :meth:`_score` followed by
        :meth:`RowContributions.update_rows`."""
        n_entries, dim = self.grid.size, self.query.shape[1]
        if self.scored is not None or weight is not self.weight or weight.dtype not in FLOAT_DTYPES \
                or not kernel_layout(weight) or n_entries == 0 or dim == 0:
            super().update_rows(weight, rule)   # scores first (_segments)
            return
        order, seg_rows, starts = self._grouped()
        skip = self._padding_segment(seg_rows)
        dtype = weight.dtype
        loss, grad_scores, grad_query = self._outputs()
        old_rows = _buffer_cache.empty((seg_rows.size, dim), dtype)
        entry_slot = _buffer_cache.empty((n_entries,), np.dtype(np.int64))
        terms = _buffer_cache.empty((2 * n_entries,), dtype) if self.with_loss else np.zeros(0, dtype=dtype)
        _score.logistic_scores_update(self.query, weight, self.grid.shape[1], order, starts, seg_rows, skip,
                                      self.scale_grad_by_freq, self.n_positive, self.with_loss, rule.kind,
                                      *rule.kernel_args(dtype), *rule.params, rule.mode, rule.maximize,
                                      old_rows, entry_slot, terms, loss, grad_scores.reshape(-1), grad_query,
                                      n_threads_for(n_entries, "gather"))
        self._keep(loss, grad_scores, grad_query)


def logistic_scores(query: Any, indices: Any, weight: np.ndarray, n_positive: int = 1, *, with_loss: bool = True,
                    padding_idx: Optional[int] = None, scale_grad_by_freq: bool = False,
                    name: str = "embedding_dot_logistic") -> LogisticScores:
    """Validate the operands of :func:`embedding_dot_logistic` against a table of any trainable dtype
    (a 16-bit one scores float32 queries against its rows widened to float32) and return them as
    :class:`LogisticScores`, nothing computed yet. ``padding_idx`` (normalised by the caller) is
    scored but gets no gradient."""
    weight, idx, grid = _score_operands(indices, weight, name)   # every table dtype is trainable
    q = check_gradient_rows(query, idx.shape[:-1], dim=weight.shape[1], dtype=compute_dtype(weight.dtype),
                            name="query", lead="indices.shape[:-1]")
    n_positive = check_int(n_positive, "n_positive", low=0, high=grid.shape[1])
    with_loss = check_bool(with_loss, "with_loss")
    if may_share(q, weight):   # the table changes during the update: keep the queries as given
        q = q.copy()
    return LogisticScores(weight, q, grid, idx.shape, n_positive, with_loss, padding_idx,
                          check_bool(scale_grad_by_freq, "scale_grad_by_freq"), index_groups(indices))


def embedding_dot_logistic_sgd_(query: Any, indices: Any, weight: np.ndarray, lr: float, n_positive: int = 1, *,
                                with_loss: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
    """:func:`embedding_dot_logistic`, then a plain SGD step on ``weight`` with the gradient it implies,
    in one pass that reads each looked-up row once.

    The same results, bitwise, as::

        loss, grad_scores, grad_query = embedding_dot_logistic(query, indices, weight, n_positive)
        grad = embedding_backward(query, indices, len(weight), per_sample_weights=grad_scores, sparse=True)
        weight[grad.indices] -= lr * grad.values    # as cembed.optim.SGD(lr=lr) steps a sparse gradient

    (``grad_query`` and the loss come from ``weight`` as it was before the step). The entries are
    sorted by row (the stable sort of the backward); each distinct row is scored against all its
    queries, its gradient summed in input order and the row updated while it is in cache, its old
    value kept in a compact buffer from which ``grad_query`` is summed afterwards. Each row and each
    query has one writer, so the result is bitwise the same for any thread count. To update the
    table with another optimizer (or keep its gradient) use :meth:`cembed.Embedding.dot_logistic_backward`.

    Parameters
    ----------
    query : numpy.ndarray, shape (*indices.shape[:-1], embedding_dim)
        The weight's dtype.
    indices : array_like of int, shape (..., n_per_query)
        Each query's positive columns first, then its negatives.
    weight : numpy.ndarray, shape (num_embeddings, embedding_dim)
        float32 or float64, writeable; updated in place.
    lr : float
        The learning rate, ``>= 0``.
    n_positive : int, default 1
        How many leading columns are positives, ``0 <= n_positive <= n_per_query``.
    with_loss : bool, default True
        False: return None for the loss (the rest is the same bits).

    Returns
    -------
    loss : numpy.ndarray, shape indices.shape[:-1], or None
    grad_scores : numpy.ndarray, shape indices.shape
    grad_query : numpy.ndarray, shape query.shape
        New arrays of the weight's dtype.

    Raises
    ------
    IndexError, TypeError, ValueError
        As :func:`embedding_dot_logistic`; a read-only weight or a negative ``lr`` (ValueError).
        Nothing is modified.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> weight = np.array([[1, 0], [0, 1], [0, 0]], dtype=np.float32)
    >>> loss, g, dq = F.embedding_dot_logistic_sgd_(np.array([[2, 0]], np.float32), [[0, 2]], weight, lr=1.0)
    >>> g.round(4), dq.round(4)
    (array([[-0.1192,  0.5   ]], dtype=float32), array([[-0.1192,  0.    ]], dtype=float32))
    >>> weight.round(4)            # row 0 += 0.1192 * query, row 2 -= 0.5 * query
    array([[ 1.2384,  0.    ],
           [ 0.    ,  1.    ],
           [-1.    ,  0.    ]], dtype=float32)
    """
    weight = check_weight(weight)
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"embedding_dot_logistic_sgd_: the weight must be float32 or float64, got dtype {weight.dtype}")
    check_writeable(weight, "embedding_dot_logistic_sgd_")
    check_distinct_elements(weight, "embedding_dot_logistic_sgd_")
    lr = check_real(lr, "lr", low=0.0)
    scores = logistic_scores(query, indices, weight, n_positive, with_loss=with_loss,
                             name="embedding_dot_logistic_sgd_")
    sgd = RowRule(int(_grad.UpdateKind.UPDATE_SGD), (None, None, None), (-lr, 0.0, 0.0, 0.0), 0, False)
    if kernel_layout(weight):
        scores.update_rows(weight, sgd)
    else:   # the touched rows copied out, updated by the optimizers' row kernel, written back
        rows, values = scores._compact()
        block = np.ascontiguousarray(weight[rows])
        _optim.update_rows(sgd.kind, block, *sgd.kernel_args(weight.dtype), np.arange(rows.size, dtype=np.int64),
                           values, *sgd.params, sgd.mode, sgd.maximize, n_threads_for(rows.size, "optimizer"))
        weight[rows] = block
    return scores.results()
