"""Optimizers (issue 4): SGD, SparseAdam, Adagrad against torch, the NumPy reference and the vectors.

Gradients are multiples of 1/8, so sums of duplicates are exact and summation order cannot matter.
torch's float32 sqrt (AVX-512 build) is not correctly rounded while cembed's is, so SparseAdam and
Adagrad are compared with rtol 1e-6 (docs/behaviour.md §9); plain SGD on distinct rows is bitwise, so is SGD
on a dense gradient with every option, and Adagrad on a dense gradient given torch's ops with an exact sqrt.
"""
import itertools

import numpy as np
import pytest

import cembed
from cembed import SparseGrad, optim
from cembed import functional as F

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, require_torch, vector, zipf_indices

RTOL = dict(rtol=1e-6, atol=1e-6)


def dyadic(rng, shape):
    return (rng.integers(-16, 17, shape) / 8).astype(np.float32)


class Table:
    """The minimal parameter object the optimizers accept: .weight and .grad."""

    def __init__(self, weight):
        self.weight = weight
        self.grad = None


def make_batch(rng, n_rows, dim, n=12, distinct=False):
    idx = rng.permutation(n_rows)[:n] if distinct else rng.integers(0, n_rows, n)
    return idx, dyadic(rng, (idx.size, dim))


def run_pair(rng, make_ours, make_torch, n_steps=5, n_rows=40, dim=6, dense=False, distinct=False,
             empty_at=None):
    torch = require_torch()
    w0 = rng.standard_normal((n_rows, dim)).astype(np.float32)
    table = Table(w0.copy())
    tw = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ours, theirs = make_ours([table]), make_torch([tw])
    for step in range(n_steps):
        idx, g = make_batch(rng, n_rows, dim, distinct=distinct)
        if step == empty_at:
            idx, g = idx[:0], g[:0]
        if dense:
            table.grad = F.embedding_backward(g, idx, n_rows)
            tw.grad = torch.from_numpy(table.grad.copy())
        else:
            table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
            tw.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g), (n_rows, dim),
                                              check_invariants=True)
        ours.step()
        theirs.step()
        np.testing.assert_allclose(table.weight, tw.detach().numpy(), **RTOL)
    return table, tw, ours, theirs


# --------------------------------------------------------------------------- parity with torch

@pytest.mark.parametrize("lr,betas,eps,maximize", [
    (1e-3, (0.9, 0.999), 1e-8, False), (0.1, (0.8, 0.95), 1e-6, True), (0.05, (0.0, 0.5), 1e-3, False)])
def test_sparse_adam_trajectory(rng, lr, betas, eps, maximize):
    torch = require_torch()
    kw = dict(lr=lr, betas=betas, eps=eps, maximize=maximize)
    table, tw, ours, theirs = run_pair(rng, lambda p: optim.SparseAdam(p, **kw),
                                       lambda p: torch.optim.SparseAdam(p, **kw), empty_at=2)
    st = theirs.state[tw]
    assert ours.state[table]["step"] == st["step"] == 5
    np.testing.assert_allclose(ours.state[table]["exp_avg"], st["exp_avg"].numpy(), **RTOL)
    np.testing.assert_allclose(ours.state[table]["exp_avg_sq"], st["exp_avg_sq"].numpy(), **RTOL)


@pytest.mark.parametrize("dense,lr_decay,init_acc,eps,maximize,wd", [
    (dense, *opts) for dense in (False, True) for opts in [
        (0.0, 0.0, 1e-10, False, 0.0), (0.5, 0.25, 1e-10, True, 0.0), (0.1, 1.0, 1e-3, False, 0.0)]
] + [(True, 0.0, 0.1, 1e-10, False, 0.01)])  # weight_decay: dense only (sparse is refused, tested below)
def test_adagrad_trajectory(rng, dense, lr_decay, init_acc, eps, maximize, wd):
    torch = require_torch()
    kw = dict(lr=0.1, lr_decay=lr_decay, initial_accumulator_value=init_acc, eps=eps, maximize=maximize,
              weight_decay=wd)
    table, tw, ours, theirs = run_pair(rng, lambda p: optim.Adagrad(p, **kw),
                                       lambda p: torch.optim.Adagrad(p, **kw), dense=dense)
    st = theirs.state[tw]
    assert ours.state[table]["step"] == np.float32(st["step"].item())
    assert ours.state[table]["step"].dtype == np.float32
    np.testing.assert_allclose(ours.state[table]["sum"], st["sum"].numpy(), **RTOL)


