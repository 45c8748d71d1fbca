"""The layer rules of docs (ARCHITECTURE): imports point downward only.

Checked on the source with `ast`, so a violation fails CI however deep the import is hidden
(inside a function, under TYPE_CHECKING, relative or absolute).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mlctrio"

# layer -> modules it must never import (prefixes of absolute module names)
FORBIDDEN = {
    "engine": (
        "trio",
        "tvm",
        "quart",
        "quart_trio",
        "hypercorn",
        "prometheus_client",
        "mlctrio.protocol",
        "mlctrio.server",
        "mlctrio.runtime",
        "mlctrio.models",
        "mlctrio.service",
    ),
    # The server gets its engines (one per served model) built: loading is model_loads.py's.
    "server": (
        "tvm",
        "mlctrio.runtime",
        "mlctrio.models",
        "mlctrio.testing",
        "mlctrio.loader",
        "mlctrio.model_loads",
        "mlctrio.serve",
    ),
    "models": (
        "trio",
        "quart",
        "quart_trio",
        "hypercorn",
        "prometheus_client",
        "mlctrio.engine",
        "mlctrio.protocol",
        "mlctrio.server",
        "mlctrio.runtime",
        "mlctrio.service",
        "mlctrio.testing",
    ),
    "runtime": (
        "trio",
        "quart",
        "quart_trio",
        "hypercorn",
        "prometheus_client",
        "mlctrio.server",
        "mlctrio.service",
        "mlctrio.testing",
    ),
    "testing": ("quart", "quart_trio", "hypercorn", "mlctrio.server", "mlctrio.service"),
    "protocol": (
        "quart",
        "quart_trio",
        "hypercorn",
        "trio",
        "tvm",
        "mlctrio.engine",
        "mlctrio.server",
        "mlctrio.runtime",
        "mlctrio.models",
        "mlctrio.service",
    ),
}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def _files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports(layer: str) -> None:
    files = _files(layer)
    assert files, f"no modules in {layer}/"
    bad = []
    for path in files:
        for name in _imports(path):
            for forbidden in FORBIDDEN[layer]:
                if name == forbidden or name.startswith(forbidden + "."):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_the_checker_sees_relative_imports(tmp_path: Path) -> None:
    # A guard against a checker that can never fail: resolve a relative import by hand.
    path = PACKAGE / "server" / "app.py"
    names = _imports(path)
    assert "mlctrio.service" in names
    assert "mlctrio.errors" in names


def test_every_package_has_layer_rules() -> None:
    """A new package must say what it may not import (an entry in FORBIDDEN)."""
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert packages <= set(FORBIDDEN), f"packages without layer rules: {packages - set(FORBIDDEN)}"


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for imported in _imports(path):
            parts = imported.split(".")
            for k in range(len(parts), 0, -1):  # the longest prefix that is one of our modules
                candidate = ".".join(parts[:k])
                if candidate in modules:
                    if candidate != name:
                        deps.add(candidate)
                    break
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    """No two modules of mlctrio import each other, directly or through others (imports inside
    functions and under TYPE_CHECKING count too: a cycle there is still a tangle)."""
    assert _cycles(_module_graph()) == []


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(graph) == [["a", "b", "c"]]
