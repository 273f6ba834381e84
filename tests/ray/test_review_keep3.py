"""Regression test of the third review of the shards' checkpoint slots (2026-11-27): the state the
client names as held by every shard is computed from what each shard's slots hold now (each
checkpoint answer and each recovered shard says so), never from which shards once wrote a step —
a shard may have overwritten it since. Runs only inside tests/ray/run.sh (see conftest.py)."""
import os
import signal

import numpy as np
import pytest

from cembed.checkpoint import CheckpointError
from cembed.distributed import ShardedEmbedding
from cembed.distributed._shard import held_checkpoints

from test_recovery import wait_gone
from test_sharded import random_step, use_shard_class

V, D = 41, 6


def states(table, k):
    return [(h["lineage"], h["step"]) for h in held_checkpoints(table._shard_dir(k))]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_step_a_shard_overwrote_is_not_taken_for_shared_after_a_recovery(ray_local, tmp_path, monkeypatch,
                                                                             compiled):
    """checkpoint_every=1; shard 1's disk is full for steps 2-4: shard 0 writes step 2, then step 3 over
    it (keeping step 1, the shared one). Shard 1 is then killed and its replay writes step 2. Before, the
    client counted step 2 as written by both shards (shard 0 had written it once) and had shard 0's next
    save keep step 2 — which it no longer held — overwriting step 1: the run could not be resumed. Now
    step 1 stays the shared state, kept, named by shutdown(), and the run resumes there bitwise."""
    import failing_saves_shard as review3_shard

    use_shard_class(monkeypatch, review3_shard.FailsSomeSaves)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                             compiled_graph=compiled)
    rng = np.random.default_rng(1)
    d1 = table._shard_dir(1)

    def step():
        random_step(table, rng)
        table.sync()

    try:
        step()                                                   # step 1: both shards hold (seed, 1)
        at_1 = table.state_dict()
        assert table._common == ("seed", 1)
        for s in (2, 3, 4):                                      # shard 1's disk is full for steps 2-4
            open(review3_shard.marker(d1, s), "w").close()
        for _ in range(2):                                       # steps 2, 3: shard 0 writes (seed, 2), then
            with pytest.raises(RuntimeError, match="could not be written"):   # (seed, 3) over it
                step()
        assert states(table, 0) == [("seed", 3), ("seed", 1)]
        assert states(table, 1) == [("seed", 1)]
        os.remove(review3_shard.marker(d1, 2))                   # some space came back
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        table.shard_info()             # recovered: restores step 1, replay writes (seed, 2), step 3's save fails
        assert table.recoveries == 1
        assert states(table, 1) == [("seed", 2), ("seed", 1)]
        problems = []
        if table._common != ("seed", 1):   # every shard holds (seed, 1); shard 0 does not hold (seed, 2)
            problems.append(f"_common {table._common}, shard 0 holds {states(table, 0)}")
        with pytest.raises(RuntimeError, match="could not be written"):
            step()                                               # step 4 (shard 1 still cannot write)
        if ("seed", 1) not in states(table, 0):
            problems.append(f"step 4: shard 0 overwrote the shared (seed, 1): it holds {states(table, 0)}, "
                            f"shard 1 {states(table, 1)}")
        with pytest.raises(RuntimeError) as info:
            table.shutdown()
        if "would resume at step 1" not in str(info.value):
            problems.append("shutdown(): " + str(info.value).split("(stopped as it is, ")[-1])
    finally:
        table.shutdown(checkpoint=False)
    for name in os.listdir(d1):
        if name.startswith("fail-save-"):
            os.remove(os.path.join(d1, name))
    monkeypatch.undo()
    try:
        resumed = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, checkpoint_dir=str(tmp_path), run_id=table.run_id,
                                   compiled_graph=False)
    except CheckpointError as exc:
        problems.append(f"resume: {exc}")
        resumed = None
    try:
        assert resumed is not None and resumed.step_count == 1, problems
        assert resumed.state_dict()["weight"].tobytes() == at_1["weight"].tobytes()
        assert not problems, problems
    finally:
        if resumed is not None:
            resumed.shutdown()


def test_a_checkpoint_that_a_replay_cannot_write_is_reported(ray_local, tmp_path, monkeypatch):
    """Shard 1 is killed after step 3 and its disk cannot take the checkpoint of step 4: its replay
    (steps 2-3 from its step-2 checkpoint) writes step 4 again and fails. The next call says so, once
    (as for a step's own checkpoint), and the table trains on bitwise; before, a replay's failed
    checkpoint was never reported."""
    import failing_saves_shard as review3_shard
    from test_sharded import assert_same_state, single_process

    use_shard_class(monkeypatch, review3_shard.FailsSomeSaves)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 2)
    rng = np.random.default_rng(4)
    d1 = table._shard_dir(1)

    def step():
        grad = rng.standard_normal((V, D)).astype(np.float32)
        emb.backward(grad, np.arange(V), optimizer=opt)
        table.backward(grad, np.arange(V), step=True)

    try:
        for _ in range(3):
            step()
        table.sync()
        open(review3_shard.marker(d1, 4), "w").close()
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        step()                                                   # step 4: shard 1 is replayed and fails to save
        with pytest.raises(RuntimeError, match=r"could not be written \(shard 1, step 4, written again by its "
                                               r"replay: OSError"):
            table.sync()
        table.sync()                                             # reported once
        assert table.step_count == 4 and table.recoveries == 1
        assert_same_state(table, emb, opt)
        os.remove(review3_shard.marker(d1, 4))
        for _ in range(2):
            step()
        table.sync()
        assert_same_state(table, emb, opt)
        assert [h["step"] for h in held_checkpoints(d1)] == [6, 2]
    finally:
        table.shutdown()
