"""Argument policies, each written once: scalars, sizes, index arrays, weights, row-id arrays.

Every façade (``functional``, the modules, the optimizers) calls these before any kernel runs, so a
call that raises has modified nothing. The rules (see ``docs/safety.md``):

* scalars: :func:`check_real` / :func:`check_int` — one constraint helper for every numeric argument
  (``bool`` and strings are a ``TypeError``; NaN, and inf unless allowed, a ``ValueError``);
* indices: any integer dtype, range-checked against the *current* table (``IndexError`` naming the
  first bad value, its position and the valid range); :class:`GroupedIndices` were checked when made,
  and are re-checked against a table with fewer rows;
* weights: :func:`check_weight` and :func:`kernel_layout` — whether the kernels may use a table in
  place (rows of unit stride, aligned) or must go through a copy of the touched rows; tables may be
  float32, float64, float16 or bfloat16 (``cembed._dtypes``; the 16-bit ones compute in float32);
  a table a kernel writes must not have elements sharing memory (:func:`check_distinct_elements`;
  lookups read any layout, stride-0 views included);
* row-id arrays kept between calls (``SparseGrad`` rows, optimizer state): :func:`check_row_ids`,
  re-run at every use.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Optional, Sequence, Tuple

import numpy as np

from . import _buffer_cache, _checks, _sort
from ._dtypes import TABLE_DTYPE_NAMES, compute_dtype, is_half, is_table_dtype

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_NATIVE_INDEX_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))
_INT64_MAX = np.iinfo(np.int64).max


# ----------------------------------------------------------------------------------------- scalars

def short_repr(value: Any) -> str:
    """``repr(value)`` for a message, shortened when huge (an int of 10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def check_real(value: Any, name: str, *, low: Optional[float] = None, high: Optional[float] = None,
               low_open: bool = False, high_open: bool = False, allow_inf: bool = False) -> float:
    """``value`` as a Python float, or an exception naming ``name``.

    ``TypeError`` for anything that is not a real number (``bool``, ``numpy.bool_``, strings and
    ``None`` included); ``ValueError`` for NaN, for an infinity unless ``allow_inf``, and for values
    outside ``[low, high]`` (``low_open`` / ``high_open`` exclude the bound)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:   # an int beyond the float range
        raise ValueError(f"{name} is too large to be a float, got {short_repr(value)}") from None
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN, got nan")
    if math.isinf(value) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {value}")
    return value


def check_int(value: Any, name: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[low, high]``: ``TypeError`` for non-integers and bools,
    ``ValueError`` outside the bounds."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """A flag: ``bool`` or ``numpy.bool_`` (0/1 integers too, as Python treats them); anything else is
    a ``TypeError``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (numbers.Integral, np.integer)) and value in (0, 1):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_size(value: Any, name: str) -> int:
    """A non-negative int that fits int64 (``num_embeddings``, ``embedding_dim``, ``num_rows``)."""
    return check_int(value, name, low=0, high=_INT64_MAX)


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_max_norm(max_norm: Any, norm_type: Any) -> Tuple[Optional[float], float]:
    """``max_norm``: ``None`` or a real number (any sign, as in torch); ``norm_type``: a real number,
    infinities allowed (the max / min "norms")."""
    if max_norm is not None:
        max_norm = check_real(max_norm, "max_norm", allow_inf=True)
    return max_norm, check_real(norm_type, "norm_type", allow_inf=True)


# ----------------------------------------------------------------------------------------- weights

def check_float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dtype}")
    return dtype


def check_per_sample_weights(psw: np.ndarray, weight: np.ndarray) -> None:
    """Per-sample weights need a table that can be trained and have its compute dtype (float32 for a
    16-bit table)."""
    if not is_table_dtype(weight.dtype):
        raise TypeError(f"per_sample_weights need a {TABLE_DTYPE_NAMES} table, the weight is {weight.dtype}")
    want = compute_dtype(weight.dtype)
    if psw.dtype != want:
        extra = f" (float32 for a {weight.dtype} table)" if want != weight.dtype else ""
        raise TypeError(f"per_sample_weights must have dtype {want}{extra}, got {psw.dtype}")


