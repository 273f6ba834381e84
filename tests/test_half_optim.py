"""Optimizers on float16 / bfloat16 tables and 16-bit optimizer state (issue 12).

Every update computes in float32 — bitwise the float32 optimizer's math on the widened weight and state
— and rounds each element once: to nearest (ties to even), or stochastically with the counter-based
generator of docs/behaviour.md §8.7, which the NumPy reference (tests/reference.py) reimplements bit
for bit. Results are bitwise the same for any thread count, fused or unfused, and across
save / load / resume; bad combinations are refused before anything changes."""
import itertools

import sys

import numpy as np
import pytest

import cembed
from cembed import SparseGrad, optim
from cembed import _optim

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, fingerprint, zipf_indices

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = {"bfloat16": BF16, "float16": F16}
FORMAT = {"bfloat16": 2, "float16": 3}

OPTIMIZERS = {
    "sgd": (optim.SGD, dict(lr=0.1)),
    "sgd_maximize": (optim.SGD, dict(lr=0.1, maximize=True)),
    "sgd_momentum": (optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1)),
    "sgd_nesterov": (optim.SGD, dict(lr=0.1, momentum=0.5, nesterov=True)),
    "sparse_adam": (optim.SparseAdam, dict(lr=0.01)),
    "sparse_adam_row": (optim.SparseAdam, dict(lr=0.02, betas=(0.8, 0.9), maximize=True, bias_correction="row")),
    "adagrad": (optim.Adagrad, dict(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1)),
    "rowwise": (optim.RowWiseAdagrad, dict(lr=0.1)),
    "rowwise_l2": (optim.RowWiseAdagrad, dict(lr=0.1, weight_decay=0.01, initial_accumulator_value=0.5)),
    "adamw": (optim.SparseAdamW, dict(lr=0.01, weight_decay=0.1)),
    "adamw_row": (optim.SparseAdamW, dict(lr=0.01, weight_decay=0.05, bias_correction="row")),
}
#: Optimizers with per-row float state (SGD without momentum has none).
STATEFUL = [name for name in OPTIMIZERS if name not in ("sgd", "sgd_maximize")]
#: The float state arrays and their random streams (state array i of _float_states is stream 1 + i).
STREAMS = {"momentum_buffer": 1, "exp_avg": 1, "exp_avg_sq": 2, "sum": 1}


class Param:
    """The smallest parameter an optimizer takes: a table and its gradient."""

    def __init__(self, weight):
        self.weight, self.grad = weight, None


def _grads(rng, n_rows, dim, steps, nnz=12):
    out = []
    for _ in range(steps):
        rows = np.sort(rng.choice(n_rows, size=nnz, replace=False)).astype(np.int64)
        out.append(SparseGrad(rows, rng.standard_normal((nnz, dim)).astype(np.float32) * 0.5, n_rows))
    return out


def _stored(values, dtype_name, rounding, seed, step, stream):
    """values (float32, 1-D or 2-D, one row per table row) as the 16-bit dtype, by the NumPy reference."""
    dtype = HALF[dtype_name]
    flat = np.asarray(values, np.float32).reshape(values.shape[0], -1)
    if rounding == "nearest":
        with np.errstate(over="ignore"):
            out = flat.astype(dtype)
    else:
        out = ref.stochastic_round(flat, dtype, ref.round_bits(seed, step, np.arange(flat.shape[0]), stream,
                                                               flat.shape[1], dtype))
    return out.reshape(values.shape)


def _reference_step(cls, kw, weight16, state16, grad, dtype_name, state_name, rounding, seed):
    """One step by the reference: the float32 optimizer on the widened weight and state (its math is
    checked against NumPy and torch elsewhere), then each element rounded once by the NumPy reference
    of the rounding (exact values stay unchanged, so rounding every row is the same as rounding the
    updated ones). Returns (weight16, state16)."""
    param = Param(weight16.astype(np.float32))
    opt = cls([param], **kw)
    if state16:
        sd = opt.state_dict()
        sd["state"] = {0: {k: (v.astype(np.float32) if isinstance(v, np.ndarray) and v.dtype.itemsize == 2 else v)
                           for k, v in state16.items() if k != "rounding_step"}}
        opt.load_state_dict(sd)
    step = state16.get("rounding_step", 0) + 1
    param.grad = grad
    opt.step()
    new_state = dict(opt.state[param])
    for name, stream in STREAMS.items():
        if state_name != "float32" and isinstance(new_state.get(name), np.ndarray):
            new_state[name] = _stored(new_state[name], state_name, rounding, seed, step, stream)
    new_state["rounding_step"] = step
    return _stored(param.weight, dtype_name, rounding, seed, step, 0), new_state


# ------------------------------------------------------------------------------------------ rounding

