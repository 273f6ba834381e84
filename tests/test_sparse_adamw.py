"""SparseAdamW and bias_correction="row" (docs/behaviour.md §8.5).

Tolerances, and why:
- vs torch.optim.AdamW (every row in every gradient): rtol 1e-6 — torch's float32 sqrt (AVX-512
  build) is not correctly rounded while cembed's is (docs/behaviour.md §9); float64 rtol 1e-12.
- vs the NumPy reference (tests/reference.py): rtol 1e-6 (float32) / 1e-12 (float64) — the
  reference computes the pending decay as the plain product of the per-step factors and lerps without
  a fused multiply-add, where the kernel uses exp(L_t - L_s) and torch's fma lerp: last-bit
  differences, by design of a readable oracle.
- per-row bias correction of SparseAdam vs its reference: bitwise (same unfused formula and the same
  libm pow / sqrt on the same doubles).
- thread counts, resume, fused vs unfused, strided vs contiguous weight: bitwise.
"""
import numpy as np
import pytest

import cembed
from cembed import SparseGrad, optim
from cembed import functional as F
from cembed.functional import RowContributions

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, backward_and_step, require_torch, zipf_indices

RTOL = {np.float32: dict(rtol=1e-6, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def dyadic(rng, shape, dtype=np.float32):
    return (rng.integers(-16, 17, shape) / 8).astype(dtype)


class Table:
    """The minimal parameter object the optimizers accept: .weight and .grad."""

    def __init__(self, weight):
        self.weight = weight
        self.grad = None


def sparse_batch(rng, n_rows, dim, n=12, dtype=np.float32):
    idx = zipf_indices(rng, n, n_rows)
    return F.embedding_backward(dyadic(rng, (n, dim), dtype), idx, n_rows, sparse=True)


def snapshot(opt, tables):
    """Every weight and every state array / scalar, copied, for bitwise comparisons."""
    out = [t.weight.copy() for t in tables]
    for t in tables:
        for key, value in sorted(opt.state.get(t, {}).items()):
            out.append((key, value.copy() if isinstance(value, np.ndarray) else value))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0]
            x, y = x[1], y[1]
        if isinstance(x, np.ndarray):
            assert_bitwise_equal(x, y)
        else:
            assert type(x) is type(y) and np.asarray(x).tobytes() == np.asarray(y).tobytes(), (x, y)


# --------------------------------------------------------------------------- torch parity

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_torch_adamw_when_every_row_is_in_every_step(rng, dtype):
    """Three tables in three groups (different lr, weight decay, betas, eps, maximize), every row in
    every gradient, the LR changed at every step by a schedule: torch's AdamW on the dense gradient."""
    torch = require_torch()
    n_rows, dim = 12, 5
    weights = [rng.standard_normal((n_rows, dim)).astype(dtype) for _ in range(3)]
    tables = [Table(w.copy()) for w in weights]
    tparams = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    group_options = [dict(lr=0.05, weight_decay=0.5, betas=(0.8, 0.95)),
                     dict(weight_decay=0.0, eps=1e-6, maximize=True), dict(betas=(0.3, 0.5))]
    defaults = dict(lr=0.02, weight_decay=0.1)
    ours = optim.SparseAdamW([dict(params=[t], **o) for t, o in zip(tables, group_options)], **defaults)
    theirs = torch.optim.AdamW([dict(params=[p], **o) for p, o in zip(tparams, group_options)], **defaults)
    schedule = lambda epoch: 0.8 ** epoch * (1.5 if epoch % 3 == 1 else 1.0)  # noqa: E731
    ours_sched = optim.lr_scheduler.LambdaLR(ours, schedule)
    theirs_sched = torch.optim.lr_scheduler.LambdaLR(theirs, schedule)
    for _ in range(8):
        for table, tp in zip(tables, tparams):
            g = dyadic(rng, (n_rows, dim), dtype)
            table.grad = SparseGrad(np.arange(n_rows), g, n_rows)
            tp.grad = torch.from_numpy(g.copy())
        ours.step()
        theirs.step()
        ours_sched.step()
        theirs_sched.step()
        for table, tp in zip(tables, tparams):
            np.testing.assert_allclose(table.weight, tp.detach().numpy(), **RTOL[dtype])
    assert [g["lr"] for g in ours.param_groups] == pytest.approx([g["lr"] for g in theirs.param_groups])
    for table, tp in zip(tables, tparams):
        st = theirs.state[tp]
        assert ours.state[table]["step"] == int(st["step"].item()) == 8
        np.testing.assert_allclose(ours.state[table]["exp_avg"], st["exp_avg"].numpy(), **RTOL[dtype])
        np.testing.assert_allclose(ours.state[table]["exp_avg_sq"], st["exp_avg_sq"].numpy(), **RTOL[dtype])


def test_a_parameter_without_gradient_takes_no_step_like_torch(rng):
    """A ``.grad`` of None: torch's AdamW skips the parameter (no step count, no decay), and so does
    SparseAdamW; an empty SparseGrad is a step (every row decays, lazily)."""
    torch = require_torch()
    n_rows, dim = 6, 3
    weights = [rng.standard_normal((n_rows, dim)).astype(np.float32) for _ in range(2)]
    tables = [Table(w.copy()) for w in weights]
    tparams = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    ours = optim.SparseAdamW(tables, lr=0.1, weight_decay=0.5)
    theirs = torch.optim.AdamW(tparams, lr=0.1, weight_decay=0.5)
    for step in range(6):
        for k, (table, tp) in enumerate(zip(tables, tparams)):
            if k == 1 and step in (1, 2, 4):
                table.grad = tp.grad = None
                continue
            g = dyadic(rng, (n_rows, dim))
            table.grad = SparseGrad(np.arange(n_rows), g, n_rows)
            tp.grad = torch.from_numpy(g.copy())
        ours.step()
        theirs.step()
    for table, tp in zip(tables, tparams):
        np.testing.assert_allclose(table.weight, tp.detach().numpy(), **RTOL[np.float32])
        assert ours.state[table]["step"] == int(theirs.state[tp]["step"].item())
    assert ours.state[tables[1]]["step"] == 3


def test_empty_gradients_decay_every_row_like_torch_zero_gradients(rng):
    """From fresh state, k steps with an empty gradient + apply_pending_decay == torch's AdamW with k
    zero dense gradients (zero moments: the update is pure decay)."""
    torch = require_torch()
    w0 = rng.standard_normal((7, 3)).astype(np.float32)
    table, tp = Table(w0.copy()), torch.nn.Parameter(torch.from_numpy(w0.copy()))
    ours, theirs = optim.SparseAdamW([table], lr=0.2, weight_decay=0.3), torch.optim.AdamW([tp], lr=0.2,
                                                                                          weight_decay=0.3)
    for lr in (0.2, 0.1, 0.4):
        ours.param_groups[0]["lr"] = theirs.param_groups[0]["lr"] = lr
        table.grad = SparseGrad(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), 7)
        tp.grad = torch.zeros(7, 3)
        ours.step()
        theirs.step()
    assert_bitwise_equal(table.weight, w0)  # nothing moved yet: the decay is pending
    ours.apply_pending_decay()
    np.testing.assert_allclose(table.weight, tp.detach().numpy(), **RTOL[np.float32])


