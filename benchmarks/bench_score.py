"""Scoring benchmarks (issue 11): dot-product scores of queries against table rows, read in place.

The skip-gram shape on the shared table: N / 6 queries, each scored against 6 rows (a context word and 5
negatives) drawn from the Zipf workload. Groups: ``F.embedding_dot`` beside the gather + batched dot
product it replaces (NumPy ``take`` + ``einsum``; torch ``F.embedding`` + ``bmm``), and the fused
``F.embedding_dot_logistic`` (scores, loss, both gradients) beside the unfused cembed and torch chains;
``score-update``: the scores and an SGD step of the table in one pass (``F.embedding_dot_logistic_sgd_``)
beside the two calls. ``python benchmarks/bench_score.py [optimizer] [threads]`` (with PYTHONPATH=. from the
repository root) compares ``Embedding.dot_logistic_backward`` with the two calls on real trainer batches.

    python -m pytest benchmarks/bench_score.py --benchmark-only --benchmark-group-by=group
"""
import numpy as np
import pytest

from cembed import functional as F
from cembed.storage import aligned_copy

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


# ------------------------------------------------------------------------------------------------
# Scoring fused with the output table's update, against today's two calls (the trainer's output side)

@pytest.mark.benchmark(group="score-update")
@pytest.mark.parametrize("path", ["fused", "two_calls"])
def test_score_update_sgd(benchmark, data, path):
    """One SGD step of the output side on the shared workload: ``F.embedding_dot_logistic_sgd_`` vs
    ``F.embedding_dot_logistic`` + ``Embedding.backward(v, idx, per_sample_weights=g, optimizer=SGD)``
    (the table restored before each round)."""
    import cembed

    weight, idx, query = data
    table = aligned_copy(weight)
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = cembed.optim.SGD([emb], lr=1e-3)

    def reset():
        np.copyto(table, weight)

    def fused():
        F.embedding_dot_logistic_sgd_(query, idx, table, 1e-3, with_loss=False)

    def two_calls():
        _, g, _ = F.embedding_dot_logistic(query, idx, table, with_loss=False)
        emb.backward(query, idx, per_sample_weights=g, optimizer=opt)

    benchmark.pedantic(fused if path == "fused" else two_calls, setup=reset, rounds=7, warmup_rounds=1)


def trainer_batches(n_batches, vocab_size=1_000_000, tokens=3_000_000, seed=0):
    """The first batches of ``python -m cembed train`` on a synthetic corpus like the default one
    (the same vocabulary; fewer tokens, so it is quick to build)."""
    from cembed.apps import corpus as corpus_mod
    from cembed.apps import train as train_mod

    corpus = corpus_mod.synthetic_corpus(vocab_size, 100, tokens, seed=seed)
    stream = iter(train_mod.BatchStream(corpus, train_mod.TrainConfig()))
    return [next(stream)[:2] for _ in range(n_batches)]


def interleaved_output_side(n_batches=40, optimizer="sgd", dim=64, vocab_size=1_000_000, clock=None):
    """Median seconds per batch of the output side (scores, loss every 8th batch, output-table update)
    on real trainer batches: ``Embedding.dot_logistic_backward`` vs the two calls, each on its own copy
    of the tables, interleaved batch by batch (A B, B A, ...). ``clock``: time.perf_counter by default
    (time.thread_time at one thread: CPU time, not counting the time the thread waits for a core on a
    shared host). Returns (fused, two_calls, ratios)."""
    import time

    import cembed
    from cembed.apps import train as train_mod

    batches = trainer_batches(n_batches, vocab_size)
    rng = np.random.default_rng(1)
    w_in = (rng.standard_normal((vocab_size, dim), dtype=np.float32) * 0.1)
    w_out = (rng.standard_normal((vocab_size, dim), dtype=np.float32) * 0.1)
    config = train_mod.TrainConfig(dim=dim, optimizer=optimizer)
    sides = {}
    for name in ("fused", "two_calls"):
        emb = cembed.Embedding.from_pretrained(aligned_copy(w_out), freeze=False, sparse=True)
        sides[name] = (emb, train_mod.make_optimizer(cembed.optim, [emb], config))

    def fused(emb, opt, v, targets, want_loss):
        return emb.dot_logistic_backward(v, targets, optimizer=opt, with_loss=want_loss)

    def two_calls(emb, opt, v, targets, want_loss):
        out = F.embedding_dot_logistic(v, targets, emb.weight, with_loss=want_loss)
        emb.backward(v, targets, per_sample_weights=out[1], optimizer=opt)
        return out

    clock = clock or time.perf_counter
    times = {"fused": [], "two_calls": []}
    for step, (centers, targets) in enumerate(batches):
        v = np.take(w_in, centers, axis=0)
        want_loss = step % 8 == 0
        order = ("fused", "two_calls") if step % 2 == 0 else ("two_calls", "fused")
        for name in order:
            fn = fused if name == "fused" else two_calls
            t0 = clock()
            fn(*sides[name], v, targets, want_loss)
            times[name].append(clock() - t0)
    assert sides["fused"][0].weight.tobytes() == sides["two_calls"][0].weight.tobytes()   # the same bits
    a, b = np.array(times["fused"][2:]), np.array(times["two_calls"][2:])   # first steps: page faults
    return float(np.median(a)), float(np.median(b)), b / a


if __name__ == "__main__":   # PYTHONPATH=. python benchmarks/bench_score.py [optimizer] [threads]
    import os
    import sys
    import time

    import cembed

    if len(sys.argv) > 2:
        cembed.set_num_threads(int(sys.argv[2]))
    opt_name = sys.argv[1] if len(sys.argv) > 1 else "sgd"
    one = cembed.get_num_threads() == 1
    fused_s, two_s, ratios = interleaved_output_side(optimizer=opt_name, clock=time.thread_time if one else None)
    print(f"output side, {opt_name}, {cembed.get_num_threads()} threads ({'thread CPU' if one else 'wall'} time), "
          f"load {os.getloadavg()[0]:.2f}: "
          f"fused {fused_s * 1e3:.1f} ms, two calls {two_s * 1e3:.1f} ms per batch (medians); "
          f"per-batch ratio two_calls/fused median {np.median(ratios):.2f} "
          f"(quartiles {np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f})")
