"""torch's optimizer surface (issue 10): param groups, step(closure), state_dict layout, any weight
layout, integer lookup tables — against torch and against contiguous copies (bitwise)."""
import numpy as np
import pytest

import cembed
from cembed import SparseGrad, optim
from cembed import functional as F

from util import assert_bitwise_equal, at_thread_counts, require_torch

RTOL = dict(rtol=1e-6, atol=1e-6)


class Table:
    def __init__(self, weight):
        self.weight = weight
        self.grad = None


def dyadic(rng, shape):
    return (rng.integers(-16, 17, shape) / 8).astype(np.float32)


OPTIMIZERS = {
    "sgd": (lambda p, **kw: optim.SGD(p, **kw), dict(lr=0.1), [dict(lr=0.05, momentum=0.9), dict(lr=0.2)]),
    "sgd_nesterov": (lambda p, **kw: optim.SGD(p, **kw), dict(lr=0.1, momentum=0.5, nesterov=True),
                     [dict(lr=0.3), dict(momentum=0.9, dampening=0.0, maximize=True)]),
    "sparse_adam": (lambda p, **kw: optim.SparseAdam(p, **kw), dict(lr=0.01),
                    [dict(lr=0.05, betas=(0.8, 0.9)), dict(eps=1e-3, maximize=True)]),
    "adagrad": (lambda p, **kw: optim.Adagrad(p, **kw), dict(lr=0.1),
                [dict(lr=0.5, lr_decay=0.1), dict(lr=0.3, eps=1e-6)]),
}
TORCH_NAMES = {"sgd": "SGD", "sgd_nesterov": "SGD", "sparse_adam": "SparseAdam", "adagrad": "Adagrad"}


def _torch_group_opt(torch, name, tparams, defaults, group_options):
    cls = getattr(torch.optim, TORCH_NAMES[name])
    groups = [dict(params=[p], **o) for p, o in zip(tparams[:2], group_options)]
    groups.append(dict(params=tparams[2:]))
    return cls(groups, **defaults)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_groups_match_torch(rng, name):
    """Three tables in three groups with different options, the LR edited mid-run, several steps."""
    torch = require_torch()
    make, defaults, group_options = OPTIMIZERS[name]
    n_rows, dim = 30, 5
    weights = [rng.standard_normal((n_rows, dim)).astype(np.float32) for _ in range(3)]
    tables = [Table(w.copy()) for w in weights]
    tparams = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
    ours = make([dict(params=[t], **o) for t, o in zip(tables[:2], group_options)] + [dict(params=tables[2:])],
                **defaults)
    theirs = _torch_group_opt(torch, name, tparams, defaults, group_options)
    assert len(ours.param_groups) == 3
    for key, value in group_options[0].items():
        assert ours.param_groups[0][key] == pytest.approx(value)
    for step in range(6):
        if step == 3:  # an edited option takes effect at the next step, as in torch
            ours.param_groups[1]["lr"] = theirs.param_groups[1]["lr"] = 0.02
        for table, tp in zip(tables, tparams):
            idx = rng.integers(0, n_rows, 9)
            g = dyadic(rng, (9, dim))
            table.grad = F.embedding_backward(g, idx, n_rows, sparse=True)
            tp.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g), (n_rows, dim))
        ours.step()
        theirs.step()
        for table, tp in zip(tables, tparams):
            np.testing.assert_allclose(table.weight, tp.detach().numpy(), **RTOL)


@pytest.mark.parametrize("name, sparse", [(name, sparse) for name in OPTIMIZERS for sparse in (True, False)
                                          if sparse or name != "sparse_adam"])   # (SparseAdam: sparse only)
def test_zero_grad_without_set_to_none_zeroes_like_torch(rng, name, sparse):
    """``zero_grad(set_to_none=False)`` dropped sparse gradients: a step after it skipped the
    parameter, where torch's zeroed (empty) sparse gradient still advances the step counter
    (SparseAdam's bias correction, Adagrad's lr_decay). Now the gradient is zeroed as torch zeroes it,
    on the optimizer and on the module, and the next steps match torch."""
    torch = require_torch()
    make, defaults, group_options = OPTIMIZERS[name]
    options = {**defaults, **group_options[0]}
    n_rows, dim = 12, 3
    weight = rng.standard_normal((n_rows, dim)).astype(np.float32)
    emb = cembed.Embedding.from_pretrained(weight.copy(), freeze=False, sparse=sparse)
    tweight = torch.nn.Parameter(torch.from_numpy(weight.copy()))
    ours, theirs = make([emb], **options), getattr(torch.optim, TORCH_NAMES[name])([tweight], **options)
    for step in range(4):
        idx = rng.integers(0, n_rows, 5)
        g = dyadic(rng, (5, dim))
        emb(idx)
        emb.backward(g)
        tg = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g), (n_rows, dim))
        tweight.grad = tg if sparse else tg.to_dense()
        ours.step()
        theirs.step()
        zeroer = ours if step % 2 else emb   # the optimizer's and the module's zero_grad alike
        zeroer.zero_grad(set_to_none=False)
        theirs.zero_grad(set_to_none=False)
        assert emb.grad is not None and not np.any(emb.grad.to_dense() if sparse else emb.grad)
        assert isinstance(emb.grad, SparseGrad) == sparse and emb.grad.shape == (n_rows, dim)
        ours.step()   # a step with the zeroed gradient (a batch that never reached backward)
        theirs.step()
        np.testing.assert_allclose(emb.weight, tweight.detach().numpy(), **RTOL)
        if "step" in theirs.state[tweight]:
            assert int(ours.state[emb]["step"]) == int(theirs.state[tweight]["step"])
        emb.zero_grad()
        assert emb.grad is None


