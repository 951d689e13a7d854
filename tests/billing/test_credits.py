"""Prepaid credits (billing.credits) on the real stack: granted, applied at the month close
as Stripe credit items exactly once, oldest expiring first, reconciled to the cent, dunned
on the amount due, shown by the CLI and on the PDF.

Snapshot rows are hand-built (reconcile_support's private schema); the push and the close
run against the Stripe emulator as billing_nightly runs them.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import pytest
import reconcile_support as rs
from pdf_support import pdf_text
from stripe_support import customers, direct_client, stripe_items

from billing import credits, reconcile, stripe_sync
from billing.cli import main
from billing.platform import db
from billing.platform.dates import month_end, period_of
from billing.stripe_sync import Engine
from billing.stripe_sync.engine import field

pytestmark = pytest.mark.integration

BASE = 2900  # the growth plan's base fee in the hand-built snapshot (usd)


@pytest.fixture
def env(stack, clean_db, monkeypatch):
    p1 = rs.prepare(monkeypatch)
    monkeypatch.setenv("BILLING_STRIPE_TIMEOUT_SECONDS", "2")
    return p1, period_of(month_end(p1) + dt.timedelta(days=1))


def _org(currency: str = "usd") -> str:
    org = f"c{uuid.uuid4().hex[:10]}"
    with db.transaction() as cx:
        cx.execute(
            """INSERT INTO billing.organizations (org_id, name, email, plan, currency)
               VALUES (%s, %s, %s, 'growth', %s)""",
            (org, f"Credits {org}", f"ap+{org}@example.test", currency),
        )
    return org


def _invoice(org: str, period: dt.date, total_cents: int) -> None:
    """The period's snapshot invoice (base fee + api_calls) and its daily charge row."""
    usage = total_cents - BASE
    rs.snapshot(org, period, {"base_fee": BASE, "api_calls": usage})
    with db.transaction() as cx:
        cx.execute(
            f"INSERT INTO {rs.SCHEMA}.fct_daily_charges VALUES (%s, %s, %s, %s, %s, %s, %s, '')",
            (org, "api_calls", period.replace(day=10), period, "usd", usage, usage),
        )


def _grant(org: str, amount: str, through: dt.date | None = None, reason="goodwill") -> int:
    with db.transaction() as cx:
        g = credits.grant(
            cx, org, amount, "usd", reason=reason, actor="test:ops", valid_through=through
        )
    return g["grant_id"]


def _close(period: dt.date, eng: Engine) -> dict:
    """billing_nightly's Stripe steps for the period's last day: push, then its close."""
    stripe_sync.push_day(month_end(period), engine=eng)
    return stripe_sync.close_period(period, engine=eng)


def _applications(org: str) -> list[tuple]:
    with db.connect() as cx:
        return cx.execute(
            """SELECT to_char(period, 'YYYY-MM'), grant_id, amount_cents
                 FROM billing.credit_applications WHERE org_id = %s ORDER BY period, grant_id""",
            (org,),
        ).fetchall()


def _stripe_invoice(org: str, period: dt.date):
    with db.connect() as cx:
        (inv_id,) = cx.execute(
            "SELECT stripe_invoice_id FROM billing.stripe_invoices WHERE org_id = %s AND period = %s",
            (org, period),
        ).fetchone()
    return direct_client().v1.invoices.retrieve(inv_id)


def _credit_lines(org: str) -> list[tuple]:
    return sorted(
        (ii["metadata"]["period"], ii["metadata"]["grant_id"], ii["amount"], ii["description"])
        for ii in stripe_items(direct_client(), customers()[org])
        if field(ii["metadata"], "kind") == "credit"
    )


