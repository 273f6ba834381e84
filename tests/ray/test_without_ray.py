"""What runs everywhere, without Ray: importing cembed (and cembed.distributed, the trainer, the CLI,
and collecting these tests) never imports Ray; the per-row initial values against a plain-Python
SplitMix64."""
import os
import pathlib
import subprocess
import sys
import weakref

import numpy as np
import pytest

import cembed

from cembed.distributed import initial_rows

ROOT = pathlib.Path(__file__).resolve().parents[2]
M64 = (1 << 64) - 1


def test_imports_and_collection_do_not_import_ray(tmp_path):
    """In a child process, with the cembed these tests import (installed or built in place)."""
    here = str(pathlib.Path(cembed.__file__).resolve().parents[1])
    code = ("import sys, pytest\n"
            "import cembed, cembed.distributed, cembed.apps.train, cembed.apps.cli\n"
            "assert 'ray' not in sys.modules, 'import cembed pulled in ray'\n"
            f"rc = pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', {str(ROOT / 'tests' / 'ray')!r}])\n"
            "assert rc == 0, rc\n"
            "assert 'ray' not in sys.modules, 'collecting tests/ray imported ray'\n")
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


@pytest.mark.parametrize("dtype,bits", [(np.float32, 24), (np.float64, 53)])
def test_initial_rows_match_a_plain_python_reference(dtype, bits):
    seed, dim = 2 ** 40 + 3, 5
    rows = [0, 7, 123456789, 7]
    got = initial_rows(seed, rows, dim, dtype)
    key = splitmix64(seed)
    for i, r in enumerate(rows):
        for c in range(dim):
            u = (splitmix64((r * dim + c) ^ key) >> (64 - bits)) / 2.0 ** bits
            want = (dtype(u) - dtype(0.5)) / dtype(dim)
            assert got[i, c] == want and got.dtype == dtype
    assert np.array_equal(initial_rows(seed, rows, dim, dtype, "zeros"), np.zeros((4, dim), dtype))


@pytest.mark.parametrize("dtype", ["bfloat16", np.float16])
def test_initial_rows_of_a_16_bit_table_are_the_float32_ones_rounded(dtype):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    want_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    f32 = initial_rows(4, np.arange(50), 12)
    got = initial_rows(4, np.arange(50), 12, dtype)
    assert got.dtype == want_dtype and got.tobytes() == f32.astype(want_dtype).tobytes()
    assert not initial_rows(4, [1, 2], 3, dtype, "zeros").any()
    with pytest.raises(TypeError, match="dtype"):
        initial_rows(4, [1], 3, np.int32)


def test_initial_rows_do_not_depend_on_the_split():
    table = initial_rows(9, np.arange(1000), 16)
    for shards in (2, 3, 7):
        for k in range(shards):
            assert initial_rows(9, np.arange(k, 1000, shards), 16).tobytes() == table[k::shards].tobytes()
    assert not np.array_equal(table, initial_rows(10, np.arange(1000), 16))
    assert abs(float(table.mean())) < 1e-3 and 0.0 < float(table.std()) * 16 < 0.3


def test_initial_rows_refuses_bad_arguments():
    with pytest.raises(ValueError):
        initial_rows(-1, [0], 4)
    with pytest.raises(TypeError):
        initial_rows(0, [0.5], 4)
    with pytest.raises(IndexError):
        initial_rows(0, [-1], 4)
    with pytest.raises(TypeError):
        initial_rows(0, [0], 4, np.int32)
    with pytest.raises(ValueError):
        initial_rows(0, [0], 4, init="normal")


def test_public_callables_of_distributed_have_examples():
    """numpydoc Examples on every public name of cembed.distributed and the client's methods."""
    import inspect

    import cembed.distributed as dist

    missing = []
    for name in dist.__all__:
        obj = getattr(dist, name)
        if not callable(obj):
            continue
        members = [(name, obj)]
        if inspect.isclass(obj) and obj.__module__.startswith("cembed.distributed"):
            members += [(f"{name}.{attr}", m) for attr, m in vars(obj).items()
                        if not attr.startswith("_") and callable(m)]
        for label, member in members:
            doc = inspect.getdoc(member) or ""
            if "Examples" not in doc or ">>>" not in doc:
                missing.append(label)
    assert not missing, missing