def _special_values(rng):
    x = (rng.standard_normal((40, 33)) * np.exp(rng.uniform(-40, 12, (40, 33)))).astype(np.float32)
    x[0, :12] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 65504.0, 65519.0, 65520.0, 65535.0, 70000.0, 3.4e38, -3.4e38]
    x[1, :10] = [1e-45, -6e-8, 2.9e-8, 5.96e-8, 6.1e-5, 6.09e-5, 1.0, 1.0 + 2 ** -8, 1.0 + 2 ** -9, -1.5]
    x[2] = (rng.standard_normal(33) * 2.0 ** -20).astype(np.float32)  # float16 subnormal range
    return x


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_round_rows_nearest_is_the_dtype_cast(name):
    x = _special_values(np.random.default_rng(1))
    out = np.zeros(x.shape, np.uint16)
    _optim.round_rows(x, out, FORMAT[name], False, np.arange(x.shape[0], dtype=np.int64), 5, 9, 0, 1)
    with np.errstate(over="ignore"):
        assert_bitwise_equal(out, x.astype(HALF[name]).view(np.uint16))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_round_rows_stochastic_matches_the_numpy_reference(name):
    x = _special_values(np.random.default_rng(2))
    rows = np.arange(1000, 1000 + x.shape[0], dtype=np.int64)
    for seed, step, stream in [(0, 1, 0), (7, 3, 1), (2 ** 64 - 1, 2 ** 40, 2)]:
        out = np.zeros(x.shape, np.uint16)
        _optim.round_rows(x, out, FORMAT[name], True, rows, seed, step, stream, 2)
        want = ref.stochastic_round(x, HALF[name], ref.round_bits(seed, step, rows, stream, x.shape[1], HALF[name]))
        assert_bitwise_equal(out, want.view(np.uint16))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_stochastic_rounding_keeps_exact_values_and_brackets_the_rest(name):
    dtype = HALF[name]
    rng = np.random.default_rng(3)
    exact = rng.standard_normal((30, 16)).astype(dtype).astype(np.float32)
    inexact = rng.standard_normal((30, 16)).astype(np.float32)
    rows = np.arange(30, dtype=np.int64)
    for x in (exact, inexact):
        out = np.zeros(x.shape, np.uint16)
        _optim.round_rows(x, out, FORMAT[name], True, rows, 11, 1, 0, 1)
        got = out.view(dtype).astype(np.float64)
        if x is exact:
            assert_bitwise_equal(out, x.astype(dtype).view(np.uint16))
        down = np.where(x >= 0, np.abs(x), -np.abs(x))
        lo = ref.stochastic_round(x, dtype, np.full(x.shape, 0xFFFFFFFF, np.uint32)).astype(np.float64)  # toward 0
        hi = ref.stochastic_round(x, dtype, np.zeros(x.shape, np.uint32)).astype(np.float64)  # away from 0
        assert np.all((got == lo) | (got == hi))
        assert np.all(np.abs(lo) <= np.abs(down)) and np.all(np.abs(down) <= np.abs(hi))


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased_over_seeds(name):
    """The mean over many seeds converges to the float32 value (within 5 standard errors)."""
    dtype = HALF[name]
    x = np.array([[1.0 + 0.3 * 2 ** -7, -3.0e-3, 0.7, 1e-6, 1234.5678]], np.float32)
    n = 4000
    total = np.zeros(x.shape, np.float64)
    sq = np.zeros(x.shape, np.float64)
    out = np.zeros(x.shape, np.uint16)
    for seed in range(n):
        _optim.round_rows(x, out, FORMAT[name], True, np.zeros(1, np.int64), seed, 1, 0, 1)
        v = out.view(dtype).astype(np.float64)
        total += v
        sq += v * v
    mean = total / n
    se = np.sqrt(np.maximum(sq / n - mean ** 2, 0) / n)
    nearest = x.astype(dtype).astype(np.float64)
    assert np.all(np.abs(mean - x) <= 5 * se + 1e-12), (mean, x, se)
    assert np.any(np.abs(nearest - x) > 20 * se)  # ... where nearest rounding is biased


def test_generator_keys_differ_by_seed_step_row_stream():
    x = np.full((1, 64), 1.0 + 2 ** -9, np.float32)   # a quarter of a bfloat16 step above 1
    draws = set()
    for seed, step, row, stream in itertools.product((0, 1), (1, 2), (0, 5), (0, 1)):
        out = np.zeros(x.shape, np.uint16)
        _optim.round_rows(x, out, 2, True, np.array([row], np.int64), seed, step, stream, 1)
        draws.add(out.tobytes())
    assert len(draws) == 16


# ------------------------------------------------------------------------------------------ optimizers

CASES = [(o, d, s) for o, d, s in itertools.product(OPTIMIZERS, HALF, ("float32", "bfloat16", "float16"))
         if o in STATEFUL or s == "float32"]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("opt_name,dtype_name,state_name", CASES)
