"""Regressions of the 2026-11-26 review of the functional layer that need no child process: a
``grad_output`` that is a view of the table, integer tables in bags, max bags on a table read through a
copy, module reprs, and the exception classes of extreme arguments (tests/test_safety.py holds the
cases that segfaulted)."""
import copy
import pickle

import numpy as np
import pytest

import cembed
from cembed import functional as F
from util import backward_and_step

torch = pytest.importorskip("torch")


def _weights(rows, dim, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


@pytest.mark.parametrize("module", ["embedding", "bag"])
@pytest.mark.parametrize("dim", [4, 16384])   # 16384: one segment per chunk of the fused kernel
def test_fused_backward_reads_grad_output_that_views_the_weight_as_it_was(module, dim):
    """``grad_output`` a slice of the weight itself: the fused backward + SGD equals backward();
    step() (which sums the gradient before any row changes) — before the fix a wide-row chunk read a
    row another chunk had already updated."""
    base = _weights(2, dim)
    idx = np.array([1, 0])

    def run(fused):
        if module == "embedding":
            mod = cembed.Embedding.from_pretrained(base.copy(), freeze=False, sparse=True)
        else:
            mod = cembed.EmbeddingBag.from_pretrained(base.copy(), freeze=False, sparse=True, mode="sum")
            mod(idx, offsets=[0, 1])
        opt = cembed.optim.SGD([mod], lr=1.0)
        go = mod.weight[0:2]
        args = (go, idx) if module == "embedding" else (go,)
        if fused:
            mod.backward(*args, optimizer=opt)
        else:
            mod.backward(*args)
            opt.step()
        return mod.weight

    want = base.copy()
    want[1] -= base[0]
    want[0] -= base[1]
    np.testing.assert_array_equal(run(False), want)
    np.testing.assert_array_equal(run(True), want)


def test_dense_backward_into_grad_that_grad_output_views():
    """A dense ``.grad`` added to in place, with ``grad_output`` a view of that same ``.grad``: the
    result is that of a copy of ``grad_output``."""
    emb = cembed.Embedding(4, 8192, seed=0)
    emb.grad = _weights(4, 8192, seed=1)
    start = emb.grad.copy()
    idx = np.array([1, 0, 3])
    go = emb.grad[0:3]
    emb.backward(go, idx)
    want = start.copy()
    np.add.at(want, idx, start[0:3])
    np.testing.assert_array_equal(emb.grad, want)


def test_sparse_grad_pickles_and_copies_through_the_constructor():
    g = cembed.SparseGrad([1, 3], np.arange(4, dtype=np.float32).reshape(2, 2), 5)
    for twin in (pickle.loads(pickle.dumps(g)), copy.deepcopy(g), copy.copy(g)):
        assert type(twin) is cembed.SparseGrad and twin.shape == g.shape
        np.testing.assert_array_equal(twin.indices, g.indices)
        np.testing.assert_array_equal(twin.values, g.values)
        with pytest.raises(AttributeError):
            twin._num_rows = 10


def test_integer_bags_never_wrap():
    """Integer tables in bags sum in int64 and average in float64: a sum that int64 cannot hold is a
    ValueError (it wrapped before), a mean is the exact sum divided, and small values keep the fast
    int64 path (checked against a Python-integer reference)."""
    huge = np.array([[2**63 + 5]], dtype=np.uint64)
    with pytest.raises(ValueError, match="outside int64"):
        F.embedding_bag([0], huge, offsets=[0], mode="sum")
    np.testing.assert_array_equal(F.embedding_bag([0], huge, offsets=[0], mode="mean"), [[float(2**63 + 5)]])
    np.testing.assert_array_equal(F.embedding_bag([0], huge, offsets=[0], mode="max"), huge)
    x = 3 * 2**61
    table = np.array([[x], [-5]], dtype=np.int64)
    mean = F.embedding_bag([0, 0, 1], table, offsets=[0, 2, 2], mode="mean")
    np.testing.assert_array_equal(mean, [[float(x)], [0.0], [-5.0]])
    with pytest.raises(ValueError, match="bag 0"):
        F.embedding_bag([0, 0], table, offsets=[0], mode="sum")
    rng = np.random.default_rng(0)
    small = rng.integers(-100, 100, (20, 3)).astype(np.int8)
    ids = rng.integers(0, 20, 50)
    offsets = np.array([0, 10, 10, 30])
    got = F.embedding_bag(ids, small, offsets=offsets, mode="sum", padding_idx=3)
    bounds = list(offsets) + [ids.size]
    want = [[sum(int(small[i, c]) for i in ids[a:b] if i != 3) for c in range(3)] for a, b in zip(bounds, bounds[1:])]
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_max_bag_with_no_entries_on_a_copied_table():
    """Max bags of an empty input on a table the kernels read through a copy (Fortran order) give
    zeros, as on a C-order table and in torch (an IndexError before)."""
    table = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    empty = np.zeros(0, np.int64)
    got = cembed.EmbeddingBag.from_pretrained(table, mode="max")(empty, offsets=[0])
    want = torch.nn.functional.embedding_bag(torch.zeros(0, dtype=torch.long), torch.tensor(np.ascontiguousarray(table)),
                                             torch.tensor([0]), mode="max").numpy()
    np.testing.assert_array_equal(got, want)
    grad, _ = F.embedding_bag_backward(np.ones((2, 3), np.float32), empty, table, offsets=[0, 0], mode="max")
    np.testing.assert_array_equal(grad, np.zeros((4, 3), np.float32))


@pytest.mark.parametrize("kwargs", [{"padding_idx": 0}, {"max_norm": 0.0}, {"sparse": True}])
def test_repr_shows_zero_valued_options_as_torch_does(kwargs):
    assert repr(cembed.Embedding(3, 2, **kwargs)) == repr(torch.nn.Embedding(3, 2, **kwargs))
    if "padding_idx" in kwargs:   # (torch's EmbeddingBag repr leaves out sparse and max_norm; cembed's shows them)
        assert repr(cembed.EmbeddingBag(3, 2, **kwargs)) == repr(torch.nn.EmbeddingBag(3, 2, **kwargs))


W = np.ones((4, 3), np.float32)
EXTREME = {
    "uint64 offset >= 2**63": (ValueError, lambda: F.embedding_bag([1, 2], W, offsets=np.array([0, 2**63], np.uint64),
                                                                   mode="sum")),
    "num_embeddings 2**63": (ValueError, lambda: F.embedding_backward(np.ones((1, 3), np.float32), [1], 2**63,
                                                                      sparse=True)),
    "SparseGrad num_rows 2**63": (ValueError, lambda: cembed.SparseGrad([1], np.ones((1, 3), np.float32), 2**63)),
    "group_indices num_rows 2**64": (ValueError, lambda: F.group_indices([1], 2**64)),
    "max_norm 10**400": (ValueError, lambda: F.embedding([1], W, max_norm=10**400)),
    "index 2**70 in a list": (IndexError, lambda: F.embedding([2**70], W)),
    "index -2**70 in a list": (IndexError, lambda: F.embedding([1, -2**70], W)),
}


@pytest.mark.parametrize("name", sorted(EXTREME))
def test_extreme_arguments_raise_the_documented_classes(name):
    kind, call = EXTREME[name]
    with pytest.raises(kind):
        call()


def test_byte_swapped_grad_output_is_accepted():
    emb = cembed.Embedding(4, 3, seed=0)
    out = emb([1, 1])
    emb.backward(np.ones((2, 3), ">f4"))
    np.testing.assert_array_equal(emb.grad[1], [2, 2, 2])
    assert out.shape == (2, 3)


def test_backward_of_a_frozen_integer_bag_table_is_a_no_op():
    """An integer table is lookup-only: the backward of a frozen one takes a float grad_output and
    changes nothing (as Embedding's does); it used to ask for an int64 grad_output, then refuse it."""
    bag = cembed.EmbeddingBag.from_pretrained(np.arange(6).reshape(3, 2), mode="sum", freeze=True)
    bag(np.array([1, 2]), offsets=[0])
    assert bag.backward(np.ones((1, 2), np.float32)) is None
    assert bag.grad is None


def test_integer_bag_sums_exact_when_the_running_sum_wraps():
    """Bags whose own sums fit int64 are summed in int64 even when the running sum over all bags
    wraps (each bag is a difference of two running sums, exact modulo 2**64): checked against Python
    integers, with values near 2**62."""
    rng = np.random.default_rng(3)
    table = rng.integers(2**61, 2**62, (50, 2)).astype(np.int64)
    table[::2] *= -1
    ids = rng.integers(0, 50, 400)
    offsets = np.arange(0, 400, 2)
    got = F.embedding_bag(ids, table, offsets=offsets, mode="sum")
    want = [[int(table[ids[a], c]) + int(table[ids[a + 1], c]) for c in range(2)] for a in offsets]
    assert got.dtype == np.int64
    assert got.tolist() == want
    np.testing.assert_array_equal(F.embedding_bag(ids, table, offsets=offsets, mode="mean"),
                                  np.array(want, dtype=object).astype(np.float64) / 2)


def test_one_element_table_with_a_zero_stride_trains():
    """A 1 x 1 table whose column stride is 0 (``x[:, None]``) has no two elements to share memory:
    steps and renorm write it as before (the overlap rule for written tables refused it)."""
    weight = np.zeros(1, np.float32)[:, None]
    emb = cembed.Embedding.from_pretrained(weight, freeze=False, sparse=True)
    opt = cembed.optim.SGD([emb], lr=0.1)
    emb(np.array([0]))
    emb.backward(np.ones((1, 1), np.float32))
    opt.step()
    np.testing.assert_array_equal(emb.weight, np.full((1, 1), -0.1, np.float32))


# ------------------------------------------------- the 2026-11-27 differential review against torch

FLAG_CALLS = {   # a functional call with one flag given as the string "False" (torch: TypeError)
    "embedding_bag include_last_offset": lambda w, flag: F.embedding_bag(
        [0, 1, 2], w, [0, 3], mode="sum", include_last_offset=flag),
    "embedding_bag sparse": lambda w, flag: F.embedding_bag([0, 1, 2], w, [0, 2], sparse=flag),
    "embedding_bag scale_grad_by_freq": lambda w, flag: F.embedding_bag([0, 1, 2], w, [0, 2],
                                                                         scale_grad_by_freq=flag),
    "embedding_bag max_norm": lambda w, flag: F.embedding_bag([0, 1, 2], w, [0, 3], max_norm=0.1,
                                                               include_last_offset=flag),
    "embedding_bag_backward include_last_offset": lambda w, flag: F.embedding_bag_backward(
        np.ones((2, 3), np.float32), [0, 1, 2], w, [0, 3], mode="sum", include_last_offset=flag),
    "embedding_bag_backward sparse": lambda w, flag: F.embedding_bag_backward(
        np.ones((2, 3), np.float32), [0, 1, 2], w, [0, 2], sparse=flag),
    "embedding_bag_backward scale_grad_by_freq": lambda w, flag: F.embedding_bag_backward(
        np.ones((2, 3), np.float32), [0, 0, 2], w, [0, 2], scale_grad_by_freq=flag),
    "embedding_backward sparse": lambda w, flag: F.embedding_backward(np.ones((3, 3), np.float32), [0, 0, 1], 4,
                                                                      sparse=flag),
    "embedding_backward scale_grad_by_freq": lambda w, flag: F.embedding_backward(
        np.ones((3, 3), np.float32), [0, 0, 1], 4, scale_grad_by_freq=flag),
    "embedding sparse": lambda w, flag: F.embedding([0, 1], w, max_norm=0.1, sparse=flag),
    "embedding scale_grad_by_freq": lambda w, flag: F.embedding([0, 1], w, max_norm=0.1, scale_grad_by_freq=flag),
}


@pytest.mark.parametrize("call", sorted(FLAG_CALLS))
def test_functional_flags_must_be_bools(call):
    """A flag given as anything but a bool is a TypeError naming it, before the table is renormalised
    (the functions read the flags by truth value: "False" counted as True — one bag instead of two, a
    sparse gradient, a divided one); torch refuses the same calls."""
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)
    before = weight.copy()
    name = call.split()[-1]
    if name == "max_norm":
        name = "include_last_offset"
    with pytest.raises(TypeError, match=f"{name} must be a bool, got str"):
        FLAG_CALLS[call](weight, "False")
    np.testing.assert_array_equal(weight, before)
    FLAG_CALLS[call](weight.copy(), np.bool_(False))
    with pytest.raises(TypeError):
        torch.nn.functional.embedding_bag(torch.tensor([0, 1, 2]), torch.from_numpy(before), torch.tensor([0, 3]),
                                          mode="sum", include_last_offset="False")


