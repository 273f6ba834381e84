"""What shutdown() reports about the last steps (review of 2026-11-27, its minor points): a last step
refused by every shard says that shutdown() stopped the table at the step before it (the message said
the table "stays" at that step, usable, though it had been shut down), and shutdown(checkpoint=False)
reports a periodic checkpoint a shard could not write (it dropped that report: the user never learnt the
run would resume at an older step). Runs only inside tests/ray/run.sh (see conftest.py)."""
import os

import numpy as np
import pytest

from cembed.distributed import ShardedEmbedding

from test_sharded import assert_resumes_at, random_step, use_shard_class

V, D = 11, 4


def trained(monkeypatch, shard_class, tmp_path, steps):
    """A 2-shard SGD table of ``shard_class`` shards (checkpoint_every=2) after ``steps`` steps, synced:
    (table, a function that sends one more step, the table's state_dict now)."""
    use_shard_class(monkeypatch, shard_class)
    table = ShardedEmbedding(V, D, 2, "sgd", {"lr": 0.1}, seed=2, checkpoint_dir=str(tmp_path), checkpoint_every=2)
    rng = np.random.default_rng(4)

    def step():
        random_step(table, rng)
    for _ in range(steps):
        step()
    table.sync()
    return table, step, table.state_dict()


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_last_step_refused_by_every_shard_is_reported_as_stopped_there(ray_local, tmp_path, monkeypatch,
                                                                         checkpoint):
    """Every shard refuses step 3, the last step before shutdown(): ValueError saying shutdown() stopped the
    table at step 3; with the final checkpoint the run resumes there."""
    import refusing_shard

    table, step, at_3 = trained(monkeypatch, refusing_shard.RefusesMarkedSteps, tmp_path, 3)
    for k in range(2):
        open(refusing_shard.marker(table._shard_dir(k), 3), "w").close()
    step()                                  # step 3: refused by every shard, found by shutdown()
    with pytest.raises(ValueError, match=r"applied by none \(shutdown\(\) stopped the table at step 3") as info:
        table.shutdown(checkpoint=checkpoint)
    assert "stays at step" not in str(info.value)
    with pytest.raises(RuntimeError, match="shut down"):
        table.forward(np.arange(V))
    if checkpoint:
        assert_resumes_at(table, 3, at_3)


def test_shutdown_without_checkpoint_reports_a_periodic_checkpoint_not_written(ray_local, tmp_path, monkeypatch):
    """checkpoint_every=2, shard 0 cannot write the checkpoint of step 4 and nothing reported it before
    shutdown(checkpoint=False): a RuntimeError, raised with the actors stopped, naming the step the run
    resumes at (2); the run does resume there."""
    import failing_saves_shard

    table, step, at_2 = trained(monkeypatch, failing_saves_shard.FailsSomeSaves, tmp_path, 2)
    open(failing_saves_shard.marker(table._shard_dir(0), 4), "w").close()
    step()
    step()                                  # step 4 (its checkpoint fails on shard 0), not yet settled
    with pytest.raises(RuntimeError, match=r"could not be written \(shard 0: .*No space left.*shut down at step 4 "
                                           r"without a final checkpoint.*continues from step 2"):
        table.shutdown(checkpoint=False)
    with pytest.raises(RuntimeError, match="shut down"):
        table.forward(np.arange(V))
    table.shutdown(checkpoint=False)        # again: harmless, reports nothing twice
    assert_resumes_at(table, 2, at_2)


def test_a_refused_last_step_whose_final_checkpoint_fails_says_the_table_runs_on(ray_local, tmp_path, monkeypatch):
    """Every shard refuses step 3 and then cannot write the final checkpoint of step 3: shutdown() raises
    'the table still runs' — and its cause, the refused step, said 'shutdown() stopped the table'. The
    cause says the table stays at step 3, and it does: it trains on."""
    import refusing_shard

    table, step, _ = trained(monkeypatch, refusing_shard.RefusesStepsAndSaves, tmp_path, 3)
    for k in range(2):
        for name in ("refuse-3", "fail-save-3"):
            open(os.path.join(table._shard_dir(k), name), "w").close()
    step()
    with pytest.raises(RuntimeError, match="The table still runs") as info:
        table.shutdown()
    cause = str(info.value.__cause__)
    assert "applied by none (the table stays at step 3" in cause and "stopped" not in cause
    for k in range(2):
        os.remove(os.path.join(table._shard_dir(k), "refuse-3"))
        os.remove(os.path.join(table._shard_dir(k), "fail-save-3"))
    step()
    table.sync()
    assert table.step_count == 4
    table.shutdown()
