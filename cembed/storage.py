"""Tables and state arrays on disk: ``.npy`` files mapped into memory (``numpy.memmap``).

A layer beside :mod:`cembed.functional`: it uses the argument policies of ``_validation`` and is used
by the modules, the optimizers (``state_dir``) and :mod:`cembed.checkpoint`. Everything a table on disk
needs is here, written once:

* :func:`aligned_zeros` / :func:`aligned_copy` — a table or state array in memory whose data starts on
  a page boundary (the modules and optimizers allocate theirs so);
* :func:`open_table` — create (initialised in bounded-size chunks; zeros are not written) or open a table;
* :func:`read_header` — the shape / dtype / data offset of a ``.npy`` file, checked against its size;
* :func:`create_zeros` — a zero ``.npy`` file without writing its data (its space reserved);
* :func:`copy_rows` — copy one array into another in bounded-size row blocks;
* :func:`backing_file` — the ``.npy`` file a memory-mapped array maps whole, if any;
* :func:`write_aside` / :func:`write_atomically` / :func:`replace_files` — new contents for files,
  whole or not at all (synced temporary siblings renamed into place; several files all or none);
* :func:`may_share_file_pages` / :func:`first_overlap` — whether arrays may share memory, also as two
  maps of one file's bytes (which ``numpy.may_share_memory`` cannot see);
* :func:`fsync_path` / :func:`fsync_directory` — durability;
* :func:`release_free_memory` — give the heap memory freed by a set-up back to the system.

Which dtypes a table may have is decided by ``_dtypes`` (float32, float64, float16, bfloat16), so a
dtype the engine learns is a dtype tables on disk support. How a 16-bit array is stored in a ``.npy``
file is decided here, once (:func:`file_dtype`, :func:`to_file`, :func:`from_file`): float16 is native
``.npy`` (``'<f2'``); bfloat16, which the ``.npy`` format cannot describe, is stored as its ``uint16``
bits (``'<u2'``) and its logical dtype is recorded by the caller (``dtype="bfloat16"`` for
:func:`open_table`, the manifest of a checkpoint, the optimizer's description). File formats and the
durability rules: ``docs/storage.md``.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import mmap
import os
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple, Union

import numpy as np
from numpy.lib import format as npy_format

try:
    import fcntl
except ImportError:   # pragma: no cover - platforms without flock
    fcntl = None  # type: ignore[assignment]

from ._memory import _MAPPED, _mapping, first_overlap, mapped_file_id, may_share_file_pages  # (public here too)
from ._dtypes import FULL_DTYPES, check_table_dtype, compute_dtype, is_bfloat16, is_half, resolve_dtype
from ._validation import check_bool, check_choice, check_int, check_size, random_generator

__all__ = ["aligned_zeros", "aligned_copy", "ALIGNMENT", "open_table", "map_array", "read_header", "NpyHeader",
           "create_zeros", "reserve_zeros", "map_reserved", "discard_reserved", "rename_into_place", "replace_files",
           "sigint_held",
           "write_aside", "write_atomically", "copy_rows", "backing_file", "may_share_file_pages", "first_overlap",
           "fsync_path", "fsync_directory", "file_dtype", "to_file", "from_file", "CHUNK_BYTES", "INITS", "ADVICE",
           "release_free_memory"]

PathLike = Union[str, "os.PathLike[str]"]

#: Size of the blocks in which tables are initialised and arrays copied (bounded memory).
CHUNK_BYTES = 32 << 20
#: The named initialisations of :func:`open_table`.
INITS = ("zeros", "normal", "uniform")
_MODES = ("r", "r+", "w+", "c")


#: Where the data of an array made by :func:`aligned_zeros` / :func:`aligned_copy` starts: a page
#: boundary, so that a row of 64·k bytes never straddles a cache line (nor, when it divides 4096 bytes,
#: a page). NumPy's own large arrays start 16 bytes past a page (the allocator's header): a 256-byte
#: row then spans five cache lines instead of four, and every random row read fetches the fifth.
#: docs/performance.md, "Row alignment".
ALIGNMENT = 4096


def aligned_zeros(shape: Any, dtype: Any = np.float32) -> np.ndarray:
    """A C-ordered array of zeros whose data starts on an :data:`ALIGNMENT` boundary.

    Like ``numpy.zeros``, the memory of a large array is mapped lazily: pages nobody writes cost
    nothing. The array is a view of a slightly larger ``uint8`` buffer (its ``base``).

    Parameters
    ----------
    shape : int or tuple of int
    dtype : data-type, default float32
        Any fixed-size dtype (bfloat16 too).

    Examples
    --------
    >>> import cembed
    >>> table = cembed.storage.aligned_zeros((1000, 64))
    >>> table.ctypes.data % cembed.storage.ALIGNMENT, table.dtype, table.flags.c_contiguous
    (0, dtype('float32'), True)
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"negative dimensions are not allowed, got shape {shape}")
    nbytes = math.prod(shape) * dtype.itemsize   # (Python ints: an absurd shape cannot wrap around)
    if nbytes + ALIGNMENT > sys.maxsize:
        raise ValueError(f"array is too big: shape {shape} of {dtype} is {nbytes:,} bytes, more than this "
                         "platform can address")
    buffer = np.zeros(nbytes + ALIGNMENT, dtype=np.uint8)   # calloc: untouched pages stay unmapped
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def aligned_copy(array: Any, dtype: Any = None) -> np.ndarray:
    """A C-ordered copy of ``array`` (converted to ``dtype`` as ``astype`` converts, e.g. float32 to
    bfloat16 rounding to nearest) whose data starts on an :data:`ALIGNMENT` boundary.

    The way to hand :meth:`cembed.Embedding.from_pretrained` (which uses a table as it is) a table
    whose rows the kernels read in whole cache lines.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> table = cembed.storage.aligned_copy(np.arange(6.0).reshape(3, 2), np.float32)
    >>> table, table.ctypes.data % cembed.storage.ALIGNMENT
    (array([[0., 1.],
           [2., 3.],
           [4., 5.]], dtype=float32), 0)
    """
    source = array if isinstance(array, np.ndarray) else np.asarray(array)
    out = aligned_zeros(source.shape, source.dtype if dtype is None else dtype)
    np.copyto(out, source, casting="unsafe")
    return out


class NpyHeader(NamedTuple):
    """What a ``.npy`` file holds: its array's ``shape`` and ``dtype``, where the data starts
    (``offset``, bytes) and its size in bytes (``nbytes``)."""

    shape: Tuple[int, ...]
    dtype: np.dtype
    offset: int
    nbytes: int