SGD_OPTIONS = [dict(momentum=m, dampening=d, nesterov=n, maximize=x)
               for m, d, n, x in itertools.product([0.0, 0.9], [0.0, 0.5], [False, True], [False, True])
               if not (n and (m == 0 or d != 0))]


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dense", [False, True])
def test_sgd_trajectory(rng, options, dense):
    torch = require_torch()
    kw = dict(lr=0.1, **options)
    run_pair(rng, lambda p: optim.SGD(p, **kw), lambda p: torch.optim.SGD(p, **kw), dense=dense, n_steps=6)


def test_sgd_dense_weight_decay(rng):
    torch = require_torch()
    kw = dict(lr=0.1, momentum=0.5, weight_decay=0.01)
    run_pair(rng, lambda p: optim.SGD(p, **kw), lambda p: torch.optim.SGD(p, **kw), dense=True)


DENSE_SGD_OPTIONS = SGD_OPTIONS + [dict(momentum=0.5, weight_decay=0.01), dict(weight_decay=0.1, maximize=True),
                                   dict(momentum=0.9, nesterov=True, weight_decay=0.05)]


@pytest.mark.parametrize("options", DENSE_SGD_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_dense_gradient_is_torch_bitwise(rng, options, dtype):
    """A dense gradient steps exactly as torch's single-tensor SGD: every ``add(…, alpha=)`` one fused
    multiply-add, as torch's CPU kernels compute it. Full-precision gradients, where a product rounded
    on its own differs from torch in ~9% of the elements (as the dense path once did)."""
    torch = require_torch()
    kw = dict(lr=0.1, **options)
    w0 = rng.standard_normal((37, 11)).astype(dtype)
    table, tw = Table(w0.copy()), torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ours, theirs = optim.SGD([table], **kw), torch.optim.SGD([tw], **kw)
    for _ in range(4):
        g = rng.standard_normal(w0.shape).astype(dtype)
        table.grad, tw.grad = g.copy(), torch.from_numpy(g.copy())
        ours.step()
        theirs.step()
        assert_bitwise_equal(table.weight, tw.detach().numpy())
        if options.get("momentum"):
            assert_bitwise_equal(ours.state[table]["momentum_buffer"], theirs.state[tw]["momentum_buffer"].numpy())


@pytest.mark.parametrize("name", ["SGD", "Adagrad"])
def test_dense_steps_are_thread_count_independent(rng, name):
    """The dense steps' element-wise fused multiply-adds split a table into blocks over threads: the same
    bits for 1, 2 and 3 threads (a table large enough to use them)."""
    w0 = rng.standard_normal((3000, 70)).astype(np.float32)
    grads = [rng.standard_normal(w0.shape).astype(np.float32) for _ in range(3)]
    kw = dict(lr=0.1, weight_decay=0.01) | (dict(momentum=0.9, nesterov=True) if name == "SGD" else {})

    def run():
        table = Table(w0.copy())
        opt = getattr(optim, name)([table], **kw)
        for g in grads:
            table.grad = g.copy()
            opt.step()
        return table.weight

    first, *others = at_thread_counts(run)
    for other in others:
        assert_bitwise_equal(first, other)


def torch_adagrad_with_exact_sqrt(torch, w, s, grad, step, lr, lr_decay, eps, wd, maximize):
    """torch's single-tensor Adagrad step (torch/optim/adagrad.py), op by op with torch's own kernels,
    except the square root: NumPy's, correctly rounded (torch's is not: docs/behaviour.md §9)."""
    g = -grad if maximize else grad
    if wd:
        g = g.add(w, alpha=wd)
    clr = lr / (1 + (step - 1) * lr_decay)
    s.addcmul_(g, g, value=1)
    std = torch.from_numpy(np.sqrt(s.numpy())).add_(eps)
    w.addcdiv_(g, std, value=-clr)


@pytest.mark.parametrize("lr_decay,init_acc,eps,maximize,wd", [
    (0.0, 0.0, 1e-10, False, 0.0), (0.5, 0.25, 1e-10, True, 0.0), (0.1, 1.0, 1e-3, False, 0.01),
    (0.0, 0.1, 1e-10, True, 0.2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adagrad_dense_gradient_is_torch_op_for_op(rng, lr_decay, init_acc, eps, maximize, wd, dtype):
    """A dense gradient steps as torch's single-tensor Adagrad, bitwise, given the same square roots:
    the fused multiply-adds of ``add(…, alpha=)`` and ``addcmul_``, and ``addcdiv_``'s order."""
    torch = require_torch()
    kw = dict(lr=0.1, lr_decay=lr_decay, initial_accumulator_value=init_acc, eps=eps, maximize=maximize,
              weight_decay=wd)
    w0 = rng.standard_normal((37, 11)).astype(dtype)
    table = Table(w0.copy())
    ours = optim.Adagrad([table], **kw)
    tw, ts = torch.from_numpy(w0.copy()), torch.full(w0.shape, init_acc, dtype=torch.from_numpy(w0).dtype)
    for step in range(1, 5):
        g = rng.standard_normal(w0.shape).astype(dtype)
        table.grad = g.copy()
        ours.step()
        torch_adagrad_with_exact_sqrt(torch, tw, ts, torch.from_numpy(g.copy()), step, 0.1, lr_decay, eps, wd, maximize)
        assert_bitwise_equal(ours.state[table]["sum"], ts.numpy())
        assert_bitwise_equal(table.weight, tw.numpy())


def test_sgd_plain_distinct_rows_bitwise(rng):
    torch = require_torch()
    table, tw, _, _ = run_pair(rng, lambda p: optim.SGD(p, lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1),
                               distinct=True)
    assert_bitwise_equal(table.weight, tw.detach().numpy())


def test_sgd_momentum_rows_keep_moving(rng):
    """torch's sparse momentum equals dense momentum: a row touched once keeps moving afterwards."""
    table = Table(np.zeros((5, 2), np.float32))
    opt = optim.SGD([table], lr=1.0, momentum=0.5)
    table.grad = SparseGrad([1], np.ones((1, 2), np.float32), 5)
    opt.step()
    np.testing.assert_array_equal(table.weight[1], [-1, -1])
    table.grad = SparseGrad([3], np.ones((1, 2), np.float32), 5)
    opt.step()
    np.testing.assert_array_equal(table.weight[1], [-1.5, -1.5])  # moved with buf = 0.5
    np.testing.assert_array_equal(table.weight[3], [-1, -1])
    assert not table.weight[[0, 2, 4]].any()
    np.testing.assert_array_equal(opt.state[table]["active_rows"], [1, 3])


# --------------------------------------------------------------------------- NumPy reference

def test_sparse_adam_reference_and_lazy_rows(rng):
    n_rows, dim = 50, 4
    table = Table(rng.standard_normal((n_rows, dim)).astype(np.float32))
    w, m, v = table.weight.copy(), np.zeros((n_rows, dim), np.float32), np.zeros((n_rows, dim), np.float32)
    opt = optim.SparseAdam([table], lr=0.05, betas=(0.8, 0.9), eps=1e-6)
    for step in range(1, 6):
        idx, g = make_batch(rng, n_rows, dim, n=8)
        table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
        before = table.weight.copy()
        state_before = {k: opt.state[table][k].copy() for k in ("exp_avg", "exp_avg_sq")} if step > 1 else None
        opt.step()
        ref.sparse_adam_step(w, m, v, step, table.grad.indices, table.grad.values, lr=0.05, betas=(0.8, 0.9),
                             eps=1e-6)
        assert_bitwise_equal(table.weight, w)
        assert_bitwise_equal(opt.state[table]["exp_avg"], m)
        assert_bitwise_equal(opt.state[table]["exp_avg_sq"], v)
        untouched = np.setdiff1d(np.arange(n_rows), idx)
        assert_bitwise_equal(table.weight[untouched], before[untouched])
        if state_before:
            for k in state_before:
                assert_bitwise_equal(opt.state[table][k][untouched], state_before[k][untouched])


def test_adagrad_reference(rng):
    n_rows, dim = 30, 3
    table = Table(rng.standard_normal((n_rows, dim)).astype(np.float32))
    w, h = table.weight.copy(), np.full((n_rows, dim), 0.5, np.float32)
    opt = optim.Adagrad([table], lr=0.2, lr_decay=0.25, initial_accumulator_value=0.5)
    for step in range(1, 5):
        idx, g = make_batch(rng, n_rows, dim)
        table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
        opt.step()
        ref.adagrad_step(w, h, step, table.grad.indices, table.grad.values, lr=0.2, lr_decay=0.25)
        assert_bitwise_equal(opt.state[table]["sum"], h)
        np.testing.assert_allclose(table.weight, w, rtol=1e-6, atol=1e-7)


def test_sgd_reference_momentum(rng):
    n_rows, dim = 20, 3
    table = Table(rng.standard_normal((n_rows, dim)).astype(np.float32))
    w, buf = table.weight.astype(np.float64), None
    opt = optim.SGD([table], lr=0.1, momentum=0.9, dampening=0.25)
    for step in range(5):
        idx, g = make_batch(rng, n_rows, dim)
        table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
        opt.step()
        buf = ref.sgd_dense_momentum_step(w, buf, table.grad.to_dense().astype(np.float64), 0.1, 0.9, 0.25,
                                          first=step == 0)
        np.testing.assert_allclose(table.weight, w, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- torch vectors

def _vector_steps(v):
    inp = v["inputs"]
    if "steps" in inp:
        return inp["steps"]
    return [{"grad_indices": inp["grad_indices"], "grad_values": inp["grad_values"]}]


@pytest.mark.parametrize("name", ["sgd_sparse_plain", "sgd_sparse_momentum", "sparse_adam_3steps",
                                  "sparse_adam_maximize", "adagrad_sparse_3steps"])
def test_torch_vectors(name):
    v = vector(name)
    inp = v["inputs"]
    table = Table(np.asarray(inp["weight"], dtype=np.float32))
    n_rows = table.weight.shape[0]
    if name.startswith("sgd"):
        opt = optim.SGD([table], lr=inp["lr"], momentum=inp.get("momentum", 0.0),
                        dampening=inp.get("dampening", 0.0))
    elif name.startswith("sparse_adam"):
        opt = optim.SparseAdam([table], lr=inp["lr"], betas=tuple(inp.get("betas", (0.9, 0.999))),
                               eps=inp.get("eps", 1e-8), maximize=inp.get("maximize", False))
    else:
        opt = optim.Adagrad([table], lr=inp["lr"], lr_decay=inp["lr_decay"],
                            initial_accumulator_value=inp["initial_accumulator_value"], eps=inp["eps"])
    exp = v["expected"]
    state_keys = {"sparse_adam_3steps": ("exp_avg", "exp_avg_sq", "step"), "adagrad_sparse_3steps": ("sum", "step")}
    for k, step in enumerate(_vector_steps(v)):
        table.grad = F.coalesce(step["grad_indices"], np.asarray(step["grad_values"], np.float32), n_rows)
        opt.step()
        if "after_each_step" in exp:
            after = exp["after_each_step"][k]
            np.testing.assert_allclose(table.weight, after["weight"], rtol=1e-6)
            for key in state_keys[name]:   # every vector with per-step state must carry all of it
                if key == "step":
                    assert opt.state[table]["step"] == after["step"]
                else:
                    np.testing.assert_allclose(opt.state[table][key], after[key], rtol=1e-6)
        elif "weight_after_each_step" in exp:
            np.testing.assert_allclose(table.weight, exp["weight_after_each_step"][k], rtol=1e-6)
    assert set(exp) & {"after_each_step", "weight_after_each_step", "weight_after"}, name
    if "weight_after" in exp:
        np.testing.assert_allclose(table.weight, exp["weight_after"], rtol=1e-6)


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("make,match", [
    (lambda p: optim.SparseAdam(p, lr=0.0), "learning rate"),
    (lambda p: optim.SparseAdam(p, eps=0.0), "epsilon"),
    (lambda p: optim.SparseAdam(p, betas=(1.0, 0.9)), "beta parameter at index 0"),
    (lambda p: optim.SparseAdam(p, betas=(0.9, -0.1)), "beta parameter at index 1"),
    (lambda p: optim.Adagrad(p, lr=-1), "learning rate"),
    (lambda p: optim.Adagrad(p, lr_decay=-1), "lr_decay"),
    (lambda p: optim.Adagrad(p, initial_accumulator_value=-1), "initial_accumulator_value"),
    (lambda p: optim.Adagrad(p, eps=-1), "eps"),
    (lambda p: optim.SGD(p, lr=-0.1), "learning rate"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=-0.1), "momentum"),
    (lambda p: optim.SGD(p, lr=0.1, weight_decay=-0.1), "weight_decay"),
    (lambda p: optim.SGD(p, lr=0.1, nesterov=True), "Nesterov"),
    (lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "Nesterov"),
    (lambda p: optim.SGD(p, lr=float("nan")), "nan"),
])
def test_bad_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make([Table(np.zeros((3, 2), np.float32))])


@pytest.mark.parametrize("groups", [[{"momentum": 0.0}], [{"dampening": 0.5}],
                                    [{"momentum": 0.0}, {"momentum": 0.5, "dampening": 0.3}]])
def test_sgd_groups_under_nesterov_defaults_train_as_torchs(groups):
    """torch checks the nesterov rule (momentum > 0, dampening 0) on the constructor's defaults only: a
    group of plain SGD (momentum 0) or with a dampening beside nesterov defaults trains. cembed refused
    them (found by a differential fuzz against torch); now bitwise torch's, and the defaults are still
    checked."""
    torch = require_torch()
    rng = np.random.default_rng(0)
    start = [rng.standard_normal((6, 3)).astype(np.float32) for _ in groups]
    tables = [Table(w.copy()) for w in start]
    opt = optim.SGD([dict(g, params=[t]) for g, t in zip(groups, tables)], lr=0.1, momentum=0.9, nesterov=True)
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in start]
    topt = torch.optim.SGD([dict(g, params=[p]) for g, p in zip(groups, params)], lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(4):
        for table, param in zip(tables, params):
            grad = rng.standard_normal((6, 3)).astype(np.float32)
            table.grad, param.grad = grad.copy(), torch.from_numpy(grad.copy())
        opt.step()
        topt.step()
    for table, param in zip(tables, params):
        np.testing.assert_array_equal(table.weight, param.detach().numpy())
    opt.param_groups[0]["momentum"] = 0.0   # edited later: taken too
    opt.step()


def test_bad_params():
    with pytest.raises(ValueError, match="empty"):
        optim.SGD([], lr=0.1)
    with pytest.raises(TypeError, match=".weight and .grad"):
        optim.SGD([object()], lr=0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        optim.SGD([Table(np.zeros((3, 2), np.int32))], lr=0.1)
    with pytest.raises(TypeError, match="real number"):
        optim.SGD([Table(np.zeros((3, 2), np.float32))], lr="0.1")


def _snapshot(tables, opt):
    return [t.weight.copy() for t in tables], opt.state_dict()


def _assert_unchanged(tables, opt, snap):
    weights, sd = snap
    for t, w in zip(tables, weights):
        assert_bitwise_equal(t.weight, w)
    now = opt.state_dict()["state"]
    assert now.keys() == sd["state"].keys()
    for i in now:
        assert now[i].keys() == sd["state"][i].keys()
        for k in now[i]:
            if isinstance(now[i][k], np.ndarray):
                assert_bitwise_equal(now[i][k], sd["state"][i][k])
            else:
                assert now[i][k] == sd["state"][i][k]


def test_refusals_change_nothing(rng):
    """A refused step changes no weight and no state, for any parameter (torch bumps Adagrad's step
    before refusing weight_decay; cembed does not)."""
    tables = [Table(rng.standard_normal((10, 3)).astype(np.float32)) for _ in range(2)]
    good = SparseGrad([1, 4], dyadic(rng, (2, 3)), 10)
    # SparseAdam given a dense gradient on the second parameter
    opt = optim.SparseAdam(tables, lr=0.1)
    tables[0].grad, tables[1].grad = good, good
    opt.step()
    tables[1].grad = np.ones((10, 3), np.float32)
    snap = _snapshot(tables, opt)
    with pytest.raises(TypeError, match="dense gradients"):
        opt.step()
    _assert_unchanged(tables, opt, snap)
    # Adagrad / SGD with weight_decay and a sparse gradient
    for make in (lambda p: optim.Adagrad(p, weight_decay=0.1), lambda p: optim.SGD(p, lr=0.1, weight_decay=0.1)):
        tables[0].grad, tables[1].grad = np.ones((10, 3), np.float32), good
        opt = make(tables)
        snap = _snapshot(tables, opt)
        with pytest.raises(ValueError, match="weight_decay"):
            opt.step()
        _assert_unchanged(tables, opt, snap)
    # wrong dtype / shape of a gradient
    opt = optim.Adagrad(tables)
    for grad, exc in [(np.ones((10, 3), np.float64), TypeError), (np.ones((9, 3), np.float32), ValueError),
                      (SparseGrad([1], np.ones((1, 4), np.float32), 10), ValueError), ([1, 2], TypeError)]:
        tables[0].grad, tables[1].grad = good, grad
        snap = _snapshot(tables, opt)
        with pytest.raises(exc):
            opt.step()
        _assert_unchanged(tables, opt, snap)
    # a read-only weight
    tables[1].weight.flags.writeable = False
    tables[1].grad = good
    snap = _snapshot(tables, opt)
    with pytest.raises(ValueError, match="read-only"):
        opt.step()
    _assert_unchanged(tables, opt, snap)


def test_empty_gradient_advances_adam_step_only(rng):
    table = Table(rng.standard_normal((6, 2)).astype(np.float32))
    w = table.weight.copy()
    opt = optim.SparseAdam([table])
    table.grad = SparseGrad(np.zeros(0, np.int64), np.zeros((0, 2), np.float32), 6)
    opt.step()
    opt.step()
    assert opt.state[table]["step"] == 2
    assert_bitwise_equal(table.weight, w)
    assert not opt.state[table]["exp_avg"].any()


def test_zero_grad_and_skip_none():
    table = Table(np.ones((4, 2), np.float32))
    opt = optim.SGD([table], lr=0.1)
    opt.step()  # no gradient: nothing happens
    assert_bitwise_equal(table.weight, np.ones((4, 2), np.float32))
    table.grad = SparseGrad([0], np.ones((1, 2), np.float32), 4)
    opt.zero_grad()
    assert table.grad is None


# --------------------------------------------------------------------------- state round trip

@pytest.mark.parametrize("make", [
    lambda p: optim.SparseAdam(p, lr=0.05),
    lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.1),
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
], ids=["SparseAdam", "Adagrad", "SGD"])
@pytest.mark.parametrize("via_file", [False, True])
def test_state_round_trip_resumes_bitwise(rng, tmp_path, make, via_file):
    n_rows, dim = 64, 5
    w0 = rng.standard_normal((n_rows, dim)).astype(np.float32)
    batches = [make_batch(rng, n_rows, dim, n=20) for _ in range(6)]

    def train(table, opt, part):
        for idx, g in part:
            table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
            opt.step()

    straight = Table(w0.copy())
    opt = make([straight])
    train(straight, opt, batches)

    first = Table(w0.copy())
    opt1 = make([first])
    train(first, opt1, batches[:3])
    if via_file:
        path = tmp_path / "opt.npz"
        opt1.save(path)
        saved_weight = first.weight.copy()
        train(first, opt1, batches[3:4])  # the saved state must not follow later steps
        resumed = Table(saved_weight)
        opt2 = make([resumed])
        opt2.load(path)
    else:
        sd = opt1.state_dict()
        resumed = Table(first.weight.copy())
        opt2 = make([resumed])
        opt2.load_state_dict(sd)
        train(first, opt1, batches[3:4])  # deep copy: later steps of opt1 do not leak into sd
    train(resumed, opt2, batches[3:])
    assert_bitwise_equal(resumed.weight, straight.weight)


def test_load_state_dict_checks():
    table = Table(np.zeros((4, 2), np.float32))
    opt = optim.Adagrad([table])
    sd = opt.state_dict()
    sd["state"][0]["sum"] = np.zeros((3, 2), np.float32)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(sd)
    assert_bitwise_equal(opt.state[table]["sum"], before["state"][0]["sum"])
    with pytest.raises(ValueError, match="doesn.t match the size of optimizer.s group"):
        optim.Adagrad([table, Table(np.zeros((4, 2), np.float32))]).load_state_dict(before)
    with pytest.raises(ValueError):
        opt.load_state_dict({"nope": 1})


# --------------------------------------------------------------------------- threads

@pytest.mark.parametrize("make", [
    lambda p: optim.SparseAdam(p, lr=0.01),
    lambda p: optim.Adagrad(p, lr=0.1),
    lambda p: optim.SGD(p, lr=0.1),
    lambda p: optim.SGD(p, lr=0.1, momentum=0.9),
], ids=["SparseAdam", "Adagrad", "SGD", "SGD-momentum"])
def test_thread_count_bitwise(rng, make):
    n_rows, dim = 100_000, 16
    w0 = rng.standard_normal((n_rows, dim)).astype(np.float32)
    batches = []
    for _ in range(3):
        idx = zipf_indices(rng, 30_000, n_rows)
        batches.append(F.embedding_backward(rng.standard_normal((idx.size, dim)).astype(np.float32), idx,
                                            n_rows, sparse=True))

    def run():
        table = Table(w0.copy())
        opt = make([table])
        for grad in batches:
            table.grad = grad
            opt.step()
        return table.weight

    results = at_thread_counts(run)
    for other in results[1:]:
        assert_bitwise_equal(results[0], other)


def test_modules_and_float64(rng):
    """Real Embedding modules, float64 tables, two parameters in one optimizer."""
    torch = require_torch()
    a = cembed.Embedding(30, 4, sparse=True, dtype=np.float64, seed=1)
    b = cembed.Embedding(20, 4, sparse=True, dtype=np.float64, seed=2)
    ta = torch.nn.Embedding.from_pretrained(torch.from_numpy(a.weight.copy()), freeze=False, sparse=True)
    tb = torch.nn.Embedding.from_pretrained(torch.from_numpy(b.weight.copy()), freeze=False, sparse=True)
    opt = optim.SparseAdam([a, b], lr=0.01)
    topt = torch.optim.SparseAdam(list(ta.parameters()) + list(tb.parameters()), lr=0.01)
    for _ in range(3):
        ia, ib = rng.integers(0, 30, 9), rng.integers(0, 20, 9)
        ga, gb = rng.standard_normal((9, 4)), rng.standard_normal((9, 4))
        a(ia)
        b(ib)
        a.backward(ga)
        b.backward(gb)
        ta(torch.from_numpy(ia)).backward(torch.from_numpy(ga))
        tb(torch.from_numpy(ib)).backward(torch.from_numpy(gb))
        opt.step()
        topt.step()
        opt.zero_grad()
        topt.zero_grad()
    np.testing.assert_allclose(a.weight, ta.weight.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(b.weight, tb.weight.detach().numpy(), rtol=1e-12)
