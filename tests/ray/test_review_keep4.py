"""Regression tests of the fourth review of the sharded table's faults (2026-11-27): a step every shard
refuses while one shard is down is rolled back (the restarted shard replayed to the step before it),
not a ShardLostError saying it was applied; a checkpoint a shard could not write is reported also when
the compiled graph broke in the same step. Runs only inside tests/ray/run.sh (see conftest.py)."""
import os
import signal

import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding

from test_recovery import wait_gone
from test_sharded import assert_same_state, random_step, single_process, use_shard_class

V, D = 11, 4


@pytest.mark.parametrize("compiled", [False, True])
def test_a_refused_step_with_a_restarted_shard_is_rolled_back(ray_local, tmp_path, monkeypatch, compiled):
    """Every shard's optimizer refuses step 3 while shard 1, killed, was restarted at step 2: the client
    replays shard 1 to step 3 and rolls the step back (ValueError, the table usable at step 3). Before:
    ShardLostError "applied by others" (actor calls) or "refused when it was replayed" (graph)."""
    import refusing_shard

    use_shard_class(monkeypatch, refusing_shard.RefusesMarkedSteps)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=compiled)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 2)
    rng = np.random.default_rng(4)

    def grad():
        return rng.standard_normal((V, D)).astype(np.float32)

    try:
        for _ in range(3):                        # steps 0-2; checkpoints of step 2
            g = grad()
            emb.backward(g, np.arange(V), optimizer=opt)
            table.backward(g, np.arange(V), step=True)
        table.sync()
        for k in range(2):                        # every shard's optimizer refuses step 3
            open(refusing_shard.marker(table._shard_dir(k), 3), "w").close()
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)              # shard 1 dies while idle; Ray restarts it at step 2
        wait_gone(pid)
        table.backward(grad(), np.arange(V), step=True)   # step 3: refused by every shard
        with pytest.raises(ValueError, match="applied by none"):
            table.sync()
        assert table.step_count == 3
        for k in range(2):
            os.remove(refusing_shard.marker(table._shard_dir(k), 3))
        g = grad()
        emb.backward(g, np.arange(V), optimizer=opt)
        table.backward(g, np.arange(V), step=True)
        table.sync()
        assert table.step_count == 4
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown(checkpoint=False)


def test_a_failed_checkpoint_is_reported_when_the_graph_breaks_in_the_same_step(ray_local, tmp_path, monkeypatch):
    """compiled graph, checkpoint_every=1: shard 0 cannot write the checkpoint of step 3 while shard 1 is
    down; the graph's answers are lost and both shards are recovered. Shard 0's missing checkpoint is
    reported (it was not: the user was never told step 3 was not on disk)."""
    import failing_saves_shard
    from cembed.distributed._shard import held_checkpoints

    use_shard_class(monkeypatch, failing_saves_shard.FailsSomeSaves)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                             compiled_graph=True)
    rng = np.random.default_rng(4)

    def step():
        random_step(table, rng)

    try:
        for _ in range(2):
            step()
        table.sync()
        assert table.transport == "compiled graph" and table._graph is not None
        open(failing_saves_shard.marker(table._shard_dir(0), 3), "w").close()
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        step()                                                    # step 3
        reported = False
        try:
            table.sync()
        except RuntimeError as exc:
            reported = "could not be written" in str(exc)
        on_disk = [h["step"] for h in held_checkpoints(table._shard_dir(0))]
        assert 3 not in on_disk and reported, f"shard 0 holds {on_disk}; its failed checkpoint of step 3 was not reported"
    finally:
        table.shutdown(checkpoint=False)
