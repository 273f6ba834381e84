"""The training step's scratch: the radix sort's fused first-pass histogram and its caller-given
allocator, recycled outputs (no fresh pages in a steady step), and the fused kernel's chunk pipeline
against the unfused step at every thread count (docs/performance.md, "The fused training step")."""
import gc
import resource

import numpy as np
import pytest

import cembed
from cembed import _buffer_cache, _sort, optim
from cembed import functional as F

from util import assert_bitwise_equal, at_thread_counts, backward_and_step, zipf_indices


def _reference_grouping(keys):
    order = np.argsort(keys, kind="stable")
    rows, counts = np.unique(keys, return_counts=True)
    return order, rows, np.concatenate([[0], np.cumsum(counts)])


# largest keys that give every first-pass digit width from 1 to 11 bits, 2 and 3 passes, and 32 bits
@pytest.mark.parametrize("max_key", [0, 1, 5, 100, 1000, 2047, 2048, 3000, (1 << 20) - 1, (1 << 22) + 5,
                                     (1 << 31) - 1, (1 << 32) - 1])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_sort_first_pass_histogram_every_width(max_key, n_threads):
    rng = np.random.default_rng(max_key % 1000)
    keys = rng.integers(0, max_key + 1, 70_000, dtype=np.int64)   # > 4 chunks of 16,384 keys
    keys[rng.integers(0, keys.size)] = max_key
    want = _reference_grouping(keys)
    for got_arrays in (_sort.sort_rows(keys, n_threads), _sort.sort_rows(keys, n_threads, True, _buffer_cache.empty)):
        for got, expect in zip(got_arrays, want):
            np.testing.assert_array_equal(got, expect)
    _, rows, starts = _sort.sort_rows(keys.astype(np.int32) if max_key < 2**31 else keys, n_threads, False,
                                      _buffer_cache.empty)
    np.testing.assert_array_equal(rows, want[1])
    np.testing.assert_array_equal(starts, want[2])


def test_sort_refuses_an_allocator_of_the_wrong_dtype():
    keys = np.array([3, 1, 3], dtype=np.int64)
    with pytest.raises(ValueError):
        _sort.sort_rows(keys, 1, True, lambda shape, dtype: np.empty(shape, np.float64))
    np.testing.assert_array_equal(keys, [3, 1, 3])


def test_segment_ids_view_is_read_only():
    contributions = F.lookup_contributions(np.ones((4, 2), np.float32), (4,), np.array([2, 0, 2, 1]))
    _, rows, _, seg_ids = contributions._segments()
    np.testing.assert_array_equal(seg_ids, np.arange(rows.size))
    assert not seg_ids.flags.writeable
    with pytest.raises(ValueError):
        seg_ids[0] = 5
    with pytest.raises(ValueError):
        seg_ids.flags.writeable = True


def test_saved_indices_copy_is_private_and_recycled():
    idx = np.arange(100_000, dtype=np.int64) % 5000              # 800 kB: through the buffer cache
    emb = cembed.Embedding(5000, 4, sparse=True, seed=0)
    emb(idx)
    idx[:] = 0                                                   # the caller's array changes after the forward
    emb.backward(np.ones((idx.size, 4), np.float32))
    np.testing.assert_array_equal(emb.grad.indices, np.arange(5000))
    np.testing.assert_array_equal(emb.grad.values, np.full((5000, 4), 20, np.float32))


def test_steady_fused_step_takes_no_new_pages():
    """After the first steps, a fused step reuses every large buffer (no page faults per step)."""
    rng = np.random.default_rng(0)
    idx = zipf_indices(rng, 262_144, 100_000)   # 2 MB index arrays: the allocator unmaps those when freed
    g = rng.standard_normal((idx.size, 16)).astype(np.float32)
    emb = cembed.Embedding(100_000, 16, sparse=True, seed=1)
    opt = optim.SparseAdam([emb], lr=1e-3)

    def step():
        emb(idx)
        emb.backward(g, optimizer=opt)
    for _ in range(3):
        step()
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # with fresh arrays each step (order, distinct rows, starts, index copy): ~2,100 faults in 5 steps
    assert faults < 400, faults


@pytest.mark.parametrize("n_indices,n_rows", [(1, 10), (70, 64), (65, 1000), (5000, 300), (40_000, 100_000)])
def test_fused_chunk_pipeline_matches_unfused(n_indices, n_rows):
    """Chunk counts around the 64-segment chunk and the thread count: bitwise the unfused step."""
    rng = np.random.default_rng(n_indices)
    w0 = rng.standard_normal((n_rows, 8)).astype(np.float32)
    idx = zipf_indices(rng, n_indices, n_rows)
    g = rng.standard_normal((idx.size, 8)).astype(np.float32)

    def step(fused):
        emb = cembed.Embedding.from_pretrained(w0.copy(), freeze=False, sparse=True)
        opt = optim.SparseAdam([emb], lr=0.01)
        for _ in range(2):
            emb(idx)
            backward_and_step(emb, g, opt, fused)
        return emb.weight.copy(), opt.state[emb]["exp_avg"].copy(), opt.state[emb]["exp_avg_sq"].copy()

    want = step(False)
    for got in at_thread_counts(lambda: step(True)):
        for a, b in zip(got, want):
            assert_bitwise_equal(a, b)
