"""Tables and optimizer state on disk (issue 13): open_table, memmap training bitwise equal to
in-RAM training, optimizer state_dir, prefetch."""
import ctypes
import mmap
import os
import time

import numpy as np
import pytest

import cembed
from cembed import optim

from util import assert_bitwise_equal, fingerprint, num_threads, zipf_indices


# ------------------------------------------------------------------------------------------ open_table

def test_open_table_inits_are_the_in_memory_ones(tmp_path):
    normal = cembed.open_table(tmp_path / "n.npy", 1003, 7, init="normal", seed=4, chunk_bytes=7 * 4 * 100 + 3)
    assert isinstance(normal, np.memmap) and normal.dtype == np.float32 and normal.shape == (1003, 7)
    assert_bitwise_equal(normal, cembed.Embedding(1003, 7, seed=4).weight)
    uniform = cembed.open_table(tmp_path / "u.npy", 1001, 5, dtype=np.float64, init="uniform", seed=9,
                                chunk_bytes=333 * 5 * 8)
    rng = np.random.default_rng(9)
    expected = (rng.random((1001, 5), dtype=np.float64) - 0.5) / 5
    assert_bitwise_equal(uniform, expected)
    # the chunk size never changes the values
    again = cembed.open_table(tmp_path / "n2.npy", 1003, 7, init="normal", seed=4)
    assert_bitwise_equal(again, normal)
    # a plain .npy file: numpy opens it
    assert_bitwise_equal(np.load(tmp_path / "n.npy", mmap_mode="r"), normal)


def test_open_table_callable_init_sees_every_row_once(tmp_path):
    calls = []

    def init(block, start):
        calls.append((start, block.shape[0]))
        block[:] = np.arange(start, start + block.shape[0])[:, None] * 10 + np.arange(block.shape[1])

    table = cembed.open_table(tmp_path / "c.npy", 250, 3, dtype=np.float64, init=init, chunk_bytes=3 * 8 * 64)
    assert calls == [(0, 64), (64, 64), (128, 64), (192, 58)]
    assert_bitwise_equal(table, (np.arange(250)[:, None] * 10 + np.arange(3)).astype(np.float64))


def _reserves_space(directory):
    """Whether cembed reserves disk space for its files in ``directory`` (fallocate supported)."""
    with open(os.path.join(directory, ".probe"), "wb") as fh:
        reserved = cembed.storage._reserve_space(fh.fileno(), 1 << 16, fh.name)
    os.unlink(os.path.join(directory, ".probe"))
    return reserved


def test_open_table_zeros_reserves_its_disk_space_without_writing(tmp_path):
    """init="zeros" writes no data, but reserves the file's blocks (fallocate), so that writing
    through the mapping cannot meet a full disk (a SIGBUS); where the file system cannot reserve,
    the file stays sparse."""
    path = tmp_path / "z.npy"
    table = cembed.open_table(path, 1 << 20, 64)           # 256 MiB of zeros
    assert os.stat(path).st_size > 256 << 20
    allocated = os.stat(path).st_blocks * 512
    if not _reserves_space(tmp_path):
        assert allocated < 1 << 20                          # no reservation here: a sparse file
    else:
        assert allocated >= 256 << 20                       # the space is the file's
    assert table[12345].sum() == 0 and table[-1].sum() == 0


