"""functional.group_indices: indices checked and grouped once, ahead of the calls that use them. Every
call that takes them gives bitwise the results of the plain indices; the object keeps private
read-only copies, so nothing done to the caller's arrays (or to what it hands out) reaches a kernel,
and a table that shrank in between is re-checked before anything changes."""
import threading

import numpy as np
import pytest

import cembed
from cembed import functional as F
from cembed import optim

from util import assert_bitwise_equal, at_thread_counts, fingerprint, zipf_indices

V, D = 600, 12

OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SparseAdam", {"lr": 0.01}),
    ("SparseAdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1}),
    ("RowWiseAdagrad", {"lr": 0.1, "weight_decay": 0.01, "weight_decay_mode": "decoupled"}),
]

MODULE_OPTIONS = [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True}, {"max_norm": 1.0}]


def _batch(rng, shape=(80, 5)):
    idx = zipf_indices(rng, int(np.prod(shape)), V).reshape(shape)
    idx[0, 0] = 3   # the padding row, when there is one
    return idx


def _train(indices_of, opt_name, opt_kwargs, module_kwargs, fused, steps=3):
    """A few forward + backward + update steps on the batches ``indices_of(k)`` gives; the module's
    weight, its optimizer's state and every forward output, as one fingerprint."""
    rng = np.random.default_rng(7)
    emb = cembed.Embedding(V, D, sparse=True, seed=1, **module_kwargs)
    opt = getattr(optim, opt_name)([emb], **opt_kwargs)
    outputs = []
    for k in range(steps):
        indices = indices_of(k)
        out = emb(indices)
        outputs.append(out)
        grad = rng.standard_normal(out.shape, dtype=np.float32)
        if fused:
            emb.backward(grad, optimizer=opt)                 # the forward's saved indices
            query = rng.standard_normal((out.shape[0], D), dtype=np.float32)
            _, scores, _ = F.embedding_dot_logistic(query, indices, emb.weight)
            emb.backward(query, indices, per_sample_weights=scores, optimizer=opt)   # explicit indices
        else:
            emb.backward(grad, indices)
            opt.step()
            opt.zero_grad()
    return fingerprint(emb.weight, opt.state_dict()["state"], outputs)


@pytest.mark.parametrize("opt_name, opt_kwargs", OPTIMIZERS)
@pytest.mark.parametrize("module_kwargs", MODULE_OPTIONS)
@pytest.mark.parametrize("fused", [True, False])
def test_modules_give_the_bits_of_plain_indices(opt_name, opt_kwargs, module_kwargs, fused):
    rng = np.random.default_rng(0)
    batches = [_batch(rng) for _ in range(3)]
    plain = _train(lambda k: batches[k], opt_name, opt_kwargs, module_kwargs, fused)
    grouped = [F.group_indices(b, V) for b in batches]
    results = at_thread_counts(lambda: _train(lambda k: grouped[k], opt_name, opt_kwargs, module_kwargs, fused))
    assert results == [plain] * len(results)


def test_functional_calls_give_the_bits_of_plain_indices(rng):
    weight = rng.standard_normal((V, D)).astype(np.float32)
    idx = _batch(rng, (50, 6))
    grouped = F.group_indices(idx, V)
    grad = rng.standard_normal((50, 6, D)).astype(np.float32)
    query = rng.standard_normal((50, D)).astype(np.float32)
    psw = rng.standard_normal((50, 6)).astype(np.float32)

    def calls(ids):
        w = weight.copy()
        return [
            F.embedding(ids, weight),
            F.embedding(ids, w, max_norm=0.5), w,
            F.embedding_backward(grad, ids, V, padding_idx=3, scale_grad_by_freq=True, sparse=True),
            F.embedding_backward(grad, ids, V),
            F.embedding_backward(query, ids, V, per_sample_weights=psw, sparse=True),
            F.embedding_dot(query, ids, weight),
            F.embedding_dot_backward(psw, ids, weight),
            F.embedding_dot_logistic(query, ids, weight, n_positive=2),
            F.embedding_dot_logistic_sgd_(query, ids, w, lr=0.1), w,
        ]
    assert fingerprint(calls(grouped)) == fingerprint(calls(idx))
    rows = idx[:, 0]
    values = rng.standard_normal((50, D)).astype(np.float32)
    assert fingerprint(F.coalesce(F.group_indices(rows, V), values, V)) == fingerprint(F.coalesce(rows, values, V))


