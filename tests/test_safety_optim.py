"""Optimizer safety (review of the optimizers): tables whose elements share memory, 16-bit updates of no
row, bounded step counters, SGD momentum state on disk for 16-bit tables, a refused param group,
missing state, clipping with a huge norm, SparseAdam at lr 0, load hygiene, duplicate parameters.

Every refusal is checked to come before anything changed: weights (their whole memory), optimizer
state (``state_dict()`` compared bitwise) and the step counters."""
import copy
import json

import os

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided

import cembed
from cembed import SparseGrad, optim
from cembed import functional as F
from cembed._validation import check_distinct_elements, elements_overlap

from util import assert_bitwise_equal, at_thread_counts, require_torch

STEP_MAX = 2 ** 63 - 1


def _state_bytes(opt):
    """Everything an optimizer holds, as comparable bytes (arrays by their bytes, the rest by repr)."""
    out = []
    for i, entry in sorted(opt.state_dict()["state"].items()):
        for k, v in sorted(entry.items()):
            out.append((i, k, v.tobytes() if isinstance(v, np.ndarray) else repr(v)))
    return out, repr([{k: v for k, v in g.items()} for g in opt.state_dict()["param_groups"]])


# =========================================================================== 1. overlapping rows

def _overlapping(dtype=np.float32, n=60, dim=8, row_stride_items=4):
    """A writeable table whose row i starts ``row_stride_items`` elements after row i - 1 (< dim: the
    rows overlap), and the buffer behind it."""
    item = np.dtype(dtype).itemsize
    buf = (np.arange(dim + row_stride_items * n) % 7).astype(dtype)
    return as_strided(buf, shape=(n, dim), strides=(row_stride_items * item, item), writeable=True), buf


def test_elements_overlap_rule():
    rng = np.random.default_rng(0)
    big = rng.standard_normal((20, 12)).astype(np.float32)
    cube = np.zeros((20, 6, 2), np.float32)
    rec = np.zeros(20, dtype=[("a", np.float32), ("v", np.float32, (5,))])
    fine = {"c": big, "fortran": np.asfortranarray(big), "cols ::2": big[:, ::2], "cols 3:9": big[:, 3:9],
            "reversed": big[::-1], "both reversed": big[::-1, ::-1], "transposed": big.T, "cube[..., 0]": cube[..., 0],
            "record field": rec["v"], "empty": np.zeros((0, 4), np.float32), "no columns": np.zeros((5, 0)),
            "one row stride 0": as_strided(big, (1, 12), (0, 4)),
            "one column stride 0": as_strided(big, (20, 1), (48, 0))}
    for name, arr in fine.items():
        assert not elements_overlap(arr), name
    bad = {"rows overlap": _overlapping()[0], "broadcast rows": np.broadcast_to(big[0], (5, 12)),
           "stride-0 columns": as_strided(big, (20, 3), (48, 0)),
           "half-item column stride": as_strided(big, (4, 3), (48, 2)),
           "reversed overlapping": _overlapping()[0][::-1], "transposed overlapping": _overlapping()[0].T,
           "2**40 stride-0 rows": np.broadcast_to(np.zeros(4, np.float32), (2 ** 40, 4))}
    for name, arr in bad.items():
        assert elements_overlap(arr), name
        with pytest.raises(ValueError, match="share memory"):
            check_distinct_elements(arr, "a test")


OPTIMIZERS = [
    (optim.SGD, dict(lr=0.1)), (optim.SGD, dict(lr=0.1, momentum=0.9)), (optim.SparseAdam, dict(lr=0.1)),
    (optim.SparseAdamW, dict(lr=0.1)), (optim.Adagrad, dict(lr=0.1)), (optim.RowWiseAdagrad, dict(lr=0.1)),
]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("path", ["step_sparse", "step_dense", "fused"])
def test_a_table_of_no_rows_steps_as_a_no_op(cls, kw, dtype, path):
    """A (0, dim) table (torch allows one) beside a normal one: RowWiseAdagrad's kernel took the empty
    'sum' for missing state and raised an internal error after the first table was updated. Every
    optimizer now steps it as a no-op, on every path, and updates the other table as if alone."""
    if path == "step_dense" and cls in (optim.SparseAdam, optim.SparseAdamW):
        return   # (sparse gradients only)
    sparse = path != "step_dense"
    tables = [cembed.Embedding(6, 4, sparse=sparse, seed=0, dtype=dtype), cembed.Embedding(0, 4, sparse=sparse, dtype=dtype)]
    alone = cembed.Embedding(6, 4, sparse=sparse, seed=0, dtype=dtype)
    opt, opt_alone = cls(tables, **kw), cls([alone], **kw)
    rows = np.array([1, 4, 1])
    for module, optimizer, n_rows in ((tables[0], opt, 6), (alone, opt_alone, 6), (tables[1], opt, 0)):
        idx = rows if n_rows else np.zeros(0, np.int64)
        grad = np.ones((idx.size, 4), np.float32)
        if path == "fused":
            module.backward(grad, idx, optimizer=optimizer)
        else:
            module.backward(grad, idx)
    if path != "fused":
        opt.step()
        opt_alone.step()
    assert tables[1].weight.shape == (0, 4)
    assert_bitwise_equal(tables[0].weight, alone.weight)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("path", ["step_sparse", "step_dense", "fused"])
def test_updates_refuse_overlapping_rows_before_any_change(cls, kw, dtype, path):
    """poc_1: a table with overlapping rows, updated by parallel row kernels, raced (results changed run
    to run). Every update of one is refused, the other parameter of the step not updated either."""
    if path == "step_dense" and cls in (optim.SparseAdam, optim.SparseAdamW):
        pytest.skip("sparse gradients only")
    good = cembed.Embedding(60, 8, sparse=path != "step_dense")
    good.weight = np.ones((60, 8), dtype)
    bad = cembed.Embedding(60, 8, sparse=path != "step_dense")
    bad.weight, buf = _overlapping(dtype)
    opt = cls([good, bad], **kw)
    before_buf, before_good, before_state = buf.copy(), good.weight.copy(), _state_bytes(opt)
    grad = np.ones((60, 8), np.float32)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]\.weight has elements that share memory"):
        if path == "fused":
            bad.backward(np.ones((3, 8), np.float32), np.array([1, 2, 1]), optimizer=opt)
        else:
            for m in (good, bad):
                m.grad = SparseGrad(np.arange(60), grad, 60) if path == "step_sparse" else grad.copy()
            opt.step()
    assert_bitwise_equal(buf, before_buf)
    assert_bitwise_equal(good.weight, before_good)
    assert _state_bytes(opt) == before_state
    assert bad not in opt.state or not opt.state[bad] or cls in (optim.Adagrad, optim.RowWiseAdagrad)


def test_poc_1_results_are_thread_independent_once_the_table_is_copied():
    """The fix's remedy (a table of distinct rows) gives the same bits at 1, 2 and 3 threads."""
    def run():
        m = cembed.Embedding(600, 16, sparse=True)
        m.weight = np.ascontiguousarray(_overlapping(n=600, dim=16, row_stride_items=8)[0])
        opt = optim.SGD([m], lr=0.1)
        m.grad = SparseGrad(np.arange(600), np.ones((600, 16), np.float32), 600)
        opt.step()
        opt.zero_grad()
        m.backward(np.ones((600, 16), np.float32), np.arange(600), optimizer=opt)
        return m.weight.copy()
    first, *rest = at_thread_counts(run)
    for other in rest:
        assert_bitwise_equal(first, other)


