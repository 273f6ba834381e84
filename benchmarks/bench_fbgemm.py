"""cembed vs FBGEMM's CPU table-batched embeddings (issue 11), on the bag workload: V = 1M rows,
D = 128 float32, 16,384 bags of 16 Zipf(1.1) indices, sum pooling.

One training step = forward + backward + row-wise Adagrad: cembed's ``EmbeddingBag`` with the fused
``backward(grad, optimizer=RowWiseAdagrad)`` against FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``
with ``EXACT_ROWWISE_ADAGRAD`` (its fused CPU backward). Skipped when ``fbgemm_gpu`` is not importable
(``pip install fbgemm-gpu-cpu==1.8.0``, the release that pairs with torch 2.13).

    python -m pytest benchmarks/bench_fbgemm.py --benchmark-only --benchmark-group-by=group
    python benchmarks/bench_fbgemm.py          # interleaved medians at 1 and 2 threads, with the ratios
"""
import os
import sys
import time

import numpy as np
import pytest

import cembed
from cembed.storage import aligned_copy

N_ROWS = int(os.environ.get("CEMBED_BENCH_ROWS", 1_000_000))
DIM = int(os.environ.get("CEMBED_BENCH_DIM", 128))
N_BAGS, BAG = 16_384, 16


def bag_workload(seed=2026):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((N_ROWS, DIM), dtype=np.float32)
    indices = ((rng.zipf(1.1, N_BAGS * BAG) - 1) % N_ROWS).astype(np.int64)
    offsets = np.arange(0, N_BAGS * BAG + 1, BAG, dtype=np.int64)
    grad = rng.standard_normal((N_BAGS, DIM), dtype=np.float32)
    return weight, indices, offsets, grad


def cembed_step_fn(weight, indices, offsets, grad, lr=0.01, eps=1e-8):
    bag = cembed.EmbeddingBag.from_pretrained(aligned_copy(weight), freeze=False, mode="sum", sparse=True,
                                              include_last_offset=True)
    opt = cembed.optim.RowWiseAdagrad([bag], lr=lr, eps=eps)

    def step():
        bag(indices, offsets)
        bag.backward(grad, optimizer=opt)
    return step


def fbgemm_step_fn(torch, weight, indices, offsets, grad, lr=0.01, eps=1e-8):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(N_ROWS, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr, eps=eps, pooling_mode=PoolingMode.SUM)
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(torch.from_numpy(weight))
    ti, to, tg = torch.from_numpy(indices), torch.from_numpy(offsets), torch.from_numpy(grad)

    def step():
        tbe(ti, to).backward(tg)
    return step


def _fbgemm():
    torch = pytest.importorskip("torch")
    pytest.importorskip("fbgemm_gpu")
    return torch


@pytest.fixture(scope="module")
def bags():
    return bag_workload()


@pytest.mark.benchmark(group="bag fwd + bwd + row-wise adagrad")
def test_cembed_rowwise(benchmark, bags):
    benchmark(cembed_step_fn(*bags))


@pytest.mark.benchmark(group="bag fwd + bwd + row-wise adagrad")
def test_fbgemm_rowwise(benchmark, bags):
    torch = _fbgemm()
    benchmark(fbgemm_step_fn(torch, *bags))


def interleaved(repeats=9):
    """Medians of interleaved runs at 1 and 2 threads; returns {threads: (cembed_ms, fbgemm_ms)}."""
    import torch

    bags = bag_workload()
    out = {}
    for threads in (1, 2):
        previous = cembed.set_num_threads(threads)
        torch.set_num_threads(threads)
        steps = {"cembed": cembed_step_fn(*bags), "fbgemm": fbgemm_step_fn(torch, *bags)}
        times = {k: [] for k in steps}
        for fn in steps.values():
            fn()
        for _ in range(repeats):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        out[threads] = tuple(float(np.median(times[k]) * 1e3) for k in ("cembed", "fbgemm"))
        cembed.set_num_threads(previous)
    return out


if __name__ == "__main__":
    try:
        results = interleaved(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
    except ImportError as exc:
        sys.exit(f"needs torch and fbgemm_gpu ({exc})")
    print(f"bag workload: V={N_ROWS:,}, D={DIM}, {N_BAGS:,} bags of {BAG} Zipf(1.1), sum pooling, "
          "fwd + bwd + row-wise Adagrad, medians of interleaved runs")
    for threads, (ours, theirs) in results.items():
        print(f"  {threads} thread(s): cembed {ours:7.1f} ms   FBGEMM {theirs:7.1f} ms   cembed {theirs / ours:.2f}x faster")
