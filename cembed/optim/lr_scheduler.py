"""cembed.optim.lr_scheduler: learning-rate schedulers with torch.optim.lr_scheduler's names,
arguments, defaults and arithmetic (torch 2.13).

A scheduler adjusts ``group["lr"]`` (and, for :class:`OneCycleLR` and :class:`CyclicLR`, the momentum
or ``betas[0]``) of every entry of ``optimizer.param_groups``; the optimizer reads them at each
``step()``. Any object
with a ``param_groups`` list of dicts (each with an ``"lr"``) is accepted as the optimizer, so the
schedulers drive cembed's optimizers and simple stand-ins alike.

The learning rates are the same Python floats torch computes: every scheduler evaluates torch's own
expression in torch's order of operations -- the recursive ("chainable") form from the current
``group["lr"]`` at each ``step()``, and the closed form from ``base_lrs`` only where torch uses it
(``step(epoch)``, and :class:`SequentialLR` switching to the next scheduler at a milestone).

Call ``optimizer.step()`` before ``scheduler.step()``; as in torch, the first ``scheduler.step()``
warns when the optimizer has not stepped yet.
"""
from __future__ import annotations

import copy
import functools
import math
import numbers
import types
import warnings
import weakref
from bisect import bisect_right
import contextlib
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, SupportsFloat, TypedDict, cast

from .._validation import check_bool

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "CosineAnnealingLR",
    "ReduceLROnPlateau",
    "OneCycleLR",
    "PolynomialLR",
    "ChainedScheduler",
    "CosineAnnealingWarmRestarts",
    "CyclicLR",
]


class OptimizerLike(Protocol):
    """What a scheduler needs from an optimizer: ``param_groups`` (a list of dicts with ``"lr"``);
    ``defaults`` for :class:`OneCycleLR` with ``cycle_momentum=True``; ``step()``."""

    param_groups: list[dict[str, Any]]


LRLambda = Callable[[int], float]

EPOCH_DEPRECATION_WARNING = (
    "The epoch parameter in `scheduler.step()` was not necessary and is being deprecated where "
    "possible. Please use `scheduler.step()` to step the scheduler. During the deprecation, if "
    "epoch is different from None, the closed form is used instead of the new chainable form, "
    "where available."
)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type where torch raises :class:`ValueError`: caught by both
    ``except TypeError`` and ``except ValueError``."""


# ---------------------------------------------------------------------------------- validation
def _check_optimizer(optimizer: Any) -> None:
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError(f"{type(optimizer).__name__} is not an Optimizer "
                        "(it needs a param_groups list of dicts)")
    for i, group in enumerate(groups):
        if "lr" not in group:
            raise KeyError(f"param 'lr' is not specified in param_groups[{i}]")


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: Any, name: str, *, error: type = TypeError) -> Any:
    if not _is_real(value):
        raise error(f"{name} must be a real number, got {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be nan")
    return value


def _nonneg(value: Any, name: str) -> Any:
    _real(value, name)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _integer(value: Any, name: str, *, minimum: int | None = None,
             error: type = TypeError) -> int:
    if not _is_int(value):
        raise error(f"{name} must be an integer, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_group_lrs(optimizer: Any) -> None:
    """TypeError naming the group whose ``lr`` is not a number (a real, or anything with
    ``__float__``: a NumPy scalar, a 0-d torch tensor, as torch's schedulers take), before a step
    changes anything."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr") if isinstance(group, dict) else None
        if isinstance(lr, (str, bytes, bool)) or not (_is_real(lr) or hasattr(type(lr), "__float__")):
            raise TypeError(f"optimizer.param_groups[{i}]['lr'] must be a number, got {type(lr).__name__}")
        if isinstance(lr, int):   # (an int beyond float's range: OverflowError deep in the schedule's arithmetic)
            try:
                float(lr)
            except OverflowError:
                raise ValueError(f"optimizer.param_groups[{i}]['lr'] is too large to be a float (an integer of "
                                 f"{lr.bit_length()} bits)") from None


def _positive_fraction(value: Any, name: str) -> Any:
    """A factor in (0, 1]."""
    _real(value, name)
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def _milestones(value: Any, name: str) -> Any:
    if not isinstance(value, Counter) or not all(_is_int(m) for m in value):
        raise TypeError(f"{name} must be a Counter of integer epochs, got {type(value).__name__}")
    return value


def _fraction(value: Any, name: str) -> Any:
    """A factor in [0, 1] (a loaded state's; the constructors give their own messages)."""
    _real(value, name)
    if not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _positive_real(value: Any, name: str) -> Any:
    _real(value, name)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value




@contextlib.contextmanager
def _groups_put_back_on_error(optimizer: Any) -> Iterator[None]:
    """Put every param group's entries back as they were if the block raises (what a scheduler wrote
    into them before it failed)."""
    groups = optimizer.param_groups
    saved = [dict(group) for group in groups]
    try:
        yield
    except BaseException:
        for group, entries in zip(groups, saved):
            group.clear()
            group.update(entries)
        raise


def _start_momentum(optimizer: Any, max_momentums: list[Any], base_momentums: list[Any], use_beta1: bool) -> None:
    """A cyclic schedule's first momentum (OneCycleLR, CyclicLR): each group's momentum (or beta1) at its
    ``max_momentum``, both bounds kept in the group."""
    for m_mom, b_mom, group in zip(max_momentums, base_momentums, optimizer.param_groups):
        if use_beta1:
            group["betas"] = (m_mom, *group["betas"][1:])
        else:
            group["momentum"] = m_mom
        group["max_momentum"] = m_mom
        group["base_momentum"] = b_mom


