"""The `Examples` sections of the docstrings run, against the imported (installed) cembed.

Every pure-Python module of the package is searched, except the command line (cembed.__main__)
and the applications (cembed.apps); compiled modules are skipped (their docstrings are the
Cython signatures). Output is compared with ELLIPSIS and NORMALIZE_WHITESPACE.
"""
import doctest
import inspect
import importlib
import importlib.machinery
import io
import pkgutil

import numpy as np
import pytest

import cembed

OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
SKIP = ("cembed.apps", "cembed.__main__")  # and everything below them


def _skipped(name):
    return any(name == s or name.startswith(s + ".") for s in SKIP)


def _module_names():
    """cembed and its modules, recursively, found without importing the skipped packages
    (pkgutil.walk_packages would import every package it descends into)."""
    names = ["cembed"]
    todo = [(cembed.__path__, "cembed.")]
    while todo:
        path, prefix = todo.pop()
        for info in pkgutil.iter_modules(path, prefix):
            if _skipped(info.name):
                continue
            names.append(info.name)
            if info.ispkg:
                todo.append((importlib.import_module(info.name).__path__, info.name + "."))
    return sorted(names)


def _is_compiled(module):
    path = getattr(module, "__file__", None) or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


MODULES = [name for name in _module_names() if not _is_compiled(importlib.import_module(name))]


def _doctests(name):
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]


def _run(test):
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    out = io.StringIO()
    old = np.get_printoptions()
    try:
        runner.run(test, out=out.write)
    finally:
        np.set_printoptions(**old)
    return doctest.TestResults(runner.failures, runner.tries), out.getvalue()


def test_modules_are_found():
    assert "cembed" in MODULES and "cembed.optim" in MODULES
    assert not any(_skipped(name) for name in MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    failures = []
    for test in _doctests(name):
        result, report = _run(test)
        if result.failed:
            failures.append(report)
    assert not failures, "\n".join(failures)


def _runnable(test):
    """Examples the runner attempts: all but those marked `# doctest: +SKIP`."""
    return sum(1 for ex in test.examples if not ex.options.get(doctest.SKIP, False))


N_RUNNABLE = sum(_runnable(t) for name in MODULES for t in _doctests(name))


def test_some_examples_run():
    """test_docstring_examples runs every one of these; none at all would make it vacuous."""
    assert N_RUNNABLE > 50, f"only {N_RUNNABLE} docstring examples to run"


def _public_callables():
    """(name, object) of every public function and class of cembed, cembed.functional and
    cembed.optim (and its lr_scheduler), and of the methods users call on modules and optimizers."""
    from cembed import functional, optim
    from cembed.optim import lr_scheduler

    methods = {"forward", "backward", "step", "zero_grad", "state_dict", "load_state_dict", "add_param_group",
               "save", "load", "to_dense", "merge", "from_pretrained", "apply_pending_decay", "prefetch"}
    found = []
    for module in (cembed, functional, optim, lr_scheduler):
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            found.append((f"{module.__name__}.{name}", obj))
            if inspect.isclass(obj) and not issubclass(obj, lr_scheduler.LRScheduler):
                for attr, member in vars(obj).items():
                    if attr in methods:
                        found.append((f"{module.__name__}.{name}.{attr}", member))
    return found


@pytest.mark.parametrize("name,obj", _public_callables(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_callables_have_examples(name, obj):
    """numpydoc docstrings with an Examples section on every public callable (they run above)."""
    doc = inspect.getdoc(obj.__func__ if isinstance(obj, classmethod) else obj) or ""
    assert "Examples" in doc and ">>>" in doc, f"{name} has no Examples section"
