"""Row gather: the embedding lookup."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)
_Index = NDArray[np.int32] | NDArray[np.int64]

def gather_rows(weight: NDArray[_Float], indices: _Index, out: NDArray[_Float], n_threads: int) -> None: ...
