"""Gradient clipping: clip_grad_norm_ / clip_grad_value_ against a float64 NumPy reference and against
torch's functions applied to the dense equivalent of the same gradients (dense and SparseGrad mixed).

cembed accumulates the norm in float64, torch in the gradient dtype, so float32 norms agree to a few
ulp (rtol 1e-5 here); the max norm is exact. Given the norm, the clip coefficient and the products
follow torch's float arithmetic exactly, which is asserted bitwise.
"""
import math

import numpy as np
import pytest

import cembed
from cembed import SparseGrad
from cembed import _clip
from cembed.optim.clip_grad import clip_grad_norm_, clip_grad_value_

from util import assert_bitwise_equal, at_thread_counts, require_torch, zipf_indices

NORM_TYPES = [1, 2.0, 3.5, float("inf")]
DTYPES = [np.float32, np.float64]


class Table:
    """The minimal parameter object: .weight and .grad."""

    def __init__(self, shape, dtype, grad=None):
        self.weight = np.zeros(shape, dtype=dtype)
        self.grad = grad


def sparse_grad(rng, n_rows, dim, nnz, dtype, scale=1.0):
    rows = np.sort(rng.choice(n_rows, nnz, replace=False)).astype(np.int64)
    return SparseGrad(rows, (scale * rng.standard_normal((nnz, dim))).astype(dtype), n_rows)


def make_params(rng, dtype, scale=1.0):
    """Several modules: sparse, dense, an empty sparse gradient, no gradient, a 1-D dense one."""
    specs = [("sparse", (500, 16), 37), ("dense", (40, 7), None), ("sparse", (100, 3), 0),
             ("none", (5, 2), None), ("sparse", (70_000, 9), 1_234), ("dense", (33,), None)]
    params = []
    for kind, shape, nnz in specs:
        if kind == "sparse":
            params.append(Table(shape, dtype, sparse_grad(rng, shape[0], shape[1], nnz, dtype, scale)))
        elif kind == "dense":
            params.append(Table(shape, dtype, (scale * rng.standard_normal(shape)).astype(dtype)))
        else:
            params.append(Table(shape, dtype))
    return params


def stored(grad):
    return grad.values if isinstance(grad, SparseGrad) else grad


def dense(grad):
    return grad.to_dense() if isinstance(grad, SparseGrad) else grad


def snapshot(params):
    return [None if p.grad is None else
            (p.grad.indices.copy(), p.grad.values.copy()) if isinstance(p.grad, SparseGrad) else p.grad.copy()
            for p in params]


def assert_unchanged(params, snap):
    for p, s in zip(params, snap):
        if s is None:
            assert p.grad is None
        elif isinstance(p.grad, SparseGrad):
            assert_bitwise_equal(p.grad.indices, s[0])
            assert_bitwise_equal(p.grad.values, s[1])
        else:
            assert_bitwise_equal(p.grad, s)


# ---------------------------------------------------------------- readable reference (float64)
def ref_total_norm(grads, p):
    x = np.concatenate([np.asarray(stored(g), dtype=np.float64).ravel() for g in grads] + [np.zeros(0)])
    a = np.abs(x)
    if math.isinf(p):
        return float(a.max()) if a.size else 0.0
    return float(np.sum(a ** p) ** (1.0 / p))


def torch_coef(total, max_norm, dtype):
    """torch: clamp((total + 1e-6).reciprocal() * max_norm, max=1) in the gradient dtype."""
    t = dtype(total)
    with np.errstate(all="ignore"):
        return np.minimum(dtype(1) / (t + dtype(1e-6)) * dtype(max_norm), dtype(1))


def torch_clip(torch, params, fn, *args, **kwargs):
    """Run torch's fn on torch parameters whose gradients are the dense equivalents; return
    (result, [clipped dense grad or None])."""
    tparams = []
    for p in params:
        t = torch.nn.Parameter(torch.zeros(p.weight.shape, dtype=torch.from_numpy(p.weight).dtype))
        if p.grad is not None:
            t.grad = torch.from_numpy(dense(p.grad).copy())
        tparams.append(t)
    out = fn(tparams, *args, **kwargs)
    return out, [None if t.grad is None else t.grad.numpy() for t in tparams]


def tol(dtype):
    return dict(rtol=1e-5, atol=0) if dtype == np.float32 else dict(rtol=1e-12, atol=0)