def _check_state_dict(state_dict: Any) -> None:
    """What every scheduler's ``load_state_dict`` takes first: a dict (``TypeError`` otherwise)."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")


def _check_last_epoch(last_epoch: Any) -> int:
    return _integer(last_epoch, "last_epoch", minimum=-1)


def _format_param(name: str, optimizer: OptimizerLike, param: Any) -> list[Any]:
    """One value per param group: ``param`` repeated, or a list/tuple of the right length."""
    n = len(optimizer.param_groups)
    if isinstance(param, (list, tuple)):
        if len(param) != n:
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(param)} values, param_groups has {n}.")
        values = list(param)
    else:
        values = [param] * n
    for i, v in enumerate(values):
        _real(v, name if not isinstance(param, (list, tuple)) else f"{name}[{i}]")
    return values


def _lr_lambdas(optimizer: OptimizerLike, lr_lambda: Any) -> list[LRLambda]:
    n = len(optimizer.param_groups)
    if isinstance(lr_lambda, (list, tuple)):
        if len(lr_lambda) != n:
            raise ValueError(f"Expected {n} lr_lambdas, but got {len(lr_lambda)}")
        lambdas = list(lr_lambda)
    else:
        lambdas = [lr_lambda] * n
    for fn in lambdas:
        if not callable(fn):
            raise TypeError(f"lr_lambda should be a function, but got {type(fn).__name__}")
    return lambdas


def _group_values(optimizer: OptimizerLike, key: str) -> list[Any]:
    """[group[key] for each param group]; KeyError when a group lacks ``key``."""
    return [group[key] for group in optimizer.param_groups]


# --------------------------------------------------------------- tracking optimizer.step() calls
def _patch_optimizer_step(optimizer: Any) -> None:
    """Wrap ``optimizer.step`` so that it records ``optimizer._opt_called = True`` (torch's check
    that ``optimizer.step()`` runs before ``scheduler.step()``). Objects that cannot be patched are
    left alone."""
    step = getattr(optimizer, "step", None)
    if step is None or hasattr(step, "_wrapped_by_lr_sched"):
        return
    try:
        opt_ref = weakref.ref(optimizer)
    except TypeError:
        return
    func = getattr(step, "__func__", None)
    if func is not None and getattr(step, "__self__", None) is optimizer:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opt = opt_ref()
            if opt is None:  # the wrapper outlived its optimizer (a saved reference to optimizer.step)
                raise ReferenceError("optimizer.step called after the optimizer was garbage-collected")
            opt._opt_called = True
            return func.__get__(opt, opt.__class__)(*args, **kwargs)
    else:
        @functools.wraps(step)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            opt = opt_ref()
            if opt is not None:
                opt._opt_called = True
            return step(*args, **kwargs)
    wrapper._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
    try:
        optimizer.step = wrapper
    except (AttributeError, TypeError):
        pass


# ------------------------------------------------------------------------------------ the base
class LRScheduler:
    """Base class of the learning-rate schedulers (torch.optim.lr_scheduler.LRScheduler).

    On construction with ``last_epoch=-1`` every param group gets ``group["initial_lr"]`` (its
    current ``lr``, unless already set); :attr:`base_lrs` are these initial learning rates. The
    constructor then takes the initial step, which sets ``last_epoch`` to ``last_epoch + 1`` and the
    learning rates of epoch 0.

    Parameters
    ----------
    optimizer : optimizer
        Anything with a ``param_groups`` list of dicts, each with an ``"lr"``.
    last_epoch : int, default -1
        Index of the last epoch. ``-1`` starts the schedule; another value resumes it, and then
        every param group must already have an ``"initial_lr"`` (:class:`KeyError` otherwise).

    Attributes
    ----------
    optimizer : optimizer
    base_lrs : list of float
        ``group["initial_lr"]`` of every param group.
    last_epoch : int
        Number of ``step()`` calls since epoch 0.

    Notes
    -----
    Subclasses implement :meth:`get_lr`, and may implement ``_get_closed_form_lr``, used by
    ``step(epoch)``. Constructing a scheduler writes the optimizer's ``lr``: when resuming from a
    checkpoint, construct the scheduler *before* ``optimizer.load_state_dict``.

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import StepLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.1)
    >>> scheduler = StepLR(opt, step_size=2, gamma=0.5)
    >>> lrs = []
    >>> for epoch in range(4):
    ...     opt.step()
    ...     scheduler.step()
    ...     lrs.append(scheduler.get_last_lr()[0])
    >>> lrs
    [0.1, 0.05, 0.05, 0.025]
    """

    _get_lr_called_within_step: bool = False
    _is_initial: bool = False

    def __init__(self, optimizer: OptimizerLike, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _check_last_epoch(last_epoch)
        self.optimizer = optimizer
        if last_epoch != -1:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param 'initial_lr' is not specified in param_groups[{i}] when resuming "
                        "scheduler with last_epoch >= 0. This typically happens when resuming from a "
                        "checkpoint without loading the optimizer state, or when passing "
                        "last_epoch >= 0 for a fresh run.")
        # a constructor that raises (its initial step can: a lambda's error) leaves the groups as they were
        # (torch leaves the 'initial_lr' it set, which a later scheduler would then start from)
        with _groups_put_back_on_error(optimizer):
            if last_epoch == -1:
                for group in optimizer.param_groups:
                    group.setdefault("initial_lr", group["lr"])
            self.base_lrs: list[float] = _group_values(optimizer, "initial_lr")
            self.last_epoch = last_epoch
            _patch_optimizer_step(optimizer)
            self._initial_step()

    def _initial_step(self) -> None:
        """Reset the step count and take the constructor's step (in "initial" mode)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state: a deep copy of every attribute except the optimizer.

        Returns
        -------
        dict
            Pass it to :meth:`load_state_dict` of a scheduler of the same class.
        """
        return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "optimizer"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Parameters
        ----------
        state_dict : dict
            A dict returned by :meth:`state_dict` (it is not modified).
        """
        _check_state_dict(state_dict)
        with self._all_or_nothing():
            self._load_checked({k: copy.deepcopy(v) for k, v in state_dict.items() if k != "optimizer"})

    def _state_objects(self) -> list[Any]:
        """The objects whose attributes make this scheduler's state (itself; wrapped schedulers and
        stateful lambdas too, in the classes that have them)."""
        return [self]

    @contextlib.contextmanager
    def _all_or_nothing(self) -> Iterator[None]:
        """Put every state object's attributes back as they were if the block raises: a refused step
        or load leaves the scheduler unchanged."""
        saved = [(obj, dict(obj.__dict__)) for obj in self._state_objects()]
        try:
            yield
        except BaseException:
            for obj, attrs in saved:
                obj.__dict__.clear()
                obj.__dict__.update(attrs)
            raise

    #: Checks of the attributes a loaded state sets, as the constructor checks its arguments
    #: (attribute -> check(value, name)); every class adds its own.
    _STATE_CHECKS: dict[str, Callable[[Any, str], Any]] = {
        # (any integer: a scheduler nested in two SequentialLRs waits at -2 for its milestone, step(epoch)
        # takes negative epochs, as torch's)
        "last_epoch": lambda v, name: _integer(v, name),
        "_step_count": lambda v, name: _integer(v, name, minimum=0),
    }

    def _load_checked(self, loaded: dict[str, Any], kept: tuple[str, ...] = ()) -> None:
        """Set the attributes of a state dict after checking them: for cembed's own schedulers the
        same attributes this scheduler has (a state of another class or a damaged one is refused; a
        user's subclass may keep attributes made later, as in torch), each value as the constructor
        would accept it. ``kept``: attributes the state dict does not set. ValueError / TypeError
        naming the entry, with the scheduler unchanged."""
        own = {k for k in self.__dict__ if k != "optimizer" and k not in kept}
        unknown, missing = sorted(set(loaded) - own), sorted(own - set(loaded))
        if type(self).__module__ == __name__ and (unknown or missing):
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a {type(self).__name__} state "
                             f"(unknown entries {unknown}, missing entries {missing})")
        checks: dict[str, Callable[[Any, str], Any]] = {}
        for cls in reversed(type(self).__mro__):
            checks.update(getattr(cls, "_STATE_CHECKS", {}) if "_STATE_CHECKS" in vars(cls) else {})
        for key, check in checks.items():
            if key in loaded:
                check(loaded[key], f"state_dict[{key!r}]")
        if loaded.get("_is_initial", False) is not False:   # (True only inside the constructor's step)
            raise ValueError(f"state_dict['_is_initial'] must be False (a saved scheduler is past its "
                             f"constructor), got {loaded['_is_initial']!r}")
        for key in ("base_lrs", "max_lrs", "base_momentums", "max_momentums", "min_lrs", "_last_lr"):
            # one value per param group the scheduler was made with: groups added later have none (as
            # in torch, the chainable forms still step them; the lists are not compared with the groups)
            if key in loaded:
                values = loaded[key]
                if not isinstance(values, list):
                    raise ValueError(f"state_dict[{key!r}] must be a list of one value per param group, "
                                     f"got {values!r}")
                for i, value in enumerate(values):
                    (_nonneg if key == "min_lrs" else _real)(value, f"state_dict[{key!r}][{i}]")
        self.__dict__.update(loaded)

    def get_last_lr(self) -> list[float]:
        """The learning rates of the last step.

        Returns
        -------
        list of float
            One learning rate per param group (a new list).
        """
        return list(self._last_lr)

    def get_lr(self) -> list[float]:
        """The learning rates of the current ``last_epoch`` (called by :meth:`step`).

        Returns
        -------
        list of float
            One learning rate per param group. To read the current learning rates use
            :meth:`get_last_lr`; calling this outside ``step()`` warns, as in torch.
        """
        raise NotImplementedError

    def step(self, epoch: int | None = None) -> None:
        """Advance the schedule by one epoch and write the new learning rates to the optimizer.

        Parameters
        ----------
        epoch : int, optional
            Deprecated (as in torch): set ``last_epoch`` to ``epoch`` and use the closed form
            where the scheduler has one. Warns.
        """
        if self._step_count == 1:
            if not hasattr(getattr(self.optimizer, "step", None), "_wrapped_by_lr_sched"):
                warnings.warn(
                    "Seems like `optimizer.step()` has been overridden after learning rate "
                    "scheduler initialization. Please, make sure to call `optimizer.step()` before "
                    "`lr_scheduler.step()`.", UserWarning, stacklevel=2)
            elif not getattr(self.optimizer, "_opt_called", False):
                warnings.warn(
                    "Detected call of `lr_scheduler.step()` before `optimizer.step()`. You should "
                    "call them in the opposite order: `optimizer.step()` before "
                    "`lr_scheduler.step()`. Failure to do this will result in skipping the first "
                    "value of the learning rate schedule.", UserWarning, stacklevel=2)
        if epoch is not None:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
            epoch = _integer(epoch, "epoch")
        _check_group_lrs(self.optimizer)
        with self._all_or_nothing():   # a refused step leaves the schedule where it was
            self._step_count += 1
            self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        self._get_lr_called_within_step = True
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed_form = getattr(self, "_get_closed_form_lr", None)
                values = closed_form() if closed_form is not None else self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise ValueError(f"{type(self).__name__} computed {len(values)} learning rates for "
                             f"{len(groups)} param groups")
        for group, lr in zip(groups, values):
            group["lr"] = lr
        self._last_lr: list[float] = _group_values(self.optimizer, "lr")

    def _warn_if_outside_step(self) -> None:
        if not self._get_lr_called_within_step:
            warnings.warn("To get the last learning rate computed by the scheduler, please use "
                          "`get_last_lr()`.", UserWarning, stacklevel=3)

    def _current_lrs(self) -> list[float]:
        return _group_values(self.optimizer, "lr")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(last_epoch={self.last_epoch}, last_lr={getattr(self, '_last_lr', None)})"