# --------------------------------------------------------------------------- NumPy reference

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bias_correction", ["global", "row"])
@pytest.mark.parametrize("maximize", [False, True])
def test_reference_with_skipped_rows_and_a_changing_lr(rng, dtype, bias_correction, maximize):
    n_rows, dim = 40, 4
    table = Table(rng.standard_normal((n_rows, dim)).astype(dtype))
    w = table.weight.copy()
    state = ref.new_adamw_state(w)
    kw = dict(betas=(0.8, 0.9), eps=1e-6, weight_decay=0.4, maximize=maximize, bias_correction=bias_correction)
    opt = optim.SparseAdamW([table], lr=0.05, **kw)
    for step in range(12):
        lr = 0.05 * (0.9 ** step) * (2.0 if step % 4 == 3 else 1.0)
        opt.param_groups[0]["lr"] = lr
        table.grad = sparse_batch(rng, n_rows, dim, n=6, dtype=dtype)
        if step == 5:
            table.grad = SparseGrad(np.zeros(0, np.int64), np.zeros((0, dim), dtype), n_rows)
        before = table.weight.copy()
        opt.step()
        ref.sparse_adamw_step(w, state, table.grad.indices, table.grad.values, lr=lr, **kw)
        np.testing.assert_allclose(table.weight, w, **RTOL[dtype])
        untouched = np.setdiff1d(np.arange(n_rows), table.grad.indices)
        assert_bitwise_equal(table.weight[untouched], before[untouched])  # lazy: only named rows move
    np.testing.assert_allclose(opt.state[table]["exp_avg"], state["exp_avg"], **RTOL[dtype])
    np.testing.assert_allclose(opt.state[table]["exp_avg_sq"], state["exp_avg_sq"], **RTOL[dtype])
    if bias_correction == "row":
        assert_bitwise_equal(opt.state[table]["row_step"], state["row_step"])
    else:
        assert "row_step" not in opt.state[table]
    opt.apply_pending_decay()
    ref.adamw_apply_pending_decay(w, state, 0.4)
    np.testing.assert_allclose(table.weight, w, **RTOL[dtype])
    assert (opt.state[table]["row_decay_log"] == opt.state[table]["decay_log"]).all()


