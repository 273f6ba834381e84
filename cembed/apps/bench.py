"""`python -m cembed bench`: every kernel timed against NumPy and torch (when importable).

Contenders run interleaved (cembed, NumPy, torch, cembed, ...) on the same data in the same process;
each figure is the median of the rounds. Useful GB/s follows the byte model of docs/performance.md (bytes that must
move), and is also given as a fraction of a streaming copy (``numpy.copyto`` of a gather-output-sized
array) measured in the same run.
"""
import json
import platform
import sys
import time
import types
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import cembed
from cembed import functional as F
from cembed import optim
from cembed.storage import aligned_copy, aligned_zeros

from . import baselines as B
from .runtime import openmp_enabled, thread_settings

# a contender: (the timed call, whose result is discarded; an untimed setup run before it, or None)
Contender = Tuple[Callable[[], object], Optional[Callable[[], object]]]

KERNELS = ["gather", "renorm", "dense_backward", "sparse_backward", "sgd", "adagrad", "sparse_adam",
           "train_step", "fused_train_step", "fused_train_step_bf16", "fused_train_step_bf16_act", "bag_sum",
           "bag_mean", "bag_max", "bag_mean_fwd_bwd", "bf16_gather", "bf16_gather_out", "bf16_bag_sum"]
# the bfloat16 rows (a bfloat16 copy of the table; skipped without ml_dtypes): "cembed" is the bfloat16
# table, "cembed_f32" the float32 one in the same rounds, and "vs f32" the speedup of bfloat16 over it
# (fused_train_step_bf16: the fused SparseAdam step with bfloat16 state, built with the training steps;
# fused_train_step_bf16_act: the same with the lookup returned in bfloat16 and a bfloat16 gradient)
HALF_KERNELS = ("bf16_gather", "bf16_gather_out", "bf16_bag_sum")


class _Table:
    def __init__(self, weight):
        self.weight = weight
        self.grad = None


def _median_ms(times):
    return float(np.median(times) * 1e3) if times else None


def _time_interleaved(contenders, repeats):
    """contenders: {name: (fn, setup or None)}; returns {name: [seconds...]}."""
    times: Dict[str, List[float]] = {name: [] for name in contenders}
    for name, (fn, setup) in contenders.items():  # warm-up (and first-touch of lazily allocated state)
        if setup:
            setup()
        fn()
    for _ in range(repeats):
        for name, (fn, setup) in contenders.items():
            if setup:
                setup()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


class Workload:
    def __init__(self, rows, dim, n, bag_size, seed):
        rng = np.random.default_rng(seed)
        self.rows, self.dim, self.n = rows, dim, n
        # tables in page-aligned memory, for every contender: as cembed's modules and torch's allocator
        # (64-byte aligned) give them; NumPy's own arrays start 16 bytes past a line (docs/performance.md)
        self.weight = rng.standard_normal((rows, dim), dtype=np.float32, out=aligned_zeros((rows, dim)))
        self.indices = ((rng.zipf(1.1, n) - 1) % rows).astype(np.int64)
        self.grad_output = rng.standard_normal((n, dim), dtype=np.float32)
        self.unique = np.unique(self.indices)
        self.bag_size = bag_size
        self.offsets = np.arange(0, n, bag_size, dtype=np.int64)
        self.sparse_grad = F.embedding_backward(self.grad_output, self.indices, rows, sparse=True)