def test_oldest_expiring_first_across_two_invoices_exactly_once_and_reconciled(env):
    p1, p2 = env
    org = _org()
    _invoice(org, p1, 4000)
    _invoice(org, p2, 7000)
    a = _grant(org, "30.00", p2.replace(day=15), reason="outage March")  # expires mid-p2
    b = _grant(org, "50", None, reason="migration")  # never expires
    eng = Engine(sleep=lambda _s: None)

    first = _close(p1, eng)
    assert first["closed"] and first["parked"] == 0, first
    # invoice 1 of $40: $30 from A (it expires first), then $10 from B
    assert _applications(org) == [(f"{p1:%Y-%m}", a, 3000), (f"{p1:%Y-%m}", b, 1000)]
    inv1 = _stripe_invoice(org, p1)
    assert (inv1["status"], inv1["total"], inv1["amount_due"]) == ("paid", 0, 0)
    assert inv1["subtotal"] == 0

    second = _close(p2, eng)
    assert second["closed"] and second["parked"] == 0, second
    # invoice 2 of $70: A is used up (and expired by then), $40 from B: $30 due
    assert _applications(org)[2:] == [(f"{p2:%Y-%m}", b, 4000)]
    inv2 = _stripe_invoice(org, p2)
    assert (inv2["status"], inv2["total"], inv2["amount_due"]) == ("open", 3000, 3000)
    assert _credit_lines(org) == [
        (f"{p1:%Y-%m}", str(a), -3000, f"Prepaid credit (grant {a}: outage March)"),
        (f"{p1:%Y-%m}", str(b), -1000, f"Prepaid credit (grant {b}: migration)"),
        (f"{p2:%Y-%m}", str(b), -4000, f"Prepaid credit (grant {b}: migration)"),
    ]
    # each credit item sits on its own period's invoice
    lines2 = inv2["lines"]["data"]
    assert sorted(li["amount"] for li in lines2) == [-4000, BASE, 7000 - BASE]

    # Re-running the closes (retry, clear, backfill, by hand) applies nothing twice.
    for p in (p1, p2):
        again = stripe_sync.close_period(p, engine=eng)
        assert again["planned"] == 0, again
    assert len(_applications(org)) == 3 and len(_credit_lines(org)) == 3
    assert _stripe_invoice(org, p2)["amount_due"] == 3000

    # Reconciliation: snapshot total - credits applied vs Stripe (credit items included).
    for p in (p1, p2):
        payload = reconcile.reconcile(p, [org])
        assert payload["status"] == "passed" and payload["counts"]["match"] == 1, payload
    with db.connect() as cx:
        internal = reconcile.compare._internal(cx, p2, [org])[org]
    assert internal.cents == 3000 and internal.lines["credit"] == -4000

    # The statement: A used up, B has $0 left; every movement listed.
    with db.connect() as cx:
        st = credits.statement(cx, org, month_end(p2) + dt.timedelta(days=1))
    assert (st["balance_cents"], st["expired_cents"]) == (0, 0)
    assert [(g["grant_id"], g["state"], g["applied_cents"]) for g in st["grants"]] == [
        (a, "used", 3000),
        (b, "used", 5000),
    ]
    assert sorted(
        (m["type"], m["grant_id"], m["period"], m["amount_cents"]) for m in st["movements"]
    ) == sorted(
        [
            ("grant", a, None, 3000),
            ("grant", b, None, 5000),
            ("application", a, f"{p1:%Y-%m}", -3000),
            ("application", b, f"{p1:%Y-%m}", -1000),
            ("application", b, f"{p2:%Y-%m}", -4000),
        ]
    )


def test_an_expired_remainder_is_not_applied_and_shows_as_expired(env):
    p1, p2 = env
    org = _org()
    _invoice(org, p1, 4000)
    _invoice(org, p2, 7000)
    a = _grant(org, "50.00", p2.replace(day=15))  # $10 left when it expires mid-p2
    b = _grant(org, "50.00")
    c = _grant(org, "5.00", p2.replace(day=1))  # through p2's first day: expires first
    eng = Engine(sleep=lambda _s: None)
    _close(p1, eng)
    _close(p2, eng)
    # p1: $40 from the two expiring grants, earliest expiry first (C, then A);
    # p2: A and C expired before p2's last day; B pays $50 of $70.
    assert _applications(org) == [
        (f"{p1:%Y-%m}", a, 3500),
        (f"{p1:%Y-%m}", c, 500),
        (f"{p2:%Y-%m}", b, 5000),
    ]
    assert _stripe_invoice(org, p2)["amount_due"] == 2000
    with db.connect() as cx:
        st = credits.statement(cx, org, month_end(p2) + dt.timedelta(days=1))
        before = credits.statement(cx, org, p2.replace(day=10))
    assert (st["balance_cents"], st["expired_cents"]) == (0, 1500)
    assert [(g["grant_id"], g["state"], g["expired_cents"]) for g in st["grants"]] == [
        (a, "expired", 1500),
        (b, "used", 0),
        (c, "used", 0),
    ]
    (expiry,) = [m for m in st["movements"] if m["type"] == "expiry"]
    assert (expiry["grant_id"], expiry["amount_cents"]) == (a, -1500)
    # Before A's expiry its remainder is still balance.
    assert (before["balance_cents"], before["expired_cents"]) == (1500, 0)


