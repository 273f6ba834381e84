"""SparseGrad, the row-sparse gradient that is always coalesced, and the sparse merge it is built on."""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from . import _sparse_merge
from ._config import n_threads_for
from ._validation import FLOAT_DTYPES, check_row_ids, check_size, frozen


def check_exact_sparse_grad(grad: Any, name: str) -> None:
    """TypeError for a subclass of :class:`SparseGrad`: an update or a merge sizes its reads from a
    gradient's shape and rows, which a subclass could report through properties other than its own
    arrays; only an exact ``SparseGrad`` is merged into ``.grad`` or stepped (anything that is not a
    SparseGrad at all is left to the caller)."""
    if isinstance(grad, SparseGrad) and type(grad) is not SparseGrad:
        raise TypeError(f"{name} must be a cembed.SparseGrad itself, not a subclass ({type(grad).__name__}): an "
                        "update reads its rows after they were checked")


def zeroed_grad(grad: Any) -> Any:
    """The gradient ``zero_grad(set_to_none=False)`` leaves, as torch's zeroing in place does: a
    writeable dense array zeroed in place (and returned), a read-only one replaced by zeros of its
    shape and dtype (cembed never writes into an array its caller made read-only), a
    :class:`SparseGrad` by an empty one of the same table and dtype (a step still counts it, as torch's
    empty sparse gradient); None, and anything that is no gradient, becomes None."""
    if isinstance(grad, np.ndarray):
        if grad.flags.writeable:
            grad.fill(0)
            return grad
        return np.zeros(grad.shape, grad.dtype)
    if isinstance(grad, SparseGrad):
        return SparseGrad._from_private(np.empty(0, np.int64), np.zeros((0, grad.shape[1]), grad.dtype),
                                        grad.shape[0])
    return None


