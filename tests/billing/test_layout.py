"""The package's shape: dependencies between billing modules point one way.

Imports are read with ``ast`` (no module is imported), function-level imports included:
a lazy import hides a cycle from Python, not from the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "billing"

# Cycles still to cut, by the helper restructuring the web layer (issue 18): the Billing
# page uses the API's auth and snapshot readers, and the API mounts the page.
KNOWN_CYCLES = {frozenset({"billing.api", "billing.billing_page"})}


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
    found = set(cycles(import_graph()))
    assert found - KNOWN_CYCLES == set(), [sorted(c) for c in found - KNOWN_CYCLES]


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