def test_renorm_and_logistic_sgd_refuse_overlapping_rows():
    for dtype in (np.float32, np.float64, np.float16):
        weight, buf = _overlapping(dtype)
        before = buf.copy()
        with pytest.raises(ValueError, match="share memory"):
            F.embedding(np.array([1, 5]), weight, max_norm=0.5)
        with pytest.raises(ValueError, match="share memory"):
            F.embedding_renorm_(weight, [1, 5], max_norm=0.5)
        with pytest.raises(ValueError, match="share memory"):
            F.embedding_bag(np.array([1, 5, 7]), weight, offsets=np.array([0, 2]), max_norm=0.5)
        with pytest.raises(ValueError, match="share memory"):
            cembed.Embedding.from_pretrained(weight, freeze=False, max_norm=0.5)(np.array([3]))
        with pytest.raises(ValueError, match="share memory"):
            cembed.EmbeddingBag.from_pretrained(weight, freeze=False, max_norm=0.5)(np.array([[3, 4]]))
        if dtype != np.float16:
            with pytest.raises(ValueError, match="share memory"):
                F.embedding_dot_logistic_sgd_(np.ones((1, 8), dtype), [[0, 2]], weight, lr=1.0)
        assert_bitwise_equal(buf, before)


def test_lookups_of_overlapping_and_stride_0_tables_still_work():
    """Reads only: every lookup takes such tables, as before (the values are numpy's)."""
    weight, _ = _overlapping()
    idx = np.array([[0, 3], [59, 3]])
    assert_bitwise_equal(F.embedding(idx, weight), weight[idx])
    assert_bitwise_equal(cembed.Embedding.from_pretrained(weight, freeze=False)(idx), weight[idx])
    assert_bitwise_equal(F.embedding_bag(idx, weight, mode="sum"), weight[idx].sum(1))
    huge = np.broadcast_to(np.arange(4, dtype=np.float32), (2 ** 40, 4))
    assert_bitwise_equal(F.embedding(np.array([0, 2 ** 40 - 1]), huge), np.tile(np.arange(4, dtype=np.float32), (2, 1)))
    # a writeable stride-0 table, looked up without max_norm: fine (nothing is written)
    zero_stride = as_strided(np.arange(4, dtype=np.float32), (100, 4), (0, 4), writeable=True)
    assert_bitwise_equal(F.embedding(np.array([7, 99]), zero_stride), np.tile(np.arange(4, dtype=np.float32), (2, 1)))
    # the backward (which writes only the gradient) of a table with overlapping rows still runs
    m = cembed.Embedding.from_pretrained(weight, freeze=False, sparse=True)
    m(np.array([1, 2]))
    m.backward(np.ones((2, 8), np.float32))
    assert m.grad.nnz == 2


# =========================================================================== 2. 16-bit updates of no row

@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_apply_pending_decay_with_nothing_pending_on_16_bit_tables(dtype):
    """poc_2 (a): the second apply_pending_decay() (no row owes decay) raised a reshape error after the
    earlier parameters were decayed. Now it is a no-op, and a parameter whose rows are all up to date
    is left as it is."""
    dtype = cembed._dtypes.resolve_dtype(dtype)
    a, b = cembed.Embedding(100, 4, sparse=True), cembed.Embedding(100, 4, sparse=True)
    a.weight, b.weight = np.ones((100, 4), dtype), np.ones((100, 4), dtype)
    opt = optim.SparseAdamW([a, b], lr=0.1, weight_decay=0.5, rounding="nearest")
    a.grad = SparseGrad([0], np.ones((1, 4), np.float32), 100)
    b.grad = SparseGrad(np.arange(100), np.ones((100, 4), np.float32), 100)
    opt.step()
    wb = b.weight.copy()
    opt.apply_pending_decay()
    assert_bitwise_equal(b.weight, wb)
    assert np.all(a.weight[1:].astype(np.float32) == np.float32(1.0 - 0.05).astype(dtype).astype(np.float32))
    wa, state = a.weight.copy(), _state_bytes(opt)
    opt.apply_pending_decay()                     # nothing pending anywhere
    assert_bitwise_equal(a.weight, wa)
    assert_bitwise_equal(b.weight, wb)
    assert _state_bytes(opt) == state


@pytest.mark.parametrize("fused", [False, True])
def test_sgd_momentum_16_bit_first_step_without_rows(fused):
    """poc_2 (b): SGD momentum on a 16-bit table whose first step has no row (a batch of padding only)
    raised after counting the step and creating the buffer, leaving no 'active_rows'. Now it is the
    float32 table's step: a zero buffer, no live row; the next step moves only its rows."""
    runs = {}
    for dtype in (np.float32, np.float16):
        e = cembed.Embedding(100, 4, sparse=True, padding_idx=0)
        e.weight = np.ones((100, 4), dtype)
        opt = optim.SGD([e], lr=0.5, momentum=0.9, rounding="nearest")
        if fused:
            e.backward(np.ones((3, 4), np.float32), np.array([0, 0, 0]), optimizer=opt)
        else:
            e.grad = SparseGrad([], np.zeros((0, 4), np.float32), 100)
            opt.step()
            opt.zero_grad()
        assert opt.state[e]["active_rows"].tolist() == []
        assert not opt.state[e]["momentum_buffer"].any()
        e.grad = SparseGrad([3], np.ones((1, 4), np.float32), 100)
        opt.step()
        assert opt.state[e]["active_rows"].tolist() == [3]
        runs[dtype] = e.weight.astype(np.float32)
    assert_bitwise_equal(runs[np.float16], runs[np.float32])   # 1 - 0.5 is exact in float16


# =========================================================================== 3. step counters

def _two_stepped(cls, n=10, dim=4):
    a, b = cembed.Embedding(n, dim, sparse=True, seed=0), cembed.Embedding(n, dim, sparse=True, seed=1)
    opt = cls([a, b], lr=0.1)
    for m in (a, b):
        m.grad = SparseGrad([1], np.ones((1, dim), np.float32), n)
    opt.step()
    for m in (a, b):
        m.grad = SparseGrad([1, 2], np.ones((2, dim), np.float32), n)
    return a, b, opt


ADAMS = [optim.SparseAdam, optim.SparseAdamW]


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("bad", [2 ** 1100, 10 ** 400, 2 ** 63, -1, np.uint64(2 ** 64 - 1), np.uint64(2 ** 63)],
                         ids=["2**1100", "10**400", "2**63", "-1", "uint64max", "uint64 2**63"])
