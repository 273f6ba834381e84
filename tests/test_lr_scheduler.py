"""cembed.optim.lr_scheduler against torch.optim.lr_scheduler (torch 2.13).

Every schedule runs on several param groups with different learning rates (and momentum / betas)
for hundreds of steps; the learning rates (and the momentum or beta1 OneCycleLR writes) are compared
with torch's bitwise: both evaluate the same float64 expressions in the same order. Most tests use a
stand-in optimizer (param_groups, defaults, step); a few run cembed's real SGD / SparseAdam.
"""
import copy
import doctest
import math
import pickle
import warnings

import numpy as np
import pytest

import cembed
import cembed.optim.lr_scheduler as lr_scheduler
from cembed import functional as F

from util import assert_bitwise_equal, require_torch

MOMENTUM_GROUPS = [dict(lr=0.1, momentum=0.9), dict(lr=0.03, momentum=0.5), dict(lr=1.7e-3, momentum=0.0)]
BETAS_GROUPS = [dict(lr=0.1, betas=(0.9, 0.999)), dict(lr=0.02, betas=(0.8, 0.99)),
                dict(lr=3e-4, betas=(0.5, 0.9))]


class StandIn:
    """A minimal optimizer: param_groups, defaults, step(), add_param_group()."""

    def __init__(self, groups, **defaults):
        self.param_groups = [dict(g) for g in groups]
        self.defaults = defaults
        self.n_steps = 0

    def step(self, closure=None):
        self.n_steps += 1
        return None if closure is None else closure()

    def add_param_group(self, group):
        self.param_groups.append({**self.defaults, **{k: v for k, v in group.items() if k != "params"}})


def make_standin(kind="momentum"):
    if kind == "momentum":
        return StandIn(MOMENTUM_GROUPS, lr=1e-3, momentum=0.0)
    return StandIn(BETAS_GROUPS, lr=1e-3, betas=(0.9, 0.999))


def make_torch_opt(torch, kind="momentum"):
    groups = MOMENTUM_GROUPS if kind == "momentum" else BETAS_GROUPS
    params = [dict(g, params=[torch.nn.Parameter(torch.zeros(2))]) for g in groups]
    if kind == "momentum":
        return torch.optim.SGD(params, lr=1e-3)
    return torch.optim.Adam(params, lr=1e-3)


def snapshot(opt):
    """lr, momentum and beta1 of every group (nan where absent), as float64."""
    row = []
    for g in opt.param_groups:
        row.append(float(g["lr"]))
        row.append(float(g.get("momentum", math.nan)))
        row.append(float(g["betas"][0]) if "betas" in g else math.nan)
    return row


def as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def run(mod, opt, factory, n_steps, metrics=None, start=0, scheds=None):
    """Step ``factory(mod, opt)`` (one scheduler or a list, stepped in order) ``n_steps`` times
    after optimizer steps; the trace of snapshot + get_last_lr after each step (and before the
    first)."""
    scheds = as_list(factory(mod, opt)) if scheds is None else scheds
    trace = [snapshot(opt) + [float(x) for x in scheds[-1].get_last_lr()]]
    for k in range(start, start + n_steps):
        opt.step()
        for s in scheds:
            if metrics is not None:
                s.step(metrics[k])
            else:
                s.step()
        trace.append(snapshot(opt) + [float(x) for x in scheds[-1].get_last_lr()])
    return np.array(trace, dtype=np.float64), scheds


def torch_trace(kind, factory, n_steps, metrics=None):
    torch = require_torch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trace, _ = run(torch.optim.lr_scheduler, make_torch_opt(torch, kind), factory, n_steps, metrics)
    return trace


def assert_same_trace(ours, theirs):
    assert ours.shape == theirs.shape
    # nan marks "no such key" in both; compare bitwise (nan payloads are the same float('nan'))
    assert_bitwise_equal(ours, theirs)