# ---------------------------------------------------------------- clip_grad_norm_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_norm_matches_reference_and_torch(rng, dtype, norm_type, max_norm):
    torch = require_torch()
    params = make_params(rng, dtype)
    grads = [p.grad for p in params if p.grad is not None]
    before = [stored(g).copy() for g in grads]
    expected = ref_total_norm(grads, norm_type)
    t_norm, t_grads = torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, max_norm, norm_type)

    total = clip_grad_norm_(params, max_norm, norm_type)

    assert isinstance(total, dtype) and np.ndim(total) == 0
    if dtype == np.float32:
        np.testing.assert_array_max_ulp(total, np.float32(expected), maxulp=1)
    else:
        np.testing.assert_allclose(total, expected, rtol=1e-13)
    if math.isinf(norm_type):
        assert total == t_norm.item()
    else:
        np.testing.assert_allclose(total, t_norm.item(), **tol(dtype))
    coef = torch_coef(total, max_norm, dtype)
    assert (coef < 1) == (max_norm < expected)
    for g, b in zip(grads, before):
        assert_bitwise_equal(stored(g), b * coef if coef != 1 else b)    # torch's arithmetic, exactly
    for p, tg in zip(params, t_grads):
        if p.grad is None:
            assert tg is None
        else:
            np.testing.assert_allclose(dense(p.grad), tg, **tol(dtype))


def test_norm_type_spellings(rng):
    params = make_params(rng, np.float32)
    results = {}
    for spelling in [float("inf"), "inf", "Infinity", np.inf, 2, 2.0, np.float32(2), np.int64(2), "2"]:
        results[repr(spelling)] = clip_grad_norm_(params, 1e9, spelling)     # no clipping: no change
    assert len({results[k] for k in ("inf", "'inf'", "'Infinity'")}) == 1
    assert len({v for k, v in results.items() if "inf" not in k.lower()}) == 1


def test_in_place_only_stored_values(rng):
    params = make_params(rng, np.float32, scale=10.0)
    sp = params[0].grad
    dn = params[1].grad
    values, indices, shape = sp.values, sp.indices.copy(), sp.shape
    before = values.copy()
    clip_grad_norm_(params, 1.0)
    assert params[0].grad is sp and params[1].grad is dn          # the same gradient objects
    assert np.shares_memory(sp.values, values)                     # scaled where they are stored
    assert_bitwise_equal(sp.indices, indices)                      # sparsity pattern untouched
    assert sp.shape == shape and sp.nnz == indices.size
    assert not np.array_equal(sp.values, before)
    assert params[3].grad is None                                  # no gradient: still none


def test_single_module_and_embedding_workflow(rng):
    emb = cembed.Embedding(1000, 8, sparse=True, seed=0)
    idx = zipf_indices(rng, 300, 1000)
    emb(idx)
    emb.backward(rng.standard_normal((300, 8)).astype(np.float32))
    bag = cembed.EmbeddingBag(50, 8, mode="sum", seed=1)
    bag(rng.integers(0, 50, (6, 4)))
    bag.backward(rng.standard_normal((6, 8)).astype(np.float32))
    assert isinstance(emb.grad, SparseGrad) and isinstance(bag.grad, np.ndarray)
    expected = ref_total_norm([emb.grad, bag.grad], 2.0)
    total = clip_grad_norm_([emb, bag], 1.0)
    np.testing.assert_array_max_ulp(total, np.float32(expected), maxulp=1)
    assert ref_total_norm([emb.grad, bag.grad], 2.0) == pytest.approx(1.0, rel=1e-5)
    expected = ref_total_norm([emb.grad], 2.0)
    alone = clip_grad_norm_(emb, 0.1)                              # a module on its own
    np.testing.assert_array_max_ulp(alone, np.float32(expected), maxulp=1)
    assert ref_total_norm([emb.grad], 2.0) == pytest.approx(0.1, rel=1e-5)


def test_below_max_norm_is_untouched(rng):
    params = make_params(rng, np.float64)
    snap = snapshot(params)
    total = clip_grad_norm_(params, 1e6)
    assert 0 < total < 1e6
    assert_unchanged(params, snap)


def test_max_norm_zero_and_inf(rng):
    params = make_params(rng, np.float32)
    snap = snapshot(params)
    clip_grad_norm_(params, float("inf"))
    assert_unchanged(params, snap)
    clip_grad_norm_(params, 0.0)
    for p in params:
        if p.grad is not None:
            assert not np.any(stored(p.grad))


