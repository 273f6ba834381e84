"""The optimizer base class: param groups, step, state dicts, files; shared helpers."""
from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
import json
import math
import os
import re
import weakref
import struct
import zipfile
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib import format as npy_format

from .. import _optim
from .._config import n_threads_for
from .._dtypes import compute_dtype, is_half, kernel_format
from .._validation import (
    EXACT_ARRAY_TYPES,
    EXACT_INTEGER_TYPES,
    array_key,
    as_checked,
    check_exact_array,
    is_as_checked,
    check_bool,
    check_distinct_elements,
    check_int,
    check_real,
    check_row_ids,
    check_trainable,
    check_weight,
    kernel_array,
    kernel_layout,
)
from ..sparse import SparseGrad, check_exact_sparse_grad, zeroed_grad
from .. import storage
from ..functional import RowRule
from . import _rounding as rounding_
from ._hooks import (
    RemovableHandle,
    StepPostHook,
    StepPreHook,
    add_hook,
    global_step_post_hooks,
    global_step_pre_hooks,
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
    run_hooks,
    run_replacing_hooks,
)
from ._rounding import ROUNDING_OPTIONS, STEP_KEY, Rounding, RoundingArgs

__all__ = ["Optimizer", "RemovableHandle", "register_optimizer_step_pre_hook", "register_optimizer_step_post_hook"]

Group = Dict[str, Any]
_FORMAT = "cembed.optim/2"


def _name(module: Any, where: str) -> str:
    return f"{where} ({type(module).__name__})"


def _snapshot(optimizer: "Optimizer", module: Any, weight: np.ndarray, grad: Any) -> Tuple[Any, ...]:
    """The objects a step checked for ``module``: its weight, gradient and state entries (arrays with
    their keys), compared again by :func:`_check_unchanged` just before the updates."""
    state = optimizer.state.get(module)
    entries = None if state is None else {k: (v, array_key(v) if isinstance(v, np.ndarray) else None)
                                          for k, v in state.items()}
    return (as_checked(weight), grad, state, entries)


def _check_unchanged(optimizer: "Optimizer", module: Any, snapshot: Tuple[Any, ...], where: str) -> None:
    """ValueError, before any update, when ``module``'s weight, gradient or optimizer state is not what
    was checked: code run during the checks (an option's ``__float__``, an argument's ``__array__``)
    replaced or reshaped one of them."""
    weight, grad, state, entries = snapshot
    now = optimizer.state.get(module)
    same = (is_as_checked(module.weight, weight) and module.grad is grad and now is state
            and (state is None or (set(state) == set(entries) and all(
                state[k] is v and (k_ is None or array_key(v) == k_) for k, (v, k_) in entries.items()))))
    if not same:
        raise ValueError(f"{where}: the weight, gradient or optimizer state changed while the step was being "
                         "checked (by code run from an option or argument); nothing was updated")


def _in_place(weight: np.ndarray) -> bool:
    """Whether the row kernels can update ``weight`` in place (else the touched rows are copied out,
    updated and written back: never the whole table)."""
    return kernel_layout(weight)


#: The one-pass update of a 16-bit weight's rows: ``half_kernel(bits, weight_format, rounding_args)``
#: with the weight's uint16 view, its ``kernel_format`` and ``Rounding.fused()`` (an ``_optim.*_half``
#: kernel, its other arguments bound by the caller).
HalfKernel = Callable[[np.ndarray, int, RoundingArgs], None]


def _gradient_dtype_message(where: str, got: np.dtype, weight: np.dtype, wanted: np.dtype) -> str:
    """A gradient whose dtype is not the one its table takes (a 16-bit table takes float32 ones)."""
    if wanted == weight:
        return f"{where}: gradient dtype {got} does not match the weight dtype {weight}"
    return f"{where}: a {weight} table takes {wanted} gradients, got {got}"


def _update_rows(weight: np.ndarray, states: Sequence[np.ndarray], rows: np.ndarray,
                 kernel: Callable[[np.ndarray, List[np.ndarray], np.ndarray], None],
                 rounding: Optional[Rounding] = None, weight_stream: int = rounding_.STREAM_WEIGHT,
                 half_kernel: Optional[HalfKernel] = None) -> None:
    """Run ``kernel(weight, states, rows)`` — an update of ``rows`` of the weight and of its
    C-contiguous state arrays — on a weight of any layout. A 16-bit weight (``rounding`` given) is
    updated in float32 and rounded once per element: in place, one pass per row, by ``half_kernel``
    when there is one and the kernels can write the weight in place; else its rows are gathered
    (:func:`._rounding.update_rows_half`). Both give the same bits."""
    if rounding is not None:
        if half_kernel is not None and rounding_.half_in_place(weight):
            half_kernel(weight.view(np.uint16), kernel_format(weight.dtype), rounding.fused())
            return
        rounding_.update_rows_half(weight, states, rows, kernel, rounding, weight_stream)
        return
    if _in_place(weight):
        kernel(weight, list(states), rows)
        return
    block = np.ascontiguousarray(weight[rows])
    state_blocks = [np.ascontiguousarray(s[rows]) for s in states]
    kernel(block, state_blocks, np.arange(rows.size, dtype=np.int64))
    weight[rows] = block
    for s, b in zip(states, state_blocks):
        s[rows] = b


def _elementwise(out: np.ndarray, x: np.ndarray, y: np.ndarray, alpha: float) -> None:
    """``_optim.fused_multiply_add_`` on flat C-contiguous views (``y`` empty: ``alpha`` instead); an
    ``out`` of another layout (or unaligned) goes through a contiguous copy written back. The inputs are made
    contiguous, shaped like ``out``, and copied when they may share memory with it (a ``.grad`` set to a
    view of the state, say)."""
    work = kernel_array(out)   # (out itself when it is C-contiguous and aligned)
    flat = []
    for arr in (x, y):
        if arr.size or arr is x:
            arr = kernel_array(np.broadcast_to(arr, out.shape), out.dtype)
            arr = (arr.copy() if np.may_share_memory(arr, out) else arr).reshape(-1)
        flat.append(arr)
    _optim.fused_multiply_add_(work.reshape(-1), flat[0], flat[1], alpha, n_threads_for(out.size, "elementwise"))
    if work is not out:
        out[...] = work


def add_scaled_(out: np.ndarray, x: np.ndarray, alpha: float) -> np.ndarray:
    """``out = fma(alpha, x, out)``, element by element, in place: torch's ``out.add_(x, alpha=alpha)``
    on the CPU, bit for bit (its kernels fuse the multiply-add; ``alpha`` is rounded to out's dtype).
    The dense-gradient updates use it wherever torch's single-tensor optimizer calls ``add(…, alpha=)``.
    Returns ``out``."""
    _elementwise(out, x, np.zeros(0, out.dtype), float(alpha))
    return out