def plain_array(array: np.ndarray) -> np.ndarray:
    """``array`` itself when it is exactly a numpy.ndarray or numpy.memmap (``EXACT_ARRAY_TYPES``), else
    a plain ndarray view of its memory, made without calling any method of the subclass. A subclass's
    hooks (``__getitem__``, ``__array_function__``, ``view``) answer for it when NumPy copies rows of
    it — a table in a layout the kernels copy from, whose copy a hook made shorter than the rows asked
    for, was read out of bounds — and a ``numpy.matrix`` keeps every result 2-D."""
    return array if type(array) in EXACT_ARRAY_TYPES else np.ndarray.view(array, np.ndarray)


def as_array(value: Any) -> np.ndarray:
    """An argument as an ndarray: a plain one as it is (:func:`plain_array`), anything else through
    ``numpy.asarray``."""
    return plain_array(value) if isinstance(value, np.ndarray) else np.asarray(value)


def check_weight(weight: Any, name: str = "weight", *, numeric: bool = False) -> np.ndarray:
    """A 2-D ndarray in native byte order: float32/float64/float16/bfloat16, or with ``numeric=True``
    any integer or float dtype (integer tables are lookup-only). It is used as is, never copied — an
    array subclass as a plain ndarray view of its memory (:func:`plain_array`)."""
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(weight).__name__}")
    weight = plain_array(weight)
    if weight.ndim != 2:
        raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
    def allowed(dtype: np.dtype) -> bool:
        return (numeric and dtype.kind in "iu") or is_table_dtype(dtype)

    if not allowed(weight.dtype) and (weight.dtype.isnative or not allowed(weight.dtype.newbyteorder("="))):
        if numeric:
            raise TypeError(f"{name} must have a numeric dtype (integer, {TABLE_DTYPE_NAMES}), got {weight.dtype}")
        raise TypeError(f"{name} must be {TABLE_DTYPE_NAMES}, got dtype {weight.dtype}")
    if not weight.dtype.isnative:   # (an allowed dtype in the other byte order: '>f4' is not float32)
        raise TypeError(f"{name} must be in native byte order, got dtype {weight.dtype.str}")
    return weight


def check_trainable(weight: np.ndarray, name: str = "weight") -> None:
    """Gradients and optimizer updates need a float32/float64/float16/bfloat16 table."""
    if not is_table_dtype(weight.dtype):
        raise TypeError(f"{name} has dtype {weight.dtype}: only {TABLE_DTYPE_NAMES} tables can be trained "
                        "(integer tables are lookup-only; use freeze=True)")


def grad_dtype(weight: np.ndarray) -> Optional[np.dtype]:
    """The dtype of a table's gradients and of the ``grad_output`` its backward takes: float32 for a
    16-bit table, the table's dtype for float32/float64, None for a lookup-only (integer) table."""
    return compute_dtype(weight.dtype) if is_table_dtype(weight.dtype) else None


def check_writeable(weight: np.ndarray, what: str, name: str = "weight") -> None:
    if not weight.flags.writeable:
        raise ValueError(f"{name} is read-only but {what} writes into it")


def kernel_layout(array: np.ndarray) -> bool:
    """True when the kernels can use a 2-D table in place: float32/float64 (or float16/bfloat16,
    through their uint16 view: ``cembed._dtypes.as_kernel_view``), each row contiguous
    (unit column stride), a row stride that is a whole number of items, and aligned data. Tables
    that are not (``big[:, ::2]``, Fortran order, a packed record field) are handled by copying only
    the rows a call touches, never the whole table."""
    itemsize = array.itemsize
    return ((array.dtype in FLOAT_DTYPES or is_half(array.dtype))
            and (array.shape[1] <= 1 or array.strides[1] == itemsize)
            and array.strides[0] % itemsize == 0
            and array.ctypes.data % itemsize == 0)