def test_open_table_reopen_modes(tmp_path):
    path = tmp_path / "t.npy"
    table = cembed.open_table(path, 20, 4, init="normal", seed=0)
    table[3] = 7
    table.flush()
    del table
    r = cembed.open_table(path, mode="r")
    assert not r.flags.writeable and r[3, 0] == 7
    c = cembed.open_table(path, 20, 4, np.float32, mode="c")
    c[3] = -1                                               # copy-on-write: the file keeps 7
    assert cembed.open_table(path, mode="r")[3, 0] == 7
    rw = cembed.open_table(path)                            # "r+": existing file, no sizes needed
    assert rw.flags.writeable and rw.shape == (20, 4)
    fresh = cembed.open_table(path, 20, 4, mode="w+")        # "w+": recreated (zeros)
    assert fresh[3, 0] == 0


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_embeddings=21), ValueError, r"shape \(20, 4\), num_embeddings=21"),
    (dict(embedding_dim=5), ValueError, "embedding_dim=5"),
    (dict(dtype=np.float64), TypeError, "holds float32, but dtype=float64"),
    (dict(dtype=np.int32), TypeError, "float32 or float64"),
    (dict(mode="a"), ValueError, "mode must be one of"),
    (dict(init="ones"), ValueError, "init must be one of"),
])
def test_open_table_refusals(tmp_path, kwargs, error, match):
    path = tmp_path / "t.npy"
    cembed.open_table(path, 20, 4)
    before = path.read_bytes()
    with pytest.raises(error, match=match):
        cembed.open_table(path, **kwargs)
    assert path.read_bytes() == before


def test_open_table_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="give num_embeddings"):
        cembed.open_table(tmp_path / "missing.npy")
    with pytest.raises(FileNotFoundError):
        cembed.open_table(tmp_path / "missing.npy", mode="r")
    np.save(tmp_path / "v.npy", np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="must be 2-D"):
        cembed.open_table(tmp_path / "v.npy")
    np.save(tmp_path / "i.npy", np.zeros((5, 2), np.int64))
    with pytest.raises(TypeError, match="holds int64"):
        cembed.open_table(tmp_path / "i.npy")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((5, 2), np.float32)))
    with pytest.raises(ValueError, match="Fortran"):
        cembed.open_table(tmp_path / "f.npy")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match="not a readable .npy file"):
        cembed.open_table(tmp_path / "junk.npy")
    path = tmp_path / "cut.npy"
    cembed.open_table(path, 100, 8, init="normal", seed=0)
    with open(path, "r+b") as fh:
        fh.truncate(os.stat(path).st_size - 1)
    with pytest.raises(ValueError, match="cut.npy: truncated file"):
        cembed.open_table(path)
    np.save(tmp_path / "neg.npy", np.zeros((4, 2), np.float32))   # a header edited to a negative dimension
    raw = (tmp_path / "neg.npy").read_bytes().replace(b"(4, 2)", b"(-4, 2)", 1)
    (tmp_path / "neg.npy").write_bytes(raw)
    with pytest.raises(ValueError, match="neg.npy: its header gives the shape .* negative dimension"):
        cembed.open_table(tmp_path / "neg.npy")


def test_open_table_failed_init_leaves_nothing(tmp_path):
    def bad(block, start):
        if start > 0:
            raise RuntimeError("boom")
        block[:] = 1

    with pytest.raises(RuntimeError, match="boom"):
        cembed.open_table(tmp_path / "t.npy", 1000, 8, init=bad, chunk_bytes=8 * 4 * 10)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------ training on memmaps

OPTIMIZERS = {
    "sgd": lambda p, **kw: optim.SGD(p, lr=0.1, **kw),
    "sgd_momentum": lambda p, **kw: optim.SGD(p, lr=0.1, momentum=0.9, **kw),
    "sparse_adam": lambda p, **kw: optim.SparseAdam(p, lr=0.01, **kw),
    "sparse_adam_row": lambda p, **kw: optim.SparseAdam(p, lr=0.01, bias_correction="row", **kw),
    "sparse_adamw": lambda p, **kw: optim.SparseAdamW(p, lr=0.01, weight_decay=0.1, **kw),
    "adagrad": lambda p, **kw: optim.Adagrad(p, lr=0.1, initial_accumulator_value=0.1, **kw),
    "rowwise": lambda p, **kw: optim.RowWiseAdagrad(p, lr=0.1, weight_decay=0.01, **kw),
}


