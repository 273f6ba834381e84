"""Command line: `python -m cembed train` (the main job), `bench` and `config`."""
import argparse
import errno
import math
import os
import signal
import sys
import threading
import time
from typing import Any, List

from .runtime import reuse_large_allocations


def _number(convert, what, accept, bad_value=None):
    """An argparse type: ``convert(text)``, which must satisfy ``accept``; messages say ``what`` was
    expected (``bad_value`` for a parsed value that is refused, when it reads better)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"expected {bad_value or what}, got {value}")
        return value
    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_positive_float = _number(float, "a positive number", lambda v: math.isfinite(v) and v > 0,
                          "a finite positive number")
_non_negative_float = _number(float, "a number >= 0", lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
_seed = _number(int, "an integer in [0, 2**64)", lambda v: 0 <= v < 2 ** 64)
_shards = _number(int, "an integer >= 0", lambda v: v >= 0)


def _path(text):
    """A path argument: any non-empty string (an empty one would mean the current directory, or be
    taken for an absent option)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


BACKENDS = ("cembed", "torch", "gensim")
BACKEND_ALIASES = {"both": ["cembed", "torch"], "all": list(BACKENDS)}


def _backends(text):
    """--backend: one of BACKENDS, an alias (both, all) or a comma list of them, in order, no repeats."""
    chosen = []
    for part in text.split(","):
        part = part.strip()
        names = BACKEND_ALIASES.get(part, [part])
        if any(name not in BACKENDS for name in names):
            raise argparse.ArgumentTypeError(
                f"expected {', '.join(BACKENDS)}, both, all or a comma list of them, got {part!r}")
        chosen += [name for name in names if name not in chosen]
    return chosen


class _Parser(argparse.ArgumentParser):
    """argparse's parser, except that a message it cannot write for want of room or by the device
    (``--help > /dev/full``) is an OSError for :func:`main` to report, not ignored (exit 0 with nothing
    written). A reader that went away (``--help | head -1``) is still ignored, as argparse does."""

    def _print_message(self, message: str, file: Any = None) -> None:
        if message:
            try:
                (file if file is not None else sys.stderr).write(message)
            except BrokenPipeError:
                pass


