"""Crash-safe checkpoint directories (issue 13): round trips with bitwise resume, crash safety under
SIGKILL, corrupted / truncated / tampered checkpoints refused with nothing changed, the recovery
rule, hard links for read-only tables, and the trainer's --table-dir --resume."""
import errno
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import cembed
from cembed import optim
from cembed.checkpoint import CheckpointError

from util import assert_bitwise_equal, env_importing_this_cembed, fingerprint, zipf_indices

ROOT = pathlib.Path(cembed.__file__).resolve().parent.parent

OPTIMIZERS = {
    "sgd_momentum": lambda p, **kw: optim.SGD(p, lr=0.1, momentum=0.9, **kw),
    "sparse_adam": lambda p, **kw: optim.SparseAdam(p, lr=0.01, **kw),
    "sparse_adam_row": lambda p, **kw: optim.SparseAdam(p, lr=0.01, bias_correction="row", **kw),
    "sparse_adamw": lambda p, **kw: optim.SparseAdamW(p, lr=0.01, weight_decay=0.1, **kw),
    "adagrad": lambda p, **kw: optim.Adagrad(p, lr=0.1, **kw),
    "rowwise": lambda p, **kw: optim.RowWiseAdagrad(p, lr=0.1, **kw),
}


def _modules(seed=0, n_rows=300, dim=8):
    rng = np.random.default_rng(seed)
    return {"words": cembed.Embedding.from_pretrained(rng.standard_normal((n_rows, dim)).astype(np.float32),
                                                      freeze=False, sparse=True),
            "bags": cembed.EmbeddingBag.from_pretrained(rng.standard_normal((n_rows // 2, dim)).astype(np.float32),
                                                        freeze=False, sparse=True, mode="sum")}


def _steps(modules, opt, rng, n):
    for _ in range(n):
        for module in modules.values():
            idx = zipf_indices(rng, 40, module.weight.shape[0]).reshape(10, 4)
            out = module(idx)
            module.backward(rng.standard_normal(out.shape).astype(np.float32), optimizer=opt)


def _snapshot(modules, opt=None):
    return fingerprint({k: np.array(m.weight) for k, m in modules.items()},
                       opt.state_dict() if opt is not None else None)


# ------------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_round_trip_resumes_bitwise(tmp_path, opt_name, mmap):
    modules = _modules()
    opt = OPTIMIZERS[opt_name](list(modules.values()))
    rng = np.random.default_rng(5)
    _steps(modules, opt, rng, 3)
    cembed.save_checkpoint(tmp_path / "ck", modules, opt, extra={"epoch": 2, "note": "x"})
    rng_state = rng.bit_generator.state
    _steps(modules, opt, rng, 3)
    expected = _snapshot(modules, opt)

    fresh = _modules(seed=1)
    fresh_opt = OPTIMIZERS[opt_name](list(fresh.values()))
    assert cembed.load_checkpoint(tmp_path / "ck", fresh, fresh_opt, mmap=mmap) == {"epoch": 2, "note": "x"}
    for module in fresh.values():
        assert isinstance(module.weight, np.memmap) == mmap
        assert module.weight.flags.writeable
    rng.bit_generator.state = rng_state
    _steps(fresh, fresh_opt, rng, 3)
    assert _snapshot(fresh, fresh_opt) == expected
    # copy-on-write: training after the load never wrote into the checkpoint
    cembed.checkpoint.read_directory(tmp_path / "ck")


@pytest.mark.parametrize("opt_name", ["sparse_adam", "rowwise", "sgd_momentum"])
def test_round_trip_with_tables_and_state_on_disk(tmp_path, opt_name):
    """Modules whose tables are on disk keep them (values copied in); state goes to state_dir."""
    modules = _modules()
    opt = OPTIMIZERS[opt_name](list(modules.values()))
    rng = np.random.default_rng(5)
    _steps(modules, opt, rng, 2)
    cembed.save_checkpoint(tmp_path / "ck", modules, opt)
    rng_state = rng.bit_generator.state
    _steps(modules, opt, rng, 2)
    expected = _snapshot(modules, opt)

    tables = {name: cembed.open_table(tmp_path / f"{name}.npy", m.weight.shape[0], m.weight.shape[1])
              for name, m in modules.items()}
    fresh = {"words": cembed.Embedding.from_pretrained(tables["words"], freeze=False, sparse=True),
             "bags": cembed.EmbeddingBag.from_pretrained(tables["bags"], freeze=False, sparse=True, mode="sum")}
    fresh_opt = OPTIMIZERS[opt_name](list(fresh.values()), state_dir=tmp_path / "state")
    cembed.load_checkpoint(tmp_path / "ck", fresh, fresh_opt)
    for name, module in fresh.items():
        assert module.weight is tables[name]                      # the same file, values copied in
    for entry in fresh_opt.state.values():
        for key, value in entry.items():
            if isinstance(value, np.ndarray) and key != "active_rows":
                assert isinstance(value, np.memmap)
    rng.bit_generator.state = rng_state
    _steps(fresh, fresh_opt, rng, 2)
    assert _snapshot(fresh, fresh_opt) == expected


def test_copy_on_write_tables_are_remapped_not_filled(tmp_path):
    """A table mapped copy-on-write by an earlier load is replaced by a fresh map (its changed pages
    are private memory), not overwritten row by row."""
    emb = cembed.Embedding(50, 4, sparse=True, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", {"e": emb})
    fresh = cembed.Embedding(50, 4, sparse=True)
    cembed.load_checkpoint(tmp_path / "ck", {"e": fresh})
    first = fresh.weight
    assert first.mode == "c"
    first[:] = 1
    cembed.load_checkpoint(tmp_path / "ck", {"e": fresh})
    assert fresh.weight is not first and fresh.weight.mode == "c"
    assert_bitwise_equal(fresh.weight, emb.weight)


def test_checkpoint_of_tables_on_disk_and_state_dir(tmp_path):
    """Saving reads tables and state that live in files (streamed) and writes full copies."""
    table = cembed.open_table(tmp_path / "t.npy", 1000, 16, init="normal", seed=0)
    emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.SparseAdam([emb], state_dir=tmp_path / "s")
    _steps({"e": emb}, opt, np.random.default_rng(0), 2)
    cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, opt)
    fresh = cembed.Embedding(1000, 16, sparse=True)
    fresh_opt = optim.SparseAdam([fresh])
    cembed.load_checkpoint(tmp_path / "ck", {"e": fresh}, fresh_opt, mmap=False)
    assert _snapshot({"e": fresh}, fresh_opt) == _snapshot({"e": emb}, opt)
    assert os.stat(tmp_path / "ck" / "module.e.npy").st_ino != os.stat(tmp_path / "t.npy").st_ino


def test_sequence_and_single_module(tmp_path):
    a, b = cembed.Embedding(5, 2, seed=0), cembed.Embedding(6, 2, seed=1)
    cembed.save_checkpoint(tmp_path / "seq", [a, b])
    c, d = cembed.Embedding(5, 2), cembed.Embedding(6, 2)
    cembed.load_checkpoint(tmp_path / "seq", [c, d], mmap=False)
    assert_bitwise_equal(c.weight, a.weight)
    assert_bitwise_equal(d.weight, b.weight)
    cembed.save_checkpoint(tmp_path / "one", a)
    cembed.load_checkpoint(tmp_path / "one", d.__class__(5, 2)) is None


def test_frozen_read_only_table_is_hard_linked_not_copied(tmp_path):
    frozen = cembed.Embedding(2000, 16, seed=0, _freeze=True)
    words = cembed.Embedding(100, 16, sparse=True, seed=1)
    cembed.save_checkpoint(tmp_path / "ck", {"frozen": frozen, "words": words})
    loaded_frozen = cembed.Embedding(2000, 16, _freeze=True)
    loaded_words = cembed.Embedding(100, 16, sparse=True)
    cembed.load_checkpoint(tmp_path / "ck", {"frozen": loaded_frozen, "words": loaded_words})
    assert not loaded_frozen.weight.flags.writeable           # mapped read-only
    assert loaded_words.weight.flags.writeable                # copy-on-write
    inode = os.stat(tmp_path / "ck" / "module.frozen.npy").st_ino
    manifest = json.loads((tmp_path / "ck" / "MANIFEST.json").read_text())
    cembed.save_checkpoint(tmp_path / "ck", {"frozen": loaded_frozen, "words": loaded_words})
    assert os.stat(tmp_path / "ck" / "module.frozen.npy").st_ino == inode     # linked, not copied
    assert os.stat(tmp_path / "ck" / "module.words.npy").st_ino != inode
    again = json.loads((tmp_path / "ck" / "MANIFEST.json").read_text())
    assert again["files"]["module.frozen.npy"] == manifest["files"]["module.frozen.npy"]
    check = cembed.Embedding(2000, 16, _freeze=True)
    cembed.load_checkpoint(tmp_path / "ck", {"frozen": check, "words": cembed.Embedding(100, 16)})
    assert_bitwise_equal(check.weight, frozen.weight)


def test_a_frozen_table_whose_checkpoint_manifest_was_damaged_is_copied_not_linked(tmp_path):
    """A frozen table mapped from checkpoint A, whose manifest then had a recorded CRC changed (A is
    refused): saving the table to B linked the file with A's wrong CRC, so B saved without error and
    never loaded. A manifest that fails its own CRC-32 is not believed: the file is copied, its CRC
    computed anew, and B loads."""
    frozen = cembed.Embedding(100, 8, seed=0, _freeze=True)
    cembed.save_checkpoint(tmp_path / "A", {"f": frozen})
    mapped = cembed.Embedding(100, 8, _freeze=True)
    cembed.load_checkpoint(tmp_path / "A", {"f": mapped})
    manifest_path = tmp_path / "A" / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["module.f.npy"]["crc32"] ^= 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match its own CRC-32"):
        cembed.load_checkpoint(tmp_path / "A", {"f": cembed.Embedding(100, 8, _freeze=True)})
    cembed.save_checkpoint(tmp_path / "B", {"f": mapped})
    assert os.stat(tmp_path / "B" / "module.f.npy").st_ino != os.stat(tmp_path / "A" / "module.f.npy").st_ino
    check = cembed.Embedding(100, 8, _freeze=True)
    cembed.load_checkpoint(tmp_path / "B", {"f": check})
    assert_bitwise_equal(check.weight, frozen.weight)


def test_replacing_a_checkpoint_leaves_no_debris(tmp_path):
    emb = cembed.Embedding(10, 2, seed=0)
    for epoch in range(3):
        cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, extra={"epoch": epoch})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]
    assert cembed.load_checkpoint(tmp_path / "ck", {"e": cembed.Embedding(10, 2)}) == {"epoch": 2}


