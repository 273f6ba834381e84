"""Tables bigger than the memory limit: the main job with its tables and Adam state on disk.

    python benchmarks/bench_disk.py                       # 4M x 64: two tables + Adam state = 6 GiB
    python benchmarks/bench_disk.py --vocab 4000000 --tokens 150000 --limit-gib 1 --batch-size 8192 --rounds 2
                                                          # issue 13's measurement (docs/storage.md), ~25 min
    python benchmarks/bench_disk.py --vocab 1000000 --tokens 1000000 --limit-gib 0.25
        # smaller files (1.43 GiB) but not quick: a step's pages (batch 32768) exceed the limit, the
        # disk runs take many minutes; the limit must also exceed the set-up's ~0.4 GiB of memory

Runs ``python -m cembed train`` (synthetic corpus, SparseAdam) four ways on the same corpus and
settings, one after the other in fresh processes:

* ``ram``: everything in memory, no limit (the reference);
* ``disk+prefetch``: ``--table-dir`` (tables and Adam state as memory-mapped files, rows stored by
  corpus count: the trainer's default), under a cgroup memory limit of ``--limit-gib`` (page cache
  included: the kernel has to evict table pages);
* ``disk``: the same without prefetching the next batch's rows (``--no-prefetch``);
* ``disk-id+prefetch``: ``--table-dir --row-order id``, rows stored by word id (the layout before the
  count order; the frequent words' rows are still together, the rare ones one or two per page).

and reports words/s (and the ratio to ``ram``), the process's peak RSS, the cgroup's peak usage and
the bytes the process read from / wrote to the disk (``/proc/<pid>/io``: ``write_bytes`` counts pages
*dirtied*, so a page written back and dirtied again counts again), its major page faults and user /
system CPU time, the device's own read / write totals during the run (``/sys/dev/block``: the whole
disk, other processes included), and the cgroup's mean and peak anonymous memory, page cache, dirty
and under-writeback pages (``memory.stat``, sampled every 0.25 s). Every number covers the whole
process: creating the tables (the input table's 1 GiB is written) and the final checkpoint (5.7 GiB
copied, mostly holes of the sparse state files) are in the byte counts, not in words/s.

Before the runs, a *page model* replays the run's batches (the trainer's corpus and batch stream,
no training) and prints how many rows and 4 KiB pages a step touches and the run's whole working
set of pages: what the page cache would have to hold (``--no-model`` skips it). ``--runs`` picks
runs (e.g. ``--runs disk+prefetch``), ``--rounds`` interleaves repeats (medians reported).

The limit needs a writable
memory cgroup (v2: ``/sys/fs/cgroup`` with the memory controller; v1: ``/sys/fs/cgroup/memory``): as
root on Linux. Without one the disk runs are skipped with a message. This is a script, not a test:
pytest collects nothing here. The files (``--dir``, default ``./cembed-bench-disk``) are removed at
the end unless ``--keep``.
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

CHILD = r"""
import resource, sys
from cembed.apps.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/io") as fh:
    print("IO " + " ".join(line.strip().replace(": ", "=") for line in fh), flush=True)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(f"RUSAGE majflt={ru.ru_majflt} minflt={ru.ru_minflt} utime={ru.ru_utime:.2f} stime={ru.ru_stime:.2f}", flush=True)
