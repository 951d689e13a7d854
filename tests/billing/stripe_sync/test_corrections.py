"""Corrections after finalization (billing.stripe_sync.corrections) and ``billing rerate``, on
the real stack: Postgres, Redis and the Stripe emulator (credit notes as strict as Stripe's).

Each test prices a period P, pushes it and closes it (a finalized Stripe invoice), then
changes P's snapshot the way late events or a re-rate would, and checks the exact credit
notes and correction items, the invoice's amount due, and that reconciliation matches to
the cent."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from reconcile_support import SCHEMA, prepare, snapshot
from stripe_support import direct_client, outbox_rows, stripe_items

from billing import stripe_sync
from billing.cli import main
from billing.platform import db
from billing.platform.dates import month_end, period_of
from billing.reconcile import compare as reconcile
from billing.stripe_sync import Engine, corrections

pytestmark = pytest.mark.integration

BASE = 9900
FIRST = {"base_fee": BASE, "api_calls": 5000, "storage_gb": 3000}  # 17900
LATER = {"base_fee": BASE, "api_calls": 4000, "storage_gb": 3500}  # 17400


@pytest.fixture
def period(stack, clean_db, monkeypatch):
    return prepare(monkeypatch)


def _next(period: dt.date) -> dt.date:
    return period_of(month_end(period) + dt.timedelta(days=1))


def _set_snapshot(org: str, period: dt.date, lines: dict[str, int]) -> None:
    """P's snapshot for ``org``: its invoice and lines, and the usage charges at P's last day."""
    with db.transaction() as cx:
        for table in ("fct_invoices", "fct_invoice_lines", "fct_daily_charges"):
            cx.execute(
                f"DELETE FROM {SCHEMA}.{table} WHERE org_id = %s AND period_start = %s",
                (org, period),
            )
        for metric, cents in lines.items():
            if metric != "base_fee":
                cx.execute(
                    f"""INSERT INTO {SCHEMA}.fct_daily_charges VALUES
                        (%s, %s, %s, %s, 'usd', %s, %s)""",
                    (org, metric, month_end(period), period, cents, cents),
                )
    snapshot(org, period, lines)


def _org(name: str) -> str:
    import uuid

    org = f"{name}{uuid.uuid4().hex[:8]}"
    with db.transaction() as cx:
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, 'growth', 'usd')""",
            (org, f"Org {org}", f"billing+{org}@example.test"),
        )
    return org


def _finalized(org: str, period: dt.date, eng: Engine) -> str:
    """P priced with FIRST, pushed by its last day's run and closed: the invoice id."""
    _set_snapshot(org, period, FIRST)
    assert stripe_sync.push_day(month_end(period), engine=eng)["parked"] == 0
    closed = stripe_sync.close_period(period, engine=eng)
    inv = direct_client().v1.invoices.retrieve(closed["invoices"][org])
    assert (inv["status"], inv["amount_due"]) == ("open", 17900)
    return inv["id"]


def _notes(invoice_id: str) -> list:
    return list(direct_client().v1.credit_notes.list(params={"invoice": invoice_id})["data"])


def _customer(org: str) -> str:
    with db.connect() as cx:
        return cx.execute(
            "SELECT stripe_customer_id FROM billing.stripe_customers WHERE org_id = %s", (org,)
        ).fetchone()[0]


def _recorded(org: str, period: dt.date) -> tuple:
    with db.connect() as cx:
        return cx.execute(
            """SELECT status, amount_due_cents, amount_remaining_cents FROM billing.stripe_invoices
                WHERE org_id = %s AND period = %s""",
            (org, period),
        ).fetchone()


def _reconciled(period: dt.date, org: str) -> dict:
    payload = reconcile.reconcile(period, org_ids=[org])
    assert payload["status"] == "passed" and payload["discrepancies"] == [], payload
    return payload