class Halver:
    """A callable object: its __dict__ is saved by the lambda schedulers' state_dict."""

    def __init__(self, every):
        self.every = every

    def __call__(self, epoch):
        return 0.5 ** (epoch // self.every)


RNG_METRICS = np.random.default_rng(7)
NOISY_LOSS = [float(x) for x in 1.0 / (1 + 0.02 * np.arange(400)) + 0.05 * RNG_METRICS.standard_normal(400)]
PLATEAU_LOSS = [float(x) for x in np.repeat([5.0, 4.0, 4.0, 3.9999, 3.0, 3.0, 2.0], 60)[:400]]

# id -> (optimizer kind, factory(mod, opt), n_steps, metrics)
CASES = {
    "LambdaLR-one": ("momentum", lambda m, o: m.LambdaLR(o, lambda e: 0.97 ** e), 300, None),
    "LambdaLR-per-group": ("momentum", lambda m, o: m.LambdaLR(
        o, [lambda e: 1 / (1 + e), lambda e: math.cos(e / 50), Halver(40)]), 300, None),
    "MultiplicativeLR-one": ("momentum", lambda m, o: m.MultiplicativeLR(o, lambda e: 0.99), 300, None),
    "MultiplicativeLR-per-group": ("momentum", lambda m, o: m.MultiplicativeLR(
        o, (lambda e: 0.99, lambda e: 1.0 if e % 7 else 0.9, lambda e: 1.001)), 300, None),
    "StepLR": ("momentum", lambda m, o: m.StepLR(o, step_size=30, gamma=0.7), 300, None),
    "StepLR-every-step": ("momentum", lambda m, o: m.StepLR(o, 1, gamma=0.97), 300, None),
    "StepLR-default-gamma": ("momentum", lambda m, o: m.StepLR(o, 45), 300, None),
    "MultiStepLR": ("momentum", lambda m, o: m.MultiStepLR(o, milestones=[250, 30, 80, 80, 150], gamma=0.3),
                    300, None),
    "ExponentialLR": ("momentum", lambda m, o: m.ExponentialLR(o, gamma=0.99), 400, None),
    "CosineAnnealingLR-restarts": ("momentum", lambda m, o: m.CosineAnnealingLR(o, T_max=60, eta_min=1e-4),
                                   400, None),
    "CosineAnnealingLR-one-period": ("momentum", lambda m, o: m.CosineAnnealingLR(o, 300), 300, None),
    "LinearLR-warmup": ("momentum", lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=100), 300, None),
    "LinearLR-decay": ("momentum", lambda m, o: m.LinearLR(o, 1.0, 0.05, 250), 300, None),
    "LinearLR-defaults": ("momentum", lambda m, o: m.LinearLR(o), 200, None),
    "ConstantLR": ("momentum", lambda m, o: m.ConstantLR(o, factor=0.25, total_iters=40), 200, None),
    "ConstantLR-defaults": ("momentum", lambda m, o: m.ConstantLR(o), 200, None),
    "OneCycleLR-momentum-cos": ("momentum", lambda m, o: m.OneCycleLR(o, max_lr=[1.0, 0.3, 0.01],
                                                                      total_steps=300), 300, None),
    "OneCycleLR-betas-linear-3phase": ("betas", lambda m, o: m.OneCycleLR(
        o, max_lr=0.5, epochs=6, steps_per_epoch=50, anneal_strategy="linear", three_phase=True,
        max_momentum=[0.95, 0.9, 0.99], base_momentum=(0.8, 0.85, 0.7)), 300, None),
    "OneCycleLR-betas-cos-3phase": ("betas", lambda m, o: m.OneCycleLR(
        o, max_lr=[0.5, 0.1, 2.0], total_steps=257, pct_start=0.4, three_phase=True, div_factor=10.0,
        final_div_factor=100.0), 257, None),
    "OneCycleLR-no-momentum": ("momentum", lambda m, o: m.OneCycleLR(
        o, max_lr=0.2, total_steps=333, pct_start=0.05, cycle_momentum=False, anneal_strategy="linear"),
        333, None),
    "SequentialLR-warmup-cosine": ("momentum", lambda m, o: m.SequentialLR(
        o, [m.LinearLR(o, start_factor=0.01, total_iters=20), m.CosineAnnealingLR(o, T_max=200, eta_min=1e-5)],
        milestones=[20]), 300, None),
    "SequentialLR-four": ("momentum", lambda m, o: m.SequentialLR(
        o, [m.ConstantLR(o, factor=0.5, total_iters=5), m.LambdaLR(o, lambda e: 0.9 ** e),
            m.ExponentialLR(o, gamma=0.98), m.MultiStepLR(o, [10, 40], gamma=0.5)],
        milestones=[10, 50, 120]), 300, None),
    "SequentialLR-multiplicative-step": ("momentum", lambda m, o: m.SequentialLR(
        o, [m.MultiplicativeLR(o, lambda e: 0.95), m.StepLR(o, 25, 0.5)], milestones=[60]), 300, None),
    "ReduceLROnPlateau-min-rel": ("momentum", lambda m, o: m.ReduceLROnPlateau(o, patience=5, factor=0.5),
                                  400, NOISY_LOSS),
    "ReduceLROnPlateau-min-abs-cooldown": ("momentum", lambda m, o: m.ReduceLROnPlateau(
        o, "min", factor=0.3, patience=3, threshold=1e-3, threshold_mode="abs", cooldown=7,
        min_lr=[1e-3, 1e-4, 1e-5]), 400, PLATEAU_LOSS),
    "ReduceLROnPlateau-max-rel": ("betas", lambda m, o: m.ReduceLROnPlateau(
        o, mode="max", patience=2, threshold=0.01, min_lr=1e-4), 400, [-x for x in NOISY_LOSS]),
    "ReduceLROnPlateau-max-abs-eps": ("betas", lambda m, o: m.ReduceLROnPlateau(
        o, mode="max", factor=0.9, patience=0, threshold_mode="abs", eps=1e-3), 400,
        [-x for x in PLATEAU_LOSS]),
    "PolynomialLR": ("momentum", lambda m, o: m.PolynomialLR(o, total_iters=120, power=2.0), 300, None),
    "PolynomialLR-defaults": ("momentum", lambda m, o: m.PolynomialLR(o), 200, None),
    "PolynomialLR-root": ("betas", lambda m, o: m.PolynomialLR(o, total_iters=250, power=0.5), 300, None),
    "ChainedScheduler-constant-exponential": ("momentum", lambda m, o: m.ChainedScheduler(
        [m.ConstantLR(o, 0.1, 20), m.ExponentialLR(o, 0.99)]), 300, None),
    "ChainedScheduler-linear-cosine": ("betas", lambda m, o: m.ChainedScheduler(
        [m.LinearLR(o, 0.1, total_iters=30), m.CosineAnnealingLR(o, 80, eta_min=1e-5), m.StepLR(o, 50, 0.5)],
        optimizer=o), 300, None),
    "CosineAnnealingWarmRestarts-mult2": ("momentum", lambda m, o: m.CosineAnnealingWarmRestarts(
        o, T_0=10, T_mult=2, eta_min=1e-4), 400, None),
    "CosineAnnealingWarmRestarts-mult1": ("momentum", lambda m, o: m.CosineAnnealingWarmRestarts(o, 37), 300, None),
    "CyclicLR-triangular-momentum": ("momentum", lambda m, o: m.CyclicLR(
        o, base_lr=[0.01, 0.001, 1e-4], max_lr=0.1, step_size_up=20), 300, None),
    "CyclicLR-triangular2-betas": ("betas", lambda m, o: m.CyclicLR(
        o, 1e-3, [0.1, 0.05, 0.2], step_size_up=15, step_size_down=35, mode="triangular2",
        base_momentum=[0.8, 0.85, 0.7], max_momentum=0.95), 300, None),
    "CyclicLR-exp-range": ("momentum", lambda m, o: m.CyclicLR(
        o, 0.001, 0.1, step_size_up=25, mode="exp_range", gamma=0.995), 300, None),
    "CyclicLR-scale-fn-no-momentum": ("momentum", lambda m, o: m.CyclicLR(
        o, 0.001, 0.1, 10, scale_fn=Halver(40), scale_mode="iterations", cycle_momentum=False), 300, None),
    "CyclicLR-fractional-halves": ("betas", lambda m, o: m.CyclicLR(
        o, [1e-4, 1e-3, 1e-2], 0.5, step_size_up=7.5, step_size_down=12.5, scale_fn=lambda c: 0.9 ** c),
        300, None),
    "chain-exponential-multistep": ("momentum", lambda m, o: [m.ExponentialLR(o, 0.99),
                                                              m.MultiStepLR(o, [50, 100], 0.5)], 300, None),
    "chain-linear-step": ("momentum", lambda m, o: [m.LinearLR(o, 0.2, total_iters=30), m.StepLR(o, 40, 0.5)],
                          300, None),
    "chain-constant-cosine": ("betas", lambda m, o: [m.ConstantLR(o, 0.1, 20), m.CosineAnnealingLR(o, 100)],
                              300, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case):
    kind, factory, n_steps, metrics = CASES[case]
    theirs = torch_trace(kind, factory, n_steps, metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the right call order raises no warning
        ours, scheds = run(lr_scheduler, make_standin(kind), factory, n_steps, metrics)
    assert_same_trace(ours, theirs)
    last = scheds[-1]
    if isinstance(last, lr_scheduler.ChainedScheduler):   # (no epoch of its own, as in torch)
        last = last._schedulers[-1]
    assert last.last_epoch == n_steps


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("k", [1, 37, 150])
def test_state_dict_round_trip(case, k):
    """Save at step k (pickled), rebuild optimizer + schedulers, load, continue: the same trace as
    an uninterrupted run."""
    kind, factory, n_steps, metrics = CASES[case]
    full, _ = run(lr_scheduler, make_standin(kind), factory, n_steps, metrics)

    opt = make_standin(kind)
    head, scheds = run(lr_scheduler, opt, factory, k, metrics)
    saved = pickle.dumps(([s.state_dict() for s in scheds], copy.deepcopy(opt.param_groups)))

    opt2 = make_standin(kind)
    scheds2 = as_list(factory(lr_scheduler, opt2))       # schedulers first, then the optimizer state
    sched_states, groups = pickle.loads(saved)
    opt2.param_groups = groups
    for s, sd in zip(scheds2, sched_states):
        s.load_state_dict(sd)
    tail, _ = run(lr_scheduler, opt2, None, n_steps - k, metrics, start=k, scheds=scheds2)
    assert_bitwise_equal(np.concatenate([head, tail[1:]]), full)


def test_state_dict_is_a_copy_and_skips_the_optimizer():
    opt = make_standin()
    sched = lr_scheduler.StepLR(opt, 3)
    sd = sched.state_dict()
    assert "optimizer" not in sd
    assert sd["base_lrs"] == [0.1, 0.03, 1.7e-3] and sd["last_epoch"] == 0
    sd["base_lrs"][0] = 0.5
    assert sched.base_lrs == [0.1, 0.03, 1.7e-3]
    sched.load_state_dict(sd)
    sd["base_lrs"][0] = 2.0
    assert sched.base_lrs == [0.5, 0.03, 1.7e-3]


@pytest.mark.parametrize("opt_class,key", [("SGD", "momentum"), ("SparseAdam", "betas")])
def test_a_refused_one_cycle_step_changes_no_group_momentum(opt_class, key):
    """A group added after the scheduler has no cycle (KeyError at it): the groups before it kept the
    refused step's cycled momentum / beta1."""
    make = getattr(cembed.optim, opt_class)
    options = {"momentum": 0.9} if opt_class == "SGD" else {}
    opt = make([cembed.Embedding(10, 4, sparse=True)], lr=0.1, **options)
    sched = lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    opt.add_param_group({"params": [cembed.Embedding(10, 4, sparse=True)]})
    before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(KeyError):
        sched.step()
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == before
    assert before[0][key] != before[1][key]   # (group 0's was cycled by the constructor: a real change)


def test_a_refused_plateau_step_changes_nothing():
    """ReduceLROnPlateau refused a step at the reduction (a group added since, with per-group min_lr)
    after recording the epoch and the bad-epoch count (torch does too): retried, it reduced twice as
    early. Now the refused step leaves the scheduler and every group as they were."""
    opt = cembed.optim.SGD([cembed.Embedding(10, 4, sparse=True)], lr=0.1)
    sched = lr_scheduler.ReduceLROnPlateau(opt, patience=1, min_lr=[0.0])
    sched.step(1.0)
    sched.step(2.0)   # one bad epoch
    opt.add_param_group({"params": [cembed.Embedding(10, 4, sparse=True)]})
    before = copy.deepcopy(sched.state_dict()), [g["lr"] for g in opt.param_groups]
    with pytest.raises(RuntimeError, match="number of param groups"):
        sched.step(3.0)   # the second bad epoch: a reduction
    assert (sched.state_dict(), [g["lr"] for g in opt.param_groups]) == before


def test_a_refused_step_or_load_leaves_the_scheduler_as_it_was():
    """A step refused for a learning rate it cannot compute had already advanced the schedule (one
    epoch skipped once the rate was fixed), and load_state_dict set whatever it was given (a T_max of
    0 divided by zero at the next step; another class's state mixed attributes)."""
    import copy

    opt = make_standin()
    sched = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    before = copy.deepcopy(sched.state_dict())
    opt.param_groups[0]["lr"] = "0.05"
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['lr'\] must be a number"):
        sched.step()
    assert sched.state_dict() == before
    opt.param_groups[0]["lr"] = 0.1
    sched.step()
    assert sched.last_epoch == 1
    cosine = lr_scheduler.CosineAnnealingLR(make_standin(), T_max=10)
    saved = cosine.state_dict()
    for edit, error, match in ((dict(T_max=0), ValueError, "T_max"), (dict(eta_min="x"), TypeError, "eta_min"),
                               (dict(last_epoch=-5.0), TypeError, "last_epoch"),
                               (dict(base_lrs=(0.1,)), ValueError, "base_lrs"),
                               (dict(base_lrs=[0.1, "x"]), TypeError, "base_lrs")):
        with pytest.raises(error, match=match):
            cosine.load_state_dict({**saved, **edit})
        assert cosine.state_dict() == saved
    with pytest.raises(ValueError, match="not a StepLR state"):
        lr_scheduler.StepLR(make_standin(), 3).load_state_dict(sched.state_dict())


def test_lambda_state_dict():
    """Functions and lambdas are stored as None and not restored; callable objects keep state."""
    opt = make_standin()
    halver = Halver(10)
    sched = lr_scheduler.LambdaLR(opt, [lambda e: 1.0, Halver(10), halver])
    halver.every = 3
    sd = sched.state_dict()
    assert sd["lr_lambdas"] == [None, {"every": 10}, {"every": 3}]
    fresh = Halver(99)
    sched2 = lr_scheduler.LambdaLR(make_standin(), [lambda e: 2.0, Halver(1), fresh])
    sched2.load_state_dict(sd)
    assert fresh.every == 3 and sched2.lr_lambdas[0](0) == 2.0
    assert sd["lr_lambdas"] == [None, {"every": 10}, {"every": 3}]  # not consumed


def test_sequential_state_dict_nests_schedulers():
    opt = make_standin()
    sched = lr_scheduler.SequentialLR(opt, [lr_scheduler.ConstantLR(opt), lr_scheduler.ExponentialLR(opt, 0.9)],
                                      milestones=[5])
    sd = sched.state_dict()
    assert [type(s) for s in sd["_schedulers"]] == [dict, dict]
    assert "optimizer" not in sd["_schedulers"][0]


# ------------------------------------------------------------------------ resuming, step(epoch)
RESUMABLE = {
    "StepLR": lambda m, o, e: m.StepLR(o, 7, 0.5, last_epoch=e),
    "MultiStepLR": lambda m, o, e: m.MultiStepLR(o, [3, 20, 20], 0.5, last_epoch=e),
    "ExponentialLR": lambda m, o, e: m.ExponentialLR(o, 0.9, last_epoch=e),
    "CosineAnnealingLR": lambda m, o, e: m.CosineAnnealingLR(o, 15, 1e-3, last_epoch=e),
    "LinearLR": lambda m, o, e: m.LinearLR(o, 0.3, 0.9, 12, last_epoch=e),
    "ConstantLR": lambda m, o, e: m.ConstantLR(o, 0.5, 8, last_epoch=e),
    "LambdaLR": lambda m, o, e: m.LambdaLR(o, lambda k: 1 / (k + 1), last_epoch=e),
    "MultiplicativeLR": lambda m, o, e: m.MultiplicativeLR(o, lambda k: 0.9, last_epoch=e),
    "PolynomialLR": lambda m, o, e: m.PolynomialLR(o, 25, 1.5, last_epoch=e),
    "CosineAnnealingWarmRestarts": lambda m, o, e: m.CosineAnnealingWarmRestarts(o, 6, 2, 1e-3, last_epoch=e),
}


@pytest.mark.parametrize("name", list(RESUMABLE))
def test_resume_with_last_epoch(name):
    """last_epoch != -1 needs group['initial_lr'] (KeyError without) and resumes as torch does."""
    torch = require_torch()
    factory = RESUMABLE[name]
    with pytest.raises(KeyError, match="initial_lr"):
        factory(lr_scheduler, make_standin(), 4)

    def prepared(opt):
        for i, g in enumerate(opt.param_groups):
            g["initial_lr"] = [0.5, 0.25, 2.0][i]
        return opt

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, _ = run(torch.optim.lr_scheduler, prepared(make_torch_opt(torch)),
                        lambda m, o: factory(m, o, 4), 60)
    ours, scheds = run(lr_scheduler, prepared(make_standin()), lambda m, o: factory(m, o, 4), 60)
    assert_same_trace(ours, theirs)
    assert scheds[0].base_lrs == [0.5, 0.25, 2.0] and scheds[0].last_epoch == 65


def test_one_cycle_resume():
    """OneCycleLR resumed mid-cycle from the groups an earlier run left (initial/max/min lr,
    momenta) matches torch."""
    torch = require_torch()

    def factory(m, o, e=-1):
        return m.OneCycleLR(o, max_lr=[1.0, 0.5, 0.1], total_steps=100, last_epoch=e)

    def resumed(mod, opt):
        first = factory(mod, opt)
        for _ in range(30):
            opt.step()
            first.step()
        return factory(mod, opt, 29)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, _ = run(torch.optim.lr_scheduler, make_torch_opt(torch), resumed, 70)
        ours, _ = run(lr_scheduler, make_standin(), resumed, 70)
    assert_same_trace(ours, theirs)


@pytest.mark.parametrize("name", ["StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR",
                                  "LinearLR", "ConstantLR", "LambdaLR", "PolynomialLR"])
def test_step_with_epoch_uses_the_closed_form(name):
    """The deprecated step(epoch) warns and uses the closed form where torch has one."""
    torch = require_torch()
    epochs = [1, 2, 5, 5, 3, 9, 20, 14, 40, 0, 31]

    def trace(mod, opt):
        sched = RESUMABLE[name](mod, opt, -1)
        out = []
        for e in epochs:
            opt.step()
            with pytest.warns(UserWarning, match="epoch parameter"):
                sched.step(e)
            out.append(snapshot(opt) + sched.get_last_lr())
        return np.array(out)

    assert_same_trace(trace(lr_scheduler, make_standin()), trace(torch.optim.lr_scheduler, make_torch_opt(torch)))


@pytest.mark.parametrize("T_mult", [1, 2, 3])
def test_warm_restarts_take_fractional_and_jumping_epochs_as_torch(T_mult):
    """CosineAnnealingWarmRestarts.step(epoch): fractional epochs (stepped after every batch) and jumps
    back and forth (the closed form of the period, with a logarithm when T_mult > 1), without the
    deprecation warning, as torch."""
    torch = require_torch()
    epochs = [e + b / 7 for e in range(40) for b in range(7)] + [3, 100.5, 0, 61, 10, 9.999, 250, 1e-9]

    def trace(mod, opt):
        sched = mod.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=T_mult, eta_min=1e-4)
        out = []
        for epoch in epochs:
            opt.step()
            sched.step(epoch)
            out.append(snapshot(opt) + sched.get_last_lr() + [sched.T_cur, sched.T_i, sched.last_epoch])
        return np.array(out, dtype=np.float64)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = trace(lr_scheduler, make_standin())
        theirs = trace(torch.optim.lr_scheduler, make_torch_opt(torch))
    assert_same_trace(ours, theirs)
    sched = lr_scheduler.CosineAnnealingWarmRestarts(make_standin(), T_0=5)
    for bad, exc in ((-1, ValueError), (math.inf, ValueError), (math.nan, ValueError), ("3", TypeError)):
        with pytest.raises(exc, match="epoch"):
            sched.step(bad)
    assert sched.last_epoch == 0 and sched.T_cur == 0


def test_cyclic_on_cembed_sgd_and_sparse_adam():
    """CyclicLR cycles the momentum of cembed's SGD and beta1 of its SparseAdam as torch's does theirs."""
    torch = require_torch()
    for make_ours, make_theirs, key in [
        (lambda: cembed.optim.SGD([cembed.Embedding(10, 4, sparse=True)], lr=0.05, momentum=0.9),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "momentum"),
        (lambda: cembed.optim.SparseAdam([cembed.Embedding(10, 4, sparse=True)], lr=0.05),
         lambda p: torch.optim.SparseAdam(p, lr=0.05), "betas"),
    ]:
        def factory(m, o):
            return m.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=13, mode="triangular2")

        theirs, _ = run(torch.optim.lr_scheduler, make_theirs([torch.nn.Parameter(torch.zeros(10, 4))]), factory, 100)
        opt = make_ours()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours, _ = run(lr_scheduler, opt, factory, 100)
        assert_same_trace(ours, theirs)
        assert key in opt.param_groups[0]
    opt = cembed.optim.Adagrad([cembed.Embedding(10, 4, sparse=True)], lr=0.1)
    with pytest.raises(ValueError, match="momentum or beta1"):
        lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.2)
    assert opt.param_groups[0]["lr"] == 0.1   # (torch had already set it to base_lr)
    lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.2, cycle_momentum=False)
    assert opt.param_groups[0]["lr"] == 0.01


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_refused_chained_step_changes_nothing():
    """The second chained scheduler refuses its step (OneCycleLR past its end): the first, already
    stepped, and the groups it wrote are put back (torch leaves them stepped)."""
    opt = make_standin()
    first = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    chain = lr_scheduler.ChainedScheduler([first, lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=3)])
    for _ in range(3):
        opt.step()
        chain.step()
    before = (copy.deepcopy(opt.param_groups), chain.state_dict())
    with pytest.raises(ValueError, match="Tried to step 4 times"):
        chain.step()
    assert (opt.param_groups, chain.state_dict()) == before and first.last_epoch == 3
    state = chain.state_dict()
    state["_schedulers"][0]["gamma"] = 0.25
    state["_schedulers"][1]["last_epoch"] = 5.0
    with pytest.raises(TypeError, match="last_epoch"):
        chain.load_state_dict(state)   # the second's state refused: the first's not loaded either
    assert chain.state_dict() == before[1] and first.gamma == 0.5


