"""Weight layouts the optimizer kernels accept: any row stride, unit column stride.

The `_optim` kernels are called directly on column slices of a wider C array (row stride > dim), on
a slice that starts mid-row and on a reversed view (negative row stride), and must give bitwise the
same weight and state as the same update on a C-contiguous copy, for float32 and float64 and on 1 and
2 threads — and must not touch the table's columns outside the slice. A weight whose columns are not
adjacent is refused before anything is written.
"""
import numpy as np
import pytest

import cembed
from cembed import _optim
from cembed import functional as F
from cembed._grad import UpdateKind

from util import assert_bitwise_equal


# The optimizer kernel (_optim.update_rows) with each rule's parameters, as the optimizers pass them
# (these kinds have no per-row rule arrays: empty row_log, counts and rule parameters)
NO_RULE = (np.zeros(0, np.float64), np.zeros(0, np.int64), np.zeros(0, np.float64))

def sparse_adam_rows(weight, exp_avg, exp_avg_sq, rows, values, beta1, beta2, eps, step_size, maximize, n):
    _optim.update_rows(UpdateKind.UPDATE_ADAM, weight, exp_avg, exp_avg_sq, np.zeros(0, weight.dtype), *NO_RULE, rows,
                       values, 1.0 - beta1, 1.0 - beta2, eps, -step_size, 0, maximize, n)


def adagrad_rows(weight, state_sum, rows, values, clr, eps, maximize, n):
    _optim.update_rows(UpdateKind.UPDATE_ADAGRAD, weight, state_sum, np.zeros((0, 0), weight.dtype),
                       np.zeros(0, weight.dtype), *NO_RULE, rows, values, -clr, eps, 0.0, 0.0, 0, maximize, n)


def sgd_rows(weight, rows, values, lr, maximize, n):
    empty2 = np.zeros((0, 0), weight.dtype)
    _optim.update_rows(UpdateKind.UPDATE_SGD, weight, empty2, empty2, np.zeros(0, weight.dtype), *NO_RULE, rows,
                       values, -lr, 0.0, 0.0, 0.0, 0, maximize, n)

N_ROWS, DIM, WIDTH = 57, 11, 24   # dim not a multiple of a vector width, so the tail loops run too
NNZ = 23                          # more than PREFETCH_DISTANCE rows: the prefetch-ahead path runs

DTYPES = [np.float32, np.float64]
THREADS = [1, 2]


def _views(rng, dtype):
    """(name, strided weight view, its C-contiguous copy, the whole table) for each layout."""
    out = []
    for name, pick in [("cols[:dim]", lambda t: t[:, :DIM]),
                       ("cols[5:5+dim]", lambda t: t[:, 5:5 + DIM]),
                       ("reversed rows", lambda t: t[::-1, 2:2 + DIM])]:
        table = rng.standard_normal((N_ROWS, WIDTH)).astype(dtype)
        view = pick(table)
        assert view.strides[0] != DIM * view.itemsize and view.strides[1] == view.itemsize
        assert not view.flags.c_contiguous
        out.append((name, view, np.ascontiguousarray(view), table))
    return out


def _grad(rng, dtype, nnz=NNZ):
    rows = np.sort(rng.choice(N_ROWS, nnz, replace=False)).astype(np.int64)
    values = rng.standard_normal((nnz, DIM)).astype(dtype)
    return rows, values


def _outside(table, view):
    """A copy of every element of `table` that `view` does not cover."""
    offset = (view.__array_interface__["data"][0] - table.__array_interface__["data"][0]) % table.strides[0]
    first_col = offset // table.itemsize
    mask = np.ones(table.shape, dtype=bool)
    mask[:, first_col:first_col + DIM] = False
    return table[mask].copy()