class _LambdaStateMixin:
    """state_dict / load_state_dict of the lambda schedulers: functions and lambdas are not saved
    (``None`` in their place); the ``__dict__`` of callable objects is."""

    lr_lambdas: list[LRLambda]

    def __init__(self, optimizer: OptimizerLike, lr_lambda: LRLambda | Sequence[LRLambda],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        self.lr_lambdas = _lr_lambdas(optimizer, lr_lambda)
        super().__init__(optimizer, last_epoch)  # type: ignore[call-arg]  # LRScheduler follows in the MRO

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the optimizer; lambdas and functions are stored as
        ``None``, callable objects as a copy of their ``__dict__``.

        Returns
        -------
        dict
        """
        state = {k: copy.deepcopy(v) for k, v in self.__dict__.items()
                 if k not in ("optimizer", "lr_lambdas")}
        state["lr_lambdas"] = [
            None if isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__")
            else copy.deepcopy(fn.__dict__)
            for fn in self.lr_lambdas]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; the scheduler keeps its own lambdas
        (callable objects get their saved ``__dict__`` back).

        Parameters
        ----------
        state_dict : dict
        """
        _check_state_dict(state_dict)
        saved = state_dict.get("lr_lambdas", [None] * len(self.lr_lambdas))
        if not isinstance(saved, list) or len(saved) != len(self.lr_lambdas) or \
                not all(a is None or isinstance(a, dict) for a in saved):
            raise ValueError(f"state_dict['lr_lambdas'] must be a list of {len(self.lr_lambdas)} dicts or None")
        with self._all_or_nothing():  # type: ignore[attr-defined]
            self._load_checked({k: copy.deepcopy(v) for k, v in state_dict.items()  # type: ignore[attr-defined]
                                if k not in ("optimizer", "lr_lambdas")}, kept=("lr_lambdas",))
            for fn, attrs in zip(self.lr_lambdas, saved):
                if attrs is not None:
                    fn.__dict__.update(copy.deepcopy(attrs))

    def _state_objects(self) -> list[Any]:
        return [self] + [fn for fn in self.lr_lambdas if hasattr(fn, "__dict__")]


# --------------------------------------------------------------------------- the schedulers
class LambdaLR(_LambdaStateMixin, LRScheduler):
    """Set each group's learning rate to its initial lr times ``lr_lambda(epoch)``.

    ``lr = base_lr * lr_lambda(last_epoch)``.

    Parameters
    ----------
    optimizer : optimizer
    lr_lambda : callable or list of callables
        A function of the (integer) epoch giving the multiplicative factor, or one per param group.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import LambdaLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.1)
    >>> sched = LambdaLR(opt, lr_lambda=lambda epoch: 1 / (epoch + 1))
    >>> for _ in range(3):
    ...     opt.step()
    ...     sched.step()
    >>> sched.get_last_lr()
    [0.025]
    """

    def get_lr(self) -> list[float]:
        """``base_lr * lr_lambda(last_epoch)`` for each group.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        return [base_lr * fn(self.last_epoch) for fn, base_lr in zip(self.lr_lambdas, self.base_lrs)]


class MultiplicativeLR(_LambdaStateMixin, LRScheduler):
    """Multiply each group's learning rate by ``lr_lambda(epoch)`` at every step.

    Parameters
    ----------
    optimizer : optimizer
    lr_lambda : callable or list of callables
        A function of the (integer) epoch giving the factor, or one per param group.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import MultiplicativeLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.5)
    >>> sched = MultiplicativeLR(opt, lr_lambda=lambda epoch: 0.5)
    >>> for _ in range(2):
    ...     opt.step()
    ...     sched.step()
    >>> sched.get_last_lr()
    [0.125]
    """

    def get_lr(self) -> list[float]:
        """``group["lr"] * lr_lambda(last_epoch)`` for each group (unchanged on the initial step).

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return [group["lr"] * fn(self.last_epoch)
                for fn, group in zip(self.lr_lambdas, self.optimizer.param_groups)]