def test_optimizer_matches_float32_math_plus_one_rounding(opt_name, dtype_name, state_name, rounding):
    cls, kw = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(4)
    n_rows, dim, seed = 24, 10, 123
    weight = rng.standard_normal((n_rows, dim)).astype(HALF[dtype_name])
    param = Param(weight.copy())
    opt = cls([param], rounding=rounding, seed=seed, state_dtype=None if state_name == "float32" else state_name, **kw)
    ref_w, ref_state = weight.copy(), {}
    if opt.state.get(param):  # created at construction (Adagrad, RowWiseAdagrad)
        ref_state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[param].items()}
    for grad in _grads(rng, n_rows, dim, 4):
        param.grad = grad
        opt.step()
        ref_w, ref_state = _reference_step(cls, kw, ref_w, ref_state, grad, dtype_name, state_name, rounding, seed)
        assert_bitwise_equal(param.weight, ref_w)
        state = opt.state[param]
        assert state.keys() == ref_state.keys()
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                assert_bitwise_equal(v, ref_state[k])
                if k in STREAMS:
                    assert v.dtype == (np.float32 if state_name == "float32" else HALF[state_name])
            else:
                assert v == ref_state[k]


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("dim", [32, 72, 128])
def test_bfloat16_adam_rows_of_whole_blocks(dim, rounding):
    """SparseAdam's step() on a bfloat16 table with bfloat16 state (the float32 rule, then each row
    rounded: blocks of 32 columns, then the tail): the same bits as the float32 rule plus one rounding
    per element, also for NaN, infinite and overflowing gradient entries. (The fused backward's one-pass
    row, cembed_adam_row_bf16, is tested against the same rule in test_half_grad.py.)"""
    cls, kw = OPTIMIZERS["sparse_adam"]
    rng = np.random.default_rng(dim)
    n_rows, seed = 40, 99
    weight = rng.standard_normal((n_rows, dim)).astype(BF16)
    param = Param(weight.copy())
    opt = cls([param], rounding=rounding, seed=seed, state_dtype="bfloat16", **kw)
    ref_w, ref_state = weight.copy(), {}
    grads = _grads(rng, n_rows, dim, 4, nnz=20)
    special = grads[1].values.copy()
    special[0, :3] = [np.nan, np.inf, -3e38]
    grads[1] = SparseGrad(grads[1].indices, special, n_rows)
    for grad in grads:
        param.grad = grad
        opt.step()
        ref_w, ref_state = _reference_step(cls, kw, ref_w, ref_state, grad, "bfloat16", "bfloat16", rounding, seed)
        assert_bitwise_equal(param.weight.view(np.uint16), ref_w.view(np.uint16))
        for k in ("exp_avg", "exp_avg_sq"):
            assert_bitwise_equal(opt.state[param][k].view(np.uint16), ref_state[k].view(np.uint16))


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("opt_name,dtype_name,state_name", CASES)
def test_in_place_step_equals_the_gathered_step(opt_name, dtype_name, state_name, rounding):
    """step() updates a 16-bit table the kernels can write in place row by row, in one pass
    (_optim.update_rows_half for the row-rule optimizers); a table they cannot (every other column of a
    wider array) has its rows gathered to float32, updated and rounded back. Both give the same bits,
    also for NaN, infinite and overflowing gradient entries (and SparseAdamW's apply_pending_decay, on
    its own random stream); the fused backward's row update runs the same one-pass routines."""
    cls, kw = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(11)
    n_rows, dim, seed = 30, 40, 5
    init = rng.standard_normal((n_rows, dim)).astype(HALF[dtype_name])
    wide = np.zeros((n_rows, 2 * dim), HALF[dtype_name])
    wide[:, ::2] = init
    params = [Param(init.copy()), Param(wide[:, ::2])]
    assert params[0].weight.flags.c_contiguous and not params[1].weight.flags.c_contiguous
    opts = [cls([p], rounding=rounding, seed=seed, state_dtype=None if state_name == "float32" else state_name, **kw)
            for p in params]
    grads = _grads(rng, n_rows, dim, 3, nnz=16)
    special = grads[1].values.copy()
    special[0, :4] = [np.nan, np.inf, -3e38, -0.0]
    grads[1] = SparseGrad(grads[1].indices, special, n_rows)
    for grad in grads:
        for param, opt in zip(params, opts):
            param.grad = grad
            opt.step()
        assert_bitwise_equal(params[0].weight.view(np.uint16), params[1].weight.view(np.uint16))
        assert fingerprint(opts[0].state_dict()) == fingerprint(opts[1].state_dict())
    if hasattr(opts[0], "apply_pending_decay"):   # SparseAdamW: the rows the last steps did not touch
        pending = params[0].weight.copy()
        for opt in opts:
            opt.apply_pending_decay()
        if rounding == "stochastic":   # (to nearest, a bfloat16 row may not feel a decay of 5e-4)
            assert not np.array_equal(params[0].weight.view(np.uint16), pending.view(np.uint16))
        assert_bitwise_equal(params[0].weight.view(np.uint16), params[1].weight.view(np.uint16))
        assert fingerprint(opts[0].state_dict()) == fingerprint(opts[1].state_dict())
    assert not wide[:, 1::2].view(np.uint16).any()   # the columns between were not written