# ------------------------------------------------------------------------------------------ the recovery rule

class _Crash(BaseException):
    """A save stopped at a rename, as by a crash there (nothing of the save's own clean-up runs)."""


def _interrupted_save(monkeypatch, path, modules, extra, before):
    """save_checkpoint stopped just before the rename of ``before`` ("ready": the new checkpoint into
    place; "old": the old one aside): what a crash there leaves."""
    real = os.rename

    def rename(src, dst, *args, **kwargs):
        name = os.path.basename(os.fspath(src))
        if (name.startswith(f".{path.name}.ready-") if before == "ready" else name == path.name):
            raise _Crash()
        return real(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "rename", rename)
        with pytest.raises(_Crash):
            cembed.save_checkpoint(path, modules, extra=extra)


def _siblings(tmp_path):
    """The directory's entries with a save's token replaced by <t>."""
    import re
    return sorted(re.sub(r"-[0-9a-f]{16}$", "-<t>", e) for e in os.listdir(tmp_path))


def test_recovery_rule(tmp_path, monkeypatch):
    emb = cembed.Embedding(10, 2, seed=0)
    path = tmp_path / "ck"
    cembed.save_checkpoint(path, {"e": emb}, extra={"v": 1})
    # a save interrupted between "rename the old aside" and "rename the new in": .ready is the new one
    _interrupted_save(monkeypatch, path, {"e": emb}, {"v": 2}, "ready")
    assert _siblings(tmp_path) == [".ck.lock", ".ck.old-<t>", ".ck.ready-<t>"]
    assert os.path.basename(cembed.checkpoint.find_directory(path)).startswith(".ck.ready-")
    assert cembed.load_checkpoint(path, {"e": cembed.Embedding(10, 2)}) == {"v": 2}
    # the next save finishes the interrupted one first, removes what it left, then replaces it
    cembed.save_checkpoint(path, {"e": emb}, extra={"v": 3})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]
    assert cembed.load_checkpoint(path, {"e": cembed.Embedding(10, 2)}) == {"v": 3}
    # interrupted before the old one was moved aside: the old one is loaded, the next save tidies up
    _interrupted_save(monkeypatch, path, {"e": emb}, {"v": 4}, "old")
    assert _siblings(tmp_path) == [".ck.lock", ".ck.ready-<t>", "ck"]
    assert cembed.load_checkpoint(path, {"e": cembed.Embedding(10, 2)}) == {"v": 3}
    cembed.save_checkpoint(path, {"e": emb}, extra={"v": 5})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]
    # an interrupted save that never reached .ready is ignored: the old checkpoint is loaded
    shutil.copytree(path, tmp_path / ".ck.tmp-0123456789abcdef")
    (tmp_path / ".ck.tmp-0123456789abcdef" / "MANIFEST.json").write_text("{")
    assert cembed.load_checkpoint(path, {"e": cembed.Embedding(10, 2)}) == {"v": 5}
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        cembed.load_checkpoint(tmp_path / "nothing", {"e": emb})


def test_an_interrupted_save_of_an_earlier_version_is_still_recovered(tmp_path):
    """Saves before 2026-11-26 left a complete checkpoint not yet in place as .<name>.ready: it is
    still loaded, and the next save puts it in place first."""
    emb = cembed.Embedding(10, 2, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, extra={"v": 1})
    os.rename(tmp_path / "ck", tmp_path / ".ck.ready")
    (tmp_path / ".ck.lock").write_bytes(b"")
    assert cembed.load_checkpoint(tmp_path / "ck", {"e": cembed.Embedding(10, 2)}) == {"v": 1}
    cembed.save_checkpoint(tmp_path / "ck", {"e": emb}, extra={"v": 2})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a cembed checkpoint"):
        cembed.save_checkpoint(tmp_path / "data", cembed.Embedding(3, 2))
    assert (tmp_path / "data" / "precious.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a cembed checkpoint"):
        cembed.save_checkpoint(tmp_path / "file", cembed.Embedding(3, 2))
    (tmp_path / "empty").mkdir()
    cembed.save_checkpoint(tmp_path / "empty", cembed.Embedding(3, 2))   # an empty directory is fine



def test_a_checkpoint_whose_manifest_is_damaged_is_refused_naming_the_manifest(tmp_path):
    """A checkpoint whose MANIFEST.json is no longer JSON: a save to its path said it 'is not a cembed
    checkpoint', as for a directory of someone else's. It names the manifest and why, and changes nothing."""
    cembed.save_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2, seed=0))
    manifest = tmp_path / "ck" / "MANIFEST.json"
    manifest.write_bytes(b"#" + manifest.read_bytes()[1:])
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    with pytest.raises(ValueError, match=r"ck holds a MANIFEST.json that is not a cembed checkpoint's \(unreadable: "
                                         r"JSONDecodeError"):
        cembed.save_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2, seed=1))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before


