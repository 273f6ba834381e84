"""Crash-safe checkpoints as directories: one ``.npy`` file per array plus a JSON manifest.

Two layers, both public and documented in ``docs/storage.md``:

* the **directory format** — :func:`write_directory` / :func:`read_directory` /
  :func:`open_array`: named arrays and a JSON document, written to a temporary sibling directory,
  every file and the directory synced, then swapped into place so that a crash at any moment leaves
  a complete, loadable checkpoint (the recovery rule is in :func:`find_directory`); every file
  carries a CRC-32 that loading verifies;
* **module / optimizer checkpoints** — :func:`save_checkpoint` / :func:`load_checkpoint`: the tables of
  named modules and an optimizer's complete state, built on the directory format.

Loading checks everything (manifest, files, checksums, shapes against the modules, the optimizer's
state) before it changes any module or optimizer.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import zlib
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

import numpy as np
from numpy.lib import format as npy_format

from . import storage
from ._validation import check_bool

__all__ = ["save_checkpoint", "load_checkpoint", "write_directory", "read_directory", "open_array",
           "find_directory", "check_replaceable", "CheckpointError", "FORMAT", "MANIFEST", "CHECKSUM"]

PathLike = Union[str, "os.PathLike[str]"]

#: The format tag of a checkpoint directory's manifest (bumped on incompatible changes).
FORMAT = "cembed.checkpoint/1"
#: The manifest's file name inside a checkpoint directory.
MANIFEST = "MANIFEST.json"
#: The checksum of every file: CRC-32 (``zlib.crc32``) of the whole file, header included.
CHECKSUM = "crc32"
#: The manifest's own checksum: CRC-32 of its other entries as canonical JSON (:func:`_sealed`).
MANIFEST_CHECKSUM = "manifest_crc32"
_CHUNK = 8 << 20
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, malformed, corrupted, or not fitting the modules
    and optimizer it is loaded into. The message names the directory or file."""


# ------------------------------------------------------------------------------------ the directory

#: A save's own sibling directories are named ``.<name>.<kind>-<token>``, the token random per save
#: and recorded in the save's journal: no directory of the user's can be taken for one of them.
_TOKEN = re.compile(r"[0-9a-f]{16}")


def _aside(path: str, kind: str, token: str) -> str:
    """The save ``token``'s sibling of ``path``: ``kind`` "tmp" (being written), "ready" (complete,
    not yet in place) or "old" (the checkpoint it replaced, being removed)."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.{kind}-{token}")


def _legacy_ready(path: str) -> str:
    """Where saves of cembed before 2026-11-26 left a complete checkpoint not yet in place."""
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.ready")


def _legacy_checkpoint(path: str) -> bool:
    """Whether ``.<name>.ready`` is such a checkpoint: a directory (not a link) holding a cembed
    manifest and nothing but the files it lists. Anything else there is the user's: never moved."""
    ready = _legacy_ready(path)
    if os.path.islink(ready) or not os.path.isdir(ready):
        return False
    try:
        return _foreign_files(ready) == []
    except OSError:
        return False


def _norm(path: PathLike) -> str:
    """The checkpoint's absolute path, symbolic links resolved: a save replaces the directory a link
    names (beside it go the save's siblings and its lock), never the link itself, and two names of
    one directory share one lock."""
    path = os.path.realpath(os.path.abspath(os.fspath(path)))
    if os.path.basename(path) in ("", ".", ".."):
        raise ValueError(f"{path}: a checkpoint path must name a directory entry")
    return path


def find_directory(path: PathLike) -> str:
    """The directory that holds the checkpoint saved at ``path``.

    The recovery rule: ``path`` itself when it holds a manifest; otherwise the complete sibling
    ``.<name>.ready-<token>`` that a save interrupted between its two renames left behind (it is
    complete: it is renamed to ``ready`` only after every file in it was synced; the token is the
    save's, from its journal); otherwise a :class:`CheckpointError`.

    Examples
    --------
    >>> import os, tempfile, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.checkpoint.write_directory(path, {}, {"note": "hi"})
    >>> cembed.checkpoint.find_directory(path) == os.path.realpath(path)
    True
    """
    path = _norm(path)
    candidates = [path] + [_aside(path, "ready", t) for t in reversed(_tokens(path))]
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            return candidate
        if candidate == path and os.path.lexists(os.path.join(path, MANIFEST)):
            return candidate   # (a MANIFEST.json that is not a file: reading it says what it is)
    if _legacy_checkpoint(path):
        return _legacy_ready(path)
    raise CheckpointError(f"{path}: no checkpoint there (no {MANIFEST}, and no interrupted save to recover)")


def _fsync_file(fh: Any) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _lock_path(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}.lock")


def _lock(path: str) -> Any:
    """An exclusive lock on ``.<name>.lock`` beside ``path`` for the length of a save. The file also
    holds the save's journal (:func:`_record`); it is never followed if a link (a journal written
    through a link would overwrite the file it names)."""
    lock = _lock_path(path)
    try:
        fd = _open_lock(lock, os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise ValueError(_lock_file_problem(lock, path, os.lstat(lock))) from None
        raise
    problem = _lock_file_problem(lock, path, os.fstat(fd))
    if problem is not None:
        os.close(fd)
        raise ValueError(problem)
    fh = os.fdopen(fd, "r+b", buffering=0)   # (unbuffered: a journal line that cannot be written fails in
    try:                                      # _record, never again when the lock is closed)
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    except ImportError:  # pragma: no cover - no flock on this platform
        pass
    return fh


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)   # (a FIFO named like the lock is refused, not waited on)