def test_one_cycle_past_the_end_raises():
    opt = make_standin()
    sched = lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(10):
        opt.step()
        sched.step()
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        sched.step()


def test_one_cycle_empty_phase_message():
    """torch divides by zero here; cembed raises the same ZeroDivisionError with a message."""
    with pytest.raises(ZeroDivisionError, match="pct_start"):
        lr_scheduler.OneCycleLR(make_standin(), max_lr=0.1, total_steps=10, pct_start=0.1)


def test_one_cycle_sets_group_keys():
    opt = make_standin("betas")
    sched = lr_scheduler.OneCycleLR(opt, max_lr=[1.0, 2.0, 4.0], total_steps=10, div_factor=4.0,
                                    final_div_factor=2.0)
    g = opt.param_groups[1]
    assert (g["initial_lr"], g["max_lr"], g["min_lr"]) == (0.5, 2.0, 0.25)
    assert (g["max_momentum"], g["base_momentum"]) == (0.95, 0.85)
    assert g["betas"] == (0.95, 0.99) and isinstance(g["betas"], tuple)
    assert sched.base_lrs == [0.25, 0.5, 1.0] and sched.use_beta1


# ----------------------------------------------------------------------- the real optimizers
def test_one_cycle_on_cembed_sgd_and_sparse_adam():
    torch = require_torch()
    for make_ours, make_theirs, key in [
        (lambda: cembed.optim.SGD([cembed.Embedding(10, 4, sparse=True)], lr=0.05, momentum=0.9),
         lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), "momentum"),
        (lambda: cembed.optim.SparseAdam([cembed.Embedding(10, 4, sparse=True)], lr=0.05),
         lambda p: torch.optim.SparseAdam(p, lr=0.05), "betas"),
    ]:
        def factory(m, o):
            return m.OneCycleLR(o, max_lr=0.5, total_steps=200, three_phase=True)

        theirs, _ = run(torch.optim.lr_scheduler, make_theirs([torch.nn.Parameter(torch.zeros(10, 4))]), factory, 200)
        opt = make_ours()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ours, _ = run(lr_scheduler, opt, factory, 200)
        assert_same_trace(ours, theirs)
        assert key in opt.param_groups[0]


