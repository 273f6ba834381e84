"""Regression tests of the review of the shards' two checkpoint slots (2026-11-27): the state that every
shard holds a checkpoint of (the client's ``_common``) is never overwritten, whatever path its
checkpoints were answered through, and a run stays resumable at it, bitwise; a shard lost while a
state is loaded is sent the state again. Runs only inside tests/ray/run.sh (see conftest.py)."""
import os
import signal

import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding
from cembed.distributed._shard import held_checkpoints

from test_recovery import wait_gone
from test_sharded import assert_resumes_at, random_step, use_shard_class

V, D = 41, 6


def states(table, k):
    return [(h["slot"], h["lineage"], h["step"]) for h in held_checkpoints(table._shard_dir(k))]


@pytest.mark.parametrize("compiled", [False, True])
def test_a_checkpoint_written_by_a_replay_counts_and_the_shared_step_is_kept(ray_local, tmp_path, compiled):
    """Shard 1 is SIGKILLed between steps 1 and 2 (checkpoint_every=2): the client finds it lost at step
    2's answer and replays steps 0-1, so shard 1 writes its step-2 checkpoint during the replay. That
    counts: every shard holds (seed, 2), and when shard 1 then cannot write (slot b blocked), shard 0's
    later checkpoints keep step 2, the error names it, and the run resumes there bitwise. Before, only
    answers of steps counted: the client knew no shared state, shard 0 overwrote step 2 at step 6, and
    the run could not be resumed."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=compiled)
    rng = np.random.default_rng(1)

    def step():
        random_step(table, rng)

    try:
        step()
        table.sync()                                  # step 1
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        step()                                        # step 2 (no lookup in between: the loss is found at its answer)
        table.sync()
        assert table.recoveries == 1
        at_2 = table.state_dict()
        assert states(table, 0) == [("a", "seed", 2)] and states(table, 1) == [("a", "seed", 2)]
        blocked = os.path.join(table._shard_dir(1), "b")
        with open(blocked, "wb") as f:
            f.write(b"x")
        with pytest.raises(RuntimeError, match="checkpoint of step 4 could not be written"):
            step()
            step()
            table.sync()
        with pytest.raises(RuntimeError, match="checkpoint of step 4 could not be written.*would resume at step 2"):
            table.shutdown()                          # (the table still runs)
        with pytest.raises(RuntimeError, match="checkpoint of step 6 could not be written"):
            step()
            step()
            table.sync()
        assert states(table, 0) == [("b", "seed", 6), ("a", "seed", 2)]
    finally:
        table.shutdown(checkpoint=False)
    os.remove(blocked)
    assert_resumes_at(table, 2, at_2, compiled_graph=False)


def test_a_shard_that_dies_after_saving_a_loaded_state_is_sent_it_again(ray_local, tmp_path, monkeypatch):
    """load_state_dict: shard 1 writes the loaded state (lineage L, step 3) and dies before it answers.
    Ray restarts it from that checkpoint (its newest), and the client sends it its part again (a load
    replaces everything): the table is at step 3, bitwise one process. Before, the client tried to
    bring the restarted shard back to the pre-load step 5 from a log that starts at step 4:
    ShardLostError, though the shard held exactly the state being loaded."""
    import dying_shard as review_dying_shard
    from test_sharded import assert_same_state, single_process
    from test_recovery import train_step

    use_shard_class(monkeypatch, review_dying_shard.DiesAfterLoadSave)
    opts = {"lr": 0.03}
    table = ShardedEmbedding(V, D, 2, "sparseadam", opts, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    emb, opt = single_process(V, D, "sparseadam", opts, 4)
    rng = np.random.default_rng(3)
    try:
        for _ in range(3):
            train_step(rng, table, emb, opt)
        saved = table.state_dict()
        for _ in range(2):
            table.backward(np.ones_like(table(np.arange(5))), step=True)
        table.sync()
        open(os.path.join(table._shard_dir(1), review_dying_shard.MARKER), "w").close()
        table.load_state_dict(saved)
        assert table.step_count == 3
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown()


@pytest.mark.parametrize("every", [1, 2])
def test_compiled_graph_through_a_failed_checkpoint_then_resume(ray_local, tmp_path, every):
    """compiled_graph=True (the default): a periodic checkpoint shard 1 cannot write is reported by the
    next lookup (gathers already sent through the graph); repeating the lookup, training on, then
    shutdown(checkpoint=False) and resuming must be bitwise one process."""
    from test_sharded import assert_same_state, single_process, zipf_batch
    opts = {"lr": 0.03}
    table = ShardedEmbedding(V, D, 2, "sparseadam", opts, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=every,
                             compiled_graph=True)
    emb, opt = single_process(V, D, "sparseadam", opts, 4)
    rng = np.random.default_rng(3)
    reported = 0

    def train():
        nonlocal reported
        idx = zipf_batch(rng, V, (12, 2))
        for _ in range(3):
            try:
                out = table(idx)
                break
            except RuntimeError as exc:
                assert "could not be written" in str(exc)
                reported += 1
        assert out.tobytes() == emb(idx).tobytes()
        grad = rng.standard_normal(out.shape).astype(np.float32)
        table.backward(grad, step=True)
        emb.backward(grad, optimizer=opt)

    try:
        for _ in range(2):
            train()
        table.sync()
        at_2 = table.state_dict()
        keep_slot = [h["slot"] for h in held_checkpoints(table._shard_dir(1)) if h["step"] == 2][0]
        blocked = os.path.join(table._shard_dir(1), "b" if keep_slot == "a" else "a")
        if os.path.isdir(blocked):
            import shutil
            shutil.rmtree(blocked)
        with open(blocked, "wb") as f:
            f.write(b"x")
        for _ in range(4):
            train()
        try:
            table.sync()
        except RuntimeError:
            reported += 1
        assert reported >= 1
        assert table.transport == "compiled graph"
        assert_same_state(table, emb, opt)
        with pytest.raises(RuntimeError, match="would resume at step 2"):
            table.shutdown()
    finally:
        table.shutdown(checkpoint=False)
    os.remove(blocked)
    assert_resumes_at(table, 2, at_2)


@pytest.mark.parametrize("on_disk", [False, True])
@pytest.mark.parametrize("optimizer", ["sparseadam", "sgd"])
def test_rewind_to_a_state_without_optimizer_state(ray_local, tmp_path, on_disk, optimizer):
    """A run shut down at step 0 (both shards checkpoint step 0, no optimizer state yet), resumed, two
    steps, shard 1 cannot write step 2, client dies: the resume rewinds shard 0 from step 2 (with
    optimizer state) to step 0 (without); training from there must be bitwise one process from scratch."""
    from test_sharded import assert_same_state, single_process
    from test_recovery import train_step
    opts = {"lr": 0.03, "momentum": 0.9} if optimizer == "sgd" else {"lr": 0.03}
    where = dict(checkpoint_dir=str(tmp_path / "ck"), storage_dir=str(tmp_path / "rows") if on_disk else None)
    table = ShardedEmbedding(V, D, 2, optimizer, opts, seed=4, checkpoint_every=2, compiled_graph=False, **where)
    table.shutdown()
    t2 = ShardedEmbedding(V, D, 2, optimizer, opts, checkpoint_every=2, compiled_graph=False, run_id=table.run_id,
                          **where)
    blocked = os.path.join(t2._shard_dir(1), "b")
    with open(blocked, "wb") as f:
        f.write(b"x")
    try:
        rng = np.random.default_rng(0)
        with pytest.raises(RuntimeError, match="checkpoint of step 2"):
            for _ in range(2):
                t2.backward(rng.standard_normal((V, D)).astype(np.float32), np.arange(V), step=True)
            t2.sync()
    finally:
        t2.shutdown(checkpoint=False)
    os.remove(blocked)
    assert [h["step"] for h in held_checkpoints(t2._shard_dir(0))] == [2, 0]
    emb, opt = single_process(V, D, optimizer, opts, 4)
    resumed = ShardedEmbedding(V, D, 2, optimizer, opts, checkpoint_every=2, compiled_graph=False,
                               run_id=table.run_id, **where)
    try:
        assert resumed.step_count == 0
        rng = np.random.default_rng(5)
        for _ in range(3):
            train_step(rng, resumed, emb, opt)
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()
