"""Gradient clipping benchmarks: clip_grad_norm_ / clip_grad_value_ on the workload's sparse gradient
(~98k unique rows of a 1M x 128 float32 table: ~50 MB of stored values), beside a streaming copy of
those values (np.copyto, the bandwidth yardstick of docs/performance.md), NumPy and torch on the same bytes (torch's
clip_grad_norm_ refuses sparse gradients, so it gets the values as a dense (nnz, D) tensor).

    python -m pytest benchmarks/bench_clip.py --benchmark-only --benchmark-group-by=group

Bytes: the norm reads the values once (4 B per element); clipping then reads and writes them once more.
pytest-benchmark runs each contender in its own block; for a fair ratio on a shared machine run

    PYTHONPATH=. python benchmarks/bench_clip.py        (from the repository root)

which interleaves the contenders (A B A B ...) on the same data and prints medians and ratios.
"""
import math
import os
import sys
import time
import warnings

import numpy as np
import pytest

from cembed import functional as F
from cembed.optim.clip_grad import clip_grad_norm_, clip_grad_value_


class Table:
    def __init__(self, grad):
        self.weight = None
        self.grad = grad


@pytest.fixture(scope="module")
def sparse_grad(workload):
    return F.embedding_backward(workload["grad_output"], workload["indices"], workload["n_rows"], sparse=True)


def _restore(grad, original):
    np.copyto(grad.values, original)       # returns None: pedantic keeps its own args


def _torch_restore(p, original):
    p.grad.copy_(original)


# ---------------------------------------------------------------- norm (read-only pass)
@pytest.mark.benchmark(group="clip-norm")
def test_norm_only_cembed(benchmark, sparse_grad):
    """clip_grad_norm_ with max_norm=inf: the norm pass alone (the coefficient is 1: no write)."""
    benchmark(clip_grad_norm_, Table(sparse_grad), float("inf"))


@pytest.mark.benchmark(group="clip-norm")
def test_norm_only_numpy(benchmark, sparse_grad):
    benchmark(np.linalg.norm, sparse_grad.values)


@pytest.mark.benchmark(group="clip-norm")
def test_copy_values(benchmark, sparse_grad):
    """The yardstick: a streaming copy of the same bytes (reads them once, writes them once)."""
    out = np.empty_like(sparse_grad.values)
    benchmark(np.copyto, out, sparse_grad.values)


@pytest.mark.benchmark(group="clip-norm")
def test_norm_only_torch(benchmark, sparse_grad, torch):
    t = torch.from_numpy(sparse_grad.values)
    benchmark(torch.linalg.vector_norm, t, 2.0)


# ---------------------------------------------------------------- clip (norm + in-place scale)
@pytest.mark.benchmark(group="clip-norm-scale")
def test_clip_norm_cembed(benchmark, sparse_grad):
    original = sparse_grad.values.copy()
    table = Table(sparse_grad)
    benchmark.pedantic(clip_grad_norm_, args=(table, 1.0), setup=lambda: _restore(sparse_grad, original),
                       rounds=20, iterations=1)
    _restore(sparse_grad, original)


@pytest.mark.benchmark(group="clip-norm-scale")
def test_clip_norm_numpy(benchmark, sparse_grad):
    values = sparse_grad.values.copy()
    original = values.copy()

    def clip():
        total = np.linalg.norm(values)
        coef = min(np.float32(1.0) / (total + np.float32(1e-6)) * np.float32(1.0), np.float32(1.0))
        np.multiply(values, coef, out=values)

    benchmark.pedantic(clip, setup=lambda: np.copyto(values, original), rounds=20, iterations=1)


@pytest.mark.benchmark(group="clip-norm-scale")
def test_clip_norm_torch(benchmark, sparse_grad, torch):
    p = torch.nn.Parameter(torch.zeros(sparse_grad.values.shape))
    original = torch.from_numpy(sparse_grad.values.copy())
    p.grad = original.clone()
    benchmark.pedantic(torch.nn.utils.clip_grad_norm_, args=([p], 1.0), setup=lambda: _torch_restore(p, original),
                       rounds=20, iterations=1)


