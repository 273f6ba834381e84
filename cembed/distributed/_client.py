"""The client of a row-sharded table: ``ShardedEmbedding`` (see its docstring)."""
from __future__ import annotations

import inspect
import os
import re
import threading
import time
import uuid
import weakref
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Type

import numpy as np

from .. import functional as F
from ..modules import Embedding
from ..sparse import SparseGrad
from ..storage import aligned_zeros
from ..checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ._init import INITS, check_seed
from ._ray import require_ray
from ._shard import FIRST_LINEAGE, OPTIMIZERS, Shard, local_rows, make_optimizer

#: SGD momentum's state entry listing the rows whose buffer is live (row ids, not one value per row)
ROW_LIST_KEY = "active_rows"

__all__ = ["ShardedEmbedding", "ShardLostError"]

#: checkpoint_every when a checkpoint_dir is given without it.
DEFAULT_CHECKPOINT_EVERY = 100

#: The largest recovery_timeout (seconds): the largest timeout a thread's wait takes.
MAX_RECOVERY_TIMEOUT = float(threading.TIMEOUT_MAX)
#: The Ray namespace of the shard actors, named ``cembed-<run id>-shard-<k>-of-<S>`` (one live table per run).
ACTOR_NAMESPACE = "cembed"
#: Seconds a new table waits for the actor names of a run to be free (a table just shut down frees them).
NAME_WAIT = 10.0
class _CheckpointNotWritten(RuntimeError):
    """A shard applied a step but could not write its checkpoint: the table stays usable.
    ``reasons``: which checkpoints, and why (for :meth:`ShardedEmbedding.shutdown`'s own report)."""

    def __init__(self, message: str, reasons: List[str]) -> None:
        super().__init__(message)
        self.reasons = reasons


def _refused_message(step: int, why: str, stopped: bool) -> str:
    """The error of a step every shard refused (none applied it): the table is at the step before it —
    stopped there by ``shutdown()``, or still running."""
    where = (f"shutdown() stopped the table at step {step}, the step before it" if stopped else
             f"the table stays at step {step}; the call that reports it did nothing else")
    return f"step {step} was refused by a shard and applied by none ({where}): {why}"


#: What a table's calls say once its shutdown() ran (a RuntimeError; ShardLostError means a lost shard).
_SHUT_DOWN = "the table was shut down"