def test_a_directory_with_a_foreign_manifest_or_extra_files_is_not_replaced(tmp_path):
    """Only the existence of a file named MANIFEST.json was checked: a directory of results that had
    one was deleted whole by a save. A valid manifest is required, and a checkpoint holding files its
    manifest does not list is refused too (a save replaces the directory whole)."""
    emb = cembed.Embedding(3, 2, seed=0)
    results = tmp_path / "results"
    (results / "sub").mkdir(parents=True)
    (results / "MANIFEST.json").write_text('{"project": "mine"}')
    (results / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match="not a cembed checkpoint"):
        cembed.save_checkpoint(results, emb)
    assert (results / "sub" / "data.csv").read_text() == "1,2"
    assert sorted(os.listdir(tmp_path)) == ["results"]          # refused before even the lock file
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, emb, extra={"v": 1})
    (ck / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not part of its checkpoint.*notes.txt"):
        cembed.save_checkpoint(ck, emb, extra={"v": 2})
    assert (ck / "notes.txt").read_text() == "mine"
    assert cembed.load_checkpoint(ck, cembed.Embedding(3, 2)) == {"v": 1}


def test_a_directory_at_a_listed_name_is_not_deleted_by_the_next_save(tmp_path):
    """Only the checkpoint's top-level names were compared with its manifest: a directory put at a
    listed file's name (holding the user's files) was deleted with them by the next save."""
    emb = cembed.Embedding(3, 2, seed=0)
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, emb, extra={"v": 1})
    member = next(name for name in os.listdir(ck) if name.endswith(".npy"))
    os.unlink(ck / member)
    (ck / member).mkdir()
    (ck / member / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"not part of its checkpoint \\({member}/\\)"):
        cembed.save_checkpoint(ck, emb, extra={"v": 2})
    assert (ck / member / "precious.txt").read_text() == "mine"


def test_a_full_disk_while_recording_the_journal_names_the_checkpoint(tmp_path):
    """A save that could not write its journal line (the lock file beside the checkpoint: a full disk, a
    file-size limit) raised a bare OSError naming no path, from closing the lock file (its buffered line
    was flushed again there, hiding the first failure). It is named as every other failed write of a
    save, and the previous checkpoint stands. (A file-size limit of the journal's current size stands
    in for the full disk, in a child process.)"""
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, cembed.Embedding(3, 2, seed=0), extra={"v": 1})
    code = textwrap.dedent(f"""
        import resource, signal, sys
        import cembed
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        lock = {str(tmp_path / ".ck.lock")!r}
        import os
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(lock), resource.RLIM_INFINITY))
        try:
            cembed.save_checkpoint({str(ck)!r}, cembed.Embedding(3, 2, seed=1), extra={{"v": 2}})
        except OSError as exc:
            print(type(exc).__name__, exc)
        else:
            print("saved")
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env_importing_this_cembed(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "while saving the checkpoint" in out.stdout and str(ck) in out.stdout and "intact" in out.stdout, out.stdout
    assert cembed.load_checkpoint(ck, cembed.Embedding(3, 2)) == {"v": 1}


def test_a_checkpoint_path_that_is_a_symbolic_link_is_saved_where_it_points(tmp_path):
    """The first save renamed the link itself aside and every later save failed; now the link is
    resolved: the directory it names is replaced, every time, and the link keeps naming it."""
    real = tmp_path / "disk" / "ck"
    real.parent.mkdir()
    link = tmp_path / "ck"
    os.symlink(real, link)
    emb = cembed.Embedding(5, 2, seed=0)
    for version in range(3):
        cembed.save_checkpoint(link, emb, extra={"v": version})
        assert os.path.islink(link) and os.path.isdir(real)
        assert cembed.load_checkpoint(link, cembed.Embedding(5, 2)) == {"v": version}
        assert cembed.load_checkpoint(real, cembed.Embedding(5, 2)) == {"v": version}
    assert sorted(os.listdir(tmp_path)) == ["ck", "disk"]
    assert sorted(os.listdir(real.parent)) == [".ck.lock", "ck"]


@pytest.mark.parametrize("make", ["file", "dangling link", "link to a checkpoint", "directory of notes",
                                  "copy of the checkpoint"])
@pytest.mark.parametrize("name", [".ck.old", ".ck.ready", ".ck.tmp-x", ".ck.old-0123456789abcdef"])
def test_a_users_file_named_like_a_saves_sibling_is_never_removed(tmp_path, make, name):
    """Saves renamed through .<name>.ready and .<name>.old and removed whatever they found there first
    (rmtree for a directory): a user's .ck.old backup was deleted by the next save. A save's siblings
    now carry a random token its journal records, and only those are ever removed."""
    emb = cembed.Embedding(5, 2, seed=0)
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, emb, extra={"v": 1})
    other = tmp_path / "other"
    cembed.save_checkpoint(other, emb, extra={"v": 0})
    aside = tmp_path / name
    if make == "file":
        aside.write_text("left by someone")
    elif make == "dangling link":
        os.symlink(tmp_path / "nowhere", aside)
    elif make == "link to a checkpoint":
        os.symlink(other, aside)
    elif make == "directory of notes":
        aside.mkdir()
        (aside / "notes.txt").write_text("mine")
    else:
        shutil.copytree(ck, aside)
    before = sorted(os.listdir(tmp_path))
    cembed.checkpoint.check_replaceable(ck)
    for version in (2, 3):
        cembed.save_checkpoint(ck, emb, extra={"v": version})
        assert cembed.load_checkpoint(ck, cembed.Embedding(5, 2)) == {"v": version}
    assert sorted(os.listdir(tmp_path)) == before and os.path.lexists(aside)
    assert cembed.load_checkpoint(other, cembed.Embedding(5, 2)) == {"v": 0}
    if make == "directory of notes":
        assert (aside / "notes.txt").read_text() == "mine"
    if make == "copy of the checkpoint":
        assert cembed.load_checkpoint(aside, cembed.Embedding(5, 2)) == {"v": 1}


def test_a_users_directory_made_after_a_crash_is_never_taken_for_the_saves(tmp_path, monkeypatch):
    """A save killed while writing left its journal naming its directory by device and inode; the user
    removed the debris and made a backup .ck.old, which the file system gave the freed inode: the next
    save took the backup for its own and deleted it. A save's directories are named by a random token
    now, which no directory of the user's carries."""
    emb = cembed.Embedding(5, 2, seed=0)
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, emb, extra={"v": 1})
    with monkeypatch.context() as patch:   # a crash while the arrays are written: no clean-up runs
        def crash(*args, **kwargs):
            raise _Crash()
        patch.setattr(cembed.checkpoint, "_write_array", crash)
        patch.setattr(shutil, "rmtree", lambda *args, **kwargs: None)
        with pytest.raises(_Crash):
            cembed.save_checkpoint(ck, emb, extra={"v": 2})
    [left] = [e for e in os.listdir(tmp_path) if e.startswith(".ck.tmp-")]
    os.rmdir(tmp_path / left)                              # the user clears the debris
    shutil.copytree(ck, tmp_path / ".ck.old")              # and keeps a backup (perhaps on the freed inode)
    (tmp_path / ".ck.old" / "NOTES").write_text("mine")
    shutil.copytree(ck, tmp_path / ".ck.tmp-backup")
    cembed.save_checkpoint(ck, emb, extra={"v": 3})
    assert (tmp_path / ".ck.old" / "NOTES").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", ".ck.old", ".ck.tmp-backup", "ck"]
    assert cembed.load_checkpoint(ck, cembed.Embedding(5, 2)) == {"v": 3}


