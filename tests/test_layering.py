"""Layering (issue 16): the import-linter contracts in pyproject.toml hold for vlp, and the same kinds of
contract do catch a cycle and an upward import (checked on a small package written here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = shutil.which("lint-imports")
pytestmark = pytest.mark.skipif(LINT is None, reason="import-linter is not installed (pip install -e .[dev])")


def lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(pythonpath)})


def test_vlp_keeps_its_import_contracts() -> None:
    proc = lint(ROOT, ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_the_contracts_catch_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    for sub in ("data", "train"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("from pkg.data import b\nfrom pkg.train import loop\n")
    (pkg / "data" / "b.py").write_text("def f():\n    from pkg.data import a\n")  # a lazy import counts too
    (pkg / "train" / "loop.py").write_text("")
    (tmp_path / ".importlinter").write_text(textwrap.dedent("""
        [importlinter]
        root_package = pkg

        [importlinter:contract:up]
        name = data imports no training code
        type = forbidden
        source_modules = pkg.data
        forbidden_modules = pkg.train

        [importlinter:contract:cycles]
        name = no cycles
        type = acyclic_siblings
        ancestors = pkg
        """))
    proc = lint(tmp_path, tmp_path)
    assert proc.returncode != 0
    assert "data imports no training code BROKEN" in proc.stdout and "no cycles BROKEN" in proc.stdout, proc.stdout


def test_the_contracts_carry_no_exceptions() -> None:
    """Layering holds without `ignore_imports`: an import that breaks it is moved, not excused."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert contracts and all(not c.get("ignore_imports") for c in contracts), [c["name"] for c in contracts]


# a probe of a third-party object's API (timm trunks without forward_intermediates), not a vlp capability
HASATTR_ALLOWED = {("vlp/backbone.py", "forward_intermediates")}


def _functions_and_probes() -> tuple[list[str], list[tuple[str, str]]]:
    import ast

    long, probes = [], []
    for path in sorted((ROOT / "vlp").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{rel}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "hasattr"
                    and len(node.args) == 2 and isinstance(node.args[1], ast.Constant)):
                probes.append((rel, node.args[1].value))
    return long, probes


def test_no_function_over_60_lines_and_no_capability_probes() -> None:
    long, probes = _functions_and_probes()
    assert not long, long
    assert set(probes) <= HASATTR_ALLOWED, sorted(set(probes) - HASATTR_ALLOWED)