def elements_overlap(array: np.ndarray) -> bool:
    """Whether two elements of a 2-D ``array`` may share memory (rows overlapping, ``as_strided``
    with a row stride shorter than a row, a stride-0 ``broadcast_to`` table), by the sorted-strides
    rule: taking the axes of more than one element from the smallest absolute stride up, each
    stride must reach past everything the smaller axes span. Every layout NumPy makes without
    ``as_strided`` passes (C and Fortran order, column or row slices, reversed rows, a record field);
    O(1)."""
    if array.size == 0:
        return False
    if array.ndim == 2:   # the tables: the same rule, unrolled (it runs at every step)
        (n0, n1), item = array.shape, array.itemsize
        s0, s1 = abs(array.strides[0]), abs(array.strides[1])
        if n0 == 1 or n1 == 1:   # one axis of one element: only the other's stride matters (none for 1 x 1)
            return (n0 > 1 and s0 < item) or (n1 > 1 and s1 < item)
        if s0 > s1:
            s0, n0, s1, n1 = s1, n1, s0, n0
        return s0 < item or s1 < s0 * (n0 - 1) + item
    extent = array.itemsize
    for stride, n in sorted((abs(s), n) for s, n in zip(array.strides, array.shape) if n > 1):
        if stride < extent:
            return True
        extent += stride * (n - 1)
    return False


def check_distinct_elements(weight: np.ndarray, what: str, name: str = "weight") -> None:
    """The policy for every table a kernel WRITES (an optimizer's update, the fused backward, the
    ``max_norm`` renormalisation, the logistic SGD step, the 16-bit rounding in place): ValueError
    when two of its elements may share memory (:func:`elements_overlap`) — parallel row updates would
    race on the shared bytes (results changing from run to run), and even one thread would
    overwrite one row with another's update. Lookups only read, and keep taking such tables."""
    if elements_overlap(weight):
        raise ValueError(f"{name} has elements that share memory (shape {weight.shape}, strides {weight.strides}: "
                         f"a row stride shorter than a row, or a stride-0 view) but {what} writes into it; "
                         "update a table whose rows do not overlap (e.g. numpy.ascontiguousarray of it)")


# ----------------------------------------------------------------------------------------- indices

def as_index_array(indices: Any, name: str = "indices", n_rows: Optional[int] = None) -> np.ndarray:
    """Indices as an int32 or int64 ndarray of any shape (int32/int64 input is not copied).

    Any signed or unsigned integer dtype is accepted; bool, float and object arrays are a TypeError (a
    Python list mixing bools with ints is taken as NumPy and ``torch.tensor`` take it: as ints). uint64
    values that do not fit int64 are reported as out of range rather than wrapped."""
    try:
        arr = as_array(indices)
    except ValueError as exc:   # (a ragged nested list: NumPy's message does not say which argument)
        raise ValueError(f"{name} must be an array of one shape: {exc}") from None
    if not isinstance(indices, np.ndarray):
        if arr.dtype.kind == "f" and arr.size == 0:
            arr = arr.astype(np.int64)  # [] (or [[]]) from Python: an empty index list
        elif arr.dtype.kind in "fO":
            arr = _python_integers(indices, arr, name, n_rows)
    kind = arr.dtype.kind
    if kind == "b" or kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.dtype in _NATIVE_INDEX_DTYPES and arr.dtype.isnative:
        return arr
    if kind == "u" and arr.dtype.itemsize >= 8 and arr.size:
        too_big = arr > _INT64_MAX
        if too_big.any():
            raise_index_error(arr, int(np.flatnonzero(too_big.ravel())[0]), n_rows, name)
    if arr.dtype.itemsize <= 4 and not (kind == "u" and arr.dtype.itemsize == 4):
        return arr.astype(np.int32)
    return arr.astype(np.int64)


def _python_integers(indices: Any, arr: np.ndarray, name: str, n_rows: Optional[int]) -> np.ndarray:
    """A Python sequence NumPy could not make an integer array of although every element is an
    integer — ints beyond int64 (an object array), or uint64 values mixed with signed ones
    (``[np.uint64(3), 1]``, ``[0, 2**63]``: float64, their common NumPy type) — as int64, never
    rounded; an IndexError naming the first beyond int64. ``arr`` itself when an element is not an
    integer (a float index stays a TypeError naming ``arr``'s dtype)."""
    exact = arr if arr.dtype.kind == "O" else np.asarray(indices, dtype=object)
    if exact.shape != arr.shape:
        return arr
    values = []
    first_beyond = -1
    for pos, value in enumerate(exact.reshape(-1)):
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iu":
            value = value.item()   # (a 0-d integer array, as NumPy takes it in a list of ints)
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            return arr
        if first_beyond < 0 and not -_INT64_MAX - 1 <= value <= _INT64_MAX:
            first_beyond = pos
        values.append(int(value))
    if first_beyond >= 0:
        raise_index_error(exact, first_beyond, n_rows, name)
    return np.array(values, dtype=np.int64).reshape(arr.shape)


