"""Files, checkpoints and the trainer's table directory under hostile sequences (a review's findings):
a full disk is an OSError when a file is created, never a SIGBUS while training; a checkpoint links
only checkpoint files that are still the files mapped; loads and saves refuse bad states before any
file changes; a refused --resume or a --table-dir in use changes nothing."""
import ctypes
import errno
import fcntl
import gc
import hashlib
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cembed
from cembed import optim, storage
from cembed.checkpoint import CheckpointError

from util import assert_bitwise_equal, env_importing_this_cembed

ROOT = pathlib.Path(cembed.__file__).resolve().parent.parent
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _digest(path):
    """(inode, sha1 of the bytes) of a file: what 'unchanged on disk' means here."""
    return os.stat(path).st_ino, hashlib.sha1(pathlib.Path(path).read_bytes()).hexdigest()


def _tree(directory):
    """Every file under ``directory`` with its _digest."""
    out = {}
    for here, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(here, name)
            out[os.path.relpath(path, directory)] = _digest(path)
    return out


# ------------------------------------------------------------------------------------ full disk

def _failing_fallocate(code):
    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(code)
        return -1
    return fallocate


def _adam_step(emb, opt, rows, fused=True):
    grad = np.ones((len(rows), emb.weight.shape[1]), np.float32)
    if fused:
        emb.backward(grad, np.asarray(rows), optimizer=opt)
    else:
        emb.backward(grad, np.asarray(rows))
        opt.step()
        opt.zero_grad()


def test_full_disk_at_creation_is_an_oserror_and_changes_nothing(tmp_path, monkeypatch):
    """No room for a file cembed writes through a mapping (create_zeros: zero tables, state_dir
    files, loaded state): an OSError naming the file when it is created, the previous file kept, no
    temporary left, the optimizer's state and the weight as they were. On main the file is created
    sparse, and the first write through the mapping on a full disk is a SIGBUS."""
    table = tmp_path / "t.npy"
    cembed.open_table(table, 50, 4, init="normal", seed=0)
    before = _digest(table)
    monkeypatch.setattr(storage, "_fallocate", _failing_fallocate(errno.ENOSPC))
    with pytest.raises(OSError, match="t.npy: cannot reserve") as info:
        cembed.open_table(table, 50, 4, mode="w+")             # init="zeros" over an existing table
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        storage.create_zeros(table, (50, 4), np.float32)
    assert _digest(table) == before and sorted(os.listdir(tmp_path)) == ["t.npy"]

    # state_dir: the first step creates the state files (fused backward and step())
    for fused in (True, False):
        emb = cembed.Embedding(100, 4, sparse=True, seed=0)
        weight = emb.weight.copy()
        opt = optim.SparseAdam([emb], lr=0.1, state_dir=tmp_path / f"s{fused}")
        with pytest.raises(OSError, match="p0.exp_avg.npy"):
            _adam_step(emb, opt, [1, 5], fused)
        assert_bitwise_equal(emb.weight, weight)
        assert not opt.state.get(emb) and sorted(os.listdir(tmp_path / f"s{fused}")) == [".lock"]
        emb.grad = None
    # ... and the optimizer works once there is room, bitwise like one that never failed
    monkeypatch.undo()
    _adam_step(emb, opt, [1, 5], fused=False)
    ref = cembed.Embedding(100, 4, sparse=True, seed=0)
    ref_opt = optim.SparseAdam([ref], lr=0.1)
    _adam_step(ref, ref_opt, [1, 5], fused=False)
    assert_bitwise_equal(emb.weight, ref.weight)
    assert_bitwise_equal(opt.state[emb]["exp_avg_sq"], ref_opt.state[ref]["exp_avg_sq"])

    # load_state_dict into a state_dir: refused before any state file is replaced
    _adam_step(emb, opt, [2], fused=False)
    files = _tree(tmp_path / "sFalse")
    live = {k: np.array(v) for k, v in opt.state[emb].items() if isinstance(v, np.ndarray)}
    monkeypatch.setattr(storage, "_fallocate", _failing_fallocate(errno.EDQUOT))
    with pytest.raises(OSError):
        opt.load_state_dict(ref_opt.state_dict())
    assert _tree(tmp_path / "sFalse") == files
    assert opt.state[emb]["step"] == 2
    for key, value in live.items():
        assert_bitwise_equal(opt.state[emb][key], value)


def _failing_after(n_ok, code):
    """A fallocate that reserves the first ``n_ok`` files, then reports ``code``."""
    calls = []

    def fallocate(fd, mode, offset, length):
        calls.append(length)
        if len(calls) <= n_ok:
            return 0
        ctypes.set_errno(code)
        return -1
    return fallocate


@pytest.mark.parametrize("name", ["SparseAdam", "SparseAdamW", "SGD"])
def test_full_disk_at_a_later_parameter_refuses_the_whole_step(tmp_path, monkeypatch, name):
    """step() over two parameters whose state is created at this step, with room on the disk for the
    first parameter's files only: the whole step is refused — neither weight nor state changed, no
    file left but the lock — and once there is room it runs bitwise like an optimizer that never
    failed. Before, the first parameter was updated and the error came at the second, so calling
    step() again (the gradients still there) applied the first parameter's gradient twice."""
    options = {"SparseAdam": {}, "SparseAdamW": {}, "SGD": {"momentum": 0.9}}[name]
    make = lambda: [cembed.Embedding(60, 4, sparse=True, seed=s) for s in (0, 1)]   # noqa: E731
    mods = make()
    weights = [m.weight.copy() for m in mods]
    opt = getattr(optim, name)(mods, lr=0.1, state_dir=tmp_path / "s", **options)
    for m in mods:
        m.backward(np.ones((2, 4), np.float32), np.array([3, 7]))
    n_first = {"SparseAdam": 2, "SparseAdamW": 3, "SGD": 1}[name]   # the first parameter's state files
    monkeypatch.setattr(storage, "_fallocate", _failing_after(n_first, errno.ENOSPC))
    with pytest.raises(OSError, match="p1"):
        opt.step()
    for m, w in zip(mods, weights):
        assert_bitwise_equal(m.weight, w)
    assert not any(opt.state.get(m) for m in mods)
    assert sorted(os.listdir(tmp_path / "s")) == [".lock"]
    monkeypatch.undo()
    opt.step()
    ref = make()
    ref_opt = getattr(optim, name)(ref, lr=0.1, **options)
    for m in ref:
        m.backward(np.ones((2, 4), np.float32), np.array([3, 7]))
    ref_opt.step()
    for m, r in zip(mods, ref):
        assert_bitwise_equal(m.weight, r.weight)
    assert not [f for f in os.listdir(tmp_path / "s") if f.endswith(".tmp")]


