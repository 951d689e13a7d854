"""`billing sql` is read-only by construction on the embedded stack (chDB).

Each attack is the one from the issue, with the stack's real secrets and ports: the
ClickHouse engine refuses it (``readonly=1`` session: "Cannot execute query in readonly
mode"), except what chDB runs outside the engine's check (``INTO OUTFILE``, the scalar
``file()``, ``python()``), which the check of ClickHouse's own parse stops first. Every refusal is one line on
stderr, exit 2, and nothing leaks to stdout or disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

ENGINE_REFUSAL = (
    "billing: error: billing sql is read-only: ClickHouse refused it (default: Cannot execute "
    "query in readonly mode. (READONLY)); no writes, settings or table functions such as "
    "file(), url() or postgresql()"
)


def sql(query: str, *extra: str) -> subprocess.CompletedProcess:
    """``billing sql`` in a child process: chDB allows one process per data path."""
    return subprocess.run(
        [sys.executable, "-m", "billing.cli", "sql", query, *extra],
        capture_output=True,
        text=True,
        env=os.environ,
        timeout=120,
    )


def refused(out: subprocess.CompletedProcess, secrets: dict) -> str:
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for value in secrets.values():
        assert value not in out.stderr
    return lines[0]


@pytest.fixture
def state(stack) -> dict:
    return json.loads(stack.state_file.read_text())


def test_file_reading_the_stack_secrets_is_refused_by_the_engine(stack, state):
    out = sql(f"SELECT * FROM file('{stack.state_file}', 'RawBLOB')")
    assert refused(out, state["secrets"]) == ENGINE_REFUSAL


def test_postgresql_with_the_stack_secrets_is_refused_by_the_engine(state):
    pw = state["secrets"]["postgres_password"]
    port = state["ports"]["postgres"]
    out = sql(
        f"SELECT org_id FROM postgresql('127.0.0.1:{port}', 'billing', 'organizations', "
        f"'billing', '{pw}', 'billing')"
    )
    # The query text carries the password; the refusal must not echo it.
    assert refused(out, state["secrets"]) == ENGINE_REFUSAL


def test_url_to_the_stripe_emulator_is_refused_by_the_engine(state):
    key = state["secrets"]["stripe_api_key"]
    out = sql(
        f"SELECT * FROM url('http://127.0.0.1:{state['ports']['stripe']}/v1/customers', "
        f"'RawBLOB', headers('Authorization' = 'Bearer {key}'))"
    )
    assert refused(out, state["secrets"]) == ENGINE_REFUSAL


def test_scalar_file_and_python_are_refused(stack, state):
    """chDB runs these without the readonly check: file(path) as a scalar reads any file
    the user can, python() reads objects of the calling process."""
    out = sql(f"SELECT file('{stack.state_file}') AS s")
    assert refused(out, state["secrets"]) == (
        "billing: error: billing sql is read-only: file() reads the local machine, not allowed"
    )
    out = sql("SELECT * FROM python(parameters)")
    assert refused(out, state["secrets"]) == (
        "billing: error: billing sql is read-only: python() reads the local machine, not allowed"
    )


def test_into_outfile_into_the_landing_zone_writes_nothing(state):
    landing = Path(urlsplit(os.environ["BILLING_LANDING_URI"]).path)
    target = landing / "usage" / "dt=2031-01-02" / "forged.jsonl"
    line = json.dumps(
        {
            "event_id": "forged-1",
            "org_id": "org-0001",
            "metric": "api_calls",
            "quantity": "1000000",
            "occurred_at": "2031-01-02T00:00:00Z",
        }
    )
    for query in (
        f"SELECT '{line}' INTO OUTFILE '{target}' FORMAT RawBLOB",
        f"EXPLAIN SELECT 1 INTO OUTFILE '{target}'",
        f"SHOW TABLES INTO OUTFILE '{target}' APPEND",
    ):
        out = sql(query)
        assert refused(out, state["secrets"]) == (
            "billing: error: billing sql is read-only: INTO OUTFILE is not allowed"
        )
    assert not target.exists()
    assert not target.parent.exists()


def test_more_than_one_statement_is_refused(stack, state):
    out = sql(f"SELECT 1; SELECT * FROM file('{stack.state_file}', 'RawBLOB')")
    assert refused(out, state["secrets"]) == (
        "billing: error: not one ClickHouse statement: Syntax error (Multi-statements are not "
        "allowed): failed at position 9 (end of query): ; SELECT * FROM file('"
        f"{stack.state_file}', 'RawBLOB'). (SYNTAX_ERROR)"
    )


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("DROP DATABASE analytics", "got DROP"),
        ("SET readonly = 0", "got SET"),
        ("INSERT INTO FUNCTION file('x.csv', 'CSV') SELECT 1", "got INSERT"),
    ],
)
def test_anything_but_a_read_is_refused(state, query, message):
    line = refused(sql(query), state["secrets"])
    assert line == (
        "billing: error: only a single read-only statement "
        f"(SELECT/WITH/SHOW/DESCRIBE/EXPLAIN/EXISTS) is allowed, {message}"
    )


def test_unknown_table_is_one_line():
    out = sql("SELECT 1 FROM nope_table")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (
        "billing: error: ClickHouse: Unknown table expression identifier 'nope_table'. In "
        "scope SELECT 1 FROM nope_table. (UNKNOWN_TABLE)\n"
    )


@pytest.mark.parametrize(
    ("query", "rows"),
    [
        ("SELECT ';' AS s", [{"s": ";"}]),
        ("-- a comment\nSELECT 1 AS one", [{"one": 1}]),
        ("SELECT 2 AS two; -- trailing", [{"two": 2}]),
        ("SHOW DATABASES LIKE 'system'", [{"name": "system"}]),
    ],
)
def test_harmless_queries_work(stack, query, rows):
    out = sql(query, "--format", "json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == rows
