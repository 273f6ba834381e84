"""Merging two coalesced row-sparse gradients (`SparseGrad.merge`, the momentum buffer's live rows)."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def merge_plan(
    a_rows: NDArray[np.int64],
    b_rows: NDArray[np.int64],
    out_rows: NDArray[np.int64],
    a_slot: NDArray[np.int64],
    b_slot: NDArray[np.int64],
) -> int: ...
def merge_values(
    a_values: NDArray[_Float],
    a_slot: NDArray[np.int64],
    b_values: NDArray[_Float],
    b_slot: NDArray[np.int64],
    out: NDArray[_Float],
    n_threads: int,
) -> None: ...
