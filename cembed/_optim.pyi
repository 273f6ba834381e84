"""Fused row-sparse optimizer steps (weight: any row stride, unit column stride; state C-contiguous)."""
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def update_rows(kind: int, weight: NDArray[_Float], state_a: NDArray[_Float], state_b: NDArray[_Float],
                row_state: NDArray[_Float], rows: NDArray[np.int64], grad: NDArray[_Float], p0: float, p1: float,
                p2: float, p3: float, mode: int, maximize: bool, n_threads: int) -> None: ...

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

def round_rows(values: NDArray[np.float32], out: NDArray[np.uint16], fmt: int, stochastic: bool,
               key_rows: NDArray[np.int64], seed: int, step: int, stream: int, n_threads: int) -> None: ...
