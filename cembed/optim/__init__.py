"""cembed.optim: SGD, SparseAdam and Adagrad for embedding tables, with torch's names, defaults and
update rules (SPEC_torch §8), as fused kernels that read and write only the rows a gradient names.

``params`` is an iterable of modules (anything with ``.weight`` and ``.grad``); ``.grad`` is a dense
array or a :class:`cembed.SparseGrad`. ``step()`` validates every gradient before it changes anything:
a refused step leaves weights and optimizer state exactly as they were.
"""
import copy
import json
import math
import numbers

import numpy as np

from .. import _optim
from .._config import n_threads_for
from .._validation import FLOAT_DTYPES
from ..sparse import SparseGrad

__all__ = ["Optimizer", "SGD", "SparseAdam", "Adagrad"]

_ROW_GRAIN = 512  # rows per thread below which a step stays on one thread


def _real(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"Invalid {name} value: nan")
    return value


class Optimizer:
    """Base class: parameter bookkeeping, zero_grad, state_dict / load_state_dict, save / load."""

    _state_arrays = ()      # names of the per-parameter state entries that are weight-shaped arrays

    def __init__(self, params, defaults):
        if isinstance(params, (np.ndarray, SparseGrad)) or hasattr(params, "weight"):
            params = [params]
        self.modules = list(params)
        if not self.modules:
            raise ValueError("optimizer got an empty parameter list")
        for i, module in enumerate(self.modules):
            if not hasattr(module, "weight") or not hasattr(module, "grad"):
                raise TypeError(f"params[{i}] must be a module with .weight and .grad, "
                                f"got {type(module).__name__}")
            w = module.weight
            if not isinstance(w, np.ndarray) or w.ndim != 2:
                raise ValueError(f"params[{i}].weight must be a 2-D numpy array")
            if w.dtype not in FLOAT_DTYPES:
                raise TypeError(f"params[{i}].weight must be float32 or float64, got {w.dtype}")
        self.defaults = dict(defaults)
        self.param_groups = [dict(defaults, params=list(range(len(self.modules))))]
        self.state = {i: {} for i in range(len(self.modules))}

    # ------------------------------------------------------------------ housekeeping
    def zero_grad(self):
        """Set every parameter's gradient to None (torch's default set_to_none=True)."""
        for module in self.modules:
            module.grad = None

    def __repr__(self):
        opts = ", ".join(f"{k}={v!r}" for k, v in self.param_groups[0].items() if k != "params")
        return f"{type(self).__name__}({opts})"

    @property
    def _group(self):
        return self.param_groups[0]

    def state_dict(self):
        """{"state": {i: {...}}, "param_groups": [{hyper-parameters..., "params": [...]}]}, deep copies."""
        return {"state": copy.deepcopy(self.state), "param_groups": copy.deepcopy(self.param_groups)}

    def load_state_dict(self, state_dict):
        """Restore a state_dict (deep copies). Checked fully first: on error nothing changes."""
        try:
            state = state_dict["state"]
            groups = state_dict["param_groups"]
        except (TypeError, KeyError):
            raise ValueError("state_dict must have 'state' and 'param_groups' entries") from None
        if len(groups) != 1 or sorted(groups[0].get("params", [])) != list(range(len(self.modules))):
            raise ValueError(f"state_dict is for a different set of parameters "
                             f"(expected {len(self.modules)} parameters in one group)")
        missing = set(self.defaults) - set(groups[0])
        if missing:
            raise ValueError(f"state_dict param_groups lack {sorted(missing)}")
        new_state = {}
        for key, entry in state.items():
            i = int(key)
            if not 0 <= i < len(self.modules):
                raise ValueError(f"state_dict has state for parameter {i}, which does not exist")
            weight = self.modules[i].weight
            for name in self._state_arrays:
                if name in entry and entry[name] is not None:
                    arr = np.asarray(entry[name])
                    if arr.shape != weight.shape or arr.dtype != weight.dtype:
                        raise ValueError(f"state_dict entry {name!r} of parameter {i} has shape {arr.shape} "
                                         f"and dtype {arr.dtype}, expected {weight.shape} {weight.dtype}")
            new_state[i] = copy.deepcopy(dict(entry))
        for i in range(len(self.modules)):
            new_state.setdefault(i, {})
        self._check_loaded_state(new_state)
        self.state = new_state
        self.param_groups = copy.deepcopy(list(groups))

    def _check_loaded_state(self, state):
        pass

    def save(self, path):
        """Write state_dict() to ``path`` (NumPy .npz; no pickle)."""
        arrays = {}
        meta = {"class": type(self).__name__, "param_groups": self.param_groups, "state": {}}
        for i, entry in self.state.items():
            meta["state"][str(i)] = {}
            for name, value in entry.items():
                if isinstance(value, np.ndarray) or isinstance(value, np.generic):
                    arrays[f"{i}/{name}"] = np.asarray(value)
                    meta["state"][str(i)][name] = {"array": f"{i}/{name}",
                                                   "scalar": isinstance(value, np.generic)}
                else:
                    meta["state"][str(i)][name] = {"value": value}
        with open(path, "wb") as fh:
            np.savez(fh, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)

    def load(self, path):
        """Restore the state written by save(path)."""
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            if meta.get("class") != type(self).__name__:
                raise ValueError(f"{path} holds {meta.get('class')} state, not {type(self).__name__}")
            state = {}
            for i, entry in meta["state"].items():
                state[int(i)] = {}
                for name, spec in entry.items():
                    if "array" in spec:
                        arr = data[spec["array"]]
                        state[int(i)][name] = arr[()] if spec["scalar"] else arr
                    else:
                        state[int(i)][name] = spec["value"]
        self.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

    # ------------------------------------------------------------------ step
    def _grads(self):
        """[(i, module, grad)] for params with a gradient, every one validated first."""
        todo = []
        for i, module in enumerate(self.modules):
            grad = module.grad
            if grad is None:
                continue
            weight = module.weight
            if isinstance(grad, SparseGrad):
                if grad.shape != weight.shape:
                    raise ValueError(f"params[{i}]: gradient shape {grad.shape} does not match the "
                                     f"weight shape {weight.shape}")
                if grad.values.dtype != weight.dtype:
                    raise TypeError(f"params[{i}]: gradient dtype {grad.values.dtype} does not match the "
                                    f"weight dtype {weight.dtype}")
            elif isinstance(grad, np.ndarray):
                if grad.shape != weight.shape:
                    raise ValueError(f"params[{i}]: gradient shape {grad.shape} does not match the "
                                     f"weight shape {weight.shape}")
                if grad.dtype != weight.dtype:
                    raise TypeError(f"params[{i}]: gradient dtype {grad.dtype} does not match the "
                                    f"weight dtype {weight.dtype}")
            else:
                raise TypeError(f"params[{i}].grad must be a numpy array or a cembed.SparseGrad, "
                                f"got {type(grad).__name__}")
            if not weight.flags.writeable:
                raise ValueError(f"params[{i}].weight is read-only")
            if not weight.flags.c_contiguous:
                raise ValueError(f"params[{i}].weight must be C-contiguous for in-place updates")
            self._check_grad(i, grad)
            todo.append((i, module, grad))
        return todo

    def _check_grad(self, i, grad):
        pass

    def step(self):
        """One update of every parameter that has a gradient."""
        for i, module, grad in self._grads():
            self._update(i, module.weight, grad)