def test_no_address_space_at_a_later_parameter_refuses_the_whole_step(tmp_path, monkeypatch):
    """As a full disk: mapping the second parameter's new state file fails (ENOMEM: what a limit on
    the address space gives) — the step is refused with nothing changed, and the next one runs as
    if the first had not been tried. A review found the map made after the first parameter's
    update, so a retried step applied its gradient twice."""
    mods = [cembed.Embedding(60, 4, sparse=True, seed=s) for s in (0, 1)]
    weights = [m.weight.copy() for m in mods]
    opt = optim.SparseAdam(mods, lr=0.1, state_dir=tmp_path / "s")
    for m in mods:
        m.backward(np.ones((2, 4), np.float32), np.array([3, 7]))
    real, calls = storage.map_array, []

    def map_array(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError(errno.ENOMEM, "Cannot allocate memory")
        return real(*args, **kwargs)
    monkeypatch.setattr(storage, "map_array", map_array)
    with pytest.raises(OSError):
        opt.step()
    for m, w in zip(mods, weights):
        assert_bitwise_equal(m.weight, w)
    assert not any(opt.state.get(m) for m in mods) and sorted(os.listdir(tmp_path / "s")) == [".lock"]
    monkeypatch.undo()
    opt.step()
    assert [opt.state[m]["step"] for m in mods] == [1, 1]
    assert storage.backing_file(opt.state[mods[1]]["exp_avg"]) == str(tmp_path / "s" / "p1.exp_avg.npy")


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_a_failed_rename_at_a_later_parameter_refuses_the_whole_step(tmp_path, monkeypatch, error):
    """Putting the second parameter's new state file in place fails (an I/O error, or Ctrl-C at that
    moment): nothing changed, no file left, and the optimizer steps on as one that never failed. A
    review found the rename made after the first parameter's update (updated, its file left; a
    retry applied its gradient twice), and a KeyboardInterrupt leaving a half-made state that every
    later step refused."""
    make = lambda: [cembed.Embedding(30, 4, sparse=True, seed=s) for s in (0, 1)]   # noqa: E731
    mods = make()
    weights = [m.weight.copy() for m in mods]
    opt = optim.SparseAdam(mods, lr=0.1, state_dir=tmp_path / "s")
    for m in mods:
        m.backward(np.ones((2, 4), np.float32), np.array([3, 7]))
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("p1.exp_avg.npy"):
            raise error
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(type(error)):
        opt.step()
    monkeypatch.undo()
    for m, w in zip(mods, weights):
        assert_bitwise_equal(m.weight, w)
    assert not any(opt.state.get(m) for m in mods) and sorted(os.listdir(tmp_path / "s")) == [".lock"]
    opt.step()
    ref = make()
    ref_opt = optim.SparseAdam(ref, lr=0.1)
    for m in ref:
        m.backward(np.ones((2, 4), np.float32), np.array([3, 7]))
    ref_opt.step()
    for m, r in zip(mods, ref):
        assert_bitwise_equal(m.weight, r.weight)


def test_a_refused_fused_step_leaves_no_state_file(tmp_path, monkeypatch):
    """The fused backward + update reserves its parameter's new state files as step() does: room for
    two of SparseAdamW's three files refuses it with no file left (a review found two orphaned
    files, a table's worth of disk each, with names no clean-up removes)."""
    emb = cembed.Embedding(60, 4, sparse=True, seed=0)
    weight = emb.weight.copy()
    opt = optim.SparseAdamW([emb], lr=0.1, state_dir=tmp_path / "s")
    monkeypatch.setattr(storage, "_fallocate", _failing_after(2, errno.ENOSPC))
    with pytest.raises(OSError, match="row_decay_log"):
        emb.backward(np.ones((2, 4), np.float32), np.array([3, 7]), optimizer=opt)
    assert_bitwise_equal(emb.weight, weight)
    assert not opt.state.get(emb) and sorted(os.listdir(tmp_path / "s")) == [".lock"]


#: A child that starts writing ``sys.argv[1]`` and is killed (SIGKILL) in the middle of it.
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from cembed import storage
    def write(fh):
        fh.write(b"x" * 4096)
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    storage.write_atomically(sys.argv[1], write)
""")


def _rewrite(how, path):
    if how == "write_atomically":
        storage.write_atomically(path, b"new")
    elif how == "open_table":
        storage.open_table(path, 10, 4, mode="w+", init="normal", seed=0)
    else:
        emb = cembed.Embedding(10, 4, sparse=True, seed=0)
        opt = optim.Adagrad([emb])
        emb.backward(np.ones((1, 4), np.float32), np.array([2]))
        opt.step()
        opt.save(path)


@pytest.mark.parametrize("how", ["write_atomically", "open_table", "Optimizer.save"])
def test_a_killed_writers_temporary_is_removed_by_the_next_write_of_that_file(tmp_path, how):
    """A process killed while it wrote a file (the OOM killer, SIGKILL) left the file's hidden temporary
    (a table's worth of reserved space for a table); the next write of that file removes it, and only
    what killed cembed writers left: not another file's, not another program's (no .cembed. mark), not
    a .cembed.new younger than ABANDONED_NEW_SECONDS (its writer may be about to lock it)."""
    path = str(tmp_path / "t.npy")
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, path], env=ENV, capture_output=True,
                           cwd=tmp_path)   # (not the checkout: its unbuilt sources would shadow the package)
    assert child.returncode == -9, child.stderr
    [left] = os.listdir(tmp_path)
    assert left.startswith(".t.npy.") and left.endswith(".cembed.tmp")
    kept = [".t.npy.abcd1234.tmp", ".u.npy.abcd1234.cembed.tmp", "notes.txt", ".t.npy.young123.cembed.new"]
    for name in kept + [".t.npy.old12345.cembed.new"]:
        (tmp_path / name).write_bytes(b"")
    os.utime(tmp_path / ".t.npy.old12345.cembed.new", (0, 0))
    _rewrite(how, path)
    assert sorted(os.listdir(tmp_path)) == sorted(kept + ["t.npy"])
    assert not [name for name in storage._held_temporaries if name.startswith(str(tmp_path))]


#: A child that writes ``sys.argv[1]``, says "writing" and waits for a line on stdin before it finishes.
WAITING_WRITER = textwrap.dedent("""
    import sys
    from cembed import storage
    def write(fh):
        fh.write(b"theirs")
        fh.flush()
        print("writing", flush=True)
        sys.stdin.readline()
    storage.write_atomically(sys.argv[1], write)
""")


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    """Another process writing the same file holds its temporary's lock: a write here in the meantime
    leaves that temporary alone, and the other writer finishes (its file put in place)."""
    path = str(tmp_path / "t.bin")
    child = subprocess.Popen([sys.executable, "-c", WAITING_WRITER, path], env=ENV, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert child.stdout.readline() == "writing\n"
        [theirs] = os.listdir(tmp_path)
        storage.write_atomically(path, b"ours")
        assert sorted(os.listdir(tmp_path)) == sorted([theirs, "t.bin"])
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=60) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert os.listdir(tmp_path) == ["t.bin"] and pathlib.Path(path).read_bytes() == b"theirs"


def test_a_temporarys_lock_is_released_once_it_is_renamed_or_removed(tmp_path):
    """The lock (a descriptor) of each temporary is given up when it is put in place or dropped — by
    replace_files, discard_reserved, or at the next temporary made after a plain os.replace — so a
    long-running process does not keep descriptors, nor the disk space of replaced files."""
    def held():
        return [name for name in storage._held_temporaries if name.startswith(str(tmp_path))]

    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    storage.replace_files([(storage.write_aside(a, lambda fh: fh.write(b"a")), a),
                           (storage.write_aside(b, lambda fh: fh.write(b"b")), b)])
    assert held() == []
    tmp = storage.reserve_zeros(a, (4, 4), np.float32)
    assert held() == [tmp]
    storage.discard_reserved(tmp)
    assert held() == [] and sorted(os.listdir(tmp_path)) == ["a.npy", "b.npy"]
    storage.rename_into_place(storage.write_aside(a, lambda fh: fh.write(b"c")), a)
    assert held() == [] and pathlib.Path(a).read_bytes() == b"c"
    os.replace(storage.reserve_zeros(a, (4, 4), np.float32), a)
    tmp = storage.reserve_zeros(b, (4, 4), np.float32)
    assert held() == [tmp]
    storage.discard_reserved(tmp)
    # an optimizer's step puts its reserved state files in place itself: none stays held (a held
    # descriptor kept a removed state_dir's disk space until this process's next write)
    emb = cembed.Embedding(50, 8, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], state_dir=tmp_path / "state")
    emb.backward(np.ones((2, 8), np.float32), np.array([1, 2]))
    opt.step()
    assert held() == [] and len(os.listdir(tmp_path / "state")) == 3   # the lock, exp_avg, exp_avg_sq


def test_a_crashed_steps_reserved_files_are_removed_when_the_state_dir_is_next_locked(tmp_path):
    """A process killed during a step leaves its reserved state files (space reserved: a table's worth
    each) and a killed load its .loading files; the next optimizer on the directory removes exactly
    those once it holds the lock — never another file, never while another optimizer holds it."""
    d = tmp_path / "s"
    d.mkdir()
    stale = [".p0.exp_avg.npy.k3j9x_1.tmp", ".p12.row_decay_log.npy.abc.tmp", "p1.exp_avg_sq.npy.loading",
             ".p2.sum.npy.0a1b2c3d4e5f.replaced", "p3.sum.npy.replaced"]
    kept = ["p0.exp_avg.npy", "notes.txt", ".p0.exp_avg.npy", "x.npy.loading", ".q0.a.npy.z.tmp"]
    for name in stale + kept:
        (d / name).write_bytes(b"x")
    emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    first = optim.SparseAdam([emb], state_dir=d)
    (d / stale[0]).write_bytes(b"x")                      # made while `first` holds the lock
    with pytest.raises(ValueError, match="in use"):
        optim.SparseAdam([cembed.Embedding(10, 4, sparse=True)], state_dir=d)
    assert sorted(os.listdir(d)) == sorted([".lock", stale[0]] + kept)   # the refused one removed nothing
    del first
    gc.collect()
    with pytest.raises(ValueError, match="empty parameter list"):   # a refused constructor removes nothing
        optim.SparseAdam([], state_dir=d)
    assert sorted(os.listdir(d)) == sorted([".lock", stale[0]] + kept)
    optim.SparseAdam([emb], state_dir=d)
    assert sorted(os.listdir(d)) == sorted([".lock"] + kept)


LAZY_STATE = [   # (optimizer, options, sparse gradient, 16-bit table): every way a step creates state
    ("SGD", {"momentum": 0.9}, True, False), ("SGD", {"momentum": 0.9}, False, False),
    ("SGD", {"momentum": 0.9}, False, True), ("SGD", {"momentum": 0.9}, True, True),
    ("SparseAdam", {}, True, False), ("SparseAdam", {"bias_correction": "row"}, True, False),
    ("SparseAdam", {}, True, True), ("SparseAdamW", {}, True, False),
    ("SparseAdamW", {"bias_correction": "row"}, True, True), ("Adagrad", {}, True, False),
    ("Adagrad", {}, False, True), ("RowWiseAdagrad", {}, False, False), ("RowWiseAdagrad", {}, True, True),
]


@pytest.mark.parametrize("name,options,sparse,half", LAZY_STATE)
def test_step_creates_only_reserved_state_files(tmp_path, monkeypatch, name, options, sparse, half):
    """Every state file a step() creates was reserved before the first parameter was updated (the
    optimizer's _state_files_for_step names it): no create_zeros runs inside the update, and no
    reserved temporary is left afterwards. A new lazily created state array must be named there."""
    dtype = "float16" if half else "float32"
    mods = [cembed.Embedding(40, 8, sparse=sparse, seed=s, dtype=dtype) for s in (0, 1)]
    extra = {"state_dtype": "bfloat16", "seed": 0} if half else {}
    opt = getattr(optim, name)(mods, lr=0.1, state_dir=tmp_path / "s", **options, **extra)
    created = []
    real = storage.create_zeros
    monkeypatch.setattr(storage, "create_zeros", lambda path, *a, **k: (created.append(path), real(path, *a, **k)))
    for _ in range(2):
        for m in mods:
            m.backward(np.ones((3, 8), np.float32), np.array([1, 5, 5]))
        opt.step()
        opt.zero_grad()
    assert created == []
    files = sorted(os.listdir(tmp_path / "s"))
    assert not [f for f in files if f.endswith(".tmp")], files
    assert len(files) > 1, files   # the lock and the state files


def test_initialised_tables_reserve_their_space_and_survive_short_writes(tmp_path, monkeypatch):
    """A table created with an initialisation: its space is reserved before it is written (no room:
    an OSError, nothing left behind), and a short write (what pwrite does at the end of a full disk)
    is continued, never left as a hole of zeros (on main the rest of the block was silently lost)."""
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, bytes(data)[:max(1, len(data) // 3)], offset))
    table = cembed.open_table(tmp_path / "t.npy", 300, 8, init="normal", seed=3, chunk_bytes=1000)
    assert_bitwise_equal(table, cembed.Embedding(300, 8, seed=3).weight)
    monkeypatch.setattr(storage, "_fallocate", _failing_fallocate(errno.ENOSPC))
    with pytest.raises(OSError, match="u.npy: cannot reserve"):
        cembed.open_table(tmp_path / "u.npy", 300, 8, init="uniform", seed=3)
    assert sorted(os.listdir(tmp_path)) == ["t.npy"]


def test_file_systems_without_fallocate_keep_sparse_files(tmp_path, monkeypatch):
    """Where the file system cannot reserve space (EOPNOTSUPP) the file is created sparse, as before
    (documented: a full disk can then still kill the process); never emulated by writing zeros."""
    monkeypatch.setattr(storage, "_fallocate", _failing_fallocate(errno.EOPNOTSUPP))
    table = cembed.open_table(tmp_path / "z.npy", 1 << 18, 64)        # 64 MiB
    assert os.stat(tmp_path / "z.npy").st_blocks * 512 < 1 << 20
    assert not table[-1].any()


FULL_TMPFS = textwrap.dedent('''
    import os, sys, numpy as np, cembed
    d = sys.argv[1]
    emb = cembed.Embedding(200_000, 16, sparse=True, seed=0)          # 12.8 MB table in memory
    opt = cembed.optim.SparseAdam([emb], lr=0.01, state_dir=os.path.join(d, "state"))
    idx = np.arange(0, 200_000, 64)                                 # one row per page of the state
    try:
        emb.backward(np.ones((idx.size, 16), np.float32), idx, optimizer=opt)
    except OSError as exc:
        print("step OSError", exc.errno)
    src = cembed.optim.SparseAdam([emb], lr=0.01)
    emb.backward(np.ones((idx.size, 16), np.float32), idx, optimizer=src)
    try:
        opt.load_state_dict(src.state_dict())
    except OSError as exc:
        print("load OSError", exc.errno)
    try:
        cembed.open_table(os.path.join(d, "t.npy"), 100_000, 64)     # 25.6 MB of zeros
    except OSError as exc:
        print("table OSError", exc.errno)
    print("alive", sorted(os.listdir(os.path.join(d, "state"))), sorted(os.listdir(d)))
''')


def test_full_tmpfs_is_an_oserror_not_sigbus(tmp_path):
    """The real thing: a 4 MiB tmpfs (a private mount namespace: needs unshare and root)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare / mount not available")
    probe = subprocess.run(["unshare", "--mount", "--", "mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                            str(tmp_path)], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}")
    script = tmp_path / "full.py"
    script.write_text(FULL_TMPFS)
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["unshare", "--mount", "--", "sh", "-c",
                           f'mount -t tmpfs -o size=4m tmpfs "{mount}" && exec "{sys.executable}" "{script}" "{mount}"'],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])   # -7 / 135: SIGBUS
    assert done.stdout.splitlines() == [f"step OSError {errno.ENOSPC}", f"load OSError {errno.ENOSPC}",
                                        f"table OSError {errno.ENOSPC}", "alive ['.lock'] ['state']"], done.stdout


# ------------------------------------------------------------------------------------ hard links

def test_a_frozen_table_whose_file_name_was_given_to_another_file_is_copied(tmp_path):
    """A frozen module mapping ck/module.w.npy; ck is saved again with another table; saving the
    frozen module to ck2 must store the module's values (on main: a hard link to the new file)."""
    ck, ck2 = tmp_path / "ck", tmp_path / "ck2"
    cembed.save_checkpoint(ck, {"w": cembed.Embedding(10, 4, seed=0)})
    frozen = cembed.Embedding(10, 4, seed=123, _freeze=True)
    cembed.load_checkpoint(ck, {"w": frozen})
    assert not frozen.weight.flags.writeable
    values = np.array(frozen.weight)
    cembed.save_checkpoint(ck, {"w": cembed.Embedding(10, 4, seed=1)})
    cembed.save_checkpoint(ck2, {"w": frozen})
    back = cembed.Embedding(10, 4)
    cembed.load_checkpoint(ck2, {"w": back}, mmap=False)
    assert_bitwise_equal(back.weight, values)
    # still linked while the name names the mapped file
    again = cembed.Embedding(10, 4, _freeze=True)
    cembed.load_checkpoint(ck2, {"w": again})
    cembed.save_checkpoint(tmp_path / "ck3", {"w": again})
    assert os.stat(tmp_path / "ck3" / "module.w.npy").st_ino == os.stat(ck2 / "module.w.npy").st_ino


def test_a_read_only_table_file_is_copied_into_a_checkpoint_not_linked(tmp_path):
    """open_table(p, mode="r") saved, then p reopened read-write and trained: the checkpoint keeps
    the values it saved (on main it was a hard link of p: training wrote into it)."""
    p = tmp_path / "pretrained.npy"
    cembed.open_table(p, 100, 4, init="normal", seed=0)
    frozen = cembed.Embedding.from_pretrained(cembed.open_table(p, mode="r"), freeze=True)
    cembed.save_checkpoint(tmp_path / "ck", {"words": frozen})
    assert os.stat(p).st_ino != os.stat(tmp_path / "ck" / "module.words.npy").st_ino
    saved = np.array(frozen.weight)
    emb = cembed.Embedding.from_pretrained(cembed.open_table(p), freeze=False, sparse=True)
    emb.backward(np.ones((1, 4), np.float32), np.array([7]), optimizer=optim.SGD([emb], lr=1.0))
    emb.weight.flush()
    assert not np.array_equal(np.load(p)[7], saved[7])
    back = cembed.Embedding(100, 4)
    cembed.load_checkpoint(tmp_path / "ck", {"words": back}, mmap=False)    # checksum verified
    assert_bitwise_equal(back.weight, saved)


# ------------------------------------------------------------------------------------ loads and saves

def test_load_checkpoint_into_a_read_only_table_on_disk_changes_nothing(tmp_path):
    """A module whose table is an r+ map made read-only: refused while planning (on main the
    optimizer and the earlier modules were loaded, then copy_rows raised)."""
    a = cembed.Embedding(4, 2, sparse=True, seed=0)
    b = cembed.Embedding.from_pretrained(cembed.open_table(tmp_path / "b.npy", 4, 2, init="normal", seed=1),
                                         freeze=False, sparse=True)
    opt = optim.SparseAdam([a, b], lr=0.1)
    for rows in ([1], [2]):
        for m in (a, b):
            m.backward(np.ones((1, 2), np.float32), np.array(rows))
        opt.step()
        if rows == [1]:
            cembed.save_checkpoint(tmp_path / "ck", {"a": a, "b": b}, opt)
    wa, wb, step = a.weight.copy(), b.weight.copy(), opt.state[a]["step"]
    weight_a = a.weight
    b.weight.flags.writeable = False
    with pytest.raises(CheckpointError, match="module 'b'.*read-only"):
        cembed.load_checkpoint(tmp_path / "ck", {"a": a, "b": b}, opt)
    assert a.weight is weight_a and opt.state[a]["step"] == step == 2
    assert_bitwise_equal(a.weight, wa)
    assert_bitwise_equal(b.weight, wb)


def test_save_refuses_a_state_that_step_and_load_refuse(tmp_path):
    """save() and save_checkpoint() check the live state with step()'s rules, before replacing the
    previous file (on main both wrote a state that load() then refused)."""
    emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.1)
    emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    f, ck = tmp_path / "opt.npz", tmp_path / "ck"
    opt.save(f)
    cembed.save_checkpoint(ck, emb, opt)
    before = _tree(tmp_path)
    for name, bad in (("exp_avg", opt.state[emb]["exp_avg"][:, ::2]), ("step", -3)):
        good = opt.state[emb][name]
        opt.state[emb][name] = bad
        with pytest.raises(ValueError, match=f"param_groups\\[0\\]\\['params'\\]\\[0\\].*{name}"):
            opt.save(f)
        with pytest.raises(ValueError, match=name):
            cembed.save_checkpoint(ck, emb, opt)
        opt.state[emb][name] = good
        assert _tree(tmp_path) == before
    fresh = optim.SparseAdam([emb], lr=0.1)
    fresh.load(f)
    cembed.load_checkpoint(ck, emb, fresh)


def test_load_state_dict_into_state_dir_failing_part_way_changes_no_file(tmp_path, monkeypatch):
    """An I/O error while the loaded state is written: every state file (those the live optimizer
    maps) as it was, no *.loading left (on main the files written before the error were already
    renamed into place)."""
    emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.1, state_dir=tmp_path / "state")
    emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    sd = opt.state_dict()
    emb.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)
    for arr in opt.state[emb].values():
        if isinstance(arr, np.memmap):
            arr.flush()
    files = _tree(tmp_path / "state")
    real, calls = storage.copy_rows, [0]

    def failing(dst, src, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.EIO, "simulated I/O error")
        return real(dst, src, *args, **kwargs)

    monkeypatch.setattr(storage, "copy_rows", failing)
    with pytest.raises(OSError, match="simulated"):
        opt.load_state_dict(sd)
    assert calls[0] == 2
    assert _tree(tmp_path / "state") == files
    assert opt.state[emb]["step"] == 2
    assert_bitwise_equal(np.load(tmp_path / "state" / "p0.exp_avg.npy"), opt.state[emb]["exp_avg"])
    monkeypatch.undo()
    opt.load_state_dict(sd)
    assert_bitwise_equal(np.load(tmp_path / "state" / "p0.exp_avg.npy"), sd["state"][0]["exp_avg"])