def test_zero_grad_keeps_a_read_only_gradient_unwritten():
    emb = cembed.Embedding(4, 2, seed=0)
    opt = optim.SGD([emb], lr=0.1)
    grad = np.ones((4, 2), np.float32)
    grad.flags.writeable = False
    emb.grad = grad
    opt.zero_grad(set_to_none=False)
    assert np.all(grad == 1) and emb.grad is not grad and not np.any(emb.grad)
    assert emb.grad.shape == (4, 2) and emb.grad.dtype == np.float32
    with pytest.raises(TypeError, match="set_to_none must be a bool"):
        opt.zero_grad(set_to_none="no")
    with pytest.raises(TypeError, match="set_to_none must be a bool"):
        emb.zero_grad(set_to_none=None)


def test_adagrad_group_initial_accumulator_is_honoured():
    """torch 2.13 initialises every accumulator from the constructor's value and ignores a group's
    ``initial_accumulator_value``; cembed uses the group's (docs/behaviour.md)."""
    a, b = Table(np.zeros((4, 2), np.float32)), Table(np.zeros((4, 2), np.float32))
    opt = optim.Adagrad([{"params": [a], "initial_accumulator_value": 0.5}, {"params": [b]}], lr=0.1,
                        initial_accumulator_value=0.25)
    assert (opt.state[a]["sum"] == 0.5).all() and (opt.state[b]["sum"] == 0.25).all()
    c = Table(np.zeros((4, 2), np.float32))
    opt.add_param_group({"params": [c], "initial_accumulator_value": 2.0})
    assert (opt.state[c]["sum"] == 2.0).all()


def test_group_defaults_add_param_group_and_repr():
    a, b = Table(np.zeros((4, 2), np.float32)), Table(np.zeros((4, 2), np.float32))
    opt = optim.SparseAdam([a], lr=0.1, betas=(0.5, 0.6))
    opt.add_param_group({"params": b, "lr": 0.2})
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["betas"] == (0.5, 0.6)
    assert opt.param_groups[1]["params"] == [b]
    assert "Parameter Group 1" in repr(opt)
    with pytest.raises(TypeError, match="dict"):
        opt.add_param_group([a])
    with pytest.raises(ValueError, match="learning rate"):
        opt.add_param_group({"params": [Table(np.zeros((4, 2), np.float32))], "lr": -1.0})
    assert len(opt.param_groups) == 2