def test_functional_embedding_takes_torchs_seven_arguments():
    """``F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse)`` as
    ``torch.nn.Embedding.forward`` calls it, positionally or by name: the same rows and the same renorm
    (the two flags shape only the gradient; the renormalised rows to rounding: docs/behaviour.md §4)."""
    weight = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    idx = np.array([[1, 5], [1, 0]])
    ours, theirs = weight.copy(), torch.from_numpy(weight.copy())
    for args in [(None, None, 2.0, True, True), (2, 1.0, 2.0, False, True)]:
        got = F.embedding(idx, ours, *args)
        want = torch.nn.functional.embedding(torch.from_numpy(idx), theirs, *args).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)
    got = F.embedding(idx, ours, scale_grad_by_freq=True, sparse=False, out_dtype=np.float32)
    np.testing.assert_array_equal(got, weight_rows := ours[idx])
    assert weight_rows.shape == (2, 2, 4)


# ---------------------------------------------------------------- review of 2026-11-27 (session 20)

@pytest.mark.parametrize("table", ["float32", "float64"])
@pytest.mark.parametrize("source", ["bfloat16", "float16"])
def test_load_state_dict_widens_a_16_bit_state_into_a_wider_table(table, source):
    """A bfloat16 module's state_dict() loaded into a float32 / float64 module of the same shape was a
    TypeError ('has dtype bfloat16, not numbers'), though float16 loaded; torch copies either (exactly:
    every 16-bit value is a float32 one)."""
    pytest.importorskip("ml_dtypes")
    src = cembed.Embedding(5, 3, seed=0, dtype=source)
    dst = cembed.Embedding(5, 3, seed=1, dtype=table)
    dst.load_state_dict(src.state_dict())
    assert dst.weight.dtype == np.dtype(table)
    np.testing.assert_array_equal(dst.weight, src.weight.astype(table))
    tdst = torch.nn.Embedding(5, 3, dtype=getattr(torch, table))
    tdst.load_state_dict({"weight": torch.from_numpy(src.weight.astype(np.float32)).to(getattr(torch, source))})
    np.testing.assert_array_equal(dst.weight, tdst.weight.detach().numpy())


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")   # (np.matrix)
@pytest.mark.parametrize("order", ["C", "F"])
def test_a_matrix_table_gives_the_lookup_shape_in_every_layout(order):
    """An np.matrix table in Fortran order (copied from, not used in place by the kernels) gave a 2-D
    matrix of shape (2, 3) for indices of shape (1, 2): a matrix cannot be 3-D. Now an ndarray of shape
    (1, 2, 3) in either layout, as torch's lookup of the same values."""
    values = _weights(4, 3)
    table = np.asmatrix(np.asarray(values, order=order))
    idx = np.array([[3, 1]])
    out = F.embedding(idx, table)
    assert type(out) is np.ndarray and out.shape == (1, 2, 3)
    np.testing.assert_array_equal(out, torch.nn.functional.embedding(torch.from_numpy(idx),
                                                                     torch.from_numpy(values)).numpy())
    np.testing.assert_array_equal(cembed.Embedding.from_pretrained(table)(idx), out)


