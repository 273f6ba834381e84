"""The optimizers' hooks (torch.optim.Optimizer's): step pre/post hooks of one optimizer and of every
optimizer, state dict and load state dict hooks — their order, arguments and return values against
torch's, their handles, and cembed's own: the fused backward + update runs the step post-hooks and
refuses step pre-hooks, and files (save / load, checkpoints) are written and read without the dict
hooks."""
import warnings

import numpy as np
import pytest

import cembed
from cembed import optim
from cembed.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from util import assert_bitwise_equal, require_torch


def _record_hooks(opt, calls, register_global_pre, register_global_post):
    """Register one hook of each kind, each appending (kind, number of args, whether the first is the
    optimizer, sorted kwargs) to ``calls``; their handles."""
    def note(kind):
        def hook(optimizer, args, kwargs):
            calls.append((kind, len(args), args[0] is optimizer, sorted(kwargs)))
        return hook

    return [register_global_pre(note("global pre")), opt.register_step_pre_hook(note("pre")),
            opt.register_step_post_hook(note("post")), register_global_post(note("global post"))]


def test_step_hooks_run_in_torchs_order_with_torchs_arguments():
    torch = require_torch()
    from torch.optim import optimizer as torch_optimizer

    emb = cembed.Embedding(4, 2, sparse=True)
    ours, theirs = [], []
    opt = optim.SGD([emb], lr=0.1)
    topt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, 2))], lr=0.1)
    handles = _record_hooks(opt, ours, register_optimizer_step_pre_hook, register_optimizer_step_post_hook)
    handles += _record_hooks(topt, theirs, torch_optimizer.register_optimizer_step_pre_hook,
                             torch_optimizer.register_optimizer_step_post_hook)
    try:
        for o in (opt, topt):
            o.step()
            assert o.step(lambda: 3.5) == 3.5
    finally:
        for handle in handles:
            handle.remove()
    kinds = [c[0] for c in ours]
    assert kinds == ["global pre", "pre", "post", "global post"] * 2
    assert [c[0] for c in theirs] == kinds
    assert [c[1:] for c in ours] == [c[1:] for c in theirs] == [(1, True, [])] * 4 + [(2, True, [])] * 4
    opt.step()   # removed: nothing more recorded
    assert len(ours) == 8


def test_a_pre_hook_may_replace_the_steps_arguments():
    """As in torch: a pre-hook returning (args, kwargs) changes what step gets (here its closure); any
    other value is a RuntimeError before the step; a hook's error stops the step before any update."""
    emb = cembed.Embedding.from_pretrained(np.zeros((3, 2), np.float32), freeze=False, sparse=True)
    opt = optim.SGD([emb], lr=0.5)
    with opt.register_step_pre_hook(lambda o, args, kwargs: ((o,), {"closure": lambda: "replaced"})):
        assert opt.step(lambda: "given") == "replaced"
    emb.backward(np.ones((1, 2), np.float32), np.array([1]))
    before = emb.weight.copy()
    with opt.register_step_pre_hook(lambda o, args, kwargs: "not a pair"):
        with pytest.raises(RuntimeError, match="must return None or a tuple of"):
            opt.step()
    assert_bitwise_equal(emb.weight, before)

    def failing(o, args, kwargs):
        raise KeyError("from the hook")

    with opt.register_step_pre_hook(failing):
        with pytest.raises(KeyError, match="from the hook"):
            opt.step()
    assert_bitwise_equal(emb.weight, before)
    assert emb.grad is not None
    opt.step()
    assert not np.array_equal(emb.weight, before)


def test_state_dict_hooks_as_torch():
    """Pre-hooks run before the dict is built, post-hooks may return a replacement, ``prepend`` puts a
    hook first; load pre-hooks get a shallow copy and may return the dict to load, post-hooks run
    after — compared with torch's."""
    torch = require_torch()

    def exercise(opt):
        calls = []
        handles = [opt.register_state_dict_pre_hook(lambda o: calls.append("pre")),
                   opt.register_state_dict_pre_hook(lambda o: calls.append("pre first"), prepend=True),
                   opt.register_state_dict_post_hook(lambda o, sd: calls.append("post") or {**sd, "extra": 1}),
                   opt.register_state_dict_post_hook(lambda o, sd: calls.append(("post first", "extra" in sd)),
                                                     prepend=True)]
        sd = opt.state_dict()
        given = dict(sd)

        def load_pre(o, loaded):
            calls.append(("load pre", loaded is given, "extra" in loaded))
            loaded.pop("extra")   # (changes the copy, not the caller's dict)

        handles += [opt.register_load_state_dict_pre_hook(load_pre),
                    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))]
        opt.load_state_dict(given)
        assert "extra" in given and "extra" in sd
        for handle in handles:
            handle.remove()
        opt.load_state_dict(opt.state_dict())   # nothing more recorded
        return calls

    ours = exercise(optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1, momentum=0.9))
    theirs = exercise(torch.optim.SGD([torch.nn.Parameter(torch.zeros(4, 2))], lr=0.1, momentum=0.9))
    assert ours == theirs == ["pre first", "pre", ("post first", False), "post", ("load pre", False, True),
                              "load post"]