@pytest.mark.parametrize("before", [b"{}", b"pid 1234", b'{"save": "0123456789abcdef"}\nGARBAGE'])
def test_a_journal_not_ending_in_a_newline_still_records_the_next_save(tmp_path, monkeypatch, before):
    """A save appended its token straight after whatever the lock file held: after the '{}' an earlier
    version's saves left there, the token ran into it, could not be read, and a crash between the two
    renames left no checkpoint the load could find (the complete one sat in .ready-<token>)."""
    emb = cembed.Embedding(5, 2, seed=0)
    ck = tmp_path / "ck"
    cembed.save_checkpoint(ck, emb, extra={"v": 1})
    (tmp_path / ".ck.lock").write_bytes(before)
    _interrupted_save(monkeypatch, ck, emb, {"v": 2}, "ready")
    assert cembed.load_checkpoint(ck, cembed.Embedding(5, 2)) == {"v": 2}
    cembed.save_checkpoint(ck, emb, extra={"v": 3})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]


def test_a_users_dot_ready_directory_is_not_taken_for_an_earlier_versions_checkpoint(tmp_path):
    """An earlier version's interrupted save left .<name>.ready; a directory of the user's named so (a
    manifest of its own, or a checkpoint copy with notes beside it) was moved into place by the first
    save to a new path and then deleted. Only a cembed checkpoint holding nothing but its files is."""
    emb = cembed.Embedding(5, 2, seed=0)
    for name, make in (("own", "manifest"), ("copy", "checkpoint with notes")):
        ready = tmp_path / f".{name}.ready"
        if make == "manifest":
            ready.mkdir()
            (ready / "MANIFEST.json").write_text('{"my": "own manifest"}')
        else:
            cembed.save_checkpoint(tmp_path / "src", emb, extra={"v": 0})
            shutil.copytree(tmp_path / "src", ready)
        (ready / "notes.txt").write_text("precious")
        cembed.checkpoint.check_replaceable(tmp_path / name)
        cembed.save_checkpoint(tmp_path / name, emb, extra={"v": 1})
        assert (ready / "notes.txt").read_text() == "precious"
        assert cembed.load_checkpoint(tmp_path / name, cembed.Embedding(5, 2)) == {"v": 1}


def test_loads_never_meet_half_a_save(tmp_path):
    """Loads took no lock: one running while another process saved to the path met a missing manifest,
    a missing file or a file of the wrong size now and then. A load now holds the lock shared, a save
    exclusively."""
    path = tmp_path / "ck"
    cembed.save_checkpoint(path, {"a": cembed.Embedding(2000, 16, seed=0)}, extra={"v": 0})
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    saver = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import cembed, time
        emb = cembed.Embedding(2000, 16, seed=0)
        deadline = time.monotonic() + 3
        v = 1
        while time.monotonic() < deadline:
            cembed.save_checkpoint({str(path)!r}, {{"a": emb}}, extra={{"v": v}})
            v += 1
        """)], env=env, cwd=tmp_path)   # (cwd: never a source checkout shadowing the installed package)
    try:
        loads, target = 0, cembed.Embedding(2000, 16)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            cembed.load_checkpoint(path, {"a": target}, mmap=False)
            loads += 1
    finally:
        saver.wait(timeout=60)
    assert saver.returncode == 0 and loads > 10


def test_a_lease_on_the_lock_file_is_waited_for(tmp_path):
    """A lease (what knfsd and Samba hold for remote clients) on .<name>.lock made the non-blocking open
    fail at once: a save raised BlockingIOError and a load of an interrupted save found 'no checkpoint'.
    They wait for the lease to be broken now, as a plain open does."""
    fcntl = pytest.importorskip("fcntl")
    if not hasattr(fcntl, "F_SETLEASE"):
        pytest.skip("no leases on this platform")
    emb = cembed.Embedding(20, 3, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 1})
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, signal, sys, time
        fd = os.open({str(tmp_path / '.ck.lock')!r}, os.O_RDONLY)
        def broken(*args):
            time.sleep(0.2)
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        signal.signal(signal.SIGIO, broken)
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError:
            print("no lease", flush=True)
            sys.exit()
        print("leased", flush=True)
        time.sleep(30)
        """)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        if holder.stdout.readline().strip() != "leased":
            pytest.skip("this file system gives no leases")
        cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 2})
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(20, 3)) == {"v": 2}


def test_a_fifo_named_like_the_lock_does_not_block_a_load(tmp_path):
    emb = cembed.Embedding(5, 2, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 1})
    os.unlink(tmp_path / ".ck.lock")
    os.mkfifo(tmp_path / ".ck.lock")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", f"import cembed; print(cembed.checkpoint.read_directory({str(tmp_path / 'ck')!r})[0])"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "'v': 1" in done.stdout, done.stderr
    with pytest.raises(ValueError, match="ck.lock is not a file of its own"):
        cembed.save_checkpoint(tmp_path / "ck", emb)


@pytest.mark.parametrize("make", ["directory", "link to a file", "dangling link", "hard link to a file"])
def test_a_lock_path_that_is_not_a_file_refuses_the_save_before_anything_changes(tmp_path, make):
    """``.<name>.lock`` made a directory: check_replaceable passed, so the trainer trained the whole run
    and failed at its final save; a link to a user's file had that file overwritten by the journal.
    Both refuse it now, naming it."""
    lock = tmp_path / ".ck.lock"
    if make == "directory":
        lock.mkdir()
    elif make == "hard link to a file":
        (tmp_path / "notes.txt").write_text("my notes")
        os.link(tmp_path / "notes.txt", lock)
    else:
        (tmp_path / "notes.txt").write_text("my notes")
        os.symlink(tmp_path / ("notes.txt" if make == "link to a file" else "nowhere"), lock)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match="ck.lock is not a file of its own"):
        cembed.checkpoint.check_replaceable(tmp_path / "ck")
    with pytest.raises(ValueError, match="ck.lock is not a file of its own"):
        cembed.save_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2))
    assert sorted(os.listdir(tmp_path)) == before
    if make != "directory":
        assert (tmp_path / "notes.txt").read_text() == "my notes"
    if make in ("hard link to a file", "link to a file"):   # the advice keeps whatever journal it holds
        with pytest.raises(ValueError, match="replace it by a copy .* which keeps the journal"):
            cembed.save_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2))


@pytest.mark.parametrize("how", ["load", "open_table"])
def test_a_copy_on_write_map_is_copied_into_a_checkpoint_even_when_made_read_only(tmp_path, how):
    """A copy-on-write map of a checkpoint file holds its changes in private pages: hard-linking its
    file (as for a read-only map) saved the OLD values, with the old, valid checksum."""
    emb = cembed.Embedding(100, 8, sparse=True, seed=0)
    cembed.save_checkpoint(tmp_path / "a", {"w": emb})
    if how == "load":
        trained = cembed.Embedding(100, 8, sparse=True, seed=1)
        cembed.load_checkpoint(tmp_path / "a", {"w": trained}, mmap=True)    # trainable: copy-on-write
        opt = optim.SGD([trained], lr=1.0)
        trained.backward(np.ones((1, 8), np.float32), np.array([3]), optimizer=opt)
    else:
        table = cembed.open_table(tmp_path / "a" / "module.w.npy", mode="c")
        table[0] = 123.0
        trained = cembed.Embedding.from_pretrained(table)
    expected = np.array(trained.weight)
    assert not np.array_equal(expected, emb.weight)
    trained.weight.flags.writeable = False
    cembed.save_checkpoint(tmp_path / "b", {"w": trained})
    assert os.stat(tmp_path / "a" / "module.w.npy").st_ino != os.stat(tmp_path / "b" / "module.w.npy").st_ino
    check = cembed.Embedding(100, 8)
    cembed.load_checkpoint(tmp_path / "b", {"w": check}, mmap=False)
    assert_bitwise_equal(check.weight, expected)


