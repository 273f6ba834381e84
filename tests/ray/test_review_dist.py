"""Regression tests of the 2026-11-26 review of cembed.distributed: a refused call raises a clear
exception before any shard changes (or, for a step, leaves every shard at one step); a restarted
shard never serves rows other than the current ones; a loaded checkpoint's hyper-parameters are
adopted as one process adopts them. The sharded table stays bitwise equal to one process."""
import contextlib
import os
import signal

import numpy as np
import pytest

import cembed
from cembed.distributed import ShardedEmbedding, ShardLostError

from test_recovery import wait_gone
from test_sharded import assert_same_state, newest_checkpoint, single_process, zipf_batch

V, D = 11, 4


def train(rng, table, emb, opt, steps=1):
    for _ in range(steps):
        idx = zipf_batch(rng, V, 8)
        out = table(idx)
        assert out.tobytes() == emb(idx).tobytes()
        grad = rng.standard_normal(out.shape).astype(np.float32)
        table.backward(grad, step=True)
        emb.backward(grad, idx, optimizer=opt)
    table.sync()


def shard_steps(ray, table):
    return [ray.get(a.current_step.remote()) for a in table.actors]


def block_checkpoints(table, k):
    """Make shard ``k``'s checkpoint directory a regular file (it can no longer write checkpoints);
    returns its path."""
    shard_dir = table._shard_dir(k)
    os.rmdir(shard_dir)
    with open(shard_dir, "wb") as f:
        f.write(b"x")
    return shard_dir


def group_of(optimizer_cls, **options):
    """A whole param group of ``optimizer_cls`` (every option, as a shard's load takes it)."""
    group = optimizer_cls([cembed.Embedding(1, D, sparse=True)], **options).state_dict()["param_groups"][0]
    return {k: v for k, v in group.items() if k != "params"}


# ---------------------------------------------------------------- 1: restarts need a checkpoint
def test_restarts_without_checkpoint_dir_are_refused(ray_local):
    with pytest.raises(ValueError, match="max_restarts"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, ray_options={"max_restarts": -1})
    with pytest.raises(ValueError, match="max_restarts"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, ray_options=[{}, {"max_restarts": 2}])


