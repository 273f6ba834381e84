"""16-bit tables (issue 12, read path): float16 and bfloat16 weights in lookups, bags, renorm and
gradients. The claim under test (docs/behaviour.md §12): every read kernel on a 16-bit table computes
exactly what the float32 kernel computes on the table widened to float32 (widening is exact), so the
results are compared *bitwise* with that; results are float32; a 16-bit ``out_dtype`` is that result
rounded once to nearest (ties to even); renorm matches torch's bitwise; every thread count gives the
same bits; bad combinations are refused before anything changes."""
import os
import subprocess
import sys

import numpy as np
import pytest

import cembed
import reference as ref
from cembed import _bag, _dtypes, _gather
from cembed import functional as F
from util import assert_bitwise_equal, at_thread_counts, env_importing_this_cembed, require_torch, zipf_indices

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALF = [pytest.param(F16, id="float16"), pytest.param(BF16, id="bfloat16")]
FMT = {F16: "f16", BF16: "bf16"}


def _table(rng, n_rows, dim, dtype, scale=1.0):
    return (rng.standard_normal((n_rows, dim), dtype=np.float32) * scale).astype(dtype)


def _up(weight):
    """The 16-bit table widened to float32 (exact)."""
    return weight.astype(np.float32)


def _same_values(a, b):
    """Equal as values, NaN matching NaN (payloads aside)."""
    with np.errstate(invalid="ignore"):   # signalling NaN patterns warn when widened by numpy
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


# ------------------------------------------------------------------------------- the conversions