def build(kernel, wl, torch, use_numpy):
    """(contenders {name: (fn, setup)}, useful bytes per call) for one kernel."""
    w, idx, g, dim, n, rows = wl.weight, wl.indices, wl.grad_output, wl.dim, wl.n, wl.rows
    u = wl.unique.size
    c: Dict[str, Contender] = {}
    tw = ti = tg = None
    if torch is not None:
        tw, ti, tg = torch.from_numpy(w), torch.from_numpy(idx), torch.from_numpy(g)

    if kernel == "gather":
        c["cembed"] = (lambda: F.embedding(idx, w), None)
        if use_numpy:
            c["numpy"] = (lambda: B.gather(w, idx), None)
        if torch is not None:
            c["torch"] = (lambda: torch.nn.functional.embedding(ti, tw), None)
        return c, 8 * dim * n

    if kernel == "renorm":
        saved = w[wl.unique].copy()
        tables = {}

        def contender(name, fn):
            table = aligned_copy(w)
            tables[name] = table

            def restore():
                table[wl.unique] = saved
            c[name] = (lambda: fn(table), restore)

        contender("cembed", lambda t: F.embedding_renorm_(t, idx, 1.0))
        if use_numpy:
            contender("numpy", lambda t: B.renorm_(t, idx, 1.0))
        if torch is not None:
            def torch_renorm(t, _cache={}):
                tt = _cache.setdefault(id(t), torch.from_numpy(t))
                with torch.no_grad():
                    torch.embedding_renorm_(tt, ti, 1.0, 2.0)
            contender("torch", torch_renorm)
        return c, 8 * dim * u

    if kernel == "dense_backward":
        c["cembed"] = (lambda: F.embedding_backward(g, idx, rows), None)
        if use_numpy:
            c["numpy"] = (lambda: B.dense_grad(g, idx, rows), None)
        if torch is not None:
            c["torch"] = (lambda: torch.ops.aten.embedding_dense_backward(tg, ti, rows, -1, False), None)
        return c, 4 * dim * n + 4 * dim * rows

    if kernel == "sparse_backward":
        c["cembed"] = (lambda: F.embedding_backward(g, idx, rows, sparse=True), None)
        if use_numpy:
            c["numpy"] = (lambda: B.coalesce(idx, g), None)
        if torch is not None:
            assert ti is not None  # the torch tensors are made whenever torch is given
            c["torch"] = (lambda: torch.sparse_coo_tensor(ti[None], tg, (rows, dim),
                                                          check_invariants=False).coalesce(), None)
        return c, 4 * dim * n + 4 * dim * u

    if kernel in ("sgd", "adagrad", "sparse_adam"):
        lr = {"sgd": 0.1, "adagrad": 1e-2, "sparse_adam": 1e-3}[kernel]       # the same for every contender
        name = {"sgd": "SGD", "adagrad": "Adagrad", "sparse_adam": "SparseAdam"}[kernel]
        table = _Table(aligned_copy(w))
        table.grad = wl.sparse_grad
        opt = getattr(optim, name)([table], lr=lr)
        c["cembed"] = (opt.step, None)
        if use_numpy:
            nw, sg = aligned_copy(w), wl.sparse_grad
            state: Dict[str, Any] = {}   # the NumPy baseline's optimizer state, kept between steps
            c["numpy"] = (lambda: B.optimizer_step(kernel, nw, state, sg.indices, sg.values, lr=lr), None)
        if torch is not None:
            assert ti is not None  # the torch tensors are made whenever torch is given
            param = torch.nn.Parameter(torch.from_numpy(aligned_copy(w)))
            param.grad = torch.sparse_coo_tensor(ti[None], tg, (rows, dim), check_invariants=False)
            topt = getattr(torch.optim, name)([param], lr=lr)
            c["torch"] = (topt.step, None)
        return c, {"sgd": 12, "adagrad": 20, "sparse_adam": 28}[kernel] * dim * u

    if kernel == "train_step":
        emb = cembed.Embedding.from_pretrained(aligned_copy(w), freeze=False, sparse=True)
        opt = optim.SparseAdam([emb], lr=1e-3)

        def cembed_step():
            emb(idx)
            emb.backward(g)
            opt.step()
            opt.zero_grad()
        c["cembed"] = (cembed_step, None)
        if use_numpy:
            nw, state = aligned_copy(w), {}
            c["numpy"] = (lambda: B.train_step(nw, state, idx, g, lr=1e-3), None)
        if torch is not None:
            temb = torch.nn.Embedding.from_pretrained(torch.from_numpy(aligned_copy(w)), freeze=False, sparse=True)
            topt = torch.optim.SparseAdam(temb.parameters(), lr=1e-3)

            def torch_step():
                temb(ti).backward(tg)
                topt.step()
                topt.zero_grad()
            c["torch"] = (torch_step, None)
        return c, 8 * dim * n + 4 * dim * n + 4 * dim * u + 28 * dim * u

    if kernel == "fused_train_step":
        # forward + fused backward/SparseAdam, against the unfused cembed step and torch's step
        c, nbytes = build("train_step", wl, torch, use_numpy)
        c["cembed_unfused"] = c.pop("cembed")
        emb = cembed.Embedding.from_pretrained(aligned_copy(w), freeze=False, sparse=True)
        opt = optim.SparseAdam([emb], lr=1e-3)

        def fused_step():
            emb(idx)
            emb.backward(g, optimizer=opt)
        c["cembed"] = (fused_step, None)
        return c, nbytes

    if kernel in ("fused_train_step_bf16", "fused_train_step_bf16_act"):
        # the fused SparseAdam step on a bfloat16 table with bfloat16 state (stochastic rounding), against
        # the same fused step on float32 (same data, same run); _act: the lookup returned in bfloat16 and
        # the gradient rows given in bfloat16 (the same values, rounded once) — 16-bit activations
        try:
            import ml_dtypes
        except ImportError:
            return {}, 0   # skipped: needs ml_dtypes
        act = kernel.endswith("_act")
        bf16 = np.dtype(ml_dtypes.bfloat16)
        grads = {"cembed": g.astype(bf16) if act else g, "cembed_f32": g}
        out_dtypes = {"cembed": bf16 if act else None, "cembed_f32": None}
        trained: Dict[str, Any] = {}   # name -> (module, optimizer)
        for name, dtype, state_dtype in (("cembed", np.dtype(ml_dtypes.bfloat16), "bfloat16"),
                                         ("cembed_f32", np.dtype(np.float32), None)):
            emb = cembed.Embedding.from_pretrained(aligned_copy(w, dtype), freeze=False, sparse=True)
            trained[name] = (emb, optim.SparseAdam([emb], lr=1e-3, state_dtype=state_dtype))

        def fused(name):
            emb, opt = trained[name]
            grad, out_dtype = grads[name], out_dtypes[name]

            def step():
                emb(idx, out_dtype=out_dtype)
                emb.backward(grad, optimizer=opt)
            return step
        c["cembed"] = (fused("cembed"), None)
        c["cembed_f32"] = (fused("cembed_f32"), None)
        # gather (read 2, write 4 or 2 bytes), gradient rows read (4 or 2), table + exp_avg + exp_avg_sq read and
        # written (12)
        return c, (4 if act else 6) * dim * n + (2 if act else 4) * dim * n + 12 * dim * u

    off = wl.offsets
    n_bags = off.size
    if kernel in ("bag_sum", "bag_mean", "bag_max"):
        mode = kernel[4:]
        c["cembed"] = (lambda: F.embedding_bag(idx, w, off, mode=mode), None)
        if use_numpy:
            c["numpy"] = (lambda: B.bag(w, idx, off, mode), None)
        if torch is not None:
            to = torch.from_numpy(off)

            def torch_bag():
                with torch.no_grad():
                    return torch.nn.functional.embedding_bag(ti, tw, to, mode=mode)
            c["torch"] = (torch_bag, None)
        return c, 4 * dim * n + 4 * dim * n_bags

    if kernel == "bag_mean_fwd_bwd":
        bag = cembed.EmbeddingBag.from_pretrained(w, freeze=False, mode="mean", sparse=True)
        gb = np.ones((n_bags, dim), np.float32)

        def cembed_fb():
            bag(idx, off)
            bag.backward(gb)
            bag.zero_grad()
        c["cembed"] = (cembed_fb, None)
        if use_numpy:
            c["numpy"] = (lambda: B.bag_mean_fwd_bwd(w, idx, off, gb), None)
        if torch is not None:
            tbag = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(aligned_copy(w)), freeze=False,
                                                         mode="mean", sparse=True)
            to, tgb = torch.from_numpy(off), torch.ones(n_bags, dim)

            def torch_fb():
                tbag(ti, to).backward(tgb)
                grad = tbag.weight.grad.coalesce()
                tbag.weight.grad = None
                return grad
            c["torch"] = (torch_fb, None)
        return c, 4 * dim * n + 4 * dim * n_bags + 4 * dim * u
    if kernel in HALF_KERNELS:
        return _build_half(kernel, wl, torch, c)
    raise ValueError(f"unknown kernel {kernel!r}")


