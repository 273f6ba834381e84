"""A shard that dies mid-training is restarted by Ray, restores its last checkpoint and is replayed
to the current step: the result is bitwise equal to an uninterrupted run in one process. A shard
that cannot be brought back is a ShardLostError, at every later call — never stale rows."""
import os
import shutil
import signal
import time

import numpy as np
import pytest

import cembed

from cembed.distributed import ShardedEmbedding, ShardLostError
from cembed.distributed._shard import held_checkpoints

from test_sharded import (assert_resumes_at, assert_same_state, newest_checkpoint, random_step, single_process,
                          zipf_batch)

V, D, OPTS = 41, 6, {"lr": 0.03}


def wait_gone(pid, timeout=30.0):
    """Until process ``pid`` has exited (Ray's kill is asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} is still alive")


def train_step(rng, table, emb, opt):
    idx = zipf_batch(rng, V, (12, 2))
    out = table(idx)
    assert out.tobytes() == emb(idx).tobytes(), "a lookup served rows of another step"
    grad = rng.standard_normal(out.shape).astype(np.float32)
    table.backward(grad, step=True)
    emb.backward(grad, optimizer=opt)


def test_killed_shards_recover_bitwise(ray_local, tmp_path):
    ray = ray_local
    # actor calls; a compiled graph's recovery (the default): test_cluster.py, test_sharded.py and
    # the two tests below
    table = ShardedEmbedding(V, D, 3, "sparseadam", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=3,
                             compiled_graph=False)
    emb, opt = single_process(V, D, "sparseadam", OPTS, 4)
    rng = np.random.default_rng(1)
    try:
        pids = [info["pid"] for info in table.shard_info()]
        for step in range(1, 13):
            train_step(rng, table, emb, opt)
            if step == 5:     # Ray kills shard 1 and restarts it: it restores step 3, steps 3-4 are replayed
                ray.kill(table.actors[1], no_restart=False)
                wait_gone(pids[1])
            if step == 8:     # shard 2's process dies (SIGKILL): restores step 6, replays 6-7
                os.kill(pids[2], signal.SIGKILL)
                wait_gone(pids[2])
        info = table.shard_info()
        assert info[0]["pid"] == pids[0] and info[0]["restored_from"] is None
        assert info[1]["pid"] != pids[1] and info[1]["restored_from"] == 3
        assert info[2]["pid"] != pids[2] and info[2]["restored_from"] == 6
        assert table.recoveries == 2
        assert table.graph_builds == 0 and table.transport == "actor calls"
        assert [i["step"] for i in info] == [12, 12, 12]
        assert_same_state(table, emb, opt)
        # each shard's checkpoint is a cembed checkpoint directory of its rows, at the last multiple of 3,
        # the fourth save (steps 3, 6, 9, 12: slots a, b, a, b), the one before it in the other slot
        newest = newest_checkpoint(table, 0)
        meta, files = cembed.checkpoint.read_directory(newest["path"])
        assert meta["extra"] == {"step": 12, "shard": [0, 3], "serial": 4, "lineage": "seed"} and "module.rows" in files
        assert newest["slot"] == "b" and [h["step"] for h in held_checkpoints(table._shard_dir(0))] == [12, 9]
    finally:
        table.shutdown()


def test_shards_on_disk_train_and_recover_bitwise(ray_local, tmp_path):
    """storage_dir: every shard's rows (and SparseAdam state) in memory-mapped files, bitwise one process;
    a killed shard rebuilds its files from its checkpoint; load_state_dict writes into the files."""
    ray = ray_local
    table = ShardedEmbedding(V, D, 2, "sparseadam", OPTS, seed=4, checkpoint_dir=str(tmp_path / "ckpt"),
                             checkpoint_every=3, storage_dir=str(tmp_path / "rows"))
    emb, opt = single_process(V, D, "sparseadam", OPTS, 4)
    rng = np.random.default_rng(2)
    try:
        pids = [info["pid"] for info in table.shard_info()]
        for step in range(1, 9):
            train_step(rng, table, emb, opt)
            if step == 4:     # restores step 3 into fresh files, step 3 is replayed
                os.kill(pids[1], signal.SIGKILL)
                wait_gone(pids[1])
        assert table.recoveries == 1 and table.shard_info()[1]["restored_from"] == 3
        assert_same_state(table, emb, opt)
        table.sync()
        for k in range(2):   # the rows the shards train are those files
            shard_dir = tmp_path / "rows" / table.run_id / f"shard-{k}-of-2"
            rows = np.load(shard_dir / "rows.npy", mmap_mode="r")
            assert rows.tobytes() == emb.weight[k::2].tobytes()
            assert any(name.endswith(".npy") for name in os.listdir(shard_dir / "state"))
        sd = table.state_dict()
        sd["weight"] = sd["weight"] * 2
        table.load_state_dict(sd)
        rows = np.load(tmp_path / "rows" / table.run_id / "shard-0-of-2" / "rows.npy", mmap_mode="r")
        assert rows.tobytes() == sd["weight"][0::2].tobytes()
    finally:
        table.shutdown()


def test_shard_without_checkpoint_is_lost_for_good(ray_local):
    ray = ray_local
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=4)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 4)
    rng = np.random.default_rng(2)
    try:
        train_step(rng, table, emb, opt)
        pid = table.shard_info()[0]["pid"]
        ray.kill(table.actors[0], no_restart=False)          # max_restarts=0 without a checkpoint_dir
        wait_gone(pid)
        with pytest.raises(ShardLostError, match="shard 0"):
            table(np.arange(V))
        with pytest.raises(ShardLostError):                   # and at every later call
            table(np.array([1]))                               # (row 1 is on the live shard)
    finally:
        table.shutdown()


def test_shard_restored_too_far_back_is_an_error(ray_local, tmp_path):
    """The checkpoints vanish and the shard restarts from its seed (step 0) while the replay log
    starts at step 4: no way to rebuild its rows, so an error, not stale rows."""
    ray = ray_local
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             recovery_timeout=60)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 4)
    rng = np.random.default_rng(3)
    try:
        for _ in range(5):
            train_step(rng, table, emb, opt)
        shutil.rmtree(table._shard_dir(1))
        pid = table.shard_info()[1]["pid"]
        ray.kill(table.actors[1], no_restart=False)
        wait_gone(pid)
        with pytest.raises(ShardLostError, match="came back at step 0"):
            table(np.arange(V))
        with pytest.raises(ShardLostError):
            table.backward(np.ones((1, D), np.float32), np.array([0]), step=True)
    finally:
        table.shutdown()


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("how", ["load_state_dict", "load_checkpoint"])
def test_a_shard_lost_while_a_state_is_loaded_is_recovered(ray_local, tmp_path, compiled, how):
    """A shard killed just before a load (Ray restarting it) is brought back and sent its part again, as
    every other call recovers a restartable shard (the load once failed for good: ShardLostError)."""
    table = ShardedEmbedding(V, D, 2, "sparseadam", OPTS, seed=4, checkpoint_dir=str(tmp_path / "ck"),
                             checkpoint_every=2, compiled_graph=compiled)
    emb, opt = single_process(V, D, "sparseadam", OPTS, 4)
    rng = np.random.default_rng(3)
    try:
        for _ in range(3):
            train_step(rng, table, emb, opt)
        saved = table.state_dict()
        if how == "load_checkpoint":
            table.save_checkpoint(str(tmp_path / "whole"))
        for _ in range(2):     # the table moves on alone, so that the load really takes its rows back
            table.backward(np.ones_like(table(np.arange(5))), step=True)
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        if how == "load_state_dict":
            table.load_state_dict(saved)
        else:
            table.load_checkpoint(str(tmp_path / "whole"))
        assert table.step_count == saved["step"] == 3
        assert_same_state(table, emb, opt)
        for _ in range(2):     # and it trains on, bitwise the one process
            train_step(rng, table, emb, opt)
        assert_same_state(table, emb, opt)
        assert table.shard_info()[1]["pid"] != pid
    finally:
        table.shutdown()


def test_shard_info_recovers_a_lost_shard(ray_local, tmp_path):
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), compiled_graph=False)
    try:
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        info = table.shard_info()   # was a raw ray.exceptions.ActorUnavailableError
        assert info[1]["pid"] != pid and [i["step"] for i in info] == [0, 0]
    finally:
        table.shutdown()


@pytest.mark.parametrize("compiled", [False, True])
def test_shutdown_applies_the_step_in_flight(ray_local, tmp_path, compiled):
    """shutdown() waits for the step still in flight (as sync() does): every shard applies and checkpoints
    it. It once stopped the actors at once: the shards' checkpoints stood at steps [2, 2] or [2, 3]."""
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                             compiled_graph=compiled)
    for _ in range(3):
        out = table(np.arange(10))
        table.backward(np.ones_like(out), step=True)
    table.shutdown()
    assert _checkpointed_steps(table) == [3, 3]
    with pytest.raises(RuntimeError, match="shut down"):
        table(np.arange(3))
    table.shutdown()   # again: harmless