def kernel_array(arr: Any, dtype: Any = None) -> np.ndarray:
    """``arr`` (converted to ``dtype`` if given) C-contiguous and aligned, copied only when it is not:
    what a kernel reads or writes through a typed pointer. (``np.ascontiguousarray`` keeps an unaligned
    array as it is — a view into a byte buffer at an odd offset, a field of a packed record — and a
    kernel's load from it is undefined behaviour.)"""
    return np.require(arr, dtype=dtype, requirements=("C", "A"))


def flat_indices(arr: np.ndarray) -> np.ndarray:
    """The indices as a 1-D C-contiguous, aligned array (a view when they already are)."""
    return kernel_array(arr).reshape(-1)


def raise_index_error(arr: np.ndarray, pos: int, n_rows: Optional[int], name: str) -> None:
    value = arr.reshape(-1)[pos]
    where = tuple(int(i) for i in np.unravel_index(pos, arr.shape)) if arr.ndim > 1 else pos
    valid = f"[0, {n_rows})" if n_rows is not None else "[0, num_embeddings)"
    raise IndexError(f"{name} contains {value} at position {where}, outside the valid range {valid}")


def check_index_range(flat: np.ndarray, shape: Tuple[int, ...], n_rows: int, name: str = "indices") -> None:
    """IndexError naming the first index outside [0, n_rows) (negative included)."""
    if flat.size == 0:
        return
    pos = _checks.first_out_of_range(flat, n_rows)
    if pos >= 0:
        raise_index_error(flat.reshape(shape), int(pos), n_rows, name)


def frozen(array: np.ndarray) -> np.ndarray:
    """``array`` in memory nobody can write: as it is when it already is (a frozen block's, made by
    ``_buffer_cache.frozen_copy`` or ``_sort.sort_rows(..., frozen=True)``), else a copy in a frozen
    block. Its ``flags.writeable`` cannot be turned back on, not even through ``.base`` or the block
    (NumPy refuses it for read-only memory)."""
    return array if _buffer_cache.is_frozen(array) else _buffer_cache.frozen_copy(array)