def _run_both(rng, dtype, n_threads, step):
    """step(weight, states, n_threads, first) applied to each strided view and to its contiguous copy."""
    for name, view, contiguous, table in _views(rng, dtype):
        untouched = _outside(table, view)
        states_strided = [rng.random((N_ROWS, DIM)).astype(dtype) for _ in range(2)]
        states_contig = [s.copy() for s in states_strided]
        for first in (True, False):  # two steps: the state written by the first is read by the second
            step(view, states_strided, n_threads, first)
            step(contiguous, states_contig, n_threads, first)
        assert_bitwise_equal(view, contiguous), name
        for a, b in zip(states_strided, states_contig):
            assert_bitwise_equal(a, b)
        assert_bitwise_equal(_outside(table, view), untouched)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_adam_rows_any_row_stride(rng, dtype, n_threads):
    rows, values = _grad(rng, dtype)

    def step(weight, states, n, first):
        sparse_adam_rows(weight, states[0], states[1], rows, values, 0.9, 0.999, 1e-8, 0.01, False, n)

    _run_both(rng, dtype, n_threads, step)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_adagrad_rows_any_row_stride(rng, dtype, n_threads):
    rows, values = _grad(rng, dtype)

    def step(weight, states, n, first):
        adagrad_rows(weight, states[0], rows, values, 0.05, 1e-10, True, n)

    _run_both(rng, dtype, n_threads, step)


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_rows_any_row_stride(rng, dtype, n_threads):
    rows, values = _grad(rng, dtype)

    def step(weight, states, n, first):
        sgd_rows(weight, rows, values, 0.1, False, n)

    _run_both(rng, dtype, n_threads, step)


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgd_momentum_rows_any_row_stride(rng, dtype, n_threads, nesterov):
    active, values = _grad(rng, dtype, nnz=NNZ + 9)
    grad_slot = np.where(np.arange(active.size) % 3 == 0, -1, np.arange(active.size)).astype(np.int64)

    def step(weight, states, n, first):
        _optim.sgd_momentum_rows(weight, states[0], active, grad_slot, values, 0.1, 0.9, 0.1, nesterov,
                                 False, first, n)

    _run_both(rng, dtype, n_threads, step)


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_result_independent_of_thread_count(rng, dtype):
    rows, values = _grad(rng, dtype)
    results = []
    for n_threads in THREADS:
        table = np.random.default_rng(7).standard_normal((N_ROWS, WIDTH)).astype(dtype)
        exp_avg = np.zeros((N_ROWS, DIM), dtype)
        exp_avg_sq = np.zeros((N_ROWS, DIM), dtype)
        sparse_adam_rows(table[:, 3:3 + DIM], exp_avg, exp_avg_sq, rows, values,
                                0.9, 0.999, 1e-8, 0.01, False, n_threads)
        results.append(table)
    assert_bitwise_equal(results[0], results[1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_adjacent_columns_are_refused_before_writing(rng, dtype):
    table = rng.standard_normal((N_ROWS, 2 * DIM)).astype(dtype)
    before = table.copy()
    rows, values = _grad(rng, dtype)
    state = np.zeros((N_ROWS, DIM), dtype)
    weight = table[:, ::2]
    with pytest.raises(ValueError, match="unit column stride"):
        sgd_rows(weight, rows, values, 0.1, False, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        adagrad_rows(weight, state, rows, values, 0.1, 1e-10, False, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        sparse_adam_rows(weight, state, state.copy(), rows, values, 0.9, 0.999, 1e-8, 0.01, False, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        _optim.sgd_momentum_rows(weight, state, rows, np.arange(NNZ, dtype=np.int64), values,
                                 0.1, 0.9, 0.0, False, False, True, 1)
    assert_bitwise_equal(table, before)
    assert not state.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_state_and_gradient_must_stay_c_contiguous(rng, dtype):
    weight = rng.standard_normal((N_ROWS, DIM)).astype(dtype)
    rows, values = _grad(rng, dtype)
    wide_state = np.zeros((N_ROWS, WIDTH), dtype)
    with pytest.raises(ValueError, match="contiguous"):
        adagrad_rows(weight, wide_state[:, :DIM], rows, values, 0.1, 1e-10, False, 1)
    wide_grad = np.zeros((NNZ, WIDTH), dtype)
    with pytest.raises(ValueError, match="contiguous"):
        sgd_rows(weight, rows, wide_grad[:, :DIM], 0.1, False, 1)


# ------------------------------------------------------------------ unaligned operands

def _unaligned_copy(array):
    """A C-contiguous copy of ``array`` that is not aligned (its data one byte into a buffer)."""
    array = np.asarray(array)
    buf = np.zeros(array.nbytes + 1, np.uint8)
    out = np.ndarray(array.shape, array.dtype, buffer=buf.data, offset=1)
    out[...] = array
    assert out.flags.c_contiguous and not out.flags.aligned
    return out


UNALIGNED_CALLS = {
    "embedding_dot": lambda q, g, idx, W, u: F.embedding_dot(u(q), idx, W),
    "embedding_dot_backward": lambda q, g, idx, W, u: F.embedding_dot_backward(u(g[..., 0]), idx, W),
    "embedding_dot_logistic": lambda q, g, idx, W, u: F.embedding_dot_logistic(u(q), idx, W),
    "embedding_dot_logistic_sgd_": lambda q, g, idx, W, u: (F.embedding_dot_logistic_sgd_(u(q), idx, W, 0.1), W)[1],
    "embedding_backward": lambda q, g, idx, W, u: F.embedding_backward(u(g), idx, 10),
    "embedding_backward_sparse": lambda q, g, idx, W, u: F.embedding_backward(u(g), idx, 10, sparse=True).to_dense(),
    "embedding_backward_psw": lambda q, g, idx, W, u: F.embedding_backward(
        u(q), idx, 10, per_sample_weights=u(g[..., 0]), sparse=True).to_dense(),
    "embedding_bag_psw": lambda q, g, idx, W, u: F.embedding_bag(idx, W, per_sample_weights=u(g[..., 0]), mode="sum"),
    "coalesce": lambda q, g, idx, W, u: F.coalesce(np.array([1, 2, 1]), u(g[0:3, 0]), 10).to_dense(),
    "bag_backward_psw": lambda q, g, idx, W, u: _bag_backward(idx, W, u(g[..., 0]), u(q)),
    "fused_sparse_adam": lambda q, g, idx, W, u: _fused(lambda e: cembed.optim.SparseAdam([e]), W, idx, u(g)),
    "fused_sgd_dense": lambda q, g, idx, W, u: _fused(lambda e: cembed.optim.SGD([e], lr=0.1, momentum=0.5), W, idx,
                                                     u(g), sparse=False),
    "fused_logistic": lambda q, g, idx, W, u: _fused_logistic(W, idx, u(q)),
    "dense_sgd": lambda q, g, idx, W, u: _dense_steps(lambda e: cembed.optim.SGD([e], lr=0.1), W, u),
    "dense_sgd_momentum": lambda q, g, idx, W, u: _dense_steps(lambda e: cembed.optim.SGD([e], lr=0.1, momentum=0.9),
                                                               W, u),
    "dense_adagrad": lambda q, g, idx, W, u: _dense_steps(lambda e: cembed.optim.Adagrad([e], lr=0.1), W, u),
    "dense_rowwise": lambda q, g, idx, W, u: _dense_steps(lambda e: cembed.optim.RowWiseAdagrad([e], lr=0.1), W, u),
    "dense_sgd_unaligned_weight": lambda q, g, idx, W, u: _dense_steps(lambda e: cembed.optim.SGD([e], lr=0.1), u(W),
                                                                       lambda a: a),
    "clip_grad_norm_": lambda q, g, idx, W, u: _clipped(lambda e: cembed.optim.clip_grad_norm_(e, 1.0), W, u),
    "clip_grad_value_": lambda q, g, idx, W, u: _clipped(lambda e: cembed.optim.clip_grad_value_(e, 0.01), W, u),
}


def _bag_backward(idx, W, psw, grad):
    bag = cembed.EmbeddingBag.from_pretrained(W.copy(), freeze=False, mode="sum")
    bag(idx, per_sample_weights=psw)
    return bag.backward(grad), bag.grad


def _fused(make, W, idx, grad, sparse=True):
    emb = cembed.Embedding.from_pretrained(W.copy(), freeze=False, sparse=sparse)
    opt = make(emb)
    emb(idx)
    emb.backward(grad, optimizer=opt)
    return emb.weight


def _fused_logistic(W, idx, query):
    emb = cembed.Embedding.from_pretrained(W.copy(), freeze=False, sparse=True)
    results = emb.dot_logistic_backward(query, idx, optimizer=cembed.optim.Adagrad([emb], lr=0.1))
    return results, emb.weight


def _dense_steps(make, W, u):
    emb = cembed.Embedding.from_pretrained(W.copy() if W.flags.aligned else W, freeze=False)
    opt = make(emb)
    for k in range(2):
        emb.grad = u(np.full(W.shape, 0.5 + k, np.float32))
        opt.step()
    return emb.weight


def _clipped(clip, W, u):
    emb = cembed.Embedding.from_pretrained(W.copy(), freeze=False)
    emb.grad = u(np.arange(W.size, dtype=np.float32).reshape(W.shape) / 7)
    return clip(emb), emb.grad


@pytest.mark.parametrize("name", sorted(UNALIGNED_CALLS))
def test_unaligned_operands_give_the_aligned_results(name):
    """A C-contiguous array that is not aligned (a view into a byte buffer at an odd offset) reached the
    kernels as it was (np.ascontiguousarray keeps it): undefined behaviour, a UBSan abort in the
    sanitizer stage (found by a review). Every operand a kernel reads is aligned first (a copy only
    then); results equal those of aligned operands, bitwise."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((10, 8)).astype(np.float32)
    idx = np.array([[1, 2], [3, 1], [4, 5]])
    q = rng.standard_normal((3, 8)).astype(np.float32)
    g = rng.standard_normal((3, 2, 8)).astype(np.float32)

    def flat(result):
        if isinstance(result, (tuple, list)):
            return [x for r in result for x in flat(r)]
        return [] if result is None else [np.asarray(result)]

    call = UNALIGNED_CALLS[name]
    expected = flat(call(q, g, idx, W.copy(), lambda a: np.array(a)))
    got = flat(call(q, g, idx, W.copy(), _unaligned_copy))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert_bitwise_equal(np.ascontiguousarray(a), np.ascontiguousarray(b))
