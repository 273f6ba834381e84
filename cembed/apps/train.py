"""`python -m cembed train`: word2vec-style skip-gram with negative sampling on the CPU.

Both tables are ``cembed.Embedding(sparse=True)`` trained by a cembed optimizer (SparseAdam by
default); the dot-product model between them is ``cembed.functional.embedding_dot_logistic`` (scores,
loss and gradients in one pass over the looked-up rows). ``backend="torch"`` runs the
identical model (same data, batches, negatives, initial weights and hyper-parameters) with
``torch.nn.Embedding(sparse=True)`` and a torch optimizer, for a side-by-side throughput figure.
``backend="gensim"`` trains gensim's ``Word2Vec`` (skip-gram, negative sampling, its own SGD schedule)
on the same sentences with the same dim / window / negatives / subsampling / epochs / seed / threads,
for a comparison with the reference CPU implementation most users know.
"""
import math
import os
import re
import queue
import resource
import sys
import tempfile
import threading
import time
import types
import zlib
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

import cembed
from cembed import storage
from cembed.distributed import initial_rows

from .corpus import Corpus
from .runtime import thread_settings


@dataclass
class TrainConfig:
    dim: int = 64
    window: int = 5
    negatives: int = 5
    batch_size: int = 32768
    epochs: int = 1
    optimizer: str = "sparseadam"
    lr: Optional[float] = None  # default per optimizer (DEFAULT_LR)
    subsample: float = 1e-4     # word2vec's frequent-word subsampling threshold; 0 disables
    chunk_tokens: int = 1 << 19
    seed: int = 0
    threads: Optional[int] = None
    backend: str = "cembed"
    dtype: str = "float32"         # table and optimizer-state dtype: float32, bfloat16 or float16 (cembed only)
    rounding: str = "stochastic"   # how 16-bit tables and state are rounded: stochastic or nearest
    shards: int = 0             # > 0: the cembed backend's tables are sharded over Ray actors (Ray running)
    table_dir: Optional[str] = None   # keep both tables and the optimizer state on disk in this directory
    resume: bool = False              # with table_dir: continue from the checkpoint in table_dir
    prefetch: bool = True             # with table_dir: prefetch batch k+1's rows while batch k is computed
    checkpoint_every: int = 0         # with table_dir: also checkpoint every this many steps (0: at the end only)
    row_order: Optional[str] = None   # with table_dir: rows stored by corpus count ("count") or by word id
    #                                   ("id"); None: "count", except for 16-bit tables rounded stochastically
    state_dtype: Optional[str] = None  # 16-bit tables: optimizer-state dtype (None: bfloat16, see below)
    background_batches: bool = True   # make the next batches in a background thread (the same batches)

    def optimizer_state_dtype(self):
        """The optimizer state's dtype for 16-bit tables: bfloat16 unless set. (float16 state lacks the
        range for Adam's second moments — squared gradients below 2**-24 flush to zero — so float16
        tables keep their state in bfloat16 too, by default.)"""
        return self.state_dtype or "bfloat16"

    def learning_rate(self):
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


DEFAULT_LR = {"sparseadam": 0.01, "adagrad": 0.2, "sgd": 0.05, "rowwise_adagrad": 0.1}
LOSS_EVERY = 8   # steps between two loss evaluations (shown smoothed in the progress bar)


# ------------------------------------------------------------------------------------------ data

