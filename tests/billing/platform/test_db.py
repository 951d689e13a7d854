"""Database fault handling: timeouts on every session, bounded retries of safe operations,
and every failure counted. Outage tests use a throwaway Postgres, never the shared stack."""

from __future__ import annotations

import json

import psycopg
import pytest

from billing import observability as obs
from billing.platform import connections as conns
from billing.platform import db
from billing.platform.errors import ServiceError


def _local(kind: str) -> float:
    return obs.REGISTRY.get_sample_value("billing_db_errors_total", {"kind": kind}) or 0.0


def _durable(kind: str) -> int:
    raw = obs.redis_client().hget(obs.DURABLE_COUNTERS_KEY, f"billing_db_errors_total|{kind}")
    return int(raw or 0)


def test_every_session_has_statement_and_lock_timeouts(stack, monkeypatch):
    monkeypatch.setenv("BILLING_PG_STATEMENT_TIMEOUT_MS", "1234")
    monkeypatch.setenv("BILLING_PG_LOCK_TIMEOUT_MS", "567")
    with db.connect() as cx:
        assert cx.execute("SHOW statement_timeout").fetchone() == ("1234ms",)
        assert cx.execute("SHOW lock_timeout").fetchone() == ("567ms",)


def test_statement_over_the_timeout_is_a_clear_counted_error(stack, monkeypatch):
    monkeypatch.setenv("BILLING_PG_STATEMENT_TIMEOUT_MS", "50")
    before_local, before_durable = _local("statement_timeout"), _durable("statement_timeout")
    with db.connect() as cx, pytest.raises(psycopg.errors.QueryCanceled) as info:
        cx.execute("SELECT pg_sleep(30)")
    assert "canceling statement due to statement timeout" in str(info.value)
    assert info.value.__notes__ == [
        "billing: statement exceeded BILLING_PG_STATEMENT_TIMEOUT_MS=50 ms "
        "(runbook: docs/runbooks/db-errors.md)"
    ]
    assert _local("statement_timeout") == before_local + 1
    assert _durable("statement_timeout") == before_durable + 1


def test_statement_timeout_is_not_retried(stack, monkeypatch):
    monkeypatch.setenv("BILLING_PG_STATEMENT_TIMEOUT_MS", "50")
    calls = []

    @db.retry_idempotent(attempts=3, base=0, jitter=0, sleep=calls.append)
    def slow_read():
        with db.connect() as cx:
            return cx.execute("SELECT pg_sleep(30)").fetchone()

    with pytest.raises(psycopg.errors.QueryCanceled):
        slow_read()
    assert calls == []


def test_lock_wait_over_lock_timeout_is_counted(stack, monkeypatch):
    monkeypatch.setenv("BILLING_PG_LOCK_TIMEOUT_MS", "50")
    before = _local("lock_timeout")
    with db.connect() as holder, db.connect() as waiter:
        holder.execute("LOCK TABLE billing.organizations IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            waiter.execute("SELECT count(*) FROM billing.organizations")
    assert _local("lock_timeout") == before + 1


def test_retry_is_bounded_with_backoff_and_jitter():
    sleeps, calls = [], []

    @db.retry_idempotent(attempts=4, base=0.5, jitter=0.25, cap=1.0, sleep=sleeps.append)
    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return "ok"

    assert flaky() == "ok"
    assert len(calls) == 4
    assert len(sleeps) == 3
    for delay, floor in zip(sleeps, (0.5, 1.0, 1.0), strict=True):  # 0.5*2**n capped at 1.0
        assert floor <= delay <= floor + 0.25


def test_non_transient_errors_are_not_retried():
    calls = []

    @db.retry_idempotent(attempts=5, base=0, jitter=0, sleep=lambda s: None)
    def bad():
        calls.append(1)
        raise psycopg.errors.UniqueViolation("duplicate key")

    with pytest.raises(psycopg.errors.UniqueViolation):
        bad()
    assert calls == [1]


# ---------------------------------------------------------------- a throwaway Postgres
@pytest.fixture
def throwaway_pg(stack, tmp_path, monkeypatch):
    """A private Postgres we may stop and start; the shared test stack is never touched."""
    from billing_dev.stack.manager import Stack

    s = Stack(tmp_path / "pg-outage")
    state = s._init_state()
    s.postgres_up(state)
    conn = s.connections(state)[conns.POSTGRES]
    monkeypatch.setenv(conns.env_var(conns.POSTGRES), conn.to_json())
    yield s, state
    s.destroy()  # also its data folder outside tmp_path (/var/tmp/billing-*), if any


def test_postgres_stopped_mid_task_is_counted_then_retry_recovers(throwaway_pg):
    s, state = throwaway_pg
    cx = db.connect(autocommit=True)
    assert cx.execute("SELECT 1").fetchone() == (1,)
    before = _local("connection")
    s.postgres_down(state)  # the outage hits between two statements of one task
    with pytest.raises(psycopg.OperationalError):
        cx.execute("SELECT 1")
    cx.close()
    assert _local("connection") == before + 1

    calls, restarts = [], []

    def restart_during_backoff(delay):
        restarts.append(delay)
        s.postgres_up(state)

    @db.retry_idempotent(attempts=3, base=0, jitter=0, sleep=restart_during_backoff)
    def read_settings():
        calls.append(1)
        with db.connect() as c:
            return c.execute("SELECT current_setting('lock_timeout')").fetchone()[0]

    retries_before = (
        obs.REGISTRY.get_sample_value("billing_db_retries_total", {"operation": "read_settings"})
        or 0.0
    )
    assert read_settings() == "30s"
    assert (len(calls), len(restarts)) == (2, 1)
    assert _local("connection") == before + 2  # the refused connect of attempt 1
    assert (
        obs.REGISTRY.get_sample_value("billing_db_retries_total", {"operation": "read_settings"})
        == retries_before + 1
    )


def test_postgres_down_for_good_gives_a_clear_error_after_bounded_attempts(throwaway_pg):
    s, state = throwaway_pg
    s.postgres_down(state)
    calls = []

    @db.retry_idempotent(attempts=2, base=0, jitter=0, sleep=lambda d: None)
    def read_orgs():
        calls.append(1)
        with db.connect() as c:
            return c.execute("SELECT 1").fetchone()

    with pytest.raises(ServiceError, match=r"^read_orgs: PostgreSQL still failing after 2 attempt"):
        read_orgs()
    assert len(calls) == 2


def test_durable_counter_fields_are_known_metrics():
    with pytest.raises(KeyError):
        obs.record("billing_not_a_metric_total", "x")
    assert json.dumps(obs.DURABLE_METRICS)  # plain data, exportable


def test_billing_db_migrate_applies_nothing_twice(stack, capsys):
    """`billing db migrate` (the Helm migrate job's step): every migration file is recorded
    once, and a run on an up-to-date schema changes nothing and says so."""
    from billing import cli
    from billing.platform import db, settings

    files = sorted(p.name for p in (settings.PACKAGE_DIR / "migrations").glob("*.sql"))
    assert cli.main(["db", "migrate"]) == 0
    assert capsys.readouterr().out == "schema up to date\n"
    with db.connect() as cx:
        recorded = [
            v for (v,) in cx.execute("SELECT version FROM billing.schema_migrations ORDER BY 1")
        ]
    assert recorded == files
