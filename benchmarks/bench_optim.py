"""Optimizer benchmarks (issue 4): one step of SparseAdam / Adagrad / SGD on the workload's sparse
gradient (~99k unique rows of a 1M x 128 table), cembed beside torch (given the gradient as torch's
embedding backward produces it: uncoalesced COO) and a NumPy implementation of the same rule; and a
full training step (forward + sparse backward + SparseAdam) against the same step in torch.

    python -m pytest benchmarks/bench_optim.py --benchmark-only --benchmark-group-by=group
"""
import warnings

import numpy as np
import pytest

from cembed import Embedding, _buffer_cache, _grad, _sort, get_num_threads, optim
from cembed import functional as F
from cembed.apps import baselines
from cembed.storage import aligned_copy


class Table:
    def __init__(self, weight):
        self.weight = weight
        self.grad = None


@pytest.fixture(scope="module")
def sparse_grad(workload):
    return F.embedding_backward(workload["grad_output"], workload["indices"], workload["n_rows"], sparse=True)


def _torch_param(torch, workload):
    w = torch.nn.Parameter(torch.from_numpy(aligned_copy(workload["weight"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w.grad = torch.sparse_coo_tensor(torch.from_numpy(workload["indices"])[None],
                                         torch.from_numpy(workload["grad_output"]),
                                         tuple(w.shape), check_invariants=False)
    return w


OPTIMIZERS = {
    "SparseAdam": (lambda p: optim.SparseAdam(p, lr=1e-3), "SparseAdam", dict(lr=1e-3)),
    "Adagrad": (lambda p: optim.Adagrad(p, lr=1e-2), "Adagrad", dict(lr=1e-2)),
    "SGD": (lambda p: optim.SGD(p, lr=0.1), "SGD", dict(lr=0.1)),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_cembed(benchmark, workload, sparse_grad, name):
    benchmark.group = f"optim-{name}"
    table = Table(aligned_copy(workload["weight"]))
    table.grad = sparse_grad
    opt = OPTIMIZERS[name][0]([table])
    opt.step()  # state allocated outside the timing
    benchmark(opt.step)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_numpy(benchmark, workload, sparse_grad, name):
    benchmark.group = f"optim-{name}"
    weight = aligned_copy(workload["weight"])
    state = {}
    args = (name, weight, state, sparse_grad.indices, sparse_grad.values)
    kwargs = OPTIMIZERS[name][2]
    baselines.optimizer_step(*args, **kwargs)   # state allocated outside the timing
    benchmark.pedantic(baselines.optimizer_step, args=args, kwargs=kwargs, rounds=5, iterations=1)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_torch(benchmark, workload, torch, name):
    benchmark.group = f"optim-{name}"
    _, torch_name, kwargs = OPTIMIZERS[name]
    w = _torch_param(torch, workload)
    opt = getattr(torch.optim, torch_name)([w], **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.step()
        benchmark(opt.step)


@pytest.mark.benchmark(group="train-step")
def test_train_step_cembed(benchmark, workload):
    emb = Embedding.from_pretrained(aligned_copy(workload["weight"]), freeze=False, sparse=True)
    opt = optim.SparseAdam([emb], lr=1e-3)
    idx, g = workload["indices"], workload["grad_output"]

    def step():
        emb(idx)
        emb.backward(g)
        opt.step()
        opt.zero_grad()

    step()
    benchmark(step)


@pytest.mark.benchmark(group="train-step")
def test_train_step_torch(benchmark, workload, torch):
    emb = torch.nn.Embedding.from_pretrained(torch.from_numpy(aligned_copy(workload["weight"])), freeze=False,
                                             sparse=True)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=1e-3)
    idx, g = torch.from_numpy(workload["indices"]), torch.from_numpy(workload["grad_output"])

    def step():
        emb(idx).backward(g)
        opt.step()
        opt.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step()
        benchmark(step)


@pytest.mark.benchmark(group="train-step")
def test_train_step_cembed_fused(benchmark, workload):
    """The same step with the fused backward + update (no coalesced gradient in memory)."""
    emb = Embedding.from_pretrained(aligned_copy(workload["weight"]), freeze=False, sparse=True)
    opt = optim.SparseAdam([emb], lr=1e-3)
    idx, g = workload["indices"], workload["grad_output"]

    def step():
        emb(idx)
        emb.backward(g, optimizer=opt)

    step()
    benchmark(step)


# The fused step phase by phase (docs/performance.md, "The fused training step and its limit"): the
# forward gather, the backward's radix sort of the indices, the fused sum + SparseAdam row update, and a
# streaming copy of the gather output's size as the memory ceiling, all on the workload's data.
#
#     python -m pytest benchmarks/bench_optim.py -k phase --benchmark-only --benchmark-group-by=group

@pytest.mark.benchmark(group="train-step-phases")
def test_phase_gather(benchmark, workload):
    benchmark(F.embedding, workload["indices"], workload["weight"])


@pytest.mark.benchmark(group="train-step-phases")
def test_phase_sort(benchmark, workload):
    idx = workload["indices"]
    benchmark(_sort.sort_rows, idx, get_num_threads(), True, _buffer_cache.empty)


@pytest.mark.benchmark(group="train-step-phases")
def test_phase_sum_and_update(benchmark, workload):
    """_grad.segment_update with SparseAdam's row rule (lr 1e-3, first step's bias correction)."""
    idx, g, w = workload["indices"], workload["grad_output"], aligned_copy(workload["weight"])
    m, v = np.zeros_like(w), np.zeros_like(w)
    order, rows, starts = _sort.sort_rows(idx, get_num_threads())
    seg_ids = np.arange(rows.size, dtype=np.int64)
    none1, none_i = np.zeros(0, np.float32), np.zeros(0, np.int64)
    step = 1e-3 * (1 - 0.999) ** 0.5 / (1 - 0.9)
    benchmark(_grad.segment_update, g, order, starts, rows, seg_ids, none_i, none1, False,
              int(_grad.UpdateKind.UPDATE_ADAM), w, m, v, none1, np.zeros(0, np.float64), none_i,
              np.zeros(0, np.float64), 0.1, 0.001, 1e-8, -step, 0, False, get_num_threads())


@pytest.mark.benchmark(group="train-step-phases")
def test_phase_streaming_copy(benchmark, workload):
    """The ceiling: numpy.copyto of an array the size of the gather's output."""
    src = workload["grad_output"]
    dst = np.empty_like(src)
    benchmark(np.copyto, dst, src)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "bfloat16_activations"])
def test_train_step_fused_half(benchmark, workload, dtype):
    """The fused SparseAdam step on a bfloat16 table with bfloat16 state (stochastic rounding) beside
    the same step on float32 (issue 12 target: >= 1.3x at 2 threads); "bfloat16_activations" also looks
    up in bfloat16 (``out_dtype``) and takes its gradient rows in bfloat16:

        python -m pytest benchmarks/bench_optim.py -k fused_half --benchmark-only --benchmark-group-by=group
    """
    benchmark.group = "train-step-16-bit"
    idx, g, out_dtype = workload["indices"], workload["grad_output"], None
    if dtype.startswith("bfloat16"):
        bf16 = pytest.importorskip("ml_dtypes").bfloat16
        table = workload["weight"].astype(bf16)
        extra = dict(state_dtype="bfloat16")
        if dtype == "bfloat16_activations":
            g, out_dtype = g.astype(bf16), table.dtype
    else:
        table, extra = aligned_copy(workload["weight"]), {}
    emb = Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.SparseAdam([emb], lr=1e-3, **extra)

    def step():
        emb(idx, out_dtype=out_dtype)
        emb.backward(g, optimizer=opt)

    step()
    benchmark(step)


@pytest.mark.parametrize("n_groups", [1, 2])
def test_param_groups_do_not_slow_the_step(benchmark, workload, sparse_grad, n_groups):
    """SparseAdam over two tables, in one param group or in two: within noise of each other."""
    benchmark.group = "optim-param-groups"
    tables = [Table(aligned_copy(workload["weight"])) for _ in range(2)]
    for t in tables:
        t.grad = sparse_grad
    params = [{"params": tables}] if n_groups == 1 else [{"params": [t]} for t in tables]
    opt = optim.SparseAdam(params, lr=1e-3)
    opt.step()
    benchmark(opt.step)
