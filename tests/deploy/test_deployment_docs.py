"""docs/DEPLOYMENT.md and deploy/ name only what the code reads, and lint clean.

No services: the settings and connection ids are parsed from the product's own modules,
the linters are the pinned ones from requirements-dev.txt (run from the venv's bin).
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from billing import orchestration
from billing.platform import connections, settings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "DEPLOYMENT.md"
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
VALUES = sorted((DEPLOY / "helm").glob("*.yaml"))
BIN = Path(sys.executable).parent

SETTING = re.compile(r"\bBILLING_[A-Z][A-Z0-9_]*\b(?!\.md)")  # not BILLING_API.md
# Where a text names a connection id: its env var, a secret path, a conn_id, the user part
# of an ObjectStoragePath URI, "<id> connection" / "connection `<id>`".
CONN_PATTERNS = (
    re.compile(r"\bAIRFLOW_CONN_([A-Z0-9_]+)"),
    re.compile(r"\bconnections/([a-z][a-z0-9_]*)"),
    re.compile(r"\bconn_id\W{1,3}([a-z][a-z0-9_]*)"),
    re.compile(r"\b[a-z0-9]+://([a-z][a-z0-9_]*)@"),
    re.compile(r"`?\b([a-z][a-z0-9]*_[a-z0-9_]+)`?\s+connection\b"),
    re.compile(r"\bconnection\s+`([a-z][a-z0-9_]*)`"),
)


def deployment_texts() -> dict[str, str]:
    files = [DOC, *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def settings_read() -> set[str]:
    """Every BILLING_* name settings.py passes to code (environ lookups, constants), not the
    ones only its docstrings mention."""
    tree = ast.parse(Path(settings.__file__).read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.FunctionDef | ast.ClassDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
        and SETTING.fullmatch(node.value)
    }


def connection_ids(text: str) -> set[str]:
    return {m.group(1).lower() for pattern in CONN_PATTERNS for m in pattern.finditer(text)}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def test_every_billing_setting_named_is_read_by_settings():
    known = settings_read()
    assert "BILLING_LANDING_URI" in known and "BILLING_RECONCILE_TOLERANCE" in known
    unknown = {
        (path, name)
        for path, text in deployment_texts().items()
        for name in SETTING.findall(text)
        if name not in known
    }
    assert unknown == set()


def test_every_connection_id_named_is_one_connections_defines():
    named = {path: connection_ids(text) for path, text in deployment_texts().items()}
    unknown = {(path, c) for path, ids in named.items() for c in ids if c not in connections.ALL}
    assert unknown == set()
    # The guide covers each connection the code reads.
    assert set(connections.ALL) <= named[str(DOC.relative_to(ROOT))]


def test_helm_values_pass_yamllint():
    assert [p.name for p in VALUES] == ["values-celery.yaml", "values-kubernetes.yaml"]
    proc = subprocess.run(
        [str(BIN / "yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint"), *map(str, VALUES)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_values_run_billing_on_its_image_with_its_pools():
    for path in VALUES:
        values = yaml.safe_load(path.read_text())
        assert (
            values["executor"]
            == {
                "values-celery.yaml": "CeleryExecutor",
                "values-kubernetes.yaml": "KubernetesExecutor",
            }[path.name]
        )
        assert values["images"]["airflow"]["repository"].endswith("/billing-airflow")
        assert values["postgresql"]["enabled"] is False
        assert values["data"]["metadataSecretName"]
        assert values["config"]["secrets"]["backend"]
        assert values["dagProcessor"]["enabled"] is True
        script = values["migrateDatabaseJob"]["args"][-1]
        pools = {
            words[3]: int(words[4])
            for line in script.splitlines()
            if (words := shlex.split(line))[:3] == ["airflow", "pools", "set"]
        }
        # One dbt process at a time on the rollups (docs/DEPLOYMENT.md, chDB rule).
        assert pools == {orchestration.CLICKHOUSE_POOL: 1, orchestration.STRIPE_POOL: 2}
        assert script.splitlines()[-1] == "billing db migrate"  # billing's own schema, last


def test_dockerfile_passes_hadolint():
    proc = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_builds_on_the_pinned_airflow_and_python():
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    python = re.search(r">=(3\.\d+)", requires).group(1)
    froms = [args for op, args in dockerfile_instructions() if op == "FROM"]
    assert froms == [f"apache/airflow:{pins['apache-airflow']}-python{python}"]


def test_dockerfile_installs_the_runtime_lock_and_the_product_only():
    instructions = dockerfile_instructions()
    copies = {
        args.split()[-1]: args.split()[-2] for op, args in instructions if op == "COPY"
    }  # destination -> source (the --chown flag comes first)
    runs = " ".join(args for op, args in instructions if op == "RUN")
    requirement_files = [copies.get(m) for m in re.findall(r"-r\s+(\S+)", runs)]
    assert requirement_files == ["requirements.txt"]
    assert "requirements-dev" not in " ".join(args for _, args in instructions)
    assert not [s for s in copies.values() if s == "dev" or s.startswith(("dev/", "./dev"))]
    assert "pip install --no-cache-dir --no-deps /tmp/billing/src" in runs
    assert copies["/tmp/billing/src/include/billing"] == "include/billing"
    assert "billing transform --parse" in runs
    for source in copies.values():
        assert (ROOT / source).exists(), source
    ignored = (ROOT / ".dockerignore").read_text().split()
    for excluded in (".venv", ".local", "dbt_project/target", "tests", "bench", "dev"):
        assert excluded in ignored
    assert not set(copies.values()) & set(ignored)