def test_a_deeply_nested_manifest_is_a_checkpoint_error(tmp_path):
    cembed.save_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2))
    (tmp_path / "ck" / "MANIFEST.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(3, 2))


# ------------------------------------------------------------------------------------------ crash safety

CHILD = textwrap.dedent(r"""
    import sys
    import numpy as np
    import cembed
    path, first = sys.argv[1], int(sys.argv[2])
    emb = cembed.Embedding(40_000, 32, sparse=True)
    bag = cembed.EmbeddingBag(20_000, 32, sparse=True)
    opt = cembed.optim.SparseAdam([emb, bag])
    idx = np.arange(0, 40_000, 3)
    for version in range(first, first + 1000):
        emb.backward(np.full((idx.size, 32), 0.5, np.float32), idx, optimizer=opt)
        emb.weight[:] = version
        bag.weight[:] = -version
        cembed.save_checkpoint(path, {"emb": emb, "bag": bag}, opt, extra={"version": version})
        print(version, flush=True)
""")


def _check_version(path):
    """Load and verify the checkpoint at ``path``; returns its version (weights must match it)."""
    emb, bag = cembed.Embedding(40_000, 32, sparse=True), cembed.EmbeddingBag(20_000, 32, sparse=True)
    opt = optim.SparseAdam([emb, bag])
    extra = cembed.load_checkpoint(path, {"emb": emb, "bag": bag}, opt)
    version = extra["version"]
    assert (emb.weight == version).all() and (bag.weight == -version).all()
    assert opt.state[emb]["step"] == version + 1 - 100 * (version // 100)
    return version


def test_sigkill_while_saving_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ck"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    rnd = random.Random(2026)
    last = None
    kills = 0
    for trial in range(8):
        first = 100 * trial
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(first)], env=env, cwd=tmp_path,
                                 stdout=subprocess.PIPE, text=True)
        try:
            if trial == 0:
                assert child.stdout.readline().strip() == str(first)   # a first complete checkpoint
            time.sleep(rnd.uniform(0.0, 0.6))
            child.send_signal(signal.SIGKILL)
            kills += child.wait() == -signal.SIGKILL
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
        version = _check_version(path)
        if last is not None:
            assert version >= last     # never an older one than what was there before
        last = version
    assert kills >= 6
    # after the kills a save cleans up whatever they left, and the result loads
    emb, bag = cembed.Embedding(40_000, 32, sparse=True), cembed.EmbeddingBag(20_000, 32, sparse=True)
    emb.weight[:] = 7
    bag.weight[:] = -7
    opt = optim.SparseAdam([emb, bag])
    for _ in range(8):
        emb.backward(np.zeros((1, 32), np.float32), np.array([0]), optimizer=opt)
    cembed.save_checkpoint(path, {"emb": emb, "bag": bag}, opt, extra={"version": 7})
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]
    assert _check_version(path) == 7


# ------------------------------------------------------------------------------------------ refusals

@pytest.fixture
def saved(tmp_path):
    modules = _modules()
    opt = optim.SparseAdam(list(modules.values()))
    _steps(modules, opt, np.random.default_rng(0), 2)
    cembed.save_checkpoint(tmp_path / "ck", modules, opt, extra={"epoch": 1})
    fresh = _modules(seed=3)
    fresh_opt = optim.SparseAdam(list(fresh.values()))
    _steps(fresh, fresh_opt, np.random.default_rng(1), 1)
    return tmp_path / "ck", fresh, fresh_opt


def _refused(saved, match, modules=None, opt="same", error=CheckpointError, **kwargs):
    path, fresh, fresh_opt = saved
    modules = fresh if modules is None else modules
    opt = fresh_opt if opt == "same" else opt
    before = _snapshot(fresh, fresh_opt)
    with pytest.raises(error, match=match):
        cembed.load_checkpoint(path, modules, opt, **kwargs)
    assert _snapshot(fresh, fresh_opt) == before


def test_truncated_file_is_named(saved):
    path = saved[0]
    with open(path / "optim.1.exp_avg.npy", "r+b") as fh:
        fh.truncate(os.stat(path / "optim.1.exp_avg.npy").st_size - 4)
    _refused(saved, r"optim\.1\.exp_avg\.npy: \d+ bytes, the manifest records \d+")


def test_corrupted_byte_is_a_checksum_mismatch_naming_the_file(saved):
    path = saved[0]
    with open(path / "module.words.npy", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 1]))
    _refused(saved, r"module\.words\.npy: checksum mismatch")
    # without verification the damage cannot be seen: verify=False is the caller's risk
    path, fresh, fresh_opt = saved
    cembed.load_checkpoint(path, fresh, fresh_opt, verify=False)


def test_missing_file_is_named(saved):
    os.unlink(saved[0] / "optim.0.exp_avg_sq.npy")
    _refused(saved, r"optim\.0\.exp_avg_sq\.npy: missing")


def _tamper(path, edit):
    """Edit the manifest and seal it again (its own CRC-32 recomputed): the edit itself must be refused."""
    manifest = json.loads((path / "MANIFEST.json").read_text())
    edit(manifest)
    (path / "MANIFEST.json").write_text(json.dumps(cembed.checkpoint._sealed(manifest)))


@pytest.mark.parametrize("edit", [lambda text: text.replace('"epoch": 1', '"epoch": 3', 1),
                                  lambda text: text.replace('"lr": 0.001', '"lr": 0.003', 1),
                                  lambda text: text.replace('"manifest_crc32"', '"manifest_crc33"', 1)])
def test_an_unsealed_manifest_edit_is_refused(saved, edit):
    """The manifest carries its own CRC-32: a bit flip in a recorded step or option is caught like one
    in a file (no file checksum covers the manifest)."""
    text = (saved[0] / "MANIFEST.json").read_text()
    assert edit(text) != text
    (saved[0] / "MANIFEST.json").write_text(edit(text))
    _refused(saved, "manifest does not match its own CRC-32|unknown entries manifest_crc33")


@pytest.mark.parametrize("edit,match", [
    (lambda m: m.update(format="cembed.checkpoint/99"), "not a cembed.checkpoint/1 manifest"),
    (lambda m: m.update(checksum="md5"), "malformed manifest"),
    (lambda m: m["files"]["module.words.npy"].update(shape=[301, 8]), "manifest records"),
    (lambda m: m["files"]["module.words.npy"].update(dtype="<f8"), "manifest records"),
    (lambda m: m["files"]["module.words.npy"].update(crc32=1), "checksum mismatch"),
    (lambda m: m["files"]["module.words.npy"].update(bytes="many"), "malformed entry"),
    (lambda m: m["files"].update({"../x.npy": m["files"]["module.words.npy"]}), "malformed entry"),
    (lambda m: m["meta"].update(kind="other"), "not a module checkpoint"),
    (lambda m: m["meta"]["modules"]["words"].update({"class": "EmbeddingBag"}), "was a EmbeddingBag"),
    (lambda m: m["meta"]["optimizer"].update({"class": "Adagrad"}), "holds Adagrad state"),
    (lambda m: m["meta"]["optimizer"].update(params=["bags", "words"]), "held the modules"),
    (lambda m: m["meta"]["optimizer"]["state"]["state"]["0"]["step"].update(value=-3), "'step' must be an int"),
    (lambda m: m["meta"]["optimizer"]["state"]["param_groups"][0].update(lr="fast"), "learning rate"),
    (lambda m: m["meta"]["optimizer"]["state"]["state"]["0"]["exp_avg"].update(array="module.bags"),
     "exp_avg"),
    (lambda m: m["meta"]["optimizer"]["state"]["state"]["0"]["exp_avg"].update(array="nope"), "malformed"),
    (lambda m: m["meta"]["modules"]["words"].update(array=["module.words"]), "malformed entry for module"),
    (lambda m: m["meta"]["modules"]["words"].update(array={"array": "module.words"}), "malformed entry for module"),
    (lambda m: m["meta"]["optimizer"]["state"]["param_groups"][0].update(rounding_rows={"first": 0, "stride": 1}),
     "rounding_rows"),
])
def test_tampered_manifest_is_refused_with_nothing_changed(saved, edit, match):
    _tamper(saved[0], edit)
    _refused(saved, match)


