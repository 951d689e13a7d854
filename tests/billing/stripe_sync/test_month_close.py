"""The month close that cannot be missed (billing.stripe_sync.closing), on the real stack.

Real Postgres, Redis and the Stripe emulator (as strict as Stripe about pending items: a new
invoice takes none unless asked, ``add_lines`` attaches them explicitly). The nightly's
``stripe_close_period`` is ``close_due(day)``, called here in the DAG's order after
``push_day(day)``; tests/integration/test_month_close_scheduler.py runs it under a real
scheduler.
"""

from __future__ import annotations

import datetime as dt

import pytest
from stripe_support import (
    PERIOD,
    SNAPSHOT_SCHEMA,
    customers,
    direct_client,
    env_for_tests,
    random_snapshot,
    reset_state,
    stripe_items,
)

from billing import stripe_sync
from billing.platform import db
from billing.stripe_sync import Engine, closing

pytestmark = pytest.mark.integration

NOV_30 = dt.date(2026, 11, 30)
DEC = dt.date(2026, 12, 1)
TODAY = dt.date(2026, 12, 20)  # the UTC day the runs execute on (all of November has ended)


@pytest.fixture
def env(stack, clean_db, monkeypatch):
    env_for_tests(monkeypatch)
    reset_state()
    yield monkeypatch


def _december_usage(snap, cents: int) -> None:
    """Next month's snapshot rows: a base fee and day-1 usage for every org."""
    from stripe_support import PLANS

    with db.transaction() as cx:
        for org, plan in snap.orgs.items():
            currency, base = PLANS[plan]
            cx.execute(
                f"INSERT INTO {SNAPSHOT_SCHEMA}.fct_invoices VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (f"inv-{org}-12", org, DEC, plan, currency, base, cents, base + cents),
            )
            cx.execute(
                f"INSERT INTO {SNAPSHOT_SCHEMA}.fct_daily_charges VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (org, "api_calls", DEC, DEC, currency, cents, cents),
            )


def _closes() -> dict[dt.date, tuple]:
    with db.connect() as cx:
        return {
            r[0]: r[1:]
            for r in cx.execute(
                "SELECT period, closed_on_day, missing_days, invoices FROM billing.period_closes"
            ).fetchall()
        }


def _run(day: dt.date, eng: Engine) -> dict:
    """billing_nightly's Stripe tasks for arrival day ``day``: push, then close."""
    stripe_sync.push_day(day, engine=eng)
    return stripe_sync.close_due(day, run_id=f"test__arrival-{day}", today=TODAY, engine=eng)


def test_missed_last_day_closes_in_the_next_run_with_next_months_items_pushed_first(env):
    snap = random_snapshot(n_orgs=3, n_days=30, seed=5)
    snap.save()
    eng = Engine(sleep=lambda _s: None)
    for d in range(1, 30):  # November 1..29; the last day's run never happens
        result = _run(PERIOD.replace(day=d), eng)
        assert result["status"] == "skipped", result
    assert _closes() == {}

    # December 1: its push sends December's items (and November's remaining usage as late
    # items tagged 2026-11) *before* the close; the close still succeeds and takes only
    # November's items.
    _december_usage(snap, cents=1234)
    result = _run(DEC, eng)
    assert result["status"] == "closed", result
    (close,) = result["closes"]
    assert (close["period"], close["closed"], close["missing_days"]) == (
        "2026-11",
        True,
        ["2026-11-30"],
    )
    assert close["parked"] == 0 and close["blocked"] == {}
    assert _closes() == {PERIOD: (DEC, [NOV_30], 3)}

    client = direct_client()
    cus = customers()
    for org, invoice_id in close["invoices"].items():
        inv = client.v1.invoices.retrieve(invoice_id)
        assert inv["status"] == "open"
        assert inv["amount_due"] == snap.expected_total(org, NOV_30), org
        pending = [ii for ii in stripe_items(client, cus[org]) if ii["invoice"] is None]
        # December's base fee and usage wait for December's own invoice.
        assert sorted((ii["metadata"]["period"], ii["amount"]) for ii in pending) == sorted(
            [("2026-12", 1234), ("2026-12", snap_base(snap, org))]
        ), org

    # Idempotent: the same run again, and later runs, close nothing twice.
    again = stripe_sync.close_due(DEC, today=TODAY, engine=eng)
    assert again["status"] == "skipped", again
    assert _run(dt.date(2026, 12, 2), eng)["status"] == "skipped"
    assert _closes() == {PERIOD: (DEC, [NOV_30], 3)}
    for org in snap.orgs:
        assert len(client.v1.invoices.list(params={"customer": cus[org]})["data"]) == 1


def snap_base(snap, org: str) -> int:
    from stripe_support import PLANS

    return PLANS[snap.orgs[org]][1]