def _open_lock(lock: str, flags: int) -> int:
    """``os.open`` of the lock file, never through a symbolic link and never waiting on a FIFO. A
    lease on it (an NFS delegation, a Samba oplock) makes the non-blocking open fail at once: then it
    waits for the lease to be broken, as a plain open does."""
    try:
        return os.open(lock, flags | _NOFOLLOW | _NONBLOCK, 0o666)
    except BlockingIOError:
        return os.open(lock, flags | _NOFOLLOW, 0o666)


def _lock_file_problem(lock: str, path: str, status: os.stat_result) -> Optional[str]:
    """None when ``lock`` (whose status is ``status``, not followed if a link) is a regular file of
    its own, as a save to ``path`` needs for its journal; else why not, and what to do: a link still
    holds the journal of an interrupted save, so it is replaced by a copy."""
    if stat.S_ISREG(status.st_mode) and status.st_nlink <= 1:
        return None
    if stat.S_ISREG(status.st_mode) or stat.S_ISLNK(status.st_mode):
        kind = "a hard link" if stat.S_ISREG(status.st_mode) else "a symbolic link"
        return (f"{lock} is not a file of its own ({kind}): a save to {path} writes its journal there; replace it by "
                f"a copy (cp {lock} {lock}.copy && mv {lock}.copy {lock}), which keeps the journal")
    return f"{lock} is not a file of its own (not a regular file): a save to {path} locks a file of that name (move it away)"


@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """A shared lock on the checkpoint's lock file while a load reads and maps it: a save holds the
    lock exclusively from before its first change to after its last, so a load never meets half of
    one. None where there is no lock file, or it is not a regular file (no save can run there)."""
    fd = -1
    try:
        fd = _open_lock(_lock_path(path), os.O_RDONLY)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH)
    except (OSError, ImportError):
        pass
    try:
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _record(lock: Any, token: str) -> None:
    """Append the token of a save about to make its sibling directories (``_aside``) to the journal
    in its lock file, synced before the first is made: the next save (or load) finds them by it.
    Appended, one JSON line each, never rewritten: a crash while recording loses only a line whose
    save had made nothing yet."""
    lock.seek(0, os.SEEK_END)   # (on a line of its own, whatever the file ended with)
    line = memoryview(b"\n" + json.dumps({"save": token}).encode() + b"\n")
    while line:   # (the lock file is unbuffered: a write may take part of the line)
        written = lock.write(line)
        if not written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), getattr(lock, "name", None))
        line = line[written:]
    os.fsync(lock.fileno())


def _clear_journal(lock: Any) -> None:
    """Empty the journal: done when no directory of the saves it records is left."""
    lock.seek(0)
    lock.truncate()
    lock.flush()


def _tokens(path: str) -> List[str]:
    """The tokens of the saves the journal beside ``path`` records, oldest first (none when there is
    no journal; a line that cannot be read counts for nothing)."""
    try:
        fd = _open_lock(_lock_path(path), os.O_RDONLY)
        with open(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return []
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - (1 << 20)))   # (the newest records: the journal grows only by crashed saves)
            lines = fh.read(1 << 20).split(b"\n")
    except OSError:
        return []
    found = []
    for line in lines:
        try:
            recorded = json.loads(line.decode())
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        token = recorded.get("save") if isinstance(recorded, dict) else None
        if isinstance(token, str) and _TOKEN.fullmatch(token):
            found.append(token)
    return found


def _write_array(directory: str, filename: str, array: np.ndarray) -> Dict[str, Any]:
    """Write ``array`` to ``directory/filename`` as ``.npy`` in bounded blocks, computing the CRC of
    the bytes as they are written; returns the file's manifest entry. A read-only memory map of a
    whole file of a checkpoint (a frozen table loaded from a checkpoint with ``mmap=True``) is
    hard-linked instead of copied, with the checksum that checkpoint recorded; any other file is
    copied (a table file may be opened read-write later: a link would let training write into the
    checkpoint)."""
    dst = os.path.join(directory, filename)
    logical = {"logical_dtype": array.dtype.name} if array.dtype != storage.file_dtype(array.dtype) else {}
    stored = storage.to_file(array)   # bfloat16 as its uint16 bits, its dtype in the manifest entry
    linked = _link_checkpoint_file(array, dst)
    if linked is not None:
        size, crc = linked
        return {"shape": list(array.shape), "dtype": npy_format.dtype_to_descr(stored.dtype), "bytes": size,
                CHECKSUM: crc, **logical}
    crc = 0
    with open(dst, "wb") as fh:
        header = _header_bytes(array.shape, stored.dtype)
        crc = zlib.crc32(header, crc)
        fh.write(header)
        # each block is copied into a private buffer, then summed and written from it: the bytes summed are
        # the bytes written even while another thread updates the table (a view was read twice — by the
        # CRC, then by the write — and a checkpoint saved beside training failed its load's checksum)
        if array.ndim == 0:
            blocks: Iterator[np.ndarray] = iter([np.array(array, copy=True).reshape(1)])
        else:
            row_bytes = array.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
            step = max(1, _CHUNK // max(1, row_bytes))
            scratch = np.empty((min(step, array.shape[0]),) + array.shape[1:], dtype=array.dtype)

            def copied(lo: int) -> np.ndarray:
                part = scratch[:min(step, array.shape[0] - lo)]
                np.copyto(part, array[lo:lo + step])
                return part
            blocks = (copied(lo) for lo in range(0, array.shape[0], step))
        for block in blocks:
            raw = block.reshape(-1).view(np.uint8)
            crc = zlib.crc32(raw.data, crc)
            fh.write(raw.data)
        _fsync_file(fh)
        size = fh.tell()
    return {"shape": list(array.shape), "dtype": npy_format.dtype_to_descr(stored.dtype), "bytes": size,
            CHECKSUM: crc, **logical}


def _link_checkpoint_file(array: np.ndarray, dst: str) -> Optional[Tuple[int, int]]:
    """Hard-link the checkpoint file that the read-only map ``array`` maps whole to ``dst``; returns
    (size, recorded CRC), or None (nothing linked: copy it) when ``array`` is not a map cembed made
    read-only of a whole file (a copy-on-write map holds its changes in private pages, and a read-write
    map made read-only later may have written into the file since its checksum was recorded), the file
    at its name is no longer the mapped file, the file is not in a checkpoint (no recorded checksum),
    or the link fails (another file system)."""
    if array.flags.writeable or not storage.maps_file_read_only(array):
        return None
    src = storage.backing_file(array)   # checks that the name still names the mapped file
    known = storage.mapped_file_id(array)
    if src is None or known is None:
        return None
    size = os.stat(src).st_size
    crc = _known_crc(src, size)
    if crc is None:
        return None
    try:
        os.link(src, dst)
    except OSError:
        return None  # another file system, or links not supported: copy it
    status = os.stat(dst)
    if (status.st_dev, status.st_ino) != known or status.st_size != size:   # replaced meanwhile
        os.unlink(dst)
        return None
    return size, crc


def _header_bytes(shape: Tuple[int, ...], dtype: np.dtype) -> bytes:
    import io

    buffer = io.BytesIO()
    npy_format.write_array_header_2_0(buffer, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                                               "shape": tuple(int(s) for s in shape)})
    return buffer.getvalue()


