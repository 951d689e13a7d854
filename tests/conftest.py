"""Test fixtures: one real local stack per test session.

Each session's stack lives in its own folder (``.local/tests/session-<pid>``) with its own
ports, so tests never touch a developer's demo data or another session's; connections reach the code through ``AIRFLOW_CONN_*`` env vars,
exactly as in production.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One stack per test session (its own ports and data), so parallel sessions never share state.
# Set BILLING_TEST_STACK_DIR to reuse a stack between runs while developing.
_REUSE = os.environ.get("BILLING_TEST_STACK_DIR")
TEST_STACK = Path(_REUSE or ROOT / ".local" / "tests" / f"session-{os.getpid()}")


def pytest_configure(config):
    # Must run before anything imports Airflow: Airflow reads AIRFLOW_HOME at import time.
    os.environ["BILLING_LOCAL_DIR"] = str(TEST_STACK)
    os.environ.setdefault("BILLING_LANDING_URI", (TEST_STACK / "landing").as_uri())
    os.environ.setdefault("BILLING_MAIL_DIR", str(TEST_STACK / "mail"))
    # dbt's artifacts per session too (parallel sessions and xdist workers never share
    # run_results.json), starting from the manifests `make setup` pre-built.
    from billing.platform import settings

    built = settings.dbt_target_dir()
    os.environ["BILLING_DBT_TARGET_DIR"] = str(TEST_STACK / "dbt-target")
    _seed_dbt_target(built, settings.dbt_target_dir())
    from billing_dev.stack.manager import Stack

    stack = Stack(TEST_STACK)
    state = stack._init_state()
    os.environ.update(stack.env(state))


def _seed_dbt_target(built: Path, dest: Path) -> None:
    from billing.transform.project import TARGETS

    for target in TARGETS:
        src, dst = built / target, dest / target
        if dst.exists() or not src.exists():
            continue
        dst.mkdir(parents=True, mode=0o700)
        for name in ("manifest.json", "cosmos_manifest.json", "partial_parse.msgpack"):
            if (src / name).exists():
                shutil.copy2(src / name, dst / name)


def pytest_unconfigure(config):
    if not _REUSE:
        shutil.rmtree(TEST_STACK, ignore_errors=True)


@pytest.fixture(scope="session")
def stack():
    """Start the real services once for the whole session; stop them at the end."""
    from billing_dev.stack.manager import Stack

    s = Stack(TEST_STACK)
    s.up()
    yield s
    if not _REUSE:
        s.destroy()  # with PostgreSQL's data outside the checkout (/var/tmp/billing-*), if any


@pytest.fixture
def pg(stack):
    """A fresh connection to the test database (autocommit off)."""
    from billing.platform import db

    with db.connect() as cx:
        yield cx


def _empty_billing_db() -> None:
    """Empty every billing table (but keep the schema) and drop the derived snapshot."""
    from psycopg import sql

    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        tables = [
            r[0]
            for r in cx.execute(
                """SELECT format('%I.%I', schemaname, tablename) FROM pg_tables
               WHERE schemaname = 'billing' AND tablename <> 'schema_migrations'"""
            ).fetchall()
        ]
        if tables:
            cx.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        # The invoice snapshot is derived from those tables: dbt's incremental state of an
        # earlier test (its orgs, its periods) must not leak into this one's first build.
        from billing.platform import settings
        from billing.transform import project as transform

        for schema in (transform.SNAPSHOT_BUILD_SCHEMA, settings.snapshot_schema()):
            cx.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(scope="session")
def empty_billing_db(stack):
    """The function that empties the billing DB, for module-scoped setups (see clean_db)."""
    return _empty_billing_db


@pytest.fixture
def clean_db(stack):
    """Empty every billing table (but keep the schema) before a test."""
    _empty_billing_db()
    yield
