"""Embedding forward (issue 2): constructor, from_pretrained, lookup for every index shape and dtype,
bad input, thread independence, parity with torch and the NumPy reference."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import cembed
from cembed import functional as F

import reference as ref
from util import assert_bitwise_equal, at_thread_counts, require_torch, vector, zipf_indices


# --------------------------------------------------------------------------- constructor

def test_init_is_seeded_standard_normal():
    a = cembed.Embedding(2000, 64, seed=7)
    b = cembed.Embedding(2000, 64, seed=np.random.default_rng(7))
    assert_bitwise_equal(a.weight, b.weight)
    assert a.weight.dtype == np.float32 and a.weight.shape == (2000, 64)
    assert abs(a.weight.mean()) < 0.01 and abs(a.weight.std() - 1) < 0.01
    assert not np.array_equal(a.weight, cembed.Embedding(2000, 64, seed=8).weight)
    assert cembed.Embedding(3, 2, dtype=np.float64).weight.dtype == np.float64


@pytest.mark.parametrize("padding_idx,stored", [(0, 0), (4, 4), (-1, 4), (-5, 0)])
def test_padding_row_zeroed_and_normalised(padding_idx, stored):
    emb = cembed.Embedding(5, 3, padding_idx=padding_idx, seed=0)
    assert emb.padding_idx == stored
    assert not emb.weight[stored].any()
    assert np.all(np.delete(emb.weight, stored, axis=0) != 0)


@pytest.mark.parametrize("padding_idx", [5, -6, 100])
def test_padding_out_of_range(padding_idx):
    with pytest.raises(ValueError, match=r"padding_idx must be within num_embeddings.*\[-5, 4\]"):
        cembed.Embedding(5, 3, padding_idx=padding_idx)
    with pytest.raises(ValueError, match="padding_idx"):
        F.embedding([0], np.zeros((5, 3), np.float32), padding_idx=padding_idx)


def test_given_weight_is_used_without_copy():
    w = np.ones((4, 3), np.float32)
    emb = cembed.Embedding(4, 3, padding_idx=1, _weight=w)
    assert emb.weight is w
    assert emb.weight[1].all()  # never zeroed for _weight
    with pytest.raises(ValueError, match=r"Shape of _weight \(4, 3\) does not match"):
        cembed.Embedding(5, 3, _weight=w)
    with pytest.raises(ValueError, match="2-D"):
        cembed.Embedding(4, 3, _weight=np.ones(12, np.float32))
    assert not cembed.Embedding(4, 3, _weight=w, _freeze=True).requires_grad
    assert cembed.Embedding(4, 3, _weight=w).requires_grad


def test_from_pretrained():
    w = np.arange(12, dtype=np.float64).reshape(4, 3)
    emb = cembed.Embedding.from_pretrained(w, padding_idx=0)
    assert emb.weight is w and not emb.requires_grad and emb.padding_idx == 0
    assert emb.weight[0, 1] == 1  # padding row not zeroed
    np.testing.assert_array_equal(emb([0, 3]), w[[0, 3]])
    assert cembed.Embedding.from_pretrained(w, freeze=False).requires_grad
    with pytest.raises(ValueError, match="2-dimensional"):
        cembed.Embedding.from_pretrained(np.ones(3))


def test_repr_matches_torch():
    torch = require_torch()
    for kw in [{}, dict(padding_idx=2), dict(max_norm=1.5, norm_type=1.0), dict(scale_grad_by_freq=True, sparse=True)]:
        assert repr(cembed.Embedding(10, 3, **kw)) == repr(torch.nn.Embedding(10, 3, **kw))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match=">= 0"):
        cembed.Embedding(-1, 3)
    with pytest.raises(TypeError, match="int"):
        cembed.Embedding(2.5, 3)
    with pytest.raises(TypeError, match="float32 or float64"):
        cembed.Embedding(2, 3, dtype=np.int32)
    e = cembed.Embedding(0, 3)
    assert e.weight.shape == (0, 3) and e(np.zeros(0, np.int64)).shape == (0, 3)


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0), (2, 3, 4), (1, 2, 1, 3)])
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64, np.uint8, np.int16, np.uint16, np.uint32, np.uint64,
                                         np.int8])
def test_lookup_any_shape_and_dtype(rng, shape, index_dtype):
    weight = rng.standard_normal((100, 5)).astype(np.float32)
    idx = rng.integers(0, 100, shape).astype(index_dtype)
    out = F.embedding(idx, weight)
    assert out.shape == tuple(shape) + (5,) and out.dtype == np.float32
    assert_bitwise_equal(out, ref.embedding(idx.astype(np.int64), weight))


def test_lookup_matches_torch(rng):
    torch = require_torch()
    for dtype in (np.float32, np.float64):
        weight = rng.standard_normal((50, 7)).astype(dtype)
        for shape in [(), (0,), (9,), (4, 5), (2, 3, 4)]:
            idx = rng.integers(0, 50, shape)
            theirs = torch.nn.functional.embedding(torch.from_numpy(np.asarray(idx)), torch.from_numpy(weight))
            assert_bitwise_equal(F.embedding(idx, weight), theirs.numpy())
            assert_bitwise_equal(F.embedding(np.asarray(idx, np.int32), weight), theirs.numpy())


def test_lists_scalars_and_one_hot(rng):
    weight = rng.standard_normal((10, 3)).astype(np.float32)
    np.testing.assert_array_equal(F.embedding([[1, 2], [3, 9]], weight), weight[[[1, 2], [3, 9]]])
    np.testing.assert_array_equal(F.embedding(4, weight), weight[4])
    assert F.embedding([], weight).shape == (0, 3)
    idx = np.array([[1, 2, 4, 5], [4, 3, 2, 9]])
    one_hot = np.eye(10, dtype=np.float32)[idx]
    np.testing.assert_allclose(F.embedding(idx, weight), one_hot @ weight, rtol=1e-6)  # the tutorials' point


def test_module_call_and_padding_does_not_change_forward():
    w = np.arange(15, dtype=np.float32).reshape(5, 3)
    emb = cembed.Embedding.from_pretrained(w, padding_idx=2)
    np.testing.assert_array_equal(emb([2, 2]), w[[2, 2]])
    np.testing.assert_array_equal(emb.forward(np.array([[0]])), w[[[0]]])


def test_read_only_and_non_contiguous(rng):
    weight = rng.standard_normal((30, 8)).astype(np.float32)
    ro = weight.copy()
    ro.flags.writeable = False
    idx = rng.integers(0, 30, (4, 6))
    np.testing.assert_array_equal(F.embedding(idx, ro), weight[idx])
    idx_ro = idx.copy()
    idx_ro.flags.writeable = False
    np.testing.assert_array_equal(F.embedding(idx_ro, weight), weight[idx])
    with pytest.raises(ValueError, match="read-only"):
        F.embedding(idx, ro, max_norm=1.0)
    # strided rows, strided columns, Fortran order, transposed / strided indices
    for w in (weight[::2], weight[:, ::2], np.asfortranarray(weight), weight.T.copy().T):
        np.testing.assert_array_equal(F.embedding(idx % w.shape[0], w), w[idx % w.shape[0]])
    np.testing.assert_array_equal(F.embedding(idx.T, weight), weight[idx.T])
    np.testing.assert_array_equal(F.embedding(idx[:, ::2], weight), weight[idx[:, ::2]])
    big_endian = idx.astype(">i8")
    np.testing.assert_array_equal(F.embedding(big_endian, weight), weight[idx])


@pytest.mark.parametrize("name", ["emb_fwd_2d", "emb_fwd_0d_int32"])
def test_torch_vectors(name):
    v = vector(name)
    inp = v["inputs"]
    weight = np.asarray(inp["weight"], np.float32)
    idx = np.asarray(inp["indices"], dtype=inp["index_dtype"])
    exp = v["expected"]
    assert idx.shape == tuple(exp["output_shape"][:-1])
    exp = np.asarray(exp["output"] if isinstance(exp, dict) else exp, np.float32)
    assert_bitwise_equal(F.embedding(idx, weight), exp)


@given(n_rows=st.integers(1, 40), dim=st.integers(0, 9),
       shape=st.lists(st.integers(0, 5), max_size=3), seed=st.integers(0, 2**31))
def test_hypothesis_lookup(n_rows, dim, shape, seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n_rows, dim))
    idx = rng.integers(0, n_rows, shape)
    assert_bitwise_equal(F.embedding(idx, weight), ref.embedding(idx, weight))


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("bad,value,where", [
    ([0, 1, 5], "5", "position 2"),
    ([0, -1], "-1", "position 1"),
    ([[0, 1], [2, 7]], "7", r"position \(1, 1\)"),
    (np.array([np.iinfo(np.int32).max], np.int32), str(np.iinfo(np.int32).max), "position 0"),
    (np.array([np.iinfo(np.int64).max]), str(np.iinfo(np.int64).max), "position 0"),
    (np.array([np.iinfo(np.int64).min]), str(np.iinfo(np.int64).min), "position 0"),
    (np.array([3, 2**63 + 5], np.uint64), str(2**63 + 5), "position 1"),
    (np.array([3, 5], np.uint8), "5", "position 1"),
    ([0, 2**63], str(2**63), "position 1"),                       # a list NumPy would make float64
    ([[np.uint64(3)], [np.int64(-1)]], "-1", r"position \(1, 0\)"),   # uint64 and int64: float64 too
])
def test_index_errors_name_value_position_range(bad, value, where):
    weight = np.ones((5, 2), np.float32) * 3
    before = weight.copy()
    with pytest.raises(IndexError, match=rf"contains {value} at {where}, outside the valid range \[0, 5\)"):
        F.embedding(bad, weight, max_norm=1.0)
    assert_bitwise_equal(weight, before)  # every index validated before any row was renormed
    emb = cembed.Embedding.from_pretrained(weight, max_norm=1.0)
    with pytest.raises(IndexError):
        emb(bad)
    assert_bitwise_equal(weight, before)


def test_a_list_mixing_uint64_and_signed_integers_is_used_exactly():
    """NumPy's common type of uint64 and int64 (or a Python int) is float64; such a list is taken as the
    integers it holds, never rounded through float64 (2**53 + 1 would be)."""
    weight = np.arange(10, dtype=np.float32).reshape(5, 2)
    assert_bitwise_equal(F.embedding([np.uint64(3), 1], weight), weight[[3, 1]])
    huge = [np.uint64(2**53 + 1), 0]
    with pytest.raises(IndexError, match=f"contains {2**53 + 1} at position 0"):
        F.embedding(huge, weight)
    with pytest.raises(TypeError, match="integer array"):
        F.embedding([np.uint64(3), 1.5], weight)
    # 0-d integer arrays among them, as NumPy takes them in a list of ints (a TypeError before)
    assert_bitwise_equal(F.embedding([np.array(1), np.uint64(2)], weight), weight[[1, 2]])
    assert_bitwise_equal(F.check_indices([[np.array(4)], [np.uint64(0)]], 5), np.array([[4], [0]]))
    with pytest.raises(TypeError, match="integer array"):
        F.embedding([np.array(1.0), np.uint64(2)], weight)


def test_boundary_indices_against_torch():
    torch = require_torch()
    weight = np.ones((5, 2), np.float32)
    for bad in ([5], [-1]):
        with pytest.raises(IndexError):
            torch.nn.functional.embedding(torch.tensor(bad), torch.from_numpy(weight))
        with pytest.raises(IndexError):
            F.embedding(bad, weight)
    np.testing.assert_array_equal(F.embedding([0, 4], weight), weight[[0, 4]])


@pytest.mark.parametrize("bad", [np.array([0.0, 1.0]), np.array([True, False]), [0.5], np.array(["a"]),
                                 np.array([1 + 0j])])
def test_index_type_errors(bad):
    with pytest.raises(TypeError, match="integer"):
        F.embedding(bad, np.ones((5, 2), np.float32))


def test_weight_errors():
    with pytest.raises(ValueError, match="2-D"):
        F.embedding([0], np.ones(5, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        F.embedding([0], np.ones((5, 2, 1), np.float32))
    with pytest.raises(TypeError, match="numeric dtype"):
        F.embedding([0], np.ones((5, 2), bool))
    with pytest.raises(TypeError, match="numeric dtype"):
        F.embedding([0], np.ones((5, 2), np.complex64))
    with pytest.raises(TypeError, match="integer table"):
        F.embedding([0], np.ones((5, 2), np.int64), max_norm=1.0)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        F.embedding([0], [[1.0, 2.0]])


# --------------------------------------------------------------------------- threads and big tables

def test_thread_count_bitwise(rng):
    weight = rng.standard_normal((100_000, 32)).astype(np.float32)
    idx = zipf_indices(rng, 50_000, 100_000)
    results = at_thread_counts(lambda: F.embedding(idx, weight))
    for other in results[1:]:
        assert_bitwise_equal(results[0], other)


def test_table_larger_than_2_31_elements():
    """64-bit row offsets: a lazily allocated ~9 GB table, only a few rows ever touched."""
    n_rows, dim = 70_000_000, 33       # 2.31e9 elements > 2**31
    try:
        weight = np.zeros((n_rows, dim), np.float32)
    except MemoryError:
        pytest.skip("cannot reserve a 9 GB virtual table here")
    last = n_rows - 1
    weight[last] = np.arange(dim, dtype=np.float32)
    weight[last - 1] = 5.0
    weight[2**31 // dim + 1] = 7.0
    idx = np.array([last, 0, last - 1, 2**31 // dim + 1], np.int64)
    out = F.embedding(idx, weight)
    np.testing.assert_array_equal(out[0], np.arange(dim))
    assert not out[1].any() and np.all(out[2] == 5.0) and np.all(out[3] == 7.0)
    F.embedding_renorm_(weight, idx, max_norm=1.0)
    np.testing.assert_allclose(np.linalg.norm(weight[last]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(weight[last - 1]), 1.0, rtol=1e-6)
    assert not weight[last - 2].any()
    g = F.embedding_backward(np.ones((4, dim), np.float32), idx, n_rows, sparse=True)
    np.testing.assert_array_equal(g.indices, np.sort(idx))


@pytest.mark.parametrize("seed, error, message", [(-1, ValueError, "seed must be >= 0, got -1"),
                                                   ("a", TypeError, "seed must be an int >= 0, a numpy.random.Generator"),
                                                   (1.5, TypeError, "got float"), (True, TypeError, "got bool")])
def test_a_bad_seed_is_named(tmp_path, seed, error, message):
    """NumPy's own messages ('expected non-negative integer', 'SeedSequence expects int or sequence of
    ints for entropy not a') did not say which argument was wrong."""
    for make in (lambda: cembed.Embedding(3, 2, seed=seed), lambda: cembed.EmbeddingBag(3, 2, seed=seed),
                 lambda: cembed.open_table(tmp_path / "t.npy", 3, 2, init="normal", seed=seed)):
        with pytest.raises(error, match=message):
            make()
    assert not (tmp_path / "t.npy").exists()
    same = [cembed.Embedding(3, 2, seed=s).weight for s in (7, np.int64(7), np.random.default_rng(7),
                                                            np.random.SeedSequence(7))]
    assert all(np.array_equal(w, same[0]) for w in same)


# ------------------------------------------------------------------ torch's module surface

@pytest.mark.parametrize("cls", [cembed.Embedding, cembed.EmbeddingBag])
def test_module_state_dict_reset_and_modes_as_torch(cls, monkeypatch):
    """torch's module methods an Embedding user calls: state_dict / load_state_dict (in place, shape
    checked, strict keys), reset_parameters (N(0, 1), padding row zeroed; with a seed the
    constructor's table, drawn a block at a time), requires_grad_, train / eval."""
    torch = require_torch()
    import cembed.modules as modules

    tcls = torch.nn.Embedding if cls is cembed.Embedding else torch.nn.EmbeddingBag
    temb = tcls(6, 3, padding_idx=2)
    emb = cls(6, 3, padding_idx=2, seed=1)
    table = emb.weight
    assert emb.load_state_dict({k: v.detach().numpy() for k, v in temb.state_dict().items()}) == ([], [])
    assert emb.weight is table
    assert_bitwise_equal(table, temb.weight.detach().numpy())
    assert list(emb.state_dict()) == list(temb.state_dict()) == ["weight"] and emb.state_dict()["weight"] is table
    theirs = temb.load_state_dict({"weight": torch.ones(6, 3), "extra": torch.zeros(1)}, strict=False)
    ours = emb.load_state_dict({"weight": np.ones((6, 3)), "extra": np.zeros(1)}, strict=False)
    assert ours == (theirs.missing_keys, theirs.unexpected_keys) == ([], ["extra"])
    assert ours == ([], ["extra"]) and (emb.weight == 1).all()
    assert emb.load_state_dict({}, strict=False) == (["weight"], [])
    before = emb.weight.copy()
    for bad, error, match in (({"weight": np.zeros((6, 4))}, ValueError, "size mismatch"),
                              ({"weight": np.zeros((6, 3)), "bias": 1}, KeyError, "unexpected keys"),
                              ({}, KeyError, "missing keys"), ({"weight": np.array([["a"] * 3] * 6)}, TypeError, "dtype"),
                              ([("weight", 1)], TypeError, "mapping")):
        with pytest.raises(error, match=match):
            emb.load_state_dict(bad)
        assert_bitwise_equal(emb.weight, before)
    ints = cls.from_pretrained(np.zeros((6, 3), np.int64))
    with pytest.raises(TypeError, match="cannot be copied"):
        ints.load_state_dict({"weight": np.ones((6, 3))})
    with pytest.raises(TypeError, match="int64"):
        ints.reset_parameters()
    frozen = np.zeros((6, 3), np.float32)
    frozen.flags.writeable = False
    for call in (lambda m: m.reset_parameters(), lambda m: m.load_state_dict({"weight": np.ones((6, 3))})):
        with pytest.raises(ValueError, match="read-only"):
            call(cls.from_pretrained(frozen))
    for dtype in (np.float32, np.float16):
        fresh = cls(9, 5, padding_idx=4, seed=3, dtype=dtype)
        drawn = fresh.weight.copy()
        fresh.weight[:] = 7
        monkeypatch.setattr(modules, "_DRAW_BLOCK_BYTES", 2 * 5 * 4)   # (two rows at a time: the same values)
        fresh.reset_parameters(seed=3)
        monkeypatch.undo()
        assert_bitwise_equal(fresh.weight, drawn)
        assert (fresh.weight[4] == 0).all()
    assert emb.requires_grad_(False) is emb and not emb.requires_grad and temb.requires_grad_(False) is temb
    assert emb.training and temb.training and not emb.eval().training and not temb.eval().training
    assert emb.train().training