def _file_crc(path: str) -> int:
    crc = 0
    with storage.open_regular(path) as fh:
        while True:
            block = fh.read(_CHUNK)
            if not block:
                return crc
            crc = zlib.crc32(block, crc)


def _known_crc(src: str, size: int) -> Optional[int]:
    """The CRC the manifest of ``src``'s checkpoint directory records for it (same size), if any: a
    hard-linked file keeps its recorded checksum, so a file corrupted since is still detected. Only a
    manifest that passes every check a load makes (its own CRC-32 included) is believed: a damaged
    one's recorded CRC would make the new checkpoint unloadable (the file is then copied, its CRC
    computed anew)."""
    try:
        entry = _manifest(os.path.dirname(src))["files"].get(os.path.basename(src))
    except CheckpointError:
        return None
    return int(entry[CHECKSUM]) if entry is not None and entry["bytes"] == size else None


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name or name.startswith(".") or not set(name) <= _SAFE or name == MANIFEST:
        raise ValueError(f"{what} {name!r} must be a non-empty string of letters, digits, '_', '-' and '.' "
                         "(not starting with '.')")
    return name


def write_directory(path: PathLike, arrays: Mapping[str, np.ndarray], meta: Any) -> str:
    """Write the arrays (``<name>.npy`` each) and the JSON document ``meta`` as the checkpoint
    directory ``path``, crash-safely; returns the absolute path.

    The steps (``docs/storage.md``): record a random token in the journal (the lock file
    ``.<name>.lock`` beside ``path``, which also serialises saves to one path); write everything
    into a new sibling ``.<name>.tmp-<token>``, syncing every file, the manifest last, and the
    directory; rename it to ``.<name>.ready-<token>``; rename an existing ``path`` aside to
    ``.<name>.old-<token>``; rename ``ready`` to ``path``; sync the parent; remove ``old``. A crash
    at any point leaves ``path`` or ``ready`` complete, and :func:`find_directory` finds it; the next
    save removes what the saves the journal records left, and nothing else.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory (a symbolic link is resolved). An existing directory there must be
        empty or a checkpoint holding only its manifest and the files it lists: it is replaced.
    arrays : mapping of str to numpy.ndarray
        Names (letters, digits, ``_ - .``) to arrays of any shape and a dtype of numbers (bool,
        integers, floats, complex, bfloat16; not structured, object or string). Each is written
        in bounded blocks; a read-only map of a whole file of a checkpoint (``open_array``, a frozen
        table loaded with ``mmap=True``) is hard-linked instead (no copy; its recorded checksum is
        kept), when the file at its name is still the file that was mapped.
    meta : JSON-serialisable
        Stored in the manifest under ``"meta"``.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.checkpoint.write_directory(path, {"table": np.eye(3)}, {"step": 7})
    >>> meta, files = cembed.checkpoint.read_directory(path)
    >>> meta, cembed.checkpoint.open_array(path, "table")[1]
    ({'step': 7}, memmap([0., 1., 0.]))
    """
    path = _norm(path)
    for name in arrays:
        _check_name(name, "array name")
    try:
        meta_json = json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {exc}") from None
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray):
            raise TypeError(f"array {name!r} must be a numpy.ndarray, got {type(array).__name__}")
        stored = storage.file_dtype(array.dtype) if array.dtype.kind == "V" else array.dtype   # (bfloat16: bits)
        if stored.kind not in "biufc" or stored.fields is not None or stored.subdtype is not None:
            raise TypeError(f"array {name!r} has dtype {array.dtype}: a checkpoint holds arrays of numbers (bool, "
                            "integers, floats, complex; bfloat16), which it reads back as they were written")
    parent = os.path.dirname(path)
    _check_replaceable(path)   # refused before even the lock file is made
    os.makedirs(parent, exist_ok=True)
    lock = _lock(path)
    try:
        _check_replaceable(path)   # again, under the lock
        _recover(path)
        token = os.urandom(8).hex()
        tmp, ready, old = (_aside(path, kind, token) for kind in ("tmp", "ready", "old"))
        try:
            _record(lock, token)   # (a full disk here too is named as the checkpoint's)
            os.mkdir(tmp, 0o700)
            files = {}
            for name, array in arrays.items():
                files[f"{name}.npy"] = _write_array(tmp, f"{name}.npy", array)
            manifest = _sealed({"format": FORMAT, "checksum": CHECKSUM, "files": files, "meta": json.loads(meta_json)})
            with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1, allow_nan=True)
                _fsync_file(fh)
            os.chmod(tmp, 0o777 & ~storage._umask())  # (made 0700 while being written; a checkpoint is not private)
            storage.fsync_directory(tmp)
            os.rename(tmp, ready)
        except OSError as exc:   # (a full disk: named as the checkpoint's, whose previous version stands)
            shutil.rmtree(tmp, ignore_errors=True)
            what = "the previous checkpoint there is intact" if os.path.lexists(path) else "nothing was saved"
            raise OSError(exc.errno, f"{exc.strerror or exc} while saving the checkpoint {path} ({what})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        storage.fsync_directory(parent)
        if os.path.lexists(path):
            os.rename(path, old)
        os.rename(ready, path)
        storage.fsync_directory(parent)
        shutil.rmtree(old, ignore_errors=True)
        if not os.path.lexists(old):
            _clear_journal(lock)
    finally:
        lock.close()
    return path


def check_replaceable(path: PathLike) -> None:
    """ValueError unless a save could replace ``path`` (free, an empty directory, or a cembed
    checkpoint holding only its own files, and its lock ``.<name>.lock`` absent or a regular file; see
    :func:`write_directory`): a check a program can make
    before work whose result it will save there.

    Examples
    --------
    >>> import os, tempfile, cembed
    >>> cembed.checkpoint.check_replaceable(os.path.join(tempfile.mkdtemp(), "ckpt"))   # free: fine
    """
    _check_replaceable(_norm(path))


def _check_replaceable(path: str) -> None:
    """ValueError unless ``path`` is free, an empty directory, or a cembed checkpoint holding nothing
    but its manifest and the files it lists: a save replaces the directory whole, so anything else
    there (a directory that merely has a file named MANIFEST.json, a file someone put into a
    checkpoint) would be deleted."""
    lock = _lock_path(path)
    try:
        status = os.lstat(lock)
    except FileNotFoundError:
        pass
    else:   # (a link, even a hard one, too: a save writes its journal there)
        problem = _lock_file_problem(lock, path, status)
        if problem is not None:
            raise ValueError(problem)
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path):
        raise ValueError(f"{path} exists and is not a cembed checkpoint: refusing to replace it")
    if not os.listdir(path):
        return
    others = _foreign_files(path)
    if others is None:
        if os.path.lexists(os.path.join(path, MANIFEST)):
            raise ValueError(f"{path} holds a {MANIFEST} that is not a cembed checkpoint's "
                             f"({_listing(path)[1]}): refusing to replace it (a damaged checkpoint: remove it or "
                             "save elsewhere)")
        raise ValueError(f"{path} exists and is not a cembed checkpoint: refusing to replace it")
    if others:
        raise ValueError(f"{path} holds files that are not part of its checkpoint ({', '.join(others[:5])}"
                         f"{', ...' if len(others) > 5 else ''}): a save would delete them; move them away first")