DENSE = {"sgd_wd": (optim.SGD, dict(lr=0.1, weight_decay=0.01)),
         "sgd_momentum_wd": (optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)),
         "adagrad_wd": (optim.Adagrad, dict(lr=0.1, weight_decay=0.01)),
         "rowwise_decoupled": (optim.RowWiseAdagrad, dict(lr=0.1, weight_decay=0.05, weight_decay_mode="decoupled"))}


@pytest.mark.parametrize("state_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("opt_name", list(DENSE))
def test_dense_gradients_on_16_bit_tables(opt_name, state_name):
    """A dense (float32) gradient: the float32 update of the whole table, then one rounding per element."""
    cls, kw = DENSE[opt_name]
    rng = np.random.default_rng(8)
    weight = rng.standard_normal((16, 6)).astype(F16)
    param = Param(weight.copy())
    opt = cls([param], seed=4, state_dtype=None if state_name == "float32" else state_name, **kw)
    ref_w, ref_state = weight.copy(), {}
    if opt.state.get(param):
        ref_state = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in opt.state[param].items()}
    for _ in range(3):
        grad = rng.standard_normal((16, 6)).astype(np.float32)
        param.grad = grad
        opt.step()
        ref_w, ref_state = _reference_step(cls, kw, ref_w, ref_state, grad, "float16", state_name, "stochastic", 4)
        assert_bitwise_equal(param.weight, ref_w)
        for k, v in opt.state[param].items():
            if isinstance(v, np.ndarray):
                assert_bitwise_equal(v, ref_state[k])


def test_optimizer_on_numpy_reference_formula():
    """SparseAdam on bfloat16 with nearest rounding against reference.sparse_adam_step in float32."""
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((30, 8)).astype(BF16)
    param = Param(weight.copy())
    opt = optim.SparseAdam([param], lr=0.01, rounding="nearest")
    w32 = weight.astype(np.float32)
    m, v = np.zeros_like(w32), np.zeros_like(w32)
    for t, grad in enumerate(_grads(rng, 30, 8, 3), start=1):
        param.grad = grad
        opt.step()
        ref.sparse_adam_step(w32, m, v, t, grad.indices, grad.values, lr=0.01)
        w32 = w32.astype(BF16).astype(np.float32)     # one rounding per element per step
        np.testing.assert_allclose(param.weight.astype(np.float32), w32, rtol=2 ** -7, atol=1e-6)
        np.testing.assert_allclose(opt.state[param]["exp_avg"], m, rtol=1e-5, atol=1e-7)


def test_stochastic_rounding_keeps_small_updates_that_nearest_loses():
    """SGD steps far below half a bfloat16 step: nearest never moves the weight, stochastic rounding
    moves it by the right amount on average."""
    n_rows, dim, steps, lr = 512, 8, 20, 1e-3
    results = {}
    for rounding in ("stochastic", "nearest"):
        param = Param(np.ones((n_rows, dim), BF16))
        opt = optim.SGD([param], lr=lr, rounding=rounding, seed=3)
        for _ in range(steps):
            param.grad = SparseGrad(np.arange(n_rows), np.ones((n_rows, dim), np.float32), n_rows)
            opt.step()
        results[rounding] = param.weight.astype(np.float64).mean()
    assert results["nearest"] == 1.0
    assert abs(results["stochastic"] - (1.0 - steps * lr)) < 1e-3


def _train_modules(opt_name, dtype_name, state_name, fused, *, steps=3, n_rows=300, dim=12, seed=0, kind="emb",
                   threads_rows=None, opt_seed=17):
    cls, kw = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(seed)
    n_rows = threads_rows or n_rows
    init = rng.standard_normal((n_rows, dim)).astype(HALF[dtype_name])
    if kind == "emb":
        module = cembed.Embedding.from_pretrained(init, freeze=False, sparse=True)
    else:
        module = cembed.EmbeddingBag.from_pretrained(init, freeze=False, sparse=True, mode="sum")
    opt = cls([module], seed=opt_seed, state_dtype=None if state_name == "float32" else state_name, **kw)
    n_idx = 4 * n_rows if threads_rows else 64
    for _ in range(steps):
        idx = zipf_indices(rng, n_idx, n_rows).reshape(-1, 4)
        if kind == "emb":
            module(idx)
            g = rng.standard_normal(idx.shape + (dim,)).astype(np.float32)
            args = (g,)
        else:
            psw = rng.standard_normal(idx.shape).astype(np.float32)
            module(idx, per_sample_weights=psw)
            args = (rng.standard_normal((idx.shape[0], dim)).astype(np.float32),)
        if fused:
            module.backward(*args, optimizer=opt)
        else:
            module.backward(*args)
            opt.step()
            opt.zero_grad()
    return module, opt


@pytest.mark.parametrize("kind", ["emb", "bag"])
@pytest.mark.parametrize("opt_name,dtype_name,state_name", CASES)
def test_fused_equals_unfused_bitwise(opt_name, dtype_name, state_name, kind):
    a, opt_a = _train_modules(opt_name, dtype_name, state_name, fused=False, kind=kind)
    b, opt_b = _train_modules(opt_name, dtype_name, state_name, fused=True, kind=kind)
    assert a.weight.dtype == HALF[dtype_name]
    assert_bitwise_equal(a.weight, b.weight)
    assert fingerprint(opt_a.state_dict()) == fingerprint(opt_b.state_dict())


