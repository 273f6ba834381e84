"""Fused backward + update and RowWiseAdagrad (issue 11).

``module.backward(g, ..., optimizer=opt)`` must be bitwise equal to
``module.backward(g, ...); opt.step(); opt.zero_grad()`` for every optimizer, option, module type and
thread count; RowWiseAdagrad follows FBGEMM's EXACT_ROWWISE_ADAGRAD rule (NumPy reference)."""
import itertools

import numpy as np
import pytest

import cembed
from cembed import SparseGrad, optim

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, backward_and_step, zipf_indices

OPTIMIZERS = {
    "sgd": lambda p: optim.SGD(p, lr=0.1),
    "sgd_maximize": lambda p: optim.SGD(p, lr=0.1, maximize=True),
    "sgd_momentum": lambda p: optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.1),
    "sgd_nesterov": lambda p: optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True),
    "sparse_adam": lambda p: optim.SparseAdam(p, lr=0.01),
    "sparse_adam_max": lambda p: optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.9), eps=1e-6, maximize=True),
    "adagrad": lambda p: optim.Adagrad(p, lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
    "rowwise": lambda p: optim.RowWiseAdagrad(p, lr=0.1),
    "rowwise_l2": lambda p: optim.RowWiseAdagrad(p, lr=0.1, weight_decay=0.01, initial_accumulator_value=0.5),
    "rowwise_decoupled": lambda p: optim.RowWiseAdagrad(p, lr=0.1, weight_decay=0.05, weight_decay_mode="decoupled",
                                                        maximize=True),
}
MODULES = {
    "embedding": dict(kind="emb"),
    "embedding_sgbf_pad": dict(kind="emb", scale_grad_by_freq=True, padding_idx=2),
    "embedding_max_norm": dict(kind="emb", max_norm=1.5),
    "embedding_psw": dict(kind="emb", psw=True),
    "bag_sum_psw": dict(kind="bag", mode="sum", psw=True),
    "bag_mean_pad": dict(kind="bag", mode="mean", padding_idx=3),
    "bag_max": dict(kind="bag", mode="max"),
}


def _make_module(spec, weight, sparse):
    options = {k: v for k, v in spec.items() if k not in ("kind", "psw")}
    if spec["kind"] == "emb":
        return cembed.Embedding.from_pretrained(weight, freeze=False, sparse=sparse, **options)
    if spec.get("mode") == "max":
        sparse = False
    return cembed.EmbeddingBag.from_pretrained(weight, freeze=False, sparse=sparse, **options)


def _run(spec, make_opt, sparse, fused, seed=0, n_rows=300, dim=12, steps=4):
    rng = np.random.default_rng(seed)
    module = _make_module(spec, rng.standard_normal((n_rows, dim)).astype(np.float32), sparse)
    opt = make_opt([module])
    for _ in range(steps):
        idx = zipf_indices(rng, 64, n_rows).reshape(16, 4)
        if spec["kind"] == "emb":
            psw = rng.standard_normal(idx.shape).astype(np.float32) if spec.get("psw") else None
            module(idx)
            g = rng.standard_normal((16,) if psw is not None else (16, 4))
            g = rng.standard_normal(g.shape + (dim,)).astype(np.float32)
            if fused:
                module.backward(g, per_sample_weights=psw, optimizer=opt)
            else:
                module.backward(g, per_sample_weights=psw)
        else:
            psw = rng.standard_normal(idx.shape).astype(np.float32) if spec.get("psw") else None
            module(idx, per_sample_weights=psw)
            g = rng.standard_normal((16, dim)).astype(np.float32)
            if fused:
                module.backward(g, optimizer=opt)
            else:
                module.backward(g)
        if not fused:
            opt.step()
            opt.zero_grad()
        assert module.grad is None
    return module.weight, opt.state_dict()


def _assert_same_state(a, b):
    assert a["state"].keys() == b["state"].keys()
    for i in a["state"]:
        assert a["state"][i].keys() == b["state"][i].keys()
        for k in a["state"][i]:
            x, y = a["state"][i][k], b["state"][i][k]
            if isinstance(x, np.ndarray):
                assert_bitwise_equal(x, y)
            else:
                assert x == y


COMBINATIONS = [(m, o, s) for m, o, s in itertools.product(MODULES, OPTIMIZERS, (True, False))
                # SparseAdam needs sparse gradients (its refusal is tested below); max bags are dense
                if not (o.startswith("sparse_adam") and (not s or MODULES[m].get("mode") == "max"))]