def test_skipped_rows_decay_exactly_over_long_gaps(rng):
    """A row untouched for 2000 steps under a changing LR: its catch-up factor is the product of
    2000 factors (float64 reference), to float64 rounding."""
    table = Table(np.ones((2, 1)))
    opt = optim.SparseAdamW([table], lr=1e-3, weight_decay=0.7)
    lrs = 1e-3 * (1 + np.sin(np.arange(2000)))
    for lr in lrs:
        opt.param_groups[0]["lr"] = float(lr)
        table.grad = SparseGrad([0], np.ones((1, 1)), 2)
        opt.step()
    opt.apply_pending_decay()
    expected = np.prod(1.0 - lrs * 0.7)
    np.testing.assert_allclose(table.weight[1, 0], expected, rtol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_adam_row_bias_correction_reference(rng, dtype):
    n_rows, dim = 30, 3
    table = Table(rng.standard_normal((n_rows, dim)).astype(dtype))
    w, m, v = table.weight.copy(), np.zeros((n_rows, dim), dtype), np.zeros((n_rows, dim), dtype)
    counts = np.zeros(n_rows, np.int64)
    opt = optim.SparseAdam([table], lr=0.05, betas=(0.8, 0.9), eps=1e-6, maximize=True, bias_correction="row")
    for _ in range(8):
        table.grad = sparse_batch(rng, n_rows, dim, n=7, dtype=dtype)
        opt.step()
        ref.sparse_adam_row_bias_step(w, m, v, counts, table.grad.indices, table.grad.values, lr=0.05,
                                      betas=(0.8, 0.9), eps=1e-6, maximize=True)
        assert_bitwise_equal(table.weight, w)
    assert_bitwise_equal(opt.state[table]["exp_avg"], m)
    assert_bitwise_equal(opt.state[table]["exp_avg_sq"], v)
    assert_bitwise_equal(opt.state[table]["row_step"], counts)
    assert opt.state[table]["step"] == 8


@pytest.mark.parametrize("make", [lambda p, bc: optim.SparseAdam(p, lr=0.05, bias_correction=bc),
                                  lambda p, bc: optim.SparseAdamW(p, lr=0.05, weight_decay=0.3, bias_correction=bc)],
                         ids=["SparseAdam", "SparseAdamW"])
def test_row_and_global_bias_correction_agree_bitwise_when_every_row_steps(rng, make):
    w0 = rng.standard_normal((9, 4)).astype(np.float32)
    tables = [Table(w0.copy()), Table(w0.copy())]
    opts = [make([tables[0]], "global"), make([tables[1]], "row")]
    for _ in range(5):
        g = dyadic(rng, (9, 4))
        for t, o in zip(tables, opts):
            t.grad = SparseGrad(np.arange(9), g, 9)
            o.step()
    assert_bitwise_equal(tables[0].weight, tables[1].weight)


def test_row_bias_correction_damps_a_late_first_update():
    """A row first seen at step 10,000: 'global' moves it by ~3.16 lr, 'row' by lr (Adam's first step)."""
    moves = {}
    for bc in ("global", "row"):
        table = Table(np.zeros((2, 1)))
        opt = optim.SparseAdamW([table], lr=0.01, weight_decay=0.0, bias_correction=bc)
        for _ in range(9999):
            table.grad = SparseGrad([0], np.ones((1, 1)), 2)
            opt.step()
        table.grad = SparseGrad([1], np.ones((1, 1)), 2)
        opt.step()
        moves[bc] = -table.weight[1, 0]
    assert moves["row"] == pytest.approx(0.01, rel=1e-5)
    assert moves["global"] == pytest.approx(0.01 * 0.1 * np.sqrt(1 - 0.999 ** 10000) / np.sqrt(1e-3), rel=1e-5)


# --------------------------------------------------------------------------- apply_pending_decay

def test_apply_pending_decay_is_idempotent_and_keeps_moments(rng):
    tables = [Table(rng.standard_normal((20, 3)).astype(np.float32)), Table(rng.standard_normal((5, 2)))]
    opt = optim.SparseAdamW([{"params": [tables[0]]}, {"params": [tables[1]], "weight_decay": 0.2}], lr=0.1)
    for _ in range(4):
        tables[0].grad = sparse_batch(rng, 20, 3, n=4)
        tables[1].grad = sparse_batch(rng, 5, 2, n=2, dtype=np.float64)
        opt.step()
    moments = [opt.state[t][k].copy() for t in tables for k in ("exp_avg", "exp_avg_sq")]
    opt.apply_pending_decay()
    once = snapshot(opt, tables)
    opt.apply_pending_decay()
    assert_same(once, snapshot(opt, tables))
    for a, b in zip(moments, [opt.state[t][k] for t in tables for k in ("exp_avg", "exp_avg_sq")]):
        assert_bitwise_equal(a, b)
    fresh = optim.SparseAdamW([Table(np.ones((3, 2)))])
    fresh.apply_pending_decay()  # no state yet: nothing to do


def test_apply_pending_decay_checks_like_step_before_anything_changes():
    """apply_pending_decay converted a group's options between the checks of the groups before it
    (an option's __float__ could then replace a checked state: a kernel read past an array), and it
    never checked that two parameters share no memory (a shared weight was decayed twice)."""
    n_rows, dim = 4, 3
    a, b = (cembed.Embedding(n_rows, dim, sparse=True, _weight=np.ones((n_rows, dim), np.float32)) for _ in range(2))
    opt = optim.SparseAdamW([{"params": [a]}, {"params": [b]}], lr=0.1, weight_decay=0.1)
    for m in (a, b):
        m.grad = SparseGrad([], np.zeros((0, dim), np.float32), n_rows)
    opt.step()
    opt.zero_grad()
    real_log = opt.state[a]["row_decay_log"]

    class Hook(float):
        def __float__(self):
            opt.state[a]["row_decay_log"] = np.full(3, -1.0)   # (shorter than the table: wrong, not a crash)
            return 0.1

    opt.param_groups[1]["lr"] = Hook(0.1)
    with pytest.raises(ValueError, match="row_decay_log' is \\(3,\\)"):
        opt.apply_pending_decay()
    assert np.all(a.weight == 1) and np.all(b.weight == 1)
    opt.param_groups[1]["lr"] = 0.1
    opt.state[a]["row_decay_log"] = real_log
    shared = np.ones((n_rows, dim), np.float32)
    a.weight = b.weight = shared
    with pytest.raises(ValueError, match="shares memory with the weight of"):
        opt.apply_pending_decay()
    assert np.all(shared == 1)
    b.weight = np.ones((n_rows, dim), np.float32)
    opt.apply_pending_decay()
    assert np.allclose(shared, 0.99) and np.allclose(b.weight, 0.99)


def test_apply_pending_decay_midway_changes_only_rounding(rng):
    w0 = rng.standard_normal((30, 4)).astype(np.float32)
    grads = [sparse_batch(rng, 30, 4, n=5) for _ in range(10)]
    results = []
    for apply_at in (None, 4):
        table = Table(w0.copy())
        opt = optim.SparseAdamW([table], lr=0.05, weight_decay=0.5)
        for k, g in enumerate(grads):
            table.grad = g
            opt.step()
            if k == apply_at:
                opt.apply_pending_decay()
        opt.apply_pending_decay()
        results.append(table.weight)
    np.testing.assert_allclose(results[0], results[1], rtol=1e-6)


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("bias_correction", ["global", "row"])
@pytest.mark.parametrize("via", ["state_dict", "file"])
@pytest.mark.parametrize("apply", [False, True])
def test_resume_is_bitwise(rng, tmp_path, bias_correction, via, apply):
    """Train k steps, checkpoint, load into a fresh optimizer, continue: bitwise the uninterrupted
    run; with apply_pending_decay() at the checkpoint on both sides, or on neither."""
    n_rows, dim = 25, 3
    w0 = [rng.standard_normal((n_rows, dim)).astype(np.float32), rng.standard_normal((n_rows, 2))]
    batches = [[sparse_batch(rng, n_rows, dim, n=5), sparse_batch(rng, n_rows, 2, n=4, dtype=np.float64)]
               for _ in range(8)]

    def make(tables):
        return optim.SparseAdamW([{"params": tables[:1], "lr": 0.05}, {"params": tables[1:], "weight_decay": 0.3}],
                                 lr=0.02, weight_decay=0.1, bias_correction=bias_correction)

    def run(opt, tables, part):
        for k, grads in enumerate(part):
            for t, g in zip(tables, grads):
                t.grad = g
            opt.param_groups[0]["lr"] = 0.05 * 0.9 ** k
            opt.step()

    straight = [Table(w.copy()) for w in w0]
    opt = make(straight)
    run(opt, straight, batches[:4])
    if apply:
        opt.apply_pending_decay()
    run(opt, straight, batches[4:])

    first = [Table(w.copy()) for w in w0]
    opt1 = make(first)
    run(opt1, first, batches[:4])
    if via == "file":
        opt1.save(tmp_path / "opt.npz")
    else:
        sd = opt1.state_dict()
    resumed = [Table(t.weight.copy()) for t in first]
    opt2 = make(resumed)
    if via == "file":
        opt2.load(tmp_path / "opt.npz")
    else:
        opt2.load_state_dict(sd)
    if apply:
        opt2.apply_pending_decay()
    run(opt2, resumed, batches[4:])
    assert_same(snapshot(opt, straight), snapshot(opt2, resumed))


def test_state_dict_layout():
    table = Table(np.ones((4, 2), np.float32))
    opt = optim.SparseAdamW([table], bias_correction="row")
    table.grad = SparseGrad([1], np.ones((1, 2), np.float32), 4)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "decay_log", "decay_log_prev", "decay_last",
                                   "row_decay_log", "row_step"}
    assert sd["param_groups"][0]["bias_correction"] == "row" and sd["param_groups"][0]["weight_decay"] == 0.01
    assert sd["state"][0]["decay_log"] == np.log1p(-1e-3 * 1e-2)
    assert sd["state"][0]["row_step"].tolist() == [0, 1, 0, 0]


