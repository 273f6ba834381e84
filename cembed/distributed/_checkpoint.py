"""A shard's checkpoint on disk: one directory per saved step, one ``.npy`` per array plus a JSON
manifest (shapes, dtypes, SHA-256 of every file, and the caller's metadata), and a ``LATEST`` file
naming the current step directory, replaced atomically (write a temporary file, fsync, rename).

A save never touches the directory ``LATEST`` points to: it writes a new one, syncs it, then swings
``LATEST``; an interrupted save leaves the previous checkpoint readable. A load checks the manifest
and every checksum before it returns anything.

This is the only place shards read or write files; it stands in for the library-wide checkpoint
directory format and keeps the same shape (``.npy`` per array, JSON manifest with checksums,
atomic switch)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Dict, Optional, Tuple

import numpy as np

__all__ = ["save_arrays", "load_arrays", "CheckpointError"]

FORMAT = "cembed-shard-checkpoint-1"
_LATEST = "LATEST"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing pieces, or whose files do not match their checksums."""


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_arrays(directory: str, name: str, arrays: Dict[str, np.ndarray], meta: Dict[str, Any]) -> None:
    """Write ``arrays`` and ``meta`` as checkpoint ``name`` under ``directory`` and make it the latest;
    older checkpoints of ``directory`` are removed once the switch is on disk."""
    os.makedirs(directory, exist_ok=True)
    final = os.path.join(directory, name)
    tmp = os.path.join(directory, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    entries = {}
    for key, arr in arrays.items():
        fname = f"{key}.npy"
        path = os.path.join(tmp, fname)
        with open(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        entries[key] = {"file": fname, "shape": list(arr.shape), "dtype": arr.dtype.str, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "meta": meta, "arrays": entries}
    with open(os.path.join(tmp, "manifest.json"), "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)   # a leftover of an earlier, interrupted run of this step
    os.rename(tmp, final)
    latest_tmp = os.path.join(directory, f".{_LATEST}.tmp-{os.getpid()}")
    with open(latest_tmp, "w", encoding="utf-8") as fh:
        fh.write(name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(latest_tmp, os.path.join(directory, _LATEST))
    _fsync_path(directory)
    for other in os.listdir(directory):
        if other not in (name, _LATEST) and not other.startswith("."):
            shutil.rmtree(os.path.join(directory, other), ignore_errors=True)


def load_arrays(directory: str) -> Optional[Tuple[Dict[str, np.ndarray], Dict[str, Any]]]:
    """The latest checkpoint under ``directory`` as ``(arrays, meta)``; None when there is none.

    Raises
    ------
    CheckpointError
        A manifest or file that is missing, of another format, or fails its checksum."""
    try:
        with open(os.path.join(directory, _LATEST), encoding="utf-8") as fh:
            name = fh.read().strip()
    except FileNotFoundError:
        return None
    where = os.path.join(directory, name)
    try:
        with open(os.path.join(where, "manifest.json"), encoding="utf-8") as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {where}: not a {FORMAT} manifest")
    arrays = {}
    for key, entry in manifest["arrays"].items():
        path = os.path.join(where, entry["file"])
        if os.path.basename(entry["file"]) != entry["file"]:
            raise CheckpointError(f"checkpoint {where}: bad file name {entry['file']!r}")
        try:
            digest = _sha256(path)
        except OSError as exc:
            raise CheckpointError(f"checkpoint {where}: cannot read {entry['file']} ({exc})") from None
        if digest != entry["sha256"]:
            raise CheckpointError(f"checkpoint {where}: {entry['file']} does not match its checksum")
        arr = np.load(path, allow_pickle=False)
        if list(arr.shape) != entry["shape"] or arr.dtype.str != entry["dtype"]:
            raise CheckpointError(f"checkpoint {where}: {entry['file']} is {arr.shape} {arr.dtype}, the manifest "
                                  f"says {tuple(entry['shape'])} {entry['dtype']}")
        arrays[key] = np.array(arr, order="C", copy=True)
    return arrays, manifest["meta"]