def test_late_events_after_finalization_credit_note_and_correction_item(period):
    eng = Engine(sleep=lambda _s: None)
    org = _org("late")
    invoice_id = _finalized(org, period, eng)
    nxt = _next(period)

    # Late events re-price P: api_calls now 1000 lower (over-billed), storage_gb 500 higher.
    _set_snapshot(org, period, LATER)
    _set_snapshot(org, nxt, {"base_fee": BASE})
    day = nxt.replace(day=2)
    pushed = stripe_sync.push_day(day, engine=eng)
    assert pushed["parked"] == 0 and pushed["still_pending"] == 0, pushed
    rows = [
        (r["kind"], r["metric"], r["amount_cents"], r["status"])
        for r in outbox_rows()
        if r["period"] == period and r["day"] == day
    ]
    assert sorted(rows) == [
        ("credit_note", "api_calls", -1000, "sent"),
        ("usage_item", "storage_gb", 500, "sent"),
    ]

    # (a) a credit note of exactly 1000 against P's invoice, which now asks 1000 less
    (note,) = _notes(invoice_id)
    assert (note["total"], note["type"], note["status"]) == (1000, "pre_payment", "issued")
    assert note["metadata"]["period"] == f"{period:%Y-%m}"
    assert note["metadata"]["metric"] == "api_calls"
    assert note["lines"]["data"][0]["description"] == f"Correction for {period:%Y-%m}: api_calls"
    inv = direct_client().v1.invoices.retrieve(invoice_id)
    assert (inv["total"], inv["amount_due"], inv["amount_remaining"]) == (17900, 16900, 16900)
    assert inv["pre_payment_credit_notes_amount"] == 1000
    assert _recorded(org, period) == ("open", 16900, 16900)

    # (b) the under-billing is an item of P on the next invoice, naming the period it corrects
    closed = stripe_sync.close_period(nxt, engine=eng)
    nxt_inv = direct_client().v1.invoices.retrieve(closed["invoices"][org])
    assert nxt_inv["amount_due"] == BASE + 500
    (item,) = [
        ii
        for ii in stripe_items(direct_client(), _customer(org))
        if ii["invoice"] == nxt_inv["id"] and ii["metadata"]["period"] == f"{period:%Y-%m}"
    ]
    assert item["amount"] == 500
    assert item["description"] == f"Correction for {period:%Y-%m}: storage_gb"
    assert item["metadata"]["correction_of"] == f"{period:%Y-%m}"

    # Re-running the day plans nothing more; both periods reconcile to the cent.
    assert stripe_sync.push_day(day, engine=eng)["planned"] == 0
    assert len(_notes(invoice_id)) == 1
    p = _reconciled(period, org)
    assert p["counts"]["match"] == 1
    audit = reconcile.reconcile(period, org_ids=[org], idempotency_key=f"k-{org}")
    assert audit["status"] == "passed"
    from reconcile_support import audit_rows

    row = audit_rows(f"k-{org}")[org]
    assert (row["internal_cents"], row["stripe_cents"], row["status"]) == (17400, 17400, "match")
    lines = {x["line"]: (x["internal_cents"], x["stripe_cents"]) for x in row["lines"]}
    assert lines["api_calls"] == (4000, 4000) and lines["storage_gb"] == (3500, 3500)
    assert _reconciled(nxt, org)["counts"]["match"] == 1


