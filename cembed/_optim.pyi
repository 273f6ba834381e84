"""Fused row-sparse optimizer steps (weight: any row stride, unit column stride; state C-contiguous)."""
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

_Float = TypeVar("_Float", np.float32, np.float64)

def update_rows(kind: int, weight: NDArray[_Float], state_a: NDArray[_Float], state_b: NDArray[_Float],
                row_state: NDArray[_Float], row_log: NDArray[np.float64], counts: NDArray[np.int64],
                rule_params: NDArray[np.float64], rows: NDArray[np.int64], grad: NDArray[_Float], p0: float, p1: float,
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
def adamw_decay_rows(
    weight: NDArray[_Float],
    row_decay_log: NDArray[np.float64],
    rows: NDArray[np.int64],
    decay_log: float,
    decay_log_prev: float,
    decay_last: float,
    n_threads: int,
) -> None: ...

def update_rows_half(kind: int, weight: NDArray[np.uint16], weight_fmt: int, state_a: NDArray[Any],
                     state_b: NDArray[Any], row_state: NDArray[Any], state_fmt: int, row_log: NDArray[np.float64],
                     counts: NDArray[np.int64], rule_params: NDArray[np.float64], rows: NDArray[np.int64],
                     grad: NDArray[np.float32], p0: float, p1: float, p2: float, p3: float, mode: int,
                     maximize: bool, stochastic: bool, seed: int, step: int, key_first: int, key_stride: int,
                     n_threads: int) -> None: ...

def sgd_momentum_rows_half(weight: NDArray[np.uint16], weight_fmt: int, buf: NDArray[Any], state_fmt: int,
                           rows: NDArray[np.int64], grad_slot: NDArray[np.int64], grad: NDArray[np.float32],
                           lr: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
                           first_step: bool, stochastic: bool, seed: int, step: int, key_first: int,
                           key_stride: int, n_threads: int) -> None: ...

def adamw_decay_rows_half(weight: NDArray[np.uint16], weight_fmt: int, row_decay_log: NDArray[np.float64],
                          rows: NDArray[np.int64], decay_log: float, decay_log_prev: float, decay_last: float,
                          stochastic: bool, seed: int, step: int, key_first: int, key_stride: int,
                          n_threads: int) -> None: ...

def round_rows(values: NDArray[np.float32], out: NDArray[np.uint16], fmt: int, stochastic: bool,
               key_rows: NDArray[np.int64], seed: int, step: int, stream: int, n_threads: int) -> None: ...

def fused_multiply_add_(out: NDArray[Any], x: NDArray[Any], y: NDArray[Any], alpha: float, n_threads: int) -> None: ...
