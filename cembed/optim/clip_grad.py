"""Gradient clipping with torch's names and semantics: ``clip_grad_norm_`` and ``clip_grad_value_``.

Unlike torch's, these accept row-sparse gradients (:class:`cembed.SparseGrad`): only the stored
values are read and modified. Since a SparseGrad is coalesced (each row stored once), the norm of
its stored values is the norm of the dense gradient it stands for.

Every argument and gradient is checked before anything is modified: a call that raises leaves all
gradients exactly as they were. The norm is a fixed-order blocked reduction accumulated in float64,
so it is bitwise the same for any thread count.
"""
from __future__ import annotations

import math
import types
import warnings
from typing import Any, Iterable, List, Optional, Union

import numpy as np

from .. import _clip
from .._config import n_threads_for
from .._validation import check_bool, check_real, kernel_array
from ..sparse import SparseGrad

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

_EPS = 1e-6        # torch's: clip_coef = max_norm / (total_norm + 1e-6)

Parameters = Union[Any, Iterable[Any]]


def _modules(parameters: Parameters) -> List[Any]:
    """``parameters`` as a list of objects with ``.grad`` (one module, or an iterable of them)."""
    if hasattr(parameters, "grad"):
        return [parameters]
    if isinstance(parameters, (np.ndarray, SparseGrad)):
        raise TypeError(f"parameters must be a module with .grad or an iterable of modules, got a "
                        f"{type(parameters).__name__} (pass the module that owns the gradient)")
    try:
        is_generator = isinstance(parameters, types.GeneratorType)
        modules = list(parameters)
    except TypeError:
        raise TypeError("parameters must be a module with .grad or an iterable of modules, got "
                        f"{type(parameters).__name__}") from None
    if is_generator and not modules:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    for i, module in enumerate(modules):
        if not hasattr(module, "grad"):
            raise TypeError(f"parameters[{i}] must be a module with .grad, got {type(module).__name__}")
    return modules


def _writable_values(grad: SparseGrad) -> np.ndarray:
    """The array behind ``grad.values``, for an in-place update of the stored values.

    Uses ``SparseGrad._writable_values()`` when SparseGrad provides it (its ``.values`` may be a
    read-only view for callers); otherwise ``.values`` itself."""
    hook = getattr(grad, "_writable_values", None)
    return hook() if hook is not None else grad.values


class _Grad:
    """One gradient to clip: its stored values flat (for the kernels) and where to write them."""

    __slots__ = ("array", "flat")

    def __init__(self, array: np.ndarray):
        self.array = array                  # the stored values, written in place
        # None: the NumPy fallback (the kernels take C-contiguous, aligned arrays only)
        self.flat = array.reshape(-1) if array.flags.c_contiguous and array.flags.aligned else None


def _collect(parameters: Parameters, what: str) -> List[_Grad]:
    """Every distinct gradient, validated (type, dtype, byte order, writeable, one common dtype)."""
    grads: List[_Grad] = []
    seen = set()
    first = None            # (i, dtype) of the first gradient
    for i, module in enumerate(_modules(parameters)):
        grad = module.grad
        if grad is None or id(grad) in seen:
            continue        # a gradient listed twice is counted and modified once
        if isinstance(grad, SparseGrad):
            values = _writable_values(grad)
            where = f"parameters[{i}].grad.values"
        elif isinstance(grad, np.ndarray):
            values = grad
            where = f"parameters[{i}].grad"
        else:
            raise TypeError(f"parameters[{i}].grad must be a numpy array or a cembed.SparseGrad, "
                            f"got {type(grad).__name__}")
        if values.dtype.kind != "f" or values.dtype.itemsize not in (4, 8):
            raise TypeError(f"{where} must be float32 or float64, got dtype {values.dtype}")
        if not values.dtype.isnative:
            raise TypeError(f"{where} must be in native byte order, got dtype {values.dtype.str}")
        if first is None:
            first = (i, values.dtype)
        elif values.dtype != first[1]:
            raise TypeError(f"all gradients must have the same dtype: parameters[{first[0]}].grad is "
                            f"{first[1]} but parameters[{i}].grad is {values.dtype}")
        if not values.flags.writeable:
            raise ValueError(f"{where} is read-only but {what} modifies it in place")
        seen.add(id(grad))
        grads.append(_Grad(values))
    return grads


def _real(value: Any, name: str) -> float:
    return check_real(value, name, low=0.0, allow_inf=True)