# --------------------------------------------------------------------------- threads, layouts, fused

@pytest.mark.parametrize("make", [
    lambda p: optim.SparseAdamW(p, lr=0.01, weight_decay=0.5),
    lambda p: optim.SparseAdamW(p, lr=0.01, weight_decay=0.5, bias_correction="row", maximize=True),
    lambda p: optim.SparseAdam(p, lr=0.01, bias_correction="row"),
], ids=["AdamW", "AdamW-row", "Adam-row"])
def test_thread_count_bitwise(rng, make):
    n_rows, dim = 50_000, 16
    w0 = rng.standard_normal((n_rows, dim)).astype(np.float32)
    batches = []
    for _ in range(3):
        idx = zipf_indices(rng, 20_000, n_rows)
        batches.append(F.embedding_backward(rng.standard_normal((idx.size, dim)).astype(np.float32), idx,
                                            n_rows, sparse=True))

    def run():
        table = Table(w0.copy())
        opt = make([table])
        for k, grad in enumerate(batches):
            table.grad = grad
            opt.param_groups[0]["lr"] = 0.01 / (k + 1)
            opt.step()
        if isinstance(opt, optim.SparseAdamW):
            opt.apply_pending_decay()
        return snapshot(opt, [table])

    results = at_thread_counts(run)
    for other in results[1:]:
        assert_same(results[0], other)


