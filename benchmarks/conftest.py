"""Shared workload for the benchmark suites (docs/performance.md): V = 1,000,000 rows, D = 128 float32,
N = 262,144 Zipf(1.1) indices (~99k unique rows). Override with CEMBED_BENCH_ROWS / _DIM / _N.
Every group holds cembed beside its NumPy and (when importable) torch baselines on the same data."""
import os

import numpy as np
import pytest

from cembed.storage import aligned_zeros

N_ROWS = int(os.environ.get("CEMBED_BENCH_ROWS", 1_000_000))
DIM = int(os.environ.get("CEMBED_BENCH_DIM", 128))
N_INDICES = int(os.environ.get("CEMBED_BENCH_N", 262_144))


def zipf_indices(rng, n, n_rows, a=1.1):
    return ((rng.zipf(a, n) - 1) % n_rows).astype(np.int64)


@pytest.fixture(scope="session")
def workload():
    rng = np.random.default_rng(2026)
    # page-aligned, as cembed's modules and torch's allocator place tables (docs/performance.md, "Row alignment")
    weight = rng.standard_normal((N_ROWS, DIM), dtype=np.float32, out=aligned_zeros((N_ROWS, DIM)))
    indices = zipf_indices(rng, N_INDICES, N_ROWS)
    grad_output = rng.standard_normal((N_INDICES, DIM), dtype=np.float32)
    return {"weight": weight, "indices": indices, "grad_output": grad_output,
            "n_rows": N_ROWS, "dim": DIM, "n": N_INDICES}


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")