def build_parser():
    parser = _Parser(prog="python -m cembed",
                                     description="cembed: fast CPU embedding tables for NumPy.")
    import cembed

    parser.add_argument("--version", action="version", version=f"cembed {cembed.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,config}")

    t = sub.add_parser("train", help="train a skip-gram (word2vec) model end to end",
                       description="Train word2vec-style skip-gram embeddings with negative sampling on the CPU. "
                                   "By default on a built-in synthetic corpus with planted topics (no download), "
                                   "reporting same-topic precision@10 of nearest neighbours before and after.")
    data = t.add_argument_group("data")
    data.add_argument("--corpus", metavar="FILE", type=_path, help="train on this UTF-8 text file (one sentence per line) "
                                                       "instead of the synthetic corpus")
    # (defaults filled in by _corpus_flags_problem, which refuses the flags of the other kind of corpus)
    data.add_argument("--min-count", type=_positive_int, default=None, help="--corpus: ignore rarer words (default 5)")
    data.add_argument("--vocab-size", type=_positive_int, default=None,
                      help="synthetic: words in the vocabulary (default 1,000,000)")
    data.add_argument("--topics", type=_positive_int, default=None, help="synthetic: latent topics (default 100)")
    data.add_argument("--tokens", type=_positive_int, default=None,
                      help="synthetic: corpus length in tokens (default 8,000,000)")
    model = t.add_argument_group("model and optimisation")
    model.add_argument("--dim", type=_positive_int, default=64, help="embedding size (default 64)")
    model.add_argument("--window", type=_positive_int, default=5, help="max context distance (default 5)")
    model.add_argument("--negatives", type=_positive_int, default=5, help="negative samples per pair (default 5)")
    model.add_argument("--batch-size", type=_positive_int, default=32768, help="pairs per step (default 32768)")
    model.add_argument("--epochs", type=_positive_int, default=1, help="passes over the corpus (default 1)")
    model.add_argument("--optimizer", choices=["sparseadam", "adagrad", "sgd", "rowwise_adagrad"],
                       default="sparseadam", help="rowwise_adagrad: cembed backend only (torch has none)")
    model.add_argument("--lr", type=_positive_float, default=None,
                       help="learning rate (default: 0.01 SparseAdam, 0.2 Adagrad, 0.05 SGD, 0.1 row-wise Adagrad)")
    model.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                       help="cembed backend: table and optimizer-state dtype; 16-bit tables compute in float32 "
                            "and round every update once (default float32; bfloat16 needs pip install ml_dtypes)")
    model.add_argument("--rounding", choices=["stochastic", "nearest"], default=None,
                       help="--dtype bfloat16/float16: how updates are rounded (default stochastic, reproducible; "
                            "a --resume takes the recorded one)")
    model.add_argument("--state-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                       help="--dtype bfloat16/float16: optimizer-state dtype (default bfloat16: float16 lacks the "
                            "range for Adam's second moments; a --resume takes the recorded one)")
    model.add_argument("--subsample", type=_non_negative_float, default=1e-4,
                       help="frequent-word subsampling threshold, 0 to disable (default 1e-4)")
    run = t.add_argument_group("run")
    run.add_argument("--backend", type=_backends, default=["cembed"], metavar="NAME[,NAME...]",
                     help="cembed (default); torch: the identical model with torch.nn.Embedding(sparse=True) "
                          "and a torch optimizer; gensim: gensim's Word2Vec (sg=1, hs=0) on the same sentences "
                          "with the same dim, window, negatives, --subsample, epochs, seed and threads, its "
                          "own SGD (alpha 0.025 decaying; --optimizer/--lr/--batch-size do not apply), fed "
                          "through a temporary corpus_file; both = cembed,torch; all = cembed,torch,gensim; "
                          "or a comma list, e.g. cembed,gensim. Several backends run one after the other "
                          "and the summary gives the throughput ratios to the first")
    run.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all cores)")
    run.add_argument("--shards", type=_shards, default=0, metavar="S",
                     help="cembed backend: shard both tables over S Ray actors (cembed.distributed; pip install "
                          "\".[ray]\"); bitwise the same training as one process. Without --ray-address Ray "
                          "starts on this machine inside a private network namespace (only loopback; the command "
                          "re-executes itself under unshare, which needs root). 0 (default): no Ray")
    run.add_argument("--ray-address", default=None, metavar="ADDR", type=_path,
                     help="--shards: connect to this running Ray cluster instead of starting one")
    run.add_argument("--seed", type=_seed, default=0, help="seed for data, init and sampling (default 0)")
    run.add_argument("--out", default="cembed_out", metavar="DIR", type=_path,
                     help="where embeddings.npy, vocab.txt and pca.png go (default cembed_out/)")
    run.add_argument("--no-save", action="store_true", help="do not write the embeddings")
    run.add_argument("--no-plot", action="store_true", help="do not write the PCA plot")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    disk = t.add_argument_group("tables on disk")
    disk.add_argument("--table-dir", metavar="DIR", default=None, type=_path,
                      help="keep both tables and the optimizer state on disk in DIR (memory-mapped .npy files: "
                           "tables bigger than RAM train), prefetching each next batch's rows, and write a "
                           "crash-safe checkpoint to DIR/checkpoint at the end (cembed backend only)")
    disk.add_argument("--resume", action="store_true",
                      help="--table-dir: continue from the checkpoint in DIR (same corpus and settings)")
    disk.add_argument("--checkpoint-every", type=_positive_int, default=None, metavar="STEPS",
                      help="--table-dir: also checkpoint every STEPS steps (default: at the end only)")
    disk.add_argument("--no-prefetch", action="store_true",
                      help="--table-dir: do not prefetch the next batch's rows (for measuring what it buys)")
    disk.add_argument("--row-order", choices=("count", "id"), default=None,
                      help="--table-dir: store the rows by corpus count, most frequent word first, so that the "
                           "rows a run touches share pages (count; the default, except for 16-bit tables with "
                           "stochastic rounding) or by word id (id)")

    b = sub.add_parser("bench", help="time every kernel against NumPy and torch",
                       description="One table for every kernel: cembed, NumPy and torch (when importable) "
                                   "medians of interleaved repeats, useful GB/s and the fraction of a "
                                   "streaming copy measured in the same run, and the speedups.")
    b.add_argument("--rows", type=_positive_int, default=1_000_000, help="table rows V (default 1,000,000)")
    b.add_argument("--dim", type=_positive_int, default=128, help="embedding size D (default 128)")
    b.add_argument("--n", type=_positive_int, default=262_144, help="indices per batch N (default 262,144)")
    b.add_argument("--bag-size", type=_positive_int, default=16, help="indices per bag (default 16)")
    b.add_argument("--threads", type=_positive_int, default=None, help="threads (default: all cores)")
    b.add_argument("--repeats", type=_positive_int, default=7, help="interleaved rounds (default 7)")
    b.add_argument("--only", default=None, metavar="KERNEL,...", help="run only these kernels")
    b.add_argument("--no-torch", action="store_true", help="skip torch even when it is installed")
    b.add_argument("--no-numpy", action="store_true", help="skip the NumPy baselines (the slowest part)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")
    b.add_argument("--seed", type=_seed, default=2026, help="seed for the workload (default 2026)")

    sub.add_parser("config", help="print the build configuration (cembed.show_config())")
    return parser