def test_shape_errors_state_the_rule_that_was_checked():
    """A bag backward's wrong grad_output was told to have 'indices.shape + (embedding_dim,)' and shown
    (n_bags, dim); a per-sample-weight lookup's and a query's rule is indices.shape[:-1]; an offset of
    -2**70 was 'past the end of the input'."""
    bag = cembed.EmbeddingBag(10, 3, mode="sum", seed=0)
    bag(np.array([1, 2, 3, 4, 5]), np.array([0, 2]))
    with pytest.raises(ValueError, match=r"grad_output must have shape \(n_bags,\) \+ \(embedding_dim,\) = \(2, 3\), "
                                         r"got \(5, 3\)"):
        bag.backward(np.ones((5, 3), np.float32))
    with pytest.raises(ValueError, match=r"must have shape \(n_bags,\) \+ \(embedding_dim,\) = \(2, 3\)"):
        F.embedding_bag_backward(np.ones((5, 3), np.float32), np.array([1, 2, 3, 4, 5]), bag.weight,
                                 offsets=np.array([0, 2]))
    emb = cembed.Embedding(10, 3, seed=0)
    with pytest.raises(ValueError, match=r"must have shape indices.shape\[:-1\] \+ \(embedding_dim,\) = \(4, 3\)"):
        emb.backward(np.ones((4, 5, 3), np.float32), np.zeros((4, 5), np.int64),
                     per_sample_weights=np.ones((4, 5), np.float32))
    with pytest.raises(ValueError, match=r"query must have shape indices.shape\[:-1\] \+ \(embedding_dim,\)"):
        F.embedding_dot(np.ones((5, 3), np.float32), np.zeros((4, 5), np.int64), emb.weight)
    for offset in (-2 ** 70, 2 ** 70):
        with pytest.raises(ValueError, match=r"outside the int64 range: offsets must lie in \[0, 2\]"):
            F.embedding_bag([1, 2], np.ones((4, 3), np.float32), offsets=[0, offset])


