"""Lookup and renorm benchmarks (issue 2): the workload's N Zipf indices into a 1M x 128 table.

    python -m pytest benchmarks/bench_lookup.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from cembed import functional as F
from cembed.apps import baselines
from cembed.storage import aligned_copy

MAX_NORM = 1.0


@pytest.mark.benchmark(group="gather")
def test_gather_cembed(benchmark, workload):
    benchmark(F.embedding, workload["indices"], workload["weight"])


@pytest.mark.benchmark(group="gather")
def test_gather_numpy(benchmark, workload):
    benchmark(baselines.gather, workload["weight"], workload["indices"])


@pytest.mark.benchmark(group="gather")
def test_gather_torch(benchmark, workload, torch):
    w, idx = torch.from_numpy(workload["weight"]), torch.from_numpy(workload["indices"])
    with torch.no_grad():
        benchmark(torch.nn.functional.embedding, idx, w)


@pytest.fixture(scope="module")
def renorm_case(workload):
    """A private copy of the table and the touched rows' original values, restored before each round
    (only the ~99k touched rows are copied back, not the whole table)."""
    weight = aligned_copy(workload["weight"])
    rows = np.unique(workload["indices"])
    return weight, rows, weight[rows].copy()


def _restore(case):
    weight, rows, saved = case
    weight[rows] = saved


@pytest.mark.benchmark(group="renorm")
def test_renorm_cembed(benchmark, workload, renorm_case):
    weight = renorm_case[0]
    idx = workload["indices"]
    benchmark.pedantic(F.embedding_renorm_, args=(weight, idx, MAX_NORM),
                       setup=lambda: _restore(renorm_case), rounds=15)


@pytest.mark.benchmark(group="renorm")
def test_renorm_numpy(benchmark, workload, renorm_case):
    weight = renorm_case[0]
    benchmark.pedantic(baselines.renorm_, args=(weight, workload["indices"], MAX_NORM),
                       setup=lambda: _restore(renorm_case), rounds=5)


@pytest.mark.benchmark(group="renorm")
def test_renorm_torch(benchmark, workload, renorm_case, torch):
    weight = renorm_case[0]
    w, idx = torch.from_numpy(weight), torch.from_numpy(workload["indices"])

    def torch_renorm():
        with torch.no_grad():
            torch.embedding_renorm_(w, idx, MAX_NORM, 2.0)

    benchmark.pedantic(torch_renorm, setup=lambda: _restore(renorm_case), rounds=5)