def test_training_with_step_lr_matches_torch(rng):
    """cembed SGD on a sparse Embedding, StepLR-scheduled, updates the weights as torch does."""
    torch = require_torch()
    emb = cembed.Embedding(10, 4, sparse=True)
    w0 = emb.weight.copy()
    temb = torch.nn.Embedding(10, 4, sparse=True, _weight=torch.from_numpy(w0.copy()))
    opt = cembed.optim.SGD([emb], lr=0.5)
    topt = torch.optim.SGD(temb.parameters(), lr=0.5)
    sched = lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    tsched = torch.optim.lr_scheduler.StepLR(topt, step_size=3, gamma=0.5)
    for _ in range(12):
        idx = rng.permutation(10)[:4]
        g = (rng.integers(-16, 17, (4, 4)) / 8).astype(np.float32)
        emb.grad = F.embedding_backward(g, idx, 10, sparse=True)
        temb.weight.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g), (10, 4),
                                                   check_invariants=True)
        opt.step()
        topt.step()
        sched.step()
        tsched.step()
        assert sched.get_last_lr() == tsched.get_last_lr()
        np.testing.assert_allclose(emb.weight, temb.weight.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_with_cembed_optimizer():
    """Checkpoint SGD + OneCycleLR through their state dicts (scheduler built before
    optimizer.load_state_dict, as torch documents)."""
    def factory(o):
        return lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=120)

    def make():
        return cembed.optim.SGD([cembed.Embedding(10, 4, sparse=True)], lr=0.1, momentum=0.9)

    opt = make()
    sched = factory(opt)
    ref = [snapshot(opt)]
    for _ in range(120):
        opt.step()
        sched.step()
        ref.append(snapshot(opt))

    opt = make()
    sched = factory(opt)
    for _ in range(50):
        opt.step()
        sched.step()
    opt_sd, sched_sd = pickle.loads(pickle.dumps((opt.state_dict(), sched.state_dict())))
    opt2 = make()
    sched2 = factory(opt2)
    opt2.load_state_dict(opt_sd)
    sched2.load_state_dict(sched_sd)
    got = [snapshot(opt2)]
    for _ in range(70):
        opt2.step()
        sched2.step()
        got.append(snapshot(opt2))
    assert_bitwise_equal(np.array(got), np.array(ref[50:]))


