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


# ---------------------------------------------------------------------------------------------
# EmbeddingBag (issue 5)
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Optimizers (issue 4)
# ---------------------------------------------------------------------------------------------
