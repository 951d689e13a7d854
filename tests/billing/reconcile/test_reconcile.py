"""Reconciliation against the real stack: Postgres snapshot rows, the Stripe emulator, the
SMTP sink. Each test owns its period and orgs, so earlier Stripe state never leaks in."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from reconcile_support import (
    SCHEMA,
    _org,
    audit_rows,
    count,
    mails_with,
    org_in_both,
    prepare,
    snapshot,
    stripe_customer,
    stripe_items,
)

from billing.platform import db, settings
from billing.reconcile import compare as reconcile
from billing.reconcile.compare import ReconcileKeyConflict, ReconcileMismatch

pytestmark = pytest.mark.integration


@pytest.fixture
def period(stack, clean_db, monkeypatch):
    return prepare(monkeypatch)


# ---------------------------------------------------------------- scenarios
def test_exact_match_through_the_real_push_and_the_finalized_invoice(period):
    """Items pushed by billing.stripe_sync, then the month-end invoice: both reconcile to 0."""
    from billing import stripe_sync
    from billing.stripe_sync import Engine

    org = _org()
    d1, d2 = period, period.replace(day=2)
    with db.transaction() as cx:
        for day, cum, daily in ((d1, 1234, 1234), (d2, 5678, 4444)):
            cx.execute(
                f"INSERT INTO {SCHEMA}.fct_daily_charges VALUES (%s, 'api_calls', %s, %s, 'usd', %s, %s)",
                (org, day, period, cum, daily),
            )
    snapshot(org, period, {"base_fee": 9900, "api_calls": 5678})
    eng = Engine(sleep=lambda s: None)
    for day in (d1, d2):
        assert stripe_sync.push_day(day, engine=eng)["parked"] == 0

    payload = reconcile.reconcile(period, idempotency_key=f"k-items-{org}")
    assert payload["status"] == "passed" and payload["discrepancies"] == []
    assert payload["counts"] == {
        "orgs": 1,
        "match": 1,
        "within_tolerance": 0,
        "discrepancies": 0,
        "above_tolerance": 0,
    }
    row = audit_rows(f"k-items-{org}")[org]
    assert (row["internal_cents"], row["stripe_cents"], row["abs_diff_cents"]) == (15578, 15578, 0)
    assert (row["status"], row["rel_diff"], row["stripe_source"]) == ("match", 0, "items")
    lines = {x["line"]: x for x in row["lines"]}
    assert lines["api_calls"] == {
        "line": "api_calls",
        "internal_cents": 5678,
        "stripe_cents": 5678,
        "abs_diff_cents": 0,
        "rel_diff": "0",
    }
    assert lines["base_fee"]["stripe_cents"] == 9900
    assert all(row["expectations"].values())

    closed = stripe_sync.close_period(period, engine=eng)
    assert list(closed["invoices"]) == [org]
    again = reconcile.reconcile(period, idempotency_key=f"k-invoice-{org}")
    row = audit_rows(f"k-invoice-{org}")[org]
    assert again["status"] == "passed"
    assert (row["stripe_source"], row["stripe_invoice_id"]) == ("invoice", closed["invoices"][org])
    assert row["stripe_cents"] == 15578 and row["status"] == "match"


def test_049_percent_passes_and_is_listed(period):
    org = org_in_both(
        period, {"base_fee": 10000, "api_calls": 90000}, {"base_fee": 10000, "api_calls": 90490}
    )
    payload = reconcile.reconcile(period, idempotency_key=f"k-{org}")
    assert payload["status"] == "passed" and payload["incident"] is None
    (d,) = payload["discrepancies"]
    assert (d["org_id"], d["status"], d["above_tolerance"]) == (org, "within_tolerance", False)
    assert (d["internal_cents"], d["stripe_cents"], d["abs_diff_cents"]) == (100000, 100490, 490)
    assert d["rel_diff"] == "0.0049"
    line = {x["line"]: x for x in d["lines"]}["api_calls"]
    assert (line["abs_diff_cents"], line["internal_cents"], line["stripe_cents"]) == (
        490,
        90000,
        90490,
    )
    assert audit_rows(f"k-{org}")[org]["rel_diff"] == Decimal("0.0049")
    assert count("SELECT count(*) FROM billing.billing_incidents") == 0


def test_051_percent_fails_opens_one_incident_and_emails_once(period, capsys):
    from billing.platform import mailer

    ok = org_in_both(period, {"base_fee": 5000}, {"base_fee": 5000})
    bad = org_in_both(
        period, {"base_fee": 10000, "api_calls": 90000}, {"base_fee": 10000, "api_calls": 90510}
    )
    key = f"k-{bad}"
    with pytest.raises(ReconcileMismatch) as err:
        reconcile.reconcile(period, idempotency_key=key, run_id="manual__t")
    assert bad in str(err.value) and ok not in str(err.value) and "0.51%" in str(err.value)
    payload = err.value.payload
    assert payload["status"] == "failed" and payload["max_relative_diff"] == "0.0051"
    (d,) = payload["discrepancies"]
    assert (d["org_id"], d["status"], d["internal_cents"], d["stripe_cents"]) == (
        bad,
        "mismatch",
        100000,
        100510,
    )
    gx = {e["expectation"]: e for e in payload["expectations"]}
    assert gx["rel_diff_within_tolerance"]["unexpected_org_ids"] == [bad]
    assert gx["in_stripe"]["success"] and gx["currencies_equal"]["success"]

    rows = audit_rows(key)
    assert set(rows) == {ok, bad}
    assert rows[bad]["is_above_tolerance"] and not rows[ok]["is_above_tolerance"]
    assert rows[bad]["expectations"]["rel_diff_within_tolerance"] is False
    with db.connect() as cx:
        inc = cx.execute(
            """SELECT incident_id, status, assignees, org_ids, message_id, email_to,
                      email_sent_at IS NOT NULL, period FROM billing.billing_incidents"""
        ).fetchall()
    assert len(inc) == 1
    incident_id, status, assignees, orgs, message_id, to, sent, inc_period = inc[0]
    assert (status, assignees, orgs, sent, inc_period) == (
        "open",
        ["Engineering", "Finance"],
        [bad],
        True,
        period,
    )
    addr = mailer.addresses()
    assert to == [addr["engineering"], addr["finance"]]
    assert payload["incident"]["incident_id"] == incident_id
    (mail,) = mails_with(message_id)
    assert addr["engineering"] in mail["To"] and addr["finance"] in mail["To"]
    assert f"INCIDENT #{incident_id}" in mail["Subject"] and bad in mail["Subject"]
    body = mail.get_payload(decode=True).decode()
    assert "internal 100000 usd  stripe 100510 usd  diff 510 cents (0.51%)" in body

    # The alert gauge the rule BillingReconcileMismatch (> 0.005) reads, and open incidents.
    from billing.observability import export as metrics_export

    f, up = metrics_export._Families(), {}
    metrics_export.collect_postgres(f, up)
    gauges = {
        s.name: s.value
        for name in ("billing_reconcile_max_relative_diff", "billing_reconcile_open_incidents")
        for s in f.out[name].samples
    }
    assert gauges == {
        "billing_reconcile_max_relative_diff": 0.0051,
        "billing_reconcile_open_incidents": 1,
    }
    assert up["reconcile"] == up["incidents"] == 1

    # Same key: same stored payload, same error, no new rows, no second email.
    with pytest.raises(ReconcileMismatch) as again:
        reconcile.reconcile(period, idempotency_key=key)
    assert again.value.payload == payload
    assert count("SELECT count(*) FROM billing.billing_audit WHERE idempotency_key = %s", key) == 2
    assert count("SELECT count(*) FROM billing.billing_incidents") == 1
    assert len(mails_with(message_id)) == 1

    # Fixed in Stripe (a credit item), re-reconciled under a new key, then resolved.
    with db.connect() as cx:
        (customer,) = cx.execute(
            "SELECT stripe_customer_id FROM billing.stripe_customers WHERE org_id = %s", (bad,)
        ).fetchone()
    stripe_items(customer, bad, period, {"api_calls": -510})
    assert reconcile.reconcile(period, idempotency_key=f"{key}-fixed")["status"] == "passed"
    f, up = metrics_export._Families(), {}
    metrics_export.collect_postgres(f, up)
    assert f.out["billing_reconcile_max_relative_diff"].samples[0].value == 0
    assert [i["incident_id"] for i in reconcile.open_incidents()] == [incident_id]
    assert reconcile.resolve_incident(incident_id, "credit item in Stripe")["status"] == "resolved"
    assert reconcile.open_incidents() == []
    with pytest.raises(reconcile.ConfigError, match="already resolved"):
        reconcile.resolve_incident(incident_id, "again")
    # The history stays readable: `incidents list --all` shows it resolved, with the note.
    from billing import cli

    capsys.readouterr()
    assert cli.main(["incidents", "list"]) == 0
    assert f"#{incident_id} " not in capsys.readouterr().out
    assert cli.main(["incidents", "list", "--all"]) == 0
    [row] = [r for r in capsys.readouterr().out.splitlines() if r.startswith(f"#{incident_id} ")]
    assert row.split()[1:3] == [period.strftime("%Y-%m"), "resolved"] and row.endswith(
        "| credit item in Stripe"
    )


def test_one_sided_orgs_and_currency_mismatch_are_discrepancies(period):
    only_internal = _org()
    snapshot(only_internal, period, {"base_fee": 2900})
    stripe_customer(only_internal)  # a customer, but nothing pushed for the period
    only_stripe = _org()  # in Stripe (tagged with its org_id), unknown to our mapping
    stripe_items(
        stripe_customer(only_stripe, mapped=False), only_stripe, period, {"api_calls": 700}
    )
    eur = org_in_both(period, {"base_fee": 50000}, {"base_fee": 50000}, stripe_currency="eur")
    free = _org()
    snapshot(free, period, {"base_fee": 0})  # nothing to charge, nothing in Stripe: a match
    key = f"k-{eur}"
    with pytest.raises(ReconcileMismatch) as err:
        reconcile.reconcile(period, idempotency_key=key)
    for org in (only_internal, only_stripe, eur):
        assert org in str(err.value)
    by_org = {d["org_id"]: d for d in err.value.payload["discrepancies"]}
    assert set(by_org) == {only_internal, only_stripe, eur}
    assert by_org[only_internal] | {"lines": None} == by_org[only_internal] | {
        "status": "missing_in_stripe",
        "internal_cents": 2900,
        "stripe_cents": None,
        "abs_diff_cents": 2900,
        "rel_diff": "1",
        "above_tolerance": True,
        "lines": None,
    }
    assert (
        by_org[only_stripe]["status"],
        by_org[only_stripe]["internal_cents"],
        by_org[only_stripe]["stripe_cents"],
    ) == ("missing_internal", None, 700)
    assert (
        by_org[eur]["status"],
        by_org[eur]["internal_currency"],
        by_org[eur]["stripe_currency"],
    ) == ("currency_mismatch", "usd", "eur")
    rows = audit_rows(key)
    assert rows[free]["status"] == "match" and rows[free]["stripe_cents"] == 0
    assert rows[only_internal]["expectations"]["in_stripe"] is False
    assert rows[only_stripe]["expectations"]["in_snapshot"] is False
    assert rows[eur]["expectations"]["currencies_equal"] is False
    assert rows[eur]["expectations"]["in_stripe"] is True
    with db.connect() as cx:
        (orgs,) = cx.execute("SELECT org_ids FROM billing.billing_incidents").fetchone()
    assert sorted(orgs) == sorted([only_internal, only_stripe, eur])

    # An org filter reads just those orgs. The Stripe-only customer was created a moment ago:
    # Stripe's (and the emulator's) search does not show it yet, the customer list does.
    from stripe_support import direct_client

    query = {"query": f"metadata['org_id']:'{only_stripe}'"}
    assert direct_client().v1.customers.search(params=query)["data"] == []
    with pytest.raises(ReconcileMismatch) as one:
        reconcile.reconcile(period, [only_stripe], idempotency_key=f"{key}-one")
    assert [d["org_id"] for d in one.value.payload["discrepancies"]] == [only_stripe]
    assert one.value.payload["org_ids"] == [only_stripe]


def test_same_key_replays_and_other_parameters_are_refused(period):
    org = org_in_both(
        period, {"base_fee": 1000, "api_calls": 1}, {"base_fee": 1000, "api_calls": 1}
    )
    key = f"k-{org}"
    first = reconcile.reconcile(period, [org], key)
    # Stripe changes afterwards; the key still returns what it returned.
    with db.connect() as cx:
        (customer,) = cx.execute(
            "SELECT stripe_customer_id FROM billing.stripe_customers WHERE org_id = %s", (org,)
        ).fetchone()
    stripe_items(customer, org, period, {"api_calls": 5000})
    assert reconcile.reconcile(period, [org], key) == first
    assert count("SELECT count(*) FROM billing.billing_audit WHERE idempotency_key = %s", key) == 1
    assert count("SELECT count(*) FROM billing.reconcile_runs") == 1
    with pytest.raises(ReconcileKeyConflict, match="was used for period"):
        reconcile.reconcile(period.replace(year=period.year + 1), [org], key)
    with pytest.raises(ReconcileKeyConflict):
        reconcile.reconcile(period, None, key)
    with pytest.raises(ReconcileMismatch):  # a new key sees the change
        reconcile.reconcile(period, [org], f"{key}-new")


def test_cli_prints_the_payload_and_exits_non_zero_on_mismatch(period, capsys):
    from billing import cli

    org = org_in_both(period, {"base_fee": 1000}, {"base_fee": 2000})
    p = f"{period:%Y-%m}"
    rc = cli.main(
        ["reconcile", "--period", p, "--org", org, "--idempotency-key", f"k-{org}", "--json"]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    assert err.count("\n") == 1 and err.startswith("billing: error: reconciliation") and org in err
    payload = json.loads(out)
    assert payload["discrepancies"][0]["stripe_cents"] == 2000
    with pytest.raises(SystemExit) as bad:
        cli.main(["reconcile", "--period", "2026-13"])
    assert bad.value.code == 2


def test_tolerance_is_configurable_and_exact(monkeypatch):
    monkeypatch.setenv(settings.RECONCILE_TOLERANCE_ENV, "0.0051")
    tol = settings.reconcile_tolerance()
    side = reconcile.Side
    assert reconcile.compare("o", side(100000, {"usd"}), side(100510, {"usd"}), tol)["status"] == (
        "within_tolerance"
    )
    assert reconcile.compare("o", side(100000, {"usd"}), side(100511, {"usd"}), tol)["status"] == (
        "mismatch"
    )
    monkeypatch.setenv(settings.RECONCILE_TOLERANCE_ENV, "half")
    with pytest.raises(reconcile.ConfigError):
        settings.reconcile_tolerance()


def test_a_push_behind_a_newer_snapshot_defers_instead_of_opening_an_incident(period):
    """A backfill's next nightly (or a scheduled run beside it) publishes a snapshot that
    re-prices the period before its own push: the reconciliation triggered by an earlier push
    of that period sees Stripe behind by design. It defers the period (nothing recorded, no
    incident); the push of the current snapshot, or the trigger form, compares."""
    bad = org_in_both(period, {"base_fee": 10000, "api_calls": 90000}, {"base_fee": 10000})
    with db.connect() as cx:
        cx.execute(
            "INSERT INTO billing.snapshot_publishes (rows_changed, periods)"
            " VALUES (3, ARRAY[%s::date]), (2, ARRAY[%s::date]), (1, ARRAY['2099-01-01'::date])",
            (period, period),
        )
        cx.commit()
        # the last publish changed another period only: it does not defer this one
        (latest,) = cx.execute("SELECT max(seq) - 1 FROM billing.snapshot_publishes").fetchone()
    day = period.isoformat()
    deferred = reconcile.run_task({}, "asset_triggered__a", [day], [(day, latest - 1)])
    assert deferred == {
        "status": "deferred",
        "run_id": "asset_triggered__a",
        "period": f"{period:%Y-%m}",
        "pushed_snapshot_seq": latest - 1,
        "published_snapshot_seq": latest,
    }
    assert count("SELECT count(*) FROM billing.reconcile_runs") == 0
    assert count("SELECT count(*) FROM billing.billing_incidents") == 0
    # a later push of the period, from the current snapshot, compares and finds it; so does
    # a run without a push (the trigger form) and one that names the period
    for pushed, params in (([(day, latest - 1), (day, latest)], {}), (None, {}),
                           ([(day, latest - 1)], {"period": f"{period:%Y-%m}"})):  # fmt: skip
        with pytest.raises(ReconcileMismatch) as err:
            reconcile.run_task(params, f"asset_triggered__{len(str(pushed))}", [day], pushed)
        assert bad in str(err.value)