def test_unclear_errors_are_clear(tmp_path):
    emb = cembed.Embedding(10, 4, sparse=True)
    ad = optim.Adagrad([emb], lr=0.1)
    # (a) a step counter too large for float32, through load_checkpoint: a CheckpointError
    cembed.save_checkpoint(tmp_path / "ck", emb, ad)
    manifest = tmp_path / "ck" / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    doc["meta"]["optimizer"]["state"]["state"]["0"]["step"] = {"value": 10 ** 400}
    manifest.write_text(json.dumps(cembed.checkpoint._sealed(doc)))
    with pytest.raises(CheckpointError, match="ck: optimizer state: "):
        cembed.load_checkpoint(tmp_path / "ck", emb, ad)
    # (b) Optimizer.load: an option of the wrong type is a ValueError naming the file
    f = tmp_path / "o.npz"
    ad.save(f)
    with np.load(f) as z:
        arrays = dict(z)
    meta = json.loads(bytes(arrays["__meta__"]).decode())
    meta["param_groups"][0]["lr"] = "0.1"
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(f, **arrays)
    with pytest.raises(ValueError, match="o.npz.*learning rate"):
        ad.load(f)
    # (c) a header whose size overflows int64: the truncated-file check sees the true size
    p = tmp_path / "t.npy"
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (2 ** 62, 3)}).encode()
    header += b" " * (-(12 + len(header) + 1) % 64) + b"\n"
    p.write_bytes(b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header + b"\0" * 64)
    with pytest.raises(ValueError, match=f"t.npy: truncated file: .* \\(128 header \\+ {2 ** 62 * 12} data\\)"):
        storage.read_header(p)
    with pytest.raises(ValueError, match="t.npy: truncated"):
        cembed.open_table(p)


