"""16-bit weights and optimizer state (docs/behaviour.md §8.7): the ``rounding`` / ``seed`` /
``state_dtype`` options, the state dtype rule, and the gathered row update of a 16-bit weight (rows
gathered to float32, the float32 kernel, one rounding per element by ``_optim.round_rows``) for the
rules and layouts the one-pass kernels (``_optim.update_rows_half``, the fused backward) do not take."""
from __future__ import annotations

import collections.abc
import sys

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import _optim
from .._config import n_threads_for
from .._dtypes import FLOAT16, FLOAT32, compute_dtype, is_half, kernel_format, resolve_dtype
from .._validation import check_choice, check_int, kernel_array, kernel_layout

#: ``rounding`` values: how a float32 result is stored into a 16-bit weight or state.
ROUNDINGS = ("stochastic", "nearest")
#: ``state_dtype`` values (besides None) for a 16-bit table.
HALF_STATE_DTYPES = ("float32", "bfloat16", "float16")
#: The options every optimizer takes for 16-bit tables (a state dict may lack them).
ROUNDING_OPTIONS = ("rounding", "seed", "state_dtype", "rounding_rows")
#: The per-parameter state entry counting the updates of a 16-bit weight (the random key's step).
STEP_KEY = "rounding_step"
SEED_MAX = 2 ** 64 - 1

# random streams (CEMBED_STREAM_* in _rounding.h): the weight, then state array i is stream 1 + i
STREAM_WEIGHT = 0
STREAM_DECAY = 3


def check_rounding_rows(value: Any, where: str) -> Tuple[int, int]:
    """``rounding_rows`` as ``(first, stride)``: two ints in [0, 2**64), stride at least 1."""
    name = f"{where}: rounding_rows"
    pair = isinstance(value, np.ndarray) and value.ndim == 1 or \
        isinstance(value, collections.abc.Sequence) and not isinstance(value, (str, bytes))
    if not pair or len(value) != 2:   # (a dict or set of two is no pair: value[0] would be a KeyError)
        raise TypeError(f"{name} must be a pair (first, stride) of ints, got {value!r}")
    first = check_int(value[0], f"{name}[0] (first)", low=0, high=SEED_MAX)
    stride = check_int(value[1], f"{name}[1] (stride)", low=1, high=SEED_MAX)
    return first, stride


def check_rounding_options(group: Dict[str, Any], where: str) -> None:
    """Normalise a group's ``rounding`` (default "stochastic"), ``seed`` (default 0, an int in
    [0, 2**64)), ``rounding_rows`` (default (0, 1)) and ``state_dtype`` (None or a dtype name) in
    place."""
    group["rounding"] = check_choice(group.get("rounding", "stochastic"), f"{where}: rounding", ROUNDINGS)
    group["seed"] = check_int(group.get("seed", 0), f"{where}: seed", low=0, high=SEED_MAX)
    group["rounding_rows"] = check_rounding_rows(group.get("rounding_rows", (0, 1)), where)
    name = group.get("state_dtype")
    if name is not None:
        resolved = resolve_dtype(name, f"{where}: state_dtype")
        if resolved.name not in HALF_STATE_DTYPES + ("float64",):
            raise ValueError(f"{where}: state_dtype must be None, float32, bfloat16 or float16, got {resolved}")
        group["state_dtype"] = resolved.name
    else:
        group["state_dtype"] = None


def state_dtype(weight_dtype: np.dtype, options: Dict[str, Any], where: str) -> np.dtype:
    """The dtype of a parameter's per-element float state under the group's ``state_dtype``.

    Full-precision tables keep their state in their own dtype (``state_dtype`` None or that dtype);
    16-bit tables default to float32 state and may ask for bfloat16 or float16. Anything else is a
    ``ValueError`` naming the combination."""
    name = options.get("state_dtype")
    if not is_half(weight_dtype):
        if name is None or name == weight_dtype.name:
            return weight_dtype
        if name in HALF_STATE_DTYPES and name != "float32":
            raise ValueError(f"{where}: state_dtype={name} needs a 16-bit (float16 or bfloat16) table; a "
                             f"{weight_dtype} table keeps its optimizer state in {weight_dtype} (state_dtype=None)")
        raise ValueError(f"{where}: state_dtype={name} is not allowed for a {weight_dtype} table: it keeps its "
                         f"optimizer state in {weight_dtype} (state_dtype=None or {weight_dtype.name!r})")
    if name is None or name == "float32":
        return FLOAT32
    if name not in HALF_STATE_DTYPES:
        raise ValueError(f"{where}: state_dtype={name} is not allowed for a {weight_dtype} table "
                         "(float32, bfloat16 or float16)")
    return resolve_dtype(name)


def allowed_state_dtypes(weight_dtype: np.dtype) -> Sequence[np.dtype]:
    """Every dtype a state array of a table of ``weight_dtype`` may have (whatever the options)."""
    if not is_half(weight_dtype):
        return (weight_dtype,)
    allowed: List[np.dtype] = [FLOAT32, FLOAT16]
    if "ml_dtypes" in sys.modules:  # bfloat16 arrays exist only once ml_dtypes is loaded: never import it here
        allowed.append(resolve_dtype("bfloat16"))
    return tuple(allowed)