def test_step_counters_out_of_bounds_are_refused_at_load_and_at_step(cls, bad):
    """poc_3 and the reviewer's step-counter PoCs: a step of 2**1100 or 10**400 passed load and made
    step() raise OverflowError after updating the other parameters; a uint64 counter wrapped to 0 (NaN
    weights). Every counter is an int in [0, 2**63 - 1]."""
    a, b, opt = _two_stepped(cls)
    sd = opt.state_dict()
    sd["state"][1]["step"] = bad
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match=r"'step' must be an int in \[0, 2\*\*63 - 1\]"):
        opt.load_state_dict(sd)
    assert _state_bytes(opt) == before
    opt.state[b]["step"] = bad                                  # a live counter: refused at step, unchanged
    wa, wb = a.weight.copy(), b.weight.copy()
    for run in (opt.step, lambda: (setattr(a, "grad", None), setattr(b, "grad", None),
                                   b.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt))):
        with pytest.raises(ValueError, match=r"params'\]\[1\].*'step' must be an int"):
            run()
        assert_bitwise_equal(a.weight, wa)
        assert_bitwise_equal(b.weight, wb)
        assert opt.state[a]["step"] == 1 and opt.state[b]["step"] is bad


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_last_step_count_loads_but_the_next_step_is_refused(cls, tmp_path):
    a, b, opt = _two_stepped(cls)
    sd = opt.state_dict()
    sd["state"][1]["step"] = STEP_MAX
    opt.load_state_dict(sd)
    opt.save(tmp_path / "opt.npz")
    opt.load(tmp_path / "opt.npz")
    assert opt.state[b]["step"] == STEP_MAX
    wa, wb, before = a.weight.copy(), b.weight.copy(), _state_bytes(opt)
    with pytest.raises(ValueError, match="largest step count"):
        opt.step()
    b.grad = None
    with pytest.raises(ValueError, match="largest step count"):
        b.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)
    assert_bitwise_equal(a.weight, wa)
    assert_bitwise_equal(b.weight, wb)
    assert _state_bytes(opt) == before
    opt.state[b]["step"] = STEP_MAX - 1                       # one step left: taken, no overflow
    b.grad = SparseGrad([2], np.ones((1, 4), np.float32), 10)
    opt.step()
    assert opt.state[b]["step"] == STEP_MAX and type(opt.state[b]["step"]) is int


@pytest.mark.parametrize("cls", ADAMS, ids=lambda c: c.__name__)
def test_numpy_integer_counters_step_as_python_ints(cls):
    """np.int8(127) + 1 wrapped to -128; the counter is now stored as a Python int, and the step is the
    step of the int counter, bitwise."""
    results = []
    for start in (127, np.int8(127), np.uint8(127), np.int64(127)):
        a, b, opt = _two_stepped(cls)
        opt.state[b]["step"] = start
        opt.step()
        assert opt.state[b]["step"] == 128 and type(opt.state[b]["step"]) is int
        results.append(b.weight.copy())
    for other in results[1:]:
        assert_bitwise_equal(results[0], other)


def test_step_counter_file_with_huge_step_is_refused(tmp_path):
    a, b, opt = _two_stepped(optim.SparseAdam)
    opt.save(tmp_path / "opt.npz")
    with np.load(tmp_path / "opt.npz") as data:
        arrays = dict(data)
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["state"]["1"]["step"] = {"value": 10 ** 400}
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "bad.npz", **arrays)
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="bad.npz.*'step' must be an int"):
        opt.load(tmp_path / "bad.npz")
    assert _state_bytes(opt) == before


@pytest.mark.parametrize("bad", [10 ** 400, 2 ** 63, -1, 1e300, float("inf"), np.float64(1e39)],
                         ids=["10**400", "2**63", "-1", "1e300", "inf", "f64 1e39"])
def test_adagrad_step_counter_bounds(bad):
    a, b, opt = _two_stepped(optim.Adagrad)
    sd = opt.state_dict()
    sd["state"][1]["step"] = bad
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match=r"\['step'\] must be"):
        opt.load_state_dict(sd)
    assert _state_bytes(opt) == before
    opt.state[b]["step"] = bad
    wa = a.weight.copy()
    with pytest.raises(ValueError, match=r"\['step'\] must be"):
        opt.step()
    assert_bitwise_equal(a.weight, wa)
    sd["state"][1]["step"] = 2 ** 40            # in bounds: loads, and counts on as torch's float32 counter
    opt.load_state_dict(sd)
    opt.step()
    assert opt.state[b]["step"] == np.float32(2 ** 40) and opt.state[b]["step"].dtype == np.float32


# =========================================================================== 4. 16-bit dense steps, state on disk

@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
@pytest.mark.parametrize("state_dtype", [None, "bfloat16", "float16"])
@pytest.mark.parametrize("make", [lambda p, **kw: optim.SGD(p, lr=0.1, momentum=0.9, **kw),
                                  lambda p, **kw: optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True, **kw),
                                  lambda p, **kw: optim.Adagrad(p, lr=0.1, **kw)], ids=["sgd", "nesterov", "adagrad"])
def test_dense_steps_of_16_bit_tables_with_state_dir_are_the_in_memory_steps(tmp_path, dtype, state_dtype, make):
    """poc_4: SGD momentum + state_dir + a 16-bit table + a dense gradient always failed (the momentum
    buffer was allocated for the float32 scratch state, which maps to no parameter), after updating the
    other parameters. Now its state is created in state_dir, and every step is bitwise the in-memory
    one; the state stays the memmap of its file (Adagrad's too)."""
    dtype = cembed._dtypes.resolve_dtype(dtype)
    rng = np.random.default_rng(3)
    grads = [rng.standard_normal((30, 6)).astype(np.float32) for _ in range(3)]
    runs = []
    for state_dir in (None, tmp_path / "state"):
        a = cembed.Embedding(30, 6, seed=0)                       # float32, updated first
        b = cembed.Embedding(30, 6, seed=1)
        b.weight = b.weight.astype(dtype)
        opt = make([a, b], state_dtype=None, state_dir=state_dir) if state_dtype is None else \
            make([{"params": [a]}, {"params": [b], "state_dtype": state_dtype}], state_dir=state_dir)
        for g in grads:
            a.grad, b.grad = g.copy(), g.copy()
            opt.step()
        runs.append((a.weight.copy(), b.weight.copy(), opt))
    (a0, b0, mem), (a1, b1, disk) = runs
    assert_bitwise_equal(a0, a1)
    assert_bitwise_equal(b0, b1)
    name = "momentum_buffer" if isinstance(disk, optim.SGD) else "sum"
    for m_mem, m_disk in zip(mem.state, disk.state):
        assert_bitwise_equal(mem.state[m_mem][name], disk.state[m_disk][name])
        assert isinstance(disk.state[m_disk][name], np.memmap)
    stored = np.load(tmp_path / "state" / f"p1.{name}.npy", mmap_mode="r")
    assert stored.tobytes() == disk.state[list(disk.state)[1]][name].tobytes()


# =========================================================================== 5. refused groups, missing state

@pytest.mark.parametrize("cls", [optim.Adagrad, optim.RowWiseAdagrad], ids=lambda c: c.__name__)
def test_add_param_group_that_fails_making_state_is_not_added(cls, monkeypatch):
    """poc_5: a MemoryError while making a new group's state (a table larger than RAM) left the group
    added without state; the next step updated the others, then raised KeyError. Now the group is not
    added, the optimizer is as before, and steps go on."""
    a = cembed.Embedding(10, 4, sparse=True)
    opt = cls([a], lr=0.1)
    b, c = cembed.Embedding(10, 4, sparse=True), cembed.Embedding(12, 4, sparse=True)
    real = optim.Optimizer._new_state

    def failing(self, state, key, weight, **kw):
        if weight.shape[0] == 12:
            raise MemoryError("Unable to allocate the state of a huge table")
        return real(self, state, key, weight, **kw)

    monkeypatch.setattr(optim.Optimizer, "_new_state", failing)
    before = _state_bytes(opt)
    with pytest.raises(MemoryError):
        opt.add_param_group({"params": [b, c]})              # b got state, c failed: both rolled back
    monkeypatch.undo()
    assert len(opt.param_groups) == 1 and b not in opt.state and c not in opt.state
    assert _state_bytes(opt) == before
    for m in (a, b, c):
        m.grad = SparseGrad([1], np.ones((1, 4), np.float32), m.weight.shape[0])
    opt.step()                                                # b and c are not in the optimizer
    opt.add_param_group({"params": [b, c]})
    opt.step()
    assert set(opt.state) == {a, b, c}