def _fmt_quality(result):
    if result.quality_after is None:
        return ""
    return "   ".join(f"{name} p@10 {result.quality_before[name]:.3f} -> {result.quality_after[name]:.3f}"
                       for name in result.quality_after)


def _fmt_bytes(n):
    """1,234,567,890 -> '1.15 GiB' (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _fmt_loss(result):
    if result.final_loss is not None:
        return f"{result.final_loss:.4f}"
    if result.resumed_words and not result.words:
        return "- (nothing left to train)"
    return "n/a" if result.backend == "gensim" else "- (no training pair)"


def _fmt_memory(result):
    """Table + optimizer state bytes per word (both tables), when the backend reports them."""
    mem = result.memory_per_row
    if not mem:
        return ""
    return f"   memory/word {mem['table']} B table + {mem['state']} B state = {mem['table'] + mem['state']} B"


def _missing_backend(backends):
    """The error message for the first backend whose library cannot be imported, else None."""
    if "torch" in backends:
        try:
            import torch  # noqa: F401
        except ImportError:
            return "--backend torch needs PyTorch (pip install torch)"
    if "gensim" in backends:
        try:
            import gensim.models  # noqa: F401
        except ImportError:
            return "--backend gensim needs gensim (pip install gensim, or pip install \".[bench]\")"
    return None


def run_train(args):
    from . import corpus as corpus_mod
    from . import train as train_mod

    log = print
    # first what the flags ask taken together, then whether this machine has what they need (the same
    # message for a combination that cannot run, with or without the optional libraries installed)
    if args.dtype != "float32" and set(args.backend) != {"cembed"}:
        print(f"error: --dtype {args.dtype} applies to the cembed backend only", file=sys.stderr)
        return 2
    if "torch" in args.backend and args.optimizer == "rowwise_adagrad":
        print("error: --optimizer rowwise_adagrad is cembed's own: the torch backend has no row-wise Adagrad",
              file=sys.stderr)
        return 2
    problem = _corpus_flags_problem(args) or _argument_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    missing = _missing_backend(args.backend)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    if args.dtype != "float32":
        try:
            train_mod.table_dtype(args.dtype)
            try:
                train_mod.table_dtype(args.state_dtype or "bfloat16", "--state-dtype")
            except ImportError:
                if args.state_dtype is not None:
                    raise
                raise ImportError(f"--dtype {args.dtype} keeps its optimizer state in bfloat16 (the default "
                                  f"--state-dtype), which needs {train_mod.BF16_EXTRA}; or give --state-dtype "
                                  "float16 or float32") from None
        except ImportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()
    if args.corpus is not None:
        try:
            corpus = corpus_mod.text_corpus(args.corpus, min_count=args.min_count)
        except corpus_mod.CorpusError as exc:   # (the file a flag names cannot be used: exit 2, as a bad flag)
            print(f"error: --corpus: {exc}", file=sys.stderr)
            return 2
    else:
        if args.topics > args.vocab_size:
            print(f"error: --topics ({args.topics}) cannot exceed --vocab-size ({args.vocab_size})", file=sys.stderr)
            return 2
        corpus = corpus_mod.synthetic_corpus(args.vocab_size, args.topics, args.tokens, seed=args.seed)
    import cembed

    if args.shards > corpus.vocab_size:   # (_argument_problem: --shards comes with the cembed backend)
        print(f"error: --shards ({args.shards}) cannot exceed the vocabulary ({corpus.vocab_size:,} words): every "
              "shard holds at least one row", file=sys.stderr)
        return 2
    # a text corpus's size is known now (a synthetic one's was estimated from the flags before it was made)
    problem = _memory_problem(args, corpus.vocab_size, corpus.n_tokens) if args.corpus is not None else None
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    threads = args.threads or cembed.get_num_threads()
    log(f"corpus  {corpus.description}  ({time.perf_counter() - t0:.1f}s)")
    rounding, state_dtype, row_order = args.rounding, args.state_dtype, args.row_order
    # a run resumes with the row order (and a 16-bit run with the rounding and state dtype) it recorded,
    # unless they are given; what then differs from the checkpoint is refused by the resume, named
    recorded = train_mod.recorded_settings(args.table_dir) if args.resume else {}
    if args.dtype != "float32" and recorded.get("dtype", args.dtype) == args.dtype:
        if rounding is None and recorded.get("rounding") in ("stochastic", "nearest"):
            rounding = recorded["rounding"]
        if state_dtype is None and recorded.get("state_dtype") in ("bfloat16", "float16", "float32"):
            state_dtype = recorded["state_dtype"]
    if row_order is None and isinstance(recorded.get("row_order"), str):
        candidate = "id" if recorded["row_order"] == "id" else "count"
        stochastic = args.dtype != "float32" and (rounding or "stochastic") == "stochastic"
        if not (candidate == "count" and stochastic):   # (a combination the run could not use)
            row_order = candidate
    config = train_mod.TrainConfig(dim=args.dim, window=args.window, negatives=args.negatives,
                                   batch_size=args.batch_size, epochs=args.epochs, optimizer=args.optimizer,
                                   lr=args.lr, subsample=args.subsample, seed=args.seed, threads=args.threads,
                                   dtype=args.dtype, rounding=rounding or "stochastic", state_dtype=state_dtype,
                                   table_dir=args.table_dir, resume=args.resume, prefetch=not args.no_prefetch,
                                   checkpoint_every=args.checkpoint_every or 0, shards=args.shards,
                                   row_order=row_order)
    if args.table_dir is not None:
        try:
            train_mod.table_row_order(config)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    # fail before training, not after it, when the results cannot be written (checked, not made: a run
    # refused or failed before its results are written leaves no new directory behind)
    written = (("embeddings.npy", "vocab.txt") if not args.no_save else ()) + \
        (("pca.png",) if not args.no_plot and corpus.topics is not None else ())
    if written:
        problem = _output_dir_problem(args.out, written)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    ray = _start_ray(args, threads, log) if args.shards else None
    try:
        return _train_and_report(args, corpus, config, threads, log, train_mod)
    finally:
        if ray is not None:
            ray.shutdown()


def _start_ray(args, threads, log):
    """--shards: Ray for this process, connected to --ray-address or started here (in the private
    network namespace main() put the process in); returns it, to be shut down after training, or
    None when Ray was already running in this process (whoever started it stops it)."""
    import cembed.distributed as dist

    running = sys.modules.get("ray")
    if running is not None and running.is_initialized():
        log(f"ray     already running in this process: {args.shards} shards per table")
        return None
    if args.ray_address:
        ray = dist.connect(args.ray_address)
        log(f"ray     connected to {args.ray_address}: {args.shards} shards per table")
    else:
        ray = dist.init_local(num_cpus=threads)
        log(f"ray     started locally (network namespace with only loopback): {args.shards} shards per table")
    return ray


def _train_and_report(args, corpus, config, threads, log, train_mod):
    from cembed.checkpoint import CheckpointError

    log(f"model   skip-gram, negative sampling: dim {config.dim}, window {config.window}, "
        f"{config.negatives} negatives, batch {config.batch_size} pairs, {config.epochs} epoch(s), "
        f"{config.optimizer} lr {config.learning_rate()}, {threads} thread(s)"
        + (f", {config.dtype} tables, {config.optimizer_state_dtype()} optimizer state ({config.rounding} rounding)"
           if config.dtype != "float32" else "")
        + (f", both tables on {config.shards} Ray shards each" if config.shards else ""))
    if "gensim" in args.backend:
        options = train_mod.gensim_options(config, threads)
        log(f"gensim  Word2Vec(sg=1, hs=0, vector_size={options['vector_size']}, window={options['window']}, "
            f"negative={options['negative']}, sample={options['sample']:g}, epochs={options['epochs']}, "
            f"min_count=1, seed={options['seed']}, workers={threads}), alpha {options['alpha']} -> "
            f"{options['min_alpha']}, corpus_file input")
    if args.table_dir is not None:
        log(f"disk    tables and {config.optimizer} state in {os.path.abspath(args.table_dir)} (memory-mapped, "
            f"rows by {'corpus count' if train_mod.table_row_order(config) == 'count' else 'word id'}), "
            f"prefetch {'off' if args.no_prefetch else 'on'}"
            + (", resuming from its checkpoint" if args.resume else ""))
    results = []
    for backend in args.backend:
        config.backend = backend
        try:
            result = train_mod.train(corpus, config, progress=not args.quiet)
        except (train_mod.TableDirError, CheckpointError, OSError) as exc:   # ResumeError too
            print(f"error: {exc}", file=sys.stderr)
            return 1
        results.append(result)
        prep = (f"  (+{result.prep_seconds:.1f}s corpus file and vocabulary, not counted)"
                if result.prep_seconds else "")
        resumed = ""
        if result.resumed_words:   # (p@10 "before": the checkpoint's table)
            resumed = (f"  (resumed after {result.resumed_words:,} words"
                       + (": the checkpoint holds the finished run, nothing was left to train)" if not result.words
                          else ")"))
        log(f"{backend:>6}  {result.seconds:.1f}s  {result.words_per_second:,.0f} words/s  "
            f"peak RSS {_fmt_bytes(result.peak_rss)}  loss {_fmt_loss(result)}  {_fmt_quality(result)}"
            f"{_fmt_memory(result)}{prep}{resumed}")
    main = results[0]
    log("")
    log("summary")
    for r in results:
        log(f"  {r.backend:<7} time {r.seconds:7.1f}s   throughput {r.words_per_second:>12,.0f} words/s   "
            f"peak RSS {_fmt_bytes(r.peak_rss)}   {_fmt_quality(r)}{_fmt_memory(r)}")
    for other in results[1:]:
        log(f"  {main.backend} / {other.backend} throughput: "
            f"{main.words_per_second / other.words_per_second:.2f}x")
    if main.quality_after is not None:
        log("  quality: precision@10 = share of a word's 10 nearest neighbours (cosine) from its own planted topic,")
        for name, size in main.eval_sizes.items():
            what = "most frequent words" if name == "frequent" else "words seen 10-100 times"
            log(f"           {name}: among the {size} {what}; chance level {main.chance[name]:.3f}")
    elif corpus.vocab_size >= 2:
        ranked = train_mod.evaluation_words(corpus, 50)
        skip = min(10, len(ranked) // 2)  # past the most frequent (function) words
        queries = ranked[skip:skip + 5]
        for word, nbrs in train_mod.nearest_words(main.table, corpus, queries,
                                                  k=min(5, corpus.vocab_size - 1)).items():
            log(f"  nearest to {word!r}: {', '.join(nbrs)}")
    if not _all_finite(main.table):
        on_disk = getattr(args, "table_dir", None)
        where = (f"the embeddings were not saved, but the checkpoint in {on_disk} holds the diverged tables (a "
                 "--resume would go on from them): start over" if on_disk else "nothing was saved")
        print(f"error: training diverged: the {main.backend} table holds NaN or infinite values (loss "
              f"{_fmt_loss(main)}); {where} — try a lower --lr", file=sys.stderr)
        return 1
    try:
        if not args.no_save:
            emb_path, vocab_path = train_mod.save_embeddings(args.out, main.table, corpus)
            log(f"  saved   {emb_path} ({main.table.shape[0]:,} x {main.table.shape[1]} float32), {vocab_path}")
        if not args.no_plot and corpus.topics is not None:
            path = train_mod.pca_plot(args.out, main.table, corpus)
            log(f"  plot    {path}" if path else "  plot    skipped (pip install matplotlib, or '.[demo]')" if path is None
                else "  plot    skipped (nothing to project in 2-D)")
    except OSError as exc:
        print(f"error: cannot write to {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def _all_finite(table):
    """Whether every value of ``table`` is finite (row blocks: a table on disk is not read whole)."""
    import numpy as np

    from .train import row_blocks

    return all(np.isfinite(rows).all() for _, rows in row_blocks(table))


NETNS_MARK = "CEMBED_IN_PRIVATE_NETNS"


def _network_namespace_relaunch(argv):
    """``train --shards S`` starting Ray here: Ray contacts outside addresses when it starts, so it
    may run only in a network namespace that has nothing but loopback. Already in one: None (go
    on). Else run this same command again inside a fresh one (``unshare --net --pid ...``, as root)
    and return its exit code; or an error (exit code 2) saying why that is impossible."""
    from cembed.distributed import network_interfaces, only_loopback

    if only_loopback():
        return None
    if os.environ.get(NETNS_MARK):
        print(f"error: expected a private network namespace, but interfaces {network_interfaces()} are visible",
              file=sys.stderr)
        return 2
    import shutil
    import subprocess

    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    geteuid = getattr(os, "geteuid", None)
    if missing or geteuid is None or geteuid() != 0:
        why = f"{', '.join(missing)} not found" if missing else "it needs root (unshare --net)"
        print("error: --shards starts Ray on this machine, and Ray contacts outside addresses when it starts, so "
              "cembed runs it only inside a private network namespace that has nothing but loopback; creating "
              f"one is not possible here ({why}). Run the command as root, or inside such a namespace yourself "
              "(unshare --net --pid --fork --kill-child --mount-proc -- bash -c 'ip link set lo up && ...'), or "
              "connect to an existing cluster with --ray-address.", file=sys.stderr)
        return 2
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env[NETNS_MARK] = "1"
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--",
               "bash", "-c", 'ip link set lo up && exec "$@"', "cembed-netns",
               sys.executable, "-m", "cembed", *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call(command, env=env)


#: Set either of these and the trainer keeps the OpenMP waiting you chose.
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def _relaunch_with_passive_openmp_waiting():
    """``train`` as the process entry point: run this same command again (``exec``, same process id)
    with ``OMP_WAIT_POLICY=passive`` unless it or ``GOMP_SPINCOUNT`` is set. OpenMP reads them once,
    when the kernels load (at ``import cembed``, before any argument is parsed), so this is the only
    way to choose. By default an idle OpenMP worker spins for milliseconds after every parallel region;
    a training step runs several regions with NumPy and Python work between them, so the workers spin
    almost all the time, and on a shared host they lose their turn to the scheduler when a region needs
    them (docs/performance.md: 2.5x the wall time and CPU time on a loaded host). Waiting passively costs
    a wake-up of a few microseconds per region. POSIX only; never from ``main(argv)`` inside another
    program."""
    if os.name != "posix" or any(name in os.environ for name in OPENMP_WAIT_VARIABLES):
        return
    command = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, dict(os.environ, OMP_WAIT_POLICY="passive"))


#: bytes per token of a pass over a chunk of the corpus, per unit of window (the slot table, the
#: permuted pairs and their centres: 3 int32 arrays of 2·window entries per token)
_PAIR_BYTES_PER_WINDOW = 24


def _physical_memory():
    """Bytes of RAM of this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return None