def _train(tables, opt_name, fused, kind, state_dir=None, steps=5, seed=0):
    """A few steps on ``tables`` (list of 2 arrays, in memory or mapped); returns the tables and the
    optimizer's state_dict."""
    rng = np.random.default_rng(seed)
    if kind == "emb":
        modules = [cembed.Embedding.from_pretrained(t, freeze=False, sparse=True) for t in tables]
    else:
        modules = [cembed.EmbeddingBag.from_pretrained(t, freeze=False, sparse=True, mode="sum") for t in tables]
    opt = OPTIMIZERS[opt_name](modules, **({} if state_dir is None else {"state_dir": state_dir}))
    n_rows, dim = tables[0].shape
    for _ in range(steps):
        for module in modules:
            idx = zipf_indices(rng, 96, n_rows).reshape(24, 4)
            out = module(idx)
            g = rng.standard_normal(out.shape).astype(out.dtype)
            if fused:
                module.backward(g, optimizer=opt)
        if not fused:
            opt.step()
            opt.zero_grad()
    return [np.array(m.weight) for m in modules], opt.state_dict()


@pytest.mark.parametrize("kind", ["emb", "bag"])
@pytest.mark.parametrize("fused", [False, True], ids=["step", "fused"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_memmap_training_is_bitwise_in_ram_training(tmp_path, opt_name, fused, kind):
    init = [np.random.default_rng(s).standard_normal((400, 12)).astype(np.float32) for s in (1, 2)]
    ram = _train([t.copy() for t in init], opt_name, fused, kind)
    mapped = []
    for k, t in enumerate(init):
        table = cembed.open_table(tmp_path / f"t{k}.npy", 400, 12)
        table[:] = t
        mapped.append(table)
    disk = _train(mapped, opt_name, fused, kind, state_dir=tmp_path / "state")
    assert all(isinstance(t, np.memmap) for t in mapped)
    assert fingerprint(ram) == fingerprint(disk)
    # the updates went into the files
    for k, table in enumerate(mapped):
        table.flush()
        assert_bitwise_equal(np.load(tmp_path / f"t{k}.npy"), ram[0][k])


def test_memmap_training_any_thread_count(tmp_path):
    results = []
    for n in (1, 2, 3):
        table = cembed.open_table(tmp_path / f"t{n}.npy", 500, 16, init="normal", seed=0)
        with num_threads(n):
            results.append(fingerprint(_train([table, table.copy()], "sparse_adam", True, "emb",
                                              state_dir=tmp_path / f"s{n}")))
    assert len(set(results)) == 1


# ------------------------------------------------------------------------------------------ state_dir

def test_state_dir_files_are_memmaps_with_stable_names(tmp_path):
    a = cembed.Embedding(1 << 16, 64, sparse=True, seed=0)
    b = cembed.Embedding(100, 64, sparse=True, seed=1)
    opt = optim.SparseAdam([{"params": [a]}, {"params": [b], "lr": 0.1}], state_dir=tmp_path / "s")
    b.backward(np.ones((1, 64), np.float32), np.array([3]), optimizer=opt)
    assert sorted(os.listdir(tmp_path / "s")) == [".lock", "p1.exp_avg.npy", "p1.exp_avg_sq.npy"]
    a.backward(np.ones((1, 64), np.float32), np.array([7]), optimizer=opt)
    assert sorted(os.listdir(tmp_path / "s")) == [".lock", "p0.exp_avg.npy", "p0.exp_avg_sq.npy",
                                                  "p1.exp_avg.npy", "p1.exp_avg_sq.npy"]
    state = opt.state[a]["exp_avg"]
    assert isinstance(state, np.memmap) and state.filename == str(tmp_path / "s" / "p0.exp_avg.npy")
    state.flush()
    size = os.stat(tmp_path / "s" / "p0.exp_avg.npy")
    assert size.st_size > 16 << 20   # 16 MiB of state, one row written, its disk space reserved (fallocate)
    assert (size.st_blocks * 512 >= 16 << 20) == _reserves_space(tmp_path)
    on_disk = np.load(tmp_path / "s" / "p0.exp_avg.npy")
    assert_bitwise_equal(on_disk, state)
    assert on_disk[7].any() and not on_disk[6].any()


@pytest.mark.parametrize("opt_name", ["adagrad", "rowwise"])
def test_state_dir_initial_value_is_written(tmp_path, opt_name):
    emb = cembed.Embedding(300, 4, sparse=True, seed=0)
    opt = OPTIMIZERS[opt_name]([emb], state_dir=tmp_path)
    ram = OPTIMIZERS[opt_name]([cembed.Embedding(300, 4, sparse=True, seed=0)])
    assert isinstance(opt.state[emb]["sum"], np.memmap)
    assert_bitwise_equal(opt.state[emb]["sum"], next(iter(ram.state.values()))["sum"])


def test_state_dir_is_locked_by_one_optimizer(tmp_path):
    emb = cembed.Embedding(10, 2, sparse=True)
    first = optim.SparseAdam([emb], state_dir=tmp_path)
    with pytest.raises(ValueError, match="in use by another optimizer"):
        optim.SparseAdam([cembed.Embedding(10, 2, sparse=True)], state_dir=tmp_path)
    del first
    optim.SparseAdam([emb], state_dir=tmp_path)       # the lock went with the first optimizer
    with pytest.raises(TypeError, match="state_dir must be a path"):
        optim.SGD([emb], state_dir=3)


def test_refused_optimizer_releases_its_state_dir(tmp_path):
    with pytest.raises(ValueError):
        optim.Adagrad([cembed.Embedding(10, 2)], lr=-1.0, state_dir=tmp_path)
    with pytest.raises(TypeError):
        optim.Adagrad([object()], state_dir=tmp_path)
    optim.Adagrad([cembed.Embedding(10, 2)], state_dir=tmp_path)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_state_dir_save_load_round_trip(tmp_path, opt_name):
    table = np.random.default_rng(0).standard_normal((200, 8)).astype(np.float32)
    emb = cembed.Embedding.from_pretrained(table.copy(), freeze=False, sparse=True)
    opt = OPTIMIZERS[opt_name]([emb], state_dir=tmp_path / "a")
    rng = np.random.default_rng(1)
    for _ in range(3):
        emb(zipf_indices(rng, 50, 200))
        emb.backward(rng.standard_normal((50, 8)).astype(np.float32), optimizer=opt)
    opt.save(tmp_path / "opt.npz")
    other = cembed.Embedding.from_pretrained(emb.weight.copy(), freeze=False, sparse=True)
    loaded = OPTIMIZERS[opt_name]([other], state_dir=tmp_path / "b")
    loaded.load(tmp_path / "opt.npz")
    assert fingerprint(loaded.state_dict()) == fingerprint(opt.state_dict())
    for key, value in loaded.state.get(other, {}).items():
        if isinstance(value, np.ndarray) and key != "active_rows":
            assert isinstance(value, np.memmap) and os.path.dirname(value.filename) == str(tmp_path / "b")
    # the two continue identically
    for module, o in ((emb, opt), (other, loaded)):
        module(np.array([1, 5, 5]))
        module.backward(np.ones((3, 8), np.float32), optimizer=o)
    assert_bitwise_equal(emb.weight, other.weight)
    # an in-memory optimizer loads the same file too
    ram = OPTIMIZERS[opt_name]([cembed.Embedding.from_pretrained(table.copy(), freeze=False, sparse=True)])
    ram.load(tmp_path / "opt.npz")
    assert not any(isinstance(v, np.memmap) for entry in ram.state.values() for v in entry.values())


def test_state_dir_refused_load_changes_nothing(tmp_path):
    emb = cembed.Embedding(50, 4, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], state_dir=tmp_path)
    emb.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)
    sd = opt.state_dict()
    sd["state"][0]["exp_avg_sq"] = np.zeros((49, 4), np.float32)
    files = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    before = fingerprint(opt.state_dict())
    with pytest.raises(ValueError, match="exp_avg_sq"):
        opt.load_state_dict(sd)
    assert fingerprint(opt.state_dict()) == before
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == files