def _read_only_view(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def merge_plan(a_rows: np.ndarray, b_rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Union of two strictly increasing int64 row lists.

    Returns ``(rows, a_slot, b_slot)``: the union ascending, and for each row of ``a`` and of ``b``
    its position in the union. O(len(a) + len(b)); used by :meth:`SparseGrad.merge` and by SGD's
    sparse momentum (live rows merged with a gradient's rows)."""
    n_a, n_b = a_rows.size, b_rows.size
    rows = np.empty(n_a + n_b, dtype=np.int64)
    a_slot = np.empty(n_a, dtype=np.int64)
    b_slot = np.empty(n_b, dtype=np.int64)
    n_out = _sparse_merge.merge_plan(a_rows, b_rows, rows, a_slot, b_slot)
    return rows[:n_out].copy(), a_slot, b_slot


class SparseGrad:
    """Row-sparse gradient of a ``(num_rows, dim)`` table, always coalesced.

    Parameters
    ----------
    indices : array_like of int, shape (nnz,)
        Row ids, strictly increasing, in ``[0, num_rows)``.
    values : array_like of float32 or float64, shape (nnz, dim)
        Row ``k`` is the gradient of row ``indices[k]``.
    num_rows : int
        Rows of the table the gradient belongs to.

    Attributes
    ----------
    indices : numpy.ndarray
        int64 ``(nnz,)``, read-only.
    values : numpy.ndarray
        ``(nnz, dim)``, read-only.

    Raises
    ------
    TypeError
        Non-integer indices or non-float values.
    IndexError
        A row id outside ``[0, num_rows)`` (uint64 ids of 2**63 and more included).
    ValueError
        Bad shapes, or row ids that are not strictly increasing.

    Notes
    -----
    The arrays are private, read-only copies: a ``SparseGrad`` never shares memory with the arrays
    it was built from. Its row ids live in memory that cannot be made writeable, so what was checked
    at construction stays true (the optimizers check the rows again anyway, at every step). Its values
    are read-only through ``.values``; they are stored in an ordinary array, which cembed's own
    in-place gradient clipping scales (code that reaches it through ``.values.base`` can change the
    numbers, never the rows they belong to).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> g = cembed.SparseGrad([1, 3], np.ones((2, 2), np.float32), num_rows=5)
    >>> g.shape, g.nnz
    ((5, 2), 2)
    >>> g.to_dense()[:, 0]
    array([0., 1., 0., 1., 0.], dtype=float32)
    >>> (g + g).values[0]
    array([2., 2.], dtype=float32)
    """

    __slots__ = ("_indices", "_buffer", "_values", "_num_rows")
    _indices: np.ndarray
    _buffer: np.ndarray
    _values: np.ndarray
    _num_rows: int

    def __init__(self, indices: Any, values: Any, num_rows: int) -> None:
        num_rows = check_size(num_rows, "num_rows")
        indices = np.asarray(indices)
        values = np.asarray(values)
        if indices.dtype.kind not in "iu" or indices.dtype == np.bool_:
            if not (indices.size == 0 and indices.dtype.kind == "f"):
                raise TypeError(f"SparseGrad indices must be integers, got dtype {indices.dtype}")
        if values.dtype.newbyteorder("=") not in FLOAT_DTYPES:   # (either byte order: stored native)
            raise TypeError(f"SparseGrad values must be float32 or float64, got dtype {values.dtype}")
        if indices.ndim != 1:
            raise ValueError(f"SparseGrad indices must be 1-D, got shape {indices.shape}")
        if values.ndim != 2 or values.shape[0] != indices.shape[0]:
            raise ValueError(
                f"SparseGrad values must have shape (nnz, dim) = ({indices.shape[0]}, dim), got {values.shape}"
            )
        if indices.dtype.kind == "u" and indices.size and indices.max() > np.iinfo(np.int64).max:
            bad = int(np.flatnonzero(indices > np.iinfo(np.int64).max)[0])
            raise IndexError(f"SparseGrad indices contains {indices[bad]} at position {bad}, "
                             f"outside the valid range [0, {num_rows})")
        rows = frozen(np.asarray(indices, dtype=np.int64))   # a copy nobody can write, then checked
        check_row_ids(rows, num_rows, "SparseGrad indices")
        buffer = np.array(values, dtype=values.dtype.newbyteorder("="), order="C", copy=True)
        self._set(rows, buffer, num_rows)

    def _set(self, indices: np.ndarray, buffer: np.ndarray, num_rows: int) -> None:
        """Fill the slots once (a SparseGrad is immutable afterwards: ``__setattr__`` refuses)."""
        for name, value in (("_indices", indices), ("_buffer", buffer), ("_values", _read_only_view(buffer)),
                            ("_num_rows", num_rows)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("SparseGrad is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("SparseGrad is immutable")

    def __reduce__(self) -> Tuple[Any, Tuple[np.ndarray, np.ndarray, int]]:
        # pickling / copy.deepcopy rebuild through the constructor: the copy is checked like any input
        return (SparseGrad, (self._indices, self._buffer, self._num_rows))

    @classmethod
    def _from_private(cls, indices: np.ndarray, values: np.ndarray, num_rows: int) -> "SparseGrad":
        """Wrap arrays that cembed itself just computed (coalesced, in range, owned by nobody else)."""
        grad = cls.__new__(cls)
        grad._set(frozen(indices), values, num_rows)
        return grad

    def _writable_values(self) -> np.ndarray:
        """The stored values for cembed's own in-place updates (gradient clipping); row ids are
        never writable."""
        return self._buffer

    @property
    def indices(self) -> np.ndarray:
        """int64 ``(nnz,)`` row ids, strictly increasing (read-only)."""
        return self._indices

    @property
    def values(self) -> np.ndarray:
        """``(nnz, dim)`` gradient rows (read-only)."""
        return self._values

    @property
    def num_rows(self) -> int:
        """Rows of the table the gradient belongs to."""
        return self._num_rows

    @property
    def shape(self) -> Tuple[int, int]:
        """``(num_rows, dim)`` of the dense gradient this stands for."""
        return (self._num_rows, int(self._values.shape[1]))

    @property
    def nnz(self) -> int:
        """Number of stored rows."""
        return int(self._indices.shape[0])

    @property
    def dtype(self) -> np.dtype:
        """The values' dtype (the weight's)."""
        return self._values.dtype

    def to_dense(self) -> np.ndarray:
        """The dense ``(num_rows, dim)`` gradient (a new array).

        Examples
        --------
        >>> import numpy as np, cembed
        >>> cembed.SparseGrad([0], [[1.0, 2.0]], 2).to_dense()
        array([[1., 2.],
               [0., 0.]])
        """
        out = np.zeros(self.shape, dtype=self._values.dtype)
        out[self._indices] = self._values
        return out

    def merge(self, other: "SparseGrad") -> "SparseGrad":
        """``self + other`` as a new coalesced gradient, as torch's sparse add coalesced: every row summed
        from +0.0 (rows present in both: ``self``'s value first), so a row holding -0.0 gives +0.0 —
        except that a gradient with no rows added to another gives the other's values as they are, as
        torch's add returns them. Work is O(nnz), independent of ``num_rows``.

        Raises
        ------
        TypeError
            ``other`` (or ``self``) is not a ``SparseGrad`` itself (subclasses are refused, as the
            optimizers refuse them), or the dtypes differ.
        ValueError
            The shapes differ.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> a = cembed.SparseGrad([0, 2], np.ones((2, 1)), 4)
        >>> b = cembed.SparseGrad([2, 3], np.ones((2, 1)), 4)
        >>> a.merge(b).indices, a.merge(b).values[:, 0]
        (array([0, 2, 3]), array([1., 2., 1.]))
        """
        if type(other) is not SparseGrad or type(self) is not SparseGrad:
            # a subclass could report another shape than its rows have (a property), and the merge
            # kernel sizes its reads from the shapes
            raise TypeError(f"can only merge a cembed.SparseGrad with a cembed.SparseGrad (not a subclass), got "
                            f"{type(self).__name__} and {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge SparseGrads of shapes {self.shape} and {other.shape}")
        if other.dtype != self.dtype:
            raise TypeError(f"cannot merge SparseGrads of dtypes {self.dtype} and {other.dtype}")
        if self._indices.size == 0 or other._indices.size == 0:   # (torch's add: the other operand, unchanged)
            kept = other if self._indices.size == 0 else self
            return SparseGrad._from_private(kept._indices, kept._values.copy(), self._num_rows)
        rows, a_slot, b_slot = merge_plan(self._indices, other._indices)
        values = np.empty((rows.size, self._values.shape[1]), dtype=self._values.dtype)
        _sparse_merge.merge_values(self._values, a_slot, other._values, b_slot, values,
                                   n_threads_for(rows.size, "merge"))
        return SparseGrad._from_private(rows, values, self._num_rows)

    def __add__(self, other: Any) -> Any:
        """``a + b`` = :meth:`merge` for two SparseGrads; anything else: ``NotImplemented`` (so Python
        tries ``other.__radd__``, and ``sum`` of SparseGrads starting from one of them works)."""
        if type(other) is not SparseGrad:
            return NotImplemented
        return self.merge(other)

    def __repr__(self) -> str:
        return f"SparseGrad(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"