@pytest.mark.parametrize("module_name,opt_name,sparse", COMBINATIONS)
def test_fused_equals_unfused_bitwise(module_name, opt_name, sparse):
    spec = MODULES[module_name]
    make = OPTIMIZERS[opt_name]
    w_unfused, s_unfused = _run(spec, make, sparse, fused=False)
    w_fused, s_fused = _run(spec, make, sparse, fused=True)
    assert_bitwise_equal(w_fused, w_unfused)
    _assert_same_state(s_fused, s_unfused)


@pytest.mark.parametrize("opt_name", ["sparse_adam", "adagrad", "rowwise_l2", "sgd", "sgd_momentum"])
def test_fused_thread_count_bitwise(opt_name):
    def run():
        return _run(MODULES["bag_sum_psw"], OPTIMIZERS[opt_name], True, fused=True, n_rows=20000, dim=40,
                    steps=3)[0].copy()

    results = at_thread_counts(run)
    for r in results[1:]:
        assert_bitwise_equal(results[0], r)


def test_fused_path_never_materialises_the_gradient(monkeypatch):
    """Row-independent optimizers on sparse modules take the chunked route."""
    from cembed import functional

    def refuse(self, num_rows):
        raise AssertionError("the fused path built the whole coalesced gradient")

    monkeypatch.setattr(functional.RowContributions, "sparse", refuse)
    for make in (OPTIMIZERS["sparse_adam"], OPTIMIZERS["rowwise_l2"], OPTIMIZERS["adagrad"], OPTIMIZERS["sgd"]):
        emb = cembed.Embedding(30, 4, sparse=True, seed=0)
        opt = make([emb])
        emb(np.array([[1, 2], [2, 5]]))
        emb.backward(np.ones((2, 2, 4), np.float32), optimizer=opt)
        assert emb.grad is None


def test_fused_large_batch_crosses_chunks():
    """More distinct rows than one cache-sized chunk: still bitwise equal."""
    rng = np.random.default_rng(3)
    n_rows, dim = 200_000, 64
    w0 = rng.standard_normal((n_rows, dim)).astype(np.float32)
    idx = rng.integers(0, n_rows, 60_000)
    g = rng.standard_normal((idx.size, dim)).astype(np.float32)
    out = []
    for fused in (False, True):
        emb = cembed.Embedding.from_pretrained(w0.copy(), freeze=False, sparse=True)
        opt = optim.SparseAdam([emb], lr=0.01)
        emb(idx)
        backward_and_step(emb, g, opt, fused)
        out.append(emb.weight)
    assert_bitwise_equal(out[0], out[1])


@pytest.mark.parametrize("dtype,dim", [(np.float32, 600), (np.float64, 300), (np.float32, 5000)])
@pytest.mark.parametrize("opt_name", ["sparse_adam", "adagrad", "rowwise_l2"])
def test_fused_wide_rows_use_shorter_chunks(dtype, dim, opt_name):
    """Rows so wide that a chunk of 64 summed rows would pass 64 kB are updated in shorter chunks
    (_grad.segment_update): still bitwise the unfused step, for 1, 2 and 3 threads."""
    rng = np.random.default_rng(dim)
    n_rows = 3000
    w0 = rng.standard_normal((n_rows, dim)).astype(dtype)
    idx = zipf_indices(rng, 1500, n_rows)
    g = rng.standard_normal((idx.size, dim)).astype(dtype)

    def step(fused):
        emb = cembed.Embedding.from_pretrained(w0.copy(), freeze=False, sparse=True)
        opt = OPTIMIZERS[opt_name]([emb])
        emb(idx)
        backward_and_step(emb, g, opt, fused)
        return emb.weight.copy()

    want = step(False)
    for got in at_thread_counts(lambda: step(True)):
        assert_bitwise_equal(got, want)


def test_fused_advances_only_that_module():
    rng = np.random.default_rng(0)
    a = cembed.Embedding(50, 4, sparse=True, seed=1)
    b = cembed.Embedding(50, 4, sparse=True, seed=2)
    opt = optim.SparseAdam([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])
    b_before = b.weight.copy()
    a(np.array([1, 2]))
    a.backward(np.ones((2, 4), np.float32), optimizer=opt)
    assert opt.state[a]["step"] == 1 and b not in opt.state
    assert_bitwise_equal(b.weight, b_before)
    # the group's options are used (lr 0.1 for a): same as an unfused step on a alone
    c = cembed.Embedding(50, 4, sparse=True, seed=1)
    ref_opt = optim.SparseAdam([c], lr=0.1)
    c(np.array([1, 2]))
    c.backward(np.ones((2, 4), np.float32))
    ref_opt.step()
    assert_bitwise_equal(a.weight, c.weight)
    del rng


