"""Regression tests of the review of the sharded table's ordinary API (2026-11-27, session 20): a shard
lost while the compiled graph is built again no longer moves the table to actor calls for good, and a
table's calls after its own shutdown() are a RuntimeError, not a ShardLostError (which means a lost
shard, answered by a resume). Runs only inside tests/ray/run.sh (see conftest.py)."""
import os
import signal

import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding, ShardLostError

from test_recovery import wait_gone
from test_sharded import assert_same_state, single_process

V, D = 50, 4


@pytest.mark.parametrize("how", ["killed", "injected"])
def test_a_shard_lost_while_the_graph_is_built_again_leaves_the_graph_wanted(ray_local, tmp_path, monkeypatch, how):
    """Shard 0 lost (the graph breaks; the call recovers it on actor calls), then shard 1 lost before the
    next call builds the graph again: the build failed on the lost actor, which was taken for 'Ray cannot
    compile this graph' — actor calls for good, silently. Now that call runs on actor calls and a later
    one compiles again; training stays bitwise one process's. ("injected": the build after the first
    loss also raises Ray's channel error, as a build meeting a lost actor does — a kill alone does not
    always meet the build.)"""
    from ray.dag.dag_node import DAGNode

    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(tmp_path), checkpoint_every=2,
                             compiled_graph=True)
    emb, opt = single_process(V, D, "sgd", {"lr": 0.1}, 0)
    rng = np.random.default_rng(1)
    idx = np.arange(10)

    def step():
        g = rng.standard_normal((idx.size, D)).astype(np.float32)
        out = table(idx)
        assert out.tobytes() == emb(idx).tobytes()
        table.backward(g, step=True)
        emb.backward(g, optimizer=opt)

    try:
        step()
        table.sync()
        assert table.transport == "compiled graph"
        real, failed = DAGNode.experimental_compile, []

        def compile_once_lost(self, *args, **kwargs):
            if not failed:
                failed.append(True)
                raise ray_local.exceptions.RayChannelError("a shard was lost (injected)")
            return real(self, *args, **kwargs)

        for k in (0, 1):
            if how == "injected" and k == 0:   # (the build after this loss meets a lost actor)
                monkeypatch.setattr(DAGNode, "experimental_compile", compile_once_lost)
            pid = table.shard_info()[k]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
            step()
            table.sync()
        assert how != "injected" or failed
        for _ in range(3):
            step()
        table.sync()
        assert table.graph_error is None and table._want_graph
        assert table.transport == "compiled graph" and table.graph_builds >= 2
        assert_same_state(table, emb, opt)
    finally:
        table.shutdown(checkpoint=False)


def test_calls_after_shutdown_are_a_runtime_error_not_a_lost_shard(ray_local):
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=0)
    table(np.arange(3))
    table.shutdown()
    for call in (lambda: table(np.arange(3)), table.sync, table.state_dict, table.shard_info):
        with pytest.raises(RuntimeError, match="the table was shut down: make a new one") as info:
            call()
        assert not isinstance(info.value, ShardLostError)


def test_a_shard_whose_restarts_are_used_up_is_lost_at_once(ray_local, tmp_path):
    """max_restarts=1: killed a second time, Ray will not restart the shard; the client polled it for the
    whole recovery_timeout, then said it 'did not come back'. It is a ShardLostError at once, saying why."""
    import time

    table = ShardedEmbedding(20, 4, 2, "sgd", {"lr": 0.1}, seed=0, checkpoint_dir=str(tmp_path),
                             ray_options={"max_restarts": 1}, recovery_timeout=60, compiled_graph=False)
    try:
        table(np.arange(4))
        for kill in range(2):
            pid = table.shard_info()[0]["pid"]
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid)
            if kill == 0:
                table(np.arange(4))            # the restart Ray had left: recovered
        start = time.monotonic()
        with pytest.raises(ShardLostError, match="Ray will not restart it again"):
            table(np.arange(4))
        assert time.monotonic() - start < 30
    finally:
        table.shutdown(checkpoint=False)