# ------------------------------------------------------------------------------------ the trainer

ARGS = ["--vocab-size", "2000", "--tokens", "20000", "--dim", "8", "--batch-size", "1024", "--quiet", "--no-save",
        "--no-plot", "--threads", "1"]


def _train(cwd, *args):
    return subprocess.run([sys.executable, "-m", "cembed", "train", *ARGS, "--out", str(cwd / "out"), *args],
                          cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A --table-dir run with checkpoints, its live tables moved on after the last one."""
    base = tmp_path_factory.mktemp("trainer")
    done = _train(base, "--table-dir", "td", "--checkpoint-every", "5")
    assert done.returncode == 0, done.stderr
    table = np.load(base / "td" / "tables" / "in.npy", mmap_mode="r+")
    table[:] += 1.0
    table.flush()
    del table
    return base


def _copy(trained, tmp_path):
    shutil.copytree(trained / "td", tmp_path / "td")
    return tmp_path / "td"


def test_refused_resume_changes_nothing(trained, tmp_path):
    """Other settings, or steps / words that are not ints in range: refused (exit 1, 'error:
    --resume') before the checkpoint is loaded (on main the tables and state were already replaced,
    and a bad 'steps' was a traceback after the load)."""
    td = _copy(trained, tmp_path)
    files = _tree(td)
    other = _train(tmp_path, "--table-dir", "td", "--resume", "--lr", "0.5")
    assert other.returncode == 1 and "error: --resume: the checkpoint was written with other settings" in other.stderr
    assert _tree(td) == files
    manifest = td / "checkpoint" / "MANIFEST.json"
    good = manifest.read_text()
    for key, value in (("steps", "x"), ("steps", -7), ("words", 10 ** 30), ("steps", True), ("steps", 10 ** 9)):
        doc = json.loads(good)
        doc["meta"]["extra"][key] = value
        manifest.write_text(json.dumps(cembed.checkpoint._sealed(doc)))
        files = _tree(td)
        done = _train(tmp_path, "--table-dir", "td", "--resume")
        assert done.returncode == 1, (key, value, done.stderr)
        assert f"error: --resume: {td / 'checkpoint'}: the checkpoint records {key} {value!r}" in done.stderr
        assert _tree(td) == files
    manifest.write_text(good)
    resumed = _train(tmp_path, "--table-dir", "td", "--resume")
    assert resumed.returncode == 0, resumed.stderr


def test_no_optimizer_can_take_a_table_dirs_state_between_the_check_and_the_runs_optimizer(tmp_path, monkeypatch):
    """The trainer checked that no optimizer held DIR/state, then opened (or created) the tables and
    only then made its own optimizer: one started meanwhile took the state and the run failed with its
    tables already made. The trainer now holds DIR/state's lock from the check until its optimizer
    takes it."""
    from cembed.apps import corpus as corpus_mod
    from cembed.apps import train as train_mod

    corpus = corpus_mod.synthetic_corpus(300, 5, 4000, seed=0)
    real_open, intruders = train_mod.TableDir.open_tables, []

    def open_tables(table_dir, *args, **kwargs):   # another optimizer arrives while the tables are made
        with pytest.raises(ValueError, match="in use by another optimizer"):
            intruders.append(optim.SparseAdam([cembed.Embedding(3, 2, sparse=True)], state_dir=table_dir.state))
        return real_open(table_dir, *args, **kwargs)

    monkeypatch.setattr(train_mod.TableDir, "open_tables", open_tables)
    config = train_mod.TrainConfig(dim=8, batch_size=256, table_dir=str(tmp_path / "td"), threads=1)
    result = train_mod.train(corpus, config, progress=False)
    assert result is not None and not intruders
    gc.collect()   # the run's optimizer is gone: the state is free again
    optim.SparseAdam([cembed.Embedding(3, 2, sparse=True)], state_dir=tmp_path / "td" / "state")


def test_a_table_dir_in_use_is_refused_before_its_tables_change(trained, tmp_path):
    """A fresh run on a --table-dir whose state an optimizer holds, or that another trainer holds:
    refused (exit 1, 'error:') with the tables untouched (on main they were recreated first)."""
    td = _copy(trained, tmp_path)
    files = _tree(td)
    tables = [cembed.open_table(td / "tables" / f"{name}.npy") for name in ("in", "out")]
    running = optim.SparseAdam([cembed.Embedding.from_pretrained(t, freeze=False, sparse=True) for t in tables],
                               state_dir=td / "state")
    done = _train(tmp_path, "--table-dir", "td")
    assert done.returncode == 1 and "is in use by another optimizer" in done.stderr and "error:" in done.stderr
    assert _tree(td) == files
    del running, tables
    gc.collect()
    fd = os.open(td / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        files = _tree(td)
        done = _train(tmp_path, "--table-dir", "td")
        assert done.returncode == 1 and "is in use by another trainer" in done.stderr
        assert _tree(td) == files
    finally:
        os.close(fd)
    again = _train(tmp_path, "--table-dir", "td")
    assert again.returncode == 0, again.stderr


@pytest.mark.parametrize("error", [OSError(5, "simulated EIO"), KeyboardInterrupt()])
def test_a_failed_rename_while_loading_into_a_state_dir_changes_nothing(tmp_path, monkeypatch, error):
    """load_state_dict into a state_dir renames every loaded file into place: a rename failing at the
    second file left the first replaced on disk while the optimizer kept (and trained) the old,
    unlinked file. Now the renamed files are put back and nothing is left behind."""
    a, b = cembed.Embedding(20, 4, sparse=True, seed=0), cembed.Embedding(20, 4, sparse=True, seed=1)
    state_dir = tmp_path / "state"
    opt = optim.SparseAdam([a, b], lr=0.1, state_dir=state_dir)
    for module in (a, b):
        module.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        entry["exp_avg"] = entry["exp_avg"] + 5
    before = {f: (state_dir / f).read_bytes() for f in sorted(os.listdir(state_dir))}
    live = np.array(opt.state[a]["exp_avg"])
    real, renames = os.replace, []

    def failing(src, dst, *args, **kwargs):
        if str(src).endswith((".loading", ".cembed.tmp")):   # (a load's temporaries: .loading before 2026-11-28)
            renames.append(src)
            if len(renames) == 2:
                raise error
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(type(error)):
        opt.load_state_dict(saved)
    monkeypatch.setattr(os, "replace", real)
    assert {f: (state_dir / f).read_bytes() for f in sorted(os.listdir(state_dir))} == before
    assert_bitwise_equal(opt.state[a]["exp_avg"], live)
    a.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)   # the live state is the file's
    assert_bitwise_equal(np.load(state_dir / "p0.exp_avg.npy"), opt.state[a]["exp_avg"])
    opt.load_state_dict(saved)                                                # and a later load works
    assert_bitwise_equal(np.load(state_dir / "p0.exp_avg.npy"), saved["state"][0]["exp_avg"])
    assert not [f for f in os.listdir(state_dir) if f.endswith((".loading", ".replaced", ".tmp", ".linking"))]


@pytest.mark.parametrize("name", ["adagrad", "rowwise_adagrad"])
def test_a_refused_constructor_changes_no_state_file(tmp_path, name):
    """Adagrad's state is made as a parameter joins: a constructor refused at its second group (a bad
    option) had already re-created the first group's state file in the state_dir."""
    make = {"adagrad": optim.Adagrad, "rowwise_adagrad": optim.RowWiseAdagrad}[name]
    a, b = cembed.Embedding(10, 4, sparse=True, seed=0), cembed.Embedding(10, 4, sparse=True, seed=1)
    opt = make([a], lr=0.1, state_dir=tmp_path)
    a.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=opt)
    del opt
    gc.collect()
    before = {f: (tmp_path / f).read_bytes() for f in sorted(os.listdir(tmp_path))}
    with pytest.raises(ValueError, match="param_groups\\[1\\]"):
        make([{"params": [a]}, {"params": [b], "lr": -1.0}], lr=0.1, state_dir=tmp_path)
    with pytest.raises(ValueError, match="same module"):
        make([{"params": [a]}, {"params": [a]}], lr=0.1, state_dir=tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in sorted(os.listdir(tmp_path))} == before


