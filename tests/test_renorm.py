"""max_norm / norm_type renormalisation (issue 2): embedding_renorm_ and its use in every forward."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cembed
from cembed import functional as F

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, require_torch, vector, zipf_indices

NORM_TYPES = [2.0, 1.0, np.inf, -np.inf, 0.0, 0.5, 3.0, -1.0]


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch(rng, norm_type, dtype):
    torch = require_torch()
    weight = (rng.standard_normal((60, 33)) * 2).astype(dtype)
    weight[5] = 0  # a zero row (norm 0, never scaled for p > 0)
    idx = rng.integers(0, 60, (7, 9))
    idx[0, :4] = 5
    ours, theirs = weight.copy(), torch.from_numpy(weight.copy())
    max_norm = 1.5 if norm_type != 0.0 else 20.0
    F.embedding_renorm_(ours, idx, max_norm, norm_type)
    with torch.no_grad():
        torch.embedding_renorm_(theirs, torch.from_numpy(idx), max_norm, norm_type)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, atol=0)
    expected = ref.embedding_renorm_(weight.copy(), idx, max_norm, norm_type)
    np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=0)
    untouched = np.setdiff1d(np.arange(60), idx)
    assert_bitwise_equal(ours[untouched], weight[untouched])


def test_forward_with_max_norm_matches_torch(rng):
    torch = require_torch()
    weight = (rng.standard_normal((20, 4)) * 3).astype(np.float32)
    emb = cembed.Embedding.from_pretrained(weight.copy(), max_norm=1.0, padding_idx=3)
    temb = torch.nn.Embedding.from_pretrained(torch.from_numpy(weight.copy()), max_norm=1.0, padding_idx=3)
    for _ in range(3):
        idx = rng.integers(0, 20, (3, 5))
        idx[0, 0] = 3  # the padding row is renormed like any other
        np.testing.assert_allclose(emb(idx), temb(torch.from_numpy(idx)).numpy(), rtol=1e-6)
    np.testing.assert_allclose(emb.weight, temb.weight.detach().numpy(), rtol=1e-6)
    assert np.linalg.norm(emb.weight[3]) <= 1.0


@pytest.mark.parametrize("name", ["emb_max_norm_l2", "emb_max_norm_p_variants"])
def test_torch_vectors(name):
    v = vector(name)
    inp, exp = v["inputs"], v["expected"]
    weight0 = np.asarray(inp["weight"], np.float32)
    if "norm_types" in inp:
        for p in inp["norm_types"]:
            w = weight0.copy()
            F.embedding_renorm_(w, inp["indices"], inp["max_norm"], float(p))
            np.testing.assert_allclose(w, exp["weight_after_by_norm_type"][p], rtol=1e-6)
    else:
        w = weight0.copy()
        out = F.embedding(inp["indices"], w, max_norm=inp["max_norm"], norm_type=inp["norm_type"])
        np.testing.assert_allclose(w, exp["weight_after"], rtol=1e-6)
        np.testing.assert_allclose(out, exp["output"], rtol=1e-6)


def test_spec_edge_cases():
    w = np.array([[3, 4], [0.6, 0.8], [3, 4], [np.nan, 1], [np.inf, 1], [0, 2]], np.float32)
    F.embedding_renorm_(w, [0, 0, 1, 3, 4], 1.0)
    np.testing.assert_array_equal(w[0], np.array([0.6000000238, 0.8000000119], np.float32))  # fp32 scale, once
    np.testing.assert_array_equal(w[1], np.array([0.6, 0.8], np.float32))  # norm == max_norm: untouched
    np.testing.assert_array_equal(w[2], [3, 4])                           # not referenced
    assert np.isnan(w[3, 0]) and w[3, 1] == 1                            # NaN norm: untouched
    assert np.isnan(w[4, 0]) and w[4, 1] == 0                            # inf norm: scale 0
    neg = np.array([[3, 4]], np.float32)
    F.embedding_renorm_(neg, [0], -1.0)
    np.testing.assert_allclose(neg, [[-0.6, -0.8]], rtol=1e-6)            # negative max_norm accepted
    zero = np.array([[1, 2]], np.float32)
    F.embedding_renorm_(zero, [0], 0.0)
    assert not zero.any()
    eps = np.array([[0, 0, 2]], np.float32)
    F.embedding_renorm_(eps, [0], 1.5)
    assert eps[0, 2] == np.float32(1.4999998808)
    same = np.ones((2, 2), np.float32)
    assert F.embedding_renorm_(same, [], 0.1) is same and same.all()


def test_errors_leave_weight_unchanged(rng):
    w = (rng.standard_normal((6, 3)) * 5).astype(np.float32)
    before = w.copy()
    for bad in ([0, 6], [-1, 0], [0, 2**40]):
        with pytest.raises(IndexError, match="outside the valid range"):
            F.embedding_renorm_(w, bad, 1.0)
        assert_bitwise_equal(w, before)
    with pytest.raises(TypeError):
        F.embedding_renorm_(w, [0], None)
    with pytest.raises(TypeError, match="max_norm"):
        F.embedding_renorm_(w, [0], "big")
    with pytest.raises(TypeError, match="float32 or float64"):
        F.embedding_renorm_(np.ones((3, 3), np.int32), [0], 1.0)
    ro = w.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        F.embedding_renorm_(ro, [0], 1.0)


@given(n_rows=st.integers(1, 30), dim=st.integers(1, 9), n=st.integers(0, 40),
       p=st.sampled_from(NORM_TYPES), max_norm=st.floats(0.0, 5.0), seed=st.integers(0, 2**31))
def test_hypothesis_against_reference(n_rows, dim, n, p, max_norm, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((n_rows, dim)) * 3).astype(np.float64)
    idx = rng.integers(0, n_rows, n)
    ours = F.embedding_renorm_(w.copy(), idx, max_norm, p)
    np.testing.assert_allclose(ours, ref.embedding_renorm_(w.copy(), idx, max_norm, p), rtol=1e-12, atol=0)


def test_thread_count_bitwise(rng):
    w0 = (rng.standard_normal((100_000, 24)) * 2).astype(np.float32)
    idx = zipf_indices(rng, 60_000, 100_000)

    def run():
        w = w0.copy()
        F.embedding_renorm_(w, idx, 1.0)
        return w

    results = at_thread_counts(run)
    for other in results[1:]:
        assert_bitwise_equal(results[0], other)


def test_non_contiguous_weight(rng):
    base = (rng.standard_normal((10, 8)) * 3).astype(np.float32)
    for view in (base.copy()[:, ::2], np.asfortranarray(base)):
        expected = ref.embedding_renorm_(np.array(view), [1, 2, 2], 1.0)
        F.embedding_renorm_(view, [1, 2, 2], 1.0)
        np.testing.assert_allclose(view, expected, rtol=1e-6)