def _foreign_files(directory: str) -> Optional[List[str]]:
    """None when ``directory`` holds no cembed checkpoint manifest, else the names it holds besides
    the manifest and the files it lists (sorted; none for a checkpoint of its own files only)."""
    entries = set(os.listdir(directory))
    listed = _listed_files(directory) if MANIFEST in entries else None
    if listed is None:
        return None
    # a directory (not a link to one) at a listed name is not the checkpoint's file: replacing the
    # checkpoint would delete what it holds
    folders = {name for name in entries if os.path.isdir(os.path.join(directory, name))
               and not os.path.islink(os.path.join(directory, name))}
    return sorted((entries - listed - {MANIFEST} - folders) | {f"{name}/" for name in folders})


def _listed_files(path: str) -> Optional[Set[str]]:
    """The file names the manifest in ``path`` lists when it is a cembed checkpoint manifest (its
    format tag and a file table; the rest is not judged here: a checkpoint this version would refuse
    to load, an older one, or one whose other entries are damaged, can still be replaced by a save),
    else None."""
    return _listing(path)[0]


def _listing(path: str) -> Tuple[Optional[Set[str]], str]:
    """``(_listed_files(path), why it is None)``."""
    try:
        with storage.open_regular(os.path.join(path, MANIFEST)) as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:
        return None, f"unreadable: {type(exc).__name__}: {exc}"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        return None, f"not a {FORMAT} manifest with a file table"
    listed = set()
    for name in manifest["files"]:   # only names a checkpoint can hold (never a subdirectory of the user's)
        bad = (None, f"it lists {name!r}, a name no checkpoint file has")
        if not isinstance(name, str) or not name.endswith(".npy"):
            return bad
        try:
            _check_name(name[:-4], "file")
        except ValueError:
            return bad
        listed.add(name)
    return listed, ""


def _remove(entry: str) -> None:
    """Remove a save's leftover sibling: a directory tree, or a file or link in its place."""
    if os.path.isdir(entry) and not os.path.islink(entry):
        shutil.rmtree(entry, ignore_errors=True)
    else:
        try:
            os.unlink(entry)
        except OSError:
            pass


