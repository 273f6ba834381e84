"""SGD with momentum, dampening, Nesterov, weight decay; torch's dense-equivalent sparse momentum."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _grad, _optim
from .._config import n_threads_for
from ..functional import RowRule
from .._validation import check_bool, check_row_ids
from ..sparse import SparseGrad, merge_plan
from ._rounding import RoundingArgs, check_rounding_options, fused_state_views
from .optimizer import Group, Optimizer, _check_maximize, _learning_rate, _option, _update_rows, add_scaled_

__all__ = ["SGD"]


class SGD(Optimizer):
    """``torch.optim.SGD``, with momentum, dampening, Nesterov, weight decay and maximize.

    Parameters
    ----------
    params : iterable of modules or of dicts
    lr : float, default 1e-3
    momentum, dampening, weight_decay : float, default 0
        ``weight_decay`` needs dense gradients.
    nesterov : bool, default False
        The constructor's values need ``momentum > 0`` and ``dampening == 0``; a param group may
        override them, as in torch (docs/behaviour.md §0).
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
        dtype of the momentum buffer of a 16-bit table (None: float32). float32/float64 tables keep their state
        in their own dtype (anything else is refused).
    state_dir : str or os.PathLike, optional
        Keep the per-row state arrays as ``.npy`` memmaps in this directory instead of in memory
        (``docs/storage.md``); the directory is locked by this optimizer.

    Notes
    -----
    With sparse gradients the momentum buffer has torch's dense-equivalent semantics (rows keep
    moving after they stop appearing); cembed keeps it as a dense buffer plus the ascending list of
    rows whose buffer is live (``state["active_rows"]``, ``None`` for all rows), and updates only
    those rows.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> emb = cembed.Embedding(4, 2, sparse=True, _weight=np.zeros((4, 2), np.float32))
    >>> opt = cembed.optim.SGD(emb.parameters(), lr=1.0, momentum=0.5)
    >>> emb.backward(np.ones((1, 2), np.float32), np.array([1])); opt.step(); opt.zero_grad()
    >>> emb.weight[1]
    array([-1., -1.], dtype=float32)
    >>> opt.step(); emb.weight[1]     # no gradient: nothing moves without one (torch skips the param)
    array([-1., -1.], dtype=float32)
    """

    _state_arrays = ("momentum_buffer",)
    _optional_options = ("maximize", "nesterov")

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, maximize: bool = False,
                 rounding: str = "stochastic", seed: int = 0, rounding_rows: Tuple[int, int] = (0, 1),
                 state_dtype: Any = None, state_dir: Any = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, rounding=rounding, seed=seed,
                                      rounding_rows=rounding_rows, state_dtype=state_dtype), state_dir=state_dir)

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        _learning_rate(group, where)
        _option(group, "momentum", where, low=0.0)
        _option(group, "dampening", where)
        _option(group, "weight_decay", where, low=0.0)
        group["nesterov"] = check_bool(group.get("nesterov", False), f"{where} nesterov")
        _check_maximize(group, where)
        check_rounding_options(group, where)
        # (torch checks this rule on the constructor's defaults only: a group may set momentum 0 — plain SGD,
        # nesterov ignored — or a dampening under nesterov defaults, and trains as the formulas say)
        if where == "defaults" and group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        return group

    def _check_grad(self, options: Group, grad: Any, weight: np.ndarray, where: str) -> None:
        super()._check_grad(options, grad, weight, where)
        if isinstance(grad, SparseGrad) and options["weight_decay"] != 0:
            raise ValueError(f"weight_decay is not supported with sparse gradients ({where}.grad is a SparseGrad)")

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        if not state:
            return
        if set(state) - {"momentum_buffer", "active_rows"}:
            raise ValueError(f"{where}: SGD state has unknown entries {sorted(set(state) - {'momentum_buffer', 'active_rows'})}")
        super()._check_state(state, weight, where)
        if state.get("momentum_buffer") is None:
            raise ValueError(f"{where}: SGD state has live rows but no 'momentum_buffer'")
        if state.get("active_rows") is not None:
            check_row_ids(state["active_rows"], weight.shape[0], f"{where}: SGD state 'active_rows'")

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        entry = super()._load_state_entry(entry, weight, options, where)
        if not entry:
            return entry
        if set(entry) - {"momentum_buffer", "active_rows"}:
            raise ValueError(f"{where} has unknown entries {sorted(set(entry) - {'momentum_buffer', 'active_rows'})}")
        if entry.get("momentum_buffer") is None:
            raise ValueError(f"{where} needs a 'momentum_buffer'")
        rows = entry.get("active_rows")
        if rows is not None:
            rows = np.asarray(rows)
            if rows.size == 0 and rows.ndim == 1:   # (an empty list is float64 to NumPy: no live row)
                rows = rows.astype(np.int64)
            if rows.dtype.kind not in "iu" or rows.ndim != 1:
                raise ValueError(f"{where}['active_rows'] must be a 1-D integer array")
            if rows.dtype.kind == "u" and rows.size and rows.max() > np.iinfo(np.int64).max:
                raise ValueError(f"{where}['active_rows'] holds a row id >= 2**63")
            rows = np.array(rows, dtype=np.int64, copy=True)
            try:
                check_row_ids(rows, weight.shape[0], f"{where}['active_rows']")
            except IndexError as exc:
                raise ValueError(str(exc)) from None
            rows.flags.writeable = False   # (as a step leaves its live rows)
            entry["active_rows"] = rows
        else:
            entry["active_rows"] = None
        return entry

    def _rows_independent(self, options: Group) -> bool:
        return options["momentum"] == 0

    def _state_files_for_step(self, state: Dict[str, Any], weight: np.ndarray,
                              options: Group) -> List[Tuple[str, bool, Any]]:
        if options["momentum"] != 0 and state.get("momentum_buffer") is None:
            return [("momentum_buffer", False, None)]
        return []

    def _update(self, state: Dict[str, Any], weight: np.ndarray, grad: Any, options: Group) -> None:
        if isinstance(grad, SparseGrad) and options["momentum"] != 0:
            self._sparse_momentum(state, weight, grad, options)
            return
        super()._update(state, weight, grad, options)

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group, prepared: Any) -> RowRule:
        return RowRule(_grad.UpdateKind.UPDATE_SGD, (None, None, None), (-options["lr"], 0.0, 0.0, 0.0), 0,
                       options["maximize"])

    def _dense_update(self, state: Dict[str, Any], weight: np.ndarray, grad: np.ndarray, options: Group) -> None:
        """torch's single-tensor SGD, operation for operation and bit for bit: each ``add(…, alpha=)``
        is one fused multiply-add (:func:`.optimizer.add_scaled_`), ``mul_`` one rounding."""
        momentum = options["momentum"]
        dtype = weight.dtype.type
        g = -grad if options["maximize"] else grad   # (a new array, or the caller's: never written)
        if options["weight_decay"] != 0:
            g = add_scaled_(np.array(g, order="C"), weight, options["weight_decay"])   # grad.add(w, alpha=wd)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = self._new_state(state, "momentum_buffer", weight, options=options)
                buf[...] = g
            else:
                buf *= dtype(momentum)
                add_scaled_(buf, g, 1 - options["dampening"])
            state["active_rows"] = None  # every row is live
            g = add_scaled_(np.array(g, order="C"), buf, momentum) if options["nesterov"] else buf
        add_scaled_(weight, g, -options["lr"])

    def _sparse_momentum(self, state: Dict[str, Any], weight: np.ndarray, grad: SparseGrad, options: Group) -> None:
        first = state.get("momentum_buffer") is None
        buf: np.ndarray = (self._new_state(state, "momentum_buffer", weight, options=options) if first
                           else state["momentum_buffer"])
        active: np.ndarray
        if first:
            active = np.zeros(0, dtype=np.int64)
        elif state.get("active_rows") is None:
            active = np.arange(weight.shape[0], dtype=np.int64)
        else:
            active = state["active_rows"]
        rows, _, b_slot = merge_plan(active, grad.indices)
        grad_slot = np.full(rows.size, -1, dtype=np.int64)
        grad_slot[b_slot] = np.arange(grad.nnz, dtype=np.int64)

        def kernel(w: np.ndarray, states: List[np.ndarray], kernel_rows: np.ndarray) -> None:
            _optim.sgd_momentum_rows(w, states[0], kernel_rows, grad_slot, grad.values, options["lr"],
                                     options["momentum"], options["dampening"], options["nesterov"],
                                     options["maximize"], first, n_threads_for(kernel_rows.size, "optimizer"))

        def half_kernel(bits: np.ndarray, weight_fmt: int, rounding_args: RoundingArgs) -> None:
            buf_view, _, _, state_fmt = fused_state_views((buf, None, None))
            _optim.sgd_momentum_rows_half(bits, weight_fmt, buf_view, state_fmt, rows, grad_slot, grad.values,
                                          options["lr"], options["momentum"], options["dampening"],
                                          options["nesterov"], options["maximize"], first, *rounding_args,
                                          n_threads_for(rows.size, "optimizer"))

        _update_rows(weight, [buf], rows, kernel, self._rounding_for(state, weight, options), half_kernel=half_kernel)
        state["momentum_buffer"] = buf
        rows.flags.writeable = False
        state["active_rows"] = rows
