"""SparseGrad: a row-sparse (COO, one sparse dimension) gradient that is always coalesced."""
import numpy as np

from ._validation import FLOAT_DTYPES, check_size


class SparseGrad:
    """Row-sparse gradient of a ``(num_rows, dim)`` table.

    ``indices``: int64 ``(nnz,)``, strictly increasing (always coalesced: each row once).
    ``values``: ``(nnz, dim)``, float32 or float64, row ``k`` is the gradient of row ``indices[k]``.
    """

    __slots__ = ("indices", "values", "num_rows")

    def __init__(self, indices, values, num_rows, *, check=True):
        num_rows = check_size(num_rows, "num_rows")
        indices = np.asarray(indices)
        values = np.asarray(values)
        if check:
            if indices.dtype.kind not in "iu" or indices.dtype == np.bool_:
                raise TypeError(f"SparseGrad indices must be integers, got dtype {indices.dtype}")
            if values.dtype not in FLOAT_DTYPES:
                raise TypeError(f"SparseGrad values must be float32 or float64, got dtype {values.dtype}")
            if indices.ndim != 1:
                raise ValueError(f"SparseGrad indices must be 1-D, got shape {indices.shape}")
            if values.ndim != 2 or values.shape[0] != indices.shape[0]:
                raise ValueError(
                    f"SparseGrad values must have shape (nnz, dim) = ({indices.shape[0]}, dim), got {values.shape}"
                )
            if indices.size:
                if indices.min() < 0 or indices.max() >= num_rows:
                    bad = np.flatnonzero((indices < 0) | (indices >= num_rows))[0]
                    raise IndexError(
                        f"SparseGrad indices contains {indices[bad]} at position {bad}, outside [0, {num_rows})"
                    )
                if indices.size > 1 and not np.all(indices[1:] > indices[:-1]):
                    raise ValueError("SparseGrad indices must be strictly increasing (coalesced)")
        self.indices = np.ascontiguousarray(indices, dtype=np.int64)
        self.values = np.ascontiguousarray(values)
        self.num_rows = num_rows

    @property
    def shape(self):
        return (self.num_rows, self.values.shape[1])

    @property
    def nnz(self):
        return int(self.indices.shape[0])

    @property
    def dtype(self):
        return self.values.dtype

    def to_dense(self):
        out = np.zeros(self.shape, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out

    def merge(self, other):
        """``self + other`` as a new coalesced gradient (rows present in both are summed,
        ``self``'s value first). Work is O(nnz), independent of num_rows."""
        if not isinstance(other, SparseGrad):
            raise TypeError(f"can only merge a SparseGrad with a SparseGrad, got {type(other).__name__}")
        if other.shape != self.shape:
            raise ValueError(f"cannot merge SparseGrads of shapes {self.shape} and {other.shape}")
        if other.dtype != self.dtype:
            raise TypeError(f"cannot merge SparseGrads of dtypes {self.dtype} and {other.dtype}")
        from . import _sparse_merge
        from ._config import n_threads_for

        n_a, n_b = self.nnz, other.nnz
        rows = np.empty(n_a + n_b, dtype=np.int64)
        a_slot = np.empty(n_a, dtype=np.int64)
        b_slot = np.empty(n_b, dtype=np.int64)
        n_out = _sparse_merge.merge_plan(self.indices, other.indices, rows, a_slot, b_slot)
        values = np.empty((n_out, self.values.shape[1]), dtype=self.values.dtype)
        _sparse_merge.merge_values(self.values, a_slot, other.values, b_slot, values, n_threads_for(n_out, 4096))
        return SparseGrad(rows[:n_out].copy(), values, self.num_rows, check=False)

    __add__ = merge

    def __repr__(self):
        return f"SparseGrad(shape={self.shape}, nnz={self.nnz}, dtype={self.dtype})"
