"""One shard of a row-sharded table: plain Python (a Ray actor only by ``ray.remote(Shard)`` in the
client), holding global rows ``shard_id, shard_id + num_shards, ...`` as a local
:class:`cembed.Embedding` and their optimizer state in a :mod:`cembed.optim` optimizer.

Every call carries the step count the client believes the shard is at. A shard that is at another
step (it was restarted and restored an older checkpoint) does nothing and answers with its own step,
so the client can replay what it missed; it never serves rows of the wrong step."""
from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import functional as F
from .. import optim
from ..checkpoint import MANIFEST, CheckpointError, find_directory, load_checkpoint, read_directory, save_checkpoint
from ..storage import aligned_copy, aligned_zeros, open_table
from ..modules import Embedding
from ..sparse import SparseGrad
from ._init import initial_rows

__all__ = ["Shard", "OPTIMIZERS", "make_optimizer", "writable_directory", "held_checkpoints"]

#: A shard keeps its two latest checkpoints, in two slots of its directory that its saves replace in
#: turn (each save crash-safely replaces the older one). A client killed while its shards write a
#: checkpoint leaves some of them holding the new step and the rest the one before, which all of
#: them still hold: the step a resumed run continues from.
SLOTS = ("a", "b")
#: The lineage of a table's states until its first load_state_dict / load_checkpoint (each load
#: starts a new one): a shard's checkpoint holds the same state as another shard's when their
#: lineage and step agree.
FIRST_LINEAGE = "seed"

#: Optimizer names accepted by ShardedEmbedding -> cembed.optim classes. Each updates a row from
#: that row's summed gradient, its own state and the step count alone, so a shard updates its rows
#: exactly as one process would.
OPTIMIZERS = {
    "sgd": optim.SGD,
    "adagrad": optim.Adagrad,
    "sparseadam": optim.SparseAdam,
    "rowwise_adagrad": optim.RowWiseAdagrad,
}


def make_optimizer(name: str, module: Any, options: Dict[str, Any]) -> Any:
    """``OPTIMIZERS[name]([module], **options)``."""
    return OPTIMIZERS[name]([module], **options)


def local_rows(shard_id: int, num_shards: int, num_embeddings: int) -> int:
    """How many global rows ``r`` with ``r % num_shards == shard_id`` a table of ``num_embeddings`` has."""
    return len(range(shard_id, num_embeddings, num_shards))


def held_checkpoints(shard_dir: str) -> List[Dict[str, Any]]:
    """The checkpoints in the slots of ``shard_dir``, newest (most recently written) first: dicts of
    ``slot``, ``path``, ``serial`` (the shard's count of its saves), ``lineage`` and ``step``. Only
    the manifests are read (the files are verified when one is loaded); a slot holding anything
    that is not a readable shard checkpoint is a :class:`CheckpointError` naming it — never skipped,
    which would silently resume an older step."""
    held = []
    for slot in SLOTS:
        path = os.path.join(shard_dir, slot)
        try:
            found = find_directory(path)
        except CheckpointError:
            if os.path.lexists(path):
                raise
            continue
        meta, _ = read_directory(found, verify=False)
        extra = meta.get("extra") if isinstance(meta, dict) else None
        if isinstance(extra, dict) and "step" in extra and "serial" not in extra and "lineage" not in extra:
            extra = dict(extra, serial=0, lineage=FIRST_LINEAGE)   # moved here from the one-slot layout
        keys = ("serial", "lineage", "step")
        if not isinstance(extra, dict) or any(key not in extra for key in keys) \
                or not all(isinstance(extra[key], int) and not isinstance(extra[key], bool) and extra[key] >= 0
                           for key in ("serial", "step")) or not isinstance(extra["lineage"], str):
            raise CheckpointError(f"{found}: not a shard checkpoint (its manifest's extra lacks serial, lineage "
                                  "or step)")
        held.append({"slot": slot, "path": found, **{key: extra[key] for key in keys}})
    if not held and os.path.isfile(os.path.join(shard_dir, MANIFEST)):
        raise CheckpointError(f"{shard_dir} holds its checkpoint in the one-slot layout of cembed before "
                              f"2026-11-27 (the checkpoint files in the shard's directory itself): move them "
                              f"into {os.path.join(shard_dir, SLOTS[0])}/ to resume the run")
    return sorted(held, key=lambda h: -h["serial"])