def test_same_gradient_listed_twice_scaled_once(rng):
    params = make_params(rng, np.float32, scale=5.0)
    once = [Table(p.weight.shape, np.float32, None if p.grad is None else
                  (SparseGrad(p.grad.indices, p.grad.values.copy(), p.grad.num_rows)
                   if isinstance(p.grad, SparseGrad) else p.grad.copy())) for p in params]
    a = clip_grad_norm_(params + params[:2], 1.0)
    b = clip_grad_norm_(once, 1.0)
    assert_bitwise_equal(a, b)
    assert_unchanged(params, snapshot(once))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_norm_bitwise_across_thread_counts(dtype, norm_type):
    def run():
        rng = np.random.default_rng(7)
        params = [Table((10_000, 64), dtype, sparse_grad(rng, 10_000, 64, 4_001, dtype)),
                  Table((300, 700), dtype, rng.standard_normal((300, 700)).astype(dtype))]
        total = clip_grad_norm_(params, 0.25, norm_type)
        return total, params[0].grad.values, params[1].grad

    runs = at_thread_counts(run)
    for total, sv, dv in runs[1:]:
        assert_bitwise_equal(total, runs[0][0])
        assert_bitwise_equal(sv, runs[0][1])
        assert_bitwise_equal(dv, runs[0][2])


@pytest.mark.parametrize("kind", [_clip.KIND_MAX_ABS, _clip.KIND_SUM_ABS, _clip.KIND_SUM_SQ, _clip.KIND_SUM_POW])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 8191, 8192, 8193, 3 * 65536 + 17])
def test_kernel_block_edges(kind, dtype, n):
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(dtype)
    a = np.abs(x.astype(np.float64))
    p = 3.5
    expected = {0: a.max() if n else 0.0, 1: a.sum(), 2: (a * a).sum(), 3: (a ** p).sum()}[kind]
    got = at_thread_counts(lambda: _clip.norm_reduce(x, kind, p, cembed.get_num_threads()))
    assert got[0] == got[1] == got[2]
    np.testing.assert_allclose(got[0], expected, rtol=1e-12)
    if n:
        x[n // 2] = np.nan
        assert math.isnan(_clip.norm_reduce(x, kind, p, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("norm_type", [2.0, float("inf")])
def test_nonfinite(rng, dtype, bad, norm_type):
    torch = require_torch()
    params = make_params(rng, dtype)
    g = params[4].grad
    values = g.values.copy()
    values[3, 2] = bad
    params[4].grad = SparseGrad(g.indices, values, g.num_rows)
    snap = snapshot(params)
    with pytest.raises(RuntimeError, match=r"non-finite \((nan|inf)\)"):
        clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert_unchanged(params, snap)
    with pytest.raises(RuntimeError):
        torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, 1.0, norm_type, error_if_nonfinite=True)

    t_norm, t_grads = torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, 1.0, norm_type)
    total = clip_grad_norm_(params, 1.0, norm_type)                # torch: scale by the non-finite coef
    assert_bitwise_equal(total, np.asarray(t_norm.numpy()))
    for p, tg in zip(params, t_grads):
        if isinstance(p.grad, SparseGrad):
            # only the stored values are scaled: with a NaN coefficient torch's dense equivalent is NaN
            # in every row too, here the rows a SparseGrad does not store stay (implicitly) zero
            np.testing.assert_array_equal(p.grad.values, tg[p.grad.indices])
            assert np.isnan(tg).all() == (bad is np.nan and p.grad.num_rows > p.grad.nnz)
        elif p.grad is not None:
            np.testing.assert_array_equal(p.grad, tg)              # NaN == NaN here


def test_no_gradients():
    assert_bitwise_equal(clip_grad_norm_([], 1.0), np.float32(0.0))
    assert_bitwise_equal(clip_grad_norm_([Table((3, 2), np.float64)], 1.0), np.float32(0.0))
    with pytest.warns(UserWarning, match="empty generator"):
        assert clip_grad_norm_((t for t in []), 1.0) == 0.0
    empty = Table((10, 4), np.float64, SparseGrad(np.zeros(0, np.int64), np.zeros((0, 4)), 10))
    total = clip_grad_norm_(empty, 1.0, error_if_nonfinite=True)
    assert_bitwise_equal(total, np.float64(0.0))
    clip_grad_value_([], 1.0)


def test_generator_is_consumed_once(rng):
    params = make_params(rng, np.float32, scale=3.0)
    total = clip_grad_norm_((p for p in params), 1.0)
    assert total > 1
    assert ref_total_norm([p.grad for p in params if p.grad is not None], 2) == pytest.approx(1.0, rel=1e-5)


def test_non_contiguous_dense_gradient(rng):
    torch = require_torch()
    base = rng.standard_normal((30, 20)).astype(np.float32)
    params = [Table((20, 15), np.float32, base[::-1].T[:, ::2][:, :15]),   # a strided view, written in place
              Table((50, 4), np.float32, sparse_grad(rng, 50, 4, 9, np.float32))]
    assert not params[0].grad.flags.c_contiguous
    t_norm, t_grads = torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, 1.0, 3.5)
    total = clip_grad_norm_(params, 1.0, 3.5)
    np.testing.assert_allclose(total, t_norm.item(), rtol=1e-5)
    for p, tg in zip(params, t_grads):
        np.testing.assert_allclose(dense(p.grad), tg, rtol=1e-5)
    clip_grad_value_(params, 0.01)
    assert np.abs(base).max() > 0.01 and np.abs(params[0].grad).max() <= np.float32(0.01)