def add_product_(out: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``out = fma(x, y, out)``, element by element, in place: torch's ``out.addcmul_(x, y)`` on the CPU.
    Returns ``out``."""
    _elementwise(out, x, y, 0.0)
    return out


class Optimizer:
    """Base class: param groups, ``zero_grad``, ``step``, ``state_dict`` / ``load_state_dict``,
    ``save`` / ``load``.

    Subclasses declare ``_state_arrays`` (per-row state arrays shaped like the weight) and implement
    ``_check_options`` (one group's hyper-parameters, validated and normalised), ``_check_grad``,
    ``_check_state``, ``_load_state_entry`` and the update hooks ``_sparse_begin`` / ``_row_rule`` (the
    row update of a sparse step, as a :class:`cembed.functional.RowRule`; or override ``_sparse_rows``) /
    ``_dense_update``.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> words, tags = cembed.Embedding(100, 4, sparse=True, seed=0), cembed.Embedding(10, 4, sparse=True, seed=1)
    >>> opt = cembed.optim.SparseAdam([{"params": [words]}, {"params": [tags], "lr": 0.1}], lr=0.01)
    >>> [group["lr"] for group in opt.param_groups]
    [0.01, 0.1]
    """

    _state_arrays: Tuple[str, ...] = ()
    #: Whether every parameter has its state from the moment it joins (Adagrad's accumulator): a step
    #: then refuses a parameter without state.
    _state_at_join: bool = False
    #: The float32 scratch state of a dense step on a 16-bit table (:meth:`_dense_update_half`): its new
    #: arrays are made in memory, and the real state's (in ``state_dir`` when there is one) after.
    _scratch_state: Optional[Dict[str, Any]] = None
    #: During a step with a ``state_dir``: the state files it will create, reserved, mapped and put in
    #: place before any parameter is updated (path -> (its temporary file while not yet in place, else
    #: None; the map); :meth:`_reserve_step_state`).
    _reserved: Optional[Dict[str, Tuple[Optional[str], np.ndarray]]] = None
    #: During a step without a ``state_dir``: the state arrays it will create, allocated before any
    #: parameter is updated ((id of the parameter's state dict, key) -> the array; :meth:`_reserve_step_state`).
    _reserved_memory: Optional[Dict[Tuple[int, str], np.ndarray]] = None
    #: Per-row float state of one value per row (RowWiseAdagrad's ``sum``): its dtype is ``state_dtype``'s too.
    _row_float_states: Tuple[str, ...] = ()
    #: Options a state dict may lack (added in a later version): they take the defaults, as torch
    #: does for ``maximize``; every other option must be there.
    _optional_options: Tuple[str, ...] = ("maximize",)
    #: For optimizers that take sparse gradients only: what to use for dense ones instead.
    _dense_alternative: Optional[str] = None

    def __init__(self, params: Any, defaults: Dict[str, Any], state_dir: Any = None) -> None:
        self._step_pre_hooks: "OrderedDict[int, StepPreHook]" = OrderedDict()
        self._step_post_hooks: "OrderedDict[int, StepPostHook]" = OrderedDict()
        self._state_dict_pre_hooks: "OrderedDict[int, Callable[[Any], None]]" = OrderedDict()
        self._state_dict_post_hooks: "OrderedDict[int, Callable[[Any, Dict[str, Any]], Any]]" = OrderedDict()
        self._load_state_dict_pre_hooks: "OrderedDict[int, Callable[[Any, Dict[str, Any]], Any]]" = OrderedDict()
        self._load_state_dict_post_hooks: "OrderedDict[int, Callable[[Any], None]]" = OrderedDict()
        self.defaults: Dict[str, Any] = self._check_options(dict(defaults), "defaults")
        self.param_groups: List[Group] = []
        self.state: Dict[Any, Dict[str, Any]] = {}
        self._joining: Any = None
        #: Where the per-row state arrays live as ``.npy`` memmaps (None: in memory). See
        #: ``docs/storage.md``: one file ``p<index>.<name>.npy`` per array, ``<index>`` the
        #: parameter's number across the groups (as in :meth:`state_dict`).
        self.state_dir: Optional[str] = None
        self._lock: Optional[weakref.finalize] = None
        if state_dir is not None:
            self.state_dir, self._lock = _lock_state_dir(state_dir, self)
        try:
            if hasattr(params, "weight") or isinstance(params, dict):
                params = [params]
            groups = list(params)
            if not groups:
                raise ValueError("optimizer got an empty parameter list")
            if not isinstance(groups[0], dict):
                groups = [{"params": groups}]
            # every group checked before any state is made (in a state_dir: files a constructor refused
            # later must not have replaced), its parameters listed once (a generator is read once)
            seen: Dict[int, str] = {}
            checked = [self._checked_group(group, g, seen) for g, group in enumerate(groups)]
            for group, modules in checked:
                self._add_checked_group(group, modules)
        except BaseException:
            if self._lock is not None:
                self._lock()  # a refused optimizer does not keep its state_dir locked
            raise
        if self.state_dir is not None and self._lock is not None:
            _remove_stale_temporaries(self.state_dir)   # locked, and the constructor refused nothing

    # ------------------------------------------------------------------ groups
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group ``{"params": [modules...], <option>: value, ...}``; options it does not set
        take the constructor's values (``defaults``).

        Raises
        ------
        TypeError
            Not a dict, or a parameter that is not a module with a float table.
        ValueError
            A module already in this optimizer (torch only warns, then updates it twice), an empty
            group, or a bad option.

        A group whose parameters' state cannot be made (e.g. ``MemoryError`` for a table larger than
        memory) is not added: the optimizer stays as it was.

        Examples
        --------
        >>> import cembed
        >>> a, b = cembed.Embedding(10, 2, sparse=True), cembed.Embedding(10, 2, sparse=True)
        >>> opt = cembed.optim.SGD([a], lr=0.1)
        >>> opt.add_param_group({"params": [b], "momentum": 0.9})
        >>> opt.param_groups[1]["lr"], opt.param_groups[1]["momentum"]
        (0.1, 0.9)
        """
        seen = {id(m): where for where, m in self._named_params()}
        self._add_checked_group(*self._checked_group(param_group, len(self.param_groups), seen))

    def _add_checked_group(self, group: Group, modules: List[Any]) -> None:
        """Append a group :meth:`_checked_group` returned and make its parameters' state (all or none)."""
        group["params"] = modules
        self.param_groups.append(group)
        previous = {m: self.state[m] for m in modules if m in self.state}
        try:
            for module in modules:
                self._joining = module
                self._init_state(module, group)
        except BaseException:
            # a group whose state cannot be made (a MemoryError for a huge table, ...) is not added
            for module in modules:
                self.state.pop(module, None)
            self.state.update(previous)
            if self.param_groups and self.param_groups[-1] is group:
                self.param_groups.pop()
            raise
        finally:
            self._joining = None

    def _checked_group(self, param_group: Any, g: int, seen: Dict[int, str]) -> Tuple[Group, List[Any]]:
        """(options with the defaults filled in and checked, modules) of ``param_group`` as group ``g``;
        ``seen`` (module id -> where) holds the modules of the groups before it and gets this group's.
        Changes nothing else: every check of a new group, made before its state is."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params")
        if params is None:
            raise ValueError("param group must have a 'params' entry")
        modules = [params] if hasattr(params, "weight") else list(params)
        if not modules:
            raise ValueError("optimizer got an empty parameter list")
        for k, module in enumerate(modules):
            where = f"param_groups[{g}]['params'][{k}]"
            if not hasattr(module, "weight") or not hasattr(module, "grad"):
                raise TypeError(f"{where} must be a module with .weight and .grad, got {type(module).__name__}")
            _checked_table(module.weight, f"{where}.weight")
            if id(module) in seen:
                raise ValueError(f"{_name(module, where)} is the same module as {seen[id(module)]}: "
                                 "a module may appear only once in an optimizer")
            seen[id(module)] = where
        group = dict(self.defaults)
        group.update({k: v for k, v in param_group.items() if k != "params"})
        group = self._check_options(group, f"param_groups[{g}]")
        for k, module in enumerate(modules):  # state_dtype against every table, before anything changes
            where = f"param_groups[{g}]['params'][{k}]"
            state_dtype = rounding_.state_dtype(module.weight.dtype, group, where)
            if self._initial_fill_option is not None:
                option = self._initial_fill_option
                self._check_fill(group[option], state_dtype, f"{where}: {option}")
        return group, modules

    #: The option whose value fills the state made as a parameter joins (Adagrad's
    #: ``initial_accumulator_value``), checked to be representable in the state's dtype; None: no fill.
    _initial_fill_option: Optional[str] = None

    @staticmethod
    def _check_fill(value: float, state_dtype: np.dtype, what: str) -> None:
        """ValueError unless ``value`` stored in ``state_dtype`` stays finite (and nonzero if it is)."""
        with np.errstate(over="ignore", under="ignore"):
            exact = np.asarray(value, dtype=np.float64)
            if np.dtype(state_dtype).itemsize == 2:   # (as _new_state fills 16-bit state: float32(value), rounded)
                exact = exact.astype(np.float32)
            stored = float(exact.astype(state_dtype))
        if not math.isfinite(stored) or (value != 0 and stored == 0):
            raise ValueError(f"{what} = {value!r} cannot be kept in {state_dtype} state (it would be stored as "
                             f"{stored!r})")

    def _check_params(self) -> None:
        """The parameter lists as they are now (``param_groups[g]["params"]`` can be edited by hand):
        TypeError for an entry that is not a module with ``.weight`` and ``.grad``, ValueError for a
        module listed twice (it would be updated twice per step, and its state dict could not be
        loaded back). Run before a step, a fused step, ``zero_grad`` and ``state_dict``."""
        if type(self.state) is not dict:   # (a subclass's methods would run between the checks and the update)
            raise TypeError(f"optimizer.state must be a dict, got {type(self.state).__name__}")
        seen: Dict[int, Tuple[int, int]] = {}
        for g, group in enumerate(self.param_groups):
            params = group.get("params") if isinstance(group, dict) else None
            if not isinstance(params, (list, tuple)):
                raise TypeError(f"param_groups[{g}] must be a dict whose 'params' is a list of modules, got "
                                f"{type(params if isinstance(group, dict) else group).__name__}")
            for k, module in enumerate(params):
                if not hasattr(module, "weight") or not hasattr(module, "grad"):
                    raise TypeError(f"param_groups[{g}]['params'][{k}] must be a module with .weight and .grad, got "
                                    f"{type(module).__name__}")
                first = seen.setdefault(id(module), (g, k))
                if first != (g, k):
                    where = _name(module, f"param_groups[{g}]['params'][{k}]")
                    raise ValueError(f"{where} is the same module as param_groups[{first[0]}]['params'][{first[1]}]: "
                                     "a module may appear only once in an optimizer")

    def _named_params(self) -> Iterable[Tuple[str, Any]]:
        for g, group in enumerate(self.param_groups):
            for k, module in enumerate(group["params"]):
                yield f"param_groups[{g}]['params'][{k}]", module

    def _init_state(self, module: Any, group: Group) -> None:
        """State created when a parameter joins (Adagrad's accumulator); default: lazily at step."""

    def _new_state(self, state: Dict[str, Any], key: str, weight: np.ndarray, *, per_row: bool = False,
                   dtype: Any = None, fill: float = 0.0, options: Optional[Group] = None) -> np.ndarray:
        """The one place an optimizer allocates a per-row state array: ``state[key]``, shaped like
        ``weight`` (or ``(n_rows,)`` with ``per_row``), of ``dtype`` (default: the float state dtype of
        the group ``options`` for this weight — the weight's own dtype for float32/float64 tables,
        ``state_dtype`` or float32 for 16-bit ones), filled with ``fill``. Zeros come from
        ``storage.aligned_zeros`` (``np.zeros`` with rows on cache-line boundaries), so untouched
        pages of a huge table's state cost no memory until a row is first updated. Stores the array
        in ``state`` and returns it."""
        shape, dtype = self._state_layout(weight, per_row, dtype, options)
        if np.dtype(dtype).itemsize == 2:
            fill = np.float32(fill)   # 16-bit state: the float32 value, rounded to nearest once (either format)
        if self.state_dir is not None and state is not self._scratch_state:
            # on disk: a zero file with its space reserved (no write), mapped read-write; a non-zero fill is written
            # in bounded blocks. In a step() the file was reserved before any parameter was updated.
            path = self._state_path(self._module_of(state), key)
            reserved = self._reserved.pop(path, None) if self._reserved is not None else None
            array: np.ndarray
            if reserved is not None:   # made, mapped and put in place before the step updated anything
                array = reserved[1]
            else:
                storage.create_zeros(path, shape, dtype)   # bfloat16 as its uint16 bits (storage.file_dtype)
                array = storage.map_array(path, "r+", dtype=dtype)
            if fill != 0:
                step = max(1, storage.CHUNK_BYTES // max(1, array.itemsize * int(np.prod(shape[1:], dtype=np.int64))))
                for lo in range(0, shape[0], step):
                    array[lo:lo + step] = fill
        else:
            # page-aligned, like the modules' tables; in a step() allocated before any parameter was updated
            reserved_memory = self._reserved_memory.pop((id(state), key), None) if self._reserved_memory else None
            array = reserved_memory if reserved_memory is not None else storage.aligned_zeros(shape, dtype)
            if fill != 0:
                array.fill(fill)
        state[key] = array
        return array

    @staticmethod
    def _state_layout(weight: np.ndarray, per_row: bool, dtype: Any, options: Optional[Group]) -> Tuple[Tuple[int, ...], Any]:
        """(shape, dtype) of a new state array (see :meth:`_new_state`)."""
        shape = (weight.shape[0],) if per_row else weight.shape
        if dtype is None:
            dtype = rounding_.state_dtype(weight.dtype, options or {}, "state")
        return shape, dtype

    # ------------------------------------------------------------------ state on disk
    def _module_of(self, state: Dict[str, Any]) -> Any:
        """The parameter whose state dict is ``state`` (or the one joining the optimizer)."""
        for module, entry in self.state.items():
            if entry is state:
                return module
        if self._joining is not None:
            return self._joining
        raise RuntimeError("optimizer state allocated for an unknown parameter")  # pragma: no cover

    def _state_path(self, module: Any, key: str) -> str:
        """``<state_dir>/p<index>.<key>.npy``: ``index`` numbers the parameters across the groups."""
        assert self.state_dir is not None
        index = self._index_of()[id(module)]
        return os.path.join(self.state_dir, f"p{index}.{key}.npy")

    @staticmethod
    def _is_row_state(key: str, value: Any, weight: np.ndarray) -> bool:
        """Whether a state entry is a per-row array (kept in ``state_dir`` when there is one)."""
        return (key != "active_rows" and isinstance(value, np.ndarray) and value.ndim >= 1
                and (value.shape == weight.shape or value.shape == (weight.shape[0],)))

    def _row_state_arrays(self, module: Any) -> List[np.ndarray]:
        """The per-row state arrays of ``module`` (what :meth:`Embedding.prefetch` reads ahead);
        ValueError when the optimizer does not hold it."""
        self._locate(module)
        entry = self.state.get(module) or {}
        weight = module.weight
        return [v for k, v in entry.items() if self._is_row_state(k, v, weight)]

    def _move_to_state_dir(self, new_state: Dict[Any, Dict[str, Any]], index: Dict[int, int],
                           install: Callable[[], None]) -> None:
        """Copy every per-row array of a checked ``new_state`` into its file in ``state_dir``
        (bounded blocks) and replace it by the mapped file. Two phases: every array is first written
        to a temporary beside its file (``storage.reserve_zeros``: its space reserved, a full disk an
        ``OSError`` here) and mapped as
        the file it is to become; only then are they all renamed into place, all or none
        (``storage.replace_files``), and ``install`` (the optimizer's switch to ``new_state``) runs
        with them, a Ctrl-C held back until both are done. Any error (or an interrupt) before
        removes the temporaries and leaves the state files (those the live optimizer maps) as they
        were."""
        assert self.state_dir is not None
        written: List[Tuple[Dict[str, Any], str, str, str]] = []   # (entry, key, file, its temporary)
        maps: List[np.ndarray] = []
        try:
            for module, entry in new_state.items():
                for key, value in list(entry.items()):
                    if not self._is_row_state(key, value, module.weight):
                        continue
                    # a state file linked elsewhere — another disk — is written there: its temporary is made
                    # beside the target (storage's marked, locked temporaries: one a killed load leaves is
                    # removed by the next write of that file, wherever it is)
                    path = storage.written_path(os.path.join(self.state_dir, f"p{index[id(module)]}.{key}.npy"))
                    tmp = storage.reserve_zeros(path, value.shape, value.dtype)
                    written.append((entry, key, path, tmp))
                    target = storage.map_reserved(tmp, path, value.dtype)
                    storage.copy_rows(target, value)
                    target.flush()
                    maps.append(target)

            def commit() -> None:   # the entries now map the files in place
                for (entry, key, _, _), mapped in zip(written, maps):
                    entry[key] = mapped
                install()
            storage.replace_files([(tmp, path) for _, _, path, tmp in written], commit)
        except BaseException:
            for _, _, _, tmp in written:
                storage.discard_reserved(tmp)
            raise

    def _check_options(self, group: Dict[str, Any], where: str) -> Dict[str, Any]:
        raise NotImplementedError

    # ------------------------------------------------------------------ housekeeping
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Drop every parameter's gradient (torch's default ``set_to_none=True``); with
        ``set_to_none=False`` zero it instead, as torch does (``cembed.sparse.zeroed_grad``: a dense
        gradient zeroed in place, a sparse one made empty — the next ``step()`` still counts the
        parameter, advancing its step counter as torch's does).

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(5, 2, seed=0)
        >>> opt = cembed.optim.SGD([emb], lr=0.1)
        >>> emb.backward(np.ones((1, 2), np.float32), np.array([3]))
        >>> opt.zero_grad(); emb.grad is None
        True
        """
        self._check_params()
        set_to_none = check_bool(set_to_none, "zero_grad: set_to_none")
        for _, module in self._named_params():
            module.grad = None if set_to_none else zeroed_grad(module.grad)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for g, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {g}")
            lines += [f"    {k}: {v!r}" for k, v in sorted(group.items()) if k != "params"]
        return "\n".join(lines) + "\n)"

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One update of every parameter that has a gradient.

        Parameters
        ----------
        closure : callable, optional
            Called first (typically: zero the gradients, forward, backward, return the loss); its
            value is returned, as in torch.

        Raises
        ------
        TypeError, ValueError, IndexError
            A bad option, gradient or state anywhere: raised before any parameter is updated.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding.from_pretrained(np.zeros((3, 2), np.float32), freeze=False, sparse=True)
        >>> opt = cembed.optim.SGD([emb], lr=0.5)
        >>> def closure():
        ...     opt.zero_grad()
        ...     emb.backward(np.ones((1, 2), np.float32), np.array([1]))
        ...     return 0.25
        >>> opt.step(closure), emb.weight[1]
        (0.25, array([-0.5, -0.5], dtype=float32))

        Step hooks (:meth:`register_step_pre_hook`, :meth:`register_step_post_hook`, and those of every
        optimizer) get ``args = (optimizer,)``, or ``(optimizer, closure)`` when a closure is given,
        and ``kwargs = {}``, as torch's get the arguments of its ``step``.
        """
        args, kwargs = self._run_step_pre_hooks((self,) if closure is None else (self, closure), {})
        out = type(self)._unhooked_step(*args, **kwargs)
        self._stepped(args, kwargs)
        return out

    def _unhooked_step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = closure() if closure is not None else None
        self._check_params()
        plan = []
        for g, options, params in self._group_options():
            for k, module in enumerate(params):
                where = f"param_groups[{g}]['params'][{k}]"
                grad = module.grad
                if grad is None:
                    continue
                weight = self._check_weight(module, where)
                self._check_grad(options, grad, weight, where)
                state = self.state.get(module)
                self._check_state_for(state, weight, options, where)
                self._check_advance(_core(state) if state else {}, where)
                plan.append((module, weight, grad, options, where, _snapshot(self, module, weight, grad)))
        self._confirm_checked([(module, where, snapshot) for module, _, _, _, where, snapshot in plan])
        # every state array the updates will create, made (a file's space reserved) before any parameter
        # is updated: a full disk or too little memory refuses the whole step, not the parameters after
        # the first
        self._reserve_step_state([(module, weight, options) for module, weight, _, options, _, _ in plan])
        try:
            for module, weight, grad, options, _, _ in plan:
                state = self.state.setdefault(module, {})
                with _kept_on_disk_error(state):
                    self._count_rounding_step(state, weight)
                    self._update(state, weight, grad, options)
        finally:
            self._drop_reserved()
        return loss

    # ------------------------------------------------------------------ hooks
    def register_step_pre_hook(self, hook: StepPreHook) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, run before every ``step()`` of this optimizer
        (after the hooks of every optimizer, :func:`register_optimizer_step_pre_hook`). It returns
        None, or new ``(args, kwargs)`` for ``step``. A fused backward + update
        (``module.backward(..., optimizer=opt)``) has no moment between the gradient and the update for
        a pre-hook to run in (no ``.grad`` to read or clip): with pre-hooks registered it is refused
        (``ValueError``, nothing updated).

        Returns
        -------
        RemovableHandle
            ``handle.remove()`` takes the hook out.

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> handle = opt.register_step_pre_hook(lambda optimizer, args, kwargs: print("step", len(args)))
        >>> opt.step()
        step 1
        """
        return add_hook(self._step_pre_hooks, hook)

    def register_step_post_hook(self, hook: StepPostHook) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs)``, run after every ``step()`` and every fused
        backward + update of this optimizer that completed (before the hooks of every optimizer; a
        fused update gives ``args = (optimizer,)``, ``kwargs = {}``).

        Returns
        -------
        RemovableHandle

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> steps = []
        >>> handle = opt.register_step_post_hook(lambda optimizer, args, kwargs: steps.append(1))
        >>> opt.step(); opt.step(); len(steps)
        2
        """
        return add_hook(self._step_post_hooks, hook)

    def register_state_dict_pre_hook(self, hook: Callable[[Any], None], prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer)``, run before :meth:`state_dict` builds its dict (first with
        ``prepend``). The state dict hooks are the dict calls' only: :meth:`save` / :meth:`load` and
        checkpoints write and read files without them.

        Returns
        -------
        RemovableHandle

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> handle = opt.register_state_dict_pre_hook(lambda optimizer: print("saving"))
        >>> _ = opt.state_dict()
        saving
        """
        return add_hook(self._state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable[[Any, Dict[str, Any]], Any],
                                      prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict)``, run on the dict :meth:`state_dict` built: a dict it
        returns replaces it (None: keep it, changed in place or not).

        Returns
        -------
        RemovableHandle

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> handle = opt.register_state_dict_post_hook(lambda optimizer, sd: {**sd, "note": "epoch 3"})
        >>> opt.state_dict()["note"]
        'epoch 3'
        """
        return add_hook(self._state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable[[Any, Dict[str, Any]], Any],
                                          prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict)``, run first in :meth:`load_state_dict` on a shallow
        copy of the dict given: a dict it returns is loaded instead (None: the copy, as it left it).
        What is loaded is then checked as always.

        Returns
        -------
        RemovableHandle

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> sd = {**opt.state_dict(), "note": "epoch 3"}
        >>> handle = opt.register_load_state_dict_pre_hook(
        ...     lambda optimizer, sd: {k: v for k, v in sd.items() if k != "note"})
        >>> opt.load_state_dict(sd)
        """
        return add_hook(self._load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable[[Any], None], prepend: bool = False) -> RemovableHandle:
        """Register ``hook(optimizer)``, run after :meth:`load_state_dict` has loaded a state.

        Returns
        -------
        RemovableHandle

        Examples
        --------
        >>> import cembed
        >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
        >>> handle = opt.register_load_state_dict_post_hook(lambda optimizer: print("loaded"))
        >>> opt.load_state_dict(opt.state_dict())
        loaded
        """
        return add_hook(self._load_state_dict_post_hooks, hook, prepend)

    def _run_step_pre_hooks(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        """The step pre-hooks of every optimizer, then this one's: the step's (args, kwargs) as they
        leave them."""
        for hook in (*global_step_pre_hooks.values(), *self._step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{hook!r} must return None or a tuple of (new_args, new_kwargs), "
                                       f"but got {result!r}.")
                args, kwargs = result
        return args, kwargs

    def _stepped(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """After a completed step or fused update: noted for the learning-rate schedulers (they warn
        when they step before the optimizer has), then this optimizer's post-hooks and every
        optimizer's."""
        self._opt_called = True
        for hook in (*self._step_post_hooks.values(), *global_step_post_hooks.values()):
            hook(self, args, kwargs)

    def _group_options(self) -> List[Tuple[int, Group, List[Any]]]:
        """``(g, options, params)`` of every group, all options converted first: converting them is
        where code of the caller's may run (a ``__float__``), and it must not run between the checks
        of the arrays and their updates (:meth:`step`, ``SparseAdamW.apply_pending_decay``)."""
        return [(g, self._check_options(dict(group), f"param_groups[{g}]"), list(group["params"]))
                for g, group in enumerate(self.param_groups)]

    def _confirm_checked(self, checked: List[Tuple[Any, str, Tuple[Any, ...]]]) -> None:
        """Just before the first update: every module's weight, gradient and state is still what was
        checked (``(module, where, _snapshot)`` each: :func:`_check_unchanged`), and no two modules of
        the optimizer share memory with them (:meth:`_check_apart`)."""
        for module, where, snapshot in checked:
            _check_unchanged(self, module, snapshot, where)
        self._check_apart([module for module, _, _ in checked])

    def _state_files_for_step(self, state: Dict[str, Any], weight: np.ndarray,
                              options: Group) -> List[Tuple[str, bool, Any]]:
        """The per-row state arrays a step of this parameter will create with :meth:`_new_state`, as
        ``(key, per_row, dtype)`` (dtype None: the group's float state dtype); default none. With a
        ``state_dir`` :meth:`step` reserves their files before it updates any parameter (a test checks
        that every optimizer names all it creates)."""
        return []

    def _reserve_step_state(self, plan: List[Tuple[Any, np.ndarray, Group]]) -> None:
        """Make every state array the planned updates will create before anything else changes (no
        state refers to them yet), so that what can fail for want of disk, memory or address space
        fails before the first parameter is updated. With a ``state_dir``: reserve
        (``storage.reserve_zeros``), map (``storage.map_reserved``) and rename into place their files
        (on an error the files made so far are removed and the error raised); without: allocate them
        (a ``MemoryError`` for a table too big for memory). :meth:`_new_state` then takes them."""
        self._reserved = {}
        if self.state_dir is None:
            self._reserved_memory = {}
            new_dicts = []   # the parameters given a state dict here (the update's own: it would make it there)
            try:
                for module, weight, options in plan:
                    if module not in self.state:
                        new_dicts.append(module)
                    state = self.state.setdefault(module, {})
                    for key, per_row, dtype in self._state_files_for_step(state, weight, options):
                        self._reserved_memory[(id(state), key)] = storage.aligned_zeros(
                            *self._state_layout(weight, per_row, dtype, options))
            except BaseException:
                for module in new_dicts:
                    del self.state[module]
                self._reserved_memory = None
                raise
            return
        try:
            for module, weight, options in plan:
                state = self.state.get(module) or {}
                for key, per_row, dtype in self._state_files_for_step(state, weight, options):
                    shape, dtype = self._state_layout(weight, per_row, dtype, options)
                    path = self._state_path(module, key)
                    tmp = storage.reserve_zeros(path, shape, dtype)
                    try:
                        self._reserved[path] = (tmp, storage.map_reserved(tmp, path, dtype))
                    except BaseException:
                        storage.discard_reserved(tmp)
                        raise
            for path, (made, array) in self._reserved.items():
                if made is not None:
                    storage.rename_into_place(made, path, sync_directory=False)
                self._reserved[path] = (None, array)
        except BaseException:
            self._drop_reserved()
            raise

    def _drop_reserved(self) -> None:
        """Remove the reserved files no update took (all of them when the step was refused): a
        temporary, or a file already in place that no state refers to; drop the arrays reserved in
        memory."""
        self._reserved_memory = None
        reserved, self._reserved = self._reserved or {}, None
        for path, (tmp, _) in reserved.items():
            storage.discard_reserved(tmp if tmp is not None else path)

    def _check_state_for(self, state: Optional[Dict[str, Any]], weight: np.ndarray, options: Group,
                         where: str) -> None:
        """Everything :meth:`_check_state` checks (on the state without the base class's
        ``rounding_step``), the group's ``state_dtype`` against the weight and the state arrays."""
        expected = rounding_.state_dtype(weight.dtype, options, where)
        if state is not None and type(state) is not dict:
            raise ValueError(f"{where}: optimizer state must be a dict, got {type(state).__name__} (a subclass's "
                             "methods would run between the checks and the update)")
        if state is None:
            if self._state_at_join:
                raise ValueError(f"{where}: optimizer state is missing ({type(self).__name__} makes it when a "
                                 "parameter joins; was it deleted? load a state dict or build a new optimizer)")
            return
        for key in state:
            _check_key(key, f"{where}: optimizer state")
        if STEP_KEY in state:
            if not is_half(weight.dtype):
                raise ValueError(f"{where}: optimizer state {STEP_KEY!r} belongs to a 16-bit table, the weight is "
                                 f"{weight.dtype}")
            counter = state[STEP_KEY]   # exactly an int type: a subclass's or object's __index__ would run in the update
            if type(counter) not in EXACT_INTEGER_TYPES or not 0 <= counter <= _STEP_MAX:
                raise ValueError(f"{where}: optimizer state {STEP_KEY!r} must be an int in [0, 2**63 - 1] (a Python int "
                                 f"or a NumPy integer, not a subclass), got {type(counter).__name__}")
            if int(counter) >= _STEP_MAX:   # the next update's random keys would repeat the last one's
                raise ValueError(f"{where}: optimizer state {STEP_KEY!r} is at its bound 2**63 - 1: no further "
                                 "update can get new random bits")
        self._check_state(_core(state), weight, where)
        arrays = [("the weight", weight)] + [(f"optimizer state {k!r}", v) for k, v in state.items()
                                             if isinstance(v, np.ndarray) and v.size]
        shared = storage.first_overlap([a for _, a in arrays])   # each array the update writes is its own
        if shared is not None:
            raise ValueError(f"{where}: {arrays[shared[1]][0]} shares memory with {arrays[shared[0]][0]}: each must "
                             "be its own array")
        for name in self._float_states():
            arr = state.get(name)
            if isinstance(arr, np.ndarray) and arr.dtype != expected:
                raise ValueError(f"{where}: optimizer state {name!r} is {arr.dtype} but the group's state_dtype asks "
                                 f"for {expected} (build a new optimizer to change the state dtype)")

    def _check_apart(self, updated: List[Any]) -> None:
        """ValueError when two parameters' states are one dict, or when an array an update of the
        modules ``updated`` writes (a weight, a state array) shares memory with another module's weight
        or state in this optimizer (within one module :meth:`_check_state_for` checks): each module's
        update must leave the others alone."""
        dicts: Dict[int, str] = {}   # one state dict per parameter: a second's update would use the arrays the
        for where, module in self._named_params():   # first one's made in it (of that parameter's shape)
            state = self.state.get(module)
            if state is not None:
                if id(state) in dicts:
                    raise ValueError(f"{where}: its optimizer state is the same dict as the state of {dicts[id(state)]}: "
                                     "each parameter's state must be its own dict")
                dicts[id(state)] = where
        written = {id(m) for m in updated}
        tagged = [((where, module, name), arr) for where, module in self._named_params()
                  for name, arr in [("weight", module.weight)] + [(f"state {k!r}", v) for k, v in
                                                                  (self.state.get(module) or {}).items()]
                  if isinstance(arr, np.ndarray) and arr.size]
        owners = [module for (_, module, _), _ in tagged]

        def across_written(i: int, j: int) -> bool:   # two modules' arrays, one of them updated now
            return owners[i] is not owners[j] and (id(owners[i]) in written or id(owners[j]) in written)

        shared = storage.first_overlap([arr for _, arr in tagged], across_written)
        if shared is not None:
            (where_a, _, name_a), (where_b, _, name_b) = tagged[shared[0]][0], tagged[shared[1]][0]
            raise ValueError(f"{where_a}: its {name_a} shares memory with the {name_b} of {where_b}: "
                             "each parameter's weight and state must be its own memory")

    def _check_advance(self, state: Dict[str, Any], where: str) -> None:
        """ValueError, before any update, when the step about to run would take one of ``state``'s
        counters past its bound (a checked state; default: no counter to check)."""

    def _float_states(self) -> Tuple[str, ...]:
        """The names of the per-row float state arrays (whose dtype ``state_dtype`` decides)."""
        return self._state_arrays + self._row_float_states

    @staticmethod
    def _count_rounding_step(state: Dict[str, Any], weight: np.ndarray) -> None:
        """One more update of a 16-bit weight: the step of its random key (docs/behaviour.md §8.7)."""
        if is_half(weight.dtype):
            state[STEP_KEY] = min(int(state.get(STEP_KEY, 0)) + 1, _STEP_MAX)

    @staticmethod
    def _rounding_for(state: Dict[str, Any], weight: np.ndarray, options: Group) -> Optional[Rounding]:
        """How this update stores into the 16-bit arrays of ``weight`` (None for a float32/float64
        table)."""
        if not is_half(weight.dtype):
            return None
        return Rounding(options["rounding"] == "stochastic", options["seed"], state.get(STEP_KEY, 0),
                        options.get("rounding_rows", (0, 1)))

    def _check_weight(self, module: Any, where: str) -> np.ndarray:
        weight = _checked_table(module.weight, f"{where}.weight")
        check_exact_array(weight, f"{where}.weight")
        if not weight.flags.writeable:
            raise ValueError(f"{where}.weight is read-only")
        check_distinct_elements(weight, "the optimizer's update", f"{where}.weight")
        return weight

    def _check_grad(self, options: Group, grad: Any, weight: np.ndarray, where: str) -> None:
        gdtype = compute_dtype(weight.dtype)  # float32 gradients for 16-bit tables
        check_exact_sparse_grad(grad, f"{where}.grad")
        if isinstance(grad, SparseGrad):
            if grad.shape != weight.shape:
                raise ValueError(f"{where}: gradient shape {grad.shape} does not match the weight shape {weight.shape}")
            if grad.dtype != gdtype:
                raise TypeError(_gradient_dtype_message(where, grad.dtype, weight.dtype, gdtype))
            check_row_ids(grad.indices, weight.shape[0], f"{where}.grad.indices")
            if not grad.values.flags.c_contiguous:
                raise ValueError(f"{where}.grad.values must be C-contiguous")
        elif isinstance(grad, np.ndarray):
            check_exact_array(grad, f"{where}.grad")
            if grad.shape != weight.shape:
                raise ValueError(f"{where}: gradient shape {grad.shape} does not match the weight shape {weight.shape}")
            if grad.dtype != gdtype:
                raise TypeError(_gradient_dtype_message(where, grad.dtype, weight.dtype, gdtype))
        else:
            raise TypeError(f"{where}.grad must be a numpy array or a cembed.SparseGrad, got {type(grad).__name__}")
        if self._dense_alternative is not None and not isinstance(grad, SparseGrad):
            raise TypeError(f"{type(self).__name__} does not support dense gradients, please consider "
                            f"{self._dense_alternative} instead (torch's words; {where}.grad is a dense array: build "
                            "the module with sparse=True, or use SGD, Adagrad or RowWiseAdagrad, which cembed also "
                            "has for dense gradients)")

    def _check_state(self, state: Dict[str, Any], weight: np.ndarray, where: str) -> None:
        """Every state entry against the weight as it is now (shape, dtype, layout), so a kernel
        never meets an array it cannot index safely."""
        allowed = rounding_.allowed_state_dtypes(weight.dtype)
        for name in self._state_arrays:
            arr = state.get(name)
            if arr is None:
                continue
            if isinstance(arr, np.ndarray):
                check_exact_array(arr, f"{where}: optimizer state {name!r}")
            if not isinstance(arr, np.ndarray) or arr.shape != weight.shape or arr.dtype not in allowed:
                got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ValueError(f"{where}: optimizer state {name!r} is {got}, expected {weight.shape} {allowed[0]} "
                                 "like the weight (was the weight replaced? build a new optimizer for it)")
            if not (arr.flags.c_contiguous and arr.flags.writeable and arr.flags.aligned):
                raise ValueError(f"{where}: optimizer state {name!r} must be a writeable C-contiguous array")

    # ------------------------------------------------------------------ updates
    def _update(self, state: Dict[str, Any], weight: np.ndarray, grad: Any, options: Group) -> None:
        """One parameter's update, everything checked. A sparse gradient goes through the row hooks:
        :meth:`_sparse_begin` once, then :meth:`_sparse_rows` on its rows."""
        if not isinstance(grad, SparseGrad):
            if is_half(weight.dtype):
                self._dense_update_half(state, weight, grad, options)
            else:
                self._dense_update(state, weight, grad, options)
            return
        prepared = self._sparse_begin(state, weight, options)
        if grad.nnz:
            self._sparse_rows(state, weight, grad.indices, grad.values, options, prepared)

    def _sparse_begin(self, state: Dict[str, Any], weight: np.ndarray, options: Group) -> Any:
        """Per-step work of one parameter before any of its rows is updated (state creation, step
        counters, step sizes); returns what :meth:`_sparse_rows` needs."""
        return None

    def _sparse_rows(self, state: Dict[str, Any], weight: np.ndarray, rows: np.ndarray, values: np.ndarray,
                     options: Group, prepared: Any) -> None:
        """Update the distinct, validated ``rows`` with their summed gradient ``values``. Every row's
        update depends on that row alone, so the rows may come in several calls (the fused backward
        sends them chunk by chunk) with the same result. Default: the kernel of :meth:`_row_rule`."""
        rule = self._row_rule(state, weight, options, prepared)
        if rule is None:
            raise NotImplementedError(f"{type(self).__name__} has no row rule")
        arrays = rule.arrays()   # the states, row_log, counts (None where absent)
        present = [a for a in arrays if a is not None]
        rounding = self._rounding_for(state, weight, options)

        def half_kernel(bits: np.ndarray, weight_fmt: int, rounding_args: RoundingArgs) -> None:
            state_a, state_b, row_state, state_fmt = rounding_.fused_state_views(rule.states)
            row_log, counts, rule_params = rule.rule_args()
            p0, p1, p2, p3 = rule.params
            stochastic, seed, step, key_first, key_stride = rounding_args
            _optim.update_rows_half(rule.kind, bits, weight_fmt, state_a, state_b, row_state, state_fmt, row_log,
                                    counts, rule_params, rows, values, p0, p1, p2, p3, rule.mode, rule.maximize,
                                    stochastic, seed, step, key_first, key_stride,
                                    n_threads_for(rows.size, "optimizer"))

        def kernel(w: np.ndarray, blocks: List[np.ndarray], kernel_rows: np.ndarray) -> None:
            # the gathered rows: each present array's block in the order of `arrays`
            it = iter(blocks)
            a, b, row_state, row_log, counts = (next(it) if x is not None else None for x in arrays)
            block_rule = rule._replace(states=(a, b, row_state), row_log=row_log, counts=counts)
            p0, p1, p2, p3 = rule.params
            _optim.update_rows(rule.kind, w, *block_rule.kernel_args(w.dtype), kernel_rows, values, p0, p1, p2, p3,
                               rule.mode, rule.maximize, n_threads_for(kernel_rows.size, "optimizer"))

        _update_rows(weight, present, rows, kernel, rounding, half_kernel=half_kernel)

    def _dense_update(self, state: Dict[str, Any], weight: np.ndarray, grad: np.ndarray, options: Group) -> None:
        raise NotImplementedError

    def _dense_update_half(self, state: Dict[str, Any], weight: np.ndarray, grad: np.ndarray, options: Group) -> None:
        """A dense gradient on a 16-bit table: :meth:`_dense_update` on float32 copies of the weight and
        of its 16-bit state (new state arrays made in float32), then every element rounded once into
        the weight (stream 0) and the state (array ``i`` of :meth:`_float_states` on stream 1 + i)."""
        rounding = self._rounding_for(state, weight, options)
        assert rounding is not None
        target = rounding_.state_dtype(weight.dtype, options, "state")
        names = self._float_states()
        work = dict(state)
        for name in names:
            if isinstance(work.get(name), np.ndarray):
                work[name] = rounding_.widen(work[name])
        block = rounding_.widen(weight)
        self._scratch_state = work      # state the update creates: float32 scratch arrays, in memory
        try:
            self._dense_update(work, block, grad, dict(options, state_dtype=None))
        finally:
            self._scratch_state = None
        rows = np.arange(weight.shape[0], dtype=np.int64)
        for i, name in enumerate(names):
            values = work.get(name)
            if not isinstance(values, np.ndarray):
                continue
            arr = state.get(name)
            if values.dtype == target:   # float32 state: updated in place, or made by this update
                if isinstance(arr, np.ndarray) and arr.dtype == target:
                    if not np.may_share_memory(arr, values):
                        arr[...] = values
                    work[name] = arr         # the state's own array (a state_dir memmap stays one)
                elif self.state_dir is not None:
                    # made by this update in memory: into its file in state_dir (the same bits)
                    arr = self._new_state(state, name, weight, options=options)
                    arr[...] = values
                    work[name] = arr
                continue
            if not isinstance(arr, np.ndarray) or arr.dtype != target:
                arr = self._new_state(state, name, weight, options=options)   # in state_dir when there is one
            rounding.store(arr, rows, values, 1 + i)
            work[name] = arr
        rounding.store(weight, rows, block, rounding_.STREAM_WEIGHT)
        state.update(work)

    def _rows_independent(self, options: Group) -> bool:
        """Whether a sparse step touches only the gradient's rows, each on its own (SGD's momentum
        does not: it also moves rows the gradient does not name)."""
        return True

    # ------------------------------------------------------------------ fused backward + update
    def _locate(self, module: Any) -> Tuple[Group, str, str]:
        """(the module's group, that group's name, the module's name) — ValueError if absent."""
        for g, group in enumerate(self.param_groups):
            for k, candidate in enumerate(group["params"]):
                if candidate is module:
                    return group, f"param_groups[{g}]", f"param_groups[{g}]['params'][{k}]"
        raise ValueError(f"the optimizer does not hold this {type(module).__name__}: pass the optimizer that "
                         "was built with it")

    def _fused_step(self, module: Any, contributions: Any, sparse: bool,
                    checked: Optional[Tuple[np.ndarray, Tuple[Any, ...]]] = None) -> None:
        """The update of ``module`` alone by the gradient ``contributions`` (from the module's
        backward, whose indices were checked against the table of ``checked`` = (table, its
        ``array_key`` then): the module's weight must still be that array, as it was), without
        materialising that gradient when the rows can be updated chunk by chunk. Bitwise equal to
        ``module.grad = <gradient>; step(); zero_grad()`` for this module; the step post-hooks run after
        it (``args = (optimizer,)``, ``kwargs = {}``), and an optimizer with step pre-hooks refuses it
        (:meth:`_check_no_step_pre_hooks`)."""
        self._check_no_step_pre_hooks()
        self._fused_update(module, contributions, sparse, checked)
        self._stepped((self,), {})

    def _check_no_step_pre_hooks(self) -> None:
        """ValueError when a step pre-hook (this optimizer's, or every optimizer's) is registered: a
        pre-hook runs between a gradient and its update — it may read or clip ``.grad``, change the
        weights or the learning rate — and a fused backward + update has no such moment (no ``.grad``;
        the gradient is made while the rows are updated). Run in a fused update it would see no
        gradient, and could change arrays the update is reading: refused, before anything is done."""
        if global_step_pre_hooks or self._step_pre_hooks:
            raise ValueError("this optimizer has step pre-hooks, which run between a gradient and its update: a "
                             "fused backward + update has no such moment (no .grad). Use backward() then step(), "
                             "or a step post-hook; nothing was updated")

    def _fused_update(self, module: Any, contributions: Any, sparse: bool,
                      checked: Optional[Tuple[np.ndarray, Tuple[Any, ...]]]) -> None:
        self._check_params()
        group, group_name, where = self._locate(module)
        options = self._check_options(dict(group), group_name)
        weight = self._check_weight(module, where)
        if checked is not None and not is_as_checked(weight, checked):
            raise ValueError(f"{where}: the weight was replaced while the backward ran (by code run from an "
                             "option or argument); nothing was updated")
        snapshot = _snapshot(self, module, weight, module.grad)
        shape, dtype = weight.shape, weight.dtype
        # gradient rows that are views of what the update writes (the weight, this module's state) are
        # read from a copy, and the entries are checked and grouped: nothing below that can fail on
        # them runs after the state has changed
        contributions = contributions.apart_from(weight, *(v for v in (self.state.get(module) or {}).values()
                                                           if isinstance(v, np.ndarray)))
        contributions.check_consistent()
        chunked = sparse and self._rows_independent(options) and hasattr(contributions, "chunks")
        if chunked:
            probe = SparseGrad._from_private(np.zeros(0, dtype=np.int64),
                                             np.zeros((0, shape[1]), dtype=compute_dtype(dtype)), shape[0])
            self._check_grad(options, probe, weight, where)
        else:
            grad = contributions.sparse(shape[0]) if sparse else contributions.dense(shape[0])
            self._check_grad(options, grad, weight, where)
        self._check_state_for(self.state.get(module), weight, options, where)
        self._check_advance(_core(self.state.get(module) or {}), where)
        self._confirm_checked([(module, where, snapshot)])   # as step(): what was checked is what is updated
        self._reserve_step_state([(module, weight, options)])   # as step(): before anything changes
        try:
            state = self.state.setdefault(module, {})
            with _kept_on_disk_error(state):
                self._count_rounding_step(state, weight)
                if not chunked:
                    self._update(state, weight, grad, options)
                    return
                prepared = self._sparse_begin(state, weight, options)
        finally:
            self._drop_reserved()
        rounding = self._rounding_for(state, weight, options)
        in_place = _in_place(weight) if rounding is None else rounding_.half_in_place(weight)
        one_pass = self._row_rule(state, weight, options, prepared) if in_place else None
        if one_pass is not None and rounding is not None and hasattr(contributions, "update_rows_half"):
            *views, state_fmt = rounding_.fused_state_views(one_pass.states)
            contributions.update_rows_half(weight.view(np.uint16), kernel_format(weight.dtype), one_pass, tuple(views),
                                           state_fmt, *rounding.fused())
            return
        if one_pass is not None and rounding is None and hasattr(contributions, "update_rows"):
            contributions.update_rows(weight, one_pass)
            return
        for rows, values in contributions.chunks():
            self._sparse_rows(state, weight, rows, values, options, prepared)

    def _row_rule(self, state: Dict[str, Any], weight: np.ndarray, options: Group,
                  prepared: Any) -> Optional[RowRule]:
        """This optimizer's row update as a :class:`cembed.functional.RowRule` — a ``_grad.UpdateKind``
        and its parameters and per-row arrays (``_rows.pxd``, ``apply_row_update``), run by
        ``_optim.update_rows`` on a sparse gradient's rows and by ``_grad.segment_update`` in the fused
        backward, so both paths give the same bits; it is made after :meth:`_sparse_begin`, from state
        checked in the same call. Every cembed optimizer has one (SGD's momentum moves rows the gradient
        does not name and goes through :meth:`_update` instead); a subclass whose rule is not one of
        these kinds returns None and overrides :meth:`_sparse_rows`, and the fused backward then sends
        it the summed rows chunk by chunk."""
        return None

    # ------------------------------------------------------------------ state dicts
    def _index_of(self) -> Dict[int, int]:
        return {id(m): i for i, (_, m) in enumerate(self._named_params())}

    def state_dict(self) -> Dict[str, Any]:
        """torch's layout: ``{"state": {index: {...}}, "param_groups": [{options..., "params": [indices]}]}``.

        Parameters are numbered across all groups in order; parameters without state have no entry.
        Everything is a deep copy.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> a, b = cembed.Embedding(4, 2, sparse=True), cembed.Embedding(4, 2, sparse=True)
        >>> opt = cembed.optim.SparseAdam([{"params": [a]}, {"params": [b], "lr": 0.1}])
        >>> b.backward(np.ones((1, 2), np.float32), np.array([0])); opt.step()
        >>> sd = opt.state_dict()
        >>> [g["params"] for g in sd["param_groups"]], list(sd["state"]), sd["state"][1]["step"]
        ([[0], [1]], [1], 1)
        """
        run_hooks(self._state_dict_pre_hooks, self)
        return run_replacing_hooks(self._state_dict_post_hooks, self, self._unhooked_state_dict())

    def _unhooked_state_dict(self) -> Dict[str, Any]:
        self._check_params()
        index = self._index_of()
        groups = []
        for group in self.param_groups:
            packed = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(m)] for m in group["params"]]
            groups.append(packed)
        state = {index[id(m)]: copy.deepcopy(entry) for m, entry in self.state.items()
                 if id(m) in index and entry}
        return {"state": dict(sorted(state.items())), "param_groups": groups}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (deep copies).

        The whole state is checked first with the constructor's rules — group layout, every option,
        every state entry against its parameter's current weight — and on any error nothing changes.
        Options added in later versions (``maximize``, ...) that an older state dict lacks take the
        defaults, as in torch; any other missing option is an error.

        Raises
        ------
        ValueError
            A state dict that does not fit this optimizer, naming what is wrong.

        Examples
        --------
        >>> import numpy as np, cembed
        >>> emb = cembed.Embedding(4, 2, sparse=True)
        >>> opt = cembed.optim.Adagrad([emb], lr=0.1)
        >>> sd = opt.state_dict()
        >>> sd["state"][0]["sum"] = np.zeros((3, 2), np.float32)     # not the table's shape
        >>> opt.load_state_dict(sd)
        Traceback (most recent call last):
        ...
        ValueError: state_dict state[0]['sum'] has shape (3, 2) and dtype float32, expected (4, 2) float32
        """
        if isinstance(state_dict, dict):
            state_dict = state_dict.copy()   # (shallow, as torch: what the pre-hooks see and change)
        self._unhooked_load_state_dict(run_replacing_hooks(self._load_state_dict_pre_hooks, self, state_dict))
        run_hooks(self._load_state_dict_post_hooks, self)

    def _unhooked_load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        try:
            saved_state = state_dict["state"]
            saved_groups = state_dict["param_groups"]
        except (TypeError, KeyError):
            raise ValueError("state_dict must have 'state' and 'param_groups' entries") from None
        if not isinstance(saved_groups, (list, tuple)) or len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups) if isinstance(saved_groups, (list, tuple)) else '?'} "
                             f"parameter groups, the optimizer has {len(self.param_groups)}")
        modules = [m for _, m in self._named_params()]
        new_groups = []
        seen: set = set()
        for g, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if not isinstance(saved, dict):
                raise ValueError(f"state_dict param_groups[{g}] must be a dict")
            ids = saved.get("params")
            if not isinstance(ids, (list, tuple)) or len(ids) != len(group["params"]):
                raise ValueError(f"loaded state dict contains a parameter group ({g}) that doesn't match the size "
                                 "of optimizer's group")
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(modules) or i in seen:
                    raise ValueError(f"state_dict param_groups[{g}]['params'] has a bad or repeated index {i!r}")
                seen.add(int(i))
            missing = set(self.defaults) - set(saved) - set(self._optional_options) - set(ROUNDING_OPTIONS)
            if missing:
                raise ValueError(f"state_dict param_groups[{g}] lacks {sorted(missing)}")
            options = dict(self.defaults)
            options.update({k: copy.deepcopy(v) for k, v in saved.items() if k != "params"})
            options = self._check_options(options, f"state_dict param_groups[{g}]")
            for k, module in enumerate(group["params"]):
                rounding_.state_dtype(module.weight.dtype, options, f"state_dict param_groups[{g}]['params'][{k}]")
            options["params"] = group["params"]
            new_groups.append((options, [int(i) for i in ids]))
        if not isinstance(saved_state, dict):
            raise ValueError("state_dict 'state' must be a dict")
        by_saved_index = {}
        for options, ids in new_groups:
            for i, module in zip(ids, options["params"]):
                by_saved_index[i] = (module, options)
        # first everything that may run code of the caller's (copying the entries' values, converting
        # the rounding counters), then the checks: nothing can change an array between its check and
        # its copy (with a state_dir the arrays are copied into the state files after all the checks)
        copied = []
        keys: Dict[int, Any] = {}
        for key, entry in saved_state.items():
            i = _param_index(key, "state_dict state", keys)
            if i not in by_saved_index:
                raise ValueError(f"state_dict has state for parameter {i}, which does not exist")
            if not isinstance(entry, dict):
                raise ValueError(f"state_dict state[{i}] must be a dict")
            entry = _copy_entry(entry, f"state_dict state[{i}]")
            has_rounding_step = STEP_KEY in entry   # (present with None is malformed, not absent)
            rounding_step = entry.pop(STEP_KEY, None)
            if has_rounding_step:
                rounding_step = check_int(rounding_step, f"state_dict state[{i}][{STEP_KEY!r}]", low=0,
                                          high=_STEP_MAX - 1)   # (at the bound no update could follow)
            copied.append((i, entry, has_rounding_step, rounding_step))
        new_state: Dict[Any, Dict[str, Any]] = {}
        for i, entry, has_rounding_step, rounding_step in copied:
            module, options = by_saved_index[i]
            weight = _checked_table(module.weight, f"parameter {i}.weight")
            entry = self._load_state_entry(entry, weight, options, f"state_dict state[{i}]")
            if entry:
                self._check_values(entry, f"state_dict state[{i}]")
            if has_rounding_step:
                if not is_half(weight.dtype):
                    raise ValueError(f"state_dict state[{i}][{STEP_KEY!r}] belongs to a 16-bit table, parameter {i} "
                                     f"is {weight.dtype}")
                entry[STEP_KEY] = rounding_step
            new_state[module] = entry
        new_state = {m: e for m, e in new_state.items() if e}
        self._fill_missing_state(new_state, [g for g, _ in new_groups])
        def install() -> None:
            self.param_groups = [g for g, _ in new_groups]
            self.state = new_state
        if self.state_dir is not None:
            self._move_to_state_dir(new_state, self._index_of(), install)
        else:
            install()

    def _fill_missing_state(self, state: Dict[Any, Dict[str, Any]], groups: List[Group]) -> None:
        """Parameters without saved state start without state (created at their first step)."""

    #: The state arrays that accumulate squares: no value below 0 (:meth:`_check_values`).
    _accumulators: Tuple[str, ...] = ()

    def _check_values(self, entry: Dict[str, Any], where: str) -> None:
        """The O(n) checks of a state entry's values, its structure already checked: every
        accumulator >= 0 (subclasses add their own). Made on a state being loaded (on what is kept)
        and on the live state before :meth:`save` or a checkpoint writes it, so that no file holds a
        state that :meth:`load` refuses."""
        for name in self._accumulators:
            if isinstance(entry.get(name), np.ndarray):
                _check_accumulator(entry[name], f"{where}[{name!r}]")

    def _load_state_entry(self, entry: Dict[str, Any], weight: np.ndarray, options: Group,
                          where: str) -> Dict[str, Any]:
        """One parameter's saved state, checked and converted (private C-contiguous copies)."""
        expected = rounding_.state_dtype(weight.dtype, options, where)
        for name in self._state_arrays:
            if name in entry and entry[name] is not None:
                arr = entry[name]
                if not isinstance(arr, np.ndarray) or arr.shape != weight.shape or arr.dtype != expected:
                    got = f"shape {arr.shape} and dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
                    raise ValueError(f"{where}[{name!r}] has {got}, expected {weight.shape} {expected}")
                # a private copy; with state_dir the copy is made into the state file at commit
                entry[name] = arr if self.state_dir is not None else storage.aligned_copy(arr)
        return entry

    # ------------------------------------------------------------------ files
    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write :meth:`state_dict` to ``path`` (NumPy ``.npz``, no pickle), crash-safely.

        The options and the state of every parameter are checked first with :meth:`step`'s rules
        and :meth:`load`'s checks of the values (a state that :meth:`step` or :meth:`load` would
        refuse is a ``ValueError``); the arrays are then streamed into a temporary file next to
        ``path`` (no in-memory copy of the state), synced to disk and renamed over ``path``: a failed
        or interrupted save leaves the previous file as it was.

        Examples
        --------
        >>> import os, tempfile, numpy as np, cembed
        >>> emb = cembed.Embedding(5, 2, sparse=True, seed=0)
        >>> opt = cembed.optim.SparseAdam([emb], lr=0.1)
        >>> path = os.path.join(tempfile.mkdtemp(), "opt.npz")
        >>> opt.save(path)
        >>> opt.load(path)
        """
        meta, arrays = self._serialized()
        meta_bytes = json.dumps(meta, allow_nan=True).encode()
        arrays["__meta__"] = np.frombuffer(meta_bytes, dtype=np.uint8)
        # streamed into the file array by array (bounded memory for state on disk)
        storage.write_atomically(path, lambda fh: np.savez(fh, **arrays))  # type: ignore[arg-type]

    def _serialized(self) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
        """(JSON-able description, arrays by name) of the whole state, without copying any array:
        what :meth:`save` writes and what :func:`cembed.save_checkpoint` stores. The description is
        ``{"format", "class", "param_groups": [options..., "params": [indices]], "state": {index:
        {name: {"array": name, "scalar": bool} | {"value": v}}}}``; the arrays are named
        ``"<index>/<name>"``. Options are re-checked (plain floats, or refused here), and so is the
        state of every parameter, with the rules of :meth:`step`: what is saved is a state that
        :meth:`load` and :meth:`step` accept (ValueError otherwise, before anything is written)."""
        index = self._index_of()
        groups = []
        for g, group in enumerate(self.param_groups):
            options = self._check_options({k: copy.deepcopy(v) for k, v in group.items() if k != "params"},
                                          f"param_groups[{g}]")
            for k, module in enumerate(group["params"]):
                where = f"param_groups[{g}]['params'][{k}]"
                state = self.state.get(module)
                if state or self._state_at_join:   # (a state made at join must be there: load needs it)
                    self._check_state_for(state, _checked_table(module.weight, f"{where}.weight"), options, where)
                if state:
                    self._check_values(_core(state), f"{where} state")
            options["params"] = [index[id(m)] for m in group["params"]]
            groups.append(options)
        arrays: Dict[str, np.ndarray] = {}
        meta_state: Dict[str, Dict[str, Any]] = {}
        for module, entry in self.state.items():
            if id(module) not in index or not entry:
                continue
            i = index[id(module)]
            meta_state[str(i)] = {}
            for name, value in entry.items():
                if isinstance(value, np.ndarray) and is_half(value.dtype):
                    # in its file form (storage.to_file: bfloat16 as uint16 bits), the dtype recorded
                    arrays[f"{i}/{name}"] = storage.to_file(value)
                    meta_state[str(i)][name] = {"array": f"{i}/{name}", "scalar": False, "dtype": value.dtype.name}
                elif isinstance(value, (np.ndarray, np.generic)):
                    arrays[f"{i}/{name}"] = np.asarray(value)
                    meta_state[str(i)][name] = {"array": f"{i}/{name}", "scalar": isinstance(value, np.generic)}
                else:
                    meta_state[str(i)][name] = {"value": copy.deepcopy(value)}
        meta = {"format": _FORMAT, "class": type(self).__name__, "param_groups": groups,
                "state": dict(sorted(meta_state.items(), key=lambda kv: int(kv[0])))}
        try:
            json.dumps(meta, allow_nan=True)
        except TypeError as exc:
            raise TypeError(f"cannot save the optimizer: a param group option or state value is not a plain "
                            f"number, bool, string or list ({exc})") from None
        return meta, arrays

    @classmethod
    def _deserialized(cls, meta: Any, arrays: Callable[[str], np.ndarray],
                      where: str) -> Tuple[Dict[int, Dict[str, Any]], Any]:
        """The (state, param_groups) of a :meth:`_serialized` description, its arrays fetched by
        ``arrays(name)``; ValueError naming ``where`` when the description is malformed."""
        if not isinstance(meta, dict) or meta.get("format") not in (_FORMAT, None) or "state" not in meta:
            raise ValueError(f"{where}: not a cembed optimizer state")
        if meta.get("class") != cls.__name__:
            raise ValueError(f"{where} holds {meta.get('class')} state, not {cls.__name__}")
        state: Dict[int, Dict[str, Any]] = {}
        keys: Dict[int, Any] = {}
        try:
            for key, entry in meta["state"].items():
                i = _param_index(key, "state", keys)
                state[i] = {}
                for name, spec in entry.items():
                    if "array" in spec:
                        arr = arrays(spec["array"])
                        if "dtype" in spec:   # a 16-bit array in its file form (storage.to_file)
                            arr = _half_from_file(arr, spec["dtype"])
                        state[i][name] = arr[()] if spec["scalar"] else arr
                    else:
                        state[i][name] = spec["value"]
            groups = meta["param_groups"]
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"{where}: malformed optimizer state ({type(exc).__name__}: {exc})") from None
        if isinstance(groups, list):
            for group in groups:
                if isinstance(group, dict) and isinstance(group.get("betas"), list):
                    group["betas"] = tuple(group["betas"])
        return state, groups

    def load(self, path: "os.PathLike[str] | str") -> None:
        """Restore the state written by :meth:`save`, checked like :meth:`load_state_dict`.

        Raises
        ------
        ValueError
            The file is unreadable, not a cembed optimizer file, for another optimizer class, or
            holds a state that does not fit (the message names the file). Nothing changes.

        Examples
        --------
        >>> import os, tempfile, cembed
        >>> path = os.path.join(tempfile.mkdtemp(), "not-a-checkpoint.npz")
        >>> _ = open(path, "w").write("hello")
        >>> cembed.optim.SGD([cembed.Embedding(3, 2)], lr=0.1).load(path)
        Traceback (most recent call last):
        ...
        ValueError: ...not-a-checkpoint.npz: not a readable cembed optimizer file (...)
        """
        path = os.fspath(path)
        try:
            # (a regular file only: a FIFO at the path would block np.load forever)
            with storage.open_regular(path) as fh, np.load(fh, allow_pickle=False) as data:
                _check_members(data, os.fstat(fh.fileno()).st_size)
                meta = json.loads(bytes(data["__meta__"]).decode())
                if not isinstance(meta, dict) or meta.get("format") not in (_FORMAT, None) or "state" not in meta:
                    raise ValueError("not a cembed optimizer file")
                if meta.get("class") != type(self).__name__:
                    raise _WrongClass(f"{path} holds {meta.get('class')} state, not {type(self).__name__}")
                state, groups = self._deserialized(meta, lambda name: data[name], path)
        except FileNotFoundError:
            raise
        except _WrongClass as exc:   # (a plain ValueError for the caller)
            raise ValueError(str(exc)) from None
        except (OSError, ValueError, KeyError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
                UnicodeDecodeError, RuntimeError, NotImplementedError, zlib.error, struct.error) as exc:
            # RuntimeError: JSON nested beyond the parser (RecursionError), a member marked encrypted;
            # NotImplementedError: a damaged member header naming a compression method zipfile cannot
            # read; zlib.error: damaged deflate data
            raise ValueError(f"{path}: not a readable cembed optimizer file ({type(exc).__name__}: {exc})") from None
        try:   # (files, not dicts: as save, without the state dict hooks)
            self._unhooked_load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, TypeError, OverflowError) as exc:   # a malformed file: always a ValueError naming it
            raise ValueError(f"{path}: {exc}") from None


def _check_members(data: Any, archive_bytes: int) -> None:
    """ValueError unless every member of the ``.npz`` ``data`` (a file of ``archive_bytes``) is an
    ``.npy`` array holding as many bytes as its header says, and the archive as many as its directory says: a damaged
    header (and directory entry) claiming a huge shape would otherwise be a MemoryError (or a huge
    allocation) when the member is read. A compressed member may expand at most as deflate can."""
    for info in data.zip.infolist():
        if not info.filename.endswith(".npy"):   # (numpy would read a member 'x' as the array 'x' too)
            raise ValueError(f"member {info.filename} is not an array (.npy): save() writes no other")
        if info.header_offset + info.compress_size > archive_bytes or (
                info.file_size != info.compress_size if info.compress_type == zipfile.ZIP_STORED
                else info.file_size > 1100 * info.compress_size + 4096):
            raise ValueError(f"member {info.filename}: the archive's directory says {info.file_size} bytes "
                             f"({info.compress_size} stored), which the {archive_bytes}-byte file cannot hold")
        with data.zip.open(info) as fh:
            version = npy_format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"member {info.filename}: .npy format {version}, save() writes 1.0 or 2.0")
            read = npy_format.read_array_header_1_0 if version == (1, 0) else npy_format.read_array_header_2_0
            shape, _, dtype = read(fh)
            needed = fh.tell() + math.prod(shape) * dtype.itemsize
        if needed != info.file_size:
            raise ValueError(f"member {info.filename} holds {info.file_size} bytes, its header {shape} {dtype} "
                             f"needs {needed}")


def _half_from_file(stored: np.ndarray, name: Any) -> np.ndarray:
    """A saved 16-bit state array as its dtype ``name`` ("bfloat16" / "float16"): bfloat16 as uint16
    bits, float16 native (or, as files written before float16 was stored natively, uint16 bits)."""
    if name not in ("bfloat16", "float16") or not isinstance(stored, np.ndarray):
        raise ValueError(f"a 16-bit state array must be bfloat16 or float16, got {name!r}")
    if name == "float16" and stored.dtype == np.uint16:
        return stored.view(np.float16)
    try:
        return storage.from_file(stored, name)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def _checked_table(weight: Any, name: str) -> np.ndarray:
    """A trainable table: a 2-D float32, float64, float16 or bfloat16 array in native byte order."""
    if isinstance(weight, np.ndarray) and is_half(weight.dtype):
        if weight.ndim != 2:
            raise ValueError(f"{name} must be 2-D (num_embeddings, embedding_dim), got shape {weight.shape}")
        if not weight.dtype.isnative:
            raise TypeError(f"{name} must be in native byte order, got dtype {weight.dtype.str}")
        return weight
    weight = check_weight(weight, name, numeric=True)
    check_trainable(weight, name)
    return weight


def _check_accumulator(arr: np.ndarray, where: str) -> None:
    """A loaded accumulator of squares (``exp_avg_sq``, Adagrad's ``sum``, RowWiseAdagrad's per-row
    ``sum``): no value below 0, which no training makes and whose square root makes the weights NaN at
    the next step. NaN and inf are kept: training on non-finite gradients leaves them (torch's state
    holds them too), and such a state saves and loads back. Read in blocks of rows (bounded memory for
    a state on disk)."""
    if arr.size == 0:
        return
    per_row = max(1, arr.size // arr.shape[0])
    rows = max(1, (1 << 20) // per_row)
    for lo in range(0, arr.shape[0], rows):
        block = arr[lo:lo + rows]
        if is_half(block.dtype):
            block = block.astype(np.float32)
        if (block < 0).any():
            raise ValueError(f"{where} must hold values >= 0 (an accumulator of squares), got "
                             f"{block[block < 0].reshape(-1)[0]}")


def _param_index(key: Any, where: str, seen: Dict[int, Any]) -> int:
    """A state dict's key as the parameter index it names: an int (a NumPy integer too; not a bool) or
    a string of ASCII digits (JSON's keys), each index named once (``0`` and ``"0"`` are the same
    parameter: ValueError rather than one entry silently replacing the other). ``seen``: the keys so far,
    by index."""
    if isinstance(key, str) and key.isascii() and key.isdigit():
        i = int(key)
    elif type(key) in EXACT_INTEGER_TYPES:
        i = int(key)
    else:
        raise ValueError(f"{where} key {key!r} is not a parameter index (an int or a string of digits)")
    if i in seen:
        raise ValueError(f"{where} has two entries for parameter {i}: keys {seen[i]!r} and {key!r}")
    seen[i] = key
    return i


@contextlib.contextmanager
def _kept_on_disk_error(state: Dict[str, Any]) -> Iterator[None]:
    """Around a parameter's update: an ``OSError`` or ``MemoryError`` — creating a state file in
    ``state_dir`` on a full disk (``storage.create_zeros``) or a state array in memory, which happens
    before any row is updated — puts the parameter's state entries (step counters, new arrays) back
    as they were, so the refused update leaves a state the next step accepts (and ``save()``
    writes). (A step makes the state arrays it will create first, :meth:`Optimizer._reserve_step_state`;
    this covers an array that no reservation named.)"""
    before = dict(state)
    try:
        yield
    except (OSError, MemoryError):
        state.clear()
        state.update(before)
        raise


def _core(state: Dict[str, Any]) -> Dict[str, Any]:
    """A parameter's state without the base class's entries (what the subclasses check)."""
    return {k: v for k, v in state.items() if k != STEP_KEY} if STEP_KEY in state else state


#: The largest value of every step counter (``step``, ``rounding_step``): an int64 holds it, a float
#: power of it (``beta ** step``) cannot overflow.
STEP_MAX = _STEP_MAX = 2 ** 63 - 1


#: The values a loaded state entry holds besides arrays: plain numbers, strings and None (NumPy's own
#: scalar types too), never an object whose methods would run code while the entry is checked.
_PLAIN_VALUES = frozenset([int, float, bool, str, type(None)] + list(set(np.sctypeDict.values())))


def _check_key(key: Any, where: str) -> None:
    """ValueError unless a state entry's key is exactly a ``str``: a subclass's ``__eq__`` would run
    at every later lookup of the entry, after the checks (it could rewrite a checked array)."""
    if type(key) is not str:
        raise ValueError(f"{where} has a key of type {type(key).__name__}: a state's keys are plain strings")


def _copy_entry(entry: Any, where: str) -> Dict[str, Any]:
    """A state entry for checking: arrays as they are, as plain arrays (every ``_load_state_entry``
    copies the arrays it keeps), everything else deep-copied — and then a plain value
    (``_PLAIN_VALUES``) or a list or tuple of them, else ValueError. Any code of the caller's (a
    ``__deepcopy__``) runs here, before any check."""
    out: Dict[str, Any] = {}
    for k, v in dict(entry).items():
        _check_key(k, where)
        if isinstance(v, np.ndarray):
            out[k] = v if type(v) in EXACT_ARRAY_TYPES else v.view(np.ndarray)
            continue
        out[k] = copy.deepcopy(v)
        items = out[k] if type(out[k]) in (list, tuple) else [out[k]]
        if any(type(item) not in _PLAIN_VALUES for item in items):
            raise ValueError(f"{where}[{k!r}] is a {type(out[k]).__name__}: a state holds arrays and plain numbers "
                             "(int, float, a NumPy scalar), strings or None")
    return out


def _lock_state_dir(state_dir: Any, owner: Any) -> Tuple[str, Optional[weakref.finalize]]:
    """Create ``state_dir`` if needed and lock it for ``owner`` (an exclusive ``flock`` on
    ``<state_dir>/.lock``, released when the owner is collected): two optimizers never share
    state files."""
    if not isinstance(state_dir, (str, os.PathLike)):
        raise TypeError(f"state_dir must be a path (str or os.PathLike) or None, got {type(state_dir).__name__}")
    path = os.path.abspath(os.fspath(state_dir))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        if os.path.lexists(path) and not os.path.isdir(path):
            raise ValueError(f"state_dir {path} exists and is not a directory") from None
        raise ValueError(f"state_dir {path}: cannot create the directory ({exc.strerror or exc})") from None
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        return path, None
    lock_path = os.path.join(path, ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"state_dir {path} is in use by another optimizer (its lock {lock_path} is held): "
                         "give each optimizer its own state_dir") from None
    return path, weakref.finalize(owner, os.close, fd)


#: The temporaries an optimizer makes in its state_dir: a state file reserved by a step, being created
#: or being loaded (``.p<i>.<key>.npy.<random>.cembed.tmp``, or ``….cembed.new`` just before it is
#: locked: storage.reserve_zeros; ``.p<i>.<key>.npy.<random>.tmp`` before 2026-11-27, and a load's
#: ``p<i>.<key>.npy.loading`` before 2026-11-28), and the link to a state file a load was replacing
#: (``.p<i>.<key>.npy.<random>.cembed.replaced``, made as ``….cembed.linking``: storage.replace_files;
#: ``p<i>.<key>.npy.replaced`` before 2026-11-26).
_STATE_TEMPORARY = re.compile(r"\.p[0-9]+\.[^/]+\.npy\.[^/]+\.(tmp|cembed\.new|replaced|linking)"
                              r"|p[0-9]+\.[^/]+\.npy\.(loading|replaced)")


def _remove_stale_temporaries(path: str) -> None:
    """Remove the temporaries a process that died in a step or a load left in ``path`` (their disk
    space is reserved: a table's worth each), once the directory is locked: no other optimizer can be
    using them then. Other files are never touched."""
    for name in os.listdir(path):
        if _STATE_TEMPORARY.fullmatch(name):
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass


class _WrongClass(ValueError):
    """A state saved by another optimizer class."""


def _check_maximize(group: Dict[str, Any], where: str) -> None:
    group["maximize"] = check_bool(group.get("maximize", False), f"{where} maximize")


#: How a refusal names each option (torch's words, with the key).
_LABELS = {"lr": "learning rate (lr)", "eps": "epsilon (eps)"}


#: A learning rate below zero by at most this fraction of the group's ``initial_lr`` is a scheduler's
#: rounding of zero (torch's recursive ``LinearLR`` to ``end_factor=0`` ends at -1.85e-18 from 0.1):
#: accepted as it is, as torch's optimizers apply it.
LR_ROUNDING = 1e-9


def _option(group: Dict[str, Any], key: str, where: str, **bounds: Any) -> float:
    """One numeric hyper-parameter of a group, checked with the common scalar rules."""
    value = check_real(group.get(key), f"{where}: {_LABELS.get(key, key)}", **bounds)
    group[key] = value
    return value


def _learning_rate(group: Dict[str, Any], where: str) -> float:
    """A group's ``lr``: a real number >= 0 — or just below zero where a scheduler rounded it there
    (:data:`LR_ROUNDING` of the group's ``initial_lr``, when that is a finite positive number)."""
    label = f"{where}: {_LABELS['lr']}"
    value = check_real(group.get("lr"), label)
    if value < 0:
        initial = group.get("initial_lr")   # (set by a scheduler: a valid learning rate, else no allowance)
        valid = (isinstance(initial, (int, float, np.integer, np.floating)) and not isinstance(initial, (bool, np.bool_))
                 and math.isfinite(initial) and initial > 0)
        if not (valid and -value <= LR_ROUNDING * float(initial)):   # type: ignore[arg-type]
            check_real(value, label, low=0.0)   # (its error)
    group["lr"] = value
    return value