# ---------------------------------------------------------------------------------- warnings
def test_warns_when_scheduler_steps_before_optimizer():
    opt = make_standin()
    sched = lr_scheduler.StepLR(opt, 3)
    with pytest.warns(UserWarning, match="before `optimizer.step\\(\\)`"):
        sched.step()


def test_warns_when_optimizer_step_is_replaced():
    opt = make_standin()
    sched = lr_scheduler.ExponentialLR(opt, 0.9)
    opt.step = lambda closure=None: None
    with pytest.warns(UserWarning, match="overridden"):
        sched.step()


def test_get_lr_outside_step_warns():
    opt = make_standin()
    sched = lr_scheduler.ExponentialLR(opt, 0.5)
    with pytest.warns(UserWarning, match="get_last_lr"):
        sched.get_lr()


def test_optimizer_step_still_works_and_is_wrapped_once():
    opt = make_standin()
    lr_scheduler.StepLR(opt, 3)
    lr_scheduler.ExponentialLR(opt, 0.9)
    assert opt.step(lambda: 42) == 42 and opt.n_steps == 1 and opt._opt_called
    assert opt.step._wrapped_by_lr_sched


def test_get_last_lr_is_a_copy():
    opt = make_standin()
    sched = lr_scheduler.StepLR(opt, 3)
    sched.get_last_lr().append(5.0)
    assert sched.get_last_lr() == [0.1, 0.03, 1.7e-3]


# -------------------------------------------------------------------------------- arguments

