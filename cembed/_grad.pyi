"""Gradient accumulation: the segment sum behind every embedding backward and `coalesce`."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def segment_sum(
    values: NDArray[_Float],
    order: NDArray[np.int64],
    starts: NDArray[np.int64],
    seg_rows: NDArray[np.int64],
    seg_ids: NDArray[np.int64],
    src: NDArray[np.int64],
    scale: NDArray[_Float],
    scale_grad_by_freq: bool,
    out: NDArray[_Float],
    scatter: bool,
    n_threads: int,
) -> None: ...
def zero_fill(out: NDArray[np.float32] | NDArray[np.float64], n_threads: int) -> None: ...