@pytest.mark.parametrize("cls", [optim.Adagrad, optim.RowWiseAdagrad], ids=lambda c: c.__name__)
@pytest.mark.parametrize("fused", [False, True])
def test_missing_state_is_refused_before_any_update(cls, fused):
    """poc_5: `del opt.state[b]` made step() update `a`, then raise KeyError('step') / KeyError('sum')."""
    a, b = cembed.Embedding(10, 4, sparse=True), cembed.Embedding(10, 4, sparse=True)
    opt = cls([a, b], lr=0.1)
    del opt.state[b]
    wa, wb, before = a.weight.copy(), b.weight.copy(), _state_bytes(opt)
    with pytest.raises(ValueError, match=r"\['params'\]\[1\]: optimizer state is missing"):
        if fused:
            b.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
        else:
            for m in (a, b):
                m.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
            opt.step()
    assert_bitwise_equal(a.weight, wa)
    assert_bitwise_equal(b.weight, wb)
    assert _state_bytes(opt) == before and b not in opt.state


# =========================================================================== 8. SparseAdam at lr 0

def test_sparse_adam_lr_zero_only_refused_by_the_constructor():
    """poc_8: torch checks lr > 0 in SparseAdam's constructor only; cembed refused lr == 0 at every
    step, so CosineAnnealingLR (eta_min=0) stopped training. Now as torch: a schedule, a group, a
    state dict may set 0; the steps match torch's, and a negative lr is still refused."""
    torch = require_torch()
    from cembed.optim.lr_scheduler import CosineAnnealingLR
    rng = np.random.default_rng(5)
    init = rng.standard_normal((10, 4)).astype(np.float32)
    m = cembed.Embedding.from_pretrained(init.copy(), freeze=False, sparse=True)
    opt = optim.SparseAdam([m], lr=0.1)
    sched = CosineAnnealingLR(opt, T_max=2)
    tm = torch.nn.Embedding.from_pretrained(torch.from_numpy(init.copy()), freeze=False, sparse=True)
    topt = torch.optim.SparseAdam(tm.parameters(), lr=0.1)
    tsched = torch.optim.lr_scheduler.CosineAnnealingLR(topt, T_max=2)
    lrs = []
    for epoch in range(5):
        idx = rng.integers(0, 10, 6)
        g = rng.standard_normal((6, 4)).astype(np.float32)
        m(idx)
        m.backward(g)
        opt.step()
        opt.zero_grad()
        topt.zero_grad()
        (tm(torch.from_numpy(idx)) * torch.from_numpy(g)).sum().backward()
        topt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
        tsched.step()
        np.testing.assert_allclose(m.weight, tm.weight.detach().numpy(), rtol=1e-6, atol=1e-7)
    assert 0.0 in lrs
    with pytest.raises(ValueError, match=r"defaults: learning rate \(lr\) must be > 0"):
        optim.SparseAdam([m], lr=0.0)
    optim.SparseAdam([{"params": [m], "lr": 0.0}], lr=0.1).step()   # torch accepts a group's 0 too
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(sd)
    opt.param_groups[0]["lr"] = -0.1
    m.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
    w = m.weight.copy()
    with pytest.raises(ValueError, match=r"learning rate \(lr\) must be >= 0"):
        opt.step()
    assert_bitwise_equal(m.weight, w)


# =========================================================================== 9. load hygiene

def _adam_with_state(tmp_path=None):
    m = cembed.Embedding(10, 4, sparse=True, seed=0)
    opt = optim.SparseAdam([m], lr=0.1)
    m.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
    opt.step()
    return m, opt


def test_deeply_nested_meta_is_a_value_error(tmp_path):
    """poc_9 (a): a crafted .npz whose __meta__ is JSON nested 100000 deep raised RecursionError."""
    m, opt = _adam_with_state()
    path = tmp_path / "x.npz"
    np.savez(path, __meta__=np.frombuffer(("[" * 100000 + "]" * 100000).encode(), np.uint8))
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="x.npz: not a readable cembed optimizer file"):
        opt.load(path)
    assert _state_bytes(opt) == before


@pytest.mark.parametrize("damage", ["compression", "encryption", "deflate"])
def test_a_damaged_member_header_is_a_value_error(tmp_path, damage):
    """A flipped byte in a member's zip header can name a compression method zipfile does not know, or
    encryption (zipfile raises NotImplementedError), or deflate data that is not (zlib.error): each is the
    ValueError naming the file, with nothing changed."""
    import zipfile

    m, opt = _adam_with_state()
    path = tmp_path / "opt.npz"
    opt.save(path)
    raw = bytearray(path.read_bytes())
    if damage == "deflate":   # store every member deflated, then mangle the first member's data
        with zipfile.ZipFile(path) as zin:
            members = [(info.filename, zin.read(info.filename)) for info in zin.infolist()]
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for name, data in members:
                zout.writestr(name, data)
        raw = bytearray(path.read_bytes())
        start = 30 + int.from_bytes(raw[26:28], "little") + int.from_bytes(raw[28:30], "little")
        raw[start:start + 16] = bytes([0xFF]) * 16
    else:
        for at in (0, raw.find(b"PK\x01\x02")):   # the first local header and the central directory entry
            if damage == "compression":
                raw[at + (8 if at == 0 else 10)] = 99
            else:
                raw[at + (6 if at == 0 else 8)] |= 0x01
    path.write_bytes(bytes(raw))
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="opt.npz: not a readable cembed optimizer file"):
        opt.load(path)
    assert _state_bytes(opt) == before


def test_a_member_numpy_would_read_by_another_name_is_refused(tmp_path):
    """np.load also finds the key '__meta__' in a member named plain '__meta__': one holding a .npy
    header that claims 2**44 bytes was a MemoryError. save() writes only .npy members: others are refused."""
    import io
    import zipfile
    from numpy.lib import format as npy_format

    m, opt = _adam_with_state()
    good = tmp_path / "good.npz"
    opt.save(good)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (1 << 44,)})
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            if info.filename == "__meta__.npy":
                zout.writestr("__meta__", header.getvalue() + bytes(16))
            else:
                zout.writestr(info.filename, zin.read(info.filename))
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="member __meta__ is not an array"):
        opt.load(bad)
    assert _state_bytes(opt) == before