# ---------------------------------------------------------------- refusals: nothing modified
def _refused(rng, exc, match, call):
    params = make_params(rng, np.float32, scale=10.0)
    snap = snapshot(params)
    with pytest.raises(exc, match=match):
        call(params)
    assert_unchanged(params, snap)


@pytest.mark.parametrize("max_norm, exc, match", [
    ("1.0", TypeError, "max_norm must be a real number"),
    (None, TypeError, "max_norm must be a real number"),
    (True, TypeError, "max_norm must be a real number, got bool"),
    (np.bool_(True), TypeError, "max_norm must be a real number"),
    (float("nan"), ValueError, "max_norm must not be NaN"),
    (-1.0, ValueError, r"max_norm must be >= 0, got -1.0"),
])
def test_bad_max_norm(rng, max_norm, exc, match):
    _refused(rng, exc, match, lambda ps: clip_grad_norm_(ps, max_norm))


@pytest.mark.parametrize("norm_type, exc, match", [
    (0, ValueError, "norm_type must be > 0"),
    (-2.0, ValueError, "norm_type must be > 0"),
    ("-inf", ValueError, "norm_type must be > 0"),
    (float("nan"), ValueError, "norm_type must not be NaN"),
    ("two", ValueError, "norm_type must be a positive number or 'inf', got 'two'"),
    (True, TypeError, "norm_type must be a real number, got bool"),
    (None, TypeError, "norm_type must be a real number"),
])
def test_bad_norm_type(rng, norm_type, exc, match):
    _refused(rng, exc, match, lambda ps: clip_grad_norm_(ps, 1.0, norm_type))


@pytest.mark.parametrize("clip_value, exc, match", [
    ("1", TypeError, "clip_value must be a real number"),
    (False, TypeError, "clip_value must be a real number, got bool"),
    (float("nan"), ValueError, "clip_value must not be NaN"),
    (-0.5, ValueError, "clip_value must be >= 0"),
])
def test_bad_clip_value(rng, clip_value, exc, match):
    _refused(rng, exc, match, lambda ps: clip_grad_value_(ps, clip_value))


def test_bad_error_if_nonfinite(rng):
    """A flag that is not a bool is refused (a string "False" was read as true), nothing clipped."""
    _refused(rng, TypeError, "error_if_nonfinite must be a bool, got str",
             lambda ps: clip_grad_norm_(ps, 1e-3, error_if_nonfinite="False"))


def test_bad_foreach(rng):
    _refused(rng, TypeError, "foreach must be None or a bool", lambda ps: clip_grad_norm_(ps, 1.0, foreach="yes"))
    params = make_params(rng, np.float32)
    for foreach in (None, True, False):
        clip_grad_norm_(params, 1e9, foreach=foreach)
        clip_grad_value_(params, 1e9, foreach=foreach)


@pytest.mark.parametrize("fn", ["norm", "value"])
def test_bad_gradients_refused_before_any_change(rng, fn):
    call = (lambda ps: clip_grad_norm_(ps, 1.0)) if fn == "norm" else (lambda ps: clip_grad_value_(ps, 0.1))

    def with_last(grad):
        def run(ps):
            call(ps + [Table((4, 3), np.float32, grad)])
        return run

    _refused(rng, TypeError, r"same dtype: parameters\[0\].grad is float32 but parameters\[6\].grad is float64",
             with_last(np.ones((4, 3))))
    _refused(rng, TypeError, r"same dtype.*parameters\[6\].grad is float64",
             with_last(SparseGrad([1], np.ones((1, 3)), 4)))
    _refused(rng, TypeError, r"parameters\[6\].grad must be float32 or float64, got dtype int64",
             with_last(np.ones((4, 3), dtype=np.int64)))
    _refused(rng, TypeError, "must be in native byte order",
             with_last(np.ones((4, 3), dtype=np.dtype(np.float32).newbyteorder())))
    _refused(rng, TypeError, r"parameters\[6\].grad must be a numpy array or a cembed.SparseGrad, got list",
             with_last([[1.0]]))
    ro = np.ones((4, 3), dtype=np.float32)
    ro.flags.writeable = False
    _refused(rng, ValueError, r"parameters\[6\].grad is read-only", with_last(ro))
    _refused(rng, TypeError, r"parameters\[6\] must be a module with .grad, got ndarray",
             lambda ps: call(ps + [np.ones(3)]))
    _refused(rng, TypeError, "parameters must be a module with .grad or an iterable of modules, got a ndarray",
             lambda ps: call(np.ones((3, 3), dtype=np.float32)))
    _refused(rng, TypeError, "got int", lambda ps: call(3))