class SparseAdam(Optimizer):
    """torch.optim.SparseAdam: lazy Adam on the rows present in each (sparse) gradient; one step
    counter per parameter that advances on every step, also for an empty gradient."""

    _state_arrays = ("exp_avg", "exp_avg_sq")

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        lr = _real(lr, "lr")
        eps = _real(eps, "eps")
        if not 0.0 < lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 < eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        try:
            beta1, beta2 = betas
        except (TypeError, ValueError):
            raise ValueError(f"betas must be a pair of numbers, got {betas!r}") from None
        beta1, beta2 = _real(beta1, "betas[0]"), _real(beta2, "betas[1]")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {beta1}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {beta2}")
        super().__init__(params, dict(lr=lr, betas=(beta1, beta2), eps=eps, maximize=bool(maximize)))

    def _check_grad(self, i, grad):
        if not isinstance(grad, SparseGrad):
            raise TypeError("SparseAdam does not support dense gradients, please consider Adam instead "
                            f"(params[{i}].grad is a dense array; use sparse=True)")

    def _update(self, i, weight, grad):
        group = self._group
        state = self.state[i]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = np.zeros(weight.shape, dtype=weight.dtype)  # lazily zeroed pages
            state["exp_avg_sq"] = np.zeros(weight.shape, dtype=weight.dtype)
        state["step"] += 1
        if grad.nnz == 0:
            return
        beta1, beta2 = group["betas"]
        step = state["step"]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
        _optim.sparse_adam_rows(weight, state["exp_avg"], state["exp_avg_sq"], grad.indices, grad.values,
                                beta1, beta2, group["eps"], step_size, group["maximize"],
                                n_threads_for(grad.nnz, _ROW_GRAIN))


