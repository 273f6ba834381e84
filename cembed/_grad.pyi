"""Gradient accumulation: the segment sum behind every embedding backward and `coalesce`."""
import enum
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def segment_sum(
    values: NDArray[_Float] | NDArray[np.uint16],
    values_fmt: int,
    order: NDArray[np.int64],
    starts: NDArray[np.int64],
    seg_rows: NDArray[np.int64],
    seg_ids: NDArray[np.int64],
    src: NDArray[np.int64],
    scale: NDArray[_Float] | NDArray[np.float32],
    scale_grad_by_freq: bool,
    out: NDArray[_Float] | NDArray[np.float32],
    scatter: bool,
    n_threads: int,
) -> None: ...
def permute_sources(order: NDArray[np.int64], src: NDArray[np.int64], scale: NDArray[_Float],
                    src_out: NDArray[np.int64], scale_out: NDArray[_Float], n_threads: int) -> None: ...
def zero_fill(out: NDArray[np.float32] | NDArray[np.float64], n_threads: int) -> None: ...

class UpdateKind(enum.IntEnum):
    UPDATE_SGD = 0
    UPDATE_ADAGRAD = 1
    UPDATE_ADAM = 2
    UPDATE_ROWWISE_ADAGRAD = 3
    UPDATE_ADAM_ROW_BIAS = 4
    UPDATE_ADAMW = 5

def segment_update(values: NDArray[_Float], order: NDArray[np.int64], starts: NDArray[np.int64],
                   seg_rows: NDArray[np.int64], seg_ids: NDArray[np.int64], src: NDArray[np.int64],
                   scale: NDArray[_Float], scale_grad_by_freq: bool, kind: int, weight: NDArray[_Float],
                   state_a: NDArray[_Float], state_b: NDArray[_Float], row_state: NDArray[_Float],
                   row_log: NDArray[np.float64], counts: NDArray[np.int64], rule_params: NDArray[np.float64],
                   p0: float, p1: float, p2: float, p3: float, mode: int, maximize: bool, n_threads: int) -> None: ...

def segment_update_half(values: NDArray[np.float32] | NDArray[np.uint16], values_fmt: int, order: NDArray[np.int64], starts: NDArray[np.int64],
                        seg_rows: NDArray[np.int64], seg_ids: NDArray[np.int64], src: NDArray[np.int64],
                        scale: NDArray[np.float32], scale_grad_by_freq: bool, kind: int, weight: NDArray[np.uint16],
                        weight_fmt: int, state_a: NDArray[np.float32] | NDArray[np.uint16],
                        state_b: NDArray[np.float32] | NDArray[np.uint16],
                        row_state: NDArray[np.float32] | NDArray[np.uint16], state_fmt: int,
                        row_log: NDArray[np.float64], counts: NDArray[np.int64], rule_params: NDArray[np.float64],
                        p0: float, p1: float,
                        p2: float, p3: float, mode: int, maximize: bool, stochastic: bool, seed: int, step: int,
                        key_first: int, key_stride: int, n_threads: int) -> None: ...
