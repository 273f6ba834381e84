"""Readable NumPy references for every cembed kernel: the slow, obvious version of each formula
(SPEC_torch.md), used as the oracle beside torch. Loops are written out where that is clearer."""
import numpy as np

# ---------------------------------------------------------------------------------------------
# Lookup and renorm (issue 2)
# ---------------------------------------------------------------------------------------------


def embedding(indices, weight):
    """weight[indices]: shape indices.shape + (dim,)."""
    return weight[np.asarray(indices)]


def row_norm(row, p):
    """The norm torch's embedding_renorm_ uses for norm_type p (SPEC_torch §4)."""
    a = np.abs(row.astype(np.float64))
    if p == np.inf:
        return a.max() if a.size else 0.0
    if p == -np.inf:
        return a.min() if a.size else np.inf
    if p == 0:
        return float(np.count_nonzero(row))
    return float(np.sum(a ** p) ** (1.0 / p))


def embedding_renorm_(weight, indices, max_norm, norm_type=2.0):
    """Each distinct referenced row with norm > max_norm is scaled by max_norm / (norm + 1e-7),
    the scale rounded to the weight's dtype. In place; returns weight."""
    for r in np.unique(np.asarray(indices).reshape(-1)):
        norm = float(weight.dtype.type(row_norm(weight[r], norm_type)))
        if norm > max_norm:
            weight[r] = weight[r] * weight.dtype.type(max_norm / (norm + 1e-7))
    return weight


# ---------------------------------------------------------------------------------------------
# Gradients (issue 3)
# ---------------------------------------------------------------------------------------------


def embedding_backward(grad_output, indices, num_embeddings, padding_idx=None, scale_grad_by_freq=False):
    """Dense gradient of weight[indices] (SPEC_torch §5.1): for each position in input order,
    G[r] += s * grad_output[i], skipping padding; s = fp32(1/count[r]) fused (fma) with sgbf."""
    idx = np.asarray(indices).reshape(-1)
    go = np.asarray(grad_output)
    go = go.reshape(idx.size, go.shape[-1])
    dtype = go.dtype
    grad = np.zeros((num_embeddings, go.shape[1]), dtype=dtype)
    counts = np.bincount(idx, minlength=num_embeddings) if idx.size else np.zeros(num_embeddings, int)
    for i, r in enumerate(idx):
        if r == padding_idx:
            continue
        if scale_grad_by_freq:
            s = dtype.type(1.0 / counts[r])
            # fma(g, s, acc) with one rounding: exact in float64 for float32 data, then rounded
            if dtype == np.float32:
                grad[r] = (go[i].astype(np.float64) * np.float64(s) + grad[r].astype(np.float64)).astype(dtype)
            else:
                grad[r] = go[i] * s + grad[r]  # float64: two roundings (compare with a tolerance)
        else:
            grad[r] = grad[r] + go[i]
    return grad


def coalesce(rows, values, num_rows):
    """(unique ascending rows, per-row sums of values in input order)."""
    rows = np.asarray(rows).reshape(-1)
    uniq = np.unique(rows)
    out = np.zeros((uniq.size, values.shape[1]), dtype=values.dtype)
    pos = {int(r): k for k, r in enumerate(uniq)}
    for i, r in enumerate(rows):
        out[pos[int(r)]] = out[pos[int(r)]] + values[i]
    return uniq.astype(np.int64), out


# ---------------------------------------------------------------------------------------------
# EmbeddingBag (issue 5)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Optimizers (issue 4)
# ---------------------------------------------------------------------------------------------
