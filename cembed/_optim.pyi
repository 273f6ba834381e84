"""Fused row-sparse optimizer steps (weight: any row stride, unit column stride; state C-contiguous)."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def sparse_adam_rows(
    weight: NDArray[_Float],
    exp_avg: NDArray[_Float],
    exp_avg_sq: NDArray[_Float],
    rows: NDArray[np.int64],
    grad: NDArray[_Float],
    beta1: float,
    beta2: float,
    eps: float,
    step_size: float,
    maximize: bool,
    n_threads: int,
) -> None: ...
def adagrad_rows(
    weight: NDArray[_Float],
    state_sum: NDArray[_Float],
    rows: NDArray[np.int64],
    grad: NDArray[_Float],
    clr: float,
    eps: float,
    maximize: bool,
    n_threads: int,
) -> None: ...
def sgd_rows(
    weight: NDArray[_Float], rows: NDArray[np.int64], grad: NDArray[_Float], lr: float, maximize: bool, n_threads: int
) -> None: ...
def sgd_momentum_rows(
    weight: NDArray[_Float],
    buf: NDArray[_Float],
    rows: NDArray[np.int64],
    grad_slot: NDArray[np.int64],
    grad: NDArray[_Float],
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool,
    n_threads: int,
) -> None: ...
def rowwise_adagrad_rows(weight: NDArray[_Float], state_sum: NDArray[_Float], rows: NDArray[np.int64],
                         grad: NDArray[_Float], lr: float, eps: float, weight_decay: float, weight_decay_mode: int,
                         maximize: bool, n_threads: int) -> None: ...

# SparseAdamW and per-row bias correction (docs/behaviour.md §8.5)
def sparse_adam_row_bias_rows(
    weight: NDArray[_Float],
    exp_avg: NDArray[_Float],
    exp_avg_sq: NDArray[_Float],
    row_step: NDArray[np.int64],
    rows: NDArray[np.int64],
    grad: NDArray[_Float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    maximize: bool,
    n_threads: int,
) -> None: ...
def sparse_adamw_rows(
    weight: NDArray[_Float],
    exp_avg: NDArray[_Float],
    exp_avg_sq: NDArray[_Float],
    row_decay_log: NDArray[np.float64],
    row_step: NDArray[np.int64],
    rows: NDArray[np.int64],
    grad: NDArray[_Float],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    decay_log: float,
    decay_log_prev: float,
    decay_last: float,
    step_size: float,
    bc2_sqrt: float,
    maximize: bool,
    n_threads: int,
) -> None: ...
def adamw_decay_rows(
    weight: NDArray[_Float],
    row_decay_log: NDArray[np.float64],
    rows: NDArray[np.int64],
    decay_log: float,
    decay_log_prev: float,
    decay_last: float,
    n_threads: int,
) -> None: ...
