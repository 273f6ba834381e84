"""RowWiseAdagrad: Adagrad with one accumulator per row (FBGEMM's EXACT_ROWWISE_ADAGRAD)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from .. import _grad, storage
from ..functional import RowRule
from .._validation import check_choice, check_exact_array, kernel_array
from ._rounding import allowed_state_dtypes, check_rounding_options, state_dtype
from .optimizer import Group, Optimizer, _check_maximize, _learning_rate, _option

__all__ = ["RowWiseAdagrad"]

_MODES = {"l2": 1, "decoupled": 2}


class RowWiseAdagrad(Optimizer):
    """Adagrad whose adaptive step is shared by each row: one state value per row instead of one
    per element — a table's optimizer state shrinks from ``D`` floats per row to 1.

    Per touched row with summed gradient ``g`` (``-g`` with ``maximize``):

    - ``"l2"``: ``h = g + weight_decay * w`` (else ``h = g``);
    - ``state[r] += mean(h ** 2)``;
    - ``multiplier = lr / (sqrt(state[r]) + eps)``;
    - ``w = correction * w - multiplier * g`` with ``correction = 1 - multiplier * weight_decay``
      (``"l2"``, i.e. ``w - multiplier * h``) or ``1 - lr * weight_decay`` (``"decoupled"``).

    This is FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` CPU rule (its order of operations, in the weight's
    dtype); the sum of squares is accumulated in 8 interleaved lanes where FBGEMM adds sequentially,
    so the two agree to rounding (``docs/behaviour.md`` §8.6).

    Parameters
    ----------
    params : iterable of modules or of dicts
    lr : float, default 0.01
    eps : float, default 1e-8
    weight_decay : float, default 0
    weight_decay_mode : {"l2", "decoupled"}, default "l2"
    initial_accumulator_value : float, default 0
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
        dtype of the per-row ``sum`` of a 16-bit table (None: float32). float32/float64 tables keep their state
        in their own dtype (anything else is refused).
    state_dir : str or os.PathLike, optional
        Keep the per-row state arrays as ``.npy`` memmaps in this directory instead of in memory
        (``docs/storage.md``); the directory is locked by this optimizer.

    Notes
    -----
    Sparse and dense gradients (a dense gradient updates every row); rows a sparse gradient does not
    name are untouched. State: ``state[module]["sum"]``, an array of ``num_embeddings`` values of the
    weight's dtype, created when the module joins.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> emb = cembed.Embedding(1000, 64, sparse=True, seed=0)
    >>> opt = cembed.optim.RowWiseAdagrad(emb.parameters(), lr=0.1)
    >>> opt.state[emb]["sum"].shape            # one value per row
    (1000,)
    >>> rows = emb(np.array([3, 3, 7]))
    >>> emb.backward(np.ones_like(rows), optimizer=opt)   # fused backward + update
    >>> float(opt.state[emb]["sum"][3]), float(opt.state[emb]["sum"][7])
    (4.0, 1.0)
    """

    _row_float_states = ("sum",)

    def __init__(self, params: Any, lr: float = 0.01, eps: float = 1e-8, weight_decay: float = 0.0,
                 weight_decay_mode: str = "l2", initial_accumulator_value: float = 0.0, maximize: bool = False,
                 rounding: str = "stochastic", seed: int = 0, rounding_rows: Tuple[int, int] = (0, 1),
                 state_dtype: Any = None, state_dir: Any = None) -> None:
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay, weight_decay_mode=weight_decay_mode,
                                      initial_accumulator_value=initial_accumulator_value, maximize=maximize,
                                      rounding=rounding, seed=seed, rounding_rows=rounding_rows,
                                      state_dtype=state_dtype), state_dir=state_dir)

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        _learning_rate(group, where)
        for name in ("eps", "weight_decay", "initial_accumulator_value"):
            _option(group, name, where, low=0.0)
        group["weight_decay_mode"] = check_choice(group.get("weight_decay_mode"), f"{where}: weight_decay_mode",
                                                  tuple(_MODES))
        _check_maximize(group, where)
        check_rounding_options(group, where)
        return group

    _state_at_join = True

    _initial_fill_option = "initial_accumulator_value"

    def _init_state(self, module: Any, group: Group) -> None:
        state: Dict[str, Any] = {}
        self._new_state(state, "sum", module.weight, per_row=True, fill=group["initial_accumulator_value"],
                        options=group)
        self.state[module] = state

    def _fill_missing_state(self, state: Dict[Any, Dict[str, Any]], groups: List[Group]) -> None:
        for group in groups:
            for module in group["params"]:
                if not state.get(module):
                    raise ValueError("RowWiseAdagrad state_dict lacks the state of a parameter (it needs 'sum')")

    def _checked_sum(self, entry: Dict[str, Any], weight: np.ndarray, where: str, allowed: Any) -> np.ndarray:
        if set(entry) != {"sum"}:
            raise ValueError(f"{where}: RowWiseAdagrad state needs exactly 'sum', got {sorted(entry)}")
        arr = entry["sum"]
        if isinstance(arr, np.ndarray):
            check_exact_array(arr, f"{where}: RowWiseAdagrad state 'sum'")
        if not isinstance(arr, np.ndarray) or arr.shape != (weight.shape[0],) or arr.dtype not in allowed:
            got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
            raise ValueError(f"{where}: RowWiseAdagrad state 'sum' is {got}, expected ({weight.shape[0]},) "
                             f"{allowed[0]}, one value per row of the weight")
        return arr

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        arr = self._checked_sum(state, weight, where, allowed_state_dtypes(weight.dtype))
        if not (arr.flags.c_contiguous and arr.flags.writeable and arr.flags.aligned):
            raise ValueError(f"{where}: RowWiseAdagrad state 'sum' must be a writeable contiguous array")

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        arr = self._checked_sum(entry, weight, where, (state_dtype(weight.dtype, options, where),))
        return {"sum": storage.aligned_copy(arr)}

    _accumulators = ("sum",)

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group, prepared: Any) -> RowRule:
        mode = _MODES[options["weight_decay_mode"]] if options["weight_decay"] != 0 else 0
        return RowRule(_grad.UpdateKind.UPDATE_ROWWISE_ADAGRAD, (None, None, state["sum"]),
                       (options["lr"], options["eps"], options["weight_decay"], 0.0), mode, options["maximize"])

    def _dense_update(self, state: Dict[str, Any], weight: np.ndarray, grad: np.ndarray, options: Group) -> None:
        """A dense gradient: every row is updated (with a zero gradient, rows still decay)."""
        self._sparse_rows(state, weight, np.arange(weight.shape[0], dtype=np.int64), kernel_array(grad),
                          options, None)