def _checkpointed_steps(table):
    return [newest_checkpoint(table, k)["step"] for k in range(table.num_shards)]


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_run_shut_down_resumes_bitwise_from_its_shards_checkpoints(ray_local, tmp_path, on_disk):
    """shutdown() checkpoints the last step on every shard (3 steps with checkpoint_every=4: it once left
    no checkpoint at all), and a table made with that run_id continues from the shards' own
    checkpoints — nothing of the table passes through the client — bitwise as one process that never
    stopped, with the run's optimizer hyper-parameters (not the new constructor's)."""
    where = dict(checkpoint_dir=str(tmp_path / "ck"), storage_dir=str(tmp_path / "rows") if on_disk else None)
    emb, opt = single_process(V, D, "sparseadam", OPTS, 4)
    rng = np.random.default_rng(5)
    table = ShardedEmbedding(V, D, 3, "sparseadam", OPTS, seed=4, checkpoint_every=4, compiled_graph=False, **where)
    try:
        for _ in range(3):
            train_step(rng, table, emb, opt)
    finally:
        table.shutdown()
    assert _checkpointed_steps(table) == [3, 3, 3]
    resumed = ShardedEmbedding(V, D, 3, "sparseadam", {"lr": 0.5}, seed=99, checkpoint_every=4, run_id=table.run_id,
                               **where)
    try:
        assert resumed.step_count == 3 and resumed.run_id == table.run_id
        assert resumed.optimizer_options["lr"] == OPTS["lr"]
        assert [info["restored_from"] for info in resumed.shard_info()] == [3, 3, 3]
        assert_same_state(resumed, emb, opt)
        for _ in range(3):
            train_step(rng, resumed, emb, opt)
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()


