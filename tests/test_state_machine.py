"""A hypothesis state machine over one small table and its optimizer, against a pure-NumPy shadow.

The machine interleaves forward / backward (with and without explicit indices, plain or grouped ahead by
``functional.group_indices`` before the table changed) / step / zero_grad /
save / load / state_dict round trips / weight replacement (same-shape copy, read-only copy, another
number of rows) / the caller refilling the buffers it passed to forward / hostile SparseGrad
assignments / corrupted state_dicts and files, on Embedding (sparse or dense) and EmbeddingBag
(sum or mean, 2-D input or 1-D input with offsets) with SGD (with or without momentum), SparseAdam or
Adagrad. After every action either

* the action succeeded and the module's output, weight, gradient and optimizer state equal the
  shadow's (rtol 1e-5), the shadow being built from tests/reference.py and torch's update rules, or
* the action was refused cleanly (IndexError / TypeError / ValueError) where the shadow says it must
  be, with weight, gradient and optimizer state bitwise unchanged.

Hostile inputs are bounded (tables of at most 9 rows, ids up to 10**6, nothing allocates by a
caller's number), so a correct implementation cannot crash; the machine runs in-process, so a crash
of a broken one aborts pytest, which is the failure signal.

Decisions where the behaviour is otherwise ambiguous (torch-equivalent where torch has one):

* forward checks ids against the *current* ``weight.shape[0]``; after the weight was replaced by a
  table with another number of rows, ``backward()`` of a forward made before may be refused
  (IndexError / ValueError) or compute the gradient of the current table when all ids fit; ids that
  do not fit must be refused;
* ``step`` refuses (ValueError) when the optimizer state no longer matches the weight (torch fails on
  the size mismatch), when the gradient's shape differs from the weight's and when the weight is
  read-only; a refused step changes nothing (no counter bumped);
* ``load`` / ``load_state_dict`` refuse state whose arrays do not match the current weight, and state
  or hyper-parameters ``step`` could not use (a missing array, a wrong dtype, SGD ``active_rows`` out
  of range / unsorted, a negative SparseAdam step — it would divide by zero —, lr < 0 or NaN, ...);
* a SparseGrad copies the rows it is given and cannot be edited afterwards (editing raises);
* ``save`` with an ``np.float32`` lr may succeed (and ``load`` restores it as that value) or be
  refused; ``save`` of a state that no longer fits the weight (``step`` and ``load`` would refuse it)
  is refused; when refused, the previous file keeps its bytes; no temporary file is ever left behind.
"""
import copy
import math
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import cembed
from cembed import SparseGrad, optim

import reference as ref
from util import fingerprint

REFUSALS = (IndexError, TypeError, ValueError)
RTOL, ATOL = 1e-5, 1e-6
V0, D = 6, 3                      # the table the module is built with
ROW_CHOICES = (4, V0, 9)          # tables it may be replaced with
ID_MAX = 9                        # ids are drawn from [0, ID_MAX]: out of range for every table but one
f32 = np.float32


class Grad:
    """The shadow of ``module.grad``: dense values, plus the set of rows for a sparse gradient."""

    def __init__(self, values, rows=None):
        self.values = values                      # (n_rows, D) float32, zero outside ``rows``
        self.rows = rows                          # sorted int64 row ids, or None for a dense gradient

    @property
    def shape(self):
        return self.values.shape

    def __add__(self, other):
        values = self.values + other.values
        if self.rows is None or other.rows is None:
            return Grad(values)
        return Grad(values, np.union1d(self.rows, other.rows).astype(np.int64))


def sparse_grad(rows, values, n_rows):
    dense = np.zeros((n_rows, D), f32)
    dense[rows] = values
    return Grad(dense, np.asarray(rows, np.int64))