class BatchStream:
    """Deterministic (center, [context, negatives...]) batches over a corpus.

    Per chunk of the corpus: frequent words are subsampled (word2vec's rule), each kept token gets a
    random window size in [1, window], every (center, context) pair inside a sentence is emitted, the
    pairs are shuffled, and each pair gets ``negatives`` words drawn from the unigram^0.75 table."""

    TABLE_SIZE = 1 << 23

    #: the largest window: each token's drawn window is kept in one byte (int8)
    MAX_WINDOW = 127

    def __init__(self, corpus: Corpus, config: TrainConfig):
        if not 1 <= config.window <= self.MAX_WINDOW:
            raise ValueError(f"window must be in [1, {self.MAX_WINDOW}], got {config.window}")
        self.corpus = corpus
        self.config = config
        freq = corpus.counts / max(1, corpus.counts.sum())
        if config.subsample > 0:
            with np.errstate(divide="ignore"):
                ratio = np.where(freq > 0, config.subsample / freq, np.inf)
            self.keep_prob = np.minimum(1.0, np.sqrt(ratio) + ratio).astype(np.float32)
        else:
            self.keep_prob = None
        weights = corpus.counts.astype(np.float64) ** 0.75
        cum = np.cumsum(weights)
        edges = np.searchsorted(cum / cum[-1], (np.arange(self.TABLE_SIZE) + 0.5) / self.TABLE_SIZE)
        self.neg_table = np.minimum(edges, corpus.vocab_size - 1).astype(np.int32)

    def pairs(self, tokens, sentence, rng):
        """(centers, contexts) of one chunk, shuffled: the kept tokens in a random order, and each
        token's pairs spread over the chunk (its pair at distance slot j moved j/(2·window) of the
        chunk further), so that a batch mixes distances and a token's pairs fall in different batches."""
        window, n = self.config.window, tokens.size
        slots = 2 * window
        reach = rng.integers(1, window + 1, n, dtype=np.int8)   # word2vec's dynamic window
        # by_slot[2(o-1), i] holds token i + o, by_slot[2(o-1)+1, i] token i - o, or -1 where that is no
        # context (past the window drawn for i, in another sentence, or outside the chunk); one
        # contiguous row per slot, so every pass below is over contiguous memory
        by_slot = np.full((slots, n), -1, dtype=np.int32)
        for offset in range(1, min(window, n - 1) + 1):
            same = sentence[offset:] == sentence[:-offset]
            np.copyto(by_slot[2 * offset - 2, :-offset], tokens[offset:], where=same & (reach[:-offset] >= offset))
            np.copyto(by_slot[2 * offset - 1, offset:], tokens[:-offset], where=same & (reach[offset:] >= offset))
        # one permutation of the n tokens (not of the ~2·window·n pairs: far cheaper); row i of the
        # output takes slot j of the token at permuted position i - j·n/(2·window) (mod n), so that
        # row i holds pairs of 2·window different tokens. Built slot by slot as two slices (no
        # np.roll copies), then the pairs kept in row order by one flatnonzero and two takes.
        order = rng.permutation(n)
        center_of = np.take(tokens, order)
        context = np.empty((n, slots), dtype=np.int32)
        center = np.empty((n, slots), dtype=np.int32)
        for slot in range(slots):
            shift = slot * n // slots
            row = np.take(by_slot[slot], order)
            context[shift:, slot], context[:shift, slot] = row[:n - shift], row[n - shift:]
            center[shift:, slot], center[:shift, slot] = center_of[:n - shift], center_of[n - shift:]
        kept = np.flatnonzero(context.reshape(-1) >= 0)
        return np.take(center.reshape(-1), kept), np.take(context.reshape(-1), kept)

    def __iter__(self):
        """Yields (center (B,), targets (B, 1 + negatives), words consumed so far)."""
        cfg, corpus = self.config, self.corpus
        rng = np.random.default_rng(cfg.seed + 1)
        sentence_of = corpus.sentence_ids()
        n = corpus.n_tokens
        consumed = 0
        for _ in range(cfg.epochs):
            for lo in range(0, n, cfg.chunk_tokens):
                hi = min(n, lo + cfg.chunk_tokens)
                tokens, sentence = corpus.tokens[lo:hi], sentence_of[lo:hi]
                if self.keep_prob is not None:
                    keep = rng.random(tokens.size, dtype=np.float32) < self.keep_prob[tokens]
                    tokens, sentence = tokens[keep], sentence[keep]
                centers, contexts = self.pairs(tokens, sentence, rng)
                n_batches = max(1, math.ceil(centers.size / cfg.batch_size))
                for b in range(n_batches):
                    c = centers[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    if c.size == 0:
                        continue
                    targets = np.empty((c.size, 1 + cfg.negatives), dtype=np.int32)
                    targets[:, 0] = contexts[b * cfg.batch_size:(b + 1) * cfg.batch_size]
                    draws = rng.integers(0, self.TABLE_SIZE, (c.size, cfg.negatives), dtype=np.int32)
                    targets[:, 1:] = np.take(self.neg_table, draws)   # (a take into the strided columns is slower)
                    words = consumed + (hi - lo) * (b + 1) // n_batches
                    yield c, targets, words
                consumed += hi - lo


#: How much nicer than the trainer the batch thread runs (Linux; docs/performance.md).
BATCH_THREAD_NICE = 5


def _nicer_thread(increment):
    """Lower the calling thread's priority by ``increment`` nice levels, best effort: on Linux
    ``setpriority`` of a thread id applies to that thread alone; elsewhere nothing happens."""
    if not sys.platform.startswith("linux") or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
    except OSError:
        pass


class BackgroundBatches:
    """``source``'s items, made up to ``depth`` ahead by a daemon thread while the caller trains on the
    previous ones. NumPy releases the GIL in its array operations, so the thread uses what the step
    leaves of the cores (its one-thread sorts, the Python between kernels, OpenMP workers waiting
    passively). It runs ``BATCH_THREAD_NICE`` nice levels below the trainer: when it competes with a
    kernel thread for a core the kernel gets most of it, yet it is never starved (an idle-priority
    thread, ``SCHED_IDLE``, measured faster on a quiet host but starved whenever other busy threads
    shared the trainer's scheduling group; docs/performance.md). The items and their order are those
    of iterating ``source`` directly; an exception raised in the thread is raised by ``next``.
    ``close()`` stops the thread (``_train`` closes it however the loop ends)."""

    _END = object()

    def __init__(self, source, depth=2):
        self._queue: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source,), name="cembed-batches", daemon=True)
        self._thread.start()

    def _put(self, entry):
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, source):
        _nicer_thread(BATCH_THREAD_NICE)
        try:
            for item in source:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as exc:   # noqa: BLE001 - handed to the consumer
            self._put((False, exc))

    def __iter__(self):
        return self

    def __next__(self):
        if self._stop.is_set():   # closed: at the end, after an error, or by the caller
            raise StopIteration
        ok, item = self._queue.get()
        if not ok:
            self.close()
            raise item
        if item is self._END:
            self.close()
            raise StopIteration
        return item

    def close(self):
        """Stop making batches and wait for the thread to end."""
        self._stop.set()
        self._thread.join()


def initial_tables(vocab_size, dim, seed):
    """word2vec's init: input rows uniform in [-0.5/dim, 0.5/dim], output rows zero. Defined per row
    (cembed.distributed.initial_rows), so sharded tables (``--shards``) start from the same values."""
    w_in = initial_rows(seed, np.arange(vocab_size), dim, np.float32, "uniform")
    return w_in, cembed.storage.aligned_zeros((vocab_size, dim), np.float32)


# ------------------------------------------------------------------------------------------ models

HALF_DTYPES = ("bfloat16", "float16")


BF16_EXTRA = 'the ml_dtypes package (the "bf16" extra: pip install "cembed[bf16]", or ".[bf16]" in its checkout)'


def table_dtype(name, flag="--dtype"):
    """The NumPy dtype of ``--dtype`` / ``--state-dtype`` (bfloat16 is ml_dtypes', an optional extra)."""
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError(f"{flag} bfloat16 needs {BF16_EXTRA}") from None
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


OPTIMIZERS = {"sparseadam": "SparseAdam", "adagrad": "Adagrad", "sgd": "SGD", "rowwise_adagrad": "RowWiseAdagrad"}


def make_optimizer(optim_module, params, config: TrainConfig, **options):
    """The configured optimizer from ``cembed.optim`` or ``torch.optim`` (same names, same arguments;
    torch has no row-wise Adagrad); with 16-bit tables, the optimizer state is 16-bit too, rounded as
    ``config.rounding`` says."""
    name = OPTIMIZERS[config.optimizer]
    if not hasattr(optim_module, name):
        raise ValueError(f"--optimizer {config.optimizer}: {optim_module.__name__} has no {name}")
    if config.dtype in HALF_DTYPES:
        return getattr(optim_module, name)(params, lr=config.learning_rate(), rounding=config.rounding,
                                           seed=config.seed, state_dtype=config.optimizer_state_dtype(), **options)
    return getattr(optim_module, name)(params, lr=config.learning_rate(), **options)


def memory_per_row(modules, optimizer):
    """{"table": bytes, "state": bytes} one row (word) costs summed over ``modules``: the table row
    and the optimizer state kept for it (every array with one entry or row per table row)."""
    table = state = 0
    for module in modules:
        weight = module.weight
        table += weight.itemsize * weight.shape[1]
        for value in optimizer.state.get(module, {}).values():
            if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == weight.shape[0]:
                state += value.nbytes // max(1, weight.shape[0])
    return {"table": table, "state": state}