def test_resuming_a_run_refuses_what_cannot_be_resumed(ray_local, tmp_path):
    """A run_id needs its checkpoint_dir and is one name (both refused before any actor starts); a shard
    count without checkpoints there names the missing checkpoint; shards that share no checkpointed
    step (each keeps its two latest) are a CheckpointError — never a table whose shards are at
    different steps."""
    with pytest.raises(ValueError, match="give the checkpoint_dir"):
        ShardedEmbedding(V, D, 2, "sgd", OPTS, run_id="0123456789ab")
    for bad in ["../x", "", "a/b", 7]:
        with pytest.raises(ValueError, match="run_id must be"):
            ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=bad)
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    try:
        for _ in range(2):
            table.backward(np.ones_like(table(np.arange(V))), step=True)
        table.sync()
        shutil.copytree(table._shard_dir(0), tmp_path / "shard-0-at-2")
        for _ in range(4):
            table.backward(np.ones_like(table(np.arange(V))), step=True)
    finally:
        table.shutdown()
    assert _checkpointed_steps(table) == [6, 6]
    with pytest.raises(ShardLostError, match="no checkpoint of shard 0 of 3 to resume"):
        ShardedEmbedding(V, D, 3, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=table.run_id)
    shutil.rmtree(table._shard_dir(0))
    shutil.copytree(tmp_path / "shard-0-at-2", table._shard_dir(0))
    with pytest.raises(cembed.checkpoint.CheckpointError,
                       match=r"no step that every shard holds a checkpoint of \(shard 0: step 2; shard 1: steps 6 and 4"):
        ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=table.run_id)
    older = held_checkpoints(table._shard_dir(1))[1]      # shard 1's checkpoint of step 4, in slot b
    with open(os.path.join(older["path"], "MANIFEST.json"), "w") as f:   # damaged: named, never skipped
        f.write("{")
    with pytest.raises(ShardLostError, match=r"shard-1-of-2/b"):
        ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=table.run_id)


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_client_killed_while_its_shards_checkpoint_resumes_at_the_step_before(ray_local, tmp_path, on_disk):
    """The client dies while its shards write the checkpoint of step 4: shard 0 wrote it, shard 1 did not
    (its slot is blocked here; a kill leaves the same). Each shard keeps its two latest checkpoints, so
    both still hold step 2: the resumed run goes back there — shard 0 restores its older checkpoint and
    writes it again as its newest — and trains on bitwise as one process resumed at step 2, also after
    a restart of the shard that went back. Before, the shards' checkpoints held steps 4 and 2 and the
    run could not be resumed at all."""
    where = dict(checkpoint_dir=str(tmp_path / "ck"), storage_dir=str(tmp_path / "rows") if on_disk else None)
    emb, opt = single_process(V, D, "sparseadam", OPTS, 4)
    rng = np.random.default_rng(8)
    table = ShardedEmbedding(V, D, 2, "sparseadam", OPTS, seed=4, checkpoint_every=2, compiled_graph=False, **where)
    try:
        for _ in range(2):
            train_step(rng, table, emb, opt)
        table.sync()
        at_2 = table.state_dict()
        blocked = os.path.join(table._shard_dir(1), "b")    # shard 1's next save goes there
        with open(blocked, "wb") as f:
            f.write(b"x")
        for _ in range(2):
            table.backward(np.ones_like(table(np.arange(V))), step=True)
        with pytest.raises(RuntimeError, match="checkpoint of step 4 could not be written"):
            table.sync()
    finally:
        table.shutdown(checkpoint=False)        # the client "dies": no final checkpoint
    os.remove(blocked)
    assert _checkpointed_steps(table) == [4, 2]
    emb.weight[...] = at_2["weight"]            # the one process, back at step 2
    opt.load_state_dict({"state": {0: at_2["optimizer"]}, "param_groups": opt.state_dict()["param_groups"]})
    resumed = ShardedEmbedding(V, D, 2, "sparseadam", OPTS, checkpoint_every=2, compiled_graph=False,
                               run_id=table.run_id, **where)
    try:
        assert resumed.step_count == 2
        assert [info["restored_from"] for info in resumed.shard_info()] == [2, 2]
        assert_same_state(resumed, emb, opt)
        newest = newest_checkpoint(resumed, 0)
        assert (newest["step"], newest["serial"]) == (2, 3), "the step 4 checkpoint is still shard 0's newest"
        train_step(rng, resumed, emb, opt)
        pid = resumed.shard_info()[0]["pid"]
        os.kill(pid, signal.SIGKILL)             # restarts from the rewritten step 2, replays step 2
        wait_gone(pid)
        train_step(rng, resumed, emb, opt)
        assert resumed.recoveries == 1
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()