def _gib(n_bytes):
    return f"{n_bytes / 2 ** 30:,.1f} GiB"


#: The flags of each kind of corpus, with their defaults.
SYNTHETIC_DEFAULTS = {"vocab_size": 1_000_000, "topics": 100, "tokens": 8_000_000}
TEXT_DEFAULTS = {"min_count": 5}


def _corpus_flags_problem(args):
    """What is wrong when flags of the other kind of corpus are given (they would be ignored: a
    ``--vocab-size`` with ``--corpus``, a ``--min-count`` without), else None after filling in the
    defaults of the flags not given."""
    given, other = (TEXT_DEFAULTS, SYNTHETIC_DEFAULTS) if args.corpus is not None else (SYNTHETIC_DEFAULTS, TEXT_DEFAULTS)
    stray = [f"--{name.replace('_', '-')}" for name in other if getattr(args, name) is not None]
    if stray:
        kind = "the synthetic corpus; --corpus FILE is its own" if args.corpus is not None else "--corpus FILE"
        return f"{', '.join(stray)} {'applies' if len(stray) == 1 else 'apply'} to {kind}"
    for name, default in {**given, **other}.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return None


def _argument_problem(args):
    """What is wrong with train's arguments taken together (before any data is made), or None."""
    from .train import BatchStream

    if args.state_dtype is not None and args.dtype == "float32":
        return "--state-dtype applies to 16-bit tables (--dtype bfloat16 or float16); float32 tables keep float32 state"
    if args.rounding is not None and args.dtype == "float32":
        return "--rounding applies to 16-bit tables (--dtype bfloat16 or float16); float32 updates are not rounded"
    if args.window > BatchStream.MAX_WINDOW:   # (each token's drawn window is kept in one byte)
        return f"--window must be at most {BatchStream.MAX_WINDOW}, got {args.window}"
    problem = _threads_problem(args.threads)
    if problem:
        return problem
    if args.table_dir is None and (args.resume or args.checkpoint_every or args.no_prefetch or args.row_order):
        return "--resume, --checkpoint-every, --no-prefetch and --row-order need --table-dir"
    if args.table_dir is not None and args.shards:
        return "--table-dir keeps the tables in this process; --shards puts them on Ray actors"
    if args.table_dir is not None and args.backend != ["cembed"]:
        return "--table-dir keeps cembed's tables on disk: use it with --backend cembed"
    if args.table_dir is not None:
        problem = _output_dir_problem(args.table_dir, (), flag="--table-dir", what="table directory")
        if problem:
            return problem
        for path in (args.table_dir, *(os.path.join(args.table_dir, d) for d in ("tables", "state", "checkpoint"))):
            if os.path.lexists(path) and not os.path.isdir(path):
                return f"--table-dir: {path} exists and is not a directory"
        for name in ("in.npy", "out.npy"):   # (a table file through a symbolic link is fine)
            path = os.path.join(args.table_dir, "tables", name)
            if os.path.exists(path) and not os.path.isfile(path):   # (through a link: what it points to)
                what = "a directory" if os.path.isdir(path) else "not a regular file (a FIFO or a device)"
                link = f" (a symbolic link to {os.path.realpath(path)})" if os.path.islink(path) else ""
                return f"--table-dir: {path}{link} is {what}, not a table file"
    if "gensim" in args.backend and args.seed >= 2 ** 32:
        return f"--seed {args.seed}: gensim takes seeds below 2**32"
    if args.ray_address is not None and not args.shards:
        return "--ray-address applies to --shards S (the tables sharded over a Ray cluster)"
    if args.shards and "cembed" not in args.backend:
        return "--shards shards cembed's tables: use it with the cembed backend"
    if args.corpus is None:
        return _memory_problem(args, args.vocab_size, args.tokens)
    return None


