"""RowWiseAdagrad against its peer: FBGEMM's CPU table-batched embeddings
(``SplitTableBatchedEmbeddingBagsCodegen`` with ``EXACT_ROWWISE_ADAGRAD``, pip ``fbgemm-gpu-cpu==1.8.0``,
which pairs with torch 2.13; .ci/run installs it). Bags of a table trained a few steps by each: the
lookups, the weights and the row-wise accumulators agree to rounding (FBGEMM sums a row's squares one
after another, cembed in 8 interleaved lanes: docs/behaviour.md §8.6; the NumPy reference of cembed's
own order, bit for bit, is tests/reference.py, checked in tests/test_fused.py).

FBGEMM 1.8.0's CPU kernel ignores ``weight_decay`` (in both its modes: measured, the state and the
weights are those without decay), so the decay is compared with the NumPy reference only."""
import numpy as np
import pytest

import cembed

from util import backward_and_step, require_fbgemm


def fbgemm_table(torch, weight, lr, eps, mode):
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (ComputeDevice,
                                                                         SplitTableBatchedEmbeddingBagsCodegen)

    n_rows, dim = weight.shape
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(n_rows, dim, EmbeddingLocation.HOST, ComputeDevice.CPU)], optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=lr, eps=eps, pooling_mode={"sum": PoolingMode.SUM, "mean": PoolingMode.MEAN}[mode])
    with torch.no_grad():
        tbe.split_embedding_weights()[0].copy_(torch.from_numpy(weight))
    return tbe


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dim", [4, 12, 64, 132])   # (FBGEMM takes multiples of 4)
@pytest.mark.parametrize("fused", [True, False])
def test_rowwise_adagrad_trains_bags_as_fbgemm_does(mode, dim, fused):
    torch = require_fbgemm()
    rng = np.random.default_rng(dim)
    n_rows, lr, eps = 50, 0.05, 1e-6
    weight = rng.standard_normal((n_rows, dim), dtype=np.float32)
    tbe = fbgemm_table(torch, weight, lr, eps, mode)
    bag = cembed.EmbeddingBag.from_pretrained(weight.copy(), freeze=False, mode=mode, sparse=True,
                                              include_last_offset=True)
    opt = cembed.optim.RowWiseAdagrad([bag], lr=lr, eps=eps)
    for _ in range(4):
        n = int(rng.integers(20, 60))
        indices = ((rng.zipf(1.3, n) - 1) % n_rows).astype(np.int64)   # hot rows repeat, within and across bags
        offsets = np.unique(np.concatenate([[0, n], rng.integers(0, n + 1, 6)])).astype(np.int64)
        offsets = np.insert(offsets, 2, offsets[1])                      # and an empty bag
        grad = rng.standard_normal((offsets.size - 1, dim), dtype=np.float32)
        out = tbe(torch.from_numpy(indices), torch.from_numpy(offsets))
        ours = bag(indices, offsets)
        np.testing.assert_allclose(ours, out.detach().numpy(), rtol=1e-6, atol=1e-6)
        out.backward(torch.from_numpy(grad))
        backward_and_step(bag, grad, opt, fused)
    state = tbe.split_optimizer_states()[0][0].numpy()
    np.testing.assert_allclose(opt.state[bag]["sum"], state, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(bag.weight, tbe.split_embedding_weights()[0].detach().numpy(), rtol=1e-5,
                               atol=1e-6)
    assert not np.array_equal(bag.weight, weight)                        # (it did train)