class ShadowOptimizer:
    """torch's update rules in NumPy (reference.py): SGD (dense-equivalent momentum on sparse
    gradients), SparseAdam (lazy rows, one step counter), Adagrad (float32 step counter)."""

    def __init__(self, kind, hp, n_rows):
        self.kind, self.hp = kind, dict(hp)
        self.state = {}
        if kind == "adagrad":
            self.state = {"step": f32(0.0), "sum": np.zeros((n_rows, D), f32)}

    def arrays(self):
        return [v for v in self.state.values() if isinstance(v, np.ndarray) and v.ndim == 2]

    def matches(self, shape):
        return all(a.shape == shape for a in self.arrays())

    def refuses(self, weight_shape, writeable, grad):
        """True when step() must refuse (before changing anything)."""
        if grad is None:
            return False
        if grad.shape != weight_shape or not writeable or not self.matches(weight_shape):
            return True
        return self.kind == "sparseadam" and grad.rows is None

    def step(self, weight, grad):
        if grad is None:
            return
        lr = float(self.hp["lr"])
        rows = np.arange(weight.shape[0]) if grad.rows is None else grad.rows
        if self.kind == "sgd":
            momentum = self.hp["momentum"]
            if momentum == 0:
                weight[rows] = weight[rows] - f32(lr) * grad.values[rows]
                return
            buf = self.state.get("momentum_buffer")
            self.state["momentum_buffer"] = ref.sgd_dense_momentum_step(
                weight, buf, grad.values, f32(lr), f32(momentum), first=buf is None)
        elif self.kind == "sparseadam":
            if "step" not in self.state:
                self.state = {"step": 0, "exp_avg": np.zeros_like(weight), "exp_avg_sq": np.zeros_like(weight)}
            self.state["step"] += 1
            ref.sparse_adam_step(weight, self.state["exp_avg"], self.state["exp_avg_sq"], self.state["step"],
                                 rows, grad.values[rows], lr=lr, betas=self.hp["betas"], eps=self.hp["eps"])
        else:
            self.state["step"] = f32(self.state["step"] + f32(1.0))
            ref.adagrad_step(weight, self.state["sum"], float(self.state["step"]), rows, grad.values[rows], lr=lr,
                             lr_decay=self.hp["lr_decay"], eps=self.hp["eps"])


class TableMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cembed_sm_")
        self.saved = {}          # file name -> (shadow state, shadow hp) written there
        self.caller = []         # the arrays the caller passed to the last successful forward
        self.grouped = None      # (ids, GroupedIndices of them) made by group_ahead, for a later call

    def teardown(self):
        shutil.rmtree(self.dir, ignore_errors=True)
        cembed.set_num_threads(None)

    # ------------------------------------------------------------------ set-up
    @initialize(module=st.sampled_from(["emb", "bag_sum", "bag_mean"]), sparse=st.booleans(),
                which=st.sampled_from(["sgd", "sgd_momentum", "sparseadam", "adagrad"]),
                last_offset=st.booleans(), seed=st.integers(0, 2**16))
    def build(self, module, sparse, which, last_offset, seed):
        self.rng = np.random.default_rng(seed)
        if which == "sparseadam":
            sparse = True
        self.is_bag = module != "emb"
        if self.is_bag:
            self.mode = module[4:]
            self.m = cembed.EmbeddingBag(V0, D, mode=self.mode, sparse=sparse, include_last_offset=last_offset,
                                         seed=seed)
        else:
            self.m = cembed.Embedding(V0, D, sparse=sparse, seed=seed)
        self.sparse, self.last_offset = sparse, last_offset
        if which.startswith("sgd"):
            hp = dict(lr=0.1, momentum=0.9 if which == "sgd_momentum" else 0.0)
            self.opt = optim.SGD([self.m], **hp)
            kind = "sgd"
        elif which == "sparseadam":
            hp = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8)
            self.opt = optim.SparseAdam([self.m], **hp)
            kind = "sparseadam"
        else:
            hp = dict(lr=0.1, lr_decay=0.05, eps=1e-10)
            self.opt = optim.Adagrad([self.m], **hp)
            kind = "adagrad"
        self.shadow = ShadowOptimizer(kind, hp, V0)
        self.w = self.m.weight.copy()
        self.writeable = True
        self.grad = None
        self.last = None         # (ids, bags or None) of the last successful forward, copied
        self.rows_at_forward = V0

    # ------------------------------------------------------------------ helpers
    def fp(self):
        return fingerprint(self.m.weight, self.m.grad, self.opt.state_dict())

    def act(self, fn, expect):
        """Run fn; ``expect`` is "ok", "refuse" or "either". Returns (succeeded, result)."""
        before = self.fp()
        try:
            result = fn()
        except REFUSALS as exc:
            assert expect != "ok", f"unexpected refusal: {type(exc).__name__}: {exc}"
            assert self.fp() == before, f"a refused call ({type(exc).__name__}: {exc}) changed weight, grad or state"
            return False, exc
        assert expect != "refuse", "expected a clean refusal, the call succeeded"
        return True, result

    def ids(self, n, wild=False):
        """n row ids: in range of the current table, or (wild) from [0, ID_MAX]."""
        return self.rng.integers(0, ID_MAX + 1 if wild else self.n_rows(), n).astype(np.int64)

    def dyadic(self, shape):
        return (self.rng.integers(-16, 17, shape) / 8).astype(f32)

    def n_rows(self):
        return self.w.shape[0]

    # ------------------------------------------------------------------ forward
    @rule(n=st.integers(0, 6), two_d=st.booleans(), wild=st.sampled_from([False, False, True]),
          hostile=st.sampled_from([None, None, None, "negative", "uint64_huge"]))
    def forward(self, n, two_d, wild, hostile):
        if self.is_bag:
            return self.forward_bag(n, two_d, wild, hostile, None)
        idx = self.ids(2 * n if two_d else n, wild).reshape((2, n) if two_d else (n,))
        if hostile and idx.size:
            idx = idx.astype(np.uint64) if hostile == "uint64_huge" else idx
            idx.reshape(-1)[0] = 2**63 if hostile == "uint64_huge" else -1
        bad = hostile is not None and idx.size > 0 or bool((idx.astype(np.int64) >= self.n_rows()).any())
        ok, out = self.act(lambda: self.m(idx), "refuse" if bad else "ok")
        if ok:
            np.testing.assert_array_equal(out, ref.embedding(idx, self.m.weight))   # exactly the rows
            np.testing.assert_allclose(out, ref.embedding(idx, self.w), rtol=1e-5, atol=1e-6)  # of the model
            self.last, self.rows_at_forward, self.caller = (idx.copy(), None), self.n_rows(), [idx]

    def forward_bag(self, n, two_d, wild, hostile, offsets_kind):
        offsets = None
        if two_d:
            inp = self.ids(n * 2, wild).reshape(n, 2) if n % 2 else self.ids(n, wild).reshape(1, n)
        else:
            inp = self.ids(n, wild)
            cuts = np.sort(self.rng.integers(0, n + 1, self.rng.integers(0, 3)))
            offsets = np.concatenate([[0], cuts, [n] if self.last_offset else []]).astype(np.int64)
        if hostile and inp.size:
            inp = inp.astype(np.uint64) if hostile == "uint64_huge" else inp
            inp.reshape(-1)[0] = 2**63 if hostile == "uint64_huge" else -1
        if offsets_kind == "start_nonzero":     # every one of these is malformed
            offsets[0] = 1
        elif offsets_kind == "decreasing":
            offsets = np.array([0, 2, 1] + ([n] if self.last_offset else []), np.int64)
        elif offsets_kind == "past_end":
            offsets = np.append(offsets, n + 2).astype(np.int64)
        bad_ids = hostile is not None and inp.size > 0 or bool((inp.astype(np.int64) >= self.n_rows()).any())
        ok, out = self.act(lambda: self.m(inp, offsets), "refuse" if bad_ids or offsets_kind else "ok")
        if ok:
            flat = inp.reshape(-1).copy()
            bags = ref.bags_of(inp.copy(), None if offsets is None else offsets.copy(), self.last_offset)
            want = ref.embedding_bag(inp, self.w, None if offsets is None else offsets, mode=self.mode,
                                     include_last_offset=self.last_offset)
            np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)
            self.last, self.rows_at_forward = (flat, bags), self.n_rows()
            self.caller = [inp] + ([offsets] if offsets is not None else [])

    @precondition(lambda self: self.is_bag)
    @rule(n=st.integers(0, 6), offsets_kind=st.sampled_from(["start_nonzero", "decreasing", "past_end"]))
    def forward_bag_bad_offsets(self, n, offsets_kind):
        self.forward_bag(n, False, False, None, offsets_kind)

    @rule(n=st.integers(0, 6), two_d=st.booleans())
    def group_ahead(self, n, two_d):
        """What a loader thread does: check and group ids now (against the table as it is now) for a
        forward or backward that comes later, when the table may have been replaced."""
        idx = self.ids(2 * n if two_d else n).reshape((2, n) if two_d else (n,))
        self.grouped = (idx.copy(), cembed.functional.group_indices(idx, self.n_rows()))
        self.caller = [idx]   # refilling it afterwards must change nothing

    @precondition(lambda self: self.grouped is not None and not self.is_bag)
    @rule()
    def forward_grouped(self):
        idx, grouped = self.grouped
        bad = bool((idx >= self.n_rows()).any())   # the table may have fewer rows by now
        ok, out = self.act(lambda: self.m(grouped), "refuse" if bad else "ok")
        if ok:
            np.testing.assert_array_equal(out, ref.embedding(idx, self.m.weight))
            np.testing.assert_allclose(out, ref.embedding(idx, self.w), rtol=1e-5, atol=1e-6)
            self.last, self.rows_at_forward = (idx.copy(), None), self.n_rows()

    @precondition(lambda self: self.grouped is not None and not self.is_bag and self.grad_fits())
    @rule()
    def backward_grouped(self):
        idx, grouped = self.grouped
        n_rows = self.n_rows()
        go = self.dyadic(idx.shape + (D,))
        ok, _ = self.act(lambda: self.m.backward(go, indices=grouped), "ok" if (idx < n_rows).all() else "refuse")
        if ok:
            new = Grad(ref.embedding_backward(go, idx, n_rows), np.unique(idx).astype(np.int64) if self.sparse else None)
            self.grad = new if self.grad is None else self.grad + new

    @precondition(lambda self: self.caller)
    @rule(value=st.sampled_from([0, 5, ID_MAX + 1, -3, 10**6]))
    def caller_refills_its_buffers(self, value):
        """The caller reuses the arrays it passed to forward: nothing in the module may change."""
        for arr in self.caller:
            if arr.dtype == np.uint64:
                continue
            arr[...] = value

    # ------------------------------------------------------------------ backward
    def grad_fits(self):
        return self.grad is None or self.grad.shape == self.w.shape

    @precondition(lambda self: self.grad_fits())
    @rule(explicit=st.booleans(), n=st.integers(0, 5), wild=st.sampled_from([False, False, True]),
          bad_grad=st.sampled_from([None, None, None, "dtype", "shape"]))
    def backward(self, explicit, n, wild, bad_grad):
        n_rows = self.n_rows()
        if self.is_bag or not explicit:
            if self.last is None:
                self.act(lambda: self.m.backward(np.zeros((0, D), f32)), "refuse")
                return
            flat, info = self.last
            shape = (len(info), D) if self.is_bag else flat.shape + (D,)
            indices = None
        else:
            indices = self.ids(n, wild)
            flat, info, shape = indices, None, (n, D)
        go = self.dyadic(shape)
        if bad_grad == "dtype":
            go = go.astype(np.float64)
        elif bad_grad == "shape":
            go = go[..., :-1]
        fits = bool((flat < n_rows).all())
        if bad_grad or not fits:
            expect = "refuse"
        elif indices is None and n_rows != self.rows_at_forward:
            expect = "either"
        else:
            expect = "ok"
        call = (lambda: self.m.backward(go)) if indices is None else (lambda: self.m.backward(go, indices=indices))
        ok, _ = self.act(call, expect)
        if not ok:
            return
        if self.is_bag:
            new = np.zeros((n_rows, D), f32)
            for b, positions in enumerate(info):
                scale = f32(1.0 / max(len(positions), 1)) if self.mode == "mean" else f32(1.0)
                for k in positions:
                    new[flat[k]] = new[flat[k]] + scale * go[b]
        else:
            new = ref.embedding_backward(go, flat, n_rows)
        new = Grad(new, np.unique(flat).astype(np.int64) if self.sparse else None)
        self.grad = new if self.grad is None else self.grad + new

    # ------------------------------------------------------------------ optimizer
    @rule(threads=st.sampled_from([None, 1, 2]))
    def step(self, threads):
        cembed.set_num_threads(threads)
        refuse = self.shadow.refuses(self.w.shape, self.writeable, self.grad)
        ok, _ = self.act(self.opt.step, "refuse" if refuse else "ok")
        if ok:
            self.shadow.step(self.w, self.grad)

    @rule(n=st.integers(0, 4), wild=st.sampled_from([False, False, True]), threads=st.sampled_from([None, 1, 2]))
    def train_step(self, n, wild, threads):
        """The common sequence: forward, backward of that forward, step (each checked as above)."""
        self.forward(n, False, wild, None)
        if self.grad_fits():
            self.backward(False, n, False, None)
        self.step(threads)

    @rule(via_module=st.booleans())
    def zero_grad(self, via_module):
        (self.m if via_module else self.opt).zero_grad()
        self.grad = None

    @rule(lr=st.sampled_from([0.1, 0.01, "float32"]))
    def set_lr(self, lr):
        value = f32(0.03) if lr == "float32" else lr
        self.opt.param_groups[0]["lr"] = value
        self.shadow.hp["lr"] = value

    # ------------------------------------------------------------------ files
    def listing(self):
        return sorted(os.listdir(self.dir))

    @rule(name=st.sampled_from(["a.npz", "b.npz"]))
    def save(self, name):
        path = os.path.join(self.dir, name)
        old = open(path, "rb").read() if os.path.exists(path) else None
        names = set(self.listing()) | {name}
        lr_is_float = type(self.shadow.hp["lr"]) is float
        fits = all(a.shape == self.w.shape for a in self.shadow.state.values() if isinstance(a, np.ndarray) and a.ndim == 2)
        ok, _ = self.act(lambda: self.opt.save(path), ("ok" if lr_is_float else "either") if fits else "refuse")
        assert set(self.listing()) <= names, f"save left files behind: {self.listing()}"
        if ok:
            hp = dict(self.shadow.hp, lr=float(self.shadow.hp["lr"]))
            self.saved[name] = (copy.deepcopy(self.shadow.state), hp)
        else:
            now = open(path, "rb").read() if os.path.exists(path) else None
            assert now == old, "a failed save changed the previous file"

    @precondition(lambda self: self.saved)
    @rule(data=st.data())
    def load(self, data):
        name = data.draw(st.sampled_from(sorted(self.saved)))
        state, hp = self.saved[name]
        fits = all(a.shape == self.w.shape for a in state.values() if isinstance(a, np.ndarray) and a.ndim == 2)
        ok, _ = self.act(lambda: self.opt.load(os.path.join(self.dir, name)), "ok" if fits else "refuse")
        if ok:
            self.shadow.state, self.shadow.hp = copy.deepcopy(state), dict(hp)

    @rule(kind=st.sampled_from(["garbage", "empty", "text", "truncated", "edited"]))
    def load_corrupted_file(self, kind):
        path = os.path.join(self.dir, "bad.npz")
        good = os.path.join(self.dir, "scratch.npz")
        try:
            self.opt.save(good)
            data = open(good, "rb").read()
        except REFUSALS:
            data = None
        finally:
            if os.path.exists(good):
                os.remove(good)
        if kind == "edited" and data is not None:
            with open(good, "wb") as fh:
                fh.write(data)
            with np.load(good) as z:
                arrays = {k: z[k] for k in z.files}
            os.remove(good)
            for key, bad in (("0/active_rows", np.array([0, 10**6])), ("0/exp_avg", np.zeros((ID_MAX + 2, D), f32)),
                             ("0/sum", np.zeros((ID_MAX + 2, D), f32)),
                             ("0/momentum_buffer", np.zeros((ID_MAX + 2, D), f32))):
                if key in arrays:
                    arrays[key] = bad
                    np.savez(path, **arrays)
                    break
            else:
                kind = "garbage"
        if kind == "garbage" or (kind in ("edited", "truncated") and data is None):
            open(path, "wb").write(self.rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
        elif kind == "empty":
            open(path, "wb").close()
        elif kind == "text":
            open(path, "w").write("lr = 0.1\n")
        elif kind == "truncated":
            open(path, "wb").write(data[: len(data) // 2])
        try:
            ok, exc = self.act(lambda: self.opt.load(path), "refuse")
            assert isinstance(exc, ValueError), f"load of a {kind} file raised {type(exc).__name__}, not ValueError"
        finally:
            os.remove(path)

    # ------------------------------------------------------------------ state_dict
    @rule()
    def state_dict_round_trip(self):
        sd = self.opt.state_dict()
        before = self.fp()
        _scribble(sd)                      # the returned dict is the caller's: editing it changes nothing
        assert self.fp() == before, "editing the dict returned by state_dict() changed the optimizer"
        sd = self.opt.state_dict()
        ok, _ = self.act(lambda: self.opt.load_state_dict(sd), "ok" if self.shadow.matches(self.w.shape) else "refuse")
        if ok:
            before = self.fp()
            _scribble(sd)                  # nor may the dict the optimizer was loaded from
            assert self.fp() == before, "editing a dict after load_state_dict(dict) changed the optimizer"

    @rule(data=st.data())
    def load_corrupted_state_dict(self, data):
        sd = self.opt.state_dict()
        state0 = sd["state"].setdefault(0, {})
        group = sd["param_groups"][0]
        n = self.n_rows()
        wrong = np.zeros((n + 1, D), f32)
        edits = {
            "lr_negative": lambda: group.__setitem__("lr", -1.0),
            "lr_nan": lambda: group.__setitem__("lr", math.nan),
            "lr_string": lambda: group.__setitem__("lr", "fast"),
            "lr_missing": lambda: group.pop("lr"),
            "state_for_missing_param": lambda: sd["state"].__setitem__(3, {}),
            "no_groups": lambda: sd.__setitem__("param_groups", []),
        }
        kind = self.shadow.kind
        if kind == "sgd":
            edits["momentum_negative"] = lambda: group.__setitem__("momentum", -0.5)
            edits["buffer_wrong_shape"] = lambda: state0.__setitem__("momentum_buffer", wrong)
            if "momentum_buffer" in state0:
                edits["buffer_float64"] = lambda: state0.__setitem__(
                    "momentum_buffer", state0["momentum_buffer"].astype(np.float64))
                edits["active_rows_out_of_range"] = lambda: state0.__setitem__("active_rows", np.array([0, 10**6]))
                edits["active_rows_negative"] = lambda: state0.__setitem__("active_rows", np.array([-1, 0]))
                edits["active_rows_unsorted"] = lambda: state0.__setitem__("active_rows", np.array([2, 1]))
        elif kind == "sparseadam":
            edits["beta1_one"] = lambda: group.__setitem__("betas", (1.0, 0.999))
            edits["eps_zero"] = lambda: group.__setitem__("eps", 0.0)
            edits["step_without_arrays"] = lambda: sd["state"].__setitem__(0, {"step": 3})
            edits["exp_avg_wrong_shape"] = lambda: sd["state"].__setitem__(
                0, {"step": 1, "exp_avg": wrong, "exp_avg_sq": np.zeros((n, D), f32)})
            if "step" in state0:
                edits["step_negative"] = lambda: state0.__setitem__("step", -1)
        else:
            edits["lr_decay_negative"] = lambda: group.__setitem__("lr_decay", -1.0)
            edits["sum_wrong_shape"] = lambda: state0.__setitem__("sum", wrong)
            edits["sum_missing"] = lambda: state0.pop("sum", None)
            edits["step_string"] = lambda: state0.__setitem__("step", "x")
        edits[data.draw(st.sampled_from(sorted(edits)))]()
        self.act(lambda: self.opt.load_state_dict(sd), "refuse")

    # ------------------------------------------------------------------ weight replaced
    @rule(read_only=st.booleans())
    def replace_weight_same_shape(self, read_only):
        w = self.m.weight.copy()
        if read_only:
            w.setflags(write=False)
        self.m.weight = w
        self.writeable = not read_only

    @rule(rows=st.sampled_from(ROW_CHOICES))
    def replace_weight_other_rows(self, rows):
        w = self.dyadic((rows, D))
        self.m.weight = w.copy()
        self.w, self.writeable = w, True

    # ------------------------------------------------------------------ hostile SparseGrad
    @rule(data=st.data(), hostile=st.sampled_from(["refill_rows", "edit_indices", "edit_values", "wrong_num_rows",
                                                    "uint64_huge"]))
    def assign_sparse_grad(self, data, hostile):
        n_rows = self.n_rows()
        rows = np.array(sorted(data.draw(st.sets(st.integers(0, n_rows - 1), max_size=4))), np.int64)
        values = self.dyadic((rows.size, D))
        if hostile == "uint64_huge":
            bad = np.append(rows, 0).astype(np.uint64)
            bad[-1] = 2**63
            self.act(lambda: SparseGrad(bad, np.zeros((bad.size, D), f32), n_rows), "refuse")
            return
        num_rows = n_rows + 1 if hostile == "wrong_num_rows" else n_rows
        g = SparseGrad(rows, values, num_rows)
        self.m.grad = g
        self.grad = sparse_grad(rows.copy(), values.copy(), num_rows)   # the shadow keeps its own copy
        if hostile == "refill_rows" and rows.size:
            rows[...] = 10**6
        elif hostile == "edit_indices" and rows.size:
            with pytest.raises(Exception):
                g.indices[0] = 10**6
            with pytest.raises(Exception):
                g.indices = np.array([10**6])
        elif hostile == "edit_values" and rows.size:
            with pytest.raises(Exception):
                g.values = np.zeros((rows.size + 3, D), f32)

    # ------------------------------------------------------------------ the comparison
    @invariant()
    def matches_shadow(self):
        if not hasattr(self, "m"):
            return
        w = self.m.weight
        assert w.shape == self.w.shape
        np.testing.assert_allclose(w, self.w, rtol=RTOL, atol=ATOL, err_msg="weight differs from the shadow")
        g = self.m.grad
        if self.grad is None:
            assert g is None, f"grad should be None, is {g!r}"
        else:
            assert g is not None, "grad is None, the shadow has one"
            if self.grad.rows is None:
                assert not isinstance(g, SparseGrad), "grad should be dense"
                dense = g
            else:
                assert isinstance(g, SparseGrad), "grad should be a SparseGrad"
                np.testing.assert_array_equal(g.indices, self.grad.rows, err_msg="SparseGrad rows differ")
                dense = g.to_dense()
            assert dense.shape == self.grad.shape
            np.testing.assert_allclose(dense, self.grad.values, rtol=RTOL, atol=ATOL, err_msg="grad differs")
        sd = self.opt.state_dict()
        assert float(sd["param_groups"][0]["lr"]) == float(self.shadow.hp["lr"])
        state = sd["state"].get(0, {})
        for key, want in self.shadow.state.items():
            assert key in state, f"optimizer state lacks {key!r}"
            if isinstance(want, np.ndarray) and want.ndim == 2:
                np.testing.assert_allclose(state[key], want, rtol=RTOL, atol=ATOL, err_msg=f"state {key!r} differs")
            else:
                assert float(state[key]) == float(want), f"state {key!r}: {state[key]!r} != {want!r}"


def _scribble(sd):
    """Overwrite everything reachable in a state_dict in place."""
    for entry in sd["state"].values():
        for key, value in list(entry.items()):
            if isinstance(value, np.ndarray) and value.flags.writeable:
                value[...] = 7
            else:
                entry[key] = "scribbled"
    for group in sd["param_groups"]:
        group["lr"] = 123.0


# About 10-20 s on a loaded 2-core machine (the rest of the profile, e.g. derandomize, from conftest.py).
TableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.filter_too_much])
test_table_machine = TableMachine.TestCase