class CembedModel:
    """Skip-gram negative sampling on two cembed tables: the scores, loss and gradients in one pass
    (``functional.embedding_dot_logistic``), each table's update fused into its backward."""

    name = "cembed"

    def __init__(self, w_in, w_out, config: TrainConfig, state_dir=None):
        self.n_steps = 0
        dtype = table_dtype(config.dtype)   # 16-bit tables: the float32 init rounded to nearest, page-aligned
        # as cembed allocates tables (every row in whole cache lines); a table already in that dtype, e.g.
        # one on disk, is used as it is, never copied
        self.emb_in: Any = cembed.Embedding.from_pretrained(
            w_in if w_in.dtype == dtype else cembed.storage.aligned_copy(w_in, dtype), freeze=False, sparse=True)
        self.emb_out: Any = cembed.Embedding.from_pretrained(
            w_out if w_out.dtype == dtype else cembed.storage.aligned_copy(w_out, dtype), freeze=False, sparse=True)
        options = {} if state_dir is None else {"state_dir": state_dir}
        self.opt = make_optimizer(cembed.optim, [self.emb_in, self.emb_out], config, **options)

    def prepare(self, centers, targets):
        """The batch as :meth:`step` takes it, made ahead in the batch thread: both index arrays
        checked and grouped by row once (``functional.group_indices``), so that the step neither
        re-checks nor sorts them (the same bits)."""
        group = cembed.functional.group_indices
        return group(centers, self.emb_in.num_embeddings), group(targets, self.emb_out.num_embeddings)

    def prefetch(self, centers, targets):
        """Start reading the rows (and their optimizer state) a coming step will touch."""
        self.emb_in.prefetch(centers, self.opt)
        self.emb_out.prefetch(targets, self.opt)

    def modules(self):
        return {"in": self.emb_in, "out": self.emb_out}

    def step(self, centers, targets):
        self.n_steps += 1
        want_loss = self.n_steps % LOSS_EVERY == 1            # the loss is only for the progress bar
        v = self.emb_in(centers)                              # (B, D), a copy of the centers' rows
        # scores of the context (positive) and the negatives, read straight from the output table,
        # d loss / d scores and d loss / d v (and the loss): one pass, before either table changes
        # (a table in this process is read in place, a 16-bit one widened row by row inside the kernel; a
        # sharded one through a float32 copy of the targets' rows, scored by the same kernel in the same
        # order: the same bits)
        table, rows = self._output_rows(targets)
        loss, g, dv = cembed.functional.embedding_dot_logistic(v, rows, table, with_loss=want_loss)
        # fused backward + update: each table's touched rows are summed and updated in one pass
        # (v is a copy, so updating the input table does not change the output table's gradient)
        self._fused_update(self.emb_in, dv, centers)
        # d loss / d w_out[t[b, k]] = g[b, k] * v[b]: handed over as (v, weights g), never materialised
        self._fused_update(self.emb_out, v, targets, per_sample_weights=g)
        return float(loss.sum()) / loss.size if loss is not None else None

    def _output_rows(self, targets):
        """(table, indices) for the scoring kernel: the output table itself when the kernel reads it
        in place, else the looked-up rows (float32) with indices numbering them."""
        weight = getattr(self.emb_out, "weight", None)
        if isinstance(weight, np.ndarray):
            return weight, targets
        rows = self.emb_out(targets)                          # (B, 1 + K, D) float32
        return rows.reshape(-1, rows.shape[-1]), np.arange(targets.size, dtype=np.int64).reshape(targets.shape)

    def _fused_update(self, table, grad_output, indices, per_sample_weights=None):
        table.backward(grad_output, indices, per_sample_weights=per_sample_weights, optimizer=self.opt)

    def input_table(self):
        weight = self.emb_in.weight
        return weight if weight.dtype.kind == "f" and weight.itemsize >= 4 else weight.astype(np.float32)

    def memory_per_row(self):
        return memory_per_row([self.emb_in, self.emb_out], self.opt)


class ShardedModel(CembedModel):
    """The cembed model with both tables row-sharded over ``config.shards`` Ray actors
    (cembed.distributed.ShardedEmbedding; Ray must be running): the same math, bitwise the same
    weights as CembedModel."""

    def __init__(self, w_in, w_out, config: TrainConfig):
        from cembed.distributed import ShardedEmbedding

        self.n_steps = 0
        self.name = f"ray:{config.shards}"
        vocab, dim = w_in.shape
        options: Dict[str, Any] = {"lr": config.learning_rate()}
        if config.dtype in HALF_DTYPES:   # as make_optimizer: 16-bit state, rounded as --rounding says
            options.update(rounding=config.rounding, seed=config.seed, state_dtype=config.optimizer_state_dtype())
        self.emb_in = ShardedEmbedding(vocab, dim, config.shards, config.optimizer, options, seed=config.seed,
                                       init="uniform", dtype=config.dtype)
        self.emb_out = ShardedEmbedding(vocab, dim, config.shards, config.optimizer, options, seed=config.seed,
                                        init="zeros", dtype=config.dtype)
        self.opt = None

    def _fused_update(self, table, grad_output, indices, per_sample_weights=None):
        table.backward(grad_output, indices, per_sample_weights=per_sample_weights, step=True)

    def prepare(self, centers, targets):
        return centers, targets   # the shards check and group their own rows

    def input_table(self):
        return self.emb_in.state_dict()["weight"]

    def memory_per_row(self):
        return None   # the rows and their state live on the shards, not in this process

    def close(self):
        self.emb_in.shutdown()
        self.emb_out.shutdown()


class TorchModel:
    """The same model with torch.nn.Embedding(sparse=True), torch autograd and a torch optimizer."""

    name = "torch"

    def __init__(self, w_in, w_out, config: TrainConfig):
        import torch

        self.n_steps = 0

        self.torch = torch   # train() runs it on the same thread count as cembed
        self.emb_in = torch.nn.Embedding.from_pretrained(torch.from_numpy(w_in), freeze=False, sparse=True)
        self.emb_out = torch.nn.Embedding.from_pretrained(torch.from_numpy(w_out), freeze=False, sparse=True)
        params = list(self.emb_in.parameters()) + list(self.emb_out.parameters())
        self.opt = make_optimizer(torch.optim, params, config)

    def step(self, centers, targets):
        torch = self.torch
        c = torch.from_numpy(centers.astype(np.int64))
        t = torch.from_numpy(targets.astype(np.int64))
        v = self.emb_in(c)
        u = self.emb_out(t)
        scores = torch.bmm(u, v.unsqueeze(2)).squeeze(2)
        loss = torch.nn.functional.softplus(-scores[:, 0]).sum() + torch.nn.functional.softplus(scores[:, 1:]).sum()
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.n_steps += 1
        return loss.item() / centers.size if self.n_steps % LOSS_EVERY == 1 else None

    def input_table(self):
        return self.emb_in.weight.detach().numpy()