def read_header(path: PathLike) -> NpyHeader:
    """Read and check the header of the ``.npy`` file ``path``.

    The file must be a version 1.0 or 2.0 ``.npy`` file (what ``numpy.save`` writes; 3.0, a UTF-8
    header, is refused) of a C-ordered array of a plain (non-object) dtype with no negative
    dimension, and at least as long as its header says (a truncated file is refused here, before it is
    mapped: touching a missing page of a mapping would kill the process).

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Not a ``.npy`` file, Fortran order, an object dtype, a negative dimension, or a truncated file
        (the message names the file and both sizes).

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> np.save(path, np.zeros((3, 2), np.float32))
    >>> h = cembed.storage.read_header(path)
    >>> h.shape, h.dtype, h.nbytes
    ((3, 2), dtype('float32'), 24)
    """
    path = os.fspath(path)
    with open_regular(path) as fh:
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fh, max_header_size=1 << 20)
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fh, max_header_size=1 << 20)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except ValueError as exc:
            raise ValueError(f"{path}: not a readable .npy file ({exc})") from None
        offset = fh.tell()
        size = os.fstat(fh.fileno()).st_size
    if fortran:
        raise ValueError(f"{path}: holds a Fortran-ordered array; cembed maps C-ordered arrays only")
    if dtype.hasobject:
        raise ValueError(f"{path}: holds an object array, which cannot be memory-mapped")
    if any(int(n) < 0 for n in shape):
        raise ValueError(f"{path}: its header gives the shape {tuple(shape)}, with a negative dimension")
    nbytes = math.prod(int(n) for n in shape) * dtype.itemsize   # Python ints: never wraps
    if size < offset + nbytes:
        raise ValueError(f"{path}: truncated file: {size} bytes, its header needs {offset + nbytes} "
                         f"({offset} header + {nbytes} data)")
    return NpyHeader(tuple(int(s) for s in shape), dtype, int(offset), int(nbytes))


_UINT16 = np.dtype(np.uint16)


def file_dtype(dtype: Any) -> np.dtype:
    """The dtype an array of ``dtype`` has in its ``.npy`` file: ``uint16`` (its bits) for bfloat16,
    which ``.npy`` cannot describe; ``dtype`` itself otherwise (float16 is native ``'<f2'``).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> cembed.storage.file_dtype("bfloat16"), cembed.storage.file_dtype(np.float16)
    (dtype('uint16'), dtype('float16'))
    """
    dtype = resolve_dtype(dtype)
    return _UINT16 if is_bfloat16(dtype) else dtype


def to_file(array: np.ndarray) -> np.ndarray:
    """``array`` as it is written to a ``.npy`` file (:func:`file_dtype`): a ``uint16`` view of a
    bfloat16 array (no copy), any other array unchanged.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> cembed.storage.to_file(np.ones(2, np.float16)).dtype
    dtype('float16')
    """
    return array.view(_UINT16) if is_bfloat16(array.dtype) else array


def from_file(array: np.ndarray, dtype: Any) -> np.ndarray:
    """The array read from a ``.npy`` file seen as its logical ``dtype``: a bfloat16 view of the
    ``uint16`` bits of a bfloat16 array; ``array`` itself when it already has ``dtype``.

    Raises
    ------
    TypeError
        The file's dtype is not how ``dtype`` is stored (the message names both).

    Examples
    --------
    >>> import numpy as np, cembed
    >>> bits = np.array([0x3F80], np.uint16)          # 1.0 in bfloat16
    >>> float(cembed.storage.from_file(bits, "bfloat16")[0])
    1.0
    """
    dtype = resolve_dtype(dtype)
    if array.dtype == dtype:
        return array
    if array.dtype == file_dtype(dtype) and dtype != array.dtype:
        return array.view(dtype)
    raise TypeError(f"an array stored as {array.dtype} cannot be read as {dtype} (a {dtype} array is stored "
                    f"as {file_dtype(dtype)})")


def _logical(header: "NpyHeader", dtype: Any, path: str) -> "NpyHeader":
    """``header`` with its dtype replaced by the logical ``dtype``, checked against the file."""
    want = resolve_dtype(dtype)
    if header.dtype == want:
        return header
    if header.dtype != file_dtype(want):
        raise TypeError(f"{path}: holds {_describe(header.dtype)}, but dtype={want} was asked for (stored as "
                        f"{file_dtype(want)})")
    return header._replace(dtype=want)


def _describe(dtype: np.dtype) -> str:
    if dtype == _UINT16:
        return "uint16 (the bits of a bfloat16 array, if it was written by cembed)"
    return str(dtype)


def open_regular(path: PathLike, mode: str = "rb") -> Any:
    """``open(path, mode)`` for ``"rb"`` / ``"r+b"``, refusing anything but a regular file with a
    ``ValueError`` naming it: a FIFO (named pipe) put where a table, a manifest or a checkpoint file is
    expected would block ``open`` forever (the file is opened non-blocking, checked, then used as usual;
    the flag changes nothing for a regular file)."""
    if mode not in ("rb", "r+b"):
        raise ValueError(f"open_regular: mode {mode!r} is not 'rb' or 'r+b'")
    path = os.fspath(path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        checked = os.fstat(fd)
        if not stat.S_ISREG(checked.st_mode):
            raise ValueError(f"{path}: {_kind(checked.st_mode)}, not a regular file")
        fh = open(path, mode)   # by name, so the file object (and a memmap of it) knows its path
        opened = os.fstat(fh.fileno())
        if (opened.st_dev, opened.st_ino) != (checked.st_dev, checked.st_ino):
            fh.close()
            raise ValueError(f"{path}: replaced by another file while it was opened")
        return fh
    finally:
        os.close(fd)


def _kind(st_mode: int) -> str:
    """What a file that is not a regular one is, for messages."""
    return "a directory" if stat.S_ISDIR(st_mode) else "a FIFO" if stat.S_ISFIFO(st_mode) else "a device or socket"


def written_path(path: PathLike, what: str = "cembed never writes a file there") -> str:
    """The file that writing ``path`` creates or replaces: ``path``, or where a symbolic link there
    points (written through, as ``open(path, "w")`` writes). Every file cembed writes is made beside it
    and renamed over it, so an existing one that is not a regular file — a device such as
    ``/dev/null``, a FIFO, a socket, a directory, a loop of links — is refused with a ``ValueError``
    naming it (and the link's target), before anything is written. :func:`write_aside`, :func:`rename_into_place`,
    :func:`replace_files` and :func:`open_table` all apply this one rule.

    Examples
    --------
    >>> import os, tempfile
    >>> from cembed import storage
    >>> folder = tempfile.mkdtemp()
    >>> os.symlink("real.txt", os.path.join(folder, "link.txt"))
    >>> storage.write_atomically(os.path.join(folder, "link.txt"), b"through the link")
    >>> open(os.path.join(folder, "real.txt"), "rb").read(), os.path.islink(os.path.join(folder, "link.txt"))
    (b'through the link', True)
    """
    path = os.fspath(path)
    target = os.path.realpath(path) if os.path.islink(path) else path
    try:
        info = os.stat(target)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path}: a loop of symbolic links, not a regular file: {what}") from None
        return target   # nothing there yet (or not reachable: the write itself says why, naming the path)
    if not stat.S_ISREG(info.st_mode):
        link = f" (the symbolic link points to {target})" if target != path else ""
        raise ValueError(f"{path}: {_kind(info.st_mode)}, not a regular file{link}: {what}")
    return target


