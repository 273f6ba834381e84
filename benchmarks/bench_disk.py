"""Tables bigger than the memory limit: the main job with its tables and Adam state on disk.

    python benchmarks/bench_disk.py                       # 4M x 64: two tables + Adam state = 6 GiB
    python benchmarks/bench_disk.py --vocab 1000000 --tokens 1000000 --limit-gib 0.25   # a quick one

Runs ``python -m cembed train`` (synthetic corpus, SparseAdam) three ways on the same corpus and
settings, one after the other in fresh processes:

* ``ram``: everything in memory, no limit (the reference);
* ``disk+prefetch``: ``--table-dir`` (tables and Adam state as memory-mapped files), under a cgroup
  memory limit of ``--limit-gib`` (page cache included: the kernel has to evict table pages);
* ``disk``: the same without prefetching the next batch's rows (``--no-prefetch``).

and reports words/s (and the ratio to ``ram``), the process's peak RSS, the cgroup's peak usage and
the bytes the process read from / wrote to the disk (``/proc/<pid>/io``). The limit needs a writable
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
import time

CHILD = r"""
import sys
from cembed.apps.cli import main
rc = main(sys.argv[1:])
with open("/proc/self/io") as fh:
    print("IO " + " ".join(line.strip().replace(": ", "=") for line in fh), flush=True)
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


def run(label, args, common, cgroup=None):
    cmd = [sys.executable, "-c", CHILD, "train"] + common + args
    print(f"\n[{label}] {' '.join(['python -m cembed train'] + common + args)}"
          + (f"   (cgroup limit {gib(cgroup.limit)})" if cgroup else ""), flush=True)
    if cgroup:
        cgroup.reset_peak()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cgroup.enter if cgroup else None)
    wall = time.perf_counter() - t0
    out = proc.stdout
    if proc.returncode != 0:
        killed = " (killed: out of memory under the limit?)" if proc.returncode == -9 else ""
        print(f"  FAILED with exit code {proc.returncode}{killed}", out[-2000:], proc.stderr[-3000:], sep="\n")
        return {"label": label, "failed": proc.returncode}
    line = re.search(r"^cembed\s+([\d.]+)s\s+([\d,]+) words/s\s+peak RSS ([\d.]+) (\w+)", out, re.M)
    io = dict(kv.split("=") for kv in re.search(r"^IO (.*)$", out, re.M).group(1).split())
    unit = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[line.group(4)]
    result = {"label": label, "seconds": float(line.group(1)), "wps": float(line.group(2).replace(",", "")),
              "rss": float(line.group(3)) * unit, "read": int(io["read_bytes"]), "written": int(io["write_bytes"]),
              "wall": wall, "cgroup_peak": cgroup.peak() if cgroup else None,
              "failcnt": cgroup.failcnt() if cgroup else None}
    print(f"  {result['wps']:>12,.0f} words/s   train {result['seconds']:.1f}s (process {wall:.1f}s)   peak RSS "
          f"{gib(result['rss'])}   cgroup peak {gib(result['cgroup_peak'])}   disk read {gib(result['read'])} "
          f"written {gib(result['written'])}", flush=True)
    return result


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
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
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
    cgroup = Cgroup(limit)
    if cgroup.path is None:
        print(f"SKIP the limited runs: no writable memory cgroup here ({getattr(cgroup, 'problem', 'none found')})")
    results = []
    try:
        for _ in range(args.rounds):
            if not args.skip_ram:
                results.append(run("ram", [], common))
            if cgroup.path is not None:
                table_dir = os.path.abspath(args.dir)
                results.append(run("disk+prefetch", ["--table-dir", table_dir], common, cgroup))
                results.append(run("disk", ["--table-dir", table_dir, "--no-prefetch"], common, cgroup))
    finally:
        cgroup.remove()
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print("\nsummary (medians over rounds)")
    ram = [r["wps"] for r in results if r["label"] == "ram" and "wps" in r]
    ram_wps = sorted(ram)[len(ram) // 2] if ram else None
    for label in ("ram", "disk+prefetch", "disk"):
        rows = [r for r in results if r["label"] == label and "wps" in r]
        if not rows:
            continue
        rows.sort(key=lambda r: r["wps"])
        r = rows[len(rows) // 2]
        ratio = f"{r['wps'] / ram_wps:.2f}x ram" if ram_wps else ""
        print(f"  {label:<14} {r['wps']:>12,.0f} words/s  {ratio:>9}   peak RSS {gib(r['rss'])}   cgroup peak "
              f"{gib(r['cgroup_peak'])}   read {gib(r['read'])}   written {gib(r['written'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
