"""16-bit gradient rows (issue 12): a float16 / bfloat16 table's backward also takes ``grad_output`` in
the table's own dtype — the ``out_dtype`` its lookups and bags may return — so a training step can keep
its activations in 16 bits end to end. The claim under test (docs/behaviour.md §12): the kernels widen
each element exactly as they sum, so every result (gradients, weights, optimizer state, per-sample-weight
gradients) is bitwise the one of ``grad_output.astype(float32)``, for every optimizer, fused or not, at
any thread count; the float32 path is itself checked against torch and NumPy elsewhere, and against torch
again here. Other dtypes are refused before anything changes."""
import numpy as np
import pytest

import cembed
import reference as ref
from cembed import optim
from cembed import functional as F
from util import assert_bitwise_equal, at_thread_counts, fingerprint, require_torch, zipf_indices

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [pytest.param(BF16, id="bfloat16"), pytest.param(F16, id="float16")]

OPTIMIZERS = {
    "sgd": (optim.SGD, dict(lr=0.1)),
    "sgd_momentum": (optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sparse_adam": (optim.SparseAdam, dict(lr=0.01, state_dtype="bfloat16")),
    "adagrad": (optim.Adagrad, dict(lr=0.1, state_dtype="float16")),
    "rowwise": (optim.RowWiseAdagrad, dict(lr=0.1, weight_decay=0.01)),
    "adamw": (optim.SparseAdamW, dict(lr=0.01, weight_decay=0.1, bias_correction="row")),
}


def _grad16(rng, shape, dtype):
    """A 16-bit gradient with ordinary values, tiny ones (float16 subnormals) and exact zeros."""
    g = (rng.standard_normal(shape) * np.exp(rng.uniform(-12, 2, shape))).astype(np.float32)
    g.flat[::7] = 0.0
    return g.astype(dtype)


def _train(kind, opt_name, dtype, grad_dtype, fused, *, steps=3, n_rows=400, dim=40, seed=0, options=None):
    """``steps`` forward + backward + update of a 16-bit module; each step's gradient is drawn in 16 bits
    and handed over as it is (``grad_dtype`` None) or widened to float32 first."""
    cls, kw = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(seed)
    init = rng.standard_normal((n_rows, dim)).astype(dtype)
    options = {"sparse": True, **(options or {})}
    if kind == "emb":
        module = cembed.Embedding.from_pretrained(init, freeze=False, **options)
    else:
        module = cembed.EmbeddingBag.from_pretrained(init, freeze=False, **options)
    opt = cls([module], seed=5, **kw)
    psw_grads = []
    for _ in range(steps):
        idx = zipf_indices(rng, 4 * n_rows, n_rows).reshape(-1, 4)
        if kind == "emb":
            out = module(idx, out_dtype=dtype)
            g = _grad16(rng, out.shape, dtype)
        else:
            psw = rng.standard_normal(idx.shape).astype(np.float32) if module.mode == "sum" else None
            out = module(idx, per_sample_weights=psw, out_dtype=dtype)
            g = _grad16(rng, out.shape, dtype)
        assert out.dtype == dtype
        g = g if grad_dtype is None else g.astype(grad_dtype)
        if fused:
            psw_grads.append(module.backward(g, optimizer=opt))
        else:
            psw_grads.append(module.backward(g))
            opt.step()
            opt.zero_grad()
    return fingerprint(module.weight, opt.state_dict(), [p for p in psw_grads if p is not None])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_embedding_steps_equal_the_widened_gradient(dtype, opt_name, fused):
    want = _train("emb", opt_name, dtype, np.float32, fused)
    assert _train("emb", opt_name, dtype, None, fused) == want
    assert _train("emb", opt_name, dtype, None, not fused) == want   # and fused == unfused


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("options", [dict(padding_idx=3), dict(scale_grad_by_freq=True),
                                     dict(padding_idx=0, scale_grad_by_freq=True, max_norm=1.5)],
                         ids=["padding", "by_freq", "all"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_embedding_options_equal_the_widened_gradient(dtype, options, fused):
    want = _train("emb", "sparse_adam", dtype, np.float32, fused, options=options)
    assert _train("emb", "sparse_adam", dtype, None, fused, options=options) == want


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_bags_equal_the_widened_gradient(dtype, mode, fused):
    options = dict(mode=mode, padding_idx=2, scale_grad_by_freq=mode != "max", sparse=mode != "max")
    want = _train("bag", "adagrad", dtype, np.float32, fused, options=options)
    assert _train("bag", "adagrad", dtype, None, fused, options=options) == want


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_thread_counts_bitwise(fused):
    runs = at_thread_counts(lambda: _train("emb", "sparse_adam", BF16, None, fused, n_rows=6000, dim=72, steps=2))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] == _train("emb", "sparse_adam", BF16, np.float32, fused, n_rows=6000, dim=72, steps=2)


@pytest.mark.parametrize("dtype", HALF)
def test_per_sample_weights_of_a_lookup(dtype):
    """Embedding.backward with per_sample_weights (the weighted-sum gradient: grad_output one row per
    group of indices): the weights stay float32, the rows may be 16-bit."""
    rng = np.random.default_rng(4)
    init = rng.standard_normal((50, 24)).astype(dtype)
    idx = rng.integers(0, 50, (30, 5))
    psw = rng.standard_normal(idx.shape).astype(np.float32)
    g = _grad16(rng, (30, 24), dtype)
    results = []
    for grad in (g, g.astype(np.float32)):
        emb = cembed.Embedding.from_pretrained(init.copy(), freeze=False, sparse=True)
        opt = optim.RowWiseAdagrad([emb], lr=0.1)
        emb.backward(grad, idx, per_sample_weights=psw, optimizer=opt)
        emb.backward(grad, idx, per_sample_weights=psw)
        results.append(fingerprint(emb.weight, opt.state_dict(), emb.grad))
    assert results[0] == results[1]
    with pytest.raises(TypeError, match="per_sample_weights must have dtype float32"):
        emb.backward(g, idx, per_sample_weights=psw.astype(dtype))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sparse", [True, False])
def test_functional_backward_against_numpy(dtype, sparse):
    """functional.embedding_backward and coalesce take 16-bit rows too: a float32 gradient, each row's
    contributions summed in input order (NumPy reference: np.add.at on the widened rows, which adds in
    input order as well)."""
    rng = np.random.default_rng(1)
    idx = zipf_indices(rng, 3000, 200).reshape(-1, 3)
    g = _grad16(rng, idx.shape + (16,), dtype)
    got = F.embedding_backward(g, idx, 200, sparse=sparse)
    want = ref.embedding_backward(g.astype(np.float32), idx, 200)
    dense = got.to_dense() if sparse else got
    assert dense.dtype == np.float32
    assert_bitwise_equal(dense, want)
    assert_bitwise_equal(dense, F.embedding_backward(g.astype(np.float32), idx, 200))
    merged = F.coalesce(idx.ravel(), g.reshape(-1, 16), 200)
    assert merged.values.dtype == np.float32
    assert_bitwise_equal(merged.to_dense(), want)


@pytest.mark.parametrize("dtype", HALF)
def test_functional_bag_backward(dtype):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((60, 8)).astype(dtype)
    idx = rng.integers(0, 60, 90)
    offsets = np.arange(0, 90, 3)
    psw = rng.standard_normal(90).astype(np.float32)
    g = _grad16(rng, (30, 8), dtype)
    for mode, weights in (("sum", psw), ("mean", None), ("max", None)):
        got = F.embedding_bag_backward(g, idx, weight, offsets, mode=mode, per_sample_weights=weights)
        want = F.embedding_bag_backward(g.astype(np.float32), idx, weight, offsets, mode=mode,
                                        per_sample_weights=weights)
        assert fingerprint(got) == fingerprint(want)


@pytest.mark.parametrize("dtype", HALF)
def test_torch_parity_on_the_widened_gradient(dtype):
    """torch rounds a 16-bit table's gradient to its dtype; cembed keeps it in float32. What the two
    share: cembed's gradient from 16-bit rows is bitwise torch's float32 gradient of the same values."""
    torch = require_torch()
    rng = np.random.default_rng(3)
    idx = zipf_indices(rng, 2000, 100).reshape(-1, 4)
    g = _grad16(rng, idx.shape + (12,), dtype)
    weight = torch.zeros(100, 12, requires_grad=True)
    torch.nn.functional.embedding(torch.from_numpy(idx), weight).backward(torch.from_numpy(g.astype(np.float32)))
    emb = cembed.Embedding.from_pretrained(np.zeros((100, 12), dtype), freeze=False)
    emb(idx, out_dtype=dtype)
    emb.backward(g)
    assert_bitwise_equal(emb.grad, weight.grad.numpy())

    # where they differ: torch adds 16-bit rows into a 16-bit gradient, rounding after every addition
    ones = np.ones((1000, 4), dtype)
    tw = torch.zeros(2, 4, dtype=torch.bfloat16 if dtype == BF16 else torch.float16, requires_grad=True)
    torch.nn.functional.embedding(torch.zeros(1000, dtype=torch.long), tw).backward(
        torch.from_numpy(ones.astype(np.float32)).to(tw.dtype))
    emb = cembed.Embedding.from_pretrained(np.zeros((2, 4), dtype), freeze=False)
    emb.backward(ones, np.zeros(1000, np.int64))
    assert emb.grad[0].tolist() == [1000.0] * 4
    assert tw.grad[0].float().tolist() == ([256.0] * 4 if dtype == BF16 else [1000.0] * 4)


def test_other_dtypes_refused_before_anything_changes():
    """A 16-bit grad_output must be the table's own dtype; a float32 / float64 table takes none; the
    optimizer state, the weight and .grad are untouched by a refused call."""
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 20, (6, 2))
    emb16 = cembed.Embedding.from_pretrained(rng.standard_normal((20, 4)).astype(BF16), freeze=False, sparse=True)
    emb32 = cembed.Embedding.from_pretrained(rng.standard_normal((20, 4)).astype(np.float32), freeze=False,
                                             sparse=True)
    bag = cembed.EmbeddingBag.from_pretrained(rng.standard_normal((20, 4)).astype(F16), freeze=False, mode="sum")
    bag(idx)
    opt = optim.SparseAdam([emb16, emb32], lr=0.1)
    emb16(idx)
    emb16.backward(np.ones((6, 2, 4), np.float32), optimizer=opt)   # state exists
    before = fingerprint(emb16.weight, emb32.weight, bag.weight, opt.state_dict())
    for module, grad, match in ((emb16, np.ones((6, 2, 4), F16), "bfloat16"),
                                (emb16, np.ones((6, 2, 4), np.float64), "float32 or bfloat16"),
                                (emb32, np.ones((6, 2, 4), BF16), "takes float32"),
                                (emb16, np.ones((6, 2, 4), np.int16), "float32, float64, float16 or bfloat16"),
                                (bag, np.ones((6, 4), BF16), "float16")):
        for kw in ({}, {"optimizer": opt} if module is not bag else {}):
            with pytest.raises(TypeError, match=match):
                module.backward(grad, idx, **kw) if module is not bag else module.backward(grad, **kw)
            assert emb16.grad is None and emb32.grad is None and bag.grad is None
    with pytest.raises(TypeError, match="float16"):
        F.embedding_bag_backward(np.ones((6, 4), BF16), idx, bag.weight)
    assert fingerprint(emb16.weight, emb32.weight, bag.weight, opt.state_dict()) == before
