"""cembed: fast CPU embedding tables for NumPy.

``torch.nn.Embedding`` / ``EmbeddingBag`` / ``torch.nn.functional.embedding`` and the sparse-gradient
optimizers (SGD, SparseAdam, Adagrad) with torch's semantics and parameter names, as Cython kernels
parallelised with OpenMP. The layers, and who may import whom, are described in ``ARCHITECTURE.md``.
"""
__version__ = "0.1.0"

try:
    from . import _threads  # noqa: F401  (a compiled module: is this a built package?)
except ImportError as exc:  # pragma: no cover - depends on how cembed was installed
    import os as _os

    raise ImportError(
        f"cembed's compiled kernels are missing in {_os.path.dirname(__file__)}: this looks like an "
        "unbuilt source checkout shadowing the installed package. Run from another directory, or build "
        "in place with `pip install -e .` (or `python setup.py build_ext --inplace`)."
    ) from exc

from ._config import get_num_threads, release_memory, set_num_threads, show_config
from . import storage
from .storage import open_table
from .sparse import SparseGrad
from .modules import Embedding, EmbeddingBag
from . import functional
from . import optim
from . import checkpoint
from .checkpoint import load_checkpoint, save_checkpoint

__all__ = [
    "Embedding",
    "EmbeddingBag",
    "SparseGrad",
    "functional",
    "optim",
    "checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "open_table",
    "storage",
    "get_num_threads",
    "release_memory",
    "set_num_threads",
    "show_config",
]