@pytest.mark.parametrize("opt_name,dtype_name,state_name", [
    ("sparse_adam", "bfloat16", "bfloat16"), ("adagrad", "bfloat16", "float16"), ("rowwise_l2", "bfloat16", "bfloat16"),
    ("sgd_momentum", "bfloat16", "bfloat16"), ("adamw", "bfloat16", "float32"), ("sgd", "bfloat16", "float32"),
    ("sparse_adam_row", "bfloat16", "bfloat16"), ("adamw_row", "bfloat16", "float16"),
    ("sgd_momentum", "float16", "float32"), ("sparse_adam", "float16", "float16"), ("adamw", "float16", "bfloat16")])
@pytest.mark.parametrize("fused", [True, False])
def test_thread_count_bitwise(opt_name, dtype_name, state_name, fused):
    def run():
        module, opt = _train_modules(opt_name, dtype_name, state_name, fused, threads_rows=6000, dim=24, steps=2)
        return fingerprint(module.weight, opt.state_dict())

    results = at_thread_counts(run)
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("opt_name", ["sparse_adam", "adagrad", "rowwise", "sgd", "adamw"])
def test_rows_do_not_depend_on_the_other_rows_of_the_batch(opt_name):
    """A row's random bits are keyed by the row itself: with the same gradient for rows 1 and 2, their
    results are the same whether or not the batch also touched other rows."""
    cls, kw = OPTIMIZERS[opt_name]
    rng = np.random.default_rng(6)
    init = rng.standard_normal((20, 8)).astype(BF16)
    g12 = rng.standard_normal((2, 8)).astype(np.float32)
    outs = []
    for extra in ([], [5, 9, 17]):
        param = Param(init.copy())
        opt = cls([param], state_dtype=None if opt_name == "sgd" else "bfloat16", **kw)
        rows = np.array([1, 2] + extra, np.int64)
        values = np.concatenate([g12, rng.standard_normal((len(extra), 8)).astype(np.float32)])
        param.grad = SparseGrad(rows, values, 20)
        opt.step()
        outs.append(param.weight[[1, 2]].copy())
    assert_bitwise_equal(outs[0], outs[1])


@pytest.mark.parametrize("opt_name,state_name", [("sparse_adam", "bfloat16"), ("sgd_momentum", "float16"),
                                                 ("rowwise", "bfloat16"), ("adamw_row", "float32"),
                                                 ("adagrad", "bfloat16")])
def test_save_load_resume_bitwise(opt_name, state_name, tmp_path):
    straight, opt = _train_modules(opt_name, "bfloat16", state_name, fused=True, steps=6)
    half, opt_half = _train_modules(opt_name, "bfloat16", state_name, fused=True, steps=3)
    path = tmp_path / "opt.npz"
    opt_half.save(path)
    sd = opt_half.state_dict()
    # a fresh module and optimizer with other options: the checkpoint restores seed and state dtypes
    for restore in ("file", "state_dict"):
        module = cembed.Embedding.from_pretrained(half.weight.copy(), freeze=False, sparse=True)
        cls, kw = OPTIMIZERS[opt_name]
        fresh = cls([module], seed=999, state_dtype=None if state_name == "float32" else state_name, **kw)
        if restore == "file":
            fresh.load(path)
        else:
            fresh.load_state_dict(sd)
        assert fresh.param_groups[0]["seed"] == 17 and fresh.param_groups[0]["rounding"] == "stochastic"
        assert fingerprint(fresh.state_dict()) == fingerprint(sd)
        # replay the data stream of _train_modules from step 4 on
        rng = np.random.default_rng(0)
        rng.standard_normal((300, 12))
        for step in range(6):
            idx = zipf_indices(rng, 64, 300).reshape(-1, 4)
            g = rng.standard_normal(idx.shape + (12,)).astype(np.float32)
            if step >= 3:
                module(idx)
                module.backward(g, optimizer=fresh)
        assert_bitwise_equal(module.weight, straight.weight)
        assert fingerprint(fresh.state_dict()) == fingerprint(opt.state_dict())


def test_state_dict_keeps_dtypes_and_options(tmp_path):
    module, opt = _train_modules("sparse_adam", "float16", "bfloat16", fused=True, steps=2)
    sd = opt.state_dict()
    entry = sd["state"][0]
    assert entry["exp_avg"].dtype == BF16 and entry["exp_avg_sq"].dtype == BF16 and entry["rounding_step"] == 2
    group = sd["param_groups"][0]
    assert (group["rounding"], group["seed"], group["state_dtype"]) == ("stochastic", 17, "bfloat16")
    opt.save(tmp_path / "o.npz")
    opt.load(tmp_path / "o.npz")
    assert opt.state[module]["exp_avg"].dtype == BF16


