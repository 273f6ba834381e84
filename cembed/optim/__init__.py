"""cembed.optim: torch's sparse-gradient optimizers for embedding tables.

``SGD``, ``SparseAdam`` and ``Adagrad`` with torch's names, defaults, update rules and surface —
param groups, ``step(closure)``, ``state_dict`` — as fused kernels that read and write only the rows
a gradient names. Parameters are modules (anything with ``.weight`` and ``.grad``: a
:class:`cembed.Embedding`, :class:`cembed.EmbeddingBag`, or your own object).

Nothing kept between steps is trusted: every ``step()`` re-checks each group's hyper-parameters,
each gradient and each state array against the module's current weight, for every parameter, before
it updates any (a refused step changes nothing); ``load_state_dict`` / ``load`` check a whole state
before taking any of it; ``save`` writes a temporary sibling file, syncs it and renames it into place.
"""
from .optimizer import Optimizer
from .sgd import SGD
from .sparse_adam import SparseAdam
from .sparse_adamw import SparseAdamW
from .adagrad import Adagrad
from .rowwise_adagrad import RowWiseAdagrad
from .clip_grad import clip_grad_norm_, clip_grad_value_
from . import lr_scheduler

__all__ = ["Optimizer", "SGD", "SparseAdam", "SparseAdamW", "Adagrad", "RowWiseAdagrad", "clip_grad_norm_",
           "clip_grad_value_", "lr_scheduler"]