BAD = [
    (lambda o: lr_scheduler.StepLR(object(), 3), TypeError, "not an Optimizer"),
    (lambda o: lr_scheduler.StepLR(StandIn([{"momentum": 0.9}]), 3), KeyError, "lr"),
    (lambda o: lr_scheduler.StepLR(o, 0), ValueError, "step_size"),
    (lambda o: lr_scheduler.StepLR(o, 2.5), TypeError, "step_size"),
    (lambda o: lr_scheduler.StepLR(o, 3, gamma="0.1"), TypeError, "gamma"),
    (lambda o: lr_scheduler.StepLR(o, 3, gamma=-0.1), ValueError, "gamma"),
    (lambda o: lr_scheduler.StepLR(o, 3, gamma=math.nan), ValueError, "gamma"),
    (lambda o: lr_scheduler.StepLR(o, 3, last_epoch=-2), ValueError, "last_epoch"),
    (lambda o: lr_scheduler.StepLR(o, 3, last_epoch=1.0), TypeError, "last_epoch"),
    (lambda o: lr_scheduler.MultiStepLR(o, 30), TypeError, "milestones"),
    (lambda o: lr_scheduler.MultiStepLR(o, [1, 2.5]), TypeError, "milestones"),
    (lambda o: lr_scheduler.ExponentialLR(o, gamma=True), TypeError, "gamma"),
    (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=0), ValueError, "T_max"),
    (lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10, eta_min=None), TypeError, "eta_min"),
    (lambda o: lr_scheduler.ConstantLR(o, factor=1.5), ValueError, "factor"),
    (lambda o: lr_scheduler.ConstantLR(o, total_iters=-1), ValueError, "total_iters"),
    (lambda o: lr_scheduler.LinearLR(o, start_factor=0), ValueError, "start_factor"),
    (lambda o: lr_scheduler.LinearLR(o, end_factor=1.1), ValueError, "end_factor"),
    (lambda o: lr_scheduler.LambdaLR(o, [lambda e: 1.0]), ValueError, "Expected 3 lr_lambdas"),
    (lambda o: lr_scheduler.LambdaLR(o, 0.5), TypeError, "lr_lambda"),
    (lambda o: lr_scheduler.MultiplicativeLR(o, [None, None, None]), TypeError, "lr_lambda"),
    (lambda o: lr_scheduler.SequentialLR(o, [], []), ValueError, "at least one"),
    (lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.StepLR(o, 2)], [4]), ValueError, "milestone"),
    (lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.StepLR(make_standin(), 2)], []), ValueError,
     "same optimizer"),
    (lambda o: lr_scheduler.SequentialLR(o, [object()], []), TypeError, "optimizer"),
    (lambda o: lr_scheduler.SequentialLR(o, [lr_scheduler.ReduceLROnPlateau(o)], []), ValueError,
     "ReduceLROnPlateau"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, mode="mean"), ValueError, "mode"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, threshold_mode="relative"), ValueError, "threshold mode"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=1.0), ValueError, "Factor"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, min_lr=[0.0]), ValueError, "min_lrs"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=-1), ValueError, "patience"),
    (lambda o: lr_scheduler.ReduceLROnPlateau(o, cooldown=1.5), TypeError, "cooldown"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1), ValueError, "total_steps OR"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=0), ValueError, "total_steps"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10.0), TypeError, "total_steps"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10.0), ValueError, "total_steps"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, epochs=0, steps_per_epoch=3), ValueError, "epochs"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, epochs=2, steps_per_epoch=-3), ValueError,
     "steps_per_epoch"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, pct_start=1.5), ValueError, "pct_start"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, anneal_strategy="cosine"), ValueError,
     "anneal_strategy"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=[0.1, 0.2], total_steps=10), ValueError, "max_lr"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, max_momentum=[0.9]), ValueError,
     "max_momentum"),
    (lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=10, div_factor=0), ValueError, "div_factor"),
    (lambda o: lr_scheduler.OneCycleLR(StandIn([{"lr": 0.1}], lr=0.1), max_lr=0.1, total_steps=10), ValueError,
     "momentum or beta1"),
    (lambda o: lr_scheduler.PolynomialLR(o, total_iters=-1), ValueError, "total_iters"),
    (lambda o: lr_scheduler.PolynomialLR(o, total_iters=2.0), TypeError, "total_iters"),
    (lambda o: lr_scheduler.PolynomialLR(o, power=-1.0), ValueError, "power"),
    (lambda o: lr_scheduler.PolynomialLR(o, power="2"), TypeError, "power"),
    (lambda o: lr_scheduler.ChainedScheduler([]), ValueError, "at least one"),
    (lambda o: lr_scheduler.ChainedScheduler(lr_scheduler.StepLR(o, 2)), TypeError, "list of schedulers"),
    (lambda o: lr_scheduler.ChainedScheduler([object()]), TypeError, "optimizer"),
    (lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.StepLR(o, 2), lr_scheduler.StepLR(make_standin(), 2)]),
     ValueError, "same optimizer"),
    (lambda o: lr_scheduler.ChainedScheduler([lr_scheduler.ReduceLROnPlateau(o)]), ValueError, "ReduceLROnPlateau"),
    (lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=0), ValueError, "T_0"),
    (lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2.0), ValueError, "T_0"),
    (lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=0), ValueError, "T_mult"),
    (lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=1.5), ValueError, "T_mult"),
    (lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2, eta_min="0"), ValueError, "eta_min"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=0), ValueError, "step_size_up"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_down=-1), ValueError, "step_size_down"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=math.inf), ValueError, "finite"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, mode="triangle"), ValueError, "mode"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, scale_fn=0.5), TypeError, "scale_fn"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, scale_mode="epochs"), ValueError, "scale_mode"),
    (lambda o: lr_scheduler.CyclicLR(o, [0.01, 0.02], 0.1), ValueError, "base_lr"),
    (lambda o: lr_scheduler.CyclicLR(o, 0.01, 0.1, gamma=None), TypeError, "gamma"),
    (lambda o: lr_scheduler.CyclicLR(StandIn([{"lr": 0.1}], lr=0.1), 0.01, 0.1), ValueError, "momentum or beta1"),
    (lambda o: lr_scheduler.OneCycleLR(o, 0.1, total_steps=10, three_phase="False"), TypeError, "three_phase"),
    (lambda o: lr_scheduler.OneCycleLR(o, 0.1, total_steps=10, cycle_momentum="False"), TypeError, "cycle_momentum"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_arguments(i):
    make, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        make(make_standin())


def test_one_cycle_refuses_adagrad():
    """... and leaves the groups as they were (it had written initial_lr / max_lr / min_lr into them, so
    a scheduler made next started from max_lr / 25; torch does the same, cembed's CyclicLR never did)."""
    opt = cembed.optim.Adagrad([cembed.Embedding(10, 4, sparse=True)], lr=0.1)
    before = [dict(group) for group in opt.param_groups]
    with pytest.raises(ValueError, match="momentum or beta1"):
        lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    assert [dict(group) for group in opt.param_groups] == before
    lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=False)


def test_plateau_rejects_changed_group_count_with_per_group_min_lr():
    opt = StandIn([{"lr": 1.0}, {"lr": 2.0}])
    sched = lr_scheduler.ReduceLROnPlateau(opt, patience=0, min_lr=[0.0, 0.0])
    opt.param_groups.append({"lr": 3.0})
    sched.step(1.0)
    with pytest.raises(RuntimeError, match="param groups"):
        sched.step(2.0)


def test_public_names():
    for name in lr_scheduler.__all__:
        assert issubclass(getattr(lr_scheduler, name), lr_scheduler.LRScheduler)
    assert set(lr_scheduler.__all__) >= {
        "LRScheduler", "LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ExponentialLR",
        "CosineAnnealingLR", "LinearLR", "ConstantLR", "OneCycleLR", "SequentialLR", "ReduceLROnPlateau",
        "PolynomialLR", "ChainedScheduler", "CosineAnnealingWarmRestarts", "CyclicLR"}
    try:
        import torch
    except ImportError:
        return   # (cembed's list above is checked without torch)
    theirs = {name for name, obj in vars(torch.optim.lr_scheduler).items()
              if isinstance(obj, type) and issubclass(obj, torch.optim.lr_scheduler.LRScheduler) and
              not name.startswith("_")}
    assert theirs <= set(lr_scheduler.__all__), sorted(theirs - set(lr_scheduler.__all__))   # torch's every one


