"""Row gather: the embedding lookup."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Row = TypeVar("_Row", np.float32, np.float64, np.uint16)
_Index = NDArray[np.int32] | NDArray[np.int64]

TABLE_FORMATS: dict[str, int]

def gather_rows(weight: NDArray[_Row], indices: _Index, out: NDArray[_Row], n_threads: int) -> None: ...
def gather_rows_widen(
    weight: NDArray[np.uint16], fmt: int, indices: _Index, out: NDArray[np.float32], n_threads: int
) -> None: ...
def narrow_rows(src: NDArray[np.float32], fmt: int, out: NDArray[np.uint16], n_threads: int) -> None: ...
