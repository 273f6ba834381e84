"""EmbeddingBag (issue 5): forward in every mode, backward, validation, against torch and the reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cembed
from cembed import SparseGrad
from cembed import functional as F

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, require_torch, vector, zipf_indices

MODES = ["sum", "mean", "max"]


def random_bags(rng, n_rows, n_bags, max_len=6, empty_share=0.2):
    sizes = rng.integers(1, max_len + 1, n_bags)
    sizes[rng.random(n_bags) < empty_share] = 0
    offsets = np.concatenate(([0], np.cumsum(sizes)[:-1])).astype(np.int64)
    idx = rng.integers(0, n_rows, int(sizes.sum()))
    return idx, offsets


def torch_bag(torch, idx, weight, offsets=None, psw=None, requires_grad=False, **kw):
    tw = torch.from_numpy(weight.copy()).requires_grad_(requires_grad)
    tpsw = None if psw is None else torch.from_numpy(psw.copy()).requires_grad_(requires_grad)
    out = torch.nn.functional.embedding_bag(torch.from_numpy(np.asarray(idx)), tw,
                                            None if offsets is None else torch.from_numpy(np.asarray(offsets)),
                                            per_sample_weights=tpsw, **kw)
    return out, tw, tpsw


# --------------------------------------------------------------------------- forward parity

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding_idx", [None, 4, -1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_matches_torch_bitwise(rng, mode, padding_idx, dtype):
    torch = require_torch()
    n_rows, dim = 30, 7
    weight = rng.standard_normal((n_rows, dim)).astype(dtype)
    idx, offsets = random_bags(rng, n_rows, 25)
    idx[:5] = 4  # padding entries, a bag of only padding
    ours = F.embedding_bag(idx, weight, offsets, mode=mode, padding_idx=padding_idx)
    theirs, _, _ = torch_bag(torch, idx, weight, offsets, mode=mode, padding_idx=padding_idx)
    assert_bitwise_equal(ours, theirs.numpy())
    pad = None if padding_idx is None else padding_idx % n_rows
    np.testing.assert_allclose(ours, ref.embedding_bag(idx, weight, offsets, mode, padding_idx=pad), rtol=1e-6)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_per_sample_weights_forward(rng, padding_idx):
    torch = require_torch()
    weight = rng.standard_normal((12, 5)).astype(np.float32)
    idx, offsets = random_bags(rng, 12, 10)
    psw = rng.standard_normal(idx.size).astype(np.float32)
    ours = F.embedding_bag(idx, weight, offsets, mode="sum", per_sample_weights=psw, padding_idx=padding_idx)
    theirs, _, _ = torch_bag(torch, idx, weight, offsets, psw, mode="sum", padding_idx=padding_idx)
    assert_bitwise_equal(ours, theirs.numpy())  # fma on torch's fast path, two roundings with padding_idx
    np.testing.assert_allclose(ours, ref.embedding_bag(idx, weight, offsets, "sum", psw, padding_idx=padding_idx),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_two_d_input_and_include_last_offset(rng, mode):
    torch = require_torch()
    weight = rng.standard_normal((10, 4)).astype(np.float32)
    idx2 = rng.integers(0, 10, (6, 3))
    ours = F.embedding_bag(idx2, weight, mode=mode)
    theirs, _, _ = torch_bag(torch, idx2, weight, mode=mode)
    assert_bitwise_equal(ours, theirs.numpy())
    # 2-D input ignores include_last_offset, as torch
    assert_bitwise_equal(F.embedding_bag(idx2, weight, mode=mode, include_last_offset=True), ours)
    idx, offsets = random_bags(rng, 10, 8)
    csr = np.append(offsets, idx.size)
    ours = F.embedding_bag(idx, weight, csr, mode=mode, include_last_offset=True)
    theirs, _, _ = torch_bag(torch, idx, weight, csr, mode=mode, include_last_offset=True)
    assert_bitwise_equal(ours, theirs.numpy())
    assert_bitwise_equal(ours, F.embedding_bag(idx, weight, offsets, mode=mode))


def test_empty_shapes():
    weight = np.ones((5, 3), np.float32)
    assert F.embedding_bag(np.zeros(0, np.int64), weight, np.zeros(0, np.int64)).shape == (0, 3)
    assert F.embedding_bag(np.zeros(0, np.int64), weight, [0], include_last_offset=True).shape == (0, 3)
    assert F.embedding_bag(np.zeros((0, 4), np.int64), weight).shape == (0, 3)
    z = F.embedding_bag(np.zeros((3, 0), np.int64), weight, mode="max")  # torch raises; cembed: zeros
    assert_bitwise_equal(z, np.zeros((3, 3), np.float32))
    out = F.embedding_bag([1, 2], weight, [0, 2, 2], mode="mean")
    assert_bitwise_equal(out[1:], np.zeros((2, 3), np.float32))


def test_max_ties_and_nan():
    weight = np.array([[1, 5], [1, 5], [0, 7], [np.nan, 0], [2, np.nan]], np.float32)
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode="max")
    out = emb([0, 1, 3, 4, 0, 1, 4], [0, 2, 3, 5])
    np.testing.assert_array_equal(out[0], [1, 5])          # bag [0, 1]: ties
    assert np.isnan(out[1, 0]) and out[1, 1] == 0           # bag [3]
    assert out[2, 0] == 2 and np.isnan(out[2, 1])           # bag [4, 0]: NaN first in the bag propagates
    np.testing.assert_array_equal(out[3], [2, 5])           # bag [1, 4]: a later NaN is ignored
    emb.backward(np.ones((4, 2), np.float32))
    np.testing.assert_array_equal(emb.grad, [[1, 1], [0, 1], [0, 0], [1, 1], [2, 1]])  # first occurrence wins


@pytest.mark.parametrize("name", ["bag_modes_empty_bag", "bag_include_last_offset"])
def test_vectors_all_modes(name):
    v = vector(name)
    inp = v["inputs"]
    weight = np.asarray(inp["weight"], np.float32)
    for mode, expected in v["expected"]["output_by_mode"].items():
        out = F.embedding_bag(inp["indices"], weight, inp.get("offsets"), mode=mode,
                              include_last_offset=inp.get("include_last_offset", False))
        assert_bitwise_equal(out, np.asarray(expected, np.float32))


@pytest.mark.parametrize("name", ["bag_mean_padding", "bag_max_ties_padding", "bag_sum_psw", "bag_mean_2d_sparse"])
def test_vectors_with_gradients(name):
    v = vector(name)
    inp, exp = v["inputs"], v["expected"]
    weight = np.asarray(inp["weight"], np.float32)
    sparse = "sparse_grad" in exp
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode=inp.get("mode", "mean"),
                                              padding_idx=inp.get("padding_idx"), sparse=sparse)
    psw = inp.get("per_sample_weights")
    psw = None if psw is None else np.asarray(psw, np.float32)
    out = emb(np.asarray(inp["indices"]), inp.get("offsets"), per_sample_weights=psw)
    np.testing.assert_allclose(out, np.asarray(exp["output"], np.float32), rtol=1e-6)
    psw_grad = emb.backward(np.asarray(inp["grad_output"], np.float32))
    if sparse:
        sg = exp["sparse_grad"]
        rows, summed = ref.coalesce(np.asarray(sg["indices"]), np.asarray(sg["values"], np.float32),
                                    weight.shape[0])
        np.testing.assert_array_equal(emb.grad.indices, rows)
        np.testing.assert_allclose(emb.grad.values, summed, rtol=1e-6)
    else:
        np.testing.assert_allclose(emb.grad, np.asarray(exp["grad_weight"], np.float32), rtol=1e-6, atol=1e-7)
    if psw is None:
        assert psw_grad is None
    else:
        np.testing.assert_allclose(psw_grad, np.asarray(exp["grad_per_sample_weights"], np.float32),
                                   rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- backward parity

@pytest.mark.parametrize("mode,sparse", [(mode, sparse) for mode in MODES for sparse in (False, True)
                                         if not (mode == "max" and sparse)])  # max + sparse: test_bad_arguments
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_backward_matches_torch(rng, mode, padding_idx, sparse):
    torch = require_torch()
    n_rows, dim = 20, 5
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    idx, offsets = random_bags(rng, n_rows, 15)
    idx[:3] = 3
    g = (rng.integers(-16, 17, (15, dim)) / 8).astype(np.float32)
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode, padding_idx=padding_idx,
                                              sparse=sparse)
    out = emb(idx, offsets)
    assert emb.backward(g) is None
    tout, tw, _ = torch_bag(torch, idx, weight, offsets, requires_grad=True, mode=mode, padding_idx=padding_idx,
                            sparse=sparse)
    np.testing.assert_array_equal(out, tout.detach().numpy())
    tout.backward(torch.from_numpy(g))
    theirs = tw.grad.coalesce().to_dense().numpy() if sparse else tw.grad.numpy()
    ours = emb.grad.to_dense() if sparse else emb.grad
    assert isinstance(emb.grad, SparseGrad) == sparse
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    expect, _ = ref.embedding_bag_backward(g, idx, weight, offsets, mode, padding_idx=padding_idx)
    np.testing.assert_allclose(ours, expect, rtol=1e-5, atol=1e-6)
    if padding_idx is not None:
        assert not ours[padding_idx].any()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("first_sparse", [False, True])
def test_second_backward_adds_as_torch_does(rng, mode, first_sparse):
    """A second backward into an existing .grad is old + (new summed from zero), as torch adds gradients,
    also in max mode (which once added each bag straight into .grad: (old + g1) + g2) and from a
    SparseGrad left in .grad of a dense module (densified). Max mode is bitwise torch's; torch sums the
    dense sum/mean gradient in the order of an unstable sort (docs/behaviour.md §7.1), so there the
    bits are checked against old + our own gradient from zero, and the values against torch."""
    torch = require_torch()
    n_rows, dim = 6, 4
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    g1 = rng.standard_normal((5, dim)).astype(np.float32)
    g2 = (rng.standard_normal((8, dim)) * 2.0 ** -20).astype(np.float32)   # small terms: order shows in the bits
    idx1, off1 = random_bags(rng, n_rows, 5)
    idx2, off2 = np.zeros(16, dtype=np.int64), np.arange(0, 16, 2)          # every bag on row 0: long sums
    idx2[1::2] = rng.integers(0, n_rows, 8)
    emb = cembed.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode)
    emb(idx1, off1)
    emb.backward(g1)
    old = emb.grad.copy()
    if first_sparse:
        touched = np.flatnonzero(old.any(axis=1))
        emb.grad = SparseGrad(touched, old[touched], n_rows)
    emb(idx2, off2)
    emb.backward(g2)
    alone = cembed.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode)
    alone(idx2, off2)
    alone.backward(g2)
    assert_bitwise_equal(emb.grad, old + alone.grad)
    tbag = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(weight.copy()), freeze=False, mode=mode)
    tbag(torch.from_numpy(idx1), torch.from_numpy(off1)).backward(torch.from_numpy(g1))
    tbag(torch.from_numpy(idx2), torch.from_numpy(off2)).backward(torch.from_numpy(g2))
    if mode == "max":
        assert_bitwise_equal(emb.grad, tbag.weight.grad.numpy())
    else:
        np.testing.assert_allclose(emb.grad, tbag.weight.grad.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("sparse", [False, True])
def test_psw_gradient_matches_torch(rng, sparse):
    torch = require_torch()
    weight = rng.standard_normal((15, 4)).astype(np.float32)
    idx, offsets = random_bags(rng, 15, 12)
    psw = rng.standard_normal(idx.size).astype(np.float32)
    g = rng.standard_normal((12, 4)).astype(np.float32)
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", sparse=sparse)
    emb(idx, offsets, per_sample_weights=psw)
    psw_grad = emb.backward(g)
    tout, tw, tpsw = torch_bag(torch, idx, weight, offsets, psw, requires_grad=True, mode="sum", sparse=sparse)
    tout.backward(torch.from_numpy(g))
    np.testing.assert_allclose(psw_grad, tpsw.grad.numpy(), rtol=1e-5, atol=1e-6)
    theirs = tw.grad.coalesce().to_dense().numpy() if sparse else tw.grad.numpy()
    ours = emb.grad.to_dense() if sparse else emb.grad
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_scale_grad_by_freq_true_counts():
    """torch 2.13 divides by the wrong counts (docs/behaviour.md §7.1): cembed uses the true counts."""
    info = vector("bag_sgbf_cpu_bug_INFO")["expected"]
    emb = cembed.EmbeddingBag.from_pretrained(np.ones((4, 3), np.float32), freeze=False, mode="sum",
                                              scale_grad_by_freq=True)
    emb([1, 1, 3], [0])
    emb.backward(np.ones((1, 3), np.float32))
    np.testing.assert_array_equal(emb.grad, info["correct_grad_weight"])
    assert not np.array_equal(info["correct_grad_weight"], info["torch_2_13_grad_weight"])


def test_scale_grad_by_freq_vs_torch_documented_difference(rng):
    torch = require_torch()
    weight = np.ones((6, 2), np.float32)
    idx, offsets = np.array([4, 4, 4, 2, 0, 0]), np.arange(6)
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode="sum", scale_grad_by_freq=True)
    emb(idx, offsets)
    emb.backward(np.ones((6, 2), np.float32))
    np.testing.assert_array_equal(emb.grad[[0, 2, 4], 0], [1, 1, 1])  # the true counts
    tout, tw, _ = torch_bag(torch, idx, weight, offsets, requires_grad=True, mode="sum", scale_grad_by_freq=True)
    tout.backward(torch.ones(6, 2))
    # a canary, not a target: it fails the day torch fixes its counts, to say our docs need updating
    assert not np.array_equal(tw.grad.numpy(), emb.grad), \
        "torch's EmbeddingBag scale_grad_by_freq now uses the true counts: update docs/behaviour.md"
    expect, _ = ref.embedding_bag_backward(np.ones((6, 2)), idx, weight, offsets, "sum", scale_grad_by_freq=True)
    np.testing.assert_allclose(emb.grad, expect)


def test_sparse_mean_scale_grad_by_freq_equals_dense(rng):
    weight = rng.standard_normal((40, 3)).astype(np.float32)
    idx, offsets = random_bags(rng, 40, 30)
    g = rng.standard_normal((30, 3)).astype(np.float32)
    grads = []
    for sparse in (False, True):
        emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode="mean", sparse=sparse,
                                                  scale_grad_by_freq=True)
        emb(idx, offsets)
        emb.backward(g)
        grads.append(emb.grad.to_dense() if sparse else emb.grad)
    assert_bitwise_equal(grads[0], grads[1])
    expect, _ = ref.embedding_bag_backward(g, idx, weight, offsets, "mean", scale_grad_by_freq=True)
    np.testing.assert_allclose(grads[0], expect, rtol=1e-5, atol=1e-6)


@given(n_rows=st.integers(1, 30), dim=st.integers(1, 5), n_bags=st.integers(0, 12),
       mode=st.sampled_from(MODES), pad=st.one_of(st.none(), st.integers(0, 29)),
       two_d=st.booleans(), use_psw=st.booleans(), seed=st.integers(0, 2**31))
def test_hypothesis_against_reference(n_rows, dim, n_bags, mode, pad, two_d, use_psw, seed):
    rng = np.random.default_rng(seed)
    pad = None if pad is None else pad % n_rows
    weight = rng.standard_normal((n_rows, dim)).astype(np.float64)
    if two_d:
        idx, offsets = rng.integers(0, n_rows, (n_bags, int(rng.integers(0, 4)))), None
    else:
        idx, offsets = random_bags(rng, n_rows, n_bags)
    psw = rng.standard_normal(idx.shape) if (use_psw and mode == "sum") else None
    emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode, padding_idx=pad)
    out = emb(idx, offsets, per_sample_weights=psw)
    np.testing.assert_allclose(out, ref.embedding_bag(idx, weight, offsets, mode, psw, padding_idx=pad),
                               rtol=1e-12, atol=1e-12)
    g = rng.standard_normal(out.shape)
    psw_grad = emb.backward(g)
    expect, expect_psw = ref.embedding_bag_backward(g, idx, weight, offsets, mode, psw, padding_idx=pad)
    np.testing.assert_allclose(emb.grad, expect, rtol=1e-10, atol=1e-12)
    if psw is not None:
        np.testing.assert_allclose(psw_grad, expect_psw, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("mode", MODES)
def test_thread_count_bitwise(rng, mode):
    n_rows, dim = 50_000, 16
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    idx = zipf_indices(rng, 64_000, n_rows)
    offsets = np.sort(rng.choice(idx.size, 4000, replace=False))
    offsets[0] = 0
    g = rng.standard_normal((offsets.size, dim)).astype(np.float32)

    def run():
        emb = cembed.EmbeddingBag.from_pretrained(weight, freeze=False, mode=mode, padding_idx=0,
                                                  sparse=mode != "max")
        out = emb(idx, offsets)
        emb.backward(g)
        grad = emb.grad.to_dense() if mode != "max" else emb.grad
        return out, grad

    results = at_thread_counts(run)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert_bitwise_equal(a, b)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input=[0, 1], offsets=None), ValueError, "offsets"),
    (dict(input=[[0, 1]], offsets=[0]), ValueError, "offsets has to be None"),
    (dict(input=[[[0]]]), ValueError, "1D or 2D"),
    (dict(input=0), ValueError, "1D or 2D"),
    (dict(input=[0, 1], offsets=[[0]]), ValueError, "1D"),
    (dict(input=[0, 1], offsets=[1]), ValueError, r"offsets\[0\] has to be 0"),
    (dict(input=[0, 1, 2], offsets=[0, 2, 1]), ValueError, "non-decreasing"),
    (dict(input=[0, 1, 2], offsets=[0, -1, 2]), ValueError, "non-decreasing"),
    (dict(input=[0, 1, 2], offsets=[0, 4]), ValueError, "past the end"),
    (dict(input=[0, 1, 2], offsets=[0, 2], include_last_offset=True), ValueError, "last offset"),
    (dict(input=[0, 1, 2], offsets=[], include_last_offset=True), ValueError, "at least 1"),
    (dict(input=[0, 1], offsets=[0], mode="median"), ValueError, "mode has to be one of"),
    (dict(input=[0, 1], offsets=[0], mode="max", sparse=True), ValueError, "sparse"),
    (dict(input=[0, 1], offsets=[0], mode="max", scale_grad_by_freq=True), ValueError, "frequency"),
    (dict(input=[0, 1], offsets=[0], mode="mean", per_sample_weights=np.ones(2, np.float32)), ValueError,
     "only supported for mode='sum'"),
    (dict(input=[0, 1], offsets=[0], mode="sum", per_sample_weights=np.ones(3, np.float32)), ValueError,
     "same shape"),
    (dict(input=[0, 1], offsets=[0], mode="sum", per_sample_weights=np.ones(2, np.float64)), TypeError,
     "dtype"),
    (dict(input=[0, 5], offsets=[0]), IndexError, "contains 5 at position 1"),
    (dict(input=[0, -1], offsets=[0]), IndexError, "-1"),
    (dict(input=[0.0, 1.0], offsets=[0]), TypeError, "integer"),
    (dict(input=[0, 1], offsets=[0.0]), TypeError, "integer"),
    (dict(input=[0, 1], offsets=[0], padding_idx=5), ValueError, "padding_idx"),
])
def test_bad_arguments_change_nothing(rng, kwargs, exc, match):
    weight = rng.standard_normal((5, 3)).astype(np.float32) * 10
    before = weight.copy()
    with pytest.raises(exc, match=match):
        F.embedding_bag(weight=weight, max_norm=1.0, **kwargs)  # a refused call renorms nothing
    assert_bitwise_equal(weight, before)


def test_bad_weight():
    with pytest.raises(ValueError, match="2-D"):
        F.embedding_bag([0], np.ones(3, np.float32), [0])
    with pytest.raises(TypeError, match="float32 or float64"):
        F.embedding_bag([0], np.ones((3, 2), np.longdouble), [0])
    with pytest.raises(TypeError, match="numeric dtype"):
        F.embedding_bag([0], np.ones((3, 2), bool), [0])
    for swapped in (">f4", ">f8", ">i8") if np.little_endian else ("<f4", "<f8", "<i8"):   # say what is wrong
        for call in (lambda w: F.embedding_bag([0], w, [0]), lambda w: F.embedding([0], w)):
            with pytest.raises(TypeError, match="native byte order"):
                call(np.ones((3, 2), swapped))
    with pytest.raises(TypeError, match="numeric dtype"):
        F.embedding_bag([0], np.ones((3, 2), ">c8"), [0])


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint16])
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_integer_tables_pool(rng, dtype, mode, padding_idx):
    """Lookup-only integer tables (torch refuses them in bags): sums in int64, means in float64,
    maxima in the table dtype; padding skipped, empty bags 0."""
    weight = rng.integers(-50, 100, (6, 3)).astype(dtype)
    idx = np.array([0, 2, 5, 2, 2, 1, 4])
    offsets = np.array([0, 3, 3, 5])
    out = F.embedding_bag(idx, weight, offsets, mode=mode, padding_idx=padding_idx)
    expect = ref.embedding_bag(idx, weight.astype(np.float64), offsets, mode, padding_idx=padding_idx)
    assert out.dtype == {"sum": np.int64, "mean": np.float64, "max": weight.dtype}[mode]
    np.testing.assert_array_equal(out, expect)
    bag = cembed.EmbeddingBag.from_pretrained(weight, mode=mode, padding_idx=padding_idx)
    np.testing.assert_array_equal(bag(idx, offsets), out)
    with pytest.raises(TypeError, match="integer tables are lookup-only"):
        cembed.EmbeddingBag.from_pretrained(weight, freeze=False)


def test_max_norm_renorms_touched_rows(rng):
    torch = require_torch()
    weight = rng.standard_normal((10, 4)).astype(np.float32) * 3
    tweight = weight.copy()
    idx, offsets = np.array([1, 2, 2, 7]), np.array([0, 1])
    out = F.embedding_bag(idx, weight, offsets, max_norm=1.5, mode="sum")
    tw = torch.from_numpy(tweight)
    tout = torch.nn.functional.embedding_bag(torch.from_numpy(idx), tw, torch.from_numpy(offsets), max_norm=1.5,
                                             mode="sum")
    np.testing.assert_allclose(weight, tw.numpy(), rtol=1e-6)
    np.testing.assert_allclose(out, tout.numpy(), rtol=1e-6)
    untouched = [0, 3, 4, 5, 6, 8, 9]
    assert np.linalg.norm(weight[[1, 2, 7]], axis=1).max() <= 1.5 + 1e-5
    np.testing.assert_array_equal(weight[untouched], tweight[untouched])


def test_module_basics():
    bag = cembed.EmbeddingBag(10, 3, seed=0, padding_idx=2)
    assert bag.mode == "mean" and not bag.weight[2].any()
    assert repr(bag) == "EmbeddingBag(10, 3, mode='mean', padding_idx=2)"
    with pytest.raises(ValueError, match="forward first"):
        bag.backward(np.ones((1, 3), np.float32))
    bag([0, 1], [0])
    with pytest.raises(ValueError, match="shape"):
        bag.backward(np.ones((2, 3), np.float32))
    bag.backward(np.ones((1, 3), np.float32))
    bag([0, 1], [0])
    bag.backward(np.ones((1, 3), np.float32))
    np.testing.assert_allclose(bag.grad[0], [1, 1, 1])  # accumulated over two calls
    bag.zero_grad()
    assert bag.grad is None
    frozen = cembed.EmbeddingBag.from_pretrained(np.ones((4, 2), np.float32), mode="sum")
    frozen([0, 1], [0])
    frozen.backward(np.ones((1, 2), np.float32))
    assert frozen.grad is None and not frozen.requires_grad


def test_empty_offsets_with_indices_are_refused():
    """torch returns no bags for a non-empty 1-D input with empty offsets, and its backward reads
    unset memory; cembed's saved bags then held entries no bag owned (a segfault in the per-sample
    weights' gradient). Empty offsets are accepted for an empty input only."""
    bag = cembed.EmbeddingBag(10, 4, mode="sum", sparse=True, seed=0)
    weight = np.array(bag.weight)
    for psw in (None, np.ones(3, np.float32)):
        with pytest.raises(ValueError, match="offsets is empty but the input has 3 indices"):
            bag(np.array([1, 2, 3]), np.zeros(0, np.int64), per_sample_weights=psw)
        with pytest.raises(ValueError, match="offsets is empty"):
            F.embedding_bag_backward(np.zeros((0, 4), np.float32), np.array([1, 2, 3]), weight,
                                     np.zeros(0, np.int64), mode="sum", per_sample_weights=psw)
    assert bag(np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0, 4)
    assert_bitwise_equal(bag.weight, weight)


def test_a_str_subclass_mode_is_used_as_the_plain_string():
    """The mode object was kept and compared again in the backward: a str subclass could read "sum"
    at the forward and "max" at the backward (an assertion, a segfault under python -O)."""
    class Mode(str):
        calls = 0

        def __eq__(self, other):
            Mode.calls += 1
            return other == "max" if Mode.calls > 3 else str.__eq__(self, other)

        __hash__ = str.__hash__

    bag = cembed.EmbeddingBag(50, 4, mode=Mode("sum"), seed=0)
    plain = cembed.EmbeddingBag(50, 4, mode="sum", seed=0)
    idx, off = np.arange(50)[::-1].copy(), np.array([0, 20])
    assert_bitwise_equal(bag(idx, off), plain(idx, off))
    grad = np.ones((2, 4), np.float32)
    bag.backward(grad)
    plain.backward(grad)
    assert_bitwise_equal(bag.grad, plain.grad)