def test_an_invoice_fully_covered_is_never_dunned_and_the_minimum_compares_the_amount_due(env):
    from billing import dunning

    p1, _ = env
    covered, small, plain = _org(), _org(), _org()
    for org in (covered, small, plain):
        _invoice(org, p1, 4000)
    _grant(covered, "100")
    _grant(small, "36.00")  # $4.00 left to pay: below the $5.00 minimum amount due
    eng = Engine(sleep=lambda _s: None)
    _close(p1, eng)
    assert _stripe_invoice(covered, p1)["status"] == "paid"
    assert _stripe_invoice(small, p1)["amount_due"] == 400
    stripe_sync.sync_invoices(engine=eng)
    with db.connect() as cx:
        due = dict(
            cx.execute(
                "SELECT org_id, amount_remaining_cents FROM billing.stripe_invoices WHERE period = %s",
                (p1,),
            ).fetchall()
        )
    assert due == {covered: 0, small: 400, plain: 4000}
    summary = dunning.run(month_end(p1) + dt.timedelta(days=400), dry_run=True)
    assert {w["org_id"] for w in summary["would_send"]} == {plain}, summary
    # the credit of the fully covered org is all used: $60 left
    with db.connect() as cx:
        assert credits.statement(cx, covered, p1)["balance_cents"] == 6000


def test_credit_pdf_line_and_etag(env, tmp_path):
    from billing.invoices import store

    p1, _ = env
    org = _org()
    _invoice(org, p1, 7000)
    invoice_id = f"inv_{org}_{p1:%Y%m}"
    with db.connect() as cx:
        etag_before = store.etag_for(store.lookup(cx, invoice_id))
    _grant(org, "40", reason="SLA credit")
    _close(p1, Engine(sleep=lambda _s: None))
    with db.connect() as cx:
        row = store.lookup(cx, invoice_id)
        etag, pdf = store.render_current(cx, invoice_id)
    assert row["credits_applied_cents"] == 4000
    assert etag == store.etag_for(row) != etag_before
    text = pdf_text(pdf, tmp_path)
    assert "Credits applied" in text and "-$40.00" in text
    assert "Amount due (USD)" in text and "$30.00" in text
    assert "Total (USD)" in text and "$70.00" in text