sys.exit(rc)
"""


class Cgroup:
    """A child memory cgroup with a limit, or None when none can be made here."""

    def __init__(self, limit_bytes):
        self.path = None
        self.version = None
        self.limit = int(limit_bytes)
        v2 = "/sys/fs/cgroup"
        if os.path.exists(os.path.join(v2, "cgroup.controllers")):
            with open(os.path.join(v2, "cgroup.controllers")) as fh:
                if "memory" in fh.read().split():
                    self._make(os.path.join(v2, f"cembed-bench-{os.getpid()}"), 2)
                    return
        v1 = "/sys/fs/cgroup/memory"
        if os.path.isdir(v1):
            own = ""
            with open("/proc/self/cgroup") as fh:
                for line in fh:
                    _, controllers, where = line.strip().split(":", 2)
                    if "memory" in controllers.split(","):
                        own = where.lstrip("/")
            self._make(os.path.join(v1, own, f"cembed-bench-{os.getpid()}"), 1)

    def _make(self, path, version):
        try:
            os.mkdir(path)
        except OSError as exc:
            self.problem = f"cannot create {path}: {exc.strerror}"
            return
        try:
            if version == 2:
                self._write(os.path.join(path, "memory.max"), self.limit)
                if os.path.exists(os.path.join(path, "memory.swap.max")):
                    self._write(os.path.join(path, "memory.swap.max"), 0)
            else:
                self._write(os.path.join(path, "memory.limit_in_bytes"), self.limit)
        except OSError as exc:
            os.rmdir(path)
            self.problem = f"cannot set the memory limit in {path}: {exc.strerror}"
            return
        self.path, self.version = path, version

    @staticmethod
    def _write(path, value):
        with open(path, "w") as fh:
            fh.write(str(value))

    def enter(self):
        """preexec_fn: move the (forked, not yet exec'd) child into the group."""
        self._write(os.path.join(self.path, "cgroup.procs"), os.getpid())

    def peak(self):
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            with open(os.path.join(self.path, name)) as fh:
                return int(fh.read().split()[0])
        except OSError:
            return None

    def reset_peak(self):
        if self.version == 1:
            try:
                self._write(os.path.join(self.path, "memory.max_usage_in_bytes"), 0)
            except OSError:
                pass

    def failcnt(self):
        if self.version != 1:
            return None
        with open(os.path.join(self.path, "memory.failcnt")) as fh:
            return int(fh.read())

    def remove(self):
        if self.path:
            for _ in range(50):
                try:
                    os.rmdir(self.path)
                    return
                except OSError:
                    time.sleep(0.1)


def gib(n):
    return f"{n / (1 << 30):.2f} GiB" if n is not None else "n/a"


class Sampler:
    """Samples the cgroup's memory.stat while a run goes: peaks of anonymous memory (rss), page cache,
    dirty and under-writeback pages, and the workingset refaults (pages read again after eviction)."""

    KEYS = ("rss", "cache", "dirty", "writeback")

    def __init__(self, cgroup, every=0.25):
        self.cgroup, self.every = cgroup, every
        self.peak = dict.fromkeys(self.KEYS, 0)
        self.sum = dict.fromkeys(self.KEYS, 0)
        self.n = 0
        self.first = self.last = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def read(self):
        try:
            with open(os.path.join(self.cgroup.path, "memory.stat")) as fh:
                return {k: int(v) for k, v in (line.split() for line in fh)}
        except (OSError, ValueError):
            return None

    def _loop(self):
        while not self.stop.wait(self.every):
            stat = self.read()
            if stat is None:
                continue
            self.first = self.first or stat
            self.last = stat
            self.n += 1
            for k in self.KEYS:
                v = stat.get(k, stat.get("file_" + k, 0))
                self.peak[k] = max(self.peak[k], v)
                self.sum[k] += v

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def summary(self):
        if not self.n:
            return {}
        out = {f"peak_{k}": self.peak[k] for k in self.KEYS}
        out.update({f"mean_{k}": self.sum[k] / self.n for k in self.KEYS})
        for k in ("workingset_refault_file", "workingset_refault", "pgmajfault"):
            if k in self.last:
                out[k] = self.last[k] - self.first[k]
        return out


def device_stat(path):
    """(sectors read, sectors written, read I/Os, write I/Os) of the block device holding ``path``, from
    ``/sys/dev/block/M:m/stat`` (the whole device: other processes' I/O is included), or None."""
    st = os.stat(path)
    try:
        with open(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat") as fh:
            f = [int(x) for x in fh.read().split()]
    except (OSError, ValueError):
        return None
    return f[2], f[6], f[0], f[4]


def run(label, args, common, cgroup=None):
    cmd = [sys.executable, "-c", CHILD, "train"] + common + args
    print(f"\n[{label}] {' '.join(['python -m cembed train'] + common + args)}"
          + (f"   (cgroup limit {gib(cgroup.limit)})" if cgroup else ""), flush=True)
    if cgroup:
        cgroup.reset_peak()
    where = os.path.dirname(os.path.abspath(args[args.index("--table-dir") + 1])) if "--table-dir" in args else "."
    dev0 = device_stat(where)
    t0 = time.perf_counter()
    sampler = Sampler(cgroup) if cgroup else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=cgroup.enter if cgroup else None)
    if sampler:
        with sampler:
            out, err = proc.communicate()
    else:
        out, err = proc.communicate()
    wall = time.perf_counter() - t0
    dev1 = device_stat(where)
    if proc.returncode != 0:
        killed = " (killed: out of memory under the limit?)" if proc.returncode == -9 else ""
        print(f"  FAILED with exit code {proc.returncode}{killed}", out[-2000:], err[-3000:], sep="\n")
        return {"label": label, "failed": proc.returncode}
    line = re.search(r"^cembed\s+([\d.]+)s\s+([\d,]+) words/s\s+peak RSS ([\d.]+) (\w+)", out, re.M)
    io = dict(kv.split("=") for kv in re.search(r"^IO (.*)$", out, re.M).group(1).split())
    ru = dict(kv.split("=") for kv in re.search(r"^RUSAGE (.*)$", out, re.M).group(1).split())
    unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[line.group(4)]
    result = {"label": label, "seconds": float(line.group(1)), "wps": float(line.group(2).replace(",", "")),
              "rss": float(line.group(3)) * unit, "read": int(io["read_bytes"]), "written": int(io["write_bytes"]),
              "wall": wall, "cgroup_peak": cgroup.peak() if cgroup else None,
              "failcnt": cgroup.failcnt() if cgroup else None, "majflt": int(ru["majflt"]),
              "cpu": float(ru["utime"]) + float(ru["stime"]), "user": float(ru["utime"]), "sys": float(ru["stime"])}
    print(f"  {result['wps']:>12,.0f} words/s   train {result['seconds']:.1f}s (process {wall:.1f}s: user "
          f"{result['user']:.1f}s, sys {result['sys']:.1f}s)   peak RSS {gib(result['rss'])}   cgroup peak {gib(result['cgroup_peak'])}   "
          f"disk read {gib(result['read'])} written {gib(result['written'])}   major faults {result['majflt']:,}",
          flush=True)
    if dev0 and dev1:
        d = [b - a for a, b in zip(dev0, dev1)]
        result.update(dev_read=d[0] * 512, dev_written=d[1] * 512, dev_read_ios=d[2], dev_write_ios=d[3])
        print(f"  device (whole disk, all processes): read {gib(d[0] * 512)} in {d[2]:,} I/Os, written "
              f"{gib(d[1] * 512)} in {d[3]:,} I/Os", flush=True)
    if sampler and sampler.n:
        st = sampler.summary()
        result.update(st)
        print("  cgroup: " + "   ".join(f"{k} {gib(st[f'mean_{k}'])} (peak {gib(st[f'peak_{k}'])})"
                                       for k in Sampler.KEYS)
              + "".join(f"   {k} {st[k]:,}" for k in ("workingset_refault_file", "workingset_refault")
                        if k in st), flush=True)
    return result


def page_model(args):
    """Replays the run's batches (the trainer's own corpus and batch stream, no training) and counts
    the 4 KiB pages each step touches, for both row orders of the files (by corpus count, the
    default, and by word id): what the disk runs must have in memory per step, and over the whole run
    (the working set the page cache would need to hold to read each page once)."""
    from cembed.apps import corpus as corpus_mod, train as train_mod
    corpus = corpus_mod.synthetic_corpus(args.vocab, 100, args.tokens, seed=0)
    config = train_mod.TrainConfig(dim=args.dim, batch_size=args.batch_size)
    rank = np.empty(corpus.vocab_size, np.int64)
    rank[np.argsort(-corpus.counts.astype(np.int64), kind="stable")] = np.arange(corpus.vocab_size)
    rows_per_page = max(1, 4096 // (args.dim * 4))
    n_pages = corpus.vocab_size // rows_per_page + 1
    orders = {"count": rank, "id": None}
    seen = {name: (np.zeros(n_pages, bool), np.zeros(n_pages, bool)) for name in orders}
    per_step = dict.fromkeys(orders, 0)
    steps = rows = 0
    for centers, targets, _ in train_mod.BatchStream(corpus, config):
        for name, to_row in orders.items():
            c, t = (centers, targets) if to_row is None else (to_row[centers], to_row[targets])
            pin, pout = np.unique(c // rows_per_page), np.unique(t // rows_per_page)
            seen[name][0][pin] = seen[name][1][pout] = True
            per_step[name] += pin.size + pout.size
        rows += np.unique(centers).size + np.unique(targets).size
        steps += 1
    used = int((corpus.counts > 0).sum())
    print(f"page model: {used:,} of {corpus.vocab_size:,} words occur in the corpus; {steps} steps; per step "
          f"{rows / steps:,.0f} distinct rows (both tables)", flush=True)
    for name in orders:
        pages = per_step[name] / steps
        print(f"  rows by {name:<5}: per step {pages:,.0f} pages per table pair, x3 arrays (table + 2 moments) = "
              f"{gib(3 * 4096 * pages)}; whole run: {gib(3 * 4096 * (int(seen[name][0].sum()) + int(seen[name][1].sum())))}"
              " of distinct pages", flush=True)


RUNS = ("ram", "disk+prefetch", "disk", "disk-id+prefetch")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=4_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--tokens", type=int, default=3_000_000)
    p.add_argument("--batch-size", type=int, default=32768)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--limit-gib", type=float, default=1.0)
    p.add_argument("--dir", default="cembed-bench-disk")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the three runs")
    p.add_argument("--skip-ram", action="store_true")
    p.add_argument("--runs", default=",".join(RUNS),
                   help=f"which runs, comma-separated (default: {','.join(RUNS)})")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--no-model", action="store_true", help="skip the page model (replaying the batches)")
    args = p.parse_args(argv)
    runs = set(args.runs.split(","))
    if args.skip_ram:
        runs.discard("ram")
    if runs - set(RUNS):
        p.error(f"--runs: unknown {sorted(runs - set(RUNS))}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # killed: still remove the cgroup and the files

    on_disk = args.vocab * args.dim * 4 * 6     # two tables + Adam's two moments for each
    limit = int(args.limit_gib * (1 << 30))
    print(f"tables + Adam state: {args.vocab:,} x {args.dim} float32, 2 tables + 4 moments = {gib(on_disk)}; "
          f"memory limit {gib(limit)} ({on_disk / limit:.1f}x smaller)")
    usage = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir)) or ".")
    if usage.free < 2.2 * on_disk:
        print(f"not enough disk space in {args.dir}: {gib(usage.free)} free, {gib(2.2 * on_disk)} needed")
        return 1
    common = ["--vocab-size", str(args.vocab), "--tokens", str(args.tokens), "--dim", str(args.dim),
              "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--optimizer", "sparseadam",
              "--no-save", "--no-plot", "--quiet"]
    if not args.no_model:
        page_model(args)
    cgroup = Cgroup(limit)
    if cgroup.path is None:
        print(f"SKIP the limited runs: no writable memory cgroup here ({getattr(cgroup, 'problem', 'none found')})")
    results = []
    try:
        for _ in range(args.rounds):
            if "ram" in runs:
                results.append(run("ram", [], common))
            if cgroup.path is not None:
                table_dir = os.path.abspath(args.dir)
                if "disk+prefetch" in runs:
                    results.append(run("disk+prefetch", ["--table-dir", table_dir], common, cgroup))
                if "disk" in runs:
                    results.append(run("disk", ["--table-dir", table_dir, "--no-prefetch"], common, cgroup))
                if "disk-id+prefetch" in runs:
                    results.append(run("disk-id+prefetch", ["--table-dir", table_dir, "--row-order", "id"], common,
                                       cgroup))
    finally:
        cgroup.remove()
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print("\nsummary (medians over rounds)")
    ram = [r["wps"] for r in results if r["label"] == "ram" and "wps" in r]
    ram_wps = sorted(ram)[len(ram) // 2] if ram else None
    for label in RUNS:
        rows = [r for r in results if r["label"] == label and "wps" in r]
        if not rows:
            continue
        rows.sort(key=lambda r: r["wps"])
        r = rows[len(rows) // 2]
        ratio = f"{r['wps'] / ram_wps:.2f}x ram" if ram_wps else ""
        print(f"  {label:<16} {r['wps']:>12,.0f} words/s  {ratio:>9}   peak RSS {gib(r['rss'])}   cgroup peak "
              f"{gib(r['cgroup_peak'])}   read {gib(r['read'])}   written {gib(r['written'])}   major faults "
              f"{r['majflt']:,}   cpu user {r['user']:.1f}s sys {r['sys']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