SAVED_VALUE_EDITS = {   # optimizer: (constructor, edit of the live state that load() would refuse, message)
    "sparse_adam": (lambda m: optim.SparseAdam([m], lr=0.1), lambda st: st["exp_avg_sq"].__setitem__((0, 0), -1.0),
                    "exp_avg_sq'\\] must hold values >= 0"),
    "sparse_adam_row": (lambda m: optim.SparseAdam([m], lr=0.1, bias_correction="row"),
                        lambda st: st["row_step"].__setitem__(0, 99), "row_step'\\] must hold counts in"),
    "sparse_adamw": (lambda m: optim.SparseAdamW([m], lr=0.1),
                     lambda st: st["row_decay_log"].__setitem__(0, 1.0), "row_decay_log'\\] must be finite"),
    "adagrad": (lambda m: optim.Adagrad([m], lr=0.1), lambda st: st["sum"].__setitem__((0, 0), -1.0),
                "sum'\\] must hold values >= 0"),
    "rowwise_adagrad": (lambda m: optim.RowWiseAdagrad([m], lr=0.1), lambda st: st["sum"].__setitem__(0, -1.0),
                        "sum'\\] must hold values >= 0"),
}


@pytest.mark.parametrize("name", sorted(SAVED_VALUE_EDITS))
def test_a_state_load_would_refuse_is_never_saved(tmp_path, name):
    """save() and save_checkpoint() checked the state with step()'s rules, which do not read the values:
    a negative accumulator (or a row count or decay clock out of range) was written, replacing a good
    file with one load() refuses. They now make load()'s value checks first, and write nothing."""
    make, edit, message = SAVED_VALUE_EDITS[name]
    emb = cembed.Embedding(5, 2, sparse=True, seed=0)
    opt = make(emb)
    emb.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
    opt.save(tmp_path / "opt.npz")
    cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, opt)
    files = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}
    edit(opt.state[emb])
    with pytest.raises(ValueError, match=message):
        opt.save(tmp_path / "opt.npz")
    with pytest.raises(ValueError, match=message):
        cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, opt)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == files
    opt.load(tmp_path / "opt.npz")   # the good file loads back


