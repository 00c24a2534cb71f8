"""The library never imports Prefect; flows and tasks import the library, never the reverse."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import mergeaudit

ROOT = Path(mergeaudit.__file__).parent


def test_no_prefect_or_orchestration_import_in_library_source():
    offenders = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("prefect", "flows", "tasks", "deployments"):
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_importing_every_library_module_leaves_prefect_unloaded():
    modules = [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="mergeaudit.")]
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('prefect' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
