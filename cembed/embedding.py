"""cembed.Embedding: the torch.nn.Embedding module on NumPy arrays."""
import numpy as np

from . import _lookup
from ._validation import (
    check_float_dtype,
    check_max_norm,
    check_size,
    check_weight,
    check_writeable,
    normalize_padding_idx,
)


def make_rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def init_weight(num_embeddings, embedding_dim, dtype, seed, padding_idx):
    """N(0, 1) init with the padding row zeroed (torch's reset_parameters)."""
    weight = make_rng(seed).standard_normal((num_embeddings, embedding_dim), dtype=dtype)
    if padding_idx is not None:
        weight[padding_idx] = 0
    return weight


def check_given_weight(_weight, num_embeddings, embedding_dim):
    weight = check_weight(_weight if isinstance(_weight, np.ndarray) else np.asarray(_weight), "_weight")
    if weight.shape != (num_embeddings, embedding_dim):
        raise ValueError(
            f"Shape of _weight {weight.shape} does not match (num_embeddings, embedding_dim) = "
            f"({num_embeddings}, {embedding_dim})"
        )
    return weight


def check_pretrained(embeddings):
    embeddings = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise ValueError(f"Embeddings parameter is expected to be 2-dimensional, got shape {embeddings.shape}")
    return embeddings


class TableModule:
    """What Embedding and EmbeddingBag share: the gradient slot, parameters() and repr."""

    def zero_grad(self):
        """Drop the accumulated gradient (torch's set_to_none=True)."""
        self.grad = None

    def parameters(self):
        return [self.weight]

    def _repr_options(self, options):
        """", name=value" for every option that is set (torch's extra_repr style)."""
        return "".join(f", {name}={value!r}" for name, value in options if value not in (None, False))

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


class Embedding(TableModule):
    """A lookup table of ``num_embeddings`` rows of size ``embedding_dim`` (torch.nn.Embedding).

    ``weight`` is a plain NumPy array; ``backward`` accumulates the gradient into ``.grad``
    (a dense array, or a :class:`cembed.SparseGrad` with ``sparse=True``)."""

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False,
                 dtype=np.float32, seed=None):
        self.num_embeddings = check_size(num_embeddings, "num_embeddings")
        self.embedding_dim = check_size(embedding_dim, "embedding_dim")
        self.padding_idx = normalize_padding_idx(padding_idx, self.num_embeddings)
        self.max_norm, self.norm_type = check_max_norm(max_norm, norm_type)
        self.scale_grad_by_freq = bool(scale_grad_by_freq)
        self.sparse = bool(sparse)
        if _weight is None:
            dtype = check_float_dtype(dtype)
            self.weight = init_weight(self.num_embeddings, self.embedding_dim, dtype, seed, self.padding_idx)
        else:
            self.weight = check_given_weight(_weight, self.num_embeddings, self.embedding_dim)
        self.requires_grad = not _freeze
        self.grad = None
        self._last_indices = None

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False):
        """Wrap ``embeddings`` (used as is, no copy); frozen by default; the padding row is kept."""
        embeddings = check_pretrained(embeddings)
        rows, dim = embeddings.shape
        return cls(rows, dim, padding_idx=padding_idx, max_norm=max_norm, norm_type=norm_type,
                   scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, _weight=embeddings, _freeze=freeze)

    def forward(self, indices):
        idx, flat = _lookup.validated_indices(indices, self.num_embeddings)
        if self.max_norm is not None and flat.size:
            check_writeable(self.weight, "max_norm renormalisation")
            _lookup.renorm_validated(self.weight, flat, self.max_norm, self.norm_type)
        self._last_indices = idx
        return _lookup.gather_validated(self.weight, idx, flat)

    __call__ = forward

    def backward(self, grad_output, indices=None, per_sample_weights=None):
        """Accumulate d(loss)/d(weight) into ``.grad`` given d(loss)/d(output) of a forward on
        ``indices`` (default: those of the last forward).

        With ``per_sample_weights`` (shape of indices), grad_output is the gradient of the weighted
        sum over the last index axis (shape indices.shape[:-1] + (dim,)); see
        :func:`cembed.functional.embedding_backward`."""
        from ._backward import accumulate_embedding_grad

        if indices is None:
            if self._last_indices is None:
                raise ValueError("backward: no indices given and no forward call to take them from")
            indices = self._last_indices
        self.grad = accumulate_embedding_grad(self, grad_output, indices, per_sample_weights)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}" + self._repr_options([
            ("padding_idx", self.padding_idx), ("max_norm", self.max_norm),
            ("norm_type", self.norm_type if self.norm_type != 2.0 else None),
            ("scale_grad_by_freq", self.scale_grad_by_freq), ("sparse", self.sparse)])