@pytest.mark.parametrize("dtype", HALF)
def test_widening_every_bit_pattern(dtype):
    """All 65536 patterns, through the gather (one column; 128, 16, 9 and 7: whole vectors and tails,
    bit for bit numpy's widening, signalling NaNs kept signalling) and the vectorised bag-sum loads,
    against the textbook decoding and against numpy / ml_dtypes."""
    bits = np.arange(65536, dtype=np.uint16)
    want = ref.half_bits_to_float(bits, FMT[dtype])
    with np.errstate(invalid="ignore"):
        assert _same_values(bits.view(dtype).astype(np.float64), want)   # the oracle agrees with ml_dtypes / numpy
    fmt = _dtypes.kernel_format(dtype)
    out = np.empty((65536, 1), np.float32)
    _gather.gather_rows_widen(bits.reshape(-1, 1), fmt, np.arange(65536), out, 2)
    assert _same_values(out.ravel(), want)
    with np.errstate(invalid="ignore"):
        exact = bits.view(dtype).astype(np.float32).view(np.uint32)   # numpy's widening, NaN payloads too
    for dim in (128, 16, 9, 7):
        n_rows = -(-65536 // dim)
        table = np.zeros(n_rows * dim, np.uint16)
        table[:65536] = bits
        table = table.reshape(n_rows, dim)
        # the gather's row widening (float16: 8 columns at a time with F16C where the CPU has it)
        rows = np.empty((n_rows, dim), np.float32)
        _gather.gather_rows_widen(table, fmt, np.arange(n_rows), rows, 2)
        assert np.array_equal(rows.ravel()[:65536].view(np.uint32), exact), dim
        pooled = np.empty((n_rows, dim), np.float32)
        _bag.bag_forward_half(table, fmt, np.arange(n_rows), np.arange(n_rows + 1, dtype=np.int64), 0, -1,
                              np.zeros(0, np.float32), True, pooled, np.empty((0, 0), np.int64), 2)
        assert _same_values(pooled.ravel()[:65536], want), dim


def test_cpu_paths_are_reported_and_follow_the_environment():
    """show_config names the hand-written CPU paths the kernels take (F16C widening, AVX-512F bfloat16
    rounding); a feature CEMBED_DISABLE_CPU_FEATURES names (any case, commas or spaces) is off."""
    paths = cembed.show_config(mode="dicts")["cpu_paths"]
    assert sorted(paths) == ["avx512f", "f16c"] and all(isinstance(v, bool) for v in paths.values())
    named = os.environ.get("CEMBED_DISABLE_CPU_FEATURES", "").replace(",", " ").lower().split(" ")
    for feature in named:
        if feature in paths:
            assert paths[feature] is False, feature


def test_unknown_names_in_the_cpu_features_variable_are_reported(monkeypatch):
    from cembed import _config

    monkeypatch.setenv("CEMBED_DISABLE_CPU_FEATURES", " AVX512,f16c,,avx512F sse9 ")
    assert _config._unknown_disabled_features() == ["avx512", "sse9"]
    monkeypatch.setenv("CEMBED_DISABLE_CPU_FEATURES", "")
    assert _config._unknown_disabled_features() == []


def test_portable_kernels_give_the_bits_of_the_cpu_specific_ones(tmp_path):
    """Where the CPU has F16C or AVX-512F, the tests above and below (the bags' sums; and the fused
    bfloat16 SparseAdam tests of test_half_grad.py, which reach the bfloat16 Adam row) run the
    hand-written paths. The same bitwise
    tests in a process with both turned off (CEMBED_DISABLE_CPU_FEATURES) run the portable kernels
    against the same NumPy references."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = env_importing_this_cembed(CEMBED_DISABLE_CPU_FEATURES="AVX512F, f16c")
    selected = [os.path.join(tests, "test_half_tables.py") + "::" + name for name in (
        "test_cpu_paths_are_reported_and_follow_the_environment", "test_widening_every_bit_pattern",
        "test_narrowing_rounds_to_nearest_even", "test_bags_are_the_float32_pooling_of_the_widened_table")]
    selected += [os.path.join(tests, "test_half_optim.py") + "::" + name for name in (
        "test_bfloat16_adam_rows_of_whole_blocks", "test_round_rows_stochastic_matches_the_numpy_reference",
        "test_round_rows_nearest_is_the_dtype_cast")]
    selected += [os.path.join(tests, "test_half_grad.py") + "::" + name for name in (
        "test_embedding_options_equal_the_widened_gradient", "test_embedding_steps_equal_the_widened_gradient",
        "test_thread_counts_bitwise")]
    child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *selected], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert " passed" in child.stdout and "skipped" not in child.stdout, child.stdout[-1000:]


_BAG_SUMS_CHILD = r"""
import sys, numpy as np, ml_dtypes, cembed.functional as F
rng = np.random.default_rng(7)
out = {}
for dim in (150, 128, 37, 16, 3):
    w = rng.standard_normal((300, dim)).astype(np.float32)
    w[5] = -0.0
    w[7, :3] = [np.inf, -np.inf, np.nan]
    idx = rng.integers(0, 300, 4000)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 40, 200))])
    offsets = offsets[offsets <= idx.size]
    for name, table in (("f32", w), ("bf16", w.astype(ml_dtypes.bfloat16))):
        for index_dtype in (np.int32, np.int64):
            for pad in (None, 5):
                key = f"{name}-{dim}-{np.dtype(index_dtype).name}-{pad}"
                out[key] = F.embedding_bag(idx.astype(index_dtype), table, offsets, mode="sum", padding_idx=pad)
