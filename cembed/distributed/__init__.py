"""cembed.distributed: row-sharded embedding tables on Ray actors (the optional ``ray`` extra:
``pip install "ray>=2.40"``).

:class:`ShardedEmbedding` spreads a table's rows (and their optimizer state) over Ray actors, row
``r`` on shard ``r % num_shards``; training is bitwise equal to one process, and a shard that dies
is restored from its checkpoint and brought back to the current step by replay.

Importing this package does not import Ray; constructing a :class:`ShardedEmbedding` or calling
:func:`init_local` does. Ray contacts outside addresses when it starts: start it only inside a
network namespace that has nothing but loopback (``tests/ray/run.sh``, ``docs/distributed.md``).
"""
from ._init import INITS, initial_rows
from ._ray import connect, init_local, network_interfaces, only_loopback
from ._shard import OPTIMIZERS
from ._client import ShardedEmbedding, ShardLostError

__all__ = ["ShardedEmbedding", "ShardLostError", "initial_rows", "init_local", "connect",
           "network_interfaces", "only_loopback", "INITS", "OPTIMIZERS"]
