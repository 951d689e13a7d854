"""The package's shape: dependencies between billing modules point one way.

Imports are read with ``ast`` (no module is imported), function-level imports included:
a lazy import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "include" / "billing"
DEV_PACKAGE = ROOT / "dev" / "billing_dev"


def modules(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package's __init__) for every module under ``package``."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_init = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


def imported(source: str, name: str, is_init: bool, known) -> set[str]:
    """The billing modules that the module ``name`` imports anywhere in ``source``.

    ``from billing.pkg import sub`` names the submodule, not the package; a name not in
    ``known`` counts as its nearest known parent (``billing.platform.db.connect`` -> ``billing.platform.db``)."""
    here = name.split(".") if is_init else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
    out = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    return {
        name: imported(path.read_text(), name, is_init, mods)
        for name, (path, is_init) in mods.items()
    }


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_among_billing_modules():
    assert [sorted(c) for c in cycles(import_graph())] == []


def test_the_cycle_check_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "billing"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from billing.sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("from . import high\n")
    (pkg / "sub" / "high.py").write_text("from billing import low\n")
    graph = import_graph(pkg)
    assert graph == {
        "billing": set(),
        "billing.low": {"billing.sub.high"},
        "billing.sub": {"billing.sub.high"},
        "billing.sub.high": {"billing.low"},
    }
    assert cycles(graph) == [frozenset({"billing.low", "billing.sub.high"})]


# ---------------------------------------------------------------- settings
# Where BILLING_* variables may be read in the product: platform/settings.py only. (The
# development package, dev/billing_dev, reads its own: ports, stack folders, seeds.)
SETTINGS_READERS = {Path("platform") / "settings.py"}


def _billing_name(node: ast.expr, constants: dict[str, str]) -> str | None:
    """The BILLING_* variable an environment key names, if it is one."""
    if isinstance(node, ast.JoinedStr) and node.values:
        node = node.values[0]
    if isinstance(node, ast.Name):
        value = constants.get(node.id)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str):
        value = node.value
    else:
        return None
    return value if value and value.startswith("BILLING_") else None


def _is_environ(node: ast.expr) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def environment_reads(source: str) -> list[tuple[int, str]]:
    """(line, variable) of each read of a BILLING_* environment variable: ``os.environ.get``,
    ``os.environ[...]``, ``os.getenv`` with a literal, an f-string or a module constant."""
    tree = ast.parse(source)
    constants = {
        target.id: node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    reads = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args:
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in ("get", "setdefault", "pop")) and (
                _is_environ(f.value)
            ):
                key = node.args[0]
            elif (isinstance(f, ast.Attribute) and f.attr == "getenv") or (
                isinstance(f, ast.Name) and f.id == "getenv"
            ):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            if _is_environ(node.value):
                key = node.slice
        name = _billing_name(key, constants) if key is not None else None
        if name:
            reads.append((node.lineno, name))
    return sorted(reads)


def test_billing_settings_are_read_in_settings_only():
    found = [
        f"{path.relative_to(PACKAGE)}:{line}: {name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE) not in SETTINGS_READERS
        for line, name in environment_reads(path.read_text())
    ]
    assert found == []


def test_the_settings_check_sees_every_way_of_reading():
    source = """
import os
from os import environ, getenv
TOLERANCE = "BILLING_TOLERANCE"
PATH = "PATH"

def f(kind):
    os.environ.get("BILLING_A", "1")
    os.environ["BILLING_B"]
    os.getenv("BILLING_C")
    environ.get(TOLERANCE)
    getenv(f"BILLING_PORT_{kind}")
    os.environ.get(PATH), os.environ["HOME"], os.environ.get("AIRFLOW_HOME")
    os.environ["BILLING_WRITTEN"] = "not a read"
"""
    assert environment_reads(source) == [
        (8, "BILLING_A"),
        (9, "BILLING_B"),
        (10, "BILLING_C"),
        (11, "BILLING_TOLERANCE"),
        (12, "BILLING_PORT_"),
    ]


# ---------------------------------------------------------------- names


def test_a_class_name_means_one_thing():
    """No two product modules define a top-level class of the same name."""
    where: dict[str, set[str]] = {}
    for name, (path, _) in modules().items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, set()).add(name)
    shared = {cls: mods for cls, mods in where.items() if len(mods) > 1}
    assert shared == {}


# ---------------------------------------------------------------- the development package
PRODUCT_SOURCES = [PACKAGE, ROOT / "dags", ROOT / "plugins"]


def imports_of(source: str) -> set[str]:
    """Every module name an ``import`` or ``from ... import`` names, at any depth."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def dev_imports(folders) -> list[str]:
    """``<file relative to its folder>: <module>`` for each import of the dev package."""
    return [
        f"{path.relative_to(folder)}: {name}"
        for folder in folders
        for path in sorted(folder.rglob("*.py"))
        for name in sorted(imports_of(path.read_text()))
        if name == "billing_dev" or name.startswith("billing_dev.")
    ]


def test_the_product_never_imports_the_development_package():
    assert dev_imports(PRODUCT_SOURCES) == []


def test_the_dev_import_check_sees_nested_imports(tmp_path):
    (tmp_path / "m.py").write_text(
        "import billing_devtools\n"
        "def f():\n    from billing_dev.stack.manager import current\n    import billing_dev\n"
    )
    assert dev_imports([tmp_path]) == ["m.py: billing_dev", "m.py: billing_dev.stack.manager"]


def test_the_production_wheel_holds_the_product_only(tmp_path):
    """The wheel ``pip`` builds from pyproject.toml: every product module and its data
    (migrations, fonts, web assets), and nothing of the development package."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    (wheel,) = tmp_path.glob("billing-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"billing"}
    expected = {
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {n for n in names if n.startswith("billing/")} == expected
    dev_names = {p.stem for p in DEV_PACKAGE.rglob("*.py")} - {"__init__", "cli"}
    assert not {Path(n).stem for n in names} & dev_names
