"""Packages import one way: cache_tools <- pipeline <- student, and cache_tools loads without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports_in(path: Path, *, top_level_only: bool = False) -> set[str]:
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def _imports(package: str, *, top_level_only: bool = False) -> set[str]:
    return set().union(*(_imports_in(p, top_level_only=top_level_only) for p in (ROOT / package).rglob("*.py")))


@pytest.mark.parametrize(
    "package, forbidden",
    [("cache_tools", {"pipeline", "student"}), ("pipeline", {"student"}), ("student", set())],
)
def test_import_direction(package, forbidden):
    assert not (_imports(package) & forbidden), f"{package} imports {_imports(package) & forbidden}"


def test_cache_tools_imports_torch_only_inside_the_pooling_of_torch_tensors():
    # fidelity.pool_cells pools a torch tensor with torch (the build's and the student's nodes);
    # nothing at module level imports it, so cache tools run without torch
    assert "torch" not in _imports("cache_tools", top_level_only=True)
    lazy = {p.name for p in (ROOT / "cache_tools").rglob("*.py") if "torch" in _imports_in(p)}
    assert lazy <= {"fidelity.py"}, lazy


def test_cache_tools_imports_without_torch_dask_typer_rich():
    code = (
        "import sys, cache_tools, cache_tools.store, cache_tools.datasets, cache_tools.inspect; "
        "print(sorted(m for m in ('torch', 'dask', 'typer', 'rich') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_student_library_does_not_import_the_cli_stack():
    code = "import sys, student.train, student.data; print(sorted(m for m in ('dask', 'typer', 'rich') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
