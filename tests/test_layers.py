"""The layering, checked on the import graph read from the source (docs/architecture.md).

- `passes/` (installed as `fxprune.passes`) is the graph layer: it imports nothing from `fxprune/`
  except the error types (`fxprune.errors`) and the kernel ops (`fxprune.kernels`), and those two
  never lead back into `passes/`.
- No import cycles among the project's modules (module-level imports; a package's implicit import
  of its parent is Python's, not ours).
- No function-local imports of project modules, except a module whose import needs an optional
  third-party package (listed below with the package).
- No global `passes` module: what is installed is `fxprune.passes`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fxprune": ROOT / "fxprune", "fxprune.passes": ROOT / "passes"}
ALLOWED_FROM_PASSES = ("fxprune.errors", "fxprune.kernels")
LOCAL_IMPORTS_FOR_OPTIONAL_PACKAGES = {"fxprune.kernels.triton_conv": "triton"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *rel))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _targets(module: str, node: ast.AST) -> list[str]:
    """Project modules an import statement names (submodules where `from x import sub` is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module if _is_package(module) else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                anchor = anchor.rpartition(".")[0]
            base = f"{anchor}.{base}" if base else anchor
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    out = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            out.append(name)
    return out


def _imports(module: str) -> tuple[set[str], list[tuple[int, str]]]:
    """(module-level targets, [(line, target)] of imports inside functions)."""
    tree = ast.parse(MODULES[module].read_text())
    top, local = set(), []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child):
                    if in_function:
                        local.append((child.lineno, target))
                    else:
                        top.add(target)
            walk(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return top, local


GRAPH = nx.DiGraph()
LOCAL: dict[str, list] = {}
for _name in MODULES:
    _top, LOCAL[_name] = _imports(_name)
    GRAPH.add_node(_name)
    GRAPH.add_edges_from((_name, t) for t in _top if t != _name)


def test_the_graph_layer_imports_only_errors_and_kernels_from_above():
    wrong = [(m, t) for m, t in GRAPH.edges if m.startswith("fxprune.passes") and not t.startswith("fxprune.passes")
             and not t.startswith(ALLOWED_FROM_PASSES)]
    assert not wrong, f"passes/ reaches into fxprune/: {wrong}"


@pytest.mark.parametrize("allowed", ALLOWED_FROM_PASSES)
def test_what_the_graph_layer_takes_from_above_never_leads_back(allowed):
    starts = [m for m in MODULES if m == allowed or m.startswith(allowed + ".")]
    reached = set().union(*(nx.descendants(GRAPH, s) for s in starts))
    back = sorted(m for m in reached if m.startswith("fxprune.passes"))
    assert not back, f"{allowed} imports {back}"


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(GRAPH))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_no_function_local_project_imports():
    offending = [f"{m}:{line} imports {t}" for m, items in LOCAL.items() for line, t in items
                 if t not in LOCAL_IMPORTS_FOR_OPTIONAL_PACKAGES]
    assert not offending, "\n".join(offending)
    for module, package in LOCAL_IMPORTS_FOR_OPTIONAL_PACKAGES.items():  # the exception is still needed
        assert f"import {package}" in MODULES[module].read_text()


def test_no_global_passes_module(tmp_path):
    """Outside the checkout (no repository root on sys.path) `fxprune.passes` imports and `passes` does not."""
    import os
    import subprocess
    import sys

    code = ("import importlib.util, fxprune.passes.dependency as d; "
            "print(importlib.util.find_spec('passes') is None, d.__name__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "fxprune.passes.dependency"]