def test_unreadable_manifest(saved):
    (saved[0] / "MANIFEST.json").write_text("{not json")
    _refused(saved, "unreadable manifest")


def test_modules_that_do_not_fit_are_refused(saved):
    path, fresh, fresh_opt = saved
    _refused(saved, r"module 'words' has a table of shape \(301, 8\) float32",
             modules={"words": cembed.Embedding(301, 8, sparse=True), "bags": fresh["bags"]}, opt=None)
    _refused(saved, r"float64", modules={"words": cembed.Embedding(300, 8, dtype=np.float64),
                                         "bags": fresh["bags"]}, opt=None)
    _refused(saved, r"holds modules \['bags', 'words'\], got \['words'\]", modules={"words": fresh["words"]},
             opt=None)
    _refused(saved, "was a Embedding, got a EmbeddingBag",
             modules={"words": cembed.EmbeddingBag(300, 8), "bags": fresh["bags"]}, opt=None)


def test_optimizers_that_do_not_fit_are_refused(saved, tmp_path):
    path, fresh, fresh_opt = saved
    _refused(saved, "holds SparseAdam state, not Adagrad", opt=optim.Adagrad(list(fresh.values())))
    _refused(saved, "held the modules", opt=optim.SparseAdam([fresh["bags"], fresh["words"]]))
    _refused(saved, "held the modules", opt=optim.SparseAdam([fresh["words"]]))
    cembed.save_checkpoint(tmp_path / "no_opt", fresh)
    before = _snapshot(fresh, fresh_opt)
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        cembed.load_checkpoint(tmp_path / "no_opt", fresh, fresh_opt)
    assert _snapshot(fresh, fresh_opt) == before


def test_refused_saves_write_nothing(saved, tmp_path):
    path, fresh, fresh_opt = saved
    listing = sorted(os.listdir(path))
    manifest = (path / "MANIFEST.json").read_bytes()
    with pytest.raises(TypeError, match="JSON"):
        cembed.save_checkpoint(path, fresh, fresh_opt, extra={"bad": object()})
    with pytest.raises(ValueError, match="not among the modules"):
        cembed.save_checkpoint(path, {"words": fresh["words"]}, fresh_opt)
    with pytest.raises(ValueError, match="module name"):
        cembed.save_checkpoint(path, {"../up": fresh["words"]})
    with pytest.raises(ValueError, match="same object"):
        cembed.save_checkpoint(path, {"a": fresh["words"], "b": fresh["words"]})
    with pytest.raises(TypeError, match="optimizer"):
        cembed.save_checkpoint(path, fresh, optimizer="adam")
    assert sorted(os.listdir(path)) == listing and (path / "MANIFEST.json").read_bytes() == manifest
    assert sorted(os.listdir(tmp_path)) == [".ck.lock", "ck"]


# ------------------------------------------------------------------------------------------ the trainer