def _norm_type(norm_type: Any) -> float:
    """A positive real or infinity (``float('inf')``, ``'inf'``; any string float() reads, as torch)."""
    if isinstance(norm_type, str):
        try:
            norm_type = float(norm_type)
        except ValueError:
            raise ValueError(f"norm_type must be a positive number or 'inf', got {norm_type!r}") from None
    return check_real(norm_type, "norm_type", low=0.0, low_open=True, allow_inf=True)


def _foreach(foreach: Any) -> None:
    if foreach is not None and not isinstance(foreach, (bool, np.bool_)):
        raise TypeError(f"foreach must be None or a bool, got {type(foreach).__name__}")


def _total_norm(grads: List[_Grad], p: float) -> float:
    """The p-norm of all stored values together, in float64 (a fixed-order reduction)."""
    if math.isinf(p):
        kind = _clip.KIND_MAX_ABS
    elif p == 1.0:
        kind = _clip.KIND_SUM_ABS
    elif p == 2.0:
        kind = _clip.KIND_SUM_SQ
    else:
        kind = _clip.KIND_SUM_POW
    total = 0.0
    for g in grads:
        flat = g.flat if g.flat is not None else kernel_array(g.array).reshape(-1)
        part = _clip.norm_reduce(flat, kind, p, n_threads_for(flat.shape[0], "elementwise"))
        if kind == _clip.KIND_MAX_ABS:
            if part > total or math.isnan(part):     # NaN wins and stays
                total = part
        else:
            total += part
    if kind == _clip.KIND_SUM_SQ:
        return math.sqrt(total)
    if kind == _clip.KIND_SUM_POW:
        try:
            return total ** (1.0 / p)
        except OverflowError:   # a small p: beyond float64's range, an infinite norm (torch's value)
            return math.inf
    return total


def clip_grad_norm_(parameters: Parameters, max_norm: float, norm_type: Union[float, str] = 2.0,
                    error_if_nonfinite: bool = False, foreach: Optional[bool] = None) -> np.floating:
    """Clip the gradient norm of one module or an iterable of modules, in place.

    The norm is taken over all gradients together, as if they were concatenated into one vector
    (torch: the norm of the per-parameter norms, the same value). If it exceeds ``max_norm``, every
    gradient is multiplied by ``max_norm / (total_norm + 1e-6)``; the coefficient is clamped to 1,
    so gradients are never scaled up. Same semantics as ``torch.nn.utils.clip_grad_norm_``, also
    for row-sparse gradients (which torch's refuses): a :class:`cembed.SparseGrad` contributes its
    stored values, and only those are scaled.

    Parameters
    ----------
    parameters : module or iterable of modules
        Objects with a ``.grad`` attribute (:class:`cembed.Embedding`, :class:`cembed.EmbeddingBag`,
        or anything with ``.weight`` and ``.grad``). A ``.grad`` is ``None`` (skipped), a float32 or
        float64 NumPy array, or a :class:`cembed.SparseGrad`; all gradients must share one dtype.
        A gradient object listed more than once is counted and scaled once (the same object: two
        modules whose ``.grad`` are different views of one buffer count and scale it twice, as in torch).
    max_norm : float
        Largest allowed norm, ``>= 0`` (``inf`` never clips).
    norm_type : float or str, default 2.0
        The p of the p-norm: any positive real, or ``float('inf')`` / ``'inf'`` for the max norm.
    error_if_nonfinite : bool, default False
        Raise ``RuntimeError`` (modifying nothing) if the total norm is NaN or infinite. Otherwise
        the gradients are scaled by the non-finite coefficient, as in torch.
    foreach : bool or None, default None
        Accepted for torch compatibility; there is a single implementation.

    Returns
    -------
    numpy.floating
        The total norm of the gradients before clipping, as a scalar of the gradients' dtype
        (``float32(0.0)`` when no parameter has a gradient).

    Raises
    ------
    TypeError
        ``max_norm`` or ``norm_type`` is not a number (or is a bool); a gradient is neither an
        array nor a SparseGrad, is not float32/float64, or the gradients' dtypes differ.
    ValueError
        ``max_norm`` is NaN or negative, ``norm_type <= 0``, or a gradient is read-only.
    RuntimeError
        ``error_if_nonfinite=True`` and the total norm is not finite.

    Notes
    -----
    The norm is accumulated in float64 over fixed blocks of the stored values, combined in a fixed
    order: the result is bitwise the same for any thread count and at least as accurate as torch's
    float32 accumulation. The coefficient and the products are computed in the gradients' dtype as
    torch does (``(total_norm + 1e-6).reciprocal() * max_norm``, clamped to 1). When the coefficient
    is exactly 1 the multiplication is skipped (``x * 1 == x``).

    A non-finite norm (``error_if_nonfinite=False``) gives torch's coefficient: 0 for an infinite norm,
    NaN for a NaN norm. A norm beyond float64's range (a small ``norm_type`` such as 0.001, whose
    ``1 / p``-th power overflows) is infinite, as torch's. With a NaN coefficient torch's dense
    gradient becomes NaN everywhere, while a SparseGrad here only has its stored values set to NaN
    (its other rows stay implicitly zero).

    Examples
    --------
    >>> import numpy as np
    >>> import cembed
    >>> from cembed.optim.clip_grad import clip_grad_norm_
    >>> emb = cembed.Embedding(10, 2, sparse=True)
    >>> emb.grad = cembed.SparseGrad([1, 4], np.array([[3.0, 0.0], [0.0, 4.0]], dtype=np.float32), 10)
    >>> clip_grad_norm_(emb, max_norm=1.0)
    np.float32(5.0)
    >>> emb.grad.values
    array([[0.5999999 , 0.        ],
           [0.        , 0.79999983]], dtype=float32)
    >>> clip_grad_norm_([emb], max_norm=1.0, norm_type="inf")  # already within max_norm: unchanged
    np.float32(0.79999983)
    """
    p = _norm_type(norm_type)
    max_norm = _real(max_norm, "max_norm")
    error_if_nonfinite = check_bool(error_if_nonfinite, "error_if_nonfinite")
    _foreach(foreach)
    grads = _collect(parameters, "clip_grad_norm_")
    if not grads:
        return np.float32(0.0)
    dtype = grads[0].array.dtype.type
    with np.errstate(over="ignore"):              # a float32 norm beyond float32's range is inf
        total = dtype(_total_norm(grads, p))
    if error_if_nonfinite and not np.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite ({total}), so it "
            "cannot be clipped. To disable this error and scale the gradients by the non-finite norm "
            "anyway, set `error_if_nonfinite=False`")
    with np.errstate(all="ignore"):     # inf / nan norms give 0 / nan coefficients, as in torch
        coef = np.minimum(dtype(1) / (total + dtype(_EPS)) * dtype(max_norm), dtype(1))
    if coef != 1:                       # also NaN
        for g in grads:
            if g.flat is not None:
                _clip.transform_(g.flat, 0, float(coef), 0.0, n_threads_for(g.flat.shape[0], "elementwise"))
            else:
                with np.errstate(all="ignore"):
                    np.multiply(g.array, coef, out=g.array)
    return total