#: A run id a table may resume (a new table draws 12 hex digits): one name, never a path.
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class _ReplayRefused(Exception):
    """A shard refused, while it was replayed, a step no shard had confirmed yet (``cause``: Ray's
    RayTaskError): that step's refusal, handled as :meth:`ShardedEmbedding._step_refused` does."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class ShardLostError(RuntimeError):
    """A shard that cannot be brought back to the table's current step: it died without a
    checkpoint to restart from, restored a checkpoint older than the replay log reaches, or did not
    come back within ``recovery_timeout`` seconds. The table cannot be used any more (its rows on
    that shard would be stale).

    Examples
    --------
    >>> from cembed.distributed import ShardLostError
    >>> issubclass(ShardLostError, RuntimeError)
    True
    """


def _check_int(value: Any, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


#: Terminal colour codes, which Ray puts into the messages of its errors.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _release_shards(ray: Any, graph_holder: Dict[str, Any], actors: List[Any]) -> None:
    """Tear down a table's compiled graph and stop its shard actors (their checkpoints stay): its
    :meth:`ShardedEmbedding.shutdown`, or its garbage collection without one. Nothing after
    ``ray.shutdown()`` (``ray.kill`` would start a new local Ray)."""
    if not ray.is_initialized():
        return
    graph = graph_holder.pop("graph", None)
    # (a garbage collection can run in any thread, Ray's own too, and a teardown joins Ray's threads:
    # off the main thread the actors are only killed, and Ray tears the graph down when it sees them go)
    if graph is not None and threading.current_thread() is threading.main_thread():
        try:
            graph.teardown()
        except Exception:   # a graph that broke may fail its teardown
            pass
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:   # an actor already gone
            pass


def _check_flag(value: Any, name: str) -> None:
    """A flag of this layer's API is a bool (``"False"`` is not false): ``TypeError`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _reason(exc: BaseException) -> str:
    """What a Ray error says went wrong, for a message: the first lines of the error raised in
    the shard (a RayTaskError's cause, or the creation error a RayActorError carries)."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and not isinstance(cause, type(exc)):
        return f"{type(cause).__name__}: {cause}"
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    if "\n  File " in text:   # a traceback (the creation error of an actor): its last line is the error
        text = text.splitlines()[-1].strip()
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _check_directory(path: Any, name: str) -> Optional[str]:
    """``path`` as an absolute path (None stays None), refused (``ValueError``) when it, or the
    nearest of its parents that exists, is not a directory. Nothing is created here (the shards
    create their directories on their own nodes, and check there that they can write in them)."""
    if path is None:
        return None
    try:
        absolute = os.path.abspath(os.fspath(path))
    except TypeError:
        raise TypeError(f"{name} must be a path (str or os.PathLike), got {type(path).__name__}") from None
    existing = absolute
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise ValueError(f"{name} {absolute!r} cannot be a directory: {existing!r} is not one")
    return absolute


def _probe_step(opt: Any, module: Embedding, dtype: np.dtype) -> None:
    """One update of ``opt`` with a zero sparse gradient of ``module``'s one row (a throwaway
    table): options the optimizer refuses only at a step with a sparse gradient (SGD's and
    Adagrad's ``weight_decay``) raise here, before any shard starts, instead of at every shard's
    first step."""
    module.grad = SparseGrad(np.zeros(1, dtype=np.int64), np.zeros((1, module.weight.shape[1]), dtype=dtype), 1)
    try:
        opt.step()
    finally:
        module.grad = None


def row_keys(rows: np.ndarray, num_shards: int, stride: int) -> np.ndarray:
    """The keys of validated global ``rows`` (a new int64 array): row ``r`` is key
    ``(r % num_shards) * stride + r // num_shards``, ``stride`` the rows of shard 0. Ascending keys
    are grouped by shard, and ascending by local row within a shard.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed.distributed._client import row_keys
    >>> row_keys(np.array([0, 1, 2, 3, 4]), num_shards=2, stride=3)
    array([0, 3, 1, 4, 2])
    """
    rows = np.asarray(rows)
    if num_shards == 1:
        return np.array(rows, dtype=np.int64, copy=True)
    if num_shards & (num_shards - 1) == 0:
        # a power of two: a mask and a shift, several times faster than an int64 divmod
        keys = np.bitwise_and(rows, num_shards - 1, dtype=np.int64)
        keys *= stride
        keys += np.right_shift(rows, num_shards.bit_length() - 1, dtype=np.int64)
        return keys
    local, keys = np.divmod(rows.astype(np.int64, copy=False), num_shards)
    keys *= stride
    keys += local
    return keys


def key_rows(keys: np.ndarray, num_shards: int, stride: int) -> np.ndarray:
    """The global rows of ``keys`` (the inverse of :func:`row_keys`), a new int64 array.

    Examples
    --------
    >>> import numpy as np
    >>> from cembed.distributed._client import key_rows
    >>> key_rows(np.array([0, 3, 1, 4, 2]), num_shards=2, stride=3)
    array([0, 1, 2, 3, 4])
    """
    shard, local = np.divmod(np.asarray(keys, dtype=np.int64), stride)
    local *= num_shards
    local += shard
    return local


def _inverse(order: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """For a grouping ``(order, distinct, starts)`` of n keys (:func:`cembed.functional.group_rows`):
    the position of each key among the distinct keys (``inverse[order[starts[s]:starts[s + 1]]] = s``).

    Examples
    --------
    >>> import numpy as np
    >>> from cembed.distributed._client import _inverse
    >>> _inverse(np.array([3, 1, 0, 2]), np.array([0, 1, 2, 4]))     # keys [3, 1, 3, 0]
    array([2, 1, 2, 0])
    """
    ids = np.repeat(np.arange(starts.size - 1, dtype=np.int64), np.diff(starts))
    inverse = np.empty(order.size, dtype=np.int64)
    inverse[order] = ids
    return inverse


class ShardedEmbedding:
    """A trainable embedding table whose rows live on ``num_shards`` Ray actors.

    Row ``r`` belongs to shard ``r % num_shards`` (local row ``r // num_shards``). Each shard holds
    its rows and their optimizer state and applies the optimizer's update to the rows it is sent.
    The client deduplicates indices, sends each shard only its rows (and, at a step, the summed
    gradient of those rows), and calls all shards at once before waiting for any.

    Training is bitwise equal to one process: ``N`` steps with any number of shards give exactly
    the weights and optimizer state of ``cembed.Embedding.from_pretrained(initial_rows(seed,
    arange(V), D, dtype, init), freeze=False, sparse=True)`` trained by the same optimizer with
    the same gradients (the summed gradient rows are computed by :func:`cembed.functional.embedding_backward`,
    the per-row update by the same optimizer code; every shard advances its step count at every
    step, as the single-process optimizer does).

    Ray must already be running in this process (``ray.init(...)``, see :func:`init_local`); Ray is
    imported here, never by ``import cembed`` or ``import cembed.distributed``.

    Parameters
    ----------
    num_embeddings, embedding_dim : int
        The table: ``num_embeddings`` rows of ``embedding_dim`` values; ``num_embeddings >= num_shards``.
    num_shards : int
        Number of shard actors (>= 1).
    optimizer : {"sparseadam", "adagrad", "sgd", "rowwise_adagrad"}
        The :mod:`cembed.optim` optimizer every shard runs.
    optimizer_options : dict, optional
        Its keyword arguments (``lr``, ``betas``, ...), checked here before any actor starts (with
        one zero sparse step on a throwaway table, so that options the optimizer refuses only at a
        sparse step raise here). ``rounding_rows`` and ``state_dir`` are set by the table and
        refused here.
    padding_idx : int, optional
        A row that starts at zero and never receives a gradient (negative: counted from the end).
    dtype : float32, float64, float16 or bfloat16
        The rows' storage dtype. A 16-bit table looks up and takes gradients in float32
        (``compute_dtype``); its shards' optimizers round stochastically as the one-process table
        does (the ``rounding`` / ``seed`` / ``state_dtype`` options pass through
        ``optimizer_options``; each shard sets ``rounding_rows`` to its place in the table), so the
        training is bitwise that of one process on every dtype.
    seed : int, optional
        Defines every row's initial values (:func:`initial_rows`); None draws one (see ``.seed``).
    checkpoint_dir : str, optional
        Shards write checkpoints under ``checkpoint_dir/<run id>/shard-<k>-of-<S>/`` every
        ``checkpoint_every`` steps, each keeping its two latest (slots ``a`` and ``b``, replaced in
        turn); with it a dead shard is restarted by Ray and brought back to the
        current step from its checkpoint and the replay log. Without it a lost shard is a
        :class:`ShardLostError`.
    checkpoint_every : int, optional
        Steps between two checkpoints of a shard (default 100 with a ``checkpoint_dir``); the client
        keeps at most that many steps of each shard's gradients for replay.
    ray_options : dict or sequence of dicts, optional
        Options for ``ActorClass.options(...)`` (``resources``, ``num_cpus``, ``max_restarts``,
        ...), one dict for every shard or one per shard (to pin shards to nodes by custom
        resources; ``name`` and ``namespace`` are the table's). Default ``max_restarts``: -1 (unlimited) with a ``checkpoint_dir``, else 0; a
        ``max_restarts`` other than 0 needs a ``checkpoint_dir`` (``ValueError``: a shard restarted
        without one could not restore its rows).
    init : {"uniform", "zeros"}, default "uniform"
        See :func:`initial_rows`.
    recovery_timeout : float, default 120
        Seconds to wait for a lost shard to come back before :class:`ShardLostError` (finite,
        positive, not a bool).
    compiled_graph : bool, default True
        Drive the lookups and updates through one Ray Compiled Graph over all shards
        (``ray.dag``: a call to every shard through shared-memory channels instead of an actor
        task per shard: less overhead per call, but Ray's graph actors busy-wait for their next
        call, about half a core each while the table sits idle — ``docs/distributed.md``). When
        Ray cannot compile it, or it breaks (a shard died), the table uses ordinary actor calls,
        and builds the graph again at the next call once every shard is back at the current step.
        False: ordinary actor calls only. ``.transport`` says which is in use.
    shard_cpus : "auto", "spread", None or sequence of sequences of int, default "auto"
        ``"auto"``: ``"spread"`` when the Ray cluster has one node (every shard shares this machine),
        else None. Pin each shard process (all its threads) to CPUs of its node: ``"spread"`` gives shard ``k``
        every ``num_shards``-th CPU from position ``k`` of those its process may use (one CPU,
        ``k`` modulo their count, when there are fewer CPUs than shards): for shards that share a
        node, so that two of them never take turns on one core. Or one list of CPU numbers per shard.
        CPUs a shard's process may not use are left out (all it may use if none is left);
        ``shard_info()`` tells what each shard got. Applied again when Ray restarts a shard.
        None: the operating system's placement. Measured on a 2-core machine with two shards, ``"spread"`` took the waited round trip of ``benchmarks/bench_ray.py`` from
        2.4-3.4x to 1.65-2.4x the time of one process (medians; ``docs/distributed.md``).

    storage_dir : str, optional
        Keep each shard's rows and optimizer state on disk instead of in its memory: shard ``k``
        holds its rows in ``storage_dir/<run id>/shard-<k>-of-<S>/rows.npy``, a memory-mapped table
        (:func:`cembed.open_table`), and its per-row optimizer state in ``state/`` beside it (the
        optimizer's ``state_dir``), so a shard may hold more rows than its machine has RAM
        (``docs/storage.md``). Same values, same bits. With a ``checkpoint_dir``, a restarted shard
        rebuilds its files from its checkpoint. The files stay when the table is shut down (a run
        resumed with ``run_id`` rebuilds them from the checkpoints): remove ``storage_dir/<run id>``
        of a run you will not resume.
    run_id : str, optional
        Resume the run of that id (``.run_id`` of the table that wrote it): every shard restores its
        own latest checkpoint under ``checkpoint_dir/<run_id>/`` — a table larger than this
        process's memory never passes through it — and the table continues from their step with
        their optimizer hyper-parameters (``optimizer_options`` shows them), bitwise as if it had
        never stopped. Needs the ``checkpoint_dir``, ``num_shards``, size, dtype and optimizer of
        that run, and its table shut down (``ValueError`` while its shard actors, named
        ``cembed-<run id>-shard-<k>-of-<S>``, live); a shard without a checkpoint there makes the constructor raise
        :class:`ShardLostError` naming it. When the shards' latest checkpoints hold different steps
        (a client killed while they checkpointed), the run resumes at the newest step every shard
        holds a checkpoint of (each keeps its two latest: the step before), and the shards ahead of
        it go back to it; a ``CheckpointError`` when there is none. :meth:`shutdown` checkpoints
        the last step, so a run shut down resumes exactly where it stopped; a run whose client was
        killed resumes at the last periodic checkpoint all its shards completed. None (default): a new run, with a
        new random id.

    Examples
    --------
    A running Ray is needed (inside the network namespace of ``tests/ray/run.sh``), so this
    example is not run here:

    >>> import numpy as np
    >>> from cembed.distributed import ShardedEmbedding, init_local
    >>> init_local(num_cpus=2)                                         # doctest: +SKIP
    >>> table = ShardedEmbedding(1000, 16, num_shards=2, optimizer_options={"lr": 0.01}, seed=0)  # doctest: +SKIP
    >>> out = table(np.array([[1, 2], [2, 999]]))                      # doctest: +SKIP
    >>> out.shape                                                      # doctest: +SKIP
    (2, 2, 16)
    >>> table.backward(np.ones_like(out), step=True)                   # doctest: +SKIP
    >>> table.step_count                                               # doctest: +SKIP
    1
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, num_shards: int, optimizer: str = "sparseadam",
                 optimizer_options: Optional[Dict[str, Any]] = None, padding_idx: Optional[int] = None,
                 dtype: Any = np.float32, seed: Optional[int] = None, checkpoint_dir: Optional[str] = None,
                 checkpoint_every: Optional[int] = None, ray_options: Any = None, *, init: str = "uniform",
                 recovery_timeout: float = 120.0, compiled_graph: bool = True,
                 shard_cpus: Any = "auto", storage_dir: Optional[str] = None, run_id: Optional[str] = None) -> None:
        # ---- every argument is checked before Ray is touched or any actor starts
        self.num_embeddings = _check_int(num_embeddings, "num_embeddings", 1)
        self.embedding_dim = _check_int(embedding_dim, "embedding_dim", 1)
        self.num_shards = _check_int(num_shards, "num_shards", 1)
        if self.num_shards > self.num_embeddings:
            raise ValueError(f"num_shards ({self.num_shards}) cannot exceed num_embeddings ({self.num_embeddings})")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        self.optimizer = optimizer
        self.optimizer_options = dict(optimizer_options or {})
        self._group: Optional[Dict[str, Any]] = None   # a loaded checkpoint's whole param group, once adopted
        # the table's dtype, checked (and "bfloat16" resolved) by the public constructor; lookups and
        # gradients are of its compute dtype (float32 for a 16-bit table)
        probe = Embedding(1, self.embedding_dim, sparse=True, dtype=dtype, seed=0)
        self.dtype = probe.weight.dtype
        self.compute_dtype = probe(np.zeros(1, dtype=np.int64)).dtype
        if "rounding_rows" in self.optimizer_options:
            raise ValueError("optimizer_options: rounding_rows is set by the table (shard k of S rounds its rows "
                             "as rows k, k + S, ... of the whole table)")
        if "state_dir" in self.optimizer_options:
            raise ValueError("optimizer_options: state_dir is set by the table (give storage_dir: each shard keeps "
                             "its optimizer state in a directory of its own)")
        _probe_step(make_optimizer(optimizer, probe, dict(self.optimizer_options)), probe,   # bad options raise here
                    self.compute_dtype)
        if padding_idx is not None:
            p = _check_int(padding_idx, "padding_idx", -self.num_embeddings)
            if p >= self.num_embeddings:
                raise ValueError(f"padding_idx must be within num_embeddings ({self.num_embeddings}), got {p}")
            padding_idx = p % self.num_embeddings
        self.padding_idx = padding_idx
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        self.seed = check_seed(seed) if seed is not None else int(np.random.default_rng().integers(0, 2 ** 63))
        if checkpoint_every is not None:
            checkpoint_every = _check_int(checkpoint_every, "checkpoint_every", 1)
            if checkpoint_dir is None:
                raise ValueError("checkpoint_every needs a checkpoint_dir")
        elif checkpoint_dir is not None:
            checkpoint_every = DEFAULT_CHECKPOINT_EVERY
        self.checkpoint_every = checkpoint_every
        if run_id is not None:
            if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
                raise ValueError(f"run_id must be the .run_id of an earlier table (letters, digits, '_', '-'), "
                                 f"got {run_id!r}")
            if checkpoint_dir is None:
                raise ValueError("run_id resumes a run from its shards' checkpoints: give the checkpoint_dir "
                                 "they were written under")
        resuming = run_id is not None
        self.run_id: str = run_id if run_id is not None else uuid.uuid4().hex[:12]
        self.checkpoint_dir = _check_directory(checkpoint_dir, "checkpoint_dir")
        self.storage_dir = _check_directory(storage_dir, "storage_dir")
        if isinstance(recovery_timeout, (bool, np.bool_)) or not isinstance(recovery_timeout, (int, float, np.integer,
                                                                                                np.floating)) \
                or not (0 < recovery_timeout <= MAX_RECOVERY_TIMEOUT):
            raise ValueError(f"recovery_timeout must be a finite positive number of seconds (at most "
                             f"{MAX_RECOVERY_TIMEOUT:g}), got {recovery_timeout!r}")
        self.recovery_timeout = float(recovery_timeout)
        _check_flag(compiled_graph, "compiled_graph")
        per_shard = self._shard_options(ray_options)
        cpus = self._check_cpus(shard_cpus)
        # what the shards ask Ray for (named when a shard never starts: Ray may have nowhere to place it)
        self._asked = "; ".join(sorted({", ".join(f"{key}={opts[key]!r}" for key in ("num_cpus", "num_gpus", "memory",
                                                                                   "resources") if key in opts)
                                        or "Ray's default of 1 CPU" for opts in per_shard}))
        self._restartable = [opts["max_restarts"] != 0 for opts in per_shard]

        self._ray = require_ray()
        self._session = self._ray_session()   # (a Ray shut down and started again is another one)
        if shard_cpus == "auto":   # pin the shards apart when they all share this one machine
            one_node = sum(1 for node in self._ray.nodes() if node.get("Alive")) == 1
            cpus = ["spread" if one_node else None] * self.num_shards
        remote = self._ray.remote(Shard)
        self._actors = []
        try:
            for k in range(self.num_shards):
                self._actors.append(self._start_actor(remote, per_shard[k], (
                    k, self.num_shards, self.num_embeddings, self.embedding_dim, optimizer, self.optimizer_options,
                    self.padding_idx, self.dtype.name, self.seed, init, self._shard_dir(k), self.checkpoint_every,
                    cpus[k], self._storage_dir(k), resuming)))
        except BaseException:
            for actor in self._actors:    # no half-started table keeps actors alive
                self._ray.kill(actor, no_restart=True)
            raise
        self._steps = [0] * self.num_shards             # the step each shard is at (a resumed run: set at start)
        self._log: List[Dict[int, Tuple[np.ndarray, np.ndarray]]] = [{} for _ in range(self.num_shards)]
        # the last forward's (shape, keys, grouping of the keys): its backward sums over that grouping
        self._saved: Optional[Tuple[Tuple[int, ...], np.ndarray, Tuple[np.ndarray, np.ndarray, np.ndarray]]] = None
        self._pending: List[Tuple[int, int, Any]] = []    # (shard, step, answer ref) of unchecked steps
        # The client numbers rows shard by shard ("keys"): global row r is key (r % S) * R + r // S,
        # R = the rows of shard 0. Sorted keys are grouped by shard, ascending local row within each,
        # so one sort dedupes a batch and splits it over the shards, and a shard's part of a summed
        # gradient is a contiguous slice (no gather, no copy before sending).
        self._stride = local_rows(0, self.num_shards, self.num_embeddings)
        self._starts = np.arange(self.num_shards + 1, dtype=np.int64) * self._stride
        # local row ids go out as int32 when they fit: half the bytes, and a batch's ids stay small
        # enough for Ray to send them inside the call instead of through its object store
        self._id_dtype = np.dtype(np.int32 if self._stride <= np.iinfo(np.int32).max else np.int64)
        self._pad_key = None if padding_idx is None else int(self._keys(np.array([padding_idx]))[0])
        self._kgrad: Optional[SparseGrad] = None            # .grad, over keys
        self.bytes_sent = 0       # payload bytes (rows and gradient values) sent to / received from shards
        self.bytes_received = 0
        self.recoveries = 0       # shards brought back by checkpoint + replay
        self._broken: Optional[str] = None
        # the lineage of the table's state (a new one per load), and the newest state (lineage, step)
        # that every shard is known to hold a checkpoint of: each checkpoint a shard writes keeps it
        # (Shard.save), so that a run whose client dies mid-checkpoint can go back to it
        self._lineage = FIRST_LINEAGE
        self._common: Optional[Tuple[str, int]] = None
        # what each shard's checkpoint slots hold, as it last said (after a checkpoint or a recovery)
        self._holds: List[Set[Tuple[str, int]]] = [set() for _ in range(self.num_shards)]
        self._replay_unsaved: List[str] = []   # checkpoints a replay could not write, not yet reported
        self._closing = False    # shutdown() is settling the last steps (an error's wording: _step_refused)
        try:
            if resuming:
                self._resumed()
            else:
                self._wait_all([(k, self._actors[k].current_step.remote()) for k in range(self.num_shards)],
                               expect=lambda k, reply: reply == 0, what="start")
        except BaseException:
            for actor in self._actors:    # no half-started table keeps actors alive
                self._ray.kill(actor, no_restart=True)
            raise
        # The compiled graph (None: ordinary actor calls). Rule: a shard never has a compiled call
        # and an ordinary one in flight at once (Ray runs the graph's calls on a thread of the actor
        # and ordinary calls on another, in no order between the two): every ordinary call comes
        # after _settle() (no compiled step in flight) or after the graph is torn down.
        self._graph: Any = None
        # A table dropped without shutdown() still stops its shards when it is garbage-collected (a
        # compiled graph holds their handles and would keep them, and the run's actor names, alive);
        # not at exit, where Ray's own shutdown stops them.
        self._graph_holder: Dict[str, Any] = {"graph": None}
        self._release = weakref.finalize(self, _release_shards, self._ray, self._graph_holder, list(self._actors))
        self._release.atexit = False
        self._want_graph = bool(compiled_graph)
        self.graph_builds = 0              # compiled graphs built (1 + one per rebuild after a loss)
        self.graph_error: Optional[str] = None   # why Ray could not compile one, if it could not
        self._message_bytes = 0   # the largest payload sent to or received from one shard so far
        self._build_graph()

    # ------------------------------------------------------------------ set-up helpers
    def _start_actor(self, remote: Any, options: Dict[str, Any], args: Tuple[Any, ...]) -> Any:
        """Start one shard actor under its name (:data:`ACTOR_NAMESPACE`, ``options["name"]``). A name
        still taken after :data:`NAME_WAIT` seconds belongs to a live table of this run (a table shut
        down gives its names back within about a second): ``ValueError``."""
        taken = getattr(self._ray.exceptions, "ActorAlreadyExistsError", None)
        deadline = time.monotonic() + NAME_WAIT
        while True:
            try:
                return remote.options(**options).remote(*args)
            except ValueError as exc:
                if not (isinstance(exc, taken) if taken is not None else "already taken" in str(exc)):
                    raise
                if time.monotonic() >= deadline:
                    raise ValueError(f"run {self.run_id} is in use: its shard actor {options['name']!r} is alive (a "
                                     "table of this run still runs; shut it down before resuming the run)") from None
                time.sleep(0.1)

    def _resumed(self) -> None:
        """Continue a run from its shards' checkpoints: the newest state every shard holds a
        checkpoint of (each keeps its two latest: when the client stopped while they checkpointed,
        the shards that wrote the new step go back to the one before it, which they all hold), and
        their optimizer hyper-parameters. :class:`CheckpointError` when they share no state."""
        S = self.num_shards
        held = self._wait_all([(k, self._actors[k].holding.remote()) for k in range(S)],
                              expect=lambda k, reply: True, what="start")
        for k in range(S):
            self._note_holding(k, held[k])
        common = set.intersection(*self._holds)
        chosen = next((tuple(h) for h in held[0] if tuple(h) in common), None)   # (newest first)
        if chosen is None:
            def state(lineage: str, step: int) -> str:   # (a loaded state's step: with the load's name)
                return str(step) if lineage == FIRST_LINEAGE else f"{step} (load {lineage[:8]})"
            listed = "; ".join(f"shard {k}: step{'s' if len(held[k]) > 1 else ''} "
                               f"{' and '.join(state(*h) for h in held[k])}" for k in range(S))
            raise CheckpointError(f"run {self.run_id}: no step that every shard holds a checkpoint of ({listed}): "
                                  "resume from a save_checkpoint instead")
        behind = [k for k in range(S) if tuple(held[k][0]) != chosen]
        if behind:
            def rewind(k: int) -> Any:
                return self._actors[k].rewind.remote(*chosen)
            try:
                got = self._wait_all([(k, rewind(k)) for k in behind], expect=lambda k, reply: True,
                                     what="resume")
            except self._ray.exceptions.RayTaskError as exc:
                raise CheckpointError(f"run {self.run_id}: a shard could not go back to step {chosen[1]}, the "
                                      f"newest that every shard holds: {_reason(exc)}") from None
            for k in behind:
                self._note_holding(k, got[k][2])
            unsaved = [f"shard {k}: {got[k][1]}" for k in behind if got[k][1] is not None]
            if unsaved:
                raise RuntimeError(f"run {self.run_id}: resuming at step {chosen[1]}, the newest step every shard "
                                   f"holds, needs the shards ahead of it to checkpoint it again, and "
                                   f"{'; '.join(unsaved)}: nothing of the run was lost; resume again once they can")
        self._steps = [chosen[1]] * S
        self._lineage = chosen[0]
        self._update_common()
        if self._common != chosen:
            raise CheckpointError(f"run {self.run_id}: after going back to step {chosen[1]} the shards do not all "
                                  "hold it (a checkpoint slot changed while the run resumed)")
        self._adopt(self._ray.get(self._actors[0].options.remote(), timeout=self.recovery_timeout))

    def _adopt(self, options: Dict[str, Any]) -> None:
        """Make a loaded or restored param group the table's: ``optimizer_options`` become the
        constructor's arguments among them, and the whole group (with any extra entry, such as a
        scheduler's ``initial_lr``) goes into :meth:`save_checkpoint`."""
        accepted = set(inspect.signature(OPTIMIZERS[self.optimizer]).parameters) - {"params", "rounding_rows",
                                                                                   "state_dir"}
        self.optimizer_options = {key: value for key, value in options.items() if key in accepted}
        self._group = dict(options)

    def _shard_options(self, ray_options: Any) -> List[Dict[str, Any]]:
        if ray_options is None or isinstance(ray_options, dict):
            per_shard = [dict(ray_options or {}) for _ in range(self.num_shards)]
        elif isinstance(ray_options, Sequence) and len(ray_options) == self.num_shards \
                and all(isinstance(o, dict) for o in ray_options):
            per_shard = [dict(o) for o in ray_options]
        else:
            raise ValueError("ray_options must be a dict, or a sequence of num_shards dicts (one per shard)")
        for k, opts in enumerate(per_shard):
            for key in ("name", "namespace", "get_if_exists"):
                if key in opts:
                    raise ValueError(f"ray_options: {key} is set by the table (shard k of run R is the actor "
                                     f"'cembed-R-shard-k-of-S' in namespace {ACTOR_NAMESPACE!r})")
            # one live table per run: a second one (resumed while the first still runs) cannot name its actors
            opts["name"], opts["namespace"] = f"cembed-{self.run_id}-shard-{k}-of-{self.num_shards}", ACTOR_NAMESPACE
            opts.setdefault("max_restarts", -1 if self.checkpoint_dir is not None else 0)
            if opts["max_restarts"] != 0 and self.checkpoint_dir is None:
                # a shard restarted without a checkpoint would come back with the seed's rows at step
                # 0: after a load_state_dict at step 0 the client could not tell them from the loaded ones
                raise ValueError(f"ray_options: max_restarts={opts['max_restarts']!r} needs a checkpoint_dir (a "
                                 "restarted shard restores its rows from its checkpoint)")
            opts["max_task_retries"] = 0    # the client replays; Ray must not re-run a step by itself
        return per_shard

    def _check_cpus(self, shard_cpus: Any) -> List[Any]:
        """``shard_cpus`` checked, as one entry per shard (None, "spread", or a list of CPU numbers)."""
        if shard_cpus is None or (isinstance(shard_cpus, str) and shard_cpus in ("spread", "auto")):
            return [shard_cpus] * self.num_shards
        bad = ValueError(f"shard_cpus must be 'auto', None, 'spread', or {self.num_shards} non-empty sequences of CPU "
                         f"numbers (one per shard), got {shard_cpus!r}")
        if isinstance(shard_cpus, str) or not isinstance(shard_cpus, Sequence) or len(shard_cpus) != self.num_shards:
            raise bad
        out = []
        for entry in shard_cpus:
            if isinstance(entry, str) or not isinstance(entry, Sequence) or not entry:
                raise bad
            out.append([_check_int(c, "a CPU number in shard_cpus", 0) for c in entry])
        return out

    def _storage_dir(self, k: int) -> Optional[str]:
        if self.storage_dir is None:
            return None
        return os.path.join(self.storage_dir, self.run_id, f"shard-{k}-of-{self.num_shards}")

    def _shard_dir(self, k: int) -> Optional[str]:
        if self.checkpoint_dir is None:
            return None
        return os.path.join(self.checkpoint_dir, self.run_id, f"shard-{k}-of-{self.num_shards}")

    @property
    def step_count(self) -> int:
        """Steps applied so far (the same on every shard)."""
        return self._steps[0]

    @property
    def actors(self) -> List[Any]:
        """The shard actor handles, shard ``k`` at position ``k`` (for tests and diagnostics)."""
        return list(self._actors)

    @property
    def transport(self) -> str:
        """``"compiled graph"`` or ``"actor calls"``: how the next lookup and update reach the shards."""
        return "compiled graph" if self._graph is not None or self._want_graph else "actor calls"

    # ------------------------------------------------------------------ the compiled graph
    def _graph_lost_errors(self) -> Tuple[Type[BaseException], ...]:
        ex = self._ray.exceptions
        return (ex.RayActorError, ex.ActorUnavailableError, ex.RayChannelError, ex.RayCgraphCapacityExceeded)

    def _build_graph(self) -> None:
        """Compile the graph (every shard's :meth:`Shard.call`, one input and one output per shard)
        if it is wanted and not there; only with nothing in flight. A graph Ray will not compile
        leaves the table on actor calls for good (``graph_error`` says why); a shard lost while it
        compiles only leaves this call on actor calls."""
        if self._graph is not None or not self._want_graph:
            return
        self._settle()   # the ordinary calls in flight finish before the graph's first call
        try:
            from ray.dag import InputNode, MultiOutputNode

            with InputNode() as request:
                dag = MultiOutputNode([actor.call.bind(request[k]) for k, actor in enumerate(self._actors)])
            # channels start as large as the largest message so far (a graph built again after a
            # loss does not grow them step by step: each growth costs Ray a new buffer and a
            # round of messages, about 0.1 s here)
            size = max(1 << 20, self._message_bytes + self._message_bytes // 4 + (64 << 10))
            # at most two calls are ever in flight (a step not yet answered and the next lookup):
            # Ray gives each channel that many buffers (its default, 10, spreads the messages over
            # ten buffers, each written and paged in afresh after a build)
            self._graph = dag.experimental_compile(_submit_timeout=self.recovery_timeout, _buffer_size_bytes=size,
                                                   _max_inflight_executions=2)
            self._graph_holder["graph"] = self._graph
            self.graph_builds += 1
        except self._graph_lost_errors():   # a shard lost while compiling: this call recovers it (actor
            self._graph = None               # calls), and the next one compiles again
            self._graph_holder["graph"] = None
        except Exception as exc:       # an old Ray, or one that refuses these actors: actor calls
            self._want_graph = False
            self.graph_error = f"{type(exc).__name__}: {exc}"

    def _drop_graph(self) -> None:
        """Tear the graph down (Ray does it itself when a shard dies; again is harmless): from here
        ordinary calls are safe; :meth:`_build_graph` builds a new one at the next call."""
        graph, self._graph = self._graph, None
        self._graph_holder["graph"] = None
        if graph is not None:
            try:
                graph.teardown()
            except Exception:   # a graph that broke may fail its teardown: nothing of it is used again
                pass

    def _graph_call(self, requests: List[Tuple[str, int, Any]]) -> Optional[List[Any]]:
        """Send ``requests[k]`` to shard ``k`` through the graph: the answer refs, or None (and
        no graph) when the graph is not there or broke while sending."""
        if self._graph is None:
            return None
        try:
            return list(self._graph.execute(*requests))
        except self._graph_lost_errors():
            self._drop_graph()
            return None

    def _graph_answers(self, refs: List[Any], what: str) -> Optional[List[Any]]:
        """The answers of one graph call's refs, or None (and no graph) when the graph broke."""
        ray = self._ray
        try:
            return list(ray.get(refs, timeout=self.recovery_timeout))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayChannelTimeoutError):
            self._drop_graph()
            self._fail(f"a shard did not answer a {what} within {self.recovery_timeout:g} s")
            raise   # not reached
        except self._graph_lost_errors():
            self._drop_graph()
            return None

    # ------------------------------------------------------------------ lookups
    def _keys(self, rows: np.ndarray) -> np.ndarray:
        return row_keys(rows, self.num_shards, self._stride)

    def _globals(self, keys: np.ndarray) -> np.ndarray:
        return key_rows(keys, self.num_shards, self._stride)

    def _checked_keys(self, indices: Any) -> Tuple[Tuple[int, ...], np.ndarray]:
        """(shape, read-only flat keys, a private array) of indices checked against the table."""
        arr = F.check_indices(indices, self.num_embeddings)
        keys = self._keys(arr.reshape(-1))
        keys.flags.writeable = False
        return arr.shape, keys

    def _cuts(self, sorted_keys: np.ndarray) -> List[Tuple[int, int, int]]:
        """``(shard, start, end)``: the slice of ascending ``sorted_keys`` on each shard."""
        bounds = np.searchsorted(sorted_keys, self._starts).tolist()
        return [(k, bounds[k], bounds[k + 1]) for k in range(self.num_shards)]

    def forward(self, indices: Any) -> np.ndarray:
        """Look up ``indices`` (any shape, any integer dtype): a new writable array
        ``(*indices.shape, embedding_dim)``. Each distinct row is fetched once, from its shard; all
        shards are asked at once. A private copy of the indices is kept for :meth:`backward`.

        Raises
        ------
        TypeError
            Non-integer indices.
        IndexError
            An index outside ``[0, num_embeddings)``.
        ShardLostError
            A shard that cannot be brought back to the current step.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> out = table(np.array([3, 1, 3]))        # doctest: +SKIP
        >>> out.shape                              # doctest: +SKIP
        (3, 16)
        """
        self._check_usable()
        shape, keys = self._checked_keys(indices)
        # one radix sort (cembed's, the one the backward uses) dedupes the batch, splits it over the
        # shards and is kept for the backward's per-row sums
        groups = F.group_rows(keys, int(self._starts[-1]))
        for part in groups:
            part.flags.writeable = False
        order, uniq, starts = groups
        self._build_graph()
        requests = {}
        for k, lo, hi in self._cuts(uniq):
            if hi > lo or self._graph is not None:    # the graph calls every shard
                local = (uniq[lo:hi] - self._starts[k]).astype(self._id_dtype)
                requests[k] = local
                self.bytes_sent += local.nbytes
        refs = self._graph_call([("gather", self._steps[k], requests[k]) for k in range(self.num_shards)]) \
            if self._graph is not None else None
        sent = [] if refs is not None else \
            [(k, self._actors[k].gather.remote(self._steps[k], local)) for k, local in requests.items() if local.size]
        inverse = _inverse(order, starts)     # while the shards work
        self._settle()    # the steps sent before these lookups (which the shards run first)
        parts = None
        if refs is not None:
            answers = self._graph_answers(refs, "gather")
            if answers is not None and all(a[0] == self._steps[k] and a[1] is not None for k, a in enumerate(answers)):
                # rows read from the graph's channels are views of its buffers, which must be let
                # go before its next call: only the block below (a copy) outlives this call
                parts = [answers[k][1] for k in requests if requests[k].size]
            del answers
            if parts is None:    # a shard at another step (cannot happen while the graph runs): by actor calls
                self._drop_graph()
                sent = [(k, self._actors[k].gather.remote(self._steps[k], local)) for k, local in requests.items()
                        if local.size]
        if parts is None:
            got = self._wait_all(sent,
                                 expect=lambda k, reply: reply[0] == self._steps[k] and reply[1] is not None,
                                 retry=lambda k: self._actors[k].gather.remote(self._steps[k], requests[k]),
                                 what="gather")
            parts = [got[k][1] for k, _ in sent]
            del got
        self._saved = (shape, keys, groups)
        if uniq.size == 0:
            return np.empty(shape + (self.embedding_dim,), dtype=self.compute_dtype)
        self.bytes_received += sum(p.nbytes for p in parts)
        self._message_bytes = max(self._message_bytes, max(p.nbytes for p in parts))
        # the shards' answers, in shard order, are the distinct rows in key order: entry i of the
        # lookup is row inverse[i] of that block
        block = parts[0] if len(parts) == 1 else np.concatenate(parts)
        del parts
        return F.embedding(inverse.reshape(shape), block)

    __call__ = forward

    # ------------------------------------------------------------------ gradients and steps
    def backward(self, grad_output: Any, indices: Any = None, per_sample_weights: Any = None,
                 step: bool = False) -> None:
        """Sum d(loss)/d(weight) per distinct row; keep it in ``.grad`` (``step=False``, summed
        with what is there, as ``cembed.Embedding.backward`` does) or apply the optimizer's update
        with it at once (``step=True``, the fused backward + update; needs ``.grad is None``).

        Parameters
        ----------
        grad_output : numpy.ndarray
            Of ``compute_dtype`` (the lookups' dtype: float32 for a 16-bit table, which also takes its
            own 16-bit dtype): ``(*indices.shape, D)``, or with ``per_sample_weights``
            ``indices.shape[:-1] + (D,)`` (:func:`cembed.functional.embedding_backward`).
        indices : array_like of int, optional
            Default: those of the last forward.
        per_sample_weights : numpy.ndarray, optional
        step : bool, default False

        Raises
        ------
        ValueError, TypeError, IndexError
            Bad gradient, weights or indices, or ``step=True`` with a ``.grad`` present; nothing
            is changed or sent.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> out = table(np.array([3, 1, 3]))                    # doctest: +SKIP
        >>> table.backward(np.ones_like(out), step=True)        # doctest: +SKIP
        """
        self._check_usable()
        _check_flag(step, "step")
        if not isinstance(grad_output, np.ndarray) or grad_output.dtype not in (self.compute_dtype, self.dtype):
            got = grad_output.dtype if isinstance(grad_output, np.ndarray) else type(grad_output).__name__
            also = "" if self.dtype == self.compute_dtype else f" (or the table's own {self.dtype})"
            raise TypeError(f"grad_output must be a NumPy array of the lookups' dtype {self.compute_dtype}{also}, "
                            f"got {got}")
        if step and self._kgrad is not None:
            raise ValueError("backward(step=True) with a .grad present: call step() or zero_grad() first")
        if step:   # an error of an earlier step is raised now, before this call's gradient exists
            self._settle()
        if indices is None:
            if self._saved is None:
                raise ValueError("backward: no indices given and no forward call to take them from")
            shape, keys, groups = self._saved
        else:
            shape, keys = self._checked_keys(indices)
            groups = None
        num_keys = int(self._starts[-1])
        # summed over keys: each row's contributions in input order, as one process sums them (the
        # forward's grouping is a stable sort of these keys: the same segments, in the same order, as
        # embedding_backward's own sort would give — the same bits, one sort fewer)
        # (the table's width given, so a gradient of another width is refused naming it)
        grad = F.lookup_contributions(grad_output, shape, keys, padding_idx=self._pad_key,
                                      per_sample_weights=per_sample_weights, dim=self.embedding_dim,
                                      dtype=self.compute_dtype, table_dtype=self.dtype,
                                      groups=groups if per_sample_weights is None else None).sparse(num_keys)
        assert isinstance(grad, SparseGrad)
        if step:
            self._apply(grad)
        else:
            self._kgrad = grad if self._kgrad is None else self._kgrad.merge(grad)

    @property
    def grad(self) -> Optional[SparseGrad]:
        """The gradient accumulated by ``backward(..., step=False)`` (global rows), or None.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.backward(np.ones_like(table(np.array([4, 1]))))   # doctest: +SKIP
        >>> table.grad.indices                                     # doctest: +SKIP
        array([1, 4])
        """
        kgrad = self._kgrad
        if kgrad is None:
            return None
        rows = self._globals(kgrad.indices)
        order = np.argsort(rows, kind="stable")
        return SparseGrad(rows[order], kgrad.values[order], self.num_embeddings)

    @grad.setter
    def grad(self, value: Optional[SparseGrad]) -> None:
        if value is None:
            self._kgrad = None
            return
        if not isinstance(value, SparseGrad) or value.shape != (self.num_embeddings, self.embedding_dim) \
                or value.values.dtype != self.compute_dtype:
            raise TypeError(f"grad must be None or a SparseGrad of shape ({self.num_embeddings}, "
                            f"{self.embedding_dim}) and dtype {self.compute_dtype}")
        keys = self._keys(value.indices)
        order = np.argsort(keys, kind="stable")
        self._kgrad = SparseGrad(keys[order], value.values[order], int(self._starts[-1]))

    def step(self) -> None:
        """Apply the optimizer's update with ``.grad`` on every shard and clear it; without a
        ``.grad`` nothing happens (the table's step count does not advance: a parameter without a
        gradient is skipped, as by :meth:`cembed.optim.Optimizer.step`).

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.backward(np.ones_like(table(np.array([0, 5]))))   # doctest: +SKIP
        >>> table.step()                                          # doctest: +SKIP
        """
        self._check_usable()
        if self._kgrad is None:
            return
        self._settle()   # an error of an earlier step is raised while .grad is still in place
        grad, self._kgrad = self._kgrad, None
        self._apply(grad)

    def zero_grad(self) -> None:
        """Drop ``.grad``.

        Examples
        --------
        >>> from cembed.distributed import ShardedEmbedding
        >>> callable(ShardedEmbedding.zero_grad)
        True
        """
        self._kgrad = None

    def _apply(self, grad: SparseGrad) -> None:
        """Send each shard its slice of ``grad`` (over keys) as the next step."""
        keys = grad.indices
        vals = grad.values
        parts: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        for k, lo, hi in self._cuts(keys):
            local = (keys[lo:hi] - self._starts[k]).astype(self._id_dtype)
            part = vals[lo:hi]          # a contiguous view: Ray sends it as it is
            parts[k] = (local, part)
            self.bytes_sent += local.nbytes + part.nbytes
            self._message_bytes = max(self._message_bytes, local.nbytes + part.nbytes)
        # Sent, not awaited: the shard runs the step before anything this client sends it later
        # (Ray keeps one caller's calls to an actor in order), so the next lookup needs no extra round
        # trip. The answers are checked by _settle() at the next call; the step is in the replay log
        # until then, so a shard lost meanwhile is replayed through it.
        self._settle()
        self._build_graph()
        had_graph = self._graph is not None
        refs = self._graph_call([("apply", self._steps[k], self._update(self._steps[k], parts[k]))
                                 for k in range(self.num_shards)]) if had_graph else None
        for k in range(self.num_shards):
            before = self._steps[k]
            if refs is not None:
                ref = refs[k]
            elif had_graph:
                ref = None     # the graph broke while sending: the shard may or may not have the step
            else:
                ref = self._actors[k].apply.remote(before, self._update(before, parts[k]))   # one argument
            # logged until answered (and, when checkpointing, until a checkpoint covers it): a step
            # that a shard missed is replayed from here
            self._log[k][before] = parts[k]
            self._steps[k] = before + 1
            self._pending.append((k, before, ref))

    def _note_checkpoints(self, k: int) -> None:
        """Ask shard ``k`` which states its checkpoint slots hold (after it was recovered: a step's
        answer lost with it or with the compiled graph, the checkpoints its replay wrote)."""
        try:
            holding = self._ray.get(self._actors[k].holding.remote(), timeout=self.recovery_timeout)
        except Exception:     # (lost again: a later call recovers it, and asks then)
            return
        self._note_holding(k, holding)
        self._update_common()

    def _note_holding(self, k: int, holding: Any) -> None:
        """Shard ``k`` said which states ``(lineage, step)`` its checkpoint slots hold
        (:meth:`Shard.holding`, in its answers to checkpoints, loads and rewinds)."""
        self._holds[k] = {tuple(h) for h in holding}

    def _update_common(self) -> None:
        """``_common``: the newest state of the current lineage that every shard's slots hold, as the
        shards last said; else the previous one while they all still hold it (a load's state before
        every shard has checkpointed it); else None."""
        shared = set.intersection(*self._holds)
        steps = [step for lineage, step in shared if lineage == self._lineage]
        if steps:
            self._common = (self._lineage, max(steps))
        elif self._common not in shared:
            self._common = None

    def _update(self, step: int, part: Tuple[np.ndarray, np.ndarray]) -> Tuple[Any, ...]:
        """A shard's ``update`` argument for step ``step``: ``part``, and for a step whose answer is
        a checkpoint the state that checkpoint must keep (:meth:`Shard.save`)."""
        if self.checkpoint_every and (step + 1) % self.checkpoint_every == 0:
            return part + (self._common,)
        return part

    def _settle(self) -> None:
        """Check the answers of the steps sent and not yet checked; recover shards that missed one.
        A step a shard's optimizer refused is rolled back when no shard applied it (the exception
        says why); a checkpoint a shard could not write is reported once every answer is checked."""
        pending, self._pending = self._pending, []
        if not pending:
            self._report_unsaved([])
            return
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        refused: Optional[BaseException] = None
        # three kinds of pending step: a graph call's ref (one ray.get for them all, never twice),
        # an actor call's ref, None (the graph broke while sending it: ask the shard)
        compiled = [ref for _, _, ref in pending if ref is not None and not isinstance(ref, ray.ObjectRef)]
        try:
            answers = self._graph_answers(compiled, "step") if compiled else []
        except ray.exceptions.RayTaskError as exc:
            refused, answers = exc, None
        if refused is not None:
            self._step_refused(pending, refused)
        by_graph = dict(zip(map(id, compiled), answers)) if answers is not None else {}
        calls = [ref for _, _, ref in pending if isinstance(ref, ray.ObjectRef)]
        replies = dict(zip(map(id, calls), self._get_together(calls, "step"))) if calls else {}
        outcomes = []
        for k, before, ref in pending:
            reply = by_graph.get(id(ref)) if ref is not None and id(ref) in by_graph else replies.get(id(ref))
            try:
                if reply is None and isinstance(ref, ray.ObjectRef):
                    reply = ray.get(ref, timeout=self.recovery_timeout)
            except lost:
                reply = None
            except ray.exceptions.RayTaskError as exc:
                refused = exc
            except ray.exceptions.GetTimeoutError:
                self._fail(f"shard {k} did not answer step {before} within {self.recovery_timeout:g} s")
            outcomes.append((k, before, reply))
        if refused is not None:    # before any recovery: a replay would only be refused again
            self._step_refused(pending, refused)
        unsaved = []
        for k, before, reply in outcomes:
            ok, now, save_error, holding = reply if reply is not None else (False, -1, None, None)
            if holding is not None:
                self._note_holding(k, holding)
            if not (ok and now == before + 1):
                try:
                    self._recover(k, unconfirmed_from=before)   # back to self._steps[k], replaying ``before`` too
                except _ReplayRefused as exc:   # (the graph's answers were lost: the refusal shows in the replay)
                    self._step_refused(pending, exc.cause)
                if not self.checkpoint_every:
                    self._log[k].clear()    # every step sent is applied: none is replayed again
            elif not self.checkpoint_every:
                self._log[k].pop(before, None)     # answered: never replayed (nothing to restore from)
            elif save_error is not None:
                unsaved.append(f"shard {k}: {save_error}")    # the log keeps what that checkpoint would cover
            elif now % self.checkpoint_every == 0:
                # the shard wrote this checkpoint before answering: older steps are never replayed
                self._log[k] = {s: p for s, p in self._log[k].items() if s >= now}
        self._update_common()
        self._report_unsaved(unsaved)

    def _report_unsaved(self, unsaved: List[str]) -> None:
        """Raise :class:`_CheckpointNotWritten` for the checkpoints of this settle's steps that a shard
        could not write (``unsaved``) and for those a replay could not write since the last report."""
        replayed, self._replay_unsaved = self._replay_unsaved, []
        if unsaved or replayed:
            what = f"the checkpoint of step {self.step_count}" if unsaved else "a checkpoint"
            raise _CheckpointNotWritten(f"{what} could not be written ({'; '.join(unsaved + replayed)}); the "
                                        f"step itself was applied: the table is at step "
                                        f"{self.step_count} and stays usable (a shard lost now is replayed from its "
                                        f"previous checkpoint); the call that reports it did nothing else: repeat it",
                                        unsaved + replayed)

    def _step_refused(self, pending: List[Tuple[int, int, Any]], exc: BaseException) -> None:
        """A shard raised while applying a pending step (its optimizer refused it). When no shard
        applied it, the client steps back to before it and raises (ValueError / TypeError as the
        optimizer did, else RuntimeError): the table stays usable at that step, as one process
        whose ``step()`` raised. When some shard did apply it: :class:`ShardLostError`."""
        ray = self._ray
        self._drop_graph()     # ordinary calls from here (the graph's answers are gone)
        where = []
        for k, before, _ in pending:
            try:
                at = ray.get(self._actors[k].current_step.remote(), timeout=self.recovery_timeout)
            except Exception:
                at = None
            if at is None or at < before:   # lost, or restarted from an older checkpoint: replayed up to the
                self._steps[k] = before     # step before the refused one (ShardLostError if it cannot be)
                self._recover(k)
                at = before
            where.append(at)
        why = _reason(exc)
        step = pending[0][1]
        if all(at == before for (_, before, _), at in zip(pending, where)):
            for k, before, _ in pending:
                self._steps[k] = before
                self._log[k].pop(before, None)
            cause = getattr(exc, "cause", None)
            cls: Type[Exception] = ValueError if type(cause) is ValueError else \
                TypeError if type(cause) is TypeError else RuntimeError
            refused = cls(_refused_message(step, why, stopped=self._closing))
            refused.refused = (step, why)   # type: ignore[attr-defined]  # (shutdown() words it again if the table runs on)
            raise refused
        self._fail(f"step {step} was refused by a shard ({why}) and applied by others (shards at steps {where}): "
                   f"the shards' rows no longer belong to one step")

    def sync(self) -> None:
        """Wait until every step sent has been applied by its shard (checked, recovering lost
        shards); a step's errors surface here or at the next call.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.backward(np.ones_like(table(np.array([1]))), step=True)   # doctest: +SKIP
        >>> table.sync()                                                     # doctest: +SKIP
        """
        self._check_usable()
        self._settle()

    # ------------------------------------------------------------------ fault handling
    def _ray_session(self) -> Optional[Tuple[str, str]]:
        """This process's Ray session — (node, job) of the driver — or None when Ray is not running:
        a Ray shut down and started again (``init_local``) is another session, where this table's
        actors and channels do not exist."""
        if not self._ray.is_initialized():
            return None
        context = self._ray.get_runtime_context()
        return (str(context.get_node_id()), str(context.get_job_id()))

    def _ray_running(self) -> bool:
        """Whether the Ray this table was made in still runs (not shut down, not started anew since)."""
        return self._ray_session() == self._session

    def _check_usable(self) -> None:
        if self._broken is not None:
            if self._broken == _SHUT_DOWN:   # (not a lost shard: a resume is not the answer)
                raise RuntimeError(f"{_SHUT_DOWN}: make a new one (with its run_id to resume its checkpoints)")
            raise ShardLostError(self._broken)
        if not self._ray_running():   # (a call would fail inside Ray, or start a new local one)
            raise RuntimeError("Ray was shut down (ray.shutdown()) while this table's shards were running — and "
                               "perhaps started again, without them: the table cannot be used any more; its "
                               "checkpoints stay on disk")

    def _fail(self, message: str) -> None:
        self._broken = message
        raise ShardLostError(message)

    def _wait_all(self, pending: List[Tuple[int, Any]], expect: Any, retry: Any = None, what: str = "call",
                  replay: bool = True) -> Dict[int, Any]:
        """ray.get every (shard, ref); a shard whose actor died, or that answers from another step,
        is brought back to its step (:meth:`_recover`) and asked again with ``retry``. ``replay``
        False: only waited for until it answers, at whatever step it restored (a load, which
        replaces everything a shard holds, is sent again as it is)."""
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        replies = {}
        first = self._get_together([ref for _, ref in pending], what)
        for (k, ref), together in zip(pending, first):
            for attempt in range(4):
                cause = ""
                try:
                    reply = together if attempt == 0 and together is not None else \
                        ray.get(ref, timeout=self.recovery_timeout)
                except lost as exc:
                    reply = None
                    cause = f": {_reason(exc)}"
                except ray.exceptions.GetTimeoutError:
                    self._fail(f"shard {k} did not answer a {what} within {self.recovery_timeout:g} s")
                if reply is not None and expect(k, reply):
                    replies[k] = reply
                    break
                if retry is None:
                    self._fail(f"shard {k} was lost during {what}{cause}")
                self._recover(k, replay)
                ref = retry(k)
            else:
                self._fail(f"shard {k}: {what} failed after repeated recoveries")
        return replies

    def _get_together(self, refs: List[Any], what: str) -> List[Any]:
        """The answers of ``refs`` with one ``ray.get`` (one wait for all shards); all None when
        one of them failed (the callers then look at each answer on its own)."""
        ray = self._ray
        try:
            return list(ray.get(refs, timeout=self.recovery_timeout))
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayTaskError):
            return [None] * len(refs)
        except ray.exceptions.GetTimeoutError:
            placed = (" — or Ray could not place it: the cluster may lack what a shard asks for "
                      f"({self._asked})" if what == "start" else "")
            self._fail(f"a shard did not answer a {what} within {self.recovery_timeout:g} s{placed}")
            raise   # not reached

    def _actor_dead_for_good(self, k: int) -> bool:
        """Whether Ray's control store says shard ``k``'s actor is DEAD (never restarted again: its
        ``max_restarts`` used up). A call to an actor Ray is restarting fails with
        ``ActorUnavailableError``; one to a dead actor with ``ActorDiedError`` — confirmed here, since
        only the store tells a death for good from one a restart follows. False when the store cannot
        be asked (an internal API of Ray's): the recovery then waits for ``recovery_timeout``."""
        try:
            info = self._ray._private.state.actors(self._actors[k]._actor_id.hex())
        except Exception:
            return False
        return isinstance(info, dict) and info.get("State") == "DEAD"

    def _recover(self, k: int, replay: bool = True, unconfirmed_from: Optional[int] = None) -> None:
        """Bring shard ``k`` (restarted by Ray from its last checkpoint) back to ``self._steps[k]``
        by replaying the logged steps; :class:`ShardLostError` when that is impossible. ``replay``
        False: return once it answers, at whatever step. ``unconfirmed_from``: the steps from it on
        were never answered by this shard; its refusing one of them is :class:`_ReplayRefused`."""
        ray = self._ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        self._drop_graph()    # ordinary calls from here; rebuilt at the next lookup or step
        target = self._steps[k]
        deadline = time.monotonic() + self.recovery_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._fail(f"shard {k} did not come back within {self.recovery_timeout:g} s")
            try:
                at = ray.get(self._actors[k].current_step.remote(), timeout=remaining)
            except lost as exc:
                if not self._restartable[k]:
                    self._fail(f"shard {k} died and is not restarted (max_restarts=0; give a checkpoint_dir to "
                               f"recover lost shards): {type(exc).__name__}")
                if getattr(exc, "actor_init_failed", False):   # Ray does not restart it again: no use waiting
                    self._fail(f"shard {k} could not be restarted: {_reason(exc)}")
                if isinstance(exc, ray.exceptions.ActorDiedError) and self._actor_dead_for_good(k):
                    self._fail(f"shard {k} died and Ray will not restart it again (its actor is dead: its "
                               f"max_restarts used up, or killed with no_restart=True): {type(exc).__name__}")
                time.sleep(0.2)
                continue
            except ray.exceptions.GetTimeoutError:
                self._fail(f"shard {k} did not come back within {self.recovery_timeout:g} s")
            if not replay:
                return
            if at == target:
                self._note_checkpoints(k)
                if self.checkpoint_every and target > 0 and target % self.checkpoint_every == 0 \
                        and (self._lineage, target) not in self._holds[k]:   # (its answer, which said why, was lost)
                    self._replay_unsaved.append(f"shard {k}, step {target}: its checkpoint is not on disk")
                return
            log = self._log[k]
            if at > target or any(s not in log for s in range(at, target)):
                held = f"steps {min(log)}..{max(log)}" if log else "no steps"
                self._fail(f"shard {k} came back at step {at}, the table is at step {target}, and the replay log "
                           f"holds {held}: its rows cannot be brought back (no checkpoint that recent)")
            self.recoveries += 1
            try:
                for s in range(at, target):
                    ok, now, save_error, _ = ray.get(self._actors[k].apply.remote(s, self._update(s, log[s])),
                                                     timeout=remaining)
                    if not ok or now != s + 1:
                        break
                    if save_error is not None:   # (reported by the next settle)
                        self._replay_unsaved.append(f"shard {k}, step {now}, written again by its replay: {save_error}")
                else:
                    self._note_checkpoints(k)
                    return
            except lost:
                continue   # lost again during the replay: start over from what it restores
            except ray.exceptions.RayTaskError as exc:
                if unconfirmed_from is not None and s >= unconfirmed_from:
                    raise _ReplayRefused(exc) from None
                self._fail(f"shard {k} refused step {s} when it was replayed: {_reason(exc)}")
            except ray.exceptions.GetTimeoutError:
                self._fail(f"shard {k} did not come back within {self.recovery_timeout:g} s")

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """The whole table in one process's layout: ``{"step": int, "weight": (V, D) array,
        "optimizer": {name: value}}`` — per-row optimizer arrays reassembled in global row order,
        scalars (``step`` of SparseAdam) as the shards hold them (they agree).

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> sd = table.state_dict()                 # doctest: +SKIP
        >>> sd["weight"].shape                      # doctest: +SKIP
        (1000, 16)
        """
        self._check_usable()
        self._settle()
        S = self.num_shards
        got = self._wait_all([(k, self._actors[k].state.remote()) for k in range(S)],
                             expect=lambda k, reply: reply[0] == self._steps[k],
                             retry=lambda k: self._actors[k].state.remote(), what="state_dict")
        weight = aligned_zeros((self.num_embeddings, self.embedding_dim), self.dtype)
        state: Dict[str, Any] = {}
        live: List[Optional[np.ndarray]] = []   # SGD momentum's live rows, per shard (local ids; None: all)
        for k in range(S):
            _, w, entry = got[k]
            weight[k::S] = w
            for key, value in entry.items():
                if key == ROW_LIST_KEY:
                    live.append(None if value is None else np.asarray(value, dtype=np.int64) * S + k)
                elif isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == w.shape[0]:
                    if key not in state:
                        state[key] = aligned_zeros((self.num_embeddings,) + value.shape[1:], value.dtype)
                    state[key][k::S] = value
                elif key not in state:
                    state[key] = value
                elif state[key] != value:
                    raise RuntimeError(f"shards disagree on optimizer state {key!r}: {state[key]!r} vs {value!r}")
        if live:   # global row ids, ascending (None when every shard has every row live)
            state[ROW_LIST_KEY] = None if len(live) == S and all(rows is None for rows in live) else np.sort(np.concatenate(
                [np.arange(k, self.num_embeddings, S, dtype=np.int64) if rows is None else rows
                 for k, rows in enumerate(live)]))
        return {"step": self.step_count, "weight": weight, "optimizer": state}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Take a :meth:`state_dict` (of a table of the same size, dtype and optimizer, any shard
        count): each shard receives its rows, then checkpoints them. The replay log restarts here.
        The whole state is first loaded into a one-process copy of the table (its optimizer checks
        it with the constructor's rules): a refused state is a ``ValueError`` before any shard
        changes. The whole table passes through this process.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.load_state_dict(other.state_dict())     # doctest: +SKIP

        A gradient accumulated by ``backward`` and not yet stepped belongs to the state replaced: it is
        dropped (the next :meth:`step` does nothing until a new ``backward``).
        """
        self._check_usable()
        if not isinstance(state_dict, dict) or not {"step", "weight", "optimizer"} <= set(state_dict):
            raise ValueError("state_dict must be a dict with 'step', 'weight' and 'optimizer' entries")
        weight = state_dict["weight"]
        if not isinstance(weight, np.ndarray) or weight.shape != (self.num_embeddings, self.embedding_dim) \
                or weight.dtype != self.dtype:
            raise ValueError(f"state_dict weight must be a ({self.num_embeddings}, {self.embedding_dim}) "
                             f"{self.dtype} array")
        step = _check_int(state_dict["step"], "state_dict step", 0)
        entry = state_dict["optimizer"]
        if not isinstance(entry, dict):
            raise ValueError(f"state_dict optimizer must be a dict of optimizer state, got {type(entry).__name__}")
        emb, opt = self._local_copy(weight)
        packed = opt.state_dict()
        packed["state"] = {0: entry} if entry else {}
        opt.load_state_dict(packed)    # the whole state checked; nothing sent yet
        self._load(step, emb.weight, opt.state_dict()["state"].get(0, {}), None)

    def _load(self, step: int, weight: np.ndarray, state: Dict[str, Any], options: Optional[Dict[str, Any]]) -> None:
        """Send each shard its part of a checked one-process state (``options``: hyper-parameters
        to adopt as well, None: keep the table's)."""
        self._settle()
        S = self.num_shards
        parts = []
        for k in range(S):
            entry = {}
            for key, value in state.items():
                if key == ROW_LIST_KEY and value is not None:   # global row ids -> this shard's local ones
                    rows = np.asarray(value, dtype=np.int64)
                    entry[key] = rows[rows % S == k] // S
                elif isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == self.num_embeddings:
                    entry[key] = np.ascontiguousarray(value[k::S])
                else:
                    entry[key] = value
            parts.append((np.ascontiguousarray(weight[k::S]), entry))

        lineage = uuid.uuid4().hex   # the loaded state's name in the shards' checkpoints

        def send(k: int) -> Any:
            return self._actors[k].load.remote(step, parts[k][0], parts[k][1], options, lineage, self._common)

        try:
            # a shard lost on the way (Ray restarting it) is waited for and sent its part again, at
            # whatever step it restored: a load replaces everything a shard holds, so sending it twice
            # is harmless
            got = self._wait_all([(k, send(k)) for k in range(S)], expect=lambda k, reply: reply[0] == step,
                                 retry=send, what="load_state_dict", replay=False)
        except self._ray.exceptions.RayTaskError as exc:   # checked here first: not expected
            self._fail(f"a shard refused its part of a checked state: {_reason(exc)}")
        if options is not None:
            self._adopt(options)
        self._steps = [step] * S
        self._log = [{} for _ in range(S)]
        self._kgrad = None
        self._lineage = lineage
        for k in range(S):
            self._note_holding(k, got[k][2])
        self._update_common()
        unsaved = [f"shard {k}: {got[k][1]}" for k in range(S) if got[k][1] is not None]
        if unsaved:
            # a shard restarted later would restore an older checkpoint, possibly of this very step
            self._fail(f"the state was loaded, but not every shard could checkpoint it ({'; '.join(unsaved)}): a "
                       f"restarted shard would restore older rows")

    def _local_copy(self, weight: np.ndarray) -> Tuple[Embedding, Any]:
        """A one-process Embedding over ``weight`` and this table's optimizer over it."""
        emb = Embedding.from_pretrained(weight, freeze=False, sparse=True, padding_idx=self.padding_idx)
        opt = make_optimizer(self.optimizer, emb, dict(self.optimizer_options))
        if self._group is not None:    # the hyper-parameters a load_checkpoint adopted, all of them
            packed = opt.state_dict()
            packed["param_groups"] = [dict(self._group, rounding_rows=(0, 1), params=[0])]
            opt.load_state_dict(packed)
        return emb, opt

    def save_checkpoint(self, path: str) -> None:
        """Write the whole table and its optimizer state as a cembed checkpoint directory
        (:func:`cembed.save_checkpoint`: one ``.npy`` per array, a JSON manifest with checksums,
        swapped into place crash-safely), as the table ``"table"`` of one process: the directory
        also loads into a ``cembed.Embedding`` and the same optimizer. The whole table passes
        through this process.

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.save_checkpoint("ckpt/table")       # doctest: +SKIP
        """
        sd = self.state_dict()
        emb, opt = self._local_copy(sd["weight"])
        packed = opt.state_dict()
        packed["state"] = {0: sd["optimizer"]} if sd["optimizer"] else {}
        opt.load_state_dict(packed)
        save_checkpoint(os.fspath(path), {"table": emb}, opt,
                        extra={"step": sd["step"], "num_shards": self.num_shards, "optimizer": self.optimizer})

    def load_checkpoint(self, path: str) -> None:
        """Restore a :meth:`save_checkpoint` directory (written with any number of shards, or by
        ``cembed.save_checkpoint(path, {"table": emb}, optimizer)`` in one process — then the step
        count restarts at the optimizer's). Everything is checked before any shard changes. The
        checkpoint's optimizer hyper-parameters (``lr``, ...) replace the table's, as
        :func:`cembed.load_checkpoint` replaces an optimizer's (``optimizer_options`` shows them).

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.load_checkpoint("ckpt/table")       # doctest: +SKIP
        """
        self._check_usable()
        emb, opt = self._local_copy(np.zeros((self.num_embeddings, self.embedding_dim), dtype=self.dtype))
        extra = load_checkpoint(os.fspath(path), {"table": emb}, opt, mmap=False)
        saved = opt.state_dict()
        state = saved["state"].get(0, {})
        step = extra.get("step") if isinstance(extra, dict) else None
        if step is None:
            step = int(state.get("step", 0))
        step = _check_int(step, f"{path}: the checkpoint's step", 0)
        # the checkpoint's hyper-parameters (lr, ...) are adopted, as one process's load_checkpoint does
        options = {key: value for key, value in saved["param_groups"][0].items() if key != "params"}
        self._load(step, emb.weight, state, options)

    def shard_info(self) -> List[Dict[str, Any]]:
        """Per shard: process id, step, the step it restored a checkpoint at (None if never), the
        CPUs it is pinned to (None: not pinned).

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> [i["step"] for i in table.shard_info()]     # doctest: +SKIP
        [0, 0]
        """
        self._check_usable()
        self._settle()
        got = self._wait_all([(k, a.info.remote()) for k, a in enumerate(self._actors)],
                             expect=lambda k, reply: reply["step"] == self._steps[k],
                             retry=lambda k: self._actors[k].info.remote(), what="shard_info")
        return [got[k] for k in range(self.num_shards)]

    def shutdown(self, checkpoint: bool = True) -> None:
        """Stop the shard actors (their checkpoints stay on disk). The steps still in flight are
        first waited for, as :meth:`sync` does, so the last step is applied on every shard (an
        error of that step is raised after the actors are stopped); then, with a
        ``checkpoint_dir`` and ``checkpoint`` (default), every shard whose latest checkpoint is
        older checkpoints it, so that a table made with this ``run_id`` resumes there. A shard
        that cannot write it (a full disk) is a ``RuntimeError`` naming it **with the table still
        running**: call ``shutdown()`` again once it can, :meth:`save_checkpoint` the table, or
        ``shutdown(checkpoint=False)`` to stop it as it is (the run then resumes at the newest step
        that every shard holds a checkpoint of, which the error names). With ``checkpoint=False``, a
        periodic checkpoint that a shard could not write and that no call has reported yet is a
        ``RuntimeError`` raised once the actors are stopped, naming the step the run resumes at.
        After ``ray.shutdown()`` it only marks the table unusable (it never starts a Ray of its own).

        Examples
        --------
        Needs a running Ray (see the class); not run here:

        >>> table.shutdown()          # doctest: +SKIP
        """
        _check_flag(checkpoint, "checkpoint")
        error: Optional[BaseException] = None
        if self._broken is None and self._ray_running():
            final = checkpoint and self.checkpoint_dir is not None   # a final checkpoint is written
            self._closing = True
            try:
                self._settle()
            except _CheckpointNotWritten as exc:   # a periodic checkpoint a shard could not write: the final
                if not final:                      # one below writes that step again (or says why not)
                    error = RuntimeError(self._unsaved_at_shutdown(exc.reasons))   # (raised once stopped)
            except Exception as exc:   # raised once the actors are stopped (a refused step leaves the
                error = exc            # table usable at the step before it: that step is checkpointed)
            finally:
                self._closing = False
            if not isinstance(error, ShardLostError) and final:
                try:
                    self._checkpoint_all()   # (a checkpoint not written: raised with the table running)
                except ShardLostError as exc:
                    error = exc
                except RuntimeError as exc:
                    if error is not None:    # the refused step's error, reported with it (the table runs on)
                        refused = getattr(error, "refused", None)
                        if refused is not None:
                            step, why = refused
                            error = type(error)(_refused_message(step, why, stopped=False))
                        raise exc from error
                    raise
        self._want_graph = False
        self._drop_graph()
        self._release()   # (stops the actors, once)
        self._broken = _SHUT_DOWN
        if error is not None:
            raise error

    def _unsaved_at_shutdown(self, reasons: List[str]) -> str:
        """shutdown(checkpoint=False)'s report of periodic checkpoints the shards could not write."""
        resume = (f"a run resumed from the shards' checkpoints continues from step {self._common[1]}, the newest "
                  f"that every shard holds" if self._common is not None else
                  "the run cannot be resumed from its shards' checkpoints: not every shard holds one")
        return (f"a checkpoint could not be written ({'; '.join(reasons)}); the table was shut down at step "
                f"{self.step_count} without a final checkpoint (checkpoint=False): {resume}")

    def _checkpoint_all(self) -> None:
        """Every shard checkpoints the current step unless its latest checkpoint holds it;
        ``RuntimeError`` naming the shards that could not."""
        S = self.num_shards

        def ask(k: int) -> Any:
            return self._actors[k].checkpoint.remote(self._common)

        got = self._wait_all([(k, ask(k)) for k in range(S)], expect=lambda k, reply: reply[0] == self._steps[k],
                             retry=ask, what="checkpoint")
        for k in range(S):
            self._note_holding(k, got[k][2])
        self._update_common()
        unsaved = [k for k in range(S) if got[k][1] is not None]
        if unsaved:
            why = "; ".join(f"shard {k}: {got[k][1]}" for k in unsaved)
            after = (f"stopped as it is, the run would resume at step {self._common[1]}, the newest that every shard "
                     f"holds a checkpoint of" if self._common is not None else
                     "stopped as it is, the run could not be resumed from its shards' checkpoints: not every shard "
                     "holds one")
            raise RuntimeError(f"the checkpoint of step {self.step_count} could not be written ({why}). The table "
                               f"still runs: call shutdown() again once it can be written, save_checkpoint() it, or "
                               f"shutdown(checkpoint=False) to stop it anyway ({after})")

    def __repr__(self) -> str:
        return (f"ShardedEmbedding({self.num_embeddings}, {self.embedding_dim}, num_shards={self.num_shards}, "
                f"optimizer={self.optimizer!r}, step={self.step_count})")


def per_shard_rows(num_embeddings: int, num_shards: int) -> List[int]:
    """Rows held by each shard.

    Examples
    --------
    >>> from cembed.distributed._client import per_shard_rows
    >>> per_shard_rows(10, 3)
    [4, 3, 3]
    """
    return [local_rows(k, num_shards, num_embeddings) for k in range(num_shards)]