def test_over_billing_beyond_what_the_invoice_can_credit_is_carried_as_an_item(period):
    eng = Engine(sleep=lambda _s: None)
    org = _org("cap")
    invoice_id = _finalized(org, period, eng)
    # Finance already credited 17000 of it in the dashboard: 900 left to credit.
    direct_client().v1.credit_notes.create(params={"invoice": invoice_id, "amount": 17000})
    stripe_sync.sync_invoices(engine=eng)
    assert _recorded(org, period) == ("open", 900, 900)

    _set_snapshot(org, period, {"base_fee": BASE, "api_calls": 2000, "storage_gb": 3000})
    day = _next(period).replace(day=2)
    assert stripe_sync.push_day(day, engine=eng)["parked"] == 0
    rows = sorted(
        (r["kind"], r["amount_cents"], r["payload"].get("description", ""))
        for r in outbox_rows()
        if r["period"] == period and r["day"] == day
    )
    assert rows == [
        ("credit_note", -900, ""),
        (
            "usage_item",
            -2100,
            f"Correction for {period:%Y-%m}: api_calls"
            " (credit beyond what the invoice can still credit)",
        ),
    ]
    assert [n["total"] for n in _notes(invoice_id)] == [900, 17000]
    inv = direct_client().v1.invoices.retrieve(invoice_id)
    assert (inv["status"], inv["amount_due"]) == ("paid", 0)  # fully credited: Stripe marks it paid


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse: a bad argument
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_rerate_dry_run_then_apply_twice_corrects_exactly_once(period, monkeypatch, capsys):
    eng = Engine(sleep=lambda _s: None)
    org = _org("rr")
    invoice_id = _finalized(org, period, eng)
    rebuilt = []

    def rebuild(p):  # what the dbt rebuild of P publishes: P re-priced
        rebuilt.append(p)
        _set_snapshot(org, p, LATER)

    monkeypatch.setattr(corrections, "rebuild_period", rebuild)
    customer = _customer(org)
    n_rows, n_items = len(outbox_rows()), len(stripe_items(direct_client(), customer))

    code, out, _ = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}", "--format", "json")
    assert code == 0 and rebuilt == [period]
    result = json.loads(out)
    diffs = {
        d["label"]: (d["billed_cents"], d["want_cents"], d["diff_cents"]) for d in result["diffs"]
    }
    assert diffs == {
        "api_calls": (5000, 4000, -1000),
        "base_fee": (BASE, BASE, 0),
        "storage_gb": (3000, 3500, 500),
    }
    assert sorted((c["kind"], c["amount_cents"], c["enqueued"]) for c in result["corrections"]) == [
        ("credit_note", -1000, False),
        ("usage_item", 500, False),
    ]
    # A dry run writes nothing: same outbox, no credit note, no new item.
    assert len(outbox_rows()) == n_rows
    assert _notes(invoice_id) == []
    assert len(stripe_items(direct_client(), customer)) == n_items

    code, out, _ = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}")
    assert code == 0 and "api_calls" in out and "-1000" in out and "dry run" in out

    code, out, _ = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}", "--org", org, "--apply")
    assert code == 0, out
    assert len(outbox_rows()) == n_rows + 2
    (note,) = _notes(invoice_id)
    assert (note["total"], note["metadata"]["metric"]) == (1000, "api_calls")
    new_items = [
        ii
        for ii in stripe_items(direct_client(), customer)
        if ii["metadata"].to_dict().get("correction_of")
    ]
    assert [(ii["amount"], ii["description"]) for ii in new_items] == [
        (500, f"Correction for {period:%Y-%m}: storage_gb")
    ]
    assert direct_client().v1.invoices.retrieve(invoice_id)["amount_due"] == 16900

    code, out, _ = _cli(
        capsys, "rerate", "--period", f"{period:%Y-%m}", "--apply", "--format", "json"
    )
    assert code == 0
    again = json.loads(out)
    assert {d["diff_cents"] for d in again["diffs"]} == {0} and again["corrections"] == []
    assert len(outbox_rows()) == n_rows + 2 and len(_notes(invoice_id)) == 1
    assert _reconciled(period, org)["counts"]["match"] == 1


def test_rerate_refuses_bad_input_in_one_line(period, capsys):
    code, _, err = _cli(capsys, "rerate", "--period", "2026-13")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "YYYY-MM" in err
    code, _, err = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}")
    assert code != 0 and err.strip().splitlines() == [
        f"billing: error: no Stripe invoice for {period:%Y-%m}: nothing was billed to re-rate"
    ]
    code, _, err = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}", "--org", "nobody-here")
    assert code != 0 and err.strip() == "billing: error: unknown org 'nobody-here'"