def _train_cli(args, cwd, env):
    return subprocess.run([sys.executable, "-m", "cembed", "train", "--vocab-size", "3000", "--tokens", "120000",
                           "--batch-size", "1024", "--no-save", "--no-plot", "--quiet", "--threads", "1"] + args,
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_trainer_killed_then_resumed_equals_an_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    whole = _train_cli(["--table-dir", "whole"], tmp_path, env)
    assert whole.returncode == 0, whole.stderr
    assert "peak RSS" in whole.stdout
    child = subprocess.Popen([sys.executable, "-m", "cembed", "train", "--vocab-size", "3000", "--tokens", "120000",
                              "--batch-size", "1024", "--no-save", "--no-plot", "--quiet", "--threads", "1",
                              "--table-dir", "cut", "--checkpoint-every", "5"], cwd=tmp_path, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = tmp_path / "cut" / "checkpoint" / "MANIFEST.json"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if manifest.exists():
                try:
                    if json.loads(manifest.read_text())["meta"]["extra"]["steps"] >= 10:
                        break
                except (ValueError, KeyError):
                    pass
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    steps = json.loads(manifest.read_text())["meta"]["extra"]["steps"]
    resumed = _train_cli(["--table-dir", "cut", "--resume"], tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr
    for name in ("module.in.npy", "module.out.npy", "optim.0.exp_avg.npy", "optim.1.exp_avg_sq.npy"):
        a = np.load(tmp_path / "whole" / "checkpoint" / name)
        b = np.load(tmp_path / "cut" / "checkpoint" / name)
        assert_bitwise_equal(a, b)
    total = json.loads((tmp_path / "whole" / "checkpoint" / "MANIFEST.json").read_text())["meta"]["extra"]["steps"]
    assert 10 <= steps < total, (steps, total)   # the kill landed mid-run
    # a resume with other settings is refused, changing nothing
    other = _train_cli(["--table-dir", "cut", "--resume", "--window", "3"], tmp_path, env)
    assert other.returncode == 1 and "other settings: window 5 -> 3" in other.stderr


def test_trainer_refusals(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    no_dir = _train_cli(["--resume"], tmp_path, env)
    assert no_dir.returncode == 2 and "need --table-dir" in no_dir.stderr
    nothing = _train_cli(["--table-dir", "empty", "--resume"], tmp_path, env)
    assert nothing.returncode == 1 and "--resume" in nothing.stderr


def test_trainer_resume_compares_what_a_run_means(tmp_path):
    """--resume compared what the flags said, not what the run was: a run made with the default lr was
    refused with --lr 0.01 (its value: 'lr None -> 0.01'), a --row-order id run had to be resumed with
    --row-order id, and another --dtype was reported as a row-order difference."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    small = ["--tokens", "20000"]
    assert _train_cli(["--table-dir", "plain"] + small, tmp_path, env).returncode == 0
    explicit = _train_cli(["--table-dir", "plain", "--resume", "--lr", "0.01"] + small, tmp_path, env)
    assert explicit.returncode == 0, explicit.stderr
    other = _train_cli(["--table-dir", "plain", "--resume", "--lr", "0.02"] + small, tmp_path, env)
    assert other.returncode == 1 and "lr 0.01 -> 0.02" in other.stderr, other.stderr
    assert _train_cli(["--table-dir", "byid", "--row-order", "id"] + small, tmp_path, env).returncode == 0
    resumed = _train_cli(["--table-dir", "byid", "--resume"] + small, tmp_path, env)
    assert resumed.returncode == 0, resumed.stderr
    changed = _train_cli(["--table-dir", "byid", "--resume", "--row-order", "count"] + small, tmp_path, env)
    assert changed.returncode == 1 and "row_order 'id' -> 'count:" in changed.stderr, changed.stderr
    pytest.importorskip("ml_dtypes")
    # a recorded row order the given settings cannot use is not taken: the difference named is theirs
    near = ["--table-dir", "near", "--dtype", "bfloat16"] + small
    assert _train_cli(near + ["--rounding", "nearest", "--row-order", "count"], tmp_path, env).returncode == 0
    other = _train_cli(near + ["--resume", "--rounding", "stochastic"], tmp_path, env)
    assert other.returncode == 1 and "rounding 'nearest' -> 'stochastic'" in other.stderr, other.stderr
    assert _train_cli(["--table-dir", "half", "--dtype", "bfloat16"] + small, tmp_path, env).returncode == 0
    wrong = _train_cli(["--table-dir", "half", "--resume"] + small, tmp_path, env)
    assert wrong.returncode == 1 and "other settings: dtype 'bfloat16' -> 'float32'" in wrong.stderr, wrong.stderr


def test_trainer_resume_with_another_rounding_or_state_dtype_is_refused(tmp_path):
    """A 16-bit run's rounding and state dtype are settings of the checkpoint: a resume with others
    would silently go on with the saved ones (a load keeps the saved param groups)."""
    pytest.importorskip("ml_dtypes")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    base = ["--table-dir", "half", "--dtype", "float16", "--tokens", "20000"]
    first = _train_cli(base, tmp_path, env)
    assert first.returncode == 0, first.stderr
    saved = (tmp_path / "half" / "checkpoint" / "MANIFEST.json").read_bytes()
    for change, named in ((["--rounding", "nearest"], "rounding"), (["--state-dtype", "float16"], "state_dtype")):
        run = _train_cli(base + ["--resume"] + change, tmp_path, env)
        assert run.returncode == 1 and named in run.stderr, run.stderr
    assert (tmp_path / "half" / "checkpoint" / "MANIFEST.json").read_bytes() == saved
    again = _train_cli(base + ["--resume"], tmp_path, env)
    assert again.returncode == 0, again.stderr
    # a run with other values resumes with them when they are not given again (they were the defaults)
    other = ["--table-dir", "other", "--dtype", "float16", "--tokens", "20000", "--rounding", "nearest",
             "--state-dtype", "float32"]
    assert _train_cli(other, tmp_path, env).returncode == 0
    resumed = _train_cli(other[:6] + ["--resume"], tmp_path, env)
    assert resumed.returncode == 0 and "float32 optimizer state (nearest rounding)" in resumed.stdout, resumed.stderr
    # a checkpoint of an earlier version records neither: it resumes (they are not compared)
    manifest = tmp_path / "half" / "checkpoint" / "MANIFEST.json"
    doc = json.loads(manifest.read_text())
    for key in ("rounding", "state_dtype"):
        del doc["meta"]["extra"]["settings"][key]
    manifest.write_text(json.dumps(cembed.checkpoint._sealed(doc)))
    old = _train_cli(base + ["--resume"], tmp_path, env)
    assert old.returncode == 0, old.stderr


def _word_order(vocab_size, tokens, seed=0):
    """The trainer's --row-order count: words by corpus count, most frequent first, ties by id."""
    from cembed.apps import corpus as corpus_mod
    counts = corpus_mod.synthetic_corpus(vocab_size, 100, tokens, seed=seed).counts
    order = np.argsort(-counts.astype(np.int64), kind="stable")
    assert (np.diff(counts[order].astype(np.int64)) <= 0).all()
    return order


@pytest.mark.parametrize("options", [["--optimizer", "sparseadam", "--threads", "2"], ["--optimizer", "sgd"]])
def test_trainer_table_dir_rows_by_count_train_bitwise_like_memory(tmp_path, options):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {"ram": [], "count": ["--table-dir", "count"], "id": ["--table-dir", "id", "--row-order", "id"]}
    for name, args in runs.items():
        done = subprocess.run([sys.executable, "-m", "cembed", "train", "--vocab-size", "3000", "--tokens", "120000",
                               "--batch-size", "1024", "--no-plot", "--quiet", "--threads", "1", "--out", f"out-{name}"]
                              + args + options, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    in_ram = np.load(tmp_path / "out-ram" / "embeddings.npy")
    for name in ("count", "id"):   # the embeddings, read by word from the files, are the in-memory training's
        assert_bitwise_equal(np.load(tmp_path / f"out-{name}" / "embeddings.npy"), in_ram)
    # the files: by word id, or by corpus count (row p holds word order[p]); the checkpoints likewise
    order = _word_order(3000, 120000)
    assert not np.array_equal(order, np.arange(order.size))
    assert_bitwise_equal(np.load(tmp_path / "id" / "tables" / "in.npy"), in_ram)
    assert_bitwise_equal(np.load(tmp_path / "count" / "tables" / "in.npy"), in_ram[order])
    assert_bitwise_equal(np.load(tmp_path / "count" / "checkpoint" / "module.in.npy"), in_ram[order])
    out_id = np.load(tmp_path / "id" / "checkpoint" / "module.out.npy")
    assert out_id.any()
    assert_bitwise_equal(np.load(tmp_path / "count" / "checkpoint" / "module.out.npy"), out_id[order])
    # a resume must keep the row order the checkpoint was written with
    other = _train_cli(["--table-dir", "count", "--resume", "--row-order", "id"] + options, tmp_path, env)
    assert other.returncode == 1 and "row_order 'count:" in other.stderr and "-> 'id'" in other.stderr, other.stderr


@pytest.mark.parametrize("row_order", ["id", "count"])
def test_trainer_resume_with_another_corpus_of_the_same_size_is_refused(tmp_path, row_order):
    """The checkpoint records a CRC-32 of the corpus: a resume on another corpus with the same vocabulary and
    token count is refused in either row order (in id order only the sizes were once compared), and the
    directory is left as it was."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    args = ["--table-dir", "run", "--row-order", row_order, "--checkpoint-every", "3"]
    first = _train_cli(args + ["--topics", "10"], tmp_path, env)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"}
    other = _train_cli(args + ["--topics", "20", "--resume"], tmp_path, env)
    assert other.returncode == 1 and "corpus 'crc32:" in other.stderr, other.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.name != ".lock"} == before
    same = _train_cli(args + ["--topics", "10", "--resume"], tmp_path, env)
    assert same.returncode == 0, same.stderr


def test_trainer_row_order_refusals(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    no_dir = _train_cli(["--row-order", "id"], tmp_path, env)
    assert no_dir.returncode == 2 and "need --table-dir" in no_dir.stderr
    keyed = _train_cli(["--table-dir", "half", "--row-order", "count", "--dtype", "bfloat16"], tmp_path, env)
    assert keyed.returncode == 2 and "keyed by the table row" in keyed.stderr, keyed.stderr
    assert not (tmp_path / "half").exists()   # refused before anything was created


def test_word_rows_reads_a_table_stored_in_another_order():
    from cembed.apps.train import WordRows
    rng = np.random.default_rng(0)
    by_word = rng.standard_normal((50, 4)).astype(np.float32)
    order = rng.permutation(50)             # file row p holds word order[p]
    rank = np.empty(50, np.int32)
    rank[order] = np.arange(50, dtype=np.int32)
    stored = by_word[order]
    rows = WordRows(stored, rank)
    assert rows.shape == (50, 4) and len(rows) == 50 and rows.dtype == np.float32
    words = np.array([3, 0, 49, 3])
    assert_bitwise_equal(rows[words], by_word[words])
    assert_bitwise_equal(np.asarray(rows), by_word)
    assert np.asarray(rows, dtype=np.float64).dtype == np.float64
    half = WordRows(stored.astype(np.float16))   # no rank: rows in word order; 16-bit read as float32
    assert half[words].dtype == np.float32 and np.array_equal(half[words], stored.astype(np.float16)[words])


def test_a_checkpoint_without_the_manifest_checksum_loads_and_is_replaced(tmp_path):
    """Checkpoints of earlier versions have no manifest_crc32: they load (without that check), and a
    save replaces them."""
    emb = cembed.Embedding(6, 2, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 1})
    doc = json.loads((tmp_path / "ck" / "MANIFEST.json").read_text())
    del doc["manifest_crc32"]
    (tmp_path / "ck" / "MANIFEST.json").write_text(json.dumps(doc))
    assert cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(6, 2)) == {"v": 1}
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 2})
    assert cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(6, 2)) == {"v": 2}


def test_an_empty_directory_made_where_an_interrupted_save_belongs_does_not_cost_the_checkpoint(
        tmp_path, monkeypatch):
    """A save interrupted between its two renames leaves only .ck.ready; an empty directory made at the
    path since (e.g. by a script's makedirs) must not make the next save delete .ready, the one copy."""
    emb = cembed.Embedding(6, 2, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 1})
    _interrupted_save(monkeypatch, tmp_path / "ck", emb, {"v": 2}, "ready")
    (tmp_path / "ck").mkdir()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "simulated full disk")

    monkeypatch.setattr(cembed.checkpoint, "_write_array", full_disk)   # the next save fails after recovering
    # (named as the checkpoint's, which stands: the message said only "No space left on device")
    with pytest.raises(OSError, match=r"simulated full disk while saving the checkpoint .*ck \(the previous "
                                      r"checkpoint there is intact\)") as failure:
        cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 3})
    assert failure.value.errno == errno.ENOSPC
    assert cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(6, 2)) == {"v": 2}
    with pytest.raises(OSError, match=r"while saving the checkpoint .*new \(nothing was saved\)"):
        cembed.save_checkpoint(tmp_path / "new", emb)
    assert not os.path.exists(tmp_path / "new")


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("error", [MemoryError(), OSError(errno.ENOMEM, "Cannot allocate memory")])
def test_a_load_that_runs_out_of_memory_changes_nothing(tmp_path, monkeypatch, mmap, error):
    """The optimizer was loaded first and the tables mapped (or copied) one after the other: running
    out of address space at the second table left the optimizer and the first table loaded, the
    second not. Every table is now mapped or copied before anything changes."""
    a, b = cembed.Embedding(20, 4, sparse=True, seed=0), cembed.Embedding(30, 4, seed=1)
    opt = optim.SparseAdam([a], lr=0.1)
    a.backward(np.ones((2, 4), np.float32), np.array([1, 2]), optimizer=opt)
    cembed.save_checkpoint(tmp_path / "ck", {"a": a, "b": b}, opt)
    a2, b2 = cembed.Embedding(20, 4, sparse=True, seed=5), cembed.Embedding(30, 4, seed=6)
    opt2 = optim.SparseAdam([a2], lr=0.1)
    weights = (a2.weight, b2.weight)
    real, calls = cembed.storage.map_array, []

    def failing(*args, **kwargs):
        calls.append(args[0])
        if sum("module." in os.fspath(c) for c in calls) == 2 and "module." in os.fspath(args[0]):
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(cembed.storage, "map_array", failing)
    with pytest.raises(type(error)):
        cembed.load_checkpoint(tmp_path / "ck", {"a": a2, "b": b2}, opt2, mmap=mmap)
    assert a2.weight is weights[0] and b2.weight is weights[1] and not opt2.state.get(a2)
    monkeypatch.setattr(cembed.storage, "map_array", real)
    cembed.load_checkpoint(tmp_path / "ck", {"a": a2, "b": b2}, opt2, mmap=mmap)
    assert_bitwise_equal(np.asarray(a2.weight), a.weight)
    assert opt2.state[a2]["step"] == 1


def test_a_ctrl_c_while_a_checkpoint_loads_is_delivered_once_tables_and_optimizer_are_loaded(
        tmp_path, monkeypatch, ctrl_c_raises):
    """The state_dir load holds a Ctrl-C back until the optimizer has switched: delivered there, it
    came between the optimizer (loaded) and the tables (not yet). It is now held until both are."""
    import signal

    saved_emb = cembed.Embedding(20, 4, sparse=True, seed=0)
    saved_opt = optim.SparseAdam([saved_emb], lr=0.1)
    saved_emb.backward(np.ones((1, 4), np.float32), np.array([1]), optimizer=saved_opt)
    cembed.save_checkpoint(tmp_path / "ck", {"w": saved_emb}, saved_opt)
    emb = cembed.Embedding(20, 4, sparse=True, seed=5)
    opt = optim.SparseAdam([emb], lr=0.1, state_dir=tmp_path / "state")
    for _ in range(4):
        emb.backward(np.ones((1, 4), np.float32), np.array([2]), optimizer=opt)
    real = opt._unhooked_load_state_dict

    def interrupted(state_dict):
        os.kill(os.getpid(), signal.SIGINT)   # a Ctrl-C while the optimizer's state is being loaded
        real(state_dict)

    monkeypatch.setattr(opt, "_unhooked_load_state_dict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cembed.load_checkpoint(tmp_path / "ck", {"w": emb}, opt, mmap=False)
    assert opt.state[emb]["step"] == 1
    assert_bitwise_equal(emb.weight, saved_emb.weight)


def test_a_manifest_whose_own_checksum_is_null_or_that_lists_what_a_checkpoint_cannot_hold(tmp_path):
    emb = cembed.Embedding(6, 2, seed=0)
    cembed.save_checkpoint(tmp_path / "ck", emb, extra={"v": 1})
    doc = json.loads((tmp_path / "ck" / "MANIFEST.json").read_text())
    doc["manifest_crc32"] = None
    doc["meta"]["extra"]["v"] = 9
    (tmp_path / "ck" / "MANIFEST.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="manifest_crc32 must be an int"):
        cembed.load_checkpoint(tmp_path / "ck", cembed.Embedding(6, 2))
    user = tmp_path / "user"
    (user / "data").mkdir(parents=True)
    (user / "data" / "precious.txt").write_text("keep")
    (user / "MANIFEST.json").write_text(json.dumps({"format": "cembed.checkpoint/1", "files": {"data": {}}}))
    with pytest.raises(ValueError, match="not a cembed checkpoint"):
        cembed.save_checkpoint(user, emb)
    assert (user / "data" / "precious.txt").read_text() == "keep"


def test_a_failed_write_back_to_tables_on_disk_comes_after_every_table_is_loaded(tmp_path, monkeypatch):
    """Two tables on disk; writing the first one's values back to its file fails (an I/O error at
    msync). Both tables and the optimizer hold the checkpoint, and the OSError names the file. It came
    between the two tables: the second was left as it was while the optimizer was loaded."""
    saved = {name: cembed.Embedding(30, 4, sparse=True, seed=seed) for seed, name in enumerate("ab")}
    saved_opt = optim.SparseAdam(list(saved.values()), lr=0.1)
    for module in saved.values():
        module.backward(np.ones((2, 4), np.float32), np.array([1, 7]), optimizer=saved_opt)
    cembed.save_checkpoint(tmp_path / "ck", saved, saved_opt)
    tables = {name: cembed.open_table(tmp_path / f"{name}.npy", 30, 4, init="normal", seed=9) for name in "ab"}
    fresh = {name: cembed.Embedding.from_pretrained(tables[name], freeze=False, sparse=True) for name in "ab"}
    opt = optim.SparseAdam(list(fresh.values()), lr=0.1)
    real = np.memmap.flush

    def flush(self):
        if os.path.basename(cembed.storage.backing_file(self)) == "a.npy":
            raise OSError(5, "Input/output error (injected)")
        real(self)

    monkeypatch.setattr(np.memmap, "flush", flush)
    with pytest.raises(OSError, match=r"a\.npy: .*Input/output error"):
        cembed.load_checkpoint(tmp_path / "ck", fresh, opt)
    for name in "ab":
        assert fresh[name].weight is tables[name]
        assert_bitwise_equal(np.asarray(fresh[name].weight), saved[name].weight)
    assert opt.state[fresh["b"]]["step"] == 1


def test_a_checkpoint_saved_while_another_thread_trains_loads(tmp_path):
    """Found by a review of use from several threads: a block of a table was read twice — by the
    CRC-32, then by the write — so a save beside a training thread recorded a checksum of other bytes
    than it wrote, reported success, and every load refused the checkpoint. Each block is now copied
    once into a private buffer, summed and written from it: the checkpoint holds some mix of the
    table's values (a data race, as in torch) and loads."""
    import threading

    n_rows, dim = 50_000, 32
    emb = cembed.Embedding(n_rows, dim, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.01)
    stop = threading.Event()

    def train():
        rng = np.random.default_rng(1)
        while not stop.is_set():
            idx = rng.integers(0, n_rows, 20_000)
            emb.backward(np.ones((idx.size, dim), np.float32), idx, optimizer=opt)

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        for k in range(4):
            cembed.save_checkpoint(tmp_path / f"c{k}", {"e": emb})
    finally:
        stop.set()
        trainer.join()
    for k in range(4):
        cembed.load_checkpoint(tmp_path / f"c{k}", {"e": cembed.Embedding(n_rows, dim, sparse=True)})