def test_dot_logistic_backward_takes_grouped_indices(rng):
    query = rng.standard_normal((40, D)).astype(np.float32)
    idx = _batch(rng, (40, 4))

    def run(ids):
        emb = cembed.Embedding(V, D, sparse=True, seed=2, padding_idx=3)
        opt = optim.SparseAdam([emb], lr=0.01)
        results = emb.dot_logistic_backward(query, ids, optimizer=opt)
        return fingerprint(results, emb.weight, opt.state_dict()["state"])
    assert run(F.group_indices(idx, V)) == run(idx)


def test_what_it_holds(rng):
    idx = _batch(rng, (30, 4)).astype(np.int32)
    grouped = F.group_indices(idx, V)
    assert grouped.shape == (30, 4) and grouped.num_rows == V and grouped.n_distinct == np.unique(idx).size
    assert "GroupedIndices(shape=(30, 4), dtype=int32" in repr(grouped)
    assert_bitwise_equal(np.asarray(grouped), idx)
    order, rows, starts = grouped.groups
    assert_bitwise_equal(rows, np.unique(idx).astype(np.int64))
    assert_bitwise_equal(order, np.argsort(idx.reshape(-1), kind="stable"))
    for array in grouped.groups:   # read-only for good: the flag cannot be turned back on, nor through .base
        with pytest.raises(ValueError):
            array.flags.writeable = True
        with pytest.raises((ValueError, TypeError)):
            np.frombuffer(array.base, dtype=array.dtype)[...] = 0
    with pytest.raises(ValueError):
        rows[0] = 1
    with pytest.raises(AttributeError, match="immutable"):
        grouped._n_rows = 0
    with pytest.raises(TypeError, match="group_indices"):
        F.GroupedIndices(idx, idx.reshape(-1), 0, grouped.groups)   # only group_indices makes them
    assert F.group_indices(grouped, V) is grouped   # already checked against as many rows
    assert F.group_indices(grouped, V + 5) is grouped
    assert F.group_indices(np.array([], dtype=np.int64), 0).n_distinct == 0


def test_large_batches_are_frozen_in_recycled_memory(rng):
    """A batch big enough for recycled blocks (hundreds of kB per array) is sorted straight into them
    and frozen in place: nothing reaches a writeable buffer, not .base, not the block owning the
    memory, and the caller's array stays its own."""
    n_rows = 1 << 20
    idx = rng.integers(0, n_rows, 200_000)
    grouped = F.group_indices(idx, n_rows)
    want = (idx.copy(), np.argsort(idx, kind="stable"), np.unique(idx))
    idx[:] = n_rows + 5    # the caller's array was copied before the check
    for array in (grouped._flat,) + grouped.groups:   # the held indices (asarray hands out a copy) and groups
        assert array.nbytes >= 1 << 18
        with pytest.raises(ValueError):
            array.flags.writeable = True
        owner = array
        while isinstance(owner, np.ndarray):
            owner = owner.base
        assert isinstance(owner, memoryview) and owner.readonly
        with pytest.raises((ValueError, TypeError, BufferError)):
            np.frombuffer(owner.obj, dtype=np.uint8)[...] = 0
        with pytest.raises((TypeError, BufferError)):
            memoryview(owner.obj).cast("B")[0] = 0
    order, rows, starts = grouped.groups
    assert_bitwise_equal(np.asarray(grouped), want[0])
    assert_bitwise_equal(order, want[1])
    assert_bitwise_equal(rows, want[2])
    weight = np.zeros((n_rows, 2), np.float32)
    assert F.embedding(grouped, weight).shape == (200_000, 2)


class _Sneaky(np.ndarray):
    """An index array that tries to keep every array NumPy functions are called with."""

    seen: list = []

    def __array_function__(self, func, types, args, kwargs):
        _Sneaky.seen.extend(a for a in args if isinstance(a, np.ndarray))
        return super().__array_function__(func, (np.ndarray,), args, kwargs)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _Sneaky.seen.extend(a for a in inputs if isinstance(a, np.ndarray))
        plain = [np.asarray(a) if isinstance(a, _Sneaky) else a for a in inputs]
        return getattr(ufunc, method)(*plain, **kwargs)