def test_replace_files_never_deletes_a_file_it_could_not_keep(tmp_path, monkeypatch):
    """Without a hard link (a file system without them) an existing file cannot be put back: a failed
    later rename left it deleted. It is now left replaced (new content), never removed."""
    for name in ("a", "b"):
        (tmp_path / name).write_text("old " + name)
        (tmp_path / (name + ".new")).write_text("new " + name)
    (tmp_path / "c.new").write_text("new c")
    real_replace, calls = os.replace, []

    def no_links(src, dst):
        raise PermissionError(errno.EPERM, "no hard links here")

    def failing(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 3:
            raise OSError(errno.EIO, "simulated EIO")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(os, "replace", failing)
    pairs = [(str(tmp_path / (n + ".new")), str(tmp_path / n)) for n in ("a", "b", "c")]
    with pytest.raises(OSError, match="simulated EIO"):
        storage.replace_files(pairs)
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"
    assert not (tmp_path / "c").exists() and (tmp_path / "c.new").exists()


def test_replace_files_keeps_a_users_file_named_like_its_backup(tmp_path, monkeypatch):
    """replace_files kept each replaced file as the hard link ``<name>.replaced``, removing any file of
    that name first: a user's ``embeddings.npy.replaced`` beside the trainer's output was deleted. The
    backup is now a fresh hidden name (a taken one is tried again), and a failed rename still puts the
    old file back through it."""
    for name in ("a", "b"):
        (tmp_path / name).write_text("old " + name)
        (tmp_path / (name + ".new")).write_text("new " + name)
        (tmp_path / (name + ".replaced")).write_text("the user's " + name)
    real_urandom, draws = os.urandom, []

    def repeating(n):   # the first two names drawn are the same: the second link finds it taken
        draws.append(n)
        return b"\0" * n if len(draws) <= 2 else real_urandom(n)

    monkeypatch.setattr(os, "urandom", repeating)
    taken = tmp_path / (".a." + "00" * 6 + ".cembed.replaced")   # the first name drawn: a live writer's backup
    taken.write_text("taken")
    import fcntl
    holder = open(taken)
    fcntl.flock(holder.fileno(), fcntl.LOCK_EX)   # (locked: not one a killed process left)
    real_replace, calls = os.replace, []

    def failing(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.EIO, "simulated EIO")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", failing)
    pairs = [(str(tmp_path / (n + ".new")), str(tmp_path / n)) for n in ("a", "b")]
    with pytest.raises(OSError, match="simulated EIO"):
        storage.replace_files(pairs)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (tmp_path / "a").read_text() == "old a" and (tmp_path / "b").read_text() == "old b"
    assert (tmp_path / ("." + "a." + "00" * 6 + ".cembed.replaced")).read_text() == "taken"
    (tmp_path / "a.new").write_text("new a")   # (renamed, then undone: the caller writes it again)
    holder.close()
    storage.replace_files(pairs)
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "b").read_text() == "new b"
    # (released, the next replace_files of "a" removes that file with cembed's backup mark: one a
    # killed replace_files left; the user's files are untouched)
    assert sorted(os.listdir(tmp_path)) == ["a", "a.replaced", "b", "b.replaced"]
    assert (tmp_path / "a.replaced").read_text() == "the user's a"


def test_replace_files_holds_back_a_ctrl_c_until_the_commit_is_made(tmp_path, ctrl_c_raises):
    import signal

    for name in ("a", "b"):
        (tmp_path / name).write_text("old")
        (tmp_path / (name + ".new")).write_text("new")
    committed = []

    def commit():
        os.kill(os.getpid(), signal.SIGINT)   # a Ctrl-C between the renames and the switch to them
        committed.append(True)

    with pytest.raises(KeyboardInterrupt):
        storage.replace_files([(str(tmp_path / (n + ".new")), str(tmp_path / n)) for n in ("a", "b")], commit)
    assert committed == [True]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "new"


def test_param_groups_given_as_generators(tmp_path):
    """The constructor's check of every group first must not use up a one-shot iterable of modules
    (``{"params": model.parameters()}`` is torch's idiom)."""
    a, b = cembed.Embedding(5, 2, sparse=True), cembed.Embedding(5, 2, sparse=True)
    opt = optim.Adagrad([{"params": (m for m in [a, b])}, {"params": iter([cembed.Embedding(3, 2)]), "lr": 0.5}],
                        lr=0.1, state_dir=tmp_path)
    assert [len(g["params"]) for g in opt.param_groups] == [2, 1]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".npy")) == ["p0.sum.npy", "p1.sum.npy",
                                                                              "p2.sum.npy"]


def test_write_atomically_replaces_whole_or_not_at_all(tmp_path):
    """storage.write_atomically (an optimizer's save, the trainer's plot): a write that fails part-way
    leaves the old file and no temporary; a complete one gets the mode an ordinary new file gets
    (mkstemp's 0600 made an optimizer's saves private)."""
    path = tmp_path / "out.bin"
    storage.write_atomically(path, b"old")

    def partial(fh):
        fh.write(b"half of the new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space left") as info:
        storage.write_atomically(path, partial)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)   # the file, not a temporary
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(FileNotFoundError) as info:   # no such directory: named by the file asked for
        storage.write_atomically(tmp_path / "nodir" / "x.bin", b"x")
    assert info.value.filename == str(tmp_path / "nodir" / "x.bin")
    storage.write_atomically(path, lambda fh: fh.write(b"new"))
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o666 & ~umask
    tmp = storage.write_aside(path, lambda fh: fh.write(b"aside"))
    assert path.read_bytes() == b"new" and pathlib.Path(tmp).read_bytes() == b"aside"
    assert os.path.dirname(tmp) == str(tmp_path)