@pytest.mark.parametrize("member", ["0/exp_avg.npy", "__meta__.npy"])
def test_a_member_header_claiming_more_than_the_member_holds_is_a_value_error(tmp_path, member):
    """A damaged .npz member header claiming a shape of 2**40 rows made load() try to allocate 16 TiB:
    a MemoryError (or, where memory is overcommitted, a huge allocation), not the ValueError naming the
    file. The members' sizes are checked against their headers before any is read."""
    import io
    import zipfile
    from numpy.lib import format as npy_format

    m, opt = _adam_with_state()
    good = tmp_path / "good.npz"
    opt.save(good)
    with zipfile.ZipFile(good) as zin:
        members = [(info.filename, zin.read(info.filename)) for info in zin.infolist()]
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as zout:
        for name, raw in members:
            if name == member:
                header = io.BytesIO()
                npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                           "shape": (2 ** 40, 4)})
                raw = header.getvalue() + bytes(64)
            zout.writestr(name, raw)
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match=f"bad.npz: not a readable cembed optimizer file .*member {member} holds"):
        opt.load(bad)
    assert _state_bytes(opt) == before
    # the archive's directory made to agree with a header claiming 2**28 floats: refused by the
    # file's size before anything is read (it passed the header check and 1 GiB was allocated)
    header = io.BytesIO()
    npy_format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 28,)})
    with zipfile.ZipFile(bad, "w") as zout:
        for name, raw in members:
            zout.writestr(name, header.getvalue() + bytes(64) if name == member else raw)
    raw = bytearray(bad.read_bytes())
    at = raw.find(b"PK\x01\x02")
    while raw[at + 46:at + 46 + int.from_bytes(raw[at + 28:at + 30], "little")].decode() != member:
        at = raw.find(b"PK\x01\x02", at + 4)   # the member's central directory entry
    raw[at + 24:at + 28] = (len(header.getvalue()) + 2 ** 30).to_bytes(4, "little")   # its uncompressed size
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"member {member}: the archive's directory says"):
        opt.load(bad)
    assert _state_bytes(opt) == before
    opt.load(good)


@pytest.mark.parametrize("keys", [[0.5], [" 0"], ["0x"], [True], ["\u0660"], [None], [0, "0"], [np.int64(0), "0"],
                                  ["0", "00"]], ids=repr)
def test_state_keys_are_ints_or_digit_strings_each_once(keys):
    """poc_9 (b): keys went through int(), so 0.5, "0" and 0 all named parameter 0 and overwrote each
    other silently."""
    m, opt = _adam_with_state()
    sd = opt.state_dict()
    entry = sd["state"].pop(0)
    for k, key in enumerate(keys):
        e = copy.deepcopy(entry)
        e["step"] = 70 + k
        sd["state"][key] = e
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="not a parameter index|two entries for parameter 0"):
        opt.load_state_dict(sd)
    assert _state_bytes(opt) == before


@pytest.mark.parametrize("key", [0, "0", np.int64(0), np.uint8(0)], ids=repr)
def test_state_keys_that_name_a_parameter_once_load(key):
    m, opt = _adam_with_state()
    sd = opt.state_dict()
    sd["state"][key] = sd["state"].pop(0)
    sd["state"][key]["step"] = 5
    opt.load_state_dict(sd)
    assert opt.state[m]["step"] == 5


def test_file_with_two_keys_for_one_parameter_is_refused(tmp_path):
    m, opt = _adam_with_state()
    opt.save(tmp_path / "opt.npz")
    with np.load(tmp_path / "opt.npz") as data:
        arrays = dict(data)
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["state"]["00"] = copy.deepcopy(meta["state"]["0"])
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "two.npz", **arrays)
    before = _state_bytes(opt)
    with pytest.raises(ValueError, match="two.npz.*two entries for parameter 0"):
        opt.load(tmp_path / "two.npz")
    assert _state_bytes(opt) == before


# =========================================================================== 10. parameter lists, accumulators

@pytest.mark.parametrize("cls,kw", OPTIMIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_module_appended_twice_is_refused_before_any_update(cls, kw):
    """A module appended by hand to param_groups[g]['params'] a second time was updated twice per step
    and its state dict could not be loaded back: refused before anything changes."""
    a, b = cembed.Embedding(10, 4, sparse=True, seed=0), cembed.Embedding(10, 4, sparse=True, seed=1)
    opt = cls([a, b], **kw)
    opt.add_param_group({"params": [cembed.Embedding(5, 4, sparse=True)]})
    opt.param_groups[1]["params"].append(a)
    for m in (a, b):
        m.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
    wa, wb, before = a.weight.copy(), b.weight.copy(), [(m, copy.deepcopy(e)) for m, e in opt.state.items()]
    match = r"param_groups\[1\]\['params'\]\[1\] \(Embedding\) is the same module as param_groups\[0\]\['params'\]\[0\]"
    for call in (opt.step, opt.zero_grad, opt.state_dict,
                 lambda: (setattr(b, "grad", None),
                          b.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt))):
        with pytest.raises(ValueError, match=match):
            call()
        assert_bitwise_equal(a.weight, wa)
        assert_bitwise_equal(b.weight, wb)
        assert [m for m, _ in before] == list(opt.state)
    if cls is optim.SparseAdamW:
        with pytest.raises(ValueError, match=match):
            opt.apply_pending_decay()
    opt.param_groups[1]["params"].pop()
    b.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
    opt.step()


@pytest.mark.parametrize("bad", [3, None, np.ones((2, 2), np.float32), "weight"], ids=repr)
def test_non_module_in_params_is_a_type_error(bad):
    a = cembed.Embedding(10, 4, sparse=True)
    opt = optim.SGD([a], lr=0.1)
    opt.param_groups[0]["params"].append(bad)
    a.grad = SparseGrad([1], np.ones((1, 4), np.float32), 10)
    w = a.weight.copy()
    for call in (opt.step, opt.zero_grad, opt.state_dict,
                 lambda: (setattr(a, "grad", None),
                          a.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt))):
        with pytest.raises(TypeError, match=r"\['params'\]\[1\] must be a module with .weight and .grad"):
            call()
    assert_bitwise_equal(a.weight, w)
    opt.param_groups[0]["params"] = a                           # not a list
    with pytest.raises(TypeError, match=r"param_groups\[0\] must be a dict whose 'params' is a list"):
        opt.step()


ACCUMULATORS = [(optim.SparseAdam, "exp_avg_sq"), (optim.SparseAdamW, "exp_avg_sq"), (optim.Adagrad, "sum"),
                (optim.RowWiseAdagrad, "sum")]


@pytest.mark.parametrize("cls,name", ACCUMULATORS, ids=lambda v: getattr(v, "__name__", v))
@pytest.mark.parametrize("dtype,state_dtype", [(np.float32, None), (np.float64, None), (np.float16, "float16"),
                                               ("bfloat16", "bfloat16")])
