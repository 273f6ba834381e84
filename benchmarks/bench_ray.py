"""Row-sharded tables on Ray (cembed.distributed) against one process, on this machine.

Run inside the private network namespace (Ray must not start anywhere else):

    bash tests/ray/run.sh python benchmarks/bench_ray.py [--rows 1000000] [--dim 64] [--n 65536]

(that imports the installed cembed; ``PYTHONPATH=$PWD bash tests/ray/run.sh ...`` measures an in-place
build of this checkout: the first line printed names the copy measured).

1. Lookup + fused update round trip: ``out = table(idx); table.backward(grad, step=True); table.sync()``
   (the update applied when it returns) with 2 shards — through Ray's compiled graph (the
   default transport), through ordinary actor calls (``compiled_graph=False``), both unpinned
   (``shard_cpus=None``), and through the graph with each shard pinned to its own core
   (``shard_cpus="spread"``, what the default ``"auto"`` picks on one node) — against
   ``out = emb(idx); emb.backward(grad, optimizer=opt)`` in this process; the same 65,536 Zipf(1.1)
   indices, SparseAdam; interleaved turns (alternating order), medians and minima, and the time of
   each of the three calls of the sharded step. The compiled graph's shards busy-wait for their next
   call, so a table's graph is torn down (untimed) while the others run and built again, with two
   untimed warm-up steps (a new graph's first big calls are several times slower), before its own
   turns. Also the payload bytes sent and received per step and
   per shard, and the messages per step; and back-to-back steps without waiting for the update (how
   training runs: the shards apply step t while the client prepares step t + 1).
2. Per-call overhead: the same round trip with 8 indices.
3. The main job: ``train`` of the skip-gram model with ``shards=2`` (compiled graphs, actor calls, and
   compiled graphs with pinned shards)
   against ``shards=0`` (same corpus, config and seed; the final tables are compared bitwise).
Nothing here is a pytest test (the file is only collected when asked for).
"""
import argparse
import os
import statistics
import time

import numpy as np


def zipf_indices(rng, n, n_rows, a=1.1):
    return ((rng.zipf(a, n) - 1) % n_rows).astype(np.int64)


def round_trip_local(emb, opt, idx, grad):
    emb(idx)
    emb.backward(grad, optimizer=opt)


def round_trip_sharded(table, idx, grad):
    """One step, waited for: the update is applied on the shards when it returns."""
    table(idx)
    table.backward(grad, step=True)
    table.sync()


