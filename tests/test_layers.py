"""The layers point down (STYLE.md "Layers"): services → worker → kernels.

Read from the source with `ast`, so type-only (`if TYPE_CHECKING:`) and function-local
imports count like any other: a module that needs another only for a type still
depends on it.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.unit

PACKAGES = ("services", "worker", "kernels")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (REPO / package).rglob("*.py")}


def _imported_names(module: str, path: Path) -> set[str]:
    """Every dotted name the module imports, relative imports resolved."""
    names: set[str] = set()
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    """Module → the package-internal modules it imports (`from a import b` counts as a.b
    when b is a module, else as a)."""
    modules = _modules()

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        targets = {owner(name) for name in _imported_names(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph)))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def _layer(module: str) -> str:
    return module.partition(".")[0]


def test_engine_and_kernels_never_import_services():
    upward = [f"{m} → {t}" for m, targets in _graph().items() for t in sorted(targets)
              if _layer(m) in ("worker", "kernels") and _layer(t) == "services"]
    assert upward == []


def test_kernels_import_only_kernels():
    outside = [f"{m} → {t}" for m, targets in _graph().items() for t in sorted(targets)
               if _layer(m) == "kernels" and _layer(t) != "kernels"]
    assert outside == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_checker_sees_type_only_and_local_imports(tmp_path):
    """The checker itself: imports under TYPE_CHECKING and inside functions count, and a
    circle is found."""
    path = tmp_path / "mod.py"
    path.write_text("from typing import TYPE_CHECKING\n"
                    "if TYPE_CHECKING:\n    from worker.engine import LLMEngine\n"
                    "def f():\n    from . import sibling\n")
    names = _imported_names("worker.mod", path)
    assert {"worker.engine.LLMEngine", "worker.sibling"} <= names
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_vocabulary_is_torch_free_and_self_contained():
    """worker/vocab is what the torch-less router shares with the engine: it imports the
    standard library and itself only."""
    modules = _modules()
    for module, path in modules.items():
        if not module.startswith("worker.vocab"):
            continue
        for name in _imported_names(module, path):
            top = name.partition(".")[0]
            assert top not in ("torch", "numpy", "services", "kernels"), (module, name)
            if top == "worker":
                assert name.startswith("worker.vocab"), (module, name)


def test_services_top_level_is_small():
    """services/ holds subpackages by job; at most a handful of modules sit on top."""
    top = sorted(p.name for p in (REPO / "services").glob("*.py"))
    assert len(top) <= 6, top