@pytest.mark.parametrize("bias_correction", ["global", "row"])
def test_strided_weight_equals_contiguous(rng, bias_correction):
    """A weight the kernels cannot use in place (a strided column slice) goes through the
    copy-out / write-back path: bitwise the contiguous result, and the rest of the big table untouched."""
    w0 = rng.standard_normal((15, 3)).astype(np.float32)
    big = rng.standard_normal((15, 6)).astype(np.float32)
    big[:, ::2] = w0
    other_cols = big[:, 1::2].copy()
    tables = [Table(w0.copy()), Table(big[:, ::2])]
    opts = [optim.SparseAdamW([t], lr=0.1, weight_decay=0.2, bias_correction=bias_correction) for t in tables]
    for _ in range(4):
        g = sparse_batch(rng, 15, 3, n=4)
        for t, o in zip(tables, opts):
            t.grad = g
            o.step()
    for o in opts:
        o.apply_pending_decay()
    assert_bitwise_equal(tables[0].weight, np.ascontiguousarray(tables[1].weight))
    assert_bitwise_equal(big[:, 1::2], other_cols)


@pytest.fixture
def small_chunks(monkeypatch):
    """The fused backward's chunks at their minimum (64 rows), so a small test spans several."""
    original = RowContributions.chunks
    calls = []

    def chunks(self, chunk_bytes=1 << 20):
        for chunk in original(self, 1):
            calls.append(chunk[0].size)
            yield chunk

    monkeypatch.setattr(RowContributions, "chunks", chunks)
    return calls


@pytest.mark.parametrize("make", [
    lambda p: optim.SparseAdamW(p, lr=0.05, weight_decay=0.3),
    lambda p: optim.SparseAdamW(p, lr=0.05, weight_decay=0.3, bias_correction="row"),
    lambda p: optim.SparseAdam(p, lr=0.05, bias_correction="row"),
], ids=["AdamW", "AdamW-row", "Adam-row"])
@pytest.mark.parametrize("layout", ["in_place", "strided"])
@pytest.mark.parametrize("kind", ["Embedding", "EmbeddingBag"])
def test_fused_backward_equals_backward_step_zero_grad(rng, small_chunks, make, kind, layout):
    """The fused backward runs the rule in one pass on a weight the kernels update in place, and sends
    the summed rows chunk by chunk to the optimizer's gathered update on one they cannot (every other
    column of a wider array); both equal backward + step + zero_grad bitwise."""
    n_rows, dim = 400, 3

    def module(seed):
        if kind == "Embedding":
            mod = cembed.Embedding(n_rows, dim, sparse=True, seed=seed)
        else:
            mod = cembed.EmbeddingBag(n_rows, dim, mode="sum", sparse=True, seed=seed)
        if layout == "strided":
            wide = np.zeros((n_rows, 2 * dim), mod.weight.dtype)
            wide[:, ::2] = mod.weight
            mod.weight = wide[:, ::2]
        return mod

    fused, plain = module(3), module(3)
    opt_fused, opt_plain = make([fused]), make([plain])
    for step in range(4):
        idx = rng.integers(0, n_rows, 300)
        out_shape = (300, dim) if kind == "Embedding" else (30, dim)
        g = dyadic(rng, out_shape)
        for mod, opt, use_fused in ((fused, opt_fused, True), (plain, opt_plain, False)):
            if kind == "Embedding":
                mod(idx)
            else:
                mod(idx, np.arange(0, 300, 10))
            backward_and_step(mod, g, opt, use_fused)
        opt_fused.param_groups[0]["lr"] = opt_plain.param_groups[0]["lr"] = 0.05 / (step + 2)
    if layout == "strided":
        assert max(small_chunks) == 64 and len(small_chunks) > 4  # several chunks per step
    else:
        assert not small_chunks   # one pass
    assert_same(snapshot(opt_fused, [fused]), snapshot(opt_plain, [plain]))


# --------------------------------------------------------------------------- refusals

def test_dense_gradient_is_refused_naming_the_parameter():
    tables = [Table(np.zeros((3, 2), np.float32)), Table(np.zeros((3, 2), np.float32))]
    opt = optim.SparseAdamW(tables)
    tables[0].grad = SparseGrad([0], np.ones((1, 2), np.float32), 3)
    tables[1].grad = np.ones((3, 2), np.float32)
    with pytest.raises(TypeError, match=r"SparseAdamW does not support dense.*param_groups\[0\]\['params'\]\[1\]"):
        opt.step()
    assert opt.state == {} and (tables[0].weight == 0).all()


