"""Import contracts: the JAX adapter modules import no other framework or adapter, and the
framework-free reader (``lattice.interop.arrays``) imports no framework at all."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def bad(names: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("name", ["jax.py", "jax_tree.py"])
def test_jax_adapter_modules_import_no_other_framework(name: str) -> None:
    names = imports(REPO / "lattice" / "adapters" / name, "lattice.adapters")
    assert "jax" in names
    assert bad(names, ("torch", "tensorflow", "lattice.adapters.torch", "lattice.adapters.tensorflow",
                       "lattice.adapters.python", "lattice.runtime", "lattice.interop")) == []


def test_the_array_reader_imports_no_framework() -> None:
    names = imports(REPO / "lattice" / "interop" / "arrays.py", "lattice.interop")
    assert "lattice.core.restore" in names  # the resolver resolves relative imports
    assert bad(names, ("torch", "tensorflow", "jax", "orbax", "lattice.adapters", "lattice.runtime")) == []