def test_accumulators_of_squares_must_not_be_negative_on_load(cls, name, dtype, state_dtype, tmp_path):
    """SparseAdam, SparseAdamW and Adagrad loaded a negative exp_avg_sq / sum without complaint (NaN
    weights at the next step), RowWiseAdagrad refused it (and NaN / inf too). One rule for all four:
    no value < 0; NaN and inf, which training on non-finite gradients leaves, load back."""
    dtype = cembed._dtypes.resolve_dtype(dtype)
    gdtype = cembed._dtypes.compute_dtype(dtype)
    m = cembed.Embedding(10, 4, sparse=True, seed=0)
    m.weight = m.weight.astype(dtype)
    opt = cls([m], lr=0.1, state_dtype=state_dtype)
    m.grad = SparseGrad([1, 2], np.ones((2, 4), gdtype), 10)
    opt.step()
    sd = opt.state_dict()
    before = _state_bytes(opt)
    for bad in (-1.0, -np.inf, -1e-30):
        broken = copy.deepcopy(sd)
        arr = broken["state"][0][name]
        arr[(3,) + (0,) * (arr.ndim - 1)] = bad
        if arr[(3,) + (0,) * (arr.ndim - 1)] == 0:          # -1e-30 is -0.0 in 16 bits: not below 0
            continue
        with pytest.raises(ValueError, match=rf"\['{name}'\] must hold values >= 0.*got -"):
            opt.load_state_dict(broken)
        assert _state_bytes(opt) == before
    kept = copy.deepcopy(sd)
    kept["state"][0][name].reshape(10, -1)[3, 0] = np.inf
    kept["state"][0][name].reshape(10, -1)[4, 0] = np.nan
    kept["state"][0][name].reshape(10, -1)[5, 0] = -0.0
    opt.load_state_dict(kept)
    opt.save(tmp_path / "opt.npz")
    opt.load(tmp_path / "opt.npz")
    assert _state_bytes(opt) != before
    m.grad = SparseGrad([5], np.ones((1, 4), gdtype), 10)
    opt.step()
    assert np.isfinite(m.weight.astype(np.float32)[5]).all()


def test_state_arrays_that_share_memory_are_refused():
    """A hand-edited state whose arrays alias each other (or the weight) was accepted, and on a 16-bit
    table the fused and unfused updates then differed: every array an update writes is its own."""
    emb = cembed.Embedding(300, 8, sparse=True, dtype=np.float16, seed=0)
    opt = cembed.optim.SparseAdam([emb], lr=0.01)
    emb.backward(np.ones((2, 8), np.float32), np.array([1, 2]), optimizer=opt)
    opt.state[emb]["exp_avg_sq"] = opt.state[emb]["exp_avg"]
    before = (emb.weight.tobytes(), opt.state[emb]["exp_avg"].tobytes())
    for fused in (False, True):
        with pytest.raises(ValueError, match="'exp_avg_sq' shares memory with optimizer state 'exp_avg'"):
            if fused:
                emb.backward(np.ones((1, 8), np.float32), np.array([3]), optimizer=opt)
            else:
                emb.backward(np.ones((1, 8), np.float32), np.array([3]))
                opt.step()
        emb.grad = None
        assert (emb.weight.tobytes(), opt.state[emb]["exp_avg"].tobytes()) == before
    plain = cembed.Embedding(50, 4, sparse=True, seed=0)
    sgd = cembed.optim.SGD([plain], lr=0.1, momentum=0.9)
    plain.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=sgd)
    sgd.state[plain]["momentum_buffer"] = plain.weight
    with pytest.raises(ValueError, match="shares memory with the weight"):
        plain.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=sgd)


@pytest.mark.parametrize("make", [cembed.optim.Adagrad, cembed.optim.RowWiseAdagrad])
def test_an_initial_accumulator_the_state_dtype_cannot_hold_is_refused(make):
    emb = cembed.Embedding(10, 4, sparse=True, dtype=np.float16)
    for value in (1e5, 1e-9):
        with pytest.raises(ValueError, match="initial_accumulator_value .* cannot be kept in float16 state"):
            make([emb], lr=0.1, initial_accumulator_value=value, state_dtype="float16")
    make([emb], lr=0.1, initial_accumulator_value=1e5)   # float32 state holds it


def test_a_malformed_or_exhausted_rounding_step_is_refused():
    emb = cembed.Embedding(10, 4, sparse=True, dtype=np.float16, seed=0)
    opt = cembed.optim.SGD([emb], lr=0.1)
    emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    saved = opt.state_dict()
    saved["state"][0]["rounding_step"] = None
    with pytest.raises(TypeError, match="rounding_step'\\] must be an int"):
        opt.load_state_dict(saved)
    saved["state"][0]["rounding_step"] = 2 ** 63 - 1
    with pytest.raises(ValueError, match="rounding_step'\\] must be <= "):
        opt.load_state_dict(saved)
    opt.state[emb]["rounding_step"] = 2 ** 63 - 1            # edited by hand: refused at the next update
    weight = emb.weight.tobytes()
    with pytest.raises(ValueError, match="rounding_step' is at its bound"):
        emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    assert emb.weight.tobytes() == weight


@pytest.mark.parametrize("fused", [False, True])
def test_a_rounding_step_that_runs_code_is_refused_before_anything_changes(fused):
    """The 16-bit rounding counter was checked with operator.index (any object with __index__), and
    converted again with int() inside the update, after every check: a hook there swapped the state for
    a 1-value array the kernel then indexed for every row (a segfault). It must be exactly an int type."""
    emb = cembed.Embedding(2000, 8, sparse=True, seed=0, dtype=np.float16)
    opt = cembed.optim.RowWiseAdagrad([emb], lr=0.1)
    emb.backward(np.ones((1, 8), np.float32), np.array([0]), optimizer=opt)
    calls = []

    class Counter:
        def __index__(self):
            calls.append(1)
            opt.state[emb]["sum"] = np.zeros(1, np.float32)
            return 1

    for hostile in (Counter(), type("Step", (int,), {})(1), True):
        opt.state[emb]["rounding_step"] = hostile
        before = (emb.weight.tobytes(), np.array(opt.state[emb]["sum"]).tobytes())
        with pytest.raises(ValueError, match="rounding_step' must be an int .* not a subclass"):
            if fused:
                emb.backward(np.ones((2000, 8), np.float32), np.arange(2000), optimizer=opt)
            else:
                emb.backward(np.ones((2000, 8), np.float32), np.arange(2000))
                try:
                    opt.step()
                finally:
                    emb.grad = None
        assert (emb.weight.tobytes(), np.array(opt.state[emb]["sum"]).tobytes()) == before and not calls
    opt.state[emb]["rounding_step"] = np.int64(1)   # a NumPy integer is fine
    emb.backward(np.ones((1, 8), np.float32), np.array([0]), optimizer=opt)
    assert opt.state[emb]["rounding_step"] == 2


