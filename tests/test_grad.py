"""Gradients (issue 3): embedding_backward (dense / sparse), SparseGrad, coalesce, Embedding.backward."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cembed
from cembed import SparseGrad
from cembed import functional as F

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, require_torch, vector, zipf_indices


def torch_dense_grad(torch, grad_output, indices, n_rows, padding_idx=None, sgbf=False):
    w = torch.zeros(n_rows, grad_output.shape[-1], dtype=torch.from_numpy(grad_output).dtype,
                    requires_grad=True)
    out = torch.nn.functional.embedding(torch.from_numpy(np.asarray(indices)), w, padding_idx=padding_idx,
                                        scale_grad_by_freq=sgbf)
    out.backward(torch.from_numpy(grad_output))
    return w.grad.numpy()


def torch_sparse_grad(torch, grad_output, indices, n_rows, padding_idx=None):
    w = torch.zeros(n_rows, grad_output.shape[-1], dtype=torch.from_numpy(grad_output).dtype,
                    requires_grad=True)
    out = torch.nn.functional.embedding(torch.from_numpy(np.asarray(indices)), w, padding_idx=padding_idx,
                                        sparse=True)
    out.backward(torch.from_numpy(grad_output))
    g = w.grad.coalesce()
    return g.indices()[0].numpy(), g.values().numpy()


# --------------------------------------------------------------------------- parity with torch

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("padding_idx", [None, 3, -1])
@pytest.mark.parametrize("sgbf", [False, True])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_dense_bitwise_torch(rng, dtype, padding_idx, sgbf, index_dtype):
    torch = require_torch()
    n_rows, dim = 40, 9
    idx = rng.integers(0, n_rows, (17, 5)).astype(index_dtype)
    idx[0, :3] = 3  # duplicates of the padding row
    idx[1, :] = n_rows - 1
    g = rng.standard_normal((17, 5, dim)).astype(dtype)
    ours = F.embedding_backward(g, idx, n_rows, padding_idx=padding_idx, scale_grad_by_freq=sgbf)
    theirs = torch_dense_grad(torch, g, idx, n_rows, padding_idx, sgbf)
    assert_bitwise_equal(ours, theirs)
    pad = None if padding_idx is None else padding_idx % n_rows
    np.testing.assert_allclose(ours, ref.embedding_backward(g, idx, n_rows, pad, sgbf), rtol=1e-6, atol=1e-7)
    if pad is not None:
        assert not ours[pad].any()


@pytest.mark.parametrize("padding_idx", [None, 0, 5])
def test_sparse_matches_torch_coalesced(rng, padding_idx):
    torch = require_torch()
    n_rows, dim = 30, 6
    idx = zipf_indices(rng, 200, n_rows).reshape(20, 10)
    # dyadic values: duplicate sums are exact, so torch's (unstable) summation order cannot matter
    g = (rng.integers(-64, 64, (20, 10, dim)) / 8).astype(np.float32)
    ours = F.embedding_backward(g, idx, n_rows, padding_idx=padding_idx, sparse=True)
    t_idx, t_val = torch_sparse_grad(torch, g, idx, n_rows, padding_idx)
    assert isinstance(ours, SparseGrad)
    assert ours.indices.dtype == np.int64 and ours.values.dtype == np.float32
    np.testing.assert_array_equal(ours.indices, t_idx)
    np.testing.assert_array_equal(ours.values, t_val)
    assert ours.shape == (n_rows, dim) and ours.nnz == t_idx.size
    if padding_idx is not None:
        assert padding_idx not in ours.indices


def test_sparse_equals_dense(rng):
    n_rows, dim = 1000, 16
    idx = zipf_indices(rng, 5000, n_rows)
    g = rng.standard_normal((5000, dim)).astype(np.float32)
    for sgbf in (False, True):
        for pad in (None, 0):
            dense = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf)
            sparse = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf, sparse=True)
            assert_bitwise_equal(sparse.to_dense(), dense)
            assert np.all(np.diff(sparse.indices) > 0)


def test_sparse_scale_grad_by_freq_supported():
    # torch refuses sparse + scale_grad_by_freq; cembed scales like the dense gradient
    idx = np.array([[1, 3, 1], [0, 1, 3]])
    g = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2)
    sp = F.embedding_backward(g, idx, 5, scale_grad_by_freq=True, sparse=True)
    np.testing.assert_array_equal(sp.indices, [0, 1, 3])
    np.testing.assert_array_equal(sp.values, [[7, 8], [5, 6], [7, 8]])  # docs/behaviour.md §5.1 example


def test_spec_example():
    idx = np.array([[1, 3, 1], [0, 1, 3]])
    g = np.arange(1, 13, dtype=np.float32).reshape(2, 3, 2)
    plain = F.embedding_backward(g, idx, 5)
    np.testing.assert_array_equal(plain[1], [15, 18])
    np.testing.assert_array_equal(plain[3], [14, 16])
    sp = F.embedding_backward(g, idx, 5, padding_idx=1, sparse=True)
    np.testing.assert_array_equal(sp.indices, [0, 3])
    np.testing.assert_array_equal(sp.values, [[7, 8], [3 + 11, 4 + 12]])


@pytest.mark.parametrize("name", ["emb_bwd_dense_padding", "emb_bwd_sgbf", "emb_bwd_sparse_padding"])
def test_torch_vectors(name):
    v = vector(name)
    inp = v["inputs"]
    idx = np.asarray(inp["indices"])
    g = np.asarray(inp["grad_output"], dtype=np.float32)
    n_rows = int(inp["weight_shape"][0])
    pad = inp.get("padding_idx")
    sgbf = bool(inp.get("scale_grad_by_freq", False))
    if "sparse" in name:
        sp = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf, sparse=True)
        exp = v["expected"]["sparse_grad"]
        exp_idx = np.asarray(exp["indices"]).reshape(-1)
        exp_val = np.asarray(exp["values"], dtype=np.float32).reshape(exp_idx.size, -1)
        # torch's uncoalesced result, coalesced here for comparison
        uniq, summed = ref.coalesce(exp_idx, exp_val, n_rows)
        np.testing.assert_array_equal(sp.indices, uniq)
        np.testing.assert_array_equal(sp.values, summed)
    else:
        ours = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf)
        exp = np.asarray(v["expected"]["grad_weight"], dtype=np.float32)
        assert_bitwise_equal(ours, exp)


# --------------------------------------------------------------------------- properties

@given(
    n_rows=st.integers(1, 50),
    dim=st.integers(0, 7),
    shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
    pad=st.one_of(st.none(), st.integers(0, 49)),
    sgbf=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_hypothesis_against_reference(n_rows, dim, shape, pad, sgbf, seed):
    rng = np.random.default_rng(seed)
    pad = None if pad is None else pad % n_rows
    idx = rng.integers(0, n_rows, shape)
    g = rng.standard_normal(tuple(shape) + (dim,)).astype(np.float32)
    dense = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf)
    np.testing.assert_allclose(dense, ref.embedding_backward(g, idx, n_rows, pad, sgbf), rtol=1e-6, atol=1e-7)
    sparse = F.embedding_backward(g, idx, n_rows, padding_idx=pad, scale_grad_by_freq=sgbf, sparse=True)
    assert_bitwise_equal(sparse.to_dense(), dense)
    expect_rows = np.unique(idx)
    if pad is not None:
        expect_rows = expect_rows[expect_rows != pad]
    np.testing.assert_array_equal(sparse.indices, expect_rows)
    assert sparse.values.shape == (expect_rows.size, dim)


def test_empty_and_zero_d(rng):
    g = np.zeros((0, 4), np.float32)
    assert not F.embedding_backward(g, np.zeros(0, np.int64), 7).any()
    sp = F.embedding_backward(g, [], 7, sparse=True)
    assert sp.nnz == 0 and sp.values.shape == (0, 4) and sp.shape == (7, 4)
    g0 = rng.standard_normal(4).astype(np.float32)
    d = F.embedding_backward(g0, np.int64(2), 7)
    assert_bitwise_equal(d[2], np.float32(0) + g0)
    sp = F.embedding_backward(g0, 2, 7, sparse=True)
    np.testing.assert_array_equal(sp.indices, [2])


def test_only_padding_entries():
    sp = F.embedding_backward(np.ones((3, 2), np.float32), [1, 1, 1], 4, padding_idx=1, sparse=True)
    assert sp.nnz == 0
    assert not F.embedding_backward(np.ones((3, 2), np.float32), [1, 1, 1], 4, padding_idx=1).any()


def test_thread_count_bitwise(rng):
    n_rows, dim = 200_000, 32
    idx = zipf_indices(rng, 120_000, n_rows)
    g = rng.standard_normal((idx.size, dim)).astype(np.float32)

    def run():
        d = F.embedding_backward(g, idx, n_rows, scale_grad_by_freq=True)
        s = F.embedding_backward(g, idx, n_rows, sparse=True)
        return d, s.indices, s.values

    results = at_thread_counts(run)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)


def test_large_row_ids_sparse_work_is_batch_sized(rng):
    # a 50M-row table: the sparse path must not allocate or touch O(V)
    n_rows = 50_000_000
    idx = rng.integers(0, n_rows, 1000)
    g = rng.standard_normal((1000, 8)).astype(np.float32)
    sp = F.embedding_backward(g, idx, n_rows, sparse=True)
    assert sp.shape == (n_rows, 8)
    uniq, summed = ref.coalesce(idx, g, n_rows)
    np.testing.assert_array_equal(sp.indices, uniq)
    np.testing.assert_allclose(sp.values, summed, rtol=1e-6)


# --------------------------------------------------------------------------- bad input

def test_bad_inputs():
    g = np.ones((3, 2), np.float32)
    with pytest.raises(IndexError, match="contains 5 at position 2"):
        F.embedding_backward(g, [0, 1, 5], 5)
    with pytest.raises(IndexError, match="-1"):
        F.embedding_backward(g, [0, -1, 2], 5, sparse=True)
    with pytest.raises(ValueError, match=r"shape"):
        F.embedding_backward(np.ones((3, 3, 2), np.float32), [0, 1, 2], 5)
    with pytest.raises(ValueError, match=r"shape"):
        F.embedding_backward(np.ones((4, 2), np.float32), [0, 1, 2], 5)
    with pytest.raises(TypeError, match="float32, float64, float16 or bfloat16"):
        F.embedding_backward(np.ones((3, 2), np.int32), [0, 1, 2], 5)
    with pytest.raises(TypeError, match="integer"):
        F.embedding_backward(g, [0.0, 1.0, 2.0], 5)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding_backward(g, [0, 1, 2], 5, padding_idx=5)


# --------------------------------------------------------------------------- coalesce / SparseGrad

def test_coalesce_matches_add_at(rng):
    rows = rng.integers(0, 100, 2000)
    values = (rng.integers(-50, 50, (2000, 5)) / 4).astype(np.float64)
    sp = F.coalesce(rows, values, 100)
    expect = np.zeros((100, 5))
    np.add.at(expect, rows, values)
    np.testing.assert_array_equal(sp.to_dense(), expect)
    uniq, summed = ref.coalesce(rows, values, 100)
    np.testing.assert_array_equal(sp.indices, uniq)
    assert_bitwise_equal(sp.values, summed)  # input-order summation, exactly the reference's


def test_coalesce_matches_torch(rng):
    torch = require_torch()
    rows = rng.integers(0, 64, 500)
    values = (rng.integers(-50, 50, (500, 3)) / 8).astype(np.float32)
    t = torch.sparse_coo_tensor(torch.from_numpy(rows)[None], torch.from_numpy(values), (64, 3),
                                check_invariants=True).coalesce()
    sp = F.coalesce(rows, values, 64)
    np.testing.assert_array_equal(sp.indices, t.indices()[0].numpy())
    np.testing.assert_array_equal(sp.values, t.values().numpy())


def test_coalesce_errors():
    with pytest.raises(IndexError, match="rows contains 9"):
        F.coalesce([0, 9], np.ones((2, 2), np.float32), 9)
    with pytest.raises(ValueError, match="shape"):
        F.coalesce([0, 1], np.ones((3, 2), np.float32), 9)
    with pytest.raises(ValueError, match="1-D"):
        F.coalesce([[0, 1]], np.ones((1, 2, 2), np.float32), 9)


def test_sparse_grad_validation_and_merge():
    a = SparseGrad([1, 4], np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), 6)
    b = SparseGrad([0, 4], np.array([[5.0, 5.0], [1.0, 1.0]], np.float32), 6)
    m = a.merge(b)
    np.testing.assert_array_equal(m.indices, [0, 1, 4])
    np.testing.assert_array_equal(m.to_dense(), a.to_dense() + b.to_dense())
    assert (a + b).nnz == 3
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseGrad([4, 1], np.zeros((2, 2), np.float32), 6)
    with pytest.raises(IndexError, match="outside"):
        SparseGrad([1, 6], np.zeros((2, 2), np.float32), 6)
    with pytest.raises(TypeError, match="float32 or float64"):
        SparseGrad([1], np.zeros((1, 2), np.int64), 6)
    with pytest.raises(ValueError, match="shape"):
        a.merge(SparseGrad([1], np.zeros((1, 3), np.float32), 6))


# --------------------------------------------------------------------------- Embedding.backward

def test_module_backward_accumulates_like_torch(rng):
    torch = require_torch()
    for sparse in (False, True):
        emb = cembed.Embedding(20, 4, padding_idx=2, sparse=sparse, seed=1)
        temb = torch.nn.Embedding(20, 4, padding_idx=2, sparse=sparse)
        with torch.no_grad():
            temb.weight.copy_(torch.from_numpy(emb.weight))
        for step in range(3):
            idx = rng.integers(0, 20, (4, 3))
            g = (rng.integers(-16, 16, (4, 3, 4)) / 8).astype(np.float32)
            out = emb(idx)
            tout = temb(torch.from_numpy(idx))
            np.testing.assert_array_equal(out, tout.detach().numpy())
            emb.backward(g)
            tout.backward(torch.from_numpy(g))
        tg = temb.weight.grad
        tg = tg.to_dense() if sparse else tg
        ours = emb.grad.to_dense() if sparse else emb.grad
        assert isinstance(emb.grad, SparseGrad) == sparse
        np.testing.assert_array_equal(ours, tg.numpy())
        emb.zero_grad()
        assert emb.grad is None


def test_module_backward_dense_accumulation_bitwise(rng):
    torch = require_torch()
    emb = cembed.Embedding(50, 8, seed=0)
    w = torch.from_numpy(emb.weight.copy()).requires_grad_()
    for _ in range(3):
        idx = rng.integers(0, 50, 40)
        g = rng.standard_normal((40, 8)).astype(np.float32)
        emb(idx)
        emb.backward(g, idx)
        torch.nn.functional.embedding(torch.from_numpy(idx), w).backward(torch.from_numpy(g))
    assert_bitwise_equal(emb.grad, w.grad.numpy())


def test_module_backward_checks_and_frozen():
    emb = cembed.Embedding(10, 3, seed=0)
    with pytest.raises(ValueError, match="no indices"):
        emb.backward(np.ones((2, 3), np.float32))
    emb([1, 2])
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        emb.backward(np.ones((2, 4), np.float32))
    with pytest.raises(TypeError, match="float64"):
        emb.backward(np.ones((2, 3), np.float64))
    assert emb.grad is None
    emb.backward(np.ones((2, 3), np.float32))
    before = emb.grad.copy()
    with pytest.raises(IndexError):
        emb.backward(np.ones((2, 3), np.float32), [1, 10])
    assert_bitwise_equal(emb.grad, before)  # a failed call changed nothing
    frozen = cembed.Embedding.from_pretrained(np.ones((5, 3), np.float32))
    frozen([0, 1])
    frozen.backward(np.ones((2, 3), np.float32))
    assert frozen.grad is None
    with pytest.raises(ValueError, match="shape"):
        frozen.backward(np.ones((3, 3), np.float32))


@given(a=st.sets(st.integers(0, 99), max_size=40), b=st.sets(st.integers(0, 99), max_size=40),
       seed=st.integers(0, 2**31))
def test_merge_equals_dense_sum(a, b, seed):
    rng = np.random.default_rng(seed)
    a, b = np.array(sorted(a), np.int64), np.array(sorted(b), np.int64)
    ga = SparseGrad(a, rng.standard_normal((a.size, 3)), 100)
    gb = SparseGrad(b, rng.standard_normal((b.size, 3)), 100)
    m = ga.merge(gb)
    np.testing.assert_array_equal(m.indices, np.union1d(a, b))
    assert_bitwise_equal(m.to_dense(), ga.to_dense() + gb.to_dense())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_is_torchs_sparse_add_in_either_order(dtype):
    """A row held by one SparseGrad only was copied from the left operand but added onto +0.0 from the
    right one: -0.0 + (another row) gave -0.0, (another row) + -0.0 gave +0.0. torch's sparse add
    (coalesced) sums every row from +0.0 in either order, and returns the other operand unchanged when
    one has no rows: so does merge, bitwise."""
    torch = require_torch()
    rng = np.random.default_rng(3)

    def both(rows, vals):
        return SparseGrad(rows, vals, 10), torch.sparse_coo_tensor(torch.from_numpy(rows)[None],
                                                                   torch.from_numpy(vals), (10, 3))

    a_vals = rng.standard_normal((4, 3)).astype(dtype)
    b_vals = rng.standard_normal((4, 3)).astype(dtype)
    a_vals[0, :] = -0.0                          # a row of a only
    b_vals[3, :] = -0.0                          # a row of b only
    a_vals[1, 0], b_vals[1, 0] = -0.0, -0.0      # a row of both: -0.0 + -0.0
    a_vals[2, 0], b_vals[2, 0] = -0.0, 0.0       # -0.0 + 0.0
    ga, ta = both(np.array([0, 2, 5, 7]), a_vals)
    gb, tb = both(np.array([1, 2, 5, 8]), b_vals)
    ge, te = both(np.zeros(0, np.int64), np.zeros((0, 3), dtype))
    for ours, theirs in ((ga + gb, ta + tb), (gb + ga, tb + ta), (ga + ge, ta + te), (ge + ga, te + ta),
                         (ga + ga, ta + ta)):
        theirs = theirs.coalesce()
        np.testing.assert_array_equal(ours.indices, theirs.indices()[0].numpy())
        assert_bitwise_equal(ours.values, theirs.values().numpy())


@pytest.mark.parametrize("sparse", [False, True])
def test_per_sample_weights_backward_is_weighted_sum_gradient(rng, sparse):
    """per_sample_weights: the gradient of (w[..., None] * emb(idx)).sum(-2), without the per-index rows."""
    torch = require_torch()
    n_rows, dim = 40, 6
    idx = rng.integers(0, n_rows, (9, 5))
    weights = rng.standard_normal((9, 5)).astype(np.float32)
    g = rng.standard_normal((9, dim)).astype(np.float32)
    ours = F.embedding_backward(g, idx, n_rows, padding_idx=3, sparse=sparse, per_sample_weights=weights)
    ours = ours.to_dense() if sparse else ours
    w = torch.zeros(n_rows, dim, requires_grad=True)
    rows = torch.nn.functional.embedding(torch.from_numpy(idx), w, padding_idx=3)
    (torch.from_numpy(weights)[..., None] * rows).sum(-2).backward(torch.from_numpy(g))
    np.testing.assert_allclose(ours, w.grad.numpy(), rtol=1e-5, atol=1e-6)
    explicit = F.embedding_backward(weights[..., None] * g[:, None, :], idx, n_rows, padding_idx=3)
    assert_bitwise_equal(ours, explicit)  # same products, same input-order sums
    emb = cembed.Embedding(n_rows, dim, sparse=sparse, seed=0)
    emb.backward(g, idx, per_sample_weights=weights)
    emb_grad = emb.grad.to_dense() if sparse else emb.grad
    np.testing.assert_allclose(emb_grad, ref.embedding_backward(weights[..., None] * g[:, None, :], idx, n_rows),
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="shape of indices"):
        F.embedding_backward(g, idx, n_rows, per_sample_weights=weights[:, :4])
    with pytest.raises(ValueError, match="grad_output must have shape"):
        F.embedding_backward(g[:8], idx, n_rows, per_sample_weights=weights)
    with pytest.raises(TypeError, match="dtype"):
        F.embedding_backward(g, idx, n_rows, per_sample_weights=weights.astype(np.float64))