@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_every_file_written_in_place_of_another_keeps_its_mode(tmp_path, init):
    """A private (0600) table recreated with open_table(mode='w+', init='zeros') became 0644 (with
    init='normal' it stayed 0600), and so did the state files a load_state_dict into a state_dir
    replaced: one rule now, in write_aside and replace_files."""
    table = tmp_path / "t.npy"
    np.save(table, np.zeros((3, 2), np.float32))
    os.chmod(table, 0o600)
    cembed.open_table(table, 5, 2, mode="w+", init=init)
    assert os.stat(table).st_mode & 0o777 == 0o600
    emb = cembed.Embedding(4, 2, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.1, state_dir=tmp_path / "s")
    emb.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
    for name in ("p0.exp_avg.npy", "p0.exp_avg_sq.npy"):
        os.chmod(tmp_path / "s" / name, 0o600)
    opt.load_state_dict(opt.state_dict())
    for name in ("p0.exp_avg.npy", "p0.exp_avg_sq.npy"):
        assert os.stat(tmp_path / "s" / name).st_mode & 0o777 == 0o600
    for name in ("a", "b"):   # replace_files
        (tmp_path / name).write_text("old")
        os.chmod(tmp_path / name, 0o640)
        (tmp_path / (name + ".new")).write_text("new")
    storage.replace_files([(str(tmp_path / (n + ".new")), str(tmp_path / n)) for n in ("a", "b")])
    assert all(os.stat(tmp_path / n).st_mode & 0o777 == 0o640 for n in ("a", "b"))


def test_recreating_a_read_only_table_is_refused_before_it_is_replaced(tmp_path, monkeypatch):
    """open_table(mode='w+') over a table its user may not write replaced it with a zero table keeping
    the read-only mode, then failed to open that for writing: the data gone, and an error. It is
    refused first now. (Tests run as root, who may write anything: os.access is made to say no.)"""
    path = tmp_path / "t.npy"
    np.save(path, np.full((4, 3), 7, np.float32))
    os.chmod(path, 0o444)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.fspath(p) == str(path) else real(p, mode, **kw))
    with pytest.raises(PermissionError, match="read-only: mode='w\\+' cannot recreate it"):
        cembed.open_table(path, 4, 3, mode="w+", init="zeros")
    assert np.all(np.load(path) == 7) and sorted(os.listdir(tmp_path)) == ["t.npy"]


def test_write_atomically_keeps_the_mode_and_works_where_modes_cannot_be_set(tmp_path, monkeypatch):
    """A file replaced keeps its permission bits (a private 0600 save stayed private with the old code's
    mkstemp; a chmod by the user is kept); a file system that refuses fchmod (vfat, exfat) still gets
    the file, and a failure anywhere leaves no temporary."""
    path = tmp_path / "opt.npz"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    storage.write_atomically(path, b"new")
    assert path.read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o600

    def refused(fd, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refused)
    storage.write_atomically(tmp_path / "other.bin", b"x")
    assert (tmp_path / "other.bin").read_bytes() == b"x"

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "_umask", interrupted)   # Ctrl-C right after the temporary was made
    with pytest.raises(KeyboardInterrupt):
        storage.write_atomically(tmp_path / "third.bin", b"y")
    assert sorted(os.listdir(tmp_path)) == ["opt.npz", "other.bin"]