def test_the_fused_step_refuses_state_replaced_while_it_was_checked(monkeypatch):
    """step() compares the weight, gradient and state with what it checked before it updates (code run
    from an option may replace them); the fused backward did not compare."""
    emb = cembed.Embedding(50, 4, sparse=True, seed=0)
    opt = cembed.optim.SparseAdam([emb], lr=0.1)
    emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    real_check = cembed.optim.SparseAdam._check_state

    def check_then_swap(self, state, weight, where):   # stands for code run by a later check
        real_check(self, state, weight, where)
        state["exp_avg"] = np.array(state["exp_avg"])

    before = emb.weight.tobytes()
    monkeypatch.setattr(cembed.optim.SparseAdam, "_check_state", check_then_swap)
    with pytest.raises(ValueError, match="changed while the step was being checked"):
        emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    assert emb.weight.tobytes() == before and opt.state[emb]["step"] == 1


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_loaded_state_is_the_state_that_was_checked(tmp_path, on_disk):
    """With a state_dir, load_state_dict kept the caller's arrays after checking them and copied them
    into the state files only at the end: a later entry's __deepcopy__ could make a checked
    accumulator negative in between (the next step gave NaN weights). The caller's code now runs
    before any check, and a value that is no plain number is refused."""
    a, b = cembed.Embedding(4, 2, sparse=True, seed=0), cembed.Embedding(4, 2, sparse=True, seed=1)
    opt = optim.SparseAdam([a, b], lr=0.1, **({"state_dir": tmp_path / "s"} if on_disk else {}))
    for m in (a, b):
        m.backward(np.ones((1, 2), np.float32), np.array([0]), optimizer=opt)
    saved = opt.state_dict()
    squares = saved["state"][0]["exp_avg_sq"]

    class Step(int):
        def __deepcopy__(self, memo):
            squares[...] = -1.0   # after entry 0 was checked, in the old order
            return 1

    saved["state"][1]["step"] = Step(1)
    before = {m: {k: np.array(v) for k, v in opt.state[m].items() if isinstance(v, np.ndarray)} for m in (a, b)}
    with pytest.raises(ValueError, match="exp_avg_sq'\\] must hold values >= 0"):
        opt.load_state_dict(saved)
    for m in (a, b):
        for k, v in before[m].items():
            assert_bitwise_equal(opt.state[m][k], v)

    class Sly:
        def __deepcopy__(self, memo):
            return self

        def __index__(self):
            squares[...] = -1.0
            return 1

    saved = opt.state_dict()
    squares = saved["state"][0]["exp_avg_sq"]
    saved["state"][1]["step"] = Sly()
    with pytest.raises(ValueError, match="state\\[1\\]\\['step'\\] is a Sly: a state holds arrays and plain numbers"):
        opt.load_state_dict(saved)
    assert np.all(squares >= 0)


def test_prefetch_with_something_that_is_not_an_optimizer():
    emb = cembed.Embedding(10, 4, sparse=True)
    with pytest.raises(TypeError, match="prefetch: optimizer must be a cembed.optim optimizer"):
        emb.prefetch(np.array([1]), optimizer=object())


@pytest.mark.parametrize("how", ["storage.map_array", "np.load"])
def test_state_that_maps_the_pages_of_another_array_is_refused(tmp_path, how):
    """Two maps of one file are two addresses: numpy.may_share_memory says they are apart, but a write
    through one is read through the other. A state array mapping the weight's file is refused like one
    sharing its memory, before anything changes."""
    path = tmp_path / "w.npy"
    emb = cembed.Embedding.from_pretrained(cembed.open_table(path, 20, 4, init="normal", seed=0), freeze=False,
                                           sparse=True)
    opt = cembed.optim.SGD([emb], lr=0.1, momentum=0.9)
    emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    second = cembed.storage.map_array(path, "r+") if how == "storage.map_array" else np.load(path, mmap_mode="r+")
    assert not np.may_share_memory(second, emb.weight)
    opt.state[emb]["momentum_buffer"] = second
    before = np.array(emb.weight).tobytes()
    with pytest.raises(ValueError, match="optimizer state 'momentum_buffer' shares memory with the weight"):
        emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    assert np.array(emb.weight).tobytes() == before


def test_may_share_file_pages_compares_the_bytes_each_map_covers(tmp_path):
    path = tmp_path / "w.npy"
    table = cembed.open_table(path, 20, 4, init="normal", seed=0)
    other = np.load(path, mmap_mode="r+")[5:15]   # a view of another map: its rows' bytes only
    share = cembed.storage.may_share_file_pages
    assert share(other, table) and share(table, other)
    assert share(other[2:3], table[7:8])            # row 7 in both
    assert not share(other[2:3], table[8:9])        # rows 7 and 8
    assert not share(other[:0], table)              # no bytes
    assert not share(other, np.zeros((20, 4), np.float32))
    # nothing is written into the file through copy-on-write or read-only maps
    assert not share(cembed.storage.map_array(path, "c"), np.load(path, mmap_mode="c"))
    assert not share(cembed.storage.map_array(path, "r"), np.load(path, mmap_mode="r"))
    # ... but a shared map's writes show through them
    assert share(cembed.storage.map_array(path, "c"), table) and share(np.load(path, mmap_mode="r"), table)
    # any array whose memory is the map's: a plain ndarray view of a memmap
    assert share(np.asarray(other)[2:3], table[7:8]) and share(other.view(np.ndarray), table)
    assert not share(np.asarray(other)[2:3], table[8:9])


def test_may_share_file_pages_tells_the_mapped_file_not_the_name(tmp_path):
    """A map keeps the file it was made of: after the name is given to a new file, a map of the new
    one and the old map share nothing (the name was compared); a hard link is the same file."""
    path = tmp_path / "w.npy"
    cembed.open_table(path, 20, 4, init="normal", seed=0)
    old = np.load(path, mmap_mode="r+")
    os.link(path, tmp_path / "link.npy")
    cembed.open_table(tmp_path / "new.npy", 20, 4, init="normal", seed=1)
    os.replace(tmp_path / "new.npy", path)
    new = cembed.open_table(path, mode="r+")
    linked = cembed.open_table(tmp_path / "link.npy", mode="r+")
    share = cembed.storage.may_share_file_pages
    assert not share(old, new) and share(old, linked) and share(np.asarray(old), linked)


def test_state_shared_between_two_parameters_is_refused():
    """Within one parameter shared state was refused; across two it was not: one module's update then
    changed the other's momentum (or weight)."""
    a, b = cembed.Embedding(20, 4, sparse=True, seed=0), cembed.Embedding(20, 4, sparse=True, seed=1)
    opt = cembed.optim.SGD([a, b], lr=0.1, momentum=0.9)
    for m in (a, b):
        m.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    for shared in (lambda: opt.state[a]["momentum_buffer"], lambda: a.weight):
        opt.state[b]["momentum_buffer"] = shared()
        before = (a.weight.tobytes(), b.weight.tobytes())
        with pytest.raises(ValueError, match="shares memory with the"):
            b.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
        a.backward(np.ones((1, 4), np.float32), np.array([1]))
        with pytest.raises(ValueError, match="shares memory with the"):
            opt.step()
        opt.zero_grad()
        assert (a.weight.tobytes(), b.weight.tobytes()) == before
        opt.state[b]["momentum_buffer"] = opt.state[b]["momentum_buffer"].copy()


def test_messages_a_user_can_act_on(tmp_path):
    """SparseAdam's dense-gradient refusal suggested torch's Adam (cembed has none), loading another
    optimizer class's file raised a private ValueError subclass, and a state_dir that is a file said
    'cannot create the directory (File exists)'."""
    emb = cembed.Embedding(4, 2, seed=0)
    emb.grad = np.ones((4, 2), np.float32)
    for make in (optim.SparseAdam, optim.SparseAdamW):
        with pytest.raises(TypeError, match="sparse=True, or use SGD, Adagrad or RowWiseAdagrad"):
            make([emb], lr=0.1).step()
    sgd = optim.SGD([emb], lr=0.1)
    sgd.save(tmp_path / "sgd.npz")
    with pytest.raises(ValueError, match="holds SGD state, not Adagrad") as info:
        optim.Adagrad([emb], lr=0.1).load(tmp_path / "sgd.npz")
    assert type(info.value) is ValueError
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="state_dir .*file exists and is not a directory"):
        optim.SparseAdam([cembed.Embedding(4, 2, sparse=True)], state_dir=tmp_path / "file")