def _bfloat16_table(wl):
    """The workload's table rounded to bfloat16 (made once), or None without ml_dtypes."""
    if not hasattr(wl, "weight_bf16"):
        try:
            import ml_dtypes
        except ImportError:
            wl.weight_bf16 = None
        else:
            wl.weight_bf16 = aligned_copy(wl.weight, ml_dtypes.bfloat16)
    return wl.weight_bf16


def _build_half(kernel, wl, torch, c):
    """The bfloat16 rows: the bfloat16 table against the float32 one (and torch's bfloat16 kernel)."""
    w, idx, dim, n = wl.weight, wl.indices, wl.dim, wl.n
    wb = _bfloat16_table(wl)
    if wb is None:
        return c, 0
    tw = ti = None
    if torch is not None:
        tw, ti = torch.from_numpy(wb.view(np.int16)).view(torch.bfloat16), torch.from_numpy(idx)
    if kernel in ("bf16_gather", "bf16_gather_out"):
        out_dtype = wb.dtype if kernel == "bf16_gather_out" else None
        c["cembed"] = (lambda: F.embedding(idx, wb, out_dtype=out_dtype), None)
        c["cembed_f32"] = (lambda: F.embedding(idx, w), None)
        if torch is not None:
            c["torch"] = (lambda: torch.nn.functional.embedding(ti, tw), None)
        return c, (2 + (2 if out_dtype is not None else 4)) * dim * n
    off = wl.offsets
    c["cembed"] = (lambda: F.embedding_bag(idx, wb, off, mode="sum"), None)
    c["cembed_f32"] = (lambda: F.embedding_bag(idx, w, off, mode="sum"), None)
    if torch is not None:
        to = torch.from_numpy(off)

        def torch_bag():
            with torch.no_grad():
                return torch.nn.functional.embedding_bag(ti, tw, to, mode="sum")
        c["torch"] = (torch_bag, None)
    return c, 2 * dim * n + 4 * dim * off.size