def test_doctests():
    result = doctest.testmod(lr_scheduler, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sequential_lambda_and_plateau_steps_and_loads_are_all_or_nothing():
    """SequentialLR's refused step advanced its own epoch (a milestone was skipped); its load, and
    LambdaLR's and ReduceLROnPlateau's, set part of a state before refusing the rest."""
    import copy

    def run(refuse_once):
        opt = cembed.optim.SGD([cembed.Embedding(10, 4)], lr=1.0)
        seq = lr_scheduler.SequentialLR(opt, [lr_scheduler.ConstantLR(opt, 0.5, 2), lr_scheduler.ExponentialLR(opt, 0.5)],
                                        [3])
        lrs = []
        for i in range(5):
            opt.step()
            if refuse_once and i == 1:
                good, opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"], "oops"
                with pytest.raises(TypeError, match="must be a number"):
                    seq.step()
                opt.param_groups[0]["lr"] = good
            seq.step()
            lrs.append(seq.get_last_lr()[0])
        return lrs, seq
    assert run(True)[0] == run(False)[0]
    seq = run(False)[1]
    saved = seq.state_dict()
    before = copy.deepcopy(saved)
    bad = copy.deepcopy(saved)
    bad["last_epoch"] = 77
    bad["_schedulers"][1]["gamma"] = -1.0
    with pytest.raises(ValueError, match="gamma"):
        seq.load_state_dict(bad)
    assert seq.state_dict() == before
    opt = make_standin()
    lam = lr_scheduler.LambdaLR(opt, lambda e: 0.5 ** e)
    for edit, match in ((dict(last_epoch="zz"), "last_epoch"), (dict(base_lrs=[0.1, None, 0.2]), "base_lrs"),
                        (dict(other=1), "not a LambdaLR state")):
        with pytest.raises((TypeError, ValueError), match=match):
            lam.load_state_dict({**lam.state_dict(), **edit})
    plateau = lr_scheduler.ReduceLROnPlateau(make_standin())
    state = plateau.state_dict()
    for edit, match in ((dict(mode="bogus", best=3.0), "mode"), (dict(factor=4.0), "factor"),
                        (dict(patience=-3), "patience")):
        with pytest.raises(ValueError, match=match):
            plateau.load_state_dict({**state, **edit})
        assert plateau.state_dict() == state


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_user_subclass_with_attributes_made_later_loads_its_state():
    class Plateau(lr_scheduler.StepLR):
        def get_lr(self):
            self.seen = getattr(self, "seen", 0) + 1
            return super().get_lr()

    sched = Plateau(make_standin(), 3)
    sched.step()
    fresh = Plateau.__new__(Plateau)
    lr_scheduler.StepLR.__init__(fresh, make_standin(), 3)
    del fresh.__dict__["seen"]
    fresh.load_state_dict(sched.state_dict())   # as torch: a subclass's own attributes are not judged
    assert fresh.seen == sched.seen


def test_a_tensor_learning_rate_steps_as_in_torch():
    torch = pytest.importorskip("torch")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.5))
    sched = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    opt.step()
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == 0.25


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_state_a_scheduler_reaches_loads_back():
    """States the schedulers reach themselves loaded back (found by a reviewer, refused before): a
    scheduler nested in two SequentialLRs waits at last_epoch -2 for its milestone; after
    add_param_group, base_lrs / min_lrs cover the groups the scheduler was made with; step(epoch)
    takes a negative epoch. The reloaded run goes on as torch's."""
    torch = require_torch()

    def nested(m, o):
        inner = m.SequentialLR(o, [m.ConstantLR(o, factor=0.5, total_iters=2), m.ExponentialLR(o, gamma=0.9)],
                               milestones=[5])
        return m.SequentialLR(o, [inner, m.CosineAnnealingLR(o, T_max=4)], milestones=[3])

    def grown(m, o, kind):
        sched = m.StepLR(o, 2, 0.5) if kind == "step" else m.ReduceLROnPlateau(o, patience=1, min_lr=1e-3)
        extra = torch.nn.Parameter(torch.zeros(1)) if m is torch.optim.lr_scheduler else None
        o.add_param_group({"params": [extra] if extra is not None else [], "lr": 0.5, "momentum": 0.0,
                           **({"initial_lr": 0.5} if kind == "step" else {})})
        return sched

    def go(m, opt, make, steps=12, reload_at=4, metric=False):
        sched = make(m, opt)
        out = []
        for k in range(steps):
            if k == reload_at:   # (its own state, as a checkpoint of the run would hold it)
                sched.load_state_dict(copy.deepcopy(sched.state_dict()))
            opt.step()
            sched.step(1.0) if metric else sched.step()
            out.append([float(g["lr"]) for g in opt.param_groups])
        return np.array(out)

    for make, metric in ((nested, False), (lambda m, o: grown(m, o, "step"), False),
                         (lambda m, o: grown(m, o, "plateau"), True)):
        ours = go(lr_scheduler, StandIn([dict(lr=1.0, momentum=0.9)], lr=1.0, momentum=0.0), make, metric=metric)
        topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0, momentum=0.9)
        theirs = go(torch.optim.lr_scheduler, topt, make, metric=metric)
        assert_same_trace(ours, theirs)
    opt = make_standin()
    sched = lr_scheduler.StepLR(opt, 2)
    sched.step(-3)
    lr_scheduler.StepLR(make_standin(), 2).load_state_dict(sched.state_dict())
    plateau = lr_scheduler.ReduceLROnPlateau(opt)
    for bad in (2.5, True):   # (torch takes any epoch; cembed an integer, as every step(epoch))
        with pytest.raises(TypeError, match="epoch"):
            plateau.step(1.0, bad)
    assert plateau.last_epoch == 0


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_new_schedulers_refuse_without_changing_anything():
    """Found by a reviewer: after add_param_group a CyclicLR step was refused having cycled the earlier
    groups' momentum, and CosineAnnealingWarmRestarts skipped the new group silently (torch raises); a
    CyclicLR whose scale_fn gives no number, or whose half cycles sum to infinity, raised having written
    every group's lr and momentum; a CyclicLR with a scale_fn of its own and mode=None (torch takes it)
    could not load its own state, and a damaged mode loaded."""
    opt = make_standin()
    cyclic = lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)
    warm = lr_scheduler.CosineAnnealingWarmRestarts(make_standin(), T_0=3)
    opt.add_param_group({"lr": 0.5})
    warm.optimizer.add_param_group({"lr": 0.5})
    for sched in (cyclic, warm):
        before = (copy.deepcopy(sched.optimizer.param_groups), sched.state_dict())
        with pytest.raises(ValueError, match="param groups"):
            sched.step()
        assert (sched.optimizer.param_groups, sched.state_dict()) == before
    for options, error in ((dict(scale_fn=lambda x: None), TypeError), (dict(step_size_up=1e308), ValueError)):
        opt = make_standin()
        before = copy.deepcopy(opt.param_groups)
        with pytest.raises(error):
            lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1, **options)
        assert opt.param_groups == before
    own = lr_scheduler.CyclicLR(make_standin(), 0.01, 0.1, step_size_up=2, scale_fn=lambda x: 0.5, mode=None)
    own.load_state_dict(own.state_dict())
    plain = lr_scheduler.CyclicLR(make_standin(), 0.01, 0.1, step_size_up=2, mode="triangular2")
    state = plain.state_dict()
    with pytest.raises(ValueError, match="mode"):
        plain.load_state_dict({**state, "mode": "trianglar2"})
    assert plain.state_dict() == state


# ---------------------------------------------------------------- review of 2026-11-27 (session 20)