# ------------------------------------------------------------------------------------------ quality

def evaluation_words(corpus: Corpus, n_eval=2000):
    """The most frequent words (by count), which the training sees often enough to place."""
    n_eval = min(n_eval, corpus.vocab_size)
    return np.argsort(-corpus.counts, kind="stable")[:n_eval]


def evaluation_sets(corpus: Corpus, n_eval=2000, seed=0):
    """{"frequent": the n_eval most frequent words, "rare": n_eval words seen 10 to 100 times}."""
    sets = {"frequent": evaluation_words(corpus, n_eval)}
    if sets["frequent"].size < 2:   # a neighbour needs a second word
        return {}
    rare = np.flatnonzero((corpus.counts >= 10) & (corpus.counts <= 100))
    if rare.size >= 50:
        rng = np.random.default_rng(seed)
        sets["rare"] = np.sort(rng.choice(rare, size=min(n_eval, rare.size), replace=False))
    return sets


def topic_precision(table, words, topics, k=10):
    """(precision@k, chance): the share of each word's k nearest neighbours (cosine, among ``words``)
    that belong to its topic, and the same share expected from random neighbours."""
    emb = table[words].astype(np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.maximum(norms, 1e-12)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    k = min(k, len(words) - 1)
    nearest = np.argpartition(-sims, k, axis=1)[:, :k]
    labels = topics[words]
    precision = float(np.mean(labels[nearest] == labels[:, None]))
    same = np.bincount(labels, minlength=labels.max() + 1)[labels] - 1
    chance = float(np.mean(same / (len(words) - 1)))
    return precision, chance


def nearest_words(table, corpus, queries, k=5, block_bytes=32 << 20):
    """Each query word's ``k`` nearest words (cosine), best first. ``table`` is read a block of rows
    at a time (``row_blocks``): a table on disk larger than RAM is never copied whole."""
    queries = [int(q) for q in queries]
    if not queries or k <= 0:
        return {corpus.words[q]: [] for q in queries}
    picked = np.asarray(table[np.asarray(queries, dtype=np.int64)], dtype=np.float32)
    unit = picked / np.maximum(np.linalg.norm(picked, axis=1, keepdims=True), 1e-12)
    best = [(np.empty(0, np.float32), np.empty(0, np.int64)) for _ in queries]   # per query: sims, ids
    for lo, rows in row_blocks(table, block_bytes):
        emb = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        ids = np.arange(lo, lo + len(rows))
        for j, q in enumerate(queries):
            sims = emb @ unit[j]
            sims[np.isnan(sims)] = -np.inf   # (a NaN row, in a diverged table, is nobody's neighbour)
            if lo <= q < lo + len(rows):
                sims[q - lo] = -np.inf   # (not its own neighbour)
            sims, where = np.concatenate([best[j][0], sims]), np.concatenate([best[j][1], ids])
            if sims.size > k:   # the k best, ties to the lower id (all tied at the k-th value kept, then sorted)
                kept = np.flatnonzero(sims >= np.partition(sims, sims.size - k)[sims.size - k])
                sims, where = sims[kept], where[kept]
            order = np.lexsort((where, -sims))[:k]
            best[j] = (sims[order], where[order])
    return {corpus.words[q]: [corpus.words[int(i)] for i in best[j][1]] for j, q in enumerate(queries)}


def row_blocks(table, block_bytes=32 << 20):
    """``(first row, float32 rows)`` for consecutive blocks of about ``block_bytes`` of ``table`` (an
    array, or ``WordRows`` of tables on disk: indexing by word ids gives float32 rows), so that a table
    on disk larger than RAM is never read whole."""
    n_rows, dim = int(table.shape[0]), int(table.shape[1])
    step = max(1, block_bytes // max(1, 4 * dim))
    for lo in range(0, n_rows, step):
        yield lo, np.asarray(table[np.arange(lo, min(lo + step, n_rows))], dtype=np.float32)


# ------------------------------------------------------------------------------------------ loop

class Progress:
    """A one-line progress bar on stderr: percent, words/s, smoothed loss, elapsed / remaining."""

    def __init__(self, total, label, stream=None, enabled=True, width=28, already_done=0):
        # (already_done: words a resumed run trained before; its rate and time left count this run's words)
        self.total, self.label, self.width, self.already_done = total, label, width, already_done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.last = 0.0
        self.loss: Optional[float] = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.logged = 0

    def update(self, done, loss, force=False):
        if loss is not None:
            self.loss = loss if self.loss is None else 0.7 * self.loss + 0.3 * loss
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.25):
            return
        self.last = now
        elapsed = now - self.start
        frac = min(1.0, done / max(1, self.total))
        if not self.tty:  # a log file: one line per tenth instead of a redrawn bar
            if int(frac * 10) <= self.logged and not force:
                return
            self.logged = int(frac * 10)
        rate = (done - self.already_done) / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        bar = "#" * int(frac * self.width)
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        self.stream.write(f"{chr(13) if self.tty else ''}{self.label} [{bar:<{self.width}}] {frac:6.1%}  "
                          f"{rate:>11,.0f} words/s  loss {loss}  {elapsed:5.1f}s elapsed  {eta:5.1f}s left "
                          + ("" if self.tty else "\n"))
        self.stream.flush()

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


@dataclass
class TrainResult:
    backend: str
    seconds: float
    words: int
    words_per_second: float
    final_loss: Optional[float]   # smoothed loss per pair at the end; None when no training pair was formed
    quality_before: Optional[dict] = None   # evaluation set -> precision@10 before training
    quality_after: Optional[dict] = None    # evaluation set -> precision@10 after training
    chance: Optional[dict] = None           # evaluation set -> precision@10 of random neighbours
    eval_sizes: Optional[dict] = None
    table: Any = None             # the input table by word id (--table-dir: a WordRows view of the file)
    prep_seconds: float = 0.0     # set-up not counted in ``seconds`` (gensim: corpus file + vocabulary)
    memory_per_row: Optional[dict] = None   # cembed: {"table": bytes, "state": bytes} per word, both tables
    peak_rss: int = 0             # the process's peak resident memory so far, bytes (getrusage)
    resumed_words: int = 0        # --resume: words the checkpoint had already trained on


def train(corpus: Corpus, config: TrainConfig, *, progress=True):
    """Train one backend on ``corpus``; returns a TrainResult (quality measured when topics exist).

    Runs on ``config.threads`` threads (None: cembed's current setting), torch on the same number;
    cembed's and torch's thread settings are as before when it returns."""
    torch: Optional[types.ModuleType] = None
    if config.backend == "torch":
        import torch
    with thread_settings(config.threads, torch) as threads:
        if config.backend == "gensim":
            return _train_gensim(corpus, config, threads, progress)
        return _train(corpus, config, progress)


def peak_rss_bytes():
    """The process's peak resident set size so far, in bytes (``getrusage``; Linux counts KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


class TableDirError(ValueError):
    """``--table-dir DIR`` cannot be used: another trainer (or an optimizer with ``DIR/state``) uses it."""


class ResumeError(TableDirError):
    """``--resume`` cannot continue from the checkpoint in the table directory."""


#: The settings a resumed run must share with the run that wrote the checkpoint.
RESUME_KEYS = ("dim", "window", "negatives", "batch_size", "epochs", "optimizer", "lr", "subsample",
               "chunk_tokens", "seed")


#: Settings that checkpoints of earlier versions do not record: not compared when absent.
RECORDED_SINCE = ("dtype", "rounding", "state_dtype", "corpus")


def corpus_fingerprint(corpus: Corpus) -> str:
    """A CRC-32 of the corpus's tokens and sentence boundaries (``"crc32:xxxxxxxx"``): a ``--resume``
    compares it, so another corpus of the same vocabulary and token count is refused in any row order."""
    crc = zlib.crc32(np.ascontiguousarray(corpus.tokens, dtype="<i4").tobytes())
    crc = zlib.crc32(np.ascontiguousarray(corpus.sentence_starts, dtype="<i8").tobytes(), crc)
    return f"crc32:{crc:08x}"


def _comparable(settings):
    """``settings`` as a resume compares them: a learning rate left to its default (None, as
    checkpoints before 2026-11-26 record it) is that default, so ``--lr 0.01`` resumes a run made
    without ``--lr`` and the other way round."""
    settings = dict(settings)
    if settings.get("lr") is None and settings.get("optimizer") in DEFAULT_LR:
        settings["lr"] = DEFAULT_LR[settings["optimizer"]]
    return settings

ROW_ORDERS = ("count", "id")


def table_row_order(config: TrainConfig):
    """The row order of ``--table-dir``'s files: ``"count"`` (the corpus's most frequent words first:
    the rows a run touches share pages) or ``"id"`` (row i holds word i). Default: ``"count"``, except
    for 16-bit tables rounded stochastically, whose random bits are keyed by the table row: stored in
    another order they would round differently from the same training in memory."""
    stochastic = config.dtype in HALF_DTYPES and config.rounding == "stochastic"
    if config.row_order is None:
        return "id" if stochastic else "count"
    if config.row_order not in ROW_ORDERS:
        raise ValueError(f"row order {config.row_order!r}: expected one of {', '.join(ROW_ORDERS)}")
    if config.row_order == "count" and stochastic:
        raise ValueError(f"--row-order count with --dtype {config.dtype} and stochastic rounding: the rounding's "
                         "random bits are keyed by the table row, so the training would differ from the same "
                         "training in memory; use --row-order id or --rounding nearest")
    return config.row_order


class WordRows:
    """A table read by word id when its rows are stored in another order (``rank[word]`` is the word's
    row), as float32: ``rows[words]`` reads only those rows; ``numpy.asarray(rows)`` builds the whole
    table in word order (the embeddings to save)."""

    def __init__(self, table, rank=None):
        self.table = table
        self.rank = rank
        self.shape = table.shape
        self.ndim = table.ndim
        self.dtype = np.dtype(np.float32)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, words):
        rows = self.table[words] if self.rank is None else self.table[self.rank[words]]
        return np.asarray(rows, dtype=np.float32)

    def __array__(self, dtype=None, copy=None):
        out = (np.asarray(self.table, dtype=np.float32) if self.rank is None
               else np.take(self.table, self.rank, axis=0).astype(np.float32, copy=False))
        return out if dtype is None else out.astype(dtype, copy=False)


def recorded_settings(table_dir):
    """The settings the trainer checkpoint in ``table_dir`` records ({} when there is none or it
    cannot be read: ``--resume`` reports why when it checks the checkpoint)."""
    try:
        meta, _ = cembed.checkpoint.read_directory(os.path.join(table_dir, "checkpoint"), verify=False)
    except (ValueError, OSError):
        return {}
    extra = meta.get("extra") if isinstance(meta, dict) else None
    settings = extra.get("settings") if isinstance(extra, dict) else None
    return dict(settings) if isinstance(settings, dict) else {}


class TableDir:
    """``--table-dir DIR``: the tables (``DIR/tables/in.npy``, ``out.npy``) and the optimizer state
    (``DIR/state/``) as memory-mapped files, checkpoints in ``DIR/checkpoint`` (``docs/storage.md``).

    With the ``"count"`` row order (``table_row_order``) file row p holds word ``order[p]``, the words
    sorted by their count in the corpus (most frequent first, ties by id), and every batch's word ids
    are mapped to file rows (``rows``) before the model sees them: the same arithmetic on the same
    values, so the training is bitwise the training in memory, with the rows a run touches packed
    into the files' first pages instead of spread over the whole vocabulary."""

    def __init__(self, root, config: TrainConfig, corpus):
        self.root = os.path.abspath(root)
        self.tables = os.path.join(self.root, "tables")
        self.state = os.path.join(self.root, "state")
        self.checkpoint = os.path.join(self.root, "checkpoint")
        self.settings = {"dtype": config.dtype}   # (first: the difference a refusal names first)
        self.settings.update({key: getattr(config, key) for key in RESUME_KEYS}, lr=config.learning_rate())
        self.settings.update(vocab_size=corpus.vocab_size, n_tokens=corpus.n_tokens, corpus=corpus_fingerprint(corpus))
        if config.dtype != "float32":   # a 16-bit run's rounding and state dtype (a load would keep the saved ones)
            self.settings.update(rounding=config.rounding, state_dtype=config.optimizer_state_dtype())
        self.total_words = corpus.n_tokens * config.epochs
        # at most this many steps: a chunk of k tokens gives at most 2·window·k pairs, at least one batch
        chunk, n = config.chunk_tokens, corpus.n_tokens
        per_epoch = (n // chunk) * max(1, -(-2 * config.window * chunk // config.batch_size))
        if n % chunk:
            per_epoch += max(1, -(-2 * config.window * (n % chunk) // config.batch_size))
        self.max_steps = per_epoch * config.epochs
        self._lock_fd: Optional[int] = None
        self._state_lock_fd: Optional[int] = None
        self.row_order = table_row_order(config)
        self.order = self.rank = None
        if self.row_order == "count":
            self.order = np.argsort(-corpus.counts.astype(np.int64), kind="stable")   # file row -> word
            self.rank = np.empty(corpus.vocab_size, dtype=np.int32)                   # word -> file row
            self.rank[self.order] = np.arange(corpus.vocab_size, dtype=np.int32)
            # the order comes from the corpus: a resume with another corpus of the same size is refused
            self.settings["row_order"] = f"count:{zlib.crc32(self.order.astype('<i8').tobytes()):08x}"
        else:
            self.settings["row_order"] = "id"

    def rows(self, words):
        """The file rows of word ids (an int32 array of the same shape)."""
        return words if self.rank is None else np.take(self.rank, words)

    def by_word(self, table):
        """``table`` (in file order) read by word id, as float32 (``WordRows``)."""
        return WordRows(table, self.rank)

    def open_tables(self, config: TrainConfig, vocab_size):
        """The two tables, created with the trainer's initialisation (bitwise ``initial_tables``, rows
        in the file order), or, when resuming, opened as they are (their values come from the checkpoint)."""
        os.makedirs(self.tables, exist_ok=True)
        mode = "r+" if config.resume else "w+"
        dtype = table_dtype(config.dtype)   # 16-bit: the float32 init rounded to nearest, like in memory
        order = self.order

        def init_in(block, start):   # initial_tables' values, row by row (a float32 block)
            stop = start + block.shape[0]
            words = np.arange(start, stop) if order is None else order[start:stop]
            block[:] = initial_rows(config.seed, words, config.dim, np.float32)

        try:
            w_in = cembed.open_table(os.path.join(self.tables, "in.npy"), vocab_size, config.dim, dtype, mode=mode,
                                     init=init_in)
            w_out = cembed.open_table(os.path.join(self.tables, "out.npy"), vocab_size, config.dim, dtype,
                                      mode=mode, init="zeros")
        except (TypeError, ValueError) as exc:   # resuming: tables of another --dtype or size
            if not config.resume:
                raise
            raise ResumeError(f"--resume: {exc}") from None
        self.order = None   # only the initialisation needs it
        return w_in, w_out

    def lock(self):
        """Take the directory for this run, before anything in it changes: an exclusive ``flock`` on
        ``DIR/.lock`` (held until :meth:`unlock`) and one on ``DIR/state/.lock``, the optimizer state's
        (held until :meth:`hand_over_state`, when the run's optimizer takes it: no other optimizer can
        take the state meanwhile). TableDirError when another trainer or optimizer uses either."""
        import fcntl

        def take(path, refusal):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise TableDirError(refusal) from None
            return fd

        if os.path.isdir(self.root):
            self._check_checkpoint_replaceable()   # before anything is made (again below, under the lock)
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, ".lock")
        self._lock_fd = take(path, f"--table-dir {self.root} is in use by another trainer (its lock {path} is held)")
        try:
            os.makedirs(self.state, exist_ok=True)
            state_lock = os.path.join(self.state, ".lock")
            self._state_lock_fd = take(state_lock, f"--table-dir {self.root}: its optimizer state {self.state} is "
                                                   f"in use by another optimizer (its lock {state_lock} is held)")
            self._check_checkpoint_replaceable()
            self._remove_stale_table_temporaries()
        except BaseException:
            self.unlock()
            raise

    #: The hidden temporaries a table is written to before it is renamed into place (storage.write_aside).
    _TABLE_TEMPORARY = re.compile(r"\.(in|out)\.npy\.[^/]+\.(tmp|cembed\.new)")

    def _remove_stale_table_temporaries(self):
        """Remove what a run killed while it made its tables left in ``DIR/tables`` (a full table's disk
        space each, hidden: a SIGKILL gives Python no chance to remove them), now that the directory is
        locked: no other run can be writing them. Other files are never touched."""
        if not os.path.isdir(self.tables):
            return
        for name in os.listdir(self.tables):
            if self._TABLE_TEMPORARY.fullmatch(name):
                try:
                    os.unlink(os.path.join(self.tables, name))
                except OSError:
                    pass

    def _check_checkpoint_replaceable(self):
        """The checkpoint the run will write at its end: refused now, not after the training."""
        try:
            cembed.checkpoint.check_replaceable(self.checkpoint)
        except ValueError as exc:
            raise TableDirError(f"--table-dir {self.root}: {exc}") from None

    def hand_over_state(self):
        """Release ``DIR/state/.lock`` for the run's optimizer, which takes it as it is made."""
        if self._state_lock_fd is not None:
            os.close(self._state_lock_fd)
            self._state_lock_fd = None

    def unlock(self):
        self.hand_over_state()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def check_resume(self):
        """Everything ``--resume`` needs from the checkpoint, checked before anything in the directory
        changes: the checkpoint complete and intact (every file's CRC-32), written with these settings,
        its steps and words in range. Returns (steps, words) already trained."""
        try:
            meta, _ = cembed.checkpoint.read_directory(self.checkpoint, verify=True)
        except ValueError as exc:
            raise ResumeError(f"--resume: {exc}") from None
        extra = meta.get("extra") if isinstance(meta, dict) else None
        if not isinstance(extra, dict) or not isinstance(extra.get("settings"), dict):
            raise ResumeError(f"--resume: {self.checkpoint} is not a trainer checkpoint (no settings, steps and "
                              "words recorded)")
        saved, settings = _comparable(extra["settings"]), _comparable(self.settings)
        differ = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                  if saved.get(k) != v and not (k in RECORDED_SINCE and k not in saved)]
        if differ:
            raise ResumeError("--resume: the checkpoint was written with other settings: " + ", ".join(differ))
        done = []
        for key, high in (("steps", self.max_steps), ("words", self.total_words)):
            value = extra.get(key)
            if type(value) is not int or not 0 <= value <= high:
                raise ResumeError(f"--resume: {self.checkpoint}: the checkpoint records {key} {value!r}, expected "
                                  f"an int in [0, {high}]")
            done.append(value)
        return done[0], done[1]

    def resume(self, model):
        """Load the checkpoint (checked by :meth:`check_resume`) into the model."""
        try:
            cembed.load_checkpoint(self.checkpoint, model.modules(), model.opt, verify=False)
        except ValueError as exc:
            raise ResumeError(f"--resume: {exc}") from None

    def save(self, model, steps, words):
        cembed.save_checkpoint(self.checkpoint, model.modules(), model.opt,
                               extra={"steps": steps, "words": words, "settings": self.settings})


def step_inputs(batches, skip, table_dir, prepare):
    """The batches as the model's step takes them: from the ``skip``-th on (the stream is
    deterministic: a resumed run skips what the checkpoint has trained on), word ids mapped to the
    files' rows (``--table-dir``), then the model's ``prepare`` (if any). Run by the batch thread."""
    for k, (centers, targets, words) in enumerate(batches):
        if k < skip:
            continue
        if table_dir is not None:
            centers, targets = table_dir.rows(centers), table_dir.rows(targets)
        if prepare is not None:
            centers, targets = prepare(centers, targets)
        yield centers, targets, words


def _train(corpus, config, progress):
    table_dir = None
    if config.table_dir is not None:
        if config.backend != "cembed":
            raise ValueError(f"--table-dir keeps cembed's tables on disk; the {config.backend} backend cannot")
        if config.shards:
            raise ValueError("--table-dir keeps the tables in this process; --shards puts them on Ray actors")
        table_dir = TableDir(config.table_dir, config, corpus)
        if config.resume and not os.path.isdir(table_dir.tables):
            raise ResumeError(f"--resume: {table_dir.tables} does not exist (nothing to resume)")
        table_dir.lock()   # before anything in DIR changes
    try:
        return _train_with(corpus, config, progress, table_dir)
    finally:
        if table_dir is not None:
            table_dir.unlock()


def _train_with(corpus, config, progress, table_dir):
    done_steps, done_words = 0, 0
    if table_dir is not None:
        if config.resume:   # the checkpoint and its settings, checked before the tables are opened
            done_steps, done_words = table_dir.check_resume()
        w_in, w_out = table_dir.open_tables(config, corpus.vocab_size)
    else:
        w_in, w_out = initial_tables(corpus.vocab_size, config.dim, config.seed)
    eval_sets = (evaluation_sets(corpus) or None) if corpus.topics is not None else None
    model: Any
    prefetch = None
    if table_dir is not None:
        table_dir.hand_over_state()   # (the model's optimizer locks DIR/state as it is made)
        on_disk = CembedModel(w_in, w_out, config, state_dir=table_dir.state)
        if config.resume:
            table_dir.resume(on_disk)
        on_disk.n_steps = done_steps
        model = on_disk
        if config.prefetch:
            prefetch = on_disk.prefetch
    else:
        model = (TorchModel if config.backend == "torch" else ShardedModel if config.shards else CembedModel)(
            w_in, w_out, config)
    def input_table():   # the input table by word id (a table on disk is read row by row, not copied)
        return table_dir.by_word(model.emb_in.weight) if table_dir is not None else model.input_table()

    before, chance = {}, {}
    for name, words in (eval_sets or {}).items():
        before[name], chance[name] = topic_precision(input_table(), words, corpus.topics)
    batches = BatchStream(corpus, config)
    if table_dir is not None:   # the set-up's freed temporaries: page cache for the tables under a memory limit
        cembed.storage.release_free_memory()
    total = corpus.n_tokens * config.epochs
    bar = Progress(total, f"{model.name:>6}", enabled=progress, already_done=done_words)
    loss = None
    words = done_words
    source = None
    try:
        inputs = step_inputs(batches, done_steps, table_dir, getattr(model, "prepare", None))
        source = stream = BackgroundBatches(inputs) if config.background_batches else inputs
        start = time.perf_counter()
        batch = next(stream, None)
        while batch is not None:
            centers, targets, words = batch
            batch = next(stream, None)
            if prefetch is not None and batch is not None:
                prefetch(batch[0], batch[1])   # the disk reads batch k+1 while batch k is computed
            loss = model.step(centers, targets)
            bar.update(words, loss)
            if table_dir is not None and config.checkpoint_every and on_disk.n_steps % config.checkpoint_every == 0:
                table_dir.save(on_disk, on_disk.n_steps, words)
        seconds = time.perf_counter() - start
    finally:
        if isinstance(source, BackgroundBatches):
            source.close()
    if table_dir is not None:
        table_dir.save(model, model.n_steps, total)
    table = input_table()
    if isinstance(model, ShardedModel):
        model.close()
    trained = total - done_words
    words = total   # every token was consumed, also when the last slices gave no pair
    bar.update(words, loss, force=True)
    bar.close()
    result = TrainResult(backend=model.name, seconds=seconds, words=trained,
                         words_per_second=trained / seconds if seconds > 0 else float("nan"),
                         final_loss=bar.loss, table=table, peak_rss=peak_rss_bytes(),
                         resumed_words=done_words)
    if hasattr(model, "memory_per_row"):
        result.memory_per_row = model.memory_per_row()
    return _score(result, corpus, eval_sets, before, chance)


def _score(result, corpus, eval_sets, before, chance):
    if eval_sets is not None:
        result.quality_before, result.chance = before, chance
        result.quality_after = {name: topic_precision(result.table, words, corpus.topics)[0]
                                for name, words in eval_sets.items()}
        result.eval_sizes = {name: len(words) for name, words in eval_sets.items()}
    return result


# ------------------------------------------------------------------------------------------ gensim

GENSIM_ALPHA = 0.025        # gensim's (and word2vec's) skip-gram learning rate, decayed linearly ...
GENSIM_MIN_ALPHA = 0.0001   # ... to this over the run


def gensim_options(config: TrainConfig, threads):
    """Word2Vec's arguments for the model ``config`` describes: skip-gram (sg=1) with negative sampling
    (hs=0), every word kept (min_count=1: the corpus is already filtered), the same window, negatives,
    subsampling threshold, epochs and seed, one worker per thread. The optimizer is gensim's own
    (plain SGD, alpha decayed linearly); --optimizer, --lr and --batch-size do not apply."""
    return dict(vector_size=config.dim, window=config.window, negative=config.negatives, sg=1, hs=0,
                min_count=1, sample=config.subsample, epochs=config.epochs, seed=config.seed, workers=threads,
                alpha=GENSIM_ALPHA, min_alpha=GENSIM_MIN_ALPHA)


def write_line_sentences(corpus: Corpus, path, sentences_per_write=1 << 14):
    """The corpus in gensim's LineSentence format: one sentence per line, each word written as its id
    (whitespace-free whatever the word is, and mapped back by int())."""
    names = [str(i) for i in range(corpus.vocab_size)]
    starts = corpus.sentence_starts
    with open(path, "w", encoding="ascii") as fh:
        for s0 in range(0, starts.size - 1, sentences_per_write):
            s1 = min(starts.size - 1, s0 + sentences_per_write)
            base = int(starts[s0])
            ids = corpus.tokens[base:int(starts[s1])].tolist()
            bounds = (starts[s0:s1 + 1] - base).tolist()
            fh.write("".join(" ".join([names[t] for t in ids[a:b]]) + "\n" for a, b in zip(bounds, bounds[1:])))


def _table_by_id(vectors, ids, vocab_size):
    """gensim's vectors (its own row order) as a (vocab_size, D) table in corpus ids; words the corpus
    never uses are not in gensim's vocabulary and stay zero."""
    table = np.zeros((vocab_size, vectors.shape[1]), dtype=np.float32)
    table[ids] = vectors
    return table


def _train_gensim(corpus, config, threads, progress):
    """gensim Word2Vec on the same sentences. Input route: ``corpus_file`` (a LineSentence file), gensim's
    file-based mode, in which every worker reads its own part of the file in Cython without the GIL and
    the throughput scales with the workers; the iterable route feeds all workers from one Python thread.
    Writing the file and building the vocabulary are timed apart (``prep_seconds``), like the corpus
    preparation of the other backends; ``seconds`` is Word2Vec.train alone."""
    from gensim.models import Word2Vec

    eval_sets = (evaluation_sets(corpus) or None) if corpus.topics is not None else None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cembed-gensim-") as tmp:
        path = os.path.join(tmp, "sentences.txt")
        write_line_sentences(corpus, path)
        model = Word2Vec(**gensim_options(config, threads))
        model.build_vocab(corpus_file=path)
        ids = np.fromiter(map(int, model.wv.index_to_key), dtype=np.int64, count=len(model.wv.index_to_key))
        initial = _table_by_id(model.wv.vectors, ids, corpus.vocab_size)
        before, chance = {}, {}
        for name, words in (eval_sets or {}).items():
            before[name], chance[name] = topic_precision(initial, words, corpus.topics)
        del initial
        prep = time.perf_counter() - t0
        if progress:
            sys.stderr.write(f"gensim  training Word2Vec on {threads} worker(s) (no progress bar)...\n")
            sys.stderr.flush()
        start = time.perf_counter()
        model.train(corpus_file=path, total_words=model.corpus_total_words, epochs=config.epochs)
        seconds = time.perf_counter() - start
    words = corpus.n_tokens * config.epochs
    result = TrainResult(backend="gensim", seconds=seconds, words=words,
                         words_per_second=words / seconds if seconds > 0 else float("nan"), final_loss=None,
                         table=_table_by_id(model.wv.vectors, ids, corpus.vocab_size), prep_seconds=prep,
                         peak_rss=peak_rss_bytes())
    return _score(result, corpus, eval_sets, before, chance)


def _write_float32_npy(fh, table, block_bytes=32 << 20):
    """``table`` (an array, or ``WordRows`` of tables on disk: indexing by word ids gives float32 rows) as a
    float32 ``.npy``, a block of rows at a time: a table on disk larger than RAM is never read whole."""
    n_rows, dim = int(table.shape[0]), int(table.shape[1])
    np.lib.format.write_array_header_1_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")),
                                              "fortran_order": False, "shape": (n_rows, dim)})
    for _, rows in row_blocks(table, block_bytes):
        fh.write(np.ascontiguousarray(rows, dtype="<f4").data)   # (the block's buffer: no bytes copy of it)


