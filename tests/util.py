"""Helpers shared by the test modules: the torch oracle, thread control, the torch test vectors."""
import contextlib
import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

import cembed

DATA = pathlib.Path(__file__).parent / "data"


def _oracle(name, what):
    """The module ``name`` (an oracle of the parity tests: ``what``), imported. Without it the test is
    skipped, unless CI asks for the oracles (CEMBED_REQUIRE_TORCH=1, set by .ci/run, which installs
    torch, gensim and FBGEMM), where a missing oracle is a failure."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        if os.environ.get("CEMBED_REQUIRE_TORCH", "") not in ("", "0"):
            pytest.fail(f"{name} ({what}) is required (CEMBED_REQUIRE_TORCH=1) but cannot be imported")
        pytest.skip(f"{name} is not installed")


def require_gensim():
    """gensim, the trainer's peer."""
    return _oracle("gensim", "the trainer's peer")


def require_torch():
    """The torch module, for parity tests."""
    return _oracle("torch", "the parity oracle")


def require_fbgemm():
    """FBGEMM's CPU table-batched embeddings (``fbgemm_gpu``, pip ``fbgemm-gpu-cpu==1.8.0``, which pairs
    with torch 2.13): the peer of RowWiseAdagrad. Returns ``torch`` (importing fbgemm_gpu registers
    its operators there)."""
    torch = require_torch()
    _oracle("fbgemm_gpu", "RowWiseAdagrad's peer")
    return torch


@contextlib.contextmanager
def num_threads(n):
    """Run the block with cembed's kernels on ``n`` threads (and the OpenMP runtime limited the
    same way through threadpoolctl, when it is installed)."""
    old = cembed._config._user_threads
    cembed.set_num_threads(n)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            yield
        else:
            with threadpool_limits(n, user_api="openmp"):
                yield
    finally:
        cembed.set_num_threads(old)


def at_thread_counts(fn, counts=(1, 2, 3)):
    """[fn() run with each thread count] — for the bitwise thread-independence tests."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(fn())
    return results


def backward_and_step(module, grad_output, opt, fused, indices=None):
    """One backward + update of ``module``: fused (``backward(..., optimizer=opt)``) or unfused
    (``backward``, ``opt.step()``, ``opt.zero_grad()``) — the two paths the fused tests compare;
    ``indices``: the lookup's indices given to the backward (else those of its forward)."""
    given = () if indices is None else (indices,)
    if fused:
        module.backward(grad_output, *given, optimizer=opt)
    else:
        module.backward(grad_output, *given)
        opt.step()
        opt.zero_grad()


def assert_bitwise_equal(a, b):
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, a.dtype, b.shape, b.dtype)
    assert a.tobytes() == b.tobytes(), "arrays differ bitwise"


_VECTORS = None


def vector(name):
    """One entry of torch_vectors.json (computed with torch 2.13.0 CPU; copied from ../shared)."""
    global _VECTORS
    if _VECTORS is None:
        with open(DATA / "torch_vectors.json") as fh:
            _VECTORS = {v["name"]: v for v in json.load(fh)["vectors"]}
    return _VECTORS[name]


def zipf_indices(rng, n, n_rows, a=1.1):
    """Zipf-distributed row ids in [0, n_rows): the skewed access pattern of real vocabularies."""
    return ((rng.zipf(a, n) - 1) % n_rows).astype(np.int64)


def fingerprint(*objs):
    """Bitwise fingerprint of nested arrays / dicts / lists / SparseGrads / scalars."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, (np.ndarray, np.generic)):
            a = np.asarray(o)
            h.update(f"A{a.dtype.str}{a.shape}".encode())
            h.update(np.ascontiguousarray(a).tobytes())
        elif isinstance(o, cembed.SparseGrad):
            h.update(f"S{o.shape}".encode())
            walk(o.indices)
            walk(o.values)
        elif isinstance(o, dict):
            h.update(b"{")
            for k in sorted(o, key=repr):
                h.update(repr(k).encode())
                walk(o[k])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for v in o:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr((type(o).__name__, o)).encode())

    walk(objs)
    return h.hexdigest()


def env_importing_this_cembed(**variables):
    """The environment of a subprocess that imports the cembed these tests import (run it with a
    ``cwd`` outside the source tree, which would shadow an installed package), plus ``variables``."""
    return dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cembed.__file__))),
                **variables)