def _threads_problem(threads):
    """None, or why ``--threads`` cannot be used (cembed's own rule for a thread count; nothing kept)."""
    import cembed

    if threads is None:
        return None
    previous = cembed.set_num_threads(None)
    try:
        cembed.set_num_threads(threads)
    except ValueError as exc:
        return f"--threads: {exc}"
    finally:
        cembed.set_num_threads(previous)
    return None


def _memory_problem(args, vocab_size, n_tokens):
    """None, or why a run of this size cannot fit in this machine's RAM (a rough lower bound of what
    it allocates: the corpus, the two tables and their optimizer state unless they are on disk, a pass
    over a chunk of the corpus, one step's arrays). A request for terabytes is refused up front
    instead of failing deep inside NumPy."""
    ram = _physical_memory()
    if ram is None:
        return None
    table_bytes = 2 if args.dtype != "float32" else 4
    state_per_element = {"sparseadam": 2, "adagrad": 1}.get(args.optimizer, 0)
    state_bytes = (2 if args.dtype != "float32" and (args.state_dtype or "bfloat16") != "float32" else 4)
    in_ram = 2 * vocab_size * args.dim * (table_bytes + state_per_element * state_bytes)
    if args.table_dir is not None or args.shards:
        in_ram = 0
    chunk = min(n_tokens, 1 << 19)
    pairs = _PAIR_BYTES_PER_WINDOW * args.window * chunk
    batch = min(args.batch_size, 2 * args.window * chunk)   # (a batch holds at most a chunk's pairs)
    step = batch * (1 + args.negatives) * (8 + 4 * args.dim) + 4 * batch * args.dim * 3
    corpus = 16 * n_tokens + 40 * vocab_size   # tokens, sentence ids; counts, sampling tables per word
    need = corpus + in_ram + pairs + step
    if need > ram:
        hint = (" (--table-dir keeps the tables and their state on disk)" if in_ram >= max(corpus, pairs + step)
                else "")
        return (f"this run needs at least {_gib(need)} of memory (tables and optimizer state "
                f"{_gib(in_ram)}, corpus {_gib(corpus)}, batches {_gib(pairs + step)}); this machine has "
                f"{_gib(ram)}" + hint)
    return None


