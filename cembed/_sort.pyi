"""Grouping of row ids: a parallel, stable LSD radix sort and the segment boundaries of equal rows."""
from typing import Any, Callable, Literal, overload

import numpy as np
from numpy.typing import NDArray

_Index = NDArray[np.int32] | NDArray[np.int64]
_I64 = NDArray[np.int64]
_Empty = Callable[[tuple[int, ...], Any], NDArray[Any]] | None

@overload
def sort_rows(keys: _Index, n_threads: int, want_order: Literal[True] = ...,
              empty: _Empty = ..., frozen: bool = ...) -> tuple[_I64, _I64, _I64]: ...
@overload
def sort_rows(keys: _Index, n_threads: int, want_order: Literal[False],
              empty: _Empty = ..., frozen: bool = ...) -> tuple[None, _I64, _I64]: ...
@overload
def sort_rows(keys: _Index, n_threads: int, want_order: bool,
              empty: _Empty = ..., frozen: bool = ...) -> tuple[_I64 | None, _I64, _I64]: ...
def _sort_rows_numpy(keys: _Index, want_order: bool) -> tuple[_I64 | None, _I64, _I64]: ...
def _frozen_if(order: _I64 | None, unique_rows: _I64, starts: _I64,
               frozen: bool = ...) -> tuple[_I64 | None, _I64, _I64]: ...
def release_scratch() -> int: ...