@pytest.mark.parametrize("options,error,match", [
    (dict(lr=-1.0), ValueError, "learning rate"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(lr=2.0, weight_decay=0.5), ValueError, r"lr \* weight_decay must be < 1"),
    (dict(eps=-1e-8), ValueError, "epsilon"),
    (dict(betas=(1.0, 0.9)), ValueError, "beta parameter at index 0"),
    (dict(bias_correction="rows"), ValueError, "bias_correction must be one of 'global', 'row'"),
    (dict(bias_correction=None), ValueError, "bias_correction"),
    (dict(maximize="yes"), TypeError, "maximize"),
    (dict(weight_decay="0.1"), TypeError, "weight_decay"),
])
def test_bad_options_are_refused(options, error, match):
    with pytest.raises(error, match=match):
        optim.SparseAdamW([Table(np.zeros((3, 2)))], **options)
    if "weight_decay" not in options and "maximize" not in options:
        opts = {k: v for k, v in options.items() if k != "lr"} or options
        with pytest.raises(error, match=match):
            optim.SparseAdam([Table(np.zeros((3, 2)))], **opts)


def test_bad_group_edit_is_refused_at_step_with_nothing_changed(rng):
    tables = [Table(np.ones((4, 2))), Table(np.ones((4, 2)))]
    opt = optim.SparseAdamW([{"params": tables[:1]}, {"params": tables[1:]}], lr=0.1)
    for t in tables:
        t.grad = SparseGrad([1], np.ones((1, 2)), 4)
    opt.step()
    before = snapshot(opt, tables)
    opt.param_groups[1]["weight_decay"] = 20.0  # lr * weight_decay = 2
    with pytest.raises(ValueError, match=r"param_groups\[1\].*lr \* weight_decay"):
        opt.step()
    opt.param_groups[1]["weight_decay"] = 0.01
    opt.param_groups[1]["bias_correction"] = "per-row"
    with pytest.raises(ValueError, match=r"param_groups\[1\].*bias_correction"):
        opt.step()
    assert_same(before, snapshot(opt, tables))


def _trained(rng, bias_correction="row"):
    tables = [Table(rng.standard_normal((6, 2))), Table(rng.standard_normal((6, 2)))]
    opt = optim.SparseAdamW(tables, lr=0.1, weight_decay=0.5, bias_correction=bias_correction)
    for _ in range(3):
        for t in tables:
            t.grad = sparse_batch(rng, 6, 2, n=2, dtype=np.float64)
        opt.step()
    return tables, opt


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s.__setitem__("row_decay_log", np.zeros(5)), r"'row_decay_log' is \(5,\) float64, expected \(6,\)"),
    (lambda s: s.__setitem__("row_decay_log", np.zeros(6, np.float32)), "row_decay_log"),
    (lambda s: s.__setitem__("row_decay_log", np.zeros(12)[::2]), "C-contiguous"),
    (lambda s: s.__setitem__("row_step", np.zeros(6, np.int32)), "row_step"),
    (lambda s: s.__setitem__("exp_avg", np.zeros((6, 3))), "exp_avg"),
    (lambda s: s.__setitem__("decay_log", float("nan")), "decay_log"),
    (lambda s: s.__setitem__("decay_log", 0.5), "decay_log"),
    (lambda s: s.__setitem__("decay_last", 0.0), "decay_last"),
    (lambda s: s.__setitem__("step", -1), "step"),
    (lambda s: s.pop("decay_log_prev"), "needs exactly"),
])
def test_bad_state_is_refused_at_step_and_apply_with_nothing_changed(rng, corrupt, match):
    tables, opt = _trained(rng)
    corrupt(opt.state[tables[1]])
    before = snapshot(opt, tables)
    for t in tables:
        t.grad = sparse_batch(rng, 6, 2, n=2, dtype=np.float64)
    with pytest.raises(ValueError, match=match):
        opt.step()
    with pytest.raises(ValueError, match=match):
        opt.apply_pending_decay()
    assert_same(before, snapshot(opt, tables))


def test_hand_set_clock_scalars_fused_and_unfused_alike_and_a_refused_call_keeps_them():
    """The decay clock's scalars set by hand as NumPy floats (valid values) are accepted by step() and by
    the fused backward alike, with the same bits; a call refused for another reason leaves them as they
    were, types included (the check once rewrote them as floats, and the fused path, which snapshots the
    state before its checks, then refused its own rewrite as a change made during the check)."""
    worlds = []
    for fused in (False, True):
        r = np.random.default_rng(5)
        tables = [cembed.Embedding.from_pretrained(r.standard_normal((6, 2)), freeze=False, sparse=True)
                  for _ in range(2)]
        opt = optim.SparseAdamW(tables, lr=0.1, weight_decay=0.5, bias_correction="row")
        idx = np.array([1, 4])
        for _ in range(3):
            for t in tables:
                t.backward(dyadic(r, (2, 2), np.float64), idx)
            opt.step()
            opt.zero_grad()
        state = opt.state[tables[1]]
        for name in ("decay_log", "decay_log_prev", "decay_last"):
            state[name] = np.float64(state[name])
        before = snapshot(opt, tables)
        good_exp_avg, state["exp_avg"] = state["exp_avg"], np.zeros((6, 3))
        grad = dyadic(r, (2, 2), np.float64)
        with pytest.raises(ValueError, match="exp_avg"):
            tables[1](idx)
            backward_and_step(tables[1], grad, opt, fused)
        opt.zero_grad()
        state["exp_avg"] = good_exp_avg
        assert_same(before, snapshot(opt, tables))
        for _ in range(2):
            tables[1](idx)
            backward_and_step(tables[1], grad, opt, fused)
        worlds.append(snapshot(opt, tables))
    assert_same(worlds[0], worlds[1])