#: The files a run writes into --out (train.save_embeddings, train.pca_plot).
OUTPUT_FILES = ("embeddings.npy", "vocab.txt", "pca.png")


def _output_dir_problem(path, names=OUTPUT_FILES, flag="--out", what="output directory"):
    """None when ``path`` is a writable directory or could be made one (its nearest existing ancestor
    is a directory a file can be made in: tried with a temporary file, removed at once — /proc says
    it is writable and is not) where none of the files ``names`` the run will write is there as
    something else than a regular file (a directory, a FIFO, a device — also through a link),
    else what is wrong with it (``flag`` and ``what`` name it: ``--out``, ``--table-dir``). Nothing is
    left behind: the directory is made when the run writes into it, so a run refused or failed before
    that leaves none."""
    import tempfile

    if os.path.lexists(path):
        if not os.path.isdir(path):
            return f"{flag} {path} exists and is not a directory"
        from cembed import storage

        for name in names:   # (through a symbolic link: what it points to; storage's one rule)
            try:
                storage.written_path(os.path.join(path, name), f"the run writes its {name} there")
            except ValueError as exc:
                return f"{flag} {path}: {exc}"
        where, problem = path, f"the {what} {flag} {path} is not writable"
    else:
        ancestor = os.path.dirname(os.path.abspath(path))
        while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
        if not os.path.isdir(ancestor):
            return f"cannot create the {what} {flag} {path}: {ancestor} is not a directory"
        where, problem = ancestor, f"cannot create the {what} {flag} {path}: {ancestor} is not writable"
    try:
        with tempfile.TemporaryFile(dir=where, prefix=".cembed-probe-"):
            pass
    except OSError as exc:
        return f"{problem} ({exc.strerror or exc})"
    return None