def test_rerate_apply_in_read_only_mode_queues(period, monkeypatch, capsys):
    eng = Engine(sleep=lambda _s: None)
    org = _org("ro")
    invoice_id = _finalized(org, period, eng)
    monkeypatch.setattr(corrections, "rebuild_period", lambda p: _set_snapshot(org, p, LATER))
    stripe_sync.set_read_only(True, reason="test outage")
    try:
        code, out, _ = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}", "--apply")
        assert code == 0 and "read_only" in out
        assert _notes(invoice_id) == []
        queued = [r for r in outbox_rows() if r["status"] == "pending"]
        assert sorted((r["kind"], r["amount_cents"]) for r in queued) == [
            ("credit_note", -1000),
            ("usage_item", 500),
        ]
        # queued corrections count as billed: a second apply writes nothing
        code, out, _ = _cli(capsys, "rerate", "--period", f"{period:%Y-%m}", "--format", "json")
        assert json.loads(out)["corrections"] == []
    finally:
        stripe_sync.set_read_only(False)
    assert stripe_sync.drain(engine=eng)["sent"] == 2
    assert [n["total"] for n in _notes(invoice_id)] == [1000]


def test_rerate_rebuilds_the_period_with_dbt_and_corrects_it(stack, clean_db, monkeypatch, capsys):
    """The real rebuild: dbt (postgres target) with ``rerate_periods``, then the publish.
    Events of January that no nightly run priced (a repaired load) reach January's finalized
    invoice only through ``billing rerate``."""
    import uuid
    from decimal import Decimal

    from billing.transform import project as transform

    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", "0")
    jan, day = dt.date(2025, 1, 1), dt.date(2025, 1, 10)
    org = f"dbt{uuid.uuid4().hex[:8]}"

    def calls(n: int, event_id: str) -> None:
        with db.connect(autocommit=True) as cx:
            cx.execute(
                "INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,"
                " billable, source, arrival_day, file_id, line_no)"
                " VALUES (%s, %s, 'api_calls', %s, %s, true, 'api', %s, 0, 0)",
                (event_id, org, Decimal(n), dt.datetime.combine(day, dt.time(9), dt.UTC), day),
            )

    with db.connect(autocommit=True) as cx:
        cx.execute("SELECT billing.ensure_usage_partition(%s)", (jan,))
        cx.execute(
            "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
            " VALUES (%s, 'Org', 'o@example.test', 'starter', 'usd', '2020-01-01')",
            (org,),
        )
    calls(150_000, f"{org}-a")  # starter: 100k free, then $0.0002 a call
    transform.transform_day(day, jan, targets=["postgres"], full_refresh=True)
    eng = Engine(sleep=lambda _s: None)
    stripe_sync.push_day(month_end(jan), engine=eng)
    invoice_id = stripe_sync.close_period(jan, engine=eng)["invoices"][org]
    assert direct_client().v1.invoices.retrieve(invoice_id)["amount_due"] == 3900

    calls(50_000, f"{org}-b")  # loaded later without a nightly: January is under-billed
    code, out, err = _cli(capsys, "rerate", "--period", "2025-01", "--org", org, "--format", "json")
    assert code == 0, err
    diffs = {d["label"]: d["diff_cents"] for d in json.loads(out)["diffs"]}
    assert diffs == {"api_calls": 1000, "base_fee": 0}
    code, out, err = _cli(capsys, "rerate", "--period", "2025-01", "--org", org, "--apply")
    assert code == 0, err
    (item,) = [
        ii
        for ii in stripe_items(direct_client(), _customer(org))
        if ii["metadata"].to_dict().get("correction_of") == "2025-01"
    ]
    assert (item["amount"], item["invoice"]) == (1000, None)  # for the next invoice
    assert reconcile.reconcile(jan, org_ids=[org])["status"] == "passed"


def test_a_paid_invoice_gets_a_post_payment_credit_note_to_the_balance(period):
    eng = Engine(sleep=lambda _s: None)
    org = _org("paid")
    invoice_id = _finalized(org, period, eng)
    direct_client().v1.invoices.pay(invoice_id, params={"paid_out_of_band": True})
    stripe_sync.sync_invoices(engine=eng)
    assert _recorded(org, period)[0] == "paid"

    _set_snapshot(org, period, {"base_fee": BASE, "api_calls": 3500, "storage_gb": 3000})
    assert stripe_sync.push_day(_next(period).replace(day=2), engine=eng)["parked"] == 0
    (note,) = _notes(invoice_id)
    assert (note["total"], note["type"], note["post_payment_amount"]) == (
        1500,
        "post_payment",
        1500,
    )
    inv = direct_client().v1.invoices.retrieve(invoice_id)
    assert (inv["amount_paid"], inv["post_payment_credit_notes_amount"]) == (17900, 1500)
    assert _reconciled(period, org)["counts"]["match"] == 1