def test_restarted_shard_serves_the_loaded_rows(ray_local, tmp_path):
    """Rows loaded at step 0 (the step a shard built from the seed is at) survive a restart: the
    load was checkpointed, and the restarted shard restores it."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(tmp_path), compiled_graph=False)
    try:
        loaded = np.full((V, D), 7.0, np.float32)
        table.load_state_dict({"step": 0, "weight": loaded, "optimizer": {}})
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        assert table(np.arange(V)).tobytes() == loaded.tobytes()
        assert table.shard_info()[1]["restored_from"] == 0
    finally:
        table.shutdown()


# ---------------------------------------------------------------- 2: load_state_dict checked first
@pytest.mark.parametrize("optimizer,opts,key,bad,step", [
    ("sgd", {"lr": 0.1, "momentum": 0.9}, "active_rows", np.array([-1]), None),       # only shard 1 sees -1
    ("sgd", {"lr": 0.1, "momentum": 0.9}, "active_rows", np.array([-1]), 50),         # and another step
    ("adagrad", {"lr": 0.1}, "sum", np.zeros((6, D), np.float32), None),             # shard 0's row count
    ("sparseadam", {"lr": 0.1}, "exp_avg", np.zeros((V, D), np.float64), 7),          # wrong dtype
])
def test_refused_load_state_dict_changes_no_shard(ray_local, optimizer, opts, key, bad, step):
    ray = ray_local
    table = ShardedEmbedding(V, D, 2, optimizer, opts, seed=3, compiled_graph=False)
    emb, opt = single_process(V, D, optimizer, opts, 3)
    rng = np.random.default_rng(0)
    try:
        train(rng, table, emb, opt)
        before = table.state_dict()
        sd = {"step": before["step"] if step is None else step, "weight": before["weight"] + 1,
              "optimizer": dict(before["optimizer"], **{key: bad})}
        with pytest.raises(ValueError, match=key):
            table.load_state_dict(sd)
        assert shard_steps(ray, table) == [1, 1] and table.step_count == 1
        assert_same_state(table, emb, opt)
        with pytest.raises(ValueError, match="optimizer"):
            table.load_state_dict({"step": 1, "weight": before["weight"], "optimizer": None})
        train(rng, table, emb, opt, steps=2)
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown()


# ---------------------------------------------------------------- 3: a step a shard refuses
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_options_refused_at_a_sparse_step_are_refused_by_the_constructor(ray_local, optimizer):
    with pytest.raises(ValueError, match="weight_decay"):
        ShardedEmbedding(V, D, 2, optimizer, {"lr": 0.1, "weight_decay": 0.01}, seed=0)


@pytest.mark.parametrize("compiled", [False, True])
def test_step_refused_by_every_shard_is_rolled_back(ray_local, compiled):
    """Shards whose optimizer refuses a step (made so behind the client's back): the next call
    raises the shards' ValueError, the table stays at the step before, and trains on bitwise."""
    ray = ray_local
    opts = {"lr": 0.1}
    table = ShardedEmbedding(V, D, 2, "sgd", opts, seed=5, compiled_graph=compiled)
    emb, opt = single_process(V, D, "sgd", opts, 5)
    rng = np.random.default_rng(1)
    try:
        train(rng, table, emb, opt)
        table._drop_graph()    # ordinary calls to the actors below (rebuilt at the next call)
        refusing = group_of(cembed.optim.SGD, **opts, weight_decay=0.01)
        for k, actor in enumerate(table.actors):
            step, w, entry = ray.get(actor.state.remote())
            ray.get(actor.load.remote(step, w, entry, refusing))
        out = table(np.arange(V))
        table.backward(np.ones_like(out), step=True)
        assert table.step_count == 2     # sent, not yet answered
        with pytest.raises(ValueError, match="refused by a shard.*weight_decay"):
            table(np.array([1]))
        assert table.step_count == 1 and shard_steps(ray, table) == [1, 1]
        with pytest.raises(ValueError, match="weight_decay"):   # still refused: same error, same step
            out = table(np.arange(V))
            table.backward(np.ones_like(out), step=True)
            table.sync()
        assert table.step_count == 1
        plain = group_of(cembed.optim.SGD, **opts)
        for actor in table.actors:
            step, w, entry = ray.get(actor.state.remote())
            ray.get(actor.load.remote(step, w, entry, plain))
        train(rng, table, emb, opt, steps=2)
        assert table.step_count == 3
        assert_same_state(table, emb, opt)
        if compiled:
            assert table.transport == "compiled graph" and table.graph_builds >= 2
    finally:
        table.shutdown()


def test_step_refused_by_one_shard_only_is_a_lost_table(ray_local):
    ray = ray_local
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=5, compiled_graph=False)
    try:
        actor = table.actors[0]
        step, w, entry = ray.get(actor.state.remote())
        ray.get(actor.load.remote(step, w, entry, group_of(cembed.optim.SGD, lr=0.1, weight_decay=0.01)))
        out = table(np.arange(V))
        table.backward(np.ones_like(out), step=True)
        with pytest.raises(ShardLostError, match="applied by others"):
            table.sync()
        with pytest.raises(ShardLostError):
            table(np.array([1]))
    finally:
        table.shutdown()


# ---------------------------------------------------------------- 4: checkpoints that cannot be written
def test_unusable_directories_are_refused_before_any_actor(ray_local, tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"x")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(afile / "ck"))
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(afile))
    with pytest.raises(ValueError, match="storage_dir"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, storage_dir=str(afile / "st"))
    # a directory the shards cannot create (a name too long): the shard's own error, not just "lost"
    with pytest.raises(ShardLostError, match="checkpoint_dir.*(too long|File name)"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(tmp_path / ("x" * 300)))


def test_failed_checkpoint_keeps_the_applied_step(ray_local, tmp_path):
    """A checkpoint that cannot be written is reported as that, the step stays applied, and the
    replay log keeps the steps that checkpoint would have covered (a shard lost later is rebuilt)."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1, "momentum": 0.9}, seed=2, checkpoint_dir=str(tmp_path),
                             checkpoint_every=2, compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1, "momentum": 0.9}, 2)
    rng = np.random.default_rng(4)
    try:
        shard_dir = block_checkpoints(table, 1)
        train(rng, table, emb, opt)
        with pytest.raises(RuntimeError, match="checkpoint of step 2 could not be written.*shard 1:.*Error"):
            train(rng, table, emb, opt)
        assert table.step_count == 2 and [i["step"] for i in table.shard_info()] == [2, 2]
        assert_same_state(table, emb, opt)
        os.remove(shard_dir)
        os.mkdir(shard_dir)
        train(rng, table, emb, opt)
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)          # no checkpoint: rebuilt from the seed, steps 0-2 replayed
        wait_gone(pid)
        train(rng, table, emb, opt, steps=2)
        assert table.recoveries == 1 and table.shard_info()[1]["restored_from"] is None
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown()


def test_loaded_state_that_cannot_be_checkpointed_is_a_lost_table(ray_local, tmp_path):
    """A restarted shard would restore an older checkpoint (possibly of the loaded step): refused for good."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), compiled_graph=False)
    try:
        sd = table.state_dict()
        shard_dir = table._shard_dir(0)
        os.rmdir(shard_dir)
        with open(shard_dir, "wb") as f:
            f.write(b"x")
        with pytest.raises(ShardLostError, match="not every shard could checkpoint it.*shard 0:"):
            table.load_state_dict(sd)
        with pytest.raises(ShardLostError):
            table(np.array([1]))
    finally:
        table.shutdown()