def half_in_place(weight: np.ndarray) -> bool:
    """Whether the 16-bit kernels can update ``weight`` in place: unit column stride, a row stride of
    whole elements, aligned — ``_validation.kernel_layout``, the one layout rule (a table with
    elements sharing memory was refused before: ``_validation.check_distinct_elements``)."""
    return kernel_layout(weight)


#: ``Rounding.fused()``: (stochastic, seed, step, first, stride)
RoundingArgs = Tuple[bool, int, int, int, int]


class Rounding:
    """How one update of one parameter stores float32 results into its 16-bit arrays: the format
    follows each target array; the random key is (seed, step, key row, stream, column), where table
    row r has key row ``first + stride * r`` (mod 2**64; ``rounding_rows``, default (0, 1): the row
    itself)."""

    __slots__ = ("stochastic", "seed", "step", "first", "stride")

    def __init__(self, stochastic: bool, seed: int, step: int, rows: Tuple[int, int] = (0, 1)) -> None:
        self.stochastic, self.seed, self.step = bool(stochastic), int(seed), int(step)
        self.first, self.stride = int(rows[0]), int(rows[1])

    def key_rows(self, rows: np.ndarray) -> np.ndarray:
        """The key rows of table ``rows`` (int64 bit patterns of the uint64 keys, as the kernels read
        them)."""
        if (self.first, self.stride) == (0, 1):
            return rows
        keys = rows.astype(np.uint64) * np.uint64(self.stride) + np.uint64(self.first)   # wraps mod 2**64
        return keys.view(np.int64)

    def store(self, target: np.ndarray, rows: np.ndarray, values: np.ndarray, stream: int) -> None:
        """``target[rows] = values`` rounded once per element to ``target``'s 16-bit dtype; ``values``
        is float32, one row (or, for a 1-D target, one value) per entry of ``rows``; no row: nothing
        to store (an update that touches no row)."""
        n = rows.size
        if n == 0:
            return
        flat = kernel_array(values, np.float32).reshape(n, -1)
        bits = np.empty(flat.shape, dtype=np.uint16)
        _optim.round_rows(flat, bits, kernel_format(target.dtype), self.stochastic, self.key_rows(rows), self.seed,
                          self.step, stream, n_threads_for(n, "optimizer"))
        target[rows] = bits.view(target.dtype).reshape(values.shape)

    def fused(self) -> "RoundingArgs":
        """The arguments ``RowContributions.update_rows_half`` and the ``_optim.*_half`` kernels take
        after the rule: (stochastic, seed, step, key row of row 0, key row stride)."""
        return self.stochastic, self.seed, self.step, self.first, self.stride


def widen(array: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy of a 16-bit array; other arrays C-contiguous (copied if needed)."""
    if is_half(array.dtype):
        return kernel_array(array, np.float32)
    return kernel_array(array)


def update_rows_half(weight: np.ndarray, states: Sequence[np.ndarray], rows: np.ndarray,
                     kernel: Callable[[np.ndarray, List[np.ndarray], np.ndarray], None], rounding: Rounding,
                     weight_stream: int = STREAM_WEIGHT) -> None:
    """The update of ``rows`` of a 16-bit ``weight`` and of its state arrays by a float32 row
    ``kernel(weight, states, rows)``: the rows are widened to float32 (exactly), updated by the
    float32 kernel, and rounded back once per element — the weight on ``weight_stream``, 16-bit state
    array ``i`` on stream ``1 + i``; other state arrays (float32, int64, float64) are copied back."""
    block = widen(weight[rows])
    blocks = [widen(s[rows]) for s in states]
    kernel(block, blocks, np.arange(rows.size, dtype=np.int64))
    rounding.store(weight, rows, block, weight_stream)
    for i, (s, b) in enumerate(zip(states, blocks)):
        if is_half(s.dtype):
            rounding.store(s, rows, b, 1 + i)
        else:
            s[rows] = b


def fused_state_views(states: Sequence[Optional[np.ndarray]]) -> tuple:
    """(state_a, state_b, row_state, state_format) for ``_grad.segment_update_half``: float32 state
    as is, 16-bit state as its uint16 bits; absent arrays as empty arrays of the same kind."""
    present = [s for s in states if s is not None]
    half = bool(present) and is_half(present[0].dtype)
    kind = np.uint16 if half else np.float32
    fmt = kernel_format(present[0].dtype) if half else 0
    a, b, rs = (s.view(np.uint16) if (s is not None and half) else s for s in states)
    return (np.zeros((0, 0), kind) if a is None else a, np.zeros((0, 0), kind) if b is None else b,
            np.zeros(0, kind) if rs is None else rs, fmt)


__all__ = ["ROUNDINGS", "ROUNDING_OPTIONS", "STEP_KEY", "Rounding", "allowed_state_dtypes", "check_rounding_options",
           "check_rounding_rows",
           "compute_dtype", "fused_state_views", "half_in_place", "state_dtype", "update_rows_half", "widen"]