class Shard:
    """Rows ``shard_id::num_shards`` of a table and their optimizer state.

    Built fresh from ``seed`` (step 0), or — when ``checkpoint_dir`` holds a checkpoint, as after a
    restart by Ray or when a table resumes a run — restored from its latest checkpoint (that
    checkpoint's step; :meth:`rewind` then moves a resumed shard back to the one before it).
    ``resume``: the checkpoint must be there (a table resuming a run, ``run_id``)."""

    def __init__(self, shard_id: int, num_shards: int, num_embeddings: int, embedding_dim: int, optimizer: str,
                 optimizer_options: Dict[str, Any], padding_idx: Optional[int], dtype: str, seed: int, init: str,
                 checkpoint_dir: Optional[str], checkpoint_every: Optional[int],
                 cpus: Any = None, storage_dir: Optional[str] = None, resume: bool = False) -> None:
        _numpy_only_channels()
        # pinned first: every thread this process starts later (Ray's graph threads) inherits it
        self.cpus = None if cpus is None else pin_process(shard_cpus(cpus, shard_id, num_shards))
        self.shard_id, self.num_shards = shard_id, num_shards
        self.num_embeddings = num_embeddings
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.rows = local_rows(shard_id, num_shards, num_embeddings)
        self.held = held_checkpoints(checkpoint_dir) if checkpoint_dir is not None else []
        restore = bool(self.held)
        if resume and not restore:
            raise CheckpointError(f"{checkpoint_dir}: no checkpoint of shard {shard_id} of {num_shards} to resume "
                                  "(the run_id, checkpoint_dir and num_shards of the run that wrote it are needed)")
        if checkpoint_dir is not None and not restore:
            # a directory it cannot write is an error now, not at its first checkpoint; a restarted
            # shard only reads (a full disk must not keep it from restoring)
            writable_directory(checkpoint_dir, "checkpoint_dir")
        table_dtype = Embedding(1, 1, dtype=dtype, seed=0).weight.dtype   # the name resolved ("bfloat16")
        global_rows = np.arange(shard_id, num_embeddings, num_shards, dtype=np.int64)
        self.storage_dir = storage_dir
        weight: np.ndarray
        if storage_dir is not None:
            # rows in a memory-mapped .npy file (cembed.open_table), built block by block from the same
            # initial values (a 16-bit table: the float32 ones rounded to nearest, as initial_rows does);
            # a restarted shard rebuilds it and the checkpoint then overwrites it
            writable_directory(storage_dir, "storage_dir")

            def fill(block: np.ndarray, start: int) -> None:
                block[...] = initial_rows(seed, global_rows[start:start + len(block)], embedding_dim, block.dtype,
                                          "zeros" if restore else init)
            weight = open_table(os.path.join(storage_dir, "rows.npy"), self.rows, embedding_dim, table_dtype,
                                mode="w+", init=fill)
        elif restore:   # restarted by Ray: the values come from the checkpoint
            weight = aligned_zeros((self.rows, embedding_dim), table_dtype)
        else:
            weight = initial_rows(seed, global_rows, embedding_dim, table_dtype, init)
        if not restore and padding_idx is not None and padding_idx % num_shards == shard_id:
            weight[padding_idx // num_shards] = 0
        self.emb = Embedding.from_pretrained(weight, freeze=False, sparse=True)
        # a 16-bit table's rows round stochastically with the random bits of their global rows
        # (rounding_rows: local row i is global row shard_id + num_shards * i), as one process does;
        # on disk, the optimizer's per-row state lives in memory-mapped files beside the rows
        options = dict(optimizer_options, rounding_rows=(shard_id, num_shards))
        if storage_dir is not None:
            options["state_dir"] = os.path.join(storage_dir, "state")
        self.opt = make_optimizer(optimizer, self.emb, options)
        self.step = 0
        self.lineage = FIRST_LINEAGE
        self.restored_from: Optional[int] = None
        self.saved_step: Optional[int] = None   # the step of the checkpoint holding the current state
        self.saved_slot: Optional[str] = None   # the slot of that checkpoint (the next save writes the other)
        self.serial = max((h["serial"] for h in self.held), default=0)   # saves so far (the newest's serial)
        if restore:
            self._restore(self.held[0])
            self.restored_from = self.step

    def _restore(self, held: Dict[str, Any]) -> None:
        """Take the state of checkpoint ``held`` (an entry of :func:`held_checkpoints`)."""
        extra = load_checkpoint(held["path"], {"rows": self.emb}, self.opt, mmap=False)
        if not isinstance(extra, dict) or extra.get("shard") != [self.shard_id, self.num_shards]:
            raise CheckpointError(f"{held['path']}: not the checkpoint of shard {self.shard_id} of {self.num_shards}")
        self.step = self.saved_step = int(held["step"])
        self.lineage, self.saved_slot = held["lineage"], held["slot"]

    # ---------------------------------------------------------------- calls from the client
    def gather(self, step: int, rows: np.ndarray) -> Tuple[int, Optional[np.ndarray]]:
        """``(step, weight[rows])``; ``(own step, None)`` when the shard is not at ``step``."""
        if step != self.step:
            return self.step, None
        return self.step, F.embedding(rows, self.emb.weight)   # rows checked against this shard's table

    def apply(self, step: int, update: Tuple[Any, ...]) -> Tuple[bool, int, Optional[str], Any]:
        """Apply step ``step``: the optimizer's update for ``update = (rows, values)``, the summed
        gradient ``values`` of local rows ``rows`` (ascending, distinct; may be empty — the step
        still counts, as in one process; one argument, so that Ray ships both as one object).
        Returns ``(True, step + 1, None, holding)``; or ``(False, own step, None, None)`` without
        changing anything when the shard is not at ``step``. Writes a checkpoint when the new step is a multiple of
        ``checkpoint_every`` (before answering: an answered step is on disk), keeping the state
        ``keep`` when ``update = (rows, values, keep)`` (see :meth:`save`). A checkpoint that
        cannot be written does not undo the step: the answer is then ``(True, step + 1, why,
        holding)``. ``holding``: after a checkpoint (written or not) the states this shard's slots
        hold (:meth:`holding`), else None. An optimizer that refuses the step raises, and the
        shard stays at ``step``."""
        if step != self.step:
            return False, self.step, None, None
        rows, values = update[0], update[1]
        keep = update[2] if len(update) > 2 else None
        self.emb.grad = SparseGrad(rows, values, self.rows)
        try:
            self.opt.step()
        finally:
            self.emb.grad = None
        self.step += 1
        if self.checkpoint_every and self.step % self.checkpoint_every == 0:
            why = self._try_save(keep)
            return True, self.step, why, self.holding()
        return True, self.step, None, None

    def _try_save(self, keep: Any = None) -> Optional[str]:
        """:meth:`save`; None, or why the checkpoint could not be written (the state is unchanged;
        what the slots hold is read again from disk: a save can fail after its rename)."""
        try:
            self.save(keep)
        except Exception as exc:
            try:
                assert self.checkpoint_dir is not None
                self.held = held_checkpoints(self.checkpoint_dir)
            except Exception:
                pass
            return f"{type(exc).__name__}: {exc}"
        return None

    def call(self, request: Tuple[str, int, Any]) -> Any:
        """``("gather", step, rows)`` or ``("apply", step, (rows, values[, keep]))``: :meth:`gather` or
        :meth:`apply` — the one method of the compiled graph the client drives this shard through
        (Ray runs a compiled graph's calls on a thread of its own; the client never has a compiled
        call and an ordinary one in flight to the same shard at once)."""
        op, step, payload = request
        if op == "gather":
            return self.gather(step, payload)
        if op == "apply":
            return self.apply(step, payload)
        raise ValueError(f"unknown shard request {op!r}")

    def current_step(self) -> int:
        return self.step

    def checkpoint(self, keep: Any = None) -> Tuple[int, Optional[str], Any]:
        """Checkpoint the current step unless the latest checkpoint holds it (a table shutting down:
        its last steps are on disk, for a run resumed later), keeping the state ``keep`` (see
        :meth:`save`). ``(step, None, holding)``, or ``(step, why, holding)`` when it could not be
        written (the state is unchanged); ``holding``: :meth:`holding`, after it."""
        if self.checkpoint_dir is None or self.saved_step == self.step:
            return self.step, None, self.holding()
        why = self._try_save(keep)
        return self.step, why, self.holding()

    def holding(self) -> List[Tuple[str, int]]:
        """The states ``(lineage, step)`` this shard's checkpoint slots hold, newest first (at start:
        the one it restored, and the one before it)."""
        return [(h["lineage"], h["step"]) for h in self.held]

    def rewind(self, lineage: str, step: int) -> Tuple[int, Optional[str], List[Tuple[str, int]]]:
        """A resumed shard whose newest checkpoint is ahead of another shard's: take the state of its
        other checkpoint, ``(lineage, step)``, and write it again as its newest (so that a restart
        restores it, and the abandoned state is gone from disk once that save is complete).
        ``(step, None, holding)``, or ``(step, why, holding)`` when that save could not be written
        (the state is the rewound one; the disk still holds the abandoned one as the newest);
        ``holding``: :meth:`holding`, after it. Raises :class:`CheckpointError` when it holds no
        such checkpoint."""
        for held in self.held:
            if held["lineage"] == lineage and held["step"] == step:
                break
        else:
            raise CheckpointError(f"shard {self.shard_id} holds no checkpoint of step {step} (lineage {lineage})")
        why = None
        if self.saved_slot != held["slot"] or self.step != step:
            self._restore(held)
            self.restored_from = self.step
            why = self._try_save((lineage, step))
        return self.step, why, self.holding()

    def options(self) -> Dict[str, Any]:
        """The optimizer's hyper-parameters (its param group without ``params`` and this shard's
        ``rounding_rows``): those of the checkpoint a resumed shard restored."""
        group = self.opt.state_dict()["param_groups"][0]
        return {key: value for key, value in group.items() if key not in ("params", "rounding_rows")}

    def info(self) -> Dict[str, Any]:
        """Process id, step, the step a checkpoint was restored at (None: built from the seed), the
        CPUs the process is pinned to (None: not pinned)."""
        return {"pid": os.getpid(), "step": self.step, "restored_from": self.restored_from,
                "shard_id": self.shard_id, "rows": self.rows, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
                "cpus": self.cpus}

    def state(self) -> Tuple[int, np.ndarray, Dict[str, Any]]:
        """``(step, weight, optimizer state entry)`` (copies; the entry is empty before the first
        update of optimizers that create their state lazily)."""
        entry = self.opt.state_dict()["state"].get(0, {})
        return self.step, self.emb.weight.copy(), entry

    def load(self, step: int, weight: np.ndarray, entry: Dict[str, Any],
             options: Optional[Dict[str, Any]] = None, lineage: str = FIRST_LINEAGE,
             keep: Any = None) -> Tuple[int, Optional[str], List[Tuple[str, int]]]:
        """Take ``weight`` and optimizer state ``entry`` as the state at ``step`` (checked by the
        optimizer first: a refused state changes nothing), then checkpoint it when checkpointing.
        ``options``: the optimizer's hyper-parameters to take as well (a loaded checkpoint's; this
        shard's ``rounding_rows`` are kept). ``lineage``: the load's name, the same on every shard
        (its checkpoints' states are told apart from earlier ones of the same step by it); ``keep``:
        the checkpointed state to keep (:meth:`save`). Returns
        ``(step, None, holding)``, or ``(step, why, holding)`` when the checkpoint of the loaded
        state could not be written (the state is loaded); ``holding``: :meth:`holding`, after it."""
        weight = np.asarray(weight)
        if weight.shape != self.emb.weight.shape or weight.dtype != self.emb.weight.dtype:
            raise ValueError(f"shard {self.shard_id}: weight {weight.shape} {weight.dtype} does not match "
                             f"{self.emb.weight.shape} {self.emb.weight.dtype}")
        weight = aligned_copy(weight)   # a private, page-aligned copy
        sd = self.opt.state_dict()
        sd["state"] = {0: entry} if entry else {}
        if options is not None:
            sd["param_groups"] = [dict(options, rounding_rows=(self.shard_id, self.num_shards), params=[0])]
        if self.storage_dir is not None:   # rows on disk: the state first (checked), then the rows copied in
            self.opt.load_state_dict(sd)
            np.copyto(self.emb.weight, weight)
        else:
            old = self.emb.weight
            self.emb.weight = weight
            try:
                self.opt.load_state_dict(sd)
            except Exception:
                self.emb.weight = old
                raise
        self.step, self.lineage = int(step), str(lineage)
        self.saved_step = None   # (not the state of any checkpoint until it is saved)
        why = self._try_save(keep) if self.checkpoint_dir is not None else None
        return self.step, why, self.holding()

    def save(self, keep: Any = None) -> None:
        """Checkpoint the current step into a slot of ``checkpoint_dir`` (cembed's checkpoint
        directory format: the rows as table ``"rows"``, the optimizer's state; in ``extra`` the
        step, the shard, the save's serial number and the state's lineage): the slot that does not
        hold ``keep = (lineage, step)`` — the newest state the client knows every shard to hold a
        checkpoint of, which a resumed run may need to go back to — or, when no slot holds it (None:
        no such state yet), the slot that does not hold this shard's latest checkpoint. A save that
        fails leaves both slots as they were."""
        if self.checkpoint_dir is None:
            raise ValueError("this shard has no checkpoint_dir")
        kept = [h["slot"] for h in self.held if keep is not None and (h["lineage"], h["step"]) == tuple(keep)]
        avoid = kept[0] if kept else self.saved_slot
        slot = SLOTS[1] if avoid == SLOTS[0] else SLOTS[0]
        serial = self.serial = self.serial + 1   # (taken even by a save that fails: serials never repeat)
        path = save_checkpoint(os.path.join(self.checkpoint_dir, slot), {"rows": self.emb}, self.opt,
                               extra={"step": self.step, "shard": [self.shard_id, self.num_shards],
                                      "serial": serial, "lineage": self.lineage})
        self.saved_slot, self.saved_step = slot, self.step
        self.held = [{"slot": slot, "path": path, "serial": serial, "lineage": self.lineage, "step": self.step}] + \
            [h for h in self.held if h["slot"] != slot][:1]


def shard_cpus(cpus: Any, shard_id: int, num_shards: int) -> List[int]:
    """The CPUs shard ``shard_id`` asks for: ``cpus`` itself (a sequence of CPU numbers), or for
    ``"spread"`` its share of the CPUs this process may use — every ``num_shards``-th one from its
    own position, or one CPU (shard ``shard_id`` modulo their count) when there are fewer CPUs than
    shards — so that the shards on one node run on different cores."""
    if isinstance(cpus, str):
        allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not allowed:
            return []
        if len(allowed) >= num_shards:
            return allowed[shard_id::num_shards]
        return [allowed[shard_id % len(allowed)]]
    return [int(c) for c in cpus]


def pin_process(cpus: Sequence[int]) -> List[int]:
    """Restrict every thread of this process to ``cpus`` (those of them this process may use; all
    it may use when none is): the threads started later inherit it from the thread that starts
    them. Returns the CPUs used; ``[]`` where the system cannot pin (not Linux)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    allowed = os.sched_getaffinity(0)
    wanted = {int(c) for c in cpus} & allowed or allowed
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, wanted)
        except OSError:    # a thread that just ended
            pass
    return sorted(wanted)


def _numpy_only_channels() -> None:
    """In a Ray actor: tell Ray's compiled-graph channels that this process sends no torch tensors.
    Otherwise the first compiled call imports torch (when it is installed) only to pick a device for
    tensors — seconds per shard process on a busy machine; a shard sends NumPy arrays only. Uses
    Ray's ``ChannelContext`` (a developer API); a Ray without it is left as it is."""
    if "ray" not in sys.modules:
        return
    try:
        from ray.experimental.channel.common import ChannelContext

        ChannelContext.get_current()._torch_available = False
    except Exception:    # another Ray: it probes for torch, which costs time, not correctness
        pass


def writable_directory(path: str, name: str) -> None:
    """Create directory ``path`` (and its parents) if needed and check that a file can be written in
    it; ``ValueError`` naming ``name`` and the reason otherwise."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".cembed-probe-{os.getpid()}")
        with open(probe, "wb") as f:
            f.write(b"0")
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"{name} {path!r} cannot be used as a directory: {type(exc).__name__}: {exc}") from None