# ---------------------------------------------------------------- 5: a checkpoint's hyper-parameters
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")   # stepped only to set lr
def test_load_checkpoint_adopts_the_checkpoints_hyper_parameters(ray_local, tmp_path):
    path = str(tmp_path / "ck")
    src, src_opt = single_process(V, D, "sgd", {"lr": 0.5, "momentum": 0.5}, 0)
    cembed.optim.lr_scheduler.StepLR(src_opt, step_size=1, gamma=0.5).step()    # lr 0.25, adds initial_lr
    cembed.save_checkpoint(path, {"table": src}, src_opt, extra={"step": 0})
    one, opt = single_process(V, D, "sgd", {"lr": 0.1}, 9)
    cembed.load_checkpoint(path, {"table": one}, opt)
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["momentum"] == 0.5
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=1, checkpoint_dir=str(tmp_path / "shards"),
                             compiled_graph=False)
    rng = np.random.default_rng(5)
    try:
        table.load_checkpoint(path)
        assert table.optimizer_options["lr"] == 0.25 and table.optimizer_options["momentum"] == 0.5
        train(rng, table, one, opt)
        assert_same_state(table, one, opt)
        pid = table.shard_info()[0]["pid"]    # a restarted shard restores the adopted options too
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        train(rng, table, one, opt, steps=2)
        assert table.recoveries == 1
        assert_same_state(table, one, opt)
        table.save_checkpoint(str(tmp_path / "again"))     # and saves them, with the scheduler's entry
        again, again_opt = single_process(V, D, "sgd", {"lr": 0.1}, 0)
        cembed.load_checkpoint(str(tmp_path / "again"), {"table": again}, again_opt)
        assert again_opt.param_groups[0]["lr"] == 0.25 and again_opt.param_groups[0]["initial_lr"] == 0.5
    finally:
        table.shutdown()


# ---------------------------------------------------------------- 6: arguments checked in the client
def test_bad_arguments_refused_in_the_client(ray_local, tmp_path):
    with pytest.raises(ValueError, match="state_dir"):
        ShardedEmbedding(V, D, 2, "sparseadam", {"lr": 0.1, "state_dir": str(tmp_path / "sd")}, seed=0)
    for bad in (float("inf"), float("nan"), True, 0, -1.0, "10"):
        with pytest.raises(ValueError, match="recovery_timeout"):
            ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, recovery_timeout=bad)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0)
    try:   # as one process: an integer list NumPy cannot hold as integers is still an index error, not a type error
        for bad in ([0, 2**70], [np.uint64(V), 1], [np.uint64(2**63), -1]):
            with pytest.raises(IndexError, match="outside the valid range"):
                table(bad)
        assert table([np.uint64(3), 1]).tobytes() == table(np.array([3, 1])).tobytes()
        with pytest.raises(ValueError, match=rf"= \(1, 3, {D}\), got \(1, 3, {D + 1}\)"):   # the width, named
            table.backward(np.ones((1, 3, D + 1), np.float32), indices=np.array([[0, 1, 2]]))
    finally:
        table.shutdown()