def _recover(path: str) -> None:
    """Before a save (under the lock): finish what an interrupted save left behind — a complete
    ``ready`` sibling with no ``path`` becomes ``path`` — then remove every sibling directory of the
    saves the journal records. Nothing else is touched (a user's ``.<name>.old`` is not a save's)."""
    parent = os.path.dirname(path)
    tokens = _tokens(path)
    legacy = [_legacy_ready(path)] if _legacy_checkpoint(path) else []
    for ready in [_aside(path, "ready", t) for t in reversed(tokens)] + legacy:
        if os.path.isfile(os.path.join(ready, MANIFEST)) and not os.path.islink(ready):
            if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
                os.rmdir(path)   # an empty directory made where the interrupted save's result belongs
            if not os.path.lexists(path):
                os.rename(ready, path)
                storage.fsync_directory(parent)
            break
    for token in tokens:
        for kind in ("tmp", "ready", "old"):
            if os.path.lexists(_aside(path, kind, token)):
                _remove(_aside(path, kind, token))


def _canonical_crc(body: Dict[str, Any]) -> int:
    """CRC-32 of ``body`` as canonical JSON (sorted keys, no spaces): the same for the dict written
    and the dict read back (JSON numbers, strings and NaN round-trip exactly)."""
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode("utf-8"))


