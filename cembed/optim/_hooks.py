"""Hooks of the optimizers (torch.optim.Optimizer's): the handle that removes one, and the hooks
registered for every optimizer (``register_optimizer_step_pre_hook`` / ``..._post_hook``).

A hook is kept in an ordered dict under its handle's id; ids are unique across the process, so a
handle removes exactly the hook it was given for, once, from wherever it was registered.
"""
from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from typing import Any, Callable, Dict, Optional, Tuple

from .._validation import check_bool

StepPreHook = Callable[[Any, Tuple[Any, ...], Dict[str, Any]], Optional[Tuple[Tuple[Any, ...], Dict[str, Any]]]]
StepPostHook = Callable[[Any, Tuple[Any, ...], Dict[str, Any]], None]

_ids = itertools.count()

#: Step hooks of every optimizer: pre-hooks run before each optimizer's own, post-hooks after.
global_step_pre_hooks: "OrderedDict[int, StepPreHook]" = OrderedDict()
global_step_post_hooks: "OrderedDict[int, StepPostHook]" = OrderedDict()


class RemovableHandle:
    """What a ``register_*_hook`` call returns: ``remove()`` takes the hook out again (also as a
    context manager: ``with opt.register_step_pre_hook(hook): ...``), as
    ``torch.utils.hooks.RemovableHandle``. The handle does not keep the hooks' owner alive.

    Examples
    --------
    >>> import cembed
    >>> opt = cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
    >>> seen = []
    >>> handle = opt.register_step_post_hook(lambda optimizer, args, kwargs: seen.append("stepped"))
    >>> opt.step(); handle.remove(); opt.step()
    >>> seen
    ['stepped']
    """

    __slots__ = ("id", "_hooks")

    def __init__(self, hooks: "OrderedDict[int, Any]") -> None:
        self.id = next(_ids)
        self._hooks = weakref.ref(hooks)

    def remove(self) -> None:
        """Take the hook out (nothing happens if it is already out, or its owner is gone)."""
        hooks = self._hooks()
        if hooks is not None:
            hooks.pop(self.id, None)

    def __enter__(self) -> "RemovableHandle":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def add_hook(hooks: "OrderedDict[int, Any]", hook: Any, prepend: bool = False) -> RemovableHandle:
    """Register ``hook`` in ``hooks`` (last, or first with ``prepend``): its handle."""
    if not callable(hook):
        raise TypeError(f"a hook must be callable, got {type(hook).__name__}")
    prepend = check_bool(prepend, "prepend")
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    if prepend:
        hooks.move_to_end(handle.id, last=False)
    return handle


def run_hooks(hooks: "OrderedDict[int, Any]", *args: Any) -> None:
    """``hook(*args)`` for every hook, in order (those registered as they run wait for the next call)."""
    for hook in tuple(hooks.values()):
        hook(*args)


def run_replacing_hooks(hooks: "OrderedDict[int, Any]", owner: Any, value: Any) -> Any:
    """``value`` after every ``hook(owner, value)``, in order: a hook that returns something other
    than None replaces it for the hooks after it and the caller (torch's state dict hooks)."""
    for hook in tuple(hooks.values()):
        result = hook(owner, value)
        if result is not None:
            value = result
    return value


def register_optimizer_step_pre_hook(hook: StepPreHook) -> RemovableHandle:
    """Register a step pre-hook of every optimizer: ``hook(optimizer, args, kwargs)`` runs before each
    ``step()``, before the optimizer's own pre-hooks; it returns None or new ``(args, kwargs)`` for the
    step (as ``torch.optim.optimizer.register_optimizer_step_pre_hook``). While one is registered, fused
    backward + updates are refused (``Optimizer.register_step_pre_hook`` says why).

    Returns
    -------
    RemovableHandle

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.optimizer import register_optimizer_step_pre_hook
    >>> steps = []
    >>> with register_optimizer_step_pre_hook(lambda opt, args, kwargs: steps.append(type(opt).__name__)):
    ...     cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1).step()
    >>> steps
    ['SGD']
    """
    return add_hook(global_step_pre_hooks, hook)


def register_optimizer_step_post_hook(hook: StepPostHook) -> RemovableHandle:
    """Register a step post-hook of every optimizer: ``hook(optimizer, args, kwargs)`` runs after each
    ``step()`` (and each fused backward + update), after the optimizer's own post-hooks (as
    ``torch.optim.optimizer.register_optimizer_step_post_hook``).

    Returns
    -------
    RemovableHandle

    Examples
    --------
    >>> import cembed
    >>> from cembed.optim.optimizer import register_optimizer_step_post_hook
    >>> steps = []
    >>> with register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(len(args))):
    ...     cembed.optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1).step()
    >>> steps
    [1]
    """
    return add_hook(global_step_post_hooks, hook)