# ---------------------------------------------------------------- clip_grad_value_
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip_value", [0.0, 0.3, 1.0, 1e40, float("inf")])
def test_value_matches_torch(rng, dtype, clip_value):
    torch = require_torch()
    params = make_params(rng, dtype)
    g = params[4].grad
    values = g.values.copy()
    values[0, :3] = [np.nan, np.inf, -np.inf]
    params[4].grad = SparseGrad(g.indices, values, g.num_rows)
    params[1].grad[0, 0] = np.nan
    before = [None if p.grad is None else stored(p.grad).copy() for p in params]
    if dtype == np.float32 and clip_value == 1e40:
        t_grads = None      # torch: "value cannot be converted to type float without overflow"; here: inf
    else:
        _, t_grads = torch_clip(torch, params, torch.nn.utils.clip_grad_value_, clip_value)
    assert clip_grad_value_(params, clip_value) is None
    with np.errstate(over="ignore"):
        lo, hi = -dtype(clip_value), dtype(clip_value)
    for i, (p, b) in enumerate(zip(params, before)):
        if p.grad is None:
            continue
        if t_grads is not None:
            assert_bitwise_equal(dense(p.grad), t_grads[i])
        with np.errstate(invalid="ignore"):
            v = np.where(b < lo, lo, b)                            # torch: clamp_min_ then clamp_max_
            ref = np.where(v > hi, hi, v)                          # (NaN compares false: stays NaN)
        assert_bitwise_equal(stored(p.grad), ref.astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_value_bitwise_across_thread_counts(dtype):
    def run():
        rng = np.random.default_rng(3)
        g = SparseGrad(np.arange(0, 20_000, 2), rng.standard_normal((10_000, 50)).astype(dtype), 20_000)
        clip_grad_value_(Table((20_000, 50), dtype, g), 0.7)
        return g.values

    runs = at_thread_counts(run)
    assert_bitwise_equal(runs[0], runs[1])
    assert_bitwise_equal(runs[0], runs[2])
    assert np.abs(runs[0]).max() == dtype(0.7)


def test_value_in_place_only_stored_values(rng):
    params = make_params(rng, np.float32, scale=10.0)
    sp = params[0].grad
    values, indices = sp.values, sp.indices.copy()
    clip_grad_value_(params[0], 0.5)
    assert params[0].grad is sp and np.shares_memory(sp.values, values)
    assert_bitwise_equal(sp.indices, indices)
    assert np.abs(sp.values).max() == np.float32(0.5)


def test_docstring_examples():
    import doctest

    import cembed.optim.clip_grad as module

    failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert tried > 0 and failures == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_type", [0.001, 0.01])
def test_norm_overflowing_float64_is_infinite_as_in_torch(rng, dtype, norm_type):
    """A small norm_type: the sum of |x| ** p is finite but its (1 / p)-th power is beyond float64
    (review: OverflowError escaped). The norm is inf, as torch's; the coefficient 0 zeroes every
    gradient (torch's); error_if_nonfinite=True refuses with nothing changed."""
    torch = require_torch()
    params = make_params(rng, dtype)
    snap = snapshot(params)
    with pytest.raises(RuntimeError, match=r"non-finite \(inf\)"):
        clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True)
    assert_unchanged(params, snap)
    with pytest.raises(RuntimeError):
        torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, 1.0, norm_type, error_if_nonfinite=True)
    t_norm, t_grads = torch_clip(torch, params, torch.nn.utils.clip_grad_norm_, 1.0, norm_type)
    total = clip_grad_norm_(params, 1.0, norm_type)
    assert np.isinf(t_norm.numpy()) and np.isinf(total) and total.dtype == dtype
    for p, tg in zip(params, t_grads):
        if isinstance(p.grad, SparseGrad):
            np.testing.assert_array_equal(p.grad.values, tg[p.grad.indices])
            assert not p.grad.values.any()
        elif p.grad is not None:
            np.testing.assert_array_equal(p.grad, tg)