def run(rows=1_000_000, dim=128, n=262_144, bag_size=16, threads=None, repeats=7, only=None, use_torch=True,
        use_numpy=True, seed=2026, log=None):
    """Run the benchmark; returns a dict (config, copy_gbs, results). cembed's and torch's thread
    settings are restored on return."""
    kernels = select_kernels(only)
    torch: Optional[types.ModuleType] = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    with thread_settings(threads, torch):
        return _run(kernels, rows, dim, n, bag_size, repeats, torch, use_numpy, seed, log)


def _run(kernels, rows, dim, n, bag_size, repeats, torch, use_numpy, seed, log):
    wl = Workload(rows, dim, n, bag_size, seed)
    src = np.empty((n, dim), np.float32)
    src.fill(1.0)
    dst = np.empty_like(src)
    copy_times = _time_interleaved({"copy": (lambda: np.copyto(dst, src), None)}, max(repeats, 5))["copy"]
    copy_gbs = 2 * src.nbytes / np.median(copy_times) / 1e9
    results, skipped = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kernel in kernels:
            contenders, nbytes = build(kernel, wl, torch, use_numpy)
            if not contenders:  # a bfloat16 row without ml_dtypes
                skipped.append({"kernel": kernel, "reason": "needs ml_dtypes (pip install ml_dtypes)"})
                if log:
                    log(f"{kernel:<{NAME_WIDTH}}skipped: {skipped[-1]['reason']}")
                continue
            times = _time_interleaved(contenders, repeats)
            row = {"kernel": kernel}
            for name in ("cembed", "numpy", "torch"):
                row[f"{name}_ms"] = _median_ms(times.get(name, []))
            row["cembed_gbs"] = nbytes / (row["cembed_ms"] / 1e3) / 1e9
            row["copy_fraction"] = row["cembed_gbs"] / copy_gbs
            row["cembed_unfused_ms"] = _median_ms(times.get("cembed_unfused", []))
            row["cembed_f32_ms"] = _median_ms(times.get("cembed_f32", []))
            for name in ("numpy", "torch", "cembed_unfused", "cembed_f32"):
                row[f"vs_{name}"] = row[f"{name}_ms"] / row["cembed_ms"] if row[f"{name}_ms"] else None
            results.append(row)
            if log:
                log(_format_row(row))
            del contenders
    config = dict(rows=rows, dim=dim, n=n, bag_size=bag_size, unique_rows=int(wl.unique.size),
                  threads=cembed.get_num_threads(), repeats=repeats, dtype="float32", distribution="zipf(1.1)",
                  openmp=openmp_enabled(), numpy=np.__version__,
                  torch=getattr(torch, "__version__", None), python=platform.python_version(),
                  machine=f"{platform.machine()} {_cpu_name()}")
    return {"config": config, "copy_gbs": copy_gbs, "results": results, "skipped": skipped}