# ------------------------------------------------------------------------------------------ prefetch

def _expected_pages(array, rows, gap):
    """Reference for the prefetch kernel: pages of the rows' bytes, ranges merged across gaps."""
    page = mmap.PAGESIZE
    base = array.ctypes.data
    row_bytes = array.itemsize * (array.shape[1] if array.ndim == 2 else 1)
    ranges = []
    for r in np.unique(rows):
        lo = (base + int(r) * array.strides[0]) // page
        hi = (base + int(r) * array.strides[0] + row_bytes - 1) // page + 1
        if ranges and lo <= ranges[-1][1] + gap:
            ranges[-1][1] = max(ranges[-1][1], hi)
        else:
            ranges.append([lo, hi])
    return sum(hi - lo for lo, hi in ranges)


def test_prefetch_advises_the_rows_pages(tmp_path, rng):
    table = cembed.open_table(tmp_path / "t.npy", 50_000, 24, init="normal", seed=0)
    state = cembed.open_table(tmp_path / "s.npy", 50_000, 24)
    per_row = np.memmap(tmp_path / "r.bin", dtype=np.int64, mode="w+", shape=(50_000,))
    rows = rng.integers(0, 50_000, (40, 3))
    gap = cembed.functional.PREFETCH_GAP_PAGES
    expected = sum(_expected_pages(a, rows.ravel(), gap) for a in (table, state, per_row))
    assert cembed.functional.prefetch(table, rows, state, per_row, wait=True) == expected
    assert cembed.functional.prefetch(table[100:], np.array([0, 49_899]), wait=True) == \
        _expected_pages(table[100:], np.array([0, 49_899]), gap)
    # in memory, or nothing to read: nothing to do
    assert cembed.functional.prefetch(np.array(table), rows, wait=True) == 0
    assert cembed.functional.prefetch(table, np.zeros(0, np.int64), wait=True) == 0
    assert cembed.functional.prefetch(table, rows) == 0          # handed to the prefetch thread