def fsync_path(path: PathLike) -> None:
    """Flush the file ``path`` (its data and metadata) to stable storage."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: PathLike) -> None:
    """Flush the directory ``path`` (its entries: creations, renames, removals) to stable storage."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _write_header(fh: Any, shape: Tuple[int, ...], dtype: np.dtype) -> int:
    """Write a ``.npy`` header for a C-ordered ``shape`` / ``dtype`` array; returns the data offset."""
    npy_format.write_array_header_2_0(fh, {"descr": npy_format.dtype_to_descr(dtype), "fortran_order": False,
                                           "shape": tuple(shape)})
    return int(fh.tell())


#: A temporary a write is filling: ``.<name>.<8 random characters>.cembed.tmp`` beside the file
#: ``<name>`` (the mark keeps it apart from the temporaries of other programs writing the same file the
#: same way). It is made as ``….cembed.new``, locked (``flock``, held until it is renamed or removed:
#: the lock is what tells a live writer's temporary from one a killed process left) and only then
#: renamed to ``….cembed.tmp``, so that no such ``.tmp`` is ever unlocked while its writer lives.
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.cembed\.(?P<stage>tmp|new)")
#: A ``….new`` left unlocked this long (seconds) is a killed process's: its writer locks it microseconds
#: after making it (an abandoned one is empty).
ABANDONED_NEW_SECONDS = 600.0
#: The temporaries this process is writing: name -> a descriptor of it holding the lock.
_held_temporaries: Dict[str, int] = {}
_held_lock = threading.Lock()


def _lock_exclusively(fd: int) -> bool:
    """Take ``flock(LOCK_EX | LOCK_NB)`` on ``fd``; False where it is held elsewhere or the file system
    has no locks."""
    if fcntl is None:   # pragma: no cover - platforms without flock
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _hold(tmp: str, fd: int) -> None:
    """Keep a descriptor of the locked temporary ``tmp`` (a duplicate of ``fd``: the lock goes with the
    open file, so it stays held after the writer closes ``fd``) until :func:`_let_go`. Entries whose
    temporary no longer exists under its name (a caller renamed it with ``os.replace``) are let go here."""
    with _held_lock:
        for name in [name for name in _held_temporaries if not os.path.lexists(name)]:
            os.close(_held_temporaries.pop(name))
        _held_temporaries[tmp] = os.dup(fd)


def _let_go(tmp: str) -> None:
    """Release the lock of a temporary this process made (renamed into place or removed); a no-op for
    any other name."""
    with _held_lock:
        fd = _held_temporaries.pop(tmp, None)
    if fd is not None:
        os.close(fd)


def _remove_abandoned_temporaries(path: str) -> None:
    """Remove the temporaries of ``path`` (:data:`_TEMPORARY`, ``.tmp`` and ``.new``) no live process is
    writing (:func:`_remove_unheld`; a ``.new`` also older than :data:`ABANDONED_NEW_SECONDS`)."""
    _remove_unheld(path, _TEMPORARY, lambda match, info: match.group("stage") != "new"
                   or time.time() - info.st_mtime >= ABANDONED_NEW_SECONDS)


def _remove_unheld(path: str, pattern: "re.Pattern[str]",
                   abandoned: Callable[["re.Match[str]", os.stat_result], bool] = lambda match, info: True) -> None:
    """Remove the files beside ``path`` named by ``pattern`` for ``path``'s name (its group ``name``)
    that no live process holds: regular files of this user, not held by this process, whose lock
    (``flock``) can be taken, and for which ``abandoned(match, stat)`` holds. A file that cannot be
    opened, or is locked, is left alone; so is everything else in the directory."""
    directory, name = os.path.split(os.path.abspath(path))
    if fcntl is None:   # pragma: no cover
        return
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group("name") != name:
            continue
        with _held_lock:
            if entry.path in _held_temporaries:
                continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or not abandoned(match, info)
                    or not _lock_exclusively(fd)):
                continue
            now = os.lstat(entry.path)   # still the file locked (not replaced under its name meanwhile)
            if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino):
                os.unlink(entry.path)
        except OSError:
            continue
        finally:
            os.close(fd)


def _temporary_sibling(path: str, mode: Optional[int] = None) -> Tuple[int, str]:
    """``(open descriptor, name)`` of a new empty, locked temporary beside ``path`` (:data:`_TEMPORARY`),
    with permission bits ``mode`` (default: those an ordinary new file gets; mkstemp's 0600 would make
    every table private — kept where the file system refuses to change them). Made with Ctrl-C held
    back: it exists only once this returns. The temporaries of ``path`` killed writers left are
    removed first (:func:`_remove_abandoned_temporaries`)."""
    directory = os.path.dirname(os.path.abspath(path))
    _remove_abandoned_temporaries(path)
    fd, new, tmp = -1, "", ""
    try:
        with sigint_held():
            while True:
                fd, new = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".cembed.new",
                                           dir=directory)
                try:
                    os.fchmod(fd, (0o666 & ~_umask()) if mode is None else mode)
                except OSError:   # (vfat, exfat, some network file systems: the bits cannot be set)
                    pass
                locked = _lock_exclusively(fd)
                tmp = new[:-len(".new")] + ".tmp"
                if not os.path.lexists(tmp):
                    break
                os.close(fd)   # (that name is taken by another temporary: draw another)
                fd = -1
                _unlink_quietly(new)
            os.rename(new, tmp)
            new = ""
            if locked:
                _hold(tmp, fd)
        return fd, tmp
    except BaseException:   # (a Ctrl-C held back is raised at the end of the with block)
        if fd >= 0:
            os.close(fd)
            _unlink_quietly(new or tmp)
        raise


def write_aside(path: PathLike, write: Callable[[Any], None], *, sync: bool = True,
                mode: Optional[int] = None) -> str:
    """Write a new temporary sibling of ``path`` and return its name, to be put in place with
    :func:`rename_into_place` (or :func:`replace_files` for several files at once). ``path`` itself is
    never touched here.

    Parameters
    ----------
    path : str or os.PathLike
        The file the temporary is to become (it is made in the same directory, named
        ``.<name>.<random>.cembed.tmp``; those of the same file that killed processes left are removed
        first: docs/storage.md).
    write : callable
        ``write(fh)`` writes the contents into ``fh``, a binary file open for writing.
    sync : bool, default True
        Flush the file to stable storage (``fsync``) before returning.
    mode : int, optional
        Permission bits of the file (default: those of the file at ``path`` when there is one — a
        replaced file keeps its bits — else those an ordinary new file gets, ``0o666`` less the
        umask).

    Returns
    -------
    str
        The temporary file's name.

    Raises
    ------
    Exception
        Whatever ``write`` or the file system raised (``OSError`` for a full disk, ...); the temporary
        is removed first, also when a Ctrl-C interrupts.

    Examples
    --------
    >>> import os, tempfile
    >>> from cembed import storage
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> tmp = storage.write_aside(path, lambda fh: fh.write(b"hello"))
    >>> os.path.exists(path), os.path.basename(tmp).endswith(".cembed.tmp")   # not in place yet
    (False, True)
    >>> storage.rename_into_place(tmp, path)
    """
    path = written_path(path)
    sync = check_bool(sync, "sync")
    try:
        fd, tmp = _temporary_sibling(path, _existing_mode(path) if mode is None else mode)
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:   # (written through the descriptor mkstemp opened, never by name)
            write(fh)
            fh.flush()
            if sync:
                os.fsync(fh.fileno())
    except OSError as exc:
        _unlink_quietly(tmp)
        raise _naming(exc, path) from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _naming(exc: OSError, path: str) -> OSError:
    """``exc`` as an error about ``path`` (the file being written: a full disk, a missing directory),
    not about a temporary name the caller never gave; one that names a file already is kept."""
    if exc.errno is None or (exc.filename is not None
                             and not _TEMPORARY.fullmatch(os.path.basename(os.fspath(exc.filename)))):
        return exc
    return OSError(exc.errno, exc.strerror or os.strerror(exc.errno), path)