def test_a_fifo_where_a_file_is_expected_is_refused_not_waited_on(tmp_path):
    """A FIFO (named pipe) put where a table, a manifest, a checkpoint member or an optimizer file is
    expected blocked ``open`` forever; it is refused naming it (tables, optimizer files: ValueError;
    checkpoints: their usual errors). An alarm fails the test instead of hanging it."""
    import signal

    def hung(signum, frame):
        raise AssertionError("blocked opening a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        os.mkfifo(tmp_path / "t.npy")
        for call in (lambda: cembed.open_table(tmp_path / "t.npy", 10, 4),
                     lambda: storage.read_header(tmp_path / "t.npy")):
            with pytest.raises(ValueError, match="t.npy: a FIFO, not a regular file"):
                call()
        emb = cembed.Embedding(4, 2, seed=0)
        before = emb.weight.copy()
        (tmp_path / "ck").mkdir()
        os.mkfifo(tmp_path / "ck" / "MANIFEST.json")
        with pytest.raises(ValueError, match=r"MANIFEST.json that is not a cembed checkpoint's \(unreadable: .*a FIFO"):
            cembed.save_checkpoint(tmp_path / "ck", {"a": emb})
        with pytest.raises(CheckpointError, match="MANIFEST.json: unreadable manifest .*a FIFO, not a regular file"):
            cembed.load_checkpoint(tmp_path / "ck", {"a": emb})   # (not "no checkpoint there")
        cembed.save_checkpoint(tmp_path / "ck2", {"a": emb})
        os.unlink(tmp_path / "ck2" / "module.a.npy")
        os.mkfifo(tmp_path / "ck2" / "module.a.npy")
        with pytest.raises(CheckpointError, match="module.a.npy"):
            cembed.load_checkpoint(tmp_path / "ck2", {"a": emb})
        assert_bitwise_equal(emb.weight, before)
        os.mkfifo(tmp_path / "pipe")                   # a table file linked to a FIFO: w+ renamed a new table
        os.symlink(tmp_path / "pipe", tmp_path / "linked.npy")   # over it (over /dev/null, linked so)
        for mode in ("w+", "r+"):
            with pytest.raises(ValueError, match=r"linked.npy: a FIFO, not a regular file \(the symbolic link points "
                                                 r"to .*pipe\): a table is never written there"):
                cembed.open_table(tmp_path / "linked.npy", 10, 4, mode=mode)
        assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
        with pytest.raises(ValueError, match="t.npy: a FIFO, not a regular file: a table is never written there"):
            cembed.open_table(tmp_path / "t.npy", 10, 4, mode="w+")
        assert stat.S_ISFIFO(os.stat(tmp_path / "t.npy").st_mode)
        opt = cembed.optim.SGD([emb], lr=0.1)            # Optimizer.load (np.load blocked on it)
        os.mkfifo(tmp_path / "opt.npz")
        with pytest.raises(ValueError, match="opt.npz: not a readable cembed optimizer file .*a FIFO, not a regular file"):
            opt.load(tmp_path / "opt.npz")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_files_cembed_writes_are_never_renamed_over_a_special_file(tmp_path):
    """write_atomically (Optimizer.save, the trainer's plot), write_aside + rename_into_place and
    replace_files (the trainer's embeddings + vocabulary) renamed their file over whatever was at the
    path: a FIFO, a directory — or, as root, a device such as /dev/null. Refused before anything is
    written (storage.written_path, open_table's rule); through a symbolic link the target is written
    and the link kept."""
    emb = cembed.Embedding(4, 2, seed=0)
    opt = cembed.optim.Adagrad([emb], lr=0.1)
    os.mkfifo(tmp_path / "opt.npz")
    (tmp_path / "dir.npz").mkdir()
    (tmp_path / "dir.npz" / "keep.txt").write_text("x")
    os.mkfifo(tmp_path / "pipe")
    os.symlink(tmp_path / "pipe", tmp_path / "to-pipe.npz")
    for name, kind in (("opt.npz", "a FIFO"), ("dir.npz", "a directory"), ("to-pipe.npz", "a FIFO")):
        with pytest.raises(ValueError, match=f"{name}: {kind}, not a regular file.*: cembed never writes a file there"):
            opt.save(tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: {kind}, not a regular file"):
            storage.write_atomically(tmp_path / name, b"data")
        with pytest.raises(ValueError, match=f"{name}: {kind}, not a regular file"):
            storage.write_aside(tmp_path / name, lambda fh: fh.write(b"data"))
    assert stat.S_ISFIFO(os.stat(tmp_path / "opt.npz").st_mode) and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    assert os.path.islink(tmp_path / "to-pipe.npz") and (tmp_path / "dir.npz" / "keep.txt").read_text() == "x"
    # replace_files checks every destination before it renames any
    (tmp_path / "a.txt").write_text("old a")
    tmp = storage.write_aside(tmp_path / "a.txt", lambda fh: fh.write(b"new a"))
    other = storage.write_aside(tmp_path / "b.txt", lambda fh: fh.write(b"new b"))
    with pytest.raises(ValueError, match="opt.npz: a FIFO"):
        storage.replace_files([(tmp, str(tmp_path / "a.txt")), (other, str(tmp_path / "opt.npz"))])
    assert (tmp_path / "a.txt").read_text() == "old a" and stat.S_ISFIFO(os.stat(tmp_path / "opt.npz").st_mode)
    storage.discard_reserved(tmp)
    storage.discard_reserved(other)
    # through a link to a regular file: the target gets the new contents, the link stays a link
    (tmp_path / "real.npz").write_bytes(b"old")
    os.symlink("real.npz", tmp_path / "link.npz")
    opt.save(tmp_path / "link.npz")
    assert os.path.islink(tmp_path / "link.npz")
    loaded = cembed.optim.Adagrad([cembed.Embedding(4, 2, seed=0)], lr=0.1)
    loaded.load(tmp_path / "real.npz")
    assert_bitwise_equal(loaded.state_dict()["state"][0]["sum"], opt.state_dict()["state"][0]["sum"])
    assert not [n for n in os.listdir(tmp_path) if n.endswith((".tmp", ".new", ".replaced"))]


def test_a_state_file_linked_to_another_directory_is_loaded_there(tmp_path, monkeypatch):
    """With files written through their links, load_state_dict's '<file>.loading' (made in state_dir) was
    renamed onto the link's target in another directory — across file systems an EXDEV. It is made beside
    the target, and every rename of replace_files stays in one directory (checked)."""
    state_dir, other = tmp_path / "state", tmp_path / "otherdisk"
    other.mkdir()
    emb = cembed.Embedding(50, 4, sparse=True, seed=0)
    opt = cembed.optim.Adagrad([emb], lr=0.1, state_dir=str(state_dir))
    emb.grad = cembed.SparseGrad([1], np.ones((1, 4), np.float32), 50)
    opt.step()
    saved = opt.state_dict()
    name = next(n for n in os.listdir(state_dir) if n.endswith(".npy"))
    os.replace(state_dir / name, other / name)
    os.symlink(other / name, state_dir / name)
    renames, real = [], os.replace

    def spy(src, dst, *args, **kwargs):
        renames.append((os.path.dirname(os.fspath(src)), os.path.dirname(os.fspath(dst))))
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", spy)
    emb.grad = cembed.SparseGrad([2], np.ones((1, 4), np.float32), 50)
    opt.step()
    opt.load_state_dict(saved)
    monkeypatch.setattr(os, "replace", real)
    assert renames and all(a == b for a, b in renames), renames
    assert os.path.islink(state_dir / name)
    assert_bitwise_equal(np.load(other / name), saved["state"][0]["sum"])
    with pytest.raises(ValueError, match="not in the directory of"):
        storage.replace_files([(str(tmp_path / "x.tmp"), str(state_dir / name))])


def test_a_killed_load_leaves_no_temporary_beside_a_linked_state_file_for_good(tmp_path):
    """A load killed before its renames left '<target>.loading' (a table's reserved space) beside a state
    file's link target in another directory, where the state_dir clean-up never looks. The load's
    temporaries are storage's marked, locked ones: the next write of that file removes it."""
    state_dir, other = tmp_path / "state", tmp_path / "otherdisk"
    other.mkdir()
    code = textwrap.dedent(f"""
        import os, numpy as np, cembed
        from cembed import storage
        emb = cembed.Embedding(5000, 8, sparse=True, seed=0)
        opt = cembed.optim.Adagrad([emb], lr=0.1, state_dir={str(state_dir)!r})
        emb.grad = cembed.SparseGrad([1], np.ones((1, 8), np.float32), 5000)
        opt.step()
        name = [n for n in os.listdir({str(state_dir)!r}) if n.endswith(".npy")][0]
        os.replace(os.path.join({str(state_dir)!r}, name), os.path.join({str(other)!r}, name))
        os.symlink(os.path.join({str(other)!r}, name), os.path.join({str(state_dir)!r}, name))
        saved = opt.state_dict()
        storage.replace_files = lambda *args, **kwargs: os._exit(0)   # killed before the renames
        opt.load_state_dict(saved)
    """)
    done = subprocess.run([sys.executable, "-c", code], env=env_importing_this_cembed(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    left = [n for n in os.listdir(other) if not n.endswith(".npy")]
    assert left and all(n.endswith(".cembed.tmp") for n in left), left
    emb = cembed.Embedding(5000, 8, sparse=True, seed=0)
    opt = optim.Adagrad([emb], lr=0.1, state_dir=state_dir)
    opt.load_state_dict(opt.state_dict())   # the next write of the linked file
    assert [n for n in os.listdir(other)] == [n for n in os.listdir(other) if n.endswith(".npy")]


def test_backup_links_are_locked_before_they_get_their_name(tmp_path, monkeypatch):
    """replace_files made its backup link under its final name and locked it after: another writer's
    clean-up could remove it in between (and a failed rename then could not put the old file back). It
    is made as '….cembed.linking', locked, then named; a '.linking' a killed process left is removed once
    it is ABANDONED_NEW_SECONDS old (by its ctime, which the link set), not before."""
    (tmp_path / "a").write_text("old")
    fresh = tmp_path / ".a.0123456789ab.cembed.linking"
    os.link(tmp_path / "a", fresh)
    new = storage.write_aside(tmp_path / "a", lambda fh: fh.write(b"new"))
    storage.replace_files([(new, str(tmp_path / "a"))])
    assert fresh.exists() and (tmp_path / "a").read_text() == "new"
    monkeypatch.setattr(storage, "ABANDONED_NEW_SECONDS", -1.0)
    new = storage.write_aside(tmp_path / "a", lambda fh: fh.write(b"newer"))
    storage.replace_files([(new, str(tmp_path / "a"))])
    assert sorted(os.listdir(tmp_path)) == ["a"] and (tmp_path / "a").read_text() == "newer"


def test_replace_files_compares_directories_not_their_names(tmp_path):
    """'link/..' is where the link points, not where the link is: a temporary made beside the name and a
    destination written through it were 'one directory' to a comparison of text, and the rename crossed
    directories (across file systems an EXDEV). Refused before anything is renamed."""
    (tmp_path / "x" / "y").mkdir(parents=True)
    os.symlink(tmp_path / "x" / "y", tmp_path / "dl")
    (tmp_path / "t.tmp").write_text("new")
    with pytest.raises(ValueError, match="is not in the directory of"):
        storage.replace_files([(str(tmp_path / "t.tmp"), str(tmp_path / "dl" / ".." / "t.bin"))])
    assert sorted(os.listdir(tmp_path / "x")) == ["y"] and (tmp_path / "t.tmp").read_text() == "new"


def test_a_loop_of_links_is_refused_not_replaced(tmp_path):
    os.symlink("loop-b", tmp_path / "loop-a")
    os.symlink("loop-a", tmp_path / "loop-b")
    with pytest.raises(ValueError, match="loop-a: a loop of symbolic links"):
        storage.write_atomically(tmp_path / "loop-a", b"data")
    assert os.path.islink(tmp_path / "loop-a") and os.path.islink(tmp_path / "loop-b")


def test_storage_flags_must_be_bools(tmp_path):
    """sync / durable / sync_directory given as anything but a bool (a string "False" was read as
    true) are a TypeError, before any file is made."""
    path = str(tmp_path / "t.npy")
    with pytest.raises(TypeError, match="sync must be a bool, got str"):
        storage.write_aside(path, lambda fh: fh.write(b"x"), sync="False")
    with pytest.raises(TypeError, match="durable must be a bool, got str"):
        storage.create_zeros(path, (2, 2), np.float32, durable="False")
    with pytest.raises(TypeError, match="durable must be a bool, got str"):
        storage.reserve_zeros(path, (2, 2), np.float32, durable="False")
    assert os.listdir(tmp_path) == []
