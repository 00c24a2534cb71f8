"""Import contracts between the layers, read from the source and checked in fresh interpreters.

Every import counts, the lazy ones inside functions included (`ast.walk` over the whole file),
and `from mergeaudit import geometry` counts as importing `mergeaudit.geometry`:

- the library (mergeaudit/*, except the application entry mergeaudit/cli.py) imports neither
  prefect nor the orchestration layer (`mergeaudit.flows`, `mergeaudit.tasks`,
  `mergeaudit.deployments`); no library module, the CLI included, names an orchestration module
  in a string (`load_entrypoint("flows.merge_audit:merge_audit")` was such an edge);
- evaluation never imports toy (toy may use evaluation's verifiers and packs);
- merging never imports geometry (the package imports the numba kernels) nor numba;
- report never imports merging;
- nothing imports the orchestration layer by the generic top-level names `flows`, `tasks`,
  `deployments`: only `mergeaudit.flows` and its siblings are installed.

The fresh interpreters check what importing a package (with every submodule) actually loads.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mergeaudit

LIBRARY = Path(mergeaudit.__file__).parent
REPO = Path(__file__).resolve().parent.parent
ORCHESTRATION = ("mergeaudit.flows", "mergeaudit.tasks", "mergeaudit.deployments")
GENERIC = ("flows", "tasks", "deployments")
APPLICATION = "mergeaudit.cli"  # the one library module that may start the orchestration layer
RULES = [  # (importer, forbidden import, why)
    ("mergeaudit.evaluation", "mergeaudit.toy", "evaluation is a library toy builds on, not the reverse"),
    ("mergeaudit.merging", "mergeaudit.geometry", "geometry's package imports the numba kernels"),
    ("mergeaudit.merging", "numba", "merging is torch only"),
    ("mergeaudit.report", "mergeaudit.merging", "the report lays out tables; it merges nothing"),
    *[
        ("mergeaudit", target, "the library never imports the orchestration layer")
        for target in ("prefect", *ORCHESTRATION)
    ],
]


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def orchestration_dir(package: str) -> Path:
    """The repository folder an orchestration package is installed from (flows/, tasks/, ...)."""
    return REPO / package.rpartition(".")[2]


def library_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the library proper (the orchestration packages
    are installed under mergeaudit/ but are not the library)."""
    out = {}
    for path in sorted(LIBRARY.rglob("*.py")):
        parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not any(within(name, o) for o in ORCHESTRATION):
            out[name] = path
    return out


def imports(path: Path, module: str) -> set[str]:
    """Every module `path` (the module `module`) may import, wherever the import statement is:
    `from a import b` yields `a` and `a.b`; relative imports are resolved; a constant string
    given to `importlib.import_module` or `__import__` counts too."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def orchestration_strings(path: Path) -> list[str]:
    """String constants that name a module of the orchestration layer (`flows.notify:serve`,
    `mergeaudit.flows.merge_audit`), by its generic or its installed name."""
    pattern = re.compile(r"(?:mergeaudit\.)?(flows|tasks|deployments)((?:\.\w+)+)(?::\w+)?")
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = pattern.fullmatch(node.value)
            if m:
                where = orchestration_dir(f"mergeaudit.{m.group(1)}").joinpath(*m.group(2).split(".")[1:2])
                if where.with_suffix(".py").is_file() or where.is_dir():
                    out.append(node.value)
    return out


def test_library_source_keeps_the_import_rules():
    offenders = []
    for module, path in library_modules().items():
        found = imports(path, module)
        for importer, forbidden, why in RULES:
            if within(module, importer) and not (importer == "mergeaudit" and module == APPLICATION):
                targets = sorted(t for t in found if within(t, forbidden))
                if targets:
                    offenders.append(f"{module} imports {', '.join(targets)}: {why}")
    assert not offenders, "\n".join(offenders)


def test_no_library_module_names_the_orchestration_layer_in_a_string():
    offenders = [f"{module}: {s!r}" for module, path in library_modules().items() for s in orchestration_strings(path)]
    assert not offenders, "import the module instead (lazily, in the CLI command that needs it): " + str(offenders)


def test_nothing_imports_the_orchestration_layer_by_a_generic_top_level_name():
    """`flows`, `tasks`, `deployments` are folders of the repository, installed as
    mergeaudit.flows, ...; a generic top-level import works only from the repository root."""
    folders = [
        LIBRARY,
        *(orchestration_dir(p) for p in ORCHESTRATION),
        *(REPO / d for d in ("tests", "benchmarks", "scripts") if (REPO / d).is_dir()),
    ]
    offenders = []
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module]
                    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module
                    else []
                )
                offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in GENERIC]
    assert not offenders, "\n".join(offenders)


@pytest.mark.integration
def test_the_orchestration_layer_is_installed_under_mergeaudit_only():
    for package in ORCHESTRATION:
        assert importlib.util.find_spec(package) is not None, package
    code = f"import importlib.util as u, json; print(json.dumps([n for n in {list(GENERIC)!r} if u.find_spec(n)]))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout) == [], "generic top-level packages are installed"


def loaded_after_importing(packages: list[str], watched: list[str], skip: tuple[str, ...] = ()) -> list[str]:
    """In a fresh interpreter, import each package and every submodule under it (but those
    under `skip`, not even their package: in a wheel, mergeaudit/flows/ is a subfolder), and
    return the watched names that ended up in sys.modules."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        f"skip = {skip!r}\n"
        "def walk(module):\n"
        "    for m in pkgutil.iter_modules(getattr(module, '__path__', []), prefix=module.__name__ + '.'):\n"
        "        if not any(m.name == s or m.name.startswith(s + '.') for s in skip):\n"
        "            walk(importlib.import_module(m.name))\n"
        f"for name in {packages!r}:\n"
        "    walk(importlib.import_module(name))\n"
        f"watched = {watched!r}\n"
        "print(json.dumps(sorted({w for w in watched for m in sys.modules if m == w or m.startswith(w + '.')})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("mergeaudit.merging", ["numba", "mergeaudit.geometry"]),
        ("mergeaudit.evaluation", ["mergeaudit.toy"]),
        ("mergeaudit.report", ["mergeaudit.merging"]),
    ],
)
@pytest.mark.integration
def test_importing_a_subsystem_leaves_what_it_must_not_use_unloaded(package, forbidden):
    assert loaded_after_importing([package], forbidden) == []


@pytest.mark.integration
def test_importing_every_library_module_leaves_prefect_and_the_orchestration_layer_unloaded():
    """The CLI included: it imports the flows inside the commands that run them."""
    assert loaded_after_importing(["mergeaudit"], ["prefect", *ORCHESTRATION], skip=ORCHESTRATION) == []