def pipelined(fn, steps):
    """Seconds per step of ``steps`` consecutive calls (the sharded update of one step overlaps the
    next step's lookup when nothing waits for it)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def interleaved(fns, repeats, setups=None, block=1):
    """Median and minimum seconds of each callable, run in turns (``block`` runs at a time) after
    one warm-up each; the order alternates between turns (a, b, b, a, ...) so that neither always
    runs right after the other. ``setups[name]()`` runs, untimed, before each turn of ``name``."""
    setups = setups or {}
    for name, fn in fns.items():
        setups.get(name, lambda: None)()
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    done, turn = 0, 0
    while done < repeats:
        n = min(block, repeats - done)
        for name in (names if turn % 2 == 0 else names[::-1]):
            setups.get(name, lambda: None)()
            for _ in range(n):
                t0 = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - t0)
        done, turn = done + n, turn + 1
    return ({name: statistics.median(ts) for name, ts in times.items()},
            {name: min(ts) for name, ts in times.items()})


def phases(table, idx, grad, repeats):
    """Median ms of the three calls of a waited sharded step."""
    got = {"lookup": [], "backward + send": [], "sync (wait for the update)": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        table(idx)
        t1 = time.perf_counter()
        table.backward(grad, step=True)
        t2 = time.perf_counter()
        table.sync()
        t3 = time.perf_counter()
        for key, dt in zip(got, (t1 - t0, t2 - t1, t3 - t2)):
            got[key].append(dt)
    return {key: statistics.median(v) * 1e3 for key, v in got.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=65_536)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--train-tokens", type=int, default=1_000_000)
    parser.add_argument("--train-vocab", type=int, default=100_000)
    parser.add_argument("--no-train", action="store_true")
    args = parser.parse_args(argv)

    import cembed
    from cembed.distributed import OPTIMIZERS, ShardedEmbedding, init_local, initial_rows

    ray = init_local(num_cpus=2)
    V, D, S = args.rows, args.dim, args.shards
    rng = np.random.default_rng(2026)
    idx = zipf_indices(rng, args.n, V)
    grad = rng.standard_normal((args.n, D), dtype=np.float32) * np.float32(1e-3)
    tiny_idx, tiny_grad = idx[:8].copy(), grad[:8].copy()
    opts = {"lr": 1e-3}
    print(f"cembed: {cembed.__file__}")
    print(f"workload: V={V:,} D={D} float32, batch {args.n:,} Zipf(1.1) indices "
          f"({np.unique(idx).size:,} distinct), SparseAdam, {S} shards, cembed threads here "
          f"{cembed.get_num_threads()}, OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    t0 = time.perf_counter()
    emb = cembed.Embedding.from_pretrained(initial_rows(1, np.arange(V), D), freeze=False, sparse=True)
    opt = OPTIMIZERS["sparseadam"]([emb], **opts)
    # shard_cpus=None: unpinned (the default, "auto", pins shards that share one node: the "pinned" table)
    table = ShardedEmbedding(V, D, S, "sparseadam", opts, seed=1, compiled_graph=True, shard_cpus=None)
    table(np.arange(min(V, 10)))
    calls = ShardedEmbedding(V, D, S, "sparseadam", opts, seed=1, compiled_graph=False, shard_cpus=None)
    calls(np.arange(min(V, 10)))
    pinned = ShardedEmbedding(V, D, S, "sparseadam", opts, seed=1, compiled_graph=True, shard_cpus="spread")
    pinned(np.arange(min(V, 10)))
    print(f"set-up (one table in process + 3 x {S} shards): {time.perf_counter() - t0:.1f} s; transports: "
          f"{table.transport!r} ({table.graph_error or 'compiled'}), {calls.transport!r}; pinned shards' CPUs "
          f"{[i['cpus'] for i in pinned.shard_info()]}")

    sent0, recv0, steps0 = table.bytes_sent, table.bytes_received, table.step_count
    round_trip_sharded(table, idx, grad)
    round_trip_sharded(calls, idx, grad)     # the same steps on every sharded table (compared at the end)
    round_trip_sharded(pinned, idx, grad)
    sent, recv = table.bytes_sent - sent0, table.bytes_received - recv0
    print(f"payload per step ({S} shards): sent {sent / 1e6:.2f} MB (indices + summed gradient rows), "
          f"received {recv / 1e6:.2f} MB (rows); per shard {(sent + recv) / S / 1e6:.2f} MB; "
          f"messages per step: {2 * S} requests + {2 * S} replies")

    # Ray's compiled-graph shards busy-wait for their next call (about half a core each while idle,
    # measured): the graph is torn down while the others run (untimed), built again before its turns
    load0 = os.getloadavg()[0]
    sh, sc, sp = f"{S} shards, compiled graph", f"{S} shards, actor calls", f"{S} shards, graph, pinned"
    graphs = {sh: table, sp: pinned}

    def only_graph(name):
        """Every compiled table's graph down but ``name``'s (built if it is one)."""
        for other, t in graphs.items():
            if other != name:
                t._drop_graph()
        if name in graphs:
            graphs[name]._build_graph()

    def make_setups(i, g):
        """Before a turn: the table's graph up (and two untimed steps: the first big calls through a
        new graph's buffers are several times slower, measured), every other graph down; the
        actor-call table takes the same untimed steps, so that the sharded tables see the same
        steps (compared at the end)."""
        def turn(name, t):
            def setup():
                only_graph(name)
                if t is not None:
                    for _ in range(2):
                        round_trip_sharded(t, i, g)
            return setup

        return {"one process": turn("one process", None), sh: turn(sh, table), sc: turn(sc, calls),
                sp: turn(sp, pinned)}

    big, big_min = interleaved({"one process": lambda: round_trip_local(emb, opt, idx, grad),
                                sh: lambda: round_trip_sharded(table, idx, grad),
                                sc: lambda: round_trip_sharded(calls, idx, grad),
                                sp: lambda: round_trip_sharded(pinned, idx, grad)}, args.repeats,
                               make_setups(idx, grad), block=5)
    tiny, tiny_min = interleaved({"one process": lambda: round_trip_local(emb, opt, tiny_idx, tiny_grad),
                                  sh: lambda: round_trip_sharded(table, tiny_idx, tiny_grad),
                                  sc: lambda: round_trip_sharded(calls, tiny_idx, tiny_grad),
                                  sp: lambda: round_trip_sharded(pinned, tiny_idx, tiny_grad)},
                                 args.repeats * 2, make_setups(tiny_idx, tiny_grad), block=10)
    setups = make_setups(tiny_idx, tiny_grad)
    print(f"lookup + fused update round trip, waited ({args.repeats} rounds in interleaved turns of 5; host load "
          f"average {load0:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; the compiled "
          f"graph, torn down while the others run, each turn after two untimed warm-up steps; batch 8: "
          f"{2 * args.repeats} rounds in turns of 10; 'pinned': shard_cpus='spread'):")
    for name in big:
        print(f"  {name:<24} batch {args.n:,}: median {big[name] * 1e3:7.2f} ms (min {big_min[name] * 1e3:6.2f})"
              f"    batch 8: median {tiny[name] * 1e3:6.2f} ms (min {tiny_min[name] * 1e3:5.2f})")
    for name in (sh, sc, sp):
        print(f"  ratio {name} / one process: median {big[name] / big['one process']:.2f}x, min "
              f"{big_min[name] / big_min['one process']:.2f}x (target <= 2x); per-step overhead (batch 8, "
              f"median): {(tiny[name] - tiny['one process']) * 1e3:.2f} ms for {2 * S} shard calls")
    for name, t in ((sh, table), (sc, calls), (sp, pinned)):
        setups[name]()
        split = phases(t, idx, grad, max(5, args.repeats // 4))
        print(f"  {name} step by call (median): " + ", ".join(f"{k} {v:.2f} ms" for k, v in split.items()))
    only_graph(None)
    weights = [t.state_dict()["weight"].tobytes() for t in (table, calls, pinned)]
    assert weights[0] == weights[1] == weights[2], "the sharded tables trained different tables"
    print("  the tables trained through the two transports (and the pinned one) are bitwise equal")

    def steps(t):
        def step():
            t(idx)
            t.backward(grad, step=True)
        return step

    def run_compiled(name):
        t = graphs[name]
        only_graph(name)
        for _ in range(2):     # untimed: a new graph's first big calls
            round_trip_sharded(t, idx, grad)
        return pipelined(steps(t), 5)

    def run_other(fn):
        only_graph(None)
        return pipelined(fn, 5)

    blocks = {"one process": lambda: run_other(lambda: round_trip_local(emb, opt, idx, grad)),
              sh: lambda: run_compiled(sh), sc: lambda: run_other(steps(calls)), sp: lambda: run_compiled(sp)}
    runs = {name: [] for name in blocks}
    for _ in range(3):
        for name, block in blocks.items():
            runs[name].append(block())
            for t in (table, calls, pinned):
                t.sync()
    steady = {name: statistics.median(v) for name, v in runs.items()}
    print("  back-to-back steps (update not awaited, 3 blocks of 5, median): " + ", ".join(
        f"{name} {v * 1e3:.2f} ms/step ({v / steady['one process']:.2f}x)" for name, v in steady.items()))
    calls.shutdown()
    pinned.shutdown()
    table._build_graph()
    for _ in range(2):         # untimed: a new graph's first big calls
        table(idx)
    t0 = time.perf_counter()
    table(idx)
    t_lookup = time.perf_counter() - t0
    table._drop_graph()
    t0 = time.perf_counter()
    emb(idx)
    t_lookup_local = time.perf_counter() - t0
    print(f"  lookup alone (one run): sharded (compiled graph) {t_lookup * 1e3:.2f} ms, one process {t_lookup_local * 1e3:.2f} ms")
    print(f"  compiled graphs built: {table.graph_builds} (torn down and rebuilt between turns)")
    table.shutdown()
    del emb, opt

    if not args.no_train:
        from cembed.apps import corpus as corpus_mod
        from cembed.apps import train as train_mod

        corpus = corpus_mod.synthetic_corpus(args.train_vocab, 100, args.train_tokens, seed=0)
        import cembed.distributed as dist

        plain_class = dist.ShardedEmbedding

        def actor_calls(*a, **kw):        # the trainer's tables on actor calls (unpinned)
            return plain_class(*a, compiled_graph=False, shard_cpus=None, **kw)

        def unpinned(*a, **kw):           # the trainer's tables through the graph, unpinned
            return plain_class(*a, shard_cpus=None, **kw)

        def spread(*a, **kw):             # the trainer's tables with pinned shards
            return plain_class(*a, shard_cpus="spread", **kw)

        results = {}
        for name in ("0", str(S), f"{S}, actor calls", f"{S}, pinned") * 2:
            config = train_mod.TrainConfig(seed=0, shards=int(name.split(",")[0]))
            dist.ShardedEmbedding = actor_calls if "actor" in name else spread if "pinned" in name else unpinned
            try:
                result = train_mod.train(corpus, config, progress=False)
            finally:
                dist.ShardedEmbedding = plain_class
            results.setdefault(name, []).append(result)
        print(f"main job (skip-gram, {corpus.description}; 2 runs each, interleaved):")
        wps = {name: statistics.median(r.words_per_second for r in rs) for name, rs in results.items()}
        for name, rs in results.items():
            print(f"  --shards {name:<16} {wps[name]:>10,.0f} words/s  (runs: "
                  f"{', '.join(f'{r.words_per_second:,.0f}' for r in rs)}), {wps[name] / wps['0']:.2f}x --shards 0")
        same = all(r.table.tobytes() == results["0"][0].table.tobytes() for rs in results.values() for r in rs)
        print(f"  final input tables bitwise equal: {same}")
    ray.shutdown()


if __name__ == "__main__":
    main()