def test_fused_refusals_change_nothing():
    emb = cembed.Embedding(20, 3, sparse=True, seed=0)
    other = cembed.Embedding(20, 3, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.1)
    before = emb.weight.copy()
    emb(np.array([1, 2]))
    emb.grad = SparseGrad([1], np.ones((1, 3), np.float32), 20)
    with pytest.raises(ValueError, match="needs .grad to be None"):
        emb.backward(np.ones((2, 3), np.float32), optimizer=opt)
    emb.zero_grad()
    with pytest.raises(ValueError, match="does not hold"):
        other(np.array([1]))
        other.backward(np.ones((1, 3), np.float32), optimizer=opt)
    with pytest.raises(TypeError, match="optimizer"):
        emb.backward(np.ones((2, 3), np.float32), optimizer="adam")
    with pytest.raises(ValueError, match="shape"):
        emb.backward(np.ones((3, 3), np.float32), optimizer=opt)
    dense = cembed.Embedding(20, 3, seed=0)
    dense_opt = optim.SparseAdam([dense], lr=0.1)
    dense(np.array([1, 2]))
    with pytest.raises(TypeError, match="dense gradients"):
        dense.backward(np.ones((2, 3), np.float32), optimizer=dense_opt)
    adagrad = optim.Adagrad([emb], weight_decay=0.1)
    emb(np.array([1, 2]))
    with pytest.raises(ValueError, match="weight_decay"):
        emb.backward(np.ones((2, 3), np.float32), optimizer=adagrad)
    assert_bitwise_equal(emb.weight, before)
    assert opt.state == {} and dense_opt.state == {} and emb.grad is None


def test_fused_frozen_module_does_nothing():
    emb = cembed.Embedding.from_pretrained(np.ones((5, 2), np.float32))
    opt = optim.SGD([cembed.Embedding(5, 2)], lr=0.1)
    emb(np.array([1]))
    emb.backward(np.ones((1, 2), np.float32), optimizer=opt)   # frozen: no gradient, no update
    np.testing.assert_array_equal(emb.weight, 1)


# --------------------------------------------------------------------------- RowWiseAdagrad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [
    dict(), dict(weight_decay=0.05), dict(weight_decay=0.05, weight_decay_mode="decoupled"),
    dict(maximize=True, eps=1e-3), dict(initial_accumulator_value=0.3, lr=0.5)])
@pytest.mark.parametrize("dim", [1, 7, 8, 20, 64])
def test_rowwise_adagrad_matches_reference(dtype, options, dim):
    rng = np.random.default_rng(dim)
    n_rows = 40
    w0 = rng.standard_normal((n_rows, dim)).astype(dtype)
    emb = cembed.Embedding.from_pretrained(w0.copy(), freeze=False, sparse=True)
    opt = optim.RowWiseAdagrad([emb], **options)
    weight = w0.copy()
    state = np.full(n_rows, options.get("initial_accumulator_value", 0.0), dtype=dtype)
    kw = {k: v for k, v in options.items() if k != "initial_accumulator_value"}
    for _ in range(4):
        idx = rng.integers(0, n_rows, 15)
        g = rng.standard_normal((15, dim)).astype(dtype)
        emb.grad = cembed.functional.coalesce(idx, g, n_rows)
        ref.rowwise_adagrad_step(weight, state, emb.grad.indices, emb.grad.values, **kw)
        opt.step()
        assert_bitwise_equal(emb.weight, weight)
        assert_bitwise_equal(opt.state[emb]["sum"], state)


def test_rowwise_adagrad_dense_gradient_updates_every_row():
    w0 = np.ones((6, 4), np.float32)
    emb = cembed.Embedding.from_pretrained(w0.copy(), freeze=False)
    opt = optim.RowWiseAdagrad([emb], lr=0.1, weight_decay=0.5, weight_decay_mode="decoupled")
    emb(np.array([1]))
    emb.backward(np.ones((1, 4), np.float32))
    opt.step()
    weight, state = w0.copy(), np.zeros(6, np.float32)
    ref.rowwise_adagrad_step(weight, state, np.arange(6), emb.grad, lr=0.1, weight_decay=0.5,
                             weight_decay_mode="decoupled")
    assert_bitwise_equal(emb.weight, weight)
    assert (emb.weight[0] < 1).all()   # untouched rows decay too, as a dense gradient says


