"""Memory safety: nothing kept between calls is trusted.

Every scenario runs in a child interpreter (``run_child``) so that a segfault, an abort from heap
corruption or a hang fails one test instead of killing pytest. The child imports the same cembed as
this process, runs the scenario, and prints one JSON verdict line; large arrays go through an .npz
file in ``tmp_path``. The expected outcomes (see each docstring) are either

* a clean exception of the right type with nothing changed — weights, gradients, optimizer state
  (``state_dict()``) and files are compared bitwise before/after, in the child, or
* for sequences that are legitimate, the torch-equivalent result, computed here with the NumPy
  reference (tests/reference.py).

Exception types follow README: IndexError for row ids outside [0, V), TypeError for wrong dtypes,
ValueError for every other bad argument (also for bad checkpoints / state_dicts / hyper-parameters).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import cembed

import reference as ref

CEMBED_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(cembed.__file__)))
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
VERDICT = "@@VERDICT@@"

# Helpers available to every child script.
PRELUDE = r'''
import hashlib, json, os, sys, traceback
import numpy as np
import cembed
from cembed import SparseGrad, optim
from cembed import functional as F
ARGS = json.loads(sys.argv[1])
OUT = ARGS.get("out")


from util import fingerprint as fp   # tests/util.py: the child puts tests/ on its path


def mod_fp(*modules):
    return fp([[m.weight, m.grad] for m in modules])


def opt_fp(opt):
    return fp(opt.state_dict())


def attempt(fn):
    """{"raised": None, "value": ...} or {"raised": "IndexError", "message": "..."}"""
    try:
        value = fn()
    except Exception as exc:  # noqa: BLE001 - the verdict reports the type
        return {"raised": type(exc).__name__, "message": str(exc)}
    return {"raised": None, "value": value}


def dense(grad):
    if grad is None:
        return None
    return grad.to_dense() if isinstance(grad, SparseGrad) else np.asarray(grad)


def save_arrays(**arrays):
    np.savez(OUT, **{k: v for k, v in arrays.items() if v is not None})


def report(**verdict):
    def default(o):
        if isinstance(o, (np.ndarray, np.generic)):
            return np.asarray(o).tolist()
        return repr(o)
    print("@@VERDICT@@" + json.dumps(verdict, default=default), flush=True)
'''


# The driver of a batch: imports cembed once (no kernel runs here, so no OpenMP thread pool exists),
# then forks one process per case, each with its own stdout/stderr files and a timeout. A case that
# segfaults, aborts or hangs is reported as such without affecting the others.
BATCH_DRIVER = r"""
import json, os, signal, sys, time, traceback
import numpy, cembed  # imported once; the forked cases reuse them
PRELUDE, CASES = json.loads(sys.stdin.read())
results = {}
for case in CASES:
    paths = {k: os.path.join(case["dir"], k + ".txt") for k in ("stdout", "stderr")}
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.dup2(os.open(paths["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
            os.dup2(os.open(paths["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.argv = ["-c", json.dumps(case["args"])]
            exec(compile(PRELUDE + case["code"], "<case " + case["name"] + ">", "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            status = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(status)
    deadline = time.monotonic() + case["timeout"]
    status = None
    while True:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    res = {"status": status}
    for k, path in paths.items():
        try:
            with open(path, errors="replace") as fh:
                res[k] = fh.read()
        except OSError:
            res[k] = ""
    results[case["name"]] = res
print(json.dumps(results))
"""


def _child_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([CEMBED_ROOT, TESTS_DIR, env.get("PYTHONPATH", "")])
    env.pop("OMP_NUM_THREADS", None)
    return env


def run_batch(cases, directory, timeout=30):
    """Run ``cases`` ({name: (code, args)}) in one child interpreter, one fork per case.
    Returns {name: {"status", "stdout", "stderr", "out"}} (status None: killed after ``timeout``)."""
    payload = []
    for name, (code, args) in cases.items():
        case_dir = directory / name
        case_dir.mkdir()
        args = dict(args, out=str(case_dir / "out.npz"), tmp=str(case_dir))
        payload.append({"name": name, "code": textwrap.dedent(code), "args": args, "dir": str(case_dir),
                        "timeout": timeout})
    proc = subprocess.Popen([sys.executable, "-c", BATCH_DRIVER], cwd=CEMBED_ROOT, env=_child_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(json.dumps([PRELUDE, payload]), timeout=timeout * len(cases) + 60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the driver and its cases
        proc.communicate()
        pytest.fail("the batch driver hung")
    assert proc.returncode == 0, f"the batch driver failed:\n{stderr[-3000:]}"
    results = json.loads(stdout.strip().splitlines()[-1])
    for item in payload:
        results[item["name"]]["out"] = item["args"]["out"]
    return results


def outcome_of(res, timeout=None):
    """(verdict, arrays) of one case; fails the test on a crash, a hang or a missing verdict."""
    status, stdout, stderr = res["status"], res["stdout"], res["stderr"]
    if status is None:
        pytest.fail(f"child hung (killed after {timeout or 'the'} s timeout)\nstdout:\n{stdout[-2000:]}\n"
                    f"stderr:\n{stderr[-2000:]}")
    if status != 0:
        how = (f"killed by signal {signal.Signals(-status).name}" if status < 0
               else f"exit status {status}: an uncaught exception")
        pytest.fail(f"child died ({how})\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith(VERDICT)]
    assert lines, f"child printed no verdict\nstdout:\n{stdout[-2000:]}\nstderr:\n{stderr[-3000:]}"
    verdict = json.loads(lines[-1][len(VERDICT):])
    arrays = {}
    if os.path.exists(res["out"]):
        with np.load(res["out"]) as data:
            arrays = {k: data[k] for k in data.files}
    return verdict, arrays


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """batch(group, cases, name) -> (verdict, arrays) of case ``name``; the whole group runs once."""
    done = {}

    def get(group, cases, name):
        key = (group, id(cases))   # (two tables of cases given one group name are still two batches)
        if key not in done:
            done[key] = run_batch(cases, tmp_path_factory.mktemp(group))
        return outcome_of(done[key][name])

    return get


def run_child(code, timeout=60, tmp_path=None, **args):
    """One scenario in its own interpreter (for the fork test, which must control the process that
    runs the first parallel kernel)."""
    args = dict(args, out=str(tmp_path / "out.npz"), tmp=str(tmp_path))
    script = PRELUDE + textwrap.dedent(code)
    proc = subprocess.Popen([sys.executable, "-c", script, json.dumps(args)], cwd=CEMBED_ROOT, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the session this test started: the child and its fork
        stdout, stderr = proc.communicate()
        status = None
    return outcome_of({"status": status, "stdout": stdout, "stderr": stderr, "out": args["out"]}, timeout)


def assert_raised(outcome, *types, what=""):
    assert outcome["raised"] is not None, f"{what}: expected {'/'.join(types)}, the call succeeded"
    assert outcome["raised"] in types, f"{what}: expected {'/'.join(types)}, got {outcome['raised']}: {outcome.get('message')}"


def assert_ok(outcome, what=""):
    assert outcome["raised"] is None, f"{what}: expected success, got {outcome['raised']}: {outcome.get('message')}"


def dyadic(rng, shape):
    return (rng.integers(-16, 17, shape) / 8).astype(np.float32)


def case(*parts, **args):
    """(code, args) of one batched case; ``parts`` are dedented one by one and joined."""
    return "".join(textwrap.dedent(part) for part in parts), args


# =================================================================================================
# 1. crafted checkpoints / state_dicts / state edited in place
# =================================================================================================

CHECKPOINT_CORRUPTIONS = {
    # name: (optimizer, python statement editing the dict ``d`` of the saved arrays)
    "sgd_active_rows_out_of_range": ("sgd", 'd["0/active_rows"] = np.array([1, 10**9])'),
    "sgd_active_rows_negative": ("sgd", 'd["0/active_rows"] = np.array([-5, 1])'),
    "sgd_active_rows_unsorted": ("sgd", 'd["0/active_rows"] = np.array([5, 1, 2])'),
    "sgd_active_rows_duplicates": ("sgd", 'd["0/active_rows"] = np.array([1, 1, 2, 5])'),
    "sgd_active_rows_float": ("sgd", 'd["0/active_rows"] = np.array([1.0, 2.0, 5.0])'),
    "sgd_active_rows_2d": ("sgd", 'd["0/active_rows"] = np.array([[1, 2], [5, 6]])'),
    "sgd_momentum_buffer_short": ("sgd", 'd["0/momentum_buffer"] = np.zeros((3, 4), np.float32)'),
    "sgd_momentum_buffer_float64": ("sgd", 'd["0/momentum_buffer"] = d["0/momentum_buffer"].astype(np.float64)'),
    "adam_exp_avg_short": ("adam", 'd["0/exp_avg"] = np.zeros((2, 4), np.float32)'),
    "adam_exp_avg_sq_1d": ("adam", 'd["0/exp_avg_sq"] = np.zeros(40, np.float32)'),
    "adagrad_step_string": ("adagrad", 'd["0/step"] = np.array("x")'),
    "adagrad_sum_short": ("adagrad", 'd["0/sum"] = np.zeros((2, 4), np.float32)'),
    "adagrad_sum_missing": ("adagrad", 'del d["0/sum"]'),
}

CHECKPOINT_CODE = '''
def make():
    emb = cembed.Embedding(10, 4, sparse=True, seed=0)
    opt = {"sgd": lambda: optim.SGD([emb], lr=0.1, momentum=0.9),
           "adam": lambda: optim.SparseAdam([emb], lr=0.1),
           "adagrad": lambda: optim.Adagrad([emb], lr=0.1)}[ARGS["which"]]()
    for rows in ([1, 2], [2, 5]):
        emb(np.array(rows)); emb.backward(np.ones((len(rows), 4), np.float32)); opt.step(); opt.zero_grad()
    return emb, opt
emb, opt = make()
twin_emb, twin = make()
p = os.path.join(ARGS["tmp"], "ckpt.npz")
opt.save(p)
d = dict(np.load(p))
EDIT
np.savez(p, **d)
before = (mod_fp(emb), opt_fp(opt))
loaded = attempt(lambda: opt.load(p))
unchanged = before == (mod_fp(emb), opt_fp(opt))
for e, o in ((emb, opt), (twin_emb, twin)):
    e(np.array([1, 7])); e.backward(np.ones((2, 4), np.float32)); o.step()
report(loaded=loaded, unchanged=unchanged,
       same_as_twin=mod_fp(emb) == mod_fp(twin_emb) and opt_fp(opt) == opt_fp(twin))
'''
CHECKPOINT_CASES = {name: case(CHECKPOINT_CODE.replace("EDIT", edit), which=which)
                    for name, (which, edit) in CHECKPOINT_CORRUPTIONS.items()}


@pytest.mark.parametrize("name", sorted(CHECKPOINT_CASES))
def test_crafted_checkpoint_is_refused(batch, name):
    """Reproduction 1 and friends: a checkpoint whose arrays were edited (row ids out of range,
    negative, unsorted, duplicated, float or 2-D; wrong shape/dtype; missing entries) makes ``load``
    raise ValueError and change nothing; the next step is then exactly the step of an optimizer that
    never saw the file (a twin). On main the out-of-range row ids segfault the step after load."""
    verdict, _ = batch("checkpoint", CHECKPOINT_CASES, name)
    assert_raised(verdict["loaded"], "ValueError", what="load of a crafted checkpoint")
    assert verdict["unchanged"], "a refused load changed the module or the optimizer state"
    assert verdict["same_as_twin"], "after a refused load the next step differs from an untouched optimizer"


TWO_PARAM_SETUP = '''
def make():
    a = cembed.Embedding(10, 4, sparse=True, seed=1)
    b = cembed.Embedding(12, 4, sparse=True, seed=2)
    opt = {"sgd": lambda: optim.SGD([a, b], lr=0.1, momentum=0.9),
           "adam": lambda: optim.SparseAdam([a, b], lr=0.1),
           "adagrad": lambda: optim.Adagrad([a, b], lr=0.1, lr_decay=0.1),
           "rowwise": lambda: optim.RowWiseAdagrad([a, b], lr=0.1)}[ARGS["which"]]()
    return a, b, opt

def train(a, b, opt, rows_a=(1, 2), rows_b=(3, 4, 3)):
    for m, rows in ((a, rows_a), (b, rows_b)):
        m(np.array(rows)); m.backward(np.full((len(rows), 4), 0.5, np.float32))
    opt.step()
    opt.zero_grad()
'''

STATE_DICT_CORRUPTIONS = {
    # name: (optimizer, statement editing ``sd``, allowed exception types)
    "adam_step_without_arrays": ("adam", 'sd["state"][1] = {"step": 3}', ("ValueError",)),
    "adam_exp_avg_wrong_shape": ("adam", 'sd["state"][1]["exp_avg"] = np.zeros((3, 4), np.float32)', ("ValueError",)),
    "adam_exp_avg_sq_missing": ("adam", 'del sd["state"][1]["exp_avg_sq"]', ("ValueError",)),
    "adam_step_string": ("adam", 'sd["state"][1]["step"] = "three"', ("ValueError", "TypeError")),
    "adam_step_negative": ("adam", 'sd["state"][1]["step"] = -1', ("ValueError",)),
    "adam_betas_out_of_range": ("adam", 'sd["param_groups"][0]["betas"] = (1.5, 0.999)', ("ValueError",)),
    "adam_eps_negative": ("adam", 'sd["param_groups"][0]["eps"] = -1.0', ("ValueError",)),
    "adam_lr_nan": ("adam", 'sd["param_groups"][0]["lr"] = float("nan")', ("ValueError",)),
    "adam_lr_string": ("adam", 'sd["param_groups"][0]["lr"] = "fast"', ("ValueError", "TypeError")),
    "adam_lr_none": ("adam", 'sd["param_groups"][0]["lr"] = None', ("ValueError", "TypeError")),
    "adam_state_for_missing_param": ("adam", 'sd["state"][7] = {}', ("ValueError",)),
    "sgd_momentum_buffer_wrong_shape": ("sgd", 'sd["state"][1]["momentum_buffer"] = np.zeros((3, 4), np.float32)',
                                        ("ValueError",)),
    "sgd_active_rows_out_of_range": ("sgd", 'sd["state"][1]["active_rows"] = np.array([1, 10**9])',
                                     ("ValueError",)),
    "sgd_active_rows_unsorted": ("sgd", 'sd["state"][1]["active_rows"] = np.array([5, 1])', ("ValueError",)),
    "sgd_momentum_negative": ("sgd", 'sd["param_groups"][0]["momentum"] = -0.5', ("ValueError",)),
    "sgd_lr_negative": ("sgd", 'sd["param_groups"][0]["lr"] = -0.1', ("ValueError",)),
    "adagrad_sum_wrong_dtype": ("adagrad", 'sd["state"][1]["sum"] = sd["state"][1]["sum"].astype(np.float64)',
                                ("ValueError",)),
    "adagrad_step_string": ("adagrad", 'sd["state"][1]["step"] = "x"', ("ValueError", "TypeError")),
    "adagrad_lr_decay_negative": ("adagrad", 'sd["param_groups"][0]["lr_decay"] = -1.0', ("ValueError",)),
}

STATE_DICT_CODE = '''
a, b, opt = make(); train(a, b, opt)
ta, tb, twin = make(); train(ta, tb, twin)
sd = opt.state_dict()
EDIT
before = (mod_fp(a, b), opt_fp(opt))
loaded = attempt(lambda: opt.load_state_dict(sd))
unchanged = before == (mod_fp(a, b), opt_fp(opt))
stepped = attempt(lambda: train(a, b, opt, (2, 7), (0, 11)))
train(ta, tb, twin, (2, 7), (0, 11))
report(loaded=loaded, unchanged=unchanged, stepped=stepped,
       same_as_twin=mod_fp(a, b) == mod_fp(ta, tb) and opt_fp(opt) == opt_fp(twin))
'''
STATE_DICT_CASES = {name: case(TWO_PARAM_SETUP, STATE_DICT_CODE.replace("EDIT", edit), which=which)
                    for name, (which, edit, _) in STATE_DICT_CORRUPTIONS.items()}


@pytest.mark.parametrize("name", sorted(STATE_DICT_CASES))
def test_load_state_dict_refuses_unusable_state(batch, name):
    """Reproduction 5: ``load_state_dict`` of state that ``step`` cannot use (missing arrays, wrong
    shapes/dtypes, bad row ids, a step counter that would divide by zero, nonsense hyper-parameters)
    raises ValueError (TypeError also accepted where the value has a wrong *type*) before changing
    anything; the optimizer then steps exactly like a twin that never saw it. On main most are
    accepted and the next step fails half-way (parameter 0 updated, counters bumped)."""
    verdict, _ = batch("state_dict", STATE_DICT_CASES, name)
    assert_raised(verdict["loaded"], *STATE_DICT_CORRUPTIONS[name][2], what="load_state_dict of unusable state")
    assert verdict["unchanged"], "a refused load_state_dict changed the module or the optimizer state"
    assert_ok(verdict["stepped"], "step after a refused load_state_dict")
    assert verdict["same_as_twin"], "after a refused load_state_dict the next step differs from an untouched twin"


STATE_EDITS = {
    # name: (optimizer, statement editing ``opt.state`` directly, allowed exception types, layout_only)
    "adam_exp_avg_replaced_short": ("adam", 'opt.state[b]["exp_avg"] = np.zeros((3, 4), np.float32)',
                                    ("ValueError",), False),
    "adam_exp_avg_sq_float64": ("adam", 'opt.state[b]["exp_avg_sq"] = opt.state[b]["exp_avg_sq"].astype(np.float64)',
                                ("ValueError", "TypeError"), False),
    "adam_exp_avg_fortran": ("adam", 'opt.state[b]["exp_avg"] = np.asfortranarray(opt.state[b]["exp_avg"])',
                             ("ValueError",), True),
    "adagrad_sum_replaced_short": ("adagrad", 'opt.state[b]["sum"] = np.zeros((3, 4), np.float32)',
                                   ("ValueError",), False),
    "adagrad_sum_readonly": ("adagrad", 'opt.state[b]["sum"].setflags(write=False)', ("ValueError",), True),
    "sgd_active_rows_out_of_range": ("sgd", 'opt.state[b]["active_rows"] = np.array([3, 10**9])',
                                     ("ValueError", "IndexError"), False),
    "sgd_active_rows_int32": ("sgd", 'opt.state[b]["active_rows"] = opt.state[b]["active_rows"].astype(np.int32)',
                              ("ValueError", "TypeError"), True),
    "sgd_momentum_buffer_short": ("sgd", 'opt.state[b]["momentum_buffer"] = np.zeros((3, 4), np.float32)',
                                  ("ValueError",), False),
    # valid row ids in a strided view: checked through a contiguous copy, then the view reached the
    # kernel mid-step (parameter 0 already updated, a Cython-internal "not C-contiguous")
    "sgd_active_rows_strided": ("sgd", 'opt.state[b]["active_rows"] = np.repeat(opt.state[b]["active_rows"], 2)[::2]',
                                ("ValueError",), True),
    # an ndarray subclass as RowWiseAdagrad's 'sum' (every other optimizer refused one): its hooks ran
    # inside the step, where a gather through them could hand the kernel too few values
    "rowwise_sum_subclass": ("rowwise", 'opt.state[b]["sum"] = opt.state[b]["sum"].view(np.recarray)',
                             ("ValueError",), False),
    "rowwise_sum_short": ("rowwise", 'opt.state[b]["sum"] = np.zeros(3, np.float32)', ("ValueError",), False),
}

STATE_EDIT_CODE = '''
a, b, opt = make(); train(a, b, opt)
ta, tb, twin = make(); train(ta, tb, twin)
EDIT
for m, tm, rows in ((a, ta, (2, 7)), (b, tb, (0, 3, 11))):
    for x in (m, tm):
        x(np.array(rows)); x.backward(np.full((len(rows), 4), 0.25, np.float32))
before = (mod_fp(a, b), opt_fp(opt))
stepped = attempt(opt.step)
unchanged = before == (mod_fp(a, b), opt_fp(opt))
twin.step()
report(stepped=stepped, unchanged=unchanged,
       same_as_twin=np.array_equal(a.weight, ta.weight) and np.array_equal(b.weight, tb.weight))
'''
STATE_EDIT_CASES = {name: case(TWO_PARAM_SETUP, STATE_EDIT_CODE.replace("EDIT", edit), which=which)
                    for name, (which, edit, _, _) in STATE_EDITS.items()}


@pytest.mark.parametrize("name", sorted(STATE_EDIT_CASES))
def test_step_revalidates_state_and_fails_atomically(batch, name):
    """State kept between calls is re-validated by every ``step``: the state of parameter 1 edited
    in place (wrong shape/dtype, row ids out of range) makes ``step`` refuse (ValueError; TypeError
    accepted for a dtype, IndexError for row ids) *before* parameter 0 is updated — weights, grads
    and state bitwise unchanged. A mere layout change (Fortran order, read-only, int32 row ids) may
    instead be handled: then the step must equal a twin's step on the unedited state."""
    _, _, types, layout_only = STATE_EDITS[name]
    verdict, _ = batch("state_edit", STATE_EDIT_CASES, name)
    if layout_only and verdict["stepped"]["raised"] is None:
        assert verdict["same_as_twin"], "a step on re-laid-out state differs from the twin's step"
        return
    assert_raised(verdict["stepped"], *types, what="step with corrupted state")
    assert verdict["unchanged"], "a refused step changed weights, grads or state (not atomic)"


# =================================================================================================
# 2. caller buffers mutated between forward and backward
# =================================================================================================

BAG_MUTATIONS = {
    # name: (input, offsets, include_last_offset, statement mutating ``inp`` / ``off``)
    "2d_out_of_range": ([[1, 2], [3, 4]], None, False, "inp[0, 1] = V"),
    "2d_huge": ([[1, 2], [3, 4]], None, False, "inp[1, 0] = 10**9"),
    "2d_negative": ([[1, 2], [3, 4]], None, False, "inp[1, 1] = -7"),
    "2d_in_range": ([[1, 2], [3, 4]], None, False, "inp[0, 1] = 9"),
    "1d_out_of_range": ([5, 6, 7, 5], [0, 1], False, "inp[2] = V + 3"),
    "offsets_past_end": ([5, 6, 7, 5], [0, 1, 4], True, "off[1] = 10**6"),
    "offsets_decreasing": ([5, 6, 7, 5], [0, 3, 4], True, "off[1] = -50"),
    "offsets_in_range": ([5, 6, 7, 5], [0, 1, 4], True, "off[1] = 3"),
}
BAG_CODE = '''
V, D = ARGS["V"], ARGS["D"]
bag = cembed.EmbeddingBag(V, D, mode=ARGS["mode"], sparse=ARGS["sparse"], include_last_offset=ARGS["last"], seed=0)
inp = np.array(ARGS["inp"], dtype=np.int64)
off = None if ARGS["off"] is None else np.array(ARGS["off"], dtype=np.int64)
out = bag(inp, off)
MUTATE
go = np.arange(out.size, dtype=np.float32).reshape(out.shape) / 8
res = attempt(lambda: bag.backward(go))
g = bag.grad
save_arrays(weight=bag.weight, grad=dense(g), go=go, rows=g.indices if isinstance(g, SparseGrad) else None)
report(backward=res, is_sparse=isinstance(g, SparseGrad))
'''
BAG_CASES = {
    f"{name}-{mode}-{'sparse' if sparse else 'dense'}":
        case(BAG_CODE.replace("MUTATE", mutate), V=1000, D=8, mode=mode, sparse=sparse, last=last, inp=inp, off=off)
    for name, (inp, off, last, mutate) in BAG_MUTATIONS.items() for mode in ("sum", "mean") for sparse in (False, True)
}


@pytest.mark.parametrize("name", sorted(BAG_CASES))
def test_bag_backward_uses_input_as_it_was_at_forward(batch, name):
    """Reproduction 2: the caller refills its index / offsets buffer after ``bag(inp)``; backward
    must use the bags of the forward (a private copy) — the torch-equivalent gradient of that
    forward, from the NumPy reference — whatever the buffer now holds. On main the bag keeps views
    of the caller's int64 arrays: out-of-range values corrupt the heap (dense) or produce a
    SparseGrad with rows >= V; in-range values silently give a wrong gradient."""
    args = BAG_CASES[name][1]
    verdict, arrays = batch("bag_mutation", BAG_CASES, name)
    assert_ok(verdict["backward"], "backward after the caller mutated its buffer")
    inp = np.array(args["inp"])
    want, _ = ref.embedding_bag_backward(arrays["go"], inp, arrays["weight"],
                                         None if args["off"] is None else np.array(args["off"]), mode=args["mode"],
                                         include_last_offset=args["last"])
    np.testing.assert_allclose(arrays["grad"], want.astype(np.float32), rtol=1e-6, atol=0)
    if args["sparse"]:
        assert verdict["is_sparse"]
        np.testing.assert_array_equal(arrays["rows"], np.unique(inp))


EMB_LAST_CODE = '''
emb = cembed.Embedding(10, 3, sparse=ARGS["sparse"], seed=0)
idx = np.array(ARGS["idx"], dtype=np.int64)
emb(idx)
idx[...] = ARGS["value"]
go = (np.arange(18, dtype=np.float32).reshape(2, 3, 3) - 5) / 4
res = attempt(lambda: emb.backward(go))
g = emb.grad
save_arrays(grad=dense(g), go=go, rows=g.indices if isinstance(g, SparseGrad) else None)
report(backward=res)
'''
EMB_LAST_IDX = [[1, 2, 2], [7, 0, 9]]
EMB_LAST_CASES = {
    f"{mutation}-{'sparse' if sparse else 'dense'}": case(EMB_LAST_CODE, sparse=sparse, idx=EMB_LAST_IDX, value=value)
    for mutation, value in (("in_range", 4), ("out_of_range", 10), ("huge", 10**9)) for sparse in (False, True)
}


@pytest.mark.parametrize("name", sorted(EMB_LAST_CASES))
def test_embedding_backward_uses_indices_of_last_forward(batch, name):
    """``Embedding.backward(grad)`` without indices uses the indices of the last forward *as they
    were then* (a private copy), not the caller's array as it is now. On main the module keeps the
    caller's int64 array: an in-range refill silently gives a wrong gradient, an out-of-range one an
    IndexError for a legitimate call."""
    verdict, arrays = batch("embedding_last", EMB_LAST_CASES, name)
    assert_ok(verdict["backward"], "backward after the caller refilled its index array")
    np.testing.assert_array_equal(arrays["grad"], ref.embedding_backward(arrays["go"], np.array(EMB_LAST_IDX), 10))
    if EMB_LAST_CASES[name][1]["sparse"]:
        np.testing.assert_array_equal(arrays["rows"], np.unique(EMB_LAST_IDX))


BUFFER_CODE = '''
import array
ids = [1, 2, 2, 7, 0, 9]
buf = array.array("q", ids)
view = memoryview(buf) if ARGS["via"] == "memoryview" else buf
if ARGS["module"] == "bag":
    m = cembed.EmbeddingBag(10, 3, mode="sum", sparse=True, seed=0)
    out = m(view, [0, 3])
elif ARGS["module"] == "grouped":
    m = cembed.Embedding(10, 3, sparse=True, seed=0)
    out = m(F.group_indices(view, 10))
else:
    m = cembed.Embedding(10, 3, sparse=True, seed=0)
    out = m(view)
opt = optim.SGD([m], lr=1.0)
buf[0] = buf[3] = ARGS["value"]          # the caller refills the buffer it lent to the forward
before = m.weight.copy()
res = attempt(lambda: m.backward(np.ones_like(out), optimizer=opt))   # fused: rows written in place
save_arrays(before=before, after=m.weight)
report(backward=res)
'''
BUFFER_CASES = {
    f"{module}-{via}-{value}": case(BUFFER_CODE, module=module, via=via, value=value)
    for module in ("embedding", "bag", "grouped") for via in ("array", "memoryview") for value in (4, 10**9)
}


@pytest.mark.parametrize("name", sorted(BUFFER_CASES))
def test_forward_keeps_a_copy_of_any_index_buffer(batch, name):
    """Indices passed as any buffer NumPy can wrap without copying (an ``array.array``, a
    ``memoryview``) are copied by the forward (and by ``group_indices``) like an ndarray's: refilling
    the buffer afterwards — here with an id far outside the table, before a fused backward that
    writes the rows in place — changes nothing. Before this was fixed only ndarrays were copied, and
    the backward used the refilled value unchecked (a SparseGrad row 10**9 of a 10-row table)."""
    verdict, arrays = batch("index_buffer", BUFFER_CASES, name)
    assert_ok(verdict["backward"], "fused backward after the caller refilled its index buffer")
    counts = np.bincount([1, 2, 2, 7, 0, 9], minlength=10).astype(np.float32)
    np.testing.assert_array_equal(arrays["after"], arrays["before"] - counts[:, None])   # SGD, lr 1


MIDCALL_CODE = '''
class Rewrites(np.ndarray):
    """Index ids that turn into 10**9 the first time NumPy hands them to a dispatched function after
    they were checked: a stand-in for another thread writing the caller's array while the forward
    runs (cembed's own copies go through no such hook)."""
    armed = False
    calls = 0

    def __array_function__(self, func, types, args, kwargs):
        if Rewrites.armed:
            Rewrites.calls += 1
            if Rewrites.calls == ARGS["at"]:       # the at-th dispatched call: after the checks before it
                np.asarray(self)[ARGS["pos"]] = 10**9
        return super().__array_function__(func, (np.ndarray,), args, kwargs)


ids = np.array([1, 2, 2, 7, 0, 9]).view(Rewrites)
Rewrites.armed = True
if ARGS["module"] == "bag":
    m = cembed.EmbeddingBag(10, 3, mode="sum", sparse=True, seed=0)
    call = lambda: m(ids, [0, 3])
elif ARGS["module"] == "bag_offsets":   # the bag boundaries rewrite themselves instead
    m = cembed.EmbeddingBag(10, 3, mode="sum", sparse=True, seed=0)
    Rewrites.armed = False
    offsets = np.array([0, 3]).view(Rewrites)
    Rewrites.armed = True
    call = lambda: m(np.asarray(ids), offsets)
else:
    m = cembed.Embedding(10, 3, sparse=True, seed=0, max_norm=1.0 if ARGS["module"] == "max_norm" else None)
    call = lambda: m(ids)
opt = optim.SGD([m], lr=1.0)
forward = attempt(call)
Rewrites.armed = False
backward = None
if forward["raised"] is None:
    backward = attempt(lambda: m.backward(np.ones((2, 3) if ARGS["module"].startswith("bag") else (6, 3), np.float32),
                                          optimizer=opt))
report(forward=forward, backward=backward)
'''
MIDCALL_CASES = {module: case(MIDCALL_CODE, module=module, at=at, pos=pos)
                 for module, at, pos in (("embedding", 1, 0), ("max_norm", 1, 0), ("bag", 1, 0), ("bag_offsets", 2, -1))}


@pytest.mark.parametrize("name", sorted(MIDCALL_CASES))
def test_what_a_forward_keeps_is_checked_after_it_is_copied(batch, name):
    """The forward copies the indices (and bag offsets) it keeps *before* checking them: a write to the
    caller's array during the forward (here 10**9, written by the array's own NumPy hook) either is caught
    by the check of the copy, or is not in the copy at all. It never reaches the backward, which
    trusts the saved ids (a fused backward writes their rows in place). Before, the check ran on the
    caller's array and the copy was taken after the lookup."""
    verdict, _ = batch("midcall", MIDCALL_CASES, name)
    forward, backward = verdict["forward"], verdict["backward"]
    if forward["raised"] is not None:
        assert forward["raised"] in ("IndexError", "ValueError") and "1000000000" in forward["message"], forward
    else:
        assert_ok(backward, "fused backward after the indices were rewritten during the forward")


HOOK_CODE = '''
ids = np.array([[1, 2], [3, 0]])
state = {"fired": False}


def rewrite():
    """What a hook of another argument does: rewrite the index array the call was given."""
    state["fired"] = True
    ids[0, 1] = 10**9


class Arr:
    """An argument that NumPy converts by calling __array__ (run after the indices were checked)."""
    def __init__(self, value):
        self.value = value

    def __array__(self, dtype=None, copy=None):
        rewrite()
        return np.asarray(self.value, dtype=dtype)


class Index:
    def __index__(self):
        rewrite()
        return 1


class Finalize(np.ndarray):
    def __array_finalize__(self, obj):
        if obj is not None and getattr(obj, "armed", False):
            rewrite()


class Lr(float):
    def __float__(self):
        rewrite()
        return float.__float__(self)


table = np.arange(40, dtype=np.float32).reshape(10, 4) / 40
query = np.ones((2, 4), np.float32)
kind = ARGS["kind"]
if kind == "dot":
    call = lambda: F.embedding_dot(Arr(query), ids, table)
elif kind == "dot_backward":
    call = lambda: F.embedding_dot_backward(Arr(np.ones((2, 2), np.float32)), ids, table)
elif kind == "dot_logistic_sgd":
    call = lambda: F.embedding_dot_logistic_sgd_(query, ids, table, lr=1.0, n_positive=Index())
elif kind == "module_dot_logistic":
    m = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.Adagrad([m], lr=0.1)
    call = lambda: m.dot_logistic_backward(Arr(query), ids, optimizer=opt)
elif kind == "embedding_backward":
    call = lambda: F.embedding_backward(Arr(np.ones((2, 2, 4), np.float32)), ids, 10)
elif kind == "module_backward":
    m = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.SGD([m], lr=1.0)
    call = lambda: m.backward(Arr(np.ones((2, 2, 4), np.float32)), ids, optimizer=opt)
elif kind == "module_backward_lr":
    m = cembed.Embedding.from_pretrained(table, freeze=False, sparse=True)
    opt = optim.SGD([m], lr=1.0)
    opt.param_groups[0]["lr"] = Lr(1.0)
    call = lambda: m.backward(np.ones((2, 2, 4), np.float32), ids, optimizer=opt)
elif kind == "half_table":
    half = table.astype(np.float16).view(Finalize)
    half.armed = True
    call = lambda: F.embedding(ids, half)
elif kind == "coalesce":
    call = lambda: F.coalesce(ids.reshape(-1), Arr(np.ones((4, 4), np.float32)), 10)
res = attempt(call)
report(res=res, fired=state["fired"])
'''
HOOK_CASES = {kind: case(HOOK_CODE, kind=kind) for kind in (
    "dot", "dot_backward", "dot_logistic_sgd", "module_dot_logistic", "embedding_backward", "module_backward",
    "module_backward_lr", "half_table", "coalesce")}


@pytest.mark.parametrize("name", sorted(HOOK_CASES))
def test_a_hook_of_another_argument_cannot_change_checked_indices(batch, name):
    """An argument converted after the indices were checked — an ``__array__``, ``__index__`` or
    ``__float__`` hook, a table subclass's ``__array_finalize__`` — rewrites the caller's index array
    with an id of 10**9. The kernel reads the copy that was checked (the call succeeds, as if the
    rewrite had come after it) and nothing outside the table is touched. Found by review: each of
    these segfaulted when the checked ids were a view of the caller's array."""
    verdict, _ = batch("hooks", HOOK_CASES, name)
    if name == "half_table":   # (since a table subclass is used as a plain view of its memory, made without
        assert not verdict["fired"], verdict   # calling it, its __array_finalize__ never runs: plain_array)
    else:
        assert verdict["fired"], "the hook did not run: the case tests nothing"
    assert_ok(verdict["res"], "a call whose other argument rewrote the indices mid-call")


SWAP_CODE = '''
kind = ARGS["kind"]
state = {"fired": False}


class Arr:
    """A gradient / query that, when NumPy converts it, swaps something the call already checked."""
    def __init__(self, value, swap):
        self.value, self.swap = value, swap

    def __array__(self, dtype=None, copy=None):
        state["fired"] = True
        self.swap()
        return np.asarray(self.value, dtype=dtype)


class Lr(float):
    swap = None

    def __float__(self):
        state["fired"] = True
        Lr.swap()
        return float.__float__(self)


class Step(int):
    def __add__(self, other):
        state["fired"] = True
        opt.state[m]["exp_avg"] = np.zeros((2, 8), np.float32)
        return int(self) + other


def small():
    return np.zeros((2, 8), np.float32)


before = None
if kind in ("embedding", "embedding_fused", "dot_logistic"):
    m = cembed.Embedding(100_000, 8, sparse=kind != "embedding", seed=0)
    opt = optim.SGD([m], lr=1.0) if kind != "embedding" else None
    ids = np.array([99_999, 5])
    def swap():
        m.weight = small()
    if kind == "dot_logistic":
        call = lambda: m.dot_logistic_backward(Arr(np.ones((2, 8), np.float32), swap), ids.reshape(2, 1), optimizer=opt)
    else:
        out = m(ids)
        call = lambda: m.backward(Arr(np.ones((2, 8), np.float32), swap), optimizer=opt)
elif kind == "bag_fused":
    m = cembed.EmbeddingBag(100_000, 8, mode="sum", sparse=True, seed=0)
    opt = optim.SGD([m], lr=1.0)
    m(np.array([[99_999, 5]]))
    def swap():
        m.weight = small()
    call = lambda: m.backward(Arr(np.ones((1, 8), np.float32), swap), optimizer=opt)
elif kind in ("step_adagrad", "step_sgd_momentum"):
    m = cembed.Embedding(100_000, 8, sparse=True, seed=0)
    m2 = cembed.Embedding(10, 8, sparse=True, seed=1)
    if kind == "step_adagrad":
        opt = optim.Adagrad([{"params": [m]}, {"params": [m2]}], lr=0.1)
    else:
        opt = optim.SGD([{"params": [m]}, {"params": [m2]}], lr=0.1, momentum=0.9)
    for module in (m, m2):   # one step each, so that the optimizer has state
        module.backward(np.ones((1, 8), np.float32), np.array([5]))
    opt.step()
    for module in (m, m2):
        module.backward(np.ones((2, 8), np.float32), np.array([99_999, 5]) % module.num_embeddings)
    def swap():
        if kind == "step_adagrad":
            opt.state[m]["sum"] = small()
        else:
            opt.state[m]["active_rows"] = np.array([10**9])
    Lr.swap = swap
    opt.param_groups[1]["lr"] = Lr(0.1)
    call = opt.step
elif kind == "step_counter":
    m = cembed.Embedding(100_000, 8, sparse=True, seed=0)
    opt = optim.SparseAdam([m], lr=0.1)
    m.backward(np.ones((1, 8), np.float32), np.array([99_999]))
    opt.step()
    opt.state[m]["step"] = Step(1)
    m.backward(np.ones((1, 8), np.float32), np.array([99_999]))
    state["fired"] = True    # refused before the counter is used
    call = opt.step
res = attempt(call)
report(res=res, fired=state["fired"])
'''
SWAP_CASES = {kind: case(SWAP_CODE, kind=kind) for kind in (
    "embedding", "embedding_fused", "dot_logistic", "bag_fused", "step_adagrad", "step_sgd_momentum", "step_counter")}


@pytest.mark.parametrize("name", sorted(SWAP_CASES))
def test_what_a_call_checked_cannot_be_swapped_during_it(batch, name):
    """Code run from an argument or option during a call (a gradient's ``__array__``, an lr's
    ``__float__``, a step counter's ``__add__``) replaces something the call already checked — the
    module's weight (with a smaller table), another module's optimizer state (a smaller array, a
    live-row id of 10**9), the moments behind a step counter. The call refuses (ValueError, or the
    IndexError of checking the swapped-in row ids) instead of updating with what it did not check.
    Found by review: each segfaulted before."""
    verdict, _ = batch("swaps", SWAP_CASES, name)
    assert verdict["fired"], "the hook did not run: the case tests nothing"
    res = verdict["res"]
    assert res["raised"] in ("ValueError", "IndexError"), res


SUBCLASS_CODE = '''
kind = ARGS["kind"]
if kind in ("liar_embedding", "liar_bag"):
    class Liar(np.ndarray):
        """Index ids that answer np.may_share_memory themselves: 'no, I share nothing'."""
        def __array_function__(self, func, types, args, kwargs):
            if func is np.may_share_memory:
                return False
            return super().__array_function__(func, (np.ndarray,), args, kwargs)

    raw = np.array([1, 2, 2, 7])
    if kind == "liar_bag":
        m = cembed.EmbeddingBag(10, 3, mode="sum", sparse=True, seed=0)
        m(raw.view(Liar), np.array([0, 2]))
        go = np.ones((2, 3), np.float32)
    else:
        m = cembed.Embedding(10, 3, sparse=True, seed=0)
        m(raw.view(Liar))
        go = np.ones((4, 3), np.float32)
    raw[0] = 10**9                    # the caller's memory, after the forward
    before = m.weight.copy()
    res = attempt(lambda: m.backward(go, optimizer=optim.SGD([m], lr=1.0)))
    report(res=res, changed_rows=sorted(set(np.flatnonzero((m.weight != before).any(axis=1)).tolist())))
else:
    class Evil(SparseGrad):
        __slots__ = ()
        reads = [0]

        @property
        def indices(self):
            self.reads[0] += 1
            return SparseGrad.indices.fget(self) if self.reads[0] == 1 else np.array([10**9])

    m = cembed.Embedding(10, 4, sparse=True, seed=0)
    m.grad = Evil(np.array([3]), np.ones((1, 4), np.float32), 10)
    res = attempt(optim.SGD([m], lr=1.0).step)
    report(res=res)
'''
SUBCLASS_CASES = {kind: case(SUBCLASS_CODE, kind=kind) for kind in ("liar_embedding", "liar_bag", "sparse_grad")}


@pytest.mark.parametrize("name", sorted(SUBCLASS_CASES))
def test_subclasses_cannot_vouch_for_themselves(batch, name):
    """An index-array subclass that answers ``np.may_share_memory`` itself ("no") is copied anyway
    (only exact ndarrays are asked), so refilling the caller's memory after the forward changes
    nothing; a ``SparseGrad`` subclass whose ``indices`` change between reads is refused by the step
    (TypeError). Found by review: both segfaulted."""
    verdict, _ = batch("subclasses", SUBCLASS_CASES, name)
    if name == "sparse_grad":
        assert verdict["res"]["raised"] == "TypeError", verdict["res"]
    else:
        assert_ok(verdict["res"], "backward after a subclass vouched for itself")
        assert verdict["changed_rows"] == [1, 2, 7]


# =================================================================================================
# 3. module.weight replaced
# =================================================================================================

SMALLER_CODE = '''
kind = ARGS["kind"]
if kind.startswith("embedding"):
    m = cembed.Embedding(1_000_000, 8, max_norm=1.0 if kind.endswith("max_norm") else None, seed=0)
    call = lambda: m(np.array([999_999]))
else:
    m = cembed.EmbeddingBag(1_000_000, 8, mode=kind[4:], seed=0)
    call = lambda: m(np.array([[3, 999_999]]))
m.weight = np.full((10, 8), 5.0, np.float32)
before = mod_fp(m)
res = attempt(call)
report(res=res, unchanged=before == mod_fp(m))
'''
SMALLER_CASES = {kind: case(SMALLER_CODE, kind=kind) for kind in ("embedding", "embedding_max_norm", "bag_sum", "bag_max")}


@pytest.mark.parametrize("name", sorted(SMALLER_CASES))
def test_weight_replaced_by_smaller_table_forward(batch, name):
    """Reproduction 3: forward checks indices against ``weight.shape[0]`` (the current weight), not
    a stored num_embeddings: after ``module.weight = np.ones((10, 8))`` an index 999_999 is an
    IndexError and nothing changes (the max_norm variant must not renormalise anything). On main
    Embedding reads (or renormalises) far outside the new table: segfault."""
    verdict, _ = batch("smaller", SMALLER_CASES, name)
    assert_raised(verdict["res"], "IndexError", what="forward past the end of the replaced weight")
    assert verdict["unchanged"], "a refused forward changed the weight"


LARGER_W = dyadic(np.random.default_rng(3), (20, 4))
LARGER_IDX = [[15, 3], [19, 15]]
LARGER_CODE = '''
kind = ARGS["kind"]
if kind == "embedding":
    m = cembed.Embedding(10, 4, sparse=ARGS["sparse"], seed=0)
else:
    m = cembed.EmbeddingBag(10, 4, mode=kind[4:], sparse=ARGS["sparse"], seed=0)
opt = optim.SGD([m], lr=0.5)
m.weight = np.array(ARGS["w"], dtype=np.float32)
fwd = attempt(lambda: m(np.array(ARGS["idx"])))
out = fwd.pop("value", None)
bwd = st = g = None
if fwd["raised"] is None:
    bwd = attempt(lambda: m.backward(np.ones(out.shape, np.float32) / 4))
    g = dense(m.grad)
    st = attempt(opt.step)
save_arrays(out=out, grad=g, weight=m.weight)
report(fwd=fwd, bwd=bwd, step=st)
'''
LARGER_CASES = {f"{kind}-{'sparse' if sparse else 'dense'}":
                case(LARGER_CODE, kind=kind, sparse=sparse, w=LARGER_W.tolist(), idx=LARGER_IDX)
                for kind in ("embedding", "bag_sum", "bag_mean") for sparse in (False, True)}


@pytest.mark.parametrize("name", sorted(LARGER_CASES))
def test_weight_replaced_by_larger_table_is_used(batch, name):
    """A vocabulary that grew: ``module.weight = bigger`` is legitimate (torch's forward reads
    ``self.weight``), so forward, backward and a plain SGD step work on the new table: rows past the
    old num_embeddings are looked up, get gradients of the new shape and are updated. On main
    Embedding's forward refuses row 15 with an IndexError (it checks the stored num_embeddings)."""
    kind = LARGER_CASES[name][1]["kind"]
    verdict, arrays = batch("larger", LARGER_CASES, name)
    assert_ok(verdict["fwd"], "forward on the grown table")
    assert_ok(verdict["bwd"], "backward on the grown table")
    assert_ok(verdict["step"], "SGD step on the grown table")
    idx, w = np.array(LARGER_IDX), LARGER_W
    if kind == "embedding":
        want_out = ref.embedding(idx, w)
        want_grad = ref.embedding_backward(np.ones(idx.shape + (4,), np.float32) / 4, idx, 20)
    else:
        want_out = ref.embedding_bag(idx, w, mode=kind[4:])
        want_grad = ref.embedding_bag_backward(np.ones((2, 4), np.float32) / 4, idx, w,
                                               mode=kind[4:])[0].astype(np.float32)
    np.testing.assert_allclose(arrays["out"], want_out, rtol=1e-6)
    np.testing.assert_allclose(arrays["grad"], want_grad, rtol=1e-6)
    np.testing.assert_allclose(arrays["weight"], w - np.float32(0.5) * want_grad, rtol=1e-6, atol=1e-7)


SHRUNK_CODE = '''
kind = ARGS["kind"]
if kind == "embedding":
    m = cembed.Embedding(1000, 4, seed=0)
    m(np.array([[3, 999]]))
    go = np.ones((1, 2, 4), np.float32)
else:
    _, mode, *rest = kind.split("_")
    m = cembed.EmbeddingBag(1000, 4, mode=mode, sparse=rest == ["sparse"], seed=0)
    m(np.array([[3, 999]]))
    go = np.ones((1, 4), np.float32)
m.weight = np.ones((10, 4), np.float32)
before = mod_fp(m)
res = attempt(lambda: m.backward(go))
report(res=res, unchanged=before == mod_fp(m))
'''
SHRUNK_CASES = {kind: case(SHRUNK_CODE, kind=kind)
                for kind in ("embedding", "bag_sum_dense", "bag_sum_sparse", "bag_mean_sparse", "bag_max")}


@pytest.mark.parametrize("name", sorted(SHRUNK_CASES))
def test_weight_shrunk_between_forward_and_backward(batch, name):
    """The weight is replaced by a smaller table after a forward that used row 999: backward of that
    forward cannot produce a gradient for the current weight, so it is refused (IndexError, or
    ValueError for the bag's saved state) with ``.grad`` unchanged — as torch, whose gradient for the
    old table cannot be accumulated into a parameter of another shape. On main the bag's saved rows
    (validated against the old table) and max-mode argmax are written into a 10-row gradient."""
    verdict, _ = batch("shrunk", SHRUNK_CASES, name)
    assert_raised(verdict["res"], "IndexError", "ValueError", what="backward of a forward past the new table")
    assert verdict["unchanged"], "a refused backward changed the weight or the gradient"


OLD_SHAPE_CODE = '''
a, b, opt = make(); train(a, b, opt)
b.weight = np.ones((ARGS["rows"], 4), np.float32)
for m, r in ((a, [1, 9]), (b, [0, ARGS["rows"] - 1])):
    m(np.array(r)); m.backward(np.ones((2, 4), np.float32))
before = (mod_fp(a, b), opt_fp(opt))
res = attempt(opt.step)
report(res=res, unchanged=before == (mod_fp(a, b), opt_fp(opt)))
'''
OLD_SHAPE_CASES = {f"{label}-{which}": case(TWO_PARAM_SETUP, OLD_SHAPE_CODE, which=which, rows=rows)
                   for label, rows in (("shrunk", 7), ("grown", 15)) for which in ("sgd", "adam", "adagrad")}


@pytest.mark.parametrize("name", sorted(OLD_SHAPE_CASES))
def test_step_refuses_state_of_old_weight_shape(batch, name):
    """After ``module.weight`` is replaced by a table with another number of rows, the optimizer's
    state (momentum buffer / exp_avg / sum) no longer matches: ``step`` re-checks it against the
    current weight and raises ValueError before touching anything — also parameter 0, whose state
    is fine (all parameters are validated before any update), as torch fails on the size mismatch.
    On main the kernels index the old-shaped state with the new rows."""
    verdict, _ = batch("old_shape", OLD_SHAPE_CASES, name)
    assert_raised(verdict["res"], "ValueError", what="step with state for another weight shape")
    assert verdict["unchanged"], "a refused step changed weights, grads or state"


OLD_DTYPE_CASES = {"adagrad": case('''
emb = cembed.Embedding(10, 4, sparse=True, seed=0)
opt = optim.Adagrad([emb], lr=0.1)
emb(np.array([1, 2])); emb.backward(np.ones((2, 4), np.float32)); opt.step(); opt.zero_grad()
emb.weight = emb.weight.astype(np.float64)
emb(np.array([1, 3])); emb.backward(np.ones((2, 4), np.float64))
before = (mod_fp(emb), opt_fp(opt))
res = attempt(opt.step)
report(res=res, unchanged=before == (mod_fp(emb), opt_fp(opt)))
''')}


def test_step_refuses_state_of_old_weight_dtype(batch):
    """The weight replaced by a float64 copy (and a float64 gradient): Adagrad's float32 ``sum`` no
    longer matches; ``step`` refuses (TypeError or ValueError) and changes nothing — the float32
    step counter included (torch also fails on the mismatched accumulator)."""
    verdict, _ = batch("old_dtype", OLD_DTYPE_CASES, "adagrad")
    assert_raised(verdict["res"], "TypeError", "ValueError", what="step with float32 state on a float64 weight")
    assert verdict["unchanged"], "a refused step changed weights, grads or state"


# =================================================================================================
# 4. SparseGrad
# =================================================================================================

SPARSE_EDITS = {
    "caller_rows_overwritten": "rows[1] = 10**9",
    "indices_item": "g.indices[1] = 10**9",
    "indices_fill": "g.indices[...] = -1",
    "indices_assign": "g.indices = np.array([1, 10**9])",
    "values_assign_short": "g.values = np.ones((1, 4), np.float32)",
    "values_item": "g.values[0, 0] = 1e30",
}
SPARSE_CODE = '''
emb = cembed.Embedding(10, 4, sparse=True, seed=0)
w0 = emb.weight.copy()
rows = np.array([1, 3])
vals = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], np.float32)
emb.grad = g = SparseGrad(rows, vals, 10)
def edit():
    EDIT
res = attempt(edit)
step = attempt(lambda: optim.SGD([emb], lr=0.5).step())
save_arrays(w0=w0, weight=emb.weight, indices=emb.grad.indices, values=emb.grad.values)
report(edit=res, step=step)
'''
SPARSE_CASES = {name: case(SPARSE_CODE.replace("EDIT", edit)) for name, edit in SPARSE_EDITS.items()}


@pytest.mark.parametrize("name", sorted(SPARSE_CASES))
def test_sparse_grad_is_private_and_read_only(batch, name):
    """Reproduction 4: ``SparseGrad(rows, values, 10)`` keeps a private copy of ``rows`` — the caller
    overwriting its array afterwards (with 10**9) changes nothing — and its arrays are read-only to
    callers: editing them in place or assigning new ones is refused (any exception: a read-only array
    raises ValueError, a read-only attribute AttributeError) or impossible. Either way SGD then
    updates rows 1 and 3 by the values the gradient was built with. On main the SparseGrad shares
    the caller's int64 array, checked only when built, and its arrays are plain writeable attributes:
    the out-of-range edits segfault the step."""
    verdict, arrays = batch("sparse_grad", SPARSE_CASES, name)
    if name != "caller_rows_overwritten":
        assert verdict["edit"]["raised"] is not None, "editing a SparseGrad's arrays was allowed"
    assert_ok(verdict["step"], "SGD step after the edit")
    vals = np.array([[1, 2, 3, 4], [-1, -2, -3, -4]], np.float32)
    np.testing.assert_array_equal(arrays["indices"], [1, 3])
    np.testing.assert_array_equal(arrays["values"], vals)
    want = arrays["w0"].copy()
    want[[1, 3]] -= np.float32(0.5) * vals
    np.testing.assert_array_equal(arrays["weight"], want)


UINT64_CASES = {"all": case('''
big = np.array([1, 2**63], dtype=np.uint64)
top = np.array([1, 2**64 - 1], dtype=np.uint64)
w = np.ones((10, 4), np.float32)
emb = cembed.Embedding(10, 4, sparse=True, seed=0)
bag = cembed.EmbeddingBag(10, 4, mode="sum", seed=0)
calls = {
    "SparseGrad": lambda ids: SparseGrad(ids, np.ones((2, 4), np.float32), 10),
    "Embedding.forward": lambda ids: emb(ids),
    "Embedding.backward": lambda ids: emb.backward(np.ones((2, 4), np.float32), indices=ids),
    "EmbeddingBag.forward": lambda ids: bag(ids[None]),
    "F.embedding": lambda ids: F.embedding(ids, w),
    "F.embedding_renorm_": lambda ids: F.embedding_renorm_(w, ids, 0.5),
    "F.embedding_backward": lambda ids: F.embedding_backward(np.ones((2, 4), np.float32), ids, 10),
    "F.coalesce": lambda ids: F.coalesce(ids, np.ones((2, 4), np.float32), 10),
    "F.embedding_bag": lambda ids: F.embedding_bag(ids, w, np.array([0, 1]), mode="sum"),
}
res = {}
for name, call in calls.items():
    for label, ids in (("2**63", big), ("2**64-1", top)):
        before = fp([w, emb.weight, emb.grad, bag.weight])
        r = attempt(lambda: call(ids))
        r.pop("value", None)
        r["unchanged"] = before == fp([w, emb.weight, emb.grad, bag.weight])
        res[f"{name}[{label}]"] = r
before = fp([w])
r = attempt(lambda: F.embedding_bag(np.array([1, 2, 3]), w, np.array([0, 2**63], np.uint64), mode="sum"))
r.pop("value", None)
r["unchanged"] = before == fp([w])
res["offsets"] = r
report(res=res)
''')}


def test_uint64_ids_beyond_int64_are_refused_everywhere(batch):
    """uint64 ids >= 2**63 (which wrap to negatives as int64) are an IndexError at every entry point
    that takes row ids (SparseGrad included); as offsets (not row ids) an IndexError or ValueError.
    Nothing changes."""
    verdict, _ = batch("uint64", UINT64_CASES, "all")
    bad = {k: v for k, v in verdict["res"].items()
           if v["raised"] not in (("IndexError", "ValueError") if k == "offsets" else ("IndexError",))
           or not v["unchanged"]}
    assert not bad, f"uint64 ids >= 2**63 not refused cleanly: {bad}"


# =================================================================================================
# 5. files: failed save, unreadable / foreign files
# =================================================================================================

SAVE_FAILURES = {
    # name: (statements run before the second save, must the save raise?)
    "lr_numpy_float32": ('opt.param_groups[0]["lr"] = np.float32(5e-4)', False),
    "lr_unserialisable_object": ('opt.param_groups[0]["lr"] = object()', True),
    "fsync_fails": ('def _boom(*a, **k):\n    raise OSError(28, "No space left on device (simulated)")\n'
                    'os.fsync = _boom', True),
    "rename_fails": ('def _boom(*a, **k):\n    raise OSError(5, "I/O error (simulated)")\n'
                     'os.replace = _boom\nos.rename = _boom', True),
}
SAVE_CODE = '''
emb = cembed.Embedding(10, 4, sparse=True, seed=0)
opt = optim.SGD([emb], lr=0.1, momentum=0.9)
emb(np.array([1, 2])); emb.backward(np.ones((2, 4), np.float32)); opt.step()
d = os.path.join(ARGS["tmp"], "ckpt")
os.mkdir(d)
p = os.path.join(d, "state.npz")
opt.save(p)
old = open(p, "rb").read()
SETUP
res = attempt(lambda: opt.save(p))
new = open(p, "rb").read()
loaded_lr = None
if res["raised"] is None:
    fresh = optim.SGD([cembed.Embedding(10, 4, sparse=True, seed=0)], lr=0.1, momentum=0.9)
    fresh.load(p)
    loaded_lr = fresh.param_groups[0]["lr"]
report(res=res, same_bytes=old == new, size_before=len(old), size_after=len(new),
       files=sorted(os.listdir(d)), loaded_lr=repr(loaded_lr), lr_type=type(loaded_lr).__name__)
'''
SAVE_CASES = {name: case(SAVE_CODE.replace("SETUP", setup)) for name, (setup, _) in SAVE_FAILURES.items()}


@pytest.mark.parametrize("name", sorted(SAVE_CASES))
def test_failed_save_keeps_the_previous_checkpoint(batch, name):
    """Reproduction 6: ``save`` writes a temporary sibling, fsyncs it and renames it over the target
    (``os.fsync`` / ``os.replace`` or ``os.rename``, looked up on the os module at call time). When it
    fails — a hyper-parameter that cannot be serialised, fsync or rename raising — the previous
    checkpoint keeps its exact bytes and no temporary file is left in the directory. An
    ``np.float32`` lr may instead be saved (then ``load`` restores lr == float32(5e-4) as a float).
    On main the file is opened with "wb" first: a failed save leaves it empty (0 bytes)."""
    verdict, _ = batch("save", SAVE_CASES, name)
    assert verdict["files"] == ["state.npz"], f"save left other files behind: {verdict['files']}"
    if SAVE_FAILURES[name][1] or verdict["res"]["raised"] is not None:
        assert verdict["res"]["raised"] is not None, "the simulated failure did not make save() fail"
        assert verdict["same_bytes"], (f"a failed save changed the previous checkpoint "
                                       f"({verdict['size_before']} -> {verdict['size_after']} bytes)")
    else:
        assert verdict["lr_type"] == "float" and float(verdict["loaded_lr"]) == float(np.float32(5e-4))


FOREIGN_FILES = {
    "empty": "open(p, 'wb').close()",
    "text": "open(p, 'w').write('lr = 0.1\\nmomentum = 0.9\\n')",
    "npz_without_metadata": "np.savez(p, weights=np.arange(3))",
    "npz_bad_metadata": "np.savez(p, __meta__=np.frombuffer(b'{not json', dtype=np.uint8))",
    "npz_metadata_not_a_dict": "np.savez(p, __meta__=np.frombuffer(b'[1, 2]', dtype=np.uint8))",
    "npy": "np.save(open(p, 'wb'), np.arange(3))",
    "truncated_checkpoint": "opt.save(p); data = open(p, 'rb').read(); open(p, 'wb').write(data[: len(data) // 2])",
    "pickled_object_array": "np.savez(p, __meta__=np.array([{'class': 'SGD'}], dtype=object))",
}
FOREIGN_CODE = '''
emb = cembed.Embedding(10, 4, sparse=True, seed=0)
opt = optim.SGD([emb], lr=0.1, momentum=0.9)
emb(np.array([1, 2])); emb.backward(np.ones((2, 4), np.float32)); opt.step()
p = os.path.join(ARGS["tmp"], "my_checkpoint_file.npz")
MAKE
before = (mod_fp(emb), opt_fp(opt))
res = attempt(lambda: opt.load(p))
report(res=res, unchanged=before == (mod_fp(emb), opt_fp(opt)))
'''
FOREIGN_CASES = {name: case(FOREIGN_CODE.replace("MAKE", make)) for name, make in FOREIGN_FILES.items()}


@pytest.mark.parametrize("name", sorted(FOREIGN_CASES))
def test_load_of_unreadable_or_foreign_file(batch, name):
    """``load`` of an empty, text, foreign or truncated file raises ValueError whose message names the
    file (its base name at least), and changes nothing. On main: EOFError, KeyError, TypeError,
    JSONDecodeError or BadZipFile, or a ValueError without the file name."""
    verdict, _ = batch("foreign", FOREIGN_CASES, name)
    assert_raised(verdict["res"], "ValueError", what=f"load of a {name} file")
    assert "my_checkpoint_file" in verdict["res"]["message"], f"message does not name the file: {verdict['res']}"
    assert verdict["unchanged"], "a refused load changed the optimizer"


# =================================================================================================
# 6. process and threads
# =================================================================================================

FORK_KERNELS = {
    "gather": "F.embedding(idx, w).sum(dtype=np.float64)",
    "sparse_backward": ("F.embedding_backward(np.ones((idx.size, 16), np.float32), idx, 1000, sparse=True)"
                        ".values.sum(dtype=np.float64)"),
}
FORK_CODE = '''
import time
cembed.set_num_threads(2)
w = (np.arange(16000, dtype=np.float32).reshape(1000, 16) % 7)
idx = np.arange(200_000, dtype=np.int64) % 1000
run = lambda: KERNEL
want = run()
pid = os.fork()
if pid == 0:
    try:
        os._exit(0 if run() == want else 3)
    except BaseException:
        os._exit(4)
deadline = time.time() + ARGS["child_timeout"]
status = None
while time.time() < deadline:
    done, st = os.waitpid(pid, os.WNOHANG)
    if done:
        status = st
        break
    time.sleep(0.02)
if status is None:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
report(child=None if status is None else os.waitstatus_to_exitcode(status), parent_ok=run() == want)
'''


@pytest.mark.parametrize("kernel", sorted(FORK_KERNELS))
def test_fork_after_parallel_kernel(tmp_path, kernel):
    """Reproduction 7: a process runs a kernel on 2 threads, then ``os.fork()``; the forked child
    runs the kernel again (same result) and exits 0 within 10 s; the parent still works afterwards.
    (Its own interpreter: the process must be the one that ran the first parallel region.) On main
    (GNU OpenMP) the child's first parallel region waits forever for the parent's thread pool."""
    verdict, _ = run_child(FORK_CODE.replace("KERNEL", FORK_KERNELS[kernel]), tmp_path=tmp_path, timeout=60,
                           child_timeout=10)
    assert verdict["child"] is not None, "the forked child hung in its first kernel (killed after 10 s)"
    assert verdict["child"] == 0, f"the forked child failed (exit code {verdict['child']})"
    assert verdict["parent_ok"]


THREADS_CASES = {str(n): case('''
cembed.set_num_threads(2)
res = attempt(lambda: cembed.set_num_threads(ARGS["n"]))
after = cembed.get_num_threads()
works = F.embedding(np.arange(100_000) % 100, np.ones((100, 4), np.float32)).shape == (100_000, 4)
report(res=res, after=after, works=works)
''', n=n) for n in (100000, 2**31, 10**12)}


@pytest.mark.parametrize("name", sorted(THREADS_CASES))
def test_set_num_threads_refuses_absurd_values(batch, name):
    """``set_num_threads(100000)`` is a ValueError (no OpenMP team of that size is ever requested)
    and leaves the thread count as it was. On main it is accepted."""
    verdict, _ = batch("threads", THREADS_CASES, name)
    assert_raised(verdict["res"], "ValueError", what=f"set_num_threads({name})")
    assert verdict["after"] == 2 and verdict["works"]


# =================================================================================================
# 7. weights with strides that are not multiples of the item size
# =================================================================================================

STRIDED_W = np.array([[3, 4], [0.5, -1], [6, 8], [-0.25, 0.75]], np.float32)
STRIDED_CALLS = {
    # name: (call in the child, expected value computed here from a contiguous copy)
    "F.embedding": ("F.embedding(np.array([[1, 3], [0, 3]]), vec)",
                    lambda w: ref.embedding(np.array([[1, 3], [0, 3]]), w)),
    "Embedding.from_pretrained": ("cembed.Embedding.from_pretrained(vec)(np.array([1, 3]))",
                                  lambda w: ref.embedding(np.array([1, 3]), w)),
    "F.embedding_bag_sum": ("F.embedding_bag(np.array([[1, 3], [2, 2]]), vec, mode='sum')",
                            lambda w: ref.embedding_bag(np.array([[1, 3], [2, 2]]), w, mode="sum")),
    "F.embedding_bag_mean": ("F.embedding_bag(np.array([1, 3, 2]), vec, np.array([0, 2]), mode='mean')",
                             lambda w: ref.embedding_bag(np.array([1, 3, 2]), w, np.array([0, 2]), mode="mean")),
    "F.embedding_bag_max": ("F.embedding_bag(np.array([[1, 3], [0, 2]]), vec, mode='max')",
                            lambda w: ref.embedding_bag(np.array([[1, 3], [0, 2]]), w, mode="max")),
    "F.embedding_renorm_": ("F.embedding_renorm_(vec, np.array([1, 3]), 1.0)",
                            lambda w: ref.embedding_renorm_(w.copy(), [1, 3], 1.0)),
    "bag_psw_backward": (
        "(lambda b: (b(np.array([[1, 3], [2, 0]]), per_sample_weights=np.array([[1, 2], [3, 4]], np.float32)),"
        " b.backward(np.ones((2, 2), np.float32)))[1])(cembed.EmbeddingBag.from_pretrained(vec, mode='sum'))",
        lambda w: ref.embedding_bag_backward(np.ones((2, 2), np.float32), np.array([[1, 3], [2, 0]]), w, mode="sum",
                                             per_sample_weights=np.array([[1, 2], [3, 4]], np.float32))[1]),
}
STRIDED_CODE = '''
rec = np.zeros(4, dtype=[("id", "i2"), ("vec", "f4", (2,))])
rec["id"] = [11, 22, 33, 44]
rec["vec"] = np.array(ARGS["w"], np.float32)
vec = rec["vec"]
before = rec.tobytes()
res = attempt(lambda: CALL)
value = res.pop("value", None)
save_arrays(value=None if value is None else np.asarray(value), vec=rec["vec"].copy(), ids=rec["id"].copy())
report(res=res, unchanged=before == rec.tobytes(), strides=list(vec.strides))
'''
STRIDED_CASES = {name: case(STRIDED_CODE.replace("CALL", call), w=STRIDED_W.tolist())
                 for name, (call, _) in STRIDED_CALLS.items()}


@pytest.mark.parametrize("name", sorted(STRIDED_CASES))
def test_weight_with_packed_row_stride(batch, name):
    """Reproduction 8: ``rec["vec"]`` of a packed record ``[("id", "i2"), ("vec", "f4", (2,))]`` has
    row stride 10 bytes, not a multiple of 4. Every call either gives exactly what NumPy gives on a
    contiguous copy (the renorm writes only the "vec" field: "id" stays intact), or is refused
    (ValueError / TypeError) with a message that says what is wrong with the layout (mentions
    "stride", "contiguous", "align" or "layout") and nothing changed. On main the kernels step
    rows by 10 // 4 floats: garbage."""
    verdict, arrays = batch("strided", STRIDED_CASES, name)
    assert verdict["strides"][0] % 4 != 0  # the scenario is what it claims to be
    res = verdict["res"]
    if res["raised"] is not None:
        assert res["raised"] in ("ValueError", "TypeError"), res
        assert any(word in res["message"].lower() for word in ("stride", "contiguous", "align", "layout")), res
        assert verdict["unchanged"]
        return
    np.testing.assert_array_equal(arrays["ids"], [11, 22, 33, 44])
    want = STRIDED_CALLS[name][1](STRIDED_W)
    if name == "F.embedding_renorm_":
        np.testing.assert_allclose(arrays["vec"], want, rtol=1e-6)
        return
    np.testing.assert_array_equal(arrays["vec"], STRIDED_W)
    np.testing.assert_allclose(arrays["value"], want, rtol=1e-6)


# =================================================================================================
# 8. review of 2026-11-26 (functional): subclassed / edited SparseGrads, saved ids, aliasing outputs
# =================================================================================================

REVIEW_CASES = {
    # a SparseGrad subclass whose shape property lies, left in .grad: the backward merges into it
    "subclass_in_grad": case('''
class Evil(SparseGrad):
    @property
    def shape(self):
        return (10, 3)
emb = cembed.Embedding(10, 3, sparse=True, seed=0)
out = emb(np.array([1]))
emb.grad = Evil([1], np.zeros((1, 4_000_000), np.float32), 10)
before = fp([emb.weight])
r = attempt(lambda: emb.backward(np.ones_like(out)))
report(r=r, unchanged=before == fp([emb.weight]), still_evil=type(emb.grad).__name__)
'''),
    # merge / + with a subclass on either side
    "subclass_merge": case('''
class Evil(SparseGrad):
    @property
    def shape(self):
        return (10, 4_000_000)
a = SparseGrad([1], np.zeros((1, 4_000_000), np.float32), 10)
b = Evil([1], np.zeros((1, 3), np.float32), 10)
report(ab=attempt(lambda: (a + b).nnz), ba=attempt(lambda: b.merge(a).nnz))
'''),
    # a SparseGrad's slots reassigned (private attribute) before a step
    "sparse_grad_slots": case('''
n = 200_000
emb = cembed.Embedding(n, 4, sparse=True, seed=0)
g = SparseGrad(np.arange(n), np.zeros((n, 4), np.float32), n)
set_values = attempt(lambda: setattr(g, "_values", np.zeros((1, 4), np.float32)))
del_rows = attempt(lambda: delattr(g, "_indices"))
writeable = attempt(lambda: setattr(g.indices.flags, "writeable", True))
emb.grad = g
step = attempt(lambda: optim.SGD([emb], lr=0.1).step())
report(set_values=set_values, del_rows=del_rows, writeable=writeable, step=step)
'''),
    # the ids (and offsets) a forward keeps for its backward, made writeable again through the flag
    "saved_ids_flag": case('''
emb = cembed.Embedding(10, 3, seed=0)
out = emb([1, 2])
lookup = attempt(lambda: setattr(emb._saved.flat.flags, "writeable", True))
bag = cembed.EmbeddingBag(10, 3, mode="sum", seed=0)
bag([1, 2, 3], offsets=[0, 1])
bag_ids = attempt(lambda: setattr(bag._saved.flat.flags, "writeable", True))
bag_offsets = attempt(lambda: setattr(bag._saved.offsets.flags, "writeable", True))
report(lookup=lookup, bag_ids=bag_ids, bag_offsets=bag_offsets,
       backward=attempt(lambda: emb.backward(np.ones_like(out))))
'''),
}


@pytest.mark.parametrize("name", sorted(REVIEW_CASES))
def test_review_functional_holes(batch, name):
    """Each of these segfaulted (or read past an array) before the fix:

    * ``subclass_in_grad``: a ``SparseGrad`` subclass left in ``.grad`` is refused by the backward
      (TypeError, weight unchanged), as ``step()`` refuses it — before, the merge trusted its
      ``shape`` and read 4M floats per row of a 3-wide gradient.
    * ``subclass_merge``: ``merge`` / ``+`` refuse a subclass on either side (TypeError).
    * ``sparse_grad_slots``: a ``SparseGrad`` is immutable (its slots cannot be set or deleted) and
      its row ids live in memory that cannot be made writeable; the step then runs normally.
    * ``saved_ids_flag``: the ids and offsets a forward keeps (also a fresh conversion of a list)
      are read-only from birth: setting their ``writeable`` flag is refused."""
    verdict, _ = batch("review_functional", REVIEW_CASES, name)
    if name == "subclass_in_grad":
        assert verdict["r"]["raised"] == "TypeError" and verdict["unchanged"], verdict
    elif name == "subclass_merge":
        assert verdict["ab"]["raised"] == "TypeError" and verdict["ba"]["raised"] == "TypeError", verdict
    elif name == "sparse_grad_slots":
        assert verdict["set_values"]["raised"] == "AttributeError", verdict
        assert verdict["del_rows"]["raised"] == "AttributeError", verdict
        assert verdict["writeable"]["raised"] == "ValueError", verdict
        assert_ok(verdict["step"], "step with an untouched SparseGrad")
    else:
        for key in ("lookup", "bag_ids", "bag_offsets"):
            assert verdict[key]["raised"] == "ValueError", (key, verdict)
        assert_ok(verdict["backward"], "backward")


SESSION17_CASES = {
    # SparseAdamW's decay clock set by hand to a float subclass: its __float__ ran inside the update,
    # after the checks, and could swap exp_avg for a 1-row array (segfault) or raise mid-step
    "adamw_clock_subclass": case('''
n = 4_000_000
emb = cembed.Embedding(n, 4, sparse=True, seed=0)
opt = optim.SparseAdamW([emb], lr=0.01)
emb.grad = SparseGrad([1], np.ones((1, 4), np.float32), n); opt.step()
calls = []
class Evil(float):
    def __float__(self):
        calls.append(1)
        if len(calls) == 2:
            opt.state[emb]["exp_avg"] = np.zeros((1, 4), np.float32)
        return 0.0
opt.state[emb]["decay_log"] = Evil(0.0)
before = fp([emb.weight])
emb.grad = SparseGrad([n - 1], np.ones((1, 4), np.float32), n)
step = attempt(lambda: opt.step())
emb.grad = None
out = emb(np.array([n - 1]))
fused = attempt(lambda: emb.backward(np.ones_like(out), optimizer=opt))
report(step=step, fused=fused, unchanged=before == fp([emb.weight]), state_step=int(opt.state[emb]["step"]))
'''),
    # a parameter's state (or the optimizer's whole state) replaced by a dict subclass whose __getitem__
    # answered the checks with the real arrays, then gave the update a 1-row array (segfault)
    "state_dict_subclass": case('''
n = 4_000_000
emb = cembed.Embedding(n, 4, sparse=True, seed=0)
opt = optim.Adagrad([emb], lr=0.1)
small = np.zeros((1, 4), np.float32)
class Sneaky(dict):
    armed = False
    def __getitem__(self, key):
        if key == "sum" and Sneaky.armed:
            return small
        return dict.__getitem__(self, key)
    def __setitem__(self, key, value):
        dict.__setitem__(self, key, value)
        if key == "step":
            Sneaky.armed = True
opt.state[emb] = Sneaky(opt.state[emb])
before = fp([emb.weight])
emb.grad = SparseGrad([n - 1], np.ones((1, 4), np.float32), n)
entry = attempt(lambda: opt.step())
opt.state[emb] = dict(opt.state[emb])
class SneakyState(dict):
    pass
opt.state = SneakyState(opt.state)
whole = attempt(lambda: opt.step())
report(entry=entry, whole=whole, unchanged=before == fp([emb.weight]))
'''),
}


@pytest.mark.parametrize("name", sorted(SESSION17_CASES))
def test_kept_scalars_and_state_containers_are_exact_types(batch, name):
    """Found by a review under AddressSanitizer (both segfaulted a normal build): SparseAdamW's clock
    scalars must be exactly a Python or NumPy float or int, and an optimizer's state (the whole and
    each parameter's) exactly a dict — refused before anything changes, by ``step()`` and by the
    fused backward."""
    verdict, _ = batch("session17", SESSION17_CASES, name)
    if name == "adamw_clock_subclass":
        assert verdict["step"]["raised"] == "ValueError" and verdict["fused"]["raised"] == "ValueError", verdict
        assert verdict["unchanged"] and verdict["state_step"] == 1, verdict
    else:
        assert verdict["entry"]["raised"] == "ValueError" and verdict["whole"]["raised"] == "TypeError", verdict
        assert verdict["unchanged"], verdict


# =================================================================================================
# array subclasses: their hooks never size what a kernel reads
# =================================================================================================

COPY_HOOK_PRELUDE = '''
class Evil(np.ndarray):
    """Answers NumPy's copies of its rows with two rows (its own __getitem__ and np.take)."""
    def __getitem__(self, key):
        out = np.ndarray.__getitem__(np.ndarray.view(self, np.ndarray), key)
        return out[:2].copy() if isinstance(key, np.ndarray) else out
    def __array_function__(self, func, types, args, kwargs):
        if func is np.take:
            return np.zeros((2,) + self.shape[1:], self.dtype)
        return super().__array_function__(func, types, args, kwargs)
rng = np.random.default_rng(0)
n, dim = 3000, 16
values = rng.standard_normal((n, dim)).astype(np.float32)
idx = rng.permutation(n)[:2000]
def evil_table():   # Fortran order: a layout the kernels copy rows from
    return np.asfortranarray(values.copy()).view(Evil)
def plain_table():
    return np.asfortranarray(values.copy())
q = rng.standard_normal((idx.size, dim)).astype(np.float32)
'''

COPY_HOOK_CASES = {
    "lookup_max_norm": case(COPY_HOOK_PRELUDE, '''
        a, b = evil_table(), plain_table()
        report(same=fp([F.embedding(idx, a, max_norm=0.5), a.view(np.ndarray)]) == fp([F.embedding(idx, b, max_norm=0.5), b]))
    '''),
    "renorm_": case(COPY_HOOK_PRELUDE, '''
        a, b = evil_table(), plain_table()
        F.embedding_renorm_(a, idx, 0.5); F.embedding_renorm_(b, idx, 0.5)
        report(same=fp([a.view(np.ndarray)]) == fp([b]))
    '''),
    "dot": case(COPY_HOOK_PRELUDE, '''
        report(same=fp([F.embedding_dot(q, idx[:, None], evil_table())]) == fp([F.embedding_dot(q, idx[:, None], plain_table())]))
    '''),
    "dot_logistic_sgd_": case(COPY_HOOK_PRELUDE, '''
        a, b = evil_table(), plain_table()
        F.embedding_dot_logistic_sgd_(q, idx[:, None], a, lr=0.1); F.embedding_dot_logistic_sgd_(q, idx[:, None], b, lr=0.1)
        report(same=fp([a.view(np.ndarray)]) == fp([b]))
    '''),
    "bag": case(COPY_HOOK_PRELUDE, '''
        offsets = np.arange(0, idx.size, 4)
        report(same=fp([F.embedding_bag(idx, evil_table(), offsets)]) == fp([F.embedding_bag(idx, plain_table(), offsets)]))
    '''),
    "arguments": case(COPY_HOOK_PRELUDE, '''
        # a gradient, per-sample weights, offsets, indices and queries of that class: used as plain arrays
        table = np.ascontiguousarray(values)
        offsets = np.arange(0, idx.size, 4)
        psw = rng.random(idx.size).astype(np.float32)
        g = rng.standard_normal((idx.size // 4, dim)).astype(np.float32)
        results = []
        for wrap in (lambda x: x.view(Evil), lambda x: x):
            bag = cembed.EmbeddingBag.from_pretrained(table.copy(), freeze=False, sparse=True, mode="sum")
            opt = optim.SGD([bag], lr=0.1)
            out = bag(wrap(idx), wrap(offsets), per_sample_weights=wrap(psw))
            bag.backward(wrap(g), optimizer=opt)
            results.append(fp([out, bag.weight, F.embedding_dot(wrap(q), wrap(idx[:, None]), table)]))
        report(same=results[0] == results[1])
    '''),
}


@pytest.mark.parametrize("name", sorted(COPY_HOOK_CASES))
def test_array_subclass_hooks_never_size_what_a_kernel_reads(batch, name):
    """Found by a review under AddressSanitizer: a table of an ndarray subclass in a layout the kernels
    copy rows from (Fortran order) was copied through the subclass's own ``__getitem__`` / ``np.take``,
    and the kernel indexed that copy with every position asked for — a 2-row answer to 2,000 rows read
    and wrote out of bounds (renorm segfaulted; scoring read garbage; the logistic update hung). Every
    array argument is now used as a plain ndarray view of its memory (``_validation.plain_array``):
    the same results, bit for bit, as for the plain array."""
    verdict, _ = batch("subclass_hooks", COPY_HOOK_CASES, name)
    assert verdict["same"], verdict


# =================================================================================================
# another Python thread replacing the weight or the state between a check and a kernel
# =================================================================================================

THREAD_CASES = {
    # A profile hook hands over to the other thread at one bytecode boundary just after the check, and
    # waits for it: an interleaving the interpreter's scheduler can produce on its own (the kernels
    # release the GIL; Python code switches threads between bytecodes).
    "weight_swap_in_backward": case('''
        import threading
        emb = cembed.Embedding.from_pretrained(np.zeros((200_000, 16), np.float32), freeze=False)   # dense .grad
        idx = np.array([199_999, 150_000, 100_000])
        go, done = threading.Event(), threading.Event()
        def other():
            go.wait()
            emb.weight = np.zeros((10, 16), np.float32)   # ordinary use: a new vocabulary
            done.set()
        threading.Thread(target=other, daemon=True).start()
        def hook(frame, event, arg):
            if event == "c_call" and frame.f_code.co_name == "_accumulate" and arg is isinstance and not go.is_set():
                go.set(); done.wait()
        sys.setprofile(hook)
        res = attempt(lambda: emb.backward(np.ones((3, 16), np.float32), idx))
        sys.setprofile(None)
        report(res=res, swapped=go.is_set(), grad_shape=list(getattr(emb.grad, "shape", ())),
               grad_rows=sorted(np.flatnonzero(emb.grad.any(axis=1)).tolist()) if emb.grad is not None else [])
    '''),
    "kernel_guards": case('''
        # what another thread could hand a kernel between a step's check and its call: each refused
        from cembed import _optim
        w = np.zeros((10, 4), np.float32)
        calls = {
            "decay_short_log": lambda: _optim.adamw_decay_rows(w, np.zeros(3), np.array([9]), 0.0, 0.0, 1.0, 1),
            "decay_row_out_of_range": lambda: _optim.adamw_decay_rows(w, np.ones(10), np.array([10**9]), 0.0, 0.0, 1.0, 1),
            "momentum_row_out_of_range": lambda: _optim.sgd_momentum_rows(
                w, np.zeros((10, 4), np.float32), np.array([10**9]), np.array([0]), np.ones((1, 4), np.float32),
                0.1, 0.9, 0.0, False, False, False, 1),
            "momentum_short_buffer": lambda: _optim.sgd_momentum_rows(
                w, np.zeros((3, 4), np.float32), np.array([9]), np.array([0]), np.ones((1, 4), np.float32),
                0.1, 0.9, 0.0, False, False, False, 1),
            "momentum_slot_out_of_range": lambda: _optim.sgd_momentum_rows(
                w, np.zeros((10, 4), np.float32), np.array([9]), np.array([5]), np.ones((1, 4), np.float32),
                0.1, 0.9, 0.0, False, False, False, 1),
        }
        report(swapped=True, res={name: attempt(call) for name, call in calls.items()}, unchanged=not w.any())
    '''),
    "state_swap_in_step": case('''
        import threading
        emb = cembed.Embedding.from_pretrained(np.zeros((200_000, 16), np.float32), freeze=False, sparse=True)
        opt = optim.SparseAdam([emb], lr=0.1)
        emb.backward(np.ones((1, 16), np.float32), np.array([0])); opt.step(); opt.zero_grad()
        small = cembed.Embedding.from_pretrained(np.zeros((10, 16), np.float32), freeze=False, sparse=True)
        small_opt = optim.SparseAdam([small], lr=0.1)
        small.backward(np.ones((1, 16), np.float32), np.array([0])); small_opt.step()
        small_state = small_opt.state_dict()
        go, done = threading.Event(), threading.Event()
        def other():
            go.wait()
            emb.weight = np.zeros((10, 16), np.float32)
            opt.load_state_dict(small_state)   # two ordinary calls, between the step's check and its kernel
            done.set()
        threading.Thread(target=other, daemon=True).start()
        emb.backward(np.ones((3, 16), np.float32), np.array([199_999, 150_000, 100_000]))
        def hook(frame, event, arg):
            if event == "call" and frame.f_code.co_name == "_reserve_step_state" and not go.is_set():
                go.set(); done.wait()
        sys.setprofile(hook)
        res = attempt(lambda: opt.step())
        sys.setprofile(None)
        report(res=res, swapped=go.is_set())
    '''),
}


@pytest.mark.parametrize("name", sorted(THREAD_CASES))
def test_another_thread_replacing_weight_or_state_mid_call_never_reaches_a_kernel(batch, name):
    """Found by a review of use from several threads (under AddressSanitizer): a backward that had
    checked its rows against a 200,000-row weight sized the new dense gradient by the module's weight
    as it was *then* — another thread had assigned a 10-row one — and scattered rows up to 199,999 into
    it; a step that had checked its state re-read the state dict afterwards and handed the kernel a
    10-row state loaded meanwhile. Both segfaulted. The backward now sizes everything by the weight
    it checked (the gradient has that table's shape; the optimizer refuses it against the new one),
    and every update kernel checks, with the GIL held in the call that uses them, that the state
    arrays it is given have the weight's shape (a ValueError otherwise)."""
    verdict, _ = batch("thread_swaps", THREAD_CASES, name)
    assert verdict["swapped"], "the other thread did not run: the case tests nothing"
    if name == "kernel_guards":
        for call, res in verdict["res"].items():
            assert_raised(res, "ValueError", what=call)
        assert verdict["unchanged"], verdict
    elif name == "weight_swap_in_backward":
        assert_ok(verdict["res"], "a backward whose module got a new weight meanwhile")
        assert verdict["grad_shape"] == [200_000, 16] and verdict["grad_rows"] == [100_000, 150_000, 199_999], verdict
    else:
        assert_raised(verdict["res"], "ValueError", what="a step whose state was replaced after its check")
        assert "the optimizer state does not have the weight's shape" in verdict["res"]["message"], verdict