def test_float32_tables_ignore_the_rounding_options():
    """Bitwise as before for float32 / float64 tables: rounding and seed are validated, not used."""
    rng = np.random.default_rng(7)
    for dtype in (np.float32, np.float64):
        init = rng.standard_normal((40, 6)).astype(dtype)
        grads = [SparseGrad(g.indices, g.values.astype(dtype), 40) for g in _grads(rng, 40, 6, 3)]
        weights, states = [], []
        for extra in ({}, dict(rounding="nearest", seed=5, state_dtype=np.dtype(dtype).name)):
            param = Param(init.copy())
            opt = optim.SparseAdam([param], lr=0.01, **extra)
            for g in grads:
                param.grad = g
                opt.step()
            weights.append(param.weight)
            states.append(opt.state_dict()["state"])
            assert "rounding_step" not in opt.state[param]
        assert_bitwise_equal(weights[0], weights[1])
        assert fingerprint(states[0]) == fingerprint(states[1])


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("make,error,match", [
    (lambda p: optim.SparseAdam(p, rounding="up"), ValueError, "rounding"),
    (lambda p: optim.SGD(p, rounding=None), ValueError, "rounding"),
    (lambda p: optim.Adagrad(p, seed=-1), ValueError, "seed"),
    (lambda p: optim.Adagrad(p, seed=1.5), TypeError, "seed"),
    (lambda p: optim.RowWiseAdagrad(p, seed=True), TypeError, "seed"),
    (lambda p: optim.SparseAdamW(p, seed=2 ** 64), ValueError, "seed"),
    (lambda p: optim.SparseAdam(p, state_dtype="int8"), ValueError, "state_dtype"),
    (lambda p: optim.SparseAdam(p, state_dtype="float64"), ValueError, "state_dtype"),
    (lambda p: optim.SparseAdam(p, state_dtype="not a dtype"), TypeError, "state_dtype"),
])
def test_bad_options_refused(make, error, match):
    with pytest.raises(error, match=match):
        make([Param(np.zeros((4, 2), BF16))])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("state_name", ["float16", "bfloat16"])