def test_scale_grad_by_freq_set_on_a_max_bag_after_its_forward_is_refused_by_the_backward():
    """scale_grad_by_freq=True on a max-mode EmbeddingBag is refused by the constructor and the forward;
    set between forward and backward it was silently ignored. The backward refuses it, nothing changed."""
    bag = cembed.EmbeddingBag(6, 3, mode="max", seed=0)
    bag(np.array([1, 2, 3, 4]), np.array([0, 2]))
    bag.scale_grad_by_freq = True
    before = bag.weight.copy()
    with pytest.raises(ValueError, match="max mode does not support scaling the gradient by the frequency"):
        bag.backward(np.ones((2, 3), np.float32))
    assert bag.grad is None
    np.testing.assert_array_equal(bag.weight, before)


def test_a_ragged_index_list_is_refused_naming_the_argument():
    """A ragged nested list raised NumPy's own ValueError ('inhomogeneous shape'), naming no argument."""
    emb = cembed.Embedding(5, 2, seed=0)
    with pytest.raises(ValueError, match="indices must be an array of one shape: .*inhomogeneous"):
        emb([[1, 2], [3]])
    with pytest.raises(ValueError, match="offsets must be an array of one shape"):
        F.embedding_bag([1, 2], emb.weight, offsets=[[0], [1, 2]])


