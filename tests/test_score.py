"""Scoring kernels for dot-product models (issue 11): embedding_dot and embedding_dot_backward."""
import numpy as np
import pytest

from cembed import functional as F

from util import assert_bitwise_equal, at_thread_counts, require_torch, zipf_indices


# ---------------------------------------------------------------------------------------- reference

def ref_dot(query, indices, weight):
    """scores[..., k] = query[...] . weight[indices[..., k]], summed in float64."""
    rows = weight[np.asarray(indices)].astype(np.float64)                 # (..., K, D)
    return np.einsum("...kd,...d->...k", rows, query.astype(np.float64))


def ref_dot_backward(grad_scores, indices, weight):
    """grad_query[...] = sum over k of grad_scores[..., k] * weight[indices[..., k]], in float64."""
    rows = weight[np.asarray(indices)].astype(np.float64)
    return np.einsum("...k,...kd->...d", grad_scores.astype(np.float64), rows)


def operands(rng, lead, n_per, n_rows, dim, dtype):
    weight = rng.standard_normal((n_rows, dim)).astype(dtype)
    idx = rng.integers(0, n_rows, lead + (n_per,))
    query = rng.standard_normal(lead + (dim,)).astype(dtype)
    grad = rng.standard_normal(lead + (n_per,)).astype(dtype)
    return weight, idx, query, grad


def ref_logistic(query, indices, weight, n_positive=1):
    """(loss, grad_scores, grad_query) of the binary logistic loss, first n_positive columns
    positive, in float64."""
    s = ref_dot(query, indices, weight)
    sign = np.where(np.arange(s.shape[-1]) < n_positive, -1.0, 1.0)      # x = -s for positives
    x = sign * s
    loss = np.logaddexp(0.0, x).sum(-1)
    grad_scores = sign / (1.0 + np.exp(-x))
    return loss, grad_scores, ref_dot_backward(grad_scores, indices, weight)


# ---------------------------------------------------------------------------------------- values

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead,n_per,dim", [((7,), 6, 64), ((3, 5), 4, 13), ((9,), 1, 3), ((), 5, 8),
                                            ((4,), 3, 1), ((6,), 2, 200)])