def write_atomically(path: PathLike, data: Union[bytes, Callable[[Any], None]]) -> None:
    """Replace the file ``path`` with new contents, whole or not at all: they are written to a
    temporary sibling (:func:`write_aside`, synced), renamed over ``path`` and the directory synced,
    so that ``path`` is the old file or the whole new one, also after a crash. A file replaced keeps
    its permission bits; a new one gets an ordinary new file's.

    Parameters
    ----------
    path : str or os.PathLike
    data : bytes or callable
        The contents, or a function ``data(fh)`` writing them into a binary file.

    Raises
    ------
    OSError
        Writing or renaming failed: ``path`` is as it was and no temporary is left.

    Examples
    --------
    >>> import os, tempfile
    >>> from cembed import storage
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> storage.write_atomically(path, b"first")
    >>> storage.write_atomically(path, lambda fh: fh.write(b"second"))
    >>> open(path, "rb").read()
    b'second'
    """
    path = os.fspath(path)
    write = data if callable(data) else (lambda fh: fh.write(data))
    rename_into_place(write_aside(path, write), path)   # (a replaced file keeps its permission bits)


def _existing_mode(path: PathLike) -> Optional[int]:
    """The permission bits of the file at ``path``, or None when there is none: a file cembed writes
    in place of another keeps them (a private table stays private)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None


def rename_into_place(tmp: str, path: PathLike, *, sync_directory: bool = True) -> None:
    """Put the temporary ``tmp`` (:func:`write_aside`, :func:`reserve_zeros`) in place: ``os.replace(tmp,
    path)`` — ``tmp`` removed if that fails — then its lock released and the directory synced. A plain
    ``os.replace`` (or ``os.unlink``) of a temporary works too, but its lock (a descriptor, which also
    keeps a removed file's disk space) is then only released when this process makes its next
    temporary.

    Raises
    ------
    OSError
        The rename failed: ``path`` is as it was and ``tmp`` is removed.

    Examples
    --------
    >>> import os, tempfile
    >>> from cembed import storage
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> storage.rename_into_place(storage.write_aside(path, lambda fh: fh.write(b"hello")), path)
    >>> open(path, "rb").read(), os.listdir(os.path.dirname(path))
    (b'hello', ['notes.txt'])
    """
    path = written_path(path)
    sync_directory = check_bool(sync_directory, "sync_directory")
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _let_go(tmp)
    if sync_directory:
        fsync_directory(os.path.dirname(os.path.abspath(path)))


def _umask() -> int:
    """The process's umask, read without changing it where /proc says it (else set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def create_zeros(path: PathLike, shape: Tuple[int, ...], dtype: Any, *, durable: bool = False) -> None:
    """Create (or replace) the ``.npy`` file ``path`` holding zeros of ``shape`` and ``dtype``,
    without writing its data: the file is extended with ``truncate`` and its space reserved on disk
    with ``fallocate`` (no data is written: a fresh 50 GB array takes milliseconds, but takes its
    50 GB of disk at once). The reservation is what makes a full disk an ``OSError`` here, before
    anything else changes, instead of a SIGBUS at the first write through a mapping of the file;
    where the file system cannot reserve space the file stays sparse (``docs/storage.md``). A
    bfloat16 array is stored as its ``uint16`` bits (:func:`file_dtype`; zero bits are 0.0).

    The file is written under a temporary sibling name and renamed into place (with ``durable``,
    synced first), so ``path`` never holds a half-written header; on any error (no room on the disk
    included) ``path`` is left as it was.

    Raises
    ------
    OSError
        The file cannot be created, or the disk has no room for it (``ENOSPC``, ``EDQUOT``).

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "zeros.npy")
    >>> cembed.storage.create_zeros(path, (1000, 8), np.float32)
    >>> float(np.load(path, mmap_mode="r").sum())
    0.0
    """
    path = os.fspath(path)
    durable = check_bool(durable, "durable")
    rename_into_place(reserve_zeros(path, shape, dtype, durable=durable), path, sync_directory=durable)


#: The largest file cembed makes (bytes of data): beyond any file system's limit, far below int64.
MAX_FILE_BYTES = 1 << 60


def _checked_array_spec(shape: Any, dtype: Any) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape as ints, the file dtype) of an array cembed is to write, checked before any file is made:
    every dimension an int >= 0, a plain (non-object) dtype, at most ``MAX_FILE_BYTES``. ValueError /
    TypeError naming what is wrong (a negative dimension truncated the file into its own header)."""
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"shape must be a tuple of ints, got {type(shape).__name__}")
    dims = tuple(check_size(n, f"shape[{i}]") for i, n in enumerate(shape))
    stored = file_dtype(dtype)
    if stored.hasobject or stored.fields is not None or stored.itemsize == 0:
        raise TypeError(f"cannot store {stored} arrays in a file cembed maps (a plain numeric dtype is needed)")
    if math.prod(dims) * stored.itemsize > MAX_FILE_BYTES:
        raise ValueError(f"an array of shape {dims} {stored} is larger than {MAX_FILE_BYTES} bytes")
    return dims, stored


def reserve_zeros(path: PathLike, shape: Tuple[int, ...], dtype: Any, *, durable: bool = False) -> str:
    """The file :func:`create_zeros` makes for ``path``, space reserved, left under a temporary
    sibling name, which is returned: :func:`rename_into_place` puts it in place, :func:`discard_reserved`
    drops it. ``path`` itself is not touched. An optimizer reserves every state file a ``step()``
    will create this way before it updates any parameter, so a full disk refuses the whole step.

    Raises
    ------
    OSError
        As :func:`create_zeros`; no temporary file is then left behind.
    """
    path = os.fspath(path)
    durable = check_bool(durable, "durable")
    shape, dtype = _checked_array_spec(shape, dtype)
    nbytes = math.prod(shape) * dtype.itemsize

    def zeros(fh: Any) -> None:
        offset = _write_header(fh, shape, dtype)
        fh.truncate(offset + nbytes)
        _reserve_space(fh.fileno(), offset + nbytes, path)

    return write_aside(path, zeros, sync=durable)


def map_reserved(tmp: str, path: PathLike, dtype: Any) -> np.memmap:
    """Map read-write the file :func:`reserve_zeros` made for ``path`` (its temporary ``tmp``), as
    the array of ``path`` it is to become: :func:`rename_into_place` afterwards keeps the map valid,
    and the map then names ``path`` (:func:`backing_file`). Mapping is the last step that can fail
    for lack of resources (address space): done with the reservation, before anything changes.

    Raises
    ------
    OSError
        The file cannot be mapped (e.g. ``ENOMEM``).
    """
    array = map_array(tmp, "r+", dtype=dtype)
    array.filename = os.path.abspath(os.fspath(path))
    return array


def discard_reserved(tmp: str) -> None:
    """Remove a temporary (:func:`reserve_zeros`, :func:`write_aside`) nobody put in place, and release
    its lock (quietly: it may be gone)."""
    _unlink_quietly(tmp)


#: errno values of ``fallocate`` that mean "no room": the file cannot get its space.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _reserve_space(fd: int, length: int, name: str) -> bool:
    """Allocate the first ``length`` bytes of the open file ``fd`` on disk (Linux ``fallocate``,
    mode 0: the holes get blocks that read as zeros; nothing is written, so it takes milliseconds
    also for a large file), so that a later write through a memory map of it cannot meet a full
    disk — which is a SIGBUS that kills the process, not an exception. Returns True when the space
    is reserved, False where the file system (or the platform) cannot reserve it (the file stays
    sparse: ``docs/storage.md``). ``posix_fallocate`` is not used: where the file system lacks the
    call, glibc emulates it by writing every block.

    Raises
    ------
    OSError
        ``ENOSPC`` / ``EDQUOT`` / ``EFBIG``: not enough room; the message names ``name`` and the size.
    """
    if _fallocate is None or length <= 0:
        return False
    while True:
        if _fallocate(fd, 0, 0, length) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EINTR:
            continue
        if code in _NO_ROOM:
            raise OSError(code, f"{name}: cannot reserve {length} bytes on disk for an array written through "
                                f"a memory map ({os.strerror(code)})")
        return False   # EOPNOTSUPP, ENOSYS, ...: no reservation here; the file stays sparse


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` until every byte is written (a short write, e.g. at the end of a full disk, is
    retried, so that its error is raised instead of leaving a hole)."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, f"writing a table: pwrite wrote nothing at offset {offset}")
        view, offset = view[written:], offset + written


_replacing = threading.RLock()


def _same_directory(a: str, b: str) -> bool:
    """Whether the files ``a`` and ``b`` name are in one directory (compared as directories, not as
    text: ``link/..`` is where the link points, not where the link is)."""
    try:
        one, other = (os.stat(os.path.dirname(p) or ".") for p in (a, b))   # (not normalised: the kernel's view)
    except OSError:
        return os.path.dirname(os.path.abspath(a)) == os.path.dirname(os.path.abspath(b))
    return (one.st_dev, one.st_ino) == (other.st_dev, other.st_ino)


def replace_files(pairs: List[Tuple[str, str]], commit: Optional[Callable[[], None]] = None) -> None:
    """``os.replace(src, dst)`` for every pair (in one directory each), all or none, then ``commit()``.

    Before the first rename every existing ``dst`` gets a hard link ``.<name>.<random>.cembed.replaced`` beside
    it (a fresh name: no file of the user's is ever removed for it); if a rename
    fails (or is interrupted) the pairs renamed so far are undone — an old file put back by its link,
    a file that was not there removed — before the error is raised. An existing ``dst`` that cannot
    get the link (a file system without hard links) cannot be put back: it is left replaced. Once
    every rename is made, ``commit`` (if given: the caller's switch to the new files; it must not
    fail) runs before the links are removed. From the first rename until then a SIGINT (Ctrl-C) is
    held back and delivered afterwards (in the main thread, when Python handles SIGINT), so an
    interrupt cannot fall between the renames and the commit. A process *killed* between two renames
    cannot undo them: the files already renamed are new, the others old (the backup links it left
    are removed by the next ``replace_files`` of those files).

    Raises
    ------
    OSError
        A rename failed: every ``dst`` is the file it was (see above; the ``src`` files not renamed
        are left for the caller to remove).
    """
    pairs = [(src, written_path(dst)) for src, dst in pairs]   # (checked, all of them, before any rename)
    for src, dst in pairs:   # (a rename stays in one directory: one file system, atomic)
        if not _same_directory(src, dst):
            raise ValueError(f"replace_files: {src} is not in the directory of {dst} (through its links), where it "
                             "must be made (write_aside)")
    for _, dst in pairs:
        _remove_orphaned_backups(dst)
    existed: List[bool] = []
    backups: List[Optional[str]] = []
    for src, dst in pairs:   # a replaced file keeps its permission bits
        mode = _existing_mode(dst)
        if mode is not None:
            try:
                os.chmod(src, mode)
            except OSError:   # (vfat, exfat: the bits cannot be set)
                pass
    # (one replace_files at a time in this process: two of one file would share the lock of its backup's
    # inode, the second's backup left unlocked for another process's clean-up)
    with _replacing, sigint_held():
        try:
            for _, dst in pairs:
                existed.append(os.path.lexists(dst))
                backups.append(_link_aside(dst) if existed[-1] else None)
            done = 0
            try:
                for src, dst in pairs:
                    os.replace(src, dst)
                    done += 1
            except BaseException:
                for (src, dst), was, backup in reversed(list(zip(pairs[:done], existed, backups))):
                    try:
                        if backup is not None:
                            os.replace(backup, dst)
                        elif not was:
                            os.unlink(dst)
                    except OSError:
                        pass
                raise
            if commit is not None:
                commit()
        finally:
            for backup in backups:
                if backup is not None:
                    _unlink_quietly(backup)
            for src, _ in pairs:
                if not os.path.lexists(src):   # (renamed: its lock is no longer needed)
                    _let_go(src)


#: A hard link :func:`replace_files` keeps of a file it replaces until the replacement is complete:
#: ``.<name>.<12 hex digits>.cembed.replaced`` (the mark, as the temporaries', keeps it apart from other
#: programs' files), locked (``flock``) by its writer while it lives. It is made as ``….cembed.linking``,
#: locked, and only then linked as ``….replaced`` (the ``.linking`` name then removed: no ``.replaced``
#: is ever unlocked while its writer lives); a ``.linking`` a killed process left is removed once its
#: inode's ctime, which the link set, is ABANDONED_NEW_SECONDS old.
_BACKUP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{12}\.cembed\.(?P<stage>replaced|linking)")


def _remove_orphaned_backups(path: str) -> None:
    """Remove the backup links (:data:`_BACKUP`) of ``path`` that a process killed between the renames of
    a :func:`replace_files` left behind (each an old copy's disk space, or ``path`` itself when killed
    before its own rename): those no live writer holds (:func:`_remove_unheld`)."""
    _remove_unheld(path, _BACKUP, lambda match, info: match.group("stage") != "linking"
                   or time.time() - info.st_ctime >= ABANDONED_NEW_SECONDS)


def _link_aside(path: str) -> Optional[str]:
    """A new hard link ``.<name>.<random>.cembed.replaced`` beside ``path`` (``os.link`` never replaces a
    file: a name taken is tried again with another), made as ``….linking``, locked while this process holds
    it (released by :func:`_unlink_quietly`) and only then given its name (:data:`_BACKUP`); None when the
    file system makes no links. (Where the lock cannot be taken — no ``flock``, or a lock of the user's
    on the file — nobody's clean-up can take it either: the link is kept unlocked.)"""
    directory, name = os.path.split(path)
    for _ in range(100):
        stem = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.cembed.")
        linking, backup = stem + "linking", stem + "replaced"
        if os.path.lexists(backup):
            continue
        try:
            os.link(path, linking)
        except FileExistsError:
            continue
        except OSError:
            return None
        try:
            fd = os.open(linking, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            fd = -1
        try:
            locked = fd >= 0 and _lock_exclusively(fd)
            try:
                os.link(linking, backup)   # (never over a name another writer took meanwhile)
            except FileExistsError:
                continue
            except OSError:
                return None
            if locked:
                _hold(backup, fd)
            return backup
        finally:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(linking)
    return None


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold back SIGINT — and SIGTERM when a Python handler takes it (``python -m cembed`` turns it
    into a clean stop) — for the ``with`` block: a signal arriving inside it is handled (by the
    handler Python had, usually raising KeyboardInterrupt) when the block ends. Only in the main
    thread, where Python runs its signal handlers, and only for a handler that is a Python callable
    (SIGTERM's default ends the process at once: nothing to hold)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers: Dict[int, Callable[[int, Any], Any]] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(signum)
        if callable(handler):
            handlers[int(signum)] = handler
    held: List[Tuple[int, Any]] = []
    for number in handlers:
        signal.signal(number, lambda received, frame: held.append((received, frame)))
    try:
        yield
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
        if held:
            number, frame = held[0]
            handlers[number](number, frame)


def _unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there (a temporary of this process's: its lock released after)."""
    try:
        os.unlink(path)
    except OSError:
        pass
    _let_go(path)


def _chunk_rows(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // max(1, row_bytes))


def copy_rows(dst: np.ndarray, src: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> None:
    """``dst[...] = src`` in blocks of whole rows of at most ``chunk_bytes`` (bounded memory when
    either array is a mapped file: each block's pages are read and written, never the whole array
    at once). Shapes and dtypes must match.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> dst = np.zeros((5, 2)); cembed.storage.copy_rows(dst, np.ones((5, 2)), chunk_bytes=16)
    >>> float(dst.sum())
    10.0
    """
    if not isinstance(dst, np.ndarray) or not isinstance(src, np.ndarray):
        raise TypeError(f"copy_rows: dst and src must be numpy arrays, got {type(dst).__name__} and "
                        f"{type(src).__name__}")
    if dst.shape != src.shape or dst.dtype != src.dtype:
        raise ValueError(f"copy_rows: {src.shape} {src.dtype} into {dst.shape} {dst.dtype}")
    chunk_bytes = check_size(chunk_bytes, "chunk_bytes")
    if chunk_bytes < 1:
        raise ValueError("copy_rows: chunk_bytes must be >= 1")
    if dst.ndim == 0:
        dst[...] = src
        return
    row_bytes = dst.itemsize * int(np.prod(dst.shape[1:], dtype=np.int64))
    step = _chunk_rows(row_bytes, chunk_bytes)
    starts = range(0, dst.shape[0], step)
    if np.may_share_memory(dst, src):   # as memmove: blocks taken before they are written over
        if dst.__array_interface__["data"][0] > src.__array_interface__["data"][0]:
            starts = starts[::-1]
        for lo in starts:
            dst[lo:lo + step] = src[lo:lo + step].copy()
        return
    for lo in starts:
        dst[lo:lo + step] = src[lo:lo + step]


def backing_file(array: Any) -> Optional[str]:
    """The absolute path of the ``.npy`` file that ``array`` maps *whole* (a ``numpy.memmap``
    from :func:`open_table`, ``numpy.load(..., mmap_mode=...)`` or ``open_memmap``, not a slice of
    one, or its bfloat16 view of the file's ``uint16`` bits), else None. The file's header is re-read
    to confirm shape, dtype (:func:`file_dtype`) and data offset. For a map made by cembed the file
    now at that path must be the file that was mapped (same device and inode): a name given to
    another file since (a checkpoint saved again over the one a table was loaded from) gives None.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "t.npy")
    >>> table = cembed.open_table(path, 10, 4)
    >>> cembed.storage.backing_file(table) == os.path.abspath(path), cembed.storage.backing_file(table[2:])
    (True, None)
    """
    if not isinstance(array, np.memmap) or getattr(array, "filename", None) is None:
        return None
    if not array.flags.c_contiguous:
        return None
    mm = getattr(array, "_mmap", None)
    filename = getattr(array, "filename", None)
    if mm is None or not isinstance(filename, str):
        return None
    path = os.path.abspath(filename)
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return None
    if header.shape != array.shape or header.dtype != file_dtype(array.dtype) or array.offset != header.offset:
        return None
    # the array must start where its mapping's data starts (not a view further in)
    start = np.frombuffer(mm, dtype=np.uint8).ctypes.data if not mm.closed else None
    if start is None or array.ctypes.data != start + (header.offset % _mmap_granularity()):
        return None
    known = mapped_file_id(array)
    if known is not None:
        try:
            status = os.stat(path)
        except OSError:
            return None
        if (status.st_dev, status.st_ino) != known:   # the name now belongs to another file
            return None
    return path


def _mmap_granularity() -> int:
    return mmap.ALLOCATIONGRANULARITY


def _check_init(init: Any) -> Union[str, Callable[[np.ndarray, int], None]]:
    if callable(init):
        return init
    return check_choice(init, "init", INITS)


def _fill(buffer: np.ndarray, start: int, init: Union[str, Callable[[np.ndarray, int], None]],
          rng: Optional[np.random.Generator], dim: int) -> None:
    if init == "normal":
        assert rng is not None
        rng.standard_normal(out=buffer, dtype=buffer.dtype.type)
    elif init == "uniform":
        assert rng is not None
        rng.random(out=buffer, dtype=buffer.dtype.type)
        buffer -= buffer.dtype.type(0.5)
        buffer /= buffer.dtype.type(max(1, dim))
    else:
        assert callable(init)
        init(buffer, start)


def _create_table(path: str, shape: Tuple[int, int], dtype: np.dtype, init: Any, seed: Any,
                  chunk_bytes: int) -> None:
    """Write a new table file under a temporary sibling name, sync it, rename it into place."""
    if init == "zeros":
        create_zeros(path, shape, dtype, durable=True)
        return
    rng = None
    if not callable(init):
        rng = random_generator(seed)
    n_rows, dim = shape
    stored = file_dtype(dtype)
    work = compute_dtype(dtype)   # a 16-bit table is initialised in float32, rounded to nearest per block

    def fill(fh: Any) -> None:
        offset = _write_header(fh, shape, stored)
        fh.truncate(offset + n_rows * dim * stored.itemsize)
        _reserve_space(fh.fileno(), offset + n_rows * dim * stored.itemsize, path)
        step = _chunk_rows(dim * work.itemsize, chunk_bytes)
        buffer = np.empty((min(step, n_rows), dim), dtype=work)
        for lo in range(0, n_rows, step):
            block = buffer[:min(step, n_rows - lo)]
            if callable(init):
                block.fill(0)   # what a callable leaves unwritten is zero (never the last block's values)
            _fill(block, lo, init, rng, dim)
            if not (isinstance(block, np.ndarray) and block.shape == (min(step, n_rows - lo), dim)
                    and block.dtype == work):  # the callable reshaped or retyped it in place
                raise ValueError(f"open_table: init changed the block it was given (shape {block.shape} "
                                 f"{block.dtype}, expected {(min(step, n_rows - lo), dim)} {work}): fill it in place")
            out = to_file(block.astype(dtype)) if work != dtype else block
            _pwrite_all(fh.fileno(), out.tobytes(), offset + lo * dim * stored.itemsize)

    write_atomically(path, fill)


def open_table(path: PathLike, num_embeddings: Optional[int] = None, embedding_dim: Optional[int] = None,
               dtype: Any = None, mode: str = "r+", init: Any = "zeros", seed: Any = None, *,
               chunk_bytes: int = CHUNK_BYTES) -> np.memmap:
    """Create or open a table stored in the ``.npy`` file ``path``, memory-mapped.

    The result is a ``numpy.memmap`` of shape ``(num_embeddings, embedding_dim)``: every cembed
    kernel reads and updates it in place, and the operating system pages rows in and out as they
    are used, so the table may be larger than RAM. Train it with
    ``Embedding.from_pretrained(table, freeze=False)``. Being a ``.npy`` file it also opens with
    ``numpy.load(path, mmap_mode="r")``.

    Parameters
    ----------
    path : str or os.PathLike
    num_embeddings, embedding_dim : int, optional
        Needed to create a table; when opening one, checked against the file when given.
    dtype : dtype or str, optional
        A dtype the engine trains: float32, float64, float16 (``numpy.float16``) or bfloat16
        (``"bfloat16"`` or ``ml_dtypes.bfloat16``). Creating: default float32. Opening: checked
        against the file when given; a bfloat16 table is stored as its ``uint16`` bits, so it must be
        reopened with ``dtype="bfloat16"`` (a ``uint16`` file opened without a dtype is refused, never
        guessed to be bfloat16).
    mode : {"r+", "w+", "r", "c"}, default "r+"
        ``"r+"``: open the file read-write, or create it when it does not exist (sizes needed);
        ``"w+"``: always create (replacing an existing file); ``"r"``: open read-only (a frozen
        table); ``"c"``: open copy-on-write (changes stay in memory, the file is never written).
    init : {"zeros", "normal", "uniform"} or callable, default "zeros"
        How a created table is filled (ignored when opening): ``"zeros"`` writes no data (its
        disk space is reserved, :func:`create_zeros`: creating takes no time, and a full disk is an
        ``OSError`` then, not a SIGBUS while training); ``"normal"``
        draws N(0, 1) like ``Embedding(num_embeddings, embedding_dim, seed=seed)``; ``"uniform"`` is
        word2vec's ``(U[0, 1) - 0.5) / embedding_dim``; a callable ``init(block, start)`` fills
        ``block`` (rows ``start ... start + len(block) - 1``, a writeable array of the table's
        dtype; float32 for a 16-bit table) in place. Random draws are bitwise those of one
        ``numpy.random.default_rng(seed)`` call over the whole table. A 16-bit table is initialised
        in float32 and each block rounded to nearest (ties to even): bitwise the float32 table
        converted with ``astype``.
    seed : int or numpy.random.Generator, optional
        For ``"normal"`` / ``"uniform"``.
    chunk_bytes : int, default 32 MiB
        Initialisation works in blocks of whole rows of about this size: creating a 50 GB table
        needs one block of memory, not 50 GB.

    Returns
    -------
    numpy.memmap
        Of the table's dtype; for bfloat16 a view of the mapped ``uint16`` bits (still a
        ``numpy.memmap`` of the file: kernels update it in place and prefetch finds it mapped).

    Raises
    ------
    FileNotFoundError
        ``mode`` ``"r"`` / ``"c"`` (or ``"r+"`` without sizes) and no file.
    ValueError
        The file's shape does not match ``num_embeddings`` / ``embedding_dim``, the file is not a
        2-D ``.npy`` table, is truncated, or a bad argument.
    TypeError
        A dtype the engine does not train, or the file's dtype is not ``dtype``.
    OSError
        Creating: the disk has no room for the table (its space is reserved or written at creation,
        so training through the mapping cannot meet a full disk); an existing file is left as it was.

    Notes
    -----
    A created file is written under a temporary sibling name, synced and renamed into place: a
    crash while creating leaves no half-initialised table behind. A ``path`` that is a symbolic link
    creates the file where the link points (its directory must exist) and keeps the link. Changes made through an
    ``"r+"`` mapping reach the file when the operating system writes the pages back, at the
    latest when ``table.flush()`` is called (``save_checkpoint`` gives crash-safe snapshots).
    Truncating or replacing the file while it is mapped is undefined behaviour (the process may be
    killed by SIGBUS): keep table files for cembed alone. The mapping is advised ``MADV_RANDOM``:
    a row read from disk costs one page, not the kernel's usual read-around (see
    :func:`cembed.functional.prefetch` to read rows ahead).

    ``numpy.load(path, mmap_mode="r")`` of a bfloat16 table gives its ``uint16`` bits;
    ``.view(ml_dtypes.bfloat16)`` restores the table (no copy).

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "words.npy")
    >>> table = cembed.open_table(path, 1000, 16, init="normal", seed=0)
    >>> bool((table == cembed.Embedding(1000, 16, seed=0).weight).all())
    True
    >>> emb = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    >>> opt = cembed.optim.SGD(emb.parameters(), lr=0.1)
    >>> emb.backward(np.ones((1, 16), np.float32), np.array([3]), optimizer=opt)
    >>> table.flush(); again = cembed.open_table(path, mode="r")
    >>> bool((again[3] == emb.weight[3]).all()), again.shape
    (True, (1000, 16))
    """
    mode = check_choice(mode, "mode", _MODES)
    init = _check_init(init)
    chunk_bytes = check_int(chunk_bytes, "chunk_bytes", low=1)
    if num_embeddings is not None:
        num_embeddings = check_size(num_embeddings, "num_embeddings")
    if embedding_dim is not None:
        embedding_dim = check_size(embedding_dim, "embedding_dim")
    want_dtype = check_table_dtype(dtype) if dtype is not None else None
    path = os.fspath(path)
    exists = os.path.exists(path)
    # a table is never renamed over a device, a FIFO or a directory; through a symbolic link (a table put on
    # another disk) the file is created where the link points, and the link stays
    target = written_path(path, "a table is never written there") if mode in ("w+", "r+") else path
    if mode == "w+" and exists and not os.access(path, os.W_OK):   # (its replacement keeps its mode: unwritable too)
        raise PermissionError(errno.EACCES, "the table file is read-only: mode='w+' cannot recreate it", path)
    if mode == "w+" or (mode == "r+" and not exists):
        if num_embeddings is None or embedding_dim is None:
            if mode == "r+":
                raise FileNotFoundError(f"{path}: no such table; to create it give num_embeddings and "
                                        "embedding_dim")
            raise ValueError("mode='w+' creates a table: num_embeddings and embedding_dim are needed")
        _create_table(target, (num_embeddings, embedding_dim), want_dtype or np.dtype(np.float32), init, seed,
                      chunk_bytes)
    header = read_header(path)
    if len(header.shape) != 2:
        raise ValueError(f"{path}: a table must be 2-D (num_embeddings, embedding_dim), the file holds shape "
                         f"{header.shape}")
    if not header.dtype.isnative:
        raise TypeError(f"{path}: holds {header.dtype.str}, not in native byte order")
    if want_dtype is not None:
        header = _logical(header, want_dtype, path)
    elif header.dtype == _UINT16:
        raise TypeError(f"{path}: holds uint16; a bfloat16 table is stored as its uint16 bits: open it with "
                        "dtype='bfloat16'")
    elif not (header.dtype in FULL_DTYPES or is_half(header.dtype)):
        raise TypeError(f"{path}: holds {header.dtype}; a table must have a float dtype the engine trains "
                        "(float32, float64, float16, or bfloat16 stored as uint16 bits)")
    for got, want, name in ((header.shape[0], num_embeddings, "num_embeddings"),
                            (header.shape[1], embedding_dim, "embedding_dim")):
        if want is not None and got != want:
            raise ValueError(f"{path}: holds a table of shape {header.shape}, {name}={want} was asked for")
    return _map(path, header, "r+" if mode == "w+" else mode)


#: How the kernel is told a mapping will be read (``madvise``): ``"random"`` turns off the
#: read-around of page faults (a fault on one row reads its own page, not the 128 KiB around it:
#: rows are touched at random, and read-around would fill the page cache with rows nobody asked
#: for); ``"sequential"`` for whole-array passes; ``"normal"`` the kernel's default.
ADVICE = {"random": "MADV_RANDOM", "sequential": "MADV_SEQUENTIAL", "normal": "MADV_NORMAL"}


def maps_file_read_only(array: Any) -> bool:
    """True when ``array`` is a memory map cembed made read-only (mode ``"r"``): its pages are the
    file's, and nothing can be written through it. A copy-on-write map (``"c"``: its changes live in
    private pages, never in the file) or a read-write one made read-only afterwards
    (``flags.writeable = False``) is not."""
    known = _mapping(array)
    return known is not None and known[2] == "r"


def _map(path: str, header: NpyHeader, mode: str, advice: str = "random") -> np.memmap:
    """Map the array of a checked ``.npy`` file, with the access ``advice``; ``header.dtype`` may be
    the logical dtype (bfloat16: the file's ``uint16`` bits are mapped and viewed as bfloat16)."""
    if header.nbytes == 0:
        # mmap cannot map zero bytes: an empty table is an ordinary (empty) array in a memmap
        return np.zeros(header.shape, dtype=header.dtype).view(np.memmap)
    stored = file_dtype(header.dtype)
    with open_regular(path, "rb" if mode in ("r", "c") else "r+b") as fh:
        status = os.fstat(fh.fileno())
        if status.st_size < header.offset + header.nbytes:   # replaced since its header was read
            raise ValueError(f"{path}: truncated file: {status.st_size} bytes, its header needs "
                             f"{header.offset + header.nbytes}")
        array = np.memmap(fh, dtype=stored, mode=mode, offset=header.offset,  # type: ignore[call-overload]
                          shape=header.shape)
    mm = getattr(array, "_mmap", None)
    if mm is not None:
        # (device, inode, mode, the file offset the map starts at: numpy.memmap maps from the offset
        # rounded down to the allocation granularity)
        _MAPPED[mm] = (status.st_dev, status.st_ino, mode, header.offset - header.offset % mmap.ALLOCATIONGRANULARITY)
    flag = getattr(mmap, ADVICE[advice], None)
    if mm is not None and flag is not None and hasattr(mm, "madvise"):
        try:
            mm.madvise(flag)
        except OSError:  # pragma: no cover - advice only
            pass
    if stored != header.dtype:
        array = array.view(header.dtype)   # still a numpy.memmap of the file (its _mmap is kept)
    return array


def map_array(path: PathLike, mode: str = "r", header: Optional[NpyHeader] = None,
              advice: str = "random", dtype: Any = None) -> np.memmap:
    """Map the whole array of the ``.npy`` file ``path`` (any shape, checked with
    :func:`read_header`): ``mode`` ``"r"``, ``"r+"`` or ``"c"``; ``advice`` ``"random"`` (rows
    touched at random: no read-around), ``"sequential"`` (one pass) or ``"normal"`` (see
    :data:`ADVICE`). ``dtype``: the array's logical dtype, checked against the file
    (:func:`file_dtype`; ``"bfloat16"`` maps a file of ``uint16`` bits as bfloat16); default: the
    file's own dtype.

    Examples
    --------
    >>> import os, tempfile, numpy as np, cembed
    >>> path = os.path.join(tempfile.mkdtemp(), "v.npy"); np.save(path, np.arange(4.0))
    >>> cembed.storage.map_array(path).tolist()
    [0.0, 1.0, 2.0, 3.0]
    """
    mode = check_choice(mode, "mode", ("r", "r+", "c"))
    advice = check_choice(advice, "advice", tuple(ADVICE))
    path = os.fspath(path)
    header = header if header is not None else read_header(path)
    if dtype is not None:
        header = _logical(header, dtype, path)
    return _map(path, header, mode, advice)


# ============================================================================ process memory

def _libc_function(name: str, argtypes: list, restype: Any) -> Any:
    """A C library function through ctypes, or None where the platform has none (not Linux/glibc)."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes, function.restype = argtypes, restype
    return function


_malloc_trim = _libc_function("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
#: Linux ``fallocate(fd, mode, offset, len)`` (64-bit offsets), or None (:func:`_reserve_space`).
_fallocate = (_libc_function("fallocate64", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_int)
              or _libc_function("fallocate", [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
                                ctypes.c_int))


def release_free_memory() -> bool:
    """Return the heap memory the process has freed to the operating system (glibc's
    ``malloc_trim``); True when it was called.

    A set-up that allocates and frees large temporaries (a vocabulary, a sampling table) can leave
    hundreds of MiB freed but still held by the C allocator: under a memory limit that is memory
    the page cache of tables on disk cannot use. Values are never changed. Elsewhere than glibc it
    does nothing and returns False.

    Examples
    --------
    >>> import cembed
    >>> cembed.storage.release_free_memory() in (True, False)
    True
    """
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True
