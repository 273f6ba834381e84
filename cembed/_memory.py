"""Whether arrays share memory — at one address, or as two memory maps of overlapping bytes of one
file — and which file a map holds: the one rule for every "may these two arrays alias?" question
(the kernels' inputs against what they write: ``functional``'s fused updates, the optimizers'
state, checkpoints). Public through :mod:`cembed.storage` (``may_share_file_pages``,
``first_overlap``, ``mapped_file_id``); here, below both ``storage`` and ``functional``, so that both
use it.
"""
from __future__ import annotations

import mmap
import os
import weakref
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

#: The file (``st_dev``, ``st_ino``) each mapping made by ``storage._map`` maps, its mode and the file
#: offset it starts at: a file name can be given to another file later (a checkpoint saved again), the
#: mapping keeps the file it was made of. Keyed by the ``mmap`` object, so neither an array's
#: attributes nor its flags can change them.
_MAPPED: "weakref.WeakKeyDictionary[mmap.mmap, Tuple[int, int, str, int]]" = weakref.WeakKeyDictionary()


def _mapping(array: Any) -> Optional[Tuple[int, int, str, int]]:
    mm = getattr(array, "_mmap", None) if isinstance(array, np.memmap) else None
    return _MAPPED.get(mm) if mm is not None else None


def mapped_file_id(array: Any) -> Optional[Tuple[int, int]]:
    """``(st_dev, st_ino)`` of the file a memory map made by cembed (:func:`open_table`,
    :func:`map_array`, checkpoints, ``state_dir``) maps, or None for any other array."""
    known = _mapping(array)
    return None if known is None else (known[0], known[1])


#: Where a map's first byte lies: ``((st_dev, st_ino), file offset, mode)``, or None.
Where = Optional[Tuple[Tuple[int, int], int, str]]
#: An array's part of a file: ``((st_dev, st_ino), first byte, end byte, mode)``, or None.
Extent = Optional[Tuple[Tuple[int, int], int, int, str]]

#: The file mapping (``/proc/self/maps``) of each map cembed did not make, found once per ``mmap`` object
#: (answers read from /proc/self/maps only: a failed read is tried again at the next call).
_FOUND: "weakref.WeakKeyDictionary[mmap.mmap, Where]" = weakref.WeakKeyDictionary()

#: _file_extent's answers by array (id -> (weak reference, answer)): an array's memory, hence the file
#: bytes it maps, never changes while it lives; the entry goes with the array.
_EXTENTS: Dict[int, Tuple[Any, Any]] = {}


def _file_extent(array: Any) -> Extent:
    """:func:`_extent`'s answer, remembered for the array's life."""
    if not isinstance(array, np.memmap) and not isinstance(getattr(array, "base", None), np.ndarray):
        return _extent(array)[0]   # (neither a memmap nor a view of an array: cheap, not remembered)
    key = id(array)
    known = _EXTENTS.get(key)
    if known is not None and known[0]() is array:
        return known[1]
    answer, keep = _extent(array)
    if not keep:   # (a failed read of /proc/self/maps: asked again next time)
        return answer

    def forget(_: Any) -> None:
        _EXTENTS.pop(key, None)

    try:
        _EXTENTS[key] = (weakref.ref(array, forget), answer)
    except TypeError:   # (an object without weak references: not remembered)
        pass
    return answer


def _extent(array: Any) -> Tuple[Extent, bool]:
    """(``((st_dev, st_ino), first byte, end byte, mode)`` of the part of a file the array covers when
    its memory is a file's memory map (a ``numpy.memmap``, a view of one, or any array whose base is
    one), mode ``"r+"`` for a shared writable map, ``"c"`` for a private one, ``"r"`` read-only; None
    for any other array, an empty one, or a map whose file cannot be told — and whether that answer
    may be kept: False when ``/proc/self/maps`` could not be read for it). The file is the one mapped
    (recorded when cembed mapped it, else read from ``/proc/self/maps``), not whatever file has its
    name now."""
    if not isinstance(array, np.ndarray) or array.size == 0:
        return None, True
    mm, owner = _underlying_map(array)
    if mm is None:
        return None, True
    try:
        base = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data   # the address of the map's first byte
    except (TypeError, ValueError, BufferError):   # closed
        return None, True
    read = True
    known = _MAPPED.get(mm)
    if known is not None:
        where: Where = (known[:2], known[3], known[2])
    else:   # a map cembed did not make: looked up once per map (its file and place never change), not per view
        try:
            where = _FOUND[mm]
        except (KeyError, TypeError):   # (TypeError: an object without weak references, never kept)
            where, read = _kernel_mapping(base, owner)
            if read:   # (only an answer /proc/self/maps gave is kept: a failed read is tried again next time)
                try:
                    _FOUND[mm] = where
                except TypeError:
                    pass
    if where is None:
        return None, read
    file_id, start, mode = where
    low, high = _byte_bounds(array)
    return (file_id, start + (low - base), start + (high - base), mode), read


