"""Scoring fused with the table's update (issue 11): ``Embedding.dot_logistic_backward`` and
``functional.embedding_dot_logistic_sgd_`` are bitwise ``embedding_dot_logistic`` followed by the fused
backward + update with ``per_sample_weights=grad_scores``, for every optimizer and thread count; a
NumPy reference of the SGD step; hostile inputs refused with nothing modified."""
import numpy as np
import pytest

import cembed
from cembed import functional as F

from util import assert_bitwise_equal, at_thread_counts, fingerprint, zipf_indices

OPTIMIZERS = {   # name: (class, options, takes the one-pass kernel)
    "sgd": (cembed.optim.SGD, dict(lr=0.05), True),
    "sgd_maximize": (cembed.optim.SGD, dict(lr=0.05, maximize=True), True),
    "adagrad": (cembed.optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1), True),
    "sparseadam": (cembed.optim.SparseAdam, dict(lr=0.01), True),
    "rowwise_adagrad": (cembed.optim.RowWiseAdagrad, dict(lr=0.1), True),
    "rowwise_adagrad_l2": (cembed.optim.RowWiseAdagrad, dict(lr=0.1, weight_decay=0.01), True),
    "rowwise_adagrad_decoupled": (cembed.optim.RowWiseAdagrad,
                                  dict(lr=0.1, weight_decay=0.01, weight_decay_mode="decoupled"), True),
    "sparseadam_row_bias": (cembed.optim.SparseAdam, dict(lr=0.01, bias_correction="row"), True),
    "sparseadamw": (cembed.optim.SparseAdamW, dict(lr=0.01), True),
    "sparseadamw_row_bias": (cembed.optim.SparseAdamW, dict(lr=0.01, weight_decay=0.1, bias_correction="row"), True),
    # no row rule: scored first, then the fused backward's other paths
    "sgd_momentum": (cembed.optim.SGD, dict(lr=0.05, momentum=0.9), False),
}


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls of the one-pass kernel (so a test knows which path it exercised)."""
    calls = []
    real = F._score.logistic_scores_update

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(F._score, "logistic_scores_update", spy)
    return calls


def batch(rng, n_rows, dim, n_queries, n_per, dtype, lead=None):
    shape = (n_queries, n_per) if lead is None else lead + (n_per,)
    idx = zipf_indices(rng, int(np.prod(shape)), n_rows).reshape(shape)
    query = (rng.standard_normal(idx.shape[:-1] + (dim,)) * 0.5).astype(dtype)
    return query, idx


def two_calls(module, opt, query, idx, n_positive=1, with_loss=True):
    """Today's step: the scores from the table as it is, then the table's (fused) backward."""
    if module.weight.dtype.itemsize >= 4:
        loss, g, dq = F.embedding_dot_logistic(query, idx, module.weight, n_positive, with_loss=with_loss)
    else:
        loss, g, dq = _half_scores(module, query, idx, n_positive, with_loss)
    module.backward(query, idx, per_sample_weights=g, optimizer=opt)
    return loss, g, dq


def _half_scores(module, query, idx, n_positive, with_loss):
    """A 16-bit table is scored through its rows widened to float32 (the trainer's way)."""
    rows = module(idx).reshape(-1, module.weight.shape[1])
    grid = np.arange(idx.size).reshape(idx.shape)
    return F.embedding_dot_logistic(query, grid, rows, n_positive, with_loss=with_loss)


def run(name, dtype, fused, steps=3, seed=0, n_rows=3000, dim=24, n_queries=1500, n_per=6, n_positive=1,
        with_loss=True, module_options=None, table_dtype=None):
    rng = np.random.default_rng(seed)
    cls, options, _ = OPTIMIZERS[name]
    init = (rng.standard_normal((n_rows, dim)) * 0.3).astype(dtype)
    if table_dtype is not None:
        init = init.astype(table_dtype)
    emb = cembed.Embedding.from_pretrained(init, freeze=False, sparse=True, **(module_options or {}))
    opt = cls([emb], **options)
    outs = []
    for _ in range(steps):
        query, idx = batch(rng, n_rows, dim, n_queries, n_per, np.float32 if table_dtype is not None else dtype)
        if fused:
            outs.append(emb.dot_logistic_backward(query, idx, n_positive, optimizer=opt, with_loss=with_loss))
        else:
            outs.append(two_calls(emb, opt, query, idx, n_positive, with_loss))
    return emb.weight.copy(), opt.state_dict(), outs


# ------------------------------------------------------------------------------ bitwise: the two calls

@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_equal_to_the_two_calls(kernel_calls, name, dtype):
    want = run(name, dtype, fused=False)
    assert not kernel_calls
    got = run(name, dtype, fused=True)
    assert len(kernel_calls) == (3 if OPTIMIZERS[name][2] else 0)   # the one-pass kernel when there is a row rule
    assert fingerprint(*got) == fingerprint(*want)
    assert_bitwise_equal(got[0], want[0])
    assert not np.array_equal(got[0], run(name, dtype, fused=True, steps=0)[0])   # the table did move


@pytest.mark.parametrize("name", ["sgd", "adagrad", "sparseadam", "rowwise_adagrad_l2", "sparseadamw"])
def test_bitwise_the_same_for_any_thread_count(name):
    results = at_thread_counts(lambda: fingerprint(*run(name, np.float32, fused=True, n_queries=3000)))
    assert results[0] == results[1] == results[2]
    assert results[0] == fingerprint(*run(name, np.float32, fused=False, n_queries=3000))


@pytest.mark.parametrize("n_positive", [0, 2, 5])
@pytest.mark.parametrize("with_loss", [True, False])
def test_positives_and_loss_switch(n_positive, with_loss):
    want = run("sgd", np.float32, fused=False, n_per=5, n_positive=n_positive, with_loss=with_loss)
    got = run("sgd", np.float32, fused=True, n_per=5, n_positive=n_positive, with_loss=with_loss)
    assert fingerprint(*got) == fingerprint(*want)
    if not with_loss:
        assert all(out[0] is None for out in got[2])
        with_loss_run = run("sgd", np.float32, fused=True, n_per=5, n_positive=n_positive)
        assert fingerprint(with_loss_run[0], [out[1:] for out in with_loss_run[2]]) == \
            fingerprint(got[0], [out[1:] for out in got[2]])


@pytest.mark.parametrize("module_options", [dict(padding_idx=0), dict(scale_grad_by_freq=True),
                                            dict(padding_idx=5, scale_grad_by_freq=True)])
@pytest.mark.parametrize("name", ["sgd", "sparseadam"])
def test_module_options(kernel_calls, name, module_options):
    want = run(name, np.float32, fused=False, module_options=module_options)
    got = run(name, np.float32, fused=True, module_options=module_options)
    assert kernel_calls and fingerprint(*got) == fingerprint(*want)
    if "padding_idx" in module_options:   # Zipf indices hit the low rows: the padding row was scored, not moved
        p = module_options["padding_idx"]
        start = run(name, np.float32, fused=True, steps=0, module_options=module_options)[0]
        assert_bitwise_equal(got[0][p], start[p])


@pytest.mark.parametrize("lead", [(4, 300), (1200,), ()])
def test_query_shapes(lead):
    def once(fused):
        emb = cembed.Embedding(500, 8, sparse=True, seed=1)
        opt = cembed.optim.SparseAdam([emb], lr=0.01)
        query, idx = batch(np.random.default_rng(3), 500, 8, 0, 4, np.float32, lead=lead)
        out = emb.dot_logistic_backward(query, idx, optimizer=opt) if fused else two_calls(emb, opt, query, idx)
        assert out[0].shape == lead and out[1].shape == idx.shape and out[2].shape == query.shape
        return fingerprint(emb.weight, opt.state_dict(), out)

    assert once(True) == once(False)


@pytest.mark.parametrize("table_dtype", [np.float16, "bfloat16"])
def test_16_bit_tables_take_todays_path(kernel_calls, table_dtype):
    if table_dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        table_dtype = ml_dtypes.bfloat16
    want = run("sparseadam", np.float32, fused=False, table_dtype=table_dtype)
    got = run("sparseadam", np.float32, fused=True, table_dtype=table_dtype)
    assert not kernel_calls and fingerprint(*got) == fingerprint(*want)


def test_table_not_in_kernel_layout(kernel_calls):
    """A Fortran-ordered table: rows copied out and back, as the optimizers do; same bits."""
    def once(fused):
        rng = np.random.default_rng(5)
        weight = np.asfortranarray(rng.standard_normal((400, 8)).astype(np.float32))
        emb = cembed.Embedding.from_pretrained(weight, freeze=False, sparse=True)
        opt = cembed.optim.SGD([emb], lr=0.1)
        query, idx = batch(rng, 400, 8, 300, 6, np.float32)
        out = emb.dot_logistic_backward(query, idx, optimizer=opt) if fused else two_calls(emb, opt, query, idx)
        return fingerprint(emb.weight, out)

    assert once(True) == once(False) and not kernel_calls


@pytest.mark.parametrize("sparse", [True, False])
def test_without_optimizer_the_gradient_goes_to_grad(sparse):
    def once(fused):
        rng = np.random.default_rng(6)
        emb = cembed.Embedding(600, 12, sparse=sparse, seed=2)
        query, idx = batch(rng, 600, 12, 400, 6, np.float32)
        if fused:
            out = emb.dot_logistic_backward(query, idx)
            out2 = emb.dot_logistic_backward(query, idx)     # accumulates, as backward does
        else:
            out = F.embedding_dot_logistic(query, idx, emb.weight)
            emb.backward(query, idx, per_sample_weights=out[1])
            out2 = F.embedding_dot_logistic(query, idx, emb.weight)
            emb.backward(query, idx, per_sample_weights=out2[1])
        return fingerprint(emb.weight, emb.grad, out, out2)

    assert once(True) == once(False)


def test_frozen_table_only_scores():
    rng = np.random.default_rng(7)
    weight = rng.standard_normal((100, 4)).astype(np.float32)
    emb = cembed.Embedding.from_pretrained(weight.copy())
    query, idx = batch(rng, 100, 4, 50, 3, np.float32)
    out = emb.dot_logistic_backward(query, idx)
    assert fingerprint(out) == fingerprint(F.embedding_dot_logistic(query, idx, weight))
    assert emb.grad is None and np.array_equal(emb.weight, weight)


@pytest.mark.parametrize("shape", [(0, 6), (5, 0)])
def test_empty_batches(shape):
    def once(fused):
        emb = cembed.Embedding(50, 4, sparse=True, seed=0)
        opt = cembed.optim.SGD([emb], lr=0.1)
        query = np.ones((shape[0], 4), np.float32)
        idx = np.zeros(shape, np.int64)
        out = emb.dot_logistic_backward(query, idx, 0, optimizer=opt) if fused \
            else two_calls(emb, opt, query, idx, n_positive=0)
        return fingerprint(emb.weight, out)

    assert once(True) == once(False)


# ------------------------------------------------------------------------------ the SGD functional

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_functional_equals_optimizer_sgd(dtype):
    rng = np.random.default_rng(8)
    weight = (rng.standard_normal((2000, 32)) * 0.3).astype(dtype)
    query, idx = batch(rng, 2000, 32, 2500, 6, dtype)
    w_fn = weight.copy()
    got = F.embedding_dot_logistic_sgd_(query, idx, w_fn, 0.025)
    emb = cembed.Embedding.from_pretrained(weight.copy(), freeze=False, sparse=True)
    want = two_calls(emb, cembed.optim.SGD([emb], lr=0.025), query, idx)
    assert fingerprint(w_fn, got) == fingerprint(emb.weight, want)
    w_f = np.asfortranarray(weight)                      # not in kernel layout: the same bits
    assert fingerprint(w_f, F.embedding_dot_logistic_sgd_(query, idx, w_f, 0.025)) == fingerprint(w_fn, got)


def reference_sgd(query, idx, weight, lr, n_positive=1):
    """NumPy, float64: the logistic loss and gradients from the old rows, then w[r] -= lr * sum_k g * q."""
    w = weight.astype(np.float64)
    q = query.astype(np.float64)
    rows = w[idx]                                              # (B, K, D)
    s = np.einsum("bkd,bd->bk", rows, q)
    sign = np.where(np.arange(idx.shape[1]) < n_positive, -1.0, 1.0)
    x = sign * s
    loss = np.logaddexp(0.0, x).sum(-1)
    g = sign / (1.0 + np.exp(-x))
    dq = np.einsum("bk,bkd->bd", g, rows)
    grad = np.zeros_like(w)
    np.add.at(grad, idx.ravel(), (g[:, :, None] * q[:, None, :]).reshape(-1, w.shape[1]))
    return loss, g, dq, w - lr * grad


@pytest.mark.parametrize("n_positive", [1, 3])
def test_sgd_functional_matches_numpy_reference(n_positive):
    rng = np.random.default_rng(9)
    weight = (rng.standard_normal((300, 16)) * 0.4).astype(np.float64)
    query, idx = batch(rng, 300, 16, 700, 5, np.float64)     # Zipf: rows repeat within and across queries
    want = reference_sgd(query, idx, weight, 0.1, n_positive)
    got = F.embedding_dot_logistic_sgd_(query, idx, weight, 0.1, n_positive)
    for a, b in zip(got + (weight,), want):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ hostile inputs

def hostile_setup():
    rng = np.random.default_rng(10)
    emb = cembed.Embedding(200, 8, sparse=True, seed=0)
    opt = cembed.optim.SparseAdam([emb], lr=0.01)
    query, idx = batch(rng, 200, 8, 100, 4, np.float32)
    emb.dot_logistic_backward(query, idx, optimizer=opt)     # state exists, so a change would show
    return emb, opt, query, idx


@pytest.mark.parametrize("case, error", [
    (lambda e, o, q, i: e.dot_logistic_backward(q, np.where(i == i[3, 2], 200, i), optimizer=o), IndexError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i - 201, optimizer=o), IndexError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i.astype(np.float64), optimizer=o), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q.astype(np.float64), i, optimizer=o), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q.astype(np.int32), i, optimizer=o), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q[:-1], i, optimizer=o), ValueError),
    (lambda e, o, q, i: e.dot_logistic_backward(q[:, :-1], i, optimizer=o), ValueError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i[0, 0], optimizer=o), ValueError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, 5, optimizer=o), ValueError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, -1, optimizer=o), ValueError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, 1.5, optimizer=o), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, with_loss="yes", optimizer=o), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, optimizer="sgd"), TypeError),
    (lambda e, o, q, i: e.dot_logistic_backward(q, i, optimizer=cembed.optim.SGD([cembed.Embedding(200, 8)], lr=1)),
     ValueError),
    (lambda e, o, q, i: (setattr(e, "grad", F.embedding_backward(np.ones((1, 8), np.float32), [1], 200, sparse=True)),
                         e.dot_logistic_backward(q, i, optimizer=o)), ValueError),
])
def test_hostile_inputs_change_nothing(case, error):
    emb, opt, query, idx = hostile_setup()
    before = fingerprint(emb.weight, opt.state_dict())
    with pytest.raises(error):
        case(emb, opt, query, idx)
    assert fingerprint(emb.weight, opt.state_dict()) == before