def select_kernels(only):
    """The kernels named in ``only`` ("gather,sgd", None for all); ValueError naming unknown ones."""
    kernels = KERNELS if only is None else [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in kernels if k not in KERNELS]
    if unknown or not kernels:
        raise ValueError(f"unknown kernel(s) {', '.join(unknown) or repr(only)}; choose from {', '.join(KERNELS)}")
    return kernels


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


#: The kernel column: the longest kernel name and two spaces.
NAME_WIDTH = max(len(k) for k in KERNELS) + 2
HEADER = (f"{'kernel':<{NAME_WIDTH}}{'cembed ms':>11}{'numpy ms':>11}{'torch ms':>11}{'GB/s':>8}{'of copy':>9}"
          f"{'vs numpy':>10}{'vs torch':>10}{'vs unfused':>12}{'vs f32':>8}")


def _fmt(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _format_row(row):
    return (f"{row['kernel']:<{NAME_WIDTH}}{_fmt(row['cembed_ms'], '.2f'):>11}{_fmt(row['numpy_ms'], '.2f'):>11}"
            f"{_fmt(row['torch_ms'], '.2f'):>11}{row['cembed_gbs']:>8.1f}{row['copy_fraction']:>9.0%}"
            f"{_fmt(row['vs_numpy'], '.1f', 'x'):>10}{_fmt(row['vs_torch'], '.1f', 'x'):>10}"
            f"{_fmt(row['vs_cembed_unfused'], '.2f', 'x'):>12}{_fmt(row.get('vs_cembed_f32'), '.2f', 'x'):>8}")


def main(args):
    quiet = args.json
    try:
        select_kernels(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not quiet:
        print(f"cembed {cembed.__version__} bench: V={args.rows:,} rows, D={args.dim}, N={args.n:,} Zipf(1.1) "
              f"indices, bags of {args.bag_size}, float32, {args.threads or cembed.get_num_threads()} thread(s), "
              f"median of {args.repeats} interleaved rounds")
        print(HEADER)
    try:
        report = run(rows=args.rows, dim=args.dim, n=args.n, bag_size=args.bag_size, threads=args.threads,
                     repeats=args.repeats, only=args.only, use_torch=not args.no_torch,
                     use_numpy=not args.no_numpy, seed=args.seed, log=None if quiet else print)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if quiet:
        print(json.dumps(report, indent=2))
    else:
        cfg = report["config"]
        print(f"streaming copy (numpy.copyto, {args.n:,} x {args.dim} float32): {report['copy_gbs']:.1f} GB/s; "
              f"{cfg['unique_rows']:,} unique rows; machine: {cfg['machine']}; "
              f"torch {cfg['torch'] or ('skipped (--no-torch)' if args.no_torch else 'not installed')}")
        print("GB/s = bytes that must move (byte model: docs/performance.md) / cembed time; 'of copy' = that as a share of the "
              "streaming copy; 'vs' = speedup of cembed over the baseline (same data, same run); 'vs unfused' = "
              "fused backward + update over backward, step() (same run); 'vs f32' = bf16_* rows: the bfloat16 table "
              "over the float32 one (same run; bf16_gather returns float32, bf16_gather_out bfloat16; "
              "fused_train_step_bf16_act looks up and takes its gradient in bfloat16)")
    return 0
