"""ShardedEmbedding against one process: bitwise the same weights and optimizer state after N steps,
for 1, 2 and 3 shards, for both tables of the skip-gram model and for a single table under each
optimizer; the API's checks. Runs only inside tests/ray/run.sh (see conftest.py)."""
import ml_dtypes   # noqa: F401  (the test extra has it; registers numpy's "bfloat16")
import numpy as np
import pytest

import cembed
from cembed.apps import train as train_mod
from cembed.distributed import OPTIMIZERS, ShardedEmbedding, initial_rows
from cembed.distributed._shard import held_checkpoints


def single_process(V, D, optimizer, options, seed, init="uniform", padding_idx=None, dtype=np.float32):
    weight = initial_rows(seed, np.arange(V), D, dtype, init)
    if padding_idx is not None:
        weight[padding_idx] = 0
    emb = cembed.Embedding.from_pretrained(weight, freeze=False, sparse=True, padding_idx=padding_idx)
    return emb, OPTIMIZERS[optimizer]([emb], **options)


def assert_same_state(sharded, emb, opt):
    sd = sharded.state_dict()
    assert sd["weight"].tobytes() == emb.weight.tobytes(), "weights differ"
    state = opt.state[emb]
    assert set(sd["optimizer"]) == set(state)
    for key, value in state.items():
        got = sd["optimizer"][key]
        if isinstance(value, np.ndarray):
            assert got.dtype == value.dtype and got.tobytes() == value.tobytes(), f"optimizer state {key} differs"
        else:
            assert got == value, key


def use_shard_class(monkeypatch, cls):
    """Tables made from here on (in this test) start their shards as ``cls``, a ``Shard`` subclass of a
    module in tests/ray that injects a fault; the module goes to Ray's workers by value (they do not
    import tests/)."""
    import sys

    import ray.cloudpickle
    import cembed.distributed._client as client

    ray.cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    monkeypatch.setattr(client, "Shard", cls)


def assert_resumes_at(table, step, state, **options):
    """A table made with the run id of ``table`` (shut down) resumes at ``step`` with the rows of
    ``state`` (its ``state_dict()`` at that step), bit for bit; ``options``: more constructor
    arguments. The resumed table is shut down again."""
    resumed = ShardedEmbedding(table.num_embeddings, table.embedding_dim, table.num_shards, table.optimizer,
                               table.optimizer_options, checkpoint_dir=table.checkpoint_dir, run_id=table.run_id,
                               **options)
    try:
        assert resumed.step_count == step
        assert resumed.state_dict()["weight"].tobytes() == state["weight"].tobytes()
    finally:
        resumed.shutdown()


def random_step(table, rng):
    """One step of the sharded ``table`` over every row, with a float32 gradient drawn from ``rng``."""
    n_rows, dim = table.num_embeddings, table.embedding_dim
    table.backward(rng.standard_normal((n_rows, dim)).astype(np.float32), np.arange(n_rows), step=True)


def newest_checkpoint(table, k):
    """Shard ``k``'s newest checkpoint: ``{"slot", "path", "serial", "lineage", "step"}``."""
    return held_checkpoints(table._shard_dir(k))[0]


def zipf_batch(rng, V, shape):
    return (rng.zipf(1.3, size=shape) - 1) % V


@pytest.mark.parametrize("shards,optimizer,dtype", [(1, "sparseadam", "float32"), (2, "sparseadam", "float32"),
                                                    (3, "sparseadam", "float32"), (2, "adagrad", "float32"),
                                                    (3, "sparseadam", "bfloat16")])
def test_skipgram_both_tables_bitwise_equal_to_one_process(ray_local, shards, optimizer, dtype):
    V, D, B, K = 211, 8, 48, 3
    config = train_mod.TrainConfig(dim=D, optimizer=optimizer, seed=5, shards=shards, negatives=K, dtype=dtype)
    w_in, w_out = train_mod.initial_tables(V, D, config.seed)
    local = train_mod.CembedModel(w_in.copy(), w_out.copy(), config)
    sharded = train_mod.ShardedModel(w_in, w_out, config)
    rng = np.random.default_rng(shards)
    try:
        for _ in range(6):
            centers = zipf_batch(rng, V, B).astype(np.int32)
            targets = zipf_batch(rng, V, (B, 1 + K)).astype(np.int32)
            local.step(centers, targets)
            sharded.step(centers, targets)
        for table, emb in ((sharded.emb_in, local.emb_in), (sharded.emb_out, local.emb_out)):
            assert table.step_count == 6
            # every step went through the compiled graph built at the start (no silent fallback)
            assert table.transport == "compiled graph" and table.graph_builds == 1, table.graph_error
            assert_same_state(table, emb, local.opt)
        assert np.abs(local.emb_out.weight).max() > 0      # the run trained something
    finally:
        sharded.close()