@pytest.mark.parametrize("V,S", [(1, 1), (10, 1), (10, 3), (11, 2), (997, 7), (1001, 4), (64, 8)])
def test_keys_group_rows_by_shard(V, S):
    """The client's row numbering: a bijection of [0, V) that sorts rows by (shard, local row)."""
    from cembed.distributed._client import key_rows, row_keys, per_shard_rows

    stride = per_shard_rows(V, S)[0]
    rows = np.arange(V)
    keys = row_keys(rows, S, stride)
    for dtype in (np.int32, np.uint32, np.uint64):     # any integer dtype the client accepts
        assert np.array_equal(row_keys(rows.astype(dtype), S, stride), keys)
    assert np.array_equal(key_rows(keys, S, stride), rows)
    assert np.unique(keys).size == V and keys.min() >= 0 and keys.max() < S * stride
    by_key = rows[np.argsort(keys)]
    assert np.array_equal(by_key, np.array(sorted(rows, key=lambda r: (r % S, r // S))))


def test_inverse_matches_numpy_unique():
    """The lookup's grouping (cembed's radix sort) gives numpy.unique's distinct keys and inverse."""
    from cembed import functional as F
    from cembed.distributed._client import _inverse

    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 50, 4000):
        keys = rng.integers(0, 60, n).astype(np.int64)
        order, uniq, starts = F.group_rows(keys, 60)
        ref_uniq, ref_inverse = np.unique(keys, return_inverse=True)
        assert np.array_equal(uniq, ref_uniq) and np.array_equal(_inverse(order, starts), ref_inverse)
        # a stable argsort: equal keys keep input order (the order the backward sums them in)
        assert np.array_equal(order, np.argsort(keys, kind="stable"))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("pad", [None, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_over_the_lookups_grouping_is_embedding_backward(threads, pad, dtype):
    """The client's backward sums grad_output over the grouping its lookup made (one sort per step):
    bitwise the sparse gradient of embedding_backward, which sorts the keys itself — for any thread
    count, with and without a padding key, on Zipf keys (long runs of one row) and on all-distinct keys."""
    from cembed import functional as F

    rng = np.random.default_rng(threads)
    n_keys = 3000
    zipf = ((rng.zipf(1.1, 20000) - 1) % n_keys).astype(np.int64)
    for keys in (zipf, rng.permutation(n_keys)[:1000], zipf[:1].copy(), zipf[:0].copy()):
        keys = keys.reshape(-1, 4) if keys.size % 4 == 0 and keys.size else keys
        grad = rng.standard_normal(keys.shape + (5,)).astype(dtype)
        groups = F.group_rows(keys, n_keys)
        old = cembed.set_num_threads(threads)
        try:
            got = F.lookup_contributions(grad, keys.shape, keys.reshape(-1), padding_idx=pad, groups=groups,
                                         dim=5, dtype=np.dtype(dtype)).sparse(n_keys)
            want = F.embedding_backward(grad, keys, n_keys, padding_idx=pad, sparse=True)
        finally:
            cembed.set_num_threads(old)
        assert got.indices.tobytes() == want.indices.tobytes()
        assert got.values.dtype == want.values.dtype and got.values.tobytes() == want.values.tobytes()
        if pad is not None:
            assert pad not in got.indices


def test_spread_gives_each_shard_its_own_cpus():
    """shard_cpus="spread": the shards of one node split the CPUs the process may use (each CPU to one
    shard when there are at least as many CPUs as shards, else shards share them round-robin)."""
    import os

    from cembed.distributed._shard import shard_cpus

    allowed = sorted(os.sched_getaffinity(0))
    for S in (1, 2, 3, len(allowed), len(allowed) + 1):
        got = [shard_cpus("spread", k, S) for k in range(S)]
        assert all(got) and all(set(g) <= set(allowed) for g in got)
        if S <= len(allowed):
            assert sorted(c for g in got for c in g) == allowed        # a partition
        else:
            assert all(len(g) == 1 for g in got) and {g[0] for g in got} == set(allowed)
    assert shard_cpus([3, 1], 0, 2) == [3, 1]


def test_pin_process_pins_every_thread(tmp_path):
    """In a child process (pinning is for the whole process): a thread started before and one
    started after the call both end up on the CPU asked for; a CPU the process may not use is left out."""
    import os

    cpu = min(os.sched_getaffinity(0))
    here = str(pathlib.Path(cembed.__file__).resolve().parents[1])
    code = ("import os, threading, time\n"
            "from cembed.distributed._shard import pin_process\n"
            "ev = threading.Event()\n"
            "before = threading.Thread(target=ev.wait); before.start()\n"
            f"assert pin_process([{cpu}, 10 ** 6]) == [{cpu}]\n"
            "seen = []\n"
            "after = threading.Thread(target=lambda: seen.append(os.sched_getaffinity(0))); after.start(); after.join()\n"
            f"assert seen == [{{{cpu}}}], seen\n"
            f"assert os.sched_getaffinity(before.native_id) == {{{cpu}}}\n"
            "ev.set(); before.join()\n")
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("bad", ["everywhere", [[0]], [[0], []], [[0], [-1]], [[0], [1.5]], [0, 1], [[0], "1"]])
def test_bad_shard_cpus_refused_before_ray(bad):
    from cembed.distributed import ShardedEmbedding

    with pytest.raises(ValueError, match="shard_cpus"):
        ShardedEmbedding(10, 4, 2, shard_cpus=bad)


def test_a_table_after_ray_shutdown_is_refused_and_starts_no_ray():
    """After ray.shutdown() a table's calls are a RuntimeError saying so (they failed deep inside Ray), and
    its shutdown() stops nothing and starts nothing (ray.kill would start a new local Ray: its auto-init,
    without init_local's loopback-only settings). A stand-in for the Ray module: no Ray runs here."""
    from cembed.distributed import ShardedEmbedding

    class StoppedRay:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def kill(*args, **kwargs):
            raise AssertionError("ray.kill called after ray.shutdown()")

    from cembed.distributed._client import _release_shards

    table = object.__new__(ShardedEmbedding)
    table._ray, table._broken, table._graph, table._want_graph, table._actors = StoppedRay(), None, None, True, ["a"]
    table._session = ("node", "job")   # (the session it was made in, gone now)
    table._graph_holder = {"graph": None}
    table._release = weakref.finalize(table, _release_shards, table._ray, table._graph_holder, table._actors)
    for call in (lambda: table(np.arange(3)), table.sync, table.state_dict):
        with pytest.raises(RuntimeError, match="Ray was shut down"):
            call()
    table.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        table(np.arange(3))