def test_a_load_pre_hook_can_return_the_state_to_load_which_is_then_checked():
    emb = cembed.Embedding(4, 2, sparse=True)
    opt = optim.Adagrad([emb], lr=0.1)
    good = opt.state_dict()
    bad = opt.state_dict()
    bad["state"][0]["sum"] = np.zeros((3, 2), np.float32)
    with opt.register_load_state_dict_pre_hook(lambda o, sd: bad):
        with pytest.raises(ValueError, match="sum"):
            opt.load_state_dict(good)
    assert_bitwise_equal(opt.state[emb]["sum"], good["state"][0]["sum"])


def test_files_are_written_and_read_without_the_dict_hooks(tmp_path):
    emb = cembed.Embedding(4, 2, sparse=True)
    opt = optim.SparseAdam([emb], lr=0.1)
    emb(np.array([1])), emb.backward(np.ones((1, 2), np.float32))
    opt.step()
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load post"))
    opt.save(tmp_path / "opt.npz")
    opt.load(tmp_path / "opt.npz")
    cembed.save_checkpoint(tmp_path / "ck", {"emb": emb}, optimizer=opt)
    cembed.load_checkpoint(tmp_path / "ck", {"emb": emb}, optimizer=opt)
    assert calls == []


@pytest.mark.parametrize("module", ["embedding", "bag", "scores"])
def test_the_fused_backward_runs_the_step_post_hooks_and_refuses_pre_hooks(module):
    """module.backward(g, optimizer=opt) (and dot_logistic_backward) is a step of ``opt``: its step
    post-hooks run after it (args ``(opt,)``, kwargs ``{}``), and after it the schedulers see that the
    optimizer stepped (they warned that ``scheduler.step()`` came first). A step pre-hook runs between a
    gradient and its update, a moment the fused update does not have: with one registered (this
    optimizer's or every optimizer's) it is refused before anything is done — run inside it, a
    pre-hook saw no gradient (a clipping hook did nothing) and could free arrays the kernel was about
    to read (found by a reviewer: a segfault)."""
    if module == "bag":
        emb = cembed.EmbeddingBag(10, 4, mode="sum", sparse=True, seed=0)
        grad, ids = np.ones((1, 4), np.float32), np.array([[1, 2, 2]])
    else:
        emb = cembed.Embedding(10, 4, sparse=True, seed=0)
        grad, ids = np.ones((3, 4), np.float32), np.array([1, 2, 2])
    opt = optim.SparseAdam([emb], lr=0.1)

    def fused():
        if module == "scores":
            emb.dot_logistic_backward(np.ones((2, 4), np.float32), np.array([[1, 2], [2, 3]]), optimizer=opt)
        else:
            emb(ids)
            emb.backward(grad, optimizer=opt)

    scheduler = optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    calls = []
    post = [opt.register_step_post_hook(lambda o, a, k: calls.append(("post", a, k))),
            register_optimizer_step_post_hook(lambda o, a, k: calls.append(("global post", a, k)))]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fused()
            scheduler.step()   # (no warning: the fused update counts as the optimizer's step)
        assert calls == [("post", (opt,), {}), ("global post", (opt,), {})]
        before = (emb.weight.copy(), {k: np.copy(v) for k, v in opt.state[emb].items()})
        for register in (opt.register_step_pre_hook, register_optimizer_step_pre_hook):
            with register(lambda o, a, k: calls.append("pre")):
                with pytest.raises(ValueError, match="step pre-hooks"):
                    fused()
            assert_bitwise_equal(emb.weight, before[0])
            for key, value in opt.state[emb].items():
                assert_bitwise_equal(np.asarray(value), before[1][key])
            assert emb.grad is None and calls[-1] != "pre" and len(calls) == 2
        fused()   # (hooks removed: it runs again)
        assert len(calls) == 4
    finally:
        for handle in post:
            handle.remove()


def test_handles():
    opt = optim.SGD([cembed.Embedding(4, 2, sparse=True)], lr=0.1)
    calls = []
    first = opt.register_step_post_hook(lambda o, a, k: calls.append(1))
    second = opt.register_step_post_hook(lambda o, a, k: calls.append(2))
    assert first.id != second.id
    first.remove()
    first.remove()   # (twice: nothing)
    opt.step()
    with second:
        pass   # (leaving the block removes it)
    opt.step()
    assert calls == [2]
    with pytest.raises(TypeError, match="callable"):
        opt.register_step_pre_hook("not a function")
    del opt
    second.remove()   # (the optimizer is gone: nothing)


def test_prepend_must_be_a_bool():
    """``prepend="False"`` was read as true (the hook went first); now a TypeError, nothing registered."""
    opt = optim.SGD([cembed.Embedding(4, 2, sparse=True, seed=0)], lr=0.1)
    for register in (opt.register_state_dict_pre_hook, opt.register_state_dict_post_hook,
                     opt.register_load_state_dict_pre_hook, opt.register_load_state_dict_post_hook):
        with pytest.raises(TypeError, match="prepend must be a bool, got str"):
            register(lambda *args: None, prepend="False")
    assert not (opt._state_dict_pre_hooks or opt._state_dict_post_hooks or opt._load_state_dict_pre_hooks
                or opt._load_state_dict_post_hooks)