@pytest.mark.parametrize("optimizer", ["SGD", "Adagrad", "SparseAdam"])
def test_a_gradient_mapping_the_tables_file_again_gives_the_unfused_result(tmp_path, optimizer):
    """A grad_output (or a query) that is a second memory map of the table's file is not at the
    table's address, so numpy.may_share_memory said no: the fused update read gradient rows it had
    already updated (past its first chunk of 64 rows), and differed from the unfused step and from
    run to run. Two maps of one file count as sharing memory (``_memory.may_share``): the gradient is
    read from a copy, as for a view of the table."""
    n, idx = 5000, np.arange(2999, 999, -1)

    def run(fused, tag):
        path = tmp_path / f"{tag}.npy"
        table = cembed.open_table(path, n, 8, mode="w+", init="normal", seed=0)
        emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
        opt = getattr(cembed.optim, optimizer)([emb], lr=0.5)
        grad = np.load(path, mmap_mode="r")[1000:3000]   # the same file's rows, mapped again
        backward_and_step(emb, grad, opt, fused, indices=idx)
        return np.array(emb.weight)

    assert run(False, "unfused").tobytes() == run(True, "fused").tobytes()
    path = tmp_path / "scored.npy"
    table = cembed.open_table(path, n, 8, mode="w+", init="normal", seed=0)
    reference = np.array(table)
    query = np.load(path, mmap_mode="r")[1000:3000]
    expected_query = np.array(query)
    F.embedding_dot_logistic_sgd_(query, idx.reshape(-1, 1), table, lr=0.5)
    F.embedding_dot_logistic_sgd_(expected_query, idx.reshape(-1, 1), reference, lr=0.5)
    assert np.array(table).tobytes() == reference.tobytes()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")   # (np.matrix)
def test_matrix_indices_look_up_as_their_array():
    """np.matrix indices were refused with Cython's 'No matching signature found' (a matrix stays 2-D
    when flattened); they are used as the plain array of their values, as a matrix table is."""
    table = _weights(6, 3)
    idx = np.array([[3, 1, 5]])
    out = F.embedding(np.asmatrix(idx), table)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, F.embedding(idx, table))
    np.testing.assert_array_equal(F.embedding_bag(np.asmatrix(idx), table), F.embedding_bag(idx, table))
    np.testing.assert_array_equal(cembed.Embedding.from_pretrained(table)(np.asmatrix(idx)), out)