def test_matches_reference(rng, dtype, lead, n_per, dim):
    weight, idx, query, grad = operands(rng, lead, n_per, 50, dim, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    scores = F.embedding_dot(query, idx, weight)
    assert scores.shape == idx.shape and scores.dtype == dtype
    np.testing.assert_allclose(scores, ref_dot(query, idx, weight), **tol)
    dq = F.embedding_dot_backward(grad, idx, weight)
    assert dq.shape == query.shape and dq.dtype == dtype
    np.testing.assert_allclose(dq, ref_dot_backward(grad, idx, weight), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_on_small_integers(rng, dtype):
    # every product and partial sum is an exact small integer: any summation order gives the same bits
    weight = rng.integers(-8, 9, (40, 21)).astype(dtype)
    idx = rng.integers(0, 40, (11, 7)).astype(np.int32)
    query = rng.integers(-8, 9, (11, 21)).astype(dtype)
    grad = rng.integers(-4, 5, (11, 7)).astype(dtype)
    assert_bitwise_equal(F.embedding_dot(query, idx, weight), ref_dot(query, idx, weight).astype(dtype))
    assert_bitwise_equal(F.embedding_dot_backward(grad, idx, weight),
                         ref_dot_backward(grad, idx, weight).astype(dtype))


def test_repeated_rows_and_index_dtypes(rng):
    weight, idx, query, grad = operands(rng, (5,), 4, 3, 16, np.float32)
    idx[:] = 2                                                   # every entry the same row
    base = F.embedding_dot(query, idx, weight)
    for dt in (np.int8, np.uint16, np.int32, np.int64, np.uint64):
        assert_bitwise_equal(F.embedding_dot(query, idx.astype(dt), weight), base)
    assert_bitwise_equal(F.embedding_dot(query, idx.tolist(), weight), base)
    np.testing.assert_allclose(base, np.repeat((query @ weight[2])[:, None], 4, axis=1), rtol=1e-6)


def test_layouts_give_the_same_bits(rng):
    weight, idx, query, grad = operands(rng, (30,), 5, 100, 24, np.float32)
    scores, dq = F.embedding_dot(query, idx, weight), F.embedding_dot_backward(grad, idx, weight)
    big = np.zeros((100, 48), np.float32)
    big[:, ::2] = weight
    for table in (np.asfortranarray(weight), big[:, ::2], weight[::-1][::-1], np.ascontiguousarray(weight[::1])):
        assert_bitwise_equal(F.embedding_dot(query, idx, table), scores)
        assert_bitwise_equal(F.embedding_dot_backward(grad, idx, table), dq)
    # a non-contiguous query and gradient
    q2 = np.zeros((30, 48), np.float32)
    q2[:, 1::2] = query
    assert_bitwise_equal(F.embedding_dot(q2[:, 1::2], idx, weight), scores)
    g2 = np.asfortranarray(grad)
    assert_bitwise_equal(F.embedding_dot_backward(g2, idx, weight), dq)


def test_inputs_are_not_modified(rng):
    weight, idx, query, grad = operands(rng, (8,), 3, 20, 10, np.float64)
    copies = [a.copy() for a in (weight, idx, query, grad)]
    F.embedding_dot(query, idx, weight)
    F.embedding_dot_backward(grad, idx, weight)
    for a, b in zip((weight, idx, query, grad), copies):
        assert_bitwise_equal(a, b)


def test_empty_and_zero_dim(rng):
    w = rng.standard_normal((5, 4)).astype(np.float32)
    assert F.embedding_dot(np.zeros((3, 4), np.float32), np.zeros((3, 0), np.int64), w).shape == (3, 0)
    assert F.embedding_dot(np.zeros((0, 4), np.float32), np.zeros((0, 2), np.int64), w).shape == (0, 2)
    dq = F.embedding_dot_backward(np.zeros((3, 0), np.float32), np.zeros((3, 0), np.int64), w)
    assert dq.shape == (3, 4) and not dq.any()
    w0 = np.zeros((5, 0), np.float32)
    s = F.embedding_dot(np.zeros((2, 0), np.float32), [[1, 2], [3, 4]], w0)
    assert s.shape == (2, 2) and not s.any()
    assert F.embedding_dot_backward(np.ones((2, 2), np.float32), [[1, 2], [3, 4]], w0).shape == (2, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("lead,n_per,dim,n_positive", [((40,), 6, 64, 1), ((3, 5), 4, 13, 2), ((9,), 3, 3, 0),
                                                       ((), 5, 8, 5), ((4,), 1, 200, 1), ((6,), 0, 5, 0)])
def test_logistic_matches_reference(rng, dtype, lead, n_per, dim, n_positive):
    weight, idx, query, _ = operands(rng, lead, n_per, 50, dim, dtype)
    weight *= 3                                    # scores well into both tails of the sigmoid
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-11, atol=1e-11)
    loss, g, dq = F.embedding_dot_logistic(query, idx, weight, n_positive=n_positive)
    want = ref_logistic(query, idx, weight, n_positive)
    for got, ref, shape in zip((loss, g, dq), want, (lead, lead + (n_per,), lead + (dim,))):
        assert got.shape == shape and got.dtype == dtype
        np.testing.assert_allclose(got, ref, **tol)
    # without the loss: the same gradients, bit for bit
    none, g2, dq2 = F.embedding_dot_logistic(query, idx, weight, n_positive, with_loss=False)
    assert none is None
    assert_bitwise_equal(g2, g)
    assert_bitwise_equal(dq2, dq)
    # its gradients are those of the separate functions
    np.testing.assert_allclose(F.embedding_dot_backward(g, idx, weight), dq, **tol)


def test_logistic_extreme_scores():
    # |score| of 1e4: no overflow, sigmoid exactly 0 or 1, softplus exact
    weight = np.array([[100.0, 0.0], [-100.0, 0.0]], np.float32)
    query = np.array([[100.0, 0.0]], np.float32)
    with np.errstate(all="raise"):
        loss, g, dq = F.embedding_dot_logistic(query, [[1, 0]], weight)   # positive scored -1e4
    np.testing.assert_array_equal(g, [[-1.0, 1.0]])
    np.testing.assert_allclose(loss, [2e4], rtol=1e-6)
    assert np.isfinite(dq).all()


def test_logistic_layouts_and_threads(rng):
    n_rows, dim = 100_000, 40
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    idx = zipf_indices(rng, 30_000 * 6, n_rows).reshape(30_000, 6)
    query = rng.standard_normal((30_000, dim)).astype(np.float32)
    results = at_thread_counts(lambda: F.embedding_dot_logistic(query, idx, weight))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)
    for a, b in zip(results[0], F.embedding_dot_logistic(query, idx, np.asfortranarray(weight))):
        assert_bitwise_equal(a, b)
    # the score gradient's query part is bitwise what embedding_dot_backward gives
    assert_bitwise_equal(F.embedding_dot_backward(results[0][1], idx, weight), results[0][2])


def test_thread_count_bitwise(rng):
    n_rows, dim = 100_000, 40
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    idx = zipf_indices(rng, 30_000 * 6, n_rows).reshape(30_000, 6)
    query = rng.standard_normal((30_000, dim)).astype(np.float32)
    grad = rng.standard_normal((30_000, 6)).astype(np.float32)

    def run():
        return F.embedding_dot(query, idx, weight), F.embedding_dot_backward(grad, idx, weight)

    results = at_thread_counts(run)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)