def test_replaced_weight_is_refused(rng):
    tables, opt = _trained(rng)
    tables[0].weight = np.zeros((7, 2))
    with pytest.raises(ValueError, match="was the weight replaced"):
        opt.apply_pending_decay()


@pytest.mark.parametrize("corrupt,match", [
    (lambda s: s.__setitem__("row_step", np.full(6, -1, np.int64)), r"row_step.*\[0, step=3\]"),
    (lambda s: s.__setitem__("row_step", np.full(6, 4, np.int64)), r"row_step.*\[0, step=3\]"),
    (lambda s: s.__setitem__("row_decay_log", np.full(6, 0.1)), "row_decay_log"),
    (lambda s: s.__setitem__("row_decay_log", np.full(6, -1e9)), "row_decay_log"),
    (lambda s: s.__setitem__("row_decay_log", np.full(6, np.nan)), "row_decay_log"),
    (lambda s: s.__setitem__("row_decay_log", [0.0] * 6), "row_decay_log"),
    (lambda s: s.__setitem__("decay_log_prev", s["decay_log"] - 1.0), "decay_log_prev"),
    (lambda s: s.__setitem__("decay_last", 1.5), "decay_last"),
    (lambda s: s.__setitem__("decay_log", "x"), "decay_log"),
    (lambda s: s.__setitem__("step", True), "step"),
    (lambda s: s.__setitem__("extra", 1), "needs exactly"),
])
def test_bad_state_dict_is_refused_before_anything_changes(rng, corrupt, match):
    tables, opt = _trained(rng)
    sd = opt.state_dict()
    corrupt(sd["state"][1])
    before = snapshot(opt, tables)
    groups_before = [dict(g) for g in opt.param_groups]
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert_same(before, snapshot(opt, tables))
    assert [dict(g) for g in opt.param_groups] == groups_before


def test_sparse_adam_row_step_state_is_checked(rng):
    table = Table(np.zeros((5, 2)))
    opt = optim.SparseAdam([table], lr=0.1, bias_correction="row")
    table.grad = SparseGrad([1, 3], np.ones((2, 2)), 5)
    opt.step()
    sd = opt.state_dict()
    assert sd["state"][0]["row_step"].tolist() == [0, 1, 0, 1, 0]
    sd["state"][0]["row_step"] = np.array([0, 2, 0, 1, 0])
    with pytest.raises(ValueError, match=r"row_step.*\[0, step=1\]"):
        opt.load_state_dict(sd)
    opt.state[table]["row_step"] = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="row_step"):
        opt.step()
    old = {"state": {}, "param_groups": [{k: v for k, v in opt.state_dict()["param_groups"][0].items()
                                          if k != "bias_correction"}]}
    opt.load_state_dict(old)  # a state dict from before the option: the constructor's value, as in torch
    assert opt.param_groups[0]["bias_correction"] == "row"
    del opt.param_groups[0]["bias_correction"]  # a group without the option: torch's rule ("global")
    opt.state.clear()
    table.grad = SparseGrad([1], np.ones((1, 2)), 5)
    opt.step()
    assert "row_step" not in opt.state[table]


def test_docstring_examples():
    import doctest

    from cembed.optim import sparse_adam, sparse_adamw

    for module in (sparse_adam, sparse_adamw):
        failures, tried = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert failures == 0 and tried > 0


# --------------------------------------------------------------------------- kernels on any row stride

