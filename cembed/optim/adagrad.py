"""Adagrad, with torch's sparse and dense rules."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _grad
from ..functional import RowRule
from ..sparse import SparseGrad
from ._rounding import check_rounding_options
from .._validation import EXACT_INTEGER_TYPES, short_repr
from .optimizer import STEP_MAX, Group, Optimizer, _check_maximize, _learning_rate, _option, add_product_, add_scaled_

__all__ = ["Adagrad"]


class Adagrad(Optimizer):
    """``torch.optim.Adagrad``: ``sum += g*g``; ``w -= clr * g / (sqrt(sum) + eps)`` with
    ``clr = lr / (1 + (step - 1) * lr_decay)``.

    Parameters
    ----------
    params : iterable of modules or of dicts
    lr : float, default 1e-2
    lr_decay, weight_decay, initial_accumulator_value : float, default 0
        ``weight_decay`` needs dense gradients (as in torch).
    eps : float, default 1e-10
    maximize : bool, default False
    rounding : {"stochastic", "nearest"}, default "stochastic"
        How float32 results are stored into a 16-bit (float16 / bfloat16) table and its 16-bit
        state: once per element, stochastically (reproducible: docs/behaviour.md §8.7) or to nearest.
        Validated but unused for float32/float64 tables.
    seed : int, default 0
        Seed of stochastic rounding's counter-based generator, in [0, 2**64).
    rounding_rows : (int, int), default (0, 1)
        ``(first, stride)``: table row ``r`` draws its rounding bits as row ``first + stride * r`` of a
        larger table would — set it on a table holding every ``stride``-th row of that table from row
        ``first`` (a row shard), so the shards round exactly as the whole table does.
    state_dtype : {None, "float32", "bfloat16", "float16"}, default None
        dtype of the accumulator ``sum`` of a 16-bit table (None: float32). float32/float64 tables keep their state
        in their own dtype (anything else is refused).
    state_dir : str or os.PathLike, optional
        Keep the per-row state arrays as ``.npy`` memmaps in this directory instead of in memory
        (``docs/storage.md``); the directory is locked by this optimizer.

    Notes
    -----
    A float32 step counter per parameter; the accumulator is created when the parameter joins (its
    pages are only touched where rows are updated).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> emb = cembed.Embedding(100, 8, sparse=True, seed=0)
    >>> opt = cembed.optim.Adagrad([{"params": [emb], "lr": 0.5}], lr=0.1)
    >>> emb.backward(np.ones((2, 8), np.float32), np.array([1, 2])); opt.step()
    >>> opt.param_groups[0]["lr"], float(opt.state[emb]["step"])
    (0.5, 1.0)
    """

    _state_arrays = ("sum",)

    def __init__(self, params: Any, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10, maximize: bool = False,
                 rounding: str = "stochastic", seed: int = 0, rounding_rows: Tuple[int, int] = (0, 1),
                 state_dtype: Any = None, state_dir: Any = None) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize, rounding=rounding, seed=seed, rounding_rows=rounding_rows,
                                      state_dtype=state_dtype), state_dir=state_dir)

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        _learning_rate(group, where)
        for name in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            _option(group, name, where, low=0.0)
        _check_maximize(group, where)
        check_rounding_options(group, where)
        return group

    _state_at_join = True

    _initial_fill_option = "initial_accumulator_value"

    def _init_state(self, module: Any, group: Group) -> None:
        state: Dict[str, Any] = {"step": np.float32(0.0)}
        self._new_state(state, "sum", module.weight, fill=group["initial_accumulator_value"], options=group)
        self.state[module] = state

    def _fill_missing_state(self, state: Dict[Any, Dict[str, Any]], groups: List[Group]) -> None:
        for group in groups:
            for module in group["params"]:
                if not state.get(module):
                    raise ValueError("Adagrad state_dict lacks the state of a parameter (it needs 'step' and 'sum')")

    def _check_grad(self, options: Group, grad: Any, weight: np.ndarray, where: str) -> None:
        super()._check_grad(options, grad, weight, where)
        if isinstance(grad, SparseGrad) and options["weight_decay"] != 0:
            raise ValueError(f"weight_decay option is not compatible with sparse gradients ({where}.grad is a "
                             "SparseGrad)")

    @staticmethod
    def _check_step(step: Any, where: str) -> np.float32:
        """The step counter as torch keeps it, a float32 in [0, 2**63 - 1] (the bound of every step
        counter; float32 stops counting at 2**24, as torch's does)."""
        if type(step) not in (float, np.float32, np.float64) + EXACT_INTEGER_TYPES:   # no subclasses (_check_step of SparseAdam)
            raise ValueError(f"{where}['step'] must be a number, got {type(step).__name__}")
        if type(step) in EXACT_INTEGER_TYPES and not 0 <= step <= STEP_MAX:   # 10**400 does not fit a float
            raise ValueError(f"{where}['step'] must be in [0, 2**63 - 1], got {short_repr(step)}")
        with np.errstate(over="ignore"):
            value = np.float32(step)
        if not (np.isfinite(value) and 0 <= float(value) <= STEP_MAX):
            raise ValueError(f"{where}['step'] must be finite and in [0, 2**63 - 1], got {step!r}")
        return value

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        if set(state) != {"step", "sum"}:
            raise ValueError(f"{where}: Adagrad state needs exactly 'step' and 'sum', got {sorted(state)}")
        self._check_step(state["step"], f"{where} state")
        super()._check_state(state, weight, where)

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        if set(entry) != {"step", "sum"}:
            raise ValueError(f"{where} needs exactly 'step' and 'sum', got {sorted(entry)}")
        entry["step"] = self._check_step(entry["step"], where)
        return super()._load_state_entry(entry, weight, options, where)

    _accumulators = ("sum",)

    def _sparse_begin(self, state: Dict[str, Any], weight: np.ndarray, options: Group) -> float:
        state["step"] = np.float32(np.float32(state["step"]) + np.float32(1.0))
        return options["lr"] / (1 + (float(state["step"]) - 1) * options["lr_decay"])

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group, prepared: float) -> RowRule:
        return RowRule(_grad.UpdateKind.UPDATE_ADAGRAD, (state["sum"], None, None),
                       (-prepared, options["eps"], 0.0, 0.0), 0, options["maximize"])

    def _dense_update(self, state: Dict[str, Any], weight: np.ndarray, grad: np.ndarray, options: Group) -> None:
        """torch's single-tensor Adagrad, operation for operation: ``grad.add(w, alpha=wd)`` and
        ``sum.addcmul_(g, g)`` fused multiply-adds as torch's CPU kernels compute them, then
        ``w.addcdiv_(g, std, value=-clr)`` as ``w + (-clr · g) / std``. Bitwise torch's but for its
        square roots, which are not correctly rounded where NumPy's are (docs/behaviour.md §9)."""
        clr = self._sparse_begin(state, weight, options)
        dtype = weight.dtype.type
        g = -grad if options["maximize"] else grad   # (a new array, or the caller's: never written)
        if options["weight_decay"] != 0:
            g = add_scaled_(np.array(g, order="C"), weight, options["weight_decay"])
        state_sum = state["sum"]
        add_product_(state_sum, g, g)
        std = np.sqrt(state_sum)
        std += dtype(options["eps"])
        weight += (dtype(-clr) * g) / std