# ------------------------------------------------- second review: this call's gradient, restarts that only read
@pytest.mark.parametrize("use_step", [False, True], ids=["backward_step_true", "backward_then_step"])
def test_error_of_an_earlier_step_keeps_this_calls_gradient(ray_local, tmp_path, use_step):
    """The error of an earlier step (here: shard 1 could not write the checkpoint of step 2) is raised
    before this call takes its gradient: ``.grad`` is still there after ``step()`` raised, and calling
    again applies step 3 — bitwise one process's three steps. Before, the gradient of the call that
    reported the error was dropped silently."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path),
                             checkpoint_every=2, compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 2)
    rng = np.random.default_rng(4)
    try:
        block_checkpoints(table, 1)              # shard 1 can no longer write its checkpoint
        for s in (1, 2, 3):
            idx = zipf_batch(rng, V, 8)
            grad = rng.standard_normal((idx.size, D)).astype(np.float32)
            emb.backward(grad, idx, optimizer=opt)
            if use_step:
                table.backward(grad, idx)
                call = table.step
            else:
                def call():
                    table.backward(grad, idx, step=True)
            if s < 3:
                call()
                continue
            with pytest.raises(RuntimeError, match="checkpoint of step 2 could not be written"):
                call()
            assert table.step_count == 2
            assert (table.grad is not None) == use_step
            call()                              # the error was reported once: step 3 goes through
        table.sync()
        assert table.step_count == 3
        assert_same_state(table, emb, opt)
        # shutdown() checkpoints the last step, which shard 1 cannot: said, with the table still running
        # (shard 1 never wrote a checkpoint: stopped now, the run could not be resumed), which trains on
        with pytest.raises(RuntimeError, match=r"checkpoint of step 3 could not be written \(shard 1: .* The "
                                               r"table still runs.*could not be resumed from its shards' "
                                               r"checkpoints: not every shard holds one"):
            table.shutdown()
        train_step_both = zipf_batch(rng, V, 8)
        grad = rng.standard_normal((train_step_both.size, D)).astype(np.float32)
        emb.backward(grad, train_step_both, optimizer=opt)
        with pytest.raises(RuntimeError, match="checkpoint of step 4 could not be written"):   # the periodic one
            table.backward(grad, train_step_both, step=True)
            table.sync()
        assert table.step_count == 4
        assert_same_state(table, emb, opt)
        table.shutdown(checkpoint=False)
        with pytest.raises(RuntimeError, match="shut down"):
            table(np.arange(3))
    finally:
        with contextlib.suppress(RuntimeError):   # (a no-op after the shutdown above)
            table.shutdown(checkpoint=False)


def test_restart_restores_a_checkpoint_left_in_its_ready_sibling(ray_local, tmp_path):
    """A save interrupted between its two renames leaves the complete checkpoint in ``.<name>.ready``
    and nothing at its path. A shard restarted then restores it (it only reads at a restart): before,
    its start-up write check created an empty directory at the path, which hid the ``.ready`` one, and
    the shard came back without its rows."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1, "momentum": 0.9}, seed=3, checkpoint_dir=str(tmp_path),
                             checkpoint_every=2, compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1, "momentum": 0.9}, 3)
    rng = np.random.default_rng(6)
    try:
        train(rng, table, emb, opt, steps=2)       # shard checkpoints at step 2
        train(rng, table, emb, opt)                # step 3: in the replay log
        slot = newest_checkpoint(table, 1)["path"]   # (slot a: the shard's first save)
        head, name = os.path.split(slot)
        os.rename(slot, os.path.join(head, f".{name}.ready"))   # as a crash between the renames leaves it
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        table(np.arange(V))                        # the restarted shard restores (and creates nothing)
        assert table.recoveries == 1 and table.shard_info()[1]["restored_from"] == 2
        assert not os.path.lexists(slot), "the restart created the checkpoint path over the .ready one"
        train(rng, table, emb, opt, steps=3)       # step 4 goes to slot b; step 6's save, to slot a again,
        assert os.path.isdir(slot) and not os.path.lexists(os.path.join(head, f".{name}.ready"))  # completes it
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown()


def test_shutdown_after_a_periodic_checkpoint_failed_writes_it_again(ray_local, tmp_path):
    """The periodic checkpoint of the last step failed on one shard (reported by shutdown's own wait):
    shutdown() writes it again with the final checkpoint instead of stopping the table with the shards'
    checkpoints at different steps (a run that could not be resumed). Still failing: raised with the
    table running; once the disk takes it, shutdown() succeeds and the run resumes bitwise."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 2)
    rng = np.random.default_rng(11)
    try:
        blocked = block_checkpoints(table, 1)
        for _ in range(2):
            idx = zipf_batch(rng, V, 8)
            grad = rng.standard_normal((idx.size, D)).astype(np.float32)
            emb.backward(grad, idx, optimizer=opt)
            table.backward(grad, idx, step=True)
        with pytest.raises(RuntimeError, match=r"checkpoint of step 2 could not be written .*The table still runs"):
            table.shutdown()
        assert table.step_count == 2
        assert_same_state(table, emb, opt)
        os.remove(blocked)
        table.shutdown()
    finally:
        with contextlib.suppress(RuntimeError):
            table.shutdown(checkpoint=False)
    assert [newest_checkpoint(table, k)["step"] for k in range(2)] == [2, 2]
    resumed = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, checkpoint_dir=str(tmp_path), run_id=table.run_id,
                               compiled_graph=False)
    try:
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()
