"""cembed.Embedding and cembed.EmbeddingBag: torch.nn's embedding modules on NumPy arrays.

A module owns a table (``weight``), its options, and the gradient slot ``.grad``. It keeps nothing
between calls that it trusts: the forward saves a private copy of the validated indices for its
backward, options are re-read and re-checked at every call, and the backward checks the saved
indices and the existing ``.grad`` against the table as it is then (``docs/safety.md``).
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from . import functional as F
from . import storage
from .sparse import zeroed_grad
from ._dtypes import check_table_dtype, compute_dtype, is_half, is_table_dtype, resolve_out_dtype
from ._validation import (
    as_checked,
    check_bool,
    check_gradient_rows,
    check_max_norm,
    check_size,
    check_trainable,
    check_weight,
    check_writeable,
    grad_dtype,
    index_groups,
    is_as_checked,
    normalize_padding_idx,
    random_generator,
    validated_indices,
)

__all__ = ["Embedding", "EmbeddingBag"]


def _init_weight(num_embeddings: int, embedding_dim: int, dtype: Any, seed: Any,
                 padding_idx: Optional[int]) -> np.ndarray:
    """N(0, 1) init with the padding row zeroed (torch's reset_parameters), in page-aligned memory
    (``storage.aligned_zeros``: every row in whole cache lines). A 16-bit table draws in float32 and
    rounds each value to nearest."""
    dtype = check_table_dtype(dtype)
    weight = storage.aligned_zeros((num_embeddings, embedding_dim), dtype)
    _draw_normal_into(weight, random_generator(seed), padding_idx)
    return weight


#: Bytes of float draws made at a time when a table is filled (a table on disk is never drawn whole).
_DRAW_BLOCK_BYTES = 32 << 20


def _draw_normal_into(weight: np.ndarray, rng: np.random.Generator, padding_idx: Optional[int]) -> None:
    """Fill ``weight`` with N(0, 1) draws of ``rng``, a block of rows at a time (the same values as one
    draw of the whole table: the generator's stream is taken in order), drawn in the compute dtype and
    rounded to nearest for a 16-bit table; the padding row zeroed."""
    n_rows, dim = weight.shape
    draw_dtype = compute_dtype(weight.dtype)
    step = max(1, _DRAW_BLOCK_BYTES // max(1, dim * draw_dtype.itemsize))
    for lo in range(0, n_rows, step):
        block = weight[lo:lo + step]
        if is_half(weight.dtype):
            block[...] = rng.standard_normal(block.shape, dtype=draw_dtype).astype(weight.dtype)
        else:
            rng.standard_normal(block.shape, dtype=draw_dtype, out=block)
    if padding_idx is not None:
        weight[padding_idx] = 0


class TableModule:
    """What both modules share: the table and its checks, the gradient slot, ``parameters()``,
    ``zero_grad()`` and ``repr``."""

    _options: Tuple[str, ...] = ()

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int],
                 max_norm: Optional[float], norm_type: float, scale_grad_by_freq: bool, sparse: bool,
                 _weight: Any, _freeze: bool, dtype: Any, seed: Any) -> None:
        num_embeddings = check_size(num_embeddings, "num_embeddings")
        embedding_dim = check_size(embedding_dim, "embedding_dim")
        self.padding_idx = normalize_padding_idx(padding_idx, num_embeddings)
        self.max_norm, self.norm_type = check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = check_bool(scale_grad_by_freq, "scale_grad_by_freq")
        self.sparse = check_bool(sparse, "sparse")
        self.requires_grad = not check_bool(_freeze, "_freeze")
        if _weight is None:
            self.weight = _init_weight(num_embeddings, embedding_dim, dtype, seed, self.padding_idx)
        else:
            weight = check_weight(_weight if isinstance(_weight, np.ndarray) else np.asarray(_weight), "_weight",
                                  numeric=True)
            if weight.shape != (num_embeddings, embedding_dim):
                raise ValueError(f"Shape of _weight {weight.shape} does not match (num_embeddings, embedding_dim) "
                                 f"= ({num_embeddings}, {embedding_dim})")
            if self.requires_grad:
                check_trainable(weight, "_weight")
            self.weight = weight
        self.grad: Optional[F.Grad] = None
        self.training = True

    # -------------------------------------------------------------------- the table
    @property
    def weight(self) -> np.ndarray:
        """The table, a 2-D NumPy array used in place. Assigning a new one (a grown or shrunk
        vocabulary) is allowed; everything that depends on its size is checked against it at use."""
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        self._weight = check_weight(value, numeric=True)

    @property
    def num_embeddings(self) -> int:
        """Rows of the current table."""
        return int(self._weight.shape[0])

    @property
    def embedding_dim(self) -> int:
        """Columns of the current table."""
        return int(self._weight.shape[1])

    def _checked_options(self) -> Tuple[Optional[int], Optional[float], float]:
        """(padding_idx, max_norm, norm_type) checked against the table as it is now."""
        padding_idx = normalize_padding_idx(self.padding_idx, self.num_embeddings)
        max_norm, norm_type = check_max_norm(self.max_norm, self.norm_type)
        return padding_idx, max_norm, norm_type

    def _trainable(self) -> bool:
        """Whether a backward produces a weight gradient (checked: frozen, or an integer table)."""
        if not check_bool(self.requires_grad, "requires_grad"):
            return False
        check_trainable(self._weight)
        return True

    def _check_fused(self, optimizer: Any) -> None:
        if optimizer is None:
            return
        if not hasattr(optimizer, "_fused_step"):
            raise TypeError(f"optimizer must be a cembed.optim optimizer, got {type(optimizer).__name__}")
        if self.grad is not None:
            raise ValueError("backward(..., optimizer=...) applies the update directly and needs .grad to be None "
                             "(call zero_grad() first, or step() the accumulated gradient)")
        optimizer._check_no_step_pre_hooks()

    def _accumulate(self, new: Any, optimizer: Any, checked: Tuple[np.ndarray, Tuple[Any, ...]]) -> None:
        """The weight gradient ``new`` joins ``.grad`` — or, with ``optimizer`` (checked by the caller
        with :meth:`_check_fused` before any work), is applied at once. ``checked``: the weight the
        backward checked its indices against (``as_checked``); if code run during the backward
        (a hook of an argument) replaced or resized the module's weight, nothing is changed
        (ValueError)."""
        if not self._trainable():
            return
        sparse = check_bool(self.sparse, "sparse")
        if not is_as_checked(self._weight, checked):
            raise ValueError("backward: the module's weight was replaced while the backward ran (by code run "
                             "from an argument); nothing was changed")
        if optimizer is not None:   # (a grad_output that views the weight or state is read from a copy there)
            optimizer._fused_step(self, new, sparse, checked)
        else:  # float32 for a 16-bit table; a dense .grad is added to in place
            weight = checked[0]   # (sized by the table the rows were checked against, never re-read: another
            grad = self.grad      # thread may assign a smaller one meanwhile)
            if isinstance(grad, np.ndarray):
                new = new.apart_from(grad)
            self.grad = F.add_to_grad(grad, new, weight.shape, compute_dtype(weight.dtype), sparse)

    def prefetch(self, indices: Any, optimizer: Any = None, wait: bool = False) -> int:
        """Ask the operating system to start reading the rows ``indices`` of a table on disk — and,
        with ``optimizer``, the same rows of this table's per-row optimizer state — and return at
        once (:func:`cembed.functional.prefetch`: the advice is given by a background thread, or
        before returning with ``wait=True``, which returns the number of pages advised). Call it
        for the next batch while computing this one; a no-op for tables in memory.

        Raises
        ------
        IndexError
            An index outside ``[0, num_embeddings)``.
        ValueError
            ``optimizer`` does not hold this module.

        Examples
        --------
        >>> import os, tempfile, numpy as np, cembed
        >>> table = cembed.open_table(os.path.join(tempfile.mkdtemp(), "t.npy"), 10_000, 32)
        >>> emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
        >>> emb.prefetch(np.array([[1, 9_000], [42, 7]]), wait=True) > 0
        True
        """
        if optimizer is not None and not callable(getattr(optimizer, "_row_state_arrays", None)):
            raise TypeError(f"prefetch: optimizer must be a cembed.optim optimizer, got {type(optimizer).__name__}")
        states = () if optimizer is None else tuple(optimizer._row_state_arrays(self))
        return F.prefetch(self._weight, indices, *states, wait=wait)

    # -------------------------------------------------------------------- housekeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop the accumulated gradient (torch's default ``set_to_none=True``), or with
        ``set_to_none=False`` zero it as torch does (``cembed.sparse.zeroed_grad``: a dense gradient
        zeroed in place, a sparse one made empty).

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(4, 2, sparse=True, seed=0)
        >>> emb.backward(np.ones((1, 2), np.float32), np.array([3]))
        >>> emb.zero_grad(set_to_none=False); emb.grad.nnz, emb.grad.shape
        (0, (4, 2))
        """
        self.grad = None if check_bool(set_to_none, "zero_grad: set_to_none") else zeroed_grad(self.grad)

    def reset_parameters(self, seed: Any = None) -> None:
        """Draw the table anew, in place (torch's ``reset_parameters``): N(0, 1) values, the padding
        row zeroed; a 16-bit table draws in float32 and rounds each value to nearest.

        Parameters
        ----------
        seed : int, numpy.random.Generator or None
            As the constructor's: the same seed gives the table the constructor drew.

        Raises
        ------
        TypeError
            An integer (lookup-only) table.
        ValueError
            A read-only table.

        Examples
        --------
        >>> import cembed
        >>> emb = cembed.Embedding(4, 2, padding_idx=0, seed=7)
        >>> drawn = emb.weight.copy()
        >>> emb.weight[:] = 0.5
        >>> emb.reset_parameters(seed=7)
        >>> bool((emb.weight == drawn).all()), emb.weight[0].tolist()
        (True, [0.0, 0.0])
        """
        weight = self._weight
        check_trainable(weight)
        check_writeable(weight, "reset_parameters")
        padding_idx, _, _ = self._checked_options()
        _draw_normal_into(weight, random_generator(seed), padding_idx)

    def state_dict(self) -> Dict[str, np.ndarray]:
        """``{"weight": table}``, the table itself (not a copy), as torch's module ``state_dict`` gives
        its parameter. For the gradient and the optimizer's state use :mod:`cembed.checkpoint`.

        Examples
        --------
        >>> import cembed
        >>> emb = cembed.Embedding(4, 2, seed=0)
        >>> emb.state_dict()["weight"] is emb.weight
        True
        """
        return {"weight": self._weight}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> Tuple[List[str], List[str]]:
        """Copy ``state_dict["weight"]`` into the table, in place (torch's module ``load_state_dict``):
        the same shape, any dtype that converts to the table's as NumPy's ``same_kind`` casting does
        (float64 into float32; float32 into a 16-bit table rounds to nearest). Everything is checked
        before the table is written.

        Parameters
        ----------
        state_dict : mapping
            ``{"weight": array}``.
        strict : bool, default True
            Whether a missing ``"weight"`` or any other key is an error (else they are returned).

        Returns
        -------
        missing_keys, unexpected_keys : list of str
            As torch's (a named pair there).

        Raises
        ------
        KeyError
            With ``strict``: ``"weight"`` missing, or other keys present (torch: RuntimeError).
        ValueError
            A shape that is not the table's (torch: "size mismatch"), a read-only table.
        TypeError
            Values that cannot be cast to the table's dtype (float into an integer table, say).

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(3, 2)
        >>> emb.load_state_dict({"weight": np.arange(6.0).reshape(3, 2)})
        ([], [])
        >>> emb.weight
        array([[0., 1.],
               [2., 3.],
               [4., 5.]], dtype=float32)
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        strict = check_bool(strict, "strict")
        missing = [] if "weight" in state_dict else ["weight"]
        unexpected = sorted(str(k) for k in state_dict if k != "weight")
        if strict and (missing or unexpected):
            raise KeyError(f"Error(s) in loading state_dict for {type(self).__name__}: missing keys {missing}, "
                           f"unexpected keys {unexpected}")
        if missing:
            return missing, unexpected
        weight = self._weight
        value = np.asarray(state_dict["weight"])
        if value.shape != weight.shape:
            raise ValueError(f"size mismatch for weight: copying a param with shape {value.shape} from checkpoint, "
                             f"the shape in current model is {weight.shape}")
        if value.dtype.kind not in "biuf" and value.dtype != weight.dtype and not (
                is_half(value.dtype) and (is_half(weight.dtype) or weight.dtype.kind == "f")):
            raise TypeError(f"state_dict['weight'] has dtype {value.dtype}, not numbers")
        if not np.can_cast(value.dtype, weight.dtype, casting="same_kind"):
            raise TypeError(f"state_dict['weight'] of dtype {value.dtype} cannot be copied into a {weight.dtype} table")
        check_writeable(weight, "load_state_dict")
        np.copyto(weight, value, casting="same_kind")   # (overlapping memory is copied as if through a buffer)
        return missing, unexpected

    def requires_grad_(self, requires_grad: bool = True) -> "TableModule":
        """Set :attr:`requires_grad` (False: frozen, backward makes no gradient) and return the module.

        Examples
        --------
        >>> import cembed
        >>> cembed.Embedding(4, 2).requires_grad_(False).requires_grad
        False
        """
        self.requires_grad = check_bool(requires_grad, "requires_grad")
        return self

    def train(self, mode: bool = True) -> "TableModule":
        """Set :attr:`training` and return the module, as torch's modules do (an embedding behaves the
        same in both modes).

        Examples
        --------
        >>> import cembed
        >>> cembed.Embedding(4, 2).eval().training
        False
        """
        self.training = check_bool(mode, "train: mode")
        return self

    def eval(self) -> "TableModule":
        """``train(False)``."""
        return self.train(False)

    def parameters(self) -> Iterator["TableModule"]:
        """The trainable tables, as :mod:`cembed.optim` takes them: ``SGD(emb.parameters(), lr=0.1)``.

        cembed's optimizers update modules (each holds one table and its ``.grad``), so this yields
        the module itself."""
        yield self

    def extra_repr(self) -> str:
        options = [(name, getattr(self, name)) for name in self._options]
        return f"{self.num_embeddings}, {self.embedding_dim}" + "".join(
            f", {name}={value!r}" for name, value in options
            if value is not None and value is not False and not (name == "norm_type" and value == 2.0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class Embedding(TableModule):
    """A lookup table of ``num_embeddings`` rows of size ``embedding_dim`` (``torch.nn.Embedding``).

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        Table shape.
    padding_idx : int, optional
        This row never receives a gradient, and starts at zero in a new table (a table given as
        ``_weight`` or to ``from_pretrained`` keeps its values, as in torch); negative values count from
        the end.
    max_norm : float, optional
        Rows a forward looks up are renormalised in place to at most this norm first.
    norm_type : float, default 2.0
    scale_grad_by_freq : bool, default False
        Scale each row's gradient by 1 / (its count in the batch).
    sparse : bool, default False
        ``backward`` produces a coalesced :class:`cembed.SparseGrad` instead of a dense array.
    _weight : numpy.ndarray, optional
        Use this table as is (no copy).
    _freeze : bool, default False
        ``requires_grad = False``: backward leaves ``.grad`` as None.
    dtype : dtype, default float32
        For a fresh table: float32, float64, float16, or bfloat16 (``"bfloat16"`` or
        ``ml_dtypes.bfloat16``; needs ``pip install ml_dtypes``, the ``bf16`` extra). A 16-bit table is drawn in
        float32 and rounded to nearest; its lookups and gradients are float32.
    seed : int or numpy.random.Generator, optional
        N(0, 1) initialisation.

    Attributes
    ----------
    weight : numpy.ndarray
        The table.
    grad : None, numpy.ndarray or SparseGrad
        Accumulated by :meth:`backward` (float32 for a float16/bfloat16 table).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> emb = cembed.Embedding(10, 3, padding_idx=0, seed=0)
    >>> out = emb(np.array([[0, 2], [4, 2]]))
    >>> out.shape
    (2, 2, 3)
    >>> emb.backward(np.ones_like(out))
    >>> emb.grad[[0, 2, 4], 0]
    array([0., 2., 1.], dtype=float32)
    >>> half = cembed.Embedding(10, 3, dtype=np.float16, seed=0)   # 2 bytes per element
    >>> half.weight.dtype, half(np.array([1, 2])).dtype
    (dtype('float16'), dtype('float32'))
    """

    _options = ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Optional[np.ndarray] = None, _freeze: bool = False,
                 dtype: Any = np.float32, seed: Any = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, _freeze, dtype, seed)
        self._saved: Optional[F.SavedLookup] = None

    @classmethod
    def from_pretrained(cls, embeddings: np.ndarray, freeze: bool = True, padding_idx: Optional[int] = None,
                        max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                        sparse: bool = False) -> "Embedding":
        """Wrap an existing table: its memory is used in place, no copy (an ndarray subclass, ``np.matrix``
        included, is held as a plain ndarray view of it); frozen by default; the padding row is kept.

        Any numeric dtype can be looked up; float32/float64/float16/bfloat16 tables can be trained
        (``freeze=False`` with an integer table is a ``TypeError``). A 16-bit table stays 16-bit:
        lookups return float32 (see :func:`cembed.functional.embedding`). The kernels are fastest on
        rows that start on cache-line boundaries, as the tables cembed allocates do: a large NumPy
        array starts 16 bytes past one, so pass ``cembed.storage.aligned_copy(table)`` when the
        copy is affordable (docs/performance.md, "Row alignment").

        Examples
        --------
        >>> import numpy as np, cembed
        >>> ids = cembed.Embedding.from_pretrained(np.array([[7], [3], [5]]))   # an id remapping table
        >>> ids(np.array([2, 0]))
        array([[5],
               [7]])
        """
        weight = _pretrained(embeddings)
        return cls(weight.shape[0], weight.shape[1], padding_idx=padding_idx, max_norm=max_norm,
                   norm_type=norm_type, scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=weight,
                   _freeze=freeze)

    def forward(self, indices: Any, *, out_dtype: Any = None) -> np.ndarray:
        """Look up ``indices`` (any shape, any integer dtype): an array ``(*indices.shape, D)``, float32
        for a 16-bit table unless ``out_dtype`` asks for the table's own dtype.

        The validated indices are saved (a private copy) for :meth:`backward`; with ``max_norm`` the
        referenced rows are renormalised in place first.

        Raises
        ------
        IndexError
            An index outside ``[0, num_embeddings)`` of the current table.
        TypeError, ValueError
            See :func:`cembed.functional.embedding`.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding.from_pretrained(np.arange(6.0).reshape(3, 2))
        >>> emb.forward(np.array([[2], [0]]))
        array([[[4., 5.]],
        <BLANKLINE>
               [[0., 1.]]])
        """
        _, max_norm, norm_type = self._checked_options()
        out, self._saved = F.lookup(self._weight, indices, max_norm, norm_type, save=True, out_dtype=out_dtype)
        return out

    __call__ = forward

    def backward(self, grad_output: Any, indices: Any = None, per_sample_weights: Any = None,
                 optimizer: Any = None) -> None:
        """Accumulate d(loss)/d(weight) into ``.grad``.

        Parameters
        ----------
        grad_output : numpy.ndarray
            d(loss)/d(output) of a forward on ``indices``: shape ``(*indices.shape, D)``, or with
            ``per_sample_weights`` ``indices.shape[:-1] + (D,)`` (see
            :func:`cembed.functional.embedding_backward`).
        indices : array_like of int, optional
            Default: those of the last forward, as they were then (a private copy was kept).
        per_sample_weights : numpy.ndarray, optional
            Gradient of the weighted sum over the last index axis.
        optimizer : cembed.optim.Optimizer, optional
            Fused backward + update: sort and sum each touched row's contributions and apply
            ``optimizer``'s update to it in the same pass, without materialising the gradient.
            Needs ``.grad is None`` and leaves it None; advances only this module's optimizer state;
            bitwise equal to ``backward(...); optimizer.step(); optimizer.zero_grad()`` for an
            optimizer holding just this module.

        Raises
        ------
        ValueError
            No indices and no earlier forward; a ``.grad`` that does not match the table (replace
            both together, or call :meth:`zero_grad`); ``optimizer`` with a ``.grad`` present.
        IndexError, TypeError
            Bad indices or dtypes. Nothing is changed.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(5, 2, sparse=True, seed=0)
        >>> out = emb(np.array([3, 1, 3]))
        >>> emb.backward(np.ones_like(out))        # indices of the last forward
        >>> emb.grad.indices, emb.grad.values
        (array([1, 3]), array([[1., 1.],
               [2., 2.]], dtype=float32))
        """
        padding_idx, _, _ = self._checked_options()
        self._check_fused(optimizer)
        weight = self._weight
        checked = as_checked(weight)   # the table the indices are checked against
        if indices is None:
            saved = self._saved
            if saved is None:
                raise ValueError("backward: no indices given and no forward call to take them from")
            saved.check_rows(weight.shape[0])
            flat, shape, groups = saved.flat, saved.shape, saved.groups
        else:
            idx, flat = validated_indices(indices, weight.shape[0])
            shape, groups = idx.shape, index_groups(indices)
        new = F.lookup_contributions(grad_output, shape, flat, per_sample_weights=per_sample_weights,
                                     padding_idx=padding_idx,
                                     scale_grad_by_freq=check_bool(self.scale_grad_by_freq, "scale_grad_by_freq"),
                                     dim=weight.shape[1], dtype=grad_dtype(weight), table_dtype=weight.dtype,
                                     groups=groups)
        self._accumulate(new, optimizer, checked)

    def dot_logistic_backward(self, query: Any, indices: Any, n_positive: int = 1, *, optimizer: Any = None,
                              with_loss: bool = True) -> Tuple[Optional[np.ndarray], np.ndarray, np.ndarray]:
        """Score queries against this table's rows with the logistic (negative-sampling) loss, and
        backpropagate into the table: the output side of skip-gram, matrix factorisation and
        two-tower models in one call.

        Returns what :func:`cembed.functional.embedding_dot_logistic` ``(query, indices, weight,
        n_positive)`` returns for the table as it is *before* the call, and gives the table the
        gradient it implies (entry ``(..., k)`` adds ``grad_scores[..., k] * query[...]`` to row
        ``indices[..., k]``) as ``backward(query, indices, per_sample_weights=grad_scores,
        optimizer=optimizer)`` would: into ``.grad``, or with ``optimizer`` applied at once. With an
        optimizer that has a row rule (SGD without momentum, Adagrad, SparseAdam, SparseAdamW,
        RowWiseAdagrad) on a float32/float64 table the two are one pass — each distinct row is scored against all its queries,
        its gradient summed and the row updated while it is in cache (docs/performance.md, "The skip-gram
        trainer") — with bitwise the results and weights of the two calls, for any thread count; other
        optimizers and 16-bit tables score first, then take the fused backward. ``padding_idx`` rows are
        scored but not updated; ``scale_grad_by_freq`` applies; ``max_norm`` is not (no lookup happens).

        Parameters
        ----------
        query : numpy.ndarray, shape (*indices.shape[:-1], embedding_dim)
            The table's dtype (float32 for a 16-bit table).
        indices : array_like of int, shape (..., n_per_query)
            Each query's positive columns first, then its negatives.
        n_positive : int, default 1
            How many leading columns are positives.
        optimizer : cembed.optim.Optimizer, optional
            Apply the update at once (needs ``.grad is None``, leaves it None), as :meth:`backward`.
        with_loss : bool, default True
            False: the loss is None (the rest is the same bits).

        Returns
        -------
        loss : numpy.ndarray, shape indices.shape[:-1], or None
        grad_scores : numpy.ndarray, shape indices.shape
        grad_query : numpy.ndarray, shape query.shape
            d loss / d query, from the rows before the update: feed it to the query side's backward.

        Raises
        ------
        IndexError, TypeError, ValueError
            As :func:`cembed.functional.embedding_dot_logistic` and :meth:`backward` (an ``optimizer``
            that does not hold this module, a ``.grad`` present with ``optimizer``). Nothing is changed.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> users = cembed.Embedding(100, 8, sparse=True, seed=0)
        >>> items = cembed.Embedding(50, 8, sparse=True, seed=1)
        >>> opt = cembed.optim.SGD([users, items], lr=0.05)
        >>> batch_users = np.array([3, 7, 3])
        >>> clicked_then_sampled = np.array([[4, 10, 20], [9, 1, 4], [4, 30, 2]])   # 1 positive, 2 negatives
        >>> v = users(batch_users)
        >>> loss, g, dv = items.dot_logistic_backward(v, clicked_then_sampled, optimizer=opt)
        >>> users.backward(dv, optimizer=opt)
        >>> loss.shape, g.shape, dv.shape
        ((3,), (3, 3), (3, 8))
        """
        padding_idx, _, _ = self._checked_options()
        self._check_fused(optimizer)
        weight = self._weight
        checked = as_checked(weight)   # the table the indices are checked against
        scores = F.logistic_scores(query, indices, weight, n_positive, with_loss=with_loss,
                                   padding_idx=padding_idx,
                                   scale_grad_by_freq=check_bool(self.scale_grad_by_freq, "scale_grad_by_freq"),
                                   name="dot_logistic_backward")
        self._accumulate(scores, optimizer, checked)
        return scores.results()


class EmbeddingBag(TableModule):
    """Pooled lookups over bags of indices (``torch.nn.EmbeddingBag``).

    Parameters
    ----------
    num_embeddings, embedding_dim, max_norm, norm_type, scale_grad_by_freq, sparse, _weight, dtype, seed
        As :class:`Embedding`.
    mode : {"sum", "mean", "max"}, default "mean"
    include_last_offset : bool, default False
        ``offsets`` are CSR-style (``n_bags + 1`` entries).
    padding_idx : int, optional
        Entries of this row are skipped (and do not count for the mean).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> bag = cembed.EmbeddingBag(10, 3, mode="sum", seed=0)
    >>> out = bag(np.array([1, 2, 4, 5, 4]), offsets=np.array([0, 2]))
    >>> out.shape
    (2, 3)
    >>> bag.backward(np.ones_like(out))
    >>> bag.grad[[1, 4, 7], 0]
    array([1., 2., 0.], dtype=float32)
    """

    _options = ("max_norm", "norm_type", "scale_grad_by_freq", "mode", "sparse", "include_last_offset",
                "padding_idx")

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: Optional[float] = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 _weight: Optional[np.ndarray] = None, include_last_offset: bool = False,
                 padding_idx: Optional[int] = None, dtype: Any = np.float32, seed: Any = None,
                 _freeze: bool = False) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, _freeze, dtype, seed)
        self.mode = mode  # validated at forward, as in torch
        self.include_last_offset = check_bool(include_last_offset, "include_last_offset")
        self._saved: Optional[F.SavedBags] = None

    @classmethod
    def from_pretrained(cls, embeddings: np.ndarray, freeze: bool = True, max_norm: Optional[float] = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                        sparse: bool = False, include_last_offset: bool = False,
                        padding_idx: Optional[int] = None) -> "EmbeddingBag":
        """Wrap an existing table (no copy); frozen by default. Integer tables pool too (sums in
        int64, means in float64), which torch refuses; they cannot be trained.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> counts = cembed.EmbeddingBag.from_pretrained(np.array([[1], [10], [100]]), mode="sum")
        >>> counts(np.array([[0, 2], [1, 1]]))
        array([[101],
               [ 20]])
        """
        weight = _pretrained(embeddings)
        return cls(weight.shape[0], weight.shape[1], max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, mode=mode, sparse=sparse, _weight=weight,
                   include_last_offset=include_last_offset, padding_idx=padding_idx, _freeze=freeze)

    def forward(self, input: Any, offsets: Any = None, per_sample_weights: Any = None, *,
                out_dtype: Any = None) -> np.ndarray:
        """Pool the bags: an array ``(n_bags, D)`` (float32 for a 16-bit table unless ``out_dtype``
        asks for the table's own dtype). See :func:`cembed.functional.embedding_bag`.

        The validated call (private copies of the indices, offsets and per-sample weights) is saved
        for :meth:`backward`.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> bag = cembed.EmbeddingBag.from_pretrained(np.arange(6.0).reshape(3, 2), mode="max")
        >>> bag.forward(np.array([0, 2, 1]), offsets=np.array([0, 2]))
        array([[4., 5.],
               [2., 3.]])
        """
        padding_idx, max_norm, norm_type = self._checked_options()
        weight = self._weight
        resolve_out_dtype(out_dtype, weight.dtype)  # checked before anything is renormalised
        bags = F.validate_bags(input, weight, offsets, self.mode, per_sample_weights,
                               check_bool(self.include_last_offset, "include_last_offset"), padding_idx,
                               check_bool(self.sparse, "sparse"),
                               check_bool(self.scale_grad_by_freq, "scale_grad_by_freq"))
        if max_norm is not None:
            F.renorm_referenced(weight, bags.flat, max_norm, norm_type)
        out = F.pool(weight, bags, want_argmax=bags.mode == "max", out_dtype=out_dtype)
        self._saved = bags
        return out

    __call__ = forward

    def backward(self, grad_output: Any, optimizer: Any = None) -> Optional[np.ndarray]:
        """Accumulate d(loss)/d(weight) of the last forward into ``.grad`` (or, with ``optimizer``,
        apply its update directly: see :meth:`Embedding.backward`).

        Returns
        -------
        numpy.ndarray or None
            d(loss)/d(per_sample_weights) (shape of the forward's ``input``) when per-sample weights
            were given, else None.

        Raises
        ------
        ValueError
            No forward yet; a ``.grad`` or table that no longer matches.
        TypeError
            ``grad_output`` of the wrong dtype.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> bag = cembed.EmbeddingBag(4, 2, mode="sum", seed=0)
        >>> out = bag(np.array([[0, 1], [1, 1]]), per_sample_weights=np.ones((2, 2), np.float32))
        >>> bag.backward(np.ones_like(out)).shape     # the per-sample-weight gradient
        (2, 2)
        >>> bag.grad[:, 0]
        array([1., 3., 0., 0.], dtype=float32)
        """
        bags = self._saved
        if bags is None:
            raise ValueError("backward: call forward first")
        weight = self._weight
        checked = as_checked(weight)   # the table the bags are checked against
        bags.check_table(weight)
        # an integer (lookup-only) table takes no gradient: any float grad_output (for a frozen one's
        # per-sample-weight gradient, or refused below as untrainable); a float table its gradient dtype
        want = compute_dtype(weight.dtype) if is_table_dtype(weight.dtype) else None
        grad_output = check_gradient_rows(grad_output, (bags.n_bags,), dim=weight.shape[1], dtype=want,
                                          table_dtype=weight.dtype, lead="(n_bags,)")
        if want is not None:
            grad_output = grad_output.astype(want, copy=False)   # a few rows: widened
        self._check_fused(optimizer)
        new = None
        if self._trainable():
            new = F.bag_contributions(grad_output, weight, bags,
                                      check_bool(self.scale_grad_by_freq, "scale_grad_by_freq"))
        psw_grad = F.psw_gradient(grad_output, weight, bags) if bags.psw is not None else None
        if new is not None:
            self._accumulate(new, optimizer, checked)
        return psw_grad


def _pretrained(embeddings: Any) -> np.ndarray:
    embeddings = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"Embeddings parameter is expected to be 2-dimensional, got shape {embeddings.shape}")
    return embeddings