def test_duplicate_module_refused():
    a, b = Table(np.zeros((4, 2), np.float32)), Table(np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[2\].*same module as.*\[0\]"):
        optim.SGD([a, b, a], lr=0.1)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['params'\]\[0\].*same module"):
        optim.SGD([{"params": [a]}, {"params": [a]}], lr=0.1)
    opt = optim.SGD([a], lr=0.1)
    with pytest.raises(ValueError, match="same module"):
        opt.add_param_group({"params": [b, a]})
    assert len(opt.param_groups) == 1


def test_parameters_iterator_is_accepted():
    emb = cembed.Embedding(6, 3, sparse=True, seed=0)
    opt = optim.SGD(emb.parameters(), lr=0.5)
    emb(np.array([1, 2]))
    emb.backward(np.ones((2, 3), np.float32))
    before = emb.weight.copy()
    opt.step()
    np.testing.assert_allclose(emb.weight[[1, 2]], before[[1, 2]] - 0.5)


def test_closure_is_called_first_and_returned():
    emb = cembed.Embedding(6, 3, sparse=True, seed=0)
    opt = optim.SparseAdam([emb], lr=0.1)
    calls = []

    def closure():
        calls.append(emb.grad)
        opt.zero_grad()
        emb(np.array([0, 4]))
        emb.backward(np.ones((2, 3), np.float32))
        return 1.25

    assert opt.step(closure) == 1.25
    assert calls == [None] and opt.state[emb]["step"] == 1
    assert opt.step() is None


def test_state_dict_layout_like_torch():
    torch = require_torch()
    tables = [Table(np.ones((4, 2), np.float32)) for _ in range(3)]
    opt = optim.SGD([{"params": tables[:2], "lr": 0.1}, {"params": tables[2:], "lr": 0.2}], lr=0.5, momentum=0.9)
    tparams = [torch.nn.Parameter(torch.ones(4, 2)) for _ in range(3)]
    topt = torch.optim.SGD([{"params": tparams[:2], "lr": 0.1}, {"params": tparams[2:], "lr": 0.2}], lr=0.5,
                           momentum=0.9)
    tables[1].grad = SparseGrad([1], np.ones((1, 2), np.float32), 4)
    opt.step()
    sd, tsd = opt.state_dict(), topt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [g["params"] for g in tsd["param_groups"]] == [[0, 1], [2]]
    assert list(sd["state"]) == [1]          # only the parameter that has state
    plain = optim.SGD(tables, lr=0.1)
    tables[0].grad = SparseGrad([1], np.ones((1, 2), np.float32), 4)
    plain.step()
    assert plain.state_dict()["state"] == {}  # plain SGD keeps no state


def test_resume_mid_run_bitwise_with_groups(rng, tmp_path):
    def batches(seed):
        r = np.random.default_rng(seed)
        return [(r.integers(0, 20, 8), dyadic(r, (8, 3))) for _ in range(6)]

    def run(opt, tables, data):
        for idx, g in data:
            for t in tables:
                t.grad = F.embedding_backward(g, idx, 20, sparse=True)
            opt.step()

    w0 = rng.standard_normal((20, 3)).astype(np.float32)
    make = lambda ts: optim.SparseAdam([{"params": ts[:1], "lr": 0.05}, {"params": ts[1:], "betas": (0.5, 0.7)}])
    straight = [Table(w0.copy()), Table(w0.copy())]
    opt = make(straight)
    run(opt, straight, batches(1))
    first = [Table(w0.copy()), Table(w0.copy())]
    opt1 = make(first)
    run(opt1, first, batches(1)[:3])
    opt1.save(tmp_path / "opt.npz")
    resumed = [Table(t.weight.copy()) for t in first]
    opt2 = make(resumed)
    opt2.load(tmp_path / "opt.npz")
    run(opt2, resumed, batches(1)[3:])
    for a, b in zip(straight, resumed):
        assert_bitwise_equal(a.weight, b.weight)


def test_load_fills_options_added_later():
    t = Table(np.zeros((4, 2), np.float32))
    opt = optim.SparseAdam([t], lr=0.1)
    sd = opt.state_dict()
    del sd["param_groups"][0]["maximize"]
    opt.param_groups[0]["maximize"] = True
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["maximize"] is False


def test_bad_option_at_step_changes_nothing(rng):
    tables = [Table(rng.standard_normal((5, 2)).astype(np.float32)) for _ in range(2)]
    opt = optim.SGD([{"params": tables[:1]}, {"params": tables[1:]}], lr=0.1, momentum=0.9)
    for t in tables:
        t.grad = SparseGrad([1, 3], np.ones((2, 2), np.float32), 5)
    before = [t.weight.copy() for t in tables]
    opt.param_groups[1]["lr"] = "fast"
    with pytest.raises(TypeError, match=r"param_groups\[1\].*learning rate"):
        opt.step()
    for t, w in zip(tables, before):
        assert_bitwise_equal(t.weight, w)
    assert opt.state == {}
    opt.param_groups[1]["lr"] = np.float32(0.25)   # NumPy scalars are fine
    opt.step()


# --------------------------------------------------------------------------- any weight layout

def _strided_views(rng, n_rows, dim):
    big = rng.standard_normal((n_rows, 2 * dim)).astype(np.float32)
    cube = rng.standard_normal((n_rows, dim, 2)).astype(np.float32)
    return {"big[:, ::2]": big[:, ::2], "arr3d[..., 0]": cube[..., 0], "fortran": np.asfortranarray(big[:, :dim]),
            "row_strided": big[:, :dim]}


@pytest.mark.parametrize("name,dense", [(name, dense) for name in OPTIMIZERS for dense in (False, True)
                                        if not (dense and name == "sparse_adam")])  # SparseAdam: sparse only
def test_optimizers_update_any_layout_in_place(rng, name, dense):
    make, defaults, _ = OPTIMIZERS[name]
    n_rows, dim = 40, 6
    for layout, view in _strided_views(rng, n_rows, dim).items():
        contiguous = Table(np.ascontiguousarray(view))
        strided = Table(view)
        base_before = view.base.copy() if view.base is not None else None
        opts = [make([contiguous], **defaults), make([strided], **defaults)]
        for step in range(4):
            idx = rng.integers(0, n_rows, 10)
            g = dyadic(rng, (10, dim))
            for t in (contiguous, strided):
                t.grad = F.embedding_backward(g, idx, n_rows, sparse=not dense)
            for o in opts:
                o.step()
            assert_bitwise_equal(np.ascontiguousarray(strided.weight), contiguous.weight)
        assert strided.weight is view, layout
        if base_before is not None and layout == "big[:, ::2]":  # the other columns were not touched
            np.testing.assert_array_equal(view.base[:, 1::2], base_before[:, 1::2])


def test_modules_any_layout_bitwise(rng):
    n_rows, dim = 50, 4
    for layout, view in _strided_views(rng, n_rows, dim).items():
        idx = rng.integers(0, n_rows, (6, 3))
        for sparse in (False, True):
            a = cembed.Embedding.from_pretrained(np.ascontiguousarray(view), freeze=False, sparse=sparse, max_norm=2.0)
            b = cembed.Embedding.from_pretrained(view, freeze=False, sparse=sparse, max_norm=2.0)
            assert_bitwise_equal(b(idx), a(idx))
            g = dyadic(rng, (6, 3, dim))
            a.backward(g)
            b.backward(g)
            ga, gb = (a.grad.to_dense(), b.grad.to_dense()) if sparse else (a.grad, b.grad)
            assert_bitwise_equal(gb, ga)
            assert_bitwise_equal(np.ascontiguousarray(view), a.weight)
        for mode, pad in (("sum", None), ("mean", 3), ("max", 3)):
            a = cembed.EmbeddingBag.from_pretrained(np.ascontiguousarray(view), freeze=False, mode=mode,
                                                    padding_idx=pad)
            b = cembed.EmbeddingBag.from_pretrained(view, freeze=False, mode=mode, padding_idx=pad)
            flat = np.append(rng.integers(0, n_rows, 11), 3)
            offsets = np.array([0, 4, 4, 9])
            psw = dyadic(rng, flat.shape) if mode == "sum" else None
            assert_bitwise_equal(b(flat, offsets, psw), a(flat, offsets, psw))
            g = dyadic(rng, (4, dim))
            pa, pb = a.backward(g), b.backward(g)
            assert_bitwise_equal(b.grad, a.grad)
            if psw is not None:
                assert_bitwise_equal(pb, pa)


def test_packed_record_field_table():
    """A weight whose row stride is not a multiple of its item size (a packed record field)."""
    rec = np.zeros(4, dtype=[("id", "i2"), ("vec", "f4", (2,))])
    rec["vec"] = np.arange(8, dtype=np.float32).reshape(4, 2)
    vec = rec["vec"]
    assert vec.strides[0] % vec.itemsize != 0
    np.testing.assert_array_equal(F.embedding(np.array([1, 3]), vec), [[2, 3], [6, 7]])
    np.testing.assert_array_equal(F.embedding_bag([1, 3], vec, [0], mode="sum"), [[8, 10]])
    t = Table(vec)
    opt = optim.SGD([t], lr=1.0)
    t.grad = SparseGrad([2], np.ones((1, 2), np.float32), 4)
    opt.step()
    np.testing.assert_array_equal(rec["vec"][2], [3, 4])
    np.testing.assert_array_equal(rec["id"], 0)


def test_layout_results_thread_independent(rng):
    view = rng.standard_normal((3000, 16)).astype(np.float32)[:, ::2]
    idx = rng.integers(0, 3000, 5000)
    results = at_thread_counts(lambda: F.embedding_bag(idx, view, np.arange(0, 5000, 7), mode="mean"))
    for r in results[1:]:
        assert_bitwise_equal(results[0], r)


# --------------------------------------------------------------------------- integer lookup tables

def test_integer_lookup_tables():
    table = np.array([[7, 70], [3, 30], [5, 50]], np.int32)
    emb = cembed.Embedding.from_pretrained(table)
    np.testing.assert_array_equal(emb(np.array([[2, 0]])), [[[5, 50], [7, 70]]])
    assert emb(np.array([1])).dtype == np.int32
    emb.backward(np.ones((1, 2), np.float64), np.array([0]))   # frozen: nothing to accumulate
    assert emb.grad is None
    with pytest.raises(TypeError, match="integer tables are lookup-only"):
        cembed.Embedding.from_pretrained(table, freeze=False)
    emb.requires_grad = True
    with pytest.raises(TypeError):
        emb.backward(np.ones((1, 2), np.float64), np.array([0]))
    with pytest.raises(TypeError, match="float32 or float64"):
        optim.SGD([Table(table)], lr=0.1)
