"""Shared set-up for reconciliation tests: a private snapshot schema (fct_invoices,
fct_invoice_lines, fct_daily_charges) and Stripe customers/items with the push's metadata."""

from __future__ import annotations

import datetime as dt
import email
import itertools
import uuid

from stripe_support import direct_client

from billing.platform import db, settings

SCHEMA = "reconcile_test_snapshot"
_PERIODS = itertools.count()


def prepare(monkeypatch) -> dt.date:
    """Point the snapshot at a fresh private schema; return a period no other test uses."""
    monkeypatch.setenv("BILLING_SNAPSHOT_SCHEMA", SCHEMA)
    monkeypatch.setenv("BILLING_STRIPE_MAX_RPS", "0")
    monkeypatch.delenv(settings.RECONCILE_TOLERANCE_ENV, raising=False)
    with db.connect(autocommit=True) as cx:
        cx.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cx.execute(f"CREATE SCHEMA {SCHEMA}")
        cx.execute(
            f"""CREATE TABLE {SCHEMA}.fct_invoices (
                    invoice_id text, org_id text, period text, period_start date,
                    period_end date, plan text, currency text, base_fee_cents bigint,
                    usage_cents bigint, total_cents bigint, line_count integer, status text,
                    catalog_version text, snapshot_hash text, as_of_day date)"""
        )
        cx.execute(
            f"""CREATE TABLE {SCHEMA}.fct_invoice_lines (
                    invoice_line_id text, invoice_id text, line_number integer, org_id text,
                    period_start date, line_type text, metric text, pricing_mode text,
                    quantity numeric, amount_cents bigint, currency text, tiers jsonb,
                    catalog_version text, aggregation text, credited_cents bigint NOT NULL DEFAULT 0,
                    credited_days integer NOT NULL DEFAULT 0, dimension_key text NOT NULL DEFAULT '',
                    dimensions jsonb NOT NULL DEFAULT '{{}}', segment_start date, segment_end date, plan text,
    charge_label text GENERATED ALWAYS AS (CASE WHEN line_type = 'usage' THEN metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END
        ELSE line_type || coalesce('.' || metric, '') END) STORED)"""
        )
        cx.execute(
            f"""CREATE TABLE {SCHEMA}.fct_daily_charges (
                    org_id text, metric text, usage_date date, period_start date, currency text,
                    cumulative_charge_cents bigint, daily_charge_cents bigint,
                    dimension_key text NOT NULL DEFAULT '',
                    charge_label text GENERATED ALWAYS AS (metric || CASE WHEN dimension_key <> '' THEN ' ' || dimension_key ELSE '' END) STORED)"""
        )
    from billing.stripe_sync import mode, parking

    parking.client().delete(parking.PARKED)
    mode.set_mode(False)
    # a period of its own, far from what other tests write to the shared emulator
    n = next(_PERIODS) + uuid.uuid4().int % 600 * 12
    return dt.date(2100 + n // 12, n % 12 + 1, 1)


def _org() -> str:
    return f"r{uuid.uuid4().hex[:10]}"


def snapshot(org: str, period: dt.date, lines: dict[str, int], currency: str = "usd") -> None:
    """One snapshot invoice: ``lines`` maps 'base_fee' or a metric to its cents."""
    inv = f"inv_{org}_{period:%Y%m}"
    base = lines.get("base_fee", 0)
    total = sum(lines.values())
    with db.transaction() as cx:
        cx.execute(
            f"""INSERT INTO {SCHEMA}.fct_invoices VALUES
                (%s, %s, %s, %s, %s, 'growth', %s, %s, %s, %s, %s, 'draft', 'v1', 'h', %s)""",
            (
                inv,
                org,
                f"{period:%Y-%m}",
                period,
                period,
                currency,
                base,
                total - base,
                total,
                len(lines),
                period,
            ),
        )
        for n, (name, cents) in enumerate(sorted(lines.items()), 1):
            is_base = name == "base_fee"
            cx.execute(
                f"""INSERT INTO {SCHEMA}.fct_invoice_lines VALUES
                    (%s, %s, %s, %s, %s, %s, %s, NULL, 1, %s, %s, '[]', 'v1')""",
                (
                    f"{inv}-{n}",
                    inv,
                    n,
                    org,
                    period,
                    "base_fee" if is_base else "usage",
                    None if is_base else name,
                    cents,
                    currency,
                ),
            )


def stripe_customer(org: str, *, mapped: bool = True) -> str:
    cus = direct_client().v1.customers.create(params={"metadata": {"org_id": org}})
    if mapped:
        with db.transaction() as cx:
            cx.execute("INSERT INTO billing.stripe_customers VALUES (%s, %s)", (org, cus["id"]))
    return cus["id"]


def stripe_items(customer: str, org: str, period: dt.date, lines: dict[str, int], currency="usd"):
    """Invoice items with the metadata the push writes (org_id, period, kind, metric)."""
    for name, cents in lines.items():
        meta = {"org_id": org, "period": f"{period:%Y-%m}", "idempotency_key": uuid.uuid4().hex}
        meta.update(
            {"kind": "base_fee"} if name == "base_fee" else {"kind": "usage_item", "metric": name}
        )
        direct_client().v1.invoice_items.create(
            params={"customer": customer, "amount": cents, "currency": currency, "metadata": meta}
        )


def org_in_both(
    period, internal: dict[str, int], stripe: dict[str, int] | None = None, **kw
) -> str:
    org = _org()
    snapshot(org, period, internal, kw.get("currency", "usd"))
    stripe_items(
        stripe_customer(org), org, period, stripe or internal, kw.get("stripe_currency", "usd")
    )
    return org


def audit_rows(key: str) -> dict[str, dict]:
    from psycopg.rows import dict_row

    with db.connect() as cx, cx.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            "SELECT * FROM billing.billing_audit WHERE idempotency_key = %s", (key,)
        ).fetchall()
    return {r["org_id"]: r for r in rows}


def count(sql: str, *params) -> int:
    with db.connect() as cx:
        return cx.execute(sql, params).fetchone()[0]


def mails_with(message_id: str) -> list[email.message.Message]:
    found = []
    for path in sorted(settings.mail_dir().glob("*.eml")):
        msg = email.message_from_bytes(path.read_bytes())
        if "".join(str(msg["Message-ID"]).split()) == message_id:
            found.append(msg)
    return found
