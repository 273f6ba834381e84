"""cembed: fast CPU embedding tables for NumPy.

torch.nn.Embedding / EmbeddingBag / F.embedding and the sparse-gradient optimizers (SGD, SparseAdam,
Adagrad) with torch's semantics and parameter names, as Cython kernels parallelised with OpenMP.
"""
__version__ = "0.1.0"

from ._config import get_num_threads, set_num_threads, show_config
from .sparse import SparseGrad
from .embedding import Embedding
from .embedding_bag import EmbeddingBag
from . import functional
from . import optim

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "SparseGrad",
    "functional",
    "optim",
    "get_num_threads",
    "set_num_threads",
    "show_config",
]
