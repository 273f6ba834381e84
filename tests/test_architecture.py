"""The layer rule of ARCHITECTURE.md, checked on the source: who may import whom.

kernels (``_*.pyx``) → ``_validation`` → ``_config`` → ``sparse`` → ``functional`` →
``modules``, ``optim`` → the package ``__init__`` and the optional ``distributed`` (which the package
does not import) → ``apps`` (public API only). Nothing outside
``apps/`` imports from it; ``functional`` and everything below it import no module and no optimizer;
modules and optimizers do not import each other.
"""
import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "cembed"

LAYER = {  # module (dotted, relative to cembed) -> layer number
    "_build_config": 0, "_validation": 1, "_config": 2,
    "sparse": 3, "functional": 4, "storage": 4,
    "modules": 5, "optim": 5, "checkpoint": 5,
    "__init__": 6, "distributed": 6, "apps": 7, "__main__": 8,
}


def _layer(module):
    head = module.split(".")[0]
    if head.startswith("_") and head not in LAYER:
        return 0  # a compiled kernel module
    return LAYER[head]


def _python_modules():
    if not PACKAGE.is_dir():
        pytest.skip("the source tree is not next to the tests")
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        yield ".".join(parts), path


def _imports(module, path):
    """The cembed modules (first dotted component, e.g. ``functional``, ``_grad``, ``apps``) that
    ``module`` imports, absolutely (``cembed.x``) or relatively; ``__init__`` for the package itself."""
    tree = ast.parse(path.read_text(), str(path))
    depth = module.count(".") + (1 if path.name == "__init__.py" and module != "__init__" else 0)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "cembed"]
            found |= {n.split(".")[1] if "." in n else "__init__" for n in names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if not node.module or node.module.split(".")[0] != "cembed":
                    continue
                parts = node.module.split(".")[1:]
            else:
                up = node.level - 1
                anchor = module.split(".")[:depth - up] if depth - up > 0 else []
                if up > depth:
                    raise AssertionError(f"{module}: relative import above the package")
                parts = anchor + (node.module.split(".") if node.module else [])
            if parts:
                found.add(parts[0])
            else:  # from cembed import x / from . import x at the top
                found |= {a.name for a in node.names}
    return found


def test_every_import_goes_down_the_layers():
    problems = []
    for module, path in _python_modules():
        own = _layer(module)
        for target in _imports(module, path):
            if target == module.split(".")[0]:
                continue  # inside the same subpackage
            if target == "__init__" and own >= 7:
                continue  # apps and __main__ use the public API through the package
            if _layer(target) >= own:
                problems.append(f"{module} (layer {own}) imports {target} (layer {_layer(target)})")
    assert not problems, "\n".join(problems)


def test_nothing_outside_apps_imports_apps():
    offenders = [module for module, path in _python_modules()
                 if not module.startswith("apps") and module != "__main__" and "apps" in _imports(module, path)]
    assert not offenders, offenders


def test_apps_use_only_the_public_api():
    offenders = []
    for module, path in _python_modules():
        if not module.startswith("apps"):
            continue
        for target in _imports(module, path):
            if target.startswith("_") and target != "__init__":
                offenders.append(f"{module} imports the private {target}")
    assert not offenders, "\n".join(offenders)


def test_distributed_uses_only_the_public_layers_and_imports_ray_lazily():
    """cembed.distributed builds on modules/optim/functional like a user would (no kernels), the
    package does not import it, and no module imports Ray at the top level."""
    offenders = []
    for module, path in _python_modules():
        if module.startswith("distributed"):
            offenders += [f"{module} imports the private {t}" for t in _imports(module, path)
                          if t.startswith("_") and t not in ("__init__",)]
        if module == "__init__" and "distributed" in _imports(module, path):
            offenders.append("cembed/__init__.py imports distributed")
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:   # top-level statements only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{module} imports {n} at the top level" for n in names if n.split(".")[0] == "ray"]
    assert not offenders, "\n".join(offenders)


def test_kernels_cimport_only_shared_declarations():
    for path in sorted(PACKAGE.glob("_*.pyx")):
        text = path.read_text()
        for match in re.finditer(r"^\s*(?:from\s+(\S+)\s+)?c?import\s+(\S+)", text, re.M):
            target = match.group(1) or match.group(2)
            if target.startswith("cembed."):
                assert (PACKAGE / (target[len("cembed."):] + ".pxd")).exists(), f"{path.name} imports {target}"


def test_layer_check_catches_a_violation(tmp_path):
    """The checker itself: an upward import is reported."""
    bad = tmp_path / "functional.py"
    bad.write_text("from .modules import Embedding\nfrom . import optim\nimport cembed.apps.cli\n")
    assert _imports("functional", bad) == {"modules", "optim", "apps"}
    nested = tmp_path / "lr_scheduler.py"
    nested.write_text("from .. import _optim\nfrom ..sparse import SparseGrad\nfrom . import clip\n")
    assert _imports("optim.lr_scheduler", nested) == {"_optim", "sparse", "optim"}
    assert all(_layer(t) >= _layer("functional") for t in ("modules", "optim", "apps"))


def test_sources_compile_without_warnings():
    """No source of the package, its tests or benchmarks compiles with a warning (an invalid escape
    sequence such as ``"\\w"`` in a docstring is a DeprecationWarning today and a SyntaxError later)."""
    import warnings

    root = PACKAGE.parent
    sources = [p for d in ("cembed", "tests", "benchmarks") for p in (root / d).rglob("*.py")] + [root / "setup.py"]
    assert len(sources) > 30
    for path in sources:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            compile(path.read_text(encoding="utf-8"), str(path), "exec")