def test_a_gradient_mapped_by_the_user_costs_no_maps_lookup_per_call(tmp_path, monkeypatch):
    """Since two maps of one file count as sharing memory, a gradient that is a view of a memory map
    cembed did not make had its file looked up in /proc/self/maps at every backward (a new view each
    time: milliseconds in a process with thousands of mappings) — even for a table in memory, which no
    file can share. Now none for a table in memory, and one per map (not per view) for a table on disk."""
    from cembed import _memory

    n_steps, idx = 5, np.arange(0, 400, 2)
    grads = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=(n_steps, idx.size, 4))
    grads[:] = 0.5
    grads.flush()
    grads = np.load(tmp_path / "g.npy", mmap_mode="r")   # the user's map
    looked_up = []
    real = _memory._kernel_mapping
    monkeypatch.setattr(_memory, "_kernel_mapping", lambda *args: looked_up.append(1) or real(*args))
    for table, most in ((np.zeros((500, 4), np.float32), 0), (cembed.open_table(tmp_path / "t.npy", 500, 4), 1)):
        emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
        opt = cembed.optim.SGD([emb], lr=0.1)
        looked_up.clear()
        for step in range(n_steps):
            emb.backward(grads[step], idx, optimizer=opt)
        assert len(looked_up) <= most, (most, len(looked_up))
        np.testing.assert_array_equal(np.asarray(emb.weight)[idx], -0.05 * n_steps)


def test_embedding_dot_backward_uses_a_subclass_as_its_plain_array():
    """grad_scores of an ndarray subclass went through its own hooks (astype, __getitem__): used as the
    plain array of its memory, as every other argument is."""
    class Hooked(np.ndarray):
        def astype(self, *args, **kwargs):
            raise AssertionError("a hook of the subclass ran")

        def __getitem__(self, key):
            raise AssertionError("a hook of the subclass ran")

    table = _weights(6, 3)
    idx = np.array([[1, 2], [3, 5]])
    scores = np.array([[0.5, -1.0], [2.0, 0.25]], np.float32)
    np.testing.assert_array_equal(F.embedding_dot_backward(scores.view(Hooked), idx, table),
                                  F.embedding_dot_backward(scores, idx, table))


def test_a_failed_maps_read_is_not_kept(tmp_path, monkeypatch):
    """The once-per-map cache of /proc/self/maps lookups kept a failed read (too many open files, say)
    for the map's life: two shared maps of one file were then never seen to overlap. Only answers the
    file gave are kept."""
    import os
    from cembed import _memory

    path = tmp_path / "f.bin"
    path.write_bytes(bytes(1 << 16))
    a, b = (np.memmap(path, dtype=np.float32, mode="r+") for _ in range(2))   # two maps cembed did not make
    monkeypatch.setattr(os, "stat", lambda *args, **kwargs: (_ for _ in ()).throw(OSError(2, "gone")))

    def failing(*args, **kwargs):
        raise OSError(24, "Too many open files")
    monkeypatch.setattr(_memory, "open", failing, raising=False)
    assert not _memory.may_share(a[:8], b[:8])   # (nothing can be told: no overlap seen)
    monkeypatch.undo()
    assert _memory.may_share(a[:8], b[:8]) and _memory.may_share(b[100:], a)


def test_arrays_over_an_mmap_object_are_seen_as_maps_of_their_file(tmp_path):
    """numpy.frombuffer of an mmap.mmap keeps a memoryview of it as its base, and the overlap rule
    stopped there: two shared maps of one file (a gradient and the table, say) were never seen to
    overlap. The chain of bases is followed through memoryviews."""
    import mmap
    import os
    from cembed import _memory

    path = tmp_path / "t.bin"
    path.write_bytes(bytes(1 << 16))
    maps = [mmap.mmap(os.open(path, os.O_RDWR), 1 << 16) for _ in range(2)]
    a, b = (np.frombuffer(m, dtype=np.float32) for m in maps)
    assert _memory.may_share(a[:8], b[:8]) and _memory.may_share(b[4:12], a)
    assert not _memory.may_share(a[:8], b[100:108]) and not _memory.may_share(a, np.zeros(3, np.float32))
    table = a.reshape(-1, 4)   # a table over one map, its gradient rows over the other: read from a copy
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = cembed.optim.SGD([emb], lr=0.5)
    grads = b.reshape(-1, 4)
    grads[:] = 1.0
    idx = np.arange(1000, 3001)   # row r's gradient is row 4000 - r: rows updated chunks before it are read
    reference = cembed.Embedding.from_pretrained(np.ones_like(table), freeze=False, sparse=True)
    backward_and_step(emb, grads[1000:3001][::-1], opt, True, indices=idx)
    backward_and_step(reference, np.ones((idx.size, 4), np.float32), cembed.optim.SGD([reference], lr=0.5), False,
                      indices=idx)
    np.testing.assert_array_equal(np.asarray(table)[idx], reference.weight[idx])
