"""PostgreSQL access: connections with statement/lock timeouts, safe retries, migrations.

Migrations are ordered SQL files in ``billing/migrations``; each is applied once, in its
own transaction, under an advisory lock so concurrent starters don't race.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import time
from contextlib import contextmanager
from importlib import resources

import psycopg
from psycopg import errors as pgerr

from billing.observability import metrics as obs
from billing.platform import connections as conns
from billing.platform import settings
from billing.platform.errors import ServiceError

MIGRATION_LOCK = 7_202_611  # advisory lock key for migrations
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- fault accounting
# Every value error_kind() returns: the labels of billing_db_errors_total, exported from 0.
ERROR_KINDS = ("statement_timeout", "lock_timeout", "connection", "other")
# Every operation of the billing package wrapped in retry_idempotent (its function name): the
# labels of billing_db_retries_total, exported from 0. retry_idempotent refuses an undeclared
# billing.* function, so a new operation cannot miss its zero series.
RETRY_OPERATIONS: tuple[str, ...] = ()


def error_kind(exc: BaseException) -> str:
    """statement_timeout, lock_timeout, connection or other: the label of billing_db_errors_total."""
    if isinstance(exc, pgerr.QueryCanceled) and "statement timeout" in str(exc):
        return "statement_timeout"
    if isinstance(exc, pgerr.LockNotAvailable):
        return "lock_timeout"
    if isinstance(exc, psycopg.OperationalError | ServiceError):
        return "connection"
    return "other"


_HINTS = {
    "statement_timeout": "statement exceeded BILLING_PG_STATEMENT_TIMEOUT_MS={ms} ms",
    "lock_timeout": "lock wait exceeded BILLING_PG_LOCK_TIMEOUT_MS={lock} ms",
    "connection": "lost the PostgreSQL connection",
}


def count_error(exc: BaseException) -> str:
    """Count a database error (in-process and durably in Redis) and explain it on the exception."""
    kind = error_kind(exc)
    if getattr(exc, "_billing_counted", False):
        return kind
    obs.DB_ERRORS.labels(kind).inc()
    obs.record("billing_db_errors_total", kind)
    if kind in _HINTS:
        exc.add_note(
            "billing: "
            + _HINTS[kind].format(
                ms=settings.pg_statement_timeout_ms(), lock=settings.pg_lock_timeout_ms()
            )
            + " (runbook: docs/runbooks/db-errors.md)"
        )
    try:
        exc._billing_counted = True
    except AttributeError:  # pragma: no cover - exceptions with __slots__
        pass
    return kind


class InstrumentedCursor(psycopg.Cursor):
    """Times every statement and counts its failures by kind."""

    def execute(self, query, params=None, **kwargs):
        started = time.perf_counter()
        try:
            return super().execute(query, params, **kwargs)
        except psycopg.Error as exc:
            count_error(exc)
            raise
        finally:
            obs.DB_QUERY_SECONDS.observe(time.perf_counter() - started)


def execute_expecting(cx, expected: tuple[type[psycopg.Error], ...], query, params=None):
    """Run an optimistic statement whose failure with one of ``expected`` is control flow (the
    caller falls back): timed like any statement, but not counted as a database error."""
    started = time.perf_counter()
    try:
        return psycopg.Cursor(cx).execute(query, params)
    except expected:
        raise
    except psycopg.Error as exc:
        count_error(exc)
        raise
    finally:
        obs.DB_QUERY_SECONDS.observe(time.perf_counter() - started)


TRANSIENT = (
    psycopg.OperationalError,  # connection lost, server restarting
    pgerr.SerializationFailure,
    pgerr.DeadlockDetected,
    pgerr.LockNotAvailable,
    ServiceError,  # billing.platform.db.connect could not connect
)


def _is_transient(exc: BaseException) -> bool:
    # A statement timeout is an OperationalError subclass but would just time out again.
    return isinstance(exc, TRANSIENT) and error_kind(exc) != "statement_timeout"


def retry_idempotent(
    fn=None,
    attempts: int = 3,
    base: float = 0.5,
    jitter: float = 0.5,
    *,
    cap: float = 10.0,
    sleep=time.sleep,
):
    """Retry an IDEMPOTENT database operation (a read, an upsert) on transient errors.

    Bounded: at most ``attempts`` calls, waiting ``min(cap, base * 2**n) + uniform(0, jitter)``
    between them. Never wrap non-idempotent writes. Use as ``@retry_idempotent``,
    ``@retry_idempotent(attempts=5)`` or ``retry_idempotent(fn, 5, 0.1, 0.1)(...)``.
    """
    if attempts < 1:
        raise ValueError("attempts must be >= 1")

    def decorate(func):
        if func.__module__.startswith("billing.") and func.__name__ not in RETRY_OPERATIONS:
            raise ValueError(
                f"retry_idempotent: declare {func.__name__!r} in billing.platform.db.RETRY_OPERATIONS"
            )

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            for n in range(attempts):
                try:
                    return func(*args, **kwargs)
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    count_error(exc)
                    if n == attempts - 1:
                        raise ServiceError(
                            f"{func.__name__}: PostgreSQL still failing after {attempts} "
                            f"attempt(s): {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                        ) from exc
                    op = func.__name__
                    obs.DB_RETRIES.labels(op).inc()
                    obs.record("billing_db_retries_total", op)
                    delay = min(cap, base * 2**n) + random.uniform(0, jitter)
                    log.warning(
                        "%s: transient database error (%s); retry %d/%d in %.2fs",
                        op,
                        error_kind(exc),
                        n + 1,
                        attempts - 1,
                        delay,
                    )
                    sleep(delay)
            raise AssertionError("unreachable")  # pragma: no cover

        return wrapper

    return decorate(fn) if fn is not None else decorate


def _session_options() -> str:
    return (
        f"-c statement_timeout={settings.pg_statement_timeout_ms()} "
        f"-c lock_timeout={settings.pg_lock_timeout_ms()} -c timezone=UTC"
    )


def pool(max_size: int, timeout: float, configure=None, name: str = "billing"):
    """A ``psycopg_pool.ConnectionPool`` whose connections are set up as :func:`connect`'s
    (timeouts, instrumented cursors). ``getconn``/``connection()`` wait at most ``timeout``
    seconds, then raise ``PoolTimeout``; connections are opened lazily (``min_size=0``)."""
    from psycopg_pool import ConnectionPool

    return ConnectionPool(
        conns.postgres_dsn(),
        min_size=0,
        max_size=max_size,
        timeout=timeout,
        name=name,
        kwargs={
            "connect_timeout": 10,
            "options": _session_options(),
            "cursor_factory": InstrumentedCursor,
        },
        configure=configure,
        open=True,
    )


def connect(autocommit: bool = False, **kwargs) -> psycopg.Connection:
    """Open a connection to the OLTP database named by the ``billing_postgres`` connection.

    Every session gets ``statement_timeout`` and ``lock_timeout``; every statement is timed
    and its failures counted (``billing_db_errors_total{kind}``).
    """
    dsn = conns.postgres_dsn()
    try:
        cx = psycopg.connect(
            dsn,
            autocommit=autocommit,
            connect_timeout=10,
            options=_session_options(),
            cursor_factory=kwargs.pop("cursor_factory", InstrumentedCursor),
            **kwargs,
        )
    except psycopg.OperationalError as exc:
        count_error(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        err = ServiceError(
            f"cannot connect to PostgreSQL ({first}); is the stack up? try 'billing stack up'"
        )
        err._billing_counted = True  # counted above as kind=connection
        raise err from None
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
