"""PostgreSQL access: connections with statement timeouts, and schema migrations.

Migrations are ordered SQL files in ``billing/migrations``; each is applied once, in its
own transaction, under an advisory lock so concurrent starters don't race.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from importlib import resources

import psycopg

from billing import connections as conns
from billing.errors import ServiceError

MIGRATION_LOCK = 7_202_611  # advisory lock key for migrations


def statement_timeout_ms() -> int:
    return int(os.environ.get("BILLING_PG_STATEMENT_TIMEOUT_MS", "300000"))


def connect(autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """Open a connection to the OLTP database named by the ``billing_postgres`` connection."""
    dsn = conns.postgres_dsn()
    try:
        cx = psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=10,
            options=f"-c statement_timeout={statement_timeout_ms()} -c timezone=UTC",
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ServiceError(
            f"cannot connect to PostgreSQL ({first}); is the stack up? try 'billing stack up'"
        ) from None
    return cx


@contextmanager
def transaction():
    """A connection whose work commits on success and rolls back on any error."""
    with connect() as cx:
        with cx.transaction():
            yield cx


def _migrations() -> list[tuple[str, str]]:
    files = resources.files("billing") / "migrations"
    return sorted((f.name, f.read_text()) for f in files.iterdir() if f.name.endswith(".sql"))


def migrate() -> int:
    """Apply pending migrations; return how many were applied."""
    applied = 0
    with connect(autocommit=True) as cx:
        cx.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            cx.execute("CREATE SCHEMA IF NOT EXISTS billing")
            cx.execute(
                """CREATE TABLE IF NOT EXISTS billing.schema_migrations (
                       version text PRIMARY KEY,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = dict(
                cx.execute("SELECT version, checksum FROM billing.schema_migrations").fetchall()
            )
            for name, sql in _migrations():
                checksum = hashlib.sha256(sql.encode()).hexdigest()
                if name in done:
                    if done[name] != checksum:
                        raise ServiceError(
                            f"migration {name} changed after it was applied; add a new migration instead"
                        )
                    continue
                with cx.transaction():
                    cx.execute(sql)
                    cx.execute(
                        "INSERT INTO billing.schema_migrations (version, checksum) VALUES (%s, %s)",
                        (name, checksum),
                    )
                applied += 1
        finally:
            cx.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied
