"""Scoring kernels for dot-product models: each query row against rows of a table, read in place."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)
_Index = NDArray[np.int32] | NDArray[np.int64]

def dot_scores(query: NDArray[_Float], weight: NDArray[_Float], indices: _Index, out: NDArray[_Float],
               n_threads: int) -> None: ...
def dot_scores_backward(grad_scores: NDArray[_Float], weight: NDArray[_Float], indices: _Index,
                        out: NDArray[_Float], n_threads: int) -> None: ...
def logistic_scores(query: NDArray[_Float], weight: NDArray[_Float], indices: _Index, n_positive: int, want_loss: bool,
                    loss: NDArray[_Float], grad_scores: NDArray[_Float], grad_query: NDArray[_Float],
                    n_threads: int) -> None: ...
