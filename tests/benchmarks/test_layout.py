"""Repository layout: the installed package never imports the repository's ``benchmarks/`` or ``experiments/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_ONLY = ("benchmarks", "experiments")


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_no_source_file_imports_repository_code():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for path in sorted((ROOT / "src").rglob("*.py"))
        for line, module in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if module.split(".")[0] in REPO_ONLY
    ]
    assert not bad, "library code imports repository-only code:\n" + "\n".join(bad)


def test_the_scan_sees_every_import_form():
    code = "import benchmarks.run\nfrom experiments import x\nimportlib.import_module('benchmarks.run')\ndef f():\n    import os\n"
    assert [m for _, m in _imported_modules(ast.parse(code))] == ["benchmarks.run", "experiments", "benchmarks.run", "os"]


def test_cli_and_bench_leave_sys_modules_free_of_repository_code(tmp_path):
    """In a fresh interpreter, from a folder that is no checkout: import the CLI and run `attnfuse bench`."""
    code = (
        "import importlib, sys\n"
        "cli = importlib.import_module('attnfuse.cli.main')  # the module (attnfuse.cli.main is also the function)\n"
        "status = cli.main(['bench', '--quick'])\n"
        f"print(status, sorted(n for n in sys.modules if n.split('.')[0] in {REPO_ONLY!r}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "[]"]
    assert "error:" in proc.stderr


def test_repository_code_is_not_packaged():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["where"] == ["src"]
    assert not any((ROOT / "src" / name).exists() for name in REPO_ONLY)
