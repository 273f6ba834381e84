"""Scoring benchmarks (issue 11): dot-product scores of queries against table rows, read in place.

The skip-gram shape on the shared table: N / 6 queries, each scored against 6 rows (a context word and 5
negatives) drawn from the Zipf workload. Groups: ``F.embedding_dot`` beside the gather + batched dot
product it replaces (NumPy ``take`` + ``einsum``; torch ``F.embedding`` + ``bmm``), and the fused
``F.embedding_dot_logistic`` (scores, loss, both gradients) beside the unfused cembed and torch chains.

    python -m pytest benchmarks/bench_score.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from cembed import functional as F

PER_QUERY = 6


@pytest.fixture(scope="module")
def data(workload):
    weight = workload["weight"]
    n_queries = workload["n"] // PER_QUERY
    idx = workload["indices"][:n_queries * PER_QUERY].reshape(n_queries, PER_QUERY)
    rng = np.random.default_rng(7)
    query = rng.standard_normal((n_queries, weight.shape[1]), dtype=np.float32)
    return weight, idx, query


@pytest.mark.benchmark(group="score")
def test_score_cembed(benchmark, data):
    weight, idx, query = data
    benchmark(F.embedding_dot, query, idx, weight)


@pytest.mark.benchmark(group="score")
def test_score_numpy(benchmark, data):
    weight, idx, query = data
    benchmark(lambda: np.einsum("bkd,bd->bk", np.take(weight, idx, axis=0), query))


@pytest.mark.benchmark(group="score")
def test_score_torch(benchmark, data, torch):
    weight, idx, query = data
    tw, ti, tq = torch.from_numpy(weight), torch.from_numpy(idx), torch.from_numpy(query)
    benchmark(lambda: torch.bmm(torch.nn.functional.embedding(ti, tw), tq.unsqueeze(2)).squeeze(2))


@pytest.mark.benchmark(group="score-logistic")
def test_logistic_cembed_fused(benchmark, data):
    weight, idx, query = data
    benchmark(F.embedding_dot_logistic, query, idx, weight)


@pytest.mark.benchmark(group="score-logistic")
def test_logistic_cembed_unfused(benchmark, data):
    weight, idx, query = data

    def chain():
        s = F.embedding_dot(query, idx, weight)
        s[:, 0] *= -1
        loss = np.logaddexp(np.float32(0), s).sum(1)
        g = 1 / (1 + np.exp(-s))
        g[:, 0] *= -1
        return loss, g, F.embedding_dot_backward(g, idx, weight)

    benchmark(chain)


@pytest.mark.benchmark(group="score-logistic")
def test_logistic_torch(benchmark, data, torch):
    weight, idx, query = data
    tw, ti = torch.from_numpy(weight), torch.from_numpy(idx)

    def chain():
        q = torch.from_numpy(query).requires_grad_(True)
        s = torch.bmm(torch.nn.functional.embedding(ti, tw), q.unsqueeze(2)).squeeze(2)
        sp = torch.nn.functional.softplus
        loss = sp(-s[:, 0]) + sp(s[:, 1:]).sum(1)
        loss.sum().backward()
        return loss, q.grad

    benchmark(chain)