def test_prefetch_refusals(tmp_path):
    table = cembed.open_table(tmp_path / "t.npy", 100, 4)
    with pytest.raises(IndexError, match="100 at position 1"):
        cembed.functional.prefetch(table, [3, 100])
    with pytest.raises(IndexError):
        cembed.functional.prefetch(table, [-1])
    with pytest.raises(TypeError, match="integer"):
        cembed.functional.prefetch(table, [1.5])
    with pytest.raises(ValueError, match="num_embeddings=100 rows"):
        cembed.functional.prefetch(table, [1], np.zeros((99, 4)))
    with pytest.raises(TypeError, match="state_arrays"):
        cembed.functional.prefetch(table, [1], [1, 2])
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    with pytest.raises(ValueError, match="does not hold"):
        emb.prefetch([1], optim.SparseAdam([cembed.Embedding(100, 4, sparse=True)]))


def test_module_prefetch_covers_the_optimizer_state(tmp_path):
    table = cembed.open_table(tmp_path / "t.npy", 10_000, 32)
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.SparseAdam([emb], state_dir=tmp_path / "s")
    idx = np.array([[1, 5000], [9999, 3]])
    alone = emb.prefetch(idx, wait=True)
    assert emb.prefetch(idx, opt, wait=True) == alone      # no state yet (SparseAdam makes it lazily)
    emb(idx)
    emb.backward(np.ones((2, 2, 32), np.float32), optimizer=opt)
    assert emb.prefetch(idx, opt, wait=True) == 3 * alone  # the weight and both moments
    bag = cembed.EmbeddingBag.from_pretrained(table, freeze=False, sparse=True)
    assert bag.prefetch(idx, wait=True) == alone
    with pytest.raises(TypeError, match="wait"):
        emb.prefetch(idx, wait="yes")


