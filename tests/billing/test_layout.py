"""The package's shape: dependencies between billing modules point one way.

Imports are read with ``ast`` (no module is imported), function-level imports included:
a lazy import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "billing"


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
    ``known`` counts as its nearest known parent (``billing.db.connect`` -> ``billing.db``)."""
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
# Where BILLING_* variables may be read: settings.py, and the development machinery (the
# local stack, the simulation, fault proxy, demo and usage generator), which is to move to
# its own package.
SETTINGS_READERS = {"settings.py", "simulate.py", "faults.py", "demo.py", "usage_gen.py"}


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
        if "stack" not in path.relative_to(PACKAGE).parts and path.name not in SETTINGS_READERS
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
    """No two product modules define a top-level class of the same name (the local stack
    mirrors Stripe's names and is left out)."""
    where: dict[str, set[str]] = {}
    for name, (path, _) in modules().items():
        if name.startswith("billing.stack"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                where.setdefault(node.name, set()).add(name)
    shared = {cls: mods for cls, mods in where.items() if len(mods) > 1}
    assert shared == {}
