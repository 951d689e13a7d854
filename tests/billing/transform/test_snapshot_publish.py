"""Readers never see the invoice snapshot mid-build: dbt builds into its own schema and
billing.transform.project.publish_snapshot() swaps the result in whole, in one transaction."""

from __future__ import annotations

import datetime as dt
import threading
import time
from decimal import Decimal

import pytest

pytestmark = pytest.mark.integration

DAY1, DAY2 = dt.date(2025, 2, 3), dt.date(2025, 2, 4)
BUILD = "billing_snapshot_build"
FEB = dt.date(2025, 2, 1)


@pytest.fixture
def fresh(stack, clean_db):
    from billing.platform import db

    with db.connect(autocommit=True) as cx:
        cx.execute("SELECT billing.ensure_usage_partition(%s)", (dt.date(2025, 2, 1),))
        cx.execute(
            "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
            " VALUES ('acme', 'Acme', 'a@example.test', 'starter', 'usd', '2020-01-01')"
        )
    yield


def _calls(cx, n: int, arrival: dt.date, prefix: str) -> None:
    cx.execute(
        "INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,"
        " billable, source, arrival_day, file_id, line_no)"
        " VALUES (%s, 'acme', 'api_calls', %s, %s, true, 'api', %s, 0, 0)",
        (prefix, Decimal(n), dt.datetime.combine(arrival, dt.time(9), tzinfo=dt.UTC), arrival),
    )


def _published(cx) -> tuple[int, int]:
    """(total_cents, sum of its lines) of acme's February invoice, as readers see it."""
    from billing import invoices

    [inv] = invoices.list_invoices(cx, "2025-02", "acme")
    return inv.total_cents, sum(x.amount_cents for x in inv.lines)


def test_readers_see_the_old_or_the_new_snapshot_never_a_mix(fresh):
    from billing.platform import db
    from billing.transform import project as transform

    with db.connect() as cx:
        _calls(cx, 150_000, DAY1, "day1")  # starter: 100k free, then $0.0002 a call
        cx.commit()
    transform.transform_day(DAY1, dt.date(2025, 1, 1), targets=["postgres"], full_refresh=True)
    with db.connect() as cx:
        assert _published(cx) == (3900, 3900)  # $29 base + 50k x $0.0002
        _calls(cx, 50_000, DAY2, "day2")
        cx.commit()

    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def read_in_a_loop() -> None:
        with db.connect() as cx:
            while not stop.is_set():
                seen.append(_published(cx))
                cx.rollback()

    # Hold the last mart (SHARE: dbt cannot write it, anyone can read it): dbt commits
    # fct_daily_charges and fct_invoice_lines, then waits here.
    lock = db.connect()
    lock.execute(f"LOCK TABLE {BUILD}.fct_invoices IN SHARE MODE")
    failure: list[BaseException] = []

    def rebuild() -> None:
        try:
            transform.transform_day(DAY2, targets=["postgres"])
        except BaseException as exc:  # reported by the main thread
            failure.append(exc)

    reader = threading.Thread(target=read_in_a_loop)
    builder = threading.Thread(target=rebuild)
    reader.start()
    builder.start()
    try:
        with db.connect(autocommit=True) as cx:
            deadline = time.monotonic() + 180
            while not cx.execute(  # the build is blocked on our lock: mid-build for sure
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
                (f"{BUILD}.fct_invoices",),
            ).fetchone()[0]:
                assert builder.is_alive() and time.monotonic() < deadline, failure
                time.sleep(0.05)
            # dbt's own schema is half-built right now: new lines, old total.
            lines = cx.execute(
                f"SELECT sum(amount_cents) FROM {BUILD}.fct_invoice_lines"
                " WHERE invoice_id = 'inv_acme_202502'"
            ).fetchone()[0]
            (total,) = cx.execute(
                f"SELECT total_cents FROM {BUILD}.fct_invoices WHERE invoice_id = 'inv_acme_202502'"
            ).fetchone()
            assert (lines, total) == (4900, 3900)
            # What readers see is still the whole previous snapshot.
            assert _published(cx) == (3900, 3900)
    finally:
        lock.rollback()  # let dbt finish
        lock.close()
        builder.join(timeout=600)
        stop.set()
        reader.join(timeout=60)
    assert not failure, failure
    with db.connect() as cx:
        assert _published(cx) == (4900, 4900)  # + 50k calls x $0.0002
    assert len(seen) > 10
    assert {t for t, s in seen if t != s} == set()  # never lines that don't sum to the total
    assert set(seen) <= {(3900, 3900), (4900, 4900)}
    # Publishing the same build again changes nothing.
    assert transform.publish_snapshot() == {
        t: {"deleted": 0, "inserted": 0} for t in transform.PUBLISHED_TABLES
    }
    # Each publish that changed the snapshot is recorded with the periods it changed (the
    # reconciliation defers a period a later publish re-priced before its push); the
    # publish that changed nothing is not.
    with db.connect() as cx:
        publishes = cx.execute(
            "SELECT seq, periods FROM billing.snapshot_publishes ORDER BY seq"
        ).fetchall()
        assert [periods for _, periods in publishes] == [[FEB], [FEB]]
        assert transform.published_seq(cx) == publishes[-1][0]
        assert transform.published_seq(cx, FEB) == publishes[-1][0]
        assert transform.published_seq(cx, dt.date(2025, 1, 1)) == 0