def test_16_bit_state_needs_a_16_bit_table(dtype, state_name):
    with pytest.raises(ValueError, match="16-bit"):
        optim.SparseAdam([Param(np.zeros((4, 2), dtype))], state_dtype=state_name)
    # also when a group joins later
    opt = optim.SGD([Param(np.zeros((4, 2), BF16))], lr=0.1, momentum=0.9, state_dtype=state_name)
    with pytest.raises(ValueError, match="16-bit"):
        opt.add_param_group({"params": [Param(np.zeros((4, 2), dtype))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("dtype,state_name", [(np.float32, "float64"), (np.float64, "float32")])
def test_full_precision_tables_refuse_other_state_dtypes_without_pointing_at_16_bits(dtype, state_name):
    # state_dtype=float64 is allowed for no table: the message must not send the user to a 16-bit one
    with pytest.raises(ValueError, match="is not allowed for a float") as info:
        optim.SparseAdam([Param(np.zeros((4, 2), dtype))], state_dtype=state_name)
    assert "16-bit" not in str(info.value) and "state_dtype=None" in str(info.value)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize("sparse", [False, True])
def test_16_bit_gradient_on_a_16_bit_table_names_the_dtype_it_takes(dtype_name, sparse):
    param = Param(np.zeros((5, 3), HALF[dtype_name]))
    opt = optim.SGD([param], lr=0.1)
    # (a SparseGrad holds float32 or float64 values only)
    got = np.float64 if sparse else HALF[dtype_name]
    param.grad = SparseGrad(np.array([0, 3]), np.ones((2, 3)), 5) if sparse else np.ones((5, 3), got)
    with pytest.raises(TypeError, match=f"a {dtype_name} table takes float32 gradients, got {np.dtype(got)}$"):
        opt.step()
    assert not np.any(param.weight.astype(np.float32))


@pytest.mark.parametrize("opt_name", ["Adagrad", "RowWiseAdagrad"])
@pytest.mark.parametrize("state_name,value", [("float16", 1 + 2 ** -11 + 2 ** -40), ("bfloat16", 1 + 2 ** -8 + 2 ** -30)])
@pytest.mark.parametrize("on_disk", [False, True])
def test_16_bit_accumulator_starts_at_float32_value_rounded_once(opt_name, state_name, value, on_disk, tmp_path):
    # float32(value) is an exact tie of the 16-bit format (rounds to even: 1.0); rounding the float64
    # value directly would give the next value up
    param = Param(np.zeros((2, 3), HALF[state_name]))
    opt = getattr(optim, opt_name)([param], initial_accumulator_value=value, state_dtype=state_name,
                                   state_dir=str(tmp_path / "state") if on_disk else None)
    want = np.float32(value).astype(HALF[state_name])
    assert float(want) == 1.0
    assert_bitwise_equal(np.asarray(opt.state[param]["sum"]), np.full(opt.state[param]["sum"].shape, want))


@pytest.mark.parametrize("value", [65519.999, 2.0 ** -25 * (1 + 2.0 ** -30)])
def test_an_accumulator_start_float16_cannot_keep_is_refused(value):
    """The check of initial_accumulator_value rounded the float64 value to float16 once (65504: finite;
    6e-08: nonzero) while the state is filled with float32(value) rounded (inf; 0.0): accepted, then
    stored as what the check refuses. Both now round as the fill does."""
    with pytest.raises(ValueError, match="cannot be kept in float16 state"):
        optim.Adagrad([Param(np.zeros((4, 2), F16))], initial_accumulator_value=value, state_dtype="float16")


def test_refusals_change_nothing():
    module, opt = _train_modules("sparse_adam", "bfloat16", "bfloat16", fused=False, steps=2)
    before = fingerprint(module.weight, opt.state_dict())
    grad = SparseGrad([1, 2], np.ones((2, 12), np.float32), 300)
    # the group now asks for another state dtype than the state has
    opt.param_groups[0]["state_dtype"] = "float16"
    module.grad = grad
    with pytest.raises(ValueError, match="state_dtype"):
        opt.step()
    opt.param_groups[0]["state_dtype"] = "bfloat16"
    # an unknown rounding mode
    opt.param_groups[0]["rounding"] = "down"
    with pytest.raises(ValueError, match="rounding"):
        opt.step()
    with pytest.raises(ValueError, match="rounding"):
        module.grad = None
        module(np.array([1, 2]))
        module.backward(np.ones((2, 12), np.float32), optimizer=opt)
    opt.param_groups[0]["rounding"] = "stochastic"
    # a float64 gradient for a 16-bit table (gradients of 16-bit tables are float32)
    module.grad = SparseGrad([1, 2], np.ones((2, 12), np.float64), 300)
    with pytest.raises(TypeError, match="float32"):
        opt.step()
    # a corrupt step counter
    opt.state[module]["rounding_step"] = -3
    module.grad = grad
    with pytest.raises(ValueError, match="rounding_step"):
        opt.step()
    opt.state[module]["rounding_step"] = 2
    # state dicts that do not fit
    sd = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].astype(np.float32)
    with pytest.raises(ValueError, match="exp_avg"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["state"][0]["rounding_step"] = "x"
    with pytest.raises(TypeError, match="rounding_step"):
        opt.load_state_dict(bad)
    bad = opt.state_dict()
    bad["param_groups"][0]["state_dtype"] = "float64"
    with pytest.raises(ValueError, match="state_dtype"):
        opt.load_state_dict(bad)
    module.grad = None
    assert fingerprint(module.weight, opt.state_dict()) == before
    assert fingerprint(module.weight, sd) == before


# ------------------------------------------------------------------------------------------ the main job

TINY = ["--vocab-size", "20000", "--topics", "20", "--tokens", "300000", "--quiet", "--no-plot", "--no-save"]


def test_train_with_16_bit_tables_and_state(capsys):
    from cembed.apps.cli import main
    small = [*TINY, "--tokens", "30000"]   # (the memory line does not depend on the corpus's length)
    assert main(["train", *small, "--dtype", "bfloat16"]) == 0
    text = capsys.readouterr().out
    # two tables of 64 bfloat16 per word, SparseAdam's two bfloat16 moments for each: half of float32's
    assert "bfloat16 tables, bfloat16 optimizer state (stochastic rounding)" in text
    assert "memory/word 256 B table + 512 B state = 768 B" in text
    assert main(["train", *small]) == 0
    assert "memory/word 512 B table + 1024 B state = 1536 B" in capsys.readouterr().out


@pytest.mark.quality
@pytest.mark.parametrize("dtype,rounding", [("bfloat16", "stochastic"), ("float16", "stochastic"),
                                            ("bfloat16", "nearest")])
def test_trainer_quality_with_16_bit_tables(dtype, rounding):
    from cembed.apps import corpus as corpus_mod
    from cembed.apps import train as train_mod
    corpus = corpus_mod.synthetic_corpus(20000, 20, 300_000, seed=3)
    results = {}
    for name, config in (("float32", train_mod.TrainConfig(seed=3)),
                         ("half", train_mod.TrainConfig(seed=3, dtype=dtype, rounding=rounding))):
        results[name] = train_mod.train(corpus, config, progress=False)
    half, full = results["half"], results["float32"]
    assert half.quality_after["frequent"] > 6 * half.chance["frequent"]
    if rounding == "stochastic":
        # (a small, undertrained run: the default corpus gives the same p@10 to three decimals)
        assert half.quality_after["frequent"] > full.quality_after["frequent"] - 0.1
    mem_half, mem_full = half.memory_per_row, full.memory_per_row
    assert mem_half["table"] + mem_half["state"] <= 0.55 * (mem_full["table"] + mem_full["state"])


def test_trainer_without_ml_dtypes_names_the_extra_and_the_flag(capsys, monkeypatch):
    """Without ml_dtypes, --dtype float16 (whose optimizer state is bfloat16 by default) was refused as
    '--dtype bfloat16 needs the ml_dtypes package', naming a flag not given, and neither message named
    cembed's bf16 extra. Each names the flag, the extra, and for float16 the way out."""
    from cembed.apps.cli import main

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # (import ml_dtypes raises ImportError)
    for flags, wanted in ((["--dtype", "bfloat16"], "--dtype bfloat16 needs the ml_dtypes package"),
                          (["--dtype", "float16"], "--dtype float16 keeps its optimizer state in bfloat16 (the default "
                                                   "--state-dtype), which needs the ml_dtypes package"),
                          (["--dtype", "float16", "--state-dtype", "bfloat16"], "--state-dtype bfloat16 needs")):
        assert main(["train", *TINY, *flags]) == 2
        err = capsys.readouterr().err
        assert wanted in err and '"bf16" extra' in err, err
    assert main(["train", *TINY, "--dtype", "float16", "--state-dtype", "float32", "--tokens", "20000",
                 "--vocab-size", "500"]) == 0


@pytest.mark.parametrize("peers", ["installed or not", "absent"])
def test_trainer_refuses_16_bit_tables_for_other_backends(capsys, monkeypatch, peers):
    from cembed.apps.cli import main
    if peers == "absent":   # (the same message on a machine without torch)
        monkeypatch.setitem(sys.modules, "torch", None)
    assert main(["train", *TINY, "--dtype", "float16", "--backend", "torch"]) == 2
    assert "cembed backend only" in capsys.readouterr().err


@pytest.mark.parametrize("kernel", ["fused_train_step_bf16", "fused_train_step_bf16_act"])
def test_bench_16_bit_fused_step_tiny(capsys, kernel):
    import json
    from cembed.apps.cli import main
    assert main(["bench", "--rows", "5000", "--dim", "16", "--n", "4096", "--repeats", "2", "--json",
                 "--only", kernel, "--no-torch", "--no-numpy"]) == 0
    row = json.loads(capsys.readouterr().out)["results"][0]
    assert row["kernel"] == kernel and row["cembed_ms"] > 0 and row["vs_cembed_f32"] > 0


@pytest.mark.parametrize("opt_name", ["sparse_adam", "adagrad", "rowwise_l2", "sgd_momentum", "adamw", "sgd",
                                      "sparse_adam_row", "adamw_row"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_row_shards_with_rounding_rows_round_as_the_whole_table(opt_name, fused):
    """A table split into S strided row shards (shard s holds rows s, s + S, ...), each trained by its
    own optimizer with ``rounding_rows=(s, S)`` and the same seed, ends bitwise where the whole table
    ends: every row draws the random bits of its row in the whole table (what cembed.distributed's
    16-bit shards rely on). Without the option the shards round differently."""
    cls, kw = OPTIMIZERS[opt_name]
    n_shards, n_rows, dim = 3, 90, 20
    rng = np.random.default_rng(8)
    init = rng.standard_normal((n_rows, dim)).astype(BF16)
    batches = []
    for _ in range(3):
        idx = zipf_indices(rng, 240, n_rows)
        batches.append((idx, rng.standard_normal((idx.size, dim)).astype(np.float32)))

    def train(module, opt, keep):
        for idx, g in batches:
            mine = keep(idx)
            local = idx[mine] // (n_shards if module.weight.shape[0] != n_rows else 1)
            module(local)
            if fused:
                module.backward(g[mine], optimizer=opt)
            else:
                module.backward(g[mine])
                opt.step()
                opt.zero_grad()

    whole = cembed.Embedding.from_pretrained(init.copy(), freeze=False, sparse=True)
    train(whole, cls([whole], seed=11, state_dtype="bfloat16", **kw), lambda idx: np.ones(idx.size, bool))
    for use_option in (True, False):
        for s in range(n_shards):
            shard = cembed.Embedding.from_pretrained(init[s::n_shards].copy(), freeze=False, sparse=True)
            options = dict(rounding_rows=(s, n_shards)) if use_option else {}
            opt = cls([shard], seed=11, state_dtype="bfloat16", **options, **kw)
            train(shard, opt, lambda idx: idx % n_shards == s)
            assert (shard.weight.tobytes() == whole.weight[s::n_shards].tobytes()) == use_option
    # the option survives a state dict round trip and is checked
    opt = cls([whole], seed=11, rounding_rows=(2, 3), **kw)
    again = cls([whole], seed=11, **kw)
    again.load_state_dict(opt.state_dict())
    assert tuple(again.param_groups[0]["rounding_rows"]) == (2, 3)
    for bad, error in (((1,), TypeError), ((0, 0), ValueError), ((-1, 2), ValueError), ("ab", TypeError),
                       ((1.5, 2), TypeError), ({"first": 0, "stride": 1}, TypeError), ({0, 1}, TypeError),
                       (np.array([[0, 1]]), TypeError)):
        with pytest.raises(error, match="rounding_rows"):
            cls([whole], rounding_rows=bad, **kw)