def test_a_backfill_closes_the_month_in_whichever_run_completes_it(env):
    snap = random_snapshot(n_orgs=1, n_days=30, seed=9)
    snap.save()
    eng = Engine(sleep=lambda _s: None)
    with db.transaction() as cx:
        # The month's last day ran (scheduled), but days 1..3 had been missed.
        for d in range(4, 31):
            closing.record_day(cx, PERIOD.replace(day=d))
        assert closing.due(cx, NOV_30, TODAY) == []  # days 1..3 missing: not yet
        # Never before the month's last day has ended (a Trigger "now" on the 30th).
        for d in (1, 2):
            closing.record_day(cx, PERIOD.replace(day=d))
    assert stripe_sync.close_due(PERIOD.replace(day=3), today=NOV_30)["status"] == "skipped"
    # A backfill of 1..3 run backwards: day 3 then 2 then 1; the first run to find every
    # day of November run closes it, wherever it is in the month.
    result = _run(PERIOD.replace(day=3), eng)
    assert (result["status"], result["closes"][0]["missing_days"]) == ("closed", []), result
    assert _closes() == {PERIOD: (PERIOD.replace(day=3), [], 1)}
    assert _run(PERIOD.replace(day=1), eng)["status"] == "skipped"


def test_a_month_never_opened_closes_in_the_next_run(env):
    """Only late events of October reach the pipeline (no October day ever ran)."""
    snap = random_snapshot(n_orgs=1, n_days=2, seed=13)
    snap.save()
    eng = Engine(sleep=lambda _s: None)
    oct_period = dt.date(2026, 10, 1)
    (org,) = snap.orgs
    with db.transaction() as cx:
        cx.execute(
            f"INSERT INTO {SNAPSHOT_SCHEMA}.fct_daily_charges VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (org, "api_calls", dt.date(2026, 10, 31), oct_period, "usd", 777, 777),
        )
    result = _run(PERIOD, eng)  # November 1 pushes October's late item, then closes October
    assert result["status"] == "closed", result
    (close,) = result["closes"]
    assert close["period"] == "2026-10" and len(close["missing_days"]) == 31
    inv = direct_client().v1.invoices.retrieve(close["invoices"][org])
    assert (inv["status"], inv["amount_due"]) == ("open", 777)
    assert set(_closes()) == {oct_period}


def _true_up(org: str, line_type: str, metric: str | None, cents: int) -> None:
    """A true-up line of November in the snapshot (what fct_invoice_lines has once it ended)."""
    with db.transaction() as cx:
        cx.execute(
            f"DELETE FROM {SNAPSHOT_SCHEMA}.fct_invoice_lines"
            " WHERE org_id = %s AND line_type = %s AND metric IS NOT DISTINCT FROM %s",
            (org, line_type, metric),
        )
        cx.execute(
            f"INSERT INTO {SNAPSHOT_SCHEMA}.fct_invoice_lines VALUES (%s, %s, %s, %s, 'usd', %s)",
            (org, PERIOD, line_type, metric, cents),
        )


def test_true_ups_are_pushed_by_the_last_days_run_and_closed_with_the_month(env):
    """Minimum spend and commitment (docs/PRICING.md): nothing before November's last day
    runs; that run pushes each true-up once, labelled, and its close finalizes November with
    them; a later correction (late usage reached the minimum) pushes the difference."""
    snap = random_snapshot(n_orgs=3, n_days=3, seed=9)
    snap.save()
    short, plain = sorted(o for o, p in snap.orgs.items() if p != "enterprise")[:2]
    _true_up(short, "minimum_spend", "api_calls", 1500)
    _true_up(short, "minimum_commitment", None, 700)
    eng = Engine(sleep=lambda _s: None)

    def true_up_items() -> list[tuple]:
        with db.connect() as cx:
            return cx.execute(
                """SELECT org_id, metric, day, amount_cents, status FROM billing.stripe_outbox
                    WHERE metric LIKE 'minimum%%' ORDER BY metric"""
            ).fetchall()

    for d in range(1, 30):
        _run(PERIOD.replace(day=d), eng)
    assert true_up_items() == []  # November 1..29: the usage may still reach the minimum
    result = _run(NOV_30, eng)
    assert result["status"] == "closed", result
    assert true_up_items() == [
        (short, "minimum_commitment", NOV_30, 700, "sent"),
        (short, "minimum_spend.api_calls", NOV_30, 1500, "sent"),
    ]
    (close,) = result["closes"]
    client = direct_client()
    due = {
        org: client.v1.invoices.retrieve(inv)["amount_due"]
        for org, inv in close["invoices"].items()
    }
    assert due[short] == snap.expected_total(short, NOV_30) + 1500 + 700
    assert due[plain] == snap.expected_total(plain, NOV_30)
    metrics = [
        ii["metadata"].to_dict().get("metric", "")
        for ii in stripe_items(client, customers()[short])
    ]
    labels = sorted(m for m in metrics if m.startswith("minimum"))
    assert labels == ["minimum_commitment", "minimum_spend.api_calls"]

    # Re-running the day pushes nothing twice; a later correction pushes the difference
    assert _run(NOV_30, eng)["status"] == "skipped"
    assert len(true_up_items()) == 2
    _true_up(short, "minimum_spend", "api_calls", 500)
    _run(DEC, eng)
    assert sorted(true_up_items())[-1] == (short, "minimum_spend.api_calls", DEC, -1000, "sent")
