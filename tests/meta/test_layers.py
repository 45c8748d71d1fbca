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
    "server": ("tvm", "mlctrio.runtime", "mlctrio.models", "mlctrio.testing"),
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