def _underlying_map(array: np.ndarray) -> Tuple[Optional[mmap.mmap], Optional[np.memmap]]:
    """(the ``mmap.mmap`` at the end of ``array``'s chain of bases — through memoryviews too — the
    ``numpy.memmap`` nearest it)."""
    obj: Any = array
    owner = None
    for _ in range(256):   # (a chain of views is short; a cycle cannot be made, but never loop forever)
        if isinstance(obj, mmap.mmap):
            return obj, owner
        if isinstance(obj, np.memmap):
            owner = obj
        # (numpy.frombuffer of an mmap keeps a memoryview of it as its base: the map is the view's obj)
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            break
    return None, None


def _kernel_mapping(address: int, owner: Optional[np.memmap]) -> Tuple[Where, bool]:
    """(``((st_dev, st_ino), file offset of ``address``, mode)`` of the file mapping that holds
    ``address``, or None; whether ``/proc/self/maps`` said so). From ``/proc/self/maps`` (Linux); where
    it cannot be read, from the ``numpy.memmap``'s own record (its file, by name — which may name
    another file by now — and offset), or None."""
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if lo <= address < hi:
                    inode = int(fields[4])
                    if inode == 0:
                        return None, True
                    major, minor = (int(x, 16) for x in fields[3].split(":"))
                    perms = fields[1]
                    mode = "c" if perms[3] == "p" else ("r+" if perms[1] == "w" else "r")
                    return ((os.makedev(major, minor), inode), int(fields[2], 16) + (address - lo), mode), True
        return None, True
    except (OSError, ValueError, IndexError):
        pass
    filename = getattr(owner, "filename", None)
    if owner is None or filename is None:
        return None, False
    try:
        status = os.stat(filename)
    except (OSError, TypeError):
        return None, False
    offset = int(owner.offset)
    return ((status.st_dev, status.st_ino), offset - offset % mmap.ALLOCATIONGRANULARITY, str(owner.mode)), False


def _byte_bounds(array: np.ndarray) -> Tuple[int, int]:
    """(first byte, end byte) addresses of ``array``'s elements (``byte_bounds``: in
    ``numpy.lib.array_utils`` since NumPy 2, ``numpy`` before)."""
    utils = getattr(np.lib, "array_utils", None)
    byte_bounds = getattr(utils if utils is not None else np, "byte_bounds")
    low, high = byte_bounds(array)
    return int(low), int(high)


def may_share_file_pages(a: Any, b: Any) -> bool:
    """True when the memory maps ``a`` and ``b`` cover overlapping bytes of one file and a write
    through one of them reaches the file (a shared read-write map, ``"r+"`` / ``"w+"``): a write through
    one is then seen through the other, though ``numpy.may_share_memory`` (which compares addresses)
    says no — two maps of one file are at two addresses. Two copy-on-write maps never share."""
    return _extents_share(_file_extent(a), _file_extent(b))


def _extents_share(a: Extent, b: Extent) -> bool:
    if a is None or b is None or a[0] != b[0] or not ({a[3], b[3]} & {"r+", "w+"}):
        return False
    return a[1] < b[2] and b[1] < a[2]


def may_share(a: Any, b: Any) -> bool:
    """Whether ``a`` and ``b`` may share memory: at one address (``numpy.may_share_memory``) or as maps
    of overlapping bytes of one file a write through one of them reaches (:func:`may_share_file_pages`)."""
    if np.may_share_memory(a, b):
        return True
    in_file = _file_extent(b)   # (b: the table or state a caller writes, usually in memory — then no file
    return in_file is not None and _extents_share(_file_extent(a), in_file)   # is looked up for a)


def first_overlap(arrays: List[Any],
                  matters: Optional[Callable[[int, int], bool]] = None) -> Optional[Tuple[int, int]]:
    """The indices ``(i, j)``, ``i < j``, of the first pair of ``arrays`` that may share memory — at one
    address (``numpy.may_share_memory``) or as maps of overlapping bytes of one file
    (:func:`may_share_file_pages`) — among the pairs for which ``matters(i, j)`` holds (default: all);
    None if no pair does. Each array's place in its file is worked out once.

    Examples
    --------
    >>> import numpy as np, cembed
    >>> a = np.zeros(10)
    >>> cembed.storage.first_overlap([a[:5], np.ones(3), a[4:]])
    (0, 2)
    """
    extents: Dict[int, Any] = {}   # worked out when a pair that matters first needs one

    def extent(i: int) -> Any:
        if i not in extents:
            extents[i] = _file_extent(arrays[i])
        return extents[i]

    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            if matters is not None and not matters(i, j):
                continue
            if np.may_share_memory(arrays[i], arrays[j]) or _extents_share(extent(i), extent(j)):
                return i, j
    return None