def save_embeddings(out_dir, table, corpus):
    """embeddings.npy (float32, one row per word) and vocab.txt (the words, same order), each written
    to a synced temporary file first; both are renamed into place, or neither (a failed save or a
    Ctrl-C leaves the previous files as they were; a process killed in the instant between the two
    renames leaves the new embeddings.npy beside the old vocab.txt, until the next save)."""
    os.makedirs(out_dir, exist_ok=True)
    emb_path = os.path.join(out_dir, "embeddings.npy")
    vocab_path = os.path.join(out_dir, "vocab.txt")

    def vocabulary(fh):
        for i in range(corpus.vocab_size):
            fh.write(corpus.words[i].encode("utf-8"))
            fh.write(b"\n")
    parts = []
    try:
        parts.append((storage.write_aside(emb_path, lambda fh: _write_float32_npy(fh, table)), emb_path))
        parts.append((storage.write_aside(vocab_path, vocabulary), vocab_path))
        storage.replace_files(parts)
    finally:
        for tmp, _ in parts:
            if os.path.lexists(tmp):   # (not renamed: a failed write or rename; its lock released too)
                storage.discard_reserved(tmp)
    storage.fsync_directory(out_dir)
    return emb_path, vocab_path


def pca_plot(out_dir, table, corpus, n_topics_shown=10, per_topic=40, seed=0):
    """pca.png: 2-D PCA of frequent words of a few topics, coloured by topic. None without matplotlib,
    False when there is nothing to project in 2-D (dim 1, fewer than two words)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    words = evaluation_words(corpus, 20 * per_topic * max(1, corpus.n_topics // n_topics_shown))
    labels = corpus.topics[words]
    shown = np.sort(np.random.default_rng(seed).choice(np.unique(labels),
                                                       size=min(n_topics_shown, np.unique(labels).size),
                                                       replace=False))
    picked = np.concatenate([words[labels == t][:per_topic] for t in shown])
    x = table[picked].astype(np.float64)
    if min(x.shape) < 2 or not np.isfinite(x).all():   # (dim 1, a single word: no 2-D projection)
        return False
    x -= x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(7, 6), dpi=110)
    cmap = plt.get_cmap("tab10")
    for i, t in enumerate(shown):
        sel = corpus.topics[picked] == t
        ax.scatter(xy[sel, 0], xy[sel, 1], s=14, color=cmap(i % 10), label=f"topic {t}")
    ax.set_title("cembed skip-gram: PCA of frequent words, coloured by planted topic")
    ax.legend(fontsize=7, markerscale=1.5, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    fig.tight_layout()
    path = os.path.join(out_dir, "pca.png")
    try:
        os.makedirs(out_dir, exist_ok=True)   # (as save_embeddings: the writer makes the directory)
        storage.write_atomically(path, lambda fh: fig.savefig(fh, format="png"))
    finally:
        plt.close(fig)
    return path