CASES = [  # (shards, optimizer, options, dtype, padding_idx, compiled_graph, shard_cpus)
    (1, "sgd", {"lr": 0.5, "momentum": 0.0}, np.float64, None, True, None),
    (2, "rowwise_adagrad", {"lr": 0.3, "weight_decay": 0.01}, np.float32, 4, True, None),
    (3, "sparseadam", {"lr": 0.05}, np.float32, -1, True, None),
    (2, "sparseadam", {"lr": 0.05, "bias_correction": "row"}, np.float32, None, True, None),
    # the actor-call transport (the fallback when no compiled graph runs)
    (3, "sparseadam", {"lr": 0.05}, np.float32, -1, False, None),
    (1, "sgd", {"lr": 0.5, "momentum": 0.0}, np.float64, None, False, None),
    # shards pinned to cores
    (3, "sparseadam", {"lr": 0.05}, np.float32, None, True, "spread"),
    (2, "adagrad", {"lr": 0.1}, np.float32, None, True, [[1], [0, 1]]),
    # 16-bit tables (and state), stochastic rounding keyed by the global row: the shards round as one process
    # (and the default shard_cpus, "auto": "spread" on this one-node Ray)
    (3, "sparseadam", {"lr": 0.05, "state_dtype": "bfloat16", "seed": 9}, "bfloat16", -1, True, "auto"),
    (2, "rowwise_adagrad", {"lr": 0.3, "weight_decay": 0.01}, np.float16, 4, True, None),
    (2, "sgd", {"lr": 0.5, "momentum": 0.9, "rounding": "nearest"}, "bfloat16", None, False, None),
]


def pinned_cpus(pid):
    """The CPUs each thread of process ``pid`` may run on: a set of frozensets (one per distinct mask)."""
    import os

    def parse(text):   # the kernel's list format: "0-2,5"
        out = set()
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out |= set(range(int(lo), int(hi or lo) + 1))
        return frozenset(out)

    masks = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                line = next(x for x in f if x.startswith("Cpus_allowed_list"))
        except (OSError, StopIteration):
            continue      # a thread that just ended
        masks.add(parse(line.split()[1]))
    return masks


@pytest.mark.parametrize("shards,optimizer,options,dtype,padding_idx,compiled,cpus", CASES)
def test_one_table_each_optimizer(ray_local, shards, optimizer, options, dtype, padding_idx, compiled, cpus):
    """Fused and unfused steps, gradient accumulation over two backwards, per-sample weights,
    padding_idx, float64: every path the client offers lands on the same bits as one process,
    through the compiled graph and through actor calls, with shards pinned to cores or not."""
    import os

    V, D = 37, 5
    dtype = np.dtype(dtype)
    half = dtype.itemsize == 2
    compute = np.dtype(np.float32) if half else dtype     # lookups and gradients
    table = ShardedEmbedding(V, D, shards, optimizer, options, padding_idx=padding_idx, dtype=dtype, seed=11,
                             compiled_graph=compiled, shard_cpus=cpus)
    assert table.transport == ("compiled graph" if compiled else "actor calls"), table.graph_error
    allowed = sorted(os.sched_getaffinity(0))
    for info in table.shard_info():
        k = info["shard_id"]
        if cpus is None:
            want = None
        elif cpus in ("spread", "auto"):
            want = allowed[k::shards] if len(allowed) >= shards else [allowed[k % len(allowed)]]
        else:
            want = sorted(set(cpus[k]) & set(allowed)) or allowed
        assert info["cpus"] == want
        if want is not None:    # every thread of the shard's process, also those Ray started later
            assert pinned_cpus(info["pid"]) == {frozenset(want)}
    emb, opt = single_process(V, D, optimizer, options, 11, padding_idx=None if padding_idx is None
                              else padding_idx % V, dtype=dtype)
    rng = np.random.default_rng(3)
    try:
        assert table(np.arange(V)).tobytes() == emb(np.arange(V)).tobytes()     # the same initial table
        for it in range(6):
            idx = zipf_batch(rng, V, (7, 3))
            if it == 3:   # rows of shard 0 only: the other shards still count the step (SparseAdam's bias correction)
                idx = rng.choice(np.arange(0, V, shards), size=(7, 3))
            out, ref = table(idx), emb(idx)
            assert out.flags.writeable and out.shape == (7, 3, D) and out.tobytes() == ref.tobytes()
            # a 16-bit table also takes its gradient in its own dtype: the fused steps do that
            grad = rng.standard_normal(out.shape).astype(dtype if half and it % 3 == 0 else compute)
            if it % 3 == 0:      # fused
                sent, received = table.bytes_sent, table.bytes_received
                table.backward(grad, step=True)
                emb.backward(grad, optimizer=opt)
                # the cost model of docs/distributed.md: ids (4 B: int32 local rows) of the distinct rows
                # out, their rows back; at the step ids + summed gradient rows of the distinct rows except padding
                distinct = np.unique(idx)
                with_grad = distinct.size - int(padding_idx is not None and padding_idx % V in distinct)
                item = compute.itemsize
                assert table.bytes_received - received == 0
                assert table.bytes_sent - sent == with_grad * (4 + item * D)
                if it == 0:   # the lookups so far: all V rows, then this batch's distinct rows
                    assert received == (V + distinct.size) * item * D and sent == (V + distinct.size) * 4
            elif it % 3 == 1:    # two backwards, then one step
                idx2 = zipf_batch(rng, V, 9)
                grad2 = rng.standard_normal((9, D)).astype(compute)
                table.backward(grad)
                table.backward(grad2, idx2)
                emb.backward(grad)
                emb.backward(grad2, idx2)
                got, ref = table.grad, emb.grad        # .grad in global rows, as one process holds it
                assert isinstance(ref, cembed.SparseGrad) and got.shape == ref.shape
                assert np.array_equal(got.indices, ref.indices) and got.values.tobytes() == ref.values.tobytes()
                table.grad = got                         # set back: the same update follows
                table.step()
                opt.step()
                opt.zero_grad()
            else:                # per-sample weights (weighted sum over the last axis)
                psw = rng.standard_normal(idx.shape).astype(compute)
                g = rng.standard_normal((7, D)).astype(compute)
                table.backward(g, idx, per_sample_weights=psw, step=True)
                emb.backward(g, idx, per_sample_weights=psw, optimizer=opt)
        assert table.step_count == 6
        assert_same_state(table, emb, opt)
        assert table.graph_builds == int(compiled)
    finally:
        table.shutdown()