def test_cli_grant_list_void_and_one_line_errors(env, capsys):
    org = _org()
    assert main(["credits", "grant", "--org", org, "--amount", "50.00", "--currency", "USD",
                 "--expires", "2031-01-31", "--reason", "onboarding"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert f"$50.00 to {org}, through 2031-01-31: onboarding" in out
    with db.connect() as cx:
        (gid, actor, expires) = cx.execute(
            "SELECT grant_id, granted_by, expires_at FROM billing.credit_grants WHERE org_id = %s",
            (org,),
        ).fetchone()
    assert actor.startswith("cli:")
    assert expires == dt.datetime(2031, 2, 1, tzinfo=dt.UTC)

    assert main(["credits", "list", "--org", org, "--as-of", "2030-01-01"]) == 0
    table = capsys.readouterr().out
    assert "balance $50.00" in table and "onboarding" in table and "grant" in table
    assert main(["credits", "list", "--org", org, "--format", "json", "--as-of", "2031-03-01"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["balance_cents"], st["expired_cents"]) == (0, 5000)
    assert [m["type"] for m in st["movements"]] == ["grant", "expiry"]

    assert main(["credits", "void", str(gid), "--reason", "entered twice"]) == 0
    assert f"voided grant #{gid} of {org}: $50.00 unapplied remainder" in capsys.readouterr().out
    assert main(["credits", "list", "--org", org, "--format", "json", "--as-of", "2030-01-01"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["balance_cents"] == 0 and st["grants"][0]["state"] == "voided"
    assert [(m["type"], m["amount_cents"]) for m in st["movements"]] == [
        ("grant", 5000),
        ("void", -5000),
    ]

    bad = {
        ("--org", org, "--amount", "5", "--currency", "eur"): f"currency eur is not org {org}'s",
        ("--org", org, "--amount", "5", "--currency", "xyz"): "unsupported currency 'xyz'",
        ("--org", org, "--amount", "-5", "--currency", "usd"): "amount must be positive",
        ("--org", org, "--amount", "0.001", "--currency", "usd"): "more decimal places",
        ("--org", "nope", "--amount", "5", "--currency", "usd"): "unknown org 'nope'",
    }
    for args, message in bad.items():
        assert main(["credits", "grant", *args, "--reason", "x"]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (args, err)
    assert main(["credits", "void", str(gid), "--reason", "again"]) == 2
    assert "already voided" in capsys.readouterr().err
    assert main(["credits", "void", "999999", "--reason", "x"]) == 2
    assert "unknown grant 999999" in capsys.readouterr().err
    assert main(["credits", "list", "--org", "nope"]) == 2
    with db.connect() as cx:
        assert cx.execute("SELECT count(*) FROM billing.credit_grants").fetchone()[0] == 1


def test_allocation_order_and_cap():
    g = [
        {"grant_id": 3, "remaining_cents": 500},
        {"grant_id": 1, "remaining_cents": 2000},
        {"grant_id": 2, "remaining_cents": 100},
    ]
    assert [(x["grant_id"], n) for x, n in credits.allocate(g, 2200)] == [(3, 500), (1, 1700)]
    assert credits.allocate(g, 0) == [] and credits.allocate(g, -300) == []
    assert [n for _, n in credits.allocate(g, 10_000)] == [500, 2000, 100]
    assert credits.parse_amount("50.00", "usd") == 5000
    assert credits.parse_amount("3600", "jpy") == 3600
    for bad in ("0", "-1", "1.234", "NaN", "abc"):
        with pytest.raises(credits.BillingError):
            credits.parse_amount(bad, "usd")
    with pytest.raises(credits.BillingError):
        credits.parse_amount("1.5", "jpy")


def test_the_api_route_and_the_page_panel(env):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from billing.web import credits as web_credits
    from billing.web import page

    org = _org()
    gid = _grant(org, "12.34", reason="<b>sorry</b>")
    app = FastAPI()
    web_credits.install(app)  # the Billing API adds its auth app-wide (web/api.py)
    client = TestClient(app)
    r = client.get(f"/orgs/{org}/credits")
    assert r.status_code == 200
    body = r.json()
    assert (body["balance_cents"], body["currency"]) == (1234, "usd")
    assert [(m["type"], m["grant_id"], m["amount_cents"]) for m in body["movements"]] == [
        ("grant", gid, 1234)
    ]
    assert client.get("/orgs/nope/credits").status_code == 404
    assert client.get("/orgs/bad%20id/credits").status_code == 422

    html = page._templates().get_template("credits.html.j2").render(credits=web_credits.panel(org))
    assert "$12.34" in html and "&lt;b&gt;sorry&lt;/b&gt;" in html and f"#{gid}" in html
    missing = (
        page._templates().get_template("credits.html.j2").render(credits=web_credits.panel("nope"))
    )
    assert "nope: no such org" in missing


def test_an_invoice_waits_for_its_parked_credit_item(env):
    from billing.stripe_sync import outbox, push

    p1, _ = env
    org = _org()
    _invoice(org, p1, 4000)
    _grant(org, "15.00")
    eng = Engine(sleep=lambda _s: None)
    stripe_sync.push_day(month_end(p1), engine=eng)
    with db.transaction() as cx:  # the close's planning, then the credit item parks
        writes, _ = push.plan_close(cx, p1, 30)
        outbox.enqueue(cx, writes)
        assert [w.kind for w in writes] == ["credit", "invoice", "finalize"]
        cx.execute(
            """UPDATE billing.stripe_outbox SET status = 'parked', parked_at = now()
                WHERE kind = 'credit' AND org_id = %s""",
            (org,),
        )
    eng.drain()
    with db.connect() as cx:
        states = dict(
            cx.execute(
                "SELECT kind, status FROM billing.stripe_outbox WHERE org_id = %s AND period = %s",
                (org, p1),
            ).fetchall()
        )
        assert cx.execute(
            "SELECT count(*) FROM billing.stripe_invoices WHERE org_id = %s", (org,)
        ).fetchone() == (0,)
    # not created (nor finalized) without its credit: the customer would pay $15 too much
    assert (states["invoice"], states["finalize"], states["credit"]) == (
        "pending",
        "pending",
        "parked",
    )
    stripe_sync.retry_parked(all=True, engine=eng)
    inv = _stripe_invoice(org, p1)
    assert (inv["status"], inv["total"], inv["amount_due"]) == ("open", 2500, 2500)
    assert stripe_sync.close_period(p1, engine=eng)["closed"]
    assert _applications(org) == [(f"{p1:%Y-%m}", _applications(org)[0][1], 1500)]