def _kernel_steps():
    """name -> step(weight, states, rows, values, n_threads) for the new _optim kernels; states are
    (exp_avg, exp_avg_sq, row_decay_log, row_step)."""
    from cembed import _optim

    from cembed._grad import UpdateKind

    def rule(lr, beta1, beta2, decay_log=0.0, decay_log_prev=0.0, decay_last=0.0, step_size=0.0, bc2_sqrt=0.0):
        return np.array([lr, beta1, beta2, decay_log, decay_log_prev, decay_last, step_size, bc2_sqrt])

    def adamw(weight, s, rows, values, n, per_row):   # update_rows' AdamW kind: the parameters SparseAdamW passes
        _optim.update_rows(UpdateKind.UPDATE_ADAMW, weight, s[0], s[1], np.zeros(0, weight.dtype), s[2],
                           s[3] if per_row else np.zeros(0, np.int64),
                           rule(0.01, 0.8, 0.95, -0.3, -0.2, 0.9, 0.02, 0.5),
                           rows, values, 1 - 0.8, 1 - 0.95, 1e-8, 0.95, 0, True, n)

    def adam_row_bias(weight, s, rows, values, n):
        _optim.update_rows(UpdateKind.UPDATE_ADAM_ROW_BIAS, weight, s[0], s[1], np.zeros(0, weight.dtype),
                           np.zeros(0), s[3], rule(0.01, 0.8, 0.95), rows, values, 1 - 0.8, 1 - 0.95, 1e-8, 0.0, 0,
                           False, n)

    return {
        "update_rows-adamw": lambda w, s, r, v, n: adamw(w, s, r, v, n, False),
        "update_rows-adamw-row": lambda w, s, r, v, n: adamw(w, s, r, v, n, True),
        "update_rows-adam-row-bias": adam_row_bias,
        "adamw_decay_rows": lambda w, s, r, v, n: _optim.adamw_decay_rows(w, s[2], r, -0.3, -0.2, 0.9, n),
    }


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(_kernel_steps()))
def test_kernels_any_row_stride(rng, name, dtype, n_threads):
    """Column slices and reversed rows of a wider table: bitwise the C-contiguous result, and the
    table's other columns untouched (dim 11: vector tail loops; 23 rows: the prefetch-ahead path)."""
    step = _kernel_steps()[name]
    n_rows, dim, width = 57, 11, 24
    rows = np.sort(rng.choice(n_rows, 23, replace=False)).astype(np.int64)
    values = rng.standard_normal((23, dim)).astype(dtype)
    for first_col, pick in ((5, lambda t: t[:, 5:5 + dim]), (2, lambda t: t[::-1, 2:2 + dim])):
        table = rng.standard_normal((n_rows, width)).astype(dtype)
        view = pick(table)
        contiguous = np.ascontiguousarray(view)
        outside = np.ones(table.shape, bool)
        outside[:, first_col:first_col + dim] = False
        untouched = table[outside].copy()
        logs = -rng.random(n_rows) * 0.3
        logs[::3] = -0.2   # some rows one step behind: decay_last
        logs[::5] = -0.3   # some up to date (adamw_decay_rows skips them)
        states = [rng.random((n_rows, dim)).astype(dtype), rng.random((n_rows, dim)).astype(dtype), logs,
                  rng.integers(0, 5, n_rows)]
        copies = [s.copy() for s in states]
        before = contiguous.copy()
        step(view, states, rows, values, n_threads)
        step(contiguous, copies, rows, values, n_threads)
        assert not np.array_equal(before, contiguous)
        assert_bitwise_equal(view, contiguous)
        for a, b in zip(states, copies):
            assert_bitwise_equal(a, b)
        assert_bitwise_equal(table[outside], untouched)


@pytest.mark.parametrize("name", list(_kernel_steps()))
def test_kernels_refuse_non_adjacent_columns(rng, name):
    step = _kernel_steps()[name]
    weight = rng.standard_normal((10, 8))[:, ::2]
    states = [np.zeros((10, 4)), np.zeros((10, 4)), np.zeros(10), np.zeros(10, np.int64)]
    before = weight.copy()
    with pytest.raises(ValueError, match="contiguous"):
        step(weight, states, np.array([1, 2], np.int64), np.ones((2, 4)), 1)
    assert_bitwise_equal(weight, before)


def test_per_row_kinds_refuse_a_rule_without_its_arrays_or_parameters():
    """The kernels' AdamW and per-row-bias Adam kinds need the rule's per-row arrays and its eight
    scalars: without them (or with arrays of another length) the kernel raises before writing."""
    from cembed import _optim
    from cembed._grad import UpdateKind

    n_rows, dim = 6, 3
    params = np.array([0.01, 0.9, 0.999, -0.1, -0.05, 0.95, 0.1, 0.5])
    logs, counts, none_f, none_i = np.zeros(n_rows), np.zeros(n_rows, np.int64), np.zeros(0), np.zeros(0, np.int64)
    cases = [(UpdateKind.UPDATE_ADAMW, logs, none_i, np.zeros(0), "missing optimizer state"),
             (UpdateKind.UPDATE_ADAMW, none_f, none_i, params, "missing optimizer state"),
             (UpdateKind.UPDATE_ADAM_ROW_BIAS, none_f, counts, np.zeros(0), "missing optimizer state"),
             (UpdateKind.UPDATE_ADAM_ROW_BIAS, none_f, none_i, params, "missing optimizer state"),
             (UpdateKind.UPDATE_ADAMW, np.zeros(n_rows - 1), none_i, params, "one entry per table row"),
             (UpdateKind.UPDATE_ADAM_ROW_BIAS, none_f, counts, params[:5], "8 values or none")]
    for kind, row_log, row_counts, rule, message in cases:
        w = np.ones((n_rows, dim), np.float32)
        m, v = np.zeros((n_rows, dim), np.float32), np.zeros((n_rows, dim), np.float32)
        before = [x.copy() for x in (w, m, v, row_log, row_counts)]
        with pytest.raises(ValueError, match=message):
            _optim.update_rows(kind, w, m, v, np.zeros(0, np.float32), row_log, row_counts, rule,
                               np.array([1, 4], np.int64), np.ones((2, dim), np.float32), 0.1, 0.001, 1e-8, 0.999, 0,
                               False, 1)
        for x, y in zip((w, m, v, row_log, row_counts), before):
            assert_bitwise_equal(x, y)
