"""16-bit table benchmarks (issue 12, read path): the workload's table stored as bfloat16 / float16
against the float32 table, same N Zipf indices. Groups: gather (float32 result, and bfloat16 result
with out_dtype), bag sum forward (bags of 16), renorm; torch's bfloat16 kernels beside them.

    python -m pytest benchmarks/bench_half.py --benchmark-only --benchmark-group-by=group

The issue's targets (bfloat16 gather and bag-sum forward >= 1.5x float32) are ratios: read them off
one run of `python -m cembed bench --only gather,bf16_gather,bag_sum,bf16_bag_sum`, which interleaves
the contenders (docs/performance.md: this host is noisy).
"""
import numpy as np
import pytest

from cembed import functional as F
from cembed.storage import aligned_copy

ml_dtypes = pytest.importorskip("ml_dtypes")
BAG_SIZE = 16
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


@pytest.fixture(scope="module")
def tables(workload):
    """The workload's table in each dtype (rounded to nearest), page-aligned as cembed allocates tables."""
    return {name: aligned_copy(workload["weight"], dtype) for name, dtype in DTYPES.items()}


@pytest.fixture(scope="module")
def offsets(workload):
    return np.arange(0, workload["indices"].size, BAG_SIZE, dtype=np.int64)


@pytest.mark.benchmark(group="half-gather")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_gather(benchmark, workload, tables, dtype):
    benchmark(F.embedding, workload["indices"], tables[dtype])


@pytest.mark.benchmark(group="half-gather")
def test_gather_bfloat16_out(benchmark, workload, tables):
    w = tables["bfloat16"]
    benchmark(F.embedding, workload["indices"], w, out_dtype=w.dtype)


@pytest.mark.benchmark(group="half-gather")
def test_gather_torch_bfloat16(benchmark, workload, tables, torch):
    w = torch.from_numpy(tables["bfloat16"].view(np.int16)).view(torch.bfloat16)
    idx = torch.from_numpy(workload["indices"])
    with torch.no_grad():
        benchmark(torch.nn.functional.embedding, idx, w)


@pytest.mark.benchmark(group="half-bag-sum")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_bag_sum(benchmark, workload, tables, offsets, dtype):
    benchmark(F.embedding_bag, workload["indices"], tables[dtype], offsets, mode="sum")


@pytest.mark.benchmark(group="half-bag-sum")
def test_bag_sum_torch_bfloat16(benchmark, workload, tables, offsets, torch):
    w = torch.from_numpy(tables["bfloat16"].view(np.int16)).view(torch.bfloat16)
    idx, off = torch.from_numpy(workload["indices"]), torch.from_numpy(offsets)
    with torch.no_grad():
        benchmark(torch.nn.functional.embedding_bag, idx, w, off, mode="sum")


@pytest.fixture(scope="module")
def renorm_cases(workload, tables):
    rows = np.unique(workload["indices"])
    return {name: (aligned_copy(table), rows, table[rows].copy()) for name, table in tables.items()}


@pytest.mark.benchmark(group="half-renorm")
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_renorm(benchmark, workload, renorm_cases, dtype):
    weight, rows, saved = renorm_cases[dtype]

    def restore():
        weight[rows] = saved
    benchmark.pedantic(F.embedding_renorm_, args=(weight, workload["indices"], 1.0), setup=restore, rounds=9)
