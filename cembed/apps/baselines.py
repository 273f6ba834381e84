"""The NumPy baselines: what a NumPy user writes without cembed, one function per kernel.

These are the idiomatic routes (``np.take``, ``np.add.at``, ``np.unique`` + ``np.add.at``, fancy-indexed
optimizer rules, ``np.add.reduceat``), written once and used by both ``python -m cembed bench`` and the
pytest-benchmark suites in ``benchmarks/``. They allocate fresh outputs, as they would in a training
loop. They follow torch's formulas (float32 arithmetic where torch uses it) but are baselines for
timing, not references for correctness: the parity tests compare cembed with torch itself.
"""
import numpy as np

__all__ = ["gather", "renorm_", "dense_grad", "coalesce", "sgd_step", "adagrad_step", "sparse_adam_step",
           "OPTIMIZER_STEPS", "optimizer_step", "train_step", "bag_sizes", "bag", "bag_mean_fwd_bwd"]


# ------------------------------------------------------------------------------------ lookup

def gather(weight, indices):
    """F.embedding: the rows of ``weight`` at ``indices``."""
    return np.take(weight, indices, axis=0)


def renorm_(weight, indices, max_norm):
    """F.embedding_renorm_ (p = 2) in place: rows of ``indices`` whose norm exceeds ``max_norm`` are
    scaled to ``max_norm / (norm + 1e-7)`` (torch's constant, computed in float64 here)."""
    rows = np.unique(indices)
    block = weight[rows]
    norms = np.linalg.norm(block, axis=1)
    big = norms > max_norm
    scale = (max_norm / (norms[big].astype(np.float64) + 1e-7)).astype(weight.dtype)
    weight[rows[big]] = block[big] * scale[:, None]


# ------------------------------------------------------------------------------------ gradients

def dense_grad(grad_output, indices, num_rows):
    """The dense embedding gradient: ``np.add.at`` into a zeroed (num_rows, D) table."""
    out = np.zeros((num_rows, grad_output.shape[-1]), dtype=grad_output.dtype)
    np.add.at(out, indices, grad_output)
    return out


def coalesce(indices, grad_output):
    """The coalesced (row-sparse) gradient: (unique ascending rows, their summed gradient rows)."""
    rows, inverse = np.unique(indices, return_inverse=True)
    values = np.zeros((rows.size, grad_output.shape[-1]), dtype=grad_output.dtype)
    np.add.at(values, inverse.reshape(-1), grad_output.reshape(-1, grad_output.shape[-1]))
    return rows, values


# ------------------------------------------------------------------------------------ optimizers
# Row-sparse rules on a coalesced gradient (unique ``rows``, ``values``): gather, compute, scatter.
# ``state`` is a dict the caller keeps between steps (created lazily, like torch's).

def sgd_step(weight, state, rows, values, lr=0.1):
    """torch.optim.SGD without momentum on a sparse gradient."""
    weight[rows] -= weight.dtype.type(lr) * values


def adagrad_step(weight, state, rows, values, lr=1e-2, eps=1e-10):
    """torch.optim.Adagrad (no lr_decay) on a sparse gradient."""
    h = state.setdefault("sum", np.zeros(weight.shape, weight.dtype))
    hr = h[rows] + values * values
    h[rows] = hr
    weight[rows] -= weight.dtype.type(lr) * values / (np.sqrt(hr) + weight.dtype.type(eps))


def sparse_adam_step(weight, state, rows, values, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.SparseAdam: lazy Adam on the rows of the gradient, one global step counter."""
    dtype = weight.dtype.type
    beta1, beta2 = betas
    m = state.setdefault("m", np.zeros(weight.shape, weight.dtype))
    v = state.setdefault("v", np.zeros(weight.shape, weight.dtype))
    state["step"] = step = state.get("step", 0) + 1
    m0, v0 = m[rows], v[rows]
    dm = (values - m0) * dtype(1 - beta1)
    dv = (values * values - v0) * dtype(1 - beta2)
    m[rows] = m0 + dm
    v[rows] = v0 + dv
    step_size = lr * np.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
    weight[rows] += dtype(-step_size) * ((dm + m0) / (np.sqrt(dv + v0) + dtype(eps)))


OPTIMIZER_STEPS = {"sgd": sgd_step, "adagrad": adagrad_step, "sparse_adam": sparse_adam_step}


def optimizer_step(kind, weight, state, rows, values, **hyper):
    """One step of ``kind`` ("sgd", "adagrad", "sparse_adam"; torch's class names accepted too)."""
    kind = {"SGD": "sgd", "Adagrad": "adagrad", "SparseAdam": "sparse_adam"}.get(kind, kind)
    return OPTIMIZER_STEPS[kind](weight, state, rows, values, **hyper)


def train_step(weight, state, indices, grad_output, lr=1e-3):
    """Forward (gather) + coalesced backward + SparseAdam step, the NumPy way."""
    gather(weight, indices)
    rows, values = coalesce(indices, grad_output)
    sparse_adam_step(weight, state, rows, values, lr=lr)


# ------------------------------------------------------------------------------------ bags
# Bags given by ``offsets`` (start of each bag, the first 0) over a 1-D ``indices``; every bag must
# be non-empty (``np.add.reduceat`` gives an empty bag the next row instead of zeros).

def bag_sizes(offsets, n_indices):
    """(B,) int64: the number of indices of each bag (the last one may be shorter)."""
    return np.diff(np.append(offsets, n_indices))


def bag(weight, indices, offsets, mode="mean"):
    """F.embedding_bag with mode "sum", "mean" or "max": gather, then ``ufunc.reduceat``."""
    ufunc = np.maximum if mode == "max" else np.add
    out = ufunc.reduceat(np.take(weight, indices, axis=0), offsets, axis=0)
    if mode == "mean":
        return out / bag_sizes(offsets, indices.size).astype(weight.dtype)[:, None]
    return out


def bag_mean_fwd_bwd(weight, indices, offsets, grad_output):
    """Mean bags forward, then the coalesced gradient for ``grad_output`` (B, D):
    returns (bags, rows, values)."""
    counts = bag_sizes(offsets, indices.size)
    sizes = counts.astype(weight.dtype)[:, None]
    out = np.add.reduceat(np.take(weight, indices, axis=0), offsets, axis=0) / sizes
    per_index = np.repeat(grad_output / sizes, counts, axis=0)
    rows, values = coalesce(indices, per_index)
    return out, rows, values