class StepLR(LRScheduler):
    """Decay each group's learning rate by ``gamma`` every ``step_size`` epochs.

    Parameters
    ----------
    optimizer : optimizer
    step_size : int
        Period of the decay, >= 1.
    gamma : float, default 0.1
        Multiplicative factor of the decay.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import StepLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.1)
    >>> sched = StepLR(opt, step_size=2, gamma=0.5)
    >>> lrs = []
    >>> for _ in range(5):
    ...     lrs.append(sched.get_last_lr()[0])
    ...     opt.step()
    ...     sched.step()
    >>> lrs
    [0.1, 0.1, 0.05, 0.05, 0.025]
    """

    _STATE_CHECKS = {"step_size": lambda v, name: _integer(v, name, minimum=1), "gamma": _nonneg}

    def __init__(self, optimizer: OptimizerLike, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.step_size = _integer(step_size, "step_size", minimum=1)
        self.gamma = _nonneg(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """``group["lr"] * gamma`` when ``last_epoch`` is a non-zero multiple of ``step_size``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Decay each group's learning rate by ``gamma`` at every milestone epoch.

    A milestone listed ``n`` times decays by ``gamma ** n``.

    Parameters
    ----------
    optimizer : optimizer
    milestones : iterable of int
        Epoch indices.
    gamma : float, default 0.1
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import MultiStepLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = MultiStepLR(opt, milestones=[1, 3], gamma=0.5)
    >>> lrs = []
    >>> for _ in range(4):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(sched.get_last_lr()[0])
    >>> lrs
    [0.5, 0.5, 0.25, 0.25]
    """

    _STATE_CHECKS = {"gamma": _nonneg, "milestones": _milestones}

    def __init__(self, optimizer: OptimizerLike, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise TypeError(f"milestones must be an iterable of integers, got {type(milestones).__name__}")
        milestones = list(milestones)
        for i, m in enumerate(milestones):
            _integer(m, f"milestones[{i}]")
        self.milestones = Counter(int(m) for m in milestones)
        self.gamma = _nonneg(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """``group["lr"] * gamma ** count`` at a milestone listed ``count`` times.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        return [group["lr"] * self.gamma ** self.milestones[self.last_epoch]
                for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        milestones = sorted(self.milestones.elements())
        return [base_lr * self.gamma ** bisect_right(milestones, self.last_epoch) for base_lr in self.base_lrs]


class ConstantLR(LRScheduler):
    """Multiply each group's learning rate by ``factor`` until epoch ``total_iters``.

    Parameters
    ----------
    optimizer : optimizer
    factor : float, default 1/3
        In [0, 1]. (With 0 the step at epoch ``total_iters`` divides by it: ``ZeroDivisionError``, as
        torch's, the schedule left where it was; a ``SequentialLR`` that switches away before that epoch
        never takes that step.)
    total_iters : int, default 5
        Number of epochs with the reduced learning rate.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import ConstantLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.5)
    >>> sched = ConstantLR(opt, factor=0.5, total_iters=2)
    >>> lrs = [sched.get_last_lr()[0]]
    >>> for _ in range(3):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(sched.get_last_lr()[0])
    >>> lrs
    [0.25, 0.25, 0.5, 0.5]
    """

    _STATE_CHECKS = {"factor": _fraction, "total_iters": lambda v, name: _integer(v, name, minimum=0)}

    def __init__(self, optimizer: OptimizerLike, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        _real(factor, "factor")
        if factor > 1.0 or factor < 0:
            raise ValueError(f"Constant multiplicative factor expected to be between 0 and 1, got factor={factor}")
        self.factor = factor
        self.total_iters = _integer(total_iters, "total_iters", minimum=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """``lr * factor`` at epoch 0, ``lr * (1 / factor)`` at ``total_iters``, else unchanged.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self.last_epoch == 0:
            return [group["lr"] * self.factor for group in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return self._current_lrs()
        return [group["lr"] * (1.0 / self.factor) for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        after = self.last_epoch >= self.total_iters
        return [base_lr * (self.factor + after * (1 - self.factor)) for base_lr in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale each group's learning rate by a factor going linearly from ``start_factor`` to
    ``end_factor`` over ``total_iters`` epochs.

    Parameters
    ----------
    optimizer : optimizer
    start_factor : float, default 1/3
        In (0, 1].
    end_factor : float, default 1.0
        In [0, 1].
    total_iters : int, default 5
        With 0 the chainable ``step()`` keeps ``start_factor``, and the closed form (``step(epoch)``, a
        ``SequentialLR`` milestone) divides by it: ``ZeroDivisionError``, as torch's.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import LinearLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = LinearLR(opt, start_factor=0.25, total_iters=3)
    >>> lrs = [sched.get_last_lr()[0]]
    >>> for _ in range(4):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(sched.get_last_lr()[0])
    >>> lrs
    [0.25, 0.5, 0.75, 1.0, 1.0]
    """

    _STATE_CHECKS = {"start_factor": _positive_fraction, "end_factor": _fraction,
                     "total_iters": lambda v, name: _integer(v, name, minimum=0)}

    def __init__(self, optimizer: OptimizerLike, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        _real(start_factor, "start_factor")
        _real(end_factor, "end_factor")
        if start_factor > 1.0 or start_factor <= 0:
            raise ValueError("Starting multiplicative factor expected to be greater than 0 and less "
                             f"or equal to 1, got start_factor={start_factor}")
        if end_factor > 1.0 or end_factor < 0:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1, "
                             f"got end_factor={end_factor}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = _integer(total_iters, "total_iters", minimum=0)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """torch's recursive form: the ratio of consecutive factors times ``group["lr"]``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self.last_epoch == 0:
            return [group["lr"] * self.start_factor for group in self.optimizer.param_groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._current_lrs()
        delta = self.end_factor - self.start_factor
        ratio = 1.0 + delta / (self.total_iters * self.start_factor + (self.last_epoch - 1) * delta)
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        delta = self.end_factor - self.start_factor
        return [base_lr * (self.start_factor + delta * min(self.total_iters, self.last_epoch) / self.total_iters)
                for base_lr in self.base_lrs]


class ExponentialLR(LRScheduler):
    """Decay each group's learning rate by ``gamma`` every epoch.

    Parameters
    ----------
    optimizer : optimizer
    gamma : float
        Multiplicative factor of the decay.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import ExponentialLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = ExponentialLR(opt, gamma=0.5)
    >>> for _ in range(3):
    ...     opt.step()
    ...     sched.step()
    >>> sched.get_last_lr()
    [0.125]
    """

    _STATE_CHECKS = {"gamma": _nonneg}

    def __init__(self, optimizer: OptimizerLike, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = _nonneg(gamma, "gamma")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """``group["lr"] * gamma`` (unchanged on the initial step).

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        if self._is_initial:
            return self._current_lrs()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing of each group's learning rate from its initial lr to ``eta_min`` over
    ``T_max`` epochs (without restarts; past ``T_max`` the cosine continues, as in torch).

    The learning rate follows torch's recursion
    ``lr_t = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))``,
    which approximates ``eta_min + (base_lr - eta_min) * (1 + cos(pi t / T_max)) / 2``.

    Parameters
    ----------
    optimizer : optimizer
    T_max : int
        Half period in epochs, >= 1.
    eta_min : float, default 0.0
        Minimum learning rate.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import CosineAnnealingLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = CosineAnnealingLR(opt, T_max=4)
    >>> lrs = []
    >>> for _ in range(4):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    >>> lrs
    [0.853553, 0.5, 0.146447, 0.0]
    """

    _STATE_CHECKS = {"T_max": lambda v, name: _integer(v, name, minimum=1), "eta_min": _real}

    def __init__(self, optimizer: OptimizerLike, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.T_max = _integer(T_max, "T_max", minimum=1)
        self.eta_min = _real(eta_min, "eta_min")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """torch's recursive cosine step from the current ``group["lr"]``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        t, T, eta_min = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._current_lrs()
        if self._step_count == 1 and t > 0:
            return [eta_min + (base_lr - eta_min) * (1 + math.cos(t * math.pi / T)) / 2
                    for base_lr in self.base_lrs]
        if (t - 1 - T) % (2 * T) == 0:
            return [group["lr"] + (base_lr - eta_min) * (1 - math.cos(math.pi / T)) / 2
                    for base_lr, group in zip(self.base_lrs, self.optimizer.param_groups)]
        ratio = (1 + math.cos(math.pi * t / T)) / (1 + math.cos(math.pi * (t - 1) / T))
        return [ratio * (group["lr"] - eta_min) + eta_min for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return [self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base_lr in self.base_lrs]


class _SchedulerSequence(LRScheduler):
    """What :class:`SequentialLR` and :class:`ChainedScheduler` share: a list of schedulers of one
    optimizer, checked when given, and a state that holds theirs (saved and loaded all or none)."""

    _schedulers: list[LRScheduler]

    def _checked_schedulers(self, schedulers: Any, optimizer: Any) -> list[LRScheduler]:
        """``schedulers`` as a list: at least one, each of ``optimizer``, none a ReduceLROnPlateau."""
        if isinstance(schedulers, LRScheduler) or not isinstance(schedulers, Sequence):
            raise TypeError(f"schedulers must be a list of schedulers, got {type(schedulers).__name__}")
        if len(schedulers) < 1:
            raise ValueError(f"{type(self).__name__} expects at least one scheduler, but got no scheduler.")
        for i, scheduler in enumerate(schedulers):
            if not hasattr(scheduler, "optimizer"):
                raise TypeError(f"{type(self).__name__}: schedulers[{i}] should have `optimizer` as its attribute.")
            if isinstance(scheduler, ReduceLROnPlateau):
                raise ValueError(
                    f"{type(self).__name__} does not support `ReduceLROnPlateau` scheduler as it requires "
                    "additional kwargs to be specified when calling `step`, but got one at index "
                    f"{i} in the given schedulers sequence.")
            if scheduler.optimizer is not optimizer:
                raise ValueError(
                    f"{type(self).__name__} expects all schedulers to belong to the same optimizer, but "
                    f"schedulers[{i}] ({type(scheduler).__name__}) has a different optimizer.")
        return list(schedulers)

    def _state_objects(self) -> list[Any]:
        return [self] + [obj for s in self._schedulers for obj in s._state_objects()]

    def state_dict(self) -> dict[str, Any]:
        """The state, with the schedulers' state dicts under ``"_schedulers"``.

        Returns
        -------
        dict
        """
        state = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("optimizer", "_schedulers")}
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`, the schedulers' included (all or none).

        Parameters
        ----------
        state_dict : dict
        """
        _check_state_dict(state_dict)
        saved = state_dict.get("_schedulers")
        if not isinstance(saved, list) or len(saved) != len(self._schedulers):
            raise ValueError(f"state_dict must hold the states of {len(self._schedulers)} schedulers under "
                             "'_schedulers'")
        with self._all_or_nothing():   # its own entries and every scheduler's, or none
            self._load_checked({k: copy.deepcopy(v) for k, v in state_dict.items()
                                if k not in ("optimizer", "_schedulers")}, kept=("_schedulers",))
            self._check_loaded()
            for s, sd in zip(self._schedulers, saved):
                s.load_state_dict(sd)

    def _check_loaded(self) -> None:
        """Checks of a loaded state across entries (the class's own)."""


class SequentialLR(_SchedulerSequence):
    """Run schedulers one after another, switching at the milestone epochs.

    Scheduler ``i`` drives epochs ``[milestones[i-1], milestones[i])``. At a milestone the next
    scheduler restarts at its epoch 0 (closed form where it has one, as torch).

    Parameters
    ----------
    optimizer : optimizer
        The optimizer of every scheduler in ``schedulers``.
    schedulers : list of LRScheduler
        At least one; :class:`ReduceLROnPlateau` is not supported.
    milestones : list of int
        ``len(schedulers) - 1`` epochs.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import ConstantLR, ExponentialLR, SequentialLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> warmup = ConstantLR(opt, factor=0.5, total_iters=2)
    >>> decay = ExponentialLR(opt, gamma=0.5)
    >>> sched = SequentialLR(opt, schedulers=[warmup, decay], milestones=[2])
    >>> lrs = [sched.get_last_lr()[0]]
    >>> for _ in range(4):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(sched.get_last_lr()[0])
    >>> lrs
    [0.5, 0.5, 1.0, 0.5, 0.25]
    """

    def __init__(self, optimizer: OptimizerLike, schedulers: Sequence[LRScheduler], milestones: Sequence[int],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _check_last_epoch(last_epoch)
        schedulers = self._checked_schedulers(schedulers, optimizer)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"milestones must be a list of integers, got {type(milestones).__name__}")
        for i, m in enumerate(milestones):
            _integer(m, f"milestones[{i}]")
        if len(milestones) != len(schedulers) - 1:
            raise ValueError(
                "Sequential Schedulers expects number of schedulers provided to be one more than the "
                f"number of milestone points, but got number of schedulers {len(schedulers)} and the "
                f"number of milestones to be equal to {len(milestones)}")
        self._schedulers = list(schedulers)
        self._milestones = [int(m) for m in milestones]
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer

        # back to the initial learning rates, undo the construction step of every scheduler, and
        # take the initial step of the one that runs at epoch 0 — all or nothing (the groups and the
        # wrapped schedulers as they were if any of it raises; torch's is half-done)
        for i, group in enumerate(optimizer.param_groups):
            if "initial_lr" not in group:
                raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}]")
        with _groups_put_back_on_error(optimizer), self._all_or_nothing():
            for group in optimizer.param_groups:
                group["lr"] = group["initial_lr"]
            self.recursive_undo()
            idx = bisect_right(self._milestones, 0)
            self._schedulers[idx]._initial_step()
            self._last_lr = self._schedulers[idx].get_last_lr()

    def recursive_undo(self, sched: Any = None) -> None:
        """Undo the construction step of the wrapped schedulers (recursively through nested
        :class:`SequentialLR`): decrement their ``last_epoch``."""
        scheds = self if sched is None else sched
        if hasattr(scheds, "_schedulers"):
            for s in scheds._schedulers:
                self.recursive_undo(s)
        elif hasattr(scheds, "last_epoch"):
            scheds.last_epoch -= 1

    def step(self) -> None:  # type: ignore[override]
        """Advance by one epoch: step the scheduler of the new epoch, or restart the next one at a
        milestone."""
        _check_group_lrs(self.optimizer)
        with self._all_or_nothing():   # (the wrapped schedulers' state included)
            self.last_epoch += 1
            idx = bisect_right(self._milestones, self.last_epoch)
            scheduler = self._schedulers[idx]
            if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
                scheduler._update_lr(0)
            else:
                scheduler.step()
            self._last_lr = scheduler.get_last_lr()

    def _check_loaded(self) -> None:
        if not isinstance(self._milestones, list) or not all(_is_int(m) for m in self._milestones):
            raise TypeError("state_dict['_milestones'] must be a list of integers")


class ReduceLROnPlateau(LRScheduler):
    """Reduce each group's learning rate by ``factor`` when a metric stops improving.

    ``step(metric)`` counts the epochs without improvement; after more than ``patience`` of them
    the learning rates are multiplied by ``factor`` (not below ``min_lr``; changes smaller than
    ``eps`` are skipped), then ``cooldown`` epochs pass before counting resumes.

    Parameters
    ----------
    optimizer : optimizer
    mode : {"min", "max"}, default "min"
        Whether the metric should decrease or increase.
    factor : float, default 0.1
        ``new_lr = lr * factor``; < 1.
    patience : int, default 10
        Epochs without improvement tolerated.
    threshold : float, default 1e-4
        Minimum significant change.
    threshold_mode : {"rel", "abs"}, default "rel"
        ``rel``: better than ``best * (1 -/+ threshold)``; ``abs``: better than
        ``best -/+ threshold``.
    cooldown : int, default 0
        Epochs to wait after a reduction.
    min_lr : float or list of float, default 0
        Lower bound of the learning rate, for all groups or per group.
    eps : float, default 1e-8
        Reductions smaller than ``eps`` are ignored.

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import ReduceLROnPlateau
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = ReduceLROnPlateau(opt, factor=0.5, patience=1)
    >>> for loss in [3.0, 2.0, 2.0, 2.0, 2.0]:
    ...     opt.step()
    ...     sched.step(loss)
    >>> sched.get_last_lr()
    [0.5]
    """

    def __init__(self, optimizer: OptimizerLike, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | Sequence[float] = 0, eps: float = 1e-8) -> None:
        _real(factor, "factor")
        if factor >= 1.0:
            raise ValueError(f"Factor should be < 1.0, got factor={factor}")
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got factor={factor}")
        self.factor = factor
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        n = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n:
                raise ValueError(f"expected {n} min_lrs, got {len(min_lr)}")
            for i, m in enumerate(min_lr):
                _nonneg(m, f"min_lr[{i}]")
            self.default_min_lr = None
            self.min_lrs = list(min_lr)
        else:
            self.default_min_lr = _nonneg(min_lr, "min_lr")
            self.min_lrs = [min_lr] * n
        self.patience = _integer(patience, "patience", minimum=0)
        self.cooldown = _integer(cooldown, "cooldown", minimum=0)
        self.eps = _nonneg(eps, "eps")
        self.last_epoch = 0
        self._last_lr = self._current_lrs()
        self._init_is_better(mode=mode, threshold=threshold, threshold_mode=threshold_mode)
        self._reset()

    def _reset(self) -> None:
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    def step(self, metrics: SupportsFloat, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record one epoch's metric and reduce the learning rates if it has plateaued.

        Parameters
        ----------
        metrics : float
            The monitored quantity (anything ``float()`` accepts).
        epoch : int, optional
            Deprecated (as in torch): the epoch number to record. Warns.
        """
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_DEPRECATION_WARNING, UserWarning, stacklevel=2)
            epoch = _integer(epoch, "epoch")   # (as every scheduler's step(epoch); torch takes anything)
        _check_group_lrs(self.optimizer)
        with self._all_or_nothing():   # a refused step (torch's: half-done) changes nothing
            self.last_epoch = epoch
            if self._is_better(current, self.best):
                self.best = current
                self.num_bad_epochs = 0
            else:
                self.num_bad_epochs += 1
            if self.in_cooldown:
                self.cooldown_counter -= 1
                self.num_bad_epochs = 0
            if self.num_bad_epochs > self.patience:
                self._reduce_lr(epoch)
                self.cooldown_counter = self.cooldown
                self.num_bad_epochs = 0
            self._last_lr = self._current_lrs()

    def _reduce_lr(self, epoch: int) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"The number of param groups in the `optimizer` ({len(groups)}) differs from when "
                    f"`ReduceLROnPlateau` was initialized ({len(self.min_lrs)}), usually due to a new "
                    "param group being added to the optimizer. Please modify the `min_lrs` field to "
                    "match the length of the `optimizer` param groups.")
            self.min_lrs = [self.default_min_lr] * len(groups)
        reduced = {}   # every group's new lr worked out before any is written
        for i, group in enumerate(groups):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, self.min_lrs[i])
            if old_lr - new_lr > self.eps:
                reduced[i] = new_lr
        for i, new_lr in reduced.items():
            groups[i]["lr"] = new_lr

    @property
    def in_cooldown(self) -> bool:
        """Whether the scheduler is in its cooldown period."""
        return self.cooldown_counter > 0

    def _is_better(self, a: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min":
            return a < best - self.threshold
        if self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def _init_is_better(self, mode: str, threshold: float, threshold_mode: str) -> None:
        if mode not in {"min", "max"}:
            raise ValueError(f"mode {mode!r} is unknown! (expected 'min' or 'max')")
        if threshold_mode not in {"rel", "abs"}:
            raise ValueError(f"threshold mode {threshold_mode!r} is unknown! (expected 'rel' or 'abs')")
        _real(threshold, "threshold")
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        Parameters
        ----------
        state_dict : dict
        """
        with self._all_or_nothing():
            super().load_state_dict(state_dict)
            self._init_is_better(mode=self.mode, threshold=self.threshold, threshold_mode=self.threshold_mode)
            if not _is_real(self.factor) or not 0 <= self.factor < 1:
                raise ValueError(f"state_dict['factor'] must be in [0, 1), got {self.factor!r}")

    _STATE_CHECKS = {"patience": lambda v, name: _integer(v, name, minimum=0),
                     "cooldown": lambda v, name: _integer(v, name, minimum=0), "eps": _nonneg}


class _OneCyclePhase(TypedDict):
    """One phase of OneCycleLR's schedule: its last step, and the param-group keys it anneals between."""

    end_step: float
    start_lr: str
    end_lr: str
    start_momentum: str
    end_momentum: str


class OneCycleLR(LRScheduler):
    """The 1cycle policy: learning rate up from ``max_lr / div_factor`` to ``max_lr``, then down to
    ``max_lr / div_factor / final_div_factor``; momentum cycled inversely. Step it after every batch.

    With ``cycle_momentum=True`` the optimizer must have ``"betas"`` or ``"momentum"`` in its
    ``defaults`` (torch's test): ``betas[0]`` is cycled when ``defaults`` has ``"betas"``, else
    ``momentum``. The schedule has ``total_steps + 1`` points; stepping past them raises
    :class:`ValueError`.

    Parameters
    ----------
    optimizer : optimizer
    max_lr : float or list of float
        Peak learning rate, for all groups or per group.
    total_steps : int, optional
        Number of steps of the cycle; else ``epochs * steps_per_epoch``.
    epochs, steps_per_epoch : int, optional
        Used when ``total_steps`` is None.
    pct_start : float, default 0.3
        Fraction of the cycle spent increasing the learning rate, in [0, 1].
    anneal_strategy : {"cos", "linear"}, default "cos"
    cycle_momentum : bool, default True
    base_momentum, max_momentum : float or list of float, default 0.85, 0.95
        Momentum at the peak / at the start and end of the cycle.
    div_factor : float, default 25.0
        ``initial_lr = max_lr / div_factor``.
    final_div_factor : float, default 1e4
        ``min_lr = initial_lr / final_div_factor``.
    three_phase : bool, default False
        Up, symmetric down to ``initial_lr``, then down to ``min_lr`` (the paper's schedule),
        instead of fastai's two phases.
    last_epoch : int, default -1
        Index of the last batch, to resume.

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import OneCycleLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.1, momentum=0.9)
    >>> sched = OneCycleLR(opt, max_lr=1.0, total_steps=4, pct_start=0.5, anneal_strategy="linear")
    >>> lrs, moms = [], []
    >>> for _ in range(4):
    ...     lrs.append(round(opt.param_groups[0]["lr"], 6))
    ...     moms.append(round(opt.param_groups[0]["momentum"], 6))
    ...     opt.step()
    ...     sched.step()
    >>> lrs
    [0.04, 1.0, 0.500002, 4e-06]
    >>> moms
    [0.95, 0.85, 0.9, 0.95]
    """

    def __init__(self, optimizer: OptimizerLike, max_lr: float | Sequence[float], total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | Sequence[float] = 0.85, max_momentum: float | Sequence[float] = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        three_phase = check_bool(three_phase, "three_phase")   # ("False" is not a true flag here)
        cycle_momentum = check_bool(cycle_momentum, "cycle_momentum")
        if total_steps is not None:
            _integer(total_steps, "total_steps", error=ArgumentTypeError)
            if total_steps <= 0:
                raise ValueError(f"Expected positive integer total_steps, but got {total_steps}")
            self.total_steps = int(total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            _integer(epochs, "epochs", error=ArgumentTypeError)
            if epochs <= 0:
                raise ValueError(f"Expected positive integer epochs, but got {epochs}")
            _integer(steps_per_epoch, "steps_per_epoch", error=ArgumentTypeError)
            if steps_per_epoch <= 0:
                raise ValueError(f"Expected positive integer steps_per_epoch, but got {steps_per_epoch}")
            self.total_steps = int(epochs) * int(steps_per_epoch)
        else:
            raise ValueError("You must define either total_steps OR (epochs AND steps_per_epoch)")

        _real(pct_start, "pct_start", error=ArgumentTypeError)
        if pct_start < 0 or pct_start > 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', instead got {anneal_strategy!r}")
        self._anneal_func_type = anneal_strategy
        for name, value in (("div_factor", div_factor), ("final_div_factor", final_div_factor)):
            _real(value, name)
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")

        n = self.total_steps
        self._schedule_phases: list[_OneCyclePhase]
        if three_phase:
            self._schedule_phases = [
                dict(end_step=float(pct_start * n) - 1, start_lr="initial_lr", end_lr="max_lr",
                     start_momentum="max_momentum", end_momentum="base_momentum"),
                dict(end_step=float(2 * pct_start * n) - 2, start_lr="max_lr", end_lr="initial_lr",
                     start_momentum="base_momentum", end_momentum="max_momentum"),
                dict(end_step=n - 1, start_lr="initial_lr", end_lr="min_lr",
                     start_momentum="max_momentum", end_momentum="max_momentum"),
            ]
        else:
            self._schedule_phases = [
                dict(end_step=float(pct_start * n) - 1, start_lr="initial_lr", end_lr="max_lr",
                     start_momentum="max_momentum", end_momentum="base_momentum"),
                dict(end_step=n - 1, start_lr="max_lr", end_lr="min_lr",
                     start_momentum="base_momentum", end_momentum="max_momentum"),
            ]

        last_epoch = _check_last_epoch(last_epoch)
        with _groups_put_back_on_error(optimizer):   # (a refused argument leaves the groups as they were)
            max_lrs = _format_param("max_lr", optimizer, max_lr)
            if last_epoch == -1:
                for group, lr in zip(optimizer.param_groups, max_lrs):
                    group["initial_lr"] = lr / div_factor
                    group["max_lr"] = lr
                    group["min_lr"] = group["initial_lr"] / final_div_factor

            self.cycle_momentum = bool(cycle_momentum)
            if self.cycle_momentum:
                defaults = getattr(optimizer, "defaults", None)
                if not isinstance(defaults, dict):
                    defaults = optimizer.param_groups[0] if optimizer.param_groups else {}
                if "momentum" not in defaults and "betas" not in defaults:
                    raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
                self.use_beta1 = "betas" in defaults
                max_momentums = _format_param("max_momentum", optimizer, max_momentum)
                base_momentums = _format_param("base_momentum", optimizer, base_momentum)
                if last_epoch == -1:
                    _start_momentum(optimizer, max_momentums, base_momentums, self.use_beta1)
            super().__init__(optimizer, last_epoch)

    def _anneal_func(self, start: float, end: float, pct: float) -> float:
        if self._anneal_func_type == "cos":
            return self._annealing_cos(start, end, pct)
        return self._annealing_linear(start, end, pct)

    @staticmethod
    def _annealing_cos(start: float, end: float, pct: float) -> float:
        """Cosine from ``start`` to ``end`` as ``pct`` goes from 0 to 1."""
        cos_out = math.cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out

    @staticmethod
    def _annealing_linear(start: float, end: float, pct: float) -> float:
        """Straight line from ``start`` to ``end`` as ``pct`` goes from 0 to 1."""
        return (end - start) * pct + start

    def get_lr(self) -> list[float]:
        """The learning rates of step ``last_epoch``; also writes the cycled momentum / beta1 into
        the param groups when ``cycle_momentum``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        step_num = self.last_epoch
        if step_num > self.total_steps:
            raise ValueError(f"Tried to step {step_num} times. The specified number of total steps "
                             f"is {self.total_steps}")
        lrs = []
        momenta = []   # written once every group's are computed: a refused step changes no group
        last = len(self._schedule_phases) - 1
        for group in self.optimizer.param_groups:
            start_step = 0.0
            for i, phase in enumerate(self._schedule_phases):
                end_step = phase["end_step"]
                if step_num <= end_step or i == last:
                    span = end_step - start_step
                    if span == 0:
                        raise ZeroDivisionError(
                            f"OneCycleLR: phase {i} of the schedule is empty (pct_start * total_steps = "
                            f"{self._schedule_phases[0]['end_step'] + 1}); use a larger total_steps or a "
                            "different pct_start")
                    pct = (step_num - start_step) / span
                    lr = self._anneal_func(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    if self.cycle_momentum:
                        momentum = self._anneal_func(group[phase["start_momentum"]],
                                                     group[phase["end_momentum"]], pct)
                    break
                start_step = phase["end_step"]
            lrs.append(lr)
            if self.cycle_momentum:
                momenta.append(momentum)
        for group, momentum in zip(self.optimizer.param_groups, momenta):
            if self.use_beta1:
                group["betas"] = (momentum, *group["betas"][1:])
            else:
                group["momentum"] = momentum
        return lrs


class PolynomialLR(LRScheduler):
    r"""Decay each group's learning rate polynomially to zero over ``total_iters`` epochs, then
    keep it.

    The learning rate follows torch's recursion
    ``lr_t = lr_{t-1} * ((1 - t / total_iters) / (1 - (t - 1) / total_iters)) ** power`` for
    ``t <= total_iters``, which is ``base_lr * (1 - t / total_iters) ** power``.

    Parameters
    ----------
    optimizer : optimizer
    total_iters : int, default 5
        Epochs of the decay, >= 0. With 0 the chainable ``step()`` keeps each group's learning rate, and
        the closed form (``step(epoch)``, a ``SequentialLR`` milestone) divides by it:
        ``ZeroDivisionError``, as torch's.
    power : float, default 1.0
        The power of the polynomial, >= 0 (a negative one divides by zero at ``total_iters``).
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import PolynomialLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = PolynomialLR(opt, total_iters=4, power=2.0)
    >>> lrs = []
    >>> for _ in range(5):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    >>> lrs
    [0.5625, 0.25, 0.0625, 0.0, 0.0]
    """

    _STATE_CHECKS = {"total_iters": lambda v, name: _integer(v, name, minimum=0), "power": _nonneg}

    def __init__(self, optimizer: OptimizerLike, total_iters: int = 5, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        self.total_iters = _integer(total_iters, "total_iters", minimum=0)
        self.power = _nonneg(power, "power")
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """torch's recursive polynomial step from the current ``group["lr"]``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        t, total = self.last_epoch, self.total_iters
        if self._is_initial or t > total:
            return self._current_lrs()
        decay_factor = ((1.0 - t / total) / (1.0 - (t - 1) / total)) ** self.power
        return [group["lr"] * decay_factor for group in self.optimizer.param_groups]

    def _get_closed_form_lr(self) -> list[float]:
        return [base_lr * (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters) ** self.power
                for base_lr in self.base_lrs]


class ChainedScheduler(_SchedulerSequence):
    """Step several schedulers of one optimizer together: each ``step()`` calls every scheduler's
    ``step()`` in order, so their factors compose (a warm-up and a decay, say).

    Parameters
    ----------
    schedulers : list of LRScheduler
        At least one, all of the same optimizer; :class:`ReduceLROnPlateau` is not supported (its
        ``step`` needs a metric).
    optimizer : optimizer, optional
        Their optimizer (default: the first scheduler's).

    Notes
    -----
    As everywhere in cembed, a ``step()`` that raises changes nothing: the schedulers stepped before
    the failing one and the optimizer's groups are put back as they were (torch leaves them stepped).

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import ChainedScheduler, ConstantLR, ExponentialLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = ChainedScheduler([ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.5)])
    >>> lrs = [sched.get_last_lr()[0]]
    >>> for _ in range(3):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    >>> lrs
    [0.1, 0.05, 0.25, 0.125]
    """

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: OptimizerLike | None = None) -> None:
        if optimizer is None and isinstance(schedulers, Sequence) and not isinstance(schedulers, LRScheduler) \
                and len(schedulers) > 0:
            optimizer = getattr(schedulers[0], "optimizer", None)
        self._schedulers = self._checked_schedulers(schedulers, optimizer)
        _check_optimizer(optimizer)
        self.optimizer = cast(OptimizerLike, optimizer)   # (checked: not None)
        self._last_lr = _group_values(self._schedulers[-1].optimizer, "lr")

    def step(self) -> None:  # type: ignore[override]
        """Step every scheduler, in order."""
        _check_group_lrs(self.optimizer)
        # (the schedulers' state, and the groups the earlier schedulers wrote)
        with _groups_put_back_on_error(self.optimizer), self._all_or_nothing():
            for scheduler in self._schedulers:
                scheduler.step()
            self._last_lr = _group_values(self._schedulers[-1].optimizer, "lr")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(type(s).__name__ for s in self._schedulers)})"


def _real_epoch(value: Any, name: str) -> Any:
    """A finite real epoch (fractional allowed)."""
    _real(value, name)
    if math.isinf(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class CosineAnnealingWarmRestarts(LRScheduler):
    r"""Cosine annealing with warm restarts (SGDR): each group's learning rate falls from its initial
    lr to ``eta_min`` along a cosine over ``T_i`` epochs, then restarts; ``T_0`` epochs until the
    first restart, each period ``T_mult`` times the one before.

    ``lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2``, ``T_cur`` the epochs
    since the last restart. ``step(epoch)`` takes a fractional epoch (call it after every batch with
    ``epoch + batch / n_batches``); unlike the other schedulers it does not warn about it (as torch).

    Parameters
    ----------
    optimizer : optimizer
    T_0 : int
        Epochs until the first restart, >= 1.
    T_mult : int, default 1
        Growth factor of the period after each restart, >= 1.
    eta_min : float, default 0.0
        Minimum learning rate.
    last_epoch : int, default -1

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import CosineAnnealingWarmRestarts
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
    >>> sched = CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
    >>> lrs = []
    >>> for _ in range(6):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    >>> lrs
    [0.5, 1.0, 0.853553, 0.5, 0.146447, 1.0]
    """

    _STATE_CHECKS = {"T_0": lambda v, name: _integer(v, name, minimum=1),
                     "T_mult": lambda v, name: _integer(v, name, minimum=1),
                     "T_i": lambda v, name: _integer(v, name, minimum=1),
                     "T_cur": _real_epoch, "eta_min": _real}

    def __init__(self, optimizer: OptimizerLike, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.T_0 = _integer(T_0, "T_0", minimum=1, error=ArgumentTypeError)
        self.T_i = self.T_0
        self.T_mult = _integer(T_mult, "T_mult", minimum=1, error=ArgumentTypeError)
        self.eta_min = _real(eta_min, "eta_min", error=ArgumentTypeError)
        self.T_cur: float = _check_last_epoch(last_epoch)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The cosine of the current period at ``T_cur``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        return [self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
                for base_lr in self.base_lrs]

    def step(self, epoch: float | None = None) -> None:
        """Advance by one epoch, or go to ``epoch`` (fractional allowed, >= 0).

        Parameters
        ----------
        epoch : float, optional
        """
        if epoch is not None:
            epoch = _real_epoch(epoch, "epoch")
            if epoch < 0:
                raise ValueError(f"Expected non-negative epoch, but got {epoch}")
        _check_group_lrs(self.optimizer)
        with self._all_or_nothing():   # a refused step leaves the schedule where it was
            if epoch is None and self.last_epoch < 0:
                epoch = 0
            if epoch is None:
                epoch = self.last_epoch + 1
                self.T_cur = self.T_cur + 1
                if self.T_cur >= self.T_i:
                    self.T_cur = self.T_cur % self.T_i
                    self.T_i = self.T_i * self.T_mult
            elif epoch >= self.T_0:
                if self.T_mult == 1:
                    self.T_cur = epoch % self.T_0
                else:
                    n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                    self.T_cur = epoch - self.T_0 * (self.T_mult ** n - 1) / (self.T_mult - 1)
                    self.T_i = self.T_0 * self.T_mult ** n
            else:
                self.T_i = self.T_0
                self.T_cur = epoch
            self.last_epoch = math.floor(epoch)
            self._get_lr_called_within_step = True
            try:
                values = self.get_lr()
            finally:
                self._get_lr_called_within_step = False
            if len(values) != len(self.optimizer.param_groups):
                raise ValueError(f"{type(self).__name__} computed {len(values)} learning rates for "
                                 f"{len(self.optimizer.param_groups)} param groups (a group added after the "
                                 "scheduler was made has no base_lr)")
            for group, lr in zip(self.optimizer.param_groups, values):
                group["lr"] = lr
            self._last_lr = _group_values(self.optimizer, "lr")


_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


class CyclicLR(LRScheduler):
    """Cyclical learning rates: each group's learning rate goes from ``base_lr`` up to ``max_lr`` in
    ``step_size_up`` steps and back down in ``step_size_down``, the amplitude scaled per cycle
    (``"triangular"``: constant; ``"triangular2"``: halved each cycle) or per step
    (``"exp_range"``: ``gamma ** step``), or by a ``scale_fn`` of your own. Momentum (or ``betas[0]``)
    is cycled inversely between ``max_momentum`` and ``base_momentum``. Step it after every batch.

    The constructor sets every group's ``lr`` to its ``base_lr`` (and its momentum to
    ``max_momentum``) when ``last_epoch`` is -1. With ``cycle_momentum=True`` the optimizer must have
    ``"momentum"`` or ``"betas"`` in its ``defaults``.

    Parameters
    ----------
    optimizer : optimizer
    base_lr, max_lr : float or list of float
        The cycle's bounds, for all groups or per group.
    step_size_up : float, default 2000
        Steps of the rising half, > 0.
    step_size_down : float, optional
        Steps of the falling half, >= 0 (default ``step_size_up``).
    mode : {"triangular", "triangular2", "exp_range"}, default "triangular"
        Ignored when ``scale_fn`` is given.
    gamma : float, default 1.0
        ``"exp_range"``'s factor per step.
    scale_fn : callable, optional
        ``scale_fn(x)``: the amplitude's factor, ``x`` the cycle number (from 1) or the step
        (``scale_mode``).
    scale_mode : {"cycle", "iterations"}, default "cycle"
        What ``scale_fn`` is given (the built-in modes choose their own).
    cycle_momentum : bool, default True
    base_momentum, max_momentum : float or list of float, default 0.8, 0.9
    last_epoch : int, default -1
        Index of the last batch, to resume.

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.lr_scheduler import CyclicLR
    >>> opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=0.1, momentum=0.9)
    >>> sched = CyclicLR(opt, base_lr=0.1, max_lr=1.0, step_size_up=2, mode="triangular2")
    >>> lrs = [opt.param_groups[0]["lr"]]
    >>> for _ in range(8):
    ...     opt.step()
    ...     sched.step()
    ...     lrs.append(round(sched.get_last_lr()[0], 6))
    >>> lrs
    [0.1, 0.55, 1.0, 0.55, 0.1, 0.325, 0.55, 0.325, 0.1]
    """

    _STATE_CHECKS = {"total_size": lambda v, name: _positive_real(v, name),
                     "step_ratio": lambda v, name: _positive_fraction(v, name),
                     "gamma": _real,
                     "scale_mode": lambda v, name: _choice(v, name, ("cycle", "iterations")),
                     "cycle_momentum": lambda v, name: check_bool(v, name),
                     "use_beta1": lambda v, name: check_bool(v, name)}

    def __init__(self, optimizer: OptimizerLike, base_lr: float | Sequence[float], max_lr: float | Sequence[float],
                 step_size_up: float = 2000, step_size_down: float | None = None, mode: str = "triangular",
                 gamma: float = 1.0, scale_fn: Callable[[float], float] | None = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: float | Sequence[float] = 0.8,
                 max_momentum: float | Sequence[float] = 0.9, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        with _groups_put_back_on_error(optimizer):   # (the initial step can fail too: a scale_fn giving no number)
            self._construct(optimizer, base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn,
                            scale_mode, cycle_momentum, base_momentum, max_momentum, last_epoch)

    def _construct(self, optimizer: OptimizerLike, base_lr: Any, max_lr: Any, step_size_up: Any,
                   step_size_down: Any, mode: Any, gamma: Any, scale_fn: Any, scale_mode: Any, cycle_momentum: Any,
                   base_momentum: Any, max_momentum: Any, last_epoch: Any) -> None:
        last_epoch = _check_last_epoch(last_epoch)
        self.optimizer = optimizer
        base_lrs = _format_param("base_lr", optimizer, base_lr)
        max_lrs = _format_param("max_lr", optimizer, max_lr)
        up = float(_positive_real(step_size_up, "step_size_up"))
        down = up if step_size_down is None else float(_nonneg(step_size_down, "step_size_down"))
        if not math.isfinite(up + down):
            raise ValueError(f"step_size_up + step_size_down must be finite, got {up} + {down}")
        if scale_fn is None:
            _choice(mode, "mode", _CYCLIC_MODES)
        elif not callable(scale_fn):
            raise TypeError(f"scale_fn must be callable, got {type(scale_fn).__name__}")
        _choice(scale_mode, "scale_mode", ("cycle", "iterations"))
        _real(gamma, "gamma")
        cycle_momentum = check_bool(cycle_momentum, "cycle_momentum")
        defaults: dict[str, Any] = {}
        if cycle_momentum:
            found = getattr(optimizer, "defaults", None)
            defaults = found if isinstance(found, dict) else optimizer.param_groups[0] if optimizer.param_groups else {}
            if "momentum" not in defaults and "betas" not in defaults:
                raise ValueError("optimizer must support momentum or beta1 with `cycle_momentum` option enabled")
            base_momentums = _format_param("base_momentum", optimizer, base_momentum)
            max_momentums = _format_param("max_momentum", optimizer, max_momentum)
        # everything checked: now the groups are written
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                group["lr"] = lr
        self.max_lrs = max_lrs
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else ("iterations" if mode == "exp_range" else "cycle")
        self.cycle_momentum = cycle_momentum
        if cycle_momentum:
            self.use_beta1 = "betas" in defaults
            self.base_momentums = base_momentums
            self.max_momentums = max_momentums
            if last_epoch == -1:
                _start_momentum(optimizer, max_momentums, base_momentums, self.use_beta1)
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def scale_fn(self, x: float) -> float:
        """The amplitude's factor at cycle (or step) ``x``: ``scale_fn``'s, else the mode's."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma ** x

    def get_lr(self) -> list[float]:
        """The learning rates of batch ``last_epoch``; also writes the cycled momentum / beta1 into
        the param groups when ``cycle_momentum``.

        Returns
        -------
        list of float
        """
        self._warn_if_outside_step()
        n_groups = len(self.optimizer.param_groups)
        lists = [("base_lrs", self.base_lrs), ("max_lrs", self.max_lrs)] + (
            [("base_momentums", self.base_momentums), ("max_momentums", self.max_momentums)]
            if self.cycle_momentum else [])
        for name, values in lists:   # (before any group is written: a group added later has no cycle)
            if len(values) != n_groups:
                raise ValueError(f"CyclicLR has {len(values)} {name} for {n_groups} param groups (a group added "
                                 "after the scheduler was made has no cycle)")
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        scale = self.scale_fn(cycle if self.scale_mode == "cycle" else self.last_epoch)
        lrs = [base_lr + (max_lr - base_lr) * scale_factor * scale
               for base_lr, max_lr in zip(self.base_lrs, self.max_lrs)]
        if self.cycle_momentum:
            momenta = [max_m - (max_m - base_m) * scale_factor * scale
                       for base_m, max_m in zip(self.base_momentums, self.max_momentums)]
            for group, momentum in zip(self.optimizer.param_groups, momenta):
                if self.use_beta1:
                    group["betas"] = (momentum, *group["betas"][1:])
                else:
                    group["momentum"] = momentum
        return lrs

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state without the optimizer; a ``scale_fn`` that is a function or lambda
        is stored as ``None``, a callable object as a copy of its ``__dict__``.

        Returns
        -------
        dict
        """
        state = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in ("optimizer", "_scale_fn_custom")}
        fn = self._scale_fn_custom
        state["_scale_fn_custom"] = None if fn is None or isinstance(fn, types.FunctionType) or \
            not hasattr(fn, "__dict__") else copy.deepcopy(fn.__dict__)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`; the scheduler keeps its own ``scale_fn``
        (a callable object gets its saved ``__dict__`` back).

        Parameters
        ----------
        state_dict : dict
        """
        _check_state_dict(state_dict)
        saved_fn = state_dict.get("_scale_fn_custom")
        if saved_fn is not None and not isinstance(saved_fn, dict):
            raise ValueError("state_dict['_scale_fn_custom'] must be a dict or None")
        with self._all_or_nothing():
            self._load_checked({k: copy.deepcopy(v) for k, v in state_dict.items()
                                if k not in ("optimizer", "_scale_fn_custom")}, kept=("_scale_fn_custom",))
            if self._scale_fn_custom is None:   # (with a scale_fn of its own, the mode is not used)
                _choice(self.mode, "state_dict['mode']", _CYCLIC_MODES)
            if saved_fn is not None and self._scale_fn_custom is not None and hasattr(self._scale_fn_custom, "__dict__"):
                self._scale_fn_custom.__dict__.update(copy.deepcopy(saved_fn))

    def _state_objects(self) -> list[Any]:
        fn = self._scale_fn_custom
        return [self] + ([fn] if fn is not None and hasattr(fn, "__dict__") else [])