def test_a_retroactive_downgrade_of_a_finalized_month_is_rerated_to_the_cent(
    stack, clean_db, monkeypatch, capsys
):
    """January closed on growth ($99, calls $0.00015 by volume); Finance then records that
    the org moved to starter ($29, 100k calls free, then $0.0002) on 16 January. The nightly
    never re-prices a closed month for a subscription edit: ``billing rerate`` does, and the
    over-billed labels become a credit note on January's invoice, the new segment's usage a
    correction item on the next one (docs/SUBSCRIPTIONS.md "Segments")."""
    import uuid
    from decimal import Decimal

    from billing import subscriptions
    from billing.transform import project as transform

    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", "0")
    jan = dt.date(2025, 1, 1)
    org = f"sub{uuid.uuid4().hex[:8]}"
    with db.connect(autocommit=True) as cx:
        cx.execute("SELECT billing.ensure_usage_partition(%s)", (jan,))
        cx.execute(
            "INSERT INTO billing.organizations (org_id, name, email, plan, currency, created_at)"
            " VALUES (%s, 'Org', 'o@example.test', 'growth', 'usd', '2020-01-01')",
            (org,),
        )
        for i, day in enumerate((10, 20)):
            at = dt.datetime(2025, 1, day, 9, tzinfo=dt.UTC)
            cx.execute(
                "INSERT INTO billing.usage_events (event_id, org_id, metric, quantity, occurred_at,"
                " billable, source, arrival_day, file_id, line_no)"
                " VALUES (%s, %s, 'api_calls', %s, %s, true, 'api', %s, 0, 0)",
                (f"{org}-{i}", org, Decimal(200_000), at, at.date()),
            )
    transform.transform_day(dt.date(2025, 1, 31), jan, targets=["postgres"], full_refresh=True)
    eng = Engine(sleep=lambda _s: None)
    stripe_sync.push_day(month_end(jan), engine=eng)
    invoice_id = stripe_sync.close_period(jan, engine=eng)["invoices"][org]
    # 9900 base + 400k calls x $0.00015
    assert direct_client().v1.invoices.retrieve(invoice_id)["amount_due"] == 9900 + 6000

    with db.transaction() as cx:
        subscriptions.change_plan(
            cx,
            org,
            "starter",
            dt.date(2025, 1, 16),
            actor="cli:finance",
            source="cli",
            reason="downgrade agreed in December",
        )
    rows_before = len(outbox_rows())
    code, out, err = _cli(capsys, "rerate", "--period", "2025-01", "--org", org, "--format", "json")
    assert code == 0, err
    diffs = {d["label"]: d["diff_cents"] for d in json.loads(out)["diffs"] if d["diff_cents"]}
    assert diffs == {
        # growth 9900 x 15/31 = 4790.32 + starter 2900 x 16/31 = 1496.77, less 9900 billed
        "base_fee": 4790 + 1497 - 9900,
        "api_calls": 3000 - 6000,  # growth 1-15 Jan: 200k x $0.00015
        "api_calls from 2025-01-16": 2000,  # starter from zero: 100k free + 100k x $0.0002
    }
    assert len(outbox_rows()) == rows_before  # a dry run writes nothing

    for _ in range(2):  # applied twice: corrected once
        code, out, err = _cli(capsys, "rerate", "--period", "2025-01", "--org", org, "--apply")
        assert code == 0, err
    notes = _notes(invoice_id)
    assert sorted(n["total"] for n in notes) == [3000, 3613]
    assert direct_client().v1.invoices.retrieve(invoice_id)["amount_due"] == 15900 - 6613
    (item,) = [
        ii
        for ii in stripe_items(direct_client(), _customer(org))
        if ii["metadata"].to_dict().get("correction_of") == "2025-01"
    ]
    assert (item["amount"], item["invoice"]) == (2000, None)  # on the next invoice
    assert "2025-01" in item["description"]
    # January now costs what the segments say: 11287 = 15900 - 6613 + 2000
    _reconciled(jan, org)