def _writeable_aliases(grouped):
    """Writeable arrays / memoryviews sharing memory with what ``grouped`` holds, among every object
    the garbage collector tracks (memoryviews are tracked) and what _Sneaky kept."""
    import gc

    held = (grouped._flat,) + grouped.groups
    found = []
    tracked = [obj for obj in gc.get_objects() if type(obj) is memoryview]   # type(): no attribute lookups
    for obj in tracked + _Sneaky.seen:
        try:
            if type(obj) is memoryview and not obj.readonly:
                candidate = np.asarray(obj)
            elif isinstance(obj, np.ndarray) and obj.flags.writeable:
                candidate = obj
            else:
                continue
        except (TypeError, ValueError):
            continue
        if any(np.shares_memory(candidate, h) for h in held if h.size):
            found.append(obj)
    return found


def test_no_writeable_alias_ever_exists(rng):
    """Neither an index array whose type hooks NumPy calls (keeping what it is handed) nor a garbage
    collector callback run in the middle of group_indices (listing every tracked object) gets hold of
    writeable memory that the result keeps: the copy and the grouping are written into read-only
    blocks by C code, and the check reads that copy."""
    import gc

    n_rows = 1 << 20
    _Sneaky.seen.clear()
    idx = rng.integers(0, n_rows, 200_000).view(_Sneaky)
    grabbed = []

    def grab(phase, info):
        grabbed.extend(o for o in gc.get_objects() if type(o) is memoryview and not o.readonly)

    threshold = gc.get_threshold()
    gc.callbacks.append(grab)
    gc.set_threshold(1)
    try:
        grouped = F.group_indices(idx, n_rows)
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(grab)
    _Sneaky.seen.extend(np.asarray(m) for m in grabbed if m.obj is not None)
    assert _writeable_aliases(grouped) == []
    weight = np.zeros((n_rows, 2), np.float32)
    assert F.embedding(grouped, weight).shape == (200_000, 2)


def test_refusals_name_the_problem():
    with pytest.raises(IndexError, match=r"indices contains 600 at position \(1, 0\), outside the valid range \[0, 600\)"):
        F.group_indices([[1, 2], [600, 3]], V)
    with pytest.raises(IndexError, match="-1"):
        F.group_indices([-1], V)
    with pytest.raises(TypeError, match="integer"):
        F.group_indices(np.array([1.0, 2.0]), V)
    with pytest.raises(ValueError, match="num_rows"):
        F.group_indices([1], -1)


def test_the_callers_arrays_never_reach_a_kernel(rng):
    """The grouping keeps its own copy: changing the array it was made from, or the copy it hands
    out, changes nothing (an out-of-range value written there is never read)."""
    weight = rng.standard_normal((V, D)).astype(np.float32)
    idx = _batch(rng, (20, 3))
    want = F.embedding(idx.copy(), weight)
    grouped = F.group_indices(idx, V)
    idx[:] = 10 ** 9
    handed_out = np.asarray(grouped)
    handed_out[:] = 10 ** 9
    assert_bitwise_equal(F.embedding(grouped, weight), want)
    flat32 = np.arange(12, dtype=np.int32)   # int32 C-contiguous: the flat view is the caller's array
    grouped32 = F.group_indices(flat32, V)
    flat32[:] = 599
    assert_bitwise_equal(np.asarray(grouped32), np.arange(12, dtype=np.int32))


class _KeepsItsArray:
    """An object whose ``__array__`` hands out an array it keeps (NumPy wraps it without copying)."""

    def __init__(self, array):
        self.array = array

    def __array__(self, dtype=None, copy=None):
        return self.array


@pytest.mark.parametrize("kind", ["array.array", "memoryview", "__array__"])
def test_any_buffer_the_caller_keeps_is_copied(kind):
    """Indices in memory the caller can still write — an ``array.array``, a ``memoryview``, an object
    whose ``__array__`` returns an array it keeps — are copied by group_indices and by the forward; a
    refill with a far out-of-range id afterwards reaches no kernel. A SparseGrad built on grouped
    indices cannot be used to change them either."""
    import array

    ids = np.array([1, 2, 2, 7], dtype=np.int64)
    holder = {"array.array": lambda: array.array("q", ids), "memoryview": lambda: memoryview(ids.copy()),
              "__array__": lambda: _KeepsItsArray(ids.copy())}[kind]

    def refill(buf):
        (buf.array if kind == "__array__" else buf)[0] = 10 ** 9

    weight = np.arange(V * 2, dtype=np.float32).reshape(V, 2)
    buf = holder()
    grouped = F.group_indices(buf, V)
    refill(buf)
    assert_bitwise_equal(F.embedding(grouped, weight), weight[ids])
    emb = cembed.Embedding.from_pretrained(weight.copy(), freeze=False, sparse=True)
    opt = optim.SGD([emb], lr=1.0)
    buf = holder()
    out = emb(buf)
    refill(buf)
    emb.backward(np.ones_like(out), optimizer=opt)
    want = weight.copy()
    want[[1, 2, 7]] -= np.array([1, 2, 1], np.float32)[:, None]
    assert_bitwise_equal(emb.weight, want)
    grad = F.embedding_backward(np.ones((4, 2), np.float32), grouped, V, sparse=True)
    with pytest.raises(ValueError):
        grad.indices.flags.writeable = True