class Adagrad(Optimizer):
    """torch.optim.Adagrad: ``sum += g*g``; ``w -= clr * g / (sqrt(sum) + eps)`` with
    ``clr = lr / (1 + (step - 1) * lr_decay)``; a float32 step counter; state created here."""

    _state_arrays = ("sum",)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, maximize=False):
        values = dict(lr=_real(lr, "lr"), lr_decay=_real(lr_decay, "lr_decay"),
                      weight_decay=_real(weight_decay, "weight_decay"),
                      initial_accumulator_value=_real(initial_accumulator_value, "initial_accumulator_value"),
                      eps=_real(eps, "eps"))
        if values["lr"] < 0:
            raise ValueError(f"Invalid learning rate: {values['lr']}")
        for name in ("lr_decay", "weight_decay", "initial_accumulator_value", "eps"):
            if values[name] < 0:
                raise ValueError(f"Invalid {name} value: {values[name]}")
        super().__init__(params, dict(values, maximize=bool(maximize)))
        for i, module in enumerate(self.modules):
            init = values["initial_accumulator_value"]
            state_sum = np.zeros(module.weight.shape, dtype=module.weight.dtype)  # lazily zeroed pages
            if init != 0:
                state_sum.fill(init)
            self.state[i] = {"step": np.float32(0.0), "sum": state_sum}

    def _check_grad(self, i, grad):
        if isinstance(grad, SparseGrad) and self._group["weight_decay"] != 0:
            raise ValueError("weight_decay option is not compatible with sparse gradients "
                             f"(params[{i}].grad is a SparseGrad)")

    def _check_loaded_state(self, state):
        for i, entry in state.items():
            if "sum" not in entry or "step" not in entry:
                raise ValueError(f"Adagrad state for parameter {i} needs 'step' and 'sum'")

    def _update(self, i, weight, grad):
        group = self._group
        state = self.state[i]
        state["step"] = np.float32(state["step"] + np.float32(1.0))
        clr = group["lr"] / (1 + (float(state["step"]) - 1) * group["lr_decay"])
        if isinstance(grad, SparseGrad):
            _optim.adagrad_rows(weight, state["sum"], grad.indices, grad.values, clr, group["eps"],
                                group["maximize"], n_threads_for(grad.nnz, _ROW_GRAIN))
            return
        g = -grad if group["maximize"] else grad
        if group["weight_decay"] != 0:
            g = g + weight.dtype.type(group["weight_decay"]) * weight
        state_sum = state["sum"]
        state_sum += g * g
        std = np.sqrt(state_sum)
        std += weight.dtype.type(group["eps"])
        weight -= weight.dtype.type(clr) * (g / std)


class SGD(Optimizer):
    """torch.optim.SGD. With sparse gradients the momentum buffer has torch's dense-equivalent
    semantics (rows keep their momentum after they stop appearing); cembed keeps it as a dense
    buffer plus the sorted set of rows whose buffer is live, and updates only those rows."""

    _state_arrays = ("momentum_buffer",)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False):
        lr = _real(lr, "lr")
        momentum = _real(momentum, "momentum")
        dampening = _real(dampening, "dampening")
        weight_decay = _real(weight_decay, "weight_decay")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=bool(nesterov),
                                      maximize=bool(maximize)))

    def _check_grad(self, i, grad):
        if isinstance(grad, SparseGrad) and self._group["weight_decay"] != 0:
            raise ValueError("weight_decay is not supported with sparse gradients "
                             f"(params[{i}].grad is a SparseGrad)")

    def _update(self, i, weight, grad):
        group = self._group
        lr, momentum = group["lr"], group["momentum"]
        if isinstance(grad, SparseGrad):
            n_threads = n_threads_for(grad.nnz, _ROW_GRAIN)
            if momentum == 0:
                _optim.sgd_rows(weight, grad.indices, grad.values, lr, group["maximize"], n_threads)
                return
            self._sparse_momentum(i, weight, grad)
            return
        g = -grad if group["maximize"] else grad
        if group["weight_decay"] != 0:
            g = g + weight.dtype.type(group["weight_decay"]) * weight
        if momentum != 0:
            state = self.state[i]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = np.array(g, copy=True)
                state["momentum_buffer"] = buf
            else:
                buf *= weight.dtype.type(momentum)
                buf += weight.dtype.type(1 - group["dampening"]) * g
            state["active_rows"] = None  # every row is live
            g = g + weight.dtype.type(momentum) * buf if group["nesterov"] else buf
        weight -= weight.dtype.type(lr) * g

    def _sparse_momentum(self, i, weight, grad):
        from .. import _sparse_merge

        group = self._group
        state = self.state[i]
        buf = state.get("momentum_buffer")
        first = buf is None
        if first:
            buf = np.zeros(weight.shape, dtype=weight.dtype)
            active = np.zeros(0, dtype=np.int64)
        else:
            active = state.get("active_rows")
            if active is None:
                active = np.arange(weight.shape[0], dtype=np.int64)
        n_a, n_b = active.size, grad.nnz
        rows = np.empty(n_a + n_b, dtype=np.int64)
        a_slot = np.empty(n_a, dtype=np.int64)
        b_slot = np.empty(n_b, dtype=np.int64)
        n_out = _sparse_merge.merge_plan(active, grad.indices, rows, a_slot, b_slot)
        rows = rows[:n_out].copy()
        grad_slot = np.full(n_out, -1, dtype=np.int64)
        grad_slot[b_slot] = np.arange(n_b, dtype=np.int64)
        _optim.sgd_momentum_rows(weight, buf, rows, grad_slot, grad.values, group["lr"], group["momentum"],
                                 group["dampening"], group["nesterov"], group["maximize"], first,
                                 n_threads_for(n_out, _ROW_GRAIN))
        state["momentum_buffer"] = buf
        state["active_rows"] = rows