def test_a_failed_final_checkpoint_after_a_failed_periodic_one_keeps_the_shared_step(ray_local, tmp_path):
    """Shard 1 cannot write the checkpoint of step 4, the table trains on to step 5, and shutdown()'s final
    checkpoint fails on shard 1 again. Shard 0 wrote both, but into the slot not holding step 2, the newest
    state both shards hold (the client tells it which to keep): shutdown(checkpoint=False) then leaves a
    run that resumes at step 2, as the error says, bitwise. Before (a review's find), shard 0's final
    checkpoint overwrote its step 2 and the run could not be resumed at all."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    rng = np.random.default_rng(1)
    try:
        for _ in range(2):
            random_step(table, rng)
        table.sync()
        at_2 = table.state_dict()
        blocked = os.path.join(table._shard_dir(1), "b")
        with open(blocked, "wb") as f:
            f.write(b"x")
        with pytest.raises(RuntimeError, match="checkpoint of step 4 could not be written"):
            for _ in range(2):
                random_step(table, rng)
            table.sync()
        random_step(table, rng)   # step 5
        with pytest.raises(RuntimeError, match=r"checkpoint of step 5 could not be written .*would resume at step "
                                               r"2, the newest that every shard holds"):
            table.shutdown()
        assert [h["step"] for h in held_checkpoints(table._shard_dir(0))] == [5, 2]
    finally:
        table.shutdown(checkpoint=False)
    os.remove(blocked)
    assert_resumes_at(table, 2, at_2, compiled_graph=False)


def test_a_run_checkpointed_in_the_one_slot_layout_is_refused_with_how_to_move_it(ray_local, tmp_path):
    """cembed before 2026-11-27 wrote a shard's one checkpoint into its directory itself (extra: step and
    shard only). Resuming such a run says so and how to move it; moved into slot a, it resumes bitwise."""
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), compiled_graph=False)
    try:
        for _ in range(3):
            table.backward(np.ones_like(table(np.arange(V))), step=True)
        at_3 = table.state_dict()
    finally:
        table.shutdown()
    for k in range(2):     # rewrite each shard's checkpoint as the earlier layout held it
        shard_dir = table._shard_dir(k)
        local = cembed.Embedding(len(range(k, V, 2)), D, sparse=True)
        opt = cembed.optim.SGD([local], lr=0.1, rounding_rows=(k, 2))
        cembed.load_checkpoint(newest_checkpoint(table, k)["path"], {"rows": local}, opt, mmap=False)
        shutil.rmtree(shard_dir)
        cembed.save_checkpoint(shard_dir, {"rows": local}, opt, extra={"step": 3, "shard": [k, 2]})
    with pytest.raises(ShardLostError, match=r"one-slot layout of cembed before 2026-11-27.*move them into .*/a/"):
        ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, checkpoint_dir=str(tmp_path), run_id=table.run_id)
    for k in range(2):
        shard_dir = table._shard_dir(k)
        os.mkdir(os.path.join(shard_dir, "a"))
        for name in os.listdir(shard_dir):
            if name != "a":
                os.rename(os.path.join(shard_dir, name), os.path.join(shard_dir, "a", name))
    assert_resumes_at(table, 3, at_3, compiled_graph=False)


def test_a_shard_whose_checkpoint_is_corrupt_is_lost_at_once_with_the_reason(ray_local, tmp_path):
    """A restarted shard whose own checkpoint fails its checksum cannot start, and Ray does not try
    again: the next call raises ShardLostError naming the corrupt file at once (it once waited the
    whole recovery_timeout and said only 'did not come back')."""
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False, recovery_timeout=120)
    try:
        for _ in range(2):
            table.backward(np.ones_like(table(np.arange(V))), step=True)
        table.sync()
        path = os.path.join(newest_checkpoint(table, 1)["path"], "module.rows.npy")
        data = bytearray(open(path, "rb").read())
        data[-1] ^= 1
        open(path, "wb").write(bytes(data))
        pid = table.shard_info()[1]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_gone(pid)
        start = time.monotonic()
        with pytest.raises(ShardLostError, match="shard 1 could not be restarted: .*checksum mismatch"):
            table(np.arange(V))
        assert time.monotonic() - start < 60
    finally:
        table.shutdown()


def test_a_run_is_resumed_only_once_its_table_is_shut_down(ray_local, tmp_path, monkeypatch):
    """Shard k of run R is the Ray actor 'cembed-R-shard-k-of-S': a second table on a run whose table
    still runs cannot start (ValueError, nothing of the first changed — it would have written the same
    checkpoints), and can once the first is shut down. Names are the table's: ray_options cannot set one."""
    import cembed.distributed._client as client

    monkeypatch.setattr(client, "NAME_WAIT", 1.0)
    with pytest.raises(ValueError, match="ray_options: name is set by the table"):
        ShardedEmbedding(V, D, 2, "sgd", OPTS, ray_options={"name": "mine"})
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=False)
    emb, opt = single_process(V, D, "sgd", OPTS, 4)
    rng = np.random.default_rng(8)
    try:
        for _ in range(3):
            train_step(rng, table, emb, opt)
        with pytest.raises(ValueError, match=f"run {table.run_id} is in use: its shard actor "
                                             f"'cembed-{table.run_id}-shard-0-of-2' is alive"):
            ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=table.run_id)
        with pytest.raises(TypeError, match="checkpoint must be True or False"):   # a refused shutdown stops nothing
            table.shutdown(checkpoint="False")
        train_step(rng, table, emb, opt)
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown()
    resumed = ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=table.run_id,
                               compiled_graph=False)
    try:
        assert resumed.step_count == 4
        train_step(rng, resumed, emb, opt)
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()


def test_a_table_dropped_without_shutdown_stops_its_shards(ray_local, tmp_path):
    """A table garbage-collected without shutdown() (its compiled graph held the shard actors, and so
    the run's actor names: resuming the run was refused as 'still running') stops its shards; the run
    resumes at its shards' last checkpoint, bitwise one process there."""
    import gc

    emb, opt = single_process(V, D, "sgd", OPTS, 4)
    rng = np.random.default_rng(9)
    table = ShardedEmbedding(V, D, 2, "sgd", OPTS, seed=4, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    assert table.transport == "compiled graph"
    for _ in range(2):
        train_step(rng, table, emb, opt)
    table.sync()
    run_id, pids = table.run_id, [info["pid"] for info in table.shard_info()]
    del table
    gc.collect()
    for pid in pids:
        wait_gone(pid)
    resumed = ShardedEmbedding(V, D, 2, "sgd", OPTS, checkpoint_dir=str(tmp_path), run_id=run_id)
    try:
        assert resumed.step_count == 2
        assert_same_state(resumed, emb, opt)
    finally:
        resumed.shutdown()
