"""EmbeddingBag benchmarks (issue 5): the workload's N Zipf indices in bags of 16 (N/16 bags).

Forward sum / mean / max and mean with padding_idx, cembed beside torch's F.embedding_bag and a NumPy
route (np.take + np.add.reduceat); and mean forward + sparse backward against torch's forward +
backward + coalesce() and NumPy's reduceat + np.unique + np.add.at. The NumPy routes are
cembed.apps.baselines, the same functions `python -m cembed bench` times.

    python -m pytest benchmarks/bench_bag.py --benchmark-only --benchmark-group-by=group
"""
import warnings

import numpy as np
import pytest

from cembed import EmbeddingBag
from cembed import functional as F
from cembed.apps import baselines
from cembed.storage import aligned_copy

BAG_SIZE = 16


@pytest.fixture(scope="module")
def bags(workload):
    idx = workload["indices"]
    offsets = np.arange(0, idx.size, BAG_SIZE, dtype=np.int64)
    return workload["weight"], idx, offsets


CASES = {"sum": dict(mode="sum"), "mean": dict(mode="mean"), "max": dict(mode="max"),
         "mean-padding": dict(mode="mean", padding_idx=0)}


@pytest.mark.parametrize("case", list(CASES))
def test_forward_cembed(benchmark, bags, case):
    benchmark.group = f"bag-forward-{case}"
    weight, idx, offsets = bags
    benchmark(F.embedding_bag, idx, weight, offsets, **CASES[case])


@pytest.mark.parametrize("case", list(CASES))
def test_forward_torch(benchmark, bags, torch, case):
    benchmark.group = f"bag-forward-{case}"
    weight, idx, offsets = bags
    tw, ti, to = torch.from_numpy(weight), torch.from_numpy(idx), torch.from_numpy(offsets)
    with torch.no_grad():
        benchmark(torch.nn.functional.embedding_bag, ti, tw, to, **CASES[case])


@pytest.mark.parametrize("case", ["sum", "mean", "max"])
def test_forward_numpy(benchmark, bags, case):
    benchmark.group = f"bag-forward-{case}"
    weight, idx, offsets = bags
    benchmark(baselines.bag, weight, idx, offsets, case)


@pytest.mark.benchmark(group="bag-mean-fwd-bwd-sparse")
def test_fwd_bwd_sparse_cembed(benchmark, bags):
    weight, idx, offsets = bags
    emb = EmbeddingBag.from_pretrained(weight, freeze=False, mode="mean", sparse=True)
    g = np.ones((offsets.size, weight.shape[1]), np.float32)

    def step():
        emb(idx, offsets)
        emb.backward(g)
        emb.zero_grad()

    benchmark(step)


@pytest.mark.benchmark(group="bag-mean-fwd-bwd-sparse")
def test_fwd_bwd_sparse_numpy(benchmark, bags):
    weight, idx, offsets = bags
    g = np.ones((offsets.size, weight.shape[1]), np.float32)
    benchmark.pedantic(baselines.bag_mean_fwd_bwd, args=(weight, idx, offsets, g), rounds=3, iterations=1)


@pytest.mark.benchmark(group="bag-mean-fwd-bwd-sparse")
def test_fwd_bwd_sparse_torch(benchmark, bags, torch):
    weight, idx, offsets = bags
    emb = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(aligned_copy(weight)), freeze=False, mode="mean",
                                                sparse=True)
    ti, to = torch.from_numpy(idx), torch.from_numpy(offsets)
    g = torch.ones(offsets.size, weight.shape[1])

    def step():
        emb(ti, to).backward(g)
        grad = emb.weight.grad.coalesce()
        emb.weight.grad = None
        return grad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark(step)