def run_bench(args):
    from . import bench

    problem = _threads_problem(args.threads)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    ram = _physical_memory()
    # a lower bound: every kernel needs the float32 table and at least its looked-up rows and their
    # gradient (most keep more: copies for the contenders, optimizer state)
    need = 4 * args.dim * (args.rows + 2 * args.n)
    if ram is not None and need > ram:
        print(f"error: --rows {args.rows:,} × --dim {args.dim:,} with --n {args.n:,} needs at least {_gib(need)} of "
              f"memory; this machine has {_gib(ram)}", file=sys.stderr)
        return 2
    return bench.main(args)


def main(argv=None):
    """The process entry point (``python -m cembed``, the ``cembed`` script): returns the exit code.

    As the owner of the process it also tunes the C allocator for training
    (``runtime.reuse_large_allocations``, process-wide and for good), which library calls of
    ``train()`` never do."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit:   # --help, a bad flag: argparse has printed and exits
        if argv is None:
            try:
                sys.stdout.flush()
            except BrokenPipeError:
                _silence_closed_outputs()
            except OSError as exc:
                if exc.errno not in _WRITE_FAILURES:
                    raise
                return _unwritable(exc)
        raise
    except OSError as exc:   # --help > /dev/full (the parser's write failed)
        if argv is not None or exc.errno not in _WRITE_FAILURES:
            raise
        return _unwritable(exc)
    if argv is None and args.command == "train":
        _relaunch_with_passive_openmp_waiting()
    terminated = _stop_on_sigterm(argv is None)
    try:
        code = _run(args, argv)
        if argv is None and sys.stdout is not None:
            sys.stdout.flush()   # (buffered output is written here, inside the try, not at exit)
        return code
    except KeyboardInterrupt:
        print("\nterminated" if terminated else "\ninterrupted", file=sys.stderr)
        return 128 + signal.SIGTERM if terminated else 130
    except MemoryError as exc:   # a table or batch the RAM checks let through (they use physical RAM)
        print(f"error: out of memory ({type(exc).__name__}: {exc}); try smaller sizes, or --table-dir for tables "
              "larger than RAM", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # the reader of the output went away (``python -m cembed bench | head``): stop quietly, as a
        # Unix tool does — when this process is cembed's and its output is what broke (a broken
        # connection elsewhere is an error like any other)
        if argv is not None or not _silence_closed_outputs():
            raise
        return 1
    except OSError as exc:
        # a write that failed for want of room or by an I/O error (stdout ``> /dev/full``, a full disk
        # under the output): an error line, not a traceback, when this process is cembed's
        if argv is not None or exc.errno not in _WRITE_FAILURES:
            raise
        return _unwritable(exc)


def _unwritable(exc: OSError) -> int:
    """A write that failed for want of room or by the device, as an error line: exit code 1."""
    _silence_unwritable_stdout()
    where = f" ({exc.filename})" if exc.filename else ""
    print(f"error: cannot write{where}: {exc.strerror}", file=sys.stderr)
    return 1


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it stops as cleanly as after Ctrl-C: every
    ``finally`` and ``except KeyboardInterrupt`` runs (temporary files removed, the batch thread
    stopped), then the exit code is 128 + SIGTERM."""


