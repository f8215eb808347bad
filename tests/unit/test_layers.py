"""The layers import only downwards: vmm, then edge, then fleet, then mvm (the command on top).

Every module's imports are read (also those inside functions). The SDK (microvm_edge) and the
guest-side code (images/) import nothing of the server: they are shipped to other machines.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("vmm", "edge", "fleet", "mvm")  # lowest first
SERVER = frozenset(LAYERS)
APART = ("microvm_edge", "images")  # may import none of the server's packages


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_no_layer_above_it(layer: str) -> None:
    above = set(LAYERS[LAYERS.index(layer) + 1 :])
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {package}"
        for path in _modules(layer)
        for line, package in _imports(path)
        if package in above
    ]
    assert not wrong, f"{layer} is below {sorted(above)}: " + "; ".join(wrong)


@pytest.mark.parametrize("package", APART)
def test_the_sdk_and_the_guest_code_import_nothing_of_the_server(package: str) -> None:
    wrong = [
        f"{path.relative_to(REPO)}:{line} imports {imported}"
        for path in _modules(package)
        for line, imported in _imports(path)
        if imported in SERVER
    ]
    assert not wrong, "; ".join(wrong)


def test_every_server_package_is_a_layer() -> None:
    """A new top-level package of the server must take its place in LAYERS (or APART)."""
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests", "bench"}
    assert packages == SERVER | {"microvm_edge"}
