"""SparseAdam: torch's lazy Adam for sparse gradients."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _optim
from .._config import n_threads_for
from .._validation import check_real
from ..sparse import SparseGrad
from .optimizer import Group, Optimizer, _check_maximize, _option, _update_rows

__all__ = ["SparseAdam"]


class SparseAdam(Optimizer):
    """``torch.optim.SparseAdam``: lazy Adam on the rows present in each sparse gradient.

    Parameters
    ----------
    params : iterable of modules or of dicts
        Modules (``.weight``, ``.grad``), or param groups ``{"params": [...], "lr": ..., ...}``.
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    maximize : bool, default False

    Notes
    -----
    One step counter per parameter, advanced on every step that parameter has a gradient (also an
    empty one); only the rows in the gradient have their moments and weights updated (torch's
    semantics). Dense gradients are refused, as in torch.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> emb = cembed.Embedding(100, 8, sparse=True, seed=0)
    >>> opt = cembed.optim.SparseAdam(emb.parameters(), lr=0.01)
    >>> rows = emb(np.array([3, 7, 3]))
    >>> emb.backward(np.ones_like(rows)); opt.step(); opt.zero_grad()
    >>> opt.state[emb]["step"]
    1
    """

    _state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, maximize: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize))

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        _option(group, "lr", where, low=0.0, low_open=True)
        _option(group, "eps", where, low=0.0, low_open=True)
        betas = group.get("betas")
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{where}: betas must be a pair of numbers, got {betas!r}")
        group["betas"] = tuple(check_real(b, f"{where}: beta parameter at index {k}", low=0.0, high=1.0,
                                          high_open=True) for k, b in enumerate(betas))
        _check_maximize(group, where)
        return group

    def _check_grad(self, options: Group, grad: Any, weight: np.ndarray, where: str) -> None:
        super()._check_grad(options, grad, weight, where)
        if not isinstance(grad, SparseGrad):
            raise TypeError("SparseAdam does not support dense gradients, please consider Adam instead "
                            f"({where}.grad is a dense array; use sparse=True)")

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        if not state:
            return
        if set(state) != {"step", *self._state_arrays}:
            raise ValueError(f"{where}: SparseAdam state needs exactly 'step', 'exp_avg', 'exp_avg_sq', "
                             f"got {sorted(state)}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"{where}: SparseAdam state 'step' must be an int >= 0, got {step!r}")
        super()._check_state(state, weight, where)

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        if entry:
            if set(entry) != {"step", *self._state_arrays}:
                raise ValueError(f"{where} needs exactly 'step', 'exp_avg', 'exp_avg_sq', got {sorted(entry)}")
            step = entry["step"]
            if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) or step < 0:
                raise ValueError(f"{where}['step'] must be an int >= 0, got {step!r}")
            entry["step"] = int(step)
        return super()._load_state_entry(entry, weight, options, where)

    def _sparse_begin(self, state: Dict[str, Any], weight: np.ndarray, options: Group) -> float:
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros(weight.shape, dtype=weight.dtype)  # lazily zeroed pages
            state["exp_avg_sq"] = np.zeros(weight.shape, dtype=weight.dtype)
        state["step"] += 1  # also for an empty gradient, as torch
        beta1, beta2 = options["betas"]
        step = state["step"]
        return options["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)

    def _sparse_rows(self, state: Dict[str, Any], weight: np.ndarray, rows: np.ndarray, values: np.ndarray,
                     options: Group, prepared: float) -> None:
        beta1, beta2 = options["betas"]

        def kernel(w: np.ndarray, states: List[np.ndarray], kernel_rows: np.ndarray) -> None:
            _optim.sparse_adam_rows(w, states[0], states[1], kernel_rows, values, beta1, beta2, options["eps"],
                                    prepared, options["maximize"], n_threads_for(kernel_rows.size, "optimizer"))

        _update_rows(weight, [state["exp_avg"], state["exp_avg_sq"]], rows, kernel)
