"""In-place max_norm renormalisation of the (unique) rows a lookup touches."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def renorm_rows(
    weight: NDArray[_Float], rows: NDArray[np.int64], max_norm: float, norm_type: float, n_threads: int
) -> None: ...
def renorm_rows_half(
    weight: NDArray[np.uint16], fmt: int, rows: NDArray[np.int64], max_norm: float, norm_type: float, n_threads: int
) -> None: ...