@pytest.mark.parametrize("how", ["load_state_dict", "live"])
def test_a_state_key_that_runs_code_is_refused(tmp_path, how):
    """A str subclass as a state key passed every key check (same hash, its own __eq__), and its
    __eq__ then ran at each later lookup, after the checks: it rewrote a checked active_rows before
    the kernel read it (a segfault), or a checked accumulator before it was copied into its file."""
    n_rows, dim = 4, 2
    a, b = cembed.Embedding(n_rows, dim, sparse=True, seed=0), cembed.Embedding(n_rows, dim, sparse=True, seed=1)
    opt = optim.SGD([a, b], lr=0.1, momentum=0.9)
    calls = []

    class Key(str):
        __hash__ = str.__hash__

        def __eq__(self, other):
            calls.append(1)
            return str.__eq__(self, other)

    for m in (a, b):
        m.backward(np.ones((1, dim), np.float32), np.array([1]), optimizer=opt)
    if how == "load_state_dict":
        saved = opt.state_dict()
        saved["state"][1] = {Key("momentum_buffer"): saved["state"][1]["momentum_buffer"],
                             "active_rows": saved["state"][1]["active_rows"]}
        with pytest.raises(ValueError, match="state_dict state\\[1\\] has a key of type Key"):
            opt.load_state_dict(saved)
    else:
        buf = opt.state[b].pop("momentum_buffer")
        opt.state[b][Key("momentum_buffer")] = buf
        before = a.weight.copy()
        for m in (a, b):
            m.backward(np.ones((1, dim), np.float32), np.array([1]))
        with pytest.raises(ValueError, match="optimizer state has a key of type Key"):
            opt.step()
        assert_bitwise_equal(a.weight, before)
    assert not calls


def test_sgd_loads_no_live_rows_given_as_an_empty_list():
    """active_rows=[] was refused ('must be a 1-D integer array': NumPy makes [] float64) while [1, 3]
    loaded: an empty set of live rows loads in the forms a non-empty one does."""
    emb = cembed.Embedding(4, 2, sparse=True, seed=0)
    opt = optim.SGD([emb], lr=0.1, momentum=0.9)
    emb.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
    for rows in ([], (), np.zeros(0, np.int64)):
        saved = opt.state_dict()
        saved["state"][0]["active_rows"] = rows
        opt.load_state_dict(saved)
        assert opt.state[emb]["active_rows"].dtype == np.int64 and opt.state[emb]["active_rows"].size == 0


# =========================================================================== review of 2026-11-27 (session 20)

LAZY_STATE = [(optim.SparseAdam, {}), (optim.SparseAdamW, {}), (optim.SGD, {"momentum": 0.9}),
              (optim.SparseAdam, {"bias_correction": "row"})]


@pytest.mark.parametrize("cls,opts", LAZY_STATE, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_parameters_sharing_one_state_dict_are_refused(cls, opts, dtype):
    """opt.state[a] and opt.state[b] set to one empty dict: the step checked both while it was empty,
    a's update then made arrays of a's shape in it and b's update ran the row kernel on them with b's
    row ids — a write far outside them (a segfault). Refused, nothing changed."""
    small = cembed.Embedding(2, 4, sparse=True, seed=0, dtype=dtype)
    big = cembed.Embedding(200_000, 4, sparse=True, seed=1, dtype=dtype)
    opt = cls([small, big], lr=0.1, **opts)
    shared = {}
    opt.state[small] = opt.state[big] = shared
    small.grad = SparseGrad([0], np.ones((1, 4), np.float32), 2)
    big.grad = SparseGrad([199_999], np.ones((1, 4), np.float32), 200_000)
    before = small.weight.copy(), big.weight[199_999].copy()
    with pytest.raises(ValueError, match=r"params'\]\[1\]: its optimizer state is the same dict as the state of "
                                         r"param_groups\[0\]\['params'\]\[0\]"):
        opt.step()
    big.grad = None
    with pytest.raises(ValueError, match="same dict"):
        big.backward(np.ones((1, 4), np.float32), np.array([199_999]), optimizer=opt)
    assert shared == {}
    assert_bitwise_equal(small.weight, before[0])
    assert_bitwise_equal(big.weight[199_999], before[1])


@pytest.mark.parametrize("cls,opts", LAZY_STATE, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("fused", [False, True])
def test_a_step_that_cannot_allocate_a_parameters_state_changes_nothing(cls, opts, fused, monkeypatch):
    """The state a step makes for a parameter's first update did not fit in memory (MemoryError for a
    table larger than RAM): the parameters before it were already updated, and it was left with a
    half-made state ({'step': 0}) that step(), save() and load_state_dict() refused from then on. Now the
    arrays are made before any parameter is updated: nothing changes, and the optimizer carries on."""
    small = cembed.Embedding(4, 8, sparse=True, seed=0)
    huge = cembed.Embedding(50, 8, sparse=True, seed=1)       # (its state's allocation fails below)
    opt = cls([small, huge], lr=0.1, **opts)
    real = cembed.storage.aligned_zeros

    def failing(shape, dtype=np.float32):
        if np.ndim(shape) and shape[0] == 50:
            raise MemoryError("Unable to allocate the state of a huge table (injected)")
        return real(shape, dtype)

    g = np.ones((1, 8), np.float32)
    small.backward(g, np.array([1]), optimizer=opt)           # small has its state
    monkeypatch.setattr(cembed.storage, "aligned_zeros", failing)
    weights, state = (small.weight.copy(), huge.weight.copy()), _state_bytes(opt)
    with pytest.raises(MemoryError, match="injected"):
        if fused:
            huge.backward(g, np.array([3]), optimizer=opt)
        else:
            small.backward(g, np.array([1]))
            huge.backward(g, np.array([3]))
            opt.step()
    assert huge not in opt.state
    assert_bitwise_equal(small.weight, weights[0])
    assert_bitwise_equal(huge.weight, weights[1])
    assert _state_bytes(opt) == state
    monkeypatch.undo()
    opt.zero_grad()
    huge.backward(g, np.array([3]), optimizer=opt)            # carries on: state made, saved and loaded
    opt.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("cls", [optim.Adagrad, optim.RowWiseAdagrad], ids=lambda c: c.__name__)
def test_a_state_missing_a_parameter_is_refused_by_save_as_load_refuses_it(cls, tmp_path):
    """del opt.state[b] (an optimizer that makes its state when a parameter joins): save() and
    save_checkpoint() wrote it, and load() / load_checkpoint() refused their own file ('lacks the state of
    a parameter'). The save refuses it, writing nothing (found by a fuzzer)."""
    a, b = cembed.Embedding(5, 2, sparse=True, seed=0), cembed.Embedding(6, 2, sparse=True, seed=1)
    opt = cls([a, b], lr=0.1)
    a.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
    del opt.state[b]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\]: optimizer state is missing"):
        opt.save(tmp_path / "opt.npz")
    with pytest.raises(ValueError, match="optimizer state is missing"):
        cembed.save_checkpoint(tmp_path / "ck", [a, b], opt)
    assert not os.path.exists(tmp_path / "opt.npz") and not os.path.exists(tmp_path / "ck")
