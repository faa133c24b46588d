"""Packages import one way: cache_tools <- pipeline <- student, and cache_tools stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [("cache_tools", {"pipeline", "student", "torch"}), ("pipeline", {"student"}), ("student", set())],
)
def test_import_direction(package, forbidden):
    assert not (_imports(package) & forbidden), f"{package} imports {_imports(package) & forbidden}"


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
