"""Gradient benchmarks (issue 3): sparse (coalesced) and dense embedding backward.

Groups: cembed beside NumPy (`np.unique` + `np.add.at`; `np.add.at` into zeros) and torch (sparse COO
gradient + `coalesce()`; `embedding_dense_backward`), all on the shared workload. The `grad-sparse-rows`
group shows that the sparse backward costs the same for a 1M- and a 50M-row table (work ∝ batch).

    python -m pytest benchmarks/bench_grad.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from cembed import functional as F
from cembed.apps import baselines


@pytest.fixture(scope="module")
def data(workload):
    return workload["grad_output"], workload["indices"], workload["n_rows"]


@pytest.mark.benchmark(group="grad-sparse")
def test_sparse_cembed(benchmark, data):
    g, idx, n_rows = data
    benchmark(F.embedding_backward, g, idx, n_rows, sparse=True)


@pytest.mark.benchmark(group="grad-sparse")
def test_sparse_numpy(benchmark, data):
    g, idx, n_rows = data
    benchmark.pedantic(baselines.coalesce, args=(idx, g), rounds=3, iterations=1)


@pytest.mark.benchmark(group="grad-sparse")
def test_sparse_torch(benchmark, data, torch):
    g, idx, n_rows = data
    t_idx = torch.from_numpy(idx)[None]
    t_g = torch.from_numpy(g)

    def torch_coalesce():
        return torch.sparse_coo_tensor(t_idx, t_g, (n_rows, g.shape[1]), check_invariants=False).coalesce()

    benchmark(torch_coalesce)


@pytest.mark.benchmark(group="grad-dense")
def test_dense_cembed(benchmark, data):
    g, idx, n_rows = data
    benchmark(F.embedding_backward, g, idx, n_rows)


@pytest.mark.benchmark(group="grad-dense")
def test_dense_numpy(benchmark, data):
    g, idx, n_rows = data
    benchmark.pedantic(baselines.dense_grad, args=(g, idx, n_rows), rounds=3, iterations=1)


@pytest.mark.benchmark(group="grad-dense")
def test_dense_torch(benchmark, data, torch):
    g, idx, n_rows = data
    t_idx = torch.from_numpy(idx)
    t_g = torch.from_numpy(g)
    benchmark(torch.ops.aten.embedding_dense_backward, t_g, t_idx, n_rows, -1, False)


@pytest.mark.benchmark(group="grad-sparse-rows")
@pytest.mark.parametrize("n_rows", [1_000_000, 50_000_000])
def test_sparse_cembed_table_size(benchmark, workload, n_rows):
    """Same batch (N entries, Zipf), table of 1M vs 50M rows: the time must not grow with V."""
    rng = np.random.default_rng(7)
    idx = ((rng.zipf(1.1, workload["n"]) - 1) % n_rows).astype(np.int64)
    benchmark(F.embedding_backward, workload["grad_output"], idx, n_rows, sparse=True)