def test_graph_torn_down_under_the_table(ray_local):
    """The compiled graph breaks with every shard alive (torn down behind the table's back, once
    between calls and once with a step in flight): the table notices, finishes the calls by actor
    calls (a step a shard may have missed is replayed from the log), builds a new graph, and trains
    on bitwise as one process."""
    V, D, opts = 31, 4, {"lr": 0.05}
    table = ShardedEmbedding(V, D, 2, "sparseadam", opts, seed=6, compiled_graph=True)
    emb, opt = single_process(V, D, "sparseadam", opts, 6)
    rng = np.random.default_rng(9)
    try:
        for it in range(8):
            if it in (2, 5):
                table._graph.teardown()
            idx = zipf_batch(rng, V, 11)
            out = table(idx)
            assert out.tobytes() == emb(idx).tobytes()
            grad = rng.standard_normal(out.shape).astype(np.float32)
            table.backward(grad, step=True)
            emb.backward(grad, idx, optimizer=opt)
            if it == 3:
                table._graph.teardown()     # the step just sent is in flight
        assert table.graph_builds == 4 and table.transport == "compiled graph"
        assert table.step_count == 8
        assert_same_state(table, emb, opt)
        assert not table._log[0] and not table._log[1]     # answered steps leave the log (no checkpoints)
    finally:
        table.shutdown()


def test_bad_input_changes_nothing(ray_local):
    table = ShardedEmbedding(20, 4, 2, "sgd", {"lr": 0.1}, seed=1)
    try:
        before = table.state_dict()["weight"]
        with pytest.raises(IndexError):
            table(np.array([0, 20]))
        with pytest.raises(IndexError):
            table(np.array([-1]))
        with pytest.raises(TypeError):
            table(np.array([0.5]))
        out = table(np.array([1, 2]))
        with pytest.raises(TypeError):
            table.backward(out.astype(np.float64), step=True)
        with pytest.raises(ValueError):
            table.backward(np.ones((3, 4), np.float32), step=True)          # wrong shape for 2 indices
        with pytest.raises(IndexError):
            table.backward(np.ones((1, 4), np.float32), np.array([99]), step=True)
        with pytest.raises(TypeError, match="step must be True or False"):   # "False" was read as true: a step
            table.backward(np.ones_like(out), step="False")
        table.backward(np.ones_like(out))
        with pytest.raises(ValueError):
            table.backward(np.ones_like(out), step=True)                     # a .grad is present
        with pytest.raises(TypeError):
            table.grad = np.ones((2, 4), np.float32)                          # not a SparseGrad
        table.zero_grad()
        assert table.grad is None
        table.step()                                                          # nothing to do
        assert table.step_count == 0
        assert table(np.zeros((2, 0), np.int64)).shape == (2, 0, 4)              # an empty lookup
        assert table.state_dict()["weight"].tobytes() == before.tobytes()
        check_loopback()
    finally:
        table.shutdown()


