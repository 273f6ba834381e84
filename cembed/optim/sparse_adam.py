"""SparseAdam: torch's lazy Adam for sparse gradients."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _grad, storage
from ..functional import RowRule
from .._validation import EXACT_INTEGER_TYPES, check_choice, check_exact_array, check_real, short_repr
from ._rounding import check_rounding_options
from .optimizer import STEP_MAX, Group, Optimizer, _check_maximize, _learning_rate, _option

__all__ = ["SparseAdam"]

#: The values of the ``bias_correction`` option (docs/behaviour.md §8.5).
BIAS_CORRECTIONS = ("global", "row")


def _check_betas(group: Dict[str, Any], where: str) -> Tuple[float, float]:
    """``betas``: a pair of reals in [0, 1) (torch's rule), normalised to a tuple of floats."""
    betas = group.get("betas")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair of numbers, got {betas!r}")
    group["betas"] = tuple(check_real(b, f"{where}: beta parameter at index {k}", low=0.0, high=1.0,
                                      high_open=True) for k, b in enumerate(betas))
    return group["betas"]


def _check_bias_correction(group: Dict[str, Any], where: str) -> str:
    """``bias_correction``: "global" (torch's rule; also for a group without the option) or "row"."""
    group["bias_correction"] = check_choice(group.get("bias_correction", "global"), f"{where}: bias_correction",
                                            BIAS_CORRECTIONS)
    return group["bias_correction"]


def _check_step(step: Any, where: str, *, advancing: bool = False) -> int:
    """A parameter's step counter as a Python int: an int in [0, 2**63 - 1] (NumPy integers accepted,
    bools refused). Exactly those types, not subclasses, whose operators would run code after the
    checks. ``advancing``: the step about to add one to it, which must stay within the bound (a
    counter is never wrapped nor grown past it: ``beta ** step`` needs it to fit a float)."""
    if type(step) not in EXACT_INTEGER_TYPES or not 0 <= step <= STEP_MAX:
        raise ValueError(f"{where} 'step' must be an int in [0, 2**63 - 1] (a Python int or a NumPy integer, not "
                         f"a subclass), got {short_repr(step)} of type {type(step).__name__}")
    if advancing and step == STEP_MAX:
        raise ValueError(f"{where} 'step' is 2**63 - 1, the largest step count: another step would pass it")
    return int(step)


def _check_step_advance(optimizer: Any, state: Dict[str, Any], where: str) -> None:
    """``_check_advance`` of SparseAdam and SparseAdamW: the step about to run must keep their step
    counter within its bound."""
    if state and "step" in state:
        _check_step(state["step"], f"{where}: {type(optimizer).__name__} state", advancing=True)


def _check_row_array(arr: Any, name: str, n_rows: int, dtype: Any, where: str) -> np.ndarray:
    """A per-row state vector (one entry per row of the weight): shape (n_rows,), ``dtype``, writeable,
    C-contiguous and aligned. O(1): the values are checked at load, never used as indices."""
    if isinstance(arr, np.ndarray):
        check_exact_array(arr, f"{where}: optimizer state {name!r}")
    if not isinstance(arr, np.ndarray) or arr.shape != (n_rows,) or arr.dtype != np.dtype(dtype):
        got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ValueError(f"{where}: optimizer state {name!r} is {got}, expected ({n_rows},) {np.dtype(dtype)} "
                         "(one entry per row of the weight; was the weight replaced? build a new optimizer for it)")
    if not (arr.flags.c_contiguous and arr.flags.writeable and arr.flags.aligned):
        raise ValueError(f"{where}: optimizer state {name!r} must be a writeable C-contiguous array")
    return arr


def _load_row_step(entry: Dict[str, Any], n_rows: int, where: str) -> None:
    """A saved ``row_step`` (per-row update counts): int64 (n_rows,); replaced by a private copy
    (its counts are checked by :func:`_check_row_steps`)."""
    arr = entry["row_step"]
    if not isinstance(arr, np.ndarray) or arr.shape != (n_rows,) or arr.dtype != np.int64:
        got = f"shape {arr.shape} and dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ValueError(f"{where}['row_step'] has {got}, expected ({n_rows},) int64")
    entry["row_step"] = storage.aligned_copy(arr)


def _check_row_steps(entry: Dict[str, Any], where: str) -> None:
    """Every per-row update count (``row_step``, when present) in [0, step]."""
    arr, step = entry.get("row_step"), entry["step"]
    if isinstance(arr, np.ndarray) and arr.size and (arr.min() < 0 or arr.max() > step):
        raise ValueError(f"{where}['row_step'] must hold counts in [0, step={step}], got values in "
                         f"[{arr.min()}, {arr.max()}]")


class SparseAdam(Optimizer):
    """``torch.optim.SparseAdam``: lazy Adam on the rows present in each sparse gradient.

    Parameters
    ----------
    params : iterable of modules or of dicts
        Modules (``.weight``, ``.grad``), or param groups ``{"params": [...], "lr": ..., ...}``.
    lr : float, default 1e-3
        > 0, as in torch; a group's ``lr`` (set in a param group, by hand or by a schedule such as
        ``CosineAnnealingLR`` down to ``eta_min=0``) may be 0, which moves no weight.
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    maximize : bool, default False
    state_dir : str or os.PathLike, optional
        Keep the per-row state arrays as ``.npy`` memmaps in this directory instead of in memory
        (``docs/storage.md``); the directory is locked by this optimizer.
    bias_correction : {"global", "row"}, default "global"
        ``"global"`` is torch's rule: every row is bias-corrected with the parameter's step counter.
        ``"row"`` (a cembed extension, docs/behaviour.md §8.5) uses each row's own update count
        instead (state ``row_step``, one int64 per row).
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
        dtype of ``exp_avg`` and ``exp_avg_sq`` of a 16-bit table (None: float32). float32/float64 tables keep their state
        in their own dtype (anything else is refused).

    Notes
    -----
    One step counter per parameter, advanced on every step that parameter has a gradient (also an
    empty one); only the rows in the gradient have their moments and weights updated (torch's
    semantics). Dense gradients are refused, as in torch.

    With ``"global"``, a row whose first gradient arrives at step 1000 is corrected with
    ``1 - beta**1000`` although its moments hold a single gradient: its first move is
    ``lr * sqrt(1 - beta2**1000) / (1 - beta1**1000) * (1 - beta1) / sqrt(1 - beta2)`` — here
    about 2.5 × lr. With ``"row"`` the row's own count (1) is used, and its first move is lr, as
    for every row at step 1 of plain Adam:

    >>> import numpy as np, cembed
    >>> from cembed import SparseGrad
    >>> def first_move_of_row_1(bias_correction):
    ...     emb = cembed.Embedding(2, 1, sparse=True)
    ...     emb.weight = np.zeros((2, 1))
    ...     opt = cembed.optim.SparseAdam([emb], lr=0.1, bias_correction=bias_correction)
    ...     for _ in range(999):                      # only row 0 has gradients
    ...         emb.grad = SparseGrad([0], np.ones((1, 1)), 2); opt.step()
    ...     emb.grad = SparseGrad([1], np.ones((1, 1)), 2); opt.step()
    ...     return round(float(-emb.weight[1, 0]), 4)
    >>> first_move_of_row_1("global"), first_move_of_row_1("row")
    (0.2515, 0.1)

    A row's count only advances on steps taken with ``"row"`` (the counts are created, at zero, at
    the first such step). When every row is in every gradient, both settings give the same bits.

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
    _optional_options = ("maximize", "bias_correction")
    _dense_alternative = "Adam"

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 maximize: bool = False, bias_correction: str = "global", rounding: str = "stochastic",
                 seed: int = 0, rounding_rows: Tuple[int, int] = (0, 1), state_dtype: Any = None,
                 state_dir: Any = None) -> None:
        # torch's rule: lr > 0 for the constructor's lr only; a group's or a schedule's lr may be 0
        _option({"lr": lr}, "lr", "defaults", low=0.0, low_open=True)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, maximize=maximize,
                                      bias_correction=bias_correction, rounding=rounding, seed=seed,
                                      rounding_rows=rounding_rows, state_dtype=state_dtype), state_dir=state_dir)

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        _learning_rate(group, where)
        _option(group, "eps", where, low=0.0, low_open=True)
        _check_betas(group, where)
        _check_maximize(group, where)
        _check_bias_correction(group, where)
        check_rounding_options(group, where)
        return group

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        if not state:
            return
        if set(state) - {"row_step"} != {"step", *self._state_arrays}:
            raise ValueError(f"{where}: SparseAdam state needs exactly 'step', 'exp_avg', 'exp_avg_sq' "
                             f"(and 'row_step' with bias_correction='row'), got {sorted(state)}")
        _check_step(state["step"], f"{where}: SparseAdam state")
        super()._check_state(state, weight, where)
        if "row_step" in state:
            _check_row_array(state["row_step"], "row_step", weight.shape[0], np.int64, where)

    _check_advance = _check_step_advance

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        if entry:
            if set(entry) - {"row_step"} != {"step", *self._state_arrays}:
                raise ValueError(f"{where} needs exactly 'step', 'exp_avg', 'exp_avg_sq' (and 'row_step' with "
                                 f"bias_correction='row'), got {sorted(entry)}")
            entry["step"] = _check_step(entry["step"], where)
            if "row_step" in entry:
                _load_row_step(entry, weight.shape[0], where)
        return super()._load_state_entry(entry, weight, options, where)

    _accumulators = ("exp_avg_sq",)

    def _check_values(self, entry: Dict[str, Any], where: str) -> None:
        super()._check_values(entry, where)
        _check_row_steps(entry, where)

    def _state_files_for_step(self, state: Dict[str, Any], weight: np.ndarray,
                              options: Group) -> List[Tuple[str, bool, Any]]:
        files: List[Tuple[str, bool, Any]] = []   # what _sparse_begin creates
        if "step" not in state:
            files += [("exp_avg", False, None), ("exp_avg_sq", False, None)]
        if options["bias_correction"] == "row" and "row_step" not in state:
            files.append(("row_step", True, np.int64))
        return files

    def _sparse_begin(self, state: Dict[str, Any], weight: np.ndarray, options: Group) -> float:
        if "step" not in state:
            state["step"] = 0
            self._new_state(state, "exp_avg", weight, options=options)
            self._new_state(state, "exp_avg_sq", weight, options=options)
        if options["bias_correction"] == "row" and "row_step" not in state:
            self._new_state(state, "row_step", weight, per_row=True, dtype=np.int64)
        state["step"] = int(state["step"]) + 1  # also for an empty gradient, as torch; checked < 2**63 - 1
        beta1, beta2 = options["betas"]
        step = state["step"]
        return options["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group, prepared: float) -> RowRule:
        beta1, beta2 = options["betas"]
        moments = (state["exp_avg"], state["exp_avg_sq"], None)
        if options["bias_correction"] == "row":   # the step size from each row's own count (_rows.pxd)
            return RowRule(_grad.UpdateKind.UPDATE_ADAM_ROW_BIAS, moments,
                           (1.0 - beta1, 1.0 - beta2, options["eps"], 0.0), 0, options["maximize"],
                           counts=state["row_step"], rule_params=(options["lr"], beta1, beta2, 0.0, 0.0, 0.0, 0.0, 0.0))
        return RowRule(_grad.UpdateKind.UPDATE_ADAM, moments, (1.0 - beta1, 1.0 - beta2, options["eps"], -prepared), 0,
                       options["maximize"])