def _stop_on_sigterm(own_process: bool) -> List[bool]:
    """As the owner of the process (``main()`` run as ``python -m cembed``, in the main thread), turn
    SIGTERM into :class:`_Terminated`; returns a list that holds True once it happened (false-y till then)."""
    happened: List[bool] = []
    if not own_process or threading.current_thread() is not threading.main_thread():
        return happened

    def stop(signum: int, frame: Any) -> None:
        happened.append(True)
        raise _Terminated()

    signal.signal(signal.SIGTERM, stop)
    return happened


def _run(args, argv):
    if args.command == "train" and args.shards and not args.ray_address:
        relaunch = _network_namespace_relaunch(sys.argv[1:] if argv is None else list(argv))
        if relaunch is not None:
            return relaunch
    if args.command == "train":
        reuse_large_allocations()   # both backends alike: ~50 MB per-step temporaries stay in the heap
        return run_train(args)
    if args.command == "bench":
        return run_bench(args)
    import cembed

    cembed.show_config()
    return 0


#: The errors of a write that failed for want of room or by the device (not a bug of the program).
_WRITE_FAILURES = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


def _silence_unwritable_stdout():
    """Point stdout at /dev/null when it cannot take what is buffered for it, so that nothing more
    fails at exit."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
        return
    except OSError:
        pass
    try:
        _point_at_devnull(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def _point_at_devnull(fd: int) -> None:
    """Make the descriptor ``fd`` write to /dev/null (what is still buffered for it goes nowhere)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _silence_closed_outputs():
    """Point stdout / stderr whose reader has gone (a pipe's read end closed) at /dev/null, so that
    what is still buffered for them, written at exit, goes nowhere; True if either had."""
    import select

    closed = []
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poller = select.poll()
            poller.register(fd, select.POLLOUT)
            if any(event & select.POLLERR for _, event in poller.poll(0)):   # a pipe without a reader
                closed.append(fd)
        except (AttributeError, OSError, ValueError):
            continue
    for fd in closed:
        _point_at_devnull(fd)
    return bool(closed)


if __name__ == "__main__":
    sys.exit(main())