def test_bad_arguments_refused_before_any_actor(ray_local):
    with pytest.raises(ValueError, match="optimizer"):
        ShardedEmbedding(10, 4, 2, "adam")
    with pytest.raises(ValueError, match="num_shards"):
        ShardedEmbedding(3, 4, 5)
    with pytest.raises(ValueError):
        ShardedEmbedding(10, 4, 2, "sgd", {"lr": -1.0})
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ShardedEmbedding(10, 4, 2, checkpoint_every=3)
    with pytest.raises(ValueError, match="ray_options"):
        ShardedEmbedding(10, 4, 2, ray_options=[{}])
    with pytest.raises(TypeError, match="compiled_graph"):
        ShardedEmbedding(10, 4, 2, compiled_graph="yes")
    with pytest.raises(ValueError, match="get_if_exists is set by the table"):   # (it joined a live run's actors)
        ShardedEmbedding(10, 4, 2, ray_options={"get_if_exists": True})
    for bad in ("everywhere", [[0]], [[0], []], [[0], [-1]], [[0], [1.5]], [0, 1], [[0], "1"]):
        with pytest.raises(ValueError, match="shard_cpus"):
            ShardedEmbedding(10, 4, 2, shard_cpus=bad)
    with pytest.raises(TypeError):
        ShardedEmbedding(10, 4, 2, dtype=np.int16)
    with pytest.raises(ValueError, match="rounding_rows"):   # set by the table: shard k rounds as rows k::S
        ShardedEmbedding(10, 4, 2, "sgd", {"lr": 0.1, "rounding_rows": (0, 1)}, dtype="bfloat16")
    with pytest.raises(ValueError, match="state_dtype"):     # 16-bit state needs a 16-bit table
        ShardedEmbedding(10, 4, 2, "sparseadam", {"state_dtype": "bfloat16"})


@pytest.mark.parametrize("optimizer,opts,dtype,state_key", [
    ("sparseadam", {"lr": 0.02}, np.float32, "exp_avg"),
    # a bfloat16 table with SGD momentum: the live-row list is reassembled in global rows and split again
    ("sgd", {"lr": 0.1, "momentum": 0.9, "state_dtype": "bfloat16"}, "bfloat16", "momentum_buffer")])
def test_state_dict_round_trip_across_shard_counts(ray_local, tmp_path, optimizer, opts, dtype, state_key):
    """save_checkpoint with 3 shards, load_checkpoint into 2: training continues bitwise as one process."""
    V, D = 29, 4
    three = ShardedEmbedding(V, D, 3, optimizer, opts, seed=2, dtype=dtype)
    two = ShardedEmbedding(V, D, 2, optimizer, opts, seed=99, dtype=dtype)
    emb, opt = single_process(V, D, optimizer, opts, 2, dtype=dtype)
    rng = np.random.default_rng(0)
    try:
        for _ in range(3):
            idx = zipf_batch(rng, V, 10)
            grad = rng.standard_normal((10, D)).astype(np.float32)
            three(idx)
            three.backward(grad, step=True)
            emb.backward(grad, idx, optimizer=opt)
        three.save_checkpoint(str(tmp_path / "table"))
        # a cembed checkpoint of one table named "table": it loads into one process as well
        emb_copy, opt_copy = single_process(V, D, optimizer, opts, 0, dtype=dtype)
        extra = cembed.load_checkpoint(str(tmp_path / "table"), {"table": emb_copy}, opt_copy)
        assert extra["step"] == 3 and emb_copy.weight.tobytes() == emb.weight.tobytes()
        assert opt_copy.state[emb_copy][state_key].tobytes() == opt.state[emb][state_key].tobytes()
        two.load_checkpoint(str(tmp_path / "table"))
        assert two.step_count == 3
        idx = zipf_batch(rng, V, 10)
        grad = rng.standard_normal((10, D)).astype(np.float32)
        two(idx)
        two.backward(grad, step=True)
        emb.backward(grad, idx, optimizer=opt)
        assert_same_state(two, emb, opt)
    finally:
        three.shutdown()
        two.shutdown()


def check_loopback():
    """With this session's Ray up and after this module's runs: every TCP/UDP socket of the
    namespace is on loopback (and the scan sees Ray's sockets: the raylet, GCS, workers)."""
    from netcheck import non_loopback, sockets

    bad, interfaces = non_loopback()
    assert interfaces == ["lo"]
    assert len(sockets()) >= 10
    assert not bad, f"sockets off loopback: {bad}"
