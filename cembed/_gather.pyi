"""Row gather (the embedding lookup) and the index range check that guards every kernel."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)
_Index = NDArray[np.int32] | NDArray[np.int64]

def first_out_of_range(indices: _Index, n_rows: int) -> int: ...
def gather_rows(weight: NDArray[_Float], indices: _Index, out: NDArray[_Float], n_threads: int) -> None: ...