# ---------------------------------------------------------------- clip_grad_value_
@pytest.mark.benchmark(group="clip-value")
def test_clip_value_cembed(benchmark, sparse_grad):
    original = sparse_grad.values.copy()
    benchmark.pedantic(clip_grad_value_, args=(Table(sparse_grad), 0.5),
                       setup=lambda: _restore(sparse_grad, original), rounds=20, iterations=1)
    _restore(sparse_grad, original)


@pytest.mark.benchmark(group="clip-value")
def test_clip_value_numpy(benchmark, sparse_grad):
    values = sparse_grad.values.copy()
    original = values.copy()
    benchmark.pedantic(np.clip, args=(values, -0.5, 0.5), kwargs={"out": values},
                       setup=lambda: np.copyto(values, original), rounds=20, iterations=1)


@pytest.mark.benchmark(group="clip-value")
def test_clip_value_torch(benchmark, sparse_grad, torch):
    p = torch.nn.Parameter(torch.zeros(sparse_grad.values.shape))
    original = torch.from_numpy(sparse_grad.values.copy())
    p.grad = original.clone()
    benchmark.pedantic(torch.nn.utils.clip_grad_value_, args=([p], 0.5), setup=lambda: _torch_restore(p, original),
                       rounds=20, iterations=1)


# ---------------------------------------------------------------- interleaved run (python bench_clip.py)
def _interleaved(repeats=31):
    """Median time of each contender, measured in alternation on the same data (docs/performance.md)."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import DIM, N_INDICES, N_ROWS, zipf_indices

    import cembed

    rng = np.random.default_rng(2026)
    indices = zipf_indices(rng, N_INDICES, N_ROWS)
    grad_output = rng.standard_normal((N_INDICES, DIM), dtype=np.float32)
    grad = F.embedding_backward(grad_output, indices, N_ROWS, sparse=True)
    values = grad.values
    original = values.copy()
    out = np.empty_like(values)
    table = Table(grad)
    try:
        import torch

        torch.set_num_threads(cembed.get_num_threads())
        t_values = torch.from_numpy(values)
    except ImportError:
        torch = None

    def norm_only():
        clip_grad_norm_(table, math.inf)

    def clip_scale():
        clip_grad_norm_(table, 1.0)

    def clip_value():
        clip_grad_value_(table, 0.5)

    contenders = {
        "np.copyto(values)": (lambda: np.copyto(out, values), None),
        "cembed norm only (max_norm=inf)": (norm_only, None),
        "cembed clip_grad_norm_ (norm + scale)": (clip_scale, lambda: np.copyto(values, original)),
        "cembed clip_grad_value_": (clip_value, lambda: np.copyto(values, original)),
        "np.linalg.norm(values)": (lambda: np.linalg.norm(values), None),
    }
    if torch is not None:
        contenders["torch vector_norm(values)"] = (lambda: torch.linalg.vector_norm(t_values, 2.0), None)
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (fn, setup) in contenders.items():
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    np.copyto(values, original)
    nbytes = values.nbytes
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    print(f"V={N_ROWS} D={DIM} N={N_INDICES} Zipf(1.1): nnz={grad.nnz} rows, values {nbytes / 1e6:.1f} MB "
          f"float32, {cembed.get_num_threads()} threads, {repeats} interleaved repeats (medians)")
    copy = med["np.copyto(values)"]
    for name, t in med.items():
        print(f"  {name:40s} {t * 1e3:8.2f} ms  {nbytes / t / 1e9:6.2f} GB/s over the values' bytes  "
              f"copy time / time = {copy / t:5.2f}")


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    _interleaved(int(os.environ.get("CEMBED_BENCH_REPEATS", 31)))