class GroupedIndices:
    """Indices checked against a table size and grouped by row once, ahead of the calls that use
    them: made by :func:`cembed.functional.group_indices` only (see there).

    Holds the indices (int32/int64, the caller's shape), the table size they were checked against,
    and the row grouping ``(order, rows, starts)`` of the backward's radix sort — copies in memory that
    cannot be made writeable (:func:`frozen`), so nothing that reaches them (``groups``, a
    ``SparseGrad`` built on them) can change them. Immutable; usable from any thread.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed import functional as F
    >>> batch = F.group_indices(np.array([4, 1, 4]), num_rows=5)
    >>> batch.shape, batch.num_rows, batch.n_distinct, np.asarray(batch)
    ((3,), 5, 2, array([4, 1, 4]))
    """

    __slots__ = ("_indices", "_flat", "_n_rows", "_groups")
    _indices: np.ndarray
    _flat: np.ndarray
    _n_rows: int
    _groups: Tuple[np.ndarray, np.ndarray, np.ndarray]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("GroupedIndices are made by cembed.functional.group_indices(indices, num_rows)")

    @classmethod
    def _make(cls, flat: np.ndarray, shape: Tuple[int, ...], n_rows: int,
              groups: Tuple[np.ndarray, np.ndarray, np.ndarray]) -> "GroupedIndices":
        """For group_indices: ``flat`` checked against ``n_rows`` and ``groups`` made from it by the
        radix sort, each kept as it is when already frozen (as group_indices makes them), else copied
        into a frozen block."""
        self = object.__new__(cls)
        frozen_flat = frozen(flat)
        for name, value in (("_flat", frozen_flat), ("_indices", frozen_flat.reshape(shape)),
                            ("_n_rows", int(n_rows)), ("_groups", tuple(frozen(a) for a in groups))):
            object.__setattr__(self, name, value)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("GroupedIndices are immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("GroupedIndices are immutable")

    def __reduce__(self) -> Tuple[Any, Tuple[np.ndarray, int]]:
        """Pickled as the indices and the table size: unpickling groups them again
        (:func:`group_new`, as ``functional.group_indices`` does: checked and sorted anew, nothing read
        from a pickle is trusted), e.g. in another process of a data loader."""
        return group_new, (np.array(self._indices), self._n_rows)

    def __copy__(self) -> "GroupedIndices":
        return self   # immutable

    def __deepcopy__(self, memo: Any) -> "GroupedIndices":
        return self

    @property
    def shape(self) -> Tuple[int, ...]:
        """The indices' shape."""
        return tuple(self._indices.shape)

    @property
    def num_rows(self) -> int:
        """The table size the indices were checked against."""
        return self._n_rows

    @property
    def n_distinct(self) -> int:
        """How many distinct rows the indices reference."""
        return int(self._groups[1].size)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """A writeable copy of the indices."""
        return np.array(self._indices, dtype=dtype, copy=True)

    def __repr__(self) -> str:
        return (f"GroupedIndices(shape={self.shape}, dtype={self._indices.dtype}, num_rows={self._n_rows}, "
                f"n_distinct={self.n_distinct})")

    def checked(self, n_rows: int, name: str) -> Tuple[np.ndarray, np.ndarray]:
        """(indices, flat) for a table of ``n_rows`` rows: free when it has at least the rows they were
        checked against, one O(n) range check when it has fewer."""
        if n_rows < self._n_rows:
            check_index_range(self._flat, self._indices.shape, n_rows, name)
        return self._indices, self._flat

    @property
    def groups(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, distinct rows ascending, segment starts), read-only for good."""
        return self._groups


def group_new(indices: Any, num_rows: int, n_threads: Any = 1) -> GroupedIndices:
    """``indices`` (not yet grouped) checked against ``num_rows`` and grouped by row: a private copy
    first, then its check and its stable radix sort, into memory read-only from birth (what is
    checked is what is kept, whatever the caller does to its array meanwhile). The grouping does not
    depend on ``n_threads`` (a count, or a function of the number of indices giving one).
    ``functional.group_indices``'s work, and how a pickle is read back."""
    num_rows = check_size(num_rows, "num_rows")
    idx = as_index_array(indices, "indices", num_rows)
    flat = _buffer_cache.frozen_copy(idx).reshape(-1)
    check_index_range(flat, idx.shape, num_rows)
    groups = _sort.sort_rows(flat, n_threads(flat.size) if callable(n_threads) else int(n_threads), True,
                             frozen=True)
    return GroupedIndices._make(flat, idx.shape, num_rows, groups)


def index_groups(indices: Any) -> Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The row grouping carried by ``indices`` (a :class:`GroupedIndices`), else None."""
    return indices.groups if isinstance(indices, GroupedIndices) else None


#: Integer types taken as they are: exactly these, not subclasses (whose operators would run code after
#: the checks, e.g. at an optimizer's ``state["step"] += 1``).
EXACT_INTEGER_TYPES = (int, np.int8, np.int16, np.int32, np.int64, np.longlong, np.uint8, np.uint16, np.uint32,
                       np.uint64, np.ulonglong)
#: Real types a kept scalar (an optimizer's clock) is taken as: exactly these (a subclass's __float__
#: would run code inside the update, after the checks).
EXACT_REAL_TYPES = EXACT_INTEGER_TYPES + (float, np.float16, np.float32, np.float64)
#: Array types kept arrays and updates are taken as: plain arrays and memory maps (tables and state on
#: disk). A subclass's hooks (``__array_function__``, ``__array_ufunc__``) would run code after the
#: checks, inside the update.
EXACT_ARRAY_TYPES = (np.ndarray, np.memmap)


def check_exact_array(value: Any, name: str) -> None:
    """ValueError unless ``value`` is exactly a numpy.ndarray or numpy.memmap (EXACT_ARRAY_TYPES)."""
    if type(value) not in EXACT_ARRAY_TYPES:
        raise ValueError(f"{name} must be a numpy.ndarray (or numpy.memmap), got {type(value).__name__}: "
                         "an update takes no array subclasses (their hooks would run inside the step)")


def array_key(array: np.ndarray) -> Tuple[Any, ...]:
    """What a kernel relies on in an array besides its identity — shape, strides, dtype, address — to
    tell, after code of the caller's may have run, that an array checked earlier is still as it was
    (``ndarray.resize`` changes these in place)."""
    return (array.shape, array.strides, array.dtype, array.__array_interface__["data"][0])


def as_checked(array: np.ndarray) -> Tuple[np.ndarray, Tuple[Any, ...]]:
    """``(array, array_key(array))``: an array as a call checked it, for :func:`is_as_checked`."""
    return array, array_key(array)


def is_as_checked(array: Any, checked: Tuple[np.ndarray, Tuple[Any, ...]]) -> bool:
    """Whether ``array`` is still the array of ``checked`` (:func:`as_checked`), as it was then."""
    return array is checked[0] and array_key(array) == checked[1]


def may_be_callers(flat: np.ndarray, caller: Any) -> bool:
    """Whether the caller may still write the memory of ``flat`` (made from ``caller`` by the index
    conversion): it shares memory with the caller's ndarray, or ``caller`` is anything else (an ndarray
    subclass included) NumPy may have
    wrapped without copying (a ``memoryview``, an ``array.array``, an object whose ``__array__`` returns
    an array it keeps, ...). Only Python lists, tuples and integers are always converted into fresh
    memory; a :class:`GroupedIndices` holds frozen copies."""
    if type(caller) is np.ndarray:   # a subclass could answer may_share_memory itself (__array_function__)
        return bool(np.may_share_memory(flat, caller))
    return not isinstance(caller, (list, tuple, int, np.integer, GroupedIndices))


def validated_indices(indices: Any, n_rows: int, name: str = "indices") -> Tuple[np.ndarray, np.ndarray]:
    """(index array of the caller's shape, its flat int32/int64 view), range-checked against ``n_rows``
    (a :class:`GroupedIndices` was checked when it was made: re-checked only against a smaller table).

    The ids checked are in memory only cembed reaches: when the caller may still write the memory they
    came in (:func:`may_be_callers`), they are copied first (into memory read-only from birth) and the
    copy is checked and returned. Code that runs later in the same call — a hook of another argument
    (``__array__``, ``__index__``, ``__float__``), a subclass's ``__array_function__``, another thread —
    cannot change what the kernel will read."""
    if isinstance(indices, GroupedIndices):
        return indices.checked(n_rows, name)
    idx = as_index_array(indices, name, n_rows)
    flat = checked_private_indices(idx, indices, n_rows, name)
    return flat.reshape(idx.shape), flat


def checked_private_indices(idx: np.ndarray, caller: Any, n_rows: int, name: str) -> np.ndarray:
    """The flat ids of ``idx`` (converted from ``caller``) in memory the caller cannot write — a copy
    read-only from birth when it could (:func:`may_be_callers`), else the fresh conversion — and only
    then range-checked: what a kernel reads, or a call keeps, is what was checked."""
    flat = flat_indices(idx)
    if may_be_callers(flat, caller):
        flat = _buffer_cache.frozen_copy(flat)
    check_index_range(flat, idx.shape, n_rows, name)
    return flat


def check_row_ids(rows: Any, n_rows: int, name: str) -> np.ndarray:
    """A row-id array kept between calls (a ``SparseGrad``'s rows, an optimizer's live rows): 1-D
    int64, contiguous (the array checked is the array the kernels read), strictly increasing, inside
    ``[0, n_rows)``. Re-run at every use; one O(n) pass."""
    if isinstance(rows, np.ndarray):
        check_exact_array(rows, name)
    if not isinstance(rows, np.ndarray) or rows.dtype != np.int64 or rows.ndim != 1:
        raise ValueError(f"{name} must be a 1-D int64 array, got "
                         f"{type(rows).__name__ if not isinstance(rows, np.ndarray) else rows.dtype}")
    if not rows.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous array, got one with stride {rows.strides[0]}")
    pos = _checks.first_unsorted_or_out_of_range(rows, n_rows)
    if pos >= 0:
        value = int(rows[pos])
        if not 0 <= value < n_rows:
            raise IndexError(f"{name} contains {value} at position {pos}, outside the valid range [0, {n_rows})")
        raise ValueError(f"{name} must be strictly increasing: position {pos} holds {value} after "
                         f"{int(rows[pos - 1])}")
    return rows


def random_generator(seed: Any, name: str = "seed") -> np.random.Generator:
    """``numpy.random.default_rng(seed)`` for a seed of None, an int >= 0 (a NumPy integer too), a
    ``SeedSequence`` or a ``BitGenerator``; a ``Generator`` is used as it is. TypeError / ValueError
    naming ``name`` for anything else (NumPy's own messages do not say which argument)."""
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and not isinstance(seed, (np.random.SeedSequence, np.random.BitGenerator)):
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (numbers.Integral, np.integer)):
            raise TypeError(f"{name} must be an int >= 0, a numpy.random.Generator or None, got "
                            f"{type(seed).__name__}")
        seed = check_int(seed, name, low=0)
    return np.random.default_rng(seed)


def normalize_padding_idx(padding_idx: Any, n_rows: int) -> Optional[int]:
    """torch's rule: -n_rows <= p < n_rows, negatives stored as n_rows + p; None stays None."""
    if padding_idx is None:
        return None
    p = check_int(padding_idx, "padding_idx")
    if not -n_rows <= p < n_rows:
        raise ValueError(
            f"padding_idx must be within num_embeddings: got {p}, valid range is "
            f"[{-n_rows}, {n_rows - 1}] for num_embeddings={n_rows}"
        )
    return p + n_rows if p < 0 else p


def check_gradient_rows(grad_output: Any, lead_shape: Tuple[int, ...], *, dim: Optional[int] = None,
                        dtype: Optional[np.dtype] = None, table_dtype: Optional[np.dtype] = None,
                        name: str = "grad_output", lead: str = "indices.shape") -> np.ndarray:
    """``grad_output`` of shape ``lead_shape + (dim,)`` as a C-contiguous ``(n, dim)`` float array in
    native byte order (a view when it already is one). ``lead`` says in the error what ``lead_shape``
    is (``"indices.shape[:-1]"``, ``"(n_bags,)"``).

    ``dtype``: the dtype it must have (a table's :func:`grad_dtype`); a 16-bit ``table_dtype`` also
    allows that table's own dtype (the ``out_dtype`` its lookups may return; the kernels widen it
    exactly as they sum). With neither, any of float32, float64, float16 and bfloat16."""
    arr = as_array(grad_output)
    if arr.dtype.kind == "f" and not arr.dtype.isnative:   # byte-swapped floats: converted (a copy)
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if arr.dtype not in FLOAT_DTYPES and not is_half(arr.dtype):
        raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got dtype {arr.dtype}")
    own_half = table_dtype is not None and is_half(table_dtype) and arr.dtype == table_dtype
    if dtype is not None and arr.dtype != dtype and not own_half:
        also = f" or {table_dtype}" if table_dtype is not None and is_half(table_dtype) else ""
        raise TypeError(f"{name} has dtype {arr.dtype} but the weight takes {dtype}{also}")
    if arr.ndim != len(lead_shape) + 1 or arr.shape[:-1] != tuple(lead_shape) or (
            dim is not None and arr.shape[-1] != dim):
        want = tuple(lead_shape) + ((dim,) if dim is not None else ("dim",))
        raise ValueError(f"{name} must have shape {lead} + (embedding_dim,) = {want}, got {arr.shape}")
    n = int(np.prod(lead_shape, dtype=np.int64))
    return kernel_array(arr.astype(arr.dtype.newbyteorder("="), copy=False)).reshape(n, arr.shape[-1])