def test_a_table_that_shrank_is_rechecked_before_anything_changes(rng):
    idx = _batch(rng, (20, 3)) % (V // 2)
    idx[5, 1] = V - 1   # the one id the smaller table does not have
    grouped = F.group_indices(idx, V)
    small = cembed.Embedding(V // 2, D, sparse=True, seed=3)
    opt = optim.SparseAdam([small], lr=0.1)
    small.backward(np.ones((2, D), np.float32), [0, 1], optimizer=opt)
    before = fingerprint(small.weight, opt.state_dict()["state"])
    for call in (lambda: small(grouped),
                 lambda: small.backward(np.ones(idx.shape + (D,), np.float32), grouped, optimizer=opt),
                 lambda: small.backward(np.ones(idx.shape + (D,), np.float32), grouped),
                 lambda: F.embedding_dot(np.ones((20, D), np.float32), grouped, small.weight),
                 lambda: small.dot_logistic_backward(np.ones((20, D), np.float32), grouped, optimizer=opt)):
        with pytest.raises(IndexError, match=rf"indices contains {V - 1} at position \(5, 1\), outside the valid "
                                             rf"range \[0, {V // 2}\)"):
            call()
        assert small.grad is None and fingerprint(small.weight, opt.state_dict()["state"]) == before
    idx[5, 1] = 0
    fits = F.group_indices(idx, V)   # checked against V rows, all inside the smaller table
    assert_bitwise_equal(small(fits), small(idx))


def test_saved_forward_then_a_smaller_table(rng):
    """A forward on grouped indices saves them; replacing the weight by a smaller table before the
    backward is caught by the saved record's re-check, as for plain indices."""
    emb = cembed.Embedding(V, D, sparse=True, seed=4)
    out = emb(F.group_indices([[1, V - 2]], V))
    emb.weight = emb.weight[: V // 2].copy()
    with pytest.raises(IndexError, match="saved at forward"):
        emb.backward(np.ones_like(out))
    assert emb.grad is None


def test_made_in_another_thread_while_training(rng):
    """The trainer's use: a loader thread groups batch k + 1 (its own sorts, at the same time as the
    step's) while batch k trains; the same bits as plain indices."""
    import queue

    batches = [_batch(rng, (400, 6)) for _ in range(12)]
    made: "queue.Queue" = queue.Queue(maxsize=1)
    loader = threading.Thread(target=lambda: [made.put(F.group_indices(b, V)) for b in batches])
    loader.start()
    try:
        grouped = _train(lambda k: made.get(timeout=30), "SparseAdam", {"lr": 0.01}, {}, True, steps=12)
    finally:
        loader.join(timeout=30)
    assert grouped == _train(lambda k: batches[k], "SparseAdam", {"lr": 0.01}, {}, True, steps=12)


def test_grouped_indices_pickle_and_copy():
    """A loader process hands batches over by pickling: the result is grouped anew from the indices
    (checked and sorted again), equal to the original; copies are the (immutable) object itself."""
    import copy
    import pickle

    batch = F.group_indices(np.array([[3, 1], [3, 7]]), num_rows=10)
    again = pickle.loads(pickle.dumps(batch))
    assert again.shape == batch.shape and again.num_rows == 10 and again.n_distinct == 3
    assert np.array_equal(np.asarray(again), np.asarray(batch))
    for a, b in zip(again.groups, batch.groups):
        assert np.array_equal(a, b)
    assert copy.copy(batch) is batch and copy.deepcopy(batch) is batch
    rebuild, (indices, num_rows) = batch.__reduce__()   # a pickle that lies about the table size is refused
    with pytest.raises(IndexError):
        rebuild(indices, 2)