np.savez(sys.argv[1], **out)
"""


def test_bag_sums_of_the_avx512_kernels_are_the_portable_ones(tmp_path):
    """The bag sums (float32 and bfloat16, int32 and int64 indices, with and without padding_idx,
    widths with 128-column blocks, 16-column blocks and a tail; -0.0, infinities and NaN in the rows)
    give the same bits with the AVX-512F kernels and with them turned off (a child process each)."""
    got = {}
    for disabled in ("", "avx512f"):
        path = tmp_path / f"sums-{disabled or 'cpu'}.npz"
        env = env_importing_this_cembed(CEMBED_DISABLE_CPU_FEATURES=disabled)
        child = subprocess.run([sys.executable, "-c", _BAG_SUMS_CHILD, str(path)], env=env, cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        with np.load(path) as data:
            got[disabled] = {key: data[key] for key in data.files}
    assert got[""].keys() == got["avx512f"].keys() and len(got[""]) == 40
    for key, value in got[""].items():
        assert value.tobytes() == got["avx512f"][key].tobytes(), key


def _float32_sweep():
    """Every 4099th float32 bit pattern, plus the edge cases of both formats."""
    sweep = (np.arange(0, 2 ** 32, 4099, dtype=np.uint64)).astype(np.uint32).view(np.float32)
    edges = np.array([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 65536.0, 6.1035156e-05, 5.9604645e-08,
                      2.9802322e-08, 2.9802326e-08, 8.940697e-08, 3.3895314e38, 3.4028235e38, np.inf, -np.inf,
                      np.nan, 1.00390625, 1.01171875, 1.0 + 2 ** -8 + 2 ** -20, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11],
                     dtype=np.float32)
    return np.concatenate([sweep, edges, -edges])


@pytest.mark.parametrize("dtype", HALF)
def test_narrowing_rounds_to_nearest_even(dtype):
    x = _float32_sweep()
    bits = np.empty((1, x.size), np.uint16)
    _gather.narrow_rows(x.reshape(1, -1), _dtypes.kernel_format(dtype), bits, 1)
    got = ref.half_bits_to_float(bits.ravel(), FMT[dtype])
    assert _same_values(got, ref.round_to_half(x, FMT[dtype]))
    with np.errstate(over="ignore", invalid="ignore"):
        assert _same_values(got, x.astype(dtype).astype(np.float64))   # numpy's / ml_dtypes' rounding
    assert np.all(np.isnan(got) == np.isnan(x))                       # NaN stays NaN, nothing becomes NaN


# ------------------------------------------------------------------------------- the dtype policy

def test_dtype_resolution_and_the_kernel_view():
    assert _dtypes.resolve_dtype("bfloat16") == BF16
    assert _dtypes.resolve_dtype(ml_dtypes.bfloat16) == BF16
    assert _dtypes.check_table_dtype(np.float16) == F16
    assert _dtypes.check_table_dtype("float64") == np.float64
    for bad in (np.int32, "int8", np.complex64, np.longdouble):
        with pytest.raises(TypeError, match="float32 or float64"):
            _dtypes.check_table_dtype(bad)
    with pytest.raises(TypeError, match="dtype"):
        _dtypes.resolve_dtype(object())
    w = np.ones((3, 4), BF16)
    bits, fmt = _dtypes.as_kernel_view(w)
    assert bits.dtype == np.uint16 and np.shares_memory(bits, w) and fmt == _gather.TABLE_FORMATS["bfloat16"]
    for name, code in _gather.TABLE_FORMATS.items():    # the Python codes are those the kernels use
        assert _dtypes.kernel_format(_dtypes.resolve_dtype(name)) == code
    assert [_dtypes.compute_dtype(d) for d in (F16, BF16, np.dtype(np.float64))] == [np.float32, np.float32, np.float64]


def test_bfloat16_without_ml_dtypes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)   # `import ml_dtypes` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install ml_dtypes"):
        _dtypes.resolve_dtype("bfloat16")
    with pytest.raises(ImportError, match=r"the \"bf16\" extra"):
        cembed.Embedding(4, 2, dtype="bfloat16")
    with pytest.raises(ImportError, match=r"the \"bf16\" extra"):
        F.embedding([0], np.ones((2, 2), np.float16), out_dtype="bfloat16")
    assert cembed.Embedding(4, 2, dtype=np.float16).weight.dtype == F16      # float16 needs nothing extra


def test_non_float_tables_are_still_refused():
    for bad in (np.ones((3, 2), bool), np.ones((3, 2), np.complex64), np.ones((3, 2), np.longdouble)):
        with pytest.raises(TypeError):
            F.embedding([0], bad)
        with pytest.raises(TypeError):
            F.embedding_bag([0], bad, [0])
    with pytest.raises(TypeError, match="lookup-only"):
        cembed.Embedding.from_pretrained(np.ones((3, 2), np.int32), freeze=False)
    with pytest.raises(TypeError, match="float32 or float64"):
        F.embedding_renorm_(np.ones((3, 3), np.int32), [0], 1.0)


# ------------------------------------------------------------------------------- lookups

@pytest.mark.parametrize("dtype", HALF)
def test_lookup_is_the_exact_widened_rows(rng, dtype):
    w = _table(rng, 300, 24, dtype)
    for idx in (rng.integers(0, 300, (7, 5)), rng.integers(0, 300, 5000).astype(np.int32), np.zeros(0, int), 4):
        out = F.embedding(idx, w)
        assert out.dtype == np.float32
        assert_bitwise_equal(out, ref.embedding(idx, _up(w)))
        raw = F.embedding(idx, w, out_dtype=dtype)                # the stored rows as they are
        assert raw.dtype == dtype
        assert_bitwise_equal(raw, ref.embedding(idx, w))
    strided = _table(rng, 50, 20, dtype)[:, ::2]                    # not kernel layout: the copy path
    idx = rng.integers(0, 50, 40)
    assert_bitwise_equal(F.embedding(idx, strided), ref.embedding(idx, _up(strided)))
    assert_bitwise_equal(F.embedding(idx, strided, out_dtype=dtype), ref.embedding(idx, strided))


@pytest.mark.parametrize("dim", [128, 12, 6, 260])
def test_large_lookups_take_the_streaming_path(rng, dim):
    """Outputs of at least 16 MB are written with streaming stores (_rows.pxd STREAM_MIN_BYTES): same
    bits as the plain path for float32, float64, both 16-bit widenings (bfloat16 vectorised, float16 in
    chunks of 256 columns, tails of 4 and of 2 columns) and 16-bit outputs, for 1, 2 and 3 threads."""
    n = (16 << 20) // (2 * dim) + 3                   # > 16 MB of float32 output, > 8 MB of 16-bit output
    idx = rng.integers(0, 500, n)
    base = rng.standard_normal((500, dim), dtype=np.float32)
    for w in (base, base.astype(np.float64), base.astype(BF16), base.astype(F16)):
        want = ref.embedding(idx, w.astype(np.float32) if w.itemsize == 2 else w)
        for out in at_thread_counts(lambda: F.embedding(idx, w)):
            assert_bitwise_equal(out, want)
        if w.itemsize == 2:
            raw = F.embedding(idx, w, out_dtype=w.dtype)
            assert_bitwise_equal(raw.view(np.uint16), ref.embedding(idx, w).view(np.uint16))
    small = F.embedding(idx[:1000], base.astype(BF16))     # below the threshold: the plain path
    assert_bitwise_equal(small, ref.embedding(idx[:1000], base.astype(BF16).astype(np.float32)))


@pytest.mark.parametrize("dtype", HALF)
def test_lookup_torch_parity(rng, dtype):
    torch = require_torch()
    w = _table(rng, 100, 9, dtype)
    idx = rng.integers(0, 100, (6, 4))
    tdt = torch.bfloat16 if dtype == BF16 else torch.float16
    tw = torch.from_numpy(w.view(np.int16)).view(tdt)
    want = torch.nn.functional.embedding(torch.from_numpy(idx), tw).view(torch.int16).numpy()
    assert_bitwise_equal(F.embedding(idx, w, out_dtype=dtype).view(np.int16), want)


def test_out_dtype_choices(rng):
    w32, w16 = _table(rng, 5, 3, np.float32), _table(rng, 5, 3, F16)
    assert F.embedding([1], w32, out_dtype=np.float32).dtype == np.float32
    for weight, bad in ((w32, F16), (w32, np.float64), (w16, np.float64), (w16, BF16), (w16, np.int32)):
        with pytest.raises(TypeError, match="out_dtype"):
            F.embedding([1], weight, out_dtype=bad)
        with pytest.raises(TypeError, match="out_dtype"):
            F.embedding_bag([1], weight, [0], out_dtype=bad)
    with pytest.raises(TypeError, match="lookup-only"):
        F.embedding([1], np.ones((3, 2), np.int64), out_dtype=np.int64)


# ------------------------------------------------------------------------------- bags

BAG_CASES = [
    dict(mode="sum"), dict(mode="mean"), dict(mode="max"),
    dict(mode="sum", psw=True), dict(mode="sum", padding_idx=3), dict(mode="mean", padding_idx=3),
    dict(mode="max", padding_idx=3), dict(mode="sum", psw=True, padding_idx=3),
    dict(mode="mean", include_last_offset=True),
]


def _bag_call(rng, n_rows, n, case):
    idx = rng.integers(0, n_rows, n)
    idx[::5] = 3                                                    # padding entries when padding_idx=3
    sizes = rng.integers(0, 40, n)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    offsets = offsets[offsets <= n]
    if case.get("include_last_offset"):
        offsets = np.append(offsets, n)
    kw = dict(mode=case["mode"], padding_idx=case.get("padding_idx"),
              include_last_offset=case.get("include_last_offset", False))
    if case.get("psw"):
        kw["per_sample_weights"] = rng.standard_normal(n).astype(np.float32)
    return idx, offsets, kw


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("dim", [150, 128, 37, 16, 3])   # (the AVX-512 bfloat16 sum: 128-column blocks, 16, the rest)
@pytest.mark.parametrize("case", BAG_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_bags_are_the_float32_pooling_of_the_widened_table(rng, dtype, dim, case):
    w = _table(rng, 200, dim, dtype)
    idx, offsets, kw = _bag_call(rng, 200, 3000, case)
    out = F.embedding_bag(idx, w, offsets, **kw)
    assert out.dtype == np.float32
    assert_bitwise_equal(out, F.embedding_bag(idx, _up(w), offsets, **kw))
    small = F.embedding_bag(idx[:300], w, offsets[offsets <= 300] if not kw["include_last_offset"]
                            else np.append(offsets[offsets < 300], 300), **{**kw, **(
                                {"per_sample_weights": kw["per_sample_weights"][:300]} if "per_sample_weights" in kw
                                else {})})
    want = ref.embedding_bag(idx[:300], _up(w), offsets[offsets <= 300] if not kw["include_last_offset"]
                             else np.append(offsets[offsets < 300], 300), mode=kw["mode"],
                             per_sample_weights=kw.get("per_sample_weights", [None] * 300)[:300]
                             if "per_sample_weights" in kw else None,
                             include_last_offset=kw["include_last_offset"], padding_idx=kw["padding_idx"])
    if kw["mode"] == "max":
        assert_bitwise_equal(small, want)
    else:   # the reference sums one row at a time; the kernel in vector blocks and fused psw: rounding only
        np.testing.assert_allclose(small, want, rtol=2e-6, atol=2e-5)
    rounded = F.embedding_bag(idx, w, offsets, out_dtype=dtype, **kw)
    assert rounded.dtype == dtype
    assert_bitwise_equal(rounded, out.astype(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_bags_on_a_strided_table_and_2d_input(rng, dtype):
    w = _table(rng, 60, 40, dtype)[:, ::2]
    idx = rng.integers(0, 60, (30, 6))
    for mode in ("sum", "mean", "max"):
        assert_bitwise_equal(F.embedding_bag(idx, w, mode=mode, padding_idx=2),
                             F.embedding_bag(idx, _up(w), mode=mode, padding_idx=2))
    psw = rng.standard_normal(idx.shape).astype(np.float32)
    assert_bitwise_equal(F.embedding_bag(idx, w, mode="sum", per_sample_weights=psw),
                         F.embedding_bag(idx, _up(w), mode="sum", per_sample_weights=psw))


@pytest.mark.parametrize("dtype", HALF)
def test_bags_torch_parity(rng, dtype):
    """torch returns 16-bit bags: max is bitwise ours rounded (a max is exact); torch's 16-bit sums
    and means round differently (bfloat16 sums accumulate in another order, means divide the rounded
    sum), so they are within one unit in the last place of ours rounded once."""
    torch = require_torch()
    w = _table(rng, 500, 33, dtype)
    idx, offsets = rng.integers(0, 500, 4000), np.arange(0, 4000, 7)
    tdt = torch.bfloat16 if dtype == BF16 else torch.float16
    tw = torch.from_numpy(w.view(np.int16)).view(tdt)
    for mode in ("sum", "mean", "max"):
        ours = F.embedding_bag(idx, w, offsets, mode=mode, out_dtype=dtype).view(np.int16).astype(np.int32)
        theirs = torch.nn.functional.embedding_bag(torch.from_numpy(idx), tw, torch.from_numpy(offsets),
                                                   mode=mode).view(torch.int16).numpy().astype(np.int32)
        if mode == "max":
            assert np.array_equal(ours, theirs)
        else:
            assert np.abs(ours - theirs).max() <= 1, mode


# ------------------------------------------------------------------------------- max_norm renorm

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("norm_type", [2.0, 1.0, np.inf, 3.0, 0.0])
def test_renorm_matches_torch_and_the_reference(rng, dtype, norm_type):
    w = _table(rng, 400, 37, dtype, scale=2.0)
    idx = rng.integers(0, 400, 700)
    max_norm = {0.0: 20.0}.get(norm_type, 1.5 if norm_type != 1.0 else 9.0)
    mine = w.copy()
    F.embedding_renorm_(mine, idx, max_norm, norm_type)
    assert_bitwise_equal(mine, ref.embedding_renorm_half_(w.copy(), idx, max_norm, norm_type))
    changed = np.flatnonzero(np.any(mine.view(np.uint16) != w.view(np.uint16), axis=1))
    assert changed.size > 20 and np.isin(changed, idx).all()
    torch = require_torch()
    tdt = torch.bfloat16 if dtype == BF16 else torch.float16
    tw = torch.from_numpy(w.view(np.int16).copy()).view(tdt)
    torch.nn.functional.embedding(torch.from_numpy(idx), tw, max_norm=max_norm, norm_type=norm_type)
    assert_bitwise_equal(mine.view(np.int16), tw.view(torch.int16).numpy())


@pytest.mark.parametrize("dtype", HALF)
def test_max_norm_in_lookups_bags_and_modules(rng, dtype):
    w = _table(rng, 100, 16, dtype, scale=3.0)
    idx = rng.integers(0, 100, (20, 3))
    want_w = ref.embedding_renorm_half_(w.copy(), idx, 1.0)
    a = w.copy()
    out = F.embedding(idx, a, max_norm=1.0)
    assert_bitwise_equal(a, want_w)
    assert_bitwise_equal(out, ref.embedding(idx, _up(want_w)))
    b = w.copy()
    pooled = F.embedding_bag(idx, b, mode="mean", max_norm=1.0)
    assert_bitwise_equal(b, want_w)
    assert_bitwise_equal(pooled, F.embedding_bag(idx, _up(want_w), mode="mean"))
    emb = cembed.Embedding.from_pretrained(w.copy(), freeze=False, max_norm=1.0, sparse=True)
    emb(idx)
    assert_bitwise_equal(emb.weight, want_w)
    emb.backward(np.ones(idx.shape + (16,), np.float32))   # reuses the grouping the renorm made
    assert emb.grad.values.dtype == np.float32
    assert_bitwise_equal(emb.grad.to_dense(), F.embedding_backward(np.ones(idx.shape + (16,), np.float32), idx, 100))
    strided = np.zeros((100, 32), dtype)
    strided[:, ::2] = w
    view = strided[:, ::2]
    F.embedding_renorm_(view, idx, 1.0)
    assert_bitwise_equal(np.ascontiguousarray(view), want_w)
    assert not strided[:, 1::2].view(np.uint16).any()


# ------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_gradients_are_float32(rng, dtype, sparse, scale_grad_by_freq):
    w = _table(rng, 80, 12, dtype)
    idx = zipf_indices(rng, 500, 80).reshape(50, 10)
    g = rng.standard_normal((50, 10, 12)).astype(np.float32)
    half = cembed.Embedding.from_pretrained(w, freeze=False, padding_idx=1, sparse=sparse,
                                            scale_grad_by_freq=scale_grad_by_freq)
    full = cembed.Embedding.from_pretrained(_up(w), freeze=False, padding_idx=1, sparse=sparse,
                                            scale_grad_by_freq=scale_grad_by_freq)
    assert_bitwise_equal(half(idx), full(idx))
    half.backward(g)
    full.backward(g)
    half.backward(g)     # accumulates into the float32 .grad
    full.backward(g)
    got, want = (half.grad.to_dense(), full.grad.to_dense()) if sparse else (half.grad, full.grad)
    assert got.dtype == np.float32
    assert_bitwise_equal(got, want)
    assert_bitwise_equal(want / 2, ref.embedding_backward(g, idx, 80, padding_idx=1,
                                                          scale_grad_by_freq=scale_grad_by_freq))
    psw = rng.standard_normal((50, 10)).astype(np.float32)
    half.zero_grad()
    full.zero_grad()
    half.backward(g[:, 0], idx, per_sample_weights=psw)
    full.backward(g[:, 0], idx, per_sample_weights=psw)
    assert_bitwise_equal(half.grad.to_dense() if sparse else half.grad, full.grad.to_dense() if sparse else full.grad)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_bag_gradients_are_float32(rng, dtype, mode):
    w = _table(rng, 90, 20, dtype)
    idx = zipf_indices(rng, 600, 90)
    offsets = np.sort(rng.choice(np.arange(1, 600), 80, replace=False))
    offsets = np.concatenate([[0], offsets])
    g = rng.standard_normal((offsets.size, 20)).astype(np.float32)
    psw = rng.standard_normal(600).astype(np.float32) if mode == "sum" else None
    half = cembed.EmbeddingBag.from_pretrained(w, freeze=False, mode=mode, padding_idx=4)
    full = cembed.EmbeddingBag.from_pretrained(_up(w), freeze=False, mode=mode, padding_idx=4)
    assert_bitwise_equal(half(idx, offsets, psw), full(idx, offsets, psw))
    psw_half, psw_full = half.backward(g), full.backward(g)
    assert half.grad.dtype == np.float32
    assert_bitwise_equal(half.grad, full.grad)               # incl. max-mode routing to the same winners
    if psw is not None:
        assert psw_half.dtype == np.float32
        assert_bitwise_equal(psw_half, psw_full)
    grad, psw_grad = F.embedding_bag_backward(g, idx, w, offsets, mode=mode, per_sample_weights=psw,
                                              padding_idx=4, sparse=mode != "max")
    want_grad, want_psw = ref.embedding_bag_backward(g, idx, _up(w), offsets, mode=mode, per_sample_weights=psw,
                                                     padding_idx=4)
    np.testing.assert_allclose(grad.to_dense() if mode != "max" else grad, want_grad, rtol=1e-5, atol=1e-5)
    if psw is not None:
        np.testing.assert_allclose(psw_grad, want_psw, rtol=1e-5, atol=1e-5)


def test_module_dtype_argument(rng):
    for dtype in ("bfloat16", ml_dtypes.bfloat16, np.float16):
        emb = cembed.Embedding(40, 6, dtype=dtype, seed=3, padding_idx=2)
        want = np.random.default_rng(3).standard_normal((40, 6), dtype=np.float32)
        want[2] = 0
        assert emb.weight.dtype == np.dtype(dtype)
        assert_bitwise_equal(emb.weight, want.astype(np.dtype(dtype)))   # drawn in float32, rounded to nearest
        bag = cembed.EmbeddingBag(40, 6, dtype=dtype, seed=3, mode="sum")
        out = bag(np.array([[0, 1], [2, 3]]), out_dtype=np.dtype(dtype))
        assert out.dtype == np.dtype(dtype)
    with pytest.raises(TypeError, match="float32 or float64"):
        cembed.Embedding(3, 2, dtype=np.int16)


# ------------------------------------------------------------------------------- thread counts

@pytest.mark.parametrize("dtype", HALF)
def test_thread_count_invariance(rng, dtype):
    w = _table(rng, 3000, 40, dtype, scale=2.0)
    idx = zipf_indices(rng, 30000, 3000)
    offsets = np.arange(0, 30000, 9)
    psw = rng.standard_normal(30000).astype(np.float32)

    def run():
        table = w.copy()
        results = [F.embedding(idx, table), F.embedding(idx, table, out_dtype=dtype)]
        for mode in ("sum", "mean", "max"):
            results.append(F.embedding_bag(idx, table, offsets, mode=mode))
        results.append(F.embedding_bag(idx, table, offsets, mode="sum", per_sample_weights=psw, out_dtype=dtype))
        bag = cembed.EmbeddingBag.from_pretrained(table, freeze=False, mode="max")
        out = bag(idx, offsets)
        bag.backward(np.ones_like(out))
        results.append(bag.grad)
        _, psw_grad = F.embedding_bag_backward(out, idx, table, offsets, mode="sum", per_sample_weights=psw)
        results.append(psw_grad)
        F.embedding_renorm_(table, idx, 1.0)
        results.append(table.view(np.uint16))
        return results

    first, *others = at_thread_counts(run)
    for other in others:
        for a, b in zip(first, other):
            assert_bitwise_equal(a, b)


# ------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("dtype", HALF)
def test_bad_combinations_change_nothing(rng, dtype):
    w = _table(rng, 30, 4, dtype, scale=5.0)
    before = w.copy()
    with pytest.raises(TypeError, match="per_sample_weights must have dtype float32"):
        F.embedding_bag([1, 2], w, [0], mode="sum", max_norm=1.0, per_sample_weights=np.ones(2, dtype))
    with pytest.raises(TypeError, match="out_dtype"):
        F.embedding([1, 2], w, max_norm=1.0, out_dtype=np.float64)
    with pytest.raises(TypeError, match="out_dtype"):
        F.embedding_bag([1, 2], w, [0], max_norm=1.0, out_dtype=np.float64)
    with pytest.raises(IndexError):
        F.embedding([1, 30], w, max_norm=1.0)
    assert_bitwise_equal(w, before)
    emb = cembed.Embedding.from_pretrained(w, freeze=False, max_norm=1.0)
    with pytest.raises(TypeError, match="out_dtype"):
        emb(np.array([1, 2]), out_dtype=np.float64)
    assert_bitwise_equal(w, before)
    out = emb(np.array([1, 2]))
    renormed = w.copy()
    other = BF16 if dtype == F16 else F16       # grad_output: float32 or the table's own 16-bit dtype
    with pytest.raises(TypeError, match=f"float32 or {dtype}"):
        emb.backward(out.astype(other))
    with pytest.raises(TypeError):
        emb.backward(out.astype(np.float64))
    assert emb.grad is None
    assert_bitwise_equal(w, renormed)
    bag = cembed.EmbeddingBag.from_pretrained(w, freeze=False, mode="sum")
    pooled = bag(np.array([[1, 2]]))
    with pytest.raises(TypeError, match=f"float32 or {dtype}"):
        bag.backward(pooled.astype(other))
    assert bag.grad is None
    with pytest.raises(TypeError, match=f"float32 or {dtype}"):
        F.embedding_bag_backward(pooled.astype(other), [[1, 2]], w, mode="sum")


# ------------------------------------------------------------------------------- the bench rows

def test_bench_bfloat16_rows(monkeypatch):
    from cembed.apps import bench
    report = bench.run(rows=3000, dim=16, n=4096, bag_size=8, repeats=1, only="bf16_gather,bf16_gather_out,bf16_bag_sum",
                       use_torch=False, threads=2)
    rows = {row["kernel"]: row for row in report["results"]}
    assert set(rows) == {"bf16_gather", "bf16_gather_out", "bf16_bag_sum"}
    for row in rows.values():
        assert row["cembed_ms"] > 0 and row["cembed_f32_ms"] > 0 and row["vs_cembed_f32"] > 0
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    logged = []
    report = bench.run(rows=3000, dim=16, n=4096, repeats=1, only="gather,bf16_gather,fused_train_step_bf16_act",
                       use_torch=False, log=logged.append)
    assert [row["kernel"] for row in report["results"]] == ["gather"]
    # the JSON report says what it left out (it dropped them without a word), and the text columns stay
    # in place for the longest kernel name (it ran into the next column)
    assert report["skipped"] == [{"kernel": k, "reason": "needs ml_dtypes (pip install ml_dtypes)"}
                                 for k in ("bf16_gather", "fused_train_step_bf16_act")]
    assert logged[1].startswith("bf16_gather ") and logged[2].startswith("fused_train_step_bf16_act  skipped")
    assert logged[0].index(" ") < bench.NAME_WIDTH <= bench.HEADER.index("cembed ms")
