"""SparseAdamW: lazy AdamW for sparse gradients, with weight decay that is exact for skipped rows."""
from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _grad, _optim, storage
from .._config import n_threads_for
from ..functional import RowRule
from .._validation import EXACT_REAL_TYPES, check_real
from ._rounding import STREAM_DECAY, RoundingArgs, check_rounding_options
from .optimizer import Group, Optimizer, _check_maximize, _core, _learning_rate, _option, _snapshot, _update_rows
from .sparse_adam import (_check_betas, _check_bias_correction, _check_row_array, _check_row_steps, _check_step,
                          _check_step_advance, _load_row_step)

__all__ = ["SparseAdamW"]

_SCALARS = ("decay_log", "decay_log_prev", "decay_last")
_REQUIRED = frozenset({"step", "exp_avg", "exp_avg_sq", "row_decay_log", *_SCALARS})


class SparseAdamW(Optimizer):
    """AdamW (decoupled weight decay) for sparse gradients: SparseAdam's lazy rows, torch AdamW's
    update, and weight decay that is exact for rows that skip steps.

    Parameters
    ----------
    params : iterable of modules or of dicts
        Modules (``.weight``, ``.grad``), or param groups ``{"params": [...], "lr": ..., ...}``.
    lr : float, default 1e-3
        ``>= 0``; a scheduler may change it at every step (the decay stays exact).
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
        ``>= 0``, with ``lr * weight_decay < 1`` (a decay factor ``1 - lr * weight_decay <= 0`` would
        flip or zero the weights; it is refused, with ``ValueError``, at construction and at
        ``step()``).
    maximize : bool, default False
    state_dir : str or os.PathLike, optional
        Keep the per-row state arrays as ``.npy`` memmaps in this directory instead of in memory
        (``docs/storage.md``); the directory is locked by this optimizer.
        Negates the gradient; the weight decay still shrinks the weights (as torch's AdamW).
    bias_correction : {"global", "row"}, default "global"
        ``"global"``: torch's rule, the parameter's step counter. ``"row"``: each row's own update
        count (state ``row_step``; docs/behaviour.md §8.5 and :class:`SparseAdam`).
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
    A step of a parameter is a ``step()`` (or a fused ``backward(..., optimizer=opt)``) in which it
    has a gradient — also an empty one. It advances the parameter's step counter and its decay
    clock. A parameter whose ``.grad`` is ``None`` is skipped entirely, as torch's AdamW skips it (no
    step, no decay); assign an empty ``SparseGrad`` to have it decay without moving.

    At its ``t``-th step every row of the parameter is decayed by ``1 - lr_t * weight_decay``, as in
    torch's AdamW, but lazily: a row in the gradient that was last updated at step ``s`` is first
    multiplied by ``prod_{u=s+1..t} (1 - lr_u * weight_decay)``, then updated with torch's AdamW
    formula on its moments. The product is ``exp(L_t - L_s)`` with the float64 running sum
    ``L_t = sum_{u<=t} log1p(-lr_u * weight_decay)`` (state ``decay_log``) and the ``L_s`` each row
    stores (``row_decay_log``); a row updated at the previous step gets ``1 - lr_t * weight_decay``
    itself, so when every row is in every gradient the result is torch's ``AdamW`` on the dense
    gradient. Rows not in the gradient keep their moments (lazy Adam, as :class:`SparseAdam`).

    :meth:`apply_pending_decay` brings every row's decay up to date (for evaluation or export).
    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (like the weight),
    ``decay_log``, ``decay_log_prev`` (``L_{t-1}``), ``decay_last`` (``1 - lr_t * weight_decay``),
    ``row_decay_log`` (float64, one per row) and, with ``"row"``, ``row_step`` (int64, one per row);
    it is all in ``state_dict()`` / ``save()``, so a resumed run continues bitwise.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> from cembed import SparseGrad
    >>> emb = cembed.Embedding(4, 2, sparse=True)
    >>> emb.weight = np.ones((4, 2))
    >>> opt = cembed.optim.SparseAdamW([emb], lr=0.1, weight_decay=0.5)
    >>> for _ in range(3):                      # row 0 only: rows 1..3 owe 3 steps of decay
    ...     emb.grad = SparseGrad([0], np.zeros((1, 2)), 4); opt.step()
    >>> emb.weight[1].tolist()
    [1.0, 1.0]
    >>> opt.apply_pending_decay()
    >>> round(float(emb.weight[1, 0]), 6) == round(0.95 ** 3, 6)
    True
    """

    _state_arrays = ("exp_avg", "exp_avg_sq")
    _optional_options = ("maximize", "bias_correction")
    _dense_alternative = "torch's AdamW"

    def __init__(self, params: Any, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, maximize: bool = False, bias_correction: str = "global",
                 rounding: str = "stochastic", seed: int = 0, rounding_rows: Tuple[int, int] = (0, 1),
                 state_dtype: Any = None, state_dir: Any = None) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, maximize=maximize,
                                      bias_correction=bias_correction, rounding=rounding, seed=seed,
                                      rounding_rows=rounding_rows, state_dtype=state_dtype), state_dir=state_dir)

    # ------------------------------------------------------------------ checks
    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        lr = _learning_rate(group, where)
        _option(group, "eps", where, low=0.0)
        wd = _option(group, "weight_decay", where, low=0.0)
        if not lr * wd < 1.0:
            raise ValueError(f"{where}: lr * weight_decay must be < 1 (the decay factor 1 - lr * weight_decay "
                             f"must stay positive), got lr={lr}, weight_decay={wd}")
        _check_betas(group, where)
        _check_maximize(group, where)
        _check_bias_correction(group, where)
        check_rounding_options(group, where)
        return group

    @staticmethod
    def _check_scalars(state: Dict[str, Any], where: str, *, normalise: bool = False) -> None:
        """The decay clock: L_t <= L_{t-1} <= 0, finite; the last factor in (0, 1]. Only a state being
        loaded (a private copy) is normalised to floats: a check before a step changes nothing, so
        ``step()`` and the fused backward accept the same states and a refused call leaves them as
        they were."""
        for name in _SCALARS:   # (exactly a real type: a subclass's __float__ would run inside the update)
            if type(state[name]) not in EXACT_REAL_TYPES:
                raise ValueError(f"{where} {name!r} must be a Python or NumPy float or int (not a subclass), "
                                 f"got {type(state[name]).__name__}")
        values = {name: check_real(state[name], f"{where} {name!r}") for name in _SCALARS}
        if not values["decay_log"] <= values["decay_log_prev"] <= 0.0:
            raise ValueError(f"{where}: 'decay_log' <= 'decay_log_prev' <= 0 is required, got "
                             f"{state['decay_log']!r}, {state['decay_log_prev']!r}")
        if not 0.0 < values["decay_last"] <= 1.0:
            raise ValueError(f"{where} 'decay_last' must be in (0, 1], got {state['decay_last']!r}")
        if normalise:
            state.update(values)

    def _check_keys(self, state: Dict[str, Any], where: str) -> None:
        if set(state) - {"row_step"} != _REQUIRED:
            raise ValueError(f"{where}: SparseAdamW state needs exactly {sorted(_REQUIRED)} (and 'row_step' with "
                             f"bias_correction='row'), got {sorted(state)}")

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        """Structure and scalars, O(1) per parameter: every array's shape, dtype and layout against the
        weight as it is now, the step counter and the decay clock. The per-row values are checked at
        load; the kernels never use them as indices."""
        if not state:
            return
        self._check_keys(state, where)
        _check_step(state["step"], f"{where}: SparseAdamW state")
        self._check_scalars(state, f"{where}: SparseAdamW state")
        super()._check_state(state, weight, where)
        _check_row_array(state["row_decay_log"], "row_decay_log", weight.shape[0], np.float64, where)
        if "row_step" in state:
            _check_row_array(state["row_step"], "row_step", weight.shape[0], np.int64, where)

    _check_advance = _check_step_advance

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        if not entry:
            return entry
        self._check_keys(entry, where)
        entry["step"] = _check_step(entry["step"], where)
        self._check_scalars(entry, where, normalise=True)
        n_rows = weight.shape[0]
        logs = entry["row_decay_log"]
        if not isinstance(logs, np.ndarray) or logs.shape != (n_rows,) or logs.dtype != np.float64:
            got = f"shape {logs.shape} and dtype {logs.dtype}" if isinstance(logs, np.ndarray) else type(logs).__name__
            raise ValueError(f"{where}['row_decay_log'] has {got}, expected ({n_rows},) float64")
        if "row_step" in entry:
            _load_row_step(entry, n_rows, where)
        entry = super()._load_state_entry(entry, weight, options, where)  # exp_avg, exp_avg_sq: checked, copied
        entry["row_decay_log"] = storage.aligned_copy(logs)
        return entry

    _accumulators = ("exp_avg_sq",)

    def _check_values(self, entry: Dict[str, Any], where: str) -> None:
        super()._check_values(entry, where)
        logs = entry["row_decay_log"]
        if logs.size and not (np.isfinite(logs).all() and logs.min() >= entry["decay_log"] and logs.max() <= 0.0):
            raise ValueError(f"{where}['row_decay_log'] must be finite, in [decay_log={entry['decay_log']!r}, 0]")
        _check_row_steps(entry, where)

    # ------------------------------------------------------------------ updates
    def _state_files_for_step(self, state: Dict[str, Any], weight: np.ndarray,
                              options: Group) -> List[Tuple[str, bool, Any]]:
        files: List[Tuple[str, bool, Any]] = []   # what _sparse_begin creates
        if "step" not in state:
            files += [("exp_avg", False, None), ("exp_avg_sq", False, None), ("row_decay_log", True, np.float64)]
        if options["bias_correction"] == "row" and "row_step" not in state:
            files.append(("row_step", True, np.int64))
        return files

    def _sparse_begin(self, state: Dict[str, Any], weight: np.ndarray, options: Group) -> Tuple[float, float]:
        if "step" not in state:
            state.update(step=0, decay_log=0.0, decay_log_prev=0.0, decay_last=1.0)
            self._new_state(state, "exp_avg", weight, options=options)
            self._new_state(state, "exp_avg_sq", weight, options=options)
            self._new_state(state, "row_decay_log", weight, per_row=True, dtype=np.float64)
        if options["bias_correction"] == "row" and "row_step" not in state:
            self._new_state(state, "row_step", weight, per_row=True, dtype=np.int64)
        state["step"] = int(state["step"]) + 1  # also for an empty gradient, as torch; checked < 2**63 - 1
        decay = options["lr"] * options["weight_decay"]
        decay_log = float(state["decay_log"])   # (checked real; a float32 or int set by hand is widened here)
        state["decay_log_prev"] = decay_log
        state["decay_log"] = decay_log + math.log1p(-decay)
        state["decay_last"] = 1.0 - decay
        beta1, beta2 = options["betas"]
        step = state["step"]
        return options["lr"] / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5  # torch's order

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group,
                  prepared: Tuple[float, float]) -> RowRule:
        beta1, beta2 = options["betas"]
        step_size, bc2_sqrt = prepared
        decay_log, decay_log_prev, decay_last = (state[name] for name in _SCALARS)
        return RowRule(_grad.UpdateKind.UPDATE_ADAMW, (state["exp_avg"], state["exp_avg_sq"], None),
                       (1.0 - beta1, 1.0 - beta2, options["eps"], beta2), 0, options["maximize"],
                       row_log=state["row_decay_log"],
                       counts=state["row_step"] if options["bias_correction"] == "row" else None,
                       rule_params=(options["lr"], beta1, beta2, decay_log, decay_log_prev, decay_last, step_size,
                                    bc2_sqrt))

    # ------------------------------------------------------------------ pending decay
    def apply_pending_decay(self) -> None:
        """Bring every row of every parameter up to date with its pending weight decay.

        An explicit O(rows) pass, for evaluation or export: afterwards each weight is what torch's
        AdamW would hold for its decay so far. Steps before and after it give the same results as
        without it, up to rounding (the pending factor is applied in two parts); the moments are not
        touched.

        Raises
        ------
        ValueError
            A state that does not fit its parameter's current weight (checked for every parameter
            before any is changed).

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(3, 2, sparse=True)
        >>> emb.weight = np.ones((3, 2))
        >>> opt = cembed.optim.SparseAdamW([emb], lr=0.1, weight_decay=0.1)
        >>> emb.grad = cembed.SparseGrad([], np.zeros((0, 2)), 3); opt.step()   # no row moves yet
        >>> opt.apply_pending_decay(); emb.weight[:, 0].tolist()
        [0.99, 0.99, 0.99]
        """
        self._check_params()
        plan = []   # checked as step() checks: the options first, the arrays confirmed before the decay
        for g, options, params in self._group_options():
            for k, module in enumerate(params):
                where = f"param_groups[{g}]['params'][{k}]"
                state = self.state.get(module) or {}
                if not _core(state):
                    continue
                weight = self._check_weight(module, where)
                self._check_state_for(state, weight, options, where)
                plan.append((module, weight, state, options, where, _snapshot(self, module, weight, module.grad)))
        self._confirm_checked([(module, where, snapshot) for module, _, _, _, where, snapshot in plan])
        for _, weight, state, options, _, _ in plan:
            decay_log, decay_log_prev, decay_last = (state[name] for name in _SCALARS)
            row_log = state["row_decay_log"]   # (read once: the rows are picked from the array the kernel gets)
            rows = np.flatnonzero(row_log != decay_log).astype(np.int64)

            def kernel(w: np.ndarray, states: List[np.ndarray], kernel_rows: np.ndarray) -> None:
                _optim.adamw_decay_rows(w, states[0], kernel_rows, decay_log, decay_log_prev, decay_last,
                                        n_threads_for(kernel_rows.size, "optimizer"))

            def half_kernel(bits: np.ndarray, weight_fmt: int, rounding_args: RoundingArgs) -> None:
                _optim.adamw_decay_rows_half(bits, weight_fmt, row_log, rows, decay_log, decay_log_prev,
                                             decay_last, *rounding_args, n_threads_for(rows.size, "optimizer"))

            # a 16-bit weight is rounded on its own stream, keyed by the parameter's last update step
            _update_rows(weight, [row_log], rows, kernel, self._rounding_for(state, weight, options),
                         STREAM_DECAY, half_kernel=half_kernel)