def test_rowwise_adagrad_state_round_trip_and_checks(tmp_path):
    emb = cembed.Embedding(10, 3, sparse=True, seed=0)
    opt = optim.RowWiseAdagrad([emb], lr=0.1)
    emb(np.array([1, 4]))
    emb.backward(np.ones((2, 3), np.float32), optimizer=opt)
    opt.save(tmp_path / "o.npz")
    other = optim.RowWiseAdagrad([emb], lr=0.1)
    other.load(tmp_path / "o.npz")
    assert_bitwise_equal(other.state[emb]["sum"], opt.state[emb]["sum"])
    sd = opt.state_dict()
    sd["state"][0]["sum"] = np.zeros(9, np.float32)
    with pytest.raises(ValueError, match="one value per row"):
        other.load_state_dict(sd)
    sd["state"][0]["sum"] = np.full(10, -1, np.float32)
    with pytest.raises(ValueError, match=">= 0"):
        other.load_state_dict(sd)
    with pytest.raises(ValueError, match="weight_decay_mode"):
        optim.RowWiseAdagrad([emb], weight_decay_mode="l1")
    opt.state[emb]["sum"] = np.zeros(3, np.float32)   # a hostile edit between steps
    emb.grad = SparseGrad([1], np.ones((1, 3), np.float32), 10)
    with pytest.raises(ValueError, match="one value per row"):
        opt.step()


def test_rowwise_adagrad_any_layout_bitwise():
    rng = np.random.default_rng(5)
    big = rng.standard_normal((30, 16)).astype(np.float32)
    for view in (big[:, ::2], np.asfortranarray(big[:, :8]), big[:, 3:11]):
        a = cembed.Embedding.from_pretrained(np.ascontiguousarray(view), freeze=False, sparse=True)
        b = cembed.Embedding.from_pretrained(view, freeze=False, sparse=True)
        opts = [optim.RowWiseAdagrad([m], lr=0.2, weight_decay=0.1) for m in (a, b)]
        for _ in range(3):
            idx = rng.integers(0, 30, 9)
            g = rng.standard_normal((9, 8)).astype(np.float32)
            for m, o in zip((a, b), opts):
                m(idx)
                m.backward(g, optimizer=o)
        assert_bitwise_equal(np.ascontiguousarray(b.weight), a.weight)
        assert_bitwise_equal(opts[0].state[a]["sum"], opts[1].state[b]["sum"])


STATE_VIEWS = {"adagrad": (lambda p: optim.Adagrad(p, lr=0.1), "sum"),
               "sparse_adam": (lambda p: optim.SparseAdam(p, lr=0.1), "exp_avg"),
               "sparse_adamw": (lambda p: optim.SparseAdamW(p, lr=0.1), "exp_avg_sq"),
               "sgd_momentum": (lambda p: optim.SGD(p, lr=0.1, momentum=0.9), "momentum_buffer")}


@pytest.mark.parametrize("name", sorted(STATE_VIEWS))
@pytest.mark.parametrize("call", ["backward", "dot_logistic_backward"])
def test_gradient_rows_that_view_the_optimizer_state_are_read_as_they_were(name, call):
    """A grad_output (or query) that is a view of the optimizer's own state for this table: the fused
    update writes that state as it goes, so it read gradient rows it had already updated (fused and
    unfused differed, and so did thread counts). They are now read from a copy made before the update."""
    make, key = STATE_VIEWS[name]
    n_rows, dim = 4096, 8
    rows = np.arange(n_rows)[::-1].copy()                # row r's gradient is state row n_rows - 1 - r

    def run(fused):
        emb = cembed.Embedding(n_rows, dim, sparse=True, seed=0)
        opt = make([emb])
        emb.backward(np.random.default_rng(1).standard_normal((n_rows, dim)).astype(np.float32), np.arange(n_rows))
        opt.step()
        opt.zero_grad()
        view = opt.state[emb][key].view()
        kwargs = {"optimizer": opt} if fused else {}
        if call == "backward":
            emb.backward(view, rows, **kwargs)
            results = []
        else:
            results = [np.array(a) for a in emb.dot_logistic_backward(view, rows.reshape(-1, 1), 1, **kwargs)]
        if not fused:
            opt.step()
            opt.zero_grad()
        return [np.array(emb.weight), np.array(opt.state[emb][key])] + results

    unfused = run(False)
    for fused in at_thread_counts(lambda: run(True)):
        for a, b in zip(fused, unfused):
            assert_bitwise_equal(a, b)