def _resident(array):
    """Which pages of a mapped array are in memory (mincore), or None where it cannot be asked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover
        return None
    page = mmap.PAGESIZE
    start = array.ctypes.data // page * page
    length = array.ctypes.data + array.nbytes - start
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
        return None
    return np.frombuffer(vec, dtype=np.uint8) & 1, start


def test_prefetch_brings_the_pages_into_memory(tmp_path):
    """After the file's pages are dropped from the page cache, prefetch makes the rows' pages
    resident (without the caller touching them)."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    path = tmp_path / "t.npy"
    cembed.open_table(path, 200_000, 16, init="normal", seed=0)        # 12.8 MB, synced when created
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    table = cembed.open_table(path, mode="r")
    state = _resident(table)
    if state is None or state[0].sum() > 0.2 * state[0].size:
        pytest.skip("cannot drop this file from the page cache here")
    rows = np.array([10, 60_000, 150_000, 199_999])
    cembed.functional.prefetch(table, rows)              # in the background
    rows_copy = rows.copy()
    rows[:] = 0                                           # the caller's array is not used after the call
    page = mmap.PAGESIZE
    wanted = [(table.ctypes.data + r * table.strides[0] - state[1]) // page for r in rows_copy]
    deadline = time.monotonic() + 10
    while True:
        resident, _ = _resident(table)
        if all(resident[p] for p in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert all(resident[p] for p in wanted)


def test_release_free_memory_returns_freed_heap():
    """Freed small-block heap memory goes back to the system (glibc): resident memory drops."""
    def rss_anon():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("RssAnon:")) << 10
    try:
        rss_anon()
    except (OSError, StopIteration):
        pytest.skip("no /proc/self/status RssAnon here")
    with open("/proc/self/maps") as fh:
        if "libasan" in fh.read():   # .ci/sanitize: ASan's allocator quarantines freed blocks, no malloc_trim
            pytest.skip("AddressSanitizer's allocator owns the heap in this process")
    blocks = [bytearray(16 << 10) for _ in range(8192)]                  # 128 MiB of heap (not mmap) blocks
    for b in blocks:
        b[::4096] = b"\1" * len(b[::4096])
    keep = blocks[-1]
    del blocks                                                           # freed, but the heap top is kept
    before = rss_anon()
    if not cembed.storage.release_free_memory():
        pytest.skip("no malloc_trim here")
    assert rss_anon() < before - (32 << 20)
    assert keep[0] == 1


# ------------------------------------------------------------------------------------------ row alignment

def _aligned(array):
    return array.ctypes.data % cembed.storage.ALIGNMENT == 0


@pytest.mark.parametrize("shape, dtype", [((1000, 64), np.float32), ((3, 5), np.float64), ((0, 3), np.float32),
                                          (7, np.float16), ((2, 3, 4), np.int64)])
def test_aligned_zeros(shape, dtype):
    a = cembed.storage.aligned_zeros(shape, dtype)
    expected = np.zeros(shape, dtype)
    assert a.shape == expected.shape and a.dtype == expected.dtype and (a.size == 0 or _aligned(a))
    assert a.flags.c_contiguous and a.flags.writeable and not a.any()


def test_aligned_copy_is_astype(rng):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    source = rng.standard_normal((257, 33)).astype(np.float32)
    for dtype in (None, np.float64, np.float16, ml_dtypes.bfloat16):
        copy = cembed.storage.aligned_copy(source, dtype)
        want = source.astype(source.dtype if dtype is None else dtype)
        assert _aligned(copy) and copy.dtype == want.dtype and copy.flags.c_contiguous
        assert_bitwise_equal(copy, want)
        assert not np.shares_memory(copy, source)
    strided = cembed.storage.aligned_copy(source[::2, ::3])   # any layout in, C order out
    assert_bitwise_equal(strided, np.ascontiguousarray(source[::2, ::3]))


def test_aligned_zeros_refuses_negative_shapes():
    with pytest.raises(ValueError, match="negative"):
        cembed.storage.aligned_zeros((3, -1))


@pytest.mark.parametrize("shape", [(10 ** 12, 10 ** 12), (2 ** 62, 4), (2 ** 61, 1)])
def test_aligned_zeros_refuses_a_shape_no_address_space_holds(shape):
    """The byte count wrapped around in int64: a 'cannot reshape' error (or an allocation of the
    wrapped size) instead of naming the size."""
    with pytest.raises(ValueError, match="array is too big"):
        cembed.storage.aligned_zeros(shape)


def test_tables_and_state_are_aligned(tmp_path, rng):
    """The arrays cembed allocates for a table and its optimizer state start on a page boundary (rows in
    whole cache lines), however they were made: constructed, state created at the first step or by
    the constructor, state loaded, a checkpoint loaded into memory, initial_rows."""
    from cembed.distributed import initial_rows

    emb = cembed.Embedding(1000, 48, sparse=True, seed=0)
    bag = cembed.EmbeddingBag(500, 16, mode="sum", dtype=np.float16, seed=1)
    assert _aligned(emb.weight) and _aligned(bag.weight)
    for opt in (optim.SparseAdam([emb]), optim.Adagrad([emb], initial_accumulator_value=0.5),
                optim.RowWiseAdagrad([emb])):
        emb.backward(np.ones((3, 48), np.float32), np.array([1, 7, 1]), optimizer=opt)
        arrays = [v for v in opt.state[emb].values() if isinstance(v, np.ndarray) and v.size > 1]
        assert arrays and all(_aligned(a) for a in arrays), type(opt).__name__
        again = type(opt)([emb])
        again.load_state_dict(opt.state_dict())
        assert all(_aligned(v) for v in again.state[emb].values() if isinstance(v, np.ndarray) and v.size > 1)
    path = cembed.save_checkpoint(tmp_path / "ck", [emb])
    other = cembed.Embedding(1000, 48, seed=5)
    cembed.load_checkpoint(path, [other], mmap=False)
    assert_bitwise_equal(other.weight, emb.weight)
    assert _aligned(other.weight)
    assert _aligned(initial_rows(3, np.arange(100), 24)) and _aligned(initial_rows(3, np.arange(100), 24, np.float16))


def test_create_zeros_checks_its_arguments_before_touching_the_file(tmp_path):
    """A negative dimension truncated the new file into its own header and renamed it over an
    existing table; float / str dimensions and object dtypes wrote files no reader can parse."""
    path = tmp_path / "t.npy"
    np.save(path, np.arange(8, dtype=np.float32).reshape(2, 4))
    before = path.read_bytes()
    for shape, dtype, error, match in (((-1, 4), np.float32, ValueError, r"shape\[0\] must be >= 0"),
                                       ((2.5, 2), np.float32, TypeError, r"shape\[0\] must be an int"),
                                       (("3", 2), np.float32, TypeError, "must be an int"),
                                       ((3, 2), object, TypeError, "plain numeric dtype"),
                                       ((2 ** 40, 2 ** 30), np.float32, ValueError, "larger than")):
        with pytest.raises(error, match=match):
            cembed.storage.create_zeros(path, shape, dtype)
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["t.npy"]


def test_a_callable_init_that_writes_part_of_the_block_leaves_zeros(tmp_path):
    """The block a callable init gets was uninitialised memory: what it did not write reached the file."""
    def half(block, start):
        block[:, :2] = 1.0

    table = cembed.open_table(tmp_path / "h.npy", 1000, 4, init=half, chunk_bytes=256)
    assert (np.asarray(table[:, :2]) == 1).all() and (np.asarray(table[:, 2:]) == 0).all()

    def reshapes(block, start):
        block.shape = (block.size,)

    with pytest.raises(ValueError, match="init changed the block"):
        cembed.open_table(tmp_path / "r.npy", 10, 4, init=reshapes)
    assert not (tmp_path / "r.npy").exists()


def test_copy_rows_of_overlapping_arrays_is_a_memmove():
    x = np.arange(6, dtype=np.float64).reshape(6, 1)
    y = x.copy()
    cembed.storage.copy_rows(x[1:], x[:-1], chunk_bytes=8)
    y[1:] = y[:-1].copy()
    assert np.array_equal(x, y)
    x = np.arange(6, dtype=np.float64).reshape(6, 1)
    cembed.storage.copy_rows(x[:-1], x[1:], chunk_bytes=8)
    assert x.ravel().tolist() == [1, 2, 3, 4, 5, 5]
    with pytest.raises(ValueError, match="chunk_bytes must be >= 1"):
        cembed.storage.copy_rows(x, x.copy(), chunk_bytes=0)
    with pytest.raises(TypeError, match="numpy arrays"):
        cembed.storage.copy_rows(x, x.tolist())


def test_prefetch_of_a_reversed_view_advises_every_row(tmp_path):
    """With a negative row stride the page ranges were merged as if addresses rose with the rows:
    only the first row's pages were advised."""
    table = cembed.open_table(tmp_path / "pf.npy", 4096, 16, mode="w+")   # 64-byte rows: 64 per 4 KiB page
    rows = np.array([0, 1000, 2000, 4095])
    forward = cembed.functional.prefetch(table, rows, wait=True)
    assert forward >= 4 and cembed.functional.prefetch(table[::-1], rows, wait=True) == forward


def test_byte_swapped_float_values_are_taken_in_native_order():
    values = np.arange(4, dtype=">f4").reshape(2, 2)
    grad = cembed.SparseGrad([1, 3], values, num_rows=5)
    assert grad.values.dtype == np.float32 and np.array_equal(grad.values, values)
    weight = np.eye(3, dtype=np.float32)
    swapped = cembed.functional.embedding_dot_backward(np.array([[1, 2]], ">f4"), [[0, 2]], weight)
    assert np.array_equal(swapped, cembed.functional.embedding_dot_backward(np.array([[1, 2]], "<f4"), [[0, 2]], weight))


@pytest.mark.parametrize("mode", ["w+", "r+"])
def test_a_table_created_through_a_symbolic_link_is_created_where_it_points(tmp_path, mode):
    """A table file linked to another disk (``tables/in.npy -> /big/in.npy``): creating it writes the file
    the link points to and keeps the link (a rename over the link once replaced it with a file beside it)."""
    (tmp_path / "big").mkdir()
    (tmp_path / "tables").mkdir()
    link = tmp_path / "tables" / "in.npy"
    os.symlink(tmp_path / "big" / "in.npy", link)
    table = cembed.open_table(link, 20, 4, mode=mode, init="normal", seed=1)
    assert os.path.islink(link) and (tmp_path / "big" / "in.npy").is_file()
    assert os.listdir(tmp_path / "tables") == ["in.npy"]
    assert_bitwise_equal(np.load(tmp_path / "big" / "in.npy"), table)
    again = cembed.open_table(link, 20, 4, mode="w+", init="zeros")   # recreated: still through the link
    assert os.path.islink(link) and not np.load(tmp_path / "big" / "in.npy").any() and not again.any()


def test_sigint_held_holds_back_sigterm_too_when_python_handles_it():
    """``python -m cembed`` turns SIGTERM into a clean stop (a KeyboardInterrupt), and the windows a
    Ctrl-C is held back in (a save's renames, a load's commit) held back only SIGINT: a SIGTERM there
    stopped a step half-done (found by a reviewer). Both are held now, and delivered when the block
    ends; SIGTERM's default (end the process) is left alone."""
    import signal

    class Stop(KeyboardInterrupt):
        pass

    def stop(signum, frame):
        raise Stop(signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            done = []
            with pytest.raises(KeyboardInterrupt) as raised:
                with cembed.storage.sigint_held():
                    os.kill(os.getpid(), signum)
                    done.append("the block ran to its end")
            assert done == ["the block ran to its end"]
            assert signum != signal.SIGTERM or isinstance(raised.value, Stop)
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, previous)
