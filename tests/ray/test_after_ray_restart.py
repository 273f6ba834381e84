"""A table made before ray.shutdown() and a new init_local() in the same process (a notebook, a test
suite): its calls failed inside Ray — ValueError ('Could not find channel', which reads as a bad
argument) or a bare Exception — and sync() dropped its pending steps first. They are the RuntimeError
the docs promise for a table after ray.shutdown(). Runs first among the Ray test modules (name order:
it starts and stops its own Ray, before the shared one of conftest.ray_local), only inside
tests/ray/run.sh."""
import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding, init_local


@pytest.mark.parametrize("compiled", [True, False])
def test_a_table_of_an_earlier_ray_is_refused_in_a_new_one(_ray_allowed, compiled):
    ray = init_local(num_cpus=2)
    try:
        table = ShardedEmbedding(20, 4, 2, "sgd", {"lr": 0.1}, seed=0, compiled_graph=compiled)
        out = table(np.arange(4))
        table.backward(np.ones_like(out), step=True)
    finally:
        ray.shutdown()
    ray = init_local(num_cpus=2)          # another Ray: the table's actors and channels are not in it
    try:
        for call in (lambda: table(np.arange(3)), table.sync, table.state_dict, table.shard_info):
            with pytest.raises(RuntimeError, match="Ray was shut down") as info:
                call()
            assert type(info.value) is RuntimeError
        table.shutdown()                   # stops nothing (its actors went with the first Ray)
    finally:
        ray.shutdown()