def clip_grad_value_(parameters: Parameters, clip_value: float, foreach: Optional[bool] = None) -> None:
    """Clamp every stored gradient value into ``[-clip_value, clip_value]``, in place.

    Same semantics as ``torch.nn.utils.clip_grad_value_`` (NaN values stay NaN), also for
    row-sparse gradients: a :class:`cembed.SparseGrad` has its stored values clamped (rows it does
    not store are zero, which is inside the range).

    Parameters
    ----------
    parameters : module or iterable of modules
        Objects with a ``.grad`` attribute, as for :func:`clip_grad_norm_`.
    clip_value : float
        The bound, ``>= 0`` (torch also accepts a negative bound, which sets every value to it;
        cembed refuses it).
    foreach : bool or None, default None
        Accepted for torch compatibility; there is a single implementation.

    Raises
    ------
    TypeError
        ``clip_value`` is not a number (or is a bool), or a gradient has an unsupported type/dtype
        or the gradients' dtypes differ.
    ValueError
        ``clip_value`` is NaN or negative, or a gradient is read-only.

    Examples
    --------
    >>> import numpy as np
    >>> import cembed
    >>> from cembed.optim.clip_grad import clip_grad_value_
    >>> emb = cembed.Embedding(10, 2)
    >>> emb.grad = cembed.SparseGrad([2], np.array([[-3.0, 0.25]]), 10)
    >>> clip_grad_value_(emb, 0.5)
    >>> emb.grad.values
    array([[-0.5 ,  0.25]])
    """
    clip_value = _real(clip_value, "clip_value")
    _foreach(foreach)
    grads = _collect(parameters, "clip_grad_value_")
    for g in grads:
        dtype = g.array.dtype.type
        with np.errstate(over="ignore"):          # a bound beyond the dtype's range is inf: no clamp
            lo, hi = dtype(-clip_value), dtype(clip_value)
        if g.flat is not None:
            _clip.transform_(g.flat, 1, float(lo), float(hi), n_threads_for(g.flat.shape[0], "elementwise"))
        else:
            np.clip(g.array, lo, hi, out=g.array)