@pytest.mark.parametrize("case, error", [
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i, w, -0.1), ValueError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i, w, float("nan")), ValueError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i, w, "0.1"), TypeError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i + 200, w, 0.1), IndexError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i, w.astype(np.float16), 0.1), TypeError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q, i, w.tolist(), 0.1), TypeError),
    (lambda w, q, i: F.embedding_dot_logistic_sgd_(q[None], i, w, 0.1), ValueError),
    (lambda w, q, i: (w.setflags(write=False), F.embedding_dot_logistic_sgd_(q, i, w, 0.1)), ValueError),
])
def test_sgd_functional_hostile_inputs_change_nothing(case, error):
    rng = np.random.default_rng(11)
    weight = rng.standard_normal((200, 8)).astype(np.float32)
    query, idx = batch(rng, 200, 8, 100, 4, np.float32)
    before = weight.tobytes()
    with pytest.raises(error):
        case(weight, query, idx)
    assert weight.tobytes() == before


# ------------------------------------------------------------------------------ the trainer

@pytest.mark.parametrize("optimizer, dtype", [("sgd", "float32"), ("sparseadam", "float32"),
                                              ("rowwise_adagrad", "float32"), ("sparseadam", "bfloat16"),
                                              ("sgd", "float16")])
def test_trainer_output_side_can_be_one_call(optimizer, dtype):
    """The trainer's step (CembedModel.step: scores, the input table's and the output table's fused
    updates) is bitwise the same with its output side as one dot_logistic_backward call, also for 16-bit
    tables (scored through their rows widened to float32)."""
    from cembed.apps import train as train_mod

    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(12)
    n_rows, dim = 800, 16
    w_in = (rng.standard_normal((n_rows, dim)) * 0.3).astype(np.float32)
    w_out = (rng.standard_normal((n_rows, dim)) * 0.3).astype(np.float32)
    config = train_mod.TrainConfig(dim=dim, optimizer=optimizer, lr=0.05, dtype=dtype)
    model = train_mod.CembedModel(w_in.copy(), w_out.copy(), config)
    table = train_mod.table_dtype(dtype)
    emb_in = cembed.Embedding.from_pretrained(w_in.astype(table), freeze=False, sparse=True)
    emb_out = cembed.Embedding.from_pretrained(w_out.astype(table), freeze=False, sparse=True)
    opt = train_mod.make_optimizer(cembed.optim, [emb_in, emb_out], config)
    for step in range(4):
        centers = zipf_indices(rng, 1000, n_rows).astype(np.int32)
        targets = zipf_indices(rng, 6000, n_rows).astype(np.int32).reshape(1000, 6)
        want_loss = model.step(centers, targets)
        v = emb_in(centers)
        loss, g, dv = emb_out.dot_logistic_backward(v, targets, optimizer=opt, with_loss=want_loss is not None)
        emb_in.backward(dv, centers, optimizer=opt)
        assert_bitwise_equal(emb_in.weight, model.emb_in.weight)
        assert_bitwise_equal(emb_out.weight, model.emb_out.weight)
        assert (loss is None) == (want_loss is None)
        if loss is not None:
            assert float(loss.sum()) / centers.size == want_loss


def test_queries_that_are_rows_of_the_table():
    """Queries aliasing the table (a view of its rows) are taken as they were at the call."""
    def once(alias):
        rng = np.random.default_rng(13)
        weight = (rng.standard_normal((600, 8)) * 0.3).astype(np.float32)
        emb = cembed.Embedding.from_pretrained(weight, freeze=False, sparse=True)
        opt = cembed.optim.SGD([emb], lr=0.5)
        _, idx = batch(rng, 600, 8, 400, 6, np.float32)
        query = emb.weight[100:500] if alias else emb.weight[100:500].copy()
        out = emb.dot_logistic_backward(query, idx, optimizer=opt)
        return fingerprint(emb.weight, out)

    assert once(True) == once(False)