def _sealed(manifest: Dict[str, Any]) -> Dict[str, Any]:
    """``manifest`` with its own checksum (``MANIFEST_CHECKSUM``) added: the one file a checkpoint's
    file checksums do not cover (a bit flip in a recorded step or option is caught too)."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CHECKSUM}
    return {**body, MANIFEST_CHECKSUM: _canonical_crc(body)}


def _manifest(directory: str) -> Dict[str, Any]:
    where = os.path.join(directory, MANIFEST)
    try:
        with storage.open_regular(where) as fh:
            manifest = json.loads(fh.read().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as exc:   # (RecursionError: absurd nesting)
        raise CheckpointError(f"{where}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{where}: not a {FORMAT} manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    unknown = sorted(str(k) for k in manifest if k not in ("format", "checksum", "files", "meta", MANIFEST_CHECKSUM))
    if unknown:   # (a damaged key name too: the manifest's own checksum is then not skipped unnoticed)
        raise CheckpointError(f"{where}: malformed manifest (unknown entries {', '.join(unknown)})")
    absent = MANIFEST_CHECKSUM not in manifest   # (absent in checkpoints of cembed before 2026-11-26)
    recorded = manifest.pop(MANIFEST_CHECKSUM, None)
    if not absent and type(recorded) is not int:
        raise CheckpointError(f"{where}: malformed manifest ({MANIFEST_CHECKSUM} must be an int)")
    try:
        actual = _canonical_crc(manifest)
    except (TypeError, ValueError, RecursionError):   # pragma: no cover - what json.loads made dumps again
        actual = None
    if not absent and actual != recorded:
        raise CheckpointError(f"{where}: the manifest does not match its own CRC-32 ({MANIFEST_CHECKSUM} "
                              f"{recorded}, computed {actual}): corrupted or edited")
    if manifest.get("checksum") != CHECKSUM or not isinstance(manifest.get("files"), dict) or "meta" not in manifest:
        raise CheckpointError(f"{where}: malformed manifest (needs 'checksum': {CHECKSUM!r}, 'files' and 'meta')")
    for fname, entry in manifest["files"].items():
        ok = (isinstance(fname, str) and fname.endswith(".npy") and isinstance(entry, dict)
              and isinstance(entry.get("shape"), list)
              and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
              and isinstance(entry.get("dtype"), str) and isinstance(entry.get("bytes"), int)
              and isinstance(entry.get(CHECKSUM), int)
              and entry.get("logical_dtype", "bfloat16") == "bfloat16")
        if ok:
            try:
                _check_name(fname[:-4], "file")
            except ValueError:
                ok = False
        if not ok:
            raise CheckpointError(f"{where}: malformed entry for file {fname!r}")
    return manifest


def read_directory(path: PathLike, verify: bool = True) -> Tuple[Any, Dict[str, Tuple[str, storage.NpyHeader]]]:
    """Read and check the checkpoint at ``path`` (found with :func:`find_directory`): returns
    ``(meta, {name: (file path, header)})``.

    Every file listed in the manifest must exist, hold the shape and dtype the manifest records,
    have exactly the recorded size and (with ``verify``, the default) the recorded CRC-32; nothing
    else is read into memory.

    Raises
    ------
    CheckpointError
        Naming the directory or the first bad file (missing, truncated, checksum mismatch, ...).

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.checkpoint.write_directory(path, {"v": np.arange(3.0)}, None)
    >>> with open(os.path.join(path, "v.npy"), "r+b") as fh:
    ...     _ = fh.seek(-1, 2); _ = fh.write(b"x")       # corrupt the last byte
    >>> cembed.checkpoint.read_directory(path)
    Traceback (most recent call last):
    ...
    cembed.checkpoint.CheckpointError: .../v.npy: checksum mismatch (crc32 ... recorded ...): the file is corrupted
    """
    verify = check_bool(verify, "verify")
    with _reading(_norm(path)):
        return _read_directory(path, verify)


def _read_directory(path: PathLike, verify: bool) -> Tuple[Any, Dict[str, Tuple[str, storage.NpyHeader]]]:
    directory = find_directory(path)
    manifest = _manifest(directory)
    files: Dict[str, Tuple[str, storage.NpyHeader]] = {}
    for fname, entry in manifest["files"].items():
        where = os.path.join(directory, fname)
        try:
            size = os.stat(where).st_size
        except OSError as exc:
            raise CheckpointError(f"{where}: missing or unreadable ({exc.strerror or exc})") from None
        if size != entry["bytes"]:
            raise CheckpointError(f"{where}: {size} bytes, the manifest records {entry['bytes']} (truncated or "
                                  "overwritten)")
        try:
            header = storage.read_header(where)
        except (OSError, ValueError) as exc:
            raise CheckpointError(str(exc)) from None
        if list(header.shape) != entry["shape"] or npy_format.dtype_to_descr(header.dtype) != entry["dtype"]:
            raise CheckpointError(f"{where}: holds {header.shape} {header.dtype}, the manifest records "
                                  f"{tuple(entry['shape'])} {entry['dtype']}")
        if "logical_dtype" in entry:   # bfloat16, stored as its uint16 bits (storage.file_dtype)
            try:
                header = storage._logical(header, entry["logical_dtype"], where)
            except TypeError as exc:
                raise CheckpointError(str(exc)) from None
        if verify:
            crc = _file_crc(where)
            if crc != entry[CHECKSUM]:
                raise CheckpointError(f"{where}: checksum mismatch ({CHECKSUM} {crc:#010x}, recorded "
                                      f"{entry[CHECKSUM]:#010x}): the file is corrupted")
        files[fname[:-4]] = (where, header)
    return manifest["meta"], files


def open_array(path: PathLike, name: str, mode: str = "r") -> np.memmap:
    """Map the array ``name`` of the checkpoint at ``path`` (``mode`` ``"r"`` or ``"c"``; a
    checkpoint's files are never written in place; nor may anyone truncate or overwrite the file
    while it is mapped: SIGBUS). Checks its header, not its checksum (see :func:`read_directory`). A bfloat16 array (stored as its ``uint16`` bits, its dtype in the
    manifest) is mapped as bfloat16.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.checkpoint.write_directory(path, {"v": np.arange(3)}, None)
    >>> cembed.checkpoint.open_array(path, "v").tolist()
    [0, 1, 2]
    """
    if mode not in ("r", "c"):
        raise ValueError(f"mode must be 'r' or 'c', got {mode!r}")
    _check_name(name, "array name")
    with _reading(_norm(path)):
        directory = find_directory(path)
        entry = _manifest(directory)["files"].get(f"{name}.npy", {})
        return storage.map_array(os.path.join(directory, f"{name}.npy"), mode, dtype=entry.get("logical_dtype"))


# ------------------------------------------------------------------------------------ modules + optimizer

def _named_modules(modules: Any) -> Dict[str, Any]:
    if isinstance(modules, Mapping):
        named = dict(modules)
    elif hasattr(modules, "weight"):
        named = {"0": modules}
    else:
        named = {str(i): m for i, m in enumerate(modules)}
    seen: Dict[int, str] = {}
    for name, module in named.items():
        _check_name(name, "module name")
        if not hasattr(module, "weight") or not isinstance(module.weight, np.ndarray):
            raise TypeError(f"module {name!r} must have a .weight ndarray, got {type(module).__name__}")
        if module.weight.ndim != 2:
            raise ValueError(f"module {name!r}: weight must be 2-D, got shape {module.weight.shape}")
        if id(module) in seen:
            raise ValueError(f"module {name!r} is the same object as module {seen[id(module)]!r}")
        seen[id(module)] = name
    return named


def _module_options(module: Any) -> Dict[str, Any]:
    options = {name: getattr(module, name, None) for name in getattr(module, "_options", ())}
    options["requires_grad"] = getattr(module, "requires_grad", None)
    try:
        json.dumps(options, allow_nan=True)
        return options
    except (TypeError, ValueError):
        return {k: repr(v) for k, v in options.items()}


def _optimizer_modules(optimizer: Any) -> List[Any]:
    return [m for group in optimizer.param_groups for m in group["params"]]


def save_checkpoint(path: PathLike, modules: Any, optimizer: Any = None, extra: Any = None) -> str:
    """Save the tables of ``modules`` and the complete state of ``optimizer`` as the checkpoint
    directory ``path``, crash-safely (see :func:`write_directory`); returns its absolute path.

    Parameters
    ----------
    path : str or os.PathLike
    modules : mapping of str to module, sequence of modules, or one module
        Anything with a 2-D ``.weight`` (:class:`cembed.Embedding`, :class:`cembed.EmbeddingBag`).
        Names (a mapping's keys; ``"0"``, ``"1"``, ... for a sequence) identify the tables at load.
    optimizer : cembed.optim.Optimizer, optional
        Its hyper-parameters, step counters and state arrays are saved; every parameter it holds
        must be one of ``modules``.
    extra : JSON-serialisable, optional
        Anything else to keep (epoch, data position, ...): returned by :func:`load_checkpoint`.

    Notes
    -----
    A table is copied into the checkpoint in bounded blocks (a table on disk is streamed, never
    read whole into memory) — except a frozen table that is a read-only map of a checkpoint's file
    (loaded with ``load_checkpoint(..., mmap=True)``), which is hard-linked: the same data is never
    stored twice, and its recorded checksum travels with it. Every other table is copied, also a
    read-only ``open_table(..., mode="r")`` table: its file may be opened read-write and trained
    later, and a checkpoint's files are never written to afterwards, so training cannot damage it.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> emb = cembed.Embedding(100, 8, sparse=True, seed=0)
    >>> opt = cembed.optim.SparseAdam(emb.parameters(), lr=0.01)
    >>> emb.backward(np.ones((2, 8), np.float32), np.array([1, 5]), optimizer=opt)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.save_checkpoint(path, {"words": emb}, opt, extra={"epoch": 1})
    >>> sorted(os.listdir(path))
    ['MANIFEST.json', 'module.words.npy', 'optim.0.exp_avg.npy', 'optim.0.exp_avg_sq.npy']
    """
    named = _named_modules(modules)
    arrays: Dict[str, np.ndarray] = {}
    modules_meta: Dict[str, Any] = {}
    for name, module in named.items():
        arrays[f"module.{name}"] = module.weight
        modules_meta[name] = {"class": type(module).__name__, "array": f"module.{name}",
                              "dtype": module.weight.dtype.name, "options": _module_options(module)}
    optimizer_meta = None
    if optimizer is not None:
        if not hasattr(optimizer, "_serialized"):
            raise TypeError(f"optimizer must be a cembed.optim optimizer, got {type(optimizer).__name__}")
        by_id = {id(m): name for name, m in named.items()}
        params = []
        for i, module in enumerate(_optimizer_modules(optimizer)):
            if id(module) not in by_id:
                raise ValueError(f"the optimizer's parameter {i} ({type(module).__name__}) is not among the modules "
                                 "being saved: pass every module the optimizer holds")
            params.append(by_id[id(module)])
        description, state_arrays = optimizer._serialized()
        renamed = {}
        for key, array in state_arrays.items():
            index, state_name = key.split("/", 1)
            renamed[key] = f"optim.{index}.{state_name}"
            arrays[renamed[key]] = array
        for entry in description["state"].values():
            for spec in entry.values():
                if "array" in spec:
                    spec["array"] = renamed[spec["array"]]
        optimizer_meta = {"class": type(optimizer).__name__, "params": params, "state": description}
    meta = {"kind": "cembed.modules", "modules": modules_meta, "optimizer": optimizer_meta, "extra": extra}
    for module in named.values():
        flush = getattr(module.weight, "flush", None)
        if callable(flush) and module.weight.flags.writeable:
            flush()
    return write_directory(path, arrays, meta)


def _fail(directory: str, message: str) -> CheckpointError:
    return CheckpointError(f"{directory}: {message}")


def load_checkpoint(path: PathLike, modules: Any, optimizer: Any = None, mmap: bool = True,
                    verify: bool = True) -> Any:
    """Load a checkpoint written by :func:`save_checkpoint` into ``modules`` (and ``optimizer``);
    returns its ``extra``.

    Everything is checked before anything changes: the manifest, every file (present, complete,
    its CRC-32 with ``verify``), the module names, classes, shapes and dtypes against the modules
    given, and the optimizer's class, parameters and whole state (with the optimizer's own rules).
    Then every file is mapped (and with ``mmap=False`` copied into memory) before anything changes,
    so running out of memory or address space changes nothing either. On any error no module and no
    optimizer is modified — except for an I/O error while the values copied into tables that stay
    on disk are written back to their files: that comes once every module and the optimizer are at
    the checkpoint (in memory), and is raised as an ``OSError`` naming the files.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint directory (an interrupted save is recovered: :func:`find_directory`).
    modules : mapping of str to module, sequence of modules, or one module
        The same names as at save; each module's table must already have the saved shape and
        dtype.
    optimizer : cembed.optim.Optimizer, optional
        Built over the same modules, in the same order, as the saved one.
    mmap : bool, default True
        How a table gets its values. A module whose table is a writeable ``numpy.memmap`` of a
        ``.npy`` file (a table on disk, :func:`cembed.open_table`) keeps it: the values are copied
        into it in bounded blocks, whatever ``mmap`` says. Otherwise, with ``mmap`` the table
        becomes a map of the checkpoint's file — read-only for a frozen module, copy-on-write for a
        trainable one, so training never writes into the checkpoint — and without it, an array read
        into memory. Optimizer state goes into the optimizer's ``state_dir`` when it has one, else
        into memory. A mapped checkpoint file must not be truncated or overwritten in place while
        a module maps it (the process would be killed by SIGBUS at its next lookup): replace a
        checkpoint with :func:`save_checkpoint`, which renames a new directory into place.
    verify : bool, default True
        Check every file's CRC-32 (reads every file once).

    Raises
    ------
    CheckpointError
        (a ``ValueError``) naming the directory or the file at fault; also a table on disk whose
        array is read-only (its values could not be copied into it), refused before anything changes.
    OSError
        Writing the optimizer's state into its ``state_dir`` failed (a full disk): the state files
        and the optimizer are as they were, the modules not yet loaded. Or writing a table on disk
        back to its file failed, after everything was loaded (above).

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt")
    >>> _ = cembed.save_checkpoint(path, {"words": emb}, extra={"epoch": 3})
    >>> other = cembed.Embedding(10, 4, sparse=True, seed=1)
    >>> cembed.load_checkpoint(path, {"words": other})
    {'epoch': 3}
    >>> bool((other.weight == emb.weight).all())
    True
    >>> cembed.load_checkpoint(path, {"words": cembed.Embedding(11, 4)})
    Traceback (most recent call last):
    ...
    cembed.checkpoint.CheckpointError: ...: module 'words' has a table of shape (11, 4) float32, the checkpoint holds (10, 4) float32
    """
    mmap = check_bool(mmap, "mmap")
    named = _named_modules(modules)
    with _reading(_norm(path)):   # (a save to the path waits until the tables are mapped or copied)
        return _load_checkpoint(path, named, optimizer, mmap, verify)


def _load_checkpoint(path: PathLike, named: Dict[str, Any], optimizer: Any, mmap: bool, verify: bool) -> Any:
    meta, files = read_directory(path, verify=verify)
    directory = find_directory(path)
    if not isinstance(meta, dict) or meta.get("kind") != "cembed.modules" or not isinstance(meta.get("modules"), dict):
        raise _fail(directory, "not a module checkpoint (its manifest's meta lacks 'kind': 'cembed.modules')")
    saved = meta["modules"]
    if set(saved) != set(named):
        raise _fail(directory, f"holds modules {sorted(saved)}, got {sorted(named)}")
    plan = []
    for name, module in named.items():
        entry = saved[name]
        if not isinstance(entry, dict) or entry.get("array") != f"module.{name}" or entry["array"] not in files:
            raise _fail(directory, f"malformed entry for module {name!r}")
        if entry.get("class") != type(module).__name__:
            raise _fail(directory, f"module {name!r} was a {entry.get('class')}, got a {type(module).__name__}")
        file_path, header = files[entry["array"]]
        weight = module.weight
        if "dtype" in entry and entry["dtype"] != header.dtype.name:
            raise _fail(directory, f"module {name!r}: the manifest records dtype {entry['dtype']!r}, its file holds "
                                   f"{header.dtype}")
        if header.shape != weight.shape or header.dtype != weight.dtype:
            raise _fail(directory, f"module {name!r} has a table of shape {weight.shape} {weight.dtype}, the "
                                   f"checkpoint holds {header.shape} {header.dtype}")
        # a table on disk (a read-write map of a file) keeps its file: the values are copied into it
        # (nothing to do when it maps this very file); any other table is replaced
        action = "replace"
        backing = storage.backing_file(weight) if getattr(weight, "mode", None) in ("r+", "w+") else None
        if backing is not None:
            action = "keep" if os.path.abspath(backing) == os.path.abspath(file_path) else "copy"
            if action == "copy" and not weight.flags.writeable:
                raise _fail(directory, f"module {name!r}: its table maps the file {backing} read-write but the "
                                       "array is read-only: the values cannot be copied into it")
        plan.append((module, weight, file_path, header, action))
    saved_optimizer = meta.get("optimizer")
    state_dict = None
    if optimizer is not None:
        if saved_optimizer is None:
            raise _fail(directory, "holds no optimizer state")
        if not hasattr(optimizer, "_deserialized"):
            raise TypeError(f"optimizer must be a cembed.optim optimizer, got {type(optimizer).__name__}")
        if not isinstance(saved_optimizer, dict) or saved_optimizer.get("class") != type(optimizer).__name__:
            got = saved_optimizer.get("class") if isinstance(saved_optimizer, dict) else None
            raise _fail(directory, f"holds {got} state, not {type(optimizer).__name__}")
        by_id = {id(m): name for name, m in named.items()}
        current = [by_id.get(id(m)) for m in _optimizer_modules(optimizer)]
        if saved_optimizer.get("params") != current:
            raise _fail(directory, f"the saved optimizer held the modules {saved_optimizer.get('params')}, this one "
                                   f"holds {current} (in order)")

        def fetch(name: str) -> np.ndarray:
            if name not in files:
                raise KeyError(f"no file for optimizer array {name!r}")
            file_path, header = files[name]
            return storage.map_array(file_path, "r", header, advice="sequential")

        try:
            state, groups = optimizer._deserialized(saved_optimizer.get("state"), fetch, directory)
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
        state_dict = {"state": state, "param_groups": groups}
    # the optimizer and then the tables, with a Ctrl-C held back until both are loaded (an interrupt
    # between them would leave the optimizer at the checkpoint and the tables as they were)
    with storage.sigint_held():
        _apply(plan, optimizer, state_dict, directory, mmap)
    return meta.get("extra")


def _apply(plan: List[Tuple[Any, Any, str, storage.NpyHeader, str]], optimizer: Any,
           state_dict: Optional[Dict[str, Any]], directory: str, mmap: bool) -> None:
    """load_checkpoint's changes, everything checked. First what can fail for want of memory or
    address space, changing nothing: every file mapped (and with ``mmap=False`` copied into memory);
    then the optimizer's state (all or nothing itself), the values copied into tables that stay on
    disk, and the new tables set."""
    ready: List[Tuple[Any, Any, np.ndarray]] = []
    for module, weight, file_path, header, action in plan:
        if action == "copy":
            ready.append((module, weight, storage.map_array(file_path, "r", header, advice="sequential")))
        elif action == "replace" and mmap:
            trainable = bool(getattr(module, "requires_grad", True))
            ready.append((module, None, storage.map_array(file_path, "c" if trainable else "r", header)))
        elif action == "replace":
            ready.append((module, None, storage.aligned_copy(
                storage.map_array(file_path, "r", header, advice="sequential"))))
    if state_dict is not None:
        try:
            # checks the whole state first; changes nothing on error (files: without the dict hooks)
            optimizer._unhooked_load_state_dict(state_dict)
        except (ValueError, TypeError, OverflowError) as exc:
            raise _fail(directory, f"optimizer state: {exc}") from None
    on_disk = []
    for module, weight, source in ready:
        if weight is not None:   # a table on disk keeps its file: the values are copied into it
            storage.copy_rows(weight, source)
            on_disk.append(weight)
        else:
            module.weight = source
    # written back once every table holds its values: an I/O error there leaves every module and the
    # optimizer at the checkpoint (in memory), and is raised once every file was tried
    failed = []
    for weight in on_disk:
        try:
            weight.flush()
        except OSError as exc:
            failed.append(f"{storage.backing_file(weight)}: {exc}")
    if failed:
        raise OSError(f"load_checkpoint loaded {directory} into the modules and the optimizer, but writing the "
                      f"values back to the tables on disk failed ({'; '.join(failed)}): the files may not hold "
                      f"them until a later flush succeeds")