@pytest.mark.parametrize("optimizer", ["SGD", "SparseAdam"])
def test_a_schedule_that_torch_rounds_just_below_zero_keeps_training(optimizer):
    """LinearLR to end_factor=0: torch's recursive form ends at -1.85e-18 from lr 0.1, and torch's
    optimizers go on stepping; cembed's refused every step from then on ('lr must be >= 0'). A learning
    rate below zero by at most LR_ROUNDING of the group's initial_lr is applied as it is; a negative one
    set by hand is still refused, before anything changes."""
    torch = require_torch()
    p = torch.nn.Parameter(torch.zeros(2))
    topt = torch.optim.SGD([p], lr=0.1)
    tsched = torch.optim.lr_scheduler.LinearLR(topt, end_factor=0.0, total_iters=4)
    emb = cembed.Embedding(3, 2, sparse=True, seed=0)
    opt = getattr(cembed.optim, optimizer)([emb], lr=0.1)
    sched = lr_scheduler.LinearLR(opt, end_factor=0.0, total_iters=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(7):
            emb.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
            topt.step()
            sched.step()
            tsched.step()
            assert sched.get_last_lr() == tsched.get_last_lr()
    assert opt.param_groups[0]["lr"] < 0                       # (torch's value: -1.85e-18)
    before = emb.weight.copy()
    for initial, lr in ((0.1, -1e-3), (float("inf"), -1.0), ("1e300", -1e200), (True, -1e-10), (float("nan"), -1e-20),
                        (-0.1, -1e-20)):   # a negative lr set by hand; an initial_lr that is no valid lr
        opt.param_groups[0]["initial_lr"], opt.param_groups[0]["lr"] = initial, lr
        with pytest.raises(ValueError, match=r"learning rate \(lr\) must be >= 0"):
            emb.backward(np.ones((1, 2), np.float32), np.array([1]), optimizer=opt)
        assert_bitwise_equal(emb.weight, before)


def test_a_sequential_lr_that_raises_changes_nothing():
    """SequentialLR's constructor reset group 0's lr before it found group 1 without 'initial_lr'
    (KeyError), and undid the wrapped schedulers' construction step before a sub-scheduler's initial step
    raised: the groups and the wrapped schedulers were left changed."""
    opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=1.0)
    a, b = lr_scheduler.ExponentialLR(opt, gamma=0.5), lr_scheduler.ExponentialLR(opt, gamma=0.9)
    for _ in range(2):
        opt.step()
        a.step()
    opt.add_param_group({"params": [cembed.Embedding(3, 2)], "lr": 0.3})   # no 'initial_lr'
    before = copy.deepcopy(opt.param_groups[0]["lr"]), a.last_epoch, b.last_epoch
    with pytest.raises(KeyError, match=r"param_groups\[1\]"):
        lr_scheduler.SequentialLR(opt, [a, b], milestones=[3])
    assert (opt.param_groups[0]["lr"], a.last_epoch, b.last_epoch) == before

    opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=1.0)
    calls = []

    def lam(epoch):
        calls.append(epoch)
        if len(calls) > 1:
            raise RuntimeError("lambda failed")
        return 0.5

    first, second = lr_scheduler.LambdaLR(opt, lam), lr_scheduler.ExponentialLR(opt, gamma=0.5)
    before = [dict(g) for g in opt.param_groups], first.last_epoch, second.last_epoch
    with pytest.raises(RuntimeError, match="lambda failed"):
        lr_scheduler.SequentialLR(opt, [first, second], milestones=[2])
    assert ([dict(g) for g in opt.param_groups], first.last_epoch, second.last_epoch) == before


def test_a_scheduler_whose_initial_step_raises_leaves_no_initial_lr():
    """LambdaLR(opt, lambda e: 1 / 0) raised but left 'initial_lr' in the groups: a scheduler made after
    the lr was changed then started from the stale value."""
    opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=1.0)
    with pytest.raises(ZeroDivisionError):
        lr_scheduler.LambdaLR(opt, lambda epoch: 1 / 0)
    assert "initial_lr" not in opt.param_groups[0]
    opt.param_groups[0]["lr"] = 0.01
    assert lr_scheduler.LambdaLR(opt, lambda epoch: 1.0).base_lrs == [0.01]


def test_zero_factors_and_zero_total_iters_run_as_torchs_do():
    """ConstantLR(factor=0) and LinearLR(total_iters=0) divide by zero only on some paths (ConstantLR at
    epoch total_iters, LinearLR's closed form): a SequentialLR 'frozen warm-up' and LinearLR's chainable
    step() train in torch, and do here (a review refused them for a while; another one found that)."""
    torch = require_torch()

    def run(mk, opt):
        warm = mk.ConstantLR(opt, factor=0.0, total_iters=10)
        seq = mk.SequentialLR(opt, [warm, mk.ExponentialLR(opt, gamma=0.5)], milestones=[3])
        lrs = []
        for _ in range(6):
            opt.step()
            seq.step()
            lrs.append(seq.get_last_lr()[0])
        return lrs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = run(lr_scheduler, cembed.optim.SGD([cembed.Embedding(3, 2)], lr=0.1))
        theirs = run(torch.optim.lr_scheduler, torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
        assert ours == theirs
        opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=0.1)
        topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        for make in (lambda mk, o: mk.LinearLR(o, start_factor=0.5, total_iters=0),
                     lambda mk, o: mk.PolynomialLR(o, total_iters=0, power=2.0)):   # (PolynomialLR: a later review)
            opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=0.1)
            topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
            sched, tsched = make(lr_scheduler, opt), make(torch.optim.lr_scheduler, topt)
            for _ in range(3):
                opt.step()
                topt.step()
                sched.step()
                tsched.step()
                assert sched.get_last_lr() == tsched.get_last_lr()


def test_a_loaded_state_with_an_initial_flag_or_a_last_lr_that_is_no_list_is_refused():
    """load_state_dict took '_is_initial': True (an ExponentialLR then never stepped again) and a '_last_lr'
    that was not a list (get_last_lr() then raised TypeError): refused, the scheduler unchanged."""
    opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=1.0)
    sched = lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for key, bad, match in (("_is_initial", True, "_is_initial"), ("_last_lr", 0.5, "_last_lr"),
                            ("_last_lr", ["x"], r"_last_lr'\]\[0\]")):
        state = sched.state_dict()
        state[key] = bad
        with pytest.raises((ValueError, TypeError), match=match):
            sched.load_state_dict(state)
        assert sched.state_dict() == lr_scheduler.ExponentialLR(
            cembed.optim.SGD([cembed.Embedding(3, 2)], lr=1.0), gamma=0.5).state_dict()


@pytest.mark.parametrize("make", [lambda opt: lr_scheduler.ExponentialLR(opt, gamma=0.5),
                                  lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=4),
                                  lambda opt: lr_scheduler.LinearLR(opt)])
def test_an_lr_beyond_floats_range_is_a_value_error(make):
    """param_groups[0]['lr'] = 10**400 by hand: the step raised OverflowError from the schedule's
    arithmetic (found by a fuzzer); a ValueError naming the group, the schedule where it was."""
    opt = cembed.optim.SGD([cembed.Embedding(3, 2)], lr=0.1)
    sched = make(opt)
    opt.param_groups[0]["lr"] = 10 ** 400
    before = sched.state_dict()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\] is too large to be a float"):
        sched.step()
    assert sched.state_dict() == before
