"""EmbeddingBag kernels: pooled lookup and the non-segment-sum parts of its backward."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)
_Index = NDArray[np.int32] | NDArray[np.int64]

def bag_forward(
    weight: NDArray[_Float],
    indices: _Index,
    offsets: NDArray[np.int64],
    mode: int,
    padding_idx: int,
    psw: NDArray[_Float],
    psw_fused: bool,
    out: NDArray[_Float],
    argmax: NDArray[np.int64],
    n_threads: int,
) -> None: ...
def max_backward(
    grad_output: NDArray[_Float], argmax: NDArray[np.int64], grad_weight: NDArray[_Float], n_threads: int
) -> None: ...
def psw_backward(
    weight: NDArray[_Float],
    indices: _Index,
    bag_of: NDArray[np.int64],
    grad_output: NDArray[_Float],
    padding_idx: int,
    grad_psw: NDArray[_Float],
    n_threads: int,
) -> None: ...
def bag_forward_half(
    weight: NDArray[np.uint16],
    fmt: int,
    indices: _Index,
    offsets: NDArray[np.int64],
    mode: int,
    padding_idx: int,
    psw: NDArray[np.float32],
    psw_fused: bool,
    out: NDArray[np.float32],
    argmax: NDArray[np.int64],
    n_threads: int,
) -> None: ...
def psw_backward_half(
    weight: NDArray[np.uint16],
    fmt: int,
    indices: _Index,
    bag_of: NDArray[np.int64],
    grad_output: NDArray[np.float32],
    padding_idx: int,
    grad_psw: NDArray[np.float32],
    n_threads: int,
) -> None: ...
