"""Scoring kernels for dot-product models: each query row against rows of a table, read in place."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)
_Index = NDArray[np.int32] | NDArray[np.int64]
_Table = NDArray[np.float32] | NDArray[np.float64] | NDArray[np.uint16]   # 16-bit tables as bit patterns

def dot_scores(query: NDArray[_Float], weight: _Table, fmt: int, indices: _Index, out: NDArray[_Float],
               n_threads: int) -> None: ...
def dot_scores_backward(grad_scores: NDArray[_Float], weight: _Table, fmt: int, indices: _Index,
                        out: NDArray[_Float], n_threads: int) -> None: ...
def logistic_scores(query: NDArray[_Float], weight: _Table, fmt: int, indices: _Index, n_positive: int,
                    want_loss: bool, loss: NDArray[_Float], grad_scores: NDArray[_Float], grad_query: NDArray[_Float],
                    n_threads: int) -> None: ...
def logistic_scores_update(query: NDArray[_Float], weight: NDArray[_Float], n_per: int, order: NDArray[np.int64],
                           starts: NDArray[np.int64], seg_rows: NDArray[np.int64], skip_segment: int,
                           scale_grad_by_freq: bool, n_positive: int, want_loss: bool, kind: int,
                           state_a: NDArray[_Float], state_b: NDArray[_Float], row_state: NDArray[_Float],
                           row_log: NDArray[np.float64], counts: NDArray[np.int64], rule_params: NDArray[np.float64],
                           p0: float, p1: float, p2: float, p3: float, mode: int, maximize: bool,
                           old_rows: NDArray[_Float], entry_slot: NDArray[np.int64], terms: NDArray[_Float],
                           loss: NDArray[_Float], grad_scores: NDArray[_Float], grad_query: NDArray[_Float],
                           n_threads: int) -> None: ...