# ---------------------------------------------------------------------------------------- torch

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_bmm(rng, dtype):
    torch = require_torch()
    weight, idx, query, grad = operands(rng, (64,), 6, 500, 64, dtype)
    w = torch.from_numpy(weight.copy()).requires_grad_(True)
    q = torch.from_numpy(query.copy()).requires_grad_(True)
    rows = torch.nn.functional.embedding(torch.from_numpy(idx), w)            # (B, K, D): the gather
    scores = torch.bmm(rows, q.unsqueeze(2)).squeeze(2)
    scores.backward(torch.from_numpy(grad))
    tol = dict(rtol=2e-5, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(F.embedding_dot(query, idx, weight), scores.detach().numpy(), **tol)
    np.testing.assert_allclose(F.embedding_dot_backward(grad, idx, weight), q.grad.numpy(), **tol)
    # the weight's gradient: embedding_backward with the scores' gradient as per-sample weights
    gw = F.embedding_backward(query, idx, weight.shape[0], per_sample_weights=grad)
    np.testing.assert_allclose(gw, w.grad.numpy(), **tol)


@pytest.mark.parametrize("n_positive", [1, 2])
def test_logistic_matches_torch(rng, n_positive):
    torch = require_torch()
    weight, idx, query, _ = operands(rng, (64,), 6, 500, 32, np.float32)
    w = torch.from_numpy(weight.copy()).requires_grad_(True)
    q = torch.from_numpy(query.copy()).requires_grad_(True)
    scores = torch.bmm(torch.nn.functional.embedding(torch.from_numpy(idx), w), q.unsqueeze(2)).squeeze(2)
    sp = torch.nn.functional.softplus
    per_query = sp(-scores[:, :n_positive]).sum(1) + sp(scores[:, n_positive:]).sum(1)
    scores.retain_grad()
    per_query.sum().backward()
    loss, g, dq = F.embedding_dot_logistic(query, idx, weight, n_positive=n_positive)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(loss, per_query.detach().numpy(), **tol)
    np.testing.assert_allclose(g, scores.grad.numpy(), **tol)
    np.testing.assert_allclose(dq, q.grad.numpy(), **tol)
    np.testing.assert_allclose(F.embedding_backward(query, idx, 500, per_sample_weights=g), w.grad.numpy(), **tol)


# ---------------------------------------------------------------------------------------- errors

def test_bad_input(rng):
    w = rng.standard_normal((6, 4)).astype(np.float32)
    q = np.ones((2, 4), np.float32)
    g = np.ones((2, 3), np.float32)
    ok = [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(IndexError, match="6"):
        F.embedding_dot(q, [[0, 1, 6], [0, 0, 0]], w)
    with pytest.raises(IndexError, match="-1"):
        F.embedding_dot_backward(g, [[0, 1, 2], [0, -1, 0]], w)
    with pytest.raises(TypeError, match="integer"):
        F.embedding_dot(q, np.zeros((2, 3)), w)
    with pytest.raises(TypeError, match="query"):
        F.embedding_dot(q.astype(np.float64), ok, w)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.embedding_dot(q, ok, w.astype(np.int32))
    with pytest.raises(ValueError, match="query"):
        F.embedding_dot(np.ones((2, 5), np.float32), ok, w)
    with pytest.raises(ValueError, match="query"):
        F.embedding_dot(np.ones((3, 4), np.float32), ok, w)
    with pytest.raises(ValueError, match="at least one dimension"):
        F.embedding_dot(q, 3, w)
    with pytest.raises(ValueError, match="2-D"):
        F.embedding_dot(q, ok, w[None])
    with pytest.raises(TypeError, match="grad_scores"):
        F.embedding_dot_backward(g.astype(np.float64), ok, w)
    with pytest.raises(TypeError, match="grad_scores"):
        F.embedding_dot_backward(g.astype(np.int64), ok, w)
    with pytest.raises(ValueError, match="grad_scores"):
        F.embedding_dot_backward(np.ones((2, 2), np.float32), ok, w)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        F.embedding_dot(q, ok, w.tolist())
    with pytest.raises(ValueError, match="n_positive"):
        F.embedding_dot_logistic(q, ok, w, n_positive=4)
    with pytest.raises(ValueError, match="n_positive"):
        F.embedding_dot_logistic(q, ok, w, n_positive=-1)
    with pytest.raises(TypeError, match="n_positive"):
        F.embedding_dot_logistic(q, ok, w, n_positive=1.0)
    with pytest.raises(IndexError):
        F.embedding_dot_logistic(q, [[0, 1, 2], [3, 4, 99]], w)
    with pytest.raises(TypeError, match="with_loss"):
        F.embedding_dot_logistic(q, ok, w, with_loss=None)
    with pytest.raises(TypeError, match="query"):
        F.embedding_dot_logistic(q.astype(np.float64), ok, w)


def _half_dtypes():
    dtypes = [np.dtype(np.float16)]
    try:
        import ml_dtypes
    except ImportError:   # bfloat16 is an optional extra (the bf16 extra: ml_dtypes)
        return dtypes
    return dtypes + [np.dtype(ml_dtypes.bfloat16)]


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
@pytest.mark.parametrize("dim", [1, 7, 8, 64, 67])
def test_sixteen_bit_tables_score_as_their_float32_copy(rng, dtype, dim):
    """A 16-bit table is scored in float32 with its rows widened exactly inside the kernels: bitwise
    the results of scoring its float32 copy, for any layout and thread count; float32 results."""
    weight = rng.standard_normal((300, dim)).astype(dtype)
    wide = weight.astype(np.float32)
    idx = zipf_indices(rng, 200 * 6, 300).reshape(200, 6)
    query = rng.standard_normal((200, dim)).astype(np.float32)
    grad = rng.standard_normal((200, 6)).astype(np.float32)
    scores = F.embedding_dot(query, idx, weight)
    assert scores.dtype == np.float32
    assert_bitwise_equal(scores, F.embedding_dot(query, idx, wide))
    np.testing.assert_allclose(scores, ref_dot(query, idx, wide), rtol=1e-4, atol=1e-4)
    assert_bitwise_equal(F.embedding_dot_backward(grad, idx, weight), F.embedding_dot_backward(grad, idx, wide))
    # scored in place: the kernels get the table's own 16-bit rows, not a float32 copy
    table, fmt, _ = F._score_table(weight, idx.reshape(200, 6))
    assert np.shares_memory(table, weight) and table.dtype == np.uint16
    want = F.embedding_dot_logistic(query, idx, wide, n_positive=2)
    wider = np.zeros((300, 2 * dim), dtype)
    wider[:, ::2] = weight                                   # column stride 2: read through a row copy
    flipped = np.ascontiguousarray(weight[::-1])[::-1]       # negative row stride: read in place
    for layout in (weight, np.asfortranarray(weight), wider[:, ::2], flipped):
        assert np.array_equal(layout, weight)
        results = at_thread_counts(lambda: F.embedding_dot_logistic(query, idx, layout, n_positive=2))
        for got in results:
            for a, b in zip(got, want):
                assert_bitwise_equal(a, b)


def test_score_kernels_refuse_a_table_that_does_not_match_the_queries(rng):
    """The kernels check the (query dtype, table type, format) triple themselves: a mismatch is a
    ValueError, never a read of the table as the wrong element type."""
    from cembed import _dtypes, _score
    q32, q64 = np.ones((2, 4), np.float32), np.ones((2, 4), np.float64)
    idx = np.zeros((2, 3), np.int64)
    u16, f32, f64 = np.ones((5, 4), np.uint16), np.ones((5, 4), np.float32), np.ones((5, 4), np.float64)
    fmt_f32, fmt_f64, fmt_bf16 = _dtypes.FORMAT_F32, _dtypes.FORMAT_F64, _dtypes.FORMAT_BF16
    for query, table, fmt in ((q64, u16, fmt_bf16), (q32, u16, fmt_f32), (q32, f32, fmt_bf16), (q32, f64, fmt_f64),
                              (q64, f32, fmt_f32), (q64, f64, fmt_f32)):
        out = np.empty((2, 3), query.dtype)
        with pytest.raises(ValueError, match="format does not match"):
            _score.dot_scores(query, table, fmt, idx, out, 1)


@pytest.mark.parametrize("dtype", _half_dtypes(), ids=str)
def test_sixteen_bit_tables_take_float32_operands(rng, dtype):
    """With a 16-bit table the query and grad_scores are float32 (the compute dtype); anything else is
    a TypeError naming the operand, never a kernel call on the wrong element type."""
    weight = rng.standard_normal((6, 4)).astype(dtype)
    query = rng.standard_normal((2, 4)).astype(np.float32)
    ok = [[0, 1, 2], [3, 4, 5]]
    for bad in (query.astype(np.float64), query.astype(dtype)):
        for fn in (F.embedding_dot, F.embedding_dot_logistic):
            with pytest.raises(TypeError, match="query"):
                fn(bad, ok, weight)
    for bad in (np.ones((2, 3), np.float64), np.ones((2, 3), dtype)):
        with pytest.raises(TypeError, match="grad_scores"):
            F.embedding_dot_backward(bad, ok, weight)
