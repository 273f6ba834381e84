"""cembed.functional: the stateless operations (torch.nn.functional's embedding family)."""
from ._lookup import embedding, embedding_renorm_
from ._backward import coalesce, embedding_backward
from .embedding_bag import embedding_bag

__all__ = ["embedding", "embedding_renorm_", "embedding_backward", "coalesce", "embedding_bag"]
